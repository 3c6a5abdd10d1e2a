"""Pure-logic tests of infra/telemetry.py: JSON log lines and their ids, the activity-input
migration id, live gauges (no servers)."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from infra import telemetry
from settings import TelemetrySettings


def record(msg: str, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("shardshift.move", logging.INFO, __file__, 1, msg, (), None)
    rec.__dict__.update(extra)
    return rec


def test_json_line_carries_the_temporal_ids_and_the_migration() -> None:
    fmt = telemetry.JsonFormatter()
    activity = {"workflow_id": "move-c-3", "workflow_run_id": "r1", "activity_type":
                "migrate.verify", "activity_id": "7", "attempt": 2}
    token = telemetry.migration_id_var.set("mig-1")
    try:
        line = json.loads(fmt.format(record("verified %s", temporal_activity=activity)))
    finally:
        telemetry.migration_id_var.reset(token)
    assert line["msg"] == "verified %s"
    assert {k: line[k] for k in ("workflow_id", "run_id", "activity", "activity_id", "attempt",
                                 "migration_id", "level", "logger")} == {
        "workflow_id": "move-c-3", "run_id": "r1", "activity": "migrate.verify",
        "activity_id": "7", "attempt": 2, "migration_id": "mig-1", "level": "INFO",
        "logger": "shardshift.move"}
    workflow = {"workflow_id": "drain-3", "run_id": "r2", "workflow_type": "DrainShardWorkflow"}
    line = json.loads(fmt.format(record("plan", temporal_workflow=workflow)))
    assert (line["workflow_id"], line["run_id"], line["workflow_type"]) == (
        "drain-3", "r2", "DrainShardWorkflow")
    assert "migration_id" not in line and "activity" not in line


def test_json_line_outside_temporal_has_no_ids_and_keeps_the_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), None)
        import sys

        rec.exc_info = sys.exc_info()
    line = json.loads(telemetry.JsonFormatter().format(rec))
    assert set(line) == {"ts", "level", "logger", "msg", "exc"}
    assert "ValueError: boom" in line["exc"]


def test_migration_id_is_read_from_an_activity_input() -> None:
    spec = SimpleNamespace(migration_id="m-spec")
    assert telemetry._migration_id_of([SimpleNamespace(spec=spec)]) == "m-spec"
    assert telemetry._migration_id_of([SimpleNamespace(migration_id="m-own")]) == "m-own"
    assert telemetry._migration_id_of([SimpleNamespace(shard="s1")]) is None
    assert telemetry._migration_id_of([]) is None


def test_live_gauge_series_go_away_when_cleared() -> None:
    tel = telemetry.setup("test", TelemetrySettings())
    gauge = telemetry.LiveGauge("shardshift.test.live", unit="By", description="test")
    gauge.set(5, {"migration": "a"})
    gauge.set(7, {"migration": "b"})
    gauge.clear({"migration": "a"})

    def series() -> dict[str, float]:
        body, _ = telemetry.exposition()
        return {s.labels["migration"]: s.value
                for f in text_string_to_metric_families(body.decode())
                for s in f.samples if s.name == "shardshift_test_live_bytes"}

    assert tel is telemetry.current()
    assert series() == {"b": 7.0}
