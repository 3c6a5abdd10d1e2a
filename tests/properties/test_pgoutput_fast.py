"""The C accelerator of the applier (shards/postgres/_pgoutput_fast.c) against the pure-Python
path, its reference: the same frames, read through :meth:`ChangeStream.poll` both ways, give
the same transactions and positions in the same calls, whatever the limits; the same
transactions collapse to the same batch and the same COPY buffers.

The frames come from a stand-in for libpq's CopyData buffer (the C side calls it through the
same function pointer it would call ``PQgetCopyData`` through); the stream's messages are
pgoutput_streams' generated ones (every message kind: out-of-range rows, TOAST-unchanged
documents, deletes, key changes, fence rows, logical messages, truncates, origin-skipped
transactions, document tables of other layouts), with keepalives between them. The real
stream through real libpq is tests/shards/test_replication.py's, which runs on the C path
when it is built (and on the Python path with ``SHARDSHIFT_PURE_PYTHON=1``).
"""

from __future__ import annotations

import ctypes
import socket
import struct
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shards.postgres import _accel
from shards.postgres.apply_batch import (
    OP_DELETE,
    OP_INSERT,
    OP_UPSERT,
    collapse_py,
    collapse_with,
    copy_buffers_py,
)
from shards.postgres.change_stream import ChangeStream
from shards.postgres.pgoutput import (
    ChunkDecoder,
    Delete,
    MessageMarker,
    Position,
    Transaction,
    TruncateChunk,
    Upsert,
)
from shards.postgres.replication import StreamNames
from tests.properties.conftest import PURE
from tests.properties.pgoutput_streams import CHUNK, COLLECTION, PREFIX, RANGE, Case, streams

try:
    from shards.postgres import _pgoutput_fast as FAST  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - a machine without a compiler
    FAST = None

pytestmark = pytest.mark.skipif(FAST is None, reason="the C accelerator is not built")

_libc = ctypes.CDLL(None)
_libc.malloc.restype = ctypes.c_void_p
_libc.malloc.argtypes = [ctypes.c_size_t]
_GETCOPY = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                            ctypes.c_int)


class Buffered:
    """libpq's buffered CopyData frames, as psycopg's PGconn and as ``PQgetCopyData``."""

    def __init__(self, frames: list[bytes]) -> None:
        self.frames = deque(frames)
        self._pair = socket.socketpair()  # never readable: nothing more arrives
        self.socket = self._pair[0].fileno()
        self.pgconn_ptr = 1

    def get_copy_data(self, async_: int) -> tuple[int, bytes]:
        if not self.frames:
            return 0, b""
        frame = self.frames.popleft()
        return len(frame), frame

    def pq_get_copy_data(self, conn: Any, bufp: Any, async_: int) -> int:
        if not self.frames:
            return 0
        frame = self.frames.popleft()
        p = _libc.malloc(len(frame))
        ctypes.memmove(p, frame, len(frame))
        bufp[0] = p
        return len(frame)

    def consume_input(self) -> None:
        """Nothing to read: every frame of the stand-in is buffered from the start."""

    def close(self) -> None:
        for s in self._pair:
            s.close()


@pytest.fixture(scope="module", autouse=True)
def _real_libpq_afterwards() -> Iterator[None]:
    """The tests point the module at the stand-in; put psycopg's libpq back after them."""
    yield
    lib = _accel.libpq()
    if lib is not None and FAST is not None:
        FAST.configure(*_accel.libpq_functions(lib))


def _xlog(msg: bytes) -> bytes:
    return b"w" + struct.pack(">QQQ", 1, 2, 3) + msg


def _keepalive(lsn: int) -> bytes:
    return b"k" + struct.pack(">qqb", lsn, 0, 0)


def _run(frames: list[bytes], fast: bool, max_items: int,
         max_changes: int | None) -> tuple[list[list[Transaction | Position]], ChangeStream]:
    conn = Buffered(frames)
    keep = _GETCOPY(conn.pq_get_copy_data)
    stream = ChangeStream("", StreamNames("m", "p", "n", PREFIX), COLLECTION, CHUNK, RANGE,
                          status_interval=1e9)
    stream._conn = conn  # type: ignore[assignment]
    stream._decoder = ChunkDecoder(COLLECTION, CHUNK, RANGE, PREFIX, skip_origins=True)
    stream._last_status = time.monotonic()
    if fast:
        assert FAST is not None
        FAST.configure(ctypes.cast(keep, ctypes.c_void_p).value,
                       ctypes.cast(_libc.free, ctypes.c_void_p).value)
        stream._fast = FAST
    polls: list[list[Transaction | Position]] = []
    try:
        for _ in range(10 * len(frames) + 10):
            got = stream.poll(0.0, max_items=max_items, max_changes=max_changes)
            if not got and not conn.frames and not stream._items:
                break
            polls.append(got)
    finally:
        conn.close()
    assert not conn.frames and not stream._items
    return polls, stream


@st.composite
def framed(draw: st.DrawFn) -> tuple[Case, list[bytes]]:
    case = draw(streams())
    frames: list[bytes] = []
    for m in case.messages:
        if draw(st.integers(0, 5)) == 0:
            frames.append(_keepalive(draw(st.integers(0, 2**62))))
        frames.append(_xlog(m))
    return case, frames


