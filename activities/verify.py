"""Phase 5: prove source and target equal at one consistent point, repairing what differs.

1. Pause the applier where it is (``request_hold(None)``).
2. Take an exported snapshot of the source through a short-lived slot: its consistent point
   is L, and the snapshot shows exactly the transactions committed before L.
3. Move the hold to L and wait until the applier holds there: the target now equals what the
   source looked like at L, if the copy is right.
4. Checksum both sides per khash bucket (on the servers, in parallel), compare, re-copy every
   mismatched bucket from the snapshot into the target (one target transaction each), and
   checksum those again, up to ``max_repair_rounds``.
5. Drop the verification slot and release the hold (also when anything fails).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from temporalio import activity

from activities.context import MoveContext, non_retryable
from activities.models import Direction, VerifyInput, VerifyResult
from activities.replicate import stream_spec
from shards.models import KeyRange
from shards.postgres import replication as repl
from shards.postgres.apply import release_hold, request_hold, wait_held
from shards.postgres.checksum import checksum_range, diff_checksums, recopy_range


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
        progress = {"stage": "pausing applier"}

        def work(stop: threading.Event) -> VerifyResult:
            request_hold(target_dsn, names, None)
            try:
                repl.drop_slot(source_dsn, vnames.slot)  # a crashed earlier attempt's
                with repl.create_slot(source_dsn, vnames, export_snapshot=True) as slot:
                    lsn = slot.consistent_lsn
                    progress["stage"] = f"holding applier at {lsn}"
                    request_hold(target_dsn, names, lsn)
                    wait_held(target_dsn, names, lsn, timeout=inp.hold_timeout_s)
                    return _compare_and_repair(slot.snapshot_name, lsn)
            finally:
                repl.drop_slot(source_dsn, vnames.slot)
                release_hold(target_dsn, names)

        def _compare_and_repair(snapshot: str | None, lsn: str) -> VerifyResult:
            ranges: list[KeyRange] = [rng]
            repaired = mismatched_first = rounds = 0
            documents = 0
            with ThreadPoolExecutor(2) as pool:
                for rounds in range(1, inp.max_repair_rounds + 2):
                    progress["stage"] = f"checksumming (round {rounds})"
                    mismatched: list[KeyRange] = []
                    for r in ranges:
                        buckets = inp.buckets if r == rng else max(1, min(inp.buckets, 16))
                        fs = pool.submit(checksum_range, source_dsn, c, r, buckets=buckets,
                                         snapshot=snapshot, parallel_workers=1)
                        ft = pool.submit(checksum_range, target_dsn, c, r, buckets=buckets,
                                         parallel_workers=1)
                        a, b = fs.result(), ft.result()
                        if r == rng:
                            documents = a.count
                        mismatched += diff_checksums(a, b)
                    if rounds == 1:
                        mismatched_first = len(mismatched)
                    if not mismatched:
                        return VerifyResult(verified=True, documents=documents,
                                            buckets=inp.buckets, mismatched_buckets=mismatched_first,
                                            repaired_ranges=repaired, rounds=rounds, lsn=lsn)
                    if rounds > inp.max_repair_rounds:
                        break
                    progress["stage"] = f"re-copying {len(mismatched)} ranges"
                    for r in mismatched:
                        recopy_range(source_dsn, target_dsn, c, r, snapshot=snapshot)
                        repaired += 1
                    ranges = mismatched
            return VerifyResult(verified=False, documents=documents, buckets=inp.buckets,
                                mismatched_buckets=mismatched_first, repaired_ranges=repaired,
                                rounds=rounds, lsn=lsn)

        result = await self.ctx.run_blocking(work, lambda: dict(progress))
        if not result.verified:
            raise non_retryable(
                RuntimeError(f"{result.mismatched_buckets} buckets still differ after "
                             f"{inp.max_repair_rounds} repair rounds"), "verify",
            )
        return result
