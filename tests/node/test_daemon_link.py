"""The daemon's link to the coordinator keeps going whatever goes wrong: an answer that is
not the coordinator's, a bug in handling a frame, a failed acknowledgement write. A task
that fails in an unexpected way still gets a signed reject. Reconnect backoff resets after a
session that was authenticated and stayed up, and only then.

The coordinator's link endpoint is played by a small websockets server in the test's own
event loop; registration goes to an ``httpx.MockTransport``; time is a ManualClock.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import functools
import json
import logging
import os
import signal
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from nodeclient.clock import Clock, ManualClock, SystemClock
from nodeclient.coordinator import registry
from nodeclient.node import control, sandbox
from nodeclient.node import link as link_module
from nodeclient.node.daemon import NodeDaemon
from nodeclient.node.dispatch import RunningTask
from nodeclient.node.executor import Executor, WorkerConfig
from nodeclient.node.outbox import Outbox, Retention
from nodeclient.protocol import manifest as manifest_mod
from nodeclient.protocol import messages
from nodeclient.protocol.secp import Secp256k1Key
from nodeclient.protocol.states import NodeState
from tests.e2e.harness import free_port
from tests.node.conftest import as_sent
from tests.node.test_daemon_outbox import Answers, Capture, dispatch, recover, signed_manifest

# --- helpers ---------------------------------------------------------------------------------


# The reference coordinator's answer to a registration, as these tests' coordinators give it.
REGISTERED = {
    "status": "registered",
    "prior_registrations": [],
    "coordinator_id": "coordinator-test",
}


@functools.cache
def payload_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=3072)


class NoWorkers(Executor):
    """Starts no worker processes; run() is never called."""

    async def warm_up(self) -> None:
        return None

    async def run(self, *args: object, **kwargs: object) -> bytes:
        raise AssertionError("no task runs in this test")


def make_daemon(
    home: Path,
    *,
    url: str = "http://127.0.0.1:9",
    clock: Clock | None = None,
    executor: type[Executor] = NoWorkers,
) -> NodeDaemon:
    node_key, liveness_key = Secp256k1Key.generate(), Secp256k1Key.generate()
    clock = clock if clock is not None else SystemClock()
    return NodeDaemon(
        home=home,
        coordinator_url=url,
        chain_id=31337,
        node_key=node_key,
        liveness_key=liveness_key,
        payload_key=payload_key(),
        manifest=signed_manifest(node_key, liveness_key, payload_key(), issued_at=clock.now()),
        executor=executor(
            slots=1, config=WorkerConfig(cache_dir=home / "models"), mode=sandbox.MODE_UNSANDBOXED
        ),
        outbox=Outbox(home / "outbox.db"),
        clock=clock,
        heartbeat_interval=30.0,
        retention=Retention(seconds=60.0, bytes=1 << 20),
    )


class Events(logging.Handler):
    """Every record the daemon logs, whatever ``logs.configure`` did to propagation."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def named(self, event: str) -> list[logging.LogRecord]:
        return [r for r in self.records if r.getMessage() == event]


@contextlib.contextmanager
def capturing(logger_name: str, handler: logging.Handler) -> Iterator[None]:
    """*handler* on *logger_name* at DEBUG, both as they were afterwards."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture
def events() -> Iterator[Events]:
    handler = Events()
    with capturing("nodeclient.node", handler):
        yield handler


class Waits:
    """Stands in for ``backoff``: records each wait's attempt number since the last reset
    (0 for the first wait of a fresh backoff), and waits no time at all."""

    def __init__(self) -> None:
        self.attempts: list[int] = []

    def __call__(self, *, rand: Callable[[], float]) -> Iterator[float]:
        def delays() -> Iterator[float]:
            attempt = 0
            while True:
                self.attempts.append(attempt)
                attempt += 1
                yield 0.0

        return delays()


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> Waits:
    recorder = Waits()
    monkeypatch.setattr(link_module, "backoff", recorder)
    return recorder


def answer_registration(
    monkeypatch: pytest.MonkeyPatch, handler: Callable[[httpx.Request], httpx.Response]
) -> None:
    """Every ``httpx.AsyncClient`` the daemon makes talks to *handler* instead."""
    real_client = httpx.AsyncClient
    transport = httpx.MockTransport(as_sent(handler))
    monkeypatch.setattr(httpx, "AsyncClient", lambda **kw: real_client(transport=transport, **kw))


def registration_error(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    handler: Callable[[httpx.Request], httpx.Response],
    error: type[Exception] = httpx.HTTPError,
) -> tuple[str, NodeDaemon]:
    """Register a daemon against *handler*, which must make it raise *error*: the error's
    text, and the daemon (its outbox closed)."""
    answer_registration(monkeypatch, handler)
    daemon = make_daemon(tmp_path)
    try:
        with pytest.raises(error) as caught:
            asyncio.run(daemon.register())
    finally:
        daemon.outbox.close()
    return str(caught.value), daemon


@dataclass(frozen=True)
class Session:
    """What the stand-in coordinator does with one connection."""

    authenticate: bool = True
    up_for: float = 0.0  # ManualClock seconds that pass while the session is up
    close: int | None = 1000  # None: drop the TCP connection (the node sees 1006)
    then: Callable[[ServerConnection], Awaitable[None]] | None = None  # before the close
    reason: str | None = None  # the close's reason, if not the test's own


async def run_link(daemon: NodeDaemon, clock: ManualClock, sessions: list[Session]) -> list[str]:
    """Run the daemon's link loop against a coordinator that plays *sessions* in order,
    then stops the daemon on the next connection. Returns the daemon's ``last_error`` as
    each connection came in."""
    plan = iter(sessions)
    last_errors: list[str] = []

    async def handler(ws: ServerConnection) -> None:
        last_errors.append(daemon.link.last_error)
        session = next(plan, None)
        if session is None:  # every session played: the test is over
            daemon.request_stop()
            await ws.close(1001, "going away")
            return
        challenge = messages.Challenge("coordinator-test", os.urandom(32), 31337, 30.0)
        await ws.send(json.dumps(challenge.to_wire()))
        assert json.loads(await ws.recv())["type"] == "auth"
        if session.authenticate:
            welcome = messages.Welcome(daemon.node_id, 0, None)
            await ws.send(json.dumps(welcome.to_wire()))
            # The first heartbeat is sent once the link is up: only then does time pass.
            while json.loads(await ws.recv())["type"] != "heartbeat":
                pass
            clock.advance(session.up_for)
            if session.then is not None:
                await session.then(ws)
        if session.close is None:
            ws.transport.abort()
        else:
            await ws.close(session.close, session.reason or f"closed by the test ({session.close})")

    port = int(daemon.url.rsplit(":", 1)[1])
    async with serve(handler, "127.0.0.1", port):
        await asyncio.wait_for(daemon._link_loop(), timeout=30)
    return last_errors


def linked_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[NodeDaemon, ManualClock, list[httpx.Request]]:
    """A daemon whose coordinator registers it (201) and whose link goes to a free port."""
    registrations: list[httpx.Request] = []

    def register(request: httpx.Request) -> httpx.Response:
        registrations.append(request)
        return httpx.Response(201, json=REGISTERED)

    answer_registration(monkeypatch, register)
    clock = ManualClock()
    daemon = make_daemon(tmp_path, url=f"http://127.0.0.1:{free_port()}", clock=clock)
    return daemon, clock, registrations


# --- registration: an answer that is not the coordinator's is retried ----------------------------


def test_a_registration_answer_is_read_as_sent_and_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The answer is asked for and read without content coding, and at most 1 MiB of it:
    a compressed answer is not inflated (a small one could expand to gigabytes) and an
    endless one is not read to its end; both are retried like any failed registration."""
    import gzip

    asked: list[str | None] = []
    bomb = gzip.compress(gzip.compress(b"[" * (64 << 20)))

    async def endless_chunks() -> AsyncIterator[bytes]:
        for _ in range(10_000):  # 640 MiB, if it were all read
            yield b" " * 65536

    def compressed(request: httpx.Request) -> httpx.Response:
        asked.append(request.headers.get("accept-encoding"))
        headers = {"content-type": "application/json", "content-encoding": "gzip, gzip"}
        return httpx.Response(201, content=bomb, headers=headers)

    def endless(_request: httpx.Request) -> httpx.Response:
        headers = {"content-type": "application/json"}
        return httpx.Response(201, content=endless_chunks(), headers=headers)

    answers = [compressed, endless]
    answer_registration(monkeypatch, lambda request: answers[0](request))  # noqa: PLW0108 (the list changes)
    daemon = make_daemon(tmp_path)
    try:
        with pytest.raises(httpx.HTTPError, match="registration failed: .*Content-Encoding"):
            asyncio.run(daemon.register())
        assert asked == ["identity"]
        answers.pop(0)
        with pytest.raises(httpx.HTTPError, match="registration failed: .*over 1048576 bytes"):
            asyncio.run(daemon.register())
    finally:
        daemon.outbox.close()


