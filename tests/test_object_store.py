"""Output to (and input from) a real S3 API: moto's standalone server on 127.0.0.1, with IAM auth on.

The job gets s3:// URLs and the standard AWS variables, exactly as a user's job would;
nothing in hvd_infer knows it talks to moto.
"""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import psutil
import pyarrow.dataset as pads
import pytest

from builders import plain_probs as reference_probs
from conftest import assert_same_predictions, cli, free_port, horovodrun, http_ready, python_m, wait_for
from hvd_infer.config import DataConfig
from hvd_infer.dataset import open_input
from hvd_infer.reader import read_parts
from hvd_infer.shard_plan import plan_parts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3():
    """(env for the job, an s3fs filesystem for the test): a moto server whose only valid key is ours."""
    import boto3
    import s3fs

    port = free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    # Requests are authenticated (and bad keys refused) after the first 3: the IAM user, its key, its policy.
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            env=dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="3"))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: http_ready(url + "/moto-api/"), "moto_server to start", timeout=60)
        iam = boto3.client("iam", endpoint_url=url, region_name="us-east-1", aws_access_key_id="bootstrap",
                           aws_secret_access_key="bootstrap")
        iam.create_user(UserName="scorer")
        key = iam.create_access_key(UserName="scorer")["AccessKey"]
        iam.put_user_policy(UserName="scorer", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        env = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
               "AWS_ENDPOINT_URL": url, "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
               "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}
        fs = s3fs.S3FileSystem(key=key["AccessKeyId"], secret=key["SecretAccessKey"], endpoint_url=url,
                               skip_instance_cache=True)
        fs.mkdir("inputs")
        fs.mkdir("preds")
        yield env, fs
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def s3_dataset(s3, dataset):
    """The conftest dataset (157 rows, 3 files, row groups of 7) uploaded to s3://inputs/ds/."""
    env, fs = s3
    fs.put(dataset[0] + "/", "inputs/ds/", recursive=True)
    return "s3://inputs/ds", dataset[1]


def args(model, data, out, tmp, *extra):
    return ["--config", "/dev/null", f"model.path={model}", f"data.path={data}", "data.id_columns=[id,doc]",
            f"output.path={out}", f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db", "data.batch_size=8",
            "output.rows_per_part=40", "runtime.progress=false", *extra]


def read_s3(fs, prefix):
    return pads.dataset(prefix, filesystem=fs, format="parquet").to_table().to_pandas()


def cli_fresh(args, env):
    """cli (a job refused before any rank starts, in this process) as a fresh process would meet the store:
    fsspec caches an S3 filesystem (its client, credentials and listings) per set of options, not per
    environment, so none is left from an earlier call or for a later one."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    try:
        return cli(args, env=env)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def parts_in(fs, prefix):
    return [p for p in (fs.find(prefix) if fs.exists(prefix) else []) if p.startswith(prefix + "/part-")]


def assert_user_error(r, *fragments):
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("hvd_infer: error: "), r.stderr[-3000:]
    for f in fragments:
        assert f in line, line


def test_two_ranks_s3_in_and_out_exactly_once(s3, s3_dataset, tiny_classifier, tmp_path):
    env, fs = s3
    data, table = s3_dataset
    r = horovodrun(2, args(tiny_classifier, data, "s3://preds/two", tmp_path), env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "predictions: s3://preds/two" in r.stdout
    names = [p.split("/", 2)[2] for p in fs.find("preds/two")]
    assert "_SUCCESS" in names and "_manifest.json" in names and "_hvd_infer_job.json" in names
    assert any(n.startswith("part-r00000") for n in names) and any(n.startswith("part-r00001") for n in names)
    assert not [n for n in names if ".tmp" in n]  # no temporary objects on a store
    got = read_s3(fs, "preds/two")  # pyarrow.dataset through fsspec: _ files are skipped
    assert sorted(got["id"]) == sorted(table.column("id").to_pylist())  # every id exactly once
    ref = reference_probs(tiny_classifier, table.column("text").to_pylist())
    by_id = {i: k for k, i in enumerate(table.column("id").to_pylist())}
    rows = [by_id[i] for i in got["id"]]
    np.testing.assert_allclose(np.stack(got["probs"].to_numpy()), ref[rows], atol=1e-5)
    manifest = json.loads(fs.cat("preds/two/_manifest.json"))
    assert manifest["rows"] == table.num_rows and {p["rank"] for p in manifest["parts"]} == {0, 1}
    db = sqlite3.connect(tmp_path / "mlflow.db")
    (status,), = db.execute("select status from runs").fetchall()
    assert status == "FINISHED"


def test_overwrite_and_foreign_objects_with_storage_options(s3, tiny_classifier, dataset, tmp_path):
    """Credentials and endpoint in output.storage_options alone (no AWS_* variables); masked everywhere."""
    env, fs = s3
    data, table = dataset
    opts = ["output.storage_options={key: %s, secret: %s, endpoint_url: %s}" % (
        env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], env["AWS_ENDPOINT_URL"])]
    no_aws = {k: v for k, v in env.items() if k.startswith("AWS_") and k not in (
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")}
    out = "s3://preds/ow"
    fs.pipe("preds/ow/_parts/part-r00000-000000000000-000000000040.parquet.json", b"{}")  # looks like ours, no job file
    assert_user_error(cli_fresh(args(tiny_classifier, data, out, tmp_path, "output.mode=overwrite", *opts), no_aws),
                      "was not written by hvd_infer")
    fs.rm("preds/ow", recursive=True)
    assert python_m(args(tiny_classifier, data, out, tmp_path, *opts), env=no_aws).returncode == 0
    assert_user_error(cli_fresh(args(tiny_classifier, data, out, tmp_path, *opts), no_aws), "is not empty",
                      "output.mode=overwrite")
    r = python_m(args(tiny_classifier, data, out, tmp_path, "output.mode=overwrite", "output.rows_per_part=60", *opts),
                 env=no_aws)
    assert r.returncode == 0, r.stderr[-3000:]
    fs.invalidate_cache()
    names = sorted(p.split("/", 2)[2] for p in fs.find("preds/ow"))
    assert [n for n in names if n.startswith("part-")] == [
        "part-r00000-000000000000-000000000060.parquet", "part-r00000-000000000060-000000000120.parquet",
        "part-r00000-000000000120-000000000157.parquet"]  # the 40-row parts of the first run are gone
    assert not any("000000000040" in n for n in names) and "_SUCCESS" in names
    assert sorted(read_s3(fs, "preds/ow")["id"]) == sorted(table.column("id").to_pylist())
    # An object hvd_infer did not write: never deleted, never mixed with.
    fs.pipe("preds/ow/notes/readme.txt", b"keep me")
    assert_user_error(cli_fresh(args(tiny_classifier, data, out, tmp_path, "output.mode=overwrite", *opts), no_aws),
                      "was not written by hvd_infer", "notes/readme.txt")
    assert fs.cat("preds/ow/notes/readme.txt") == b"keep me" and fs.exists("preds/ow/_SUCCESS")
    db = sqlite3.connect(tmp_path / "mlflow.db")
    logged = {v for (v,) in db.execute("select value from params where key like 'output.storage_options.%'")}
    assert "***" in logged and env["AWS_SECRET_ACCESS_KEY"] not in logged and env["AWS_ENDPOINT_URL"] in logged
    assert env["AWS_SECRET_ACCESS_KEY"] not in fs.cat("preds/ow/_hvd_infer_job.json").decode()


@pytest.mark.parametrize("case", ["endpoint", "bucket", "wrong_secret", "no_credentials", "input_bucket"])
def test_bad_store_one_line_exit_2_before_scoring(case, s3, s3_dataset, tiny_classifier, dataset, tmp_path):
    env, fs = s3
    env = dict(env)
    data, out = dataset[0], "s3://preds/bad-" + case
    if case == "endpoint":
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
        expect = ["output.path s3://preds/bad-endpoint", "endpoint does not answer", "AWS_ENDPOINT_URL"]
    elif case == "bucket":
        out = "s3://no-such-bucket/preds"
        expect = ["output.path s3://no-such-bucket/preds", "does the bucket exist"]
    elif case == "wrong_secret":
        env["AWS_SECRET_ACCESS_KEY"] = "wrong"
        expect = ["output.path s3://preds/bad-wrong_secret", "access denied", "signature"]
    elif case == "no_credentials":
        del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
        expect = ["output.path", "no credentials found", "AWS_ACCESS_KEY_ID"]
    else:
        data = "s3://no-such-bucket/ds"
        expect = ["data.path s3://no-such-bucket/ds", "does not exist"]
    r = cli_fresh(args(tiny_classifier, data, out, tmp_path), env)
    assert_user_error(r, *expect)
    assert not fs.exists(out.replace("s3://", ""))  # nothing written, nothing scored
    assert "Traceback" not in r.stderr


def test_killed_launcher_then_resume_on_s3(s3, minilm_job, minilm_reference, tmp_path):
    """The whole launcher is killed mid-job; a resume scores only the rest and closes the dead run."""
    env, fs = s3
    model, data, table = minilm_job
    fs.put(str(data) + "/", "inputs/kill/", recursive=True)
    job = args(model, "s3://inputs/kill", "s3://preds/kill", tmp_path, "output.rows_per_part=8")
    exe = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    proc = subprocess.Popen([exe, "-np", "2", "-H", "localhost:2", sys.executable, "-m", "hvd_infer"] + job,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=dict(os.environ, **env))
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            fs.invalidate_cache()
            if len(parts_in(fs, "preds/kill")) >= 4:
                break
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            time.sleep(0.2)
        # The launcher and its ranks (horovodrun starts them in their own process groups): nobody marks the run.
        ranks = [p for p in psutil.process_iter(["cmdline"]) if "s3://preds/kill" in " ".join(p.info["cmdline"] or [])
                 and p.pid != proc.pid]
        os.killpg(proc.pid, signal.SIGKILL)
        for p in ranks:
            p.kill()
        proc.wait(timeout=60)
        psutil.wait_procs(ranks, timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    fs.invalidate_cache()
    assert not fs.exists("preds/kill/_SUCCESS")
    before = {p: fs.info(p)["LastModified"] for p in parts_in(fs, "preds/kill")}
    done_rows = sum(int(p.rsplit("-", 1)[1].split(".")[0]) - int(p.rsplit("-", 2)[1]) for p in before)
    assert 0 < done_rows < table.num_rows

    r = horovodrun(2, job + ["output.mode=resume"], env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    fs.invalidate_cache()
    got = read_s3(fs, "preds/kill").sort_values("id").reset_index(drop=True)
    assert sorted(got["id"]) == sorted(table.column("id").to_pylist())  # exactly once
    assert_same_predictions(got, minilm_reference, atol=1e-5)  # what the job gives uninterrupted, every column
    for p, modified in before.items():  # no finished part was rewritten
        assert fs.info(p)["LastModified"] == modified, p
    summary = json.loads(fs.cat("preds/kill/_manifest.json"))["summary"]
    assert summary["rows"] == table.num_rows - done_rows, (sorted(before), r.stdout[-3000:])
    db = sqlite3.connect(tmp_path / "mlflow.db")
    runs = dict(db.execute("select run_uuid, status from runs").fetchall())
    assert sorted(runs.values()) == ["FINISHED", "KILLED"]
    dead = next(k for k, v in runs.items() if v == "KILLED")
    tags = dict(db.execute("select key, value from tags where run_uuid=?", (dead,)).fetchall())
    assert runs[tags["hvd_infer.superseded_by"]] == "FINISHED"


def test_delta_table_on_s3_from_env_then_appended_with_storage_options(s3, s3_dataset, tiny_classifier, dataset,
                                                                       tmp_path):
    """output.format=delta on a store: the AWS_* variables, then fsspec's storage_options alone (the same rows read
    from a local copy), as deltalake's."""
    from deltalake import DeltaTable

    env, fs = s3
    data, table = s3_dataset
    out = "s3://preds/delta"
    r = python_m(args(tiny_classifier, data, out, tmp_path, "output.format=delta"), env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert f"predictions: {out} (Delta table, version 0)" in r.stdout
    opts = {"key": env["AWS_ACCESS_KEY_ID"], "secret": env["AWS_SECRET_ACCESS_KEY"],
            "endpoint_url": env["AWS_ENDPOINT_URL"]}
    no_aws = {k: v for k, v in env.items() if k.startswith("AWS_") and k not in (
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")}
    r = python_m(args(tiny_classifier, dataset[0], out, tmp_path, "output.format=delta", "output.mode=append",
                      "output.storage_options={key: %(key)s, secret: %(secret)s, endpoint_url: %(endpoint_url)s}"
                      % opts), env=no_aws)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    reader = {"AWS_ACCESS_KEY_ID": opts["key"], "AWS_SECRET_ACCESS_KEY": opts["secret"],
              "AWS_ENDPOINT_URL": opts["endpoint_url"], "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}
    delta = DeltaTable(out, storage_options=reader)
    assert [h["operation"] for h in reversed(delta.history())] == ["CREATE TABLE", "WRITE"]
    ids = delta.to_pandas()["id"].tolist()
    assert sorted(ids) == sorted(table.column("id").to_pylist() * 2)  # each job's rows exactly once
    protocol = delta.protocol()
    assert (protocol.min_reader_version, protocol.min_writer_version, protocol.writer_features) == (1, 2, None)
    fs.invalidate_cache()
    assert not [p for p in fs.find("preds/delta") if ".tmp" in p]


def test_pyarrow_reader_reads_a_store_as_petastorm_does(s3, s3_dataset):
    """Rank 1 of 2's rows from s3://, chunk by chunk, through both readers (data.reader; test_reader.py locally)."""
    env, _ = s3
    data, table = s3_dataset
    options = {"key": env["AWS_ACCESS_KEY_ID"], "secret": env["AWS_SECRET_ACCESS_KEY"],
               "endpoint_url": env["AWS_ENDPOINT_URL"]}
    inp = open_input(DataConfig(path=data, id_columns=["id", "doc"], storage_options=options))
    parts = plan_parts(inp.row_groups, 1, 2, 40)
    got = {reader: [{c: v.tolist() for c, v in chunk.items()}
                    for _, chunks in read_parts(inp, parts, ["id", "doc", "text"], reader) for chunk in chunks]
           for reader in ("petastorm", "pyarrow")}
    assert got["pyarrow"] == got["petastorm"]
    assert [i for chunk in got["pyarrow"] for i in chunk["id"]] == table.column("id").to_pylist()[table.num_rows // 2:]
