"""Per-shard move leases: the limit, all-or-none, idempotent re-take, expiry."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest

from catalog import (
    Catalog,
    LeaseUnavailableError,
    MigrationKind,
    MigrationOutcome,
    MigrationStateError,
)

TTL = timedelta(seconds=30)


async def test_lease_limit_per_shard_all_or_none(
    catalog: Catalog, shard_ids: list[str], collection_name: str
) -> None:
    s0, s1, s2 = shard_ids
    t0 = datetime.now(UTC)
    m1, m2, m3 = (f"{collection_name}/m{i}" for i in (1, 2, 3))
    await catalog.take_leases(m1, [s0, s1], holder="wf-1", ttl=TTL, now=t0)
    await catalog.take_leases(m2, [s0, s2], holder="wf-2", ttl=TTL, now=t0)

    with pytest.raises(LeaseUnavailableError, match=f"{s0}.*{m1}, {m2}.*limit is 2") as err:
        await catalog.take_leases(m3, [s1, s0], holder="wf-3", ttl=TTL, now=t0)
    assert (err.value.shard_id, err.value.holders) == (s0, (m1, m2))
    assert err.value.retryable
    # All or none: s1 had room, but m3 got nothing.
    assert [ls.migration_id for ls in await catalog.leases(s1, now=t0)] == [m1]

    # Re-taking by the same holder renews instead of using a second slot.
    renewed = await catalog.take_leases(m1, [s0, s1], holder="wf-1", ttl=TTL * 2,
                                        now=t0 + timedelta(seconds=5))
    assert {ls.expires_at for ls in renewed} == {t0 + timedelta(seconds=5) + TTL * 2}
    assert {ls.acquired_at for ls in renewed} == {t0}
    assert len(await catalog.leases(s0, now=t0)) == 2
    # Another holder cannot take over a live lease of the same migration.
    with pytest.raises(LeaseUnavailableError, match="held by 'wf-1'"):
        await catalog.take_leases(m1, [s0], holder="intruder", ttl=TTL, now=t0)

    # Releasing frees the slot at once.
    assert await catalog.release_leases(m2) == 2
    assert await catalog.release_leases(m2) == 0
    got = await catalog.take_leases(m3, [s0, s1], holder="wf-3", ttl=TTL, now=t0)
    assert [ls.lease_id for ls in got] == [f"{m3}@{s0}", f"{m3}@{s1}"]


async def test_expired_leases_free_their_slots(
    catalog: Catalog, shard_ids: list[str], collection_name: str
) -> None:
    s0 = shard_ids[0]
    t0 = datetime.now(UTC)
    dead1, dead2, fresh = (f"{collection_name}/{n}" for n in ("dead1", "dead2", "fresh"))
    await catalog.take_leases(dead1, [s0], holder="crashed-1", ttl=TTL, now=t0)
    await catalog.take_leases(dead2, [s0], holder="crashed-2", ttl=TTL, now=t0)
    with pytest.raises(LeaseUnavailableError):
        await catalog.take_leases(fresh, [s0], holder="wf", ttl=TTL, now=t0 + TTL / 2)

    later = t0 + TTL + timedelta(seconds=1)
    assert await catalog.leases(s0, now=later) == []
    await catalog.take_leases(fresh, [s0], holder="wf", ttl=TTL, now=later)
    assert [ls.migration_id for ls in await catalog.leases(s0, now=later)] == [fresh]

    # A holder that comes back after expiry finds its lease reaped (the take above deleted it),
    # or, re-taking, the shard full: either way it has lost the lease.
    await catalog.take_leases(dead2, [s0], holder="crashed-2", ttl=TTL, now=later)
    with pytest.raises(LeaseUnavailableError, match="holds no lease to renew"):
        await catalog.renew_leases(dead1, holder="crashed-1", ttl=TTL, now=later)
    with pytest.raises(LeaseUnavailableError, match="limit is 2"):
        await catalog.take_leases(dead1, [s0], holder="crashed-1", ttl=TTL, now=later)
    # Renewing a live lease works without a free slot.
    assert len(await catalog.renew_leases(fresh, holder="wf", ttl=TTL, now=later)) == 1


async def test_lease_expires_on_the_database_clock(
    catalog: Catalog, shard_ids: list[str], collection_name: str
) -> None:
    """No injected time: a short TTL lapses on the catalog's own clock."""
    s1 = shard_ids[1]
    mid = f"{collection_name}/short"
    (lease,) = await catalog.take_leases(mid, [s1], holder="wf", ttl=timedelta(milliseconds=300))
    assert lease.expires_at - lease.acquired_at == timedelta(milliseconds=300)
    deadline = time.monotonic() + 10
    while await catalog.leases(s1):
        assert time.monotonic() < deadline, "the lease never expired"
        await asyncio.sleep(0.05)
    assert await catalog.reap_expired_leases() >= 1
    assert await catalog.leases(s1, live_only=False) == []


async def test_concurrent_lease_takers_respect_the_limit(
    catalog: Catalog, shard_ids: list[str], collection_name: str
) -> None:
    s2 = shard_ids[2]
    results = await asyncio.gather(
        *(catalog.take_leases(f"{collection_name}/c{i}", [s2], holder=f"wf-{i}", ttl=TTL)
          for i in range(12)),
        return_exceptions=True,
    )
    won = [r for r in results if not isinstance(r, BaseException)]
    lost = [r for r in results if isinstance(r, BaseException)]
    assert len(won) == 2, results
    assert all(isinstance(e, LeaseUnavailableError) for e in lost), lost
    assert len(await catalog.leases(s2)) == 2


async def test_finishing_a_migration_releases_its_leases(
    catalog: Catalog, shard_ids: list[str], collection_name: str
) -> None:
    s0, s1, _ = shard_ids
    cmap = await catalog.create_collection(collection_name, "k", (), [s0])
    mid = f"{collection_name}/m"
    await catalog.register_migration(mid, kind=MigrationKind.MOVE, collection=collection_name,
                                     chunk_id=cmap.chunks[0].chunk_id, source=s0, target=s1)
    await catalog.take_leases(mid, [s0, s1], holder="wf", ttl=TTL)
    await catalog.finish_migration(mid, MigrationOutcome.ABORTED)
    assert await catalog.leases(migration_id=mid, live_only=False) == []
    with pytest.raises(MigrationStateError, match="already finished"):
        await catalog.take_leases(mid, [s0, s1], holder="wf", ttl=TTL)
