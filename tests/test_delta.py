"""output.format=delta: the ranks' parts committed by rank 0 to a Delta table in one transaction per job.

In process: the commit and the checks on parts written by hvd_infer.writer itself (no model). Slow: real
ranks through `hvd-infer -np 2` on the kill-and-resume job (conftest's minilm_job), read back with deltalake and
with pandas, against the job run uninterrupted (minilm_reference). On S3: test_object_store.
"""
import json
import os
import sys

import pandas as pd
import pyarrow as pa
import pytest

from conftest import assert_same_predictions, cli, hvd_infer_np, job_args, read_output, start_and_kill_rank_1
from hvd_infer.config import load_config
from hvd_infer.errors import ConfigError, OutputError
from hvd_infer.shard_plan import Part
from hvd_infer.writer import check_output, commit_table, prepare_output, write_part

DeltaTable = pytest.importorskip("deltalake").DeltaTable

SCHEMA = pa.schema([("id", pa.int64()), ("label", pa.string()), ("score", pa.float32()),
                    ("probs", pa.list_(pa.float32()))])
IDENTITY = {"input": "fingerprint", "dtype": "auto", "output_format": "delta"}


def config(out, fmt="delta", **output):
    return load_config({"model": {"path": "/m"}, "data": {"path": "/d"},
                        "output": {"path": str(out), "format": fmt, **output}})


def rows(start, stop, first_id=0):
    n = stop - start
    return pa.table({"id": pa.array(range(first_id + start, first_id + stop), pa.int64()), "label": ["a"] * n,
                     "score": pa.array([0.5] * n, pa.float32()), "probs": pa.array([[0.5, 0.5]] * n,
                                                                                   pa.list_(pa.float32()))},
                    schema=SCHEMA)


def write_job(cfg, bounds, first_id=0, identity=IDENTITY):
    """What the ranks of a job do before its commit: rank 0 prepares the output, the parts not done are written."""
    state = prepare_output(cfg, identity, SCHEMA)
    for k, (start, stop) in enumerate(bounds):
        if (start, stop) not in state.done:
            write_part(cfg, k % 2, Part(start, stop), rows(start, stop, first_id), 0, [], state.job)
    return state


def table_ids(out, version=None):
    return sorted(DeltaTable(str(out), version=version).to_pandas()["id"])


def commits(out):
    """The jobs that committed, oldest first."""
    return [h.get("hvd_infer.job") for h in reversed(DeltaTable(str(out)).history())]


def assert_readable_everywhere(out):
    """The protocol Databricks 15.4 and 17.3 (and every other Delta reader) read: 1/2, no table features."""
    p = DeltaTable(str(out)).protocol()
    assert (p.min_reader_version, p.min_writer_version, p.reader_features, p.writer_features) == (1, 2, None, None)
    actions = [json.loads(line) for name in sorted(os.listdir(out / "_delta_log")) if name.endswith(".json")
               for line in (out / "_delta_log" / name).read_text().splitlines()]
    assert {k for a in actions for k in a} <= {"protocol", "metaData", "add", "remove", "commitInfo", "txn"}
    assert all(a["metaData"]["configuration"] == {} for a in actions if "metaData" in a)


def test_each_job_one_commit_create_append_overwrite(tmp_path):
    out = tmp_path / "table"
    first = write_job(config(out), [(0, 10), (10, 25)])
    assert not (out / "_delta_log").exists()  # parts written, nothing committed: a reader sees no table yet
    assert commit_table(config(out), first, SCHEMA) == 0
    assert table_ids(out) == list(range(25)) and commits(out) == [first.job]
    stats = pa.table(DeltaTable(str(out)).get_add_actions(flatten=True)).to_pydict()
    assert sorted(stats["num_records"]) == [10, 15]
    assert_readable_everywhere(out)
    kept = {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out) if n.startswith("part-")}

    appended = write_job(config(out, mode="append"), [(0, 5)], first_id=100)
    assert appended.job != first.job
    assert commit_table(config(out, mode="append"), appended, SCHEMA) == 1
    assert table_ids(out) == list(range(25)) + list(range(100, 105)) and commits(out) == [first.job, appended.job]
    # Committed again (rank 0 stopped after its commit, then the job resumed): no second commit.
    assert commit_table(config(out, mode="resume"), appended, SCHEMA) == 1 and len(commits(out)) == 2

    replaced = write_job(config(out, mode="overwrite"), [(0, 3)], first_id=200)
    assert commit_table(config(out, mode="overwrite"), replaced, SCHEMA) == 2
    assert table_ids(out) == [200, 201, 202]
    assert table_ids(out, version=1) == list(range(25)) + list(range(100, 105))  # older versions still read
    assert {n: os.stat(out / n).st_mtime_ns for n in kept} == kept  # no job deleted or rewrote another's parts
    assert_readable_everywhere(out)


