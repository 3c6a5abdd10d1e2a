"""``python -m bench.fleet_sim`` at a small size: the synthetic fleet, the router's map and
its refresh, the bulk statistics and both planners run end to end, and the plans it checks
are valid (no figure is asserted: timings live in the benchmark's output)."""

from __future__ import annotations

import json

import pytest

from bench import fleet_sim


def test_fleet_sim_plans_a_small_fleet(capsys: pytest.CaptureFixture[str]) -> None:
    assert fleet_sim.main(["--shards", "50", "--chunks", "2000", "--changes", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["checks"] == [] and out["plan_valid"] is True
    assert out["route_chunks"] >= 2000 * 0.4  # the largest collection, after two splits
    assert out["rebalance_moves"] > 0
    assert out["rebalance_spread_bytes_after"] <= 0.2 < out["rebalance_spread_bytes_before"]
    assert out["rebalance_spread_ops_after"] <= 0.2 < out["rebalance_spread_ops_before"]
    assert out["shards_lower_bound"] <= out["shards_after"] < 50
    assert out["merge_moves"] > 0
