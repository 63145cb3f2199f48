"""model.runtime=onnxruntime against the plain torch forward, row by row, for every task it runs.

Tiny random models built offline (tests/builders.py, test_tasks' task models; for int8, MiniLM's trained
encoder with a fitted head, builders.minilm_classifier); the jobs run on 2 real ranks through the launcher
(slow), the engine on one batch in process (fast). Labels must be equal,
probabilities and embeddings within float32's tolerance (1e-4). Each test gets its own $TMPDIR, so
its ranks export the graph into an empty cache and share it.
"""
import json
import os
import sqlite3
import subprocess
import sys

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch

import builders
from builders import plain_probs as reference_probs
from conftest import cli as in_process
from conftest import hvd_infer_np, job_args, read_output
from hvd_infer.config import load_config
from hvd_infer.engines.spec import BLOCKWISE_SINCE, release as _release
from hvd_infer.errors import ConfigError
from hvd_infer.model import load_model
from hvd_infer.tasks import get_task
from test_embedding import reference as embedding_reference
from test_failures import assert_user_error, base
from test_tasks import (LABELS, assert_entities_equal, assert_zero_shot_equal, cli, models,  # noqa: F401 (fixture)
                        ner_reference, ner_texts, zero_shot_reference)

ORT = "model.runtime=onnxruntime"
# The Databricks stacks install no ONNX Runtime (scripts/install.sh): there model.runtime=onnxruntime is refused.
onnxruntime = pytest.importorskip("onnxruntime", reason="ONNX Runtime is not installed (pip install hvd_infer[onnx])")
# int8-blockwise's 8-bit MatMulNBits (onnxruntime >= 1.22).
needs_blockwise = pytest.mark.skipif(_release(onnxruntime.__version__) < BLOCKWISE_SINCE,
                                     reason=f"int8-blockwise needs onnxruntime >= {BLOCKWISE_SINCE}")


def own_cache(tmp_path):
    """An environment whose $TMPDIR (where the host's graphs are cached) is this test's own."""
    cache = tmp_path / "tmpdir"
    cache.mkdir(exist_ok=True)
    return {"TMPDIR": str(cache)}, cache / "hvd_infer-onnx"


def cached_graphs(cache):
    return sorted(n for n in os.listdir(cache) if not n.endswith(".lock"))


def test_engine_on_one_batch_equals_eager(tiny_classifier, tmp_path, monkeypatch):
    """The session returns the torch model's logits; a second load reuses the host's graph, unexported."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads $TMPDIR again
    texts = builders.texts(20, seed=5, long_every=7)
    outputs = {}
    for runtime in ("eager", "onnxruntime"):
        cfg = load_config({"model": {"path": tiny_classifier, "runtime": runtime}, "data": {"path": "/d"},
                           "output": {"path": "/o"}})
        task = get_task(cfg.model.task)(cfg)
        model, _, facts = load_model(cfg, task, torch.device("cpu"))
        batch = task.collate(task.encode(texts).features)
        with torch.inference_mode():
            outputs[runtime] = model(**batch).logits.numpy()
    assert facts["runtime"] == "onnxruntime" and "Attention" in facts["onnx_optimizer"]
    np.testing.assert_allclose(outputs["onnxruntime"], outputs["eager"], atol=1e-4)
    assert (outputs["onnxruntime"].argmax(1) == outputs["eager"].argmax(1)).all()
    assert len(set(outputs["eager"].argmax(1))) >= 2  # the rows differ, so equal rows prove something
    graph = facts["onnx_graph"]
    made = os.stat(graph).st_mtime_ns
    model, _, again = load_model(cfg, task, torch.device("cpu"))
    assert again["onnx_graph"] == graph and os.stat(graph).st_mtime_ns == made
    assert cached_graphs(tmp_path / "hvd_infer-onnx") == [os.path.basename(os.path.dirname(graph))]


def test_engine_runs_a_trimmed_last_layer_for_cls_embeddings(tmp_path, monkeypatch, capfd):
    """A cls-pooled encoder's graph is exported from its trimmed last layer (one output position): the same
    vectors as sentence-transformers, and no shape warning from ONNX Runtime."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    model = builders.sentence_model(str(tmp_path / "st-cls"), pooling="cls")
    texts = builders.texts(20, seed=6, long_every=7)
    cfg = load_config({"model": {"path": model, "task": "embedding", "runtime": "onnxruntime"},
                       "data": {"path": "/d"}, "output": {"path": "/o"}})
    task = get_task("embedding")(cfg)
    predictor, _, facts = load_model(cfg, task, torch.device("cpu"))
    got = task.predict(predictor, task.collate(task.encode(texts).features))["embedding"]
    assert facts["last_layer"] == "first position" and facts["runtime"] == "onnxruntime"
    np.testing.assert_allclose(np.stack(got.to_numpy(zero_copy_only=False)), embedding_reference(model, texts),
                               atol=1e-4)
    assert "shape" not in capfd.readouterr().err.lower()


