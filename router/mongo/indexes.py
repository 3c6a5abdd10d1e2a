"""Index commands: ``createIndexes``, ``listIndexes``, ``dropIndexes``."""

from __future__ import annotations
