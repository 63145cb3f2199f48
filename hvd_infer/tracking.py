"""MLflow: one run per job, created by rank 0; every rank logs its own files into it.

Params are the resolved config (secrets masked); metrics the figures of every rank at the end;
artifacts the config, the manifest and, as mlflow.log_predictions says, a sample of the predictions,
every part, or none. While scoring, every rank logs live step metrics (LiveMetrics) and MLflow's
system metrics under system/rank_<r>/. The run carries the input as a dataset, its source, and the
output path as tag hvd_infer.output: a new run on that output marks a run still RUNNING there KILLED.
"""
from __future__ import annotations

import inspect
import json
import logging
import os
import sys
import threading
import time
from typing import Any, Dict, List, Optional

from hvd_infer.config import JobConfig, is_model_uri, mask_secrets
from hvd_infer.errors import ModelError, UserError
from hvd_infer.storage import first_line

log = logging.getLogger("hvd_infer")

# mlflow.log_predictions=sample: the output's first rows, in input order, as this one artifact.
SAMPLE_ROWS = 1000
SAMPLE_ARTIFACT = "predictions_sample.parquet"


def _flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in tree.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_tracking_server(uri: str, timeout: float = 5.0) -> None:
    """An http(s) tracking URI whose server does not answer: one line now, not MLflow's ~4 minutes of retries."""
    import socket
    from urllib.parse import urlsplit

    if not uri.lower().startswith(("http://", "https://")):
        return
    u = urlsplit(uri)
    try:
        port = u.port or (443 if u.scheme.lower() == "https" else 80)
    except ValueError:
        raise UserError(f"mlflow.tracking_uri={uri} has no valid port; give e.g. http://host:5000") from None
    try:
        socket.create_connection((u.hostname or "", port), timeout=timeout).close()
    except OSError as e:
        why = "timed out" if isinstance(e, socket.timeout) else (e.strerror or str(e) or type(e).__name__).lower()
        raise UserError(f"MLflow: no tracking server answers at mlflow.tracking_uri={uri} ({why}); start it, "
                        "fix the URI, or set mlflow.enabled=false") from None


def _quiet() -> None:
    import mlflow  # noqa: F401  MLflow 2.x sets its loggers to INFO when imported (3.x reads MLFLOW_LOGGING_LEVEL)

    for name in ("mlflow", "alembic", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


class LiveMetrics:
    """One rank's step metrics, logged by a background thread so the model loop never waits on MLflow: a point
    at the start, every every_s seconds (doubling every SLOWDOWN_EVERY points) and at the end. Rank 0
    estimates the job's progress from its own rows times the world size (no collective)."""

    SLOWDOWN_EVERY = 150

    def __init__(self, client, run_id: str, rank: int, size: int, job_rows: int, every_s: float):
        self.client, self.run_id, self.rank, self.size = client, run_id, rank, size
        self.job_rows, self.every_s = job_rows, every_s
        self.rows = self.real_tokens = self.padded_tokens = self.points = 0
        self.wait_seconds = 0.0
        self._last = (time.monotonic(), 0, 0, 0, 0.0)
        self._t0 = self._last[0]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="hvd_infer-live-metrics", daemon=True)
        self._thread.start()

    def add(self, rows: int, real_tokens: int, padded_tokens: int, wait_seconds: float) -> None:
        self.rows += rows
        self.real_tokens += real_tokens
        self.padded_tokens += padded_tokens
        self.wait_seconds = wait_seconds

    def _loop(self) -> None:
        self._log()  # scoring starts: the charts begin at this rank's first rows (0, or a few batches)
        while not self._stop.wait(self.every_s * 2 ** (self.points // self.SLOWDOWN_EVERY)):
            self._log()

    def _log(self) -> None:
        from mlflow.entities import Metric

        now = time.monotonic()
        rows, real, padded, wait = self.rows, self.real_tokens, self.padded_tokens, self.wait_seconds
        t, rows0, real0, padded0, wait0 = self._last
        dt = max(now - t, 1e-9)
        r = f"rank_{self.rank}"
        values = {f"rows_done/{r}": rows, f"rows_per_s/{r}": (rows - rows0) / dt,
                  f"padding_efficiency/{r}": (real - real0) / (padded - padded0) if padded > padded0 else 1.0,
                  f"data_wait_share/{r}": min(max(wait - wait0, 0.0) / dt, 1.0)}
        if self.rank == 0:
            done = min(rows * self.size, self.job_rows)
            rate = rows * self.size / (now - self._t0)
            values.update({"job/rows_done": done, "job/rows_per_s": rate,
                           "job/eta_seconds": (self.job_rows - done) / rate if rate > 0 else -1.0})
        ms = int(time.time() * 1000)
        try:
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ms, self.points) for k, v in values.items()])
        except Exception as e:  # a slow or lost tracking server must not stop the job
            log.warning("MLflow: live metrics not logged (%s)", first_line(e))
        self._last = (now, rows, real, padded, wait)
        self.points += 1

    def close(self) -> None:
        """Stop the thread and log the last point (the rank's final rows)."""
        self._stop.set()
        self._thread.join()
        self._log()


