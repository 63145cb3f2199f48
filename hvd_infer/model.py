"""Load the fine-tuned model once per rank: checked, in eval mode, typed, and run by the engine its spec names.

    predictor, tokenizer, facts = load_model(cfg, task, device)          # cfg.model's spec for this device
    predictor, tokenizer, facts = load_model(cfg, task, device, spec)    # another (auto-check's candidates)
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Dict, Optional, Tuple

import torch

from hvd_infer.config import JobConfig, is_model_uri
from hvd_infer.engines import EngineSpec, resolve, unavailable, with_precision
from hvd_infer.engines.onednn import summary as onednn_summary
from hvd_infer.engines.onednn import use_onednn
from hvd_infer.engines.ort import OnnxPredictor
from hvd_infer.engines.rescoring import RescoringPredictor
from hvd_infer.engines.torch_eager import EagerPredictor, quantize_int8, unwrap, wrap_deepspeed
from hvd_infer.engines.trim import trim_to_first_token
from hvd_infer.engines.verify import probe_batch
from hvd_infer.errors import ConfigError, ModelError
from hvd_infer.hardware import Platform, onnxruntime_version, this_platform
from hvd_infer.tasks.base import pad_multiple

log = logging.getLogger("hvd_infer")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_model_path(path: str, tracking_uri: Optional[str] = None) -> str:
    """A local model directory for path: MLflow URIs are downloaded (once per host) from tracking_uri's store."""
    if is_model_uri(path):
        from hvd_infer.tracking import download_model

        return download_model(path, tracking_uri)
    return path


def check_model_dir(path: str, allow_pickle: bool) -> None:
    if not os.path.isdir(path):
        raise ModelError(f"model.path {path} is not a directory; give a directory written by save_pretrained "
                         "(config.json + weights) or an MLflow URI like models:/name/1")
    if not os.path.exists(os.path.join(path, "config.json")):
        found = sorted(os.listdir(path))[:8]
        raise ModelError(f"model.path {path} has no config.json, so it is not a Hugging Face model directory "
                         f"(found: {', '.join(found) or 'nothing'}); point it at the save_pretrained output")
    names = os.listdir(path)
    if not any(n.endswith(".safetensors") for n in names):
        if not any(n.endswith((".bin", ".pt", ".pth")) for n in names):
            raise ModelError(f"model.path {path} has no weights (*.safetensors or pytorch_model.bin)")
        if not allow_pickle:
            raise ModelError(f"model.path {path} has only pickle weights (pytorch_model.bin), which can run code "
                             "when loaded; convert to safetensors, or set model.allow_pickle=true to load them "
                             "with torch's weights_only protection")


def preflight_model(cfg: JobConfig, task) -> None:
    """Check a local model directory against the task without loading weights (cheap, before any output)."""
    m = cfg.model
    if is_model_uri(m.path):
        return  # checked once downloaded, in load_model
    from transformers import AutoConfig

    check_model_dir(m.path, m.allow_pickle)
    hf_config = AutoConfig.from_pretrained(m.path, trust_remote_code=m.trust_remote_code, local_files_only=True)
    task.check_model_config(hf_config, m.path)
    task.read_model_dir(hf_config, m.path, m.path)


def model_skeleton(cfg: JobConfig, task, hf_config):
    """The task's model for this config, built on the meta device: its structure, no weights."""
    import transformers

    with torch.device("meta"):
        return getattr(transformers, task.auto_model).from_config(hf_config,
                                                                  trust_remote_code=cfg.model.trust_remote_code)


def import_model_code(cfg: JobConfig, task, device: torch.device) -> None:
    """Import the code load_model runs, loading no weights: the task's model class (built on the meta device),
    DeepSpeed, and on a CPU ONNX Runtime where it is installed.

    model.dtype=auto-check's ranks do this together before rank 0's check: a rank that waits for the check's
    choice then loads it without importing first, after the check, where every second counts (2.2 s of a 45 s
    job at 2 ranks on 2 cores)."""
    from transformers import AutoConfig

    m = cfg.model
    if not is_model_uri(m.path):  # an MLflow model is downloaded by load_model
        model_skeleton(cfg, task, AutoConfig.from_pretrained(m.path, trust_remote_code=m.trust_remote_code,
                                                             local_files_only=True))
    if m.deepspeed:
        import deepspeed  # noqa: F401
    if device.type == "cpu":
        onnxruntime_version()  # imports ONNX Runtime and onnx where they are installed


