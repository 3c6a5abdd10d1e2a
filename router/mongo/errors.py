"""MongoDB's error replies: ``{ok: 0, errmsg, code, codeName[, errorLabels]}``.

Codes and names are MongoDB's own (``src/mongo/base/error_codes.yml``), so a driver raises the
exception an application already handles (``DuplicateKeyError`` for 11000, ...).
"""

from __future__ import annotations

from typing import Any

CODES: dict[str, int] = {
    "InternalError": 1,
    "BadValue": 2,
    "NoSuchKey": 4,
    "HostUnreachable": 6,
    "UnknownError": 8,
    "FailedToParse": 9,
    "Unauthorized": 13,
    "TypeMismatch": 14,
    "AuthenticationFailed": 18,
    "IllegalOperation": 20,
    "InvalidBSON": 22,
    "NamespaceNotFound": 26,
    "IndexNotFound": 27,
    "CursorNotFound": 43,
    "NamespaceExists": 48,
    "MaxTimeMSExpired": 50,
    "CommandNotFound": 59,
    "ShardKeyNotFound": 61,
    "ImmutableField": 66,
    "CannotCreateIndex": 67,
    "InvalidOptions": 72,
    "InvalidNamespace": 73,
    "IndexOptionsConflict": 85,
    "IndexKeySpecsConflict": 86,
    "NetworkTimeout": 89,
    "OperationFailed": 96,
    "CommandNotSupported": 115,
    "NotImplemented": 238,
    "ExceededTimeLimit": 262,
    "QueryExceededMemoryLimitNoDiskUseAllowed": 292,
    "MechanismUnavailable": 334,
    "DuplicateKey": 11000,
    "BSONObjectTooLarge": 10334,
    "StaleConfig": 13388,
    # write and index commands
    "InvalidLength": 16,
    "PathNotViable": 28,
    "ConflictingUpdateOperators": 40,
    "DollarPrefixedFieldName": 52,
    "EmptyFieldName": 56,
    "IndexAlreadyExists": 68,
    "UnknownReplWriteConcern": 79,
    "UnsatisfiableWriteConcern": 100,
    "ConflictingOperationInProgress": 117,
    "InvalidIndexSpecificationOption": 197,
    "Location31254": 31254,
    "Location40415": 40415,
}


class MongoError(Exception):
    """A command failed: the reply a driver turns into its own exception."""

    def __init__(self, code_name: str, message: str, *, labels: list[str] | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        if code_name not in CODES:
            raise ValueError(f"unknown MongoDB error code name {code_name!r}")
        self.code_name = code_name
        self.code = CODES[code_name]
        self.message = message
        self.labels = labels or []
        self.extra = extra or {}

    def reply(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": 0.0, "errmsg": self.message, "code": self.code,
                               "codeName": self.code_name}
        if self.labels:
            out["errorLabels"] = list(self.labels)
        out.update(self.extra)
        return out


class ProtocolError(Exception):
    """A message that cannot be parsed (bad framing, bad BSON, unknown opcode). MongoDB closes
    the connection on these; so does the router, after logging why."""
