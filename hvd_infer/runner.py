"""One rank's share of a scoring job, top to bottom.

    import hvd_infer
    hvd_infer.run("conf/job.yaml", **{"data.batch_size": 64})        # this process = one rank

The same callable runs under every launcher hvd_infer.context knows (horovodrun, torchrun, Spark's, Databricks'
HorovodRunner); without one it is a world of one.
"""
from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
import warnings
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import pyarrow as pa

from hvd_infer.config import JobConfig, load_config

log = logging.getLogger("hvd_infer")


def run(config: Union[str, Dict[str, Any], JobConfig, None] = None, **overrides: Any) -> Dict[str, Any]:
    """Run this rank's share of the job; returns this rank's figures (rows, seconds, ...)."""
    t_start = time.perf_counter()
    cfg = config if isinstance(config, JobConfig) and not overrides else load_config(config, **overrides)
    from hvd_infer.context import idle_threads_sleep
    from hvd_infer.summary import user_environment

    environment = user_environment()  # before the defaults below are set

    idle_threads_sleep()  # before torch is imported
    quiet_libraries()

    # Heavy imports only once the config is known to be good.
    from hvd_infer.context import RankContext
    from hvd_infer.dataset import open_input
    from hvd_infer.engines import checked_spec
    from hvd_infer.hardware import this_platform
    from hvd_infer.model import preflight_model
    from hvd_infer.reader import choose_reader
    from hvd_infer.shard_plan import plan_parts
    from hvd_infer.tasks import get_task
    from hvd_infer.tracking import Tracker
    from hvd_infer.writer import job_identity, output_schema, prepare_output

    ctx = RankContext.create(cfg.runtime.threads, cfg.runtime.collective_timeout_s)
    try:
        checked_spec(cfg.model, this_platform(ctx.device.type))  # what this device cannot run: refused before reading

        # Input and output are checked once, by rank 0, and the verdict shared: every rank
        # fails the same way, or none does.
        task = get_task(cfg.model.task)(cfg)
        inp, state, error = None, None, None
        if ctx.is_main:
            try:
                choose_reader(cfg.data.reader)  # data.reader=petastorm where it cannot run: refused here
                inp = open_input(cfg.data)
                preflight_model(cfg, task)
                state = prepare_output(cfg, job_identity(cfg, inp.fingerprint()), output_schema(cfg, inp.schema, task))
            except Exception as e:
                error = e
        ctx.agree(error)
        inp, state = ctx.broadcast_object((inp, state))
        parts = plan_parts(inp.row_groups, ctx.rank, ctx.size, cfg.output.rows_per_part, state.done)

        tracker = Tracker(cfg, ctx)
        # Rank 0 creates the MLflow run while the other ranks load their model; _score shares it.
        tracker.start({"world_size": ctx.size, "input_files": len(inp.files), "input_rows": inp.total_rows,
                       "input_fingerprint": inp.fingerprint(), "resumed_rows": sum(b - a for a, b in state.done),
                       **{f"env.{name}": value for name, value in environment.items()}})
        try:
            return _score(cfg, ctx, inp, parts, state, task, tracker, t_start, environment)
        except BaseException as e:
            tracker.fail(e)
            raise
    finally:
        ctx.shutdown()


