"""Zero-shot, generation, NER and text pairs, each against its plain transformers reference.

In process (a task's encode -> collate -> predict on one batch) for the semantics, then the whole job
through the CLI in a world of one (in process: conftest.cli), and across 2 real ranks (slow). Models are
tiny and random, built offline with MiniLM's real WordPiece tokenizer.
"""
import os
import random

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModelForTokenClassification,
                          AutoTokenizer, BertConfig, BertForSequenceClassification, BertForTokenClassification,
                          GPT2Config, GPT2LMHeadModel, pipeline)

import builders
import conftest
from conftest import horovodrun
from hvd_infer.config import load_config
from hvd_infer.errors import ConfigError
from hvd_infer.evaluation import Evaluation
from hvd_infer.model import load_model
from hvd_infer.tasks import get_task
from hvd_infer.errors import ModelError

LABELS = ["pos", "neg", "neutral"]  # zero-shot candidates; also the gold labels builders.write_dataset uses
NER_WORDS = ("Horovod Petastorm Zürich McAllister Ouagadougou Kathmandu Schwarzenegger O'Neill's e-mail "
             "met in Paris with Angela Merkel and the team from São Paulo visited Reykjavík on Monday").split()


# -- tiny models -----------------------------------------------------------------------------------
def _bert_config(labels):
    return BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=512, num_labels=len(labels),
                      initializer_range=0.3,  # BERT's 0.02 gives random models whose output hardly depends on the text
                      id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})


def _assert_reacts(name, model, batch):
    """A model under test must give different answers to different texts, or equality checks prove little."""
    probs = torch.softmax(model(**batch).logits, -1)
    if probs.dim() == 3:  # token classification: every real token is a row
        probs = probs[batch["attention_mask"].bool()]
    probs = probs.numpy()
    spread = float(np.ptp(probs, axis=0).max())
    assert spread > 1e-2 and len(set(probs.argmax(-1))) >= 2, f"{name} does not react to its input: spread {spread}"


