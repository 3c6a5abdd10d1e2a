"""OpenTelemetry instruments of the router (no-ops until a MeterProvider is installed)."""

from __future__ import annotations

from opentelemetry import metrics

_meter = metrics.get_meter("shardshift.router")

op_duration = _meter.create_histogram(
    "shardshift.router.operation.duration",
    unit="ms",
    description="Latency of routed operations, including retries across a cutover",
)
retries = _meter.create_counter(
    "shardshift.router.retries",
    description="Operations retried after a fence rejection (stale token or frozen chunk)",
)
rejections = _meter.create_counter(
    "shardshift.router.rejections",
    description="Fence rejections seen by the router",
)
map_refreshes = _meter.create_counter(
    "shardshift.router.map_refreshes",
    description="Chunk-map reloads from the catalog (notification or rejection)",
)
