"""Documents, types and the fence on a real PostgreSQL shard."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import pytest
from bson import Binary, Decimal128, Int64, MaxKey, MinKey, ObjectId, Regex, Timestamp

from router.hashing import khash
from shards.errors import (
    DuplicateDocumentError,
    FenceRejectedError,
    FenceStateError,
    InvalidDocumentError,
    InvalidNameError,
    KeyOutsideChunkError,
)
from shards.models import KHASH_END, KHASH_MIN, FenceRef, FenceState, IndexDefinition, KeyRange
from shards.postgres import PostgresShard

FULL = KeyRange(lo=KHASH_MIN, hi=KHASH_END)


@pytest.fixture
async def shard(pg18_dsns: list[str]):
    async with PostgresShard("shard-1", pg18_dsns[0]) as s:
        await s.ensure_schema()
        yield s


@pytest.fixture
async def coll(shard: PostgresShard, collection_name: str):
    await shard.create_collection(collection_name, [IndexDefinition(name="by_email", fields=("email",))])
    await shard.put_fence(collection_name, 1, FULL, 1, FenceState.ACTIVE)
    yield collection_name
    await shard.drop_collection(collection_name)


REF = FenceRef(chunk_id=1, token=1)


def every_type_document() -> dict:
    return {
        "_id": ObjectId(),
        "user": "alice",
        "int32": 7,
        "int64": Int64(2**40),
        "int64_small": Int64(3),
        "double": 0.1,
        "negzero": -0.0,
        "inf": float("inf"),
        "amount": Decimal128("1234567.89"),
        "tiny": Decimal128("0.000000000000000000000000000001"),
        "when": dt.datetime(2026, 11, 28, 12, 30, 15, 123000, tzinfo=dt.UTC),
        "blob": b"\x00\x01binary\xff",
        "bin5": Binary(b"md5-ish", 5),
        "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "regex": Regex("^a.*z$", "i"),
        "ts": Timestamp(1700000000, 3),
        "nothing": None,
        "yes": True,
        "lo": MinKey(),
        "hi": MaxKey(),
        "nested": {"list": [1, Int64(2), 3.5, {"deep": Decimal128("-0.01")}], "s": "ünïcødé ✓"},
        "empty": {},
        "emptylist": [],
    }


async def test_every_bson_type_round_trips(shard: PostgresShard, coll: str) -> None:
    doc = every_type_document()
    h = khash(doc["user"])
    await shard.insert(coll, REF, h, doc)
    back = await shard.get(coll, REF, h, doc["_id"])
    assert back == doc
    # Types, not just values: int64 stays Int64, int32 stays int, Decimal128 stays Decimal128.
    assert type(back["int64_small"]) is Int64
    assert type(back["int32"]) is int
    assert type(back["amount"]) is Decimal128
    assert back["when"].tzinfo is not None
    assert type(back["nested"]["list"][1]) is Int64


async def test_insert_duplicate_is_rejected(shard: PostgresShard, coll: str) -> None:
    doc = {"_id": 1, "user": "bob", "v": 1}
    await shard.insert(coll, REF, khash("bob"), doc)
    with pytest.raises(DuplicateDocumentError):
        await shard.insert(coll, REF, khash("bob"), {**doc, "v": 2})
    assert (await shard.get(coll, REF, khash("bob"), 1))["v"] == 1


async def test_replace_patch_delete(shard: PostgresShard, coll: str) -> None:
    h = khash("carol")
    await shard.insert(coll, REF, h, {"_id": "c1", "user": "carol", "bal": Decimal128("10.00"),
                                      "n": 2147483647, "x": {"y": 1}})
    assert await shard.replace(coll, REF, h, {"_id": "c1", "user": "carol", "bal": Decimal128("5.00"),
                                              "n": 2147483647, "x": {"y": 1}})
    assert not await shard.replace(coll, REF, h, {"_id": "nope", "user": "carol"})
    new = await shard.patch(
        coll, REF, h, "c1",
        {"$inc": {"bal": Decimal128("0.10"), "n": 1, "fresh": Int64(5)},
         "$set": {"a.b.c": "deep"}, "$unset": {"x.y": ""}},
        protected=("_id", "user"),
    )
    assert new is not None
    assert new["bal"] == Decimal128("5.10")
    assert new["n"] == Int64(2147483648) and type(new["n"]) is Int64  # int32 overflow widens
    assert new["fresh"] == Int64(5)
    assert new["a"] == {"b": {"c": "deep"}}
    assert new["x"] == {}
    assert await shard.get(coll, REF, h, "c1") == new
    assert await shard.patch(coll, REF, h, "missing", {"$set": {"a": 1}}) is None
    assert await shard.delete(coll, REF, h, "c1")
    assert not await shard.delete(coll, REF, h, "c1")
    assert await shard.get(coll, REF, h, "c1") is None


@pytest.mark.parametrize(
    "update",
    [
        {"$set": {"user": "mallory"}},          # shard key is immutable
        {"$unset": {"_id": ""}},                # so is _id
        {"$rename": {"a": "b"}},                # unsupported operator
        {"$inc": {"bal": "1"}},                 # $inc needs a number
        {"$inc": {"bal": True}},
        {"$set": {"a": 1}, "$unset": {"a.b": ""}},  # conflicting paths
        {"$set": {"a'); DROP TABLE x; --": 1}},  # hostile field path
        {},
    ],
)
async def test_bad_patches_change_nothing(shard: PostgresShard, coll: str, update: dict) -> None:
    h = khash("dave")
    doc = {"_id": "d", "user": "dave", "bal": Decimal128("1.00")}
    await shard.insert(coll, REF, h, doc)
    with pytest.raises((InvalidDocumentError, InvalidNameError)):
        await shard.patch(coll, REF, h, "d", update, protected=("_id", "user"))
    assert await shard.get(coll, REF, h, "d") == doc


async def test_inc_on_non_number_is_rejected(shard: PostgresShard, coll: str) -> None:
    h = khash("erin")
    await shard.insert(coll, REF, h, {"_id": "e", "user": "erin", "name": "x"})
    with pytest.raises(InvalidDocumentError, match="non-numeric"):
        await shard.patch(coll, REF, h, "e", {"$inc": {"name": 1}})


async def test_find_by_field_and_shard_key(shard: PostgresShard, coll: str) -> None:
    for i in range(5):
        user = f"u{i}"
        await shard.insert(coll, REF, khash(user), {"_id": i, "user": user, "email": f"{i % 2}@x"})
    found = await shard.find_by_field(coll, [REF], "email", "1@x")
    assert sorted(d["_id"] for d in found) == [1, 3]
    by_key = await shard.find_by_shard_key(coll, REF, khash("u3"), "user", "u3")
    assert [d["_id"] for d in by_key] == [3]


async def test_fence_rejects_stale_token_and_foreign_chunk(shard: PostgresShard, coll: str) -> None:
    h = khash("frank")
    with pytest.raises(FenceRejectedError, match="token 1"):
        await shard.insert(coll, FenceRef(chunk_id=1, token=0), h, {"_id": 1, "user": "frank"})
    with pytest.raises(FenceRejectedError, match="not on this shard"):
        await shard.insert(coll, FenceRef(chunk_id=99, token=1), h, {"_id": 1, "user": "frank"})
    # Reads are fenced too: a stale router must not read "not found" from a former owner.
    with pytest.raises(FenceRejectedError):
        await shard.get(coll, FenceRef(chunk_id=1, token=7), h, 1)
    with pytest.raises(FenceRejectedError):
        await shard.find_by_field(coll, [FenceRef(chunk_id=1, token=7)], "email", "nobody")
    assert await shard.count(coll) == 0


async def test_key_outside_chunk_is_rejected(shard: PostgresShard, collection_name: str) -> None:
    await shard.create_collection(collection_name)
    try:
        await shard.put_fence(collection_name, 1, KeyRange(lo=0, hi=KHASH_END), 1, FenceState.ACTIVE)
        negative = next(u for u in (f"k{i}" for i in range(100)) if khash(u) < 0)
        with pytest.raises(KeyOutsideChunkError):
            await shard.insert(collection_name, REF, khash(negative), {"_id": 1, "user": negative})
        assert await shard.count(collection_name) == 0
    finally:
        await shard.drop_collection(collection_name)


async def test_freeze_rejects_later_writes_and_unfreeze_restores(
    shard: PostgresShard, coll: str
) -> None:
    h = khash("gina")
    await shard.insert(coll, REF, h, {"_id": 1, "user": "gina"})
    fence, lsn = await shard.freeze(coll, 1, 1)
    assert (fence.token, fence.state) == (2, FenceState.FROZEN)
    assert "/" in lsn
    for token in (1, 2):  # the old token is stale, the new one is not active
        with pytest.raises(FenceRejectedError):
            await shard.patch(coll, FenceRef(chunk_id=1, token=token), h, 1, {"$set": {"v": 1}})
    again, _ = await shard.freeze(coll, 1, 1)  # a retried freeze is idempotent
    assert again == fence
    with pytest.raises(FenceStateError):
        await shard.freeze(coll, 1, 5)  # a freeze expecting another token changes nothing
    await shard.unfreeze(coll, 1, 2)
    assert (await shard.patch(coll, REF, h, 1, {"$set": {"v": 1}}))["v"] == 1


async def test_freeze_waits_for_writes_in_flight(shard: PostgresShard, coll: str) -> None:
    """A write whose transaction holds the fence commits before the freeze does."""
    h = khash("hank")
    async with await shard.connect_async() as conn:
        await conn.execute("BEGIN")
        await conn.execute(
            "SELECT shardshift.fence_check(%s, 1, 1, %s, true)", (coll, h)
        )
        freeze = asyncio.create_task(shard.freeze(coll, 1, 1))
        # Wait until the freeze is observably blocked on the fence row's lock.
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            cur = await conn.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE pg_blocking_pids(pid) @> ARRAY[pg_backend_pid()]"
            )
            if (await cur.fetchone())[0] == 1:
                break
            assert asyncio.get_running_loop().time() < deadline, "freeze never blocked"
            await asyncio.sleep(0.01)
        assert not freeze.done(), "freeze must wait for the write holding the fence"
        await conn.execute("COMMIT")
    fence, _ = await freeze
    assert fence.state == FenceState.FROZEN


@pytest.mark.parametrize(
    "name",
    ['x"; DROP TABLE shardshift.chunk_fence; --', "1abc", "", "a" * 49, "docs.x", "a b", "ä"],
)
async def test_hostile_collection_names_rejected(shard: PostgresShard, name: str) -> None:
    before = await shard.collections()
    with pytest.raises(InvalidNameError):
        await shard.create_collection(name)
    with pytest.raises(InvalidNameError):
        await shard.insert(name, REF, 0, {"_id": 1})
    assert await shard.collections() == before


@pytest.mark.parametrize("path", ["a.$b", "a..b", "a'b", "a -> 'b'", ".a", "a." , "a.b.c.d.e.f.g.h.i"])
async def test_hostile_field_paths_rejected(shard: PostgresShard, coll: str, path: str) -> None:
    with pytest.raises(ValueError, match="invalid field path"):
        IndexDefinition(name="bad", fields=(path,))
    with pytest.raises(InvalidNameError):
        await shard.find_by_field(coll, [REF], path, 1)


async def test_invalid_documents_rejected(shard: PostgresShard, coll: str) -> None:
    with pytest.raises(InvalidDocumentError, match="_id"):
        await shard.insert(coll, REF, 0, {"user": "x"})
    with pytest.raises(InvalidDocumentError):
        await shard.insert(coll, REF, 0, {"_id": 1, "bad": object()})
    assert await shard.count(coll) == 0


async def _blocked_by(conn, timeout: float = 10.0) -> None:
    """Wait until some backend is blocked by ``conn``'s transaction."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pg_blocking_pids(pid) @> ARRAY[pg_backend_pid()]"
        )
        if (await cur.fetchone())[0] >= 1:
            return
        assert asyncio.get_running_loop().time() < deadline, "nothing blocked"
        await asyncio.sleep(0.01)


