"""The machine, the CPU other processes use meanwhile, and peak memory: what makes a figure trustworthy."""
from __future__ import annotations

import gc
import os
import platform
import resource
import subprocess
import threading
import time
from typing import Any, Dict, List, Optional

from benchmarks import REPO


def log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def machine() -> Dict[str, Any]:
    import torch
    import transformers

    from hvd_infer.hardware import cpu_facts

    return {**cpu_facts(),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "load_average_at_start": os.getloadavg()}


def _system_busy() -> float:
    """CPU-seconds the whole machine has spent busy since boot."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]  # idle + iowait
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu() -> float:
    """CPU-seconds of this process, its waited-for descendants and its live descendants."""
    import psutil

    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    total = s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime
    for p in psutil.Process().children(recursive=True):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class MemoryWatch:
    """Peak RSS (MB) of this process and of its descendants while a stage runs, polled every 0.2 s.

    Descendants report their kernel high-water mark (VmHWM), so a spike between polls is not
    missed; this process reports its polled VmRSS (its own VmHWM spans the whole benchmark).
    Horovod ranks (HOROVOD_RANK in their environment) are reported per rank.
    """

    def __init__(self, root_pid: Optional[int] = None, interval: float = 0.2):
        self.root_pid, self.interval = root_pid, interval
        self.self_mb = 0.0
        self.ranks: Dict[int, float] = {}
        self.others: Dict[str, float] = {}
        self._kind: Dict[int, Any] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def watch(self, pid: int) -> None:
        self.root_pid = pid

    def _classify(self, p) -> Any:
        # Only final answers are cached: horovodrun starts a rank as `sh -c ...`, which then execs
        # Python under the same pid.
        if p.pid in self._kind:
            return self._kind[p.pid]
        try:
            cmd, exe = " ".join(p.cmdline()), os.path.basename(p.exe())
            rank = p.environ().get("HOROVOD_RANK")
        except Exception:
            return None
        if rank is not None and "hvd_infer" in cmd and "python" in exe:
            kind = self._kind[p.pid] = int(rank)
        elif "java" in exe:
            kind = self._kind[p.pid] = "jvm"
        elif "python" in exe and ("pyspark" in cmd or "daemon" in cmd):
            kind = self._kind[p.pid] = "python worker"
        elif "python" in exe and "horovodrun" in cmd:
            kind = self._kind[p.pid] = "horovodrun"
        else:
            kind = "other"
        return kind

    def _poll(self) -> None:
        import psutil

        self.self_mb = max(self.self_mb, _status_kb(os.getpid(), "VmRSS") / 1024)
        roots = [psutil.Process()]
        if self.root_pid:
            try:
                roots.append(psutil.Process(self.root_pid))
            except psutil.Error:
                pass
        seen = set()
        for root in roots:
            try:
                procs = ([root] if root.pid != os.getpid() else []) + root.children(recursive=True)
            except psutil.Error:
                continue
            for p in procs:
                if p.pid in seen:
                    continue
                seen.add(p.pid)
                kind = self._classify(p)
                mb = max(_status_kb(p.pid, "VmHWM"), _status_kb(p.pid, "VmRSS")) / 1024
                if kind is None or mb == 0:
                    continue
                if isinstance(kind, int):
                    self.ranks[kind] = max(self.ranks.get(kind, 0.0), mb)
                else:
                    self.others[kind] = max(self.others.get(kind, 0.0), mb)

    def _loop(self) -> None:
        while True:
            self._poll()
            if self._stop.wait(self.interval):
                self._poll()
                return

    def peak_mb(self) -> float:
        """The largest single process: the figure that decides whether a job fits a machine."""
        return max([self.self_mb] + list(self.ranks.values()) + list(self.others.values()))


class Stage:
    """Times a stage and records the machine's load meanwhile."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        gc.collect()
        self.load_before = os.getloadavg()[0]
        self.busy0, self.own0, self.t0 = _system_busy(), _own_cpu(), time.perf_counter()
        self.mem = MemoryWatch().__enter__()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        self.mem.__exit__()
        busy, own = _system_busy() - self.busy0, _own_cpu() - self.own0
        self.own_cores = own / self.wall if self.wall else 0.0
        self.other_cores = max(0.0, (busy - own) / self.wall) if self.wall else 0.0


# ------------------------------------------------------------------------------------------------
# Data


def wait_quiet(limit: float, threshold: float = 0.3, window: float = 5.0, windows: int = 3) -> float:
    """Wait (at most `limit` s) until other processes use < `threshold` cores for `windows` windows in a row.

    Returns the seconds waited; on a shared machine this keeps others' test runs out of the figures.
    """
    t0, calm = time.perf_counter(), 0
    while time.perf_counter() - t0 < limit:
        b0, o0 = _system_busy(), _own_cpu()
        time.sleep(window)
        other = ((_system_busy() - b0) - (_own_cpu() - o0)) / window
        calm = calm + 1 if other < threshold else 0
        if calm >= windows:
            break
        log(f"waiting for a quiet machine: others use {other:.2f} cores")
    return time.perf_counter() - t0


def time_command(cmd: List[str], env: Optional[Dict[str, str]] = None, repeat: int = 2) -> float:
    """Best-of-`repeat` wall seconds of a command (the minimum is the least noisy on a shared machine)."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run(cmd, capture_output=True, env=dict(os.environ, **(env or {})), cwd=REPO)
        best = min(best, time.perf_counter() - t)
    return best


# ------------------------------------------------------------------------------------------------
# The run
