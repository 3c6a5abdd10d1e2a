"""``bench.cdc``'s native side on real servers: PostgreSQL's own publication/subscription
drains the backlog, the copy is identical, and nothing of it is left behind (also when an
earlier run left its subscription, slot and publication)."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from bench.cdc import NATIVE, NATIVE_PUB, NATIVE_SUB, native_drain
from infra.stack import Stack


@pytest.fixture
def servers(stack: Stack) -> tuple[str, str]:
    record = stack.record()
    assert record is not None
    names = [s.name for s in record.servers if s.role == "shard" and s.major_version >= 16]
    return stack.dsn(names[0], "superuser"), stack.dsn(names[1], "superuser")


def _leftovers(source: str, target: str) -> list[str]:
    found: list[str] = []
    with psycopg.connect(target) as conn:
        if conn.execute("SELECT 1 FROM pg_subscription WHERE subname = %s",
                        (NATIVE_SUB,)).fetchone():
            found.append("subscription")
        if conn.execute("SELECT to_regclass(%s)", (f'docs."{NATIVE}"',)).fetchone() != (None,):
            found.append("target table")
    with psycopg.connect(source) as conn:
        if conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s",
                        (NATIVE_PUB,)).fetchone():
            found.append("publication")
        if conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s",
                        (NATIVE_SUB,)).fetchone():
            found.append("slot")
        if conn.execute("SELECT to_regclass(%s)", (f'docs."{NATIVE}"',)).fetchone() != (None,):
            found.append("source table")
    return found


def test_native_drain_copies_the_backlog_and_cleans_up(servers: tuple[str, str]) -> None:
    source, target = servers
    result = native_drain(source, target, 1500)
    assert result["native_verified"] is True
    assert result["native_drain_per_s"] > 0
    assert _leftovers(source, target) == []


def test_native_drain_after_an_interrupted_run(servers: tuple[str, str]) -> None:
    """A run killed mid-way left a table, a publication, a subscription and its slot: the
    next run removes them first, then measures as usual."""
    source, target = servers
    ddl = (f'CREATE TABLE IF NOT EXISTS docs."{NATIVE}" (khash bigint, id text, doc jsonb, '
           "PRIMARY KEY (khash, id))")
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute(ddl)
        conn.execute(f'CREATE PUBLICATION {NATIVE_PUB} FOR TABLE docs."{NATIVE}"')
        password = conn.info.password
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute(ddl)
        publisher = make_conninfo(source, password=password or None,
                                                   passfile=None)
        conn.execute(f"CREATE SUBSCRIPTION {NATIVE_SUB} CONNECTION '{publisher}' "
                     f"PUBLICATION {NATIVE_PUB} WITH (copy_data = false)")
    assert "slot" in _leftovers(source, target)
    result = native_drain(source, target, 600)
    assert result["native_verified"] is True
    assert _leftovers(source, target) == []
