"""Telemetry of a shardshift process: metrics, traces and log lines (see docs/telemetry.md).

Metrics: one OpenTelemetry ``MeterProvider`` per process, installed as the global one by
``setup``, so the instruments created on the API meter at import (``router/metrics.py``,
``activities/metrics.py``) report to it from then on. Its Prometheus reader collects into a
private ``prometheus_client`` registry, rendered by ``exposition`` (the router's ``/metrics``
route) and served by ``serve_metrics`` (the worker's ``--metrics-port``). The worker drains the
Temporal SDK's own metrics (a ``MetricBuffer`` on its ``Runtime``) into the same provider, so
one port carries both. With an OTLP endpoint, metrics are also pushed there.

Traces: Temporal's ``TracingInterceptor`` on the client and the worker; spans are exported
over OTLP/HTTP when an endpoint is set (otherwise the global tracer is a no-op).

Logs: ``text`` (the usual one-line format) or ``json`` (one object per line carrying the
workflow, activity and migration ids known where the line was logged).
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from opentelemetry import metrics, trace
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.exposition import start_http_server
from temporalio import activity, workflow
from temporalio.contrib.opentelemetry import MetricsExporter, TracingInterceptor
from temporalio.runtime import (
    MetricBuffer,
    MetricBufferDurationFormat,
    Runtime,
    TelemetryConfig,
)
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
)

from settings import TelemetrySettings

SECONDS_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0, 300.0, 1800.0,
)
"""Histogram bounds for durations in seconds (a routed operation to a long phase)."""


@dataclass
class Telemetry:
    """The process's telemetry: what ``setup`` installed."""

    service: str
    settings: TelemetrySettings
    registry: CollectorRegistry
    meter_provider: MeterProvider
    tracer_provider: TracerProvider | None


_current: Telemetry | None = None
_setup_lock = threading.Lock()


def setup(service: str, settings: TelemetrySettings) -> Telemetry:
    """Install the process's meter (and, with an OTLP endpoint, tracer) provider.

    Idempotent: OpenTelemetry's global providers can be set once per process, so a second
    call returns the first call's telemetry (whatever its settings)."""
    global _current
    with _setup_lock:
        if _current is not None:
            return _current
        resource = Resource.create({"service.name": service})
        registry = CollectorRegistry(auto_describe=True)
        readers: list[MetricReader] = [
            PrometheusMetricReader(registry=registry, scope_info_enabled=False)]
        tracer_provider: TracerProvider | None = None
        if settings.otlp_endpoint:
            # Imported here: only a process that exports over OTLP needs the HTTP exporters.
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (  # noqa: PLC0415 - see above
                OTLPMetricExporter,
            )
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415 - see above
                OTLPSpanExporter,
            )

            base = settings.otlp_endpoint.rstrip("/")
            readers.append(PeriodicExportingMetricReader(
                OTLPMetricExporter(endpoint=f"{base}/v1/metrics"),
                export_interval_millis=settings.export_interval_s * 1000))
            tracer_provider = TracerProvider(resource=resource)
            tracer_provider.add_span_processor(
                BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{base}/v1/traces")))
            trace.set_tracer_provider(tracer_provider)
        provider = MeterProvider(
            resource=resource, metric_readers=readers,
            # The Temporal SDK's histograms arrive in seconds (MetricBuffer SECONDS): give
            # them bounds in seconds too, not the SDK default's millisecond-sized ones.
            views=[View(meter_name="temporalio", instrument_type=Histogram,
                        aggregation=ExplicitBucketHistogramAggregation(SECONDS_BUCKETS))],
        )
        metrics.set_meter_provider(provider)
        _current = Telemetry(service, settings, registry, provider, tracer_provider)
        return _current


def current() -> Telemetry | None:
    """The telemetry ``setup`` installed in this process, if any."""
    return _current


def exposition() -> tuple[bytes, str]:
    """This process's metrics in the Prometheus text format, and its content type (no
    series before ``setup``)."""
    tel = _current
    if tel is None:
        return b"", CONTENT_TYPE_LATEST
    return generate_latest(tel.registry), CONTENT_TYPE_LATEST


@dataclass
class MetricsServer:
    """``/metrics`` of this process's registry on its own port (a thread)."""

    host: str
    port: int
    _server: Any = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_metrics(tel: Telemetry, port: int, host: str = "127.0.0.1") -> MetricsServer:
    """Serve ``/metrics`` on ``host:port`` (port 0: a free one, see ``.port``)."""
    server, thread = start_http_server(port, addr=host, registry=tel.registry)
    return MetricsServer(host, int(server.server_address[1]), server, thread)


# -- the Temporal SDK's metrics and traces -----------------------------------------------------


def temporal_runtime(tel: Telemetry) -> tuple[Runtime, MetricsExporter]:
    """A Temporal ``Runtime`` whose SDK metrics (durations in seconds) drain into ``tel``'s
    meter provider: run the returned exporter (``async with``) while the runtime is in use."""
    buffer = MetricBuffer(100_000, duration_format=MetricBufferDurationFormat.SECONDS)
    runtime = Runtime(telemetry=TelemetryConfig(metrics=buffer))
    return runtime, MetricsExporter(buffer, tel.meter_provider)


def tracing_interceptor(tracer_provider: trace.TracerProvider | None = None) -> TracingInterceptor:
    """Temporal's OpenTelemetry interceptor (client and worker): a workflow started by a
    client that has it carries the client's trace context, and every activity span of the
    workflow joins that trace."""
    provider = tracer_provider or trace.get_tracer_provider()
    return TracingInterceptor(provider.get_tracer("shardshift"))


# -- live gauges --------------------------------------------------------------------------------


class LiveGauge:
    """A gauge whose series vanish when not set for ``ttl_s`` (an observable gauge).

    For values that belong to something running (a move's replication lag): the last value
    set per attribute set is reported until it is ``ttl_s`` old, so a finished move's series
    disappears instead of showing its last value forever."""

    def __init__(self, name: str, *, unit: str, description: str, ttl_s: float = 60.0) -> None:
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._values: dict[tuple[tuple[str, str], ...], tuple[float, float]] = {}
        metrics.get_meter("shardshift").create_observable_gauge(
            name, callbacks=[self._observe], unit=unit, description=description)

    def set(self, value: float, attributes: Mapping[str, str]) -> None:
        key = tuple(sorted(attributes.items()))
        with self._lock:
            self._values[key] = (float(value), time.monotonic())

    def clear(self, attributes: Mapping[str, str]) -> None:
        with self._lock:
            self._values.pop(tuple(sorted(attributes.items())), None)

    def _observe(self, _options: CallbackOptions) -> Iterable[Observation]:
        cutoff = time.monotonic() - self.ttl_s
        with self._lock:
            for key in [k for k, (_, t) in self._values.items() if t < cutoff]:
                del self._values[key]
            return [Observation(v, dict(k)) for k, (v, _) in self._values.items()]


# -- logs ---------------------------------------------------------------------------------------

migration_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "shardshift_migration_id", default=None)
"""The migration an activity works for (set by ``LogContextInterceptor``); threads started
with a copy of the activity's context see it too."""


