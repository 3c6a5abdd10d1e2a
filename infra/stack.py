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

from infra.errors import InfraError
from infra.postgres import (
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
        return StackRecord(
            state_dir=str(self.state_dir),
            temporal_port=self.temporal.port,
            ui_port=self.temporal.ui_port,
            servers=list(servers.values()),
        )

    # -- servers -------------------------------------------------------------------------------

    def instance(self, server: ServerRecord) -> PostgresInstance:
        return PostgresInstance(
            server.name,
            data_dir=self.state_dir / "pg" / server.name,
            port=server.port,
            bin_dir=Path(server.bin_dir),
            passfile=self.passfile,
            run_as=self.infra.run_as,
        )

    def instance_for_dsn(self, dsn: str) -> PostgresInstance:
        """The stack's server behind a DSN or address, whatever its role (to stop, start or
        inspect it)."""
        port = conninfo_to_dict(dsn).get("port")
        for inst in self.instances():
            if str(inst.port) == port:
                return inst
        raise InfraError(f"no server of the stack in {self.state_dir} listens on port {port}")

    def instances(self) -> list[PostgresInstance]:
        record = self.record()
        return [self.instance(s) for s in record.servers] if record else []

    def _server(self, name: str) -> ServerRecord:
        record = self.record()
        if record is None:
            raise InfraError(f"no local stack in {self.state_dir}: run `shardshift infra up`")
        for server in record.servers:
            if server.name == name:
                return server
        raise InfraError(f"unknown server {name!r}; the stack has {[s.name for s in record.servers]}")

    def address(self, name: str) -> str:
        """A server's address without a role (what the catalog stores for a shard)."""
        return self.instance(self._server(name)).address()

    def dsn(self, name: str, role: Role) -> str:
        """A server's DSN as one of the stack's roles: ``superuser`` (infra and tests only),
        ``router`` or ``mover`` (shards), ``catalog`` or ``catalog_reader`` (the catalog)."""
        server = self._server(name)
        user = self.role_name(role)
        return self.instance(server).dsn(user=user)

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
        self.temporal.start(timeout)
        return planned

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
                    name=server.name, role=server.role, address=f"127.0.0.1:{server.port}",
                    version=version if healthy else f"{server.major_version} (down)",
                    healthy=healthy, detail="" if healthy else version,
                )
            )
        return out

    def pids(self) -> list[int]:
        """Every server process of this stack that is still alive."""
        pids = [p for p in (i.pid() for i in self.instances()) if p]
        tpid = self.temporal.pid()
        return pids + ([tpid] if tpid else [])
