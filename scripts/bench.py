#!/usr/bin/env python
"""Benchmark hvd_infer against the bare loop, transformers' pipeline and Spark's predict_batch_udf.

    .venv/bin/python scripts/bench.py                      # 4,000 rows, the demo model (make bench)
    .venv/bin/python scripts/bench.py --rows 2000 --skip spark,pipeline
    .venv/bin/python scripts/bench.py --quick              # 1,000 rows, a smoke run
    .venv/bin/python scripts/bench.py --breakdown          # also: where hvd_infer's start-up goes
    .venv/bin/python scripts/bench.py --rss                # only: peak RSS per rank, 1k vs 16k rows
    .venv/bin/python scripts/bench.py --hvd-src /tmp/copy --launcher-args=--gloo   # A/B a changed hvd_infer
    .venv/bin/python scripts/bench.py --model /work/docs12/model --corpus /work/docs12/data/test   # real text

One run, one corpus (scripts/make_demo.py's make_corpus, or with --corpus DIR the first --rows rows by id
of DIR's Parquet files, e.g. scripts/make_docs_model.py's real text; written as several Parquet files and
row groups), one model (the demo's fine-tuned classifier, or --model DIR) and the same cores for every
contender:

  a        the bare loop: one process, all cores, pre-tokenized length-sorted batches, plain
           transformers forward under inference_mode; the limit (the better of a run at the start
           and one at the end, a-again). a-bf16 (autocast), a-bf16w (weights cast to bf16) and
           a-int8 (model.quantize=int8-per-channel's dynamic int8 Linear) are the same loop. On a CPU without AVX512-BF16/AMX the
           bf16 stages (and hvd-bf16) score the first quarter of the corpus and are compared with
           float32 on the same rows (a-sub); --bf16-rows N overrides.
  b        transformers pipeline("text-classification"), in this process, model load included.
  c        Spark predict_batch_udf on local[cores] (session start-up excluded, workers' model load
           included), writing Parquet.
  d        hvd_infer under horovodrun as a subprocess: end to end is the wall clock of the command,
           steady state the runner's own rows/s from the output's _manifest.json.
  a-ort, a-ort-int8, a-compile
           the bare loop on other float32 engines (and one int8): the graph model.runtime=onnxruntime runs
           (exported once, ONNX Runtime's BERT fusions), that graph with ONNX Runtime's own dynamic int8
           (model.quantize=int8-per-channel's), and torch.compile (inductor, dynamic shapes). Their
           setup (export, quantization, compilation on the warm-up batches) is recorded apart from the loop.
  hvd-whole hvd_infer with model.trim_last_layer=false model.onednn=false: float32 without the rewrites: the
           whole last layer on torch's own Linear (the float32 the faster engines' target is
           measured against); hvd-aten the last layer trimmed, on torch's own Linear (model.onednn=false).
  hvd-int8 hvd_infer with model.quantize=int8-per-channel (torch's dynamic int8); hvd-int8-rescore the same with
           model.rescore_margin=0.2 (RESCORE_MARGIN), hvd-ort-rescore ONNX Runtime's int8 with it.
  hvd-ort  hvd_infer with model.runtime=onnxruntime: end to end and steady, labels against (a);
           hvd-ort-int8 the same with model.quantize=int8-per-channel, hvd-ort-blockwise with
           model.quantize=int8-blockwise (ONNX Runtime's MatMulNBits, activations quantized per row and block).
  hvd-auto hvd_infer with model.dtype=auto-check (--check-rows rows checked): the precision it chose,
           the check's seconds (inside end to end) and each candidate's timing and agreement (or the
           line saying the check was skipped: an input too small for it to pay, see docs/speed.md).
  dedup    hvd_infer (all cores) on --dedup-rows rows of which 30% repeat one of the 100 rows before
           them, with data.dedup=false and then true (the default): the rows/s ratio is the gain.

hvd_infer runs log to a temporary sqlite MLflow store (created before the timed runs, as a real
user's store would be), output.mode=overwrite, runtime.progress=false. Results are printed and
written as JSON (--json, default bench_out/bench.json). The machine is assumed shared: every stage
records the CPU other processes used meanwhile ("other cores"), so a noisy figure shows as one.
Never part of the test suite. Each contender is a module of scripts/benchmarks/; this file runs
them in order on the same corpus and cores, and prints the table.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse
import gc
import resource
import shutil
import sys
import tempfile
import time
import warnings
from typing import Any, Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # scripts/benchmarks/

from benchmarks import REPO  # noqa: E402
from benchmarks.bare_loop import bare_batches, bare_loop, load_classifier  # noqa: E402
from benchmarks.corpus import corpus_size, read_corpus, read_labels, write_corpus  # noqa: E402
from benchmarks.hvd_infer_job import LAUNCHER_ARGS, VENV_BIN, init_mlflow_store, run_hvd, warm_page_cache  # noqa: E402
from benchmarks.measure import Stage, log, machine, time_command, wait_quiet  # noqa: E402
from benchmarks.pipeline import run_pipeline  # noqa: E402
from benchmarks.report import (agreement, baseline, hvd_records, print_report, record, source_state,  # noqa: E402
                               targets, write_json)
from benchmarks.spark_udf import run_spark, spark_session  # noqa: E402
from hvd_infer.hardware import cpu_cores  # noqa: E402
from hvd_infer.decisions import decisions_dir  # noqa: E402

STAGES = ["a", "a-sub", "a-bf16", "a-bf16w", "a-int8", "a-ort", "a-ort-int8", "a-compile", "pipeline", "spark",
          "hvd-np1", "hvd", "hvd-whole", "hvd-aten", "hvd-int8", "hvd-int8-rescore", "hvd-ort", "hvd-ort-int8",
          "hvd-ort-rescore", "hvd-ort-blockwise", "hvd-bf16", "hvd-auto", "dedup"]
# The rescoring stages' model.rescore_margin (auto-check measures its own on the job's rows).
RESCORE_MARGIN = 0.2
DEDUP_REPEATS = 0.3  # the fraction of repeated rows in the dedup stage's corpus


def auto_check(job_log: str) -> Dict[str, Any]:
    """The precision model.dtype=auto-check chose and what the check cost, from the job's summary line."""
    import re

    m = re.search(r"model\.dtype=auto-check on (\d+) rows chose (\S+) \(check took ([\d.]+) s(?:, ([\d.]+) s of it "
                  r"loading)?\): (.*)", job_log)
    if not m:  # too small an input for the check to pay: skipped, and the job ran float32
        skipped = re.search(r"model\.dtype=auto-check skipped: .*; running (\S+)", job_log)
        return {"auto_check_choice": skipped.group(1), "auto_check_rows": 0, "auto_check_seconds": 0.0,
                "auto_check": skipped.group(0).strip()} if skipped else {}
    return {"auto_check_choice": m.group(2), "auto_check_rows": int(m.group(1)),
            "auto_check_seconds": float(m.group(3)), "auto_check_load_seconds": float(m.group(4) or 0),
            "auto_check": m.group(0).strip()}


