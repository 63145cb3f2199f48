"""How auto-check scores its sample and compares a candidate with float32 (precision.measure): the sample's rows
dealt into chunks batched as the job batches them, each precision timed on the same batches, and each row's
agreement:

    text-classification, zero-shot   1 where the label is float32's, else 0
    token-classification             1 where the entity spans (group, start, end) are float32's, else 0
    text-generation                  1 where the generated text is float32's, else 0
    embedding                        the cosine similarity to the float32 vector
"""
from __future__ import annotations

import time
from typing import Dict, List, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from hvd_infer.batcher import batch_limits, length_sorted_batches, rows_from_windows
from hvd_infer.config import JobConfig
from hvd_infer.dataset import read_head

# Rows scored per precision before the agreement bounds are looked at again.
CHUNK_ROWS = 64
# The sample's batches: the job's rows per batch halved while that pads at least this much less, to at least
# this many rows (_sample_rows_per_batch).
SAMPLE_PADDING_STEP = 0.1
SAMPLE_BATCH_ROWS = 8
# A rescoring's margin: this many times the widest gap between the two likeliest labels of a row whose label int8
# changed.
RESCORE_SAFETY = 2.0


def read_sample(cfg: JobConfig, inp, rows: int):
    """The input's first `rows` rows' texts (and pairs, or None), null and empty texts left out whatever
    data.on_null does with them."""
    d = cfg.data
    columns = [d.text_column] + ([d.text_pair_column] if d.text_pair_column else [])
    sample = read_head(inp, columns, rows)
    for column in columns:
        text = sample.column(column)
        if pa.types.is_dictionary(text.type):
            text = text.cast(text.type.value_type)
        sample = sample.filter(pc.and_kleene(pc.is_valid(text), pc.not_equal(pc.utf8_trim_whitespace(text), "")))
    texts = sample.column(d.text_column).to_pylist()
    return texts, sample.column(d.text_pair_column).to_pylist() if d.text_pair_column else None


def rescore_margin(cfg: JobConfig, outputs: Dict[str, Dict[str, pa.Array]], base: str) -> float:
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


def dealt_chunks(cfg: JobConfig, task, model, device, texts, pairs) -> Tuple[List[np.ndarray], int]:
    """The sample's rows (indices) in chunks of about CHUNK_ROWS, each batched as tightly as the job batches;
    and the rows per batch for the sample (on CPU, _sample_rows_per_batch).

    The rows are sorted by length and cut into batches as the job's batcher cuts a sort window, and the batches
    are dealt round-robin to the chunks, so each chunk holds long and short rows alike (chunks of rows in input
    order would each pad a whole batch to their one long row)."""
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

    The job sorts data.sort_window rows by length before cutting them, so its batches are tight; a sample of a
    hundred rows cut into the same batches is not (38% padding on the demo's). Every precision is timed on the
    same batches, so they still compare."""
    longest_first = np.sort(np.asarray(lengths, dtype=np.float64))[::-1]

    def padded(rows: int) -> float:
        return float(sum(longest_first[i] * len(longest_first[i:i + rows]) for i in range(0, len(longest_first), rows)))

    while (rows_per_batch // 2 >= SAMPLE_BATCH_ROWS
           and padded(rows_per_batch // 2) <= (1 - SAMPLE_PADDING_STEP) * padded(rows_per_batch)):
        rows_per_batch //= 2
    return rows_per_batch


def chunk_batches(cfg: JobConfig, task, model, device, texts, pairs, rows_per_batch: int = 0):
    """One chunk of the sample as the job would batch it: length-sorted batches, and how windows map to rows;
    rows_per_batch: the sample's (dealt_chunks), else the job's."""
    enc = task.encode(texts, pairs)
    job_rows, max_tokens = _batch_limits(cfg, task, model, device)
    order = length_sorted_batches(enc.lengths, rows_per_batch or job_rows, max_tokens, cfg.data.sort_window)
    return [task.collate(enc.features[rows]) for rows in order], order, enc.window_row


def _batch_limits(cfg: JobConfig, task, model, device) -> Tuple[int, int]:
    """The job's (rows per batch, token budget) for the float32 model (batcher.batch_limits)."""
    return batch_limits(cfg.data, cfg.model.task, model.config, device, task.max_length,
                        next(model.module.parameters()).element_size())


def score(task, model, batches, order, window_row, warm_up: bool) -> Tuple[float, Dict[str, pa.Array]]:
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
