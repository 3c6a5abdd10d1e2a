"""Framing of MongoDB wire-protocol messages: parse requests, build replies.

Only what a router needs: ``OP_MSG`` (every command of a modern driver) and the legacy
``OP_QUERY`` that drivers still send for the first ``hello``/``isMaster`` of a connection,
answered with ``OP_REPLY``. Every length is checked against what the buffer holds and against
the configured limits before anything is decoded, so a hostile length costs no allocation.
See https://www.mongodb.com/docs/manual/reference/mongodb-wire-protocol/.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import bson
from bson.binary import UuidRepresentation
from bson.codec_options import CodecOptions
from bson.errors import BSONError

from router.mongo.errors import ProtocolError

OP_REPLY = 1
OP_QUERY = 2004
OP_COMPRESSED = 2012
OP_MSG = 2013

HEADER = struct.Struct("<iiii")  # messageLength, requestID, responseTo, opCode
_I32 = struct.Struct("<i")
_U32 = struct.Struct("<I")
_REPLY_PREFIX = struct.Struct("<iqii")  # responseFlags, cursorID, startingFrom, numberReturned

MSG_CHECKSUM_PRESENT = 1 << 0
MSG_MORE_TO_COME = 1 << 1
MSG_EXHAUST_ALLOWED = 1 << 16
_MSG_KNOWN_FLAGS = MSG_CHECKSUM_PRESENT | MSG_MORE_TO_COME | MSG_EXHAUST_ALLOWED
_MSG_REQUIRED_MASK = 0xFFFF  # bits 0-15 must be understood by the receiver

REPLY_QUERY_FAILURE = 1 << 1

CODEC: CodecOptions[dict[str, Any]] = CodecOptions(tz_aware=True, uuid_representation=UuidRepresentation.STANDARD)
"""How documents cross the wire: datetimes are UTC-aware and UUIDs are standard binary
subtype 4, as the document codec stores them."""

MIN_BSON = 5


@dataclass
class Request:
    """One parsed request."""

    request_id: int
    op_code: int
    body: dict[str, Any]
    """The command document (OP_MSG section 0; the OP_QUERY query, unwrapped)."""
    sequences: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """OP_MSG document sequences (section kind 1) by identifier, e.g. ``documents``."""
    more_to_come: bool = False
    """The client expects no reply (an unacknowledged write)."""
    namespace: str = ""
    """OP_QUERY's full collection name (``admin.$cmd``)."""


def parse_header(data: bytes) -> tuple[int, int, int, int]:
    """(message length, request id, response to, opcode) of a 16-byte header."""
    length, request_id, response_to, op_code = HEADER.unpack(data)
    return length, request_id, response_to, op_code


def _decode(buf: memoryview, pos: int, end: int, what: str) -> tuple[dict[str, Any], int]:
    """The BSON document at ``pos``; its declared length is checked against ``end`` first."""
    if end - pos < MIN_BSON:
        raise ProtocolError(f"{what}: truncated document")
    (size,) = _I32.unpack_from(buf, pos)
    if size < MIN_BSON or pos + size > end:
        raise ProtocolError(f"{what}: document length {size} does not fit the message")
    try:
        doc = bson.decode(buf[pos:pos + size], codec_options=CODEC)
    except (BSONError, ValueError, TypeError, OverflowError) as exc:
        # pymongo's C decoder reports some malformed input as ValueError/OverflowError.
        raise ProtocolError(f"{what}: invalid BSON ({exc})") from exc
    return doc, pos + size


