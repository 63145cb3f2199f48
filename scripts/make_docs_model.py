#!/usr/bin/env python
"""Build a 12-class classifier of real text: which Python package a docstring comes from.

    .venv/bin/python scripts/make_docs_model.py                  # -> /work/docs12
    .venv/bin/python scripts/make_docs_model.py --out /tmp/docs   # elsewhere
    .venv/bin/python scripts/make_docs_model.py --force           # rebuild data and model (the corpus cache is kept:
                                                                  # delete DIR/corpus.parquet to extract again)

No network: the text is the docstrings of packages installed beside this script's Python, written
by people. Each package's modules are walked (pkgutil.walk_packages, each package in its own
subprocess with a time limit, import errors and warnings swallowed); every public function, class
and method defined in the package gives its own docstring's opening paragraphs (up to 3, before the
first section such as "Parameters" or an example), 20..1500 characters. The package's own name and
usual import aliases are removed from the text, so no single token gives the label away. A text
that two packages share is dropped; the rest is deduplicated.

Produces (the same layout as scripts/make_demo.py, which builds and trains it):

    DIR/corpus.parquet                  every extracted docstring (package, qualname, text); a rerun reuses it
    DIR/data/train.parquet              training split (id, doc_id, text, label), balanced across packages
    DIR/data/test/part-0000.parquet ... test split: the rest, shuffled, several files x row groups
    DIR/model/                          all-MiniLM-L6-v2 fine-tuned as a 12-way sequence classifier

The corpus depends only on the installed packages' versions, unless a package reaches its time limit
before --max-per-package docstrings (the log says so): then it depends on this machine's speed too.
"""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import time
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Package (import name) -> the words that name it in its own docs: its name and usual import aliases.
PACKAGES: Dict[str, List[str]] = {
    "matplotlib": ["matplotlib", "mpl", "pyplot", "plt"],
    "mlflow": ["mlflow"],
    "networkx": ["networkx", "nx"],
    "numpy": ["numpy", "np"],
    "pandas": ["pandas", "pd"],
    "pyspark": ["pyspark", "spark"],
    "scipy": ["scipy"],
    "sklearn": ["sklearn", "scikit-learn", "scikit"],
    "sqlalchemy": ["sqlalchemy", "sa"],
    "sympy": ["sympy"],
    "torch": ["torch", "pytorch"],
    "transformers": ["transformers"],
}

MIN_PER_PACKAGE = 300  # a class with fewer texts would be learnt from a handful and tested on a handful

