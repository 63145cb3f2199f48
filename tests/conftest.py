import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The jobs take the CPU path the product picks on this machine (oneDNN's Linear only with AVX512): the other
# path has its own tests, which set HVD_INFER_CPU_AVX512 themselves (test_speed_options).

import builders  # noqa: E402
from hosts import cluster  # noqa: E402,F401  (the test hosts, shared by every test across hosts)


def pytest_sessionstart(session):
    """Says at the start (also under -q) which CPU this run met: which precision tests run natively here."""
    from hvd_infer.hardware import cpu_facts
    from hvd_infer.hardware import NATIVE_BF16_ENV
    from hvd_infer.hardware import native_bf16 as cpu_has_native_bf16

    facts = cpu_facts()
    flags = " ".join(f for f, v in facts.items() if v is True) or "none of avx2/avx512"
    forced = f" ({NATIVE_BF16_ENV}={os.environ[NATIVE_BF16_ENV]})" if NATIVE_BF16_ENV in os.environ else ""
    bf16 = "yes" if cpu_has_native_bf16() else "no, tests marked native_bf16 are skipped"
    session.config.pluginmanager.get_plugin("terminalreporter").write_line(
        f"cpu: {facts['cpu']}, {facts['cores']} usable cores; flags: {flags}; native bf16: {bf16}{forced}")


@pytest.fixture(autouse=True)
def _processes_only_in_slow_tests(request, monkeypatch):
    """A test that starts a process (ranks, a server, Spark, a job through the command line) is marked slow, so
    that `make test-fast` (-m "not slow") starts none: here any other test that tries fails, naming the fix."""
    if request.node.get_closest_marker("slow") or request.node.get_closest_marker("stack"):
        return
    start = subprocess.Popen._execute_child

    def refuse(self, args, *rest, **kwargs):
        if os.path.basename(str(args[0] if isinstance(args, (list, tuple)) else args).split()[0]) in CHEAP_PROBES:
            return start(self, args, *rest, **kwargs)
        raise AssertionError(f"{request.node.nodeid} starts a process ({args!r:.120}): mark it @pytest.mark.slow, "
                             "or run it in process (conftest.cli)")

    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse)


# What libraries ask the system in process (platform.processor(), ctypes.util.find_library, numpy.testing's
# lscpu, MLflow's git tags): milliseconds each.
CHEAP_PROBES = {"uname", "ldconfig", "gcc", "cc", "ld", "objdump", "lscpu", "git"}


def pytest_runtest_setup(item):
    if item.get_closest_marker("native_bf16"):
        from hvd_infer.hardware import native_bf16 as cpu_has_native_bf16

        if not cpu_has_native_bf16():
            pytest.skip("no native bf16 on this CPU (no AVX512-BF16/AMX)")


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory):
    return builders.tiny_bert(str(tmp_path_factory.mktemp("models") / "tiny-cls"))


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory):
    return builders.tiny_bert(str(tmp_path_factory.mktemp("models") / "tiny-enc"), task="encoder")


@pytest.fixture(scope="session")
def minilm_job(tmp_path_factory):
    """(model, data, table): real MiniLM weights with a fitted 3-label head (builders.minilm_classifier) and 480
    rows in row groups of 16: a job long enough to be killed midway, shared by every kill-and-resume test."""
    tmp = tmp_path_factory.mktemp("minilm_job")
    model = builders.minilm_classifier(str(tmp / "model"))
    table = builders.write_dataset(str(tmp / "data"), 480, files=3, row_group_size=16)
    return model, tmp / "data", table


