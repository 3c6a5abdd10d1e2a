"""Fleet workflows at length: drains and rebalances that continue as new to keep each run's
history bounded, a drain that re-plans a chunk whose target is lost, and recorded histories of
drains and rebalances that every later version of the workflow code must replay.

Recording is a separate, deliberate step: ``SHARDSHIFT_RECORD_FLEET_HISTORIES=1`` runs
``test_record_fleet_histories``, which writes the histories of a completed drain, a
cancelled drain and a shard split under ``histories/``; the replay test never rewrites them.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client, WorkflowFailureError, WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from catalog import Catalog
from catalog.models import MigrationKind
from tests.workflows.conftest import WorkerHandle
from tests.workflows.test_drain import (  # noqa: F401 - fleet_cleanup is a fixture
    Fleet,
    assert_drained,
    fleet_cleanup,
    make_fleet,
    run_under_load,
    start_drain,
)
from tests.workflows.test_lifecycle import load_chunk, stream_objects, wait_until
from tests.workflows.test_migrate import FAST
from workflows import (
    DrainShardInput,
    DrainShardWorkflow,
    RebalanceInput,
    RebalanceWorkflow,
)
from workflows.child_moves import RunLimits

HISTORIES = Path(__file__).parent / "histories"
FLEET_HISTORIES = ("drain_completed", "drain_cancelled", "split_shard_completed")
RESULT_TIMEOUT_S = 240


async def run_histories(client: Client, workflow_id: str, first_run_id: str
                        ) -> list[list[Any]]:
    """The events of every run of a workflow, first to last, following continue-as-new."""
    runs: list[list[Any]] = []
    run_id: str | None = first_run_id
    while run_id is not None:
        events = [e async for e in client.get_workflow_handle(
            workflow_id, run_id=run_id).fetch_history_events()]
        runs.append(events)
        last = events[-1]
        run_id = (last.workflow_execution_continued_as_new_event_attributes.new_execution_run_id
                  if last.HasField("workflow_execution_continued_as_new_event_attributes")
                  else None)
    return runs


def child_starts(events: list[Any]) -> list[str]:
    return [e.start_child_workflow_execution_initiated_event_attributes.workflow_id
            for e in events
            if e.HasField("start_child_workflow_execution_initiated_event_attributes")]


# -- 1. continue-as-new keeps every run's history bounded --------------------------------------

MOVES_PER_RUN = 2
RUN_BOUND = 50
"""Events a drain run with at most ``MOVES_PER_RUN`` children stays under (a plan, phases,
about a dozen events per child; 24 to 37 seen); a drain of 8 chunks in one run took 95."""


async def test_long_drain_continues_as_new_with_bounded_history(
    router_catalog: Catalog, pg18_dsns: list[str], collection_name: str,
    worker: WorkerHandle, temporal_client: Client, fleet_cleanup: list[Fleet],  # noqa: F811
) -> None:
    c = collection_name
    fleet = await make_fleet(router_catalog, c, {f"{c[:40]}-l0": (pg18_dsns[0], 18)},
                             {f"{c[:40]}-l1": (pg18_dsns[1], 18),
                              f"{c[:40]}-l2": (pg18_dsns[2], 18)}, chunks_per_shard=8)
    fleet_cleanup.append(fleet)
    chunks = {ch.chunk_id for ch in (await router_catalog.chunk_map(c)).chunks}
    handle = await start_drain(temporal_client, worker, DrainShardInput(
        shards=fleet.old, targets=fleet.new, max_parallel=2, move=FAST,
        limits=RunLimits(moves_per_run=MOVES_PER_RUN)))
    result, load = await run_under_load(fleet, handle)
    # The drain completed as one drain: every chunk moved once, the checker is satisfied.
    await assert_drained(fleet, result, load, MigrationKind.MERGE_SHARDS)
    assert sorted(m.chunk_id for m in result.moves) == sorted(chunks), result.moves
    assert sorted(m.workflow_id for m in result.moves) == \
        sorted(f"{handle.id}/{ch}" for ch in chunks)
    # ... in several runs, each with a bounded history.
    runs = await run_histories(temporal_client, handle.id, handle.first_execution_run_id or "")
    assert len(runs) == result.runs >= 4, [len(r) for r in runs]
    assert all(len(r) <= RUN_BOUND for r in runs), [len(r) for r in runs]
    assert sum(len(r) for r in runs) > RUN_BOUND  # one run would have exceeded the bound
    started = [child_starts(r) for r in runs]
    assert all(len(s) <= MOVES_PER_RUN for s in started), started
    flat = [wid for s in started for wid in s]
    assert len(flat) == len(set(flat)) == len(chunks), started  # never a move started twice
    # The progress query of the last run carries the counts of every run.
    progress = await handle.query(DrainShardWorkflow.progress)
    assert (progress.phase, progress.chunks_done, progress.chunks_total, progress.runs) == \
        ("done", len(chunks), len(chunks), len(runs)), progress


async def test_long_rebalance_continues_as_new_within_its_limits(
    router_catalog: Catalog, pg18_dsns: list[str], collection_name: str,
    worker: WorkerHandle, temporal_client: Client, fleet_cleanup: list[Fleet],  # noqa: F811
) -> None:
    c = collection_name
    fleet = await make_fleet(router_catalog, c, {f"{c[:40]}-q0": (pg18_dsns[0], 18)},
                             {f"{c[:40]}-q1": (pg18_dsns[1], 18)}, chunks_per_shard=6)
    fleet_cleanup.append(fleet)
    for chunk in (await router_catalog.chunk_map(c)).chunks:
        load_chunk(pg18_dsns[0], c, chunk.range, 500)
    handle = await temporal_client.start_workflow(
        RebalanceWorkflow.run,
        RebalanceInput(collections=[c], shards=[*fleet.old, *fleet.new], tolerance=0.2,
                       max_moves=3, max_moves_per_shard=3, max_parallel=1, move=FAST,
                       limits=RunLimits(moves_per_run=1)),
        id=f"rebalance-{uuid.uuid4().hex[:8]}", task_queue=worker.task_queue)
    result = await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_S)
    # Three moves (the global limit, kept across runs), one per run.
    assert len(result.moves) == 3 and all(m.outcome == "completed" for m in result.moves), \
        result.moves
    runs = await run_histories(temporal_client, handle.id, handle.first_execution_run_id or "")
    assert len(runs) == result.runs == 3, [len(r) for r in runs]
    assert [len(child_starts(r)) for r in runs] == [1, 1, 1]
    after = result.loads_after
    assert abs(after[fleet.old[0]] - after[fleet.new[0]]) <= 0.2 * sum(after.values()) / 2, after
    total = sum([await fleet.shards[s].count(c) for s in fleet.shards])
    assert total == 6 * 500  # nothing lost, nothing duplicated
    assert stream_objects([s.dsn for s in fleet.shards.values()], "ss_rebalance") == []


# -- recorded histories replay -------------------------------------------------------------


def recorded_workflow_id(history_json: str) -> str:
    """The recorded run's workflow id, which its child ids (``{id}/{chunk}``) carry; replaying
    under another id would start differently named children."""
    for event in json.loads(history_json)["events"]:
        attrs = event.get("startChildWorkflowExecutionInitiatedEventAttributes")
        if attrs:
            return attrs["workflowId"].rsplit("/", 1)[0]
    return "recorded-fleet"


@pytest.mark.parametrize("name", FLEET_HISTORIES)
async def test_recorded_fleet_histories_replay(name: str) -> None:
    """Histories recorded from earlier versions of the fleet workflows replay on this one."""
    path = HISTORIES / f"{name}.json"
    assert path.exists(), f"{path} missing: record it with SHARDSHIFT_RECORD_FLEET_HISTORIES=1"
    text = path.read_text()
    history = WorkflowHistory.from_json(recorded_workflow_id(text), text)
    replayer = Replayer(workflows=[DrainShardWorkflow, RebalanceWorkflow],
                        data_converter=pydantic_data_converter)
    await replayer.replay_workflow(history)


@pytest.mark.skipif(not os.environ.get("SHARDSHIFT_RECORD_FLEET_HISTORIES"),
                    reason="records histories: set SHARDSHIFT_RECORD_FLEET_HISTORIES=1")
async def test_record_fleet_histories(
    router_catalog: Catalog, pg18_dsns: list[str], collection_name: str,
    worker: WorkerHandle, temporal_client: Client, fleet_cleanup: list[Fleet],  # noqa: F811
) -> None:
    c = collection_name
    # A completed merge: three chunks, two at a time, then a second plan that finds nothing.
    fleet = await make_fleet(router_catalog, f"{c}_a", {f"{c[:36]}-ha0": (pg18_dsns[0], 18)},
                             {f"{c[:36]}-ha1": (pg18_dsns[1], 18),
                              f"{c[:36]}-ha2": (pg18_dsns[2], 18)}, chunks_per_shard=3)
    fleet_cleanup.append(fleet)
    handle = await start_drain(temporal_client, worker, DrainShardInput(
        shards=fleet.old, targets=fleet.new, max_parallel=2, move=FAST))
    await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_S)
    completed = await handle.fetch_history()

    # A drain cancelled while a move runs: the move aborts, the shard is restored.
    fleet = await make_fleet(router_catalog, f"{c}_b", {f"{c[:36]}-hb0": (pg18_dsns[0], 18)},
                             {f"{c[:36]}-hb1": (pg18_dsns[1], 18)}, chunks_per_shard=3)
    fleet_cleanup.append(fleet)
    handle = await start_drain(temporal_client, worker, DrainShardInput(
        shards=fleet.old, targets=fleet.new, max_parallel=1, move={**FAST, "poll_s": 2.0}))

    async def moving() -> bool:
        p = await handle.query(DrainShardWorkflow.progress)
        return p.phase == "moving" and bool(p.running)

    await wait_until(moving, timeout=60, what="a running move")
    await handle.cancel()
    with pytest.raises(WorkflowFailureError):
        await asyncio.wait_for(handle.result(), 120)
    cancelled = await handle.fetch_history()

    # A shard split: one chunk too large to move is split, then a half moves.
    fleet = await make_fleet(router_catalog, f"{c}_c", {f"{c[:36]}-hc0": (pg18_dsns[0], 18)},
                             {f"{c[:36]}-hc1": (pg18_dsns[1], 18)}, chunks_per_shard=1)
    fleet_cleanup.append(fleet)
    only = (await router_catalog.chunk_map(fleet.collection)).chunks[0]
    load_chunk(pg18_dsns[0], fleet.collection, only.range, 2000)
    split = await temporal_client.start_workflow(
        RebalanceWorkflow.run,
        RebalanceInput(kind=MigrationKind.SPLIT_SHARD, collections=[fleet.collection],
                       shards=[*fleet.old, *fleet.new], tolerance=0.5, move=FAST),
        id=f"rebalance-{uuid.uuid4().hex[:8]}", task_queue=worker.task_queue)
    result = await asyncio.wait_for(split.result(), RESULT_TIMEOUT_S)
    assert result.splits and result.moves, result
    split_history = await split.fetch_history()

    HISTORIES.mkdir(exist_ok=True)
    for name, history in zip(FLEET_HISTORIES, (completed, cancelled, split_history),
                             strict=True):
        (HISTORIES / f"{name}.json").write_text(history.to_json())
