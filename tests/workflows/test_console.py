"""The operator's console, run as an operator would (``python -m cli`` processes) against the
session's real PostgreSQL servers and Temporal: ``status``, ``shard add|list|remove``,
``watch``, ``cancel``, ``complete``, ``setup temporal``, the worker check, Ctrl-C while
watching, and bad input (one line on stderr, exit code 2, nothing changed)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from google.protobuf.duration_pb2 import Duration
from psycopg import sql
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.api.workflowservice.v1 import RegisterNamespaceRequest
from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleIntervalSpec,
    ScheduleSpec,
    WorkflowExecutionStatus,
)
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RPCError

from activities.replicate import HOLD_LAG_ENV
from catalog import Catalog
from catalog.admin import provision_collection
from catalog.models import ShardState
from cli.control import cancel_effect
from cli.shards import parse_capacity
from infra import Stack
from infra.net import free_port_block
from infra.postgres import PostgresInstance, embedded_bin_dir
from settings import SEARCH_ATTRIBUTES, DatabaseSettings
from shards.models import IndexDefinition
from shards.postgres import PostgresShard
from shards.postgres.replication import stream_names
from shards.postgres.schema import collection_table
from shards.postgres.stream_control import ensure_apply_schema, release_hold
from shards.staging import Staging
from tests.conftest import owned_state_dir
from tests.router.conftest import Deployment
from tests.workflows.conftest import WorkerHandle
from tests.workflows.procs import chunk_keys, poll_progress, preload_chunk
from workflows import MigrateChunkInput, MigrateChunkWorkflow, RebalanceInput, RebalanceWorkflow
from workflows.migrate_chunk import Progress, migration_id_for

FAST = {"poll_s": 0.2, "cutover_retry_s": 0.2, "part_rows": 500}
DB = DatabaseSettings()


def cli_env(stack: Stack, task_queue: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDSHIFT_")}
    env.update({"SHARDSHIFT_CATALOG_DSN": stack.catalog_dsn,
                "SHARDSHIFT_TEMPORAL__ADDRESS": stack.temporal.address,
                "SHARDSHIFT_STATE_DIR": str(stack.state_dir), "PYTHONUNBUFFERED": "1"})
    if task_queue:
        env["SHARDSHIFT_TEMPORAL__TASK_QUEUE"] = task_queue
    return env


@dataclass
class Run:
    rc: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


async def cli(stack: Stack, *args: str, task_queue: str | None = None,
              timeout: float = 120) -> Run:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", *args, env=cli_env(stack, task_queue),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


def refused(run: Run, *words: str) -> None:
    """Bad input: exit code 2 and exactly one line on stderr naming the problem."""
    lines = run.err.strip().splitlines()
    assert run.rc == 2 and len(lines) == 1, (run.rc, run.out, run.err)
    assert "Traceback" not in run.err
    for w in words:
        assert w in run.err, (w, run.err)


def write_docs(dsn: str, collection: str, chunk: Any, n: int) -> None:
    """``n`` more documents of ``chunk`` written straight into its shard (new keys)."""
    from psycopg import sql

    from router.hashing import khash
    from shards.postgres import documents as D
    from shards.postgres.schema import collection_table

    with psycopg.connect(dsn) as conn:
        for i, key in enumerate(chunk_keys(chunk, n, "more")):
            id_text, doc_text = D.encode_for_store({"_id": f"more-{i}", "acct": key,
                                                    "pad": "m" * 200})
            conn.execute(sql.SQL("INSERT INTO {} (khash, id, doc) VALUES (%s, %s, %s)").format(
                collection_table(collection)), (khash(key), id_text, doc_text))


async def until(predicate: Any, timeout: float, what: str) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        assert asyncio.get_running_loop().time() < deadline, f"{what} not reached in {timeout}s"
        await asyncio.sleep(0.05)


# -- pure logic -------------------------------------------------------------------------------------


def test_parse_capacity_units_and_refusals() -> None:
    assert parse_capacity("500GiB") == 500 * 1024**3
    assert parse_capacity("2TB") == 2 * 1000**4
    assert parse_capacity("1.5 g") == int(1.5 * 1024**3)
    assert parse_capacity("1048576") == 1048576
    for bad in ("", "GiB", "-1GiB", "0", "nan", "inf", "1e400", "12XB", "9EiB", "1 2GiB",
                "10 GiB GiB", "\x00"):
        with pytest.raises(Exception, match="capacity"):
            parse_capacity(bad)


def test_cancel_says_what_it_means_in_each_phase() -> None:
    def p(phase: str, **kw: Any) -> Progress:
        return Progress(phase=phase, source="a", target="b", **kw)

    for phase in ("registered", "snapshot", "import", "replicate", "verify"):
        assert "before the commit point: the move aborts; the chunk stays on a" in \
            cancel_effect("MigrateChunkWorkflow", p(phase))
    assert "never interrupted" in cancel_effect("MigrateChunkWorkflow", p("cutover"))
    after = cancel_effect("MigrateChunkWorkflow", p("cutover", pause_ms=3.0))
    assert "past the commit point: the move finishes" in after and "stays on b" in after
    window = cancel_effect("MigrateChunkWorkflow", p("rollback_window", pause_ms=3.0,
                                                     rollback_open=True))
    assert "rollback window closes without rolling back" in window
    assert "phase unknown" in cancel_effect("MigrateChunkWorkflow", None)
    assert "back to active" in cancel_effect("DrainShardWorkflow", None)
    assert "already split stay" in cancel_effect("RebalanceWorkflow", None)


# -- status, complete, watch ----------------------------------------------------------------------


async def test_status_shows_shards_the_move_and_schedules_then_complete_closes_the_window(
    deployment: Deployment, worker: WorkerHandle, temporal_client: Client, stack: Stack,
) -> None:
    d, c = deployment, deployment.collection
    moving = d.initial.chunks[0]
    source = moving.shard_id
    target = next(s for s in sorted(d.shards) if s != source)
    await asyncio.to_thread(preload_chunk, d.shards[source].dsn, c, moving, 300)
    capacity = 64 * 1024 * 1024
    await d.catalog.register_shard(source, d.shards[source].dsn, engine="postgres",
                                   major_version=18, capacity_bytes=capacity)
    wf_id = f"move-{c}-{moving.chunk_id}"
    handle = await temporal_client.start_workflow(
        MigrateChunkWorkflow.run,
        MigrateChunkInput(collection=c, chunk_id=moving.chunk_id, target=target,
                          rollback_window_s=3600, **FAST),  # type: ignore[arg-type]
        id=wf_id, task_queue=worker.task_queue)
    schedule_id = f"console-{uuid.uuid4().hex[:6]}"
    await temporal_client.create_schedule(schedule_id, Schedule(
        action=ScheduleActionStartWorkflow(RebalanceWorkflow.run,
                                           RebalanceInput(collections=[c], dry_run=True),
                                           id=schedule_id, task_queue=worker.task_queue),
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=timedelta(hours=6))])))
    try:
        await poll_progress(handle, lambda p: p.rollback_open, timeout=120,
                            what="the rollback window")

        async def status() -> dict[str, Any] | None:
            run = await cli(stack, "status", "--collection", c, "--json",
                            task_queue=worker.task_queue)
            assert run.rc == 0, run.err
            report: dict[str, Any] = run.json()
            listed = any(s["schedule_id"] == schedule_id for s in report["schedules"])
            return report if listed else None  # (visibility lists a new schedule shortly)

        report = await until(status, 30, "the schedule in status")
        shards = {s["shard_id"]: s for s in report["shards"]}
        src, dst = shards[source], shards[target]
        # The chunk is still on the source (rollback window open); the target holds a copy.
        assert (src["chunks"], src["moves_out"], dst["moves_in"]) == (1, 1, 1), report
        assert src["documents"] == 300 and dst["documents"] == 300, report
        assert src["live_bytes"] > 300 * 200 and src["live_exact"] is True
        assert src["load"] == pytest.approx(src["live_bytes"] / capacity)
        assert src["server_version"] == 18 and src["reachable"] is True
        [move] = [m for m in report["moves"] if m["collection"] == c]
        assert move["workflow_id"] == wf_id and move["workflow"] == "running"
        assert (move["source"], move["target"], move["phase"], move["rollback_open"]) == \
            (source, target, "rollback_window", True)
        [sched] = [s for s in report["schedules"] if s["schedule_id"] == schedule_id]
        assert sched["workflow_type"] == "RebalanceWorkflow" and sched["every_s"] == 6 * 3600
        assert sched["next_run"] is not None and not sched["paused"]
        assert report["workers"] == {"task_queue": worker.task_queue, "pollers": 1}
        text = await cli(stack, "status", "--collection", c, task_queue=worker.task_queue)
        assert text.rc == 0 and "rollback window OPEN" in text.out and "% of 64.0 MiB" in \
            text.out, text.out

        # cancel in the window says what it would do (not run here); complete closes it.
        done = await cli(stack, "complete", wf_id, "--json")
        assert done.rc == 0, done.err
        assert "rollback window closed" in done.json()["answer"]
        watched = await cli(stack, "watch", wf_id, "--json")
        assert watched.rc == 0, watched.err
        result = watched.json()["result"]
        assert result["outcome"] == "completed" and "closed early" in result["detail"]
        assert (await d.catalog.chunk(c, moving.chunk_id)).shard_id == target
        again = await cli(stack, "complete", wf_id)
        refused(again, "not running")
    finally:
        await temporal_client.get_schedule_handle(schedule_id).delete()
        desc = await handle.describe()
        if desc.status == WorkflowExecutionStatus.RUNNING:
            await handle.cancel()
            await asyncio.wait_for(handle.result(), 120)


async def test_cancel_before_the_commit_point_aborts_and_says_so(
    deployment: Deployment, worker: WorkerHandle, temporal_client: Client, stack: Stack,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A move held before its commit point (its applier held, the source written to):
    ``status`` shows it with its lag, ``cancel`` says it aborts, and it does."""
    d, c = deployment, deployment.collection
    # The move stays in replicate (no lag wait reports caught up) until the lag is built, so
    # it cannot reach its cutover before the test has written (the worker runs in-process).
    monkeypatch.setenv(HOLD_LAG_ENV, c)
    moving = d.initial.chunks[0]
    source = moving.shard_id
    target = next(s for s in sorted(d.shards) if s != source)
    await asyncio.to_thread(preload_chunk, d.shards[source].dsn, c, moving, 100)
    wf_id = f"move-{c}-{moving.chunk_id}"
    tdsn = d.shards[target].dsn
    # The target's table locked: the import waits, so the writes below land after the slot's
    # snapshot (the manifest is written inside it) and before the replicate phase starts.
    lock = await psycopg.AsyncConnection.connect(tdsn)
    await lock.execute(sql.SQL("LOCK TABLE {} IN SHARE MODE").format(collection_table(c)))
    try:
        handle = await temporal_client.start_workflow(
            MigrateChunkWorkflow.run,
            # A short lag window: progress reports the lag at the end of each window, so
            # the lag built below shows within seconds (the default window is a minute).
            MigrateChunkInput(collection=c, chunk_id=moving.chunk_id, target=target,
                              max_lag_bytes=64 * 1024, verify=False, cutover_attempts=1000,
                              lag_window_s=2.0, **FAST),  # type: ignore[arg-type]
            id=wf_id, task_queue=worker.task_queue)
        mid = migration_id_for(wf_id, handle.result_run_id or "")
        names = stream_names(mid, "fwd")
        # Hold the applier before it starts (a test hook: the applier reads its hold from
        # this row): nothing the stream delivers is applied, every lag window ends behind,
        # and the move stays in replicate however short its windows.
        with psycopg.connect(tdsn, autocommit=True) as conn:
            ensure_apply_schema(conn)
            conn.execute("INSERT INTO shardshift.stream_state (stream, migration_id,"
                         " hold_at_lsn) VALUES (%s, %s, '0/1')", (names.origin, mid))
        staging = Staging(worker.settings.staging)
        await poll_progress(handle, lambda _p: staging.read_manifest(mid) is not None,
                            timeout=120, what="the move's snapshot")
        await asyncio.to_thread(write_docs, d.shards[source].dsn, c, moving, 2000)
    finally:
        await lock.rollback()
        await lock.close()
    try:
        lagging = await poll_progress(handle, lambda p: (p.lag_bytes or 0) > 64 * 1024,
                                      timeout=60, what="a lag past admission")
        assert lagging.pause_ms is None
        report = (await cli(stack, "status", "--collection", c, "--json",
                            task_queue=worker.task_queue)).json()
        [move] = [m for m in report["moves"] if m["collection"] == c]
        assert move["phase"] in ("replicate", "cutover") and move["lag_bytes"] > 64 * 1024
        run = await cli(stack, "cancel", wf_id, "--wait")
        assert run.rc == 0, (run.out, run.err)
        assert "cancel requested for move" in run.out
        # (the held move is in replicate, or in the cutover with its attempts refused)
        assert ("before the commit point: the move aborts" in run.out
                or "never interrupted" in run.out), run.out
        assert run.out.rstrip().splitlines()[-1].split()[1] == "aborted", run.out
        assert f"move {wf_id} was cancelled" in run.err, run.err
    finally:
        await asyncio.to_thread(release_hold, tdsn, names)
    assert (await d.catalog.chunk(c, moving.chunk_id)).shard_id == source
    refused(await cli(stack, "cancel", wf_id), "not running")


