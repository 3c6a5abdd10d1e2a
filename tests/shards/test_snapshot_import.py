"""Snapshot export, bulk import and range delete against real PostgreSQL servers."""

from __future__ import annotations

import os
import secrets
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from psycopg import sql

from infra.net import free_port_block
from infra.postgres import PostgresInstance, embedded_bin_dir, ensure_os_user
from router.hashing import khash
from settings import DatabaseSettings, InfraSettings
from shards.errors import InvalidNameError
from shards.models import KHASH_END, KHASH_MIN, FenceState, KeyRange
from shards.postgres import PostgresShard
from shards.postgres.apply_batch import BatchWriter
from shards.postgres.bulk_import import (
    StagedPartError,
    encode_copy_rows,
    forget_parts,
    import_parts,
)
from shards.postgres.checksum import checksum_range, diff_checksums, recopy_range
from shards.postgres.provision import provision_shard
from shards.postgres.range_delete import DeleteProgress, LiveChunkError, delete_range
from shards.postgres.snapshot import (
    PART_SCHEMA,
    ExportProgress,
    _copy_batches,
    _decode_rows,
    export_chunk,
    load_manifest,
    part_metadata,
    part_row_targets,
    range_predicate,
    read_part,
)
from shards.staging import Staging, StagingError
from tests.conftest import owned_state_dir
from tests.shards.helpers import (
    FULL,
    TRICKY,
    keyed,
    load_docs,
    make_docs,
    prepare,
    read_docs,
)

# -- export and import ---------------------------------------------------------------------------


async def test_round_trip_keeps_every_bson_type(pg18_dsns, collection_name, staging):
    src, dst = pg18_dsns[0], pg18_dsns[1]
    await prepare(src, collection_name)
    await prepare(dst, collection_name)
    docs = make_docs(60)
    load_docs(src, collection_name, docs)
    seen: list[ExportProgress] = []

    exported = export_chunk(src, collection_name, FULL, staging, "rt-1", target_part_rows=16,
                            batch_bytes=4096, progress=seen.append)
    assert exported.parts_total == 4 and exported.rows_exported == 60
    assert seen[-1] == ExportProgress(rows_done=60, parts_done=4, parts_total=4)
    staged = [b for p in range(4) for b in read_part(staging, "rt-1", p)]
    keys = [(k, i) for b in staged for k, i in zip(b.column("khash").to_pylist(),
                                                     b.column("id").to_pylist(), strict=True)]
    assert keys == sorted(keys), "parts are sorted by the primary key"

    imported = import_parts(dst, collection_name, staging, "rt-1", batch_rows=7)
    assert imported.imported_parts == (0, 1, 2, 3) and imported.rows_imported == 60

    assert keyed(read_docs(dst, collection_name)) == keyed(docs)
    got = keyed(read_docs(dst, collection_name))[docs[4]["account"]]
    for field in ("_id", "amount", "when", "i64", "dbl", "bin", "bin80", "uid", "re", "ts"):
        assert type(got[field]) is type(docs[4][field]), field
    assert got["text"] == TRICKY


async def test_export_at_exported_snapshot_ignores_later_writes(pg18_dsns, collection_name,
                                                                staging):
    src, dst = pg18_dsns[0], pg18_dsns[2]
    await prepare(src, collection_name)
    await prepare(dst, collection_name)
    docs = make_docs(20)
    load_docs(src, collection_name, docs)
    with psycopg.connect(src) as holder:
        holder.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        row = holder.execute("SELECT pg_export_snapshot()").fetchone()
        assert row is not None
        load_docs(src, collection_name, make_docs(5, tag="late"))  # after the snapshot
        export_chunk(src, collection_name, FULL, staging, "snap-1", snapshot=row[0])
    import_parts(dst, collection_name, staging, "snap-1")
    assert keyed(read_docs(dst, collection_name)) == keyed(docs)


async def test_export_retry_overwrites_same_files(pg18_dsns, collection_name, staging):
    src, dst = pg18_dsns[0], pg18_dsns[1]
    await prepare(src, collection_name)
    await prepare(dst, collection_name)
    docs = make_docs(30)
    load_docs(src, collection_name, docs)
    first = export_chunk(src, collection_name, FULL, staging, "retry-1", target_part_rows=10)
    files = sorted(os.listdir(Path(staging.root) / "retry-1"))
    assert files == ["manifest.json"] + [f"part-{p:05d}.parquet" for p in range(3)]

    # Resume skips staged parts; a full retry rewrites the same names with the current data
    # (the plan is fixed by the manifest even though the row count changed).
    load_docs(src, collection_name, make_docs(30, tag="more"))
    again = export_chunk(src, collection_name, FULL, staging, "retry-1")
    assert again.skipped_parts == (0, 1, 2) and again.rows_exported == 0
    redo = export_chunk(src, collection_name, FULL, staging, "retry-1", resume=False)
    assert redo.exported_parts == (0, 1, 2) and redo.rows_exported == 60
    assert sorted(os.listdir(Path(staging.root) / "retry-1")) == files
    assert first.parts_total == redo.parts_total

    import_parts(dst, collection_name, staging, "retry-1")
    assert len(read_docs(dst, collection_name)) == 60


