"""The shard registry: which shards exist, where they are, and their state.

A shard is registered ``active``; ``draining`` keeps its chunks but receives no new ones;
``retired`` is final (its id is never reused: the history refers to the old server). Every
change here is a ``SHARDS`` change.
"""

from __future__ import annotations

import math
import re
from typing import Any

from psycopg import AsyncCursor

from catalog.errors import ShardStateError
from catalog.models import ChangeKind, ShardInfo, ShardState, ShardUsage
from catalog.store.checks import check_address, check_shard_id
from catalog.store.rows import SHARD_SELECT, one, shard_in, to_shard
from catalog.store.txn import CatalogBase, bump
from shards.names import check_collection

_ENGINE = re.compile(r"[a-z][a-z0-9_]{0,31}")
MAX_OPS_PER_S = 1e12
"""The largest ``capacity_ops_per_s`` accepted (a trillion operations a second)."""


def check_shard_values(engine: object, major_version: object, capacity_bytes: object,
                       capacity_ops_per_s: object) -> None:
    """What ``register_shard`` stores beside the id and address, checked before anything is
    read: an engine name (lower-case letters, digits and ``_``, up to 32, so no NUL), a
    major version (1 to 9999), a capacity in bytes (an int from 0 to 2^63 - 1) and in
    operations a second (a finite float from 0 to ``MAX_OPS_PER_S``); None: unknown.

    Raises:
        ValueError: naming the field at fault.
    """
    if not isinstance(engine, str) or not _ENGINE.fullmatch(engine):
        raise ValueError(f"invalid engine {engine!r}: use a lower-case name of up to 32 "
                         "letters, digits or '_', for example 'postgres'")
    if (not isinstance(major_version, int) or isinstance(major_version, bool)
            or not 1 <= major_version <= 9999):
        raise ValueError(f"invalid major_version {major_version!r}: expected an integer "
                         "from 1 to 9999")
    if capacity_bytes is not None and (
            not isinstance(capacity_bytes, int) or isinstance(capacity_bytes, bool)
            or not 0 <= capacity_bytes < 2**63):
        raise ValueError(f"invalid capacity_bytes {capacity_bytes!r}: expected an integer "
                         "from 0 to 2^63 - 1 (or None: unknown)")
    if capacity_ops_per_s is not None and (
            not isinstance(capacity_ops_per_s, int | float) or isinstance(capacity_ops_per_s, bool)
            or not math.isfinite(capacity_ops_per_s)
            or not 0 <= capacity_ops_per_s <= MAX_OPS_PER_S):
        raise ValueError(f"invalid capacity_ops_per_s {capacity_ops_per_s!r}: expected a "
                         f"finite number from 0 to {MAX_OPS_PER_S:g} (or None: unknown)")


SHARD_USAGE_SQL = (
    "WITH pc AS (SELECT shard_id, collection, count(*) AS n FROM catalog.chunks"
    "   WHERE %(c)s::text IS NULL OR collection = %(c)s GROUP BY shard_id, collection),"
    " ch AS (SELECT shard_id, sum(n)::bigint AS n, count(*) AS k FROM pc GROUP BY shard_id),"
    " mv AS (SELECT source, target FROM catalog.migrations WHERE outcome IS NULL"
    "   AND (%(c)s::text IS NULL OR collection = %(c)s)),"
    " mi AS (SELECT target AS shard_id, count(*) AS n FROM mv GROUP BY target),"
    " mo AS (SELECT source AS shard_id, count(*) AS n FROM mv GROUP BY source)"
    " SELECT s.shard_id, coalesce(ch.n, 0), coalesce(ch.k, 0), coalesce(mi.n, 0),"
    "   coalesce(mo.n, 0)"
    " FROM catalog.shards s LEFT JOIN ch USING (shard_id)"
    "   LEFT JOIN mi USING (shard_id) LEFT JOIN mo USING (shard_id)"
    " ORDER BY s.shard_id"
)
"""Chunks and active migrations per shard, aggregated in the catalog (``shard_usage``): one
pass over the chunks grouped by (shard, collection) (a hash aggregate; ``count(DISTINCT)``
sorted all of them), then per shard."""


