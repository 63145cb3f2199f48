"""The end-to-end core on a named stack (scripts/stacks/NAME.txt), run with that stack's Python:

    bash scripts/install.sh --stack dbr-17.3-ml
    .venv-dbr-17.3-ml/bin/python -m pytest tests/stacks -q        (make test-stacks: every stack)

A 2-rank job equal to a plain forward computed in this stack (horovodrun where horovod is installed,
as on 15.4, and torchrun there too; torchrun where not, as on 17.3), the reader the stack can run, an
MLflow run, a rank killed then the job resumed, the Spark launch path of the runtime (horovod.spark.run
on 15.4, TorchDistributor on 17.3) and predict_udf, and the demo job (make demo's model and data) with
the labels the default stack gave.
Each task and the embedding pooling against this stack's sentence-transformers are tests/test_tasks.py
and tests/test_embedding.py, which make test-stacks runs on each stack too. On the default stack these
tests skip: the whole suite covers it.
"""
import importlib.util
import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from builders import plain_probs as reference_probs
from conftest import (REPO, assert_same_predictions, cli, free_port, job, job_args, python_m, read_output,
                      start_and_kill_rank_1)
from hvd_infer.reader import choose_reader

STACK = os.path.basename(sys.prefix)[len(".venv-"):] if os.path.basename(sys.prefix).startswith(".venv-") else ""
HOROVOD = importlib.util.find_spec("horovod") is not None
pytestmark = [pytest.mark.stack, pytest.mark.skipif(not STACK, reason="run with a named stack's Python (.venv-NAME)")]


def two_ranks_cmd(args, launcher=None):
    """A command that starts 2 ranks, and the variable that holds a rank's number. By default the stack's own
    launcher: horovodrun where horovod is installed, as on 15.4, else torchrun, as on 17.3."""
    launcher = launcher or ("horovodrun" if HOROVOD else "torchrun")
    if launcher == "horovodrun":
        exe = os.path.join(os.path.dirname(sys.executable), "horovodrun")
        return [exe, "-np", "2", "-H", "localhost:2", sys.executable, "-m", "hvd_infer", *args], "HOROVOD_RANK"
    if launcher == "hvd-infer":
        return [sys.executable, "-m", "hvd_infer", "-np", "2", *args], "HOROVOD_RANK"
    # A port of our own: another job's torchrun on the default port 29500 would meet this one's ranks.
    exe = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return [exe, "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
            "-m", "hvd_infer", *args], "RANK"


def two_ranks(args, launcher=None):
    cmd, _ = two_ranks_cmd(args, launcher)
    # Seen once in ~25 runs on dbr-17.3-ml under load (torch 2.7, before _TorchDistributed.shutdown freed the
    # group with the GIL released): the job done, one rank never exits. Should it come back, each rank's
    # Python stacks (faulthandler, on SIGABRT) go into the failure, to say where it waits.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=dict(os.environ, PYTHONFAULTHANDLER="1"))
    try:
        out, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        import psutil

        for child in psutil.Process(proc.pid).children(recursive=True):
            child.send_signal(signal.SIGABRT)
        time.sleep(5)
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{cmd[0]} did not end in 600 s; its ranks' stacks:\n{out[-3000:]}\n{err[-12000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="module")
def reference(tiny_classifier, dataset):
    """Every input row's probabilities from a plain transformers forward in this stack, by id."""
    table = dataset[1]
    probs = reference_probs(tiny_classifier, table.column("text").to_pylist())
    assert len(set(probs.argmax(1))) >= 2  # a model that reacts: swapped rows would show
    return dict(zip(table.column("id").to_pylist(), probs))