def _save(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("task-models")
    tok = AutoTokenizer.from_pretrained(builders.minilm_dir())
    torch.manual_seed(0)
    nli = BertForSequenceClassification(_bert_config(["contradiction", "neutral", "entailment"]))
    ner = BertForTokenClassification(_bert_config(["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]))
    with torch.no_grad():  # B-PER and B-LOC frequent, so entities are found and grouped
        ner.classifier.bias.copy_(torch.tensor([0.3, 0.6, 0.0, 0.4, 0.0]))
    # A causal LM whose tokenizer has no pad token (as GPT-2's): the task must pad with eos.
    lm_tok = AutoTokenizer.from_pretrained(builders.minilm_dir())
    lm_tok.pad_token = None
    lm_tok.eos_token = "[SEP]"
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=30522, n_positions=128, n_embd=32, n_layer=2, n_head=2,
                                    initializer_range=0.2,  # 0.02 repeats one token whatever the prompt
                                    bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id))
    probe = tok(builders.texts(12, seed=99, long_every=5), padding=True, return_tensors="pt")
    with torch.no_grad():
        for name, model in (("nli", nli), ("ner", ner)):  # builders.tiny_bert checks the classifier itself
            _assert_reacts(name, model.eval(), probe)
        # Greedy continuations of different prompts differ (0.02 repeats one token whatever the prompt).
        firsts = {int(lm.eval()(**tok(p, return_tensors="pt")).logits[0, -1].argmax()) for p in PROMPTS}
        assert len(firsts) >= 2, f"the tiny LM predicts one token for every prompt: {firsts}"
    return {"nli": _save(nli, tok, root / "nli"), "ner": _save(ner, tok, root / "ner"),
            "lm": _save(lm, lm_tok, root / "lm"), "cls": builders.tiny_bert(str(root / "cls"))}


# -- helpers ---------------------------------------------------------------------------------------
def job(model_path, task, **sections):
    return load_config({"model": {"path": model_path, "task": task, **sections.pop("model", {})},
                        "data": {"path": "/d"}, "output": {"path": "/o"}, **sections})


def predict_one_batch(cfg, texts):
    """The task on one batch of all texts, as the runner drives it."""
    task = get_task(cfg.model.task)(cfg)
    model, _, _ = load_model(cfg, task, torch.device("cpu"))
    enc = task.encode(texts)
    batch = task.collate(enc.features)
    return task, enc, batch, task.predict(model, batch)


def cli(tmp, model, task, data, *extra, ranks=1):
    """The job through `python -m hvd_infer` in this process (or horovodrun); its output rows sorted by id.

    MLflow is off: it doubles a tiny job's time, and test_multirank covers it.
    """
    out = tmp / f"out-{task}-{ranks}"
    args = ["--config", "/dev/null", f"model.path={model}", f"model.task={task}", f"data.path={data}",
            "data.id_columns=[id]", f"output.path={out}", "runtime.progress=false", "data.batch_size=4",
            "output.rows_per_part=6", "mlflow.enabled=false", *extra]
    r = horovodrun(ranks, args) if ranks > 1 else conftest.cli(args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    if ranks > 1:
        assert {n[:12] for n in os.listdir(out) if n.startswith("part-")} == {"part-r00000-", "part-r00001-"}
    return pads.dataset(str(out)).to_table().to_pandas().sort_values("id").reset_index(drop=True), r.stdout


def zero_shot_reference(model_path, texts, labels, multi_label, template="This example is {}."):
    pipe = pipeline("zero-shot-classification", model=AutoModelForSequenceClassification.from_pretrained(model_path),
                    tokenizer=AutoTokenizer.from_pretrained(model_path), device="cpu")
    return pipe(list(texts), candidate_labels=labels, multi_label=multi_label, hypothesis_template=template)


def assert_zero_shot_equal(got_labels, got_scores, ref):
    assert len(got_labels) == len(ref)
    for labels, scores, r in zip(got_labels, got_scores, ref):
        assert list(labels) == r["labels"]
        np.testing.assert_allclose(np.asarray(scores, dtype=float), r["scores"], atol=1e-4)


def ner_reference(model_path, texts, aggregation):
    pipe = pipeline("token-classification", model=AutoModelForTokenClassification.from_pretrained(model_path),
                    tokenizer=AutoTokenizer.from_pretrained(model_path), aggregation_strategy=aggregation,
                    device="cpu")
    key = "entity" if aggregation == "none" else "entity_group"
    return [[(e[key], e["word"], e["start"], e["end"], float(e["score"])) for e in row] for row in pipe(list(texts))]


def assert_entities_equal(got, ref):
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert [(e["entity_group"], e["word"], e["start"], e["end"]) for e in g] == [x[:4] for x in r]
        np.testing.assert_allclose([e["score"] for e in g], [x[4] for x in r], atol=1e-4)


def generate_alone(model_path, prompts, max_new_tokens, max_length=None):
    """model.generate on each prompt by itself, greedy; prompts cut from the left as the task does."""
    tok = AutoTokenizer.from_pretrained(model_path, truncation_side="left")
    lm = AutoModelForCausalLM.from_pretrained(model_path).eval()
    out = []
    for p in prompts:
        ids = tok(p, truncation=max_length is not None, max_length=max_length)["input_ids"]
        x = torch.tensor([ids])
        with torch.no_grad():
            y = lm.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                            do_sample=False, pad_token_id=tok.eos_token_id)
        out.append(tok.decode(y[0, len(ids):], skip_special_tokens=True))
    return out


def ner_texts(n, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(NER_WORDS + builders.WORDS) for _ in range(rng.randint(4, 30))) + "."
            for _ in range(n)]


# -- evaluation ------------------------------------------------------------------------------------
def test_evaluation_matches_sklearn(models):
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    rng = np.random.default_rng(0)
    gold = rng.choice(["a", "b", "c", "d"], 300)
    pred = np.where(rng.random(300) < 0.6, gold, rng.choice(["a", "b", "c", "e"], 300))  # "e" never gold
    task = get_task("text-classification")(job(models["cls"], "text-classification"))
    ranks = [Evaluation(task), Evaluation(task)]
    for ev, rows in zip(ranks, (slice(0, 170), slice(170, 300))):  # two ranks' shares, summed as rank 0 does
        ev.add(gold[rows], pa.table({"label": pa.array(pred[rows])}))
    labels, cm = Evaluation.matrix([ev.counts for ev in ranks])
    assert labels == ["a", "b", "c", "d", "e"]
    np.testing.assert_array_equal(cm, confusion_matrix(gold, pred, labels=labels))
    scores = Evaluation.scores(labels, cm)
    assert scores["accuracy"] == pytest.approx(accuracy_score(gold, pred), abs=1e-12)
    assert scores["macro_f1"] == pytest.approx(f1_score(gold, pred, average="macro"), abs=1e-12)
    assert scores["eval_rows"] == 300
    assert Evaluation.report([ev.counts for ev in ranks])[0] == scores


# -- zero-shot -------------------------------------------------------------------------------------
@pytest.mark.parametrize("labels,multi_label", [(["sports", "politics", "cooking", "tech"], False),
                                                (["sports", "politics", "cooking", "tech"], True),
                                                (["sports"], False)])  # one label: the pipeline's per-label math
def test_zero_shot_one_forward_equals_pipeline(models, labels, multi_label):
    texts = builders.texts(8, seed=1, long_every=4) + [" ".join(builders.WORDS * 12)]  # the last is cut at 512
    cfg = job(models["nli"], "zero-shot-classification", model={"max_length": 512},
              zero_shot={"candidate_labels": labels, "multi_label": multi_label, "hypothesis_template": "It is about {}."})
    task, enc, batch, out = predict_one_batch(cfg, texts)
    assert batch["input_ids"].shape[0] == len(texts) * len(labels)  # all rows x labels in one forward
    assert "token_type_ids" in batch  # BERT tells premise from hypothesis by type
    tok = AutoTokenizer.from_pretrained(models["nli"])
    full = [[len(tok(t, f"It is about {l}.")["input_ids"]) for l in labels] for t in texts]
    assert enc.lengths.tolist() == [sum(min(n, 512) for n in row) for row in full]  # a row costs all its pairs
    assert enc.truncated == sum(max(row) > 512 for row in full) > 0
    ref = zero_shot_reference(models["nli"], texts, labels, multi_label, "It is about {}.")
    assert_zero_shot_equal(out["labels"].to_pylist(), out["scores"].to_pylist(), ref)
    assert out["label"].to_pylist() == [r["labels"][0] for r in ref]
    np.testing.assert_allclose(out["score"].to_numpy(), [r["scores"][0] for r in ref], atol=1e-4)
    assert np.ptp([r["scores"][-1] for r in ref]) > 1e-3  # the premise matters: not one answer for every row


def test_zero_shot_refuses_what_it_cannot_do(models):
    with pytest.raises(ConfigError, match="text_pair_column"):
        get_task("zero-shot-classification")(job(models["nli"], "zero-shot-classification",
                                                 data={"path": "/d", "text_pair_column": "p"},
                                                 zero_shot={"candidate_labels": LABELS}))
    long = job(models["nli"], "zero-shot-classification", model={"max_length": 8},
               zero_shot={"candidate_labels": ["a very long label indeed"]})
    with pytest.raises(ConfigError, match="hypothesis"):
        load_model(long, get_task(long.model.task)(long), torch.device("cpu"))


def test_zero_shot_job_world_of_one(models, tmp_path):
    data = tmp_path / "data"
    table = builders.write_dataset(str(data), 24, files=2, row_group_size=5, text=builders.texts(24, seed=2, long_every=100))
    got, stdout = cli(tmp_path, models["nli"], "zero-shot-classification", data, "data.label_column=label",
                      f"zero_shot.candidate_labels=[{','.join(LABELS)}]", "model.max_length=512")  # as the pipeline
    assert got["id"].tolist() == table.column("id").to_pylist()
    ref = zero_shot_reference(models["nli"], table.column("text").to_pylist(), LABELS, False)
    assert_zero_shot_equal(got["labels"], got["scores"], ref)
    assert got["label"].tolist() == [r["labels"][0] for r in ref]
    assert "evaluation over 24 rows" in stdout  # zero-shot predicts `label`, so gold labels are scored
    gold = table.column("label").to_pylist()
    accuracy = np.mean([g == r["labels"][0] for g, r in zip(gold, ref)])
    assert f"accuracy {accuracy:.4f}" in stdout


@pytest.mark.slow
def test_zero_shot_job_two_ranks_multi_label(models, tmp_path):
    data = tmp_path / "data"
    table = builders.write_dataset(str(data), 24, files=2, row_group_size=5, text=builders.texts(24, seed=3, long_every=100))
    got, _ = cli(tmp_path, models["nli"], "zero-shot-classification", data, "zero_shot.multi_label=true",
                 f"zero_shot.candidate_labels=[{','.join(LABELS)}]", "model.max_length=512",
                 "data.max_tokens_per_batch=600", ranks=2)
    assert got["id"].tolist() == table.column("id").to_pylist()
    ref = zero_shot_reference(models["nli"], table.column("text").to_pylist(), LABELS, True)
    assert_zero_shot_equal(got["labels"], got["scores"], ref)


# -- text generation -------------------------------------------------------------------------------
PROMPTS = ["The market", "Bake bread with butter and garlic while the oven", "Stocks fell",
           "The coach praised the defense after a late goal in the rain and said", "New chips"]


def test_generation_batched_equals_each_prompt_alone(models):
    cfg = job(models["lm"], "text-generation", generation={"max_new_tokens": 12})
    task, enc, batch, out = predict_one_batch(cfg, PROMPTS)
    assert task.tokenizer.pad_token == "[SEP]"  # no pad token: eos pads
    assert (batch["attention_mask"][:, -1] == 1).all() and (batch["attention_mask"][:, 0] == 0).any()  # left pads
    ref = generate_alone(models["lm"], PROMPTS, 12)
    assert out["generated_text"].to_pylist() == ref
    assert len(set(ref)) == len(ref) and all(ref)


def test_generation_cuts_long_prompts_from_the_left(models):
    # n_positions=128 and 100 new tokens leave 28 tokens of prompt.
    prompts = [" ".join(builders.WORDS[:60]), "Short prompt"]
    cfg = job(models["lm"], "text-generation", generation={"max_new_tokens": 100})
    task, enc, batch, out = predict_one_batch(cfg, prompts)
    assert enc.truncated == 1 and enc.lengths.tolist()[0] == 28
    kept = task.tokenizer.decode(enc.features[0], skip_special_tokens=True)
    assert prompts[0].endswith(kept) and len(kept.split()) > 20  # the end, next to what is generated
    assert out["generated_text"].to_pylist() == generate_alone(models["lm"], prompts, 100, max_length=28)


def test_generation_sampling_is_reproducible(models):
    def sample(seed, prompts=PROMPTS):
        cfg = job(models["lm"], "text-generation",
                  generation={"max_new_tokens": 10, "do_sample": True, "temperature": 1.5, "seed": seed})
        return predict_one_batch(cfg, prompts)[3]["generated_text"].to_pylist()

    state = torch.get_rng_state()
    first = sample(7)
    assert torch.equal(torch.get_rng_state(), state)  # the job's own stream; the global one is untouched
    torch.manual_seed(123)  # whatever the caller did to the global generator
    assert sample(7) == first
    assert sample(8) != first
    assert first != generate_alone(models["lm"], PROMPTS, 10)


def test_generation_job_world_of_one(models, tmp_path):
    data = tmp_path / "data"
    prompts = [p for _ in range(4) for p in PROMPTS][:18]
    prompts = [f"{p} {builders.WORDS[i]}" for i, p in enumerate(prompts)]
    table = builders.write_dataset(str(data), len(prompts), files=2, row_group_size=5, text=prompts)
    got, _ = cli(tmp_path, models["lm"], "text-generation", data, "generation.max_new_tokens=8")
    assert got["id"].tolist() == table.column("id").to_pylist()
    assert got["generated_text"].tolist() == generate_alone(models["lm"], prompts, 8)


@pytest.mark.slow
def test_generation_job_two_ranks(models, tmp_path):
    data = tmp_path / "data"
    prompts = [f"{p} {w}" for w in builders.WORDS[:4] for p in PROMPTS]
    table = builders.write_dataset(str(data), len(prompts), files=2, row_group_size=5, text=prompts)
    got, _ = cli(tmp_path, models["lm"], "text-generation", data, "generation.max_new_tokens=8",
                 "data.batch_size=3", ranks=2)
    assert got["id"].tolist() == table.column("id").to_pylist()
    assert got["generated_text"].tolist() == generate_alone(models["lm"], prompts, 8)


# -- token classification --------------------------------------------------------------------------
@pytest.mark.parametrize("aggregation", ["none", "simple", "first", "average", "max"])
def test_ner_batched_equals_pipeline(models, aggregation):
    texts = ner_texts(10, seed=1) + [" ".join(NER_WORDS * 40)]  # the last is cut at 512, as by the pipeline
    cfg = job(models["ner"], "token-classification", model={"max_length": 512},
              token_classification={"aggregation": aggregation})
    task, enc, batch, out = predict_one_batch(cfg, texts)
    assert enc.truncated == 1
    ref = ner_reference(models["ner"], texts, aggregation)
    got = out["entities"].to_pylist()
    assert_entities_equal(got, ref)
    found = [e for row in got for e in row]
    assert len(found) > 20 and {"PER", "LOC"} <= {e["entity_group"].split("-")[-1] for e in found}
    for text, row in zip(texts, got):
        assert all(0 <= e["start"] < e["end"] <= len(text) for e in row)
    if aggregation in ("first", "average", "max"):  # words made of several subwords are single entities
        assert any("##" not in e["word"] and len(AutoTokenizer.from_pretrained(models["ner"]).tokenize(e["word"])) > 1
                   for e in found)


def test_ner_job_world_of_one(models, tmp_path):
    data = tmp_path / "data"
    texts = ner_texts(22, seed=2)
    table = builders.write_dataset(str(data), len(texts), files=2, row_group_size=5, text=texts)
    got, _ = cli(tmp_path, models["ner"], "token-classification", data)  # aggregation: simple, the default
    assert got["id"].tolist() == table.column("id").to_pylist()
    assert_entities_equal(got["entities"].tolist(), ner_reference(models["ner"], texts, "simple"))
    written = pq.read_schema(next(p for p in (tmp_path / "out-token-classification-1").iterdir()
                                  if p.name.startswith("part-")))
    assert written.field("entities").type == pa.list_(pa.struct([
        ("entity_group", pa.string()), ("score", pa.float32()), ("start", pa.int64()), ("end", pa.int64()),
        ("word", pa.string())]))


@pytest.mark.slow
def test_ner_job_two_ranks(models, tmp_path):
    data = tmp_path / "data"
    texts = ner_texts(24, seed=3)
    table = builders.write_dataset(str(data), len(texts), files=2, row_group_size=5, text=texts)
    got, _ = cli(tmp_path, models["ner"], "token-classification", data, "token_classification.aggregation=first",
                 ranks=2)
    assert got["id"].tolist() == table.column("id").to_pylist()
    assert_entities_equal(got["entities"].tolist(), ner_reference(models["ner"], texts, "first"))


# -- all tasks -------------------------------------------------------------------------------------
@pytest.mark.parametrize("task,model,message", [
    ("zero-shot-classification", "cls", "not an NLI model"),
    ("zero-shot-classification", "lm", "no sequence classification head"),
    ("text-generation", "nli", "not a causal language model"),
    ("token-classification", "nli", "no token classification head"),
])
def test_wrong_model_refused_before_loading(models, task, model, message):
    from transformers import AutoConfig

    cfg = job(models[model], task, zero_shot={"candidate_labels": LABELS})
    with pytest.raises(ModelError, match=message):
        get_task(task)(cfg).check_model_config(AutoConfig.from_pretrained(models[model]), models[model])


def test_generation_context_checked_before_loading(models):
    from transformers import AutoConfig

    cfg = job(models["lm"], "text-generation", generation={"max_new_tokens": 128})
    with pytest.raises(ModelError, match="max_new_tokens=128 leaves no room"):
        get_task("text-generation")(cfg).check_model_config(AutoConfig.from_pretrained(models["lm"]), models["lm"])


@pytest.mark.parametrize("name,task", [("zero_shot", "zero-shot-classification"), ("generation", "text-generation"),
                                       ("ner", "token-classification")])
def test_example_configs_load(name, task):
    cfg = load_config(os.path.join(os.path.dirname(os.path.dirname(__file__)), "conf", f"{name}.yaml"))
    assert cfg.model.task == task


# -- text pairs ------------------------------------------------------------------------------------
def test_text_pair_classification_job(models, tmp_path):
    texts, pairs = builders.texts(20, seed=4, long_every=100), builders.texts(20, seed=5, long_every=100)
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pa.table({"id": pa.array(range(20), pa.int64()), "text": texts, "pair": pairs}),
                   data / "pairs.parquet", row_group_size=7)
    got, _ = cli(tmp_path, models["cls"], "text-classification", data, "data.text_pair_column=pair")
    tok = AutoTokenizer.from_pretrained(models["cls"])
    model = AutoModelForSequenceClassification.from_pretrained(models["cls"]).eval()
    with torch.no_grad():
        enc = tok(texts, pairs, padding=True, truncation=True, max_length=256, return_tensors="pt")
        probs = torch.softmax(model(**enc).logits, -1).numpy()
        del enc["token_type_ids"]
        untyped = torch.softmax(model(**enc).logits, -1).numpy()
    np.testing.assert_allclose(np.stack(got["probs"]), probs, atol=1e-5)
    assert np.abs(untyped - probs).max() > 1e-2  # token types matter, so the check above tests them
    assert got["label"].tolist() == [model.config.id2label[i] for i in probs.argmax(1)]
