"""Load generator: writes and reads through the router at a set rate and records every
acknowledged operation, so the checker can prove afterwards that nothing was lost.

Determinism by ownership: each document belongs to exactly one worker, and a worker issues
one operation at a time, so the acknowledged operations on a document are totally ordered by
the worker's own sequence. The expected final state of every document is then a fold over
its history; no clock comparison between processes is needed.

Unknown outcomes: when an operation fails such that it may or may not have been applied (a
lost connection mid-write, a timeout), the worker immediately reads the document back and
records what it saw; the checker accepts the outcome only if the observation matches one of
the two possible states. A worker stops writing a document whose state it could not resolve.

Paths: the generator drives a ``workload.stores.DocumentStore``: the router core in-process
(``RouterStore``; a ``Router`` given directly is wrapped in one) or a MongoDB driver through
the router's wire-protocol front end (``MongoStore``). Each store says which failures leave
the outcome unknown.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any

from bson import Decimal128

from router.core import Router
from router.hashing import khash
from shards.models import KeyRange
from workload.stores import DocumentStore, RouterStore


@dataclass(slots=True)
class OpRecord:
    """One operation as the client saw it."""

    worker: int
    seq: int
    op: str  # insert | replace | inc | delete | get
    key: str
    doc_id: str
    khash: int
    started: float
    finished: float = 0.0
    outcome: str = "pending"  # ok | error | unknown
    error: str | None = None
    arg: Any = None  # replace: the new version; inc: the amount (str); insert: the version
    result: Any = None  # get / resolution: the document read back (or None)


@dataclass
class WorkloadConfig:
    collection: str
    shard_key: str = "acct"
    accounts: int = 200
    rate: float = 500.0
    """Target operations per second across all workers."""
    workers: int = 8
    pad_bytes: int = 200
    mix: dict[str, float] = field(
        default_factory=lambda: {"insert": 0.3, "replace": 0.2, "inc": 0.3, "delete": 0.05,
                                 "get": 0.15}
    )
    seed: int = 7
    only_keys: list[str] | None = None
    """Restrict the workload to these shard-key values (e.g. the ones of the moving chunk)."""


def account_key(i: int) -> str:
    return f"acct-{i:06d}"


def keys_in(rng: KeyRange, n: int, prefix: str = "acct") -> list[str]:
    """The first ``n`` shard-key values ``{prefix}-{i}`` that hash into ``rng`` (for
    ``WorkloadConfig.only_keys``)."""
    out: list[str] = []
    i = 0
    while len(out) < n and i < 2_000_000:
        k = f"{prefix}-{i}"
        if rng.contains(khash(k)):
            out.append(k)
        i += 1
    return out


class LoadGenerator:
    """Runs ``config.workers`` workers until stopped; keeps every ``OpRecord``."""

    def __init__(self, router: Router | DocumentStore, config: WorkloadConfig) -> None:
        self.store: DocumentStore = RouterStore(router) if isinstance(router, Router) else router
        self.config = config
        self.records: list[OpRecord] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.unresolved: set[str] = set()

    def keys_for(self, worker: int) -> list[str]:
        keys = self.config.only_keys or [account_key(i) for i in range(self.config.accounts)]
        return [k for i, k in enumerate(keys) if i % self.config.workers == worker]

    async def start(self) -> None:
        for w in range(self.config.workers):
            self._tasks.append(asyncio.create_task(self._worker(w), name=f"load-{w}"))

    async def swap_router(self, router: Router) -> None:
        """Restart the router under the load: operations from now on go through ``router``;
        the old one finishes those in flight, then closes (a graceful restart)."""
        old = self.store
        assert isinstance(old, RouterStore), "only the router-core path restarts a router"
        self.store = RouterStore(router)
        await old.router.close()

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _worker(self, w: int) -> None:
        cfg = self.config
        rng = random.Random(cfg.seed * 1000 + w)
        keys = self.keys_for(w)
        if not keys:
            return
        live: dict[str, str] = {}  # doc_id -> key, documents this worker believes exist
        next_doc = 0
        seq = 0
        interval = cfg.workers / cfg.rate
        ops, weights = zip(*cfg.mix.items(), strict=True)
        next_at = time.monotonic()
        while not self._stop.is_set():
            next_at += interval
            op = rng.choices(ops, weights)[0]
            if op != "insert" and not live:
                op = "insert"
            if op == "insert":
                key = rng.choice(keys)
                doc_id = f"w{w}-{next_doc}"
                next_doc += 1
            else:
                doc_id = rng.choice(list(live))
                key = live[doc_id]
            if doc_id in self.unresolved:
                continue
            seq += 1
            rec = OpRecord(worker=w, seq=seq, op=op, key=key, doc_id=doc_id, khash=khash(key),
                           started=time.monotonic())
            await self._execute(rec, rng, live)
            self.records.append(rec)
            delay = next_at - time.monotonic()
            if delay > 0:
                try:
                    await asyncio.wait_for(self._stop.wait(), timeout=delay)
                except TimeoutError:
                    pass  # the pause to the next operation is over
            else:
                next_at = time.monotonic()  # behind schedule: do not burst to catch up

    async def _execute(self, rec: OpRecord, rng: random.Random, live: dict[str, str]) -> None:
        cfg = self.config
        r = self.store
        c = cfg.collection
        try:
            if rec.op == "insert":
                rec.arg = 1
                await r.insert(c, {"_id": rec.doc_id, cfg.shard_key: rec.key, "v": 1,
                                   "balance": Decimal128("0.00"), "pad": "p" * cfg.pad_bytes})
                live[rec.doc_id] = rec.key
            elif rec.op == "replace":
                rec.arg = rec.seq + 1_000_000 * rec.worker
                await r.replace(c, rec.key, {"_id": rec.doc_id, cfg.shard_key: rec.key,
                                             "v": rec.arg, "balance": None,
                                             "pad": "r" * cfg.pad_bytes})
            elif rec.op == "inc":
                amount = f"{rng.randint(1, 10000) / 100:.2f}"
                rec.arg = amount
                await r.patch(c, rec.key, rec.doc_id, {"$inc": {"cents": Decimal128(amount)}})
            elif rec.op == "delete":
                await r.delete(c, rec.key, rec.doc_id)
                live.pop(rec.doc_id, None)
            else:
                rec.result = await r.get(c, rec.key, rec.doc_id)
            rec.outcome = "ok"
        except Exception as exc:  # noqa: BLE001 - every error counts, by kind
            if r.outcome_unknown(exc):
                rec.outcome = "unknown"
                rec.error = f"{type(exc).__name__}: {exc}"
                await self._resolve(rec, live)
                return
            rec.outcome = "error"
            rec.error = f"{type(exc).__name__}: {exc}"
            if rec.op == "insert":
                # A failed insert may still have happened (e.g. a timeout): resolve it.
                await self._resolve(rec, live)
        finally:
            rec.finished = time.monotonic()

    async def _resolve(self, rec: OpRecord, live: dict[str, str]) -> None:
        """Read the document back after an ambiguous failure and record what it was."""
        for _ in range(50):
            try:
                rec.result = await self.store.get(self.config.collection, rec.key, rec.doc_id)
                rec.outcome = "unknown"
                if rec.op == "insert" and rec.result is not None:
                    live[rec.doc_id] = rec.key
                if rec.op == "delete" and rec.result is None:
                    live.pop(rec.doc_id, None)
                return
            except Exception:  # noqa: BLE001 - keep trying to learn the truth
                await asyncio.sleep(0.1)
        self.unresolved.add(rec.doc_id)
