"""Validation of the identifiers the catalog stores: each raises before anything is read."""

from __future__ import annotations

import re

import psycopg
from psycopg.conninfo import conninfo_to_dict

from shards.errors import InvalidNameError

_SHARD_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,62}")
_MIGRATION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,199}")


def check_shard_id(shard_id: object) -> str:
    """A shard id: a letter, then up to 62 letters, digits, ``_``, ``.`` or ``-``."""
    if not isinstance(shard_id, str) or not _SHARD_ID.fullmatch(shard_id):
        raise InvalidNameError(
            f"invalid shard id {shard_id!r}: use a letter followed by up to 62 letters, digits, "
            "'_', '.' or '-'"
        )
    return shard_id


def check_migration_id(migration_id: object) -> str:
    """A migration id (a Temporal workflow id such as ``rebalance-7/42``)."""
    if not isinstance(migration_id, str) or not _MIGRATION_ID.fullmatch(migration_id):
        raise InvalidNameError(
            f"invalid migration id {migration_id!r}: use a letter or digit followed by up to 199 "
            "letters, digits, '_', '.', ':', '/' or '-'"
        )
    return migration_id


def check_address(address: object) -> str:
    """A libpq DSN without secrets: the catalog is readable by every router and worker."""
    if not isinstance(address, str) or not address.strip():
        raise ValueError(f"invalid shard address {address!r}: expected a libpq DSN")
    try:
        params = conninfo_to_dict(address)
    except psycopg.ProgrammingError as exc:
        raise ValueError(f"invalid shard address: not a libpq DSN ({exc})") from None
    if params.get("password"):
        raise ValueError(
            "the shard address contains a password; the catalog stores addresses in the clear. "
            "Put the password in a libpq passfile and pass passfile=... instead"
        )
    return address


def check_chunk_id(chunk_id: object) -> int:
    if not isinstance(chunk_id, int) or isinstance(chunk_id, bool) or not 0 < chunk_id < 2**63:
        raise ValueError(f"invalid chunk id {chunk_id!r}: expected a positive 64-bit integer")
    return chunk_id


def check_token(token: object) -> int:
    if not isinstance(token, int) or isinstance(token, bool) or not 0 < token < 2**63 - 1:
        raise ValueError(f"invalid token {token!r}: expected a positive 64-bit integer")
    return token


__all__ = [
    "check_address", "check_chunk_id", "check_migration_id", "check_shard_id", "check_token",
]
