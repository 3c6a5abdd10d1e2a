"""Typed models shared by every shard engine."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shards.names import check_field_path, check_index_name

KHASH_MIN = -(2**63)
KHASH_END = 2**63
"""``khash`` space: signed 64-bit; chunk ranges are half-open ``[lo, hi)`` within
``[KHASH_MIN, KHASH_END)``. ``hi == KHASH_END`` is stored as NULL (it does not fit a bigint)."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KeyRange(_Frozen):
    """A half-open range ``[lo, hi)`` of the khash space."""

    lo: int = Field(ge=KHASH_MIN, lt=KHASH_END)
    hi: int = Field(gt=KHASH_MIN, le=KHASH_END)

    @model_validator(mode="after")
    def _ordered(self) -> KeyRange:
        if self.lo >= self.hi:
            raise ValueError(f"empty key range [{self.lo}, {self.hi})")
        return self

    def contains(self, khash: int) -> bool:
        return self.lo <= khash < self.hi

    def split(self, parts: int) -> list[KeyRange]:
        """``parts`` contiguous sub-ranges of (nearly) equal width covering this range."""
        width = self.hi - self.lo
        parts = max(1, min(parts, width))
        bounds = [self.lo + (width * i) // parts for i in range(parts)] + [self.hi]
        return [KeyRange(lo=a, hi=b) for a, b in zip(bounds, bounds[1:], strict=False)]

    @property
    def sql_hi(self) -> int | None:
        """``hi`` as stored in SQL (NULL for the top of the space)."""
        return None if self.hi == KHASH_END else self.hi


class FenceState(StrEnum):
    RECEIVING = "receiving"
    ACTIVE = "active"
    FROZEN = "frozen"
    RETIRED = "retired"


class Fence(_Frozen):
    """A shard's ``chunk_fence`` row: what it holds or receives, at which token, in which state."""

    collection: str
    chunk_id: int
    range: KeyRange
    token: int
    state: FenceState


class FenceRef(_Frozen):
    """What a routed operation carries: the chunk it addresses and the token it expects."""

    chunk_id: int
    token: int


class IndexDefinition(_Frozen):
    """A secondary index on one or more field paths (equality lookups)."""

    name: str
    fields: tuple[str, ...] = Field(min_length=1, max_length=4)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_index_name(v)

    @field_validator("fields")
    @classmethod
    def _fields(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for f in v:
            check_field_path(f)
        return v
