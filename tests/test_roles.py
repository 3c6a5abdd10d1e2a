"""Least-privilege roles on real servers: what the router and the mover may and may not do,
the passfile, and an old stack (everything the superuser's) upgraded in place by `infra up`."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import stat
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import errors, sql
from psycopg.conninfo import conninfo_to_dict
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from catalog import Catalog
from catalog.admin import provision_collection
from catalog.local_stack import up_and_provision
from catalog.models import MigrationOutcome
from infra import Stack
from infra.passfile import lookup
from router.catalog_source import CatalogRouteSource
from router.core import Router
from router.errors import RetryDeadlineExceeded
from settings import DatabaseSettings, RouterSettings, Settings, TemporalSettings
from shards.models import FenceRef, FenceState, IndexDefinition, KeyRange
from shards.postgres import PostgresShard
from tests.conftest import make_stack_settings, owned_state_dir
from worker import run_worker
from workflows import MigrateChunkInput, MigrateChunkWorkflow

DB = DatabaseSettings()
FULL = KeyRange(lo=-(2**63), hi=2**63)


def _shard_name(stack: Stack, major: int) -> str:
    record = stack.record()
    assert record is not None
    for s in record.servers:
        if s.role == "shard" and (s.major_version == major or (major == 18 and s.major_version >= 16)):
            return s.name
    pytest.skip(f"no PostgreSQL {major} shard in the session stack")


@pytest.fixture(params=[18, pytest.param(15, marks=pytest.mark.pg15)], ids=["pg18", "pg15"])
async def shard(request: pytest.FixtureRequest, stack: Stack,
                collection_name: str) -> Iterator[tuple[str, str]]:
    """(server name, collection) on a shard of each version: a collection made by the mover
    (table, index, one active fence at token 1)."""
    name = _shard_name(stack, request.param)
    async with PostgresShard(name, stack.dsn(name, "mover"), max_size=1) as mover:
        await mover.ensure_schema()
        await mover.create_collection(collection_name,
                                      [IndexDefinition(name="by_v", fields=("v",))])
        await mover.put_fence(collection_name, 1, FULL, 1, FenceState.ACTIVE)
        yield name, collection_name
        await mover.drop_collection(collection_name)


def _refused(dsn: str, statement: sql.Composable | str) -> None:
    """The statement fails with a permission error and changes nothing."""
    with psycopg.connect(dsn, autocommit=True) as conn, pytest.raises(
            errors.InsufficientPrivilege):
        conn.execute(statement)


def _fence_row(stack: Stack, name: str, collection: str) -> tuple[object, ...] | None:
    with psycopg.connect(stack.dsn(name, "superuser"), autocommit=True) as conn:
        return conn.execute(
            "SELECT collection, chunk_id, lo, hi, token, state FROM shardshift.chunk_fence"
            " WHERE collection = %s", (collection,)).fetchone()


async def test_router_role_routes_but_cannot_escape(stack: Stack, shard: tuple[str, str]) -> None:
    name, c = shard
    dsn = stack.dsn(name, "router")
    table = sql.Identifier("docs", c)
    before = _fence_row(stack, name, c)

    # What routing needs works: fenced insert, read, patch, delete; a stale token is refused
    # by the fence check (the router's retry path), not by a permission error.
    async with PostgresShard(name, dsn, max_size=1) as router:
        ref = FenceRef(chunk_id=1, token=1)
        await router.insert(c, ref, 42, {"_id": "a", "acct": 1, "v": 1})
        assert await router.get(c, ref, 42, "a") == {"_id": "a", "acct": 1, "v": 1}
        assert (await router.patch(c, ref, 42, "a", {"$inc": {"v": 1}}))["v"] == 2
        assert await router.find_by_field(c, [ref], "v", 2) == [{"_id": "a", "acct": 1, "v": 2}]
        with pytest.raises(Exception, match="token"):
            await router.insert(c, FenceRef(chunk_id=1, token=7), 43, {"_id": "b", "acct": 2})
        assert await router.delete(c, ref, 42, "a") is True

    # What it must not do: run programs, DDL, write the fence (directly or through the
    # lock view), replication origins, temp tables.
    _refused(dsn, "COPY (SELECT 1) TO PROGRAM 'id'")
    _refused(dsn, "CREATE TABLE docs.intruder (a int)")
    _refused(dsn, "CREATE TABLE public.intruder (a int)")
    _refused(dsn, sql.SQL("DROP TABLE {}").format(table))
    _refused(dsn, sql.SQL("ALTER TABLE {} ADD COLUMN x int").format(table))
    _refused(dsn, sql.SQL("TRUNCATE {}").format(table))
    _refused(dsn, sql.SQL(
        "INSERT INTO shardshift.chunk_fence (collection, chunk_id, lo, token, state)"
        " VALUES ({}, 2, 0, 1, 'active')").format(sql.Literal(c)))
    _refused(dsn, sql.SQL("UPDATE shardshift.chunk_fence SET state = 'frozen'"
                          " WHERE collection = {}").format(sql.Literal(c)))
    _refused(dsn, sql.SQL("DELETE FROM shardshift.chunk_fence WHERE collection = {}")
             .format(sql.Literal(c)))
    _refused(dsn, "UPDATE shardshift.chunk_fence_lock SET token = token + 1")
    with psycopg.connect(dsn, autocommit=True) as conn, pytest.raises(
            errors.FeatureNotSupported):  # its one updatable-by-grant column is not a column
        conn.execute("UPDATE shardshift.chunk_fence_lock SET lock_only = true")
    _refused(dsn, "SELECT pg_replication_origin_create('intruder')")
    _refused(dsn, "CREATE TEMP TABLE intruder (a int)")
    _refused(dsn, "SELECT pg_read_file('/etc/passwd')")
    assert _fence_row(stack, name, c) == before
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT rolsuper, rolreplication, rolcreaterole, rolcreatedb"
                           " FROM pg_roles WHERE rolname = current_user").fetchone()
    assert row == (False, False, False, False)


async def test_mover_is_no_superuser(stack: Stack, shard: tuple[str, str]) -> None:
    name, c = shard
    dsn = stack.dsn(name, "mover")
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT rolsuper, rolreplication FROM pg_roles"
                           " WHERE rolname = current_user").fetchone()
        assert row == (False, True)
        # It owns what publications need and the replication origins are granted.
        owner = conn.execute("SELECT tableowner FROM pg_tables WHERE schemaname = 'docs'"
                             " AND tablename = %s", (c,)).fetchone()
        assert owner == (DB.mover_user,)
    _refused(dsn, "COPY (SELECT 1) TO PROGRAM 'id'")
    _refused(dsn, "COPY docs.nothing FROM PROGRAM 'id'")
    _refused(dsn, "SELECT pg_read_file('/etc/passwd')")
    _refused(dsn, "CREATE ROLE intruder SUPERUSER")
    _refused(dsn, "ALTER SYSTEM SET fsync = off")


async def test_router_cannot_write_the_catalog(stack: Stack, catalog_reader_dsn: str) -> None:
    async with Catalog(stack.catalog_dsn, max_size=1) as writer:
        await writer.ensure_schema()
        version = await writer.version()
    async with Catalog(catalog_reader_dsn, max_size=1) as reader:
        assert await reader.version() == version  # reads work
        with pytest.raises(errors.InsufficientPrivilege):
            await reader.register_shard("intruder", "host=x", engine="postgres",
                                        major_version=18)
    _refused(catalog_reader_dsn, "UPDATE catalog.meta SET version = version + 1")
    _refused(catalog_reader_dsn, "DELETE FROM catalog.chunks")
    _refused(catalog_reader_dsn, "CREATE TABLE catalog.intruder (a int)")
    _refused(catalog_reader_dsn, "COPY (SELECT 1) TO PROGRAM 'id'")
    with psycopg.connect(catalog_reader_dsn, autocommit=True) as conn:
        conn.execute("LISTEN shardshift_catalog")  # what the router's listener does


def test_passwords_only_in_the_passfile(stack: Stack) -> None:
    mode = stat.S_IMODE(os.stat(stack.passfile).st_mode)
    assert mode == 0o600
    record = stack.record()
    assert record is not None
    seen: dict[str, set[str]] = {}
    for server in record.servers:
        roles = ("router", "mover") if server.role == "shard" else ("catalog", "catalog_reader")
        for role in roles:
            dsn = stack.dsn(server.name, role)  # type: ignore[arg-type]
            params = conninfo_to_dict(dsn)
            assert "password" not in params and params["user"] == stack.role_name(role)  # type: ignore[arg-type]
            password = lookup(stack.passfile, "127.0.0.1", server.port, params["user"])
            assert password, (server.name, role)
            assert password not in dsn
            seen.setdefault(params["user"], set()).add(password)
            with psycopg.connect(dsn) as conn:
                assert conn.execute("SELECT current_user").fetchone() == (params["user"],)
    # Each role has a password of its own on each server.
    for user, passwords in seen.items():
        servers = sum(1 for s in record.servers
                      if user in {stack.role_name(r) for r in (
                          ("router", "mover") if s.role == "shard" else ("catalog", "catalog_reader"))})
        assert len(passwords) == servers, user


# -- an old stack, upgraded in place ------------------------------------------------------------


def _session_users(st: Stack, shards: list[str]) -> set[str]:
    """Users of every other client session on the shards' shardshift databases."""
    out: set[str] = set()
    for name in shards:
        with psycopg.connect(st.dsn(name, "superuser"), autocommit=True) as conn:
            out |= {r[0] for r in conn.execute(
                "SELECT usename FROM pg_stat_activity WHERE datname = 'shardshift'"
                " AND pid <> pg_backend_pid() AND usename IS NOT NULL")}
    return out


