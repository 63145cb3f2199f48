"""text-generation: a causal LM continues each row's text; `generated_text` is the continuation only.

Prompts are left-padded (a decoder generates from the last position) and, when too long, cut from the left
to model.max_length (and the context less max_new_tokens), keeping the end the continuation follows; such
rows count as truncated. Sampling seeds each batch's random stream from generation.seed and its token ids:
the same batch gives the same text on any rank and rerun, but a row's sample may change in another batch.
"""
from __future__ import annotations

import hashlib

import pyarrow as pa
import torch

from hvd_infer.errors import ModelError
from hvd_infer.tasks.base import Encoded, Task, TokenRows, count_truncated


class TextGeneration(Task):
    name = "text-generation"
    auto_model = "AutoModelForCausalLM"
    padding_side = "left"
    single_text = "the prompt is data.text_column alone"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.options = cfg.generation

    def check_model_config(self, hf_config, path):
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        archs = getattr(hf_config, "architectures", None) or []
        causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
        if (hf_config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
                or getattr(hf_config, "is_encoder_decoder", False)
                or (archs and not any(a in causal or a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs))):
            raise ModelError(f"model.path {path} is not a causal language model (model type "
                             f"'{hf_config.model_type}', architectures: {archs or 'none'}); model.task=text-generation "
                             "needs a decoder-only model saved from AutoModelForCausalLM (GPT-2, Llama, Mistral, Qwen, ...)")
        context = getattr(hf_config, "max_position_embeddings", None)
        if context and self.options.max_new_tokens >= context:
            raise ModelError(f"generation.max_new_tokens={self.options.max_new_tokens} leaves no room for a prompt "
                             f"in the context of model.path {path}, {context} tokens")

    def repeats_differ(self):
        if self.options.do_sample:
            return "generation.do_sample=true draws a sample for every row, repeated prompts included"
        return None

    def setup(self, model, tokenizer):
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ModelError("the tokenizer has neither a pad nor an eos token; model.task=text-generation "
                                 "needs one of them to pad a batch of prompts")
            tokenizer.pad_token = tokenizer.eos_token
        super().setup(model, tokenizer)
        tokenizer.truncation_side = "left"
        context = getattr(model.config, "max_position_embeddings", None)
        if context:  # the prompt and what is generated share the model's context
            self.max_length = min(self.max_length, context - self.options.max_new_tokens)

    def output_fields(self):
        return [pa.field("generated_text", pa.string())]

    def encode(self, texts, pairs=None):
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_length,
                             return_attention_mask=False, return_token_type_ids=False)
        ids = enc["input_ids"]
        if not all(ids):  # an empty prompt (data.on_null=empty) starts from bos, as unconditional generation does
            start = [self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.pad_id]
            ids = [x or start for x in ids]
        features = TokenRows.from_lists(ids)
        return Encoded(features, features.lengths, count_truncated(enc.encodings))

    def collate(self, features):
        return self.pad_batch(features, side="left")

    def predict(self, model, batch):
        g = self.options
        kwargs = dict(batch, max_new_tokens=g.max_new_tokens, do_sample=g.do_sample, pad_token_id=self.pad_id)
        if g.do_sample:
            kwargs.update(temperature=g.temperature, top_p=g.top_p)
            device = torch.device(model.device)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(self._batch_seed(batch["input_ids"]))
                out = model.generate(**kwargs)
        else:
            out = model.generate(**kwargs)
        new_tokens = out[:, batch["input_ids"].shape[1]:].cpu()
        return {"generated_text": pa.array(self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True),
                                           type=pa.string())}

    def _batch_seed(self, input_ids: torch.Tensor) -> int:
        digest = hashlib.blake2b(input_ids.cpu().numpy().tobytes(), digest_size=8,
                                 key=str(self.options.seed).encode()).digest()
        return int.from_bytes(digest, "little") & ((1 << 63) - 1)
