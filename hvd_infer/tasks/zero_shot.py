"""zero-shot-classification: an NLI model scores each row against zero_shot.candidate_labels.

Output: `labels` (list<string>, best first), `scores` (list<float32>, same order), `label` and `score` (the
best), computed as transformers' ZeroShotClassificationPipeline: each label makes the hypothesis of a
(text, hypothesis) pair; entailment logits are softmaxed across labels, or with multi_label=true (or one
label) over [contradiction, entailment] per label. A row's pairs are batched together (one TokenRows group).

With model.long_texts=chunk every label's windows cover the same premise tokens (the room the longest
hypothesis leaves), and a row's logits are the mean (or max) over its windows before the scoring above.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from hvd_infer.errors import ConfigError, ModelError
from hvd_infer.tasks.base import Encoded, Task, TokenRows, float_list_array


def _label_id(id2label, prefix: str):
    return next((int(i) for i, name in id2label.items() if str(name).lower().startswith(prefix)), None)


class ZeroShotClassification(Task):
    name = "zero-shot-classification"
    auto_model = "AutoModelForSequenceClassification"
    reads_first_token = True
    head = ("ForSequenceClassification", "sequence classification",
            "an NLI model (e.g. one fine-tuned on MNLI) saved from AutoModelForSequenceClassification")
    single_text = "the text is the NLI premise and each candidate label makes the hypothesis"

    def __init__(self, cfg):
        super().__init__(cfg)
        z = cfg.zero_shot
        self.labels = list(z.candidate_labels)
        self.hypotheses = [z.hypothesis_template.format(label) for label in self.labels]
        self.per_label = z.multi_label or len(self.labels) == 1

    def check_model_config(self, hf_config, path):
        super().check_model_config(hf_config, path)
        if _label_id(hf_config.id2label, "entail") is None:
            raise ModelError(f"model.path {path} is not an NLI model: none of its labels "
                             f"({', '.join(map(str, hf_config.id2label.values()))}) is 'entailment'; "
                             "model.task=zero-shot-classification needs one (set id2label in its config.json "
                             "if it is an NLI model with generic LABEL_n names)")

    def setup(self, model, tokenizer):
        super().setup(model, tokenizer)
        id2label = model.config.id2label
        self.classes = model.config.num_labels
        self.entailment = _label_id(id2label, "entail")
        # As the pipeline, when no label says contradiction: the first label, or the last if entailment is first.
        contradiction = _label_id(id2label, "contradict")
        self.contradiction = contradiction if contradiction is not None else (
            model.config.num_labels - 1 if self.entailment == 0 else 0)
        # Only the premise is ever cut, so every hypothesis must fit with room to spare.
        sizes = [len(tokenizer(h, add_special_tokens=False)["input_ids"]) for h in self.hypotheses]
        longest = max(sizes)
        # With chunk, label j's pairs are cut at this length, so that every label's windows hold the same text.
        self.pair_lengths = [self.max_length - longest + n for n in sizes]
        if longest + tokenizer.num_special_tokens_to_add(pair=True) >= self.max_length:
            raise ConfigError(f"zero_shot: the longest hypothesis is {longest} tokens, which leaves no room for "
                              f"the text within model.max_length={self.max_length}; shorten "
                              "zero_shot.hypothesis_template or the candidate labels, or raise model.max_length")
        if self.chunk:
            self.check_stride(longest + tokenizer.num_special_tokens_to_add(pair=True))

    def output_fields(self):
        return [pa.field("labels", pa.list_(pa.string())), pa.field("scores", pa.list_(pa.float32())),
                pa.field("label", pa.string()), pa.field("score", pa.float32())]

    def encode(self, texts, pairs=None):
        if self.chunk:
            return self._encode_windows(list(texts))
        k = len(self.labels)
        enc = self.tokenizer([t for t in texts for _ in range(k)], self.hypotheses * len(texts),
                             truncation="only_first", max_length=self.max_length,
                             return_attention_mask=False, return_token_type_ids=self.token_types)
        features = TokenRows.from_lists(enc["input_ids"], enc["token_type_ids"] if self.token_types else None, group=k)
        cut = np.fromiter((bool(e.overflowing) for e in enc.encodings), dtype=bool,
                          count=len(enc.encodings)).reshape(-1, k)
        return Encoded(features, features.lengths, int(cut.any(axis=1).sum()))

    def _encode_windows(self, texts):
        """Windows of each premise, every one paired with each hypothesis: group = labels, units = windows."""
        k = len(self.labels)
        encs = [self.tokenizer(texts, [h] * len(texts), truncation="only_first", max_length=n,
                               return_overflowing_tokens=True, stride=self.stride, return_attention_mask=False,
                               return_token_type_ids=self.token_types)
                for h, n in zip(self.hypotheses, self.pair_lengths)]
        window_row = np.asarray(encs[0]["overflow_to_sample_mapping"], dtype=np.int64)
        if any(e["overflow_to_sample_mapping"] != encs[0]["overflow_to_sample_mapping"] for e in encs[1:]):
            raise RuntimeError("zero-shot windows differ between candidate labels")
        ids = [e["input_ids"][w] for w in range(len(window_row)) for e in encs]
        types = [e["token_type_ids"][w] for w in range(len(window_row)) for e in encs] if self.token_types else None
        features = TokenRows.from_lists(ids, types, group=k)
        return Encoded(features, features.lengths, 0, window_row)

    def forward(self, model, batch):
        logits = model(**batch).logits.float()
        return {"logits": logits.reshape(-1, len(self.labels) * self.classes).cpu().numpy()}

    def columns(self, raw):
        k = len(self.labels)
        logits = torch.from_numpy(raw["logits"]).reshape(len(raw["logits"]), k, self.classes)
        if self.per_label:
            scores = torch.softmax(logits[..., [self.contradiction, self.entailment]], dim=-1)[..., 1]
        else:
            scores = torch.softmax(logits[..., self.entailment], dim=-1)
        scores = scores.cpu().numpy()
        order = np.argsort(scores, axis=1)[:, ::-1]  # as the pipeline breaks ties
        ranked = np.take_along_axis(scores, order, axis=1)
        names = np.array(self.labels, dtype=object)[order]
        offsets = pa.array(np.arange(0, names.size + 1, k, dtype=np.int32))
        return {"labels": pa.ListArray.from_arrays(offsets, pa.array(names.reshape(-1), type=pa.string())),
                "scores": float_list_array(ranked),
                "label": pa.array(names[:, 0], type=pa.string()),
                "score": pa.array(ranked[:, 0], type=pa.float32())}
