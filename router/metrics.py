"""OpenTelemetry instruments of the router (no-ops until ``infra.telemetry.setup`` installs a
MeterProvider). Names and units: docs/telemetry.md."""

from __future__ import annotations

from opentelemetry import metrics

from infra.telemetry import SECONDS_BUCKETS

_meter = metrics.get_meter("shardshift.router")

op_duration = _meter.create_histogram(
    "shardshift.router.operation.duration",
    unit="s",
    description="Latency of routed operations, including retries across a cutover",
    explicit_bucket_boundaries_advisory=list(SECONDS_BUCKETS),
)
retries = _meter.create_counter(
    "shardshift.router.retries",
    description="Retries of routed operations: after a fence rejection (stale token or frozen "
                "chunk) or while a shard is unreachable",
)
rejections = _meter.create_counter(
    "shardshift.router.rejections",
    description="Fence rejections seen by the router",
)
map_refreshes = _meter.create_counter(
    "shardshift.router.map_refreshes",
    description="Chunk-map reloads from the catalog (notification or rejection)",
)
map_rows_read = _meter.create_counter(
    "shardshift.router.map_rows_read",
    description="Chunk rows read from the catalog by map refreshes, by kind: full (the whole "
                "map) or delta (the chunks changed since the map's version)",
)
