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


class ShardUnavailableError(ConnectionError):
    """No connection to the shard could be had in time: the server is unreachable, its
    circuit breaker is open after a failed connect, or every pooled connection stayed busy.
    Nothing was sent, so any operation may be retried; ``retry_after_s`` says when trying
    again makes sense.

    Deliberately not a ``ShardError``: those are permanent for the activities, and an
    unreachable shard is a transient condition that Temporal's retries should ride out.
    """

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ShardConnectionLostError(ConnectionError):
    """The connection failed after the statement was sent: it may or may not have been
    applied. Reads can simply run again; a write must not be repeated blindly."""
