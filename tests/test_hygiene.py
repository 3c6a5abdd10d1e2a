"""Test modules stand on their own: none imports another test module (read from the source,
no server needed).

Shared helpers live in helper modules (``tests/workflows/helpers.py``, ``fleet.py``,
``procs.py``, ``tests/router/serve.py``, ``tests/shards/helpers.py``) and fixtures in the
package's ``conftest.py``. Importing from a ``test_*`` module runs its module-level code,
re-collects its fixtures under another name and ties one test file's edits to another's.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("tests", "bench")


def imported_modules(source: str, module: str) -> set[str]:
    """Dotted names of every module ``source`` (the module ``module``, dotted) imports,
    including imports inside functions and relative imports, resolved; ``from a import b``
    yields both ``a`` and ``a.b`` (``b`` may be a module)."""
    package = module.rsplit(".", 1)[0] if "." in module else ""
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".") if package else []
                base_parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*base_parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            out.add(base)
            out |= {f"{base}.{a.name}" if base else a.name for a in node.names}
    return out


def imported_test_modules(source: str, module: str) -> list[str]:
    """The test modules (a last component ``test_*``) that ``source`` imports."""
    return sorted(m for m in imported_modules(source, module)
                  if m.rsplit(".", 1)[-1].startswith("test_"))


def test_no_module_imports_a_test_module() -> None:
    offenders = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT)
            module = ".".join(rel.with_suffix("").parts)
            found = imported_test_modules(path.read_text(), module)
            offenders += [f"{rel.as_posix()} imports {m}" for m in found]
    assert offenders == [], "\n".join(offenders)


def test_the_check_sees_every_import_form() -> None:
    """The scan above would catch each way of reaching into a test module."""
    here = "tests.workflows.test_x"
    cases = {
        "from tests.workflows.test_lifecycle import wait_until": ["tests.workflows.test_lifecycle"],
        "import tests.router.test_http": ["tests.router.test_http"],
        "from tests.workflows import test_drain": ["tests.workflows.test_drain"],
        "from .test_migrate import FAST": ["tests.workflows.test_migrate"],
        "from . import test_faults": ["tests.workflows.test_faults"],
        "from ..router.test_http_hostile import AUTH": ["tests.router.test_http_hostile"],
        "def f():\n    from tests.shards.test_snapshot_import import FULL\n":
            ["tests.shards.test_snapshot_import"],
        "from tests.workflows.helpers import FAST\nfrom tests.router.conftest import Deployment":
            [],
    }
    for source, expected in cases.items():
        assert imported_test_modules(source, here) == expected, source
