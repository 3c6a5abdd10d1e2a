"""The shard-key hash: a fixed function from a shard-key value to a signed 64-bit ``khash``.

Definition (stable across processes, machines and releases; changing it would misplace every
stored document):

    khash(v) = int.from_bytes(blake2b(bson.encode({"": v}), digest_size=8).digest(),
                              "big", signed=True)

The input is the value's canonical BSON encoding inside a one-field document with an empty key,
so the value's BSON *type* is part of its identity (int32 ``1``, int64 ``1`` and double ``1.0``
hash differently, as they are different BSON values). Python's ``hash()`` is never used: it is
salted per process.
"""

from __future__ import annotations

from hashlib import blake2b
from typing import Any

import bson
from bson.binary import UuidRepresentation
from bson.codec_options import CodecOptions
from bson.errors import InvalidDocument

from shards.errors import InvalidDocumentError

_CODEC: CodecOptions[dict[str, Any]] = CodecOptions(uuid_representation=UuidRepresentation.STANDARD)


def khash(value: Any) -> int:
    """The signed 64-bit hash of a shard-key value."""
    if isinstance(value, dict | list):
        raise InvalidDocumentError("a shard key value must be a scalar, not a document or array")
    try:
        encoded = bson.encode({"": value}, codec_options=_CODEC)
    except (InvalidDocument, TypeError, ValueError, OverflowError) as exc:
        raise InvalidDocumentError(f"shard key value cannot be encoded as BSON: {exc}") from exc
    return int.from_bytes(blake2b(encoded, digest_size=8).digest(), "big", signed=True)
