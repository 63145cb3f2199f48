"""Load the fine-tuned model once per rank: checked, in eval mode, typed, DeepSpeed-wrapped (or run by ONNX Runtime).

    model, tokenizer, info = load_model(cfg, task, ctx)
"""
from __future__ import annotations

import logging
import os
from types import SimpleNamespace
from typing import Any, Dict, Optional, Tuple

import torch

from hvd_infer.config import JobConfig, is_model_uri
from hvd_infer.engines import OnnxPredictor, check_runtime, head_modules, probe_batch
from hvd_infer.errors import ConfigError, ModelError
from hvd_infer.tasks.base import pad_multiple

log = logging.getLogger("hvd_infer")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_device(cfg: JobConfig, device: torch.device) -> None:
    """What the model section asks that this device cannot run, as a ConfigError: float16 without a GPU, bfloat16
    where it is slow, int8 on a GPU, ONNX Runtime off the CPU or not installed. The launcher (for ranks on its
    host), every rank and the Spark driver (for its workers' devices) call it before anything is read."""
    resolve_dtype(cfg, device)
    check_runtime(cfg, device)


def resolve_dtype(cfg: JobConfig, device: torch.device) -> torch.dtype:
    """model.dtype for this device (auto-check: float32, its reference); refuses what is slow or lossy here."""
    m = cfg.model
    name = m.dtype
    if name == "auto":
        name = "float16" if device.type == "cuda" else "float32"
    elif name == "auto-check":
        name = "float32"
    if name == "float16" and device.type != "cuda":
        raise ConfigError("model.dtype=float16 needs a CUDA GPU and none is visible; "
                          "use model.dtype=bfloat16 (fast on CPUs with AVX512-BF16/AMX) or float32")
    if name == "bfloat16" and device.type == "cpu" and not m.allow_slow_bf16 and not cpu_has_native_bf16():
        raise ConfigError("model.dtype=bfloat16 on this CPU, which has no AVX512-BF16/AMX, runs many times slower "
                          "than float32; use model.dtype=float32 or auto-check (or model.quantize=int8-per-channel), "
                          "or set model.allow_slow_bf16=true to run it anyway")
    if m.quantize != "none" and device.type == "cuda":
        raise ConfigError(f"model.quantize={m.quantize} is dynamic CPU quantization; on a GPU use model.dtype=float16")
    return _DTYPES[name]


# Set to 1 or 0 to say whether this CPU runs bfloat16 natively, instead of reading /proc/cpuinfo.
NATIVE_BF16_ENV = "HVD_INFER_CPU_BF16"


def cpu_has_native_bf16() -> bool:
    from hvd_infer.context import cpu_has

    return cpu_has(NATIVE_BF16_ENV, "avx512_bf16", "amx_bf16")


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
    import importlib.util

    from transformers import AutoConfig

    m = cfg.model
    if not is_model_uri(m.path):  # an MLflow model is downloaded by load_model
        model_skeleton(cfg, task, AutoConfig.from_pretrained(m.path, trust_remote_code=m.trust_remote_code,
                                                             local_files_only=True))
    if m.deepspeed:
        import deepspeed  # noqa: F401
    if device.type == "cpu" and all(importlib.util.find_spec(name) for name in ("onnxruntime", "onnx")):
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401


def load_model(cfg: JobConfig, task, device: torch.device) -> Tuple[Any, Any, Dict[str, Any]]:
    """Returns (model to call, tokenizer, facts for MLflow)."""
    from transformers import AutoConfig, AutoTokenizer

    m = cfg.model
    if m.rescore_margin:
        return _load_rescoring(cfg, task, device)
    path = resolve_model_path(m.path, cfg.mlflow.tracking_uri)
    check_model_dir(path, m.allow_pickle)
    hf_config = AutoConfig.from_pretrained(path, trust_remote_code=m.trust_remote_code, local_files_only=True)
    task.check_model_config(hf_config, m.path)
    task.read_model_dir(hf_config, path, m.path)
    if m.dtype == "auto-check":
        raise ConfigError("model.dtype=auto-check is decided by the job on its own rows (hvd_infer.run, "
                          "run_on_spark); here give the precision: model.dtype=float32, bfloat16 or float16")
    dtype = resolve_dtype(cfg, device)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=m.trust_remote_code, local_files_only=True,
                                              padding_side=getattr(task, "padding_side", "right"))
    if not getattr(tokenizer, "is_fast", False):
        log.warning("tokenizer in %s is not a fast (Rust) tokenizer: tokenization will be slow", path)
    use_ds = m.deepspeed and m.quantize == "none" and m.runtime == "eager"
    kernel_inject = (device.type == "cuda") if m.kernel_inject is None else m.kernel_inject
    # DeepSpeed's injected kernels replace whole layers: the last one is trimmed only without them.
    trim = m.trim_last_layer and task.reads_first_token
    model, autocast, untrimmed = _load_weights(path, cfg, task, dtype, device,
                                               tokenizer if trim and not (use_ds and kernel_inject) else None)
    linear_kernels = _use_onednn(model, tokenizer, cfg, task, dtype, device, autocast)
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
            model, _, untrimmed = _load_weights(path, cfg, task, dtype, device, tokenizer if trim else None)
            linear_kernels = _use_onednn(model, tokenizer, cfg, task, dtype, device, autocast)
            model = wrap_deepspeed(model, ds_dtype, False)
    task.setup(_unwrap(model), tokenizer)
    task.pad_multiple = pad_multiple(cfg.data.pad_to_multiple_of, device.type)
    facts = {"model_path": path, "runtime": m.runtime, "dtype": str(dtype).replace("torch.", ""), "deepspeed": use_ds,
             "kernel_inject": bool(use_ds and kernel_inject), "quantize": m.quantize,
             "last_layer": ("first position" if not untrimmed else f"whole: {untrimmed}" if task.reads_first_token
                            else "whole"),
             "linear_kernels": linear_kernels,
             "parameters": sum(p.numel() for p in _unwrap(model).parameters()),
             "device": str(device), "autocast_bf16": autocast, "pad_to_multiple_of": task.pad_multiple, **task.facts()}
    if m.runtime == "onnxruntime":
        predictor = OnnxPredictor.create(model, tokenizer, path, m.task, m.quantize, trimmed=not untrimmed)
        return predictor, tokenizer, {**facts, **predictor.facts}
    return Predictor(model, device, autocast), tokenizer, facts


