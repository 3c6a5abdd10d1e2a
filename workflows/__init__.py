"""Temporal workflows: orchestration only (no I/O, no clocks, no randomness)."""

from workflows.drain_shard import DrainShardInput, DrainShardResult, DrainShardWorkflow
from workflows.migrate_chunk import MigrateChunkInput, MigrateChunkResult, MigrateChunkWorkflow

ALL_WORKFLOWS = [MigrateChunkWorkflow, DrainShardWorkflow]

__all__ = [
    "ALL_WORKFLOWS",
    "DrainShardInput",
    "DrainShardResult",
    "DrainShardWorkflow",
    "MigrateChunkInput",
    "MigrateChunkResult",
    "MigrateChunkWorkflow",
]