async def test_import_refuses_a_foreign_part(pg18_dsns, collection_name, staging):
    src, dst = pg18_dsns[0], pg18_dsns[1]
    await prepare(src, collection_name)
    await prepare(dst, collection_name)
    load_docs(src, collection_name, make_docs(20))
    export_chunk(src, collection_name, FULL, staging, "own", target_part_rows=10)
    export_chunk(src, collection_name, FULL, staging, "other", target_part_rows=10)
    root = Path(staging.root)
    shutil.copy(root / "other" / "part-00001.parquet", root / "own" / "part-00001.parquet")
    with pytest.raises(StagedPartError, match="does not belong"):
        import_parts(dst, collection_name, staging, "own")
    # Part 0 committed before the foreign part was found; nothing of part 1 did.
    with psycopg.connect(dst) as conn:
        parts = conn.execute("SELECT part FROM shardshift.import_parts WHERE migration_id = 'own'")
        assert [r[0] for r in parts] == [0]


def _append_a_row_of_part_0(staging, mid: str, collection: str, manifest, part: int) -> pa.Table:
    """Rewrite staged ``part`` with the first row of part 0 appended (a row outside its
    range, under the part's own metadata); returns part 0."""
    part0 = pa.Table.from_batches(list(read_part(staging, mid, 0)))
    rows = pa.Table.from_batches(list(read_part(staging, mid, part)))
    forged = pa.concat_tables([rows, part0.slice(0, 1)])
    schema = PART_SCHEMA.with_metadata(part_metadata(mid, collection, part, manifest.parts[part]))
    pq.write_table(forged.replace_schema_metadata(schema.metadata),
                   Path(staging.root) / mid / f"part-{part:05d}.parquet")
    return part0


async def test_import_refuses_rows_outside_the_part_range(pg18_dsns, collection_name, staging):
    """A part file with the right metadata but a row of another sub-range: the importer (its
    read-ahead thread finds it) stops before the part commits and leaves no thread behind."""
    src, dst = pg18_dsns[0], pg18_dsns[1]
    await prepare(src, collection_name)
    await prepare(dst, collection_name)
    load_docs(src, collection_name, make_docs(40))
    export_chunk(src, collection_name, FULL, staging, "stray", target_part_rows=10)
    manifest = load_manifest(staging, "stray")
    assert manifest is not None
    part0 = _append_a_row_of_part_0(staging, "stray", collection_name, manifest, 1)
    with pytest.raises(StagedPartError, match="fall outside"):
        import_parts(dst, collection_name, staging, "stray", batch_rows=4)
    with psycopg.connect(dst) as conn:
        parts = conn.execute("SELECT part FROM shardshift.import_parts"
                             " WHERE migration_id = 'stray'").fetchall()
    assert [r[0] for r in parts] == [0]
    assert len(read_docs(dst, collection_name)) == part0.num_rows, "nothing of part 1 committed"
    assert not [t for t in threading.enumerate() if t.name == "import-read-ahead"]


async def test_import_skips_a_part_another_importer_committed_meanwhile(pg18_dsns,
                                                                         collection_name,
                                                                         staging):
    """A part claimed by someone else after this import started (a zombie attempt) is skipped,
    with the batches the reading thread had already queued for it, and the parts after it
    still load; a part skipped that way is not read to the end, so a bad row in it (which
    only its loader would have checked) stops nothing."""
    src, dst = pg18_dsns[0], pg18_dsns[1]
    await prepare(src, collection_name)
    await prepare(dst, collection_name)
    docs = make_docs(60)
    load_docs(src, collection_name, docs)
    export_chunk(src, collection_name, FULL, staging, "zombie", target_part_rows=10)
    manifest = load_manifest(staging, "zombie")
    assert manifest is not None and len(manifest.parts) == 6
    _append_a_row_of_part_0(staging, "zombie", collection_name, manifest, 2)

    def claim_elsewhere(p) -> None:
        if p.part_in_flight == 0 and p.parts_done == 0:
            with psycopg.connect(dst, autocommit=True) as other:
                for part in (1, 2):
                    other.execute("INSERT INTO shardshift.import_parts (migration_id, part, rows)"
                                  " VALUES ('zombie', %s, 0) ON CONFLICT DO NOTHING", (part,))

    imported = import_parts(dst, collection_name, staging, "zombie", batch_rows=3,
                            read_ahead_bytes=1, progress=claim_elsewhere)
    assert imported.skipped_parts == (1, 2)
    assert imported.imported_parts == (0, 3, 4, 5)
    parts = [pa.Table.from_batches(list(read_part(staging, "zombie", p))) for p in (1, 2)]
    assert len(read_docs(dst, collection_name)) == 60 - sum(t.num_rows for t in parts) + 1
    assert not [t for t in threading.enumerate() if t.name == "import-read-ahead"]


