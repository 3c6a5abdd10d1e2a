"""``PostgresShard``: the PostgreSQL document shard engine (one instance per shard).

Document and fence operations are async (the router's hot path, over a connection pool).
Data movement (snapshot export, bulk import, change stream and apply, checksums, range delete)
lives in its sibling modules as blocking functions that activities run in worker threads;
``PostgresShard`` hands them the shard's DSN.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg import sql

from shards.codec import decode_document, encode_value
from shards.errors import DuplicateDocumentError, FenceStateError
from shards.models import KHASH_END, Fence, FenceRef, FenceState, IndexDefinition, KeyRange
from shards.names import check_collection, check_field_path, check_index_name
from shards.postgres import documents as D
from shards.postgres.pool import KEEP_RESULT_CHARS, ShardPool
from shards.postgres.schema import (
    DDL,
    DOCS,
    collection_ddl,
    collection_table,
    field_expr,
    index_table_name,
)
from shards.postgres.throttle import FENCE_CHANNEL

_DDL_LOCK = 0x5348_4152_4453_4846  # "SHARDSHF": serializes schema DDL across processes



Session = psycopg.AsyncConnection[Any]
"""A session of its own on a shard (``PostgresShard.connect_async``), held by a caller that
must not import the driver (activities: see tests/test_seams.py)."""

class PostgresShard:
    """One PostgreSQL shard: its documents, fences and (via sibling modules) data movement."""

    engine = "postgres"

    def __init__(
        self, shard_id: str, dsn: str, *, min_size: int = 1, max_size: int = 8,
        check: bool = False, connect_timeout_s: float = 5.0, breaker_open_s: float = 1.0,
    ) -> None:
        """Args:
            check: test each pooled connection before use (one extra round trip), for
                control-plane callers. Document operations need no round trip for it: the
                pool skips connections the server has hung up on (``pool.hung_up``), so after
                a shard restart even inserts and ``$inc`` run on fresh connections.
            connect_timeout_s: upper bound of one connection attempt.
            breaker_open_s: after a failed connect, callers fail fast this long
                (``ShardUnavailableError``) before one of them tries again.
        """
        self.shard_id = shard_id
        self._pool = ShardPool(
            shard_id, dsn, min_size=min_size, max_size=max_size, check=check,
            connect_timeout_s=connect_timeout_s, breaker_open_s=breaker_open_s,
        )
        self._statements: dict[str, D.DocumentStatements] = {}
        self._find_sql: dict[tuple[Any, ...], bytes] = {}

    @property
    def dsn(self) -> str:
        """The shard's current address."""
        return self._pool.dsn

    def set_dsn(self, dsn: str) -> None:
        """Follow a shard re-registered at a new address: new connections go there, old ones
        are closed as they come back (nothing in flight is interrupted)."""
        self._pool.set_dsn(dsn)

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self, *, wait: bool = True) -> PostgresShard:
        """Open the pool; with ``wait`` (the default) connect first, so an unreachable shard
        raises ``ShardUnavailableError`` here; without, connect on first use."""
        await self._pool.open(wait=wait)
        return self

    async def close(self) -> None:
        await self._pool.close()

    async def __aenter__(self) -> PostgresShard:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A pooled connection the server has not hung up on."""
        async with self._pool.connection() as conn:
            yield conn

    @asynccontextmanager
    async def _connection_or(self, conn: psycopg.AsyncConnection[Any] | None
                             ) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """``conn`` when given (a session the caller opened beforehand), else a pooled one."""
        if conn is not None:
            yield conn
        else:
            async with self._connection() as pooled:
                yield pooled

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        """A new blocking connection to this shard (for data-movement code in threads)."""
        return psycopg.connect(self.dsn, **kwargs)

    async def connect_async(self, **kwargs: Any) -> Session:
        """A new async connection outside the pool (autocommit)."""
        return await psycopg.AsyncConnection.connect(self.dsn, autocommit=True, **kwargs)

    # -- schema ------------------------------------------------------------------------------

    async def ensure_schema(self) -> None:
        async with self._connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_DDL_LOCK,))
            await conn.execute(DDL)

    async def create_collection(
        self, collection: str, indexes: Sequence[IndexDefinition] = ()
    ) -> None:
        """Create the collection's table and secondary indexes (idempotent).

        Indexes are created before any data is loaded, as the design requires for targets.
        """
        check_collection(collection)
        async with self._connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_DDL_LOCK,))
            await conn.execute(collection_ddl(collection))
            for index in indexes:
                exprs = sql.SQL(", ").join(
                    sql.SQL("({})").format(field_expr(check_field_path(f))) for f in index.fields
                )
                await conn.execute(
                    sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} ({})").format(
                        sql.Identifier(index_table_name(collection, index.name)),
                        collection_table(collection),
                        exprs,
                    )
                )

    async def collections(self) -> list[str]:
        async with self._connection() as conn:
            rows = await conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'docs' ORDER BY 1"
            )
            return [r[0] for r in await rows.fetchall()]

    async def drop_index(self, collection: str, name: str) -> None:
        """Drop one secondary index of a collection (idempotent)."""
        check_collection(collection)
        check_index_name(name)
        async with self._connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_DDL_LOCK,))
            await conn.execute(sql.SQL("DROP INDEX IF EXISTS {}.{}").format(
                sql.Identifier(DOCS), sql.Identifier(index_table_name(collection, name))))

    async def drop_collection(self, collection: str) -> None:
        check_collection(collection)
        async with self._connection() as conn, conn.transaction():
            await conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(collection_table(collection)))
            await conn.execute(
                "DELETE FROM shardshift.chunk_fence WHERE collection = %s", (collection,)
            )

    # -- fences ------------------------------------------------------------------------------

    async def fences(self, collection: str | None = None) -> list[Fence]:
        async with self._connection() as conn:
            cur = await conn.execute(
                "SELECT collection, chunk_id, lo, hi, token, state FROM shardshift.chunk_fence"
                " WHERE %(c)s::text IS NULL OR collection = %(c)s ORDER BY collection, lo",
                {"c": collection},
            )
            return [_fence(row) for row in await cur.fetchall()]

    async def fence(self, collection: str, chunk_id: int) -> Fence | None:
        async with self._connection() as conn:
            cur = await conn.execute(
                "SELECT collection, chunk_id, lo, hi, token, state FROM shardshift.chunk_fence"
                " WHERE collection = %s AND chunk_id = %s",
                (collection, chunk_id),
            )
            row = await cur.fetchone()
            return _fence(row) if row else None

    async def put_fence(
        self,
        collection: str,
        chunk_id: int,
        key_range: KeyRange,
        token: int,
        state: FenceState,
        migration_id: str | None = None,
    ) -> Fence:
        """Create a fence row, or confirm an identical one exists (idempotent)."""
        check_collection(collection)
        async with self._connection() as conn:
            await conn.execute(
                "INSERT INTO shardshift.chunk_fence"
                " (collection, chunk_id, lo, hi, token, state, migration_id)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                (collection, chunk_id, key_range.lo, key_range.sql_hi, token, state.value,
                 migration_id),
            )
        existing = await self.fence(collection, chunk_id)
        assert existing is not None
        if existing.range != key_range or (existing.token, existing.state) != (token, state):
            raise FenceStateError(
                f"{self.shard_id}: chunk {collection}/{chunk_id} already has a fence "
                f"{existing.range.lo}..{existing.range.hi} token {existing.token} "
                f"({existing.state}); wanted token {token} ({state})"
            )
        return existing

    async def transition(
        self,
        collection: str,
        chunk_id: int,
        *,
        expect_token: int,
        expect_state: Sequence[FenceState],
        new_token: int,
        new_state: FenceState,
    ) -> Fence:
        """Compare-and-set a fence row; already in the wanted state is success (idempotent)."""
        async with self._connection() as conn:
            cur = await conn.execute(
                "UPDATE shardshift.chunk_fence SET token = %s, state = %s, updated_at = now()"
                " WHERE collection = %s AND chunk_id = %s AND token = %s AND state = ANY(%s)"
                " RETURNING collection, chunk_id, lo, hi, token, state",
                (new_token, new_state.value, collection, chunk_id, expect_token,
                 [s.value for s in expect_state]),
            )
            row = await cur.fetchone()
        if row:
            return _fence(row)
        current = await self.fence(collection, chunk_id)
        if current and current.token == new_token and current.state == new_state:
            return current
        raise FenceStateError(
            f"{self.shard_id}: chunk {collection}/{chunk_id} fence is "
            f"{'absent' if current is None else f'at token {current.token} ({current.state})'}; "
            f"expected token {expect_token} in {[s.value for s in expect_state]}"
        )

    async def freeze(self, collection: str, chunk_id: int, token: int) -> tuple[Fence, str]:
        """Freeze an active chunk (token+1, frozen). Waits for writes in flight; every later
        write is rejected. Returns the fence and an LSN at or after the freeze's commit.

        After the freeze commits it notifies ``FENCE_CHANNEL``: a change applier paused by its
        throttle runs again at once (``shards/postgres/throttle.py``)."""
        fence = await self.freeze_fence(collection, chunk_id, token)
        return fence, await self.wal_lsn()

    async def freeze_fence(self, collection: str, chunk_id: int, token: int, *,
                           conn: psycopg.AsyncConnection[Any] | None = None) -> Fence:
        """:meth:`freeze` in one round trip, without the LSN (the cutover's pause starts
        here): the ``UPDATE`` notifies ``FENCE_CHANNEL`` in its own transaction, so the
        notification is delivered at its commit. A freeze that changes nothing (already
        frozen at ``token + 1``: a retry; or refused) takes the general path.

        ``conn``: an autocommit session opened before the pause (the cutover's), so the
        freeze needs neither a pool checkout nor its check's round trip."""
        async with self._connection_or(conn) as conn:
            cur = await conn.execute(
                "UPDATE shardshift.chunk_fence SET token = %s, state = %s, updated_at = now()"
                " WHERE collection = %s AND chunk_id = %s AND token = %s AND state = %s"
                " RETURNING collection, chunk_id, lo, hi, token, state, pg_notify(%s, %s)",
                (token + 1, FenceState.FROZEN.value, collection, chunk_id, token,
                 FenceState.ACTIVE.value, FENCE_CHANNEL, f"{collection}/{chunk_id}"),
            )
            row = await cur.fetchone()
        if row is not None:
            return _fence(row[:6])
        fence = await self.transition(
            collection, chunk_id, expect_token=token, expect_state=[FenceState.ACTIVE],
            new_token=token + 1, new_state=FenceState.FROZEN,
        )
        async with self._connection() as conn:
            await conn.execute("SELECT pg_notify(%s, %s)",
                               (FENCE_CHANNEL, f"{collection}/{chunk_id}"))
        return fence

    async def wal_lsn(self) -> str:
        """The server's current WAL write position (``X/Y``), on a pooled connection."""
        async with self._connection() as conn:
            cur = await conn.execute("SELECT pg_current_wal_lsn()::text")
            row = await cur.fetchone()
        assert row is not None
        return str(row[0])

    async def unfreeze(self, collection: str, chunk_id: int, frozen_token: int) -> Fence:
        """Undo a freeze before the commit point: back to active at the pre-freeze token (no
        write was accepted in between, so routers' cached token is valid again)."""
        return await self.transition(
            collection, chunk_id, expect_token=frozen_token, expect_state=[FenceState.FROZEN],
            new_token=frozen_token - 1, new_state=FenceState.ACTIVE,
        )

    async def activate(self, collection: str, chunk_id: int, token: int, *,
                       conn: psycopg.AsyncConnection[Any] | None = None) -> Fence:
        """Open a receiving chunk for traffic at ``token`` (the catalog's new token);
        ``conn`` as for :meth:`freeze_fence`."""
        # One round trip (it sits inside a cutover's pause): whatever its token, a receiving
        # or frozen fence becomes active at ``token``.
        async with self._connection_or(conn) as conn:
            cur = await conn.execute(
                "UPDATE shardshift.chunk_fence SET token = %s, state = %s, updated_at = now()"
                " WHERE collection = %s AND chunk_id = %s AND state = ANY(%s)"
                " RETURNING collection, chunk_id, lo, hi, token, state",
                (token, FenceState.ACTIVE.value, collection, chunk_id,
                 [FenceState.RECEIVING.value, FenceState.FROZEN.value]),
            )
            row = await cur.fetchone()
        if row is not None:
            return _fence(row)
        current = await self.fence(collection, chunk_id)
        if current is None:
            raise FenceStateError(f"{self.shard_id}: no fence for {collection}/{chunk_id}")
        if current.token == token and current.state == FenceState.ACTIVE:
            return current  # already active at the token: idempotent
        raise FenceStateError(
            f"{self.shard_id}: chunk {collection}/{chunk_id} fence is at token {current.token} "
            f"({current.state}); expected a receiving or frozen fence to activate at {token}"
        )

    async def retire(self, collection: str, chunk_id: int) -> Fence:
        current = await self.fence(collection, chunk_id)
        if current is None:
            raise FenceStateError(f"{self.shard_id}: no fence for {collection}/{chunk_id}")
        return await self.transition(
            collection, chunk_id, expect_token=current.token,
            expect_state=[FenceState.FROZEN, FenceState.RETIRED, FenceState.RECEIVING],
            new_token=current.token, new_state=FenceState.RETIRED,
        )

    async def drop_fence(self, collection: str, chunk_id: int) -> None:
        async with self._connection() as conn:
            await conn.execute(
                "DELETE FROM shardshift.chunk_fence WHERE collection = %s AND chunk_id = %s",
                (collection, chunk_id),
            )

    # -- documents ---------------------------------------------------------------------------

    def _st(self, collection: str) -> D.DocumentStatements:
        st = self._statements.get(collection)
        if st is None:
            st = self._statements[collection] = D.DocumentStatements(collection)
        return st

    async def _run(self, query: bytes, params: dict[str, Any], collection: str,
                   chunk_id: int, timeout: float | None) -> tuple[Any, ...]:
        """One routed statement. ``ShardUnavailableError``: nothing was sent (retry freely);
        ``ShardConnectionLostError``: sent, outcome unknown; fence errors: nothing written."""
        pool = self._pool
        # The pool's usual cases (an idle live connection; giving it back) without a coroutine.
        conn = pool.take_idle() or await pool.getconn(timeout)
        try:
            cur = pool.cursor(conn, query)
            await cur.execute(query, params)
            row = await cur.fetchone()
        except psycopg.Error as exc:
            pool.drop_cursor(conn, query)
            raise D.translate_error(exc, collection, chunk_id) from exc
        finally:
            if not pool.put_idle(conn):
                await pool.putconn(conn)
        assert row is not None
        for value in row:
            # A large result (a big document, an array of them) is let go with its cursor.
            if isinstance(value, list) or (isinstance(value, str)
                                           and len(value) > KEEP_RESULT_CHARS):
                pool.drop_cursor(conn, query)
                break
        return tuple(row)

    async def insert(self, collection: str, ref: FenceRef, khash: int,
                     doc: Mapping[str, Any], *, timeout: float | None = None) -> None:
        """Insert a new document; ``DuplicateDocumentError`` when its key and _id exist."""
        st = self._st(collection)
        id_text, doc_text = D.encode_for_store(doc)
        params = {"c": collection, "k": ref.chunk_id, "t": ref.token, "h": khash, "id": id_text,
                  "doc": doc_text}
        _, n = await self._run(st.insert, params, collection, ref.chunk_id, timeout)
        if n == 0:
            raise DuplicateDocumentError(
                f"{collection}: a document with _id {id_text} and this shard key already exists"
            )

    async def replace(self, collection: str, ref: FenceRef, khash: int,
                      doc: Mapping[str, Any], *, timeout: float | None = None) -> bool:
        """Replace a whole document (same shard key and _id); False when none matched."""
        st = self._st(collection)
        id_text, doc_text = D.encode_for_store(doc)
        params = {"c": collection, "k": ref.chunk_id, "t": ref.token, "h": khash, "id": id_text,
                  "doc": doc_text}
        _, n = await self._run(st.replace, params, collection, ref.chunk_id, timeout)
        return bool(n)

    async def replace_pinned(self, collection: str, ref: FenceRef, khash: int, shard_key: str,
                             doc: Mapping[str, Any], *, timeout: float | None = None
                             ) -> tuple[int, int]:
        """Replace the document with ``doc``'s ``_id`` and shard key (each compared as stored:
        same BSON type and value) by ``doc``, unless it already equals ``doc``: (matched,
        written), each 0 or 1, in one statement."""
        key = (collection, "replace", shard_key)
        query = self._find_sql.get(key) if isinstance(shard_key, str) else None
        if query is None:
            query = self._find_sql[key] = self._st(collection).replace_pinned_sql(shard_key)
        value: Any = doc
        for part in shard_key.split("."):
            value = value[part]
        id_text, doc_text = D.encode_for_store(doc)
        params = D.fence_params(collection, ref, khash) | {
            "id": id_text, "doc": doc_text, "v": encode_value(value)}
        _, matched, written = await self._run(query, params, collection, ref.chunk_id, timeout)
        return int(matched), int(written)

    async def patch(self, collection: str, ref: FenceRef, khash: int, _id: Any,
                    update: Mapping[str, Any], protected: Sequence[str] = ("_id",), *,
                    timeout: float | None = None) -> dict[str, Any] | None:
        """Apply ``$set``/``$unset``/``$inc``; returns the new document, None if none matched."""
        st = self._st(collection)
        patch = D.validate_patch(update, protected)
        params = D.fence_params(collection, ref, khash) | {"id": encode_value(_id), "patch": patch}
        _, doc = await self._run(st.patch, params, collection, ref.chunk_id, timeout)
        return decode_document(doc) if doc is not None else None

    async def delete(self, collection: str, ref: FenceRef, khash: int, _id: Any, *,
                     timeout: float | None = None) -> bool:
        st = self._st(collection)
        params = {"c": collection, "k": ref.chunk_id, "t": ref.token, "h": khash,
                  "id": encode_value(_id)}
        _, n = await self._run(st.delete, params, collection, ref.chunk_id, timeout)
        return bool(n)

    async def get(self, collection: str, ref: FenceRef, khash: int,
                  _id: Any, *, timeout: float | None = None) -> dict[str, Any] | None:
        st = self._st(collection)
        params = {"c": collection, "k": ref.chunk_id, "t": ref.token, "h": khash,
                  "id": encode_value(_id)}
        _, doc = await self._run(st.get, params, collection, ref.chunk_id, timeout)
        return decode_document(doc) if doc is not None else None

    async def get_text(self, collection: str, ref: FenceRef, khash: int,
                       _id: Any, *, timeout: float | None = None) -> str | None:
        """``get``, the document as its stored text (canonical Extended JSON, as ``jsonb``
        prints it), not decoded; fenced the same way."""
        st = self._st(collection)
        params = {"c": collection, "k": ref.chunk_id, "t": ref.token, "h": khash,
                  "id": encode_value(_id)}
        _, doc = await self._run(st.get, params, collection, ref.chunk_id, timeout)
        return doc  # type: ignore[no-any-return]

    async def get_many(self, collection: str, ref: FenceRef, khash: int, ids: Sequence[Any],
                       *, timeout: float | None = None) -> list[dict[str, Any]]:
        """The documents with this khash whose ``_id`` is one of ``ids`` (each compared as
        stored, so ``5`` and ``Int64(5)`` are two values), in ``_id`` order; one statement."""
        st = self._st(collection)
        params = D.fence_params(collection, ref, khash) | {
            "ids": [encode_value(i) for i in ids]}
        _, docs = await self._run(st.get_many, params, collection, ref.chunk_id, timeout)
        return D.decode_many(docs)

    async def find_by_shard_key(self, collection: str, ref: FenceRef, khash: int,
                                shard_key: str, value: Any, limit: int = 1000, *,
                                timeout: float | None = None) -> list[dict[str, Any]]:
        key = (collection, "key", shard_key)
        # A path that is no string is refused (InvalidNameError) when its SQL is composed.
        query = self._find_sql.get(key) if isinstance(shard_key, str) else None
        if query is None:
            query = self._find_sql[key] = self._st(collection).find_key_sql(shard_key)
        params = D.fence_params(collection, ref, khash) | {"v": encode_value(value), "n": limit}
        _, docs = await self._run(query, params, collection, ref.chunk_id, timeout)
        return D.decode_many(docs)

    async def find_by_field(self, collection: str, refs: Sequence[FenceRef], path: str,
                            value: Any, limit: int = 1000, *,
                            timeout: float | None = None) -> list[dict[str, Any]]:
        """Documents of the given chunks (all on this shard) whose field equals ``value``."""
        if not refs:
            return []
        key = (collection, "field", path)
        # A path that is no string is refused (InvalidNameError) when its SQL is composed.
        query = self._find_sql.get(key) if isinstance(path, str) else None
        if query is None:
            query = self._find_sql[key] = self._st(collection).find_field_sql(path)
        params = {
            "c": collection, "ks": [r.chunk_id for r in refs], "ts": [r.token for r in refs],
            "v": encode_value(value), "n": limit,
        }
        _, docs = await self._run(query, params, collection, refs[0].chunk_id, timeout)
        return D.decode_many(docs)

    async def scan_page(
        self, collection: str, ref: FenceRef, key_range: KeyRange, after: tuple[int, str],
        limit: int,
        *, ids: Sequence[Any] | None = None, field: str | None = None,
        values: Sequence[Any] | None = None, khashes: Sequence[int] | None = None,
        budget: int = 4 * 1024 * 1024, stop: int | None = None, timeout: float | None = None,
    ) -> tuple[list[tuple[int, str, dict[str, Any]]], bool]:
        """One fenced keyset page of a chunk (at ``ref`` and ``key_range``, as the caller's
        map has it; ``after`` inside it): up to ``limit`` documents after ``after`` =
        (khash, id text) in (khash, id) order, as (khash, id text, document). ``ids`` keeps
        documents whose ``_id`` is one of them; ``field``/``values`` those whose field equals
        one of the values (as stored: the caller filters further); ``khashes`` those whose
        khash is one of them; ``stop`` ends the page's range before the chunk's end. The
        page stops once its documents reach ``budget`` bytes (as
        stored; at least one document). Returns the page and whether the chunk may hold more
        after it."""
        where = "_id" if ids is not None else field
        key = (collection, "scan", where, khashes is not None)
        query = self._find_sql.get(key) if where is None or isinstance(where, str) else None
        if query is None:
            query = self._find_sql[key] = self._st(collection).scan_sql(
                where, by_hash=khashes is not None)
        params = D.fence_params(collection, ref, None) | {
            "lo": key_range.lo, "hi": key_range.sql_hi,
            "top": min(key_range.hi, KHASH_END if stop is None else stop) - 1,
            "lh": after[0], "li": after[1], "n": limit,
            "budget": budget}
        if ids is not None:
            params["ids"] = [encode_value(v) for v in ids]
        elif field is not None:
            params["vs"] = [encode_value(v) for v in values or ()]
        if khashes is not None:
            params["hs"] = list(khashes)
        _, read, hs, idl, docs = await self._run(query, params, collection, ref.chunk_id,
                                                 timeout)
        rows = [(h, i, decode_document(d))
                for h, i, d in zip(hs or (), idl or (), docs or (), strict=True)]
        return rows, read >= limit or len(rows) < read

    async def count_chunks(self, collection: str, refs: Sequence[FenceRef], *,
                           timeout: float | None = None) -> int:
        """Fenced exact count of the documents of the given chunks (all on this shard)."""
        if not refs:
            return 0
        key = (collection, "count", None, False)
        query = self._find_sql.get(key)
        if query is None:
            query = self._find_sql[key] = self._st(collection).count_sql()
        params = {"c": collection, "ks": [r.chunk_id for r in refs],
                  "ts": [r.token for r in refs]}
        _, n = await self._run(query, params, collection, refs[0].chunk_id, timeout)
        return int(n)

    async def scan(self, collection: str, key_range: KeyRange) -> list[dict[str, Any]]:
        """Every document of a khash range, unfenced and in key order: for checkers and
        operators, never for routed traffic."""
        async with self._connection() as conn:
            cur = await conn.execute(
                sql.SQL(
                    "SELECT doc::text FROM {} WHERE khash >= %s AND (%s::bigint IS NULL OR khash < %s)"
                    " ORDER BY khash, id"
                ).format(collection_table(check_collection(collection))),
                (key_range.lo, key_range.sql_hi, key_range.sql_hi),
            )
            return [decode_document(r[0]) for r in await cur.fetchall()]

    async def chunk_sizes(
        self, collection: str, ranges: Sequence[tuple[int, KeyRange]],
        *, sample_percent: float | None = None, timeout_s: float = 600.0,
    ) -> dict[int, tuple[int, int]]:
        """Documents and bytes of live rows of many chunks, in one pass over the table.

        ``ranges`` are (chunk id, range) pairs that do not overlap. One statement buckets each
        row into its chunk with ``width_bucket`` over the sorted lower bounds (a binary search
        per row) and checks the bucket's upper bound, so rows between or outside the given
        ranges (another shard's leftovers) count nowhere. Bytes are each row's stored size
        (``pg_column_size`` of the row), summed per chunk: exact, unlike one table-wide
        average. With ``sample_percent`` the pass reads that share of the table's blocks
        (``TABLESAMPLE SYSTEM``) and scales up: for tables too large to read, at the price
        of small chunks' precision.

        Returns:
            chunk id -> (documents, bytes), for every chunk given (zero when empty).
        """
        if sample_percent is not None and not 0 < sample_percent <= 100:
            raise ValueError(f"sample_percent must be in (0, 100], not {sample_percent!r}")
        ordered = sorted(ranges, key=lambda r: r[1].lo)
        for (_, a), (_, b) in zip(ordered, ordered[1:], strict=False):
            if b.lo < a.hi:
                raise ValueError(f"chunk ranges overlap: {a} and {b}")
        out = {chunk_id: (0, 0) for chunk_id, _ in ordered}
        if not ordered:
            return out
        t = collection_table(check_collection(collection))
        sample = sql.SQL("") if sample_percent is None else sql.SQL(
            "TABLESAMPLE SYSTEM ({})").format(sql.Literal(float(sample_percent)))
        query = sql.SQL(
            "SELECT x.b, count(*), coalesce(sum(x.sz), 0)::bigint FROM ("
            " SELECT width_bucket(d.khash, %(los)s::bigint[]) AS b, d.khash,"
            "  pg_column_size(d.*) AS sz FROM {t} AS d {s}) AS x"
            " WHERE x.b > 0 AND ((%(his)s::bigint[])[x.b] IS NULL"
            "  OR x.khash < (%(his)s::bigint[])[x.b])"
            " GROUP BY x.b"
        ).format(t=t, s=sample)
        params = {"los": [r.lo for _, r in ordered], "his": [r.sql_hi for _, r in ordered]}
        scale = 1.0 if sample_percent is None else 100.0 / sample_percent
        async with self._connection() as conn, conn.transaction():
            await conn.execute(sql.SQL("SET LOCAL statement_timeout = {}").format(
                sql.Literal(int(timeout_s * 1000))))
            cur = await conn.execute(query, params)
            rows = await cur.fetchall()
        for bucket, docs, size in rows:
            chunk_id = ordered[int(bucket) - 1][0]
            out[chunk_id] = (round(int(docs) * scale), round(int(size) * scale))
        return out

    async def chunk_bytes(self, collection: str, key_range: KeyRange) -> int:
        """Estimated bytes of live documents in a khash range: its row count (an index-only
        count) times the table's average row size (from a 1 % block sample once the table is
        large). Dead rows and free space left by moves do not count: what a planner weighs
        chunks by."""
        t = collection_table(check_collection(collection))
        async with self._connection() as conn:
            cur = await conn.execute(
                sql.SQL(
                    "SELECT (SELECT count(*) FROM {t} WHERE khash >= %s"
                    "  AND (%s::bigint IS NULL OR khash < %s)),"
                    " (SELECT reltuples FROM pg_class WHERE oid = %s::regclass)"
                ).format(t=t),
                (key_range.lo, key_range.sql_hi, key_range.sql_hi, t.as_string(None)),
            )
            row = await cur.fetchone()
            assert row is not None
            rows, estimate = int(row[0]), float(row[1] or 0)
            if rows == 0:
                return 0
            sample = sql.SQL("TABLESAMPLE SYSTEM (1)") if estimate > 200_000 else sql.SQL("")
            cur = await conn.execute(
                sql.SQL("SELECT avg(pg_column_size(d.*)) FROM {t} AS d {s}").format(t=t, s=sample)
            )
            avg = (await cur.fetchone() or (None,))[0]
            if avg is None:  # an unlucky sample: read the whole table once
                cur = await conn.execute(
                    sql.SQL("SELECT avg(pg_column_size(d.*)) FROM {t} AS d").format(t=t))
                avg = (await cur.fetchone() or (0,))[0] or 0
        return int(rows * float(avg))

    async def count(self, collection: str, key_range: KeyRange | None = None) -> int:
        """Documents stored in a collection (optionally in a khash range), unfenced: for
        operators and tests, never for routed traffic."""
        async with self._connection() as conn:
            cur = await conn.execute(
                sql.SQL("SELECT count(*) FROM {} WHERE khash >= %s AND (%s::bigint IS NULL OR khash < %s)")
                .format(collection_table(check_collection(collection))),
                (key_range.lo if key_range else -(2**63), key_range.sql_hi if key_range else None,
                 key_range.sql_hi if key_range else None),
            )
            row = await cur.fetchone()
            return int(row[0]) if row else 0


def _fence(row: Sequence[Any]) -> Fence:
    collection, chunk_id, lo, hi, token, state = row
    return Fence(
        collection=collection, chunk_id=chunk_id,
        range=KeyRange(lo=lo, hi=hi if hi is not None else 2**63),
        token=token, state=FenceState(state),
    )


__all__ = ["PostgresShard", "Session"]
