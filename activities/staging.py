"""Where a move's staged parts live, for workers on many machines.

A staging area on local disk is private to its host: the import must run on the worker that
exported. ``staging_home`` (scheduled on the shared task queue, so any worker answers) names
the answering worker's own task queue; the workflow then schedules the export, the import and
the progress samples there. A shared staging area (an object store) needs no such pinning:
``staging_home`` answers None. ``release_staging`` removes a finished copy's parts on that
worker (cleanup, which may run on any worker, removes them only where it runs).
"""

from __future__ import annotations

from temporalio import activity

from activities.context import MoveContext
from activities.models import ReleaseStagingInput, StagingHome


class StagingActivities:
    def __init__(self, ctx: MoveContext) -> None:
        self.ctx = ctx

    @activity.defn(name="migrate.staging_home")
    async def staging_home(self) -> StagingHome:
        if self.ctx.staging.shared or self.ctx.home_queue is None:
            return StagingHome(task_queue=None)
        return StagingHome(task_queue=self.ctx.home_queue)

    @activity.defn(name="migrate.release_staging")
    async def release_staging(self, inp: ReleaseStagingInput) -> None:
        await self.ctx.run_blocking(lambda _stop: self.ctx.staging.remove(inp.staging_id))
