"""The shardshift worker: hosts every workflow and activity on the task queue.

Builds the dependencies once (catalog pool, shard engines, staging, thread pool), connects
to Temporal with the pydantic data converter, and runs until SIGINT/SIGTERM, then shuts down
gracefully: it stops polling, lets running activities finish or be cancelled (their
heartbeats resume them elsewhere), and closes the pools.

    python worker.py            # or: shardshift worker
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence
from datetime import timedelta

from temporalio.client import Client, TLSConfig
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Worker

from activities import MoveContext, all_activities
from activities.leases import LeaseKeeper
from catalog import Catalog
from settings import Settings, TemporalSettings, get_settings
from shards.staging import Staging
from workflows import ALL_WORKFLOWS

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
    """The catalog as the control plane (``settings.db.catalog_user``)."""
    if settings.catalog_dsn:
        return settings.db.catalog(settings.catalog_dsn)
    from infra import Stack  # noqa: PLC0415

    return settings.db.catalog(Stack.from_settings(settings).catalog_address)


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
    ctx = MoveContext(catalog, Staging(settings.staging), db=settings.db)  # shards as the mover
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


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(run_worker(get_settings()))


if __name__ == "__main__":
    main()
