"""The Task interface: encode rows, run the model on a batch, give prediction columns."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import torch

from hvd_infer.config import JobConfig
from hvd_infer.errors import ConfigError, ModelError


@dataclass
class TokenRows:
    """Token ids of many rows in flat arrays: sequence j is ids[offsets[j]:offsets[j + 1]], so selecting and
    padding a batch's rows are a few numpy operations. A row may be several sequences (`group`: zero-shot has
    one pair per candidate label)."""
    ids: np.ndarray  # int64, every sequence's ids back to back
    offsets: np.ndarray  # int64, one more than there are sequences, offsets[0] == 0
    types: Optional[np.ndarray] = None  # token_type_ids, laid out as ids (pairs on BERT-style models)
    group: int = 1  # sequences per row
    extra: Optional[List[Any]] = None  # per row, for the task's predict (NER: character offsets and text)

    @classmethod
    def from_lists(cls, ids: List[List[int]], types: Optional[List[List[int]]] = None, group: int = 1,
                   extra: Optional[List[Any]] = None) -> "TokenRows":
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        total = int(offsets[-1])
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=total)
        flat_types = (np.fromiter(itertools.chain.from_iterable(types), dtype=np.int64, count=total)
                      if types is not None else None)
        return cls(flat, offsets, flat_types, group, extra)

    def __len__(self) -> int:
        return (len(self.offsets) - 1) // self.group

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per row (all its sequences): the cost used for length sorting and token budgets."""
        return np.diff(self.offsets).reshape(-1, self.group).sum(axis=1)

    def __getitem__(self, rows: Union[int, np.ndarray, Sequence[int]]) -> Union[List[int], "TokenRows"]:
        """An int gives that row's ids (a row of one sequence); an index array gives those rows."""
        if isinstance(rows, (int, np.integer)):
            return self.ids[self.offsets[rows]:self.offsets[rows + 1]].tolist()
        rows = np.asarray(rows, dtype=np.int64)
        seqs = (rows[:, None] * self.group + np.arange(self.group)).reshape(-1)
        starts = self.offsets[seqs]
        lengths = self.offsets[seqs + 1] - starts
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        take = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        return TokenRows(self.ids[take], offsets, self.types[take] if self.types is not None else None, self.group,
                         [self.extra[i] for i in rows] if self.extra is not None else None)


@dataclass
class Encoded:
    """Token ids of a chunk of rows: `features[rows]` are the rows a batch takes to the task's collate."""
    features: TokenRows
    lengths: np.ndarray  # tokens per row, the cost used for length sorting and token budgets
    truncated: int = 0  # rows whose text was cut at model.max_length
    # model.long_texts=chunk: the features are windows, window_row[w] the row of window w (a row's windows are
    # consecutive, rows in order); None: one feature per row
    window_row: Optional[np.ndarray] = None


