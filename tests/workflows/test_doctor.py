"""``shardshift doctor``: leftovers made by hand on the real servers are found, each with the
right action, ``--repair`` removes what is safe and explains the rest, a second run is clean,
an unreachable shard is a finding (not a crash), and a running move is never touched."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from temporalio.client import Client, WorkflowExecutionStatus

from activities.doctor import Doctor
from activities.doctor_findings import FindingKind, format_report
from catalog.invariants import assert_invariants
from catalog.models import (
    Chunk,
    MigrationKind,
    MigrationOutcome,
    MigrationPhase,
    MigrationRecord,
    ShardState,
)
from catalog.store.plans import StoredMove
from infra import Stack
from infra.postgres import SUPERUSER
from router.hashing import khash
from settings import Settings
from shards.models import FenceState
from shards.postgres import PostgresShard
from shards.postgres.replication import (
    cleanup_stream_objects,
    create_publication,
    create_slot,
    migration_prefix,
    stream_names,
)
from shards.postgres.roles import as_role
from shards.postgres.stream_control import ensure_apply_schema, release_hold
from shards.staging import Staging
from tests.router.conftest import Deployment
from tests.workflows.conftest import WorkerHandle
from tests.workflows.helpers import stream_objects
from tests.workflows.procs import chunk_keys, poll_progress, preload_chunk
from workflows import (
    ChangeIndexesInput,
    ChangeIndexesWorkflow,
    DrainShardInput,
    DrainShardWorkflow,
    MigrateChunkInput,
    MigrateChunkWorkflow,
)
from workflows.migrate_chunk import migration_id_for

FAST = {"poll_s": 0.2, "cutover_retry_s": 0.2, "part_rows": 500}


async def doctor(stack: Stack, settings: Settings, *args: str) -> tuple[int, str]:
    """Run ``shardshift doctor ARGS`` as an operator would (a process, settings from env)."""
    env = {**os.environ, "SHARDSHIFT_CATALOG_DSN": stack.catalog_dsn,
           "SHARDSHIFT_TEMPORAL__ADDRESS": stack.temporal.address,
           "SHARDSHIFT_STATE_DIR": str(stack.state_dir),
           "SHARDSHIFT_STAGING_URL": settings.staging}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", "doctor", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode in (0, 1), (proc.returncode, out.decode(), err.decode())
    return proc.returncode, out.decode()


async def doctor_json(stack: Stack, settings: Settings, *args: str) -> tuple[int, dict[str, Any]]:
    rc, out = await doctor(stack, settings, "--json", *args)
    report = json.loads(out)
    assert report["clean"] == (rc == 0), report
    return rc, report


def by_key(report: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(f["kind"], f["object"]): f for f in report["findings"]}


def leave_stream(source_dsn: str, target_dsn: str, migration_id: str, chunk: Chunk) -> str:
    """What a move's replicate phase leaves: publication + slot on the source, origin and
    stream_state row on the target. Returns the stream's name."""
    names = stream_names(migration_id, "fwd")
    create_publication(source_dsn, names, chunk.collection, chunk.chunk_id, chunk.range)
    with create_slot(source_dsn, names, export_snapshot=False):
        pass
    with psycopg.connect(target_dsn, autocommit=True) as conn:
        ensure_apply_schema(conn)
        conn.execute("SELECT pg_replication_origin_create(%s)", (names.origin,))
        conn.execute("INSERT INTO shardshift.stream_state (stream, migration_id) VALUES (%s, %s)",
                     (names.origin, migration_id))
    return names.name


def import_rows(dsn: str, migration_id: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM shardshift.import_parts WHERE migration_id = %s",
                           (migration_id,)).fetchone()
        return int(row[0]) if row else 0


