"""Many moves at once: a rebalance of many small chunks under load, then a merge, on a private
stack with real worker processes.

    python -m bench.fleet --chunks 200 --shards 4 [--workers 1,2] [--max-moves 60]
                          [--copies-per-worker 1] [--no-baseline] [--copy-rows-per-s R]

Starts a private stack of ``--shards`` shards (removed at the end, also on Ctrl-C). For each
worker count of ``--workers`` it provisions a fresh collection of ``--chunks`` chunks laid out
unevenly (every chunk on the first two shards, none on the others), preloads ``--docs``
documents into each chunk, starts that many ``python worker.py`` processes with a per-shard
move limit of ``--per-shard`` (``SHARDSHIFT_FLEET__MAX_MOVES_PER_SHARD``, the catalog's
lease limit) and runs one ``RebalanceWorkflow`` with ``max_parallel`` ``--max-parallel``
under a load generator that writes and reads every chunk through an in-process router. The
workflows get the same per-shard limit (``RunLimits.max_running_per_shard``), so a move starts
when both its shards have room; ``--start-all`` leaves it out (every move starts as
``max_parallel`` allows and waits for its leases in its registration).

``--copies-per-worker N`` gives each worker process N copy seats
(``SHARDSHIFT_FLEET__WORKER_MAX_COPIES``: the move copies, snapshot export + import, one worker
carries at once). Each worker count is then run twice, with the seats and without them (the
old layout, unless ``--no-baseline``), in alternating order (1: unlimited then seated; 2:
seated then unlimited; ...), so both figures are measured side by side on the same machine.
Every worker serves ``/metrics``; after each run the bench reads each worker's own high-water
mark of copies running at once (``shardshift_worker_copies_peak``): ``copies_peak``.

``--copy-rows-per-s R`` throttles every move's copy to R rows/s (the moves' ``copy_throttle``,
what ``--max-copy-rate`` sets from the CLI). With ``--docs`` large enough, the copy is then
the long part of every move, as it is for chunks of a real size (gigabytes, minutes of copy)
and not for this bench's default chunks of 20 documents, whose copy is about a second of a
move's fixed steps: the layout in which a worker's copy capacity, not the per-shard limit or
the two cores, bounds moves per minute.

While it runs a sampler reads the catalog every ``--sample-s`` seconds: the live move
leases per shard, and the active migrations past registration per shard (as source or
target). The largest count seen is ``max_concurrent_per_shard``: measured from the catalog,
not taken from the planner.

After the last rebalance the shards get a declared capacity (``--fill`` of the data, so
``shards_lower_bound`` = ceil(data / capacity) shards can hold it), and a ``DrainShardWorkflow``
(``kind=merge_shards``) drains the least loaded shards onto the others, under load as well.

Prints ONE JSON object:

* ``runs``: per run (worker count, ``copies_per_worker``: the seats or None), ``moves``, ``moves_completed``, ``failures``, ``seconds``,
  ``moves_per_min``, ``max_concurrent_per_shard`` (``lease_peak``, ``phase_peak``: the two
  samples), ``mean_moves_running`` (moves holding leases, on average), ``layout_valid`` (``catalog.invariants.check_invariants`` with the shards, after
  the run), ``lost_writes``, ``client_errors``, ``copies_peak`` (per worker process),
  ``seats_refused`` (per worker process: copies refused for want of a seat, since the
  worker started; 0 means the seats never bound);
* ``moves``, ``failures``: over every run; ``moves_per_min``: worker count -> moves a minute
  (of the seated runs with ``--copies-per-worker``); ``moves_per_min_unlimited``: the same
  without seats (the old figure, measured in the same invocation); ``grows_with_workers``:
  moves a minute of the seated runs strictly grow with the worker count;
  ``max_concurrent_per_shard``: over every run; ``layout_valid``: every run's and the merge's;
* ``merge``: ``shards_after``, ``shards_lower_bound``, ``moves``, ``failures``, ``seconds``,
  ``lost_writes``, ``layout_valid``;
* ``ok``: no failure, no lost write, the limit never exceeded (per shard; and per worker:
  ``copies_peak`` <= the seats), valid layouts, and ``shards_after`` == ``shards_lower_bound``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import signal
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

PRELOAD_PREFIX = "bulk-"


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


class Sampler:
    """Reads the catalog's live leases and active migrations per shard until stopped."""

    def __init__(self, catalog: Any, every_s: float) -> None:
        self.catalog = catalog
        self.every_s = every_s
        self.lease_peak = 0
        self.phase_peak = 0
        self.samples = 0
        self.running_sum = 0
        """Moves holding leases, summed over the samples (for the mean)."""
        self.peak_shard: str | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        from catalog.models import MigrationPhase

        while not self._stop.is_set():
            leases = await self.catalog.leases()
            held = Counter(lease.shard_id for lease in leases)
            moving: Counter[str] = Counter()
            for m in await self.catalog.migrations(active_only=True, limit=100_000):
                if m.phase != MigrationPhase.REGISTERED:
                    moving[m.source] += 1
                    moving[m.target] += 1
            for counts, attr in ((held, "lease_peak"), (moving, "phase_peak")):
                if counts:
                    shard, n = counts.most_common(1)[0]
                    if n > getattr(self, attr):
                        setattr(self, attr, n)
                        self.peak_shard = shard
            self.samples += 1
            self.running_sum += len({lease.migration_id for lease in leases})
            try:
                await asyncio.wait_for(self._stop.wait(), self.every_s)
            except TimeoutError:
                continue  # the next sample is due

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    @property
    def peak(self) -> int:
        return max(self.lease_peak, self.phase_peak)

    @property
    def mean_running(self) -> float:
        """Moves holding their leases at once, on average: against the most the per-shard
        limit allows, how busy the fleet kept its move slots."""
        return round(self.running_sum / self.samples, 2) if self.samples else 0.0


