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

from activities.context import MoveContext, non_retryable, raise_catalog_failure
from activities.models import (
    AllocateIdsInput,
    DrainFinishInput,
    DrainFinishResult,
    DrainPlan,
    DrainPlanInput,
    DrainRestoreInput,
    PlannedMove,
    PlannedSplit,
    RebalancePlan,
    RebalancePlanInput,
    SplitInput,
)
from activities.timeline import first_run_id, record_loads
from catalog import CatalogError, ShardState
from catalog.admin import split_chunk
from catalog.models import ChunkMap, MigrationKind, ShardInfo
from catalog.timeline import LoadStage


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
        try:
            maps = await cat.chunk_maps()
        except CatalogError as exc:
            raise_catalog_failure(exc, "drain")
        names = set(inp.shards)
        load: dict[str, int] = {t.shard_id: 0 for t in targets}
        chunks: list[tuple[str, int, str, int]] = []  # (collection, chunk, source, bytes)
        for collection, cmap in sorted(maps.items()):
            for chunk in cmap.chunks:
                if chunk.shard_id not in names and chunk.shard_id not in load:
                    continue
                engine = await self.ctx.engine(chunk.shard_id)
                size = await engine.chunk_bytes(collection, chunk.range)
                if chunk.shard_id in load:
                    load[chunk.shard_id] += size
                else:
                    chunks.append((collection, chunk.chunk_id, chunk.shard_id, size))
        before = dict(load)
        for _, _, source, size in chunks:
            before[source] = before.get(source, 0) + size
        for info in drained:
            before.setdefault(info.shard_id, 0)
        # The first plan of the drain is its "before" (later rounds change nothing).
        await record_loads(cat, inp.kind.value, LoadStage.BEFORE, before)
        moves = _bin_pack(chunks, targets, load)
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
        await self._record_after(maps)
        return DrainFinishResult(retired=retired, chunks_left=left)

    async def _record_after(self, maps: dict[str, ChunkMap]) -> None:
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
            for collection, cmap in sorted(maps.items()):
                for chunk in cmap.chunks:
                    if chunk.shard_id in after:
                        engine = await self.ctx.engine(chunk.shard_id)
                        after[chunk.shard_id] += await engine.chunk_bytes(collection,
                                                                          chunk.range)
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
            maps = await cat.chunk_maps()
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
        size = 0
        for collection, cmap in sorted(maps.items()):
            for ch in cmap.chunks:
                mine = collection == inp.collection and ch.chunk_id == inp.chunk_id
                if ch.shard_id not in load and not mine:
                    continue
                activity.heartbeat(f"measuring {collection}/{ch.chunk_id}")
                engine = await self.ctx.engine(ch.shard_id)
                n = await engine.chunk_bytes(collection, ch.range)
                if mine:
                    size = n
                else:
                    load[ch.shard_id] += n
        try:
            [move] = _bin_pack([(inp.collection, inp.chunk_id, inp.source, size)],
                               sorted(eligible, key=lambda s: s.shard_id), load)
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
            active = {s.shard_id for s in await cat.list_shards(ShardState.ACTIVE)}
            if inp.shards is not None:
                unknown = sorted(set(inp.shards) - active)
                if unknown:
                    raise non_retryable(ValueError(f"shard(s) {unknown} are not active shards"),
                                        "rebalance")
                active = set(inp.shards)
            active -= set(inp.exclude)
            maps = await cat.chunk_maps()
            if inp.collections is not None:
                unknown = sorted(set(inp.collections) - set(maps))
                if unknown:
                    raise non_retryable(ValueError(f"unknown collection(s) {unknown}"),
                                        "rebalance")
                maps = {c: m for c, m in maps.items() if c in inp.collections}
            moving = {(m.collection, m.chunk_id)
                      for m in await cat.migrations(active_only=True)}
        except CatalogError as exc:
            raise_catalog_failure(exc, "rebalance")
        chunks: dict[str, list[tuple[str, int, int]]] = {s: [] for s in active}
        busy = 0
        for collection, cmap in sorted(maps.items()):
            for chunk in cmap.chunks:
                if chunk.shard_id not in active:
                    continue
                activity.heartbeat(f"measuring {collection}/{chunk.chunk_id}")
                engine = await self.ctx.engine(chunk.shard_id)
                size = await engine.chunk_bytes(collection, chunk.range)
                if (collection, chunk.chunk_id) in moving:
                    busy += 1
                    chunks[chunk.shard_id].append((collection, chunk.chunk_id, -size))
                else:
                    chunks[chunk.shard_id].append((collection, chunk.chunk_id, size))
        plan = plan_rebalance(chunks, tolerance=inp.tolerance, max_moves=inp.max_moves,
                              max_moves_per_shard=inp.max_moves_per_shard, split=inp.split)
        # The first measurement of the operation is its "before", the latest its "after".
        # (a shard split is recorded as a rebalance too: the plan does not carry the kind)
        await record_loads(cat, "rebalance", LoadStage.BEFORE, plan.loads)
        await record_loads(cat, "rebalance", LoadStage.AFTER, plan.loads)
        return plan.model_copy(update={"busy_chunks": busy})

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


