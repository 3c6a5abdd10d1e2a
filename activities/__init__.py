"""Every side effect of a move, one module per phase: catalog_ops (register, phases,
finish), staging (where a copy runs), snapshot, bulk_import, replicate, verify, cutover, cleanup; fleet plans and
finishes the draining of whole shards (merges, upgrades).

Activities are idempotent, heartbeat a typed checkpoint and resume from it (or from state the
shards keep: import progress rows, replication origins) after a retry.
"""

from collections.abc import Callable
from typing import Any

from activities.bulk_import import ImportActivities
from activities.catalog_ops import CatalogActivities
from activities.cleanup import CleanupActivities
from activities.context import MoveContext
from activities.cutover import CutoverActivities
from activities.fleet import FleetActivities
from activities.fleet_plans import FleetPlanActivities
from activities.indexes import IndexActivities
from activities.replicate import ReplicateActivities
from activities.snapshot import SnapshotActivities
from activities.staging import StagingActivities
from activities.verify import VerifyActivities


def all_activities(ctx: MoveContext) -> list[Callable[..., Any]]:
    """Every activity function of a worker, bound to its context."""
    groups = [
        CatalogActivities(ctx), SnapshotActivities(ctx), ImportActivities(ctx),
        ReplicateActivities(ctx), VerifyActivities(ctx), CutoverActivities(ctx),
        CleanupActivities(ctx), FleetActivities(ctx), IndexActivities(ctx),
        StagingActivities(ctx), FleetPlanActivities(ctx),
    ]
    out: list[Callable[..., Any]] = []
    for g in groups:
        for name in dir(g):
            fn = getattr(g, name)
            if callable(fn) and hasattr(fn, "__temporal_activity_definition"):
                out.append(fn)
    return out


__all__ = ["MoveContext", "all_activities"]
