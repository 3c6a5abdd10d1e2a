"""pgoutput messages built byte by byte as the PostgreSQL protocol documentation ("Logical
Replication Message Formats", protocol version 1) describes them, and generated streams of
them with the transactions a chunk's decoder must return (tests/properties/test_pgoutput.py,
test_pgoutput_fast.py)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from hypothesis import strategies as st

from shards.models import KeyRange
from shards.postgres.pgoutput import (
    Delete,
    FenceMarker,
    MessageMarker,
    Transaction,
    TruncateChunk,
    Upsert,
)

COLLECTION, CHUNK, PREFIX = "orders", 7, "shardshift:m1"
RANGE = KeyRange(lo=-1000, hi=1000)
DOCS_OID, FENCE_OID, OTHER_OID = 16385, 16390, 16400


# -- encoders (one per message format) ---------------------------------------------------------


def _s(text: str) -> bytes:
    return text.encode() + b"\0"


def begin(final_lsn: int, ts: int, xid: int) -> bytes:
    return b"B" + struct.pack(">QqI", final_lsn, ts, xid)


def commit(lsn: int, end_lsn: int, ts: int) -> bytes:
    return b"C" + struct.pack(">bQQq", 0, lsn, end_lsn, ts)


def origin(lsn: int, name: str) -> bytes:
    return b"O" + struct.pack(">Q", lsn) + _s(name)


def relation(oid: int, namespace: str, name: str, columns: list[str]) -> bytes:
    out = b"R" + struct.pack(">I", oid) + _s(namespace) + _s(name) + b"d"
    out += struct.pack(">h", len(columns))
    for c in columns:
        out += b"\1" + _s(c) + struct.pack(">Ii", 25, -1)
    return out


def tuple_data(values: list[bytes | None | str]) -> bytes:
    """``None``: NULL; ``"u"``: unchanged TOAST; bytes: a text value."""
    out = struct.pack(">h", len(values))
    for v in values:
        if v is None:
            out += b"n"
        elif v == "u":
            out += b"u"
        else:
            assert isinstance(v, bytes)
            out += b"t" + struct.pack(">i", len(v)) + v
    return out


def insert(oid: int, values: list[bytes | None | str]) -> bytes:
    return b"I" + struct.pack(">I", oid) + b"N" + tuple_data(values)


def update(oid: int, values: list[bytes | None | str],
           old: list[bytes | None | str] | None = None) -> bytes:
    head = b"U" + struct.pack(">I", oid)
    if old is not None:
        head += b"K" + tuple_data(old)
    return head + b"N" + tuple_data(values)


def delete(oid: int, key: list[bytes | None | str]) -> bytes:
    return b"D" + struct.pack(">I", oid) + b"K" + tuple_data(key)


def truncate(oids: list[int]) -> bytes:
    return b"T" + struct.pack(">ib", len(oids), 0) + struct.pack(f">{len(oids)}I", *oids)


def message(lsn: int, prefix: str, content: bytes, transactional: bool = True) -> bytes:
    return (b"M" + struct.pack(">bQ", 1 if transactional else 0, lsn) + _s(prefix)
            + struct.pack(">i", len(content)) + content)


# -- generated transactions --------------------------------------------------------------------

khashes = st.one_of(st.integers(RANGE.lo - 5, RANGE.hi + 5),
                    st.integers(-(2**63), 2**63 - 1))
ids = st.text(alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="\0"),
              max_size=12)
docs = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=40)
u32 = st.integers(0, 2**32 - 1)
lsns = st.integers(0, 2**64 - 1)


DOC_LAYOUTS = [["khash", "id", "doc"], ["doc", "khash", "id"], ["khash", "id", "doc", "extra"]]


@dataclass
class Case:
    messages: list[bytes]
    expected: list[Transaction]


@st.composite
def streams(draw: st.DrawFn) -> Case:
    docs_oid, fence_oid, other_oid = draw(st.lists(u32, min_size=3, max_size=3, unique=True))
    # The table's own layout (one-pass fast path), and others a decoder must read by name.
    layout = draw(st.sampled_from(DOC_LAYOUTS))

    def place(values: list[bytes | None | str]) -> list[bytes | None | str]:
        named = dict(zip(("khash", "id", "doc"), values, strict=True))
        return [named.get(c, b"x") for c in layout]

    msgs = [
        relation(docs_oid, "docs", COLLECTION, layout),
        relation(fence_oid, "shardshift", "chunk_fence",
                 ["collection", "chunk_id", "lo", "hi", "token", "state"]),
        relation(other_oid, "docs", "other_collection", ["khash", "id", "doc"]),
    ]
    expected: list[Transaction] = []

    def inside(h: int) -> bool:
        return RANGE.lo <= h < RANGE.hi

    for _ in range(draw(st.integers(1, 4))):
        final_lsn, end_lsn, ts = draw(lsns), draw(lsns), draw(st.integers(-(2**62), 2**62))
        xid = draw(u32)
        txn = Transaction(xid=xid, commit_lsn=final_lsn, end_lsn=end_lsn, commit_time_us=ts)
        msgs.append(begin(final_lsn, ts, xid))
        skip = draw(st.booleans()) and draw(st.booleans())
        if skip:
            name = draw(st.text(alphabet=st.characters(exclude_categories=("Cs",),
                                                       exclude_characters="\0"), max_size=10))
            msgs.append(origin(draw(lsns), name))
            txn.origin = name
        for _ in range(draw(st.integers(0, 6))):
            kind = draw(st.sampled_from(["ins", "upd", "upd_toast", "upd_key", "del", "other",
                                         "fence", "fence_other", "fence_del", "msg",
                                         "msg_other", "msg_nontx", "trunc"]))
            h, i, d = draw(khashes), draw(ids), draw(docs)
            row = [str(h).encode(), i.encode(), d.encode()]
            if kind == "ins":
                msgs.append(insert(docs_oid, place(row)))
                if inside(h):
                    txn.changes.append(Upsert(h, i.encode(), d.encode(), fresh=True))
            elif kind == "upd":
                msgs.append(update(docs_oid, place(row)))
                if inside(h):
                    txn.changes.append(Upsert(h, i.encode(), d.encode()))
            elif kind == "upd_toast":
                msgs.append(update(docs_oid, place([row[0], row[1], "u"])))
                if inside(h):
                    txn.changes.append(Upsert(h, i.encode(), None))
            elif kind == "upd_key":
                oh, oi = draw(khashes), draw(ids)
                msgs.append(update(docs_oid, place(row),
                                   old=place([str(oh).encode(), oi.encode(), None])))
                if inside(oh):
                    txn.changes.append(Delete(oh, oi.encode()))
                if inside(h):
                    txn.changes.append(Upsert(h, i.encode(), d.encode()))
            elif kind == "del":
                msgs.append(delete(docs_oid, place([row[0], row[1], None])))
                if inside(h):
                    txn.changes.append(Delete(h, i.encode()))
            elif kind == "other":
                msgs.append(insert(other_oid, row))
            elif kind in ("fence", "fence_other"):
                token = draw(st.integers(1, 2**63 - 1))
                state = draw(st.sampled_from(["active", "frozen", "retired", "receiving"]))
                chunk = CHUNK if kind == "fence" else CHUNK + 1
                msgs.append(update(fence_oid, [COLLECTION.encode(), str(chunk).encode(), b"0",
                                               None, str(token).encode(), state.encode()]))
                if kind == "fence":
                    txn.markers.append(FenceMarker(COLLECTION, CHUNK, token, state))
            elif kind == "fence_del":
                msgs.append(delete(fence_oid, [COLLECTION.encode(), str(CHUNK).encode(), None,
                                               None, None, None]))
                txn.markers.append(FenceMarker(COLLECTION, CHUNK, None, None, deleted=True))
            elif kind.startswith("msg"):
                lsn, content = draw(lsns), draw(st.binary(max_size=20))
                prefix = PREFIX if kind != "msg_other" else PREFIX + "x"
                msgs.append(message(lsn, prefix, content, transactional=kind != "msg_nontx"))
                if kind == "msg":
                    txn.markers.append(MessageMarker(PREFIX, content, lsn))
            else:
                msgs.append(truncate([other_oid, docs_oid]))
                txn.changes.append(TruncateChunk())
        msgs.append(commit(final_lsn, end_lsn, ts))
        if skip:
            txn.changes, txn.markers = [], []
        expected.append(txn)
    return Case(msgs, expected)


def damage(data: st.DataObject, message: bytes) -> bytes:
    """``message`` cut short, grown by a few bytes, or with one byte changed (drawn)."""
    how = data.draw(st.sampled_from(["cut", "grow", "flip"]))
    if how == "cut":
        return message[:data.draw(st.integers(0, len(message) - 1))]
    if how == "grow":
        return message + data.draw(st.binary(min_size=1, max_size=8))
    i = data.draw(st.integers(0, len(message) - 1))
    return message[:i] + bytes([data.draw(st.integers(0, 255))]) + message[i + 1:]