def plan_rebalance(chunks: dict[str, list[tuple[str, int, int]]], *, tolerance: float,
                   max_moves: int, max_moves_per_shard: int, split: bool) -> RebalancePlan:
    """Moves from the most to the least loaded shard until the spread is within tolerance.

    ``chunks`` maps each active shard to (collection, chunk id, estimated bytes); a negative
    size marks a chunk that is being moved (it counts in its shard's load but is not planned).
    Each step takes the most and the least loaded shards still under their per-shard limit and
    moves the chunk of the first whose size is closest to half the gap (moving ``x`` out of a
    gap ``g`` leaves ``|g - 2x|``, so only ``x < g`` helps). When no chunk helps and ``split``
    is on, the largest chunk of that shard is split instead, if moving a half would help, and
    planning stops there (the next round plans with the halves).
    """
    load = {s: sum(abs(c[2]) for c in cs) for s, cs in chunks.items()}
    before = dict(load)
    moves: list[PlannedMove] = []
    splits: list[PlannedSplit] = []
    per_shard = dict.fromkeys(load, 0)
    movable = {s: [c for c in cs if c[2] >= 0] for s, cs in chunks.items()}
    while len(load) >= 2 and len(moves) < max_moves:
        mean = sum(load.values()) / len(load)
        if mean <= 0 or max(load.values()) - min(load.values()) <= tolerance * mean:
            break
        # The most and the least loaded shards still under their per-shard move limit.
        free = [s for s in load if per_shard[s] < max_moves_per_shard]
        givers = [s for s in free if movable[s]]
        if not givers or len(free) < 2:
            break
        hi = max(givers, key=lambda s: (load[s], s))
        lo = min((s for s in free if s != hi), key=lambda s: (load[s], s))
        gap = load[hi] - load[lo]
        if gap <= tolerance * mean:
            break
        helpful = [c for c in movable[hi] if 0 < c[2] < gap]
        if not helpful:
            if split:
                collection, chunk_id, size = max(movable[hi], key=lambda c: (c[2], c[1]))
                if 0 < size / 2 < gap:  # moving a half would close part of the gap
                    splits.append(PlannedSplit(collection=collection, chunk_id=chunk_id,
                                               shard=hi, bytes=size))
            break
        pick = min(helpful, key=lambda c: (abs(gap / 2 - c[2]), c[0], c[1]))
        movable[hi].remove(pick)
        load[hi] -= pick[2]
        load[lo] += pick[2]
        per_shard[hi] += 1
        per_shard[lo] += 1
        moves.append(PlannedMove(collection=pick[0], chunk_id=pick[1], source=hi, target=lo,
                                 bytes=pick[2]))
    return RebalancePlan(loads=before, loads_after=load, moves=moves, splits=splits)


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


def _bin_pack(chunks: list[tuple[str, int, str, int]], targets: list[ShardInfo],
              load: dict[str, int]) -> list[PlannedMove]:
    """Largest chunk first, each onto the target with the most room left.

    Room is ``capacity_bytes - load``; when every target declares a capacity the one with the
    most room wins, otherwise the least loaded one (a declared capacity is still never
    exceeded). A chunk no target has room for fails the plan: a drain must not overfill a
    shard.
    Updates ``load`` with the placements.
    """
    cap = {t.shard_id: t.capacity_bytes for t in targets}
    placed = dict.fromkeys(load, 0)  # ties (empty chunks) spread by count
    moves: list[PlannedMove] = []
    for collection, chunk_id, source, size in sorted(chunks, key=lambda c: (-c[3], c[0], c[1])):
        def room(shard_id: str) -> float:
            capacity = cap[shard_id]
            return float("inf") if capacity is None else capacity - load[shard_id]

        fitting = [t for t in load if room(t) >= size]
        if not fitting:
            raise non_retryable(ValueError(
                f"no target has room for chunk {collection}/{chunk_id} ({size} bytes); "
                f"room left: { {t: room(t) for t in sorted(load)} }"), "drain")
        if all(c is not None for c in cap.values()):
            best = min(fitting, key=lambda t: (-room(t), placed[t], t))
        else:
            best = min(fitting, key=lambda t: (load[t], placed[t], t))
        load[best] += size
        placed[best] += 1
        moves.append(PlannedMove(collection=collection, chunk_id=chunk_id, source=source,
                                 target=best, bytes=size))
    return moves
