"""Read a rank's parts, streaming, one row group at a time: through Petastorm, or pyarrow itself.

Both read exactly the row groups the shard plan gives this rank, in order, each as the same {column:
numpy array} (strings as str, nulls as None); read_parts slices them into the plan's rows. data.reader
picks one: petastorm where it runs (pyarrow < 15, petastorm installed), else pyarrow.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hvd_infer.dataset import ParquetInput, RowGroup, is_string
from hvd_infer.errors import ConfigError, DataError
from hvd_infer.shard_plan import Part

Columns = Dict[str, np.ndarray]


@dataclass(frozen=True)
class ReaderChoice:
    name: str  # petastorm or pyarrow
    why: str  # what decided it

    def describe(self) -> str:
        return f"{self.name} ({self.why})"


@functools.lru_cache(maxsize=None)
def choose_reader(setting: str = "auto") -> ReaderChoice:
    """data.reader resolved: auto is petastorm where it can read, else pyarrow; petastorm where it cannot
    raises ConfigError naming why."""
    if setting == "pyarrow":
        return ReaderChoice("pyarrow", "data.reader=pyarrow")
    cannot = _petastorm_cannot_run()
    if setting == "petastorm":
        if cannot:
            raise ConfigError(f"data.reader=petastorm, but {cannot}; use data.reader=pyarrow (or auto), which reads "
                              "the same rows with pyarrow itself")
        return ReaderChoice("petastorm", "data.reader=petastorm")
    if cannot:
        return ReaderChoice("pyarrow", f"data.reader=auto; {cannot}")
    return ReaderChoice("petastorm", "data.reader=auto; petastorm runs here")


def _petastorm_cannot_run() -> str:
    """Why Petastorm cannot read here, or '' where it can."""
    try:
        from hvd_infer import petastorm_reader
    except ImportError as e:
        return f"petastorm does not import here: {e}"
    if int(pa.__version__.split(".")[0]) >= petastorm_reader.PYARROW_BELOW:
        return (f"petastorm cannot read with pyarrow {pa.__version__} (it needs pyarrow < "
                f"{petastorm_reader.PYARROW_BELOW})")
    return ""


class ArrowRowGroups:
    """The wanted row groups, in order, each as {column: array}, read by pyarrow: what Petastorm's
    batch reader gives (pandas' conversion of each column), without Petastorm."""

    def __init__(self, inp: ParquetInput, wanted: Sequence[RowGroup], columns: Sequence[str]):
        self.inp, self.wanted, self.columns = inp, wanted, list(columns)
        # Local files through pyarrow's own reads (no Python file object); a store's through fsspec.
        self.fs = None if inp.protocol in ("file", "local") else inp.filesystem()
        self.file, self.handle, self.parquet = None, None, None  # the file open now: row groups come file by file

    def __iter__(self) -> Iterator[Columns]:
        for rg in self.wanted:
            if rg.file != self.file:
                self.close()
                path = self.inp.files[rg.file]
                self.handle = path if self.fs is None else self.fs.open(path, "rb")
                self.file, self.parquet = rg.file, pq.ParquetFile(self.handle)
            table = self.parquet.read_row_group(rg.index, columns=self.columns)
            yield {c: _as_numpy(table.column(c), is_string(self.inp.schema.field(c).type)) for c in self.columns}

    def close(self) -> None:
        if self.fs is not None and self.handle is not None:
            self.handle.close()
        self.file, self.handle, self.parquet = None, None, None


def _as_numpy(column: pa.ChunkedArray, string: bool) -> np.ndarray:
    if string:
        out = np.empty(len(column), dtype=object)
        out[:] = column.to_pylist()
        return out
    return column.to_pandas().to_numpy()


def _open_row_groups(reader: str, inp: ParquetInput, wanted: Sequence[RowGroup], columns: Sequence[str]):
    if reader == "petastorm":
        from hvd_infer.petastorm_reader import PetastormRowGroups

        return PetastormRowGroups(inp, wanted, columns)
    return ArrowRowGroups(inp, wanted, columns)


def read_parts(inp: ParquetInput, parts: List[Part], columns: Sequence[str], reader: str = "auto"
               ) -> Iterator[Tuple[Part, Iterator[Columns]]]:
    """Yield (part, its rows as chunks {column: array}, one per row group slice) for each part, in row order.
    Streaming: one row group is held at a time, so take a part's chunks before the next part."""
    wanted: List[RowGroup] = []
    for part in parts:
        for piece in part.pieces:
            if not wanted or wanted[-1] != piece.row_group:
                wanted.append(piece.row_group)
    source = _open_row_groups(choose_reader(reader).name, inp, wanted, columns) if wanted else None
    batches = iter(source) if source is not None else iter(())
    loaded = iter(wanted)
    current: List = [None, None]  # the row group held, and its columns

    def chunks(part: Part) -> Iterator[Columns]:
        for piece in part.pieces:
            while current[0] != piece.row_group:
                rg = next(loaded)
                current[:] = [rg, None]  # the last row group is freed before the next one is read
                current[1] = _next_batch(batches, inp, rg)
            yield {c: current[1][c][piece.lo:piece.hi] for c in columns}

    try:
        for part in parts:
            yield part, chunks(part)
    finally:
        if source is not None:
            source.close()


def _next_batch(batches: Iterator[Columns], inp: ParquetInput, rg: RowGroup) -> Columns:
    try:
        data = next(batches)
    except StopIteration:
        raise DataError(f"{inp.files[rg.file]}: row group {rg.index} could not be read") from None
    except Exception as e:
        raise DataError(f"cannot read row group {rg.index} of {inp.files[rg.file]} ({str(e).splitlines()[0]}); "
                        "the file looks corrupt: replace it and rerun with output.mode=resume") from None
    n = len(next(iter(data.values())))
    if n != rg.rows:
        raise DataError(f"{inp.files[rg.file]} row group {rg.index}: read {n} rows, its footer says {rg.rows}")
    return data
