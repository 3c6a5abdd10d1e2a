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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from temporalio.exceptions import ApplicationError

from activities.context import non_retryable
from activities.models import PlannedMove
from catalog.models import ShardInfo

PackEntry = tuple[str, int, str, int] | tuple[str, int, str, int, float]
"""(collection, chunk id, source shard, bytes[, ops/s])."""


def bin_pack(chunks: Sequence[PackEntry], targets: Sequence[ShardInfo], load: dict[str, int],
             ops_load: dict[str, float] | None = None) -> list[PlannedMove]:
    """Place every chunk on a target (see the module docstring). Updates ``load`` (and
    ``ops_load``) with the placements.

    Raises:
        ApplicationError: (non-retryable) a chunk no target has room for.
    """
    ops_load = ops_load if ops_load is not None else {}
    for t in load:
        ops_load.setdefault(t, 0.0)
    cap_b = {t.shard_id: t.capacity_bytes for t in targets}
    cap_o = {t.shard_id: t.capacity_ops_per_s for t in targets}
    entries = [(c[0], c[1], c[2], c[3], float(c[4]) if len(c) > 4 else 0.0)
               for c in chunks]
    traffic = any(e[4] > 0 for e in entries) or any(v > 0 for v in ops_load.values())
    names = list(load)
    n = max(len(names), 1)
    all_b = bool(names) and all(cap_b.get(t) is not None for t in names)
    all_o = bool(names) and all(cap_o.get(t) is not None for t in names)
    # Per-dimension yardsticks: the targets' mean capacity, else their mean load once packed.
    total_b = sum(load.values()) + sum(e[3] for e in entries)
    total_o = sum(ops_load.values()) + sum(e[4] for e in entries)
    unit_b = (sum(cap_b[t] or 0 for t in names) / n if all_b else total_b / n) or 1.0
    unit_o = (sum(cap_o[t] or 0.0 for t in names) / n if all_o else total_o / n) or 1.0
    most_room = all_b and (all_o or not traffic)

    def room_b(t: str) -> float:
        c = cap_b.get(t)
        return math.inf if c is None else c - load[t]

    def room_o(t: str) -> float:
        c = cap_o.get(t)
        return math.inf if c is None else c - ops_load[t]

    def key(t: str) -> float:
        if not traffic:
            return -room_b(t) if most_room else float(load[t])
        if most_room:
            return -min(room_b(t) / max(cap_b[t] or 0, 1), room_o(t) / max(cap_o[t] or 0.0, 1e-9))
        return max(load[t] / unit_b, ops_load[t] / unit_o)

    if traffic:
        order = sorted(entries, key=lambda e: (-max(e[3] / unit_b, e[4] / unit_o), e[0], e[1]))
    else:
        order = sorted(entries, key=lambda e: (-e[3], e[0], e[1]))
    placed = dict.fromkeys(load, 0)  # ties (empty chunks) spread by count
    stamp = dict.fromkeys(load, 0)
    heap = [(key(t), 0, t, 0) for t in load]
    heapq.heapify(heap)
    moves: list[PlannedMove] = []
    for collection, chunk_id, source, size, ops in order:
        skipped = []
        best = None
        while heap:
            entry = heapq.heappop(heap)
            t = entry[2]
            if entry[3] != stamp[t]:
                continue
            if room_b(t) >= size and room_o(t) >= ops:
                best = t
                break
            skipped.append(entry)
        for entry in skipped:
            heapq.heappush(heap, entry)
        if best is None:
            raise _no_room(collection, chunk_id, size, ops, names, room_b)
        load[best] += size
        ops_load[best] += ops
        placed[best] += 1
        stamp[best] += 1
        heapq.heappush(heap, (key(best), placed[best], best, stamp[best]))
        moves.append(PlannedMove(collection=collection, chunk_id=chunk_id, source=source,
                                 target=best, bytes=size, ops_per_s=ops))
    return moves


def _no_room(collection: str, chunk_id: int, size: int, ops: float, names: list[str],
             rb: Callable[[str], float]) -> ApplicationError:
    roomiest = sorted(names, key=lambda t: -rb(t))[:5]
    what = f"{size} bytes" + (f", {ops:g} ops/s" if ops else "")
    return non_retryable(ValueError(
        f"no target has room for chunk {collection}/{chunk_id} ({what}); room left "
        f"(bytes) on the roomiest {len(roomiest)} of {len(names)}: "
        f"{ {t: rb(t) for t in roomiest} }"), "drain")


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

    def attempt(k: int) -> list[PlannedMove] | None:
        kept, drained = order[:k], order[k:]
        entries: list[PackEntry] = [(c[0], c[1], s, c[2], c[3])
                                    for s in drained for c in chunks.get(s, ())]
        try:
            return bin_pack(entries, [info[s] for s in kept], {s: bytes_[s] for s in kept},
                            {s: ops[s] for s in kept})
        except ApplicationError:
            return None

    lo, hi = max(bound, 1) - 1, None  # lo: known (or assumed) infeasible
    best: tuple[int, list[PlannedMove]] = (len(order), [])
    step = 1
    while hi is None:
        k = min(lo + step, len(order))
        moves = attempt(k)
        if moves is not None:
            hi, best = k, (k, moves)
        elif k >= len(order):
            break
        else:
            lo, step = k, step * 2
    while hi is not None and hi - lo > 1:
        mid = (lo + hi) // 2
        moves = attempt(mid)
        if moves is None:
            lo = mid
        else:
            hi, best = mid, (mid, moves)
    k, moves = best
    return MergePlan(drained=sorted(order[k:]), kept=sorted(order[:k]), moves=moves,
                     lower_bound=bound)
