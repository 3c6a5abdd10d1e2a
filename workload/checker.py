"""The correctness checker: the judge of every move.

It folds each document's acknowledged operations (in the owning worker's order, see
``workload.generator``) into the state the document must have, then compares that with what
the shards hold:

- lost: a document that must exist is missing, or an acknowledged change is not in it;
- altered: a document's content differs from every state its history allows;
- duplicated: a document is stored under an *active* fence on more than one shard;
- resurrected: a document whose acknowledged delete is the last word still exists.

Operations with an unknown outcome may have either result; the worker's read-back picks which.
It also reports client-visible errors and, per chunk, the longest gap between successful
writes (the pause a client saw during a cutover).

``collect_stored`` reads what the shards hold under active fences (the judge: it sees
duplicates); ``collect_visible`` reads every document of the load back through the path the
load used (a MongoDB driver through the front end, or the router core), so the same check
also judges what an application sees.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any

from bson import Decimal128
from pydantic import BaseModel

from shards.models import FenceState
from workload.generator import OpRecord
from workload.stores import DocumentStore


class Expected:
    """The possible states of one document (normally one; two after an unresolved op)."""

    __slots__ = ("exists", "v", "cents", "replaced")

    def __init__(self) -> None:
        self.exists = False
        self.v: int | None = None
        self.cents: Decimal | None = None
        self.replaced = False


class CheckReport(BaseModel):
    documents_expected: int
    documents_found: int
    operations: int
    acknowledged_writes: int
    lost: list[str]
    altered: list[str]
    duplicated: list[str]
    resurrected: list[str]
    client_errors: int
    error_samples: list[str]
    unknown_outcomes: int
    max_write_gap_ms_by_chunk: dict[str, float]
    ok: bool


def _dec(x: Any) -> Decimal | None:
    if x is None:
        return None
    if isinstance(x, Decimal128):
        return x.to_decimal()
    return Decimal(str(x))


def _state_of(doc: Mapping[str, Any] | None) -> tuple[bool, Any, Any]:
    if doc is None:
        return (False, None, None)
    return (True, doc.get("v"), _dec(doc.get("cents")))


def expected_states(records: Sequence[OpRecord]) -> dict[str, tuple[str, Expected]]:
    """doc_id -> (shard key, expected state), folding each document's history in order."""
    by_doc: dict[str, list[OpRecord]] = defaultdict(list)
    for r in records:
        by_doc[r.doc_id].append(r)
    out: dict[str, tuple[str, Expected]] = {}
    for doc_id, ops in by_doc.items():
        ops.sort(key=lambda r: r.seq)
        e = Expected()
        for r in ops:
            if r.op == "get":
                continue
            if r.outcome == "error" and r.op != "insert":
                continue  # a fence/deadline error wrote nothing
            applied = r.outcome == "ok"
            if r.outcome in ("unknown", "error"):
                # Decided by the read-back: does the observation match "applied"?
                applied = _matches_applied(e, r)
            if not applied:
                continue
            if r.op == "insert":
                e.exists, e.v, e.cents = True, 1, None
            elif r.op == "replace":
                if e.exists:
                    e.v, e.cents = r.arg, None
            elif r.op == "inc":
                if e.exists:
                    e.cents = (e.cents or Decimal(0)) + Decimal(r.arg)
            elif r.op == "delete":
                e.exists, e.v, e.cents = False, None, None
        out[doc_id] = (ops[0].key, e)
    return out


def _matches_applied(e: Expected, r: OpRecord) -> bool:
    exists, v, cents = _state_of(r.result)
    if r.op == "insert":
        return exists
    if r.op == "delete":
        return not exists
    if r.op == "replace":
        return exists and v == r.arg
    if r.op == "inc":
        return exists and cents == (e.cents or Decimal(0)) + Decimal(r.arg)
    return False


