"""Input discovery and reading a rank's rows through Petastorm."""
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import builders
from hvd_infer.config import DataConfig
from hvd_infer.dataset import open_input
from hvd_infer.errors import DataError
from hvd_infer.reader import read_parts
from hvd_infer.shard_plan import plan_parts


def test_reads_exactly_the_planned_rows(dataset):
    path, table = dataset
    inp = open_input(DataConfig(path=path, id_columns=["id", "doc"]))
    assert inp.total_rows == table.num_rows and len(inp.files) == 3 and len(inp.row_groups) > 20
    seen = []
    for rank in range(3):
        parts = plan_parts(inp.row_groups, rank, 3, 20)
        for part, chunks in read_parts(inp, parts, ["id", "doc", "text"]):
            chunks = list(chunks)
            assert len(chunks) == len(part.pieces)  # one chunk per row group slice: streamed, not whole parts
            cols = {c: np.concatenate([ch[c] for ch in chunks]) for c in ["id", "doc", "text"]}
            assert len(cols["id"]) == part.rows
            expected = table.slice(part.start, part.rows)
            assert cols["id"].tolist() == expected.column("id").to_pylist()
            assert cols["text"].tolist() == expected.column("text").to_pylist()
            assert cols["doc"].tolist() == expected.column("doc").to_pylist()
            seen += cols["id"].tolist()
    assert sorted(seen) == sorted(table.column("id").to_pylist())


def test_glob_single_file_and_skips_hidden(tmp_path, dataset):
    path, _ = dataset
    assert len(open_input(DataConfig(path=os.path.join(path, "*.parquet"))).files) == 3
    assert len(open_input(DataConfig(path=os.path.join(path, "part-001.parquet"))).files) == 1
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / ".hidden.parquet").write_text("x")
    builders.write_dataset(str(tmp_path), 5, files=1)
    assert len(open_input(DataConfig(path=str(tmp_path))).files) == 1


def test_empty_files_are_fine(tmp_path):
    schema = pa.schema([("id", pa.int64()), ("text", pa.string())])
    pq.write_table(schema.empty_table(), tmp_path / "a.parquet")
    inp = open_input(DataConfig(path=str(tmp_path), id_columns=["id"]))
    assert inp.total_rows == 0 and inp.row_groups == []


@pytest.mark.parametrize("kw, message", [
    (dict(path="/no/such/dir"), "data.path /no/such/dir does not exist"),
    (dict(path="/no/such/*.parquet"), "matches no files"),
    (dict(text_column="body"), "data.text_column 'body' not found in"),
    (dict(id_columns=["key"]), "data.id_columns 'key' not found in"),
    (dict(text_column="id"), "data.text_column 'id' in"),
])
def test_bad_input_named(dataset, kw, message):
    path, _ = dataset
    with pytest.raises(DataError) as e:
        open_input(DataConfig(**{"path": path, **kw}))
    assert message in str(e.value)
    if "not found" in message:
        assert "columns are: id, doc, text, label" in str(e.value)


def test_truncated_file_named(tmp_path):
    builders.write_dataset(str(tmp_path), 30, files=2)
    f = tmp_path / "part-001.parquet"
    f.write_bytes(f.read_bytes()[:-30])
    with pytest.raises(DataError, match="cannot read .*part-001.parquet as Parquet"):
        open_input(DataConfig(path=str(tmp_path)))


def test_empty_directory(tmp_path):
    with pytest.raises(DataError, match="no Parquet files"):
        open_input(DataConfig(path=str(tmp_path)))
