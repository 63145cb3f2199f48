"""embedding: `embedding` (fixed_size_list<float32>[d]), pooled the way the model was trained (docs/tasks.md).

A sentence-transformers directory is followed exactly (sentence_layout.py); any other gets mean pooling and
L2 normalisation, and the summary says this was assumed. Rows are padded on the right, also for decoder
embedders: under causal attention a real token never sees the pads after it, so its state is unpadded.
With model.long_texts=chunk a row's vector is the mean of its windows' weighted by their pooled tokens.
"""
from __future__ import annotations

from typing import Any, Dict

import numpy as np
import pyarrow as pa
import torch

from hvd_infer.errors import ConfigError
from hvd_infer.tasks.base import Task
from hvd_infer.tasks.sentence_layout import SentenceLayout, read_sentence_layout


class Embedding(Task):
    name = "embedding"
    auto_model = "AutoModel"

    def __init__(self, cfg):
        super().__init__(cfg)
        e = cfg.embedding
        if e.prompt is not None and e.prompt_name is not None:
            raise ConfigError(f"embedding.prompt and embedding.prompt_name are both set ({e.prompt!r}, "
                              f"{e.prompt_name!r}); give the literal text or the name of one of the model's prompts")
        self.options = e
        self.layout = SentenceLayout()
        self.prompt = e.prompt or ""
        self.width = 0  # vector width once the model directory is read; 0 until then

    @property
    def reads_first_token(self) -> bool:
        """cls pooling alone reads only the first position, unless it pools the first token after a prompt."""
        layout = self.layout
        return tuple(layout.pooling) == ("cls",) and (not self.prompt or layout.include_prompt
                                                      or layout.cls_at_first_position)

    def read_model_dir(self, hf_config, local_dir: str, path: str) -> None:
        layout = read_sentence_layout(local_dir)
        e = self.options
        if e.prompt_name is not None and e.prompt_name not in layout.prompts:
            defined = ", ".join(sorted(k for k, v in layout.prompts.items() if v)) or "none"
            raise ConfigError(f"embedding.prompt_name={e.prompt_name!r} is not a prompt of model.path {path} "
                              f"(its prompts: {defined}); use one of those, or give the text as embedding.prompt")
        if e.prompt is None and e.prompt_name is None and layout.default_prompt_name:
            self.prompt = layout.prompts.get(layout.default_prompt_name, "")
        elif e.prompt_name is not None:
            self.prompt = layout.prompts[e.prompt_name]
        full = (layout.token_dimension or hf_config.hidden_size) * len(layout.pooling)
        if e.dimensions > full:
            raise ConfigError(f"embedding.dimensions={e.dimensions} is more than model.path {path} gives ({full}); "
                              f"use at most {full}, or 0 for all of them")
        self.layout, self.width = layout, e.dimensions or full
        if self.chunk and self.prompt:
            raise ConfigError(f"model.long_texts=chunk cannot put the prompt {self.prompt!r} in every window of a text "
                              "(it would be in the first only); use model.long_texts=truncate with a prompt"
                              + ("" if e.prompt or e.prompt_name else f" (the default prompt of model.path {path})"))

    def setup(self, model, tokenizer):
        super().setup(model, tokenizer)
        layout = self.layout
        if layout.found:
            # Cut inputs where the model was trained to (max_seq_length, else the tokenizer's, capped by positions).
            trained = layout.max_seq_length or min(tokenizer.model_max_length,
                                                   getattr(model.config, "max_position_embeddings", 1 << 30))
            self.max_length = min(self.max_length, trained)
        if layout.do_lower_case:
            from tokenizers.normalizers import Lowercase, Sequence

            backend = tokenizer.backend_tokenizer
            backend.normalizer = Sequence([Lowercase()] + ([backend.normalizer] if backend.normalizer else []))
        # The prompt's tokens, its trailing special token not counted, as sentence-transformers measures them.
        self.prompt_tokens = 0
        if self.prompt and not layout.include_prompt:
            ids = tokenizer(self.prompt, truncation=True, max_length=self.max_length)["input_ids"]
            self.prompt_tokens = len(ids) - (1 if ids and ids[-1] in tokenizer.all_special_ids else 0)

    def facts(self) -> Dict[str, Any]:
        layout = self.layout
        pooling = "+".join(layout.pooling)
        source = ("as its sentence-transformers layout says" if layout.found else
                  "assumed: no sentence-transformers layout (modules.json) in the model directory")
        note = (f"embedding: {pooling} pooling, {'L2-normalised' if layout.normalize else 'not normalised'}, "
                f"{self.width} dims{f', prompt {self.prompt!r}' if self.prompt else ''} ({source})")
        return {"embedding_pooling": pooling, "embedding_normalize": layout.normalize,
                "embedding_dimensions": self.width, "embedding_prompt": self.prompt,
                "embedding_layout": "sentence-transformers" if layout.found else "none",
                "notes": [note]}

    def output_fields(self):
        # The width is known once the model directory is read; predict_udf's driver builds its schema before.
        return [pa.field("embedding", pa.list_(pa.float32(), self.width) if self.width else pa.list_(pa.float32()))]

    def encode(self, texts, pairs=None):
        if self.prompt:
            texts = [self.prompt + t for t in texts]
        return super().encode(texts, pairs)

    def forward(self, model, batch):
        hidden = model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].to(hidden.device)
        if self.prompt_tokens:
            mask = mask.clone()
            mask[:, :self.prompt_tokens] = 0
        vectors = torch.cat([pool(hidden, mask, mode, self.layout.cls_at_first_position)
                             for mode in self.layout.pooling], dim=-1)
        return {"vector": vectors[:, :self.width].cpu().numpy(), "tokens": mask.sum(dim=1).cpu().numpy()}

    def merge_windows(self, raw, starts):
        tokens = raw["tokens"].astype(np.float64)
        weighted = np.add.reduceat(raw["vector"] * tokens[:, None], starts[:-1], axis=0)
        total = np.maximum(np.add.reduceat(tokens, starts[:-1]), 1e-9)
        return {"vector": (weighted / total[:, None]).astype(np.float32), "tokens": total}

    def columns(self, raw):
        vectors = torch.from_numpy(raw["vector"])
        if self.layout.normalize:
            vectors = torch.nn.functional.normalize(vectors, p=2, dim=-1)
        return {"embedding": fixed_size_list_array(vectors.numpy())}


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str, cls_at_first_position: bool = False) -> torch.Tensor:
    """One sentence-transformers pooling mode over right-padded token states; mask marks the pooled tokens.
    cls: the first pooled token, or with cls_at_first_position the first position whatever the mask."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "cls":
        if cls_at_first_position:
            return hidden[:, 0]
        first = mask.to(torch.int32).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]
    if mode == "lasttoken":
        last = hidden.shape[1] - 1 - mask.flip(1).to(torch.int32).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if mode == "max":
        return hidden.masked_fill(weights == 0, float("-inf")).max(dim=1).values
    if mode == "weightedmean":  # later tokens weigh more: position 1, 2, ... from the first column
        positions = torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=hidden.dtype)
        weights = weights * positions.view(1, -1, 1)
    total = (hidden * weights).sum(dim=1)
    count = weights.sum(dim=1).clamp(min=1e-9)
    return total / (count.sqrt() if mode == "mean_sqrt_len_tokens" else count)


def fixed_size_list_array(matrix: np.ndarray) -> pa.Array:
    """A (rows, d) float matrix as a fixed_size_list<float32>[d] column: what vector stores load as is."""
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])
