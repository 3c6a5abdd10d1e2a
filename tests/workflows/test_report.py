"""Move timelines and ``shardshift report`` on the real stack: a move records its samples and
marks from its activities; the report's figures agree with the move; ``--plot`` writes PNGs
of a move and of a drain; bad input is refused and writes nothing."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from temporalio.client import Client

from activities.cutover import read_pause_breakdown
from activities.models import Direction
from activities.replicate import HOLD_LAG_ENV
from catalog.timeline import MarkName, SampleKind
from cli.report import build
from infra import Stack
from settings import Settings, TemporalSettings
from tests.router.conftest import Deployment
from tests.workflows.conftest import WorkerHandle
from tests.workflows.fleet import RESULT_TIMEOUT_S, Fleet, make_fleet
from tests.workflows.helpers import FAST, load_chunk, wait_until
from workflows import DrainShardInput, DrainShardWorkflow, MigrateChunkInput, MigrateChunkWorkflow

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PHASES = ["registered", "snapshot", "import", "replicate", "verify", "cutover", "cleanup"]


def cli_env(stack: Stack) -> dict[str, str]:
    return {**os.environ, "SHARDSHIFT_CATALOG_DSN": stack.catalog_dsn,
            "SHARDSHIFT_TEMPORAL__ADDRESS": stack.temporal.address,
            "SHARDSHIFT_STATE_DIR": str(stack.state_dir)}


async def shardshift(stack: Stack, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", *args, env=cli_env(stack),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, data[:16]
    assert len(data) > 1000


async def test_move_records_its_timeline_and_report_agrees(
    deployment: Deployment, worker: WorkerHandle, temporal_client: Client, stack: Stack,
    tmp_path: Path,
) -> None:
    c = deployment.collection
    moving = deployment.initial.chunks[0]
    target = next(s for s in deployment.shards if s != moving.shard_id)
    docs = load_chunk(deployment.shards[moving.shard_id].dsn, c, moving.range, 3000)
    wf_id = f"move-{c}-{uuid.uuid4().hex[:6]}"
    # Hold the move in its replicate phase until the timeline has lag samples (test hook).
    os.environ[HOLD_LAG_ENV] = c
    try:
        handle = await temporal_client.start_workflow(
            MigrateChunkWorkflow.run,
            MigrateChunkInput(collection=c, chunk_id=moving.chunk_id, target=target, **FAST),
            id=wf_id, task_queue=worker.task_queue)
        mid: str = await wait_until(
            lambda: _migration_id(handle), what="the move's migration id")

        async def lag_samples() -> bool:
            samples = await deployment.catalog.move_samples(mid)
            return sum(s.kind == SampleKind.LAG for s in samples) >= 3

        await wait_until(lag_samples, timeout=60, what="3 lag samples in the catalog")
    finally:
        os.environ.pop(HOLD_LAG_ENV, None)
    result = await asyncio.wait_for(handle.result(), RESULT_TIMEOUT_S)
    assert result.outcome.value == "completed", result
    assert result.documents == docs

    # What the activities recorded.
    samples = await deployment.catalog.move_samples(mid)
    copies = [s for s in samples if s.kind == SampleKind.COPY]
    assert copies and copies[-1].rows == docs, copies
    assert [s.rows for s in copies] == sorted(s.rows or 0 for s in copies)  # never backwards
    lags = [s for s in samples if s.kind == SampleKind.LAG]
    assert len(lags) >= 3 and all(s.name == Direction.FORWARD and (s.lag_bytes or 0) >= 0 for s in lags)
    marks = [s for s in samples if s.kind == SampleKind.MARK]
    names = [m.name for m in marks]
    assert [n.removeprefix("phase.") for n in names if n.startswith("phase.")] == PHASES, names
    order = [n for n in names if not n.startswith("phase.")]
    assert order == [MarkName.VERIFY_START, MarkName.VERIFY_DONE, MarkName.CUTOVER_START,
                     MarkName.CUTOVER_COMMIT, MarkName.FINISH], names
    at = {m.name: m.at for m in marks}
    assert at["phase.verify"] <= at[MarkName.VERIFY_START] <= at[MarkName.VERIFY_DONE] \
        <= at["phase.cutover"] <= at[MarkName.CUTOVER_START] <= at[MarkName.CUTOVER_COMMIT] \
        <= at["phase.cleanup"] <= at[MarkName.FINISH]
    commit = next(m for m in marks if m.name == MarkName.CUTOVER_COMMIT)
    assert commit.value == result.pause_ms
    # Where the pause went, step by step (the activation overlaps the switch).
    assert commit.detail is not None and commit.detail.startswith(f"{Direction.FORWARD.value}: freeze_old ")
    steps = read_pause_breakdown(commit.detail)
    assert list(steps) == ["freeze_old", "wait_for_catchup", "activate_new", "switch_catalog"]
    assert sum(steps[n] for n in ("freeze_old", "wait_for_catchup", "switch_catalog")) \
        <= (result.pause_ms or 0) + 0.5
    assert next(m for m in marks if m.name == MarkName.FINISH).detail == "completed"
    assert all(lags[0].at <= m.at for m in marks if m.name == MarkName.CUTOVER_START)

    # `shardshift report` by workflow id (through Temporal), with a plot.
    png = tmp_path / "move.png"
    code, out, err = await shardshift(stack, "report", wf_id, "--json", "--plot", str(png))
    assert code == 0, err
    report: dict[str, Any] = json.loads(out)
    assert report["migration_id"] == mid and report["workflow_id"] == wf_id
    assert report["outcome"] == "completed" and report["rows"] == docs
    assert report["pause_ms"] == result.pause_ms and report["cutover_attempts"] == 1
    assert [p["phase"] for p in report["phases"]] == PHASES
    assert all(p["seconds"] is not None and p["seconds"] >= 0 for p in report["phases"])
    assert report["lag_bytes_peak"] == max(s.lag_bytes or 0 for s in lags)
    ts = [m["t"] for m in report["marks"]]
    assert ts == sorted(ts) and ts[0] >= 0
    assert report["plot"] == str(png)
    assert_png(png)

    # By migration id, and from the catalog alone (no Temporal): the same move.
    code, out, err = await shardshift(stack, "report", mid)
    assert code == 0, err
    assert f"rows copied        {docs}" in out and "outcome            completed" in out, out
    offline = Settings(catalog_dsn=stack.catalog_dsn,
                       temporal=TemporalSettings(address="127.0.0.1:1"))
    alone = await build(deployment.catalog, offline, wf_id, use_temporal=False)
    by_mid = await build(deployment.catalog, offline, mid, use_temporal=False)
    assert alone.model_dump(exclude={"workflow_id"}) == by_mid.model_dump(exclude={"workflow_id"})
    assert getattr(alone, "rows", None) == docs


async def _migration_id(handle: Any) -> str | None:
    try:
        progress = await handle.query(MigrateChunkWorkflow.progress)
    except Exception:  # noqa: BLE001 - not started yet
        return None
    return progress.migration_id or None


async def test_report_refuses_bad_input_and_writes_nothing(stack: Stack, tmp_path: Path) -> None:
    code, _, err = await shardshift(stack, "report", f"nosuch-{uuid.uuid4().hex[:6]}")
    assert code == 2 and "no move, drain or rebalance" in err, err
    missing = tmp_path / "no-such-dir" / "x.png"
    code, _, err = await shardshift(stack, "report", "whatever", "--plot", str(missing))
    assert code == 2 and "does not exist" in err, err
    code, _, err = await shardshift(stack, "report", "whatever", "--plot",
                                    str(tmp_path / "x.jpg"))
    assert code == 2 and "PNG" in err, err
    assert list(tmp_path.iterdir()) == []


async def test_drain_report_plots_bytes_per_shard_before_and_after(
    router_catalog: Any, pg18_dsns: list[str], collection_name: str, stack: Stack,
    worker: WorkerHandle, temporal_client: Client, fleet_cleanup: list[Fleet],
    tmp_path: Path,
) -> None:
    c = collection_name
    old, new = f"{c[:40]}-r0", f"{c[:40]}-r1"
    fleet = await make_fleet(router_catalog, c, {old: (pg18_dsns[0], 18)},
                             {new: (pg18_dsns[1], 18)})
    fleet_cleanup.append(fleet)
    for chunk in (await router_catalog.chunk_map(c)).chunks:
        load_chunk(pg18_dsns[0], c, chunk.range, 800)
    drain_id = f"drain-{uuid.uuid4().hex[:8]}"
    result = await temporal_client.execute_workflow(
        DrainShardWorkflow.run, DrainShardInput(shards=[old], targets=[new], move=FAST),
        id=drain_id, task_queue=worker.task_queue, execution_timeout=None)
    assert result.retired == [old]

    png = tmp_path / "drain.png"
    code, out, err = await shardshift(stack, "report", drain_id, "--json", "--plot", str(png))
    assert code == 0, err
    report = json.loads(out)
    assert report["kind"] == "merge_shards" and report["status"] == "completed"
    by_shard = {s["shard"]: s for s in report["shards"]}
    assert set(by_shard) == {old, new}
    assert by_shard[old]["before"] > 0 and by_shard[old]["after"] == 0
    assert by_shard[new]["before"] == 0 and by_shard[new]["after"] > 0
    assert len(report["moves"]) == 2 and all(m["outcome"] == "completed"
                                             for m in report["moves"])
    assert_png(png)