@pytest.mark.parametrize("prior", [None, 7, "many", {"n": 1}])
def test_an_odd_field_in_an_accepted_registration_is_no_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prior: object
) -> None:
    """`prior_registrations` is only logged: null or another type in an answer that
    accepted the node must not fail the registration (before, a TypeError made the daemon
    register again and again and never link)."""
    answer_registration(
        monkeypatch,
        lambda _r: httpx.Response(
            201,
            json={"status": "registered", "prior_registrations": prior, "coordinator_id": "c"},
        ),
    )
    daemon = make_daemon(tmp_path)
    try:
        assert asyncio.run(daemon.register())["status"] == "registered"
    finally:
        daemon.outbox.close()


@pytest.mark.parametrize(
    ("status", "content_type", "body"),
    [
        (502, "text/html", b"<html><body><h1>502 Bad Gateway</h1></body></html>"),
        (302, "text/html", b"<html>Moved: <a href='https://login.example'>here</a></html>"),
        (403, "text/html", b"<html>Forbidden by the web application firewall</html>"),
        (200, "application/json", b'["registered"]'),
        (201, "application/octet-stream", b"\xff\xfe\x00garbage"),
    ],
)
def test_a_registration_answer_that_is_not_a_json_object_is_retried(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    status: int,
    content_type: str,
    body: bytes,
) -> None:
    """A proxy's HTML page, a redirect or a JSON array is not the coordinator's answer:
    an httpx.HTTPError (retried with backoff, never the final exit 78) naming the status."""
    text, _ = registration_error(
        tmp_path,
        monkeypatch,
        lambda _request: httpx.Response(
            status, content=body, headers={"content-type": content_type}
        ),
    )
    assert f"registration failed ({status})" in text
    assert "not a JSON object" in text
    assert content_type in text


@pytest.mark.parametrize("coordinator_id", ["c" * 129, 7, ["coord-A"], None, "absent"])
def test_a_registration_answer_naming_no_usable_coordinator_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, coordinator_id: object
) -> None:
    """The answer's coordinator_id is what every challenge must name, so it is held to the
    challenge's rule (a string of at most 128 characters). Before, any string was kept: a
    megabyte one went whole into last_error and the log, and `nodeclient status` broke.
    Now it fails the registration, with a reason of bounded size, and is retried. An
    answer that names none (null, or no such key) fails it too: the coordinator could
    otherwise switch off the challenge check and relay another coordinator's challenge."""
    body: dict[str, object] = {"status": "registered", "coordinator_id": coordinator_id}
    if coordinator_id == "absent":
        del body["coordinator_id"]
    text, daemon = registration_error(
        tmp_path, monkeypatch, lambda _r: httpx.Response(201, json=body)
    )
    why = (
        "missing field 'coordinator_id'"
        if coordinator_id == "absent"
        else "field 'coordinator_id' must be a string of at most 128 chars"
    )
    assert f"registration failed (201): the answer's {why}" in text
    assert "c" * 129 not in text
    assert daemon.session.registered_with is None


