"""Fixtures shared by every test package."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest


@pytest.fixture
def stock_recursion_limit() -> Iterator[None]:
    """The interpreter's stock recursion limit, as the node and coordinator processes keep
    it. eth-account (imported by some tests) raises it to 100,000 as it is imported, and at
    that depth a deeply nested JSON document overflows the C stack inside json.loads
    instead of raising RecursionError (see nodeclient.node.keys)."""
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    try:
        yield
    finally:
        sys.setrecursionlimit(before)
