#!/usr/bin/env python
"""The GPU path, run for real: hvd_infer on one GPU against a bare float16 loop, and the feed rate.

    python3 scripts/gpu_check.py                         # a one-GPU host: ~200k rows, BERT-base size, float16
    python3 scripts/gpu_check.py --rows 50000 --json $OUT/gpu_check.json
    .venv/bin/python scripts/gpu_check.py --cpu-smoke    # here: tiny sizes, float32, CPU, no nvidia-smi

Builds (offline, seeded) a BERT-base-sized classifier with random weights and MiniLM's tokenizer and a
corpus sized like Debian package descriptions, then scores it with `python -m hvd_infer` (a world
of one) three ways: DeepSpeed with kernel injection, DeepSpeed without, plain PyTorch; scores the
first rows again in float32; and runs a bare loop (the same model in float16 over the same texts
pre-tokenized, length-sorted and cut into batches of the same token budget, outputs copied back to
the host as the job does). Prints steady rows/s of each job over the bare loop's, DeepSpeed over
plain, float16 labels' agreement with float32 (and with the bare loop), GPU utilisation sampled by
nvidia-smi during the first job's steady phase, and the null-model feed rate for data.workers =
4, 8, 15 (scripts/bench_feed.py). --cpu-smoke runs the same code with tiny sizes in float32 on CPU,
without kernel injection (CUDA only) or nvidia-smi.

A GPU host may lack deepspeed and petastorm and have no network: when they do not import, the
wheels that scripts/build_gpu_wheels.sh made (gpu_wheels/, carried along) are installed with
--no-deps into a folder of their own that only the jobs see, first on their PYTHONPATH: it holds
numpy 1.26, pyarrow 14 and pandas 2.2 for petastorm, and the host's own torch stays as it is.
The jobs run with mlflow.enabled=false (mlflow is not carried: see build_gpu_wheels.sh).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_feed import bench_feed  # noqa: E402
from feed_inputs import bert_classifier, corpus, run_job, write_corpus  # noqa: E402
from hvd_infer.hardware import cpu_facts  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEELS = os.path.join(REPO, "gpu_wheels")
MAX_LENGTH = 256
NEEDED = ("deepspeed", "petastorm", "pandas", "pyarrow.parquet")  # what a job imports that such a host may lack or break


def gpu_check(rows: int = 200_000, cpu_smoke: bool = False, work: str = os.path.join(REPO, "bench_out", "gpu_check"),
              feed_rows: Optional[int] = None, feed_workers: Sequence[int] = (4, 8, 15),
              agreement_rows: int = 20_000, tokens_per_batch: Optional[int] = None,
              wheels: str = WHEELS) -> Dict[str, Any]:
    """Run every check; prints as it goes and returns the report (ok: every job ran).

    wheels: scripts/build_gpu_wheels.sh's folder, installed from when a job's packages do not import."""
    import torch

    cuda = torch.cuda.is_available() and not cpu_smoke
    if not cuda and not cpu_smoke:
        raise SystemExit("gpu_check: no CUDA device here; use --cpu-smoke to run the same code on CPU")
    dtype = "float16" if cuda else "float32"
    tokens = tokens_per_batch or (65536 if cuda else 4096)
    os.makedirs(work, exist_ok=True)
    report: Dict[str, Any] = {"mode": "gpu" if cuda else "cpu-smoke", "rows": rows, "dtype": dtype,
                              "tokens_per_batch": tokens, "machine": cpu_facts(), "jobs": {}, "notes": [], "ok": True}
    if cuda:
        report["gpu"] = torch.cuda.get_device_name(0)
        # Only this GPU's architecture: DeepSpeed's JIT build of its kernels is minutes per target.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "%d.%d" % torch.cuda.get_device_capability(0))
    env = _job_environment(work, wheels, report)
    _say(f"{report['mode']}: {rows:,} rows, {dtype}, token budget {tokens:,}, "
         f"{report.get('gpu', report['machine']['cpu'])}")

    size = dict(layers=12, hidden=768, heads=12) if cuda else dict(layers=2, hidden=64, heads=2)
    model = bert_classifier(os.path.join(work, f"bert-{size['layers']}x{size['hidden']}"), **size)
    texts = corpus(rows)
    data = write_corpus(os.path.join(work, "data", f"rows-{rows}"), texts)
    head = min(agreement_rows, rows)
    head_data = write_corpus(os.path.join(work, "data", f"rows-{rows}-head-{head}"), texts[:head])

    common = [f"model.path={model}", "data.id_columns=[id]", f"model.max_length={MAX_LENGTH}",
              f"data.max_tokens_per_batch={tokens}", "output.mode=overwrite", "runtime.progress=false",
              "mlflow.enabled=false"]
    runs = [("DeepSpeed + kernel injection", data, [f"model.dtype={dtype}", "model.kernel_inject=true"]),
            ("DeepSpeed, no injection", data, [f"model.dtype={dtype}", "model.kernel_inject=false"]),
            ("plain PyTorch", data, [f"model.dtype={dtype}", "model.deepspeed=false"]),
            ("float32, first rows", head_data, ["model.dtype=float32", "model.deepspeed=false"])]
    if not cuda:
        report["notes"].append("kernel injection needs CUDA: not run in --cpu-smoke")
        runs = runs[1:]
    for i, (name, path, overrides) in enumerate(runs):
        out = os.path.join(work, "out", name.split(",")[0].replace(" ", "-").replace("+", "").lower() + f"-{i}")
        cmd = [sys.executable, "-m", "hvd_infer", "--config", "/dev/null", f"data.path={path}", f"output.path={out}",
               *common, *overrides]
        _say(f"hvd_infer, {name}")
        sampler = _GpuSampler() if cuda and i == 0 else None
        with sampler or _Nothing():
            job = run_job(cmd, out, env=env, cwd=REPO)
        entry: Dict[str, Any] = {"out": out, "rc": job["rc"], "wall_seconds": job["wall_seconds"],
                                 "peak_rss_mb": job["peak_rss_mb"]}
        if job["rc"] != 0:
            report["ok"] = False
            entry["error"] = _last_error_line(job["log"])
            _say(f"  FAILED (exit {job['rc']}): {entry['error']}")
            print(job["log"][-3000:], flush=True)
        else:
            s = job["summary"]
            entry.update(rows=s["rows"], steady_rows_per_second=s["rows_per_second"],
                         end_to_end_rows_per_second=s["end_to_end_rows_per_second"],
                         data_wait_fraction=s["data_wait_fraction"], padding_efficiency=s["padding_efficiency"])
            _say(f"  {s['rows']:,} rows, {s['rows_per_second']:,.0f} rows/s steady, model waited "
                 f"{100 * s['data_wait_fraction']:.0f}% of forward time")
        if sampler is not None:
            report["gpu_utilisation"] = sampler.steady()
        report["jobs"][name] = entry

    _say("bare loop over pre-tokenized, length-sorted batches")
    bare_rate, bare_labels = _bare_loop(model, texts, dtype, tokens, "cuda" if cuda else "cpu")
    report["bare_loop_rows_per_second"] = bare_rate
    _say(f"  {bare_rate:,.0f} rows/s")

    jobs = report["jobs"]
    for entry in jobs.values():
        if "steady_rows_per_second" in entry and entry["rows"] == rows:
            entry["steady_over_bare"] = entry["steady_rows_per_second"] / bare_rate
    plain = jobs.get("plain PyTorch", {})
    for name in ("DeepSpeed + kernel injection", "DeepSpeed, no injection"):
        if "steady_rows_per_second" in jobs.get(name, {}) and "steady_rows_per_second" in plain:
            report.setdefault("deepspeed_over_plain", {})[name] = (jobs[name]["steady_rows_per_second"]
                                                                   / plain["steady_rows_per_second"])
    fp32 = jobs.get("float32, first rows", {})
    for name in ("DeepSpeed + kernel injection", "plain PyTorch"):
        if "rows" in jobs.get(name, {}) and "rows" in fp32:
            report.setdefault("label_agreement_with_float32", {})[name] = _agreement(jobs[name]["out"], fp32["out"])
    if "rows" in plain:
        report["label_agreement_plain_job_with_bare_loop"] = _agreement_with(plain["out"], bare_labels)

    _say("null-model feed rate (scripts/bench_feed.py)")
    feed = bench_feed(feed_rows or rows, nps=[1], workers=list(feed_workers), work=os.path.join(work, "feed"), env=env)
    report["feed"] = {"tokenizer": feed["tokenizer"], "jobs": feed["jobs"], "notes": feed["notes"]}
    _print_report(report)
    return report


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def _say(msg: str) -> None:
    print(f"[gpu_check] {msg}", flush=True)


def _last_error_line(log: str) -> str:
    lines = [ln for ln in log.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or ["(no output)"])[-1][:400]


def _job_environment(work: str, wheels_dir: str, report: Dict[str, Any]) -> Dict[str, str]:
    """PYTHONPATH for the jobs: the repo, and first the carried wheels' folder when the host lacks packages."""
    base = {"PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
    missing = _missing(base)
    if not missing:
        return base
    site = os.path.join(work, "site")
    wheels = sorted(os.path.join(wheels_dir, n) for n in os.listdir(wheels_dir) if n.endswith(".whl")) \
        if os.path.isdir(wheels_dir) else []
    if not wheels:
        raise SystemExit(f"gpu_check: {'; '.join(missing)} not importable and no wheels in {wheels_dir}; run "
                         "scripts/build_gpu_wheels.sh where pip works and bring gpu_wheels/ along")
    _say(f"{'; '.join(missing)}: installing {len(wheels)} wheels from {wheels_dir} into {site}")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--disable-pip-version-check", "--upgrade", "--target", site, *wheels],
                   check=True)
    env = {"PYTHONPATH": os.pathsep.join([site, base["PYTHONPATH"]])}
    missing = _missing(env)
    if missing:
        raise SystemExit(f"gpu_check: still not importable after installing the wheels: {'; '.join(missing)}")
    report["notes"].append(f"installed {len(wheels)} carried wheels into {site} (jobs only)")
    return env


