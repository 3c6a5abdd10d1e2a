"""What the catalog stores and returns: frozen pydantic models, one per kind of record.

Every model is immutable and validated on construction, so a value read from the catalog can
be passed between the router, the activities and Temporal (the pydantic data converter)
without anyone mutating a shared copy.

Chunk statistics (size, documents, load) travel with each ``Chunk`` but are observations, not
metadata: they are stored apart from the layout and updating them is not a catalog change
(no version bump, no notification), so frequent stats reports never invalidate routers' maps
nor conflict with a cutover's compare-and-set.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shards.models import KHASH_END, KHASH_MIN, FenceRef, IndexDefinition, KeyRange


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# -- shards ----------------------------------------------------------------------------------


class ShardState(StrEnum):
    ACTIVE = "active"
    """Serves traffic and receives chunks."""
    DRAINING = "draining"
    """Serves the chunks it holds; receives none (being emptied by a merge or an upgrade)."""
    RETIRED = "retired"
    """Holds no chunk; kept for the audit trail of the migrations that touched it."""


class ShardInfo(_Frozen):
    """A registered shard: where it is, what it runs, whether it takes chunks."""

    shard_id: str
    address: str
    """libpq DSN (``host=... port=... dbname=... user=... passfile=...``); never a password."""
    engine: str
    major_version: int
    state: ShardState
    capacity_bytes: int | None = None
    """Storage the planner may fill (a hint; None: unknown)."""
    capacity_ops_per_s: float | None = None
    """Load the planner may place (a hint; None: unknown)."""
    registered_at: datetime
    updated_at: datetime


class ShardUsage(_Frozen):
    """What the catalog says a shard holds now (``Catalog.shard_usage``)."""

    shard_id: str
    chunks: int = 0
    collections: int = 0
    moves_in: int = 0
    """Active migrations with this shard as their target."""
    moves_out: int = 0
    """Active migrations with this shard as their source."""


# -- collections and chunks -----------------------------------------------------------------


class CollectionInfo(_Frozen):
    """A sharded collection: its shard key and the indexes every shard holding it must have."""

    name: str
    shard_key: str
    indexes: tuple[IndexDefinition, ...] = ()
    created_at: datetime
    layout_version: int
    """Catalog version of the last change to this collection's chunks or definition."""


class Chunk(_Frozen):
    """A ``[lo, hi)`` range of a collection's khash space, placed on one shard at one token."""

    collection: str
    chunk_id: int
    range: KeyRange
    shard_id: str
    token: int = Field(ge=1)
    size_bytes: int = 0
    doc_count: int = 0
    ops_per_s: float = 0.0
    stats_at: datetime | None = None
    """When the statistics were measured (None: never; the values are estimates)."""
    updated_at: datetime

    @property
    def ref(self) -> FenceRef:
        """What a routed operation on this chunk carries to the shard's fence."""
        return FenceRef(chunk_id=self.chunk_id, token=self.token)


class ChunkStats(_Frozen):
    """One measurement of a chunk, reported by a shard sampler or the rebalancer."""

    chunk_id: int
    size_bytes: int = Field(ge=0)
    doc_count: int = Field(ge=0)
    ops_per_s: float = Field(ge=0)


class ChunkMap(_Frozen):
    """A consistent snapshot of one collection's chunks, sorted by ``lo``.

    ``version`` is the catalog version the snapshot was read at: a router holding it ignores
    notifications at or below it.
    """

    collection: CollectionInfo
    chunks: tuple[Chunk, ...]
    version: int

    @model_validator(mode="after")
    def _sorted(self) -> ChunkMap:
        los = [c.range.lo for c in self.chunks]
        if los != sorted(los):
            raise ValueError("chunk map chunks must be sorted by range.lo")
        return self

    def locate(self, khash: int) -> Chunk:
        """The chunk holding ``khash``. A map read from the catalog covers the whole space."""
        if not KHASH_MIN <= khash < KHASH_END:
            raise ValueError(f"khash {khash} is outside the signed 64-bit space")
        i = bisect_right(self.chunks, khash, key=lambda c: c.range.lo) - 1
        if i < 0 or not self.chunks[i].range.contains(khash):
            raise LookupError(f"no chunk of {self.collection.name} holds khash {khash}")
        return self.chunks[i]

    def chunk(self, chunk_id: int) -> Chunk | None:
        return next((c for c in self.chunks if c.chunk_id == chunk_id), None)

    def on_shard(self, shard_id: str) -> list[Chunk]:
        return [c for c in self.chunks if c.shard_id == shard_id]


