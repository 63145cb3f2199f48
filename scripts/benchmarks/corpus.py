"""The benchmark corpus: scripts/make_demo.py's make_corpus (or the head of a Parquet dataset) written as
Parquet; labels read back by id."""
from __future__ import annotations

import importlib.util
import os
import shutil
import zlib
from typing import Dict, Optional

from benchmarks import REPO


def make_corpus(rows: int, source: Optional[str] = None):
    """The first `rows` rows: of make_demo's make_corpus, or of the Parquet dataset `source` in id order."""
    if source:
        import pyarrow.dataset as ds

        table = ds.dataset(source, format="parquet").to_table().sort_by("id")
        if len(table) < rows:
            raise ValueError(f"{source} has {len(table)} rows, fewer than the {rows} asked for")
        return table.slice(0, rows).to_pandas()
    spec = importlib.util.spec_from_file_location("make_demo", os.path.join(REPO, "scripts", "make_demo.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.make_corpus(rows, seed=0)


def write_corpus(work: str, rows: int, files: int, row_group_rows: int, repeats: float = 0.0,
                 source: Optional[str] = None) -> str:
    """A Parquet corpus of `rows` rows in `files` files of row groups of `row_group_rows`; reused if present.

    repeats > 0: that fraction of rows (after the first 100) copy the text and label of one of the
    100 rows before them, as templated messages and log lines do: close enough to fall in the same
    part of a rank, where hvd_infer's data.dedup finds them. source: a Parquet dataset (columns id, text,
    ...) whose first rows by id are the corpus instead of make_corpus's.
    """
    import pyarrow as pa
    from feed_inputs import write_files  # scripts/ is on sys.path (bench.py)

    tag = f"{os.path.basename(os.path.normpath(source))}-{zlib.crc32(os.path.abspath(source).encode()):08x}-" if source else ""
    path = os.path.join(work, "data", f"{tag}rows-{rows}-files-{files}-rg-{row_group_rows}"
                                      + (f"-repeats-{round(100 * repeats)}" if repeats else ""))
    if os.path.exists(os.path.join(path, "_DONE")):
        return path
    df = make_corpus(rows, source)
    if repeats:
        import numpy as np

        rng = np.random.default_rng(0)
        copies = np.flatnonzero(rng.random(rows) < repeats * rows / max(1, rows - 100))
        copies = copies[copies >= 100]
        for i in copies:  # in order: a copy may copy a copy
            j = i - rng.integers(1, 101)
            df.loc[i, ["text", "label"]] = df.loc[j, ["text", "label"]].values
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write_files(pa.Table.from_pandas(df, preserve_index=False), tmp, files, row_group_rows)
    open(os.path.join(tmp, "_DONE"), "w").close()
    shutil.rmtree(path, ignore_errors=True)
    os.rename(tmp, path)
    return path


def corpus_size(path: str) -> int:
    """Rows of a Parquet dataset with an id and a text column; ValueError naming what is wrong otherwise."""
    import pyarrow.dataset as ds

    if not os.path.isdir(path):
        raise ValueError(f"{path} is not a directory of Parquet files")
    dataset = ds.dataset(path, format="parquet")
    missing = {"id", "text"} - set(dataset.schema.names)
    if missing:
        raise ValueError(f"{path} lacks column(s) {', '.join(sorted(missing))}; "
                         f"its columns are: {', '.join(dataset.schema.names)}")
    return dataset.count_rows()


def read_corpus(path: str):
    import pyarrow.dataset as ds

    t = ds.dataset(path, format="parquet").to_table(columns=["id", "text"]).sort_by("id")
    return t.column("id").to_numpy(), t.column("text").to_pylist()


def read_labels(path: str, column: str, ids, mapping: Optional[Dict[str, int]] = None):
    """Labels from a Parquet output directory, in the order of `ids` (joined on id)."""
    import numpy as np
    import pyarrow.dataset as ds

    t = ds.dataset(path, format="parquet").to_table(columns=["id", column])
    got = dict(zip(t.column("id").to_pylist(), t.column(column).to_pylist()))
    vals = [got.get(int(i)) for i in ids]
    if mapping is not None:
        vals = [mapping.get(v, -1) if v is not None else -1 for v in vals]
    return np.array([-1 if v is None else v for v in vals])