def _score(cfg: JobConfig, ctx, inp, parts, state, task, tracker, t_start: float,
           environment: Dict[str, str]) -> Dict[str, Any]:
    from hvd_infer.batcher import batch_limits, dedup_off
    from hvd_infer.evaluation import Evaluation
    from hvd_infer.hardware import cpu_cores
    from hvd_infer.loader import BatchLoader, resolve_workers
    from hvd_infer.precision import load_checked_model
    from hvd_infer.reader import choose_reader
    from hvd_infer.summary import RankFigures
    from hvd_infer.watchdog import COLLECTIVE, Watchdog
    from hvd_infer.writer import output_schema

    t = time.perf_counter()
    error, model = tracker.error, None  # rank 0 could not start the MLflow run: no use loading the model
    if error is None:
        try:
            # model.dtype=auto-check measured first (or the resumed output's precision kept)
            model, tokenizer, facts = load_checked_model(cfg, task, ctx, inp, state.precision)
        except Exception as e:
            error = e
    ctx.agree(error)
    load_seconds = time.perf_counter() - t
    tracker.share()
    off = dedup_off(cfg.data, task)
    facts["dedup"] = "on" if off is None else f"off: {off}"
    facts["reader"] = choose_reader(cfg.data.reader).describe()
    fig = RankFigures(rank=ctx.rank, host=os.uname().nodename, device=str(ctx.device), threads=ctx.threads,
                      load_seconds=load_seconds)

    schema = output_schema(cfg, inp.schema, task)
    d = cfg.data
    columns = list(dict.fromkeys([d.text_column] + ([d.text_pair_column] if d.text_pair_column else []) + d.id_columns
                                 + ([d.label_column] if d.label_column else [])))
    evaluation = Evaluation(task) if cfg.data.label_column else None
    bar = _progress(cfg, ctx, sum(p.rows for p in parts))
    batch_rows, max_tokens = batch_limits(cfg.data, cfg.model.task, model.config, ctx.device, task.max_length,
                                          next(model.module.parameters()).element_size())
    fig.workers = resolve_workers(cfg.data.workers, ctx.device.type, cpu_cores(), ctx.local_size)
    fig.max_tokens_per_batch = max_tokens

    t_loop = time.perf_counter()
    # Workers fork here, before the writer thread exists.
    loader = BatchLoader(inp, parts, columns, task, cfg.data, batch_rows, max_tokens, fig.workers,
                         pin_memory=ctx.device.type == "cuda")
    writer = _PartWriter(cfg, ctx.rank, state.job, schema, evaluation, tracker, fig)
    watch = Watchdog(cfg, ctx.rank, fig, loader, tracker)
    try:
        _score_share(ctx, task, model, loader, writer, watch, tracker, fig, bar)
        fig.seconds = time.perf_counter() - t_loop
        fig.wait_seconds = loader.wait_seconds
        fig.rescored = getattr(model, "rescored", 0)
        fig.total_seconds = time.perf_counter() - t_start
        watch.share_done()
        with watch.stage(COLLECTIVE, "the other ranks to finish their shares (the gather of every rank's figures)"):
            figures = ctx.allgather_object(fig)  # also the barrier: every rank has finished writing
            confusion = ctx.allgather_object(evaluation.counts if evaluation else None)
        if ctx.is_main:
            commit = "the Delta commit, " if cfg.output.format == "delta" else ""
            with watch.stage("writing", f"{commit}the manifest, _SUCCESS and the MLflow run's last records"):
                _finish_job(cfg, ctx, inp, state, schema, figures, facts, environment, confusion, evaluation, tracker)
        with watch.stage(COLLECTIVE, "rank 0 to write _SUCCESS (the job's last barrier)"):
            ctx.barrier()  # _SUCCESS exists before any rank returns
    finally:
        watch.stop()
    return fig.as_dict()