def _cstring(buf: memoryview, pos: int, end: int, what: str) -> tuple[str, int]:
    stop = bytes(buf[pos:end]).find(b"\x00")
    if stop < 0:
        raise ProtocolError(f"{what}: unterminated string")
    try:
        text = bytes(buf[pos:pos + stop]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{what}: string is not UTF-8") from exc
    return text, pos + stop + 1


def parse_op_msg(request_id: int, payload: bytes) -> Request:
    """An OP_MSG body (everything after the header)."""
    buf = memoryview(payload)
    end = len(buf)
    if end < 4 + 1 + MIN_BSON:
        raise ProtocolError("OP_MSG: too short")
    (flags,) = _U32.unpack_from(buf, 0)
    unknown_required = flags & _MSG_REQUIRED_MASK & ~_MSG_KNOWN_FLAGS
    if unknown_required:
        raise ProtocolError(f"OP_MSG: unknown required flag bits {unknown_required:#x}")
    if flags & MSG_CHECKSUM_PRESENT:
        end -= 4  # CRC-32C trailer: TCP already checks the bytes; not verified here
    pos = 4
    body: dict[str, Any] | None = None
    sequences: dict[str, list[dict[str, Any]]] = {}
    while pos < end:
        kind = buf[pos]
        pos += 1
        if kind == 0:
            if body is not None:
                raise ProtocolError("OP_MSG: more than one body section")
            body, pos = _decode(buf, pos, end, "OP_MSG body")
        elif kind == 1:
            if end - pos < 4:
                raise ProtocolError("OP_MSG: truncated document sequence")
            (size,) = _I32.unpack_from(buf, pos)
            seq_end = pos + size
            if size < 5 or seq_end > end:
                raise ProtocolError(f"OP_MSG: document sequence length {size} does not fit")
            ident, p = _cstring(buf, pos + 4, seq_end, "OP_MSG sequence identifier")
            if ident in sequences:
                raise ProtocolError(f"OP_MSG: duplicate document sequence {ident!r}")
            docs: list[dict[str, Any]] = []
            while p < seq_end:
                doc, p = _decode(buf, p, seq_end, f"OP_MSG sequence {ident!r}")
                docs.append(doc)
            sequences[ident] = docs
            pos = seq_end
        else:
            raise ProtocolError(f"OP_MSG: unknown section kind {kind}")
    if body is None:
        raise ProtocolError("OP_MSG: no body section")
    return Request(request_id, OP_MSG, body, sequences,
                   more_to_come=bool(flags & MSG_MORE_TO_COME))


def parse_op_query(request_id: int, payload: bytes) -> Request:
    """A legacy OP_QUERY body: only commands (``<db>.$cmd``) are served from it."""
    buf = memoryview(payload)
    end = len(buf)
    if end < 4 + 1 + 8 + MIN_BSON:
        raise ProtocolError("OP_QUERY: too short")
    namespace, pos = _cstring(buf, 4, end, "OP_QUERY collection name")
    if end - pos < 8:
        raise ProtocolError("OP_QUERY: truncated")
    pos += 8  # numberToSkip, numberToReturn: a command returns one document
    query, pos = _decode(buf, pos, end, "OP_QUERY query")
    # Drivers wrap a command with read preferences as {$query: {...}, $readPreference: ...}.
    inner = query.get("$query")
    if isinstance(inner, dict) and next(iter(query), None) in ("$query", "query"):
        query = inner
    if pos < end:
        _decode(buf, pos, end, "OP_QUERY field selector")  # validated, unused
    return Request(request_id, OP_QUERY, query, namespace=namespace)


def encode(doc: dict[str, Any]) -> bytes:
    return bson.encode(doc, codec_options=CODEC)


def op_msg_reply(response_to: int, request_id: int, doc: dict[str, Any]) -> bytes:
    body = encode(doc)
    length = HEADER.size + 4 + 1 + len(body)
    return b"".join((HEADER.pack(length, request_id, response_to, OP_MSG),
                     _U32.pack(0), b"\x00", body))


def op_reply(response_to: int, request_id: int, doc: dict[str, Any], *,
             failure: bool = False) -> bytes:
    body = encode(doc)
    length = HEADER.size + _REPLY_PREFIX.size + len(body)
    flags = REPLY_QUERY_FAILURE if failure else 0
    return b"".join((HEADER.pack(length, request_id, response_to, OP_REPLY),
                     _REPLY_PREFIX.pack(flags, 0, 0, 1), body))
