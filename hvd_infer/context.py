"""The rank context: who am I, on which device, and the few collectives the job needs.

Horovod is behind it when the process was started by a Horovod launcher
(horovodrun, horovod.spark.run, HorovodRunner); otherwise it is a world of one
without Horovod at all.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Any, List, Optional

import torch

_LAUNCHER_VARS = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def under_horovod_launcher() -> bool:
    return any(v in os.environ for v in _LAUNCHER_VARS)


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass
class RankContext:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    device: torch.device = torch.device("cpu")
    threads: int = 1
    hvd: Any = None  # horovod.torch, or None in a world of one
    _calls: int = 0

    def _name(self, op: str) -> str:
        # Horovod matches collectives across ranks by name; its default name is the
        # object's type, which differs when ranks pass different things (None vs a value).
        self._calls += 1
        return f"hvd_infer.{op}.{self._calls}"

    @classmethod
    def create(cls, threads: int = 0) -> "RankContext":
        hvd = None
        rank = size = local_rank = local_size = None
        if under_horovod_launcher():
            # Ranks finish at different times; Horovod's stall warnings would be noise.
            os.environ.setdefault("HOROVOD_STALL_CHECK_DISABLE", "1")
            # Horovod's background thread negotiates with the other ranks every cycle, even with
            # nothing to reduce: at its default cycle an idle rank burns half a core (measured,
            # Gloo, 2 ranks). The job runs a handful of collectives, none per batch, so a 20 ms
            # cycle costs well under a second per job and gives those cycles back to the model.
            os.environ.setdefault("HOROVOD_CYCLE_TIME", "20")
            import horovod.torch as hvd

            hvd.init()
            rank, size, local_rank, local_size = hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size()
        else:
            rank, size, local_rank, local_size = 0, 1, 0, 1
        if torch.cuda.is_available():
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        # Each rank on a host gets its own slice of the cores: no oversubscription.
        n_threads = threads or max(1, cpu_cores() // local_size)
        torch.set_num_threads(n_threads)
        return cls(rank, size, local_rank, local_size, device, n_threads, hvd)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.hvd is not None:
            self.hvd.barrier()

    def allgather_object(self, obj: Any) -> List[Any]:
        """obj from every rank, in rank order."""
        if self.hvd is None:
            return [obj]
        return self.hvd.allgather_object(obj, name=self._name("allgather"))

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        if self.hvd is None:
            return obj
        return self.hvd.broadcast_object(obj, root_rank=root, name=self._name("broadcast"))

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
        if self.hvd is not None:
            self.hvd.shutdown()


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
