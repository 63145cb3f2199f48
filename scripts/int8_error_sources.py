"""Where a classifier's int8 labels are lost: weights or activations, per tensor or per token.

    .venv/bin/python scripts/int8_error_sources.py --model /work/docs12/model --corpus /work/docs12/data/test

Scores --rows rows of the corpus (column `text`) in float32, then with each Linear layer of the encoder rounded
as int8 would round it, in float arithmetic (the head stays float32, as hvd_infer's per-channel int8 keeps it):

    weights            int8 per output channel, activations float32
    act-tensor-7bit    activations 7-bit per tensor, as torch's dynamic int8 rounds them (reduce_range)
    act-tensor-8bit    activations 8-bit per tensor
    act-token-8bit     activations 8-bit per token (row of the batch)
    weights+token      int8 weights per channel and 8-bit activations per token

and prints the share of float32's labels each keeps, with torch's own per-channel dynamic int8 for comparison.
A measurement for docs/speed.md's int8 figures; nothing here is used by hvd_infer.
"""
import argparse
import copy
import os
import sys
import warnings

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hvd_infer.engines.verify import head_modules  # noqa: E402
from hvd_infer.engines.torch_eager import quantize_int8  # noqa: E402


def _round(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, levels: int) -> torch.Tensor:
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = ((hi - lo) / levels).clamp(min=1e-12)
    zero = (-lo / scale).round()
    return ((x / scale).round() + zero).clamp(0, levels).sub(zero) * scale


class RoundedLinear(torch.nn.Module):
    def __init__(self, linear: torch.nn.Linear, weights: bool, activations: str):
        super().__init__()
        self.linear, self.activations = linear, activations
        if weights:
            w = linear.weight.data
            scale = w.abs().amax(1, keepdim=True).clamp(min=1e-12) / 127
            linear.weight.data = (w / scale).round().clamp(-127, 127) * scale

    def forward(self, x):
        if self.activations == "tensor7":
            x = _round(x, x.min(), x.max(), 127)
        elif self.activations == "tensor8":
            x = _round(x, x.min(), x.max(), 255)
        elif self.activations == "token8":
            x = _round(x, x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), 255)
        return self.linear(x)


def rounded(model, weights: bool, activations: str):
    model = copy.deepcopy(model)
    heads = head_modules(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and not any(name == h or name.startswith(h + ".") for h in heads):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, RoundedLinear(module, weights, activations))
    return model


def main(argv=None) -> int:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=os.path.join(repo, "demo", "model"))
    p.add_argument("--corpus", required=True, help="a Parquet dataset with a text column")
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--skip", type=int, default=1000, help="rows of the corpus to pass over first")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=256)
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    texts = pq.read_table(args.corpus, columns=["text"]).column("text").to_pylist()[args.skip:args.skip + args.rows]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model).eval()
    order = np.argsort([len(t) for t in texts])
    batches = [(idx, tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=args.max_length,
                               return_tensors="pt")) for idx in np.array_split(order, -(-len(texts) // args.batch_size))]

    def labels(m) -> np.ndarray:
        out = np.zeros(len(texts), dtype=np.int64)
        with torch.inference_mode():
            for idx, batch in batches:
                out[idx] = m(**batch).logits.argmax(-1).numpy()
        return out

    reference = labels(model)
    print(f"{len(texts)} rows of {args.corpus}, {args.model}: share of float32's labels kept")
    variants = {"torch int8-per-channel": quantize_int8(copy.deepcopy(model)),
                "weights": rounded(model, True, ""), "act-tensor-7bit": rounded(model, False, "tensor7"),
                "act-tensor-8bit": rounded(model, False, "tensor8"), "act-token-8bit": rounded(model, False, "token8"),
                "weights+token": rounded(model, True, "token8")}
    for name, variant in variants.items():
        print(f"  {name:24s} {(labels(variant) == reference).mean():.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
