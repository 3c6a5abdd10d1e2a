"""Bin packing for drains and merges: pure, two-dimensional (bytes and ops/s), O(n log S).

``bin_pack`` places chunks onto target shards, largest first, each onto the target with the
most room left (when every target declares its capacities) or else the least loaded one, and
never past a declared ``capacity_bytes`` or ``capacity_ops_per_s``: a chunk no target has room
for fails the plan. With no traffic measured it is the one-dimensional packing the drain
always did (largest bytes first; ties spread by count). With traffic, "largest" and "room" are
taken in the dimension where the chunk (or the target) is tightest, each dimension relative to
the targets' capacity (or, undeclared, their mean load): a chunk that is small in bytes but
hot goes early and onto a shard with ops/s to spare.

``plan_merge`` chooses which shards a merge drains: it keeps the most utilized shards, as few
as fit everything, and packs the others' chunks onto them. The lower bound it starts from is,
in each dimension, the fewest shards whose capacities (largest first) add up to the fleet's
total; a merge can never end with fewer shards than the larger of the two.

Targets are held in a heap keyed by their room (or load); a placement changes one target's
key, so each chunk costs O(log S) unless the best target cannot take it (then the next ones
are tried, in order).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from activities.context import non_retryable
from activities.models import PlannedMove
from catalog.models import ShardInfo

FIRST_TRY = 1.04
"""A merge first tries to keep this many times the lower bound of shards."""

PackEntry = tuple[str, int, str, int] | tuple[str, int, str, int, float]
"""(collection, chunk id, source shard, bytes[, ops/s])."""


Placement = tuple[str, int, str, str, int, float]
"""(collection, chunk id, source, target, bytes, ops/s)."""


class _NoRoom(Exception):
    def __init__(self, entry: tuple[str, int, str, int, float]) -> None:
        super().__init__(entry)
        self.entry = entry


def bin_pack(chunks: Sequence[PackEntry], targets: Sequence[ShardInfo], load: dict[str, int],
             ops_load: dict[str, float] | None = None) -> list[PlannedMove]:
    """Place every chunk on a target (see the module docstring). Updates ``load`` (and
    ``ops_load``) with the placements.

    Raises:
        ApplicationError: (non-retryable) a chunk no target has room for.
    """
    ops_load = ops_load if ops_load is not None else {}
    entries = [(c[0], c[1], c[2], c[3], float(c[4]) if len(c) > 4 else 0.0)
               for c in chunks]
    try:
        placed = _pack(entries, targets, load, ops_load)
    except _NoRoom as exc:
        cap_b = {t.shard_id: t.capacity_bytes for t in targets}
        room = {t: math.inf if cap_b.get(t) is None else (cap_b[t] or 0) - load[t]
                for t in load}
        roomiest = sorted(room, key=lambda t: -room[t])[:5]
        collection, chunk_id, _, size, ops = exc.entry
        what = f"{size} bytes" + (f", {ops:g} ops/s" if ops else "")
        raise non_retryable(ValueError(
            f"no target has room for chunk {collection}/{chunk_id} ({what}); room left "
            f"(bytes) on the roomiest {len(roomiest)} of {len(room)}: "
            f"{ {t: room[t] for t in roomiest} }"), "drain") from None
    return [PlannedMove(collection=c, chunk_id=i, source=s, target=t, bytes=b, ops_per_s=o)
            for c, i, s, t, b, o in placed]


def _units(targets: Sequence[ShardInfo], names: Sequence[str], total_b: float,
           total_o: float) -> tuple[float, float, bool, bool]:
    """Per-dimension yardsticks (the targets' mean capacity, else their mean load once
    packed) and whether every target declares each capacity."""
    info = {t.shard_id: t for t in targets}
    n = max(len(names), 1)
    all_b = bool(names) and all(info[t].capacity_bytes is not None for t in names)
    all_o = bool(names) and all(info[t].capacity_ops_per_s is not None for t in names)
    unit_b = (sum(info[t].capacity_bytes or 0 for t in names) / n if all_b
              else total_b / n) or 1.0
    unit_o = (sum(info[t].capacity_ops_per_s or 0.0 for t in names) / n if all_o
              else total_o / n) or 1.0
    return unit_b, unit_o, all_b, all_o


def _order(entries: list[tuple[str, int, str, int, float]], unit_b: float, unit_o: float,
           traffic: bool) -> list[tuple[str, int, str, int, float]]:
    """Largest first: by bytes, or with traffic by the larger of the two relative sizes."""
    if traffic:
        return sorted(entries, key=lambda e: (-max(e[3] / unit_b, e[4] / unit_o), e[0], e[1]))
    return sorted(entries, key=lambda e: (-e[3], e[0], e[1]))


def _pack(entries: list[tuple[str, int, str, int, float]], targets: Sequence[ShardInfo],
          load: dict[str, int], ops_load: dict[str, float], *,
          ordered: bool = False) -> list[Placement]:
    """The packing itself, on plain tuples; ``ordered``: ``entries`` are already in
    ``_order``. Raises ``_NoRoom`` with the first chunk nothing can take."""
    for t in load:
        ops_load.setdefault(t, 0.0)
    info = {t.shard_id: t for t in targets}
    names = list(load)
    traffic = any(e[4] > 0 for e in entries) or any(v > 0 for v in ops_load.values())
    total_b = sum(load.values()) + sum(e[3] for e in entries)
    total_o = sum(ops_load.values()) + sum(e[4] for e in entries)
    unit_b, unit_o, all_b, all_o = _units(targets, names, total_b, total_o)
    most_room = all_b and (all_o or not traffic)
    inf = math.inf
    cap_b = {t: inf if info[t].capacity_bytes is None else float(info[t].capacity_bytes or 0)
             for t in names}
    cap_o = {t: inf if info[t].capacity_ops_per_s is None
             else float(info[t].capacity_ops_per_s or 0.0) for t in names}

    def key(t: str) -> float:
        if not traffic:
            return -(cap_b[t] - load[t]) if most_room else float(load[t])
        if most_room:
            return -min((cap_b[t] - load[t]) / max(cap_b[t], 1.0),
                        (cap_o[t] - ops_load[t]) / max(cap_o[t], 1e-9))
        return max(load[t] / unit_b, ops_load[t] / unit_o)

    order = entries if ordered else _order(entries, unit_b, unit_o, traffic)
    placed = dict.fromkeys(names, 0)  # ties (empty chunks) spread by count
    stamp = dict.fromkeys(names, 0)
    heap = [(key(t), 0, t, 0) for t in names]
    heapq.heapify(heap)
    out: list[Placement] = []
    pop, push = heapq.heappop, heapq.heappush
    for entry in order:
        size, ops = entry[3], entry[4]
        skipped = []
        best = None
        while heap:
            top = pop(heap)
            t = top[2]
            if top[3] != stamp[t]:
                continue
            if cap_b[t] - load[t] >= size and cap_o[t] - ops_load[t] >= ops:
                best = t
                break
            skipped.append(top)
        for top in skipped:
            push(heap, top)
        if best is None:
            raise _NoRoom(entry)
        load[best] += size
        ops_load[best] += ops
        placed[best] += 1
        stamp[best] += 1
        push(heap, (key(best), placed[best], best, stamp[best]))
        out.append((entry[0], entry[1], entry[2], best, size, ops))
    return out


# -- merges ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MergePlan:
    """Which shards a merge drains and where their chunks go."""

    drained: list[str]
    kept: list[str]
    moves: list[PlannedMove]
    lower_bound: int
    """Fewest shards that can hold the fleet's bytes and ops/s (see ``lower_bound``)."""


