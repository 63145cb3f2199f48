"""A real `mlflow server` on loopback: a 2-rank job logs to it, the run reads back over REST."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import horovodrun

pytestmark = pytest.mark.slow


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "mlflow")
    proc = subprocess.Popen([exe, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
                             "--artifacts-destination", str(tmp_path / "artifacts")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not start")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_job_logs_to_real_server(mlflow_server, tiny_classifier, dataset, tmp_path):
    out = tmp_path / "out"
    r = horovodrun(2, ["--config", "/dev/null", f"model.path={tiny_classifier}", f"data.path={dataset[0]}",
                       "data.id_columns=[id]", f"output.path={out}", f"mlflow.tracking_uri={mlflow_server}",
                       "mlflow.experiment=served", "mlflow.run_name=over-rest", "runtime.progress=false"])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    api = mlflow_server + "/api/2.0/mlflow"
    exp = get(f"{api}/experiments/get-by-name?experiment_name=served")["experiment"]
    req = urllib.request.Request(f"{api}/runs/search", method="POST", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"experiment_ids": [exp["experiment_id"]]}).encode())
    with urllib.request.urlopen(req, timeout=10) as resp:
        (run,) = json.loads(resp.read())["runs"]
    assert run["info"]["status"] == "FINISHED" and run["info"]["run_name"] == "over-rest"
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert metrics["rows"] == dataset[1].num_rows and params["world_size"] == "2"
    run_id = run["info"]["run_id"]
    top = {f["path"] for f in get(f"{api}/artifacts/list?run_id={run_id}")["files"]}
    assert {"config.yaml", "_manifest.json", "predictions"} <= top
    for rank in (0, 1):
        files = get(f"{api}/artifacts/list?run_id={run_id}&path=predictions/rank-{rank:05d}")["files"]
        assert files and all(f["path"].split("/")[-1].startswith(f"part-r{rank:05d}") for f in files)
    assert f"{mlflow_server}/#/experiments/" in r.stdout
