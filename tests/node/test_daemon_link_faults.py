"""The node's link through faults of its own side: a failing outbox read or a broken
heartbeat, and a long backlog resent while the coordinator's frames keep coming."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from nodeclient.node import link as link_module
from nodeclient.node.dispatch import RunningTask
from nodeclient.protocol import messages
from tests.node.test_daemon_link import Events, Waits, linked_daemon

pytest_plugins = ["tests.node.test_daemon_link"]  # its fixtures: events, waits


def _link_to(daemon: Any, handler: Any, *, timeout: float) -> None:
    """Run the daemon's link loop against *handler*, a coordinator on its port."""

    async def main() -> None:
        port = int(daemon.url.rsplit(":", 1)[1])
        async with serve(handler, "127.0.0.1", port):
            await asyncio.wait_for(daemon._link_loop(), timeout=timeout)

    asyncio.run(main())


def _fails_on_second_call(real: Any, error: Exception) -> Any:
    """*real*, but raising *error* on its second call."""
    calls: list[int] = []

    def wrapped(**kw: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise error
        return real(**kw)

    return wrapped


async def _handshake(ws: ServerConnection, node_id: str) -> None:
    challenge = messages.Challenge("coordinator-test", os.urandom(32), 31337, 30.0)
    await ws.send(json.dumps(challenge.to_wire()))
    await ws.recv()
    await ws.send(json.dumps(messages.Welcome(node_id, 0, None).to_wire()))


def test_heartbeats_go_on_when_the_outbox_cannot_say_what_it_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, events: Events
) -> None:
    """Reading the held results fails once (a failing disk): that heartbeat goes out
    without them, said in the log, and the next ones as usual. (Before, the heartbeat
    task ended silently, the link still showed up, and the coordinator marked the node
    offline three intervals later.)"""
    daemon, _, _ = linked_daemon(tmp_path, monkeypatch)
    daemon.heartbeat_interval = 0.05
    flaky = _fails_on_second_call(
        daemon.outbox.pending_ids, sqlite3.OperationalError("disk I/O error")
    )
    monkeypatch.setattr(daemon.outbox, "pending_ids", flaky)
    beats: list[int] = []

    async def handler(ws: ServerConnection) -> None:
        await _handshake(ws, daemon.node_id)
        async for frame in ws:
            if json.loads(frame)["type"] == "heartbeat":
                beats.append(1)
                if len(beats) == 6:
                    daemon.request_stop()
                    await ws.close(1001)

    _link_to(daemon, handler, timeout=20)
    daemon.outbox.close()
    assert len(beats) == 6
    (unread,) = events.named("heartbeat.held_unread")
    assert "disk I/O error" in unread.__dict__["error"]


def test_a_heartbeat_that_fails_closes_the_link_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, events: Events, waits: Waits
) -> None:
    """A heartbeat that raises (a bug) is said, and the link closed (1011) so that a new
    one is made now, whose heartbeats go out."""
    daemon, _, _ = linked_daemon(tmp_path, monkeypatch)
    daemon.heartbeat_interval = 0.05
    broken = _fails_on_second_call(daemon.session.heartbeat, TypeError("a bug in the heartbeat"))
    monkeypatch.setattr(daemon.session, "heartbeat", broken)
    closes: list[tuple[int | None, str | None]] = []

    async def handler(ws: ServerConnection) -> None:
        await _handshake(ws, daemon.node_id)
        beats = 0
        with contextlib.suppress(ConnectionClosed):  # 1011 ends the loop with an error
            async for frame in ws:
                beats += json.loads(frame)["type"] == "heartbeat"
                if len(closes) == 1 and beats == 2:  # the second link beats on
                    daemon.request_stop()
                    await ws.close(1001)
        closes.append((ws.close_code, ws.close_reason))

    _link_to(daemon, handler, timeout=20)
    daemon.outbox.close()
    assert closes[0] == (1011, "heartbeats failed")
    (failed,) = events.named("link.heartbeat_failed")
    assert "a bug in the heartbeat" in str(failed.exc_info[1])


def test_a_long_backlog_is_resent_while_the_coordinators_frames_are_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, waits: Waits
) -> None:
    """40 unacknowledged results go out over a slow uplink (50 ms each) with a keepalive
    of 0.3 s: the acknowledgements and pongs are read meanwhile, so one link sends each
    result once and the backlog empties. (Before, nothing was read until the backlog was
    sent: the node's keepalive closed its own link with 1011, acknowledgements were lost,
    and results went out again.)"""
    monkeypatch.setitem(link_module.LINK_OPTIONS, "ping_interval", 0.3)
    monkeypatch.setitem(link_module.LINK_OPTIONS, "ping_timeout", 0.3)
    daemon, _, _ = linked_daemon(tmp_path, monkeypatch)
    count = 40
    for _ in range(count):
        task = RunningTask(uuid.uuid4(), uuid.uuid4(), "ai.inference", None, time.time())
        daemon._commit(task, b"x" * 1000)
    real = daemon._deliver

    async def slow(entry: Any) -> bool:
        await asyncio.sleep(0.05)
        return await real(entry)

    monkeypatch.setattr(daemon, "_deliver", slow)
    links: list[list[Any]] = []

    async def handler(ws: ServerConnection) -> None:
        got: list[Any] = []
        links.append(got)
        await _handshake(ws, daemon.node_id)
        async for frame in ws:
            sent = json.loads(frame)
            if sent["type"] == "result":
                task_id = uuid.UUID(hex=sent["message"]["task_id"][2:])
                got.append(task_id)
                await ws.send(json.dumps(messages.ResultAck(task_id, "accepted").to_wire()))
                if len(got) == count:
                    await asyncio.sleep(0.5)  # the last acknowledgement is recorded
                    daemon.request_stop()
                    await ws.close(1001)
        got.append(("closed", ws.close_code, ws.close_reason))

    _link_to(daemon, handler, timeout=30)
    assert len(links) == 1, [link[-1] for link in links]
    assert len(set(links[0][:-1])) == len(links[0][:-1]) == count
    assert daemon.outbox.backlog() == 0
    daemon.outbox.close()
