"""Fixtures shared by every test package."""

from __future__ import annotations

import os
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


@pytest.fixture(autouse=True, scope="session")
def _umask_022() -> Iterator[None]:
    """Files the tests write by hand get mode 0644 whatever the shell's umask: under
    Ubuntu's 002 they would be group-writable, which config.toml (rightly) refuses. What
    the code itself writes does not depend on it (init makes its files 0600 regardless)."""
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture(autouse=True)
def _nodeclient_logging_restored() -> Iterator[None]:
    """A command run in-process (``main(["run", ...])``, ``serve``) routes the nodeclient
    loggers to the stderr pytest captured for that test, and binds node_id for the rest
    of the context: both are undone after every test, so that a later test never logs to
    a closed capture (a "Logging error" on every event) or under another node's id."""
    import logging

    from nodeclient import logs

    root = logging.getLogger("nodeclient")
    saved = (root.handlers[:], root.level, root.propagate)
    token = logs._CONTEXT.set(dict(logs._CONTEXT.get()))
    yield
    logs._CONTEXT.reset(token)
    root.handlers[:], root.level, root.propagate = saved


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What the code under test fsyncs, in order: the path of each descriptor given to
    os.fsync (which still runs)."""
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced
