"""``shardshift infra up|down|status``: the local stack."""

from __future__ import annotations

import argparse
import asyncio

from catalog.local_stack import follow_standbys, up_and_provision
from cli.render import print_status
from infra import Stack
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
    standby = getattr(args, "standby", None)
    if standby is not None:
        updates["standbys"] = tuple(standby) or ("*",)
    return Stack(settings.state_dir, infra.model_copy(update=updates))


def _print_status(stack: Stack, as_json: bool) -> bool:
    return print_status(stack.status(), stack.state_dir, as_json)


def cmd_infra(args: argparse.Namespace) -> int:
    settings = get_settings()
    stack = _stack(settings, args)
    if args.action == "up":
        up_and_provision(stack)
        if getattr(args, "standby", None) is not None:
            for name in asyncio.run(follow_standbys(stack, settings.db)):
                print(f"{name}: the catalog's address now names its standby too")
        return 0 if _print_status(stack, False) else 1
    if args.action == "promote":
        server = stack.promote(args.name)
        print(f"{args.name}: standby promoted; the primary listens on port "
              f"{stack.instance(server).port}; the old primary stays down (stale) until "
              f"`shardshift infra up --standby {args.name}` clones it again as the standby")
        return 0
    if args.action == "down":
        if args.destroy:
            stack.destroy()
            print(f"stack stopped and {stack.state_dir} removed")
        else:
            stack.down()
            print("stack stopped")
        return 0
    return 0 if _print_status(stack, args.json) else 1
