"""The contract of a shard storage engine, and what a move uses besides it.

A move reaches a shard only through ``shards/``: ``activities/`` and ``workflows/`` hold no SQL
and import no database driver (``tests/test_seams.py`` fails if one does). Inside ``shards/``
there are two kinds of interface, and only the first is engine-neutral today:

- **This protocol** (:class:`DocumentShard`): documents and fences, async (the router's hot
  path, and every fence transition of a move: register, freeze, activate, unfreeze, retire).
- **The engine's data-movement and server functions**, blocking, run in activity worker
  threads where they heartbeat through the ``progress`` callback they are given. For
  PostgreSQL they are the modules of ``shards.postgres``: ``snapshot`` (export),
  ``bulk_import``, ``replication`` (slots, publications, the change stream), ``apply``,
  ``checksum``, ``range_delete``, ``inventory`` (what the doctor lists), ``locks`` (the
  cutover lock) and ``server`` (reachability, what a driver error means). The activities
  import them by name, so another database (MongoDB, say) standing beside ``shards.postgres``
  needs the same set of functions, or this protocol grown to cover them.

Errors that activities act on are shardshift's own (``shards/errors.py``, and
``server.is_connection_error`` for "the connection was lost"), never the driver's types.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from shards.models import Fence, FenceRef, FenceState, IndexDefinition, KeyRange


@runtime_checkable
class DocumentShard(Protocol):
    """Documents and fences of one shard."""

    shard_id: str
    engine: str

    async def ensure_schema(self) -> None: ...
    async def create_collection(
        self, collection: str, indexes: Sequence[IndexDefinition] = ()
    ) -> None: ...
    async def drop_index(self, collection: str, name: str) -> None: ...

    # fences: the version-token protocol of the cutover
    async def fences(self, collection: str | None = None) -> list[Fence]: ...
    async def fence(self, collection: str, chunk_id: int) -> Fence | None: ...
    async def put_fence(
        self, collection: str, chunk_id: int, key_range: KeyRange, token: int,
        state: FenceState, migration_id: str | None = None,
    ) -> Fence: ...
    async def freeze(self, collection: str, chunk_id: int, token: int) -> tuple[Fence, str]: ...
    async def freeze_fence(self, collection: str, chunk_id: int, token: int) -> Fence: ...
    async def wal_lsn(self) -> str: ...
    async def unfreeze(self, collection: str, chunk_id: int, frozen_token: int) -> Fence: ...
    async def activate(self, collection: str, chunk_id: int, token: int) -> Fence: ...
    async def retire(self, collection: str, chunk_id: int) -> Fence: ...
    async def drop_fence(self, collection: str, chunk_id: int) -> None: ...

    # fenced single-document operations (each one round trip)
    async def insert(
        self, collection: str, ref: FenceRef, khash: int, doc: Mapping[str, Any]
    ) -> None: ...
    async def replace(
        self, collection: str, ref: FenceRef, khash: int, doc: Mapping[str, Any]
    ) -> bool: ...
    async def replace_pinned(
        self, collection: str, ref: FenceRef, khash: int, shard_key: str,
        doc: Mapping[str, Any],
    ) -> tuple[int, int]: ...
    async def patch(
        self, collection: str, ref: FenceRef, khash: int, _id: Any,
        update: Mapping[str, Any], protected: Sequence[str] = ("_id",),
    ) -> dict[str, Any] | None: ...
    async def delete(self, collection: str, ref: FenceRef, khash: int, _id: Any) -> bool: ...
    async def get(
        self, collection: str, ref: FenceRef, khash: int, _id: Any
    ) -> dict[str, Any] | None: ...
    async def get_text(
        self, collection: str, ref: FenceRef, khash: int, _id: Any
    ) -> str | None: ...
    async def get_many(
        self, collection: str, ref: FenceRef, khash: int, ids: Sequence[Any]
    ) -> list[dict[str, Any]]: ...
    async def find_by_shard_key(
        self, collection: str, ref: FenceRef, khash: int, shard_key: str, value: Any,
        limit: int = 1000,
    ) -> list[dict[str, Any]]: ...
    async def find_by_field(
        self, collection: str, refs: Sequence[FenceRef], path: str, value: Any,
        limit: int = 1000,
    ) -> list[dict[str, Any]]: ...
    async def scan_page(
        self, collection: str, ref: FenceRef, key_range: KeyRange, after: tuple[int, str],
        limit: int,
        *, ids: Sequence[Any] | None = None, field: str | None = None,
        values: Sequence[Any] | None = None, khashes: Sequence[int] | None = None,
        budget: int = 4 * 1024 * 1024, stop: int | None = None,
    ) -> tuple[list[tuple[int, str, dict[str, Any]]], bool]: ...
    async def count_chunks(self, collection: str, refs: Sequence[FenceRef]) -> int: ...
