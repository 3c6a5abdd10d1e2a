"""``CollectionRoute.apply``: a delta replaces exactly the chunks its rows overlap, and one
that would leave a gap or an overlap is refused (pure logic, no servers)."""

from __future__ import annotations

import pytest

from router.routes import CollectionRoute, RouteDeltaError
from shards.models import KHASH_END, KHASH_MIN

B = [KHASH_MIN, -100, 0, 100, KHASH_END]  # four chunks: ids 1..4 on s1, s2, s1, s2


def base() -> CollectionRoute:
    return CollectionRoute.from_columns(
        collection="c", shard_key="k", indexes=(), version=10, chunk_ids=[1, 2, 3, 4],
        los=B[:-1], his=B[1:], shard_ids=["s1", "s2", "s1", "s2"], tokens=[1, 1, 1, 1])


def delta(route: CollectionRoute, rows: list[tuple[int, int, int, str, int]],
          version: int = 11) -> CollectionRoute:
    return route.apply(version=version, shard_key="k", indexes=(),
                       chunk_ids=[r[0] for r in rows], los=[r[1] for r in rows],
                       his=[r[2] for r in rows], shard_ids=[r[3] for r in rows],
                       tokens=[r[4] for r in rows])


def layout(route: CollectionRoute) -> list[tuple[int, int, int, str, int]]:
    return [(c.chunk_id, c.range.lo, c.range.hi, c.shard_id, c.token) for c in route.chunks]


def test_move_split_merge_and_nothing() -> None:
    r = base()
    moved = delta(r, [(2, -100, 0, "s3", 2)])
    assert layout(moved)[1] == (2, -100, 0, "s3", 2) and moved.version == 11
    assert moved.lookup(-50).shard_id == "s3" and r.lookup(-50).shard_id == "s2"  # r unchanged
    split = delta(moved, [(5, 0, 50, "s1", 2), (6, 50, 100, "s1", 2)], 12)
    assert [c[0] for c in layout(split)] == [1, 2, 5, 6, 4]
    assert split.lookup(49).chunk_id == 5 and split.lookup(50).chunk_id == 6
    merged = delta(split, [(7, 0, 100, "s1", 3)], 13)
    assert [c[0] for c in layout(merged)] == [1, 2, 7, 4]
    # Several changes at once, at both ends of the space; and an empty delta.
    both = delta(r, [(8, KHASH_MIN, -100, "s9", 2), (9, 100, KHASH_END, "s9", 2)])
    assert [c[0] for c in layout(both)] == [8, 2, 3, 9]
    same = delta(r, [], 20)
    assert same.version == 20 and same.same_placement(r)


def test_a_merge_across_a_split_in_one_delta() -> None:
    """Chunks 2 and 3 merged, then split elsewhere: the delta holds only the final rows."""
    r = delta(base(), [(5, -100, -10, "s2", 2), (6, -10, 100, "s2", 2)])
    assert [c[0] for c in layout(r)] == [1, 5, 6, 4]


@pytest.mark.parametrize("rows", [
    [(5, 0, 50, "s1", 2)],                          # a split with a child missing: a gap
    [(6, 50, 100, "s1", 2)],                        # the other child only
    [(5, 0, 60, "s1", 2), (6, 50, 100, "s1", 2)],   # children that overlap
    [(5, -50, 50, "s1", 2)],                        # a row across a boundary, alone
    [(5, 10, 10, "s1", 2)],                         # an empty range
])
def test_a_delta_that_does_not_tile_is_refused(rows: list[tuple[int, int, int, str, int]]
                                               ) -> None:
    with pytest.raises(RouteDeltaError):
        delta(base(), rows)


def test_a_whole_map_must_tile() -> None:
    with pytest.raises(ValueError, match="gap or overlap"):
        CollectionRoute.from_columns(
            collection="c", shard_key="k", indexes=(), version=1, chunk_ids=[1, 2],
            los=[KHASH_MIN, 5], his=[0, KHASH_END], shard_ids=["a", "b"], tokens=[1, 1])