def test_part_plan_ramps_up_and_down_for_large_chunks():
    """Large chunks start and end with 1/8, 1/4, 1/2-sized parts (an import following the
    export starts after an eighth of a part); small chunks and small targets split evenly."""
    sizes = part_row_targets(1_000_000, 25_000)
    assert sizes[:3] == [3_125, 6_250, 12_500] and sizes[-3:] == [12_500, 6_250, 3_125]
    assert max(sizes) <= 25_000 and sum(sizes) == 1_000_000 and len(sizes) == 45
    assert part_row_targets(60, 16) == [15, 15, 15, 15]
    assert part_row_targets(99_999, 25_000) == [25_000] * 3 + [24_999]
    assert part_row_targets(0, 50_000) == [0]
    for rows in (100_000, 123_457, 10**7):
        sizes = part_row_targets(rows, 50_000)
        assert sum(sizes) == rows and max(sizes) <= 50_000 and min(sizes) >= 50_000 // 8


async def test_ramped_plan_round_trips_with_import_following_export(pg18_dsns, collection_name,
                                                                   staging):
    src, dst = pg18_dsns[0], pg18_dsns[1]
    await prepare(src, collection_name)
    await prepare(dst, collection_name)
    docs = make_docs(16_000)
    load_docs(src, collection_name, docs)
    errors: list[BaseException] = []

    def export() -> None:
        try:
            export_chunk(src, collection_name, FULL, staging, "ramp-1", target_part_rows=4_000)
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    exporter = threading.Thread(target=export)
    exporter.start()
    try:
        imported = import_parts(dst, collection_name, staging, "ramp-1", batch_rows=1_000,
                                follow_export_s=120)
    finally:
        exporter.join()
    assert not errors
    manifest = load_manifest(staging, "ramp-1")
    assert manifest is not None
    rows = [sum(b.num_rows for b in read_part(staging, "ramp-1", p))
            for p in range(len(manifest.parts))]
    assert sum(rows) == 16_000 == imported.rows_imported
    # khash spreads rows uniformly: each part holds its planned share, within sampling noise.
    assert rows[0] < 1_000 and rows[-1] < 1_000 and max(rows) < 5_000
    assert imported.imported_parts == tuple(range(len(manifest.parts)))
    got = read_docs(dst, collection_name)
    assert len(got) == 16_000 and keyed(got) == keyed(docs)
    assert diff_checksums(checksum_range(src, collection_name, FULL, buckets=16),
                          checksum_range(dst, collection_name, FULL, buckets=16)) == []


# -- several parts at once (``import_parts(streams=...)``, a worker's ``fleet.import_streams``) --


def _import_threads() -> list[str]:
    return [t.name for t in threading.enumerate()
            if t.name == "import-read-ahead" or t.name.startswith("import-stream-")]


def _committed(dst: str, mid: str) -> dict[int, int]:
    with psycopg.connect(dst) as conn:
        return {int(p): int(n) for p, n in conn.execute(
            "SELECT part, rows FROM shardshift.import_parts WHERE migration_id = %s", (mid,))}


async def test_import_in_streams_follows_the_export_with_parts_loading_at_once(
        pg18_dsns, collection_name, staging):
    """Three streams following a running export: every part loaded once, the target equal to
    the source, and parts were in flight on more than one session at a time."""
    src, dst = pg18_dsns[0], pg18_dsns[1]
    await prepare(src, collection_name)
    await prepare(dst, collection_name)
    docs = make_docs(12_000)
    load_docs(src, collection_name, docs)
    errors: list[BaseException] = []
    in_flight: dict[str, set[int]] = {}

    def export() -> None:
        try:
            export_chunk(src, collection_name, FULL, staging, "streams-1", target_part_rows=1_500)
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    def seen(p) -> None:
        if p.part_in_flight is not None:
            in_flight.setdefault(threading.current_thread().name, set()).add(p.part_in_flight)

    exporter = threading.Thread(target=export)
    exporter.start()
    try:
        imported = import_parts(dst, collection_name, staging, "streams-1", batch_rows=500,
                                follow_export_s=120, progress=seen, streams=3)
    finally:
        exporter.join()
    assert not errors
    total = imported.parts_total
    assert total >= 6 and imported.imported_parts == tuple(range(total))
    assert imported.rows_imported == 12_000 and sum(_committed(dst, "streams-1").values()) == 12_000
    assert len(in_flight) == 3, in_flight  # the calling thread and two stream threads
    assert sorted(p for parts in in_flight.values() for p in parts) == list(range(total))
    got = read_docs(dst, collection_name)
    assert len(got) == 12_000 and keyed(got) == keyed(docs)
    assert diff_checksums(checksum_range(src, collection_name, FULL, buckets=16),
                          checksum_range(dst, collection_name, FULL, buckets=16)) == []
    assert not _import_threads()


