"""The daemon and its outbox: a finished task is never run again, even once its result is
gone, and the retention settings are validated."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from eth_account import Account
from eth_account.messages import encode_typed_data

from nodeclient.clock import SystemClock
from nodeclient.errors import UsageError
from nodeclient.node import sandbox
from nodeclient.node.config import load_config
from nodeclient.node.daemon import NodeDaemon
from nodeclient.node.dispatch import RunningTask
from nodeclient.node.executor import Executor, WorkerConfig
from nodeclient.node.inputs import http_fetcher
from nodeclient.node.outbox import Outbox, Retention
from nodeclient.protocol import eip712, envelope, messages
from nodeclient.protocol import manifest as manifest_mod
from nodeclient.protocol.secp import Secp256k1Key
from nodeclient.protocol.states import NodeState
from nodeclient.workloads.inference import make_request
from tests.models import identity_model
from tests.node.conftest import as_sent

WALLET = 'wallet_address = "0x1111111111111111111111111111111111111111"\n'


class Capture:
    """Stands in for the link: keeps every frame the daemon sends."""

    def __init__(self) -> None:
        self.frames: list[dict] = []

    async def send(self, data: str) -> None:
        self.frames.append(json.loads(data))


class NeverRun(Executor):
    async def run(self, *args: object, **kwargs: object) -> bytes:
        raise AssertionError("a finished task was executed again")


class Answers(Executor):
    """Runs nothing: every task's result is the same bytes."""

    async def run(self, *args: object, **kwargs: object) -> bytes:
        return b"a result"


def signed_manifest(
    node_key: Secp256k1Key,
    liveness_key: Secp256k1Key,
    payload_key: rsa.RSAPrivateKey,
    *,
    issued_at: float,
) -> dict[str, Any]:
    """A real one-slot ai.inference manifest, as `nodeclient run` builds at start."""
    return manifest_mod.build_manifest(
        node_key=node_key, liveness_address=liveness_key.address, payload_key=payload_key,
        wallet_address="0x" + "11" * 20, region="eu-west",
        cpu={"model": "EPYC", "cores": 2, "ram_gb": 24}, gpu=[],
        workload_classes=["ai.inference"], max_parallel_subtasks=1, client_version="0.1.0",
        issued_at=int(issued_at), chain_id=31337,
    )  # fmt: skip


def make_daemon(
    home: Path, executor: type[Executor] = NeverRun
) -> tuple[NodeDaemon, rsa.RSAPrivateKey, Capture]:
    payload_key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    node_key, liveness_key = Secp256k1Key.generate(), Secp256k1Key.generate()
    daemon = NodeDaemon(
        home=home,
        coordinator_url="http://127.0.0.1:9",
        chain_id=31337,
        node_key=node_key,
        liveness_key=liveness_key,
        payload_key=payload_key,
        manifest=signed_manifest(node_key, liveness_key, payload_key, issued_at=time.time()),
        executor=executor(
            slots=1, config=WorkerConfig(cache_dir=home / "models"), mode=sandbox.MODE_UNSANDBOXED
        ),
        outbox=Outbox(home / "outbox.db"),
        clock=SystemClock(),
        heartbeat_interval=30.0,
        retention=Retention(seconds=60.0, bytes=1 << 20),
    )
    link = Capture()
    daemon._ws = link  # type: ignore[assignment]
    return daemon, payload_key, link


def dispatch(daemon: NodeDaemon, key: rsa.RSAPrivateKey, task_id: uuid.UUID) -> str:
    env = envelope.seal(
        b"payload",
        public_key=key.public_key(),
        task_id=task_id,
        node_id=daemon.node_id,
        expires_at=int(time.time()) + 600,
    )
    d = messages.Dispatch(task_id, uuid.uuid4(), "ai.inference", int(time.time()) + 600, env)
    return json.dumps(d.to_wire())


