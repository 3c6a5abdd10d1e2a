"""Change notifications: a stream of catalog changes as they commit.

Every change sends ``pg_notify('shardshift_catalog', ...)`` inside its own transaction
(``txn.bump``), so a notification arrives only if its change committed, and in commit order.
``listen`` holds one dedicated connection (not from the pool) and reconnects on its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator

import psycopg
from pydantic import ValidationError

from catalog.models import CatalogChange, ChangeKind
from catalog.schema import NOTIFY_CHANNEL
from catalog.store.txn import CatalogBase

log = logging.getLogger(__name__)


class Notifications(CatalogBase):
    """Stream catalog changes."""

    async def listen(
        self, *, reconnect_delay_s: float = 0.2, max_reconnect_delay_s: float = 5.0
    ) -> AsyncGenerator[CatalogChange, None]:
        """Catalog changes as they commit, forever (cancel the consuming task or ``break``).

        The first item, and the first after every reconnect, is a ``RESYNC`` change carrying
        the current version: from that moment on no change is missed, so a router starts
        listening, waits for that item, then (re)reads its maps. Notifications are a latency
        optimisation: a lost one is caught by the router's stale-token retry.
        """
        delay = reconnect_delay_s
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
            except psycopg.OperationalError as exc:
                log.warning("catalog listen: cannot connect (%s); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, max_reconnect_delay_s)
                continue
            try:
                async with conn:
                    await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    cur = await conn.execute("SELECT version FROM catalog.meta WHERE id = 1")
                    row = await cur.fetchone()
                    delay = reconnect_delay_s
                    yield CatalogChange(version=int(row[0]) if row else 0,
                                        change=ChangeKind.RESYNC)
                    async for note in conn.notifies():
                        try:
                            yield CatalogChange.model_validate_json(note.payload)
                        except ValidationError:
                            log.warning("catalog listen: malformed payload %r", note.payload[:200])
            except psycopg.OperationalError as exc:
                log.warning("catalog listen: connection lost (%s); reconnecting", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, max_reconnect_delay_s)