async def dead_move(deployment: Deployment, settings: Settings, chunk: Chunk, target: str,
                    rows: int) -> str:
    """An active migration record whose workflow never existed, with everything a move in
    replicate leaves: expired leases, stream objects, a receiving fence and a partial copy
    on the target, import rows and a staging directory. Returns the migration id."""
    cat, c = deployment.catalog, deployment.collection
    holder = f"move-{c}-{chunk.chunk_id}"
    mid = f"{holder}.{uuid.uuid4().hex[:12]}"
    source_dsn, target_dsn = deployment.shards[chunk.shard_id].dsn, deployment.shards[target].dsn
    await cat.register_migration(mid, kind=MigrationKind.MOVE, collection=c,
                                 chunk_id=chunk.chunk_id, source=chunk.shard_id, target=target)
    await cat.set_migration_phase(mid, MigrationPhase.REPLICATE)
    await cat.take_leases(mid, [chunk.shard_id, target], holder=holder,
                          ttl=timedelta(seconds=1), now=datetime.now(UTC) - timedelta(hours=1))
    await asyncio.to_thread(leave_stream, source_dsn, target_dsn, mid, chunk)
    await deployment.shards[target].put_fence(c, chunk.chunk_id, chunk.range, chunk.token,
                                              FenceState.RECEIVING, migration_id=mid)
    await asyncio.to_thread(preload_chunk, target_dsn, c, chunk, rows)
    with psycopg.connect(target_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO shardshift.import_parts (migration_id, part, rows)"
                     " VALUES (%s, 0, %s)", (mid, rows))
    Staging(settings.staging).write_manifest(mid, b"{}")
    return mid


def drop_all(dsns: list[str], *migration_ids: str) -> None:
    """Test teardown: whatever a failed assertion left of these migrations on the servers
    (an applier that is still stopping keeps its origin busy for a moment)."""
    deadline = time.monotonic() + 30
    for dsn in dsns:
        for mid in migration_ids:
            while True:
                try:
                    cleanup_stream_objects(dsn, mid)
                    break
                except psycopg.errors.ObjectInUse:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)  # polling for the applier's exit, with a deadline