# -- the worker check and Ctrl-C --------------------------------------------------------------------


async def test_without_a_worker_commands_say_so_and_ctrl_c_detaches(
    deployment: Deployment, temporal_client: Client, stack: Stack,
) -> None:
    d, c = deployment, deployment.collection
    chunk = d.initial.chunks[0]
    target = next(s for s in sorted(d.shards) if s != chunk.shard_id)
    queue = f"nobody-{uuid.uuid4().hex[:6]}"
    # migrate refuses to start a move that nothing would run ...
    run = await cli(stack, "migrate", "--collection", c, "--chunk", str(chunk.chunk_id),
                    "--to", target, task_queue=queue)
    refused(run, "no worker polls task queue", "shardshift worker")
    with pytest.raises(RPCError):
        await temporal_client.get_workflow_handle(f"move-{c}-{chunk.chunk_id}").describe()
    # ... and watch says why nothing moves, and detaches on Ctrl-C.
    wf_id = f"console-nobody-{uuid.uuid4().hex[:6]}"
    handle = await temporal_client.start_workflow(
        MigrateChunkWorkflow.run,
        MigrateChunkInput(collection=c, chunk_id=chunk.chunk_id, target=target),
        id=wf_id, task_queue=queue)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli", "watch", wf_id, env=cli_env(stack),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert proc.stderr is not None and proc.stdout is not None
        try:
            warning = await asyncio.wait_for(proc.stderr.readline(), 60)
            assert b"no worker polls task queue" in warning and b"shardshift worker" in warning
            proc.send_signal(signal.SIGINT)
            out, err = await asyncio.wait_for(proc.communicate(), 30)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 130, (out, err)
        assert f"re-attach: shardshift watch {wf_id}".encode() in err, err
        assert b"Traceback" not in err
        assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING
        refused(await cli(stack, "complete", wf_id), "no worker polls task queue")
    finally:
        await handle.terminate("test over")


