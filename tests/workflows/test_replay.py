"""Committed workflow histories replay on the current workflow code: no server needed.

``temporalio.worker.Replayer`` runs the workflow code against each recorded history locally
and fails on any difference in the commands it issues (nondeterminism). The histories in
``histories/`` were recorded from real runs on the real stack, some by earlier versions of
the code (``LEGACY`` in ``record_histories``), the rest by ``python -m
tests.workflows.record_histories``; this module only reads them.

A failure here means a workflow change would break runs already in flight: put the change
behind ``workflow.patched`` (docs/architecture.md, "Workflow code changes and replay"), never
re-record the history.

No test of this module uses a fixture that starts a stack (checked below): it runs where no
PostgreSQL or Temporal server exists.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from temporalio.client import WorkflowHistory

from tests.workflows.record_histories import (
    COMPLETED,
    FAILED,
    HISTORIES,
    Recorded,
    expected_histories,
    replay_workflow_id,
    replayer,
)

EXPECTED = expected_histories()
NAMES = sorted(set(EXPECTED) | {p.stem for p in HISTORIES.glob("*.json")})
SERVER_FIXTURES = {"stack", "temporal_client", "catalog_dsn", "pg18_dsns", "pg15_dsn",
                   "router_catalog", "worker", "worker_settings", "deployment"}
"""The fixtures that start (or need) the session's servers (``tests/conftest.py``)."""


def read(name: str) -> tuple[str, list[dict[str, Any]]]:
    path = HISTORIES / f"{name}.json"
    assert path.exists(), (
        f"{path} is missing. Committed histories are never re-recorded; a new scenario is "
        "recorded with python -m tests.workflows.record_histories")
    text = path.read_text()
    return text, json.loads(text)["events"]


def attrs(event: dict[str, Any], kind: str) -> dict[str, Any]:
    return event.get(f"{kind}EventAttributes") or {}


def result_of(event: dict[str, Any]) -> dict[str, Any]:
    """The decoded result of a completed run (JSON payload of the pydantic converter)."""
    payload = attrs(event, "workflowExecutionCompleted")["result"]["payloads"][0]
    return json.loads(base64.b64decode(payload["data"]))


def failure_types(failure: dict[str, Any] | None) -> list[str]:
    """``ApplicationError`` types along a failure's cause chain."""
    out = []
    while failure:
        kind = (failure.get("applicationFailureInfo") or {}).get("type")
        if kind:
            out.append(kind)
        failure = failure.get("cause")
    return out


def test_no_test_here_needs_a_server(request: pytest.FixtureRequest) -> None:
    """Replay needs no server: no test of this module may pull in a fixture that starts one
    (checked over the collected tests, before any of them sets a fixture up)."""
    here = request.node.module.__name__
    needing = {item.name: sorted(SERVER_FIXTURES & set(getattr(item, "fixturenames", ())))
               for item in request.session.items
               if getattr(getattr(item, "module", None), "__name__", None) == here}
    assert needing, "no test of this module was collected"
    assert {name: f for name, f in needing.items() if f} == {}


def test_every_scenario_is_recorded() -> None:
    """The scenarios the issue asks for, plus the earlier ones, all have a committed history."""
    missing = [n for n in EXPECTED if not (HISTORIES / f"{n}.json").exists()]
    assert missing == [], f"not recorded: {missing}"
    for needed in ("move_completed", "move_rolled_back", "move_cancelled_before_commit",
                   "move_cancelled_after_commit", "drain_merge_completed", "rebalance_completed"):
        assert needed in EXPECTED, needed


@pytest.mark.parametrize("name", NAMES)
async def test_history_replays(name: str) -> None:
    """The current workflow code replays the history without a nondeterminism error."""
    text, _ = read(name)
    history = WorkflowHistory.from_json(replay_workflow_id(name, text), text)
    result = await replayer().replay_workflow(history)
    assert result.replay_failure is None, result.replay_failure


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_history_shows_its_scenario(name: str) -> None:
    """Each file is the run its name says (so a replay passes over the path it claims to)."""
    want: Recorded = EXPECTED[name]
    _, events = read(name)
    started = attrs(events[0], "workflowExecutionStarted")
    assert started["workflowType"]["name"] == want.workflow
    last = events[-1]
    assert last["eventType"] == want.closes, last["eventType"]
    if want.outcome is not None:
        assert want.closes == COMPLETED
        assert result_of(last)["outcome"] == want.outcome
    if want.failure_type is not None:
        assert want.closes == FAILED
        assert want.failure_type in failure_types(attrs(last, "workflowExecutionFailed")
                                                  .get("failure")), last
    cancel_requested = any(e["eventType"] == "EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED"
                           for e in events)
    assert cancel_requested == want.cancel_requested

