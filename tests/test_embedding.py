"""Embeddings pooled as the model was trained, against sentence-transformers' own encode.

Tiny random BERTs saved by sentence-transformers itself (builders.sentence_model), one per pooling
mode, with and without Normalize, with named, default and literal prompts: the task on one batch in
process, then whole jobs on 2 real ranks (horovodrun, slow). A world of one through the CLI and bad
options failing in one line before scoring run in process (conftest.cli).
"""
import json
import os
import sqlite3

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
import torch
from sentence_transformers import SentenceTransformer

import builders
from conftest import cli, horovodrun
from hvd_infer.config import load_config
from hvd_infer.model import load_model
from hvd_infer.tasks import get_task

PROMPTS = {"query": "query: ", "passage": "passage: "}

# (name, sentence_model options, embedding options); options None = the model's defaults.
MODELS = {
    "cls": dict(pooling="cls"),
    "cls-prompts": dict(pooling="cls", prompts=PROMPTS),
    "mean-raw": dict(pooling="mean", normalize=False),
    "lasttoken": dict(pooling="lasttoken"),
    "lasttoken-raw-prompts": dict(pooling="lasttoken", normalize=False, prompts=PROMPTS),
    "weightedmean": dict(pooling="weightedmean"),
    "max": dict(pooling="max"),
    "meansqrt-default-prompt": dict(pooling="mean_sqrt_len_tokens", prompts=PROMPTS, default_prompt_name="query"),
    "cls-prompt-excluded": dict(pooling="cls", prompts=PROMPTS, include_prompt=False),
    "mean-prompt-excluded": dict(pooling="mean", prompts=PROMPTS, include_prompt=False),
    "decoder-lasttoken": dict(pooling="lasttoken", decoder=True, prompts=PROMPTS),
}


@pytest.fixture(scope="module")
def st_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("st-models")
    return {name: builders.sentence_model(str(root / name), seed=i, **kw)
            for i, (name, kw) in enumerate(MODELS.items())}


def job(path, **embedding):
    return load_config({"model": {"path": path, "task": "embedding"}, "data": {"path": "/d"},
                        "output": {"path": "/o"}, "embedding": embedding})


def reference(path, texts, prompt=None, prompt_name=None, dimensions=None):
    """sentence-transformers' encode; with dimensions, truncated then normalised when the model normalises.

    The truncation is done here, as encode(truncate_dim=k) does it in current sentence-transformers: the
    stacks' 2.7 has no such argument, and 4.0's encode swallows it (**kwargs) and does not truncate.
    """
    st = SentenceTransformer(path, device="cpu")
    normalizes = any(type(m).__name__ == "Normalize" for m in st)
    vectors = st.encode(list(texts), prompt=prompt, prompt_name=prompt_name, convert_to_numpy=True, batch_size=7)
    if dimensions:
        vectors = vectors[:, :dimensions]
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True) if normalizes else vectors


def task_vectors(cfg, texts):
    task = get_task("embedding")(cfg)
    model, _, facts = load_model(cfg, task, torch.device("cpu"))
    batch = task.collate(task.encode(texts).features)
    out = task.predict(model, batch)["embedding"]
    return out, facts


TEXTS = builders.texts(24, seed=5, long_every=9)  # rows 0, 9, 18: 300-500 words, past max_seq_length=128


@pytest.mark.parametrize("name, options", [
    ("cls", {}), ("mean-raw", {}), ("lasttoken", {}), ("weightedmean", {}), ("max", {}),
    ("cls-prompts", {"prompt_name": "query"}), ("lasttoken-raw-prompts", {"prompt": "Represent this: "}),
    ("meansqrt-default-prompt", {}), ("meansqrt-default-prompt", {"prompt_name": "passage"}),
    ("cls-prompt-excluded", {"prompt_name": "query"}), ("mean-prompt-excluded", {"prompt": "passage: "}),
    ("cls", {"dimensions": 12}), ("mean-raw", {"dimensions": 20}),
    ("decoder-lasttoken", {}), ("decoder-lasttoken", {"prompt_name": "query"}),
])
def test_one_batch_equals_sentence_transformers(st_models, name, options):
    got, facts = task_vectors(job(st_models[name], **options), TEXTS)
    width = options.get("dimensions") or 32
    assert got.type == pa.list_(pa.float32(), width)
    ref = reference(st_models[name], TEXTS, **options)
    np.testing.assert_allclose(np.stack(got.to_numpy(zero_copy_only=False)), ref, atol=1e-5)
    assert facts["embedding_layout"] == "sentence-transformers" and facts["embedding_dimensions"] == width
    assert facts["embedding_normalize"] == (name not in ("mean-raw", "lasttoken-raw-prompts"))
    # cls pooling reads the first position alone (the prompt included in it, or a model saved by
    # sentence-transformers < 5.5, which pools the first position all the same): the last layer computes only that
    # (model.trim_last_layer); the other poolings read every position.
    from hvd_infer.tasks.sentence_layout import read_sentence_layout

    trimmed = name.startswith("cls") and (name != "cls-prompt-excluded"
                                          or read_sentence_layout(st_models[name]).cls_at_first_position)
    assert facts["last_layer"] == ("first position" if trimmed else "whole"), facts["last_layer"]


def test_vectors_depend_on_text_and_prompt(st_models):
    """Guards the references above: a model that ignored its input would make them vacuous."""
    plain, _ = task_vectors(job(st_models["cls-prompts"]), TEXTS[:2])
    prompted, _ = task_vectors(job(st_models["cls-prompts"], prompt_name="query"), TEXTS[:2])
    a, b = np.stack(plain.to_numpy(zero_copy_only=False)), np.stack(prompted.to_numpy(zero_copy_only=False))
    assert np.abs(a[0] - a[1]).max() > 1e-2 and np.abs(a[0] - b[0]).max() > 1e-2  # 1000x the tolerance


