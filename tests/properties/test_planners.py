"""The rebalance and drain planners, and ``KeyRange`` splits and merges, on generated layouts.

Invariants: a plan keeps the global and per-shard move limits and every declared capacity;
moves only known chunks from the shard that holds them to another known shard, each at most
once; the layout it leads to has every chunk on exactly one shard; and its load arithmetic is
the layout's. In two dimensions (bytes and ops/s) no plan makes the spreads worse (the sum
of their squares relative to the means), a shard that
takes a chunk stays within both declared capacities, fine-grained fleets end within the
tolerance in both, and a merge drains whole shards onto the kept ones within capacities."""

from __future__ import annotations

import math
from collections import Counter
from datetime import UTC, datetime

from hypothesis import assume, example, given
from hypothesis import strategies as st
from temporalio.exceptions import ApplicationError

from activities.fleet import _bin_pack, plan_rebalance
from activities.packing import plan_merge
from activities.planners import ShardCapacity
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


def _shard(sid: str, capacity: int | None, ops: float | None = None) -> ShardInfo:
    return ShardInfo(shard_id=sid, address="host=x", engine="postgres", major_version=18,
                     state=ShardState.ACTIVE, capacity_bytes=capacity, capacity_ops_per_s=ops,
                     registered_at=_NOW, updated_at=_NOW)


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


# -- two dimensions: bytes and operations per second ----------------------------------------

ops_values = st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False)


@st.composite
def fleets(draw: st.DrawFn, small: bool = False) -> tuple[
        dict[str, list[tuple[str, int, int, float]]], dict[str, ShardCapacity]]:
    """Shards -> (collection, chunk id, bytes, ops/s), and the shards' declared capacities
    (often none; in one dimension or both)."""
    n = draw(st.integers(min_value=0 if not small else 2, max_value=7))
    shards = [f"s{i}" for i in range(n)]
    declare_b, declare_o = draw(st.booleans()), draw(st.booleans())
    out: dict[str, list[tuple[str, int, int, float]]] = {s: [] for s in shards}
    caps: dict[str, ShardCapacity] = {}
    next_id = 1
    for s in shards:
        for _ in range(draw(st.integers(0, 30 if small else 8))):
            size = draw(st.integers(1, 10) if small else sizes)
            ops = draw(st.floats(0, 10) if small else ops_values)
            out[s].append((draw(st.sampled_from(["a", "b"])), next_id, size, ops))
            next_id += 1
        load_b = sum(c[2] for c in out[s])
        load_o = sum(c[3] for c in out[s])
        caps[s] = ShardCapacity(
            bytes=load_b + draw(st.integers(0, 10**12)) if declare_b else None,
            ops_per_s=load_o + draw(ops_values) if declare_o else None)
    return out, caps


def _norm(loads: dict[str, float], caps: dict[str, float | None]) -> dict[str, float]:
    if loads and all(c is not None and c > 0 for c in caps.values()):
        return {s: v / (caps[s] or 1) for s, v in loads.items()}
    return dict(loads)


def _spread(values: dict[str, float]) -> float:
    return max(values.values()) - min(values.values()) if values else 0.0


@PURE
@given(fleets(), st.floats(min_value=0.001, max_value=5), st.integers(0, 20),
       st.integers(1, 5), st.booleans())
def test_two_dimensional_plans_keep_limits_capacities_and_never_worsen_spreads(
        fleet: tuple[dict[str, list[tuple[str, int, int, float]]], dict[str, ShardCapacity]],
        tolerance: float, max_moves: int, per_shard: int, split: bool) -> None:
    layout, caps = fleet
    plan = plan_rebalance(layout, tolerance=tolerance, max_moves=max_moves,
                          max_moves_per_shard=per_shard, split=split, capacities=caps)
    owner = {(c, i): s for s, cs in layout.items() for c, i, _, _ in cs}
    weight = {(c, i): (b, o) for cs in layout.values() for c, i, b, o in cs}
    assert len(plan.moves) <= max_moves and len(plan.splits) <= max_moves
    per: Counter[str] = Counter()
    received = set()
    for m in plan.moves:
        key = (m.collection, m.chunk_id)
        assert owner[key] == m.source != m.target and m.target in layout
        assert (m.bytes, m.ops_per_s) == weight[key]
        owner[key] = m.target
        per[m.source] += 1
        per[m.target] += 1
        received.add(m.target)
    assert all(n <= per_shard for n in per.values())
    assert len({(m.collection, m.chunk_id) for m in plan.moves}) == len(plan.moves)
    split_keys = {(sp.collection, sp.chunk_id) for sp in plan.splits}
    assert len(split_keys) == len(plan.splits)
    assert not split_keys & {(m.collection, m.chunk_id) for m in plan.moves}
    for sp in plan.splits:
        assert owner[(sp.collection, sp.chunk_id)] == sp.shard
    after_b = dict.fromkeys(layout, 0)
    after_o = dict.fromkeys(layout, 0.0)
    for key, s in owner.items():
        after_b[s] += weight[key][0]
        after_o[s] += weight[key][1]
    assert plan.loads_after == after_b
    if any(o for _, o in weight.values()):
        assert all(math.isclose(plan.ops_after[s], after_o[s], rel_tol=1e-9, abs_tol=1e-6)
                   for s in layout)
    for s in received:  # a shard that took a chunk is within its declared capacities
        cb, co = caps[s].bytes, caps[s].ops_per_s
        assert cb is None or after_b[s] <= cb
        assert co is None or after_o[s] <= co * (1 + 1e-9) + 1e-6
    # The fleet's spreads never get worse: the sum over dimensions of (spread / mean)^2 (one
    # dimension may widen a little to narrow the other more).
    before_b = {s: float(sum(c[2] for c in cs)) for s, cs in layout.items()}
    before_o = {s: sum(c[3] for c in cs) for s, cs in layout.items()}
    phi = [0.0, 0.0]
    for before, after, cap in ((before_b, after_b, {s: caps[s].bytes for s in layout}),
                               (before_o, after_o, {s: caps[s].ops_per_s for s in layout})):
        b, a = _norm(before, cap), _norm({s: float(v) for s, v in after.items()}, cap)
        mean = sum(b.values()) / len(b) if b else 0.0
        if mean > 0:
            phi[0] += (_spread(b) / mean) ** 2
            phi[1] += (_spread(a) / mean) ** 2
    assert phi[1] <= phi[0] * (1 + 1e-9) + 1e-9, "the plan made the spreads worse"


