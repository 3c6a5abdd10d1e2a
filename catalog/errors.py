"""Errors raised by the catalog. Callers act on their types, people on their messages.

Every catalog operation is one serializable transaction, so an error means *nothing changed*
(the transaction rolled back), with one exception: ``CatalogUnavailableError`` from a change
means the connection was lost and the change may or may not have committed; the caller
resolves it by reading the catalog again (see ``catalog.store``).

``retryable`` tells an activity whether retrying the same call can succeed: a stale token or an
unknown chunk will not fix itself, a busy catalog will. Activities turn non-retryable errors into
``ApplicationError(non_retryable=True)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from catalog.models import Violation


class CatalogError(Exception):
    """Base class of every catalog error; nothing was changed."""

    retryable = False


class UnknownShardError(CatalogError, LookupError):
    """The named shard is not registered."""

    def __init__(self, shard_id: str) -> None:
        super().__init__(
            f"shard {shard_id!r} is not registered in the catalog; register it first "
            "(Catalog.register_shard; `shardshift collection create` registers the local stack's "
            "shards) or check the id with `shardshift infra status`"
        )
        self.shard_id = shard_id


class UnknownCollectionError(CatalogError, LookupError):
    """The named collection does not exist in the catalog."""

    def __init__(self, collection: str) -> None:
        super().__init__(
            f"collection {collection!r} does not exist in the catalog; create it first "
            "(catalog.admin.provision_collection)"
        )
        self.collection = collection


class UnknownChunkError(CatalogError, LookupError):
    """No chunk with this id exists in the collection (it may have been split or merged)."""

    def __init__(self, collection: str, chunk_id: int) -> None:
        super().__init__(
            f"chunk {collection}/{chunk_id} does not exist in the catalog; it may have been "
            "split or merged away: re-read the chunk map and address the current chunks"
        )
        self.collection = collection
        self.chunk_id = chunk_id


class UnknownMigrationError(CatalogError, LookupError):
    """No migration record with this id exists."""

    def __init__(self, migration_id: str) -> None:
        super().__init__(f"migration {migration_id!r} is not recorded in the catalog")
        self.migration_id = migration_id


class CollectionExistsError(CatalogError):
    """A collection of this name exists with a different definition."""


class TokenMismatchError(CatalogError):
    """A compare-and-set found the chunk at another token than the caller expected.

    ``actual`` and ``shard_id`` describe the chunk as the catalog holds it now, so a caller
    whose own earlier commit may have succeeded (a lost ``COMMIT`` reply) can tell whether
    the current state is its own doing.
    """

    def __init__(
        self, collection: str, chunk_id: int, *, expected: int, actual: int, shard_id: str
    ) -> None:
        super().__init__(
            f"chunk {collection}/{chunk_id} is at token {actual} on shard {shard_id!r}, the "
            f"caller expected token {expected}; another change won: nothing was changed, "
            "re-read the chunk and decide again"
        )
        self.collection = collection
        self.chunk_id = chunk_id
        self.expected = expected
        self.actual = actual
        self.shard_id = shard_id


class ChunkBusyError(CatalogError):
    """The chunk already takes part in an active migration."""

    def __init__(self, collection: str, chunk_id: int, migration_id: str, phase: str) -> None:
        super().__init__(
            f"chunk {collection}/{chunk_id} is already moving (migration {migration_id!r}, "
            f"phase {phase}); wait for it to finish or cancel it first"
        )
        self.collection = collection
        self.chunk_id = chunk_id
        self.migration_id = migration_id


class LeaseUnavailableError(CatalogError):
    """A shard already takes part in its maximum number of moves (or the lease is held by
    someone else). Retrying later can succeed once a move finishes or a lease expires."""

    retryable = True

    def __init__(self, message: str, *, shard_id: str, holders: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.shard_id = shard_id
        self.holders = tuple(holders)


class ShardStateError(CatalogError):
    """The shard's state forbids the operation (a draining shard receives no chunks, a shard
    that still holds chunks cannot retire)."""


class InvalidLayoutError(CatalogError, ValueError):
    """A split point outside the chunk, chunks that are not adjacent or not on one shard, a
    layout that would not cover the khash space."""


class MigrationStateError(CatalogError):
    """The migration record does not allow this step (finished, other chunk, other shards)."""


class CatalogBusyError(CatalogError):
    """The transaction kept losing serialization conflicts; nothing changed. Retry later."""

    retryable = True


class CatalogUnavailableError(CatalogError):
    """The catalog could not be reached, or the connection broke mid-transaction. For a change,
    the outcome is unknown: re-read the catalog (the chunk's token, the migration record)
    before deciding what to do next."""

    retryable = True


class InvariantViolation(CatalogError):
    """The chunk layout or the shards' fences disagree with the catalog's invariants."""

    def __init__(self, violations: Sequence[Violation]) -> None:
        lines = "; ".join(v.message for v in violations[:10])
        more = f" (and {len(violations) - 10} more)" if len(violations) > 10 else ""
        super().__init__(f"{len(violations)} catalog invariant violation(s): {lines}{more}")
        self.violations = tuple(violations)
