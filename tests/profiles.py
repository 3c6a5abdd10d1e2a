"""How hard the property and fuzz tests search: a hypothesis profile chosen by an environment
variable, shared by every test that generates examples."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

PROFILE = os.environ.get("SHARDSHIFT_HYPOTHESIS_PROFILE", "suite")
"""``suite`` (the default): derandomized, the same examples every run, counts that keep the
suite short. ``nightly``: random examples, many more of them (a long CI job or a bench run:
``SHARDSHIFT_HYPOTHESIS_PROFILE=nightly ./dev test tests/properties``)."""
if PROFILE not in ("suite", "nightly"):
    raise pytest.UsageError(f"SHARDSHIFT_HYPOTHESIS_PROFILE={PROFILE!r}: use suite or nightly")
settings.register_profile("suite", derandomize=True, database=None, deadline=None)
settings.register_profile("nightly", deadline=None)
PARENT = settings.get_profile(PROFILE)
"""The settings every property and fuzz test starts from (``settings(PARENT, ...)``)."""


def examples(suite: int, nightly: int) -> int:
    """How many examples a test runs: ``suite`` in the suite, ``nightly`` in the nightly profile."""
    return nightly if PROFILE == "nightly" else suite
