"""``shardshift verify`` and ``catalog check`` against the session stack, and the verification
report every move records (catalog ``verifications`` and ``MigrateChunkResult``)."""

from __future__ import annotations

import asyncio
import json

import psycopg
from psycopg import sql
from temporalio.client import Client

from catalog.models import MigrationKind, MigrationOutcome, MigrationPhase
from infra import Stack
from shards.postgres.stream_control import read_state
from tests.router.conftest import Deployment
from tests.workflows.cli_run import cli_env, shardshift
from tests.workflows.conftest import WorkerHandle
from tests.workflows.helpers import load_chunk, other_shard
from tests.workflows.helpers import start_worker_move as start_move
from tests.workflows.streams import Streamed


def delete_one(dsn: str, collection: str, key_id: str) -> int:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql.SQL("DELETE FROM docs.{} WHERE id = %s").format(
            sql.Identifier(collection)), (key_id,)).rowcount


async def test_settled_chunk_checksums_and_orphans(deployment: Deployment, stack: Stack) -> None:
    d = deployment
    chunk = d.initial.chunks[0]
    other = other_shard(d, chunk.shard_id)
    await asyncio.to_thread(load_chunk, d.shards[chunk.shard_id].dsn, d.collection, chunk.range, 40)
    env = cli_env(stack)
    ran = await shardshift(env, "verify", "--collection", d.collection, "--chunk",
                           str(chunk.chunk_id), "--json")
    assert ran.code == 0, ran
    [report] = json.loads(ran.out)["reports"]
    assert (report["kind"], report["shard_id"], report["ok"], report["orphans"]) == (
        "settled", chunk.shard_id, True, {})
    assert report["documents"] == await d.shards[chunk.shard_id].count(d.collection, chunk.range)
    assert report["digest"] and report["verification_id"]

    # Rows of the chunk's range on a shard that does not own it: orphans, exit 1.
    await asyncio.to_thread(load_chunk, d.shards[other].dsn, d.collection, chunk.range, 6)
    stray = await d.shards[other].count(d.collection, chunk.range)
    ran = await shardshift(env, "verify", "--collection", d.collection, "--json")
    assert ran.code == 1, ran
    reports = {r["chunk_id"]: r for r in json.loads(ran.out)["reports"]}
    assert set(reports) == {c.chunk_id for c in d.initial.chunks}
    assert reports[chunk.chunk_id]["orphans"] == {other: stray}
    assert not reports[chunk.chunk_id]["ok"]
    assert all(r["ok"] for k, r in reports.items() if k != chunk.chunk_id)

    # The recorded report, by its number; the layout and fences are fine throughout.
    ran = await shardshift(env, "verify", "--show", str(reports[chunk.chunk_id]["verification_id"]))
    assert ran.code == 0 and "NOT OK" in ran.out and other in ran.out, ran
    ran = await shardshift(env, "catalog", "check", "--collection", d.collection, "--json")
    assert ran.code == 0 and json.loads(ran.out) == {"ok": True, "violations": []}, ran


async def test_catalog_check_reports_a_broken_fence(deployment: Deployment, stack: Stack) -> None:
    d = deployment
    chunk = d.initial.chunks[1]
    await d.shards[chunk.shard_id].drop_fence(d.collection, chunk.chunk_id)
    ran = await shardshift(cli_env(stack), "catalog", "check", "--collection", d.collection,
                           "--json")
    assert ran.code == 1, ran
    found = json.loads(ran.out)["violations"]
    assert [(v["kind"], v["chunk_id"], v["shard_id"]) for v in found] == [
        ("fence_missing", chunk.chunk_id, chunk.shard_id)]
    ran = await shardshift(cli_env(stack), "catalog", "check", "--collection", d.collection,
                           "--layout-only")
    assert ran.code == 0 and "consistent" in ran.out, ran


async def test_in_flight_move_compared_at_one_lsn(streamed: Streamed,
                                                  stack: Stack) -> None:
    s = streamed
    d, spec = s.deployment, s.spec
    await d.catalog.register_migration(spec.migration_id, kind=MigrationKind.MOVE,
                                       collection=spec.collection, chunk_id=spec.chunk_id,
                                       source=spec.source, target=spec.target)
    try:
        await d.catalog.set_migration_phase(spec.migration_id, MigrationPhase.REPLICATE)
        env = cli_env(stack)
        args = ("verify", "--collection", spec.collection, "--chunk", str(spec.chunk_id),
                "--json")
        ran = await shardshift(env, *args)
        assert ran.code == 0, ran
        [report] = json.loads(ran.out)["reports"]
        assert (report["kind"], report["source"], report["shard_id"], report["ok"],
                report["mismatched_buckets"]) == ("in_flight", spec.source, spec.target, True, 0)
        assert report["lsn"] and report["documents"] == len(s.rows(s.source_dsn))
        state = read_state(s.target_dsn, s.names)
        assert state is not None and not state.held  # the applier runs again
        await s.write(s.keys[0], 4242)  # and still applies
        await asyncio.to_thread(s.caught_up)
        assert s.rows(s.target_dsn) == s.rows(s.source_dsn)

        # A row lost on the target (behind the stream's back): one bucket differs, exit 1.
        assert await asyncio.to_thread(delete_one, s.target_dsn, spec.collection,
                                       json.dumps(s.keys[1]))
        ran = await shardshift(env, *args)
        assert ran.code == 1, ran
        [report] = json.loads(ran.out)["reports"]
        assert (report["ok"], report["mismatched_buckets"]) == (False, 1), report
        recorded = await d.catalog.verifications(migration_id=spec.migration_id)
        assert [r.ok for r in recorded] == [False, True]
    finally:
        await d.catalog.finish_migration(spec.migration_id, MigrationOutcome.ABORTED)


async def test_a_move_records_its_verification(deployment: Deployment, worker: WorkerHandle,
                                               temporal_client: Client, stack: Stack) -> None:
    d = deployment
    chunk = d.initial.chunks[0]
    target = other_shard(d, chunk.shard_id)
    await asyncio.to_thread(load_chunk, d.shards[chunk.shard_id].dsn, d.collection, chunk.range, 30)
    handle = await start_move(temporal_client, worker, d.collection, chunk.chunk_id, target)
    result = await asyncio.wait_for(handle.result(), 180)
    v = result.verification
    assert v is not None and v.verified and v.verification_id is not None
    [report] = await d.catalog.verifications(migration_id=result.migration_id)
    assert (report.verification_id, report.kind.value, report.lsn, report.documents,
            report.source, report.shard_id, report.ok) == (
        v.verification_id, "move", v.lsn, v.documents, chunk.shard_id, target, True)
    ran = await shardshift(cli_env(stack), "verify", "--show", result.migration_id, "--json")
    assert ran.code == 0, ran
    assert [r["verification_id"] for r in json.loads(ran.out)["reports"]] == [v.verification_id]
