"""Benchmark of chunk moves under write load: the cutover pause and what clients see.

    python -m bench.cutover --moves 20 --rate 500 [--docs 3000] [--keys 64] [--steady 2.0]
                            [--worker in-process|process]

Starts a private two-shard stack in a temporary directory (removed at the end), provisions a
collection with one chunk per shard, starts a worker in-process (``--worker process``: in a
process of its own, as deployed; ``worker_mode`` says which) on a fresh task queue and a
load generator writing through the router at ``--rate`` writes/s, all aimed at the moving
chunk. Then it moves that chunk back and forth between the two shards ``--moves`` times, one
``MigrateChunkWorkflow`` after the other with ``--steady`` seconds without a move between
two, under that load. At the end the checker compares
every acknowledged write with what the shards hold.

Prints ONE JSON object:

* ``moves`` / ``moves_completed``: moves run / moves whose outcome was ``completed``.
* ``pause_ms_p50`` / ``pause_ms_p99`` / ``pause_ms_max``: the writes' pause per cutover as
  the workflow measured it (fence freeze to catalog switch). ``pause_steps_ms_p50``: the
  median of each step inside the pause, from each commit's timeline mark (``freeze_old``:
  the freeze's statement, waiting for writes in flight; ``wait_for_catchup``: until the
  target applied the freeze; ``activate_new`` overlaps ``switch_catalog``, the commit).
* ``client_gap_ms_p50`` / ``client_gap_ms_max``: per move, the longest gap between two
  successful writes on the chunk as the clients saw it (includes the router's retry and
  map refresh, and the load's own spacing).
* ``client_errors``: operations that failed in the client; ``unknown_outcomes``.
* ``gc_pause_ms_max`` / ``gc_pauses_over_20ms``: the bench process's garbage collections
  while the load ran (with the worker in-process they stall its cutover too).
* ``lost_writes``: checker lost + altered + duplicated + resurrected documents.
* ``move_seconds_p50`` / ``move_seconds_max``: workflow start to result, per move.
* ``writes_acked``, ``writes_per_s``: acknowledged writes and their rate over the run.
* ``p99_ms_moving`` / ``p99_ms_steady`` (and p50s, ``ops_moving`` / ``ops_steady``): latency
  of the routed operations that succeeded, classified by their timestamps: "moving" when the
  operation overlaps a move's span (workflow start to its result: every phase, from the
  snapshot through the cutover and the cleanup), "steady" when it lies wholly between moves
  (or before the first, after the load's first second, or after the last). The goal compares
  the two: what a running move costs every client of the collection.
* ``moving_by_phase``: the "moving" operations broken down by the move's phase at their
  start, from the move's timeline in the catalog (``phase.*`` marks; ``pause``: overlapping
  the cutover's freeze-to-switch; ``after_switch``: started in the 100 ms after it; ``other``:
  outside every mark, e.g. the workflow's start before registration): ``ops``, ``p50``,
  ``p99``, ``max`` (ms) and ``tail``, how many of the phase's operations are at or above
  ``p99_ms_moving`` (the operations that make up the moving p99). ``moving_by_chunk`` /
  ``steady_by_chunk``: the same split by chunk (``moving`` / ``other``: with
  ``--other-keys``, load on the chunk that stays put too; default 0, the load as before).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

COLLECTION = "bench_cutover"


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(q / 100 * (len(s) - 1) + 0.4999))))
    return round(s[k], 2)


async def _worker(settings: Any, client: Any, stop: asyncio.Event, stock: bool,
                  own_process: bool = False) -> None:
    """The shardshift worker in-process. Unless ``stock``: with a 1 s heartbeat throttle, so
    a cancelled replication activity learns of it at once (see the module's report). In a
    process of its own (``own_process``) it settles its heap once up, as ``worker.py``'s
    process does; in the bench's process it leaves the heap alone, as any embedded worker."""
    from infra.heap import settle_heap
    from worker import run_worker

    def ready() -> None:
        if own_process:
            settle_heap("worker")

    if stock:
        await run_worker(settings, stop=stop, client=client, ready=ready)
        return
    from temporalio.worker import Worker

    from activities import MoveContext, all_activities
    from catalog import Catalog
    from shards.staging import Staging
    from workflows import ALL_WORKFLOWS

    catalog = await Catalog(settings.catalog_dsn, max_size=8).open()
    ctx = MoveContext(catalog, Staging.from_settings(settings))
    try:
        async with Worker(client, task_queue=settings.temporal.task_queue,
                          workflows=list(ALL_WORKFLOWS), activities=all_activities(ctx),
                          max_concurrent_activities=64,
                          graceful_shutdown_timeout=timedelta(seconds=10),
                          max_heartbeat_throttle_interval=timedelta(seconds=1),
                          default_heartbeat_throttle_interval=timedelta(seconds=1)):
            ready()
            await stop.wait()
    finally:
        await ctx.close()
        await catalog.close()


class _GcPauses:
    """The bench process's garbage collections while the load runs: the longest, and how
    many took over 20 ms (in-process, they stall the worker's activities and the clients
    alike; the load's records make a large heap)."""

    def __init__(self) -> None:
        self.longest = 0.0
        self.over_20ms = 0
        self._started = 0.0
        gc.callbacks.append(self._on)

    def _on(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        took = time.perf_counter() - self._started
        self.longest = max(self.longest, took)
        self.over_20ms += took > 0.02

    def close(self) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._on)


class _WorkerProcess:
    """The worker in a process of its own (``--worker process``), as deployed: the load
    generator and the router then do not share an interpreter (and its GIL) with the
    move's activities. Same worker as in-process (``_worker``), stopped by SIGTERM."""

    def __init__(self, settings: Any, stock: bool) -> None:
        self.settings, self.stock = settings, stock
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ, SHARDSHIFT_BENCH_WORKER_SETTINGS=self.settings.model_dump_json())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.cutover", "--serve-worker"]
            + (["--stock-worker"] if self.stock else []), env=env)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _serve_worker(stock: bool) -> int:
    """``--serve-worker``: the body of ``_WorkerProcess`` (settings from the environment)."""
    from temporalio.client import Client
    from temporalio.contrib.pydantic import pydantic_data_converter
    from temporalio.runtime import Runtime

    from infra.temporal_client import outlive_interpreter
    from settings import Settings

    settings = Settings.model_validate_json(os.environ["SHARDSHIFT_BENCH_WORKER_SETTINGS"])

    async def serve() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        client = await Client.connect(settings.temporal.address,
                                      data_converter=pydantic_data_converter,
                                      runtime=outlive_interpreter(Runtime.default()))
        await _worker(settings, client, stop, stock, own_process=True)

    asyncio.run(serve())
    return 0


