"""The job through pyspark's TorchDistributor (torchrun in Spark), compared with horovodrun -np 2;
and Spark workers whose Python cannot import the stack, caught before the job in one line.

On a standalone cluster: test_spark.test_standalone_cluster_one_rank_per_executor, which runs both launchers on
the one cluster it starts (a master and two workers cost ~a minute to start here)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO, assert_same_predictions, job, read_output

pytestmark = pytest.mark.slow
BARE_PYTHON = "/usr/bin/python3"


def run_torch(spark, model, dataset, tmp_path, **kwargs):
    from hvd_infer.spark import run_on_spark

    out = tmp_path / "out"
    summaries = run_on_spark(job(model, dataset[0], out, tmp_path), num_proc=2, spark=spark, launcher="torch",
                             **kwargs)
    assert [s["rank"] for s in summaries] == [0, 1]
    assert sum(s["rows"] for s in summaries) == dataset[1].num_rows
    manifest = json.loads((out / "_manifest.json").read_text())
    assert {p["rank"] for p in manifest["parts"]} == {0, 1} and (out / "_SUCCESS").exists()
    return read_output(out)


def test_spark_tasks_on_local2_equal_horovodrun(local_spark, horovodrun_reference, tiny_classifier, dataset, tmp_path):
    got = run_torch(local_spark, tiny_classifier, dataset, tmp_path)
    assert_same_predictions(got, horovodrun_reference, atol=1e-6)


def test_local_mode_equals_horovodrun(local_spark, horovodrun_reference, tiny_classifier, dataset, tmp_path):
    got = run_torch(local_spark, tiny_classifier, dataset, tmp_path, local_mode=True)
    assert_same_predictions(got, horovodrun_reference, atol=1e-6)


@pytest.mark.skipif(not os.path.exists(BARE_PYTHON), reason=f"needs a bare system Python at {BARE_PYTHON}")
def test_workers_without_the_stack_fail_in_one_line(tiny_classifier, dataset, tmp_path):
    """A real driver whose Spark workers run a bare system python3 (no hvd_infer, no torch)."""
    config = job(tiny_classifier, dataset[0], tmp_path / "out", tmp_path)
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {REPO!r})  # the driver imports this checkout; the workers get no PYTHONPATH
        from pyspark.sql import SparkSession
        from hvd_infer.errors import UserError
        from hvd_infer.spark import predict_udf, run_on_spark

        spark = (SparkSession.builder.master("local[2]").config("spark.ui.enabled", "false")
                 .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
                 .getOrCreate())
        for call in (lambda: run_on_spark({config!r}, num_proc=2, nics=["lo"]),
                     lambda: run_on_spark({config!r}, num_proc=2, launcher="torch"),
                     lambda: predict_udf({config!r})):
            try:
                call()
                print("no error")
            except UserError as e:
                print(f"hvd_infer: error: {{e}}")
        spark.stop()
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=str(tmp_path),
                       env=dict(env, SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=BARE_PYTHON))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert len(lines) == 3, r.stdout + r.stderr[-3000:]
    for line in lines:
        assert line.startswith(f"hvd_infer: error: Spark's Python workers run {BARE_PYTHON}"), line
        assert "cannot import hvd_infer" in line and "PYSPARK_PYTHON" in line and sys.executable in line, line
    assert not (tmp_path / "out").exists()
