"""model.runtime=onnxruntime: the loaded float32 model exported to ONNX, fused by ONNX Runtime's transformer
optimizer, and run by an InferenceSession with the rank's torch threads (CPU; with model.quantize, ONNX Runtime's
own int8 of that graph, the task head and pooler left in float32).

    predictor = OnnxPredictor.create(model, tokenizer, model_dir, task_name, quantize, facts=...)

A graph is exported once per host into $TMPDIR/hvd_infer-onnx, keyed by the model directory's content, the task,
the quantization and the library versions; a file lock lets one rank export while the others wait for its file.
The fused graph is kept where its outputs on a probe batch are torch's (verify.keep_if_equal), else the plain
export, else the job stops; a quantized graph is made from that checked one.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
import shutil
import tempfile
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from hvd_infer.engines.verify import TOLERANCE, head_modules, keep_if_equal, probe_batch
from hvd_infer.errors import ModelError
from hvd_infer.hardware import vnni

log = logging.getLogger("hvd_infer")

# Bump when the export recipe changes: graphs cached by an older recipe are then not reused.
RECIPE = 1
# Model types whose graphs ONNX Runtime's optimizer fuses as BERT's (attention, layer norm, GELU).
BERT_LIKE = {"bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra", "mpnet", "deberta"}


# int8-blockwise: the weights' block along their input dimension, and ONNX Runtime's accuracy level 4 (activations
# quantized to int8 per row and block at run time, multiplied as int8; lower levels multiply in float32).
BLOCK_SIZE = 128
ACCURACY_LEVEL = 4


class OnnxPredictor:
    """A Predictor (spec.Predictor) over an ONNX Runtime session."""

    def __init__(self, session, module, output: str, facts: Dict[str, Any]):
        self.session, self.model, self.output, self.facts = session, module, output, facts
        self.config = module.config
        self.inputs = [i.name for i in session.get_inputs()]

    @property
    def module(self):
        return self.model

    @classmethod
    def create(cls, model, tokenizer, model_dir: str, task_name: str, quantize: str = "none",
               trimmed: bool = False, facts: Optional[Dict[str, Any]] = None) -> "OnnxPredictor":
        """trimmed: the model's last layer computes the first position only (model.trim_last_layer), and so will
        the graph exported from it; facts: the loaded model's, to which the graph's are added."""
        import onnxruntime as ort

        graph, how = cached_graph(model, tokenizer, model_dir, task_name, quantize, trimmed)
        session = inference_session(graph)
        facts = {**(facts or {}), "onnx_graph": graph, "onnx_optimizer": how, "onnxruntime": ort.__version__,
                 "onnx_threads": session.get_session_options().intra_op_num_threads}
        return cls(session, model, session.get_outputs()[0].name, facts)

    def __call__(self, **batch):
        ids = batch["input_ids"]
        feeds = {name: (batch[name] if name in batch else torch.zeros_like(ids)).numpy().astype(np.int64, copy=False)
                 for name in self.inputs}  # no token types given: all zeros, as the torch model assumes
        return SimpleNamespace(**{self.output: torch.from_numpy(self.session.run([self.output], feeds)[0])})


def inference_session(graph: str):
    """An ONNX Runtime CPU session with the rank's torch threads (its share of the host's cores)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    # Its pool threads sleep between runs rather than spin, leaving the cores to what runs next (docs/speed.md).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def cached_graph(model, tokenizer, model_dir: str, task_name: str, quantize: str = "none", trimmed: bool = False):
    """(path of the host's ONNX graph for this model, task and quantization, how it was optimized); exported if
    missing. A quantized graph is made from the cached float32 one, so auto-check's int8 candidates share one
    export."""
    import fcntl

    seven_bit = quantize == "int8-per-channel" and not vnni()
    key = cache_key(model_dir, task_name, quantize, seven_bit, trimmed)
    root = cache_root()
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, key)
    with open(final + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one rank exports; the others wait and reuse its file
        if not os.path.isdir(final):
            tmp = tempfile.mkdtemp(prefix=key + ".", dir=root)
            try:
                if quantize == "none":
                    how = export(model, tokenizer, tmp)
                else:  # its own lock, taken inside this one (never the other way round)
                    source, how = cached_graph(model, tokenizer, model_dir, task_name, "none", trimmed)
                    for name in os.listdir(os.path.dirname(source)):  # the graph and any external data beside it
                        if name != "recipe.json":
                            shutil.copy(os.path.join(os.path.dirname(source), name), tmp)
                    how += "; " + quantize_graph(os.path.join(tmp, "model.onnx"), quantize, model, seven_bit)
                with open(os.path.join(tmp, "recipe.json"), "w") as f:
                    json.dump({"model_dir": os.path.abspath(model_dir), "task": task_name, "quantize": quantize,
                               "optimizer": how, "versions": _versions()}, f)
                os.rename(tmp, final)  # atomic: a graph is in the cache whole or not at all
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    with open(os.path.join(final, "recipe.json")) as f:
        return os.path.join(final, "model.onnx"), json.load(f)["optimizer"]


def cache_root() -> str:
    """The host's cache of what is made once per host and model: $TMPDIR/hvd_infer-onnx (ONNX graphs, and
    auto-check's decisions under decisions/)."""
    return os.path.join(tempfile.gettempdir(), "hvd_infer-onnx")


def cache_key(model_dir: str, task_name: str, quantize: str = "none", seven_bit: bool = False,
              trimmed: bool = False) -> str:
    """The model directory's content, the task, the quantization, the recipe and the versions that shape the graph."""
    h = hashlib.sha256(json.dumps({"task": task_name, "quantize": quantize, "recipe": RECIPE,
                                   "versions": _versions(),
                                   **({"seven_bit": True} if seven_bit else {}),
                                   **({"trimmed": True} if trimmed else {})}).encode())
    h.update(model_digest(model_dir).encode())
    return h.hexdigest()[:24]


def model_digest(model_dir: str) -> str:
    """The model directory's content: a hash of every file's path and bytes, read once per process while no file
    changes (its size and modification time)."""
    files = []
    for folder, _, names in sorted(os.walk(model_dir)):
        for name in sorted(names):
            path = os.path.join(folder, name)
            stat = os.stat(path)
            files.append((os.path.relpath(path, model_dir), stat.st_size, stat.st_mtime_ns))
    return _digest(os.path.abspath(model_dir), tuple(files))


@functools.lru_cache(maxsize=16)
def _digest(model_dir: str, files) -> str:
    h = hashlib.sha256()
    for relative, _, _ in files:
        h.update(relative.encode() + b"\0")
        with open(os.path.join(model_dir, relative), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _versions() -> Dict[str, str]:
    import onnx
    import onnxruntime
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


class _FirstOutput(torch.nn.Module):
    """The model with named tensor inputs in a fixed order, returning only its first output (what tasks read)."""

    def __init__(self, model, names: List[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *tensors):
        return self.model(**dict(zip(self.names, tensors)))[0]


def export(model, tokenizer, folder: str) -> str:
    """Write folder/model.onnx, fused where that keeps torch's outputs; returns how it was optimized."""
    path = os.path.join(folder, "model.onnx")
    plain = os.path.join(folder, "plain.onnx")
    # Rows of different lengths, so the graph is traced with padding and a real attention mask.
    probe = probe_batch(model, tokenizer)
    names, args = list(probe), tuple(probe.values())
    with torch.inference_mode():
        reference = model(**dict(zip(names, args)))
    output = next(iter(reference.keys()))
    expected = reference[output].float().numpy()
    attention = _eager_attention(model)
    try:
        _torch_export(_FirstOutput(model, names), args, plain, names, output, expected.ndim)
    finally:
        attention()
    graphs = ([(path, _optimize(plain, path, model.config))] if getattr(model.config, "model_type", "") in BERT_LIKE
              else [])
    feeds = {n: a.numpy() for n, a in zip(names, args)}
    why = ""
    for graph, how in graphs + [(plain, "none")]:
        why = keep_if_equal(f"the exported {type(model).__name__}'s {output}", expected, lambda: _run(graph, feeds))
        if not why:
            if graph != path:
                os.replace(graph, path)
            else:
                os.remove(plain)  # the cache keeps one graph per key
            if how == "none" and graphs:
                log.warning("model.runtime=onnxruntime: the fused graph differs from torch by more than %g; "
                            "running the plain export", TOLERANCE)
            return how
    raise ModelError(f"model.runtime=onnxruntime: {why}; use model.runtime=eager")


def _eager_attention(model):
    """Switch the model to transformers' eager attention (whose graph ONNX Runtime fuses into its Attention
    op; SDPA's is left unfused) and return what switches it back. set_attn_implementation since
    transformers 4.48; before, the config's _attn_implementation is what the layers read."""
    before = getattr(model.config, "_attn_implementation", None)
    setter = getattr(model, "set_attn_implementation", None)
    if before in (None, "eager"):
        return lambda: None
    try:
        setter("eager") if setter else setattr(model.config, "_attn_implementation", "eager")
    except Exception:  # a model without eager attention: export what it has
        return lambda: None
    return lambda: setter(before) if setter else setattr(model.config, "_attn_implementation", before)


def _torch_export(module, args, path: str, names: List[str], output: str, output_dims: int) -> None:
    """torch.onnx.export with dynamic batch and sequence axes. The TorchScript exporter (dynamo=False where
    torch has the choice, its default before 2.9) gives a graph ONNX Runtime's optimizer fuses into
    Attention/EmbedLayerNormalization; the dynamo exporter's graph (torch 2.13, onnxscript 0.7) is left
    with unfused attention."""
    import warnings

    options = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes[output] = {0: "batch", 1: "sequence"} if output_dims >= 3 else {0: "batch"}  # per token, or per row
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's and the deprecation's warnings, on every export
        torch.onnx.export(module, args, path, input_names=names, output_names=[output], dynamic_axes=axes,
                          opset_version=17, do_constant_folding=True, **options)


def _optimize(source: str, target: str, config) -> str:
    """ONNX Runtime's transformer optimizer, BERT fusions; returns the fused operators it made."""
    from onnxruntime.transformers import optimizer

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    fused = optimizer.optimize_model(source, model_type="bert", num_heads=getattr(config, "num_attention_heads", 0),
                                     hidden_size=getattr(config, "hidden_size", 0), opt_level=0)
    fused.save_model_to_file(target)
    counts = {k: v for k, v in (fused.get_fused_operator_statistics() or {}).items() if v}
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "no fusions"


def quantize_graph(path: str, quantize: str, model, seven_bit: bool = False) -> str:
    """ONNX Runtime's int8 of the graph at path (quantize: int8-per-channel or int8-blockwise), in place, the task
    head and pooler left float32; what it did.

    seven_bit: weights in [-64, 63] (the quantizer's reduce_range), for a CPU without VNNI. There ONNX Runtime
    multiplies its uint8 activations by int8 weights with AVX2's VPMADDUBSW, which adds pairs of products in 16
    bits and saturates: full-range weights can clip a sum, 7-bit ones cannot (ONNX Runtime's quantization
    guide). torch's dynamic int8 does the same on every CPU (its activations are 7-bit)."""
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    kept, head = [], []
    modules = head_modules(model)
    if modules:  # node names follow module paths: /model/<module>/... (the _FirstOutput wrapper is "model")
        import onnx

        prefixes = tuple("/model/" + name.replace(".", "/") + "/" for name in modules)
        head = [n for n in onnx.load(path, load_external_data=False).graph.node if n.name.startswith(prefixes)]
        # quantize_dynamic splits each Gemm into <name>_MatMul and <name>_Add before it reads nodes_to_exclude
        # (onnxruntime 1.32): the names it then sees are kept too.
        kept = [name for n in head for name in ([n.name, n.name + "_MatMul"] if n.op_type == "Gemm" else [n.name])]
    if quantize == "int8-blockwise":
        return _quantize_blockwise(path, kept, len(head))
    target = path + ".int8"
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer's advice to pre-process, logged on the root logger on every export
    try:
        # The fused operators (Attention, SkipLayerNormalization) are outside shape inference's domain: their
        # outputs are float32, which the quantizer is told.
        quantize_dynamic(path, target, weight_type=QuantType.QInt8, per_channel=True, nodes_to_exclude=kept,
                         reduce_range=seven_bit, extra_options={"DefaultTensorType": TensorProto.FLOAT})
    finally:
        root.setLevel(level)
    os.replace(target, path)
    done = quantize + (", 7-bit weights (no VNNI)" if seven_bit else "")
    return f"{done} ({len(head)} nodes in float32)" if head else done


def _quantize_blockwise(path: str, kept: Sequence[str], kept_nodes: int) -> str:
    """int8-blockwise: ONNX Runtime's MatMulNBits of the graph at path, in place (8-bit symmetric weights in blocks
    of BLOCK_SIZE inputs, ACCURACY_LEVEL 4), kept's nodes left float32; what it did. Only MatMul nodes are
    quantized: the fused Attention stays float32 (unfusing it to quantize it was slower: docs/speed.md)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    quiet = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # a line per node at INFO
    try:
        config = DefaultWeightOnlyQuantConfig(block_size=BLOCK_SIZE, is_symmetric=True,
                                              accuracy_level=ACCURACY_LEVEL, bits=8)
        quantizer = MatMulNBitsQuantizer(onnx.load(path), bits=8, block_size=BLOCK_SIZE, is_symmetric=True,
                                         accuracy_level=ACCURACY_LEVEL, nodes_to_exclude=list(kept),
                                         algo_config=config)
        quantizer.process()
        quantizer.model.save_model_to_file(path + ".int8", False)
    finally:
        quiet.setLevel(level)
    os.replace(path + ".int8", path)
    done = f"int8-blockwise (MatMulNBits, 8 bits, blocks of {BLOCK_SIZE}, accuracy level {ACCURACY_LEVEL})"
    return f"{done} ({kept_nodes} nodes in float32)" if kept_nodes else done


def _run(graph: str, feeds: Dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    taken = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in taken})[0]
