"""Interleavings forced at one loop turn: a cancel or a stop that arrives in the same turn
as the frame an await was waiting for must not be lost (Python 3.11's asyncio.wait_for
drops such a cancel; the daemon uses asyncio.timeout instead)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from nodeclient.node import slots
from nodeclient.node.executor import Executor
from nodeclient.protocol import messages
from tests.e2e.harness import free_port
from tests.node.test_daemon_link import make_daemon, payload_key
from tests.node.test_daemon_outbox import Capture, dispatch


@pytest.mark.parametrize("interruption", ["cancel", "abandon", "hand-back"])
def test_a_task_ended_as_its_worker_starts_is_never_signed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, interruption: str
) -> None:
    """The coordinator's Cancel, a replaced link (the tasks abandoned) or the end of the
    SIGTERM grace (the tasks handed back) handled in the loop turn right after the fresh
    worker's ready frame was read: the task stops there, and nothing is signed or sent
    for it but the hand-back's reject."""
    task_id = uuid.uuid4()

    async def run_on(self: Executor, *args: Any, **kwargs: Any) -> bytes:
        await asyncio.sleep(0.2)  # the worker's run, not under test
        return b"a result"

    monkeypatch.setattr(Executor, "_run_on", run_on)
    real_read = slots.Slot._read

    async def main() -> None:
        daemon = make_daemon(tmp_path, executor=Executor)  # real workers, unsandboxed
        link = Capture()
        daemon._ws = link  # type: ignore[assignment]
        await daemon.executor.warm_up()
        (slot,) = daemon.executor._slots
        slot.kill("test: the next task needs a fresh worker")
        await slot.reap()

        async def read(self: slots.Slot) -> Any:
            frame = await real_read(self)
            if frame is not None and frame.header.get("op") == "ready" and daemon.running:
                loop = asyncio.get_running_loop()
                if interruption == "cancel":
                    raw = json.dumps(messages.Cancel(task_id, "job cancelled").to_wire())
                    loop.call_soon(lambda: asyncio.ensure_future(daemon._on_frame(raw)))
                elif interruption == "abandon":
                    loop.call_soon(daemon._abandon_running)
                else:
                    loop.call_soon(lambda: asyncio.ensure_future(daemon._hand_back()))
            return frame

        monkeypatch.setattr(slots.Slot, "_read", read)
        try:
            await daemon._on_frame(dispatch(daemon, payload_key(), task_id))
            handle = daemon.running[task_id].handle
            assert handle is not None
            await asyncio.wait([handle], timeout=20)
            await asyncio.sleep(0.3)  # a result, had one been signed, would be sent by now
            assert handle.done()
            sent = [frame["type"] for frame in link.frames]
            assert "result" not in sent, link.frames
            assert sent == (["reject"] if interruption == "hand-back" else []), sent
            assert daemon.outbox.get(task_id) is None  # nothing recorded, nothing signed
        finally:
            await daemon.executor.aclose()
            daemon.outbox.close()

    asyncio.run(main())


