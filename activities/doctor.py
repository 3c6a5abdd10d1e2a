"""``shardshift doctor``: find what failed moves left behind, and repair what is safe to repair.

What a move leaves while it runs, and what its end removes: a slot and a publication on the
source and an origin with its ``stream_state`` row on the target (named from the migration
id), a ``receiving`` fence and a partial copy on the target, a frozen fence on the source
during a cutover, ``import_parts`` rows, a staging directory, two leases and an active
migration record. A workflow that died, an activity that failed for good, or a shard that
was down while a move was undone can leave any of them behind. The doctor lists them all
(one *finding* each), says what it would do, and with ``repair`` does it.

Invariants
----------
1. **A running move is never touched.** A migration is *live* when its record is active and
   Temporal says a workflow runs it (``MoveProbe``; the record's lease holder is the workflow
   id). When Temporal cannot answer, the migration counts as live. Every object attributed
   to a live migration (by the name prefix its stream objects share, by the migration id of
   staging directories, import rows and leases, by its chunk for fences and rows) is skipped.
2. **The catalog is the truth about ownership.** Fences and rows are judged against the
   catalog's placement and token: a frozen fence on the owner at ``token + 1`` is a cutover
   that never committed (repair: unfreeze to the catalog's token, only while the catalog
   still names that shard at that token); a receiving fence, or a fence activated at a token
   the catalog never reached, on a shard that does not own the chunk is the partial copy of
   an aborted move (repair: retire it, delete its rows with the throttled range delete, drop
   it); a frozen fence on a non-owner at or below the catalog's token is the old owner of a
   committed move whose cleanup never ran (repair: retire it and delete its rows, only when
   the owner's fence is active at the catalog's token); rows of a chunk on a shard that
   neither owns nor receives it are deleted. Anything else about a fence is reported with
   what to check, never changed: its outcome is not a fact the doctor can read.
3. **Read order makes races harmless.** Shards are inspected first, then migration records
   and Temporal: an object seen on a shard belongs to a migration registered before it was
   seen, so that migration's record is in the later read. Every fence or rows repair
   re-reads the chunk and its active migrations just before acting and skips on any change.
4. **A dead migration's cutover cannot run behind the doctor.** Before repairing anything of
   a migration without a workflow, the doctor takes that migration's cutover lock (the
   session advisory lock a cutover attempt holds on its old owner) on its source and target
   and keeps it until the record is closed; if a zombie attempt holds it, nothing of that
   migration is touched. ``move_chunk`` needs an active record, so once closed no cutover
   can commit.
5. **A record is closed last**, with the outcome the catalog's placement dictates (aborted,
   rolled back, or completed when the switch had committed), and only after every leftover
   of it was repaired; otherwise it stays active and the finding says why.

The module decides; ``shards/postgres/inventory.py`` lists and drops server objects, and the
Temporal check is injected (``MoveProbe``) so nothing here imports the Temporal client. This
module examines and judges; the report and the examination's bookkeeping are in
``activities/doctor_findings.py``, the repairs in ``activities/doctor_repair.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime

import pyarrow.fs as pafs

from activities.doctor_findings import (
    Context,
    DoctorReport,
    Finding,
    FindingKind,
    Item,
    Server,
    rows_phrase,
    shards_of,
)
from activities.doctor_repair import DoctorRepairs, drop_stream_fix
from catalog import Catalog
from catalog.models import (
    ChunkMap,
    Lease,
    MigrationOutcome,
    MigrationRecord,
    ShardState,
)
from settings import DatabaseSettings, get_settings
from shards.models import FenceState
from shards.postgres import PostgresShard
from shards.postgres.bulk_import import forget_parts
from shards.postgres.inventory import (
    FenceRow,
    StreamObjectKind,
    chunks_with_rows,
    inspect_shard,
)
from shards.postgres.replication import migration_prefix
from shards.postgres.server import server_key
from shards.staging import Staging, StagingError, check_migration_id, migration_of

MoveProbe = Callable[[MigrationRecord, Sequence[str]], Awaitable[bool]]
"""Whether a workflow runs this active migration, given the workflow ids that held its
leases. Raising means "cannot tell": the migration is then treated as running."""

PlanProbe = Callable[[str], Awaitable[bool]]
"""Whether the fleet operation that stored a plan (plan id ``{workflow id}@{first run id}``)
still runs. Raising means "cannot tell": the plan is then left alone."""

DrainProbe = Callable[[], Awaitable[set[str]]]
"""The shards that running drain operations are emptying (a shard in state ``draining``
that none of them names was left so by a drain that no longer runs). Raising means "cannot
tell": every draining shard is then left alone."""


