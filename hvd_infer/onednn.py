"""model.onednn: a CPU float32 model's Linear layers on oneDNN's kernels, as torch's inductor runs them when it
compiles for CPU (its mkldnn fusion passes), here without compiling anything.

    why_not = use_onednn(model, probe)     # "" when applied; else why the model keeps torch's own Linear

Every float32 nn.Linear runs torch.ops.mkldnn._linear_pointwise with its weight reordered once into oneDNN's
blocked layout (a second copy of the Linear weights in memory). Where a module applies a Linear then GELU (erf)
(BERT's intermediate) or a Linear then adds the residual before its LayerNorm (BERT's attention and layer
outputs), the GELU or the add runs inside the matrix product's kernel: one pass over the output instead of two
or three, and no copy of the bias into the output first (aten's addmm). On the demo MiniLM at one thread this
is ~1.2x the float32 forward (scripts/bench.py's hvd-aten against hvd). The outputs are float32's within
rounding: the change is kept only where a probe batch gives the model's outputs within 1e-4 of torch's own.
"""
from __future__ import annotations

import inspect
import types
from typing import Dict, List

import torch

# The batch rows (tokens) oneDNN's weight layout is chosen for: a hint, any batch runs.
ROWS_HINT = 2048


def available() -> str:
    """"" where this torch runs oneDNN's fused linear kernels, else why not."""
    if not torch.backends.mkldnn.is_available():
        return "this torch is built without oneDNN (mkldnn)"
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return f"torch {torch.__version__} has no oneDNN linear kernel (torch.ops.mkldnn._linear_pointwise)"
    return ""


def use_onednn(model, probe: Dict[str, torch.Tensor]) -> str:
    """Moves every float32 Linear of `model` (on CPU) onto oneDNN, with GELU and residual adds fused where the
    module is BERT-shaped, and keeps it only if the probe batch's first output stays within 1e-4 (relative) of
    what it was; returns "" when kept, else why not (and the model is as it was)."""
    missing = available()
    if missing:
        return missing
    with torch.inference_mode():
        expected = model(**probe)[0]
        patched = _patch(model)
        if not patched:
            return f"oneDNN found no float32 Linear layer in {type(model).__name__}"
        try:
            got = model(**probe)[0]
        except Exception as e:  # an input oneDNN refuses: torch's own Linear stays
            _unpatch(patched)
            return f"oneDNN failed on a probe batch ({str(e).splitlines()[0][:80]})"
    scale = float(expected.abs().max()) or 1.0
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * scale):
        _unpatch(patched)
        return f"oneDNN's outputs differed from torch's by {float((got - expected).abs().max()):.2g} on a probe batch"
    return ""


def summary(model) -> str:
    """What runs on oneDNN: the count of Linear layers and of those with GELU or the residual add fused."""
    linears = sum(1 for m in model.modules() if hasattr(m, "_onednn_weight"))
    fused = sum(1 for m in model.modules() if getattr(m, "_onednn_fused", False))
    return f"oneDNN: {linears} Linear layers, GELU or the residual add fused into {fused}"


def _patch(model) -> List[torch.nn.Module]:
    patched = []
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
    return patched


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


# oneDNN's kernels have no gradient: where autograd records (precision.sensitive_layers' backward pass), each
# patched module computes what torch's own did.
def _linear(self, x):
    if torch.is_grad_enabled():
        return torch.nn.functional.linear(x, self.weight, self.bias)
    y = torch.ops.mkldnn._linear_pointwise(_rows(x), self._onednn_weight, self.bias, "none", [], "")
    return y.view(*x.shape[:-1], y.shape[-1])


def _dense_gelu(self, hidden_states):
    dense = self.dense
    if torch.is_grad_enabled():
        return self.intermediate_act_fn(dense(hidden_states))
    y = torch.ops.mkldnn._linear_pointwise(_rows(hidden_states), dense._onednn_weight, dense.bias, "gelu", [],
                                           "none")
    return y.view(*hidden_states.shape[:-1], y.shape[-1])


def _dense_add_norm(self, hidden_states, input_tensor):
    """BERT's output: LayerNorm(dense(hidden_states) + input_tensor), dropout being off in eval mode."""
    dense = self.dense
    if torch.is_grad_enabled():
        return self.LayerNorm(dense(hidden_states) + input_tensor)
    y = torch.ops.mkldnn._linear_pointwise.binary(_rows(hidden_states), _rows(input_tensor), dense._onednn_weight,
                                                  dense.bias, "add")
    return self.LayerNorm(y.view(*hidden_states.shape[:-1], y.shape[-1]))
