"""Phase 3: load the staged parts into the target with binary COPY, part by part.

Each part commits with its progress row, so a retry (a crashed worker, a target that was
down) resumes at the first missing part. The import follows the export, so both phases run
at once.
"""

from __future__ import annotations

import os
import threading

import psycopg
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.context import MoveContext, Stopped, non_retryable
from activities.models import (
    CopyCheckpoint,
    CopyProgress,
    CopyProgressInput,
    ImportInput,
    ImportResult,
)
from shards.postgres.bulk_import import ImportProgress, StagedPartError, done_parts, import_parts
from shards.postgres.snapshot import load_manifest

FAIL_COPY_PROGRESS_ENV = "SHARDSHIFT_TEST_FAIL_COPY_PROGRESS"
"""Test hook: ``copy_progress`` of the collection named here fails for good."""


class ImportActivities:
    def __init__(self, ctx: MoveContext) -> None:
        self.ctx = ctx

    @activity.defn(name="migrate.copy_progress")
    async def copy_progress(self, inp: CopyProgressInput) -> CopyProgress:
        """Rows and parts imported so far (and the source chunk's size), for progress."""
        spec = inp.spec
        if os.environ.get(FAIL_COPY_PROGRESS_ENV) == spec.collection:
            # Test hook: a progress sample that fails for good (an exact count that never
            # finishes in time would); the move must not care.
            raise ApplicationError("copy progress: failed (test hook)", non_retryable=True)
        total = None
        if inp.count_source:
            total = await (await self.ctx.engine(spec.source)).count(spec.collection, spec.key_range)
        dsn = await self.ctx.dsn(spec.target)

        def work(stop: threading.Event) -> CopyProgress:
            with psycopg.connect(dsn, autocommit=True) as conn:
                done = done_parts(conn, spec.migration_id)
            manifest = load_manifest(self.ctx.staging, spec.migration_id)
            return CopyProgress(rows_total=total, rows_imported=sum(done.values()),
                                parts_imported=len(done),
                                parts_total=len(manifest.parts) if manifest else None)

        return await self.ctx.run_blocking(work)

    @activity.defn(name="migrate.bulk_import")
    async def bulk_import(self, inp: ImportInput) -> ImportResult:
        spec = inp.spec
        dsn = await self.ctx.dsn(spec.target)
        state = {"cp": CopyCheckpoint(stage="import", rows_done=0, parts_done=0, parts_total=0)}

        def work(stop: threading.Event) -> ImportResult:
            def progress(p: ImportProgress) -> None:
                state["cp"] = CopyCheckpoint(stage="import", rows_done=p.rows_done,
                                             parts_done=p.parts_done, parts_total=p.parts_total)
                if stop.is_set():
                    raise Stopped()  # cancelled: stop between parts (a retry resumes)

            result = import_parts(dsn, spec.collection, self.ctx.staging, spec.migration_id,
                                  progress=progress, follow_export_s=inp.follow_export_s)
            return ImportResult(parts=result.parts_total, rows=result.rows_imported)

        try:
            return await self.ctx.run_blocking(work, lambda: state["cp"])
        except StagedPartError as exc:
            raise non_retryable(exc, "bulk import") from exc