def _score_share(ctx, task, model, loader, writer, watch, tracker, fig, bar) -> None:
    """This rank's parts: batches from the loader through the model to the writer, every part written."""
    from hvd_infer.batcher import rows_from_windows
    from hvd_infer.context import release_free_memory

    scored: Dict[int, Tuple[List[Dict[str, Any]], List[np.ndarray]]] = {}  # by part start: outputs, their rows
    # model.long_texts=chunk, by loader unit: outputs of the windows of the sort window being scored, their windows
    windows: Dict[int, Tuple[List[Dict[str, Any]], List[np.ndarray]]] = {}
    try:
        for batch in loader:
            writer.raise_if_failed()
            outputs, rows = scored.setdefault(batch.part.start, ([], []))
            if len(batch.rows):
                tf = time.perf_counter()
                # What it waits for is worded only when the watchdog fires: not on every batch.
                with watch.stage("the model", lambda b=batch: f"its forward pass on a batch of {len(b.rows)} rows, "
                                                              f"{b.padded_tokens} tokens with padding"):
                    out = task.predict(model, batch.tensors)
                fig.forward_seconds += time.perf_counter() - tf
                # With chunk, windows wait apart until their sort window's rows are whole.
                outs, units = windows.setdefault(batch.unit_start, ([], [])) if task.chunk else (outputs, rows)
                outs.append(out)
                units.append(batch.rows)
                fig.real_tokens += batch.real_tokens
                fig.padded_tokens += batch.padded_tokens
                fig.largest_batch_tokens = max(fig.largest_batch_tokens, batch.padded_tokens)
                fig.batches += 1
                fig.repeats += batch.repeats
                tracker.step(batch.row_count, batch.real_tokens, batch.padded_tokens, loader.wait_seconds)
                if ctx.device.type == "cpu" and fig.batches % 64 == 0:
                    release_free_memory()
                if bar is not None:
                    bar.update(batch.row_count)
            if batch.whole_rows is not None:  # chunk: a sort window's rows, assembled from its windows
                outputs.append(rows_from_windows(task, *windows.pop(batch.unit_start), batch.window_row))
                rows.append(batch.whole_rows)
            fig.read_seconds += batch.read_seconds
            fig.tokenize_seconds += batch.tokenize_seconds
            if batch.finished is not None:
                with watch.stage("writing", writer.busy_with):
                    writer.put(batch.finished, *scored.pop(batch.part.start))
        with watch.stage("writing", writer.busy_with):
            writer.finish()
    except Exception as e:
        named = loader.explain(e)
        if named is None:
            raise
        raise named from None
    finally:
        loader.close()
        writer.close()
        tracker.stop_live()
        if bar is not None:
            bar.close()


def _finish_job(cfg: JobConfig, ctx, inp, state, schema, figures, facts, environment, confusion, evaluation,
                tracker) -> None:
    """Rank 0, once every rank has written its share: the summary, a Delta job's commit, the manifest and _SUCCESS,
    MLflow's last records."""
    from hvd_infer.evaluation import Evaluation
    from hvd_infer.summary import report
    from hvd_infer.writer import commit_table, finish_output, write_empty_part

    if inp.total_rows == 0:
        write_empty_part(cfg, schema, state.job)
    metrics, text, summary = report(cfg, ctx, figures, facts, environment)
    eval_metrics, eval_text, eval_figs = (Evaluation.report(confusion) if evaluation else ({}, "", {}))
    metrics.update(eval_metrics)
    summary.update(eval_metrics)
    predictions = cfg.output.path
    if cfg.output.format == "delta":
        version = commit_table(cfg, state, schema)
        summary["delta_table"] = {"path": cfg.output.path, "version": version, "job": state.job}
        predictions = f"{cfg.output.path} (Delta table, version {version})"
    manifest = finish_output(cfg, summary, state.job)
    tracker.finish(metrics, {"resolved." + k: v for k, v in facts.items()}, [manifest], eval_figs, state.job)
    print(text + eval_text, flush=True)
    print(f"predictions: {predictions}\nmanifest:    {manifest}", flush=True)
    if tracker.enabled:
        print(f"MLflow:      {tracker.run_url()}", flush=True)
        if cfg.mlflow.tracking_uri.startswith("sqlite"):
            print(f"             view it: mlflow ui --backend-store-uri {cfg.mlflow.tracking_uri} --host 127.0.0.1",
                  flush=True)


