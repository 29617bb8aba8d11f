"""A task's deadline is its lease's end read on the executor's clock, which runs on while
the system is suspended, not on time.monotonic, which stops then: the input download,
the run and a renewal all measure the lease on that one clock."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from nodeclient.node import inputs
from nodeclient.node.executor import Executor
from nodeclient.protocol import envelope, messages
from nodeclient.workloads.inference import make_request
from tests.models import identity_model
from tests.node.test_daemon_outbox import make_daemon
from tests.node.test_daemon_rejects import dispatch

# The executor's clock reads an hour ahead of time.monotonic: the system slept an hour
# since the daemon started.
SLEPT = 3600.0


class OnItsOwnClock(Executor):
    """An executor whose clock is not time.monotonic; it runs nothing, and keeps the time
    each task had left by that clock, and each renewal's."""

    left: ClassVar[list[float]] = []
    renewed: ClassVar[list[float]] = []

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(clock=lambda: time.monotonic() + SLEPT, **kwargs)

    async def run(self, *args: object, deadline: float, **kwargs: object) -> bytes:
        OnItsOwnClock.left.append(deadline - self.clock())
        return b"a result"

    def extend(self, task_id: object, deadline: float) -> bool:
        OnItsOwnClock.renewed.append(deadline - self.clock())
        return True


def test_the_lease_is_measured_on_the_executors_clock(tmp_path: Path) -> None:
    """A task whose lease ends in 600 s gets 600 s by the executor's clock, for its input
    download and for its run, and a renewal to 900 s is 900 s by that clock too."""
    daemon, _, link = make_daemon(tmp_path, OnItsOwnClock)
    OnItsOwnClock.left, OnItsOwnClock.renewed = [], []
    model = identity_model()
    downloading, renewed = threading.Event(), threading.Event()
    download_left: list[float] = []

    def fetch(url: str) -> bytes:
        limits = inputs._LIMITS.get()
        assert limits is not None
        download_left.append(limits.deadline - limits.clock())
        downloading.set()
        renewed.wait(10)
        return model

    daemon._fetch = fetch
    payload = make_request(
        model, {"x": np.ones(3, np.float32)}, inline=False, model_url="https://models.example/m"
    ).encode()
    task_id, now = uuid.uuid4(), int(time.time())

    async def scenario() -> None:
        await daemon._on_frame(dispatch(daemon, task_id, now + 600, payload=payload))
        await asyncio.to_thread(downloading.wait, 10)
        await daemon._on_frame(dispatch(daemon, task_id, now + 900, payload=payload))
        renewed.set()
        while daemon.running:
            await asyncio.sleep(0.01)

    asyncio.run(asyncio.wait_for(scenario(), 10))
    daemon._fetch_pool.shutdown(wait=True)
    assert download_left == [pytest.approx(600, abs=5)]
    assert OnItsOwnClock.renewed == [pytest.approx(900, abs=5)]
    assert OnItsOwnClock.left == [pytest.approx(900, abs=5)]  # the renewed lease
    assert [frame["type"] for frame in link.frames] == ["result"]


def _dispatch_on(daemon: Any, task_id: uuid.UUID, lease: int, sent_at: float | None) -> str:
    """A dispatch the coordinator sent at *sent_at* on its clock, whose lease and envelope
    end at *lease* on that clock."""
    env = envelope.seal(
        b"payload", public_key=daemon._payload_key.public_key(), task_id=task_id,
        node_id=daemon.node_id, expires_at=lease,
    )  # fmt: skip
    d = messages.Dispatch(task_id, uuid.uuid4(), "ai.inference", lease, env, sent_at=sent_at)
    return json.dumps(d.to_wire())


@pytest.mark.parametrize(
    ("case", "skew"),
    [
        ("an hour behind", -SLEPT),
        ("an hour ahead", SLEPT),
        ("told by heartbeats", -SLEPT),
        ("a stale ack after the dispatch", -SLEPT),
    ],
)
def test_the_lease_is_read_on_the_coordinators_clock(
    tmp_path: Path, case: str, skew: float
) -> None:
    """The coordinator's clock is an hour off this node's (stepped while linked, or wrong
    all along): a lease of 600 s by its clock is 600 s here, not refused as over (its
    clock behind) nor an hour longer (ahead). The node reads the coordinator's clock from
    the dispatch's sent_at, or, from a coordinator that sends none, from its heartbeat
    acknowledgements' server_time."""
    daemon, _, link = make_daemon(tmp_path, OnItsOwnClock)
    OnItsOwnClock.left = []
    theirs = time.time() + skew
    task_id, lease = uuid.uuid4(), int(theirs) + 600

    async def scenario() -> None:
        if case == "told by heartbeats":
            ack = {"type": "heartbeat_ack", "seq": 1, "server_time": theirs,
                   "unstaking_until": None}  # fmt: skip
            await daemon._on_frame(json.dumps(ack))
        sent_at = None if case == "told by heartbeats" else theirs
        await daemon._on_frame(_dispatch_on(daemon, task_id, lease, sent_at))
        if case == "a stale ack after the dispatch":  # before the task starts: its own
            # dispatch's sent_at still tells its lease, not an ack's server_time
            ack = {"type": "heartbeat_ack", "seq": 1, "server_time": theirs - SLEPT,
                   "unstaking_until": None}  # fmt: skip
            await daemon._on_frame(json.dumps(ack))
        while daemon.running:
            await asyncio.sleep(0.01)

    asyncio.run(asyncio.wait_for(scenario(), 10))
    assert OnItsOwnClock.left == [pytest.approx(600, abs=5)]
    assert [frame["type"] for frame in link.frames] == ["result"]


class _SteppedWall:
    """The node's wall clock, which a test steps (an NTP correction) at a moment of its
    choosing; its monotonic clock is the real one."""

    def __init__(self) -> None:
        self.step = 0.0

    def now(self) -> float:
        return time.time() + self.step

    def monotonic(self) -> float:
        return time.monotonic()


@pytest.mark.parametrize("step", [SLEPT, -SLEPT])
def test_a_node_clock_step_during_the_download_moves_no_deadline(
    tmp_path: Path, step: float
) -> None:
    """The node's wall clock steps an hour while the task's inputs download: the run
    still gets what is left of its 600 s lease (read once, on arrival, against the
    dispatch's sent_at, then counted on the executor's clock), not nothing or an hour
    more."""
    daemon, _, link = make_daemon(tmp_path, OnItsOwnClock)
    wall = _SteppedWall()
    daemon.clock = wall  # type: ignore[assignment]
    OnItsOwnClock.left = []
    model = identity_model()

    def fetch(url: str) -> bytes:
        wall.step = step
        return model

    daemon._fetch = fetch
    payload = make_request(
        model, {"x": np.ones(3, np.float32)}, inline=False, model_url="https://models.example/m"
    ).encode()
    task_id, now = uuid.uuid4(), time.time()
    env = envelope.seal(
        payload, public_key=daemon._payload_key.public_key(), task_id=task_id,
        node_id=daemon.node_id, expires_at=int(now) + 600,
    )  # fmt: skip
    d = messages.Dispatch(task_id, uuid.uuid4(), "ai.inference", int(now) + 600, env, sent_at=now)

    async def scenario() -> None:
        await daemon._on_frame(json.dumps(d.to_wire()))
        while daemon.running:
            await asyncio.sleep(0.01)

    asyncio.run(asyncio.wait_for(scenario(), 10))
    daemon._fetch_pool.shutdown(wait=True)
    assert OnItsOwnClock.left == [pytest.approx(600, abs=5)]
    assert [frame["type"] for frame in link.frames] == ["result"]
