"""The move's models and pure helpers: its input, result, progress and continue-as-new state,
the patch ids its workflow code branches on, and the phases before the commit point.

Shared by ``workflows/migrate_chunk.py`` (the workflow), its step classes
(``workflows/move_pauses.py``, ``workflows/move_commit.py``) and the code that starts, watches
or reports moves (they import these names from ``workflows.migrate_chunk``, which re-exports
them).
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, field_validator
from temporalio import workflow
from temporalio.exceptions import ApplicationError, FailureError

with workflow.unsafe.imports_passed_through():
    from activities.models import BoundedDurations, CutoverStep, MoveSpec, VerifyResult
    from catalog.models import MigrationKind, MigrationOutcome
    from catalog.store import check_shard_id
    from shards.names import check_collection
    from shards.postgres.throttle import ThrottleSettings

# -- patch ids (``workflow.patched``): each names a change to the commands the move issues ------

BOUNDED_HISTORY = "bounded-history"
"""Patch id: lag waits inside one activity, copy polls back off, continue-as-new, pauses on
an unreachable shard, ``TargetLost``."""
CUTOVER_PAUSES = "cutover-pauses"
"""Patch id: an unreachable shard during the forward cutover pauses the move (after the
attempt is settled from the catalog) instead of using up the cutover's attempts."""
RESOLVE_CUTOVER = "resolve-cutover"
"""Patch id: a forward cutover activity that failed for good is settled from the catalog
(rolled forward if its switch committed) before the move is undone."""
RESOLVE_ROLLBACK_CUTOVER = "resolve-rollback-cutover"
"""Patch id: a rollback (reverse) cutover that failed for good is settled from the catalog
instead of failing the workflow."""
AFTER_COMMIT_UNTIL_DONE = "after-commit-until-done"
"""Patch id: after the commit point a step that failed for good is tried again after a pause
(instead of failing the workflow)."""
PINNED_STAGING = "pinned-staging"
"""Patch id: with staging private to each worker's host, the copy (export, import, progress
samples) runs on the task queue of the worker that ``migrate.staging_home`` names, and is
redone elsewhere under a new staging id when that worker stops taking tasks."""

TARGET_LOST = "TargetLost"
"""``ApplicationError.type`` of a move given up because its target is lost (fleet workflows
re-plan the chunk on it)."""
BEFORE_COMMIT = {"starting", "registered", "snapshot", "import", "replicate", "verify", "cutover"}
"""``progress.phase`` values before the commit point (a target can be declared lost then)."""


