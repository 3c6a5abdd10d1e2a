"""Phase 3: load the staged parts into the target with binary COPY, part by part.

Each part commits with its progress row, so a retry (a crashed worker, a target that was
down) resumes at the first missing part. The import follows the export, so both phases run
at once.
"""

from __future__ import annotations

import os
import threading
import time

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities import metrics
from activities.availability import shard_dsn, shard_errors
from activities.context import MoveContext, Stopped, non_retryable
from activities.copy_seats import seat_key
from activities.models import (
    CopyCheckpoint,
    CopyProgress,
    CopyProgressInput,
    ImportInput,
    ImportResult,
)
from activities.timeline import Sampler, utcnow
from catalog.timeline import MoveSample, SampleKind
from shards.postgres.bulk_import import (
    ImportProgress,
    StagedPartError,
    import_parts,
    imported_parts,
)
from shards.postgres.snapshot import estimate_chunk_rows, load_manifest

FAIL_COPY_PROGRESS_ENV = "SHARDSHIFT_TEST_FAIL_COPY_PROGRESS"
"""Test hook: ``copy_progress`` of the collection named here fails for good."""


COUNT_TIMEOUT_MS = 2000
"""Longest a progress count may run on the source before it is reported unknown."""


class ImportActivities:
    def __init__(self, ctx: MoveContext) -> None:
        self.ctx = ctx

    @activity.defn(name="migrate.copy_progress")
    async def copy_progress(self, inp: CopyProgressInput) -> CopyProgress:
        """Rows and parts imported so far (and roughly how many the chunk holds), for progress.

        Best-effort and bounded: the source's row count is a count that must finish within
        ``COUNT_TIMEOUT_MS`` (else it is reported unknown, None), never an exact ``count(*)``
        that may take minutes on a large chunk. The workflow ignores a failed sample: progress
        never fails a move.
        """
        spec = inp.spec
        if os.environ.get(FAIL_COPY_PROGRESS_ENV) == spec.collection:
            # Test hook: a progress sample that fails for good (an exact count that never
            # finishes in time would); the move must not care.
            raise ApplicationError("copy progress: failed (test hook)", non_retryable=True)
        source_dsn = await shard_dsn(self.ctx, spec.source) if inp.count_source else None
        target_dsn = await shard_dsn(self.ctx, spec.target)

        def work(stop: threading.Event) -> CopyProgress:
            total = (estimate_chunk_rows(source_dsn, spec.collection, spec.key_range,
                                         timeout_ms=COUNT_TIMEOUT_MS) if source_dsn else None)
            staged = inp.staging_id or spec.migration_id
            done = imported_parts(target_dsn, staged, timeout_ms=COUNT_TIMEOUT_MS)
            manifest = load_manifest(self.ctx.staging, staged)
            return CopyProgress(rows_total=total, rows_imported=sum(done.values()),
                                parts_imported=len(done),
                                parts_total=len(manifest.parts) if manifest else None)

        return await self.ctx.run_blocking(work)

    @activity.defn(name="migrate.bulk_import")
    async def bulk_import(self, inp: ImportInput) -> ImportResult:
        # Held in this worker's copy seat of the move; an import that ends frees it (the
        # copy is over: the export ended before it).
        move = seat_key()
        async with self.ctx.seats.use(move, activity.heartbeat), \
                shard_errors(self.ctx, inp.spec.target):
            result = await self._bulk_import(inp)
        self.ctx.seats.release(move)
        return result

    async def _bulk_import(self, inp: ImportInput) -> ImportResult:
        spec = inp.spec
        dsn = await shard_dsn(self.ctx, spec.target)
        staged = inp.staging_id or spec.migration_id
        state = {"cp": CopyCheckpoint(stage="import", rows_done=0, parts_done=0, parts_total=0)}

        labels = {"collection": spec.collection}
        live = {"migration": spec.migration_id}
        counted = {"rows": 0}
        started = time.monotonic()
        sampler = Sampler(self.ctx.catalog, spec.migration_id)
        last = {"t": started, "rows": -1}

        def sample(rows: int, *, final: bool = False) -> None:
            """A ``copy`` sample: rows on the target so far (the part in flight included) and
            rows per second since this attempt's previous sample."""
            if not sampler.due(SampleKind.COPY, "import", force=final):
                return
            now = time.monotonic()
            rate = (None if last["rows"] < 0
                    else max(0, rows - last["rows"]) / max(now - last["t"], 1e-3))
            last.update(t=now, rows=rows)
            sampler.add(MoveSample(at=utcnow(), kind=SampleKind.COPY, name="import", rows=rows,
                                   rate=rate))

        def work(stop: threading.Event) -> ImportResult:
            # Where this attempt starts (parts earlier attempts imported): the baseline of
            # its first rate. Best effort: without it the first rate is missing, nothing else.
            try:
                baseline: int | None = sum(imported_parts(dsn, staged).values())
            except Exception:  # noqa: BLE001 - a timeline sample never fails the import
                baseline = None
            if baseline is not None:
                sample(baseline, final=True)

            def progress(p: ImportProgress) -> None:
                state["cp"] = CopyCheckpoint(stage="import", rows_done=p.rows_done,
                                             parts_done=p.parts_done, parts_total=p.parts_total)
                sample(p.rows_done)
                if p.rows_committed_here > counted["rows"]:
                    metrics.rows_copied.add(p.rows_committed_here - counted["rows"], labels)
                    counted["rows"] = p.rows_committed_here
                    elapsed = time.monotonic() - started
                    if elapsed > 0:
                        metrics.copy_rate.set(p.rows_committed_here / elapsed, live)
                if stop.is_set():
                    raise Stopped()  # cancelled: stop between parts (a retry resumes)

            result = import_parts(dsn, spec.collection, self.ctx.staging, staged,
                                  progress=progress, follow_export_s=inp.follow_export_s,
                                  streams=self.ctx.import_streams)
            sample(result.rows_imported, final=True)
            metrics.log.info("imported %d parts into %s: %d rows (%d by this attempt, %d "
                             "streams) in %.1fs", result.parts_total, spec.target,
                             result.rows_imported, counted["rows"], self.ctx.import_streams,
                             time.monotonic() - started)
            return ImportResult(parts=result.parts_total, rows=result.rows_imported)

        try:
            async with sampler:
                return await self.ctx.run_blocking(work, lambda: state["cp"])
        except StagedPartError as exc:
            raise non_retryable(exc, "bulk import") from exc
