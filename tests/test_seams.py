"""Seams between the layers (pure, no server): where SQL lives, and the cutover's input.

Where SQL lives: activities and workflows reach a shard only through ``shards/``.

Every statement that runs on a PostgreSQL shard, and every reference to the driver
(``psycopg`` imports, its error types, its conninfo parser), belongs to ``shards/postgres``.
The activities decide *what* happens in a move; the workflows only orchestrate. This test
reads the source of both packages (the AST, not a grep, so docstrings that *describe* a
statement are allowed) and fails on:

- an import of a database driver (``psycopg``, ``psycopg_pool``, ``asyncpg``, ``psycopg2``);
- a string constant (or the literal part of an f-string) that reads like a SQL statement.
"""

from __future__ import annotations

import ast
import base64
import json
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from activities.models import CutoverInput

ROOT = Path(__file__).resolve().parent.parent
GUARDED = ("activities", "workflows")
DRIVERS = {"psycopg", "psycopg_pool", "psycopg2", "asyncpg"}

SQL = re.compile(
    r"""^\s*(?:
        SELECT\s+\S |
        INSERT\s+INTO\s |
        UPDATE\s+\S+\s+SET\s |
        DELETE\s+FROM\s |
        (?:CREATE|DROP|ALTER|TRUNCATE)\s+(?:TEMP\s+|UNIQUE\s+|OR\s+REPLACE\s+)?
            (?:TABLE|INDEX|SCHEMA|FUNCTION|PUBLICATION|SUBSCRIPTION|VIEW|TRIGGER|EXTENSION)\b |
        (?:CREATE|DROP)_REPLICATION_SLOT\b |
        START_REPLICATION\b |
        COPY\s+\S+.*\b(?:FROM|TO)\s+STD(?:IN|OUT)\b |
        WITH\s+\w+\s+AS\s*(?:MATERIALIZED\s*)?\( |
        BEGIN\s+ISOLATION\b |
        SET\s+TRANSACTION\b |
        (?:SHOW|LISTEN|NOTIFY)\s+\w |
        (?i:select\s+\S.*\sfrom\s+[a-z_.]+\b)
    )""",
    re.VERBOSE | re.DOTALL,
)
"""The start of a statement: keywords in capitals (this project's style), or a lower-case
``select ... from table``."""

SQL_CALL = re.compile(r"\bpg_[a-z_]+\s*\(|\bhashtextextended\s*\(", re.IGNORECASE)
"""A server function called inside a string: ``pg_try_advisory_lock(...)`` and friends."""


def _modules() -> list[Path]:
    return sorted(p for pkg in GUARDED for p in (ROOT / pkg).rglob("*.py"))


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string nodes that are docstrings (module, class, function, attribute)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if not isinstance(body, list):
            continue
        for stmt in body:
            # A bare string statement is documentation wherever it stands (the attribute
            # docstrings this project puts under constants and fields included).
            if (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)
                    and isinstance(stmt.value.value, str)):
                out.add(id(stmt.value))
    return out


def violations(path: Path) -> list[str]:
    """What in one module breaks the rule, as ``file:line: reason`` lines."""
    source = path.read_text()
    tree = ast.parse(source, filename=str(path))
    docs = _docstrings(tree)
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in DRIVERS:
                    found.append(f"{rel}:{node.lineno}: imports {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] in DRIVERS:
                found.append(f"{rel}:{node.lineno}: imports from {node.module}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if id(node) in docs:
                continue
            text = node.value
            if SQL.search(text) or SQL_CALL.search(text):
                found.append(f"{rel}:{node.lineno}: SQL in a string: {text.strip()[:60]!r}")
    return found


def test_activities_and_workflows_hold_no_sql_and_no_driver() -> None:
    found = [v for path in _modules() for v in violations(path)]
    assert not found, "SQL or a driver outside shards/:\n" + "\n".join(found)


@pytest.mark.parametrize(("snippet", "caught"), [
    ("import psycopg\n", True),
    ("from psycopg.conninfo import conninfo_to_dict\n", True),
    ("from psycopg import sql\n", True),
    ("q = 'SELECT 1'\n", True),
    ("q = 'select coalesce(x, y) from t'\n", True),
    ("q = 'SELECT pg_try_advisory_lock(hashtextextended(%s, 0))'\n", True),
    ("q = f'DELETE FROM {t} WHERE khash >= %s'\n", True),
    ("q = 'CREATE_REPLICATION_SLOT \"s\" LOGICAL pgoutput'\n", True),
    ("q = 'WITH f AS MATERIALIZED (SELECT 1) SELECT * FROM f'\n", True),
    ("def f():\n    '''Probe with ``SELECT 1`` until it answers.'''\n", False),
    ("X = 1\n'''The value, as in SELECT x FROM t.'''\n", False),
    ("msg = 'select a shard to drain'\n", False),
    ("msg = 'update the catalog'\n", False),
    ("step = 'freeze fence {chunk} on {old}'\n", False),
])
def test_the_scan_catches_sql_and_drivers(tmp_path: Path, snippet: str, caught: bool) -> None:
    """The scanner itself: what it must catch, and prose it must let through."""
    path = tmp_path / "module.py"
    path.write_text(snippet)
    found = violations(path)
    assert bool(found) is caught, (snippet, found)


# -- the cutover's dry-run twin is gone -----------------------------------------------------------


def _recorded_cutover_input() -> bytes:
    """The ``migrate.cutover`` input recorded in a move's history before the field was
    deprecated (it carries ``"dry_run": false``)."""
    history = json.loads((ROOT / "tests/workflows/histories/migrate_chunk_completed.json")
                         .read_text())
    for event in history["events"]:
        attrs = event.get("activityTaskScheduledEventAttributes")
        if attrs and attrs["activityType"]["name"] == "migrate.cutover":
            return base64.b64decode(attrs["input"]["payloads"][0]["data"])
    raise AssertionError("the recorded history has no cutover")


def test_recorded_cutover_input_still_decodes() -> None:
    """An activity task scheduled by an older worker (its input carries ``dry_run``) still
    decodes on a new worker: the model forbids unknown fields, so the field must stay."""
    raw = _recorded_cutover_input()
    assert b'"dry_run":false' in raw
    inp = CutoverInput.model_validate_json(raw)
    assert inp.dry_run is False


def test_cutover_input_refuses_a_dry_run() -> None:
    """A cutover has no dry run (the workflow's ``dry_run`` plans the move through
    ``migrate.plan``); asking the activity for one is refused instead of running a real
    cutover or pretending to."""
    raw = _recorded_cutover_input().replace(b'"dry_run":false', b'"dry_run":true')
    with pytest.raises(ValidationError, match="no dry run"):
        CutoverInput.model_validate_json(raw)


# -- workflow constants live once -----------------------------------------------------------------


def test_workflow_constants_are_defined_once() -> None:
    """Retry policies and search-attribute keys are built in ``workflows/common.py`` only;
    the workflows use its names, so one value cannot drift between two workflows."""
    found = []
    for path in sorted((ROOT / "workflows").glob("*.py")):
        if path.name == "common.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                if name in {"RetryPolicy", "common.RetryPolicy"} or name.startswith(
                        "SearchAttributeKey."):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name}(...)")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and node.value.startswith("Shardshift") and " " not in node.value:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not found, "constants outside workflows/common.py:\n" + "\n".join(found)
