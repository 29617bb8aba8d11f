"""A node runs for months: after warm-up, hundreds more tasks leave the daemon and its
workers holding what they held before (2.3.5, 2.3.7).

The outcomes go through the real daemon, the real sandboxed workers, the real outbox and
real keys: a result acknowledged, a result resent for a duplicate dispatch, a bad payload
refused by the worker, a payload sealed to another key, a class this node does not
serve, two tasks at once, and a task cancelled while it runs (its worker is killed and a
fresh one started). What is compared is exact: open file descriptors of the daemon and of
each worker, threads, the number of worker processes, asyncio tasks, work directories,
and the number of live objects of each of the project's own types. A leak of one of them
per task shows as hundreds.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import json
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from nodeclient.clock import SystemClock
from nodeclient.node import sandbox
from nodeclient.node.daemon import NodeDaemon
from nodeclient.node.executor import Executor, WorkerConfig
from nodeclient.node.outbox import Outbox
from nodeclient.protocol import envelope, messages
from nodeclient.protocol.secp import Secp256k1Key
from nodeclient.workloads.inference import make_request
from tests.models import identity_model, slow_model
from tests.node.test_daemon_outbox import signed_manifest

SLOTS = 2


class Link:
    """Stands in for the websocket: keeps the type and task of every frame sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []
        self.event = asyncio.Event()

    async def send(self, data: str | bytes) -> None:
        if isinstance(data, bytes):  # a binary data frame: a JSON head, then the data
            data = data[4 : 4 + int.from_bytes(data[:4], "big")].decode()
        frame = json.loads(data)
        task = frame.get("message", frame).get("task_id", "")
        if task.startswith("0x"):  # as signed: EIP-712 bytes16
            task = str(uuid.UUID(task[2:]))
        self.sent.append((frame["type"], task))
        self.event.set()

    def count(self, kind: str, task_id: uuid.UUID) -> int:
        return self.sent.count((kind, str(task_id)))

    async def wait_for(self, kind: str, task_id: uuid.UUID, times: int = 1) -> None:
        deadline = time.monotonic() + 30
        while self.count(kind, task_id) < times:
            self.event.clear()
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {kind} for {task_id}: {self.sent[-5:]}"
            await asyncio.wait_for(self.event.wait(), remaining)


def dispatch(
    daemon: NodeDaemon,
    key: rsa.RSAPublicKey,
    payload: bytes,
    task_id: uuid.UUID,
    workload_class: str = "ai.inference",
) -> str:
    expires = int(time.time()) + 600
    env = envelope.seal(
        payload, public_key=key, task_id=task_id, node_id=daemon.node_id, expires_at=expires
    )
    d = messages.Dispatch(task_id, uuid.uuid4(), workload_class, expires, env)
    return json.dumps(d.to_wire())


def ack(task_id: uuid.UUID, of: str) -> str:
    return json.dumps(messages.ResultAck(task_id, "accepted", of=of).to_wire())


class Mix:
    """Rounds of the outcomes in the module's docstring, through the daemon's own frame
    handler."""

    def __init__(self, daemon: NodeDaemon, key: rsa.RSAPrivateKey, link: Link) -> None:
        self.daemon, self.key, self.link = daemon, key, link
        self.other_key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
        self.good = make_request(identity_model(), {"x": np.arange(256, dtype=np.float32)})
        self.good_bytes = self.good.encode()
        x = np.ones((256, 512), np.float32)  # long enough to be cancelled while it runs
        self.slow_bytes = make_request(slow_model(depth=400), {"x": x}).encode()

    async def result(self) -> uuid.UUID:
        task_id = uuid.uuid4()
        frame = dispatch(self.daemon, self.key.public_key(), self.good_bytes, task_id)
        await self.daemon._on_frame(frame)
        await self.link.wait_for("result", task_id)
        return task_id

    async def round(self) -> None:
        # Acknowledged at once.
        await self.daemon._on_frame(ack(await self.result(), "result"))
        # Dispatched again before its acknowledgement: the stored result is sent again.
        task_id = uuid.uuid4()
        frame = dispatch(self.daemon, self.key.public_key(), self.good_bytes, task_id)
        await self.daemon._on_frame(frame)
        await self.link.wait_for("result", task_id)
        await self.daemon._on_frame(frame)
        await self.link.wait_for("result", task_id, times=2)
        await self.daemon._on_frame(ack(task_id, "result"))
        # Refused: a bad payload (by the worker), sealed to another key, a class not served.
        cases = [
            (b"not an inference request", self.key.public_key(), "ai.inference"),
            (self.good_bytes, self.other_key.public_key(), "ai.inference"),
            (self.good_bytes, self.key.public_key(), "media.render"),
        ]
        for payload, key, workload_class in cases:
            task_id = uuid.uuid4()
            await self.daemon._on_frame(
                dispatch(self.daemon, key, payload, task_id, workload_class)
            )
            await self.link.wait_for("reject", task_id)
            await self.daemon._on_frame(ack(task_id, "reject"))
        # Two at once, one per slot.
        ids = await asyncio.gather(self.result(), self.result())
        for task_id in ids:
            await self.daemon._on_frame(ack(task_id, "result"))

    async def cancelled(self) -> None:
        """A task cancelled while it runs: its worker is killed, and a fresh one started."""
        executor = self.daemon.executor
        task_id = uuid.uuid4()
        frame = dispatch(self.daemon, self.key.public_key(), self.slow_bytes, task_id)
        await self.daemon._on_frame(frame)
        await until(lambda: str(task_id) in executor._running, "the task to reach a worker")
        slot = executor._running[str(task_id)]
        assert slot.proc is not None
        worker = slot.proc.pid
        await self.daemon._on_frame(json.dumps(messages.Cancel(task_id, "test").to_wire()))
        await until(lambda: task_id not in self.daemon.running, "the cancelled task to end")
        await settled(executor)
        # (another slot's worker may have been replaced too: it served another model)
        assert slot.alive and slot.proc.pid != worker, "its worker was not replaced"
        assert worker not in {p.pid for p in psutil.Process().children(recursive=True)}


