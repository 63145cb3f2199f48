#!/usr/bin/env python
"""Benchmark hvd_infer against the bare loop, transformers' pipeline and Spark's predict_batch_udf.

    .venv/bin/python scripts/bench.py                      # 4,000 rows, the demo model (make bench)
    .venv/bin/python scripts/bench.py --rows 2000 --skip spark,pipeline
    .venv/bin/python scripts/bench.py --quick              # 1,000 rows, a smoke run
    .venv/bin/python scripts/bench.py --breakdown          # also: where hvd_infer's start-up goes
    .venv/bin/python scripts/bench.py --rss                # only: peak RSS per rank, 1k vs 16k rows
    .venv/bin/python scripts/bench.py --hvd-src /tmp/copy --launcher-args=--gloo   # A/B a changed hvd_infer

One run, one corpus (scripts/make_demo.py's make_corpus, several Parquet files and row groups),
one model (the demo's fine-tuned classifier, or --model DIR) and the same cores for every contender:

  a        the bare loop: one process, all cores, pre-tokenized length-sorted batches, plain
           transformers forward under inference_mode; the limit (the better of a run at the start
           and one at the end, a-again). a-bf16 (autocast), a-bf16w (weights cast to bf16) and
           a-int8 (dynamic int8 Linear) are the same loop. On a CPU without AVX512-BF16/AMX the
           bf16 stages (and hvd-bf16) score the first quarter of the corpus and are compared with
           float32 on the same rows (a-sub); --bf16-rows N overrides.
  b        transformers pipeline("text-classification"), in this process, model load included.
  c        Spark predict_batch_udf on local[cores] (session start-up excluded, workers' model load
           included), writing Parquet.
  d        hvd_infer under horovodrun as a subprocess: end to end is the wall clock of the command,
           steady state the runner's own rows/s from the output's _manifest.json.

hvd_infer runs log to a temporary sqlite MLflow store (created before the timed runs, as a real
user's store would be), output.mode=overwrite, runtime.progress=false. Results are printed and
written as JSON (--json, default bench_out/bench.json). The machine is assumed shared: every stage
records the CPU other processes used meanwhile ("other cores"), so a noisy figure shows as one.
Never part of the test suite.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse
import gc
import warnings
import importlib.util
import json
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.dirname(sys.executable)
STAGES = ["a", "a-sub", "a-bf16", "a-bf16w", "a-int8", "pipeline", "spark", "hvd-np1", "hvd", "hvd-bf16", "hvd-int8"]


def log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ------------------------------------------------------------------------------------------------
# Machine, CPU accounting, memory
# ------------------------------------------------------------------------------------------------

def machine() -> Dict[str, Any]:
    import torch
    import transformers

    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu": model, "cores": cpu_cores(), "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "avx512_vnni": "avx512_vnni" in flags, "avx512f": "avx512f" in flags,
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "load_average_at_start": os.getloadavg()}


def _system_busy() -> float:
    """CPU-seconds the whole machine has spent busy since boot."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]  # idle + iowait
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu() -> float:
    """CPU-seconds of this process, its waited-for descendants and its live descendants."""
    import psutil

    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    total = s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime
    for p in psutil.Process().children(recursive=True):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class MemoryWatch:
    """Peak RSS (MB) of this process and of its descendants while a stage runs, polled every 0.2 s.

    Descendants report their kernel high-water mark (VmHWM), so a spike between polls is not
    missed; this process reports its polled VmRSS (its own VmHWM spans the whole benchmark).
    Horovod ranks (HOROVOD_RANK in their environment) are reported per rank.
    """

    def __init__(self, root_pid: Optional[int] = None, interval: float = 0.2):
        self.root_pid, self.interval = root_pid, interval
        self.self_mb = 0.0
        self.ranks: Dict[int, float] = {}
        self.others: Dict[str, float] = {}
        self._kind: Dict[int, Any] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def watch(self, pid: int) -> None:
        self.root_pid = pid

    def _classify(self, p) -> Any:
        # Only final answers are cached: horovodrun starts a rank as `sh -c ...`, which then execs
        # Python under the same pid.
        if p.pid in self._kind:
            return self._kind[p.pid]
        try:
            cmd, exe = " ".join(p.cmdline()), os.path.basename(p.exe())
            rank = p.environ().get("HOROVOD_RANK")
        except Exception:
            return None
        if rank is not None and "hvd_infer" in cmd and "python" in exe:
            kind = self._kind[p.pid] = int(rank)
        elif "java" in exe:
            kind = self._kind[p.pid] = "jvm"
        elif "python" in exe and ("pyspark" in cmd or "daemon" in cmd):
            kind = self._kind[p.pid] = "python worker"
        elif "python" in exe and "horovodrun" in cmd:
            kind = self._kind[p.pid] = "horovodrun"
        else:
            kind = "other"
        return kind

    def _poll(self) -> None:
        import psutil

        self.self_mb = max(self.self_mb, _status_kb(os.getpid(), "VmRSS") / 1024)
        roots = [psutil.Process()]
        if self.root_pid:
            try:
                roots.append(psutil.Process(self.root_pid))
            except psutil.Error:
                pass
        seen = set()
        for root in roots:
            try:
                procs = ([root] if root.pid != os.getpid() else []) + root.children(recursive=True)
            except psutil.Error:
                continue
            for p in procs:
                if p.pid in seen:
                    continue
                seen.add(p.pid)
                kind = self._classify(p)
                mb = max(_status_kb(p.pid, "VmHWM"), _status_kb(p.pid, "VmRSS")) / 1024
                if kind is None or mb == 0:
                    continue
                if isinstance(kind, int):
                    self.ranks[kind] = max(self.ranks.get(kind, 0.0), mb)
                else:
                    self.others[kind] = max(self.others.get(kind, 0.0), mb)

    def _loop(self) -> None:
        while True:
            self._poll()
            if self._stop.wait(self.interval):
                self._poll()
                return

    def peak_mb(self) -> float:
        """The largest single process: the figure that decides whether a job fits a machine."""
        return max([self.self_mb] + list(self.ranks.values()) + list(self.others.values()))


