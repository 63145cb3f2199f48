"""Read a rank's parts through Petastorm, streaming, one row group at a time.

Petastorm's own sharding is round robin over row groups (and raises
NoDataAvailableError with fewer row groups than shards). Our shard plan is by
rows, so we give a Petastorm batch reader exactly the row groups this rank
needs, in order, and slice each into the rows the plan assigns.
"""
from __future__ import annotations

import warnings
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np

from hvd_infer.dataset import ParquetInput, RowGroup, is_string
from hvd_infer.errors import DataError
from hvd_infer.shard_plan import Part

Columns = Dict[str, np.ndarray]


def _petastorm_reader(inp: ParquetInput, wanted: Sequence[RowGroup], columns: Sequence[str]):
    from petastorm.arrow_reader_worker import ArrowReaderWorker
    from petastorm.fs_utils import get_filesystem_and_path_or_paths
    from petastorm.reader import Reader
    from petastorm.workers_pool.dummy_pool import DummyPool

    files = sorted({rg.file for rg in wanted})
    urls = [inp.url(f) for f in files]
    filesystem, paths = get_filesystem_and_path_or_paths(urls, filesystem=inp.petastorm_filesystem())
    keys = [(inp.files[rg.file], rg.index) for rg in wanted]

    class RowGroupReader(Reader):
        def _filter_row_groups(self, dataset, row_groups, *args):
            index = {(_strip(piece.path), piece.row_group): i for i, piece in enumerate(row_groups)}
            return [index[(_strip(p), g)] for p, g in keys], None

    # Only the wanted columns (exact names, as regexes anchored both ends).
    patterns = ["^" + _regex_escape(c) + "$" for c in columns]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return RowGroupReader(filesystem, paths, schema_fields=patterns, worker_class=ArrowReaderWorker,
                              reader_pool=DummyPool(), shuffle_row_groups=False, num_epochs=1,
                              is_batched_reader=True, transform_spec=_strings_as_bytes(inp, columns))


def _strings_as_bytes(inp: ParquetInput, columns: Sequence[str]):
    """Petastorm turns string columns into fixed-width numpy unicode: nulls become 'None' and
    one long text widens every row. As UTF-8 bytes they stay object arrays, nulls kept."""
    from petastorm import TransformSpec

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


def _regex_escape(name: str) -> str:
    import re
    return re.escape(name)


def read_parts(inp: ParquetInput, parts: List[Part], columns: Sequence[str]
               ) -> Iterator[Tuple[Part, Iterator[Columns]]]:
    """Yield (part, its rows as chunks {column: array}, one per row group slice) for each part, in order.

    Streaming: one row group is held at a time, so take a part's chunks before the next part.
    Rows come in global row order.
    """
    wanted: List[RowGroup] = []
    for part in parts:
        for piece in part.pieces:
            if not wanted or wanted[-1] != piece.row_group:
                wanted.append(piece.row_group)
    reader = _petastorm_reader(inp, wanted, columns) if wanted else None
    loaded = iter(wanted)
    current: List = [None, None]  # the row group held, and its columns

    def chunks(part: Part) -> Iterator[Columns]:
        for piece in part.pieces:
            while current[0] != piece.row_group:
                rg = next(loaded)
                current[:] = [rg, None]  # the last row group is freed before the next one is read
                current[1] = _next_batch(reader, inp, rg)
            yield {c: current[1][c][piece.lo:piece.hi] for c in columns}

    try:
        for part in parts:
            yield part, chunks(part)
    finally:
        if reader is not None:
            reader.stop()
            reader.join()


def _next_batch(reader, inp: ParquetInput, rg: RowGroup) -> Columns:
    try:
        batch = next(reader)
    except StopIteration:
        raise DataError(f"{inp.files[rg.file]}: row group {rg.index} could not be read") from None
    except Exception as e:
        raise DataError(f"cannot read row group {rg.index} of {inp.files[rg.file]} ({str(e).splitlines()[0]}); "
                        "the file looks corrupt: replace it and rerun with output.mode=resume") from None
    data = {c: _decode(v) if is_string(inp.schema.field(c).type) else v for c, v in batch._asdict().items()}
    n = len(next(iter(data.values())))
    if n != rg.rows:
        raise DataError(f"{inp.files[rg.file]} row group {rg.index}: read {n} rows, its footer says {rg.rows}")
    return data
