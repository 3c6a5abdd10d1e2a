"""Chunk moves under load across failovers: rounds of each kind, with figures.

    python -m bench.failover [--rounds 2] [--kinds source18,source15,catalog]

Starts a private stack of its own (catalog, two PostgreSQL 18 shards and, when installed, a
PostgreSQL 15 shard; the catalog, shard-1 and shard-3 with streaming standbys; a Temporal dev
server; all removed at the end) and an in-process worker. Each round moves one chunk under
load (a router and the workload generator on the moving chunk's keys and a bystander's), holds
the move in replicate (the ``SHARDSHIFT_TEST_HOLD_LAG`` hook), stops the primary of
``source18`` shard-1, ``source15`` shard-3 or ``catalog`` (immediate) and promotes its
standby, then lets the move finish; a ``source15`` move fails (its slot is gone) and is started
again. The old primary is then cloned again as the standby for the next round.

Prints ONE JSON object: per kind ``runs``, ``completed`` (the move, or its retry, completed and
verified), ``aborted_then_retried``, ``lost`` (the checker's lost + altered + duplicated +
resurrected), ``client_errors``, ``unknown_outcomes``, and lists per round of
``slot_sync_wait_s`` (18: from the applier streaming to its slot being failover-ready on the
standby), ``promote_s`` (stop + promote), ``resume_s`` (from the stop until the applier streams
again from the new primary), ``max_write_gap_ms`` (moving chunk) and ``move_s``; plus
``seconds``. Exit code 0 when every round completed and nothing was lost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.runtime import LoggingConfig, Runtime, TelemetryConfig, TelemetryFilter

from activities.replicate import HOLD_LAG_ENV
from bench.faultkit import stop_immediate
from catalog import Catalog
from catalog.admin import provision_collection
from catalog.local_stack import private_stack, register_stack_shards
from catalog.models import MigrationOutcome
from infra import Stack
from infra.temporal_client import outlive_interpreter
from router.catalog_source import CatalogRouteSource
from router.core import Router
from settings import RouterSettings, Settings, TemporalSettings
from shards.postgres import PostgresShard
from shards.postgres import replication as repl
from worker import run_worker
from workflows import MigrateChunkInput, MigrateChunkWorkflow
from workload.checker import check, collect_stored, max_write_gaps
from workload.generator import LoadGenerator, WorkloadConfig, keys_in

PG15_BIN = Path("/usr/lib/postgresql/15/bin")
KINDS = {"source18": ("shard-1", "shard-2", "shard-1"),
         "source15": ("shard-3", "shard-2", "shard-3"),
         "catalog": ("shard-2", "shard-1", "catalog")}
"""kind -> (source, target, the server that fails over)."""
MOVE = {"poll_s": 0.2, "cutover_retry_s": 0.2, "heartbeat_timeout_s": 3.0, "part_rows": 500}


async def until(pred: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(pred):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not reached in {timeout:.0f}s")
        await asyncio.sleep(0.05)


def _one(dsn: str, query: str, params: tuple[Any, ...]) -> Any:
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=2) as conn:
            row = conn.execute(query, params).fetchone()
            return row[0] if row else None
    except psycopg.Error:
        return None


class Bench:
    def __init__(self, stack: Stack, client: Client, task_queue: str) -> None:
        self.stack = stack
        self.client = client
        self.task_queue = task_queue

    def server(self, name: str) -> Any:
        record = self.stack.record()
        assert record is not None
        return next(s for s in record.servers if s.name == name)

    async def start(self, collection: str, chunk_id: int, target: str) -> WorkflowHandle[Any, Any]:
        return await self.client.start_workflow(
            MigrateChunkWorkflow.run,
            MigrateChunkInput(collection=collection, chunk_id=chunk_id, target=target,
                              **MOVE),  # type: ignore[arg-type]
            id=f"bf-{collection}-{uuid.uuid4().hex[:6]}", task_queue=self.task_queue)

    async def phase(self, handle: WorkflowHandle[Any, Any], want: str) -> Any:
        deadline = time.monotonic() + 120
        while True:
            p = await handle.query(MigrateChunkWorkflow.progress)
            if p.phase == want:
                return p
            if time.monotonic() > deadline:
                raise RuntimeError(f"phase {want} not reached; last {p.phase}")
            await asyncio.sleep(0.05)

    async def round(self, kind: str, n: int) -> dict[str, Any]:
        # A catalog client of its own per round: a pooled connection to a failed-over catalog
        # fails its next write (whose outcome is unknown, so it is never retried).
        async with Catalog(self.stack.catalog_dsn, max_size=4) as catalog:
            return await self._round(catalog, kind, n)

    async def _round(self, catalog: Catalog, kind: str, n: int) -> dict[str, Any]:
        source, target, failing = KINDS[kind]
        collection = f"bf_{kind}_{n}_{uuid.uuid4().hex[:4]}"
        shards = {sid: await PostgresShard(sid, self.stack.dsn(sid, "mover"), max_size=4).open()
                  for sid in (source, target)}
        out: dict[str, Any] = {"kind": kind}
        try:
            cmap = await provision_collection(catalog, shards, collection, "acct", [],
                                              chunks_per_shard=2)
            moving = next(c for c in cmap.chunks if c.shard_id == source)
            other = next(c for c in cmap.chunks if c.shard_id == target)
            keys = keys_in(moving.range, 30, "acct") + keys_in(other.range, 6, "o")
            source_rt = CatalogRouteSource.from_dsn(self.stack.dsn("catalog", "catalog_reader"))
            async with Router(source_rt, RouterSettings(retry_deadline_s=5.0)) as router:
                load = LoadGenerator(router, WorkloadConfig(
                    collection=collection, rate=300, workers=6, only_keys=keys))
                await load.start()
                try:
                    out |= await self._fail_over_mid_move(kind, collection, moving.chunk_id,
                                                          source, target, failing, shards)
                    acked = sum(r.outcome == "ok" for r in load.records)
                    await until(lambda: sum(r.outcome == "ok" for r in load.records) > acked + 100,
                                60, "writes after the move")
                finally:
                    await load.stop()
            report = check(load.records, await collect_stored(shards, collection))
            gaps = max_write_gaps(load.records,
                                  lambda h: "moving" if moving.range.contains(h) else "other")
            out |= {"lost": len(report.lost) + len(report.altered) + len(report.duplicated)
                    + len(report.resurrected),
                    "checker_ok": report.ok,
                    "client_errors": report.client_errors,
                    "unknown_outcomes": report.unknown_outcomes,
                    "max_write_gap_ms": round(gaps.get("moving", 0.0), 1)}
        finally:
            for s in shards.values():
                await s.drop_collection(collection)
                await s.close()
        t0 = time.monotonic()
        await asyncio.to_thread(self._reclone, failing)
        out["reclone_s"] = round(time.monotonic() - t0, 2)
        return out

    async def _fail_over_mid_move(self, kind: str, collection: str, chunk_id: int, source: str,
                                  target: str, failing: str,
                                  shards: dict[str, PostgresShard]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        os.environ[HOLD_LAG_ENV] = collection
        started = time.monotonic()
        handle = await self.start(collection, chunk_id, target)
        p = await self.phase(handle, "replicate")
        slot = repl.stream_names(p.migration_id, "fwd").slot
        active = "SELECT active FROM pg_replication_slots WHERE slot_name = %s"
        src_dsn = shards[source].dsn
        await until(lambda: _one(src_dsn, active, (slot,)), 60, "the applier streaming")
        if kind == "source18":
            t = time.monotonic()
            replica = self.stack.replica(self.server(source))
            assert replica is not None
            await until(lambda: _one(replica.dsn(), "SELECT synced AND NOT temporary AND"
                                     " invalidation_reason IS NULL FROM pg_replication_slots"
                                     " WHERE slot_name = %s", (slot,)), 120, "slot synced")
            out["slot_sync_wait_s"] = round(time.monotonic() - t, 2)
        t = time.monotonic()
        stop_immediate(self.stack.instance(self.server(failing)))
        await asyncio.to_thread(self.stack.promote, failing)
        out["promote_s"] = round(time.monotonic() - t, 2)
        if kind == "source15":
            try:
                await asyncio.wait_for(handle.result(), 180)
                out["first_move"] = "completed (unexpected)"
            except WorkflowFailureError:
                out["first_move"] = "failed"
            out["aborted_then_retried"] = 1
            os.environ.pop(HOLD_LAG_ENV, None)
            handle = await self.start(collection, chunk_id, target)
        else:
            await until(lambda: _one(src_dsn, active, (slot,)), 120, "the applier resuming")
            out["resume_s"] = round(time.monotonic() - t, 2)
            os.environ.pop(HOLD_LAG_ENV, None)
        result = await asyncio.wait_for(handle.result(), 300)
        out["completed"] = int(result.outcome == MigrationOutcome.COMPLETED and result.verified)
        out["move_s"] = round(time.monotonic() - started, 2)
        return out

    def _reclone(self, name: str) -> None:
        Stack(self.stack.state_dir,
              self.stack.infra.model_copy(update={"standbys": (name,)})).up()


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    kinds: dict[str, Any] = {}
    for r in rounds:
        k = kinds.setdefault(r["kind"], {"runs": 0, "completed": 0, "aborted_then_retried": 0,
                                         "lost": 0, "client_errors": 0, "unknown_outcomes": 0})
        k["runs"] += 1
        for f in ("completed", "aborted_then_retried", "lost", "client_errors",
                  "unknown_outcomes"):
            k[f] += r.get(f, 0)
        for f in ("slot_sync_wait_s", "promote_s", "resume_s", "max_write_gap_ms", "move_s",
                  "reclone_s"):
            if f in r:
                k.setdefault(f, []).append(r[f])
    return kinds


async def main(rounds: int, kinds: list[str]) -> int:
    has15 = (PG15_BIN / "postgres").exists()
    kinds = [k for k in kinds if k != "source15" or has15]
    standbys = ("catalog", "shard-1") + (("shard-3",) if has15 else ())
    t0 = time.monotonic()
    with private_stack(2, pg15_shards=1 if has15 else 0, standbys=standbys,
                       prefix="shardshift-bench-failover-") as stack:
        # The in-process worker's SDK core logs to stdout: errors only, so stdout stays the
        # one JSON object (an activity completing after its workflow moved on is expected
        # here and would be a warning).
        quiet = Runtime(telemetry=TelemetryConfig(logging=LoggingConfig(
            filter=TelemetryFilter(core_level="ERROR", other_level="ERROR"))))
        client = await Client.connect(stack.temporal.address, runtime=outlive_interpreter(quiet),
                                      data_converter=pydantic_data_converter)
        staging = stack.state_dir / "staging"
        settings = Settings(catalog_dsn=stack.catalog_dsn, staging_url=str(staging),
                            temporal=TemporalSettings(address=stack.temporal.address,
                                                      task_queue="bench-failover"))
        stop = asyncio.Event()
        async with Catalog(stack.catalog_dsn, max_size=4) as catalog:
            await catalog.ensure_schema()
            await register_stack_shards(catalog, stack)
            task = asyncio.create_task(run_worker(settings, stop=stop, client=client))
            bench = Bench(stack, client, "bench-failover")
            results: list[dict[str, Any]] = []
            try:
                for n in range(rounds):
                    for kind in kinds:
                        r = await bench.round(kind, n)
                        print(json.dumps(r), file=sys.stderr)
                        results.append(r)
            finally:
                stop.set()
                await task
                shutil.rmtree(staging, ignore_errors=True)
    summary = summarize(results)
    print(json.dumps({"kinds": summary, "seconds": round(time.monotonic() - t0, 1)}))
    ok = all(k["completed"] == k["runs"] and k["lost"] == 0 for k in summary.values())
    return 0 if ok else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--kinds", default="source18,source15,catalog")
    a = ap.parse_args()
    sys.exit(asyncio.run(main(a.rounds, [k for k in a.kinds.split(",") if k])))
