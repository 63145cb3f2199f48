"""The Petastorm reader of reader.py: a rank's row groups through a Petastorm batch reader.

Imported only where Petastorm runs (reader.choose_reader: pyarrow < 15). Petastorm's own sharding is
round robin over row groups; the shard plan is by rows, so the reader gets exactly this rank's row groups.
"""
from __future__ import annotations

import re
import warnings
from typing import Iterator, Sequence

import numpy as np

from hvd_infer.dataset import ParquetInput, RowGroup, is_string

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    from pyarrow.filesystem import DaskFileSystem

from petastorm import TransformSpec
from petastorm.arrow_reader_worker import ArrowReaderWorker
from petastorm.fs_utils import get_filesystem_and_path_or_paths
from petastorm.reader import Reader
from petastorm.workers_pool.dummy_pool import DummyPool

# pyarrow releases Petastorm can read with: 15 removed the legacy ParquetDataset arguments it passes.
PYARROW_BELOW = 15


class FsspecAsLegacy(DaskFileSystem):
    """An fsspec filesystem as a legacy pyarrow one (module level: picklable to reader workers)."""

    def isdir(self, path):  # DaskFileSystem leaves these two unimplemented
        return self.fs.isdir(path)

    def isfile(self, path):
        return self.fs.isfile(path)


def _filesystem(inp: ParquetInput):
    """What Petastorm reads through: None for local files; a store's filesystem as a legacy pyarrow one,
    the only kind Petastorm's ParquetDataset call accepts."""
    if inp.protocol in ("file", "local"):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated, and what Petastorm needs
        return FsspecAsLegacy(inp.filesystem())


class PetastormRowGroups:
    """The wanted row groups, in order, each as {column: array}; raw, checked by reader.py."""

    def __init__(self, inp: ParquetInput, wanted: Sequence[RowGroup], columns: Sequence[str]):
        self.inp = inp
        files = sorted({rg.file for rg in wanted})
        filesystem, paths = get_filesystem_and_path_or_paths([inp.url(f) for f in files], filesystem=_filesystem(inp))
        keys = [(inp.files[rg.file], rg.index) for rg in wanted]

        class RowGroupReader(Reader):
            def _filter_row_groups(self, dataset, row_groups, *args):
                index = {(_strip(piece.path), piece.row_group): i for i, piece in enumerate(row_groups)}
                return [index[(_strip(p), g)] for p, g in keys], None

        patterns = ["^" + re.escape(c) + "$" for c in columns]  # the wanted columns' exact names
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.reader = RowGroupReader(filesystem, paths, schema_fields=patterns, worker_class=ArrowReaderWorker,
                                         reader_pool=DummyPool(), shuffle_row_groups=False, num_epochs=1,
                                         is_batched_reader=True, transform_spec=_strings_as_bytes(inp, columns))

    def __iter__(self) -> Iterator:
        for batch in self.reader:
            yield {c: _decode(v) if is_string(self.inp.schema.field(c).type) else v for c, v in batch._asdict().items()}

    def close(self) -> None:
        self.reader.stop()
        self.reader.join()


def _strings_as_bytes(inp: ParquetInput, columns: Sequence[str]):
    """Petastorm turns string columns into fixed-width numpy unicode: nulls become 'None' and
    one long text widens every row. As UTF-8 bytes they stay object arrays, nulls kept."""
    strings = [c for c in columns if is_string(inp.schema.field(c).type)]
    if not strings:
        return None

    def encode(df):
        for c in strings:
            df[c] = [None if s is None else s.encode("utf-8") for s in df[c]]
        return df

    return TransformSpec(encode, edit_fields=[(c, np.bytes_, (), True) for c in strings])


def _decode(values: np.ndarray) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = [v.decode("utf-8") if isinstance(v, bytes) else v for v in values]
    return out


def _strip(path: str) -> str:
    return path.split("://", 1)[-1].rstrip("/")
