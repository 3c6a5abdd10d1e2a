"""An activity that loses the catalog must report a failure Temporal can retry at once.

A retryable catalog error re-raised as ``raise catalog_failure(exc) from exc`` was its own
cause: Temporal's failure converter then recursed until ``RecursionError``, the worker could
not complete the activity ("Exception handling failed"), and the move only went on after the
activity's timeout. Seen when the catalog's primary died under a running move.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.api.failure.v1 import Failure
from temporalio.converter import DefaultFailureConverter, DefaultPayloadConverter
from temporalio.testing import ActivityEnvironment

from activities.catalog_ops import CatalogActivities
from activities.context import MoveContext
from activities.models import PhaseInput
from catalog import CatalogError
from catalog.models import MigrationPhase
from infra.net import free_port_block
from router.catalog_source import router_catalog
from shards.staging import Staging


async def test_a_lost_catalog_fails_the_activity_retryably(tmp_path: Path) -> None:
    port = free_port_block(1)  # nothing listens there: the catalog is gone
    async with router_catalog(f"host=127.0.0.1 port={port} dbname=shardshift user=x",
                              timeout_s=1) as cat:
        ctx = MoveContext(cat, Staging(str(tmp_path / "staging")))
        try:
            with pytest.raises(CatalogError) as lost:
                await ActivityEnvironment().run(
                    CatalogActivities(ctx).set_phase,
                    PhaseInput(migration_id="m-1", phase=MigrationPhase.REPLICATE))
        finally:
            await ctx.close()
    exc = lost.value
    assert getattr(exc, "retryable", False), exc
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None:
        assert all(cur is not s for s in seen), f"{type(cur).__name__} is its own cause"
        seen.append(cur)
        cur = cur.__cause__
    failure = Failure()
    DefaultFailureConverter().to_failure(exc, DefaultPayloadConverter(), failure)
    assert failure.application_failure_info.non_retryable is False
