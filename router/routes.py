"""The router's view of one collection: shard key and sorted chunk ranges, looked up by khash."""

from __future__ import annotations

from bisect import bisect_right

from pydantic import BaseModel, ConfigDict, PrivateAttr, field_validator, model_validator

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
        if self._ref is None:
            self._ref = FenceRef(chunk_id=self.chunk_id, token=self.token)
        return self._ref


class CollectionRoute(BaseModel):
    """A collection's routing table at one catalog version.

    Chunks are sorted by ``lo`` and cover the khash space exactly (validated), so a lookup is
    one binary search.
    """

    model_config = ConfigDict(frozen=True)

    collection: str
    shard_key: str
    indexes: tuple[IndexDefinition, ...] = ()
    chunks: tuple[ChunkRoute, ...]
    version: int = 0
    _los: list[int] = PrivateAttr(default_factory=list)

    @field_validator("chunks")
    @classmethod
    def _sorted(cls, chunks: tuple[ChunkRoute, ...]) -> tuple[ChunkRoute, ...]:
        return tuple(sorted(chunks, key=lambda c: c.range.lo))

    @model_validator(mode="after")
    def _covers_space(self) -> CollectionRoute:
        expected = KHASH_MIN
        for c in self.chunks:
            if c.range.lo != expected:
                raise ValueError(
                    f"{self.collection}: chunk map has a gap or overlap at {expected} "
                    f"(chunk {c.chunk_id} starts at {c.range.lo})"
                )
            expected = c.range.hi
        if expected != KHASH_END:
            raise ValueError(f"{self.collection}: chunk map ends at {expected}, not 2^63")
        self._los = [c.range.lo for c in self.chunks]
        return self

    def lookup(self, khash: int) -> ChunkRoute:
        """The chunk whose range holds ``khash``."""
        return self.chunks[bisect_right(self._los, khash) - 1]

    def indexed_fields(self) -> set[str]:
        """Fields a scatter-gather find may filter on: the first field of each index."""
        return {ix.fields[0] for ix in self.indexes}

    def by_shard(self) -> dict[str, list[ChunkRoute]]:
        out: dict[str, list[ChunkRoute]] = {}
        for c in self.chunks:
            out.setdefault(c.shard_id, []).append(c)
        return out


class CollectionSummary(BaseModel):
    """What the catalog knows of one collection, for listings (not for routing): its shard
    key, and its chunks' last measured statistics (estimates; 0 when never measured)."""

    model_config = ConfigDict(frozen=True)

    name: str
    shard_key: str
    chunks: int
    size_bytes: int
    doc_count: int
