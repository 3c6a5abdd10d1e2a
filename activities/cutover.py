"""Phase 6 (and rollback): the version-token cutover, as a sequence of named steps.

Forward (``old`` = source, ``new`` = target, token ``t`` -> ``t+1``); a rollback runs the same
steps with the roles swapped (``old`` = target at ``t+1``, ``new`` = source, -> ``t+2``):

1. ``admit``: the stream must be within ``max_lag_bytes`` of the old owner, so the pause
   that follows only has to drain a few transactions.
2. ``create_reverse_stream`` (forward, with a rollback window only): publication and slot on
   the new owner for the rollback window, created *before* the new owner can take a write,
   so none is missed. Without a window it is skipped: a slot nobody reads retains WAL.
3. ``freeze_old``: the old owner's fence goes to ``t+1, frozen``. In-flight writes commit
   first; every later one is rejected and the router retries. **The pause starts.**
4. ``wait_for_catchup``: the freeze travels through the stream as a fence marker; once the
   applier has applied it, the new owner holds every write the old owner ever accepted. The
   applier notifies at that batch's commit; the wait (on a session opened before the freeze)
   wakes on it rather than polling.
5. ``activate_new``: the new owner's fence becomes ``active`` at the new token. Its round
   trip overlaps step 6's statement; step 6 commits only after it succeeded.
6. ``switch_catalog``: compare-and-set of the chunk's placement in the catalog, expecting the
   old token. **The commit point; the pause ends** (routers refresh and find the new owner).

Before the commit point every failure undoes what was done (the new fence back to its prior
state, the old fence unfrozen to its old token) and reports ``committed=False``; the workflow
keeps replicating and tries again. If the catalog's answer to the switch is lost, the activity
re-reads the catalog: committed or not is then a fact, never a guess; while the catalog cannot
be read the old fence stays frozen (unavailable, never inconsistent) and the activity fails
retryably. That read waits for the row lock of a switch still in flight, so a commit that is
merely late is never read as "not committed". A retried activity starts by ``recover``: it
finishes a committed switch or undoes a half-done one, then proceeds normally.

When the activity fails for good anyway (its attempts exhausted: the catalog or the new owner
down for minutes), the workflow asks ``resolve_cutover``, which reads the same truth and
either activates the new owner (the move rolls forward) or undoes the attempt under the
cutover's lock (the move may abort). The answer is retried without limit, never guessed.

No Temporal round trip happens inside the pause: steps 3 to 6 run in this one activity.
Each step is a method of ``_Attempt`` named as above; ``_Attempt.run`` calls them in order
and undoes what was done when one fails before the commit point.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from temporalio import activity

from activities import metrics
from activities.availability import shard_errors
from activities.context import MoveContext, non_retryable
from activities.faults import inject
from activities.models import (
    CutoverInput,
    CutoverResult,
    CutoverStep,
    Direction,
    MoveSpec,
    PlanInput,
)
from activities.replicate import endpoints, stream_spec
from activities.timeline import record, utcnow
from catalog import CatalogError, CatalogUnavailableError, TokenMismatchError
from catalog.models import Chunk
from catalog.timeline import MarkName, MoveSample, SampleKind
from shards.errors import FenceStateError
from shards.models import Fence, FenceState
from shards.postgres import PostgresShard
from shards.postgres import replication as repl
from shards.postgres.engine import Session
from shards.postgres.locks import CutoverLock
from shards.postgres.server import is_connection_error
from shards.postgres.stream_control import StreamWatch, measure_lag

_T = TypeVar("_T")

STEPS: list[tuple[str, str]] = [
    ("admit", "check the stream is within {max_lag} bytes of {old}"),
    ("create_reverse_stream", "create publication and slot on {new} for the rollback window"),
    ("freeze_old", "freeze fence {chunk} on {old}: token {t} -> {t1} (frozen); writes pause"),
    ("wait_for_catchup", "wait (<= {catchup}s) until {new} has applied the freeze marker"),
    ("activate_new", "activate fence {chunk} on {new} at token {t1}"),
    ("switch_catalog", "catalog CAS: {chunk} on {old}@{t} -> {new}@{t1} (commit point)"),
]


@dataclass
class _Run:
    inp: CutoverInput
    old: str
    new: str
    old_token: int
    steps: list[CutoverStep] = field(default_factory=list)
    froze_at: datetime | None = None
    """When this attempt froze the old owner (the pause started), for the timeline."""

    @classmethod
    def of(cls, inp: CutoverInput) -> _Run:
        """The run of ``inp``: who is old and new, and the old token, by direction."""
        old, new = endpoints(inp.spec, inp.direction)
        forward = inp.direction == Direction.FORWARD
        return cls(inp, old, new, inp.spec.token if forward else inp.spec.token + 1, plan(inp))

    @property
    def new_token(self) -> int:
        return self.old_token + 1

    @property
    def spec(self) -> MoveSpec:
        return self.inp.spec


def plan(inp: CutoverInput) -> list[CutoverStep]:
    """The exact steps a cutover would run (the dry run prints these)."""
    spec = inp.spec
    forward = inp.direction == Direction.FORWARD
    old, new = (spec.source, spec.target) if forward else (spec.target, spec.source)
    t = spec.token if forward else spec.token + 1
    out = []
    for name, text in STEPS:
        if name == "create_reverse_stream" and not (forward and inp.reverse_stream):
            continue
        out.append(CutoverStep(name=name, description=text.format(
            max_lag=inp.max_lag_bytes, old=old, new=new, chunk=f"{spec.collection}/{spec.chunk_id}",
            t=t, t1=t + 1, catchup=inp.catchup_timeout_s,
        )))
    return out


class CutoverActivities:
    def __init__(self, ctx: MoveContext) -> None:
        self.ctx = ctx

    @activity.defn(name="migrate.plan")
    async def plan(self, inp: PlanInput) -> CutoverResult:
        """Dry run: validate the move against the catalog (read only) and return its plan."""
        cat = self.ctx.catalog
        try:
            chunk = await cat.chunk(inp.collection, inp.chunk_id)
            await cat.shard(inp.target)
        except CatalogError as exc:
            raise non_retryable(exc, "plan") from exc
        if chunk.shard_id == inp.target:
            raise non_retryable(ValueError(f"chunk is already on {inp.target}"), "plan")
        spec = MoveSpec(migration_id=inp.migration_id, collection=inp.collection,
                        chunk_id=inp.chunk_id, key_range=chunk.range, source=chunk.shard_id,
                        target=inp.target, token=chunk.token)
        steps = plan(CutoverInput(spec=spec, max_lag_bytes=inp.max_lag_bytes,
                                  catchup_timeout_s=inp.catchup_timeout_s,
                                  rollback_window_s=inp.rollback_window_s))
        return CutoverResult(committed=False, steps=steps, reason="dry run: nothing was changed")

    @activity.defn(name="migrate.cutover")
    async def cutover(self, inp: CutoverInput) -> CutoverResult:
        run = _Run.of(inp)
        # A connection failure because a shard is down becomes ``ShardUnavailable``: the
        # workflow settles the attempt from the catalog and pauses the move.
        outcome: CutoverResult | BaseException | None = None
        try:
            async with shard_errors(self.ctx, run.old, run.new), self._exclusive(run):
                recovered = await self._recover(run)
                if recovered is not None:
                    outcome = _observed(recovered, inp)
                    return outcome
                try:
                    attempt = await _Attempt.prepare(self, run)
                    try:
                        outcome = _observed(await attempt.run(), inp)
                    finally:
                        await attempt.close()
                    return outcome
                except CatalogError as exc:
                    if exc.retryable:
                        raise
                    raise non_retryable(exc, "cutover") from exc
        except BaseException as exc:
            outcome = exc
            raise
        finally:
            # After the pause and the lock: the timeline never lengthens a pause.
            await record(self.ctx.catalog, inp.spec.migration_id, _marks(run, outcome))

    @contextlib.asynccontextmanager
    async def _exclusive(self, run: _Run) -> AsyncIterator[None]:
        """One attempt of this cutover at a time, even across workers.

        A retried attempt (the previous one's heartbeat timed out) must never run while the
        previous one is still alive: its recovery could unfreeze a source the other is about
        to switch away from. The cutover lock (``shards.postgres.locks.CutoverLock``, a
        session advisory lock on the old owner keyed by the migration) serializes them; a
        crashed worker's session closes and frees the lock at once.
        """
        lock = await CutoverLock.connect(await self.ctx.dsn(run.old), run.spec.migration_id)
        try:
            while not await lock.try_acquire():
                activity.heartbeat("waiting for a previous cutover attempt to end")
                await asyncio.sleep(0.1)
            yield
        finally:
            await lock.close()  # releases the session lock

    # -- recovery -------------------------------------------------------------------------------

    async def _committed(self, run: _Run) -> bool:
        """Whether the catalog places the chunk on the new owner at the new token (reads the
        catalog, retrying for a while: the answer decides between finishing and undoing).

        The read waits for a switch still in flight (``settled_chunk``): a ``move_chunk``
        whose reply was lost may not have committed *yet*, and reading around it would
        answer "no" just before it lands."""
        for attempt in range(50):
            if activity.in_activity():
                activity.heartbeat("reading the catalog: did the switch commit?")
            try:
                chunk: Chunk = await self.ctx.catalog.settled_chunk(
                    run.spec.collection, run.spec.chunk_id, wait_s=1.0)
                return chunk.shard_id == run.new and chunk.token == run.new_token
            except CatalogUnavailableError:
                await asyncio.sleep(min(0.05 * (attempt + 1), 1.0))
        raise CatalogUnavailableError("catalog unreadable while resolving a cutover")

    @activity.defn(name="migrate.resolve_cutover")
    async def resolve(self, inp: CutoverInput) -> CutoverResult:
        """After a cutover activity failed for good: the catalog's answer, acted upon.

        Committed (the catalog places the chunk on the new owner at the new token): the new
        owner's fence is activated and the result says committed, so the workflow rolls the
        move forward. Not committed: the cutover's lock is taken first (no attempt of it is
        still alive), the catalog read again, and a half-done attempt undone. Unknown (the
        catalog unreadable): the activity fails retryably and is retried without limit; it
        never guesses.
        """
        run = _Run.of(inp)
        try:
            if await self._committed(run):
                result = _observed(await self._finish_committed(run), inp)
            else:
                async with self._exclusive(run):
                    recovered = await self._recover(run, spare_new=True)
                result = recovered or CutoverResult(committed=False, steps=run.steps,
                                                    reason="the switch did not commit")
        except CatalogError as exc:
            if exc.retryable:
                raise
            raise non_retryable(exc, "resolving a cutover") from exc
        await record(self.ctx.catalog, inp.spec.migration_id, _marks(run, result))
        return result

    async def _finish_committed(self, run: _Run) -> CutoverResult:
        """The switch committed: the new owner serves at the new token (only it is needed)."""
        spec = run.spec
        new_engine = await self.ctx.engine(run.new)
        await new_engine.activate(spec.collection, spec.chunk_id, run.new_token)
        record = await self.ctx.catalog.migration(spec.migration_id)
        return CutoverResult(committed=True, new_token=run.new_token, new_owner=run.new,
                             pause_ms=record.pause_ms, steps=run.steps,
                             reason="recovered: the switch had committed")

    async def _recover(self, run: _Run, *, spare_new: bool = False) -> CutoverResult | None:
        """Finish a committed switch, or undo a half-done attempt (a retried activity).

        ``spare_new`` (resolving a cutover that failed for good): when the switch did not
        commit and the new owner cannot be reached (a target lost mid-cutover), only the old
        owner is undone. That is safe: no router was ever told of the new owner, whose fence
        (receiving, or active at a token the catalog never reached) ``shardshift doctor``
        removes once it answers. Waiting for it instead would keep the abort, and so the
        source's slot, hostage to a server that may never return.
        """
        spec = run.spec
        if await self._committed(run):
            return await self._finish_committed(run)
        old_engine, new_engine = await self.ctx.engine(run.old), await self.ctx.engine(run.new)
        old_fence = await old_engine.fence(spec.collection, spec.chunk_id)
        try:
            new_fence = await new_engine.fence(spec.collection, spec.chunk_id)
        except Exception as exc:
            if not (spare_new and is_connection_error(exc)):
                raise
            activity.logger.warning("new owner %s unreachable: undoing the old owner only",
                                    run.new)
            if (old_fence is not None and old_fence.state == FenceState.FROZEN
                    and old_fence.token == run.new_token):
                await old_engine.unfreeze(spec.collection, spec.chunk_id, run.new_token)
            return None
        half_done = (old_fence is not None and old_fence.state == FenceState.FROZEN
                     and old_fence.token == run.new_token) or (
            new_fence is not None and new_fence.state == FenceState.ACTIVE)
        if half_done:
            await self._undo(run, activated=True)
        return None

    async def _undo(self, run: _Run, *, activated: bool) -> None:
        """Before the commit point: new owner's fence back, old owner's fence unfrozen."""
        spec = run.spec
        old_engine, new_engine = await self.ctx.engine(run.old), await self.ctx.engine(run.new)
        if activated:
            fence = await new_engine.fence(spec.collection, spec.chunk_id)
            if fence is not None and fence.state == FenceState.ACTIVE:
                # Forward: back to receiving at t; rollback: the source goes back to frozen.
                back = FenceState.RECEIVING if run.inp.direction == Direction.FORWARD else FenceState.FROZEN
                await new_engine.transition(
                    spec.collection, spec.chunk_id, expect_token=fence.token,
                    expect_state=[FenceState.ACTIVE], new_token=run.old_token, new_state=back,
                )
        fence = await old_engine.fence(spec.collection, spec.chunk_id)
        if fence is not None and fence.state == FenceState.FROZEN and fence.token == run.new_token:
            await old_engine.unfreeze(spec.collection, spec.chunk_id, run.new_token)


class _Attempt:
    """One attempt of a cutover: the steps of the module essay, one method each.

    :meth:`run` calls them in order. Before the commit point (:meth:`switch_catalog`) every
    failure undoes what was done (``CutoverActivities._undo``) and the attempt reports
    ``committed=False`` (a refused admission, a slow catch-up, a fence or token that moved)
    or re-raises; a switch whose answer was lost is settled from the catalog.
    """

    def __init__(self, acts: CutoverActivities, run: _Run, *, old_dsn: str, new_dsn: str,
                 old_engine: PostgresShard, new_engine: PostgresShard) -> None:
        self.acts = acts
        self.ctx = acts.ctx
        self.job = run
        self.spec = run.spec
        self.inp = run.inp
        self.old_dsn, self.new_dsn = old_dsn, new_dsn
        self.old_engine, self.new_engine = old_engine, new_engine
        self.names = stream_spec(run.spec, run.inp.direction).names
        self.steps = {s.name: s for s in run.steps}
        self.pause_start = 0.0
        self.watch: StreamWatch | None = None
        self.freezer: Session | None = None
        """The session on the old owner that freezes (opened before the pause)."""

    @classmethod
    async def prepare(cls, acts: CutoverActivities, run: _Run) -> _Attempt:
        """The attempt with both owners' addresses and engines at hand."""
        ctx = acts.ctx
        return cls(acts, run, old_dsn=await ctx.dsn(run.old), new_dsn=await ctx.dsn(run.new),
                   old_engine=await ctx.engine(run.old), new_engine=await ctx.engine(run.new))

    async def close(self) -> None:
        if self.freezer is not None:
            freezer, self.freezer = self.freezer, None
            await freezer.close()
        if self.watch is not None:
            watch, self.watch = self.watch, None
            await watch.close()

    # -- bookkeeping ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _step(self, name: str) -> Iterator[None]:
        """Time a step; it is marked done (with its milliseconds) only when it succeeds."""
        started = time.perf_counter()
        yield
        self.steps[name] = self.steps[name].model_copy(
            update={"done": True, "ms": (time.perf_counter() - started) * 1000})

    def _result(self, **kw: Any) -> CutoverResult:
        return CutoverResult(steps=[self.steps[s.name] for s in self.job.steps], **kw)

    def _refused(self, reason: str) -> CutoverResult:
        return self._result(committed=False, reason=reason)

    # -- the steps ------------------------------------------------------------------------------

    async def admit(self) -> str | None:
        """1. The stream must be within ``max_lag_bytes`` of the old owner; returns why not
        (None: admitted)."""
        with self._step("admit"):
            lag = await self.ctx.run_blocking(
                lambda _s: measure_lag(self.old_dsn, self.new_dsn, self.names), interval=0.5)
        if lag.caught_up_lsn is None or lag.lag_bytes > self.inp.max_lag_bytes:
            return f"admission refused: stream {lag.lag_bytes} bytes behind"
        return None

    async def create_reverse_stream(self) -> None:
        """2. (forward, with a rollback window) The reverse stream's publication and slot on
        the new owner, before it can take a write; outside the pause."""
        with self._step("create_reverse_stream"):
            await self.ctx.run_blocking(lambda _s: _ensure_reverse_stream(self.new_dsn, self.spec),
                                        interval=0.5)

    async def freeze_old(self) -> tuple[Fence, str]:
        """3. The old owner's fence to ``t+1, frozen``: **the pause starts**. Returns the
        frozen fence and the old owner's WAL position just before the freeze (the freeze
        marker comes after it)."""
        # Outside the pause: the session that will wait for the freeze marker (LISTENing for
        # the applier's notification), and the position the marker must come after.
        # Both heartbeat while they wait: a new connection can take seconds on a loaded
        # host, longer than the cutover's heartbeat timeout (2 s by default).
        # The freeze itself runs on a session of its own opened here too (no pool checkout
        # and no checkout's check inside the pause); the activation (step 5) runs on the
        # watch's session, which has just answered.
        self.watch = await _heartbeating(StreamWatch.open(self.new_dsn, self.names),
                                         "opening the session that waits for the marker")
        self.freezer = await _heartbeating(self.old_engine.connect_async(),
                                           "opening the session that freezes")
        before = await _heartbeating(self.old_engine.wal_lsn(), "reading the WAL position")
        activity.heartbeat("freezing")
        self.job.froze_at = utcnow()
        self.pause_start = time.perf_counter()
        with self._step("freeze_old"):
            fence = await self.old_engine.freeze_fence(self.spec.collection,
                                                       self.spec.chunk_id, self.job.old_token,
                                                       conn=self.freezer)
        return fence, before

    async def wait_for_catchup(self, fence: Fence, before: str) -> bool:
        """4. Until the new owner has applied the freeze marker (it then holds every write the
        old owner ever accepted); False when that takes over ``catchup_timeout_s``."""
        assert self.watch is not None, "freeze_old opens the watch"
        try:
            with self._step("wait_for_catchup"):
                # Woken by the applier's notification at the commit of the batch that applied
                # the freeze (not by a polling interval); heartbeats meanwhile.
                await _heartbeating(self.watch.wait_for_fence(
                    token=fence.token, state="frozen", after_lsn=before,
                    timeout=self.inp.catchup_timeout_s), "waiting for the freeze marker")
        except TimeoutError:
            return False
        return True

    async def activate_new(self) -> None:
        """5. The new owner's fence becomes ``active`` at the new token."""
        with self._step("activate_new"):
            await self.new_engine.activate(
                self.spec.collection, self.spec.chunk_id, self.job.new_token,
                conn=None if self.watch is None else self.watch.connection)

    async def activate_and_switch(self) -> None:
        """5 and 6 overlapped: the activation's round trip to the new owner runs while the
        catalog's switch statement does; the switch commits only once the activation has
        succeeded (``move_chunk``'s ``before_commit``), so the commit point still follows
        it, and a failed activation commits nothing. Returns (or raises) only once the
        activation has ended, so an undo never races it."""
        activation = asyncio.ensure_future(self.activate_new())
        try:
            await self.switch_catalog(before_commit=lambda: asyncio.shield(activation))
        finally:
            if not activation.done():
                activation.cancel()
            await asyncio.gather(activation, return_exceptions=True)

    async def switch_catalog(
            self, before_commit: Callable[[], Awaitable[object]] | None = None) -> None:
        """6. The catalog's compare-and-set of the chunk's placement: **the commit point**.

        A lost answer is settled by reading the catalog; when that cannot be read either, the
        ``CatalogUnavailableError`` propagates (the old fence stays frozen; the retry's
        recovery decides)."""
        run, spec = self.job, self.spec
        with self._step("switch_catalog"):
            pause_ms = (time.perf_counter() - self.pause_start) * 1000
            try:
                await self.ctx.catalog.move_chunk(
                    spec.collection, spec.chunk_id, run.old_token, run.new, spec.migration_id,
                    pause_ms=pause_ms, before_commit=before_commit,
                )
            except CatalogUnavailableError:
                if not await self.acts._committed(run):
                    raise  # unknown and unreadable: stay frozen; the retry's recover decides
            inject("cutover.after_switch", spec.collection)

    # -- the attempt ----------------------------------------------------------------------------

    async def run(self) -> CutoverResult:
        run = self.job
        refused = await self.admit()
        if refused is not None:
            return self._refused(refused)
        if "create_reverse_stream" in self.steps:
            await self.create_reverse_stream()

        fence, before = await self.freeze_old()
        activated = False
        try:
            if not await self.wait_for_catchup(fence, before):
                await self.acts._undo(run, activated=False)
                return self._refused(f"catch-up took over {self.inp.catchup_timeout_s}s")
            # The activation may have run (or be undone) whatever the switch's outcome.
            activated = True
            await self.activate_and_switch()
            pause_ms = (time.perf_counter() - self.pause_start) * 1000
            return self._result(committed=True, new_token=run.new_token, new_owner=run.new,
                                pause_ms=pause_ms)
        except (asyncio.CancelledError, Exception) as exc:
            if isinstance(exc, CatalogUnavailableError):
                raise
            if await self.acts._committed(run):
                raise
            await self.acts._undo(run, activated=activated)
            if isinstance(exc, asyncio.CancelledError):
                raise
            if isinstance(exc, TokenMismatchError | FenceStateError):
                return self._refused(f"{type(exc).__name__}: {exc}")
            raise


