"""Turn a part's rows into batches of similar length, and predictions back into input order.

Per part: apply data.on_null, tokenize data.sort_window rows at a time, sort them by token count, and
cut padded batches (by rows, or by a token budget). With data.dedup a row repeating an earlier row's
(text, pair) in its part is not scored but gets that row's prediction. The part's last batch carries
what the writer needs besides the predictions (PartWork). Plain functions: loader.py runs them.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import pyarrow as pa

from hvd_infer.config import DataConfig
from hvd_infer.errors import DataError
from hvd_infer.reader import Columns
from hvd_infer.shard_plan import Part

# Rows per batch when a token budget sizes batches: the budget, not this, is the limit.
_ROWS_UNDER_BUDGET = 1 << 16


@dataclass
class PartWork:
    """What a finished part needs besides its predictions: its kept rows' ids and labels, what was dropped."""
    part: Part
    columns: Columns  # input columns of the kept rows (ids, label)
    rows: int  # rows kept (skipped null texts excluded)
    skipped: List[Any] = field(default_factory=list)  # ids of rows skipped for null/empty text
    truncated: int = 0  # under data.dedup, of the distinct texts scored
    source: Optional[np.ndarray] = None  # data.dedup: per kept row, the kept row whose prediction it gets
    chunked: int = 0  # model.long_texts=chunk: rows longer than one window
    chunk_windows: int = 0  # the windows those rows were split into

    @classmethod
    def merge(cls, part: Part, works: List["PartWork"]) -> "PartWork":
        """One part's work from its pieces' (the loader's units, in any order), row numbers shifted by each
        piece's offset in the part as the loader shifts Batch.rows."""
        works = sorted(works, key=lambda w: w.part.start)
        sources = [w.source + (w.part.start - part.start) for w in works if w.source is not None]
        return cls(part, {c: np.concatenate([w.columns[c] for w in works]) for c in works[0].columns},
                   rows=sum(w.rows for w in works), skipped=[s for w in works for s in w.skipped],
                   truncated=sum(w.truncated for w in works), source=np.concatenate(sources) if sources else None,
                   chunked=sum(w.chunked for w in works), chunk_windows=sum(w.chunk_windows for w in works))


@dataclass
class Batch:
    """Rows of one part, padded for the model. A part's batches arrive in order; the last has `finished` set."""
    part: Part
    rows: np.ndarray  # numbers of the part's kept rows in this batch; empty only for a part with no rows
    tensors: Dict[str, Any]
    real_tokens: int
    padded_tokens: int
    read_seconds: float = 0.0  # spent reading and tokenizing since the previous batch of this producer
    tokenize_seconds: float = 0.0
    finished: Optional[PartWork] = None  # on the part's last batch: the part is complete once it is scored
    repeats: int = 0  # data.dedup: rows copying an earlier row's prediction (in row_count, not in rows)
    # model.long_texts=chunk: `rows` number windows of the sort window (data.sort_window rows) being batched.
    first_windows: Optional[int] = None  # rows whose first window is in this batch
    # On a sort window's last batch: its rows (in the part), whole once this batch is scored, and the row
    # (0 = the first of whole_rows) of each of its windows, for rows_from_windows.
    whole_rows: Optional[np.ndarray] = None
    window_row: Optional[np.ndarray] = None
    unit_start: int = -1  # first row of the loader's unit it comes from: units of one part may interleave

    @property
    def row_count(self) -> int:
        """Input rows this batch accounts for: each row once, in the batch of its first window, plus its
        repeats (progress and rows/s count these; tokens count the forward work)."""
        return (len(self.rows) if self.first_windows is None else self.first_windows) + self.repeats

    def pin_memory(self) -> "Batch":
        """Page-locked host tensors: the copy to the GPU overlaps compute (DataLoader calls this)."""
        self.tensors = {k: v.pin_memory() if hasattr(v, "pin_memory") else v for k, v in self.tensors.items()}
        return self


