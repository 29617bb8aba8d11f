"""The control socket: every client gets one answer line and a closed connection.

A real Unix socket in a temporary home, served on an event loop in this process; the
client is the same ``control.request`` that ``nodeclient status`` uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nodeclient.errors import UsageError
from nodeclient.node import control


async def _status(request: dict[str, Any]) -> dict[str, Any]:
    if request.get("cmd") == "crash":
        raise RuntimeError("a bug in the handler")
    return {"state": "READY", "echo": request.get("cmd")}


def _raw(path: Path, line: bytes) -> bytes:
    """Send one raw line; read until the daemon closes the connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5.0)
        sock.connect(str(path))
        sock.sendall(line)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    return out


async def _serving(path: Path, *calls: Callable[[], Any]) -> list[Any]:
    """Serve on *path* while each call runs in a thread, in turn (as clients do)."""
    server = await control.serve(path, _status)
    try:
        return [await asyncio.to_thread(call) for call in calls]
    finally:
        server.close()
        await server.wait_closed()


def test_request_is_answered(tmp_path: Path) -> None:
    """A status request gets the handler's answer."""
    sock = tmp_path / control.SOCKET_NAME
    (answer,) = asyncio.run(_serving(sock, lambda: control.request(sock, {"cmd": "status"})))
    assert answer == {"state": "READY", "echo": "status"}


class Events(logging.Handler):
    """Every record logged under nodeclient.node (whose logs may not propagate to pytest's)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def events() -> Iterator[Events]:
    logger = logging.getLogger("nodeclient.node")
    handler = Events()
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def test_handler_error_is_answered_logged_and_serving_goes_on(
    tmp_path: Path, events: Events
) -> None:
    """An unexpected exception in the handler: an {"error": ...} answer at once (not a
    timeout), a control.error log event with the traceback, and the next client is served."""
    sock = tmp_path / control.SOCKET_NAME
    crashed, after = asyncio.run(
        _serving(
            sock,
            lambda: control.request(sock, {"cmd": "crash"}, timeout=3.0),
            lambda: control.request(sock, {"cmd": "status"}, timeout=3.0),
        )
    )
    assert crashed == {"error": "internal error: RuntimeError"}
    assert after["state"] == "READY"
    (record,) = [r for r in events.records if r.getMessage() == "control.error"]
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None and "a bug in the handler" in record.__dict__["error"]


def test_a_request_line_never_finished_is_answered_with_what_went_wrong(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that sends half a line and waits gets, once the wait is over, an error that
    says what was missing (not an empty one), and the daemon serves the next client."""
    monkeypatch.setattr(control, "REQUEST_WAIT_S", 0.3)
    sock = tmp_path / control.SOCKET_NAME

    def half_a_line() -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(5.0)
            client.connect(str(sock))
            client.sendall(b'{"cmd": "sta')
            return client.recv(65536)

    answer, after = asyncio.run(
        _serving(sock, half_a_line, lambda: control.request(sock, {"cmd": "status"}, timeout=3.0))
    )
    assert json.loads(answer) == {
        "error": "no whole request line (ended by a newline) within 0.3 s"
    }
    assert after["state"] == "READY"


@pytest.mark.usefixtures("stock_recursion_limit")
def test_deeply_nested_request_is_answered_and_closed(tmp_path: Path) -> None:
    """A request nested deeper than the recursion limit ('[' x 4000, under the 4 KiB cap)
    is answered with an error and the connection closed; the daemon keeps serving."""
    sock = tmp_path / control.SOCKET_NAME
    nested, after = asyncio.run(
        _serving(
            sock,
            lambda: _raw(sock, b"[" * 4000 + b"\n"),
            lambda: control.request(sock, {"cmd": "status"}, timeout=3.0),
        )
    )
    assert nested.endswith(b"\n") and nested.count(b"\n") == 1
    answer = json.loads(nested)
    assert list(answer) == ["error"]
    # Python 3.11 and 3.12 stop at the recursion limit. 3.13 counts the JSON decoder's C
    # recursion apart, with a higher limit: it reads the 4000 levels and finds the request
    # cut short.
    assert answer["error"] == "request nested too deeply" or (
        sys.version_info >= (3, 13) and answer["error"].startswith("Expecting value")
    )
    assert after["state"] == "READY"


def test_a_client_still_connected_when_the_daemon_stops_logs_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The daemon stops with a status client connected that has sent nothing yet: its
    handler is cancelled with the loop. That ends quietly, not as asyncio's "Exception in
    callback" traceback in the middle of the JSON log."""
    path = tmp_path / "control.sock"
    clients: list[socket.socket] = []

    async def handler(_request: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True}

    async def main() -> None:
        server = await control.serve(path, handler)
        client = socket.socket(socket.AF_UNIX)
        client.connect(str(path))
        clients.append(client)
        await asyncio.sleep(0.2)  # its handler is waiting for the request line
        server.close()
        # asyncio.run then cancels the waiting handler, as at the daemon's stop

    with caplog.at_level(logging.DEBUG):
        asyncio.run(main())
    for client in clients:
        client.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]


def _deep_home(tmp_path: Path) -> Path:
    """A home whose control socket's path is 150 bytes: over the 107 a socket address
    may hold, well within what a file path may be."""
    socket_path = 150
    name = "h" * (socket_path - len(f"{tmp_path}/") - len(f"/{control.SOCKET_NAME}"))
    home = tmp_path / name
    home.mkdir(mode=0o700)
    assert len(str(home / control.SOCKET_NAME).encode()) == socket_path
    return home


def _open_names() -> list[str]:
    """What every descriptor this process holds names."""
    names = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the descriptor listdir itself used
            names.append(os.readlink(f"/proc/self/fd/{fd}"))
    return names


def test_a_home_too_deep_for_a_socket_address_is_served(tmp_path: Path) -> None:
    """A home whose control.sock path exceeds a socket address's 107 bytes: the daemon
    listens there, mode 0600, replaces the stale socket a killed daemon left, a status
    request is answered, and no descriptor of the home stays open."""
    home = _deep_home(tmp_path)
    sock = home / control.SOCKET_NAME
    old = os.umask(0)  # serve's own umask makes it 0600 whatever the daemon's
    try:
        (first,) = asyncio.run(_serving(sock, lambda: control.request(sock, {"cmd": "one"})))
        assert sock.is_socket()  # left behind, as by a killed daemon: stale now
        (second,) = asyncio.run(_serving(sock, lambda: control.request(sock, {"cmd": "two"})))
    finally:
        os.umask(old)
    assert first == {"state": "READY", "echo": "one"}
    assert second == {"state": "READY", "echo": "two"}
    assert stat.S_IMODE(os.lstat(sock).st_mode) == 0o600
    assert str(home) not in _open_names()


def test_a_deep_home_without_proc_is_refused_as_too_long(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where /proc/self/fd is not there to shorten the address, the daemon refuses the
    home as too long, and status says so too, instead of blaming the daemon."""
    monkeypatch.setattr(control, "_FD_DIR", str(tmp_path / "no-proc"))
    sock = _deep_home(tmp_path) / control.SOCKET_NAME
    with pytest.raises(UsageError, match=r"150 bytes, over the 107 .* use a shorter --home"):
        asyncio.run(_serving(sock))
    with pytest.raises(control.DaemonNotRunning, match="use a shorter --home") as caught:
        control.request(sock, {"cmd": "status"}, timeout=1.0)
    assert "nodeclient run" not in str(caught.value)
