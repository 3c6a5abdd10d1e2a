"""The change applier's throttle: the pause decision (pure, with a fake probe and clock)."""

from __future__ import annotations

import threading

import pytest

from shards.postgres.throttle import ApplyThrottle, SourceLoad, ThrottleSettings

MIB = 1024 * 1024


class FakeSource:
    """The probe's answers, and a clock the test moves."""

    def __init__(self) -> None:
        self.now = 0.0
        self.load: SourceLoad | None = SourceLoad(active=0, wal_lsn=100 * MIB, frozen=False)
        self.probes = 0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def probe(self) -> SourceLoad | None:
        self.probes += 1
        return self.load

    def sleep(self, seconds: float) -> bool:
        self.slept.append(seconds)
        self.now += seconds
        return False

    def busy(self, active: int, *, frozen: bool = False) -> None:
        assert self.load is not None
        self.load = SourceLoad(active=active, wal_lsn=self.load.wal_lsn, frozen=frozen)


def throttle(src: FakeSource, stop: threading.Event | None = None, *,
             max_apply_lag_bytes: int = 64 * MIB) -> ApplyThrottle:
    settings = ThrottleSettings(max_active=2, check_s=1.0, max_apply_lag_bytes=max_apply_lag_bytes)
    return ApplyThrottle(settings, probe=src.probe, clock=src.clock, sleep=src.sleep, stop=stop)


def test_pauses_only_while_the_source_is_busy_and_the_lag_is_within_the_bound() -> None:
    src = FakeSource()
    t = throttle(src)
    near = 100 * MIB - 1000            # caught up to 1000 bytes behind the source
    assert not t.should_pause(near)     # 0 active sessions: run
    src.busy(3)
    assert not t.should_pause(near)     # not probed again before check_s: still "not busy"
    assert src.probes == 1
    src.now += 1.0
    assert t.should_pause(near)         # 3 > 2: pause
    assert t.reason is not None and "3 active sessions (limit 2)" in t.reason
    src.busy(2)                         # at the limit is not above it
    src.now += 1.0
    assert not t.should_pause(near) and t.reason is None
    assert t.pauses == 1 and t.paused_s == pytest.approx(1.0)


def test_the_lag_bound_overrides_the_load() -> None:
    src = FakeSource()
    t = throttle(src)
    src.busy(10)
    assert t.should_pause(100 * MIB - 64 * MIB)          # exactly at the bound: pause
    assert not t.should_pause(100 * MIB - 64 * MIB - 1)  # beyond it: apply despite the load
    assert t.should_pause(100 * MIB - MIB)               # applied back under it: pause again
    wide = throttle(src, max_apply_lag_bytes=10**12)
    assert wide.should_pause(1)
    assert not wide.should_pause(0)                       # where the stream is: not known yet


def test_a_frozen_fence_or_a_pending_hold_never_pauses() -> None:
    src = FakeSource()
    t = throttle(src)
    src.busy(10, frozen=True)           # the cutover's pause has started
    assert not t.should_pause(100 * MIB)
    src.busy(10)
    src.now += 1.0
    assert t.should_pause(100 * MIB)
    assert not t.should_pause(100 * MIB, hold_pending=True)


def test_a_failed_probe_does_not_pause() -> None:
    src = FakeSource()
    t = throttle(src)
    src.load = None
    assert not t.should_pause(100 * MIB)


def test_no_load_limit_never_probes() -> None:
    src = FakeSource()
    t = ApplyThrottle(ThrottleSettings(rows_per_s=10), probe=src.probe, clock=src.clock)
    assert not t.enabled and not t.should_pause(1)
    assert src.probes == 0
    assert ThrottleSettings().max_apply_lag_bytes == 256 * MIB


def test_stop_ends_the_pause_and_the_wait() -> None:
    src = FakeSource()
    stop = threading.Event()
    t = throttle(src, stop)
    src.busy(10)
    assert t.should_pause(100 * MIB)
    t.wait(0.5)
    assert src.slept == [0.5]
    stop.set()
    t.wait(0.5)                         # returns at once: nothing slept
    assert src.slept == [0.5]
    assert not t.should_pause(100 * MIB) and t.reason is None


def test_a_load_throttle_needs_the_source() -> None:
    with pytest.raises(ValueError, match="source"):
        ApplyThrottle(ThrottleSettings(max_active=1))
    with pytest.raises(ValueError):
        ThrottleSettings(max_active=1, max_apply_lag_bytes=0)
