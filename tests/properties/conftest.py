"""Strategies and fixtures of the property tests.

Hostile text is what an attacker or a careless client sends: quotes, backslashes, NULs,
unicode (combining marks, right-to-left, astral characters, lone surrogates), SQL fragments,
``$``-prefixed and dotted names, overlong identifiers. Database-backed properties run against
the session stack's real PostgreSQL shards and catalog with a modest number of examples.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from shards.models import KHASH_END, KHASH_MIN, FenceState, IndexDefinition, KeyRange
from shards.postgres import PostgresShard
from tests.profiles import PARENT as _PARENT
from tests.profiles import examples

FULL = KeyRange(lo=KHASH_MIN, hi=KHASH_END)
T = TypeVar("T")

DB = settings(_PARENT, max_examples=examples(40, 400),
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.too_slow])
"""For properties that touch a real server: few examples, no per-example deadline."""

PURE = settings(_PARENT, max_examples=examples(40, 2000))
"""For pure-logic properties."""

FEW = settings(_PARENT, max_examples=examples(20, 500))
"""For pure properties whose examples are slow to build (hostile text, composed SQL)."""

SQL_FRAGMENTS = [
    "'", '"', "\\", ";", "--", "/*", "*/", "$$", "$1", "%s", "%(c)s", "{}", "{t}",
    "'; DROP TABLE docs.x; --", '"); DROP SCHEMA shardshift CASCADE; --',
    "1 OR 1=1", "a' OR 'a'='a", "\x00", "\n", "\t", " ", ".", "..", "$set", "$where",
    "pg_sleep(10)", "E'\\x41'", "U&\"\\0041\"", "ü", "İ", "\u202e", "\u0301", "😀", "\ud800",
    "\ufeff", "ǅ", "ß",
]

hostile_text = st.one_of(
    st.sampled_from(SQL_FRAGMENTS),
    st.lists(st.sampled_from(SQL_FRAGMENTS) | st.text(max_size=4), max_size=6).map("".join),
    st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=80),
    st.integers(min_value=40, max_value=300).map(lambda n: "a" * n),
)
"""Strings a validator must refuse or pass safely (some are valid names by accident)."""

ident = st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,20}", fullmatch=True)
collection_names = st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,47}", fullmatch=True)
field_segment = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,63}", fullmatch=True)
field_paths = st.lists(field_segment, min_size=1, max_size=8).map(".".join)
index_names = st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,40}", fullmatch=True)

hostile_numbers = st.one_of(
    st.just(math.nan), st.just(math.inf), st.just(-math.inf), st.just(-0.0),
    st.integers(max_value=0), st.integers(min_value=2**63 - 2, max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
)
wrong_types = st.one_of(
    st.none(), st.booleans(), st.binary(max_size=8), st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.just(object()),
)
hostile_values = st.one_of(hostile_text, hostile_numbers, wrong_types)


class LoopThread:
    """An event loop on its own thread, so a synchronous hypothesis test can drive the async
    engine one example at a time (hypothesis runs examples synchronously)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="props-loop",
                                        daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@dataclass
class SyncShard:
    """One real shard with one collection (an active chunk over the whole space, indexed on
    ``email``), driven from synchronous code."""

    loop: LoopThread
    shard: PostgresShard
    collection: str

    def __call__(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run(coro)


@pytest.fixture
def sync_shard(pg18_dsns: list[str], collection_name: str) -> Iterator[SyncShard]:
    loop = LoopThread()
    shard = PostgresShard("shard-1", pg18_dsns[0], max_size=2)

    async def setup() -> None:
        await shard.open()
        await shard.ensure_schema()
        await shard.create_collection(
            collection_name, [IndexDefinition(name="by_email", fields=("email",))])
        await shard.put_fence(collection_name, 1, FULL, 1, FenceState.ACTIVE)

    async def teardown() -> None:
        try:
            await shard.drop_collection(collection_name)
        finally:
            await shard.close()

    try:
        loop.run(setup())
        yield SyncShard(loop, shard, collection_name)
    finally:
        try:
            loop.run(teardown())
        finally:
            loop.close()
