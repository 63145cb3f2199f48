"""MLflow: one run per job, created by rank 0; every rank logs its own files into it.

Params are the resolved config (secrets masked); metrics the figures gathered
from every rank; artifacts the config, the manifest and the predictions.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional

from hvd_infer.config import JobConfig, mask_secrets

log = logging.getLogger("hvd_infer")


def _flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _quiet() -> None:
    for name in ("mlflow", "alembic", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


class Tracker:
    """Rank 0 owns the run; other ranks know its id and log artifacts into it."""

    def __init__(self, cfg: JobConfig, ctx):
        self.cfg, self.ctx = cfg, ctx
        self.enabled = cfg.mlflow.enabled
        self.run_id: Optional[str] = None
        self.client = None

    def start(self, extra_params: Dict[str, Any]) -> Optional[str]:
        if not self.enabled:
            return None
        run_id, error = None, None
        if self.ctx.is_main:
            try:
                run_id = self._create_run(extra_params)
            except Exception as e:
                error = RuntimeError(f"MLflow: cannot start a run at mlflow.tracking_uri={self.cfg.mlflow.tracking_uri} "
                                     f"({str(e).splitlines()[0]}); fix the URI or set mlflow.enabled=false")
        self.ctx.agree(error)
        self.run_id = self.ctx.broadcast_object(run_id)
        if not self.ctx.is_main:
            self._connect()
        return self.run_id

    def _connect(self):
        _quiet()
        import mlflow
        from mlflow.tracking import MlflowClient

        mlflow.set_tracking_uri(self.cfg.mlflow.tracking_uri)
        self.client = MlflowClient(self.cfg.mlflow.tracking_uri)
        return mlflow

    def _create_run(self, extra_params: Dict[str, Any]) -> str:
        mlflow = self._connect()
        m = self.cfg.mlflow
        exp = self.client.get_experiment_by_name(m.experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(m.experiment, artifact_location=m.artifact_location)
        tags = {"hvd_infer.task": self.cfg.model.task, **m.tags}
        run = self.client.create_run(exp_id, run_name=m.run_name, tags=tags)
        params = _flatten(mask_secrets(self.cfg.to_dict()))
        params.update(extra_params)
        from mlflow.entities import Param

        self.client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in sorted(params.items())])
        self.client.log_text(run.info.run_id, _masked_yaml(self.cfg), "config.yaml")
        return run.info.run_id

    def log_rank_files(self, paths: List[str]) -> None:
        if not (self.enabled and self.cfg.mlflow.log_predictions):
            return
        sub = f"predictions/rank-{self.ctx.rank:05d}"
        for p in paths:
            self.client.log_artifact(self.run_id, p, sub)

    def finish(self, metrics: Dict[str, float], params: Dict[str, Any], artifacts: List[str],
               figures: Dict[str, Any]) -> None:
        """Rank 0: metrics, late params, the manifest and other artifacts; run ends FINISHED."""
        if not (self.enabled and self.ctx.is_main):
            return
        from mlflow.entities import Metric, Param
        import time as _t

        now = int(_t.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in sorted(metrics.items())],
                              params=[Param(k, str(v)) for k, v in sorted(params.items())])
        for p in artifacts:
            self.client.log_artifact(self.run_id, p)
        for name, fig in figures.items():
            self.client.log_figure(self.run_id, fig, name)
        self.client.set_terminated(self.run_id, "FINISHED")

    def fail(self, error: BaseException) -> None:
        if not (self.enabled and self.ctx.is_main and self.run_id and self.client):
            return
        try:
            self.client.set_tag(self.run_id, "hvd_infer.error", str(error)[:5000])
            self.client.set_terminated(self.run_id, "FAILED")
        except Exception:  # the job's own error matters more than MLflow's
            pass

    def run_url(self) -> str:
        uri = self.cfg.mlflow.tracking_uri or ""
        if uri.startswith("http"):
            return f"{uri.rstrip('/')}/#/experiments/{self.client.get_run(self.run_id).info.experiment_id}/runs/{self.run_id}"
        return f"run {self.run_id} in {uri}"


def _masked_yaml(cfg: JobConfig) -> str:
    import yaml

    return yaml.safe_dump(mask_secrets(cfg.to_dict()), sort_keys=False)


def download_model(uri: str) -> str:
    """Fetch an MLflow model's Hugging Face directory (a transformers flavor model) to a local dir."""
    import mlflow

    local = mlflow.artifacts.download_artifacts(artifact_uri=uri)
    for candidate in (os.path.join(local, "model"), local, os.path.join(local, "components", "model")):
        if os.path.exists(os.path.join(candidate, "config.json")):
            return candidate
    return local
