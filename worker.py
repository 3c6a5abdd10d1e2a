"""The shardshift worker: hosts every workflow and activity on the task queue.

Builds the dependencies once (catalog pool, shard engines, staging, thread pool), connects
to Temporal with the pydantic data converter, and runs until SIGINT/SIGTERM, then shuts down
gracefully: it stops polling, lets running activities finish or be cancelled (their
heartbeats resume them elsewhere), and closes the pools.

Telemetry (docs/telemetry.md): with a metrics port, ``/metrics`` serves the move metrics and
the Temporal SDK's own (bridged into the same OpenTelemetry provider); every client and worker
carries Temporal's tracing interceptor; log lines are text or JSON.

    python worker.py            # or: shardshift worker [--metrics-port N] [--log-format json]

It also holds the client side the CLI and bench share: ``connect`` (a Temporal client from
settings, from ``infra.temporal_client``) and ``TemporalMoveProbe`` (the doctor's check whether a workflow runs a migration).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import signal
import socket
import uuid
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, Literal

from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import Worker

from activities import MoveContext, all_activities
from activities.copy_seats import CopySeats
from activities.leases import LeaseKeeper
from catalog import Catalog
from infra import Stack, telemetry
from infra.heap import settle_heap
from infra.temporal_client import connect
from settings import Settings, get_settings
from shards.arrow_memory import use_copy_pool
from shards.staging import Staging
from workflows import ALL_WORKFLOWS
from workflows.drain_shard import DrainShardInput
from workflows.migrate_chunk import MigrateChunkWorkflow, migration_id_for

log = logging.getLogger("shardshift.worker")


def catalog_dsn(settings: Settings) -> str:
    """The catalog as the control plane (``settings.db.catalog_user``)."""
    if settings.catalog_dsn:
        return settings.db.catalog(settings.catalog_dsn)
    return settings.db.catalog(Stack.from_settings(settings).catalog_address)


async def run_worker(
    settings: Settings,
    *,
    task_queue: str | None = None,
    stop: asyncio.Event | None = None,
    client: Client | None = None,
    workflows: Sequence[type] = ALL_WORKFLOWS,
    metrics_port: int | None = None,
    ready: Callable[[], object] | None = None,
) -> None:
    """Run a worker until ``stop`` is set (or a signal arrives when ``stop`` is None).

    ``ready`` is called once the Temporal workers are up (polling their queues). The worker
    process (:func:`main`) settles its heap there (``infra/heap.py``); a worker embedded in
    another process (the demo, tests) leaves its host's heap alone.

    ``metrics_port`` (default ``settings.telemetry.metrics_port``; 0 picks a free port):
    serve ``/metrics`` there. Without ``client``, the worker's own client bridges the
    Temporal SDK's metrics into the same ``/metrics``; a given client keeps its runtime's."""
    async with contextlib.AsyncExitStack() as stack:
        port = metrics_port if metrics_port is not None else settings.telemetry.metrics_port
        tel = telemetry.setup("shardshift-worker", settings.telemetry)
        if client is None:
            runtime, exporter = telemetry.temporal_runtime(tel)
            await stack.enter_async_context(exporter)
            client = await connect(settings.temporal, runtime=runtime)
        if port is not None:
            server = telemetry.serve_metrics(tel, port, settings.telemetry.metrics_host)
            stack.callback(server.close)
            log.info("metrics on http://%s:%d/metrics", server.host, server.port)
        await _run(settings, client, task_queue, stop, workflows, ready)


async def _run(settings: Settings, client: Client, task_queue: str | None,
               stop: asyncio.Event | None, workflows: Sequence[type],
               ready: Callable[[], object] | None = None) -> None:
    catalog = await Catalog(catalog_dsn(settings), max_size=8,
                            max_moves_per_shard=settings.fleet.max_moves_per_shard).open()
    await catalog.ensure_schema()
    queue = task_queue or settings.temporal.task_queue
    staging = Staging.from_settings(settings)
    arrow_pool = use_copy_pool()  # before any copy allocates: see shards/arrow_memory.py
    # Staging private to this host: a move's export and import run on this worker's own queue.
    home = None if staging.shared else home_queue(queue, staging)
    # Copy seats (fleet.worker_max_copies): the copies this worker seats run on a queue only
    # this process polls, so the seats bound exactly what runs here.
    limit = settings.fleet.worker_max_copies
    seats = CopySeats(limit, idle_s=settings.fleet.copy_seat_idle_s,
                      queue=None if limit is None else seat_queue(queue))
    ctx = MoveContext(catalog, staging, db=settings.db, home_queue=home,  # shards as the mover
                      seats=seats)
    stop = stop or _signal_event()
    try:
        common: dict[str, Any] = dict(
            activities=all_activities(ctx),
            # Move leases live as long as the move; log lines name the activity's migration.
            interceptors=[LeaseKeeper(catalog), telemetry.LogContextInterceptor()],
            max_concurrent_activities=64,
            # Cancellation reaches an activity through its heartbeat: throttle heartbeats to
            # 1 s (not 80% of the timeout) so a stopped stream stops within a second.
            max_heartbeat_throttle_interval=timedelta(seconds=1),
            graceful_shutdown_timeout=timedelta(seconds=10),
        )
        worker = Worker(client, task_queue=queue, workflows=list(workflows), **common)
        async with contextlib.AsyncExitStack() as workers:
            await workers.enter_async_context(worker)
            if home is not None:
                await workers.enter_async_context(Worker(client, task_queue=home, **common))
            if seats.queue is not None:
                await workers.enter_async_context(Worker(client, task_queue=seats.queue,
                                                         **common))
            log.info("worker on %s (queue %s; staging %s, %s; %s; Arrow pool %s)",
                     settings.temporal.address, queue, staging.url,
                     f"private: copies pinned to queue {home}" if home else "shared",
                     f"{limit} copies at once, on queue {seats.queue}" if limit
                     else "copies not limited", arrow_pool)
            if ready is not None:
                ready()
            await stop.wait()
    finally:
        await ctx.close()
        await catalog.close()


def home_queue(queue: str, staging: Staging) -> str:
    """The task queue of the workers that see this host's staging directory: named by the
    host and the directory, so a worker restarted on the same host (same directory) serves
    the queue again and its moves' copies resume there instead of being redone elsewhere."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:40]
    where = hashlib.sha256(staging.root.encode()).hexdigest()[:10]
    return f"{queue}.host.{host}.{where}"


