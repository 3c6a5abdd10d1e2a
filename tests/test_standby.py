"""Streaming standbys of the local stack: ``infra up --standby``, ``infra promote``, a stale
old primary cloned again, ``infra down`` leaving nothing; multi-host addresses."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from catalog import Catalog
from catalog.local_stack import register_stack_shards, up_and_provision
from infra import InfraError, Stack
from infra.net import port_is_free
from infra.private import private_settings
from infra.stack import ServerRecord
from settings import DatabaseSettings, as_role
from tests.conftest import owned_state_dir

ROOT = Path(__file__).resolve().parent.parent


def test_multi_host_dsn_goes_to_the_primary() -> None:
    """A replica set's address (several hosts) as any component's DSN asks for a read-write
    session, so it never lands on a standby; a choice the address makes is kept."""
    db = DatabaseSettings()
    two = "host=10.0.0.1,10.0.0.2 port=5432,5433 dbname=shardshift"
    for dsn in (db.mover(two), db.router(two), db.catalog(two), db.catalog_reader(two)):
        assert "target_session_attrs=read-write" in dsn, dsn
        assert as_role(dsn, dsn.split("user=")[1].split()[0]) == dsn  # idempotent
    own = f"{two} target_session_attrs=primary"
    assert "target_session_attrs=primary" in db.mover(own)
    assert "target_session_attrs" not in db.mover("host=10.0.0.1 port=5432 dbname=shardshift")


@pytest.fixture
def state_dir() -> Iterator[Path]:
    path = owned_state_dir("standby")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _cli(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SHARDSHIFT_STATE_DIR": str(state), "SHARDSHIFT_INFRA__SHARDS": "1",
           "SHARDSHIFT_INFRA__HEADLESS": "true", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def _rows(dsn: str) -> list[int]:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=2) as conn:
        return [r[0] for r in conn.execute("SELECT v FROM shardshift.ha_probe ORDER BY v")]


def _wait_rows(dsn: str, want: list[int], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = _rows(dsn)
        except psycopg.Error as exc:
            got = [f"{exc}"]  # type: ignore[list-item]
        if got == want:
            return
        assert time.monotonic() < deadline, f"rows {got}, expected {want}"
        time.sleep(0.05)


async def _register(st: Stack) -> None:
    async with Catalog(st.catalog_dsn, max_size=1) as cat:
        await cat.ensure_schema()
        await register_stack_shards(cat, st)


async def _registered(st: Stack) -> str:
    async with Catalog(st.catalog_dsn, max_size=1) as cat:
        return (await cat.shard("shard-1")).address


def _shard(st: Stack) -> ServerRecord:
    record = st.record()
    assert record is not None
    return next(s for s in record.servers if s.name == "shard-1")


def test_standby_promote_reclone_down(state_dir: Path) -> None:
    infra = private_settings(1)
    st = Stack(state_dir, infra)
    pids: list[int] = []
    try:
        # A stack whose shard is registered before it gets a standby: `up --standby` gives
        # it one and the catalog's address follows (a single-host one would not follow a
        # promotion).
        up_and_provision(st)
        asyncio.run(_register(st))
        added = _cli(state_dir, "infra", "up", "--standby", "shard-1")
        assert added.returncode == 0, added
        assert "shard-1: the catalog's address now names its standby too" in added.stdout
        assert asyncio.run(_registered(st)) == st.address("shard-1")
        rows = {s.name: s for s in st.status()}
        assert rows["shard-1-standby"].role == "standby" and rows["shard-1-standby"].healthy
        mover = st.dsn("shard-1", "mover")
        assert "target_session_attrs=read-write" in mover
        first = _shard(st)
        replica = st.replica(first)
        assert replica is not None and first.standby_port is not None
        with psycopg.connect(mover, autocommit=True) as conn:
            conn.execute("CREATE TABLE shardshift.ha_probe (v int)")
            conn.execute("INSERT INTO shardshift.ha_probe VALUES (1)")
        _wait_rows(replica.dsn(), [1])

        # Bad input: one line, exit 2, nothing changed.
        bad = _cli(state_dir, "infra", "promote", "catalog")
        assert bad.returncode == 2 and "catalog has no standby" in bad.stderr, bad
        bad = _cli(state_dir, "infra", "up", "--standby", "shard-9")
        assert bad.returncode == 2 and "shard-9" in bad.stderr, bad
        assert _shard(st) == first

        done = _cli(state_dir, "infra", "promote", "shard-1")
        assert done.returncode == 0, done
        # The same DSN reaches the promoted standby, which takes writes at once (no standby
        # of its own to wait for); the old primary is down and stale.
        with psycopg.connect(mover, autocommit=True) as conn:
            port = conn.execute("SELECT current_setting('port')").fetchone()
            conn.execute("INSERT INTO shardshift.ha_probe VALUES (2)")
        assert port == (str(first.standby_port),)
        assert _shard(st).stale and st.replica(_shard(st)).pid() is None  # type: ignore[union-attr]
        with pytest.raises(InfraError, match="stale"):
            st.promote("shard-1")

        # A plain `up` leaves the stale old primary down (it could have diverged).
        up_and_provision(Stack(state_dir, infra.model_copy(update={"standbys": ()})))
        old = st.replica(_shard(st))
        assert old is not None and old.pid() is None and old.port == first.port

        # `up --standby shard-1` clones it again, as a standby of the new primary.
        again = _cli(state_dir, "infra", "up", "--standby", "shard-1")
        assert again.returncode == 0, again
        assert not _shard(st).stale and old.pid() is not None
        _wait_rows(old.dsn(), [1, 2])
        with psycopg.connect(old.dsn(), autocommit=True) as conn:
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)

        # A replica set registers as a shard under its multi-host address; provisioning puts
        # the roles' passwords (new ones: provisioning sets what its passfile holds) in the
        # passfile for both nodes.
        nodes = f"host=127.0.0.1,127.0.0.1 port={first.port},{first.standby_port}"
        passfile = state_dir / "ha-pgpass"
        added = _cli(state_dir, "shard", "add", "ha-1", "--dsn", f"{nodes} dbname=shardshift",
                     "--superuser-dsn", f"{nodes} user=postgres passfile={st.passfile}",
                     "--passfile", str(passfile), "--json")
        assert added.returncode == 0, added
        assert "target_session_attrs=read-write" in json.loads(added.stdout)["shard"]["address"]
        for port_ in (first.port, first.standby_port):
            with psycopg.connect(f"host=127.0.0.1 port={port_} dbname=shardshift "
                                 f"user={st.role_name('router')} passfile={passfile}") as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)

        pids = st.pids()
        assert len(pids) == 4, pids  # temporal, the catalog, shard-1's primary and standby
    finally:
        st.down()
    assert st.pids() == []
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    ports = [infra.base_port, infra.base_port + 1, infra.temporal_port, _shard(st).standby_port]
    assert all(port_is_free(p) for p in ports if p), ports
