"""model.dtype=auto-check: the precision this job runs in, chosen by measuring it on the job's own rows.

    model, tokenizer, facts = load_checked_model(cfg, task, ctx, inp)   # instead of load_model

Rank 0 reads the first model.check_rows rows of the input (fewer on a smaller job: sample_rows) and
scores them in float32 and in each faster precision this device runs natively: on CUDA float16, and
bfloat16 where the GPU supports it; on CPU bfloat16 only with AVX512-BF16/AMX (elsewhere it is many
times slower than float32), and dynamic int8 with per-channel scales and the task head left in float32,
in torch and, where ONNX Runtime is installed, in ONNX Runtime (model.runtime=onnxruntime), and for the tasks
no rescoring serves ONNX Runtime's int8-blockwise (see candidates). On text-classification, where torch's or ONNX
Runtime's int8 changes a label of the first chunk, int8-rescore or onnxruntime-int8-rescore joins, which scores
again in float32 the rows whose two likeliest labels that int8 puts close together (_rescore_margin). It times
each (after one warm-up batch) and picks the fastest whose agreement with float32 is at least
model.check_agreement:

    text-classification, zero-shot   share of rows with the same label
    token-classification             share of rows with the same entity spans (group, start, end)
    text-generation                  share of rows with the same generated text
    embedding                        mean cosine similarity to the float32 vectors

It scores the rows in chunks and stops as soon as the verdict is decided (see measure): a candidate
that cannot reach the agreement any more is dropped, and the check ends once the fastest candidate
cannot fall below it. Every rank then loads the chosen precision; the choice, each precision's seconds,
rows scored and agreement, and the check's own cost go to the job summary and to MLflow (params
resolved.precision_*).

The check is skipped, and the job runs float32, when the input is too small for a faster precision
to win back the cost of even one chunk in each (skip_reason). A resumed job (output.mode=resume) keeps
the precision recorded in the output's job file, so its rows are never scored in two precisions.

A decision measured is kept on the host, beside its ONNX graphs ($TMPDIR/hvd_infer-onnx/decisions/<key>.json),
keyed by what decided it (check_identity): the next job on the same host, model and settings reuses it
(looked up before the skip: a small job gets the earlier check's choice at no cost).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from hvd_infer.config import JobConfig
from hvd_infer.errors import ConfigError

log = logging.getLogger("hvd_infer")


@dataclass(frozen=True)
class Precision:
    """A precision and the engine that runs it (model.dtype, model.quantize, model.runtime, model.rescore_margin)."""
    name: str
    dtype: str  # model.dtype
    quantize: str = "none"  # model.quantize
    runtime: str = "eager"  # model.runtime
    rescore: float = 0.0  # model.rescore_margin

    def config(self, cfg: JobConfig) -> JobConfig:
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype=self.dtype, quantize=self.quantize,
                                                                  runtime=self.runtime, rescore_margin=self.rescore))

    @property
    def token(self) -> str:
        """The precision as the output's job file records it (parse_precision reads it back)."""
        return self.name + (f"@{self.rescore!r}" if self.rescore else "")


def parse_precision(token: str) -> Precision:
    name, _, rescore = token.partition("@")
    if name not in PRECISIONS:  # recorded by an earlier version, e.g. int8-selective:<its float32 layers>
        raise ConfigError(f"output.path's rows were scored in {name.partition(':')[0]}, which hvd_infer no longer "
                          "runs: resume it with the version that started it, or rerun with output.mode=overwrite")
    return dataclasses.replace(PRECISIONS[name], rescore=float(rescore) if rescore else 0.0)


FLOAT32 = Precision("float32", "float32")


PRECISIONS = {p.name: p for p in [FLOAT32, Precision("float16", "float16"), Precision("bfloat16", "bfloat16"),
                                    Precision("int8-per-channel", "float32", "int8-per-channel"),
                                    Precision("int8-rescore", "float32", "int8-per-channel"),  # rescore: measured
                                    Precision("onnxruntime-int8-rescore", "float32", "int8-per-channel",
                                              "onnxruntime"),  # rescore: measured
                                    Precision("onnxruntime-int8-per-channel", "float32", "int8-per-channel",
                                              "onnxruntime"),
                                    Precision("onnxruntime-int8-blockwise", "float32", "int8-blockwise",
                                              "onnxruntime")]}

