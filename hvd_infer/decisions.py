"""What model.dtype=auto-check can choose (PRECISIONS), what it chose as the job summary and MLflow show it
(Decision), and the host's store of decisions.

A decision measured is kept on the host beside its ONNX graphs ($TMPDIR/hvd_infer-onnx/decisions/<key>.json),
keyed by what decided it (check_identity): the next job on the same host, model and settings reuses it.
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
from typing import Any, Dict, List, Optional, Sequence

import torch

from hvd_infer import version
from hvd_infer.config import JobConfig
from hvd_infer.engines import EngineSpec, with_precision
from hvd_infer.engines.onednn import available as onednn_available
from hvd_infer.engines.ort import cache_root, model_digest
from hvd_infer.errors import ConfigError
from hvd_infer.hardware import Platform, cpu_facts, native_bf16, onnxruntime_version, vnni

log = logging.getLogger("hvd_infer")

# A candidate counts as faster than float32 only where float32 takes at least this many times its seconds on the
# same rows: a near tie is timing noise on a hundred rows, and not worth a label changed (docs/speed.md).
MIN_SPEEDUP = 1.1


# auto-check's precisions: name -> (dtype, quantize, engine). Each int8 that changes labels of the first chunk is
# tried rescored too (RESCORED), under the name the spec gives it (int8-rescore, onnxruntime-int8-rescore).
PRECISIONS = {"float32": ("float32", "none", "eager"), "float16": ("float16", "none", "eager"),
              "bfloat16": ("bfloat16", "none", "eager"),
              "int8-per-channel": ("float32", "int8-per-channel", "eager"),
              "onnxruntime-int8-per-channel": ("float32", "int8-per-channel", "onnxruntime"),
              "onnxruntime-int8-blockwise": ("float32", "int8-blockwise", "onnxruntime")}
RESCORED = {"int8-per-channel": "int8-rescore", "onnxruntime-int8-per-channel": "onnxruntime-int8-rescore"}
_RESCORED_FROM = {rescored: base for base, rescored in RESCORED.items()}


def spec_of(cfg: JobConfig, platform: Platform, name: str, rescore: float = 0.0) -> EngineSpec:
    base = _RESCORED_FROM.get(name, name)
    return with_precision(cfg.model, platform, *PRECISIONS[base], rescore=rescore)


def parse_precision(token: str, cfg: JobConfig, platform: Platform) -> EngineSpec:
    """The spec a precision's token names (EngineSpec.token: the output's job file records it)."""
    name, _, rescore = token.partition("@")
    if name not in PRECISIONS and name not in _RESCORED_FROM:  # recorded by an earlier version
        raise ConfigError(f"output.path's rows were scored in {name.partition(':')[0]}, which hvd_infer no longer "
                          "runs: resume it with the version that started it, or rerun with output.mode=overwrite")
    return spec_of(cfg, platform, name, float(rescore) if rescore else 0.0)


@dataclass
class Decision:
    choice: EngineSpec
    rows: int = 0  # the sample: the bounds are on the agreement over this many rows
    seconds: Dict[str, float] = field(default_factory=dict)  # forward time over the rows scored, per precision
    scored: Dict[str, int] = field(default_factory=dict)  # rows scored, per precision
    agreement: Dict[str, float] = field(default_factory=dict)  # with float32 over the rows scored, per candidate
    rejected: List[str] = field(default_factory=list)  # stopped early: even all remaining rows agreeing fall short
    # stopped early: slower than this other and no closer (float32: not MIN_SPEEDUP times as fast as it)
    outrun: Dict[str, str] = field(default_factory=dict)
    load_seconds: Dict[str, float] = field(default_factory=dict)  # loading (ONNX Runtime: exporting) each
    widened: Dict[str, int] = field(default_factory=dict)  # rescorings whose margin widened
    check_seconds: float = 0.0  # the whole check: reading, loading each precision, scoring
    how: str = "measured"  # or why it was not: "skipped: ...", "resumed: ...", "reused: ..."

    def facts(self, threshold: float) -> Dict[str, Any]:
        """The summary's line and MLflow's params (resolved.precision_*)."""
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
        for name, seconds in self.seconds.items():
            facts[f"precision_{name}_seconds"] = round(seconds, 3)
            facts[f"precision_{name}_rows"] = self.scored[name]
            if name in self.agreement:
                facts[f"precision_{name}_agreement"] = round(self.agreement[name], 5)
        head = (f"model.dtype=auto-check on {self.rows} rows chose {self.choice.name} (check took "
                f"{self.check_seconds:.1f} s, {loading:.1f} s of it loading)" if measured else
                f"model.dtype=auto-check {self.how}, which on {self.rows} rows chose {self.choice.name} (it took "
                f"{self.check_seconds:.1f} s then, {loading:.1f} s of it loading; this job paid nothing for it)")
        parts = [self._part(name, threshold) for name in self.seconds]
        facts["notes"] = [head + ": " + "; ".join(parts or ["no rows to score"]) + kept]
        return facts

    def _part(self, name: str, threshold: float) -> str:
        seconds, rows = self.seconds[name], self.scored[name]
        on = f" on {rows} rows" if rows < self.rows else ""
        if name not in self.agreement:
            return f"{name} {seconds:.2f} s{on}"
        ok = (f", rejected: < {threshold} whatever the other rows" if name in self.rejected
              else f", stopped: not {MIN_SPEEDUP:g}x as fast as float32" if self.outrun.get(name) == "float32"
              else f", stopped: slower than {self.outrun[name]} and no closer" if name in self.outrun
              else "" if self.agreement[name] >= threshold else f" < {threshold}")
        widened = f", its margin widened {self.widened[name]}x" if name in self.widened else ""
        return f"{name} {seconds:.2f} s{on} (agreement {self.agreement[name]:.4f}{widened}{ok})"


# Which section of the config holds the task's own settings, all of which change its outputs.
TASK_SECTIONS = {"zero-shot-classification": "zero_shot", "text-generation": "generation",
                 "token-classification": "token_classification", "embedding": "embedding"}
# The model section's keys that leave a check's decision as it is: the model is keyed by its content, and
# auto-check sets the precision's own keys itself.
NOT_DECIDING = ("path", "dtype", "quantize", "runtime", "rescore_margin", "allow_pickle")
# Bump when what a kept decision records changes: decisions kept in another form are then not read.
FORMAT = 2
# What of a Decision is kept: the earlier check's figures, which the reusing job's summary and MLflow params show.
KEPT = ("rows", "seconds", "scored", "agreement", "rejected", "outrun", "load_seconds", "widened", "check_seconds")


def check_identity(cfg: JobConfig, ctx, model_dir: str, candidates: Sequence[str]) -> Dict[str, Any]:
    """What decides auto-check's choice on this host: the model's content, the task and its settings, the model
    section (check_agreement, check_rows, max_length, long_texts, onednn, ...), the batching, the candidates, the
    device (the CPU's model and flags, or the GPU's name), the threads, and the versions of the libraries that run
    the model. A decision is reused only where all of it is the same."""
    m, d = cfg.model, cfg.data
    section = TASK_SECTIONS.get(m.task)
    if ctx.device.type == "cuda":
        hardware: Dict[str, Any] = {"gpu": torch.cuda.get_device_name(ctx.device)}
    else:  # the flags as the candidates and kernels see them (HVD_INFER_CPU_* overrides included)
        hardware = {**cpu_facts(), "native_bf16": native_bf16(), "vnni": vnni(), "onednn": onednn_available()}
    return {"model": model_digest(model_dir), "task": m.task,
            "task_settings": dataclasses.asdict(getattr(cfg, section)) if section else {},
            "settings": {k: v for k, v in dataclasses.asdict(m).items() if k not in NOT_DECIDING},
            "batches": {"batch_size": d.batch_size, "max_tokens_per_batch": d.max_tokens_per_batch,
                        "pad_to_multiple_of": d.pad_to_multiple_of, "text_pairs": bool(d.text_pair_column)},
            "candidates": list(candidates), "device": hardware,
            "threads": ctx.threads, "ranks_on_host": ctx.local_size, "versions": _versions(), "format": FORMAT}


def _versions() -> Dict[str, str]:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "hvd_infer": version.__version__,
            "onnxruntime": onnxruntime_version()}


def decision_key(identity: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:24]


def decisions_dir() -> str:
    """Where the host keeps auto-check's decisions: beside its ONNX graphs."""
    return os.path.join(cache_root(), "decisions")


def keep_decision(identity: Dict[str, Any], decision: Decision) -> None:
    """Write the decision measured for `identity` to decisions_dir() atomically (temp file, then rename); a
    cache that cannot be written only costs the next job a check."""
    folder = decisions_dir()
    record = {"spec": dataclasses.asdict(decision.choice), "checked": time.strftime("%Y-%m-%d %H:%M"),
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
        decision = Decision(choice=EngineSpec(**record["spec"]),
                            how=f"reused: the check of {record['checked']} on this host for this model",
                            **{name: record[name] for name in KEPT})
        decision.facts(threshold)  # figures of the wrong shape fail here, not in the job's summary
        return decision
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("model.dtype=auto-check: ignoring the unreadable decision %s (%s: %s); checking again",
                    path, type(e).__name__, e)
        return None
