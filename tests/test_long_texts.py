"""model.long_texts=chunk: long texts scored whole, as windows, against plain references written here.

The references form each text's windows by hand from its tokens (max_length less the special tokens
per window, each starting that less the stride after the one before), run every window by itself
through the transformers model (no padding: only windows of one length share a forward, see each_alone)
and aggregate as the issue says; NER is compared with transformers' own pipeline with the same stride.
The jobs use windows of 32 tokens and batches of 4 windows, so a long row's windows land in many
batches (and rows in several parts and sort windows).
"""
import os
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import (AutoModel, AutoModelForSequenceClassification, AutoModelForTokenClassification,
                          AutoTokenizer, pipeline)

import builders
import hvd_infer
from conftest import cli, horovodrun
from hvd_infer.config import parse_override
from test_tasks import LABELS, NER_WORDS, models  # noqa: F401  (models: a fixture)

MAX_LEN, STRIDE = 32, 8
TEMPLATE = "This example is {}."


def long_texts(n, seed=0, words=builders.WORDS):
    """Every third text 150-400 words (10-25 windows of 32 tokens), the others 2-20 words (one window)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(150, 400) if i % 3 == 1 else rng.randint(2, 20)))
            for i in range(n)]


def write_texts(path, texts):
    os.makedirs(path, exist_ok=True)
    pq.write_table(pa.table({"id": np.arange(len(texts), dtype=np.int64), "text": texts}),
                   os.path.join(path, "part-000.parquet"), row_group_size=5)
    return str(path)


def score(model, task, data, out, *extra):
    """The whole job (hvd_infer.run, a world of one); its output read part by part, in part order."""
    threads = torch.get_num_threads()
    try:
        fig = hvd_infer.run({"model": {"path": model, "task": task, "max_length": MAX_LEN, "long_texts": "chunk",
                                       "stride": STRIDE},
                             "data": {"path": data, "id_columns": ["id"], "batch_size": 4, "sort_window": 7},
                             "output": {"path": str(out), "rows_per_part": 10}, "mlflow": {"enabled": False},
                             "runtime": {"progress": False}},
                            **dict(parse_override(e) for e in extra))
    finally:
        torch.set_num_threads(threads)
    parts = sorted(n for n in os.listdir(out) if n.startswith("part-"))
    table = pa.concat_tables([pq.read_table(os.path.join(out, n)) for n in parts])
    return table.to_pandas(), fig


def windows(tok, text, body, stride=STRIDE):
    """The text's tokens in windows of `body` tokens, each overlapping the one before by `stride`."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= body:
        return [ids]
    return [ids[i:i + body] for i in range(0, len(ids) - stride, body - stride)]


def with_specials(tok, window, hypothesis=None):
    """BERT's [CLS] window [SEP] (hypothesis [SEP]): the model's inputs, input_ids (and token_type_ids for a pair)."""
    ids = [tok.cls_token_id, *window, tok.sep_token_id]
    if hypothesis is None:
        return {"input_ids": torch.tensor([ids])}
    types = [0] * len(ids) + [1] * (len(hypothesis) + 1)
    return {"input_ids": torch.tensor([ids + [*hypothesis, tok.sep_token_id]]), "token_type_ids": torch.tensor([types])}


@torch.no_grad()
def each_alone(model, inputs, output="logits"):
    """model(**x)'s output for each of inputs (with_specials'), in order, each as if run alone: only inputs of
    one length share a forward, so nothing is padded or masked (float rounding aside, ~1e-7). One forward per
    window took ~40 s for the 20,000-token document on 2 busy cores; this takes ~1 s."""
    by_length = {}
    for i, x in enumerate(inputs):
        by_length.setdefault(x["input_ids"].shape[1], []).append(i)
    got = [None] * len(inputs)
    for rows in by_length.values():
        batch = {k: torch.cat([inputs[i][k] for i in rows]) for k in inputs[rows[0]]}
        for i, y in zip(rows, getattr(model(**batch), output)):
            got[i] = y
    return got


def assert_in_input_order(got, texts):
    assert got["id"].tolist() == list(range(len(texts)))  # exactly once, in input order


def test_reference_windows_are_the_tokenizers(models):
    """The hand-made windows above are exactly the fast tokenizer's overflowing windows (the job's)."""
    tok = AutoTokenizer.from_pretrained(models["cls"])
    for text in long_texts(6, seed=3):
        enc = tok(text, truncation=True, max_length=MAX_LEN, stride=STRIDE, return_overflowing_tokens=True)
        assert [w[1:-1] for w in enc["input_ids"]] == windows(tok, text, MAX_LEN - 2)


