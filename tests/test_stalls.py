"""No deadlock, no silent stall, no orphan: TOKENIZERS_PARALLELISM=true with workers, the watchdog, a killed launcher.

The jobs are real processes (slow): the tokenizers' pool reads its environment once per process, and the
watchdog ends a stalled rank with os._exit. The watchdog's arithmetic and the environment summary run here.
"""
import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pyarrow.dataset as pads
import pytest

from builders import plain_probs as reference_probs
from conftest import REPO, horovodrun, hvd_infer_np, job_args as multirank_args, python_m
from hvd_infer.loader import TEST_STALL_ENV
from hvd_infer.summary import user_environment


def assert_equals_plain_forward(out, model, table):
    got = pads.dataset(str(out)).to_table().to_pandas()
    assert sorted(got["id"]) == sorted(table.column("id").to_pylist())  # every id exactly once
    by_id = {i: k for k, i in enumerate(table.column("id").to_pylist())}
    rows = [by_id[i] for i in got["id"]]
    ref = reference_probs(model, table.column("text").to_pylist())
    np.testing.assert_allclose(np.stack(got["probs"].to_numpy()), ref[rows], atol=1e-5)
    assert got["doc"].tolist() == [table.column("doc")[k].as_py() for k in rows]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_tokenizers_parallelism_true_finishes_equal_to_plain_forward(workers, tiny_classifier, dataset, tmp_path):
    # With the tokenizer's Rust pool used in the rank (its set-up check) and then forked into the workers, this
    # job waited forever; a stall timeout turns a regression into a failure instead of a hang.
    path, table = dataset
    out = tmp_path / "out"
    env = {"TOKENIZERS_PARALLELISM": "true", "MLFLOW_TRACKING_PASSWORD": "s3cr3t-value"}
    r = horovodrun(2, multirank_args(tiny_classifier, path, out, tmp_path, f"data.workers={workers}",
                                     "runtime.stall_timeout_s=180"), env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert_equals_plain_forward(out, tiny_classifier, table)
    # The summary and the MLflow params name what the environment set; MLflow's variables by name only.
    line = next(l for l in r.stdout.splitlines() if "set in the environment:" in l)
    assert "TOKENIZERS_PARALLELISM=true" in line and "MLFLOW_TRACKING_PASSWORD" in line
    assert "s3cr3t-value" not in r.stdout + r.stderr
    db = sqlite3.connect(tmp_path / "mlflow.db")
    params = dict(db.execute("select key, value from params").fetchall())
    assert params["env.TOKENIZERS_PARALLELISM"] == "true" and params["env.MLFLOW_TRACKING_PASSWORD"] == "set"
    assert "s3cr3t-value" not in str(params)


def test_user_environment_names_mlflow_variables_without_their_values():
    env = {"TOKENIZERS_PARALLELISM": "true", "OMP_NUM_THREADS": "4", "MLFLOW_TRACKING_TOKEN": "secret", "HOME": "/root",
           "CUDA_VISIBLE_DEVICES": ""}
    assert user_environment(env) == {"TOKENIZERS_PARALLELISM": "true", "OMP_NUM_THREADS": "4",
                                     "CUDA_VISIBLE_DEVICES": "", "MLFLOW_TRACKING_TOKEN": "set"}


def test_stall_limit_auto_scales_with_the_longest_wait_and_the_ranks_own_share():
    from hvd_infer.config import load_config
    from hvd_infer.summary import RankFigures
    from hvd_infer.watchdog import COLLECTIVE, Watchdog

    base = {"model": {"path": "/m"}, "data": {"path": "/d"}, "output": {"path": "/o"}}
    for setting, limits in [("auto", (600, 900, 1900)), (20, (20, 20, 140))]:
        watch = Watchdog(load_config(base, [f"runtime.stall_timeout_s={setting}"]), 0, RankFigures(), None, None)
        try:
            assert watch.limit("the model") == limits[0]
            watch.longest_gap = 90.0  # a batch once took 90 s to come
            assert watch.limit("the model") == limits[1]
            watch.scoring_seconds = 100.0  # the rank's own share took 100 s; it now waits for the others
            assert watch.limit(COLLECTIVE) == limits[2] and watch.limit("writing") == limits[1]
        finally:
            watch.stop()


def _part_names(out, rank):
    return {n for n in os.listdir(out) if n.startswith(f"part-r{rank:05d}")} if out.exists() else set()


@pytest.mark.slow
def test_stalled_worker_ends_the_job_in_one_line_within_the_timeout_then_resume_completes(tiny_classifier, dataset,
                                                                                           tmp_path):
    path, table = dataset
    out = tmp_path / "out"
    timeout = 20
    # 8 parts per rank, 4 per worker: rank 1's workers each write their first part, then sleep in their second.
    job = multirank_args(tiny_classifier, path, out, tmp_path, "data.workers=2", "output.rows_per_part=10",
                         f"runtime.stall_timeout_s={timeout}")
    cmd = [sys.executable, "-m", "hvd_infer", "-np", "2"] + job
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=dict(os.environ, **{TEST_STALL_ENV: "1:tokenizing"}))
    try:
        seen, last_part = set(), time.time()
        deadline = time.time() + 600
        while proc.poll() is None and time.time() < deadline:
            names = _part_names(out, 1)
            if names - seen:
                seen, last_part = names, time.time()
            time.sleep(0.2)
        ended = time.time()
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    # A bound against a hang, not a timing target: rank 1's last progress came no earlier than its last part.
    assert ended - last_part < timeout + 30, (ended - last_part, stderr[-3000:])
    assert proc.returncode == 1, (proc.returncode, stderr[-3000:])
    lines = [l for l in stderr.splitlines() if "hvd_infer: error:" in l]
    assert len(lines) == 1, stderr[-3000:]
    assert "rank 1 stalled in tokenizing in data loader worker" in lines[0], lines[0]
    assert f"runtime.stall_timeout_s={timeout}" in lines[0] and "the part of input rows" in lines[0], lines[0]
    assert "output.mode=resume" in lines[0], lines[0]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert not (out / "_SUCCESS").exists()
    stacks = tmp_path / "out.stalled-rank00001.txt"
    assert str(stacks) in lines[0]
    text = stacks.read_text()
    assert "data loader worker 0" in text and "data loader worker 1" in text and "in _marked_chunks" in text
    assert seen and seen <= _part_names(out, 1)  # finished parts kept
    deadline = time.time() + 60  # a bound against orphans: rank 1's sleeping workers end with it
    while time.time() < deadline and any(_alive(p) for group in _job_processes(str(out)) for p in group):
        time.sleep(0.5)
    assert not any(_alive(p) for group in _job_processes(str(out)) for p in group)

    r = horovodrun(2, job + ["output.mode=resume"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert_equals_plain_forward(out, tiny_classifier, table)


@pytest.mark.slow  # a process of its own: the watchdog ends a stalled rank with os._exit
def test_stall_in_the_loader_thread_of_a_world_of_one(tiny_classifier, dataset, tmp_path):
    out = tmp_path / "out"
    r = python_m(multirank_args(tiny_classifier, dataset[0], out, tmp_path, "data.workers=0", "mlflow.enabled=false",
                                "runtime.stall_timeout_s=10"), env={TEST_STALL_ENV: "0:reading"})
    assert r.returncode == 1, (r.returncode, r.stderr[-3000:])
    lines = [l for l in r.stderr.splitlines() if "hvd_infer: error:" in l]
    assert len(lines) == 1 and "rank 0 stalled in reading in the loader thread" in lines[0], r.stderr[-3000:]
    assert not (out / "_SUCCESS").exists() and (tmp_path / "out.stalled-rank00000.txt").exists()


def _job_processes(marker):
    """(ranks, their loader workers): processes whose command line names marker (workers are forked: theirs too)."""
    import psutil

    found = {}
    for p in psutil.process_iter(["cmdline", "name", "ppid"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if marker in cmd and "-m hvd_infer" in cmd and p.info["name"] not in ("sh", "bash", "dash") \
                    and "horovod" not in cmd.split("-m hvd_infer")[0]:
                found[p.pid] = p
        except psutil.Error:
            continue
    ranks = [p for p in found.values() if p.info["ppid"] not in found]
    return ranks, [p for p in found.values() if p.info["ppid"] in found]


def _alive(p):
    import psutil

    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.mark.slow
def test_sigkill_of_horovodruns_process_group_leaves_no_loader_worker(tiny_classifier, dataset, tmp_path):
    out = tmp_path / "out"
    exe = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    # Rank 1's workers sleep in their second part (the test hook), so the job is alive when the scheduler kills it.
    cmd = [exe, "-np", "2", "-H", "localhost:2", sys.executable, "-m", "hvd_infer"] + multirank_args(
        tiny_classifier, dataset[0], out, tmp_path, "data.workers=2", "output.rows_per_part=10", "mlflow.enabled=false")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO, start_new_session=True,
                            env=dict(os.environ, **{TEST_STALL_ENV: "1:tokenizing"}))
    ranks, workers = [], []
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            assert proc.poll() is None, "the job ended before it was killed"
            ranks, workers = _job_processes(str(out))
            if len(ranks) == 2 and len(workers) >= 2 and len(_part_names(out, 1)) >= 2:
                break
            time.sleep(0.5)
        assert len(ranks) == 2 and len(workers) >= 2, (ranks, workers)
        os.killpg(proc.pid, signal.SIGKILL)  # as a scheduler does: horovodrun's group, not the ranks' own sessions
        proc.wait(timeout=60)
        deadline = time.time() + 60  # a bound against orphans, not a timing target
        while time.time() < deadline and any(_alive(p) for p in ranks + workers):
            time.sleep(0.5)
        assert not [p.pid for p in workers if _alive(p)], "loader workers of the killed job live on"
        assert not [p.pid for p in ranks if _alive(p)], "ranks of the killed job live on"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for p in ranks + workers:
            if _alive(p):
                p.kill()
