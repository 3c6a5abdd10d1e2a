"""Documents as canonical MongoDB Extended JSON (v2) text, for a ``jsonb`` column.

Canonical mode keeps every BSON type distinct (``{"$numberInt": "1"}`` vs ``{"$numberLong":
"1"}`` vs ``{"$numberDouble": "1.0"}``, ``$numberDecimal`` for Decimal128), so an ObjectId,
a datetime, a Decimal128 money amount or an int64 reads back as the same Python value; money
never passes through float. ``jsonb`` normalizes key order, so a document's field order is not
preserved (equality of documents as mappings is).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bson import json_util
from bson.binary import UuidRepresentation
from bson.errors import InvalidBSON, InvalidDocument

from shards.errors import InvalidDocumentError

JSON_OPTIONS = json_util.CANONICAL_JSON_OPTIONS.with_options(
    uuid_representation=UuidRepresentation.STANDARD, tz_aware=True
)


def encode_document(doc: Mapping[str, Any]) -> str:
    """A document as canonical Extended JSON text."""
    if not isinstance(doc, Mapping):
        raise InvalidDocumentError(f"a document must be a mapping, not {type(doc).__name__}")
    try:
        return json_util.dumps(doc, json_options=JSON_OPTIONS, separators=(",", ":"))
    except (TypeError, ValueError, OverflowError, InvalidDocument) as exc:
        raise InvalidDocumentError(f"document cannot be encoded as BSON: {exc}") from exc


def encode_value(value: Any) -> str:
    """One BSON value as canonical Extended JSON text (for ids, filters and patches)."""
    try:
        return json_util.dumps(value, json_options=JSON_OPTIONS, separators=(",", ":"))
    except (TypeError, ValueError, OverflowError, InvalidDocument) as exc:
        raise InvalidDocumentError(f"value cannot be encoded as BSON: {exc}") from exc


def decode_document(text: str | bytes) -> dict[str, Any]:
    """Canonical Extended JSON text back to a document with its BSON types."""
    try:
        return json_util.loads(text, json_options=JSON_OPTIONS)
    except (ValueError, InvalidBSON) as exc:
        raise InvalidDocumentError(f"stored document is not Extended JSON: {exc}") from exc


decode_value = decode_document