def test_a_refusal_with_a_long_reason_is_shown_cut(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A coordinator's refusal text goes into the final error, the log and status: a
    megabyte one is cut to a line, not carried whole."""
    body = {"error": "no " * 300_000}
    text, _ = registration_error(
        tmp_path,
        monkeypatch,
        lambda _r: httpx.Response(403, json=body),
        link_module.RegistrationRefused,
    )
    assert text.startswith("registration refused (403): no no")
    assert len(text) < 400


def test_a_registration_answer_that_never_ends_is_given_up_and_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, waits: Waits
) -> None:
    """httpx's timeout bounds each read, not the answer: a coordinator sending a byte now
    and then held the registration, and the whole link loop, for ever, with nothing in
    last_error. The registration as a whole has a deadline (REGISTER_TIMEOUT_S): past it,
    it fails like any other, shows in last_error, and is tried again after a backoff."""
    monkeypatch.setattr(link_module, "REGISTER_TIMEOUT_S", 0.2)
    daemon = make_daemon(tmp_path)
    asked = 0

    async def trickle() -> AsyncIterator[bytes]:
        yield b" "
        await asyncio.Event().wait()  # the rest never comes

    def register(_request: httpx.Request) -> httpx.Response:
        nonlocal asked
        asked += 1
        if asked == 2:  # tried again: the test is over once this one fails too
            daemon.request_stop()
        return httpx.Response(201, content=trickle(), headers={"content-type": "application/json"})

    answer_registration(monkeypatch, register)
    try:
        asyncio.run(asyncio.wait_for(daemon._link_loop(), 10))
    finally:
        daemon.outbox.close()
    assert asked == 2 and waits.attempts == [0]
    assert "registration failed: no complete answer within" in daemon.link.last_error


# --- the link loop survives the unexpected ----------------------------------------------------


def test_an_unexpected_error_on_the_link_is_logged_and_the_link_reconnects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, waits: Waits, events: Events
) -> None:
    """An error nothing foresaw (a bug) while handling a dispatch escapes the frame
    handler: the link is marked down with the error, logged with its traceback, and
    reconnects after a backoff."""
    daemon, clock, _ = linked_daemon(tmp_path, monkeypatch)

    def broken_get(task_id: uuid.UUID) -> None:
        raise RuntimeError("a bug in the lookup")

    monkeypatch.setattr(daemon.outbox, "get", broken_get)

    async def send_dispatch(ws: ServerConnection) -> None:
        await ws.send(dispatch(daemon, payload_key(), uuid.uuid4()))
        await ws.wait_closed()  # the node closes the link

    last_errors = asyncio.run(run_link(daemon, clock, [Session(then=send_dispatch)]))
    changes = [r.__dict__["link"] for r in events.named("link.status")]
    assert changes == ["connecting", "up", "down", "connecting", "down"]
    assert last_errors == ["", "RuntimeError: a bug in the lookup"]
    assert daemon.link.reconnects == 1 and waits.attempts == [0]
    (record,) = events.named("link.error")
    assert record.levelno == logging.ERROR and record.exc_info is not None


def test_a_backlog_that_cannot_be_read_keeps_the_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, waits: Waits, events: Events
) -> None:
    """The outbox cannot list its unacknowledged results when the link comes up (a
    failing disk): the link stays up; they are sent after a later reconnect. Before, the error ended every link before its first frame was read."""
    daemon, clock, _ = linked_daemon(tmp_path, monkeypatch)

    def broken_pending(**kwargs: object) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(daemon.outbox, "iter_pending", broken_pending)

    async def a_while(ws: ServerConnection) -> None:
        await asyncio.sleep(0.3)
        assert daemon.link.status == "up"

    last_errors = asyncio.run(run_link(daemon, clock, [Session(then=a_while)]))
    assert last_errors == ["", ""]  # the session ended by the test's close, not an error
    (record,) = events.named("outbox.pending_failed")
    assert record.levelno == logging.ERROR and "disk I/O error" in record.__dict__["error"]


def test_a_failed_ack_write_keeps_the_link_and_the_result_is_sent_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, events: Events
) -> None:
    """mark_acked fails (a failing disk): the frame handler logs it and goes on, and the
    result stays unacknowledged, so it is sent again (the coordinator acks it again)."""
    daemon = make_daemon(tmp_path, executor=Answers)
    link = Capture()
    daemon._ws = link  # type: ignore[assignment]
    task_id = uuid.uuid4()
    daemon._commit(RunningTask(task_id, uuid.uuid4(), "ai.inference", None, time.time()), b"r")

    def broken_mark_acked(*args: Any, **kwargs: Any) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(daemon.outbox, "mark_acked", broken_mark_acked)
    ack = json.dumps(messages.ResultAck(task_id, "accepted").to_wire())
    asyncio.run(daemon._on_frame(ack))  # does not raise: the link would end with it

    (record,) = events.named("result.ack_failed")
    assert record.levelno == logging.ERROR and "disk I/O error" in str(record.exc_info)
    assert [e.task_id for e in daemon.outbox.pending()] == [task_id]  # sent on reconnect
    asyncio.run(daemon._on_frame(dispatch(daemon, payload_key(), task_id)))
    assert [f["type"] for f in link.frames] == ["result"]  # re-dispatched: re-sent, not run


def test_an_ack_write_that_fails_once_is_written_on_a_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, events: Events
) -> None:
    """mark_acked fails once ("database is locked"). It was not tried again while the
    link stayed up, so with max_unacknowledged_results reached every dispatch was refused
    until a reconnect. Now it is tried again after a short pause: the result is settled,
    and the next dispatch runs."""
    daemon = make_daemon(tmp_path, executor=Answers)
    daemon.retention = dataclasses.replace(daemon.retention, max_unacknowledged=1)
    link = Capture()
    daemon._ws = link  # type: ignore[assignment]
    first, second = uuid.uuid4(), uuid.uuid4()
    real = daemon.outbox.mark_acked
    failures = [sqlite3.OperationalError("database is locked")]

    def flaky_mark_acked(*args: Any, **kwargs: Any) -> None:
        if failures:
            raise failures.pop()
        real(*args, **kwargs)

    monkeypatch.setattr(daemon.outbox, "mark_acked", flaky_mark_acked)

    async def scenario() -> None:
        await daemon._on_frame(dispatch(daemon, payload_key(), first))
        while daemon.running:
            await asyncio.sleep(0.01)
        await daemon._on_frame(json.dumps(messages.ResultAck(first, "accepted").to_wire()))
        await daemon._on_frame(dispatch(daemon, payload_key(), second))
        while daemon.running:
            await asyncio.sleep(0.01)

    asyncio.run(scenario())
    sent = [(f["type"], f["message"]["task_id"]) for f in link.frames]
    assert sent == [("result", "0x" + first.hex), ("result", "0x" + second.hex)]
    assert failures == [] and events.named("result.ack_failed") == []
    entry = daemon.outbox.get(first)
    assert entry is not None and entry.ack_status == "accepted"
    assert daemon.outbox.backlog() == 1  # the second's, awaiting its answer
    daemon.outbox.close()


def test_the_daemon_exits_non_zero_when_its_link_task_ends(tmp_path: Path, events: Events) -> None:
    """The link task ends without a stop request (a bug): the daemon stops, marks the
    link down and exits 1, so that systemd's Restart=on-failure starts it again."""
    daemon = make_daemon(tmp_path)
    daemon.link.status = "up"

    async def broken_link_loop() -> None:
        raise RuntimeError("a bug in the link loop")

    daemon._link_loop = broken_link_loop  # type: ignore[method-assign]
    status = asyncio.run(asyncio.wait_for(daemon.run(), timeout=20))

    assert status == 1
    assert daemon.link.status == "down"
    assert daemon.link.last_error == "RuntimeError: a bug in the link loop"
    (record,) = events.named("link.task_ended")
    assert record.levelno == logging.ERROR and record.exc_info is not None


def test_a_stop_request_still_exits_zero(tmp_path: Path) -> None:
    """SIGTERM's path: the link task is cancelled at the end and the daemon exits 0."""
    daemon = make_daemon(tmp_path)

    async def quiet_link_loop() -> None:
        await asyncio.Event().wait()

    daemon._link_loop = quiet_link_loop  # type: ignore[method-assign]

    async def main() -> int:
        asyncio.get_running_loop().call_later(0.2, daemon.request_stop)
        return await asyncio.wait_for(daemon.run(), timeout=20)

    assert asyncio.run(main()) == 0
    assert not (tmp_path / control.SOCKET_NAME).exists()


def test_a_home_gone_read_only_still_stops_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, events: Events
) -> None:
    """The control socket cannot be removed (the home's filesystem went read-only): the
    stop goes on, closes the executor, and still exits 0, with a warning."""
    daemon = make_daemon(tmp_path)

    async def quiet_link_loop() -> None:
        await asyncio.Event().wait()

    daemon._link_loop = quiet_link_loop  # type: ignore[method-assign]
    unlink = Path.unlink

    def read_only(self: Path, missing_ok: bool = False) -> None:
        if self.name == control.SOCKET_NAME:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", read_only)
    closed: list[bool] = []
    aclose = daemon.executor.aclose

    async def tracked_aclose() -> None:
        closed.append(True)
        await aclose()

    daemon.executor.aclose = tracked_aclose  # type: ignore[method-assign]

    async def main() -> int:
        asyncio.get_running_loop().call_later(0.2, daemon.request_stop)
        return await asyncio.wait_for(daemon.run(), timeout=20)

    assert asyncio.run(main()) == 0
    assert closed == [True]
    (warning,) = events.named("control.socket_not_removed")
    assert "Read-only file system" in warning.__dict__["error"]
    assert events.named("daemon.stop")


@pytest.mark.parametrize("stop", ["grace", "second_signal"])
def test_a_stop_hands_back_the_tasks_still_running_after_the_grace_signed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, events: Events, stop: str
) -> None:
    """SIGTERM with a task that outlives shutdown_grace: it was killed with the workers and
    left to the end of its lease, the coordinator waiting for it meanwhile. Now it is
    cancelled and refused, signed and naming its lease, on the link before the link
    closes, and the daemon exits 0. A second stop signal (Ctrl-C twice) does so at once,
    without waiting out the grace (here a minute, far past the test's timeout)."""
    answer_registration(
        monkeypatch,
        lambda _r: httpx.Response(201, json=REGISTERED),
    )
    daemon = make_daemon(
        tmp_path, url=f"http://127.0.0.1:{free_port()}", executor=RunsUntilCancelled
    )
    daemon.shutdown_grace = 0.2 if stop == "grace" else 60.0
    RunsUntilCancelled.started, RunsUntilCancelled.cancelled = asyncio.Event(), []
    task_id = uuid.uuid4()
    dispatched = dispatch(daemon, payload_key(), task_id)
    frames: list[dict[str, Any]] = []

    async def handler(ws: ServerConnection) -> None:
        challenge = messages.Challenge("coordinator-test", os.urandom(32), 31337, 30.0)
        await ws.send(json.dumps(challenge.to_wire()))
        assert json.loads(await ws.recv())["type"] == "auth"
        await ws.send(json.dumps(messages.Welcome(daemon.node_id, 0, None).to_wire()))
        await ws.send(dispatched)
        await asyncio.wait_for(RunsUntilCancelled.started.wait(), 10)
        assert daemon.status()["stopping"] is False
        daemon.request_stop()
        assert daemon.status()["stopping"] is True  # shown while it drains
        if stop == "second_signal":
            daemon.request_stop()
        with contextlib.suppress(ConnectionClosed):
            async for raw in ws:  # until the node closes the link
                if json.loads(raw)["type"] != "heartbeat":
                    frames.append(json.loads(raw))

    async def main() -> int:
        async with serve(handler, "127.0.0.1", int(daemon.url.rsplit(":", 1)[1])):
            return await asyncio.wait_for(daemon.run(), timeout=30)

    assert asyncio.run(main()) == 0
    (refused,) = frames
    assert refused["type"] == "reject" and refused["message"]["task_id"] == "0x" + task_id.hex
    assert refused["message"]["reason"].startswith("draining: node shutting down")
    assert refused["message"]["reason"].endswith(
        "within 0.2 s" if stop == "grace" else "before a second stop signal ended the grace"
    )
    assert refused["lease_expires_at"] == json.loads(dispatched)["lease_expires_at"]
    assert recover(refused) == daemon.node_id
    assert RunsUntilCancelled.cancelled == [task_id]  # its worker is killed
    assert daemon.outbox.get(task_id) is None  # nothing signed but the reject
    assert len(events.named("daemon.stopping_now")) == (stop == "second_signal")


def test_the_first_stop_signal_after_a_stop_of_its_own_keeps_the_grace(
    tmp_path: Path, events: Events
) -> None:
    """A daemon stopping by itself (a refused registration, a replaced link) that then
    gets the operator's SIGTERM takes it as a first stop, with its grace; only a second
    signal hands the running tasks back at once."""
    daemon = make_daemon(tmp_path)
    daemon._stopping.set()  # as the link loop does
    daemon.request_stop()
    assert not daemon._hurry.is_set() and not events.named("daemon.stopping_now")
    daemon.request_stop()
    assert daemon._hurry.is_set() and len(events.named("daemon.stopping_now")) == 1