def _max_gap_ms(times: list[float], lo: float, hi: float) -> float:
    ts = sorted(t for t in times if lo <= t <= hi)
    return max((b - a for a, b in zip(ts, ts[1:], strict=False)), default=0.0) * 1000


PHASE_ORDER = ("registered", "snapshot", "import", "replicate", "verify", "cutover",
               "rollback_window", "cleanup", "done")


def _phase_windows(marks: list[tuple[float, str, float | None]], end: float
                   ) -> tuple[list[tuple[float, float, str]], tuple[float, float] | None]:
    """A move's phases as ``(start, end, phase)`` from its timeline's marks (monotonic
    seconds, sorted), and its committed pause ``(freeze, switch)``."""
    phases = [(t, n.removeprefix("phase.")) for t, n, _ in marks if n.startswith("phase.")]
    finish = next((t for t, n, _ in marks if n == "finish"), end)
    out = [(t, (phases[i + 1][0] if i + 1 < len(phases) else max(finish, t)), name)
           for i, (t, name) in enumerate(phases)]
    start = next((t for t, n, _ in marks if n == "cutover.start"), None)
    commit = next((v for _, n, v in marks if n == "cutover.commit"), None)
    pause = None if start is None or commit is None else (start, start + commit / 1000)
    return out, pause


def _phase_of(r: Any, phases: list[tuple[float, float, str]],
              pause: tuple[float, float] | None) -> str:
    if pause is not None and r.started <= pause[1] and r.finished >= pause[0]:
        return "pause"
    if pause is not None and pause[1] < r.started <= pause[1] + 0.1:
        return "after_switch"
    return next((name for lo, hi, name in phases if lo <= r.started < hi), "other")


def _summary(values: list[float], tail_ms: float | None) -> dict[str, Any]:
    return {"ops": len(values), "p50": _pct(values, 50), "p99": _pct(values, 99),
            "max": round(max(values), 2) if values else None,
            "tail": sum(1 for v in values if tail_ms is not None and v >= tail_ms)}


