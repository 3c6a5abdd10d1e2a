"""Record workflow histories for the replay tests (``tests/workflows/test_replay.py``).

    python -m tests.workflows.record_histories --list        # scenarios, and which are recorded
    python -m tests.workflows.record_histories               # record every scenario not yet recorded
    python -m tests.workflows.record_histories NAME [NAME]   # record these (must not exist yet)

It starts a private stack the way the test session does (``tests/conftest.py``: own state
directory under /tmp, free ports, 3 PostgreSQL 18 shards and a Temporal dev server), runs an
in-process worker (``worker.run_worker``) and plays each scenario against it, then writes the
history of each run it names to ``tests/workflows/histories/<file>.json``
(``WorkflowHandle.fetch_history()`` -> ``WorkflowHistory.to_json()``). Each fresh history is
replayed with the current workflow code before it is written. The stack is torn down at the
end, also on errors and Ctrl-C.

When to record: only for a new scenario (a new workflow, a new path through one). Never to
"fix" a replay failure: a committed history is the proof that runs started by earlier code
still replay, and a replay failure means a workflow change broke that; the change goes
behind ``workflow.patched`` instead (see "Workflow code changes and replay" in
docs/architecture.md). The script therefore never overwrites a file; replacing a history is
a deliberate ``git rm`` first, and the reason belongs in the commit message.

Each run's workflow id is its scenario's name (the stack is fresh, so ids are free); the
replay test replays a history under the id its child workflows carry, or else its file name.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle, WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from activities.replicate import HOLD_LAG_ENV
from catalog import Catalog
from catalog.admin import provision_collection
from catalog.local_stack import up_and_provision
from catalog.models import MigrationKind, MigrationOutcome
from infra import Stack
from settings import Settings, TemporalSettings
from shards.models import IndexDefinition
from shards.postgres import PostgresShard
from shards.postgres.schema import collection_table
from tests.conftest import make_stack_settings, owned_state_dir, reap_abandoned_stacks
from tests.router.conftest import Deployment
from tests.workflows.fleet import Fleet, make_fleet
from tests.workflows.helpers import FAST, load_chunk, wait_until
from worker import run_worker
from workflows import (
    ALL_WORKFLOWS,
    ChangeIndexesInput,
    ChangeIndexesWorkflow,
    DrainShardInput,
    DrainShardWorkflow,
    MigrateChunkInput,
    MigrateChunkWorkflow,
    RebalanceInput,
    RebalanceWorkflow,
)
from workflows.child_moves import RunLimits
from workflows.migrate_chunk import Progress

HISTORIES = Path(__file__).parent / "histories"
RESULT_TIMEOUT_S = 240.0

# How each recorded run ends (the last event of its history).
COMPLETED = "EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED"
CANCELED = "EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED"
FAILED = "EVENT_TYPE_WORKFLOW_EXECUTION_FAILED"
CONTINUED = "EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW"


@dataclass(frozen=True)
class Recorded:
    """One committed history: the workflow it is of and how its run ended."""

    workflow: str
    closes: str
    outcome: str | None = None
    """``outcome`` field of the run's result (completed runs of a move)."""
    failure_type: str | None = None
    """``ApplicationError`` type of a failed run."""
    cancel_requested: bool = False
    """The run received a cancel request (and ended as ``closes`` says)."""


LEGACY: dict[str, Recorded] = {
    "migrate_chunk_completed": Recorded("MigrateChunkWorkflow", COMPLETED, outcome="completed"),
    "drain_completed": Recorded("DrainShardWorkflow", COMPLETED),
    "drain_cancelled": Recorded("DrainShardWorkflow", CANCELED, cancel_requested=True),
    "split_shard_completed": Recorded("RebalanceWorkflow", COMPLETED),
}
"""Histories recorded by earlier versions of the workflow code (before any ``workflow.patched``
marker existed) by scenarios this script no longer plays. Never re-recorded: they prove that
runs started by that code still replay."""