# Rows scored per precision before the agreement bounds are looked at again.
CHUNK_ROWS = 64
# The sample's batches: the job's rows per batch halved while that pads at least this much less, to at least
# this many rows (_sample_rows_per_batch).
SAMPLE_PADDING_STEP = 0.1
SAMPLE_BATCH_ROWS = 8
# int8-rescore scores again in float32 the rows whose two likeliest labels int8 puts closer than RESCORE_SAFETY x
# the widest such gap among the first chunk's rows whose label int8 changed; onnxruntime-int8-rescore the same
# over ONNX Runtime's int8. Each int8 precision (a candidate that changed labels) and its rescoring:
RESCORED = {"int8-per-channel": "int8-rescore", "onnxruntime-int8-per-channel": "onnxruntime-int8-rescore"}
# A label a rescoring left to int8 changed on a later chunk widens its margin (at most this many times per check):
# the first chunk's widest gap is a small sample. On the 12-class bench under emulated AVX2 the first chunk's
# margin left onnxruntime-int8-rescore at 0.9892 on 93 rows, 2.2x as fast as float32, rejected.
MAX_WIDENINGS = 2
RESCORE_SAFETY = 2.0
# A candidate counts as faster than float32 only where float32 takes at least this many times its seconds on the
# same rows: a near tie is timing noise on a hundred rows, and not worth a label changed. (On the 12-class bench
# under emulated AVX2, int8-rescore at 1.16 s against float32's 1.17 s was chosen, then ran the job 3% faster
# than float32 with 0.26% of its labels changed, after a check of 9.9 s.)
MIN_SPEEDUP = 1.1
# The check scores its sample in every precision while the other ranks wait: a sample of at most a rank's
# rows / (PAYBACK x the precisions) keeps that under a tenth of the time a rank takes in float32.
PAYBACK = 10


def candidates(cfg: JobConfig, device: torch.device) -> List[Precision]:
    """The precisions that can beat float32 on this device; those it would emulate slowly are left out. On a
    CPU: per-channel int8 in torch, and in ONNX Runtime where it is installed (not for text-generation).

    Beside them, for the tasks no rescoring serves, where float32 runs on torch's Linear (blockwise_pays), ONNX
    Runtime's int8-blockwise: slower than per-channel int8, with about a tenth of its error.

    Each candidate costs the check a model load and its rows, so one that seldom wins is not tried: ONNX
    Runtime's float32 gained 0-14% over torch's, less than the check spends on it in a job of 10,000 rows. It
    stays an explicit choice (model.runtime=onnxruntime)."""
    if device.type == "cuda":
        return [PRECISIONS["float16"]] + ([PRECISIONS["bfloat16"]] if torch.cuda.is_bf16_supported() else [])
    from hvd_infer.engines import check_runtime
    from hvd_infer.model import cpu_has_native_bf16

    found = ([PRECISIONS["bfloat16"]] if cpu_has_native_bf16() else []) + [PRECISIONS["int8-per-channel"]]
    onnx = [PRECISIONS["onnxruntime-int8-per-channel"]] + (
        [PRECISIONS["onnxruntime-int8-blockwise"]] if blockwise_pays(cfg) else [])
    for precision in onnx if cfg.model.task != "text-generation" else ():
        try:
            check_runtime(precision.config(cfg), device)  # ONNX Runtime installed and importable (and new enough)
            found.append(precision)
        except ConfigError:
            pass
    return found


# The tasks auto-check tries int8-blockwise for: those int8-rescore cannot serve (it rescores a classifier's
# unsure rows; on the 12-class bench model int8-blockwise kept 99.41% of the labels, and the rescoring ran as fast
# with 99.90%). On the all-MiniLM-L6-v2 embedding, 8,000 rows at -np 2, ONNX Runtime's per-channel int8 kept a
# mean cosine of 0.9916-0.9929 (under model.check_agreement), int8-blockwise 0.9996.
BLOCKWISE_TASKS = ("embedding", "token-classification", "zero-shot-classification")


def blockwise_pays(cfg: JobConfig) -> bool:
    """Is int8-blockwise worth a place in the check? For BLOCKWISE_TASKS, where float32 runs on torch's Linear:
    there (emulated AVX2) it ran the embedding 1.42x float32 steady; against oneDNN's float32 (model.onednn, on
    AVX512) 1.07-1.14x in process and 1.09x in the job, less than the check spends on it."""
    from hvd_infer import onednn

    return cfg.model.task in BLOCKWISE_TASKS and not (cfg.model.onednn and not onednn.available())


