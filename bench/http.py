"""HTTP baseline: ``shardshift router serve`` against a bare FastAPI app, keyed gets.

    python -m bench.http [--seconds 20] [--rounds 4] [--connections 16] [--docs 10000]

Starts a private stack (catalog + ONE shard, in a temporary directory, removed at the end),
provisions a collection on that shard (2 chunks), loads ``--docs`` small documents (~120
bytes of Extended JSON) and serves them twice, one after the other, each in its own process:

* ``router``: ``shardshift router serve`` as deployed (uvicorn with uvloop and httptools, the
  bearer token, route lookup from the cached chunk map, the fenced read, the document decoded
  and encoded as Extended JSON);
* ``baseline``: :mod:`bench.http_baseline`, a bare FastAPI + uvicorn (uvloop, httptools) +
  psycopg-pool app doing the same primary-key lookup on the same shard with a pool of the
  same size (no routing, no fence, no token, the stored text returned as it is), its
  connections in autocommit like the router's (one round trip per lookup);
* ``baseline_txn``: the same app as the baseline was measured until December 2026, in
  psycopg's default transactions (``BEGIN``, the ``SELECT``, ``COMMIT``: three round trips per
  lookup, which made it slower than the router's one). Kept so the old ratio prints beside
  the new: ``http_ratio_txn_baseline``.
* ``baseline_asgi``: the same lookup as a plain ASGI callable under uvicorn, no FastAPI
  (``bench.http_baseline:asgi_app``): the thinnest Python HTTP path, measured since the
  router's keyed get skips FastAPI's routing and body model: ``http_ratio_asgi_baseline``
  and ``per_core_ratio_asgi_baseline``.

The load generator is ``wrk`` (Debian's package: ``apt-get install -y wrk``), in its own
process, 2 threads and ``--connections`` keep-alive connections, each request a
``POST .../get`` of a random document (a Lua script picks the key); without ``wrk`` on the
PATH the bench stops with that message before it starts anything, exit code 2 (CI has no
``wrk``). The services run side by side; each gets a warm-up
of 2 s, then ``--rounds`` alternating rounds (the order rotates each round) share
``--seconds`` of load per side, so a machine whose load drifts hits all alike. On 2 cores
wrk, the service and PostgreSQL share the CPUs (as they do for both).

Prints ONE JSON object: ``router_rps`` / ``baseline_rps`` (requests per second),
``router_p50_ms`` / ``baseline_p50_ms`` (median of the rounds' p50s) and p99s (the worst
round's; wrk's latency distribution), ``*_rps_rounds`` (each round's rate),
``http_ratio`` = ``router_rps / baseline_rps`` (1.0: as fast as the bare app),
``http_ratio_txn_baseline`` = ``router_rps / baseline_txn_rps`` (the ratio as measured before
the baseline's fix), per core: ``*_cpu_us_per_request`` (the service process's user + system
CPU time during its rounds, from ``/proc``, per request served; PostgreSQL's and wrk's CPU not
counted), ``*_rps_per_core`` (requests per CPU-second of the service) and ``per_core_ratio``
(router / baseline: what one core of each serves; on a machine whose other load takes CPU
from the services unevenly, the steadier figure), the error counts wrk
saw (``*_errors``: connect, read, write, timeout and non-2xx responses; every one is a
failure of the bench), ``load_generator`` and the settings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.router import HttpServer
from catalog import Catalog
from catalog.admin import provision_collection
from router.hashing import khash
from settings import DatabaseSettings, RouterSettings
from shards.postgres import PostgresShard

COLLECTION = "bench_http"
SHARD_KEY = "acct"

LUA = r"""
local n = %(docs)d
local path = "/v1/collections/%(collection)s/get"
local headers = {["Content-Type"] = "application/json", ["Authorization"] = "Bearer %(token)s"}
math.randomseed(os.time())
request = function()
  local k = math.random(1, n)
  return wrk.format("POST", path, headers, '{"key":' .. k .. ',"id":' .. k .. '}')
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write("WRKJSON " .. string.format(
    '{"requests":%%d,"duration_us":%%d,"p50_us":%%d,"p99_us":%%d,' ..
    '"errors":%%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout + e.status))
end
"""


def make_doc(i: int) -> dict[str, Any]:
    return {"_id": i, SHARD_KEY: i, "name": f"customer {i}", "n": 0, "tags": ["a", "b"]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Baseline:
    """:mod:`bench.http_baseline` under uvicorn in its own process."""

    def __init__(self, dsn: str, pool: int, *, autocommit: bool = True,
                 app: str = "app") -> None:
        self.port = _free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", f"bench.http_baseline:{app}", "--host", "127.0.0.1",
             "--port", str(self.port), "--loop", "uvloop", "--http", "httptools",
             "--no-access-log", "--log-level", "warning"],
            env={**os.environ, "BENCH_BASELINE_DSN": dsn, "BENCH_BASELINE_POOL": str(pool),
                 "BENCH_BASELINE_AUTOCOMMIT": "1" if autocommit else "0"},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"baseline exited: {err[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass  # not listening yet
            time.sleep(0.1)
        raise RuntimeError(f"baseline not ready in {timeout}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wrk(port: int, script: Path, seconds: float, connections: int) -> dict[str, Any]:
    """One wrk run against ``port``; its ``done`` hook prints the figures as JSON."""
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
         "-s", str(script), f"http://127.0.0.1:{port}"],
        capture_output=True, text=True, check=True, timeout=seconds + 120,
    ).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("WRKJSON "))
    return dict(json.loads(line[len("WRKJSON "):]))


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the process has used so far, from ``/proc/<pid>/stat``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _check_get(port: int, token: str, key: int) -> None:
    """One get through the service: the document comes back (a bench of 404s means nothing)."""
    r = httpx.post(f"http://127.0.0.1:{port}/v1/collections/{COLLECTION}/get",
                   json={"key": key, "id": key}, headers={"Authorization": f"Bearer {token}"},
                   timeout=10)
    r.raise_for_status()
    doc = r.json()["document"]
    if doc is None or doc.get("name") != f"customer {key}":
        raise RuntimeError(f"port {port}: wrong document for key {key}: {r.text[:200]}")


async def _load(catalog_dsn: str, shard_id: str, shard_dsn: str, docs: int) -> None:
    db = DatabaseSettings()
    async with Catalog(catalog_dsn, max_size=2) as catalog, \
            PostgresShard(shard_id, db.mover(shard_dsn), max_size=4) as shard:
        await catalog.ensure_schema()
        await catalog.register_shard(shard_id, shard_dsn, engine="postgres", major_version=18)
        await shard.ensure_schema()
        await shard.drop_collection(COLLECTION)
        cmap = await provision_collection(catalog, {shard_id: shard}, COLLECTION, SHARD_KEY,
                                          chunks_per_shard=2)
        sem = asyncio.Semaphore(4)

        async def put(k: int) -> None:
            h = khash(k)
            chunk = next(c for c in cmap.chunks if c.range.contains(h))
            async with sem:
                await shard.insert(COLLECTION, chunk.ref, h, make_doc(k))

        async with asyncio.TaskGroup() as tg:
            for k in range(1, docs + 1):
                tg.create_task(put(k))


def run(catalog_dsn: str, shard_id: str, shard_dsn: str, seconds: float, connections: int,
        docs: int, rounds: int = 4) -> dict[str, Any]:
    _need_wrk()
    settings = RouterSettings()
    token = settings.http_tokens[0].get_secret_value()
    asyncio.run(_load(catalog_dsn, shard_id, shard_dsn, docs))
    tmp = Path(tempfile.mkdtemp(prefix="bench-http-"))
    try:
        script = tmp / "get.lua"
        script.write_text(LUA % {"docs": docs, "collection": COLLECTION, "token": token})
        sides = ["router", "baseline", "baseline_txn", "baseline_asgi"]
        runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
        router = HttpServer(catalog_dsn, settings)
        dsn = DatabaseSettings().router(shard_dsn)
        base = Baseline(dsn, settings.pool_max_size)
        base_txn = Baseline(dsn, settings.pool_max_size, autocommit=False)
        base_asgi = Baseline(dsn, settings.pool_max_size, app="asgi_app")
        try:
            router.start()
            for b in (base, base_txn, base_asgi):
                b.wait_ready()
            ports = {"router": router.port, "baseline": base.port, "baseline_txn": base_txn.port,
                     "baseline_asgi": base_asgi.port}
            pids = {"router": router.proc.pid if router.proc else 0, "baseline": base.proc.pid,
                    "baseline_txn": base_txn.proc.pid, "baseline_asgi": base_asgi.proc.pid}
            for port in ports.values():
                _check_get(port, token, docs)
                wrk(port, script, 2, connections)  # warm-up: pools, caches, prepared plans
            # Alternating rounds (the order rotates each round), so the machine's drift hits
            # every side alike; all services stay up, the idle ones cost nothing.
            for r in range(rounds):
                for side in sides[r % len(sides):] + sides[:r % len(sides)]:
                    cpu = cpu_seconds(pids[side])
                    runs[side].append(wrk(ports[side], script, seconds / rounds, connections))
                    runs[side][-1]["cpu_s"] = cpu_seconds(pids[side]) - cpu
        finally:
            router.stop()
            base.stop()
            base_txn.stop()
            base_asgi.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result: dict[str, Any] = {}
    for side, rs in runs.items():
        requests = sum(f["requests"] for f in rs)
        result[f"{side}_rps"] = round(requests / (sum(f["duration_us"] for f in rs) / 1e6), 1)
        result[f"{side}_p50_ms"] = round(statistics.median(f["p50_us"] for f in rs) / 1000, 3)
        result[f"{side}_p99_ms"] = round(max(f["p99_us"] for f in rs) / 1000, 3)
        result[f"{side}_errors"] = sum(f["errors"] for f in rs)
        cpu = sum(f["cpu_s"] for f in rs)
        result[f"{side}_cpu_us_per_request"] = round(cpu / max(1, requests) * 1e6, 1)
        result[f"{side}_rps_per_core"] = round(requests / cpu, 1) if cpu else None
        result[f"{side}_rps_rounds"] = [round(f["requests"] / (f["duration_us"] / 1e6), 1)
                                        for f in rs]
    result["http_ratio"] = round(result["router_rps"] / result["baseline_rps"], 3)
    result["http_ratio_txn_baseline"] = round(result["router_rps"] / result["baseline_txn_rps"], 3)
    result["http_ratio_asgi_baseline"] = round(
        result["router_rps"] / result["baseline_asgi_rps"], 3)
    if result["router_rps_per_core"] and result["baseline_asgi_rps_per_core"]:
        result["per_core_ratio_asgi_baseline"] = round(
            result["router_rps_per_core"] / result["baseline_asgi_rps_per_core"], 3)
    if result["router_rps_per_core"] and result["baseline_rps_per_core"]:
        result["per_core_ratio"] = round(
            result["router_rps_per_core"] / result["baseline_rps_per_core"], 3)
    result.update({"load_generator": "wrk -t2", "connections": connections,
                   "seconds": seconds, "rounds": rounds, "docs": docs, "pool_size": settings.pool_max_size})
    return result


def _need_wrk() -> None:
    if shutil.which("wrk") is None:
        print("bench.http needs wrk on the PATH (Debian: apt-get install -y wrk); not run",
              file=sys.stderr)
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20,
                        help="seconds of load per side, over all rounds")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--docs", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=4,
                        help="alternating rounds per side; --seconds is split between them")
    args = parser.parse_args(argv)
    _need_wrk()

    from catalog.local_stack import private_stack

    with private_stack(1) as st:
        (shard_id, shard_dsn), = st.shard_dsns().items()
        address = st.address(shard_id)
        del shard_dsn
        result = run(st.catalog_dsn, shard_id, address, args.seconds, args.connections,
                     args.docs, args.rounds)
    print(json.dumps(result))
    return 0 if all(result[f"{side}_errors"] == 0 for side in
                    ("router", "baseline", "baseline_txn", "baseline_asgi")) else 1


if __name__ == "__main__":
    sys.exit(main())