async def test_a_failing_stream_stops_the_others_even_one_waiting_for_a_part(
        pg18_dsns, collection_name, staging):
    """Two streams: stream 0 (parts 0, 2, 4) waits for part 4, which the export has not
    staged yet (it may wait 10 minutes), when stream 1 (parts 1, 3, 5) finds a row of another
    part in part 5. The import raises that at once, only whole parts are committed, and no
    thread is left."""
    src, dst = pg18_dsns[0], pg18_dsns[1]
    await prepare(src, collection_name)
    await prepare(dst, collection_name)
    load_docs(src, collection_name, make_docs(60))
    export_chunk(src, collection_name, FULL, staging, "streams-bad", target_part_rows=10)
    manifest = load_manifest(staging, "streams-bad")
    assert manifest is not None and len(manifest.parts) == 6
    _append_a_row_of_part_0(staging, "streams-bad", collection_name, manifest, 5)
    (Path(staging.root) / "streams-bad" / "part-00004.parquet").unlink()  # "still exporting"
    stream0_done_two = threading.Event()
    stream0_waiting = threading.Event()
    probes_of_4: list[float] = []

    class Watched(Staging):
        def exists(self, migration_id: str, part: int) -> bool:
            if part == 4 and stream0_done_two.is_set():
                probes_of_4.append(0.0)
                if len(probes_of_4) >= 3:  # its reading thread polls: stream 0 is waiting
                    stream0_waiting.set()
            return super().exists(migration_id, part)

        def open_part(self, migration_id: str, part: int):
            if part == 5:  # stream 1's reading thread: fail only once stream 0 waits
                assert stream0_waiting.wait(60), "stream 0 never waited for part 4"
            return super().open_part(migration_id, part)

    commits: dict[str, int] = {}

    def progress(p) -> None:
        name = threading.current_thread().name
        if p.part_in_flight is None:
            commits[name] = commits.get(name, 0) + 1
            if name != "import-stream-1" and commits[name] == 2:
                stream0_done_two.set()

    outcome: list[BaseException] = []

    def run() -> None:
        try:
            import_parts(dst, collection_name, Watched(staging.root), "streams-bad",
                         batch_rows=4, follow_export_s=600, progress=progress, streams=2)
        except BaseException as exc:  # noqa: BLE001 - asserted below
            outcome.append(exc)

    importer = threading.Thread(target=run)
    importer.start()
    importer.join(timeout=120)  # a stream left waiting would hold it for 600 s
    assert not importer.is_alive(), "stream 0 kept waiting after stream 1 failed"
    assert stream0_waiting.is_set()
    assert len(outcome) == 1 and isinstance(outcome[0], StagedPartError)
    assert "fall outside" in str(outcome[0])
    committed = _committed(dst, "streams-bad")
    assert sorted(committed) == [0, 1, 2, 3]
    rows = {p: sum(b.num_rows for b in read_part(staging, "streams-bad", p)) for p in committed}
    assert committed == rows, "each committed part is whole"
    assert len(read_docs(dst, collection_name)) == sum(rows.values())
    assert not _import_threads()


class _Cancelled(Exception):
    """What an activity's progress callback raises when the activity is cancelled."""


async def test_a_multi_stream_import_stopped_by_its_progress_resumes_exactly(
        pg18_dsns, collection_name, staging):
    """The activity stops an import by raising from ``progress`` (cancellation): with three
    streams the exception comes out as itself, the parts in flight roll back, and the next
    attempt loads exactly the parts still missing."""
    src, dst = pg18_dsns[0], pg18_dsns[1]
    await prepare(src, collection_name)
    await prepare(dst, collection_name)
    docs = make_docs(300)
    load_docs(src, collection_name, docs)
    export_chunk(src, collection_name, FULL, staging, "streams-stop", target_part_rows=20)

    def stop_after_two(p) -> None:
        if p.parts_done >= 2:
            raise _Cancelled()

    with pytest.raises(_Cancelled):
        import_parts(dst, collection_name, staging, "streams-stop", batch_rows=5,
                     progress=stop_after_two, streams=3)
    assert not _import_threads()
    committed = _committed(dst, "streams-stop")
    assert 2 <= len(committed) < 15
    assert len(read_docs(dst, collection_name)) == sum(committed.values())

    resumed = import_parts(dst, collection_name, staging, "streams-stop", streams=3)
    assert resumed.skipped_parts == tuple(sorted(committed))
    assert sorted(resumed.imported_parts + resumed.skipped_parts) == list(range(15))
    assert resumed.rows_imported == 300
    got = read_docs(dst, collection_name)
    assert len(got) == 300 and keyed(got) == keyed(docs)


