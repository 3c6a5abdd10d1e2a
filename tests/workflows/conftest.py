"""Workflow fixtures: a Temporal client on the session stack and an in-process worker on a
fresh task queue per test, plus the router fixtures (a provisioned collection)."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from infra import Stack
from settings import Settings, TemporalSettings
from tests.conftest import owned_state_dir
from tests.router.conftest import deployment, router, router_catalog  # noqa: F401 - fixtures
from tests.workflows.streams import streamed  # noqa: F401 - a fixture for this package's tests
from worker import run_worker

if TYPE_CHECKING:
    from catalog import Catalog
    from tests.workflows.fleet import Fleet


@pytest.fixture(scope="session")
async def temporal_client(stack: Stack) -> Client:
    return await Client.connect(stack.temporal.address, data_converter=pydantic_data_converter)


@pytest.fixture
def worker_settings(stack: Stack) -> Iterator[Settings]:
    """Settings of a test's workers: the session stack, a fresh task queue and staging dir
    (removed after the test)."""
    staging = str(owned_state_dir("staging"))
    try:
        yield Settings(
            catalog_dsn=stack.catalog_dsn, staging_url=staging,
            temporal=TemporalSettings(address=stack.temporal.address,
                                      task_queue=f"test-{uuid.uuid4().hex[:8]}"),
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@dataclass
class WorkerHandle:
    settings: Settings
    task: asyncio.Task[None]
    stop: asyncio.Event

    @property
    def task_queue(self) -> str:
        return self.settings.temporal.task_queue

    async def shutdown(self) -> None:
        self.stop.set()
        await self.task


@pytest.fixture
async def worker(worker_settings: Settings, temporal_client: Client) -> AsyncIterator[WorkerHandle]:
    stop = asyncio.Event()
    task = asyncio.create_task(run_worker(worker_settings, stop=stop, client=temporal_client))
    handle = WorkerHandle(worker_settings, task, stop)
    try:
        yield handle
    finally:
        if not task.done():
            await handle.shutdown()


@pytest.fixture
async def fleet_cleanup(router_catalog: Catalog) -> AsyncIterator[list[Fleet]]:  # noqa: F811
    """Fleets a test made (``tests.workflows.fleet.make_fleet``): their tables dropped and
    pools closed after the test."""
    fleets: list[Fleet] = []
    yield fleets
    for f in fleets:
        for s in f.shards.values():
            try:
                await s.drop_collection(f.collection)
            finally:
                await s.close()
