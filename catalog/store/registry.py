"""The shard registry: which shards exist, where they are, and their state.

A shard is registered ``active``; ``draining`` keeps its chunks but receives no new ones;
``retired`` is final (its id is never reused: the history refers to the old server). Every
change here is a ``SHARDS`` change.
"""

from __future__ import annotations

from typing import Any

from psycopg import AsyncCursor

from catalog.errors import ShardStateError
from catalog.models import ChangeKind, ShardInfo, ShardState
from catalog.store.checks import check_address, check_shard_id
from catalog.store.rows import SHARD_SELECT, one, shard_in, to_shard
from catalog.store.txn import CatalogBase, bump


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
            ValueError: an address that is not a DSN or that carries a password.
        """
        check_shard_id(shard_id)
        check_address(address)
        if not engine or not isinstance(engine, str):
            raise ValueError("engine must be a non-empty string, for example 'postgres'")
        if major_version < 1:
            raise ValueError(f"invalid major_version {major_version}")

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
