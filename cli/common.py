"""What every command shares: the operator's error and where the catalog is."""

from __future__ import annotations

import argparse
from typing import Any

from infra import Stack
from settings import Settings


class CliError(Exception):
    """A failure the operator can act on: printed as one line, exit code 2."""


def catalog_dsn(settings: Settings) -> str:
    """The catalog as the control plane (``settings.db.catalog_user``): at
    ``settings.catalog_dsn``, else the local stack's catalog instance. (The router service
    swaps in its read-only role itself.)"""
    return settings.db.catalog(settings.catalog_dsn or Stack.from_settings(settings).catalog_address)


def move_options(args: argparse.Namespace) -> dict[str, Any]:
    """Options of every chunk move a fleet command starts (``MigrateChunkInput`` fields):
    the throttle of ``--max-copy-rate`` (the copy) and ``--throttle-active`` (the copy and the
    change apply)."""
    throttle = copy_throttle(args)
    return {"copy_throttle": throttle} if throttle else {}


def copy_throttle(args: argparse.Namespace) -> dict[str, Any] | None:
    """``ThrottleSettings`` fields from ``--max-copy-rate`` and ``--throttle-active``."""
    out: dict[str, Any] = {}
    rate = getattr(args, "max_copy_rate", None)
    if rate is not None:
        unit, value = rate
        out["rows_per_s" if unit == "rows" else "bytes_per_s"] = value
    active = getattr(args, "throttle_active", None)
    if active is not None:
        out["max_active"] = active
    return out or None
