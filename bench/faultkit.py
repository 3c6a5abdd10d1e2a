"""The fault harness shared by ``bench.faults``, ``bench.soak`` and ``tests/workflows/test_fault_matrix.py``.

One *run* is one chunk move under load with one fault injected in one phase:

1. a fresh collection on a pair of shards (one chunk on each), the moving chunk preloaded by
   ``COPY`` so the copy phases last; a worker *process* of its own on its own task queue (so a
   SIGKILL hits this run only); a router of its own with a load generator writing and reading
   the moving chunk's keys;
2. the move starts, and the run waits until it is in the wanted phase and *pins* it there;
3. the fault is injected, the pin released, the fault restored after its duration;
4. the run waits for the workflow's end (with a deadline), stops the load and judges.

Landing a fault inside a phase. Polling the ``progress`` query alone misses short phases on a
busy machine, so each phase has a pin that holds the move in it until the fault has landed
(the gates are ``tests.workflows.procs``'):

- snapshot: a transaction holding an xid on the source, opened before the move starts; the
  snapshot's slot creation waits for it (a logical slot's consistent point waits for the
  transactions running when it started), seen as a walsender waiting on it.
- import: a ``SHARE ROW EXCLUSIVE`` lock on the target's ``shardshift.import_parts`` holds the
  importer between parts (its next part cannot be claimed) while the export finishes.
- replicate: the ``SHARDSHIFT_TEST_HOLD_LAG`` test hook, armed before the move starts through a
  file the run's worker processes are pointed at: no lag wait reports caught up while the file
  lists the collection, so the move cannot leave replicate; the pin's release removes it.
- verify: a transaction holding an xid on the source, opened while the snapshot is exported;
  verify's slot creation waits for it.
- cutover: once the move is in its cutover, the forward applier is held (``request_hold``),
  so the freeze's marker cannot be applied: the fault lands while the source is frozen (the
  pause lasts ``catchup_timeout_s``). A cutover that commits before the hold takes shows as
  a fault landed in a later phase.
- rollback window and cleanup: the window (``rollback_window_s``) and a throttled range delete
  (``delete_batch``, ``delete_pause_s``) last long enough.

The phase the move was in when the fault landed is recorded (``landed``); a run whose move
had already left the wanted phase (or whose pin did not take) says so instead of pretending.

Judging a run (after the workflow ended and every server is up again):

- outcome: ``completed`` (the result), ``aborted_clean`` (the workflow failed after the abort
  path recorded ``aborted`` in the catalog, and nothing below was found), or ``failed`` with
  the reason (a failure without abort, an abort that left something, no end by the deadline);
- lost writes: the workload checker (lost, altered, duplicated, resurrected) plus preloaded
  documents missing from the owner;
- leaked: replication slots, publications and origins of the migration left on any shard;
- invalid layout: ``catalog.invariants.check_invariants`` with the shards (the layout tiles
  the khash space; the owner holds exactly one active fence with the catalog's token; no
  other shard holds an active fence for the chunk), plus a migration record still active.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import psycopg
from pydantic import BaseModel
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.runtime import Runtime
from temporalio.service import RPCError

from catalog import Catalog
from catalog.admin import provision_collection
from catalog.invariants import check_invariants
from catalog.local_stack import close_engines, open_engines, register_stack_shards
from catalog.models import Chunk, MigrationOutcome
from infra import Stack
from infra.postgres import PostgresInstance
from infra.temporal_client import outlive_interpreter
from router.catalog_source import CatalogRouteSource
from router.core import Router
from settings import RouterSettings, Settings, TemporalSettings
from shards.models import FenceState
from shards.postgres import replication as repl
from shards.postgres.stream_control import ApplyError, release_hold, request_hold
from tests.workflows.procs import (
    Gate,
    LagHold,
    WorkerProcess,
    chunk_keys,
    phase_index,
    preload_chunk,
    query_progress,
    snapshot_gate,
    wait_slot_creation_waiting,
)
from workflows import MigrateChunkInput, MigrateChunkWorkflow
from workflows.migrate_chunk import Progress, describe_failure
from workload.checker import check, collect_stored
from workload.generator import LoadGenerator, WorkloadConfig

PHASES = ["snapshot", "import", "replicate", "verify", "cutover", "rollback_window", "cleanup"]
class Fault(StrEnum):
    WORKER_KILL = "worker_kill"
    """The worker process SIGKILLed, a new one started at once."""
    TARGET_STOP = "target_stop"
    """The target PostgreSQL stopped (immediate shutdown) for ``short_s``."""
    TARGET_STOP_LONG = "target_stop_long"
    """... for ``long_s``, longer than the quick activities' retry budget."""
    SOURCE_STOP = "source_stop"
    SOURCE_STOP_LONG = "source_stop_long"
    CATALOG_STOP = "catalog_stop"
    CATALOG_STOP_LONG = "catalog_stop_long"
    TARGET_LOST = "target_lost"
    """The target stopped and not restarted until the move has ended (or the deadline)."""
    WALSENDER_KILL = "walsender_kill"
    """``pg_terminate_backend`` on the walsender(s) of the move's slots (the stream's source)."""
    TEMPORAL_RESTART = "temporal_restart"
    """The Temporal dev server stopped and started again (it persists to its SQLite file)."""
    ROUTER_RESTART = "router_restart"
    """A fresh router (cold chunk-map cache) takes the load over; the old one drains."""


