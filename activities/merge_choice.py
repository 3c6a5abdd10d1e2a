"""Which shards a merge drains: measure the chunks, then ``packing.plan_merge``.

``shardshift merge`` asks this before it starts a drain: among the active shards (or the
ones named), keep the most utilized, as few as can hold everything within their declared
capacities, and drain the others onto them. Every shard considered must declare a byte
capacity (without one "room" means nothing and a merge would pile everything onto one shard)
and run the same engine and major version (a merge never moves data to another version;
that is an upgrade). Sizes are measured on the shards now (not read from possibly stale
statistics) and nothing is recorded: the drain the merge starts measures and records again.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict

from activities.chunk_stats import measure
from activities.context import MoveContext
from activities.packing import plan_merge
from catalog.models import ShardState


class MergeRefused(ValueError):
    """The merge cannot be planned as asked (says why and what to do)."""


class MergeChoice(BaseModel):
    """What a merge would do: the shards it drains, the ones that receive, and its figures."""

    model_config = ConfigDict(frozen=True)

    considered: list[str]
    drained: list[str]
    kept: list[str]
    lower_bound: int
    """Fewest shards that can hold the considered shards' bytes (and ops/s, where declared)."""
    moves: int
    bytes_moved: int
    bytes_total: int
    bytes_by_shard: dict[str, int]
    capacity_by_shard: dict[str, int]


async def choose_merge(ctx: MoveContext, among: Sequence[str] | None = None, *,
                       traffic_span_s: float | None = None) -> MergeChoice:
    """Plan a merge among the active shards (``among``: only these, which must be active)."""
    everyone = {s.shard_id: s for s in await ctx.catalog.list_shards()}
    if among:
        unknown = sorted(set(among) - set(everyone))
        if unknown:
            raise MergeRefused(f"unknown shard(s): {', '.join(unknown)}")
        infos = [everyone[s] for s in dict.fromkeys(among)]
        inactive = [s.shard_id for s in infos if s.state != ShardState.ACTIVE]
        if inactive:
            raise MergeRefused(f"only active shards are merged; not active: "
                               f"{', '.join(inactive)}")
    else:
        infos = [s for s in everyone.values() if s.state == ShardState.ACTIVE]
    if len(infos) < 2:
        raise MergeRefused("a merge needs at least two active shards")
    versions = sorted({f"{s.engine} {s.major_version}" for s in infos})
    if len(versions) > 1:
        raise MergeRefused(f"the shards run {' and '.join(versions)}: a merge stays within one "
                           "version (name the shards with --among; moving to a newer version "
                           "is `shardshift drain --upgrade`)")
    undeclared = sorted(s.shard_id for s in infos if not s.capacity_bytes)
    if undeclared:
        raise MergeRefused(f"shard(s) without a declared capacity: {', '.join(undeclared)} "
                           "(declare one: shardshift shard add NAME --dsn DSN --capacity SIZE)")
    ids = {s.shard_id for s in infos}
    loads = await measure(ctx, await ctx.catalog.chunk_loads(traffic_span_s=traffic_span_s),
                          ids, record=False)
    by_shard: dict[str, list[tuple[str, int, int, float]]] = {s: [] for s in ids}
    for c in loads:
        if c.shard_id in by_shard:
            by_shard[c.shard_id].append((c.collection, c.chunk_id, c.size_bytes, c.ops_per_s))
    plan = plan_merge(by_shard, infos)
    bytes_by_shard = {s: sum(c[2] for c in by_shard[s]) for s in sorted(ids)}
    return MergeChoice(
        considered=sorted(ids), drained=plan.drained, kept=plan.kept,
        lower_bound=plan.lower_bound, moves=len(plan.moves),
        bytes_moved=sum(m.bytes for m in plan.moves),
        bytes_total=sum(bytes_by_shard.values()), bytes_by_shard=bytes_by_shard,
        capacity_by_shard={s.shard_id: int(s.capacity_bytes or 0) for s in infos})