def length_sorted_batches(lengths: np.ndarray, batch_size: int, max_tokens: int, window: int) -> List[np.ndarray]:
    """Row indices grouped into batches of similar length, sorted within windows of `window` rows; with
    max_tokens > 0 a batch grows while rows * longest <= max_tokens."""
    batches = []
    for w in range(0, len(lengths), window):
        idx = np.arange(w, min(len(lengths), w + window))
        idx = idx[np.argsort(-lengths[idx], kind="stable")]  # longest first: a memory blow-up shows at once
        if max_tokens <= 0:
            batches += [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
            continue
        start = 0
        while start < len(idx):
            longest = max(int(lengths[idx[start]]), 1)
            n = max(1, min(batch_size if batch_size > 0 else len(idx), max_tokens // longest))
            batches.append(idx[start:start + n])
            start += n
    return batches


def in_input_order(outputs: List[Dict[str, Any]], batch_rows: List[np.ndarray],
                   source: Optional[np.ndarray] = None) -> Dict[str, pa.Array]:
    """Each output column over all batches, in input order. outputs[b] holds batch b's columns, batch_rows[b]
    their row numbers (distinct, in input order). With `source` (data.dedup) output row i is row source[i]'s."""
    if not outputs:
        return {}
    scored = np.concatenate(batch_rows)
    order = np.argsort(scored, kind="stable")  # positions of the scored rows, in input order
    if source is not None:
        order = order[np.searchsorted(scored[order], source)]
    order = pa.array(order)
    return {name: pa.concat_arrays([as_arrow(o[name]) for o in outputs]).take(order) for name in outputs[0]}


def dedup_off(cfg: DataConfig, task) -> Optional[str]:
    """Why rows repeating a text are scored again in this job (None: data.dedup copies their predictions)."""
    return "data.dedup=false" if not cfg.dedup else task.repeats_differ()


def distinct_rows(seen: Dict[bytes, int], texts: np.ndarray, pairs: Optional[np.ndarray],
                  first_row: int) -> Tuple[np.ndarray, np.ndarray]:
    """(indices of the rows whose (text, pair) is new, the row each row copies its prediction from).
    texts[i] is row first_row + i; `seen` maps each (text, pair) met to its first row, and grows. Keys are
    128-bit BLAKE2 digests, so the texts are not kept alive; a collision is far below hardware error rates."""
    source = np.empty(len(texts), dtype=np.int64)
    for i, text in enumerate(texts):
        key = text.encode()
        if pairs is not None:  # the length prefix keeps ("ab", "c") and ("a", "bc") apart
            key = len(key).to_bytes(8, "little") + key + pairs[i].encode()
        source[i] = seen.setdefault(hashlib.blake2b(key, digest_size=16).digest(), first_row + i)
    return np.flatnonzero(source == first_row + np.arange(len(texts))), source


def rows_from_windows(task, outputs: List[Dict[str, Any]], batch_windows: List[np.ndarray],
                      window_row: np.ndarray) -> Dict[str, Any]:
    """long_texts=chunk: each row's prediction columns, rows in input order, assembled from its windows.
    outputs[b] holds batch b's raw outputs per window (task.predict), batch_windows[b] their windows;
    window_row[w] is window w's row (0, 1, ...). Called once every window of these rows is scored."""
    if not outputs:
        return {}
    order = np.argsort(np.concatenate(batch_windows), kind="stable")
    raw = {k: _stack([o[k] for o in outputs])[order] for k in outputs[0]}
    starts = np.r_[0, np.cumsum(np.bincount(window_row))]  # every row has a window, rows in order
    return task.columns(task.merge_windows(raw, starts))


def _stack(values: List[Any]) -> np.ndarray:
    """Per-batch outputs as one array along the first axis (lists of Python objects as an object array)."""
    if isinstance(values[0], np.ndarray):
        return np.concatenate(values)
    out = np.empty(sum(map(len, values)), dtype=object)
    out[:] = [x for v in values for x in v]
    return out


def as_arrow(values: Any) -> pa.Array:
    return values if isinstance(values, pa.Array) else pa.array(values)


def gpu_token_budget(free_bytes: int, hidden_size: int, intermediate_size: int, heads: int, max_length: int,
                     dtype_bytes: int, fraction: float = 0.5, cap: int = 1 << 17, floor: int = 4096) -> int:
    """Padded tokens per batch that one forward of an encoder fits in `fraction` of the GPU's free memory.
    Per token, one layer's activations (only one layer's live at a time under inference_mode): 6 x hidden
    (residual, Q/K/V, context, output), the MLP's two intermediates and two rows of attention scores per
    head, doubled for allocator slack. The cap bounds a batch's latency and the host memory in flight."""
    per_token = 2 * dtype_bytes * (6 * hidden_size + 2 * intermediate_size + 2 * heads * max_length)
    budget = int(fraction * free_bytes) // per_token
    return int(min(cap, max(floor, budget // 1024 * 1024)))


def batch_limits(cfg: DataConfig, task_name: str, model_config: Any, device: Any, max_length: int,
                 dtype_bytes: int) -> Tuple[int, int]:
    """(most rows per batch, token budget or 0) for this job on this device. data.max_tokens_per_batch=auto
    is a budget from the GPU's free memory on CUDA, and rows (data.batch_size) on CPU, where batches of 32
    already keep every core busy, and for generation, whose memory grows with the tokens it generates."""
    max_tokens = cfg.max_tokens_per_batch
    if max_tokens == "auto":
        max_tokens = 0
        if getattr(device, "type", "cpu") == "cuda" and task_name != "text-generation":
            import torch

            free, _ = torch.cuda.mem_get_info(device)
            max_tokens = gpu_token_budget(free, model_config.hidden_size,
                                          getattr(model_config, "intermediate_size", 4 * model_config.hidden_size),
                                          model_config.num_attention_heads, max_length, dtype_bytes)
    return (cfg.batch_size if max_tokens <= 0 else max(cfg.batch_size, _ROWS_UNDER_BUDGET)), max_tokens


def id_of(columns: Columns, id_columns: List[str], row: int) -> Any:
    if not id_columns:
        return None
    vals = [v.item() if hasattr(v, "item") else v for v in (columns[c][row] for c in id_columns)]
    return vals[0] if len(vals) == 1 else vals


def null_mask(texts: np.ndarray) -> np.ndarray:
    """True where a text is null, NaN or only whitespace."""
    return np.fromiter((t is None or (isinstance(t, float) and t != t) or (isinstance(t, str) and not t.strip())
                        for t in texts), dtype=bool, count=len(texts))


def part_batches(part: Part, chunks: Iterator[Columns], task, cfg: DataConfig, batch_rows: int,
                 max_tokens: int) -> Iterator[Batch]:
    """A part's batches, from its chunks of rows (reader.read_parts); at most one sort window of texts held.
    Batch.rows number the part's kept rows in input order; the last batch (maybe empty) carries the PartWork."""
    carried = list(dict.fromkeys(cfg.id_columns + ([cfg.label_column] if cfg.label_column else [])))
    text_columns = [cfg.text_column] + ([cfg.text_pair_column] if cfg.text_pair_column else [])
    work = PartWork(part, {}, 0)
    kept: Dict[str, List[np.ndarray]] = {c: [] for c in carried}
    buffer: Dict[str, List[np.ndarray]] = {c: [] for c in text_columns}  # kept texts not yet tokenized
    buffered = 0
    seen: Optional[Dict[bytes, int]] = {} if dedup_off(cfg, task) is None else None
    sources: List[np.ndarray] = []
    read = tokenize = 0.0
    pending: Optional[Batch] = None
    first_row = part.start  # global row of the next chunk's first row
    chunks = iter(chunks)
    while True:
        t = time.perf_counter()
        cols = next(chunks, None)
        read += time.perf_counter() - t
        t = time.perf_counter()
        if cols is not None:
            keep = _apply_on_null(cols, cfg, part, first_row, work)
            first_row += len(keep)
            for c in carried:
                kept[c].append(cols[c][keep])
            for c in text_columns:
                buffer[c].append(cols[c][keep])
            buffered += int(keep.sum())
        while buffered >= cfg.sort_window or (cols is None and buffered):
            window = {c: np.concatenate(buffer[c]) for c in text_columns}
            buffer = {c: [window[c][cfg.sort_window:]] for c in text_columns}
            window = {c: v[:cfg.sort_window] for c, v in window.items()}
            size = len(window[cfg.text_column])
            buffered -= size
            new = np.arange(size)  # rows of the sort window to score: all, or under data.dedup the distinct ones
            if seen is not None:
                new, source = distinct_rows(seen, window[cfg.text_column], window.get(cfg.text_pair_column),
                                            work.rows)
                sources.append(source)
                window = {c: v[new] for c, v in window.items()}
            if len(new):
                enc = task.encode(window[cfg.text_column], window.get(cfg.text_pair_column))
                work.truncated += enc.truncated
                units, first = new + work.rows, None  # the part's row of each unit the batches take
                if enc.window_row is not None:  # the units are windows, numbered in this sort window
                    units, first = np.arange(len(enc.lengths)), np.r_[True, enc.window_row[1:] != enc.window_row[:-1]]
                    per_row = np.bincount(enc.window_row, minlength=len(new))
                    work.chunked += int((per_row > 1).sum())
                    work.chunk_windows += int(per_row[per_row > 1].sum())
                for rows in length_sorted_batches(enc.lengths, batch_rows, max_tokens, len(enc.lengths)):
                    tensors = task.collate(enc.features[rows])
                    real = int(enc.lengths[rows].sum())
                    padded = int(tensors["input_ids"].numel()) if "input_ids" in tensors else real
                    tokenize += time.perf_counter() - t
                    if pending is not None:
                        yield pending
                    t = time.perf_counter()
                    pending = Batch(part, units[rows], tensors, real, padded, read, tokenize,
                                    first_windows=None if first is None else int(first[rows].sum()))
                    read = tokenize = 0.0
                if enc.window_row is not None:  # its rows are whole once its last batch is scored
                    pending.whole_rows, pending.window_row = new + work.rows, enc.window_row
            if pending is not None:  # the part's first window always has a new row, so a batch exists
                pending.repeats += size - len(new)
            work.rows += size
        tokenize += time.perf_counter() - t
        if cols is None:
            break
    work.columns = {c: np.concatenate(v) if v else np.array([], dtype=object) for c, v in kept.items()}
    if sources:
        work.source = np.concatenate(sources)
    if pending is None:
        pending = Batch(part, np.array([], dtype=np.int64), {}, 0, 0)
    pending.read_seconds += read
    pending.tokenize_seconds += tokenize
    pending.finished = work
    yield pending


def _apply_on_null(cols: Columns, cfg: DataConfig, part: Part, first_row: int, work: PartWork) -> np.ndarray:
    """data.on_null on one chunk: raise, drop (noted in work.skipped) or blank; returns the rows kept."""
    texts = cols[cfg.text_column]
    bad = null_mask(texts)
    if cfg.text_pair_column:
        bad |= null_mask(cols[cfg.text_pair_column])
    keep = np.ones(len(texts), dtype=bool)
    if not bad.any():
        return keep
    first = int(np.argmax(bad))
    if cfg.on_null == "error":
        where = f"id {id_of(cols, cfg.id_columns, first)!r}" if cfg.id_columns else f"global row {first_row + first}"
        raise DataError(f"data.text_column '{cfg.text_column}' is null or empty at {where} "
                        f"({int(bad.sum())} such rows in rows {first_row}-{first_row + len(texts)} of part "
                        f"{part.start}-{part.stop}); clean the data or set data.on_null=skip (drop them, ids listed "
                        "in the manifest) or data.on_null=empty (score them as empty text)")
    if cfg.on_null == "skip":
        work.skipped += [id_of(cols, cfg.id_columns, int(i)) if cfg.id_columns else first_row + int(i)
                         for i in np.flatnonzero(bad)]
        return ~bad
    for c in [cfg.text_column] + ([cfg.text_pair_column] if cfg.text_pair_column else []):
        col = cols[c].copy()
        col[null_mask(col)] = ""
        cols[c] = col
    return keep