async def test_doctor_finds_and_repairs_leftovers(
    deployment: Deployment, worker_settings: Settings, stack: Stack
) -> None:
    cat, c, shards = deployment.catalog, deployment.collection, deployment.shards
    s0, s1, s2 = list(shards)
    dsn = {s: e.dsn for s, e in shards.items()}
    cmap = deployment.initial
    (a, e), (b, f), (g, h) = (cmap.on_shard(s) for s in (s0, s1, s2))
    await asyncio.to_thread(preload_chunk, dsn[s0], c, a, 40)  # the source's own data
    # 1. A move of a (s0 -> s1) whose workflow is gone, in replicate.
    mid = await dead_move(deployment, worker_settings, a, s1, rows=25)
    ghost = f"ghost-{uuid.uuid4().hex[:8]}.{uuid.uuid4().hex[:12]}"
    try:
        # 2. Stream objects of no migration the catalog knows (publication on s2 names c).
        ghost_name = await asyncio.to_thread(leave_stream, dsn[s2], dsn[s0], ghost, e)
        # 3. b frozen on its owner by a cutover that never committed.
        await shards[s1].freeze(c, b.chunk_id, b.token)
        # 4. Rows of g on s0, which neither owns nor receives it (an abort whose target was
        #    down): no fence at all.
        await asyncio.to_thread(preload_chunk, dsn[s0], c, g, 7)
        # 5. The old owner of h after a committed switch whose cleanup never ran.
        await shards[s0].put_fence(c, h.chunk_id, h.range, h.token, FenceState.FROZEN)
        await asyncio.to_thread(preload_chunk, dsn[s0], c, h, 5)
        # 6. An active fence of f on a non-owner at the catalog's token: not a fact the doctor
        #    can judge, so it reports it and touches nothing.
        await shards[s2].put_fence(c, f.chunk_id, f.range, f.token, FenceState.ACTIVE)
        name = stream_names(mid).name

        rc, text = await doctor(stack, worker_settings, "--collection", c)
        assert rc == 1, text
        assert "[FOUND] slot" in text and "run with --repair" in text, text

        rc, report = await doctor_json(stack, worker_settings, "--collection", c)
        assert rc == 1
        found = by_key(report)
        staged = next(k for k in found if k[0] == "staging")
        assert staged[1].endswith(mid)
        expected = {
            ("slot", name): (s0, "drop the slot"),
            ("publication", name): (s0, "drop the publication"),
            ("origin", name): (s1, "drop the origin and its stream_state row"),
            ("slot", ghost_name): (s2, "drop the slot"),
            ("publication", ghost_name): (s2, "drop the publication"),
            ("origin", ghost_name): (s0, "drop the origin"),
            ("fence", f"{c}/{a.chunk_id}"): (s1, "retire the fence, delete its rows"),
            ("fence", f"{c}/{b.chunk_id}"): (s1, f"unfreeze to token {b.token}"),
            ("rows", f"{c}/{g.chunk_id}"): (s0, "delete them"),
            ("fence", f"{c}/{h.chunk_id}"): (s0, "retire the fence and delete its rows"),
            ("fence", f"{c}/{f.chunk_id}"): (s2, "none:"),
            ("import_parts", mid): (s1, "delete the rows"),
            staged: (None, "remove the directory"),
            ("lease", f"{mid}@{s0}"): (s0, "release"),
            ("lease", f"{mid}@{s1}"): (s1, "release"),
            ("migration", mid): (s0, "clean what it left"),
        }
        assert set(found) == set(expected), sorted(set(found) ^ set(expected))
        for key, (shard, action) in expected.items():
            assert found[key]["shard"] == shard, found[key]
            assert found[key]["action"].startswith(action), found[key]
            assert found[key]["repaired"] is False
        assert "aborted" in found[("migration", mid)]["action"]
        assert "no migration the catalog knows" in found[("slot", ghost_name)]["detail"]
        assert "25 rows" in found[("fence", f"{c}/{a.chunk_id}")]["detail"]
        assert "7 rows" in found[("rows", f"{c}/{g.chunk_id}")]["detail"]
        assert "expired" in found[("lease", f"{mid}@{s0}")]["detail"]

        # Without the collection filter the same findings are among everything else.
        rc, everything = await doctor_json(stack, worker_settings)
        assert rc == 1 and set(expected) <= set(by_key(everything))

        rc, report = await doctor_json(stack, worker_settings, "--repair", "--collection", c)
        assert rc == 1, report  # the one fence it will not touch remains
        repaired = by_key(report)
        assert set(repaired) == set(expected)
        left = [k for k, v in repaired.items() if not v["repaired"]]
        assert left == [("fence", f"{c}/{f.chunk_id}")], report

        # Every leftover is gone, and nothing served was touched.
        for s in (s0, s1, s2):
            assert stream_objects([dsn[s]], migration_prefix(mid)) == []
            assert stream_objects([dsn[s]], migration_prefix(ghost)) == []
        assert await shards[s1].fence(c, a.chunk_id) is None
        assert await shards[s1].count(c, a.range) == 0
        assert await shards[s0].count(c, a.range) == 40
        fb = await shards[s1].fence(c, b.chunk_id)
        assert fb is not None and (fb.state, fb.token) == (FenceState.ACTIVE, b.token)
        assert await shards[s0].count(c, g.range) == 0
        assert await shards[s0].count(c, h.range) == 0
        fh = await shards[s0].fence(c, h.chunk_id)
        assert fh is not None and fh.state == FenceState.RETIRED
        assert import_rows(dsn[s1], mid) == 0
        assert Staging(worker_settings.staging).read_manifest(mid) is None
        record = await cat.migration(mid)
        assert record.outcome == MigrationOutcome.ABORTED and "doctor" in (record.detail or "")
        assert await cat.leases(migration_id=mid, live_only=False) == []

        # The operator fixes the one it explained; the next run is clean.
        await shards[s2].drop_fence(c, f.chunk_id)
        await assert_invariants(cat, c, shards)
        rc, report = await doctor_json(stack, worker_settings, "--collection", c)
        assert (rc, report) == (0, {"findings": [], "clean": True})
        rc, text = await doctor(stack, worker_settings, "--collection", c)
        assert rc == 0 and text.startswith("clean"), text
    finally:
        await asyncio.to_thread(drop_all, list(dsn.values()), mid, ghost)