@pytest.fixture(scope="session")
def minilm_reference(minilm_job, tmp_path_factory):
    """minilm_job scored uninterrupted (a world of one, in process), itself checked row by row against a plain
    transformers forward: what a killed-then-resumed job must equal, every column."""
    import hvd_infer

    model, data, table = minilm_job
    out = tmp_path_factory.mktemp("minilm_reference") / "out"
    hvd_infer.run({"model": {"path": model}, "data": {"path": str(data), "id_columns": ["id", "doc"]},
                   "output": {"path": str(out)}, "mlflow": {"enabled": False}, "runtime": {"progress": False}})
    got = read_output(out)
    assert_plain_forward(got, model, table)
    return got


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """(path, table): 157 rows, 3 files, row groups of 7 rows, int and string ids."""
    path = str(tmp_path_factory.mktemp("data") / "ds")
    return path, builders.write_dataset(path, 157)


def cli(args, env=None):
    """`python -m hvd_infer ARGS` in this process, for what fails before any rank would start (config, input,
    model and output checks): a CompletedProcess with the exit code and what was printed. A subprocess costs
    seconds of imports; the launcher itself is tested through real processes (test_launcher)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    import torch

    from hvd_infer.__main__ import main

    saved_env, threads = dict(os.environ), torch.get_num_threads()
    os.environ.update(env or {})
    out, err = io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            code = main([str(a) for a in args])
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def horovodrun(np_, args, env=None, timeout=600, cwd=REPO):
    """Start real ranks: horovodrun -np N python -m hvd_infer ARGS."""
    exe = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    cmd = [exe, "-np", str(np_), "-H", f"localhost:{np_}", sys.executable, "-m", "hvd_infer"] + list(args)
    e = dict(os.environ, **(env or {}))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=e)


def hvd_infer_np(np_, args, env=None, timeout=600, cwd=REPO):
    """Our launcher: python -m hvd_infer -np N ARGS (checks the job, then runs horovodrun)."""
    return python_m(["-np", str(np_)] + list(args), env=env, timeout=timeout, cwd=cwd)


def torchrun(nproc, args, env=None, timeout=600, cwd=REPO):
    """Start real ranks on torch.distributed: torchrun --nproc-per-node N -m hvd_infer ARGS."""
    exe = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [exe, "--nproc-per-node", str(nproc), "-m", "hvd_infer"] + list(args)
    e = dict(os.environ, **(env or {}))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=e)


def job_args(model, data, out, tmp, *extra):
    """The command-line job the backends are compared on: ids, small batches and parts, MLflow in tmp."""
    return ["--config", "/dev/null", f"model.path={model}", f"data.path={data}", "data.id_columns=[id,doc]",
            f"output.path={out}", f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db", "data.batch_size=8",
            "output.rows_per_part=40", "runtime.progress=false", *extra]


def read_output(out):
    """An output directory as a DataFrame sorted by id."""
    import pyarrow.dataset as pads

    return pads.dataset(str(out)).to_table().to_pandas().sort_values("id").reset_index(drop=True)


def assert_plain_forward(got, model, table, atol=1e-5):
    """A classification output (read_output) row by row against a plain transformers forward of `model` over
    `table` (builders.write_dataset): every id once, its doc, its label and probabilities."""
    import numpy as np
    from transformers import AutoConfig

    ids = table.column("id").to_pylist()
    assert sorted(got["id"]) == sorted(ids)
    rows = [ids.index(i) for i in got["id"]]
    probs = builders.plain_probs(str(model), table.column("text").to_pylist())[rows]
    labels = AutoConfig.from_pretrained(str(model)).id2label
    assert got["doc"].tolist() == [table.column("doc")[k].as_py() for k in rows]
    assert got["label"].tolist() == [labels[int(k)] for k in probs.argmax(1)]
    np.testing.assert_allclose(np.stack(got["probs"]), probs, atol=atol)
    np.testing.assert_allclose(got["score"].to_numpy(), probs.max(1), atol=atol)


def assert_same_predictions(got, ref, atol=1e-5):
    """Row by row, every column: the same columns, every id exactly once, equal values (floats within atol)."""
    import numpy as np

    assert list(got.columns) == list(ref.columns)
    assert got["id"].tolist() == ref["id"].tolist()
    for name in got.columns:
        a, b = [_plain(v) for v in got[name]], [_plain(v) for v in ref[name]]
        if a and np.asarray(a[0]).dtype.kind == "f":  # floats, or arrays/lists of them (Spark gives lists)
            np.testing.assert_allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float), atol=atol, err_msg=name)
        else:
            assert a == b, name


def _plain(value):
    return value.tolist() if hasattr(value, "tolist") else value


@pytest.fixture(scope="session")
def horovodrun_job(tmp_path_factory, tiny_classifier, dataset):
    """(tmp, out, completed process): horovodrun -np 2 on the tiny classifier and the 157-row dataset, its gold
    labels evaluated, MLflow in tmp."""
    tmp = tmp_path_factory.mktemp("horovodrun_job")
    r = horovodrun(2, job_args(tiny_classifier, dataset[0], tmp / "out", tmp, "data.label_column=label"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return tmp, tmp / "out", r


@pytest.fixture(scope="session")
def horovodrun_reference(horovodrun_job, tiny_classifier, dataset):
    """horovodrun_job's output: what other launchers must equal, itself checked row by row against a plain
    transformers forward."""
    got = read_output(horovodrun_job[1])
    assert_plain_forward(got, tiny_classifier, dataset[1])
    return got


def python_m(args, env=None, timeout=600, cwd=REPO):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "hvd_infer"] + list(args), capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=e)


def rank_pid(rank, marker, rank_var):
    """The pid of the rank whose environment has rank_var=rank and whose command line names marker."""
    import psutil

    for p in psutil.process_iter(["cmdline", "name"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if marker in cmd and "hvd_infer" in cmd and p.info["name"] not in ("sh", "bash", "dash") \
                    and "horovod.runner" not in cmd and p.environ().get(rank_var) == str(rank):
                return p.pid
        except Exception:
            continue
    return None


def start_then_fault(cmd, out, fault, timeout=120):
    """Start cmd; once rank 1 wrote 3 parts into out, call fault(); returns (exit code, seconds from the fault
    to the exit, output)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    try:
        deadline = time.time() + 400
        while not (out.exists() and len([n for n in os.listdir(out) if n.startswith("part-r00001")]) >= 3):
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.2)
        fault()
        at = time.time()
        output, _ = proc.communicate(timeout=timeout)
        return proc.returncode, time.time() - at, output
    finally:
        if proc.poll() is None:
            proc.kill()


