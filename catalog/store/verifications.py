"""Verification reports: what each verification of a chunk found, kept for the operator.

A move's verify phase records one report (``migrate.verify``), and so does every chunk that
``shardshift verify`` checks on demand. Reports are observations, like chunk statistics:
recording one is not a catalog change (no version bump, no notification), so it never
conflicts with a cutover's compare-and-set nor wakes a router. They have no foreign keys: a
report outlives a split or a dropped collection, as an audit trail.
"""

from __future__ import annotations

import json
from typing import Any

from psycopg import AsyncCursor

from catalog.models import VerificationKind, VerificationReport
from catalog.store.checks import check_chunk_id, check_migration_id, check_shard_id
from catalog.store.rows import one
from catalog.store.txn import CatalogBase
from shards.names import check_collection

_COLUMNS = (
    " verification_id, kind, collection, chunk_id, shard_id, source, migration_id, lsn,"
    " buckets, documents, mismatched_buckets, repaired_ranges, rounds, orphans, digest, ok,"
    " detail, seconds, created_at"
)
_SELECT = "SELECT" + _COLUMNS + " FROM catalog.verifications"
_INSERT = (
    "INSERT INTO catalog.verifications (kind, collection, chunk_id, shard_id, source,"
    " migration_id, lsn, buckets, documents, mismatched_buckets, repaired_ranges, rounds,"
    " orphans, digest, ok, detail, seconds) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s,"
    " %s, %s, %s::jsonb, %s, %s, %s, %s) RETURNING verification_id, kind, collection,"
    " chunk_id, shard_id, source, migration_id, lsn, buckets, documents, mismatched_buckets,"
    " repaired_ranges, rounds, orphans, digest, ok, detail, seconds, created_at"
)


def _to_report(row: Any) -> VerificationReport:
    (vid, kind, collection, chunk_id, shard_id, source, migration_id, lsn, buckets, documents,
     mismatched, repaired, rounds, orphans, digest, ok, detail, seconds, created_at) = row
    return VerificationReport(
        verification_id=int(vid), kind=VerificationKind(kind), collection=collection,
        chunk_id=int(chunk_id), shard_id=shard_id, source=source, migration_id=migration_id,
        lsn=lsn, buckets=int(buckets), documents=int(documents),
        mismatched_buckets=int(mismatched), repaired_ranges=int(repaired), rounds=int(rounds),
        orphans={str(k): int(v) for k, v in (orphans or {}).items()}, digest=digest,
        ok=bool(ok), detail=detail, seconds=float(seconds), created_at=created_at,
    )


class Verifications(CatalogBase):
    """Record verification reports and read them back."""

    async def record_verification(self, report: VerificationReport) -> VerificationReport:
        """Store a report (its ``verification_id`` and ``created_at`` are the catalog's);
        returns it as stored."""
        check_collection(report.collection)
        check_chunk_id(report.chunk_id)
        check_shard_id(report.shard_id)
        if report.source is not None:
            check_shard_id(report.source)
        if report.migration_id is not None:
            check_migration_id(report.migration_id)
        for shard in report.orphans:
            check_shard_id(shard)

        async def body(cur: AsyncCursor[Any]) -> VerificationReport:
            row = await one(
                cur, _INSERT,
                (report.kind.value, report.collection, report.chunk_id, report.shard_id,
                 report.source, report.migration_id, report.lsn, report.buckets,
                 report.documents, report.mismatched_buckets, report.repaired_ranges,
                 report.rounds, json.dumps(report.orphans), report.digest, report.ok,
                 report.detail, report.seconds),
            )
            assert row is not None
            return _to_report(row)

        return await self._txn(body)

    async def verifications(
        self,
        *,
        migration_id: str | None = None,
        collection: str | None = None,
        chunk_id: int | None = None,
        verification_id: int | None = None,
        limit: int = 100,
    ) -> list[VerificationReport]:
        """Reports matching every filter given, newest first."""
        if migration_id is not None:
            check_migration_id(migration_id)
        if collection is not None:
            check_collection(collection)
        if chunk_id is not None:
            check_chunk_id(chunk_id)
        if verification_id is not None and verification_id < 1:
            raise ValueError(f"invalid verification id {verification_id}: must be at least 1")
        if limit < 1:
            raise ValueError("limit must be at least 1")

        async def body(cur: AsyncCursor[Any]) -> list[VerificationReport]:
            await cur.execute(
                _SELECT + " WHERE (%(m)s::text IS NULL OR migration_id = %(m)s)"
                " AND (%(c)s::text IS NULL OR collection = %(c)s)"
                " AND (%(k)s::bigint IS NULL OR chunk_id = %(k)s)"
                " AND (%(v)s::bigint IS NULL OR verification_id = %(v)s)"
                " ORDER BY created_at DESC, verification_id DESC LIMIT %(n)s",
                {"m": migration_id, "c": collection, "k": chunk_id, "v": verification_id,
                 "n": limit},
            )
            return [_to_report(r) for r in await cur.fetchall()]

        return await self._txn(body, read_only=True)


__all__ = ["Verifications"]
