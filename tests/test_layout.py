"""The module layering: what may import what (read from the source, no server needed).

``cli`` > ``worker`` > ``workflows`` > ``activities`` > ``router``, ``catalog`` > ``shards`` >
``infra`` > ``settings``; ``workload`` and ``bench`` sit above the product. Nothing imports
``cli`` but its own package; no product module imports ``workload`` or ``bench``, except the
demo command, which runs the load generator and the checker.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = {"settings", "infra", "shards", "catalog", "router", "activities", "workflows",
           "worker", "cli"}
ABOVE_PRODUCT = {"workload", "bench"}
DEMO = "cli/demo.py"


def imports() -> dict[str, set[str]]:
    """Each first-party source file (path from the repository root) -> the top-level names it
    imports, including imports inside functions."""
    paths: list[Path] = []
    for name in sorted(PRODUCT | ABOVE_PRODUCT):
        package, module = ROOT / name, ROOT / f"{name}.py"
        paths += sorted(package.rglob("*.py")) if package.is_dir() else [module]
    out: dict[str, set[str]] = {}
    for path in paths:
        rel = path.relative_to(ROOT).as_posix()
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), rel)):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        out[rel] = names
    return out


def top(rel: str) -> str:
    return rel.split("/")[0].removesuffix(".py")


def test_nothing_outside_cli_imports_cli() -> None:
    offenders = sorted(rel for rel, names in imports().items()
                       if "cli" in names and top(rel) != "cli")
    assert offenders == []


def test_workload_imports_only_the_product_below_the_cli() -> None:
    offenders = sorted(f"{rel} imports {sorted(bad)}" for rel, names in imports().items()
                       if top(rel) == "workload"
                       and (bad := names & {"cli", "bench", "worker", "workflows", "activities"}))
    assert offenders == []


def test_product_does_not_import_workload_or_bench() -> None:
    offenders = sorted(f"{rel} imports {sorted(names & ABOVE_PRODUCT)}"
                       for rel, names in imports().items()
                       if top(rel) in PRODUCT and rel != DEMO and names & ABOVE_PRODUCT)
    assert offenders == []


def test_no_cli_module_is_over_600_lines() -> None:
    long = {p.name: n for p in (ROOT / "cli").glob("*.py")
            if (n := len(p.read_text().splitlines())) > 600}
    assert long == {}
