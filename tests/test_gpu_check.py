"""scripts/gpu_check.py --cpu-smoke: the GPU check's whole code path, tiny and on CPU, checked against a plain reference."""
import json
import os
import subprocess
import sys

import pyarrow.dataset as ds
import pytest

from conftest import REPO


@pytest.mark.slow
def test_gpu_check_cpu_smoke(tmp_path):
    work, report_path = tmp_path / "work", tmp_path / "report.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "gpu_check.py"), "--cpu-smoke", "--rows", "160",
                           "--workers", "0", "--work", str(work), "--json", str(report_path)],
                          capture_output=True, text=True, timeout=1500, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for line in ("bare loop:", "DeepSpeed, no injection over plain PyTorch:", "agreeing with float32", "feed benchmark:",
                 "all jobs ran: yes"):
        assert line in proc.stdout, line
    report = json.loads(report_path.read_text())
    assert report["mode"] == "cpu-smoke" and report["ok"] and report["bare_loop_rows_per_second"] > 0
    jobs = report["jobs"]
    assert set(jobs) == {"DeepSpeed, no injection", "plain PyTorch", "float32, first rows"}
    assert [jobs[n]["rows"] for n in sorted(jobs)] == [160, 80, 160]
    assert report["label_agreement_with_float32"]["plain PyTorch"] >= 0.95  # both float32 here: batches differ only
    assert report["feed"]["jobs"] and report["feed"]["tokenizer"]["own pool"] > 0

    # The plain job's labels, row by row, against the model run on each text alone.
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = str(work / "bert-2x64")
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    inputs = ds.dataset(str(work / "data" / "rows-160"), format="parquet").to_table().to_pylist()
    out = ds.dataset(jobs["plain PyTorch"]["out"], format="parquet").to_table(columns=["id", "label"]).to_pylist()
    got = {r["id"]: r["label"] for r in out}
    assert sorted(got) == [r["id"] for r in inputs]
    checked = 0
    with torch.inference_mode():
        for r in inputs:
            logits = model(**tok(r["text"], truncation=True, max_length=256, return_tensors="pt")).logits[0]
            top2 = torch.topk(logits, 2).values
            if top2[0] - top2[1] > 1e-4:  # a near tie may flip with padding; those are not a bug
                assert got[r["id"]] == model.config.id2label[int(logits.argmax())], r["id"]
                checked += 1
    assert checked > 100