def recover(frame: dict) -> str:
    """The signer of a reject frame, by eth-account alone."""
    message = eip712.message_from_json("Reject", frame["message"])
    typed = eip712.typed_data_json("Reject", message, chain_id=31337)
    return Account.recover_message(
        encode_typed_data(full_message=typed), signature=frame["signature"]
    )


def test_redispatch_of_a_pruned_task_is_refused_signed_not_run(tmp_path: Path) -> None:
    """Stored result: re-sent. Result pruned after its ack: a signed reject saying why."""
    daemon, key, link = make_daemon(tmp_path)
    kept, pruned = uuid.uuid4(), uuid.uuid4()
    for task_id in (kept, pruned):
        task = RunningTask(task_id, uuid.uuid4(), "ai.inference", None, time.time())
        daemon._commit(task, b"result of " + task_id.bytes)
    daemon.outbox.mark_acked(pruned, status="accepted", reason="", at=time.time() - 3600)
    cutoff = time.time() - daemon.retention.seconds
    assert daemon.outbox.prune(acked_before=cutoff, keep_bytes=daemon.retention.bytes) == 1

    asyncio.run(daemon._on_frame(dispatch(daemon, key, kept)))
    asyncio.run(daemon._on_frame(dispatch(daemon, key, pruned)))
    resent, refused = link.frames
    assert resent["type"] == "result" and resent["message"]["task_id"] == "0x" + kept.hex
    assert refused["type"] == "reject" and refused["message"]["task_id"] == "0x" + pruned.hex
    assert "no longer held" in refused["message"]["reason"]
    assert recover(refused) == daemon.node_id
    assert daemon.running == {}


def test_a_task_cancelled_before_it_started_frees_its_slot(tmp_path: Path) -> None:
    """A cancel read in the same turn as its dispatch (both frames in one socket read)
    cancels a task before its first step: its slot is free again and the node IDLE, so
    the next dispatch runs instead of being refused as over capacity."""
    daemon, key, link = make_daemon(tmp_path, executor=Answers)
    first, second = uuid.uuid4(), uuid.uuid4()

    async def scenario() -> None:
        await daemon._on_frame(dispatch(daemon, key, first))
        await daemon._on_frame(json.dumps(messages.Cancel(first, "withdrawn").to_wire()))
        for _ in range(3):
            await asyncio.sleep(0)
        assert daemon.running == {}
        assert daemon.state.state is NodeState.IDLE
        await daemon._on_frame(dispatch(daemon, key, second))
        while daemon.running:
            await asyncio.sleep(0.01)

    asyncio.run(scenario())
    (frame,) = link.frames
    assert frame["type"] == "result" and frame["message"]["task_id"] == "0x" + second.hex
    assert daemon.outbox.get(first) is None


class HeldLink(Capture):
    """A link whose sends wait until released, as over a slow connection."""

    def __init__(self) -> None:
        super().__init__()
        self.sending = asyncio.Event()
        self.release = asyncio.Event()

    async def send(self, data: str) -> None:
        self.sending.set()
        await self.release.wait()
        await super().send(data)