# -- text-classification ---------------------------------------------------------------------------
def classification_reference(path, texts, how):
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    per_text = [windows(tok, text, MAX_LEN - 2) for text in texts]
    logits = each_alone(model, [with_specials(tok, w) for ws in per_text for w in ws])
    out, k = [], 0
    for ws in per_text:
        rows, k = torch.stack(logits[k:k + len(ws)]), k + len(ws)
        out.append(torch.softmax(rows.mean(0) if how == "mean" else rows.max(0).values, -1).numpy())
    return np.stack(out)


@pytest.mark.parametrize("how", ["mean", "max"])
def test_classification_chunked_equals_reference(how, models, tmp_path, capsys):
    texts = long_texts(23)
    got, fig = score(models["cls"], "text-classification", write_texts(tmp_path / "data", texts), tmp_path / "out",
                     f"model.chunk_aggregation={how}")
    assert_in_input_order(got, texts)
    ref = classification_reference(models["cls"], texts, how)
    np.testing.assert_allclose(np.stack(got["probs"]), ref, atol=1e-5)
    labels = AutoModelForSequenceClassification.from_pretrained(models["cls"]).config.id2label
    assert got["label"].tolist() == [labels[int(i)] for i in ref.argmax(1)]
    # The windows past the first count: a long row's first window alone gives other probabilities.
    tok = AutoTokenizer.from_pretrained(models["cls"])
    with torch.no_grad():
        first = torch.softmax(AutoModelForSequenceClassification.from_pretrained(models["cls"]).eval()(
            **with_specials(tok, windows(tok, texts[1], MAX_LEN - 2)[0])).logits[0], -1).numpy()
    assert np.abs(ref[1] - first).max() > 1e-3
    long_rows = sum(len(windows(tok, t, MAX_LEN - 2)) > 1 for t in texts)
    n_windows = sum(len(windows(tok, t, MAX_LEN - 2)) for t in texts if len(windows(tok, t, MAX_LEN - 2)) > 1)
    assert (fig["chunked"], fig["chunk_windows"], fig["truncated"]) == (long_rows, n_windows, 0)
    assert (f"chunked {long_rows} texts longer than model.max_length={MAX_LEN} tokens into {n_windows} windows "
            f"(model.stride={STRIDE})") in capsys.readouterr().out


@pytest.mark.parametrize("workers", [0, 2])
def test_repeated_long_texts_with_dedup_equal_reference(workers, models, tmp_path):
    """data.dedup (on by default) with chunk: a repeated long text is windowed and scored once, and each of
    its rows gets the prediction assembled from its windows, in input order; also when two loader workers
    each take a unit of the same part and their windows' batches interleave."""
    base = long_texts(8, seed=6)  # 1, 4 and 7 are long
    pattern = [0, 0, 1, 0, 2, 1, 3, 0, 2, 3]  # the distinct rows of a sort window (7 rows) are not its first ones
    texts = [base[i] for i in pattern] + [base[4 + i] for i in pattern]  # parts of 10 rows
    got, fig = score(models["cls"], "text-classification", write_texts(tmp_path / "data", texts), tmp_path / "out",
                     f"data.workers={workers}")
    assert_in_input_order(got, texts)
    np.testing.assert_allclose(np.stack(got["probs"]), classification_reference(models["cls"], texts, "mean"),
                               atol=1e-5)
    # The loader cuts each part into units of whole sort windows (rows 0-6 and 7-9): dedup finds repeats
    # inside a unit (3 in each part's first), and chunks the long texts each unit scores (1+0, then 2+2).
    assert fig["repeats"] == 6 and fig["chunked"] == 5


# -- embedding -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cls_sentence_model(tmp_path_factory):
    return builders.sentence_model(str(tmp_path_factory.mktemp("st") / "cls"), pooling="cls", normalize=False)


@pytest.mark.parametrize("kind", ["no-layout-mean-normalised", "sentence-transformers-cls"])
def test_embedding_chunked_equals_reference(kind, tiny_encoder, cls_sentence_model, tmp_path):
    """Each window pooled as the model pools, weighted by its real tokens, then normalised if the model does."""
    path = tiny_encoder if kind.startswith("no-layout") else cls_sentence_model
    texts = long_texts(14, seed=1)
    got, _ = score(path, "embedding", write_texts(tmp_path / "data", texts), tmp_path / "out")
    assert_in_input_order(got, texts)
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    per_text = [windows(tok, text, MAX_LEN - 2) for text in texts]
    hidden = iter(each_alone(model, [with_specials(tok, w) for ws in per_text for w in ws], "last_hidden_state"))
    ref = []
    for ws in per_text:
        vectors, weights = [], []
        for w in ws:
            h = next(hidden)  # (tokens, width): the window's own tokens only
            vectors.append(h.mean(0) if kind.startswith("no-layout") else h[0])
            weights.append(len(w) + 2)
        v = (torch.stack(vectors) * torch.tensor(weights, dtype=torch.float32)[:, None]).sum(0) / sum(weights)
        ref.append((torch.nn.functional.normalize(v, dim=0) if kind.startswith("no-layout") else v).numpy())
    np.testing.assert_allclose(np.stack(got["embedding"]), np.stack(ref), atol=1e-5)


