"""Batching: length-sorted, token budgets, padding efficiency, padding, input order, budgets."""
import numpy as np
import pyarrow as pa
import pytest

from hvd_infer.batcher import batch_limits, gpu_token_budget, in_input_order, length_sorted_batches
from hvd_infer.config import DataConfig
from hvd_infer.loader import CPU_WORKERS, resolve_workers
from hvd_infer.tasks.base import TokenRows, pad


def padding_efficiency(lengths, batches):
    real = sum(lengths[b].sum() for b in batches)
    padded = sum(len(b) * lengths[b].max() for b in batches)
    return real / padded


def test_every_row_once_and_sorted_batches_pad_little():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(4.2, 0.7, 5000).astype(int), 3, 256)
    batches = length_sorted_batches(lengths, 32, 0, 4096)
    assert sorted(np.concatenate(batches).tolist()) == list(range(5000))
    assert all(len(b) <= 32 for b in batches)
    assert padding_efficiency(lengths, batches) >= 0.9
    unsorted = [np.arange(i, min(5000, i + 32)) for i in range(0, 5000, 32)]
    assert padding_efficiency(lengths, unsorted) < 0.7


def test_token_budget():
    lengths = np.array([100, 10, 10, 10, 10, 50, 50, 5])
    batches = length_sorted_batches(lengths, 1 << 16, 200, 8)
    for b in batches:
        assert len(b) * lengths[b].max() <= 200 or len(b) == 1
    assert sorted(np.concatenate(batches).tolist()) == list(range(8))


def test_window_bounds_sorting():
    lengths = np.array([1, 9, 2, 8, 3, 7])
    batches = length_sorted_batches(lengths, 10, 0, 2)
    assert [sorted(b.tolist()) for b in batches] == [[0, 1], [2, 3], [4, 5]]


# -- padding from flat token arrays ------------------------------------------------------------

def per_row_pad(features, pad_id, side="right", multiple=1):
    """The padding as it was written before TokenRows: a Python loop over rows (the reference)."""
    import torch

    rows = [f if isinstance(f, dict) else {"input_ids": f} for f in features]
    width = max(len(r["input_ids"]) for r in rows)
    width = -(-width // multiple) * multiple
    out = {k: np.full((len(rows), width), pad_id if k == "input_ids" else 0, dtype=np.int64) for k in rows[0]}
    out["attention_mask"] = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        for k, v in r.items():
            out[k][i, cols] = v
        out["attention_mask"][i, cols] = 1
    return {k: torch.from_numpy(v) for k, v in out.items()}


def random_ids(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 30000, rng.integers(1, 60)).tolist() for _ in range(n)]


def assert_same(a, b):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and (a[k] == b[k]).all(), k


@pytest.mark.parametrize("side, multiple", [("right", 1), ("right", 8), ("left", 1), ("left", 8)])
def test_pad_equals_per_row_pad(side, multiple):
    ids = random_ids(200)
    tokens = TokenRows.from_lists(ids)
    rows = np.array([5, 199, 0, 17, 17 + 1, 64])  # any order, as length sorting gives
    assert_same(pad(tokens[rows], 0, side, multiple), per_row_pad([ids[i] for i in rows], 0, side, multiple))
    assert_same(pad(tokens, 3, side, multiple), per_row_pad(ids, 3, side, multiple))


