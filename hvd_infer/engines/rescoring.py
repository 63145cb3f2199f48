"""model.rescore_margin: int8's speed where the model is sure, float32's labels where it is not."""
from __future__ import annotations

from types import SimpleNamespace

import torch


class RescoringPredictor:
    """Scores a batch with `fast` (int8); the rows whose two likeliest labels are closer in probability than
    `margin` are scored again by `exact` (float32) and take its logits. Their labels are float32's; int8 changes
    a label only where the model is unsure, so a margin measured on the job's rows keeps them all."""

    def __init__(self, fast, exact, margin: float):
        self.fast, self.exact, self.margin = fast, exact, margin
        self.config = fast.config
        self.rows = self.rescored = 0

    @property
    def module(self):
        return self.fast.module

    @property
    def facts(self):
        return {**self.fast.facts, "rescore_margin": self.margin}

    def __call__(self, **batch):
        with torch.inference_mode():
            logits = self.fast(**batch).logits.float()
            top = torch.softmax(logits, dim=-1).topk(2, dim=-1).values
            unsure = torch.nonzero(top[:, 0] - top[:, 1] < self.margin).squeeze(1)
            self.rows += len(logits)
            self.rescored += len(unsure)
            if len(unsure):
                logits[unsure] = self.exact(**{k: v[unsure] for k, v in batch.items()}).logits.float()
            return SimpleNamespace(logits=logits)
