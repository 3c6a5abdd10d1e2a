"""``activities.copy_seats.CopySeats``: a worker's bound on the move copies it carries at once
(pure asyncio; the clock is the test's, so expiry is exact). The same seats on a real worker:
``tests/workflows/test_copy_seats.py``."""

from __future__ import annotations

import asyncio

from activities.copy_seats import CopySeats


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_a_full_worker_refuses_and_a_released_seat_is_taken() -> None:
    seats = CopySeats(1, idle_s=60, queue="q", clock=Clock())
    assert seats.try_claim("move-a")
    assert seats.try_claim("move-a"), "a move's own seat is its own"
    assert not await seats.claim("move-b", 0)
    assert seats.refused == 1
    seats.release("move-a")
    assert seats.try_claim("move-b")


async def test_a_copy_waits_for_a_seat_and_the_peak_is_what_ran() -> None:
    seats = CopySeats(1, idle_s=60, queue="q", clock=Clock())
    a_running, b_running = asyncio.Event(), asyncio.Event()
    a_done = asyncio.Event()

    async def copy_a() -> None:
        async with seats.use("move-a"):
            a_running.set()
            await a_done.wait()
        seats.release("move-a")  # the import ended

    async def copy_b() -> None:
        async with seats.use("move-b"):
            b_running.set()

    ta = asyncio.create_task(copy_a())
    await a_running.wait()
    tb = asyncio.create_task(copy_b())
    for _ in range(20):
        await asyncio.sleep(0)
    assert not b_running.is_set(), "the second copy waits while the first holds the seat"
    a_done.set()
    await asyncio.wait_for(asyncio.gather(ta, tb), 10)
    assert b_running.is_set()
    assert seats.running_peak == 1 and seats.running == 0


async def test_an_idle_seat_expires_and_a_running_one_never_does() -> None:
    clock = Clock()
    seats = CopySeats(1, idle_s=5, queue="q", clock=clock)
    assert seats.try_claim("crashed")  # claimed, then its move stopped touching it
    clock.now += 4.9
    assert not seats.try_claim("next")
    clock.now += 0.2
    assert seats.try_claim("next"), "the idle seat expired"
    async with seats.use("next"):
        clock.now += 3600
        assert not seats.try_claim("other"), "a seat in use does not expire"
    assert seats.holds("next"), "after its copy stops, idle until it expires"
    clock.now += 5
    assert not seats.holds("next") and seats.try_claim("other")


async def test_a_release_while_a_copy_runs_frees_the_seat_when_it_stops() -> None:
    seats = CopySeats(1, idle_s=60, queue="q", clock=Clock())
    async with seats.use("move-a"):
        seats.release("move-a")
        assert not seats.try_claim("move-b")
    assert seats.try_claim("move-b")


async def test_unlimited_seats_only_count() -> None:
    seats = CopySeats(None)
    async with seats.use("a"), seats.use("b"), seats.use("c"):
        assert seats.running == 3
    assert seats.running_peak == 3
