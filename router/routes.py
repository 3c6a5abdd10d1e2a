"""The router's view of one collection: shard key and sorted chunk ranges, looked up by khash.

A route holds its chunks as parallel columns sorted by ``lo`` (ids, bounds, shards, tokens):
built from the catalog's one-row read in a few list operations and checked as a whole (the
ranges tile the khash space), so 100,000 chunks load in milliseconds. A lookup is a bisect
over ``los``; the :class:`ChunkRoute` of a chunk is built on first use and kept.

Incremental refresh (``apply``): the catalog's delta is every chunk written after the route's
version. Each changed row replaces the cached chunks its range overlaps (a moved chunk
replaces itself; a split's children replace their parent; a merged chunk replaces its
parts), so no tombstones are needed. The result is checked where it changed: the rows that
replace a run of cached chunks must tile exactly that run's range. A delta that does not
(a row missing, the catalog's rows from another snapshot) raises :class:`RouteDeltaError`,
and the caller reads the whole map: a route with a gap or an overlap is never built.
"""

from __future__ import annotations

import operator
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, PrivateAttr

from shards.models import KHASH_END, KHASH_MIN, FenceRef, IndexDefinition, KeyRange


class ChunkRoute(BaseModel):
    """Where one chunk lives and the token a routed operation must carry."""

    model_config = ConfigDict(frozen=True)

    chunk_id: int
    range: KeyRange
    shard_id: str
    token: int
    _ref: FenceRef | None = PrivateAttr(default=None)

    @property
    def ref(self) -> FenceRef:
        """The fence reference routed operations carry (built once per route)."""
        # Read from pydantic's private-attribute dict itself: ``self._ref`` goes through
        # ``BaseModel.__getattr__`` (two Python calls per routed operation).
        private = self.__pydantic_private__
        ref = private.get("_ref") if private is not None else None
        if ref is None:
            ref = self._ref = FenceRef(chunk_id=self.chunk_id, token=self.token)
        return ref


class RouteDeltaError(ValueError):
    """A delta that would not leave the map tiling the khash space: read the whole map."""