def test_resume_commits_every_part_once_with_the_jobs_own_mode(tmp_path):
    out = tmp_path / "table"
    first = write_job(config(out), [(0, 10)])
    commit_table(config(out), first, SCHEMA)
    # An overwrite killed after one of its three parts: the table still shows the earlier job alone.
    killed = write_job(config(out, mode="overwrite"), [(0, 10)], first_id=50)
    assert table_ids(out) == list(range(10))
    resumed = write_job(config(out, mode="resume"), [(0, 10), (10, 20), (20, 30)], first_id=50)
    assert (resumed.job, resumed.commit, resumed.done) == (killed.job, "overwrite", [(0, 10)])
    assert commit_table(config(out, mode="resume"), resumed, SCHEMA) == 1
    assert table_ids(out) == list(range(50, 80))  # every id exactly once, the earlier job's replaced
    assert commits(out) == [first.job, killed.job]


def refused(cfg, schema=SCHEMA, identity=IDENTITY):
    """check_output's one line; it wrote nothing."""
    root = cfg.output.path
    before = sorted(os.walk(root)) if os.path.exists(root) else None
    with pytest.raises(OutputError) as e:
        check_output(cfg, identity, schema)
    assert (sorted(os.walk(root)) if os.path.exists(root) else None) == before
    assert "\n" not in str(e.value)
    return str(e.value)


def test_outputs_a_delta_job_cannot_use_refused_in_one_line(tmp_path):
    table = tmp_path / "table"
    commit_table(config(table), write_job(config(table), [(0, 10)]), SCHEMA)
    other = pa.schema([("id", pa.int64()), ("label", pa.string()), ("probs", pa.list_(pa.float64())),
                       ("extra", pa.string())])
    for mode in ("append", "overwrite"):
        line = refused(config(table, mode=mode), other)
        assert "is a Delta table whose columns differ from this job's" in line
        assert "probs (table array<float>, job array<double>)" in line
        assert "not in the job: score" in line and "not in the table: extra" in line
    assert "is not empty" in refused(config(table))
    assert "output.format=delta" in refused(config(table, "parquet", mode="overwrite"), identity={"dtype": "auto"})

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    for mode in ("append", "overwrite"):
        assert "was not written by hvd_infer" in refused(config(foreign, mode=mode))

    parquet = tmp_path / "parquet"
    write_job(config(parquet, "parquet"), [(0, 10)], identity={"dtype": "auto"})
    assert "output.mode=append adds to a Delta table" in refused(config(parquet, mode="append"))
    assert "output_format changed" in refused(config(parquet, mode="resume"))

    (table / "_hvd_infer_job.json").unlink()  # as a table another tool wrote
    assert "holds no hvd_infer job to finish" in refused(config(table, mode="resume"))
    prepare_output(config(table, mode="append"), IDENTITY, SCHEMA)  # which appends take


def test_append_is_for_delta_only():
    with pytest.raises(ConfigError) as e:
        config("/o", "parquet", mode="append")
    assert str(e.value) == ("output.mode must be one of error, overwrite, resume for output.format=parquet (got "
                            "append, which adds rows to a Delta table): set output.format=delta to append")


