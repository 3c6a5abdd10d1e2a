"""The paths a load generator drives: the router core in-process, or a MongoDB driver through
the router's wire-protocol front end.

Both do the same five operations on one document, named by shard key and ``_id``, and both
tell an operation whose outcome is unknown (it may or may not have been applied) from one
that failed for certain, so the generator resolves the first kind by reading back:

* ``RouterStore``: ``router.core.Router`` calls; ``OutcomeUnknownError`` is unknown.
* ``MongoStore``: ``pymongo.AsyncMongoClient`` against ``router serve --mongo-port`` (or the
  front end in-process); an error labelled ``ShardshiftOutcomeUnknown`` or a network error
  (the reply never came) is unknown. The driver never retries a write on its own: the front
  end announces no sessions, so retryable writes are off.
"""

from __future__ import annotations

from typing import Any, Protocol

from pymongo import AsyncMongoClient
from pymongo.errors import ConnectionFailure, PyMongoError

from router.core import Router
from router.errors import OutcomeUnknownError
from router.mongo.errors_map import OUTCOME_UNKNOWN_LABEL
from settings import DEV_MONGO_PASSWORD, DEV_MONGO_USER


class DocumentStore(Protocol):
    """One document at a time, by shard key and ``_id``."""

    path: str
    """What the operations go through, for reports (``router-core``, ``mongo-wire``)."""

    async def insert(self, collection: str, doc: dict[str, Any]) -> None: ...

    async def replace(self, collection: str, key: Any, doc: dict[str, Any]) -> bool: ...

    async def patch(self, collection: str, key: Any, _id: Any,
                    update: dict[str, Any]) -> bool: ...

    async def delete(self, collection: str, key: Any, _id: Any) -> bool: ...

    async def get(self, collection: str, key: Any, _id: Any) -> dict[str, Any] | None: ...

    def outcome_unknown(self, exc: BaseException) -> bool:
        """Might the failed write ``exc`` have been applied?"""
        ...


class RouterStore:
    """The router core, called in-process (the path the HTTP API also takes)."""

    path = "router-core"

    def __init__(self, router: Router) -> None:
        self.router = router

    async def insert(self, collection: str, doc: dict[str, Any]) -> None:
        await self.router.insert(collection, doc)

    async def replace(self, collection: str, key: Any, doc: dict[str, Any]) -> bool:
        return await self.router.replace(collection, doc)

    async def patch(self, collection: str, key: Any, _id: Any, update: dict[str, Any]) -> bool:
        return await self.router.patch(collection, key, _id, update) is not None

    async def delete(self, collection: str, key: Any, _id: Any) -> bool:
        return await self.router.delete(collection, key, _id)

    async def get(self, collection: str, key: Any, _id: Any) -> dict[str, Any] | None:
        return await self.router.get(collection, key, _id)

    def outcome_unknown(self, exc: BaseException) -> bool:
        return isinstance(exc, OutcomeUnknownError)


def mongo_uri(host: str, port: int, user: str = DEV_MONGO_USER,
              password: str = DEV_MONGO_PASSWORD, *, tls: bool = False) -> str:
    """The connection string of a front end, authenticating against ``admin``."""
    return (f"mongodb://{user}:{password}@{host}:{port}/?authSource=admin"
            + ("&tls=true" if tls else ""))


class MongoStore:
    """``pymongo.AsyncMongoClient`` through the router's MongoDB front end."""

    path = "mongo-wire"

    def __init__(self, uri: str, database: str = "shardshift", shard_key: str = "acct",
                 **client_kw: Any) -> None:
        client_kw.setdefault("tz_aware", True)
        client_kw.setdefault("uuidRepresentation", "standard")
        client_kw.setdefault("serverSelectionTimeoutMS", 10_000)
        self.client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri, **client_kw)
        self.db = self.client[database]
        self.shard_key = shard_key

    def _filter(self, key: Any, _id: Any) -> dict[str, Any]:
        return {self.shard_key: key, "_id": _id}

    async def insert(self, collection: str, doc: dict[str, Any]) -> None:
        await self.db[collection].insert_one(doc)

    async def insert_many(self, collection: str, docs: list[dict[str, Any]]) -> int:
        res = await self.db[collection].insert_many(docs, ordered=False)
        return len(res.inserted_ids)

    async def replace(self, collection: str, key: Any, doc: dict[str, Any]) -> bool:
        res = await self.db[collection].replace_one(self._filter(key, doc["_id"]), doc)
        return res.matched_count == 1

    async def patch(self, collection: str, key: Any, _id: Any, update: dict[str, Any]) -> bool:
        res = await self.db[collection].update_one(self._filter(key, _id), update)
        return res.matched_count == 1

    async def delete(self, collection: str, key: Any, _id: Any) -> bool:
        res = await self.db[collection].delete_one(self._filter(key, _id))
        return res.deleted_count == 1

    async def get(self, collection: str, key: Any, _id: Any) -> dict[str, Any] | None:
        return await self.db[collection].find_one(self._filter(key, _id))

    def outcome_unknown(self, exc: BaseException) -> bool:
        if isinstance(exc, ConnectionFailure):
            return True  # the request may have reached the router before the connection broke
        return isinstance(exc, PyMongoError) and exc.has_error_label(OUTCOME_UNKNOWN_LABEL)

    async def close(self) -> None:
        await self.client.close()
