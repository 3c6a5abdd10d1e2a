"""Validation of every name that reaches SQL: collections, field paths, index names.

Names are checked against strict patterns *and* passed to SQL only as quoted identifiers or
literals (``psycopg.sql``), so a hostile name is rejected with a clear message before anything
is touched, and even a name that slipped through could not change a statement's meaning.
"""

from __future__ import annotations

import re

from shards.errors import InvalidNameError

_COLLECTION = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,47}")
_SEGMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_INDEX = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,40}")
MAX_PATH_DEPTH = 8


def check_collection(name: object) -> str:
    """A collection name: a letter, then up to 47 letters, digits or underscores."""
    if not isinstance(name, str) or not _COLLECTION.fullmatch(name):
        raise InvalidNameError(
            f"invalid collection name {name!r}: use a letter followed by up to 47 letters, "
            "digits or underscores"
        )
    return name


def check_field_path(path: object) -> tuple[str, ...]:
    """A dotted field path (``a.b.c``), each segment an identifier; returns the segments."""
    if not isinstance(path, str) or not path:
        raise InvalidNameError(f"invalid field path {path!r}: expected a non-empty string")
    parts = tuple(path.split("."))
    if len(parts) > MAX_PATH_DEPTH or not all(_SEGMENT.fullmatch(p) for p in parts):
        raise InvalidNameError(
            f"invalid field path {path!r}: use up to {MAX_PATH_DEPTH} dot-separated segments, "
            "each a letter or underscore followed by letters, digits or underscores"
        )
    return parts


def check_index_name(name: object) -> str:
    if not isinstance(name, str) or not _INDEX.fullmatch(name):
        raise InvalidNameError(
            f"invalid index name {name!r}: use a letter followed by up to 40 letters, digits "
            "or underscores"
        )
    return name
