"""Which rows each rank owns, and the parts it writes them in.

Rows are numbered globally in file order. Rank r owns rows [r*N/size, (r+1)*N/size), balanced to one row
whatever the row group sizes (two ranks may each keep their own slice of one row group). A part is a range
of rows written as one file; parts already written (by a run of any world size) are subtracted first.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

from hvd_infer.dataset import RowGroup

Interval = Tuple[int, int]


@dataclass(frozen=True)
class Piece:
    """Rows [lo, hi) of one row group."""
    row_group: RowGroup
    lo: int
    hi: int


@dataclass
class Part:
    start: int  # global rows [start, stop)
    stop: int
    pieces: List[Piece] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return self.stop - self.start


def rank_range(total_rows: int, rank: int, size: int) -> Interval:
    return (total_rows * rank // size, total_rows * (rank + 1) // size)


def subtract(span: Interval, done: Sequence[Interval]) -> List[Interval]:
    """span minus the union of done intervals, in order."""
    out, cursor = [], span[0]
    for a, b in sorted(done):
        if b <= cursor or a >= span[1]:
            continue
        if a > cursor:
            out.append((cursor, a))
        cursor = max(cursor, b)
    if cursor < span[1]:
        out.append((cursor, span[1]))
    return out


def pieces_of(row_groups: Sequence[RowGroup], starts: Sequence[int], start: int, stop: int) -> List[Piece]:
    """The pieces of global rows [start, stop); starts[i] is row_groups[i].start."""
    i = max(0, bisect.bisect_right(starts, start) - 1)
    pieces = []
    while i < len(row_groups) and row_groups[i].start < stop:
        rg = row_groups[i]
        lo, hi = max(start, rg.start) - rg.start, min(stop, rg.start + rg.rows) - rg.start
        if hi > lo:
            pieces.append(Piece(rg, lo, hi))
        i += 1
    return pieces


def plan_parts(row_groups: Sequence[RowGroup], rank: int, size: int, rows_per_part: int,
               done: Sequence[Interval] = ()) -> List[Part]:
    """The parts rank must still write, in row order."""
    total = sum(rg.rows for rg in row_groups)
    starts = [rg.start for rg in row_groups]  # once, not per part
    parts = []
    for a, b in subtract(rank_range(total, rank, size), done):
        for s in range(a, b, rows_per_part):
            e = min(b, s + rows_per_part)
            parts.append(Part(s, e, pieces_of(row_groups, starts, s, e)))
    return parts