@pytest.fixture(scope="module")
def private_pg() -> Iterator[PostgresInstance]:
    """A PostgreSQL 18 of this module's own, which a test may stop without disturbing others."""
    state = owned_state_dir("import")
    password = secrets.token_urlsafe(16)
    passfile = state / "pgpass"
    passfile.write_text(f"127.0.0.1:*:*:postgres:{password}\n")
    os.chmod(passfile, 0o600)
    (state / "pg").mkdir()
    os.chmod(state / "pg", 0o755)
    run_as = InfraSettings().run_as
    if os.geteuid() == 0:
        ensure_os_user(run_as)
    instance = PostgresInstance(
        "import-target", data_dir=state / "pg" / "import-target", port=free_port_block(1),
        bin_dir=embedded_bin_dir(), passfile=passfile, password=password, run_as=run_as,
    )
    try:
        instance.init()
        instance.start(60)
        provision_shard(instance.dsn(), passfile)  # the mover imports
        yield instance
    finally:
        try:
            instance.destroy()
        finally:
            shutil.rmtree(state, ignore_errors=True)


async def test_import_resumes_after_target_stops_mid_import(pg18_dsns, collection_name,
                                                            staging, private_pg):
    src, dst = pg18_dsns[0], private_pg.dsn(user=DatabaseSettings().mover_user)
    await prepare(src, collection_name)
    await prepare(dst, collection_name)
    docs = make_docs(120)
    load_docs(src, collection_name, docs)
    export_chunk(src, collection_name, FULL, staging, "crash-1", target_part_rows=20)

    def stop_in_third_part(p) -> None:
        # Rows of part 2 are in flight (sent, not committed) when the server goes down.
        if p.part_in_flight == 2 and p.parts_done == 2:
            private_pg.stop()

    with pytest.raises(psycopg.OperationalError):
        import_parts(dst, collection_name, staging, "crash-1", batch_rows=5,
                     progress=stop_in_third_part)
    assert private_pg.pid() is None
    private_pg.start(60)
    with psycopg.connect(dst) as conn:
        done = conn.execute("SELECT part FROM shardshift.import_parts"
                            " WHERE migration_id = 'crash-1' ORDER BY 1").fetchall()
    assert [r[0] for r in done] == [0, 1]

    resumed = import_parts(dst, collection_name, staging, "crash-1")
    assert resumed.skipped_parts == (0, 1)
    assert resumed.imported_parts == tuple(range(2, resumed.parts_total))
    assert resumed.rows_imported == 120
    got = read_docs(dst, collection_name)
    assert len(got) == 120 and keyed(got) == keyed(docs)
    a = checksum_range(src, collection_name, FULL, buckets=16)
    b = checksum_range(dst, collection_name, FULL, buckets=16)
    assert diff_checksums(a, b) == []


@pytest.mark.pg15
async def test_pg15_to_pg18_round_trip_with_equal_checksums(pg15_dsn, pg18_dsns,
                                                            collection_name, staging):
    src, dst = pg15_dsn, pg18_dsns[2]
    await prepare(src, collection_name)
    await prepare(dst, collection_name)
    docs = make_docs(50)
    load_docs(src, collection_name, docs)
    export_chunk(src, collection_name, FULL, staging, "upgrade-1", target_part_rows=20)
    import_parts(dst, collection_name, staging, "upgrade-1")
    assert keyed(read_docs(dst, collection_name)) == keyed(docs)
    a = checksum_range(src, collection_name, FULL, buckets=8)
    b = checksum_range(dst, collection_name, FULL, buckets=8)
    assert a.count == 50 and a.buckets == b.buckets


def test_binary_copy_rows_decode_and_bad_framing_is_refused():
    """The export's decoder reads exactly the rows the importer's encoder writes (one COPY
    message per row), and refuses a stream whose rows do not frame as (int8, text, jsonb)."""
    table = pa.table({"khash": [KHASH_MIN, -1, 0, 2**62], "id": ["a", "", "é😀", TRICKY],
                      "doc": ["{}", TRICKY, '{"x": "\\N"}', "[" + "1," * 5000 + "1]"]},
                     schema=PART_SCHEMA)
    payload = bytes(encode_copy_rows(table.to_batches()[0]))
    sizes = [23 + len(i.encode()) + len(d.encode())
             for i, d in zip(table["id"].to_pylist(), table["doc"].to_pylist(), strict=True)]
    rows, at = [], 0
    for n in sizes:
        rows.append(payload[at:at + n])
        at += n
    assert _decode_rows(b"".join(rows), [len(r) for r in rows]).equals(table)

    merged = [rows[0] + rows[1], *rows[2:]]  # two rows in one message
    with pytest.raises(ValueError, match="malformed"):
        _decode_rows(b"".join(merged), [len(r) for r in merged])
    bad_len = [rows[0][:14] + (10**6).to_bytes(4, "big") + rows[0][18:]]  # id past the row
    with pytest.raises(ValueError, match="malformed"):
        _decode_rows(bad_len[0], [len(bad_len[0])])
    bad_utf8 = [rows[0][:-1] + b"\xff"]
    with pytest.raises(pa.ArrowInvalid):
        _decode_rows(bad_utf8[0], [len(bad_utf8[0])])
    with pytest.raises(ValueError, match="malformed"):  # lengths that do not add up
        _decode_rows(b"".join(rows), [len(r) for r in rows[1:]])


