"""Stored plans of fleet operations: kept in order, paged, replaced per round, dropped whole;
bad input changes nothing."""

from __future__ import annotations

import uuid

import pytest

from catalog import Catalog
from catalog.store import MAX_PAGE, StoredMove


def _moves(n: int, target: str = "t") -> list[StoredMove]:
    return [StoredMove(collection="c", chunk_id=1000 + i, source="s", target=target, bytes=i)
            for i in range(n)]


async def test_a_plan_is_read_back_in_pages_in_plan_order(catalog: Catalog) -> None:
    plan = f"drain-{uuid.uuid4().hex[:8]}@run"
    moves = _moves(2500)
    try:
        assert await catalog.save_plan(plan, 1, moves) == 2500
        got: list[StoredMove] = []
        while page := await catalog.plan_page(plan, 1, len(got), MAX_PAGE):
            got += page
        assert got == moves
        assert await catalog.plan_page(plan, 1, 2499, 10) == moves[-1:]
        assert await catalog.plan_page(plan, 2, 0, 10) == []  # another round: nothing stored
    finally:
        await catalog.drop_plan(plan)  # the house clean: no plan left for the doctor to find


async def test_storing_a_round_again_replaces_it_and_drop_removes_every_round(
        catalog: Catalog) -> None:
    plan = f"drain-{uuid.uuid4().hex[:8]}@run"
    await catalog.save_plan(plan, 1, _moves(5))
    await catalog.save_plan(plan, 2, _moves(3))
    await catalog.save_plan(plan, 1, _moves(2, target="u"))  # a retried plan activity
    assert [m.target for m in await catalog.plan_page(plan, 1, 0, 100)] == ["u", "u"]
    assert len(await catalog.plan_page(plan, 2, 0, 100)) == 3
    assert await catalog.drop_plan(plan) == 5
    assert await catalog.plan_page(plan, 1, 0, 100) == []
    assert await catalog.drop_plan(plan) == 0


async def test_bad_plan_input_is_refused_and_changes_nothing(catalog: Catalog) -> None:
    plan = f"drain-{uuid.uuid4().hex[:8]}@run"
    await catalog.save_plan(plan, 1, _moves(2))
    for bad in ("", "-x", "x y", "a" * 401, None):
        with pytest.raises(ValueError, match="invalid plan id"):
            await catalog.save_plan(bad, 1, _moves(1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="invalid round"):
        await catalog.save_plan(plan, 0, _moves(1))
    with pytest.raises(ValueError, match="invalid page size"):
        await catalog.plan_page(plan, 1, 0, MAX_PAGE + 1)
    with pytest.raises(ValueError, match="invalid offset"):
        await catalog.plan_page(plan, 1, -1, 10)
    assert len(await catalog.plan_page(plan, 1, 0, 10)) == 2
    await catalog.drop_plan(plan)
