"""Temporal workflows: orchestration only (no I/O, no clocks, no randomness)."""

from workflows.migrate_chunk import MigrateChunkInput, MigrateChunkResult, MigrateChunkWorkflow

ALL_WORKFLOWS = [MigrateChunkWorkflow]

__all__ = ["ALL_WORKFLOWS", "MigrateChunkInput", "MigrateChunkResult", "MigrateChunkWorkflow"]
