"""hvd_infer: Horovod distributed batch inference of Hugging Face models over Parquet.

    hvd-infer -np 4 --config conf/job.yaml data.batch_size=64       # checked once, then 4 Horovod ranks
    horovodrun -np 4 python -m hvd_infer --config conf/job.yaml      # or torchrun --nproc-per-node 4 -m hvd_infer ...
    hvd_infer.run("conf/job.yaml")           # one rank's share; picklable for Spark launchers
"""
from hvd_infer.config import JobConfig, load_config
from hvd_infer.errors import ConfigError, UserError
from hvd_infer.version import __version__


def run(config=None, **overrides):
    """Run this rank's share of the job (see hvd_infer.runner.run)."""
    from hvd_infer.runner import run as _run

    return _run(config, **overrides)


__all__ = ["run", "load_config", "JobConfig", "ConfigError", "UserError", "__version__"]