def sample_rows(cfg: JobConfig, device: torch.device, total_rows: int, world_size: int) -> int:
    """Rows the check scores per precision: model.check_rows, or fewer on a smaller job, so that scoring them
    in every precision costs at most 1/PAYBACK of a rank's float32 time."""
    precisions = 1 + len(candidates(cfg, device))
    return min(cfg.model.check_rows, total_rows // (PAYBACK * precisions * world_size))


def skip_reason(cfg: JobConfig, device: torch.device, total_rows: int, world_size: int) -> str:
    """Why the check would cost more than it can win back ("" when it can pay): a job too small to score even
    one chunk of rows in each precision."""
    least_rows = min(CHUNK_ROWS, cfg.model.check_rows)
    if sample_rows(cfg, device, total_rows, world_size) >= least_rows:
        return ""
    precisions = 1 + len(candidates(cfg, device))
    least = PAYBACK * least_rows * precisions * world_size
    return (f"{total_rows} input rows < {least} ({PAYBACK} x {least_rows} rows x {precisions} precisions "
            f"x {world_size} ranks)")


@dataclass
class Decision:
    choice: Precision = FLOAT32
    rows: int = 0  # the sample: the bounds are on the agreement over this many rows
    seconds: Dict[str, float] = field(default_factory=dict)  # forward time over the rows scored, per precision
    scored: Dict[str, int] = field(default_factory=dict)  # rows scored, per precision
    agreement: Dict[str, float] = field(default_factory=dict)  # with float32 over the rows scored, per candidate
    rejected: List[str] = field(default_factory=list)  # stopped early: even all remaining rows agreeing fall short
    # stopped early: slower than this other and no closer (float32: not MIN_SPEEDUP times as fast as it)
    outrun: Dict[str, str] = field(default_factory=dict)
    load_seconds: Dict[str, float] = field(default_factory=dict)  # loading (ONNX Runtime: exporting) each
    widened: Dict[str, int] = field(default_factory=dict)  # rescorings whose margin widened (MAX_WIDENINGS)
    check_seconds: float = 0.0  # the whole check: reading, loading each precision, scoring
    how: str = "measured"  # or why it was not: "skipped: ...", "resumed: ..."

    def facts(self, threshold: float) -> Dict[str, Any]:
        facts: Dict[str, Any] = {"precision_choice": self.choice.name, "precision_check": self.how}
        kept = (f" (rows whose two likeliest labels are within {self.choice.rescore:.4f} in probability rescored "
                "in float32)" if self.choice.rescore else "")
        measured = self.how == "measured"
        if not measured and not self.seconds:  # skipped, resumed
            facts["notes"] = [f"model.dtype=auto-check {self.how}; running {self.choice.name}{kept}"]
            return facts
        loading = sum(self.load_seconds.values())
        # A reused check's figures are the earlier job's; this job's check cost nothing.
        facts.update(precision_check_rows=self.rows,
                     precision_check_seconds=round(self.check_seconds, 2) if measured else 0.0,
                     precision_check_load_seconds=round(loading, 2) if measured else 0.0)
        parts = []
        for name, seconds in self.seconds.items():
            rows = self.scored[name]
            facts[f"precision_{name}_seconds"] = round(seconds, 3)
            facts[f"precision_{name}_rows"] = rows
            on = f" on {rows} rows" if rows < self.rows else ""
            if name in self.agreement:
                facts[f"precision_{name}_agreement"] = round(self.agreement[name], 5)
                ok = (f", rejected: < {threshold} whatever the other rows" if name in self.rejected
                      else f", stopped: not {MIN_SPEEDUP:g}x as fast as float32" if self.outrun.get(name) == "float32"
                      else f", stopped: slower than {self.outrun[name]} and no closer" if name in self.outrun
                      else "" if self.agreement[name] >= threshold else f" < {threshold}")
                widened = f", its margin widened {self.widened[name]}x" if name in self.widened else ""
                parts.append(f"{name} {seconds:.2f} s{on} (agreement {self.agreement[name]:.4f}{widened}{ok})")
            else:
                parts.append(f"{name} {seconds:.2f} s{on}")
        head = (f"model.dtype=auto-check on {self.rows} rows chose {self.choice.name} (check took "
                f"{self.check_seconds:.1f} s, {loading:.1f} s of it loading)" if measured else
                f"model.dtype=auto-check {self.how}, which on {self.rows} rows chose {self.choice.name} (it took "
                f"{self.check_seconds:.1f} s then, {loading:.1f} s of it loading; this job paid nothing for it)")
        facts["notes"] = [head + ": " + "; ".join(parts or ["no rows to score"]) + kept]
        return facts


def load_checked_model(cfg: JobConfig, task, ctx, inp, resumed: str = "") -> Tuple[Any, Any, Dict[str, Any]]:
    """load_model, with model.dtype=auto-check settled first: rank 0 measures (or reuses the decision an earlier
    job on this host measured for the same check_identity), every rank loads its choice.

    resumed: the precision the run that wrote output.path chose (output.mode=resume); it is kept, unmeasured.
    Rank 0 records the choice in the output's job file before any row is written, so a resume keeps it.
    Every rank runs the same collectives whether rank 0's check succeeds or fails.
    """
    from hvd_infer.model import import_model_code, load_model
    from hvd_infer.writer import record_precision

    if cfg.model.dtype != "auto-check":
        return load_model(cfg, task, ctx.device)
    try:  # every rank at once, and all done before the check times anything
        import_model_code(cfg, task, ctx.device)
    except Exception:  # only a head start: whatever failed here fails in load_model, with its own message
        pass
    ctx.barrier()
    decision, error, loaded = None, None, None
    if ctx.is_main:
        try:
            skip = skip_reason(cfg, ctx.device, inp.total_rows, ctx.size)
            identity = {} if resumed else check_identity(cfg, ctx)
            reused = earlier_decision(identity, cfg.model.check_agreement) if identity else None
            if resumed:
                decision = Decision(choice=parse_precision(resumed),
                                    how=f"resumed: output.path was scored in {resumed.partition(':')[0]}")
            elif reused:
                decision = reused
            elif skip:
                decision = Decision(how=f"skipped: {skip}")
            else:
                # The host's other ranks only wait meanwhile: the check takes their cores too (every precision
                # is timed with the same threads, so they still compare fairly).
                torch.set_num_threads(ctx.threads * (ctx.local_size if ctx.device.type == "cpu" else 1))
                try:
                    decision, loaded = measure(cfg, task, ctx.device, inp,
                                               sample_rows(cfg, ctx.device, inp.total_rows, ctx.size))
                finally:
                    torch.set_num_threads(ctx.threads)
                if decision.rows:
                    keep_decision(identity, decision)
            record_precision(cfg, decision.choice.token)
        except Exception as e:
            error = e
    ctx.agree(error)
    decision = ctx.broadcast_object(decision)
    if loaded is not None:  # rank 0 keeps the model it checked (task.setup again: the last one loaded set it up)
        model, tokenizer, facts = loaded
        task.setup(model.module, tokenizer)
    else:
        model, tokenizer, facts = load_model(decision.choice.config(cfg), task, ctx.device)
    check = decision.facts(cfg.model.check_agreement)
    facts.update(check, notes=facts.get("notes", []) + check["notes"])
    return model, tokenizer, facts


# Which section of the config holds the task's own settings, all of which change its outputs.
TASK_SECTIONS = {"zero-shot-classification": "zero_shot", "text-generation": "generation",
                 "token-classification": "token_classification", "embedding": "embedding"}
# The model section's keys that leave a check's decision as it is: the model is keyed by its content, and
# auto-check sets the precision's own keys itself.
NOT_DECIDING = ("path", "dtype", "quantize", "runtime", "rescore_margin", "allow_pickle")


def check_identity(cfg: JobConfig, ctx) -> Dict[str, Any]:
    """What decides auto-check's choice on this host: the model's content, the task and its settings, the model
    section (check_agreement, check_rows, max_length, long_texts, onednn, ...), the batching, the candidates, the
    device (the CPU's model and flags, or the GPU's name), the threads, and the versions of the libraries that run
    the model. A decision is reused only where all of it is the same (decision_key)."""
    from hvd_infer import onednn
    from hvd_infer.context import cpu_facts
    from hvd_infer.engines import cpu_has_vnni, model_digest
    from hvd_infer.model import cpu_has_native_bf16, resolve_model_path

    m, d = cfg.model, cfg.data
    device = ctx.device
    section = TASK_SECTIONS.get(m.task)
    if device.type == "cuda":
        hardware: Dict[str, Any] = {"gpu": torch.cuda.get_device_name(device)}
    else:  # the flags as the candidates and kernels see them (HVD_INFER_CPU_* overrides included)
        hardware = {**cpu_facts(), "native_bf16": cpu_has_native_bf16(), "vnni": cpu_has_vnni(),
                    "onednn": onednn.available()}
    return {"model": model_digest(resolve_model_path(m.path, cfg.mlflow.tracking_uri)), "task": m.task,
            "task_settings": dataclasses.asdict(getattr(cfg, section)) if section else {},
            "settings": {k: v for k, v in dataclasses.asdict(m).items() if k not in NOT_DECIDING},
            "batches": {"batch_size": d.batch_size, "max_tokens_per_batch": d.max_tokens_per_batch,
                        "pad_to_multiple_of": d.pad_to_multiple_of, "text_pairs": bool(d.text_pair_column)},
            "candidates": [p.name for p in candidates(cfg, device)], "device": hardware,
            "threads": ctx.threads, "ranks_on_host": ctx.local_size, "versions": _versions()}


def _versions() -> Dict[str, str]:
    import importlib.util

    import transformers

    from hvd_infer.version import __version__

    found = {"torch": torch.__version__, "transformers": transformers.__version__, "hvd_infer": __version__}
    if importlib.util.find_spec("onnxruntime"):
        import onnxruntime

        found["onnxruntime"] = onnxruntime.__version__
    return found


def decision_key(identity: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:24]


def decisions_dir() -> str:
    """Where the host keeps auto-check's decisions: beside its ONNX graphs."""
    from hvd_infer.engines import cache_root

    return os.path.join(cache_root(), "decisions")


# What of a Decision is kept: the earlier check's figures, which the reusing job's summary and MLflow params show.
KEPT = ("rows", "seconds", "scored", "agreement", "rejected", "outrun", "load_seconds", "widened", "check_seconds")


def keep_decision(identity: Dict[str, Any], decision: Decision) -> None:
    """Write the decision measured for `identity` to decisions_dir() atomically (temp file, then rename); a
    cache that cannot be written only costs the next job a check."""
    folder = decisions_dir()
    record = {"precision": decision.choice.token, "checked": time.strftime("%Y-%m-%d %H:%M"),
              **{name: getattr(decision, name) for name in KEPT}, "identity": identity}
    tmp = ""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1, default=str)
        os.replace(tmp, os.path.join(folder, decision_key(identity) + ".json"))
    except OSError as e:
        log.warning("model.dtype=auto-check: could not keep the check's decision in %s (%s); the next job on this "
                    "host checks again", folder, e)
        if tmp and os.path.exists(tmp):
            os.remove(tmp)


