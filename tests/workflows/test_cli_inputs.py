"""Every command, given a bad id or name, answers with one line on stderr and exit code 2,
no traceback, and changes nothing (real catalog and Temporal server of the session stack).

The whole matrix runs through ``cli.main`` in the test's process; one case of every command
also runs as a ``shardshift`` process of its own, the way an operator starts it (what only a
process shows: its exit code, a trace at interpreter exit)."""

from __future__ import annotations

import asyncio
import os

import pytest

from infra import Stack
from tests.router.conftest import Deployment
from tests.workflows.cli_run import Ran, cli_env, shardshift, shardshift_in_process

HOSTILE = ["x'; DROP TABLE catalog.chunks; --", "a b", "../etc", "é", ""]


def cases(c: str, shard: str, other: str) -> list[list[str]]:
    out: list[list[str]] = []
    for chunk in ("0", "-1", "abc", str(2**63), "999999999"):
        out.append(["migrate", "--collection", c, "--chunk", chunk, "--to", other])
        out.append(["verify", "--collection", c, "--chunk", chunk])
    out += [
        ["migrate", "--collection", "nosuch_coll", "--chunk", "1", "--to", other],
        ["migrate", "--collection", c, "--chunk", "1", "--to", "nosuch-shard"],
        ["verify", "--collection", "nosuch_coll"],
        ["verify", "--show", "0"],
        ["verify", "--show", "nosuch-migration"],
        ["verify"],
        ["catalog", "check", "--collection", "nosuch_coll"],
        ["moves", "--catalog", "--collection", "nosuch coll"],
        ["rollback", "--id", "nosuch-workflow"],
        ["drain", "nosuch-shard"],
        ["drain", shard, "--to", "nosuch-shard", "--dry-run"],
        ["rebalance", "--collection", "nosuch_coll", "--dry-run"],
        ["rebalance", "--shard", "nosuch-shard", "--dry-run"],
        ["rebalance", "--schedule", "1h", "--window", "25:00-01:00"],
        ["rebalance", "--window", "01:00-05:00"],
        ["rebalance", "--schedule", "90s", "--window", "01:00-05:00"],
        ["rebalance", "--max-copy-rate", "fast", "--dry-run"],
        ["rebalance", "--max-moves-per-shard", "0", "--dry-run"],
        ["rebalance", "--pause", "--schedule-id", "nosuch-schedule"],
        ["split-shard", "nosuch-shard", "--to", other, "--dry-run"],
        ["doctor", "--collection", "nosuch coll"],
        ["collection", "create", "fine_name", "--shard-key", "acct", "--chunks-per-shard", "0"],
    ]
    for name in HOSTILE:
        out += [
            ["migrate", "--collection", name, "--chunk", "1", "--to", other],
            ["migrate", "--collection", c, "--chunk", "1", "--to", name],
            ["verify", "--collection", name],
            ["verify", "--show", name],
            ["catalog", "check", "--collection", name],
            ["moves", "--catalog", "--collection", name],
            ["drain", name],
            ["rebalance", "--collection", name, "--dry-run"],
            ["collection", "create", name, "--shard-key", "acct"],
            ["collection", "create", "fine_name", "--shard-key", name or "a..b"],
        ]
    return out


def one_line_exit_2(args: list[str], ran: Ran) -> str | None:
    """What is wrong with the answer to a bad input (None: exit 2, one line, nothing else)."""
    lines = ran.err.strip().splitlines()
    if ran.code != 2 or len(lines) != 1 or "Traceback" in ran.err or ran.out.strip():
        return (f"{args}: exit {ran.code}, stdout {ran.out[-200:]!r}, "
                f"stderr {ran.err[-400:]!r}")
    return None


def one_per_command(all_cases: list[list[str]]) -> list[list[str]]:
    """A usage error, then one case per command (``collection create``, ``catalog check``: two
    words) that gets past the parser: a missing object where there is one, else a hostile
    name."""
    picked: dict[tuple[str, ...], list[str]] = {}
    for args in all_cases:
        command = tuple(args[:2]) if args[0] in ("collection", "catalog") else (args[0],)
        missing = any(a.startswith("nosuch") for a in args)
        hostile = HOSTILE[0] in args
        if missing or (hostile and command not in picked):
            picked.setdefault(command, args)
    return [all_cases[0], *picked.values()]


async def test_bad_ids_and_names_are_one_line_and_exit_2(
    deployment: Deployment, stack: Stack,
) -> None:
    d = deployment
    shard, other = sorted(d.shards)[:2]
    env = cli_env(stack, task_queue="no-worker-listens-here")
    before = (await d.chunk_map(), await d.catalog.migrations(collection=d.collection),
              await d.catalog.list_shards())
    all_cases = cases(d.collection, shard, other)
    failures: list[str] = []
    for args in all_cases:
        failures.append(one_line_exit_2(args, await shardshift_in_process(env, *args)) or "")
    as_processes = one_per_command(all_cases)
    assert len(as_processes) == 11, as_processes
    gate = asyncio.Semaphore(2)

    async def one(args: list[str]) -> str:
        async with gate:
            return one_line_exit_2(args, await shardshift(env, *args)) or ""

    failures += await asyncio.gather(*(one(a) for a in as_processes))
    assert [f for f in failures if f] == [], "\n".join(f for f in failures if f)
    after = (await d.chunk_map(), await d.catalog.migrations(collection=d.collection),
             await d.catalog.list_shards())
    assert [c for c in after[0].chunks if c not in before[0].chunks] == []
    assert after[1] == before[1]
    assert [s.shard_id for s in after[2] if s not in before[2]] == []


@pytest.mark.parametrize("args", [["--help"], ["verify", "--help"], ["catalog", "check", "--help"]])
async def test_help_still_works(args: list[str], stack: Stack) -> None:
    ran = await shardshift(cli_env(stack), *args)
    assert ran.code == 0 and "usage" in ran.out, ran


async def test_in_process_runs_answer_as_a_process_would() -> None:
    """The in-process runner reports the exit code and output a process would: ``--help`` is
    exit 0 on stdout, a usage error exit 2 with one line on stderr, and the environment is
    left as it was."""
    before = dict(os.environ)
    helped = await shardshift_in_process({"SHARDSHIFT_STATE_DIR": "/nonexistent"}, "--help")
    assert helped.code == 0 and "usage" in helped.out and helped.err == "", helped
    usage = await shardshift_in_process({}, "migrate", "--chunk", "abc")
    assert usage.code == 2 and len(usage.err.strip().splitlines()) == 1, usage
    assert usage.out == "" and "Traceback" not in usage.err
    assert dict(os.environ) == before