def _migration_id_of(args: Sequence[Any]) -> str | None:
    for arg in args[:1]:
        spec = getattr(arg, "spec", None)
        for holder in (spec, arg):
            value = getattr(holder, "migration_id", None)
            if isinstance(value, str):
                return value
    return None


class LogContextInterceptor(Interceptor):
    """Worker interceptor: an activity whose input names a migration (``inp.spec`` or
    ``inp.migration_id``) runs with ``migration_id_var`` set, for its log lines."""

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _LogContextActivityInbound(next)


class _LogContextActivityInbound(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        token = migration_id_var.set(_migration_id_of(input.args))
        try:
            return await self.next.execute_activity(input)
        finally:
            migration_id_var.reset(token)


def log_context(record: logging.LogRecord) -> dict[str, Any]:
    """The workflow, activity and migration ids known for a log record: the Temporal
    loggers' ``extra`` first, else the activity or workflow the line was logged in."""
    out: dict[str, Any] = {}
    act = getattr(record, "temporal_activity", None)
    wf = getattr(record, "temporal_workflow", None)
    if act is None and activity.in_activity():
        a = activity.info()
        act = {"workflow_id": a.workflow_id, "workflow_run_id": a.workflow_run_id,
               "activity_type": a.activity_type, "activity_id": a.activity_id,
               "attempt": a.attempt}
    if wf is None and act is None and workflow.in_workflow():
        w = workflow.info()
        wf = {"workflow_id": w.workflow_id, "run_id": w.run_id, "workflow_type": w.workflow_type}
    if isinstance(act, Mapping):
        out.update(workflow_id=act.get("workflow_id"), run_id=act.get("workflow_run_id"),
                   activity=act.get("activity_type"), activity_id=act.get("activity_id"),
                   attempt=act.get("attempt"))
    elif isinstance(wf, Mapping):
        out.update(workflow_id=wf.get("workflow_id"), run_id=wf.get("run_id"),
                   workflow_type=wf.get("workflow_type"))
    migration = getattr(record, "migration_id", None) or migration_id_var.get()
    if migration:
        out["migration_id"] = migration
    return {k: v for k, v in out.items() if v is not None}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``msg``, the ids of
    ``log_context`` and ``exc`` (a traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(log_context(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def configure_logging(fmt: Literal["text", "json"] = "text", level: int = logging.INFO) -> None:
    """The root logger writes to stderr as ``text`` or ``json`` lines (replacing its
    handlers)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