class _PartWriter:
    """A thread beside the model loop: a scored part becomes a table in input order, a Parquet part
    (writer.write_part) and an MLflow artifact. At most two parts wait; a failed write fails the job
    at the model loop's next batch."""

    def __init__(self, cfg: JobConfig, rank: int, job: str, schema: pa.Schema, evaluation, tracker, fig):
        self.cfg, self.rank, self.job, self.schema, self.evaluation, self.tracker, self.fig = (
            cfg, rank, job, schema, evaluation, tracker, fig)
        self.queue: "queue.Queue" = queue.Queue(maxsize=2)
        self.error: Optional[BaseException] = None
        self.writing = None  # the Part being written now
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="hvd_infer-writer", daemon=True)
        self.thread.start()

    def put(self, work, outputs: List[Dict[str, Any]], rows: List[np.ndarray]) -> None:
        while True:
            self.raise_if_failed()
            try:
                self.queue.put((work, outputs, rows), timeout=0.2)
                return
            except queue.Full:
                continue

    def busy_with(self) -> str:
        """What the model loop waits for when it waits on this thread (for the watchdog)."""
        part = self.writing
        if part is None:
            return "the writer thread (between parts)"
        return f"the writer thread to write the part of input rows {part.start}-{part.stop}"

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def finish(self) -> None:
        """Wait until every part handed over is written."""
        self.put(None, [], [])
        self.thread.join()
        self.raise_if_failed()

    def close(self) -> None:
        """Stop after the part being written (which is whole or absent, never half)."""
        self._stop.set()
        self.thread.join(timeout=60)

    def _run(self) -> None:
        from hvd_infer.writer import write_part

        fig, cfg = self.fig, self.cfg
        while not self._stop.is_set():
            try:
                work, outputs, rows = self.queue.get(timeout=0.2)
            except queue.Empty:
                continue
            if work is None:
                return
            try:
                t = time.perf_counter()
                self.writing = work.part
                table = _part_table(work, outputs, rows, self.schema, cfg.data.id_columns)
                if self.evaluation is not None:
                    self.evaluation.add(work.columns[cfg.data.label_column], table)
                rec = write_part(cfg, self.rank, work.part, table, work.truncated, work.skipped, self.job)
                self.tracker.log_rank_files([os.path.join(cfg.output.path, rec.name)])
                fig.write_seconds += time.perf_counter() - t
                fig.rows += rec.rows
                fig.parts += 1
                fig.truncated += work.truncated
                fig.chunked += work.chunked
                fig.chunk_windows += work.chunk_windows
                fig.skipped += len(work.skipped)
                self.writing = None
            except BaseException as e:  # raised by the model loop
                self.error = e
                return


def _part_table(work, outputs, rows_in_part, schema: pa.Schema, id_columns: List[str]) -> pa.Table:
    """Predictions back in input order, ids first, typed as the output schema says."""
    from hvd_infer.batcher import in_input_order

    arrays = in_input_order(outputs, rows_in_part, work.source)
    cols = [pa.array(work.columns[f.name], type=f.type, from_pandas=True) if f.name in id_columns
            else arrays[f.name].cast(f.type) if arrays else pa.array([], type=f.type) for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


def _progress(cfg: JobConfig, ctx, rows: int):
    if not (ctx.is_main and cfg.runtime.progress):
        return None
    from tqdm import tqdm

    shared = dict(total=rows, unit="rows", desc=f"rank 0/{ctx.size}")
    if sys.stderr.isatty():
        return tqdm(**shared, dynamic_ncols=True, mininterval=1.0)
    # Under horovodrun, Spark or a scheduler stderr is a pipe read line by line, where a bar redrawn with
    # carriage returns becomes one endless line: print a line every 10 s instead.
    return tqdm(**shared, file=_LineWriter(sys.stderr), ncols=100, mininterval=10.0, maxinterval=10.0)


class _LineWriter:
    """A file for tqdm that turns each redraw into one plain line."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s: str) -> None:
        s = s.replace("\r", "").replace("\x1b[A", "").strip()
        if s:
            self.stream.write(s + "\n")

    def flush(self) -> None:
        self.stream.flush()


def quiet_libraries() -> None:
    # MLFLOW_DISABLE_TELEMETRY: no usage records sent to MLflow's makers unless the user sets it to false.
    for name, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"),
                        ("TRANSFORMERS_VERBOSITY", "error"), ("MLFLOW_LOGGING_LEVEL", "WARNING"),
                        ("MLFLOW_DISABLE_TELEMETRY", "true")):
        os.environ.setdefault(name, value)
    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Petastorm 0.13 on pyarrow 14 warns about its own legacy calls at every read.
    for module in ("petastorm", "pyarrow"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    for name in ("DeepSpeed", "deepspeed", "petastorm", "py4j", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)
