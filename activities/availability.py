"""Which shard is down: turning a lost connection into a typed ``ShardUnavailable`` error.

A move must tell a shard that is *unreachable* (the target stopped, a host gone) from
everything else, because the workflow handles the two differently: any other error is
retried by the activity's retry policy, while an unreachable shard pauses the move at its
checkpoint until the shard answers again (or, for the target, until the move's give-up time).

The rule, used by every data activity of the copy and replicate phases:

- an activity body runs inside :func:`shard_errors` naming the shards it touches;
- when it fails with a connection-level error (``shards.postgres.server.is_connection_error``:
  the driver's operational errors, which include a pool's timeout, or an ``OSError``), each
  named shard is probed with one fresh connection (``server.probe``, a few seconds' timeout). The first one that does not answer is blamed:
  ``ApplicationError(type="ShardUnavailable", details=[shard_id])``;
- when every shard answers, the original error propagates unchanged: a blip (a restarted
  server, a terminated walsender) stays on the ordinary retry path and costs no pause.

Probing blames only what is down *now*, so a shard that came back meanwhile is never blamed,
and a catalog that cannot be read (to find an address) blames nobody. Addresses come from
the worker's open engines first (no catalog round trip), else from the catalog.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from temporalio.exceptions import ApplicationError

from activities.context import MoveContext
from shards.postgres.server import is_connection_error, probe

SHARD_UNAVAILABLE = "ShardUnavailable"
"""``ApplicationError.type`` of an unreachable shard; ``details[0]`` is its shard id."""

async def shard_dsn(ctx: MoveContext, shard_id: str) -> str:
    """The shard's address without opening a pool (opening one to a dead server blocks for
    the pool's timeout, longer than an activity's heartbeat timeout)."""
    engine = ctx._engines.get(shard_id)  # a read-only peek at the open engines
    if engine is not None:
        return engine.dsn
    return ctx.address((await ctx.catalog.shard(shard_id)).address)


async def unreachable(ctx: MoveContext, shards: tuple[str, ...]) -> tuple[str, str] | None:
    """(shard id, error) of the first named shard that does not answer, or None."""
    for shard in shards:
        try:
            dsn = await shard_dsn(ctx, shard)
        except Exception:  # noqa: BLE001 - no address (catalog down): blame nobody
            return None
        error = await asyncio.to_thread(probe, dsn)
        if error is not None:
            return shard, error
    return None


def shard_unavailable(shard: str, error: str) -> ApplicationError:
    return ApplicationError(f"shard {shard} is unreachable: {error}", shard,
                            type=SHARD_UNAVAILABLE)


@asynccontextmanager
async def shard_errors(ctx: MoveContext, *shards: str) -> AsyncIterator[None]:
    """Re-raise a connection failure as ``ShardUnavailable`` when one of ``shards`` is down."""
    try:
        yield
    except ApplicationError:
        raise
    except Exception as exc:
        if is_connection_error(exc):
            down = await unreachable(ctx, shards)
            if down is not None:
                raise shard_unavailable(*down) from exc
        raise
