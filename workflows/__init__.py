"""Temporal workflows: orchestration only (no I/O, no clocks, no randomness)."""

from workflows.drain_shard import DrainShardInput, DrainShardResult, DrainShardWorkflow
from workflows.migrate_chunk import MigrateChunkInput, MigrateChunkResult, MigrateChunkWorkflow
from workflows.rebalance import RebalanceInput, RebalanceResult, RebalanceWorkflow

ALL_WORKFLOWS = [MigrateChunkWorkflow, DrainShardWorkflow, RebalanceWorkflow]

__all__ = [
    "ALL_WORKFLOWS",
    "DrainShardInput",
    "DrainShardResult",
    "DrainShardWorkflow",
    "MigrateChunkInput",
    "MigrateChunkResult",
    "MigrateChunkWorkflow",
    "RebalanceInput",
    "RebalanceResult",
    "RebalanceWorkflow",
]
