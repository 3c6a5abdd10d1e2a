"""The catalog's invariants, checked from outside: the chunk layout and the shards' fences.

A free function over a ``Catalog`` and the shard engines: the store itself knows nothing of
shard engines. It reads only through the catalog's public reads (``chunk_map``/``chunk_maps``,
``list_shards``, ``migrations``) and the engines' ``fences``.
"""

from __future__ import annotations

from collections.abc import Mapping

from catalog.errors import InvariantViolation
from catalog.models import MigrationRecord, ShardState, Violation, ViolationKind
from catalog.store import Catalog
from shards.base import DocumentShard
from shards.models import KHASH_END, KHASH_MIN, Fence, FenceState
from shards.names import check_collection


async def check_invariants(
    catalog: Catalog,
    collection: str | None = None,
    shards: Mapping[str, DocumentShard] | None = None,
) -> list[Violation]:
    """Check the chunk layout, and with ``shards`` the fences, against the invariants.

    Checked: each collection's chunks tile ``[-2^63, 2^63)`` with no gap or overlap;
    every chunk is on a registered, non-retired shard; and, for the shards given, every
    chunk's fence row on its shard is ``active`` with the catalog's token and range, and
    no shard has an ``active`` fence for a chunk the catalog places elsewhere.

    The catalog is read at one version and the fences just after, so a cutover, split or
    merge in flight can show up: such violations name the active migration when there is
    one. Re-check before acting on a violation.

    Args:
        catalog: The catalog to read (open).
        collection: One collection, or all of them.
        shards: Shard engines by catalog shard id; omitted: layout only. A shard holding
            chunks but missing from the mapping (or unreachable) gives an ``unchecked``
            violation: a check that could not look says so.
    """
    if collection is not None:
        check_collection(collection)
        maps = {collection: await catalog.chunk_map(collection)}
    else:
        maps = await catalog.chunk_maps()
    registry = {s.shard_id: s for s in await catalog.list_shards()}
    moving: dict[tuple[str, int], MigrationRecord] = {
        (m.collection, m.chunk_id): m
        for m in await catalog.migrations(collection=collection, active_only=True,
                                          limit=100_000)
    }
    out: list[Violation] = []

    def add(kind: ViolationKind, coll: str, message: str, *, chunk_id: int | None = None,
            shard_id: str | None = None) -> None:
        mig = moving.get((coll, chunk_id)) if chunk_id is not None else None
        out.append(Violation(
            kind=kind, collection=coll, chunk_id=chunk_id, shard_id=shard_id,
            migration_id=mig.migration_id if mig else None,
            message=message + (f" (migration {mig.migration_id} is active, phase "
                               f"{mig.phase})" if mig else ""),
        ))

    for name, cmap in maps.items():
        if not cmap.chunks:
            add(ViolationKind.NO_CHUNKS, name, f"collection {name} has no chunks")
            continue
        expect = KHASH_MIN
        for c in cmap.chunks:
            if c.range.lo > expect:
                add(ViolationKind.GAP, name,
                    f"{name}: khash [{expect}, {c.range.lo}) is in no chunk",
                    chunk_id=c.chunk_id)
            elif c.range.lo < expect:
                add(ViolationKind.OVERLAP, name,
                    f"{name}: chunk {c.chunk_id} starts at {c.range.lo}, inside the "
                    f"previous chunk (which ends at {expect})", chunk_id=c.chunk_id)
            expect = max(expect, c.range.hi)
            info = registry.get(c.shard_id)
            if info is None or info.state == ShardState.RETIRED:
                add(ViolationKind.BAD_SHARD, name,
                    f"{name}: chunk {c.chunk_id} is placed on "
                    f"{'unregistered' if info is None else 'retired'} shard {c.shard_id!r}",
                    chunk_id=c.chunk_id, shard_id=c.shard_id)
        if expect != KHASH_END:
            add(ViolationKind.GAP, name, f"{name}: khash [{expect}, 2^63) is in no chunk")

    if shards is None:
        return out
    fences: dict[str, dict[tuple[str, int], Fence]] = {}
    for sid, engine in shards.items():
        try:
            fences[sid] = {(f.collection, f.chunk_id): f for f in await engine.fences(collection)}
        except Exception as exc:  # noqa: BLE001 - an unreachable shard is a finding
            for name in maps:
                if maps[name].on_shard(sid):
                    add(ViolationKind.UNCHECKED, name,
                        f"{name}: fences on shard {sid!r} could not be read ({exc})",
                        shard_id=sid)
    for name, cmap in maps.items():
        unchecked: dict[str, int] = {}
        for c in cmap.chunks:
            held = fences.get(c.shard_id)
            if held is None:
                if c.shard_id not in shards:
                    unchecked[c.shard_id] = unchecked.get(c.shard_id, 0) + 1
                continue
            f = held.get((name, c.chunk_id))
            where = f"{name}: chunk {c.chunk_id} on shard {c.shard_id!r}"
            if f is None:
                add(ViolationKind.FENCE_MISSING, name, f"{where} has no fence row",
                    chunk_id=c.chunk_id, shard_id=c.shard_id)
            elif (f.state, f.token, f.range) != (FenceState.ACTIVE, c.token, c.range):
                add(ViolationKind.FENCE_MISMATCH, name,
                    f"{where}: fence is {f.state} at token {f.token} "
                    f"[{f.range.lo}, {f.range.hi}), the catalog says active at token "
                    f"{c.token} [{c.range.lo}, {c.range.hi})",
                    chunk_id=c.chunk_id, shard_id=c.shard_id)
        for sid, n in unchecked.items():
            add(ViolationKind.UNCHECKED, name,
                f"{name}: {n} chunk(s) on shard {sid!r} were not checked: no engine for "
                "that shard was given", shard_id=sid)
        by_id = {c.chunk_id: c for c in cmap.chunks}
        for sid, held in fences.items():
            for (coll, cid), f in held.items():
                if coll != name or f.state != FenceState.ACTIVE:
                    continue
                placed = by_id.get(cid)
                if placed is None or placed.shard_id != sid:
                    add(ViolationKind.STRAY_FENCE, name,
                        f"{name}: shard {sid!r} has an active fence for chunk {cid} at "
                        f"token {f.token}, but the catalog "
                        + ("has no such chunk" if placed is None
                           else f"places it on {placed.shard_id!r}"),
                        chunk_id=cid, shard_id=sid)
    return out


async def assert_invariants(
    catalog: Catalog,
    collection: str | None = None,
    shards: Mapping[str, DocumentShard] | None = None,
) -> None:
    """``check_invariants``, raising ``InvariantViolation`` if anything is wrong."""
    found = await check_invariants(catalog, collection, shards)
    if found:
        raise InvariantViolation(found)


__all__ = ["assert_invariants", "check_invariants"]
