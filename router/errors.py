"""Errors the router raises to applications. Each says what happened and what to do."""

from __future__ import annotations


class RouterError(Exception):
    """Base class of router errors."""


class UnknownCollectionError(RouterError, LookupError):
    """The collection is not in the catalog."""


class BadRequestError(RouterError, ValueError):
    """The request is malformed (missing shard key, unindexed filter, oversized document...);
    nothing was written."""


class ShardKeyChangeError(BadRequestError):
    """A replacement tried to change a document's shard key (it is immutable)."""


class DocumentTooLargeError(BadRequestError):
    """The document exceeds the configured maximum BSON size."""


class RetryDeadlineExceeded(RouterError, TimeoutError):
    """The chunk stayed unavailable (stale token / frozen) past the retry deadline. Nothing was
    written by this operation; it is safe to retry later."""


class OutcomeUnknownError(RouterError):
    """The connection to the shard failed after a write was sent: it may or may not have been
    applied. Writes are never retried blindly (a retry could undo another client's write made
    in between); read the document to find out."""


class RouterClosedError(RouterError):
    """The router was closed: it opens no new shard connections and serves no operation."""


class ShardUnavailableError(RetryDeadlineExceeded):
    """The chunk's shard could not be reached within the retry deadline (down, or its address
    unknown while the catalog is down). Nothing was written; retry after ``retry_after_s``."""

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RouteUnavailableError(RetryDeadlineExceeded):
    """The collection's chunk map is not cached and the catalog could not be read. Nothing was
    written; retry later."""

    retry_after_s = 1.0
