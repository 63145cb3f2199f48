"""Shard plan: balanced by rows, fewer row groups than ranks, resume subtraction."""
import random

import pytest

from hvd_infer.dataset import RowGroup
from hvd_infer.shard_plan import plan_parts, rank_range, subtract


def groups(sizes):
    out, start = [], 0
    for i, n in enumerate(sizes):
        out.append(RowGroup(0, i, start, n))
        start += n
    return out


def covered(rgs, size, rows_per_part=10**9, done=()):
    rows = []
    for r in range(size):
        for p in plan_parts(rgs, r, size, rows_per_part, done):
            for piece in p.pieces:
                rows += [piece.row_group.start + i for i in range(piece.lo, piece.hi)]
    return rows


@pytest.mark.parametrize("size", [1, 2, 3, 4, 7])
def test_every_row_exactly_once_and_balanced(size):
    rng = random.Random(size)
    rgs = groups([rng.choice([1, 5, 50, 500, 3000]) for _ in range(40)])
    total = sum(r.rows for r in rgs)
    assert sorted(covered(rgs, size, 777)) == list(range(total))
    per_rank = [sum(p.rows for p in plan_parts(rgs, r, size, 777)) for r in range(size)]
    assert max(per_rank) - min(per_rank) <= 1


def test_fewer_row_groups_than_ranks():
    rgs = groups([10])
    per_rank = [plan_parts(rgs, r, 4, 100) for r in range(4)]
    assert [sum(p.rows for p in parts) for parts in per_rank] == [2, 3, 2, 3]
    assert sorted(covered(rgs, 4)) == list(range(10))


def test_empty_dataset_gives_no_parts():
    assert plan_parts([], 0, 2, 10) == [] and plan_parts([], 1, 2, 10) == []


def test_parts_respect_rows_per_part():
    parts = plan_parts(groups([7] * 10), 0, 1, 25)
    assert [p.rows for p in parts] == [25, 25, 20]
    assert parts[1].pieces[0].lo == 4  # starts inside row group 3


def test_subtract_and_resume_with_other_world_size():
    assert subtract((0, 100), [(10, 20), (15, 30), (90, 120)]) == [(0, 10), (30, 90)]
    rgs = groups([13] * 9)
    total = 13 * 9
    done = [(p.start, p.stop) for p in plan_parts(rgs, 0, 2, 10)][:3]  # rank 0 of a 2-rank run died early
    rows = covered(rgs, 3, 10, done)
    finished = {i for a, b in done for i in range(a, b)}
    assert sorted(rows) == sorted(set(range(total)) - finished)


def test_rank_range():
    assert [rank_range(10, r, 3) for r in range(3)] == [(0, 3), (3, 6), (6, 10)]