# -- token-classification --------------------------------------------------------------------------
@pytest.mark.parametrize("aggregation", ["simple", "average"])
def test_ner_chunked_equals_pipeline_with_stride(aggregation, models, tmp_path):
    texts = long_texts(12, seed=2, words=NER_WORDS + builders.WORDS)
    got, _ = score(models["ner"], "token-classification", write_texts(tmp_path / "data", texts), tmp_path / "out",
                   f"token_classification.aggregation={aggregation}")
    assert_in_input_order(got, texts)
    tok = AutoTokenizer.from_pretrained(models["ner"], model_max_length=MAX_LEN)
    pipe = pipeline("token-classification", model=AutoModelForTokenClassification.from_pretrained(models["ner"]),
                    tokenizer=tok, aggregation_strategy=aggregation, stride=STRIDE, device="cpu")
    merged = 0
    for text, entities in zip(texts, got["entities"]):
        ref = pipe(text)
        assert [(e["entity_group"], e["start"], e["end"], e["word"]) for e in entities] == \
            [(e["entity_group"], e["start"], e["end"], e["word"]) for e in ref]
        np.testing.assert_allclose([e["score"] for e in entities], [e["score"] for e in ref], atol=1e-5)
        merged += len(windows(tok, text, MAX_LEN - 2)) > 1 and len(ref) > 0
    assert merged >= 3  # long rows with entities from several windows were compared


# -- zero-shot -------------------------------------------------------------------------------------
@pytest.mark.parametrize("multi_label, how", [(False, "mean"), (True, "max")])
def test_zero_shot_chunked_equals_reference(multi_label, how, models, tmp_path):
    """Windows of the premise, each paired with every hypothesis; a row's NLI logits aggregated over
    its windows, then the zero-shot pipeline's scoring."""
    texts = long_texts(11, seed=4)
    got, _ = score(models["nli"], "zero-shot-classification", write_texts(tmp_path / "data", texts), tmp_path / "out",
                   f"zero_shot.candidate_labels=[{','.join(LABELS)}]", f"zero_shot.multi_label={multi_label}",
                   f"model.chunk_aggregation={how}")
    assert_in_input_order(got, texts)
    tok = AutoTokenizer.from_pretrained(models["nli"])
    model = AutoModelForSequenceClassification.from_pretrained(models["nli"]).eval()
    hyps = [tok(TEMPLATE.format(label), add_special_tokens=False)["input_ids"] for label in LABELS]
    room = MAX_LEN - max(map(len, hyps)) - 3  # [CLS] premise [SEP] hypothesis [SEP]
    entail, contra = 2, 0  # the tiny NLI model's labels: contradiction, neutral, entailment
    per_text = [windows(tok, text, room) for text in texts]
    pairs = iter(each_alone(model, [with_specials(tok, w, h) for ws in per_text for w in ws for h in hyps]))
    for ws, labels, scores in zip(per_text, got["labels"], got["scores"]):
        logits = torch.stack([torch.stack([next(pairs) for _ in hyps]) for _ in ws])  # (windows, labels, classes)
        agg = logits.mean(0) if how == "mean" else logits.max(0).values
        ref = (torch.softmax(agg[:, [contra, entail]], -1)[:, 1] if multi_label
               else torch.softmax(agg[:, entail], -1)).numpy()
        order = np.argsort(ref)[::-1]
        assert list(labels) == [LABELS[i] for i in order]
        np.testing.assert_allclose(scores, ref[order], atol=1e-5)


# -- a 20,000-token document -----------------------------------------------------------------------
def test_huge_document_is_bounded_by_the_token_budget(models, tmp_path):
    """One 20,000-token document among short ones: its ~830 windows go through batches of at most
    data.max_tokens_per_batch padded tokens (the activations' bound), not one giant batch."""
    rng = random.Random(5)
    huge = " ".join(rng.choice(builders.WORDS) for _ in range(20000))
    texts = long_texts(6, seed=5)[:3] + [huge] + ["short one", "another short text"]
    tok = AutoTokenizer.from_pretrained(models["cls"])
    assert len(tok(huge, add_special_tokens=False)["input_ids"]) >= 20000
    budget = 256
    got, fig = score(models["cls"], "text-classification", write_texts(tmp_path / "data", texts), tmp_path / "out",
                     f"data.max_tokens_per_batch={budget}", "data.batch_size=64", "data.workers=0")
    assert_in_input_order(got, texts)
    n_windows = len(windows(tok, huge, MAX_LEN - 2))
    assert n_windows > 800 and fig["chunk_windows"] >= n_windows
    assert 0 < fig["largest_batch_tokens"] <= budget
    assert fig["batches"] >= n_windows * MAX_LEN // budget
    np.testing.assert_allclose(np.stack(got["probs"]), classification_reference(models["cls"], texts, "mean"),
                               atol=1e-5)


