"""What a ``shardshift report`` holds (the models ``cli.report`` builds and ``cli.plot``
draws; apart so that the plots need no Temporal or catalog code)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel


class PhaseSpan(BaseModel):
    phase: str
    started_at: datetime
    seconds: float | None
    """Until the next phase started (or the move finished); None while it runs."""


class Mark(BaseModel):
    at: datetime
    t: float
    """Seconds since the move started."""
    name: str
    value: float | None = None
    detail: str | None = None


class CopyPoint(BaseModel):
    at: datetime
    t: float
    rows: int | None
    rate: float | None


class LagPoint(BaseModel):
    at: datetime
    t: float
    direction: str
    lag_bytes: int | None
    lag_s: float | None


class MoveReport(BaseModel):
    kind: str = "move"
    migration_id: str
    workflow_id: str | None = None
    move_kind: str
    collection: str
    chunk_id: int
    source: str
    target: str
    phase: str
    outcome: str | None
    """None while the move runs."""
    detail: str | None
    started_at: datetime
    finished_at: datetime | None
    seconds: float
    phases: list[PhaseSpan]
    rows: int | None
    """Rows on the target when the copy ended (the last copy sample)."""
    copy_rate_peak: float | None
    lag_bytes_peak: int | None
    lag_s_peak: float | None
    cutover_attempts: int
    pause_ms: float | None
    """The committed cutover's pause, freeze to switch committed, as the cutover measured it
    (the catalog's record, measured just before the switch, when no mark says)."""
    marks: list[Mark]
    copy_samples: list[CopyPoint]
    lag_samples: list[LagPoint]
    plot: str | None = None


class ShardBytes(BaseModel):
    shard: str
    before: int | None
    after: int | None


class FleetMove(BaseModel):
    migration_id: str
    collection: str
    chunk_id: int
    source: str
    target: str
    outcome: str | None
    pause_ms: float | None


class FleetReport(BaseModel):
    kind: str
    """drain (merge_shards, upgrade) or rebalance."""
    operation_id: str
    first_run_id: str
    status: str | None
    """Temporal's status of the operation's latest run, when Temporal answered."""
    measured_before: datetime | None
    measured_after: datetime | None
    shards: list[ShardBytes]
    moves: list[FleetMove]
    plot: str | None = None


# -- building a report (pure) -----------------------------------------------------------------
