"""The MongoDB front end against hostile and broken clients: every bad message gets MongoDB's
error or closes only its own connection, limits hold before anything is allocated, and
nothing is written."""

from __future__ import annotations

import resource
import struct
from typing import Any

import bson
import bson.errors
import pytest
from bson import ObjectId
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymongo.errors import OperationFailure

from router.mongo import wire
from router.mongo.registry import REGISTRY
from settings import DEV_MONGO_PASSWORD, DEV_MONGO_USER
from tests.router.conftest import Deployment, router_settings
from tests.router.mongo_front import MongoFront, mongo_front
from tests.router.mongo_raw import RawConn, frame, op_msg

MB = 1 << 20


async def _stored(deployment: Deployment) -> int:
    return sum([await s.count(deployment.collection) for s in deployment.shards.values()])


def _insert_body(coll: str) -> dict[str, Any]:
    return {"insert": coll, "$db": "shardshift",
            "documents": [{"_id": ObjectId(), "acct": "hostile-1", "x": 1}]}


def _bad_messages(coll: str) -> dict[str, bytes]:
    good = bson.encode(_insert_body(coll))
    return {
        "unknown opcode": frame(9999, b"\x00" * 32),
        "compressed (not offered)": frame(wire.OP_COMPRESSED, b"\x00" * 32),
        "length below the header": frame(wire.OP_MSG, b"", length=8),
        "truncated document": frame(wire.OP_MSG, struct.pack("<I", 0) + b"\x00" + good[:-7]),
        "document length past the end": frame(
            wire.OP_MSG, struct.pack("<I", 0) + b"\x00" + struct.pack("<i", 10_000) + good[4:]),
        "unknown section kind": frame(wire.OP_MSG, struct.pack("<I", 0) + b"\x07" + good),
        "two body sections": frame(
            wire.OP_MSG, struct.pack("<I", 0) + b"\x00" + good + b"\x00" + good),
        "unknown required flag": frame(wire.OP_MSG, struct.pack("<I", 1 << 5) + b"\x00" + good),
        "invalid BSON type": frame(
            wire.OP_MSG, struct.pack("<I", 0) + b"\x00" + good[:4] + b"\x7a" + good[5:]),
        "sequence longer than the message": frame(
            wire.OP_MSG, struct.pack("<I", 0) + b"\x00" + good + b"\x01"
            + struct.pack("<i", 1 << 20) + b"documents\x00"),
    }


async def test_malformed_messages_close_only_their_connection_and_write_nothing(
        mongo: MongoFront, deployment: Deployment) -> None:
    # (pymongo's blocking calls are fine here: the front end serves from its own thread.)
    before = await _stored(deployment)
    with mongo.client() as client:
        coll = client.shardshift[deployment.collection]
        for name, message in _bad_messages(deployment.collection).items():
            conn = RawConn(mongo.port)
            try:
                conn.login(DEV_MONGO_USER, DEV_MONGO_PASSWORD)
                conn.send(message)
                reply = conn.reply()
                # An error reply (never ok: 1), then the connection is closed.
                assert reply is None or reply.get("ok") == 0.0, (name, reply)
                assert conn.closed(), name
            finally:
                conn.close()
            # The process and the other connections go on.
            assert client.admin.command("ping")["ok"] == 1.0, name
            assert coll.find_one({"acct": "hostile-1", "_id": 1}) is None
    assert await _stored(deployment) == before


def test_unknown_commands_and_op_query_beyond_the_handshake(mongo: MongoFront) -> None:
    with mongo.client() as client:
        with pytest.raises(OperationFailure) as err:
            client.admin.command("fooBarBaz")
        assert err.value.code == 59 and "no such command" in str(err.value)
        assert client.admin.command("ping")["ok"] == 1.0
    conn = RawConn(mongo.port)
    try:
        query = (struct.pack("<i", 0) + b"shardshift.$cmd\x00" + struct.pack("<ii", 0, -1)
                 + bson.encode({"find": "x"}))
        conn.send(frame(wire.OP_QUERY, query))
        reply = conn.reply()
        assert reply is not None and reply["ok"] == 0.0 and reply["code"] == 115
        conn.send(frame(wire.OP_QUERY, struct.pack("<i", 0) + b"admin.$cmd\x00"
                        + struct.pack("<ii", 0, -1) + bson.encode({"isMaster": 1})))
        reply = conn.reply()
        assert reply is not None and reply["ismaster"] is True and reply["msg"] == "isdbgrid"
    finally:
        conn.close()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_oversized_messages_are_refused_from_the_header(
        deployment: Deployment, catalog_reader_dsn: str) -> None:
    settings = router_settings(mongo_max_message_bytes=1 * MB)
    with mongo_front(catalog_reader_dsn, settings) as front:
        # Before authentication: 64 KiB at most.
        conn = RawConn(front.port)
        try:
            conn.send(wire.HEADER.pack(100 * 1024, 1, 0, wire.OP_MSG))
            reply = conn.reply()
            assert reply is not None and reply["code"] == 10334, reply
            assert "not authenticated" in reply["errmsg"]
            assert conn.closed()
        finally:
            conn.close()
        # Authenticated: the configured limit; a 2 GiB claim allocates nothing.
        rss = _peak_rss_mb()
        for claimed in (1 * MB + 1, 2**31 - 1):
            conn = RawConn(front.port)
            try:
                conn.login(DEV_MONGO_USER, DEV_MONGO_PASSWORD)
                conn.send(wire.HEADER.pack(claimed, 2, 0, wire.OP_MSG) + b"\x00" * 1024)
                reply = conn.reply()
                assert reply is not None and reply["code"] == 10334, reply
                assert conn.closed()
            finally:
                conn.close()
        assert _peak_rss_mb() - rss < 64, "a claimed length was allocated"
        # Within the limit, a large insert works.
        conn = RawConn(front.port)
        try:
            conn.login(DEV_MONGO_USER, DEV_MONGO_PASSWORD)
            body = _insert_body(deployment.collection)
            body["documents"][0]["pad"] = "p" * (512 * 1024)
            assert conn.command(body) == {"n": 1, "ok": 1.0}
        finally:
            conn.close()