async def test_doctor_reports_an_unreachable_target_and_cleans_it_when_back(
    deployment: Deployment, worker_settings: Settings, stack: Stack
) -> None:
    """The target of an aborted move was down during the abort: the doctor reports the shard,
    cleans the source side, keeps the record open; once the target is back it cleans the
    partial copy there and closes the record."""
    cat, c, shards = deployment.catalog, deployment.collection, deployment.shards
    s0, s1, _ = list(shards)
    a = deployment.initial.on_shard(s0)[0]
    mid = await dead_move(deployment, worker_settings, a, s1, rows=12)
    pg = stack.instance_for_dsn(shards[s1].dsn)
    try:
        await asyncio.to_thread(pg.stop, 30)
        rc, report = await doctor_json(stack, worker_settings, "--repair", "--collection", c)
        assert rc == 1
        found = by_key(report)
        down = [f for f in report["findings"] if f["kind"] == "shard_unreachable"]
        assert len(down) == 1 and s1 in down[0]["object"] and not down[0]["repaired"], report
        name = stream_names(mid).name
        assert found[("slot", name)]["repaired"] and found[("publication", name)]["repaired"]
        assert found[("staging", next(k[1] for k in found if k[0] == "staging"))]["repaired"]
        closing = found[("migration", mid)]
        assert not closing["repaired"] and "could not be inspected" in closing["action"], closing
        assert (await cat.migration(mid)).active
        assert stream_objects([shards[s0].dsn], migration_prefix(mid)) == []
    finally:
        await asyncio.to_thread(pg.start, 60)
    # The pool's connections to the restarted server are dead; a fresh engine reads it.
    async with PostgresShard(s1, shards[s1].dsn, max_size=1) as target:
        assert (await target.fence(c, a.chunk_id)) is not None  # still there: it was down
        rc, report = await doctor_json(stack, worker_settings, "--repair", "--collection", c)
        assert rc == 0, report
        assert {f["kind"] for f in report["findings"]} == {
            "origin", "fence", "import_parts", "migration"}, report
        assert await target.fence(c, a.chunk_id) is None
        assert await target.count(c, a.range) == 0
    assert (await cat.migration(mid)).outcome == MigrationOutcome.ABORTED
    rc, report = await doctor_json(stack, worker_settings, "--collection", c)
    assert (rc, report["findings"]) == (0, [])


async def test_doctor_leaves_a_running_move_alone(
    deployment: Deployment, worker: WorkerHandle, temporal_client: Client, stack: Stack
) -> None:
    """A move held in replicate, then in its rollback window: the doctor reports nothing of
    it, ``--repair`` changes nothing, and the move then completes with every document."""
    cat, c, shards = deployment.catalog, deployment.collection, deployment.shards
    moving = deployment.initial.chunks[0]
    source = shards[moving.shard_id]
    target_id = next(s for s in shards if s != moving.shard_id)
    target = shards[target_id]
    docs = await asyncio.to_thread(preload_chunk, source.dsn, c, moving, 60)
    wf_id = f"move-{c}-{uuid.uuid4().hex[:6]}"
    handle = await temporal_client.start_workflow(
        MigrateChunkWorkflow.run,
        # A short lag window: progress reports the lag at the end of each window, so the
        # lag built below shows within seconds (the default window is a minute).
        MigrateChunkInput(collection=c, chunk_id=moving.chunk_id, target=target_id,
                          max_lag_bytes=1024 * 1024, rollback_window_s=300, lag_window_s=2.0,
                          **FAST),
        id=wf_id, task_queue=worker.task_queue)
    mid = migration_id_for(wf_id, handle.result_run_id or "")
    names = stream_names(mid, "fwd")
    try:
        # Hold the applier before it starts (a test hook: the applier reads its hold from
        # this row), then commit a write the stream must deliver: the applier cannot pass
        # it, so the move stays in replicate, lagging, until the hold is released.
        with psycopg.connect(target.dsn, autocommit=True) as conn:
            ensure_apply_schema(conn)
            conn.execute("INSERT INTO shardshift.stream_state (stream, migration_id, hold_at_lsn)"
                         " VALUES (%s, %s, '0/1')", (names.origin, mid))
        # The manifest is written inside the slot's exported snapshot: a write committed
        # after it is not in the copy, so the stream must deliver it.
        staging = Staging(worker.settings.staging)
        await poll_progress(handle, lambda _p: staging.read_manifest(mid) is not None,
                            timeout=120, what="the move's snapshot")
        late = chunk_keys(moving, 1, "late")[0]
        await source.insert(c, moving.ref, khash(late), {"_id": "late", "acct": late})
        # A WAL segment switch is the superuser's (test setup, not something a move does).
        with psycopg.connect(as_role(source.dsn, SUPERUSER), autocommit=True) as conn:
            # Two segment switches put the source's WAL position >= 16 MiB past the held
            # write, far over the admission limit.
            for _ in range(2):
                conn.execute("SELECT pg_logical_emit_message(false, 'doctor-test', 'x')")
                conn.execute("SELECT pg_switch_wal()")
        await poll_progress(handle, lambda p: p.phase == "replicate"
                            and (p.lag_bytes or 0) > 1024 * 1024, timeout=120,
                            what="replicate, lagging")

        for phase in ("replicate", "rollback_window"):
            rc, report = await doctor_json(stack, worker.settings, "--repair",
                                           "--collection", c)
            assert (rc, report["findings"]) == (0, []), (phase, report)
            assert len(stream_objects([source.dsn if phase == "replicate" else target.dsn],
                                      migration_prefix(mid))) >= 2, phase
            assert (await cat.migration(mid)).active
            if phase == "replicate":
                fence = await target.fence(c, moving.chunk_id)
                assert fence is not None and fence.state == FenceState.RECEIVING
                await asyncio.to_thread(release_hold, target.dsn, names)
                await poll_progress(handle, lambda p: p.phase == "rollback_window",
                                    timeout=180, what="rollback window")
        await handle.cancel()  # after the commit point: finishes the move
        result = await asyncio.wait_for(handle.result(), 180)
    finally:
        if (await handle.describe()).status == WorkflowExecutionStatus.RUNNING:
            await handle.terminate("test teardown")
            await asyncio.to_thread(drop_all, [source.dsn, target.dsn], mid)
    assert result.outcome == MigrationOutcome.COMPLETED, result
    assert await target.count(c, moving.range) == docs + 1
    assert await source.count(c, moving.range) == 0
    rc, report = await doctor_json(stack, worker.settings, "--collection", c)
    assert (rc, report["findings"]) == (0, []), report


