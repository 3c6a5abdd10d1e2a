"""The change stream of a chunk: a walsender connection on its slot, decoding and feedback.

:class:`ChangeStream` connects to the source in replication mode, starts pgoutput on the
stream's slot (``shards/postgres/replication.py`` makes the publication and the slot and
names them), decodes the chunk's transactions and keepalive positions, and sends the standby
status updates that let the server discard WAL. Its owner is the applier
(``shards/postgres/apply.py``).

Invariants
----------
1. Everything the server sends arrives in commit order, and a keepalive's ``walEnd`` (the
   decoder's position) is sent after every transaction that commits before it. So once every
   transaction received before a keepalive has been applied, the keepalive's position is
   applied too (:class:`~shards.postgres.pgoutput.Position`). A keepalive that arrives in the
   middle of a transaction is *not* turned into a position: the decoder has already read that
   transaction's commit, so the position would run ahead of unapplied data.
2. Feedback (the flush LSN in a standby status update) is the only thing that lets the server
   discard WAL and never resend it. :class:`ChangeStream` sends exactly what its owner passes
   to :meth:`ChangeStream.confirm`, and the applier calls it only after the target committed
   everything before that LSN. A crash before feedback costs a resend, which the applier skips
   by its origin's progress; feedback before the target commit could lose a write.
3. On PostgreSQL 16+ the stream asks pgoutput for ``origin 'none'``: transactions that an
   applier wrote under a replication origin are never sent, so a reverse stream never echoes
   the forward stream back. PostgreSQL 15's pgoutput has no such option; it sends an
   ``Origin`` message in those transactions and the decoder drops them whole.
"""

from __future__ import annotations

import select
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from psycopg import pq

from shards.models import KeyRange
from shards.postgres import _accel
from shards.postgres.pgoutput import (
    ChunkDecoder,
    Position,
    ProtocolError,
    Transaction,
    Upsert,
    lsn_to_str,
    unix_to_pg_time,
)
from shards.postgres.replication import (
    ReplicationError,
    SlotMissingError,
    StreamNames,
    open_walsender,
)

_STATUS = struct.Struct(">cqqqqb")
_KEEPALIVE = struct.Struct(">qqb")


class _SlotBusy(ReplicationError):
    """The slot is active in another walsender (SQLSTATE 55006)."""


@dataclass(slots=True)
class StreamStats:
    frames: int = 0
    transactions: int = 0
    keepalives: int = 0
    feedback_sent: int = 0
    bytes: int = 0
    skipped_foreign: int = 0


