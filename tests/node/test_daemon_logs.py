"""The daemon's log events about a task name it by task_id and job_id (docs/operator.md,
Logs), each with its own: an acknowledgement, a cancel, a result sent again with the
backlog, a refusal at a stop, a result the outbox cannot read or gives up as lost. Work
done for no task (the backlog sent again while a dispatch is refused) carries no task's
ids at all.

Events are read as the JSON log formats them, as they are logged: the bound context is
the logging call's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodeclient.logs import JsonFormatter
from nodeclient.node.daemon import NodeDaemon
from nodeclient.node.dispatch import RunningTask
from nodeclient.node.executor import Executor
from nodeclient.node.outbox import INLINE_MAX
from nodeclient.protocol import messages
from tests.node.test_daemon_link import capturing
from tests.node.test_daemon_outbox import Answers, dispatch, make_daemon


class Events(logging.Handler):
    """Every event logged under ``nodeclient``, as the JSON log line reads."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.docs: list[dict[str, Any]] = []
        self.formatter = JsonFormatter()

    def emit(self, record: logging.LogRecord) -> None:
        self.docs.append(json.loads(self.format(record)))

    def named(self, event: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["event"] == event]


@pytest.fixture
def events() -> Iterator[Events]:
    handler = Events()
    with capturing("nodeclient", handler):
        yield handler


class Hangs(Executor):
    """Runs every task until it is cancelled."""

    async def run(self, *args: object, **kwargs: object) -> bytes:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


def commit(daemon: NodeDaemon, size: int = 8) -> RunningTask:
    """A finished task's result in the outbox, unacknowledged."""
    task = RunningTask(uuid.uuid4(), uuid.uuid4(), "ai.inference", None, time.time())
    daemon._commit(task, b"r" * size)
    return task


def ack(task_id: uuid.UUID, of: str, status: str = "accepted") -> str:
    return json.dumps(messages.ResultAck(task_id, status, reason="", of=of).to_wire())


def job_of(frame: str) -> str:
    return str(json.loads(frame)["job_id"])


