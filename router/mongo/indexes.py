"""Index commands: ``createIndexes``, ``listIndexes``, ``dropIndexes``.

A collection's indexes are the catalog's ``IndexDefinition`` s (equality lookups on one to
four field paths) plus MongoDB's implicit ``_id_``. The commands check a request against the
catalog's definition as the router caches it (an identical index is a no-op; the same name
with other keys or the same keys under another name are MongoDB's conflicts 86 and 85) and
hand a real change to the index DDL runner (``index_ddl``): a worker builds the index on every
shard that holds the collection before the catalog lists it.
"""

from __future__ import annotations

from typing import Any

from router.mongo.common import collection_arg, in_data_database, require_data_database
from router.mongo.errors import MongoError
from router.mongo.index_ddl import DEFAULT_WAIT_S, STATE_KEY, IndexDdl
from router.mongo.registry import Sequences, Session, command
from router.mongo.write_args import check_fields, write_concern
from router.routes import CollectionRoute
from shards.errors import InvalidNameError
from shards.models import IndexDefinition
from shards.names import check_field_path, check_index_name

ID_INDEX = {"v": 2, "key": {"_id": 1}, "name": "_id_"}
_SPEC_FIELDS = frozenset({"key", "name", "v", "background", "ns"})
_UNSUPPORTED_OPTIONS = frozenset({
    "unique", "sparse", "partialFilterExpression", "expireAfterSeconds", "collation",
    "hidden", "wildcardProjection", "weights", "default_language", "language_override",
    "textIndexVersion", "2dsphereIndexVersion", "bits", "min", "max", "bucketSize",
    "storageEngine", "clustered", "prepareUnique", "columnstoreProjection"})
_CREATE_FIELDS = frozenset({"indexes", "commitQuorum"})
_DROP_FIELDS = frozenset({"index"})
_LIST_FIELDS = frozenset({"cursor", "includeBuildUUIDs", "includeIndexBuildInfo"})


def index_document(ix: IndexDefinition) -> dict[str, Any]:
    return {"v": 2, "key": {f: 1 for f in ix.fields}, "name": ix.name}


def parse_spec(spec: Any) -> IndexDefinition | None:
    """A createIndexes spec as the catalog's definition; None for the ``_id`` index."""
    if not isinstance(spec, dict):
        raise MongoError("TypeMismatch", "each index specification must be an object")
    for option in spec:
        if option in _UNSUPPORTED_OPTIONS:
            raise MongoError(
                "CannotCreateIndex",
                f"index option {option!r} is not supported: the router's indexes are plain "
                "equality indexes (a document is unique by its shard key and _id only)")
        if option not in _SPEC_FIELDS:
            raise MongoError("InvalidIndexSpecificationOption",
                             f"The field '{str(option)[:100]}' is not valid for an index "
                             "specification")
    key, name = spec.get("key"), spec.get("name")
    if not isinstance(key, dict) or not key:
        raise MongoError("CannotCreateIndex", "Index keys cannot be an empty field.")
    if not isinstance(name, str) or not name:
        raise MongoError("CannotCreateIndex", "The index name must be a non-empty string")
    fields: list[str] = []
    for path, kind in key.items():
        if isinstance(kind, bool) or kind not in (1, 1.0):
            raise MongoError(
                "CannotCreateIndex",
                f"index key {{{str(path)[:100]}: {kind!r:.40}}} is not supported: only "
                "ascending keys (1) are (the indexes serve equality lookups)")
        try:
            check_field_path(path)
        except InvalidNameError as exc:
            raise MongoError("CannotCreateIndex", str(exc)) from None
        fields.append(path)
    if fields == ["_id"]:
        if name != "_id_":
            raise MongoError("IndexOptionsConflict",
                             f"Index already exists with a different name: _id_ ({name[:100]})")
        return None
    if name == "_id_":
        raise MongoError("BadValue", "The index name '_id_' is reserved for the _id index")
    if len(fields) > 4:
        raise MongoError("CannotCreateIndex", "an index has at most 4 fields")
    try:
        check_index_name(name)
    except InvalidNameError as exc:
        raise MongoError("CannotCreateIndex",
                         f"{exc} (give the index a name: pymongo's create_index(..., "
                         "name='by_field'))") from None
    return IndexDefinition(name=name, fields=tuple(fields))


def _ddl(s: Session) -> IndexDdl:
    runner: IndexDdl | None = s.server.state.get(STATE_KEY)
    if runner is None:
        raise MongoError(
            "CommandNotSupported",
            "index changes are off on this router: they run on a worker, started through "
            "Temporal, and this router holds no Temporal credentials (start it with "
            "`router serve --mongo-index-ddl`), or define indexes with "
            "`shardshift collection create --index`")
    return runner


def _wait_s(cmd: dict[str, Any]) -> float:
    ms = cmd.get("maxTimeMS", 0)
    if isinstance(ms, bool) or not isinstance(ms, int | float) or ms < 0:
        raise MongoError("BadValue", "maxTimeMS must be a non-negative number")
    return ms / 1000 if ms else DEFAULT_WAIT_S


