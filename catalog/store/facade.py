"""The facade: ``Catalog`` composes the catalog's sections, one mixin each, over
``CatalogBase`` (the pool and the transactions). Callers import it from ``catalog.store`` or
``catalog``."""

from __future__ import annotations

from catalog.store.chunkmaps import ChunkMaps
from catalog.store.collection import Collections
from catalog.store.leases import Leases
from catalog.store.migrations import Migrations
from catalog.store.notify import Notifications
from catalog.store.plans import FleetPlans
from catalog.store.registry import ShardRegistry
from catalog.store.routemaps import RouteMaps
from catalog.store.samples import Samples
from catalog.store.stats import ChunkStatistics
from catalog.store.topology import Topology
from catalog.store.traffic import Traffic
from catalog.store.verifications import Verifications


class Catalog(
    ShardRegistry, Collections, ChunkMaps, RouteMaps, Topology, Migrations, Leases,
    Notifications, Samples, Verifications, Traffic, ChunkStatistics, FleetPlans,
):
    """The catalog: shards, collections, chunks, migrations, leases, move timelines,
    verification reports and the stored plans of fleet operations.

    Build one per process, ``await catalog.open()`` (or ``async with``), share it: methods are
    safe to call concurrently (each takes its own pooled connection).

    Args:
        dsn: libpq DSN of the catalog database.
        min_size: Connections kept open.
        max_size: Connections at most.
        max_attempts: Attempts per transaction before ``CatalogBusyError``.
        max_moves_per_shard: Default limit of live move leases per shard.
        lease_ttl: Default lease lifetime; holders renew well within it.
    """


__all__ = ["Catalog"]
