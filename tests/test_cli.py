"""The command line as users type it: the `hvd-infer` entry point, --print-config, no arguments,
and a user error (exit 2, one line) told apart from an internal error (exit 1, a traceback).

What needs a process of its own is slow: the entry point itself, a fresh interpreter's PYTHONPATH and
cwd, an uncaught exception's traceback and exit code, real ranks. The rest runs in process (conftest.cli).
"""
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, cli, python_m
from hvd_infer.config import load_config

HVD_INFER = os.path.join(os.path.dirname(sys.executable), "hvd-infer")  # what `pip install` puts on PATH


def hvd_infer_cli(args, cwd=REPO):
    return subprocess.run([HVD_INFER] + list(args), capture_output=True, text=True, timeout=300, cwd=cwd)


def job_args(model, data, out, *extra):
    return ["--config", "/dev/null", f"model.path={model}", f"data.path={data}", f"output.path={out}",
            "mlflow.enabled=false", "runtime.progress=false", *extra]


@pytest.mark.slow  # the entry point itself, in tmp_path: relative paths resolve against the cwd
def test_print_config_masks_secrets_and_reads_back(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("model:\n  path: models/m\ndata:\n  path: data\noutput:\n  path: out\n"
                   "mlflow:\n  tracking_uri: https://alice:s3cret@mlflow.example.com\n  tags:\n    api_token: t0ken\n")
    r = hvd_infer_cli(["--config", str(job), "--print-config", "data.batch_size=16"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "s3cret" not in r.stdout and "t0ken" not in r.stdout
    printed = yaml.safe_load(r.stdout)
    assert printed["mlflow"]["tracking_uri"] == "https://***@mlflow.example.com"
    assert printed["mlflow"]["tags"]["api_token"] == "***"
    # Everything else is the resolved config: absolute paths, the override applied, every default there.
    assert printed["model"]["path"] == str(tmp_path / "models" / "m") and printed["data"]["batch_size"] == 16
    assert load_config(printed).to_dict() == printed


@pytest.mark.slow  # a fresh interpreter that imports the copy (PYTHONPATH, cwd)
def test_no_arguments_without_the_demo_says_how_to_build_it(tmp_path):
    """`python -m hvd_infer` alone runs conf/default.yaml, the demo; a checkout where scripts/make_demo.py
    has not run yet (CI, a fresh clone) gets one line saying how to build it. A copy of the package and
    conf/ stands for such a checkout, whether or not this one has demo/ built."""
    for d in ("hvd_infer", "conf"):
        shutil.copytree(os.path.join(REPO, d), tmp_path / d, ignore=shutil.ignore_patterns("__pycache__"))
    r = python_m([], env={"PYTHONPATH": str(tmp_path)}, cwd=tmp_path)
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-2000:])
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("hvd_infer: error: the demo is not built")
    assert str(tmp_path / "demo" / "model") in r.stderr and "scripts/make_demo.py" in r.stderr
    assert not (tmp_path / "demo").exists()  # nothing written


def test_user_error_one_line(tiny_classifier, dataset, tmp_path):
    user = cli(job_args(tiny_classifier, dataset[0], tmp_path / "out1", "data.batch_size=0"))
    assert user.returncode == 2
    assert user.stderr == "hvd_infer: error: data.batch_size must be >= 1, got 0\n"


@pytest.mark.slow  # an uncaught exception: the interpreter prints its traceback and exits 1
def test_internal_error_traceback(tiny_classifier, dataset, tmp_path):
    # A half-copied tokenizer file: nothing the config could have caught, so not a user error.
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_classifier, broken)
    (broken / "tokenizer.json").write_bytes((broken / "tokenizer.json").read_bytes()[:300])
    internal = hvd_infer_cli(job_args(broken, dataset[0], tmp_path / "out2"))
    assert internal.returncode == 1, (internal.returncode, internal.stderr[-2000:])
    assert "Traceback (most recent call last)" in internal.stderr and "JSONDecodeError" in internal.stderr
    assert "hvd_infer: error:" not in internal.stderr


def server_down(tiny_classifier, dataset, tmp_path):
    """(job args whose mlflow.tracking_uri nobody listens at, the one line both the launcher and rank 0 say)."""
    from conftest import free_port

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    args = job_args(tiny_classifier, dataset[0], tmp_path / "out", "mlflow.enabled=true", f"mlflow.tracking_uri={uri}")
    return args, (f"hvd_infer: error: MLflow: no tracking server answers at mlflow.tracking_uri={uri} "
                  "(connection refused); start it, fix the URI, or set mlflow.enabled=false\n")


def test_tracking_server_down_is_one_line_from_the_launcher(tiny_classifier, dataset, tmp_path):
    """`hvd-infer -np 2`: the launcher's preflight (in process here: it fails before starting horovodrun)."""
    args, line = server_down(tiny_classifier, dataset, tmp_path)
    launched = cli(["-np", "2"] + args)
    assert (launched.returncode, launched.stderr) == (2, line), launched.stdout[-2000:] + launched.stderr[-2000:]
    assert not (tmp_path / "out").exists()  # the launcher's preflight writes nothing


@pytest.mark.slow
def test_tracking_server_down_is_one_line_from_the_ranks(tiny_classifier, dataset, tmp_path):
    from conftest import horovodrun

    args, line = server_down(tiny_classifier, dataset, tmp_path)
    # horovodrun started directly: rank 0 says the same line at once (MLflow alone would retry ~4 minutes).
    ranks = horovodrun(2, args, timeout=180)
    assert ranks.returncode != 0 and f"[0]<stderr>:{line}" in ranks.stdout + ranks.stderr, ranks.stderr[-3000:]
    assert not (tmp_path / "out" / "_SUCCESS").exists() and not list((tmp_path / "out").glob("*.parquet"))