@pytest.fixture
def minilm(minilm_job):
    """MiniLM's trained encoder (int8 error on a tiny random model's large weights says little) with a fitted
    3-label head: the kill-and-resume tests' model (conftest.minilm_job), built once per session."""
    return minilm_job[0]


def test_onnxruntime_int8_quantizes_the_checked_graph(minilm, tmp_path, monkeypatch):
    """model.quantize=int8-per-channel with onnxruntime: ONNX Runtime's int8 of the float32 graph, the head float32."""
    import tempfile

    import onnx

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    texts = builders.texts(40, seed=5, long_every=7)
    probs, quantize = {}, "int8-per-channel"
    for runtime, q in (("eager", "none"), ("onnxruntime", quantize)):
        cfg = load_config({"model": {"path": minilm, "runtime": runtime, "quantize": q},
                           "data": {"path": "/d"}, "output": {"path": "/o"}})
        task = get_task(cfg.model.task)(cfg)
        model, _, facts = load_model(cfg, task, torch.device("cpu"))
        with torch.inference_mode():
            probs[runtime] = torch.softmax(model(**task.collate(task.encode(texts).features)).logits, -1).numpy()
    nodes = onnx.load(facts["onnx_graph"]).graph.node
    quantized = {n.name for n in nodes if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul", "QAttention")}
    assert quantized and facts["quantize"] == quantize and quantize in facts["onnx_optimizer"]
    head = {n.op_type for n in nodes if n.name.startswith("/model/classifier/")}
    assert head and "MatMulInteger" not in head, head
    # int8's error on the logits (log-probabilities centered per row), against their spread over the texts. The
    # head reads MiniLM's pooled [CLS] output, which differs little from text to text (its sentence-transformers
    # training pooled by mean), so int8's noise there is large: 0.18 measured with VNNI, 0.22 with the 7-bit
    # weights of a CPU without; rows shifted by one give 1.22.
    logits = {k: np.log(v) - np.log(v).mean(1, keepdims=True) for k, v in probs.items()}
    error = (logits["onnxruntime"] - logits["eager"]).std() / logits["eager"].std()
    assert error < 0.4, error


@needs_blockwise
def test_onnxruntime_int8_blockwise_keeps_a_trained_encoders_vectors(tmp_path, monkeypatch):
    """model.quantize=int8-blockwise: ONNX Runtime's MatMulNBits (8-bit weights in blocks of 128, activations
    quantized per row and block) on MiniLM's trained encoder: its vectors stay many times closer to float32's
    than per-channel int8's; both int8 graphs are made from the one float32 export the host cached."""
    import tempfile

    import onnx

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    texts = builders.texts(48, seed=6, long_every=9)
    vectors, facts = {}, {}
    for runtime, q in (("eager", "none"), ("onnxruntime", "int8-blockwise"), ("onnxruntime", "int8-per-channel")):
        cfg = load_config({"model": {"path": builders.minilm_dir(), "task": "embedding", "runtime": runtime,
                                     "quantize": q}, "data": {"path": "/d"}, "output": {"path": "/o"}})
        task = get_task(cfg.model.task)(cfg)
        model, _, facts[q] = load_model(cfg, task, torch.device("cpu"))
        got = task.predict(model, task.collate(task.encode(texts).features))["embedding"]
        vectors[q] = np.stack(got.to_numpy(zero_copy_only=False)).astype(np.float64)
        if q == "int8-blockwise":  # the float32 graph it was made from, cached beside it
            plain = [g for g in os.listdir(tmp_path / "hvd_infer-onnx")
                     if not g.endswith(".lock") and g != os.path.basename(os.path.dirname(facts[q]["onnx_graph"]))]
            assert len(plain) == 1, plain
            made = os.stat(tmp_path / "hvd_infer-onnx" / plain[0] / "model.onnx").st_mtime_ns
    assert os.stat(tmp_path / "hvd_infer-onnx" / plain[0] / "model.onnx").st_mtime_ns == made  # not exported again
    nodes = onnx.load(facts["int8-blockwise"]["onnx_graph"]).graph.node
    blocked = [n for n in nodes if n.op_type == "MatMulNBits"]  # per layer: attention output, feed-forward in, out
    assert len(blocked) == 3 * 6 and not [n for n in nodes if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul")]
    assert all({a.name: a.i for a in n.attribute if a.name in ("bits", "block_size", "accuracy_level")}
               == {"bits": 8, "block_size": 128, "accuracy_level": 4} for n in blocked)
    assert "int8-blockwise (MatMulNBits" in facts["int8-blockwise"]["onnx_optimizer"]

    def cosine(a, b):
        return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))

    blockwise, per_channel = (1 - cosine(vectors["none"], vectors[q]) for q in ("int8-blockwise", "int8-per-channel"))
    # Measured: 1 - cosine 3.5e-4 (blockwise) against 7.1e-3 (per-channel) on 512 real rows.
    assert blockwise.max() < 2e-3 and blockwise.mean() * 4 < per_channel.mean(), (blockwise.mean(), per_channel.mean())


