"""Router and shard errors as MongoDB's errors (codes drivers know, labels they act on)."""

from __future__ import annotations

from router.errors import (
    BadRequestError,
    DocumentTooLargeError,
    OutcomeUnknownError,
    RetryDeadlineExceeded,
    RouterClosedError,
    RouteUnavailableError,
    ShardKeyChangeError,
    ShardUnavailableError,
    UnknownCollectionError,
)
from router.mongo.errors import MongoError
from shards.errors import DuplicateDocumentError, InvalidDocumentError, InvalidNameError

OUTCOME_UNKNOWN_LABEL = "ShardshiftOutcomeUnknown"
"""Carried by a write error whose outcome is unknown (the shard connection broke after the
write was sent). It is never labelled ``RetryableWriteError``: the application decides, after
reading the document, whether to write again."""


def to_mongo_error(exc: BaseException) -> MongoError:
    """The MongoDB error for an exception from the router core or a shard."""
    msg = str(exc) or type(exc).__name__
    if isinstance(exc, MongoError):
        return exc
    if isinstance(exc, DuplicateDocumentError):
        return MongoError("DuplicateKey", f"E11000 duplicate key error: {msg}")
    if isinstance(exc, ShardKeyChangeError):
        return MongoError("ImmutableField", msg)
    if isinstance(exc, DocumentTooLargeError):
        return MongoError("BSONObjectTooLarge", msg)
    if isinstance(exc, UnknownCollectionError):
        return MongoError("NamespaceNotFound", msg)
    if isinstance(exc, BadRequestError | InvalidDocumentError | InvalidNameError):
        return MongoError("BadValue", msg)
    if isinstance(exc, OutcomeUnknownError):
        return MongoError("HostUnreachable", msg, labels=[OUTCOME_UNKNOWN_LABEL])
    if isinstance(exc, ShardUnavailableError | RouteUnavailableError):
        return MongoError("HostUnreachable", msg)
    if isinstance(exc, RetryDeadlineExceeded):
        return MongoError("ExceededTimeLimit", msg)
    if isinstance(exc, RouterClosedError):
        return MongoError("HostUnreachable", "the router is shutting down")
    return MongoError("InternalError", "internal error (see the router's log)")
