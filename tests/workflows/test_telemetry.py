"""Telemetry on the real stack: a move's metrics scraped over HTTP from a worker process and a
router process (``shardshift worker/router serve --metrics-port --log-format json``), the
worker's JSON log lines, and the trace a move leaves (in-memory span exporter)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from catalog.models import MigrationOutcome
from infra import Stack, telemetry
from infra.net import free_port_block, port_is_listening
from settings import REPO_ROOT, Settings
from tests.conftest import owned_state_dir
from tests.router.conftest import Deployment
from tests.workflows.procs import chunk_keys, preload_chunk
from worker import run_worker
from workflows import MigrateChunkInput, MigrateChunkWorkflow

TOKEN = "shardshift-local"  # RouterSettings' default token
AUTH = {"Authorization": f"Bearer {TOKEN}"}

def fast_move(collection: str, chunk_id: int, target: str) -> MigrateChunkInput:
    return MigrateChunkInput(collection=collection, chunk_id=chunk_id, target=target,
                             poll_s=0.2, cutover_retry_s=0.2, part_rows=500)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Prometheus exposition text -> {(sample name, labels): value}."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """The sample ``name`` whose labels include ``labels`` (None when absent)."""
    want = set(labels.items())
    found = [v for (n, ls), v in samples.items() if n == name and want <= ls]
    assert len(found) <= 1, f"{name}{labels}: {len(found)} series"
    return found[0] if found else None


def names(samples: Samples) -> set[str]:
    return {n for n, _ in samples}


class Proc:
    """A shardshift command as a process in its own group, its output in a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cli", *args], cwd=REPO_ROOT, env=env, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)

    def wait_listening(self, port: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not port_is_listening(port):
            assert self.proc.poll() is None, f"exited: {self.log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"port {port} not listening: {self.log_tail()}"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=20)

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


def proc_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDSHIFT_")}
    env.update({
        "SHARDSHIFT_CATALOG_DSN": settings.catalog_dsn or "",
        "SHARDSHIFT_STAGING_URL": settings.staging,
        "SHARDSHIFT_TEMPORAL__ADDRESS": settings.temporal.address,
        "SHARDSHIFT_TEMPORAL__TASK_QUEUE": settings.temporal.task_queue,
        "PYTHONUNBUFFERED": "1",
    })
    return env


@pytest.fixture
def logs_dir() -> Iterator[Path]:
    path = owned_state_dir("telemetry-logs")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def scrape(url: str, headers: dict[str, str] | None = None) -> Samples:
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.get(url, headers=headers)
    assert r.status_code == 200, (url, r.status_code, r.text)
    assert r.headers["content-type"].startswith("text/plain")
    return parse(r.text)


async def scrape_until(url: str, ready: Callable[[Samples], bool],
                       timeout: float = 30.0) -> Samples:
    deadline = time.monotonic() + timeout
    while True:
        samples = await scrape(url)
        if ready(samples):
            return samples
        assert time.monotonic() < deadline, f"{url}: not ready in {timeout}s"
        await asyncio.sleep(0.1)


async def test_metrics_of_a_move_scraped_from_the_worker_and_the_router(
    deployment: Deployment, worker_settings: Settings, temporal_client: Client, logs_dir: Path,
) -> None:
    c = deployment.collection
    moving = deployment.initial.chunks[0]
    target = next(s for s in deployment.shards if s != moving.shard_id)
    preloaded = preload_chunk(deployment.shards[moving.shard_id].dsn, c, moving, 1200)

    base = free_port_block(3)
    worker_metrics, api_port, router_metrics = base, base + 1, base + 2
    env = proc_env(worker_settings)
    worker = Proc(["worker", "--metrics-port", str(worker_metrics), "--log-format", "json"],
                  env, logs_dir / "worker.log")
    router = Proc(["router", "serve", "--port", str(api_port), "--metrics-port",
                   str(router_metrics), "--log-format", "json"], env, logs_dir / "router.log")
    try:
        worker.wait_listening(worker_metrics)
        router.wait_listening(api_port)
        api = f"http://127.0.0.1:{api_port}"

        # Writes through the router: into the moving chunk (the snapshot copies them too).
        keys = chunk_keys(moving, 10, "http")
        async with httpx.AsyncClient(base_url=api, headers=AUTH, timeout=30) as http:
            for i, key in enumerate(keys):
                r = await http.post(f"/v1/collections/{c}/insert",
                                    json={"document": {"_id": f"h{i}", "acct": key, "v": i}})
                assert r.status_code == 201, r.text
            r = await http.post(f"/v1/collections/{c}/get", json={"key": keys[0], "id": "h0"})
            assert r.status_code == 200 and r.json()["document"]["v"] == {"$numberInt": "0"}
            # /metrics on the API port wants the token like /v1.
            assert (await http.get("/metrics", headers={"Authorization": ""})).status_code == 401

        # The move, sampling the worker's /metrics while it runs: the live gauges (copy
        # rate, replication lag) belong to a running move.
        handle = await temporal_client.start_workflow(
            MigrateChunkWorkflow.run,
            fast_move(c, moving.chunk_id, target),
            id=f"move-{c}-{uuid.uuid4().hex[:6]}", task_queue=worker_settings.temporal.task_queue)
        seen: dict[str, float] = {}
        live = {"shardshift_move_copy_rate_per_second", "shardshift_move_replication_lag_bytes",
                "shardshift_move_replication_lag_seconds"}
        result_task = asyncio.ensure_future(handle.result())
        while not result_task.done():
            during = await scrape(f"http://127.0.0.1:{worker_metrics}/metrics")
            for (n, _), v in during.items():
                if n in live:
                    seen[n] = v
            await asyncio.wait({result_task}, timeout=0.2)
        result = result_task.result()
        assert result.outcome == MigrationOutcome.COMPLETED

        # The SDK's metrics reach the provider when its buffer is drained (every second):
        # scrape until the workflow's completion is in.
        w = await scrape_until(
            f"http://127.0.0.1:{worker_metrics}/metrics",
            lambda m: (value(m, "temporal_workflow_completed_total",
                             workflow_type="MigrateChunkWorkflow") or 0) >= 1)
        rows = preloaded + len(keys)
        assert value(w, "shardshift_move_rows_copied_total", collection=c) == rows
        assert value(w, "shardshift_move_finished_total", outcome="completed", kind="move") == 1
        assert value(w, "shardshift_move_cutover_pause_seconds_count", collection=c,
                     direction="fwd") == 1
        pause = value(w, "shardshift_move_cutover_pause_seconds_sum", collection=c)
        assert pause is not None and result.pause_ms is not None
        assert 0 < pause == pytest.approx(result.pause_ms / 1000, rel=0.01)
        assert value(w, "shardshift_move_verify_mismatches_total", collection=c) == 0
        assert value(w, "shardshift_move_verify_repairs_total", collection=c) == 0
        assert set(seen) == live, f"live gauges seen during the move: {seen}"
        assert seen["shardshift_move_copy_rate_per_second"] > 0
        assert seen["shardshift_move_replication_lag_bytes"] >= 0
        # The Temporal SDK's own metrics come through the same port.
        completed = value(w, "temporal_workflow_completed_total",
                          workflow_type="MigrateChunkWorkflow")
        assert completed is not None and completed >= 1, sorted(
            n for n in names(w) if n.startswith("temporal_"))
        executed = {dict(ls).get("activity_type"): v for (n, ls), v in w.items()
                    if n == "temporal_activity_execution_latency_seconds_count"}
        assert sum(v for k, v in executed.items() if k and k.startswith("migrate.")) >= 5, executed

        # The router: with the token on the API port, without it on the metrics port.
        for url, headers in ((f"{api}/metrics", AUTH),
                             (f"http://127.0.0.1:{router_metrics}/metrics", None)):
            r_ = await scrape(url, headers)
            assert value(r_, "shardshift_router_operation_duration_seconds_count",
                         op="insert", outcome="ok") == len(keys)
            assert value(r_, "shardshift_router_operation_duration_seconds_count",
                         op="get", outcome="ok") == 1
            ok_sum = value(r_, "shardshift_router_operation_duration_seconds_sum",
                           op="insert", outcome="ok")
            assert ok_sum is not None and 0 < ok_sum < len(keys) * 5.0  # seconds, not ms
    finally:
        worker.stop()
        router.stop()

    # JSON log lines: every line of the worker is one object; a move's milestones carry the
    # workflow, activity and migration ids.
    raw = (logs_dir / "worker.log").read_text().splitlines()
    assert all(line.startswith("{") for line in raw), [x for x in raw if not x.startswith("{")]
    lines = [json.loads(line) for line in raw]
    milestones = [x for x in lines if x["logger"] == "shardshift.move"]
    by_activity = {x["activity"]: x for x in milestones}
    assert {"migrate.bulk_import", "migrate.verify", "migrate.cutover",
            "migrate.finish"} <= set(by_activity), milestones
    for x in milestones:
        assert x["workflow_id"] == handle.id and x["migration_id"] == result.migration_id, x
        assert x["activity_id"] and x["run_id"] and x["level"] == "INFO" and x["ts"]
    assert "finished: completed" in by_activity["migrate.finish"]["msg"]
    router_lines = (logs_dir / "router.log").read_text().splitlines()
    assert all(line.startswith("{") and json.loads(line)["msg"] for line in router_lines), \
        router_lines
    # Both long-running processes set their start-up heap aside from the collector (see
    # infra/heap.py), once: tens of thousands of objects a full collection no longer walks.
    for who, log_lines in (("worker", lines), ("router", map(json.loads, router_lines))):
        settled = [x for x in log_lines if x["logger"] == "shardshift.heap"]
        assert len(settled) == 1 and settled[0]["msg"].startswith(f"{who}: heap settled, "), \
            settled
        assert int(settled[0]["msg"].split(", ")[1].split()[0]) > 20_000, settled


async def test_a_move_is_one_linked_trace(
    deployment: Deployment, worker_settings: Settings, stack: Stack,
) -> None:
    """Every span of a move (the workflow's, and each activity's) is in the trace of the
    span that started it, below it."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    client = await Client.connect(
        stack.temporal.address, data_converter=pydantic_data_converter,
        interceptors=[telemetry.tracing_interceptor(provider)])
    c = deployment.collection
    moving = deployment.initial.chunks[0]
    target = next(s for s in deployment.shards if s != moving.shard_id)
    preload_chunk(deployment.shards[moving.shard_id].dsn, c, moving, 300)

    stop = asyncio.Event()
    task = asyncio.create_task(run_worker(worker_settings, stop=stop, client=client))
    try:
        wf_id = f"move-{c}-{uuid.uuid4().hex[:6]}"
        result = await client.execute_workflow(
            MigrateChunkWorkflow.run,
            fast_move(c, moving.chunk_id, target),
            id=wf_id, task_queue=worker_settings.temporal.task_queue)
        assert result.outcome == MigrationOutcome.COMPLETED
    finally:
        stop.set()
        await task  # the worker waits for its activities: every span has ended

    spans: list[ReadableSpan] = list(exporter.get_finished_spans())
    by_id = {s.context.span_id: s for s in spans}
    roots = [s for s in spans if s.name == "StartWorkflow:MigrateChunkWorkflow"]
    assert len(roots) == 1, [s.name for s in spans]
    root = roots[0]
    assert root.attributes is not None and root.attributes["temporalWorkflowID"] == wf_id
    mine = [s for s in spans if s.attributes and s.attributes.get("temporalWorkflowID") == wf_id]
    activities = [s for s in mine if s.name.startswith("RunActivity:")]
    assert {"RunActivity:migrate.register", "RunActivity:migrate.snapshot",
            "RunActivity:migrate.bulk_import", "RunActivity:migrate.verify",
            "RunActivity:migrate.cutover", "RunActivity:migrate.finish"} <= {
        s.name for s in activities}
    assert any(s.name == "RunWorkflow:MigrateChunkWorkflow" for s in mine)

    def ancestors(s: Any) -> list[int]:
        out = []
        while s.parent is not None:
            out.append(s.parent.span_id)
            s = by_id.get(s.parent.span_id)
            if s is None:
                break
        return out

    for s in mine:
        assert s.context.trace_id == root.context.trace_id, s.name
        if s is root:
            continue
        assert root.context.span_id in ancestors(s), f"{s.name} is not below the move's span"
    # Each activity span hangs below the workflow's StartActivity span for it.
    for s in activities:
        assert s.parent is not None and by_id[s.parent.span_id].name.startswith(
            "StartActivity:"), s.name


async def test_an_embedded_worker_says_when_it_is_up_and_leaves_its_hosts_heap_alone(
    worker_settings: Settings, temporal_client: Client,
) -> None:
    """``run_worker(ready=...)`` is called once the workers poll (the demo starts its load
    then); only the worker's own process (``worker.main``) freezes its heap there."""
    frozen_before = gc.get_freeze_count()
    up, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run_worker(worker_settings, stop=stop, client=temporal_client,
                                          ready=up.set))
    try:
        await asyncio.wait_for(up.wait(), 60)
        assert not task.done()
        assert gc.get_freeze_count() == frozen_before
    finally:
        stop.set()
        await task
