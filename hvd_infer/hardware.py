"""What this machine can run: its cores, its CPU's flags, and the libraries that run models here.

    platform = this_platform("cpu")    # read once; engines.unavailable(spec, platform) checks a spec against it

Torch-free, so the launcher and the Spark driver read it before anything heavy is imported (a CUDA platform's
GPU facts are read through torch, which a job with a GPU has imported already). Each CPU fact has a variable
that says it instead of /proc/cpuinfo (1 or 0): tests take every CPU's path, and users a path their CPU hides.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Optional

# The CPU flags that decide which precisions and kernels are fast here.
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_tile")
NATIVE_BF16_ENV = "HVD_INFER_CPU_BF16"  # bfloat16 natively (AVX512-BF16, AMX): else many times slower than float32
VNNI_ENV = "HVD_INFER_CPU_VNNI"  # int8 dot products (VNNI): else ONNX Runtime's int8 weights are 7-bit
AVX512_ENV = "HVD_INFER_CPU_AVX512"  # AVX512: else oneDNN's kernels are slower than torch's Linear


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_facts() -> dict:
    """This CPU's model name, usable cores and the flags of CPU_FLAGS (each True or False), from /proc/cpuinfo."""
    model, flags = _cpuinfo()
    return {"cpu": model, "cores": cpu_cores(), **{f: f in flags for f in CPU_FLAGS}}


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple:
    """(model name, flags) of the first CPU, read once per process: every load and check asks for them."""
    model, flags = "unknown", frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model, flags


def cpu_has(override_env: str, *flags: str) -> bool:
    """Whether this CPU has any of the CPU_FLAGS `flags`, unless the variable override_env says so (1 or 0)."""
    forced = os.environ.get(override_env)
    if forced in ("0", "1"):
        return forced == "1"
    facts = cpu_facts()
    return any(facts[flag] for flag in flags)


def native_bf16() -> bool:
    return cpu_has(NATIVE_BF16_ENV, "avx512_bf16", "amx_bf16")


def vnni() -> bool:
    return cpu_has(VNNI_ENV, "avx512_vnni", "avx_vnni")


def avx512() -> bool:
    return cpu_has(AVX512_ENV, "avx512f")


def onnxruntime_version() -> str:
    """The version of ONNX Runtime where it and onnx (which the export needs) import here, else ""."""
    if not all(importlib.util.find_spec(name) for name in ("onnxruntime", "onnx")):
        return ""
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError:
        return ""
    return onnxruntime.__version__


@dataclass(frozen=True)
class Platform:
    """Where the ranks run, as far as which engine spec can run there."""
    device: str = "cpu"  # cpu or cuda
    gpu_bf16: bool = False  # cuda: the GPU computes in bfloat16
    native_bf16: bool = False  # cpu: AVX512-BF16 or AMX (NATIVE_BF16_ENV)
    whole_input: bool = True  # the job sees its input before scoring (False in a Spark UDF: no auto-check)
    ort_version: Optional[str] = None  # ONNX Runtime's version, "" where it is not installed; None: look it up

    @property
    def onnxruntime(self) -> str:
        """ONNX Runtime's version ("" where it or onnx does not import), imported only when a spec asks."""
        return onnxruntime_version() if self.ort_version is None else self.ort_version


def this_platform(device: str, whole_input: bool = True) -> Platform:
    """This host as a platform for ranks on `device` ("cpu" or "cuda")."""
    gpu_bf16 = False
    if device == "cuda":
        import torch

        gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()  # a Spark driver may have none
    return Platform(device=device, gpu_bf16=gpu_bf16, native_bf16=device == "cpu" and native_bf16(),
                    whole_input=whole_input)
