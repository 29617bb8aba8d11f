"""A task's payload header is read once, and a large one off the event loop: a requester's
header of up to a MiB (the container's limit) takes a tenth of a second to parse, and it
was parsed twice per task on the loop (whether to fetch an input, which worker may run
it), holding up every other task, heartbeat and cancel meanwhile."""

from __future__ import annotations

import asyncio
import json
import struct
import threading
import uuid
from pathlib import Path
from typing import ClassVar

import pytest

from nodeclient.node import inputs
from nodeclient.node.executor import Executor, TaskFailed
from nodeclient.node.slots import Affinity
from nodeclient.workloads import tensors
from tests.node.test_daemon_outbox import make_daemon
from tests.node.test_daemon_rejects import dispatch, later

SHA = "ab" * 32


def large_header_payload(objects: int) -> bytes:
    """An inference payload whose header holds *objects* empty JSON objects beside its
    metadata: what a header costs to parse, with nothing else to decode."""
    metadata = json.dumps({"class": "ai.inference", "model_sha256": SHA})
    raw = ('{"__metadata__":' + metadata + ',"x":[' + ",".join(["{}"] * objects) + "]}").encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class PicksAWorker(Executor):
    """Executor.run as far as the choice of a worker (the task's affinity, from its
    payload's header), with no worker process: the task then fails."""

    chosen: ClassVar[list[Affinity]] = []

    async def warm_up(self) -> None:
        if self._idle is None:
            self._idle = asyncio.Queue()

    async def _slot_for(
        self, key: str, deadline: float | None, affinity: Affinity, *, workload_class: str = ""
    ) -> object:
        PicksAWorker.chosen.append(affinity)
        raise TaskFailed("no worker in this test", requester_fault=False)


def _count_reads(monkeypatch: pytest.MonkeyPatch, payload: bytes) -> list[int]:
    """The thread of each read of *payload*'s header, by the daemon's inputs and by
    slots.affinity_of, in order."""
    reads: list[int] = []
    real = tensors.read_metadata

    def counted(data: bytes, **kwargs: int) -> dict[str, str]:
        if data == payload:
            reads.append(threading.get_ident())
        return real(data, **kwargs)

    monkeypatch.setattr(inputs, "read_metadata", counted)
    monkeypatch.setattr(tensors, "read_metadata", counted)
    return reads


def test_a_large_header_is_read_once_and_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 64 KiB header (over what the loop may parse) is read once per task, in another
    thread, and what was read decides both the input fetch and the worker's affinity."""
    payload = large_header_payload(20_000)
    assert not inputs.header_is_small(payload)
    reads = _count_reads(monkeypatch, payload)
    daemon, _, link = make_daemon(tmp_path, PicksAWorker)
    PicksAWorker.chosen = []
    task_id = uuid.uuid4()
    loop_thread: list[int] = []

    async def scenario() -> None:
        loop_thread.append(threading.get_ident())
        await daemon._on_frame(dispatch(daemon, task_id, later(), payload=payload))
        while daemon.running:
            await asyncio.sleep(0.01)

    asyncio.run(asyncio.wait_for(scenario(), 10))
    assert len(reads) == 1
    assert reads[0] != loop_thread[0]
    assert PicksAWorker.chosen == [("ai.inference", SHA)]  # from that one read
    (refused,) = link.frames
    assert "no worker in this test" in refused["message"]["reason"]


def test_an_unreadable_header_is_read_once_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A header that does not parse is read once as well, and its task gets a worker of
    its own (no model hash to share one by), as before."""
    payload = large_header_payload(20_000)[:-100]  # cut short: the JSON does not close
    reads = _count_reads(monkeypatch, payload)
    daemon, _, _ = make_daemon(tmp_path, PicksAWorker)
    PicksAWorker.chosen = []
    task_id = uuid.uuid4()

    async def scenario() -> None:
        await daemon._on_frame(dispatch(daemon, task_id, later(), payload=payload))
        while daemon.running:
            await asyncio.sleep(0.01)

    asyncio.run(asyncio.wait_for(scenario(), 10))
    assert len(reads) == 1
    assert PicksAWorker.chosen == [("task", str(task_id))]
