"""``DrainShardWorkflow`` on the real stack: an upgrade from PostgreSQL 15 to 18 and a merge,
both under load and judged by the checker; bad input; cancel. Plus the planner's pure logic."""

from __future__ import annotations

import asyncio
import math
import os
import sys
import uuid
from datetime import UTC, datetime

import pytest
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ApplicationError

from activities.fleet import _bin_pack, _targets
from activities.models import DrainPlanInput
from catalog import Catalog, ShardState
from catalog.models import MigrationKind, ShardInfo
from infra import Stack
from tests.workflows.cli_run import shardshift_in_process
from tests.workflows.conftest import WorkerHandle
from tests.workflows.fleet import (
    RESULT_TIMEOUT_S,
    Fleet,
    assert_drained,
    make_fleet,
    run_under_load,
    start_drain,
)
from tests.workflows.helpers import FAST, failure_chain, load_chunk, stream_objects, wait_until
from workflows import DrainShardInput, DrainShardWorkflow

# -- 1. upgrade: PostgreSQL 15 -> 18 ---------------------------------------------------------


@pytest.mark.pg15
async def test_upgrade_pg15_shard_to_pg18_under_load(
    router_catalog: Catalog, pg15_dsn: str, pg18_dsns: list[str], collection_name: str,
    worker: WorkerHandle, temporal_client: Client, fleet_cleanup: list[Fleet],
) -> None:
    c = collection_name
    fleet = await make_fleet(router_catalog, c, {f"{c[:40]}-v15": (pg15_dsn, 15)},
                             {f"{c[:40]}-v18a": (pg18_dsns[0], 18),
                              f"{c[:40]}-v18b": (pg18_dsns[1], 18)}, chunks_per_shard=3)
    fleet_cleanup.append(fleet)
    handle = await start_drain(temporal_client, worker, DrainShardInput(
        shards=fleet.old, targets=fleet.new, kind=MigrationKind.UPGRADE, move=FAST))
    result, load = await run_under_load(fleet, handle)
    await assert_drained(fleet, result, load, MigrationKind.UPGRADE)
    # Bin-packing spread the three chunks over both new shards.
    assert {m.target for m in result.moves} == set(fleet.new)
    progress = await handle.query(DrainShardWorkflow.progress)
    assert (progress.phase, progress.chunks_done, progress.chunks_failed) == ("done", 3, 0)


# -- 2. merge: bin-pack an underutilized shard onto the others ---------------------------------


async def test_merge_drains_a_shard_onto_the_others(
    router_catalog: Catalog, pg18_dsns: list[str], collection_name: str,
    worker: WorkerHandle, temporal_client: Client, fleet_cleanup: list[Fleet],
) -> None:
    c = collection_name
    fleet = await make_fleet(router_catalog, c, {f"{c[:40]}-m0": (pg18_dsns[0], 18)},
                             {f"{c[:40]}-m1": (pg18_dsns[1], 18),
                              f"{c[:40]}-m2": (pg18_dsns[2], 18)}, chunks_per_shard=4)
    fleet_cleanup.append(fleet)
    handle = await start_drain(temporal_client, worker, DrainShardInput(
        shards=fleet.old, targets=fleet.new, max_parallel=2, move=FAST))
    result, load = await run_under_load(fleet, handle)
    await assert_drained(fleet, result, load, MigrationKind.MERGE_SHARDS)
    # Largest first onto the least loaded: both targets take chunks, and their loads differ
    # by at most the largest chunk.
    per_target = {t: sum(m.bytes for m in result.moves if m.target == t) for t in fleet.new}
    assert all(per_target.values()), per_target
    assert abs(per_target[fleet.new[0]] - per_target[fleet.new[1]]) <= \
        max(m.bytes for m in result.moves), per_target


# -- 3. bad input: a clear error, nothing changes ----------------------------------------------


@pytest.mark.parametrize("case", ["unknown_shard", "into_itself", "no_newer_version",
                                  "bad_move_option", "not_enough_room"])
async def test_bad_drain_is_refused_and_changes_nothing(
    case: str, router_catalog: Catalog, pg18_dsns: list[str], collection_name: str,
    worker: WorkerHandle, temporal_client: Client, fleet_cleanup: list[Fleet],
) -> None:
    c = collection_name
    fleet = await make_fleet(router_catalog, c, {f"{c[:40]}-b0": (pg18_dsns[0], 18)},
                             {f"{c[:40]}-b1": (pg18_dsns[1], 18)})
    fleet_cleanup.append(fleet)
    old, new = fleet.old[0], fleet.new[0]
    kw: dict = {"shards": [old], "targets": [new], "move": FAST}
    expect = {"unknown_shard": "nosuch", "into_itself": "into themselves",
              "no_newer_version": "newer major version", "bad_move_option": "move options",
              "not_enough_room": "no target has room"}[case]
    if case == "unknown_shard":
        kw["shards"] = ["nosuch-shard"]
    elif case == "into_itself":
        kw["targets"] = [old, new]
    elif case == "no_newer_version":
        kw["kind"] = MigrationKind.UPGRADE
    elif case == "bad_move_option":
        kw["move"] = {"part_rows": 1}
    else:
        first = (await fleet.catalog.chunk_map(c)).chunks[0]
        load_chunk(pg18_dsns[0], c, first.range, 200)
        await router_catalog.register_shard(new, pg18_dsns[1], engine="postgres",
                                            major_version=18, capacity_bytes=1000)
    before = await fleet.catalog.chunk_map(c)
    handle = await start_drain(temporal_client, worker, DrainShardInput(**kw))
    with pytest.raises(WorkflowFailureError) as failed:
        await asyncio.wait_for(handle.result(), 60)
    app = next((e for e in failure_chain(failed.value) if isinstance(e, ApplicationError)), None)
    assert app is not None and app.non_retryable and expect in str(app), failure_chain(failed.value)
    assert await fleet.catalog.chunk_map(c) == before
    assert (await fleet.catalog.shard(old)).state == ShardState.ACTIVE
    assert await fleet.catalog.migrations(collection=c) == []