@pytest.fixture
def old_stack() -> Iterator[Stack]:
    """A running stack as the previous version left it: a passfile with the superuser's one
    wildcard line, no roles (``Stack.up`` alone starts the servers without provisioning)."""
    state = owned_state_dir("upgrade")
    password = secrets.token_urlsafe(24)
    (state / "pgpass").write_text(f"127.0.0.1:*:*:postgres:{password}\n")
    os.chmod(state / "pgpass", 0o600)
    st = Stack(state, make_stack_settings(2))
    try:
        st.up()
        yield st
    finally:
        try:
            st.down()
        finally:
            shutil.rmtree(state, ignore_errors=True)


async def test_old_stack_upgrades_in_place(old_stack: Stack) -> None:
    st = old_stack
    c = "legacy"
    record = st.record()
    assert record is not None
    shards = [s.name for s in record.servers if s.role == "shard"]
    # The old layout: the catalog, schemas, tables, fences and rows are the superuser's, and
    # the catalog's addresses say user=postgres.
    async with Catalog(st.dsn("catalog", "superuser"), max_size=2) as cat:
        await cat.ensure_schema()
        engines = {}
        for name in shards:
            await cat.register_shard(name, st.dsn(name, "superuser"), engine="postgres",
                                     major_version=18)
            engines[name] = await PostgresShard(name, st.dsn(name, "superuser")).open()
        try:
            cmap = await provision_collection(cat, engines, c, "acct", chunks_per_shard=1)
        finally:
            for e in engines.values():
                await e.close()
    with psycopg.connect(st.dsn(shards[0], "superuser")) as conn:
        roles = conn.execute("SELECT count(*) FROM pg_roles WHERE rolname LIKE 'shardshift%'"
                             ).fetchone()
        assert roles == (0,)

    up_and_provision(st)  # this version's `infra up` on the running old stack

    lines = st.passfile.read_text().splitlines()
    assert lines[0].endswith(":postgres:" + lines[0].rsplit(":", 1)[1])  # kept, still first
    assert stat.S_IMODE(os.stat(st.passfile).st_mode) == 0o600
    async with Catalog(st.dsn("catalog", "superuser"), max_size=1) as cat:
        assert "user=postgres" in (await cat.shard(shards[0])).address  # rows untouched
    for name in shards:
        with psycopg.connect(st.dsn(name, "mover")) as conn:
            owners = {r[0] for r in conn.execute(
                "SELECT tableowner FROM pg_tables WHERE schemaname IN ('docs', 'shardshift')")}
            assert owners == {DB.mover_user}

    # Everything works under the roles: a router (catalog read-only) writes, a worker (mover,
    # catalog writer) moves a chunk under it, and every acknowledged write is there after.
    settings = Settings(
        state_dir=st.state_dir, catalog_dsn=st.catalog_address,
        staging_url=str(st.state_dir / "staging"),
        temporal=TemporalSettings(address=st.temporal.address,
                                  task_queue=f"upgrade-{uuid.uuid4().hex[:8]}"),
    )
    client = await Client.connect(st.temporal.address, data_converter=pydantic_data_converter)
    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(settings, stop=stop, client=client))
    source = CatalogRouteSource.from_dsn(st.dsn("catalog", "catalog_reader"))
    written: list[str] = []
    try:
        async with Router(source, RouterSettings(retry_deadline_s=10)) as router:
            for i in range(200):
                await router.insert(c, {"_id": f"d{i}", "acct": f"a{i}"})
                written.append(f"d{i}")
            moving = cmap.chunks[0]
            target = next(s for s in shards if s != moving.shard_id)
            handle = await client.start_workflow(
                MigrateChunkWorkflow.run,
                MigrateChunkInput(collection=c, chunk_id=moving.chunk_id, target=target,
                                  poll_s=0.2, cutover_retry_s=0.2),
                id=f"move-{c}-{uuid.uuid4().hex[:6]}", task_queue=settings.temporal.task_queue)
            i = 200
            users: set[str] = set()
            while not (await handle.describe()).close_time:
                if i % 20 == 0:
                    users |= _session_users(st, shards)
                try:
                    await router.insert(c, {"_id": f"d{i}", "acct": f"a{i}"})
                    written.append(f"d{i}")
                except RetryDeadlineExceeded:
                    pass  # not acknowledged: not expected to survive
                i += 1
            result = await handle.result()
            assert result.outcome == MigrationOutcome.COMPLETED, result
            # Nobody but the roles was connected to the shards while the move ran (the
            # catalog still says user=postgres: components put their own role in).
            assert users and users <= {DB.router_user, DB.mover_user}, users
            for _id in written:
                doc = await router.get(c, f"a{_id[1:]}", _id)
                assert doc is not None, _id
    finally:
        stop.set()
        await worker
