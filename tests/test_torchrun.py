"""The job on torch.distributed: torchrun --nproc-per-node 2 -m hvd_infer, compared with horovodrun -np 2."""
import json
import os
import sqlite3
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from conftest import assert_same_predictions, hvd_infer_np, job_args, read_output, start_and_kill_rank_1, torchrun

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory, tiny_classifier, dataset):
    tmp = tmp_path_factory.mktemp("torchrun")
    out = tmp / "out"
    r = torchrun(2, job_args(tiny_classifier, dataset[0], out, tmp))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return tmp, out, r


def test_same_predictions_as_horovodrun(torchrun_run, horovodrun_reference, dataset):
    tmp, out, r = torchrun_run
    got = read_output(out)
    assert_same_predictions(got, horovodrun_reference, atol=1e-6)
    assert sorted(got["id"]) == sorted(dataset[1].column("id").to_pylist())  # exactly once
    assert (out / "_SUCCESS").exists()
    manifest = json.loads((out / "_manifest.json").read_text())
    assert {p["rank"] for p in manifest["parts"]} == {0, 1} and manifest["rows"] == dataset[1].num_rows


def test_summary_and_mlflow_run(torchrun_run, dataset):
    tmp, out, r = torchrun_run
    assert r.stdout.count("hvd_infer: text-classification with") == 1 and r.stdout.count(f"predictions: {out}") == 1
    db = sqlite3.connect(tmp / "mlflow.db")
    (run_id, status), = db.execute("select run_uuid, status from runs").fetchall()
    assert status == "FINISHED"
    params = dict(db.execute("select key, value from params where run_uuid=?", (run_id,)).fetchall())
    assert params["world_size"] == "2"
    metrics = dict(db.execute("select key, value from metrics where run_uuid=?", (run_id,)).fetchall())
    assert metrics["rows"] == dataset[1].num_rows and metrics["rank_0_rows"] + metrics["rank_1_rows"] == metrics["rows"]


def test_user_error_printed_once(tiny_classifier, dataset, tmp_path):
    r = torchrun(2, job_args(tiny_classifier, dataset[0], tmp_path / "out", tmp_path, "data.text_column=body"))
    assert r.returncode != 0
    lines = [l for l in (r.stdout + r.stderr).splitlines() if "hvd_infer: error:" in l]
    assert len(lines) == 1 and "data.text_column 'body' not found" in lines[0], r.stderr[-3000:]
    assert not (tmp_path / "out").exists()


def test_killed_rank_ends_the_job_then_horovod_resumes_it(minilm_job, minilm_reference, tmp_path):
    model, data, table = minilm_job
    out = tmp_path / "out"
    args = job_args(model, data, out, tmp_path, "output.rows_per_part=8", "data.batch_size=8")
    exe = os.path.join(os.path.dirname(sys.executable), "torchrun")
    code, seconds, output = start_and_kill_rank_1([exe, "--nproc-per-node", "2", "-m", "hvd_infer"] + args, out,
                                                  "RANK")
    assert code != 0 and seconds < 60, (code, seconds, output[-3000:])
    assert not (out / "_SUCCESS").exists()
    before = {n: os.stat(out / n) for n in os.listdir(out) if n.startswith("part-")}
    done_rows = sum(pq.ParquetFile(out / n).metadata.num_rows for n in before)
    assert 0 < done_rows < table.num_rows

    r = hvd_infer_np(2, args + ["output.mode=resume"])  # across backends: Horovod finishes it
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    # Every id exactly once, every column equal to the job run uninterrupted.
    assert_same_predictions(read_output(out), minilm_reference, atol=1e-5)
    for n, st in before.items():  # no finished part was recomputed
        now = os.stat(out / n)
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), n
    assert json.loads((out / "_manifest.json").read_text())["summary"]["rows"] == table.num_rows - done_rows


def test_rank_context_collectives_over_gloo(tmp_path):
    """The context's collectives under torchrun; a process group the caller made is left to it."""
    script = tmp_path / "ranks.py"
    script.write_text(
        "import sys\n"
        "import torch.distributed as dist\n"
        "from hvd_infer.context import RankContext\n"
        "from hvd_infer.errors import DataError\n"
        "if sys.argv[1] == 'caller-made':\n"
        "    dist.init_process_group('gloo')\n"
        "ctx = RankContext.create()\n"
        "assert (ctx.size, ctx.local_size, ctx.device.type) == (2, 2, 'cpu'), ctx\n"
        "assert ctx.allgather_object({'rank': ctx.rank}) == [{'rank': 0}, {'rank': 1}]\n"
        "assert ctx.broadcast_object('from 0' if ctx.is_main else None) == 'from 0'\n"
        "try:\n"
        "    ctx.agree(DataError('bad row on rank 1') if ctx.rank == 1 else None)\n"
        "    raise AssertionError('agree did not raise')\n"
        "except DataError as e:\n"
        "    assert e.all_ranks and str(e) == 'bad row on rank 1'\n"
        "ctx.barrier()\n"
        "ctx.shutdown()\n"
        "assert dist.is_initialized() == (sys.argv[1] == 'caller-made')\n"
        # One file per rank: the two ranks' prints share torchrun's pipe and can interleave.
        "open(f'{sys.argv[2]}/rank{ctx.rank}.ok', 'w').close()\n")
    exe = os.path.join(os.path.dirname(sys.executable), "torchrun")
    for group in ("ours", "caller-made"):
        (tmp_path / group).mkdir()
        r = subprocess.run([exe, "--nproc-per-node", "2", str(script), group, str(tmp_path / group)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        assert sorted(p.name for p in tmp_path.glob(f"{group}/*.ok")) == ["rank0.ok", "rank1.ok"], r.stdout
