"""The engines that run a model's forward pass, behind one contract (spec.Predictor), chosen once (spec.resolve).

    spec        the model section resolved for a platform; unavailable(spec, platform): can it run there?
    torch_eager the transformers model in torch, DeepSpeed-wrapped where it applies
    ort         the same weights exported to ONNX and run by ONNX Runtime (CPU; float32 or its int8)
    rescoring   int8's unsure rows scored again in float32
    trim, onednn   rewrites that keep the outputs, each kept only if a probe batch agrees (verify.keep_if_equal)

A new engine is one module here that returns a Predictor, and one line in model.load_model.
"""
from hvd_infer.engines.spec import EngineSpec, Predictor, checked_spec, resolve, unavailable, with_precision

__all__ = ["EngineSpec", "Predictor", "checked_spec", "resolve", "unavailable", "with_precision"]
