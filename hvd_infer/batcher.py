"""Tokenize off the model's thread and form batches of rows of similar length.

A background thread reads parts (reader.py), checks null texts, tokenizes,
sorts rows by token count inside windows of data.sort_window rows, and queues
padded batches. The model thread only ever takes ready tensors from the queue.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional

import numpy as np

from hvd_infer.config import DataConfig
from hvd_infer.errors import DataError
from hvd_infer.reader import Columns
from hvd_infer.shard_plan import Part


@dataclass
class PartWork:
    """One part on its way through the model: its rows, and the batches still out."""
    part: Part
    columns: Columns  # input columns of the kept rows (ids, label)
    rows: int  # rows kept (skipped null texts excluded)
    skipped: List[Any] = field(default_factory=list)  # ids of rows skipped for null/empty text
    truncated: int = 0


@dataclass
class Batch:
    work: PartWork
    rows: np.ndarray  # row numbers inside the part
    tensors: Dict[str, Any]
    real_tokens: int
    padded_tokens: int


@dataclass
class StageTimes:
    read: float = 0.0
    tokenize: float = 0.0
    wait: float = 0.0  # model thread waiting for a batch


_END = object()


def length_sorted_batches(lengths: np.ndarray, batch_size: int, max_tokens: int, window: int) -> List[np.ndarray]:
    """Row indices grouped into batches of similar length.

    Sorting is inside windows of `window` rows, so memory and latency stay bounded.
    With max_tokens > 0 a batch grows while rows * longest <= max_tokens.
    """
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


def id_of(columns: Columns, id_columns: List[str], row: int) -> Any:
    if not id_columns:
        return None
    vals = [columns[c][row] for c in id_columns]
    vals = [v.item() if hasattr(v, "item") else v for v in vals]
    return vals[0] if len(vals) == 1 else vals


def _null_mask(texts: np.ndarray) -> np.ndarray:
    return np.fromiter((t is None or (isinstance(t, float) and t != t) or (isinstance(t, str) and not t.strip())
                        for t in texts), dtype=bool, count=len(texts))


class BatchStream:
    """Iterate Batch objects for a rank's parts; the work runs in a background thread."""

    def __init__(self, parts: Iterator, task, cfg: DataConfig, max_batch_size: int, queue_batches: int = 8,
                 pin_memory: bool = False):
        self.parts, self.task, self.cfg = parts, task, cfg
        self.batch_size = max_batch_size
        self.pin_memory = pin_memory  # page-locked host tensors: the copy to the GPU overlaps compute
        self.times = StageTimes()
        self.queue: "queue.Queue" = queue.Queue(maxsize=queue_batches)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._produce, name="hvd_infer-batcher", daemon=True)
        self.thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self.queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            cfg, task = self.cfg, self.task
            t = time.perf_counter()
            for part, cols in self.parts:
                self.times.read += time.perf_counter() - t
                t = time.perf_counter()
                work, texts, pairs = self._prepare(part, cols)
                if not self._put(("part", work)):
                    return
                for w in range(0, len(texts), cfg.sort_window):
                    enc = task.encode(texts[w:w + cfg.sort_window],
                                      pairs[w:w + cfg.sort_window] if pairs is not None else None)
                    work.truncated += enc.truncated
                    for rows in length_sorted_batches(enc.lengths, self.batch_size, cfg.max_tokens_per_batch,
                                                      cfg.sort_window):
                        tensors = task.collate([enc.features[i] for i in rows])
                        if self.pin_memory:
                            tensors = {k: v.pin_memory() if hasattr(v, "pin_memory") else v for k, v in tensors.items()}
                        real = int(enc.lengths[rows].sum())
                        padded = int(tensors["input_ids"].numel()) if "input_ids" in tensors else real
                        self.times.tokenize += time.perf_counter() - t
                        if not self._put(Batch(work, rows + w, tensors, real, padded)):
                            return
                        t = time.perf_counter()
                self.times.tokenize += time.perf_counter() - t
                if not self._put(("end", work)):
                    return
                t = time.perf_counter()
            self._put(_END)
        except BaseException as e:  # handed to the model thread, which raises it
            self._put(e)

    def _prepare(self, part: Part, cols: Columns):
        cfg = self.cfg
        texts = cols[cfg.text_column]
        bad = _null_mask(texts)
        if cfg.text_pair_column:
            bad |= _null_mask(cols[cfg.text_pair_column])
        keep = np.ones(len(texts), dtype=bool)
        skipped: List[Any] = []
        if bad.any():
            first = int(np.argmax(bad))
            if cfg.on_null == "error":
                where = (f"id {id_of(cols, cfg.id_columns, first)!r}" if cfg.id_columns
                         else f"global row {part.start + first}")
                raise DataError(f"data.text_column '{cfg.text_column}' is null or empty at {where} "
                                f"({int(bad.sum())} such rows in rows {part.start}-{part.stop}); "
                                "clean the data or set data.on_null=skip (drop them, ids listed in the manifest) "
                                "or data.on_null=empty (score them as empty text)")
            if cfg.on_null == "skip":
                keep = ~bad
                skipped = [id_of(cols, cfg.id_columns, int(i)) if cfg.id_columns else part.start + int(i)
                           for i in np.flatnonzero(bad)]
            else:
                for c in [cfg.text_column] + ([cfg.text_pair_column] if cfg.text_pair_column else []):
                    col = cols[c].copy()
                    col[_null_mask(col)] = ""
                    cols[c] = col
        kept = {c: cols[c][keep] for c in cfg.id_columns + ([cfg.label_column] if cfg.label_column else [])}
        texts = cols[cfg.text_column][keep]
        pairs = cols[cfg.text_pair_column][keep] if cfg.text_pair_column else None
        return PartWork(part, kept, int(keep.sum()), skipped), texts, pairs

    def __iter__(self) -> Iterator:
        """Yields ("part", PartWork), then that part's Batch objects, then ("end", PartWork)."""
        while True:
            t = time.perf_counter()
            item = self.queue.get()
            self.times.wait += time.perf_counter() - t
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)
