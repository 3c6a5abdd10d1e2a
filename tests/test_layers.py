"""The import-layer contract (docs/architecture.md, "Layers"), read from the source with ``ast``.

A part of the code may import the parts below it, never one above, and no module imports itself
back through a cycle. Every import statement counts: module level, inside a function (a lazy
import is still a dependency) and under ``if TYPE_CHECKING:``. No server is needed, and nothing is
imported, so a violation cannot hide behind an import side effect.

The checker works on a plain graph (module -> first-party modules it imports), so the self-tests
at the bottom feed it synthetic graphs and a synthetic source tree and watch it object.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The product, bottom-up: each part may import the parts before it in this list.
PRODUCT = ["settings", "infra", "shards", "catalog", "router", "activities", "workflows",
           "worker", "cli"]


def _below(part: str) -> set[str]:
    return set(PRODUCT[: PRODUCT.index(part)])


# What each top-level part may import besides itself.
MAY_IMPORT: dict[str, set[str]] = {part: _below(part) for part in PRODUCT}
# The load generator and checker drive the product from outside, as a client does: through the
# router and the catalog, never through the workflows, the worker or the console.
MAY_IMPORT["workload"] = _below("activities")
# Benchmarks sit on top of everything and reuse the test harness (they run from a checkout).
MAY_IMPORT["bench"] = set(PRODUCT) | {"workload", "tests"}
# The build script (setup.py builds the optional C accelerator) imports nothing of ours.
MAY_IMPORT["setup"] = set()

# The one documented exception: `shardshift demo` runs the load generator and the checker.
EXCEPTIONS: set[tuple[str, str]] = {("cli.demo", "workload")}

# Parts whose imports are resolved (so importing them is seen) but not checked.
UNCHECKED = ["tests"]


def discover(root: Path, parts: Iterable[str]) -> dict[str, Path]:
    """Dotted module name -> source file, for each top-level package or module in ``parts``."""
    out: dict[str, Path] = {}
    for part in parts:
        package = root / part
        if package.is_dir():
            for path in sorted(package.rglob("*.py")):
                names = list(path.relative_to(root).with_suffix("").parts)
                if names[-1] == "__init__":
                    names.pop()
                out[".".join(names)] = path
        elif (root / f"{part}.py").is_file():
            out[part] = root / f"{part}.py"
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The known modules that the module ``name`` (source at ``path``) imports anywhere."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                if path.name != "__init__.py":
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            # `from package import submodule` depends on the submodule; `from module import
            # name` on the module.
            subs = [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in known]
            targets = subs if len(subs) == len(node.names) else [module, *subs]
        for target in targets:
            # the longest known module that prefixes the target
            names = target.split(".")
            while names and ".".join(names) not in known:
                names.pop()
            if names:
                found.add(".".join(names))
    found.discard(name)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """Each checked module -> the first-party modules it imports."""
    checked = discover(root, MAY_IMPORT)
    known = set(checked) | set(discover(root, UNCHECKED))
    return {name: imports_of(name, path, known) for name, path in checked.items()}


def top(module: str) -> str:
    return module.split(".")[0]


def layer_violations(graph: Mapping[str, Iterable[str]],
                     may_import: Mapping[str, set[str]] = MAY_IMPORT,
                     exceptions: set[tuple[str, str]] = EXCEPTIONS) -> list[str]:
    """Every import of a part that the importing part may not import, as readable lines."""
    return sorted(
        f"{src} imports {dst} ({top(src)} may import only "
        f"{', '.join(sorted(may_import[top(src)])) or 'nothing first-party'})"
        for src, dsts in graph.items()
        for dst in dsts
        if top(dst) != top(src)
        and top(dst) not in may_import[top(src)]
        and (src, top(dst)) not in exceptions
    )


def import_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    edges = {v: sorted(w for w in ws if w in graph) for v, ws in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component: list[str] = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(cycles)


# --- the contract, on this repository ------------------------------------------------------------


def test_every_top_level_part_has_a_place_in_the_layers() -> None:
    """A new top-level package or module must be placed in the layers before it can be checked."""
    ignored = {"tests", "docs", "build", "dist"}
    parts = {p.name for p in ROOT.iterdir()
             if p.is_dir() and (p / "__init__.py").exists() and p.name not in ignored}
    parts |= {p.stem for p in ROOT.glob("*.py")}
    assert parts - set(MAY_IMPORT) == set()


def test_imports_follow_the_layers() -> None:
    violations = layer_violations(import_graph(ROOT))
    assert violations == [], "imports against the layer order:\n" + "\n".join(violations)


def test_no_import_cycles() -> None:
    cycles = import_cycles(import_graph(ROOT))
    assert cycles == [], "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_graph_sees_the_imports_it_is_meant_to_judge() -> None:
    """Guards the checker against quietly reading nothing: known edges of this repository."""
    graph = import_graph(ROOT)
    assert "workload.generator" in graph["cli.demo"]  # the documented exception
    assert "infra.private" in graph["bench.soak"]  # imported inside a function
    assert "catalog.models" in graph["catalog.errors"]  # imported under TYPE_CHECKING
    assert "tests.workflows.procs" in graph["bench.faultkit"]  # the test harness


def test_no_cli_module_is_over_600_lines() -> None:
    long = {p.name: n for p in (ROOT / "cli").glob("*.py")
            if (n := len(p.read_text().splitlines())) > 600}
    assert long == {}


# --- the checker objects to violations (synthetic graphs and sources) ---------------------------


def test_an_upward_import_is_a_violation() -> None:
    graph = {"catalog.store": {"router.core"}, "router.core": {"catalog.store"}}
    assert layer_violations(graph) == [
        "catalog.store imports router.core "
        "(catalog may import only infra, settings, shards)"
    ]


def test_the_product_may_not_import_workload_bench_or_tests() -> None:
    graph = {"shards.base": {"workload.generator"}, "cli.moves": {"bench.soak"},
             "router.core": {"tests.conftest"}, "workload.checker": {"workflows.migrate_chunk"}}
    assert [line.split(" (")[0] for line in layer_violations(graph)] == [
        "cli.moves imports bench.soak",
        "router.core imports tests.conftest",
        "shards.base imports workload.generator",
        "workload.checker imports workflows.migrate_chunk",
    ]


def test_the_exception_is_the_demo_only() -> None:
    assert layer_violations({"cli.demo": {"workload.generator"}}) == []
    assert layer_violations({"cli.moves": {"workload.generator"}}) != []


def test_nothing_imports_the_console_and_the_worker_does_not_import_it() -> None:
    graph = {"worker": {"cli.render"}, "cli.app": {"worker", "cli.render"}}
    assert [line.split(" (")[0] for line in layer_violations(graph)] == ["worker imports cli.render"]


def test_a_cycle_is_found() -> None:
    graph = {"a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x"}, "a.w": {"a.x"}, "b": {"b"}}
    assert import_cycles(graph) == [["a.x", "a.y", "a.z"]]
    assert import_cycles({"a.x": {"a.y"}, "a.y": set()}) == []


def test_lazy_relative_and_type_checking_imports_are_read(tmp_path: Path) -> None:
    files = {
        "catalog/__init__.py": "from .store import Catalog\n",
        "catalog/store/__init__.py": "from .txn import Catalog\n",
        "catalog/store/txn.py": (
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from catalog.models import Chunk\n"
            "class Catalog: ...\n"
        ),
        "catalog/models.py": "def f():\n    from router import hashing\n    return hashing\n",
        "router/__init__.py": "",
        "router/hashing.py": "import catalog.store.txn as t\n",
        "settings.py": "import json\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    graph = import_graph(tmp_path)
    assert graph == {
        "catalog": {"catalog.store"},
        "catalog.store": {"catalog.store.txn"},
        "catalog.store.txn": {"catalog.models"},
        "catalog.models": {"router.hashing"},
        "router": set(),
        "router.hashing": {"catalog.store.txn"},
        "settings": set(),
    }
    assert [line.split(" (")[0] for line in layer_violations(graph)] == [
        "catalog.models imports router.hashing"
    ]
    assert import_cycles(graph) == [["catalog.models", "catalog.store.txn", "router.hashing"]]
