"""data.dedup: a part's rows that repeat an earlier row's (text, pair) are scored once; outputs unchanged.

In process, each task's part goes through part_batches -> predict -> in_input_order as the runner drives
it, with data.dedup on and off on the same model: the same outputs row by row, fewer forward rows. Then
one real 2-rank job against a plain transformers forward, and sampled generation, where dedup is off.

Tolerance: a row scored once stands for its repeats, but it lands in a batch of other rows and maybe
another width than without dedup, so float32 sums may differ in the last bits (~1e-7): floats are
compared at 1e-5 (a swapped row moves them by > 1e-2, see builders.tiny_bert), everything else exactly
(labels, entity spans and words, greedy generated text).
"""
import dataclasses
import json
import random
import sqlite3

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch

import builders
from builders import plain_probs as reference_probs
from conftest import cli, horovodrun, job_args as multirank_args
from hvd_infer.batcher import in_input_order, part_batches
from hvd_infer.config import load_config
from hvd_infer.model import load_model
from hvd_infer.shard_plan import Part
from hvd_infer.tasks import get_task
from test_tasks import LABELS, PROMPTS, models, ner_texts  # noqa: F401 (models: the tiny task models fixture)

ATOL = 1e-5


def repeated(pool, n, seed, nulls=()):
    """n rows drawn from pool (so most repeat an earlier row, at any distance), with `nulls` put in."""
    rng = random.Random(seed)
    rows = [rng.choice(pool) for _ in range(n)]
    for i, v in zip(rng.sample(range(n), len(nulls)), nulls):
        rows[i] = v
    return rows


def score_part(cfg, task, model, texts, pairs=None, chunk=7):
    """One part of these rows as the runner scores it: (columns in input order, the part's batches)."""
    n = len(texts)
    cols = {"id": np.arange(n), cfg.data.text_column: np.array(texts, dtype=object)}
    if pairs is not None:
        cols[cfg.data.text_pair_column] = np.array(pairs, dtype=object)
    chunks = ({c: v[i:i + chunk] for c, v in cols.items()} for i in range(0, n, chunk))  # as row groups come
    outputs, rows, batches = [], [], []
    for b in part_batches(Part(0, n), chunks, task, cfg.data, cfg.data.batch_size, 0):
        if len(b.rows):
            outputs.append(task.predict(model, b.tensors))
            rows.append(b.rows)
        batches.append(b)
    return in_input_order(outputs, rows, batches[-1].finished.source), batches


def assert_close(a, b, where=""):
    if isinstance(a, float) or isinstance(b, float):
        assert abs(a - b) <= ATOL, f"{where}: {a} != {b}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def job(model_path, task, data, **sections):
    return load_config({"model": {"path": model_path, "task": task, "deepspeed": False, **sections.pop("model", {})},
                        "data": {"path": "/d", "batch_size": 4, "sort_window": 9, **data}, "output": {"path": "/o"},
                        **sections})


def check_dedup_changes_nothing(cfg, texts, pairs=None):
    """Score the part with data.dedup on and off; equal outputs, fewer forward rows. Returns the on-run's batches."""
    task = get_task(cfg.model.task)(cfg)
    model, _, _ = load_model(cfg, task, torch.device("cpu"))
    on, batches = score_part(cfg, task, model, texts, pairs)
    off_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dedup=False))
    off, plain = score_part(off_cfg, task, model, texts, pairs)
    assert on.keys() == off.keys() and on
    for name in on:
        assert_close(on[name].to_pylist(), off[name].to_pylist(), name)

    work = batches[-1].finished
    keep = [i for i, t in enumerate(texts) if cfg.data.on_null != "skip" or
            (t or "").strip() and (pairs is None or (pairs[i] or "").strip())]
    kept = [(texts[i] or "").strip() and texts[i] or "" for i in keep]  # on_null=empty scores ""
    keys = list(zip(kept, [(pairs[i] or "").strip() and pairs[i] or "" for i in keep])) if pairs else kept
    forward = sum(len(b.rows) for b in batches)
    assert forward == len(set(keys)) < len(keys) == work.rows  # each distinct input once, repeats not at all
    assert sum(len(b.rows) + b.repeats for b in batches) == work.rows  # progress counts every input row
    assert sum(len(b.rows) for b in plain) == work.rows and not any(b.repeats for b in plain)
    assert plain[-1].finished.source is None
    # Repeats were met across windows and batches: some row copies a row of an earlier sort window.
    window = cfg.data.sort_window
    assert any(s // window < i // window for i, s in enumerate(work.source))
    assert all(keys[s] == keys[i] and s <= i for i, s in enumerate(work.source))
    return batches


# -- each task, in process ---------------------------------------------------------------------------
def test_classification_pairs_and_empty_texts(models):
    pool = builders.texts(12, seed=1, long_every=5)  # long texts are cut at max_length: truncated rows repeat too
    texts = repeated(pool, 70, seed=2, nulls=[None, "  ", "", None])
    # Two pair values per text: the same text with another pair is another input, scored by itself.
    pairs = repeated(["a short question?", "Stocks fell as investors worried"], 70, seed=3, nulls=[None])
    cfg = job(models["cls"], "text-classification", {"text_pair_column": "pair", "on_null": "empty"})
    check_dedup_changes_nothing(cfg, texts, pairs)


def test_classification_skipped_nulls(models):
    texts = repeated(builders.texts(15, seed=4, long_every=100), 60, seed=5, nulls=[None, " ", None])
    check_dedup_changes_nothing(job(models["cls"], "text-classification", {"on_null": "skip"}), texts)


def test_embedding(tiny_encoder):
    texts = repeated(builders.texts(15, seed=6, long_every=6), 60, seed=7, nulls=[None, ""])
    check_dedup_changes_nothing(job(tiny_encoder, "embedding", {"on_null": "empty"}), texts)


def test_zero_shot(models):
    texts = repeated(builders.texts(10, seed=8, long_every=100), 40, seed=9, nulls=[None])
    cfg = job(models["nli"], "zero-shot-classification", {"on_null": "skip"}, zero_shot={"candidate_labels": LABELS})
    check_dedup_changes_nothing(cfg, texts)


def test_token_classification(models):
    texts = repeated(ner_texts(12, seed=10), 50, seed=11, nulls=[None, " "])
    check_dedup_changes_nothing(job(models["ner"], "token-classification", {"on_null": "empty"}), texts)


def test_greedy_generation(models):
    texts = repeated(PROMPTS, 24, seed=12, nulls=[""])
    cfg = job(models["lm"], "text-generation", {"on_null": "empty"}, generation={"max_new_tokens": 6})
    check_dedup_changes_nothing(cfg, texts)


def test_spark_udf_function(models):
    """What predict_udf runs on each Arrow batch (no Spark session needed): repeats within the batch once."""
    from hvd_infer.spark import _Predictor

    texts = np.array(repeated(builders.texts(8, seed=16, long_every=4), 40, seed=17, nulls=[None]), dtype=object)
    pairs = np.array(repeated(["one pair", "another pair"], 40, seed=18), dtype=object)
    cfg = job(models["cls"], "text-classification", {"text_pair_column": "pair", "on_null": "empty"})
    on = _Predictor(cfg).predict(texts, pairs)
    off = _Predictor(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dedup=False))).predict(texts, pairs)
    assert on["label"].tolist() == off["label"].tolist()
    np.testing.assert_allclose(on["probs"], off["probs"], atol=ATOL)


