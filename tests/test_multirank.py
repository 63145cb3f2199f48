"""The whole job across real ranks: horovodrun -np 2, Petastorm, a real model dir, MLflow."""
import json
import os
import sqlite3

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

import builders
from conftest import assert_same_predictions, cli, horovodrun, job_args, read_output

pytestmark = pytest.mark.slow


def test_two_ranks_every_id_once_and_equal_to_plain_forward(horovodrun_job, horovodrun_reference, dataset):
    tmp, out, r = horovodrun_job
    _, table = dataset
    got = pads.dataset(str(out)).to_table().to_pandas()
    assert list(got.columns) == ["id", "doc", "label", "score", "probs"]  # id columns first
    assert got["id"].dtype == np.int64 and got["doc"].dtype == object
    # horovodrun_reference: the same rows, checked against a plain transformers forward, row by row.
    assert len(horovodrun_reference) == table.num_rows
    # Both ranks wrote parts; names carry the rank; _SUCCESS and the manifest are there.
    names = sorted(os.listdir(out))
    assert any(n.startswith("part-r00000") for n in names) and any(n.startswith("part-r00001") for n in names)
    assert "_SUCCESS" in names
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["rows"] == table.num_rows
    assert {p["rank"] for p in manifest["parts"]} == {0, 1}
    assert sum(p["rows"] for p in manifest["parts"]) == table.num_rows


def test_summary_and_mlflow_run(horovodrun_job):
    tmp, out, r = horovodrun_job
    assert "rows/s" in r.stdout and "evaluation over 157 rows" in r.stdout
    db = sqlite3.connect(tmp / "mlflow.db")
    (run_id, status, art), = db.execute("select run_uuid, status, artifact_uri from runs").fetchall()
    assert status == "FINISHED"
    params = dict(db.execute("select key, value from params where run_uuid=?", (run_id,)).fetchall())
    assert params["world_size"] == "2" and params["model.task"] == "text-classification"
    assert params["data.batch_size"] == "8" and params["resolved.deepspeed"] == "True"
    metrics = dict(db.execute("select key, value from metrics where run_uuid=?", (run_id,)).fetchall())
    assert metrics["rows"] == 157 and metrics["rank_0_rows"] + metrics["rank_1_rows"] == 157
    assert metrics["rows_per_second"] > 0 and "accuracy" in metrics and "macro_f1" in metrics
    # mlflow.log_predictions=sample (the default): no part is copied into the artifact store, only the output's
    # first rows in input order (all 157 here), as one file, beside the config, the manifest and the figure.
    art = art.replace("file://", "")
    assert sorted(os.listdir(art)) == ["_manifest.json", "config.yaml", "confusion_matrix.png",
                                       "predictions_sample.parquet"]
    sample = pq.read_table(os.path.join(art, "predictions_sample.parquet")).to_pandas()
    assert_same_predictions(sample, read_output(out).head(1000), atol=0)
    assert "predictions in MLflow: sample of 157 rows, the output's first in input order" in r.stdout
    assert json.loads((out / "_manifest.json").read_text())["summary"]["mlflow_predictions"].startswith("sample of 157")


def test_world_of_one_equals_two_ranks(horovodrun_reference, tiny_classifier, dataset, tmp_path):
    out1 = tmp_path / "out1"
    r = cli(job_args(tiny_classifier, dataset[0], out1, tmp_path, "mlflow.enabled=false"))
    assert r.returncode == 0, r.stderr[-3000:]
    # 2 threads against 1 per rank: another summation order. float32 noise stays ~1e-6 in probabilities; a
    # swapped row moves them by > 1e-2 (tiny_bert reacts to its input).
    assert_same_predictions(read_output(out1), horovodrun_reference, atol=1e-5)


def test_embedding_minilm_two_ranks(tmp_path):
    from sentence_transformers import SentenceTransformer

    sentences = ["A man is playing a guitar.", "Someone plays an acoustic guitar on stage.",
                 "The stock market fell sharply on Monday.", "Shares dropped as investors panicked.",
                 "How do I bake sourdough bread?", "A recipe for baking bread with a crispy crust."] * 3
    data = tmp_path / "data"
    builders.write_dataset(str(data), len(sentences), files=2, row_group_size=4, text=sentences)
    out = tmp_path / "out"
    r = horovodrun(2, job_args(builders.minilm_dir(), data, out, tmp_path, "model.task=embedding"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    got = pads.dataset(str(out)).to_table().to_pandas().sort_values("id")
    emb = np.stack(got["embedding"].to_numpy())
    ref = SentenceTransformer(builders.minilm_dir(), device="cpu").encode(sentences, normalize_embeddings=True)
    np.testing.assert_allclose(emb, ref, atol=1e-5)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.2 and sim[2, 3] > sim[2, 4] + 0.2 and sim[4, 5] > sim[4, 0] + 0.2
