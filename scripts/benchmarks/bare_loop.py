"""(a) The bare loop: one process, all cores, pre-tokenized length-sorted batches, a plain
transformers forward under inference_mode. The limit every other contender is measured against."""
from __future__ import annotations

import time
from typing import List


def load_classifier(model_dir: str):
    import torch
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()


def bare_batches(tokenizer, texts: List[str], batch_size: int, max_length: int):
    """Pre-tokenized, length-sorted (longest first), padded batches: (row indices, tensors) each.

    hvd_infer's own batching (length_sorted_batches, pad) over the whole corpus as one window and
    padded to the longest row, not a multiple of 8: the best padding the corpus allows.
    """
    from hvd_infer.batcher import length_sorted_batches
    from hvd_infer.tasks.base import TokenRows, pad

    ids = tokenizer(texts, truncation=True, max_length=max_length, return_attention_mask=False,
                    return_token_type_ids=False)["input_ids"]
    tokens = TokenRows.from_lists(ids)
    lengths = tokens.lengths
    pad_id = tokenizer.pad_token_id or 0
    batches = [(rows, pad(tokens[rows], pad_id))
               for rows in length_sorted_batches(lengths, batch_size, 0, max(1, len(ids)))]
    padded = sum(tensors["input_ids"].numel() for _, tensors in batches)
    return batches, int(lengths.sum()) / padded, int((lengths >= max_length).sum())


def bare_loop(model, batches, n_rows: int, autocast_bf16: bool = False):
    """(argmax labels in row order, forward seconds). A few batches first, untimed, to warm up."""
    import numpy as np
    import torch

    def forward(tensors):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16):
            return model(**tensors).logits.argmax(-1).numpy()

    for k in (0, len(batches) // 2, len(batches) - 1):
        forward(batches[k][1])
    labels = np.empty(n_rows, dtype=np.int64)
    t = time.perf_counter()
    for rows, tensors in batches:
        labels[rows] = forward(tensors)
    return labels, time.perf_counter() - t
