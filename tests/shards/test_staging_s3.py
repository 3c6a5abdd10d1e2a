"""The staging invariants on S3: a real S3 API server (moto's server mode, its own process)
reached through pyarrow's S3 client, with export and import against real PostgreSQL.

moto stands in for a real object store (AWS S3, MinIO, ...): it speaks the same REST API.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from pydantic import SecretStr

from settings import S3Settings, Settings
from shards.postgres.bulk_import import import_parts
from shards.postgres.snapshot import export_chunk
from shards.staging import Staging, StagingError, migration_of, s3_filesystem
from tests.s3server import ACCESS_KEY, REGION, SECRET_KEY, S3Server, moto_server
from tests.shards.helpers import FULL, load_docs, make_docs, prepare, read_docs

BUCKET = "staging-tests"


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with moto_server() as server:
        fs = s3_filesystem(_settings(server))
        bucket_maker = pafs.S3FileSystem(
            access_key=ACCESS_KEY, secret_key=SECRET_KEY, region=REGION,
            endpoint_override=server.endpoint, scheme="http", allow_bucket_creation=True)
        bucket_maker.create_dir(BUCKET)
        assert fs.get_file_info(BUCKET).type == pafs.FileType.Directory
        yield server


def _settings(server: S3Server) -> S3Settings:
    return S3Settings(endpoint_url=server.url, region=REGION,
                      access_key_id=SecretStr(ACCESS_KEY),
                      secret_access_key=SecretStr(SECRET_KEY))


@pytest.fixture
def staging(s3: S3Server) -> Staging:
    """A staging area under a prefix of this test's own, built from settings as workers do."""
    settings = Settings(staging_url=f"s3://{BUCKET}/t-{uuid.uuid4().hex[:8]}/",
                        s3=_settings(s3))
    return Staging.from_settings(settings)


def _objects(staging: Staging, mid: str) -> list[str]:
    selector = pafs.FileSelector(f"{staging.root}/{mid}", allow_not_found=True, recursive=True)
    return sorted(i.base_name for i in staging.fs.get_file_info(selector)
                  if i.type == pafs.FileType.File)


def _codec(staging: Staging, mid: str, part: int) -> str:
    with staging.fs.open_input_file(staging.part_path(mid, part)) as f:
        return str(pq.ParquetFile(f).metadata.row_group(0).column(0).compression)


def test_the_parts_codec_is_zstd_unless_set(s3: S3Server, tmp_path) -> None:
    assert Staging(tmp_path).compression == "zstd"
    assert Staging.from_settings(Settings(staging_url=f"s3://{BUCKET}/x",
                                          s3=_settings(s3))).compression == "zstd"
    assert Staging.from_settings(Settings(staging_url=str(tmp_path),
                                          staging_compression="lz4")).compression == "lz4"
    assert Staging.from_settings(Settings(staging_url=f"s3://{BUCKET}/x", s3=_settings(s3),
                                          staging_compression="lz4")).compression == "lz4"
    with pytest.raises(ValueError, match="staging_compression"):
        Settings(staging_compression="gzip9")  # type: ignore[arg-type]


def test_s3_staging_is_shared_and_keeps_credentials_out_of_its_repr(staging: Staging) -> None:
    assert staging.shared and staging.fs.type_name == "s3"
    assert SECRET_KEY not in repr(staging) and ACCESS_KEY not in repr(staging)
    assert SECRET_KEY not in repr(Settings(s3=S3Settings(secret_access_key=SecretStr(SECRET_KEY))))
    assert not Staging("/tmp/x").shared and Staging("/tmp/x", shared=True).shared


def test_a_failed_write_publishes_nothing_on_s3(staging: Staging) -> None:
    """Closing an S3 output stream completes its upload: a writer that fails half-way must
    not leave a partial part under the final name (nor any temporary object)."""
    with staging.write_part("m-1", 0) as out:
        out.write(b"whole")
    with pytest.raises(RuntimeError), staging.write_part("m-1", 1) as out:
        out.write(b"partial")
        raise RuntimeError("writer died")
    assert staging.parts("m-1") == [0]
    assert not staging.exists("m-1", 1)
    assert _objects(staging, "m-1") == ["part-00000.parquet"]
    with staging.open_part("m-1", 0) as f:
        assert f.read() == b"whole"


async def test_export_import_and_retried_export_on_s3(pg18_dsns, collection_name,
                                                      staging: Staging) -> None:
    src, dst = pg18_dsns[0], pg18_dsns[1]
    await prepare(src, collection_name)
    await prepare(dst, collection_name)
    load_docs(src, collection_name, make_docs(30))
    first = export_chunk(src, collection_name, FULL, staging, "s3-retry", target_part_rows=10)
    names = _objects(staging, "s3-retry")
    assert names == ["manifest.json"] + [f"part-{p:05d}.parquet" for p in range(3)]
    assert staging.compression == "zstd" and _codec(staging, "s3-retry", 0) == "ZSTD"

    # A retried export resumes (nothing rewritten), a full one overwrites the same names.
    load_docs(src, collection_name, make_docs(30, tag="more"))
    again = export_chunk(src, collection_name, FULL, staging, "s3-retry")
    assert again.skipped_parts == (0, 1, 2) and again.rows_exported == 0
    redo = export_chunk(src, collection_name, FULL, staging, "s3-retry", resume=False)
    assert redo.rows_exported == 60 and redo.parts_total == first.parts_total
    assert _objects(staging, "s3-retry") == names

    imported = import_parts(dst, collection_name, staging, "s3-retry")
    assert imported.rows_imported == 60
    assert len(read_docs(dst, collection_name)) == 60


def test_cleanup_removes_only_the_migrations_prefix_on_s3(staging: Staging) -> None:
    for mid in ("m-1", "m-10", "m.2"):
        for part in (0, 2):
            with staging.write_part(mid, part) as out:
                out.write(b"x")
        staging.write_manifest(mid, b"{}")
    staging.remove("m-1")
    assert staging.parts("m-1") == [] and _objects(staging, "m-1") == []
    assert staging.read_manifest("m-1") is None
    assert staging.parts("m-10") == [0, 2] and staging.parts("m.2") == [0, 2]
    staging.remove("m-1")  # idempotent


@pytest.mark.parametrize("migration_id", ["../x", "..", "a/b", "/abs", ".hidden", "a..b", ""])
def test_hostile_ids_are_refused_on_s3(migration_id: str, staging: Staging) -> None:
    with pytest.raises(StagingError):
        staging.part_path(migration_id, 0)
    with pytest.raises(StagingError):
        staging.remove(migration_id)
    with pytest.raises(StagingError), staging.write_part(migration_id, 0):
        pass  # never reached: the id is refused first


def test_an_s3_url_without_a_bucket_is_refused() -> None:
    with pytest.raises(StagingError):
        Staging.from_settings(Settings(staging_url="s3://"))


def test_restaged_ids_belong_to_their_migration() -> None:
    assert migration_of("wf-1.0123456789ab.g2") == "wf-1.0123456789ab"
    assert migration_of("wf-1.0123456789ab") == "wf-1.0123456789ab"
    assert migration_of("m.g") == "m.g" and migration_of("m.gx1") == "m.gx1"
