"""The rebalance planner: pure, two-dimensional (bytes and operations per second), O(n log n).

What a plan promises
--------------------
* **Valid layout.** Only known, idle chunks move, each at most once, from the shard that
  holds them to another shard in scope; the loads it reports are the layout's arithmetic.
* **Limits.** At most ``max_moves`` moves (the global limit) and ``max_moves_per_shard`` per
  shard, counted as source or target; at most ``max_moves`` splits.
* **Capacities.** A move never takes a shard past its declared ``capacity_bytes`` or
  ``capacity_ops_per_s``.
* **Never worse.** After every move, in both dimensions, the most loaded shard is no more
  loaded and the least loaded no less than before it: the spread never widens.

How it weighs load
------------------
A shard's load has two dimensions, bytes and operations per second. Each is *normalized*:
when every shard in scope declares a capacity in that dimension the planner evens
utilization (load / capacity), otherwise absolute load. A dimension is *out of tolerance* when
the gap between the most loaded shard that can still give a chunk and the least loaded one
that can still take one exceeds ``tolerance`` times the mean. Each step takes the dimension
furthest out of tolerance (gap over allowed gap), its most and least loaded shards, and moves
the chunk that leaves the two closest in both dimensions (the sum over dimensions of the
squared difference after the move, each relative to its mean). With no traffic measured this
is the chunk closest to half the gap, as the one-dimensional planner always chose. A shard
with no chunk that helps in that dimension is set aside for it (before: planning stopped for
every shard), and, with ``split`` on, its largest chunk in that dimension is split if moving
half of it would help.

Hot chunks
----------
A chunk whose traffic no shard can carry evenly is planned as a split (reason ``hot``) so its
halves can live apart, and is not moved itself: its ops/s exceed ``hot_fraction`` (0.5) of
what one shard may carry, the smaller of the largest declared ``capacity_ops_per_s`` in scope
and ``(1 + tolerance)`` times the mean ops/s per shard (the most a shard holds while the fleet
is in tolerance). A shard holding such a chunk has room for less than that chunk's traffic
again, so the rest of its chunks cannot be evened around it. Splits are metadata changes (a
token bump, no data moves); the next round moves a half.

Cost
----
Four lazily updated heaps per dimension (the most and least loaded givers and takers) pick a
pair in O(log S); a move scans the giver's movable chunks, and a shard gives or takes at most
``max_moves_per_shard`` times, so a plan costs O(n log n) for n chunks on S shards.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from activities.models import PlannedMove, PlannedSplit, RebalancePlan

HOT_FRACTION = 0.5
"""A chunk above this fraction of a shard's declared ops/s capacity is split, not moved."""

TAKERS_TRIED = 8
"""Least loaded shards tried for a giver before it is set aside in a dimension."""

ChunkEntry = tuple[str, int, int] | tuple[str, int, int, float]
"""(collection, chunk id, bytes[, ops/s]); a negative size marks a chunk being moved."""


@dataclass(frozen=True, slots=True)
class ShardCapacity:
    """What a shard may hold: ``ShardInfo``'s declared capacities (None: unknown)."""

    bytes: int | None = None
    ops_per_s: float | None = None


class _Heap:
    """A lazily updated heap of shards: an entry is stale once its shard's stamp moved on."""

    __slots__ = ("items", "sign")

    def __init__(self, sign: int) -> None:
        self.items: list[tuple[float, int, int, str]] = []
        self.sign = sign  # +1: least first; -1: most first

    def push(self, value: float, rank: int, stamp: int, shard: str) -> None:
        heapq.heappush(self.items, (self.sign * value, self.sign * rank, stamp, shard))


@dataclass(frozen=True, slots=True)
class _Bounds:
    others: list[tuple[float, float] | None]
    """Per dimension: (most, least) loaded among the shards a move does not touch."""
    phi: float
    """Sum over dimensions of (spread / mean) squared, now."""


@dataclass(slots=True)
class _Chunk:
    collection: str
    chunk_id: int
    bytes: int
    ops: float