async def _heartbeating(aw: Awaitable[_T], what: str) -> _T:
    """``await aw``, heartbeating every 0.5 s while it runs (cancelled with the caller)."""
    task = asyncio.ensure_future(aw)
    try:
        while not (await asyncio.wait({task}, timeout=0.5))[0]:
            activity.heartbeat(what)
        return task.result()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def _ensure_reverse_stream(new_dsn: str, spec: MoveSpec) -> None:
    """The rollback window's publication and slot on the new owner (idempotent)."""
    names = repl.stream_names(spec.migration_id, Direction.REVERSE.value)
    repl.create_publication(new_dsn, names, spec.collection, spec.chunk_id, spec.key_range)
    repl.ensure_slot(new_dsn, names)


PAUSE_STEPS = ("freeze_old", "wait_for_catchup", "activate_new", "switch_catalog")
"""The steps inside the pause (``activate_new`` overlaps ``switch_catalog``)."""


def pause_breakdown(steps: list[CutoverStep]) -> str:
    """Where a committed pause went, for the timeline's commit mark (an operator reading the
    timeline sees which step held the writes): ``": freeze_old 2.1 ms, ..."``."""
    parts = [f"{s.name} {s.ms:.1f} ms" for s in steps
             if s.name in PAUSE_STEPS and s.done and s.ms is not None]
    return ": " + ", ".join(parts) if parts else ""


