"""The eager engine: the transformers model in torch, DeepSpeed-wrapped where it applies, under inference mode
(and CPU bfloat16 autocast); model.quantize=int8-per-channel as torch's dynamic int8 Linear layers.
"""
from __future__ import annotations

import logging
from typing import Any, Dict

import torch

from hvd_infer.engines.verify import head_modules


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


def unwrap(model):
    return getattr(model, "module", model)


class EagerPredictor:
    """Calls the (wrapped) model on a batch: moves tensors to the device, inference mode, autocast."""

    def __init__(self, model, device: torch.device, autocast_bf16: bool, facts: Dict[str, Any]):
        self.model, self.device, self.autocast_bf16, self.facts = model, device, autocast_bf16, facts
        self.config = unwrap(model).config

    @property
    def module(self):
        return unwrap(self.model)

    def __call__(self, **batch):
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast_bf16):
            return self.model(**batch)

    def generate(self, **kwargs):
        kwargs = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in kwargs.items()}
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast_bf16):
            return self.module.generate(**kwargs)
