"""``shardshift router serve``: the router's HTTP service and MongoDB front end."""

from __future__ import annotations

import argparse

from cli.common import CliError, catalog_dsn
from infra.temporal_client import connect
from router.mongo.index_ddl import TemporalIndexDdl
from router.service import ServeConfigError, check_serve_config, serve
from settings import get_settings


def cmd_router(args: argparse.Namespace) -> int:
    settings = get_settings()
    try:
        check_serve_config(settings, args.host, args.tls_cert, args.tls_key,
                           mongo=args.mongo_port is not None)
    except ServeConfigError as exc:
        raise CliError(str(exc)) from None
    serve(catalog_dsn(settings), settings, host=args.host, port=args.port,
          tls_cert=args.tls_cert, tls_key=args.tls_key,
          metrics_port=args.metrics_port, log_format=args.log_format,
          mongo_port=args.mongo_port,
          # Index changes start a workflow: only a router told so holds Temporal credentials.
          index_ddl=TemporalIndexDdl(lambda: connect(settings.temporal),
                                     settings.temporal.task_queue)
          if args.mongo_index_ddl else None)
    return 0
