"""Inputs, outputs and checkpoints of the migration activities (frozen pydantic models).

They cross the Temporal boundary through the pydantic data converter, so everything a
workflow decides with is typed and validated on both sides.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from catalog.models import MigrationKind, MigrationOutcome, MigrationPhase
from shards.models import KeyRange
from shards.postgres.throttle import ThrottleSettings


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


MAX_DURATION_S = 10 * 366 * 86_400.0
"""The longest duration a workflow or activity input may carry: ten years. A duration
becomes a ``timedelta`` and a Temporal protobuf ``Duration`` in the workflow; ``1e300``
seconds is finite but overflows both (the workflow task would fail on it, again and again)."""


class BoundedDurations(BaseModel):
    """A model whose ``..._s`` fields (durations in seconds; rates end in ``per_s``) are at
    most ``MAX_DURATION_S``. Combine with ``allow_inf_nan=False`` for finiteness."""

    @model_validator(mode="after")
    def _durations_bounded(self) -> Self:
        for name in type(self).model_fields:
            value = getattr(self, name)
            if (name.endswith("_s") and not name.endswith("per_s")
                    and isinstance(value, int | float) and not isinstance(value, bool)
                    and abs(value) > MAX_DURATION_S):
                raise ValueError(f"{name} is {value!r} seconds: at most {MAX_DURATION_S:.0f} "
                                 "(ten years)")
        return self


class _Input(_Frozen, BoundedDurations):
    """An activity's input: its floats are durations and limits, never inf or NaN (a
    workflow hands them to ``timedelta``, which raises on them), and no duration is longer
    than ``MAX_DURATION_S``."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class MoveSpec(_Input):
    """Everything about one chunk move that stays fixed while it runs."""

    migration_id: str
    kind: MigrationKind = MigrationKind.MOVE
    collection: str
    chunk_id: int
    key_range: KeyRange
    source: str
    target: str
    token: int
    """The chunk's token when the move was registered (the cutover CAS expects it)."""
    lease_ttl_s: float | None = None
    """Lifetime of the move's leases (None: the catalog's default); they are renewed every
    third of it while the move's activities run."""


class RegisterInput(_Input):
    migration_id: str
    kind: MigrationKind = MigrationKind.MOVE
    collection: str
    chunk_id: int
    target: str
    holder: str
    """Who holds the move leases (the workflow id)."""
    lease_ttl_s: float | None = Field(default=None, gt=0)
    """Lifetime of the move's leases (None: the catalog's default)."""


class RegisteredInput(_Input):
    migration_id: str


class PhaseInput(_Input):
    migration_id: str
    phase: MigrationPhase
    detail: str | None = None
    lease_ttl_s: float | None = None
    """The move's lease lifetime (None: the catalog's default): recording a phase renews them."""


class FinishInput(_Input):
    spec: MoveSpec
    outcome: MigrationOutcome
    detail: str | None = None


class SnapshotInput(_Input):
    spec: MoveSpec
    part_rows: int = Field(default=50_000, ge=100)
    throttle: ThrottleSettings | None = None
    """Limits of the export's reads of the source (rate, and a pause while it is busy)."""
    staging_id: str | None = None
    """Names the staged files and import progress rows (None: the migration id). A copy
    redone on another worker after its pinned worker was lost stages under a new one."""


class SnapshotResult(_Frozen):
    consistent_lsn: str
    parts: int
    rows: int
    bytes: int


class ImportInput(_Input):
    spec: MoveSpec
    follow_export_s: float | None = 600.0
    """Import parts as the export writes them (None: only parts already staged)."""
    staging_id: str | None = None
    """As ``SnapshotInput.staging_id``."""


class ImportResult(_Frozen):
    parts: int
    rows: int


class CopyProgressInput(_Input):
    spec: MoveSpec
    count_source: bool = False
    staging_id: str | None = None
    """As ``SnapshotInput.staging_id``."""


class StagingHome(_Frozen):
    """Where a move's copy runs: the task queue of the worker whose staging area holds the
    parts, or None when every worker shares one staging area (any worker may import)."""

    task_queue: str | None


class ReleaseStagingInput(_Input):
    staging_id: str


class CopyProgress(_Frozen):
    rows_total: int | None
    rows_imported: int
    parts_imported: int
    parts_total: int | None