def lower_bound(shards: Sequence[ShardInfo], total_bytes: int, total_ops: float) -> int:
    """Fewest shards whose capacities, largest first, add up to the totals in both dimensions
    (a dimension whose capacity some shard does not declare does not bound)."""
    bound = 1 if shards else 0
    for caps, total in (([s.capacity_bytes for s in shards], float(total_bytes)),
                        ([s.capacity_ops_per_s for s in shards], total_ops)):
        if total <= 0 or any(c is None for c in caps):
            continue
        acc, k = 0.0, 0
        for c in sorted((float(c or 0) for c in caps), reverse=True):
            acc += c
            k += 1
            if acc >= total:
                break
        bound = max(bound, k if acc >= total else len(caps) + 1)
    return bound


def plan_merge(chunks: Mapping[str, Sequence[tuple[str, int, int, float]]],
               shards: Sequence[ShardInfo]) -> MergePlan:
    """Drain as many shards as fit: keep the ``k`` most utilized, the smallest ``k`` (from the
    lower bound up, then by bisection) whose bin packing succeeds.

    ``chunks`` maps each shard to its chunks (collection, chunk id, bytes, ops/s).
    """
    info = {s.shard_id: s for s in shards}
    bytes_ = {s: sum(c[2] for c in chunks.get(s, ())) for s in info}
    ops = {s: sum(c[3] for c in chunks.get(s, ())) for s in info}

    def used(s: str) -> float:
        b, o = info[s].capacity_bytes, info[s].capacity_ops_per_s
        return max(bytes_[s] / b if b else 0.0, ops[s] / o if o else 0.0)

    order = sorted(info, key=lambda s: (-used(s), -(info[s].capacity_bytes or 0), s))
    bound = lower_bound(shards, sum(bytes_.values()), sum(ops.values()))

    everything = [(c[0], c[1], s, c[2], c[3]) for s in order for c in chunks.get(s, ())]
    unit_b, unit_o, _, _ = _units(shards, order, sum(bytes_.values()), sum(ops.values()))
    ranked = _order(everything, unit_b, unit_o, any(e[4] > 0 for e in everything))

    def attempt(k: int) -> list[Placement] | None:
        kept = set(order[:k])
        entries = [e for e in ranked if e[2] not in kept]
        try:
            return _pack(entries, [info[s] for s in order[:k]],
                         {s: bytes_[s] for s in order[:k]}, {s: ops[s] for s in order[:k]},
                         ordered=True)
        except _NoRoom:
            return None

    # The first try a little above the bound (packings rarely fill shards completely), then
    # steps up (doubling) until one fits, then a bisection between the largest count that
    # failed and the smallest that fit.
    n = len(order)
    lo = max(bound, 1) - 1  # known (or assumed) not to fit
    hi = n  # keeping every shard always fits (nothing moves)
    best: list[Placement] = []
    k = min(n, max(bound, math.ceil(bound * FIRST_TRY)))
    step = max(1, k - lo)
    growing = True  # no fit found yet: step up, doubling, before bisecting
    while hi - lo > 1:
        placed = attempt(k)
        if placed is None:
            lo = k
        else:
            hi, best, growing = k, placed, False
        if growing:
            step *= 2
            k = min(hi, lo + step)
        else:
            k = (lo + hi) // 2
    moves = [PlannedMove(collection=c, chunk_id=i, source=s, target=t, bytes=b, ops_per_s=o)
             for c, i, s, t, b, o in best]
    k = hi
    return MergePlan(drained=sorted(order[k:]), kept=sorted(order[:k]), moves=moves,
                     lower_bound=bound)
