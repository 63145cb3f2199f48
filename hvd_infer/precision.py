"""model.dtype=auto-check: the precision this job runs in, chosen by measuring it on the job's own rows.

    model, tokenizer, facts = load_checked_model(cfg, task, ctx, inp)   # instead of load_model

Rank 0 scores the input's first rows (sample_rows) in float32 and in each candidate engine spec that can beat it
here (candidates), and picks the fastest whose agreement with float32 (agreement.py) is at least
model.check_agreement, stopping as soon as the verdict is decided (measure); every rank loads the choice. A job too
small for the check to pay runs float32 (skip_reason); a resume keeps its output's precision; a decision is kept
and reused per host, model and settings (decisions.py).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Dict, List, Tuple

import pyarrow as pa
import torch

from hvd_infer.agreement import (CHUNK_ROWS, agreement_bounds, chunk_batches, dealt_chunks, read_sample,
                                 rescore_margin, row_agreement)
from hvd_infer.agreement import score as _score
from hvd_infer.config import JobConfig
from hvd_infer.decisions import (MIN_SPEEDUP, RESCORED, Decision, check_identity, earlier_decision, keep_decision,
                                 parse_precision, spec_of)
from hvd_infer.engines import EngineSpec, unavailable
from hvd_infer.engines.onednn import available as onednn_available
from hvd_infer.engines.rescoring import RescoringPredictor
from hvd_infer.hardware import this_platform
from hvd_infer.model import import_model_code, load_model, resolve_model_path

# A label a rescoring left to int8 on a later chunk widens its margin, at most this many times per check.
MAX_WIDENINGS = 2
# The check's sample is at most a rank's rows / (PAYBACK x the precisions): under a tenth of a rank's float32 time.
PAYBACK = 10
# The tasks int8-blockwise is tried for: those no rescoring serves, where it kept about ten times fewer outputs
# changed than per-channel int8 (docs/speed.md).
BLOCKWISE_TASKS = ("embedding", "token-classification", "zero-shot-classification")


def candidates(cfg: JobConfig, device: torch.device) -> List[EngineSpec]:
    """The precisions that can beat float32 on this device; those it would emulate slowly are left out. On CUDA
    float16 (and bfloat16 where supported); on a CPU bfloat16 where native, per-channel int8 in torch, and in ONNX
    Runtime where it is installed (not for text-generation), with its int8-blockwise where blockwise_pays. ONNX
    Runtime's float32 is no candidate: it seldom gains what its check costs (docs/speed.md)."""
    platform = this_platform(device.type)
    if device.type == "cuda":
        names = ["float16"] + (["bfloat16"] if platform.gpu_bf16 else [])
    else:
        names = (["bfloat16"] if platform.native_bf16 else []) + ["int8-per-channel"]
        if cfg.model.task != "text-generation":
            names += ["onnxruntime-int8-per-channel"] + (["onnxruntime-int8-blockwise"] if blockwise_pays(cfg) else [])
    specs = [spec_of(cfg, platform, name) for name in names]
    return [spec for spec in specs if not unavailable(spec, platform)]


def blockwise_pays(cfg: JobConfig) -> bool:
    """For BLOCKWISE_TASKS where float32 runs on torch's Linear (not oneDNN's: docs/speed.md)."""
    return cfg.model.task in BLOCKWISE_TASKS and not (cfg.model.onednn and not onednn_available())


def sample_rows(cfg: JobConfig, device: torch.device, total_rows: int, world_size: int) -> int:
    """Rows the check scores per precision: model.check_rows, or fewer on a smaller job (PAYBACK)."""
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


def load_checked_model(cfg: JobConfig, task, ctx, inp, resumed: str = "") -> Tuple[Any, Any, Dict[str, Any]]:
    """load_model, with model.dtype=auto-check settled first: rank 0 decides (decide), every rank loads its choice.

    resumed: the precision the run that wrote output.path chose (output.mode=resume); it is kept, unmeasured.
    Rank 0 records the choice in the output's job file before any row is written, so a resume keeps it.
    Every rank runs the same collectives whether rank 0's check succeeds or fails.
    """
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
            decision, loaded = decide(cfg, task, ctx, inp, resumed)
            record_precision(cfg, decision.choice.token)
        except Exception as e:
            error = e
    ctx.agree(error)
    decision = ctx.broadcast_object(decision)
    if loaded is not None:  # rank 0 keeps the model it checked (task.setup again: the last one loaded set it up)
        model, tokenizer, facts = loaded
        task.setup(model.module, tokenizer)
    else:
        model, tokenizer, facts = load_model(cfg, task, ctx.device, decision.choice)
    check = decision.facts(cfg.model.check_agreement)
    facts.update(check, notes=facts.get("notes", []) + check["notes"])
    return model, tokenizer, facts