def earlier_decision(identity: Dict[str, Any], threshold: float) -> Optional[Decision]:
    """The Decision kept for `identity` by an earlier job on this host, its `how` saying so; None where there is
    none, or where the file cannot be read back (a warning: this job checks again and writes it anew)."""
    path = os.path.join(decisions_dir(), decision_key(identity) + ".json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
        decision = Decision(choice=parse_precision(record["precision"]),
                            how=f"reused: the check of {record['checked']} on this host for this model",
                            **{name: record[name] for name in KEPT})
        decision.facts(threshold)  # figures of the wrong shape fail here, not in the job's summary
        return decision
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ConfigError) as e:
        log.warning("model.dtype=auto-check: ignoring the unreadable decision %s (%s: %s); checking again",
                    path, type(e).__name__, e)
        return None


def measure(cfg: JobConfig, task, device: torch.device, inp, rows: int) -> Tuple[Decision, Any]:
    """Score the input's first `rows` rows in float32 and each candidate; the fastest that agrees wins. Returns the
    decision and, where the choice runs in torch, the (model, tokenizer, facts) load_model gave it, for rank 0 to
    keep (an ONNX Runtime session keeps the threads it was made with: the check's, all the host's cores).

    Rows are scored CHUNK_ROWS at a time by every precision still in the running. After each chunk the
    agreement a candidate can still reach over the whole sample is bounded exactly: at best every remaining
    row agrees, at worst none does. A candidate whose best case is below model.check_agreement is rejected
    (and its model freed). One slower than float32 or than another candidate that agrees at least as well so far
    pauses (outrun: it could only be chosen if that one failed later); should that one be rejected later, it
    resumes and first scores the chunks it missed. (It used to stay stopped: on the 12-class bench, bfloat16,
    agreeing on every row, paused behind ONNX Runtime's int8, which was rejected on the next chunk, and the job
    ran float32.) A candidate is faster than float32 only by MIN_SPEEDUP or more; one that is not pauses behind
    float32. The check stops once the fastest candidate, faster than float32 so far, has a worst case
    already at or above it. Every precision running has scored the same rows, so their seconds compare fairly,
    and the one chosen has scored them all.
    """
    from hvd_infer.dataset import read_head
    from hvd_infer.model import RescoringPredictor, load_model

    t0 = time.perf_counter()
    d = cfg.data
    threshold = cfg.model.check_agreement
    columns = [d.text_column] + ([d.text_pair_column] if d.text_pair_column else [])
    sample = read_head(inp, columns, rows)
    # Null and empty texts are left out of the sample, whatever data.on_null does with them.
    for column in columns:
        text = sample.column(column)
        if pa.types.is_dictionary(text.type):
            text = text.cast(text.type.value_type)
        sample = sample.filter(pc.and_kleene(pc.is_valid(text), pc.not_equal(pc.utf8_trim_whitespace(text), "")))
    n = sample.num_rows
    decision = Decision(rows=n)
    if not n:
        decision.check_seconds = time.perf_counter() - t0
        return decision, None

    loads: Dict[str, Tuple[Any, Any, Dict[str, Any]]] = {}

    def load(precision: Precision):
        t = time.perf_counter()
        loads[precision.name] = load_model(precision.config(cfg), task, device)
        decision.load_seconds[precision.name] = time.perf_counter() - t
        return loads[precision.name][0]

    precisions = {p.name: p for p in [FLOAT32, *candidates(cfg, device)]}
    models = {name: load(p) for name, p in precisions.items()}  # float32's task.setup gives encode its tokenizer
    texts = sample.column(d.text_column).to_pylist()
    pairs = sample.column(d.text_pair_column).to_pylist() if d.text_pair_column else None
    sums: Dict[str, float] = {}  # per candidate: the per-row agreements added up
    seen: List[Tuple[Any, Any, Any, Dict[str, pa.Array], int]] = []  # per chunk: its batches and float32's outputs
    upto: Dict[str, int] = {}  # per precision: the chunks it has scored
    paused: Dict[str, Any] = {}  # outrun candidates' models: resumed if the candidate that outran them is rejected

    def catch_up(name: str) -> Dict[str, pa.Array]:
        """Score `name` on every chunk it has not scored yet; its outputs on the last."""
        for k in range(upto.get(name, 0), len(seen)):
            batches, order, window_row, reference, size = seen[k]
            seconds, out = _score(task, models[name], batches, order, window_row, name not in decision.seconds)
            decision.seconds[name] = decision.seconds.get(name, 0.0) + seconds
            decision.scored[name] = decision.scored.get(name, 0) + size
            if name != "float32":
                sums[name] = sums.get(name, 0.0) + float(row_agreement(reference, out).sum())
                decision.agreement[name] = sums[name] / decision.scored[name]
        upto[name] = len(seen)
        return out

    def faster_than_float32(name: str) -> bool:
        return decision.seconds[name] * MIN_SPEEDUP <= decision.seconds["float32"]

    chunks, rows_per_batch = _dealt_chunks(cfg, task, models["float32"], device, texts, pairs)
    for number, chunk in enumerate(chunks):
        chunk_texts, chunk_pairs = [texts[i] for i in chunk], [pairs[i] for i in chunk] if pairs else None
        batches, order, window_row = _chunk_batches(cfg, task, models["float32"], device, chunk_texts, chunk_pairs,
                                                    rows_per_batch)
        seen.append((batches, order, window_row, {}, len(chunk)))
        outputs = {"float32": catch_up("float32")}
        seen[-1][3].update(outputs["float32"])  # the reference the candidates are compared with
        for name in [name for name in models if name != "float32"]:
            outputs[name] = catch_up(name)
        for base, name in RESCORED.items() if number == 0 else ():
            margin = _rescore_margin(cfg, outputs, base)
            if margin and not _dominated(decision, base):
                # it changed labels: its rescoring joins, both its models loaded and warm already
                rescore = dataclasses.replace(PRECISIONS[name], rescore=margin)
                precisions[rescore.name] = rescore
                models[rescore.name] = RescoringPredictor(models[base], models["float32"], margin)
                outputs[rescore.name] = catch_up(rescore.name)
        for name in [name for name in RESCORED.values() if name in models and number > 0]:
            # A label the rescoring left to int8 changed: the margin was too narrow for this sample. It widens to
            # RESCORE_SAFETY x that row's gap, and the candidate scores every chunk again with it.
            margin = _rescore_margin(cfg, {"float32": outputs["float32"], name: outputs[name]}, name)
            if margin > precisions[name].rescore and decision.widened.get(name, 0) < MAX_WIDENINGS:
                precisions[name] = dataclasses.replace(precisions[name], rescore=margin)
                models[name].margin = margin
                decision.widened[name] = decision.widened.get(name, 0) + 1
                for record in (decision.seconds, decision.scored, decision.agreement, sums, upto):
                    record.pop(name, None)
                outputs[name] = catch_up(name)
        done = decision.scored["float32"]
        worst_row = -1.0 if "embedding" in outputs["float32"] else 0.0  # cosine can be -1; a label match 0
        resumed = True
        while resumed:
            resumed = False
            for name in [name for name in models if name != "float32"]:
                if agreement_bounds(sums[name], done, n, worst_row)[1] < threshold:
                    decision.rejected.append(name)
                    del models[name]
                    loads.pop(name, None)
                    # Those it outran run again, from the rows they missed: it can no longer be chosen instead.
                    for other in [o for o, by in decision.outrun.items() if by == name and o in paused]:
                        del decision.outrun[other]
                        models[other] = paused.pop(other)
                        catch_up(other)
                        resumed = True
        live = [name for name in models if name != "float32"]
        # A candidate slower than another that agrees at least as well so far, or not MIN_SPEEDUP times as fast
        # as float32, pauses: should the faster one fall short later, it resumes; whatever is chosen has scored
        # every row.
        agreed = dict(sums, float32=float(done))  # float32 agrees with itself on every row
        for name in live:
            better = [o for o in live if o != name and o not in decision.outrun
                      and decision.seconds[o] < decision.seconds[name] and agreed[o] >= agreed[name]]
            if not faster_than_float32(name):
                better.append("float32")
            if better:
                decision.outrun[name] = min(better, key=lambda o: decision.seconds[o])
                paused[name] = models.pop(name)
        live = [name for name in models if name != "float32"]
        if not live:
            break
        fastest = min(live, key=lambda name: decision.seconds[name])
        if faster_than_float32(fastest) and agreement_bounds(sums[fastest], done, n, worst_row)[0] >= threshold:
            break
    agreeing = [name for name in models if name != "float32" and decision.agreement[name] >= threshold
                and faster_than_float32(name)]
    fastest = min(["float32"] + agreeing, key=lambda name: decision.seconds[name])
    decision.choice = precisions[fastest]
    decision.check_seconds = time.perf_counter() - t0
    return decision, loads.get(fastest) if decision.choice.runtime == "eager" else None


