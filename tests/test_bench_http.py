"""``bench.http`` without ``wrk`` (as in CI): it says so and exits 2 before starting anything."""

from __future__ import annotations

import os
import subprocess
import sys

from settings import REPO_ROOT


def test_bench_http_without_wrk_says_so_and_starts_nothing(tmp_path) -> None:
    env = {**os.environ, "PATH": str(tmp_path), "PYTHONPATH": str(REPO_ROOT),
           "SHARDSHIFT_STATE_DIR": str(tmp_path / "state")}
    r = subprocess.run([sys.executable, "-m", "bench.http", "--seconds", "1"], env=env,
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "needs wrk" in r.stderr
    assert r.stdout == ""
    assert not (tmp_path / "state").exists()  # no stack was started
