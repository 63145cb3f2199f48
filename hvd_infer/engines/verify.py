"""One check for every change that must keep a model's outputs (a trimmed last layer, oneDNN's kernels, an exported
ONNX graph): its outputs on a probe batch against the model's as loaded, the change undone where they differ.

    why_not = keep_if_equal("oneDNN", expected, attempt, revert)   # "" when kept
"""
from __future__ import annotations

import inspect
from typing import Callable, Dict, List

import numpy as np
import torch

# A change keeps the outputs when they differ by at most this, relative to the largest output (at least 1).
TOLERANCE = 1e-4


def keep_if_equal(what: str, expected, attempt: Callable[[], object], revert: Callable[[], None] = lambda: None,
                  tolerance: float = TOLERANCE) -> str:
    """Run `attempt` (make the change, return the probe batch's outputs with it) and compare them with `expected`;
    where it fails or they differ by more than `tolerance` (relative), `revert` and say why. "" when kept."""
    try:
        got = attempt()
    except Exception as e:  # a layer, weight or input the change cannot take
        revert()
        return f"{what} failed on a probe batch ({str(e).splitlines()[0][:80] if str(e) else type(e).__name__})"
    want, have = _numpy(expected), _numpy(got)
    worst = float(np.abs(have - want).max()) if have.shape == want.shape else float("inf")
    if worst > tolerance * max(1.0, float(np.abs(want).max())):
        revert()
        return f"{what} changed the outputs by {worst:.2g} on a probe batch (more than {tolerance:g} relative)"
    return ""


def _numpy(x) -> np.ndarray:
    return x.detach().float().numpy() if torch.is_tensor(x) else np.asarray(x, dtype=np.float32)


def probe_batch(model, tokenizer) -> Dict[str, torch.Tensor]:
    """Two rows of different lengths, so padded with a real attention mask: the model's inputs (input_ids,
    attention_mask, token_type_ids where its forward takes them, in that order)."""
    probe = tokenizer(["A short text.", "A longer text, with more words in it, to be padded against."],
                      padding=True, return_tensors="pt")
    accepted = inspect.signature(model.forward).parameters
    return {n: probe[n] for n in ("input_ids", "attention_mask", "token_type_ids") if n in probe and n in accepted}


def head_modules(model) -> List[str]:
    """Names of the modules outside the base model (classifier, lm_head, ...), and any pooler, which feeds them:
    what int8 leaves in float32."""
    base = getattr(model, "base_model", model)
    names = [] if base is model else [name for name, child in model.named_children() if child is not base]
    return names + [name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] == "pooler"]
