"""The engine spec: the model section resolved once per platform, and the one answer to "can it run here?" that
the launcher, every rank, the Spark driver and predict_udf share (engines.unavailable). In process, no model."""
import pytest

from hvd_infer.config import load_config
from hvd_infer.decisions import PRECISIONS, RESCORED, parse_precision, spec_of
from hvd_infer.engines import EngineSpec, checked_spec, resolve, unavailable
from hvd_infer.errors import ConfigError
from hvd_infer.hardware import Platform

CPU, CPU_BF16, GPU = Platform(ort_version="1.22.0"), Platform(native_bf16=True), Platform(device="cuda")
UDF = Platform(whole_input=False)


def model(**options):
    return load_config({"model": {"path": "/m", **options}, "data": {"path": "/d"}, "output": {"path": "/o"}}).model


def test_resolve_settles_what_the_config_leaves_to_the_device():
    assert resolve(model(), CPU).dtype == "float32" and resolve(model(), GPU).dtype == "float16"
    assert resolve(model(), GPU).kernel_inject and not resolve(model(), CPU).kernel_inject
    assert resolve(model(kernel_inject=True), CPU).kernel_inject  # asked for: kept
    check = resolve(model(dtype="auto-check"), CPU)
    assert check.check and check.dtype == "float32" and check.name == "float32"
    assert resolve(model(dtype="bfloat16"), CPU_BF16).autocast and not resolve(model(dtype="bfloat16"), GPU).autocast
    int8 = resolve(model(quantize="int8-per-channel"), CPU)
    assert not int8.deepspeed and int8.name == "int8-per-channel"  # DeepSpeed wraps float models only
    ort = resolve(model(runtime="onnxruntime", quantize="int8-per-channel", rescore_margin=0.25), CPU)
    assert ort.name == "onnxruntime-int8-rescore" and ort.token == "onnxruntime-int8-rescore@0.25"
    with pytest.raises(Exception):
        resolve(model(), CPU).dtype = "float16"  # frozen: chosen once


@pytest.mark.parametrize("options, platform, fragment", [
    ({"dtype": "float16"}, CPU, "model.dtype=float16 needs a CUDA GPU and none is visible; use model.dtype=bfloat16"),
    ({"dtype": "bfloat16"}, CPU, "runs many times slower than float32; use model.dtype=float32 or auto-check"),
    ({"quantize": "int8-per-channel"}, GPU, "is dynamic CPU quantization; on a GPU use model.dtype=float16"),
    ({"runtime": "onnxruntime"}, GPU, "runs on CPU and this job has a cuda device; use model.runtime=eager"),
    ({"runtime": "onnxruntime"}, Platform(ort_version=""), "needs ONNX Runtime and onnx, which are not installed"),
    ({"runtime": "onnxruntime", "quantize": "int8-blockwise"}, Platform(ort_version="1.21.1"),
     "needs onnxruntime >= 1.22 (its 8-bit MatMulNBits); this one is 1.21.1"),
    ({"dtype": "auto-check"}, UDF, "a UDF has no input up front; set model.dtype=float32"),
])
def test_what_cannot_run_here_is_one_line_naming_what_would(options, platform, fragment):
    spec = resolve(model(**options), platform)
    why = unavailable(spec, platform)
    assert fragment in why and "\n" not in why, why
    with pytest.raises(ConfigError) as refused:  # what every preflight calls
        checked_spec(model(**options), platform)
    assert str(refused.value) == why


@pytest.mark.parametrize("options, platform", [
    ({}, CPU), ({}, GPU), ({"dtype": "bfloat16"}, CPU_BF16), ({"dtype": "bfloat16", "allow_slow_bf16": True}, CPU),
    ({"dtype": "bfloat16"}, Platform(device="cuda", gpu_bf16=True)), ({"quantize": "int8-per-channel"}, CPU),
    ({"runtime": "onnxruntime", "quantize": "int8-blockwise"}, CPU), ({"dtype": "auto-check"}, CPU),
])
def test_what_can_run_here_passes(options, platform):
    assert unavailable(resolve(model(**options), platform), platform) == ""


def test_every_precision_auto_check_names_reads_back_from_its_token():
    cfg = load_config({"model": {"path": "/m", "dtype": "auto-check"}, "data": {"path": "/d"},
                       "output": {"path": "/o"}})
    for name in [*PRECISIONS, *RESCORED.values()]:
        rescore = 0.125 if name in RESCORED.values() else 0.0
        spec = spec_of(cfg, CPU, name, rescore)
        assert spec.name == name and isinstance(spec, EngineSpec)
        assert parse_precision(spec.token, cfg, CPU) == spec
