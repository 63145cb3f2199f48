"""model.dtype=auto-check: the precision this job runs in, chosen by measuring it on the job's own rows.

    model, tokenizer, facts = load_checked_model(cfg, task, ctx, inp)   # instead of load_model

Rank 0 reads the first model.check_rows rows of the input and scores them in float32 and in each
faster precision this device runs natively: on CUDA float16, and bfloat16 where the GPU supports
it; on CPU bfloat16 only with AVX512-BF16/AMX (elsewhere it is many times slower than float32), and
dynamic int8 twice, with per-tensor weight scales on every Linear and with per-channel scales and
the task head left in float32. It times each (after one warm-up batch) and picks the fastest whose
agreement with float32 is at least model.check_agreement:

    text-classification, zero-shot   share of rows with the same label
    token-classification             share of rows with the same entity spans (group, start, end)
    text-generation                  share of rows with the same generated text
    embedding                        mean cosine similarity to the float32 vectors

Every rank then loads the chosen precision; the choice, each candidate's seconds and agreement, and
the check's own cost go to the job summary and to MLflow (params resolved.precision_*).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from hvd_infer.config import JobConfig


@dataclass(frozen=True)
class Precision:
    name: str
    dtype: str  # model.dtype
    quantize: str = "none"  # model.quantize

    def config(self, cfg: JobConfig) -> JobConfig:
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype=self.dtype, quantize=self.quantize))


FLOAT32 = Precision("float32", "float32")


def candidates(device: torch.device) -> List[Precision]:
    """The precisions that can beat float32 on this device; those it would emulate slowly are left out."""
    if device.type == "cuda":
        return [Precision("float16", "float16")] + ([Precision("bfloat16", "bfloat16")]
                                                    if torch.cuda.is_bf16_supported() else [])
    from hvd_infer.model import cpu_has_native_bf16

    return ([Precision("bfloat16", "bfloat16")] if cpu_has_native_bf16() else []) + [
        Precision("int8-per-channel", "float32", "int8-per-channel"), Precision("int8", "float32", "int8")]


@dataclass
class Decision:
    choice: Precision = FLOAT32
    rows: int = 0
    seconds: Dict[str, float] = field(default_factory=dict)  # forward time over the sample, per precision
    agreement: Dict[str, float] = field(default_factory=dict)  # with float32, per precision
    check_seconds: float = 0.0  # the whole check: reading, loading each precision, scoring

    def facts(self, threshold: float) -> Dict[str, Any]:
        facts: Dict[str, Any] = {"precision_choice": self.choice.name, "precision_check_rows": self.rows,
                                 "precision_check_seconds": round(self.check_seconds, 2)}
        parts = []
        for name, seconds in self.seconds.items():
            facts[f"precision_{name}_seconds"] = round(seconds, 3)
            if name in self.agreement:
                facts[f"precision_{name}_agreement"] = round(self.agreement[name], 5)
                ok = "" if self.agreement[name] >= threshold else f" < {threshold}"
                parts.append(f"{name} {seconds:.2f} s (agreement {self.agreement[name]:.4f}{ok})")
            else:
                parts.append(f"{name} {seconds:.2f} s")
        facts["notes"] = [f"model.dtype=auto-check on {self.rows} rows chose {self.choice.name} "
                          f"(check took {self.check_seconds:.1f} s): " + "; ".join(parts or ["no rows to score"])]
        return facts


def load_checked_model(cfg: JobConfig, task, ctx, inp) -> Tuple[Any, Any, Dict[str, Any]]:
    """load_model, with model.dtype=auto-check settled first: rank 0 measures, every rank loads its choice.

    Every rank runs the same collectives whether rank 0's check succeeds or fails.
    """
    from hvd_infer.model import load_model

    if cfg.model.dtype != "auto-check":
        return load_model(cfg, task, ctx.device)
    decision, error = None, None
    if ctx.is_main:
        try:
            decision = measure(cfg, task, ctx.device, inp)
        except Exception as e:
            error = e
    ctx.agree(error)
    decision = ctx.broadcast_object(decision)
    model, tokenizer, facts = load_model(decision.choice.config(cfg), task, ctx.device)
    check = decision.facts(cfg.model.check_agreement)
    facts.update(check, notes=facts.get("notes", []) + check["notes"])
    return model, tokenizer, facts


def measure(cfg: JobConfig, task, device: torch.device, inp) -> Decision:
    """Score the input's first model.check_rows rows in float32 and each candidate; the fastest that agrees wins."""
    from hvd_infer.batcher import batch_limits, length_sorted_batches
    from hvd_infer.dataset import read_head
    from hvd_infer.model import load_model

    t0 = time.perf_counter()
    d = cfg.data
    columns = [d.text_column] + ([d.text_pair_column] if d.text_pair_column else [])
    sample = read_head(inp, columns, cfg.model.check_rows)
    # Null and empty texts are left out of the sample, whatever data.on_null does with them.
    for column in columns:
        text = sample.column(column)
        if pa.types.is_dictionary(text.type):
            text = text.cast(text.type.value_type)
        sample = sample.filter(pc.and_kleene(pc.is_valid(text), pc.not_equal(pc.utf8_trim_whitespace(text), "")))
    decision = Decision(rows=sample.num_rows)
    if not sample.num_rows:
        decision.check_seconds = time.perf_counter() - t0
        return decision

    model, _, _ = load_model(FLOAT32.config(cfg), task, device)  # task.setup gives encode its tokenizer
    texts = sample.column(d.text_column).to_pylist()
    pairs = sample.column(d.text_pair_column).to_pylist() if d.text_pair_column else None
    enc = task.encode(texts, pairs)
    rows_per_batch, max_tokens = batch_limits(d, cfg.model.task, model.config, device, task.max_length,
                                              next(model.module.parameters()).element_size())
    order = length_sorted_batches(enc.lengths, rows_per_batch, max_tokens, d.sort_window)
    batches = [task.collate(enc.features[rows]) for rows in order]
    decision.seconds["float32"], reference = _score(task, model, batches, order, enc.window_row)
    best = FLOAT32
    for candidate in candidates(device):
        del model
        model, _, _ = load_model(candidate.config(cfg), task, device)
        seconds, outputs = _score(task, model, batches, order, enc.window_row)
        decision.seconds[candidate.name] = seconds
        decision.agreement[candidate.name] = agreement(reference, outputs)
        if decision.agreement[candidate.name] >= cfg.model.check_agreement and seconds < decision.seconds[best.name]:
            best = candidate
    decision.choice = best
    decision.check_seconds = time.perf_counter() - t0
    return decision


def _score(task, model, batches, order, window_row) -> Tuple[float, Dict[str, pa.Array]]:
    """Seconds to predict every batch, after one untimed warm-up batch (kernel and weight-packing set-up)."""
    task.predict(model, batches[0])
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
    if "embedding" in reference:
        a = np.stack(reference["embedding"].to_numpy(zero_copy_only=False)).astype(np.float64)
        b = np.stack(candidate["embedding"].to_numpy(zero_copy_only=False)).astype(np.float64)
        cosine = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
        return float(cosine.mean())
    if "entities" in reference:
        spans = [[[(e["entity_group"], e["start"], e["end"]) for e in row] for row in out["entities"].to_pylist()]
                 for out in (reference, candidate)]
        return float(np.mean([x == y for x, y in zip(*spans)]))
    column = "label" if "label" in reference else "generated_text"
    return float(np.mean([x == y for x, y in zip(reference[column].to_pylist(), candidate[column].to_pylist())]))
