"""``Catalog``: the chunk metadata service over its own PostgreSQL database.

How the catalog stays correct
-----------------------------
* **One serializable transaction per operation.** Every method runs in exactly one
  ``SERIALIZABLE`` transaction, retried from scratch on a serialization failure (SQLSTATE
  40001) or deadlock, with jittered backoff, up to ``max_attempts`` times. A retry re-reads
  everything, so its checks see the winner's commit. Every failure raises a typed
  ``CatalogError`` and leaves the catalog unchanged.
* **Compare-and-set on tokens.** Splits, merges and placement changes name the token(s) they
  expect; the transaction locks the chunk row, compares, and refuses with
  ``TokenMismatchError`` (expected vs actual) before changing anything. Of N concurrent
  writers expecting the same token exactly one commits: the others either find the new token
  or lose a serialization conflict, retry, and then find it.
* **``move_chunk`` is the cutover's commit point.** It switches placement (new token =
  expected + 1, which is the token the shard engine's freeze gave the source fence and the
  token the target fence was activated at) and records the cutover in the migration record in
  the same transaction. A lost ``COMMIT`` reply surfaces as ``CatalogUnavailableError``; the
  caller reads ``migration(id).cutover_token`` / ``cutover_shard`` to learn whether its switch
  committed. The CAS itself is never made "idempotent" by guessing: a second call with the same
  expected token always fails, so "exactly one wins" holds even for calls with the same
  migration id.
* **A total order of changes.** Every change increments ``meta.version`` and sends
  ``pg_notify('shardshift_catalog', {"version", "change", "collection"})`` in the same
  transaction, so a notification is delivered only if its change committed, and never before.
  Because every change writes the same row, changes are also serialized (cheaply: catalog
  changes are rare next to routed traffic). Two kinds of write are deliberately *not* changes:
  chunk statistics reports and renewals of a lease already held, both frequent and neither
  affecting routing or ownership.
* **At most one active migration per chunk** (partial unique index) and at most
  ``max_moves_per_shard`` live move leases per shard. A lease is live until ``expires_at``;
  expired leases are ignored when counting and deleted when next seen, so a dead holder
  frees its slots by simply not renewing. Lease time is the catalog database's clock (one
  clock for every worker); tests inject ``now``.

Reads (``chunk_map``, ``chunk_maps``) run in a read-only serializable transaction: a snapshot
consistent with the catalog version they report.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator

import psycopg
from pydantic import ValidationError

from catalog.models import (
    CatalogChange,
    ChangeKind,
)
from catalog.schema import NOTIFY_CHANNEL
from catalog.store.checks import (
    check_address,
    check_migration_id,
    check_shard_id,
)
from catalog.store.chunkmaps import ChunkMaps
from catalog.store.collection import MAX_CHUNKS_PER_COLLECTION_CREATE, Collections
from catalog.store.leases import Leases
from catalog.store.migrations import Migrations
from catalog.store.registry import ShardRegistry
from catalog.store.topology import Topology
from catalog.store.txn import CatalogBase

log = logging.getLogger(__name__)


class Catalog(ShardRegistry, Collections, ChunkMaps, Topology, Migrations, Leases, CatalogBase):
    """The catalog: shards, collections, chunks, migrations and leases.

    Build one per process, ``await catalog.open()`` (or ``async with``), share it: methods are
    safe to call concurrently (each takes its own pooled connection).

    Args:
        dsn: libpq DSN of the catalog database.
        min_size: Connections kept open.
        max_size: Connections at most.
        max_attempts: Attempts per transaction before ``CatalogBusyError``.
        max_moves_per_shard: Default limit of live move leases per shard.
        lease_ttl: Default lease lifetime; holders renew well within it.
    """

    # -- notifications -----------------------------------------------------------------------

    async def listen(
        self, *, reconnect_delay_s: float = 0.2, max_reconnect_delay_s: float = 5.0
    ) -> AsyncGenerator[CatalogChange, None]:
        """Catalog changes as they commit, forever (cancel the consuming task or ``break``).

        The first item, and the first after every reconnect, is a ``RESYNC`` change carrying
        the current version: from that moment on no change is missed, so a router starts
        listening, waits for that item, then (re)reads its maps. Notifications are a latency
        optimisation: a lost one is caught by the router's stale-token retry.
        """
        delay = reconnect_delay_s
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
            except psycopg.OperationalError as exc:
                log.warning("catalog listen: cannot connect (%s); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, max_reconnect_delay_s)
                continue
            try:
                async with conn:
                    await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    cur = await conn.execute("SELECT version FROM catalog.meta WHERE id = 1")
                    row = await cur.fetchone()
                    delay = reconnect_delay_s
                    yield CatalogChange(version=int(row[0]) if row else 0,
                                        change=ChangeKind.RESYNC)
                    async for note in conn.notifies():
                        try:
                            yield CatalogChange.model_validate_json(note.payload)
                        except ValidationError:
                            log.warning("catalog listen: malformed payload %r", note.payload[:200])
            except psycopg.OperationalError as exc:
                log.warning("catalog listen: connection lost (%s); reconnecting", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, max_reconnect_delay_s)


__all__ = [
    "MAX_CHUNKS_PER_COLLECTION_CREATE", "Catalog", "check_address", "check_migration_id",
    "check_shard_id",
]