def test_spark_udf_predictor_chunks_too(models):
    """predict_udf's per-worker predictor (no Spark needed to call it): the same rows as the reference."""
    from hvd_infer.config import load_config
    from hvd_infer.spark import _Predictor

    texts = long_texts(9, seed=7)
    cfg = load_config({"model": {"path": models["cls"], "max_length": MAX_LEN, "long_texts": "chunk", "stride": STRIDE},
                       "data": {"path": "/d", "batch_size": 4}, "output": {"path": "/o"}})
    got = _Predictor(cfg).predict(np.array(texts, dtype=object), None)
    np.testing.assert_allclose(got["probs"], classification_reference(models["cls"], texts, "mean"), atol=1e-5)


# -- refusals, in one line before any rank scores (the command line, in process) -------------------
@pytest.mark.parametrize("extra, message", [
    (["model.task=text-generation"], "model.long_texts=chunk cannot be used with model.task=text-generation"),
    (["model.stride=32"], "model.stride=32 must be smaller than model.max_length=32"),
    (["model.stride=-1"], "model.stride must be >= 0, got -1"),
    (["model.long_texts=split"], "model.long_texts must be one of truncate, chunk; got 'split'"),
    (["model.task=embedding", "model.chunk_aggregation=max"],
     "model.chunk_aggregation=max applies to text-classification and zero-shot-classification"),
    (["model.task=token-classification", "token_classification.aggregation=none"],
     "needs token_classification.aggregation simple, first, average or max (got none)"),
    (["data.text_pair_column=doc"], "model.long_texts=chunk splits one text into windows, not a pair"),
    (["model.stride=30"], "model.stride=30 must be smaller than the 30 text tokens a window holds"),
])
def test_refusals_one_line_exit_2(extra, message, models, dataset, tmp_path):
    r = cli(["--config", "/dev/null", f"model.path={models['cls']}", f"data.path={dataset[0]}",
             f"output.path={tmp_path / 'out'}", "mlflow.enabled=false", "runtime.progress=false",
             f"model.max_length={MAX_LEN}", "model.long_texts=chunk", *extra])
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [line for line in r.stderr.splitlines() if "hvd_infer: error:" in line]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "out").exists() or not any(n.startswith("part-") for n in os.listdir(tmp_path / "out"))


def test_embedding_prompt_refused(tiny_encoder, dataset, tmp_path):
    r = cli(["--config", "/dev/null", f"model.path={tiny_encoder}", "model.task=embedding",
             f"data.path={dataset[0]}", f"output.path={tmp_path / 'out'}", "mlflow.enabled=false",
             "model.long_texts=chunk", "embedding.prompt='query: '"])
    assert r.returncode == 2 and "model.long_texts=chunk cannot put the prompt 'query: '" in r.stderr, r.stderr


# -- two real ranks --------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_ranks_chunked_exactly_once_in_order(models, tmp_path):
    import sqlite3

    texts = long_texts(31, seed=6)
    data = write_texts(tmp_path / "data", texts)
    out = tmp_path / "out"
    r = horovodrun(2, ["--config", "/dev/null", f"model.path={models['cls']}", f"data.path={data}",
                       "data.id_columns=[id]", f"output.path={out}", f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db",
                       "runtime.progress=false", f"model.max_length={MAX_LEN}", "model.long_texts=chunk",
                       f"model.stride={STRIDE}", "data.batch_size=4", "output.rows_per_part=6"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    parts = sorted(n for n in os.listdir(out) if n.startswith("part-"))
    assert {n[:12] for n in parts} == {"part-r00000-", "part-r00001-"}
    parts.sort(key=lambda n: int(n.split("-")[2]))  # by first input row
    got = pa.concat_tables([pq.read_table(out / n) for n in parts]).to_pandas()
    assert_in_input_order(got, texts)
    np.testing.assert_allclose(np.stack(got["probs"]), classification_reference(models["cls"], texts, "mean"),
                               atol=1e-5)
    tok = AutoTokenizer.from_pretrained(models["cls"])
    counts = [len(windows(tok, t, MAX_LEN - 2)) for t in texts]
    chunked, n_windows = sum(c > 1 for c in counts), sum(c for c in counts if c > 1)
    assert f"chunked {chunked} texts longer than model.max_length={MAX_LEN} tokens into {n_windows} windows" in r.stdout
    db = sqlite3.connect(tmp_path / "m.db")
    metrics = dict(db.execute("select key, value from metrics").fetchall())
    assert (metrics["chunked_texts"], metrics["chunk_windows"], metrics["truncated_texts"]) == (chunked, n_windows, 0)
