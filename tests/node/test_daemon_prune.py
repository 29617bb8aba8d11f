"""The daemon's retention loop: no error ends it, a damaged row does not stop it, and a
stop ends a long prune within one batch. The same for its status and metrics loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

from nodeclient.node.daemon import NodeDaemon
from nodeclient.node.outbox import Outbox, Retention
from tests.node.test_daemon_outbox import make_daemon
from tests.node.test_outbox import commit, damage
from tests.node.test_outbox_prune import fill_due, held_in_db


@contextlib.contextmanager
def logged() -> Iterator[list[logging.LogRecord]]:
    """The daemon's log records, warnings and above, while the block runs."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("nodeclient.node")
    logger.addHandler(handler)  # the project's logging may not propagate to pytest's
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def daemon_with(home: Path, box: Outbox, retention: Retention) -> NodeDaemon:
    daemon, _, _ = make_daemon(home)
    daemon.outbox.close()
    daemon.outbox = box
    daemon.retention = retention
    return daemon


async def until(done: threading.Event, task: asyncio.Task[None]) -> None:
    """Until *done* is set or *task* ends (which it must not)."""
    while not done.is_set() and not task.done():
        await asyncio.sleep(0.005)


class FailsOnce(Outbox):
    """An outbox whose first prune fails on an error no check foresaw (a bug)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.calls = 0
        self.again = threading.Event()

    def prune(self, **kwargs: object) -> int:  # type: ignore[override]
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("a bug")
        self.again.set()
        return super().prune(**kwargs)  # type: ignore[arg-type]


def test_an_unexpected_error_is_logged_and_pruning_goes_on(tmp_path: Path) -> None:
    """The loop caught OSError and sqlite3.Error only: anything else ended its task
    silently and retention stopped until the next start. Now it is logged as
    outbox.prune_failed with its traceback, and the next round runs at the interval."""
    home = tmp_path / "home"
    home.mkdir()
    box = FailsOnce(home / "o2.db")
    daemon = daemon_with(home, box, Retention(every=0.01))

    async def scenario() -> None:
        task = asyncio.create_task(daemon._prune_results())
        await until(box.again, task)
        assert not task.done(), task.exception()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    with logged() as records:
        asyncio.run(scenario())
    failed = [r for r in records if r.getMessage() == "outbox.prune_failed"]
    assert len(failed) == 1 and failed[0].exc_info is not None
    assert failed[0].__dict__["error"] == "RuntimeError: a bug"
    box.close()


def test_a_damaged_row_is_logged_and_the_others_are_pruned(tmp_path: Path) -> None:
    """One row whose acked_at is not a number (damaged on disk, or edited by hand) made
    every prune raise TypeError, which ended the loop: nothing was pruned again, at
    this start or any later one. Now the others are pruned, the damaged row is left and
    named in outbox.rows_damaged, and the loop goes on."""
    home = tmp_path / "home"
    home.mkdir()
    path = home / "o2.db"
    box = Outbox(path)
    rows = [uuid.uuid4() for _ in range(3)]
    for i, t in enumerate(rows):
        commit(box, t, b"r" * 10)
        box.mark_acked(t, status="accepted", reason="", at=10.0 + i)
    box.close()
    damage(path, rows[1], "acked_at", "garbage")
    ran_twice = threading.Event()

    class Counting(Outbox):
        calls = 0

        def prune(self, **kwargs: object) -> int:  # type: ignore[override]
            Counting.calls += 1
            if Counting.calls == 2:
                ran_twice.set()
            return super().prune(**kwargs)  # type: ignore[arg-type]

    box = Counting(path)
    daemon = daemon_with(home, box, Retention(seconds=1.0, every=0.01))

    async def scenario() -> None:
        task = asyncio.create_task(daemon._prune_results())
        await until(ran_twice, task)
        assert not task.done(), task.exception()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    with logged() as records:
        asyncio.run(scenario())
    assert [r.getMessage() for r in records if r.getMessage() == "outbox.prune_failed"] == []
    named = [r for r in records if r.getMessage() == "outbox.rows_damaged"]
    assert named and named[0].__dict__["rows"] == 1
    assert str(rows[1]) in named[0].__dict__["damaged"][0]
    assert held_in_db(path)[0] == 1  # the damaged one only
    box.close()


def test_a_stop_during_a_long_prune_ends_it_within_a_batch(tmp_path: Path) -> None:
    """prune ran in a thread over every due batch; cancelling its await did not stop the
    thread, and asyncio.run waits for it, so a prune of many rows (the first start after
    retention was lowered) held the exit past systemd's stop timeout. Now a cancelled
    prune task ends once its thread has, after the batch it was in; the outbox is whole,
    and the next prune drops the rest."""
    home = tmp_path / "home"
    home.mkdir()
    path = home / "o2.db"
    n = 20_000
    fill_due(path, n)
    box = Outbox(path)
    daemon = daemon_with(home, box, Retention(seconds=1.0))

    async def scenario() -> None:
        task = asyncio.create_task(daemon._prune_results())
        while box.held_bytes() == n * 100 and not task.done():  # until a first batch is done
            await asyncio.sleep(0.001)
        task.cancel()  # as daemon.run does at a stop
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())  # returns once the default executor's threads have ended
    left, size, stored = held_in_db(path)
    assert 0 < left < n  # not every batch: the stop ended it
    assert size == box.held_bytes() == left * 100 and stored == left
    assert box.prune(acked_before=1e12, keep_bytes=0) == left
    assert held_in_db(path) == (0, 0, 0)
    box.close()


def test_a_damaged_coordinator_id_does_not_stop_status_or_the_metrics_loop(
    tmp_path: Path,
) -> None:
    """An unacknowledged row whose coordinator_id is a BLOB (bit rot, a hand edit) made
    status() raise while sorting the backlog by coordinator: `nodeclient status` failed,
    and the metrics loop ended at once, unlogged, its gauges frozen. Now the id is shown
    as text, and an error in a refresh is logged once while the loop goes on."""
    path = tmp_path / "o.db"
    box = Outbox(path)
    good, bad = uuid.uuid4(), uuid.uuid4()
    for task in (good, bad):
        commit(box, task, b"r")
    box.close()
    damage(path, good, "coordinator_id", "coordinator-a")
    damage(path, bad, "coordinator_id", b"\x00\xff")
    home = tmp_path / "home"
    home.mkdir()
    daemon = daemon_with(home, Outbox(path), Retention())
    shown = daemon.status()["outbox_backlog_by_coordinator"]
    assert shown == [
        {"coordinator_id": "b'\\x00\\xff'", "results": 1},
        {"coordinator_id": "coordinator-a", "results": 1},
    ]
    calls = 0

    def status() -> dict[str, object]:
        nonlocal calls
        calls += 1
        raise RuntimeError("a bug")

    daemon.status = status  # type: ignore[method-assign]

    async def main() -> None:
        refresh = asyncio.ensure_future(daemon._refresh_metrics())
        await asyncio.sleep(2.3)
        assert not refresh.done()
        refresh.cancel()

    with logged() as records:
        asyncio.run(main())
    daemon.outbox.close()
    assert calls == 3
    assert [r.getMessage() for r in records] == ["metrics.refresh_failed"]