class CopyCheckpoint(_Frozen):
    """Heartbeat details of snapshot and import: shown in the Temporal UI."""

    stage: str
    rows_done: int
    parts_done: int
    parts_total: int


class Direction(StrEnum):
    FORWARD = "fwd"
    """Source to target, before the cutover."""
    REVERSE = "rev"
    """Target back to source, during the rollback window."""


class ReplicateInput(_Input):
    spec: MoveSpec
    direction: Direction = Direction.FORWARD
    throttle: ThrottleSettings | None = None
    """Pause the applier while the stream's source is busy (``max_active``), within the lag
    bound ``max_apply_lag_bytes`` and never in the cutover (``shards/postgres/throttle.py``)."""


class ReplicateCheckpoint(_Frozen):
    """Heartbeat details of a running stream (resume comes from the target's origin)."""

    direction: Direction
    applied_lsn: str
    applied_txns: int
    applied_changes: int
    lag_s: float
    throttled: str | None = None
    """Why the applier is paused by its throttle now (None: it runs)."""


class ReplicateResult(_Frozen):
    applied_txns: int
    applied_changes: int
    applied_lsn: str


class LagInput(_Input):
    spec: MoveSpec
    direction: Direction = Direction.FORWARD


class LagResult(_Frozen):
    lag_bytes: int
    lag_s: float | None
    applied_lsn: str | None
    streaming: bool
    """The stream's state row exists (the applier has started at least once)."""


class WaitLagInput(_Input):
    """``wait_caught_up``: poll the stream's lag inside one activity (few history events)."""

    spec: MoveSpec
    direction: Direction = Direction.FORWARD
    max_lag_bytes: int = 4 * 1024 * 1024
    poll_s: float = Field(default=1.0, gt=0)
    window_s: float = Field(default=60.0, gt=0)
    """Return after this long even if not caught up (the workflow then decides again)."""


class ReachableInput(_Input):
    """``wait_reachable``: probe a shard until it answers or the window ends."""

    shard: str
    window_s: float = Field(default=60.0, gt=0)
    poll_s: float = Field(default=1.0, gt=0)
    """First probe interval; it grows to ``max_poll_s``."""
    max_poll_s: float = Field(default=10.0, gt=0)


class ReachableResult(_Frozen):
    reachable: bool
    probes: int
    error: str | None = None
    """The last probe's error (what an operator sees in the progress detail)."""


class VerifyInput(_Input):
    spec: MoveSpec
    buckets: int = Field(default=64, ge=1, le=65_536)
    max_repair_rounds: int = Field(default=3, ge=0)
    hold_timeout_s: float = 60.0


class VerifyResult(_Frozen):
    verified: bool
    documents: int
    buckets: int
    mismatched_buckets: int
    repaired_ranges: int
    rounds: int
    lsn: str
    digest: str | None = None
    """The source's content digest at ``lsn`` (sum of the buckets' digests, 64-bit, hex)."""
    seconds: float = 0.0
    verification_id: int | None = None
    """The report recorded in the catalog (``shardshift verify --show``); None in results of
    moves that predate the reports."""


class CutoverInput(_Input):
    spec: MoveSpec
    direction: Direction = Direction.FORWARD
    max_lag_bytes: int = 4 * 1024 * 1024
    """Admission: start the pause only when the stream is this close to the source."""
    catchup_timeout_s: float = 2.0
    """Longest the writes may stay paused waiting for the target to apply the freeze."""
    dry_run: bool = False
    """Deprecated, always False. A dry run is the workflow's (``MigrateChunkInput.dry_run``
    runs ``migrate.plan`` and nothing else), never a cutover's: the field stays only so
    inputs recorded in earlier histories, which carry ``"dry_run": false``, still decode
    (the model forbids unknown fields). True is refused, so no caller can believe it asked a
    cutover activity for a dry run while it runs a real one."""
    rollback_window_s: float | None = None
    """The move's rollback window: the reverse stream is created only when it is open
    (None: not said, as from callers that predate this field: created, as before)."""

    @field_validator("dry_run")
    @classmethod
    def _no_dry_run(cls, value: bool) -> bool:
        if value:
            raise ValueError("a cutover has no dry run: use MigrateChunkInput.dry_run, which "
                             "plans the move (migrate.plan) and changes nothing")
        return value

    @property
    def reverse_stream(self) -> bool:
        """Whether a forward cutover prepares the rollback window's reverse stream."""
        return self.rollback_window_s is None or self.rollback_window_s > 0


