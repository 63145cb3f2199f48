"""token-classification (NER): `entities`, a list of {entity_group, score, start, end, word} per row.

Entities are those of transformers' TokenClassificationPipeline with aggregation_strategy =
token_classification.aggregation (its post-processing runs on our batched logits), "O" left out; `start`
and `end` are character offsets into the text. With aggregation=none `entity_group` holds each token's own
label (the pipeline's `entity`). With model.long_texts=chunk a row's windows' entities are merged as the
pipeline does with `stride`.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from hvd_infer.errors import ModelError
from hvd_infer.tasks.base import Encoded, Task, TokenRows

ENTITY = pa.struct([pa.field("entity_group", pa.string()), pa.field("score", pa.float32()),
                    pa.field("start", pa.int64()), pa.field("end", pa.int64()), pa.field("word", pa.string())])


class TokenClassification(Task):
    name = "token-classification"
    auto_model = "AutoModelForTokenClassification"
    head = ("ForTokenClassification", "token classification",
            "a model saved from AutoModelForTokenClassification (an NER model)")
    single_text = "entities are found in data.text_column alone"

    def setup(self, model, tokenizer):
        super().setup(model, tokenizer)
        if not getattr(tokenizer, "is_fast", False):
            raise ModelError("model.task=token-classification needs a fast (Rust) tokenizer for character "
                             "offsets; save the model with its tokenizer.json")
        from transformers import pipeline
        from transformers.pipelines.token_classification import AggregationStrategy

        # Only its post-processing is used: the model runs here, in batches.
        self.pipeline = pipeline("token-classification", model=model, tokenizer=tokenizer, device=model.device)
        self.strategy = AggregationStrategy[self.cfg.token_classification.aggregation.upper()]

    def output_fields(self):
        return [pa.field("entities", pa.list_(ENTITY))]

    def encode(self, texts, pairs=None):
        texts = list(texts)
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length, return_offsets_mapping=True,
                             return_special_tokens_mask=True, return_attention_mask=False,
                             return_token_type_ids=False, **self.window_options())
        ids = enc["input_ids"]
        truncated, window_row = self.cut_or_windows(enc)
        row_texts = texts if window_row is None else [texts[r] for r in window_row]  # a window's offsets are its text's
        features = TokenRows.from_lists(ids, extra=list(zip(ids, enc["offset_mapping"], enc["special_tokens_mask"],
                                                            row_texts)))
        return Encoded(features, features.lengths, truncated, window_row)

    def collate(self, features):
        batch = self.pad_batch(features)
        batch["rows"] = features.extra  # ids, offsets, special tokens and text, for predict
        return batch

    def forward(self, model, batch):
        rows = batch["rows"]
        logits = model(**{k: v for k, v in batch.items() if k != "rows"}).logits.float().cpu().numpy()
        # The pipeline's own softmax, so scores match it to the last bit.
        shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
        scores = shifted / shifted.sum(axis=-1, keepdims=True)
        pipe, entities = self.pipeline, []
        for i, (ids, offsets, special, text) in enumerate(rows):
            n = len(ids)
            pre = pipe.gather_pre_entities(text, np.asarray(ids), scores[i, :n], offsets, np.asarray(special),
                                           self.strategy)
            found = []
            for e in pipe.aggregate(pre, self.strategy):
                group = e.get("entity_group", e.get("entity"))
                if group != "O":
                    found.append({"entity_group": group, "score": float(e["score"]), "start": e["start"],
                                  "end": e["end"], "word": e["word"]})
            entities.append(found)
        return {"entities": entities}

    def merge_windows(self, raw, starts):
        windows = raw["entities"]
        merged = []
        for a, b in zip(starts[:-1], starts[1:]):
            found = [e for w in windows[a:b] for e in w]
            merged.append(self.pipeline.aggregate_overlapping_entities(found) if b - a > 1 else found)
        return {"entities": merged}

    def columns(self, raw):
        return {"entities": pa.array(list(raw["entities"]), type=pa.list_(ENTITY))}