def _dominated(decision: Decision, base: str) -> bool:
    """Is another int8 precision both faster than `base` and as close to float32 on the first chunk? Then its
    rescoring, not base's, is worth a try. (On the 12-class bench ONNX Runtime's int8 took half torch's seconds
    with the same agreement; torch's rescoring cost the check 0.56 s and was outrun.)"""
    return any(other != base and other in decision.seconds and decision.seconds[other] < decision.seconds[base]
               and decision.agreement[other] >= decision.agreement[base] for other in RESCORED)


def _rescore_margin(cfg: JobConfig, outputs: Dict[str, Dict[str, pa.Array]], base: str) -> float:
    """The margin of `base` (an int8 precision) rescored, from the first chunk (text-classification, rows
    truncated): RESCORE_SAFETY x the widest gap `base` put between the two likeliest labels of a row whose label
    it changed; 0 where it changed none (or is not a candidate)."""
    if cfg.model.task != "text-classification" or cfg.model.long_texts != "truncate" or base not in outputs:
        return 0.0
    changed = row_agreement(outputs["float32"], outputs[base]) < 1
    if not changed.any():
        return 0.0
    probs = np.sort(np.stack(outputs[base]["probs"].to_numpy(zero_copy_only=False)[changed]), axis=1)
    return float(min(1.0, RESCORE_SAFETY * (probs[:, -1] - probs[:, -2]).max()))


