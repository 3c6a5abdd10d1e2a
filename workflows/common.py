"""What the workflows share: search-attribute keys and retry policies, defined once.

Search attributes: the keys every workflow upserts (``ShardshiftPhase`` and the others) are the
ones the local stack registers on the Temporal namespace (``settings.SEARCH_ATTRIBUTES``); a
key not registered there fails here, at import, rather than at the first upsert on a server.

Retry policies: the values each workflow used before they moved here, unchanged (a policy is
part of the command that schedules an activity; an identical value from one place schedules
the identical command, so recorded histories replay as before).
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeKey

with workflow.unsafe.imports_passed_through():
    from settings import SEARCH_ATTRIBUTES


def _keyword(name: str) -> SearchAttributeKey[str]:
    if SEARCH_ATTRIBUTES.get(name) != "Keyword":
        raise RuntimeError(f"search attribute {name} is not registered as a Keyword "
                           "(settings.SEARCH_ATTRIBUTES)")
    return SearchAttributeKey.for_keyword(name)


SA_KIND = _keyword("ShardshiftKind")
"""What a workflow does: a move's ``MigrationKind`` (move, merge, upgrade, split), a drain's or
a rebalance's kind."""
SA_COLLECTION = _keyword("ShardshiftCollection")
SA_CHUNK = _keyword("ShardshiftChunk")
SA_SOURCE = _keyword("ShardshiftSource")
"""A move's source shard; a drain's drained shards (comma-separated)."""
SA_TARGET = _keyword("ShardshiftTarget")
SA_PHASE = _keyword("ShardshiftPhase")
"""A move's phase (``registered`` ... ``done``, ``aborted``); a drain's or rebalance's."""

# -- retry policies --------------------------------------------------------------------------

FLEET_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1),
                          maximum_interval=timedelta(seconds=10), maximum_attempts=20)
"""Fleet workflows' activities (plans, re-plans, splits, finishing a drain, waiting for a move
already running): bounded, so a plan that keeps failing fails the drain or rebalance."""

LOGIC_ERRORS = ["TypeError", "AttributeError", "KeyError", "IndexError", "NameError",
                "UnboundLocalError", "AssertionError", "NotImplementedError", "ValidationError"]
"""Errors that are bugs, not weather: retrying them cannot help, so they fail at once."""

MOVE_QUICK = RetryPolicy(initial_interval=timedelta(seconds=1),
                         maximum_interval=timedelta(seconds=10),
                         non_retryable_error_types=LOGIC_ERRORS)
"""A move's quick activities (catalog steps, polls): retried without an attempt limit."""
MOVE_DATA = RetryPolicy(initial_interval=timedelta(seconds=1),
                        maximum_interval=timedelta(seconds=30),
                        non_retryable_error_types=LOGIC_ERRORS)
"""A move's data activities (snapshot, import, verify). No attempt limit: a shard or the
catalog down for longer than any budget is waited for. Errors raised non-retryable (bad
input, a lost slot) still fail the move at once."""
INDEX_DDL_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1),
                              maximum_interval=timedelta(seconds=5), maximum_attempts=5,
                              non_retryable_error_types=LOGIC_ERRORS)
"""An index change (``ChangeIndexesWorkflow``): a client waits for it, so a shard or catalog
that stays down fails it within seconds rather than holding the client."""
PROGRESS = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_attempts=2)
"""Progress samples are best-effort: a failed one is skipped, the next poll tries again."""
FOREVER = RetryPolicy(initial_interval=timedelta(seconds=1),
                      maximum_interval=timedelta(seconds=15))
"""Steps that must happen whatever fails (the applier, steps after the commit point)."""
CUTOVER_RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=200),
                            maximum_interval=timedelta(seconds=5), maximum_attempts=20)
"""The cutover activity: retried fast (a source may be frozen), and bounded: after its
attempts the workflow settles the outcome from the catalog (``migrate.resolve_cutover``)."""
REGISTER_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1),
                             maximum_interval=timedelta(seconds=20))
"""Registering a move (it may wait for a move lease on a busy shard)."""
