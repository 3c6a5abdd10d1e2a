"""Fleet plans: the moves a drain planned, kept in the catalog and read back in pages.

A drain of thousands of chunks must not carry its plan through Temporal: an activity result
or a workflow input over 2 MB is refused (512 KB draws a warning), and every run of a chain
would copy what is left of it. ``drain.plan`` stores each round's moves here under the
operation's plan id (workflow id and first run id) and returns a summary; the workflow reads
the moves back a page at a time (``plan_page``) and carries only a cursor across
continue-as-new. Observations of an operation, not catalog changes: written without a version
bump, so routers never reload for them. A round's plan is replaced whole when it is stored
again (a retried plan activity); ``drop_plan`` removes an operation's plans when it ends.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from psycopg import AsyncCursor
from pydantic import BaseModel, ConfigDict, Field

from catalog.store.txn import CatalogBase

_PLAN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/@-]{0,399}")
MAX_PAGE = 2000
"""Moves one ``plan_page`` returns at most (about 300 KB as a payload)."""


class StoredMove(BaseModel):
    """One planned chunk move of a fleet operation."""

    model_config = ConfigDict(frozen=True)

    collection: str
    chunk_id: int
    source: str
    target: str
    bytes: int = Field(ge=0)


def check_plan_id(plan_id: object) -> str:
    if not isinstance(plan_id, str) or not _PLAN_ID.fullmatch(plan_id):
        raise ValueError(f"invalid plan id {plan_id!r}: a letter or digit followed by up to "
                         "399 letters, digits, '_', '.', ':', '/', '@' or '-'")
    return plan_id


def _check_round(round_: object) -> int:
    if not isinstance(round_, int) or isinstance(round_, bool) or not 1 <= round_ <= 10_000:
        raise ValueError(f"invalid round {round_!r}: an integer from 1 to 10000")
    return round_


class FleetPlans(CatalogBase):
    """Store, page through and drop the plans of fleet operations."""

    async def save_plan(self, plan_id: str, round_: int, moves: Sequence[StoredMove]) -> int:
        """Store a round's moves in order (replacing that round's earlier plan); their count."""
        check_plan_id(plan_id)
        _check_round(round_)
        rows = [(plan_id, round_, seq, m.collection, m.chunk_id, m.source, m.target, m.bytes)
                for seq, m in enumerate(moves)]

        async def body(cur: AsyncCursor[Any]) -> int:
            await cur.execute("DELETE FROM catalog.fleet_plans WHERE plan_id = %s AND round = %s",
                              (plan_id, round_))
            async with cur.copy("COPY catalog.fleet_plans (plan_id, round, seq, collection,"
                                " chunk_id, source, target, bytes) FROM STDIN") as copy:
                for row in rows:
                    await copy.write_row(row)
            return len(rows)

        return await self._txn(body)

    async def plan_page(self, plan_id: str, round_: int, offset: int, limit: int
                        ) -> list[StoredMove]:
        """Moves ``offset`` to ``offset + limit`` of a round's plan (fewer at its end)."""
        check_plan_id(plan_id)
        _check_round(round_)
        if not isinstance(offset, int) or offset < 0:
            raise ValueError(f"invalid offset {offset!r}")
        if not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"invalid page size {limit!r}: 1 to {MAX_PAGE}")

        async def body(cur: AsyncCursor[Any]) -> list[StoredMove]:
            await cur.execute(
                "SELECT collection, chunk_id, source, target, bytes FROM catalog.fleet_plans"
                " WHERE plan_id = %s AND round = %s AND seq >= %s ORDER BY seq LIMIT %s",
                (plan_id, round_, offset, limit))
            return [StoredMove(collection=r[0], chunk_id=r[1], source=r[2], target=r[3],
                               bytes=r[4]) for r in await cur.fetchall()]

        return await self._txn(body, read_only=True)

    async def plan_ids(self) -> dict[str, int]:
        """Every stored plan's id and how many moves it holds (all rounds)."""

        async def body(cur: AsyncCursor[Any]) -> dict[str, int]:
            await cur.execute("SELECT plan_id, count(*) FROM catalog.fleet_plans"
                              " GROUP BY plan_id ORDER BY plan_id")
            return {r[0]: int(r[1]) for r in await cur.fetchall()}

        return await self._txn(body, read_only=True)

    async def drop_plan(self, plan_id: str) -> int:
        """Remove every round of an operation's plan; how many moves were stored."""
        check_plan_id(plan_id)

        async def body(cur: AsyncCursor[Any]) -> int:
            await cur.execute("DELETE FROM catalog.fleet_plans WHERE plan_id = %s", (plan_id,))
            return cur.rowcount

        return await self._txn(body)