def cli_args(model, data, out, *extra):
    return ["--config", "/dev/null", f"model.path={model}", "model.task=embedding", f"data.path={data}",
            "data.id_columns=[id]", f"output.path={out}", "runtime.progress=false", "data.batch_size=5",
            "output.rows_per_part=9", "mlflow.enabled=false", *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("emb-data") / "ds")
    table = builders.write_dataset(path, 40, files=2, row_group_size=6, seed=7)
    return path, table.column("text").to_pylist()


@pytest.mark.slow
@pytest.mark.parametrize("name, options", [
    ("cls-prompts", {"prompt_name": "query", "dimensions": 16}),
    ("mean-raw", {}),
    ("lasttoken-raw-prompts", {"prompt": "passage: "}),
    ("meansqrt-default-prompt", {}),
    ("decoder-lasttoken", {"prompt_name": "passage"}),
])
def test_two_ranks_equal_sentence_transformers(st_models, data, tmp_path, name, options):
    path, texts = data
    out = tmp_path / "out"
    extra = [f"embedding.{k}={json.dumps(v)}" for k, v in options.items()]  # quoted: "passage: " is YAML
    r = horovodrun(2, cli_args(st_models[name], path, out, *extra))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert {n[:12] for n in os.listdir(out) if n.startswith("part-")} == {"part-r00000-", "part-r00001-"}
    got = pads.dataset(str(out)).to_table()
    width = options.get("dimensions") or 32
    assert got.schema.field("embedding").type == pa.list_(pa.float32(), width)
    got = got.to_pandas().sort_values("id")
    assert got["id"].tolist() == [i * 10 + 3 for i in range(len(texts))]
    ref = reference(st_models[name], texts, **options)
    np.testing.assert_allclose(np.stack(got["embedding"].to_numpy()), ref, atol=1e-5)
    assert "as its sentence-transformers layout says" in r.stdout


def test_no_layout_is_mean_normalised_and_said(tiny_encoder, data, tmp_path):
    """A bare encoder directory: mean pooling + L2 normalisation, and the summary and MLflow say it was assumed."""
    path, texts = data
    out = tmp_path / "out"
    r = cli(cli_args(tiny_encoder, path, out, "mlflow.enabled=true",
                     f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "embedding: mean pooling, L2-normalised, 32 dims (assumed: no sentence-transformers layout" in r.stdout
    got = pads.dataset(str(out)).to_table().to_pandas().sort_values("id")
    emb = np.stack(got["embedding"].to_numpy())
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    params = dict(sqlite3.connect(f"{tmp_path}/mlflow.db").execute("select key, value from params").fetchall())
    assert params["resolved.embedding_layout"] == "none" and params["resolved.embedding_pooling"] == "mean"


def test_bad_embedding_options_fail_in_one_line_before_scoring(st_models, tiny_classifier, data, tmp_path):
    from test_failures import assert_user_error

    path, _ = data
    cases = [
        (st_models["cls-prompts"], ["embedding.prompt_name=instruction"],
         ["embedding.prompt_name='instruction' is not a prompt of model.path", "its prompts: passage, query"]),
        (st_models["cls"], ["embedding.dimensions=33"], ["embedding.dimensions=33 is more than", "gives (32)"]),
        (st_models["cls"], ["embedding.dimensions=-1"], ["embedding.dimensions must be >= 0"]),
        (st_models["cls-prompts"], ['embedding.prompt="q: "', "embedding.prompt_name=query"],
         ["embedding.prompt and embedding.prompt_name are both set"]),
    ]
    for model, extra, fragments in cases:
        out = tmp_path / "out"
        assert_user_error(cli(cli_args(model, path, out, *extra)), *fragments)
        assert not out.exists()


def test_unsupported_module_chain_is_refused(st_models, data, tmp_path):
    """A Dense module after pooling cannot be skipped silently."""
    import shutil

    from test_failures import assert_user_error

    model = tmp_path / "dense"
    shutil.copytree(st_models["cls"], model)
    modules = json.loads((model / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (model / "modules.json").write_text(json.dumps(modules))
    r = cli(cli_args(model, data[0], tmp_path / "out"))
    assert_user_error(r, "Transformer -> Pooling -> Dense -> Normalize", "Dense")


def test_spark_udf_column_from_fixed_size_list():
    from hvd_infer.spark import _numpy_column
    from hvd_infer.tasks.embedding import fixed_size_list_array

    m = np.arange(6, dtype=np.float32).reshape(3, 2)
    np.testing.assert_array_equal(_numpy_column(fixed_size_list_array(m).take(pa.array([2, 0, 1]))), m[[2, 0, 1]])


@pytest.mark.slow
def test_spark_predict_udf_equals_sentence_transformers(st_models, loopback_env):
    """predict_udf returns the vectors as an array column (Spark has no fixed-size lists)."""
    from hvd_infer.spark import predict_udf
    from conftest import spark_session

    spark = spark_session("local[1]", **{"spark.ui.enabled": "false"})
    try:
        df = spark.createDataFrame(list(enumerate(TEXTS)), "id long, text string")
        udf = predict_udf({"model": {"path": st_models["cls-prompts"], "task": "embedding"}, "data": {"path": "/d"},
                           "output": {"path": "/o"}, "embedding": {"prompt_name": "query", "dimensions": 16}})
        rows = df.withColumn("pred", udf("text")).select("id", "pred.embedding").orderBy("id").collect()
    finally:
        spark.stop()
    ref = reference(st_models["cls-prompts"], TEXTS, prompt_name="query", dimensions=16)
    np.testing.assert_allclose(np.array([r["embedding"] for r in rows]), ref, atol=1e-5)