def test_a_cancel_after_the_work_is_done_does_not_stop_its_result(tmp_path: Path) -> None:
    """Once the task has run, its result is committed, signed and sent even if a cancel
    (a lease that just ended) arrives meanwhile: the coordinator takes a late result,
    and a signed result must not wait in the outbox until the next reconnect."""
    daemon, key, _ = make_daemon(tmp_path, executor=Answers)
    task_id = uuid.uuid4()

    async def scenario() -> HeldLink:
        link = HeldLink()
        daemon._ws = link  # type: ignore[assignment]
        await daemon._on_frame(dispatch(daemon, key, task_id))
        await asyncio.wait_for(link.sending.wait(), 10)  # committed; the send has begun
        await daemon._on_frame(json.dumps(messages.Cancel(task_id, "lease ended").to_wire()))
        await asyncio.sleep(0)
        link.release.set()
        while daemon._pending_sends or daemon.running:
            await asyncio.sleep(0.01)
        return link

    link = asyncio.run(scenario())
    (frame,) = link.frames
    assert frame["type"] == "result" and frame["message"]["task_id"] == "0x" + task_id.hex
    assert daemon.outbox.get(task_id) is not None
    assert daemon.timed_out == 0  # it completed: counted once, as completed


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("result_retention_hours = -1\n", "result_retention_hours"),
        ("result_retention_hours = true\n", "result_retention_hours"),
        ("result_retention_mb = 1.5\n", "result_retention_mb"),
        ("result_retention_mb = -3\n", "result_retention_mb"),
        ("history_retention_days = -1\n", "history_retention_days"),
        ("history_retention_days = nan\n", "history_retention_days"),
        ("history_retention_days = 36501\n", "history_retention_days"),
        ("history_max_rows = -1\n", "history_max_rows"),
        ("history_max_rows = 1.5\n", "history_max_rows"),
        ("history_max_rows = true\n", "history_max_rows"),
    ],
)
def test_retention_settings_are_validated(tmp_path: Path, line: str, error: str) -> None:
    (tmp_path / "config.toml").write_text(WALLET + line)
    with pytest.raises(UsageError, match=error):
        load_config(tmp_path)


