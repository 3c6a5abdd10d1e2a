"""Range delete: remove a chunk's rows from a shard in throttled batches.

Used after a move commits (the source's copy of the chunk, its fence retired) and when a move
is cancelled (the target's partial copy, its fence still ``receiving``).

Invariants
----------
* **Only data nobody serves is deleted.** Each batch, in its own transaction, first share-locks
  every fence row of the collection that overlaps the range in state ``active`` or ``frozen``;
  if there is one, it stops with :class:`LiveChunkError` before deleting anything. The lock
  makes the check and the delete atomic with respect to a concurrent activation.
* **Batches are small transactions in primary-key order.** Each deletes at most ``batch_size``
  rows found by a keyset scan of the PK index from the last deleted key, so lock hold times,
  WAL bursts and replication lag stay bounded, and a batch never rescans the dead index
  entries that earlier batches left behind.
* **Resumable and idempotent.** Deleting what is already gone is a no-op; a retry may start
  from the heartbeated ``after`` key or from the beginning of the range with the same result.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import psycopg
from psycopg import sql
from pydantic import BaseModel, ConfigDict

from shards.errors import ShardError
from shards.models import KeyRange
from shards.names import check_collection
from shards.postgres.schema import collection_table
from shards.postgres.snapshot import range_predicate


class LiveChunkError(ShardError):
    """The range overlaps a chunk this shard serves (active or frozen): nothing was deleted.
    Retire the chunk's fence first; retrying does not help."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DeleteProgress(_Frozen):
    """A heartbeat checkpoint: rows deleted so far and the last key deleted (resume point)."""

    rows_deleted: int
    batches: int
    after_khash: int | None = None
    after_id: str | None = None


ProgressFn = Callable[[DeleteProgress], None]


def delete_range(
    dsn: str,
    collection: str,
    key_range: KeyRange,
    *,
    batch_size: int = 5_000,
    pause_s: float = 0.0,
    after: tuple[int, str] | None = None,
    progress: ProgressFn | None = None,
) -> DeleteProgress:
    """Delete every row of a key range, ``batch_size`` keys per transaction.

    Args:
        dsn: The shard.
        collection: The collection (validated before anything is touched).
        key_range: The range to empty.
        batch_size: Rows per batch (one transaction each).
        pause_s: Sleep between batches: the throttle that leaves I/O and replication
            headroom for live traffic.
        after: Resume after this ``(khash, id)`` (from a heartbeated :class:`DeleteProgress`).
        progress: Called after every batch.

    Returns:
        The final :class:`DeleteProgress` (``rows_deleted`` counts this call's deletions).

    Raises:
        LiveChunkError: an active or frozen fence overlaps the range.
    """
    check_collection(collection)
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    table = collection_table(collection)
    guard = sql.SQL(
        "SELECT chunk_id, state FROM shardshift.chunk_fence"
        " WHERE collection = %(c)s AND state IN ('active', 'frozen')"
        " AND (%(hi)s::bigint IS NULL OR lo < %(hi)s) AND (hi IS NULL OR hi > %(lo)s)"
        " FOR SHARE"
    )
    # Keyset scan from the resume key: "(khash, id) > (after)" as an index range condition.
    delete = sql.SQL(
        "WITH victims AS ("
        "  SELECT khash, id FROM {t} WHERE {w}"
        "   AND (%(ak)s::bigint IS NULL OR (khash, id) > (%(ak)s, %(ai)s))"
        "   ORDER BY khash, id LIMIT %(n)s),"
        " gone AS (DELETE FROM {t} d USING victims v"
        "  WHERE d.khash = v.khash AND d.id = v.id RETURNING d.khash, d.id)"
        " SELECT (SELECT count(*) FROM gone), last.khash, last.id"
        " FROM (SELECT 1) one LEFT JOIN LATERAL"
        "  (SELECT khash, id FROM victims ORDER BY khash DESC, id DESC LIMIT 1) last ON true"
    ).format(t=table, w=range_predicate(key_range))
    state = DeleteProgress(rows_deleted=0, batches=0,
                           after_khash=after[0] if after else None,
                           after_id=after[1] if after else None)
    params = {"c": collection, "lo": key_range.lo, "hi": key_range.sql_hi}
    with psycopg.connect(dsn, application_name="shardshift-range-delete") as conn:
        while True:
            with conn.transaction():
                live = conn.execute(guard, params).fetchall()
                if live:
                    raise LiveChunkError(
                        f"{collection} [{key_range.lo}, {key_range.hi}) overlaps chunks this "
                        f"shard serves: {sorted((int(c), s) for c, s in live)}; nothing deleted"
                    )
                row = conn.execute(delete, params | {
                    "ak": state.after_khash, "ai": state.after_id, "n": batch_size,
                }).fetchone()
            assert row is not None
            deleted, last_khash, last_id = int(row[0]), row[1], row[2]
            if last_khash is None:  # the scan found nothing after the resume key: done
                break
            state = DeleteProgress(rows_deleted=state.rows_deleted + deleted,
                                   batches=state.batches + 1,
                                   after_khash=int(last_khash), after_id=str(last_id))
            if progress:
                progress(state)
            if pause_s > 0:
                time.sleep(pause_s)  # the throttle itself, not a wait for a condition
    return state


__all__ = ["DeleteProgress", "LiveChunkError", "delete_range"]
