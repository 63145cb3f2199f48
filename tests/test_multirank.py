"""The whole job across real ranks: horovodrun -np 2, Petastorm, a real model dir, MLflow."""
import json
import os
import sqlite3

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import builders
from conftest import horovodrun, python_m

pytestmark = pytest.mark.slow


def args(model, data, out, tmp, *extra):
    return ["--config", "/dev/null", f"model.path={model}", f"data.path={data}", "data.id_columns=[id,doc]",
            f"output.path={out}", f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db", "data.batch_size=8",
            "output.rows_per_part=40", "runtime.progress=false", *extra]


def reference_probs(model_path, texts):
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_path).eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), 16):
            b = tok(texts[i:i + 16], padding=True, truncation=True, max_length=256, return_tensors="pt")
            out.append(torch.softmax(model(**b).logits, -1).numpy())
    return np.concatenate(out)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, tiny_classifier, dataset):
    tmp = tmp_path_factory.mktemp("run2")
    out = tmp / "out"
    r = horovodrun(2, args(tiny_classifier, dataset[0], out, tmp, "data.label_column=label"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return tmp, out, r


def test_two_ranks_every_id_once_and_equal_to_plain_forward(two_rank_run, tiny_classifier, dataset):
    tmp, out, r = two_rank_run
    _, table = dataset
    got = pads.dataset(str(out)).to_table().to_pandas()
    assert list(got.columns[:2]) == ["id", "doc"]  # id columns first
    assert sorted(got["id"]) == sorted(table.column("id").to_pylist())  # exactly once
    assert got["id"].dtype == np.int64 and got["doc"].dtype == object
    ref = reference_probs(tiny_classifier, table.column("text").to_pylist())
    by_id = {i: k for k, i in enumerate(table.column("id").to_pylist())}
    rows = [by_id[i] for i in got["id"]]
    np.testing.assert_allclose(np.stack(got["probs"].to_numpy()), ref[rows], atol=1e-5)
    assert got["doc"].tolist() == [table.column("doc")[k].as_py() for k in rows]
    labels = AutoModelForSequenceClassification.from_pretrained(tiny_classifier).config.id2label
    assert got["label"].tolist() == [labels[int(i)] for i in ref[rows].argmax(1)]
    # Both ranks wrote parts; names carry the rank; _SUCCESS and the manifest are there.
    names = sorted(os.listdir(out))
    assert any(n.startswith("part-r00000") for n in names) and any(n.startswith("part-r00001") for n in names)
    assert "_SUCCESS" in names
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["rows"] == table.num_rows
    assert {p["rank"] for p in manifest["parts"]} == {0, 1}
    assert sum(p["rows"] for p in manifest["parts"]) == table.num_rows


def test_summary_and_mlflow_run(two_rank_run):
    tmp, out, r = two_rank_run
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
    art = art.replace("file://", "")
    assert os.path.exists(os.path.join(art, "config.yaml")) and os.path.exists(os.path.join(art, "_manifest.json"))
    assert os.path.exists(os.path.join(art, "confusion_matrix.png"))
    for rank in (0, 1):
        files = os.listdir(os.path.join(art, "predictions", f"rank-{rank:05d}"))
        assert files and all(f.startswith(f"part-r{rank:05d}") for f in files)


def test_world_of_one_equals_two_ranks(two_rank_run, tiny_classifier, dataset, tmp_path):
    _, out2, _ = two_rank_run
    out1 = tmp_path / "out1"
    r = python_m(args(tiny_classifier, dataset[0], out1, tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    a = pads.dataset(str(out1)).to_table().to_pandas().sort_values("id").reset_index(drop=True)
    b = pads.dataset(str(out2)).to_table().to_pandas().sort_values("id").reset_index(drop=True)
    assert a["id"].tolist() == b["id"].tolist() and a["label"].tolist() == b["label"].tolist()
    # 2 threads against 1 per rank: another summation order. With logits up to ~10 (tiny_bert reacts to
    # its input) float32 noise reaches ~1e-6 in probabilities; a swapped row moves them by > 1e-2.
    np.testing.assert_allclose(np.stack(a["probs"]), np.stack(b["probs"]), atol=1e-5)


def test_embedding_minilm_two_ranks(tmp_path):
    from sentence_transformers import SentenceTransformer

    sentences = ["A man is playing a guitar.", "Someone plays an acoustic guitar on stage.",
                 "The stock market fell sharply on Monday.", "Shares dropped as investors panicked.",
                 "How do I bake sourdough bread?", "A recipe for baking bread with a crispy crust."] * 3
    data = tmp_path / "data"
    builders.write_dataset(str(data), len(sentences), files=2, row_group_size=4, text=sentences)
    out = tmp_path / "out"
    r = horovodrun(2, args(builders.minilm_dir(), data, out, tmp_path, "model.task=embedding"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    got = pads.dataset(str(out)).to_table().to_pandas().sort_values("id")
    emb = np.stack(got["embedding"].to_numpy())
    ref = SentenceTransformer(builders.minilm_dir(), device="cpu").encode(sentences, normalize_embeddings=True)
    np.testing.assert_allclose(emb, ref, atol=1e-5)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.2 and sim[2, 3] > sim[2, 4] + 0.2 and sim[4, 5] > sim[4, 0] + 0.2
