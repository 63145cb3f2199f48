"""Test hosts on this machine: a cluster to run ranks across, as CI can make one.

Each host is a network namespace with its own address on a bridge, its own hostname (a UTS
namespace) and its own sshd; all share this machine's file system, as cluster nodes share NFS or
DBFS. The driver (the test process, in the root namespace) reaches them at their names through
/etc/hosts, as DNS would give them; each host reads its own hosts file (/etc/netns/NAME/hosts,
which `ip netns exec` mounts over /etc/hosts for what it starts), so a host can be made that
cannot resolve the others' names, as on a fresh cluster.

    hvdh1, hvdh2   10.219.0.11-12   resolve every host's name
    hvdh3          10.219.0.13      resolves none: its own name neither (Gloo fails there)
    hvdh9          10.219.0.19      a name the driver resolves, at an address nothing answers

Traffic goes only between these addresses and the bridge's (10.219.0.1, the driver). Everything
is made by `up` and removed by `down`, which also clears what a crashed run left behind (names,
links, namespaces, /etc/hosts lines, known_hosts entries). Needs root; installs Debian's
openssh-server and iproute2 when missing.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import pytest

NET = "10.219.0"
# The bridge, and each host's interface onto it, by one name: Horovod finds the interface that every
# host and the driver share by name, and reaches the driver at that interface's address.
NIC = "hvdnet0"
DRIVER_ADDRESS = f"{NET}.1"
# Marks the lines this module adds to /etc/hosts, to remove exactly those.
MARK = "# hvd_infer test host"
SSHD = "/usr/sbin/sshd"
KNOWN_HOSTS = os.path.expanduser("~/.ssh/known_hosts")


@dataclass
class Host:
    name: str
    address: str
    resolves_names: bool = True  # False: its own hosts file lists no host (not even itself)

    @property
    def netns(self) -> str:
        return self.name

    @property
    def veth(self) -> str:  # the driver's end of its link
        return f"{self.name}v"


HOSTS = [Host("hvdh1", f"{NET}.11"), Host("hvdh2", f"{NET}.12"),
         Host("hvdh3", f"{NET}.13", resolves_names=False)]
UNREACHABLE = Host("hvdh9", f"{NET}.19")  # in the driver's /etc/hosts only: no namespace, nothing answers


class Cluster:
    """The hosts, once up: ssh into them, kill what runs there, cut and mend their links."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.identity = os.path.join(workdir, "id_ed25519")
        self.hosts: Dict[str, Host] = {h.name: h for h in HOSTS}
        self.sshd: Dict[str, subprocess.Popen] = {}

    def ssh(self, host: str, command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(["ssh", "-i", self.identity, "-o", "BatchMode=yes", host, command],
                              capture_output=True, text=True, timeout=timeout)

    def kill_all(self, host: str) -> List[int]:
        """SIGKILL every process of the host but its sshd daemon, as if it crashed: its sessions end."""
        daemon = self.sshd[host].pid
        pids = [p for p in _netns_pids(host) if p != daemon]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def processes(self, host: str, marker: str) -> List[int]:
        """Pids on the host whose command line holds marker."""
        out = []
        for pid in _netns_pids(host):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        out.append(pid)
            except OSError:
                pass
        return out

    def link(self, host: str, up: bool) -> None:
        """Cut (or mend) the host's only link: its packets go nowhere, no connection is closed."""
        _run(["ip", "link", "set", self.hosts[host].veth, "up" if up else "down"])

    def start_sshd(self, host: Host) -> None:
        conf = os.path.join(self.workdir, f"sshd-{host.name}.conf")
        pidfile = os.path.join(self.workdir, f"sshd-{host.name}.pid")
        if os.path.exists(pidfile):  # sshd creates it before it writes the pid: a fresh one each start
            os.remove(pidfile)
        with open(conf, "w") as f:
            f.write(f"ListenAddress {host.address}\nHostKey {self.workdir}/host_key\n"
                    f"AuthorizedKeysFile {self.workdir}/authorized_keys\nPidFile {pidfile}\n"
                    "UsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
                    # Many ssh sessions start at once when ranks start; sshd's default drops some.
                    "MaxStartups 100\nAcceptEnv *\n")
        os.makedirs("/run/sshd", exist_ok=True)
        with open(os.path.join(self.workdir, f"sshd-{host.name}.log"), "a") as log:
            self.sshd[host.name] = self.popen_on(host.name, [SSHD, "-D", "-e", "-f", conf], stdout=log,
                                                 stderr=subprocess.STDOUT)
        _wait_port(host.address, 22, f"sshd on {host.name}")

    def popen_on(self, host: str, cmd: List[str], **kwargs) -> subprocess.Popen:
        """Start cmd on the host (its network, hostname and hosts file), in a session of its own."""
        return subprocess.Popen(["ip", "netns", "exec", self.hosts[host].netns, "unshare", "--uts", "sh", "-c",
                                 f'hostname {host} && exec "$@"', "sh"] + cmd, start_new_session=True, **kwargs)


def _run(cmd: List[str], check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def _netns_pids(netns: str) -> List[int]:
    r = _run(["ip", "netns", "pids", netns], check=False)
    return [int(p) for p in r.stdout.split()]


def _wait_port(address: str, port: int, what: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            socket.create_connection((address, port), timeout=2).close()
            return
        except OSError:
            if time.time() > deadline:
                raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.2)


def unavailable() -> Optional[str]:
    """Why test hosts cannot be made here, or None; installs what they need first (CI starts on a fresh machine)."""
    if os.geteuid() != 0:
        return "test hosts need root (network namespaces, /etc/hosts, sshd)"
    _install()
    r = subprocess.run(["ip", "netns", "add", "hvdprobe"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"no network namespaces here: ip netns add: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", "hvdprobe"], capture_output=True)
    return None


def _install() -> None:
    """Debian's openssh-server and iproute2, once per machine."""
    if os.path.exists(SSHD) and all(shutil.which(t) for t in ("ssh", "ssh-keygen", "ip", "unshare")):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if shutil.which("apt-get") is None:
        raise RuntimeError("test hosts need openssh-server and iproute2, and there is no apt-get here to install them")
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "openssh-server", "iproute2"]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr[-2000:]}")


