"""Results stranded with a coordinator the node no longer links to: after
``abandon_results_after_days`` they are closed as abandoned (Outbox.abandon), leave the
backlog, and their bytes go with the acknowledged results' retention; the daemon's
retention loop does it, only once it knows which coordinator it links to."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from pathlib import Path

import pytest

from nodeclient.errors import UsageError
from nodeclient.node.config import load_config
from nodeclient.node.outbox import INLINE_MAX, Outbox, Retention
from nodeclient.node.outbox_schema import read_history
from tests.node.test_daemon_outbox import WALLET
from tests.node.test_daemon_prune import daemon_with, logged, until

DAY = 86400.0
OLD, NEW = "0x" + "aa" * 20, "0x" + "bb" * 20  # the coordinator left, the one linked now


def record(
    box: Outbox, *, coordinator: str | None, completed_at: float, size: int = 10
) -> uuid.UUID:
    task = uuid.uuid4()
    box.commit_result(
        task_id=task, job_id=uuid.uuid4(), workload_class="ai.inference", slice_index=None,
        kind="result", result=b"r" * size, proof=b"p" * 32, message={"t": task.hex},
        received_at=completed_at - 1, completed_at=completed_at, sign=lambda _m: b"s" * 65,
        coordinator_id=coordinator,
    )  # fmt: skip
    return task


def test_only_old_results_of_another_coordinator_are_abandoned(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    now = time.time()
    stranded = record(box, coordinator=OLD, completed_at=now - 40 * DAY, size=INLINE_MAX + 1)
    recent = record(box, coordinator=OLD, completed_at=now - 1 * DAY)
    linked = record(box, coordinator=NEW, completed_at=now - 40 * DAY)
    legacy = record(box, coordinator=None, completed_at=now - 40 * DAY)  # goes to any
    acked = record(box, coordinator=OLD, completed_at=now - 40 * DAY)
    box.mark_acked(acked, status="accepted", reason="", at=now - 39 * DAY, coordinator_id=OLD)
    (name,) = [p.name for p in box.files.iterdir()]
    failed, held = box.counts()["failed"], box.held_bytes()

    closed = box.abandon(linked=NEW, completed_before=now - 30 * DAY, now=now)

    assert closed == {OLD: 1}
    entry = box.get(stranded)
    assert entry is not None
    assert (entry.ack_status, entry.acked_at) == ("abandoned", now)
    assert entry.ack_reason is not None and OLD in entry.ack_reason and NEW in entry.ack_reason
    for task in (recent, linked, legacy):
        waiting = box.get(task)
        assert waiting is not None and waiting.acked_at is None
    assert box.backlog() == 3
    assert box.waiting() == {OLD: 1, NEW: 1, None: 1}
    assert {e.task_id for e in box.pending(coordinator_id=OLD)} == {recent, legacy}
    assert box.counts()["failed"] == failed + 1  # not credited: counted as failed
    assert box.held_bytes() == held + INLINE_MAX + 1  # now prune's to drop
    assert box.abandon(linked=NEW, completed_before=now - 30 * DAY, now=now) == {}  # once

    # Its bytes go with the acknowledged results' retention; the row stays as history.
    assert box.prune(acked_before=now + 1, keep_bytes=1 << 30) == 2  # it and `acked`
    assert not (box.files / name).exists()
    box.close()
    reopened = Outbox(tmp_path / "o.db")  # the totals read back from the rows agree
    assert reopened.backlog() == 3 and reopened.counts()["failed"] == failed + 1
    reopened.close()
    outcomes = {e.task_id: e.ack_status for e in read_history(tmp_path / "o.db", limit=10)}
    assert outcomes[stranded] == "abandoned" and outcomes[recent] is None


def test_a_row_that_lost_its_task_id_is_closed_once(tmp_path: Path) -> None:
    """A row damaged on disk (its task_id NULL) is closed like the others, and the run
    ends: matched by task_id, it was read again in every batch, never closed, and each
    batch counted it once more, for as long as the daemon ran."""
    box = Outbox(tmp_path / "o.db")
    now = time.time()
    task = record(box, coordinator=OLD, completed_at=now - 40 * DAY)
    box._db.execute("UPDATE outbox SET task_id = NULL WHERE task_id = ?", (str(task),))
    stop = threading.Event()
    threading.Timer(5.0, stop.set).start()  # were it to loop, the test still ends
    try:
        assert box.abandon(linked=NEW, completed_before=now, now=now, stop=stop) == {OLD: 1}
    finally:
        stop.set()
    assert (box.backlog(), box.counts()["failed"]) == (0, 1)
    box.close()
    reopened = Outbox(tmp_path / "o.db")
    assert (reopened.backlog(), reopened.counts()["failed"]) == (0, 1)
    reopened.close()


def test_a_redispatch_after_its_bytes_are_gone_is_refused_saying_why(tmp_path: Path) -> None:
    from nodeclient.node.dispatch import _pruned_reason

    box = Outbox(tmp_path / "o.db")
    now = time.time()
    task = record(box, coordinator=OLD, completed_at=now - 40 * DAY)
    box.abandon(linked=NEW, completed_before=now, now=now)
    box.prune(acked_before=now + 1, keep_bytes=0)
    entry = box.get(task)
    assert entry is not None and not entry.held
    reason = _pruned_reason(entry)
    assert "never acknowledged" in reason and "not run again" in reason
    assert "acknowledged (" not in reason  # it was not
    box.close()


def test_a_stop_ends_abandoning_between_batches(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    now = time.time()
    for _ in range(3):
        record(box, coordinator=OLD, completed_at=now - 40 * DAY)
    stop = threading.Event()
    stop.set()
    assert box.abandon(linked=NEW, completed_before=now, now=now, stop=stop) == {}
    assert box.backlog() == 3


def test_the_daemon_abandons_them_once_linked_to_another_coordinator(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    box = Outbox(home / "o2.db")
    now = time.time()
    stranded = record(box, coordinator=OLD, completed_at=now - 31 * DAY)
    daemon = daemon_with(home, box, Retention(every=0.01, abandon_seconds=30 * DAY))

    async def one_round() -> None:
        daemon._prune_stop.clear()  # set by the last round's cancel, as by a stop
        task = asyncio.create_task(daemon._prune_results())
        await asyncio.sleep(0.1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    with logged() as records:
        asyncio.run(one_round())  # linked to none yet: which one is "another" is unknown
        assert box.backlog() == 1 and not records
        daemon.session.coordinator_id = OLD
        asyncio.run(one_round())  # linked to its own: it is sent on this link
        assert box.backlog() == 1 and not records
        daemon.session.coordinator_id = NEW
        asyncio.run(one_round())
    assert box.backlog() == 0
    entry = box.get(stranded)
    assert entry is not None and entry.ack_status == "abandoned"
    (line,) = [r for r in records if r.getMessage() == "outbox.results_abandoned"]
    assert (line.results, line.coordinator_id, line.linked_coordinator_id) == (1, OLD, NEW)  # type: ignore[attr-defined]
    assert daemon.status()["outbox_backlog"] == 0


def test_zero_keeps_them_for_ever(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    box = Outbox(home / "o2.db")
    record(box, coordinator=OLD, completed_at=time.time() - 3650 * DAY)
    daemon = daemon_with(home, box, Retention(every=0.01, abandon_seconds=0))
    daemon.session.coordinator_id = NEW
    pruned = threading.Event()
    real = box.prune

    def prune(**kwargs: object) -> int:
        pruned.set()
        return real(**kwargs)  # type: ignore[arg-type]

    box.prune = prune  # type: ignore[method-assign]

    async def one_round() -> None:
        task = asyncio.create_task(daemon._prune_results())
        await until(pruned, task)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(one_round())
    assert box.backlog() == 1


def test_the_setting_is_read_and_checked(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(WALLET)
    assert load_config(tmp_path).abandon_results_after_days == 30.0
    (tmp_path / "config.toml").write_text(WALLET + "abandon_results_after_days = 0\n")
    assert load_config(tmp_path).abandon_results_after_days == 0
    for bad in ("-1", "nan", "true", "36501", '"30"'):
        (tmp_path / "config.toml").write_text(WALLET + f"abandon_results_after_days = {bad}\n")
        with pytest.raises(UsageError, match="abandon_results_after_days"):
            load_config(tmp_path)


def test_its_coordinator_may_still_acknowledge_it(tmp_path: Path) -> None:
    """The coordinator came back and dispatched the task again (the daemon re-sent the
    stored result): its acknowledgement replaces 'abandoned', and the totals follow."""
    box = Outbox(tmp_path / "o.db")
    now = time.time()
    stranded = record(box, coordinator=OLD, completed_at=now - 40 * DAY)
    assert box.abandon(linked=NEW, completed_before=now - 30 * DAY, now=now) == {OLD: 1}
    before = box.counts()
    held = box.held_bytes()
    box.mark_acked(stranded, status="rejected", reason="x", at=now + 1, coordinator_id=NEW)
    entry = box.get(stranded)
    assert entry is not None and entry.ack_status == "abandoned"  # not NEW's to answer
    box.mark_acked(stranded, status="accepted", reason="", at=now + 2, coordinator_id=OLD)
    entry = box.get(stranded)
    assert entry is not None and (entry.ack_status, entry.acked_at) == ("accepted", now + 2)
    after = box.counts()
    assert (after["completed"], after["failed"]) == (before["completed"] + 1, before["failed"] - 1)
    assert after["unacknowledged"] == before["unacknowledged"] == 0
    assert box.held_bytes() == held  # counted once, when it was closed
    box.close()
    reopened = Outbox(tmp_path / "o.db")  # the totals read back from the rows agree
    assert reopened.counts() == after
    reopened.close()