def load_model(cfg: JobConfig, task, device: torch.device, spec: Optional[EngineSpec] = None
               ) -> Tuple[Any, Any, Dict[str, Any]]:
    """Returns (predictor, tokenizer, facts for the summary and MLflow); spec: what runs it (default: cfg.model's,
    checked for this device)."""
    from transformers import AutoConfig, AutoTokenizer

    m = cfg.model
    if spec is None and m.dtype == "auto-check":
        raise ConfigError("model.dtype=auto-check is decided by the job on its own rows (hvd_infer.run, "
                          "run_on_spark); here give the precision: model.dtype=float32, bfloat16 or float16")
    platform = this_platform(device.type)
    spec = spec or resolve(m, platform)
    why = unavailable(spec, platform)  # a resumed output's precision too
    if why:
        raise ConfigError(why)
    if spec.rescore:
        return _load_rescoring(cfg, task, device, spec, platform)
    path = resolve_model_path(m.path, cfg.mlflow.tracking_uri)
    check_model_dir(path, m.allow_pickle)
    hf_config = AutoConfig.from_pretrained(path, trust_remote_code=m.trust_remote_code, local_files_only=True)
    task.check_model_config(hf_config, m.path)
    task.read_model_dir(hf_config, path, m.path)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=m.trust_remote_code, local_files_only=True,
                                              padding_side=getattr(task, "padding_side", "right"))
    if not getattr(tokenizer, "is_fast", False):
        log.warning("tokenizer in %s is not a fast (Rust) tokenizer: tokenization will be slow", path)
    model, spec, rewrites = _load_wrapped(path, cfg, task, spec, device, tokenizer)
    task.setup(unwrap(model), tokenizer)
    task.pad_multiple = pad_multiple(cfg.data.pad_to_multiple_of, device.type)
    facts = {"model_path": path, "runtime": spec.engine, "dtype": spec.dtype, "deepspeed": spec.deepspeed,
             "kernel_inject": spec.deepspeed and spec.kernel_inject, "quantize": spec.quantize, **rewrites,
             "parameters": sum(p.numel() for p in unwrap(model).parameters()),
             "device": str(device), "autocast_bf16": spec.autocast, "pad_to_multiple_of": task.pad_multiple,
             **task.facts()}
    if spec.engine == "onnxruntime":
        predictor = OnnxPredictor.create(model, tokenizer, path, m.task, spec.quantize,
                                         trimmed=rewrites["last_layer"] == "first position", facts=facts)
        return predictor, tokenizer, predictor.facts
    return EagerPredictor(model, device, spec.autocast, facts), tokenizer, facts


def _load_wrapped(path: str, cfg: JobConfig, task, spec: EngineSpec, device: torch.device, tokenizer):
    """(the model with its rewrites, DeepSpeed-wrapped where spec says, the spec as it ran, the rewrites' facts).
    DeepSpeed's injected kernels replace whole layers: the last one is trimmed only without them. Where injection
    was only the default and fails, DeepSpeed runs without it, on a fresh copy (a failed injection may have
    replaced some layers already)."""
    trim = spec.trim_last_layer and task.reads_first_token
    inject = spec.deepspeed and spec.kernel_inject
    model, rewrites = _load_weights(path, cfg, task, spec, device, tokenizer, trim and not inject)
    if not spec.deepspeed:
        return model, spec, rewrites
    dtype = torch.float32 if spec.autocast else _DTYPES[spec.dtype]
    try:
        return wrap_deepspeed(model, dtype, spec.kernel_inject), spec, rewrites
    except Exception as e:
        if cfg.model.kernel_inject is not None or not spec.kernel_inject:
            raise
        log.warning("DeepSpeed kernel injection does not support %s (%s); running without it "
                    "(set model.kernel_inject=false to silence this)", type(model).__name__, str(e).splitlines()[0])
    spec = dataclasses.replace(spec, kernel_inject=False)
    model, rewrites = _load_weights(path, cfg, task, spec, device, tokenizer, trim)
    return wrap_deepspeed(model, dtype, False), spec, rewrites