async def test_doctor_touches_nothing_of_a_move_it_cannot_judge(
    deployment: Deployment, worker_settings: Settings
) -> None:
    """When Temporal cannot say whether a workflow runs a migration, the migration counts as
    running: it is reported, and nothing of it (stream, fence, partial copy) is touched."""
    cat, c, shards = deployment.catalog, deployment.collection, deployment.shards
    s0, s1, _ = list(shards)
    a = deployment.initial.on_shard(s0)[0]
    mid = await dead_move(deployment, worker_settings, a, s1, rows=9)

    async def temporal_down(record: MigrationRecord, workflow_ids: Sequence[str]) -> bool:
        raise ConnectionError("Temporal is unreachable")

    try:
        doc = Doctor(cat, Staging(worker_settings.staging), temporal_down, collections=[c])
        report = await doc.run(repair=True)
        print("\n" + format_report(report, repair=True))
        assert [(f.kind, f.object, f.repaired) for f in report.findings] == [
            (FindingKind.MIGRATION, mid, False)]
        assert "cannot tell" in report.findings[0].detail
        assert report.findings[0].action.startswith("none:")
        assert not report.clean
        assert len(stream_objects([shards[s0].dsn], migration_prefix(mid))) == 2  # slot, pub
        fence = await shards[s1].fence(c, a.chunk_id)
        assert fence is not None and fence.state == FenceState.RECEIVING
        assert await shards[s1].count(c, a.range) == 9
        assert Staging(worker_settings.staging).read_manifest(mid) is not None
        assert (await cat.migration(mid)).active
    finally:
        await asyncio.to_thread(drop_all, [shards[s0].dsn, shards[s1].dsn], mid)


