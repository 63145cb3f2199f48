"""(b) transformers pipeline("text-classification"), in this process, model load included."""
from __future__ import annotations

import time
from typing import Dict, List


def run_pipeline(model_dir: str, texts: List[str], batch_size: int, max_length: int, label2id: Dict[str, int]):
    import numpy as np
    from transformers import pipeline

    t = time.perf_counter()
    pipe = pipeline("text-classification", model=model_dir, tokenizer=model_dir, device="cpu",
                    batch_size=batch_size, truncation=True, max_length=max_length)
    load = time.perf_counter() - t
    t = time.perf_counter()
    out = pipe(texts)
    infer = time.perf_counter() - t
    return np.array([label2id[o["label"]] for o in out]), load, infer