# A process of ours leaving while Temporal calls are still in flight: what Ctrl-C on ``watch``
# does when the query and the long poll for the result are both waiting on a workflow no
# worker runs. Run as its own interpreter: the exit itself is under test.
LEAVE_WITH_CALLS_IN_FLIGHT = """
import asyncio, sys
from infra.temporal_client import connect
from settings import TemporalSettings

async def main() -> None:
    client = await connect(TemporalSettings(address=sys.argv[1]))
    handle = client.get_workflow_handle(sys.argv[2])
    calls = [asyncio.ensure_future(handle.query("progress")) for _ in range(10)]
    calls += [asyncio.ensure_future(handle.result()) for _ in range(10)]
    _, pending = await asyncio.wait(calls, timeout=0.5)
    print("in flight:", len(pending), flush=True)
    raise KeyboardInterrupt

try:
    asyncio.run(main())
except KeyboardInterrupt:
    sys.exit(130)
"""


async def test_leaving_with_temporal_calls_in_flight_exits_at_once(
    temporal_client: Client, stack: Stack,
) -> None:
    """The SDK's runtime, torn down at interpreter exit, waited for a thread completing a
    cancelled call, which waited for the GIL of an interpreter already finalizing: the
    process hung for good (14 of 15 such exits before ``outlive_interpreter``)."""
    wf_id = f"leave-nobody-{uuid.uuid4().hex[:6]}"
    handle = await temporal_client.start_workflow(
        "NobodyRunsThis", id=wf_id, task_queue=f"nobody-{uuid.uuid4().hex[:6]}")
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", LEAVE_WITH_CALLS_IN_FLIGHT, stack.temporal.address, wf_id,
            env=cli_env(stack), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 30)
        finally:
            if proc.returncode is None:  # hung on its way out
                proc.kill()
                await proc.wait()
        assert out.strip() == b"in flight: 20", (out, err)
        assert proc.returncode == 130, (out, err)
        assert err == b"", err
    finally:
        await handle.terminate("test over")


