"""Where a move's staged parts live, for workers on many machines.

A staging area on local disk is private to its host: the import must run on the worker that
exported. ``staging_home`` (scheduled on the shared task queue, so any worker answers) names
the answering worker's own task queue; the workflow then schedules the export, the import and
the progress samples there. A shared staging area (an object store) needs no such pinning:
``staging_home`` answers None, unless the worker has copy seats (``worker_max_copies``,
``activities/copy_seats.py``): then it claims one for the move (or refuses, retryable, when
all are taken) and names its own per-process queue, private or shared staging alike: the
pin then bounds how many copies each worker carries. ``release_staging`` removes a finished copy's parts on that
worker (cleanup, which may run on any worker, removes them only where it runs).
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.context import MoveContext
from activities.copy_seats import NO_COPY_SEAT, seat_key
from activities.models import ReleaseStagingInput, StagingHome

SEAT_WAIT_S = 1.0
"""How long ``staging_home`` waits for one of this worker's seats to free before refusing: a
copy ending here hands its seat over at once, and a full worker still lets go soon enough for
an idle one to take the move."""
SEAT_RETRY = timedelta(milliseconds=250)
"""The refused ``staging_home``'s next attempt (on the shared queue: any worker may take it)."""


class StagingActivities:
    def __init__(self, ctx: MoveContext) -> None:
        self.ctx = ctx

    @activity.defn(name="migrate.staging_home")
    async def staging_home(self) -> StagingHome:
        seats = self.ctx.seats
        if seats.limit is not None and seats.queue is not None:
            # A seat for this move (by workflow id: the same across continue-as-new), or a
            # refusal another worker's poll (or ours, a moment later) answers instead.
            if not await seats.claim(seat_key(), SEAT_WAIT_S):
                raise ApplicationError(
                    f"every copy seat of this worker is taken ({seats.limit} at once)",
                    type=NO_COPY_SEAT, next_retry_delay=SEAT_RETRY)
            return StagingHome(task_queue=seats.queue)
        if self.ctx.staging.shared or self.ctx.home_queue is None:
            return StagingHome(task_queue=None)
        return StagingHome(task_queue=self.ctx.home_queue)

    @activity.defn(name="migrate.release_staging")
    async def release_staging(self, inp: ReleaseStagingInput) -> None:
        self.ctx.seats.release(seat_key())
        await self.ctx.run_blocking(lambda _stop: self.ctx.staging.remove(inp.staging_id))
