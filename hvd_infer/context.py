"""The rank context: who am I, on which device, and the few collectives the job needs.

Two backends, chosen from how the process was started; no other module knows which runs:

- Horovod, when a Horovod launcher started it (horovodrun, hvd-infer -np N, horovod.spark.run,
  HorovodRunner);
- torch.distributed over Gloo, when torchrun started it (RANK, WORLD_SIZE, LOCAL_RANK set; also
  TorchDistributor, which runs torchrun);

otherwise it is a world of one without either.
"""
from __future__ import annotations

import datetime
import os
import pickle
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hvd_infer.config import RuntimeConfig

_HOROVOD_VARS = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")

# torch.distributed's collectives time out after this; the job's last gather waits for the slowest
# rank to finish its whole shard, so it is long. A rank that dies closes its connections and the
# others fail at once; torchrun and Spark's barrier stage also end the survivors; a rank cut off
# closes nothing, and _Heartbeat ends the job within runtime.collective_timeout_s. (Horovod's waits
# are its background loop's, which keeps talking to every rank: there runtime.collective_timeout_s
# bounds each exchange, and a rank still scoring is no silent one.)
_COLLECTIVE_TIMEOUT = datetime.timedelta(days=1)
# A cut network closes no connection, so under torch.distributed nothing would fail until that day
# is over: a heartbeat, every HEARTBEAT_S and bounded by runtime.collective_timeout_s, ends it.
HEARTBEAT_S = 5.0


def under_horovod_launcher() -> bool:
    return any(v in os.environ for v in _HOROVOD_VARS)


def under_torchrun() -> bool:
    return all(v in os.environ for v in _TORCHRUN_VARS) and not under_horovod_launcher()


def started_as_rank() -> bool:
    """True in a process a launcher started as one rank of a job (Horovod or torchrun)."""
    return under_horovod_launcher() or under_torchrun()


def launcher_rank() -> int:
    """This process's rank as its launcher set it, read without starting any backend (0 in a world of one)."""
    for name in _HOROVOD_VARS if under_horovod_launcher() else ("RANK",):
        if name in os.environ:
            return int(os.environ[name])
    return 0


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# The CPU flags that decide which precisions are fast here (bf16 natively, int8 with VNNI).
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_has(override_env: str, *flags: str) -> bool:
    """Whether this CPU has any of the CPU_FLAGS `flags`, unless the variable override_env says so (1 or 0)."""
    forced = os.environ.get(override_env)
    if forced in ("0", "1"):
        return forced == "1"
    facts = cpu_facts()
    return any(facts[flag] for flag in flags)


def cpu_facts() -> dict:
    """This CPU's model name, usable cores and the flags of CPU_FLAGS (each True or False), from /proc/cpuinfo."""
    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu": model, "cores": cpu_cores(), **{f: f in flags for f in CPU_FLAGS}}


