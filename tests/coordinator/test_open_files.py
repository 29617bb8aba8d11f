"""The coordinator raises its open-file limit at start (nodeclient.openfiles): started from
a shell with the usual soft limit, it would otherwise refuse connections past about a
thousand linked nodes, its database unable to open files meanwhile."""

from __future__ import annotations

import json
import resource
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

SOFT = 256  # the coordinator's soft limit at start, in this test
CONNECTIONS = 400  # held open at once: more than SOFT allows


@pytest.fixture
def room_for_sockets() -> Iterator[None]:
    """This process may hold CONNECTIONS sockets (its soft limit raised if need be)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard == resource.RLIM_INFINITY or hard >= 2 * CONNECTIONS, (
        f"the hard open-file limit here ({hard}) is too low for this test"
    )
    if soft != resource.RLIM_INFINITY and soft < 2 * CONNECTIONS:
        resource.setrlimit(resource.RLIMIT_NOFILE, (2 * CONNECTIONS, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _low_soft_limit() -> None:  # in the child, before it runs the coordinator
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (SOFT, hard))


def test_a_coordinator_started_with_a_low_soft_limit_serves_past_it(
    tmp_path: Path, room_for_sockets: None
) -> None:
    log = tmp_path / "coordinator.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nodeclient.coordinator.cli", "serve", "--port", "0",
             "--data-dir", str(tmp_path / "data")],
            stdout=subprocess.PIPE, stderr=err, preexec_fn=_low_soft_limit,  # noqa: PLW1509
        )  # fmt: skip
    held: list[socket.socket] = []
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().decode().split()[-1]  # "coordinator: http://HOST:PORT"
        port = int(url.rsplit(":", 1)[1])
        for _ in range(CONNECTIONS):
            held.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        answer = httpx.get(f"{url}/healthz", timeout=10)
        assert (answer.status_code, answer.json()["status"]) == (200, "ok")
    finally:
        for sock in held:
            sock.close()
        proc.terminate()
        proc.wait(timeout=30)
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    # open_files_low where the hard limit itself is under 4096: raised all the same
    (raised,) = [e for e in events if e["event"].startswith("coordinator.open_files")]
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert raised["soft"] == min(hard, 1 << 20) > SOFT