def test_sampled_generation_scores_every_row(models, tmp_path):
    texts = repeated(PROMPTS, 12, seed=13)
    cfg = job(models["lm"], "text-generation", {}, generation={"max_new_tokens": 4, "do_sample": True})
    task = get_task(cfg.model.task)(cfg)
    model, _, _ = load_model(cfg, task, torch.device("cpu"))
    _, batches = score_part(cfg, task, model, texts)
    assert sum(len(b.rows) for b in batches) == len(texts) and not any(b.repeats for b in batches)

    # The job (the command line, in process) says so, and its figure is 0.
    data = tmp_path / "data"
    builders.write_dataset(str(data), len(texts), files=1, row_group_size=5, text=texts)
    out = tmp_path / "out"
    r = cli(["--config", "/dev/null", f"model.path={models['lm']}", "model.task=text-generation",
             f"data.path={data}", f"output.path={out}", "runtime.progress=false", "mlflow.enabled=false",
             "generation.do_sample=true", "generation.max_new_tokens=4"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert ("data.dedup off: generation.do_sample=true draws a sample for every row, repeated prompts included; "
            "0 forward rows saved") in r.stdout
    assert json.loads((out / "_manifest.json").read_text())["summary"]["dedup_saved_rows"] == 0


# -- a real job on 2 ranks ---------------------------------------------------------------------------
@pytest.mark.slow
def test_two_ranks_thirty_percent_repeats(tiny_classifier, tmp_path):
    rng = random.Random(14)
    texts = []
    for t in builders.texts(140, seed=15):  # 30% of rows repeat one of the 10 rows before them, as log lines do
        texts.append(rng.choice(texts[-10:]) if texts and rng.random() < 0.3 else t)
    data, out = tmp_path / "data", tmp_path / "out"
    table = builders.write_dataset(str(data), len(texts), files=2, row_group_size=9, text=texts)
    # A sort window longer than a part: the loader's unit is the whole part, where dedup finds repeats
    # (units of a part, with data.workers > 1, are covered in test_long_texts).
    r = horovodrun(2, multirank_args(tiny_classifier, data, out, tmp_path, "data.sort_window=64"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    got = pads.dataset(str(out)).to_table().to_pandas()
    assert sorted(got["id"]) == sorted(table.column("id").to_pylist())  # exactly once
    by_id = {i: k for k, i in enumerate(table.column("id").to_pylist())}
    rows = [by_id[i] for i in got["id"]]
    np.testing.assert_allclose(np.stack(got["probs"].to_numpy()), reference_probs(tiny_classifier, texts)[rows],
                               atol=ATOL)

    manifest = json.loads((out / "_manifest.json").read_text())
    saved = sum(b - a - len(set(texts[a:b])) for a, b in (p["input_rows"] for p in manifest["parts"]))
    assert saved >= 0.2 * len(texts)  # most repeats fall in their original's part (of 30-40 rows)
    assert manifest["summary"]["dedup_saved_rows"] == saved
    assert f"data.dedup: {saved} rows repeated" in r.stdout and f"{saved} forward rows saved" in r.stdout
    db = sqlite3.connect(tmp_path / "mlflow.db")
    metrics = dict(db.execute("select key, value from metrics").fetchall())
    assert metrics["dedup_saved_rows"] == saved and metrics["rows"] == len(texts)
    params = dict(db.execute("select key, value from params").fetchall())
    assert params["resolved.dedup"] == "on"