class Stage:
    """Times a stage and records the machine's load meanwhile."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        gc.collect()
        self.load_before = os.getloadavg()[0]
        self.busy0, self.own0, self.t0 = _system_busy(), _own_cpu(), time.perf_counter()
        self.mem = MemoryWatch().__enter__()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        self.mem.__exit__()
        busy, own = _system_busy() - self.busy0, _own_cpu() - self.own0
        self.own_cores = own / self.wall if self.wall else 0.0
        self.other_cores = max(0.0, (busy - own) / self.wall) if self.wall else 0.0


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------

def make_corpus(rows: int):
    spec = importlib.util.spec_from_file_location("make_demo", os.path.join(REPO, "scripts", "make_demo.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.make_corpus(rows, seed=0)


def write_corpus(work: str, rows: int, files: int, row_group_rows: int) -> str:
    """A Parquet corpus of `rows` rows in `files` files of row groups of `row_group_rows`; reused if present."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = os.path.join(work, "data", f"rows-{rows}-files-{files}-rg-{row_group_rows}")
    if os.path.exists(os.path.join(path, "_DONE")):
        return path
    df = make_corpus(rows)
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    table = pa.Table.from_pandas(df, preserve_index=False)
    bounds = np.linspace(0, rows, files + 1).astype(int)
    for k in range(files):
        pq.write_table(table.slice(bounds[k], bounds[k + 1] - bounds[k]), os.path.join(tmp, f"part-{k:04d}.parquet"),
                       row_group_size=row_group_rows)
    open(os.path.join(tmp, "_DONE"), "w").close()
    shutil.rmtree(path, ignore_errors=True)
    os.rename(tmp, path)
    return path


def read_corpus(path: str):
    import pyarrow.dataset as ds

    t = ds.dataset(path, format="parquet").to_table(columns=["id", "text"]).sort_by("id")
    return t.column("id").to_numpy(), t.column("text").to_pylist()


# ------------------------------------------------------------------------------------------------
# (a) the bare loop
# ------------------------------------------------------------------------------------------------

def load_classifier(model_dir: str):
    import torch
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()