async def test_routed_write_in_flight_commits_before_the_freeze(shard: PostgresShard, coll: str) -> None:
    """The real insert statement (inline fence, FOR SHARE) holds off a freeze until it commits."""
    from shards.postgres.documents import DocumentStatements, encode_for_store, fence_params

    st = DocumentStatements(coll)
    h = khash("ivy")
    id_text, doc_text = encode_for_store({"_id": 1, "user": "ivy"})
    async with await shard.connect_async() as conn:
        await conn.execute("BEGIN")
        await conn.execute(st.insert, fence_params(coll, REF, h) | {"id": id_text, "doc": doc_text})
        freeze = asyncio.create_task(shard.freeze(coll, 1, 1))
        await _blocked_by(conn)
        assert not freeze.done()
        await conn.execute("COMMIT")
    fence, _ = await freeze
    assert fence.state == FenceState.FROZEN
    assert await shard.count(coll) == 1


async def test_write_waiting_on_a_freeze_is_rejected_after_it(shard: PostgresShard, coll: str) -> None:
    """A write that arrives while a freeze is uncommitted waits, then sees the frozen fence."""
    h = khash("jack")
    async with await shard.connect_async() as conn:
        await conn.execute("BEGIN")
        await conn.execute(
            "UPDATE shardshift.chunk_fence SET token = 2, state = 'frozen'"
            " WHERE collection = %s AND chunk_id = 1", (coll,),
        )
        write = asyncio.create_task(shard.insert(coll, REF, h, {"_id": 1, "user": "jack"}))
        await _blocked_by(conn)
        await conn.execute("COMMIT")
    with pytest.raises(FenceRejectedError, match="frozen"):
        await write
    assert await shard.count(coll) == 0


