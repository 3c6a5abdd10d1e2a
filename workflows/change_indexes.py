"""``ChangeIndexesWorkflow``: build or drop a collection's secondary indexes on every shard
that holds it, then record the new definition in the catalog (``indexes.change``).

The MongoDB front end starts it for ``createIndexes`` and ``dropIndexes`` with the workflow id
``indexes-<collection>``, so two index changes of one collection never run at once; it runs
on a worker because index DDL needs the mover's privileges on the shards. The activity holds
the exclusion with moves (``activities/indexes.py``).
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.indexes import IndexActivities, IndexChange, IndexChangeResult
    from workflows.common import INDEX_DDL_RETRY

ChangeIndexesInput = IndexChange
ChangeIndexesResult = IndexChangeResult


def workflow_id_for(collection: str) -> str:
    return f"indexes-{collection}"


@workflow.defn
class ChangeIndexesWorkflow:
    @workflow.run
    async def run(self, inp: ChangeIndexesInput) -> ChangeIndexesResult:
        return await workflow.execute_activity_method(
            IndexActivities.change, inp,
            start_to_close_timeout=timedelta(hours=2),
            retry_policy=INDEX_DDL_RETRY,
        )