def bare_batches(tokenizer, texts: List[str], batch_size: int, max_length: int):
    """Pre-tokenized, length-sorted (longest first), padded batches: (row indices, tensors) each."""
    import numpy as np
    import torch

    ids = tokenizer(texts, truncation=True, max_length=max_length, return_attention_mask=False,
                    return_token_type_ids=False)["input_ids"]
    lengths = np.array([len(x) for x in ids])
    order = np.argsort(-lengths, kind="stable")
    pad = tokenizer.pad_token_id or 0
    batches, real, padded = [], 0, 0
    for i in range(0, len(order), batch_size):
        rows = order[i:i + batch_size]
        width = int(lengths[rows].max())
        input_ids = np.full((len(rows), width), pad, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for r, row in enumerate(rows):
            input_ids[r, :lengths[row]] = ids[row]
            mask[r, :lengths[row]] = 1
        batches.append((rows, {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}))
        real += int(lengths[rows].sum())
        padded += input_ids.size
    return batches, real / padded, int((lengths >= max_length).sum())


def bare_loop(model, batches, n_rows: int, autocast_bf16: bool = False):
    """(argmax labels in row order, forward seconds). A few batches first, untimed, to warm up."""
    import numpy as np
    import torch

    def forward(tensors):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16):
            return model(**tensors).logits.argmax(-1).numpy()

    for k in (0, len(batches) // 2, len(batches) - 1):
        forward(batches[k][1])
    labels = np.empty(n_rows, dtype=np.int64)
    t = time.perf_counter()
    for rows, tensors in batches:
        labels[rows] = forward(tensors)
    return labels, time.perf_counter() - t


# ------------------------------------------------------------------------------------------------
# (b) pipeline, (c) Spark
# ------------------------------------------------------------------------------------------------

def run_pipeline(model_dir: str, texts: List[str], batch_size: int, max_length: int, label2id: Dict[str, int]):
    import numpy as np
    from transformers import pipeline

    t = time.perf_counter()
    pipe = pipeline("text-classification", model=model_dir, tokenizer=model_dir, device="cpu",
                    batch_size=batch_size, truncation=True, max_length=max_length)
    load = time.perf_counter() - t
    t = time.perf_counter()
    out = pipe(texts)
    infer = time.perf_counter() - t
    return np.array([label2id[o["label"]] for o in out]), load, infer


def spark_session(cores: int):
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    return (SparkSession.builder.master(f"local[{cores}]").appName("hvd_infer-bench")
            .config("spark.ui.enabled", "false").config("spark.driver.bindAddress", "127.0.0.1")
            .config("spark.driver.host", "127.0.0.1").config("spark.driver.memory", "2g")
            .config("spark.sql.execution.arrow.pyspark.enabled", "true")
            .config("spark.python.worker.reuse", "true").config("spark.ui.showConsoleProgress", "false")
            .getOrCreate())


def run_spark(spark, data: str, out: str, model_dir: str, cores: int, batch_size: int, max_length: int):
    """predict_batch_udf the way its docs show it: the model loaded once per Python worker."""
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql.types import IntegerType

    threads = 1  # local[cores] runs `cores` tasks side by side: one thread each uses every core once

    def make_predict_fn():
        import numpy as np
        import torch
        import transformers
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        transformers.utils.logging.disable_progress_bar()
        torch.set_num_threads(threads)
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()

        def predict(texts: np.ndarray) -> np.ndarray:
            enc = tok(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            with torch.inference_mode():
                return model(**enc).logits.argmax(-1).numpy().astype(np.int32)

        return predict

    classify = predict_batch_udf(make_predict_fn, return_type=IntegerType(), batch_size=batch_size)
    df = spark.read.parquet(data)
    partitions = df.rdd.getNumPartitions()
    if partitions < cores:
        df = df.repartition(cores)
        partitions = cores
    t = time.perf_counter()
    df.select("id", classify("text").alias("label_id")).write.mode("overwrite").parquet(out)
    return time.perf_counter() - t, partitions


def read_labels(path: str, column: str, ids, mapping: Optional[Dict[str, int]] = None):
    """Labels from a Parquet output directory, in the order of `ids` (joined on id)."""
    import numpy as np
    import pyarrow.dataset as ds

    t = ds.dataset(path, format="parquet").to_table(columns=["id", column])
    got = dict(zip(t.column("id").to_pylist(), t.column(column).to_pylist()))
    vals = [got.get(int(i)) for i in ids]
    if mapping is not None:
        vals = [mapping.get(v, -1) if v is not None else -1 for v in vals]
    return np.array([-1 if v is None else v for v in vals])


# ------------------------------------------------------------------------------------------------
# (d) hvd_infer
# ------------------------------------------------------------------------------------------------

LAUNCHER_ARGS: List[str] = []  # e.g. ["--gloo"]: skips horovodrun's probe for MPI (--launcher-args)


def hvd_command(np_: int, model_dir: str, data: str, out: str, tracking_uri: Optional[str], run_name: str,
                extra: List[str]) -> List[str]:
    args = [os.path.join(VENV_BIN, "horovodrun"), "-np", str(np_), "-H", f"localhost:{np_}", *LAUNCHER_ARGS,
            sys.executable, "-m", "hvd_infer", "--config", "/dev/null", f"model.path={model_dir}",
            f"data.path={data}", "data.id_columns=[id]", f"output.path={out}", "output.mode=overwrite",
            "runtime.progress=false"]
    if tracking_uri:
        args += [f"mlflow.tracking_uri={tracking_uri}", "mlflow.experiment=hvd_infer-bench",
                 f"mlflow.run_name={run_name}"]
    else:
        args += ["mlflow.enabled=false"]
    return args + extra


def run_hvd(name: str, np_: int, model_dir: str, data: str, work: str, tracking_uri: Optional[str],
            extra: List[str], src: str, timeout: int = 1800, env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    out = os.path.join(work, "out", name)
    cmd = hvd_command(np_, model_dir, data, out, tracking_uri, name, extra)
    with Stage(name) as st:
        proc = subprocess.Popen(cmd, cwd=src, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=dict(os.environ, **(env or {})))
        st.mem.watch(proc.pid)
        try:
            text, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            text, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: hvd_infer exited {proc.returncode}:\n{text[-4000:]}")
    with open(os.path.join(out, "_manifest.json")) as f:
        summary = json.load(f)["summary"]
    return {"stage": st, "summary": summary, "out": out, "command": " ".join(cmd), "log": text}


def init_mlflow_store(uri: str) -> float:
    """Create the sqlite store (schema migrations) once, untimed: a real user's store already exists."""
    t = time.perf_counter()
    code = ("import logging, mlflow; logging.disable(logging.WARNING); from mlflow.tracking import MlflowClient; "
            f"MlflowClient({uri!r}).search_experiments()")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - t


def warm_page_cache() -> None:
    """Import what the ranks import once, untimed, so the first timed run does not pay cold disk reads."""
    code = "import deepspeed, mlflow, petastorm, horovod.torch, pyarrow.parquet, transformers"
    subprocess.run([sys.executable, "-c", code], capture_output=True, env=dict(os.environ, DS_ACCELERATOR="cpu"))


def wait_quiet(limit: float, threshold: float = 0.3, window: float = 5.0, windows: int = 3) -> float:
    """Wait (at most `limit` s) until other processes use < `threshold` cores for `windows` windows in a row.

    Returns the seconds waited; on a shared machine this keeps others' test runs out of the figures.
    """
    t0, calm = time.perf_counter(), 0
    while time.perf_counter() - t0 < limit:
        b0, o0 = _system_busy(), _own_cpu()
        time.sleep(window)
        other = ((_system_busy() - b0) - (_own_cpu() - o0)) / window
        calm = calm + 1 if other < threshold else 0
        if calm >= windows:
            break
        log(f"waiting for a quiet machine: others use {other:.2f} cores")
    return time.perf_counter() - t0


def time_command(cmd: List[str], env: Optional[Dict[str, str]] = None, repeat: int = 2) -> float:
    """Best-of-`repeat` wall seconds of a command (the minimum is the least noisy on a shared machine)."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run(cmd, capture_output=True, env=dict(os.environ, **(env or {})), cwd=REPO)
        best = min(best, time.perf_counter() - t)
    return best


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------

def source_state(src: str) -> Dict[str, Any]:
    """Which hvd_infer was measured: the commit, and whether hvd_infer/ had uncommitted edits."""
    def git(*a):
        r = subprocess.run(["git", "-C", src, *a], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    return {"path": src, "commit": git("rev-parse", "--short", "HEAD"),
            "uncommitted_changes": git("status", "--porcelain", "--", "hvd_infer") or ""}


def agreement(a, b) -> float:
    import numpy as np

    return float(np.mean(np.asarray(a) == np.asarray(b))) if len(a) else 1.0


def record(results: List[Dict[str, Any]], name: str, what: str, rows: int, seconds: float, st: Optional[Stage],
           **extra: Any) -> Dict[str, Any]:
    r = {"name": name, "what": what, "rows": rows, "seconds": round(seconds, 3),
         "rows_per_second": rows / seconds if seconds > 0 else 0.0}
    if st is not None:
        r.update(peak_rss_mb=round(st.mem.peak_mb(), 1), other_cores=round(st.other_cores, 2),
                 own_cores=round(st.own_cores, 2), load_average=round(st.load_before, 2))
        if st.mem.ranks:
            r["rank_peak_rss_mb"] = {str(k): round(v, 1) for k, v in sorted(st.mem.ranks.items())}
    r.update(extra)
    results.append(r)
    log(f"{name}: {rows} rows in {seconds:.2f} s = {r['rows_per_second']:.1f} rows/s"
        + (f" (other load {st.other_cores:.2f} cores)" if st is not None else ""))
    return r


def hvd_records(results, res: Dict[str, Any], name: str, np_: int, rows: int, what: str, **extra) -> None:
    s, st = res["summary"], res["stage"]
    ranks = s.get("ranks", [])
    stages = {k: round(s.get(f"{k}_seconds", 0.0) / max(1, len(ranks)), 3)
              for k in ("read", "tokenize", "forward", "write", "wait")}
    common = dict(np=np_, padding_efficiency=round(s["padding_efficiency"], 4),
                  data_wait_fraction=round(s["data_wait_fraction"], 4),
                  per_rank_stage_seconds=stages, load_seconds=round(s["load_seconds"], 2),
                  rank_total_seconds=round(s["wall_seconds"], 2), command=res["command"], **extra)
    record(results, name, f"{what}, end to end (wall clock of horovodrun)", rows, st.wall, st, **common)
    record(results, name + " steady", f"{what}, steady state (runner's loop)", s["rows"], s["seconds"], None,
           **common)


def rss_mode(args, model_dir: str, work: str, src: str) -> Dict[str, Any]:
    """Peak RSS per rank for a small and a large input: it should not grow with the input."""
    np_ = args.np or cpu_cores()
    out: Dict[str, Any] = {"np": np_, "runs": []}
    for rows in args.rss_rows:
        data = write_corpus(work, rows, args.files, args.row_group_rows)
        log(f"rss: hvd_infer -np {np_} on {rows} rows ...")
        res = run_hvd(f"rss-{rows}", np_, model_dir, data, work, None, [], src,
                      env=dict(kv.split("=", 1) for kv in args.hvd_env.split(",") if kv))
        st = res["stage"]
        run = {"rows": rows, "seconds": round(st.wall, 2), "rank_peak_rss_mb": {str(k): round(v, 1) for k, v in
                                                                               sorted(st.mem.ranks.items())},
               "horovodrun_peak_rss_mb": round(st.mem.others.get("horovodrun", 0.0), 1)}
        out["runs"].append(run)
        log(f"rss: {rows} rows: per-rank peak RSS {run['rank_peak_rss_mb']} MB ({st.wall:.1f} s)")
    if len(out["runs"]) >= 2:
        lo, hi = out["runs"][0], out["runs"][-1]
        out["ratio_largest_to_smallest"] = round(max(hi["rank_peak_rss_mb"].values()) /
                                                 max(lo["rank_peak_rss_mb"].values()), 3)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--model", default=os.path.join(REPO, "demo", "model"), help="a sequence classification model dir")
    p.add_argument("--skip", default="", help=f"comma list of stages to skip: {','.join(STAGES)}")
    p.add_argument("--quick", action="store_true", help="1,000 rows, no weights-bf16 prototype: a smoke run")
    p.add_argument("--json", default=os.path.join(REPO, "bench_out", "bench.json"))
    p.add_argument("--work", default=os.path.join(REPO, "bench_out"), help="corpus, outputs, MLflow store")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--row-group-rows", type=int, default=250)
    p.add_argument("--np", type=int, default=0, help="ranks for the full-machine hvd_infer runs (default: cores)")
    p.add_argument("--no-mlflow", action="store_true", help="hvd_infer with mlflow.enabled=false")
    p.add_argument("--hvd-src", default=REPO, help="run hvd_infer from this source tree (to A/B a change)")
    p.add_argument("--hvd-extra", default="", help="extra key=value overrides for every hvd_infer run, comma separated")
    p.add_argument("--hvd-env", default="", help="KEY=VALUE,... set for every hvd_infer run (e.g. HOROVOD_CYCLE_TIME=5)")
    p.add_argument("--bf16-rows", type=int, default=0,
                   help="rows for the bf16 stages (default: all, or a quarter on CPUs without native bf16)")
    p.add_argument("--launcher-args", default="", help="extra horovodrun arguments, space separated (e.g. --gloo)")
    p.add_argument("--breakdown", action="store_true", help="also time imports, the launcher, and hvd_infer "
                                                            "without DeepSpeed / MLflow: where start-up goes")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                   help="first wait up to SECONDS for other processes to leave the CPUs alone")
    p.add_argument("--rss", action="store_true", help="only measure peak RSS per rank for --rss-rows")
    p.add_argument("--rss-rows", default="1000,16000")
    args = p.parse_args(argv)
    args.rss_rows = [int(x) for x in args.rss_rows.split(",")]
    if args.quick and args.rows == 4000:
        args.rows = 1000
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.quick:
        skip.add("a-bf16w")
    unknown = skip - set(STAGES)
    if unknown:
        p.error(f"--skip: unknown stage(s) {', '.join(sorted(unknown))}; stages are {', '.join(STAGES)}")
    model_dir, work, src = os.path.abspath(args.model), os.path.abspath(args.work), os.path.abspath(args.hvd_src)
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        p.error(f"--model {model_dir} has no config.json; build the demo with .venv/bin/python scripts/make_demo.py")
    os.makedirs(work, exist_ok=True)
    cores = cpu_cores()
    np_full = args.np or cores
    hvd_extra = [x for x in args.hvd_extra.split(",") if x]
    LAUNCHER_ARGS[:] = args.launcher_args.split()
    hvd_env = dict(kv.split("=", 1) for kv in args.hvd_env.split(",") if kv)
    t_run = time.perf_counter()

    import torch
    from transformers import AutoConfig, AutoTokenizer

    torch.set_num_threads(cores)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.ao")  # quantize_dynamic's deprecation
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao")
    mach = machine()
    log(f"machine: {mach['cpu']}, {cores} cores, avx512_bf16={mach['avx512_bf16']}, amx_bf16={mach['amx_bf16']}, "
        f"torch {mach['torch']}, load average {mach['load_average_at_start'][0]:.2f}")
    if args.wait_quiet:
        mach["waited_for_quiet_seconds"] = round(wait_quiet(args.wait_quiet), 1)
    report: Dict[str, Any] = {"hvd_infer_source": source_state(src), "machine": mach, "args": {k: v for k, v in vars(args).items()}, "results": []}

    if args.rss:
        report["rss"] = rss_mode(args, model_dir, work, src)
        report["runtime_seconds"] = round(time.perf_counter() - t_run, 1)
        _write_json(args.json, report)
        return 0

    data = write_corpus(work, args.rows, args.files, args.row_group_rows)
    ids, texts = read_corpus(data)
    n = len(texts)
    label2id = {v: int(k) for k, v in AutoConfig.from_pretrained(model_dir).id2label.items()}
    report["data"] = {"path": data, "rows": n, "files": args.files, "row_group_rows": args.row_group_rows,
                      "max_length": args.max_length, "batch_size": args.batch_size}
    results: List[Dict[str, Any]] = report["results"]
    labels: Dict[str, Any] = {}

    # (a) the bare loop and its bf16 / int8 variants
    tok = AutoTokenizer.from_pretrained(model_dir)
    batches, pad_eff, truncated = bare_batches(tok, texts, args.batch_size, args.max_length)
    report["data"].update(bare_padding_efficiency=round(pad_eff, 4), truncated_rows=truncated)
    log(f"corpus: {n} rows in {data} ({truncated} truncated at {args.max_length} tokens); "
        f"bare-loop padding efficiency {pad_eff:.3f}")
    # Without AVX512-BF16/AMX, bf16 runs ~3x slower than float32: the bf16 stages then score a prefix
    # of the corpus (make_corpus is prefix-stable) against float32 on the same rows, to keep the run short.
    native_bf16 = mach["avx512_bf16"] or mach["amx_bf16"]
    bf16_rows = min(n, args.bf16_rows or (n if native_bf16 else max(1, n // 4)))
    report["data"]["bf16_rows"] = bf16_rows
    sub_batches = (bare_batches(tok, texts[:bf16_rows], args.batch_size, args.max_length)[0]
                   if bf16_rows < n and not {"a-bf16", "a-bf16w"} <= skip else None)
    variants = [("a", "bare loop, float32", {}),
                ("a-sub", f"bare loop, float32, first {bf16_rows} rows (reference for bf16)", {"sub": True}),
                ("a-bf16", "bare loop, bf16 autocast", {"autocast": True, "sub": True}),
                ("a-bf16w", "bare loop, weights cast to bf16", {"cast": True, "sub": True}),
                ("a-int8", "bare loop, dynamic int8 Linear", {"int8": True})]
    for name, what, how in variants:
        if name in skip or (name == "a-sub" and sub_batches is None):
            continue
        on_sub = how.get("sub") and sub_batches is not None
        rows = bf16_rows if on_sub else n
        model = load_classifier(model_dir)
        if how.get("cast"):
            model = model.to(torch.bfloat16)
        if how.get("int8"):
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        with Stage(name) as st:
            labels[name], secs = bare_loop(model, sub_batches if on_sub else batches, rows,
                                           autocast_bf16=how.get("autocast", False))
        ref = "a-sub" if on_sub and name != "a-sub" else "a"
        extra = {}
        if name not in ("a", ref) and ref in labels:
            extra["agreement_vs_" + ref] = agreement(labels[name], labels[ref][:rows])
        if on_sub and name != "a-sub" and ref in labels:
            extra["reference"] = ref
        if name == "a":
            extra["padding_efficiency"] = round(pad_eff, 4)
        record(results, name, what, rows, secs, st, **extra)
        del model

    # (b) transformers pipeline, model load included
    if "pipeline" not in skip:
        with Stage("pipeline") as st:
            labels["pipeline"], load, infer = run_pipeline(model_dir, texts, args.batch_size, args.max_length, label2id)
        extra = {"agreement_vs_a": agreement(labels["pipeline"], labels["a"])} if "a" in labels else {}
        record(results, "pipeline", "transformers pipeline, end to end (model load + inference)", n, load + infer,
               st, load_seconds=round(load, 2), **extra)
        record(results, "pipeline steady", "transformers pipeline, inference only", n, infer, None)
        gc.collect()

    # (c) Spark predict_batch_udf; session start-up excluded, workers' model load included
    if "spark" not in skip:
        t = time.perf_counter()
        spark = spark_session(cores)
        startup = time.perf_counter() - t
        try:
            out = os.path.join(work, "out", "spark")
            with Stage("spark") as st:
                secs, partitions = run_spark(spark, data, out, model_dir, cores, args.batch_size, args.max_length)
        finally:
            spark.stop()
        labels["spark"] = read_labels(out, "label_id", ids)
        extra = {"agreement_vs_a": agreement(labels["spark"], labels["a"])} if "a" in labels else {}
        record(results, "spark", f"Spark predict_batch_udf, local[{cores}], {partitions} partitions, write Parquet",
               n, secs, st, session_startup_seconds=round(startup, 2), **extra)

    # (d) hvd_infer under horovodrun
    tracking_uri = None if args.no_mlflow else f"sqlite:///{os.path.join(tempfile.mkdtemp(prefix='bench-mlflow-'), 'mlflow.db')}"
    if any(s.startswith("hvd") and s not in skip for s in STAGES):
        warm_page_cache()
        if tracking_uri:
            report["mlflow_store_init_seconds"] = round(init_mlflow_store(tracking_uri), 2)
        report["mlflow"] = tracking_uri or "disabled"
    hvd_runs = [("hvd-np1", 1, [], "hvd_infer np=1", n)] if np_full != 1 else []
    hvd_runs += [("hvd", np_full, [], f"hvd_infer np={np_full}", n),
                 ("hvd-bf16", np_full, ["model.dtype=bfloat16"], f"hvd_infer np={np_full} bf16", bf16_rows),
                 ("hvd-int8", np_full, ["model.quantize=int8"], f"hvd_infer np={np_full} int8", n)]
    for name, np_, extra_over, what, rows in hvd_runs:
        if name in skip:
            continue
        log(f"{name}: horovodrun -np {np_} on {rows} rows ...")
        run_data = data if rows == n else write_corpus(work, rows, args.files, args.row_group_rows)
        res = run_hvd(name, np_, model_dir, run_data, work, tracking_uri, hvd_extra + extra_over, src, env=hvd_env)
        labels[name] = read_labels(res["out"], "label", ids[:rows], label2id)
        extra = {}
        ref = "hvd" if name in ("hvd-bf16", "hvd-int8") else "a"
        if ref in labels and name != ref:
            extra[f"agreement_vs_{ref}"] = agreement(labels[name], labels[ref][:rows])
        if rows < n:
            extra["reference"] = "a-sub"
        hvd_records(results, res, name, np_, rows, what, **extra)

    # The bare loop again: on a shared machine the baseline is the better of the two.
    if "a" not in skip:
        model = load_classifier(model_dir)
        with Stage("a-again") as st:
            again, secs = bare_loop(model, batches, n)
        record(results, "a-again", "bare loop, float32, repeated after the others", n, secs, st,
               agreement_vs_a=agreement(again, labels["a"]))
        del model
    del batches

    if args.breakdown:
        report["breakdown"] = breakdown(model_dir, data, work, np_full, hvd_extra, src, n, hvd_env)

    report["baseline_rows_per_second"] = baseline(results)
    report["targets"] = targets(results, np_full)
    report["runtime_seconds"] = round(time.perf_counter() - t_run, 1)
    report["peak_rss_bench_process_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print_report(report)
    _write_json(args.json, report)
    return 0


def breakdown(model_dir: str, data: str, work: str, np_: int, hvd_extra: List[str], src: str, n: int,
              hvd_env: Dict[str, str]):
    """Start-up costs, each the best of two: imports, the launcher, DeepSpeed, MLflow."""
    py = sys.executable
    env = {"DS_ACCELERATOR": "cpu"}
    imp = lambda mods: time_command([py, "-c", f"import {mods}"], env)  # noqa: E731
    out = {"python_startup": time_command([py, "-c", "pass"]),
           "import_torch": imp("torch"),
           "import_transformers_model": imp("torch, transformers; from transformers import AutoModelForSequenceClassification"),
           "import_hvd_infer_runner": imp("hvd_infer.runner"),
           "import_horovod_torch": imp("horovod.torch"),
           "import_deepspeed": imp("deepspeed"),
           "import_mlflow": imp("mlflow"),
           "import_petastorm": imp("petastorm.reader"),
           f"horovodrun_np{np_}_python_pass": time_command([os.path.join(VENV_BIN, "horovodrun"), "-np", str(np_), "-H",
                                                           f"localhost:{np_}", py, "-c", "pass"])}
    out = {k: round(v, 2) for k, v in out.items()}
    uri = f"sqlite:///{os.path.join(tempfile.mkdtemp(prefix='bench-mlflow-'), 'mlflow.db')}"
    init_mlflow_store(uri)
    for name, over, u in [("hvd_no_deepspeed", ["model.deepspeed=false"], uri), ("hvd_no_mlflow", [], None),
                          ("hvd_no_deepspeed_no_mlflow", ["model.deepspeed=false"], None)]:
        log(f"breakdown: {name} ...")
        res = run_hvd(name, np_, model_dir, data, work, u, hvd_extra + over, src, env=hvd_env)
        s = res["summary"]
        out[name] = {"end_to_end_seconds": round(res["stage"].wall, 2), "rank_total_seconds": round(s["wall_seconds"], 2),
                     "load_seconds": round(s["load_seconds"], 2), "loop_seconds": round(s["seconds"], 2),
                     "end_to_end_rows_per_second": round(n / res["stage"].wall, 1),
                     "other_cores": round(res["stage"].other_cores, 2)}
    return out


def baseline(results: List[Dict[str, Any]]) -> Optional[float]:
    """(a): the best bare-loop float32 figure of the run (noise on a shared machine only slows things down)."""
    rates = [r["rows_per_second"] for r in results if r["name"] in ("a", "a-again")]
    return max(rates) if rates else None


def targets(results: List[Dict[str, Any]], np_full: int) -> List[Dict[str, Any]]:
    by = {r["name"]: r for r in results}
    base = baseline(results)
    rps = lambda k: base if k == "a" else (by[k]["rows_per_second"] if k in by else None)  # noqa: E731
    out = []

    def check(what, value, goal, higher=True):
        if value is None:
            return
        met = value >= goal if higher else value <= goal
        out.append({"target": what, "value": round(value, 3), "goal": goal, "at_least": higher, "met": bool(met)})

    def ratio(a, b):
        return rps(a) / rps(b) if rps(a) and rps(b) else None

    check(f"hvd_infer steady (np={np_full}) / bare loop", ratio("hvd steady", "a"), 1.0)
    check("hvd_infer end to end / bare loop", ratio("hvd", "a"), 0.7)
    check("hvd_infer end to end / Spark predict_batch_udf", ratio("hvd", "spark"), 3.0)
    check("hvd_infer end to end / pipeline end to end", ratio("hvd", "pipeline"), 1.7)
    if "hvd" in by:
        check("hvd_infer padding efficiency", by["hvd"]["padding_efficiency"], 0.9)
        check("hvd_infer data wait / forward", by["hvd"]["data_wait_fraction"], 0.05, higher=False)
    bf16_ref = "a-sub" if "a-sub" in by else "a"
    check("bare loop bf16 autocast / float32", ratio("a-bf16", bf16_ref), 2.5)
    check("bare loop bf16 weights / float32", ratio("a-bf16w", bf16_ref), 2.5)
    check("hvd_infer bf16 steady / bare loop float32", ratio("hvd-bf16 steady", bf16_ref), 2.5)
    for k in ("a-bf16", "a-bf16w", "hvd-bf16"):
        for key in ("agreement_vs_a", "agreement_vs_a-sub", "agreement_vs_hvd"):
            if k in by and key in by[k]:
                check(f"{k} label agreement", by[k][key], 0.99)
    check("bare loop int8 / float32", ratio("a-int8", "a"), 2.0)
    check("hvd_infer int8 steady / bare loop float32", ratio("hvd-int8 steady", "a"), 2.0)
    for k, key in (("a-int8", "agreement_vs_a"), ("hvd-int8", "agreement_vs_hvd")):
        if k in by and key in by[k]:
            check(f"{k} label agreement", by[k][key], 0.99)
    return out


def print_report(report: Dict[str, Any]) -> None:
    m, results = report["machine"], report["results"]
    base = baseline(results)
    sub_rate = next((r["rows_per_second"] for r in results if r["name"] == "a-sub"), None)
    print()
    print(f"machine: {m['cpu']}, {m['cores']} cores, avx512_bf16={'yes' if m['avx512_bf16'] else 'no'}, "
          f"amx_bf16={'yes' if m['amx_bf16'] else 'no'}, avx512_vnni={'yes' if m['avx512_vnni'] else 'no'}; "
          f"torch {m['torch']}, transformers {m['transformers']}")
    d = report["data"]
    print(f"data: {d['rows']} rows, {d['files']} files, row groups of {d['row_group_rows']}, max_length "
          f"{d['max_length']}, batch {d['batch_size']}; MLflow for hvd_infer: {report.get('mlflow', '-')}")
    head = f"{'name':<16} {'rows':>6} {'seconds':>8} {'rows/s':>8} {'vs (a)':>7} {'peak RSS MB':>12} {'other cores':>11}  notes"
    print(head)
    print("-" * len(head))
    for r in results:
        notes = []
        for k in ("agreement_vs_a", "agreement_vs_a-sub", "agreement_vs_hvd"):
            if k in r:
                notes.append(f"labels = {k[len('agreement_vs_'):]} {100 * r[k]:.2f}%")
        if r.get("reference") == "a-sub" and sub_rate and (r["name"].startswith("a-") or r["name"].endswith("steady")):
            notes.append(f"{r['rows_per_second'] / sub_rate:.2f}x float32 on the same rows")
        if r["name"] == "a":
            notes.append(f"padding {r['padding_efficiency']:.3f}")
        elif "padding_efficiency" in r and not r["name"].endswith("steady"):
            notes.append(f"padding {r['padding_efficiency']:.3f}, data wait {100 * r['data_wait_fraction']:.1f}%")
        if "rank_peak_rss_mb" in r:
            notes.append("per rank " + "/".join(f"{v:.0f}" for v in r["rank_peak_rss_mb"].values()) + " MB")
        if r["name"].endswith("steady") and "per_rank_stage_seconds" in r:
            s = r["per_rank_stage_seconds"]
            notes.append(f"per rank: read {s['read']:.2f} tok {s['tokenize']:.2f} fwd {s['forward']:.2f} "
                         f"write {s['write']:.2f} wait {s['wait']:.2f} s; load {r['load_seconds']:.1f} s")
        if "load_seconds" in r and r["name"] == "pipeline":
            notes.append(f"model load {r['load_seconds']:.1f} s")
        if "session_startup_seconds" in r:
            notes.append(f"session start-up {r['session_startup_seconds']:.1f} s excluded")
        ratio = f"{r['rows_per_second'] / base:.2f}x" if base else "-"
        rss = f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else ""
        other = f"{r['other_cores']:.2f}" if "other_cores" in r else ""
        print(f"{r['name']:<16} {r['rows']:>6} {r['seconds']:>8.2f} {r['rows_per_second']:>8.1f} {ratio:>7} "
              f"{rss:>12} {other:>11}  {'; '.join(notes)}")
    if report.get("breakdown"):
        print("\nstart-up breakdown (best of 2, seconds):")
        for k, v in report["breakdown"].items():
            print(f"  {k:<34} {v}")
    print("\ntargets:")
    for t in report["targets"]:
        cmp = ">=" if t["at_least"] else "<="
        print(f"  [{'met ' if t['met'] else 'MISS'}] {t['target']:<48} {t['value']:>7.3f} (goal {cmp} {t['goal']})")
    print(f"\nbench process peak RSS {report['peak_rss_bench_process_mb']:.0f} MB; "
          f"ran in {report['runtime_seconds']:.0f} s; load average now {os.getloadavg()[0]:.2f}")


def _write_json(path: str, report: Dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=str)
    log(f"results -> {path}")


if __name__ == "__main__":
    sys.exit(main())
