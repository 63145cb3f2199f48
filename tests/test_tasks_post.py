"""Each task's post-processing against a plain transformers reference, in process."""
import numpy as np
import torch
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

import builders
from hvd_infer.config import load_config
from hvd_infer.model import load_model
from hvd_infer.tasks import get_task

TEXTS = ["A short one.", "The market fell sharply today as investors worried about rates.", "Goal!"]


def job(model_path, task):
    return load_config({"model": {"path": model_path, "task": task}, "data": {"path": "/d"},
                        "output": {"path": "/o"}})


def run_task(cfg):
    task = get_task(cfg.model.task)(cfg)
    model, tok, facts = load_model(cfg, task, torch.device("cpu"))
    enc = task.encode(TEXTS)
    return task.predict(model, task.collate(enc.features)), facts


def test_classification_matches_plain_forward(tiny_classifier):
    out, facts = run_task(job(tiny_classifier, "text-classification"))
    assert facts["deepspeed"] is True
    tok = AutoTokenizer.from_pretrained(tiny_classifier)
    ref = AutoModelForSequenceClassification.from_pretrained(tiny_classifier).eval()
    with torch.no_grad():
        probs = torch.softmax(ref(**tok(TEXTS, padding=True, return_tensors="pt")).logits, -1).numpy()
    np.testing.assert_allclose(np.array(out["probs"].to_pylist()), probs, atol=1e-5)
    assert out["label"].to_pylist() == [ref.config.id2label[i] for i in probs.argmax(1)]
    # float32 within its rounding (1e-5, as the probabilities): the job's last layer computes the first position
    # alone (model.trim_last_layer), in other matrix shapes than the whole layer's (1.1e-6 seen)
    np.testing.assert_allclose(out["score"].to_numpy(), probs.max(1), atol=1e-5)


def test_embedding_matches_sentence_transformers_math():
    path = builders.minilm_dir()
    out, _ = run_task(job(path, "embedding"))
    tok = AutoTokenizer.from_pretrained(path)
    ref = AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        b = tok(TEXTS, padding=True, truncation=True, max_length=256, return_tensors="pt")
        h = ref(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).float()
        e = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=1).numpy()
    got = np.array(out["embedding"].to_pylist())
    np.testing.assert_allclose(got, e, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_truncation_is_counted(tiny_classifier):
    cfg = job(tiny_classifier, "text-classification")
    cfg.model.max_length = 8
    task = get_task(cfg.model.task)(cfg)
    load_model(cfg, task, torch.device("cpu"))
    enc = task.encode(TEXTS)
    assert enc.truncated == 1 and max(enc.lengths) == 8


def test_pad_rounds_width_up_and_masks_only_real_tokens():
    from hvd_infer.tasks.base import pad

    right = pad([[5, 6, 7], [8]], pad_id=0, multiple=8)
    assert right["input_ids"].shape == (2, 8)
    assert right["input_ids"][0].tolist() == [5, 6, 7, 0, 0, 0, 0, 0]
    assert right["attention_mask"].sum(1).tolist() == [3, 1]
    left = pad([[5, 6, 7], [8]], pad_id=0, side="left", multiple=4)
    assert left["input_ids"][1].tolist() == [0, 0, 0, 8] and left["attention_mask"][0].tolist() == [0, 1, 1, 1]
    assert pad([[1] * 8], pad_id=0, multiple=8)["input_ids"].shape == (1, 8)  # already a multiple: unchanged


def test_pad_to_multiple_of_auto_rounds_on_cuda_only():
    from hvd_infer.config import load_config
    from hvd_infer.tasks.base import pad_multiple

    assert load_config(None, **{"model.path": "m", "data.path": "d", "output.path": "o"}).data.pad_to_multiple_of == "auto"
    assert (pad_multiple("auto", "cuda"), pad_multiple("auto", "cpu"), pad_multiple(4, "cpu"), pad_multiple(8, "cuda")) == (8, 1, 4, 8)
