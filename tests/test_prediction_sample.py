"""mlflow.log_predictions: the sample rank 0 logs (the output's first rows in input order, read only as far as
needed, from a local directory or through fsspec), the setting's values, and what the summary says was logged.
In process: no job, no MLflow."""
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hvd_infer.config import load_config
from hvd_infer.errors import ConfigError
from hvd_infer.storage import Location
from hvd_infer.summary import mlflow_predictions
from hvd_infer.tracking import SAMPLE_ROWS, prediction_sample
from hvd_infer.writer import part_name


def rows(ids):
    return pa.table({"id": pa.array(ids, pa.int64()), "label": pa.array([f"l{i % 3}" for i in ids])})


def write_output(url):
    """Parts whose name order is not their input order (rank 1 holds the first rows), row groups of 10 rows,
    one part with 3 rows skipped, plus the files beside the parts. 97 rows in all."""
    loc = Location(url)
    for rank, start, stop, kept in ((1, 0, 30, range(0, 30)), (0, 30, 60, range(30, 60)),
                                   (1, 60, 90, range(60, 90)), (0, 90, 100, [90, 91, 93, 94, 95, 96, 99])):
        sink = pa.BufferOutputStream()
        pq.write_table(rows(list(kept)), sink, row_group_size=10)
        loc.put(part_name(rank, start, stop), sink.getvalue().to_pybytes())
        loc.put(f"_parts/{part_name(rank, start, stop)}.json", b"{}")
    loc.put("_manifest.json", b"{}")
    loc.put("_SUCCESS", b"")
    return list(range(90)) + [90, 91, 93, 94, 95, 96, 99]


@pytest.fixture(params=["local", "memory"])
def output(request, tmp_path):
    """A local directory, or an fsspec in-memory store (what an object store goes through)."""
    return str(tmp_path / "out") if request.param == "local" else f"memory://sample-{uuid.uuid4().hex}/out"


@pytest.fixture
def row_groups_read(monkeypatch):
    read = []
    original = pq.ParquetFile.read_row_group

    def counted(self, i, *args, **kwargs):
        read.append(i)
        return original(self, i, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counted)
    return read


def test_first_rows_in_input_order_reading_only_what_they_need(output, row_groups_read):
    write_output(output)
    sample = prediction_sample(output, rows=45)
    assert sample.column_names == ["id", "label"]
    assert sample.to_pydict() == rows(list(range(45))).to_pydict()
    assert len(row_groups_read) == 5  # 3 of the first part, 2 of the second; nothing of the last two parts


def test_all_rows_when_fewer_and_the_default_size(output, row_groups_read):
    ids = write_output(output)
    assert SAMPLE_ROWS == 1000
    assert prediction_sample(output).to_pydict() == rows(ids).to_pydict()
    assert prediction_sample(output, rows=92).column("id").to_pylist() == ids[:92]  # across the skipped rows


def test_empty_output_gives_an_empty_sample_and_no_output_none(output):
    assert prediction_sample(output) is None
    sink = pa.BufferOutputStream()
    pq.write_table(rows([]), sink)
    Location(output).put(part_name(0, 0, 0), sink.getvalue().to_pybytes())
    sample = prediction_sample(output)
    assert sample.num_rows == 0 and sample.schema.equals(rows([]).schema)


def test_a_delta_jobs_sample_is_its_own_rows(output):
    """A Delta table may hold earlier jobs' parts (output.mode=append): the sample is the job's own."""
    loc = Location(output)
    for job_id, ids in (("0123456789ab", [1, 2, 3]), ("ba9876543210", [7, 8])):
        sink = pa.BufferOutputStream()
        pq.write_table(rows(ids), sink)
        loc.put(part_name(0, 0, len(ids), job_id), sink.getvalue().to_pybytes())
    assert prediction_sample(output, job="ba9876543210").column("id").to_pylist() == [7, 8]
    assert prediction_sample(output, job="0123456789ab").column("id").to_pylist() == [1, 2, 3]
    assert prediction_sample(output) is None  # no Parquet-output part there


def job(**mlflow):
    return load_config({"model": {"path": "m"}, "data": {"path": "d"}, "output": {"path": "/o"}, "mlflow": mlflow})


def test_setting_values_and_former_booleans_refused():
    assert job().mlflow.log_predictions == "sample"
    assert job(log_predictions="all").mlflow.log_predictions == "all"
    for old in (True, False):
        with pytest.raises(ConfigError, match="mlflow.log_predictions must be one of sample, all, none"):
            job(log_predictions=old)


def test_summary_says_what_the_run_holds():
    assert mlflow_predictions(job(), 157).startswith("sample of 157 rows, the output's first in input order "
                                                     "(predictions_sample.parquet); every row: /o")
    assert mlflow_predictions(job(), 50_000_000).startswith("sample of 1,000 rows")
    resumed = load_config(job().to_dict(), **{"output.mode": "resume"})
    assert mlflow_predictions(resumed, 10).startswith("sample of up to 1,000 rows")  # earlier runs' rows come first
    assert mlflow_predictions(job(log_predictions="all"), 157) == "every part (predictions/rank-NNNNN/), a second copy of /o"
    on_store = load_config(job(log_predictions="all").to_dict(), **{"output.path": "s3://b/o"})
    assert mlflow_predictions(on_store, 157).startswith("none: mlflow.log_predictions=all copies the parts of a local")
    assert mlflow_predictions(job(log_predictions="none"), 157) == "none (mlflow.log_predictions=none); every row: /o"
