"""`hvd-infer -np N`: check the job once, here, then start N ranks through horovodrun.

    hvd-infer -np 4 --config job.yaml                                   # 4 ranks on this host
    hvd-infer -np 8 -H host1:4,host2:4 --network-interface eth0 --config job.yaml

Every cheap check a rank would run (config, input footers and columns, model directory against the task, output
mode and format) and every host of -H (hvd_infer.cluster, over ssh) are checked first, here, read-only: a bad job
fails in one line with exit code 2 before any rank starts. horovodrun then starts the ranks as a child process and
their output is relayed. A failed job ends with the failing rank's one-line error (else its exit code, or the host
that was lost) instead of horovodrun's traceback, and exits 2 for a user error, 1 otherwise.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

from hvd_infer.cluster import Cluster, Host, is_this_host
from hvd_infer.config import JobConfig
from hvd_infer.errors import ERROR_PREFIX, EXIT_FAILED, EXIT_USER_ERROR, UserError

# horovodrun's options a job needs, passed through as given.
_HOROVODRUN_OPTIONS: List[Tuple[Tuple[str, ...], dict]] = [
    (("-H", "--hosts"), dict(metavar="HOST:SLOTS,...", help="hosts and their slots, e.g. host1:4,host2:4 "
                                                            "(default localhost:NP)")),
    (("-hostfile", "--hostfile"), dict(metavar="FILE", help="a file of 'host slots=N' lines, instead of -H")),
    (("--network-interface",), dict(action="append", metavar="NIC",
                                    help="a network interface the ranks talk over (repeat for several)")),
    (("-p", "--ssh-port"), dict(type=int, metavar="PORT", help="ssh port on every host")),
    (("-i", "--ssh-identity-file"), dict(metavar="FILE", help="ssh private key for the hosts")),
    (("--start-timeout",), dict(type=int, metavar="SECONDS", help="time for horovodrun to start every rank")),
    (("--gloo-timeout-seconds",), dict(type=int, metavar="SECONDS", help="Horovod's Gloo timeout")),
    (("--output-filename",), dict(metavar="DIR", help="also write each rank's output to DIR/rank.N/")),
    (("--verbose",), dict(action="store_true", help="horovodrun's own messages")),
]

# How horovodrun (Gloo) tags what ranks print, and how it reports a rank that exited non-zero.
_RANK_LINE = re.compile(r"^\[(\d+)\]<(stdout|stderr)>:(.*)$")
_RANK_EXIT = re.compile(r"^Process (\d+) exit with status code (-?\d+)\.$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """-np and the horovodrun options, on the command line's parser."""
    group = parser.add_argument_group("launching ranks (hvd-infer -np N ...: check the job, then run horovodrun)")
    group.add_argument("-np", "--num-proc", dest="np", type=int, metavar="N",
                       help="start N ranks through horovodrun, after checking the job once here")
    for flags, kwargs in _HOROVODRUN_OPTIONS:
        group.add_argument(*flags, **kwargs)


def horovodrun_options(args: argparse.Namespace) -> List[str]:
    out: List[str] = []
    for flags, kwargs in _HOROVODRUN_OPTIONS:
        value = getattr(args, flags[-1].lstrip("-").replace("-", "_"))
        if value in (None, False):
            continue
        if value is True:
            out.append(flags[-1])
        else:
            for v in value if isinstance(value, list) else [value]:
                out += [flags[-1], str(v)]
    return out


def preflight(cfg: JobConfig, ranks_on_this_host: bool) -> None:
    """What every rank checks before reading data, once, here; raises UserError. Writes nothing."""
    from hvd_infer.dataset import open_input
    from hvd_infer.model import preflight_model
    from hvd_infer.reader import choose_reader
    from hvd_infer.tasks import get_task
    from hvd_infer.writer import check_output, job_identity, output_schema

    task = get_task(cfg.model.task)(cfg)
    choose_reader(cfg.data.reader)  # data.reader=petastorm where it cannot run
    if ranks_on_this_host:  # the ranks' devices are this host's: float16 without a GPU is refused now
        import torch

        from hvd_infer.engines import checked_spec
        from hvd_infer.hardware import this_platform

        checked_spec(cfg.model, this_platform("cuda" if torch.cuda.is_available() else "cpu"))
    inp = open_input(cfg.data)
    preflight_model(cfg, task)
    check_output(cfg, job_identity(cfg, inp.fingerprint()), output_schema(cfg, inp.schema, task))
    if cfg.mlflow.enabled:
        from hvd_infer.tracking import check_tracking_server

        check_tracking_server(cfg.mlflow.tracking_uri)


def _check_horovod(np_: int) -> None:
    """Runtimes since Databricks 16.0 ML have no horovod: say how to start ranks there."""
    if importlib.util.find_spec("horovod") is None:
        raise UserError(f"-np {np_} starts ranks through horovodrun, and horovod is not installed here; install it "
                        f"(pip install 'hvd_infer[horovod]') or start the ranks with torchrun: "
                        f"torchrun --nproc-per-node {np_} -m hvd_infer [--config FILE] [key=value ...]")