GLOBAL_FAULTS = {Fault.CATALOG_STOP, Fault.CATALOG_STOP_LONG, Fault.TEMPORAL_RESTART}
"""Faults that hit every move on the stack: their runs run alone."""
LONG_FAULTS = {Fault.TARGET_STOP_LONG, Fault.SOURCE_STOP_LONG, Fault.CATALOG_STOP_LONG}
BEFORE_COMMIT = {"snapshot", "import", "replicate", "verify", "cutover"}
STREAMING = {"snapshot", "replicate", "verify", "cutover", "rollback_window"}


def applicable(phase: str, fault: Fault) -> str | None:
    """None when ``fault`` can be injected in ``phase``; else why not (shown as n/a)."""
    if fault == Fault.TARGET_LOST and phase not in BEFORE_COMMIT:
        return "after the commit point the target is the owner: losing it loses the chunk"
    if fault == Fault.WALSENDER_KILL and phase not in STREAMING:
        return "no replication connection in this phase"
    return None


# -- the stack ---------------------------------------------------------------------------------


def stop_immediate(pg: PostgresInstance, timeout: float = 60.0) -> None:
    """``pg_ctl stop -m immediate``: SIGQUIT to the postmaster (what pg_ctl sends), then wait
    for it to exit. No checkpoint, connections cut: a crash, as far as clients can tell."""
    pid = pg.pid()
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGQUIT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@dataclass
class Rig:
    """A running stack and what every run shares: the catalog, the Temporal client, shards."""

    stack: Stack
    work_dir: Path
    catalog: Catalog
    client: Client
    shard_ids: list[str]
    dsns: dict[str, str]
    """Catalog shard id (or ``catalog``) -> DSN."""
    down: set[str] = field(default_factory=set)

    @classmethod
    async def open(cls, stack: Stack, work_dir: Path) -> Rig:
        catalog = await Catalog(stack.catalog_dsn, max_size=8).open()
        try:
            await catalog.ensure_schema()
            shards = await register_stack_shards(catalog, stack)
            client = await Client.connect(stack.temporal.address,
                                          data_converter=pydantic_data_converter,
                                          runtime=outlive_interpreter(Runtime.default()))
        except BaseException:
            await catalog.close()
            raise
        pg18 = [s for s in shards if s.major_version >= 16]
        # The harness's own connections (load, pins, walsender kills, inspection) are the
        # superuser's; the product's components connect as their roles.
        dsns = {s.shard_id: stack.dsn(s.shard_id, "superuser") for s in pg18} | {
            "catalog": stack.dsn("catalog", "superuser")}
        return cls(stack, work_dir, catalog, client, [s.shard_id for s in pg18], dsns)

    async def close(self) -> None:
        await self.restore_all()
        await self.catalog.close()

    def pairs(self) -> list[tuple[str, str]]:
        """Disjoint (source, target) pairs of shards: runs on different pairs never share one."""
        ids = self.shard_ids
        return [(ids[i], ids[i + 1]) for i in range(0, len(ids) - 1, 2)]

    def instance(self, name: str) -> PostgresInstance:
        return self.stack.instance_for_dsn(self.dsns[name])

    async def stop_pg(self, name: str) -> None:
        self.down.add(name)
        await asyncio.to_thread(stop_immediate, self.instance(name))

    async def start_pg(self, name: str) -> None:
        await asyncio.to_thread(self.instance(name).start, 120)
        self.down.discard(name)

    async def restart_temporal(self) -> None:
        self.down.add("temporal")
        await asyncio.to_thread(self.stack.temporal.stop)
        await asyncio.to_thread(self.stack.temporal.start, 120)
        self.down.discard("temporal")

    async def restore_all(self) -> None:
        """Start whatever a fault left stopped (idempotent)."""
        for name in sorted(self.down):
            if name == "temporal":
                await asyncio.to_thread(self.stack.temporal.start, 120)
                self.down.discard(name)
            else:
                await self.start_pg(name)


