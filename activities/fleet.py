"""Fleet activities: plan and finish the draining of shards (merges and upgrades), and plan
the rebalancing of active shards (moves, and splits of chunks too large to move usefully).

A drain empties one or more shards by moving each of their chunks, as a child
``MigrateChunkWorkflow``, to the remaining shards, then retires them. ``plan`` is where every
decision with I/O is made: it validates the request, measures the chunks and the targets'
load, bin-packs the chunks onto the targets (largest first, onto the target with the most
headroom) and marks the drained shards ``draining`` so nothing new lands on them. It is
idempotent: a retry, or a later round of the same drain, plans whatever is still left.

``replan`` places one chunk again when the shard it was moving to was lost (the move gave up on
it); ``await_move`` waits for the outcome of a move that a fleet workflow found already running
under the id it was about to start.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection

from pydantic import BaseModel, ConfigDict
from temporalio import activity
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ApplicationError, FailureError

from activities.chunk_stats import measure, record_sizes
from activities.context import MoveContext, non_retryable, raise_catalog_failure
from activities.models import (
    AllocateIdsInput,
    DrainFinishInput,
    DrainFinishResult,
    DrainPlan,
    DrainPlanInput,
    DrainRestoreInput,
    PlannedMove,
    RebalancePlan,
    RebalancePlanInput,
    SplitInput,
)
from activities.packing import PackEntry
from activities.packing import bin_pack as _bin_pack
from activities.planners import ChunkEntry, ShardCapacity, plan_rebalance
from activities.timeline import first_run_id, record_loads
from catalog import CatalogError, ShardState
from catalog.admin import split_chunk
from catalog.models import MigrationKind, ShardInfo
from catalog.timeline import LoadStage
from settings import get_settings


class DrainPlanRequest(DrainPlanInput):
    """``drain.plan``'s input, with the shards it must not plan onto."""

    exclude: list[str] = []
    """Targets a move gave up on (lost): not planned onto, not measured."""
    dry_run: bool = False
    """Plan only: the drained shards are not marked ``draining``."""


class RebalancePlanRequest(RebalancePlanInput):
    """``rebalance.plan``'s input, with the shards it must leave out."""

    exclude: list[str] = []
    """Shards a move gave up on (lost): neither measured nor planned to or from."""
    dry_run: bool = False
    """Plan only: the measured chunk sizes are not recorded."""


class ReplanInput(BaseModel):
    """A chunk whose move lost its target, to be placed on another shard."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    collection: str
    chunk_id: int
    source: str
    kind: MigrationKind
    candidates: list[str] | None = None
    """Shards the operation may move chunks to (default: every active shard)."""
    exclude: list[str] = []
    """Shards not to use: lost ones, and those at the operation's per-shard limit."""


class ReplanResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    move: PlannedMove | None = None
    reason: str = ""
    """Why no shard was chosen."""


