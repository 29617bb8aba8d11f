"""Fixtures shared by the node's tests."""

from __future__ import annotations

import contextlib
import http.server
import select
import time
from collections.abc import AsyncIterator, Callable, Iterator

import httpx
import pytest

from tests.http_server import serving


@pytest.fixture(autouse=True)
def _a_terminal_that_can_redraw(monkeypatch: pytest.MonkeyPatch) -> None:
    """The status console reads TERM and refuses a dumb terminal: whatever terminal the
    suite runs under, the consoles its tests draw on can redraw."""
    monkeypatch.setenv("TERM", "xterm-256color")


class _Drip(http.server.BaseHTTPRequestHandler):
    """Answers 200 with a long body, one byte every 0.1 s (or nothing at all, at /stall;
    at /drip-then-stall, 1.5 s of bytes, then nothing)."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        with contextlib.suppress(OSError):  # the client gave up: the point of the test
            if self.path == "/drip-then-stall":
                for _ in range(15):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.1)
            if self.path in ("/stall", "/drip-then-stall"):
                # Nothing for 30 s, or until the client goes (or the server shuts this
                # connection down as it stops): either makes the connection readable.
                select.select([self.connection], [], [], 30)
                return
            for _ in range(100_000):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)

    def log_message(self, *_args: object) -> None:
        return None


@pytest.fixture(scope="module")
def drip() -> Iterator[str]:
    with serving(_Drip) as url:
        yield url


def as_sent(
    handler: Callable[[httpx.Request], httpx.Response],
) -> Callable[[httpx.Request], httpx.Response]:
    """*handler* for an ``httpx.MockTransport``, its answers' bodies streamed as a network
    answer's are: httpx reads a Response made from bytes at once, and a client that
    streams the answer (as the daemon does, to bound it) could not read it again."""

    async def chunks(raw: bytes) -> AsyncIterator[bytes]:
        yield raw

    def answer(request: httpx.Request) -> httpx.Response:
        made = handler(request)
        if not isinstance(made.stream, httpx.ByteStream):
            return made  # streamed already
        raw = b"".join(made.stream)  # as it would be sent, before any content decoding
        return httpx.Response(made.status_code, headers=made.headers, content=chunks(raw))

    return answer
