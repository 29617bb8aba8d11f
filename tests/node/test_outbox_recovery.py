"""The daemon's outbox when something is wrong with it: a damaged entry in the backlog is
closed as lost and the link goes on; a result goes only to the coordinator that
dispatched it, however the node links in between.

The coordinator's link endpoint is played by a small websockets server in the test's own
event loop, with the coordinator id each test gives it.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from websockets.asyncio.server import ServerConnection, serve

from nodeclient.node.daemon import NodeDaemon
from nodeclient.node.dispatch import RunningTask
from nodeclient.protocol import messages
from tests.e2e.harness import free_port
from tests.node.test_daemon_link import Events, events, make_daemon, payload_key
from tests.node.test_daemon_outbox import Answers, dispatch

__all__ = ["events"]  # the fixture, used by name

Frames = asyncio.Queue[dict]
Script = Callable[[ServerConnection, Frames], Awaitable[None]]


async def next_frame(frames: Frames) -> dict:
    return await asyncio.wait_for(frames.get(), 10)


async def linked(daemon: NodeDaemon, coordinator_id: str, script: Script) -> list[dict]:
    """One link session with a coordinator named *coordinator_id*: it authenticates the
    node, runs *script* (which sends frames and reads the node's from its queue), and
    closes. Every frame the node sent on it, but its auth and heartbeats."""
    sent: list[dict] = []

    async def handler(ws: ServerConnection) -> None:
        challenge = messages.Challenge(coordinator_id, os.urandom(32), 31337, 30.0)
        await ws.send(json.dumps(challenge.to_wire()))
        assert json.loads(await ws.recv())["type"] == "auth"
        await ws.send(json.dumps(messages.Welcome(daemon.node_id, 0, None).to_wire()))
        frames: Frames = asyncio.Queue()

        async def read() -> None:
            async for raw in ws:
                frame = json.loads(raw)
                if frame["type"] != "heartbeat":
                    sent.append(frame)
                    frames.put_nowait(frame)

        reader = asyncio.create_task(read())
        try:
            await script(ws, frames)
        finally:
            reader.cancel()
        await ws.close(1000, "done")

    port = free_port()
    daemon.url = f"http://127.0.0.1:{port}"
    async with serve(handler, "127.0.0.1", port):
        await asyncio.wait_for(daemon._connect_once(), 20)
    daemon._set_link("down")
    return sent


def of(frames: list[dict]) -> list[tuple[str, str]]:
    return [(f["type"], f["message"]["task_id"]) for f in frames]


def hexed(task_id: uuid.UUID) -> str:
    return "0x" + task_id.hex


def test_a_damaged_backlog_entry_is_closed_as_lost_and_the_link_goes_on(
    tmp_path: Path, events: Events
) -> None:
    """Two unacknowledged entries are damaged on disk: one's message is not JSON, the
    other's is JSON but no Result. Sending the backlog raised on the first, and every
    link ended there, before reading a frame: no result delivered, no work taken, for
    good. Now each is closed as lost, logged once with its task id, the rest of the
    backlog is sent, and the link takes work; a dispatch of a damaged one is refused,
    signed, never run again."""
    daemon = make_daemon(tmp_path, executor=Answers)
    not_json, not_a_result, fine, new = (uuid.uuid4() for _ in range(4))
    for task_id in (not_json, not_a_result, fine):
        task = RunningTask(task_id, uuid.uuid4(), "ai.inference", None, time.time())
        daemon._commit(task, b"a result")
    db = sqlite3.connect(tmp_path / "outbox.db")
    for task_id, message in ((not_json, "{"), (not_a_result, '{"task_id": "0x00"}')):
        db.execute("UPDATE outbox SET message = ? WHERE task_id = ?", (message, str(task_id)))
    db.commit()
    db.close()

    async def script(ws: ServerConnection, frames: Frames) -> None:
        assert of([await next_frame(frames)]) == [("result", hexed(fine))]
        await ws.send(dispatch(daemon, payload_key(), new))
        assert of([await next_frame(frames)]) == [("result", hexed(new))]
        await ws.send(dispatch(daemon, payload_key(), not_json))
        await next_frame(frames)

    sent = asyncio.run(linked(daemon, "coord-A", script))
    assert of(sent) == [
        ("result", hexed(fine)),
        ("result", hexed(new)),
        ("reject", hexed(not_json)),
    ]
    assert "stored result for the task is damaged" in sent[-1]["message"]["reason"]
    lost = events.named("outbox.result_lost")
    assert [r.__dict__["task_id"] for r in lost] == [str(not_json), str(not_a_result)]
    assert daemon.outbox.backlog() == 2  # fine and new, awaiting their acknowledgements
    assert daemon.outbox.counts()["failed"] == 2
    daemon.outbox.close()


def test_a_result_goes_only_to_the_coordinator_that_dispatched_it(tmp_path: Path) -> None:
    """Coordinator A dispatches a task; the link drops before A acknowledges the result;
    the node links to coordinator B. B got A's result, answered "unknown task", and that
    settled it as failed: lost for A. Now B gets nothing of it (and its answer for the
    task, or its dispatch of it, changes nothing: refused, never run again); status
    shows the result waiting for A; linked to A again, the node sends it, and A's answer
    settles it."""
    daemon = make_daemon(tmp_path, executor=Answers)
    task_id = uuid.uuid4()

    async def at_a(ws: ServerConnection, frames: Frames) -> None:
        await ws.send(dispatch(daemon, payload_key(), task_id))
        await next_frame(frames)  # its result; the link drops before A's answer

    async def at_b(ws: ServerConnection, frames: Frames) -> None:
        unknown = messages.ResultAck(task_id, "rejected", f"unknown task {task_id}")
        await ws.send(json.dumps(unknown.to_wire()))
        await ws.send(dispatch(daemon, payload_key(), task_id))
        await next_frame(frames)
        st = daemon.status()
        assert st["link"]["coordinator_id"] == "coord-B" and st["outbox_backlog"] == 1
        assert st["outbox_backlog_by_coordinator"] == [{"coordinator_id": "coord-A", "results": 1}]

    async def back_at_a(ws: ServerConnection, frames: Frames) -> None:
        await next_frame(frames)
        await ws.send(json.dumps(messages.ResultAck(task_id, "accepted").to_wire()))
        while daemon.outbox.backlog():
            await asyncio.sleep(0.01)

    to_a = asyncio.run(linked(daemon, "coord-A", at_a))
    to_b = asyncio.run(linked(daemon, "coord-B", at_b))
    again = asyncio.run(linked(daemon, "coord-A", back_at_a))
    assert of(to_a) == of(again) == [("result", hexed(task_id))]
    assert of(to_b) == [("reject", hexed(task_id))]
    assert "another coordinator" in to_b[0]["message"]["reason"]
    assert again[0]["result"] == to_a[0]["result"]  # the same signed result, re-sent
    entry = daemon.outbox.get(task_id)
    assert entry is not None and entry.ack_status == "accepted"
    assert entry.coordinator_id == "coord-A"
    assert daemon.status()["completed"] == 1
    daemon.outbox.close()