def test_copy_out_read_whole_and_a_server_error_mid_stream_raised(pg18_dsns):
    """The export's COPY reader (messages taken from libpq's buffer, psycopg's read only to
    wait) yields every row, and a COPY the server fails after sending rows raises the
    server's own error, leaving the connection usable after a rollback."""
    row = ("SELECT g::bigint AS khash, 'id' || g AS id,"
           " jsonb_build_object('n', {}) AS doc FROM generate_series(1, 20000) g ORDER BY g")
    with psycopg.connect(pg18_dsns[0]) as conn:
        tables = list(_copy_batches(conn, psycopg.sql.SQL(row.format("g")), 1 << 16))
        assert len(tables) > 1  # several blocks
        got = pa.concat_tables(tables)
        assert got["khash"].to_pylist() == list(range(1, 20001))
        assert got["doc"][19999].as_py() == '{"n": 20000}'
        conn.rollback()
        with pytest.raises(psycopg.errors.DivisionByZero):  # fails at row 15,000
            list(_copy_batches(conn, psycopg.sql.SQL(row.format("1 / (15000 - g)")), 1 << 16))
        conn.rollback()
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize("rows", [0, 1])
def test_copy_out_of_an_empty_or_one_row_range(pg18_dsns, rows):
    """With no row, the server sends the file header and the trailer in one message; the
    reader must take that as the end of the data, not as a COPY cut short (an empty chunk
    is an ordinary move: a drain moves them all)."""
    query = psycopg.sql.SQL(
        "SELECT g::bigint AS khash, 'id' || g AS id, jsonb_build_object('n', g) AS doc"
        " FROM generate_series(1, {}) g").format(psycopg.sql.Literal(rows))
    with psycopg.connect(pg18_dsns[0]) as conn:
        got = list(_copy_batches(conn, query, 1 << 16))
        assert sum(t.num_rows for t in got) == rows
        assert conn.execute("SELECT 1").fetchone() == (1,)


# -- range predicates ----------------------------------------------------------------------------


async def _table_without_statistics(dsn: str, collection: str, rows: int, *,
                                    pad: int) -> sql.Composed:
    """The collection's table holding ``rows`` rows of other chunks, below ``2**62`` (documents
    of ``pad`` bytes), with autovacuum off and no ANALYZE: no statistics, as a target's new
    collection has. Returns the table's name."""
    await prepare(dsn, collection)
    table = sql.SQL("docs.{}").format(sql.Identifier(collection))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER TABLE {} SET (autovacuum_enabled = false)").format(table))
        conn.execute(sql.SQL("INSERT INTO {} (khash, id, doc) SELECT -1000000 - g, g::text,"
                             " jsonb_build_object('pad', repeat('x', %s))"
                             " FROM generate_series(1, %s) g").format(table), (pad, rows))
    return table


@pytest.mark.parametrize("top", [True, False], ids=["unbounded-top", "bounded"])
async def test_a_range_is_read_through_the_index_even_without_statistics(
        pg18_dsns, collection_name, top):
    """The import empties each part's range before copying it, verify sums a range, cleanup
    deletes one: on a table the planner has no statistics for (a target's new collection:
    autovacuum has not analyzed it yet), each must still be an index range scan. The top
    chunk's range (``hi`` = the end of the khash space) was a one-sided ``khash >= lo``,
    which the planner then prices at a third of the table: a sequential scan of every row of
    the table, and, with data checksums (PostgreSQL 18's default), a full-page image in the
    WAL for every page whose hint bits it set (at 1M documents: 1.2 GB of WAL beside 1.4 GB
    of rows, on the import's last part)."""
    dst = pg18_dsns[1]
    table = await _table_without_statistics(dst, collection_name, 30000, pad=1000)
    with psycopg.connect(dst, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM pg_stats WHERE schemaname = 'docs'"
                            " AND tablename = %s", (collection_name,)).fetchone() == (0,)
        key_range = KeyRange(lo=2**62, hi=KHASH_END if top else 2**62 + 2**40)
        where = range_predicate(key_range)

        def estimate(statement: sql.Composable) -> float:
            row = conn.execute(sql.SQL("EXPLAIN (FORMAT JSON) ") + statement).fetchone()
            assert row is not None
            return float(row[0][0]["Plan"]["Plan Rows"])

        whole = estimate(sql.SQL("SELECT khash FROM {}").format(table))
        ranged = estimate(sql.SQL("SELECT khash FROM {} WHERE {}").format(table, where))
        # A third of a large table is a sequential scan (bench.bulk_copy, 1M documents: the
        # last part's delete read 996,845 rows); a range pair is priced at half a percent.
        assert ranged <= 0.01 * whole, (ranged, whole)
        for statement in (sql.SQL("SELECT count(*) FROM {} WHERE {}"),
                          sql.SQL("DELETE FROM {} WHERE {}")):
            plan = "\n".join(r[0] for r in conn.execute(
                sql.SQL("EXPLAIN ") + statement.format(table, where)))
            assert "Seq Scan" not in plan and "Index" in plan, plan
        assert conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE {}").format(
            table, range_predicate(KeyRange(lo=KHASH_MIN, hi=KHASH_END)))).fetchone() == (30000,)


