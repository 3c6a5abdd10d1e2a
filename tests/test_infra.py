"""The local stack: up, status, idempotency, down, and clear errors."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

from catalog.local_stack import up_and_provision
from infra import InfraError, Stack
from infra.net import port_is_free
from tests.conftest import make_stack_settings, owned_state_dir


@pytest.fixture
def state_dir():
    path = owned_state_dir("infra")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_up_status_down_leaves_nothing(state_dir: Path) -> None:
    infra = make_stack_settings(shards=1)
    st = Stack(state_dir, infra)
    try:
        up_and_provision(st)
        status = st.status()
        assert {s.name for s in status} == {"temporal", "catalog", "shard-1"}
        assert all(s.healthy for s in status), status
        assert all(s.version.startswith("18") for s in status if s.role != "temporal")
        pids = st.pids()
        assert len(pids) == 3

        # A second `up` is a no-op: the same processes keep running.
        up_and_provision(st)
        assert st.pids() == pids
    finally:
        st.down()
    assert st.pids() == []
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    ports = [infra.base_port, infra.base_port + 1, infra.temporal_port]
    assert all(port_is_free(p) for p in ports), ports
    assert all(not s.healthy for s in st.status())


def test_taken_port_is_a_clear_error(state_dir: Path) -> None:
    infra = make_stack_settings(shards=1)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", infra.base_port + 1))
        squatter.listen()
        st = Stack(state_dir, infra)
        try:
            with pytest.raises(InfraError, match=rf"port {infra.base_port + 1} is already in use"):
                up_and_provision(st)
        finally:
            st.down()
    assert st.pids() == []


def test_missing_binaries_is_a_clear_error(state_dir: Path) -> None:
    infra = make_stack_settings(shards=1).model_copy(update={"pg_bin_dir": Path("/nonexistent/bin")})
    with pytest.raises(InfraError, match="PostgreSQL binaries not found"):
        up_and_provision(Stack(state_dir, infra))


def test_missing_pg15_binaries_is_a_clear_error(state_dir: Path) -> None:
    infra = make_stack_settings(shards=1).model_copy(
        update={"pg15_shards": 1, "pg15_bin_dir": Path("/nonexistent/15/bin")}
    )
    with pytest.raises(InfraError, match="apt-get install -y postgresql-15"):
        up_and_provision(Stack(state_dir, infra))


@pytest.mark.skipif(os.geteuid() != 0, reason="ownership check needs root to create the dir")
def test_data_dir_owned_by_someone_else(state_dir: Path) -> None:
    infra = make_stack_settings(shards=1)
    foreign = state_dir / "pg" / "catalog"
    foreign.mkdir(parents=True)
    (foreign / "PG_VERSION").write_text("18\n")  # root-owned, not the server user's
    with pytest.raises(InfraError, match="is owned by uid 0"):
        up_and_provision(Stack(state_dir, infra))


def test_session_stack_is_healthy(stack: Stack) -> None:
    assert all(s.healthy for s in stack.status())
    assert len(stack.shard_dsns()) >= 3


def test_temporal_address_follows_the_local_port_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    from settings import Settings

    monkeypatch.setenv("SHARDSHIFT_INFRA__TEMPORAL_PORT", "27999")
    assert Settings().temporal.address == "127.0.0.1:27999"
    monkeypatch.setenv("SHARDSHIFT_TEMPORAL__ADDRESS", "temporal.internal:7233")
    assert Settings().temporal.address == "temporal.internal:7233"
