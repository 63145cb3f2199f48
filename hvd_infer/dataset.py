"""The Parquet input: which files, their row groups, their schema, checked up front.

Only footers are read here (no data), so a wrong path, a missing column, a
non-string text column or a truncated file fails before any model loads.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from hvd_infer.config import DataConfig
from hvd_infer.errors import DataError
from hvd_infer.storage import explain


with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    from pyarrow.filesystem import DaskFileSystem


class FsspecAsLegacy(DaskFileSystem):
    """An fsspec filesystem as a legacy pyarrow one (module level: picklable to reader workers)."""

    def isdir(self, path):  # DaskFileSystem leaves these two unimplemented
        return self.fs.isdir(path)

    def isfile(self, path):
        return self.fs.isfile(path)


@dataclass(frozen=True)
class RowGroup:
    file: int  # index into ParquetInput.files
    index: int  # row group number inside that file
    start: int  # global row number of its first row
    rows: int


@dataclass
class ParquetInput:
    protocol: str
    files: List[str]  # paths on the filesystem (no protocol), in a fixed order
    sizes: List[int]
    row_groups: List[RowGroup]
    schema: pa.Schema
    storage_options: Dict[str, Any] = field(default_factory=dict)  # data.storage_options, for every reader

    @property
    def total_rows(self) -> int:
        return sum(rg.rows for rg in self.row_groups)

    def url(self, file: int) -> str:
        """A URL Petastorm and pyarrow understand for one file."""
        return f"{self.protocol}://{self.files[file]}"

    def filesystem(self):
        return fsspec.filesystem(self.protocol, **self.storage_options)

    def petastorm_filesystem(self):
        """What Petastorm should read through: None lets it open local files itself; a store's
        filesystem is wrapped as a legacy pyarrow filesystem, the only kind Petastorm 0.13's
        ParquetDataset call accepts on pyarrow 14 (an fsspec one fails on validate_schema)."""
        if self.protocol in ("file", "local"):
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecated, and what Petastorm needs
            return FsspecAsLegacy(self.filesystem())

    def fingerprint(self) -> str:
        """Changes when the files, their sizes or row counts change: resume refuses then."""
        counts = [(rg.file, rg.index, rg.rows) for rg in self.row_groups]
        blob = json.dumps([self.files, self.sizes, counts])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _has_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


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
    if _has_glob(root):
        found = [p for p in fs.glob(root) if fs.isfile(p)]
        if not found:
            raise DataError(f"data.path {path} matches no files; give a Parquet file, a directory of them, or a glob like /data/*.parquet")
    elif not fs.exists(root):
        raise DataError(f"data.path {path} does not exist; give a Parquet file, a directory of them, or a glob")
    elif fs.isdir(root):
        found = [p for p in fs.find(root) if _is_data_file(p) and
                 not any(part.startswith(("_", ".")) for part in p[len(root.rstrip("/")) + 1:].split("/")[:-1])]
        if not found:
            raise DataError(f"data.path {path} is a directory with no Parquet files in it")
    else:
        found = [root]
    found = sorted(found)
    sizes = [int(fs.size(p)) for p in found]
    return protocol, found, sizes


def open_input(cfg: DataConfig) -> ParquetInput:
    """List and check the input named by data.path; raises DataError naming what is wrong."""
    protocol, files, sizes = list_files(cfg.path, cfg.storage_options)
    fs = fsspec.filesystem(protocol, **cfg.storage_options)
    row_groups: List[RowGroup] = []
    schema = None
    start = 0
    for i, path in enumerate(files):
        try:
            with fs.open(path, "rb") as f:
                meta = pq.ParquetFile(f).metadata
                file_schema = meta.schema.to_arrow_schema()
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise DataError(f"cannot read {path} as Parquet ({str(e).splitlines()[0]}); "
                            "is it truncated or not a Parquet file? Remove or replace it") from None
        _check_columns(cfg, path, file_schema)
        if schema is None:
            schema = file_schema
        for j in range(meta.num_row_groups):
            n = meta.row_group(j).num_rows
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