def decide(cfg: JobConfig, task, ctx, inp, resumed: str) -> Tuple[Decision, Any]:
    """Rank 0's decision: the resumed output's precision, a decision this host kept for the same check, float32
    where the check cannot pay, else measured (and kept); with the model measure loaded for it, if any."""
    platform = this_platform(ctx.device.type)
    float32 = spec_of(cfg, platform, "float32")
    if resumed:
        return Decision(choice=parse_precision(resumed, cfg, platform),
                        how=f"resumed: output.path was scored in {resumed.partition(':')[0]}"), None
    identity = check_identity(cfg, ctx, resolve_model_path(cfg.model.path, cfg.mlflow.tracking_uri),
                              [spec.name for spec in candidates(cfg, ctx.device)])
    reused = earlier_decision(identity, cfg.model.check_agreement)
    if reused:
        return reused, None
    skip = skip_reason(cfg, ctx.device, inp.total_rows, ctx.size)
    if skip:
        return Decision(choice=float32, how=f"skipped: {skip}"), None
    # The host's other ranks only wait meanwhile: the check takes their cores too (every precision is timed with
    # the same threads, so they still compare fairly).
    torch.set_num_threads(ctx.threads * (ctx.local_size if ctx.device.type == "cpu" else 1))
    try:
        decision, loaded = measure(cfg, task, ctx.device, inp, sample_rows(cfg, ctx.device, inp.total_rows, ctx.size))
    finally:
        torch.set_num_threads(ctx.threads)
    if decision.rows:
        keep_decision(identity, decision)
    return decision, loaded


def measure(cfg: JobConfig, task, device: torch.device, inp, rows: int) -> Tuple[Decision, Any]:
    """Score the input's first `rows` rows in float32 and each candidate; the fastest that agrees wins. Returns the
    decision and, where the choice runs in torch, the (model, tokenizer, facts) load_model gave it, for rank 0 to
    keep (an ONNX Runtime session keeps the threads it was made with: the check's, all the host's cores).

    Rows are scored CHUNK_ROWS at a time by every precision running. After each chunk the agreement a candidate
    can still reach over the sample is bounded exactly (agreement_bounds): one whose best case is below
    model.check_agreement is rejected; one not MIN_SPEEDUP times as fast as float32, or slower than another that
    agrees at least as well so far, pauses, and resumes from the rows it missed should that one be rejected. The
    check stops once the fastest candidate, faster than float32, has a worst case at or above the threshold.
    """
    t0 = time.perf_counter()
    texts, pairs = read_sample(cfg, inp, rows)
    float32 = spec_of(cfg, this_platform(device.type), "float32")
    check = _Check(cfg, task, device, Decision(choice=float32, rows=len(texts)))
    if texts:
        for spec in [float32, *candidates(cfg, device)]:
            check.load(spec)
        chunks, rows_per_batch = dealt_chunks(cfg, task, check.models["float32"], device, texts, pairs)
        for number, chunk in enumerate(chunks):
            if check.score_chunk(number, [texts[i] for i in chunk], [pairs[i] for i in chunk] if pairs else None,
                                 rows_per_batch):
                break
        check.decision.choice = check.specs[check.choose()]
    decision = check.decision
    decision.check_seconds = time.perf_counter() - t0
    return decision, check.loads.get(decision.choice.name) if decision.choice.engine == "eager" else None