async def test_replace_pinned_matches_by_stored_types_writes_only_a_change_and_is_fenced(
    shard: PostgresShard, coll: str
) -> None:
    """The one-statement read-modify-write of a MongoDB replacement pinned by shard key and
    _id: (matched, written), the key and _id compared as stored, nothing written when equal."""
    h = khash(7)  # every numeric form of 7 hashes alike
    await shard.insert(coll, REF, h, {"_id": 1, "user": 7, "v": 1, "nested": {"a": 1, "b": 2}})
    await shard.insert(coll, REF, h, {"_id": 2, "user": Int64(7), "v": 1})
    new = {"_id": 1, "user": 7, "v": 2, "nested": {"a": 1, "b": 2}}
    assert await shard.replace_pinned(coll, REF, h, "user", new) == (1, 1)
    assert await shard.get(coll, REF, h, 1) == new
    same = {"nested": {"b": 2, "a": 1}, "v": 2, "user": 7, "_id": 1}  # field order aside
    assert await shard.replace_pinned(coll, REF, h, "user", same) == (1, 0)
    # The key stored as Int64(7) is not the int32 7; an _id stored as 1 is not Int64(1).
    assert await shard.replace_pinned(coll, REF, h, "user", {"_id": 2, "user": 7}) == (0, 0)
    assert await shard.replace_pinned(coll, REF, h, "user",
                                      {"_id": Int64(1), "user": 7}) == (0, 0)
    assert await shard.get(coll, REF, h, 2) == {"_id": 2, "user": Int64(7), "v": 1}
    with pytest.raises(FenceRejectedError):
        await shard.replace_pinned(coll, FenceRef(chunk_id=1, token=0), h, "user",
                                   {"_id": 1, "user": 7, "v": 3})
    await shard.freeze(coll, 1, 1)
    with pytest.raises(FenceRejectedError):
        await shard.replace_pinned(coll, FenceRef(chunk_id=1, token=2), h, "user",
                                   {"_id": 1, "user": 7, "v": 3})
    await shard.unfreeze(coll, 1, 2)
    assert (await shard.get(coll, REF, h, 1))["v"] == 2