def _use_onednn(model, tokenizer, cfg: JobConfig, task, dtype: torch.dtype, device: torch.device,
                autocast: bool) -> str:
    """model.onednn: a CPU float32 eager model's Linear layers on oneDNN (hvd_infer.onednn); returns the facts'
    linear_kernels: what runs them, and why torch's own where model.onednn asked for oneDNN."""
    from hvd_infer import onednn

    m = cfg.model
    if not m.onednn:
        return "torch: model.onednn=false"
    off = ("not on CPU" if device.type != "cpu" else "model.runtime=onnxruntime" if m.runtime != "eager"
           else f"model.quantize={m.quantize}" if m.quantize != "none"
           else "not float32" if dtype != torch.float32 or autocast
           else "text-generation" if m.task == "text-generation" else "")
    if off:
        return f"torch: {off}"
    why_not = onednn.use_onednn(model, probe_batch(model, tokenizer))
    return f"torch: {why_not}" if why_not else onednn.summary(model)


def _load_rescoring(cfg: JobConfig, task, device: torch.device):
    """model.rescore_margin: the quantized model, and the float32 one for the rows it is unsure of."""
    import dataclasses

    m = dataclasses.replace(cfg.model, rescore_margin=0.0)
    fast, tokenizer, facts = load_model(dataclasses.replace(cfg, model=m), task, device)
    exact = load_model(dataclasses.replace(cfg, model=dataclasses.replace(m, quantize="none", runtime="eager")),
                       task, device)[0]
    return RescoringPredictor(fast, exact, cfg.model.rescore_margin), tokenizer, {
        **facts, "rescore_margin": cfg.model.rescore_margin}


class RescoringPredictor:
    """Scores a batch with `fast` (int8); the rows whose two likeliest labels are closer in probability than
    `margin` are scored again by `exact` (float32) and take its logits. Their labels are float32's; int8 changes
    a label only where the model is unsure, so a margin measured on the job's rows keeps them all."""

    def __init__(self, fast, exact, margin: float):
        self.fast, self.exact, self.margin = fast, exact, margin
        self.config = fast.config
        self.rows = self.rescored = 0

    @property
    def module(self):
        return self.fast.module

    def __call__(self, **batch):
        with torch.inference_mode():
            logits = self.fast(**batch).logits.float()
            top = torch.softmax(logits, dim=-1).topk(2, dim=-1).values
            unsure = torch.nonzero(top[:, 0] - top[:, 1] < self.margin).squeeze(1)
            self.rows += len(logits)
            self.rescored += len(unsure)
            if len(unsure):
                logits[unsure] = self.exact(**{k: v[unsure] for k, v in batch.items()}).logits.float()
            return SimpleNamespace(logits=logits)


def _load_weights(path: str, cfg: JobConfig, task, dtype: torch.dtype, device: torch.device, trim_with=None):
    """The model in eval mode, typed and on its device, its last layer trimmed to the first position where
    trim_with (the tokenizer) is given and the probe agrees (trim_to_first_token); returns (model, uses CPU
    bf16 autocast, why the last layer is whole: "" where it was trimmed)."""
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
    untrimmed = trim_to_first_token(model, trim_with) if trim_with is not None else (
        "model.trim_last_layer=false" if not m.trim_last_layer else "its task reads every position"
        if not task.reads_first_token else "DeepSpeed kernel injection replaces it")
    autocast = False
    if m.quantize != "none" and m.runtime == "eager":  # onnxruntime exports the float32 model, then quantizes
        model = quantize_int8(model)
    elif dtype == torch.bfloat16 and device.type == "cpu":
        # CPU bf16: autocast keeps softmax/layernorm in float32 (agreement) and runs matmuls in bf16.
        autocast = True
    else:
        model = model.to(dtype)
    return model.to(device), autocast, untrimmed