@dataclass
class Ctx:
    """What a scenario runs against: the stack's client, worker queue, catalog and shards."""

    client: Client
    task_queue: str
    catalog: Catalog
    pg18_dsns: list[str]
    cleanups: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    async def deployment(self, name: str) -> Deployment:
        """A collection ``acct``-keyed, 2 chunks on each of the 3 shards (as the tests' fixture)."""
        shards: dict[str, PostgresShard] = {}
        for i, dsn in enumerate(self.pg18_dsns[:3]):
            sid = f"{name}-s{i}"
            await self.catalog.register_shard(sid, dsn, engine="postgres", major_version=18)
            shards[sid] = await PostgresShard(sid, dsn, max_size=4).open()
        cmap = await provision_collection(
            self.catalog, shards, name, "acct",
            [IndexDefinition(name="by_email", fields=("email",))], chunks_per_shard=2)
        self.cleanups.append(lambda: _close_shards(shards, name))
        return Deployment(self.catalog, name, shards, cmap)

    async def fleet(self, name: str, old: int, new: int, chunks_per_shard: int) -> Fleet:
        """``old`` shards holding the collection, ``new`` empty ones (as the drain tests')."""
        dsns = iter(self.pg18_dsns)
        fleet = await make_fleet(
            self.catalog, name,
            {f"{name}-o{i}": (next(dsns), 18) for i in range(old)},
            {f"{name}-n{i}": (next(dsns), 18) for i in range(new)},
            chunks_per_shard=chunks_per_shard)
        self.cleanups.append(lambda: _close_shards(fleet.shards, name))
        return fleet

    @staticmethod
    def target_of(d: Deployment) -> str:
        """Where ``move`` moves the deployment's first chunk to."""
        return next(s for s in sorted(d.shards) if s != d.initial.chunks[0].shard_id)

    async def move(self, d: Deployment, name: str, docs: int = 200, **kw: Any
                   ) -> tuple[WorkflowHandle[Any, Any], str]:
        """Start a move of the deployment's first chunk, ``docs`` documents in it, to another
        shard."""
        chunk = d.initial.chunks[0]
        target = self.target_of(d)
        load_chunk(d.shards[chunk.shard_id].dsn, d.collection, chunk.range, docs)
        handle = await self.client.start_workflow(
            MigrateChunkWorkflow.run,
            MigrateChunkInput(collection=d.collection, chunk_id=chunk.chunk_id, target=target,
                              **{**FAST, **kw}),
            id=name, task_queue=self.task_queue)
        return handle, target


async def _close_shards(shards: dict[str, PostgresShard], collection: str) -> None:
    for s in shards.values():
        try:
            await s.drop_collection(collection)
        finally:
            await s.close()


async def wait_progress(handle: WorkflowHandle[Any, Any], pred: Callable[[Progress], bool],
                        what: str) -> Progress:
    """Poll the move's ``progress`` until ``pred`` holds; fails at once if the move ended."""
    async def probe() -> Progress | None:
        p = await handle.query(MigrateChunkWorkflow.progress)
        if pred(p):
            return p
        assert p.outcome is None, f"{what} not reached: the move ended {p.outcome} ({p})"
        return None

    return await wait_until(probe, 120, what)


async def runs_of(client: Client, handle: WorkflowHandle[Any, Any]) -> list[WorkflowHistory]:
    """The history of every run of a workflow, first to last (following continue-as-new)."""
    run_id: str | None = handle.first_execution_run_id or handle.run_id
    out: list[WorkflowHistory] = []
    while run_id is not None:
        history = await client.get_workflow_handle(handle.id, run_id=run_id).fetch_history()
        out.append(history)
        last = history.events[-1]
        run_id = (last.workflow_execution_continued_as_new_event_attributes.new_execution_run_id
                  if last.HasField("workflow_execution_continued_as_new_event_attributes")
                  else None)
    return out


@contextlib.contextmanager
def lag_held(collection: str) -> Any:
    """Keep the collection's moves in their replicate phase for a lag window (``lag_window_s``,
    60 s by default: ``wait_caught_up`` does not report caught up before its window ends;
    the activities' test hook). The scenarios act well within it."""
    os.environ[HOLD_LAG_ENV] = collection
    try:
        yield
    finally:
        os.environ.pop(HOLD_LAG_ENV, None)


# -- the scenarios ---------------------------------------------------------------------------------
# Each plays one situation to its end and returns {file name: history}; what each file must show
# is in SCENARIOS below (the replay test checks it).


async def move_completed(ctx: Ctx) -> dict[str, WorkflowHistory]:
    """The happy path: snapshot, import, replicate, verify, cutover, cleanup."""
    d = await ctx.deployment("move_completed")
    handle, _ = await ctx.move(d, "move_completed")
    result = await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_S)
    assert result.outcome == MigrationOutcome.COMPLETED, result
    return {"move_completed": await handle.fetch_history()}


