"""The suite's session catalog clients survive a restart of the session stack's catalog server.

Tests that restart it (``tests/router``: catalog outages) call
``tests.conftest.refresh_session_catalogs``, which refreshes EVERY session-scoped catalog pool of
the process, not only the one the restarting test holds. Run order is not fixed (an xdist worker
reaches the packages in any order), so a pool left stale would fail some later test's first
catalog call with ``AdminShutdown``: it did, under ``-n 2``, for this package's ``catalog``.
"""

from __future__ import annotations

import asyncio

from catalog import Catalog
from infra import Stack
from tests.conftest import SESSION_CATALOGS, refresh_session_catalogs


async def test_a_catalog_restart_refreshes_every_session_pool(
        stack: Stack, catalog: Catalog, catalog_dsn: str) -> None:
    held = 4

    async def use() -> None:
        async with catalog._pool.connection() as conn:
            await conn.execute("SELECT 1")
            await asyncio.sleep(0.2)  # hold it, so the others take other connections

    await asyncio.gather(*(use() for _ in range(held)))
    assert catalog._pool.get_stats()["pool_available"] >= held  # idle connections, to go stale
    assert catalog in SESSION_CATALOGS
    pg = stack.instance_for_dsn(catalog_dsn)
    await asyncio.to_thread(pg.stop, 30)  # every pooled connection dies with the server
    await asyncio.to_thread(pg.start, 60)
    await refresh_session_catalogs()
    # As many connections at once as were idle before: none of them is a dead one.
    await asyncio.gather(*(use() for _ in range(held)))
