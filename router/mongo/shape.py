"""What ``find`` does to the documents a filter selects: projection and sort.

Projection: inclusion (``{a: 1, "b.c": 1}``; ``_id`` too unless ``_id: 0``) or exclusion
(``{a: 0}``), of top-level and dotted fields (through arrays of documents, as MongoDB does).
Operators (``$slice``, ``$elemMatch``, ``$meta``, positional ``a.$``) and computed fields are
refused with ``NotImplemented``. Sort: several keys, 1 or -1, in MongoDB's order across types;
an array field sorts by its least (ascending) or greatest (descending) element.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from router.mongo.errors import CODES, MongoError
from router.mongo.ordering import MISSING, is_number, number_value, sort_key, values_at
from router.mongo.query import check_path

for _name, _code in (("Location31249", 31249), ("Location31253", 31253),
                     ("Location31254", 31254), ("Location15975", 15975)):
    CODES.setdefault(_name, _code)  # MongoDB's codes for projection and sort errors

_Tree = dict[str, Any]  # field -> True (the whole field) or a subtree


@dataclass(frozen=True)
class Projection:
    include: bool
    tree: _Tree
    keep_id: bool

    def apply(self, doc: Mapping[str, Any]) -> dict[str, Any]:
        if self.include:
            out = _include(doc, self.tree)
            if self.keep_id and "_id" in doc:
                out = {"_id": doc["_id"], **{k: v for k, v in out.items() if k != "_id"}}
            return out
        out = _exclude(doc, self.tree)
        if not self.keep_id:
            out.pop("_id", None)
        return out


def _truthy(path: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if is_number(v):
        return bool(number_value(v) != 0)
    if isinstance(v, Mapping) and v and str(next(iter(v))).startswith("$"):
        raise MongoError("NotImplemented",
                         f"projection operator {str(next(iter(v)))[:64]} is not supported")
    raise MongoError("NotImplemented",
                     f"computed projection of {path[:64]!r} is not supported; use 1 or 0")


def parse_projection(spec: Any) -> Projection | None:
    if spec is None:
        return None
    if not isinstance(spec, Mapping):
        raise MongoError("TypeMismatch", "projection must be an object")
    if not spec:
        return None
    include: bool | None = None
    keep_id = True
    tree: _Tree = {}
    for path, value in spec.items():
        if isinstance(path, str) and (path.endswith(".$") or path == "$"):
            raise MongoError("NotImplemented", "the positional projection is not supported")
        parts = check_path(path)
        on = _truthy(path, value)
        if path == "_id":
            keep_id = on
            if on:
                continue
            if include is None or not include:
                _add(tree, parts, path)
            continue
        if include is None:
            include = on
        elif include != on:
            if include:
                raise MongoError("Location31254", f"Cannot do exclusion on field {path[:100]} "
                                 "in inclusion projection")
            raise MongoError("Location31253", f"Cannot do inclusion on field {path[:100]} "
                             "in exclusion projection")
        _add(tree, parts, path)
    if include is None:  # only _id was named
        include = keep_id
        if include:
            return Projection(True, {"_id": True}, True)
        return Projection(False, {}, False)
    if include:
        tree.pop("_id", None)
    return Projection(include, tree, keep_id)


def _add(tree: _Tree, parts: tuple[str, ...], path: str) -> None:
    node = tree
    for i, p in enumerate(parts):
        last = i == len(parts) - 1
        cur = node.get(p)
        if cur is True or (last and cur is not None):
            raise MongoError("Location31249", f"Path collision at {path[:100]}")
        if last:
            node[p] = True
        else:
            node = node.setdefault(p, {})


def _include(doc: Mapping[str, Any], tree: _Tree) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in doc.items():
        sub = tree.get(k)
        if sub is None:
            continue
        if sub is True:
            out[k] = v
        elif isinstance(v, Mapping):
            out[k] = _include(v, sub)
        elif isinstance(v, list):
            out[k] = [_include(e, sub) for e in v if isinstance(e, Mapping)]
    return out


def _exclude(doc: Mapping[str, Any], tree: _Tree) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in doc.items():
        sub = tree.get(k)
        if sub is True:
            continue
        if sub is None:
            out[k] = v
        elif isinstance(v, Mapping):
            out[k] = _exclude(v, sub)
        elif isinstance(v, list):
            out[k] = [_exclude(e, sub) if isinstance(e, Mapping) else e for e in v]
        else:
            out[k] = v
    return out


# -- sort --------------------------------------------------------------------------------------

_EMPTY_ARRAY = (1.5,)
"""An empty array sorts after MinKey, before null (as MongoDB's 'undefined')."""

SortSpec = list[tuple[tuple[str, ...], int]]


def parse_sort(spec: Any) -> SortSpec:
    if spec is None:
        return []
    if not isinstance(spec, Mapping):
        raise MongoError("TypeMismatch", "sort must be an object")
    out: SortSpec = []
    for path, value in spec.items():
        parts = check_path(path)
        if isinstance(value, Mapping):
            raise MongoError("NotImplemented", "sorting by $meta is not supported")
        if (isinstance(value, bool) or not is_number(value)
                or number_value(value) not in (1, -1)):
            raise MongoError("Location15975", "$sort key ordering must be 1 (for ascending) "
                             "or -1 (for descending)")
        out.append((parts, int(number_value(value))))
    return out


def _field_key(doc: Mapping[str, Any], parts: tuple[str, ...], direction: int
               ) -> tuple[Any, ...]:
    keys: list[tuple[Any, ...]] = []
    for x in values_at(doc, parts):
        if isinstance(x, list):
            keys.extend(sort_key(e) for e in x)
            if not x:
                keys.append(_EMPTY_ARRAY)
        else:
            keys.append(sort_key(None if x is MISSING else x))
    return min(keys) if direction > 0 else max(keys)


def sort_key_fn(spec: SortSpec) -> Callable[[Mapping[str, Any]], Any]:
    """A key for ``sorted``/``heapq`` that orders documents by ``spec``."""
    def cmp(a: tuple[tuple[Any, ...], ...], b: tuple[tuple[Any, ...], ...]) -> int:
        for (ka, kb), (_, direction) in zip(zip(a, b, strict=True), spec, strict=True):
            if ka != kb:
                return (1 if ka > kb else -1) * direction
        return 0

    wrap = functools.cmp_to_key(cmp)

    def key(doc: Mapping[str, Any]) -> Any:
        return wrap(tuple(_field_key(doc, parts, d) for parts, d in spec))

    return key
