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
  ``max_moves_per_shard`` live move leases per shard (``leases`` says when a lease is live).

Layout
------
``Catalog`` (``facade``) is one mixin per section, each over ``CatalogBase`` (``txn``: the
connection pool, the lifecycle, ``ensure_schema``, the retrying transaction and ``bump``, the
version increment and notification every change makes):

* ``registry``: the shard registry. ``collection``: collections and their initial chunks.
* ``chunkmaps``: chunk maps and single chunks, chunk ids, chunk statistics.
* ``routemaps``: the router's reads: a whole map as columns, the chunks changed since a version.
* ``topology``: split, merge and ``move_chunk``, the commit point.
* ``migrations``: migration records. ``leases``: move leases. ``notify``: ``listen``.
* ``verifications``: verification reports (observations: no version bump).
* ``stats``: chunk sizes recorded and every chunk's load read in bulk, for the planners.
* ``plans``: the stored plans of fleet operations, read back in pages (no version bump).
* ``rows``: rows to models, and the reads inside a transaction that the sections share.
  ``checks``: validation of shard ids, migration ids, addresses, chunk ids and tokens.

The check of the layout and the shards' fences against the invariants is
``catalog.invariants``, outside the store (the store knows nothing of shard engines).
"""

from catalog.store.checks import check_address, check_migration_id, check_shard_id
from catalog.store.collection import MAX_CHUNKS_PER_COLLECTION_CREATE
from catalog.store.facade import Catalog
from catalog.store.plans import MAX_PAGE, StoredMove, check_plan_id
from catalog.store.stats import ChunkLoad, ChunkSize

__all__ = [
    "MAX_CHUNKS_PER_COLLECTION_CREATE", "MAX_PAGE", "Catalog", "ChunkLoad", "ChunkSize",
    "StoredMove", "check_address", "check_migration_id", "check_plan_id", "check_shard_id",
]
