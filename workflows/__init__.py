"""Temporal workflows: orchestration only (no I/O, no clocks, no randomness)."""

from workflows.change_indexes import (
    ChangeIndexesInput,
    ChangeIndexesResult,
    ChangeIndexesWorkflow,
)
from workflows.drain_shard import DrainShardInput, DrainShardResult, DrainShardWorkflow
from workflows.migrate_chunk import MigrateChunkInput, MigrateChunkResult, MigrateChunkWorkflow
from workflows.rebalance import RebalanceInput, RebalanceResult, RebalanceWorkflow

ALL_WORKFLOWS = [MigrateChunkWorkflow, DrainShardWorkflow, RebalanceWorkflow,
                 ChangeIndexesWorkflow]

__all__ = [
    "ALL_WORKFLOWS",
    "ChangeIndexesInput",
    "ChangeIndexesResult",
    "ChangeIndexesWorkflow",
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
