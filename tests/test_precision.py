"""Precision chosen by measurement (model.dtype=auto-check), bfloat16 refused where it would crawl.

HVD_INFER_CPU_BF16 stands in for the CPU's flags, so these tests behave the same on a CPU with
AVX512-BF16/AMX and on one with AVX2 only. Timings decide the auto-check's choice, so the tests
assert what holds whatever it chose: every rank scored with the choice, and it is reported.
"""
import importlib.util
import sqlite3

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
import torch

import builders
from conftest import cli, horovodrun
from hvd_infer.config import load_config
from hvd_infer.engines.spec import BLOCKWISE_SINCE, release as _release
from hvd_infer.errors import ConfigError
from hvd_infer.hardware import NATIVE_BF16_ENV
from hvd_infer.model import load_model
from hvd_infer.agreement import agreement
from hvd_infer.decisions import decisions_dir as host_decisions_dir
from hvd_infer.tasks import get_task
from test_failures import assert_user_error, base

NO_BF16 = {NATIVE_BF16_ENV: "0"}


def parse(token):
    """The engine spec a precision's token (the output's job file) names, for a CPU job."""
    from hvd_infer.decisions import parse_precision
    from hvd_infer.hardware import this_platform

    cfg = load_config({"model": {"path": "/m", "dtype": "auto-check"}, "data": {"path": "/d"}, "output": {"path": "/o"}})
    return parse_precision(token, cfg, this_platform("cpu"))
# The candidates on a CPU without native bf16 (NO_BF16): torch's per-channel int8, and ONNX Runtime's where it
# is installed (the default stack; not the Databricks stacks).
ORT = ["onnxruntime-int8-per-channel"] if all(
    importlib.util.find_spec(m) for m in ("onnxruntime", "onnx")) else []
CANDIDATES = ["int8-per-channel"] + ORT
# For embedding, token-classification and zero-shot, ONNX Runtime's int8-blockwise too (onnxruntime >= 1.22).
BLOCKWISE = ["onnxruntime-int8-blockwise"] if ORT and _release(
    importlib.import_module("onnxruntime").__version__) >= BLOCKWISE_SINCE else []


@pytest.fixture(autouse=True)
def _no_decision_kept_by_an_earlier_test(tmp_path, monkeypatch):
    """Each test's auto-check measures: decisions kept on this host by an earlier test or run are not reused (its
    ONNX graphs still are). A job in other processes gets its own $TMPDIR instead."""
    from hvd_infer import decisions

    monkeypatch.setattr(decisions, "decisions_dir", lambda: str(tmp_path / "decisions"))


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A tiny BERT classifier whose outputs depend on the text (BERT's 0.02 init hardly does), so int8 shows."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "cls"
    BertForSequenceClassification(BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        num_labels=3, initializer_range=0.3)).save_pretrained(path)
    AutoTokenizer.from_pretrained(builders.minilm_dir()).save_pretrained(path)
    return str(path)


# outlier_classifier's layer that int8 quantizes badly
BAD_LAYER = "bert.encoder.layer.0.attention.output.dense"


