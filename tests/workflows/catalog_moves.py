"""A test-only chunk move that changes the catalog's placement and nothing else, for fleet
workflows at scale (thousands of empty chunks moved in minutes).

``CatalogOnlyMove`` is registered under the name ``MigrateChunkWorkflow`` on a test worker, so
a drain or rebalance runs it as its child move unchanged. Its one activity records the
migration, switches the chunk's placement (the catalog's compare-and-set commit point) and
closes the record, as a real move does around its data copy. The chunks it moves must be
empty: the shards' rows and fences are not touched.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import timedelta

from temporalio import activity, workflow

with workflow.unsafe.imports_passed_through():
    from catalog import Catalog
    from catalog.models import MigrationOutcome
    from workflows.common import FLEET_RETRY
    from workflows.migrate_chunk import MigrateChunkInput, MigrateChunkResult


class CatalogMoveActivities:
    """The move itself; it counts the moves running per shard (source and target), and with
    ``hold_s`` each lasts that long between its registration and its switch."""

    def __init__(self, catalog: Catalog, hold_s: float = 0.0) -> None:
        self.catalog = catalog
        self.hold_s = hold_s
        self.running: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()
        """The most moves seen running at once per shard."""
        self.peak_total = 0
        """The most moves seen running at once."""

    @activity.defn(name="test.catalog_move")
    async def move(self, inp: MigrateChunkInput) -> MigrateChunkResult:
        mid = activity.info().workflow_id or ""
        cat = self.catalog
        chunk = await cat.chunk(inp.collection, inp.chunk_id)
        record = await cat.register_migration(mid, kind=inp.kind, collection=inp.collection,
                                              chunk_id=inp.chunk_id, source=chunk.shard_id,
                                              target=inp.target)
        shards = (record.source, record.target)
        for s in shards:
            self.running[s] += 1
            self.peak[s] = max(self.peak[s], self.running[s])
        self.peak_total = max(self.peak_total, sum(self.running.values()) // 2)
        try:
            if self.hold_s:
                await asyncio.sleep(self.hold_s)  # the move's copy, as long as a test wants
            if chunk.shard_id != inp.target:  # a retry after the switch finds it done
                await cat.move_chunk(inp.collection, inp.chunk_id, record.token_before,
                                     inp.target, mid)
            await cat.finish_migration(mid, MigrationOutcome.COMPLETED)
        finally:
            for s in shards:
                self.running[s] -= 1
        return MigrateChunkResult(migration_id=mid, outcome=MigrationOutcome.COMPLETED,
                                  source=record.source, target=inp.target)


# Outside the sandbox and with a local activity: ten thousand of these must be cheap; the
# drain that starts them is the workflow under test and stays sandboxed.
@workflow.defn(name="MigrateChunkWorkflow", sandboxed=False)
class CatalogOnlyMove:
    @workflow.run
    async def run(self, inp: MigrateChunkInput) -> MigrateChunkResult:
        result: MigrateChunkResult = await workflow.execute_local_activity_method(
            CatalogMoveActivities.move, inp, start_to_close_timeout=timedelta(seconds=120),
            retry_policy=FLEET_RETRY)
        return result
