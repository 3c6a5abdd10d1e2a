"""Balancer controls: the schedule's window (pure), pause/resume/info on the real Temporal
server, and dry runs that report ``dry_run`` (drain, migrate)."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

from temporalio.client import Client

from cli.schedule import parse_window, run_minutes, window_calendars
from infra import Stack
from tests.router.conftest import Deployment
from tests.workflows.cli_run import cli_env, shardshift, shardshift_in_process
from tests.workflows.conftest import WorkerHandle
from tests.workflows.helpers import other_shard


def test_window_run_times() -> None:
    assert run_minutes(timedelta(hours=1), parse_window("01:00-05:00")) == [60, 120, 180, 240]
    # 22:30, 00:00 and 01:30 (past midnight, still inside the window)
    assert run_minutes(timedelta(minutes=90), parse_window("22:30-02:00")) == [
        0, 90, 22 * 60 + 30]
    assert run_minutes(timedelta(minutes=45), parse_window("01:30-03:00")) == [90, 135]
    cal = window_calendars(timedelta(minutes=30), parse_window("01:00-02:00"))
    assert [(c.minute[0].start, [h.start for h in c.hour]) for c in cal] == [(0, [1]), (30, [1])]


def test_bad_windows() -> None:
    for bad in ("1-5", "01:00", "24:00-01:00", "01:00-01:00", "01:60-02:00"):
        try:
            parse_window(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} accepted")


async def test_schedule_window_pause_and_resume(deployment: Deployment, stack: Stack,
                                                temporal_client: Client) -> None:
    """The schedule is created by a ``shardshift`` process; pause, info, resume and unschedule
    run through ``cli.main`` in-process (the same commands, without a Python start each)."""
    sid = f"reb-{uuid.uuid4().hex[:6]}"
    env = cli_env(stack, task_queue="no-worker-listens-here")
    ran = await shardshift(env, "rebalance", "--schedule", "1h", "--window", "01:00-05:00",
                           "--collection", deployment.collection, "--schedule-id", sid)
    assert ran.code == 0 and "01:00-05:00" in ran.out, ran
    try:
        desc = await temporal_client.get_schedule_handle(sid).describe()
        assert not desc.schedule.spec.intervals
        assert {t.hour for t in desc.info.next_action_times} <= {1, 2, 3, 4}
        assert desc.info.next_action_times and all(
            t.minute == 0 for t in desc.info.next_action_times)
        ran = await shardshift_in_process(env, "rebalance", "--pause", "--note", "maintenance",
                                          "--schedule-id", sid)
        assert ran.code == 0, ran
        ran = await shardshift_in_process(env, "rebalance", "--schedule-info", "--json",
                                          "--schedule-id", sid)
        info = json.loads(ran.out)
        assert (info["paused"], info["note"], info["calendars"]) == (True, "maintenance", 1)  # minute 0 of hours 1-4
        assert (await temporal_client.get_schedule_handle(sid).describe()).schedule.state.paused
        ran = await shardshift_in_process(env, "rebalance", "--resume", "--schedule-id", sid)
        assert ran.code == 0, ran
        ran = await shardshift_in_process(env, "rebalance", "--schedule-info", "--schedule-id", sid)
        assert ran.code == 0 and "active" in ran.out and "PAUSED" not in ran.out, ran
    finally:
        await shardshift_in_process(env, "rebalance", "--unschedule", "--schedule-id", sid)


async def test_dry_runs_report_dry_run(deployment: Deployment, worker: WorkerHandle,
                                       stack: Stack) -> None:
    d = deployment
    chunk = d.initial.chunks[0]
    env = cli_env(stack, task_queue=worker.task_queue)
    shards_before = await d.catalog.list_shards()
    ran = await shardshift(env, "drain", chunk.shard_id, "--to", *[s for s in d.shards
                                                                   if s != chunk.shard_id],
                           "--dry-run", "--id", f"drain-dry-{uuid.uuid4().hex[:6]}")
    assert ran.code == 0, ran
    assert "outcome            dry_run" in ran.out and "aborted" not in ran.out, ran
    assert sum("plan " in line for line in ran.out.splitlines()) == 2, ran.out
    assert await d.catalog.list_shards() == shards_before  # nothing marked draining
    ran = await shardshift(env, "migrate", "--collection", d.collection, "--chunk",
                           str(chunk.chunk_id), "--to", other_shard(d, chunk.shard_id),
                           "--dry-run", "--id", f"move-dry-{uuid.uuid4().hex[:6]}")
    assert ran.code == 0 and "outcome            dry_run" in ran.out, ran
    assert await d.catalog.migrations(collection=d.collection) == []
