"""Shard-test fixtures: a staging directory of the test's own."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from shards.staging import Staging
from tests.conftest import owned_state_dir


@pytest.fixture
def staging() -> Iterator[Staging]:
    path = owned_state_dir("staging")
    yield Staging(path)
    shutil.rmtree(path, ignore_errors=True)
