"""``shardshift``: the operator's command line.

    shardshift infra up [--shards N] [--pg15 K] [--headless]
    shardshift infra status [--json]
    shardshift infra down [--destroy]
    shardshift router serve [--host H] [--port P]
    shardshift demo
"""

from __future__ import annotations

import argparse
import json
import sys

from infra import InfraError, Stack
from settings import Settings, get_settings


def _stack(settings: Settings, args: argparse.Namespace) -> Stack:
    infra = settings.infra
    updates: dict[str, object] = {}
    if getattr(args, "shards", None) is not None:
        updates["shards"] = args.shards
    if getattr(args, "pg15", None) is not None:
        updates["pg15_shards"] = args.pg15
    if getattr(args, "headless", False):
        updates["headless"] = True
    return Stack(settings.state_dir, infra.model_copy(update=updates))


def _print_status(stack: Stack, as_json: bool) -> bool:
    rows = stack.status()
    if as_json:
        print(json.dumps([r.model_dump() for r in rows], indent=2))
        return bool(rows) and all(r.healthy for r in rows)
    if not rows:
        print(f"no local stack in {stack.state_dir} (run: shardshift infra up)")
        return False
    print(f"{'SERVER':<10} {'ROLE':<9} {'ADDRESS':<17} {'VERSION':<28} {'HEALTH':<8} DETAIL")
    for r in rows:
        health = "healthy" if r.healthy else "DOWN"
        print(f"{r.name:<10} {r.role:<9} {r.address:<17} {r.version[:28]:<28} {health:<8} {r.detail[:70]}")
    return all(r.healthy for r in rows)


def cmd_infra(args: argparse.Namespace) -> int:
    settings = get_settings()
    stack = _stack(settings, args)
    if args.action == "up":
        stack.up()
        return 0 if _print_status(stack, False) else 1
    if args.action == "down":
        if args.destroy:
            stack.destroy()
            print(f"stack stopped and {stack.state_dir} removed")
        else:
            stack.down()
            print("stack stopped")
        return 0
    return 0 if _print_status(stack, args.json) else 1


def catalog_dsn(settings: Settings) -> str:
    """The catalog DSN: from settings, else the local stack's catalog instance."""
    return settings.catalog_dsn or Stack.from_settings(settings).catalog_dsn


def cmd_router(args: argparse.Namespace) -> int:
    from router.service import serve  # noqa: PLC0415

    settings = get_settings()
    print(f"router HTTP service on http://{args.host}:{args.port} (OpenAPI: /docs)")
    serve(catalog_dsn(settings), settings, host=args.host, port=args.port)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from workload.demo import run_demo  # noqa: PLC0415 - heavy imports only for this command

    return run_demo(get_settings())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardshift", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    infra = sub.add_parser("infra", help="the local stack: Temporal + PostgreSQL instances")
    infra_sub = infra.add_subparsers(dest="action", required=True)
    up = infra_sub.add_parser("up", help="create/start every server and wait until healthy")
    up.add_argument("--shards", type=int, help="number of PostgreSQL 18 shards (default 3)")
    up.add_argument("--pg15", type=int, metavar="K", help="add K PostgreSQL 15 shards")
    up.add_argument("--headless", action="store_true", help="no Temporal Web UI")
    down = infra_sub.add_parser("down", help="stop every server of the stack")
    down.add_argument("--destroy", action="store_true", help="also delete all data")
    status = infra_sub.add_parser("status", help="each server, version, port and health")
    status.add_argument("--json", action="store_true")
    infra.set_defaults(func=cmd_infra)

    router = sub.add_parser("router", help="the router's HTTP service")
    router_sub = router.add_subparsers(dest="action", required=True)
    serve = router_sub.add_parser("serve", help="serve the HTTP/JSON API (bearer-token auth)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    router.set_defaults(func=cmd_router)

    demo = sub.add_parser("demo", help="the main job: a live chunk migration under load")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except InfraError as exc:
        print(f"shardshift: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
