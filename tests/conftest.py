"""Session fixtures: a private local stack (own state directory and ports) for the whole run.

The stack never touches one a user is running: it lives in a fresh temporary directory with
ports picked free at start-up, and it is destroyed at the end of the session even when tests
fail (pytest runs fixture finalizers on failure and on Ctrl-C).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra import Stack
from infra.private import new_state_dir, private_settings
from settings import InfraSettings

PG15_BIN = Path("/usr/lib/postgresql/15/bin")
HAS_PG15 = (PG15_BIN / "postgres").exists()


def make_stack_settings(shards: int, pg15_shards: int = 0) -> InfraSettings:
    return private_settings(shards, pg15_shards)


def reap_abandoned_stacks() -> None:
    """Stop stacks left by test sessions that were killed before their finalizers ran.

    Each session writes its pid to ``owner.pid`` in its state directory; a directory whose
    owner is gone is a leftover: stop its servers and remove it.
    """
    for state in Path("/tmp").glob("shardshift-test-*"):
        try:
            owner = int((state / "owner.pid").read_text())
            os.kill(owner, 0)
            continue  # its session is still running
        except ProcessLookupError:
            pass
        except (OSError, ValueError):
            continue  # not ours to judge (no owner file yet, or unreadable)
        try:
            Stack(state, InfraSettings()).down()
        finally:
            shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    """A running stack: catalog, 3 PostgreSQL 18 shards, 1 PostgreSQL 15 shard when installed,
    and a headless Temporal dev server."""
    reap_abandoned_stacks()
    state = new_state_dir("shardshift-test-")
    (state / "owner.pid").write_text(str(os.getpid()))
    st = Stack(state, make_stack_settings(3, 1 if HAS_PG15 else 0))
    try:
        st.up()
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
    """DSNs of the PostgreSQL 18 shards of the session stack (at least 3)."""
    record = stack.record()
    assert record is not None
    return [
        stack.instance(s).dsn() for s in record.servers if s.role == "shard" and s.major_version >= 16
    ]


@pytest.fixture(scope="session")
def pg15_dsn(stack: Stack) -> str:
    """DSN of the PostgreSQL 15 shard (tests using it are marked ``pg15``)."""
    record = stack.record()
    assert record is not None
    for s in record.servers:
        if s.role == "shard" and s.major_version == 15:
            return stack.instance(s).dsn()
    pytest.skip("no PostgreSQL 15 shard in the session stack")


@pytest.fixture(scope="session")
def catalog_dsn(stack: Stack) -> str:
    return stack.catalog_dsn


_names = iter(range(1, 10**9))


@pytest.fixture
def collection_name(request: pytest.FixtureRequest) -> str:
    """A fresh collection name per test (valid identifier, unique within the session)."""
    import re  # noqa: PLC0415

    base = re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:30]
    return f"c{next(_names)}_{base}"