async def move_pinned_completed(ctx: Ctx) -> dict[str, WorkflowHistory]:
    """The happy path with staging private to the worker's host (patch ``pinned-staging``):
    ``staging_home`` names the worker's own queue, where the copy runs and is released."""
    d = await ctx.deployment("move_pinned_completed")
    handle, _ = await ctx.move(d, "move_pinned_completed")
    result = await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_S)
    assert result.outcome == MigrationOutcome.COMPLETED, result
    history = await handle.fetch_history()
    pinned = [e.activity_task_scheduled_event_attributes.task_queue.name for e in history.events
              if e.HasField("activity_task_scheduled_event_attributes")
              and e.activity_task_scheduled_event_attributes.activity_type.name
              == "migrate.release_staging"]
    assert len(pinned) == 1 and ".host." in pinned[0], pinned
    return {"move_pinned_completed": history}


async def move_rolled_back(ctx: Ctx) -> dict[str, WorkflowHistory]:
    """A move with a rollback window, rolled back through the reverse stream."""
    d = await ctx.deployment("move_rolled_back")
    handle, _ = await ctx.move(d, "move_rolled_back", rollback_window_s=120)
    await wait_progress(handle, lambda p: p.rollback_open, "the rollback window")
    await handle.execute_update(MigrateChunkWorkflow.rollback)
    result = await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_S)
    assert result.outcome == MigrationOutcome.ROLLED_BACK, result
    return {"move_rolled_back": await handle.fetch_history()}


async def move_cancelled_before_commit(ctx: Ctx) -> dict[str, WorkflowHistory]:
    """Cancelled while replicating (before the cutover): the move aborts."""
    d = await ctx.deployment("move_cancelled_before_commit")
    with lag_held(d.collection):
        handle, _ = await ctx.move(d, "move_cancelled_before_commit")
        await wait_progress(handle, lambda p: p.phase == "replicate", "the replicate phase")
        await handle.cancel()
        try:
            await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_S)
        except WorkflowFailureError:
            pass  # cancelled, as asked
        else:
            raise AssertionError("a move cancelled before its commit point completed")
    progress = await handle.query(MigrateChunkWorkflow.progress)
    assert progress.outcome == MigrationOutcome.ABORTED.value, progress
    return {"move_cancelled_before_commit": await handle.fetch_history()}


async def move_cancelled_after_commit(ctx: Ctx) -> dict[str, WorkflowHistory]:
    """Cancelled in the rollback window (after the commit point): the move finishes."""
    d = await ctx.deployment("move_cancelled_after_commit")
    handle, _ = await ctx.move(d, "move_cancelled_after_commit", rollback_window_s=120)
    await wait_progress(handle, lambda p: p.rollback_open, "the rollback window")
    await handle.cancel()
    result = await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_S)
    assert result.outcome == MigrationOutcome.COMPLETED, result
    return {"move_cancelled_after_commit": await handle.fetch_history()}


async def move_target_lost(ctx: Ctx) -> dict[str, WorkflowHistory]:
    """The target declared lost by an operator while replicating: ``TargetLost``."""
    d = await ctx.deployment("move_target_lost")
    with lag_held(d.collection):
        handle, _ = await ctx.move(d, "move_target_lost")
        await wait_progress(handle, lambda p: p.phase == "replicate", "the replicate phase")
        await handle.execute_update(MigrateChunkWorkflow.target_lost)
        try:
            await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_S)
        except WorkflowFailureError:
            pass  # TargetLost, checked on the history
        else:
            raise AssertionError("a move whose target was declared lost completed")
    return {"move_target_lost": await handle.fetch_history()}


async def move_continued_as_new(ctx: Ctx) -> dict[str, WorkflowHistory]:
    """A long copy passes the history limit: the move continues as new.

    The target's table is locked so the import cannot write while the copy is sampled (as in
    ``test_long_copy_continues_as_new``). Once the run's history passes the limit the run
    stops its activities to continue as new; then the lock goes, and the next run completes
    the move."""
    d = await ctx.deployment("move_continued_as_new")
    target = ctx.target_of(d)
    async with await psycopg.AsyncConnection.connect(d.shards[target].dsn) as lock:
        await lock.execute(sql.SQL("LOCK TABLE {} IN SHARE MODE").format(
            collection_table(d.collection)))
        handle, _ = await ctx.move(d, "move_continued_as_new", docs=2000, part_rows=100,
                                   history_events_limit=50, progress_poll_max_s=0.2)

        async def stopping() -> bool:
            """The run asked its activities to stop: it is about to continue as new."""
            events = [e async for e in handle.fetch_history_events()]
            return any(e.HasField("activity_task_cancel_requested_event_attributes")
                       for e in events)

        await wait_until(stopping, 120, "the run stopping its activities")
        await lock.rollback()
    await wait_progress(handle, lambda p: p.run >= 2, "a second run")
    result = await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_S)
    assert result.outcome == MigrationOutcome.COMPLETED, result
    runs = await runs_of(ctx.client, handle)
    assert len(runs) >= 2, len(runs)
    return {"move_continued_as_new_first": runs[0], "move_continued_as_new_last": runs[-1]}