class Tracker:
    """Rank 0 owns the run; other ranks know its id and log artifacts, live and system metrics into it."""

    def __init__(self, cfg: JobConfig, ctx):
        self.cfg, self.ctx = cfg, ctx
        self.enabled = cfg.mlflow.enabled
        self.run_id: Optional[str] = None
        self.client = None
        self.live: Optional[LiveMetrics] = None
        self.live_points = 0
        self.system = None
        self.error: Optional[BaseException] = None  # start: rank 0 could not create the run
        self._job_rows = 0

    def start(self, extra_params: Dict[str, Any]) -> None:
        """Rank 0 creates the run, with no collective; a failure is kept in `error` for the caller to share."""
        self._job_rows = int(extra_params.get("input_rows", 0)) - int(extra_params.get("resumed_rows", 0))
        if not (self.enabled and self.ctx.is_main):
            return
        try:
            check_tracking_server(self.cfg.mlflow.tracking_uri)
            self.run_id = self._create_run({**extra_params, **self._model_source()})
        except UserError as e:
            self.error = e
        except Exception as e:
            self.error = RuntimeError(f"MLflow: cannot start a run at mlflow.tracking_uri={self.cfg.mlflow.tracking_uri} "
                                      f"({str(e).splitlines()[0]}); fix the URI or set mlflow.enabled=false")

    def share(self) -> Optional[str]:
        """Every rank, after `start`'s error was agreed on: the run id from rank 0; live and system metrics start."""
        if not self.enabled:
            return None
        self.run_id = self.ctx.broadcast_object(self.run_id)
        if not self.ctx.is_main:
            self._connect()
        self.live = LiveMetrics(self.client, self.run_id, self.ctx.rank, self.ctx.size, self._job_rows,
                                self.cfg.mlflow.log_every_s)
        if self.cfg.mlflow.system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            # MLflow 2.x and 3.0's monitor takes no tracking_uri: it logs to the global one, which _connect set.
            where = ({"tracking_uri": self.cfg.mlflow.tracking_uri}
                     if "tracking_uri" in inspect.signature(SystemMetricsMonitor).parameters else {})
            self.system = SystemMetricsMonitor(self.run_id, sampling_interval=self.cfg.mlflow.log_every_s,
                                               node_id=f"rank_{self.ctx.rank}", **where)
            self.system.start()
        return self.run_id

    def step(self, rows: int, real_tokens: int, padded_tokens: int, wait_seconds: float) -> None:
        """After each batch (cheap: counters only): its rows and tokens, and the data-wait seconds so far."""
        if self.live is not None:
            self.live.add(rows, real_tokens, padded_tokens, wait_seconds)

    def stop_live(self) -> None:
        """When this rank's scoring ends, well or not: last live point, system metrics flushed."""
        live, system, self.live, self.system = self.live, self.system, None, None
        if live is not None:
            live.close()
            self.live_points = live.points
        if system is not None:
            system.finish()
            # The monitor logs only after a whole sampling interval: one last sample gives every rank its figures.
            try:
                system.collect_metrics()
                system.publish_metrics(system.aggregate_metrics())
                system.mlflow_logger.flush()
            except Exception as e:  # never fail a job over its system metrics
                log.warning("MLflow: last system metrics not logged (%s)", first_line(e))

    def _connect(self) -> None:
        _quiet()
        import mlflow
        from mlflow.tracking import MlflowClient

        mlflow.set_tracking_uri(self.cfg.mlflow.tracking_uri)
        self.client = MlflowClient(self.cfg.mlflow.tracking_uri)

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
        self._connect()
        m = self.cfg.mlflow
        exp = self.client.get_experiment_by_name(m.experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(m.experiment, artifact_location=m.artifact_location)
        tags = {**_source_tags(), "hvd_infer.task": self.cfg.model.task, "hvd_infer.output": self.cfg.output.path, **m.tags}
        if "model_source.uri" in extra_params:
            tags["hvd_infer.model"] = extra_params["model_source.uri"]
        run = self.client.create_run(exp_id, run_name=m.run_name, tags=tags)
        params = {**_flatten(mask_secrets(self.cfg.to_dict())), **extra_params}
        import yaml
        from mlflow.entities import Param

        self.client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in sorted(params.items())])
        self.client.log_text(run.info.run_id, yaml.safe_dump(mask_secrets(self.cfg.to_dict()), sort_keys=False),
                             "config.yaml")
        self.client.log_inputs(run.info.run_id, datasets=[self._input_dataset(extra_params)])
        self._supersede(exp_id, run.info.run_id)
        if extra_params.get("model_source.model_id"):
            from mlflow.entities import LoggedModelInput

            # The run's page lists the model as its input (MLflow 3 logged models).
            self.client.log_inputs(run.info.run_id, models=[LoggedModelInput(extra_params["model_source.model_id"])])
        return run.info.run_id

    def _input_dataset(self, extra_params: Dict[str, Any]):
        """The input as the run page's "Datasets": source URL, digest (the input fingerprint), rows and files."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        path = self.cfg.data.path
        scheme = path.split("://", 1)[0] if "://" in path else "local"
        dataset = Dataset(name=os.path.basename(path.rstrip("/")) or path, digest=str(extra_params.get("input_fingerprint", "")),
                          source_type=scheme, source=json.dumps({"uri": mask_secrets(path)}),
                          profile=json.dumps({"num_rows": extra_params.get("input_rows"),
                                              "num_files": extra_params.get("input_files")}))
        return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "inference")])

    def _supersede(self, exp_id: str, run_id: str) -> None:
        """A run still RUNNING on this output lost its launcher (a live job would hold the output): close it."""
        quoted = self.cfg.output.path.replace("'", "\\'")
        stale = [r for r in self.client.search_runs([exp_id], f"tags.`hvd_infer.output` = '{quoted}' and "
                                                               "attributes.status = 'RUNNING'", max_results=100)
                 if r.info.run_id != run_id]
        for old in stale:
            self.client.set_tag(old.info.run_id, "hvd_infer.superseded_by", run_id)
            self.client.set_tag(old.info.run_id, "hvd_infer.error", f"never finished (its launcher stopped); "
                                                                     f"superseded by run {run_id} on the same output")
            self.client.set_terminated(old.info.run_id, "KILLED")
        if stale:
            self.client.set_tag(run_id, "hvd_infer.supersedes", ",".join(r.info.run_id for r in stale))

    def log_rank_files(self, paths: List[str]) -> None:
        """mlflow.log_predictions=all: each rank's parts as artifacts; parts on an object store stay there."""
        if not (self.enabled and self.cfg.mlflow.log_predictions == "all"):
            return
        sub = f"predictions/rank-{self.ctx.rank:05d}"
        for p in paths:
            if os.path.exists(p):
                self.client.log_artifact(self.run_id, p, sub)

    def finish(self, metrics: Dict[str, float], params: Dict[str, Any], artifacts: List[str],
               figures: Dict[str, Any], job: str = "") -> None:
        """Rank 0: metrics, late params, the manifest and other artifacts; run ends FINISHED. job: the output's
        job id (a Delta table's parts carry it; the sample is this job's rows)."""
        if not (self.enabled and self.ctx.is_main):
            return
        from mlflow.entities import Metric, Param

        now, step = int(time.time() * 1000), self.live_points  # the live estimate ends at the exact figure
        final = [Metric("job/rows_done", float(metrics["rows"]), now, step), Metric("job/eta_seconds", 0.0, now, step)]
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in sorted(metrics.items())] + final,
                              params=[Param(k, str(v)) for k, v in sorted(params.items())])
        for p in artifacts:
            if os.path.exists(p):
                self.client.log_artifact(self.run_id, p)
            else:  # on the output's object store
                import fsspec

                with fsspec.open(p, "rb", **self.cfg.output.storage_options) as f:
                    self.client.log_text(self.run_id, f.read().decode("utf-8"), os.path.basename(p))
        for name, fig in figures.items():
            self.client.log_figure(self.run_id, fig, name)
        if self.cfg.mlflow.log_predictions == "sample":
            self._log_sample(job)
        self.client.set_terminated(self.run_id, "FINISHED")

    def _log_sample(self, job: str) -> None:
        import tempfile

        import pyarrow.parquet as pq

        try:
            sample = prediction_sample(self.cfg.output.path, self.cfg.output.storage_options, job=job)
            if sample is None:
                return
            with tempfile.TemporaryDirectory(prefix="hvd_infer-sample-") as tmp:
                path = os.path.join(tmp, SAMPLE_ARTIFACT)
                pq.write_table(sample, path)
                self.client.log_artifact(self.run_id, path)
        except Exception as e:  # the output is whole and _SUCCESS written: a missing sample must not fail the job
            log.warning("MLflow: %s not logged (%s)", SAMPLE_ARTIFACT, first_line(e))

    def fail(self, error: BaseException) -> None:
        """Rank 0: the run ends FAILED with the error as tag hvd_infer.error."""
        if not (self.enabled and self.ctx.is_main and self.run_id and self.client):
            return
        try:
            self.stop_live()
            self.client.set_tag(self.run_id, "hvd_infer.error", str(error)[:5000])
            self.client.set_terminated(self.run_id, "FAILED")
        except Exception:  # the job's own error matters more than MLflow's
            pass

    def run_url(self) -> str:
        uri = self.cfg.mlflow.tracking_uri or ""
        if uri.startswith("http"):
            return f"{uri.rstrip('/')}/#/experiments/{self.client.get_run(self.run_id).info.experiment_id}/runs/{self.run_id}"
        return f"run {self.run_id} in {uri}"


