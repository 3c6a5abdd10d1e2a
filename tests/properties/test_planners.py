"""The rebalance and drain planners, and ``KeyRange`` splits and merges, on generated layouts.

Invariants: a plan keeps the global and per-shard move limits and every declared capacity;
moves only known chunks from the shard that holds them to another known shard, each at most
once; the layout it leads to has every chunk on exactly one shard; and its load arithmetic is
the layout's."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

from hypothesis import assume, example, given
from hypothesis import strategies as st
from temporalio.exceptions import ApplicationError

from activities.fleet import _bin_pack, plan_rebalance
from catalog.models import ShardInfo, ShardState
from shards.models import KHASH_END, KHASH_MIN, KeyRange
from shards.postgres.checksum import merge_ranges
from tests.properties.conftest import PURE

_NOW = datetime(2026, 1, 1, tzinfo=UTC)
sizes = st.integers(min_value=0, max_value=10**12)


@st.composite
def layouts(draw: st.DrawFn) -> dict[str, list[tuple[str, int, int]]]:
    """Shards -> (collection, chunk id, size); negative sizes mark chunks being moved."""
    n = draw(st.integers(min_value=0, max_value=6))
    shards = [f"s{i}" for i in range(n)]
    out: dict[str, list[tuple[str, int, int]]] = {s: [] for s in shards}
    next_id = 1
    for s in shards:
        for _ in range(draw(st.integers(min_value=0, max_value=8))):
            size = draw(sizes)
            if draw(st.integers(0, 9)) == 0:
                size = -size
            out[s].append((draw(st.sampled_from(["a", "b"])), next_id, size))
            next_id += 1
    return out


@PURE
@given(layouts(), st.floats(min_value=0.001, max_value=5), st.integers(0, 20),
       st.integers(1, 5), st.booleans())
@example({"s0": [("a", 1, 10), ("a", 2, 10)], "s1": []}, 0.1, 4, 1, True)
def test_rebalance_plans_keep_limits_and_lead_to_a_valid_layout(
        layout: dict[str, list[tuple[str, int, int]]], tolerance: float, max_moves: int,
        per_shard: int, split: bool) -> None:
    plan = plan_rebalance(layout, tolerance=tolerance, max_moves=max_moves,
                          max_moves_per_shard=per_shard, split=split)
    owner = {(c, i): s for s, cs in layout.items() for c, i, _ in cs}
    size = {(c, i): abs(b) for cs in layout.values() for c, i, b in cs}
    busy = {(c, i) for cs in layout.values() for c, i, b in cs if b < 0}

    assert len(plan.moves) <= max_moves
    per = Counter()
    for m in plan.moves:
        key = (m.collection, m.chunk_id)
        assert key in owner and key not in busy, "only known, idle chunks move"
        assert owner[key] == m.source != m.target and m.target in layout
        assert m.bytes == size[key]
        owner[key] = m.target
        per[m.source] += 1
        per[m.target] += 1
    assert all(n <= per_shard for n in per.values())
    assert len({(m.collection, m.chunk_id) for m in plan.moves}) == len(plan.moves)
    # The layout after: every chunk on exactly one known shard, loads as the plan says.
    after = dict.fromkeys(layout, 0)
    for key, s in owner.items():
        after[s] += size[key]
    assert plan.loads_after == after
    assert plan.loads == {s: sum(abs(b) for _, _, b in cs) for s, cs in layout.items()}
    assert sum(after.values()) == sum(plan.loads.values())
    # Moves never widen the spread between the most and the least loaded shard.
    if layout:
        assert max(after.values()) - min(after.values()) <= \
            max(plan.loads.values()) - min(plan.loads.values())
    for sp in plan.splits:
        assert (sp.collection, sp.chunk_id) in owner and sp.shard in layout
        assert (sp.collection, sp.chunk_id) not in busy


def _shard(sid: str, capacity: int | None) -> ShardInfo:
    return ShardInfo(shard_id=sid, address="host=x", engine="postgres", major_version=18,
                     state=ShardState.ACTIVE, capacity_bytes=capacity, registered_at=_NOW,
                     updated_at=_NOW)


@PURE
@given(st.lists(sizes, max_size=12), st.lists(st.one_of(st.none(), sizes), min_size=1,
                                                 max_size=4), st.data())
def test_drain_plans_fit_capacities_or_refuse(chunk_sizes: list[int],
                                              capacities: list[int | None],
                                              data: st.DataObject) -> None:
    targets = [_shard(f"t{i}", c) for i, c in enumerate(capacities)]
    load = {t.shard_id: data.draw(st.integers(0, 10**12)) for t in targets}
    assume(all(c is None or load[t.shard_id] <= c for t, c in zip(targets, capacities,
                                                                    strict=True)))
    before = dict(load)
    chunks = [("a", i + 1, "drained", s) for i, s in enumerate(chunk_sizes)]
    try:
        moves = _bin_pack(chunks, targets, load)
    except ApplicationError as exc:
        assert exc.non_retryable and "no target has room" in str(exc)
        return
    assert sorted(m.chunk_id for m in moves) == [c[1] for c in chunks]
    placed = Counter()
    for m in moves:
        assert m.source == "drained" and m.target in before
        placed[m.target] += m.bytes
    for t in targets:
        assert load[t.shard_id] == before[t.shard_id] + placed[t.shard_id]
        if t.capacity_bytes is not None:
            assert load[t.shard_id] <= t.capacity_bytes


bounds = st.integers(min_value=KHASH_MIN, max_value=KHASH_END)


@PURE
@given(bounds, bounds, st.integers(min_value=-3, max_value=5000))
@example(KHASH_MIN, KHASH_END, 7)
@example(0, 3, 10)
def test_key_range_splits_tile_the_range(a: int, b: int, parts: int) -> None:
    assume(a != b)
    r = KeyRange(lo=min(a, b), hi=max(a, b))
    pieces = r.split(parts)
    assert len(pieces) == max(1, min(parts, r.hi - r.lo))
    assert pieces[0].lo == r.lo and pieces[-1].hi == r.hi
    assert all(p.hi == q.lo for p, q in zip(pieces, pieces[1:], strict=False))
    widths = [p.hi - p.lo for p in pieces]
    assert max(widths) - min(widths) <= 1
    assert merge_ranges(pieces) == [r]


@PURE
@given(st.lists(st.tuples(bounds, bounds).filter(lambda t: t[0] != t[1]), max_size=8))
def test_merged_ranges_cover_exactly_their_union(pairs: list[tuple[int, int]]) -> None:
    ranges = [KeyRange(lo=min(p), hi=max(p)) for p in pairs]
    merged = merge_ranges(ranges)
    assert all(p.hi < q.lo for p, q in zip(merged, merged[1:], strict=False))
    for r in ranges:  # every input lies inside one merged range
        assert any(m.lo <= r.lo and r.hi <= m.hi for m in merged)
    for m in merged:  # every merged range's ends come from inputs
        assert any(r.lo == m.lo for r in ranges) and any(r.hi == m.hi for r in ranges)


@PURE
@given(st.one_of(st.integers(), st.floats(), st.text(max_size=3), st.none()),
       st.one_of(st.integers(), st.floats(), st.text(max_size=3), st.none()))
def test_key_ranges_refuse_bad_bounds(lo: object, hi: object) -> None:
    from pydantic import ValidationError

    try:
        r = KeyRange(lo=lo, hi=hi)  # type: ignore[arg-type]
    except ValidationError:
        return
    assert KHASH_MIN <= r.lo < r.hi <= KHASH_END