async def drain(ctx: Ctx, fleet: Fleet, workflow_id: str, **kw: Any
                ) -> WorkflowHandle[Any, Any]:
    """Drain the fleet's old shards onto its new ones to the end (every old shard retired)."""
    handle = await ctx.client.start_workflow(
        DrainShardWorkflow.run,
        DrainShardInput(shards=fleet.old, targets=fleet.new, move=FAST, **kw),
        id=workflow_id, task_queue=ctx.task_queue)
    result = await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_S)
    assert sorted(result.retired) == sorted(fleet.old), result
    return handle


async def drain_merge_completed(ctx: Ctx) -> dict[str, WorkflowHistory]:
    """A merge: one shard's three chunks drained onto two others, two moves at a time."""
    fleet = await ctx.fleet("drain_merge", old=1, new=2, chunks_per_shard=3)
    handle = await drain(ctx, fleet, "drain_merge_completed", max_parallel=2)
    return {"drain_merge_completed": await handle.fetch_history()}


async def drain_continued_as_new(ctx: Ctx) -> dict[str, WorkflowHistory]:
    """A drain limited to one move per run: it continues as new between moves."""
    fleet = await ctx.fleet("drain_can", old=1, new=1, chunks_per_shard=2)
    handle = await drain(ctx, fleet, "drain_continued_as_new", max_parallel=1,
                         limits=RunLimits(moves_per_run=1))
    runs = await runs_of(ctx.client, handle)
    assert len(runs) >= 2, len(runs)
    return {"drain_continued_as_new_first": runs[0], "drain_continued_as_new_last": runs[-1]}


async def rebalance_completed(ctx: Ctx) -> dict[str, WorkflowHistory]:
    """Four loaded chunks on one shard, another empty: the rebalance moves some over."""
    fleet = await ctx.fleet("rebalance", old=1, new=1, chunks_per_shard=4)
    for chunk in (await ctx.catalog.chunk_map(fleet.collection)).chunks:
        load_chunk(fleet.shards[fleet.old[0]].dsn, fleet.collection, chunk.range, 500)
    handle = await ctx.client.start_workflow(
        RebalanceWorkflow.run,
        RebalanceInput(kind=MigrationKind.REBALANCE, collections=[fleet.collection],
                       shards=[*fleet.old, *fleet.new], tolerance=0.3, move=FAST),
        id="rebalance_completed", task_queue=ctx.task_queue)
    result = await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_S)
    assert result.moves and all(m.outcome == MigrationOutcome.COMPLETED.value
                                for m in result.moves), result
    return {"rebalance_completed": await handle.fetch_history()}


async def drain_paged_completed(ctx: Ctx) -> dict[str, WorkflowHistory]:
    """A drain whose plan is stored in the catalog and read back in pages (patch
    ``fleet-plan-pages``): one shard's four chunks onto two others."""
    fleet = await ctx.fleet("drain_paged", old=1, new=2, chunks_per_shard=4)
    handle = await drain(ctx, fleet, "drain_paged_completed", max_parallel=2)
    history = await handle.fetch_history()
    activities = _activity_types(history)
    assert "drain.plan_stored" in activities and "fleet.plan_page" in activities, activities
    return {"drain_paged_completed": history}


async def drain_per_shard_limit_completed(ctx: Ctx) -> dict[str, WorkflowHistory]:
    """Two shards drained onto one with ``RunLimits.max_running_per_shard`` 1: a move starts
    only when both its shards have room, so the moves run one at a time."""
    fleet = await ctx.fleet("drain_limit", old=2, new=1, chunks_per_shard=1)
    handle = await drain(ctx, fleet, "drain_per_shard_limit_completed", max_parallel=4,
                         limits=RunLimits(max_running_per_shard=1))
    return {"drain_per_shard_limit_completed": await handle.fetch_history()}


