"""A Temporal client from settings: what the worker, the CLI and the router connect with.

It lives below the worker so a command that only talks to Temporal does not import the
workflows and activities the worker hosts (a shorter ``shardshift`` start).
"""

from __future__ import annotations

import ctypes

from temporalio.client import Client, TLSConfig
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.runtime import Runtime

from infra import telemetry
from settings import TelemetrySettings, TemporalSettings


async def connect(
    temporal: TemporalSettings,
    *,
    runtime: Runtime | None = None,
    telemetry_settings: TelemetrySettings | None = None,
) -> Client:
    """A Temporal client from settings (TLS and API key for a hosted cluster).

    It carries Temporal's tracing interceptor (so do the workers built on it): a workflow it
    starts joins the caller's trace. With ``telemetry_settings`` naming an OTLP endpoint the
    process's tracer is installed first, so the spans are exported."""
    if telemetry_settings is not None and telemetry_settings.otlp_endpoint:
        telemetry.setup("shardshift-client", telemetry_settings)
    tls: TLSConfig | bool = False
    if temporal.tls:
        tls = TLSConfig(
            client_cert=temporal.tls_client_cert.read_bytes() if temporal.tls_client_cert else None,
            client_private_key=temporal.tls_client_key.read_bytes() if temporal.tls_client_key else None,
        )
    return await Client.connect(
        temporal.address, namespace=temporal.namespace, tls=tls,
        api_key=temporal.api_key.get_secret_value() if temporal.api_key else None,
        data_converter=pydantic_data_converter,
        interceptors=[telemetry.tracing_interceptor()],
        runtime=outlive_interpreter(runtime or Runtime.default()),
    )


_KEPT: set[int] = set()


def outlive_interpreter(runtime: Runtime) -> Runtime:
    """``runtime``, kept alive until the process ends: never torn down at interpreter exit.

    Tearing the SDK's runtime down waits for its threads. A thread that completes a call still
    in flight as the process leaves (a query no worker answers when Ctrl-C detaches ``watch``,
    a cancelled long poll) waits for the GIL, and once the interpreter is finalizing it never
    gets it: the exit hung for good (the SDK's futures resolve through pyo3-async-runtimes, see
    temporalio/sdk-python#300). With one reference nobody releases, the runtime is never
    dropped and the process's exit ends its threads. The price: a runtime passed here is never
    freed, so a process makes its runtimes once (the default one, a worker's own), not per
    connection."""
    if id(runtime) not in _KEPT:
        _KEPT.add(id(runtime))
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(runtime))
    return runtime
