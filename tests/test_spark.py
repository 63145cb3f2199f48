"""Beyond one machine: the job on Spark (local[2] and a standalone cluster), as a UDF, and from MLflow models.

Everything listens and connects on 127.0.0.1 only: Spark's driver, master, workers and
executors, and Horovod's services (nics=["lo"]).
"""
import json
import os
import pickle
import sqlite3
import subprocess
import sys
import tempfile

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pytest

import builders
import hvd_infer
from conftest import assert_same_predictions, cli, executors_of_last_stage, horovodrun, job, python_m, read_output
from builders import plain_probs as reference_probs
from hvd_infer.errors import ConfigError

slow = pytest.mark.slow


def plain_forward(model_path, texts):
    """label, score, probs per text from a plain transformers forward (test_multirank's), not hvd_infer."""
    from transformers import AutoConfig

    probs = reference_probs(model_path, list(texts))
    id2label = AutoConfig.from_pretrained(model_path).id2label
    return pd.DataFrame({"label": [id2label[int(k)] for k in probs.argmax(1)], "score": probs.max(1),
                         "probs": list(probs)})


@pytest.fixture(scope="module")
def reference(tiny_classifier, dataset):
    """Every input row scored by a plain transformers forward written here, not by hvd_infer."""
    table = dataset[1]
    ref = plain_forward(tiny_classifier, table.column("text").to_pylist())
    ref.insert(0, "doc", table.column("doc").to_pylist())
    ref.insert(0, "id", table.column("id").to_pylist())
    assert ref["label"].nunique() >= 2  # a model that reacts: swapped rows would show
    return ref.sort_values("id").reset_index(drop=True)


def test_run_is_picklable_by_reference():
    import cloudpickle

    assert pickle.loads(pickle.dumps(hvd_infer.run)) is hvd_infer.run
    assert b"hvd_infer" in cloudpickle.dumps(hvd_infer.run)  # by name, not by value


def test_udf_refuses_on_null_skip(tmp_path):
    from hvd_infer.spark import predict_udf

    with pytest.raises(ConfigError, match="cannot drop rows inside a UDF"):
        predict_udf(job(tmp_path / "model", tmp_path, tmp_path / "out", tmp_path, data={"on_null": "skip"}))


def test_transformers_flavor_layout_becomes_one_model_dir(tmp_path):
    """mlflow.transformers keeps weights in model/ and the tokenizer in components/tokenizer/."""
    from hvd_infer.tracking import _assemble_hf_dir

    for rel in ["MLmodel", "model/config.json", "model/model.safetensors",
                "components/tokenizer/tokenizer.json", "components/tokenizer/tokenizer_config.json"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("{}")
    hf = _assemble_hf_dir(str(tmp_path), "models:/x/1")
    assert hf == str(tmp_path / "model")
    assert sorted(os.listdir(hf)) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def test_udf_columns_in_input_order():
    import pyarrow as pa

    from hvd_infer.spark import _numpy_column
    from hvd_infer.tasks.base import float_list_array

    probs = _numpy_column(float_list_array(np.array([[0.1, 0.9], [0.7, 0.3]])).take(pa.array([1, 0])))
    np.testing.assert_allclose(probs, [[0.7, 0.3], [0.1, 0.9]], atol=1e-7)
    assert _numpy_column(pa.array(["a", "b"])).tolist() == ["a", "b"]


@slow
def test_run_on_spark_local_equals_plain_forward(local_spark, reference, tiny_classifier, dataset, tmp_path):
    from hvd_infer.spark import run_on_spark

    out = tmp_path / "out"
    summaries = run_on_spark(job(tiny_classifier, dataset[0], out, tmp_path), num_proc=2, nics=["lo"])
    assert [s["rank"] for s in summaries] == [0, 1]
    assert sum(s["rows"] for s in summaries) == dataset[1].num_rows
    assert_same_predictions(read_output(out), reference)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert {p["rank"] for p in manifest["parts"]} == {0, 1} and (out / "_SUCCESS").exists()


@slow
@slow
def test_precisions_the_workers_cannot_run_are_refused_on_the_driver(local_spark, tiny_classifier, dataset, tmp_path):
    """Spark's workers here have no GPU: float16 is refused on the driver in one line, by the UDF and by
    run_on_spark (whose ranks are Spark tasks), and auto-check, which needs a job's input, by the UDF."""
    from hvd_infer.spark import predict_udf, run_on_spark

    def config(dtype):
        return {"model": {"path": str(tiny_classifier), "dtype": dtype}, "data": {"path": dataset[0]},
                "output": {"path": str(tmp_path / "out")}, "mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}}

    with pytest.raises(ConfigError, match="^model.dtype=float16 needs a CUDA GPU and none is visible"):
        predict_udf(config(dtype="float16"))
    with pytest.raises(ConfigError, match="^model.dtype=float16 needs a CUDA GPU"):
        run_on_spark(config(dtype="float16"), num_proc=2, spark=local_spark, launcher="torch")
    with pytest.raises(ConfigError, match="^model.dtype=auto-check measures each precision on a job's input"):
        predict_udf(config(dtype="auto-check"))
    assert not (tmp_path / "out").exists()


def test_predict_udf_equals_plain_forward(local_spark, reference, tiny_classifier, dataset, tmp_path):
    from hvd_infer.spark import predict_udf

    udf = predict_udf(job(tiny_classifier, dataset[0], tmp_path / "unused", tmp_path))
    scored = local_spark.read.parquet(dataset[0]).withColumn("pred", udf("text"))
    assert scored.schema["pred"].dataType.simpleString() == "struct<label:string,score:float,probs:array<float>>"
    got = scored.select("id", "doc", "pred.*").toPandas().sort_values("id").reset_index(drop=True)
    assert_same_predictions(got, reference)


@slow
def test_predict_udf_puts_length_sorted_rows_back(local_spark, tiny_classifier, tmp_path):
    """Short and very long texts interleaved in one Arrow batch: the UDF sorts them by length to batch
    them, and each prediction must still land on its own row."""
    from transformers import AutoTokenizer

    from hvd_infer.batcher import length_sorted_batches
    from hvd_infer.spark import predict_udf

    long_texts = builders.texts(40, seed=7, long_every=1)  # 300-500 words: cut at max_length
    short_texts = ["Goal!", "Stocks fell.", "Bake bread.", "Rain."]
    texts = [long_texts[i] if i % 3 == 1 else short_texts[i % 4] + f" {builders.WORDS[i]}" for i in range(30)]
    df = local_spark.createDataFrame(pd.DataFrame({"id": range(30), "doc": [f"d{i}" for i in range(30)],
                                                   "text": texts})).coalesce(1)
    # sort_window is predict_batch_udf's batch: all 30 rows in one Arrow batch, scored 4 at a time.
    udf = predict_udf(job(tiny_classifier, tmp_path, tmp_path / "unused", tmp_path,
                          data={"sort_window": 64, "batch_size": 4}))
    got = df.withColumn("pred", udf("text")).select("id", "doc", "pred.*").toPandas().sort_values("id")
    ref = plain_forward(tiny_classifier, texts)
    ref.insert(0, "doc", [f"d{i}" for i in range(30)])
    ref.insert(0, "id", range(30))
    assert_same_predictions(got.reset_index(drop=True), ref)
    assert ref["label"].nunique() >= 2
    lengths = np.array([len(ids) for ids in AutoTokenizer.from_pretrained(tiny_classifier)(
        texts, truncation=True, max_length=256)["input_ids"]])
    order = np.concatenate(length_sorted_batches(lengths, 4, 0, 64))
    assert (order != np.arange(30)).sum() > 20  # the rows really were scored out of input order


@slow
def test_mlflow_model_uris(reference, tiny_classifier, dataset, tmp_path, monkeypatch):
    """A model logged with mlflow.transformers.log_model, scored by version (2 ranks) and by alias."""
    db = f"sqlite:///{tmp_path}/mlflow.db"
    log = subprocess.run([sys.executable, "-c", f"""
import mlflow, transformers
from mlflow import MlflowClient
mlflow.set_tracking_uri({db!r})
model = transformers.AutoModelForSequenceClassification.from_pretrained({tiny_classifier!r})
tok = transformers.AutoTokenizer.from_pretrained({tiny_classifier!r})
with mlflow.start_run() as run:
    mlflow.transformers.log_model(transformers_model={{"model": model, "tokenizer": tok}}, name="model",
                                  task="text-classification", registered_model_name="tiny-cls",
                                  pip_requirements=["transformers", "torch"])
MlflowClient().set_registered_model_alias("tiny-cls", "champion", "1")
print(run.info.run_id)
"""], capture_output=True, text=True, timeout=300)
    assert log.returncode == 0, log.stderr[-3000:]
    logged_run = log.stdout.split()[-1]

    # A fresh per-host cache: the two ranks of the first job race for it, the second job reuses it.
    env = {"TMPDIR": str(tmp_path)}
    r = horovodrun(2, ["--config", job("models:/tiny-cls/1", dataset[0], tmp_path / "by_version", tmp_path)], env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    # A world of one in process: tempfile reads TMPDIR once per process, so it is made to read it again (and the
    # value it had comes back after the test).
    monkeypatch.setattr(tempfile, "tempdir", None)
    r = cli(["--config", job("models:/tiny-cls@champion", dataset[0], tmp_path / "by_alias", tmp_path)], env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert tempfile.gettempdir() == str(tmp_path)
    assert_same_predictions(read_output(tmp_path / "by_version"), reference)
    assert_same_predictions(read_output(tmp_path / "by_alias"), reference)
    cached = os.listdir(tmp_path / "hvd_infer-models")
    assert len([n for n in cached if not n.endswith(".lock")]) == 1, cached  # downloaded once

    con = sqlite3.connect(tmp_path / "mlflow.db")
    runs = con.execute("select r.run_uuid from runs r join experiments e on r.experiment_id = e.experiment_id "
                       "where e.name = 'hvd_infer' order by r.start_time").fetchall()
    assert len(runs) == 2
    for (run_id,), given in zip(runs, ["models:/tiny-cls/1", "models:/tiny-cls@champion"]):
        params = dict(con.execute("select key, value from params where run_uuid = ?", (run_id,)))
        tags = dict(con.execute("select key, value from tags where run_uuid = ?", (run_id,)))
        assert params["model.path"] == given
        assert params["model_source.registered_name"] == "tiny-cls" and params["model_source.version"] == "1"
        assert params["model_source.run_id"] == logged_run and params["model_source.uri"] == "models:/tiny-cls/1"
        assert tags["hvd_infer.model"] == "models:/tiny-cls/1"

    # With tracking off the URI is still resolved in the job's store (MLflow's download would look in its
    # default registry): a fresh cache, so this job downloads. A fresh process: in this one, MLflow's global
    # tracking URI is already this store (the job above set it), which would hide a job that forgot to.
    fresh = tmp_path / "fresh-tmp"
    fresh.mkdir()
    r = python_m(["--config", job("models:/tiny-cls/1", dataset[0], tmp_path / "no_tracking", tmp_path),
                  "mlflow.enabled=false"], env={"TMPDIR": str(fresh)}, cwd=str(fresh))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert_same_predictions(read_output(tmp_path / "no_tracking"), reference)


@slow
def test_standalone_cluster_one_rank_per_executor(standalone_spark, reference, horovodrun_reference, tiny_classifier,
                                                  dataset, tmp_path):
    """A real Spark master and two 1-core workers on 127.0.0.1, the job through Horovod, then through
    TorchDistributor on the same cluster (test_torch_distributor's, one cluster started for both); runs last
    (one SparkContext per process)."""
    from hvd_infer.spark import run_on_spark
    from test_torch_distributor import run_torch

    spark, ui = standalone_spark
    out = tmp_path / "out"
    summaries = run_on_spark(job(tiny_classifier, dataset[0], out, tmp_path), num_proc=2, spark=spark, nics=["lo"])
    assert [s["rank"] for s in summaries] == [0, 1] and all(s["rows"] > 0 for s in summaries)
    assert_same_predictions(read_output(out), reference)
    assert sorted(executors_of_last_stage(spark, ui)) == ["0", "1"]  # one rank on each executor

    torch_tmp = tmp_path / "torch"
    torch_tmp.mkdir()
    got = run_torch(spark, tiny_classifier, dataset, torch_tmp)
    assert_same_predictions(got, horovodrun_reference, atol=1e-6)
    assert sorted(executors_of_last_stage(spark, ui)) == ["0", "1"]  # one rank on each executor