def start_and_kill_rank_1(cmd, out, rank_var):
    """Start cmd, SIGKILL rank 1 once it wrote 3 parts; returns (exit code, seconds from kill to exit, output)."""
    def kill_rank_1():
        pid = rank_pid(1, str(out), rank_var)
        assert pid, "rank 1 not found"
        os.kill(pid, signal.SIGKILL)

    return start_then_fault(cmd, out, kill_rank_1)


def job(model, data_path, out, tmp, **sections):
    """A job config file scoring data_path with model into out; returns its path."""
    cfg = {"model": {"path": str(model)},
           "data": {"path": str(data_path), "id_columns": ["id", "doc"], "batch_size": 8},
           "output": {"path": str(out), "rows_per_part": 40},
           "mlflow": {"tracking_uri": f"sqlite:///{tmp}/mlflow.db"},
           "runtime": {"progress": False}}
    for name, values in sections.items():
        cfg[name].update(values)
    path = os.path.join(str(tmp), f"job-{os.path.basename(str(out))}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


# -- Spark: everything listens and connects on 127.0.0.1 only (driver, master, workers, executors) --

LOOPBACK = {"SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def loopback_env():
    saved = {k: os.environ.get(k) for k in LOOPBACK}
    os.environ.update(LOOPBACK)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def spark_session(master, **conf):
    """A SparkSession on master whose Python workers run this interpreter."""
    from pyspark.sql import SparkSession

    b = (SparkSession.builder.master(master).appName("hvd_infer-tests")
         .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
         .config("spark.pyspark.python", sys.executable).config("spark.sql.shuffle.partitions", "2"))
    for k, v in conf.items():
        b = b.config(k, v)
    return b.getOrCreate()


@pytest.fixture(scope="module")
def local_spark(loopback_env):
    spark = spark_session("local[2]", **{"spark.ui.enabled": "false"})
    yield spark
    spark.stop()


@pytest.fixture
def standalone_spark(loopback_env, tmp_path):
    """(session, its web UI port) on a real Spark master with two 1-core workers, all on 127.0.0.1.

    One SparkContext per process: a session still active (local_spark) is stopped first, so use it last.
    """
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        active.stop()
    spark_home = os.path.dirname(os.path.abspath(__import__("pyspark").__file__))
    spark_class = os.path.join(spark_home, "bin", "spark-class")
    env = dict(os.environ, SPARK_HOME=spark_home)
    port, master_ui = free_port(), free_port()
    url = f"spark://127.0.0.1:{port}"
    cmds = [[spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(port),
             "--webui-port", str(master_ui)]]
    for i in range(2):
        cmds.append([spark_class, "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1", "--cores", "1",
                     "--memory", "2g", "--webui-port", str(free_port()), "--work-dir", str(tmp_path / f"work{i}"), url])
    daemons, spark = [], None
    try:
        for i, cmd in enumerate(cmds):
            with open(tmp_path / f"daemon{i}.log", "w") as log:
                daemons.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True))
            if i == 0:
                wait_for(lambda: _master_state(master_ui) is not None, "the master's web UI")
        wait_for(lambda: len([w for w in _master_state(master_ui)["workers"] if w["state"] == "ALIVE"]) == 2,
                 "two workers to register")
        ui = free_port()
        spark = spark_session(url, **{"spark.executor.cores": "1", "spark.task.cpus": "1",
                                      "spark.executor.memory": "1g", "spark.ui.enabled": "true",
                                      "spark.ui.port": str(ui)})
        yield spark, ui
    finally:
        stop_spark_cluster(spark, daemons)


