"""The change applier: a chunk's source transactions applied to the target, exactly once.

The apply loop
--------------
One :class:`ChangeApplier` per stream. It reads the source's committed transactions from
the slot (``change_stream.ChangeStream``), groups consecutive ones into a *batch* and applies
the batch in ONE target transaction:

1. ``pg_advisory_xact_lock(stream)`` and a read of the stream's control row (the hold);
2. the batch's changes, collapsed to the last change per ``(khash, id)`` (changes to
   different keys commute, so only each key's last change matters; a truncate drops every
   earlier change and deletes the chunk's range first), the deletes and upserts copied into a
   temporary table and applied as one ``DELETE ... USING`` and one ``INSERT ... ON CONFLICT
   DO UPDATE``, the keys the target cannot hold yet COPYed straight into the collection's
   table (``shards/postgres/apply_batch.py``; while the target runs them the applier reads
   and decodes the stream's next transactions);
3. ``pg_replication_origin_xact_setup(end_lsn_of_last_source_txn, its_commit_time)``;
4. the stream's state row (applied LSN, lag, markers seen) updated; a batch carrying a fence
   change also notifies ``STREAM_CHANNEL`` (a waiting cutover wakes at its commit);
5. COMMIT; then, and only then, feedback to the source (flush = the end LSN of the last
   batch whose commit is durable, see below).

A batch's COMMIT does not wait for the target's WAL flush (``SET LOCAL synchronous_commit =
off``, what PostgreSQL's own apply worker does by default) unless it carries a marker,
changes whether the stream is held, or comes ``flush_interval`` seconds after the last
commit that waited; state-row writes without data (heartbeats) always wait. A commit that
waits makes every earlier one durable too (the WAL is one sequence, and it waits for
whatever the target's ``synchronous_commit`` and standbys ask), so the feedback names only
what the last waiting commit covered: the source keeps the rest until then. A target that
crashes loses at most the batches after that commit, together with their origin progress
and state row (one commit record holds all three), and the stream sends them again.

Invariants
----------
* **Exactly once.** The stream's state row (step 4) commits atomically with the rows, so
  after any crash it says precisely which source transactions the target holds. The origin's
  progress (step 3) normally equals it, but it can run ahead after a killed applier (the
  aborted batch's origin LSN is committed by the backend's exit-time temp-table cleanup), so
  a starting applier moves the origin to the state row before it streams, also when the row
  has no applied LSN yet (the first batch died): then the origin goes back to "no progress"
  and the stream starts at the slot's confirmed position. A restarted applier asks the slot
  for the stream from that LSN, and
  drops any transaction whose end LSN is not beyond it (the server may resend from its own,
  older, confirmed position). A crash between the commit and the feedback therefore costs a
  resend, never a double apply; a crash before the commit loses nothing because the source
  keeps everything after the last feedback.
* **Feedback never runs ahead of the target's disk.** The flush LSN sent to the source is
  the end of the last batch a durable commit covers, or a keepalive position that arrived
  after every transaction already applied (nothing of ours lies before it), once no
  asynchronous commit is left unflushed. Since the server discards WAL only up to the flush
  LSN, the target's durable history plus the slot is always the full source history, also
  after the target crashes.
* **Order.** Batches are applied in commit order and each batch keeps, per key, the last
  change in source order, so the target passes through source states at batch boundaries
  only: after each commit it equals the source as of that batch's last commit.
* **No loops.** The applier's session runs under the stream's replication origin, so every
  row it writes carries the origin. A stream out of the target (the reverse stream) asks
  pgoutput for ``origin 'none'`` (PostgreSQL 16+) or drops transactions carrying an Origin
  message (PostgreSQL 15), so applied changes never travel back.
* **Throttled, not stalled.** With an :class:`~shards.postgres.throttle.ApplyThrottle` the
  applier leaves the stream unread while the source is busy (between batches; what it already
  read is still applied), but never while its stream lags more than the bound, while the
  chunk's fence on the source is frozen (the cutover's pause) or while a hold it has not
  reached is pending; see ``shards/postgres/throttle.py``. Feedback and the control row go
  on meanwhile.
* **One applier per stream.** A replication origin can be active in one session at a time
  and a slot streams to one walsender at a time; a second applier fails to start instead of
  interleaving with the first.

The applier's control surface (the state row, holds, waits) is
``shards/postgres/stream_control.py``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus
from pydantic import BaseModel, ConfigDict

from shards.models import KeyRange
from shards.names import check_collection
from shards.postgres.apply_batch import STAGING_DDL, BatchWriter, collapse
from shards.postgres.change_stream import ChangeStream
from shards.postgres.pgoutput import (
    FenceMarker,
    MessageMarker,
    Position,
    Transaction,
    lsn_from_str,
    lsn_to_str,
    pg_time_to_datetime,
)
from shards.postgres.replication import StreamNames, stream_names
from shards.postgres.stream_control import (
    STREAM_CHANNEL,
    StreamStateError,
    batch_lock_sql,
    ensure_apply_schema,
)
from shards.postgres.throttle import ApplyThrottle, ThrottleSettings

log = logging.getLogger(__name__)


class StreamSpec(BaseModel):
    """What a stream carries: one chunk of one collection, for one migration."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    migration_id: str
    part: str = "fwd"
    collection: str
    chunk_id: int
    key_range: KeyRange

    @property
    def names(self) -> StreamNames:
        return stream_names(self.migration_id, self.part)