class AwaitMoveInput(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    workflow_id: str


class AwaitedMove(BaseModel):
    """How a move that was already running ended."""

    model_config = ConfigDict(frozen=True)

    outcome: str
    """The move's outcome (``completed``, ``rolled_back``) or ``failed``."""
    failure_type: str | None = None
    target: str | None = None
    """Where the move took the chunk (it may differ from the plan's choice)."""
    pause_ms: float | None = None
    documents: int = 0
    detail: str | None = None


class FleetActivities:
    def __init__(self, ctx: MoveContext) -> None:
        self.ctx = ctx
        self._traffic_span_s = get_settings().fleet.traffic_span_s
        """Chunks are weighed by the operations routers reported over this span."""

    @activity.defn(name="drain.plan")
    async def plan(self, inp: DrainPlanRequest) -> DrainPlan:
        """Validate a drain, mark its shards ``draining`` and place every chunk they hold.

        Bad input (an unknown or retired shard, no eligible target, targets without room)
        fails at once, before any shard changes state.
        """
        cat = self.ctx.catalog
        try:
            drained = [await cat.shard(s) for s in inp.shards]
            everyone = await cat.list_shards()
        except CatalogError as exc:
            raise_catalog_failure(exc, "drain")
        for info in drained:
            if info.state == ShardState.RETIRED:
                raise non_retryable(ValueError(f"shard {info.shard_id} is already retired"),
                                    "nothing to drain")
        targets = _targets(inp, drained, everyone, inp.exclude)
        activity.heartbeat("measuring chunks")
        names = set(inp.shards)
        load: dict[str, int] = {t.shard_id: 0 for t in targets}
        ops_load: dict[str, float] = {t.shard_id: 0.0 for t in targets}
        try:
            # Recorded only once the plan stands: a refused drain changes nothing.
            loads = await measure(self.ctx,
                                  await cat.chunk_loads(traffic_span_s=self._traffic_span_s),
                                  names | set(load),
                                  record=False)
        except CatalogError as exc:
            raise_catalog_failure(exc, "drain")
        chunks: list[PackEntry] = []  # (collection, chunk, source, bytes, ops/s)
        for c in loads:
            if c.shard_id in load:
                load[c.shard_id] += c.size_bytes
                ops_load[c.shard_id] += c.ops_per_s
            elif c.shard_id in names:
                chunks.append((c.collection, c.chunk_id, c.shard_id, c.size_bytes, c.ops_per_s))
        before = dict(load)
        for chunk in chunks:
            before[chunk[2]] = before.get(chunk[2], 0) + chunk[3]
        for info in drained:
            before.setdefault(info.shard_id, 0)
        # The first plan of the drain is its "before" (later rounds change nothing).
        await record_loads(cat, inp.kind.value, LoadStage.BEFORE, before)
        moves = _bin_pack(chunks, targets, load, ops_load)
        if not inp.dry_run:
            try:
                await record_sizes(self.ctx, loads, names | set(load))
            except CatalogError as exc:
                raise_catalog_failure(exc, "drain")
        for info in [] if inp.dry_run else drained:
            if info.state != ShardState.DRAINING:
                try:
                    await cat.set_shard_state(info.shard_id, ShardState.DRAINING)
                except CatalogError as exc:
                    raise_catalog_failure(exc, "drain")
        return DrainPlan(moves=moves, targets=[t.shard_id for t in targets],
                         bytes_total=sum(m.bytes for m in moves),
                         target_bytes_after={t: load[t] for t in sorted(load)})

    @activity.defn(name="drain.finish")
    async def finish(self, inp: DrainFinishInput) -> DrainFinishResult:
        """Retire every drained shard that holds nothing now; report the others."""
        cat = self.ctx.catalog
        retired: list[str] = []
        left: dict[str, int] = {}
        try:
            maps = await cat.chunk_maps()
            for shard in inp.shards:
                held = sum(len(m.on_shard(shard)) for m in maps.values())
                if held:
                    left[shard] = held
                    continue
                await cat.set_shard_state(shard, ShardState.RETIRED)
                retired.append(shard)
        except CatalogError as exc:
            raise_catalog_failure(exc, "retire")
        await self._record_after()
        return DrainFinishResult(retired=retired, chunks_left=left)

    async def _record_after(self) -> None:
        """The drain's "after": bytes now on every shard its "before" measured (best effort:
        a shard that cannot be measured leaves the record as it was)."""
        if not activity.in_activity():
            return
        info = activity.info()
        try:
            before = await self.ctx.catalog.shard_loads(info.workflow_id or "",
                                                        await first_run_id())
            rows = [row for row in before if row.stage == LoadStage.BEFORE]
            if not rows:
                return
            after = dict.fromkeys(sorted({row.shard_id for row in rows}), 0)
            for c in await measure(self.ctx, await self.ctx.catalog.chunk_loads(), set(after)):
                if c.shard_id in after:
                    after[c.shard_id] += c.size_bytes
        except Exception as exc:  # noqa: BLE001 - a measurement never fails the drain
            activity.logger.warning("the drain's loads after were not measured: %s", exc)
            return
        await record_loads(self.ctx.catalog, rows[0].kind, LoadStage.AFTER, after)

    @activity.defn(name="drain.restore")
    async def restore(self, inp: DrainRestoreInput) -> None:
        """A stopped drain: its shards take chunks again (those already moved stay moved)."""
        cat = self.ctx.catalog
        try:
            for shard in inp.shards:
                info = await cat.shard(shard)
                if info.state == ShardState.DRAINING:
                    await cat.set_shard_state(shard, ShardState.ACTIVE)
        except CatalogError as exc:
            raise_catalog_failure(exc, "restore")


    # -- a lost target: place the chunk elsewhere ----------------------------------------------

    @activity.defn(name="fleet.replan")
    async def replan(self, inp: ReplanInput) -> ReplanResult:
        """Choose another shard for a chunk whose move gave up on its target.

        Eligible: ``active`` (so never a lost, draining or retired shard), not excluded, one of
        the operation's candidates, the source's engine and, for an upgrade, a newer major
        version than the source. Among them the chunk goes where ``drain.plan`` would put it
        (most room left, else least loaded; a declared capacity is never exceeded). ``None``
        with a reason when the chunk is no longer on its source or no shard qualifies.
        """
        cat = self.ctx.catalog
        try:
            chunk = await cat.chunk(inp.collection, inp.chunk_id)
            source = await cat.shard(inp.source)
            everyone = await cat.list_shards()
        except CatalogError as exc:
            raise_catalog_failure(exc, "re-plan")
        if chunk.shard_id != inp.source:
            return ReplanResult(reason=f"the chunk is on {chunk.shard_id} now, not {inp.source}")
        excluded = set(inp.exclude) | {inp.source}
        eligible = [s for s in everyone
                    if s.state == ShardState.ACTIVE and s.shard_id not in excluded
                    and (inp.candidates is None or s.shard_id in inp.candidates)
                    and s.engine == source.engine
                    and (inp.kind != MigrationKind.UPGRADE
                         or s.major_version > source.major_version)]
        if not eligible:
            return ReplanResult(reason=f"no other eligible shard (excluded: {sorted(excluded)})")
        load = {s.shard_id: 0 for s in eligible}
        ops_load = {s.shard_id: 0.0 for s in eligible}
        size, ops = 0, 0.0
        activity.heartbeat("measuring chunks")
        try:
            loads = await measure(self.ctx,
                                  await cat.chunk_loads(traffic_span_s=self._traffic_span_s),
                                  {inp.source, *load})
        except CatalogError as exc:
            raise_catalog_failure(exc, "re-plan")
        for c in loads:
            if c.collection == inp.collection and c.chunk_id == inp.chunk_id:
                size, ops = c.size_bytes, c.ops_per_s
            elif c.shard_id in load:
                load[c.shard_id] += c.size_bytes
                ops_load[c.shard_id] += c.ops_per_s
        try:
            [move] = _bin_pack([(inp.collection, inp.chunk_id, inp.source, size, ops)],
                               sorted(eligible, key=lambda s: s.shard_id), load, ops_load)
        except ApplicationError as exc:
            return ReplanResult(reason=exc.message)
        return ReplanResult(move=move)

    @activity.defn(name="fleet.await_move")
    async def await_move(self, inp: AwaitMoveInput) -> AwaitedMove:
        """Wait for a move already running under ``workflow_id`` to end; heartbeats meanwhile."""
        handle = activity.client().get_workflow_handle(inp.workflow_id)
        waiting = asyncio.ensure_future(handle.result())
        try:
            while True:
                activity.heartbeat(f"waiting for {inp.workflow_id}")
                done, _ = await asyncio.wait({waiting}, timeout=10)
                if done:
                    break
            result = waiting.result()
        except WorkflowFailureError as exc:
            cur: BaseException = exc
            while isinstance(cur, FailureError) and cur.cause is not None:
                cur = cur.cause
            kind = cur.type if isinstance(cur, ApplicationError) else type(cur).__name__
            message = cur.message if isinstance(cur, FailureError) else str(cur)
            return AwaitedMove(outcome="failed", failure_type=kind,
                               detail=f"{kind}: {message}"[:500])
        finally:
            waiting.cancel()
        fields = result if isinstance(result, dict) else {}
        return AwaitedMove(outcome=str(fields.get("outcome", "completed")),
                           target=fields.get("target"),
                           pause_ms=fields.get("pause_ms"),
                           documents=int(fields.get("documents") or 0),
                           detail=fields.get("detail"))

    # -- rebalancing -----------------------------------------------------------------------

    @activity.defn(name="rebalance.plan")
    async def rebalance_plan(self, inp: RebalancePlanRequest) -> RebalancePlan:
        """Measure every active shard and plan moves from the most to the least loaded."""
        cat = self.ctx.catalog
        try:
            infos = {s.shard_id: s for s in await cat.list_shards(ShardState.ACTIVE)}
            active = set(infos)
            if inp.shards is not None:
                unknown = sorted(set(inp.shards) - active)
                if unknown:
                    raise non_retryable(ValueError(f"shard(s) {unknown} are not active shards"),
                                        "rebalance")
                active = set(inp.shards)
            active -= set(inp.exclude)
            loads = await cat.chunk_loads(inp.collections, traffic_span_s=self._traffic_span_s)
            if inp.collections is not None:
                unknown = sorted(set(inp.collections) - {c.collection for c in loads})
                if unknown:
                    raise non_retryable(ValueError(f"unknown collection(s) {unknown}"),
                                        "rebalance")
            moving = {(m.collection, m.chunk_id)
                      for m in await cat.migrations(active_only=True)}
            activity.heartbeat("measuring chunks")
            loads = await measure(self.ctx, loads, active, record=not inp.dry_run)
        except CatalogError as exc:
            raise_catalog_failure(exc, "rebalance")
        chunks: dict[str, list[ChunkEntry]] = {s: [] for s in active}
        busy: set[tuple[str, int]] = set()
        for c in loads:
            if c.shard_id not in active:
                continue
            chunks[c.shard_id].append((c.collection, c.chunk_id, c.size_bytes, c.ops_per_s))
            if (c.collection, c.chunk_id) in moving:
                busy.add((c.collection, c.chunk_id))
        capacities = {s: ShardCapacity(bytes=infos[s].capacity_bytes,
                                       ops_per_s=infos[s].capacity_ops_per_s) for s in active}
        activity.heartbeat(f"planning {len(loads)} chunks on {len(active)} shards")
        plan = plan_rebalance(chunks, tolerance=inp.tolerance, max_moves=inp.max_moves,
                              max_moves_per_shard=inp.max_moves_per_shard, split=inp.split,
                              capacities=capacities, busy=busy)
        # The first measurement of the operation is its "before", the latest its "after".
        # (a shard split is recorded as a rebalance too: the plan does not carry the kind)
        await record_loads(cat, "rebalance", LoadStage.BEFORE, plan.loads)
        await record_loads(cat, "rebalance", LoadStage.AFTER, plan.loads)
        return plan.model_copy(update={"busy_chunks": len(busy)})

    @activity.defn(name="rebalance.allocate_ids")
    async def allocate_ids(self, inp: AllocateIdsInput) -> list[int]:
        try:
            return await self.ctx.catalog.allocate_chunk_ids(inp.n)
        except CatalogError as exc:
            raise_catalog_failure(exc, "allocate chunk ids")

    @activity.defn(name="rebalance.split")
    async def split(self, inp: SplitInput) -> list[int]:
        """Split a chunk at the middle of its khash range (a metadata change with a token bump;
        no data moves). Resumable: the same child ids finish an interrupted split."""
        cat = self.ctx.catalog
        try:
            owner = None
            try:
                owner = (await cat.chunk(inp.collection, inp.chunk_id)).shard_id
            except CatalogError:
                # Already split by an earlier attempt: the children hold the shard.
                cmap = await cat.chunk_map(inp.collection)
                child = cmap.chunk(inp.child_ids[0])
                if child is None:
                    raise
                owner = child.shard_id
            engines = {owner: await self.ctx.engine(owner)}
            left, right = await split_chunk(cat, engines, inp.collection, inp.chunk_id,
                                            child_ids=inp.child_ids)
        except CatalogError as exc:
            raise_catalog_failure(exc, "split")
        return [left.chunk_id, right.chunk_id]


def _targets(inp: DrainPlanInput, drained: list[ShardInfo], everyone: list[ShardInfo],
             exclude: Collection[str] = ()) -> list[ShardInfo]:
    """The shards that may receive the drained chunks (never an ``exclude`` d one)."""
    names = {d.shard_id for d in drained}
    by_id = {s.shard_id: s for s in everyone}
    if inp.targets:
        unknown = [t for t in inp.targets if t not in by_id]
        if unknown:
            raise non_retryable(ValueError(f"unknown target shard(s) {unknown}"), "drain")
        overlap = sorted(names & set(inp.targets))
        if overlap:
            raise non_retryable(ValueError(f"shard(s) {overlap} cannot be drained into "
                                           "themselves"), "drain")
        candidates = [by_id[t] for t in inp.targets]
        inactive = [s.shard_id for s in candidates if s.state != ShardState.ACTIVE]
        if inactive:
            raise non_retryable(ValueError(f"target shard(s) {inactive} are not active"),
                                "drain")
    else:
        candidates = [s for s in everyone
                      if s.shard_id not in names and s.state == ShardState.ACTIVE]
    engines = {d.engine for d in drained}
    candidates = [s for s in candidates if s.engine in engines and s.shard_id not in exclude]
    if inp.kind == MigrationKind.UPGRADE:
        newest_old = max(d.major_version for d in drained)
        older = [s.shard_id for s in candidates if s.major_version <= newest_old]
        if inp.targets and older:
            raise non_retryable(ValueError(
                f"target shard(s) {older} do not run a newer major version than "
                f"{newest_old}"), "upgrade")
        candidates = [s for s in candidates if s.major_version > newest_old]
    if not candidates:
        what = "an active shard of a newer major version" if inp.kind == MigrationKind.UPGRADE \
            else "another active shard"
        raise non_retryable(ValueError(f"no shard can take the chunks of {sorted(names)}: "
                                       f"register {what} first"), "drain")
    return sorted(candidates, key=lambda s: s.shard_id)