async def test_kept_cursors_answer_alike_and_let_large_results_go(
        shard: PostgresShard, coll: str) -> None:
    """The engine keeps a cursor per connection and statement (``ShardPool.cursor``): the
    same statement again answers the new parameters; a document larger than
    ``KEEP_RESULT_CHARS`` lets its cursor (and result) go; a fence rejection leaves the next
    statement on that connection answering normally; a discarded connection's cursors go."""
    from shards.postgres.pool import KEEP_RESULT_CHARS

    pool = shard._pool
    small = {"_id": 1, "user": "a", "n": 1}
    big = {"_id": 2, "user": "b", "pad": "x" * (KEEP_RESULT_CHARS + 10)}
    for doc in (small, big):
        await shard.insert(coll, REF, khash(doc["user"]), doc)
    for n in range(2, 5):
        assert await shard.replace(coll, REF, khash("a"), {**small, "n": n})
        assert await shard.get(coll, REF, khash("a"), 1) == {**small, "n": n}
    st = shard._st(coll)
    kept = [per for per in pool._cursors.values() if st.get in per]
    assert kept, "a get's cursor is kept"
    assert await shard.get(coll, REF, khash("b"), 2) == big
    assert not any(st.get in per for per in pool._cursors.values()), "a large result's goes"
    with pytest.raises(FenceRejectedError):
        await shard.get(coll, FenceRef(chunk_id=1, token=99), khash("a"), 1)
    assert await shard.get(coll, REF, khash("a"), 1) == {**small, "n": 4}
    conn = await pool.getconn()
    assert id(conn) in pool._cursors
    await pool._discard(conn)  # as a broken or stale connection is
    assert id(conn) not in pool._cursors
