"""Jobs across hosts (tests/hosts.py: namespaces with their own address, hostname and sshd, one file system).

Each launcher's job across two hosts equals the one-host run row for row; the launcher's checks fail
in one line before any rank starts; a host lost mid-job is named, and the job resumes exactly once,
with the host back or on fewer hosts.
"""
import os
import signal
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from conftest import (REPO, _master_state, assert_same_predictions, cli, free_port, job, job_args, mlflow_server,
                      python_m, read_output, spark_session, start_then_fault, stop_spark_cluster, wait_for)
from hosts import DRIVER_ADDRESS, NIC

pytestmark = pytest.mark.slow


def across_args(cluster, hosts, args, mlflow=False):
    """hvd-infer's arguments for -np N -H hosts ... with the test hosts' ssh key; MLflow off unless asked for."""
    np_ = sum(int(h.split(":")[1]) for h in hosts.split(","))
    return (["-np", str(np_), "-H", hosts, "-i", cluster.identity] + list(args)
            + ([] if mlflow else ["mlflow.enabled=false"]))


def across(cluster, hosts, args, mlflow=False):
    """hvd-infer -np N -H hosts ...: its ranks on the test hosts."""
    return python_m(across_args(cluster, hosts, args, mlflow))


def refused(cluster, hosts, args, mlflow=False):
    """hvd-infer -np N -H hosts ... for a job its checks refuse: in this process (cli), as no rank starts; the
    checks of the hosts still run over ssh."""
    return cli(across_args(cluster, hosts, args, mlflow))


def the_line(r):
    """The one line of output, asserting there is just one."""
    lines = [l for l in (r.stdout + r.stderr).splitlines() if l.strip()]
    assert len(lines) == 1, lines[-30:]
    return lines[0]


def test_hvd_infer_across_two_hosts_equals_one_host(cluster, horovodrun_reference, tiny_classifier, dataset, tmp_path):
    out = tmp_path / "out"
    r = across(cluster, "hvdh1:1,hvdh2:1", job_args(tiny_classifier, dataset[0], out, tmp_path))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert_same_predictions(read_output(out), horovodrun_reference, atol=1e-6)
    assert (out / "_SUCCESS").exists()
    hosts = [l.split()[1] for l in r.stdout.splitlines() if l.split()[:1] in (["0"], ["1"])]
    assert hosts == ["hvdh1", "hvdh2"], r.stdout  # the summary's rank rows: each rank ran on its host


