"""The same job on Spark: as ranks in Spark tasks (Horovod or torch.distributed), or as a column of a DataFrame.

    from hvd_infer.spark import run_on_spark, predict_udf

    # One Horovod rank per Spark task; writes output.path exactly as horovodrun does.
    summaries = run_on_spark("conf/job.yaml", num_proc=4, **{"output.mode": "overwrite"})
    # The same ranks on torch.distributed, started by Spark's TorchDistributor (torchrun).
    summaries = run_on_spark("conf/job.yaml", num_proc=4, launcher="torch")

    # Predictions as a struct column (task.output_fields(): label, score, probs, ...).
    scored = spark.read.parquet("/data/x").withColumn("pred", predict_udf("conf/job.yaml")("text"))

On Databricks ML runtimes (<= 15.4 LTS) `HorovodRunner(np=4).run(hvd_infer.run, config=...)`
is the same call as run_on_spark; on later ML runtimes, without Horovod, launcher="torch" is.
See scripts/databricks_job.py.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Literal, Optional

import numpy as np
import pyarrow as pa

import hvd_infer
from hvd_infer.config import load_config
from hvd_infer.errors import ConfigError

# What a Spark Python worker must be able to import to run a rank or the UDF (found, not imported: cheap).
_WORKER_MODULES = ("hvd_infer", "yaml", "pyarrow", "torch", "transformers")


def _worker_modules(cfg) -> tuple:
    """What Spark's Python workers must import for this job: model.runtime=onnxruntime adds ONNX Runtime."""
    return _WORKER_MODULES + (("onnxruntime", "onnx") if cfg.model.runtime == "onnxruntime" else ())


def run_on_spark(config: Any = None, num_proc: Optional[int] = None, spark=None,
                 nics: Optional[List[str]] = None, launcher: Literal["horovod", "torch"] = "horovod",
                 local_mode: bool = False, use_gpu: Optional[bool] = None,
                 **overrides: Any) -> List[Dict[str, Any]]:
    """Run the job as num_proc ranks inside Spark tasks; returns each rank's figures, in rank order.

    The config is resolved on the driver (relative paths and the MLflow URI made absolute), so every executor
    uses the same places, which it must reach (shared storage, a tracking server). num_proc defaults to the
    session's default parallelism; give each rank its own executor core (or GPU). The checks every rank runs
    before reading data run first, here (hvd_infer.launcher.preflight): a bad job fails in one line.

    launcher="horovod": horovod.spark.run, one Horovod rank per Spark task; nics: the network interfaces the
    ranks talk over (e.g. ["eth0"]; default, all they share).
    launcher="torch": pyspark's TorchDistributor (torchrun, torch.distributed with Gloo), for clusters without
    Horovod (Databricks ML runtimes after 15.4 LTS). local_mode: all ranks on the driver instead of in Spark
    tasks. use_gpu: one GPU per rank; default, when spark.task.resource.gpu.amount is set (local_mode: when the
    driver has CUDA). The figures are read from the output's manifest, so the driver must see output.path.
    """
    from pyspark.sql import SparkSession

    from hvd_infer.launcher import preflight

    cfg = load_config(config, **overrides)
    preflight(cfg, ranks_on_this_host=local_mode)
    spark = spark or SparkSession.builder.getOrCreate()  # both launchers use the active SparkContext
    n = num_proc or spark.sparkContext.defaultParallelism
    if launcher == "horovod":
        import horovod.spark

        _check_device(cfg, check_spark_workers(spark, n, _worker_modules(cfg) + ("horovod",)))
        return horovod.spark.run(hvd_infer.run, kwargs={"config": cfg.to_dict()}, num_proc=n, nics=nics)
    if launcher != "torch":
        raise ConfigError(f"launcher={launcher!r}: give launcher='horovod' (horovod.spark.run) or 'torch' "
                          "(pyspark's TorchDistributor)")
    from pyspark.ml.torch.distributor import TorchDistributor

    from hvd_infer.writer import MANIFEST

    if not local_mode:
        _check_device(cfg, check_spark_workers(spark, n, _worker_modules(cfg)))
    if use_gpu is None:
        if local_mode:
            import torch

            use_gpu = torch.cuda.is_available()
        else:
            use_gpu = spark.sparkContext.getConf().get("spark.task.resource.gpu.amount") is not None
    TorchDistributor(num_processes=n, local_mode=local_mode, use_gpu=use_gpu).run(hvd_infer.run, config=cfg.to_dict())
    # TorchDistributor returns one rank's result; the manifest has every rank's.
    with open(os.path.join(cfg.output.path, MANIFEST)) as f:
        return json.load(f)["summary"]["ranks"]