def _missing(env: Dict[str, str]) -> List[str]:
    """The packages (with their import error) a job could not import under env."""
    # Imported packages may print (DeepSpeed announces its accelerator): the verdict is the last line.
    probe = ("import importlib, json, sys\nmissing = []\nfor name in sys.argv[1:]:\n    try:\n"
             "        importlib.import_module(name)\n    except Exception as e:\n"
             "        missing.append(f'{name} ({type(e).__name__}: {str(e)[:200]})')\nprint(json.dumps(missing))")
    proc = subprocess.run([sys.executable, "-c", probe, *NEEDED], capture_output=True, text=True,
                          env=dict(os.environ, **env), cwd=REPO)
    if proc.returncode != 0:
        return [f"python -c 'import ...' failed: {proc.stderr.strip().splitlines()[-1:]}"]
    return json.loads(proc.stdout.strip().splitlines()[-1])


class _GpuSampler:
    """nvidia-smi's utilisation every 200 ms while a job runs; steady() is the middle 80% of its busy span."""

    def __init__(self):
        self.samples: List[tuple] = []
        self._proc = None
        self._thread = None

    def __enter__(self):
        self._proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                                       "-lms", "200"], stdout=subprocess.PIPE, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self):
        for line in self._proc.stdout:
            try:
                util, mem = (float(x) for x in line.split(","))
            except ValueError:
                continue
            self.samples.append((time.perf_counter(), util, mem))

    def __exit__(self, *exc):
        self._proc.terminate()
        self._proc.wait()
        self._thread.join(timeout=5)

    def steady(self) -> Dict[str, Any]:
        busy = [s for s in self.samples if s[1] > 0]
        if len(busy) < 5:
            return {"samples": len(self.samples), "note": "too few busy samples"}
        t0, t1 = busy[0][0], busy[-1][0]
        mid = [s for s in self.samples if t0 + 0.1 * (t1 - t0) <= s[0] <= t1 - 0.1 * (t1 - t0)]
        util = [s[1] for s in mid]
        return {"samples": len(mid), "busy_seconds": t1 - t0, "mean_percent": sum(util) / len(util),
                "share_at_or_over_90": sum(u >= 90 for u in util) / len(util), "peak_memory_mb": max(s[2] for s in mid)}