@needs_blockwise
@pytest.mark.parametrize("name, task", [("ner", "token-classification"), ("nli", "zero-shot-classification")])
def test_onnxruntime_int8_blockwise_runs_ner_and_zero_shot(models, tmp_path, monkeypatch, name, task):
    """int8-blockwise (auto-check's candidate for these tasks) on their models: the encoder's MatMuls blockwise,
    the head in float32, logits near eager's."""
    import tempfile

    import onnx
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    texts = ner_texts(12, seed=2) if name == "ner" else builders.texts(12, seed=2)
    logits = {}
    for runtime, q in (("eager", "none"), ("onnxruntime", "int8-blockwise")):
        cfg = load_config({"model": {"path": models[name], "task": task, "runtime": runtime, "quantize": q},
                           "zero_shot": {"candidate_labels": LABELS}, "data": {"path": "/d"}, "output": {"path": "/o"}})
        t = get_task(cfg.model.task)(cfg)
        model, _, facts = load_model(cfg, t, torch.device("cpu"))
        batch = t.collate(t.encode(texts).features)
        with torch.inference_mode():
            logits[q] = model(**{k: v for k, v in batch.items() if torch.is_tensor(v)}).logits.float().numpy()
        if name == "ner":  # the real tokens' logits (padding's are nobody's)
            logits[q] = logits[q][batch["attention_mask"].bool().numpy()]
    nodes = onnx.load(facts["onnx_graph"]).graph.node
    assert [n for n in nodes if n.op_type == "MatMulNBits"]
    assert not [n for n in nodes if n.name.startswith("/model/classifier/") and n.op_type == "MatMulNBits"]
    assert "nodes in float32)" in facts["onnx_optimizer"]
    error, scale = np.abs(logits["int8-blockwise"] - logits["none"]), np.abs(logits["none"]).max()
    assert error.mean() < 0.02 * scale and error.max() < 0.15 * scale, (error.mean(), error.max(), scale)


def test_int8_blockwise_is_onnx_runtimes_and_new_enough(monkeypatch):
    """int8-blockwise in torch is refused at the config; with an ONNX Runtime older than 1.22 where the ranks run."""
    from hvd_infer.engines import checked_spec
    from hvd_infer.hardware import Platform

    with pytest.raises(ConfigError, match="int8-blockwise is ONNX Runtime's int8 .*set model.runtime=onnxruntime"):
        load_config({"model": {"path": "/m", "quantize": "int8-blockwise"}, "data": {"path": "/d"},
                     "output": {"path": "/o"}})
    cfg = load_config({"model": {"path": "/m", "runtime": "onnxruntime", "quantize": "int8-blockwise"},
                       "data": {"path": "/d"}, "output": {"path": "/o"}})
    with pytest.raises(ConfigError, match=r"needs onnxruntime >= 1\.22 .*this one is 1\.21\.1"):
        checked_spec(cfg.model, Platform(ort_version="1.21.1"))
    checked_spec(cfg.model, Platform(ort_version="1.22.0"))
    with pytest.raises(ConfigError, match="needs ONNX Runtime and onnx, which are not installed here"):
        checked_spec(cfg.model, Platform(ort_version=""))


