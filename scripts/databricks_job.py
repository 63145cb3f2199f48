# Databricks notebook source
# MAGIC %md
# MAGIC # hvd_infer on Databricks: HorovodRunner, or TorchDistributor where Horovod is gone
# MAGIC
# MAGIC Scores a Parquet dataset on a Unity Catalog Volume with a model from the registry, one
# MAGIC rank per GPU (or per worker), tracked in this workspace's MLflow.
# MAGIC
# MAGIC * Cluster: a Databricks Runtime **ML**, GPU or CPU, in *single user* (dedicated) access mode.
# MAGIC   Up to 15.4 LTS ML the runtime ships HorovodRunner (`sparkdl`) and the ranks run on Horovod;
# MAGIC   later ML runtimes have no Horovod, and the notebook uses pyspark's TorchDistributor
# MAGIC   instead (torchrun, torch.distributed with Gloo): the same job, the same output. Everything
# MAGIC   else comes with the runtime (torch, transformers, MLflow, pyspark, DeepSpeed): hvd_infer is
# MAGIC   installed without dependencies and runs on the runtime's own versions (tested on the
# MAGIC   packages of 15.4 and 17.3 LTS ML). Petastorm reads where the runtime ships it (15.4);
# MAGIC   elsewhere pyarrow reads the same rows (the summary says which).
# MAGIC * Data: read through the `/Volumes/...` FUSE path that every node mounts.
# MAGIC * Output: the writer renames its part files into place, so it needs a mounted local path
# MAGIC   too: a Volume (`/Volumes/...`) or DBFS through `/dbfs/...`, never a `dbfs:/` URL.
# MAGIC * MLflow: `tracking_uri: databricks`; with MLflow 3 the registry is Unity Catalog, so
# MAGIC   `models:/catalog.schema.name@alias` works as `model.path`. If the ranks cannot reach
# MAGIC   MLflow, give the cluster the environment variables `DATABRICKS_HOST` and
# MAGIC   `DATABRICKS_TOKEN={{secrets/<scope>/<key>}}` (Advanced options, Spark, Environment variables).
# MAGIC
# MAGIC The same call runs on any Spark cluster without Databricks:
# MAGIC `hvd_infer.spark.run_on_spark(config, num_proc=4)`, which is
# MAGIC `horovod.spark.run(hvd_infer.run, kwargs={"config": config}, num_proc=4)`, or
# MAGIC `run_on_spark(config, num_proc=4, launcher="torch")` through TorchDistributor.

# COMMAND ----------

# MAGIC %pip install --no-deps /Workspace/Users/you@example.com/hvd_infer

# COMMAND ----------

dbutils.library.restartPython()  # noqa: F821 (a Databricks notebook global)

# COMMAND ----------

import hvd_infer

# Resolved here, on the driver: every rank gets the same absolute paths and MLflow URI.
config = hvd_infer.load_config({
    "model": {"path": "models:/main.default.ticket_classifier@champion", "task": "text-classification"},
    "data": {"path": "/Volumes/main/default/tickets/test/", "text_column": "text", "id_columns": ["id"],
             "batch_size": 64},
    "output": {"path": "/Volumes/main/default/tickets/predictions/", "mode": "resume"},
    "mlflow": {"tracking_uri": "databricks", "experiment": "/Users/you@example.com/hvd_infer"},
    "runtime": {"progress": False},
}).to_dict()

# COMMAND ----------

try:
    from sparkdl import HorovodRunner
except ImportError:  # ML runtimes after 15.4 LTS ship no Horovod
    HorovodRunner = None

if HorovodRunner is not None:
    # np=4: four ranks on the workers (one per GPU); np=-4 would run four ranks on the driver.
    # HorovodRunner returns rank 0's result: its figures (rows, seconds, ...).
    summary = HorovodRunner(np=4).run(hvd_infer.run, config=config)
else:
    from hvd_infer.spark import run_on_spark

    # Four ranks in Spark tasks, one GPU each when spark.task.resource.gpu.amount is set
    # (local_mode=True: on the driver's GPUs). Returns every rank's figures.
    summary = run_on_spark(config, num_proc=4, spark=spark, launcher="torch")  # noqa: F821
print(summary)

# COMMAND ----------

predictions = spark.read.parquet("/Volumes/main/default/tickets/predictions/")  # noqa: F821
display(predictions.groupBy("label").count())  # noqa: F821
