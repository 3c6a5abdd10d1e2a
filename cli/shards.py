"""``shardshift shard add|list|remove``: production shards in the catalog, without the local
stack.

``add`` provisions the shardshift roles on the server when given a superuser DSN (used for
that and never stored), checks that the server answers as the mover (owner of the schemas,
``REPLICATION``, not superuser) and as the router (reads the fence), and registers the
address, without a role or password, with the server's major version and an optional
capacity. ``remove`` retires a shard that holds nothing: the id stays in the catalog for the
history of its migrations and is never reused; the server itself is left alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from catalog import Catalog
from catalog.errors import CatalogError, ShardStateError, UnknownShardError
from catalog.models import ShardState
from catalog.store import check_address, check_shard_id
from cli.common import CliError, catalog_dsn
from cli.render import human_bytes
from infra.errors import InfraError
from infra.passfile import add_alias
from settings import DatabaseSettings, Settings, get_settings
from shards.postgres.provision import provision_shard
from shards.postgres.roles import as_role
from shards.postgres.server import ServerIdentity, identify

_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2, "mb": 1000**2,
          "mib": 1024**2, "g": 1024**3, "gb": 1000**3, "gib": 1024**3, "t": 1024**4,
          "tb": 1000**4, "tib": 1024**4, "p": 1024**5, "pb": 1000**5, "pib": 1024**5}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*")


def parse_capacity(text: str) -> int:
    """``500GiB``, ``1.5 TB``, ``750g``, ``1048576`` -> bytes. IEC units (KiB, MiB, ...) and
    single letters are powers of 1024, SI units (KB, MB, ...) powers of 1000; a bare number
    is bytes. At least 1 byte, below 2^63."""
    m = _SIZE.fullmatch(text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(
            f"invalid capacity {text!r}: use a number and a unit, e.g. 500GiB, 2TB, 750g")
    value = float(m.group(1)) * _UNITS[unit]
    if not math.isfinite(value) or not 1 <= value < 2**63:
        raise argparse.ArgumentTypeError(
            f"invalid capacity {text!r}: between 1 byte and 8 EiB")
    return int(value)


def cmd_shard(args: argparse.Namespace) -> int:
    if args.action == "add":
        return asyncio.run(_add(args))
    if args.action == "remove":
        return asyncio.run(_remove(args))
    return asyncio.run(_list(args))


# -- add ----------------------------------------------------------------------------------------


def provision_shard_roles(superuser_dsn: str, passfile: Path, db: DatabaseSettings,
                          host: str, port: int) -> None:
    """Create or update the shard roles, schemas and grants on one server (the one place
    ``shard add`` provisions; passwords go to ``passfile`` under ``host:port``)."""
    provision_shard(superuser_dsn, passfile, db=db, passfile_host=host, passfile_port=port)


def _address(dsn: str) -> tuple[str, list[tuple[str, int]], str]:
    """(address to store, its (host, port)s, dbname) of ``--dsn``: no password, no role.

    Several hosts (a primary and its standbys: ``host=a,b port=5432,5432``) make a replica
    set's address; it gets ``target_session_attrs=read-write`` unless it chooses its own."""
    try:
        check_address(dsn)
        params = {k: str(v) for k, v in conninfo_to_dict(dsn).items() if v is not None}
    except ValueError as exc:
        raise CliError(f"invalid --dsn: {exc}".replace("\n", " ")) from None
    hosts = (params.get("host") or params.get("hostaddr") or "").split(",")
    if not all(hosts):
        raise CliError("invalid --dsn: it needs host= (a TCP address every worker and router "
                       "can reach)")
    ports = (params.get("port") or "5432").split(",")
    if len(ports) == 1:
        ports *= len(hosts)
    if len(ports) != len(hosts):
        raise CliError(f"invalid --dsn: {len(hosts)} hosts but {len(ports)} ports")
    try:
        servers = [(h, int(p or 5432)) for h, p in zip(hosts, ports, strict=True)]
    except ValueError:
        raise CliError(f"invalid --dsn: port {params.get('port')!r} is no number") from None
    params.pop("user", None)  # each component connects as its own role
    params.setdefault("dbname", "shardshift")
    if len(servers) > 1:
        params.setdefault("target_session_attrs", "read-write")
    return make_conninfo(**params), servers, params["dbname"]


