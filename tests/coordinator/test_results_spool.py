"""GET .../result of a large result: the copies on the coordinator's disk are bounded.

A result over one chunk is copied out of the database into an unnamed file, which lives
until its reader has had the last byte. A reader that stops reading is dropped after the
send timeout, and the copies alive at once hold at most MAX_SPOOL_BYTES: over that the
route answers 503 with Retry-After instead of making another copy.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import socket
import time
import uuid
from typing import Any

import httpx
import pytest

from nodeclient.coordinator import models as m
from nodeclient.coordinator import results
from tests.coordinator.conftest import Running

MIB = 1 << 20
SIZE = 16 * MIB  # more than the kernel's socket buffers on loopback can absorb
WAIT = 10.0  # how long a step may take before the test gives up on it


def _succeeded_job(running: Running, data: bytes) -> str:
    """A succeeded job whose result is *data*, stored as a finished job's would be."""
    job_id = str(uuid.uuid4())
    job = m.Job(
        job_id=job_id, workload_class="ai.inference", status=m.SUCCEEDED, min_tier=0,
        region=None, ram_mb=0, vram_mb=0, slices=1, meta="{}", created_at=1.0,
        finished_at=2.0, result=data, result_sha256=hashlib.sha256(data).hexdigest(),
    )  # fmt: skip
    running.coord.db.run_sync(lambda s: s.add(job))
    return job_id


def _stalled_reader(running: Running, job_id: str) -> socket.socket:
    """A client that asks for the result, reads the status line, and then reads nothing."""
    host, port = running.url.removeprefix("http://").rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.settimeout(WAIT)
    sock.sendall(f"GET /v1/jobs/{job_id}/result HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert sock.recv(12) == b"HTTP/1.1 200"  # the copy is made before the status is sent
    return sock


def _read_to_end(sock: socket.socket) -> int:
    """Read until the server closes the connection; how many bytes came."""
    total = 0
    while piece := sock.recv(MIB):
        total += len(piece)
    return total


def test_a_reader_that_reads_nothing_is_dropped(
    start_coordinator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the send timeout the server closes the connection short of the result, and
    its copy is gone: the next request gets a copy of its own, whole."""
    monkeypatch.setattr(results, "SEND_TIMEOUT_S", 0.2, raising=False)
    monkeypatch.setattr(results, "MAX_SPOOL_BYTES", SIZE + MIB, raising=False)  # one copy
    running = start_coordinator()
    data = bytes(SIZE)
    job_id = _succeeded_job(running, data)
    url = f"{running.url}/v1/jobs/{job_id}/result"
    with _stalled_reader(running, job_id) as sock:
        # 503 while the stalled reader holds its copy, until it is dropped.
        end = time.monotonic() + WAIT
        while (r := httpx.get(url, timeout=WAIT)).status_code == 503:
            assert time.monotonic() < end, "the stalled reader was never dropped"
            time.sleep(0.02)
        assert r.status_code == 200, r.text[:300]
        assert r.content == data
        # Reset, not closed: a close would wait for the reader to take what the buffers
        # hold (it would read them here, up to the end of what was sent).
        with pytest.raises(ConnectionResetError):
            _read_to_end(sock)


def test_copies_over_the_limit_are_refused_with_503(
    start_coordinator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a reader holds a copy, a second copy that would pass MAX_SPOOL_BYTES is
    refused with 503, Retry-After and a JSON reason; once the reader goes, it is served."""
    monkeypatch.setattr(results, "MAX_SPOOL_BYTES", SIZE + MIB, raising=False)
    running = start_coordinator()
    data = bytes(SIZE)
    job_id = _succeeded_job(running, data)
    url = f"{running.url}/v1/jobs/{job_id}/result"
    with _stalled_reader(running, job_id):
        r = httpx.get(url, timeout=WAIT)
        assert r.status_code == 503, r.status_code
        assert int(r.headers["retry-after"]) > 0
        assert "try again" in r.json()["error"]
    # The reader went: its copy is closed when the server sees it go.
    end = time.monotonic() + WAIT
    while (r := httpx.get(url, timeout=WAIT)).status_code == 503:
        assert time.monotonic() < end, "the closed reader's copy was never released"
        time.sleep(0.02)
    assert r.status_code == 200
    assert r.content == data


def _scope() -> dict[str, Any]:
    return {"type": "http", "method": "GET", "path": "/", "headers": []}


def test_a_stalled_send_closes_the_copy_and_gives_back_its_bytes() -> None:
    """The response, alone: a send held back past the timeout ends the response, closes
    the copy and gives its bytes back, and no more of it is sent."""
    given_back: list[int] = []
    file = io.BytesIO(b"x" * 5000)
    spooled = results.Spooled(file, 5000, given_back.append)
    response = results.SpooledResponse(spooled, key="k", send_timeout=0.05)
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body":
            await asyncio.Event().wait()  # the reader's buffers are full, for good

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()  # the client never goes away either
        raise AssertionError("unreachable")

    asyncio.run(asyncio.wait_for(response(_scope(), receive, send), WAIT))
    assert [message["type"] for message in sent] == ["http.response.start", "http.response.body"]
    assert spooled.closed and file.closed
    assert given_back == [5000]


def test_a_reader_that_goes_away_ends_the_sending() -> None:
    """The client disconnects while a send is held back: the copy is closed at once."""
    given_back: list[int] = []
    spooled = results.Spooled(io.BytesIO(b"x" * 5000), 5000, given_back.append)
    response = results.SpooledResponse(spooled, key="k", send_timeout=3600.0)

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            await asyncio.Event().wait()

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"type": "http.disconnect"}

    asyncio.run(asyncio.wait_for(response(_scope(), receive, send), WAIT))
    assert spooled.closed
    assert given_back == [5000]


def test_the_spooler_counts_the_bytes_of_the_copies_alive(coordinator: Running) -> None:
    """One copy is always allowed, however large; a second that would pass the limit is
    SpoolFull until the first is closed."""
    first_data, second_data = b"a" * 3000, b"b" * 3000
    first, second = (
        _succeeded_job(coordinator, first_data),
        _succeeded_job(coordinator, second_data),
    )
    spooler = results.Spooler(coordinator.coord.db, coordinator.coord.blobs, max_bytes=2000)

    async def scenario() -> None:
        held = await spooler.spool(m.Job, first, 3000)  # alone: allowed over the limit
        assert spooler.alive_bytes == 3000
        assert held.file.read() == first_data
        with pytest.raises(results.SpoolFull, match="limit of 2000"):
            await spooler.spool(m.Job, second, 3000)
        assert spooler.alive_bytes == 3000  # the refusal reserved nothing
        held.close()
        held.close()  # given back once only
        assert spooler.alive_bytes == 0
        again = await spooler.spool(m.Job, second, 3000)
        assert again.file.read() == second_data
        again.close()
        with pytest.raises(results.ResultGone):
            await spooler.spool(m.Job, str(uuid.uuid4()), 3000)
        assert spooler.alive_bytes == 0  # a failed copy gives its bytes back

    asyncio.run(scenario())
