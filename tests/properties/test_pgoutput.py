"""The pgoutput decoder on generated messages, built byte by byte as the PostgreSQL protocol
documentation ("Logical Replication Message Formats", protocol version 1) describes them:
what the decoder returns is what was encoded, reduced to the chunk being moved."""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from shards.postgres.pgoutput import ChunkDecoder, ProtocolError, Transaction
from tests.properties.conftest import PURE
from tests.properties.pgoutput_streams import (
    CHUNK,
    COLLECTION,
    PREFIX,
    RANGE,
    Case,
    begin,
    commit,
    damage,
    streams,
)


@PURE
@given(streams())
@example(Case([begin(1, 0, 2**31 + 5), commit(1, 2, 0)],
              [Transaction(xid=2**31 + 5, commit_lsn=1, end_lsn=2)]))
@example(Case([begin(2**63 + 1, 0, 1), commit(2**63 + 1, 2**63 + 2, 0)],
              [Transaction(xid=1, commit_lsn=2**63 + 1, end_lsn=2**63 + 2)]))
def test_decoder_returns_what_was_encoded(case: Case) -> None:
    """Found: the transaction id (an unsigned 32-bit integer) and the LSNs (unsigned 64-bit)
    were read as signed, so a transaction id past 2^31 came back negative; relation OIDs past
    2^31 only worked because every message read them the same wrong way."""
    decoder = ChunkDecoder(COLLECTION, CHUNK, RANGE, PREFIX)
    got = [t for m in case.messages if (t := decoder.feed(m)) is not None]
    assert got == case.expected


@PURE
@given(streams(), st.data())
def test_a_damaged_message_is_a_protocol_error(case: Case, data: st.DataObject) -> None:
    """A message cut short, grown or with a byte changed either still decodes or is refused
    as a ``ProtocolError`` naming the message; never a bare ``IndexError``, ``struct.error``
    or ``ValueError`` from inside the decoder (found: all three escaped, so an operator saw
    "unpack_from requires a buffer of at least 8 bytes" for a broken stream)."""
    messages = list(case.messages)
    i = data.draw(st.integers(0, len(messages) - 1))
    messages[i] = damage(data, messages[i])
    decoder = ChunkDecoder(COLLECTION, CHUNK, RANGE, PREFIX)
    try:
        for message in messages:
            decoder.feed(message)
    except ProtocolError as exc:
        assert str(exc), "the error says what was wrong"
