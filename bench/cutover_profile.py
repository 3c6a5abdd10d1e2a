"""Where a cutover's pause goes: ``bench.cutover``'s run with timestamps at each step.

    python -m bench.cutover_profile --moves 8

Runs ``bench.cutover.run`` (same stack, load and moves) with the cutover's steps, the
applier and the router wrapped to record ``time.monotonic()`` at each event (all run in this
one process, so the clocks agree), plus the event loop's lag (a 5 ms sleep's overshoot).
Prints one JSON line per move, in milliseconds from the freeze's start:

* ``freeze_committed``: the old owner's fence frozen (``freeze_fence`` returned);
* ``applier_received_freeze`` / ``applier_step_start`` / ``applier_committed_freeze``: the
  applier read the freeze's transaction, began the batch holding it, committed that batch;
* ``wait_done``: the cutover learned that the freeze marker was applied;
* ``activated``: the new owner's fence active; ``switch_committed``: the catalog's CAS
  committed (``pause_ms`` ends here);
* ``router_notified``: the router got the catalog's notification; ``router_new_route``: it
  installed the new map; ``first_write_after_commit``: the first write acknowledged after
  the switch; ``blocked_last_finish``: the last of the writes that were waiting across it;
* ``loop_lag_mean_ms`` / ``loop_lag_max_ms``: the event loop's lag over that span.

Then bench.cutover's own JSON object. A diagnostic: it patches methods by name, so a
renamed step shows up as a missing key, not an error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

EVENTS: list[tuple[float, str]] = []


def _ev(name: str) -> None:
    EVENTS.append((time.monotonic(), name))


def _frozen_in(item: Any) -> bool:
    from shards.postgres.pgoutput import FenceMarker, Transaction

    return isinstance(item, Transaction) and any(
        isinstance(m, FenceMarker) and m.state == "frozen" for m in item.markers)


def install() -> None:
    """Wrap the steps (see the module docstring)."""
    import activities.cutover as ac
    import router.route_cache as rc
    import shards.postgres.apply as ap
    import shards.postgres.engine as eng

    def around(cls: Any, name: str, before: str | None, after: str | None) -> None:
        orig = getattr(cls, name)

        async def wrapped(self: Any, *a: Any, **kw: Any) -> Any:
            if before:
                _ev(before)
            result = await orig(self, *a, **kw)
            if after:
                _ev(after)
            return result

        setattr(cls, name, wrapped)

    around(ac._Attempt, "wait_for_catchup", None, "wait_done")
    around(ac._Attempt, "activate_new", None, "activated")
    around(ac._Attempt, "switch_catalog", None, "switch_committed")
    around(eng.PostgresShard, "freeze_fence", "freeze_start", "freeze_committed")

    receive, step = ap.ChangeApplier._receive, ap.ChangeApplier._step

    def receive_w(self: Any, items: Any) -> Any:
        if any(_frozen_in(i) for i in items):
            _ev("applier_received_freeze")
        return receive(self, items)

    def step_w(self: Any, conn: Any, stream: Any) -> Any:
        had = any(_frozen_in(i) for i in self._pending)
        if had:
            _ev("applier_step_start")
        result = step(self, conn, stream)
        if had and not any(_frozen_in(i) for i in self._pending):
            _ev("applier_committed_freeze")
        return result

    ap.ChangeApplier._receive = receive_w  # type: ignore[method-assign]
    ap.ChangeApplier._step = step_w  # type: ignore[method-assign]

    mark, refresh = rc.RouteCache._mark_stale, rc.RouteCache._refresh

    def mark_w(self: Any, collection: str) -> None:
        _ev("router_notified")
        mark(self, collection)

    async def refresh_w(self: Any, collection: str, timeout: float | None = None) -> Any:
        route = await refresh(self, collection, timeout)
        _ev("router_route")
        return route

    rc.RouteCache._mark_stale = mark_w  # type: ignore[method-assign]
    rc.RouteCache._refresh = refresh_w  # type: ignore[method-assign]


async def _loop_lag(stop: asyncio.Event, out: list[tuple[float, float]]) -> None:
    while not stop.is_set():
        t = time.monotonic()
        await asyncio.sleep(0.005)
        out.append((t, time.monotonic() - t - 0.005))


def timelines(records: list[Any], lags: list[tuple[float, float]]) -> list[dict[str, Any]]:
    moves: list[dict[str, float]] = []
    routes: list[list[float]] = []
    for t, name in EVENTS:
        if name == "freeze_start":
            moves.append({})
            routes.append([])
        if not moves:
            continue
        if name == "router_route":
            routes[-1].append(t)
        else:
            moves[-1].setdefault(name, t)
    writes = [r for r in records if r.op != "get" and r.outcome == "ok"]
    rows = []
    for ev, rts in zip(moves, routes, strict=True):
        start, commit = ev.get("freeze_start"), ev.get("switch_committed")
        if start is None or commit is None:
            continue
        row = {k: round((v - start) * 1000, 1) for k, v in ev.items()}
        new_route = next((t for t in rts if t >= commit), None)
        if new_route is not None:
            row["router_new_route"] = round((new_route - start) * 1000, 1)
        after = [r.finished for r in writes if r.finished >= commit]
        if after:
            row["first_write_after_commit"] = round((min(after) - start) * 1000, 1)
        blocked = [r.finished for r in writes if r.started <= commit <= r.finished]
        if blocked:
            row["blocked_writes"] = len(blocked)
            row["blocked_last_finish"] = round((max(blocked) - start) * 1000, 1)
        span = [lag for t, lag in lags if start <= t <= (max(blocked) if blocked else commit)]
        if span:
            row["loop_lag_mean_ms"] = round(statistics.mean(span) * 1000, 1)
            row["loop_lag_max_ms"] = round(max(span) * 1000, 1)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--moves", type=int, default=8)
    parser.add_argument("--rate", type=float, default=500.0)
    args = parser.parse_args(argv)

    import workload.checker
    from bench import cutover
    from catalog.local_stack import private_stack

    install()
    captured: dict[str, list[Any]] = {}
    check = workload.checker.check

    def check_w(records: Any, stored: Any, **kw: Any) -> Any:
        captured["records"] = list(records)
        return check(records, stored, **kw)

    workload.checker.check = check_w  # bench.cutover imports it at run time

    async def go(st: Any) -> tuple[dict[str, Any], list[tuple[float, float]]]:
        stop = asyncio.Event()
        lags: list[tuple[float, float]] = []
        task = asyncio.create_task(_loop_lag(stop, lags))
        try:
            result = await cutover.run(st, st.state_dir, args.moves, args.rate, 3000, 64,
                                       False, 2.0)
        finally:
            stop.set()
            await task
        return result, lags

    with private_stack(2) as st:
        result, lags = asyncio.run(go(st))
    for row in timelines(captured.get("records", []), lags):
        print(json.dumps(row))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