async def until(done: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 30
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


async def settled(executor: Executor) -> None:
    """Until no worker is being replaced and every clean-up report is in."""
    await until(lambda: not executor._restarts, "the workers' replacement")
    await asyncio.sleep(0.2)


def held(daemon: NodeDaemon, work_root: Path) -> dict[str, Any]:
    """What the daemon and its workers hold right now, each exactly."""
    gc.collect()
    me = psutil.Process()
    # by what each holds, not by pid: a cancelled task's worker is replaced
    workers = [p for p in me.children(recursive=True) if p.name().startswith("python")]
    own = collections.Counter(
        type(o).__qualname__
        for o in gc.get_objects()
        if str(vars(type(o)).get("__module__", "")).startswith("nodeclient.")
    )
    # The loop's default executor starts threads as calls overlap, up to its bound (which
    # it never passes): every other thread is counted exactly.
    pool = sum(t.name.startswith("asyncio_") for t in threading.enumerate())
    return {
        "fds": me.num_fds(),
        "threads": me.num_threads() - pool,
        "processes": len(me.children(recursive=True)),
        "workers": sorted((p.num_fds(), p.num_threads()) for p in workers),
        "asyncio tasks": len(asyncio.all_tasks()),
        "work directories": sorted(p.name for p in work_root.iterdir()),
        "running": len(daemon.running),
        "pending sends": len(daemon._pending_sends),
        "objects": dict(sorted(own.items())),
    }


@pytest.mark.timeout(300)
def test_hundreds_of_tasks_leave_the_daemon_and_its_workers_holding_the_same(
    tmp_path: Path,
) -> None:
    work_root = tmp_path / "work"
    work_root.mkdir()
    payload_key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    node_key, liveness_key = Secp256k1Key.generate(), Secp256k1Key.generate()
    manifest = signed_manifest(node_key, liveness_key, payload_key, issued_at=time.time())
    manifest["max_parallel_subtasks"] = SLOTS
    executor = Executor(
        slots=SLOTS,
        config=WorkerConfig(cache_dir=tmp_path / "models", threads=1, work_root=work_root),
        mode=sandbox.choose_mode(allow_unsandboxed=False),
    )
    daemon = NodeDaemon(
        home=tmp_path,
        coordinator_url="http://127.0.0.1:9",
        chain_id=31337,
        node_key=node_key,
        liveness_key=liveness_key,
        payload_key=payload_key,
        manifest=manifest,
        executor=executor,
        outbox=Outbox(tmp_path / "outbox.db"),
        clock=SystemClock(),
        heartbeat_interval=30.0,
    )
    link = Link()
    daemon._ws = link  # type: ignore[assignment]

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], int]:
        await executor.warm_up()
        mix = Mix(daemon, payload_key, link)
        try:
            for i in range(20):  # warm: pools filled, caches and bounded histories full
                await mix.round()
                if i % 10 == 9:
                    await mix.cancelled()
            await settled(executor)
            before = held(daemon, work_root)
            sent_before = len(link.sent)
            for i in range(60):
                await mix.round()
                if i % 10 == 9:
                    await mix.cancelled()
            await settled(executor)
            return before, held(daemon, work_root), len(link.sent) - sent_before
        finally:
            await executor.aclose()

    before, after, frames = asyncio.run(scenario())
    assert frames == 60 * 8  # every task of the measured rounds was answered
    assert daemon.outbox.backlog() == 0, "every result was acknowledged"
    assert before["workers"], "the sandboxed workers are child processes of this one"
    assert after == before
