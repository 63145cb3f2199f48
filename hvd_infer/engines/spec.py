"""The engine spec: the model section resolved once, for a platform, into what runs the forward pass.

    spec = resolve(cfg.model, platform)    # frozen: dtype, quantization, engine, rewrites
    why = unavailable(spec, platform)      # "" where it runs there, else one line naming what would
    spec = checked_spec(cfg.model, platform)   # both, raising ConfigError: what every preflight calls

The config already refuses combinations that run nowhere (config.py); `unavailable` answers what depends on where
the ranks run. Torch-free: the launcher and the Spark driver call it before loading anything.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Dict, Protocol

from hvd_infer.errors import ConfigError
from hvd_infer.hardware import Platform

# ONNX Runtime's MatMulNBits quantizes weights to 8 bits and has x86 kernels for them from 1.22 (int8-blockwise).
BLOCKWISE_SINCE = (1, 22)


@dataclass(frozen=True)
class EngineSpec:
    dtype: str = "float32"  # float32, float16 or bfloat16
    quantize: str = "none"  # none, int8-per-channel or int8-blockwise (dynamic: float32 activations)
    engine: str = "eager"  # eager (torch) or onnxruntime
    rescore: float = 0.0  # int8's rows whose two likeliest labels are closer than this scored again in float32
    deepspeed: bool = False  # wrapped by deepspeed.init_inference
    kernel_inject: bool = False  # DeepSpeed's kernels injected
    trim_last_layer: bool = True  # the last layer computes the first position alone where the task reads only that
    onednn: bool = True  # CPU float32 Linear layers on oneDNN's kernels
    autocast: bool = False  # CPU bfloat16: matmuls in bfloat16 under autocast, softmax and norms in float32
    allow_slow_bf16: bool = False
    check: bool = False  # model.dtype=auto-check: this float32 is the reference rank 0 measures candidates against

    @property
    def name(self) -> str:
        """The precision and engine in one word, as auto-check's summary and the output's job file name it."""
        kind = "int8-rescore" if self.rescore else self.dtype if self.quantize == "none" else self.quantize
        return ("onnxruntime-" if self.engine == "onnxruntime" else "") + kind

    @property
    def token(self) -> str:
        """The name with the rescoring margin: what a resumed job reads back (precision.parse_precision)."""
        return self.name + (f"@{self.rescore!r}" if self.rescore else "")


class Predictor(Protocol):
    """What every engine gives the tasks: call it on a batch of tensors (input_ids, attention_mask, ...) and it
    returns the torch model's outputs (logits, last_hidden_state) as torch tensors."""
    config: Any  # the transformers config
    facts: Dict[str, Any]  # how it runs, for the summary and MLflow

    @property
    def module(self) -> Any: ...  # the torch model (tasks read its structure)

    def __call__(self, **batch) -> Any: ...


def resolve(m, platform: Platform) -> EngineSpec:
    """The spec of the model section `m` (config.ModelConfig) on `platform`."""
    dtype = {"auto": "float16" if platform.device == "cuda" else "float32", "auto-check": "float32"}.get(m.dtype,
                                                                                                       m.dtype)
    return EngineSpec(dtype=dtype, quantize=m.quantize, engine=m.runtime, rescore=m.rescore_margin,
                      deepspeed=m.deepspeed and m.quantize == "none" and m.runtime == "eager",
                      kernel_inject=platform.device == "cuda" if m.kernel_inject is None else m.kernel_inject,
                      trim_last_layer=m.trim_last_layer, onednn=m.onednn,
                      autocast=dtype == "bfloat16" and platform.device == "cpu", allow_slow_bf16=m.allow_slow_bf16,
                      check=m.dtype == "auto-check")


def with_precision(m, platform: Platform, dtype: str, quantize: str = "none", engine: str = "eager",
                   rescore: float = 0.0) -> EngineSpec:
    """The spec of `m` in another precision (auto-check's candidates)."""
    return resolve(dataclasses.replace(m, dtype=dtype, quantize=quantize, runtime=engine, rescore_margin=rescore),
                   platform)


def unavailable(spec: EngineSpec, platform: Platform) -> str:
    """Why `spec` cannot run on `platform` (one line naming what would), or "" where it can."""
    cuda, cpu = platform.device == "cuda", platform.device == "cpu"
    if spec.check and not platform.whole_input:
        return ("model.dtype=auto-check measures each precision on a job's input before scoring it, and a UDF has "
                "no input up front; set model.dtype=float32 (or the precision a run_on_spark job's summary chose on "
                "these workers), or score the data with run_on_spark")
    if spec.dtype == "float16" and not cuda:
        return ("model.dtype=float16 needs a CUDA GPU and none is visible; use model.dtype=bfloat16 (fast on CPUs "
                "with AVX512-BF16/AMX) or float32")
    if spec.dtype == "bfloat16" and cpu and not spec.allow_slow_bf16 and not platform.native_bf16:
        return ("model.dtype=bfloat16 on this CPU, which has no AVX512-BF16/AMX, runs many times slower than float32; "
                "use model.dtype=float32 or auto-check (or model.quantize=int8-per-channel), or set "
                "model.allow_slow_bf16=true to run it anyway")
    if spec.quantize != "none" and cuda:
        return f"model.quantize={spec.quantize} is dynamic CPU quantization; on a GPU use model.dtype=float16"
    if spec.engine == "onnxruntime":
        return _onnxruntime_unavailable(spec, platform)
    return ""


def _onnxruntime_unavailable(spec: EngineSpec, platform: Platform) -> str:
    if platform.device != "cpu":
        return (f"model.runtime=onnxruntime runs on CPU and this job has a {platform.device} device; "
                "use model.runtime=eager (with model.dtype=float16 on a GPU)")
    if not platform.onnxruntime:
        return ("model.runtime=onnxruntime needs ONNX Runtime and onnx, which are not installed here; pip install "
                "onnxruntime onnx (or pip install hvd_infer[onnx]), or use model.runtime=eager")
    if spec.quantize == "int8-blockwise" and release(platform.onnxruntime) < BLOCKWISE_SINCE:
        return (f"model.quantize=int8-blockwise needs onnxruntime >= {'.'.join(map(str, BLOCKWISE_SINCE))} (its 8-bit "
                f"MatMulNBits); this one is {platform.onnxruntime}: pip install -U onnxruntime, or use "
                "model.quantize=int8-per-channel")
    return ""


def checked_spec(m, platform: Platform) -> EngineSpec:
    """resolve, then refuse what cannot run on `platform` (ConfigError): every preflight's device check."""
    spec = resolve(m, platform)
    why = unavailable(spec, platform)
    if why:
        raise ConfigError(why)
    return spec


def release(version: str):
    return tuple(int(x) for x in re.findall(r"\d+", version)[:2])
