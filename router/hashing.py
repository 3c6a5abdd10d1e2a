"""The shard-key hash: a fixed function from a shard-key value to a signed 64-bit ``khash``.

Definition (stable across processes, machines and releases; changing it would misplace every
stored document):

    khash(v) = int.from_bytes(blake2b(bson.encode({"": normal(v)}), digest_size=8).digest(),
                              "big", signed=True)

The input is the canonical BSON encoding of the value, normalized, inside a one-field document
with an empty key. Python's ``hash()`` is never used: it is salted per process.

Numbers are normalized first, so every BSON number type holding one value hashes the same, as
MongoDB's hashed shard keys do (``5``, ``Int64(5)``, ``5.0`` and ``Decimal128("5")`` are equal
in a query, so they live on one chunk and an equality reads one chunk with one statement):

* a value that is integral and fits int64 hashes as that Python ``int`` (BSON int32 when it
  fits, else int64: exactly what ``bson.encode`` does for a Python ``int``). Every Python
  ``int`` therefore hashes exactly as before numbers were normalized (what the HTTP API and
  all data stored until then use); ``-0.0`` hashes as ``0``;
* a non-integral value (or an integral one outside int64) that a double represents exactly
  hashes as that double (``2.5`` and ``Decimal128("2.50")`` alike);
* any other Decimal128 hashes as itself in its normalized form (trailing zeros of the
  coefficient dropped, at Decimal128's 34 digits: ``Decimal128("0.10")`` as ``0.1``);
* every NaN (double, Decimal128, signed or signalling) hashes as the double NaN
  (``float("nan")``, one bit pattern), and the infinities as the double infinities.

Booleans are not numbers (``True`` hashes as the BSON boolean, not as ``1``); every other
type hashes as its own BSON encoding, so its type is part of its identity.

A document stored with a number shard key of another BSON type (``Int64``, double,
Decimal128) *before* this normalization carries the old khash; such documents would have to
be re-hashed (the HTTP API and the workloads store Python ints only, whose hash did not
change).
"""

from __future__ import annotations

import math
from decimal import Decimal
from hashlib import blake2b
from typing import Any

import bson
from bson import Decimal128, Int64
from bson.binary import UuidRepresentation
from bson.codec_options import CodecOptions
from bson.decimal128 import create_decimal128_context
from bson.errors import InvalidDocument

from shards.errors import InvalidDocumentError

_CODEC: CodecOptions[dict[str, Any]] = CodecOptions(uuid_representation=UuidRepresentation.STANDARD)
_INT64_LO, _INT64_HI = -(2**63), 2**63
_D128 = create_decimal128_context()
_INT32_PREFIX = b"\x0b\x00\x00\x00\x10\x00"  # {"": <int32>}: length 11, type 0x10, empty key


def normal(value: Any) -> Any:
    """The value a shard-key value hashes as (see the module docstring)."""
    t = type(value)
    if t is int or t is str:
        return value
    if t is float:
        if value != value:
            return math.nan
        if value.is_integer() and _INT64_LO <= value < _INT64_HI:
            return int(value)
        return value  # inf, -inf, or not integral / outside int64
    if t is Int64:
        return int(value)
    if t is Decimal128:
        return _normal_decimal(value)
    return value


def _normal_decimal(value: Decimal128) -> Any:
    d: Decimal = value.to_decimal()
    if d.is_nan():
        return math.nan
    if d.is_infinite():
        return math.inf if d > 0 else -math.inf
    if d == d.to_integral_value() and _INT64_LO <= d < _INT64_HI:
        return int(d)
    f = float(d)
    if not math.isinf(f) and Decimal(f) == d:
        return f
    return Decimal128(d.normalize(_D128))


def khash(value: Any) -> int:
    """The signed 64-bit hash of a shard-key value."""
    if type(value) is int and -(2**31) <= value < 2**31:
        # The common case, encoded by hand: the bytes bson.encode({"": value}) gives.
        encoded = _INT32_PREFIX + value.to_bytes(4, "little", signed=True) + b"\x00"
        return int.from_bytes(blake2b(encoded, digest_size=8).digest(), "big", signed=True)
    if isinstance(value, dict | list):
        raise InvalidDocumentError("a shard key value must be a scalar, not a document or array")
    try:
        encoded = bson.encode({"": normal(value)}, codec_options=_CODEC)
    except (InvalidDocument, TypeError, ValueError, OverflowError) as exc:
        raise InvalidDocumentError(f"shard key value cannot be encoded as BSON: {exc}") from exc
    return int.from_bytes(blake2b(encoded, digest_size=8).digest(), "big", signed=True)
