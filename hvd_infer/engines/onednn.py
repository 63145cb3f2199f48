"""model.onednn: a CPU float32 model's Linear layers on oneDNN's kernels, as torch's inductor runs them when it
compiles for CPU (its mkldnn fusion passes), here without compiling anything.

    why_not = use_onednn(model, probe)     # "" when applied; else why the model keeps torch's own Linear

Every float32 nn.Linear runs torch.ops.mkldnn._linear_pointwise with its weight reordered once into oneDNN's
blocked layout (a second copy of the Linear weights in memory). Where a module applies a Linear then GELU (erf)
(BERT's intermediate) or a Linear then adds the residual before its LayerNorm (BERT's attention and layer
outputs), the GELU or the add runs inside the matrix product's kernel: one pass over the output instead of two
or three, and no copy of the bias into the output first (aten's addmm). On the demo MiniLM at one thread this
is ~1.2x the float32 forward (docs/speed.md), on a CPU with AVX512; without it torch's own Linear stays
(available()).
"""
from __future__ import annotations

import inspect
import os
import types
from typing import Dict, List

import torch

from hvd_infer.engines.verify import keep_if_equal
from hvd_infer.hardware import AVX512_ENV, avx512

# The batch rows (tokens) oneDNN's weight layout is chosen for: a hint, any batch runs.
ROWS_HINT = 2048


def available() -> str:
    """"" where this torch runs oneDNN's fused linear kernels and they are the faster here, else why not: its AVX2
    kernels ran 0.91x torch's Linear (docs/speed.md)."""
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if isa and not (isa.startswith(("AVX512", "AVX10")) or "AMX" in isa or isa in ("ALL", "DEFAULT")):
        return f"oneDNN is limited to {isa} (ONEDNN_MAX_CPU_ISA), where its kernels ran slower than torch's Linear"
    if not avx512():
        return (f"oneDNN's kernels run slower than torch's Linear on a CPU without AVX512, as this one "
                f"({AVX512_ENV}=1 uses them anyway)")
    if not torch.backends.mkldnn.is_available():
        return "this torch is built without oneDNN (mkldnn)"
    if not all(hasattr(torch.ops.mkldnn, op) for op in ("_linear_pointwise", "_reorder_linear_weight")):
        return f"torch {torch.__version__} has no oneDNN linear kernel (torch.ops.mkldnn._linear_pointwise)"
    return ""


def use_onednn(model, probe: Dict[str, torch.Tensor]) -> str:
    """Moves every float32 Linear of `model` (on CPU) onto oneDNN, with GELU and residual adds fused where the
    module is BERT-shaped, kept only if the probe batch's first output stays torch's (verify.keep_if_equal);
    returns "" when kept, else why not (and the model is as it was)."""
    missing = available()
    if missing:
        return missing
    patched: List[torch.nn.Module] = []

    def attempt():
        _patch(model, patched)
        if not patched:
            raise ValueError(f"no float32 Linear layer in {type(model).__name__}")
        return model(**probe)[0]

    with torch.inference_mode():
        return keep_if_equal("oneDNN", model(**probe)[0], attempt, lambda: _unpatch(patched))


def summary(model) -> str:
    """What runs on oneDNN: the count of Linear layers and of those with GELU or the residual add fused."""
    linears = sum(1 for m in model.modules() if hasattr(m, "_onednn_weight"))
    fused = sum(1 for m in model.modules() if getattr(m, "_onednn_fused", False))
    return f"oneDNN: {linears} Linear layers, GELU or the residual add fused into {fused}"


def _patch(model, patched: List[torch.nn.Module]) -> None:
    """Patches the model's modules, each appended to `patched` as soon as it is (for _unpatch, even midway)."""
    for module in model.modules():
        if (isinstance(module, torch.nn.Linear) and module.weight.dtype == torch.float32
                and module.weight.device.type == "cpu"):
            module._onednn_weight = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), ROWS_HINT)
            _replace_forward(module, _linear)
            patched.append(module)
    for module in model.modules():
        dense = getattr(module, "dense", None)
        if dense is None or not hasattr(dense, "_onednn_weight"):
            continue
        arguments = list(inspect.signature(module.forward).parameters)
        if arguments == ["hidden_states"] and _erf_gelu(getattr(module, "intermediate_act_fn", None)):
            _replace_forward(module, _dense_gelu)
        elif (arguments == ["hidden_states", "input_tensor"] and isinstance(getattr(module, "LayerNorm", None),
                                                                           torch.nn.LayerNorm)):
            _replace_forward(module, _dense_add_norm)
        else:
            continue
        module._onednn_fused = True
        patched.append(module)


def _replace_forward(module: torch.nn.Module, forward) -> None:
    if "_onednn_previous" not in module.__dict__:  # the forward to restore: its own (set on it), or its class's
        module._onednn_previous = module.__dict__.get("forward")
    module.forward = types.MethodType(forward, module)


def _unpatch(patched: List[torch.nn.Module]) -> None:
    for module in patched:
        previous = module.__dict__.pop("_onednn_previous")
        del module.forward
        if previous is not None:
            module.forward = previous
        for name in ("_onednn_weight", "_onednn_fused"):
            module.__dict__.pop(name, None)


def _erf_gelu(act) -> bool:
    """GELU as BERT's "gelu": the exact (erf) form, which oneDNN's gelu post-op (algorithm "none") computes."""
    if act is torch.nn.functional.gelu:
        return True
    if isinstance(act, torch.nn.GELU):
        return act.approximate == "none"
    return type(act).__name__ == "GELUActivation" and getattr(act, "act", None) is torch.nn.functional.gelu


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def _linear(self, x):
    y = torch.ops.mkldnn._linear_pointwise(_rows(x), self._onednn_weight, self.bias, "none", [], "")
    return y.view(*x.shape[:-1], y.shape[-1])


def _dense_gelu(self, hidden_states):
    dense = self.dense
    y = torch.ops.mkldnn._linear_pointwise(_rows(hidden_states), dense._onednn_weight, dense.bias, "gelu", [],
                                           "none")
    return y.view(*hidden_states.shape[:-1], y.shape[-1])


def _dense_add_norm(self, hidden_states, input_tensor):
    """BERT's output: LayerNorm(dense(hidden_states) + input_tensor), dropout being off in eval mode."""
    dense = self.dense
    y = torch.ops.mkldnn._linear_pointwise.binary(_rows(hidden_states), _rows(input_tensor), dense._onednn_weight,
                                                  dense.bias, "add")
    return self.LayerNorm(y.view(*hidden_states.shape[:-1], y.shape[-1]))