# -- the run -----------------------------------------------------------------------------------


class RunConfig(BaseModel):
    """How runs are shaped and how long faults last (seconds)."""

    preload: int = 20_000
    part_rows: int = 250
    rate: float = 120.0
    """Operations per second on the moving chunk (reads and writes)."""
    short_s: float = 5.0
    long_s: float = 200.0
    give_up_s: float = 60.0
    """``target_give_up_s`` of target-lost runs, when the workflow input has that field."""
    settle_s: float = 240.0
    """After the fault is over, how long the move has to end before the run is failed."""
    lost_wait_s: float = 120.0
    """Target lost, workflow without ``target_give_up_s``: how long to wait for an end."""
    heartbeat_s: float = 5.0
    rollback_window_s: float = 30.0
    verify_buckets: int = 4096
    max_lag_bytes: int = 128 * 1024


class RunResult(BaseModel):
    phase: str
    fault: str
    outcome: str = "n/a"
    """completed | aborted_clean | failed | n/a"""
    why: str | None = None
    landed: str | None = None
    """The move's phase when the fault was injected."""
    workflow_id: str | None = None
    migration_id: str | None = None
    seconds: float = 0.0
    lost_writes: int = 0
    lost_samples: list[str] = []
    leaked: list[str] = []
    violations: list[str] = []
    client_errors: int = 0
    error_samples: list[str] = []
    unknown_outcomes: int = 0
    notes: list[str] = []


def move_input_fields() -> set[str]:
    return set(MigrateChunkInput.model_fields)


class Pin:
    """Holds a move in a phase until released (see the module notes). ``release`` is
    idempotent and never raises: the pin's server may be the one the fault stopped."""

    def __init__(self) -> None:
        self._releases: list[Callable[[], Awaitable[None]]] = []

    def on_release(self, fn: Callable[[], Awaitable[None]]) -> None:
        self._releases.append(fn)

    async def release(self, retry_for: float = 0.0) -> None:
        """Undo every hold; one whose server is down (the fault) is tried again every half
        second for up to ``retry_for`` seconds: a hold left in place would keep the move
        pinned after the fault is over, and the run would wrongly look stuck."""
        fns, self._releases = self._releases, []
        deadline = time.monotonic() + retry_for
        for fn in fns:
            while True:
                try:
                    await fn()
                    break
                except Exception:  # noqa: BLE001 - its server may be the one stopped
                    if time.monotonic() >= deadline:
                        break
                    await asyncio.sleep(0.5)


