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
    """The connection to the shard failed mid-operation: the write may or may not have been
    applied. Non-idempotent operations ($inc) are never retried blindly; read to find out."""


class RouterClosedError(RouterError):
    """The router was closed: it opens no new shard connections and serves no operation."""