async def change_indexes_completed(ctx: Ctx) -> dict[str, WorkflowHistory]:
    """``ChangeIndexesWorkflow`` builds an index on every shard holding the collection and
    drops another, as the MongoDB front end's ``createIndexes``/``dropIndexes`` start it."""
    d = await ctx.deployment("change_indexes")
    handle = await ctx.client.start_workflow(
        ChangeIndexesWorkflow.run,
        ChangeIndexesInput(collection=d.collection,
                           create=[IndexDefinition(name="by_name", fields=("name",))],
                           drop=["by_email"]),
        id="change_indexes_completed", task_queue=ctx.task_queue)
    result = await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_S)
    assert [i.name for i in result.indexes] == ["by_name"], result
    return {"change_indexes_completed": await handle.fetch_history()}


def _activity_types(history: WorkflowHistory) -> set[str]:
    return {e.activity_task_scheduled_event_attributes.activity_type.name
            for e in history.events if e.HasField("activity_task_scheduled_event_attributes")}


@dataclass(frozen=True)
class Scenario:
    play: Callable[[Ctx], Awaitable[dict[str, WorkflowHistory]]]
    files: dict[str, Recorded]
    """The histories it writes and what each must show."""


SCENARIOS: dict[str, Scenario] = {
    "move_completed": Scenario(move_completed, {
        "move_completed": Recorded("MigrateChunkWorkflow", COMPLETED, outcome="completed")}),
    "move_pinned_completed": Scenario(move_pinned_completed, {
        "move_pinned_completed": Recorded("MigrateChunkWorkflow", COMPLETED,
                                          outcome="completed")}),
    "move_rolled_back": Scenario(move_rolled_back, {
        "move_rolled_back": Recorded("MigrateChunkWorkflow", COMPLETED, outcome="rolled_back")}),
    "move_cancelled_before_commit": Scenario(move_cancelled_before_commit, {
        "move_cancelled_before_commit": Recorded("MigrateChunkWorkflow", CANCELED,
                                                 cancel_requested=True)}),
    "move_cancelled_after_commit": Scenario(move_cancelled_after_commit, {
        "move_cancelled_after_commit": Recorded("MigrateChunkWorkflow", COMPLETED,
                                                outcome="completed", cancel_requested=True)}),
    "move_target_lost": Scenario(move_target_lost, {
        "move_target_lost": Recorded("MigrateChunkWorkflow", FAILED, failure_type="TargetLost")}),
    "move_continued_as_new": Scenario(move_continued_as_new, {
        "move_continued_as_new_first": Recorded("MigrateChunkWorkflow", CONTINUED),
        "move_continued_as_new_last": Recorded("MigrateChunkWorkflow", COMPLETED,
                                               outcome="completed")}),
    "drain_merge_completed": Scenario(drain_merge_completed, {
        "drain_merge_completed": Recorded("DrainShardWorkflow", COMPLETED)}),
    "drain_continued_as_new": Scenario(drain_continued_as_new, {
        "drain_continued_as_new_first": Recorded("DrainShardWorkflow", CONTINUED),
        "drain_continued_as_new_last": Recorded("DrainShardWorkflow", COMPLETED)}),
    "rebalance_completed": Scenario(rebalance_completed, {
        "rebalance_completed": Recorded("RebalanceWorkflow", COMPLETED)}),
    "drain_paged_completed": Scenario(drain_paged_completed, {
        "drain_paged_completed": Recorded("DrainShardWorkflow", COMPLETED)}),
    "drain_per_shard_limit_completed": Scenario(drain_per_shard_limit_completed, {
        "drain_per_shard_limit_completed": Recorded("DrainShardWorkflow", COMPLETED)}),
    "change_indexes_completed": Scenario(change_indexes_completed, {
        "change_indexes_completed": Recorded("ChangeIndexesWorkflow", COMPLETED)}),
}


def expected_histories() -> dict[str, Recorded]:
    """Every history that must be committed (file name without ``.json``) and what it shows."""
    out = dict(LEGACY)
    for scenario in SCENARIOS.values():
        out.update(scenario.files)
    return out


# -- replay (shared with the replay test) ----------------------------------------------------------