# -- shard add, list, remove ------------------------------------------------------------------------


@pytest.fixture
def fresh_server() -> Iterator[PostgresInstance]:
    """A new PostgreSQL 18 server nobody has provisioned (its superuser only)."""
    state = owned_state_dir("fresh")
    inst = PostgresInstance("fresh", data_dir=state / "pg" / "fresh", port=free_port_block(1),
                            bin_dir=embedded_bin_dir(), passfile=state / "pgpass",
                            run_as="shardshift")
    (state / "pg").mkdir()
    os.chmod(state / "pg", 0o755)
    try:
        inst.init()
        inst.start(60)
        yield inst
    finally:
        try:
            inst.stop()
        finally:
            shutil.rmtree(state, ignore_errors=True)


async def test_shard_add_provisions_checks_and_registers_then_remove_retires(
    fresh_server: PostgresInstance, stack: Stack, router_catalog: Catalog,
) -> None:
    name = f"prod-{uuid.uuid4().hex[:6]}"
    address = fresh_server.address()  # host, port, dbname, passfile: no role, no password
    # Not provisioned yet: the server does not answer as the mover; nothing is registered.
    refused(await cli(stack, "shard", "add", name, "--dsn", address),
            f"does not answer as {DB.mover_user}", "--superuser-dsn")
    assert name not in {s.shard_id for s in await router_catalog.list_shards()}
    run = await cli(stack, "shard", "add", name, "--dsn", address + " user=postgres",
                    "--superuser-dsn", fresh_server.dsn(), "--capacity", "1GiB", "--json")
    assert run.rc == 0, run.err
    answer = run.json()
    assert answer["result"] == "registered" and answer["provisioned"] is True
    info = await router_catalog.shard(name)
    assert (info.engine, info.major_version, info.capacity_bytes, info.state) == \
        ("postgres", 18, 1024**3, ShardState.ACTIVE)
    assert "user=" not in info.address and "password" not in info.address
    # The roles exist on the new server, and the mover is no superuser.
    with psycopg.connect(DB.mover(info.address), autocommit=True) as conn:
        row = conn.execute("SELECT rolsuper, rolreplication FROM pg_roles"
                           " WHERE rolname = current_user").fetchone()
        assert row == (False, True)
    # Idempotent; another address for the same name needs --update.
    again = await cli(stack, "shard", "add", name, "--dsn", address, "--json")
    assert again.rc == 0 and again.json()["result"] == "unchanged", again.err
    refused(await cli(stack, "shard", "add", name, "--dsn", address.replace(
        "dbname=shardshift", "dbname=other")), "already registered", "--update")
    listed = await cli(stack, "shard", "list", "--json")
    assert listed.rc == 0 and any(r["shard_id"] == name and r["chunks"] == 0
                                  for r in listed.json())
    # A shard holding a chunk is not removed.
    c = f"console_{uuid.uuid4().hex[:6]}"
    async with PostgresShard(name, DB.mover(info.address), max_size=2) as engine:
        await provision_collection(router_catalog, {name: engine}, c, "acct",
                                   [IndexDefinition(name="by_e", fields=("e",))])
        refused(await cli(stack, "shard", "remove", name), "holds 1 chunk", "drain")
        assert (await router_catalog.shard(name)).state == ShardState.ACTIVE
        await router_catalog.drop_collection(c)
        await engine.drop_collection(c)
    removed = await cli(stack, "shard", "remove", name, "--json")
    assert removed.rc == 0 and removed.json()["result"] == "retired", removed.err
    assert (await router_catalog.shard(name)).state == ShardState.RETIRED
    twice = await cli(stack, "shard", "remove", name)
    assert twice.rc == 0 and "already retired" in twice.out
    refused(await cli(stack, "shard", "add", name, "--dsn", address), "retired", "new name")