def test_onnxruntime_int8_weights_are_7_bit_without_vnni(tiny_classifier, tmp_path, monkeypatch):
    """Without VNNI, ONNX Runtime's AVX2 int8 kernel adds pairs of products in 16 bits, which full-range weights
    can saturate: there the graph's weights are 7-bit, and it is cached apart from the 8-bit one."""
    import tempfile

    import onnx
    from onnx import numpy_helper

    from hvd_infer.hardware import VNNI_ENV

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    cfg = load_config({"model": {"path": tiny_classifier, "runtime": "onnxruntime", "quantize": "int8-per-channel"},
                       "data": {"path": "/d"}, "output": {"path": "/o"}})
    widest, graphs = {}, set()
    for vnni in ("0", "1"):
        monkeypatch.setenv(VNNI_ENV, vnni)
        _, _, facts = load_model(cfg, get_task(cfg.model.task)(cfg), torch.device("cpu"))
        assert ("7-bit weights (no VNNI)" in facts["onnx_optimizer"]) == (vnni == "0"), facts["onnx_optimizer"]
        weights = [numpy_helper.to_array(t) for t in onnx.load(facts["onnx_graph"]).graph.initializer
                   if t.data_type == onnx.TensorProto.INT8]
        assert weights
        widest[vnni] = max(int(np.abs(w.astype(np.int32)).max()) for w in weights)
        graphs.add(facts["onnx_graph"])
    assert widest == {"0": 64, "1": 127} and len(graphs) == 2