async def _route(s: Session, db: str, coll: str) -> CollectionRoute:
    require_data_database(s, db, coll)
    return await s.router.route(coll)


@command("createIndexes")
async def create_indexes(s: Session, db: str, cmd: dict[str, Any],
                         seqs: Sequences) -> dict[str, Any]:
    check_fields(cmd, "createIndexes", _CREATE_FIELDS)
    coll = collection_arg(s, db, cmd, "createIndexes")
    write_concern(cmd)
    specs = cmd.get("indexes")
    if not isinstance(specs, list) or not specs:
        raise MongoError("BadValue", "Must specify at least one index to create")
    route = await _route(s, db, coll)
    before = len(route.indexes) + 1
    by_name = {ix.name: ix for ix in route.indexes}
    by_fields = {ix.fields: ix for ix in route.indexes}
    wanted: list[IndexDefinition] = []
    for spec in specs:
        ix = parse_spec(spec)
        if ix is None:
            continue
        same_name = by_name.get(ix.name) or next((w for w in wanted if w.name == ix.name), None)
        same_keys = by_fields.get(ix.fields) or next(
            (w for w in wanted if w.fields == ix.fields), None)
        if same_name is not None and same_name.fields != ix.fields:
            raise MongoError(
                "IndexKeySpecsConflict",
                f"An existing index has the same name as the requested index. When index "
                f"names are not specified, they are auto generated and can cause conflicts. "
                f"Requested index: {index_document(ix)}, existing index: "
                f"{index_document(same_name)}")
        if same_keys is not None and same_keys.name != ix.name:
            raise MongoError(
                "IndexOptionsConflict",
                f"Index already exists with a different name: {same_keys.name}")
        if same_name is None:
            wanted.append(ix)
    if not wanted:
        return {"numIndexesBefore": before, "numIndexesAfter": before,
                "createdCollectionAutomatically": False, "note": "all indexes already exist"}
    now = await _ddl(s).change(coll, wanted, [], wait_s=_wait_s(cmd))
    await s.router.refresh(coll)
    return {"numIndexesBefore": before, "numIndexesAfter": len(now) + 1,
            "createdCollectionAutomatically": False}


@command("listIndexes")
async def list_indexes(s: Session, db: str, cmd: dict[str, Any],
                       seqs: Sequences) -> dict[str, Any]:
    check_fields(cmd, "listIndexes", _LIST_FIELDS)
    coll = collection_arg(s, db, cmd, "listIndexes")
    if not in_data_database(s, db):
        raise MongoError("NamespaceNotFound", f"ns does not exist: {db[:64]}.{coll[:100]}")
    route = await s.router.route(coll)
    docs = [dict(ID_INDEX), *(index_document(ix) for ix in route.indexes)]
    return {"cursor": {"id": 0, "ns": f"{db}.{coll}", "firstBatch": docs}}


def _names_to_drop(route: CollectionRoute, index: Any) -> list[str]:
    if index == "*":
        return [ix.name for ix in route.indexes]
    names = {ix.name for ix in route.indexes}
    if isinstance(index, dict):
        fields = tuple(index)
        if fields == ("_id",):
            raise MongoError("InvalidOptions", "cannot drop _id index")
        match = [ix.name for ix in route.indexes if ix.fields == fields
                 and all(v in (1, 1.0) for v in index.values())]
        if not match:
            raise MongoError("IndexNotFound", f"can't find index with key: {index!r:.200}")
        return match
    wanted = index if isinstance(index, list) else [index]
    if not wanted or not all(isinstance(n, str) for n in wanted):
        raise MongoError("TypeMismatch", "index must be a name, an array of names, a key "
                                         "pattern or '*'")
    for name in wanted:
        if name == "_id_":
            raise MongoError("InvalidOptions", "cannot drop _id index")
        if name == "*":
            raise MongoError("BadValue", "'*' cannot be given in an array of index names")
        if name not in names:
            raise MongoError("IndexNotFound", f"index not found with name [{name[:100]}]")
    return list(dict.fromkeys(wanted))


@command("dropIndexes", "deleteIndexes")
async def drop_indexes(s: Session, db: str, cmd: dict[str, Any],
                       seqs: Sequences) -> dict[str, Any]:
    name = next(iter(cmd))
    check_fields(cmd, name, _DROP_FIELDS)
    coll = collection_arg(s, db, cmd, name)
    write_concern(cmd)
    if "index" not in cmd:
        raise MongoError("FailedToParse", "BSON field 'dropIndexes.index' is missing but a "
                                          "required field")
    route = await _route(s, db, coll)
    names = _names_to_drop(route, cmd["index"])
    reply: dict[str, Any] = {"nIndexesWas": len(route.indexes) + 1}
    if cmd["index"] == "*":
        reply["msg"] = "non-_id indexes dropped for collection"
    if names:
        await _ddl(s).change(coll, [], names, wait_s=_wait_s(cmd))
        await s.router.refresh(coll)
    return reply