class Loaded:
    """A router and a load generator over a collection's chunk keys; judged at the end."""

    def __init__(self, catalog: Any, collection: str, keys: list[str], rate: float) -> None:
        self.catalog = catalog
        self.collection = collection
        self.keys = keys
        self.rate = rate

    async def __aenter__(self) -> Loaded:
        from router.catalog_source import CatalogRouteSource
        from router.core import Router
        from settings import RouterSettings
        from workload.generator import LoadGenerator, WorkloadConfig

        self.router = Router(CatalogRouteSource(self.catalog),
                             RouterSettings(retry_deadline_s=10.0, pool_max_size=8))
        await self.router.__aenter__()
        self.load = LoadGenerator(self.router, WorkloadConfig(
            collection=self.collection, rate=self.rate, workers=8, only_keys=self.keys))
        await self.load.start()
        deadline = time.monotonic() + 60
        while sum(r.outcome == "ok" for r in self.load.records) < 20:
            if time.monotonic() > deadline:
                raise RuntimeError("the load generator acknowledged nothing in 60 s")
            await asyncio.sleep(0.2)
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.load.stop()
        finally:
            await self.router.__aexit__(None, None, None)

    async def judge(self, engines: dict[str, Any], preloaded: int) -> dict[str, Any]:
        from workload.checker import check, collect_stored

        stored = await collect_stored(engines, self.collection)
        report = check(self.load.records, stored)
        bulk = [(d, doc.get("acct")) for d, copies in stored.items()
                if d.startswith(PRELOAD_PREFIX) for doc in copies]
        found, dups = len(set(bulk)), len(bulk) - len(set(bulk))
        duplicated = [d for d in report.duplicated if not d.startswith(PRELOAD_PREFIX)]
        return {
            "lost_writes": len(report.lost) + len(report.altered) + len(duplicated)
            + len(report.resurrected) + max(0, preloaded - found) + dups,
            "client_errors": report.client_errors,
            "error_samples": report.error_samples[:3],
            "writes_acked": report.acknowledged_writes,
        }


async def layout_valid(catalog: Any, collection: str, engines: dict[str, Any]) -> list[str]:
    from catalog.invariants import check_invariants

    return [v.message for v in await check_invariants(catalog, collection, engines)]


