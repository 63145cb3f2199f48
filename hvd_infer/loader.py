"""Batches for the model, made beside it: in worker processes that each own whole parts, or in a thread.

    loader = BatchLoader(inp, parts, columns, task, cfg.data, batch_rows, max_tokens, workers, pin_memory)
    for batch in loader:          # hvd_infer.batcher.Batch, a part's batches in order
        ...
        if batch.finished: ...    # that part's last batch

With data.workers = N > 0 a torch DataLoader runs N processes; worker w reads units w, w+N, ...
(reader.py), tokenizes and pads them (batcher.py), and the batches come back through shared memory.
data.workers = 0 does the same work in one background thread. A worker that fails or dies fails the
job at once, naming its part. Each producer keeps in ProducerStates what it is doing, since when and
on which unit, from which the watchdog (watchdog.py) names a stuck one.
"""
from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import multiprocessing
import os
import queue
import re
import signal
import tempfile
import threading
import time
import traceback
from collections import Counter
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch.utils.data

from hvd_infer.batcher import Batch, PartWork, part_batches
from hvd_infer.config import DataConfig
from hvd_infer.context import launcher_rank
from hvd_infer.errors import DataError, UserError
from hvd_infer.reader import read_parts
from hvd_infer.shard_plan import Part, pieces_of

# data.workers=auto on CPU: a thread feeds the model as well as a process and holds less memory (docs/speed.md).
CPU_WORKERS = 0
# Batches a worker may have ready ahead of the model: they come in bursts of a sort window, and torch's
# default of 2 stalls a worker mid-burst.
PREFETCH = 8
# What a producer is doing, as kept in ProducerStates.stage.
STARTING, READING, TOKENIZING, HANDING_OVER, DONE = range(5)
STAGE_NAMES = ("starting", "reading", "tokenizing", "handing over a batch", "done")
# Test-only: "RANK:STAGE" (e.g. "1:tokenizing") makes that rank's producers hang in that stage of their 2nd unit.
TEST_STALL_ENV = "HVD_INFER_TEST_STALL"


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
    A unit is whole sort windows (as over the whole part), at least the part's longest row group slice long."""
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
        units = work_units(parts, cfg.sort_window)
        self._part_of = {unit.start: parts[k] for k, unit in units}
        self._units_left = Counter(parts[k].start for k, _ in units)
        self._finished: Dict[int, List[PartWork]] = {}  # by part start: its finished units' work
        self.workers = min(workers, len(units))
        self.wait_seconds = 0.0
        self.waiting = False  # the caller is waiting for a batch (read by the watchdog)
        make = _PartsDataset(inp, [unit for _, unit in units], columns, task, cfg, batch_rows, max_tokens)
        self.names = [_part_name(parts[k]) for k, _ in units]  # of each unit's part
        self._source = (_WorkerProcesses(make, self.workers, pin_memory, self.names) if self.workers
                        else _BackgroundThread(make, pin_memory))

    def __iter__(self) -> Iterator[Batch]:
        items = iter(self._source)
        while True:
            t = time.perf_counter()
            self.waiting = True
            try:
                batch = next(items, None)
            finally:
                self.waiting = False
            self.wait_seconds += time.perf_counter() - t
            if batch is None:
                return
            yield self._in_part(batch)

    def _in_part(self, batch: Batch) -> Batch:
        """A unit's batch as its part's: rows offset by the unit's start in the part (distinct and in input
        order, as batcher.in_input_order needs), `finished` only on the part's last batch, with all units' work."""
        unit, part = batch.part, self._part_of[batch.part.start]
        offset = unit.start - part.start
        batch.part, batch.unit_start = part, unit.start
        batch.rows = batch.rows + offset  # long_texts=chunk: windows, shifted alike (a sort window is in one unit)
        if batch.whole_rows is not None:
            batch.whole_rows = batch.whole_rows + offset
        if batch.finished is not None:
            self._finished.setdefault(part.start, []).append(batch.finished)
            self._units_left[part.start] -= 1
            batch.finished = PartWork.merge(part, self._finished.pop(part.start)) if not self._units_left[part.start] else None
        return batch

    def explain(self, error: BaseException) -> Optional[BaseException]:
        """The error to raise for one caught while iterating: a worker's own, or its death naming the part;
        None when it has nothing to do with the workers. A worker's death may surface anywhere in the main
        thread (torch's SIGCHLD handler), so the caller passes every error here."""
        return self._source.explain(error) if self.workers else None

    def stuck(self) -> Tuple[str, str]:
        """(the stage, what it waits for) of the producer that has been at its current step the longest,
        for a rank waiting on a batch: 'tokenizing in data loader worker 1', 'its batches of the part ...'."""
        states, now = self._source.states, time.monotonic()
        busy = [p for p in range(len(states)) if states.stage[p] in (STARTING, READING, TOKENIZING)]
        if not busy:
            ready = ", ".join(f"{self._producer(p)} {STAGE_NAMES[states.stage[p]]}" for p in range(len(states)))
            return "the data loader", f"a batch, while {ready}"
        p = min(busy, key=lambda p: states.since[p])
        stage, unit = states.stage[p], states.unit[p]
        where = self.names[unit] if unit >= 0 else "its first part"
        return (f"{STAGE_NAMES[stage]} in {self._producer(p)}",
                f"{'the rows' if stage == READING else 'the batches'} of {where}, {STAGE_NAMES[stage]} for "
                f"{now - states.since[p]:.0f} s")

    def _producer(self, p: int) -> str:
        return f"data loader worker {p}" if self.workers else "the loader thread"

    def worker_stacks(self) -> str:
        """The stacks of every worker process's threads ('' with the thread: the rank's own stacks show it)."""
        return self._source.stacks() if self.workers else ""

    def close(self) -> None:
        self._source.close()


