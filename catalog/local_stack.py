"""The local stack provisioned, its shards in the catalog, and engines for registered shards.

``up_and_provision`` is ``shardshift infra up``: ``Stack.up()`` starts the servers (``infra``
knows nothing of the shard's or the catalog's objects), then ``provision_stack`` provisions
every server (``provision_catalog``, ``provision_shard``: roles, schemas, grants; idempotent,
and it upgrades a stack made by an older version in place). ``private_stack`` is a
provisioned stack of its own for tests and benchmarks, torn down on exit.
``register_stack_shards`` registers the servers of a ``shardshift infra`` stack as catalog
shards (``shardshift collection create``, the demo and the benchmarks use it);
``open_engines``/``close_engines`` open and close a ``PostgresShard`` per registered shard.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

from psycopg.conninfo import conninfo_to_dict

from catalog.models import ShardInfo
from catalog.provision import provision_catalog
from catalog.store import Catalog
from infra import InfraError, Stack, StackRecord
from infra.private import new_state_dir, private_settings
from infra.stack import ServerRecord
from settings import DatabaseSettings, get_settings
from shards.postgres import PostgresShard
from shards.postgres.provision import provision_shard


def provision_stack(stack: Stack) -> None:
    """Create or update every server's roles, schemas and grants (each in one transaction)."""
    record = stack.record()
    for server in record.servers if record else []:
        provision = provision_catalog if server.role == "catalog" else provision_shard
        provision(stack.instance(server).dsn(), stack.passfile, db=stack.db)


def up_and_provision(stack: Stack) -> StackRecord:
    """Start every server of the stack (``Stack.up``), then provision them: a usable stack."""
    record = stack.up()
    provision_stack(stack)
    stack.alias_standbys()  # the roles just made log in on the standbys too
    return record


@contextmanager
def private_stack(
    shards: int = 2, *, pg15_shards: int = 0, prefix: str = "shardshift-bench-",
    standbys: tuple[str, ...] = (),
) -> Iterator[Stack]:
    """A running, provisioned private stack (own state directory and free ports), stopped
    and removed on exit (also on errors); ``standbys``: servers with a streaming standby."""
    state = new_state_dir(prefix)
    stack = Stack(state, private_settings(shards, pg15_shards, standbys))
    try:
        up_and_provision(stack)
        yield stack
    finally:
        try:
            stack.down()
        finally:
            shutil.rmtree(state, ignore_errors=True)


async def register_stack_shards(
    catalog: Catalog, stack: Stack, names: Sequence[str] | None = None
) -> list[ShardInfo]:
    """Register the local stack's shards in the catalog when missing (id = server name).

    The catalog gets each server's address without a role (host, port, dbname, passfile);
    every component adds its own. A shard the catalog already knows is left as it is (an
    address from an older stack naming ``user=postgres`` works: the user is replaced).
    Returns the (registered) shards of ``names`` (default: every shard server of the
    stack), in stack order.
    """
    record = stack.record()
    if record is None:
        raise InfraError(f"no local stack in {stack.state_dir}: run `shardshift infra up`")
    servers = [s for s in record.servers if s.role == "shard"]
    if names is not None:
        unknown = sorted(set(names) - {s.name for s in servers})
        if unknown:
            raise InfraError(f"the local stack has no shard {unknown}; it has "
                             f"{[s.name for s in servers]}")
        servers = [s for s in servers if s.name in names]
    known = {s.shard_id: s for s in await catalog.list_shards()}
    out: list[ShardInfo] = []
    for server in servers:
        info = known.get(server.name)
        if info is None:
            info = await catalog.register_shard(
                server.name, stack.address(server.name), engine="postgres",
                major_version=server.major_version,
            )
        elif _gained_standby(info.address, server):
            # Registered before the server had a standby: its address names the primary
            # only and would not follow a promotion. The multi-host address replaces it.
            info = await catalog.register_shard(
                server.name, stack.address(server.name), engine=info.engine,
                major_version=info.major_version, capacity_bytes=info.capacity_bytes,
                capacity_ops_per_s=info.capacity_ops_per_s,
            )
        out.append(info)
    return out


def _gained_standby(address: str, server: ServerRecord) -> bool:
    """Whether a registered address names only this server's first node although the server
    has a standby now."""
    if server.standby_port is None:
        return False
    return str(conninfo_to_dict(address).get("port")) == str(server.port)


async def follow_standbys(stack: Stack, db: DatabaseSettings | None = None) -> list[str]:
    """After ``infra up --standby``: the stack's shards already registered in the catalog get
    their multi-host address (see ``register_stack_shards``); returns the ids updated."""
    record = stack.record()
    db = db or get_settings().db
    async with Catalog(db.catalog(stack.catalog_address), max_size=1) as catalog:
        await catalog.ensure_schema()
        known = {s.shard_id: s for s in await catalog.list_shards()}
        names = [s.name for s in record.servers if s.role == "shard" and s.name in known
                 and _gained_standby(known[s.name].address, s)] if record else []
        if names:
            await register_stack_shards(catalog, stack, names)
        return names


async def open_engines(shards: Sequence[ShardInfo], max_size: int = 4,
                       db: DatabaseSettings | None = None) -> dict[str, PostgresShard]:
    """Engines for control-plane work on shards (collection DDL, fences, checks): as the
    mover, which owns the shards' schemas."""
    db = db or get_settings().db
    engines: dict[str, PostgresShard] = {}
    try:
        for s in shards:
            engines[s.shard_id] = await PostgresShard(s.shard_id, db.mover(s.address),
                                                      max_size=max_size).open()
    except BaseException:
        await close_engines(engines)
        raise
    return engines


async def close_engines(engines: Mapping[str, PostgresShard]) -> None:
    await asyncio.gather(*(e.close() for e in engines.values()), return_exceptions=True)
