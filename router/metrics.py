"""OpenTelemetry instruments of the router (no-ops until ``infra.telemetry.setup`` installs a
MeterProvider). Names and units: docs/telemetry.md."""

from __future__ import annotations

from collections.abc import Iterable

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

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

# -- the HTTP service's own (recorded by ``router.http.RequestGuard``, once per request) -------
# The names, units, descriptions and bucket bounds FastAPI's native telemetry used (OpenTelemetry's
# HTTP server conventions), so ``/metrics`` shows the same series; FastAPI's recording is off.

HTTP_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                         7.5, 10.0)
http_duration = _meter.create_histogram(
    "http.server.request.duration",
    unit="s",
    description="Duration of HTTP server requests.",
    explicit_bucket_boundaries_advisory=list(HTTP_DURATION_BUCKETS),
)

http_active: dict[tuple[str, str], int] = {}
"""Requests being served, per (``http.request.method``, ``url.scheme``): counted in and out by
the guard (two dict updates), read only when ``/metrics`` is collected."""


def _observe_active(_options: CallbackOptions) -> Iterable[Observation]:
    return [Observation(n, {"http.request.method": method, "url.scheme": scheme})
            for (method, scheme), n in list(http_active.items())]


_meter.create_observable_up_down_counter(
    "http.server.active_requests",
    callbacks=[_observe_active],
    unit="{request}",
    description="Number of active HTTP server requests.",
)
