"""Fleet-scale catalog fixtures: a collection of N chunks written in one statement.

The chunks tile the khash space in equal widths, placed round-robin on the given shards, each
at token 1. One transaction: the collection row, the chunks (``generate_series``), the version
bump a catalog change makes (the ``chunks_stamp`` trigger stamps the rows with it) and the
notification, so routers see it as any other change.
"""

from __future__ import annotations

from collections.abc import Sequence

import psycopg

from catalog.models import CatalogChange, ChangeKind
from catalog.schema import NOTIFY_CHANNEL

FILL_SQL = """
INSERT INTO catalog.chunks (collection, chunk_id, lo, hi, shard_id, token)
SELECT %(c)s, nextval('catalog.chunk_ids'),
       (-9223372036854775808::numeric + i * %(w)s::numeric)::bigint,
       CASE WHEN i = %(n)s - 1 THEN NULL
            ELSE (-9223372036854775808::numeric + (i + 1) * %(w)s::numeric)::bigint END,
       (%(shards)s::text[])[1 + i %% %(k)s], 1
FROM generate_series(0, %(n)s - 1) AS i
"""


async def fill_collection(dsn: str, name: str, shard_ids: Sequence[str], n: int,
                          shard_key: str = "acct") -> int:
    """Create collection ``name`` with ``n`` chunks; returns the catalog version."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO catalog.collections (name, shard_key, layout_version) VALUES (%s, %s, 0)",
            (name, shard_key))
        await conn.execute(FILL_SQL, {"c": name, "w": 2**64 // n, "n": n,
                                      "shards": list(shard_ids), "k": len(shard_ids)})
        cur = await conn.execute(
            "UPDATE catalog.meta SET version = version + 1 WHERE id = 1 RETURNING version")
        row = await cur.fetchone()
        assert row is not None
        version = int(row[0])
        await conn.execute("UPDATE catalog.collections SET layout_version = %s WHERE name = %s",
                           (version, name))
        note = CatalogChange(version=version, change=ChangeKind.LAYOUT, collection=name)
        await conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, note.model_dump_json()))
    return version
