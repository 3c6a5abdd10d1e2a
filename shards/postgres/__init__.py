"""The PostgreSQL document shard engine."""

from shards.postgres.engine import PostgresShard

__all__ = ["PostgresShard"]