def _load_rescoring(cfg: JobConfig, task, device: torch.device, spec: EngineSpec, platform: Platform):
    """model.rescore_margin: the quantized model, and the float32 one for the rows it is unsure of."""
    fast, tokenizer, _ = load_model(cfg, task, device, dataclasses.replace(spec, rescore=0.0))
    exact = load_model(cfg, task, device, with_precision(cfg.model, platform, "float32"))[0]
    predictor = RescoringPredictor(fast, exact, spec.rescore)
    return predictor, tokenizer, predictor.facts


def _load_weights(path: str, cfg: JobConfig, task, spec: EngineSpec, device: torch.device, tokenizer, trim: bool):
    """The model in eval mode, typed and on its device, with the rewrites spec asks for that keep its outputs: its
    last layer trimmed to the first position where `trim`, its Linear layers on
    oneDNN; returns (model, the rewrites' facts: last_layer and linear_kernels)."""
    import transformers

    m = cfg.model
    auto = getattr(transformers, task.auto_model)
    has_safetensors = any(n.endswith(".safetensors") for n in os.listdir(path))
    # Without safetensors (allow_pickle=true), transformers loads .bin with torch.load(weights_only=True).
    model, info = auto.from_pretrained(path, trust_remote_code=m.trust_remote_code, local_files_only=True,
                                       use_safetensors=has_safetensors, output_loading_info=True,
                                       **{_dtype_argument(transformers.__version__): torch.float32})
    missing = [k for k in info.get("missing_keys", []) if "position_ids" not in k]
    if missing:
        raise ModelError(f"model.path {m.path} lacks weights that {task.auto_model} needs for model.task={m.task} "
                         f"(missing: {', '.join(sorted(missing)[:4])}{' ...' if len(missing) > 4 else ''}); "
                         "is it the right model for this task?")
    model.eval()
    # Trimmed in float32, before int8 or another dtype changes the outputs the probe compares.
    untrimmed = trim_to_first_token(model, tokenizer) if trim else (
        "model.trim_last_layer=false" if not spec.trim_last_layer else "its task reads every position"
        if not task.reads_first_token else "DeepSpeed kernel injection replaces it")
    if spec.quantize != "none" and spec.engine == "eager":  # onnxruntime exports the float32 model, then quantizes
        model = quantize_int8(model)
    elif not spec.autocast:  # CPU bfloat16 runs float32 weights under autocast
        model = model.to(_DTYPES[spec.dtype])
    model = model.to(device)
    return model, {"last_layer": ("first position" if not untrimmed else f"whole: {untrimmed}"
                                  if task.reads_first_token else "whole"),
                   "linear_kernels": _use_onednn(model, tokenizer, spec, m.task, device)}


def _use_onednn(model, tokenizer, spec: EngineSpec, task_name: str, device: torch.device) -> str:
    """spec.onednn: a CPU float32 eager model's Linear layers on oneDNN (engines.onednn); returns what runs them,
    and why torch's own where spec.onednn asked for oneDNN."""
    if not spec.onednn:
        return "torch: model.onednn=false"
    off = ("not on CPU" if device.type != "cpu" else "model.runtime=onnxruntime" if spec.engine != "eager"
           else f"model.quantize={spec.quantize}" if spec.quantize != "none"
           else "not float32" if spec.dtype != "float32" else "text-generation" if task_name == "text-generation"
           else "")
    if off:
        return f"torch: {off}"
    why_not = use_onednn(model, probe_batch(model, tokenizer))
    return f"torch: {why_not}" if why_not else onednn_summary(model)


def _dtype_argument(transformers_version: str) -> str:
    """from_pretrained's name for the weights' dtype: torch_dtype up to transformers 4.55, dtype since 4.56
    (4.x passes an unknown name on to the model's __init__; 5.x warns on the old one)."""
    from packaging.version import Version

    return "dtype" if Version(transformers_version) >= Version("4.56") else "torch_dtype"