def _passfile(args: argparse.Namespace, settings: Settings, address: str) -> Path:
    """Where the roles' passwords are (or go): ``--passfile``, the settings', the address's,
    ``PGPASSFILE``, else libpq's default ``~/.pgpass``."""
    for candidate in (args.passfile, settings.db.passfile,
                      conninfo_to_dict(address).get("passfile"), os.environ.get("PGPASSFILE")):
        if candidate:
            return Path(str(candidate))
    return Path.home() / ".pgpass"


def _superuser_dsn(dsn: str, dbname: str) -> str:
    try:
        params = {k: str(v) for k, v in conninfo_to_dict(dsn).items() if v is not None}
    except Exception as exc:  # noqa: BLE001 - psycopg's parse error, one line
        raise CliError(f"invalid --superuser-dsn: {exc}".replace("\n", " ")) from None
    if params.setdefault("dbname", dbname) != dbname:
        raise CliError(f"--superuser-dsn names database {params['dbname']!r}, --dsn "
                       f"{dbname!r}: they must be the same database")
    if "," in params.get("host", params.get("hostaddr", "")):
        params.setdefault("target_session_attrs", "read-write")  # provision the primary
    return make_conninfo(**params)


def _check_roles(address: str, db: DatabaseSettings, passfile: Path) -> ServerIdentity:
    """The server answers as the mover (schema owner, replication, no superuser) and as the
    router (reads the fence); the mover's identity, or ``CliError`` saying what is wrong."""
    hint = ("provision it with --superuser-dsn, or check pg_hba.conf and the passfile "
            f"{passfile}")
    try:
        mover = identify(as_role(address, db.mover_user, passfile))
    except Exception as exc:  # noqa: BLE001 - one line for the operator
        raise CliError(f"the server does not answer as {db.mover_user}: "
                       f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc} "
                       f"({hint})") from None
    problems = []
    if mover.superuser:
        problems.append(f"{db.mover_user} is a superuser (it must not be)")
    if not mover.replication:
        problems.append(f"{db.mover_user} lacks REPLICATION")
    if not mover.owns_schemas:
        problems.append(f"{db.mover_user} does not own the schemas shardshift and docs")
    try:
        router = identify(as_role(address, db.router_user, passfile))
        if not router.reads_fence:
            problems.append(f"{db.router_user} cannot read shardshift.chunk_fence")
    except Exception as exc:  # noqa: BLE001
        text = str(exc).strip().splitlines()
        problems.append(f"the server does not answer as {db.router_user}: "
                        f"{text[0] if text else exc}")
    if problems:
        raise CliError("; ".join(problems) + f" ({hint})")
    return mover