class Task:
    """Base for encoder tasks (one sequence per row, right padding): predict = columns(forward(batch)). With
    model.long_texts=chunk predict gives each window's raw outputs, and batcher.rows_from_windows assembles
    each row's (merge_windows), then its columns."""

    name = ""
    auto_model = "AutoModelForSequenceClassification"  # transformers class that loads the model
    head: Optional[Tuple[str, str, str]] = None  # the head model.path must have: (architecture suffix, name, why)
    single_text: Optional[str] = None  # for tasks that score data.text_column alone: why a pair makes no sense
    reads_first_token = False  # the task reads only the first position's output (model.trim_last_layer)

    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        self.max_length = cfg.model.max_length
        self.pad_multiple = pad_multiple(cfg.data.pad_to_multiple_of, "cpu")  # load_model sets the device's
        self.chunk = cfg.model.long_texts == "chunk"
        self.stride = cfg.model.stride
        self.backend = None  # setup: the tokenizer's Rust backend, when it encodes as the tokenizer does
        if self.single_text and cfg.data.text_pair_column:
            raise ConfigError(f"data.text_pair_column cannot be used with model.task={self.name}: {self.single_text}")

    # -- model -------------------------------------------------------------
    def check_model_config(self, hf_config, path: str) -> None:
        """Raise ModelError when the model cannot do this task (before weights load)."""
        if self.head is None:
            return
        suffix, head_name, needs = self.head
        archs = getattr(hf_config, "architectures", None) or []
        if not any(a.endswith(suffix) for a in archs):
            raise ModelError(f"model.path {path} has no {head_name} head (architectures: {archs or 'none'}); "
                             f"model.task={self.name} needs {needs}")

    def read_model_dir(self, hf_config, local_dir: str, path: str) -> None:
        """Read what the task needs from the model's files in local_dir (before weights load); path: for messages."""

    def facts(self) -> Dict[str, Any]:
        """What the task decided from the model (for MLflow params); "notes": lines for the job summary."""
        return {}

    def repeats_differ(self) -> Optional[str]:
        """Why two rows with the same input may get different outputs, which turns data.dedup off; None: they cannot."""
        return None

    def setup(self, model, tokenizer) -> None:
        """Called once after loading: keep what post-processing needs (labels, pad id)."""
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # BERT-style models tell the two texts of a pair apart by token type; RoBERTa-style ones do not.
        self.token_types = "token_type_ids" in tokenizer.model_input_names
        if self.chunk:
            self.check_stride(tokenizer.num_special_tokens_to_add(pair=False))
        self.backend = rust_backend(tokenizer, self.max_length)

    def check_stride(self, room_taken: int) -> None:
        """model.stride against the text tokens a window holds (max_length less room_taken)."""
        room = self.max_length - room_taken
        if self.stride >= room:
            raise ConfigError(f"model.stride={self.stride} must be smaller than the {room} text tokens a window holds "
                              f"(model.max_length={self.max_length} less {room_taken} for special tokens"
                              f"{' and the hypothesis' if self.name == 'zero-shot-classification' else ''}); "
                              f"set model.stride to at most {max(room - 1, 0)}")

    # -- output ------------------------------------------------------------
    def output_fields(self) -> List[pa.Field]:
        raise NotImplementedError

    # -- data --------------------------------------------------------------
    def encode(self, texts: Sequence[str], pairs: Optional[Sequence[str]] = None) -> Encoded:
        """A row's feature is its token ids, with token_type_ids for a pair on a model that uses types."""
        if pairs is None and not self.chunk and self.backend is not None:
            encodings = self.backend(list(texts), self.max_length)
            features = TokenRows.from_lists([e.ids for e in encodings])
            return Encoded(features, features.lengths, count_truncated(encodings), None)
        types = pairs is not None and self.token_types
        enc = self.tokenizer(list(texts), list(pairs) if pairs is not None else None,
                             truncation=True, max_length=self.max_length,
                             return_attention_mask=False, return_token_type_ids=types, **self.window_options())
        features = TokenRows.from_lists(enc["input_ids"], enc["token_type_ids"] if types else None)
        return Encoded(features, features.lengths, *self.cut_or_windows(enc))

    def window_options(self) -> Dict[str, Any]:
        """The tokenizer's arguments that split texts into windows under model.long_texts=chunk."""
        return {"return_overflowing_tokens": True, "stride": self.stride} if self.chunk else {}

    def cut_or_windows(self, enc) -> Tuple[int, Optional[np.ndarray]]:
        """(texts truncated, window_row) of a tokenizer output made with window_options()."""
        if self.chunk:
            return 0, np.asarray(enc["overflow_to_sample_mapping"], dtype=np.int64)
        return count_truncated(enc.encodings), None

    def collate(self, features: TokenRows) -> Dict[str, Any]:
        """Tensors for the model, with "input_ids" (the batcher counts padding from it); a task may add
        non-tensor entries for its own predict."""
        return self.pad_batch(features)

    def pad_batch(self, features: TokenRows, side: str = "right") -> Dict[str, torch.Tensor]:
        """pad() with this job's pad id and data.pad_to_multiple_of: every task's collate uses it."""
        return pad(features, self.pad_id, side=side, multiple=self.pad_multiple)

    # -- model run ---------------------------------------------------------
    def predict(self, model, batch: Dict[str, Any]) -> Dict[str, Any]:
        """Forward one batch; return {column: values for each row} (with long_texts=chunk: forward's raw
        outputs for each window). Runs under inference_mode."""
        raw = self.forward(model, batch)
        return raw if self.chunk else self.columns(raw)

    def forward(self, model, batch: Dict[str, Any]) -> Dict[str, Any]:
        """The model on one batch: {name: numpy array or list, one entry per sequence (row or window)}."""
        raise NotImplementedError

    def columns(self, raw: Dict[str, Any]) -> Dict[str, Any]:
        """Prediction columns from forward's raw outputs, one per row."""
        raise NotImplementedError

    def merge_windows(self, raw: Dict[str, Any], starts: np.ndarray) -> Dict[str, Any]:
        """Raw outputs of rows from their windows' (row i's are raw[k][starts[i]:starts[i + 1]]): here logits
        averaged, or their maximum (model.chunk_aggregation)."""
        logits = np.asarray(raw["logits"], dtype=np.float32)
        if self.cfg.model.chunk_aggregation == "max":
            return {"logits": np.maximum.reduceat(logits, starts[:-1], axis=0)}
        return {"logits": np.add.reduceat(logits, starts[:-1], axis=0) / np.diff(starts)[:, None]}


