"""Every speed option runs the whole job (hvd_infer.run, a world of one) and agrees with float32.

The float32 job is the reference; each option is one more job over the same 157 rows, compared
row by row (joined on id). The tiny classifier reacts to its input (builders.tiny_bert checks it),
so agreement here is not the agreement of a constant model.
"""
import os

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch

import hvd_infer
from hvd_infer.engines import onednn
from hvd_infer.config import parse_override
from hvd_infer.hardware import cpu_cores
from builders import plain_probs

# name: (overrides, what the run's summary header says, tolerance on each probability, on their mean,
# least label agreement with float32).
# Options that change only how rows are grouped or threaded do the same math in another summation
# order or padding width (masked out): float32 noise through 2 layers stays far below 1e-5.
# The lossy ones, measured once on tiny_classifier over the 157 rows (max |dp|, mean |dp|, labels kept), with
# bounds about 1.2-2x those figures, so a broken option fails them:
#   bfloat16 (8 bits of mantissa):            0.40, 0.011, 98.7%  -> 0.5, 0.02, 97%
#   dynamic int8 per channel, head in float32 (each Linear's input scaled per tensor, a random model's wide
#   activations its worst case):              0.39, 0.047, 91.1%  -> 0.6, 0.08, 85%
CASES = {
    "deepspeed-off": (["model.deepspeed=false"], "(float32)", 1e-6, 1e-6, 1.0),
    "threads-1": (["runtime.threads=1"], "(float32, DeepSpeed)", 1e-5, 1e-5, 1.0),
    "token-budget": (["data.max_tokens_per_batch=600", "data.batch_size=64"], "(float32, DeepSpeed)", 1e-5, 1e-5, 1.0),
    # The same math on every CPU: without AVX512-BF16/AMX bfloat16 is refused unless allowed (slow, but
    # the tiny model over 157 rows takes seconds); "bfloat16-native" is the job as a bf16 CPU runs it.
    "bfloat16": (["model.dtype=bfloat16", "model.allow_slow_bf16=true"], "(bfloat16, DeepSpeed)", 0.5, 0.02, 0.97),
    "bfloat16-native": (["model.dtype=bfloat16"], "(bfloat16, DeepSpeed)", 0.5, 0.02, 0.97),
    "int8-per-channel": (["model.quantize=int8-per-channel"], "(float32, int8-per-channel)", 0.6, 0.08, 0.85),
    # The reference runs its last layer on the first position alone (model.trim_last_layer, the default).
    "whole-last-layer": (["model.trim_last_layer=false"], "(float32, DeepSpeed)", 1e-5, 1e-6, 1.0),
    # The reference runs the Linear layers the product picks on this CPU (oneDNN's with AVX512, else torch's);
    # these two take each path whatever the CPU.
    "torch-linear": (["model.onednn=false"], "(float32, DeepSpeed)", 1e-5, 1e-6, 1.0),
    "onednn-linear": ([f"{onednn.AVX512_ENV}=1", "ONEDNN_MAX_CPU_ISA="], "(float32, DeepSpeed)", 1e-5, 1e-6, 1.0),
}
# The cases whose Linear layers run on oneDNN (float32, eager, not quantized) where this CPU picks it.
ONEDNN = {"deepspeed-off", "threads-1", "token-budget", "whole-last-layer"} if not onednn.available() else set()
ONEDNN.add("onednn-linear")


def score(model, data, out, *extra):
    """The job over data in process; an extra NAME=VALUE without a dot is an environment variable for it."""
    threads, env = torch.get_num_threads(), dict(e.split("=", 1) for e in extra if "." not in e.split("=")[0])
    extra = [e for e in extra if e.split("=")[0] not in env]
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        hvd_infer.run({"model": {"path": model}, "data": {"path": data, "id_columns": ["id"], "batch_size": 8},
                       "output": {"path": str(out), "rows_per_part": 60}, "mlflow": {"enabled": False},
                       "runtime": {"progress": False}},
                      **dict(parse_override(e) for e in extra))
    finally:
        torch.set_num_threads(threads)  # runtime.threads sets it for the whole process
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return pads.dataset(str(out)).to_table().to_pandas().sort_values("id").reset_index(drop=True)