async def _add(args: argparse.Namespace) -> int:
    settings = get_settings()
    try:
        check_shard_id(args.name)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    address, servers, dbname = _address(args.dsn)
    host, port = servers[0]
    passfile = _passfile(args, settings, address)
    superuser = _superuser_dsn(args.superuser_dsn, dbname) if args.superuser_dsn else None
    async with Catalog(catalog_dsn(settings), max_size=1) as cat:
        await cat.ensure_schema()
        try:
            existing = await cat.shard(args.name)
        except UnknownShardError:
            existing = None
        if existing is not None and existing.state == ShardState.RETIRED:
            raise CliError(f"shard {args.name} is retired; its id is never reused: add the "
                           "server under a new name")
        if existing is not None and existing.address != address and not args.update:
            raise CliError(f"shard {args.name} is already registered at "
                           f"{existing.address!r}; to move it to this address, add --update")
        provisioned = False
        if superuser is not None:
            try:
                await asyncio.to_thread(provision_shard_roles, superuser, passfile,
                                        settings.db, host, port)
            except InfraError as exc:
                raise CliError(f"cannot provision {host}:{port}: {exc}") from None
            except Exception as exc:  # noqa: BLE001 - psycopg's reason, one line
                text = str(exc).strip().splitlines()
                raise CliError(f"cannot provision {host}:{port} with --superuser-dsn: "
                               f"{text[0] if text else type(exc).__name__}") from None
            for other_host, other_port in servers[1:]:  # its standbys: the same roles
                add_alias(passfile, host, port, other_port, alias_host=other_host)
            provisioned = True
        me = await asyncio.to_thread(_check_roles, address, settings.db, passfile)
        capacity = args.capacity if args.capacity is not None else (
            existing.capacity_bytes if existing is not None else None)
        try:
            info = await cat.register_shard(
                args.name, address, engine="postgres", major_version=me.major_version,
                capacity_bytes=capacity,
                capacity_ops_per_s=existing.capacity_ops_per_s if existing else None)
        except (ValueError, CatalogError) as exc:
            raise CliError(f"cannot register shard {args.name}: {exc}") from None
    verb = "registered" if existing is None else (
        "unchanged" if existing == info else "updated")
    if args.json:
        print(json.dumps({"shard": info.model_dump(mode="json"), "result": verb,
                          "provisioned": provisioned, "passfile": str(passfile)}, indent=2))
        return 0
    cap = human_bytes(info.capacity_bytes) if info.capacity_bytes is not None else "unknown"
    print(f"shard {info.shard_id} {verb}: {info.address} (postgres {info.major_version}, "
          f"{info.state.value}, capacity {cap})")
    if provisioned:
        print(f"roles {settings.db.mover_user} and {settings.db.router_user} provisioned; "
              f"their passwords are in {passfile} (workers need the mover's line, routers the "
              "router's)")
    return 0


# -- list and remove ------------------------------------------------------------------------------


async def _list(args: argparse.Namespace) -> int:
    async with Catalog(catalog_dsn(get_settings()), max_size=1) as cat:
        await cat.ensure_schema()
        shards = await cat.list_shards()
        usage = await cat.shard_usage()
    rows: list[dict[str, Any]] = []
    for s in shards:
        u = usage.get(s.shard_id)
        rows.append({**s.model_dump(mode="json"), "chunks": u.chunks if u else 0,
                     "moves_in": u.moves_in if u else 0, "moves_out": u.moves_out if u else 0})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no shards registered (shardshift shard add NAME --dsn ...)")
        return 0
    print(f"{'SHARD':<24} {'STATE':<9} {'ENGINE':<12} {'CHUNKS':>6} {'CAPACITY':>10}  ADDRESS")
    for r in rows:
        cap = human_bytes(r["capacity_bytes"]) if r["capacity_bytes"] is not None else "-"
        print(f"{r['shard_id'][:24]:<24} {r['state']:<9} "
              f"{r['engine'] + ' ' + str(r['major_version']):<12} {r['chunks']:>6} {cap:>10}  "
              f"{r['address']}")
    return 0


async def _remove(args: argparse.Namespace) -> int:
    try:
        check_shard_id(args.name)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    async with Catalog(catalog_dsn(get_settings()), max_size=1) as cat:
        try:
            before = await cat.shard(args.name)
            info = await cat.set_shard_state(args.name, ShardState.RETIRED)
        except UnknownShardError as exc:
            raise CliError(str(exc)) from None
        except ShardStateError as exc:
            raise CliError(f"shard {args.name} cannot be removed: {exc} "
                           f"(shardshift drain {args.name})") from None
    already = before.state == ShardState.RETIRED
    if args.json:
        print(json.dumps({"shard": info.model_dump(mode="json"),
                          "result": "already retired" if already else "retired"}, indent=2))
        return 0
    print(f"shard {args.name} {'was already' if already else 'is now'} retired: it receives "
          "and serves nothing; its id stays in the catalog for the history of its migrations "
          "and is never reused. The server and its roles are left as they are.")
    return 0
