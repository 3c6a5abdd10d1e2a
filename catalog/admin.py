"""Operations that change the catalog *and* the shards' fences: provisioning, split, merge.

The catalog holds the truth about placement; each shard's ``chunk_fence`` rows enforce it.
These helpers change both without ever letting a write through a fence the catalog no longer
backs. The rule they follow is the cutover's:

    1. create the new fence rows ``receiving`` (they reject everything; no router knows the new
       chunk ids yet, since the catalog has not published them);
    2. freeze the old fence rows (token+1, frozen): in-flight writes commit first, later ones are
       rejected, and routers refresh and retry;
    3. the catalog compare-and-set: the commit point;
    4. activate the new fence rows at the catalog's tokens, retire and drop the old ones.

Before the commit point a failure restores the old fences (unfreeze) and drops the new ones —
but only after re-reading the catalog proves the change did not commit: a lost ``COMMIT``
reply must not unfreeze a chunk the catalog has already replaced. When the catalog cannot be
read, the old fences stay frozen (unavailable, never inconsistent) and the error says how to
resume: run the helper again with the same new chunk ids.

After the commit point every step is idempotent, so re-running the helper with the same ids
finishes the job. A split or merge needs the chunk to be idle: the catalog refuses one on a
chunk with an active migration (``ChunkBusyError``), and two helpers must not work on the same
chunk at once (workflows guarantee this with deterministic workflow ids).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence

from catalog.errors import CatalogError, CatalogUnavailableError, InvalidLayoutError
from catalog.models import Chunk, ChunkMap, CollectionInfo
from catalog.store import Catalog
from shards.base import DocumentShard
from shards.models import FenceState, IndexDefinition, KeyRange

log = logging.getLogger(__name__)


def _engine(shards: Mapping[str, DocumentShard], shard_id: str) -> DocumentShard:
    engine = shards.get(shard_id)
    if engine is None:
        raise ValueError(
            f"no shard engine given for catalog shard {shard_id!r}; pass one for every shard "
            f"that holds a chunk (given: {sorted(shards)})"
        )
    if engine.shard_id != shard_id:
        raise ValueError(
            f"the engine given for catalog shard {shard_id!r} is shard {engine.shard_id!r}"
        )
    return engine


async def provision_collection(
    catalog: Catalog,
    shards: Mapping[str, DocumentShard],
    name: str,
    shard_key: str,
    indexes: Sequence[IndexDefinition] = (),
    *,
    shard_ids: Sequence[str] | None = None,
    chunks_per_shard: int = 1,
) -> ChunkMap:
    """Create a collection in the catalog, then its table, indexes and fences on the shards.

    Idempotent: re-running it (after a crash, say) confirms what exists and creates the rest.
    The catalog goes first, so a refused definition (the name is taken by another shard key or
    other indexes) never touches a shard. Until the fences exist a router addressing the new
    collection is rejected by the fence and retries.

    Args:
        catalog: The catalog.
        shards: Engines by catalog shard id; must cover ``shard_ids``.
        name, shard_key, indexes: The collection's definition.
        shard_ids: Shards to spread the initial chunks over (default: all of ``shards``).
        chunks_per_shard: Initial chunks per shard (round-robin placement).

    Returns:
        The collection's chunk map as created (or as it is now, on a re-run).
    """
    ids = list(shard_ids) if shard_ids is not None else sorted(shards)
    for sid in ids:
        _engine(shards, sid)  # refuse a missing engine before the catalog changes
    cmap = await catalog.create_collection(
        name, shard_key, indexes, ids, chunks_per_shard=chunks_per_shard
    )

    async def on_shard(sid: str) -> None:
        engine = _engine(shards, sid)
        await engine.ensure_schema()
        # Indexes come from the catalog's definition, so every shard gets the same ones.
        await engine.create_collection(name, cmap.collection.indexes)
        for c in cmap.on_shard(sid):
            await engine.put_fence(name, c.chunk_id, c.range, c.token, FenceState.ACTIVE)

    await asyncio.gather(*(on_shard(sid) for sid in sorted({c.shard_id for c in cmap.chunks})))
    return cmap


async def change_indexes(
    catalog: Catalog,
    engine: Callable[[str], Awaitable[DocumentShard]],
    collection: str,
    *,
    create: Sequence[IndexDefinition] = (),
    drop: Sequence[str] = (),
) -> CollectionInfo:
    """Build ``create`` and drop ``drop`` (index names) on every shard that holds a chunk of
    the collection, then record the new definition in the catalog (``engine(shard_id)``:
    the shard's engine, connected with DDL rights).

    An index counts (the catalog lists it, routers filter on it) only once every shard has
    it; a dropped one stops counting in the same commit that follows its removal from the
    shards, and a crash in between leaves an index the catalog lists but a shard lacks: an
    equality filter on it still works (a scan), and running the drop again finishes it.
    Idempotent. Refused while a chunk of the collection moves (``ChunkBusyError``); a move
    registered meanwhile waits (see ``Catalog.change_indexes``).
    """
    dropped = set(drop)

    async def apply(shard_ids: list[str]) -> None:
        for sid in shard_ids:
            shard = await engine(sid)
            for name in sorted(dropped):
                await shard.drop_index(collection, name)
            if create:
                await shard.create_collection(collection, list(create))

    return await catalog.change_indexes(collection, create, drop, apply)


async def _committed(catalog: Catalog, collection: str, new_ids: Sequence[int]) -> list[Chunk]:
    """The new chunks if the catalog change that creates them has committed, else []."""
    cmap = await catalog.chunk_map(collection)
    found = [c for i in new_ids if (c := cmap.chunk(i)) is not None]
    return found if len(found) == len(new_ids) else []


async def _restore(
    catalog: Catalog,
    engine: DocumentShard,
    collection: str,
    old: Sequence[Chunk],
    frozen: Sequence[int],
    new_ids: Sequence[int],
) -> None:
    """Undo steps 1-2 for a change that did not commit: unfreeze each old chunk the catalog
    still places here at the same token, drop the new fences."""
    cmap = await catalog.chunk_map(collection)
    for c in old:
        now = cmap.chunk(c.chunk_id)
        if c.chunk_id in frozen and now is not None and (now.shard_id, now.token) == (
            c.shard_id, c.token
        ):
            await engine.unfreeze(collection, c.chunk_id, c.token + 1)
    for i in new_ids:
        await engine.drop_fence(collection, i)


async def _switch(
    catalog: Catalog,
    engine: DocumentShard,
    collection: str,
    old: Sequence[Chunk],
    new: Sequence[tuple[int, KeyRange, int]],
    commit: Callable[[], Awaitable[Sequence[Chunk]]],
) -> list[Chunk]:
    """Steps 1-4 of the module docstring on one shard; ``commit`` makes the catalog change.

    Cancellation (``CancelledError``) is not caught: the old fences may stay frozen, which is
    safe, and re-running the operation with the same new ids finishes or undoes it.
    """
    new_ids = [i for i, _, _ in new]
    for i, rng, token in new:
        await engine.put_fence(collection, i, rng, token, FenceState.RECEIVING)
    frozen: list[int] = []
    try:
        for c in sorted(old, key=lambda c: c.chunk_id):
            await engine.freeze(collection, c.chunk_id, c.token)
            frozen.append(c.chunk_id)
        result = list(await commit())
    except Exception as exc:
        try:
            result = await _committed(catalog, collection, new_ids)
            if not result:
                await _restore(catalog, engine, collection, old, frozen, new_ids)
        except CatalogUnavailableError as unknown:
            raise CatalogUnavailableError(
                f"{collection}: the catalog could not confirm whether the change to chunks "
                f"{[c.chunk_id for c in old]} committed; their fences stay frozen. Re-run the "
                f"same operation with new chunk ids {new_ids} to finish or undo it"
            ) from unknown
        if not result:
            raise
        log.info("%s: catalog change committed despite %r; finishing", collection, exc)
    for c in result:
        await engine.activate(collection, c.chunk_id, c.token)
    for c in old:
        await engine.retire(collection, c.chunk_id)
        await engine.drop_fence(collection, c.chunk_id)
    return result


async def _one_chunk(merge: Awaitable[Chunk]) -> list[Chunk]:
    return [await merge]


async def _finish(
    engine: DocumentShard, collection: str, new: Sequence[Chunk], old_ids: Sequence[int]
) -> None:
    """Step 4 alone, for a re-run after the commit point: every step is idempotent."""
    for c in new:
        await engine.activate(collection, c.chunk_id, c.token)
    for i in old_ids:
        if await engine.fence(collection, i) is not None:
            await engine.retire(collection, i)
            await engine.drop_fence(collection, i)


async def split_chunk(
    catalog: Catalog,
    shards: Mapping[str, DocumentShard],
    collection: str,
    chunk_id: int,
    at_khash: int | None = None,
    *,
    child_ids: Sequence[int] | None = None,
) -> tuple[Chunk, Chunk]:
    """Split a chunk in the catalog and on its shard (no data moves: both halves stay).

    Args:
        at_khash: The split point, strictly inside the chunk (default: the midpoint).
        child_ids: Ids from ``catalog.allocate_chunk_ids(2)``; pass the same ids again to
            resume an interrupted split.

    Returns:
        The two children, lower range first, active on the shard.

    Raises:
        TokenMismatchError, ChunkBusyError, InvalidLayoutError: from the catalog, after the
            shard's fences were restored.
    """
    if child_ids is not None:
        done = await _committed(catalog, collection, child_ids)
        if done:
            left, right = sorted(done, key=lambda c: c.range.lo)
            await _finish(_engine(shards, left.shard_id), collection, done, [chunk_id])
            return left, right
    parent = await catalog.chunk(collection, chunk_id)
    engine = _engine(shards, parent.shard_id)
    lo, hi = parent.range.lo, parent.range.hi
    at = lo + (hi - lo) // 2 if at_khash is None else at_khash
    if not lo < at < hi:
        raise InvalidLayoutError(
            f"split point {at} is not strictly inside chunk {collection}/{chunk_id} [{lo}, {hi})"
        )
    ids = list(child_ids) if child_ids is not None else await catalog.allocate_chunk_ids(2)
    if len(ids) != 2:
        raise ValueError("a split needs exactly two child ids")
    token = parent.token + 1
    new = [(ids[0], KeyRange(lo=lo, hi=at), token), (ids[1], KeyRange(lo=at, hi=hi), token)]
    result = await _switch(
        catalog, engine, collection, [parent], new,
        lambda: catalog.split_chunk(collection, chunk_id, at, parent.token, child_ids=ids),
    )
    left, right = sorted(result, key=lambda c: c.range.lo)
    return left, right


async def merge_chunks(
    catalog: Catalog,
    shards: Mapping[str, DocumentShard],
    collection: str,
    chunk_ids: Sequence[int],
    *,
    new_chunk_id: int | None = None,
) -> Chunk:
    """Merge adjacent chunks of one shard, in the catalog and on the shard.

    Args:
        chunk_ids: Two or more chunks that together form one contiguous range on one shard.
        new_chunk_id: An id from ``catalog.allocate_chunk_ids(1)``; pass it again to resume.

    Returns:
        The merged chunk, active on the shard.
    """
    if new_chunk_id is not None:
        done = await _committed(catalog, collection, [new_chunk_id])
        if done:
            await _finish(_engine(shards, done[0].shard_id), collection, done, chunk_ids)
            return done[0]
    if len(set(chunk_ids)) < 2:
        raise InvalidLayoutError("merge needs two or more distinct chunk ids")
    old = sorted([await catalog.chunk(collection, i) for i in chunk_ids],
                 key=lambda c: c.range.lo)
    placed = {c.shard_id for c in old}
    if len(placed) != 1:
        raise InvalidLayoutError(
            f"chunks {list(chunk_ids)} of {collection} are on shards {sorted(placed)}; move "
            "them onto one shard before merging"
        )
    for a, b in zip(old, old[1:], strict=False):
        if a.range.hi != b.range.lo:
            raise InvalidLayoutError(
                f"chunks {a.chunk_id} and {b.chunk_id} of {collection} are not adjacent"
            )
    engine = _engine(shards, old[0].shard_id)
    (nid,) = [new_chunk_id] if new_chunk_id is not None else await catalog.allocate_chunk_ids(1)
    merged = KeyRange(lo=old[0].range.lo, hi=old[-1].range.hi)
    token = max(c.token for c in old) + 1
    (result,) = await _switch(
        catalog, engine, collection, old, [(nid, merged, token)],
        lambda: _one_chunk(catalog.merge_chunks(
            collection, [c.chunk_id for c in old], [c.token for c in old], new_chunk_id=nid)),
    )
    return result


__all__ = ["CatalogError", "merge_chunks", "provision_collection", "split_chunk"]