async def test_bad_input_is_one_line_and_exit_2(stack: Stack, router_catalog: Catalog,
                                                pg18_dsns: list[str]) -> None:
    before = await router_catalog.list_shards()
    dsn = "host=127.0.0.1 port=5 dbname=shardshift"
    cases: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
        (("shard", "add", "bad name", "--dsn", dsn), ("invalid shard id",)),
        (("shard", "add", "ok1", "--dsn", dsn + " password=secret"), ("password",)),
        (("shard", "add", "ok1", "--dsn", "dbname=x"), ("host=",)),
        (("shard", "add", "ok1", "--dsn", "not a dsn ="), ("--dsn",)),
        (("shard", "add", "ok1", "--dsn", dsn, "--capacity", "nan"), ("capacity",)),
        (("shard", "add", "ok1", "--dsn", dsn, "--capacity", "-5GiB"), ("capacity",)),
        (("shard", "add", "ok1", "--dsn", dsn, "--capacity", "99999999EiB"), ("capacity",)),
        (("shard", "add", "ok1"), ("--dsn",)),
        (("shard", "add", "ok1", "--dsn", dsn, "--superuser-dsn", "dbname=other"),
         ("same database",)),
        (("shard", "remove", "bad name"), ("invalid shard id",)),
        (("shard", "remove", "nosuch-shard-x"), ("nosuch-shard-x",)),
        (("status", "--collection", "no-such!"), ("collection",)),
        (("watch", "no-such-workflow-x"), ("no workflow",)),
        (("cancel", "no-such-workflow-x"), ("no workflow",)),
        (("complete", "no-such-workflow-x"), ("no workflow",)),
        (("setup", "temporal", "--namespace", f"nosuch-{uuid.uuid4().hex[:6]}"),
         ("does not exist",)),
        (("shard", "frobnicate"), ("invalid choice",)),
    ]
    runs = await asyncio.gather(*(cli(stack, *args) for args, _ in cases))
    for (args, words), run in zip(cases, runs, strict=True):
        try:
            refused(run, *words)
        except AssertionError as exc:
            raise AssertionError(f"{args}: {exc}") from None
    assert await router_catalog.list_shards() == before