class MigrateChunkInput(BoundedDurations):
    """What to move and how. Durations are seconds (settings a test can shorten)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    collection: str
    chunk_id: int = Field(ge=1, lt=2**63)
    target: str
    kind: MigrationKind = MigrationKind.MOVE
    part_rows: int = Field(default=50_000, ge=100)
    max_lag_bytes: int = Field(default=4 * 1024 * 1024, ge=0)
    """Cutover admission: the stream must be at most this far behind."""
    catchup_timeout_s: float = Field(default=2.0, gt=0)
    """Longest the writes may stay paused waiting for the target to apply the freeze."""
    cutover_attempts: int = Field(default=10, ge=1)
    cutover_retry_s: float = Field(default=2.0, ge=0)
    poll_s: float = Field(default=1.0, gt=0)
    """How often lag and copy progress are sampled."""
    rollback_window_s: float = Field(default=0.0, ge=0)
    """How long after the cutover a ``rollback`` update is accepted (0: no window)."""
    verify_buckets: int = Field(default=64, ge=1, le=65_536)
    verify: bool = True
    delete_batch: int = Field(default=5_000, ge=1)
    delete_pause_s: float = Field(default=0.0, ge=0)
    dry_run: bool = False
    cutover_heartbeat_s: float = Field(default=2.0, gt=0)
    """Heartbeat timeout of the cutover activity: bounds how long a crashed worker can leave
    the source frozen (plus the retry's recovery)."""
    heartbeat_timeout_s: float = Field(default=30.0, gt=0)
    """Heartbeat timeout of the long-running activities (snapshot, import, replicate, verify,
    cleanup): how soon a crashed worker's activity is retried elsewhere."""
    after_commit_retry_s: float = Field(default=5.0, gt=0)
    """After the commit point a step that failed for good is tried again after this long,
    doubling up to 5 minutes, until it succeeds."""
    lease_ttl_s: float | None = Field(default=None, gt=0)
    """Lifetime of the move's leases (None: the catalog's default); renewed while it runs."""
    target_give_up_s: float = Field(default=1800.0, gt=0)
    """How long an unreachable target is waited for before the move aborts (``TargetLost``)."""
    history_events_limit: int = Field(default=10_000, ge=50)
    """Continue as new once a run's history has this many events (or Temporal suggests it)."""
    progress_poll_max_s: float = Field(default=30.0, gt=0)
    """Copy progress is sampled every ``poll_s`` at first, backing off to this."""
    lag_window_s: float = Field(default=60.0, gt=0)
    """Longest one ``wait_caught_up`` / ``wait_reachable`` call waits before reporting."""
    pinned_start_timeout_s: float = Field(default=120.0, gt=0)
    """With staging private to each host, the copy runs on one worker's own task queue; a
    copy activity that no worker starts there within this long means that worker is gone:
    the copy is redone on another one."""
    copy_throttle: ThrottleSettings | None = None
    """Limits of the move's reads of the source: the bulk copy's rows/s and bytes/s, and a
    pause of the copy and of the forward stream's apply while the source has more active
    sessions than ``max_active`` (the apply within ``max_apply_lag_bytes``, never in the
    cutover) (``rebalance --max-copy-rate``, ``--throttle-active``)."""
    resume: MigrateChunkResume | None = None
    """Set by continue-as-new only: where the previous run of this move stopped."""

    @field_validator("collection")
    @classmethod
    def _collection(cls, v: str) -> str:
        return check_collection(v)

    @field_validator("target")
    @classmethod
    def _target(cls, v: str) -> str:
        return check_shard_id(v)


class MigrateChunkResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    migration_id: str
    outcome: MigrationOutcome
    source: str | None = None
    target: str
    documents: int = 0
    pause_ms: float | None = None
    rollback_pause_ms: float | None = None
    cutover_attempts: int = 0
    verified: bool | None = None
    phase_seconds: dict[str, float] = {}
    plan: list[CutoverStep] = []
    detail: str | None = None
    verification: VerifyResult | None = None
    """The verify phase's report (buckets, mismatches, repairs, the LSN; its id in the
    catalog's ``verifications``). None: not verified, or a move from before the reports."""
    dry_run: bool = False
    """A plan only (``outcome`` is then ``dry_run``): nothing was registered or moved."""


class Progress(BaseModel):
    """Answer of the ``progress`` query."""

    migration_id: str = ""
    phase: str = "starting"
    source: str | None = None
    target: str | None = None
    rows_total: int | None = None
    rows_copied: int = 0
    parts_copied: int = 0
    parts_total: int | None = None
    lag_bytes: int | None = None
    lag_s: float | None = None
    pause_ms: float | None = None
    cutover_attempts: int = 0
    rollback_open: bool = False
    outcome: str | None = None
    detail: str | None = None
    waiting_for: str | None = None
    """The shard the move is paused for (unreachable), None while it runs."""
    run: int = 1
    """Which run of the workflow answers (continue-as-new starts the next one)."""


class Stage(StrEnum):
    """Where a continued run picks the move up (before the commit point only)."""

    COPY = "copy"
    REPLICATE = "replicate"
    CUTOVER = "cutover"


class MigrateChunkResume(BaseModel):
    """What a move carries into its next run (continue-as-new)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    migration_id: str
    """Never changes across runs (it names slots, staging files, the catalog record)."""
    spec: MoveSpec
    stage: Stage
    progress: Progress
    phase_started: dict[str, datetime] = {}
    phase_seconds: dict[str, float] = {}
    documents: int | None = None
    verified: bool | None = None
    verification: VerifyResult | None = None
    waiting_for: str | None = None
    waiting_since: datetime | None = None
    target_declared_lost: bool = False
    staging_queue: str | None = None
    """The task queue the copy is pinned to (None: not pinned, or not chosen yet)."""
    staging_gen: int = 0
    """How many times the copy was redone on another worker (names its staging id)."""


def describe_failure(exc: BaseException) -> str:
    """What a person needs from a failure chain: the innermost cause's type and message
    (an ``ActivityError`` only says "Activity task failed")."""
    cur: BaseException = exc
    while isinstance(cur, FailureError) and cur.cause is not None:
        cur = cur.cause
    kind = cur.type if isinstance(cur, ApplicationError) and cur.type else type(cur).__name__
    message = cur.message if isinstance(cur, FailureError) else str(cur)
    return f"{kind}: {message}"


def migration_id_for(workflow_id: str, run_id: str) -> str:
    """A catalog/staging-safe id, unique per run, stable across activity retries."""
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", workflow_id).lstrip("_.-") or "move"
    # Run ids are UUIDv7: the leading characters are a timestamp, the tail is random.
    return f"{base[:80]}.{run_id.replace('-', '')[-12:]}"


MigrateChunkInput.model_rebuild()