def _breakdown(records: list[Any], windows: list[tuple[float, float]],
               timelines: list[tuple[list[tuple[float, float, str]],
                                     tuple[float, float] | None]],
               since: float, moving_chunk: Any, tail_ms: float | None
               ) -> dict[str, dict[str, Any]]:
    """The successful operations' latencies by the move's phase and by chunk."""
    by_phase: dict[str, list[float]] = {}
    by_chunk: dict[str, dict[str, list[float]]] = {"moving": {}, "steady": {}}
    for r in records:
        if r.outcome != "ok" or r.started < since:
            continue
        ms = (r.finished - r.started) * 1000
        chunk = "moving" if moving_chunk.contains(r.khash) else "other"
        hit = next((i for i, (lo, hi) in enumerate(windows)
                    if r.started <= hi and r.finished >= lo), None)
        if hit is None:
            by_chunk["steady"].setdefault(chunk, []).append(ms)
            continue
        by_chunk["moving"].setdefault(chunk, []).append(ms)
        phases, pause = timelines[hit] if hit < len(timelines) else ([], None)
        by_phase.setdefault(_phase_of(r, phases, pause), []).append(ms)
    order = [*PHASE_ORDER, "pause", "after_switch", "other"]
    return {
        "moving_by_phase": {k: _summary(by_phase[k], tail_ms)
                            for k in sorted(by_phase, key=lambda k: (
                                order.index(k) if k in order else len(order), k))},
        "moving_by_chunk": {k: _summary(v, tail_ms) for k, v in by_chunk["moving"].items()},
        "steady_by_chunk": {k: _summary(v, tail_ms) for k, v in by_chunk["steady"].items()},
    }


async def _timeline(catalog: Any, migration_id: str, offset: float, end: float
                    ) -> tuple[list[tuple[float, float, str]], tuple[float, float] | None]:
    """A move's phase windows from the catalog's timeline (``offset``: wall - monotonic)."""
    from catalog.timeline import SampleKind

    samples = await catalog.move_samples(migration_id)
    marks = sorted((s.at.timestamp() - offset, s.name, s.value) for s in samples
                   if s.kind == SampleKind.MARK)
    return _phase_windows(marks, end)


async def _pause_steps(catalog: Any, migration_id: str) -> dict[str, float]:
    """The committed cutover's steps inside the pause (ms), from its timeline's commit mark
    (``"fwd: freeze_old 2.1 ms, ..."``)."""
    from activities.cutover import read_pause_breakdown
    from catalog.timeline import MarkName

    samples = await catalog.move_samples(migration_id)
    commit = next((s for s in reversed(samples) if s.name == MarkName.CUTOVER_COMMIT), None)
    return read_pause_breakdown(commit.detail if commit else None)


def _split_latencies(records: list[Any], windows: list[tuple[float, float]], since: float
                     ) -> tuple[list[float], list[float]]:
    """Latencies (ms) of the successful operations overlapping a move / wholly outside."""
    moving: list[float] = []
    steady: list[float] = []
    for r in records:
        if r.outcome != "ok" or r.started < since:
            continue
        ms = (r.finished - r.started) * 1000
        if any(r.started <= hi and r.finished >= lo for lo, hi in windows):
            moving.append(ms)
        else:
            steady.append(ms)
    return moving, steady


