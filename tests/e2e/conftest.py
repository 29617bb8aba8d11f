"""End-to-end fixtures: no test leaves coordinator or node processes running."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.harness import reap_all


@pytest.fixture(autouse=True)
def _reap_processes() -> Iterator[None]:
    yield
    reap_all()