def rss_mode(args, model_dir: str, work: str, src: str) -> Dict[str, Any]:
    """Peak RSS per rank for a small and a large input: it should not grow with the input."""
    np_ = args.np or cpu_cores()
    out: Dict[str, Any] = {"np": np_, "runs": []}
    for rows in args.rss_rows:
        data = write_corpus(work, rows, args.files, args.row_group_rows, source=args.corpus)
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
    p.add_argument("--corpus", help="a Parquet dataset (columns id, text) whose first --rows rows by id every stage "
                                    "scores, instead of make_demo's generated corpus")
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
    p.add_argument("--check-rows", type=int, default=512, help="model.check_rows of the hvd-auto stage "
                                                                   "(model.dtype=auto-check; 512 is the default)")
    p.add_argument("--dedup-rows", type=int, default=2000, help="rows of the dedup stage's corpus (30%% repeated)")
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
    if args.corpus:
        args.corpus = os.path.abspath(args.corpus)
        try:
            corpus_rows = corpus_size(args.corpus)
        except ValueError as e:
            p.error(f"--corpus {e}")
        if corpus_rows < max([args.rows] + (args.rss_rows if args.rss else [])):
            p.error(f"--corpus {args.corpus} has {corpus_rows} rows; --rows{' and --rss-rows' if args.rss else ''} must not ask for more")
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
    from hvd_infer.hardware import CPU_FLAGS
    from hvd_infer.engines.torch_eager import quantize_int8

    log(f"machine: {mach['cpu']}, {cores} cores, CPU flags: "
        + ", ".join(f"{flag}={'yes' if mach[flag] else 'no'}" for flag in CPU_FLAGS)
        + f", torch {mach['torch']} ({mach['torch_cpu_capability']}), load average {mach['load_average_at_start'][0]:.2f}")
    if args.wait_quiet:
        mach["waited_for_quiet_seconds"] = round(wait_quiet(args.wait_quiet), 1)
    report: Dict[str, Any] = {"hvd_infer_source": source_state(src), "machine": mach, "args": {k: v for k, v in vars(args).items()}, "results": []}

    if args.rss:
        report["rss"] = rss_mode(args, model_dir, work, src)
        report["runtime_seconds"] = round(time.perf_counter() - t_run, 1)
        write_json(args.json, report)
        return 0

    data = write_corpus(work, args.rows, args.files, args.row_group_rows, source=args.corpus)
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
                ("a-int8", "bare loop, dynamic int8 Linear per channel, head in float32", {"int8": True})]
    for name, what, how in variants:
        if name in skip or (name == "a-sub" and sub_batches is None):
            continue
        on_sub = how.get("sub") and sub_batches is not None
        rows = bf16_rows if on_sub else n
        model = load_classifier(model_dir)
        if how.get("cast"):
            model = model.to(torch.bfloat16)
        if how.get("int8"):
            model = quantize_int8(model)
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

    # (a) on other engines: ONNX Runtime float32 and int8, torch.compile
    for name, what in [("a-ort", "bare loop, ONNX Runtime float32 (model.runtime=onnxruntime's graph)"),
                       ("a-ort-int8", "bare loop, ONNX Runtime dynamic int8 per-channel, head in float32"),
                       ("a-compile", "bare loop, torch.compile (inductor, dynamic shapes) float32")]:
        if name in skip:
            continue
        with Stage(name) as st:
            t = time.perf_counter()
            model = other_engine(name, model_dir, tok, batches)
            setup = time.perf_counter() - t
            labels[name], secs = bare_loop(model, batches, n)
        extra = {"agreement_vs_a": agreement(labels[name], labels["a"])} if "a" in labels else {}
        record(results, name, what, n, secs, st, setup_seconds=round(setup, 2), **extra)
        del model
        gc.collect()

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
    if any((s.startswith("hvd") or s == "dedup") and s not in skip for s in STAGES):
        warm_page_cache()
        if tracking_uri:
            report["mlflow_store_init_seconds"] = round(init_mlflow_store(tracking_uri), 2)
        report["mlflow"] = tracking_uri or "disabled"
    hvd_runs = [("hvd-np1", 1, [], "hvd_infer np=1", n)] if np_full != 1 else []
    hvd_runs += [("hvd", np_full, [], f"hvd_infer np={np_full}", n),
                 ("hvd-whole", np_full, ["model.trim_last_layer=false", "model.onednn=false"],
                  f"hvd_infer np={np_full} model.trim_last_layer=false model.onednn=false", n),
                 ("hvd-aten", np_full, ["model.onednn=false"], f"hvd_infer np={np_full} model.onednn=false", n),
                 ("hvd-int8", np_full, ["model.quantize=int8-per-channel"],
                  f"hvd_infer np={np_full} int8-per-channel (torch)", n),
                 ("hvd-int8-rescore", np_full, ["model.quantize=int8-per-channel",
                                                f"model.rescore_margin={RESCORE_MARGIN}"],
                  f"hvd_infer np={np_full} int8-per-channel (torch), rescore_margin={RESCORE_MARGIN}", n),
                 ("hvd-ort", np_full, ["model.runtime=onnxruntime"], f"hvd_infer np={np_full} model.runtime=onnxruntime", n),
                 ("hvd-ort-int8", np_full, ["model.runtime=onnxruntime", "model.quantize=int8-per-channel"],
                  f"hvd_infer np={np_full} model.runtime=onnxruntime int8-per-channel", n),
                 ("hvd-ort-rescore", np_full, ["model.runtime=onnxruntime", "model.quantize=int8-per-channel",
                                               f"model.rescore_margin={RESCORE_MARGIN}"],
                  f"hvd_infer np={np_full} model.runtime=onnxruntime int8-per-channel, rescore_margin={RESCORE_MARGIN}", n),
                 ("hvd-ort-blockwise", np_full, ["model.runtime=onnxruntime", "model.quantize=int8-blockwise"],
                  f"hvd_infer np={np_full} model.runtime=onnxruntime int8-blockwise", n),
                 ("hvd-bf16", np_full, ["model.dtype=bfloat16"], f"hvd_infer np={np_full} bf16", bf16_rows),
                 ("hvd-auto", np_full, ["model.dtype=auto-check", f"model.check_rows={args.check_rows}"],
                  f"hvd_infer np={np_full} model.dtype=auto-check", n)]
    for name, np_, extra_over, what, rows in hvd_runs:
        if name in skip:
            continue
        log(f"{name}: horovodrun -np {np_} on {rows} rows ...")
        run_data = data if rows == n else write_corpus(work, rows, args.files, args.row_group_rows, source=args.corpus)
        if name == "hvd-auto":  # measured as a host's first auto-check job: no decision an earlier run kept
            shutil.rmtree(decisions_dir(), ignore_errors=True)
        # data.dedup=false: the bare loop scores every row, so hvd_infer does too (the corpus repeats ~2.5% of
        # its texts); the dedup stage measures what dedup gains.
        res = run_hvd(name, np_, model_dir, run_data, work, tracking_uri,
                      hvd_extra + ["data.dedup=false"] + extra_over, src, env=hvd_env)
        labels[name] = read_labels(res["out"], "label", ids[:rows], label2id)
        extra = {}
        ref = "hvd" if name == "hvd-bf16" else "a"  # hvd-ort: against the bare float32 loop
        if ref in labels and name != ref:
            extra[f"agreement_vs_{ref}"] = agreement(labels[name], labels[ref][:rows])
        if rows < n:
            extra["reference"] = "a-sub"
        if name == "hvd-auto":
            extra.update(auto_check(res["log"]))
            log(f"hvd-auto: {extra.get('auto_check', 'no auto-check line in the job output')}")
        hvd_records(results, res, name, np_, rows, what, **extra)

    # (e) data.dedup: the same job with it off, then on, on a corpus where 30% of the rows repeat
    if "dedup" not in skip:
        rows = min(n, args.dedup_rows)
        dup_data = write_corpus(work, rows, args.files, args.row_group_rows, repeats=DEDUP_REPEATS,
                                source=args.corpus)
        for name, on in (("hvd-dedup-off", "false"), ("hvd-dedup", "true")):
            log(f"{name}: horovodrun -np {np_full} on {rows} rows, {100 * DEDUP_REPEATS:.0f}% repeated ...")
            res = run_hvd(name, np_full, model_dir, dup_data, work, tracking_uri,
                          hvd_extra + [f"data.dedup={on}"], src, env=hvd_env)
            hvd_records(results, res, name, np_full, rows,
                        f"hvd_infer np={np_full}, {100 * DEDUP_REPEATS:.0f}% repeated rows, data.dedup={on}",
                        dedup_saved_rows=res["summary"].get("dedup_saved_rows", 0))

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
    write_json(args.json, report)
    return 0


def other_engine(name: str, model_dir: str, tokenizer, batches):
    """The classifier on another engine, set up: exported (and quantized), or compiled on three batches.

    a-ort and a-ort-int8 use hvd_infer's own export (the host's cached graph, as model.runtime=onnxruntime
    runs it, the int8 one with model.quantize=int8-per-channel).
    """
    import torch

    from hvd_infer.engines.ort import OnnxPredictor

    model = load_classifier(model_dir)
    if name == "a-compile":
        compiled = torch.compile(model, dynamic=True)
        with torch.inference_mode():
            for k in (0, len(batches) // 2, len(batches) - 1):  # compiled here, not in the timed loop
                compiled(**batches[k][1])
        return compiled
    quantize = "int8-per-channel" if name == "a-ort-int8" else "none"
    return OnnxPredictor.create(model, tokenizer, model_dir, "text-classification", quantize)


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


if __name__ == "__main__":
    sys.exit(main())
