"""``shardshift``: the operator's command line.

    shardshift infra up [--shards N] [--pg15 K] [--headless] [--standby [NAME ...]]
    shardshift infra promote NAME
    shardshift infra status [--json]
    shardshift infra down [--destroy]
    shardshift router serve [--host H] [--port P] [--mongo-port P] [--tls-cert PEM --tls-key PEM]
                            [--metrics-port N] [--log-format text|json]
    shardshift worker [--metrics-port N] [--log-format text|json]
    shardshift collection create NAME --shard-key F [--index name:field[,field]...]
                                      [--chunks-per-shard N] [--shards S1,S2]
    shardshift migrate --collection C --chunk K --to SHARD [--dry-run]
                       [--rollback-window S] [--give-up S] [--no-wait] [--id WORKFLOW_ID]
    shardshift moves [--collection C] [--phase P] [--catalog]
    shardshift rollback --id WORKFLOW_ID
    shardshift drain SHARD... [--to SHARD...] [--upgrade] [--parallel N] [--no-wait]
    shardshift merge [--among SHARD...] [--parallel N] [--dry-run] [--no-wait]
    shardshift rebalance [--tolerance F] [--max-moves N] [--dry-run] [--schedule EVERY]
                         [--unschedule]
    shardshift split-shard SHARD --to SHARD [--dry-run]
    shardshift doctor [--repair] [--json] [--collection C]
    shardshift report ID [--json] [--plot FILE.png]
    shardshift verify --collection C [--chunk K] [--buckets N] [--json]
    shardshift verify --show MIGRATION_ID|REPORT_ID [--json]
    shardshift catalog check [--collection C] [--layout-only] [--json]
    shardshift status [--collection C] [--json]
    shardshift shard add NAME --dsn DSN [--capacity SIZE] [--superuser-dsn DSN]
                         [--passfile PATH] [--update] [--json]
    shardshift shard list [--json]
    shardshift shard remove NAME [--json]
    shardshift watch ID [--json]
    shardshift cancel ID [--wait] [--json]
    shardshift complete ID [--wait] [--json]
    shardshift setup temporal [--namespace N] [--json]
    shardshift demo
"""

from __future__ import annotations

import argparse
import atexit
import gc
import importlib
import os
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

from cli.common import CliError
from infra import InfraError