def test_a_stop_while_the_link_authenticates_ends_the_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM two loop turns before the welcome frame is in: the link task, cancelled by
    the stop, does not live on as an authenticated link, and run() returns 0."""
    real_client = httpx.AsyncClient
    transport = httpx.MockTransport(
        lambda r: httpx.Response(
            201, json={"status": "registered", "coordinator_id": "coordinator-test"}
        )
    )
    monkeypatch.setattr(httpx, "AsyncClient", lambda **kw: real_client(transport=transport, **kw))
    daemon = make_daemon(tmp_path, url=f"http://127.0.0.1:{free_port()}")
    daemon.heartbeat_interval = 0.5
    real_recv = ClientConnection.recv

    async def recv(self: ClientConnection, *args: Any, **kwargs: Any) -> Any:
        frame = await real_recv(self, *args, **kwargs)
        if json.loads(frame)["type"] == "welcome":
            daemon.request_stop()
            for _ in range(2):
                await asyncio.sleep(0)
        return frame

    monkeypatch.setattr(ClientConnection, "recv", recv)

    async def coordinator(ws: ServerConnection) -> None:
        challenge = messages.Challenge("coordinator-test", os.urandom(32), 31337, 0.5)
        await ws.send(json.dumps(challenge.to_wire()))
        await ws.recv()
        await ws.send(json.dumps(messages.Welcome(daemon.node_id, 0, None).to_wire()))
        with contextlib.suppress(ConnectionClosed):
            async for _ in ws:
                pass

    async def main() -> int:
        port = int(daemon.url.rsplit(":", 1)[1])
        async with serve(coordinator, "127.0.0.1", port):
            run = asyncio.ensure_future(daemon.run())
            done, _ = await asyncio.wait([run], timeout=20)
            if not done:  # the bug: the link lives on; end it so the test can report
                run.cancel()
                with contextlib.suppress(BaseException):
                    await run
                pytest.fail(f"run() still going 20 s after the stop; link {daemon.link.status}")
            return run.result()

    assert asyncio.run(main()) == 0


class _OneSecond(Executor):
    async def warm_up(self) -> None:
        return None

    async def run(self, *args: Any, **kwargs: Any) -> bytes:
        await asyncio.sleep(1.0)
        return b"a result"


def test_the_drain_links_again_to_send_what_the_grace_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM, then the link drops (a coordinator restarting) before the running task
    finishes within the grace: the drain links again and sends the task's signed result
    there, rather than leaving it in the outbox of a node that may never start again."""
    from nodeclient.node import link as link_module

    real_client = httpx.AsyncClient
    transport = httpx.MockTransport(
        lambda r: httpx.Response(
            201, json={"status": "registered", "coordinator_id": "coordinator-test"}
        )
    )
    monkeypatch.setattr(httpx, "AsyncClient", lambda **kw: real_client(transport=transport, **kw))
    monkeypatch.setattr(link_module, "backoff", lambda rand: iter(lambda: 0.2, None))
    daemon = make_daemon(tmp_path, url=f"http://127.0.0.1:{free_port()}", executor=_OneSecond)
    daemon.shutdown_grace = 5.0
    task_id = uuid.uuid4()
    links: list[list[str]] = []

    async def coordinator(ws: ServerConnection) -> None:
        frames: list[str] = []
        links.append(frames)
        challenge = messages.Challenge("coordinator-test", os.urandom(32), 31337, 30.0)
        await ws.send(json.dumps(challenge.to_wire()))
        assert json.loads(await ws.recv())["type"] == "auth"
        await ws.send(json.dumps(messages.Welcome(daemon.node_id, 0, None).to_wire()))
        if len(links) == 1:
            await ws.send(dispatch(daemon, payload_key(), task_id))
            await asyncio.sleep(0.1)
            daemon.request_stop()  # SIGTERM
            await asyncio.sleep(0.1)
            await ws.close(1012, "coordinator restarting")
            return
        with contextlib.suppress(ConnectionClosed):
            async for raw in ws:
                frame = json.loads(raw)
                frames.append(frame["type"])
                if frame["type"] == "result":
                    ack = messages.ResultAck(task_id, "accepted", "")
                    await ws.send(json.dumps(ack.to_wire()))

    async def main() -> int:
        async with serve(coordinator, "127.0.0.1", int(daemon.url.rsplit(":", 1)[1])):
            return await asyncio.wait_for(daemon.run(), 60)

    assert asyncio.run(main()) == 0
    assert len(links) >= 2 and any("result" in frames for frames in links[1:]), links
    assert daemon.outbox.backlog() == 0


class _Quick(Executor):
    async def warm_up(self) -> None:
        return None

    async def run(self, *args: Any, **kwargs: Any) -> bytes:
        return b"a result"


def test_a_replaced_daemon_stopped_in_its_pause_does_not_link_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process with this node's keys took the link (4004) while a result was
    unacknowledged, and the operator stops this daemon during its pause: the drain does
    not link again to deliver it, which would take the link back from the other process
    (whose running tasks would then be abandoned). The result waits in the outbox."""
    real_client = httpx.AsyncClient
    transport = httpx.MockTransport(
        lambda r: httpx.Response(
            201, json={"status": "registered", "coordinator_id": "coordinator-test"}
        )
    )
    monkeypatch.setattr(httpx, "AsyncClient", lambda **kw: real_client(transport=transport, **kw))
    daemon = make_daemon(tmp_path, url=f"http://127.0.0.1:{free_port()}", executor=_Quick)
    task_id = uuid.uuid4()
    links: list[int] = []

    async def coordinator(ws: ServerConnection) -> None:
        links.append(len(links))
        challenge = messages.Challenge("coordinator-test", os.urandom(32), 31337, 30.0)
        await ws.send(json.dumps(challenge.to_wire()))
        await ws.recv()
        await ws.send(json.dumps(messages.Welcome(daemon.node_id, 0, None).to_wire()))
        if len(links) == 1:
            await ws.send(dispatch(daemon, payload_key(), task_id))
            with contextlib.suppress(ConnectionClosed):  # the result, not acknowledged
                while json.loads(await ws.recv())["type"] != "result":
                    pass
            await ws.close(4004, "replaced by a newer link")
            return
        with contextlib.suppress(ConnectionClosed):
            async for _ in ws:
                pass

    async def main() -> int:
        async with serve(coordinator, "127.0.0.1", int(daemon.url.rsplit(":", 1)[1])):
            run = asyncio.ensure_future(daemon.run())
            while daemon._replaced_at is None:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # inside the pause after a replaced link
            daemon.request_stop()
            return await asyncio.wait_for(run, 30)

    assert asyncio.run(main()) == 0
    assert len(links) == 1, f"the stopped, replaced daemon linked again ({len(links)} links)"
    assert daemon.outbox.backlog() == 1


class _OneQuickOneEndless(Executor):
    """The first task ends at once; any other runs until it is cancelled."""

    first: uuid.UUID

    async def warm_up(self) -> None:
        return None

    async def run(self, *args: Any, task_id: uuid.UUID, **kwargs: Any) -> bytes:
        if task_id == self.first:
            await asyncio.sleep(0.2)  # ends within the grace, its commit past it
            return b"a result"
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


def _stopped_with_two_tasks(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    link: Capture,
    commit: Callable[[Callable[..., Any]], Callable[..., Any]],
) -> tuple[list[tuple[str, str]], uuid.UUID, uuid.UUID]:
    """A 2-slot daemon on *link*, its commit replaced by ``commit(real_commit)``, given two
    tasks: one that ends within the grace (0.3 s), one that runs until it is handed back.
    SIGTERM, then the drain: the (type, task_id) of the frames sent by the time the drain
    ends, and the two tasks' ids (quick, endless)."""
    from nodeclient.node import daemon as daemon_module

    monkeypatch.setattr(daemon_module, "DRAIN_FLUSH_S", 3.0)
    quick, endless = uuid.uuid4(), uuid.uuid4()
    _OneQuickOneEndless.first = quick
    daemon = make_daemon(tmp_path, executor=_OneQuickOneEndless)
    daemon.slots = 2
    daemon.shutdown_grace = 0.3
    daemon._ws = link  # type: ignore[assignment]
    monkeypatch.setattr(daemon, "_commit", commit(daemon._commit))

    async def main() -> list[tuple[str, str]]:
        key = payload_key()
        await daemon._on_frame(dispatch(daemon, key, quick))
        await daemon._on_frame(dispatch(daemon, key, endless))
        await asyncio.sleep(0.05)
        daemon.request_stop()
        the_link = asyncio.ensure_future(asyncio.Event().wait())  # the link loop, up
        await daemon._drain(the_link)
        sent = [(f["type"], f["message"]["task_id"]) for f in link.frames]  # as it ends
        the_link.cancel()
        return sent

    return asyncio.run(main()), quick, endless


def test_the_drain_waits_for_a_result_still_being_committed_at_the_hand_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM with two tasks running: one ends within the grace, but its commit (a large
    result's write and fsyncs, in a thread) is still going when the grace ends. The
    other is handed back; the drain then waits for the first one's result and sends it
    before the link goes, rather than leave it to a restart that may never come."""

    def slow(real_commit: Callable[..., Any]) -> Callable[..., Any]:
        def commit(*args: Any, **kwargs: Any) -> Any:
            time.sleep(0.5)
            return real_commit(*args, **kwargs)

        return commit

    sent, quick, endless = _stopped_with_two_tasks(tmp_path, monkeypatch, Capture(), slow)
    assert ("result", "0x" + quick.hex) in sent, sent
    assert ("reject", "0x" + endless.hex) in sent, sent


def test_the_drain_waits_for_the_refusal_of_a_commit_that_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM while a finished task's commit fails (a full disk): its signed refusal is
    no backlog's, so the drain waits for the task until the refusal is sent (on a slow
    link here), rather than end with it unsent and the task left to its lease's end."""

    class SlowRejects(Capture):
        async def send(self, data: str) -> None:
            if json.loads(data)["type"] == "reject":
                await asyncio.sleep(0.3)
            await super().send(data)

    def failing(_real_commit: Callable[..., Any]) -> Callable[..., Any]:
        def commit(*args: Any, **kwargs: Any) -> Any:
            time.sleep(0.5)
            raise OSError(28, "No space left on device")

        return commit

    sent, quick, _ = _stopped_with_two_tasks(tmp_path, monkeypatch, SlowRejects(), failing)
    assert ("reject", "0x" + quick.hex) in sent, sent
