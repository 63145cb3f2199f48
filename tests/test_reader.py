"""Input discovery and reading a rank's rows, through Petastorm and through pyarrow."""
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import builders
from hvd_infer.config import DataConfig
from hvd_infer.dataset import open_input
from hvd_infer.errors import DataError
from hvd_infer.reader import choose_reader, read_parts
from hvd_infer.shard_plan import plan_parts


# Petastorm is compared where it runs (pyarrow < 15); on a stack without it only pyarrow reads.
READERS = ["pyarrow"] + (["petastorm"] if choose_reader("auto").name == "petastorm" else [])
needs_petastorm = pytest.mark.skipif("petastorm" not in READERS, reason=choose_reader("auto").why)


@pytest.mark.parametrize("reader", READERS)
def test_reads_exactly_the_planned_rows(dataset, reader):
    path, table = dataset
    inp = open_input(DataConfig(path=path, id_columns=["id", "doc"]))
    assert inp.total_rows == table.num_rows and len(inp.files) == 3 and len(inp.row_groups) > 20
    seen = []
    for rank in range(3):
        parts = plan_parts(inp.row_groups, rank, 3, 20)
        for part, chunks in read_parts(inp, parts, ["id", "doc", "text"], reader):
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


def typed_dataset(path):
    """Columns of the kinds a job reads (ids of several types, nulls in them and in the text), 3 files."""
    n = 61
    text = builders.texts(n, seed=3)
    text[5] = None
    text[9] = ""
    table = pa.table({
        "id": pa.array(np.arange(n, dtype=np.int64) * 7),
        "small": pa.array(np.arange(n, dtype=np.int32)),
        "maybe": pa.array([None if i % 5 == 0 else i for i in range(n)], type=pa.int64()),
        "score": pa.array(np.linspace(0, 1, n)),
        "flag": pa.array([i % 3 == 0 for i in range(n)]),
        "doc": pa.array([None if i % 11 == 0 else f"dóc-{i}" for i in range(n)]),
        "text": pa.array(text),
    })
    os.makedirs(path, exist_ok=True)
    for f, (a, b) in enumerate([(0, 20), (20, 21), (21, n)]):
        pq.write_table(table.slice(a, b - a), os.path.join(path, f"part-{f}.parquet"), row_group_size=6)
    return table


@needs_petastorm
def test_pyarrow_reader_gives_what_petastorm_gives(tmp_path):
    """Chunk by chunk, the same arrays: dtypes, values, nulls (None in strings, NaN in an int column with nulls)."""
    table = typed_dataset(str(tmp_path / "d"))
    inp = open_input(DataConfig(path=str(tmp_path / "d"), id_columns=["id", "small", "maybe", "score", "flag", "doc"]))
    columns = table.column_names
    for rank in range(3):
        parts = plan_parts(inp.row_groups, rank, 3, 9)
        got = {}
        for reader in ("petastorm", "pyarrow"):
            got[reader] = [(part.start, [dict(c) for c in chunks]) for part, chunks in read_parts(inp, parts, columns, reader)]
        assert [s for s, _ in got["pyarrow"]] == [s for s, _ in got["petastorm"]] == [p.start for p in parts]
        for (_, a_chunks), (_, b_chunks) in zip(got["petastorm"], got["pyarrow"]):
            assert len(a_chunks) == len(b_chunks)
            for a, b in zip(a_chunks, b_chunks):
                for c in columns:
                    assert a[c].dtype == b[c].dtype, (c, a[c].dtype, b[c].dtype)
                    if a[c].dtype == object:
                        assert a[c].tolist() == b[c].tolist(), c
                    else:
                        np.testing.assert_array_equal(a[c], b[c])
    # The reference: what the files hold.
    inp_rows = np.concatenate([c["doc"] for _, chunks in read_parts(inp, plan_parts(inp.row_groups, 0, 1, 100), ["doc"],
                                                                      "pyarrow") for c in chunks])
    assert inp_rows.tolist() == table.column("doc").to_pylist()


def test_reader_choice_says_why():
    assert choose_reader("pyarrow").describe() == "pyarrow (data.reader=pyarrow)"
    auto = choose_reader("auto")
    if auto.name == "petastorm":
        assert auto.describe() == "petastorm (data.reader=auto; petastorm runs here)"
        assert choose_reader("petastorm").name == "petastorm"
    else:
        assert auto.why.startswith("data.reader=auto; petastorm") and "pyarrow" in auto.why