def up(workdir: str) -> Cluster:
    down()
    cluster = Cluster(workdir)
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", cluster.identity])
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", os.path.join(workdir, "host_key")])
    shutil.copy(cluster.identity + ".pub", os.path.join(workdir, "authorized_keys"))
    _run(["ip", "link", "add", NIC, "type", "bridge"])
    _run(["ip", "addr", "add", f"{DRIVER_ADDRESS}/24", "dev", NIC])
    _run(["ip", "link", "set", NIC, "up"])
    every = "".join(f"{h.address} {h.name}\n" for h in HOSTS + [UNREACHABLE])
    for h in HOSTS:
        _run(["ip", "netns", "add", h.netns])
        _run(["ip", "link", "add", h.veth, "type", "veth", "peer", "name", NIC, "netns", h.netns])
        _run(["ip", "link", "set", h.veth, "master", NIC, "up"])
        _run(["ip", "-n", h.netns, "addr", "add", f"{h.address}/24", "dev", NIC])
        _run(["ip", "-n", h.netns, "link", "set", NIC, "up"])
        _run(["ip", "-n", h.netns, "link", "set", "lo", "up"])
        os.makedirs(f"/etc/netns/{h.netns}", exist_ok=True)
        with open(f"/etc/netns/{h.netns}/hosts", "w") as f:
            f.write("127.0.0.1 localhost\n" + (every if h.resolves_names else ""))
    with open("/etc/hosts", "a") as f:
        f.write("".join(f"{h.address} {h.name} {MARK}\n" for h in HOSTS + [UNREACHABLE]))
    # The driver knows the hosts' key: no "Permanently added" line in any rank's output.
    with open(os.path.join(workdir, "host_key.pub")) as f:
        key = " ".join(f.read().split()[:2])
    os.makedirs(os.path.dirname(KNOWN_HOSTS), mode=0o700, exist_ok=True)
    with open(KNOWN_HOSTS, "a") as f:
        f.write("".join(f"{h.name},{h.address} {key}\n" for h in HOSTS))
    for h in HOSTS:
        cluster.start_sshd(h)
    return cluster


def down() -> None:
    """Remove every trace of test hosts, this run's or a crashed one's; safe to call any time."""
    for h in HOSTS:
        if os.path.exists(f"/run/netns/{h.netns}"):
            for pid in _netns_pids(h.netns):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _run(["ip", "netns", "del", h.netns], check=False)
        _run(["ip", "link", "del", h.veth], check=False)
        shutil.rmtree(f"/etc/netns/{h.netns}", ignore_errors=True)
    _run(["ip", "link", "del", NIC], check=False)
    try:
        with open("/etc/hosts") as f:
            lines = f.readlines()
        kept = [l for l in lines if not l.rstrip().endswith(MARK)]
        if kept != lines:
            with open("/etc/hosts", "w") as f:  # in place: /etc/hosts may be a bind mount
                f.writelines(kept)
    except OSError:
        pass
    if os.path.exists(KNOWN_HOSTS) and shutil.which("ssh-keygen"):
        for h in HOSTS:
            for name in (h.name, h.address):
                _run(["ssh-keygen", "-R", name, "-f", KNOWN_HOSTS], check=False)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """The hosts, up for the session (shared by every test across hosts), always taken down."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    workdir = str(tmp_path_factory.mktemp("hosts"))
    try:
        yield up(workdir)
    finally:
        down()
