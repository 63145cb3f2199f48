"""Load the fine-tuned model once per rank: checked, in eval mode, typed, DeepSpeed-wrapped.

    model, tokenizer, info = load_model(cfg, task, ctx)
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional, Tuple

import torch

from hvd_infer.config import JobConfig, is_model_uri
from hvd_infer.errors import ConfigError, ModelError

log = logging.getLogger("hvd_infer")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(cfg: JobConfig, device: torch.device) -> torch.dtype:
    """model.dtype for this device; float16 on CPU is refused (it is slow and lossy there)."""
    name = cfg.model.dtype
    if name == "auto":
        name = "float16" if device.type == "cuda" else "float32"
    if name == "float16" and device.type != "cuda":
        raise ConfigError("model.dtype=float16 needs a CUDA GPU and none is visible; "
                          "use model.dtype=bfloat16 (fast on CPUs with AVX512-BF16/AMX) or float32")
    if cfg.model.quantize == "int8" and device.type == "cuda":
        raise ConfigError("model.quantize=int8 is dynamic CPU quantization; on a GPU use model.dtype=float16")
    return _DTYPES[name]


def cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


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
    task.check_model_config(AutoConfig.from_pretrained(m.path, trust_remote_code=m.trust_remote_code,
                                                       local_files_only=True), m.path)


def load_model(cfg: JobConfig, task, device: torch.device) -> Tuple[Any, Any, Dict[str, Any]]:
    """Returns (model to call, tokenizer, facts for MLflow)."""
    from transformers import AutoConfig, AutoTokenizer

    m = cfg.model
    path = resolve_model_path(m.path, cfg.mlflow.tracking_uri)
    check_model_dir(path, m.allow_pickle)
    hf_config = AutoConfig.from_pretrained(path, trust_remote_code=m.trust_remote_code, local_files_only=True)
    task.check_model_config(hf_config, m.path)
    dtype = resolve_dtype(cfg, device)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=m.trust_remote_code, local_files_only=True,
                                              padding_side=getattr(task, "padding_side", "right"))
    if not getattr(tokenizer, "is_fast", False):
        log.warning("tokenizer in %s is not a fast (Rust) tokenizer: tokenization will be slow", path)
    model, autocast = _load_weights(path, cfg, task, dtype, device)
    use_ds = m.deepspeed and m.quantize != "int8"
    kernel_inject = (device.type == "cuda") if m.kernel_inject is None else m.kernel_inject
    if use_ds:
        ds_dtype = dtype if not autocast else torch.float32
        try:
            model = wrap_deepspeed(model, ds_dtype, kernel_inject)
        except Exception as e:
            if m.kernel_inject is not None or not kernel_inject:
                raise
            # Injection was only our default: keep DeepSpeed without it, on a fresh copy
            # (a failed injection may have replaced some layers already).
            log.warning("DeepSpeed kernel injection does not support %s (%s); running without it "
                        "(set model.kernel_inject=false to silence this)", type(model).__name__, str(e).splitlines()[0])
            kernel_inject = False
            model = wrap_deepspeed(_load_weights(path, cfg, task, dtype, device)[0], ds_dtype, False)
    task.setup(_unwrap(model), tokenizer)
    facts = {"model_path": path, "dtype": str(dtype).replace("torch.", ""), "deepspeed": use_ds,
             "kernel_inject": bool(use_ds and kernel_inject), "quantize": m.quantize,
             "parameters": sum(p.numel() for p in _unwrap(model).parameters()),
             "device": str(device), "autocast_bf16": autocast}
    return Predictor(model, device, autocast), tokenizer, facts


def _load_weights(path: str, cfg: JobConfig, task, dtype: torch.dtype, device: torch.device):
    """The model in eval mode, typed and on its device; returns (model, uses CPU bf16 autocast)."""
    import transformers

    m = cfg.model
    auto = getattr(transformers, task.auto_model)
    has_safetensors = any(n.endswith(".safetensors") for n in os.listdir(path))
    # Without safetensors (allow_pickle=true), transformers loads .bin with torch.load(weights_only=True).
    model, info = auto.from_pretrained(path, trust_remote_code=m.trust_remote_code, local_files_only=True,
                                       use_safetensors=has_safetensors, output_loading_info=True,
                                       dtype=torch.float32)
    missing = [k for k in info.get("missing_keys", []) if "position_ids" not in k]
    if missing:
        raise ModelError(f"model.path {m.path} lacks weights that {task.auto_model} needs for model.task={m.task} "
                         f"(missing: {', '.join(sorted(missing)[:4])}{' ...' if len(missing) > 4 else ''}); "
                         "is it the right model for this task?")
    model.eval()
    autocast = False
    if m.quantize == "int8":
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    elif dtype == torch.bfloat16 and device.type == "cpu":
        # CPU bf16: autocast keeps softmax/layernorm in float32 (agreement) and runs matmuls in bf16.
        autocast = True
        if not cpu_has_native_bf16():
            log.warning("model.dtype=bfloat16 on a CPU without AVX512-BF16/AMX: it will be SLOWER than float32 "
                        "here; use model.dtype=float32 or model.quantize=int8")
    else:
        model = model.to(dtype)
    return model.to(device), autocast


def wrap_deepspeed(model, dtype: torch.dtype, kernel_inject: bool):
    """deepspeed.init_inference with one model replica per rank (no tensor parallelism)."""
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return deepspeed.init_inference(model, dtype=dtype, replace_with_kernel_inject=kernel_inject,
                                    tensor_parallel={"tp_size": 1})


def _unwrap(model):
    return getattr(model, "module", model)


class Predictor:
    """Calls the (wrapped) model on a batch: moves tensors to the device, inference mode, autocast."""

    def __init__(self, model, device: torch.device, autocast_bf16: bool):
        self.model, self.device, self.autocast_bf16 = model, device, autocast_bf16
        self.config = _unwrap(model).config

    @property
    def module(self):
        return _unwrap(self.model)

    def __call__(self, **batch):
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast_bf16):
            return self.model(**batch)

    def generate(self, **kwargs):
        kwargs = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in kwargs.items()}
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast_bf16):
            return self.module.generate(**kwargs)