async def run(stack: Any, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from temporalio.client import Client
    from temporalio.contrib.pydantic import pydantic_data_converter
    from temporalio.runtime import Runtime

    from catalog import Catalog, ShardState
    from catalog.admin import provision_collection
    from catalog.local_stack import close_engines, open_engines, register_stack_shards
    from infra.net import free_port_block
    from infra.temporal_client import outlive_interpreter
    from settings import Settings, TemporalSettings
    from tests.workflows.procs import WorkerProcess, chunk_keys, preload_chunk
    from workflows import (
        DrainShardInput,
        DrainShardWorkflow,
        MigrateChunkInput,
        MigrateChunkWorkflow,
        RebalanceInput,
        RebalanceWorkflow,
    )
    from workflows.child_moves import RunLimits

    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    settings = Settings(
        catalog_dsn=stack.catalog_dsn, staging_url=str(work / "staging"),
        temporal=TemporalSettings(address=stack.temporal.address, task_queue="bench-fleet"),
    )
    catalog = await Catalog(stack.catalog_dsn, max_size=8).open()
    await catalog.ensure_schema()
    shards = await register_stack_shards(catalog, stack)
    names = [s.shard_id for s in shards]
    engines = await open_engines(shards)
    client = await Client.connect(stack.temporal.address, data_converter=pydantic_data_converter,
                                  runtime=outlive_interpreter(Runtime.default()))
    move: dict[str, Any] = {"poll_s": args.poll_s, "cutover_retry_s": 0.2, "part_rows": 1000}
    if args.copy_rows_per_s is not None:
        move["copy_throttle"] = {"rows_per_s": args.copy_rows_per_s}
    # The workflows start a move only when both its shards have room under the workers' lease
    # limit (unless --start-all: every move starts and waits for its leases in registration).
    limits = RunLimits(max_running_per_shard=None if args.start_all else args.per_shard)
    workers: list[WorkerProcess] = []
    collections: list[str] = []

    metrics_urls: list[str] = []

    def start_workers(n: int, copies: int | None) -> None:
        base = free_port_block(n)
        for i in range(n):
            port = base + i
            env = {"SHARDSHIFT_FLEET__MAX_MOVES_PER_SHARD": str(args.per_shard),
                   "SHARDSHIFT_TELEMETRY__METRICS_PORT": str(port)}
            if copies is not None:
                env["SHARDSHIFT_FLEET__WORKER_MAX_COPIES"] = str(copies)
            workers.append(WorkerProcess(settings, work / f"worker-{len(workers)}-{i}.log",
                                         extra_env=env).start())
            metrics_urls.append(f"http://127.0.0.1:{port}/metrics")

    def stop_workers() -> None:
        metrics_urls.clear()
        while workers:
            workers.pop().stop()

    async def copies_peak() -> list[float | None]:
        """Each worker's own high-water mark of moves whose copy ran on it at one time."""
        return [await worker_metric(url, "shardshift_worker_copies_peak")
                for url in metrics_urls]

    async def seats_refused() -> list[float | None]:
        """Each worker's count of copies it refused for want of a seat (0 or None: the seats
        never bound)."""
        return [await worker_metric(url, "shardshift_worker_copy_seats_refused_total")
                for url in metrics_urls]

    async def ready(collection: str, chunk: Any) -> None:
        """The workers serve once one of them answers a no-op dry run."""
        await client.execute_workflow(
            MigrateChunkWorkflow.run,
            MigrateChunkInput(collection=collection, chunk_id=chunk.chunk_id,
                              target=next(n for n in names if n != chunk.shard_id),
                              dry_run=True),
            id=f"fleet-dry-{uuid.uuid4().hex[:8]}", task_queue=settings.temporal.task_queue)

    async def drop(collection: str) -> None:
        """The collection's catalog entry (a later plan measures no chunk of it), then its
        tables."""
        collections.remove(collection)
        try:
            await catalog.drop_collection(collection)
        finally:
            await asyncio.gather(*(e.drop_collection(collection) for e in engines.values()),
                                 return_exceptions=True)

    async def provision(collection: str) -> tuple[list[str], int]:
        cmap = await provision_collection(catalog, engines, collection, "acct",
                                          shard_ids=names[:2],
                                          chunks_per_shard=max(1, args.chunks // 2))
        collections.append(collection)
        for ch in cmap.chunks:
            await asyncio.to_thread(preload_chunk, engines[ch.shard_id].dsn, collection, ch,
                                    args.docs)
        keys = [k for ch in cmap.chunks for k in chunk_keys(ch, 2, "acct")]
        log(f"{collection}: {len(cmap.chunks)} chunks on {names[:2]}, {args.docs} documents "
            "each")
        return keys, args.docs * len(cmap.chunks)

    runs: list[dict[str, Any]] = []
    merge: dict[str, Any] = {}

    async def rebalance(w: int, copies: int | None, collection: str) -> dict[str, Any]:
        sampler = Sampler(catalog, args.sample_s)
        sampler.start()
        t0 = time.monotonic()
        handle = await client.start_workflow(
            RebalanceWorkflow.run,
            RebalanceInput(collections=[collection], tolerance=0.2, max_moves=args.max_moves,
                           max_moves_per_shard=100, max_parallel=args.max_parallel, rounds=1,
                           split=False, move=move, limits=limits),
            id=f"fleet-rebalance-w{w}-c{copies or 0}-{uuid.uuid4().hex[:6]}",
            task_queue=settings.temporal.task_queue)
        result = await watch(handle, RebalanceWorkflow.progress, args.deadline_s,
                             f"rebalance with {w} worker(s)")
        seconds = time.monotonic() - t0
        await sampler.stop()
        moves = result.moves if result is not None else []
        done = sum(1 for m in moves if m.outcome == "completed")
        violations = await layout_valid(catalog, collection, engines)
        return {
            "workers": w, "copies_per_worker": copies, "copies_peak": await copies_peak(),
            "seats_refused": await seats_refused(),
            "moves": len(moves), "moves_completed": done,
            "failures": len(moves) - done + (result is None), "seconds": round(seconds, 1),
            "moves_per_min": round(done / (seconds / 60), 1) if seconds else None,
            "max_concurrent_per_shard": sampler.peak, "lease_peak": sampler.lease_peak,
            "phase_peak": sampler.phase_peak, "samples": sampler.samples,
            "mean_moves_running": sampler.mean_running,
            "layout_valid": not violations, "violations": violations[:3],
            "loads_after": result.loads_after if result is not None else None,
        }

    async def merge_away(collection: str) -> dict[str, Any]:
        """Capacities that let ceil(1 / fill) shards hold the data; the least loaded shards
        drained onto the others."""
        cmap = await catalog.chunk_map(collection)
        load = dict.fromkeys(names, 0)
        for ch in cmap.chunks:
            load[ch.shard_id] += await engines[ch.shard_id].chunk_bytes(collection, ch.range)
        total = sum(load.values())
        capacity = int(total * args.fill)
        lower_bound = math.ceil(total / capacity)
        for s in shards:
            await catalog.register_shard(s.shard_id, s.address, engine=s.engine,
                                         major_version=s.major_version, capacity_bytes=capacity)
        drained = sorted(names, key=lambda s: (load[s], s))[:len(names) - lower_bound]
        log(f"merge: {total} bytes, capacity {capacity} per shard, lower bound {lower_bound} "
            f"shards; draining {drained}")
        sampler = Sampler(catalog, args.sample_s)
        sampler.start()
        t0 = time.monotonic()
        handle = await client.start_workflow(
            DrainShardWorkflow.run,
            DrainShardInput(shards=drained, max_parallel=args.max_parallel, move=move,
                            limits=limits),
            id=f"fleet-merge-{uuid.uuid4().hex[:6]}", task_queue=settings.temporal.task_queue)
        drain = await watch(handle, DrainShardWorkflow.progress, args.deadline_s, "merge")
        seconds = time.monotonic() - t0
        await sampler.stop()
        active = [s for s in await catalog.list_shards() if s.state == ShardState.ACTIVE]
        violations = await layout_valid(catalog, collection, engines)
        moves = drain.moves if drain is not None else []
        done = sum(1 for m in moves if m.outcome == "completed")
        return {
            "shards_before": len(names), "shards_after": len(active),
            "shards_lower_bound": lower_bound, "capacity_bytes": capacity,
            "data_bytes": total, "drained": drained, "moves": len(moves),
            "failures": len(moves) - done + (drain is None), "seconds": round(seconds, 1),
            "moves_per_min": round(done / (seconds / 60), 1) if seconds else None,
            "max_concurrent_per_shard": sampler.peak, "mean_moves_running": sampler.mean_running,
            "layout_valid": not violations, "violations": violations[:3],
        }

    plan = run_plan(args.workers, args.copies_per_worker, not args.no_baseline)
    try:
        for i, (w, copies) in enumerate(plan):
            collection = f"fleet_w{w}_c{copies or 0}"
            keys, preloaded = await provision(collection)
            start_workers(w, copies)
            await ready(collection, (await catalog.chunk_map(collection)).chunks[0])
            last = i == len(plan) - 1
            # One load generator per collection: the last one's runs on through the merge.
            async with Loaded(catalog, collection, keys, args.rate) as loaded:
                runs.append(await rebalance(w, copies, collection))
                log(f"rebalance, {w} worker(s), {copies or 'unlimited'} copies each: "
                    f"{json.dumps(runs[-1])}")
                if last:
                    merge = await merge_away(collection)
                    merge["copies_per_worker"] = copies
                    merge["copies_peak"] = await copies_peak()
                    merge["seats_refused"] = await seats_refused()
                    log(f"merge: {json.dumps(merge)}")
            judged = await loaded.judge(engines, preloaded)
            runs[-1].update(judged)
            if last:
                merge.update(judged)
            log(f"checker, {w} worker(s): {json.dumps(judged)}")
            stop_workers()
            if not last:
                await drop(collection)
    except BaseException:
        for wp in workers:
            wp.kill()
        raise
    finally:
        stop_workers()
        for c in list(collections):
            # An interrupted run leaves moves in flight (the catalog refuses to drop a
            # collection whose chunk is moving): the stack goes anyway, so never wait long.
            try:
                await asyncio.wait_for(drop(c), 60)
            except Exception as exc:  # noqa: BLE001 - cleanup goes on; the stack is removed
                log(f"dropping {c} failed: {exc!r}")
        await asyncio.wait_for(close_engines(engines), 60)
        await asyncio.wait_for(catalog.close(), 60)
    peak = max([r["max_concurrent_per_shard"] for r in runs]
               + [merge.get("max_concurrent_per_shard", 0)])
    seated = [r for r in runs if r["copies_per_worker"] == args.copies_per_worker]
    unlimited = [r for r in runs if r["copies_per_worker"] is None]
    rates = [r["moves_per_min"] or 0.0 for r in sorted(seated, key=lambda r: r["workers"])]
    copies_ok = all(p is not None and p <= r["copies_per_worker"]
                    for r in [*runs, merge] if r.get("copies_per_worker")
                    for p in r.get("copies_peak", []))
    out = {
        "chunks": args.chunks, "shards": len(names), "per_shard_limit": args.per_shard,
        "max_parallel": args.max_parallel, "start_all": args.start_all,
        "copies_per_worker": args.copies_per_worker, "docs_per_chunk": args.docs,
        "copy_rows_per_s": args.copy_rows_per_s,
        "moves": sum(r["moves"] for r in runs) + merge.get("moves", 0),
        "failures": sum(r["failures"] for r in runs) + merge.get("failures", 0),
        "moves_per_min": {str(r["workers"]): r["moves_per_min"] for r in seated},
        "moves_per_min_unlimited": ({str(r["workers"]): r["moves_per_min"] for r in unlimited}
                                    if args.copies_per_worker is not None else None),
        "grows_with_workers": (len(rates) > 1
                               and all(a < b for a, b in zip(rates, rates[1:], strict=False))),
        "copies_within_seats": copies_ok,
        "max_concurrent_per_shard": peak,
        "layout_valid": all(r["layout_valid"] for r in runs) and merge.get("layout_valid", False),
        "lost_writes": sum(r["lost_writes"] for r in runs),  # the last run judges the merge too
        "shards_after": merge.get("shards_after"),
        "shards_lower_bound": merge.get("shards_lower_bound"),
        "runs": runs, "merge": merge,
    }
    out["ok"] = (out["failures"] == 0 and out["lost_writes"] == 0
                 and peak <= args.per_shard and out["layout_valid"] and copies_ok
                 and out["shards_after"] == out["shards_lower_bound"])
    return out


def run_plan(workers: list[int], copies: int | None, baseline: bool
             ) -> list[tuple[int, int | None]]:
    """(worker count, copies per worker) of each run, in order: without seats each worker
    count once; with seats each twice, seated and unlimited (the baseline) in alternating
    order, so drift of the machine's load weighs on both alike."""
    if copies is None:
        return [(w, None) for w in workers]
    if not baseline:
        return [(w, copies) for w in workers]
    pairs: list[list[int | None]] = [[None, copies], [copies, None]]
    return [(w, c) for i, w in enumerate(workers) for c in pairs[i % 2]]


async def worker_metric(url: str, name: str) -> float | None:
    """A worker's sample ``name`` (the largest if several; None if absent or no answer)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    try:
        async with httpx.AsyncClient(timeout=10) as http:
            text = (await http.get(url)).text
    except httpx.HTTPError:
        return None
    found = [s.value for f in text_string_to_metric_families(text) for s in f.samples
             if s.name == name]
    return max(found) if found else None


async def watch(handle: Any, progress: Any, deadline_s: float, what: str) -> Any:
    """The workflow's result (None if it failed or outlasted the deadline: then cancelled),
    with a progress line every few seconds."""
    from temporalio.client import WorkflowFailureError

    result_task = asyncio.ensure_future(handle.result())
    deadline = time.monotonic() + deadline_s
    try:
        while True:
            done, _ = await asyncio.wait({result_task}, timeout=5.0)
            if done:
                return result_task.result()
            if time.monotonic() > deadline:
                log(f"{what}: no end in {deadline_s:.0f} s; cancelling")
                await handle.cancel()
                return None
            try:
                p = await handle.query(progress)
                log(f"{what}: {p.phase}, {p.chunks_done}/{p.chunks_total} moved, "
                    f"{p.chunks_failed} failed, {len(p.running)} running")
            except Exception as exc:  # noqa: BLE001 - a progress line is best effort
                log(f"{what}: no progress answer ({exc})")
    except WorkflowFailureError as exc:
        log(f"{what} failed: {exc.cause or exc}")
        return None
    finally:
        result_task.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=200)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--workers", default="1,2",
                        help="worker process counts, one rebalance each (comma separated)")
    parser.add_argument("--per-shard", type=int, default=2,
                        help="live moves per shard (the workers' lease limit)")
    parser.add_argument("--max-parallel", type=int, default=8, help="moves a workflow runs")
    parser.add_argument("--max-moves", type=int, default=60, help="the rebalance's moves")
    parser.add_argument("--docs", type=int, default=20, help="documents preloaded per chunk")
    parser.add_argument("--rate", type=float, default=100.0, help="operations/s")
    parser.add_argument("--poll-s", type=float, default=0.2, help="the moves' poll interval")
    parser.add_argument("--fill", type=float, default=0.6,
                        help="a shard's declared capacity, as a fraction of the data (merge)")
    parser.add_argument("--start-all", action="store_true",
                        help="start every move as max_parallel allows; each waits for its "
                             "leases (no per-shard room check in the workflow)")
    parser.add_argument("--copies-per-worker", type=int, default=None,
                        help="copy seats per worker process (SHARDSHIFT_FLEET__WORKER_MAX_"
                             "COPIES); each worker count then also runs without them")
    parser.add_argument("--no-baseline", action="store_true",
                        help="with --copies-per-worker: skip the runs without seats")
    parser.add_argument("--copy-rows-per-s", type=float, default=None,
                        help="throttle every move's copy to this many rows/s (copy-bound moves)")
    parser.add_argument("--sample-s", type=float, default=0.25)
    parser.add_argument("--deadline-s", type=float, default=1800.0)
    args = parser.parse_args(argv)
    args.workers = [int(w) for w in args.workers.split(",") if w.strip()]
    if args.shards < 3 or not args.workers or min(args.workers) < 1 or args.chunks < 2:
        parser.error("need 3+ shards, 2+ chunks and worker counts of 1 or more")
    if args.copies_per_worker is not None and args.copies_per_worker < 1:
        parser.error("--copies-per-worker must be 1 or more")

    import shutil

    from catalog.local_stack import private_stack
    from infra.private import new_state_dir

    logging.basicConfig(level=logging.ERROR, format="%(asctime)s %(name)s %(message)s")
    work = new_state_dir("shardshift-fleet-work-")
    try:
        with private_stack(args.shards, prefix="shardshift-fleet-") as stack:
            result = asyncio.run(run(stack, work, args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        log("interrupted: workers stopped, stack removed")
        return 130
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