async def test_the_applier_s_truncate_of_the_top_chunk_reads_through_the_index(
        pg18_dsns, collection_name):
    """A source TRUNCATE reaches the target as a delete of the chunk's range
    (``BatchWriter``): on the top chunk of a table without statistics it must not read the
    whole table (the other chunks' rows), as the import's delete once did. Its range was
    ``khash >= lo AND (NULL IS NULL OR ...)``, a lone inequality: at 300,000 other rows the
    planner chose a sequential scan."""
    dst = pg18_dsns[1]
    table = await _table_without_statistics(dst, collection_name, 300000, pad=0)
    with psycopg.connect(dst, autocommit=True) as conn:
        writer = BatchWriter(collection_name, KeyRange(lo=2**62, hi=KHASH_END))
        plan = "\n".join(r[0] for r in conn.execute(sql.SQL("EXPLAIN ") + writer._truncate))
        assert "Seq Scan" not in plan and "Index" in plan, plan

        # And it deletes its range, bounds included, and nothing else.
        edges = [2**62 - 1, 2**62, 2**62 + 2**40 - 1, 2**62 + 2**40, 2**63 - 1]
        conn.execute(sql.SQL("INSERT INTO {} (khash, id, doc) SELECT h, 'edge', '{{}}'"
                             " FROM unnest(%s::bigint[]) h").format(table), (edges,))
        for key_range, left in ((KeyRange(lo=2**62, hi=2**62 + 2**40), [0, 3, 4]),
                                (KeyRange(lo=2**62, hi=KHASH_END), [0])):
            with conn.transaction(force_rollback=True):
                conn.execute(BatchWriter(collection_name, key_range)._truncate)
                kept = [h for (h,) in conn.execute(sql.SQL(
                    "SELECT khash FROM {} WHERE id = 'edge' ORDER BY khash").format(table))]
                assert kept == [edges[i] for i in left], key_range


# -- range delete --------------------------------------------------------------------------------


