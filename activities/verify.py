"""Phase 5: prove source and target equal at one consistent point, repairing what differs.

1. Take the migration's verify lock on the target (:class:`VerifyLock`): an earlier attempt
   that is still running (its heartbeat timed out, its worker is slow to notice the cancel)
   ends first. Every target write below goes through the lock's session.
2. Pause the applier where it is (``request_hold(None)``).
3. Take an exported snapshot of the source through a short-lived slot: its consistent point
   is L, and the snapshot shows exactly the transactions committed before L.
4. Move the hold to L and wait until the applier holds there: the target now equals what the
   source looked like at L, if the copy is right.
5. Checksum both sides per khash bucket (on the servers, in parallel), compare, re-copy every
   mismatched bucket from the snapshot into the target (one target transaction each), and
   checksum those again, up to ``max_repair_rounds``.
6. Drop the verification slot and release the hold (also when anything fails), then the lock.

Invariants
----------
* **One attempt at a time.** Two attempts of one migration never interleave: without the
  lock a second attempt would drop the first one's slot (killing its snapshot) and the first
  one's clean-up would release the second one's hold in the middle of its compare.
* **Never behind the applier.** A target checksum counts only if its snapshot sees the
  applier held at L, and a repair commits only while the hold at L is pinned in its own
  transaction (``shards.postgres.checksum``). Whatever takes the hold away (a stale attempt,
  an operator), the attempt fails (retryably) instead of writing the bucket as of L over
  newer data that the applier will never send again.
* **Stops when asked.** The blocking work checks its stop event between steps and buckets,
  and a statement running on a server is cancelled there; a cancelled attempt ends within
  seconds, releasing its hold, slot and lock.
"""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from temporalio import activity

from activities import metrics
from activities.availability import shard_errors
from activities.context import MoveContext, Stopped, non_retryable, raise_catalog_failure
from activities.models import Direction, MoveSpec, VerifyInput, VerifyResult
from activities.replicate import stream_spec
from activities.timeline import mark
from catalog.errors import CatalogError
from catalog.models import VerificationKind, VerificationReport
from catalog.timeline import MarkName
from shards.models import KeyRange
from shards.postgres import replication as repl
from shards.postgres.checksum import (
    VerifyLock,
    checksum_range,
    diff_checksums,
    range_digest,
    recopy_range,
)
from shards.postgres.stream_control import StopRequested, StreamHold, request_hold, wait_held


