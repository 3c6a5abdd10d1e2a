"""What every command shares: the operator's error and where the catalog is."""

from __future__ import annotations

from infra import Stack
from settings import Settings


class CliError(Exception):
    """A failure the operator can act on: printed as one line, exit code 2."""


def catalog_dsn(settings: Settings) -> str:
    """The catalog as the control plane (``settings.db.catalog_user``): at
    ``settings.catalog_dsn``, else the local stack's catalog instance. (The router service
    swaps in its read-only role itself.)"""
    return settings.db.catalog(settings.catalog_dsn or Stack.from_settings(settings).catalog_address)
