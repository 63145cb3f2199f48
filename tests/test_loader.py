"""The loader: worker processes sharing parts unit by unit, or a thread; failures named by part."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

import builders
from builders import plain_probs as reference_probs
from conftest import cli, horovodrun, job_args as multirank_args
from hvd_infer.config import load_config
from hvd_infer.dataset import open_input
from hvd_infer.errors import DataError
from hvd_infer.loader import BatchLoader
from hvd_infer.shard_plan import plan_parts
from hvd_infer.tasks import get_task
from hvd_infer.tasks.base import Task


def classification_task(model, **data):
    from transformers import AutoTokenizer

    cfg = load_config({"model": {"path": model}, "data": {"path": "/d", "id_columns": ["id"], **data},
                       "output": {"path": "/o"}})
    task = get_task("text-classification")(cfg)
    Task.setup(task, None, AutoTokenizer.from_pretrained(model))  # the tokenizer is all the loader needs
    return cfg, task


def load_all(model, path, workers, rows_per_part=20, **data):
    cfg, task = classification_task(model, path=path, **data)
    inp = open_input(cfg.data)
    parts = plan_parts(inp.row_groups, 0, 1, rows_per_part)
    loader = BatchLoader(inp, parts, ["text", "id"], task, cfg.data, cfg.data.batch_size, 0, workers)
    try:
        return parts, list(loader)
    finally:
        loader.close()


def by_part(batches):
    out = {}
    for b in batches:
        out.setdefault(b.part.start, []).append(b)
    return out


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_every_row_once_parts_in_order_same_batches_as_a_thread(tiny_classifier, dataset, workers):
    path, table = dataset
    parts, thread = load_all(tiny_classifier, path, 0, batch_size=4, sort_window=8)
    _, got = load_all(tiny_classifier, path, workers, batch_size=4, sort_window=8)
    expected, got = by_part(thread), by_part(got)
    assert sorted(got) == sorted(expected) == [p.start for p in parts]
    for start, batches in got.items():
        part = next(p for p in parts if p.start == start)
        assert [b.finished is not None for b in batches] == [False] * (len(batches) - 1) + [True]
        rows = np.concatenate([b.rows for b in batches])
        assert sorted(rows.tolist()) == list(range(part.rows))  # every row of the part once
        assert all(len(set((b.rows // 8).tolist())) == 1 for b in batches)  # sorted inside one window of 8
        work = batches[-1].finished
        assert work.columns["id"].tolist() == table.column("id").to_pylist()[part.start:part.stop]
        # Units of a part come from several workers, interleaved: the same batches, maybe in another order.
        first_row = lambda b: int(b.rows[0])  # noqa: E731
        for a, b in zip(sorted(batches, key=first_row), sorted(expected[start], key=first_row)):
            assert a.rows.tolist() == b.rows.tolist()
            assert all((a.tensors[k] == b.tensors[k]).all() for k in b.tensors)


def test_units_of_one_part_from_two_workers_with_skipped_rows_map_back_to_their_rows(tiny_classifier, tmp_path):
    texts = builders.texts(60)
    for i in (0, 9, 10, 33, 59):
        texts[i] = None
    table = builders.write_dataset(str(tmp_path), 60, files=1, row_group_size=5, text=texts)
    parts, batches = load_all(tiny_classifier, str(tmp_path), 2, rows_per_part=60, batch_size=3, sort_window=10,
                              on_null="skip")
    assert len(parts) == 1 and len({b.rows.min() // 10 for b in batches if len(b.rows)}) == 6  # six units, 2 workers
    work = batches[-1].finished
    kept = [i for i in range(60) if texts[i] is not None]
    assert [b.finished is not None for b in batches] == [False] * (len(batches) - 1) + [True]
    assert work.rows == len(kept) and work.columns["id"].tolist() == [table.column("id")[i].as_py() for i in kept]
    assert work.skipped == [3, 93, 103, 333, 593]
    # Rows of all batches, in their order, are the kept rows in input order: each row's tokens are its text's.
    rows = np.concatenate([b.rows for b in batches])
    ids = [row[row != 0].tolist() for b in batches for row in b.tensors["input_ids"]]
    _, task = classification_task(tiny_classifier)
    expected = task.tokenizer([texts[i] for i in kept], truncation=True, max_length=task.max_length)["input_ids"]
    assert len(set(rows.tolist())) == len(kept)
    assert [ids[k] for k in np.argsort(rows)] == expected


def test_worker_error_is_the_workers_own_one_line(tiny_classifier, tmp_path):
    texts = builders.texts(60)
    texts[47] = None
    builders.write_dataset(str(tmp_path), 60, files=2, text=texts)
    cfg, task = classification_task(tiny_classifier, path=str(tmp_path))
    inp = open_input(cfg.data)
    parts = plan_parts(inp.row_groups, 0, 1, 10)
    loader = BatchLoader(inp, parts, ["text", "id"], task, cfg.data, 8, 0, 2)
    with pytest.raises(Exception) as raised:
        list(loader)
    loader.close()
    named = loader.explain(raised.value)
    assert isinstance(named, DataError)
    assert "null or empty at id 473" in str(named) and "\n" not in str(named)


def _loader_workers(parent_pid):
    import psutil

    return [c.pid for c in psutil.Process(parent_pid).children()]  # the DataLoader workers, nothing else


@pytest.mark.slow  # the job is a process of its own, whose loader worker is killed
def test_killed_worker_fails_the_job_naming_the_part_then_resume_completes(tiny_classifier, tmp_path):
    data = tmp_path / "data"
    table = builders.write_dataset(str(data), 3000, files=3, row_group_size=50)
    out = tmp_path / "out"
    args = ["--config", "/dev/null", f"model.path={tiny_classifier}", f"data.path={data}", "data.id_columns=[id]",
            f"output.path={out}", "mlflow.enabled=false", "runtime.progress=false", "data.batch_size=4",
            "output.rows_per_part=100", "data.workers=2"]
    proc = subprocess.Popen([sys.executable, "-m", "hvd_infer"] + args, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            if out.exists() and len([n for n in os.listdir(out) if n.startswith("part-")]) >= 2:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        workers = _loader_workers(proc.pid)
        while len(workers) != 2 and proc.poll() is None and time.time() < deadline:  # a transient child, or not forked yet
            time.sleep(0.1)
            workers = _loader_workers(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)
        killed = time.time()
        stdout, stderr = proc.communicate(timeout=60)
        # A bound against a hang, not a timing target (the box is shared): torch notices a dead worker at once.
        assert proc.returncode != 0 and time.time() - killed < 60, (proc.returncode, stderr[-3000:])
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = [l for l in stderr.splitlines() if "hvd_infer: error:" in l]
    assert len(lines) == 1, stderr[-3000:]
    assert "data loader process died" in lines[0] and "the part of input rows" in lines[0], lines[0]
    # torch reports the death from its SIGCHLD handler ("is killed by signal: Killed") or, when the rank
    # was already waiting on that worker's queue, as "exited unexpectedly": both name the part.
    assert ("killed by signal" in lines[0] or "exited unexpectedly" in lines[0]) and "output.mode=resume" in lines[0]
    assert "Traceback" not in stderr
    assert not (out / "_SUCCESS").exists()
    written = [n for n in os.listdir(out) if n.startswith("part-")]
    assert all(pq.ParquetFile(out / n).metadata.num_rows == 100 for n in written)  # whole parts only

    r = cli(args + ["output.mode=resume"])  # a world of one, in process, finishes it
    assert r.returncode == 0, r.stderr[-3000:]
    got = pads.dataset(str(out)).to_table(columns=["id"]).column("id").to_pylist()
    assert sorted(got) == table.column("id").to_pylist()  # every id exactly once


@pytest.mark.slow
def test_two_ranks_with_two_workers_each_equal_plain_forward(tiny_classifier, dataset, tmp_path):
    path, table = dataset
    out = tmp_path / "out"
    r = horovodrun(2, multirank_args(tiny_classifier, path, out, tmp_path, "data.workers=2",
                                     "data.max_tokens_per_batch=300", "mlflow.enabled=false"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "data.workers 2 per rank, token budget 300 per batch" in r.stdout
    got = pads.dataset(str(out)).to_table().to_pandas()
    assert sorted(got["id"]) == sorted(table.column("id").to_pylist())  # exactly once
    by_id = {i: k for k, i in enumerate(table.column("id").to_pylist())}
    rows = [by_id[i] for i in got["id"]]
    ref = reference_probs(tiny_classifier, table.column("text").to_pylist())
    np.testing.assert_allclose(np.stack(got["probs"].to_numpy()), ref[rows], atol=1e-5)
    assert got["doc"].tolist() == [table.column("doc")[k].as_py() for k in rows]
