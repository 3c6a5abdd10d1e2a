"""The local stack: Temporal dev server and PostgreSQL instances (``shardshift infra``)."""

from infra.errors import InfraError
from infra.stack import Stack, StackRecord

__all__ = ["InfraError", "Stack", "StackRecord"]
