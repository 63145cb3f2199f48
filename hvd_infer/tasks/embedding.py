"""embedding: `embedding` (list<float32>), mean-pooled over real tokens, L2-normalised.

This is how sentence-transformers pools all-MiniLM-L6-v2 and most sentence encoders.
"""
from __future__ import annotations

import pyarrow as pa
import torch

from hvd_infer.tasks.base import Task, float_list_array


class Embedding(Task):
    name = "embedding"
    auto_model = "AutoModel"

    def output_fields(self):
        return [pa.field("embedding", pa.list_(pa.float32()))]

    def predict(self, model, batch):
        hidden = model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].to(hidden.device).unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return {"embedding": float_list_array(pooled.cpu().numpy())}