@dataclass(slots=True)
class ApplierStats:
    """Counters of one :meth:`ChangeApplier.run` (lag samples are source commit to target
    commit, per applied source transaction)."""

    batches: int = 0
    applied_txns: int = 0
    applied_changes: int = 0
    rows_written: int = 0
    skipped_txns: int = 0
    applied_lsn: int = 0
    started_lsn: int = 0
    lag_samples: deque[float] = field(default_factory=lambda: deque(maxlen=500_000))
    applied_commit_lsns: deque[int] = field(default_factory=lambda: deque(maxlen=1_000_000))
    markers: list[tuple[int, FenceMarker | MessageMarker]] = field(default_factory=list)
    throttle_pauses: int = 0
    """Times the throttle paused the applier (see ``throttle``)."""
    throttled_s: float = 0.0
    """Time spent paused by the throttle."""
    async_commits: int = 0
    """Batches committed without waiting for the target's WAL flush (``flush_interval``)."""
    plain_insert_fallbacks: int = 0
    """Batches whose plain insert met a row it expected absent and upserted instead (a
    target written behind the applier's back; see ``shards/postgres/apply_batch.py``)."""
    decoder: str = ""
    """Which path read the stream: ``"c"`` (the accelerator) or ``"python"``
    (``ChangeStream.decoder_path``)."""


def _rollback(conn: psycopg.Connection[Any]) -> None:
    """End the batch's transaction after an error (what ``conn.transaction()`` did); a
    broken connection is left as it is (the applier closes it)."""
    if conn.closed or conn.pgconn.transaction_status not in (
            TransactionStatus.INTRANS, TransactionStatus.INERROR):
        return
    try:
        conn.execute("ROLLBACK")
    except psycopg.Error:
        log.debug("rollback after a failed batch failed", exc_info=True)


def _lsn_text(lsn: int | None) -> str | None:
    return lsn_to_str(lsn) if lsn else None