# -- 4. cancel: running moves stop, the shard takes chunks again ------------------------------


async def test_cancelled_drain_restores_the_shard(
    router_catalog: Catalog, pg18_dsns: list[str], collection_name: str,
    worker: WorkerHandle, temporal_client: Client, fleet_cleanup: list[Fleet],
) -> None:
    c = collection_name
    fleet = await make_fleet(router_catalog, c, {f"{c[:40]}-x0": (pg18_dsns[0], 18)},
                             {f"{c[:40]}-x1": (pg18_dsns[1], 18)}, chunks_per_shard=4)
    fleet_cleanup.append(fleet)
    old = fleet.old[0]
    # A slow lag poll keeps each move long enough to be caught running.
    handle = await start_drain(temporal_client, worker, DrainShardInput(
        shards=fleet.old, targets=fleet.new, max_parallel=1, move={**FAST, "poll_s": 2.0}))

    async def moving() -> bool:
        p = await handle.query(DrainShardWorkflow.progress)
        return p.phase == "moving" and bool(p.running)

    await wait_until(moving, timeout=60, what="a running move")
    assert (await fleet.catalog.shard(old)).state == ShardState.DRAINING
    await handle.cancel()
    with pytest.raises(WorkflowFailureError):
        await asyncio.wait_for(handle.result(), 120)
    assert (await fleet.catalog.shard(old)).state == ShardState.ACTIVE

    async def settled() -> bool:  # every move's own cancellation has run to its end
        return await fleet.catalog.migrations(collection=c, active_only=True) == []

    await wait_until(settled, timeout=60, what="the moves' aborts")
    cmap = await fleet.catalog.chunk_map(c)
    assert any(ch.shard_id == old for ch in cmap.chunks), "a cancelled drain moved everything"
    assert stream_objects([s.dsn for s in fleet.shards.values()], "ss_drain") == []
    progress = await handle.query(DrainShardWorkflow.progress)
    assert progress.phase == "cancelled" and progress.running == []


# -- 5. the planner (pure logic) ---------------------------------------------------------------


def _info(sid: str, version: int = 18, state: ShardState = ShardState.ACTIVE,
          capacity: int | None = None) -> ShardInfo:
    now = datetime.now(UTC)
    return ShardInfo(shard_id=sid, address="host=x", engine="postgres", major_version=version,
                     state=state, capacity_bytes=capacity, registered_at=now, updated_at=now)


def test_targets_default_to_active_newer_shards_for_an_upgrade() -> None:
    old = _info("old", 15)
    everyone = [old, _info("a", 18), _info("b", 15), _info("c", 18, ShardState.DRAINING)]
    merge = _targets(DrainPlanInput(shards=["old"]), [old], everyone)
    assert [t.shard_id for t in merge] == ["a", "b"]
    upgrade = _targets(DrainPlanInput(shards=["old"], kind=MigrationKind.UPGRADE), [old], everyone)
    assert [t.shard_id for t in upgrade] == ["a"]


def test_bin_pack_largest_first_onto_the_least_loaded() -> None:
    chunks = [("c", 1, "old", 50), ("c", 2, "old", 40), ("c", 3, "old", 30), ("c", 4, "old", 20)]
    load = {"a": 0, "b": 25}
    moves = _bin_pack(chunks, [_info("a"), _info("b")], load)
    assert [(m.chunk_id, m.target) for m in moves] == [(1, "a"), (2, "b"), (3, "a"), (4, "b")]
    assert load == {"a": 80, "b": 85}


def test_bin_pack_respects_capacity() -> None:
    chunks = [("c", 1, "old", 60), ("c", 2, "old", 60)]
    moves = _bin_pack(chunks, [_info("a", capacity=100), _info("b", capacity=70)],
                      {"a": 0, "b": 0})
    assert sorted((m.chunk_id, m.target) for m in moves) == [(1, "a"), (2, "b")]
    with pytest.raises(ApplicationError, match="no target has room"):
        _bin_pack(chunks, [_info("a", capacity=100)], {"a": 0})


