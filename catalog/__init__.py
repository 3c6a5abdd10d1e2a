"""The chunk metadata service: shards, collections, chunks, migrations and move leases.

``catalog.store.Catalog`` is the service (async, over its own PostgreSQL database);
``catalog.admin`` changes the catalog together with the shards' fences (provisioning, split,
merge); ``catalog.invariants`` checks the layout and the fences against the invariants;
``catalog.models`` and ``catalog.errors`` are what callers exchange with it.
"""

from catalog.errors import (
    CatalogBusyError,
    CatalogError,
    CatalogUnavailableError,
    ChunkBusyError,
    CollectionExistsError,
    InvalidLayoutError,
    InvariantViolation,
    LeaseUnavailableError,
    MigrationStateError,
    ShardStateError,
    TokenMismatchError,
    UnknownChunkError,
    UnknownCollectionError,
    UnknownMigrationError,
    UnknownShardError,
)
from catalog.models import (
    CatalogChange,
    ChangeKind,
    Chunk,
    ChunkMap,
    ChunkStats,
    CollectionInfo,
    Lease,
    MigrationKind,
    MigrationOutcome,
    MigrationPhase,
    MigrationRecord,
    ShardInfo,
    ShardState,
    ShardUsage,
    Violation,
    ViolationKind,
)
from catalog.store import Catalog

__all__ = [
    "Catalog",
    "CatalogBusyError",
    "CatalogChange",
    "CatalogError",
    "CatalogUnavailableError",
    "ChangeKind",
    "Chunk",
    "ChunkBusyError",
    "ChunkMap",
    "ChunkStats",
    "CollectionExistsError",
    "CollectionInfo",
    "InvalidLayoutError",
    "InvariantViolation",
    "Lease",
    "LeaseUnavailableError",
    "MigrationKind",
    "MigrationOutcome",
    "MigrationPhase",
    "MigrationRecord",
    "MigrationStateError",
    "ShardInfo",
    "ShardState",
    "ShardStateError",
    "ShardUsage",
    "TokenMismatchError",
    "UnknownChunkError",
    "UnknownCollectionError",
    "UnknownMigrationError",
    "UnknownShardError",
    "Violation",
    "ViolationKind",
]