def ranks_on_this_host(args: argparse.Namespace) -> bool:
    return not args.hostfile and (not args.hosts or all(is_this_host(h.split(":")[0]) for h in args.hosts.split(",")))


# What ssh prints (as the rank's stderr) when the host ends its session: the host went down or its ranks were killed.
_SSH_CLOSED = re.compile(r"^Connection to \S+ closed by remote host\.$")
# A rank blocked in a collective when another rank failed raises this; it is a consequence, not a cause.
_HOROVOD_SHUT_DOWN = "Horovod has been shut down"
# What a traceback is made of, up to and between its exception lines.
_TRACEBACK_START = "Traceback (most recent call last):"
_TRACEBACK_CHAIN = ("During handling of the above exception", "The above exception was the direct cause")


@dataclass
class _Outcome:
    """What the ranks reported, in the order horovodrun relayed it."""
    errors: List[Tuple[int, str]] = field(default_factory=list)  # (rank, its one-line user error)
    exits: Dict[int, int] = field(default_factory=dict)  # rank -> non-zero exit code, first failure first
    horovodrun_lines: List[str] = field(default_factory=list)  # horovodrun's own output
    ssh_closed: List[int] = field(default_factory=list)  # ranks whose ssh session the remote host closed


def launch(cfg: JobConfig, args: argparse.Namespace, rank_argv: List[str]) -> int:
    """Check the job and every host, then run it on args.np ranks; returns the exit code for the command line."""
    try:
        _check_horovod(args.np)
        preflight(cfg, ranks_on_this_host(args))
        cluster = Cluster.of(args)
        cluster.check(cfg)
    except UserError as e:
        print(f"{ERROR_PREFIX}{e}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    cmd = [sys.executable, "-m", "horovod.runner.launch", "-np", str(args.np)] + horovodrun_options(args)
    if cluster.remote:
        # horovodrun caches hosts' shared interfaces for an hour: after a change, a stale one makes Gloo abort.
        cmd.append("--disable-cache")
    nic = cluster.interface_for_one_host()
    if nic:
        cmd += ["--network-interface", nic]
    cmd += [sys.executable, "-m", "hvd_infer"] + rank_argv
    # horovodrun passes the environment on to every rank; --gloo-timeout-seconds, when given, overrides this.
    env = dict(os.environ, HOROVOD_GLOO_TIMEOUT_SECONDS=str(cfg.runtime.collective_timeout_s))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            errors="replace", env=env)
    watch = _HostWatch(cluster, cfg.runtime.collective_timeout_s, proc)
    relay = _Relay()
    try:
        for line in proc.stdout:
            relay.line(line.rstrip("\n"))
        code = proc.wait()
    except KeyboardInterrupt:  # horovodrun got the same SIGINT and stops the ranks: wait for it
        proc.wait()
        return 128 + signal.SIGINT
    finally:
        watch.stop()
    relay.close()
    return _verdict(code, relay.outcome, cluster, watch.lost)


