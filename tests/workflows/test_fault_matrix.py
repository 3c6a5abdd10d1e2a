"""A few cells of the fault matrix (``python -m bench.faults``) on the session stack.

Each cell is one run of ``bench.faultkit``: a move under load, pinned in a phase, a fault
injected there, the move's end awaited and judged. The proof is the matrix's own: the fault
landed in the wanted phase, the move completed or aborted clean, the checker found nothing
lost, no replication object of the move is left on any shard, the catalog's layout and the
fences agree, and no client saw an error.
"""

from __future__ import annotations

import shutil

import pytest

from bench.faultkit import Fault, MoveRun, Rig, RunConfig
from infra import Stack
from tests.conftest import owned_state_dir

CELLS = [("replicate", Fault.WORKER_KILL), ("import", Fault.TARGET_STOP)]


@pytest.mark.parametrize(("phase", "fault"), CELLS, ids=[f"{p}-{f.value}" for p, f in CELLS])
async def test_fault_cell(phase: str, fault: Fault, stack: Stack) -> None:
    work = owned_state_dir("faults")
    rig = await Rig.open(stack, work)
    try:
        run = MoveRun(rig, RunConfig(preload=8000, settle_s=120.0), phase, fault,
                      rig.pairs()[0], "t")
        res = await run.run()
    finally:
        await rig.close()
        shutil.rmtree(work, ignore_errors=True)
    print(res.model_dump_json(indent=2))
    assert res.landed == phase, res
    assert res.outcome in ("completed", "aborted_clean"), res
    assert res.lost_writes == 0, res.lost_samples
    assert res.leaked == [], res.leaked
    assert res.violations == [], res.violations
    assert res.client_errors == 0, res.error_samples
