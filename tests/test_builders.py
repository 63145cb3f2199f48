"""The test models react to their input, and the guard that says so can fail.

A model whose outputs hardly depend on the text (one label for every row, near-uniform or saturated
probabilities, near-identical vectors) makes every "equal to the reference" check pass for a runner that
swaps, drops or mis-pads rows. builders checks each model it builds; these tests check that check.
"""
import numpy as np

import builders


def test_the_tiny_models_react(tiny_classifier, tiny_encoder):
    from transformers import AutoModel, AutoTokenizer

    probs = builders.plain_probs(tiny_classifier, builders.PROBE)
    assert builders.reacts(probs) == ""
    labels = np.bincount(probs.argmax(1), minlength=3)
    assert labels.min() > 0 and labels.max() <= len(probs) / 2 and np.mean(probs.max(1) > 0.99) <= 0.1
    vectors = builders.mean_pooled(AutoModel.from_pretrained(tiny_encoder).eval(),
                                   AutoTokenizer.from_pretrained(tiny_encoder), builders.PROBE)
    assert builders.spread(vectors) == ""


def test_the_guard_refuses_models_that_do_not_react():
    rng = np.random.default_rng(0)
    n = len(builders.PROBE)
    uniform = np.full((n, 3), 1 / 3) + rng.normal(0, 1e-4, (n, 3))  # a random head on a shared direction
    two_labels = np.eye(3)[rng.integers(0, 2, n)] * 0.5 + 0.5 / 3
    one_mostly = np.eye(3)[np.r_[np.zeros(n - 10, int), np.arange(10) % 3]] * 0.5 + 0.5 / 3
    saturated = np.eye(3)[np.arange(n) % 3] * 0.999 + 0.001 / 3
    fine = np.eye(3)[np.arange(n) % 3] * 0.5 + 0.5 / 3
    assert builders.reacts(fine) == ""
    for probs in (uniform, two_labels, one_mostly, saturated):
        assert builders.reacts(probs) != ""
    same = np.tile(rng.normal(size=(1, 32)), (n, 1)) + rng.normal(0, 1e-3, (n, 32))
    same /= np.linalg.norm(same, axis=1, keepdims=True)
    assert builders.spread(same) != ""
