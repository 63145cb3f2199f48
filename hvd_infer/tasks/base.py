"""The Task interface: encode rows, run the model on a batch, give prediction columns."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch

from hvd_infer.config import JobConfig


@dataclass
class Encoded:
    """Token ids of a chunk of rows; `features[i]` belongs to row i, in whatever form the task's collate takes."""
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
        self.pad_multiple = cfg.data.pad_to_multiple_of

    # -- model -------------------------------------------------------------
    def check_model_config(self, hf_config, path: str) -> None:
        """Raise ModelError when the model cannot do this task (before weights load)."""

    def read_model_dir(self, hf_config, local_dir: str, path: str) -> None:
        """Read what the task needs from the model's files besides config.json (before weights load).

        local_dir holds the files; path is model.path as the user gave it (an MLflow URI, maybe), for messages.
        """

    def facts(self) -> Dict[str, Any]:
        """What the task decided from the model (for MLflow params); "notes": lines for the job summary."""
        return {}

    def setup(self, model, tokenizer) -> None:
        """Called once after loading: keep what post-processing needs (labels, pad id)."""
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # BERT-style models tell the two texts of a pair apart by token type; RoBERTa-style ones do not.
        self.token_types = "token_type_ids" in tokenizer.model_input_names

    # -- output ------------------------------------------------------------
    def output_fields(self) -> List[pa.Field]:
        raise NotImplementedError

    # -- data --------------------------------------------------------------
    def encode(self, texts: Sequence[str], pairs: Optional[Sequence[str]] = None) -> Encoded:
        """A row's feature is its token ids, or {input_ids, token_type_ids} for a pair on a model that uses types."""
        types = pairs is not None and self.token_types
        enc = self.tokenizer(list(texts), list(pairs) if pairs is not None else None,
                             truncation=True, max_length=self.max_length,
                             return_attention_mask=False, return_token_type_ids=types)
        ids = enc["input_ids"]
        features = ([{"input_ids": i, "token_type_ids": t} for i, t in zip(ids, enc["token_type_ids"])]
                    if types else ids)
        return Encoded(features, token_counts(ids), count_truncated(enc))

    def collate(self, features: List[Any]) -> Dict[str, Any]:
        """Tensors for the model, with "input_ids" (the batcher counts padding from it).

        A task may add entries that are not tensors (offsets, texts) for its own predict to take
        out before calling the model.
        """
        return self.pad_batch(features)

    def pad_batch(self, features: List[Any], side: str = "right") -> Dict[str, torch.Tensor]:
        """pad() with this job's pad id and data.pad_to_multiple_of: every task's collate uses it."""
        return pad(features, self.pad_id, side=side, multiple=self.pad_multiple)

    # -- model run ---------------------------------------------------------
    def predict(self, model, batch: Dict[str, Any]) -> Dict[str, Any]:
        """Forward one batch; return {column: values for each row}. Runs under inference_mode."""
        raise NotImplementedError


def token_counts(ids: List[List[int]]) -> np.ndarray:
    return np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))


def count_truncated(enc) -> int:
    """Sequences a fast tokenizer cut at max_length."""
    return sum(1 for e in enc.encodings if e.overflowing) if enc.encodings else 0


def pad(features: List[Any], pad_id: int, side: str = "right", multiple: int = 1) -> Dict[str, torch.Tensor]:
    """Pad token id lists (or dicts of equal-length lists, input_ids among them) to one width, with a mask.

    input_ids are padded with pad_id and other keys (token_type_ids) with 0; side="left" for decoders
    that generate from the last position. The width is rounded up to `multiple`: every distinct
    (rows, width) shape makes the CPU allocator and oneDNN keep buffers of its own, so with one
    width per token count a rank's memory grew ~2x over a long job (measured, MiniLM); with
    multiples of 8 it stays flat, and the kernels get aligned shapes.
    """
    rows = [f if isinstance(f, dict) else {"input_ids": f} for f in features]
    width = max(len(r["input_ids"]) for r in rows)
    width = -(-width // multiple) * multiple
    out = {k: np.full((len(rows), width), pad_id if k == "input_ids" else 0, dtype=np.int64) for k in rows[0]}
    out["attention_mask"] = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        for k, v in r.items():
            out[k][i, cols] = v
        out["attention_mask"][i, cols] = 1
    return {k: torch.from_numpy(v) for k, v in out.items()}


def float_list_array(matrix: np.ndarray) -> pa.Array:
    """A (rows, k) float matrix as a list<float32> Arrow column, without Python loops."""
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    rows, k = matrix.shape
    offsets = np.arange(0, rows * k + 1, k, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(matrix.reshape(-1)))