def _check_device(cfg, workers_have_gpus: bool, whole_input: bool = True) -> None:
    """What the workers' devices cannot run (float16 where they have no GPU, auto-check in a UDF, ...): one line
    here, not one per task."""
    from hvd_infer.engines import checked_spec
    from hvd_infer.hardware import this_platform

    checked_spec(cfg.model, this_platform("cuda" if workers_have_gpus else "cpu", whole_input))


def check_spark_workers(spark, tasks: int, modules=_WORKER_MODULES) -> bool:
    """Fail in one line when Spark's Python workers cannot import the stack (a cheap Spark job first); returns
    whether every worker sees a CUDA GPU. Spark's workers run `python3` from PATH (or PYSPARK_PYTHON), not the
    driver's interpreter: without this, a venv not activated fails much later, deep in the executor logs."""
    import sys

    def probe(_):
        # Defined here so that cloudpickle ships it by value: the worker needs nothing to run it.
        import importlib.util
        import socket
        import sys as worker_sys

        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        gpu = False
        if not missing and "torch" in modules:
            import torch

            gpu = torch.cuda.is_available()
        return worker_sys.executable, socket.gethostname(), missing[0] if missing else None, gpu

    fix = (f"set PYSPARK_PYTHON before starting Spark (on a cluster: spark.pyspark.python) to {sys.executable}, "
           "the Python that has hvd_infer, or activate its venv first")
    rdd = spark.sparkContext.parallelize(range(tasks), tasks)
    try:
        found = rdd.map(probe).collect()
    except Exception as e:  # a worker that cannot even start (another Python version)
        text = str(e)
        if "different version" not in text and "No module named" not in text:
            raise
        cause = next(l.strip() for l in text.splitlines() if "different version" in l or "No module named" in l)
        raise ConfigError(f"Spark's Python workers cannot run this job ({cause}); {fix}") from None
    for executable, host, missing, _ in found:
        if missing:
            raise ConfigError(f"Spark's Python workers run {executable} on {host}, which cannot import {missing}; "
                              f"{fix}")
    return all(gpu for *_, gpu in found)


def predict_udf(config: Any = None, **overrides: Any):
    """A `predict_batch_udf` giving the task's prediction columns as one struct column.

        udf = predict_udf("conf/job.yaml")
        df.withColumn("pred", udf("text")).select("id", "pred.*")      # label, score, probs
        df.withColumn("pred", udf("premise", "hypothesis"))               # with data.text_pair_column

    Each Python worker loads the model once (hvd_infer.model.load_model, as the ranks do); rows are tokenized,
    sorted by length within each chunk of data.sort_window rows and run in batches of data.batch_size, long texts'
    windows as in a job. Null or empty text follows data.on_null, but a UDF cannot drop rows (no `skip`).
    """
    from pyspark.ml.functions import predict_batch_udf, supported_scalar_types
    from pyspark.sql import SparkSession
    from pyspark.sql.pandas.types import from_arrow_type
    from pyspark.sql.types import ArrayType, StructField, StructType

    from hvd_infer.tasks import get_task

    cfg = load_config(config, **overrides)
    if cfg.data.on_null == "skip":
        raise ConfigError("data.on_null=skip cannot drop rows inside a UDF; filter them first "
                          "(df.where(\"length(trim(text)) > 0\")) or use data.on_null=error or empty")
    return_type = StructType([StructField(f.name, from_arrow_type(f.type), True)
                              for f in get_task(cfg.model.task)(cfg).output_fields()])
    for f in return_type.fields:
        t = f.dataType.elementType if isinstance(f.dataType, ArrayType) else f.dataType
        if not isinstance(t, supported_scalar_types):
            raise ConfigError(f"model.task={cfg.model.task} gives column '{f.name}' of type "
                              f"{f.dataType.simpleString()}, which predict_batch_udf cannot return (only numbers, "
                              "strings and arrays of them); use run_on_spark for this task")
    import torch

    spark = SparkSession.getActiveSession()
    gpus = torch.cuda.is_available()  # no session yet: the workers will be this host's
    if spark is not None:
        gpus = check_spark_workers(spark, spark.sparkContext.defaultParallelism, _worker_modules(cfg))
    _check_device(cfg, gpus, whole_input=False)
    cfg_dict = cfg.to_dict()

    def make_predict_fn():
        return _Predictor(load_config(cfg_dict)).predict_fn()

    return predict_batch_udf(make_predict_fn, return_type=return_type, batch_size=cfg.data.sort_window)