class ShardRegistry(CatalogBase):
    """Register shards, change their state, read them."""

    async def register_shard(
        self,
        shard_id: str,
        address: str,
        *,
        engine: str,
        major_version: int,
        capacity_bytes: int | None = None,
        capacity_ops_per_s: float | None = None,
    ) -> ShardInfo:
        """Register a shard, or update the address, engine and hints of a registered one.

        A new shard starts ``active``; re-registering keeps the state (a draining shard stays
        draining). Re-registering with identical values changes nothing.

        Raises:
            InvalidNameError: a malformed shard id.
            ValueError: an address that is not a DSN or that carries a password; an engine,
                version or capacity out of range (see ``check_shard_values``). Nothing is
                changed then.
        """
        check_shard_id(shard_id)
        check_address(address)
        check_shard_values(engine, major_version, capacity_bytes, capacity_ops_per_s)
        if capacity_ops_per_s is not None:
            capacity_ops_per_s = float(capacity_ops_per_s)

        async def body(cur: AsyncCursor[Any]) -> ShardInfo:
            row = await one(cur, SHARD_SELECT + " WHERE shard_id = %s FOR UPDATE", (shard_id,))
            wanted = (address, engine, major_version, capacity_bytes, capacity_ops_per_s)
            if row is not None:
                current = to_shard(row)
                if (current.address, current.engine, current.major_version,
                        current.capacity_bytes, current.capacity_ops_per_s) == wanted:
                    return current
                await cur.execute(
                    "UPDATE catalog.shards SET address = %s, engine = %s, major_version = %s,"
                    " capacity_bytes = %s, capacity_ops_per_s = %s, updated_at = now()"
                    " WHERE shard_id = %s",
                    (*wanted, shard_id),
                )
            else:
                await cur.execute(
                    "INSERT INTO catalog.shards (shard_id, address, engine, major_version,"
                    " capacity_bytes, capacity_ops_per_s, state) VALUES (%s, %s, %s, %s, %s, %s,"
                    " 'active')",
                    (shard_id, *wanted),
                )
            await bump(cur, ChangeKind.SHARDS, None)
            return await shard_in(cur, shard_id)

        return await self._txn(body)

    async def set_shard_state(self, shard_id: str, state: ShardState) -> ShardInfo:
        """Move a shard between ``active``, ``draining`` and ``retired``.

        Raises:
            UnknownShardError: the shard is not registered.
            ShardStateError: retiring a shard that still holds chunks or takes part in an
                active migration, or reviving a retired shard.
        """
        check_shard_id(shard_id)
        state = ShardState(state)

        async def body(cur: AsyncCursor[Any]) -> ShardInfo:
            current = await shard_in(cur, shard_id, lock=True)
            if current.state == state:
                return current
            if current.state == ShardState.RETIRED:
                raise ShardStateError(
                    f"shard {shard_id!r} is retired; register a new shard id instead of "
                    "reviving it (its history refers to the old server)"
                )
            if state == ShardState.RETIRED:
                row = await one(
                    cur, "SELECT count(*) FROM catalog.chunks WHERE shard_id = %s", (shard_id,)
                )
                held = int(row[0]) if row else 0
                row = await one(
                    cur,
                    "SELECT count(*) FROM catalog.migrations WHERE outcome IS NULL"
                    " AND (source = %s OR target = %s)",
                    (shard_id, shard_id),
                )
                moving = int(row[0]) if row else 0
                if held or moving:
                    raise ShardStateError(
                        f"shard {shard_id!r} still holds {held} chunk(s) and takes part in "
                        f"{moving} active migration(s); drain it before retiring it"
                    )
            await cur.execute(
                "UPDATE catalog.shards SET state = %s, updated_at = now() WHERE shard_id = %s",
                (state.value, shard_id),
            )
            await bump(cur, ChangeKind.SHARDS, None)
            return await shard_in(cur, shard_id)

        return await self._txn(body)

    async def shard(self, shard_id: str) -> ShardInfo:
        """One registered shard. Raises ``UnknownShardError``."""
        check_shard_id(shard_id)
        return await self._txn(lambda cur: shard_in(cur, shard_id), read_only=True)

    async def list_shards(self, state: ShardState | None = None) -> list[ShardInfo]:
        """Registered shards (optionally in one state), by id."""

        async def body(cur: AsyncCursor[Any]) -> list[ShardInfo]:
            await cur.execute(
                SHARD_SELECT + " WHERE %(s)s::text IS NULL OR state = %(s)s ORDER BY shard_id",
                {"s": state.value if state else None},
            )
            return [to_shard(r) for r in await cur.fetchall()]

        return await self._txn(body, read_only=True)

    async def shard_usage(self, collection: str | None = None) -> dict[str, ShardUsage]:
        """Per registered shard: chunks held (of ``collection``, or of all), the collections
        they belong to, and active migrations into and out of it. One read, aggregated in
        the catalog (no per-chunk round trips)."""
        if collection is not None:
            check_collection(collection)

        async def body(cur: AsyncCursor[Any]) -> dict[str, ShardUsage]:
            await cur.execute(
                SHARD_USAGE_SQL,
                {"c": collection},
            )
            return {r[0]: ShardUsage(shard_id=r[0], chunks=r[1], collections=r[2],
                                     moves_in=r[3], moves_out=r[4])
                    for r in await cur.fetchall()}

        return await self._txn(body, read_only=True)
