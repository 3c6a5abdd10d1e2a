"""Move leases live as long as their move: renewed by the move's activities, not its history.

A move takes a lease on its source and its target (``catalog_ops.register``); a shard grants
at most ``max_moves_per_shard`` live leases, and a lease not renewed within its lifetime
(``lease_ttl``, 120 s by default) expires, so a dead holder frees its slot by itself. A move
lasts hours, so something must renew its leases while it is alive, and only while it is:

* **Who renews:** the worker that runs one of the move's activities. ``LeaseKeeper`` is a
  worker interceptor: every activity whose input carries the move's ``MoveSpec`` (snapshot,
  import, copy progress, replicate, lag, verify, cleanup, resolve) renews the move's leases
  when it starts, if they were not renewed in the last third of their lifetime, and every
  third of a lifetime while it runs. ``set_phase`` renews them too. A long activity (the
  applier runs for the whole replicate phase and the rollback window) thus keeps them alive
  without a workflow timer, so the workflow's history does not grow per renewal; the
  frequent short polls cost at most one catalog write per third of a lifetime per worker.
* **What stops it:** the move's end. ``finish`` releases the leases in the transaction that
  closes the record, and the catalog refuses to renew a finished move's leases; a dead
  worker's activities stop renewing, and Temporal's retry elsewhere takes over.
* **Not renewed:** ``cutover`` (bounded, and kept free of extra catalog writes inside the
  pause; the forward applier runs alongside it) and ``finish`` (it releases them).
* **A renewal that fails** (catalog down, a lease lost to expiry while its shard filled up)
  is logged and tried again at the next tick; it never fails the data movement it rides on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from typing import Any

from temporalio import activity
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
)

from activities.models import MoveSpec
from catalog import Catalog, CatalogError, LeaseUnavailableError, MigrationStateError

log = logging.getLogger("shardshift.leases")

NOT_RENEWING = frozenset({"migrate.cutover", "migrate.finish"})
"""Activities that carry a MoveSpec but do not renew its leases (see the module essay)."""


async def renew_move_leases(catalog: Catalog, migration_id: str, ttl_s: float | None) -> int:
    """Extend every lease the move holds, as their holder; returns how many (0: none held,
    the move has finished or not registered yet)."""
    held = await catalog.leases(migration_id=migration_id, live_only=False)
    if not held:
        return 0
    ttl = timedelta(seconds=ttl_s) if ttl_s else None
    renewed = await catalog.take_leases(migration_id, [lease.shard_id for lease in held],
                                        holder=held[0].holder, ttl=ttl)
    return len(renewed)


def _spec_of(args: Sequence[Any]) -> MoveSpec | None:
    for arg in args:
        if isinstance(arg, MoveSpec):
            return arg
        spec = getattr(arg, "spec", None)
        if isinstance(spec, MoveSpec):
            return spec
    return None


class LeaseKeeper(Interceptor):
    """Worker interceptor that keeps a move's leases alive while its activities run."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._renewed: dict[str, float] = {}
        """Migration id -> when this worker last renewed its leases (monotonic seconds)."""

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _Inbound(next, self)

    def _ttl(self, spec: MoveSpec) -> float:
        return spec.lease_ttl_s or self.catalog.lease_ttl.total_seconds()

    @contextlib.asynccontextmanager
    async def keep(self, spec: MoveSpec) -> AsyncIterator[None]:
        """Renew ``spec``'s leases now if due, then every third of their lifetime."""
        task = asyncio.create_task(self._loop(spec.migration_id, self._ttl(spec)))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _loop(self, migration_id: str, ttl: float) -> None:
        every = ttl / 3
        while True:
            last = self._renewed.get(migration_id)
            now = time.monotonic()
            if last is None or now - last >= every:
                self._renewed[migration_id] = last = now
                # Shielded: the activity ending mid-renewal must not cut a catalog
                # transaction short; the renewal finishes on its own.
                await asyncio.shield(self._renew(migration_id, ttl))
            await asyncio.sleep(max(0.05, last + every - time.monotonic()))

    async def _renew(self, migration_id: str, ttl: float) -> None:
        try:
            await renew_move_leases(self.catalog, migration_id, ttl)
        except MigrationStateError:
            pass  # the move finished meanwhile: its leases are released, nothing to keep
        except LeaseUnavailableError as exc:
            log.warning("move %s lost a lease and cannot take it back: %s", migration_id, exc)
        except (CatalogError, OSError) as exc:
            log.warning("renewing the leases of move %s failed (next try in a third of "
                        "their lifetime): %s", migration_id, exc)
        if len(self._renewed) > 4096:  # forget moves not seen for an hour
            horizon = time.monotonic() - 3600
            self._renewed = {m: t for m, t in self._renewed.items() if t > horizon}


class _Inbound(ActivityInboundInterceptor):
    def __init__(self, next: ActivityInboundInterceptor, keeper: LeaseKeeper) -> None:
        super().__init__(next)
        self.keeper = keeper

    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        spec = _spec_of(input.args)
        if spec is None or activity.info().activity_type in NOT_RENEWING:
            return await self.next.execute_activity(input)
        async with self.keeper.keep(spec):
            return await self.next.execute_activity(input)
