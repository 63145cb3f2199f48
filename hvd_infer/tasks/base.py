"""The Task interface: encode rows, run the model on a batch, give prediction columns."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch

from hvd_infer.config import JobConfig


class ModelError(ValueError):
    """The model directory cannot do what the config asks; the message says why."""


@dataclass
class Encoded:
    """Token ids of a chunk of rows; `features[i]` belongs to row i."""
    features: List[Any]
    lengths: np.ndarray  # tokens per row, the cost used for length sorting and token budgets
    truncated: int = 0  # rows whose text was cut at model.max_length


class Task:
    """Base for encoder tasks (one sequence per row, right padding)."""

    name = ""
    auto_model = "AutoModelForSequenceClassification"  # transformers class that loads the model

    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        self.max_length = cfg.model.max_length

    # -- model -------------------------------------------------------------
    def check_model_config(self, hf_config, path: str) -> None:
        """Raise ModelError when the model cannot do this task (before weights load)."""

    def setup(self, model, tokenizer) -> None:
        """Called once after loading: keep what post-processing needs (labels, pad id)."""
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    # -- output ------------------------------------------------------------
    def output_fields(self) -> List[pa.Field]:
        raise NotImplementedError

    # -- data --------------------------------------------------------------
    def encode(self, texts: Sequence[str], pairs: Optional[Sequence[str]] = None) -> Encoded:
        enc = self.tokenizer(list(texts), list(pairs) if pairs is not None else None,
                             truncation=True, max_length=self.max_length,
                             return_attention_mask=False, return_token_type_ids=False)
        ids = enc["input_ids"]
        truncated = sum(1 for e in enc.encodings if e.overflowing) if enc.encodings else 0
        return Encoded(ids, np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids)), truncated)

    def collate(self, features: List[Any]) -> Dict[str, torch.Tensor]:
        return pad_right(features, self.pad_id)

    # -- model run ---------------------------------------------------------
    def predict(self, model, batch: Dict[str, torch.Tensor]) -> Dict[str, Any]:
        """Forward one batch; return {column: values for each row}. Runs under inference_mode."""
        raise NotImplementedError


def pad_right(features: List[List[int]], pad_id: int) -> Dict[str, torch.Tensor]:
    width = max(len(f) for f in features)
    ids = np.full((len(features), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(features), width), dtype=np.int64)
    for i, f in enumerate(features):
        ids[i, :len(f)] = f
        mask[i, :len(f)] = 1
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}


def float_list_array(matrix: np.ndarray) -> pa.Array:
    """A (rows, k) float matrix as a list<float32> Arrow column, without Python loops."""
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    rows, k = matrix.shape
    offsets = np.arange(0, rows * k + 1, k, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(matrix.reshape(-1)))
