"""The whole job read by pyarrow equals the job read by Petastorm, row for row, on 1 and 2 ranks."""
import sqlite3

import pytest

from conftest import assert_same_predictions, cli, horovodrun, job_args, read_output
from hvd_infer.reader import choose_reader

pytestmark = pytest.mark.skipif(choose_reader("auto").name != "petastorm", reason=choose_reader("auto").why)


def run_job(np_, reader, model, data, tmp):
    """The job on np_ ranks: a world of one through the command line in process (cli), more through horovodrun."""
    out = tmp / f"out-{reader}-{np_}"
    args = job_args(model, data, out, tmp, f"data.reader={reader}")
    r = cli(args) if np_ == 1 else horovodrun(np_, args)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return read_output(out), r.stdout


def resolved_readers(tmp):
    db = sqlite3.connect(tmp / "mlflow.db")
    return sorted(v for (v,) in db.execute("select value from params where key='resolved.reader'"))


def test_one_rank_pyarrow_reader_equals_petastorm(tmp_path, tiny_classifier, dataset):
    got, text = run_job(1, "pyarrow", tiny_classifier, dataset[0], tmp_path)
    ref, ref_text = run_job(1, "petastorm", tiny_classifier, dataset[0], tmp_path)
    assert len(got) == dataset[1].num_rows
    assert_same_predictions(got, ref, atol=0)
    assert "reader: pyarrow (data.reader=pyarrow)" in text
    assert "reader: petastorm (data.reader=petastorm)" in ref_text
    assert resolved_readers(tmp_path) == ["petastorm (data.reader=petastorm)", "pyarrow (data.reader=pyarrow)"]


@pytest.mark.slow
def test_two_ranks_pyarrow_reader_equals_petastorm(tmp_path, tiny_classifier, dataset, horovodrun_reference):
    """horovodrun_reference is the same job with data.reader=auto, which is petastorm here."""
    got, text = run_job(2, "pyarrow", tiny_classifier, dataset[0], tmp_path)
    assert len(got) == dataset[1].num_rows
    assert_same_predictions(got, horovodrun_reference, atol=0)
    assert resolved_readers(tmp_path) == ["pyarrow (data.reader=pyarrow)"]