class _PartsDataset:
    """The work of one producer: its share of the units, read, tokenized and batched in row order."""

    def __init__(self, inp, units, columns, task, cfg, batch_rows, max_tokens):
        self.inp, self.units, self.columns, self.task, self.cfg = inp, units, columns, task, cfg
        self.batch_rows, self.max_tokens = batch_rows, max_tokens

    def batches(self, indices: List[int], states: "ProducerStates", slot: int) -> Iterator[Batch]:
        """Batches of units[i] for i in indices, each step marked in states[slot] as it begins."""
        mark = _marker(states, slot)
        mark(indices[0] if indices else -1, READING)  # opening the reader reads the first row group's footer
        for i, (unit, chunks) in zip(indices, read_parts(self.inp, [self.units[i] for i in indices], self.columns,
                                                           self.cfg.reader)):
            for batch in part_batches(unit, _marked_chunks(chunks, i, mark), self.task, self.cfg, self.batch_rows,
                                      self.max_tokens):
                mark(i, HANDING_OVER)
                yield batch
                mark(i, TOKENIZING)
        mark(states.unit[slot], DONE)


class ProducerStates:
    """What each producer is doing (STAGE_NAMES), since when (time.monotonic, the same clock in every
    process of a host) and on which unit (-1: none): shared memory with worker processes (mp given),
    plain lists for the thread."""

    def __init__(self, producers: int, mp=None):
        array = (lambda code, values: mp.Array(code, values, lock=False)) if mp else (lambda code, values: values)
        self.stage = array("i", [STARTING] * producers)
        self.since = array("d", [time.monotonic()] * producers)
        self.unit = array("q", [-1] * producers)

    def __len__(self) -> int:
        return len(self.stage)


def _marker(states: ProducerStates, slot: int):
    """mark(unit, stage) for one producer; with TEST_STALL_ENV naming this rank and a stage, it sleeps there."""
    stall = os.environ.get(TEST_STALL_ENV, "").split(":")
    stall_stage = STAGE_NAMES.index(stall[1]) if len(stall) == 2 and stall[0] == str(launcher_rank()) else None
    units_begun = []

    def mark(unit: int, stage: int) -> None:
        if states.unit[slot] != unit and unit >= 0:
            units_begun.append(unit)
        states.stage[slot], states.since[slot], states.unit[slot] = stage, time.monotonic(), unit
        if stage == stall_stage and len(units_begun) == 2:
            time.sleep(3600)

    return mark


def _marked_chunks(chunks: Iterator, unit: int, mark) -> Iterator:
    """A unit's chunks, marked reading while each is read and tokenizing once it is handed on."""
    while True:
        mark(unit, READING)
        cols = next(chunks, None)
        mark(unit, TOKENIZING)
        if cols is None:
            return
        yield cols


def _part_name(part: Part) -> str:
    return f"the part of input rows {part.start}-{part.stop}"