def test_pad_pairs_with_token_types():
    ids = random_ids(50, seed=1)
    types = [[0] * (len(x) // 2) + [1] * (len(x) - len(x) // 2) for x in ids]
    tokens = TokenRows.from_lists(ids, types)
    rows = np.array([49, 3, 3, 10])
    expected = per_row_pad([{"input_ids": ids[i], "token_type_ids": types[i]} for i in rows], 0, multiple=8)
    assert_same(pad(tokens[rows], 0, multiple=8), expected)


def test_rows_of_several_sequences_and_extras():
    ids = random_ids(12, seed=2)  # 4 rows of 3 sequences (zero-shot: one pair per label)
    tokens = TokenRows.from_lists(ids, group=3, extra=["a", "b", "c", "d"])
    assert len(tokens) == 4
    assert tokens.lengths.tolist() == [sum(len(x) for x in ids[r * 3:r * 3 + 3]) for r in range(4)]
    picked = tokens[np.array([2, 0])]
    assert picked.extra == ["c", "a"] and len(picked) == 2
    assert_same(pad(picked, 0), per_row_pad(ids[6:9] + ids[0:3], 0))
    assert TokenRows.from_lists(ids)[4] == ids[4]


# -- predictions back in input order -------------------------------------------------------------

def test_in_input_order():
    rng = np.random.default_rng(0)
    n = 101
    values = rng.normal(size=n).astype(np.float32)
    batches = length_sorted_batches(rng.integers(1, 90, n), 8, 0, 32)
    outputs = [{"score": pa.array(values[b]), "label": [f"row{i}" for i in b],
                "probs": pa.array([[float(i), -float(i)] for i in b], type=pa.list_(pa.float32()))}
               for b in batches]
    got = in_input_order(outputs, batches)
    assert got["score"].to_numpy().tolist() == values.tolist()
    assert got["label"].to_pylist() == [f"row{i}" for i in range(n)]
    assert got["probs"].to_pylist() == [[float(i), -float(i)] for i in range(n)]
    assert in_input_order([], []) == {}


# -- the token budget for a GPU ------------------------------------------------------------------

def test_gpu_token_budget():
    gib = 1 << 30
    bert_base = dict(hidden_size=768, intermediate_size=3072, heads=12, max_length=256, dtype_bytes=2)
    # per token: 2 * 2 * (6*768 + 2*3072 + 2*12*256) = 67,584 bytes
    assert gpu_token_budget(1 * gib, **bert_base) == 7168  # half of 1 GiB / 67,584, in steps of 1024
    assert gpu_token_budget(70 * gib, **bert_base) == 1 << 17  # an H100: capped
    assert gpu_token_budget(10 << 20, **bert_base) == 4096  # almost nothing free: the floor
    small = gpu_token_budget(4 * gib, 384, 1536, 12, 256, 2)
    large = gpu_token_budget(4 * gib, 1024, 4096, 16, 512, 2)
    assert small > large  # a smaller model gets more tokens
    assert gpu_token_budget(4 * gib, 1024, 4096, 16, 512, 4) < large  # float32 activations: fewer


def test_batch_limits_on_cpu():
    import torch

    auto = DataConfig(path="/d", batch_size=32)
    assert batch_limits(auto, "text-classification", None, torch.device("cpu"), 256, 4) == (32, 0)
    budget = DataConfig(path="/d", batch_size=32, max_tokens_per_batch=16384)
    assert batch_limits(budget, "text-classification", None, torch.device("cpu"), 256, 4) == (1 << 16, 16384)


def test_workers_auto():
    assert resolve_workers("auto", "cuda", 16, 1) == 15
    assert resolve_workers("auto", "cuda", 16, 8) == 1
    assert resolve_workers("auto", "cpu", 2, 1) == CPU_WORKERS
    assert resolve_workers(3, "cpu", 2, 1) == 3


@pytest.mark.parametrize("side", ["right", "left"])
def test_rust_backend_encodes_as_the_tokenizer_does(side):
    """Task.encode calls the Rust tokenizer directly: the same ids and truncated count as the tokenizer's call."""
    import builders
    from transformers import AutoTokenizer

    from hvd_infer.config import load_config
    from hvd_infer.tasks import get_task
    from hvd_infer.tasks.base import Task, rust_backend

    tok = AutoTokenizer.from_pretrained(builders.minilm_dir())
    tok.truncation_side = side
    texts = builders.texts(300) + ["", "   ", "naïve café 東京 🙂 " * 40]
    task = get_task("text-classification")(load_config(None, **{"model.path": "m", "data.path": "d", "output.path": "o",
                                                               "model.max_length": 48}))
    Task.setup(task, None, tok)
    assert task.backend is not None
    fast = task.encode(texts)
    theirs = tok(texts, truncation=True, max_length=48)
    assert fast.features[np.arange(len(texts))].ids.tolist() == [i for ids in theirs["input_ids"] for i in ids]
    assert fast.lengths.tolist() == [len(ids) for ids in theirs["input_ids"]]
    task.backend = None  # the tokenizer's own call
    slow = task.encode(texts)
    assert np.array_equal(fast.features.ids, slow.features.ids) and np.array_equal(fast.features.offsets, slow.features.offsets)
    assert fast.truncated == slow.truncated > 0
    assert rust_backend(object(), 48) is None  # no fast tokenizer: the tokenizer's call
