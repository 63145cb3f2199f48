"""Batches for the model, made beside it: in worker processes that each own whole parts, or in a thread.

    loader = BatchLoader(inp, parts, columns, task, cfg.data, batch_rows, max_tokens, workers, pin_memory)
    for batch in loader:          # hvd_infer.batcher.Batch, a part's batches in order
        ...
        if batch.finished: ...    # that part's last batch

With data.workers = N > 0 a torch DataLoader runs N processes; worker w reads parts w, w+N, ...
through the reader (reader.py), tokenizes and pads them (batcher.py) and the batches come back
through shared memory, parts of different workers interleaved. The rank's process does little
but call the model. data.workers = 0 does the same work in one background thread (debugging,
tiny jobs). A worker that fails or dies fails the job at once, naming its part.
"""
from __future__ import annotations

import multiprocessing
import os
import queue
import re
import threading
import time
import traceback
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch.utils.data

from hvd_infer.batcher import Batch, PartWork, part_batches
from hvd_infer.config import DataConfig
from hvd_infer.errors import DataError, UserError
from hvd_infer.reader import read_parts
from hvd_infer.shard_plan import Part, pieces_of

# On CPU the model needs every core it has. A thread reading and tokenizing beside it (0) was
# the best of 0, 1 and 2 on 2 cores at -np 2 (README, speed): the demo model 1.04x the bare loop
# steady vs 0.99x with one worker process, the null model 8,264 vs 7,112 rows/s, and a rank
# with no worker process holds 0.4 GB less.
CPU_WORKERS = 0
# Batches each worker may have ready ahead of the model. A worker's batches come in bursts (a sort
# window tokenized, then all its batches at once); with torch's default of 2 it stalls mid-burst
# while the rank waits on another worker that is tokenizing. 8 fed the null model 10% faster
# (bench_feed -np 1 data.workers=2 on 2 cores; 32 was no better).
PREFETCH = 8


