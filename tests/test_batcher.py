"""Batching: length-sorted, token budgets, padding efficiency."""
import numpy as np

from hvd_infer.batcher import length_sorted_batches


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
