"""The applier's batch, collapsed per key and classified by what the target holds at its start
(pure; the set-based apply on real PostgreSQL is in ``test_replication.py``)."""

from __future__ import annotations

from shards.postgres.apply_batch import OP_DELETE, OP_INSERT, OP_UPSERT, collapse
from shards.postgres.pgoutput import (
    Delete,
    FenceMarker,
    Transaction,
    TruncateChunk,
    Upsert,
)

# -- collapse (pure) ---------------------------------------------------------------------------


def txn(lsn: int, *changes: Upsert | Delete | TruncateChunk) -> Transaction:
    return Transaction(xid=lsn, commit_lsn=lsn, end_lsn=lsn + 1, changes=list(changes))


def ops(*txns: Transaction) -> dict[tuple[int, bytes], tuple[int, bytes | None]]:
    batch = collapse(txns)
    rows = {(h, i): (op, doc) for op, h, i, doc in batch.rows}
    assert len(rows) == len(batch.rows), "one row per key"
    return rows


def test_insert_update_delete_of_one_key_in_a_batch_is_nothing() -> None:
    assert ops(txn(10, Upsert(1, b"a", b"{}", fresh=True)), txn(20, Upsert(1, b"a", b'{"n": 1}')),
               txn(30, Delete(1, b"a"))) == {}


def test_insert_then_updates_is_a_plain_insert_of_the_last_document() -> None:
    assert ops(txn(10, Upsert(1, b"a", b'{"n": 0}', fresh=True), Upsert(1, b"a", b'{"n": 1}')),
               txn(20, Upsert(1, b"a", b'{"n": 2}'))) == {(1, b"a"): (OP_INSERT, b'{"n": 2}')}


def test_a_key_the_target_may_hold_is_upserted_or_deleted() -> None:
    assert ops(txn(10, Upsert(1, b"a", b'{"n": 1}'), Upsert(2, b"b", b'{"n": 1}'),
                   Delete(2, b"b"), Delete(3, b"c"), Upsert(3, b"c", b'{"n": 3}', fresh=True))) == {
        (1, b"a"): (OP_UPSERT, b'{"n": 1}'),
        (2, b"b"): (OP_DELETE, None),
        # deleted, then inserted again: the row was there at the start of the batch
        (3, b"c"): (OP_UPSERT, b'{"n": 3}'),
    }


def test_unchanged_toast_keeps_the_batch_s_earlier_document_or_does_nothing() -> None:
    assert ops(txn(10, Upsert(1, b"a", None), Upsert(2, b"b", b'{"n": 0}', fresh=True)),
               txn(20, Upsert(2, b"b", None))) == {(2, b"b"): (OP_INSERT, b'{"n": 0}')}
    # an unchanged-TOAST first change says the row is there: a later update upserts
    assert ops(txn(10, Upsert(1, b"a", None), Upsert(1, b"a", b'{"n": 5}'))) == {
        (1, b"a"): (OP_UPSERT, b'{"n": 5}')}


def test_truncate_drops_earlier_changes_and_later_keys_are_absent() -> None:
    batch = collapse([
        txn(10, Upsert(1, b"a", b'{"n": 1}'), Delete(2, b"b")),
        txn(20, TruncateChunk(), Upsert(3, b"c", b'{"n": 3}'), Upsert(4, b"d", b'{"n": 4}', True),
            Delete(4, b"d")),
    ])
    assert batch.truncate
    assert batch.rows == [(OP_INSERT, 3, b"c", b'{"n": 3}')]
    assert batch.changes == 6
    assert batch.counts == (0, 0, 1)


def test_markers_keep_their_transaction_order() -> None:
    f1 = FenceMarker("c", 1, 5, "active")
    f2 = FenceMarker("c", 1, 5, "frozen")
    t1, t2 = txn(10), txn(20)
    t1.markers.append(f1)
    t2.markers.append(f2)
    assert collapse([t1, t2]).markers == [(10, f1), (20, f2)]
