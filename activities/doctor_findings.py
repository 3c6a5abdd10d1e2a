"""What ``shardshift doctor`` reports, and the bookkeeping of one examination.

The report (:class:`Finding`, :class:`DoctorReport`, :func:`format_report`) is what the CLI
prints and ``--json`` emits. :class:`Server`, :class:`Item` and :class:`Context` are what the
doctor (``activities/doctor.py``) builds while it examines: the servers it inspected, each
finding with its repair, and the catalog's and Temporal's view the findings are judged in.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, computed_field

from catalog.models import ChunkMap, MigrationRecord, ShardInfo
from shards.postgres.inventory import FenceRow, ShardInventory, StreamObjectKind


class FindingKind(StrEnum):
    SHARD = "shard_unreachable"
    SLOT = "slot"
    PUBLICATION = "publication"
    ORIGIN = "origin"
    STREAM_STATE = "stream_state"
    FENCE = "fence"
    ROWS = "rows"
    IMPORT_PARTS = "import_parts"
    STAGING = "staging"
    LEASE = "lease"
    MIGRATION = "migration"
    FLEET_PLAN = "fleet_plan"
    DRAINING_SHARD = "draining_shard"


class Finding(BaseModel):
    """One thing a failure left behind (the ``--json`` output's list items)."""

    model_config = ConfigDict(extra="forbid")

    kind: FindingKind
    shard: str | None
    object: str
    detail: str
    action: str
    """What ``--repair`` does, or ``none: ...`` with what a person should check."""
    repaired: bool = False


class DoctorReport(BaseModel):
    findings: list[Finding]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def clean(self) -> bool:
        """Nothing left to look at: no findings, or every one repaired."""
        return all(f.repaired for f in self.findings)


@dataclass
class Server:
    """One PostgreSQL server; several catalog shard ids may name it (tests do)."""

    key: str
    dsn: str
    shards: list[ShardInfo]
    inventory: ShardInventory | None = None
    error: str | None = None
    rows: dict[tuple[str, int], int] = field(default_factory=dict)

    @property
    def ids(self) -> set[str]:
        return {s.shard_id for s in self.shards}

    def label(self, prefer: Iterable[str] = ()) -> str:
        for sid in prefer:
            if sid in self.ids:
                return sid
        return sorted(self.ids)[0]

    def fence(self, collection: str, chunk_id: int) -> FenceRow | None:
        if self.inventory is None:
            return None
        return next((f for f in self.inventory.fences
                     if (f.collection, f.chunk_id) == (collection, chunk_id)), None)


@dataclass
class Item:
    finding: Finding
    fix: Callable[[], Awaitable[None]] | None = None
    migration_id: str | None = None
    """The dead migration this leftover belongs to (its record is closed after it)."""
    chunk: tuple[str, int] | None = None


@dataclass
class Context:
    servers: dict[str, Server]
    maps: dict[str, ChunkMap]
    by_id: dict[str, MigrationRecord]
    by_prefix: dict[str, MigrationRecord]
    live: set[str]
    dead: dict[str, MigrationRecord]
    dead_by_chunk: dict[tuple[str, int], MigrationRecord]
    busy: set[tuple[str, int]]
    published: dict[str, str] = field(default_factory=dict)
    """Stream name -> the collection its publication (on any server) carries."""

    def __post_init__(self) -> None:
        self._by_shard = {i.shard_id: s for s in self.servers.values() for i in s.shards}
        for s in self.servers.values():
            for obj in (s.inventory.streams if s.inventory else ()):
                if obj.kind == StreamObjectKind.PUBLICATION and obj.collections:
                    self.published[obj.name] = obj.collections[0]

    def server_of(self, shard_id: str) -> Server | None:
        return self._by_shard.get(shard_id)

    def dead_id(self, rec: MigrationRecord | None) -> str | None:
        return rec.migration_id if rec is not None and rec.migration_id in self.dead else None

    def collection_shards(self, collection: str) -> list[str]:
        cmap = self.maps.get(collection)
        return sorted({c.shard_id for c in cmap.chunks}) if cmap else []

    def describe(self, rec: MigrationRecord | None) -> str:
        if rec is None:
            return "of no migration the catalog knows"
        if rec.migration_id in self.dead:
            return f"of migration {rec.migration_id} (active, but no workflow runs it)"
        return f"of migration {rec.migration_id} (finished: {rec.outcome})"


def shards_of(rec: MigrationRecord | None) -> list[str]:
    return [rec.source, rec.target] if rec is not None else []


def rows_phrase(n: int) -> str:
    return "no rows" if n == 0 else f"{n} row{'s' if n != 1 else ''}"


def format_report(report: DoctorReport, *, repair: bool) -> str:
    """The report for people: one block per finding, then a summary line."""
    if not report.findings:
        return "clean: nothing left behind by failed moves\n"
    lines = []
    for f in report.findings:
        mark = "REPAIRED" if f.repaired else ("NOT REPAIRED" if repair else "FOUND")
        lines.append(f"[{mark}] {f.kind:<17} {f.shard or '-':<14} {f.object}")
        lines.append(f"    {f.detail}")
        lines.append(f"    action: {f.action}")
    left = sum(not f.repaired for f in report.findings)
    done = len(report.findings) - left
    summary = f"{len(report.findings)} finding(s)"
    if repair:
        summary += f", {done} repaired, {left} left"
    elif any(not f.action.startswith("none") for f in report.findings):
        summary += "; run with --repair to fix the ones with an action"
    lines.append(summary + ("" if left else " — clean"))
    return "\n".join(lines) + "\n"


__all__ = ["Context", "DoctorReport", "Finding", "FindingKind", "Item", "Server", "format_report",
           "rows_phrase", "shards_of"]