@pytest.fixture(scope="module")
def outlier_classifier(tmp_path_factory):
    """classifier with one layer int8 quantizes badly: a weight 40x the others in each of its rows sets the row's
    int8 scale, so the rest of the row rounds away."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        num_labels=3, initializer_range=0.3))
    with torch.no_grad():
        model.get_submodule(BAD_LAYER).weight[:, 0] *= 40
    path = tmp_path_factory.mktemp("models") / "outlier"
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(builders.minilm_dir()).save_pretrained(path)
    return str(path)


def job(model, data=None, **model_options):
    return load_config({"model": {"path": model, **model_options}, "data": {"path": "/d", **(data or {})},
                        "output": {"path": "/o"}})


@pytest.mark.parametrize("extra, fragments", [
    (["model.dtype=bfloat16"], ["model.dtype=bfloat16 on this CPU, which has no AVX512-BF16/AMX", "auto-check",
                                "model.allow_slow_bf16=true"]),
    (["model.dtype=auto-check", "model.check_rows=0"], ["model.check_rows must be in [8, 100000], got 0"]),
    (["model.dtype=auto-check", "model.check_agreement=1.5"], ["model.check_agreement must be in (0, 1], got 1.5"]),
    (["model.dtype=auto-check", "model.check_agreement=0"], ["model.check_agreement must be in (0, 1], got 0"]),
    (["model.dtype=auto-check", "model.quantize=int8-per-channel"],
     ["model.dtype=auto-check chooses the quantization itself"]),
    (["model.dtype=fast"], ["model.dtype must be one of auto, auto-check, float32, float16, bfloat16"]),
    (["model.rescore_margin=0.1"], ["model.rescore_margin rescores in float32 the rows int8 is unsure of",
                                    "got model.task=text-classification, model.quantize=none",
                                    "set model.quantize=int8-per-channel, or model.rescore_margin=0"]),
    (["model.quantize=int8-per-channel", "model.rescore_margin=1.5"], ["model.rescore_margin must be in [0, 1], got 1.5"]),
    # Removed settings: refused in one line naming what to use instead.
    (["model.quantize=int8"], ["model.quantize=int8 (per-tensor scales) was removed: use "
                               "model.quantize=int8-per-channel, faster and closer to float32 on every CPU measured"]),
    (["model.quantize=int8-per-channel", "model.keep_float32=[bert.encoder.layer.1.output.dense]"],
     ["config key 'model.keep_float32' was removed:", "use model.rescore_margin"]),
])
def test_bad_precision_options_fail_in_one_line(extra, fragments, tiny_classifier, dataset, tmp_path):
    out = tmp_path / "out"
    assert_user_error(cli(base(tiny_classifier, dataset[0], out, tmp_path, *extra), env=NO_BF16), *fragments)
    assert not out.exists()


def test_slow_bf16_runs_when_forced(tiny_classifier, dataset, tmp_path):
    out = tmp_path / "out"
    r = cli(base(tiny_classifier, dataset[0], out, tmp_path, "model.dtype=bfloat16", "model.allow_slow_bf16=true",
                      "mlflow.enabled=false"), env=NO_BF16)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(bfloat16" in r.stdout


def test_per_channel_int8_keeps_the_head_in_float32(classifier):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    cfg = job(classifier, quantize="int8-per-channel")
    model, _, facts = load_model(cfg, get_task(cfg.model.task)(cfg), torch.device("cpu"))
    module = model.module
    assert type(module.classifier) is torch.nn.Linear and type(module.bert.pooler.dense) is torch.nn.Linear
    query = module.bert.encoder.layer[0].attention.self.query
    assert isinstance(query, DynamicLinear) and query.weight().qscheme() == torch.per_channel_affine
    assert facts["quantize"] == "int8-per-channel" and not facts["deepspeed"]


@pytest.mark.parametrize("runtime", ["eager"] + (["onnxruntime"] if ORT else []))
def test_rescoring_gives_float32_outputs_to_the_rows_int8_is_unsure_of(outlier_classifier, runtime):
    """model.rescore_margin: a row whose int8 probabilities (torch's, or ONNX Runtime's) put its two likeliest
    labels closer than the margin gets float32's probabilities, every other row int8's; a margin over every gap is
    float32 throughout. (Batches of 8 throughout: int8's activation scale is the batch's, so its probabilities
    depend on the batch.)"""
    texts = builders.texts(40)

    def probs(**options):
        if options.get("quantize"):
            options["runtime"] = runtime
        cfg = job(outlier_classifier, {"batch_size": 8}, **options)
        task = get_task(cfg.model.task)(cfg)
        model = load_model(cfg, task, torch.device("cpu"))[0]
        enc = task.encode(texts)
        return model, np.concatenate([
            np.stack(task.predict(model, task.collate(enc.features[np.arange(i, min(i + 8, len(texts)))]))["probs"]
                     .to_numpy(zero_copy_only=False)) for i in range(0, len(texts), 8)])

    f32 = probs()[1]
    int8 = probs(quantize="int8-per-channel")[1]
    top = np.sort(int8, axis=1)
    gaps = top[:, -1] - top[:, -2]
    margin = float(np.median(gaps))
    # torch's int8 changes labels of this model, ONNX Runtime's (8-bit activations) only probabilities: either shows
    assert (f32.argmax(1) != int8.argmax(1)).any() or runtime == "onnxruntime"
    assert np.abs(f32 - int8).max() > 1e-2
    model, got = probs(quantize="int8-per-channel", rescore_margin=margin)
    unsure = gaps < margin
    assert 0 < unsure.sum() < len(texts) and model.rescored == unsure.sum() and model.rows == len(texts)
    np.testing.assert_allclose(got[unsure], f32[unsure], atol=1e-5)
    np.testing.assert_allclose(got[~unsure], int8[~unsure], atol=1e-5)
    np.testing.assert_allclose(probs(quantize="int8-per-channel", rescore_margin=1.0)[1], f32, atol=1e-5)


def test_auto_check_is_decided_by_the_job_not_a_bare_load(tiny_classifier):
    cfg = job(tiny_classifier, dtype="auto-check")
    with pytest.raises(ConfigError, match="auto-check is decided by the job"):
        load_model(cfg, get_task(cfg.model.task)(cfg), torch.device("cpu"))


@pytest.mark.slow
def test_every_rank_imports_the_model_code_before_the_check(tiny_classifier):
    """import_model_code: the task's model class, DeepSpeed and ONNX Runtime imported, no weights loaded, in a fresh
    process (here they are imported already)."""
    import subprocess
    import sys

    code = ("import sys, torch; from hvd_infer.config import load_config; from hvd_infer.tasks import get_task; "
            "from hvd_infer.model import import_model_code; "
            f"cfg = load_config({{'model': {{'path': {tiny_classifier!r}}}, 'data': {{'path': '/d'}}, "
            "'output': {'path': '/o'}}); "
            "import_model_code(cfg, get_task(cfg.model.task)(cfg), torch.device('cpu')); "
            "print(sorted(m for m in ('transformers.models.bert.modeling_bert', 'deepspeed', 'onnxruntime') "
            "if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    expected = ["deepspeed", "transformers.models.bert.modeling_bert"] + (["onnxruntime"] if ORT else [])
    assert r.stdout.split("\n")[-2] == str(sorted(expected))


def test_a_smaller_job_checks_fewer_rows_and_the_smallest_skip(monkeypatch):
    from hvd_infer.precision import PAYBACK, candidates, sample_rows, skip_reason

    monkeypatch.setenv(NATIVE_BF16_ENV, "0")
    monkeypatch.setenv("HVD_INFER_CPU_AVX512", "1")  # float32 on oneDNN's Linear, as on a CPU with AVX512
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    cpu = torch.device("cpu")
    cfg = job("/m", dtype="auto-check")
    assert [c.name for c in candidates(cfg, cpu)] == CANDIDATES
    per_row = PAYBACK * (1 + len(CANDIDATES)) * 2  # input rows per checked row at 2 ranks
    assert sample_rows(cfg, cpu, 10 ** 7, 2) == 512  # model.check_rows
    assert sample_rows(cfg, cpu, per_row * 100, 2) == 100 and skip_reason(cfg, cpu, per_row * 100, 2) == ""
    assert sample_rows(cfg, cpu, per_row * 64, 2) == 64 and skip_reason(cfg, cpu, per_row * 64, 2) == ""
    assert "rows x" in skip_reason(cfg, cpu, per_row * 64 - 1, 2)  # under one chunk in each precision
    generation = job("/m", dtype="auto-check", task="text-generation")
    assert [c.name for c in candidates(generation, cpu)] == ["int8-per-channel"]  # no ONNX Runtime
    # No rescoring for these tasks: int8-blockwise is tried where float32 runs on torch's Linear (no AVX512, or
    # model.onednn=false), not against oneDNN's float32.
    for task in ("embedding", "token-classification"):
        assert [c.name for c in candidates(job("/m", dtype="auto-check", task=task), cpu)] == CANDIDATES
        assert [c.name for c in candidates(job("/m", dtype="auto-check", task=task, onednn=False), cpu)] == (
            CANDIDATES + BLOCKWISE)
    monkeypatch.setenv("HVD_INFER_CPU_AVX512", "0")
    assert [c.name for c in candidates(job("/m", dtype="auto-check", task="embedding"), cpu)] == CANDIDATES + BLOCKWISE
    assert [c.name for c in candidates(cfg, cpu)] == CANDIDATES  # text-classification: its rescoring instead


def test_sample_is_the_inputs_first_rows(dataset):
    from hvd_infer.dataset import open_input, read_head

    path, table = dataset  # 3 files, row groups of 7 rows
    inp = open_input(load_config({"model": {"path": "/m"}, "data": {"path": path}, "output": {"path": "/o"}}).data)
    assert read_head(inp, ["text", "id"], 60).to_pydict() == table.select(["text", "id"]).slice(0, 60).to_pydict()
    assert read_head(inp, ["id"], 10_000).num_rows == table.num_rows


def test_agreement_per_task_output():
    labels = lambda *x: {"label": pa.array(list(x))}  # noqa: E731
    assert agreement(labels("a", "b", "c", "d"), labels("a", "b", "x", "d")) == 0.75
    texts = lambda *x: {"generated_text": pa.array(list(x))}  # noqa: E731
    assert agreement(texts("the cat", "a dog"), texts("the cat", "a dog.")) == 0.5
    ent = lambda g, s, e, score: {"entity_group": g, "score": score, "start": s, "end": e, "word": "w"}  # noqa: E731
    ref = {"entities": pa.array([[ent("PER", 0, 5, 0.9)], [], [ent("LOC", 3, 9, 0.8)]])}
    got = {"entities": pa.array([[ent("PER", 0, 5, 0.7)], [], [ent("LOC", 3, 8, 0.8)]])}  # scores may move, spans not
    assert agreement(ref, got) == pytest.approx(2 / 3)
    vectors = np.array([[1.0, 0.0], [0.6, 0.8]], dtype=np.float32)
    turned = np.array([[0.0, 1.0], [0.6, 0.8]], dtype=np.float32)  # first row orthogonal: cosine 0
    emb = lambda m: {"embedding": pa.FixedSizeListArray.from_arrays(pa.array(m.reshape(-1)), 2)}  # noqa: E731
    assert agreement(emb(vectors), emb(turned)) == pytest.approx(0.5)


def test_agreement_bounds_are_exact_over_the_sample():
    from hvd_infer.agreement import agreement_bounds

    assert agreement_bounds(60, 64, 128, 0.0) == (60 / 128, 124 / 128)  # 4 of 64 labels differ so far
    assert agreement_bounds(63.9, 64, 128, -1.0) == pytest.approx(((63.9 - 64) / 128, 127.9 / 128))  # cosines
    assert agreement_bounds(128, 128, 128, 0.0) == (1.0, 1.0)  # every row scored: the bounds meet


def test_the_checks_chunks_are_batched_as_tightly_as_the_job(classifier):
    """The check's chunks each take whole length-sorted batches of the sample, short and long rows alike, so
    its batches pad no more than the job's would; chunks of rows in input order padded each to its long row."""
    from hvd_infer.batcher import length_sorted_batches
    from hvd_infer.agreement import CHUNK_ROWS
    from hvd_infer.agreement import chunk_batches as _chunk_batches
    from hvd_infer.agreement import dealt_chunks as _dealt_chunks

    cfg = job(classifier, data={"batch_size": 16, "pad_to_multiple_of": 1})
    task = get_task(cfg.model.task)(cfg)
    model, _, _ = load_model(cfg, task, torch.device("cpu"))
    # one long text in every 16: in input order, every 64-row chunk pads a batch of 16 to a long row
    texts = [("word " * 200 if i % 16 == 0 else "short text " * (1 + i % 5)) for i in range(200)]

    chunks, rows_per_batch = _dealt_chunks(cfg, task, model, torch.device("cpu"), texts, None)

    def padded(chunks):
        batches = [_chunk_batches(cfg, task, model, torch.device("cpu"), [texts[i] for i in c], None,
                                  rows_per_batch)[0] for c in chunks]
        return sum(b["input_ids"].numel() for chunk in batches for b in chunk)

    assert rows_per_batch == 16  # halving would pad no less: each long row pads only itself
    assert sorted(np.concatenate(chunks).tolist()) == list(range(200))  # every row once
    assert len(chunks) == 200 // CHUNK_ROWS + 1 and all(len(c) <= CHUNK_ROWS + 16 for c in chunks)
    lengths = task.encode(texts, None).lengths
    whole = sum(len(b) * lengths[b].max() for b in length_sorted_batches(lengths, 16, 0, len(texts)))
    assert padded(chunks) == whole
    assert padded([np.arange(s, min(s + CHUNK_ROWS, 200)) for s in range(0, 200, CHUNK_ROWS)]) > 1.5 * whole


