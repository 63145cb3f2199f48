"""The output: per-rank Parquet parts, each whole or absent, resumable, with _SUCCESS last.

    out/                          a local directory, or an object-store prefix (s3://, gs://, abfss://)
      part-r00000-000000000000-000000050000.parquet   rank 0, global input rows [0, 50000)
      part-r00001-000000050000-000000100000.parquet
      _parts/<part name>.json     per part: rows, rank, skipped ids, truncated (written before the part)
      _hvd_infer_job.json         what this output is (input fingerprint, model, task): resume checks it
      _manifest.json              every part with its rank and rows, written by rank 0 at the end
      _SUCCESS                    last, only when every rank finished

Every file is written whole or not at all (hvd_infer.storage), so a listed part is a finished part.
Only names of this layout are ever deleted, and only under a root holding _hvd_infer_job.json.

With output.format=delta the root is a Delta table's: part names end with the job's id, so every job's
names are new, and rank 0 commits all of a job's parts in one transaction at the end (hvd_infer.delta).
append and overwrite never delete another job's parts; resume finishes the job the job file names.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import pyarrow as pa
import pyarrow.parquet as pq

from hvd_infer import delta as delta_table
from hvd_infer.config import JobConfig, mask_secrets
from hvd_infer.errors import OutputError
from hvd_infer.shard_plan import Interval, Part
from hvd_infer.storage import Location, explain

JOB_FILE = "_hvd_infer_job.json"
MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
PRECISION = "precision"  # identity key: the precision model.dtype=auto-check chose
PARTS_DIR = "_parts"
_PART_RE = re.compile(r"^part-r(\d{5})-(\d{12})-(\d{12})(?:-([0-9a-f]{12}))?\.parquet$")  # a job id: Delta
_TEMP_RE = re.compile(r"^\.(.+)\.tmp-\d+$")  # a local write interrupted before its rename


def part_name(rank: int, start: int, stop: int, job: str = "") -> str:
    return f"part-r{rank:05d}-{start:012d}-{stop:012d}{'-' + job if job else ''}.parquet"


def parse_part_name(name: str, job: Optional[str] = None) -> Optional[Tuple[int, int, int]]:
    """(rank, start, stop) of a part's name; given job, only for that job's parts ("": a Parquet output's)."""
    m = _PART_RE.match(name)
    if not m or (job is not None and (m.group(4) or "") != job):
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def new_job_id() -> str:
    """The id in a Delta job's part names: new for each job, kept by its resume."""
    return uuid.uuid4().hex[:12]


def _is_ours(name: str) -> bool:
    """A name of the layout above (a part, its record, the job files, an interrupted local write)."""
    folder, _, base = name.rpartition("/")
    temp = _TEMP_RE.match(base)
    base = temp.group(1) if temp else base
    if folder == PARTS_DIR:
        return base.endswith(".json") and parse_part_name(base[:-len(".json")]) is not None
    return folder == "" and (parse_part_name(base) is not None or base in (JOB_FILE, MANIFEST, SUCCESS))


def job_identity(cfg: JobConfig, input_fingerprint: str) -> Dict[str, Any]:
    """What must not change between a run and its resume. Keys added since the first job files (long_texts,
    runtime, output_format) are left out at their defaults, so older job files still match."""
    m = cfg.model
    identity = {"input": input_fingerprint, "data_path": cfg.data.path, "text_column": cfg.data.text_column,
                "text_pair_column": cfg.data.text_pair_column, "id_columns": cfg.data.id_columns,
                "model_path": m.path, "task": m.task, "max_length": m.max_length,
                "dtype": m.dtype, "quantize": m.quantize, "on_null": cfg.data.on_null}
    if m.long_texts == "chunk":
        identity["long_texts"] = f"chunk, stride {m.stride}, {m.chunk_aggregation}"
    if m.runtime != "eager":
        identity["runtime"] = m.runtime
    if cfg.output.format != "parquet":
        identity["output_format"] = cfg.output.format
    return identity


def output_schema(cfg: JobConfig, input_schema: pa.Schema, task) -> pa.Schema:
    """The columns of every part (and of the Delta table): the id columns as in the input, then the task's."""
    return pa.schema([input_schema.field(c) for c in cfg.data.id_columns] + task.output_fields())


def output_location(cfg: JobConfig) -> Location:
    try:
        return Location(cfg.output.path, cfg.output.storage_options)
    except Exception as e:
        raise explain(e, "output.path", cfg.output.path, OutputError) or e from None


@dataclass
class OutputState:
    """What check_output found: the parts already done and what applying output.mode removes."""
    done: List[Interval] = field(default_factory=list)
    remove: List[str] = field(default_factory=list)
    precision: str = ""  # model.dtype=auto-check: the precision the earlier run chose (record_precision)
    job: str = ""  # output.format=delta: the id in this job's part names (new_job_id); "" for parquet
    commit: str = ""  # output.format=delta: how the parts join the table at the end, append or overwrite


def check_output(cfg: JobConfig, identity: Dict[str, Any], schema: pa.Schema) -> OutputState:
    """Can output.path be used as output.mode and output.format say, for parts of this schema? Reads only; raises
    OutputError naming what is wrong."""
    path, mode, delta = cfg.output.path, cfg.output.mode, cfg.output.format == "delta"
    if delta:
        delta_table.require()
    loc = output_location(cfg)
    try:
        if loc.local and loc.fs.isfile(loc.root):
            raise OutputError(f"output.path {path} is a file; give a directory")
        names = loc.names()
        job_file = json.loads(loc.read(JOB_FILE)) if JOB_FILE in names else None
    except OutputError:
        raise
    except Exception as e:
        raise explain(e, "output.path", path, OutputError) or e from None
    new_job = OutputState(job=new_job_id(), commit="overwrite" if mode == "overwrite" else "append") if delta \
        else OutputState()
    if not names:
        return new_job
    if mode == "error":
        raise OutputError(f"output.path {path} is not empty ({len(names)} entries); set output.mode=overwrite "
                          "to replace it, or output.mode=resume to finish an interrupted run")
    stale = [n for n in names if n in (SUCCESS, MANIFEST) or _TEMP_RE.match(n.rpartition("/")[2])]
    before = job_file.get("identity", {}) if job_file is not None else None
    table = delta_table.is_table(names)
    if table and not delta:
        raise OutputError(f"output.path {path} is a Delta table (it has a {delta_table.DELTA_LOG}); write to it with "
                          "output.format=delta, or choose another directory")
    if table:
        # Any Delta table of the job's columns will do: only the latest job's _manifest.json and _SUCCESS go.
        delta_table.check_table(cfg, schema)
        if mode != "resume":
            new_job.remove = stale if job_file is not None else []
            return new_job
        if job_file is None:
            raise OutputError(f"output.mode=resume but the Delta table at {path} holds no hvd_infer job to finish "
                              f"(no {JOB_FILE}); use output.mode=append or output.mode=overwrite")
    else:
        foreign = [n for n in names if not _is_ours(n)]
        if before is None or foreign:
            what = f"no {JOB_FILE}" if before is None else f"{len(foreign)} other files, e.g. {foreign[0]}"
            raise OutputError(f"output.path {path} is not empty and was not written by hvd_infer ({what}); "
                              "refusing to delete or mix with it: choose an empty or new directory")
        if mode == "overwrite":
            new_job.remove = names
            return new_job
        if mode == "append":
            raise OutputError(f"output.mode=append adds to a Delta table, and {path} holds an hvd_infer output "
                              f"without one (no {delta_table.DELTA_LOG}); finish it with output.mode=resume, replace "
                              "it with output.mode=overwrite, or choose a new path")
    # An auto-check run records its choice once made; the resume keeps it (load_checked_model).
    precision = before.get(PRECISION, "") if identity["dtype"] == "auto-check" else ""
    identity = {**identity, PRECISION: precision} if precision else identity
    changed = [k for k in [*identity, *(k for k in before if k not in identity)] if before.get(k) != identity.get(k)]
    if changed:
        kept = (f" (its rows were scored in {before[PRECISION]}, chosen by model.dtype=auto-check: resume with "
                "model.dtype=auto-check to keep it)" if PRECISION in changed and before.get(PRECISION) else "")
        raise OutputError(f"output.mode=resume but {', '.join(changed)} changed since {path} was written{kept}; "
                          "rerun with the same input and model, or use output.mode=overwrite")
    job = job_file.get("delta", {"job": "", "commit": ""})  # the job being resumed keeps its id and commit
    done = sorted(parsed[1:] for parsed in (parse_part_name(n, job["job"]) for n in names) if parsed)
    return OutputState(done=done, remove=stale, precision=precision, job=job["job"], commit=job["commit"])


def apply_output_mode(cfg: JobConfig, identity: Dict[str, Any], state: OutputState) -> List[Interval]:
    """Rank 0, before any rank writes: remove what the mode replaces, write the job file; the rows done."""
    loc = output_location(cfg)
    job = {"identity": identity, "config": mask_secrets(cfg.to_dict())}
    if state.job:
        job["delta"] = {"job": state.job, "commit": state.commit}
    try:
        loc.delete(state.remove)
        loc.put(JOB_FILE, json.dumps(job, indent=1, default=str).encode())
    except Exception as e:
        raise explain(e, "output.path", cfg.output.path, OutputError) or e from None
    return state.done


def prepare_output(cfg: JobConfig, identity: Dict[str, Any], schema: pa.Schema) -> OutputState:
    """Rank 0, before any rank writes: check_output, then apply output.mode; the rows done, the precision kept."""
    state = check_output(cfg, identity, schema)
    state.done = apply_output_mode(cfg, {**identity, PRECISION: state.precision} if state.precision else identity,
                                   state)
    return state


def record_precision(cfg: JobConfig, precision: str) -> None:
    """Rank 0, model.dtype=auto-check, before any row is written: the choice joins the job's identity."""
    loc = output_location(cfg)
    try:
        job = json.loads(loc.read(JOB_FILE))
        job["identity"][PRECISION] = precision
        loc.put(JOB_FILE, json.dumps(job, indent=1, default=str).encode())
    except Exception as e:
        raise explain(e, "output.path", cfg.output.path, OutputError) or e from None


@dataclass
class PartRecord:
    name: str
    rank: int
    start: int
    stop: int
    rows: int
    truncated: int
    skipped_ids: List[Any]


def _parquet_bytes(cfg: JobConfig, table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=None if cfg.output.compression == "none" else cfg.output.compression)
    return sink.getvalue().to_pybytes()


def write_part(cfg: JobConfig, rank: int, part: Part, table: pa.Table, truncated: int,
               skipped_ids: List[Any], job: str = "") -> PartRecord:
    """Write one part, whole or absent: its record first, then the data file. job: OutputState.job."""
    loc = output_location(cfg)
    name = part_name(rank, part.start, part.stop, job)
    record = PartRecord(name, rank, part.start, part.stop, table.num_rows, truncated, skipped_ids)
    loc.put(f"{PARTS_DIR}/{name}.json", json.dumps(record.__dict__, default=str).encode())
    loc.put(name, _parquet_bytes(cfg, table))
    return record


def read_records(out: str, storage_options: Optional[Dict[str, Any]] = None, job: str = "") -> List[PartRecord]:
    """Every finished part of the job in out (from any of its runs), in row order. job: OutputState.job."""
    loc = Location(out, storage_options)
    names = set(loc.names())
    records = []
    for name in sorted(names):
        parsed = parse_part_name(name, job)
        if not parsed:
            continue
        side = f"{PARTS_DIR}/{name}.json"
        if side in names:
            records.append(PartRecord(**json.loads(loc.read(side))))
        else:
            with loc.fs.open(loc.path(name), "rb") as f:
                rows = pq.ParquetFile(f).metadata.num_rows
            records.append(PartRecord(name, parsed[0], parsed[1], parsed[2], rows, 0, []))
    return sorted(records, key=lambda r: r.start)


def write_empty_part(cfg: JobConfig, schema: pa.Schema, job: str = "") -> None:
    """An empty input still gives a readable dataset (Spark cannot read a directory with no files)."""
    loc = output_location(cfg)
    name = part_name(0, 0, 0, job)
    if not loc.exists(name):
        loc.put(name, _parquet_bytes(cfg, schema.empty_table()))


def commit_table(cfg: JobConfig, state: OutputState, schema: pa.Schema) -> int:
    """output.format=delta, rank 0, after every rank finished: every part of the job committed to the Delta table
    in one transaction (hvd_infer.delta.commit); the table's version that holds them."""
    loc = output_location(cfg)
    records = read_records(cfg.output.path, cfg.output.storage_options, state.job)
    try:
        sizes = loc.sizes()
    except Exception as e:
        raise explain(e, "output.path", cfg.output.path, OutputError) or e from None
    return delta_table.commit(cfg, [(r.name, sizes[r.name], r.rows) for r in records], schema, state.job,
                              state.commit)


def finish_output(cfg: JobConfig, summary: Dict[str, Any], job: str = "") -> str:
    """Rank 0, after every rank finished (and a Delta job's commit): manifest, then _SUCCESS. Returns the manifest's
    path or URL. job: OutputState.job."""
    loc = output_location(cfg)
    records = read_records(cfg.output.path, cfg.output.storage_options, job)
    manifest = {"parts": [{"file": r.name, "rank": r.rank, "rows": r.rows, "input_rows": [r.start, r.stop],
                           "truncated": r.truncated} for r in records],
                "rows": sum(r.rows for r in records),
                "skipped_ids": [i for r in records for i in r.skipped_ids],
                "summary": summary}
    loc.put(MANIFEST, json.dumps(manifest, indent=1, default=str).encode())
    loc.put(SUCCESS, b"")
    return loc.url_of(MANIFEST)