class _HostWatch:
    """While the ranks run, asks every other host every few seconds whether it still answers; one that has
    been silent for runtime.collective_timeout_s (down, or its network cut) ends the job. A rank cut off that
    way can wait in a socket read that no timeout of its own ends, and so can horovodrun's ssh to it."""

    EVERY_S = 5.0

    def __init__(self, cluster: Cluster, timeout_s: int, proc: subprocess.Popen):
        self.cluster, self.timeout_s, self.proc = cluster, timeout_s, proc
        self.lost: List[Tuple[Host, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="hvd_infer-host-watch", daemon=True)
        if cluster.remote:
            self._thread.start()

    def _loop(self) -> None:
        silent_since: Dict[str, float] = {}
        while not self._stop.wait(self.EVERY_S):
            now = time.monotonic()
            silent = {h.name: h for h in self.cluster.silent()}
            silent_since = {n: silent_since.get(n, now) for n in silent}
            gone = [h for n, h in silent.items() if now - silent_since[n] >= self.timeout_s]
            if gone:
                self.lost = [(h, f"it has not answered for {self.timeout_s} s (runtime.collective_timeout_s)")
                             for h in gone]
                self.proc.terminate()  # horovodrun stops every rank it can still reach
                return

    def stop(self) -> None:
        self._stop.set()


class _Relay:
    """Prints what ranks print, without horovodrun's tags; keeps back what the verdict decides on:
    user errors, exit reports, and tracebacks of ranks that only saw another rank fail."""

    def __init__(self):
        self.outcome = _Outcome()
        self.tracebacks: Dict[int, Tuple[str, List[str], bool]] = {}  # rank -> (stream, lines, ended)

    def line(self, line: str) -> None:
        if m := _RANK_LINE.match(line):
            self._rank_line(int(m.group(1)), m.group(2), m.group(3))
        elif m := _RANK_EXIT.match(line):
            self.outcome.exits.setdefault(int(m.group(1)), int(m.group(2)))
        else:
            self.outcome.horovodrun_lines.append(line)

    def close(self) -> None:
        for rank in list(self.tracebacks):
            self._end_traceback(rank)

    def _rank_line(self, rank: int, stream: str, text: str) -> None:
        if rank in self.tracebacks:
            _, lines, ended = self.tracebacks[rank]
            continues = text == "" or text.startswith((" ", _TRACEBACK_START) + _TRACEBACK_CHAIN)
            if not ended or continues:
                lines.append(text)
                # The exception line ends it, unless a chained traceback follows.
                self.tracebacks[rank] = (stream, lines, not continues)
                return
            self._end_traceback(rank)
        if _SSH_CLOSED.match(text):
            self.outcome.ssh_closed.append(rank)  # told by the verdict, naming the host
        elif text.startswith(ERROR_PREFIX):
            self.outcome.errors.append((rank, text[len(ERROR_PREFIX):]))  # printed once, by the verdict
        elif text == _TRACEBACK_START:
            self.tracebacks[rank] = (stream, [text], False)
        elif text != "Terminated":  # the shell's word for a rank horovodrun stopped
            self._print(rank, stream, text)

    def _end_traceback(self, rank: int) -> None:
        stream, lines, _ = self.tracebacks.pop(rank)
        if not any(_HOROVOD_SHUT_DOWN in l for l in lines if not l.startswith(" ")):
            for text in lines:
                self._print(rank, stream, text)

    @staticmethod
    def _print(rank: int, stream: str, text: str) -> None:
        # Rank 0 prints the summary: as is. Other ranks' lines keep their rank; a blank one (ssh ends its
        # "Connection ... closed" with one) would be a bare tag.
        if rank != 0 and not text.strip():
            return
        print(text if rank == 0 else f"[rank {rank}] {text}", file=sys.stdout if stream == "stdout" else sys.stderr,
              flush=True)


def _verdict(code: int, outcome: _Outcome, cluster: Cluster, lost: List[Tuple[Host, str]]) -> int:
    if code == 0:
        for line in outcome.horovodrun_lines:
            print(line, file=sys.stderr)
        return 0
    if outcome.errors:
        rank, message = _first_error(outcome)
        print(f"{ERROR_PREFIX}{message}", file=sys.stderr, flush=True)
        # Rank 0 alone prints a user error all ranks agree on, and horovodrun may stop it (143) once another rank
        # exits 2: the first exit reported tells the kind too, and alone for a rank whose exit went unreported.
        first_code = next(iter(outcome.exits.values()), EXIT_USER_ERROR)
        user = EXIT_USER_ERROR in (outcome.exits.get(rank, first_code), first_code)
        return EXIT_USER_ERROR if user else EXIT_FAILED
    lost = lost or _lost_hosts(cluster, outcome)
    if lost:
        stopped = "the other ranks were stopped and no _SUCCESS was written; the finished parts are kept"
        for host, why in lost:
            ranks = ", ".join(map(str, host.ranks))
            print(f"hvd_infer: lost contact with host {host.name} (rank{'s' if len(host.ranks) > 1 else ''} {ranks}): "
                  f"{why}; {stopped}: rerun with output.mode=resume once it is back, or with -H naming only the "
                  "hosts that remain", file=sys.stderr, flush=True)
        return EXIT_FAILED
    if outcome.exits:
        rank, rank_code = next(iter(outcome.exits.items()))
        print(f"hvd_infer: rank {rank} failed with exit code {rank_code}{_signal_note(rank_code)}; the other ranks "
              "were stopped and no _SUCCESS was written (rerun with output.mode=resume to keep the finished parts)",
              file=sys.stderr, flush=True)
        return EXIT_FAILED
    # horovodrun itself failed (a host it cannot reach, a bad option): its own words.
    for line in outcome.horovodrun_lines:
        print(line, file=sys.stderr)
    return code if code > 0 else EXIT_FAILED


def _lost_hosts(cluster: Cluster, outcome: _Outcome) -> List[Tuple[Host, str]]:
    """The hosts that ended their ranks' ssh sessions, else the hosts that no longer answer at all."""
    closed = []
    for rank in outcome.ssh_closed:
        host = cluster.host_of(rank)
        if host is not None and host not in closed:
            closed.append(host)
    if closed:
        return [(h, "its ssh session was closed (the host went down, or its ranks were killed)") for h in closed]
    return [(h, "it does not answer on its ssh port") for h in cluster.silent()] if outcome.exits else []


def _first_error(outcome: _Outcome) -> Tuple[int, str]:
    """The error of the rank that failed first; any rank's error when none of them exited yet."""
    return next(((r, message) for rank in outcome.exits for r, message in outcome.errors if r == rank),
                outcome.errors[0])


def _signal_note(code: int) -> str:
    # horovodrun reports a rank killed by signal N as 128 + N, as shells do.
    if code > 128:
        try:
            return f" (killed by {signal.Signals(code - 128).name})"
        except ValueError:
            pass
    return ""

