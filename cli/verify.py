"""``shardshift verify`` (a chunk's data checked on demand, reports recorded in the catalog)
and ``shardshift catalog check`` (the layout and fence invariants).

What ``verify`` checks, per chunk:

* **A move in flight** (its migration in ``replicate`` or ``verify``): source and target
  compared at one LSN, VDiff-style (``shards/postgres/vdiff.py``: the applier held at the
  source snapshot's LSN, both sides checksummed per bucket, nothing repaired). Refused while
  the move's own verify runs.
* **A settled chunk** (or a move in another phase): the owner's checksums (rows, digest) and
  the rows of the chunk's range on every other shard that has the collection's table:
  orphans, left by an aborted move or a failed cleanup (``shardshift doctor --repair``
  removes them). A moving chunk's target is not counted: it is being filled.

Each chunk's report is recorded in the catalog's ``verifications`` (``verify --show``). The
exit code is 0 when every chunk checked is consistent, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from catalog import Catalog
from catalog.errors import CatalogError
from catalog.invariants import check_invariants
from catalog.local_stack import close_engines, open_engines
from catalog.models import (
    Chunk,
    ChunkMap,
    MigrationPhase,
    MigrationRecord,
    ShardInfo,
    ShardState,
    VerificationKind,
    VerificationReport,
)
from catalog.store import check_migration_id
from cli.common import CliError, catalog_dsn
from cli.render import print_verifications, print_violations
from settings import get_settings
from shards.errors import InvalidNameError
from shards.names import check_collection
from shards.postgres import PostgresShard
from shards.postgres.checksum import checksum_range, range_digest
from shards.postgres.stream_control import ApplyError
from shards.postgres.vdiff import VerifyBusyError, diff_in_flight

_IN_FLIGHT = {MigrationPhase.REPLICATE, MigrationPhase.VERIFY}


def cmd_verify(args: argparse.Namespace) -> int:
    return asyncio.run(_verify(args))


def cmd_catalog(args: argparse.Namespace) -> int:
    return asyncio.run(_catalog_check(args))


async def _verify(args: argparse.Namespace) -> int:
    if args.show is not None:
        return await _show(args)
    if args.collection is None:
        raise CliError("verify needs --collection C (or --show ID for recorded reports)")
    try:
        collection = check_collection(args.collection)
    except InvalidNameError as exc:
        raise CliError(str(exc)) from None
    settings = get_settings()
    async with Catalog(catalog_dsn(settings), max_size=2) as cat:
        await cat.ensure_schema()
        try:
            cmap = await cat.chunk_map(collection)
        except CatalogError as exc:
            raise CliError(str(exc)) from None
        chunks = list(cmap.chunks)
        if args.chunk is not None:
            one = cmap.chunk(args.chunk)
            if one is None:
                raise CliError(f"collection {collection} has no chunk {args.chunk}")
            chunks = [one]
        moving = {m.chunk_id: m for m in await cat.migrations(collection=collection,
                                                              active_only=True)}
        shards = one_per_server(await cat.list_shards(), {
            *(c.shard_id for c in cmap.chunks), *(m.target for m in moving.values())})
        engines = await open_engines(shards, max_size=2)
        try:
            reports = []
            for chunk in chunks:
                report = await _check_chunk(chunk, moving.get(chunk.chunk_id), engines,
                                            args.buckets)
                reports.append(await cat.record_verification(report))
        finally:
            await close_engines(engines)
    ok = all(r.ok for r in reports)
    if args.json:
        print(json.dumps({"ok": ok, "reports": [r.model_dump(mode="json") for r in reports]},
                         indent=2))
    else:
        print_verifications(reports)
    return 0 if ok else 1


async def _check_chunk(chunk: Chunk, mig: MigrationRecord | None,
                       engines: dict[str, PostgresShard], buckets: int) -> VerificationReport:
    started = time.monotonic()
    if mig is not None and mig.phase in _IN_FLIGHT:
        report = await _in_flight(chunk, mig, engines, buckets)
    else:
        report = await _settled(chunk, mig, engines, buckets)
    return report.model_copy(update={"seconds": round(time.monotonic() - started, 3)})


async def _in_flight(chunk: Chunk, mig: MigrationRecord, engines: dict[str, PostgresShard],
                     buckets: int) -> VerificationReport:
    base: dict[str, Any] = dict(kind=VerificationKind.IN_FLIGHT, collection=chunk.collection,
                                chunk_id=chunk.chunk_id, shard_id=mig.target, source=mig.source,
                                migration_id=mig.migration_id, buckets=buckets)
    try:
        diff = await asyncio.to_thread(
            diff_in_flight, engines[mig.source].dsn, engines[mig.target].dsn, chunk.collection,
            chunk.range, mig.migration_id, buckets=buckets)
    except (VerifyBusyError, ApplyError) as exc:
        return VerificationReport(**base, documents=0, rounds=0, ok=False,
                                  detail=f"not compared: {exc}")
    orphans, unchecked = await _orphans(chunk, {mig.source, mig.target}, engines)
    detail = None if diff.equal else (
        f"the target differs from the source at {diff.lsn} in {diff.mismatched_buckets} "
        f"bucket(s) ({diff.documents_source} vs {diff.documents_target} documents); the "
        "move's verify phase re-copies them")
    return VerificationReport(
        **base, lsn=diff.lsn, documents=diff.documents_source,
        mismatched_buckets=diff.mismatched_buckets, orphans=orphans, digest=diff.digest_source,
        ok=diff.equal and not orphans and not unchecked,
        detail=_join(detail, _orphan_detail(orphans, unchecked)),
    )


async def _settled(chunk: Chunk, mig: MigrationRecord | None,
                   engines: dict[str, PostgresShard], buckets: int) -> VerificationReport:
    owner = engines.get(chunk.shard_id)
    if owner is None:
        raise CliError(f"chunk {chunk.chunk_id} is on {chunk.shard_id}, which is not an "
                       "active or draining shard")
    summed = await asyncio.to_thread(checksum_range, owner.dsn, chunk.collection, chunk.range,
                                     buckets=buckets, parallel_workers=1)
    spared = {chunk.shard_id} | ({mig.target} if mig is not None else set())
    orphans, unchecked = await _orphans(chunk, spared, engines)
    moving = (f"a move to {mig.target} is in phase {mig.phase}: the owner checked, the target "
              "not counted" if mig is not None else None)
    return VerificationReport(
        kind=VerificationKind.SETTLED, collection=chunk.collection, chunk_id=chunk.chunk_id,
        shard_id=chunk.shard_id, migration_id=mig.migration_id if mig else None,
        buckets=buckets, documents=summed.count, orphans=orphans, digest=range_digest(summed),
        ok=not orphans and not unchecked,
        detail=_join(moving, _orphan_detail(orphans, unchecked)),
    )


def one_per_server(shards: list[ShardInfo], placed: set[str]) -> list[ShardInfo]:
    """The non-retired shards, one per server address: two shard ids at one address are one
    server (its rows and fences would be counted twice, and each id's fences would look stray
    to the other); the id that holds chunks is kept."""
    by_address: dict[str, ShardInfo] = {}
    for s in sorted(shards, key=lambda s: (s.shard_id not in placed, s.shard_id)):
        if s.state != ShardState.RETIRED or s.shard_id in placed:
            by_address.setdefault(s.address, s)
    return sorted(by_address.values(), key=lambda s: s.shard_id)


async def _chunk_map(cat: Catalog, collection: str) -> ChunkMap:
    try:
        return await cat.chunk_map(collection)
    except CatalogError as exc:
        raise CliError(str(exc)) from None


async def _orphans(chunk: Chunk, spared: set[str],
                   engines: dict[str, PostgresShard]) -> tuple[dict[str, int], list[str]]:
    """Rows of the chunk's range on shards that do not own it; shards that could not be
    read."""
    orphans: dict[str, int] = {}
    unchecked: list[str] = []
    for sid, engine in sorted(engines.items()):
        if sid in spared:
            continue
        try:
            if chunk.collection not in await engine.collections():
                continue
            n = await engine.count(chunk.collection, chunk.range)
        except Exception:  # noqa: BLE001 - an unreachable shard is a finding, not a crash
            unchecked.append(sid)
            continue
        if n:
            orphans[sid] = n
    return orphans, unchecked


def _orphan_detail(orphans: dict[str, int], unchecked: list[str]) -> str | None:
    parts = []
    if orphans:
        parts.append("orphan rows of the chunk's range on " + ", ".join(
            f"{s} ({n})" for s, n in orphans.items()) + " (shardshift doctor --repair)")
    if unchecked:
        parts.append(f"not checked: {', '.join(unchecked)} could not be read")
    return "; ".join(parts) or None


def _join(*parts: str | None) -> str | None:
    return "; ".join(p for p in parts if p) or None


async def _show(args: argparse.Namespace) -> int:
    """Reports recorded for a migration id, or one report by its number."""
    ident: str = args.show
    settings = get_settings()
    async with Catalog(catalog_dsn(settings), max_size=1) as cat:
        await cat.ensure_schema()
        if ident.isdigit():
            if int(ident) < 1 or int(ident) >= 2**63:
                raise CliError(f"invalid verification id {ident}")
            reports = await cat.verifications(verification_id=int(ident), limit=1)
        else:
            try:
                check_migration_id(ident)
            except InvalidNameError as exc:
                raise CliError(str(exc)) from None
            reports = await cat.verifications(migration_id=ident, limit=args.limit)
    if not reports:
        raise CliError(f"no verification report for {ident}")
    if args.json:
        print(json.dumps({"reports": [r.model_dump(mode="json") for r in reports]}, indent=2))
    else:
        print_verifications(reports, detail=True)
    return 0


# -- catalog check ----------------------------------------------------------------------------


async def _catalog_check(args: argparse.Namespace) -> int:
    collection = args.collection
    if collection is not None:
        try:
            check_collection(collection)
        except InvalidNameError as exc:
            raise CliError(str(exc)) from None
    settings = get_settings()
    async with Catalog(catalog_dsn(settings), max_size=2) as cat:
        await cat.ensure_schema()
        maps = (await cat.chunk_maps() if collection is None
                else {collection: await _chunk_map(cat, collection)})
        shards = one_per_server(await cat.list_shards(), {
            c.shard_id for m in maps.values() for c in m.chunks})
        engines = await open_engines(shards, max_size=1) if not args.layout_only else {}
        try:
            try:
                found = await check_invariants(cat, collection,
                                               None if args.layout_only else engines)
            except CatalogError as exc:
                raise CliError(str(exc)) from None
        finally:
            await close_engines(engines)
    if args.json:
        print(json.dumps({"ok": not found, "violations": [v.model_dump(mode="json")
                                                          for v in found]}, indent=2))
    else:
        print_violations(found, collection)
    return 0 if not found else 1
