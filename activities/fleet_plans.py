"""Fleet plans kept in the catalog: a drain's plan stored as it is made, read back in pages.

``drain.plan_stored`` runs ``drain.plan`` (validation, measuring, bin-packing, marking the
shards ``draining``) and stores the moves in the catalog (``catalog.store.plans``) under the
operation's plan id and round, returning only a summary; ``fleet.plan_page`` hands the workflow
one page of them at a time; ``fleet.drop_plan`` removes them when the operation ends. So the
payloads in a drain's history stay the size of a page, whatever the number of chunks
(a plan of 10,000 moves is about 1.5 MB: near Temporal's 2 MB payload limit).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from temporalio import activity

from activities.context import MoveContext, raise_catalog_failure
from activities.fleet import DrainPlanRequest, FleetActivities
from activities.models import PlannedMove
from catalog import CatalogError
from catalog.store import MAX_PAGE, StoredMove


class StorePlanInput(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    request: DrainPlanRequest
    plan_id: str
    round: int = Field(ge=1)


class StoredPlan(BaseModel):
    """A stored plan's summary: what a workflow needs without the moves."""

    model_config = ConfigDict(frozen=True)

    moves: int
    targets: list[str]
    bytes_total: int
    target_bytes_after: dict[str, int]


class PlanPageInput(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    plan_id: str
    round: int = Field(ge=1)
    offset: int = Field(ge=0)
    limit: int = Field(ge=1, le=MAX_PAGE)


class DropPlanInput(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    plan_id: str


class FleetPlanActivities:
    def __init__(self, ctx: MoveContext) -> None:
        self.ctx = ctx
        self.fleet = FleetActivities(ctx)

    @activity.defn(name="drain.plan_stored")
    async def plan_stored(self, inp: StorePlanInput) -> StoredPlan:
        """``drain.plan``, with the moves stored in the catalog (a retry replaces them)."""
        plan = await self.fleet.plan(inp.request)
        activity.heartbeat(f"storing {len(plan.moves)} moves")
        try:
            await self.ctx.catalog.save_plan(inp.plan_id, inp.round, [
                StoredMove(collection=m.collection, chunk_id=m.chunk_id, source=m.source,
                           target=m.target, bytes=m.bytes) for m in plan.moves])
        except CatalogError as exc:
            raise_catalog_failure(exc, "store the plan")
        return StoredPlan(moves=len(plan.moves), targets=plan.targets,
                          bytes_total=plan.bytes_total,
                          target_bytes_after=plan.target_bytes_after)

    @activity.defn(name="fleet.plan_page")
    async def plan_page(self, inp: PlanPageInput) -> list[PlannedMove]:
        """Moves ``offset`` to ``offset + limit`` of a stored round (empty past its end)."""
        try:
            page = await self.ctx.catalog.plan_page(inp.plan_id, inp.round, inp.offset,
                                                    inp.limit)
        except CatalogError as exc:
            raise_catalog_failure(exc, "read the plan")
        return [PlannedMove(collection=m.collection, chunk_id=m.chunk_id, source=m.source,
                            target=m.target, bytes=m.bytes) for m in page]

    @activity.defn(name="fleet.drop_plan")
    async def drop_plan(self, inp: DropPlanInput) -> None:
        """Remove an ended operation's stored plans."""
        try:
            await self.ctx.catalog.drop_plan(inp.plan_id)
        except CatalogError as exc:
            raise_catalog_failure(exc, "drop the plan")