def read_pause_breakdown(detail: str | None) -> dict[str, float]:
    """:func:`pause_breakdown` read back from a commit mark's detail: step -> ms (empty for
    a mark written before the steps were recorded)."""
    if not detail or ": " not in detail:
        return {}
    steps: dict[str, float] = {}
    for part in detail.split(": ", 1)[1].split(", "):
        name, ms, _unit = part.rsplit(" ", 2)
        steps[name] = float(ms)
    return steps


def _marks(run: _Run, outcome: CutoverResult | BaseException | None) -> list[MoveSample]:
    """The timeline's marks of one cutover attempt: when it froze the old owner, and how it
    ended (committed with its pause, undone, failed), or how the catalog settled it."""
    direction = run.inp.direction.value
    out: list[MoveSample] = []

    def add(name: MarkName, at: datetime, value: float | None = None,
            detail: str | None = None) -> None:
        out.append(MoveSample(at=at, kind=SampleKind.MARK, name=name, value=value,
                              detail=None if detail is None else detail[:500]))

    if run.froze_at is not None:
        add(MarkName.CUTOVER_START, run.froze_at, detail=direction)
    if isinstance(outcome, CutoverResult):
        if outcome.committed and run.froze_at is not None:
            pause = outcome.pause_ms or 0.0
            add(MarkName.CUTOVER_COMMIT, run.froze_at + timedelta(milliseconds=pause),
                value=outcome.pause_ms, detail=direction + pause_breakdown(outcome.steps))
        elif run.froze_at is not None:
            add(MarkName.CUTOVER_UNDONE, utcnow(), detail=f"{direction}: {outcome.reason}")
        elif outcome.reason and outcome.reason.startswith(("recovered", "the switch did not")):
            add(MarkName.CUTOVER_RESOLVED, utcnow(), value=outcome.pause_ms,
                detail=f"{direction}: {'committed' if outcome.committed else 'not committed'}"
                       f" ({outcome.reason})")
    elif isinstance(outcome, BaseException) and run.froze_at is not None:
        add(MarkName.CUTOVER_FAILED, utcnow(),
            detail=f"{direction}: {type(outcome).__name__}: {outcome}")
    return out


def _observed(result: CutoverResult, inp: CutoverInput) -> CutoverResult:
    """Record a committed cutover's pause (once per activity that reports the commit)."""
    if result.committed and result.pause_ms is not None:
        metrics.cutover_pause.record(result.pause_ms / 1000.0, {
            "collection": inp.spec.collection, "direction": inp.direction.value})
        metrics.log.info("cutover (%s) committed: %s owns chunk %d, writes paused %.1f ms",
                         inp.direction.value, result.new_owner, inp.spec.chunk_id,
                         result.pause_ms)
    return result
