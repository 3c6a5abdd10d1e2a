"""The rebalancer's Temporal Schedule: its spec (an interval, or run times inside a daily
window), pause and resume, and what it says about itself.

A Temporal ``ScheduleSpec`` unions its intervals and calendars, it never intersects them, so
"every hour, only between 01:00 and 05:00" cannot be an interval plus a window. The window is
therefore turned into calendar entries: the run times of one day (the window's start, then
every ``EVERY`` while inside the window), grouped by minute of the hour, each entry naming the
hours that run at that minute. A window that ends before it starts wraps past midnight
(``22:00-02:00``). Times are in ``time_zone`` (default UTC).
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from temporalio.client import (
    Client,
    ScheduleCalendarSpec,
    ScheduleIntervalSpec,
    ScheduleRange,
    ScheduleSpec,
)
from temporalio.service import RPCError, RPCStatusCode

from cli.common import CliError

_CLOCK = re.compile(r"([01]?\d|2[0-3]):([0-5]\d)")
_DAY = 24 * 60


def parse_window(text: str) -> tuple[int, int]:
    """``HH:MM-HH:MM`` -> (start, end) in minutes of the day; ValueError when malformed."""
    start, sep, end = text.partition("-")
    a, b = _CLOCK.fullmatch(start.strip()), _CLOCK.fullmatch(end.strip())
    if not sep or a is None or b is None:
        raise ValueError(f"{text!r}: use HH:MM-HH:MM (e.g. 01:00-05:00)")
    lo = int(a.group(1)) * 60 + int(a.group(2))
    hi = int(b.group(1)) * 60 + int(b.group(2))
    if lo == hi:
        raise ValueError(f"{text!r}: the window is empty (start equals end)")
    return lo, hi


def run_minutes(every: timedelta, window: tuple[int, int]) -> list[int]:
    """Minutes of the day at which a schedule every ``every`` runs inside ``window``: the
    window's start, then every ``every`` while before its end (a wrapped window runs on past
    midnight)."""
    step = every.total_seconds() / 60
    if step < 1 or step != int(step):
        raise ValueError("with a window, EVERY must be a whole number of minutes")
    lo, hi = window
    if hi <= lo:
        hi += _DAY
    return sorted({m % _DAY for m in range(lo, hi, int(step))})


def window_calendars(every: timedelta, window: tuple[int, int]) -> list[ScheduleCalendarSpec]:
    """Calendar entries that fire exactly at :func:`run_minutes` every day."""
    hours: dict[int, list[int]] = {}
    for m in run_minutes(every, window):
        hours.setdefault(m % 60, []).append(m // 60)
    return [ScheduleCalendarSpec(second=(ScheduleRange(0),), minute=(ScheduleRange(minute),),
                                 hour=tuple(ScheduleRange(h) for h in sorted(hs)))
            for minute, hs in sorted(hours.items())]


def schedule_spec(every: timedelta, window: tuple[int, int] | None,
                  time_zone: str | None = None) -> ScheduleSpec:
    if window is None:
        return ScheduleSpec(intervals=[ScheduleIntervalSpec(every=every)])
    return ScheduleSpec(calendars=window_calendars(every, window),
                        time_zone_name=time_zone or "UTC")


def describe_window(window: tuple[int, int] | None) -> str:
    if window is None:
        return "any time"
    lo, hi = window
    return f"{lo // 60:02d}:{lo % 60:02d}-{hi // 60:02d}:{hi % 60:02d}"


async def pause(client: Client, schedule_id: str, *, resume: bool, note: str) -> None:
    """Pause (or resume) the schedule: a paused schedule starts no run; one running
    continues."""
    handle = client.get_schedule_handle(schedule_id)
    try:
        if resume:
            await handle.unpause(note=note)
        else:
            await handle.pause(note=note)
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            raise CliError(f"no schedule {schedule_id} (create it: shardshift rebalance "
                           "--schedule EVERY)") from None
        raise


async def schedule_status(client: Client, schedule_id: str) -> dict[str, Any] | None:
    """What the schedule says about itself (None: there is none): paused and why, its spec,
    the next run times, the last runs."""
    try:
        desc = await client.get_schedule_handle(schedule_id).describe()
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            return None
        raise
    spec = desc.schedule.spec
    return {
        "schedule_id": schedule_id,
        "paused": desc.schedule.state.paused,
        "note": desc.schedule.state.note or None,
        "every": [i.every.total_seconds() for i in spec.intervals],
        "calendars": len(spec.calendars),
        "time_zone": spec.time_zone_name or None,
        "next_runs": [t.isoformat() for t in desc.info.next_action_times[:5]],
        "recent_runs": [a.scheduled_at.isoformat() for a in desc.info.recent_actions[-5:]],
        "running": [getattr(w, "workflow_id", None) for w in desc.info.running_actions],
    }


__all__ = ["describe_window", "parse_window", "pause", "run_minutes", "schedule_spec",
           "schedule_status", "window_calendars"]
