"""HTTP answers read as sent: no content coding is ever undone, no body read past its
limit. A real server on loopback sends them, as a hostile or misconfigured one would."""

from __future__ import annotations

import asyncio
import gzip
import http.server
import queue
from collections.abc import Iterator
from typing import ClassVar

import httpx
import pytest

from nodeclient import httpbody
from nodeclient.coordinator.client import CoordinatorClient
from nodeclient.errors import RemoteProtocolError
from nodeclient.node import doctor
from tests.http_server import serving

BOMB = gzip.compress(gzip.compress(bytes(64 << 20)))  # ~70 KB, 64 MiB once undone


class _Answers(http.server.BaseHTTPRequestHandler):
    asked: ClassVar[list[str | None]] = []

    def _answer(self) -> None:
        type(self).asked.append(self.headers["Accept-Encoding"])
        if self.path.startswith("/gzip") or self.path == "/healthz":
            body, coding = BOMB, "gzip, gzip"
        elif self.path.startswith("/long"):
            body, coding = b"x" * (3 << 20), None
        else:
            body, coding = b'{"ok": true}', None
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        if coding:
            self.send_header("Content-Encoding", coding)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *_args: object) -> None:
        return None


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with serving(_Answers) as url:
        yield url


def _sync(url: str, limit: int) -> bytes:
    with httpx.stream("GET", url, headers=httpbody.IDENTITY) as resp:
        return httpbody.read(resp, limit=limit)


async def _async(url: str, limit: int) -> bytes:
    async with (
        httpx.AsyncClient() as client,
        client.stream("GET", url, headers=httpbody.IDENTITY) as resp,
    ):
        return await httpbody.aread(resp, limit=limit)


def test_an_answer_is_read_as_sent_within_its_limit(server: str) -> None:
    assert _sync(server + "/plain", 100) == b'{"ok": true}'
    assert asyncio.run(_async(server + "/plain", 100)) == b'{"ok": true}'
    for read in (_sync, lambda url, limit: asyncio.run(_async(url, limit))):
        with pytest.raises(httpbody.AnswerRefused, match="Content-Encoding 'gzip, gzip'"):
            read(server + "/gzip", 1 << 30)  # never undone, however large the limit
        with pytest.raises(httpbody.AnswerRefused, match="over 1048576 bytes"):
            read(server + "/long", 1 << 20)
    made = httpx.Response(200, content=b"12345", request=httpx.Request("GET", server))
    assert httpbody.read(made, limit=5) == b"12345"  # made in memory, read already
    with pytest.raises(httpbody.AnswerRefused, match="over 4 bytes"):
        httpbody.read(made, limit=4)


def test_the_requester_client_and_doctor_refuse_a_coded_answer(server: str) -> None:
    """A coordinator (or whatever answers at its URL) that compresses anyway: the client
    and `doctor` say so, asking with Accept-Encoding identity, never undoing it."""
    _Answers.asked.clear()
    with (
        CoordinatorClient(server + "/gzip") as client,
        pytest.raises(RemoteProtocolError, match="Content-Encoding 'gzip, gzip'"),
    ):
        client.raw_job_result("j")
    (check,) = doctor.check_coordinator(server)
    assert check.level is doctor.Level.FAIL and "Content-Encoding" in check.summary
    assert set(_Answers.asked) == {"identity"}


LONG_ERROR = 128 << 20  # far over what an error answer needs, far under the result limit


class _LongError(http.server.BaseHTTPRequestHandler):
    """A 500 whose body goes on for LONG_ERROR bytes (a hostile coordinator's), sent a MiB
    at a time until the client stops reading; how much was sent, once it stopped."""

    sent: ClassVar[queue.Queue[int]] = queue.Queue()

    def do_GET(self) -> None:
        self.send_response(500)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(LONG_ERROR))
        self.end_headers()
        sent = 0
        piece = b"it went wrong " + b"x" * ((1 << 20) - 14)
        try:
            while sent < LONG_ERROR:
                self.wfile.write(piece)
                sent += len(piece)
        except OSError:  # the client closed the connection: it read no more
            pass
        finally:
            type(self).sent.put(sent)

    def log_message(self, *_args: object) -> None:
        return None


def test_an_error_answer_is_read_only_to_a_small_cap_whatever_the_routes_limit() -> None:
    """A non-2xx answer says why in a line: its body is read to MAX_ERROR_ANSWER at most,
    even on a route whose own limit is 16 GiB (a job's result), and the rest is never
    read. (Before, a 500 of gigabytes was read whole, then decoded as text.)"""
    with serving(_LongError) as url, httpx.Client(headers=httpbody.IDENTITY) as client:
        answer = httpbody.request(client, "GET", url + "/v1/jobs/j/result", limit=16 << 30)
        assert answer.status_code == 500
        assert answer.content.startswith(b"it went wrong ")
        assert len(answer.content) <= httpbody.MAX_ERROR_ANSWER
        sent = _LongError.sent.get(timeout=30)
        with (
            CoordinatorClient(url) as coordinator,
            pytest.raises(RemoteProtocolError, match="GET /v1/jobs/j/result: 500 it went wrong"),
        ):
            coordinator.raw_job_result("j")
        sent_too = _LongError.sent.get(timeout=30)
    # Sent, not read: what the kernel's socket buffers took before the client closed.
    assert max(sent, sent_too) < LONG_ERROR // 2, (sent, sent_too)