def test_storage_options_for_s3(monkeypatch):
    from hvd_infer.delta import storage_options

    for k in list(os.environ):
        if k.startswith("AWS_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "env-key")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    assert storage_options("s3://b/t", {"secret": "s", "client_kwargs": {"endpoint_url": "http://minio:9000"}}) == {
        "AWS_ACCESS_KEY_ID": "env-key", "AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": "eu-west-1",
        "AWS_ENDPOINT_URL": "http://minio:9000", "AWS_ALLOW_HTTP": "true", "AWS_S3_ALLOW_UNSAFE_RENAME": "true"}
    given = storage_options("s3://b/t", {"key": "k", "endpoint_url": "https://s3.example.com",
                                         "AWS_S3_LOCKING_PROVIDER": "dynamodb"})
    assert given["AWS_ACCESS_KEY_ID"] == "k" and "AWS_ALLOW_HTTP" not in given
    assert "AWS_S3_ALLOW_UNSAFE_RENAME" not in given  # a locking provider makes concurrent commits safe
    assert storage_options("abfss://c@a.dfs.core.windows.net/t", {"account_name": "a"}) == {"account_name": "a"}


@pytest.fixture(scope="module")
def refusals(tmp_path_factory, tiny_classifier, dataset):
    """A Delta table of the tiny classifier's columns with ids [id, doc], and a folder hvd_infer did not write."""
    tmp = tmp_path_factory.mktemp("refusals")
    table = tmp / "table"
    cfg = load_config({"model": {"path": tiny_classifier}, "data": {"path": dataset[0], "id_columns": ["id", "doc"]},
                       "output": {"path": str(table), "format": "delta"}})
    schema = pa.schema([("id", pa.int64()), ("doc", pa.string()), ("label", pa.string()), ("score", pa.float32()),
                        ("probs", pa.list_(pa.float32()))])
    state = prepare_output(cfg, IDENTITY, schema)
    commit_table(cfg, state, schema)
    (tmp / "foreign").mkdir()
    (tmp / "foreign" / "a.txt").write_text("x")
    return tmp, [
        ("columns differ", job_args(tiny_classifier, dataset[0], table, tmp, "output.format=delta",
                                    "output.mode=append", "data.id_columns=[id]"),
         [f"output.path {table} is a Delta table whose columns differ", "not in the job: doc"]),
        ("not a table, not ours", job_args(tiny_classifier, dataset[0], tmp / "foreign", tmp, "output.format=delta",
                                           "output.mode=overwrite"), ["was not written by hvd_infer"]),
        ("append without delta", job_args(tiny_classifier, dataset[0], tmp / "new", tmp, "output.mode=append"),
         ["set output.format=delta to append"]),
    ]