class _Predictor:
    """What each Python worker keeps: the task and the loaded model."""

    def __init__(self, cfg):
        import torch

        from hvd_infer.batcher import batch_limits
        from hvd_infer.model import load_model
        from hvd_infer.runner import quiet_libraries
        from hvd_infer.tasks import get_task

        quiet_libraries()
        if cfg.runtime.threads:
            torch.set_num_threads(cfg.runtime.threads)
        self.cfg = cfg
        self.task = get_task(cfg.model.task)(cfg)
        device = _task_device()
        self.model, _, _ = load_model(cfg, self.task, device)
        self.batch_rows, self.max_tokens = batch_limits(cfg.data, cfg.model.task, self.model.config, device,
                                                        self.task.max_length,
                                                        next(self.model.module.parameters()).element_size())

    def predict_fn(self):
        if self.cfg.data.text_pair_column:
            return lambda texts, pairs: self.predict(texts, pairs)
        return lambda texts: self.predict(texts, None)

    def predict(self, texts: np.ndarray, pairs: Optional[np.ndarray]) -> Dict[str, np.ndarray]:
        from hvd_infer.batcher import (dedup_off, distinct_rows, in_input_order, length_sorted_batches,
                                       rows_from_windows)

        d = self.cfg.data
        texts = self._text(texts, d.text_column)
        pairs = self._text(pairs, d.text_pair_column) if pairs is not None else None
        new, source = np.arange(len(texts)), None
        if dedup_off(d, self.task) is None:  # repeats within this call of the UDF (one Arrow batch)
            new, source = distinct_rows({}, texts, pairs, 0)
            texts, pairs = texts[new], pairs[new] if pairs is not None else None
        enc = self.task.encode(texts, pairs)
        outputs, order = [], []
        for rows in length_sorted_batches(enc.lengths, self.batch_rows, self.max_tokens, len(enc.lengths)):
            outputs.append(self.task.predict(self.model, self.task.collate(enc.features[rows])))
            order.append(rows)
        if enc.window_row is not None:  # long_texts=chunk: the outputs are windows'
            outputs, order = [rows_from_windows(self.task, outputs, order, enc.window_row)], [np.arange(len(texts))]
        order = [new[o] for o in order]  # rows of the distinct texts -> rows of the call
        return {name: _numpy_column(column) for name, column in in_input_order(outputs, order, source).items()}

    def _text(self, values: np.ndarray, column: str) -> np.ndarray:
        from hvd_infer.batcher import null_mask

        bad = null_mask(values)
        if bad.any():
            if self.cfg.data.on_null == "error":
                from hvd_infer.errors import DataError

                raise DataError(f"column '{column}' is null or empty in {int(bad.sum())} rows; clean the data, "
                                "filter them out, or set data.on_null=empty (score them as empty text)")
            values = values.copy()
            values[bad] = ""
        return values


def _task_device():
    """The GPU Spark gave this task (spark.task.resource.gpu.amount), else the first one, else the CPU."""
    import torch
    from pyspark import TaskContext

    if not torch.cuda.is_available():
        return torch.device("cpu")
    gpus = TaskContext.get().resources().get("gpu") if TaskContext.get() else None
    return torch.device("cuda", int(gpus.addresses[0]) if gpus else 0)


def _numpy_column(arr: pa.Array) -> np.ndarray:
    """An Arrow column as predict_batch_udf wants it: 1-D for scalars, 2-D (rows, k) for lists."""
    if not (pa.types.is_list(arr.type) or pa.types.is_fixed_size_list(arr.type)):
        return arr.to_numpy(zero_copy_only=False)
    width = len(arr[0]) if len(arr) else 0
    values = arr.flatten().to_numpy(zero_copy_only=False)
    if len(values) != width * len(arr):
        raise ValueError("predict_udf needs list outputs of one length per batch; use run_on_spark for this task")
    return values.reshape(len(arr), width)