def resolve_workers(setting: Any, device_type: str, cores: int, ranks_on_host: int) -> int:
    """data.workers: the number given, or auto: on CUDA the rank's share of the host's cores minus one
    (that one runs the model loop), on CPU CPU_WORKERS."""
    if setting != "auto":
        return int(setting)
    if device_type == "cuda":
        return max(1, cores // max(1, ranks_on_host) - 1)
    return CPU_WORKERS


def work_units(parts: List[Part], sort_window: int) -> List[Tuple[int, Part]]:
    """(index of its part, unit) for every unit of the parts, in row order: what one producer reads and batches.

    A unit is a run of whole sort windows from its part's start, so the batcher sorts the same
    windows as over the whole part (rows skipped for nulls aside). It is at least as long as the
    part's longest row group slice: the reader reads whole row groups, and so each is read by at
    most two producers. A part inside one big row group stays one unit.
    """
    units = []
    for k, part in enumerate(parts):
        groups = [p.row_group for p in part.pieces]
        longest = max((p.hi - p.lo for p in part.pieces), default=1)
        size = sort_window * -(-longest // sort_window)
        for start in range(part.start, part.stop, size):
            stop = min(part.stop, start + size)
            units.append((k, Part(start, stop, pieces_of(groups, [g.start for g in groups], start, stop))))
    return units


class BatchLoader:
    """Iterate the Batch objects of a rank's parts; `wait_seconds` is the time the caller waited for one."""

    def __init__(self, inp, parts: List[Part], columns: Sequence[str], task, cfg: DataConfig, batch_rows: int,
                 max_tokens: int, workers: int, pin_memory: bool = False):
        self.parts = parts
        units = work_units(parts, cfg.sort_window)
        self._part_of = {unit.start: parts[k] for k, unit in units}
        self._units_left = {part.start: 0 for part in parts}
        for k, _ in units:
            self._units_left[parts[k].start] += 1
        self._finished: Dict[int, List[PartWork]] = {}  # by part start: its finished units' work
        self.workers = min(workers, len(units))
        self.wait_seconds = 0.0
        make = _PartsDataset(inp, [unit for _, unit in units], columns, task, cfg, batch_rows, max_tokens)
        names = [_part_name(parts[k]) for k, _ in units]
        self._source = (_WorkerProcesses(make, self.workers, pin_memory, names) if self.workers
                        else _BackgroundThread(make, pin_memory))

    def __iter__(self) -> Iterator[Batch]:
        items = iter(self._source)
        while True:
            t = time.perf_counter()
            batch = next(items, None)
            self.wait_seconds += time.perf_counter() - t
            if batch is None:
                return
            yield self._in_part(batch)

    def _in_part(self, batch: Batch) -> Batch:
        """A unit's batch as its part's: rows numbered from the part's start, `finished` only on the part's
        last unit's last batch, with the work of all its units.

        Batch.rows count a unit's kept rows; offset by the unit's first row in the part they stay distinct
        and in input order across units (with gaps where rows were skipped), which is all that putting
        predictions back in order (batcher.in_input_order) needs.
        """
        unit, part = batch.part, self._part_of[batch.part.start]
        offset = unit.start - part.start
        batch.part, batch.unit_start = part, unit.start
        batch.rows = batch.rows + offset  # long_texts=chunk: windows, shifted alike (a sort window is in one unit)
        if batch.whole_rows is not None:
            batch.whole_rows = batch.whole_rows + offset
        if batch.finished is not None:
            done = self._finished.setdefault(part.start, [])
            done.append(batch.finished)
            self._units_left[part.start] -= 1
            batch.finished = PartWork.merge(part, self._finished.pop(part.start)) if not self._units_left[part.start] else None
        return batch

    def explain(self, error: BaseException) -> Optional[BaseException]:
        """The error to raise for one caught while iterating: a worker's own, or its death naming the part.

        None when `error` has nothing to do with the workers (raise it as it is). A worker's
        death reaches the model loop as a RuntimeError from torch's SIGCHLD handler, raised
        wherever the main thread is, so the caller passes every error here.
        """
        return self._source.explain(error) if self.workers else None

    def close(self) -> None:
        self._source.close()


class _PartsDataset:
    """The work of one producer: its share of the units, read, tokenized and batched in row order."""

    def __init__(self, inp, units, columns, task, cfg, batch_rows, max_tokens):
        self.inp, self.units, self.columns, self.task, self.cfg = inp, units, columns, task, cfg
        self.batch_rows, self.max_tokens = batch_rows, max_tokens

    def batches(self, indices: List[int], started=None) -> Iterator[Batch]:
        """Batches of units[i] for i in indices; started(i) is called as each unit begins."""
        units = [self.units[i] for i in indices]
        for i, (unit, chunks) in zip(indices, read_parts(self.inp, units, self.columns, self.cfg.reader)):
            if started is not None:
                started(i)
            yield from part_batches(unit, chunks, self.task, self.cfg, self.batch_rows, self.max_tokens)


def _part_name(part: Part) -> str:
    return f"the part of input rows {part.start}-{part.stop}"


class _BackgroundThread:
    def __init__(self, make: _PartsDataset, pin_memory: bool):
        self.make, self.pin_memory = make, pin_memory
        self.queue: "queue.Queue" = queue.Queue(maxsize=8)
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
            for batch in self.make.batches(list(range(len(self.make.units)))):
                if not self._put(batch.pin_memory() if self.pin_memory else batch):
                    return
            self._put(None)
        except BaseException as e:  # handed to the model thread, which raises it
            self._put(e)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            item = self.queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                return
            yield item

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)


class _WorkerDataset(torch.utils.data.IterableDataset):
    """What each DataLoader worker iterates: its round-robin share of the units.

    Before each unit a worker writes the unit's index into shared memory, and its pid once;
    a failure is sent to the rank on a queue, with the part, before it re-raises (torch hands
    on an error as a multi-line message with the traceback folded in). The queue writes to
    its pipe at once, so the rank finds the failure there when torch reports it.
    """

    def __init__(self, make: _PartsDataset, workers: int, mp):
        self.make, self.workers = make, workers
        self.current = mp.Array("q", [-1] * workers, lock=False)  # unit index each worker is on
        self.pids = mp.Array("q", [0] * workers, lock=False)
        self.failures = mp.SimpleQueue()

    def __iter__(self) -> Iterator[Batch]:
        from torch.utils.data import get_worker_info

        w = get_worker_info().id
        self.pids[w] = os.getpid()
        try:
            yield from self.make.batches(list(range(w, len(self.make.units), self.workers)),
                                         started=lambda i: self.current.__setitem__(w, i))
        except Exception as e:
            # A user error pickles as it is; anything else goes as text (it may not pickle).
            self.failures.put((w, self.current[w], e if isinstance(e, UserError) else None,
                               f"{type(e).__name__}: {e}", traceback.format_exc()))
            raise


class _WorkerProcesses:
    def __init__(self, make: _PartsDataset, workers: int, pin_memory: bool, names: List[str]):
        # fork: a worker starts in milliseconds with the tokenizer and the input listing already
        # loaded; it only tokenizes and pads (torch runs single-threaded in DataLoader workers).
        mp = multiprocessing.get_context("fork")
        self.dataset = _WorkerDataset(make, workers, mp)
        self.names = names  # of each unit's part
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=None, num_workers=workers,
                                             pin_memory=pin_memory, multiprocessing_context=mp, in_order=False,
                                             prefetch_factor=PREFETCH)
        self.iterator = iter(loader)

    def __iter__(self) -> Iterator[Batch]:
        return self.iterator

    def explain(self, error: BaseException) -> Optional[BaseException]:
        if not self.dataset.failures.empty():
            w, index, user_error, text, tb = self.dataset.failures.get()
            if user_error is not None:
                return user_error
            where = self.names[index] if index >= 0 else "its start, before its first part"
            return RuntimeError(f"data loader worker {w} failed on {where}: {text}\n"
                                f"the worker's traceback:\n{tb}")
        m = re.search(r"DataLoader worker \(pid\(?s?\)? ([\d, ]+)\) (.*)", str(error))
        if not m:
            return None
        pids = [int(p) for p in m.group(1).split(",")]
        cause = m.group(2).strip().rstrip(".")
        dead = [w for w in range(len(self.dataset.pids)) if self.dataset.pids[w] in pids]
        where = ", ".join(f"worker {w} on {self.names[self.dataset.current[w]]}"
                          if self.dataset.current[w] >= 0 else f"worker {w} before its first part" for w in dead)
        hint = ("out of memory? lower data.workers or data.sort_window" if "Killed" in cause or "signal" in cause
                else "see the log above")
        return DataError(f"a data loader process died ({where or 'pid ' + m.group(1)}: {cause}); {hint}, then rerun "
                         "with output.mode=resume")

    def close(self) -> None:
        # Stops and joins the workers now, not whenever the iterator is garbage collected.
        self.iterator._shutdown_workers()
