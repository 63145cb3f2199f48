"""scripts/make_docs_model.py's corpus: real docstrings, labelled by package, the same on every run."""
import importlib.util
import os
import re

import pytest

from conftest import REPO


def _make_docs_model():
    spec = importlib.util.spec_from_file_location("make_docs_model", os.path.join(REPO, "scripts", "make_docs_model.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_description_keeps_the_opening_paragraphs_without_the_package_name():
    mod = _make_docs_model()
    doc = ("Compute the NumPy norm of an array.\n\nUses np.linalg internally;\nsee numpy docs.\n\n"
           "Third paragraph.\n\nFourth paragraph.")
    assert mod.description(doc, ["numpy", "np"], 1500) == (
        "Compute the norm of an array.\n\nUses .linalg internally; see docs.\n\nThird paragraph.")
    sections = "Add two arrays together.\n\nParameters\n----------\nx : array"
    assert mod.description(sections, ["numpy"], 1500) == "Add two arrays together."
    assert mod.description("Short.\n\n>>> add(1, 2)", ["numpy"], 1500) == ""  # under 20 characters
    assert mod.description("word " * 400, ["numpy"], 1500) == ""  # over max_chars
    signature = "f(opts: Options = <Options object at 0x7eff827ea3f0>) -> Work"
    assert mod.description(signature, ["numpy"], 1500) == "f(opts: Options = <Options object>) -> Work"


@pytest.mark.slow
def test_corpus_is_labelled_and_deterministic(tmp_path):
    mod = _make_docs_model()
    packages = ["networkx", "numpy"]
    first = mod.extract(str(tmp_path / "a.parquet"), packages, 120, 30, 10, 1500)
    again = mod.extract(str(tmp_path / "b.parquet"), packages, 120, 30, 10, 1500)
    assert first.equals(again)
    assert sorted(first["package"].unique()) == packages
    assert first["package"].value_counts().min() >= 20  # 30 each, less the texts both packages share
    assert first["text"].is_unique and first["text"].str.len().between(20, 1500).all()
    for package, text in zip(first["package"], first["text"]):
        names = "|".join(mod.PACKAGES[package])
        assert not re.search(rf"\b(?:{names})\b", text, re.IGNORECASE), text
    assert (first["qualname"].str.split(".").str[0] == first["package"]).all()
    cached = mod.extract(str(tmp_path / "a.parquet"), packages, 120, 30, 10, 1500)  # read back, nothing imported
    assert cached.equals(first)