def test_sighup_stops_the_daemon_as_sigterm_does_unless_ignored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A closed terminal (SIGHUP) drains the daemon like SIGTERM, where its default would
    end it at once (tasks lost, work directories left); under nohup, which ignores it,
    it stays ignored."""
    from nodeclient import entry

    monkeypatch.setattr(signal, "getsignal", lambda sig: signal.SIG_DFL)
    assert signal.SIGHUP in entry.stop_signals()
    monkeypatch.setattr(signal, "getsignal", lambda sig: signal.SIG_IGN)
    assert entry.stop_signals() == (signal.SIGTERM, signal.SIGINT)


# --- a task that fails in an unexpected way is still refused, signed ----------------------------


async def dispatched(daemon: NodeDaemon, task_id: uuid.UUID) -> asyncio.Task[None]:
    """Hand the daemon a dispatch of *task_id*; the task that runs it."""
    await daemon._on_frame(dispatch(daemon, payload_key(), task_id))
    handle = daemon.running[task_id].handle
    assert handle is not None
    return handle


@pytest.mark.parametrize(
    "error",
    [
        KeyError("frames"),  # garbage from a worker
        httpx.InvalidURL("Invalid non-printable ASCII character in URL"),  # not an HTTPError
    ],
)
def test_an_unexpected_task_error_is_refused_signed_and_counted(
    tmp_path: Path, events: Events, error: Exception
) -> None:
    """An exception that is not TaskFailed still ends the task with a signed reject that
    names only its type, counts it as failed, and logs the traceback."""

    class Broken(Executor):
        async def run(self, *args: object, **kwargs: object) -> bytes:
            raise error

    daemon = make_daemon(tmp_path, executor=Broken)
    link = Capture()
    daemon._ws = link  # type: ignore[assignment]
    task_id = uuid.uuid4()

    async def run() -> None:
        await asyncio.wait_for(await dispatched(daemon, task_id), timeout=10)  # no exception

    asyncio.run(run())
    (refused,) = link.frames
    assert refused["type"] == "reject" and refused["message"]["task_id"] == "0x" + task_id.hex
    assert refused["message"]["reason"] == f"internal error: {type(error).__name__}"
    assert recover(refused) == daemon.node_id
    failed = {"workload_class": "ai.inference", "outcome": "failed"}
    assert daemon.metrics.registry.get_sample_value("tasks_total", failed) == 1
    assert daemon.running == {} and daemon.state.state is NodeState.IDLE
    assert daemon.outbox.get(task_id) is None
    (record,) = events.named("task.internal_error")
    assert record.levelno == logging.ERROR and record.exc_info is not None


def test_an_error_after_the_result_is_committed_is_never_answered_with_a_reject(
    tmp_path: Path,
) -> None:
    """Once a result is signed and stored, nothing contradicts it: sending it fails here,
    no reject goes out, and the result waits in the outbox for the next connection."""

    class BrokenSend(Capture):
        async def send(self, data: str) -> None:
            if json.loads(data)["type"] == "result":
                raise RuntimeError("the send broke")
            await super().send(data)

    daemon = make_daemon(tmp_path, executor=Answers)
    link = BrokenSend()
    daemon._ws = link  # type: ignore[assignment]
    task_id = uuid.uuid4()

    async def run() -> None:
        handle = await dispatched(daemon, task_id)
        await asyncio.wait((handle,), timeout=10)
        assert handle.done()
        handle.exception()  # retrieved: what escapes after the commit is not this test's subject

    asyncio.run(run())
    assert link.frames == []
    assert [e.task_id for e in daemon.outbox.pending()] == [task_id]


def test_a_results_slot_is_free_while_its_send_waits_on_the_link(tmp_path: Path) -> None:
    """The result is committed (the backlog holds it) and its send waits on a stalled
    link: the task's slot is free and the node IDLE meanwhile, not EXECUTING with the
    slot busy until the send returns (up to the link's keepalive, some 90 s), refusing
    work as over capacity."""

    class Stalled(Capture):
        def __init__(self) -> None:
            super().__init__()
            self.go = asyncio.Event()

        async def send(self, data: str) -> None:
            if json.loads(data)["type"] == "result":
                await self.go.wait()
            await super().send(data)

    daemon = make_daemon(tmp_path, executor=Answers)
    link = Stalled()
    daemon._ws = link  # type: ignore[assignment]
    task_id = uuid.uuid4()

    async def run() -> tuple[int, NodeState, int]:
        handle = await dispatched(daemon, task_id)
        for _ in range(500):  # until the commit is done and the send waits
            if daemon.outbox.get(task_id) is not None and not daemon.running:
                break
            await asyncio.sleep(0.01)
        seen = (len(daemon.running), daemon.state.state, daemon.outbox.backlog())
        link.go.set()
        await asyncio.wait((handle,), timeout=10)
        return seen

    running, state, backlog = asyncio.run(run())
    assert (running, state, backlog) == (0, NodeState.IDLE, 1)
    assert [f["type"] for f in link.frames] == ["result"]


# --- reconnect backoff ---------------------------------------------------------------------


def test_backoff_resets_only_after_an_authenticated_session_that_stayed_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, waits: Waits, events: Events
) -> None:
    """However a session ends (a drop, 4005, 1001, a clean 1000), the backoff resets only if
    it was authenticated and lasted STABLE_LINK_S; short sessions, even clean, back off."""
    daemon, clock, registrations = linked_daemon(tmp_path, monkeypatch)
    short, long = 1.0, link_module.STABLE_LINK_S
    sessions = [
        Session(up_for=short, close=None),  # network drop (1006)
        Session(up_for=short, close=4005),  # "offline": missed heartbeats
        Session(up_for=long, close=None),  # a drop after a good session: reset
        Session(up_for=3 * long, close=1001),  # a restart after a good session: reset
        Session(up_for=0.0, close=1000),  # authenticated, then closed cleanly at once
        Session(up_for=0.0, close=1000),
        Session(authenticate=False, close=4001),  # auth failed: register again
    ]
    asyncio.run(run_link(daemon, clock, sessions))

    assert waits.attempts == [0, 1, 0, 0, 1, 2, 3]
    assert daemon.link.reconnects == 7 and daemon.link.status == "down"
    assert len(registrations) == 2
    assert all(r.levelno == logging.WARNING for r in events.named("link.closed"))


class RunsUntilCancelled(Executor):
    """Every task runs until it is cancelled."""

    started: ClassVar[asyncio.Event] = asyncio.Event()
    cancelled: ClassVar[list[object]] = []

    async def warm_up(self) -> None:
        return None

    async def run(self, *args: object, **kwargs: object) -> bytes:
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.append(kwargs["task_id"])
            raise
        raise AssertionError("unreachable")


def test_a_link_replaced_twice_stops_the_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, waits: Waits, events: Events
) -> None:
    """4004 on the live link: another process linked with this node's keys. The daemon
    cancels its running task (nothing is committed or signed) and links again only after
    a pause; replaced again within REPLACED_WINDOW_S, it does not link again (the two
    would take turns for ever, both running tasks the coordinator may give out twice) and
    stops with LinkReplaced, exit 78, which systemd does not restart."""
    answer_registration(
        monkeypatch,
        lambda _r: httpx.Response(201, json=REGISTERED),
    )
    monkeypatch.setattr(link_module, "REPLACED_PAUSE_S", 0.3)
    clock = ManualClock()
    daemon = make_daemon(
        tmp_path, url=f"http://127.0.0.1:{free_port()}", clock=clock, executor=RunsUntilCancelled
    )
    RunsUntilCancelled.started, RunsUntilCancelled.cancelled = asyncio.Event(), []
    task_id = uuid.uuid4()

    async def dispatch_then_replace(ws: ServerConnection) -> None:
        await ws.send(dispatch(daemon, payload_key(), task_id))
        await asyncio.wait_for(RunsUntilCancelled.started.wait(), 10)

    window = link_module.REPLACED_WINDOW_S
    sessions = [
        Session(up_for=1.0, close=4004, then=dispatch_then_replace),
        Session(up_for=window - 1.0, close=4004),  # again, within the window
    ]
    started = time.monotonic()
    with pytest.raises(link_module.LinkReplaced) as caught:
        asyncio.run(run_link(daemon, clock, sessions))

    assert caught.value.exit_code == 78
    assert time.monotonic() - started >= 0.3  # the pause before linking again
    assert RunsUntilCancelled.cancelled == [task_id]
    assert daemon.running == {} and daemon.outbox.get(task_id) is None  # nothing signed
    assert daemon.link.reconnects == 1 and daemon.link.status == "down"
    assert daemon._stopping.is_set()
    first, second = events.named("link.replaced")
    assert first.levelno == second.levelno == logging.ERROR
    assert first.__dict__["action"] == "linking again in 0 s"
    assert second.__dict__["action"] == "stopping"
    assert "same node key" in first.__dict__["fix"]
    assert "rotate-liveness" in first.__dict__["fix"]


def test_two_daemons_with_their_own_liveness_keys_do_not_take_the_node_in_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, waits: Waits, events: Events
) -> None:
    """4001 "liveness key rotated" on the live link: another process registered this node
    (signed with its node key) with another liveness key. Registering its own key again
    at once closed that one's link in turn, for ever. The daemon registers again only
    after a pause, and stops (LinkReplaced, exit 78) when it happens again within
    REPLACED_WINDOW_S, as for a 4004, naming the fix."""
    registered: list[float] = []  # when each registration came (monotonic)

    def register(request: httpx.Request) -> httpx.Response:
        registered.append(time.monotonic())
        return httpx.Response(201, json=REGISTERED)

    answer_registration(monkeypatch, register)
    monkeypatch.setattr(link_module, "REPLACED_PAUSE_S", 0.3)
    clock = ManualClock()
    daemon = make_daemon(tmp_path, url=f"http://127.0.0.1:{free_port()}", clock=clock)
    rotated = registry.ROTATED_CLOSE_REASON  # what the coordinator says
    closed: list[float] = []

    async def closing(_ws: ServerConnection) -> None:
        closed.append(time.monotonic())

    sessions = [
        Session(up_for=1.0, close=4001, reason=rotated, then=closing),
        Session(up_for=60.0, close=4001, reason=rotated),  # again, within the window
    ]
    with pytest.raises(link_module.LinkReplaced) as caught:
        asyncio.run(run_link(daemon, clock, sessions))
    assert caught.value.exit_code == 78
    assert len(registered) == 2  # at start, and once after the first close
    assert registered[1] - closed[0] >= 0.3  # the pause before registering again
    first, second = events.named("link.replaced")
    assert (first.__dict__["action"], second.__dict__["action"]) == (
        "linking again in 0 s", "stopping"
    )  # fmt: skip
    assert "different liveness keys" in first.__dict__["fix"]


class SteppedWall(ManualClock):
    """A ManualClock whose wall clock can be stepped (an NTP correction) while its
    monotonic clock runs on unmoved."""

    step = 0.0

    def now(self) -> float:
        return super().now() + self.step

    def monotonic(self) -> float:
        return super().now()


def test_a_wall_clock_stepped_back_does_not_make_links_replaced_far_apart_look_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, waits: Waits, events: Events
) -> None:
    """Two 4004s more than REPLACED_WINDOW_S apart, with the wall clock stepped back an
    hour between them: the window is measured on the monotonic clock, so the daemon links
    again rather than stop as if replaced twice within it."""
    answer_registration(
        monkeypatch,
        lambda _r: httpx.Response(201, json=REGISTERED),
    )
    monkeypatch.setattr(link_module, "REPLACED_PAUSE_S", 0.0)
    clock = SteppedWall()
    daemon = make_daemon(tmp_path, url=f"http://127.0.0.1:{free_port()}", clock=clock)
    window = link_module.REPLACED_WINDOW_S

    async def step_back(_ws: ServerConnection) -> None:
        clock.step = -3600.0

    sessions = [
        Session(up_for=1.0, close=4004),
        Session(up_for=window + 1.0, close=4004, then=step_back),
    ]
    asyncio.run(run_link(daemon, clock, sessions))  # ends as the test asks: no LinkReplaced
    assert daemon._fatal is None and daemon.link.reconnects == 2
    assert [e.__dict__["action"] for e in events.named("link.replaced")] == [
        "linking again in 0 s"
    ] * 2


@pytest.mark.parametrize(
    ("step", "up_for", "attempts"),
    [
        (-3600.0, 3 * link_module.STABLE_LINK_S, [0, 0, 1]),  # long session: reset
        (+3600.0, 0.5, [0, 1, 2]),  # short session: no reset
    ],
)
def test_the_backoff_reset_goes_by_how_long_the_link_was_up_not_by_the_wall_clock(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    waits: Waits,
    step: float,
    up_for: float,
    attempts: list[int],
) -> None:
    """A wall clock stepped during a session (an NTP correction) changes nothing: a long
    session stepped back an hour still resets the backoff, and a short one stepped
    forward an hour does not (a flapping coordinator is not hammered)."""
    answer_registration(monkeypatch, lambda _r: httpx.Response(201, json=REGISTERED))
    clock = SteppedWall()
    daemon = make_daemon(tmp_path, url=f"http://127.0.0.1:{free_port()}", clock=clock)

    async def ntp_step(_ws: ServerConnection) -> None:
        clock.step = step

    sessions = [
        Session(up_for=0.5, close=None),
        Session(up_for=up_for, close=None, then=ntp_step),
        Session(up_for=0.5, close=None),
    ]
    asyncio.run(run_link(daemon, clock, sessions))
    assert waits.attempts == attempts


def test_links_replaced_far_apart_do_not_stop_the_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, waits: Waits, events: Events
) -> None:
    """A 4004 now and then (a proxy's, say) costs a pause each, not the node."""
    monkeypatch.setattr(link_module, "REPLACED_PAUSE_S", 0.0)
    daemon, clock, _ = linked_daemon(tmp_path, monkeypatch)
    window = link_module.REPLACED_WINDOW_S
    sessions = [Session(up_for=window + 1.0, close=4004) for _ in range(3)]
    asyncio.run(run_link(daemon, clock, sessions))  # ends as the test asks: no LinkReplaced
    assert daemon.link.reconnects == 3 and daemon._fatal is None
    assert [e.__dict__["action"] for e in events.named("link.replaced")] == [
        "linking again in 0 s"
    ] * 3


def test_registering_again_days_later_reissues_the_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The coordinator lost the node's record (4003) three days after the daemon started:
    the manifest built at start is past the 24 h freshness limit, which would be a refusal
    (exit 78, no restart). The daemon issues and signs it again at each registration."""
    posted: list[dict[str, Any]] = []

    def register(request: httpx.Request) -> httpx.Response:
        posted.append(json.loads(request.content))
        return httpx.Response(201, json=REGISTERED)

    answer_registration(monkeypatch, register)
    clock = ManualClock()
    daemon = make_daemon(tmp_path, clock=clock)
    built = dict(daemon.manifest)  # at start
    clock.advance(3 * 24 * 3600)
    asyncio.run(daemon.register())

    (sent,) = posted
    assert sent["issued_at"] == int(clock.now())
    checked = manifest_mod.verify_manifest(sent, chain_id=31337, now=int(clock.now()))
    assert checked.node_id == daemon.node_id
    unchanged = {"issued_at", "signature", "node_signature"}
    assert {k: v for k, v in sent.items() if k not in unchanged} == {
        k: v for k, v in built.items() if k not in unchanged
    }
    assert sent["issued_at"] > built["issued_at"]


def test_heartbeat_send_times_stay_bounded_without_acks(tmp_path: Path) -> None:
    """A coordinator that never acknowledges heartbeats does not grow the daemon's table
    of send times (kept to time each ack's round trip) without end."""
    daemon = make_daemon(tmp_path)
    daemon.heartbeat_interval = 0.0
    challenge = messages.Challenge("coordinator-test", os.urandom(32), 31337, 30.0)
    daemon.session.on_challenge(challenge)
    daemon.session.on_welcome(messages.Welcome(daemon.node_id, 0, None))
    sent: list[str] = []

    class Silent:
        async def send(self, frame: str) -> None:
            sent.append(frame)

    async def beat_a_while() -> None:
        beats = asyncio.create_task(daemon._heartbeats(Silent(), 0.0))  # type: ignore[arg-type]
        while len(sent) < 200 and not beats.done():
            await asyncio.sleep(0)
        beats.cancel()
        (ended,) = await asyncio.gather(beats, return_exceptions=True)
        assert isinstance(ended, asyncio.CancelledError), ended

    asyncio.run(beat_a_while())
    assert len(daemon.link.sent_at) == link_module._UNANSWERED_HEARTBEATS
    assert max(daemon.link.sent_at) == daemon.session.seq  # the newest are kept
    daemon.outbox.close()


def test_a_challenge_from_another_coordinator_is_not_signed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, waits: Waits, events: Events
) -> None:
    """The node registered with coordinator-A; a link whose challenge names coordinator-B
    (A relaying B's challenge, to pass the node off as linked to B) gets no LinkAuth. The
    node registers again (a coordinator whose id changed answers with the new one) and
    still refuses while the two differ."""
    registrations: list[httpx.Request] = []

    def register(request: httpx.Request) -> httpx.Response:
        registrations.append(request)
        body = {"status": "registered", "prior_registrations": [], "coordinator_id": "coord-A"}
        return httpx.Response(201, json=body)

    answer_registration(monkeypatch, register)
    daemon = make_daemon(tmp_path, url=f"http://127.0.0.1:{free_port()}", clock=ManualClock())
    got: list[str] = []

    async def handler(ws: ServerConnection) -> None:
        if len(got) >= 2:
            daemon.request_stop()
            await ws.close(1001, "going away")
            return
        challenge = messages.Challenge("coord-B", os.urandom(32), 31337, 30.0)
        await ws.send(json.dumps(challenge.to_wire()))
        try:
            got.append(json.loads(await ws.recv())["type"])
        except Exception:
            got.append("closed")

    async def main() -> None:
        port = int(daemon.url.rsplit(":", 1)[1])
        async with serve(handler, "127.0.0.1", port):
            await asyncio.wait_for(daemon._link_loop(), timeout=30)

    asyncio.run(main())
    assert got == ["closed", "closed"]  # never an auth frame
    assert len(registrations) == 3  # asked again before each link after a mismatch
    assert "coord-B" in events.named("link.coordinator_mismatch")[0].__dict__["error"]


def test_a_mismatch_of_long_coordinator_ids_is_shown_cut(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, waits: Waits, events: Events
) -> None:
    """The coordinator chooses both ids a mismatch names (up to 128 characters each): its
    text goes into last_error (`nodeclient status`) and the log cut to 300 characters, as
    every other link error is."""
    registered, offered = "\U0001f600" * 128, "\U0001f601" * 128
    body = {"status": "registered", "coordinator_id": registered}
    answer_registration(monkeypatch, lambda _r: httpx.Response(201, json=body))
    daemon = make_daemon(tmp_path, url=f"http://127.0.0.1:{free_port()}")
    errors: list[str] = []  # last_error as each connection comes in

    async def handler(ws: ServerConnection) -> None:
        errors.append(daemon.link.last_error)
        if len(errors) == 2:  # the node tried again: the test is over
            daemon.request_stop()
            await ws.close(1001, "going away")
            return
        challenge = messages.Challenge(offered, os.urandom(32), 31337, 30.0)
        await ws.send(json.dumps(challenge.to_wire()))
        await ws.wait_closed()

    async def main() -> None:
        port = int(daemon.url.rsplit(":", 1)[1])
        async with serve(handler, "127.0.0.1", port):
            await asyncio.wait_for(daemon._link_loop(), timeout=30)

    try:
        asyncio.run(main())
    finally:
        daemon.outbox.close()
    (record,) = events.named("link.coordinator_mismatch")
    assert record.__dict__["error"].startswith("the link's challenge comes from coordinator")
    assert len(record.__dict__["error"]) == len(errors[1]) == 300


def test_the_link_follows_no_redirect(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, waits: Waits
) -> None:
    """websockets follows a redirect to any host and port: a hostile coordinator, or
    whoever answers an http:// one, could point the node's link at the operator's own
    network (a metadata service, an admin port) on every reconnect. A redirect fails the
    handshake instead, as it fails a registration: retried with backoff, last_error
    saying where it pointed and what to do."""
    answer_registration(
        monkeypatch, lambda _r: httpx.Response(201, json={"status": "ok", "coordinator_id": "c"})
    )
    port, elsewhere = free_port(), free_port()
    daemon = make_daemon(tmp_path, url=f"http://127.0.0.1:{port}")
    asked: list[bytes] = []
    reached: list[bytes] = []
    target = f"ws://127.0.0.1:{elsewhere}/internal/admin"

    async def redirect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        asked.append(await reader.readuntil(b"\r\n\r\n"))
        if len(asked) == 2:  # redirected again after a backoff: the test is over
            daemon.request_stop()
        writer.write(
            f"HTTP/1.1 302 Found\r\nLocation: {target}\r\nContent-Length: 0\r\n\r\n".encode()
        )
        await writer.drain()
        writer.close()

    async def internal(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reached.append(await reader.readuntil(b"\r\n\r\n"))
        writer.close()

    async def main() -> None:
        coordinator = await asyncio.start_server(redirect, "127.0.0.1", port)
        other = await asyncio.start_server(internal, "127.0.0.1", elsewhere)
        async with coordinator, other:
            await asyncio.wait_for(daemon._link_loop(), timeout=30)

    try:
        asyncio.run(main())
    finally:
        daemon.outbox.close()
    assert reached == []
    assert len(asked) == 2 and waits.attempts == [0]
    assert f"the link was redirected to {target} (302)" in daemon.link.last_error
    assert "nodeclient follows no redirects; use the URL it leads to" in daemon.link.last_error


def test_a_result_is_logged_as_sent_only_when_the_link_took_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The link closed under the send: `_deliver` says the result did not go out (the
    backlog walk stops there; the rest wait for the next link) and logs no `result.sent`."""
    from websockets.exceptions import ConnectionClosedError

    class Closed:
        async def send(self, _data: object) -> None:
            raise ConnectionClosedError(None, None)

    daemon = make_daemon(tmp_path)
    try:
        task = RunningTask(uuid.uuid4(), uuid.uuid4(), "ai.inference", None, time.time())
        daemon._commit(task, b"result bytes")
        (entry,) = list(daemon.outbox.iter_pending())
        daemon._ws = Closed()  # type: ignore[assignment]
        with caplog.at_level(logging.INFO, logger="nodeclient.node"):
            assert asyncio.run(daemon._deliver(entry)) is False
        assert "result.sent" not in [r.getMessage() for r in caplog.records]
        assert daemon.outbox.backlog() == 1
    finally:
        daemon.outbox.close()


def _one_result(daemon: NodeDaemon, *, coordinator_id: str | None = None) -> None:
    """One unacknowledged result in the daemon's outbox (of *coordinator_id*'s task)."""
    daemon.outbox.commit_result(
        task_id=uuid.uuid4(), job_id=uuid.UUID(int=9), workload_class="ai.inference",
        slice_index=None, kind="result", result=b"r", proof=b"p" * 32, message={},
        received_at=1.0, completed_at=2.0, sign=lambda m: b"s" * 65,
        coordinator_id=coordinator_id,
    )  # fmt: skip


def test_a_stop_does_not_wait_for_another_coordinators_results(tmp_path: Path) -> None:
    """The outbox holds a result for another coordinator, which this link never sends: a
    stop flushes what this link sends and does not wait out its deadline on that one."""
    daemon = make_daemon(tmp_path)
    try:
        _one_result(daemon, coordinator_id="another-coordinator")
        daemon.session.coordinator_id = "this-coordinator"
        daemon._ws = object()  # type: ignore[assignment]  # a link that is up
        began = time.monotonic()
        asyncio.run(_drain_with_a_link(daemon))
        assert time.monotonic() - began < 2  # the flush waits up to 10 s for its own
        assert daemon.outbox.backlog() == 1  # kept for the coordinator that dispatched it
    finally:
        daemon.outbox.close()


async def _drain_with_a_link(daemon: NodeDaemon, *, link_ended: bool = False) -> None:
    link = asyncio.create_task(asyncio.sleep(0 if link_ended else 60))
    if link_ended:
        await link
    try:
        await daemon._drain(link)
    finally:
        link.cancel()


def test_a_stop_whose_link_loop_has_ended_does_not_wait_to_flush(tmp_path: Path) -> None:
    """With the link loop over (the link taken by another process while stopping, a
    refused registration), nothing can send the backlog: the stop does not wait out the
    flush's 10 s for it."""
    daemon = make_daemon(tmp_path)
    try:
        _one_result(daemon)
        assert daemon.outbox.backlog() == 1
        began = time.monotonic()
        asyncio.run(_drain_with_a_link(daemon, link_ended=True))
        assert time.monotonic() - began < 2
        assert daemon.outbox.backlog() == 1  # kept for the next start
    finally:
        daemon.outbox.close()


def test_a_heartbeat_lists_the_results_it_holds_for_its_coordinator(tmp_path: Path) -> None:
    """A heartbeat's running_tasks names the tasks the node holds: besides those running,
    those finished with a result this coordinator has not acknowledged (it may be sending
    them now, after a reconnect), so that the coordinator does not re-queue them as lost.
    Another coordinator's are not this one's business."""
    daemon = make_daemon(tmp_path)
    mine, theirs = uuid.uuid4(), uuid.uuid4()
    try:
        for task, coordinator in ((mine, "this-coordinator"), (theirs, "another")):
            daemon.outbox.commit_result(
                task_id=task, job_id=uuid.UUID(int=9), workload_class="ai.inference",
                slice_index=None, kind="result", result=b"r", proof=b"p" * 32, message={},
                received_at=1.0, completed_at=2.0, sign=lambda m: b"s" * 65,
                coordinator_id=coordinator,
            )  # fmt: skip
        daemon.session.coordinator_id = "this-coordinator"
        daemon.session.authenticated = True  # as after a welcome
        sent: list[dict[str, Any]] = []

        class OneFrame:
            async def send(self, data: str) -> None:
                sent.append(json.loads(data))
                raise asyncio.CancelledError  # one heartbeat is enough

        with pytest.raises(asyncio.CancelledError):
            asyncio.run(daemon._heartbeats(OneFrame(), 30.0))  # type: ignore[arg-type]
        assert sent[0]["message"]["running_tasks"] == ["0x" + mine.hex]
    finally:
        daemon.outbox.close()


def test_a_link_that_went_down_shows_no_round_trip_time(tmp_path: Path) -> None:
    """The last heartbeat's round trip belongs to the link that had it: once that link is
    down, status shows none (it showed the old one beside "down")."""
    daemon = make_daemon(tmp_path)
    daemon._set_link("up")
    daemon.link.rtt_ms = 3.5
    assert daemon.status()["link"]["rtt_ms"] == 3.5
    daemon._set_link("down")
    assert daemon.status()["link"]["rtt_ms"] is None
    daemon.outbox.close()


def test_status_says_the_workers_are_starting_while_the_link_waits(tmp_path: Path) -> None:
    """At its start the daemon starts every slot's worker before it links (seconds on a
    GPU node, whose workers start CUDA): meanwhile status says so, beside a link that is
    down, and once they are up it no longer does."""
    from nodeclient.node.cli_status import workers_line

    daemon = make_daemon(tmp_path, executor=Executor)
    seen: list[dict[str, Any]] = []
    real_warm_up = daemon.executor.warm_up

    async def warm_up() -> None:
        seen.append(daemon.status())
        await real_warm_up()
        seen.append(daemon.status())

    daemon.executor.warm_up = warm_up  # type: ignore[method-assign]

    async def main() -> dict[str, Any]:
        task = asyncio.create_task(daemon.run())
        for _ in range(3000):
            if len(seen) == 2 and not daemon.status()["starting"]:
                break
            await asyncio.sleep(0.01)
        after = daemon.status()
        daemon.request_stop()
        await asyncio.wait_for(task, 30)
        return after

    after = asyncio.run(main())
    assert [(s["starting"], s["workers_ready"]) for s in seen] == [(True, 0), (True, 1)]
    assert seen[0]["link"]["status"] == "down"
    assert workers_line(seen[0]) == "0 of 1 ready: starting them (the link waits for them)"
    assert (after["starting"], after["workers_ready"]) == (False, 1)
    assert workers_line(after) is None
