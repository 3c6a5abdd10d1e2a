"""Soak: chunks moved back and forth under load for a while; what leaks, what slows down.

    python -m bench.soak --minutes 20 [--chunks 4] [--parallel 2] [--rate 300] [--docs 2000]

Starts a private two-shard stack (removed at the end, also on Ctrl-C), provisions a collection
with ``--chunks`` chunks over both shards, preloads ``--docs`` documents into each, starts the
worker as a separate process (``python worker.py``, so its memory is its own) and a load
generator writing and reading every chunk through an in-process router. Then, until the time is
up, ``--parallel`` movers each take their own chunks and move them to the other shard, one
``MigrateChunkWorkflow`` after the other, back and forth. At the end the checker compares every
acknowledged write (and every preloaded document) with what the shards hold, and every shard is
searched for replication slots, publications and origins the moves left.

Prints ONE JSON object:

* ``moves`` / ``moves_completed`` / ``moves_failed`` (with ``failure_samples``);
* ``lost_writes``: checker lost + altered + duplicated + resurrected, plus preloaded documents
  missing; ``client_errors`` (``error_samples``), ``unknown_outcomes``;
* ``pause_ms_p50`` / ``pause_ms_p99`` / ``pause_ms_max``: the cutover pause per move;
* ``rss_mb_start`` / ``rss_mb_end``: resident memory of the **worker process** once it serves
  and at the end; ``router_rss_mb_start`` / ``router_rss_mb_end``: this process, which hosts
  the **router** and the load generator (whose record of every operation grows with the run);
* ``leaked_slots``: replication objects left on the shards after the last move;
* ``writes_acked``, ``ops_per_s``, ``minutes``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

COLLECTION = "soak"


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))], 2)


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


async def run(stack: Any, work: Path, minutes: float, chunks: int, parallel: int, rate: float,
              docs: int) -> dict[str, Any]:
    from temporalio.client import Client, WorkflowFailureError
    from temporalio.contrib.pydantic import pydantic_data_converter
    from temporalio.runtime import Runtime

    from bench.faultkit import leftovers, rss_mb
    from catalog import Catalog
    from catalog.admin import provision_collection
    from catalog.local_stack import close_engines, open_engines, register_stack_shards
    from infra.temporal_client import outlive_interpreter
    from router.catalog_source import CatalogRouteSource
    from router.core import Router
    from settings import RouterSettings, Settings, TemporalSettings
    from tests.workflows.procs import (
        WorkerProcess,
        chunk_keys,
        preload_chunk,
    )
    from workflows import MigrateChunkInput, MigrateChunkWorkflow
    from workflows.migrate_chunk import describe_failure
    from workload.checker import check, collect_stored
    from workload.generator import LoadGenerator, WorkloadConfig

    # SIGTERM ends the soak as Ctrl-C does (the main task is cancelled; cleanup runs).
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    settings = Settings(
        catalog_dsn=stack.catalog_dsn, staging_url=str(work / "staging"),
        temporal=TemporalSettings(address=stack.temporal.address, task_queue="bench-soak"),
    )
    catalog = await Catalog(stack.catalog_dsn, max_size=8).open()
    await catalog.ensure_schema()
    shards = await register_stack_shards(catalog, stack)
    names = [s.shard_id for s in shards]
    engines = await open_engines(shards)
    worker = WorkerProcess(settings, work / "worker.log")
    client = await Client.connect(stack.temporal.address, data_converter=pydantic_data_converter,
                                  runtime=outlive_interpreter(Runtime.default()))
    try:
        per_shard = max(1, chunks // len(names))
        cmap = await provision_collection(catalog, engines, COLLECTION, "acct",
                                          chunks_per_shard=per_shard)
        for ch in cmap.chunks:
            await asyncio.to_thread(preload_chunk, engines[ch.shard_id].dsn, COLLECTION, ch, docs)
        keys = [k for ch in cmap.chunks for k in chunk_keys(ch, 16, "acct")]
        worker.start()
        # The worker serves once it answers a query of a workflow it runs: a no-op dry run.
        await client.execute_workflow(
            MigrateChunkWorkflow.run,
            MigrateChunkInput(collection=COLLECTION, chunk_id=cmap.chunks[0].chunk_id,
                              target=next(n for n in names if n != cmap.chunks[0].shard_id),
                              dry_run=True),
            id=f"soak-dry-{int(time.time())}", task_queue=settings.temporal.task_queue)
        results: list[Any] = []
        failures: list[str] = []
        async with Router(CatalogRouteSource(catalog),
                          RouterSettings(retry_deadline_s=5.0, pool_max_size=8)) as router:
            load = LoadGenerator(router, WorkloadConfig(collection=COLLECTION, rate=rate,
                                                        workers=12, only_keys=keys))
            t_load = time.monotonic()
            await load.start()
            await asyncio.sleep(2.0)  # a warm-up under load before the first measurement
            rss_start = rss_mb(worker.pid)
            router_rss_start = rss_mb(os.getpid())
            deadline = time.monotonic() + minutes * 60
            seq = iter(range(1, 10**9))

            async def mover(mine: list[int]) -> None:
                while time.monotonic() < deadline:
                    for chunk_id in mine:
                        if time.monotonic() >= deadline:
                            return
                        current = (await catalog.chunk(COLLECTION, chunk_id)).shard_id
                        target = next(n for n in names if n != current)
                        n = next(seq)
                        try:
                            res = await client.execute_workflow(
                                MigrateChunkWorkflow.run,
                                MigrateChunkInput(collection=COLLECTION, chunk_id=chunk_id,
                                                  target=target, poll_s=0.3,
                                                  cutover_retry_s=0.3, part_rows=1000),
                                id=f"soak-{chunk_id}-{n}", task_queue=settings.temporal.task_queue,
                            )
                            results.append(res)
                            log(f"move {n}: chunk {chunk_id} {current} -> {target} "
                                f"{res.outcome.value}, pause {res.pause_ms or 0:.1f} ms; worker "
                                f"rss {rss_mb(worker.pid)} MiB")
                        except WorkflowFailureError as exc:
                            failures.append(describe_failure(exc.cause or exc))
                            log(f"move {n}: chunk {chunk_id} failed: {failures[-1]}")

            ids = [c.chunk_id for c in cmap.chunks]
            groups = [ids[i::parallel] for i in range(min(parallel, len(ids)))]
            try:
                await asyncio.gather(*(mover(g) for g in groups))
                rss_end = rss_mb(worker.pid)
                router_rss_end = rss_mb(os.getpid())
                await asyncio.sleep(1.0)  # the load goes on after the last move
            finally:
                await load.stop()
            t_end = time.monotonic()
        stored = await collect_stored(engines, COLLECTION)
        report = check(load.records, stored)
        # Every chunk was preloaded with the ids bulk-0..: one document is (id, shard key).
        bulk = [(d, doc.get("acct")) for d, copies in stored.items() if d.startswith("bulk-")
                for doc in copies]
        preloaded, bulk_dups = len(set(bulk)), len(bulk) - len(set(bulk))
        duplicated = [d for d in report.duplicated if not d.startswith("bulk-")]
        leaked: list[str] = []
        for s in shards:
            for r in results:
                leaked += await asyncio.to_thread(leftovers, stack.dsn(s.shard_id, "mover"),
                                                  r.migration_id)
        pauses = [r.pause_ms for r in results if r.pause_ms is not None]
        return {
            "minutes": minutes,
            "moves": len(results) + len(failures),
            "moves_completed": sum(1 for r in results if r.outcome.value == "completed"),
            "moves_failed": len(failures),
            "failure_samples": failures[:3],
            "lost_writes": len(report.lost) + len(report.altered) + len(duplicated)
            + len(report.resurrected) + max(0, docs * len(cmap.chunks) - preloaded) + bulk_dups,
            "client_errors": report.client_errors,
            "error_samples": report.error_samples,
            "unknown_outcomes": report.unknown_outcomes,
            "pause_ms_p50": _pct(pauses, 50),
            "pause_ms_p99": _pct(pauses, 99),
            "pause_ms_max": round(max(pauses), 2) if pauses else None,
            "rss_mb_start": rss_start,
            "rss_mb_end": rss_end,
            "rss_process": "worker (python worker.py)",
            "router_rss_mb_start": router_rss_start,
            "router_rss_mb_end": router_rss_end,
            "router_rss_process": "bench process: router + load generator (its op records grow)",
            "leaked_slots": len(leaked),
            "writes_acked": report.acknowledged_writes,
            "ops_per_s": round(report.operations / (t_end - t_load), 1),
        }
    except BaseException:
        worker.kill()  # cancelled (Ctrl-C): no graceful stop, but no process left either
        raise
    finally:
        await asyncio.to_thread(worker.stop)
        await asyncio.gather(*(e.drop_collection(COLLECTION) for e in engines.values()),
                             return_exceptions=True)
        await close_engines(engines)
        await catalog.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--chunks", type=int, default=4, help="chunks over the two shards")
    parser.add_argument("--parallel", type=int, default=2, help="moves at once (other chunks)")
    parser.add_argument("--rate", type=float, default=300.0, help="operations/s over all chunks")
    parser.add_argument("--docs", type=int, default=2000, help="documents preloaded per chunk")
    args = parser.parse_args(argv)

    import shutil

    from catalog.local_stack import private_stack
    from infra.private import new_state_dir

    # Pools and listeners warn on every reconnect while a server is down, which faults do on
    # purpose: keep stderr for the progress lines.
    logging.basicConfig(level=logging.ERROR, format="%(asctime)s %(name)s %(message)s")
    work = new_state_dir("shardshift-soak-work-")
    try:
        with private_stack(2, prefix="shardshift-soak-") as stack:
            result = asyncio.run(run(stack, work, args.minutes, args.chunks, args.parallel,
                                     args.rate, args.docs))
    except (KeyboardInterrupt, asyncio.CancelledError):
        log("interrupted: worker stopped, stack removed")
        return 130
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    ok = (result["lost_writes"] == 0 and result["client_errors"] == 0
          and result["moves_failed"] == 0 and result["leaked_slots"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