@pytest.mark.slow
def test_two_ranks_equal_plain_forward_with_mlflow(tiny_classifier, dataset, reference, tmp_path):
    from transformers import AutoConfig

    out = tmp_path / "out"
    r = two_ranks(job_args(tiny_classifier, dataset[0], out, tmp_path, "data.label_column=label"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stdout + r.stderr
    got = read_output(out)
    ids = got["id"].tolist()
    assert sorted(ids) == sorted(dataset[1].column("id").to_pylist())  # every row exactly once
    ref = np.stack([reference[i] for i in ids])
    np.testing.assert_allclose(np.stack(got["probs"].to_numpy()), ref, atol=1e-4)
    id2label = AutoConfig.from_pretrained(tiny_classifier).id2label
    assert got["label"].tolist() == [id2label[int(k)] for k in ref.argmax(1)]
    assert {n[:12] for n in os.listdir(out) if n.startswith("part-")} == {"part-r00000-", "part-r00001-"}
    # The reader this stack can run, said in the summary and in MLflow.
    reader = choose_reader("auto")
    assert f"reader: {reader.describe()}" in r.stdout
    db = sqlite3.connect(tmp_path / "mlflow.db")
    (run_id, status), = db.execute("select run_uuid, status from runs").fetchall()
    assert status == "FINISHED"
    params = dict(db.execute("select key, value from params where run_uuid=?", (run_id,)).fetchall())
    assert params["world_size"] == "2" and params["resolved.reader"] == reader.describe()
    metrics = dict(db.execute("select key, value from metrics where run_uuid=?", (run_id,)).fetchall())
    assert metrics["rows"] == dataset[1].num_rows and "accuracy" in metrics
    assert any(k.startswith("system/") for k in metrics)  # MLflow's system metrics, whatever its version


@pytest.mark.slow
@pytest.mark.skipif(not HOROVOD, reason="no horovod: torchrun is this stack's launcher (the tests above)")
def test_torchrun_on_a_horovod_stack_equals_plain_forward(tiny_classifier, dataset, reference, tmp_path):
    out = tmp_path / "out"
    r = two_ranks(job_args(tiny_classifier, dataset[0], out, tmp_path, "mlflow.enabled=false"), "torchrun")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = read_output(out)
    assert sorted(got["id"]) == sorted(dataset[1].column("id").to_pylist())
    np.testing.assert_allclose(np.stack(got["probs"].to_numpy()), np.stack([reference[i] for i in got["id"]]), atol=1e-4)


@pytest.mark.slow
def test_pyarrow_reader_equals_the_stacks_reader(tiny_classifier, dataset, reference, tmp_path):
    """data.reader=pyarrow on one rank gives the plain forward's rows too (on 15.4 auto is petastorm)."""
    out = tmp_path / "out"
    r = python_m(job_args(tiny_classifier, dataset[0], out, tmp_path, "data.reader=pyarrow", "mlflow.enabled=false"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = read_output(out)
    ref = np.stack([reference[i] for i in got["id"]])
    np.testing.assert_allclose(np.stack(got["probs"].to_numpy()), ref, atol=1e-4)


@pytest.mark.slow
def test_killed_rank_ends_the_job_then_resume_scores_only_the_rest(minilm_job, minilm_reference, tmp_path):
    """A rank SIGKILLed midway (the stack's launcher), then output.mode=resume the same way: every row once,
    no finished part rewritten, the output what the job gives uninterrupted (minilm_reference, this stack's)."""
    model, data, table = minilm_job  # a real-sized model, so that the job runs long enough to kill
    out = tmp_path / "out"
    args = job_args(model, data, out, tmp_path, "output.rows_per_part=8", "data.batch_size=8", "mlflow.enabled=false")
    cmd, rank_var = two_ranks_cmd(args)
    code, seconds, output = start_and_kill_rank_1(cmd, out, rank_var)
    assert code != 0 and seconds < 60, (code, seconds, output[-3000:])
    assert not (out / "_SUCCESS").exists()
    before = {n: os.stat(out / n) for n in os.listdir(out) if n.startswith("part-")}
    done_rows = sum(pq.ParquetFile(out / n).metadata.num_rows for n in before)
    assert 0 < done_rows < table.num_rows

    r = two_ranks(args + ["output.mode=resume"])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stdout + r.stderr
    got = pq.read_table(str(out), columns=["id"]).column("id").to_pylist()
    assert sorted(got) == sorted(table.column("id").to_pylist())  # every id exactly once
    for n, st in before.items():  # no finished part was recomputed
        now = os.stat(out / n)
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), n
    assert (out / "_SUCCESS").exists()
    assert_same_predictions(read_output(out), minilm_reference, atol=1e-5)


@pytest.mark.skipif(choose_reader("auto").name == "petastorm", reason="petastorm runs on this stack")
def test_petastorm_refused_in_one_line_where_it_cannot_run(tiny_classifier, dataset, tmp_path):
    r = cli(job_args(tiny_classifier, dataset[0], tmp_path / "out", tmp_path, "data.reader=petastorm"))
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    assert "data.reader=petastorm, but petastorm" in lines[0] and "data.reader=pyarrow" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_spark_paths_of_the_runtime_equal_plain_forward(tiny_classifier, dataset, reference, tmp_path, loopback_env):
    """horovod.spark.run where horovod is installed (HorovodRunner's runtimes), else TorchDistributor; and
    predict_udf (the runtime's pyspark and pyarrow under predict_batch_udf)."""
    from conftest import spark_session
    from hvd_infer.spark import predict_udf, run_on_spark

    spark = spark_session("local[2]", **{"spark.ui.enabled": "false"})
    try:
        out = tmp_path / "out"
        run_on_spark(job(tiny_classifier, dataset[0], out, tmp_path), num_proc=2, spark=spark,
                     launcher="horovod" if HOROVOD else "torch")
        udf = predict_udf(job(tiny_classifier, dataset[0], tmp_path / "unused", tmp_path))
        scored = spark.read.parquet(dataset[0]).withColumn("pred", udf("text")).select("id", "pred.*").toPandas()
    finally:
        spark.stop()
    got = read_output(out)
    assert sorted(got["id"]) == sorted(dataset[1].column("id").to_pylist())
    ref = np.stack([reference[i] for i in got["id"]])
    np.testing.assert_allclose(np.stack(got["probs"].to_numpy()), ref, atol=1e-4)
    assert (out / "_SUCCESS").exists()
    assert sorted(scored["id"]) == sorted(dataset[1].column("id").to_pylist())
    ref = np.stack([reference[i] for i in scored["id"]])
    np.testing.assert_allclose(np.stack(scored["probs"].to_numpy()), ref, atol=1e-4)


@pytest.mark.skipif(HOROVOD, reason="horovod is installed: hvd-infer -np N runs (test_launcher.py)")
def test_hvd_infer_np_without_horovod_says_how_to_launch(tiny_classifier, dataset, tmp_path):
    r = cli(["-np", "2", *job_args(tiny_classifier, dataset[0], tmp_path / "out", tmp_path)])
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    lines = [l for l in (r.stdout + r.stderr).splitlines() if l.strip()]
    assert len(lines) == 1 and "horovod is not installed here" in lines[0], lines
    assert "torchrun --nproc-per-node 2 -m hvd_infer" in lines[0]
    assert not (tmp_path / "out").exists()


DEMO = os.path.join(REPO, "demo")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(os.path.join(DEMO, "predictions", "_SUCCESS")),
                    reason="no demo output of the default stack: make demo first (make test-stacks does)")
def test_demo_job_gives_the_default_stacks_labels(tmp_path):
    """The README's demo job (conf/default.yaml) on 2 ranks of this stack: the labels the default stack's
    make demo wrote, and probabilities within 1e-4 of a plain forward in this stack."""
    import pyarrow.dataset as pads

    out = tmp_path / "out"
    # As make demo starts it on this stack: hvd-infer -np 2 where horovod is installed, else torchrun.
    r = two_ranks(["--config", os.path.join(REPO, "conf", "default.yaml"), f"output.path={out}", "output.mode=error",
                   f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "runtime.progress=false"],
                  "hvd-infer" if HOROVOD else "torchrun")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stdout + r.stderr
    got, default = read_output(out), read_output(os.path.join(DEMO, "predictions"))
    assert got["id"].tolist() == default["id"].tolist()
    assert got["label"].tolist() == default["label"].tolist()
    test = pads.dataset(os.path.join(DEMO, "data", "test")).to_table(columns=["id", "text", "label"]).to_pandas()
    # The reference itself: the default stack's demo labels the held-out split as its fine-tuning did (0.997).
    gold = dict(zip(test["id"], test["label"]))
    assert np.mean([gold[i] == label for i, label in zip(default["id"], default["label"])]) >= 0.99
    text_of = dict(zip(test["id"], test["text"]))
    ref = reference_probs(os.path.join(DEMO, "model"), [text_of[i] for i in got["id"]])
    np.testing.assert_allclose(np.stack(got["probs"].to_numpy()), ref, atol=1e-4)


@pytest.mark.slow
def test_pip_install_into_the_runtime_changes_nothing_it_ships(tmp_path):
    """`pip install .` into this stack (the runtime's packages already there) would install hvd_infer alone:
    no other version of torch, horovod, pyspark or anything else, and build nothing but hvd_infer itself."""
    import json

    report = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report), REPO],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    installs = [(i["metadata"]["name"], i["metadata"]["version"]) for i in json.loads(report.read_text())["install"]]
    assert [name for name, _ in installs] == ["hvd_infer"], installs