def test_the_checks_sample_is_cut_into_smaller_batches_where_they_pad_less():
    """A hundred rows of spread lengths cut into the job's batches of 32 pad far more than the job, which sorts
    thousands of rows first: the sample's batches are halved while that pads at least a tenth less."""
    from hvd_infer.agreement import SAMPLE_BATCH_ROWS, _sample_rows_per_batch

    spread = np.random.default_rng(0).lognormal(3.5, 0.9, 100).clip(8, 256).round()
    padded = {rows: sum(spread[np.argsort(-spread)][i] * min(rows, 100 - i) for i in range(0, 100, rows))
              for rows in (32, 16, 8, 4)}
    chosen = _sample_rows_per_batch(spread, 32)
    assert chosen < 32 and padded[chosen] <= 0.9 * padded[32]
    assert chosen == SAMPLE_BATCH_ROWS or padded[chosen // 2] > 0.9 * padded[chosen]  # stopped where it gains little
    assert _sample_rows_per_batch(np.full(100, 40.0), 32) == 32  # equal lengths pad nothing: the job's batches
    assert _sample_rows_per_batch(spread, 4) == 4  # never more rows than the job's batches


# Dynamic int8 scales activations per batch, so a row's output depends on its batch: rows one at a time,
# unpadded, make the job's outputs reproducible here.
ONE_ROW = {"batch_size": 1, "pad_to_multiple_of": 1}


def reference_probs(texts, cfg):
    """The task's probs for every text with cfg's precision, in process, one row at a time."""
    task = get_task(cfg.model.task)(cfg)
    loaded, _, _ = load_model(cfg, task, torch.device("cpu"))
    return np.concatenate([np.stack(task.predict(loaded, task.collate(task.encode([t]).features))["probs"]
                                    .to_numpy(zero_copy_only=False)) for t in texts])


@pytest.mark.slow
def test_auto_check_two_ranks_use_the_choice_and_report_it(classifier, tmp_path):
    from hvd_infer.precision import PAYBACK

    path = str(tmp_path / "data")
    table = builders.write_dataset(path, PAYBACK * 16 * (1 + len(CANDIDATES)) * 2, row_group_size=20)  # no skip
    out = tmp_path / "out"
    (tmp_path / "tmpdir").mkdir()  # the ranks' own host cache: no decision an earlier run kept is reused
    r = horovodrun(2, base(classifier, path, out, tmp_path, "model.dtype=auto-check", "model.check_rows=16",
                           "data.batch_size=1", "data.pad_to_multiple_of=1", "output.rows_per_part=40"),
                   env={**NO_BF16, "TMPDIR": str(tmp_path / "tmpdir")})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    params = dict(sqlite3.connect(f"{tmp_path}/mlflow.db").execute("select key, value from params").fetchall())
    choice = params["resolved.precision_choice"]
    for name in ["float32"] + CANDIDATES:  # bfloat16 is no candidate on a CPU without it
        assert float(params[f"resolved.precision_{name}_seconds"]) > 0
    assert_chosen_by_the_rule(params)
    assert params["resolved.precision_check_rows"] == "16" and params["resolved.precision_check"] == "measured"
    assert f"model.dtype=auto-check on 16 rows chose {choice}" in r.stdout
    # Every rank scored with the choice: all rows equal the chosen precision's reference.
    got = pads.dataset(str(out)).to_table().to_pandas().sort_values("id")
    texts = table.column("text").to_pylist()
    chosen = parse(job_file_identity(out)["precision"])
    assert chosen.name == choice
    ref = reference_probs(texts, job(classifier, ONE_ROW, quantize=chosen.quantize, runtime=chosen.engine,
                                     rescore_margin=chosen.rescore))
    np.testing.assert_allclose(np.stack(got["probs"].to_numpy()), ref, atol=1e-5)
    if chosen.quantize != "none" and not chosen.rescore:  # int8 is not float32: the check above tells them apart (ONNX Runtime float32 is within 1e-6 of it)
        assert np.abs(reference_probs(texts, job(classifier, ONE_ROW)) - ref).max() > 1e-5


# -- the check that pays for itself: early verdicts, the skip, the resume -------------------------------------

def assert_chosen_by_the_rule(params, least_agreement=0.995):
    """What auto-check recorded justifies its choice: float32, or a candidate that agreed with float32 at least as
    asked over every row it scored, at least MIN_SPEEDUP as fast as float32 on the same rows."""
    from hvd_infer.decisions import MIN_SPEEDUP

    choice = params["resolved.precision_choice"]
    if choice == "float32":
        return
    assert float(params[f"resolved.precision_{choice}_agreement"]) >= least_agreement, params
    assert params[f"resolved.precision_{choice}_rows"] == params["resolved.precision_float32_rows"], params
    assert (float(params[f"resolved.precision_{choice}_seconds"]) * MIN_SPEEDUP
            <= float(params["resolved.precision_float32_seconds"])), params


def params_of(tmp):
    return dict(sqlite3.connect(f"{tmp}/mlflow.db").execute("select key, value from params").fetchall())


def job_file_identity(out):
    import json

    return json.loads((out / "_hvd_infer_job.json").read_text())["identity"]


def test_a_candidate_that_cannot_agree_is_rejected_after_one_chunk(tiny_encoder, tmp_path):
    """check_agreement=1 on embeddings: int8's cosines fall short of 1 on the first chunk, so no int8 (ONNX
    Runtime's int8-blockwise included: float32 on torch's Linear here) can reach it whatever the other rows do; the
    check stops there, 64 of its 128 rows scored, and runs float32."""
    from hvd_infer.agreement import CHUNK_ROWS
    from hvd_infer.precision import PAYBACK

    rows = PAYBACK * 128 * (1 + len(CANDIDATES + BLOCKWISE))  # just enough for the check to be worth running
    data = tmp_path / "data"
    builders.write_dataset(str(data), rows, row_group_size=100)
    r = cli(base(tiny_encoder, data, tmp_path / "out", tmp_path, "model.task=embedding", "model.dtype=auto-check",
                      "model.check_rows=128", "model.check_agreement=1", "model.onednn=false"), env=NO_BF16)
    assert r.returncode == 0, r.stderr[-3000:]
    params = params_of(tmp_path)
    # ONNX Runtime's float32 may reproduce torch's vectors to the last bit (cosine 1), so it may be chosen.
    choice = params["resolved.precision_choice"]
    assert choice in ("float32", "onnxruntime") and params["resolved.precision_check"] == "measured"
    assert params["resolved.precision_check_rows"] == "128"
    int8s = [name for name in CANDIDATES + BLOCKWISE if "int8" in name]
    for name in ["float32"] + int8s:
        assert params[f"resolved.precision_{name}_rows"] == str(CHUNK_ROWS) or choice != "float32"
    for name in int8s:
        assert params[f"resolved.precision_{name}_rows"] == str(CHUNK_ROWS)
        assert float(params[f"resolved.precision_{name}_agreement"]) < 1
        assert f"{name} " in r.stdout and "rejected: < 1.0 whatever the other rows" in r.stdout
    assert f"model.dtype=auto-check on 128 rows chose {choice}" in r.stdout
    assert job_file_identity(tmp_path / "out")["precision"] == choice


def measure_with(score, model, tmp_path, monkeypatch, **model_options):
    """precision.measure on 192 rows of a 200-row input, with precision._score replaced by `score` (which calls the
    real one and changes what a test needs), on a CPU taken to lack native bf16."""
    from hvd_infer import precision
    from hvd_infer.dataset import open_input

    monkeypatch.setattr(precision, "_score", score)
    monkeypatch.setenv(NATIVE_BF16_ENV, "0")
    builders.write_dataset(str(tmp_path / "data"), 200, row_group_size=50)
    cfg = load_config({"model": {"path": model, "dtype": "auto-check", **model_options},
                       "data": {"path": str(tmp_path / "data")}, "output": {"path": "/o"}})
    return precision.measure(cfg, get_task(cfg.model.task)(cfg), torch.device("cpu"), open_input(cfg.data), 192)[0]


@pytest.mark.skipif(not ORT, reason="needs ONNX Runtime's int8 as the second candidate")
def test_a_candidate_outrun_by_one_rejected_later_resumes_and_can_win(tiny_classifier, tmp_path, monkeypatch):
    """The fastest candidate agrees on the first chunk, so the slower int8 pauses; it then changes labels on the next
    chunks and is rejected. The paused one resumes from the rows it missed, scores every row and is chosen, where
    it used to stay stopped and the job ran float32. (Made so here: both int8s get float32's outputs, ONNX Runtime's
    with every label changed after the first chunk, and their seconds are scaled.)"""
    from hvd_infer import precision
    from hvd_infer.engines.ort import OnnxPredictor

    real_score, calls, reference = precision._score, {}, {}

    def score(task, model, batches, order, window_row, warm_up):
        seconds, out = real_score(task, model, batches, order, window_row, warm_up)
        kind = ("onnx" if isinstance(model, OnnxPredictor) else "int8" if "quantized" in type(
            model.module.bert.encoder.layer[0].output.dense).__module__ else "float32")
        calls[kind] = calls.get(kind, 0) + 1
        if kind == "float32":  # scored first on every chunk
            reference[id(batches)] = out
        if kind == "onnx":
            out = reference[id(batches)]
            if calls[kind] > 1:  # after the first chunk: every label another one
                labels = out["label"].to_pylist()
                others = sorted(set(labels) | {"LABEL_0", "LABEL_1"})
                out = dict(out, label=pa.array([next(o for o in others if o != x) for x in labels]))
            return seconds * 0.01, out
        return (seconds * 0.5, reference[id(batches)]) if kind == "int8" else (seconds, out)

    decision = measure_with(score, tiny_classifier, tmp_path, monkeypatch)
    assert decision.rejected == ["onnxruntime-int8-per-channel"], decision
    assert decision.choice.name == "int8-per-channel" and decision.scored["int8-per-channel"] == 192, decision
    assert decision.agreement["int8-per-channel"] == 1.0 and not decision.outrun


@pytest.mark.skipif(not ORT, reason="needs ONNX Runtime's int8")
def test_onnxruntime_int8_that_changes_a_label_is_tried_rescored(tiny_classifier, tmp_path, monkeypatch):
    """ONNX Runtime's int8 changes a label of the first chunk: onnxruntime-int8-rescore joins, its margin from that
    row, and is measured on the real session and float32 model. (Made so here: ONNX Runtime's label of the first
    row is changed.)"""
    from hvd_infer import precision
    from hvd_infer.engines.ort import OnnxPredictor

    real_score = precision._score

    def score(task, model, batches, order, window_row, warm_up):
        seconds, out = real_score(task, model, batches, order, window_row, warm_up)
        if isinstance(model, OnnxPredictor):
            labels = out["label"].to_pylist()
            labels[0] = "LABEL_X"
            out = dict(out, label=pa.array(labels))
        return seconds, out

    # Whether torch's int8 outdoes it on this CPU (then only that rescoring is tried) is _dominated's test, below.
    monkeypatch.setattr(precision, "_dominated", lambda decision, base: False)
    decision = measure_with(score, tiny_classifier, tmp_path, monkeypatch)
    assert decision.scored.get("onnxruntime-int8-rescore", 0) >= 64, decision
    assert decision.agreement["onnxruntime-int8-rescore"] == 1.0  # the changed row is rescored in float32
    if decision.choice.name == "onnxruntime-int8-rescore":
        assert 0 < decision.choice.rescore <= 1 and decision.choice.engine == "onnxruntime"


@pytest.mark.skipif(not ORT, reason="needs ONNX Runtime's int8")
def test_a_rescoring_that_leaves_a_changed_label_widens_its_margin(tiny_classifier, tmp_path, monkeypatch):
    """onnxruntime-int8-rescore leaves a changed label to int8 on the second chunk (its first chunk's margin was
    too narrow): its margin widens to twice that row's gap and it scores every chunk again. (Made so here: ONNX
    Runtime's outputs are float32's but for its first row, whose label changes on every chunk, its two likeliest
    0.4 / 0.35 (margin 0.1); its rescoring's are float32's but for the first row of the second chunk while its
    margin is under 0.5, with 0.65 / 0.25 there: the margin widens to 0.8; the rescoring's seconds are scaled
    down.)"""
    from hvd_infer import precision
    from hvd_infer.engines.ort import OnnxPredictor
    from hvd_infer.engines.rescoring import RescoringPredictor

    real_score, chunk_of, reference = precision._score, {}, {}

    def score(task, model, batches, order, window_row, warm_up):
        seconds, out = real_score(task, model, batches, order, window_row, warm_up)
        chunk = chunk_of.setdefault(id(batches), len(chunk_of))  # float32 scores each chunk first
        reference.setdefault(id(batches), out)
        ort_rescoring = isinstance(model, RescoringPredictor) and isinstance(model.fast, OnnxPredictor)
        if ort_rescoring:
            out = reference[id(batches)]
        if isinstance(model, OnnxPredictor) or (ort_rescoring and chunk == 1 and model.margin < 0.5):
            out = reference[id(batches)]
            labels, probs = out["label"].to_pylist(), out["probs"].to_pylist()
            labels[0], probs[0] = "LABEL_X", [0.1, 0.65, 0.25] if ort_rescoring else [0.4, 0.35, 0.25]
            out = dict(out, label=pa.array(labels), probs=pa.array(probs, type=out["probs"].type))
        # the rescoring the fastest, so that nothing outruns it
        return seconds * (0.01 if ort_rescoring else 1), out

    decision = measure_with(score, tiny_classifier, tmp_path, monkeypatch, check_agreement=0.9)
    name = "onnxruntime-int8-rescore"
    assert decision.widened == {name: 1}, decision
    assert decision.agreement[name] == 1.0  # scored again from the first chunk, with the wider margin
    assert f"(agreement 1.0000, its margin widened 1x" in decision.facts(0.9)["notes"][0]
    if decision.choice.name == name:
        assert decision.choice.rescore == pytest.approx(0.8)


def test_only_the_rescoring_of_an_int8_no_other_beats_is_tried():
    """An int8 precision another one outdoes on the first chunk, faster and at least as close to float32, gets no
    rescoring: the other's would be faster for the same rows."""
    from hvd_infer.decisions import Decision
    from hvd_infer.engines import EngineSpec
    from hvd_infer.precision import _dominated

    torch_int8, ort_int8 = "int8-per-channel", "onnxruntime-int8-per-channel"
    d = Decision(EngineSpec(), seconds={"float32": 1.0, torch_int8: 0.4, ort_int8: 0.2},
                 agreement={torch_int8: 0.95, ort_int8: 0.95})
    assert _dominated(d, torch_int8) and not _dominated(d, ort_int8)
    d.agreement[torch_int8] = 0.97  # closer, though slower: both rescorings are tried
    assert not _dominated(d, torch_int8) and not _dominated(d, ort_int8)
    assert not _dominated(Decision(EngineSpec(), seconds={"float32": 1.0, torch_int8: 0.4},
                                   agreement={torch_int8: 0.9}), torch_int8)


def test_a_candidate_barely_faster_than_float32_is_not_chosen(tiny_classifier, tmp_path, monkeypatch):
    """Agreeing on every row but only 5% faster than float32 (under MIN_SPEEDUP): a near tie on a hundred rows is
    timing noise, so float32 is kept and the summary says why. (Made so here: the candidates get float32's
    outputs, their seconds scaled by 0.95.)"""
    from hvd_infer import precision

    real_score, reference = precision._score, {}

    def score(task, model, batches, order, window_row, warm_up):
        seconds, out = real_score(task, model, batches, order, window_row, warm_up)
        if id(batches) not in reference:  # float32 scores every chunk first
            reference[id(batches)] = out
            return 1.0, out
        return 0.95, reference[id(batches)]

    decision = measure_with(score, tiny_classifier, tmp_path, monkeypatch)
    assert decision.choice.name == "float32", decision
    assert decision.outrun and set(decision.outrun.values()) == {"float32"}, decision
    assert all(decision.agreement[name] == 1.0 for name in decision.outrun)
    note = decision.facts(0.995)["notes"][0]
    assert note.startswith("model.dtype=auto-check on 192 rows chose float32"), note
    assert f"(agreement 1.0000, stopped: not {precision.MIN_SPEEDUP:g}x as fast as float32)" in note, note


def test_a_small_job_skips_the_check_and_says_why(tiny_classifier, dataset, tmp_path):
    from hvd_infer.precision import PAYBACK

    path, table = dataset  # 157 rows: under PAYBACK x 64 rows x the precisions x 1 rank
    out = tmp_path / "out"
    r = cli(base(tiny_classifier, path, out, tmp_path, "model.dtype=auto-check", "model.check_rows=64"),
                 env=NO_BF16)
    assert r.returncode == 0, r.stderr[-3000:]
    n = 1 + len(CANDIDATES)
    line = (f"model.dtype=auto-check skipped: 157 input rows < {PAYBACK * 64 * n} ({PAYBACK} x 64 rows x {n} precisions"
            " x 1 ranks); running float32")
    assert line in r.stdout
    params = params_of(tmp_path)
    assert params["resolved.precision_choice"] == "float32"
    assert params["resolved.precision_check"] == line.split("auto-check ")[1].split(";")[0]
    assert "resolved.precision_int8-per-channel_seconds" not in params
    got = pads.dataset(str(out)).to_table().to_pandas().sort_values("id")
    ref = reference_probs(table.column("text").to_pylist(), job(tiny_classifier))
    np.testing.assert_allclose(np.stack(got["probs"].to_numpy()), ref, atol=1e-5)
    assert job_file_identity(out)["precision"] == "float32"


def test_auto_check_tries_rescoring_where_int8_changes_labels(outlier_classifier, tmp_path):
    """Per-channel int8 changes labels of the first chunk: its rescoring joins the check and is reported; whatever
    is chosen is what every row was scored in."""
    from hvd_infer.precision import PAYBACK

    path = str(tmp_path / "data")
    table = builders.write_dataset(path, PAYBACK * 16 * (1 + len(CANDIDATES)), row_group_size=20)
    out = tmp_path / "out"
    r = cli(base(outlier_classifier, path, out, tmp_path, "model.dtype=auto-check", "model.check_rows=16",
                      "data.batch_size=1", "data.pad_to_multiple_of=1"), env=NO_BF16)
    assert r.returncode == 0, r.stderr[-3000:]
    params = params_of(tmp_path)
    assert float(params["resolved.precision_int8-per-channel_agreement"]) < 1
    assert_chosen_by_the_rule(params)
    # int8-rescore joins too, its margin twice the widest gap of a changed row, unless ONNX Runtime's int8 was
    # faster and at least as close on that chunk (then only its rescoring is worth trying)
    # (_dominated, tested below)
    if "resolved.precision_int8-rescore_rows" in params or not ORT:
        assert params["resolved.precision_int8-rescore_rows"] == "16" and "int8-rescore " in r.stdout
    # and ONNX Runtime's int8 rescored, where ONNX Runtime's int8 changed labels of the first chunk too
    if ORT and float(params["resolved.precision_onnxruntime-int8-per-channel_agreement"]) < 1:
        assert "resolved.precision_onnxruntime-int8-rescore_rows" in params
        assert "onnxruntime-int8-rescore " in r.stdout
    chosen = parse(job_file_identity(out)["precision"])
    assert chosen.name == params["resolved.precision_choice"]
    if chosen.name.endswith("int8-rescore"):
        assert 0 < chosen.rescore <= 1 and "rescored in float32" in r.stdout
    got = pads.dataset(str(out)).to_table().to_pandas().sort_values("id")
    ref = reference_probs(table.column("text").to_pylist(), job(
        outlier_classifier, ONE_ROW, quantize=chosen.quantize, runtime=chosen.engine, rescore_margin=chosen.rescore))
    np.testing.assert_allclose(np.stack(got["probs"].to_numpy()), ref, atol=1e-5)


def test_resume_keeps_the_precision_auto_check_chose(tiny_classifier, dataset, tmp_path):
    """The resumed run scores its missing rows in the recorded choice, unmeasured; another precision is refused."""
    import json

    path, table = dataset
    out = tmp_path / "out"
    first = base(tiny_classifier, path, out, tmp_path, "model.dtype=auto-check", "model.check_rows=64",
                 "data.batch_size=1", "data.pad_to_multiple_of=1", "output.rows_per_part=40")
    r = cli(first, env=NO_BF16)
    assert r.returncode == 0, r.stderr[-3000:]
    # As if the first run had chosen int8-per-channel (a timing decides that; 157 rows skip the check) and stopped
    # after its first parts.
    job_file = out / "_hvd_infer_job.json"
    written = json.loads(job_file.read_text())
    written["identity"]["precision"] = "int8-per-channel"
    job_file.write_text(json.dumps(written))
    parts = sorted(p for p in out.rglob("part-*") if p.suffix == ".parquet")
    assert len(parts) >= 2
    for p in parts[1:]:
        p.unlink()

    refused = cli(base(tiny_classifier, path, out, tmp_path, "model.dtype=float32", "output.mode=resume"),
                       env=NO_BF16)
    assert_user_error(refused, "output.mode=resume but dtype, precision changed",
                      "its rows were scored in int8-per-channel")

    r = cli(first + ["output.mode=resume"], env=NO_BF16)
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("model.dtype=auto-check resumed: output.path was scored in int8-per-channel; running int8-per-channel"
            in r.stdout)
    assert job_file_identity(out)["precision"] == "int8-per-channel"
    got = pads.dataset(str(out)).to_table().to_pandas().sort_values("id")
    texts = table.column("text").to_pylist()
    ref = reference_probs(texts, job(tiny_classifier, ONE_ROW, quantize="int8-per-channel"))
    resumed = ~got["id"].isin(pads.dataset([str(parts[0])]).to_table().column("id").to_pylist())
    assert resumed.sum() == len(table) - pads.dataset([str(parts[0])]).count_rows()
    np.testing.assert_allclose(np.stack(got["probs"][resumed].to_numpy()), ref[resumed.to_numpy()], atol=1e-5)
    assert np.abs(reference_probs(texts, job(tiny_classifier, ONE_ROW)) - ref).max() > 1e-5


def test_a_precision_no_longer_run_is_refused_on_resume():
    """An output whose rows an earlier version scored in a precision since removed (int8-selective, recorded with
    its float32 layers) cannot be resumed in another: one line says what to do. A rescoring's margin reads back."""
    with pytest.raises(ConfigError, match="scored in int8-selective, which hvd_infer no longer runs: .*"
                                          "output.mode=overwrite"):
        parse("int8-selective:bert.encoder.layer.0.output.dense")
    assert parse("int8-rescore@0.25").rescore == 0.25 and parse("int8-rescore@0.25").quantize == "int8-per-channel"
    assert parse("int8-rescore@0.25").token == "int8-rescore@0.25"
    assert parse("onnxruntime-int8-rescore@0.5").engine == "onnxruntime"


# -- a decision kept on the host and reused by the next job ----------------------------------------------------

def test_the_checks_key_changes_with_what_decides_the_check(tiny_classifier, tmp_path, monkeypatch):
    """check_identity's key: the same for the same model content elsewhere and for another input or output; another
    for other model bytes, CPU flags, library versions, check settings, task settings or threads."""
    import shutil

    import transformers

    from hvd_infer import decisions, version
    from hvd_infer.context import RankContext
    from hvd_infer.decisions import check_identity, decision_key
    from hvd_infer.precision import candidates

    monkeypatch.setenv(NATIVE_BF16_ENV, "0")
    model = shutil.copytree(tiny_classifier, tmp_path / "model")
    cpu = RankContext(device=torch.device("cpu"), threads=2)

    def key(path=model, ctx=cpu, data=None, labels=("a", "b"), **options):
        cfg = load_config({"model": {"path": str(path), "dtype": "auto-check", **options},
                           "data": {"path": "/d", **(data or {})}, "output": {"path": "/o"},
                           "zero_shot": {"candidate_labels": list(labels)}})
        return decision_key(check_identity(cfg, ctx, str(path), [c.name for c in candidates(cfg, ctx.device)]))

    first = key()
    assert key() == first and key(path=tiny_classifier) == first  # the content, not where it lies
    assert key(data={"path": "/elsewhere", "text_column": "body"}) == first
    changed = [key(check_agreement=0.99), key(check_rows=64), key(max_length=128), key(long_texts="chunk"),
               key(onednn=False), key(data={"batch_size": 8}), key(ctx=RankContext(device=cpu.device, threads=1)),
               key(task="zero-shot-classification"), key(task="zero-shot-classification", labels=["a", "c"])]
    with monkeypatch.context() as m:
        m.setenv(NATIVE_BF16_ENV, "1")  # bfloat16 joins the candidates
        changed.append(key())
    real = decisions.cpu_facts
    with monkeypatch.context() as m:
        m.setattr(decisions, "cpu_facts", lambda: {**real(), "avx512_vnni": not real()["avx512_vnni"]})
        changed.append(key())
    for module in (transformers, version, torch):
        with monkeypatch.context() as m:
            m.setattr(module, "__version__", "0.0.1")
            changed.append(key())
    with open(model / "config.json", "a") as f:
        f.write("\n")
    changed.append(key())
    assert len(set(changed)) == len(changed) and first not in changed, changed


def test_a_kept_decision_reads_back_and_a_broken_one_is_measured_again(tmp_path, monkeypatch, caplog):
    """keep_decision writes a temporary file and renames it: a failed write leaves nothing behind. A decision read
    back says it was reused, with its date and the earlier check's figures; a file that cannot be read back
    (not JSON, the wrong shape, a precision no longer run) is ignored with a warning."""
    import json
    import logging
    import os

    from hvd_infer.decisions import Decision, decision_key, decisions_dir, earlier_decision, keep_decision
    from hvd_infer.engines import EngineSpec

    # A library imported by an earlier test may have configured logging (disabled or detached this logger).
    monkeypatch.setattr(logging.getLogger("hvd_infer"), "disabled", False)
    monkeypatch.setattr(logging.getLogger("hvd_infer"), "propagate", True)
    identity = {"model": "0123", "task": "text-classification"}
    decision = Decision(choice=EngineSpec(quantize="int8-per-channel", rescore=0.25), rows=128,
                        seconds={"float32": 1.2, "int8-per-channel": 0.5, "int8-rescore": 0.6},
                        scored={"float32": 128, "int8-per-channel": 64, "int8-rescore": 128},
                        agreement={"int8-per-channel": 0.97, "int8-rescore": 1.0}, rejected=["int8-per-channel"],
                        load_seconds={"float32": 0.5}, check_seconds=3.3)
    path = os.path.join(decisions_dir(), decision_key(identity) + ".json")
    real_replace = os.replace
    with monkeypatch.context() as m:
        m.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
        with caplog.at_level(logging.WARNING, logger="hvd_infer"):
            keep_decision(identity, decision)
    assert os.replace is real_replace and os.listdir(decisions_dir()) == []  # no partial file, no temporary
    assert "could not keep the check's decision" in caplog.text and "disk full" in caplog.text
    assert earlier_decision(identity, 0.995) is None

    keep_decision(identity, decision)
    assert os.listdir(decisions_dir()) == [os.path.basename(path)]
    reused = earlier_decision(identity, 0.995)
    assert reused.choice == decision.choice and reused.choice.token == "int8-rescore@0.25"
    assert [getattr(reused, f) for f in ("rows", "seconds", "scored", "agreement", "rejected", "check_seconds")] == [
        getattr(decision, f) for f in ("rows", "seconds", "scored", "agreement", "rejected", "check_seconds")]
    assert reused.how.startswith(f"reused: the check of {json.load(open(path))['checked']} on this host")
    facts = reused.facts(0.995)
    assert facts["precision_check"] == reused.how and facts["precision_check_seconds"] == 0.0
    assert facts["precision_int8-rescore_agreement"] == 1.0 and facts["precision_check_rows"] == 128
    assert facts["notes"][0].startswith(f"model.dtype=auto-check {reused.how}, which on 128 rows chose int8-rescore "
                                        "(it took 3.3 s then"), facts["notes"][0]
    assert earlier_decision({**identity, "task": "embedding"}, 0.995) is None  # another key: none kept

    record = json.load(open(path))
    for broken in ["{not json", json.dumps({**record, "seconds": [1.2]}),
                   json.dumps({**record, "spec": {"dtype": "float32", "selective": ["bert.pooler.dense"]}})]:
        with open(path, "w") as f:
            f.write(broken)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="hvd_infer"):
            assert earlier_decision(identity, 0.995) is None
        assert f"ignoring the unreadable decision {path}" in caplog.text, broken
    keep_decision(identity, decision)  # measured again: the broken file is replaced
    assert earlier_decision(identity, 0.995).choice == decision.choice