# -- setup temporal -------------------------------------------------------------------------------


async def test_setup_temporal_registers_the_search_attributes_on_a_new_namespace(
    stack: Stack, temporal_client: Client,
) -> None:
    ns = f"console-{uuid.uuid4().hex[:8]}"
    await temporal_client.workflow_service.register_namespace(RegisterNamespaceRequest(
        namespace=ns, workflow_execution_retention_period=Duration(seconds=86400)))

    async def exists() -> bool:
        try:
            await temporal_client.operator_service.list_search_attributes(
                ListSearchAttributesRequest(namespace=ns))
            return True
        except RPCError:
            return False

    await until(exists, 30, "the new namespace")
    other = await Client.connect(stack.temporal.address, namespace=ns,
                                 data_converter=pydantic_data_converter)
    query = "ShardshiftPhase = 'replicate'"
    with pytest.raises(RPCError):  # without the attributes a moves query is refused
        [wf async for wf in other.list_workflows(query)]
    first = await cli(stack, "setup", "temporal", "--namespace", ns, "--json")
    assert first.rc == 0, first.err
    assert sorted(first.json()["added"]) == sorted(SEARCH_ATTRIBUTES)
    second = await cli(stack, "setup", "temporal", "--namespace", ns, "--json")
    assert second.rc == 0 and second.json() == {
        "namespace": ns, "added": [], "present": sorted(SEARCH_ATTRIBUTES)}, second.out
    listed = await temporal_client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=ns))
    assert set(SEARCH_ATTRIBUTES) <= set(listed.custom_attributes)
    assert [wf async for wf in other.list_workflows(query)] == []