def first_token_layer(model):
    """The model's last encoder layer where it has BERT's structure (BERT, RoBERTa, XLM-R, ELECTRA, MiniLM, ...:
    attention.self.query/key/value, attention.output, intermediate, output; absolute positions, no
    cross-attention), else None."""
    base = getattr(model, "base_model", model)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        return None
    last = layers[-1]
    attention = getattr(last, "attention", None)
    heads = getattr(attention, "self", None)
    if not (all(hasattr(heads, n) for n in ("query", "key", "value", "num_attention_heads", "attention_head_size"))
            and hasattr(attention, "output") and hasattr(last, "intermediate") and hasattr(last, "output")):
        return None
    if getattr(last, "crossattention", None) is not None or getattr(model.config, "is_decoder", False):
        return None
    if getattr(heads, "position_embedding_type", "absolute") != "absolute":  # relative_key scores need positions
        return None
    return last


def _first_token_forward(self, hidden_states, attention_mask=None, *args, **kwargs):
    """A BERT-style layer's forward for its first position only: every position's keys and values, the first
    position's query, attention output and feed-forward. Its output is [batch, 1, width]."""
    import torch.nn.functional as F

    heads = self.attention.self
    b, s, _ = hidden_states.shape
    h, d = heads.num_attention_heads, heads.attention_head_size
    first = hidden_states[:, :1]
    q = heads.query(first).view(b, 1, h, d).transpose(1, 2)
    k = heads.key(hidden_states).view(b, s, h, d).transpose(1, 2)
    v = heads.value(hidden_states).view(b, s, h, d).transpose(1, 2)
    mask = attention_mask
    if mask is not None and mask.dim() == 4 and mask.shape[-2] > 1:  # [batch, 1, query, key]: the first query's row
        mask = mask[:, :, :1, :]
    context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=getattr(heads, "scaling", d ** -0.5))
    attended = self.attention.output(context.transpose(1, 2).reshape(b, 1, h * d), first)
    out = self.output(self.intermediate(attended), attended)
    return (out,) if self._first_token_tuple else out


def trim_to_first_token(model, tokenizer) -> str:
    """Where the model's head reads only the first position's output (a [CLS]-pooled classifier, or an encoder
    whose embedding is the first position's state, model.task=embedding with cls pooling), its last layer
    computes that position alone (_first_token_forward): the other positions' queries, attention outputs and
    feed-forward are work nobody reads, about 5/6 of the last layer (1/7 of a 6-layer MiniLM's forward).
    Applied only once a probe batch of two padded rows gives the same output (a classifier's logits, an
    encoder's first position) with it as without it; returns "" when applied, else why not (the job summary's
    line)."""
    import types

    layer = first_token_layer(model)
    if layer is None:
        return f"{type(model).__name__}'s last layer is not BERT-style"
    probe = probe_batch(model, tokenizer)
    returned = []
    hook = layer.register_forward_hook(lambda _module, _args, out: returned.append(isinstance(out, tuple)))
    with torch.inference_mode():
        try:
            expected = _read_first(model(**probe))
        finally:
            hook.remove()
        layer._first_token_tuple = returned[0]
        layer.forward = types.MethodType(_first_token_forward, layer)
        try:
            got = _read_first(model(**probe))
        except Exception as e:  # a layer that takes other arguments than BERT's: left whole
            got = e
    if isinstance(got, Exception) or got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4,
                                                                                         atol=1e-5):
        del layer.forward
        return (f"{type(model).__name__} read more than the first position's output on a probe batch"
                if not isinstance(got, Exception) else f"{type(model).__name__}'s last layer failed on the first "
                                                        f"position alone ({str(got).splitlines()[0][:80]})")
    return ""


def _read_first(outputs) -> torch.Tensor:
    """What a task reads of the model's first output: a classifier's logits, an encoder's first position."""
    first = outputs[0]
    return first[:, 0] if first.dim() == 3 else first


def _dtype_argument(transformers_version: str) -> str:
    """from_pretrained's name for the weights' dtype: torch_dtype up to transformers 4.55, dtype since 4.56
    (4.x passes an unknown name on to the model's __init__; 5.x warns on the old one)."""
    from packaging.version import Version

    return "dtype" if Version(transformers_version) >= Version("4.56") else "torch_dtype"


def quantize_int8(model):
    """model.quantize=int8-per-channel in torch: dynamic int8 Linear layers with a weight scale per output row, the
    task head left in float32.

    Per-tensor scales and a quantized head changed 7% of a fine-tuned MiniLM classifier's labels
    on the project's bench; the head is a few thousand weights that decide the label, so keeping it costs nothing.
    """
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    head = head_modules(model)
    spec = {name: per_channel_dynamic_qconfig for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and not any(name == k or name.startswith(k + ".") for k in head)}
    # torch.ao's deprecation notices (it still works on the pinned torch) would print on every rank's load.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(model, spec, dtype=torch.qint8) if spec else model


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
