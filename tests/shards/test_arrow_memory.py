"""The copy's Arrow buffers come from jemalloc, which hands freed memory back (see
``shards/arrow_memory.py``): the pool is process-wide, so each case runs in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# An import with nothing staged and an export from a server that is not there: each stops
# before it reads a row, and the pool is chosen before anything is read or allocated.
_PROBE = """
import json, sys
import pyarrow as pa
from shards.postgres.bulk_import import StagedPartError, import_parts
from shards.staging import Staging

before = pa.default_memory_pool().backend_name
staging = Staging(sys.argv[1])
try:
    import_parts("postgresql://127.0.0.1:1/none", "c", staging, "m-1")
except StagedPartError:
    pass
after_import = pa.default_memory_pool().backend_name
table = pa.table({"doc": ["x" * 1000] * 1000})  # allocated after the choice
print(json.dumps({"before": before, "after_import": after_import,
                  "jemalloc_bytes": pa.jemalloc_memory_pool().bytes_allocated()
                  if after_import == "jemalloc" else None}))
"""

_EXPORT_PROBE = """
import json, sys
import psycopg
import pyarrow as pa
from shards.models import KHASH_END, KHASH_MIN, KeyRange
from shards.postgres.snapshot import export_chunk
from shards.staging import Staging

try:
    export_chunk("postgresql://127.0.0.1:1/none", "c", KeyRange(lo=KHASH_MIN, hi=KHASH_END),
                 Staging(sys.argv[1]), "m-1")
except psycopg.OperationalError:  # nothing listens there
    pass
print(json.dumps({"after_export": pa.default_memory_pool().backend_name}))
"""


def _run(code: str, tmp_path: Path, env: dict[str, str] | None = None) -> dict[str, object]:
    environ = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    environ.update(env or {})
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, env=environ,
                         capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_an_import_moves_the_process_to_jemalloc(tmp_path: Path) -> None:
    got = _run(_PROBE, tmp_path)
    assert got["before"] != "jemalloc"  # pyarrow's own default (mimalloc on Linux wheels)
    assert got["after_import"] == "jemalloc"
    assert isinstance(got["jemalloc_bytes"], int) and got["jemalloc_bytes"] >= 1_000_000


def test_an_export_moves_the_process_to_jemalloc(tmp_path: Path) -> None:
    assert _run(_EXPORT_PROBE, tmp_path) == {"after_export": "jemalloc"}


@pytest.mark.parametrize("pool", ["system", "mimalloc"])
def test_an_operators_choice_of_pool_stands(tmp_path: Path, pool: str) -> None:
    got = _run(_PROBE, tmp_path, {"ARROW_DEFAULT_MEMORY_POOL": pool})
    assert got["after_import"] == pool
