"""The staging area: where a migration's snapshot parts wait between export and import.

Layout (one directory per migration, nothing else in it)::

    {root}/{migration_id}/manifest.json           the part plan (sub-ranges), written once
    {root}/{migration_id}/part-{part:05d}.parquet one Parquet file per khash sub-range

Invariants
----------
* Names derive only from ``(migration_id, part)``: a retried export writes the same names, so it
  overwrites rather than duplicates, and cleanup is "remove the migration's directory".
* A file is visible under its final name only when complete. A writer writes a private
  temporary name (host, process, thread and a random token: a zombie writer and its retry on
  another host never share one) in the same directory and then moves it to the final name. On
  local disk that is an atomic rename. On object stores (S3, GCS, ...) a move is a server-side
  copy, which publishes the whole object at once; the upload itself is not written under the
  final name because closing an S3 output stream completes the upload even when the writer
  failed half-way (a partial part would be published). Hence ``exists(part)`` means
  "complete", and an interrupted writer leaves at most a temporary file that listings ignore
  and ``remove`` deletes.
* Shared or private: an object store (or a directory every host mounts, ``shared=True``) is
  one staging area for every worker; a local directory is private to its host, so a move's
  import must run where its export ran (``Staging.shared``; see the workflow's pinned copy).
* Migration ids are validated (``^[A-Za-z0-9][A-Za-z0-9_.-]{0,100}$``, no ``..``) before any
  path is built, so an id can never address anything outside its own directory.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.fs as pafs

from settings import S3Settings, Settings

_MIGRATION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,100}")
_PART_FILE = re.compile(r"part-(\d{5})\.parquet")
MANIFEST = "manifest.json"
MAX_PARTS = 100_000
"""Part numbers are written with five digits."""

# Filesystems private to one host (or process): staging there is not shared by default.
_PRIVATE = {"local", "mock"}
_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:40] or "host"


class StagingError(ValueError):
    """A bad migration id or part number, or a staging area that cannot be used."""


def check_migration_id(migration_id: object) -> str:
    """Validate a migration id for use in staging paths; returns it unchanged.

    Raises:
        StagingError: the id could escape its directory or is not a plain name.
    """
    if (
        not isinstance(migration_id, str)
        or not _MIGRATION_ID.fullmatch(migration_id)
        or ".." in migration_id
    ):
        raise StagingError(
            f"invalid migration id {migration_id!r}: use a letter or digit followed by up to "
            "100 letters, digits, '_', '-' or '.' (no '..')"
        )
    return migration_id


_RESTAGED = re.compile(r"(.+)\.g\d+")


def migration_of(staging_id: str) -> str:
    """The migration a staging id belongs to: ``{migration_id}.g{N}`` names a copy redone on
    another worker (the workflow's pinned copy); any other id is the migration's own."""
    m = _RESTAGED.fullmatch(staging_id)
    return m.group(1) if m else staging_id


def _check_part(part: object) -> int:
    if not isinstance(part, int) or isinstance(part, bool) or not 0 <= part < MAX_PARTS:
        raise StagingError(f"invalid part number {part!r}: expected 0..{MAX_PARTS - 1}")
    return part


class Staging:
    """A staging area on any pyarrow filesystem.

    Args:
        url: A local directory (``/var/tmp/staging``), a ``file://`` URI, or any URI that
            ``pyarrow.fs.FileSystem.from_uri`` understands (``s3://bucket/prefix``, ...).
        filesystem: An already-built filesystem; ``url`` is then a path inside it.
    """

    def __init__(self, url: str | Path, filesystem: pafs.FileSystem | None = None, *,
                 shared: bool | None = None, compression: str | None = None) -> None:
        text = str(url)
        if filesystem is not None:
            self.fs, root = filesystem, text.split("://", 1)[-1]
        elif "://" in text:
            self.fs, root = pafs.FileSystem.from_uri(text)
        else:
            self.fs, root = pafs.LocalFileSystem(), os.path.abspath(text)
        self.root = root.rstrip("/") or "/"
        self.url = text
        self.shared = shared if shared is not None else self.fs.type_name not in _PRIVATE
        """Whether every worker sees this staging area (else a move's import must run on the
        worker that exported)."""
        self.compression = compression or "zstd"
        """The codec of the parts exported here (``Settings.staging_compression``, default
        zstd). lz4 takes about half zstd's CPU to write and read back, for about twice the
        staged bytes on poorly compressible text; on a quiet 2-core host it bought no
        wall-clock time (the target's COPY sets the pace), so it is the operator's choice
        for workers short of CPU, not the default (docs/architecture.md, "Performance: bulk
        copy")."""

    @classmethod
    def from_settings(cls, settings: Settings) -> Staging:
        """The staging area of ``settings.staging`` (``s3://`` URLs use ``settings.s3``)."""
        url = settings.staging
        if url.startswith("s3://"):
            root = url.removeprefix("s3://").strip("/")
            if not root:
                raise StagingError(f"staging url {url!r} names no bucket")
            return cls(f"s3://{root}", s3_filesystem(settings.s3), shared=settings.staging_shared,
                       compression=settings.staging_compression)
        return cls(url, shared=settings.staging_shared, compression=settings.staging_compression)

    def __repr__(self) -> str:
        return f"Staging({self.url!r})"

    # -- paths -------------------------------------------------------------------------------

    def migration_dir(self, migration_id: str) -> str:
        return f"{self.root}/{check_migration_id(migration_id)}"

    def part_path(self, migration_id: str, part: int) -> str:
        return f"{self.migration_dir(migration_id)}/part-{_check_part(part):05d}.parquet"

    def manifest_path(self, migration_id: str) -> str:
        return f"{self.migration_dir(migration_id)}/{MANIFEST}"

    # -- queries -----------------------------------------------------------------------------

    def _exists(self, path: str) -> bool:
        return bool(self.fs.get_file_info(path).type == pafs.FileType.File)

    def exists(self, migration_id: str, part: int) -> bool:
        """Whether the part is staged (complete: partial files never carry the final name)."""
        return self._exists(self.part_path(migration_id, part))

    def parts(self, migration_id: str) -> list[int]:
        """Part numbers staged for a migration, ascending (temporary files are ignored)."""
        selector = pafs.FileSelector(self.migration_dir(migration_id), allow_not_found=True)
        found = []
        for info in self.fs.get_file_info(selector):
            m = _PART_FILE.fullmatch(info.base_name)
            if m and info.type == pafs.FileType.File:
                found.append(int(m.group(1)))
        return sorted(found)

    def part_size(self, migration_id: str, part: int) -> int:
        return int(self.fs.get_file_info(self.part_path(migration_id, part)).size or 0)

    # -- reading and writing -----------------------------------------------------------------

    def open_part(self, migration_id: str, part: int) -> pa.NativeFile:
        """A random-access reader of a staged part (Parquet needs to seek to its footer)."""
        return self.fs.open_input_file(self.part_path(migration_id, part))

    @contextmanager
    def write_part(self, migration_id: str, part: int) -> Iterator[pa.NativeFile]:
        """An output stream for a part, published under its final name only on success."""
        with self._atomic_output(self.part_path(migration_id, part)) as out:
            yield out

    def read_manifest(self, migration_id: str) -> bytes | None:
        path = self.manifest_path(migration_id)
        if not self._exists(path):
            return None
        with self.fs.open_input_stream(path) as f:
            return bytes(f.read())

    def write_manifest(self, migration_id: str, data: bytes) -> None:
        with self._atomic_output(self.manifest_path(migration_id)) as out:
            out.write(data)

    def remove(self, migration_id: str) -> None:
        """Delete everything staged for a migration (idempotent)."""
        path = self.migration_dir(migration_id)
        if self.fs.get_file_info(path).type != pafs.FileType.NotFound:
            self.fs.delete_dir(path)

    @contextmanager
    def _atomic_output(self, final: str) -> Iterator[Any]:
        directory = final.rsplit("/", 1)[0]
        self.fs.create_dir(directory, recursive=True)
        # Private temporary name: a zombie writer and its retry never interleave their bytes.
        tmp = (f"{final}.tmp-{_HOST}-{os.getpid()}-{threading.get_ident()}-"
               f"{uuid.uuid4().hex[:8]}")
        out: IO[bytes] | Any = self.fs.open_output_stream(tmp)
        try:
            yield out
            out.close()
            self.fs.move(tmp, final)
        except BaseException:
            if not out.closed:
                out.close()  # (on S3 this publishes the temporary object: deleted next)
            try:
                self.fs.delete_file(tmp)
            except OSError:  # already gone: nothing to clean
                pass
            raise


def s3_filesystem(s3: S3Settings) -> pafs.S3FileSystem:
    """pyarrow's S3 client for ``s3`` settings (unset credentials: the AWS default chain)."""
    kw: dict[str, Any] = {}
    if s3.endpoint_url:
        scheme, _, rest = s3.endpoint_url.partition("://")
        if not rest:
            scheme, rest = "https", s3.endpoint_url
        kw["endpoint_override"] = rest.rstrip("/")
        kw["scheme"] = scheme
    if s3.region:
        kw["region"] = s3.region
    if s3.access_key_id is not None and s3.secret_access_key is not None:
        kw["access_key"] = s3.access_key_id.get_secret_value()
        kw["secret_key"] = s3.secret_access_key.get_secret_value()
        if s3.session_token is not None:
            kw["session_token"] = s3.session_token.get_secret_value()
    return pafs.S3FileSystem(**kw)


__all__ = ["MANIFEST", "Staging", "StagingError", "check_migration_id", "migration_of",
           "s3_filesystem"]