class _Check:
    """One measure: the precisions in the running, their models, and what each has scored."""

    def __init__(self, cfg: JobConfig, task, device: torch.device, decision: Decision):
        self.cfg, self.task, self.device, self.decision = cfg, task, device, decision
        self.threshold = cfg.model.check_agreement
        self.specs: Dict[str, EngineSpec] = {}
        self.models: Dict[str, Any] = {}  # the precisions running
        self.loads: Dict[str, Tuple[Any, Any, Dict[str, Any]]] = {}  # what load_model gave each
        self.paused: Dict[str, Any] = {}  # outrun candidates' models: resumed if what outran them is rejected
        self.sums: Dict[str, float] = {}  # per candidate: the per-row agreements added up
        self.seen: List[Tuple[Any, Any, Any, Dict[str, pa.Array], int]] = []  # per chunk: batches, float32's outputs
        self.upto: Dict[str, int] = {}  # per precision: the chunks it has scored

    def load(self, spec: EngineSpec) -> None:
        t = time.perf_counter()
        self.loads[spec.name] = load_model(self.cfg, self.task, self.device, spec)
        self.decision.load_seconds[spec.name] = time.perf_counter() - t
        self.specs[spec.name], self.models[spec.name] = spec, self.loads[spec.name][0]

    def catch_up(self, name: str) -> Dict[str, pa.Array]:
        """Score `name` on every chunk it has not scored yet; its outputs on the last."""
        d = self.decision
        for k in range(self.upto.get(name, 0), len(self.seen)):
            batches, order, window_row, reference, size = self.seen[k]
            seconds, out = _score(self.task, self.models[name], batches, order, window_row, name not in d.seconds)
            d.seconds[name] = d.seconds.get(name, 0.0) + seconds
            d.scored[name] = d.scored.get(name, 0) + size
            if name != "float32":
                self.sums[name] = self.sums.get(name, 0.0) + float(row_agreement(reference, out).sum())
                d.agreement[name] = self.sums[name] / d.scored[name]
        self.upto[name] = len(self.seen)
        return out

    def faster_than_float32(self, name: str) -> bool:
        return self.decision.seconds[name] * MIN_SPEEDUP <= self.decision.seconds["float32"]

    def running(self) -> List[str]:
        return [name for name in self.models if name != "float32"]

    def score_chunk(self, number: int, texts, pairs, rows_per_batch: int) -> bool:
        """Score one chunk in every precision running and weigh them; True once the verdict is decided."""
        self.seen.append((*chunk_batches(self.cfg, self.task, self.models["float32"], self.device, texts, pairs,
                                         rows_per_batch), {}, len(texts)))
        outputs = {"float32": self.catch_up("float32")}
        self.seen[-1][3].update(outputs["float32"])  # the reference the candidates are compared with
        outputs.update((name, self.catch_up(name)) for name in self.running())
        if number == 0:
            self.add_rescorings(outputs)
        else:
            self.widen_rescorings(outputs)
        worst_row = -1.0 if "embedding" in outputs["float32"] else 0.0  # cosine can be -1; a label match 0
        self.reject(worst_row)
        self.pause_outrun()
        live = self.running()
        if not live:
            return True
        fastest = min(live, key=lambda name: self.decision.seconds[name])
        done = self.decision.scored["float32"]
        return (self.faster_than_float32(fastest)
                and agreement_bounds(self.sums[fastest], done, self.decision.rows, worst_row)[0] >= self.threshold)

    def add_rescorings(self, outputs: Dict[str, Dict[str, pa.Array]]) -> None:
        """Each int8 that changed labels of the first chunk (and that no other int8 outdoes) joins rescored, its
        models loaded and warm already, its margin from the rows it changed."""
        for base, name in RESCORED.items():
            margin = rescore_margin(self.cfg, outputs, base)
            if margin and not _dominated(self.decision, base):
                self.specs[name] = dataclasses.replace(self.specs[base], rescore=margin)
                self.models[name] = RescoringPredictor(self.models[base], self.models["float32"], margin)
                outputs[name] = self.catch_up(name)

    def widen_rescorings(self, outputs: Dict[str, Dict[str, pa.Array]]) -> None:
        """A label a rescoring left to int8 changed on a later chunk: its margin was too narrow for this sample. It
        widens (rescore_margin of that chunk), and the candidate scores every chunk again with it."""
        d = self.decision
        for name in [name for name in RESCORED.values() if name in self.models]:
            margin = rescore_margin(self.cfg, {"float32": outputs["float32"], name: outputs[name]}, name)
            if margin > self.specs[name].rescore and d.widened.get(name, 0) < MAX_WIDENINGS:
                self.specs[name] = dataclasses.replace(self.specs[name], rescore=margin)
                self.models[name].margin = margin
                d.widened[name] = d.widened.get(name, 0) + 1
                for record in (d.seconds, d.scored, d.agreement, self.sums, self.upto):
                    record.pop(name, None)
                outputs[name] = self.catch_up(name)

    def reject(self, worst_row: float) -> None:
        """Drop each candidate that cannot reach the threshold whatever the other rows; those it outran resume."""
        d, done = self.decision, self.decision.scored["float32"]
        rejected = True
        while rejected:
            rejected = False
            for name in self.running():
                if agreement_bounds(self.sums[name], done, d.rows, worst_row)[1] < self.threshold:
                    d.rejected.append(name)
                    del self.models[name]
                    self.loads.pop(name, None)
                    for other in [o for o, by in d.outrun.items() if by == name and o in self.paused]:
                        del d.outrun[other]
                        self.models[other] = self.paused.pop(other)
                        self.catch_up(other)
                        rejected = True

    def pause_outrun(self) -> None:
        """Pause each candidate slower than another that agrees at least as well so far, or not MIN_SPEEDUP times
        as fast as float32."""
        d, live = self.decision, self.running()
        agreed = dict(self.sums, float32=float(d.scored["float32"]))  # float32 agrees with itself on every row
        for name in live:
            better = [o for o in live if o != name and o not in d.outrun
                      and d.seconds[o] < d.seconds[name] and agreed[o] >= agreed[name]]
            if not self.faster_than_float32(name):
                better.append("float32")
            if better:
                d.outrun[name] = min(better, key=lambda o: d.seconds[o])
                self.paused[name] = self.models.pop(name)

    def choose(self) -> str:
        agreeing = [name for name in self.running() if self.decision.agreement[name] >= self.threshold
                    and self.faster_than_float32(name)]
        return min(["float32"] + agreeing, key=lambda name: self.decision.seconds[name])


def _dominated(decision: Decision, base: str) -> bool:
    """Is another int8 precision both faster than `base` and as close to float32 on the first chunk? Then its
    rescoring, not base's, is worth a try."""
    return any(other != base and other in decision.seconds and decision.seconds[other] < decision.seconds[base]
               and decision.agreement[other] >= decision.agreement[base] for other in RESCORED)

