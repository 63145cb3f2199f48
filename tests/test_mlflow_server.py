"""A real `mlflow server` on loopback: a 2-rank job logs to it, the run reads back over REST.

What a user sees while the job runs: live step metrics per rank, system metrics per
rank, the input as a dataset, the Source; and a run that dies is marked FAILED (a world of one, in
process: conftest.cli). Slow: the server is a process.
"""
import json
import os
import subprocess
import urllib.parse
import urllib.request

import pytest

import builders
import conftest
from conftest import REPO, cli, horovodrun

pytestmark = pytest.mark.slow


def get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """One server for the module (~30 s to start on 2 busy cores): each test logs to its own experiment."""
    with conftest.mlflow_server(tmp_path_factory.mktemp("mlflow_server")) as url:
        yield url


def only_run(api, experiment):
    exp = get(f"{api}/experiments/get-by-name?experiment_name={experiment}")["experiment"]
    req = urllib.request.Request(f"{api}/runs/search", method="POST", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"experiment_ids": [exp["experiment_id"]]}).encode())
    with urllib.request.urlopen(req, timeout=10) as resp:
        (run,) = json.loads(resp.read())["runs"]
    return run


def history(api, run_id, key):
    got = get(f"{api}/metrics/get-history?run_id={run_id}&metric_key={urllib.parse.quote(key)}&max_results=25000")
    return sorted(got.get("metrics", []), key=lambda m: m["step"])


def test_job_logs_to_real_server(mlflow_server, tiny_classifier, dataset, tmp_path):
    out = tmp_path / "out"
    r = horovodrun(2, ["--config", "/dev/null", f"model.path={tiny_classifier}", f"data.path={dataset[0]}",
                       "data.id_columns=[id]", f"output.path={out}", f"mlflow.tracking_uri={mlflow_server}",
                       "mlflow.experiment=served", "mlflow.run_name=over-rest", "runtime.progress=false",
                       "mlflow.log_every_s=0.25", "data.batch_size=4", "mlflow.log_predictions=all"])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    api = mlflow_server + "/api/2.0/mlflow"
    run = only_run(api, "served")
    assert run["info"]["status"] == "FINISHED" and run["info"]["run_name"] == "over-rest"
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert metrics["rows"] == dataset[1].num_rows and params["world_size"] == "2"
    run_id = run["info"]["run_id"]
    # mlflow.log_predictions=all: every part, under its rank's folder, and no sample.
    top = {f["path"] for f in get(f"{api}/artifacts/list?run_id={run_id}")["files"]}
    assert top == {"config.yaml", "_manifest.json", "predictions"}
    copied = []
    for rank in (0, 1):
        files = get(f"{api}/artifacts/list?run_id={run_id}&path=predictions/rank-{rank:05d}")["files"]
        assert files and all(f["path"].split("/")[-1].startswith(f"part-r{rank:05d}") for f in files)
        copied += [f["path"].split("/")[-1] for f in files]
    assert sorted(copied) == sorted(n for n in os.listdir(out) if n.startswith("part-"))
    assert "predictions in MLflow: every part (predictions/rank-NNNNN/)" in r.stdout
    assert f"{mlflow_server}/#/experiments/" in r.stdout

    # Live step metrics: every rank, increasing, ending at its rows; the ranks' last points sum to the job's.
    rows = dataset[1].num_rows
    last = 0
    for rank in (0, 1):
        points = history(api, run_id, f"rows_done/rank_{rank}")
        values = [p["value"] for p in points]
        assert len(values) >= 2 and values == sorted(values) and len(values) < 300, values
        assert values[-1] == metrics[f"rank_{rank}_rows"]
        last += values[-1]
        for key, lo, hi in (("rows_per_s", 0, float("inf")), ("padding_efficiency", 0, 1), ("data_wait_share", 0, 1)):
            got = [p["value"] for p in history(api, run_id, f"{key}/rank_{rank}")]
            assert len(got) == len(values) and all(lo <= v <= hi for v in got), (key, got)
    assert last == rows
    job = [p["value"] for p in history(api, run_id, "job/rows_done")]
    assert job == sorted(job) and job[-1] == rows and history(api, run_id, "job/eta_seconds")[-1]["value"] == 0
    # MLflow's system metrics from each rank.
    for rank in (0, 1):
        assert f"system/rank_{rank}/cpu_utilization_percentage" in metrics
        assert f"system/rank_{rank}/system_memory_usage_megabytes" in metrics
    # The input as a dataset: source, digest (the input fingerprint), rows.
    (dataset_input,) = run["inputs"]["dataset_inputs"]
    ds = dataset_input["dataset"]
    assert ds["digest"] == params["input_fingerprint"] and json.loads(ds["source"])["uri"] == dataset[0]
    assert json.loads(ds["profile"])["num_rows"] == rows and ds["source_type"] == "local"
    # Source: what ran, from which commit, which hvd_infer.
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert tags["mlflow.source.name"] == "python -m hvd_infer" and tags["mlflow.source.git.commit"] == commit
    import hvd_infer

    assert tags["hvd_infer.version"] == hvd_infer.__version__ and tags["hvd_infer.output"] == str(out)


def test_run_that_dies_is_failed_with_the_error(mlflow_server, tiny_classifier, tmp_path):
    texts = builders.texts(40)
    texts[25] = None  # data.on_null=error: the job stops at this row, after the run started
    data = tmp_path / "data"
    builders.write_dataset(str(data), 40, files=1, text=texts)
    r = cli(["--config", "/dev/null", f"model.path={tiny_classifier}", f"data.path={data}",
             f"output.path={tmp_path / 'out'}", f"mlflow.tracking_uri={mlflow_server}", "mlflow.experiment=dies",
             "runtime.progress=false"])
    assert r.returncode == 2 and "is null or empty" in r.stderr, r.stderr[-3000:]
    run = only_run(mlflow_server + "/api/2.0/mlflow", "dies")
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert run["info"]["status"] == "FAILED" and "is null or empty" in tags["hvd_infer.error"]
