"""HTTP clients that stall hold nothing for ever: a connection that never sends a whole
request head, an upload that stops half-way, a download nobody reads (server.py's
RequestHeadDeadline and TCP keepalive, api.py's Stalls)."""

from __future__ import annotations

import hashlib
import logging
import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest

from nodeclient.coordinator import api, server
from tests.coordinator.conftest import RECV_TIMEOUT, Running


@pytest.fixture
def coordinator(start_coordinator) -> Running:
    return start_coordinator(heartbeat_interval=1000.0)


def _connect(running: Running, *, rcvbuf: int | None = None) -> socket.socket:
    where = urlsplit(running.url)
    sock = socket.socket()
    if rcvbuf is not None:  # before connect, so the window stays small
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect((where.hostname, where.port))
    sock.settimeout(RECV_TIMEOUT)
    return sock


def _closed(sock: socket.socket) -> bool:
    """Whether the server ended the connection (FIN or reset), reading what is left."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def _trickled_until_closed(sock: socket.socket, *, seconds: float = 4.0) -> bool:
    """Send a byte every 0.1 s until the server ends the connection (a send fails, or
    a read then finds its end) or *seconds* pass: whether it ended it."""
    sock.settimeout(0.1)
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            sock.sendall(b"x")
            try:
                if not sock.recv(65536):
                    return True
            except TimeoutError:
                continue
    except OSError:  # the reset
        return True
    finally:
        sock.settimeout(RECV_TIMEOUT)
    return False


@pytest.mark.parametrize("sent", [b"", b"GET /healthz HT", b"GET /healthz HTTP/1.1\r\nHost: x"])
def test_a_connection_without_a_whole_request_head_is_closed(
    coordinator: Running, monkeypatch: pytest.MonkeyPatch, sent: bytes
) -> None:
    """Nothing, half a request line, or headers never ended: closed once the head's
    deadline passes, where it was held for ever (and enough of them used up the file
    descriptors every node's link needs)."""
    monkeypatch.setattr(server, "REQUEST_HEAD_TIMEOUT_S", 0.5)
    with _connect(coordinator) as sock:
        sock.sendall(sent)
        began = time.monotonic()
        assert _closed(sock)
        assert time.monotonic() - began < RECV_TIMEOUT / 2


def test_whole_requests_on_a_kept_alive_connection_are_answered(
    coordinator: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deadline holds a request's head, not the connection: requests whose heads
    arrive in time are answered, one after another on the same connection."""
    monkeypatch.setattr(server, "REQUEST_HEAD_TIMEOUT_S", 0.5)
    with _connect(coordinator) as sock:
        for _ in range(3):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 200"), answer
            time.sleep(0.3)  # under the deadline, and under uvicorn's keep-alive timeout


def test_an_upload_that_stops_half_way_is_dropped_and_leaves_no_file(
    coordinator: Running, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A blob upload whose sender goes silent mid-body (still connected): reset once
    nothing came for the stall timeout, its temporary file removed."""
    monkeypatch.setattr(api, "HTTP_STALL_S", 0.5)
    with (
        caplog.at_level(logging.INFO, logger="nodeclient.coordinator"),
        _connect(coordinator) as sock,
    ):
        sock.sendall(b"POST /v1/blobs HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
        sock.sendall(b"x" * 1000)
        assert _closed(sock)
    end = time.monotonic() + RECV_TIMEOUT
    while list(coordinator.config.blob_dir.iterdir()) and time.monotonic() < end:
        time.sleep(0.05)
    assert list(coordinator.config.blob_dir.iterdir()) == []
    assert any(r.getMessage() == "http.body_stalled" for r in caplog.records)
    assert any(r.getMessage() == "blobs.upload_abandoned" for r in caplog.records)


def test_an_upload_that_trickles_is_dropped(
    coordinator: Running, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A body that comes a little at a time, each part within the stall timeout but far
    slower than MIN_BODY_RATE on average: reset once the stall timeout has passed since it
    began, its temporary file removed (before, a byte a minute held it for weeks)."""
    monkeypatch.setattr(api, "HTTP_STALL_S", 0.5)
    with (
        caplog.at_level(logging.INFO, logger="nodeclient.coordinator"),
        _connect(coordinator) as sock,
    ):
        sock.sendall(b"POST /v1/blobs HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
        assert _trickled_until_closed(sock)  # a byte every 0.1 s: never 0.5 s silent
    end = time.monotonic() + RECV_TIMEOUT
    while list(coordinator.config.blob_dir.iterdir()) and time.monotonic() < end:
        time.sleep(0.05)
    assert list(coordinator.config.blob_dir.iterdir()) == []
    assert any(r.getMessage() == "http.body_too_slow" for r in caplog.records)


@pytest.mark.parametrize("path", ["/healthz", "/no-such-route"])
def test_a_body_still_coming_after_its_answer_does_not_hold_the_connection(
    coordinator: Running, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """A route that reads no body answers before the declared body came: the connection
    is closed UNREAD_BODY_LINGER_S after the answer, though a byte of the body arrives now
    and then (each used to cancel uvicorn's keep-alive timer, and nothing else timed it)."""
    monkeypatch.setattr(server, "UNREAD_BODY_LINGER_S", 0.5)
    with _connect(coordinator) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 60000\r\n\r\n".encode())
        answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 "), answer
        assert _trickled_until_closed(sock)


def test_a_whole_body_sent_after_an_early_answer_leaves_the_connection_usable(
    coordinator: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The body of a request answered early, then sent whole, and a next request on the
    same connection: that request is answered, and not cut by the first one's linger."""
    monkeypatch.setattr(server, "UNREAD_BODY_LINGER_S", 0.5)
    with _connect(coordinator) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        sock.sendall(b"hello")
        time.sleep(0.8)  # past the linger
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")


def test_a_pipelined_request_whose_body_is_still_coming_is_not_cut(
    coordinator: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two requests in one write, the second's body not all sent: the first one's answer
    is no early answer to the second (whose body its handler is still reading), so the
    second is answered once its body comes, past the linger."""
    monkeypatch.setattr(server, "UNREAD_BODY_LINGER_S", 0.5)
    with _connect(coordinator) as sock:
        sock.sendall(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /v1/nodes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 10\r\n\r\n{"a"'
        )
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        time.sleep(1.0)  # past the linger
        sock.sendall(b":1}   ")
        assert sock.recv(65536).startswith(b"HTTP/1.1 400")  # not a manifest: answered


def test_a_connection_idle_after_an_early_answers_body_is_closed(
    coordinator: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The body of a request answered early comes whole, then nothing: the connection is
    closed at the next head's deadline (the body's bytes had cancelled uvicorn's
    keep-alive timer, which nothing armed again)."""
    monkeypatch.setattr(server, "UNREAD_BODY_LINGER_S", 0.5)
    monkeypatch.setattr(server, "REQUEST_HEAD_TIMEOUT_S", 0.5)
    with _connect(coordinator) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        sock.sendall(b"hello")
        assert _closed(sock)


def test_a_blob_download_nobody_reads_is_dropped(
    coordinator: Running, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A client asks for a large blob and reads none of it: once the server's writes
    have been held back for the stall timeout, the connection is reset (before, it held
    the task, the socket and the blob's file for as long as the client stayed)."""
    blob = b"\x07" * (16 << 20)
    sha = httpx.post(coordinator.url + "/v1/blobs", content=blob, timeout=RECV_TIMEOUT).json()
    assert sha["sha256"] == hashlib.sha256(blob).hexdigest()
    monkeypatch.setattr(api, "HTTP_STALL_S", 0.5)
    with (
        caplog.at_level(logging.INFO, logger="nodeclient.coordinator"),
        _connect(coordinator, rcvbuf=4096) as sock,
    ):
        sock.sendall(f"GET /v1/blobs/{sha['sha256']} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        end = time.monotonic() + RECV_TIMEOUT
        while not any(r.getMessage() == "http.reader_stalled" for r in caplog.records):
            assert time.monotonic() < end, "the stalled reader was never dropped"
            time.sleep(0.05)
        assert _closed(sock)


def test_the_listening_socket_finds_dead_peers_by_keepalive() -> None:
    """TCP keepalive on the listening socket, which Linux copies to every accepted one:
    a peer that vanished (power lost, a NAT that forgot the flow) is found at any stage."""
    sock = server.listen("127.0.0.1", 0)
    try:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 60
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 10
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 6
    finally:
        sock.close()