# A paragraph that opens a docstring section, an example or a directive ends the description.
_SECTION = re.compile(r"^(>>>|\.\. |:\w+|[A-Z]\w*( \w+){0,2}:{1,2}$)")
_UNDERLINE = re.compile(r"^[-=~^]{3,}$")
# pybind11 signatures print default objects with their address, which changes from run to run
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _load_make_demo():
    spec = importlib.util.spec_from_file_location("make_demo", os.path.join(REPO, "scripts", "make_demo.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


make_demo = _load_make_demo()
log = make_demo.log


# --------------------------------------------------------------------------------------------
# Extraction: one package per subprocess (imports have side effects, some hang or crash)
# --------------------------------------------------------------------------------------------


def description(doc: str, names: List[str], max_chars: int) -> str:
    """The docstring's opening paragraphs (up to 3, whitespace folded) with the package's names removed;
    '' when nothing between 20 and max_chars characters is left."""
    name_re = re.compile(r"\b(?:" + "|".join(re.escape(n) for n in names) + r")\b", re.IGNORECASE)
    kept: List[str] = []
    for para in re.split(r"\n\s*\n", doc.strip()):
        lines = [x.strip() for x in para.strip().splitlines()]
        if not lines or _SECTION.match(lines[0]) or (len(lines) > 1 and _UNDERLINE.match(lines[1])):
            break
        text = re.sub(r"\s+", " ", name_re.sub("", _ADDRESS.sub("", " ".join(lines)))).strip()
        if kept and len("\n\n".join(kept + [text])) > max_chars:
            break
        kept.append(text)
        if len(kept) == 3:
            break
    out = "\n\n".join(k for k in kept if k)
    return out if 20 <= len(out) <= max_chars else ""


def _documented(module, package: str):
    """(qualname, docstring) of the public functions, classes and methods defined in `package`."""
    import inspect

    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if str(getattr(obj, "__module__", "") or "").split(".")[0] != package:
            continue  # re-exported from elsewhere
        qual = f"{obj.__module__}.{getattr(obj, '__qualname__', name)}"
        # the object's own __doc__, not inspect.getdoc's inherited one: a base class's text would be
        # attributed to every package that subclasses it
        yield qual, obj.__doc__
        if inspect.isclass(obj):
            for mname, member in sorted(vars(obj).items()):
                if mname.startswith("_"):
                    continue
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if inspect.isroutine(member) or isinstance(member, property):
                    yield f"{qual}.{mname}", member.__doc__


def extract_package(package: str, out_path: str, seconds: float, max_docs: int, per_module: int,
                    max_chars: int) -> None:
    """Walk `package`, appending {"qualname", "text"} JSON lines to out_path as it goes (so a kill keeps
    them); at most per_module texts from one module (a big one, like torch's Tensor types, would fill the
    quota with near copies), stop after max_docs texts or `seconds`. Runs in its own process: see extract()."""
    import inspect
    import logging
    import pkgutil
    import warnings

    warnings.simplefilter("ignore")
    logging.disable(logging.CRITICAL)
    names = PACKAGES[package]
    deadline = time.monotonic() + seconds
    seen_objects, n = set(), 0
    top = importlib.import_module(package)
    modules = [package] + [info.name for info in pkgutil.walk_packages(top.__path__, package + ".", onerror=lambda _: None)
                       if not any(p.startswith("_") or p in ("tests", "test", "testing") for p in info.name.split("."))]
    with open(out_path, "w") as out:
        for mod in modules:
            if n >= max_docs or time.monotonic() > deadline:
                break
            try:
                found = list(_documented(importlib.import_module(mod), package))
            except BaseException:  # noqa: B902 - a module that fails to import (or exits) is skipped
                continue
            taken = 0
            for qual, doc in found:
                if n >= max_docs or taken >= per_module:
                    break
                if qual in seen_objects or not isinstance(doc, str):
                    continue
                seen_objects.add(qual)
                text = description(inspect.cleandoc(doc), names, max_chars)
                if text:
                    out.write(json.dumps({"qualname": qual, "text": text}) + "\n")
                    n += 1
                    taken += 1
            out.flush()


def extract(corpus_path: str, packages: List[str], seconds: float, max_docs: int, per_module: int, max_chars: int):
    """The packages' docstrings as a DataFrame (package, qualname, text), cached at corpus_path."""
    import pandas as pd

    if os.path.exists(corpus_path):
        df = pd.read_parquet(corpus_path)
        log(f"corpus: {len(df)} docstrings from {corpus_path}")
        return df
    rows = []
    for package in sorted(packages):
        t0 = time.time()
        part = f"{corpus_path}.{package}.jsonl"
        cmd = [sys.executable, os.path.abspath(__file__), "--extract-package", package, "--extract-to", part,
               "--extract-seconds", str(seconds), "--max-per-package", str(max_docs),
               "--max-per-module", str(per_module), "--max-chars", str(max_chars)]
        try:  # the hard limit covers a module whose import hangs; what was written by then is kept
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            pass
        got = []
        if os.path.exists(part):  # absent when the package itself does not import
            with open(part) as f:
                got = [json.loads(line) for line in f if line.endswith("\n")]
            os.remove(part)
        rows += [{"package": package, **r} for r in got]
        took = time.time() - t0
        end = ("" if len(got) >= max_docs else " (the package's end)" if took < seconds
               else f" (stopped by the {seconds:.0f} s limit: this package's share depends on the machine's speed)")
        log(f"  {package}: {len(got)} docstrings in {took:.0f}s{end}")
    df = pd.DataFrame(rows, columns=["package", "qualname", "text"])
    # a text found in two packages says nothing about either; the rest once each
    owners = df.groupby("text")["package"].nunique()
    df = df[df["text"].map(owners) == 1].drop_duplicates("text").sort_values(["package", "qualname"])
    df = df.reset_index(drop=True)
    tmp = corpus_path + ".tmp"
    df.to_parquet(tmp, index=False)
    os.replace(tmp, corpus_path)
    log(f"corpus: {len(df)} distinct docstrings -> {corpus_path}")
    return df


# --------------------------------------------------------------------------------------------
# Splits and main
# --------------------------------------------------------------------------------------------


def make_splits(corpus, train_rows: int, seed: int):
    """(train, test): up to train_rows // classes rows of each package for training (never more than a
    third of a package), the rest for testing, both shuffled; columns as make_demo's splits."""
    import numpy as np
    import pandas as pd

    per_class = train_rows // len(PACKAGES)
    train_parts, test_parts = [], []
    for k, (package, group) in enumerate(sorted(corpus.groupby("package"))):
        group = group.sample(frac=1.0, random_state=seed + k)
        take = min(per_class, len(group) // 3)
        train_parts.append(group.iloc[:take])
        test_parts.append(group.iloc[take:])

    def frame(parts, prefix: str):
        df = pd.concat(parts).sample(frac=1.0, random_state=seed).reset_index(drop=True)
        return pd.DataFrame({"id": np.arange(len(df), dtype=np.int64),
                             "doc_id": [f"{prefix}-{i:06d}" for i in range(len(df))],
                             "text": df["text"], "label": df["package"]})

    return frame(train_parts, "train"), frame(test_parts, "doc")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/work/docs12", help="output directory (default: /work/docs12)")
    p.add_argument("--force", action="store_true", help="rebuild the splits and the model even if complete")
    p.add_argument("--train-rows", type=int, default=3000)
    p.add_argument("--test-files", type=int, default=8, help="number of Parquet files in data/test")
    p.add_argument("--row-group-size", type=int, default=250)
    p.add_argument("--max-per-package", type=int, default=2000, help="docstrings taken from one package at most")
    p.add_argument("--max-per-module", type=int, default=40, help="docstrings taken from one module at most")
    p.add_argument("--max-chars", type=int, default=1500)
    p.add_argument("--extract-seconds", type=float, default=40, help="time limit for walking one package")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4)  # held-out accuracy 0.67-0.68 against 1e-4's 0.64, same time
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--freeze-embeddings", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the word embeddings fixed while fine-tuning (faster on CPU)")
    p.add_argument("--eval-rows", type=int, default=1000, help="test rows used for the printed accuracy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--extract-package", help=argparse.SUPPRESS)  # the per-package subprocess
    p.add_argument("--extract-to", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.extract_package:
        extract_package(args.extract_package, args.extract_to, args.extract_seconds, args.max_per_package,
                        args.max_per_module, args.max_chars)
        return 0

    out = os.path.abspath(args.out)
    t0 = time.time()
    build = make_demo.start_build(out, args.force, "docs classifier")
    if build is None:
        return 0
    corpus = extract(os.path.join(out, "corpus.parquet"), sorted(PACKAGES), args.extract_seconds, args.max_per_package,
                     args.max_per_module, args.max_chars)
    labels = sorted(PACKAGES)
    found = corpus["package"].value_counts()
    scarce = [f"{p} ({found.get(p, 0)})" for p in labels if found.get(p, 0) < MIN_PER_PACKAGE]
    if scarce:
        print(f"make_docs_model: too few docstrings from {', '.join(scarce)}; each of {', '.join(labels)} must be "
              f"installed and give at least {MIN_PER_PACKAGE} (delete {out}/corpus.parquet to extract again)",
              file=sys.stderr)
        return 2
    train, test = make_splits(corpus, args.train_rows, args.seed)
    counts = lambda df: ", ".join(f"{k} {v}" for k, v in sorted(df["label"].value_counts().items()))  # noqa: E731
    log(f"splits: {len(train)} train rows ({counts(train)}); {len(test)} test rows ({counts(test)})")
    make_demo.finish_build(build, train, test, args, labels)
    log(f"done in {time.time() - t0:.0f}s: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