def stop_spark_cluster(spark, daemons):
    """Stops the session (if any), then the daemons' process groups, master last (SIGKILL after 20 s)."""
    if spark is not None:
        spark.stop()
    for p in reversed(daemons):
        os.killpg(p.pid, signal.SIGTERM)
    for p in daemons:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def executors_of_last_stage(spark, ui):
    """The executor each task of the session's last stage ran on (the job's, after run_on_spark's probe)."""
    api = f"http://127.0.0.1:{ui}/api/v1/applications/{spark.sparkContext.applicationId}"
    with urllib.request.urlopen(f"{api}/stages") as resp:
        last = max(json.load(resp), key=lambda s: s["stageId"])
    with urllib.request.urlopen(f"{api}/stages/{last['stageId']}/{last['attemptId']}/taskList") as resp:
        return [t["executorId"] for t in json.load(resp)]


def _master_state(ui_port, host="127.0.0.1"):
    try:
        with urllib.request.urlopen(f"http://{host}:{ui_port}/json", timeout=2) as resp:
            return json.load(resp)
    except OSError:
        return None


def http_ready(url):
    """True once url answers (any HTTP status), False while nothing listens yet."""
    import urllib.request

    try:
        urllib.request.urlopen(url, timeout=2)
        return True
    except OSError:
        return False


@contextlib.contextmanager
def mlflow_server(tmp_path, host="127.0.0.1"):
    """A real `mlflow server` on host (one worker, a sqlite store in tmp_path); yields its URL."""
    port = free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "mlflow")
    proc = subprocess.Popen([exe, "server", "--host", host, "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
                             "--artifacts-destination", str(tmp_path / "artifacts")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://{host}:{port}"
    try:
        wait_for(lambda: http_ready(url + "/health"), "mlflow server to start", timeout=60)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # a loaded machine: gunicorn/uvicorn workers slow to stop
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def wait_for(check, what, timeout=90):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if check():
                return
        except (TypeError, KeyError):
            pass
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