def idle_threads_sleep() -> None:
    """Make OpenMP threads sleep when idle instead of spinning (OMP_WAIT_POLICY=PASSIVE, unless set).

    Takes effect only before torch is first imported. By default libgomp's threads spin after
    each operator, waiting for the next one; on CPU the rank's threads then take the cores its
    data loader workers (and any other process) need, and a spinning thread that loses its core
    stalls the next operator for a time slice. Measured on 2 busy cores, null model of
    scripts/bench_feed.py, -np 1, 2 torch threads, 1 worker: 47 s of forward time spinning,
    5 s passive (feed 0.11x of the pooled tokenizer before, 0.53-0.72x after; docs/speed.md).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


class _Horovod:
    """Collectives over horovod.torch."""

    def __init__(self, collective_timeout_s: int):
        # Gloo's wait for another rank in each exchange; hvd-infer -np passes the same to horovodrun.
        os.environ.setdefault("HOROVOD_GLOO_TIMEOUT_SECONDS", str(collective_timeout_s))
        # Ranks finish at different times; Horovod's stall warnings would be noise.
        os.environ.setdefault("HOROVOD_STALL_CHECK_DISABLE", "1")
        # Horovod's background thread negotiates with the other ranks every cycle, even with
        # nothing to reduce: at its default cycle an idle rank burns half a core (measured,
        # Gloo, 2 ranks). The job runs a handful of collectives, none per batch, so a 20 ms
        # cycle costs well under a second per job and gives those cycles back to the model.
        os.environ.setdefault("HOROVOD_CYCLE_TIME", "20")
        import horovod.torch as hvd

        hvd.init()
        self.hvd = hvd
        self.rank, self.size = hvd.rank(), hvd.size()
        self.local_rank, self.local_size = hvd.local_rank(), hvd.local_size()
        self._calls = 0

    def _name(self, op: str) -> str:
        # Horovod matches collectives across ranks by name; its default name is the
        # object's type, which differs when ranks pass different things (None vs a value).
        self._calls += 1
        return f"hvd_infer.{op}.{self._calls}"

    def _arrive(self, op: str) -> None:
        """Wait, asleep, until every rank has reached this collective. horovod.torch's own wait spins (its
        WaitAndClear yields in a loop), so a rank that waits takes a core from the ranks still working on its
        host: rank 0's model.dtype=auto-check check ran 2.4x slower beside a waiting rank (2 ranks, 2 cores).
        The collective that follows then finds every rank there."""
        import torch

        handle = self.hvd.allreduce_async(torch.zeros(1), name=self._name(op + ".arrive"), op=self.hvd.Sum)
        while not self.hvd.poll(handle):
            time.sleep(0.005)
        self.hvd.synchronize(handle)

    def barrier(self) -> None:
        self._arrive("barrier")

    def allgather_object(self, obj: Any) -> List[Any]:
        self._arrive("allgather")
        return self.hvd.allgather_object(obj, name=self._name("allgather"))

    def broadcast_object(self, obj: Any, root: int) -> Any:
        self._arrive("broadcast")
        return self.hvd.broadcast_object(obj, root_rank=root, name=self._name("broadcast"))

    def shutdown(self) -> None:
        self.hvd.shutdown()


class _TorchDistributed:
    """Collectives over torch.distributed with Gloo: the job only moves small Python objects,
    and Gloo does that on CPU whatever the devices are (NCCL would need them on the GPU)."""

    def __init__(self, collective_timeout_s: int):
        import torch.distributed as dist

        self.dist = dist
        # A caller that set up torch.distributed itself keeps its process group.
        self.owns_process_group = not dist.is_initialized()
        if self.owns_process_group:
            # Ranks that do not all arrive within this fail instead of waiting forever.
            dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=collective_timeout_s))
        self.group = dist.new_group(backend="gloo", timeout=_COLLECTIVE_TIMEOUT)
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.local_rank = int(os.environ["LOCAL_RANK"])
        self.local_size = int(os.environ.get("LOCAL_WORLD_SIZE", self.size))
        self.hosts = self.allgather_object(socket.gethostname())
        self._heartbeat = _Heartbeat(dist, self.rank, self.hosts, collective_timeout_s) if self.size > 1 else None

    def barrier(self) -> None:
        self.dist.barrier(group=self.group)

    def allgather_object(self, obj: Any) -> List[Any]:
        out: List[Any] = [None] * self.size
        self.dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast_object(self, obj: Any, root: int) -> Any:
        box = [obj]
        self.dist.broadcast_object_list(box, src=root, group=self.group)
        return box[0]

    def shutdown(self) -> None:
        # Gloo's worker thread drops its last reference to a finished collective just after the caller's
        # wait returned. If that frees a tensor Python owns while this thread holds the GIL destroying the
        # group (whose destructor joins that worker), both wait forever: a rank of a finished job hung
        # at exit once in ~25 2-rank torchrun jobs on torch 2.7 (py-spy: the main thread in
        # ~ProcessGroupGloo -> thread::join, the worker in ~AsyncAllgatherWork -> gil_scoped_acquire).
        # Sleeping releases the GIL so the worker finishes first; the group is then freed here.
        if self._heartbeat is not None and not self._heartbeat.stop():
            return  # a rank that stops alone (it failed): its groups are left to the process's exit, not joined
        time.sleep(0.2)
        group, self.group = self.group, None
        self.dist.destroy_process_group(group)
        del group
        if self.owns_process_group:
            self.dist.destroy_process_group()


class _Heartbeat:
    """A thread in every rank that takes part in an all-reduce on a group of its own every HEARTBEAT_S,
    each bounded by runtime.collective_timeout_s, whatever the rank's main thread is doing (scoring,
    or waiting in the job's last gather for the slowest rank). When one rank's host is cut off, every
    rank's next heartbeat fails within that timeout, and the rank ends with one line (exit 1); the
    finished parts stay for output.mode=resume.

    The value reduced is whether the rank is stopping (MIN): the heartbeats end in the round in which
    every rank stops, so no rank leaves the others waiting in a round it never joins.
    """

    def __init__(self, dist, rank: int, hosts: List[str], timeout_s: int):
        import torch

        self.dist, self.rank, self.hosts, self.timeout_s = dist, rank, hosts, timeout_s
        self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        self.stopping = threading.Event()
        self.flag = torch.zeros(1, dtype=torch.int32)
        self.thread = threading.Thread(target=self._beat, name="hvd_infer-heartbeat", daemon=True)
        self.thread.start()

    def _beat(self) -> None:
        while True:
            self.stopping.wait(HEARTBEAT_S)
            self.flag.fill_(1 if self.stopping.is_set() else 0)
            try:
                self.dist.all_reduce(self.flag, op=self.dist.ReduceOp.MIN, group=self.group)
            except Exception as e:  # noqa: BLE001 - Gloo's timeout or a closed connection: any is a lost rank
                if not self.stopping.is_set():
                    self._lost(e)
                return
            if int(self.flag.item()) == 1:
                return

    def _lost(self, error: BaseException) -> None:
        from hvd_infer.errors import ERROR_PREFIX, EXIT_FAILED

        others = ", ".join(f"{h} (rank {r})" for r, h in enumerate(self.hosts) if r != self.rank)
        reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        line = (f"lost contact with the other ranks: rank {self.rank} on {self.hosts[self.rank]} heard nothing from "
                f"{others} for {self.timeout_s} s (runtime.collective_timeout_s): a host is cut off or down ({reason}); "
                f"no _SUCCESS was written and the finished parts are kept: rerun with output.mode=resume")
        os.write(2, f"{ERROR_PREFIX}{line}\n".encode())  # not sys.stderr: the main thread may hold its lock
        os._exit(EXIT_FAILED)

    def stop(self) -> bool:
        """Stops this rank's heartbeats; True once every rank stopped (within two rounds), False if alone."""
        self.stopping.set()
        self.thread.join(timeout=2 * HEARTBEAT_S + 5)
        return not self.thread.is_alive()