@dataclass(frozen=True, slots=True)
class RouteColumns:
    """What a router needs of a collection's chunks, as parallel columns sorted by ``lo``:
    the fast read of a whole map (``complete``), or the rows changed since ``since``.

    A plain dataclass, not a validated model: at 100,000 chunks per-row models cost more than
    the read itself. The router validates the columns as a whole (they must tile the khash
    space, or a delta must tile the ranges it replaces) before it uses them.
    """

    collection: CollectionInfo
    version: int
    """The catalog version of the snapshot read."""
    complete: bool
    """The whole map (True) or only the chunks written after ``since`` (False)."""
    since: int
    chunk_ids: list[int]
    los: list[int]
    his: list[int]
    """Exclusive upper bounds (``KHASH_END`` for the top of the space)."""
    shard_ids: list[str]
    tokens: list[int]

    def __len__(self) -> int:
        return len(self.chunk_ids)


# -- migrations and leases ------------------------------------------------------------------


class MigrationKind(StrEnum):
    """Why a chunk moves: the kind of operation that started the migration."""

    MOVE = "move"
    SPLIT_SHARD = "split_shard"
    MERGE_SHARDS = "merge_shards"
    UPGRADE = "upgrade"
    REBALANCE = "rebalance"


class MigrationPhase(StrEnum):
    """The phases of a chunk migration (design: "A chunk migration, phase by phase")."""

    REGISTERED = "registered"
    SNAPSHOT = "snapshot"
    IMPORT = "import"
    REPLICATE = "replicate"
    VERIFY = "verify"
    CUTOVER = "cutover"
    ROLLBACK_WINDOW = "rollback_window"
    CLEANUP = "cleanup"
    DONE = "done"


class MigrationOutcome(StrEnum):
    COMPLETED = "completed"
    """The chunk lives on the target; the source copy is gone."""
    ROLLED_BACK = "rolled_back"
    """Cut over, then moved back to the source during the rollback window."""
    ABORTED = "aborted"
    """Cancelled or failed before the commit point; the chunk never left the source."""
    FAILED = "failed"
    """Stopped by an error a person must look at (the record's ``detail`` says which)."""
    DRY_RUN = "dry_run"
    """A plan only: nothing was registered or moved. Only in results of dry runs; never a
    migration record's outcome (``finish_migration`` refuses it)."""


class MigrationRecord(_Frozen):
    """The catalog's record of one chunk migration; at most one is active per chunk."""

    migration_id: str
    kind: MigrationKind
    collection: str
    chunk_id: int
    source: str
    target: str
    phase: MigrationPhase
    outcome: MigrationOutcome | None = None
    """None while the migration is active."""
    token_before: int
    """The chunk's token when the migration was registered."""
    cutover_token: int | None = None
    """The chunk's token after this migration's last placement change (None: not cut over).
    A caller whose ``move_chunk`` reply was lost compares it with its expected token + 1."""
    cutover_shard: str | None = None
    """Where this migration's last placement change put the chunk."""
    pause_ms: float | None = None
    """Writes paused (freeze to catalog switch) at the last cutover, in milliseconds."""
    detail: str | None = None
    started_at: datetime
    updated_at: datetime
    committed_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def active(self) -> bool:
        return self.outcome is None