class MoveRun:
    """One move under load, pinned in ``phase``, with ``fault`` injected there."""

    def __init__(self, rig: Rig, cfg: RunConfig, phase: str, fault: Fault,
                 pair: tuple[str, str], label: str, log: Callable[[str], None] = print) -> None:
        self.rig, self.cfg, self.phase, self.fault = rig, cfg, phase, fault
        self.source, self.target = pair
        self.collection = f"f_{label}_{uuid.uuid4().hex[:6]}"[:48]
        self.log = lambda msg: log(f"[{phase}/{fault.value}] {msg}")
        self.result = RunResult(phase=phase, fault=fault.value)
        self.worker: WorkerProcess | None = None
        self.lag_hold = LagHold(rig.work_dir / f"hold-lag-{self.collection}", self.collection)
        """The replicate pin (``arm_pin``); the run's worker processes read its file."""
        self.router: Router | None = None
        self.routers: list[Router] = []
        self.router_catalog: Catalog | None = None
        self.load: LoadGenerator | None = None
        self.handle: WorkflowHandle[Any, Any] | None = None
        self.moving: Chunk | None = None
        self.mid: str | None = None
        self.settings: Settings | None = None
        self.pin = Pin()
        self.fault_over = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._restarts: list[asyncio.Task[Any]] = []
        self.stopped: set[str] = set()
        """Servers this run's fault stopped (restarted by this run only)."""

    # -- set-up ------------------------------------------------------------------------------

    def move_input(self) -> MigrateChunkInput:
        cfg, fields = self.cfg, move_input_fields()
        kw: dict[str, Any] = {
            "poll_s": 0.3, "cutover_retry_s": 0.3, "part_rows": cfg.part_rows,
            "heartbeat_timeout_s": cfg.heartbeat_s, "verify_buckets": cfg.verify_buckets,
            "max_lag_bytes": cfg.max_lag_bytes,
        }
        if self.phase == "rollback_window":
            kw["rollback_window_s"] = cfg.rollback_window_s
        if self.phase == "cleanup":
            kw["delete_batch"], kw["delete_pause_s"] = 100, 0.1
        if self.fault == Fault.TARGET_LOST and "target_give_up_s" in fields:
            kw["target_give_up_s"] = cfg.give_up_s
        assert self.moving is not None
        return MigrateChunkInput(collection=self.collection, chunk_id=self.moving.chunk_id,
                                 target=self.target, **kw)

    async def setup(self) -> None:
        rig = self.rig
        engines = await open_engines(
            [await rig.catalog.shard(s) for s in (self.source, self.target)])
        try:
            cmap = await provision_collection(rig.catalog, engines, self.collection, "acct",
                                              shard_ids=[self.source, self.target])
        finally:
            await close_engines(engines)
        self.moving = next(c for c in cmap.chunks if c.shard_id == self.source)
        await asyncio.to_thread(preload_chunk, rig.dsns[self.source], self.collection,
                                self.moving, self.cfg.preload)
        staging = rig.work_dir / f"staging-{self.collection}"
        self.settings = Settings(
            catalog_dsn=rig.stack.catalog_dsn, staging_url=str(staging),
            temporal=TemporalSettings(address=rig.stack.temporal.address,
                                      task_queue=f"faults-{self.collection}"),
        )
        self.worker = WorkerProcess(self.settings, rig.work_dir / f"worker-{self.collection}.log",
                                    self.lag_hold.env)
        self.worker.start()
        self.router_catalog = await Catalog(rig.stack.catalog_dsn, max_size=4).open()
        self.router = await self.new_router()
        self.load = LoadGenerator(self.router, WorkloadConfig(
            collection=self.collection, rate=self.cfg.rate, workers=4,
            only_keys=chunk_keys(self.moving, 24, "acct"),
        ))
        await self.load.start()

    async def new_router(self) -> Router:
        assert self.router_catalog is not None
        router = await Router(CatalogRouteSource(self.router_catalog),
                              RouterSettings(retry_deadline_s=5.0, pool_max_size=4)).start()
        self.routers.append(router)
        return router

    async def start_move(self) -> None:
        assert self.settings is not None
        await self.arm_pin()
        wid = f"faults-{self.collection}"
        self.result.workflow_id = wid
        self.handle = await self.rig.client.start_workflow(
            MigrateChunkWorkflow.run, self.move_input(), id=wid,
            task_queue=self.settings.temporal.task_queue,
        )

    # -- watching ----------------------------------------------------------------------------

    async def progress(self) -> Progress | None:
        assert self.handle is not None
        p = await query_progress(self.handle, timeout=5.0)
        if p is not None and p.migration_id:
            self.mid = self.result.migration_id = p.migration_id
        return p

    async def wait_progress(self, pred: Callable[[Progress], bool], what: str,
                            timeout: float = 180.0) -> Progress:
        deadline = time.monotonic() + timeout
        last: Progress | None = None
        while True:
            p = await self.progress()
            if p is not None:
                last = p
                if pred(p):
                    return p
                if p.outcome is not None or phase_index(p.phase) >= phase_index("done"):
                    raise PhaseMissed(f"{what}: the move ended first ({p.phase})", p)
            if time.monotonic() > deadline:
                raise PhaseMissed(f"{what} not reached in {timeout:.0f}s", last)
            await asyncio.sleep(0.01)

    async def wait_sql(self, name: str, query: str, params: tuple[Any, ...],
                       ok: Callable[[Any], bool], what: str, timeout: float = 120.0) -> Any:
        """Poll one value on a server until ``ok`` holds (errors while it restarts: retried)."""
        deadline = time.monotonic() + timeout
        async with await psycopg.AsyncConnection.connect(self.rig.dsns[name],
                                                         autocommit=True) as conn:
            while True:
                with contextlib.suppress(psycopg.errors.UndefinedTable):
                    cur = await conn.execute(query, params)
                    row = await cur.fetchone()
                    value = row[0] if row else None
                    if ok(value):
                        return value
                if time.monotonic() > deadline:
                    raise PhaseMissed(f"{what} not seen in {timeout:.0f}s", None)
                await asyncio.sleep(0.005)

    # -- pins --------------------------------------------------------------------------------

    async def arm_pin(self) -> None:
        """The pins that must be in place before the move starts (see the module notes)."""
        if self.phase == "snapshot":
            self._gate(await snapshot_gate(self.rig.dsns[self.source]))
        elif self.phase == "replicate":
            self.lag_hold.hold()

            async def release() -> None:
                self.lag_hold.release()

            self.pin.on_release(release)

    def _gate(self, gate: Gate) -> None:
        self.pin.on_release(gate.release)

    async def pin_phase(self) -> Progress:
        """Bring the move into ``self.phase`` and hold it there (see the module notes)."""
        ph = self.phase
        first = await self.wait_progress(lambda p: bool(p.migration_id), "a first answer", 120)
        assert self.mid is not None
        if ph == "snapshot":
            await self._slot_creation_waiting("the snapshot's slot")
            return await self.wait_progress(lambda p: p.phase == "snapshot", "snapshot")
        if ph in ("import", "verify"):
            await self.wait_sql(
                self.target, "SELECT count(*) FROM shardshift.import_parts WHERE migration_id = %s",
                (self.mid,), lambda n: (n or 0) >= 1, "a first imported part")
        if ph == "import":
            await self._hold_importer()
            return await self.wait_progress(lambda p: p.phase == "import", "import")
        if ph == "verify":
            await self._hold_xid_on_source()
            await self.wait_progress(lambda p: p.phase == "verify", "verify")
            await self._slot_creation_waiting("verify's slot")
            return await self.wait_progress(lambda p: True, "verify")
        if ph == "replicate":
            return await self.wait_progress(lambda p: p.phase == "replicate", "replicate")
        if ph == "cutover":
            # The applier is held once the move is in its cutover, so the freeze marker cannot
            # arrive and the pause lasts. (A gate taken before the move starts, as the tests
            # do, held the bench's moves in replicate: a marker came before the freeze.)
            await self.wait_progress(lambda p: phase_index(p.phase) >= phase_index("cutover"),
                                     "cutover")
            await self._hold_applier()
            await self._wait_frozen()
            return await self.wait_progress(lambda p: True, "cutover")
        if ph == "rollback_window":
            return await self.wait_progress(lambda p: p.phase == "rollback_window"
                                            and p.rollback_open, "rollback window")
        if ph == "cleanup":
            return await self.wait_progress(lambda p: p.phase == "cleanup", "cleanup")
        return first

    async def _slot_creation_waiting(self, what: str) -> None:
        try:
            await wait_slot_creation_waiting(self.rig.dsns[self.source])
        except AssertionError as exc:
            raise PhaseMissed(f"{what}: {exc}", await self.progress()) from None

    async def _hold_importer(self) -> None:
        conn = await psycopg.AsyncConnection.connect(self.rig.dsns[self.target], autocommit=True)
        await conn.execute("BEGIN")
        await conn.execute("LOCK TABLE shardshift.import_parts IN SHARE ROW EXCLUSIVE MODE")
        self._gate(Gate(conn))

    async def _hold_xid_on_source(self) -> None:
        self._gate(await snapshot_gate(self.rig.dsns[self.source]))

    async def _hold_applier(self) -> None:
        """Hold the forward applier (``request_hold``) once its state row exists."""
        assert self.mid is not None
        names = repl.stream_names(self.mid, "fwd")
        target_dsn = self.rig.dsns[self.target]
        await self.wait_sql(self.target,
                            "SELECT count(*) FROM shardshift.stream_state WHERE stream = %s",
                            (names.origin,), lambda n: (n or 0) >= 1, "the applier's state row")
        deadline = time.monotonic() + 30
        while True:
            try:
                await asyncio.to_thread(request_hold, target_dsn, names, None)
                break
            except ApplyError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)

        async def release() -> None:
            await asyncio.to_thread(release_hold, target_dsn, names)

        self.pin.on_release(release)

    async def _wait_frozen(self) -> None:
        """Until the cutover has frozen the source (held there by the freeze-marker gate)."""
        assert self.moving is not None
        deadline = time.monotonic() + 180
        async with await psycopg.AsyncConnection.connect(self.rig.dsns[self.source],
                                                         autocommit=True) as conn:
            while time.monotonic() < deadline:
                cur = await conn.execute(
                    "SELECT state FROM shardshift.chunk_fence WHERE collection = %s"
                    " AND chunk_id = %s", (self.collection, self.moving.chunk_id))
                row = await cur.fetchone()
                if row and row[0] == FenceState.FROZEN.value:
                    return
                await asyncio.sleep(0.003)
        raise PhaseMissed("the source was not seen frozen in 180s", await self.progress())

    # -- faults ------------------------------------------------------------------------------

    async def inject(self) -> None:
        """Inject the fault (returns at once; ``fault_over`` is set when it is over)."""
        f = self.fault
        rig = self.rig
        if f == Fault.WORKER_KILL:
            assert self.worker is not None
            self.worker.kill()
            self.worker.start()
            self.fault_over.set()
        elif f == Fault.ROUTER_RESTART:
            assert self.load is not None
            fresh = await self.new_router()
            # The old router drains its operations in flight meanwhile.
            self._tasks.append(asyncio.create_task(self.load.swap_router(fresh)))
            self.fault_over.set()
        elif f == Fault.WALSENDER_KILL:
            killed = await self._kill_walsenders()
            self.result.notes.append(f"terminated walsender(s) {killed}")
            if not killed:  # the fault did not land: say so (the cell shows it)
                self.result.landed = f"nowhere (no walsender in {self.result.landed})"
            self.fault_over.set()
        elif f in (Fault.TARGET_STOP, Fault.TARGET_STOP_LONG, Fault.SOURCE_STOP,
                   Fault.SOURCE_STOP_LONG, Fault.CATALOG_STOP, Fault.CATALOG_STOP_LONG):
            name = {"target": self.target, "source": self.source,
                    "catalog": "catalog"}[f.value.split("_")[0]]
            self.stopped.add(name)
            await rig.stop_pg(name)
            secs = self.cfg.long_s if f in LONG_FAULTS else self.cfg.short_s
            self._restarts.append(asyncio.create_task(self._restart_after(name, secs)))
        elif f == Fault.TARGET_LOST:
            self.stopped.add(self.target)
            await rig.stop_pg(self.target)  # restarted by finish(), after the move's end
            self.fault_over.set()
        elif f == Fault.TEMPORAL_RESTART:
            await rig.restart_temporal()
            self.fault_over.set()

    async def _restart_after(self, name: str, secs: float) -> None:
        try:
            await asyncio.sleep(secs)  # the outage itself
            await self.rig.start_pg(name)
            self.stopped.discard(name)
        finally:
            self.fault_over.set()

    async def _kill_walsenders(self) -> list[int]:
        """Terminate the walsenders of this migration's slots on the stream's source (the
        target for the reverse stream of the rollback window)."""
        assert self.mid is not None
        server = self.target if self.phase == "rollback_window" else self.source
        prefix = repl.migration_prefix(self.mid)
        deadline = time.monotonic() + 20
        async with await psycopg.AsyncConnection.connect(self.rig.dsns[server],
                                                         autocommit=True) as conn:
            while True:
                cur = await conn.execute(
                    "SELECT active_pid FROM pg_replication_slots WHERE active_pid IS NOT NULL"
                    " AND starts_with(slot_name::text, %s)", (prefix,))
                pids = [r[0] for r in await cur.fetchall()]
                if pids:
                    for pid in pids:
                        await conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
                    return pids
                if time.monotonic() > deadline:
                    return []
                await asyncio.sleep(0.01)

    # -- the end -----------------------------------------------------------------------------

    async def wait_end(self) -> tuple[str, str | None]:
        """("completed" | "aborted" | "failed" | "timeout", why) once the workflow ended."""
        assert self.handle is not None
        await self.fault_over.wait()
        deadline = time.monotonic() + self.cfg.settle_s
        if self.fault == Fault.TARGET_LOST:
            # With a give-up time the move must end clean after it; without one (older
            # workflows) it is given ``lost_wait_s`` to show whether it ends at all.
            gives_up = "target_give_up_s" in move_input_fields()
            deadline = time.monotonic() + (self.cfg.give_up_s + self.cfg.settle_s if gives_up
                                           else self.cfg.lost_wait_s)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                p = await self.progress()
                return "timeout", (f"no end by the deadline after the fault; phase "
                                   f"{p.phase if p else '?'}"
                                   + (f" ({p.detail})" if p and p.detail else ""))
            try:
                res = await asyncio.wait_for(self.handle.result(), timeout=min(left, 30))
            except TimeoutError:
                continue
            except WorkflowFailureError as exc:
                return "failed", describe_failure(exc.cause or exc)
            except RPCError:
                await asyncio.sleep(1)  # the Temporal server is restarting
                continue
            if res.outcome == MigrationOutcome.ABORTED:
                return "aborted", res.detail
            return str(res.outcome.value), res.detail

    async def run(self, go: asyncio.Event | None = None,
                  ready: asyncio.Event | None = None) -> RunResult:
        """The whole run. With ``go``: signal ``ready`` once pinned, wait for ``go``, and let
        the caller inject (a fault shared by several runs); without: inject here."""
        try:
            return await self._run(go, ready)
        except BaseException:
            # Cancelled (Ctrl-C): the worker runs in a session of its own, so nothing else
            # would stop it; the stack's servers are stopped by whoever owns the stack.
            if self.worker is not None:
                self.worker.kill()
            raise

    async def _run(self, go: asyncio.Event | None, ready: asyncio.Event | None) -> RunResult:
        t0 = time.monotonic()
        releasing: asyncio.Task[None] | None = None
        try:
            await self.setup()
            assert self.load is not None
            await self._wait_acked(50, 60)
            await self.start_move()
            seen: Progress | None
            try:
                seen = await self.pin_phase()
            except PhaseMissed as exc:
                seen = exc.progress
                self.result.notes.append(f"pin: {exc}")
            if ready is not None and go is not None:
                ready.set()
                await go.wait()  # the caller recorded the phase and injected the fault
            else:
                p = await self.progress() or seen
                self.result.landed = p.phase if p else None
                await self.inject()
            self.log(f"fault landed in {self.result.landed}")
            # In the background: the pin's server may be down until the fault is over.
            releasing = asyncio.create_task(
                self.pin.release(retry_for=self.cfg.long_s + self.cfg.settle_s))
            end, why = await self.wait_end()
        except Exception as exc:  # noqa: BLE001 - a harness failure is a failed run, reported
            end, why = "harness", f"{type(exc).__name__}: {exc}"
            self.log(f"harness error: {why}")
        finally:
            if releasing is not None and not releasing.done():
                releasing.cancel()  # the move ended with its pin's server still down
            if releasing is not None:
                await asyncio.gather(releasing, return_exceptions=True)
            await self.pin.release()
        try:
            await self.finish(end, why)
        except Exception as exc:  # noqa: BLE001 - a run that cannot be judged failed
            self.result.outcome, self.result.why = "failed", f"judging failed: {exc!r}"
        self.result.seconds = round(time.monotonic() - t0, 1)
        self.log(f"{self.result.outcome} ({self.result.why or ''}) in {self.result.seconds}s")
        return self.result

    async def _wait_acked(self, n: int, timeout: float) -> None:
        assert self.load is not None
        load = self.load
        start = sum(r.outcome == "ok" for r in load.records)
        deadline = time.monotonic() + timeout
        while sum(r.outcome == "ok" for r in load.records) < start + n:
            if time.monotonic() > deadline:
                self.result.notes.append(f"fewer than {n} acknowledged ops in {timeout}s")
                return
            await asyncio.sleep(0.05)

    async def finish(self, end: str, why: str | None) -> None:
        """Bring everything back, end a move that did not end, stop the load, judge."""
        rig, res = self.rig, self.result
        for t in self._restarts:
            t.cancel()  # the move ended (or the run broke) during the outage: end it now
        await asyncio.gather(*self._restarts, return_exceptions=True)
        for name in sorted(self.stopped):
            await rig.start_pg(name)
        self.stopped.clear()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if end == "timeout" and self.handle is not None:
            # The servers are back: give the move a last chance to end, then cancel it, then
            # terminate it (its outcome stays "failed"; the checks below show what it left).
            end2 = await self._end_stuck()
            res.notes.append(f"after the deadline: {end2}")
        if self.load is not None:
            await self._wait_acked(30, 30)  # the load goes on after the move
            await self.load.stop()
        for r in self.routers:
            with contextlib.suppress(Exception):
                await r.close(drain_s=1.0)
        if self.router_catalog is not None:
            await self.router_catalog.close()
        if self.worker is not None:
            await asyncio.to_thread(self.worker.stop)
        if self.moving is None:
            res.outcome, res.why = "failed", why
            return
        await self.judge(end, why)
        await self.drop()

    async def _end_stuck(self) -> str:
        assert self.handle is not None
        try:
            await asyncio.wait_for(self.handle.result(), 60)
            return "ended once the servers were back"
        except TimeoutError:
            pass
        except Exception as exc:  # noqa: BLE001 - how it ended is the finding
            return f"ended once the servers were back: {type(exc).__name__}"
        with contextlib.suppress(Exception):
            await self.handle.cancel()
        try:
            await asyncio.wait_for(self.handle.result(), 120)
        except TimeoutError:
            with contextlib.suppress(Exception):
                await self.handle.terminate("bench.faults: no end after cancel")
            return "terminated (a cancel did not end it)"
        except Exception as exc:  # noqa: BLE001 - how it ended is the finding
            return f"cancelled: {type(exc).__name__}"
        return "cancelled: completed"

    async def judge(self, end: str, why: str | None) -> None:
        rig, res = self.rig, self.result
        assert self.moving is not None and self.load is not None
        catalog = await Catalog(rig.stack.catalog_dsn, max_size=2).open()
        # The collection lives on the pair only (other shards may not even have its schema).
        engines = await open_engines([await catalog.shard(s) for s in (self.source, self.target)])
        try:
            stored = await collect_stored(engines, self.collection)
            report = check(self.load.records, stored)
            preloaded = sum(1 for d in stored if d.startswith("bulk-"))
            missing_preload = self.cfg.preload - preloaded
            lost = report.lost + report.altered + report.duplicated + report.resurrected
            res.lost_writes = len(lost) + max(0, missing_preload)
            res.lost_samples = lost[:5] + ([f"{missing_preload} preloaded documents"]
                                           if missing_preload else [])
            res.client_errors, res.error_samples = report.client_errors, report.error_samples[:3]
            res.unknown_outcomes = report.unknown_outcomes
            if self.mid:
                lost_target = self.target if self.fault == Fault.TARGET_LOST else None
                # A move makes replication objects on its source and target only (and another
                # run's fault may have another shard down right now).
                for sid in (self.source, self.target):
                    left = await asyncio.to_thread(leftovers, rig.dsns[sid], self.mid)
                    if sid == lost_target and left:
                        res.notes.append(f"on the lost target (doctor's job): {left}")
                        continue
                    res.leaked += [f"{sid}:{x}" for x in left]
            violations = await check_invariants(catalog, self.collection, engines)
            res.violations = [v.message for v in violations]
            if self.mid:
                with contextlib.suppress(Exception):
                    rec = await catalog.migration(self.mid)
                    if rec.outcome is None:
                        res.violations.append(f"migration {self.mid} still active in the "
                                              f"catalog (phase {rec.phase})")
                    if end == "failed" and rec.outcome == MigrationOutcome.ABORTED:
                        end = "aborted"
        finally:
            await close_engines(engines)
            await catalog.close()
        why = why.splitlines()[0] if why else why
        dirty = res.lost_writes or res.leaked or res.violations
        if end == "completed":
            res.outcome = "completed"
        elif end == "aborted" and not dirty:
            res.outcome, res.why = "aborted_clean", why
        else:
            res.outcome = "failed"
            res.why = {"aborted": f"aborted but left something behind ({why})",
                       "timeout": why, "harness": f"harness: {why}"}.get(end, f"{end}: {why}")

    async def drop(self) -> None:
        """Drop the run's tables (the catalog keeps the collection's record)."""
        engines = await open_engines([await self.rig.catalog.shard(s)
                                      for s in (self.source, self.target)])
        try:
            await asyncio.gather(*(e.drop_collection(self.collection) for e in engines.values()),
                                 return_exceptions=True)
        finally:
            await close_engines(engines)


class PhaseMissed(Exception):
    def __init__(self, message: str, progress: Progress | None) -> None:
        super().__init__(message)
        self.progress = progress


def leftovers(dsn: str, migration_id: str) -> list[str]:
    """Replication slots, publications and origins of a migration on one server."""
    prefix = repl.migration_prefix(migration_id)
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        out = [f"slot {r[0]}" for r in conn.execute(
            "SELECT slot_name FROM pg_replication_slots WHERE starts_with(slot_name::text, %s)",
            (prefix,))]
        out += [f"publication {r[0]}" for r in conn.execute(
            "SELECT pubname FROM pg_publication WHERE starts_with(pubname::text, %s)", (prefix,))]
        out += [f"origin {r[0]}" for r in conn.execute(
            "SELECT roname FROM pg_replication_origin WHERE starts_with(roname, %s)", (prefix,))]
    return out


def rss_mb(pid: int) -> float | None:
    """Resident set size of a process (MiB), from /proc."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None
