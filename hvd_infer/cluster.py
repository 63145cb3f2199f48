"""The hosts of `hvd-infer -np N -H ...`: which ranks each runs, checked over ssh before any rank starts.

    hosts = Cluster.of(args)                 # from -H or -hostfile, ranks assigned as horovodrun does
    hosts.check(cfg)                         # each other host, once, in parallel; raises ClusterError
    hosts.silent()                           # after a failure: the hosts that no longer answer

What a rank on another host needs and horovodrun does not check: the same Python and hvd_infer at the
same path, the input, model and output at the same paths, the hosts' names resolvable there, and a
tracking store every rank can write to. A failure is one line naming the host, what is wrong and the fix.
"""
from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from hvd_infer.config import JobConfig
from hvd_infer.errors import UserError

# horovodrun's own ssh options (horovod.runner.util.remote), so a host that passes here passes there;
# BatchMode: a host that asks for a password fails instead of waiting for one.
SSH_OPTIONS = ["-o", "PasswordAuthentication=no", "-o", "StrictHostKeyChecking=no", "-o", "BatchMode=yes"]
SSH_CONNECT_TIMEOUT_S = 10
# Starting Python and importing hvd_infer on a loaded host takes seconds; this bounds a hung one.
CHECK_TIMEOUT_S = 60
_REPORT = "hvd_infer-host-check: "


class ClusterError(UserError):
    """A host of -H cannot run its ranks; the message names the host, the problem and the fix."""


@dataclass
class Host:
    name: str
    ranks: List[int]