def replay_workflow_id(name: str, history_json: str) -> str:
    """The id to replay a history under: the one its child workflows carry (``{id}/{chunk}``;
    replaying under another id would start differently named children), else ``name``."""
    for event in json.loads(history_json)["events"]:
        attrs = event.get("startChildWorkflowExecutionInitiatedEventAttributes")
        if attrs:
            return str(attrs["workflowId"]).rsplit("/", 1)[0]
    return name


def replayer() -> Replayer:
    return Replayer(workflows=list(ALL_WORKFLOWS), data_converter=pydantic_data_converter)


# -- the recording run -----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def recording_stack() -> AsyncIterator[Ctx]:
    """A private stack and an in-process worker, both gone on exit."""
    reap_abandoned_stacks()
    state = owned_state_dir("record")
    staging = owned_state_dir("staging")
    stack = Stack(state, make_stack_settings(3))
    try:
        await asyncio.to_thread(up_and_provision, stack)
        record = stack.record()
        assert record is not None
        # As the mover role, like the tests' ``pg18_dsns``: collections provisioned as the
        # superuser would not be the mover's, and a move's DDL on them would be refused.
        dsns = [stack.dsn(s.name, "mover") for s in record.servers if s.role == "shard"]
        client = await Client.connect(stack.temporal.address,
                                      data_converter=pydantic_data_converter)
        settings = Settings(catalog_dsn=stack.catalog_dsn, staging_url=str(staging),
                            temporal=TemporalSettings(address=stack.temporal.address,
                                                      task_queue=f"record-{uuid.uuid4().hex[:8]}"))
        catalog = await Catalog(stack.catalog_dsn, max_size=8).open()
        await catalog.ensure_schema()
        stop = asyncio.Event()
        worker = asyncio.create_task(run_worker(settings, stop=stop, client=client))
        ctx = Ctx(client, settings.temporal.task_queue, catalog, dsns)
        try:
            yield ctx
        finally:
            for cleanup in reversed(ctx.cleanups):
                with contextlib.suppress(Exception):
                    await cleanup()
            stop.set()
            await worker
            await catalog.close()
    finally:
        try:
            await asyncio.to_thread(stack.down)
        finally:
            shutil.rmtree(state, ignore_errors=True)
            shutil.rmtree(staging, ignore_errors=True)


async def record(names: list[str], out: Path) -> int:
    async with recording_stack() as ctx:
        for name in names:
            scenario = SCENARIOS[name]
            print(f"recording {name} ...", flush=True)
            histories = await scenario.play(ctx)
            assert set(histories) == set(scenario.files), (sorted(histories), name)
            for file, history in histories.items():
                text = history.to_json()
                # Replayed with the current code first: a history it cannot replay is no proof.
                await replayer().replay_workflow(
                    WorkflowHistory.from_json(replay_workflow_id(file, text), text))
                path = out / f"{file}.json"
                tmp = path.with_suffix(".json.tmp")
                tmp.write_text(text)
                tmp.rename(path)
                print(f"  wrote {path} ({len(history.events)} events)", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.workflows.record_histories",
        description="Record the histories the replay tests replay (new scenarios only).")
    parser.add_argument("names", nargs="*", help="scenarios to record (default: every one "
                                                 "with a history missing)")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--out", type=Path, default=HISTORIES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    def recorded(name: str) -> list[str]:
        return [f for f in SCENARIOS[name].files if (args.out / f"{f}.json").exists()]

    if args.list:
        for name, scenario in SCENARIOS.items():
            have = recorded(name)
            state = "recorded" if len(have) == len(scenario.files) else \
                "partly recorded" if have else "not recorded"
            print(f"{name:32} {state:16} {scenario.play.__doc__.splitlines()[0]}")
        for name in LEGACY:
            print(f"{name:32} {'recorded':16} (earlier code; never re-recorded)")
        return 0
    unknown = [n for n in args.names if n not in SCENARIOS]
    if unknown:
        print(f"error: no scenario {', '.join(unknown)} (see --list)", file=sys.stderr)
        return 2
    names = args.names or [n for n in SCENARIOS if not recorded(n)]
    existing = [f"{args.out / f}.json" for n in names for f in recorded(n)]
    if existing:
        print("error: already recorded: " + ", ".join(existing) + ". Committed histories are "
              "never re-recorded: a replay failure means the workflow change needs "
              "workflow.patched. Remove a file with git rm first only to retire its scenario "
              "on purpose.", file=sys.stderr)
        return 2
    if not names:
        print("every scenario is recorded; nothing to do")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    return asyncio.run(record(names, args.out))


if __name__ == "__main__":
    sys.exit(main())