@pytest.mark.parametrize("options, fragment", [
    ({"task": "text-generation"}, "model.runtime=onnxruntime does not run text-generation"),
    ({"dtype": "bfloat16"}, "got model.dtype=bfloat16"),
    ({"dtype": "auto-check"}, "got model.dtype=auto-check"),
])
def test_config_refuses_what_onnxruntime_does_not_run(options, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config({"model": {"path": "/m", "runtime": "onnxruntime", **options}, "data": {"path": "/d"},
                     "output": {"path": "/o"}})


@pytest.mark.slow
def test_classification_two_ranks_equals_plain_forward(tiny_classifier, dataset, tmp_path):
    path, table = dataset
    env, cache = own_cache(tmp_path)
    out = tmp_path / "out"
    r = hvd_infer_np(2, job_args(tiny_classifier, path, out, tmp_path, ORT), env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = read_output(out)
    ref = reference_probs(tiny_classifier, table.column("text").to_pylist())
    assert got["id"].tolist() == table.column("id").to_pylist()
    assert got["label"].tolist() == [f"class_{chr(97 + i)}" for i in ref.argmax(1)]
    np.testing.assert_allclose(np.stack(got["probs"]), ref, atol=1e-4)
    # Both ranks ran the one graph the host cached; the engine is in the summary, manifest and MLflow.
    assert len(cached_graphs(cache)) == 1
    assert "ONNX Runtime (" in r.stdout
    assert json.loads((out / "_manifest.json").read_text())["summary"]["runtime"] == "onnxruntime"
    db = sqlite3.connect(tmp_path / "mlflow.db")
    params = dict(db.execute("select key, value from params").fetchall())
    assert params["model.runtime"] == "onnxruntime" and params["resolved.runtime"] == "onnxruntime"
    assert params["resolved.deepspeed"] == "False"


@pytest.mark.slow
def test_embedding_two_ranks_equals_sentence_transformers(tmp_path):
    model = builders.sentence_model(str(tmp_path / "st-mean"), pooling="mean")
    texts = builders.texts(30, seed=4, long_every=9)
    data = tmp_path / "data"
    table = builders.write_dataset(str(data), len(texts), files=2, row_group_size=5, text=texts)
    env, _ = own_cache(tmp_path)
    out = tmp_path / "out"
    r = hvd_infer_np(2, base(model, data, out, tmp_path, "model.task=embedding", "mlflow.enabled=false",
                             "data.batch_size=4", "output.rows_per_part=8", ORT), env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = pads.dataset(str(out)).to_table().to_pandas().sort_values("id")
    assert got["id"].tolist() == table.column("id").to_pylist()
    np.testing.assert_allclose(np.stack(got["embedding"]), embedding_reference(model, texts), atol=1e-4)


@pytest.mark.slow
def test_zero_shot_two_ranks_equals_pipeline(models, tmp_path, monkeypatch):
    data = tmp_path / "data"
    table = builders.write_dataset(str(data), 24, files=2, row_group_size=5, text=builders.texts(24, seed=3, long_every=100))
    monkeypatch.setenv("TMPDIR", own_cache(tmp_path)[0]["TMPDIR"])  # cli() starts ranks in this environment
    got, _ = cli(tmp_path, models["nli"], "zero-shot-classification", data,
                 f"zero_shot.candidate_labels=[{','.join(LABELS)}]", "model.max_length=512", ORT, ranks=2)
    assert got["id"].tolist() == table.column("id").to_pylist()
    ref = zero_shot_reference(models["nli"], table.column("text").to_pylist(), LABELS, False)
    assert_zero_shot_equal(got["labels"], got["scores"], ref)


@pytest.mark.slow
def test_ner_two_ranks_equals_pipeline(models, tmp_path, monkeypatch):
    data = tmp_path / "data"
    texts = ner_texts(24, seed=3)
    builders.write_dataset(str(data), len(texts), files=2, row_group_size=5, text=texts)
    monkeypatch.setenv("TMPDIR", own_cache(tmp_path)[0]["TMPDIR"])
    got, _ = cli(tmp_path, models["ner"], "token-classification", data, "token_classification.aggregation=first",
                 ORT, ranks=2)
    assert_entities_equal(got["entities"].tolist(), ner_reference(models["ner"], texts, "first"))


def test_launcher_refuses_what_onnxruntime_does_not_run(models, dataset, tmp_path):
    """hvd-infer -np 2 checks the job before any rank starts (in process: nothing is started)."""
    r = in_process(["-np", "2"] + base(models["lm"], dataset[0], tmp_path / "gen", tmp_path,
                                       "model.task=text-generation", ORT))
    assert_user_error(r, "model.runtime=onnxruntime does not run text-generation", "model.runtime=eager")
    assert not (tmp_path / "gen").exists()


@pytest.mark.slow
def test_errors_through_the_launcher(tiny_classifier, dataset, tmp_path):
    path, _ = dataset
    # An environment without ONNX Runtime: a package of that name whose import fails as a missing one does.
    hidden = tmp_path / "no-onnxruntime" / "onnxruntime"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'onnxruntime'\")\n")
    env = {"PYTHONPATH": os.pathsep.join([str(hidden.parent), os.environ.get("PYTHONPATH", "")])}
    r = hvd_infer_np(2, base(tiny_classifier, path, tmp_path / "none", tmp_path, ORT), env=env)
    assert_user_error(r, "pip install onnxruntime onnx", "pip install hvd_infer[onnx]", "model.runtime=eager")
    assert not (tmp_path / "none").exists() or not any((tmp_path / "none").glob("part-*"))
    # predict_udf says it on the driver, as it is made, rather than a worker's traceback later.
    cfg = {"model": {"path": tiny_classifier, "runtime": "onnxruntime"}, "data": {"path": path},
           "output": {"path": str(tmp_path / "udf")}}
    r = subprocess.run([sys.executable, "-c", "from hvd_infer.errors import ConfigError\n"
                        "from hvd_infer.spark import predict_udf\n"
                        f"try:\n    predict_udf({cfg!r})\nexcept ConfigError as e:\n    print(e)\n"],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, **env))
    assert r.returncode == 0 and "pip install onnxruntime onnx" in r.stdout, r.stdout + r.stderr[-2000:]
    # auto-check leaves out the candidates of an ONNX Runtime that does not import.
    r = subprocess.run([sys.executable, "-c", "import torch\nfrom hvd_infer.config import load_config\n"
                        "from hvd_infer.precision import candidates\n"
                        f"print([c.engine for c in candidates(load_config({cfg!r}), torch.device('cpu'))])"],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, **env))
    assert r.returncode == 0 and "onnxruntime" not in r.stdout, r.stdout + r.stderr[-2000:]


def test_resume_with_another_runtime_refused(tiny_classifier, dataset, tmp_path, monkeypatch):
    """A world of one, in process (cli): the job, its resume with another runtime refused, then with its own."""
    import tempfile

    path, _ = dataset
    monkeypatch.setenv("TMPDIR", own_cache(tmp_path)[0]["TMPDIR"])
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads $TMPDIR again
    out = tmp_path / "out"
    first = base(tiny_classifier, path, out, tmp_path, "mlflow.enabled=false", "output.rows_per_part=40", ORT)
    r = in_process(first)
    assert r.returncode == 0, r.stderr[-3000:]
    parts = sorted(p for p in out.glob("part-*.parquet"))
    for p in parts[1:]:  # as if the run had stopped after its first part
        p.unlink()
    eager = [a for a in first if a != ORT] + ["output.mode=resume"]
    assert_user_error(in_process(eager), "output.mode=resume but runtime changed")
    r = in_process(first + ["output.mode=resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert pads.dataset(str(out)).count_rows() == dataset[1].num_rows
