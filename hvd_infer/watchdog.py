"""No silent stall: a thread in each rank that ends the job when the rank stops making progress.

    watch = Watchdog(cfg, rank, fig, loader, tracker)   # from the start of scoring
    with watch.stage("the model", "its forward pass on a batch of 32 rows"):
        out = task.predict(model, batch)
    watch.stop()                                          # after the job's last collective

Progress is a batch scored or a part written (RankFigures.batches, .parts). After none for the limit
(runtime.stall_timeout_s), the watchdog prints ONE line naming the rank, the stuck stage and what it
waited for, writes every thread's stack to a file beside the output, marks the MLflow run failed, and
ends the process with os._exit (the stuck thread may be in a C call no exception reaches). Finished parts
stay for output.mode=resume.
"""
from __future__ import annotations

import contextlib
import faulthandler
import os
import tempfile
import threading
import time
from typing import Callable, Optional, Tuple, Union

from hvd_infer.errors import ERROR_PREFIX, EXIT_FAILED

# runtime.stall_timeout_s=auto: STALL_MINIMUM_S, or STALL_GAPS times the longest gap between two progress
# marks so far (slow batches, long writes) when that is longer.
STALL_MINIMUM_S = 600.0
STALL_GAPS = 10.0
COLLECTIVE = "a collective"  # the stage of a rank waiting for the others in the job's closing collectives
POLL_S = 1.0  # how often the watchdog looks


class Watchdog:
    def __init__(self, cfg, rank: int, fig, loader, tracker):
        self.setting: Union[float, str] = cfg.runtime.stall_timeout_s
        self.output_url, self.storage_options = cfg.output.path, cfg.output.storage_options
        self.rank, self.fig, self.loader, self.tracker = rank, fig, loader, tracker
        self.started = self.last_progress = time.monotonic()
        self.longest_gap = 0.0
        self.scoring_seconds: Optional[float] = None  # set when the rank's own share is done
        self._progress = (fig.batches, fig.parts)
        # (stage, what it waits for) as the caller marks them (Watchdog.stage)
        self._stage: Optional[Tuple[str, Union[str, Callable[[], str]]]] = None
        self._stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="hvd_infer-watchdog", daemon=True)
        self.thread.start()

    @contextlib.contextmanager
    def stage(self, name: str, waiting_for: Union[str, Callable[[], str]]):
        """The rank's main thread is in stage `name`, waiting for `waiting_for` (or what it returns) while inside."""
        outer, self._stage = self._stage, (name, waiting_for)
        try:
            yield
        finally:
            self._stage = outer

    def share_done(self) -> None:
        """The rank scored and wrote its whole share: from here it waits for the other ranks."""
        self.scoring_seconds = time.monotonic() - self.started

    def stop(self) -> None:
        self._stopped.set()
        self.thread.join(timeout=5)

    def limit(self, stage: str) -> float:
        """Seconds without progress after which the rank counts as stalled in `stage`."""
        base = max(STALL_MINIMUM_S, STALL_GAPS * self.longest_gap) if self.setting == "auto" else float(self.setting)
        if stage == COLLECTIVE and self.scoring_seconds is not None:
            # Other ranks may work as long as this one did, then stall: the stuck rank should be the one to report.
            return 2 * base + self.scoring_seconds
        return base

    def _watch(self) -> None:
        while not self._stopped.wait(POLL_S):
            now = time.monotonic()
            progress = (self.fig.batches, self.fig.parts)
            if progress != self._progress:
                self._progress = progress
                self.longest_gap = max(self.longest_gap, now - self.last_progress)
                self.last_progress = now
                continue
            stage, waiting_for = self.stuck()
            idle = now - self.last_progress
            if idle > self.limit(stage):
                self._fail(stage, waiting_for, idle)

    def stuck(self) -> Tuple[str, str]:
        """(the stage the rank is in, what it waits for) right now."""
        if self.loader.waiting:
            return self.loader.stuck()
        if self._stage is not None:
            name, waiting_for = self._stage
            return name, waiting_for() if callable(waiting_for) else waiting_for
        return "the model loop", "nothing it names (between batches)"

    def _fail(self, stage: str, waiting_for: str, idle: float) -> None:
        setting = (f"auto: {self.limit(stage):.0f} s" if self.setting == "auto" else f"{float(self.setting):g}")
        try:
            where = self._write_stacks(stage)
        except Exception as e:  # the line and the exit matter more
            where = f"not written ({type(e).__name__}: {e})"
        line = (f"rank {self.rank} stalled in {stage}: no batch scored and no part written for {idle:.0f} s "
                f"(runtime.stall_timeout_s={setting}); it waited for {waiting_for}. Stacks of its threads: {where}. "
                f"Finished parts are kept: rerun with output.mode=resume")
        os.write(2, f"{ERROR_PREFIX}{line}\n".encode())  # not sys.stderr: the stuck thread may hold its lock
        _bounded(lambda: self.tracker.fail(RuntimeError(line)), 15)
        os._exit(EXIT_FAILED)

    def _write_stacks(self, stage: str) -> str:
        """The rank's and its workers' stacks, to <output>.stalled-rank<N>.txt beside the output; its name."""
        with tempfile.TemporaryFile() as f:
            f.write(f"hvd_infer rank {self.rank} (pid {os.getpid()}), stalled in {stage}\n".encode())
            f.flush()
            faulthandler.dump_traceback(f.fileno(), all_threads=True)
            f.seek(0, os.SEEK_END)
            f.write(self.loader.worker_stacks().encode())
            f.seek(0)
            text = f.read()
        from hvd_infer.storage import Location

        url = self.output_url.rstrip("/")
        name = f"{os.path.basename(url) or 'output'}.stalled-rank{self.rank:05d}.txt"
        beside = Location(os.path.dirname(url) or ".", self.storage_options)
        if _bounded(lambda: beside.put(name, text), 30):
            return beside.url_of(name)
        fallback = os.path.join(tempfile.gettempdir(), name)  # the output's store did not take it in time
        with open(fallback, "wb") as f:
            f.write(text)
        return fallback


def _bounded(call, seconds: float) -> bool:
    """call() in a thread, waited for at most `seconds`: True when it returned without an error."""
    done = []

    def run() -> None:
        try:
            call()
            done.append(True)
        except Exception:
            pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    return bool(done)
