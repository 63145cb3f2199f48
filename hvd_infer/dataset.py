"""The Parquet input: which files, their row groups, their schema, checked up front.

Only footers are read here (no data), so a wrong path, a missing column, a
non-string text column or a truncated file fails before any model loads.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hvd_infer.config import DataConfig
from hvd_infer.errors import DataError
from hvd_infer.storage import explain


@dataclass(frozen=True)
class RowGroup:
    file: int  # index into ParquetInput.files
    index: int  # row group number inside that file
    start: int  # global row number of its first row
    rows: int


class ParquetInput:
    """The files, their row groups and the schema; what rank 0 broadcasts to every rank, pickled compactly
    (a common directory, compressed names and arrays) for inputs of many files."""

    def __init__(self, protocol: str, files: List[str], sizes: List[int], row_groups: List[RowGroup],
                 schema: pa.Schema, storage_options: Optional[Dict[str, Any]] = None):
        self.files = files  # paths on the filesystem (no protocol), in a fixed order
        self.protocol, self.sizes, self.row_groups, self.schema = protocol, sizes, row_groups, schema
        self.storage_options = storage_options or {}  # data.storage_options, for every reader

    @property
    def total_rows(self) -> int:
        return sum(rg.rows for rg in self.row_groups)

    def url(self, file: int) -> str:
        """A URL Petastorm and fsspec understand for one file."""
        return f"{self.protocol}://{self.files[file]}"

    def filesystem(self):
        return fsspec.filesystem(self.protocol, **self.storage_options)

    def fingerprint(self) -> str:
        """Changes when the files, their sizes or row counts change: resume refuses then."""
        counts = [(rg.file, rg.index, rg.rows) for rg in self.row_groups]
        blob = json.dumps([self.files, self.sizes, counts])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def __getstate__(self) -> Dict[str, Any]:
        common = posixpath.commonpath(self.files) if len(self.files) > 1 else ""
        root = common.rstrip("/") + "/" if common else ""
        names = "\n".join(f[len(root):] for f in self.files)
        groups = np.array([(rg.file, rg.index, rg.rows) for rg in self.row_groups], dtype=np.int64).reshape(-1, 3)
        return {"protocol": self.protocol, "root": root, "names": zlib.compress(names.encode()),
                "sizes": zlib.compress(np.asarray(self.sizes, dtype=np.int64).tobytes()),
                "groups": zlib.compress(groups.tobytes()), "schema": self.schema,
                "storage_options": self.storage_options}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        names = zlib.decompress(state["names"]).decode()
        files = [state["root"] + n for n in names.split("\n")] if names else []
        sizes = np.frombuffer(zlib.decompress(state["sizes"]), dtype=np.int64).tolist()
        groups = np.frombuffer(zlib.decompress(state["groups"]), dtype=np.int64).reshape(-1, 3)
        starts = np.concatenate([[0], np.cumsum(groups[:, 2])[:-1]]) if len(groups) else []
        row_groups = [RowGroup(int(f), int(i), int(s), int(n)) for (f, i, n), s in zip(groups.tolist(), starts)]
        self.__init__(state["protocol"], files, sizes, row_groups, state["schema"], state["storage_options"])



def _is_data_file(path: str) -> bool:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    # Spark and pyarrow skip these too: _SUCCESS, _metadata, .crc, temporary files.
    return not name.startswith(("_", ".")) and not name.endswith((".crc", ".tmp"))


def list_files(path: str, storage_options: Dict[str, Any]) -> Tuple[str, List[str], List[int]]:
    try:
        fs, root = fsspec.core.url_to_fs(path, **storage_options)
        return _list_files(fs, root, path)
    except DataError:
        raise
    except Exception as e:
        raise explain(e, "data.path", path, DataError) or e from None


def _list_files(fs, root: str, path: str) -> Tuple[str, List[str], List[int]]:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    # Sizes come with the listing (detail=True): a request per file would cost minutes on an object store.
    if any(c in root for c in "*?["):
        found = {p: info for p, info in fs.glob(root, detail=True).items() if info["type"] == "file"}
        if not found:
            raise DataError(f"data.path {path} matches no files; give a Parquet file, a directory of them, or a glob like /data/*.parquet")
    elif not fs.exists(root):
        raise DataError(f"data.path {path} does not exist; give a Parquet file, a directory of them, or a glob")
    elif fs.isdir(root):
        found = {p: info for p, info in fs.find(root, detail=True).items() if _is_data_file(p) and
                 not any(part.startswith(("_", ".")) for part in p[len(root.rstrip("/")) + 1:].split("/")[:-1])}
        if not found:
            raise DataError(f"data.path {path} is a directory with no Parquet files in it")
    else:
        found = {root: fs.info(root)}
    files = sorted(found)
    return protocol, files, [int(found[p]["size"]) for p in files]


FOOTER_THREADS = 32  # footers are small reads dominated by latency, which threads overlap well


def open_input(cfg: DataConfig) -> ParquetInput:
    """List and check the input named by data.path; raises DataError naming what is wrong."""
    protocol, files, sizes = list_files(cfg.path, cfg.storage_options)
    fs = fsspec.filesystem(protocol, **cfg.storage_options)
    local = protocol in ("file", "local")

    def footer(path: str) -> Tuple[List[int], pa.Schema]:
        try:
            if local:  # pyarrow's own file reads: no Python file object, so no GIL between threads
                meta = pq.read_metadata(path)
            else:
                with fs.open(path, "rb") as f:
                    meta = pq.read_metadata(f)
            file_schema = meta.schema.to_arrow_schema()
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise DataError(f"cannot read {path} as Parquet ({str(e).splitlines()[0]}); "
                            "is it truncated or not a Parquet file? Remove or replace it") from None
        _check_columns(cfg, path, file_schema)
        return [meta.row_group(j).num_rows for j in range(meta.num_row_groups)], file_schema

    row_groups: List[RowGroup] = []
    schema = None
    start = 0
    with ThreadPoolExecutor(max_workers=max(1, min(FOOTER_THREADS, len(files)))) as pool:
        # map yields in file order, so the error raised is the first bad file's.
        for i, (counts, file_schema) in enumerate(pool.map(footer, files)):
            if schema is None:
                schema = file_schema
            for j, n in enumerate(counts):
                if n:
                    row_groups.append(RowGroup(i, j, start, n))
                    start += n
    return ParquetInput(protocol, files, sizes, row_groups, schema, cfg.storage_options)


def is_string(t: pa.DataType) -> bool:
    """A text column: string, large_string, or a dictionary of them."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _check_columns(cfg: DataConfig, path: str, schema: pa.Schema) -> None:
    names = schema.names
    wanted = [("data.text_column", cfg.text_column)]
    if cfg.text_pair_column:
        wanted.append(("data.text_pair_column", cfg.text_pair_column))
    wanted += [("data.id_columns", c) for c in cfg.id_columns]
    if cfg.label_column:
        wanted.append(("data.label_column", cfg.label_column))
    for key, col in wanted:
        if col not in names:
            raise DataError(f"{key} '{col}' not found in {path}; columns are: {', '.join(names)}")
    for key, col in wanted[:2]:
        if key.startswith("data.text") and not is_string(schema.field(col).type):
            raise DataError(f"{key} '{col}' in {path} has type {schema.field(col).type}; it must be a string column")


def read_head(inp: ParquetInput, columns: List[str], rows: int) -> pa.Table:
    """The input's first `rows` rows (file, then row group order), only `columns`: a sample the job checks on."""
    fs, tables, left = inp.filesystem(), [], rows
    for rg in inp.row_groups:
        if left <= 0:
            break
        with fs.open(inp.files[rg.file], "rb") as f:
            table = pq.ParquetFile(f).read_row_group(rg.index, columns=columns)
        tables.append(table.slice(0, left))
        left -= table.num_rows
    return pa.concat_tables(tables) if tables else inp.schema.empty_table().select(columns)
