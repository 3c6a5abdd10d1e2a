"""The local stack: a Temporal dev server, a catalog PostgreSQL and N shard PostgreSQLs.

``Stack.up()`` is idempotent: it creates what is missing, starts what is stopped and waits for
every server to be healthy. ``Stack.down()`` stops everything it started and waits until no
process is left. The stack file (``stack.json`` in the state directory) records what exists,
so ``status`` and other processes (the worker, tests, the demo) find the servers' addresses.
``up`` only starts servers: provisioning their roles, schemas and grants needs the shard's and
the catalog's objects, which live above ``infra``, so ``catalog.local_stack.up_and_provision``
(what ``shardshift infra up`` runs) calls ``up`` and then provisions every server. Components
connect as those roles, never as the superuser, with passwords in the stack's passfile
(``pgpass``, mode 0600).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Literal

from psycopg.conninfo import conninfo_to_dict
from pydantic import BaseModel, ConfigDict

from infra import standby
from infra.errors import InfraError
from infra.net import free_port_block
from infra.passfile import add_alias
from infra.postgres import (
    DATABASE,
    SUPERUSER,
    PostgresInstance,
    binary_version,
    embedded_bin_dir,
    ensure_os_user,
)
from infra.temporal import TemporalDevServer
from settings import DatabaseSettings, InfraSettings, Settings

Role = Literal["superuser", "router", "mover", "catalog", "catalog_reader"]

STACK_FILE = "stack.json"


class ServerRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    role: str  # "catalog" | "shard"
    port: int
    major_version: int
    bin_dir: str
    standby_port: int | None = None
    """A streaming standby of this server listens here (``infra up --standby``)."""
    promoted: bool = False
    """The standby was promoted: it is the primary now (on ``standby_port``)."""
    stale: bool = False
    """The node that is not the primary (the old primary after a promotion) must be cloned
    again before it runs: ``infra up --standby NAME`` does it."""


class StackRecord(BaseModel):
    """What ``stack.json`` holds: every server of the stack and how to reach it."""

    state_dir: str
    temporal_port: int
    ui_port: int
    servers: list[ServerRecord]


class ServerStatus(BaseModel):
    name: str
    role: str
    address: str
    version: str
    healthy: bool
    detail: str = ""


class Stack:
    """The local stack rooted at one state directory."""

    def __init__(self, state_dir: Path, infra: InfraSettings,
                 db: DatabaseSettings | None = None) -> None:
        self.state_dir = state_dir.resolve()
        self.infra = infra
        self.db = db or DatabaseSettings()
        self.passfile = self.state_dir / "pgpass"
        existing = self.record()
        # A running stack keeps the ports it was created with, whatever this caller's settings say.
        self.temporal = TemporalDevServer(
            self.state_dir,
            port=existing.temporal_port if existing else infra.temporal_port,
            ui_port=existing.ui_port if existing else infra.ui_port,
            headless=infra.headless,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> Stack:
        return cls(settings.state_dir, settings.infra, settings.db)

    # -- the stack file ----------------------------------------------------------------------

    @property
    def stack_file(self) -> Path:
        return self.state_dir / STACK_FILE

    def record(self) -> StackRecord | None:
        try:
            return StackRecord.model_validate_json(self.stack_file.read_text())
        except FileNotFoundError:
            return None

    def _planned(self) -> StackRecord:
        """The servers this configuration wants, merged with those that already exist."""
        existing = self.record()
        pg18 = self.infra.pg_bin_dir or embedded_bin_dir()
        servers: dict[str, ServerRecord] = {s.name: s for s in existing.servers} if existing else {}
        base = self.infra.base_port
        if "catalog" not in servers:
            servers["catalog"] = ServerRecord(
                name="catalog", role="catalog", port=base, major_version=binary_version(pg18),
                bin_dir=str(pg18),
            )
        shards = [s for s in servers.values() if s.role == "shard"]
        n18 = sum(1 for s in shards if s.bin_dir == str(pg18))
        n15 = sum(1 for s in shards if s.bin_dir == str(self.infra.pg15_bin_dir))
        next_index = len(shards) + 1
        wanted: list[Path] = [pg18] * max(0, self.infra.shards - n18)
        if self.infra.pg15_shards > n15:
            if not (self.infra.pg15_bin_dir / "postgres").exists():
                raise InfraError(
                    f"PostgreSQL 15 binaries not found in {self.infra.pg15_bin_dir}; "
                    "install them with: apt-get install -y postgresql-15"
                )
            wanted += [self.infra.pg15_bin_dir] * (self.infra.pg15_shards - n15)
        for bin_dir in wanted:
            name = f"shard-{next_index}"
            servers[name] = ServerRecord(
                name=name, role="shard", port=base + next_index,
                major_version=binary_version(bin_dir), bin_dir=str(bin_dir),
            )
            next_index += 1
        self._plan_standbys(servers)
        return StackRecord(
            state_dir=str(self.state_dir),
            temporal_port=self.temporal.port,
            ui_port=self.temporal.ui_port,
            servers=list(servers.values()),
        )

    def _plan_standbys(self, servers: dict[str, ServerRecord]) -> None:
        """A standby port for every server ``infra.standbys`` names (``*``: every one) that
        has none yet: a free port outside the ephemeral range, kept in the stack file."""
        wanted = set(self.infra.standbys)
        unknown = sorted(wanted - set(servers) - {"*"})
        if unknown:
            raise InfraError(f"--standby names no server of the stack: {unknown}; "
                             f"it has {sorted(servers)}")
        taken = {s.port for s in servers.values()} | {
            s.standby_port for s in servers.values() if s.standby_port}
        for name, server in servers.items():
            if server.standby_port is None and ("*" in wanted or name in wanted):
                port = free_port_block(1)
                while port in taken:
                    port = free_port_block(1)
                taken.add(port)
                servers[name] = server.model_copy(update={"standby_port": port})

    # -- servers -------------------------------------------------------------------------------

    def _node(self, server: ServerRecord, second: bool) -> PostgresInstance:
        """One of a server's two nodes: the first (created by ``initdb``, on ``port``) or the
        second (a clone, on ``standby_port``)."""
        port = server.standby_port if second else server.port
        if port is None:
            raise InfraError(f"{server.name} has no standby")
        name = f"{server.name}-standby" if second else server.name
        return PostgresInstance(
            name,
            data_dir=self.state_dir / "pg" / name,
            port=port,
            bin_dir=Path(server.bin_dir),
            passfile=self.passfile,
            run_as=self.infra.run_as,
        )

    def instance(self, server: ServerRecord) -> PostgresInstance:
        """The server's primary (its only node without a standby)."""
        return self._node(server, second=server.promoted)

    def replica(self, server: ServerRecord) -> PostgresInstance | None:
        """The server's standby node (None without ``--standby``); check ``server.stale``
        before starting it."""
        if server.standby_port is None:
            return None
        return self._node(server, second=not server.promoted)

    def instance_for_dsn(self, dsn: str) -> PostgresInstance:
        """The stack's server behind a DSN or address, whatever its role (to stop, start or
        inspect it)."""
        port = str(conninfo_to_dict(dsn).get("port"))
        record = self.record()
        for server in record.servers if record else []:
            ports = {str(server.port), str(server.standby_port)}
            if "," in port and set(port.split(",")) == ports:
                return self.instance(server)  # a replicated server's address: its primary
        for inst in self.instances():
            if str(inst.port) == port:
                return inst
        raise InfraError(f"no server of the stack in {self.state_dir} listens on port {port}")

    def instances(self) -> list[PostgresInstance]:
        """Every node of every server: primaries and standbys."""
        record = self.record()
        out: list[PostgresInstance] = []
        for server in record.servers if record else []:
            out.append(self.instance(server))
            replica = self.replica(server)
            if replica is not None:
                out.append(replica)
        return out

    def _server(self, name: str) -> ServerRecord:
        record = self.record()
        if record is None:
            raise InfraError(f"no local stack in {self.state_dir}: run `shardshift infra up`")
        for server in record.servers:
            if server.name == name:
                return server
        raise InfraError(f"unknown server {name!r}; the stack has {[s.name for s in record.servers]}")

    def address(self, name: str) -> str:
        """A server's address without a role (what the catalog stores for a shard).

        A server with a standby has a libpq multi-host address naming both nodes, always in
        the same order, with ``target_session_attrs=read-write``: a connection goes to
        whichever node is the primary, so every client follows a promotion on its next
        connection and the address never changes."""
        server = self._server(name)
        if server.standby_port is None:
            return self.instance(server).address()
        return (f"host=127.0.0.1,127.0.0.1 port={server.port},{server.standby_port} "
                f"dbname={DATABASE} passfile={self.passfile} target_session_attrs=read-write")

    def dsn(self, name: str, role: Role) -> str:
        """A server's DSN as one of the stack's roles: ``superuser`` (infra and tests only),
        ``router`` or ``mover`` (shards), ``catalog`` or ``catalog_reader`` (the catalog)."""
        server = self._server(name)
        user = self.role_name(role)
        if server.standby_port is None:
            return self.instance(server).dsn(user=user)
        return f"{self.address(name)} user={user}"

    def role_name(self, role: Role) -> str:
        names = {
            "superuser": SUPERUSER, "router": self.db.router_user, "mover": self.db.mover_user,
            "catalog": self.db.catalog_user, "catalog_reader": self.db.catalog_reader_user,
        }
        if role not in names:
            raise InfraError(f"unknown role {role!r}; expected one of {sorted(names)}")
        return names[role]

    @property
    def catalog_dsn(self) -> str:
        """The catalog as the control plane (the catalog writer role)."""
        return self.dsn("catalog", "catalog")

    @property
    def catalog_address(self) -> str:
        return self.address("catalog")

    def shard_dsns(self, role: Role = "mover") -> dict[str, str]:
        record = self.record()
        return {s.name: self.dsn(s.name, role) for s in record.servers
                if s.role == "shard"} if record else {}

    # -- lifecycle -------------------------------------------------------------------------------

    def up(self) -> StackRecord:
        """Create and start every server of the stack; wait until all are healthy.

        The servers are not provisioned (no roles beyond the superuser): see
        ``catalog.local_stack.up_and_provision``."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o755)
        (self.state_dir / "pg").mkdir(exist_ok=True)
        os.chmod(self.state_dir / "pg", 0o755)
        if os.geteuid() == 0:
            ensure_os_user(self.infra.run_as)
        planned = self._planned()
        timeout = self.infra.startup_timeout_s
        for server in planned.servers:
            instance = self.instance(server)
            instance.init()
        self.stack_file.write_text(planned.model_dump_json(indent=2))
        for server in planned.servers:
            self.instance(server).start(timeout)
        for server in planned.servers:
            self._start_standby(server, timeout)
        self.temporal.start(timeout)
        return self.record() or planned

    def _write_server(self, server: ServerRecord) -> None:
        record = self.record()
        assert record is not None
        record.servers = [server if s.name == server.name else s for s in record.servers]
        self.stack_file.write_text(record.model_dump_json(indent=2))

    def _start_standby(self, server: ServerRecord, timeout: float) -> None:
        """Clone the server's standby when it has none (or a stale one that ``--standby``
        names again), start it and make the primary wait for it (``infra.standby``)."""
        replica = self.replica(server)
        if replica is None:
            return
        primary = self.instance(server)
        add_alias(self.passfile, "127.0.0.1", primary.port, replica.port)
        recloned = "*" in self.infra.standbys or server.name in self.infra.standbys
        if server.stale and not recloned:
            return  # the old primary stays down until asked for again
        if server.stale or not replica.initialized():
            replica.stop()
            standby.clone(primary, replica, timeout)
            server = server.model_copy(update={"stale": False})
            self._write_server(server)
        replica.start(timeout)
        standby.configure_primary(primary, timeout)

    def alias_standbys(self) -> None:
        """Let every role log in on the standbys too (after roles were provisioned)."""
        record = self.record()
        for server in record.servers if record else []:
            replica = self.replica(server)
            if replica is not None:
                add_alias(self.passfile, "127.0.0.1", self.instance(server).port, replica.port)

    def promote(self, name: str) -> ServerRecord:
        """Fail ``name`` over to its standby: stop the primary if it still runs (fast
        shutdown: a switchover), promote the standby. The old primary is stale from now on:
        it never starts again until ``infra up --standby NAME`` clones it from the new one."""
        server = self._server(name)
        replica = self.replica(server)
        if replica is None:
            raise InfraError(f"{name} has no standby (infra up --standby {name})")
        if server.stale:
            raise InfraError(f"{name}'s standby is stale (the old primary of the last "
                             f"promotion): run `shardshift infra up --standby {name}` first")
        if replica.pid() is None:
            raise InfraError(f"{name}'s standby {replica.name} is not running")
        self.instance(server).stop()
        standby.promote(replica, self.infra.startup_timeout_s)
        server = server.model_copy(update={"promoted": not server.promoted, "stale": True})
        self._write_server(server)
        return server

    def down(self) -> None:
        """Stop every server of the stack (data stays; ``destroy`` removes it)."""
        errors: list[str] = []
        try:
            self.temporal.stop()
        except Exception as exc:  # noqa: BLE001 - keep stopping the others
            errors.append(f"temporal: {exc}")
        for instance in self.instances():
            try:
                instance.stop()
            except Exception as exc:  # noqa: BLE001 - keep stopping the others
                errors.append(f"{instance.name}: {exc}")
        if errors:
            raise InfraError("; ".join(errors))

    def destroy(self) -> None:
        """Stop everything and delete the state directory."""
        self.down()
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def status(self) -> list[ServerStatus]:
        record = self.record()
        if record is None:
            return []
        out: list[ServerStatus] = []
        ok, detail = self.temporal.health()
        out.append(
            ServerStatus(
                name="temporal", role="temporal", address=self.temporal.address,
                version=self.temporal.version() if ok else "-", healthy=ok,
                detail=f"Web UI http://127.0.0.1:{self.temporal.ui_port}"
                if ok and not self.infra.headless else detail,
            )
        )
        for server in record.servers:
            instance = self.instance(server)
            healthy, version = instance.health()
            out.append(
                ServerStatus(
                    name=server.name, role=server.role, address=f"127.0.0.1:{instance.port}",
                    version=version if healthy else f"{server.major_version} (down)",
                    healthy=healthy, detail="" if healthy else version,
                )
            )
            replica = self.replica(server)
            if replica is None:
                continue
            if server.stale:
                out.append(ServerStatus(
                    name=f"{server.name}-standby", role="stale", address=f"127.0.0.1:{replica.port}",
                    version=f"{server.major_version} (stopped)", healthy=True,
                    detail=f"old primary of {server.name}: infra up --standby {server.name}"))
                continue
            healthy, version = replica.health()
            out.append(ServerStatus(
                name=f"{server.name}-standby", role="standby", address=f"127.0.0.1:{replica.port}",
                version=version if healthy else f"{server.major_version} (down)",
                healthy=healthy, detail=f"of {server.name}" if healthy else version))
        return out

    def pids(self) -> list[int]:
        """Every server process of this stack that is still alive."""
        pids = [p for p in (i.pid() for i in self.instances()) if p]
        tpid = self.temporal.pid()
        return pids + ([tpid] if tpid else [])
