"""Fenced keyset pages and counts on a real PostgreSQL shard (what the router's scans read)."""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest

from router.hashing import khash
from shards.errors import FenceRejectedError, InvalidNameError
from shards.models import KHASH_END, KHASH_MIN, FenceRef, FenceState, IndexDefinition, KeyRange
from shards.postgres import PostgresShard

LOW = KeyRange(lo=KHASH_MIN, hi=0)
HIGH = KeyRange(lo=0, hi=KHASH_END)
R1, R2 = FenceRef(chunk_id=1, token=1), FenceRef(chunk_id=2, token=1)
START = (KHASH_MIN, "")


@pytest.fixture
async def shard(pg18_dsns: list[str]) -> AsyncIterator[PostgresShard]:
    async with PostgresShard("shard-scan", pg18_dsns[0]) as s:
        await s.ensure_schema()
        yield s


@pytest.fixture
async def coll(shard: PostgresShard, collection_name: str) -> AsyncIterator[str]:
    await shard.create_collection(collection_name,
                                  [IndexDefinition(name="by_email", fields=("email",))])
    await shard.put_fence(collection_name, 1, LOW, 1, FenceState.ACTIVE)
    await shard.put_fence(collection_name, 2, HIGH, 1, FenceState.ACTIVE)
    yield collection_name
    await shard.drop_collection(collection_name)


async def _load(shard: PostgresShard, coll: str, n: int) -> list[dict[str, Any]]:
    docs = []
    for i in range(n):
        user = f"u{i}"
        h = khash(user)
        doc = {"_id": i, "user": user, "email": f"{i % 3}@x"}
        await shard.insert(coll, R1 if h < 0 else R2, h, doc)
        docs.append(doc)
    return docs


async def _drain(shard: PostgresShard, coll: str, ref: FenceRef, rng: KeyRange, n: int,
                 **kw: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    after = (rng.lo, "")
    while True:
        rows, more = await shard.scan_page(coll, ref, rng, after, n, **kw)
        assert len(rows) <= n
        out += [d for _, _, d in rows]
        if rows:
            keys = [(h, i) for h, i, _ in rows]
            assert keys == sorted(keys) and keys[0] > after
            after = keys[-1]
        if not more:
            return out


async def test_pages_walk_a_chunk_in_key_order_and_narrow_on_the_shard(
        shard: PostgresShard, coll: str) -> None:
    docs = await _load(shard, coll, 40)
    low = await _drain(shard, coll, R1, LOW, 3)
    high = await _drain(shard, coll, R2, HIGH, 7)
    assert sorted(d["_id"] for d in low + high) == list(range(40))
    assert all(khash(d["user"]) < 0 for d in low)
    by_email = await _drain(shard, coll, R1, LOW, 2, field="email", values=["1@x", "9@x"])
    assert sorted(d["_id"] for d in by_email) == sorted(
        d["_id"] for d in docs if d["email"] == "1@x" and khash(d["user"]) < 0)
    some = [d for d in docs if khash(d["user"]) >= 0][:3]
    by_id = await _drain(shard, coll, R2, HIGH, 100, ids=[d["_id"] for d in some] + [999])
    assert sorted(d["_id"] for d in by_id) == sorted(d["_id"] for d in some)
    by_hash = await _drain(shard, coll, R2, HIGH, 100, khashes=[khash(some[0]["user"])])
    assert [d["_id"] for d in by_hash] == [some[0]["_id"]]
    assert await shard.count_chunks(coll, [R1, R2]) == 40
    assert await shard.count_chunks(coll, [R1]) == len(low)
    with pytest.raises(InvalidNameError):
        await shard.scan_page(coll, R1, LOW, START, 5, field="a;drop", values=[1])


async def test_a_stale_token_or_range_is_refused_even_when_nothing_matches(
        shard: PostgresShard, coll: str) -> None:
    await _load(shard, coll, 5)
    with pytest.raises(FenceRejectedError):
        await shard.scan_page(coll, FenceRef(chunk_id=1, token=2), LOW, START, 5)
    with pytest.raises(FenceRejectedError):
        await shard.scan_page(coll, R1, KeyRange(lo=KHASH_MIN, hi=5), START, 5,
                              ids=["nobody"])
    with pytest.raises(FenceRejectedError):
        await shard.scan_page(coll, FenceRef(chunk_id=9, token=1), LOW, START, 5)
    with pytest.raises(FenceRejectedError):
        await shard.count_chunks(coll, [R1, FenceRef(chunk_id=2, token=0)])
    await shard.freeze(coll, 2, 1)
    with pytest.raises(FenceRejectedError):
        await shard.scan_page(coll, R2, HIGH, (0, ""), 5)


async def test_a_page_stops_at_its_byte_budget(shard: PostgresShard, coll: str) -> None:
    """Incompressible 1 MiB documents with a 2.5 MiB budget: pages of at most three (the
    budget is checked before each document after the first), and none is lost."""
    for i in range(7):
        blob = base64.b64encode(os.urandom(768 * 1024)).decode()
        await shard.insert(coll, R2, 5 + i, {"_id": i, "user": "x", "blob": blob})
    rows, more = await shard.scan_page(coll, R2, HIGH, (0, ""), 100, budget=2_500_000)
    assert more and 1 <= len(rows) <= 3
    got = await _drain(shard, coll, R2, HIGH, 100, budget=2_500_000)
    assert sorted(d["_id"] for d in got) == list(range(7))
