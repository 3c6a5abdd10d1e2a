"""What every command shares: the operator's error and where the catalog is."""

from __future__ import annotations

from infra import Stack
from settings import Settings


class CliError(Exception):
    """A failure the operator can act on: printed as one line, exit code 2."""


def catalog_dsn(settings: Settings) -> str:
    """The catalog DSN: from settings, else the local stack's catalog instance."""
    return settings.catalog_dsn or Stack.from_settings(settings).catalog_dsn