@PURE
@given(fleets(small=True), st.floats(min_value=0.2, max_value=1.0))
def test_fine_grained_fleets_are_evened_within_tolerance_in_both_dimensions(
        fleet: tuple[dict[str, list[tuple[str, int, int, float]]], dict[str, ShardCapacity]],
        tolerance: float) -> None:
    """With small chunks and no limit in the way, a plan evens bytes and ops/s to within the
    tolerance, give or take one chunk on each side (the granularity no plan can beat)."""
    layout, _ = fleet
    plan = plan_rebalance(layout, tolerance=tolerance, max_moves=10_000,
                          max_moves_per_shard=10_000, split=False)
    owner = {(c, i): s for s, cs in layout.items() for c, i, _, _ in cs}
    for m in plan.moves:
        owner[(m.collection, m.chunk_id)] = m.target
    for dim, biggest in ((2, 10), (3, 10.0)):
        after = dict.fromkeys(layout, 0.0)
        for cs in layout.values():
            for c in cs:
                after[owner[(c[0], c[1])]] += c[dim]
        mean = sum(after.values()) / len(after)
        assert _spread(after) <= tolerance * mean + 2 * biggest + 1e-6, (dim, after)


@PURE
@given(st.lists(st.tuples(sizes, ops_values), max_size=12),
       st.lists(st.tuples(st.one_of(st.none(), sizes), st.one_of(st.none(), ops_values)),
                min_size=1, max_size=4), st.data())
def test_two_dimensional_drain_plans_fit_both_capacities_or_refuse(
        chunk_weights: list[tuple[int, float]],
        capacities: list[tuple[int | None, float | None]], data: st.DataObject) -> None:
    targets = [_shard(f"t{i}", b, o) for i, (b, o) in enumerate(capacities)]
    load = {t.shard_id: data.draw(st.integers(0, 10**12)) for t in targets}
    ops = {t.shard_id: data.draw(ops_values) for t in targets}
    assume(all((b is None or load[t.shard_id] <= b) and (o is None or ops[t.shard_id] <= o)
               for t, (b, o) in zip(targets, capacities, strict=True)))
    before_b, before_o = dict(load), dict(ops)
    chunks = [("a", i + 1, "drained", b, o) for i, (b, o) in enumerate(chunk_weights)]
    try:
        moves = _bin_pack(chunks, targets, load, ops)
    except ApplicationError as exc:
        assert exc.non_retryable and "no target has room" in str(exc)
        return
    assert sorted(m.chunk_id for m in moves) == [c[1] for c in chunks]
    for t in targets:
        mine = [m for m in moves if m.target == t.shard_id]
        assert load[t.shard_id] == before_b[t.shard_id] + sum(m.bytes for m in mine)
        assert math.isclose(ops[t.shard_id], before_o[t.shard_id] + sum(m.ops_per_s for m in mine),
                            rel_tol=1e-9, abs_tol=1e-6)
        if t.capacity_bytes is not None:
            assert load[t.shard_id] <= t.capacity_bytes
        if t.capacity_ops_per_s is not None:
            assert ops[t.shard_id] <= t.capacity_ops_per_s * (1 + 1e-9) + 1e-6


@PURE
@given(fleets(small=True), st.integers(20, 400), st.floats(20, 400))
def test_merge_plans_drain_whole_shards_within_capacities(
        fleet: tuple[dict[str, list[tuple[str, int, int, float]]], dict[str, ShardCapacity]],
        cap_b: int, cap_o: float) -> None:
    layout, _ = fleet
    infos = [_shard(s, cap_b, cap_o) for s in layout]
    assume(all(sum(c[2] for c in cs) <= cap_b and sum(c[3] for c in cs) <= cap_o
               for cs in layout.values()))
    plan = plan_merge(layout, infos)
    assert sorted(plan.kept + plan.drained) == sorted(layout)
    assert len(plan.kept) >= plan.lower_bound
    owner = {(c, i): s for s, cs in layout.items() for c, i, _, _ in cs}
    moved = Counter((m.collection, m.chunk_id) for m in plan.moves)
    drained_chunks = {(c, i) for s in plan.drained for c, i, _, _ in layout[s]}
    assert set(moved) == drained_chunks and all(n == 1 for n in moved.values())
    for m in plan.moves:
        assert owner[(m.collection, m.chunk_id)] == m.source in plan.drained
        assert m.target in plan.kept
        owner[(m.collection, m.chunk_id)] = m.target
    weight = {(c, i): (b, o) for cs in layout.values() for c, i, b, o in cs}
    for s in plan.kept:
        mine = [weight[key] for key, t in owner.items() if t == s]
        assert sum(b for b, _ in mine) <= cap_b
        assert sum(o for _, o in mine) <= cap_o * (1 + 1e-9) + 1e-6
