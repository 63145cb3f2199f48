#!/usr/bin/env python
"""The feed benchmark: how fast hvd_infer feeds a model that costs nothing, next to the tokenizer alone.

    .venv/bin/python scripts/bench_feed.py                    # 40,000 rows, -np 1 and -np 2, data.workers 0..cores
    .venv/bin/python scripts/bench_feed.py --rows 8000 --np 1 --workers 0,2
    .venv/bin/python scripts/bench_feed.py --plan-files 10000  # only: plan over 10,000 files (1M rows)

The null model is a 1-layer, 32-wide BERT classifier with MiniLM's real tokenizer, so the job's time
is the data path's: reading, tokenizing, batching, writing. The corpus is generated (seeded) with
Debian package descriptions' lengths: median ~75 tokens, cut at 256.

Printed: the fast tokenizer alone (one batch call per 4,096 rows) on one thread and with its own
thread pool (TOKENIZERS_PARALLELISM=true); then each hvd_infer job with
data.max_tokens_per_batch=16384: steady rows/s (the runner's own, from _manifest.json), that over the
pooled tokenizer's rate, end to end rows/s (the command's wall clock), the share of forward time the
model waited on data, and peak RSS of each rank with its worker processes (summed, so an upper bound).
Where hvd_infer has no data.workers key the job runs once with its defaults and the sweep is skipped.
The machine may be shared: figures are one run each, not a statistic. Never part of the test suite.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
from feed_inputs import bert_classifier, corpus, run_job, write_corpus  # noqa: E402
from hvd_infer.hardware import cpu_facts  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LENGTH = 256
TOKENS_PER_BATCH = 16384

# The tokenizer alone, in a fresh process: TOKENIZERS_PARALLELISM is read once, at its first use.
_TOKENIZE = r"""
import json, sys, time
import pyarrow.dataset as ds
from transformers import AutoTokenizer
model, data, max_length = sys.argv[1], sys.argv[2], int(sys.argv[3])
texts = ds.dataset(data, format="parquet").to_table(columns=["text"]).column("text").to_pylist()
tok = AutoTokenizer.from_pretrained(model)
tok(texts[:256], truncation=True, max_length=max_length)
t = time.perf_counter()
for i in range(0, len(texts), 4096):
    tok(texts[i:i + 4096], truncation=True, max_length=max_length)
