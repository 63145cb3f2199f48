"""The contenders of scripts/bench.py, one module each, and what they share.

    bare_loop       (a) plain transformers forward over the package's own length-sorted batches
    pipeline        (b) transformers pipeline("text-classification")
    spark_udf       (c) Spark predict_batch_udf, the way its docs show it
    hvd_infer_job   (d) hvd_infer under horovodrun, as a user runs it
    corpus          the Parquet corpus (scripts/make_demo.py's make_corpus) and reading labels back
    measure         the machine, CPU accounting and peak memory of a stage
    report          the results table, the targets and the JSON
"""
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