def seat_queue(queue: str) -> str:
    """This process's own task queue, where the copies it seated run (a restarted process
    polls a new one: a copy pinned to the old one is redone elsewhere after
    ``pinned_start_timeout_s``)."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:40]
    return f"{queue}.worker.{host}.{os.getpid()}.{uuid.uuid4().hex[:8]}"


def _signal_event() -> asyncio.Event:
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, event.set)
    return event


class TemporalMoveProbe:
    """``activities.doctor.MoveProbe`` over Temporal: does a workflow run this migration?

    The record's lease holders (and the workflow id its migration id was derived from) are
    described; a running one is this migration's when its run (or the first run of its
    chain) derives the migration id, or when its ``progress`` query says so. Visibility (the
    running ``MigrateChunkWorkflow`` executions) is the last resort. An error propagates:
    the doctor then treats the migration as running.
    """

    def __init__(self, client: Any) -> None:
        self.client = client
        self._listed: set[str] | None = None

    async def __call__(self, record: Any, workflow_ids: Any) -> bool:
        mid = record.migration_id
        for wid in dict.fromkeys([*workflow_ids, mid.rsplit(".", 1)[0]]):
            try:
                desc = await self.client.get_workflow_handle(wid).describe()
            except RPCError as exc:
                if exc.status == RPCStatusCode.NOT_FOUND:
                    continue
                raise
            if desc.status != WorkflowExecutionStatus.RUNNING:
                continue
            runs = {desc.run_id, getattr(desc.raw_info, "first_run_id", "") or desc.run_id}
            if mid in {migration_id_for(wid, r) for r in runs}:
                return True
            if desc.workflow_type == "MigrateChunkWorkflow":
                progress = await self.client.get_workflow_handle(wid).query(
                    MigrateChunkWorkflow.progress, rpc_timeout=timedelta(seconds=5))
                if progress.migration_id == mid:
                    return True
        if self._listed is None:
            self._listed = set()
            query = "WorkflowType = 'MigrateChunkWorkflow' AND ExecutionStatus = 'Running'"
            async for wf in self.client.list_workflows(query):
                first = getattr(wf.raw_info, "first_run_id", "") or wf.run_id
                self._listed |= {migration_id_for(wf.id, wf.run_id),
                                 migration_id_for(wf.id, first)}
        return mid in self._listed

    async def plan_running(self, plan_id: str) -> bool:
        """``activities.doctor.PlanProbe``: does the fleet operation that stored this plan
        (``{workflow id}@{first run id}``) still run? Its workflow id must be running, in a
        chain that began with that run (a later operation reusing the id is another one)."""
        wid, sep, first = plan_id.rpartition("@")
        if not sep:
            return False  # not a plan id any operation stores
        try:
            desc = await self.client.get_workflow_handle(wid).describe()
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                return False
            raise
        if desc.status != WorkflowExecutionStatus.RUNNING:
            return False
        return bool((getattr(desc.raw_info, "first_run_id", "") or desc.run_id) == first)


    async def draining_shards(self) -> set[str]:
        """``activities.doctor.DrainProbe``: the shards that running drains empty, read from
        each running ``DrainShardWorkflow``'s input (the first event of its current run: no
        worker needs to answer, so a drain whose workers are down still counts)."""
        held: set[str] = set()
        query = "WorkflowType = 'DrainShardWorkflow' AND ExecutionStatus = 'Running'"
        async for wf in self.client.list_workflows(query):
            handle = self.client.get_workflow_handle(wf.id, run_id=wf.run_id)
            async for event in handle.fetch_history_events():
                attrs = event.workflow_execution_started_event_attributes
                payloads = list(attrs.input.payloads)
                if payloads:
                    inp, = await self.client.data_converter.decode(payloads[:1],
                                                                   [DrainShardInput])
                    held |= set(inp.shards)
                break  # the first event is the start
        return held


def main(metrics_port: int | None = None,
         log_format: Literal["text", "json"] | None = None) -> None:
    """The worker process: ``--metrics-port`` / ``--log-format`` override the settings."""
    settings = get_settings()
    telemetry.configure_logging(log_format or settings.telemetry.log_format)
    # The process is the worker's: once its workers are up, start-up is over.
    asyncio.run(run_worker(settings, metrics_port=metrics_port,
                           ready=lambda: settle_heap("worker")))


if __name__ == "__main__":
    main()
