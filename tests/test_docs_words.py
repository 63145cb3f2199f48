"""The user-facing docs (README.md, docs/**/*.md, mkdocs.yml) speak to users: no words from how the
project's work is organised, no commit hashes, and no relative link in the README that leads nowhere.

Fast: it reads files and starts no process.
"""
import glob
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What must not appear, each with the reason a reader would be puzzled by it.
FORBIDDEN = [
    (re.compile(r"\bissue \d+", re.I), "an issue number"),
    (re.compile(r"\bstops? \d+\b", re.I), "a numbered work stop"),
    (re.compile(r"\bthe last stop\b", re.I), "a work stop"),
    (re.compile(r"\blent\b", re.I), "'lent'"),
    # A work session (a Spark, ONNX Runtime or ssh session is a thing the product has).
    (re.compile(r"\b(this|last|next|previous|earlier|each|every|one|a new) sessions?\b", re.I), "a work session"),
]
# A commit hash: 7 to 40 lowercase hex characters with at least one digit and one letter.
HEX_RUN = re.compile(r"\b[0-9a-f]{7,40}\b")
# Hex-looking tokens that are legitimately in the docs (none so far).
ALLOWED_HEX = set()
# [text](target) and ![alt](target); the target ends at whitespace or the closing parenthesis.
MD_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def doc_files():
    files = [os.path.join(REPO, "README.md"), os.path.join(REPO, "mkdocs.yml")]
    files += sorted(glob.glob(os.path.join(REPO, "docs", "**", "*.md"), recursive=True))
    return [f for f in files if os.path.exists(f)]


def looks_like_commit(token: str) -> bool:
    return (token not in ALLOWED_HEX and any(c.isdigit() for c in token)
            and any(c in "abcdef" for c in token))


def forbidden_words(text: str):
    """(line number, what, the matched text) for each forbidden word or commit-like hex run in text."""
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        for pattern, what in FORBIDDEN:
            found += [(n, what, m.group(0)) for m in pattern.finditer(line)]
        found += [(n, "a commit hash", m.group(0)) for m in HEX_RUN.finditer(line) if looks_like_commit(m.group(0))]
    return found


def relative_links(text: str):
    """The link targets in markdown text that are paths in the repository (no URL, no bare anchor)."""
    out = []
    for target in MD_LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # http:, https:, mailto:, ... or an anchor on the same page
        out.append(target.split("#", 1)[0])
    return out


def test_the_docs_exist():
    names = {os.path.relpath(f, REPO) for f in doc_files()}
    assert {"README.md", "mkdocs.yml", os.path.join("docs", "index.md")} <= names


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: os.path.relpath(p, REPO))
def test_no_internal_words_or_commit_hashes(path):
    with open(path, encoding="utf-8") as f:
        found = forbidden_words(f.read())
    assert not found, "\n".join(f"{os.path.relpath(path, REPO)}:{n}: {what}: {text!r}" for n, what, text in found)


def test_every_relative_link_in_the_readme_exists():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        links = relative_links(f.read())
    assert links, "the README links to no file: is the link pattern still right?"
    missing = sorted({t for t in links if not os.path.exists(os.path.join(REPO, t))})
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_the_checks_catch_what_they_should():
    """The patterns themselves: each forbidden form is caught, and ordinary prose is not."""
    caught = {what for _, what, _ in forbidden_words(
        "as issue 20 said\nat stop 3\nthe last stop\na GPU lent to us\nin this session\nat d3ce174 it ran")}
    assert caught == {"an issue number", "a numbered work stop", "a work stop", "'lent'", "a work session",
                      "a commit hash"}
    assert not forbidden_words("SparkSession.builder; rows 000000050000; avx512f; cu126; the rank stops at once; "
                               "a deadbeef marker; 1e-5; fixed_size_list<float32>[384]; its ssh session was closed; "
                               "the Spark session")
    assert relative_links("[a](docs/x.md#y) [b](https://e.org) [c](#top) ![d](img/p.png)") == ["docs/x.md", "img/p.png"]


def code_files():
    """The code's comments, docstrings and help texts say the same to the user (the hex check is left out:
    code holds hex on purpose)."""
    patterns = ["hvd_infer/**/*.py", "scripts/**/*.py", "scripts/**/*.sh", "conf/*.yaml", "docker/*", "Makefile",
                "setup.cfg", "CHANGELOG.md", "tests/**/*.py"]
    files = {f for p in patterns for f in glob.glob(os.path.join(REPO, p), recursive=True) if os.path.isfile(f)}
    return sorted(files - {os.path.abspath(__file__)})


def test_no_internal_words_in_the_code():
    found = []
    for path in code_files():
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                found += [f"{os.path.relpath(path, REPO)}:{n}: {what}: {m.group(0)!r}"
                          for pattern, what in FORBIDDEN for m in pattern.finditer(line)]
    assert not found, "\n".join(found)
