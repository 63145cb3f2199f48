"""What a sentence-transformers model directory says about turning token states into one vector.

    layout = read_sentence_layout("/models/bge-small")   # pooling, normalize, prompts, max_seq_length

Read: `modules.json` (the module chain), `1_Pooling/config.json` (legacy and current keys), a `Normalize`
module, `config_sentence_transformers.json` (prompts) and `sentence_bert_config.json` (max_seq_length,
do_lower_case). Without modules.json: mean pooling and L2 normalisation, with `found` False. Other modules
(Dense, LayerNorm, ...) are refused: skipping one would give plausible, wrong vectors.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from hvd_infer.errors import ModelError

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# The legacy boolean keys, in the order sentence-transformers concatenates their vectors.
_LEGACY_POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                        "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                        "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}


@dataclass(frozen=True)
class SentenceLayout:
    found: bool = False  # the directory has a sentence-transformers layout (modules.json)
    pooling: Tuple[str, ...] = ("mean",)  # modes whose vectors are concatenated, in this order
    include_prompt: bool = True  # False: the prompt's tokens are left out of the pooling (INSTRUCTOR-style)
    normalize: bool = True
    token_dimension: Optional[int] = None  # width of one token state, as the pooling config says
    prompts: Dict[str, str] = field(default_factory=dict)
    default_prompt_name: Optional[str] = None
    max_seq_length: Optional[int] = None  # what the model was trained with; longer inputs are cut there
    do_lower_case: bool = False
    # cls pooling with the prompt left out: sentence-transformers < 5.5 takes the first position (the CLS
    # token) all the same, 5.5 on the first token after the prompt. The version the model was saved with
    # decides, as config_sentence_transformers.json records it (none recorded: the current behaviour).
    cls_at_first_position: bool = False


def _read_json(path: str, model_dir: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ModelError(f"model.path {model_dir}: cannot read {os.path.relpath(path, model_dir)} "
                         f"({str(e).splitlines()[0]}); is the sentence-transformers layout complete?") from None



def read_sentence_layout(model_dir: str) -> SentenceLayout:
    """The layout of model_dir; raises ModelError for a chain this job cannot reproduce exactly."""
    modules_file = os.path.join(model_dir, "modules.json")
    if not os.path.exists(modules_file):
        return SentenceLayout()
    modules = _read_json(modules_file, model_dir)
    kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
    if not kinds or kinds[0] != "Transformer" or modules[0].get("path", "") not in ("", "."):
        raise ModelError(f"model.path {model_dir}: modules.json does not start with a Transformer module saved "
                         f"in the directory itself (modules: {', '.join(kinds) or 'none'}); point model.path at the "
                         "directory that holds config.json and the weights")
    unsupported = [k for k in kinds[1:] if k not in ("Pooling", "Normalize")]
    if unsupported or "Pooling" not in kinds:
        raise ModelError(f"model.path {model_dir}: its sentence-transformers modules are {' -> '.join(kinds)}; "
                         "model.task=embedding reproduces Transformer -> Pooling [-> Normalize] only, and skipping "
                         f"{', '.join(unsupported) or 'the missing Pooling'} would give wrong vectors")
    pooling_dir = os.path.join(model_dir, modules[kinds.index("Pooling")]["path"])
    pooling = _read_json(os.path.join(pooling_dir, "config.json"), model_dir)
    modes = _pooling_modes(pooling, model_dir)

    transformer = os.path.join(model_dir, "sentence_bert_config.json")
    transformer = _read_json(transformer, model_dir) if os.path.exists(transformer) else {}
    task = transformer.get("transformer_task", "feature-extraction")
    if task != "feature-extraction":
        raise ModelError(f"model.path {model_dir}: its Transformer module runs transformer_task={task}; "
                         "model.task=embedding reproduces feature-extraction models only")
    st_config = os.path.join(model_dir, "config_sentence_transformers.json")
    st_config = _read_json(st_config, model_dir) if os.path.exists(st_config) else {}
    return SentenceLayout(
        found=True, pooling=modes, include_prompt=bool(pooling.get("include_prompt", True)),
        normalize="Normalize" in kinds,
        token_dimension=pooling.get("embedding_dimension", pooling.get("word_embedding_dimension")),
        prompts={str(k): str(v) for k, v in (st_config.get("prompts") or {}).items() if v is not None},
        default_prompt_name=st_config.get("default_prompt_name"),
        max_seq_length=transformer.get("max_seq_length"), do_lower_case=bool(transformer.get("do_lower_case")),
        cls_at_first_position=_saved_before(st_config, "5.5"))


def _saved_before(st_config: dict, version: str) -> bool:
    """Whether the sentence-transformers that saved the model is older than `version`."""
    from packaging.version import InvalidVersion, Version

    saved = (st_config.get("__version__") or {}).get("sentence_transformers")
    try:
        return saved is not None and Version(saved) < Version(version)
    except InvalidVersion:
        return False


def _pooling_modes(pooling: dict, model_dir: str) -> Tuple[str, ...]:
    if "pooling_mode" in pooling:
        mode = pooling["pooling_mode"]
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    else:
        modes = tuple(m for key, m in _LEGACY_POOLING_KEYS.items() if pooling.get(key)) or ("mean",)
    bad = [m for m in modes if m not in POOLING_MODES]
    if bad or not modes:
        raise ModelError(f"model.path {model_dir}: 1_Pooling/config.json asks for pooling {', '.join(map(str, bad))}; "
                         f"known modes are {', '.join(POOLING_MODES)}")
    return modes