@pytest.fixture(scope="module")
def float32(tiny_classifier, dataset, tmp_path_factory):
    """The float32 job, itself checked row by row against a plain transformers forward."""
    got = score(tiny_classifier, dataset[0], tmp_path_factory.mktemp("float32") / "out", "model.dtype=float32")
    table = dataset[1]
    rows = [table.column("id").to_pylist().index(i) for i in got["id"]]
    plain = plain_probs(tiny_classifier, table.column("text").to_pylist())[rows]
    np.testing.assert_allclose(np.stack(got["probs"]), plain, atol=1e-5)
    return got


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.native_bf16) if n.endswith("-native") else n
                                  for n in CASES])
def test_speed_option_agrees_with_float32(name, float32, tiny_classifier, dataset, tmp_path, capsys):
    overrides, header, atol, mean_tol, min_agreement = CASES[name]
    capsys.readouterr()
    got = score(tiny_classifier, dataset[0], tmp_path / "out", *overrides)
    printed = capsys.readouterr().out
    assert header in printed, printed  # the option was applied, not ignored
    assert ("last layer: the first position only" in printed) == (name != "whole-last-layer"), printed
    assert ("linear layers: oneDNN: " in printed) == (name in ONEDNN), printed
    rank_0 = next(l.split() for l in printed.splitlines() if l.startswith("    0 "))  # rank host device threads ...
    assert rank_0[3] == ("1" if name == "threads-1" else str(cpu_cores()))
    assert got["id"].tolist() == float32["id"].tolist() == sorted(dataset[1].column("id").to_pylist())
    diff = np.abs(np.stack(got["probs"]) - np.stack(float32["probs"]))
    assert diff.max() <= atol and diff.mean() <= mean_tol, (diff.max(), diff.mean())
    agreement = np.mean(got["label"].to_numpy() == float32["label"].to_numpy())
    assert agreement >= min_agreement, agreement
    assert len(set(float32["label"])) >= 2  # the reference is not one label for every row


def _logits(cfg_model, texts):
    from hvd_infer.config import load_config
    from hvd_infer.model import load_model
    from hvd_infer.tasks import get_task

    cfg = load_config({"model": cfg_model, "data": {"path": "/d"}, "output": {"path": "/o"}})
    task = get_task(cfg.model.task)(cfg)
    model, _, facts = load_model(cfg, task, torch.device("cpu"))
    with torch.inference_mode():
        return model(**task.collate(task.encode(texts).features)).logits.numpy(), facts, model.module


