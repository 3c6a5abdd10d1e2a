"""A move's timeline and the loads of a fleet operation, as the catalog stores them.

Observations, not metadata (like chunk statistics): written by a move's activities without a
catalog version bump, read by ``shardshift report``. Timestamps are the recording worker's
clock at the moment of the observation (samples are written in batches, later).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

MAX_SAMPLES_PER_KIND = 2000
"""Copy or lag samples kept per move: past it, every second one is dropped (the timeline
keeps its whole span at half the resolution)."""
MAX_MARKS = 500
"""Marks kept per move (phase starts, verify, cutover attempts, the outcome); later ones are
dropped."""


class SampleKind(StrEnum):
    COPY = "copy"
    """``rows``: rows the target holds so far (committed parts); ``rate``: rows per second
    since the recorder's previous sample."""
    LAG = "lag"
    """``lag_bytes``: source WAL not yet applied on the target; ``lag_s``: commit-time lag of
    the last applied transaction. ``name``: the stream's direction (``fwd``, ``rev``)."""
    MARK = "mark"
    """A moment: ``name`` says which (``phase.<phase>``, ``verify.start``, ``verify.done``,
    ``cutover.start``, ``cutover.commit``, ``cutover.undone``, ``finish``); ``value`` and
    ``detail`` carry its figure and words (a cutover's pause in ms, an outcome)."""


class MarkName(StrEnum):
    VERIFY_START = "verify.start"
    VERIFY_DONE = "verify.done"
    CUTOVER_START = "cutover.start"
    """The source froze: the pause starts (``detail``: the direction)."""
    CUTOVER_COMMIT = "cutover.commit"
    """The catalog switched: the pause ends (``value``: the pause in ms)."""
    CUTOVER_UNDONE = "cutover.undone"
    """An attempt that did not commit and was undone (``detail``: why)."""
    CUTOVER_FAILED = "cutover.failed"
    """An attempt that froze and then failed (a retry or the catalog settles it)."""
    CUTOVER_RESOLVED = "cutover.resolved"
    """A cutover settled from the catalog by a later attempt or after its activity failed
    for good (``value``: the pause in ms when it had committed)."""
    FINISH = "finish"
    """The record closed (``detail``: the outcome)."""


def phase_mark(phase: str) -> str:
    """The mark of a phase's start."""
    return f"phase.{phase}"


class MoveSample(BaseModel):
    """One sample or mark of a move's timeline."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    at: datetime
    kind: SampleKind
    name: str = Field(default="", max_length=100)
    rows: int | None = None
    rate: float | None = None
    lag_bytes: int | None = None
    lag_s: float | None = None
    value: float | None = None
    detail: str | None = Field(default=None, max_length=500)


class LoadStage(StrEnum):
    BEFORE = "before"
    """Measured by the operation's first plan."""
    AFTER = "after"
    """Measured by its latest plan or its finish."""


class ShardLoad(BaseModel):
    """Bytes on one shard at one stage of a drain or rebalance."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    operation_id: str
    """The workflow id of the drain or rebalance."""
    first_run_id: str
    """The first run of its chain (a continued run records under the same one)."""
    kind: str
    stage: LoadStage
    shard_id: str
    bytes: int = Field(ge=0)
    measured_at: datetime


__all__ = ["MAX_MARKS", "MAX_SAMPLES_PER_KIND", "LoadStage", "MarkName", "MoveSample",
           "SampleKind", "ShardLoad", "phase_mark"]
