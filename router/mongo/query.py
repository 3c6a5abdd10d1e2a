"""Query filters: parsing, matching, and finding the documents a filter selects.

The interface command modules use (reads, writes, findAndModify):

* ``parse_filter(doc)`` -> ``Filter`` (``MongoError`` BadValue for what is not supported);
* ``matches(doc, f)`` -> whether a document satisfies the filter (MongoDB semantics);
* ``pinned(route, f)`` -> ``(shard key value, _id)`` when the filter selects at most one
  document by equality on both (the single-document fast path), else None;
* ``find_matching(router, collection, f, limit=...)`` -> the matching documents (fenced reads:
  routed to one chunk when the filter pins the shard key, else scattered to the owning shards).

This first version supports equality on top-level and dotted fields only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from router.core import Router, field_value
from router.mongo.errors import MongoError
from router.routes import CollectionRoute

_MISSING = object()


@dataclass(frozen=True)
class Filter:
    """A validated filter document."""

    doc: dict[str, Any]

    def equality(self, path: str) -> Any:
        """The value the filter requires ``path`` to equal, or ``_MISSING``."""
        value = self.doc.get(path, _MISSING)
        if isinstance(value, dict) and any(str(k).startswith("$") for k in value):
            return _MISSING
        return value


def parse_filter(doc: Any) -> Filter:
    if doc is None:
        return Filter({})
    if not isinstance(doc, dict):
        raise MongoError("TypeMismatch", "filter must be an object")
    for key, value in doc.items():
        if str(key).startswith("$") or (
                isinstance(value, dict) and any(str(k).startswith("$") for k in value)):
            raise MongoError("BadValue", f"unsupported query operator in {str(key)[:64]!r}")
    return Filter(doc)


def matches(doc: dict[str, Any], f: Filter) -> bool:
    return all(field_value(doc, path) == value for path, value in f.doc.items())


def pinned(route: CollectionRoute, f: Filter) -> tuple[Any, Any] | None:
    key, _id = f.equality(route.shard_key), f.equality("_id")
    if key is _MISSING or _id is _MISSING:
        return None
    return key, _id


async def find_matching(router: Router, collection: str, f: Filter, *,
                        limit: int | None = None) -> list[dict[str, Any]]:
    route = await router.route(collection)
    one = pinned(route, f)
    if one is not None:
        doc = await router.get(collection, *one)
        return [doc] if doc is not None and matches(doc, f) else []
    if len(f.doc) == 1:
        docs = await router.find(collection, f.doc, limit=min(limit or 10_000, 10_000))
        return [d for d in docs if matches(d, f)]
    raise MongoError("BadValue", "this filter shape is not supported yet")
