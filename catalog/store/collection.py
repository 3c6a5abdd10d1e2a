"""Collections: their definition (shard key, secondary indexes) and their initial chunks.

Creating a collection records metadata only, pre-split into equal-width chunks of the khash
space placed round-robin on active shards; the shards' tables and fence rows are the
caller's (``catalog.admin.provision_collection`` does both). Creating and dropping are
``LAYOUT`` changes of the collection.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from psycopg import AsyncCursor
from psycopg.types.json import Jsonb

from catalog.errors import CollectionExistsError, ShardStateError
from catalog.models import ChangeKind, ChunkMap, CollectionInfo, ShardState
from catalog.store.checks import check_shard_id
from catalog.store.rows import (
    COLLECTION_SELECT,
    collection_in,
    map_in,
    one,
    refuse_busy,
    shard_in,
    to_collection,
)
from catalog.store.txn import CatalogBase, bump
from shards.models import KHASH_END, KHASH_MIN, IndexDefinition, KeyRange
from shards.names import check_collection, check_field_path

MAX_CHUNKS_PER_COLLECTION_CREATE = 65_536


class Collections(CatalogBase):
    """Create, drop and read collections."""

    async def create_collection(
        self,
        name: str,
        shard_key: str,
        indexes: Sequence[IndexDefinition] = (),
        shards: Sequence[str] = (),
        *,
        chunks_per_shard: int = 1,
    ) -> ChunkMap:
        """Create a collection pre-split into ``len(shards) * chunks_per_shard`` chunks.

        The khash space is cut into equal-width chunks assigned round-robin to ``shards`` (in
        the given order), each at token 1. Records metadata only: the caller creates tables
        and fence rows on the shards (``catalog.admin.provision_collection`` does both).

        Creating a collection that exists with the same shard key and indexes returns its
        current map (a retried provisioning); a different definition is refused.

        Raises:
            InvalidNameError: a malformed collection name, shard key or shard id.
            UnknownShardError, ShardStateError: a shard that is unknown or not active.
            CollectionExistsError: the name is taken by a different definition.
        """
        check_collection(name)
        check_field_path(shard_key)
        idx = tuple(IndexDefinition.model_validate(i) for i in indexes)
        if len({i.name for i in idx}) != len(idx):
            raise ValueError(f"collection {name}: index names must be unique")
        shard_ids = [check_shard_id(s) for s in shards]
        if not shard_ids:
            raise ValueError(f"collection {name}: name at least one shard to place chunks on")
        if len(set(shard_ids)) != len(shard_ids):
            raise ValueError(f"collection {name}: shard ids must be distinct, got {shard_ids}")
        if chunks_per_shard < 1:
            raise ValueError("chunks_per_shard must be at least 1")
        k = chunks_per_shard * len(shard_ids)
        if k > MAX_CHUNKS_PER_COLLECTION_CREATE:
            raise ValueError(
                f"{k} initial chunks is more than {MAX_CHUNKS_PER_COLLECTION_CREATE}; "
                "pre-split less and let splits follow the data"
            )
        ranges = KeyRange(lo=KHASH_MIN, hi=KHASH_END).split(k)
        index_json = [i.model_dump(mode="json") for i in idx]

        async def body(cur: AsyncCursor[Any]) -> ChunkMap:
            row = await one(cur, COLLECTION_SELECT + " WHERE name = %s FOR UPDATE", (name,))
            if row is not None:
                existing = to_collection(row)
                if existing.shard_key != shard_key or existing.indexes != idx:
                    raise CollectionExistsError(
                        f"collection {name!r} already exists with shard key "
                        f"{existing.shard_key!r} and indexes "
                        f"{[i.name for i in existing.indexes]}; pick another name"
                    )
                return await map_in(cur, name)
            for sid in shard_ids:
                info = await shard_in(cur, sid)
                if info.state != ShardState.ACTIVE:
                    raise ShardStateError(
                        f"shard {sid!r} is {info.state}; only active shards receive chunks"
                    )
            await cur.execute(
                "INSERT INTO catalog.collections (name, shard_key, indexes, layout_version)"
                " VALUES (%s, %s, %s, 0)",
                (name, shard_key, Jsonb(index_json)),
            )
            await cur.execute(
                "SELECT nextval('catalog.chunk_ids') FROM generate_series(1, %s)", (k,)
            )
            ids = [r[0] for r in await cur.fetchall()]
            await cur.execute(
                "INSERT INTO catalog.chunks (collection, chunk_id, lo, hi, shard_id, token)"
                " SELECT %s, * , 1 FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[],"
                " %s::text[])",
                (name, ids, [r.lo for r in ranges], [r.sql_hi for r in ranges],
                 [shard_ids[i % len(shard_ids)] for i in range(k)]),
            )
            await bump(cur, ChangeKind.LAYOUT, name)
            return await map_in(cur, name)

        return await self._txn(body)

    async def drop_collection(self, name: str) -> bool:
        """Remove a collection and its chunks from the catalog; False if it did not exist.

        The shards' tables and fence rows are the caller's to remove afterwards.

        Raises:
            ChunkBusyError: a chunk of the collection is moving.
        """
        check_collection(name)

        async def body(cur: AsyncCursor[Any]) -> bool:
            row = await one(cur, "SELECT 1 FROM catalog.collections WHERE name = %s FOR UPDATE",
                             (name,))
            if row is None:
                return False
            await refuse_busy(cur, name, None)
            await cur.execute("DELETE FROM catalog.collections WHERE name = %s", (name,))
            await bump(cur, ChangeKind.LAYOUT, name)
            return True

        return await self._txn(body)

    async def change_indexes(
        self,
        name: str,
        create: Sequence[IndexDefinition],
        drop: Sequence[str],
        apply: Callable[[list[str]], Awaitable[None]],
    ) -> CollectionInfo:
        """Add ``create`` to a collection's secondary indexes and remove those named in
        ``drop``, after ``apply(shard ids)`` has made the shards holding its chunks match
        (built or dropped there). The new list is computed under the row lock.

        The collection's row stays locked while ``apply`` runs, and a live migration of any
        of its chunks refuses the change (``ChunkBusyError``); ``register_migration`` takes
        the same row lock, so a move registered during the change waits for it and then
        creates its target with the new definition. Index DDL and moves therefore never
        overlap: every shard that holds or receives a chunk ends with the catalog's indexes.
        ``apply`` must be idempotent (a serialization retry runs it again).

        Raises:
            UnknownCollectionError, ChunkBusyError; ValueError for duplicate index names.
        """
        check_collection(name)
        new = tuple(IndexDefinition.model_validate(i) for i in create)
        dropped = set(drop)

        async def body(cur: AsyncCursor[Any]) -> CollectionInfo:
            row = await one(cur, COLLECTION_SELECT + " WHERE name = %s FOR UPDATE", (name,))
            if row is None:
                await collection_in(cur, name)  # raises UnknownCollectionError
            assert row is not None
            idx = tuple([i for i in to_collection(row).indexes if i.name not in dropped]
                        + [i for i in new if i.name not in dropped])
            idx = tuple(dict.fromkeys(idx))
            if len({i.name for i in idx}) != len(idx):
                raise ValueError(f"collection {name}: index names must be unique")
            await refuse_busy(cur, name, None)
            await cur.execute("SELECT DISTINCT shard_id FROM catalog.chunks WHERE collection = %s"
                              " ORDER BY shard_id", (name,))
            await apply([r[0] for r in await cur.fetchall()])
            await cur.execute("UPDATE catalog.collections SET indexes = %s WHERE name = %s",
                              (Jsonb([i.model_dump(mode="json") for i in idx]), name))
            await bump(cur, ChangeKind.LAYOUT, name)
            return await collection_in(cur, name)

        return await self._txn(body)

    async def collection(self, name: str) -> CollectionInfo:
        """One collection's definition. Raises ``UnknownCollectionError``."""
        check_collection(name)

        async def body(cur: AsyncCursor[Any]) -> CollectionInfo:
            return await collection_in(cur, name)

        return await self._txn(body, read_only=True)