class VerifyActivities:
    def __init__(self, ctx: MoveContext) -> None:
        self.ctx = ctx

    @activity.defn(name="migrate.verify")
    async def verify(self, inp: VerifyInput) -> VerifyResult:
        spec = inp.spec
        source_dsn, target_dsn = await self.ctx.dsn(spec.source), await self.ctx.dsn(spec.target)
        names = stream_spec(spec, Direction.FORWARD).names
        vnames = repl.stream_names(spec.migration_id, "ver")
        c, rng = spec.collection, spec.key_range
        progress = {"stage": "taking the verify lock"}

        def stage(text: str, stop: threading.Event) -> None:
            if stop.is_set():
                raise Stopped(f"verify stopped before: {text}")
            progress["stage"] = text

        def work(stop: threading.Event) -> VerifyResult:
            try:
                with VerifyLock(target_dsn, spec.migration_id) as lock:
                    lock.acquire(stop, on_wait=lambda: progress.update(
                        stage="waiting for a previous verify attempt to end"))
                    return held_work(lock, stop)
            except StopRequested as exc:
                raise Stopped(str(exc)) from exc

        def held_work(lock: VerifyLock, stop: threading.Event) -> VerifyResult:
            stage("pausing applier", stop)
            request_hold(target_dsn, names, None, conn=lock.conn)
            try:
                # An earlier attempt's slot: that attempt has ended (we hold the lock).
                repl.drop_slot(source_dsn, vnames.slot)
                with repl.create_slot(source_dsn, vnames, export_snapshot=True) as slot:
                    lsn = slot.consistent_lsn
                    stage(f"holding applier at {lsn}", stop)
                    request_hold(target_dsn, names, lsn, conn=lock.conn)
                    wait_held(target_dsn, names, lsn, timeout=inp.hold_timeout_s, stop=stop)
                    result = _compare_and_repair(lock, stop, slot.snapshot_name,
                                                 StreamHold(names, lsn))
            except BaseException:
                with contextlib.suppress(Exception):
                    _clean_up(lock)
                raise
            _clean_up(lock)
            return result

        def _clean_up(lock: VerifyLock) -> None:
            try:
                repl.drop_slot(source_dsn, vnames.slot)
            finally:
                lock.release_hold(names)  # also when a stop's cancel landed late

        def _compare_and_repair(lock: VerifyLock, stop: threading.Event, snapshot: str | None,
                                hold: StreamHold) -> VerifyResult:
            ranges: list[KeyRange] = [rng]
            repaired = mismatched_first = rounds = 0
            documents = 0
            digest: str | None = None
            with ThreadPoolExecutor(2) as pool:
                for rounds in range(1, inp.max_repair_rounds + 2):
                    mismatched: list[KeyRange] = []
                    for r in ranges:
                        stage(f"checksumming (round {rounds})", stop)
                        buckets = inp.buckets if r == rng else max(1, min(inp.buckets, 16))
                        fs = pool.submit(checksum_range, source_dsn, c, r, buckets=buckets,
                                         snapshot=snapshot, parallel_workers=1, stop=stop)
                        ft = pool.submit(checksum_range, target_dsn, c, r, buckets=buckets,
                                         parallel_workers=1, held=hold, stop=stop)
                        a, b = fs.result(), ft.result()
                        if r == rng:
                            documents = a.count
                            digest = range_digest(a)
                        mismatched += diff_checksums(a, b)
                    if rounds == 1:
                        mismatched_first = len(mismatched)
                    if not mismatched:
                        return VerifyResult(verified=True, documents=documents,
                                            buckets=inp.buckets, mismatched_buckets=mismatched_first,
                                            repaired_ranges=repaired, rounds=rounds, lsn=hold.lsn,
                                            digest=digest)
                    if rounds > inp.max_repair_rounds:
                        break
                    for r in mismatched:
                        stage(f"re-copying {len(mismatched)} ranges", stop)
                        recopy_range(source_dsn, target_dsn, c, r, snapshot=snapshot, held=hold,
                                     target_conn=lock.conn, stop=stop)
                        repaired += 1
                    ranges = mismatched
            return VerifyResult(verified=False, documents=documents, buckets=inp.buckets,
                                mismatched_buckets=mismatched_first, repaired_ranges=repaired,
                                rounds=rounds, lsn=hold.lsn, digest=digest)

        # A connection failure because a shard is down becomes ``ShardUnavailable``: the
        # workflow pauses the move (and gives up on a target that stays away).
        await mark(self.ctx.catalog, spec.migration_id, MarkName.VERIFY_START)
        started = time.monotonic()
        async with shard_errors(self.ctx, inp.spec.source, inp.spec.target):
            result = await self.ctx.run_blocking(work, lambda: dict(progress))
        result = await self._record(spec, result.model_copy(
            update={"seconds": round(time.monotonic() - started, 3)}), inp.max_repair_rounds)
        await mark(self.ctx.catalog, spec.migration_id, MarkName.VERIFY_DONE,
                   value=result.mismatched_buckets,
                   detail=f"{result.documents} documents, {result.mismatched_buckets} of "
                          f"{result.buckets} buckets differed, {result.repaired_ranges} ranges "
                          f"repaired: {'equal' if result.verified else 'still different'}")
        labels = {"collection": spec.collection}
        metrics.verify_mismatches.add(result.mismatched_buckets, labels)
        metrics.verify_repairs.add(result.repaired_ranges, labels)
        metrics.log.info("verify: %d documents, %d mismatched buckets, %d ranges repaired, %s",
                         result.documents, result.mismatched_buckets, result.repaired_ranges,
                         "equal" if result.verified else "still different")
        if not result.verified:
            raise non_retryable(
                RuntimeError(f"{result.mismatched_buckets} buckets still differ after "
                             f"{inp.max_repair_rounds} repair rounds"), "verify",
            )
        return result

    async def _record(self, spec: MoveSpec, result: VerifyResult,
                      max_rounds: int) -> VerifyResult:
        """Record the attempt's report in the catalog (``shardshift verify --show``). A catalog
        that cannot take it fails the attempt retryably: the next attempt verifies again."""
        report = VerificationReport(
            kind=VerificationKind.MOVE, collection=spec.collection, chunk_id=spec.chunk_id,
            shard_id=spec.target, source=spec.source, migration_id=spec.migration_id,
            lsn=result.lsn, buckets=result.buckets, documents=result.documents,
            mismatched_buckets=result.mismatched_buckets,
            repaired_ranges=result.repaired_ranges, rounds=result.rounds, digest=result.digest,
            ok=result.verified, seconds=result.seconds,
            detail=None if result.verified else
            f"buckets still differ after {max_rounds} repair rounds",
        )
        try:
            stored = await self.ctx.catalog.record_verification(report)
        except CatalogError as exc:
            raise_catalog_failure(exc, "recording the verification report")
        return result.model_copy(update={"verification_id": stored.verification_id})

