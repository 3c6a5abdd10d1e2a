"""The main job (``./dev demo``): bring the local stack up and report on it.

Grows into the full demonstration once the migration workflow exists: a live chunk
migration under load with a report.
"""

from __future__ import annotations

from infra import Stack
from settings import Settings


def run_demo(settings: Settings) -> int:
    stack = Stack.from_settings(settings)
    print(f"==> bringing the local stack up in {stack.state_dir}")
    stack.up()
    rows = stack.status()
    for r in rows:
        print(f"  {r.name:<9} {r.address:<17} {r.version[:30]:<30} {'healthy' if r.healthy else 'DOWN'}")
    print(f"==> Temporal Web UI: http://127.0.0.1:{stack.temporal.ui_port}")
    print("==> stop everything with: ./dev shardshift infra down")
    return 0 if all(r.healthy for r in rows) else 1
