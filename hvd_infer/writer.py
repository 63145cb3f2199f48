"""The output directory: per-rank Parquet parts, atomic, resumable, with _SUCCESS last.

    out/
      part-r00000-000000000000-000000050000.parquet   rank 0, global input rows [0, 50000)
      part-r00001-000000050000-000000100000.parquet
      _parts/<part name>.json     per part: rows, rank, skipped ids, truncated (written before the part)
      _hvd_infer_job.json         what this output is (input fingerprint, model, task): resume checks it
      _manifest.json              every part with its rank and rows, written by rank 0 at the end
      _SUCCESS                    last, only when every rank finished

A part is written to a hidden temporary name and renamed, so a part file is
either whole or absent; names starting with _ or . are ignored by Spark,
pandas and pyarrow, so the directory reads as a plain Parquet dataset.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import pyarrow as pa
import pyarrow.parquet as pq

from hvd_infer.config import JobConfig
from hvd_infer.errors import OutputError
from hvd_infer.shard_plan import Interval, Part

JOB_FILE = "_hvd_infer_job.json"
MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
PARTS_DIR = "_parts"
_PART_RE = re.compile(r"^part-r(\d{5})-(\d{12})-(\d{12})\.parquet$")


def part_name(rank: int, start: int, stop: int) -> str:
    return f"part-r{rank:05d}-{start:012d}-{stop:012d}.parquet"


def parse_part_name(name: str) -> Optional[Tuple[int, int, int]]:
    m = _PART_RE.match(name)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def job_identity(cfg: JobConfig, input_fingerprint: str) -> Dict[str, Any]:
    """What must not change between a run and its resume."""
    return {"input": input_fingerprint, "data_path": cfg.data.path, "text_column": cfg.data.text_column,
            "text_pair_column": cfg.data.text_pair_column, "id_columns": cfg.data.id_columns,
            "model_path": cfg.model.path, "task": cfg.model.task, "max_length": cfg.model.max_length,
            "dtype": cfg.model.dtype, "quantize": cfg.model.quantize, "on_null": cfg.data.on_null}


def _atomic_write_text(path: str, text: str) -> None:
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_output(cfg: JobConfig, identity: Dict[str, Any]) -> None:
    """Whether output.mode allows using output.path for this job; raises OutputError. Read-only."""
    path, mode = cfg.output.path, cfg.output.mode
    if "://" in path:
        raise OutputError(f"output.path {path}: only local or mounted paths (e.g. /dbfs/..., NFS) are supported")
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputError(f"output.path {path} is a file; give a directory")
    entries = os.listdir(path) if os.path.isdir(path) else []
    if not entries:
        return
    if mode == "error":
        raise OutputError(f"output.path {path} is not empty ({len(entries)} entries); set output.mode=overwrite "
                          "to replace it, or output.mode=resume to finish an interrupted run")
    if JOB_FILE not in entries:
        raise OutputError(f"output.path {path} is not empty and was not written by hvd_infer (no {JOB_FILE}); "
                          "refusing to delete or mix with it: choose an empty or new directory")
    if mode == "resume":
        with open(os.path.join(path, JOB_FILE)) as f:
            before = json.load(f).get("identity", {})
        changed = [k for k in identity if before.get(k) != identity[k]]
        if changed:
            raise OutputError(f"output.mode=resume but {', '.join(changed)} changed since {path} was written; "
                              "rerun with the same input and model, or use output.mode=overwrite")


def prepare_output(cfg: JobConfig, identity: Dict[str, Any]) -> List[Interval]:
    """Rank 0, before any rank writes: apply output.mode; return the row ranges already done."""
    check_output(cfg, identity)
    path, mode = cfg.output.path, cfg.output.mode
    entries = os.listdir(path) if os.path.isdir(path) else []
    done: List[Interval] = []
    if entries and mode == "overwrite":
        shutil.rmtree(path)
    elif entries:  # resume
        for name in entries:
            if name.startswith(".") and ".tmp" in name:
                os.remove(os.path.join(path, name))  # an interrupted write: never a finished part
            parsed = parse_part_name(name)
            if parsed:
                done.append(parsed[1:])
        for name in (SUCCESS, MANIFEST):
            if os.path.exists(os.path.join(path, name)):
                os.remove(os.path.join(path, name))
    os.makedirs(os.path.join(path, PARTS_DIR), exist_ok=True)
    _atomic_write_text(os.path.join(path, JOB_FILE), json.dumps({"identity": identity, "config": cfg.to_dict()},
                                                                indent=1, default=str))
    return sorted(done)


@dataclass
class PartRecord:
    name: str
    rank: int
    start: int
    stop: int
    rows: int
    truncated: int
    skipped_ids: List[Any]


def write_part(cfg: JobConfig, rank: int, part: Part, table: pa.Table, truncated: int,
               skipped_ids: List[Any]) -> PartRecord:
    """Write one part atomically: its record first, then the data file by rename."""
    out = cfg.output.path
    name = part_name(rank, part.start, part.stop)
    record = PartRecord(name, rank, part.start, part.stop, table.num_rows, truncated, skipped_ids)
    _atomic_write_text(os.path.join(out, PARTS_DIR, name + ".json"), json.dumps(record.__dict__, default=str))
    tmp = os.path.join(out, f".{name}.tmp-{os.getpid()}")
    compression = None if cfg.output.compression == "none" else cfg.output.compression
    pq.write_table(table, tmp, compression=compression)
    os.replace(tmp, os.path.join(out, name))
    return record


def read_records(out: str) -> List[PartRecord]:
    """Every finished part in out (from any run), in row order."""
    records = []
    for name in sorted(os.listdir(out)):
        parsed = parse_part_name(name)
        if not parsed:
            continue
        side = os.path.join(out, PARTS_DIR, name + ".json")
        if os.path.exists(side):
            with open(side) as f:
                records.append(PartRecord(**json.load(f)))
        else:
            rows = pq.ParquetFile(os.path.join(out, name)).metadata.num_rows
            records.append(PartRecord(name, parsed[0], parsed[1], parsed[2], rows, 0, []))
    return sorted(records, key=lambda r: r.start)


def write_empty_part(cfg: JobConfig, schema: pa.Schema) -> None:
    """An empty input still gives a readable dataset (Spark cannot read a directory with no files)."""
    name = part_name(0, 0, 0)
    if not os.path.exists(os.path.join(cfg.output.path, name)):
        pq.write_table(schema.empty_table(), os.path.join(cfg.output.path, name))


def finish_output(cfg: JobConfig, summary: Dict[str, Any]) -> str:
    """Rank 0, after every rank finished: manifest, then _SUCCESS. Returns the manifest path."""
    out = cfg.output.path
    records = read_records(out)
    manifest = {"parts": [{"file": r.name, "rank": r.rank, "rows": r.rows, "input_rows": [r.start, r.stop],
                           "truncated": r.truncated} for r in records],
                "rows": sum(r.rows for r in records),
                "skipped_ids": [i for r in records for i in r.skipped_ids],
                "summary": summary}
    path = os.path.join(out, MANIFEST)
    _atomic_write_text(path, json.dumps(manifest, indent=1, default=str))
    _atomic_write_text(os.path.join(out, SUCCESS), "")
    return path