class _Rebalancer:
    def __init__(self, chunks: Mapping[str, Sequence[ChunkEntry]], *, tolerance: float,
                 max_moves: int, max_moves_per_shard: int, split: bool,
                 capacities: Mapping[str, ShardCapacity], busy: Collection[tuple[str, int]],
                 hot_fraction: float) -> None:
        self.tolerance = tolerance
        self.max_moves = max_moves
        self.limit = max_moves_per_shard
        self.split = split
        self.hot_fraction = hot_fraction
        self.shards = sorted(chunks)
        self.rank = {s: i for i, s in enumerate(self.shards)}
        self.caps = {s: capacities.get(s, ShardCapacity()) for s in self.shards}
        self.bytes = dict.fromkeys(self.shards, 0)
        self.ops = dict.fromkeys(self.shards, 0.0)
        self.movable: dict[str, list[_Chunk]] = {s: [] for s in self.shards}
        for s, entries in chunks.items():
            for entry in entries:
                size = entry[2]
                ops = float(entry[3]) if len(entry) > 3 else 0.0
                self.bytes[s] += abs(size)
                self.ops[s] += ops
                if size >= 0 and (entry[0], entry[1]) not in busy:
                    self.movable[s].append(_Chunk(entry[0], entry[1], size, ops))
        n = len(self.shards)
        cap_b = [self.caps[s].bytes for s in self.shards]
        cap_o = [self.caps[s].ops_per_s for s in self.shards]
        self.scale: list[dict[str, float]] = [
            {s: float(c) for s, c in zip(self.shards, cap_b, strict=True)}  # type: ignore[arg-type]
            if n and all(c is not None and c > 0 for c in cap_b) else dict.fromkeys(self.shards, 1.0),
            {s: float(c) for s, c in zip(self.shards, cap_o, strict=True)}  # type: ignore[arg-type]
            if n and all(c is not None and c > 0 for c in cap_o) else dict.fromkeys(self.shards, 1.0),
        ]
        self.ops_capped = n > 0 and all(c is not None and c > 0 for c in cap_o)
        self.norm = [{s: self.bytes[s] / self.scale[0][s] for s in self.shards},
                     {s: self.ops[s] / self.scale[1][s] for s in self.shards}]
        self.mean = [sum(d.values()) / n if n else 0.0 for d in self.norm]
        # Dimensions that carry load; with no traffic measured the planner is one-dimensional.
        self.dims = [d for d in (0, 1) if self.mean[d] > 0]
        self.per_shard = dict.fromkeys(self.shards, 0)
        self.stamp = dict.fromkeys(self.shards, 0)
        self.exhausted: list[set[str]] = [set(), set()]
        self.moves: list[PlannedMove] = []
        self.splits: list[PlannedSplit] = []
        self.split_keys: set[tuple[str, int]] = set()
        # Per dimension: givers (most first), takers (least first), all (most / least first).
        self.heaps = [(_Heap(-1), _Heap(1), _Heap(-1), _Heap(1)) for _ in (0, 1)]
        for s in self.shards:
            self._push(s)

    # -- heaps -------------------------------------------------------------------------------

    def _push(self, s: str) -> None:
        for d in self.dims:
            for heap in self.heaps[d]:
                heap.push(self.norm[d][s], self.rank[s], self.stamp[s], s)

    def _top(self, heap: _Heap, d: int, role: str, skip: str | tuple[str, ...] = ()
             ) -> str | None:
        """The first live, eligible shard of a heap (ineligibility only grows: dropped)."""
        items = heap.items
        held: list[tuple[float, int, int, str]] = []
        found = None
        while items:
            entry = items[0]
            s = entry[3]
            if entry[2] != self.stamp[s] or not self._eligible(s, d, role):
                heapq.heappop(items)
                continue
            if s == skip or s in skip:
                held.append(heapq.heappop(items))
                continue
            found = s
            break
        for entry in held:
            heapq.heappush(items, entry)
        return found

    def _takers(self, d: int, skip: str, k: int) -> list[str]:
        """The ``k`` least loaded takers in ``d`` (other than ``skip``), least first."""
        heap = self.heaps[d][1]
        out: list[str] = []
        held: list[tuple[float, int, int, str]] = []
        while len(out) < k:
            s = self._top(heap, d, "taker", skip=skip)
            if s is None:
                break
            out.append(s)
            held.append(heapq.heappop(heap.items))
        for entry in held:
            heapq.heappush(heap.items, entry)
        return out

    def _eligible(self, s: str, d: int, role: str) -> bool:
        if role == "giver":
            return (self.per_shard[s] < self.limit and bool(self.movable[s])
                    and s not in self.exhausted[d])
        if role == "taker":
            return self.per_shard[s] < self.limit
        return True

    # -- planning ----------------------------------------------------------------------------

    def plan_hot_splits(self) -> None:
        if not self.split or 1 not in self.dims or self.max_moves <= 0:
            return
        # What one shard may carry: its declared capacity, and what keeps it in tolerance.
        most = (1 + self.tolerance) * self.mean[1] * max(self.scale[1].values())
        if self.ops_capped:
            most = min(most, max(self.scale[1].values()))
        limit = self.hot_fraction * most
        hot = sorted(((c.ops, s, c) for s in self.shards for c in self.movable[s]
                      if c.ops > limit), key=lambda t: (-t[0], t[1], t[2].chunk_id))
        for _, s, c in hot[:self.max_moves]:
            self.movable[s].remove(c)
            self._add_split(s, c, "hot")

    def _add_split(self, s: str, c: _Chunk, reason: str) -> None:
        self.split_keys.add((c.collection, c.chunk_id))
        self.splits.append(PlannedSplit(collection=c.collection, chunk_id=c.chunk_id, shard=s,
                                        bytes=c.bytes, ops_per_s=c.ops, reason=reason))

    def _pair(self) -> tuple[int, str, str, float] | None:
        """The dimension furthest out of tolerance, with its giver, taker and gap."""
        best: tuple[float, int, str, str, float] | None = None
        for d in self.dims:
            givers, takers, _, _ = self.heaps[d]
            hi = self._top(givers, d, "giver")
            if hi is None:
                continue
            lo = self._top(takers, d, "taker", skip=hi)
            if lo is None:
                continue
            gap = self.norm[d][hi] - self.norm[d][lo]
            allowed = self.tolerance * self.mean[d]
            if gap <= allowed:
                continue
            ratio = gap / allowed if allowed > 0 else math.inf
            if best is None or ratio > best[0]:
                best = (ratio, d, hi, lo, gap)
        return None if best is None else best[1:]

    def _bounds(self, hi: str, lo: str) -> _Bounds:
        """Per dimension, the most and least loaded shards other than ``hi`` and ``lo`` (None
        when there are none), and the current sum of squared relative spreads."""
        others: list[tuple[float, float] | None] = [None, None]
        phi = 0.0
        for d in self.dims:
            _, _, most, least = self.heaps[d]
            top, bottom = self._top(most, d, "all"), self._top(least, d, "all")
            assert top is not None and bottom is not None
            phi += ((self.norm[d][top] - self.norm[d][bottom]) / self.mean[d]) ** 2
            top = self._top(most, d, "all", (hi, lo))
            bottom = self._top(least, d, "all", (hi, lo))
            if top is not None and bottom is not None:
                others[d] = (self.norm[d][top], self.norm[d][bottom])
        return _Bounds(others, phi)

    def _cost(self, raw: tuple[int, float], d: int, hi: str, lo: str, gap: float,
              bounds: _Bounds) -> float | None:
        """How far apart ``hi`` and ``lo`` end if ``raw`` (bytes, ops/s) moves between them, or
        None when that move does not help in ``d``, overfills ``lo`` or makes the fleet's
        spreads worse (the sum over dimensions of each spread over its mean, squared)."""
        if raw[d] <= 0:
            return None
        after = self.norm[d][hi] - raw[d] / self.scale[d][hi] \
            - self.norm[d][lo] - raw[d] / self.scale[d][lo]
        if abs(after) >= gap:
            return None
        cap_b, cap_o = self.caps[lo].bytes, self.caps[lo].ops_per_s
        if cap_b is not None and self.bytes[lo] + raw[0] > cap_b:
            return None
        if cap_o is not None and self.ops[lo] + raw[1] > cap_o:
            return None
        cost = phi = 0.0
        for e in self.dims:
            h = self.norm[e][hi] - raw[e] / self.scale[e][hi]
            low = self.norm[e][lo] + raw[e] / self.scale[e][lo]
            others = bounds.others[e]
            if others is None:
                top, bottom = max(h, low), min(h, low)
            else:
                top, bottom = max(others[0], h, low), min(others[1], h, low)
            phi += ((top - bottom) / self.mean[e]) ** 2
            cost += ((h - low) / self.mean[e]) ** 2
        if phi > bounds.phi * (1 + 1e-12):
            return None
        return cost

    def _pick(self, d: int, hi: str, lo: str, gap: float) -> _Chunk | None:
        bounds = self._bounds(hi, lo)
        best: tuple[float, str, int] | None = None
        pick = None
        for c in self.movable[hi]:
            cost = self._cost((c.bytes, c.ops), d, hi, lo, gap, bounds)
            if cost is None:
                continue
            key = (cost, c.collection, c.chunk_id)
            if best is None or key < best:
                best, pick = key, c
        return pick

    def _split_instead(self, d: int, hi: str, lo: str, gap: float) -> None:
        """No chunk of ``hi`` helps in ``d``: split its largest there if moving half of it
        would (within ``lo``'s capacities, widening no spread)."""
        if not self.split or len(self.splits) >= self.max_moves:
            return
        c = max(self.movable[hi], key=lambda c: ((c.bytes, c.ops)[d], c.chunk_id))
        if (c.collection, c.chunk_id) in self.split_keys:
            return
        if d == 0 and len(self.dims) == 1:
            # One dimension: the rule the planner always had (half of it inside the gap).
            helps = 0 < c.bytes / 2 / self.scale[0][hi] < gap
        else:
            helps = self._cost((c.bytes // 2, c.ops / 2), d, hi, lo, gap,
                               self._bounds(hi, lo)) is not None
        if helps:
            self.movable[hi].remove(c)
            self._add_split(hi, c, "size" if d == 0 else "hot")

    def run(self) -> None:
        self.plan_hot_splits()
        while len(self.shards) >= 2 and len(self.moves) < self.max_moves:
            pair = self._pair()
            if pair is None:
                break
            d, hi, lo, gap = pair
            c = self._pick(d, hi, lo, gap)
            if c is None:
                # The least loaded taker may be the most loaded in the other dimension: try
                # the next few before setting the giver aside.
                for other in self._takers(d, hi, TAKERS_TRIED)[1:]:
                    other_gap = self.norm[d][hi] - self.norm[d][other]
                    if other_gap <= self.tolerance * self.mean[d]:
                        break
                    c = self._pick(d, hi, other, other_gap)
                    if c is not None:
                        lo = other
                        break
            if c is None:
                self._split_instead(d, hi, lo, gap)
                self.exhausted[d].add(hi)
                continue
            self.movable[hi].remove(c)
            for s, sign in ((hi, -1), (lo, 1)):
                self.bytes[s] += sign * c.bytes
                self.ops[s] += sign * c.ops
                self.norm[0][s] = self.bytes[s] / self.scale[0][s]
                self.norm[1][s] = self.ops[s] / self.scale[1][s]
                self.per_shard[s] += 1
                self.stamp[s] += 1
                self._push(s)
            self.moves.append(PlannedMove(collection=c.collection, chunk_id=c.chunk_id,
                                          source=hi, target=lo, bytes=c.bytes,
                                          ops_per_s=c.ops))


def plan_rebalance(chunks: Mapping[str, Sequence[ChunkEntry]], *, tolerance: float,
                   max_moves: int, max_moves_per_shard: int, split: bool,
                   capacities: Mapping[str, ShardCapacity] | None = None,
                   busy: Collection[tuple[str, int]] = (),
                   hot_fraction: float = HOT_FRACTION) -> RebalancePlan:
    """Moves (and splits) that even the active shards' bytes and ops/s within ``tolerance``.

    ``chunks`` maps each shard in scope to its chunks: (collection, chunk id, bytes[, ops/s]);
    a negative size, or a key in ``busy``, marks a chunk being moved (it counts in its shard's
    load but is not planned). ``capacities`` are the shards' declared capacities. See the
    module docstring for the promises and the method.
    """
    r = _Rebalancer(chunks, tolerance=tolerance, max_moves=max_moves,
                    max_moves_per_shard=max_moves_per_shard, split=split,
                    capacities=capacities or {}, busy=busy, hot_fraction=hot_fraction)
    before_b = {s: sum(abs(e[2]) for e in cs) for s, cs in chunks.items()}
    before_o = {s: sum(float(e[3]) if len(e) > 3 else 0.0 for e in cs)
                for s, cs in chunks.items()}
    r.run()
    traffic = any(before_o.values())
    return RebalancePlan(loads=before_b, loads_after=dict(r.bytes), moves=r.moves,
                         splits=r.splits, ops=before_o if traffic else {},
                         ops_after=dict(r.ops) if traffic else {})