def test_last_layer_is_trimmed_only_where_the_head_reads_the_first_position_alone(tiny_classifier, monkeypatch):
    """model.trim_last_layer: a [CLS]-pooled classifier's last layer computes the first position alone, with the
    whole layer's logits on padded rows of many lengths; a head that pools every position (here BERT's pooler
    made a mean, as some custom heads are) fails the load's probe and keeps its whole layer."""
    import builders

    texts = builders.texts(24, seed=3, long_every=5)
    whole, facts, _ = _logits({"path": tiny_classifier, "trim_last_layer": False}, texts)
    assert facts["last_layer"] == "whole: model.trim_last_layer=false"
    trimmed, facts, module = _logits({"path": tiny_classifier}, texts)
    assert facts["last_layer"] == "first position" and "forward" in vars(module.bert.encoder.layer[-1])
    np.testing.assert_allclose(trimmed, whole, rtol=1e-5, atol=1e-5)  # float32 rounding of logits up to ~6
    assert len(set(whole.argmax(1))) >= 2  # the rows differ, so equal rows prove something
    with torch.inference_mode():  # the trimmed layer's output really is one position
        batch = {"input_ids": torch.tensor([[101, 2023, 2003, 102]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
        assert module.bert(**batch).last_hidden_state.shape[1] == 1

    from transformers.models.bert import modeling_bert

    monkeypatch.setattr(modeling_bert.BertPooler, "forward",
                        lambda self, hidden: self.activation(self.dense(hidden.mean(dim=1))))
    mean_whole, _, _ = _logits({"path": tiny_classifier, "trim_last_layer": False}, texts)
    mean_got, facts, module = _logits({"path": tiny_classifier}, texts)
    assert facts["last_layer"].startswith("whole: BertForSequenceClassification's last layer on the first position alone changed the outputs by")
    assert "forward" not in vars(module.bert.encoder.layer[-1])
    np.testing.assert_allclose(mean_got, mean_whole, atol=1e-6)
    assert np.abs(mean_whole - whole).max() > 1e-2  # the mean-pooled head really reads the other positions


def test_linear_layers_run_on_onednn_with_torchs_logits(tiny_classifier, monkeypatch):
    """model.onednn: every float32 Linear runs oneDNN's kernel, with GELU and the residual add fused where the
    module is BERT's; the logits are torch's own Linear's within float32 rounding. Not on a CPU without AVX512. A module whose forward is
    not what its shape suggests (here an output that subtracts its residual) fails the load's probe, and the
    model is left exactly as it was."""
    import builders
    from hvd_infer.engines.verify import probe_batch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    monkeypatch.setenv(onednn.AVX512_ENV, "1")  # this path on every CPU (the job's choice: CASES)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    texts = builders.texts(24, seed=5, long_every=4)
    plain, facts, module = _logits({"path": tiny_classifier, "onednn": False}, texts)
    assert facts["linear_kernels"] == "torch: model.onednn=false"
    assert not any(hasattr(m, "_onednn_weight") for m in module.modules())
    fused, facts, module = _logits({"path": tiny_classifier}, texts)
    linears = sum(isinstance(m, torch.nn.Linear) for m in module.modules())
    layers = module.config.num_hidden_layers
    assert facts["linear_kernels"] == (f"oneDNN: {linears} Linear layers, GELU or the residual add fused into "
                                       f"{3 * layers}")
    np.testing.assert_allclose(fused, plain, rtol=1e-5, atol=1e-5)
    assert len(set(plain.argmax(1))) >= 2

    # Where oneDNN's kernels are the slower (AVX2: no AVX512, or oneDNN limited to AVX2), torch's Linear stays.
    monkeypatch.setenv("HVD_INFER_CPU_AVX512", "0")
    assert _logits({"path": tiny_classifier}, texts[:2])[1]["linear_kernels"] == (
        "torch: oneDNN's kernels run slower than torch's Linear on a CPU without AVX512, as this one "
        "(HVD_INFER_CPU_AVX512=1 uses them anyway)")
    monkeypatch.setenv("HVD_INFER_CPU_AVX512", "1")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert _logits({"path": tiny_classifier}, texts[:2])[1]["linear_kernels"].startswith(
        "torch: oneDNN is limited to AVX2 (ONEDNN_MAX_CPU_ISA)")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")

    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_classifier)
    output = model.bert.encoder.layer[0].output

    def forward(hidden_states, input_tensor):  # BERT's shape and names, another computation
        return output.LayerNorm(output.dense(hidden_states) - input_tensor)

    output.forward = forward
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        before = model(**batch).logits
    why_not = onednn.use_onednn(model, probe_batch(model, tokenizer))
    assert why_not.startswith("oneDNN changed the outputs by "), why_not
    assert output.forward is forward and not any(hasattr(m, "_onednn_weight") for m in model.modules())
    assert not any("forward" in vars(m) for m in model.modules() if m is not output)
    with torch.inference_mode():
        torch.testing.assert_close(model(**batch).logits, before, rtol=0, atol=0)


def test_last_layer_whole_for_tasks_that_read_every_position(tiny_encoder):
    from hvd_infer.config import load_config
    from hvd_infer.model import load_model
    from hvd_infer.tasks import get_task

    cfg = load_config({"model": {"path": tiny_encoder, "task": "embedding"}, "data": {"path": "/d"},
                       "output": {"path": "/o"}})
    _, _, facts = load_model(cfg, get_task("embedding")(cfg), torch.device("cpu"))
    assert facts["last_layer"] == "whole"