@dataclass
class ChangeStream:
    """A streaming walsender connection on one slot, decoded to one chunk's transactions.

    Single-threaded: the owner calls :meth:`poll` to receive and :meth:`confirm` once the
    target has committed, from the same thread.

    Args:
        dsn: the source shard.
        names: the stream's names (slot, publication, message prefix).
        collection, chunk_id, key_range: the chunk.
        start_lsn: where to resume (the applier's origin progress); 0 starts at the slot's
            confirmed position. The server never starts before that position, whatever is
            asked.
        status_interval: seconds between unprompted standby status updates (keeps the
            server's ``wal_sender_timeout`` from firing while the applier is busy or held).
    """

    dsn: str
    names: StreamNames
    collection: str
    chunk_id: int
    key_range: KeyRange
    start_lsn: int = 0
    status_interval: float = 5.0
    stats: StreamStats = field(default_factory=StreamStats)
    server_lsn: int = 0
    """Latest decoder position the server reported (keepalive ``walEnd``)."""
    received_lsn: int = 0
    """End of the last complete transaction (or position) received."""
    confirmed_lsn: int = 0
    """What the last status update told the server is durably applied."""
    server_version: int = 0
    decoder_path: str = "python"
    """``"c"`` when the C accelerator reads and decodes the hot frames (shards/postgres/
    _accel.py), ``"python"`` when the pure-Python path runs (the reference)."""

    def __post_init__(self) -> None:
        self._conn: pq.abc.PGconn | None = None
        self._decoder: ChunkDecoder | None = None
        self._fast: Any = None
        self._items: list[bytes | list[Upsert]] = []
        """Frames the C path drained that :meth:`poll` has not taken yet (it stopped at a
        limit): the next call takes them first, in order."""
        self._last_status = 0.0
        self._want_reply = False

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, busy_timeout: float = 30.0) -> ChangeStream:
        """Connect and start streaming.

        Args:
            busy_timeout: how long to wait for a slot still held by a walsender whose client
                died (a crashed applier): the server notices the dead peer and frees it.
        """
        deadline = time.monotonic() + busy_timeout
        while True:
            try:
                return self._start()
            except _SlotBusy:
                if time.monotonic() > deadline:
                    raise ReplicationError(
                        f"replication slot {self.names.slot} is held by another walsender "
                        f"after {busy_timeout}s; is another applier running this stream?"
                    ) from None
                time.sleep(0.1)

    def _start(self) -> ChangeStream:
        conn = open_walsender(self.dsn)
        self._conn = conn
        self.server_version = conn.server_version
        origin_filter = self.server_version >= 160000
        self._decoder = ChunkDecoder(
            self.collection, self.chunk_id, self.key_range, self.names.message_prefix,
            skip_origins=True,
        )
        options = [
            "proto_version '1'",
            f"publication_names '\"{self.names.publication}\"'",
            "messages 'true'",
        ]
        if origin_filter:
            options.append("origin 'none'")
        command = (
            f'START_REPLICATION SLOT "{self.names.slot}" LOGICAL {lsn_to_str(self.start_lsn)}'
            f" ({', '.join(options)})"
        )
        res = conn.exec_(command.encode())
        if res.status != pq.ExecStatus.COPY_BOTH:
            message = (res.error_message or b"").decode(errors="replace")
            self.close()
            sqlstate = res.error_field(pq.DiagnosticField.SQLSTATE)
            if sqlstate == b"55006":
                raise _SlotBusy(message)
            if sqlstate == b"42704":
                raise SlotMissingError(f"START_REPLICATION on {self.names.slot}: {message}")
            raise ReplicationError(f"START_REPLICATION on {self.names.slot} failed: {message}")
        conn.nonblocking = 1
        fast = _accel.accelerator()
        self._fast = fast if fast is not None and _accel.usable_with(conn) else None
        self._items = []
        self.decoder_path = "c" if self._fast is not None else "python"
        self.confirmed_lsn = self.start_lsn
        self._last_status = time.monotonic()
        return self

    def close(self) -> None:
        if self._conn is not None:
            self._conn.finish()
            self._conn = None

    def __enter__(self) -> ChangeStream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int:
        """The walsender connection's socket (readable when :meth:`poll` has input)."""
        return self._require().socket

    @property
    def in_transaction(self) -> bool:
        return self._decoder is not None and self._decoder._txn is not None

    @property
    def decoded_changes(self) -> int:
        return self._decoder.decoded_changes if self._decoder else 0

    # -- receiving ---------------------------------------------------------------------------

    def poll(self, timeout: float, max_items: int = 100_000,
             max_changes: int | None = None) -> list[Transaction | Position]:
        """Receive what the server has sent, waiting up to ``timeout`` for the first item.

        Returns complete transactions (possibly empty: positions matter) and positions, in
        server order. Returns early once the socket has nothing more buffered, or once
        ``max_changes`` document changes were decoded (the rest stays buffered for the next
        call; a transaction cut there is completed by it).
        """
        conn = self._require()
        decoder = self._decoder
        assert decoder is not None
        out: list[Transaction | Position] = []
        deadline = time.monotonic() + timeout
        change_limit = None if max_changes is None else decoder.decoded_changes + max_changes
        fast = self._fast
        while True:
            if fast is not None:
                # The C path: every buffered frame in one call, the hot ones decoded
                # (_pgoutput_fast.c); then the same limits as below, item by item.
                if self._items:
                    items, self._items = self._items, []
                    if self._take(items, decoder, out, max_items, change_limit):
                        break
                    continue
                budget = (-1 if change_limit is None
                          else max(0, change_limit - decoder.decoded_changes))
                n, items, frames, nbytes = fast.drain(
                    _accel.conn_address(conn), Upsert, decoder.hot_relids, decoder.lo,
                    decoder.hi, decoder._txn is not None, decoder._skip, decoder.skip_origins,
                    len(out), max_items, budget,
                )
                self.stats.frames += frames
                self.stats.bytes += nbytes
                if self._take(items, decoder, out, max_items, change_limit):
                    break
                if n == 1:  # stopped at a limit or a Relation: Python's limits did not hold
                    continue
                if n == -2:
                    raise ReplicationError(
                        f"replication stream of {self.names.slot} failed: "
                        f"{conn.get_error_message()}"
                    )
            else:
                n, data = conn.get_copy_data(1)
                if n > 0:
                    self._frame(bytes(data), decoder, out)
                    if len(out) >= max_items:
                        break
                    if (change_limit is not None and out
                            and decoder.decoded_changes >= change_limit):
                        break
                    continue
            if n == -1:
                res = conn.get_result()
                message = (res.error_message if res else b"") or b"stream ended"
                raise ReplicationError(
                    f"replication stream of {self.names.slot} ended: "
                    f"{message.decode(errors='replace')}"
                )
            self.maybe_send_status()
            # Nothing complete is buffered: look at the socket once more even when the time
            # is up (a caller woken by a readable socket must consume it, or it stays
            # readable and the caller spins).
            wait = 0.0 if out else max(0.0, deadline - time.monotonic())
            readable, _, _ = select.select([conn.socket], [], [], wait)
            if not readable:
                break
            conn.consume_input()
        return out

    def _take(self, items: list[bytes | list[Upsert]], decoder: ChunkDecoder,
              out: list[Transaction | Position], max_items: int,
              change_limit: int | None) -> bool:
        """The C path's items in order (a frame's bytes, or Upserts the C side decoded for
        the open transaction), with the pure path's limits checked after each frame; True:
        a limit holds, the rest waits in ``_items`` for the next :meth:`poll`."""
        for i, item in enumerate(items):
            if type(item) is bytes:
                self._frame(item, decoder, out)
            else:
                assert isinstance(item, list)
                txn = decoder._txn
                if txn is None or decoder._skip:
                    raise ProtocolError("decoded document changes outside a transaction")
                if change_limit is not None and out:
                    room = change_limit - decoder.decoded_changes
                    if room < len(item):
                        # The pure path stops after the change that reaches the limit.
                        txn.changes.extend(item[:room])
                        decoder.decoded_changes += room
                        self._items = [item[room:], *items[i + 1:]]
                        return True
                txn.changes.extend(item)
                decoder.decoded_changes += len(item)
            if len(out) >= max_items or (change_limit is not None and out
                                         and decoder.decoded_changes >= change_limit):
                self._items = items[i + 1:]
                return True
        return False

    def _frame(self, data: bytes, decoder: ChunkDecoder,
               out: list[Transaction | Position]) -> None:
        self.stats.frames += 1
        self.stats.bytes += len(data)
        kind = data[0]
        if kind == 0x77:  # 'w' XLogData
            txn = decoder.feed(data[25:])
            if txn is not None:
                self.stats.transactions += 1
                self.received_lsn = max(self.received_lsn, txn.end_lsn)
                if txn.origin is not None and txn.empty:
                    self.stats.skipped_foreign += 1
                if txn.empty:
                    out.append(Position(txn.end_lsn))
                else:
                    out.append(txn)
        elif kind == 0x6B:  # 'k' primary keepalive
            if len(data) < 1 + _KEEPALIVE.size:
                raise ProtocolError(f"malformed keepalive ({len(data)} bytes)")
            wal_end, _send_time, reply = _KEEPALIVE.unpack_from(data, 1)
            self.stats.keepalives += 1
            if wal_end > self.server_lsn:
                self.server_lsn = wal_end
            if not self.in_transaction:
                self.received_lsn = max(self.received_lsn, wal_end)
                out.append(Position(wal_end))
            if reply:
                self.send_status()
        else:
            raise ReplicationError(f"unexpected CopyData message {chr(kind)!r} from the server")

    # -- feedback ----------------------------------------------------------------------------

    def confirm(self, lsn: int) -> None:
        """Tell the server that everything before ``lsn`` is durably applied.

        Call only after the target transaction holding those changes committed.
        """
        if lsn > self.confirmed_lsn:
            self.confirmed_lsn = lsn
            self.send_status()

    def request_reply(self) -> None:
        """Ask the server for a keepalive (its current position) now."""
        self._want_reply = True
        self.send_status()

    def maybe_send_status(self) -> None:
        if time.monotonic() - self._last_status >= self.status_interval:
            self.send_status()

    def send_status(self) -> None:
        conn = self._require()
        reply = 1 if self._want_reply else 0
        self._want_reply = False
        now = unix_to_pg_time(time.time())
        # write = what we received (informational); flush = apply = what the target holds.
        msg = _STATUS.pack(
            b"r", max(self.received_lsn, self.confirmed_lsn), self.confirmed_lsn,
            self.confirmed_lsn, now, reply,
        )
        while (queued := conn.put_copy_data(msg)) == 0:
            # Non-blocking send buffer full: let libpq drain it, then queue again.
            conn.flush()
            select.select([], [conn.socket], [], 1.0)
        if queued != 1:
            raise ReplicationError(f"could not send feedback: {conn.get_error_message()}")
        while conn.flush() == 1:
            select.select([], [conn.socket], [], 1.0)
        self.stats.feedback_sent += 1
        self._last_status = time.monotonic()

    def _require(self) -> pq.abc.PGconn:
        if self._conn is None:
            raise ReplicationError("the change stream is not started")
        return self._conn


__all__ = ["ChangeStream", "StreamStats"]
