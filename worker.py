"""The shardshift worker: hosts every workflow and activity on the task queue.

Builds the dependencies once (catalog pool, shard engines, staging, thread pool), connects
to Temporal with the pydantic data converter, and runs until SIGINT/SIGTERM, then shuts down
gracefully: it stops polling, lets running activities finish or be cancelled (their
heartbeats resume them elsewhere), and closes the pools.

    python worker.py            # or: shardshift worker

It also holds the client side the CLI and bench share: ``connect`` (a Temporal client from
settings) and ``TemporalMoveProbe`` (the doctor's check whether a workflow runs a migration).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from temporalio.client import Client, TLSConfig, WorkflowExecutionStatus
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import Worker

from activities import MoveContext, all_activities
from activities.leases import LeaseKeeper
from catalog import Catalog
from settings import Settings, TemporalSettings, get_settings
from shards.staging import Staging
from workflows import ALL_WORKFLOWS
from workflows.migrate_chunk import MigrateChunkWorkflow, migration_id_for

log = logging.getLogger("shardshift.worker")


async def connect(temporal: TemporalSettings) -> Client:
    """A Temporal client from settings (TLS and API key for a hosted cluster)."""
    tls: TLSConfig | bool = False
    if temporal.tls:
        tls = TLSConfig(
            client_cert=temporal.tls_client_cert.read_bytes() if temporal.tls_client_cert else None,
            client_private_key=temporal.tls_client_key.read_bytes() if temporal.tls_client_key else None,
        )
    return await Client.connect(
        temporal.address, namespace=temporal.namespace, tls=tls,
        api_key=temporal.api_key.get_secret_value() if temporal.api_key else None,
        data_converter=pydantic_data_converter,
    )


def catalog_dsn(settings: Settings) -> str:
    if settings.catalog_dsn:
        return settings.catalog_dsn
    from infra import Stack  # noqa: PLC0415

    return Stack.from_settings(settings).catalog_dsn


async def run_worker(
    settings: Settings,
    *,
    task_queue: str | None = None,
    stop: asyncio.Event | None = None,
    client: Client | None = None,
    workflows: Sequence[type] = ALL_WORKFLOWS,
) -> None:
    """Run a worker until ``stop`` is set (or a signal arrives when ``stop`` is None)."""
    client = client or await connect(settings.temporal)
    catalog = await Catalog(catalog_dsn(settings), max_size=8).open()
    await catalog.ensure_schema()
    ctx = MoveContext(catalog, Staging(settings.staging))
    stop = stop or _signal_event()
    try:
        worker = Worker(
            client,
            task_queue=task_queue or settings.temporal.task_queue,
            workflows=list(workflows),
            activities=all_activities(ctx),
            interceptors=[LeaseKeeper(catalog)],  # move leases live as long as the move
            max_concurrent_activities=64,
            # Cancellation reaches an activity through its heartbeat: throttle heartbeats to
            # 1 s (not 80% of the timeout) so a stopped stream stops within a second.
            max_heartbeat_throttle_interval=timedelta(seconds=1),
            graceful_shutdown_timeout=timedelta(seconds=10),
        )
        async with worker:
            log.info("worker on %s (queue %s)", settings.temporal.address,
                     task_queue or settings.temporal.task_queue)
            await stop.wait()
    finally:
        await ctx.close()
        await catalog.close()


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


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(run_worker(get_settings()))


if __name__ == "__main__":
    main()
