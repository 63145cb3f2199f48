"""Every configuration key with its type, default and meaning, read from hvd_infer/config.py itself.

A key's description is the comment above and beside its field, so `hvd-infer --config-keys`,
docs/configuration.md and conf/example.yaml (both written by scripts/config_reference.py, checked by a test) agree.
"""
from __future__ import annotations

import dataclasses
import inspect
import io
import textwrap
import tokenize
import typing
from dataclasses import dataclass
from typing import Any, Dict, List

import yaml

from hvd_infer import config

# Keys without a usable default: the documented job shows a value of the form they take.
EXAMPLE_VALUES = {"model.path": "/models/my-finetuned-classifier", "data.path": "s3://bucket/table/",
                  "output.path": "/mnt/shared/predictions/my-job"}


@dataclass(frozen=True)
class Key:
    name: str  # dotted, as overrides and YAML sections spell it
    type: str
    default: Any
    doc: str


def sections() -> Dict[str, List[Key]]:
    """{section: its keys}, in config.py's order. Fails on a field without a comment."""
    out: Dict[str, List[Key]] = {}
    for section, cls in typing.get_type_hints(config.JobConfig).items():
        hints, docs = typing.get_type_hints(cls), _field_comments(cls)
        keys = out[section] = []
        for f in dataclasses.fields(cls):
            if not docs.get(f.name):
                raise ValueError(f"{cls.__name__}.{f.name} in hvd_infer/config.py has no comment: the reference "
                                 "is written from it; add one above or beside the field")
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            keys.append(Key(f"{section}.{f.name}", _type(hints[f.name], f), default, docs[f.name]))
    return out


def _type(tp: Any, f: dataclasses.Field) -> str:
    name = config._type_name(tp)
    if "range" in f.metadata:
        lo, hi, lo_open, _ = f.metadata["range"]
        if hi is not None:
            name += f" in {'(' if lo_open else '['}{lo}, {hi}]"
        elif lo is not None:
            name += f" {'>' if lo_open else '>='} {lo}"
    return name


def _field_comments(cls: type) -> Dict[str, str]:
    """{field: the comment lines right above it and the comment at the end of its line, joined}."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: Dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    docs: Dict[str, str] = {}
    above: List[str] = []
    for number, line in enumerate(source.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(comments[number])
            continue
        name = stripped.split(":", 1)[0]
        if (line.startswith("    ") and not line.startswith("     ") and ":" in stripped and stripped[0].isalpha()
                and name.isidentifier()):
            docs[name] = " ".join(above + ([comments[number]] if number in comments else []))
        above = []
    return docs


def yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def wrap(text: str, width: int) -> List[str]:
    return textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False)


def text() -> str:
    """`hvd-infer --config-keys`: one block per key."""
    out = []
    for keys in sections().values():
        for k in keys:
            default = "required" if k.name in EXAMPLE_VALUES else f"default {yaml_value(k.default)}"
            out.append(f"{k.name}: {k.type} ({default})")
            out += [f"    {line}" for line in wrap(k.doc, 96)]
    return "\n".join(out) + "\n"
