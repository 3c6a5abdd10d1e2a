"""``shardshift demo`` (``./dev demo``), the main job: a live chunk migration under load, with
a report.

1. bring the local stack up (idempotent) and register its shards in the catalog;
2. provision a fresh collection ``demo_<timestamp>`` (3 shards, 2 chunks each) and load a few
   thousand documents through the router;
3. start a worker in-process (its own task queue) and a load generator writing and reading
   through the router, over keys of the moving chunk and of other chunks: by default an
   ordinary MongoDB driver (pymongo's ``AsyncMongoClient``) through the router's MongoDB
   front end, served in-process on a free loopback port (``--via router``: the router core
   called in-process, the path the HTTP API takes);
4. run ``MigrateChunkWorkflow`` for one chunk to another shard, with a live progress line;
5. keep the load going a few seconds after, stop it, run the checker (on what the shards
   hold, and on what the load's path reads back) and print a report;
6. draw the move's timeline (``shardshift report --plot``) under ``<state dir>/reports/``.

The stack stays up afterwards (the workflow stays visible in the Temporal Web UI). The exit
code is 0 only when the move completed and the checker found nothing lost, altered,
duplicated or resurrected and no client saw an error.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from contextlib import AsyncExitStack
from pathlib import Path

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.runtime import Runtime

from catalog import Catalog
from catalog.admin import provision_collection
from catalog.local_stack import close_engines, open_engines, register_stack_shards, up_and_provision
from cli.moves import watch_migration
from cli.render import print_result
from cli.report import build, write_plot
from infra import Stack
from infra.temporal_client import outlive_interpreter
from router.catalog_source import CatalogRouteSource
from router.core import Router
from router.mongo.server import serving
from settings import RouterSettings, Settings, TemporalSettings, get_settings
from shards.models import IndexDefinition
from shards.postgres import PostgresShard
from worker import run_worker
from workflows import MigrateChunkInput, MigrateChunkWorkflow
from workload.checker import CheckReport, check, collect_stored, collect_visible
from workload.generator import LoadGenerator, WorkloadConfig, keys_in
from workload.stores import DocumentStore, MongoStore, RouterStore, mongo_uri

DEMO_SHARDS = 3
CHUNKS_PER_SHARD = 2
PRELOAD_DOCS = 6000
LOAD_RATE = 300.0
WARMUP_S = 3.0
AFTER_S = 4.0


# -- the preload ------------------------------------------------------------------------------


def seed_doc(i: int, rng: random.Random, accounts: int) -> dict[str, object]:
    return {"_id": f"seed-{i}", "acct": f"acct-{rng.randrange(accounts)}",
            "email": f"user{i}@example.com", "v": 0, "pad": "s" * 200}


async def preload(store: DocumentStore, collection: str, n: int, *, concurrency: int = 32,
                  accounts: int = 2000) -> None:
    """Insert ``n`` documents ``seed-<i>`` through ``store``, spread over ``accounts`` keys
    (a MongoDB driver sends them in ``insert_many`` batches)."""
    rng = random.Random(11)
    docs = [seed_doc(i, rng, accounts) for i in range(n)]
    if isinstance(store, MongoStore):
        batches = [docs[i:i + 250] for i in range(0, n, 250)]

        async def batch_worker() -> None:
            while batches:
                await store.insert_many(collection, batches.pop())

        await asyncio.gather(*(batch_worker() for _ in range(min(8, concurrency))))
        return

    async def one() -> None:
        while docs:
            await store.insert(collection, dict(docs.pop()))

    await asyncio.gather(*(one() for _ in range(concurrency)))


# -- the demo ---------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(get_settings(), via=getattr(args, "via", "mongo"))


def run_demo(settings: Settings, via: str = "mongo") -> int:
    stack = Stack.from_settings(settings)
    print(f"==> bringing the local stack up in {stack.state_dir}")
    up_and_provision(stack)
    rows = stack.status()
    for r in rows:
        print(f"  {r.name:<9} {r.address:<17} {r.version[:30]:<30} {'healthy' if r.healthy else 'DOWN'}")
    if not all(r.healthy for r in rows):
        print("demo: the local stack is not healthy (see `./dev shardshift infra status`)")
        return 1
    return asyncio.run(_demo(settings, stack, via))


PATHS = {"mongo-wire": "pymongo (AsyncMongoClient) through the router's MongoDB front end",
         "router-core": "the router core in-process (the HTTP API's path)"}


async def _load_path(paths: AsyncExitStack, router: Router, settings: RouterSettings,
                     via: str) -> DocumentStore:
    """What the preload and the load go through: with ``via="mongo"`` the MongoDB front end
    on a free loopback port of this process and a pymongo client of the first configured
    user; else the router core."""
    if via != "mongo":
        return RouterStore(router)
    if not settings.mongo_users:
        raise SystemExit("demo: no MongoDB user is configured (SHARDSHIFT_ROUTER__MONGO_USERS); "
                         "use --via router")
    front = await paths.enter_async_context(serving(router, settings, "127.0.0.1", 0))
    user = settings.mongo_users[0]
    store = MongoStore(mongo_uri(front.host, front.port, user.name,
                                 user.password.get_secret_value()), settings.mongo_database)
    paths.push_async_callback(store.close)
    _step(f"MongoDB front end on {front.host}:{front.port} (database "
          f"{settings.mongo_database!r}); clients: pymongo as user {user.name!r}")
    return store


def _step(msg: str) -> None:
    print(f"==> {msg}", flush=True)


async def _demo(settings: Settings, stack: Stack, via: str) -> int:
    t_start = time.monotonic()
    record = stack.record()
    assert record is not None
    names = [s.name for s in record.servers if s.role == "shard" and s.major_version >= 16]
    names = names[:DEMO_SHARDS]
    if len(names) < 2:
        print("demo: the local stack needs at least 2 PostgreSQL 18 shards")
        return 1
    catalog_address = settings.catalog_dsn or stack.catalog_address
    stamp = time.strftime("%Y%m%d_%H%M%S")
    collection = f"demo_{stamp}"
    task_queue = f"demo-{stamp}"
    worker_settings = settings.model_copy(update={
        "catalog_dsn": catalog_address,
        "temporal": TemporalSettings(**{**settings.temporal.model_dump(),
                                        "address": stack.temporal.address,
                                        "task_queue": task_queue}),
    })

    catalog = await Catalog(settings.db.catalog(catalog_address), max_size=8).open()
    engines: dict[str, PostgresShard] = {}
    stop_worker = asyncio.Event()
    worker_task: asyncio.Task[None] | None = None
    visible: CheckReport | None = None
    visible_error = ""
    try:
        await catalog.ensure_schema()
        shards = await register_stack_shards(catalog, stack, names)
        engines = await open_engines(shards, db=settings.db)
        _step(f"provisioning collection {collection!r} on {', '.join(names)} "
              f"({CHUNKS_PER_SHARD} chunks per shard)")
        cmap = await provision_collection(
            catalog, engines, collection, "acct",
            [IndexDefinition(name="by_email", fields=("email",))],
            chunks_per_shard=CHUNKS_PER_SHARD,
        )
        moving = cmap.chunks[0]
        target = next(s for s in names if s != moving.shard_id)
        other = next(c for c in cmap.chunks if c.shard_id != moving.shard_id)

        router_settings = RouterSettings(**{**settings.router.model_dump(), "pool_max_size": 8})
        # The router as in production: the catalog read-only, shards as the router role.
        source = CatalogRouteSource.from_dsn(settings.db.catalog_reader(catalog_address),
                                             db=settings.db)
        async with Router(source, router_settings) as router, AsyncExitStack() as paths:
            store = await _load_path(paths, router, router_settings, via)
            t0 = time.monotonic()
            await preload(store, collection, PRELOAD_DOCS)
            _step(f"loaded {PRELOAD_DOCS} documents through {PATHS[store.path]} in "
                  f"{time.monotonic() - t0:.1f} s")

            client = await Client.connect(stack.temporal.address,
                                          namespace=settings.temporal.namespace,
                                          data_converter=pydantic_data_converter,
                                          runtime=outlive_interpreter(Runtime.default()))
            worker_up = asyncio.Event()
            worker_task = asyncio.create_task(
                run_worker(worker_settings, stop=stop_worker, client=client,
                           ready=worker_up.set), name="demo-worker")
            # The load starts once the worker is up: its start-up (the workflow sandbox
            # imports every workflow) holds this process's event loop for ~0.5 s, which the
            # load would otherwise report as the moving chunk's longest write gap.
            up = asyncio.create_task(worker_up.wait())
            await asyncio.wait({up, worker_task}, return_when=asyncio.FIRST_COMPLETED)
            if not worker_up.is_set():
                up.cancel()
                await worker_task  # it ended before it was up: raise why
                raise RuntimeError("the demo's worker stopped before it was up")
            _step(f"worker running in-process on task queue {task_queue!r}")

            load = LoadGenerator(store, WorkloadConfig(
                collection=collection, rate=LOAD_RATE, workers=8,
                only_keys=keys_in(moving.range, 40) + keys_in(other.range, 16, "other"),
            ))
            await load.start()
            _step(f"load generator: {LOAD_RATE:.0f} ops/s (insert/replace/$inc/delete/get), "
                  f"40 accounts in the moving chunk, 16 elsewhere; warming up {WARMUP_S:.0f} s")
            await asyncio.sleep(WARMUP_S)

            wf_id = f"move-{collection}-{moving.chunk_id}"
            _step(f"moving chunk {moving.chunk_id} [{moving.range.lo}, {moving.range.hi}) "
                  f"{moving.shard_id} -> {target}  (workflow {wf_id})")
            result = None
            wf_error: str | None = None
            try:
                handle = await client.start_workflow(
                    MigrateChunkWorkflow.run,
                    MigrateChunkInput(collection=collection, chunk_id=moving.chunk_id,
                                      target=target, poll_s=0.5, cutover_retry_s=0.5,
                                      part_rows=1000),
                    id=wf_id, task_queue=task_queue,
                )
                result = await watch_migration(handle)
            except Exception as exc:  # noqa: BLE001 - reported, and the demo fails
                wf_error = f"{type(exc).__name__}: {exc}"
                if getattr(exc, "cause", None) is not None:
                    wf_error += f" ({exc.cause})"  # type: ignore[attr-defined]
            _step(f"move finished; keeping the load on for {AFTER_S:.0f} s more")
            await asyncio.sleep(AFTER_S)
            await load.stop()
            _step(f"reading every document of the load back through {PATHS[store.path]}")
            try:
                visible = check(load.records,
                                await collect_visible(store, collection, load.records))
            except Exception as exc:  # noqa: BLE001 - reported, and the demo fails
                visible_error = f"{type(exc).__name__}: {exc}"

        _step("running the checker")
        stored = await collect_stored(engines, collection)
        moved_label = f"chunk {moving.chunk_id} (moved)"

        def chunk_of(h: int) -> str:
            return moved_label if moving.range.contains(h) else "other chunks"

        report = check(load.records, stored, chunk_of=chunk_of)
        seeds = [d for d, copies in stored.items() if d.startswith("seed-")]
        seed_dups = sum(1 for d in seeds if len(stored[d]) > 1)
        placed = (await catalog.chunk(collection, moving.chunk_id)).shard_id
        plot: Path | None = None
        plot_error: str | None = None
        if result is not None:
            try:
                timeline = await build(catalog, worker_settings, result.migration_id,
                                       use_temporal=False)
                (stack.state_dir / "reports").mkdir(parents=True, exist_ok=True)
                plot = write_plot(timeline, stack.state_dir / "reports" / f"{wf_id}.png")
            except Exception as exc:  # noqa: BLE001 - a missing plot does not fail the demo
                plot_error = f"{type(exc).__name__}: {exc}"
        moved_writes = sum(1 for r in load.records
                           if r.op != "get" and r.outcome == "ok" and moving.range.contains(r.khash))
    finally:
        stop_worker.set()
        if worker_task is not None:
            try:
                await worker_task
            except Exception as exc:  # noqa: BLE001 - report, do not mask the demo's result
                print(f"  (worker stopped with {type(exc).__name__}: {exc})")
        await close_engines(engines)
        await catalog.close()

    # -- the report ---------------------------------------------------------------------------
    completed = result is not None and result.outcome.value == "completed"
    preload_ok = len(seeds) == PRELOAD_DOCS and seed_dups == 0
    passed = (report.ok and visible is not None and visible.ok and report.client_errors == 0
              and completed and preload_ok)
    print()
    print("=" * 72)
    print(f" shardshift demo: chunk {moving.chunk_id} of {collection}, "
          f"{moving.shard_id} -> {target}")
    print("=" * 72)
    if result is not None:
        print_result(result, indent="  ")
    else:
        print(f"  workflow FAILED: {wf_error}")
    print(f"  chunk now on       {placed}")
    print(f"  -- clients: {PATHS[store.path]} --")
    print(f"  operations         {report.operations} ({report.acknowledged_writes} acknowledged "
          f"writes, {moved_writes} on the moving chunk)")
    print(f"  client errors      {report.client_errors}"
          + (f"  e.g. {report.error_samples[0]}" if report.error_samples else ""))
    print(f"  unknown outcomes   {report.unknown_outcomes} (resolved by read-back)")
    gaps = report.max_write_gap_ms_by_chunk
    print(f"  longest write gap  {gaps.get(moved_label, 0.0):.0f} ms on the moved chunk, "
          f"{gaps.get('other chunks', 0.0):.0f} ms on the others")
    print("  -- checker --")
    print(f"  documents          {report.documents_expected} expected from the load, "
          f"{report.documents_found} found in total (incl. {len(seeds)}/{PRELOAD_DOCS} preloaded)")
    print(f"  lost {len(report.lost)}, altered {len(report.altered)}, "
          f"duplicated {len(report.duplicated) + seed_dups}, resurrected {len(report.resurrected)}")
    if visible is not None:
        print(f"  read back          {visible.documents_found} documents through {store.path}: "
              f"lost {len(visible.lost)}, altered {len(visible.altered)}, "
              f"resurrected {len(visible.resurrected)}")
    else:
        print(f"  read back          FAILED: {visible_error}")
    verdict = "PASS" if passed else "FAIL"
    print(f"  verdict            {verdict}")
    ui = f"http://127.0.0.1:{stack.temporal.ui_port}/namespaces/{settings.temporal.namespace}"
    print("  -- watch it --")
    print(f"  Temporal Web UI    {ui}/workflows/{wf_id}")
    print(f"  all moves          ./dev shardshift moves --collection {collection}")
    if plot is not None:
        print(f"  timeline plot      {plot}")
    elif plot_error is not None:
        print(f"  timeline plot      not drawn: {plot_error}")
    print(f"  this move          ./dev shardshift report {wf_id} [--json] [--plot FILE.png]")
    print(f"  took               {time.monotonic() - t_start:.0f} s")
    print("=" * 72)
    print("The local stack is still running; stop it with: ./dev shardshift infra down")
    return 0 if passed else 1

