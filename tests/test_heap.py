"""``infra.heap.settle_heap``: what exists at start-up leaves the collector's generations (a
fresh process each time: the frozen generation is process-wide)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_PROBE = """
import gc, json
import worker  # the worker's imports: the SDK, pydantic, psycopg, pyarrow, our modules
from infra.heap import settle_heap

gc.collect()
before = len(gc.get_objects())
frozen = settle_heap("probe")
after = len(gc.get_objects())
young = [object() for _ in range(10)]
cycle = []
cycle.append(cycle)  # made after the freeze: still the collector's
del cycle
print(json.dumps({"before": before, "frozen": frozen, "after": after,
                  "freed_cycle": gc.collect() >= 1, "count": gc.get_freeze_count()}))
"""


def test_settle_heap_sets_the_start_up_objects_aside_and_collects_what_comes_after() -> None:
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    # The collector walked ~every start-up object before; afterwards almost none.
    assert got["before"] > 20_000
    assert got["frozen"] >= got["before"] * 0.9
    assert got["after"] < got["before"] / 20
    assert got["count"] == got["frozen"]  # nothing unfrozen or frozen since, by anyone else
    assert got["freed_cycle"]  # garbage made later is still collected