def test_bin_pack_spreads_empty_chunks() -> None:
    chunks = [("c", i, "old", 0) for i in range(4)]
    moves = _bin_pack(chunks, [_info("a"), _info("b")], {"a": 0, "b": 0})
    assert sorted(m.target for m in moves) == ["a", "a", "b", "b"]


# -- 6. the CLI ----------------------------------------------------------------------------------


async def test_cli_drain_shows_progress_and_retires(
    router_catalog: Catalog, pg18_dsns: list[str], collection_name: str, stack: Stack,
    worker: WorkerHandle, fleet_cleanup: list[Fleet],
) -> None:
    c = collection_name
    fleet = await make_fleet(router_catalog, c, {f"{c[:40]}-k0": (pg18_dsns[0], 18)},
                             {f"{c[:40]}-k1": (pg18_dsns[1], 18)})
    fleet_cleanup.append(fleet)
    env = {**os.environ, "SHARDSHIFT_CATALOG_DSN": stack.catalog_dsn,
           "SHARDSHIFT_TEMPORAL__ADDRESS": stack.temporal.address,
           "SHARDSHIFT_STATE_DIR": str(stack.state_dir)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", "drain", *fleet.old, "--to", *fleet.new,
        "--task-queue", worker.task_queue, "--id", f"drain-cli-{uuid.uuid4().hex[:6]}",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), RESULT_TIMEOUT_S)
    text = out.decode()
    assert proc.returncode == 0, (text, err.decode())
    assert f"retired            {fleet.old[0]}" in text, text
    assert "2/2 chunks" in text, text  # the progress line
    assert (await fleet.catalog.shard(fleet.old[0])).state == ShardState.RETIRED
    # An unknown shard is refused before any workflow starts.
    bad = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", "drain", "nosuch-shard", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await bad.communicate()
    assert bad.returncode == 2 and "nosuch-shard" in err.decode(), err.decode()


async def test_cli_merge_chooses_the_least_utilized_shard_and_drains_it(
    router_catalog: Catalog, pg18_dsns: list[str], collection_name: str, stack: Stack,
    worker: WorkerHandle, temporal_client: Client, fleet_cleanup: list[Fleet],
) -> None:
    """``shardshift merge``: three shards holding 800, 500 and 120 documents' worth, each
    declaring room for 62 % of the total, so two can hold everything. It keeps the two most
    utilized and drains the third onto them under load (nothing lost, no client error); a
    dry run changes nothing, and a merge it cannot plan is refused before anything starts."""
    c = collection_name
    ids = [f"{c[:40]}-g{i}" for i in range(3)]
    fleet = await make_fleet(router_catalog, c, {s: (pg18_dsns[i], 18) for i, s in enumerate(ids)},
                             {})
    fleet_cleanup.append(fleet)
    cmap = await router_catalog.chunk_map(c)
    for sid, per_chunk in zip(ids, (400, 250, 60), strict=True):
        for chunk in cmap.on_shard(sid):
            await asyncio.to_thread(load_chunk, fleet.shards[sid].dsn, c, chunk.range, per_chunk,
                                    id_prefix=f"c{chunk.chunk_id}-")
    sizes = {sid: sum(b for _, b in (await fleet.shards[sid].chunk_sizes(
        c, [(k.chunk_id, k.range) for k in cmap.on_shard(sid)])).values()) for sid in ids}
    env = {**os.environ, "SHARDSHIFT_CATALOG_DSN": stack.catalog_dsn,
           "SHARDSHIFT_TEMPORAL__ADDRESS": stack.temporal.address,
           "SHARDSHIFT_STATE_DIR": str(stack.state_dir)}

    # Refused, nothing started: no capacity declared, one shard, an unknown shard.
    for args, says in ((["--among", *ids], "without a declared capacity"),
                       (["--among", ids[0]], "at least two"),
                       (["--among", ids[0], "nosuch-shard"], "unknown shard")):
        ran = await shardshift_in_process(env, "merge", *args, "--dry-run")
        assert ran.code == 2 and says in ran.err, (args, ran)

    capacity = math.ceil(sum(sizes.values()) * 0.62)
    for i, sid in enumerate(ids):
        await router_catalog.register_shard(sid, pg18_dsns[i], engine="postgres",
                                            major_version=18, capacity_bytes=capacity)
    ran = await shardshift_in_process(env, "merge", "--among", *ids, "--dry-run")
    assert ran.code == 0, ran
    assert "keep 2, drain 1" in ran.out and f"drain {ids[2]}" in ran.out, ran.out
    assert [(await router_catalog.shard(s)).state for s in ids] == [ShardState.ACTIVE] * 3

    wf_id = f"merge-cli-{uuid.uuid4().hex[:6]}"
    ran = await shardshift_in_process(env, "merge", "--among", *ids, "--no-wait", "--id", wf_id,
                                      "--task-queue", worker.task_queue)
    assert ran.code == 0 and f"started {wf_id}" in ran.out, ran
    view = Fleet(router_catalog, c, fleet.shards, old=[ids[2]], new=ids[:2])
    result, load = await run_under_load(view, temporal_client.get_workflow_handle_for(
        DrainShardWorkflow.run, wf_id))
    await assert_drained(view, result, load, MigrationKind.MERGE_SHARDS)
