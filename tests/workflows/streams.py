"""A chunk streaming from its source to another shard, outside any workflow: the ``streamed``
fixture (tests of verify and of on-demand verification use it)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg import sql

from activities.models import Direction, MoveSpec
from activities.replicate import stream_spec
from router.hashing import khash
from shards.models import FenceRef
from shards.postgres.apply import ChangeApplier
from shards.postgres.checksum import recopy_range
from shards.postgres.replication import (
    StreamNames,
    cleanup_stream_objects,
    create_publication,
    create_slot,
    current_lsn,
)
from shards.postgres.stream_control import wait_caught_up
from tests.router.conftest import Deployment
from workload.generator import keys_in


@dataclass
class Streamed:
    """One chunk of the deployment streaming from its source to another shard."""

    deployment: Deployment
    spec: MoveSpec
    source_dsn: str
    target_dsn: str
    keys: list[str]
    applier: ChangeApplier
    stop: threading.Event
    thread: threading.Thread
    box: dict[str, Any]

    @property
    def names(self) -> StreamNames:
        return stream_spec(self.spec, Direction.FORWARD).names

    @property
    def ref(self) -> FenceRef:
        return FenceRef(chunk_id=self.spec.chunk_id, token=self.spec.token)

    async def write(self, key: str, n: int) -> None:
        """Replace (or insert) the document of ``key`` on the source, through its fence."""
        shard = self.deployment.shards[self.spec.source]
        doc = {"_id": key, "acct": key, "n": n}
        if not await shard.replace(self.spec.collection, self.ref, khash(key), doc):
            await shard.insert(self.spec.collection, self.ref, khash(key), doc)

    def rows(self, dsn: str) -> list[tuple[Any, ...]]:
        r = self.spec.key_range
        with psycopg.connect(dsn) as conn:
            return conn.execute(
                sql.SQL("SELECT khash, id, doc::text FROM docs.{} WHERE khash >= %s"
                        " AND (%s::bigint IS NULL OR khash < %s) ORDER BY khash, id"
                        ).format(sql.Identifier(self.spec.collection)),
                (r.lo, r.sql_hi, r.sql_hi),
            ).fetchall()

    def caught_up(self) -> None:
        with psycopg.connect(self.source_dsn, autocommit=True) as conn:
            lsn = current_lsn(conn)
        wait_caught_up(self.target_dsn, self.names, lsn, timeout=30)


@pytest.fixture
async def streamed(deployment: Deployment) -> AsyncIterator[Streamed]:
    c = deployment.collection
    chunk = deployment.initial.chunks[0]
    target = next(s for s in deployment.shards if s != chunk.shard_id)
    spec = MoveSpec(migration_id=f"vfy-{c}", collection=c, chunk_id=chunk.chunk_id,
                    key_range=chunk.range, source=chunk.shard_id, target=target,
                    token=chunk.token)
    source_dsn = deployment.shards[chunk.shard_id].dsn
    target_dsn = deployment.shards[target].dsn
    keys = keys_in(chunk.range, 60, "v")
    names = stream_spec(spec, Direction.FORWARD).names
    stop = threading.Event()
    box: dict[str, Any] = {}
    applier = ChangeApplier(stream_spec(spec, Direction.FORWARD), source_dsn, target_dsn)

    def run() -> None:
        try:
            applier.run(stop)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    s = Streamed(deployment, spec, source_dsn, target_dsn, keys, applier, stop, thread, box)
    try:
        for i, key in enumerate(keys[:40]):  # before the stream: copied at its snapshot
            await s.write(key, i)
        create_publication(source_dsn, names, c, chunk.chunk_id, chunk.range)
        with create_slot(source_dsn, names) as slot:
            recopy_range(source_dsn, target_dsn, c, chunk.range, snapshot=slot.snapshot_name)
        thread.start()
        for i, key in enumerate(keys[40:]):  # through the stream
            await s.write(key, i)
        await asyncio.to_thread(s.caught_up)
        assert s.rows(target_dsn) == s.rows(source_dsn)
        yield s
    finally:
        stop.set()
        if thread.ident is not None:
            await asyncio.to_thread(thread.join, 30)
        for dsn in (source_dsn, target_dsn):
            await asyncio.to_thread(cleanup_stream_objects, dsn, spec.migration_id)
