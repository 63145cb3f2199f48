"""MLflow: one run per job, created by rank 0; every rank logs its own files into it.

Params are the resolved config (secrets masked); metrics the figures gathered
from every rank; artifacts the config, the manifest and the predictions.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional

from hvd_infer.config import JobConfig, is_model_uri, mask_secrets
from hvd_infer.errors import ModelError

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
                run_id = self._create_run({**extra_params, **self._model_source()})
            except ModelError as e:
                error = e
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

    def _model_source(self) -> Dict[str, str]:
        """For a model.path that is an MLflow URI: the registered name, version and run it resolves to."""
        uri = self.cfg.model.path
        if not is_model_uri(uri):
            return {}
        try:
            return model_source_params(uri, self.cfg.mlflow.tracking_uri)
        except Exception as e:
            raise ModelError(f"model.path {uri} cannot be resolved at mlflow.tracking_uri={self.cfg.mlflow.tracking_uri} "
                             f"({str(e).splitlines()[0]}); check the name, version or alias") from None

    def _create_run(self, extra_params: Dict[str, Any]) -> str:
        mlflow = self._connect()
        m = self.cfg.mlflow
        exp = self.client.get_experiment_by_name(m.experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(m.experiment, artifact_location=m.artifact_location)
        tags = {"hvd_infer.task": self.cfg.model.task, **m.tags}
        if "model_source.uri" in extra_params:
            tags["hvd_infer.model"] = extra_params["model_source.uri"]
        run = self.client.create_run(exp_id, run_name=m.run_name, tags=tags)
        params = _flatten(mask_secrets(self.cfg.to_dict()))
        params.update(extra_params)
        from mlflow.entities import Param

        self.client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in sorted(params.items())])
        self.client.log_text(run.info.run_id, _masked_yaml(self.cfg), "config.yaml")
        if extra_params.get("model_source.model_id"):
            from mlflow.entities import LoggedModelInput

            # The run's page lists the model as its input (MLflow 3 logged models).
            self.client.log_inputs(run.info.run_id, models=[LoggedModelInput(extra_params["model_source.model_id"])])
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


def describe_model(uri: str, tracking_uri: Optional[str] = None) -> Dict[str, str]:
    """Which model an MLflow URI names right now: {uri (pinned), registered_name, version, run_id, model_id}.

    models:/name@alias and models:/name/latest are pinned to today's version, so the
    download and the scoring run's params name the same model even if the alias moves.
    The registry is the one that goes with tracking_uri (Unity Catalog for "databricks")
    unless MLFLOW_REGISTRY_URI says otherwise.
    """
    _quiet()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    src = {"uri": uri, "registered_name": "", "version": "", "run_id": "", "model_id": ""}
    if uri.startswith("runs:/"):
        from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository

        src["run_id"] = RunsArtifactRepository.parse_runs_uri(uri)[0]
    elif uri.startswith("models:/"):
        from mlflow.store.artifact.utils.models import get_model_name_and_version

        named = get_model_name_and_version(client, uri)
        if len(named) == 1:  # models:/m-<id>, a logged model (MLflow 3)
            src["model_id"] = named[0]
            src["run_id"] = client.get_logged_model(named[0]).source_run_id or ""
        else:
            mv = client.get_model_version(*named)
            model_id = getattr(mv, "model_id", None) or ""  # MLflow 3 only
            if not model_id and (mv.source or "").startswith("models:/m-"):
                model_id = mv.source[len("models:/"):]
            src.update(uri=f"models:/{mv.name}/{mv.version}", registered_name=mv.name, version=str(mv.version),
                       run_id=mv.run_id or "", model_id=model_id)
    return src


def model_source_params(uri: str, tracking_uri: Optional[str]) -> Dict[str, str]:
    """The scoring run's record of the model it used: params model_source.* (empty values left out)."""
    return {f"model_source.{k}": v for k, v in describe_model(uri, tracking_uri).items() if v}


def download_model(uri: str, tracking_uri: Optional[str] = None) -> str:
    """A local Hugging Face directory for an MLflow model URI, downloaded once per host.

    For a model logged with mlflow.transformers.log_model the weights and config are under
    model/ and the tokenizer under components/tokenizer/: they are put into one directory.
    The copy is cached under $TMPDIR/hvd_infer-models by the pinned URI; a file lock makes
    the other ranks on the host wait for the first one's download and reuse it.
    """
    import fcntl
    import hashlib
    import json
    import shutil
    import tempfile

    import mlflow

    src = describe_model(uri, tracking_uri)
    root = os.path.join(tempfile.gettempdir(), "hvd_infer-models")
    os.makedirs(root, exist_ok=True)
    key = hashlib.sha256(json.dumps([tracking_uri, src], sort_keys=True).encode()).hexdigest()[:16]
    final = os.path.join(root, key)
    with open(final + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isdir(final):
            tmp = tempfile.mkdtemp(prefix=key + ".", dir=root)
            try:
                local = mlflow.artifacts.download_artifacts(artifact_uri=src["uri"], dst_path=tmp,
                                                            tracking_uri=tracking_uri)
                os.rename(_assemble_hf_dir(local, uri), final)  # atomic: a dir under final is complete
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def _assemble_hf_dir(local: str, uri: str) -> str:
    """The downloaded directory with config.json, with the flavor's components (tokenizer, ...) moved in."""
    import shutil

    found = sorted((root.count(os.sep), root) for root, _, files in os.walk(local) if "config.json" in files)
    if not found:
        raise ModelError(f"model.path {uri} holds no Hugging Face model (no config.json in "
                         f"{', '.join(sorted(os.listdir(local)))}); log it with mlflow.transformers.log_model "
                         "(save_pretrained=True, the default) or log a save_pretrained directory")
    hf = found[0][1]
    components = os.path.join(local, "components")
    for comp in sorted(os.listdir(components)) if os.path.isdir(components) else []:
        for name in os.listdir(os.path.join(components, comp)):
            if not os.path.exists(os.path.join(hf, name)):
                shutil.move(os.path.join(components, comp, name), os.path.join(hf, name))
    return hf