def agreement_bounds(agreed: float, scored: int, rows: int, worst_row: float) -> Tuple[float, float]:
    """(worst, best) agreement over all `rows` for a candidate whose first `scored` rows add up to `agreed`:
    every remaining row at worst_row (0, or -1 for a cosine), or every one agreeing fully."""
    return (agreed + worst_row * (rows - scored)) / rows, (agreed + rows - scored) / rows


def _dealt_chunks(cfg: JobConfig, task, model, device, texts, pairs) -> Tuple[List[np.ndarray], int]:
    """The sample's rows (indices) in chunks of about CHUNK_ROWS, each batched as tightly as the job batches;
    and the rows per batch for the sample (on CPU, _sample_rows_per_batch).

    The rows are sorted by length and cut into batches as the job's batcher cuts a sort window, and the batches
    are dealt round-robin to the chunks, so each chunk holds long and short rows alike and its length-sorted
    batches are those. Chunks of rows in input order each padded a whole batch to their one long row: on the demo
    corpus float32 took 4.6 s on 200 rows in chunks of 64, against 2.4 s batched as the job batches them."""
    enc = task.encode(texts, pairs)
    lengths = (enc.lengths if enc.window_row is None  # model.long_texts=chunk: a row's length, all its windows
               else np.bincount(enc.window_row, weights=enc.lengths, minlength=len(texts)))
    rows_per_batch = _batch_limits(cfg, task, model, device)[0]
    if device.type == "cpu":  # measured there; a GPU's batches stay the job's (sampling is unmeasured on a GPU)
        rows_per_batch = _sample_rows_per_batch(lengths, rows_per_batch)
    order = np.argsort(-lengths, kind="stable")
    batches = [order[i:i + rows_per_batch] for i in range(0, len(order), rows_per_batch)]
    chunks = max(1, min(-(-len(texts) // CHUNK_ROWS), len(batches)))
    return [np.concatenate(batches[c::chunks]) for c in range(chunks)], rows_per_batch


def _sample_rows_per_batch(lengths: np.ndarray, rows_per_batch: int) -> int:
    """The job's rows per batch, halved while that pads the sample's batches at least SAMPLE_PADDING_STEP less,
    down to SAMPLE_BATCH_ROWS.

    The job sorts data.sort_window rows by length before cutting them into batches, so its batches are tight
    (1.5% of the demo's tokens were padding); a sample of a hundred rows cut into the same batches is not: 38% of
    its tokens were padding, and float32 took 2.36 s on the demo's first 100 rows in batches of 32, 1.33 s in
    batches of 16, 1.31 s in batches of 8. Every precision is timed on the same batches, so they still compare."""
    longest_first = np.sort(np.asarray(lengths, dtype=np.float64))[::-1]

    def padded(rows: int) -> float:
        return float(sum(longest_first[i] * len(longest_first[i:i + rows]) for i in range(0, len(longest_first), rows)))

    while (rows_per_batch // 2 >= SAMPLE_BATCH_ROWS
           and padded(rows_per_batch // 2) <= (1 - SAMPLE_PADDING_STEP) * padded(rows_per_batch)):
        rows_per_batch //= 2
    return rows_per_batch


def _chunk_batches(cfg: JobConfig, task, model, device, texts, pairs, rows_per_batch: int = 0):
    """One chunk of the sample as the job would batch it: length-sorted batches, and how windows map to rows;
    rows_per_batch: the sample's (_dealt_chunks), else the job's."""
    from hvd_infer.batcher import length_sorted_batches

    enc = task.encode(texts, pairs)
    job_rows, max_tokens = _batch_limits(cfg, task, model, device)
    order = length_sorted_batches(enc.lengths, rows_per_batch or job_rows, max_tokens, cfg.data.sort_window)
    return [task.collate(enc.features[rows]) for rows in order], order, enc.window_row


def _batch_limits(cfg: JobConfig, task, model, device) -> Tuple[int, int]:
    """The job's (rows per batch, token budget) for the float32 model (batcher.batch_limits)."""
    from hvd_infer.batcher import batch_limits

    return batch_limits(cfg.data, cfg.model.task, model.config, device, task.max_length,
                        next(model.module.parameters()).element_size())


def _score(task, model, batches, order, window_row, warm_up: bool) -> Tuple[float, Dict[str, pa.Array]]:
    """Seconds to predict every batch; a model's first chunk starts with an untimed warm-up batch (kernel set-up):
    the shortest, as the set-up is the same whatever the batch."""
    if warm_up:
        task.predict(model, batches[-1])
    t = time.perf_counter()
    outputs = [task.predict(model, b) for b in batches]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    if window_row is not None:  # long_texts=chunk: rows assembled from their windows, compared as rows
        from hvd_infer.batcher import rows_from_windows

        outputs = [rows_from_windows(task, outputs, order, window_row)]
    columns = {name: pa.concat_arrays([_as_arrow(o[name]) for o in outputs]) for name in outputs[0]}
    return seconds, columns


def _as_arrow(values) -> pa.Array:
    return values if isinstance(values, pa.Array) else pa.array(values)


def agreement(reference: Dict[str, pa.Array], candidate: Dict[str, pa.Array]) -> float:
    """How far a candidate's predictions agree with float32's, rows in the same order (see the module doc)."""
    return float(row_agreement(reference, candidate).mean())


def row_agreement(reference: Dict[str, pa.Array], candidate: Dict[str, pa.Array]) -> np.ndarray:
    """Each row's agreement: 1.0 or 0.0 (same label, spans, text), or the cosine of the embeddings."""
    if "embedding" in reference:
        a = np.stack(reference["embedding"].to_numpy(zero_copy_only=False)).astype(np.float64)
        b = np.stack(candidate["embedding"].to_numpy(zero_copy_only=False)).astype(np.float64)
        return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    if "entities" in reference:
        spans = [[[(e["entity_group"], e["start"], e["end"]) for e in row] for row in out["entities"].to_pylist()]
                 for out in (reference, candidate)]
        return np.array([x == y for x, y in zip(*spans)], dtype=np.float64)
    column = "label" if "label" in reference else "generated_text"
    return np.array([x == y for x, y in zip(reference[column].to_pylist(), candidate[column].to_pylist())],
                    dtype=np.float64)