class _BackgroundThread:
    def __init__(self, make: _PartsDataset, pin_memory: bool):
        self.make, self.pin_memory = make, pin_memory
        self.states = ProducerStates(1)
        self.queue: "queue.Queue" = queue.Queue(maxsize=8)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._produce, name="hvd_infer-batcher", daemon=True)
        self.thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            with contextlib.suppress(queue.Full):
                self.queue.put(item, timeout=0.2)
                return True
        return False

    def _produce(self) -> None:
        try:
            for batch in self.make.batches(list(range(len(self.make.units))), self.states, 0):
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
    """What each DataLoader worker iterates: its round-robin share of the units. A failure goes to the rank on
    a queue, with its unit, before it re-raises, so the rank can name it when torch reports the worker failed."""

    def __init__(self, make: _PartsDataset, workers: int, mp):
        self.make, self.workers = make, workers
        self.states = ProducerStates(workers, mp)
        self.pids = mp.Array("q", [0] * workers, lock=False)
        self.failures = mp.SimpleQueue()
        self.rank_pid = os.getpid()
        self.stacks = tempfile.TemporaryFile()  # the workers' stacks on SIGUSR1: unnamed, shared through the fork

    def __iter__(self) -> Iterator[Batch]:
        from torch.utils.data import get_worker_info

        w = get_worker_info().id
        _end_with_rank(self.rank_pid)
        # The tokenizer's Rust thread pool did not survive the fork: with it on, the first batch call deadlocks.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        faulthandler.register(signal.SIGUSR1, file=self.stacks.fileno(), all_threads=True, chain=False)
        self.pids[w] = os.getpid()
        try:
            yield from self.make.batches(list(range(w, len(self.make.units), self.workers)), self.states, w)
        except Exception as e:
            # A user error pickles as it is; anything else goes as text (it may not pickle).
            self.failures.put((w, self.states.unit[w], e if isinstance(e, UserError) else None,
                               f"{type(e).__name__}: {e}", traceback.format_exc()))
            raise


def _end_with_rank(rank_pid: int) -> None:
    """This worker is killed when the rank's process ends, however it ends (Linux), rather than left running."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: for the thread that forked this one, the rank's main thread
    except (OSError, AttributeError):
        return
    if os.getppid() != rank_pid:  # the rank ended before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


class _WorkerProcesses:
    def __init__(self, make: _PartsDataset, workers: int, pin_memory: bool, names: List[str]):
        mp = multiprocessing.get_context("fork")  # a worker starts with the tokenizer and input listing loaded
        self.dataset = _WorkerDataset(make, workers, mp)
        self.states = self.dataset.states
        self.names = names  # of each unit's part
        self.iterator = iter(torch.utils.data.DataLoader(self.dataset, batch_size=None, num_workers=workers,
                                                         pin_memory=pin_memory, multiprocessing_context=mp,
                                                         in_order=False, prefetch_factor=PREFETCH))

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
        if m:
            pids = [int(p) for p in m.group(1).split(",")]
            cause = m.group(2).strip().rstrip(".")
        else:
            # A death may surface first as another error (ConnectionResetError): the exit codes tell a moment later.
            try:
                ended = self._ended_workers(wait=5.0 if isinstance(error, (ConnectionError, EOFError)) else 0.0)
            except RuntimeError as death:  # torch's SIGCHLD handler, raised here as the worker ends: it names it
                return self.explain(death) if "DataLoader worker" in str(death) else None
            if not ended:
                return None
            pids, code = list(ended), next(iter(ended.values()))
            cause = (f"is killed by signal: {signal.strsignal(-code)}" if code < 0
                     else f"exited unexpectedly with code {code}")
        dead = [w for w in range(len(self.dataset.pids)) if self.dataset.pids[w] in pids]
        units = self.dataset.states.unit
        where = ", ".join(f"worker {w} on {self.names[units[w]]}" if units[w] >= 0 else f"worker {w} before its first part"
                          for w in dead)
        hint = ("out of memory? lower data.workers or data.sort_window" if "Killed" in cause or "signal" in cause
                else "see the log above")
        where = where or "pid " + ", ".join(map(str, pids))
        return DataError(f"a data loader process died ({where}: {cause}); {hint}, then rerun with output.mode=resume")

    def _ended_workers(self, wait: float) -> Dict[int, int]:
        """{pid: exit code} of the workers that ended with an error, waiting up to `wait` seconds for one."""
        deadline = time.monotonic() + wait
        while True:
            ended = {p.pid: p.exitcode for p in self.iterator._workers if p.exitcode not in (None, 0)}
            if ended or time.monotonic() >= deadline:
                return ended
            time.sleep(0.1)

    def stacks(self) -> str:
        """Each worker's stacks, written by faulthandler in the worker on SIGUSR1, one worker at a time."""
        if self.dataset.stacks.closed:
            return "\n(the data loader workers had finished)\n"
        fd = self.dataset.stacks.fileno()
        for w, pid in enumerate(self.dataset.pids):
            os.write(fd, f"\n--- data loader worker {w} (pid {pid or 'not started'}) ---\n".encode())
            if not pid:  # kill(0) would signal the whole process group
                continue
            try:
                os.kill(pid, signal.SIGUSR1)
            except (ProcessLookupError, PermissionError):
                os.write(fd, b"(not running)\n")
                continue
            time.sleep(0.5)  # faulthandler writes from the signal handler, at once
        return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")

    def close(self) -> None:
        try:  # now, not whenever the iterator is garbage collected
            self.iterator._shutdown_workers()
        except RuntimeError as e:  # torch's SIGCHLD guard for a worker that died meanwhile: already explained
            if "DataLoader worker" not in str(e):
                raise
        self.dataset.stacks.close()
