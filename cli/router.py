"""``shardshift router serve``: the router's HTTP service."""

from __future__ import annotations

import argparse

from cli.common import catalog_dsn
from router.service import serve
from settings import get_settings


def cmd_router(args: argparse.Namespace) -> int:
    settings = get_settings()
    print(f"router HTTP service on http://{args.host}:{args.port} (OpenAPI: /docs)")
    serve(catalog_dsn(settings), settings, host=args.host, port=args.port)
    return 0