def test_the_backlog_sent_for_a_refused_dispatch_logs_no_ids_of_it(
    tmp_path: Path, events: Events, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dispatch refused for a full backlog sends the backlog again, in the background:
    each result.sent names its own task and job, not the refused dispatch's; and a
    failure to read the backlog (outbox.pending_failed) names no task at all."""
    daemon, key, _ = make_daemon(tmp_path)
    daemon.retention = dataclasses.replace(daemon.retention, max_unacknowledged=2)
    backlog = {str(t.task_id): str(t.job_id) for t in (commit(daemon), commit(daemon))}
    refused = dispatch(daemon, key, uuid.uuid4())

    async def refuse_and_resend(frame: str) -> None:
        await daemon._on_frame(frame)
        assert daemon._resend is not None
        await daemon._resend

    try:
        asyncio.run(refuse_and_resend(refused))
        (rejected,) = events.named("task.rejected")
        assert "outbox backlog full" in rejected["reason"]
        assert rejected["job_id"] == job_of(refused)
        sent = events.named("result.sent")
        assert {d["task_id"]: d["job_id"] for d in sent} == backlog

        def failing(**_: object) -> Iterator[object]:
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(daemon.outbox, "iter_pending", failing)
        daemon._resent_at = -1e9  # due again
        events.docs.clear()
        refused = dispatch(daemon, key, uuid.uuid4())
        asyncio.run(refuse_and_resend(refused))
        (failed,) = events.named("outbox.pending_failed")
        assert "task_id" not in failed and "job_id" not in failed, failed
    finally:
        daemon.outbox.close()


def test_every_event_about_a_task_names_its_job(tmp_path: Path, events: Events) -> None:
    """A daemon's life in small: results acknowledged (one sent again with the backlog), a
    refusal acknowledged, a task cancelled by the coordinator, one handed back at a stop,
    a result file that cannot be read, then is gone. Every event with a task_id has that
    task's job_id."""
    daemon, key, _ = make_daemon(tmp_path, executor=Answers)
    jobs: dict[str, str] = {}

    async def life() -> None:
        # A result, sent and acknowledged.
        frame = dispatch(daemon, key, task_id := uuid.uuid4())
        jobs[str(task_id)] = job_of(frame)
        await daemon._on_frame(frame)
        while daemon.running:  # its result is committed and sent
            await asyncio.sleep(0.01)
        await daemon._on_frame(ack(task_id, "result"))
        # Results left unacknowledged: sent again with the backlog, then answered.
        waiting = [commit(daemon), commit(daemon, INLINE_MAX + 1)]  # the second, a file
        jobs.update({str(t.task_id): str(t.job_id) for t in waiting})
        await daemon._send_backlog()
        await daemon._on_frame(ack(waiting[0].task_id, "result", "rejected"))
        # A dispatch refused (a class not served), and the refusal acknowledged.
        d = messages.Dispatch.from_wire(json.loads(dispatch(daemon, key, uuid.uuid4())))
        d = dataclasses.replace(d, workload_class="media.render")
        jobs[str(d.task_id)] = str(d.job_id)
        await daemon._on_frame(json.dumps(d.to_wire()))
        await daemon._on_frame(ack(d.task_id, "reject"))
        # Tasks that run until stopped: one cancelled by the coordinator, one handed back.
        daemon.executor = Hangs(slots=2, config=daemon.executor.config, mode=daemon.executor.mode)
        daemon.slots = 2
        for reason in ("lease ended", None):
            frame = dispatch(daemon, key, task_id := uuid.uuid4())
            jobs[str(task_id)] = job_of(frame)
            await daemon._on_frame(frame)
            await asyncio.sleep(0)  # it starts
            if reason is not None:
                await daemon._on_frame(json.dumps(messages.Cancel(task_id, reason).to_wire()))
        await daemon._hand_back()
        # The file result: unreadable (a directory stands in its place), then gone.
        path = next(daemon.outbox.files.glob(f"{waiting[1].task_id}*"))
        path.unlink()
        path.mkdir()
        await daemon._send_backlog()
        path.rmdir()
        await daemon._send_backlog()

    try:
        asyncio.run(life())
    finally:
        daemon.outbox.close()
    about_tasks = [d for d in events.docs if "task_id" in d]
    seen = {d["event"] for d in about_tasks}
    for event in (
        "result.sent", "result.ack", "reject.ack", "task.cancelled", "task.rejected",
        "outbox.result_unreadable", "outbox.result_lost",
    ):  # fmt: skip
        assert event in seen, (event, sorted(seen))
    assert len({d["task_id"] for d in events.named("task.rejected")}) == 2  # the stop's too
    for doc in about_tasks:
        assert doc.get("job_id") == jobs[doc["task_id"]], doc


def test_a_stopped_task_is_logged_once_with_why(tmp_path: Path, events: Events) -> None:
    """A task cancelled by the coordinator (after it started, or in the same loop turn as
    its dispatch, before its first step) and one handed back at a stop each get one
    task.cancelled line, with the reason (the coordinator's, or the stop), task and job."""
    daemon, key, _ = make_daemon(tmp_path, executor=Answers)
    daemon.executor = Hangs(slots=3, config=daemon.executor.config, mode=daemon.executor.mode)
    daemon.slots = 3
    ids: list[tuple[str, str]] = []

    async def life() -> None:
        for reason, started in (("job failed", True), ("lease ended", False), (None, True)):
            frame = dispatch(daemon, key, task_id := uuid.uuid4())
            ids.append((str(task_id), job_of(frame)))
            await daemon._on_frame(frame)
            if started:
                await asyncio.sleep(0)  # it starts
            if reason is not None:
                await daemon._on_frame(json.dumps(messages.Cancel(task_id, reason).to_wire()))
                while task_id in daemon.running:
                    await asyncio.sleep(0.01)
        await daemon._hand_back()

    try:
        asyncio.run(life())
    finally:
        daemon.outbox.close()
    lines = [(d["task_id"], d["job_id"], d["reason"]) for d in events.named("task.cancelled")]
    assert lines == [
        (*ids[0], "job failed"), (*ids[1], "lease ended"), (*ids[2], "node shutting down: handed back")
    ]  # fmt: skip