async def test_doctor_drops_the_plan_of_a_fleet_operation_that_no_longer_runs(
    deployment: Deployment, worker_settings: Settings, stack: Stack, temporal_client: Client
) -> None:
    """A drain stores its plan in the catalog and drops it when it ends; a terminated one
    left it for good. The doctor reports the plan of an operation that no longer runs
    (terminated, never existed, or a later run under the same id) and ``--repair`` drops it;
    the plan of an operation that runs is neither reported nor touched."""
    cat, c = deployment.catalog, deployment.collection
    chunk = deployment.initial.chunks[0]
    moves = [StoredMove(collection=c, chunk_id=chunk.chunk_id, source=chunk.shard_id,
                        target="elsewhere", bytes=10)]
    queue = f"no-worker-{uuid.uuid4().hex[:8]}"  # nobody polls it: a started run stays running
    tag = uuid.uuid4().hex[:8]

    async def start(name: str) -> Any:
        return await temporal_client.start_workflow(
            ChangeIndexesWorkflow.run, ChangeIndexesInput(collection=c),
            id=f"{name}-{tag}", task_queue=queue)

    running, terminated = await start("drain-running"), await start("drain-terminated")
    await terminated.terminate("as an operator might")
    reused = await start("drain-reused")
    await reused.terminate("first run")
    reused_again = await start("drain-reused")  # the same id, a new chain: another operation
    plans = {
        "running": f"{running.id}@{running.first_execution_run_id}",
        "terminated": f"{terminated.id}@{terminated.first_execution_run_id}",
        "never_ran": f"drain-nobody-{tag}@{uuid.uuid4()}",
        "reused": f"{reused.id}@{reused.first_execution_run_id}",
    }
    try:
        for plan_id in plans.values():
            await cat.save_plan(plan_id, 1, moves * 2)
        ours = set(plans.values())  # the session's catalog is shared: judge only our plans
        rc, report = await doctor_json(stack, worker_settings)
        found = {f["object"]: f for f in report["findings"]
                 if f["kind"] == "fleet_plan" and f["object"] in ours}
        assert set(found) == {plans["terminated"], plans["never_ran"], plans["reused"]}, found
        assert rc == 1 and "2 planned move(s)" in found[plans["terminated"]]["detail"]
        assert not any(f["repaired"] for f in found.values())
        assert set(await cat.plan_ids()) >= set(plans.values())  # a report changes nothing

        rc, report = await doctor_json(stack, worker_settings, "--repair")
        found = {f["object"]: f for f in report["findings"]
                 if f["kind"] == "fleet_plan" and f["object"] in ours}
        assert all(f["repaired"] for f in found.values()) and len(found) == 3, found
        left = await cat.plan_ids()
        assert plans["running"] in left and left[plans["running"]] == 2
        assert not {plans["terminated"], plans["never_ran"], plans["reused"]} & set(left)
        # a collection-scoped run leaves plans alone (they are an operation's, not a chunk's)
        await running.terminate("done")
        rc, report = await doctor_json(stack, worker_settings, "--collection", c)
        assert not [f for f in report["findings"] if f["kind"] == "fleet_plan"]
        assert plans["running"] in await cat.plan_ids()
    finally:
        for handle in (running, reused_again):
            with contextlib.suppress(Exception):
                await handle.terminate("test teardown")
        for plan_id in plans.values():
            await cat.drop_plan(plan_id)


async def test_doctor_reactivates_a_shard_a_terminated_drain_left_draining(
    deployment: Deployment, worker_settings: Settings, stack: Stack, temporal_client: Client
) -> None:
    """A drain that is cancelled or fails sets its shards active again; a terminated one
    leaves them ``draining`` for good, and a draining shard receives no chunks. The doctor
    reports a draining shard that no running drain names, and ``--repair`` sets it active;
    the shard of a drain that runs (here one whose workers are all down) is left alone."""
    cat = deployment.catalog
    kept, left = sorted(deployment.shards)[:2]
    queue = f"no-worker-{uuid.uuid4().hex[:8]}"  # nobody polls it: the drain stays running
    running = await temporal_client.start_workflow(
        DrainShardWorkflow.run, DrainShardInput(shards=[kept]),
        id=f"drain-{uuid.uuid4().hex[:8]}", task_queue=queue)

    async def found(*args: str) -> tuple[int, dict[str, dict[str, Any]]]:
        rc, report = await doctor_json(stack, worker_settings, *args)
        return rc, {f["object"]: f for f in report["findings"]
                    if f["kind"] == "draining_shard" and f["object"] in (kept, left)}

    try:
        for shard in (kept, left):
            await cat.set_shard_state(shard, ShardState.DRAINING)
        rc, ours = await found()
        assert rc == 1 and set(ours) == {left}, ours
        assert "no running drain" in ours[left]["detail"] and not ours[left]["repaired"]
        assert (await cat.shard(left)).state == ShardState.DRAINING  # a report changes nothing

        rc, ours = await found("--repair")
        assert set(ours) == {left} and ours[left]["repaired"], ours
        assert (await cat.shard(left)).state == ShardState.ACTIVE
        assert (await cat.shard(kept)).state == ShardState.DRAINING

        await running.terminate("as an operator might")
        rc, ours = await found("--repair")
        assert set(ours) == {kept} and ours[kept]["repaired"], ours
        assert (await cat.shard(kept)).state == ShardState.ACTIVE
    finally:
        with contextlib.suppress(Exception):
            await running.terminate("test teardown")
        for shard in (kept, left):
            if (await cat.shard(shard)).state == ShardState.DRAINING:
                await cat.set_shard_state(shard, ShardState.ACTIVE)