print(json.dumps({"rows_per_second": len(texts) / (time.perf_counter() - t)}))
"""


def bench_feed(rows: int = 40000, nps: Sequence[int] = (1, 2), workers: Optional[Sequence[int]] = None,
               work: str = os.path.join(REPO, "bench_out", "feed"), env: Optional[Dict[str, str]] = None,
               extra: Sequence[str] = ()) -> Dict[str, Any]:
    """Tokenizer alone, then hvd_infer with the null model per world size and data.workers; prints and returns the table.

    workers: data.workers values per rank (default 0 .. cores // np). env: extra environment for the
    jobs (gpu_check.py passes the path of the packages it installed). extra: more config overrides.
    """
    facts = cpu_facts()
    env = dict(env or {})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), REPO, os.environ.get("PYTHONPATH")) if p)
    print(f"[feed] CPU {facts['cpu']}, {facts['cores']} cores; "
          + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in facts.items() if k not in ("cpu", "cores")), flush=True)
    model = bert_classifier(os.path.join(work, "null-model"), layers=1, hidden=32, heads=2)
    data = write_corpus(os.path.join(work, "data", f"rows-{rows}"), corpus(rows))

    report: Dict[str, Any] = {"machine": facts, "rows": rows, "tokenizer": {}, "jobs": [], "notes": []}
    for name, parallel in (("one thread", "false"), ("own pool", "true")):
        proc = subprocess.run([sys.executable, "-c", _TOKENIZE, model, data, str(MAX_LENGTH)], capture_output=True,
                              text=True, env=dict(os.environ, **env, TOKENIZERS_PARALLELISM=parallel))
        if proc.returncode != 0:
            raise RuntimeError(f"tokenizer alone ({name}) failed:\n{proc.stderr[-2000:]}")
        report["tokenizer"][name] = json.loads(proc.stdout.strip().splitlines()[-1])["rows_per_second"]
        print(f"[feed] tokenizer alone, {name}: {report['tokenizer'][name]:,.0f} rows/s", flush=True)
    pooled = report["tokenizer"]["own pool"]

    has_workers_key = True
    for np_ in nps:
        sweep = list(workers) if workers is not None else list(range(0, facts["cores"] // np_ + 1))
        for w in sweep if has_workers_key else [None]:
            job = _run_feed_job(np_, w, model, data, work, env, extra)
            if job["rc"] == 2 and "unknown config key" in job["log"] and w is not None:
                has_workers_key = False
                report["notes"].append("this hvd_infer has no data.workers key: one job per world size with its "
                                       "defaults, no workers sweep")
                print(f"[feed] {report['notes'][-1]}", flush=True)
                w, job = None, _run_feed_job(np_, None, model, data, work, env, extra)
            if job["rc"] != 0:
                raise RuntimeError(f"hvd_infer -np {np_} data.workers={w} exited {job['rc']}:\n{job['log'][-3000:]}")
            s = job["summary"]
            row = {"np": np_, "workers": w, "rows": s["rows"], "steady_rows_per_second": s["rows_per_second"],
                   "ratio_to_tokenizer_pool": s["rows_per_second"] / pooled,
                   "end_to_end_rows_per_second": s["rows"] / job["wall_seconds"],
                   "data_wait_fraction": s["data_wait_fraction"], "peak_rss_mb_per_rank": job["peak_rss_mb"]}
            report["jobs"].append(row)
            print(f"[feed] -np {np_} data.workers={'default' if w is None else w}: "
                  f"{row['steady_rows_per_second']:,.0f} rows/s steady", flush=True)
            if not has_workers_key:
                break
    _print_table(report)
    return report


def _run_feed_job(np_: int, workers: Optional[int], model: str, data: str, work: str, env: Dict[str, str],
                  extra: Sequence[str]) -> Dict[str, Any]:
    out = os.path.join(work, "out", f"np{np_}-w{'default' if workers is None else workers}")
    launcher = [sys.executable] if np_ == 1 else [os.path.join(os.path.dirname(sys.executable), "horovodrun"),
                                                  "-np", str(np_), "-H", f"localhost:{np_}", sys.executable]
    cmd = launcher + ["-m", "hvd_infer", "--config", "/dev/null", f"model.path={model}", f"data.path={data}",
                      "data.id_columns=[id]", f"model.max_length={MAX_LENGTH}",
                      f"data.max_tokens_per_batch={TOKENS_PER_BATCH}", f"output.path={out}", "output.mode=overwrite",
                      "runtime.progress=false", "mlflow.enabled=false", *extra]
    if workers is not None:
        cmd.append(f"data.workers={workers}")
    return run_job(cmd, out, env=env, cwd=REPO)


def _print_table(report: Dict[str, Any]) -> None:
    m, tok = report["machine"], report["tokenizer"]
    print(f"\nfeed benchmark: {report['rows']:,} rows, null model, data.max_tokens_per_batch={TOKENS_PER_BATCH}, "
          f"model.max_length={MAX_LENGTH}")
    print(f"CPU: {m['cpu']}, {m['cores']} cores, avx512_bf16 {'yes' if m['avx512_bf16'] else 'no'}, "
          f"amx {'yes' if m['amx_bf16'] else 'no'}")
    print(f"tokenizer alone: {tok['one thread']:,.0f} rows/s one thread, {tok['own pool']:,.0f} rows/s own pool")
    print(f"\n| {'np':>2} | {'data.workers':>12} | {'steady rows/s':>13} | {'x tokenizer pool':>16} | "
          f"{'end to end rows/s':>17} | {'model waited':>12} | {'peak RSS per rank (MB)':>22} |")
    print(f"|{'-' * 4}|{'-' * 14}|{'-' * 15}|{'-' * 18}|{'-' * 19}|{'-' * 14}|{'-' * 24}|")
    for j in report["jobs"]:
        rss = ", ".join(f"{mb:,.0f}" for mb in j["peak_rss_mb_per_rank"]) or "-"
        print(f"| {j['np']:>2} | {'default' if j['workers'] is None else j['workers']:>12} | "
              f"{j['steady_rows_per_second']:>13,.0f} | {j['ratio_to_tokenizer_pool']:>15.2f}x | "
              f"{j['end_to_end_rows_per_second']:>17,.0f} | {100 * j['data_wait_fraction']:>11.0f}% | {rss:>22} |")
    for note in report["notes"]:
        print(f"note: {note}")
    sys.stdout.flush()


def _time_planning(files: int, rows: int, work: str, ranks: int = 8) -> None:
    """Footers of `files` tiny files (rows in all) read, planned for `ranks` ranks, and the broadcast measured."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hvd_infer.config import DataConfig
    from hvd_infer.dataset import open_input
    from hvd_infer.shard_plan import plan_parts

    path = os.path.join(work, f"plan-{files}-files-{rows}-rows")
    if not os.path.exists(os.path.join(path, "_DONE")):
        os.makedirs(path, exist_ok=True)
        bounds = np.linspace(0, rows, files + 1).astype(np.int64)
        for k in range(files):
            ids = np.arange(bounds[k], bounds[k + 1], dtype=np.int64)
            pq.write_table(pa.table({"id": ids, "text": pa.array([f"row {i}" for i in ids])}),
                           os.path.join(path, f"part-{k:05d}.parquet"))
        open(os.path.join(path, "_DONE"), "w").close()
    t = time.perf_counter()
    inp = open_input(DataConfig(path=path, id_columns=["id"]))
    footers = time.perf_counter() - t
    t = time.perf_counter()
    parts = [plan_parts(inp.row_groups, r, ranks, 50000) for r in range(ranks)]
    planned = (time.perf_counter() - t) / ranks
    blob = pickle.dumps(inp)
    print(f"planning: {len(inp.files):,} files, {inp.total_rows:,} rows, {len(inp.row_groups):,} row groups: "
          f"footers {footers:.2f} s; plan per rank ({ranks} ranks, {sum(map(len, parts))} parts) {planned:.3f} s; "
          f"broadcast {len(blob) / 1024:,.0f} KB pickled. CPU: {cpu_facts()['cpu']}, {cpu_facts()['cores']} cores, "
          "page cache warm after the first run", flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=40000, help="corpus rows (default 40,000)")
    p.add_argument("--np", default="1,2", help="world sizes, comma separated (default 1,2)")
    p.add_argument("--workers", default=None, help="data.workers values, comma separated (default 0..cores/np)")
    p.add_argument("--work", default=os.path.join(REPO, "bench_out", "feed"), help="model, data and outputs")
    p.add_argument("--json", default=None, help="also write the report here")
    p.add_argument("--plan-files", type=int, default=0, help="only time planning over this many files (1M rows)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.plan_files:
        _time_planning(args.plan_files, 1_000_000, args.work)
        return 0
    report = bench_feed(args.rows, [int(n) for n in args.np.split(",")],
                        None if args.workers is None else [int(w) for w in args.workers.split(",")], args.work)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