class CollectionRoute:
    """A collection's routing table at one catalog version.

    Chunks are sorted by ``lo`` and cover the khash space exactly (validated on
    construction), so a lookup is one binary search. Immutable by convention: every change
    (``apply``) builds a new route.
    """

    __slots__ = ("_by_shard", "_cache", "_chunks", "_his", "_ids", "_los", "_shards",
                 "_tokens", "collection", "indexes", "shard_key", "version")

    def __init__(
        self, *, collection: str, shard_key: str, indexes: Iterable[IndexDefinition] = (),
        chunks: Iterable[ChunkRoute] = (), version: int = 0,
    ) -> None:
        ordered = sorted(chunks, key=lambda c: c.range.lo)
        self._init(collection, shard_key, tuple(indexes), version,
                   [c.chunk_id for c in ordered], [c.range.lo for c in ordered],
                   [c.range.hi for c in ordered], [c.shard_id for c in ordered],
                   [c.token for c in ordered])
        self._cache.update(enumerate(ordered))

    def _init(self, collection: str, shard_key: str, indexes: tuple[IndexDefinition, ...],
              version: int, ids: list[int], los: list[int], his: list[int],
              shards: list[str], tokens: list[int], *, check: bool = True) -> None:
        """Set the columns; ``check``: verify they tile the khash space (``apply`` verified
        the ranges it changed, the rest tiled already)."""
        if check:
            _check_tiling(collection, ids, los, his, shards, tokens)
        self.collection = collection
        self.shard_key = shard_key
        self.indexes = indexes
        self.version = version
        self._ids, self._los, self._his, self._shards, self._tokens = (
            ids, los, his, shards, tokens)
        self._cache: dict[int, ChunkRoute] = {}
        self._chunks: tuple[ChunkRoute, ...] | None = None
        self._by_shard: dict[str, list[ChunkRoute]] | None = None

    @classmethod
    def from_columns(
        cls, *, collection: str, shard_key: str, indexes: Iterable[IndexDefinition],
        version: int, chunk_ids: list[int], los: list[int], his: list[int],
        shard_ids: list[str], tokens: list[int],
    ) -> CollectionRoute:
        """A route from columns already sorted by ``lo`` (the lists are kept, not copied).

        Raises ``ValueError`` unless the ranges tile the khash space."""
        route = cls.__new__(cls)
        route._init(collection, shard_key, tuple(indexes), version, chunk_ids, los, his,
                    shard_ids, tokens)
        return route

    # -- reading -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._ids)

    def _at(self, i: int) -> ChunkRoute:
        c = self._cache.get(i)
        if c is None:
            c = ChunkRoute(chunk_id=self._ids[i], range=KeyRange(lo=self._los[i], hi=self._his[i]),
                           shard_id=self._shards[i], token=self._tokens[i])
            self._cache[i] = c
        return c

    def lookup(self, khash: int) -> ChunkRoute:
        """The chunk whose range holds ``khash``."""
        return self._at(bisect_right(self._los, khash) - 1)

    @property
    def chunks(self) -> tuple[ChunkRoute, ...]:
        """Every chunk, sorted by ``lo`` (built on first use: prefer ``lookup``)."""
        if self._chunks is None:
            self._chunks = tuple(self._at(i) for i in range(len(self._ids)))
        return self._chunks

    def same_placement(self, other: CollectionRoute) -> bool:
        """Same chunks, bounds, shards and tokens (the version may differ)."""
        return other is self or (
            self._los == other._los and self._ids == other._ids
            and self._tokens == other._tokens and self._shards == other._shards
            and self._his == other._his)

    def indexed_fields(self) -> set[str]:
        """Fields a scatter-gather find may filter on: the first field of each index."""
        return {ix.fields[0] for ix in self.indexes}

    def by_shard(self) -> dict[str, list[ChunkRoute]]:
        """The chunks of each shard (computed once per route)."""
        if self._by_shard is None:
            out: dict[str, list[ChunkRoute]] = {}
            for i, sid in enumerate(self._shards):
                out.setdefault(sid, []).append(self._at(i))
            self._by_shard = out
        return self._by_shard

    def __repr__(self) -> str:
        return (f"CollectionRoute({self.collection!r}, {len(self)} chunks, "
                f"version={self.version})")

    # -- incremental refresh -------------------------------------------------------------------

    def apply(
        self, *, version: int, shard_key: str, indexes: Iterable[IndexDefinition],
        chunk_ids: Sequence[int], los: Sequence[int], his: Sequence[int],
        shard_ids: Sequence[str], tokens: Sequence[int],
    ) -> CollectionRoute:
        """This route with the chunks written since its version replaced (see the module
        docstring): the delta's rows, sorted by ``lo``, as read at catalog ``version``.

        Work is proportional to the delta plus one copy of the columns (C-speed slices).

        Raises:
            RouteDeltaError: the rows do not tile the ranges they replace exactly.
        """
        n = len(chunk_ids)
        if not n == len(los) == len(his) == len(shard_ids) == len(tokens):
            raise RouteDeltaError(f"{self.collection}: delta columns differ in length")
        if n == 0:
            return self._with(version, shard_key, indexes, self._ids, self._los, self._his,
                              self._shards, self._tokens, check=False)
        # Group the rows into segments, each replacing one run [a, b] of cached chunks.
        segments: list[list[int]] = []  # [a, b, first row, last row]
        last = len(self._los) - 1
        for r in range(n):
            lo, hi = los[r], his[r]
            if not KHASH_MIN <= lo < hi <= KHASH_END or (r and lo < his[r - 1]):
                raise RouteDeltaError(f"{self.collection}: delta row {chunk_ids[r]} "
                                      f"[{lo}, {hi}) is out of order or empty")
            a = bisect_right(self._los, lo) - 1
            b = min(bisect_left(self._los, hi) - 1, last)
            if segments and a <= segments[-1][1]:
                seg = segments[-1]
                seg[1], seg[3] = max(seg[1], b), r
            else:
                segments.append([a, b, r, r])
        for a, b, r0, r1 in segments:
            start, end = self._los[a], self._his[b]
            if los[r0] != start or his[r1] != end or any(
                    his[r] != los[r + 1] for r in range(r0, r1)):
                raise RouteDeltaError(
                    f"{self.collection}: the delta does not tile [{start}, {end}) "
                    f"(rows {list(chunk_ids[r0:r1 + 1])}): a gap or an overlap")
        return self._with(
            version, shard_key, indexes, _splice(self._ids, chunk_ids, segments),
            _splice(self._los, los, segments), _splice(self._his, his, segments),
            _splice(self._shards, shard_ids, segments), _splice(self._tokens, tokens, segments),
            check=False)

    def _with(self, version: int, shard_key: str, indexes: Iterable[IndexDefinition],
              ids: list[int], los: list[int], his: list[int], shards: list[str],
              tokens: list[int], *, check: bool) -> CollectionRoute:
        route = CollectionRoute.__new__(CollectionRoute)
        route._init(self.collection, shard_key, tuple(indexes), version, ids, los, his,
                    shards, tokens, check=check)
        return route


T = TypeVar("T")


def _splice(old: list[T], new: Sequence[T], segments: list[list[int]]) -> list[T]:
    """``old`` with each segment's run ``old[a:b+1]`` replaced by ``new[r0:r1+1]``."""
    out: list[T] = []
    kept = 0
    for a, b, r0, r1 in segments:
        out.extend(old[kept:a])
        out.extend(new[r0:r1 + 1])
        kept = b + 1
    out.extend(old[kept:])
    return out


def _check_tiling(collection: str, ids: list[int], los: list[int], his: list[int],
                  shards: list[str], tokens: list[int]) -> None:
    """Raise ``ValueError`` unless the columns tile ``[KHASH_MIN, KHASH_END)`` in order."""
    if not len(ids) == len(los) == len(his) == len(shards) == len(tokens):
        raise ValueError(f"{collection}: chunk map columns differ in length")
    if not los or los[0] != KHASH_MIN or his[-1] != KHASH_END or his[:-1] != los[1:]:
        raise ValueError(f"{collection}: chunk map has a gap or overlap at "
                         f"{_first_break(los, his)}")
    # Adjacent bounds are equal; with every range non-empty the ranges tile the space.
    if not all(map(operator.lt, los, his)):
        raise ValueError(f"{collection}: chunk map has an empty or reversed range")


def _first_break(los: list[int], his: list[int]) -> Any:
    """Where a chunk map stops tiling (for the error message)."""
    expected = KHASH_MIN
    for lo, hi in zip(los, his, strict=False):
        if lo != expected:
            return expected
        expected = hi
    return expected


class CollectionSummary(BaseModel):
    """What the catalog knows of one collection, for listings (not for routing): its shard
    key, and its chunks' last measured statistics (estimates; 0 when never measured)."""

    model_config = ConfigDict(frozen=True)

    name: str
    shard_key: str
    chunks: int
    size_bytes: int
    doc_count: int


__all__ = ["ChunkRoute", "CollectionRoute", "CollectionSummary", "RouteDeltaError"]
