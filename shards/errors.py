"""Errors raised by shard engines. The router and the activities act on their types."""

from __future__ import annotations


class ShardError(Exception):
    """Base class of every engine error."""


class InvalidNameError(ShardError, ValueError):
    """A collection, field or index name that is not allowed (nothing was touched)."""


class InvalidDocumentError(ShardError, ValueError):
    """A document or patch that cannot be stored (nothing was touched)."""


class FenceRejectedError(ShardError):
    """The chunk's fence refused the operation: the caller's token is stale, the chunk is not
    active here (frozen for a cutover, retired, or not on this shard). Refresh the chunk map
    and retry; nothing was written."""

    def __init__(self, message: str, *, collection: str, chunk_id: int) -> None:
        super().__init__(message)
        self.collection = collection
        self.chunk_id = chunk_id


class KeyOutsideChunkError(ShardError):
    """A document's khash does not fall in the chunk named by the request (a routing bug or a
    stale map after a split); nothing was written."""


class DuplicateDocumentError(ShardError):
    """An insert found a document with the same shard key and ``_id``."""


class FenceStateError(ShardError):
    """A fence transition (freeze, activate, retire) found the fence in an unexpected state or
    at an unexpected token; nothing changed."""