class Cluster:
    """The hosts given by -H or -hostfile, each with the ranks horovodrun starts there."""

    def __init__(self, hosts: List[Host], ssh_port: Optional[int], identity: Optional[str], nics: List[str]):
        self.hosts, self.ssh_port, self.identity, self.nics = hosts, ssh_port, identity, nics
        self.host_nics: Dict[str, List[str]] = {}  # each checked host's interfaces, by name

    @classmethod
    def of(cls, args) -> "Cluster":
        from horovod.runner.common.util import hosts as hvd_hosts

        spec = hvd_hosts.parse_host_files(args.hostfile) if args.hostfile else args.hosts or f"localhost:{args.np}"
        try:
            slots = hvd_hosts.get_host_assignments(hvd_hosts.parse_hosts(spec), args.np, args.np)
        except ValueError as e:  # more ranks than slots
            raise ClusterError(f"-np {args.np} on {spec}: {e}; give fewer ranks or more slots") from None
        ranks: Dict[str, List[int]] = {}
        for s in slots:
            ranks.setdefault(s.hostname, []).append(s.rank)
        return cls([Host(n, r) for n, r in ranks.items()], args.ssh_port, args.ssh_identity_file,
                   args.network_interface or [])

    @property
    def remote(self) -> List[Host]:
        return [h for h in self.hosts if not is_this_host(h.name)]

    def host_of(self, rank: int) -> Optional[Host]:
        return next((h for h in self.hosts if rank in h.ranks), None)

    def check(self, cfg: JobConfig) -> None:
        """Every other host, in parallel; raises ClusterError for one that fails, a host out of reach first."""
        remote = self.remote
        if not remote:
            return
        _check_tracking(cfg, remote)
        want = {"paths": _shared_paths(cfg), "nics": self.nics,
                # Without --network-interface Gloo connects ranks by the names of -H: every host must resolve them.
                "names": [] if self.nics else [h.name for h in self.hosts]}
        with ThreadPoolExecutor(len(remote)) as pool:
            problems = [p for p in pool.map(lambda h: self._check_host(h.name, dict(want, own=h.name)), remote) if p]
        if problems:  # out of reach first: the others' names for it may be right, it is not
            raise ClusterError(min(problems, key=lambda p: p[0])[1])

    def silent(self, timeout: float = 5.0) -> List[Host]:
        """The other hosts whose ssh port no longer answers (down, or cut from this one)."""
        def answers(host: Host) -> bool:
            try:
                socket.create_connection((host.name, self.ssh_port or 22), timeout=timeout).close()
                return True
            except OSError:
                return False

        remote = self.remote
        if not remote:
            return []
        with ThreadPoolExecutor(len(remote)) as pool:
            return [h for h, ok in zip(remote, pool.map(answers, remote)) if not ok]

    def _ssh_command(self, host: str, command: str) -> List[str]:
        return (["ssh"] + SSH_OPTIONS + ["-o", f"ConnectTimeout={SSH_CONNECT_TIMEOUT_S}", host]
                + (["-p", str(self.ssh_port)] if self.ssh_port else [])
                + (["-i", self.identity] if self.identity else []) + [command])

    def _check_host(self, host: str, want: dict) -> Optional[Tuple[int, str]]:
        """None, or (0 for a host out of reach else 1, the line that says what is wrong)."""
        # horovodrun passes this environment on to the ranks: PYTHONPATH decides which hvd_infer they import.
        pythonpath = f"PYTHONPATH={shlex.quote(os.environ['PYTHONPATH'])} " if os.environ.get("PYTHONPATH") else ""
        command = f"cd {shlex.quote(os.getcwd())} 2>/dev/null; {pythonpath}exec {shlex.quote(sys.executable)} -"
        script = _HOST_SCRIPT.replace("WANT", repr(json.dumps(want)))
        try:
            r = subprocess.run(self._ssh_command(host, command), input=script, capture_output=True, text=True,
                               timeout=CHECK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return 0, (f"host {host} did not answer within {CHECK_TIMEOUT_S} s over ssh: check that it is up and "
                       f"that `ssh {host} true` returns from here")
        report = next((l[len(_REPORT):] for l in r.stdout.splitlines() if l.startswith(_REPORT)), None)
        if r.returncode == 255 and report is None:
            said = next((l for l in reversed(r.stderr.splitlines()) if l.strip()), "no message")
            return 0, (f"host {host} cannot be reached over ssh ({said.strip()}): check the name, that sshd runs "
                       f"there and that `ssh {host}` works from here without a password (-i KEY, -p PORT)")
        if r.returncode == 127 or report is None:
            return 1, (f"host {host} cannot run {sys.executable} (exit {r.returncode}): ranks start with this "
                       "interpreter's path, so install the same Python environment at the same path on every host")
        got = json.loads(report)
        self.host_nics[host] = got["nics"]
        problem = _judge(host, got)
        return (1, problem) if problem else None

    def interface_for_one_host(self) -> Optional[str]:
        """The interface to name to horovodrun when all ranks run on one other host and none was given:
        horovodrun's probe of one host may pick its loopback, and Gloo then aborts. The first non-loopback
        interface both hosts have."""
        if self.nics or len(self.hosts) != 1 or not self.remote:
            return None
        here = {n for _, n in socket.if_nameindex()}
        return next((n for n in self.host_nics.get(self.hosts[0].name, []) if n in here and not n.startswith("lo")),
                    None)


def _judge(host: str, got: dict) -> Optional[str]:
    from hvd_infer.version import __version__

    here = (__version__, ".".join(map(str, sys.version_info[:3])))
    there = (got["hvd_infer"], ".".join(map(str, got["python"])))
    if got["hvd_infer"] is None:
        return (f"host {host} cannot import hvd_infer with {sys.executable} ({got['import_error']}): install "
                "hvd_infer there as here")
    if there != here:
        return (f"host {host} has hvd_infer {there[0]} on Python {there[1]}, this host hvd_infer {here[0]} on Python "
                f"{here[1]}: install the same versions on every host")
    if got["missing"]:
        return (f"host {host} does not see {', '.join(got['missing'])}: every host must see the input, the model and "
                "the output at the same path (a shared file system such as NFS or DBFS), or use an object store "
                "(s3://, gs://, abfss://)")
    if got["nics_missing"]:
        return (f"host {host} has no network interface {', '.join(got['nics_missing'])} (it has "
                f"{', '.join(got['nics'])}): give --network-interface an interface every host has")
    if got["own_unresolved"]:
        return (f"host {host} cannot resolve its own name {' nor '.join(got['own_unresolved'])}, which its ranks look "
                "up to find their address (with --network-interface too): add it to DNS or to that host's /etc/hosts")
    if got["unresolved"]:
        return (f"host {host} cannot resolve the host name{'s' if len(got['unresolved']) > 1 else ''} "
                f"{', '.join(got['unresolved'])}, which the ranks connect by: add every host to DNS or to each "
                "host's /etc/hosts, or give --network-interface NIC (an interface every host has)")
    return None


# Runs on each host, read from stdin by the interpreter the ranks will run; prints one line of JSON.
_HOST_SCRIPT = f"""
import json, os, socket, sys
want = json.loads(WANT)
got = {{"python": list(sys.version_info[:3]), "hvd_infer": None, "import_error": None}}
try:
    import hvd_infer
    got["hvd_infer"] = hvd_infer.__version__
except Exception as e:
    got["import_error"] = f"{{type(e).__name__}}: {{e}}"
got["missing"] = [p for p in want["paths"] if not os.path.exists(p)]
got["nics"] = [n for _, n in socket.if_nameindex()]
got["nics_missing"] = [n for n in want["nics"] if n not in got["nics"]]
def unresolved(names):
    out = []
    for name in names:
        try:
            socket.getaddrinfo(name, None)
        except OSError:
            out.append(name)
    return out
got["own_unresolved"] = unresolved(dict.fromkeys([want["own"], socket.gethostname()]))
got["unresolved"] = [n for n in unresolved(want["names"]) if n not in got["own_unresolved"]]
print({_REPORT!r} + json.dumps(got), flush=True)
"""


def _shared_paths(cfg: JobConfig) -> List[str]:
    """The job's paths on a file system (the config made them absolute) that every host must see: the input
    and model as given, the output or, before its first run, the directory it will be made in."""
    paths = []
    for path in (cfg.data.path, cfg.model.path):
        if os.path.isabs(path):
            # A glob's fixed part: the files it matches are checked here, the directory there.
            paths.append(path.split("*")[0].split("?")[0].split("[")[0].rstrip("/") or "/")
    out = cfg.output.path
    if os.path.isabs(out):
        while not os.path.exists(out) and os.path.dirname(out) != out:
            out = os.path.dirname(out)
        paths.append(out)
    return paths


# Tracking stores that are files on this host's disk: ranks elsewhere would write to files of their own.
_LOCAL_TRACKING = ("sqlite:", "file:", "/")


def _check_tracking(cfg: JobConfig, remote: List[Host]) -> None:
    uri = cfg.mlflow.tracking_uri or ""
    if cfg.mlflow.enabled and uri.startswith(_LOCAL_TRACKING):
        names = ", ".join(h.name for h in remote)
        raise ClusterError(
            f"mlflow.tracking_uri {uri} is a store on this host's disk, and every rank logs to it (live and system "
            f"metrics), also the ranks on {names}: start a tracking server here (mlflow server --host 0.0.0.0 "
            f"--port 5000 --backend-store-uri {uri}) and give mlflow.tracking_uri=http://{socket.gethostname()}:5000, "
            "or mlflow.enabled=false")


def is_this_host(name: str) -> bool:
    return name in ("localhost", "127.0.0.1", socket.gethostname(), socket.getfqdn())