class _Parser(argparse.ArgumentParser):
    """Usage errors are one line on stderr (and exit code 2), like every other bad input."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _chunk_id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid chunk id {text!r}: expected a positive "
                                         "integer") from None
    if not 0 < value < 2**63:
        raise argparse.ArgumentTypeError(f"invalid chunk id {value}: expected a positive "
                                         "64-bit integer")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: expected a positive integer")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 0") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value}: expected an integer >= 0")
    return value


_BYTES = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}


def _rate(text: str) -> tuple[str, float]:
    """``--max-copy-rate``: ``20000`` or ``20000rows`` (rows/s), ``50MB`` (bytes/s)."""
    t = text.strip().upper()
    unit = next((u for u in ("KB", "MB", "GB", "B", "ROWS") if t.endswith(u)), "ROWS")
    number = t[: len(t) - len(unit)] if t.endswith(unit) else t
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(
            f"{text!r}: use rows per second (20000, 20000rows) or bytes per second (50MB)")
    return ("rows", value) if unit == "ROWS" else ("bytes", value * _BYTES[unit])


def _throttle_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-copy-rate", type=_rate, metavar="RATE",
                        help="limit the bulk copy's reads of the source: rows/s (20000) or "
                             "bytes/s (50MB)")
    parser.add_argument("--throttle-active", type=_count, metavar="N",
                        help="pause the bulk copy, and the change apply (while it is less "
                             "than 256 MiB behind, and never in the cutover), while the source "
                             "has more than N active client sessions")
def _capacity(text: str) -> int:
    from cli.shards import parse_capacity  # noqa: PLC0415 - command modules load on use

    return parse_capacity(text)


def _every(text: str) -> timedelta:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        value, unit = float(text[:-1]), text[-1]
        seconds = value * units[unit]
    except (ValueError, KeyError, IndexError):
        raise argparse.ArgumentTypeError(f"{text!r}: use a number and s, m, h or d (e.g. 1h)") from None
    if seconds < 60:
        raise argparse.ArgumentTypeError("schedule rebalancing at most once a minute")
    return timedelta(seconds=seconds)


def _doctor_parser(sub: Any) -> None:
    doctor = sub.add_parser(
        "doctor", help="find what failed moves left behind (slots, fences, records, leases, "
                       "staging); --repair fixes what is safe",
        description="Lists replication slots, publications and origins, fences, partial "
                    "copies, import rows, staging directories, leases and migration records "
                    "that no running move owns, with what --repair would do. Exit code 0 "
                    "when nothing is left (or everything was repaired), 1 otherwise.")
    doctor.add_argument("--repair", action="store_true",
                        help="fix what is safe to fix; explain the rest")
    doctor.add_argument("--json", action="store_true",
                        help='{"findings": [{kind, shard, object, detail, action, repaired}], '
                             '"clean": bool}')
    doctor.add_argument("--collection", action="append", metavar="C",
                        help="only this collection (repeatable; objects tied to no collection "
                             "are then skipped)")
    doctor.set_defaults(func="cli.doctor:cmd_doctor")


def _window(text: str) -> tuple[int, int]:
    from cli.schedule import parse_window  # noqa: PLC0415 - no Temporal SDK for --help

    try:
        return parse_window(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _verify_parsers(sub: Any) -> None:
    verify = sub.add_parser(
        "verify", help="check chunks' data now: a move in flight source vs target at one "
                       "LSN, a settled chunk's owner and orphans elsewhere",
        description="Compares a moving chunk's source and target at one LSN (read-only), or "
                    "checksums a settled chunk on its owner and counts its range's rows on "
                    "every other shard (orphans). Each chunk's report is recorded in the "
                    "catalog. Exit code 0 when every chunk is consistent, 1 otherwise.")
    verify.add_argument("--collection", metavar="C")
    verify.add_argument("--chunk", type=_chunk_id, metavar="K", help="only this chunk")
    verify.add_argument("--buckets", type=_positive, default=16, metavar="N",
                        help="checksum buckets per chunk (16)")
    verify.add_argument("--show", metavar="ID",
                        help="print the reports recorded for a migration id (its verify "
                             "phase and on-demand checks) or one report by number")
    verify.add_argument("--limit", type=_positive, default=20, help="with --show (20)")
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(func="cli.verify:cmd_verify")

    cat = sub.add_parser("catalog", help="the catalog's invariants")
    cat_sub = cat.add_subparsers(dest="action", required=True)
    check = cat_sub.add_parser(
        "check", help="chunk layout (no gap, no overlap, placed on live shards) and every "
                      "chunk's fence on its shard; exit 0 when consistent, 1 otherwise")
    check.add_argument("--collection", metavar="C")
    check.add_argument("--layout-only", action="store_true",
                       help="the catalog alone (no shard is contacted)")
    check.add_argument("--json", action="store_true")
    cat.set_defaults(func="cli.verify:cmd_catalog")


def _workflow_args(parser: argparse.ArgumentParser, default_id: str) -> None:
    """``--id`` and ``--task-queue``, shared by every command that starts a workflow."""
    parser.add_argument("--id", metavar="WORKFLOW_ID", help=f"workflow id (default: {default_id})")
    parser.add_argument("--task-queue", help="default: settings' temporal.task_queue")


def _telemetry_args(parser: argparse.ArgumentParser, metrics_help: str) -> None:
    parser.add_argument("--metrics-port", type=int, metavar="N",
                        help=metrics_help + " (default: SHARDSHIFT_TELEMETRY__METRICS_PORT)")
    parser.add_argument("--log-format", choices=["text", "json"],
                        help="log lines as text or JSON objects (default: "
                             "SHARDSHIFT_TELEMETRY__LOG_FORMAT, else text)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="shardshift", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    infra = sub.add_parser("infra", help="the local stack: Temporal + PostgreSQL instances")
    infra_sub = infra.add_subparsers(dest="action", required=True)
    up = infra_sub.add_parser("up", help="create/start every server and wait until healthy")
    up.add_argument("--shards", type=int, help="number of PostgreSQL 18 shards (default 3)")
    up.add_argument("--pg15", type=int, metavar="K", help="add K PostgreSQL 15 shards")
    up.add_argument("--headless", action="store_true", help="no Temporal Web UI")
    up.add_argument("--standby", nargs="*", metavar="NAME",
                    help="give servers a streaming standby (no NAME: every server; "
                         "catalog, shard-1, ...); a stale old primary named is cloned again")
    promote = infra_sub.add_parser(
        "promote", help="fail a server over to its standby (the old primary stays down)")
    promote.add_argument("name", metavar="NAME", help="catalog, shard-1, ...")
    down = infra_sub.add_parser("down", help="stop every server of the stack")
    down.add_argument("--destroy", action="store_true", help="also delete all data")
    status = infra_sub.add_parser("status", help="each server, version, port and health")
    status.add_argument("--json", action="store_true")
    infra.set_defaults(func="cli.infra:cmd_infra")

    router = sub.add_parser("router", help="the router's HTTP service")
    router_sub = router.add_subparsers(dest="action", required=True)
    serve = router_sub.add_parser("serve", help="serve the HTTP/JSON API (bearer-token auth)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--mongo-port", type=int, default=None,
                       help="also serve the MongoDB wire protocol on this port (e.g. 27017): "
                            "pymongo, mongosh and other drivers connect unchanged")
    serve.add_argument("--mongo-index-ddl", action="store_true",
                       help="let MongoDB clients create and drop indexes (createIndexes, "
                            "dropIndexes): the router then starts index workflows through "
                            "Temporal, so its host needs Temporal credentials")
    serve.add_argument("--tls-cert", type=Path, help="PEM certificate (chain): serve HTTPS")
    serve.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    _telemetry_args(serve, "also serve /metrics without a token on this port (it is always "
                           "on the API port, with the token)")
    router.set_defaults(func="cli.router:cmd_router")

    worker = sub.add_parser("worker", help="run a Temporal worker (workflows + activities)")
    _telemetry_args(worker, "serve /metrics (move and Temporal SDK metrics) on this port")
    worker.set_defaults(func="cli.worker:cmd_worker")

    coll = sub.add_parser("collection", help="collections in the catalog")
    coll_sub = coll.add_subparsers(dest="action", required=True)
    create = coll_sub.add_parser(
        "create", help="create a collection: catalog entry, tables, indexes, fences",
        description="Registers the local stack's shards in the catalog if missing, then "
                    "provisions the collection over them.")
    create.add_argument("name")
    create.add_argument("--shard-key", required=True, metavar="FIELD")
    create.add_argument("--index", action="append", metavar="NAME:FIELD[,FIELD]",
                        help="a secondary index (repeatable)")
    create.add_argument("--chunks-per-shard", type=int, default=1, metavar="N")
    create.add_argument("--shards", metavar="S1,S2",
                        help="shards to place chunks on (default: every active shard)")
    coll.set_defaults(func="cli.collection:cmd_collection")

    migrate = sub.add_parser("migrate", help="move one chunk to another shard (a workflow)")
    migrate.add_argument("--collection", required=True)
    migrate.add_argument("--chunk", required=True, type=_chunk_id, metavar="K")
    migrate.add_argument("--to", required=True, metavar="SHARD")
    migrate.add_argument("--dry-run", action="store_true", help="print the plan, move nothing")
    migrate.add_argument("--rollback-window", type=float, default=0.0, metavar="S",
                         help="seconds after the cutover during which `rollback` is accepted")
    migrate.add_argument("--give-up", type=float, default=1800.0, metavar="S",
                         help="how long an unreachable target is waited for before the move "
                              "aborts with TargetLost (default 1800)")
    migrate.add_argument("--no-wait", action="store_true", help="start it and return")
    _throttle_args(migrate)
    _workflow_args(migrate, "move-COLLECTION-CHUNK")
    migrate.set_defaults(func="cli.moves:cmd_migrate")

    moves = sub.add_parser("moves", help="list chunk migrations (Temporal visibility)")
    moves.add_argument("--collection")
    moves.add_argument("--phase", help="only moves in this phase (e.g. replicate)")
    moves.add_argument("--catalog", action="store_true",
                       help="read the catalog's migration records instead")
    moves.add_argument("--limit", type=int, default=50)
    moves.set_defaults(func="cli.moves:cmd_moves")

    rollback = sub.add_parser("rollback", help="move a chunk back during its rollback window")
    rollback.add_argument("--id", required=True, metavar="WORKFLOW_ID")
    rollback.set_defaults(func="cli.moves:cmd_rollback")

    drain = sub.add_parser(
        "drain", help="empty shards chunk by chunk and retire them (merge, or --upgrade)")
    drain.add_argument("shards", nargs="+", metavar="SHARD", help="the shards to empty")
    drain.add_argument("--to", nargs="+", metavar="SHARD",
                       help="where the chunks may go (default: every other active shard; "
                            "with --upgrade, those of a newer major version)")
    drain.add_argument("--upgrade", action="store_true",
                       help="a major-version upgrade: only newer-version shards receive")
    drain.add_argument("--parallel", type=int, default=2, metavar="N",
                       help="chunk moves at once (default 2)")
    drain.add_argument("--no-wait", action="store_true", help="start it and return")
    drain.add_argument("--dry-run", action="store_true",
                       help="print the plan (outcome dry_run); no shard changes state")
    _throttle_args(drain)
    _workflow_args(drain, "drain-SHARDS or upgrade-SHARDS")
    drain.set_defaults(func="cli.fleet:cmd_drain")

    merge = sub.add_parser(
        "merge", help="drain the least utilized shards onto the others: as few shards as hold "
                      "the data within their declared capacities (bin packing)")
    merge.add_argument("--among", nargs="+", metavar="SHARD",
                       help="only these active shards (default: every active shard; all must "
                            "run one engine version and declare a capacity)")
    merge.add_argument("--parallel", type=int, default=2, metavar="N",
                       help="chunk moves at once (default 2)")
    merge.add_argument("--no-wait", action="store_true", help="start it and return")
    merge.add_argument("--dry-run", action="store_true",
                       help="say which shards it would drain; start nothing")
    _throttle_args(merge)
    _workflow_args(merge, "merge-SHARDS")
    merge.set_defaults(func="cli.fleet:cmd_merge")

    reb = sub.add_parser("rebalance", help="even out the data across active shards (now, "
                                           "or on a Temporal Schedule)")
    reb.add_argument("--tolerance", type=float, default=0.2,
                     help="spread allowed between shards, as a fraction of the mean (0.2)")
    reb.add_argument("--max-moves", type=int, default=4, help="moves per run at most (4)")
    reb.add_argument("--parallel", type=int, default=2, metavar="N", help="moves at once (2)")
    reb.add_argument("--no-split", action="store_true",
                     help="never split a chunk too large to move usefully")
    reb.add_argument("--collection", nargs="+", help="only these collections")
    reb.add_argument("--shard", nargs="+", help="only across these active shards")
    reb.add_argument("--dry-run", action="store_true", help="print the plan, move nothing")
    reb.add_argument("--schedule", type=_every, metavar="EVERY",
                     help="create (or update) a Temporal Schedule running it every EVERY "
                          "(e.g. 1h, 30m) instead of running it now")
    reb.add_argument("--window", type=_window, metavar="HH:MM-HH:MM",
                     help="with --schedule: run only inside this daily window (e.g. "
                          "01:00-05:00; 22:00-02:00 wraps past midnight)")
    reb.add_argument("--time-zone", metavar="TZ",
                     help="the window's time zone (IANA name; default UTC)")
    reb.add_argument("--max-moves-per-shard", type=_positive, metavar="N",
                     help="moves per shard per round (default: SHARDSHIFT_FLEET__"
                          "MAX_MOVES_PER_SHARD, 2)")
    _throttle_args(reb)
    control = reb.add_mutually_exclusive_group()
    control.add_argument("--unschedule", action="store_true", help="delete the schedule")
    control.add_argument("--pause", action="store_true",
                         help="pause the schedule (no new runs; a running one continues)")
    control.add_argument("--resume", action="store_true", help="resume a paused schedule")
    control.add_argument("--schedule-info", action="store_true",
                         help="the schedule: paused or not, spec, next and last runs")
    reb.add_argument("--note", help="with --pause/--resume: why (shown by --schedule-info)")
    reb.add_argument("--json", action="store_true", help="with --schedule-info: JSON")
    reb.add_argument("--schedule-id", default="shardshift-rebalance")
    _workflow_args(reb, "rebalance")
    reb.set_defaults(func="cli.fleet:cmd_rebalance")

    split = sub.add_parser("split-shard", help="move half of a hot shard's data to a new "
                                               "shard (splitting chunks where needed)")
    split.add_argument("split_shard", metavar="SHARD", help="the hot shard")
    split.add_argument("--to", required=True, metavar="SHARD", help="the new or emptier shard")
    split.add_argument("--tolerance", type=float, default=0.1)
    split.add_argument("--max-moves", type=int, default=64)
    split.add_argument("--parallel", type=int, default=2, metavar="N")
    split.add_argument("--collection", nargs="+", help="only these collections")
    split.add_argument("--dry-run", action="store_true", help="print the plan, move nothing")
    _workflow_args(split, "split-SHARD")
    split.set_defaults(func="cli.fleet:cmd_rebalance")

    _doctor_parser(sub)
    _verify_parsers(sub)

    report = sub.add_parser(
        "report", help="what a move, drain or rebalance did: summary, timeline, plot",
        description="For a move (workflow id or migration id): phases with durations, rows "
                    "copied, replication lag peak, cutover pause and outcome, from the catalog's "
                    "record and the timeline its activities recorded. For a drain or rebalance "
                    "(workflow id): bytes per shard before and after, and its moves.")
    report.add_argument("id", metavar="ID", help="a workflow id or a migration id")
    report.add_argument("--json", action="store_true",
                        help="the whole report (with every sample and mark) as JSON")
    report.add_argument("--plot", type=Path, metavar="FILE.png",
                        help="draw the move's timeline (rows/s, lag, marks, the pause), or a "
                             "drain's or rebalance's bytes per shard, into this PNG file")
    report.set_defaults(func="cli.report:cmd_report")
    _console_parsers(sub)

    demo = sub.add_parser("demo", help="the main job: a live chunk migration under load")
    demo.add_argument("--via", choices=("mongo", "router"), default="mongo",
                      help="what the load goes through: a MongoDB driver (pymongo) through the "
                           "router's MongoDB front end (default), or the router core in-process "
                           "(the HTTP API's path)")
    demo.set_defaults(func="cli.demo:cmd_demo")
    return parser


def _console_parsers(sub: Any) -> None:
    """``status``, ``shard``, ``watch``, ``cancel``, ``complete`` and ``setup``."""
    status = sub.add_parser(
        "status", help="the fleet: shards (chunks, live bytes, load), moves in flight, "
                       "schedules, workers",
        description="Every shard (state, engine and version, chunks, documents, live bytes, "
                    "load against its capacity, moves in and out), the moves in flight with "
                    "their phase and lag, running drains and rebalances, the rebalance "
                    "schedules with their next run, and the workers on the task queue.")
    status.add_argument("--collection", metavar="C", help="count only this collection")
    status.add_argument("--json", action="store_true",
                        help='{"shards": [...], "moves": [...], "operations": [...], '
                             '"schedules": [...], "workers": {...}, "errors": [...]}')
    status.set_defaults(func="cli.status:cmd_status")

    shard = sub.add_parser("shard", help="register, list and retire shards (production "
                                         "servers, without the local stack)")
    shard_sub = shard.add_subparsers(dest="action", required=True)
    add = shard_sub.add_parser(
        "add", help="provision a server's roles and register it as a shard",
        description="With --superuser-dsn, creates (or updates) the router and mover roles, "
                    "schemas and grants on the server, passwords in the passfile (the "
                    "superuser DSN is used for that only and never stored). Then checks that "
                    "the server answers as the mover and the router, and registers --dsn "
                    "(without role or password) with the server's major version.")
    add.add_argument("name", metavar="NAME", help="the shard id (a letter, then letters, "
                                                   "digits, '_', '.', '-')")
    add.add_argument("--dsn", required=True,
                     help="where the shard is: host=... port=... dbname=... (no password; "
                          "a user= is dropped: each component connects as its own role)")
    add.add_argument("--capacity", type=_capacity, metavar="SIZE",
                     help="storage the planners may fill, e.g. 500GiB or 2TB")
    add.add_argument("--superuser-dsn", metavar="DSN",
                     help="provision the roles first, as this superuser (not stored)")
    add.add_argument("--passfile", type=Path, metavar="PATH",
                     help="the libpq passfile holding (or receiving) the roles' passwords "
                          "(default: SHARDSHIFT_DB__PASSFILE, the DSN's passfile=, "
                          "PGPASSFILE, ~/.pgpass)")
    add.add_argument("--update", action="store_true",
                     help="allow a registered shard's address to change")
    add.add_argument("--json", action="store_true")
    lst = shard_sub.add_parser("list", help="registered shards, their state and chunks")
    lst.add_argument("--json", action="store_true")
    remove = shard_sub.add_parser(
        "remove", help="retire a shard that holds no chunk and takes part in no move",
        description="Refused while the shard holds chunks or takes part in a move (drain it "
                    "first). The id stays in the catalog (retired) for the history of its "
                    "migrations and is never reused; the server is left alone.")
    remove.add_argument("name", metavar="NAME")
    remove.add_argument("--json", action="store_true")
    shard.set_defaults(func="cli.shards:cmd_shard")

    watch = sub.add_parser("watch", help="re-attach to a move, drain or rebalance by workflow "
                                         "id: progress until it ends, then the result")
    watch.add_argument("id", metavar="ID", help="the workflow id (e.g. move-payments-3)")
    watch.add_argument("--json", action="store_true",
                       help="no progress lines; the result (or failure) as one object")
    watch.set_defaults(func="cli.control:cmd_watch")

    cancel = sub.add_parser("cancel", help="stop a move, drain or rebalance (says what that "
                                           "means in its current phase)")
    cancel.add_argument("id", metavar="ID")
    cancel.add_argument("--wait", action="store_true", help="then watch it to its end")
    cancel.add_argument("--json", action="store_true")
    cancel.set_defaults(func="cli.control:cmd_cancel")

    complete = sub.add_parser("complete", help="close a move's open rollback window now "
                                               "(keep the move, start its cleanup)")
    complete.add_argument("id", metavar="ID")
    complete.add_argument("--wait", action="store_true", help="then watch it to its end")
    complete.add_argument("--json", action="store_true")
    complete.set_defaults(func="cli.control:cmd_complete")

    setup = sub.add_parser("setup", help="prepare external services for shardshift")
    setup_sub = setup.add_subparsers(dest="action", required=True)
    temporal = setup_sub.add_parser(
        "temporal", help="register shardshift's search attributes on a Temporal namespace "
                         "(idempotent)")
    temporal.add_argument("--namespace", metavar="N",
                          help="default: SHARDSHIFT_TEMPORAL__NAMESPACE (default)")
    temporal.add_argument("--json", action="store_true")
    setup.set_defaults(func="cli.setup:cmd_setup")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (InfraError, CliError) as exc:
        print(f"shardshift: {exc}".replace("\n", " "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if not _operator_error(exc):
            raise
        print(f"shardshift: {type(exc).__name__}: {exc}".replace("\n", " "), file=sys.stderr)
        return 2


def run() -> None:
    """``shardshift``: :func:`main`, then leave without the interpreter's teardown.

    A Temporal call still in flight (Ctrl-C on ``watch``) is completed by an SDK thread that
    needs the GIL; during finalization that thread hangs the exit (the runtime's teardown waits
    for it) or, once the interpreter is gone, crashes it (SIGSEGV). So the exit handlers run,
    what is written is flushed, and the process ends with ``os._exit``."""
    code = main()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run(args: argparse.Namespace) -> int:
    try:
        return int(_command(args.func)(args))
    finally:
        # Free Temporal clients caught in exception reference cycles now: the SDK's native
        # runtime must not be torn down during interpreter finalization (it aborts).
        gc.collect()


def _command(ref: str) -> Callable[[argparse.Namespace], int]:
    """``"cli.module:function"``: the command's module is imported only when it runs."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def _operator_error(exc: BaseException) -> bool:
    """Errors of the catalog, a database or Temporal: one line for the operator, not a trace."""
    kinds: list[type] = []
    for module, name in (("catalog.errors", "CatalogError"), ("psycopg", "Error"),
                         ("temporalio.service", "RPCError"),
                         ("shards.errors", "InvalidNameError")):
        mod = sys.modules.get(module)
        if mod is not None:
            kinds.append(getattr(mod, name))
    return isinstance(exc, tuple(kinds))