def test_a_stalled_message_closes_its_connection(deployment: Deployment,
                                                 catalog_reader_dsn: str) -> None:
    settings = router_settings(mongo_message_timeout_s=0.5)
    with mongo_front(catalog_reader_dsn, settings) as front:
        conn = RawConn(front.port, timeout=30)
        try:
            conn.send(wire.HEADER.pack(1000, 1, 0, wire.OP_MSG) + b"\x00" * 10)
            assert conn.closed()  # the server hung up: the reservation is released
        finally:
            conn.close()
        with front.client() as client:
            assert client.admin.command("ping")["ok"] == 1.0


def test_connections_beyond_the_limit_are_closed(deployment: Deployment,
                                                 catalog_reader_dsn: str) -> None:
    settings = router_settings(mongo_max_connections=3)
    with mongo_front(catalog_reader_dsn, settings) as front:
        held = [RawConn(front.port) for _ in range(3)]
        try:
            for c in held:
                assert c.command({"hello": 1, "$db": "admin"})["ok"] == 1.0
            extra = RawConn(front.port)
            try:
                assert extra.closed()
            finally:
                extra.close()
            held.pop().close()
            again = RawConn(front.port)
            try:
                # The freed slot is reused once the server has seen the close.
                for _ in range(100):
                    try:
                        if again.command({"hello": 1, "$db": "admin"})["ok"] == 1.0:
                            break
                    except (AssertionError, OSError):
                        again.close()
                        again = RawConn(front.port)
                else:
                    pytest.fail("a freed connection slot was never reused")
            finally:
                again.close()
        finally:
            for c in held:
                c.close()


_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=True),
    st.text(max_size=20), st.binary(max_size=20), st.just(ObjectId("0123456789abcdef01234567")),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(max_size=8).filter(lambda k: "\x00" not in k), inner,
                        max_size=4)),
    max_leaves=12)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_any_command_document_gets_a_reply_never_an_internal_error(
        mongo: MongoFront, deployment: Deployment, data: st.DataObject) -> None:
    """Every registered command, with arbitrary arguments, answers ok or with MongoDB's error
    for the client's mistake (never InternalError), and the connection goes on."""
    name = data.draw(st.sampled_from(sorted(REGISTRY)))
    target = data.draw(st.one_of(st.just(deployment.collection), _values))
    extra = data.draw(st.dictionaries(
        st.sampled_from(["filter", "documents", "updates", "deletes", "q", "u", "limit",
                         "projection", "sort", "skip", "batchSize", "ordered", "query",
                         "pipeline", "cursor", "indexes", "index", "getMore", "collection",
                         "cursors", "update", "remove", "new", "upsert", "fields", "key",
                         "nameOnly", "mechanism", "payload", "conversationId", "options"]),
        _values, max_size=5))
    db = data.draw(st.sampled_from(["shardshift", "admin", "other"]))
    body = {name: target, **extra, "$db": db}
    if name in ("logout", "saslStart", "saslContinue"):
        return  # they change the connection's login, which the next example needs
    conn = _FUZZ.get("conn")
    if conn is None or _FUZZ.get("port") != mongo.port:
        conn = _FUZZ["conn"] = RawConn(mongo.port)
        _FUZZ["port"] = mongo.port
        conn.login(DEV_MONGO_USER, DEV_MONGO_PASSWORD)
    try:
        conn.send(op_msg(body))
    except (OverflowError, bson.errors.InvalidDocument):
        return  # not encodable as BSON: no client can send it
    reply = conn.reply()
    assert reply is not None, f"the connection closed on {body!r}"
    assert reply["ok"] in (0.0, 1.0), reply
    if reply["ok"] == 0.0:
        assert reply["code"] != 1, (body, reply)
        assert isinstance(reply["errmsg"], str) and reply["errmsg"]


_FUZZ: dict[str, Any] = {}


@pytest.fixture(autouse=True, scope="module")
def _close_fuzz_connection() -> Any:
    yield
    conn = _FUZZ.pop("conn", None)
    if conn is not None:
        conn.close()