def assert_one_line(r, *fragments):
    lines = [l for l in (r.stdout + r.stderr).splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("hvd_infer: error: "), lines[-20:]
    for f in fragments:
        assert f in lines[0], lines[0]


def listing(tmp):
    return sorted((root, sorted(files)) for root, _, files in os.walk(tmp))


def test_launcher_and_spark_refuse_before_any_rank_starts(refusals, tiny_classifier, dataset, monkeypatch):
    """`-np 2` in process (no process may start here: conftest) and run_on_spark, which checks on the driver before
    it starts Spark; neither writes anything."""
    from hvd_infer.config import parse_override
    from hvd_infer.spark import run_on_spark

    tmp, cases = refusals
    before = listing(tmp)
    for name, args, fragments in cases:
        assert_one_line(cli(["-np", "2"] + args), *fragments)
        with pytest.raises((OutputError, ConfigError)) as e:
            run_on_spark("/dev/null", num_proc=2, **dict(parse_override(a) for a in args[2:]))
        assert all(f in str(e.value) for f in fragments), (name, str(e.value))
        assert listing(tmp) == before and not (tmp / "new").exists(), name
    monkeypatch.setitem(sys.modules, "deltalake", None)  # as where it is not installed
    args = job_args(tiny_classifier, dataset[0], tmp / "new", tmp, "output.format=delta")
    assert_one_line(cli(["-np", "2"] + args), "output.format=delta needs the deltalake package",
                    "pip install deltalake")
    assert listing(tmp) == before and not (tmp / "new").exists()


# -- real ranks ------------------------------------------------------------------------------------------------


def delta_args(model, data, out, tmp, *extra):
    return job_args(model, data, out, tmp, "output.format=delta", "mlflow.enabled=false", *extra)


@pytest.fixture(scope="module")
def two_rank_table(minilm_job, tmp_path_factory):
    """(out, args, completed process): `hvd-infer -np 2` on minilm_job into a new Delta table."""
    model, data, _ = minilm_job
    tmp = tmp_path_factory.mktemp("two_rank_table")
    args = delta_args(model, data, tmp / "out", tmp)
    r = hvd_infer_np(2, args)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return tmp / "out", args, r


@pytest.mark.slow
def test_two_ranks_one_commit_read_back_by_deltalake_and_pandas(two_rank_table, minilm_reference):
    out, _, r = two_rank_table
    assert f"predictions: {out} (Delta table, version 0)" in r.stdout
    table = DeltaTable(str(out))
    assert len(table.history()) == 1
    assert_readable_everywhere(out)
    by_deltalake = table.to_pandas().sort_values("id").reset_index(drop=True)
    assert_same_predictions(by_deltalake, minilm_reference)
    by_pandas = pd.concat([pd.read_parquet(f) for f in table.file_uris()]).sort_values("id").reset_index(drop=True)
    assert_same_predictions(by_pandas, minilm_reference)
    summary = json.loads((out / "_manifest.json").read_text())["summary"]
    assert summary["delta_table"]["version"] == 0 and summary["delta_table"]["path"] == str(out)


@pytest.mark.slow
def test_refused_through_the_launcher_writes_nothing(two_rank_table, minilm_job):
    out, args, _ = two_rank_table
    before, version = sorted(os.listdir(out)), DeltaTable(str(out)).version()
    r = hvd_infer_np(2, args + ["output.mode=append", "data.id_columns=[id]"])
    assert_one_line(r, "is a Delta table whose columns differ", "not in the job: doc")
    assert sorted(os.listdir(out)) == before and DeltaTable(str(out)).version() == version


@pytest.mark.slow
def test_append_adds_one_commit(two_rank_table, tiny_classifier, dataset, tmp_path):
    out, _, _ = two_rank_table
    table = DeltaTable(str(out))
    version, rows, files = table.version(), len(table.to_pandas()), set(table.file_uris())
    # A world of one in this process: another model of the same task gives the table's columns.
    r = cli(delta_args(tiny_classifier, dataset[0], out, tmp_path, "output.mode=append"))
    assert r.returncode == 0, r.stderr[-3000:]
    table = DeltaTable(str(out))
    assert table.version() == version + 1 and len(table.to_pandas()) == rows + dataset[1].num_rows
    assert files < set(table.file_uris())  # the earlier jobs' files are all still in the table
    assert f"predictions: {out} (Delta table, version {version + 1})" in r.stdout


@pytest.mark.slow
def test_killed_rank_then_resume_commits_the_job_once(minilm_job, minilm_reference, tmp_path):
    model, data, table = minilm_job
    out = tmp_path / "out"
    args = delta_args(model, data, out, tmp_path, "output.rows_per_part=8")
    code, _, output = start_and_kill_rank_1([sys.executable, "-m", "hvd_infer", "-np", "2"] + args, out,
                                            "HOROVOD_RANK")
    assert code == 1, output[-3000:]
    assert not (out / "_delta_log").exists()  # no commit: a reader sees none of the job
    before = {n: os.stat(out / n) for n in os.listdir(out) if n.startswith("part-")}
    assert 0 < len(before) < table.num_rows // 8

    r = hvd_infer_np(2, args + ["output.mode=resume"])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    got = DeltaTable(str(out)).to_pandas().sort_values("id").reset_index(drop=True)
    assert_same_predictions(got, minilm_reference)  # every id exactly once, every column as uninterrupted
    assert_same_predictions(read_output(out), minilm_reference)  # the job's files alone are in the folder
    assert len(DeltaTable(str(out)).history()) == 1
    for n, st in before.items():  # no finished part was recomputed
        now = os.stat(out / n)
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), n