@dataclass
class RankContext:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    device: Any = None  # torch.device
    threads: int = 1
    comm: Any = field(default=None, repr=False)  # _Horovod, _TorchDistributed, or None in a world of one

    @classmethod
    def create(cls, threads: int = 0, collective_timeout_s: int = RuntimeConfig.collective_timeout_s) -> "RankContext":
        import torch

        comm = (_Horovod(collective_timeout_s) if under_horovod_launcher()
                else _TorchDistributed(collective_timeout_s) if under_torchrun() else None)
        rank, size, local_rank, local_size = (comm.rank, comm.size, comm.local_rank, comm.local_size) if comm \
            else (0, 1, 0, 1)
        if torch.cuda.is_available():
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        # Each rank on a host gets its own slice of the cores: no oversubscription.
        n_threads = threads or max(1, cpu_cores() // local_size)
        torch.set_num_threads(n_threads)
        return cls(rank, size, local_rank, local_size, device, n_threads, comm)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.comm is not None:
            self.comm.barrier()

    def allgather_object(self, obj: Any) -> List[Any]:
        """obj from every rank, in rank order."""
        if self.comm is None:
            return [obj]
        return self.comm.allgather_object(obj)

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        if self.comm is None:
            return obj
        return self.comm.broadcast_object(obj, root)

    def agree(self, error: Optional[BaseException]) -> None:
        """Every rank raises if any rank failed, so no rank is left waiting in a collective.

        The error raised is the lowest failing rank's, so every rank reports the same line.
        """
        errors = self.allgather_object(None if error is None else _portable(error))
        for e in errors:
            if e is not None:
                e.all_ranks = True
                raise e

    def shutdown(self) -> None:
        if self.comm is not None:
            self.comm.shutdown()


def release_free_memory() -> None:
    """Give memory the allocator holds but no longer uses back to the OS (glibc only; else a no-op).

    Forward passes over batches of changing shapes free large blocks between small long-lived
    ones; glibc keeps those holes, and a rank's RSS grew ~2x over a long job (measured: 0.8 to
    1.7 GB per rank over 8,000 rows, MiniLM). The runner trims every 64 batches: peak 1.3 GB there.
    """
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes
        import ctypes.util

        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def _portable(error: BaseException) -> BaseException:
    try:
        pickle.dumps(error)
        return error
    except Exception:
        return RuntimeError(str(error))