async def run(stack: Any, state: Path, moves: int, rate: float, docs: int, keys: int,
              stock_worker: bool, steady_s: float = 1.0, other_keys: int = 0,
              worker_mode: str = "in-process") -> dict[str, Any]:
    from temporalio.client import Client
    from temporalio.contrib.pydantic import pydantic_data_converter
    from temporalio.runtime import Runtime

    from catalog import Catalog
    from catalog.admin import provision_collection
    from catalog.local_stack import (
        close_engines,
        open_engines,
        register_stack_shards,
    )
    from infra.temporal_client import outlive_interpreter
    from router.catalog_source import CatalogRouteSource
    from router.core import Router
    from router.errors import ShardUnavailableError
    from settings import RouterSettings, Settings, TemporalSettings
    from workflows import MigrateChunkInput, MigrateChunkWorkflow
    from workload.checker import check, collect_stored
    from workload.generator import LoadGenerator, WorkloadConfig, keys_in

    settings = Settings(
        state_dir=state, catalog_dsn=stack.catalog_dsn, staging_url=str(state / "staging"),
        temporal=TemporalSettings(address=stack.temporal.address, task_queue="bench-cutover"),
    )
    catalog = await Catalog(stack.catalog_dsn, max_size=8).open()
    await catalog.ensure_schema()
    shards = await register_stack_shards(catalog, stack)
    engines = await open_engines(shards)
    stop = asyncio.Event()
    worker_task: asyncio.Task[None] | None = None
    worker_proc: _WorkerProcess | None = None
    try:
        cmap = await provision_collection(catalog, engines, COLLECTION, "acct",
                                          chunks_per_shard=1)
        chunk = cmap.chunks[0]
        names = [s.shard_id for s in shards]
        chunk_keys = keys_in(chunk.range, keys)
        # With ``other_keys``: load on the chunk that stays put too, at the same rate per key.
        still = next(c for c in cmap.chunks if c.chunk_id != chunk.chunk_id)
        load_keys = chunk_keys + keys_in(still.range, other_keys)
        client = await Client.connect(stack.temporal.address,
                                      data_converter=pydantic_data_converter,
                                      runtime=outlive_interpreter(Runtime.default()))
        if worker_mode == "process":
            worker_proc = _WorkerProcess(settings, stock_worker)
            worker_proc.start()
        else:
            worker_task = asyncio.create_task(_worker(settings, client, stop, stock_worker))
        router_settings = RouterSettings(retry_deadline_s=5.0, pool_max_size=8)
        async with Router(CatalogRouteSource(catalog), router_settings) as router:
            # Seeded 16 at a time: thousands at once queue on the router's pool and, on a
            # loaded machine, outwait the first connection's catalog read (a 2 s timeout).
            seed_slots = asyncio.Semaphore(16)

            async def seed(i: int) -> None:
                async with seed_slots:
                    for attempt in range(10):
                        try:
                            await router.insert(COLLECTION, {"_id": f"seed-{i}",
                                                             "acct": chunk_keys[i % keys],
                                                             "v": 0, "pad": "s" * 200})
                            return
                        except ShardUnavailableError:
                            # Nothing was sent (no shard connection in time: on a loaded
                            # machine a new connection can take over the 2 s connect
                            # timeout). Seeding is not measured: try again.
                            if attempt == 9:
                                raise

            await asyncio.gather(*(seed(i) for i in range(docs)))
            load = LoadGenerator(router, WorkloadConfig(
                collection=COLLECTION, rate=rate * len(load_keys) / keys, workers=16,
                only_keys=load_keys,
                mix={"insert": 0.35, "replace": 0.25, "inc": 0.3, "delete": 0.1},
            ))
            t_load = time.monotonic()
            offset = time.time() - time.monotonic()
            gc_pauses = _GcPauses()
            await load.start()
            await asyncio.sleep(1.0)
            t_warm = time.monotonic()
            results: list[Any] = []
            windows: list[tuple[float, float]] = []
            try:
                for i in range(moves):
                    current = (await catalog.chunk(COLLECTION, chunk.chunk_id)).shard_id
                    target = next(s for s in names if s != current)
                    t0 = time.monotonic()
                    res = await client.execute_workflow(
                        MigrateChunkWorkflow.run,
                        MigrateChunkInput(collection=COLLECTION, chunk_id=chunk.chunk_id,
                                          target=target, poll_s=0.2, cutover_retry_s=0.2,
                                          part_rows=1000),
                        id=f"bench-move-{i}-{int(time.time() * 1000)}",
                        task_queue=settings.temporal.task_queue,
                    )
                    windows.append((t0, time.monotonic()))
                    results.append(res)
                    await asyncio.sleep(steady_s)  # load without a move: the steady sample
                    print(f"move {i + 1}/{moves}: {current} -> {target} {res.outcome.value} "
                          f"pause {res.pause_ms or 0:.1f} ms in {windows[-1][1] - t0:.1f} s",
                          file=sys.stderr, flush=True)
                await asyncio.sleep(1.0)
            finally:
                await load.stop()
            t_end = time.monotonic()
            gc_pauses.close()
        timelines = [await _timeline(catalog, r.migration_id, offset, hi)
                     for r, (_, hi) in zip(results, windows, strict=True)]
        steps = [await _pause_steps(catalog, r.migration_id) for r in results]
        stored = await collect_stored(engines, COLLECTION)
        report = check(load.records, stored)
        seeds_ok = sum(1 for d in stored if d.startswith("seed-")) == docs
        write_times = [r.finished for r in load.records if r.op != "get" and r.outcome == "ok"]
        gaps = [_max_gap_ms(write_times, lo, hi) for lo, hi in windows]
        pauses = [r.pause_ms for r in results if r.pause_ms is not None]
        lat_moving, lat_steady = _split_latencies(load.records, windows, t_warm)
        secs = [hi - lo for lo, hi in windows]
        parts = _breakdown(load.records, windows, timelines, t_warm, chunk.range,
                           _pct(lat_moving, 99))
        return {
            "moves": moves,
            "moves_completed": sum(1 for r in results if r.outcome.value == "completed"),
            "rate_target_writes_per_s": rate,
            "pause_ms_p50": _pct(pauses, 50),
            "pause_ms_p99": _pct(pauses, 99),
            "pause_ms_max": round(max(pauses), 2) if pauses else None,
            "pause_steps_ms_p50": {n: _pct([st[n] for st in steps if n in st], 50)
                                   for n in sorted({n for st in steps for n in st})},
            "client_gap_ms_p50": _pct(gaps, 50),
            "client_gap_ms_max": round(max(gaps), 2) if gaps else None,
            "client_errors": report.client_errors,
            "error_samples": report.error_samples,
            "unknown_outcomes": report.unknown_outcomes,
            "lost_writes": len(report.lost) + len(report.altered) + len(report.duplicated)
            + len(report.resurrected),
            "preloaded_docs_intact": seeds_ok,
            "documents_per_move_p50": statistics.median(r.documents for r in results),
            "move_seconds_p50": _pct(secs, 50),
            "move_seconds_max": round(max(secs), 2) if secs else None,
            "writes_acked": report.acknowledged_writes,
            "writes_per_s": round(report.acknowledged_writes / (t_end - t_load), 1),
            "p99_ms_moving": _pct(lat_moving, 99),
            "p99_ms_steady": _pct(lat_steady, 99),
            "p50_ms_moving": _pct(lat_moving, 50),
            "p50_ms_steady": _pct(lat_steady, 50),
            "ops_moving": len(lat_moving),
            "ops_steady": len(lat_steady),
            "steady_s_between_moves": steady_s,
            "worker": "stock" if stock_worker else "heartbeat-throttle-1s",
            "worker_mode": worker_mode,
            "gc_pause_ms_max": round(gc_pauses.longest * 1000, 1),
            "gc_pauses_over_20ms": gc_pauses.over_20ms,
            "other_keys": other_keys,
            **parts,
        }
    finally:
        stop.set()
        if worker_proc is not None:
            await asyncio.to_thread(worker_proc.stop)
        if worker_task is not None:
            await asyncio.gather(worker_task, return_exceptions=True)
        await asyncio.gather(*(e.drop_collection(COLLECTION) for e in engines.values()),
                             return_exceptions=True)
        await close_engines(engines)
        await catalog.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--moves", type=int, default=20)
    parser.add_argument("--rate", type=float, default=500.0, help="writes/s on the moving chunk")
    parser.add_argument("--docs", type=int, default=3000, help="documents preloaded in the chunk")
    parser.add_argument("--keys", type=int, default=64, help="shard-key values the load uses")
    parser.add_argument("--stock-worker", action="store_true",
                        help="worker.run_worker as is (default heartbeat throttling)")
    parser.add_argument("--steady", type=float, default=2.0,
                        help="seconds of load without a move after each move")
    parser.add_argument("--other-keys", type=int, default=0,
                        help="shard-key values of the chunk that stays put to load too "
                             "(at the moving chunk's rate per key)")
    parser.add_argument("--worker", choices=["in-process", "process"], default="in-process",
                        help="the worker in the bench's own process (as before) or in one "
                             "of its own (as deployed)")
    parser.add_argument("--serve-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_worker:
        return _serve_worker(args.stock_worker)

    from catalog.local_stack import private_stack

    with private_stack(2) as st:
        state = st.state_dir
        result = asyncio.run(run(st, state, args.moves, args.rate, args.docs, args.keys,
                                 args.stock_worker, args.steady, args.other_keys,
                                 args.worker))
    print(json.dumps(result))
    ok = (result["client_errors"] == 0 and result["lost_writes"] == 0
          and result["moves_completed"] == result["moves"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