def test_the_next_job_on_the_host_reuses_the_check(tiny_classifier, tmp_path, monkeypatch):
    """Two jobs of one rank on the same model and settings: the first measures and keeps its decision under
    $TMPDIR/hvd_infer-onnx/decisions, the second reuses it without measuring (its summary and MLflow say so),
    runs the same precision and writes the same outputs."""
    import os
    import tempfile

    from hvd_infer import decisions, precision

    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads $TMPDIR again
    monkeypatch.setattr(decisions, "decisions_dir", host_decisions_dir)  # the host's cache, in this $TMPDIR
    measured = []
    real_measure = precision.measure
    monkeypatch.setattr(precision, "measure", lambda *a, **k: measured.append(1) or real_measure(*a, **k))
    path = str(tmp_path / "data")
    builders.write_dataset(path, precision.PAYBACK * 16 * (1 + len(CANDIDATES)), row_group_size=20)  # no skip

    def run(name, *extra):
        (tmp_path / name).mkdir()
        r = cli(base(tiny_classifier, path, tmp_path / name / "out", tmp_path / name, "model.dtype=auto-check",
                     "model.check_rows=16", *extra), env=NO_BF16)
        assert r.returncode == 0, r.stderr[-3000:]
        return r, job_file_identity(tmp_path / name / "out")["precision"]

    first, choice = run("first", "mlflow.enabled=false")
    assert measured == [1] and f"model.dtype=auto-check on 16 rows chose {choice.partition('@')[0]}" in first.stdout
    kept = tmpdir / "hvd_infer-onnx" / "decisions"
    assert [n for n in os.listdir(kept) if n.endswith(".json")] == os.listdir(kept) and len(os.listdir(kept)) == 1

    second, again = run("second")
    assert measured == [1] and again == choice  # no second check
    assert "model.dtype=auto-check reused: the check of " in second.stdout
    assert f"on this host for this model, which on 16 rows chose {choice.partition('@')[0]} (it took" in second.stdout
    params = params_of(tmp_path / "second")
    assert params["resolved.precision_check"].startswith("reused: the check of ")
    assert params["resolved.precision_choice"] == choice.partition("@")[0]
    assert params["resolved.precision_float32_rows"] == "16"
    outputs = [pads.dataset(str(tmp_path / name / "out")).to_table().to_pandas().sort_values("id")
               for name in ("first", "second")]
    assert outputs[0]["label"].tolist() == outputs[1]["label"].tolist()
    np.testing.assert_allclose(np.stack(outputs[0]["probs"].to_numpy()), np.stack(outputs[1]["probs"].to_numpy()),
                               atol=1e-6)