def max_write_gaps(
    records: Iterable[OpRecord], chunk_of: Mapping[int, str] | Any
) -> dict[str, float]:
    """Per chunk label, the longest gap (ms) between consecutive successful writes.

    ``chunk_of`` maps a khash to a chunk label (a callable or a mapping).
    """
    lookup = chunk_of if callable(chunk_of) else chunk_of.__getitem__
    times: dict[str, list[float]] = defaultdict(list)
    for r in records:
        if r.op != "get" and r.outcome == "ok":
            times[lookup(r.khash)].append(r.finished)
    gaps: dict[str, float] = {}
    for chunk, ts in times.items():
        ts.sort()
        gaps[chunk] = max((b - a for a, b in zip(ts, ts[1:], strict=False)), default=0.0) * 1000
    return gaps


def check(
    records: Sequence[OpRecord],
    stored: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    chunk_of: Any = None,
) -> CheckReport:
    """Compare the expected state of every document with what is stored.

    Args:
        records: every operation the load generator issued.
        stored: doc_id -> the copies of that document found under active fences (normally
            one; more than one is a duplicate).
        chunk_of: khash -> chunk label, for the write-gap report.
    """
    expected = expected_states(records)
    lost: list[str] = []
    altered: list[str] = []
    resurrected: list[str] = []
    duplicated = sorted(d for d, copies in stored.items() if len(copies) > 1)
    for doc_id, (_key, e) in expected.items():
        copies = stored.get(doc_id, [])
        doc = copies[0] if copies else None
        if not e.exists:
            if doc is not None:
                resurrected.append(doc_id)
            continue
        if doc is None:
            lost.append(doc_id)
            continue
        exists, v, cents = _state_of(doc)
        if v != e.v or cents != e.cents:
            altered.append(doc_id)
    errors = [r for r in records if r.outcome == "error"]
    unknown = sum(1 for r in records if r.outcome == "unknown")
    writes = sum(1 for r in records if r.op != "get" and r.outcome == "ok")
    report = CheckReport(
        documents_expected=sum(1 for _, e in expected.values() if e.exists),
        documents_found=sum(1 for c in stored.values() if c),
        operations=len(records),
        acknowledged_writes=writes,
        lost=sorted(lost),
        altered=sorted(altered),
        duplicated=duplicated,
        resurrected=sorted(resurrected),
        client_errors=len(errors),
        error_samples=sorted({r.error or "" for r in errors})[:5],
        unknown_outcomes=unknown,
        max_write_gap_ms_by_chunk=max_write_gaps(records, chunk_of) if chunk_of else {},
        ok=not (lost or altered or duplicated or resurrected),
    )
    return report


async def collect_stored(shards: Mapping[str, Any], collection: str) -> dict[str, list[dict[str, Any]]]:
    """doc_id -> copies stored under an *active* fence, across all shards.

    Rows under frozen or retired fences (a source awaiting cleanup) are not live data and do
    not count; a document under two active fences is a duplicate.
    """
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for shard in shards.values():
        for fence in await shard.fences(collection):
            if fence.state != FenceState.ACTIVE:
                continue
            for doc in await shard.scan(collection, fence.range):
                out[str(doc["_id"])].append(doc)
    return dict(out)


async def collect_visible(store: DocumentStore, collection: str, records: Iterable[OpRecord],
                          *, concurrency: int = 4, attempts: int = 5
                          ) -> dict[str, list[dict[str, Any]]]:
    """doc_id -> [the document as ``store`` reads it] for every document the records name
    (absent: not found). A read that fails is tried ``attempts`` times, then raises: the view
    must be complete to judge."""
    keys = {r.doc_id: r.key for r in records}
    pending = list(keys.items())
    out: dict[str, list[dict[str, Any]]] = {}

    async def read(key: str, doc_id: str) -> dict[str, Any] | None:
        for attempt in range(attempts):
            try:
                return await store.get(collection, key, doc_id)
            except Exception:  # any failure: tried again; the last one raises
                if attempt == attempts - 1:
                    raise
                await asyncio.sleep(0.2 * (attempt + 1))
        return None  # not reached: the loop returns or raises

    async def reader() -> None:
        while pending:
            doc_id, key = pending.pop()
            doc = await read(key, doc_id)
            if doc is not None:
                out[doc_id] = [doc]

    await asyncio.gather(*(reader() for _ in range(concurrency)))
    return out
