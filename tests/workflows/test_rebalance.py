"""``RebalanceWorkflow``: the planner's logic, a rebalance under load judged by the checker, a
split of a chunk too large to move usefully, and a Temporal Schedule that runs it."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid

import pytest
from temporalio.client import Client, WorkflowFailureError

from activities.fleet import plan_rebalance
from catalog import Catalog
from catalog.models import MigrationKind, MigrationOutcome
from infra import Stack
from tests.workflows.conftest import WorkerHandle
from tests.workflows.fleet import Fleet, make_fleet, run_under_load
from tests.workflows.helpers import FAST, load_chunk, stream_objects, wait_until
from workflows import RebalanceInput, RebalanceResult, RebalanceWorkflow
from workload.checker import check, collect_stored

RESULT_TIMEOUT_S = 240

# -- 1. the planner (pure logic) -------------------------------------------------------------


def test_balanced_shards_need_no_move() -> None:
    plan = plan_rebalance({"a": [("c", 1, 100)], "b": [("c", 2, 110)]}, tolerance=0.2,
                          max_moves=4, max_moves_per_shard=2, split=True)
    assert plan.moves == [] and plan.splits == []


def test_moves_go_from_the_most_to_the_least_loaded() -> None:
    chunks = {"a": [("c", 1, 40), ("c", 2, 30), ("c", 3, 20), ("c", 4, 10)], "b": [], "c": [("c", 5, 30)]}
    plan = plan_rebalance(chunks, tolerance=0.2, max_moves=4, max_moves_per_shard=2, split=True)
    # Each move takes the chunk closest to half the gap; "a" then reaches its per-shard limit.
    assert [(m.chunk_id, m.source, m.target) for m in plan.moves] == [(1, "a", "b"), (3, "a", "c")]
    assert plan.loads == {"a": 100, "b": 0, "c": 30}
    assert plan.loads_after == {"a": 40, "b": 40, "c": 50}


def test_limits_and_busy_chunks_are_respected() -> None:
    chunks = {"a": [("c", 1, -50), ("c", 2, 30), ("c", 3, 30), ("c", 4, 30)], "b": []}
    plan = plan_rebalance(chunks, tolerance=0.01, max_moves=10, max_moves_per_shard=1,
                          split=True)
    assert len(plan.moves) == 1 and plan.moves[0].chunk_id != 1  # 1 is being moved
    assert plan.loads["a"] == 140
    assert plan_rebalance(chunks, tolerance=0.01, max_moves=0, max_moves_per_shard=5,
                          split=True).moves == []


def test_a_shard_at_its_limit_does_not_stop_the_others() -> None:
    # After a -> b, both are at their limit of one move; c still gives to d.
    chunks = {"a": [("c", 1, 50), ("c", 2, 50)], "b": [],
              "c": [("c", 3, 30), ("c", 4, 10)], "d": []}
    plan = plan_rebalance(chunks, tolerance=0.2, max_moves=4, max_moves_per_shard=1,
                          split=True)
    assert [(m.chunk_id, m.source, m.target) for m in plan.moves] == [(1, "a", "b"),
                                                                       (3, "c", "d")]
    assert plan.loads_after == {"a": 50, "b": 50, "c": 10, "d": 30}


def test_a_chunk_too_large_to_move_is_split() -> None:
    chunks = {"a": [("c", 1, 100)], "b": []}
    plan = plan_rebalance(chunks, tolerance=0.2, max_moves=4, max_moves_per_shard=2, split=True)
    assert plan.moves == [] and [(s.chunk_id, s.shard) for s in plan.splits] == [(1, "a")]
    assert plan_rebalance(chunks, tolerance=0.2, max_moves=4, max_moves_per_shard=2,
                          split=False).splits == []


# -- 2. a rebalance under load ---------------------------------------------------------------


async def skewed_fleet(catalog: Catalog, c: str, pg18_dsns: list[str], chunks_per_shard: int,
                       docs_per_chunk: list[int]) -> Fleet:
    """Every chunk on the first shard (with ``docs_per_chunk`` documents), the second empty."""
    fleet = await make_fleet(catalog, c, {f"{c[:40]}-r0": (pg18_dsns[0], 18)},
                             {f"{c[:40]}-r1": (pg18_dsns[1], 18)},
                             chunks_per_shard=chunks_per_shard)
    cmap = await catalog.chunk_map(c)
    for chunk, n in zip(cmap.chunks, docs_per_chunk, strict=True):
        if n:
            load_chunk(pg18_dsns[0], c, chunk.range, n)
    return fleet


async def test_rebalance_evens_out_two_shards_under_load(
    router_catalog: Catalog, pg18_dsns: list[str], collection_name: str,
    worker: WorkerHandle, temporal_client: Client, fleet_cleanup: list[Fleet],
) -> None:
    c = collection_name
    fleet = await skewed_fleet(router_catalog, c, pg18_dsns, 4, [3000, 3000, 3000, 3000])
    fleet_cleanup.append(fleet)
    shards = [*fleet.old, *fleet.new]
    handle = await temporal_client.start_workflow(
        RebalanceWorkflow.run,
        RebalanceInput(collections=[c], shards=shards, tolerance=0.3, move=FAST),
        id=f"rebalance-{uuid.uuid4().hex[:8]}", task_queue=worker.task_queue)
    result, load = await run_under_load(fleet, handle)
    assert result.moves and all(m.outcome == MigrationOutcome.COMPLETED.value
                                for m in result.moves), result.moves
    before, after = result.loads_before, result.loads_after
    assert before[fleet.new[0]] < 0.05 * before[fleet.old[0]], before
    spread = abs(after[fleet.old[0]] - after[fleet.new[0]])
    assert spread <= 0.3 * sum(after.values()) / 2, after
    records = await fleet.catalog.migrations(collection=c)
    assert records and all(r.kind == MigrationKind.REBALANCE for r in records)
    stored = await collect_stored(fleet.shards, c)
    preloaded = {k: v for k, v in stored.items()
                 if all(str(d.get("acct", "")).startswith("bulk-") for d in v)}
    # load_chunk reuses the _ids b0.. in every chunk (a document is its shard key plus _id):
    # each (key, _id) is stored exactly once.
    pairs = [(d["acct"], d["_id"]) for v in preloaded.values() for d in v]
    assert len(pairs) == len(set(pairs)) == 12_000
    report = check(load.records, {k: v for k, v in stored.items() if k not in preloaded})
    assert report.client_errors == 0, report.error_samples
    assert report.ok, report
    assert stream_objects([s.dsn for s in fleet.shards.values()], "ss_rebalance") == []


async def test_shard_split_splits_a_chunk_too_large_to_move(
    router_catalog: Catalog, pg18_dsns: list[str], collection_name: str,
    worker: WorkerHandle, temporal_client: Client, fleet_cleanup: list[Fleet],
) -> None:
    c = collection_name
    fleet = await skewed_fleet(router_catalog, c, pg18_dsns, 1, [4000])
    fleet_cleanup.append(fleet)
    handle = await temporal_client.start_workflow(
        RebalanceWorkflow.run,
        RebalanceInput(kind=MigrationKind.SPLIT_SHARD, collections=[c],
                       shards=[*fleet.old, *fleet.new], tolerance=0.5, move=FAST),
        id=f"rebalance-{uuid.uuid4().hex[:8]}", task_queue=worker.task_queue)
    result = await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_S)
    assert len(result.splits) >= 1, result
    assert result.moves and result.moves[0].outcome == "completed", result
    cmap = await fleet.catalog.chunk_map(c)
    assert len(cmap.chunks) >= 2
    assert {ch.shard_id for ch in cmap.chunks} == {fleet.old[0], fleet.new[0]}
    total = sum([await fleet.shards[s].count(c) for s in fleet.shards])
    assert total == 4000  # nothing lost, nothing duplicated
    records = await fleet.catalog.migrations(collection=c)
    assert records and all(r.kind == MigrationKind.SPLIT_SHARD for r in records)


async def test_dry_run_and_bad_input_change_nothing(
    router_catalog: Catalog, pg18_dsns: list[str], collection_name: str,
    worker: WorkerHandle, temporal_client: Client, fleet_cleanup: list[Fleet],
) -> None:
    c = collection_name
    fleet = await skewed_fleet(router_catalog, c, pg18_dsns, 2, [2000, 2000])
    fleet_cleanup.append(fleet)
    before = await fleet.catalog.chunk_map(c)
    result: RebalanceResult = await temporal_client.execute_workflow(
        RebalanceWorkflow.run,
        RebalanceInput(collections=[c], shards=[*fleet.old, *fleet.new], dry_run=True),
        id=f"rebalance-{uuid.uuid4().hex[:8]}", task_queue=worker.task_queue)
    assert [m.target for m in result.planned] == fleet.new
    for bad in (RebalanceInput(collections=["nosuch_coll"]),
                RebalanceInput(collections=[c], shards=["nosuch-shard"]),
                RebalanceInput(collections=[c], move={"kind": "move"})):
        with pytest.raises(WorkflowFailureError):
            await asyncio.wait_for(temporal_client.execute_workflow(
                RebalanceWorkflow.run, bad, id=f"rebalance-{uuid.uuid4().hex[:8]}",
                task_queue=worker.task_queue), 60)
    assert await fleet.catalog.chunk_map(c) == before
    assert await fleet.catalog.migrations(collection=c) == []


# -- 3. a Temporal Schedule runs it ------------------------------------------------------------


async def test_schedule_runs_the_rebalance(
    router_catalog: Catalog, pg18_dsns: list[str], collection_name: str, stack: Stack,
    worker: WorkerHandle, temporal_client: Client, fleet_cleanup: list[Fleet],
) -> None:
    c = collection_name
    fleet = await skewed_fleet(router_catalog, c, pg18_dsns, 2, [2000, 2000])
    fleet_cleanup.append(fleet)
    schedule_id = f"rebalance-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "SHARDSHIFT_CATALOG_DSN": stack.catalog_dsn,
           "SHARDSHIFT_TEMPORAL__ADDRESS": stack.temporal.address,
           "SHARDSHIFT_STATE_DIR": str(stack.state_dir)}

    async def cli(*args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli", "rebalance", *args, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, (out.decode(), err.decode())
        return out.decode()

    await cli("--schedule", "1h", "--schedule-id", schedule_id, "--collection", c,
              "--shard", *fleet.old, *fleet.new, "--task-queue", worker.task_queue)
    handle = temporal_client.get_schedule_handle(schedule_id)
    try:
        desc = await handle.describe()
        assert desc.schedule.spec.intervals[0].every.total_seconds() == 3600
        await handle.trigger()  # run it now instead of in an hour

        async def finished() -> str | None:
            d = await handle.describe()
            if not d.info.recent_actions:
                return None
            wid = d.info.recent_actions[-1].action.workflow_id
            wf = await temporal_client.get_workflow_handle(wid).describe()
            return wid if wf.status is not None and wf.status.name == "COMPLETED" else None

        wid = await wait_until(finished, timeout=RESULT_TIMEOUT_S, what="the scheduled run")
        result = await temporal_client.get_workflow_handle(
            wid, result_type=RebalanceResult).result()
        assert result.moves and result.moves[0].outcome == "completed", result
    finally:
        await cli("--unschedule", "--schedule-id", schedule_id)
    with pytest.raises(Exception, match="not found|NotFound"):
        await handle.describe()