async def test_range_delete_removes_exactly_the_range(pg18_dsns, collection_name):
    dsn = pg18_dsns[1]
    await prepare(dsn, collection_name)
    docs = make_docs(200)
    load_docs(dsn, collection_name, docs)
    left, middle, right = FULL.split(3)
    expected_kept = [d for d in docs if not middle.contains(khash(d["account"]))]
    in_middle = len(docs) - len(expected_kept)
    seen: list[DeleteProgress] = []

    # Resuming from a checkpoint, and re-running after completion, delete the same rows.
    first = delete_range(dsn, collection_name, middle, batch_size=7, progress=seen.append)
    assert first.rows_deleted == in_middle and len(seen) == -(-in_middle // 7)
    assert [s.rows_deleted for s in seen] == sorted(s.rows_deleted for s in seen)
    again = delete_range(dsn, collection_name, middle, batch_size=7,
                         after=(seen[0].after_khash, seen[0].after_id))
    assert again.rows_deleted == 0
    assert keyed(read_docs(dsn, collection_name)) == keyed(expected_kept)
    assert read_docs(dsn, collection_name, middle) == []


async def test_range_delete_refuses_a_served_chunk(pg18_dsns, collection_name):
    dsn = pg18_dsns[1]
    await prepare(dsn, collection_name)
    load_docs(dsn, collection_name, make_docs(20))
    left, right = FULL.split(2)
    async with PostgresShard("t", dsn) as shard:
        await shard.put_fence(collection_name, 7, right, 1, FenceState.ACTIVE)
    with pytest.raises(LiveChunkError, match="nothing deleted"):
        delete_range(dsn, collection_name, KeyRange(lo=right.lo - 10, hi=right.lo + 10))
    assert len(read_docs(dsn, collection_name)) == 20
    deleted = delete_range(dsn, collection_name, left)  # no fence serves the left half
    assert deleted.rows_deleted == 20 - len(read_docs(dsn, collection_name, right))


# -- names ---------------------------------------------------------------------------------------

HOSTILE = ['x"; DROP TABLE docs.y; --', "../etc", "", "a b", "pg_catalog.pg_class", 'a"b']


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_collection_names_are_rejected_before_anything(name, pg18_dsns, staging):
    dsn = pg18_dsns[0]
    calls = [
        lambda: export_chunk(dsn, name, FULL, staging, "hostile"),
        lambda: import_parts(dsn, name, staging, "hostile"),
        lambda: checksum_range(dsn, name, FULL),
        lambda: recopy_range(dsn, dsn, name, FULL),
        lambda: delete_range(dsn, name, FULL),
    ]
    for call in calls:
        with pytest.raises(InvalidNameError):
            call()
    assert staging.parts("hostile") == [] and staging.read_manifest("hostile") is None


@pytest.mark.parametrize(
    "migration_id", ["../x", "..", "a/b", "/abs", ".hidden", "a..b", "", "x" * 102, "a\x00b", 7]
)
def test_staging_rejects_path_traversal(migration_id, staging):
    with pytest.raises(StagingError):
        staging.part_path(migration_id, 0)
    with pytest.raises(StagingError):
        staging.remove(migration_id)


def test_staging_layout_and_cleanup(staging):
    for mid in ("m-1", "m.2"):
        for part in (0, 2):
            with staging.write_part(mid, part) as out:
                out.write(b"x")
    assert staging.parts("m-1") == [0, 2] and staging.exists("m-1", 2)
    with pytest.raises(RuntimeError), staging.write_part("m-1", 5) as out:
        out.write(b"partial")
        raise RuntimeError("writer died")
    assert staging.parts("m-1") == [0, 2], "a failed write publishes nothing"
    assert sorted(os.listdir(Path(staging.root) / "m-1")) == [
        "part-00000.parquet", "part-00002.parquet"], "no temporary file is left behind"
    staging.remove("m-1")
    assert staging.parts("m-1") == [] and staging.parts("m.2") == [0, 2]
    with pytest.raises(StagingError):
        staging.part_path("m-1", 100_000)


def test_staging_on_an_arrow_filesystem_uri():
    mem = Staging("mock:///stage")  # pyarrow's in-memory filesystem, by URI
    with mem.write_part("m1", 3) as out:
        out.write(b"data")
    assert mem.parts("m1") == [3]
    mem.remove("m1")
    assert mem.parts("m1") == []


async def test_copy_redone_on_another_host_needs_a_fresh_staging_id(pg18_dsns, collection_name):
    """A copy redone on another worker (its staging private to the lost host) plans its parts
    anew: the row count changed meanwhile. Imported under the same id, the target's progress
    rows from the old plan mark new parts as done and their rows are lost; under a fresh id
    (``{migration}.g1``, as the workflow's pinned copy does) every sub-range is reloaded."""
    src, naive, restaged = pg18_dsns[0], pg18_dsns[1], pg18_dsns[2]
    for dsn in (src, naive, restaged):
        await prepare(dsn, collection_name)
    load_docs(src, collection_name, make_docs(60))
    host_a, host_b = owned_state_dir("staging-a"), owned_state_dir("staging-b")
    try:
        lost_host, survivor = Staging(host_a), Staging(host_b)
        export_chunk(src, collection_name, FULL, lost_host, "mv.1", target_part_rows=20)

        def die_in_second_part(p) -> None:
            if p.part_in_flight == 1 and p.parts_done == 1:
                raise RuntimeError("host lost")

        for dst in (naive, restaged):
            with pytest.raises(RuntimeError):
                import_parts(dst, collection_name, lost_host, "mv.1",
                             progress=die_in_second_part)
        load_docs(src, collection_name, make_docs(60, tag="later"))

        export_chunk(src, collection_name, FULL, survivor, "mv.1", target_part_rows=20)
        import_parts(naive, collection_name, survivor, "mv.1")
        assert len(read_docs(naive, collection_name)) < 120, "old-plan part 0 hid new rows"

        export_chunk(src, collection_name, FULL, survivor, "mv.1.g1", target_part_rows=20)
        import_parts(restaged, collection_name, survivor, "mv.1.g1")
        assert len(read_docs(restaged, collection_name)) == 120
        assert diff_checksums(checksum_range(src, collection_name, FULL, buckets=16),
                              checksum_range(restaged, collection_name, FULL, buckets=16)) == []
        # mv.1's part 0 (the old plan) and the six parts of mv.1.g1 are forgotten together.
        assert forget_parts(restaged, "mv.1") == 7
    finally:
        shutil.rmtree(host_a, ignore_errors=True)
        shutil.rmtree(host_b, ignore_errors=True)
