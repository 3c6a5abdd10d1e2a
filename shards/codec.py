"""Documents as canonical MongoDB Extended JSON (v2) text, for a ``jsonb`` column.

Canonical mode keeps every BSON type distinct (``{"$numberInt": "1"}`` vs ``{"$numberLong":
"1"}`` vs ``{"$numberDouble": "1.0"}``, ``$numberDecimal`` for Decimal128), so an ObjectId,
a datetime, a Decimal128 money amount or an int64 reads back as the same Python value; money
never passes through float. ``jsonb`` normalizes key order, so a document's field order is not
preserved (equality of documents as mappings is).

What cannot round-trip is refused before anything is stored (``InvalidDocumentError``):
field names that start with ``$`` (Extended JSON would read ``{"$oid": ...}`` back as an
ObjectId, or not at all), field names that are not strings, NUL characters in names or strings
and lone surrogates (PostgreSQL's ``jsonb`` stores neither), and integers outside int64 (BSON
has no wider integer).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import bson
from bson import json_util
from bson.binary import UuidRepresentation
from bson.codec_options import CodecOptions
from bson.errors import InvalidBSON, InvalidDocument

from shards.errors import InvalidDocumentError

JSON_OPTIONS = json_util.CANONICAL_JSON_OPTIONS.with_options(
    uuid_representation=UuidRepresentation.STANDARD, tz_aware=True
)
BSON_OPTIONS: CodecOptions[dict[str, Any]] = CodecOptions(
    tz_aware=True, uuid_representation=UuidRepresentation.STANDARD)
"""BSON as documents travel here: a UUID is binary subtype 4 (``$binary`` subType ``04``
in Extended JSON, what drivers send with ``uuidRepresentation`` standard) both ways."""


def bson_bytes(doc: Mapping[str, Any]) -> bytes:
    """``doc`` as BSON (UUIDs as subtype 4); sizes and byte comparisons use this, since
    ``bson.encode`` without options refuses a ``uuid.UUID``."""
    return bson.encode(doc, codec_options=BSON_OPTIONS)


_INT64_MIN, _INT64_END = -(2**63), 2**63
_INT32_END = 2**31
_INT32_TEXT, _INT64_TEXT = '{"$numberInt":"%d"}', '{"$numberLong":"%d"}'
_MAX_DEPTH = 100
"""Nesting deeper than this is refused (BSON documents in MongoDB stop at 100 levels)."""


def _check_text(s: str, what: str) -> None:
    if "\x00" in s:
        raise InvalidDocumentError(f"{what} contains a NUL character (\\u0000), which cannot be stored")
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidDocumentError(
                f"{what} contains a lone surrogate ({s.encode('utf-8', 'backslashreplace')[:40]!r}"
                "), which is not valid Unicode text"
            ) from None


def check_storable(value: Any, depth: int = 0) -> None:
    """Refuse a value canonical Extended JSON in ``jsonb`` cannot hold as it is (see above)."""
    if isinstance(value, str):
        _check_text(value, "a string")
    elif isinstance(value, bool):
        return
    elif isinstance(value, int):
        if not _INT64_MIN <= value < _INT64_END:
            raise InvalidDocumentError(
                f"integer {value} does not fit BSON's 64-bit integer; store it as a Decimal128 "
                "or a string"
            )
    elif isinstance(value, Mapping):
        if depth >= _MAX_DEPTH:
            raise InvalidDocumentError(f"a document nested deeper than {_MAX_DEPTH} levels")
        for k, v in value.items():
            if not isinstance(k, str):
                raise InvalidDocumentError(
                    f"field names must be strings, not {type(k).__name__} ({k!r})")
            _check_text(k, f"field name {k[:40]!r}")
            if k.startswith("$"):
                raise InvalidDocumentError(
                    f"field name {k[:40]!r} starts with '$', which is reserved for Extended JSON"
                    " and operators")
            check_storable(v, depth + 1)
    elif isinstance(value, list | tuple):
        if depth >= _MAX_DEPTH:
            raise InvalidDocumentError(f"a document nested deeper than {_MAX_DEPTH} levels")
        for v in value:
            check_storable(v, depth + 1)


def encode_document(doc: Mapping[str, Any]) -> str:
    """A document as canonical Extended JSON text."""
    if not isinstance(doc, Mapping):
        raise InvalidDocumentError(f"a document must be a mapping, not {type(doc).__name__}")
    check_storable(doc)
    try:
        return json_util.dumps(doc, json_options=JSON_OPTIONS, separators=(",", ":"))
    except (TypeError, ValueError, OverflowError, InvalidDocument) as exc:
        raise InvalidDocumentError(f"document cannot be encoded as BSON: {exc}") from exc


def encode_value(value: Any) -> str:
    """One BSON value as canonical Extended JSON text (for ids, filters and patches)."""
    if type(value) is int and _INT64_MIN <= value < _INT64_END:
        # The commonest id, spelled as json_util spells it (a property test holds them equal),
        # without its generic conversion: a routed read encodes its _id on every call.
        return (_INT32_TEXT if -_INT32_END <= value < _INT32_END else _INT64_TEXT) % value
    check_storable(value)
    try:
        return json_util.dumps(value, json_options=JSON_OPTIONS, separators=(",", ":"))
    except (TypeError, ValueError, OverflowError, InvalidDocument) as exc:
        raise InvalidDocumentError(f"value cannot be encoded as BSON: {exc}") from exc


def decode_value(text: str | bytes) -> Any:
    """Canonical Extended JSON text back to one value with its BSON type."""
    try:
        return json_util.loads(text, json_options=JSON_OPTIONS)
    except (ValueError, InvalidBSON) as exc:
        raise InvalidDocumentError(f"stored value is not Extended JSON: {exc}") from exc


def decode_document(text: str | bytes) -> dict[str, Any]:
    """Canonical Extended JSON text back to a document with its BSON types."""
    try:
        doc = json_util.loads(text, json_options=JSON_OPTIONS)
    except (ValueError, InvalidBSON) as exc:
        raise InvalidDocumentError(f"stored document is not Extended JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise InvalidDocumentError(f"stored document is not an object: {type(doc).__name__}")
    return doc




_REWRITTEN = ('"$numberDouble"', '"$numberDecimal"')


def canonical_text(stored: str) -> str:
    """A stored document's text as the canonical Extended JSON a reader is given: the stored
    text itself when it already is (no decode, no encode), else decoded and encoded again.

    Stored text is canonical Extended JSON (``encode_document``) as ``jsonb`` prints it: the
    same separators and key order ``json_util.dumps`` of the decoded document gives. Only
    numbers computed by the shard (``$inc``) can be spelled otherwise: PostgreSQL prints the
    double 3.0 as ``"3"`` and the decimal 1E-7 as ``"0.0000001"``; a text with a double or a
    decimal is therefore re-encoded. What may still differ is JSON's own spelling, never a
    value: ``jsonb`` writes non-ASCII characters as UTF-8 where ``json_util`` escapes them
    (``\\u00e9``)."""
    if _REWRITTEN[0] in stored or _REWRITTEN[1] in stored:
        return json_util.dumps(decode_document(stored), json_options=JSON_OPTIONS)
    return stored
