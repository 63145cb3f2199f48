"""(c) Spark predict_batch_udf on local[cores]: the model loaded once per Python worker, Parquet written."""
from __future__ import annotations

import os
import sys
import time


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
    from pyspark import cloudpickle
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

    # Spark's Python workers cannot import scripts/benchmarks: ship this module's code with the UDF.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    classify = predict_batch_udf(make_predict_fn, return_type=IntegerType(), batch_size=batch_size)
    df = spark.read.parquet(data)
    partitions = df.rdd.getNumPartitions()
    if partitions < cores:
        df = df.repartition(cores)
        partitions = cores
    t = time.perf_counter()
    df.select("id", classify("text").alias("label_id")).write.mode("overwrite").parquet(out)
    return time.perf_counter() - t, partitions