def test_retention_settings_are_read(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(
        WALLET + "result_retention_hours = 0.5\nresult_retention_mb = 0\n"
    )
    config = load_config(tmp_path)
    assert (config.result_retention_hours, config.result_retention_mb) == (0.5, 0)
    assert config.history_retention_days == 180.0
    assert config.history_max_rows == 2_000_000
    (tmp_path / "config.toml").write_text(WALLET + "history_retention_days = 0\n")
    assert load_config(tmp_path).history_retention_days == 0  # kept for ever
    # Never shorter than the results' period (a config from before the key had up to a
    # year of results: it still loads, and its rows stay as long as the results).
    (tmp_path / "config.toml").write_text(WALLET + "result_retention_hours = 8760\n")
    assert load_config(tmp_path).history_retention_days == 365
    (tmp_path / "config.toml").write_text(WALLET + "history_retention_days = 1\n")
    assert load_config(tmp_path).history_retention_days == 3  # 72 h of results


def test_a_full_disk_at_commit_is_refused_signed_and_the_daemon_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The outbox cannot store a result (disk full): nothing is recorded or sent as a result,
    the coordinator gets a signed reject naming the cause, and the next task works."""
    daemon, key, link = make_daemon(tmp_path, Answers)
    real = daemon.outbox.commit_result
    full = [True]

    def commit(**kwargs: object) -> object:
        if full[0]:
            raise OSError(28, "No space left on device")
        return real(**kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(daemon.outbox, "commit_result", commit)
    first, second = uuid.uuid4(), uuid.uuid4()

    async def run(task_id: uuid.UUID) -> None:
        await daemon._on_frame(dispatch(daemon, key, task_id))
        while daemon.running:
            await asyncio.sleep(0.01)

    asyncio.run(run(first))
    (refused,) = link.frames
    assert refused["type"] == "reject" and "No space left" in refused["message"]["reason"]
    assert recover(refused) == daemon.node_id
    assert daemon.outbox.get(first) is None and daemon.running == {}
    full[0] = False
    asyncio.run(run(second))
    assert link.frames[-1]["type"] == "result"
    assert link.frames[-1]["message"]["task_id"] == "0x" + second.hex


# --- registration: which answers are final ---------------------------------------------------


@pytest.mark.parametrize(
    ("status", "final"),
    [
        (400, True),
        (403, True),
        (409, False),
        (408, False),
        (429, False),
        (500, False),
        (503, False),
    ],
)
def test_only_a_definite_no_to_registration_is_final(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, status: int, final: bool
) -> None:
    """A 4xx about the manifest ends the daemon with exit status 78, which the systemd
    unit does not restart on; a 408 or 429 and any 5xx are retried with backoff,
    and so is 409 "stale manifest": the one on record was issued on a clock that ran
    ahead, and a manifest issued again once this clock passes it is taken."""
    import httpx

    from nodeclient.node import service
    from nodeclient.node.link import RegistrationRefused

    real_client = httpx.AsyncClient
    transport = httpx.MockTransport(
        as_sent(lambda _request: httpx.Response(status, json={"error": "no"}))
    )
    monkeypatch.setattr(httpx, "AsyncClient", lambda **kw: real_client(transport=transport, **kw))
    daemon, _, _ = make_daemon(tmp_path)
    try:
        with pytest.raises(RegistrationRefused if final else httpx.HTTPError) as caught:
            asyncio.run(daemon.register())
    finally:
        daemon.outbox.close()
    assert f"({status}): no" in str(caught.value)
    if final:
        assert caught.value.exit_code == 78  # type: ignore[union-attr]
        assert caught.value.exit_code in service.NO_RESTART_STATUSES  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("status", "retry_after", "pause"),
    [
        (429, "30", (30.0, 45.0)),  # the coordinator's per-address limit
        (503, "7", (7.0, 10.5)),
        (429, "86400", (600.0, 900.0)),  # at most MAX_RETRY_AFTER_S (and its spread)
        (429, "Wed, 21 Oct 2026 07:28:00 GMT", (0.0, 0.0)),  # a date: not honoured
        (429, "-5", (0.0, 0.0)),
        (429, "nan", (0.0, 0.0)),
        (500, "30", (0.0, 0.0)),  # only for a 429 or a 503
    ],
)
def test_a_registration_told_to_retry_later_waits_that_long(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    status: int,
    retry_after: str,
    pause: tuple[float, float],
) -> None:
    """A 429 (the coordinator's registrations-per-address limit) or a 503 with a
    Retry-After in seconds sets the pause before the next try to that, stretched by up to
    half again so that nodes refused together spread out; retrying sooner would only be
    refused again."""
    real_client = httpx.AsyncClient
    transport = httpx.MockTransport(
        as_sent(
            lambda _request: httpx.Response(
                status, json={"error": "too many"}, headers={"Retry-After": retry_after}
            )
        )
    )
    monkeypatch.setattr(httpx, "AsyncClient", lambda **kw: real_client(transport=transport, **kw))
    daemon, _, _ = make_daemon(tmp_path)
    try:
        with pytest.raises(httpx.HTTPError, match=f"\\({status}\\): too many"):
            asyncio.run(daemon.register())
    finally:
        daemon.outbox.close()
    low, high = pause
    assert low <= daemon._pause <= high


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(404),  # empty: a proxy with no route yet, mid-deploy
        httpx.Response(403, json={}),
        httpx.Response(401, json={"detail": "Not authenticated"}),  # an auth proxy's JSON
        httpx.Response(400, json={"error": ""}),
    ],
)
def test_a_4xx_without_the_coordinators_refusal_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answer: httpx.Response
) -> None:
    """Only the coordinator's own refusal, a 4xx carrying {"error": "..."}, ends the daemon
    for good; any other 4xx is retried with backoff, its status in the message."""
    from nodeclient.node.link import RegistrationRefused

    real_client = httpx.AsyncClient
    transport = httpx.MockTransport(as_sent(lambda _request: answer))
    monkeypatch.setattr(httpx, "AsyncClient", lambda **kw: real_client(transport=transport, **kw))
    daemon, _, _ = make_daemon(tmp_path)
    try:
        with pytest.raises(httpx.HTTPError) as caught:
            asyncio.run(daemon.register())
    finally:
        daemon.outbox.close()
    assert not isinstance(caught.value, RegistrationRefused)
    assert f"registration failed ({answer.status_code})" in str(caught.value)


@pytest.mark.parametrize(
    "error",
    [OSError(5, "Input/output error"), sqlite3.OperationalError("disk I/O error")],
    ids=["EIO", "sqlite"],
)
def test_a_dispatch_whose_outbox_lookup_fails_is_neither_run_nor_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    """The outbox cannot say (EIO, SQLite's own I/O error) whether the task is done: the
    daemon does not run it (it may be) nor refuse it (its result may be intact), and the
    link stays up (a SQLite error escaped and dropped the link, on every re-dispatch)."""
    daemon, key, link = make_daemon(tmp_path)  # NeverRun: running it fails the test

    def failing_get(task_id: uuid.UUID) -> None:
        raise error

    monkeypatch.setattr(daemon.outbox, "get", failing_get)
    try:
        asyncio.run(daemon._on_frame(dispatch(daemon, key, uuid.uuid4())))
    finally:
        daemon.outbox.close()
    assert link.frames == [] and daemon.running == {}


def test_an_input_download_stops_at_the_lease_and_the_task_is_refused(
    tmp_path: Path, drip: str
) -> None:
    """A model URL that drips a byte now and then: the download stops when the lease
    ends, in the daemon's own fetch threads, and the task is refused with that reason.
    It timed out, as a task killed at its lease's end in a worker: counted as timed out
    (status, metric), not as the requester's bad input, nor as rejected too."""
    daemon, key, link = make_daemon(tmp_path, executor=Answers)
    daemon._fetch = http_fetcher(drip)
    task_id = uuid.uuid4()
    request = make_request(
        identity_model(), {"x": np.zeros(4, np.float32)}, inline=False, model_url=drip + "/m"
    )
    env = envelope.seal(
        request.encode(), public_key=key.public_key(), task_id=task_id,
        node_id=daemon.node_id, expires_at=int(time.time()) + 600,
    )  # fmt: skip
    lease_end = int(time.time()) + 2
    frame = messages.Dispatch(task_id, uuid.uuid4(), "ai.inference", lease_end, env)

    async def scenario() -> None:
        await daemon._on_frame(json.dumps(frame.to_wire()))
        while daemon.running:
            await asyncio.sleep(0.05)

    began = time.monotonic()
    asyncio.run(asyncio.wait_for(scenario(), 15))  # unbounded, it would drip for hours
    assert time.monotonic() - began < 6
    (refused,) = link.frames
    assert refused["type"] == "reject"
    reason = refused["message"]["reason"]
    assert reason.startswith("deadline exceeded: input download GET "), reason
    assert "did not finish before the task's deadline" in reason
    status = daemon.status()
    assert (status["timed_out"], status["rejected"], status["failed"]) == (1, 0, 0)
    metrics = daemon.metrics.exposition().decode()
    assert 'tasks_total{outcome="timed_out",workload_class="ai.inference"} 1.0' in metrics
    assert 'outcome="rejected"' not in metrics
    daemon._fetch_pool.shutdown(wait=True)


class NotifyingLink(Capture):
    """A link that says when a frame has gone out."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = asyncio.Event()

    async def send(self, data: str) -> None:
        await super().send(data)
        self.sent.set()


def test_a_dispatch_right_after_a_result_finds_the_slot_free(tmp_path: Path) -> None:
    """The coordinator may lease the slot again as soon as it has the result: the next
    dispatch, handled the moment the result has gone out, is run, not refused as over
    capacity."""
    daemon, key, _ = make_daemon(tmp_path, executor=Answers)
    first, second = uuid.uuid4(), uuid.uuid4()

    async def scenario() -> NotifyingLink:
        link = NotifyingLink()
        daemon._ws = link  # type: ignore[assignment]
        await daemon._on_frame(dispatch(daemon, key, first))
        await link.sent.wait()  # resumed in the turn after the send, as a frame handler is
        await daemon._on_frame(dispatch(daemon, key, second))
        while daemon.running:
            await asyncio.sleep(0.01)
        return link

    link = asyncio.run(scenario())
    assert [(f["type"], f["message"]["task_id"]) for f in link.frames] == [
        ("result", "0x" + first.hex), ("result", "0x" + second.hex),
    ]  # fmt: skip