def _bare_loop(model_dir: str, texts: List[str], dtype: str, tokens: int, device: str):
    """(rows/s, label per row): the model alone over pre-tokenized, length-sorted, padded batches."""
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    # Untimed, so on all cores; the variable is read at the first call, and the jobs started
    # after this one must not inherit it (the runner keeps the tokenizer's pool off in a rank).
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    ids = tok(texts, truncation=True, max_length=MAX_LENGTH, return_attention_mask=False,
              return_token_type_ids=False)["input_ids"]
    if before is None:
        del os.environ["TOKENIZERS_PARALLELISM"]
    else:
        os.environ["TOKENIZERS_PARALLELISM"] = before
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    order = np.argsort(-lengths, kind="stable")
    batches, i = [], 0
    while i < len(order):
        width = -(-int(lengths[order[i]]) // 8) * 8  # the job rounds widths to a multiple of 8 too
        n = max(1, tokens // width)
        rows = order[i:i + n]
        x = np.full((len(rows), width), tok.pad_token_id, dtype=np.int64)
        for r, row in enumerate(rows):
            x[r, :lengths[row]] = ids[row]
        input_ids = torch.from_numpy(x)
        mask = (input_ids != tok.pad_token_id).long()
        if device == "cuda":
            input_ids, mask = input_ids.pin_memory(), mask.pin_memory()
        batches.append((rows, input_ids, mask))
        i += n
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    labels = np.empty(len(texts), dtype=np.int64)

    def run(selection) -> None:
        with torch.inference_mode():
            for rows, input_ids, mask in selection:
                logits = model(input_ids=input_ids.to(device, non_blocking=True),
                               attention_mask=mask.to(device, non_blocking=True)).logits
                labels[rows] = logits.float().argmax(-1).cpu().numpy()

    run(batches[:3])  # warm-up: kernels chosen, memory pool grown
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    run(batches)
    if device == "cuda":
        torch.cuda.synchronize()
    rate = len(texts) / (time.perf_counter() - t)
    id2label = model.config.id2label
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return rate, [id2label[int(k)] for k in labels]


def _labels(out: str) -> Dict[int, str]:
    import pyarrow.dataset as ds

    t = ds.dataset(out, format="parquet").to_table(columns=["id", "label"])
    return dict(zip(t.column("id").to_pylist(), t.column("label").to_pylist()))


def _agreement(out: str, reference_out: str) -> float:
    """Share of the reference's rows whose label is the same in out."""
    a, ref = _labels(out), _labels(reference_out)
    return sum(a.get(i) == label for i, label in ref.items()) / max(1, len(ref))


def _agreement_with(out: str, labels: List[str]) -> float:
    a = _labels(out)
    return sum(a.get(i) == label for i, label in enumerate(labels)) / max(1, len(labels))


def _print_report(r: Dict[str, Any]) -> None:
    print(f"\nGPU check ({r['mode']}): {r['rows']:,} rows, {r['dtype']}, token budget {r['tokens_per_batch']:,}; "
          f"{r.get('gpu', 'no GPU')}; CPU {r['machine']['cpu']}, {r['machine']['cores']} cores")
    print(f"bare loop: {r['bare_loop_rows_per_second']:,.0f} rows/s")
    print(f"\n| {'hvd_infer job':<30} | {'rows':>8} | {'steady rows/s':>13} | {'x bare':>6} | {'end to end rows/s':>17} | "
          f"{'model waited':>12} |")
    print(f"|{'-' * 32}|{'-' * 10}|{'-' * 15}|{'-' * 8}|{'-' * 19}|{'-' * 14}|")
    for name, j in r["jobs"].items():
        if "error" in j:
            print(f"| {name:<30} | FAILED: {j['error'][:80]}")
            continue
        over = f"{j['steady_over_bare']:.2f}" if "steady_over_bare" in j else "-"
        print(f"| {name:<30} | {j['rows']:>8,} | {j['steady_rows_per_second']:>13,.0f} | {over:>6} | "
              f"{j['end_to_end_rows_per_second']:>17,.0f} | {100 * j['data_wait_fraction']:>11.0f}% |")
    for name, v in r.get("deepspeed_over_plain", {}).items():
        print(f"{name} over plain PyTorch: {v:.2f}x")
    for name, v in r.get("label_agreement_with_float32", {}).items():
        print(f"labels of '{name}' agreeing with float32: {100 * v:.2f}%")
    if "label_agreement_plain_job_with_bare_loop" in r:
        print(f"labels of the plain job agreeing with the bare loop: {100 * r['label_agreement_plain_job_with_bare_loop']:.2f}%")
    if "gpu_utilisation" in r:
        g = r["gpu_utilisation"]
        print("GPU utilisation, steady phase of the first job: " + (
            f"mean {g['mean_percent']:.0f}%, {100 * g['share_at_or_over_90']:.0f}% of samples >= 90%, "
            f"peak memory {g['peak_memory_mb']:,.0f} MB ({g['samples']} samples)" if "mean_percent" in g else g["note"]))
    for note in r["notes"]:
        print(f"note: {note}")
    print(f"all jobs ran: {'yes' if r['ok'] else 'NO'}", flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes, float32, CPU: the same code path, no GPU")
    p.add_argument("--rows", type=int, default=None, help="rows to score (default 200,000; --cpu-smoke 600)")
    p.add_argument("--feed-rows", type=int, default=None, help="rows for the feed rate (default: --rows)")
    p.add_argument("--workers", default=None, help="data.workers for the feed rate (default 4,8,15; --cpu-smoke 0,1)")
    p.add_argument("--tokens-per-batch", type=int, default=None,
                   help="data.max_tokens_per_batch, also the bare loop's budget (default 65,536; --cpu-smoke 4,096)")
    p.add_argument("--work", default=os.path.join(REPO, "bench_out", "gpu_check"), help="models, data and outputs")
    p.add_argument("--json", default=None, help="also write the report here")
    p.add_argument("--wheels", default=WHEELS, help="scripts/build_gpu_wheels.sh's output (default gpu_wheels/)")
    args = p.parse_args(argv)
    rows = args.rows or (600 if args.cpu_smoke else 200_000)
    workers = [int(w) for w in (args.workers or ("0,1" if args.cpu_smoke else "4,8,15")).split(",")]
    report = gpu_check(rows, args.cpu_smoke, args.work, args.feed_rows, workers,
                       agreement_rows=rows // 2 if args.cpu_smoke else 20_000, tokens_per_batch=args.tokens_per_batch,
                       wheels=args.wheels)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
