"""Provisioning respects the import layers: ``infra`` (roles, passwords, schemas) knows nothing
of the objects the shard and catalog layers make (read from the source, no server needed)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ABOVE_INFRA = {"shards", "catalog", "router", "activities", "workflows", "worker", "cli",
               "workload", "bench"}


def _imported(path: Path) -> set[str]:
    """Top-level names a module imports, including imports inside functions."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_infra_imports_nothing_above_it() -> None:
    offenders = {p.relative_to(ROOT).as_posix(): sorted(bad)
                 for p in sorted((ROOT / "infra").rglob("*.py"))
                 if (bad := _imported(p) & ABOVE_INFRA)}
    assert offenders == {}