@PURE
@given(framed(), st.integers(1, 4), st.one_of(st.none(), st.integers(0, 6)))
def test_c_path_polls_exactly_what_the_python_path_polls(
        sample: tuple[Case, list[bytes]], max_items: int, max_changes: int | None) -> None:
    case, frames = sample
    py_polls, py = _run(frames, False, max_items, max_changes)
    c_polls, c = _run(frames, True, max_items, max_changes)
    assert c_polls == py_polls
    assert [t for p in c_polls for t in p if isinstance(t, Transaction)] == [
        t for t in case.expected if not t.empty]
    assert c._decoder is not None and py._decoder is not None
    assert c._decoder.decoded_changes == py._decoder.decoded_changes
    assert c.stats == py.stats
    assert c.received_lsn == py.received_lsn


def test_many_document_rows_come_back_as_upserts_of_the_open_transaction() -> None:
    """The hot path proper: a long transaction of inserts and updates in and out of the
    range, read in one C call, cut by ``max_changes`` as the Python path cuts it."""
    from tests.properties.pgoutput_streams import begin, commit, insert, relation, update

    rows = []
    for i in range(2000):
        h = (i * 7919) % 4000 - 2000
        body = f'{{"n": {i}}}'.encode()
        rows.append(insert(16385, [str(h).encode(), f"id{i}".encode(), body]) if i % 3
                    else update(16385, [str(h).encode(), f"id{i}".encode(), "u" if i % 2
                                        else body]))
    msgs = [relation(16385, "docs", COLLECTION, ["khash", "id", "doc"]), begin(10, 0, 5),
            *rows, commit(10, 11, 0), begin(20, 0, 6), *rows[:5], commit(20, 21, 0)]
    frames = [_xlog(m) for m in msgs]
    for limit in (None, 1, 333):
        py_polls, _ = _run(frames, False, 100_000, limit)
        c_polls, c = _run(frames, True, 100_000, limit)
        assert c_polls == py_polls
        changes = [t for p in c_polls for t in p if isinstance(t, Transaction)][0].changes
        assert len(changes) == sum(1 for i in range(2000) if -1000 <= (i * 7919) % 4000 - 2000
                                   < 1000)
    assert c.stats.frames == len(frames)


def _outcome(frames: list[bytes], fast: bool) -> object:
    """What reading ``frames`` gives: the polls, or the error's type and message."""
    try:
        return _run(frames, fast, 100_000, None)[0]
    except Exception as exc:  # noqa: BLE001 - the error is the outcome compared
        return (type(exc).__name__, str(exc))


@PURE
@given(st.data())
def test_a_damaged_document_frame_reads_alike_on_both_paths(data: st.DataObject) -> None:
    """A hot frame cut short, grown or with a byte changed (a length, a kind, a digit of the
    khash): the C side must never read past it nor make up a row; it hands what it cannot
    decode to Python, so both paths give the same transactions or the same error."""
    from tests.properties.pgoutput_streams import (
        begin,
        commit,
        damage,
        insert,
        relation,
        update,
    )

    h = data.draw(st.integers(-2000, 1999))
    row = [str(h).encode(), b"id", b'{"a": 1}']
    hot = damage(data, data.draw(st.sampled_from([insert(16385, row), update(16385, row)])))
    msgs = [relation(16385, "docs", COLLECTION, ["khash", "id", "doc"]), begin(10, 0, 5),
            insert(16385, [b"1", b"ok", b"{}"]), hot, commit(10, 11, 0)]
    frames = [_xlog(m) for m in msgs]
    assert _outcome(frames, True) == _outcome(frames, False)


def test_a_frame_cut_short_is_a_protocol_error_on_both_paths() -> None:
    """A keepalive or an XLogData frame cut anywhere (its header or its message): both paths
    refuse it as a ``ProtocolError`` (found: a short keepalive was a bare ``struct.error``, an
    XLogData frame without its message a bare ``IndexError``)."""
    from tests.properties.pgoutput_streams import begin

    for whole in (_keepalive(7), _xlog(begin(10, 0, 5))):
        for n in range(1, len(whole)):
            for fast in (False, True):
                outcome = _outcome([whole[:n]], fast)
                assert isinstance(outcome, tuple) and outcome[0] == "ProtocolError", \
                    (whole[:1], n, fast, outcome)


# -- the batch: collapse and COPY buffers ------------------------------------------------------

_changes = st.one_of(
    st.builds(Upsert, st.integers(-3, 3), st.sampled_from([b"a", b"b", b"\xc3\xa9"]),
              st.one_of(st.none(), st.binary(max_size=8)), st.booleans()),
    st.builds(Delete, st.integers(-3, 3), st.sampled_from([b"a", b"b", b"\xc3\xa9"])),
    st.just(TruncateChunk()),
)
_txns = st.lists(
    st.builds(lambda xid, changes, marks: Transaction(
        xid=xid, commit_lsn=xid * 10, changes=changes,
        markers=[MessageMarker(PREFIX, b"m", xid) for _ in range(marks)]),
        st.integers(1, 1000), st.lists(_changes, max_size=30), st.integers(0, 2)),
    max_size=6)


@PURE
@given(_txns)
def test_c_collapse_and_copy_buffers_equal_the_python_ones(txns: list[Transaction]) -> None:
    assert FAST is not None
    batch = collapse_with(FAST, txns)
    assert batch == collapse_py(txns)
    assert FAST.copy_buffers(batch.rows) == copy_buffers_py(batch.rows)


def test_copy_buffers_at_the_khash_extremes() -> None:
    assert FAST is not None
    rows = [(OP_UPSERT, -(2**63), b"x", b"{}"), (OP_INSERT, 2**63 - 1, b"", None),
            (OP_DELETE, 0, b"y" * 300, None)]
    assert FAST.copy_buffers(rows) == copy_buffers_py(rows)
