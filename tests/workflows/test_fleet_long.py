"""Fleet workflows at length: recorded histories of drains and rebalances that every later
version of the workflow code must replay.

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

import pytest
from temporalio.client import Client, WorkflowFailureError, WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from catalog import Catalog
from catalog.models import MigrationKind
from tests.workflows.conftest import WorkerHandle
from tests.workflows.test_drain import Fleet, fleet_cleanup, make_fleet, start_drain  # noqa: F401
from tests.workflows.test_lifecycle import load_chunk, wait_until
from tests.workflows.test_migrate import FAST
from workflows import (
    DrainShardInput,
    DrainShardWorkflow,
    RebalanceInput,
    RebalanceWorkflow,
)

HISTORIES = Path(__file__).parent / "histories"
FLEET_HISTORIES = ("drain_completed", "drain_cancelled", "split_shard_completed")
RESULT_TIMEOUT_S = 240


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