def test_hostfile_and_horovodrun_across_hosts(cluster, horovodrun_reference, tiny_classifier, dataset, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("hvdh1 slots=1\nhvdh2 slots=1\n")
    out = tmp_path / "out"
    r = python_m(["-np", "2", "-hostfile", str(hostfile), "-i", cluster.identity]
                 + job_args(tiny_classifier, dataset[0], out, tmp_path, "mlflow.enabled=false"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert_same_predictions(read_output(out), horovodrun_reference, atol=1e-6)

    out = tmp_path / "out-horovodrun"
    exe = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    r = subprocess.run([exe, "-np", "2", "-H", "hvdh1:1,hvdh2:1", "-i", cluster.identity, "--disable-cache",
                        sys.executable, "-m", "hvd_infer"]
                       + job_args(tiny_classifier, dataset[0], out, tmp_path, "mlflow.enabled=false"),
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert_same_predictions(read_output(out), horovodrun_reference, atol=1e-6)


def torchrun_node(cluster, host, node_rank, port, args):
    """The ssh command that starts `torchrun --nnodes 2` node node_rank on host (rendezvous on hvdh1:port)."""
    env = " ".join(f"{k}={v}" for k, v in [("PYTHONPATH", os.environ.get("PYTHONPATH", "")), ("HF_HUB_OFFLINE", "1"),
                                           ("TRANSFORMERS_OFFLINE", "1"), ("GLOO_SOCKET_IFNAME", NIC)])
    command = (f"cd {REPO} && env {env} {sys.executable} -m torch.distributed.run --nnodes 2 --node-rank {node_rank} "
               f"--nproc-per-node 1 --master-addr hvdh1 --master-port {port} -m hvd_infer "
               + " ".join(str(a) for a in args))
    return ["ssh", "-i", cluster.identity, "-o", "BatchMode=yes", host, command]


def torchrun_across(cluster, args):
    """torchrun --nnodes 2 with a node on each of hvdh1 and hvdh2: [(exit code, output)] of each node."""
    port = free_port()
    nodes = [subprocess.Popen(torchrun_node(cluster, host, rank, port, args), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank, host in enumerate(("hvdh1", "hvdh2"))]
    try:
        outputs = [n.communicate(timeout=600)[0] for n in nodes]
        return [(n.returncode, output) for n, output in zip(nodes, outputs)]
    finally:
        for n in nodes:
            if n.poll() is None:
                n.kill()


def test_torchrun_two_nodes_equals_one_host(cluster, horovodrun_reference, tiny_classifier, dataset, tmp_path):
    out = tmp_path / "out"
    nodes = torchrun_across(cluster, job_args(tiny_classifier, dataset[0], out, tmp_path, "mlflow.enabled=false"))
    assert [code for code, _ in nodes] == [0, 0], nodes[0][1][-3000:] + nodes[1][1][-3000:]
    assert_same_predictions(read_output(out), horovodrun_reference, atol=1e-6)
    assert (out / "_SUCCESS").exists()


def test_cluster_checked_before_any_rank_starts(cluster, tiny_classifier, dataset, tmp_path):
    out = tmp_path / "out"
    job = job_args(tiny_classifier, dataset[0], out, tmp_path)
    cases = [
        # hvdh3 resolves no host name, not even its own: its rank would die there in C++, without a word.
        ("hvdh1:1,hvdh3:1", [], ["host hvdh3 cannot resolve its own name hvdh3", "/etc/hosts"]),
        ("hvdh1:1,hvdh3:1", [f"--network-interface={NIC}"], ["host hvdh3 cannot resolve its own name hvdh3"]),
        # Nothing answers at hvdh9's address.
        ("hvdh1:1,hvdh9:1", [], ["host hvdh9 cannot be reached over ssh", "No route to host"]),
        ("hvdh1:1,hvdh2:1", ["--network-interface=eth9"], ["host hvdh1 has no network interface eth9"]),
    ]
    for hosts, extra, fragments in cases:
        r = refused(cluster, hosts, extra + job)
        line = the_line(r)
        assert r.returncode == 2 and line.startswith("hvd_infer: error: "), (r.returncode, line)
        for f in fragments:
            assert f in line, line
        assert not out.exists()  # no rank started
    # A tracking store on this host's disk, which the other hosts' ranks would log to: refused, naming the fix.
    r = refused(cluster, "hvdh1:1,hvdh2:1", job, mlflow=True)
    assert r.returncode == 2 and "is a store on this host's disk" in the_line(r) and "mlflow server" in the_line(r)
    assert not out.exists() and not (tmp_path / "mlflow.db").exists()


def test_tracking_server_on_the_driver_used_by_ranks_on_two_hosts(cluster, tiny_classifier, dataset, tmp_path):
    from test_mlflow_server import history, only_run

    with mlflow_server(tmp_path, host=DRIVER_ADDRESS) as url:
        r = across(cluster, "hvdh1:1,hvdh2:1", job_args(tiny_classifier, dataset[0], tmp_path / "out", tmp_path,
                                                         f"mlflow.tracking_uri={url}", "mlflow.experiment=cluster",
                                                         "mlflow.log_every_s=0.5"), mlflow=True)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        api = url + "/api/2.0/mlflow"
        run = only_run(api, "cluster")
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        assert run["info"]["status"] == "FINISHED" and metrics["rows"] == dataset[1].num_rows
        for rank in (0, 1):  # each host's rank logged its own live and system metrics to the server
            assert history(api, run["info"]["run_id"], f"rows_done/rank_{rank}")[-1]["value"] == \
                metrics[f"rank_{rank}_rows"] > 0
            assert f"system/rank_{rank}/cpu_utilization_percentage" in metrics


def start_then(cluster, hosts, args, out, fault):
    """Start hvd-infer across hosts; once rank 1 wrote 3 parts, call fault(); returns (exit code, seconds from the
    fault to the exit, output)."""
    cmd = [sys.executable, "-m", "hvd_infer", "-np", "2", "-H", hosts, "-i", cluster.identity] + args + [
        "mlflow.enabled=false"]
    return start_then_fault(cmd, out, fault, timeout=300)


def parts(out):
    return {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out) if n.startswith("part-")}


def assert_resumed(out, table, reference):
    """Every row exactly once, and the whole output what the job gives uninterrupted (minilm_reference)."""
    got = pq.read_table(str(out), columns=["id"]).column("id").to_pylist()
    assert sorted(got) == sorted(table.column("id").to_pylist())
    assert_same_predictions(read_output(out), reference, atol=1e-5)


def test_lost_host_is_named_then_resumed_on_the_host_that_remains(cluster, minilm_job, minilm_reference, tmp_path):
    model, data, table = minilm_job
    out = tmp_path / "out"
    args = job_args(model, data, out, tmp_path, "output.rows_per_part=8")
    code, seconds, output = start_then(cluster, "hvdh1:1,hvdh2:1", args, out, lambda: cluster.kill_all("hvdh2"))
    assert code == 1 and seconds < 60, (code, seconds, output[-3000:])
    last = output.strip().splitlines()[-1]
    assert last.startswith("hvd_infer: lost contact with host hvdh2 (rank 1): its ssh session was closed"), last
    assert "[rank 1]" not in [l.strip() for l in output.splitlines()], output[-3000:]  # no bare tag
    assert "output.mode=resume" in last and "Traceback" not in output
    assert not (out / "_SUCCESS").exists()
    before = parts(out)

    r = across(cluster, "hvdh1:1", args + ["output.mode=resume"])  # a world of one, on the host that remains
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert_resumed(out, table, minilm_reference)
    assert all(parts(out)[n] == t for n, t in before.items())  # the finished parts were kept, not redone


def reboot_after_cut(cluster, out):
    """hvdh2's link back up, and the job's ranks gone from both hosts, as after a reboot: the launcher could no
    longer reach the ranks beyond the cut."""
    for host in ("hvdh1", "hvdh2"):
        for pid in cluster.processes(host, str(out)):
            os.kill(pid, signal.SIGKILL)
    cluster.link("hvdh2", True)


def test_cut_network_ends_the_job_within_the_timeout_then_resumed_with_the_host_back(cluster, minilm_job,
                                                                                   minilm_reference, tmp_path):
    model, data, table = minilm_job
    out = tmp_path / "out"
    timeout_s = 10
    args = job_args(model, data, out, tmp_path, "output.rows_per_part=8", f"runtime.collective_timeout_s={timeout_s}")
    try:
        code, seconds, output = start_then(cluster, "hvdh1:1,hvdh2:1", args, out, lambda: cluster.link("hvdh2", False))
        last = output.strip().splitlines()[-1]
        assert code == 1 and seconds < timeout_s + 30, (code, seconds, output[-3000:])
        # The launcher's watch ends the job, or rank 0 first, once its Gloo exchange timed out and it reached the
        # job's last gather (both seen): either way the host that went silent is named.
        assert last.startswith("hvd_infer: lost contact with host hvdh2 (rank 1): "), last
        assert f"it has not answered for {timeout_s} s" in last or "it does not answer on its ssh port" in last, last
        assert not (out / "_SUCCESS").exists()
    finally:
        reboot_after_cut(cluster, out)
    before = parts(out)
    r = across(cluster, "hvdh1:1,hvdh2:1", args + ["output.mode=resume"])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert_resumed(out, table, minilm_reference)
    assert all(parts(out)[n] == t for n, t in before.items())


def test_cut_network_under_torchrun_ends_the_job_within_the_timeout(cluster, minilm_job, minilm_reference,
                                                                    tmp_path):
    """torch.distributed's collectives wait a day (the last gather outlasts the slowest share): the
    ranks' heartbeat, bounded by runtime.collective_timeout_s, ends a job whose host was cut off."""
    model, data, table = minilm_job
    out = tmp_path / "out"
    timeout_s = 10
    args = job_args(model, data, out, tmp_path, "output.rows_per_part=8", f"runtime.collective_timeout_s={timeout_s}",
                    "mlflow.enabled=false")
    port = free_port()
    node_1 = subprocess.Popen(torchrun_node(cluster, "hvdh2", 1, port, args), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        code, seconds, output = start_then_fault(torchrun_node(cluster, "hvdh1", 0, port, args), out,
                                                 lambda: cluster.link("hvdh2", False), timeout=300)
        assert code != 0 and seconds < timeout_s + 30, (code, seconds, output[-3000:])
        lost = [l for l in output.splitlines() if "hvd_infer: error: lost contact with the other ranks" in l]
        assert lost and "hvdh2 (rank 1)" in lost[0] and f"for {timeout_s} s" in lost[0], output[-3000:]
        assert not (out / "_SUCCESS").exists()
    finally:
        reboot_after_cut(cluster, out)
        node_1.kill()
    before = parts(out)
    nodes = torchrun_across(cluster, args + ["output.mode=resume"])
    assert [code for code, _ in nodes] == [0, 0], nodes[0][1][-3000:] + nodes[1][1][-3000:]
    assert_resumed(out, table, minilm_reference)
    assert all(parts(out)[n] == t for n, t in before.items())


@pytest.fixture(scope="module")
def spark_across_hosts(cluster, tmp_path_factory):
    """A Spark session on a standalone master on the driver, with a 1-core worker on each of hvdh1 and hvdh2.

    One SparkContext per process: a session still active is stopped first, and this one at the end.
    The driver tells the executors which Python to start from its own PYSPARK_PYTHON (else `python3` on
    PATH, which under `make test` is not the venv's), so it is set here for the fixture's lifetime.
    """
    from pyspark.sql import SparkSession

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYSPARK_PYTHON", sys.executable)
        mp.setenv("PYSPARK_DRIVER_PYTHON", sys.executable)
        yield from _spark_across_hosts(cluster, tmp_path_factory, SparkSession)


def _spark_across_hosts(cluster, tmp_path_factory, SparkSession):
    tmp_path = tmp_path_factory.mktemp("spark")
    active = SparkSession.getActiveSession()
    if active is not None:
        active.stop()
    spark_home = os.path.dirname(os.path.abspath(__import__("pyspark").__file__))
    spark_class = os.path.join(spark_home, "bin", "spark-class")
    env = dict(os.environ, SPARK_HOME=spark_home, PYSPARK_PYTHON=sys.executable)
    port, master_ui = free_port(), free_port()
    url = f"spark://{DRIVER_ADDRESS}:{port}"
    daemons, spark = [], None
    try:
        with open(tmp_path / "master.log", "w") as log:
            daemons.append(subprocess.Popen(
                [spark_class, "org.apache.spark.deploy.master.Master", "--host", DRIVER_ADDRESS, "--port", str(port),
                 "--webui-port", str(master_ui)], env=dict(env, SPARK_LOCAL_IP=DRIVER_ADDRESS), stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True))
        wait_for(lambda: _master_state(master_ui, DRIVER_ADDRESS) is not None, "the master's web UI")
        for name in ("hvdh1", "hvdh2"):
            address = cluster.hosts[name].address
            with open(tmp_path / f"worker-{name}.log", "w") as log:
                daemons.append(cluster.popen_on(
                    name, [spark_class, "org.apache.spark.deploy.worker.Worker", "--host", address, "--cores", "1",
                           "--memory", "2g", "--webui-port", str(free_port()), "--work-dir",
                           str(tmp_path / f"work-{name}"), url],
                    env=dict(env, SPARK_LOCAL_IP=address), stdout=log, stderr=subprocess.STDOUT))
        wait_for(lambda: len([w for w in _master_state(master_ui, DRIVER_ADDRESS)["workers"]
                              if w["state"] == "ALIVE"]) == 2, "two workers to register")
        spark = spark_session(url, **{"spark.driver.host": DRIVER_ADDRESS, "spark.driver.bindAddress": DRIVER_ADDRESS,
                                      "spark.executor.cores": "1", "spark.task.cpus": "1",
                                      "spark.executor.memory": "1g", "spark.ui.enabled": "false"})
        yield spark
    finally:
        stop_spark_cluster(spark, daemons)


def test_horovod_spark_run_with_workers_on_two_hosts(spark_across_hosts, horovodrun_reference, tiny_classifier,
                                                     dataset, tmp_path):
    from hvd_infer.spark import run_on_spark

    out = tmp_path / "out"
    summaries = run_on_spark(job(tiny_classifier, dataset[0], out, tmp_path, mlflow={"enabled": False}), num_proc=2,
                             spark=spark_across_hosts, nics=[NIC])
    assert sorted(s["host"] for s in summaries) == ["hvdh1", "hvdh2"], summaries  # one rank on each host
    assert_same_predictions(read_output(out), horovodrun_reference, atol=1e-6)


def test_torch_distributor_with_workers_on_two_hosts(spark_across_hosts, horovodrun_reference, tiny_classifier,
                                                     dataset, tmp_path):
    from hvd_infer.spark import run_on_spark

    out = tmp_path / "out"
    summaries = run_on_spark(job(tiny_classifier, dataset[0], out, tmp_path, mlflow={"enabled": False}), num_proc=2,
                             spark=spark_across_hosts, launcher="torch")
    assert sorted(s["host"] for s in summaries) == ["hvdh1", "hvdh2"], summaries
    assert_same_predictions(read_output(out), horovodrun_reference, atol=1e-6)
