"""The rank context: who am I, on which device, and the few collectives the job needs.

The backend follows from how the process was started, and no other module knows which runs: Horovod under
a Horovod launcher (horovodrun, hvd-infer -np N, horovod.spark.run, HorovodRunner); torch.distributed over
Gloo under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set; also TorchDistributor); otherwise a world of one.
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
from hvd_infer.hardware import cpu_cores

_HOROVOD_VARS = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")

# torch.distributed's collectives time out after this: the job's last gather waits for the slowest rank's whole
# shard. A rank that dies closes its connections and the others fail at once; one cut off closes nothing, and
# _Heartbeat, every HEARTBEAT_S, ends the job within runtime.collective_timeout_s. (Under Horovod that timeout
# bounds each exchange of its background loop, which keeps talking to every rank.)
_COLLECTIVE_TIMEOUT = datetime.timedelta(days=1)
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


def idle_threads_sleep() -> None:
    """Make OpenMP threads sleep when idle instead of spinning (OMP_WAIT_POLICY=PASSIVE, unless set), which takes
    effect only before torch is first imported: spinning threads take the cores the loader needs (docs/speed.md)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


class _Horovod:
    """Collectives over horovod.torch."""

    def __init__(self, collective_timeout_s: int):
        # Gloo's wait for another rank in each exchange; hvd-infer -np passes the same to horovodrun.
        os.environ.setdefault("HOROVOD_GLOO_TIMEOUT_SECONDS", str(collective_timeout_s))
        # Ranks finish at different times; Horovod's stall warnings would be noise.
        os.environ.setdefault("HOROVOD_STALL_CHECK_DISABLE", "1")
        # Horovod's background thread negotiates every cycle, even idle (docs/speed.md); the job runs a handful
        # of collectives, none per batch, so a 20 ms cycle costs it well under a second.
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
        """Wait, asleep, until every rank has reached this collective: horovod.torch's own wait spins, taking a
        core from the ranks still working on this host (docs/speed.md)."""
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
        self._heartbeat = (_Heartbeat(dist, self.rank, self.hosts, collective_timeout_s) if self.size > 1
                           else None)

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
        # Gloo's worker thread may still be freeing a finished collective's tensor (it needs the GIL) while
        # destroying the group joins that worker with the GIL held: a deadlock at exit (torch 2.7,
        # docs/speed.md). Sleeping releases the GIL so the worker finishes first.
        if self._heartbeat is not None and not self._heartbeat.stop():
            return  # a rank that stops alone (it failed): its groups are left to the process's exit, not joined
        time.sleep(0.2)
        group, self.group = self.group, None
        self.dist.destroy_process_group(group)
        del group
        if self.owns_process_group:
            self.dist.destroy_process_group()


class _Heartbeat:
    """A thread in every rank that joins an all-reduce on its own group every HEARTBEAT_S, bounded by
    runtime.collective_timeout_s, whatever the main thread does. When a host is cut off, every rank's next
    heartbeat fails and the rank ends with one line (exit 1), the finished parts kept for output.mode=resume.
    The value reduced (MIN) is whether the rank is stopping: the heartbeats end in the round every rank stops in."""

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
                f"{others} for {self.timeout_s} s (runtime.collective_timeout_s): a host is cut off or down "
                f"({reason}); no _SUCCESS was written and the finished parts are kept: rerun with output.mode=resume")
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
        return [obj] if self.comm is None else self.comm.allgather_object(obj)

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        return obj if self.comm is None else self.comm.broadcast_object(obj, root)

    def agree(self, error: Optional[BaseException]) -> None:
        """Every rank raises the lowest failing rank's error, if any: no rank is left waiting in a collective,
        and every rank reports the same line."""
        errors = self.allgather_object(None if error is None else _portable(error))
        for e in errors:
            if e is not None:
                e.all_ranks = True
                raise e

    def shutdown(self) -> None:
        if self.comm is not None:
            self.comm.shutdown()


def release_free_memory() -> None:
    """Give memory the allocator holds but no longer uses back to the OS (glibc only; else a no-op): batches of
    changing shapes leave holes glibc keeps, and a rank's memory grows over a long job (docs/speed.md)."""
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
