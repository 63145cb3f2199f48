"""text-classification: `label` (string), `score` (float32), `probs` (list<float32>, label id order).

With model.long_texts=chunk a row's logits are the mean (or max, model.chunk_aggregation) of its windows'.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from hvd_infer.tasks.base import Task, float_list_array


class TextClassification(Task):
    name = "text-classification"
    auto_model = "AutoModelForSequenceClassification"
    reads_first_token = True
    head = ("ForSequenceClassification", "sequence classification",
            "a model saved from AutoModelForSequenceClassification (use model.task=embedding for a bare encoder)")

    def setup(self, model, tokenizer):
        super().setup(model, tokenizer)
        id2label = model.config.id2label
        self.labels = np.array([str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}")))
                                for i in range(model.config.num_labels)], dtype=object)

    def output_fields(self):
        return [pa.field("label", pa.string()), pa.field("score", pa.float32()),
                pa.field("probs", pa.list_(pa.float32()))]

    def forward(self, model, batch):
        return {"logits": model(**batch).logits.float().cpu().numpy()}

    def columns(self, raw):
        probs = torch.softmax(torch.from_numpy(raw["logits"]), dim=-1).numpy()
        top = probs.argmax(axis=1)
        return {"label": pa.array(self.labels[top], type=pa.string()),
                "score": pa.array(probs[np.arange(len(top)), top], type=pa.float32()),
                "probs": float_list_array(probs)}
