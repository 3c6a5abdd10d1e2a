"""Test hook: make an activity fail for good at a named point (failure-path tests only).

A failure that outlasts every retry is hard to produce on time with real servers alone (the
catalog would have to stay down for exactly the right minutes). The failure-path tests
therefore name the point and the collection in the worker's environment:

    SHARDSHIFT_TEST_FAULTS="cutover.after_switch@c12_moves*1,cleanup.start@c12_moves*3"

Each entry is ``point@name`` with an optional ``*times`` (default: every time); the activity
reaching that point for a collection or migration id containing ``name`` raises a non-retryable
``ApplicationError`` (type ``InjectedFault``), exactly what an activity that exhausted its
attempts looks like to the workflow. Counts are per worker process. Unset (always, outside
tests), this costs one environment lookup.

Points: ``cutover.after_switch`` (the catalog switch committed, the activity has not yet
returned), ``cleanup.start``, ``finish.start``, ``set_phase.<phase>`` (matched against the
migration id, which contains the workflow id).
"""

from __future__ import annotations

import os
from collections import Counter

from temporalio.exceptions import ApplicationError

ENV = "SHARDSHIFT_TEST_FAULTS"
_fired: Counter[tuple[str, str]] = Counter()


def inject(point: str, subject: str) -> None:
    """Raise the fault configured for ``point`` and ``subject`` (a collection or a migration
    id), if any is left."""
    raw = os.environ.get(ENV)
    if not raw:
        return
    for item in raw.split(","):
        name, _, rest = item.strip().partition("@")
        text, _, times = rest.partition("*")
        if name != point or not text or text not in subject:
            continue
        key = (point, text)
        if times and _fired[key] >= int(times):
            return
        _fired[key] += 1
        raise ApplicationError(
            f"injected fault at {point} (test hook {ENV}, #{_fired[key]})",
            type="InjectedFault", non_retryable=True,
        )