_STREAM_KINDS = {
    StreamObjectKind.SLOT: FindingKind.SLOT,
    StreamObjectKind.PUBLICATION: FindingKind.PUBLICATION,
    StreamObjectKind.ORIGIN: FindingKind.ORIGIN,
    StreamObjectKind.STREAM_STATE: FindingKind.STREAM_STATE,
}
# Repair order: stop streams first (a zombie applier could still write), then data and
# fences, then bookkeeping, and the migration records last (they wait for the rest).
_ORDER = [FindingKind.SHARD, FindingKind.SLOT, FindingKind.PUBLICATION, FindingKind.ORIGIN,
          FindingKind.STREAM_STATE, FindingKind.FENCE, FindingKind.ROWS,
          FindingKind.IMPORT_PARTS, FindingKind.STAGING, FindingKind.LEASE,
          FindingKind.MIGRATION, FindingKind.FLEET_PLAN, FindingKind.DRAINING_SHARD]


class Doctor(DoctorRepairs):
    """Examine the catalog, every shard, the staging area and Temporal; optionally repair.

    Args:
        catalog: An open catalog.
        staging: The staging area (None: not examined).
        is_running: The Temporal check (see ``MoveProbe``).
        collections: Only these collections' fences, rows, migrations and the objects
            attributed to them (None: everything). Objects that no migration record or
            publication ties to a collection are examined only without this filter.
        delete_batch, delete_pause_s: The range delete's batch size and throttle.
        db: whom it connects to shards as (the mover, like a worker; default: the process
            settings).
        plan_running: The Temporal check for stored fleet plans (see ``PlanProbe``; None:
            plans are not examined). A drain stores its plan in the catalog and drops it when
            it ends, cancelled or not; a terminated drain (or one whose drop failed) leaves
            it. Plans are examined only without a collection filter.
        drains_running: The Temporal check for draining shards (see ``DrainProbe``; None:
            not examined). A drain that is cancelled or fails sets its shards active again;
            a terminated one leaves them ``draining``, and a draining shard never receives a
            chunk. Examined only without a collection filter.
    """

    def __init__(self, catalog: Catalog, staging: Staging | None, is_running: MoveProbe, *,
                 collections: Iterable[str] | None = None, delete_batch: int = 5_000,
                 delete_pause_s: float = 0.0, db: DatabaseSettings | None = None,
                 plan_running: PlanProbe | None = None,
                 drains_running: DrainProbe | None = None) -> None:
        self.catalog = catalog
        self.plan_running = plan_running
        self.drains_running = drains_running
        self.db = db or get_settings().db
        self.staging = staging
        self.is_running = is_running
        self.scope = set(collections) if collections is not None else None
        self.delete_batch = delete_batch
        self.delete_pause_s = delete_pause_s
        self._engines: dict[str, PostgresShard] = {}

    def _in_scope(self, collection: str | None) -> bool:
        return self.scope is None or (collection is not None and collection in self.scope)

    # -- the run ---------------------------------------------------------------------------

    async def run(self, *, repair: bool = False) -> DoctorReport:
        try:
            items = await self._examine()
            items.sort(key=lambda i: _ORDER.index(i.finding.kind))
            if repair:
                await self._repair(items)
            return DoctorReport(findings=[i.finding for i in items])
        finally:
            engines, self._engines = list(self._engines.values()), {}
            await asyncio.gather(*(e.close() for e in engines), return_exceptions=True)

    async def _examine(self) -> list[Item]:
        cat = self.catalog
        # 1. Shards first (see invariant 3), with the layout they are judged against.
        servers: dict[str, Server] = {}
        for info in await cat.list_shards():
            key = server_key(info.address)
            servers.setdefault(key, Server(key, self.db.mover(info.address), [])
                               ).shards.append(info)
        maps = {n: m for n, m in (await cat.chunk_maps()).items() if self._in_scope(n)}
        if self.scope is not None:
            # Scoped to collections: only the servers that hold their chunks or took part
            # in their moves are inspected (an unrelated unreachable shard is not theirs).
            relevant = {c.shard_id for m in maps.values() for c in m.chunks}
            relevant |= {sid for r in await cat.migrations(limit=1_000_000)
                         if r.collection in self.scope for sid in (r.source, r.target)}
            servers = {k: s for k, s in servers.items() if s.ids & relevant}
        await asyncio.gather(*(self._inspect(s, maps) for s in servers.values()))
        # 2. Then what the catalog and Temporal say runs.
        records = await cat.migrations(limit=1_000_000)
        by_id = {r.migration_id: r for r in records}
        by_prefix = {migration_prefix(r.migration_id): r for r in records}
        leases = await cat.leases(live_only=False)
        holders: dict[str, list[str]] = {}
        for lease in leases:
            holders.setdefault(lease.migration_id, []).append(lease.holder)
        live: set[str] = set()
        dead: dict[str, MigrationRecord] = {}
        unknown: dict[str, str] = {}
        for r in records:
            if not r.active:
                continue
            try:
                running = await self.is_running(r, sorted(set(holders.get(r.migration_id, []))))
            except Exception as exc:  # noqa: BLE001 - cannot tell: treat as running
                unknown[r.migration_id] = f"{type(exc).__name__}: {exc}"
                running = True
            if running:
                live.add(r.migration_id)
            else:
                dead[r.migration_id] = r
        busy = {(by_id[m].collection, by_id[m].chunk_id) for m in live}
        dead_by_chunk = {(r.collection, r.chunk_id): r for r in dead.values()}
        ctx = Context(servers, maps, by_id, by_prefix, live, dead, dead_by_chunk, busy)

        items: list[Item] = []
        for s in servers.values():
            if s.inventory is None:
                if any(i.state != ShardState.RETIRED for i in s.shards):
                    items.append(Item(Finding(
                        kind=FindingKind.SHARD, shard=s.label(), object=", ".join(sorted(s.ids)),
                        detail=f"cannot inspect {s.key}: {s.error}",
                        action="none: start it (or fix its address), then run doctor again; "
                               "nothing that needs it is repaired meanwhile")))
                continue
            items += self._stream_items(s, ctx)
            items += self._import_items(s, ctx)
            items += self._fence_items(s, ctx)
        items += self._staging_items(ctx)
        items += self._lease_items(leases, ctx)
        items += self._migration_items(ctx, unknown, items)
        items += await self._plan_items()
        items += await self._draining_items()
        return items

    async def _draining_items(self) -> list[Item]:
        """Shards left ``draining`` by a drain that no longer runs (read after the plans: a
        drain that starts later marks its shards after this read, or its shards are named
        by the probe)."""
        if self.drains_running is None or self.scope is not None:
            return []
        draining = [s.shard_id for s in await self.catalog.list_shards(ShardState.DRAINING)]
        if not draining:
            return []
        try:
            held = await self.drains_running()
        except Exception as exc:  # noqa: BLE001 - cannot tell: leave them alone
            return [Item(Finding(
                kind=FindingKind.DRAINING_SHARD, shard=shard, object=shard,
                detail=f"draining; cannot tell whether a drain still empties it "
                       f"({type(exc).__name__}: {exc})",
                action="none: nothing is touched; check Temporal, then run doctor again"))
                for shard in draining]
        return [Item(
            Finding(kind=FindingKind.DRAINING_SHARD, shard=shard, object=shard,
                    detail="draining, but no running drain empties it (a drain that was "
                           "terminated): it receives no chunks",
                    action="set the shard active again (chunks already moved stay moved)"),
            fix=self._fix_reactivate(shard))
            for shard in draining if shard not in held]

    def _fix_reactivate(self, shard: str) -> Callable[[], Awaitable[None]]:
        async def fix() -> None:
            assert self.drains_running is not None
            if shard in await self.drains_running():
                return  # a drain started since the report: it is its shard now
            if (await self.catalog.shard(shard)).state == ShardState.DRAINING:
                await self.catalog.set_shard_state(shard, ShardState.ACTIVE)
        return fix

    async def _plan_items(self) -> list[Item]:
        """Stored plans of fleet operations that no longer run (read after the shards and
        records: a plan stored later belongs to an operation that runs)."""
        if self.plan_running is None or self.scope is not None:
            return []
        out = []
        for plan_id, moves in (await self.catalog.plan_ids()).items():
            try:
                if await self.plan_running(plan_id):
                    continue
            except Exception as exc:  # noqa: BLE001 - cannot tell: leave it alone
                out.append(Item(Finding(
                    kind=FindingKind.FLEET_PLAN, shard=None, object=plan_id,
                    detail=f"{moves} planned move(s); cannot tell whether its operation runs "
                           f"({type(exc).__name__}: {exc})",
                    action="none: nothing is touched; check Temporal, then run doctor again")))
                continue
            out.append(Item(
                Finding(kind=FindingKind.FLEET_PLAN, shard=None, object=plan_id,
                        detail=f"{moves} planned move(s) stored by a fleet operation that no "
                               "longer runs (terminated, or its drop failed)",
                        action="drop the stored plan (moves already made stay made)"),
                fix=self._fix_drop_plan(plan_id)))
        return out

    def _fix_drop_plan(self, plan_id: str) -> Callable[[], Awaitable[None]]:
        async def fix() -> None:
            await self.catalog.drop_plan(plan_id)
        return fix

    async def _inspect(self, server: Server, maps: dict[str, ChunkMap]) -> None:
        try:
            server.inventory = await asyncio.to_thread(inspect_shard, server.dsn)
            for name, cmap in maps.items():
                if name not in server.inventory.collections:
                    continue
                elsewhere = [(c.chunk_id, c.range) for c in cmap.chunks
                             if c.shard_id not in server.ids]
                found = await asyncio.to_thread(chunks_with_rows, server.dsn, name, elsewhere)
                server.rows.update({(name, k): n for k, n in found.items()})
        except Exception as exc:  # noqa: BLE001 - an unreachable shard is a finding
            server.inventory, server.error = None, f"{type(exc).__name__}: {exc}".strip()

    # -- findings ----------------------------------------------------------------------------

    def _stream_items(self, s: Server, ctx: Context) -> list[Item]:
        assert s.inventory is not None
        out = []
        for obj in s.inventory.streams:
            rec = ctx.by_id.get(obj.migration_id or "") or ctx.by_prefix.get(obj.prefix)
            if rec is not None and rec.migration_id in ctx.live:
                continue
            collection = rec.collection if rec else ctx.published.get(obj.name)
            if not self._in_scope(collection):
                continue
            what = {StreamObjectKind.SLOT: "replication slot",
                    StreamObjectKind.PUBLICATION: "publication",
                    StreamObjectKind.ORIGIN: "replication origin",
                    StreamObjectKind.STREAM_STATE: "stream_state row"}[obj.kind]
            detail = f"{what} {ctx.describe(rec)}"
            if obj.kind == StreamObjectKind.SLOT:
                detail += ("; it retains WAL until dropped" if obj.active_pid is None
                           else f"; walsender pid {obj.active_pid} still streams it")
            action = {StreamObjectKind.SLOT: "drop the slot",
                      StreamObjectKind.PUBLICATION: "drop the publication",
                      StreamObjectKind.ORIGIN: "drop the origin and its stream_state row",
                      StreamObjectKind.STREAM_STATE: "delete the row"}[obj.kind]
            prefer = shards_of(rec) + (ctx.collection_shards(collection) if collection else [])
            out.append(Item(
                Finding(kind=_STREAM_KINDS[obj.kind], shard=s.label(prefer),
                        object=obj.name, detail=detail, action=action),
                fix=drop_stream_fix(s.dsn, obj), migration_id=ctx.dead_id(rec)))
        return out

    def _import_items(self, s: Server, ctx: Context) -> list[Item]:
        assert s.inventory is not None
        out = []
        for mid, n in s.inventory.import_parts.items():
            if migration_of(mid) in ctx.live:
                continue  # (a restaged copy's rows belong to their migration)
            rec = ctx.by_id.get(migration_of(mid))
            if not self._in_scope(rec.collection if rec else None):
                continue
            dsn = s.dsn

            async def fix(dsn: str = dsn, mid: str = mid) -> None:
                await asyncio.to_thread(forget_parts, dsn, mid)

            out.append(Item(Finding(
                kind=FindingKind.IMPORT_PARTS, shard=s.label(shards_of(rec)), object=mid,
                detail=f"{n} bulk-import progress row(s) {ctx.describe(rec)}",
                action="delete the rows"), fix=fix, migration_id=ctx.dead_id(rec)))
        return out

    def _staging_items(self, ctx: Context) -> list[Item]:
        if self.staging is None:
            return []
        staging = self.staging
        try:
            infos = staging.fs.get_file_info(pafs.FileSelector(staging.root, allow_not_found=True))
        except OSError as exc:
            return [Item(Finding(
                kind=FindingKind.STAGING, shard=None, object=staging.url,
                detail=f"cannot list the staging area: {exc}",
                action="none: check the staging_url setting and its permissions"))]
        out = []
        for info in infos:
            if info.type != pafs.FileType.Directory:
                continue
            mid = info.base_name
            try:
                check_migration_id(mid)
            except StagingError:
                continue  # not a migration's directory: not ours to judge
            if migration_of(mid) in ctx.live:
                continue
            rec = ctx.by_id.get(migration_of(mid))
            if not self._in_scope(rec.collection if rec else None):
                continue

            async def fix(mid: str = mid) -> None:
                await asyncio.to_thread(staging.remove, mid)

            out.append(Item(Finding(
                kind=FindingKind.STAGING, shard=None, object=info.path,
                detail=f"staged snapshot files {ctx.describe(rec)}",
                action="remove the directory"), fix=fix, migration_id=ctx.dead_id(rec)))
        return out

    def _lease_items(self, leases: Sequence[Lease], ctx: Context) -> list[Item]:
        now = datetime.now(UTC)
        out = []
        for lease in leases:
            mid = lease.migration_id
            if mid in ctx.live:
                continue  # the running move renews (or re-takes) it
            rec = ctx.by_id.get(mid)
            if not self._in_scope(rec.collection if rec else None):
                continue
            expires = lease.expires_at
            state = (f"expired at {expires.isoformat(timespec='seconds')}" if expires <= now
                     else f"live until {expires.isoformat(timespec='seconds')}")
            async def fix(mid: str = mid) -> None:
                await self.catalog.release_leases(mid)

            out.append(Item(Finding(
                kind=FindingKind.LEASE, shard=lease.shard_id, object=lease.lease_id,
                detail=f"move lease held by {lease.holder!r}, {state}, {ctx.describe(rec)}",
                action="release the migration's leases"), fix=fix, migration_id=ctx.dead_id(rec)))
        return out

    def _fence_items(self, s: Server, ctx: Context) -> list[Item]:
        assert s.inventory is not None
        out: list[Item] = []
        fenced: dict[tuple[str, int], FenceRow] = {}
        for f in s.inventory.fences:
            key = (f.collection, f.chunk_id)
            fenced[key] = f
            if not self._in_scope(f.collection) or key in ctx.busy:
                continue
            item = self._judge_fence(s, f, ctx)
            if item is not None:
                out.append(item)
        for key, n in sorted(s.rows.items()):
            fence = fenced.get(key)
            if key in ctx.busy or (fence is not None and fence.state != FenceState.RETIRED):
                continue  # a non-retired fence's finding covers its rows
            c, k = key
            chunk = ctx.maps[c].chunk(k)
            assert chunk is not None
            out.append(Item(
                Finding(kind=FindingKind.ROWS, shard=s.label(ctx.collection_shards(c)),
                        object=f"{c}/{k}",
                        detail=f"{rows_phrase(n)} of chunk {c}/{k} on a shard that does not own it "
                               f"(the catalog places it on {chunk.shard_id} at token "
                               f"{chunk.token}); {ctx.describe(ctx.dead_by_chunk.get(key))}",
                        action="delete them (throttled range delete)"),
                fix=self._fix_rows(s, chunk, ctx), migration_id=ctx.dead_id(
                    ctx.dead_by_chunk.get(key)), chunk=key))
        return out

    def _judge_fence(self, s: Server, f: FenceRow, ctx: Context) -> Item | None:
        key = (f.collection, f.chunk_id)
        cmap = ctx.maps.get(f.collection)
        chunk = cmap.chunk(f.chunk_id) if cmap else None
        where = f"{f.collection}/{f.chunk_id}"
        shown = f"{f.state} at token {f.token}"
        dead = ctx.dead_by_chunk.get(key)

        def item(detail: str, action: str, fix: Callable[[], Awaitable[None]] | None = None,
                 shard: str | None = None) -> Item:
            return Item(Finding(kind=FindingKind.FENCE,
                                 shard=shard or s.label(ctx.collection_shards(f.collection)),
                                 object=where, detail=f"fence {shown}: {detail}", action=action),
                         fix=fix, migration_id=ctx.dead_id(dead), chunk=key)

        if chunk is None:
            if f.state == FenceState.RETIRED:
                return None
            return item("the catalog has no such chunk (collection dropped, or the chunk was "
                        "split or merged away)",
                        "none: compare with the collection's chunks in the catalog; a fence of "
                        "a chunk the catalog does not know is never used for routing")
        rows = s.rows.get(key, 0)
        if chunk.shard_id in s.ids:
            if f.state == FenceState.ACTIVE and f.token == chunk.token:
                return None
            if f.state == FenceState.FROZEN and f.token == chunk.token + 1:
                return item(
                    f"frozen on its owner by a cutover that never committed (the catalog "
                    f"places the chunk here at token {chunk.token}) and no move runs: the "
                    f"chunk is unavailable; {ctx.describe(dead)}",
                    f"unfreeze to token {chunk.token} (the catalog's)",
                    self._fix_unfreeze(s, chunk, f, ctx), shard=chunk.shard_id)
            return item(
                f"the catalog says this shard owns it, active at token {chunk.token}",
                "none: not changed automatically; check the chunk's migration records "
                "(shardshift moves --catalog) and which shard holds its latest data",
                shard=chunk.shard_id)
        owner = ctx.server_of(chunk.shard_id)
        owner_fence = owner.fence(f.collection, f.chunk_id) if owner else None
        if f.range != chunk.range:
            return item(f"its range differs from the catalog's [{chunk.range.lo}, "
                        f"{chunk.range.hi})", "none: compare the fence with the catalog")
        placed = f"the catalog places the chunk on {chunk.shard_id} at token {chunk.token}"
        if f.state == FenceState.RETIRED:
            return None  # a finished move's old copy; rows, if any, are their own finding
        if f.state == FenceState.RECEIVING or (
                f.state == FenceState.ACTIVE and f.token > chunk.token):
            how = ("receiving" if f.state == FenceState.RECEIVING else
                   "activated by a cutover that never committed (the catalog never reached "
                   "that token, so no router ever wrote here with it)")
            return item(
                f"{how}, with {rows_phrase(rows)}, on a shard that does not own the chunk ({placed}) "
                f"and no move runs: the partial copy of an aborted move; {ctx.describe(dead)}",
                "retire the fence, delete its rows (throttled range delete), drop the fence",
                self._fix_partial_copy(s, chunk, f, ctx))
        if f.state == FenceState.FROZEN and f.token <= chunk.token:
            if owner_fence is not None and owner_fence.state == FenceState.ACTIVE \
                    and owner_fence.token == chunk.token:
                return item(
                    f"the old owner of a committed move whose cleanup never ran ({placed}, "
                    f"its fence there is active), with {rows_phrase(rows)}; {ctx.describe(dead)}",
                    "retire the fence and delete its rows (throttled range delete)",
                    self._fix_old_owner(s, chunk, f, ctx))
            there = ("unreachable" if owner is None or owner.inventory is None
                     else "without a fence" if owner_fence is None
                     else f"{owner_fence.state} at token {owner_fence.token}")
            return item(
                f"frozen on a non-owner ({placed}), and the owner's fence is {there}: the "
                "outcome of the cutover is unclear",
                f"none: check that {chunk.shard_id} holds the chunk's data and serves it "
                f"(fence active at token {chunk.token}); until then this copy is kept")
        return item(
            f"on a shard that does not own the chunk ({placed}); routers holding an old map "
            "could use it",
            "none: not changed automatically; check the chunk's migration records "
            "(shardshift moves --catalog) and compare this shard's copy with the owner's")

    def _migration_items(self, ctx: Context, unknown: dict[str, str],
                         items: list[Item]) -> list[Item]:
        out = []
        for mid, why in unknown.items():
            rec = ctx.by_id[mid]
            if not self._in_scope(rec.collection):
                continue
            out.append(Item(Finding(
                kind=FindingKind.MIGRATION, shard=rec.source, object=mid,
                detail=f"active ({rec.phase}), {rec.collection}/{rec.chunk_id} {rec.source} -> "
                       f"{rec.target}; cannot tell whether a workflow runs it ({why})",
                action="none: nothing of it is touched; check Temporal, then run doctor again")))
        for mid, rec in ctx.dead.items():
            if not self._in_scope(rec.collection):
                continue
            cmap = ctx.maps.get(rec.collection)
            chunk = cmap.chunk(rec.chunk_id) if cmap else None
            base = (f"active since {rec.started_at.isoformat(timespec='seconds')} in phase "
                    f"{rec.phase}, {rec.collection}/{rec.chunk_id} {rec.source} -> {rec.target}, "
                    "but no workflow runs it")
            outcome: MigrationOutcome | None = None
            if chunk is not None and chunk.shard_id == rec.source:
                outcome = (MigrationOutcome.ROLLED_BACK if rec.cutover_shard == rec.source
                           else MigrationOutcome.ABORTED)
            elif chunk is not None and chunk.shard_id == rec.target:
                outcome = MigrationOutcome.COMPLETED
            if outcome is None:
                out.append(Item(Finding(
                    kind=FindingKind.MIGRATION, shard=rec.source, object=mid,
                    detail=base + ("; its chunk is no longer in the catalog" if chunk is None
                                   else f"; its chunk is on {chunk.shard_id}"),
                    action="none: check the chunk's placement; the record is left open")))
                continue
            assert chunk is not None  # an outcome is read from the chunk's placement
            why = {MigrationOutcome.ABORTED: "the switch never committed",
                   MigrationOutcome.ROLLED_BACK: "it was rolled back",
                   MigrationOutcome.COMPLETED: "the switch had committed"}[outcome]
            out.append(Item(
                Finding(kind=FindingKind.MIGRATION, shard=rec.source, object=mid,
                        detail=f"{base}; the catalog places the chunk on {chunk.shard_id} "
                               f"({why})",
                        action=f"clean what it left (findings above), then close it as "
                               f"{outcome}"),
                fix=self._fix_close(rec, outcome, ctx, items), migration_id=mid,
                chunk=(rec.collection, rec.chunk_id)))
        return out


__all__ = ["Doctor", "DrainProbe", "MoveProbe", "PlanProbe"]