def prediction_sample(out: str, storage_options: Optional[Dict[str, Any]] = None, rows: int = SAMPLE_ROWS,
                      job: str = ""):
    """The first `rows` rows of job's parts at out, in input order (a pyarrow Table; None: no part there).
    job: a Delta job's id, which its parts carry; "" for a Parquet output. Only the first parts are read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hvd_infer.storage import Location
    from hvd_infer.writer import parse_part_name

    loc = Location(out, storage_options)
    parts = sorted((parsed[1], name) for name in loc.names() if (parsed := parse_part_name(name, job)))
    tables: List[Any] = []
    need = rows
    for _, name in parts:
        with loc.fs.open(loc.path(name), "rb") as f:
            pf = pq.ParquetFile(f)
            tables = tables or [pf.schema_arrow.empty_table()]  # an output of empty parts: their columns, no rows
            for group in range(pf.num_row_groups):
                tables.append(pf.read_row_group(group).slice(0, need))
                need -= tables[-1].num_rows
                if need <= 0:
                    return pa.concat_tables(tables)
    return pa.concat_tables(tables) if tables else None


def _source_tags() -> Dict[str, str]:
    """MLflow's own Source tags (entry point, git commit), from hvd_infer's checkout when it runs from one."""
    from mlflow.utils.git_utils import get_git_branch, get_git_commit, get_git_repo_url

    from hvd_infer.version import __version__

    package = os.path.dirname(os.path.abspath(__file__))
    main = sys.argv[0] if sys.argv and os.path.isfile(sys.argv[0]) else ""
    tags = {"mlflow.source.name": "python -m hvd_infer" if main.endswith(os.path.join("hvd_infer", "__main__.py"))
            else (main or "hvd_infer.run"),
            "mlflow.source.type": "LOCAL", "hvd_infer.version": __version__}
    for key, find in (("mlflow.source.git.commit", get_git_commit), ("mlflow.source.git.branch", get_git_branch),
                      ("mlflow.source.git.repoURL", get_git_repo_url)):
        if value := find(package):
            tags[key] = value
    return tags


def describe_model(uri: str, tracking_uri: Optional[str] = None) -> Dict[str, str]:
    """Which model an MLflow URI names right now: {uri (pinned), registered_name, version, run_id, model_id}.
    An alias or "latest" is pinned to today's version, so the download and the run's params name the same
    model. The registry is tracking_uri's (Unity Catalog for "databricks") unless MLFLOW_REGISTRY_URI is set."""
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
    """A local Hugging Face directory for an MLflow model URI, downloaded once per host: a mlflow.transformers
    model's weights and components (tokenizer, ...) in one directory, cached under $TMPDIR/hvd_infer-models
    by the pinned URI; a file lock makes the host's other ranks reuse it."""
    import fcntl
    import hashlib
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
            if tracking_uri:  # MLflow resolves models:/ through its global registry URI, which follows this one
                mlflow.set_tracking_uri(tracking_uri)
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