class PlanInput(_Input):
    migration_id: str
    collection: str
    chunk_id: int
    target: str
    max_lag_bytes: int = 4 * 1024 * 1024
    catchup_timeout_s: float = 2.0
    rollback_window_s: float | None = None


class CutoverStep(_Frozen):
    name: str
    description: str
    ms: float | None = None
    done: bool = False


class CutoverResult(_Frozen):
    committed: bool
    """The catalog now places the chunk on the new owner (the commit point passed)."""
    new_token: int | None = None
    new_owner: str | None = None
    pause_ms: float | None = None
    steps: list[CutoverStep] = []
    reason: str | None = None
    """Why the cutover did not commit (admission refused, catch-up timeout, ...)."""


class CleanupInput(_Input):
    spec: MoveSpec
    outcome: MigrationOutcome
    delete_batch: int = 5_000
    delete_pause_s: float = 0.0
    target_lost: bool = False
    """Abort only: the target is unreachable for good; clean the source side and leave the
    target's leftovers (fence, partial rows, stream state) to ``shardshift doctor``."""


class CleanupResult(_Frozen):
    rows_deleted: int
    slots_dropped: int
    publications_dropped: int
    origins_dropped: int


class DeleteCheckpoint(_Frozen):
    rows_deleted: int
    after_khash: int | None = None
    after_id: str | None = None


# -- draining shards (merges and upgrades) ------------------------------------------------------


class DrainPlanInput(_Input):
    shards: list[str] = Field(min_length=1)
    """The shards to empty and retire."""
    targets: list[str] | None = None
    """Where the chunks may go (default: every other active shard of the same engine; for an
    upgrade, only those of a newer major version)."""
    kind: MigrationKind = MigrationKind.MERGE_SHARDS


class PlannedMove(_Frozen):
    collection: str
    chunk_id: int
    source: str
    target: str
    bytes: int
    """Estimated size (table and index bytes in proportion to the chunk's rows)."""
    ops_per_s: float = 0.0
    """The chunk's measured traffic (``chunk_stats.ops_per_s``) when it was planned."""


class DrainPlan(_Frozen):
    moves: list[PlannedMove]
    targets: list[str]
    bytes_total: int
    target_bytes_after: dict[str, int]
    """Estimated bytes on each target once the planned moves are done."""


class DrainFinishInput(_Input):
    shards: list[str]


class DrainFinishResult(_Frozen):
    retired: list[str]
    chunks_left: dict[str, int]
    """Drained shards that still hold chunks (a failed move): not retired."""


class DrainRestoreInput(_Input):
    shards: list[str]


# -- rebalancing ---------------------------------------------------------------------------------


class RebalancePlanInput(_Input):
    tolerance: float = Field(default=0.2, gt=0)
    """Spread allowed between the most and the least loaded shard, as a fraction of the mean."""
    max_moves: int = Field(default=4, ge=0)
    """Moves planned at most (0: only measure)."""
    max_moves_per_shard: int = Field(default=2, ge=1)
    split: bool = True
    """Split a chunk too large to move usefully (a metadata change) instead of giving up."""
    collections: list[str] | None = None
    """Balance only these collections' chunks (default: all)."""
    shards: list[str] | None = None
    """Balance only across these active shards (default: every active shard)."""


class PlannedSplit(_Frozen):
    collection: str
    chunk_id: int
    shard: str
    bytes: int
    ops_per_s: float = 0.0
    reason: str = "size"
    """``size``: too large to move usefully; ``hot``: too much traffic for one shard."""


class RebalancePlan(_Frozen):
    loads: dict[str, int]
    """Estimated bytes per active shard now."""
    loads_after: dict[str, int]
    """Estimated bytes per active shard once the planned moves are done."""
    moves: list[PlannedMove]
    splits: list[PlannedSplit]
    ops: dict[str, float] = {}
    """Measured operations per second per active shard now (empty: no traffic measured)."""
    ops_after: dict[str, float] = {}
    """Operations per second per active shard once the planned moves are done."""
    busy_chunks: int = 0
    """Chunks left out because a migration is moving them."""


class SplitInput(_Input):
    collection: str
    chunk_id: int
    child_ids: list[int] = Field(min_length=2, max_length=2)


class AllocateIdsInput(_Input):
    n: int = Field(ge=1, le=1000)
