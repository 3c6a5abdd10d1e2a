"""Session fixtures: a private local stack (own state directory and ports) for the whole run.

The stack never touches one a user is running: it lives in a fresh temporary directory with
ports picked free at start-up, and it is destroyed at the end of the session even when tests
fail (pytest runs fixture finalizers on failure and on Ctrl-C).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from catalog.local_stack import up_and_provision
from infra import Stack
from infra.private import new_state_dir, private_settings
from settings import InfraSettings

if TYPE_CHECKING:
    from catalog import Catalog

PG15_BIN = Path("/usr/lib/postgresql/15/bin")
HAS_PG15 = (PG15_BIN / "postgres").exists()


def make_stack_settings(shards: int, pg15_shards: int = 0) -> InfraSettings:
    return private_settings(shards, pg15_shards)


TEST_STATE_PREFIX = "shardshift-test-"

# Every session-scoped ``Catalog`` this process opened (the fixtures add and remove them) on the session stack's catalog. A package
# that imports another's fixture gets a second instance of it (``tests/workflows`` imports
# ``router_catalog``), so there are several, opened at first use, in whatever order the run
# (or an xdist worker's share of it) reaches them.
SESSION_CATALOGS: list[Catalog] = []


async def refresh_session_catalogs() -> None:
    """After a test restarted the session stack's catalog server: drop the dead connections of
    EVERY session catalog pool, not only the one the test used. A pool left stale fails a later
    test's first catalog call with ``AdminShutdown`` (seen under xdist, where a package's tests
    can open their catalog client before another package's restart test runs)."""
    for cat in SESSION_CATALOGS:
        await cat._pool.check()


def owned_state_dir(kind: str = "") -> Path:
    """A fresh directory for this test session's servers or files, reaped by the next session
    if this one is killed before its finalizers run."""
    state = new_state_dir(f"{TEST_STATE_PREFIX}{kind}-" if kind else TEST_STATE_PREFIX)
    (state / "owner.pid").write_text(str(os.getpid()))
    return state


def _stop_postmasters(state: Path) -> None:
    """Stop every PostgreSQL whose data directory lies under ``state`` (fast shutdown)."""
    for pidfile in state.rglob("postmaster.pid"):
        try:
            pid = int(pidfile.read_text().split()[0])
            os.kill(pid, signal.SIGINT)
        except (OSError, ValueError, IndexError):
            continue
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def reap_abandoned_stacks() -> None:
    """Stop servers left by test sessions that were killed before their finalizers ran.

    Each session writes its pid to ``owner.pid`` in its state directories; a directory whose
    owner is gone is a leftover: stop its stack and any other PostgreSQL under it, remove it.
    """
    for state in Path("/tmp").glob(f"{TEST_STATE_PREFIX}*"):
        try:
            owner = int((state / "owner.pid").read_text())
            os.kill(owner, 0)
            continue  # its session is still running
        except ProcessLookupError:
            pass  # its owner is gone: a leftover, reaped below
        except (OSError, ValueError):
            continue  # not ours to judge (no owner file yet, or unreadable)
        try:
            Stack(state, InfraSettings()).down()
            _stop_postmasters(state)
        finally:
            shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    """A running stack: catalog, 3 PostgreSQL 18 shards, 1 PostgreSQL 15 shard when installed,
    and a headless Temporal dev server."""
    reap_abandoned_stacks()
    state = owned_state_dir()
    st = Stack(state, make_stack_settings(3, 1 if HAS_PG15 else 0))
    try:
        up_and_provision(st)
        yield st
    finally:
        try:
            st.down()
        finally:
            shutil.rmtree(state, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_PG15:
        return
    skip = pytest.mark.skip(reason="PostgreSQL 15 not installed (apt-get install -y postgresql-15)")
    for item in items:
        if "pg15" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def pg18_dsns(stack: Stack) -> list[str]:
    """DSNs of the PostgreSQL 18 shards of the session stack (at least 3), as the mover role:
    what workers and the CLI's shard DDL connect as (never the superuser). Components given
    one of these as a shard address replace the user with their own role."""
    record = stack.record()
    assert record is not None
    return [
        stack.dsn(s.name, "mover") for s in record.servers
        if s.role == "shard" and s.major_version >= 16
    ]


@pytest.fixture(scope="session")
def pg15_dsn(stack: Stack) -> str:
    """DSN of the PostgreSQL 15 shard as the mover (tests using it are marked ``pg15``)."""
    record = stack.record()
    assert record is not None
    for s in record.servers:
        if s.role == "shard" and s.major_version == 15:
            return stack.dsn(s.name, "mover")
    pytest.skip("no PostgreSQL 15 shard in the session stack")


@pytest.fixture(scope="session")
def catalog_dsn(stack: Stack) -> str:
    """The catalog as the control plane (the catalog writer role)."""
    return stack.catalog_dsn


@pytest.fixture(scope="session")
def catalog_reader_dsn(stack: Stack) -> str:
    """The catalog as routers see it (read-only)."""
    return stack.dsn("catalog", "catalog_reader")


_names = iter(range(1, 10**9))


@pytest.fixture
def collection_name(request: pytest.FixtureRequest) -> str:
    """A fresh collection name per test (valid identifier, unique within the session)."""
    import re

    base = re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:30]
    return f"c{next(_names)}_{base}"