class VerificationKind(StrEnum):
    """What a verification compared."""

    MOVE = "move"
    """A move's verify phase: source and target at one LSN (the applier held there),
    mismatched buckets re-copied and checked again."""
    IN_FLIGHT = "in_flight"
    """On demand, a move in flight: source and target at one LSN, compared only (no repair)."""
    SETTLED = "settled"
    """On demand, a settled chunk: its owner's checksums, and rows of its range on any other
    shard (orphans)."""


class VerificationReport(_Frozen):
    """One verification of one chunk, as the catalog records it (``shardshift verify``)."""

    verification_id: int | None = None
    """Assigned by the catalog when recorded."""
    kind: VerificationKind
    collection: str
    chunk_id: int
    shard_id: str
    """The shard checked: the move's target, or the settled chunk's owner."""
    source: str | None = None
    """The move's source (None for a settled chunk)."""
    migration_id: str | None = None
    lsn: str | None = None
    """The source LSN both sides were compared at (None for a settled chunk)."""
    buckets: int = Field(ge=0)
    documents: int = Field(ge=0)
    """Rows in the chunk's range (on the source for a move)."""
    mismatched_buckets: int = Field(default=0, ge=0)
    """Buckets that differed at the first comparison."""
    repaired_ranges: int = Field(default=0, ge=0)
    rounds: int = Field(default=1, ge=0)
    orphans: dict[str, int] = {}
    """Rows of the chunk's range found on shards that do not own it, by shard."""
    digest: str | None = None
    """The chunk's content digest (the buckets' sums, 64-bit, hex): equal digests, equal rows."""
    ok: bool
    """Equal (a move) or owner-only (a settled chunk)."""
    detail: str | None = None
    seconds: float = Field(default=0.0, ge=0)
    created_at: datetime | None = None


class Lease(_Frozen):
    """A move's claim on one shard's move capacity, valid until ``expires_at``.

    ``lease_id`` is ``"{migration_id}@{shard_id}"``: taking it again (a retried activity)
    renews it instead of taking a second slot.
    """

    lease_id: str
    shard_id: str
    migration_id: str
    holder: str
    acquired_at: datetime
    expires_at: datetime

    def live(self, now: datetime) -> bool:
        return self.expires_at > now


def lease_id(migration_id: str, shard_id: str) -> str:
    return f"{migration_id}@{shard_id}"


# -- changes and checks ----------------------------------------------------------------------


class ChangeKind(StrEnum):
    LAYOUT = "layout"
    """A collection was created or dropped, or its chunks split, merged or moved."""
    SHARDS = "shards"
    """A shard was registered or changed address or state."""
    MIGRATION = "migration"
    """A migration was registered, changed phase or finished (no routing change)."""
    LEASE = "lease"
    """A move lease was taken or released (no routing change)."""
    RESYNC = "resync"
    """Emitted by ``Catalog.listen`` when it (re)starts listening: notifications may have been
    missed, so re-read every map you hold."""


class CatalogChange(_Frozen):
    """One catalog change notification (``pg_notify('shardshift_catalog', ...)``)."""

    version: int
    change: ChangeKind
    collection: str | None = None

    @property
    def affects_routing(self) -> bool:
        return self.change in (ChangeKind.LAYOUT, ChangeKind.SHARDS, ChangeKind.RESYNC)


class ViolationKind(StrEnum):
    GAP = "gap"
    OVERLAP = "overlap"
    NO_CHUNKS = "no_chunks"
    BAD_SHARD = "bad_shard"
    FENCE_MISSING = "fence_missing"
    FENCE_MISMATCH = "fence_mismatch"
    STRAY_FENCE = "stray_fence"
    UNCHECKED = "unchecked"


class Violation(_Frozen):
    """One broken invariant, described for the person who must fix it.

    ``migration_id`` names an active migration touching the chunk: a violation with one may be
    the transient state of a cutover in flight (re-check after it ends); one without is not.
    """

    kind: ViolationKind
    collection: str
    message: str
    chunk_id: int | None = None
    shard_id: str | None = None
    migration_id: str | None = None