class ChangeApplier:
    """Streams one chunk from a source shard and applies it to a target shard.

    Args:
        spec: the stream (migration, part, collection, chunk, range).
        source_dsn: the shard the slot is on.
        target_dsn: the shard the changes are applied to (the collection's table must exist).
        max_batch_changes: upper bound on source changes per target transaction (a source
            transaction is never split, so one larger transaction is applied whole).
        control_interval: seconds between reads of the control row while idle or held.
        reply_interval: seconds between requests for the server's position while idle or
            waiting for a hold.
        heartbeat_interval: seconds between state-row refreshes while idle.
        flush_interval: the longest a batch's commit goes without waiting for the target's
            WAL flush: commits carrying data are asynchronous, and the first one after this
            many seconds since the last one that waited waits (see the module notes); the
            source learns only what a waiting commit covered. 0: every commit waits.
        after_commit: fault-injection hook for tests, called after a batch's target commit
            and before the feedback is sent (the window the exactly-once proof is about).
        on_batch: called after each applied batch with the stats (activity heartbeats).
        throttle: pause while the source is busy (``max_active``; see
            ``shards/postgres/throttle.py``); None or without ``max_active``: never.
    """

    def __init__(
        self,
        spec: StreamSpec,
        source_dsn: str,
        target_dsn: str,
        *,
        max_batch_changes: int = 50_000,
        max_pending_changes: int = 500_000,
        control_interval: float = 0.1,
        reply_interval: float = 0.2,
        heartbeat_interval: float = 1.0,
        flush_interval: float = 1.0,
        after_commit: Callable[[int], None] | None = None,
        on_batch: Callable[[ApplierStats], None] | None = None,
        throttle: ThrottleSettings | None = None,
    ) -> None:
        check_collection(spec.collection)
        self.spec = spec
        self.names = spec.names
        self.source_dsn = source_dsn
        self.target_dsn = target_dsn
        self.max_batch_changes = max_batch_changes
        self.max_pending_changes = max_pending_changes
        self.control_interval = control_interval
        self.reply_interval = reply_interval
        self.heartbeat_interval = heartbeat_interval
        self.flush_interval = flush_interval
        self.after_commit = after_commit
        self.on_batch = on_batch
        self.throttle_settings = throttle if throttle is not None and throttle.max_active \
            is not None else None
        self.throttle: ApplyThrottle | None = None
        """The running throttle (set by :meth:`run` when ``throttle`` has a load limit)."""
        self.stats = ApplierStats()
        self._pending: deque[Transaction | Position] = deque()
        self._pending_changes = 0
        self._applied_lsn = 0
        self._caught_up_lsn = 0
        self._durable_lsn = 0
        """What the last commit that waited for the flush covered (the feedback's limit)."""
        self._unflushed = False
        """Has a commit not waited for the flush since the last one that did?"""
        self._last_flush = 0.0
        self._hold: int | None = None
        self._held = False
        self._last_control = 0.0
        self._last_heartbeat = 0.0
        self._last_reply_request = 0.0
        self._lag_s = 0.0
        self._last_commit_us = 0
        self._pending_markers: list[tuple[int, FenceMarker | MessageMarker]] = []
        self._writer = BatchWriter(spec.collection, spec.key_range)
        self._read_paused = False

    @property
    def applied_lsn(self) -> int:
        """End LSN of the last source transaction committed on the target."""
        return self._applied_lsn

    @property
    def caught_up_lsn(self) -> int:
        """Every source transaction committing before this LSN is on the target."""
        return self._caught_up_lsn

    # -- setup -------------------------------------------------------------------------------

    def _open_target(self, timeout: float) -> psycopg.Connection[Any]:
        # UTF-8 on both ends: the documents go from the stream into the COPY as bytes.
        conn = psycopg.connect(self.target_dsn, autocommit=True, client_encoding="UTF8")
        try:
            ensure_apply_schema(conn)
            name = self.names.origin
            with conn.transaction():
                conn.execute(batch_lock_sql(), (name,))
                conn.execute(
                    "SELECT pg_replication_origin_create(%s) WHERE NOT EXISTS"
                    " (SELECT 1 FROM pg_replication_origin WHERE roname = %s)", (name, name),
                )
                conn.execute(
                    "INSERT INTO shardshift.stream_state (stream, migration_id) VALUES (%s, %s)"
                    " ON CONFLICT (stream) DO NOTHING", (name, self.spec.migration_id),
                )
            deadline = time.monotonic() + timeout
            while True:
                try:
                    conn.execute("SELECT pg_replication_origin_session_setup(%s)", (name,))
                    break
                except psycopg.errors.ObjectInUse:
                    # A crashed applier's backend may not have noticed its client is gone.
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            row = conn.execute(
                "SELECT pg_replication_origin_progress(%s, true)::text", (name,)
            ).fetchone()
            progress = lsn_from_str(row[0]) if row and row[0] else 0
            state = conn.execute(
                "SELECT applied_lsn::text, hold_at_lsn::text, held FROM shardshift.stream_state"
                " WHERE stream = %s", (name,),
            ).fetchone()
            assert state is not None
            truth = lsn_from_str(state[0]) if state[0] else 0
            if truth != progress:
                # The state row is the truth: it is written only by the transactions that
                # apply data. The origin can run ahead of the data: a batch that set
                # pg_replication_origin_xact_setup() and then aborted (its applier killed)
                # leaves the session's origin LSN set, and the backend's exit-time cleanup
                # of its temp table commits with it, advancing the origin past transactions
                # that never landed (seen in pg_waldump: ABORT then a COMMIT dropping the
                # temp table, both carrying the origin). That holds for the very first batch
                # too: a row with no applied LSN says "nothing applied", and the origin goes
                # back to 0/0 (no progress), so the stream restarts at the slot's confirmed
                # position, which feedback never moved past an unapplied transaction.
                # Rewind (or forward) the origin to the row; re-applying from there is
                # idempotent.
                log.warning("stream %s: replication origin at %s but stream_state.applied_lsn"
                            " at %s; the origin follows the state row", name,
                            lsn_to_str(progress), state[0] or "none (no batch applied)")
                conn.execute("SELECT pg_replication_origin_session_reset()")
                conn.execute("SELECT pg_replication_origin_advance(%s, %s::pg_lsn)",
                             (name, lsn_to_str(truth)))
                conn.execute("SELECT pg_replication_origin_session_setup(%s)", (name,))
                progress = truth
            conn.execute("SELECT set_config('application_name', %s, false)",
                         (f"shardshift-apply {name}"[:63],))
            conn.execute(STAGING_DDL)
            conn.execute(
                "UPDATE shardshift.stream_state SET applier_pid = pg_backend_pid(),"
                " updated_at = now() WHERE stream = %s", (name,),
            )
            self._applied_lsn = progress
            self._caught_up_lsn = progress
            self._durable_lsn = progress  # pg_replication_origin_progress(..., true) flushed
            self._last_flush = time.monotonic()
            self._hold = lsn_from_str(state[1]) if state[1] else None
            self._held = bool(state[2])
            self.stats.applied_lsn = progress
            self.stats.started_lsn = progress
            return conn
        except BaseException:
            conn.close()
            raise

    # -- the loop ------------------------------------------------------------------------------

    def run(
        self,
        stop: threading.Event | None = None,
        *,
        until: Callable[[ChangeApplier], bool] | None = None,
        startup_timeout: float = 30.0,
        start_lsn: int | None = None,
    ) -> ApplierStats:
        """Apply until ``stop`` is set (or ``until(self)`` is true); returns the stats.

        Blocking; run it in a worker thread. Any error propagates after the connections are
        closed; rerunning resumes exactly where the target's origin says.

        Args:
            start_lsn: where to ask the server to start instead of the origin's progress
                (diagnostics and tests; 0 means the slot's confirmed position). Whatever is
                asked, transactions the origin already has are skipped.
        """
        stop = stop or threading.Event()
        conn = self._open_target(startup_timeout)
        if self.throttle_settings is not None:
            self.throttle = ApplyThrottle(self.throttle_settings, source_dsn=self.source_dsn,
                                          collection=self.spec.collection,
                                          chunk_id=self.spec.chunk_id, stop=stop)
        try:
            stream = ChangeStream(
                self.source_dsn, self.names, self.spec.collection, self.spec.chunk_id,
                self.spec.key_range,
                start_lsn=self._applied_lsn if start_lsn is None else start_lsn,
            )
            with stream:
                self._stream = stream
                self.stats.decoder = stream.decoder_path
                while not stop.is_set():
                    if until is not None and until(self):
                        break
                    self._cycle(conn, stream)
                self._flush_at_stop(conn, stream)
        finally:
            conn.close()
            if self.throttle is not None:
                self.throttle.close()
                self._throttle_stats()
        return self.stats

    def _flush_at_stop(self, conn: psycopg.Connection[Any], stream: ChangeStream) -> None:
        """A stopping applier makes its batches durable and tells the source: the next one
        then resumes where this one ended, not at its last flushed commit (the walsender
        would decode everything after that again)."""
        if not self._unflushed:
            return
        # With flush => true the target's WAL is flushed through the origin's last commit,
        # this session's last batch.
        conn.execute("SELECT pg_replication_origin_progress(%s, true)", (self.names.origin,))
        self._durable_lsn = self._caught_up_lsn
        self._unflushed = False
        if self._durable_lsn:
            stream.confirm(self._durable_lsn)

    def _throttle_stats(self) -> None:
        t = self.throttle
        if t is not None:
            self.stats.throttle_pauses = t.pauses
            self.stats.throttled_s = t.paused_s

    def _paused(self) -> bool:
        """Should this cycle leave the stream unread (the throttle)?"""
        t = self.throttle
        if t is None:
            return False
        paused = t.should_pause(max(self._caught_up_lsn, self._applied_lsn),
                                hold_pending=self._hold is not None and not self._held)
        self._throttle_stats()
        return paused

    def _cycle(self, conn: psycopg.Connection[Any], stream: ChangeStream) -> None:
        ready = self._ready_txn()
        paused = self._read_paused = self._paused()
        if paused:
            # Throttled: leave the stream in the server's socket (the walsender stops
            # decoding once it is full); keep the session alive.
            stream.maybe_send_status()
        elif ready and self._pending_changes >= self.max_batch_changes:
            # A full batch is waiting: apply it first (the stream is read while the target
            # works on it, see _pump).
            stream.maybe_send_status()
        elif self._pending_changes < self.max_pending_changes:
            # Read about one batch before applying, so the target starts early and the
            # rest is decoded while it works.
            room = self.max_batch_changes - self._pending_changes
            self._receive(stream.poll(0.0 if ready else self.control_interval,
                                      max_changes=room if room > 0 else None))
        else:
            # Backpressure: leave the rest in the server's socket; keep the session alive.
            stream.maybe_send_status()
        now = time.monotonic()
        if self._ready_txn() or self._pending or now - self._last_control >= self.control_interval:
            self._step(conn, stream)
        waiting_hold = self._hold is not None and not self._held
        idle = not self._pending
        if ((waiting_hold or idle) and not paused
                and now - self._last_reply_request > self.reply_interval):
            # Learn the server's position promptly: an idle chunk's caught-up position (and
            # the slot's confirmed position, which frees WAL) advance only with it, and it
            # decides whether a hold is reached.
            self._last_reply_request = now
            stream.request_reply()
        if self._ready_txn():
            return
        if paused:
            assert self.throttle is not None
            self.throttle.wait(self.control_interval)  # ends early on a fence change or stop
        elif self._pending_changes >= self.max_pending_changes:
            time.sleep(self.control_interval)  # held with a full buffer: wait for release

    def _receive(self, items: Sequence[Transaction | Position]) -> None:
        for item in items:
            self._pending.append(item)
            if isinstance(item, Transaction):
                self._pending_changes += len(item.changes)

    def _pump(self) -> bool:
        """Read what the stream has buffered while the target applies a batch (the same
        reads :meth:`_cycle` makes; never while throttled or with a full buffer)."""
        if self._read_paused or self._pending_changes >= self.max_pending_changes:
            return False
        self._receive(self._stream.poll(0.0))
        return self._pending_changes < self.max_pending_changes

    def _ready_txn(self) -> bool:
        """Is there a pending transaction the current hold allows to apply?"""
        for item in self._pending:
            if isinstance(item, Transaction):
                return self._hold is None or item.commit_lsn < self._hold
        return False

    def _take_batch(self) -> tuple[list[Transaction], int]:
        """Pending transactions for one batch (in order, within the hold) and the highest
        position consumed with them."""
        txns: list[Transaction] = []
        position = 0
        n = 0
        pending = self._pending
        while pending:
            item = pending[0]
            if isinstance(item, Position):
                pending.popleft()
                position = max(position, item.lsn)
                continue
            if item.end_lsn <= self._applied_lsn:
                # Resent after a crash between target commit and feedback: already applied.
                pending.popleft()
                self._pending_changes -= len(item.changes)
                self.stats.skipped_txns += 1
                position = max(position, item.end_lsn)
                continue
            if self._hold is not None and item.commit_lsn >= self._hold:
                break
            if txns and n + len(item.changes) > self.max_batch_changes:
                break
            pending.popleft()
            self._pending_changes -= len(item.changes)
            txns.append(item)
            n += len(item.changes)
        return txns, position

    def _step(self, conn: psycopg.Connection[Any], stream: ChangeStream) -> None:
        name = self.names.origin
        now = time.monotonic()
        self._last_control = now
        # The transaction is begun and ended by hand (the connection is in autocommit) so
        # that BEGIN travels with the batch lock and the control row's read, and COMMIT with
        # the state row: two round trips for a batch without rows (the one carrying a
        # cutover's freeze marker) instead of five. Pipelined statements still run one after
        # the other, each in its own snapshot: the read follows the lock as before.
        try:
            with conn.pipeline():
                conn.execute("BEGIN")
                conn.execute(batch_lock_sql(), (name,))
                row = conn.execute(
                    "SELECT hold_at_lsn::text FROM shardshift.stream_state WHERE stream = %s",
                    (name,),
                ).fetchone()
            if row is None:
                raise StreamStateError(f"stream {name}: its stream_state row was deleted")
            hold = lsn_from_str(row[0]) if row[0] else None
            if hold != self._hold:
                self._hold = hold
                self._held = False
            txns, position = self._take_batch()
            if txns:
                self._apply(conn, stream, txns)
            # Positions are consumed only behind applied transactions (see _take_batch), so
            # once this commits everything before them is on the target.
            self._caught_up_lsn = max(self._caught_up_lsn, self._applied_lsn, position)
            held = self._reached_hold(stream)
            heartbeat = now - self._last_heartbeat >= self.heartbeat_interval
            wrote = bool(txns) or held != self._held or heartbeat
            # Only a batch of data nobody waits for leaves its flush to the WAL writer (see
            # the module notes).
            waits = wrote and (not txns or bool(self._pending_markers) or held != self._held
                               or now - self._last_flush >= self.flush_interval)
            if wrote:
                # The origin's progress, the markers, the state row and COMMIT in one round
                # trip (pipeline: sent together, in this order, answered at the end; an error
                # skips the rest, COMMIT included).
                with conn.pipeline():
                    if txns:
                        last = txns[-1]
                        conn.execute(
                            "SELECT pg_replication_origin_xact_setup(%s::pg_lsn, %s)",
                            (lsn_to_str(last.end_lsn), pg_time_to_datetime(last.commit_time_us)),
                        )
                    self._write_state(conn, stream, txns, held)
                    if not waits:
                        conn.execute("SET LOCAL synchronous_commit = off")
                    conn.execute("COMMIT")
                self._held = held
                self._last_heartbeat = now
            else:
                conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        if waits:
            # This commit flushed the WAL through its own record: every batch before it too.
            self._durable_lsn = self._caught_up_lsn
            self._unflushed = False
            self._last_flush = now
        elif wrote:
            self._unflushed = True
            self.stats.async_commits += 1
        elif not self._unflushed:
            # Nothing applied since the last flushed commit: the positions consumed are as
            # durable as it is.
            self._durable_lsn = self._caught_up_lsn
        commit_wall = time.time()
        if txns:
            end = txns[-1].end_lsn
            for txn in txns:
                self.stats.lag_samples.append(commit_wall - txn.commit_time_unix)
                self.stats.applied_commit_lsns.append(txn.commit_lsn)
            self.stats.markers.extend(self._pending_markers)
            self._pending_markers = []
            self.stats.batches += 1
            self.stats.applied_lsn = end
            if self.after_commit is not None:
                self.after_commit(end)
        # Feedback strictly after a commit that waited for the flush (see the module notes).
        if self._durable_lsn:
            stream.confirm(self._durable_lsn)
        if txns and self.on_batch is not None:
            self.on_batch(self.stats)

    def _reached_hold(self, stream: ChangeStream) -> bool:
        if self._hold is None:
            return False
        if self._ready_txn():
            return False
        # The stream has delivered a transaction or a position at or past the hold, and no
        # transaction before the hold is still pending: nothing committing before it can come.
        return stream.received_lsn >= self._hold or self._applied_lsn >= self._hold

    def _apply(self, conn: psycopg.Connection[Any], stream: ChangeStream,
               txns: Sequence[Transaction]) -> None:
        batch = collapse(txns)
        self._writer.write(conn, batch, self._pump, stream.fileno())
        self.stats.plain_insert_fallbacks = self._writer.fallbacks
        last = txns[-1]
        # The origin's progress (pg_replication_origin_xact_setup) is set by _step, with the
        # state row.
        self._applied_lsn = last.end_lsn
        self._last_commit_us = last.commit_time_us
        self._lag_s = max(0.0, time.time() - last.commit_time_unix)
        self._pending_markers = batch.markers
        self.stats.applied_txns += len(txns)
        self.stats.applied_changes += batch.changes
        self.stats.rows_written += len(batch.rows)

    def _write_state(self, conn: psycopg.Connection[Any], stream: ChangeStream,
                     txns: Sequence[Transaction], held: bool) -> None:
        name = self.names.origin
        fence: tuple[int, FenceMarker] | None = None
        message: tuple[int, MessageMarker] | None = None
        for ord_, (lsn, marker) in enumerate(self._pending_markers):
            if isinstance(marker, FenceMarker):
                fence = (lsn, marker)
                body: dict[str, Any] = {
                    "collection": marker.collection, "chunk_id": marker.chunk_id,
                    "token": marker.token, "state": marker.state, "deleted": marker.deleted,
                }
                kind = "fence"
            else:
                message = (lsn, marker)
                body = {"prefix": marker.prefix, "lsn": lsn_to_str(marker.lsn),
                        "content": marker.content.decode(errors="replace")}
                kind = "message"
            # A fence change also notifies STREAM_CHANNEL (delivered at this batch's commit,
            # in the same statement): the cutover waiting for its freeze wakes at once.
            conn.execute(
                "WITH m AS (INSERT INTO shardshift.stream_markers"
                " (stream, commit_lsn, ord, kind, body)"
                " VALUES (%s, %s::pg_lsn, %s, %s, %s::jsonb) ON CONFLICT DO NOTHING)"
                " SELECT pg_notify(%s, %s) WHERE %s",
                (name, lsn_to_str(lsn), ord_, kind, json.dumps(body), STREAM_CHANNEL, name,
                 kind == "fence"),
            )
        if txns:
            lag = self._lag_s
        else:
            oldest = next((i for i in self._pending if isinstance(i, Transaction)), None)
            lag = 0.0 if oldest is None else max(0.0, time.time() - oldest.commit_time_unix)
        params: dict[str, Any] = {
            "s": name,
            "applied": _lsn_text(self._applied_lsn),
            "commit_at": pg_time_to_datetime(self._last_commit_us) if self._last_commit_us else None,
            "caught_up": _lsn_text(self._caught_up_lsn),
            "source": _lsn_text(max(stream.server_lsn, stream.received_lsn)),
            "lag": lag,
            "held": held,
            "f_lsn": _lsn_text(fence[0]) if fence else None,
            "f_token": fence[1].token if fence else None,
            "f_state": (("deleted" if fence[1].deleted else fence[1].state) if fence else None),
            "marker": json.dumps({"lsn": lsn_to_str(message[0]),
                                  "content": message[1].content.decode(errors="replace")})
            if message else None,
        }
        conn.execute(
            "UPDATE shardshift.stream_state SET"
            " applied_lsn = %(applied)s::pg_lsn,"
            " applied_commit_at = coalesce(%(commit_at)s, applied_commit_at),"
            " caught_up_lsn = %(caught_up)s::pg_lsn,"
            " source_lsn = %(source)s::pg_lsn,"
            " lag_s = %(lag)s, held = %(held)s,"
            " fence_lsn = CASE WHEN %(f_lsn)s::pg_lsn IS NULL THEN fence_lsn ELSE %(f_lsn)s::pg_lsn END,"
            " fence_token = CASE WHEN %(f_lsn)s::pg_lsn IS NULL THEN fence_token ELSE %(f_token)s END,"
            " fence_state = CASE WHEN %(f_lsn)s::pg_lsn IS NULL THEN fence_state ELSE %(f_state)s END,"
            " last_marker = coalesce(%(marker)s::jsonb, last_marker),"
            " updated_at = now()"
            " WHERE stream = %(s)s",
            params,
        )


__all__ = ["ApplierStats", "ChangeApplier", "StreamSpec"]
