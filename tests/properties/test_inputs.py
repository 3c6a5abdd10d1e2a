"""Workflow and activity inputs: hostile values are a ``ValidationError`` at the door, never a
model that fails later, deep inside a workflow (an ``OverflowError`` from ``timedelta`` fails
the workflow *task*, which Temporal retries forever) or an activity (a name the catalog
refuses, retried without end)."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from activities import models as am
from catalog.store import check_shard_id
from shards.names import check_collection
from tests.properties.conftest import FEW, collection_names, hostile_values
from workflows.drain_shard import DrainShardInput
from workflows.migrate_chunk import MigrateChunkInput
from workflows.rebalance import RebalanceInput

TEMPORAL_MAX_DURATION_S = 315_576_000_000

shard_ids = st.from_regex(r"[A-Za-z][A-Za-z0-9_.-]{0,20}", fullmatch=True)


def _floats(model: BaseModel) -> dict[str, float]:
    return {name: value for name, value in model.model_dump().items()
            if isinstance(value, float)}


def _usable(model: BaseModel) -> None:
    """What a workflow does with an input: every float is finite, and every duration (a
    ``..._s`` field) becomes a ``timedelta``. (Other floats, such as a rebalance's
    ``tolerance``, are ratios: a huge one only means "nothing to do".)"""
    for name, value in _floats(model).items():
        assert math.isfinite(value), name
        if name.endswith("_s") and not name.endswith("per_s"):
            timedelta(seconds=value)
            # and Temporal takes it as a protobuf Duration (at most 10,000 years)
            assert abs(value) <= TEMPORAL_MAX_DURATION_S, (name, value)


def _field_values(model: type[BaseModel]) -> st.SearchStrategy[dict[str, Any]]:
    names = [n for n in model.model_fields if n not in ("resume", "state", "limits", "spec")]
    return st.fixed_dictionaries({}, optional={n: hostile_values for n in names})


@FEW
@given(_field_values(MigrateChunkInput), collection_names, st.integers(1, 2**63 - 1), shard_ids)
@example({"poll_s": math.inf}, "c", 1, "s")
@example({"catchup_timeout_s": math.inf}, "c", 1, "s")
@example({"rollback_window_s": math.inf}, "c", 1, "s")
@example({"poll_s": 1e300}, "c", 1, "s")
@example({"target_give_up_s": 1e12}, "c", 1, "s")
@example({"collection": "x'; DROP TABLE catalog.chunks; --"}, "c", 1, "s")
@example({"chunk_id": -1}, "c", 1, "s")
@example({"target": "shard 1\x00"}, "c", 1, "s")
def test_migrate_inputs_valid_or_refused(over: dict[str, Any], collection: str, chunk: int,
                                         target: str) -> None:
    """Found: ``poll_s=inf`` (any duration) was accepted and failed the workflow task with an
    ``OverflowError``, and so did a huge finite one (``poll_s=1e300``, now refused past ten
    years); a hostile collection, target or a negative chunk id was accepted and
    the move's first activity failed on it again and again."""
    raw = {"collection": collection, "chunk_id": chunk, "target": target, **over}
    try:
        inp = MigrateChunkInput.model_validate(raw)
    except ValidationError:
        return
    _usable(inp)
    check_collection(inp.collection)
    check_shard_id(inp.target)
    assert 0 < inp.chunk_id < 2**63


@FEW
@given(_field_values(DrainShardInput), st.lists(shard_ids, min_size=1, max_size=3, unique=True))
@example({"targets": ["ok", "bad id"]}, ["s1"])
@example({"shards": ["\x00"]}, ["s1"])
def test_drain_inputs_valid_or_refused(over: dict[str, Any], shards: list[str]) -> None:
    try:
        inp = DrainShardInput.model_validate({"shards": shards, **over})
    except ValidationError:
        return
    _usable(inp)
    for s in [*inp.shards, *(inp.targets or [])]:
        check_shard_id(s)


@FEW
@given(_field_values(RebalanceInput))
@example({"tolerance": math.inf})
@example({"tolerance": math.nan})
@example({"tolerance": 9.223372036854776e18})
@example({"collections": ["no such; name"]})
@example({"shards": ["bad id"]})
def test_rebalance_inputs_valid_or_refused(over: dict[str, Any]) -> None:
    try:
        inp = RebalanceInput.model_validate(over)
    except ValidationError:
        return
    _usable(inp)
    for c in inp.collections or []:
        check_collection(c)
    for s in inp.shards or []:
        check_shard_id(s)


ACTIVITY_INPUTS = [
    am.RegisterInput, am.PhaseInput, am.SnapshotInput, am.ImportInput, am.WaitLagInput,
    am.ReachableInput, am.VerifyInput, am.CutoverInput, am.PlanInput, am.CleanupInput,
    am.DrainPlanInput, am.RebalancePlanInput, am.SplitInput, am.AllocateIdsInput,
]


@pytest.mark.parametrize("model", ACTIVITY_INPUTS, ids=lambda m: m.__name__)
def test_activity_inputs_refuse_non_finite_durations(model: type[BaseModel]) -> None:
    """Every float of an activity input is finite or refused (a workflow passes them on to
    ``timedelta`` and ``asyncio.sleep``)."""
    for name, field in model.model_fields.items():
        if field.annotation not in (float, "float", "float | None", float | None):
            continue
        for bad in (math.inf, -math.inf, math.nan):
            data = _minimal(model) | {name: bad}
            with pytest.raises(ValidationError):
                model.model_validate(data)


def _minimal(model: type[BaseModel]) -> dict[str, Any]:
    spec = {"migration_id": "m1", "collection": "c", "chunk_id": 1,
            "key_range": {"lo": 0, "hi": 10}, "source": "a", "target": "b", "token": 1}
    base: dict[str, Any] = {"migration_id": "m1", "collection": "c", "chunk_id": 1,
                            "target": "b", "holder": "w", "phase": "snapshot", "spec": spec,
                            "shard": "a", "outcome": "completed", "shards": ["a"],
                            "child_ids": [2, 3], "n": 1}
    return {k: v for k, v in base.items() if k in model.model_fields}