def rust_backend(tokenizer, probe_length: int):
    """A callable (texts, max_length) -> the fast tokenizer's Rust encodings, cut at max_length, or None.
    The same ids as tokenizer(texts, truncation=True, max_length=max_length) without transformers' per-row
    Python; checked against it on probe texts, None where anything differs or there is no Rust backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None:
        return None
    encode = getattr(backend, "encode_batch_fast", None) or backend.encode_batch
    side = getattr(tokenizer, "truncation_side", "right")

    def call(texts: List[str], max_length: int):
        # The backend is shared with the tokenizer, whose calls set truncation and padding: set them each time.
        backend.enable_truncation(max_length, stride=0, strategy="longest_first", direction=side)
        backend.no_padding()
        return encode(texts, add_special_tokens=True)

    probe = ["", "a", "Hello, world!", "naïve café ünïcödé 東京 🙂", "word " * (2 * probe_length + 5), "x" * 300]
    try:
        theirs = tokenizer(probe, truncation=True, max_length=probe_length, return_attention_mask=False,
                           return_token_type_ids=False)
        ours = call(probe, probe_length)
        same = [e.ids for e in ours] == list(theirs["input_ids"]) and \
            [bool(e.overflowing) for e in ours] == [bool(e.overflowing) for e in theirs.encodings]
    except Exception:
        return None
    return call if same else None


def count_truncated(encodings) -> int:
    """Sequences a fast tokenizer cut at max_length, from its Rust encodings (BatchEncoding.encodings)."""
    return sum(1 for e in encodings if e.overflowing) if encodings else 0


def pad_multiple(setting: Union[int, str], device_type: str) -> int:
    """data.pad_to_multiple_of for a model on this device: the number given, or auto: 8 on CUDA, 1 elsewhere."""
    if setting != "auto":
        return int(setting)
    return 8 if device_type == "cuda" else 1


def pad(tokens: Union[TokenRows, List[List[int]]], pad_id: int, side: str = "right",
        multiple: int = 1) -> Dict[str, torch.Tensor]:
    """Every sequence of `tokens` (or of a list of id lists) padded to one width, rounded up to `multiple`:
    input_ids (pad_id), token_type_ids (0), attention_mask. side="left" for decoders."""
    if not isinstance(tokens, TokenRows):
        tokens = TokenRows.from_lists(tokens)
    lengths = np.diff(tokens.offsets)
    width = -(-int(lengths.max(initial=0)) // multiple) * multiple
    positions = np.arange(width)
    # Row-major order of the mask's True cells is exactly the order of the flat ids.
    mask = positions < lengths[:, None] if side == "right" else positions >= (width - lengths)[:, None]
    out = {"input_ids": np.full((len(lengths), width), pad_id, dtype=np.int64)}
    out["input_ids"][mask] = tokens.ids
    if tokens.types is not None:
        out["token_type_ids"] = np.zeros((len(lengths), width), dtype=np.int64)
        out["token_type_ids"][mask] = tokens.types
    out["attention_mask"] = mask.astype(np.int64)
    return {k: torch.from_numpy(v) for k, v in out.items()}


def float_list_array(matrix: np.ndarray) -> pa.Array:
    """A (rows, k) float matrix as a list<float32> Arrow column, without Python loops."""
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    rows, k = matrix.shape
    offsets = np.arange(0, rows * k + 1, k, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(matrix.reshape(-1)))
