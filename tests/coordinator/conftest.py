"""Fixtures: a real coordinator on 127.0.0.1 (uvicorn in a thread) and simulated nodes.

The coordinator runs with a ManualClock, so leases, heartbeat timeouts and the unstake
cooldown are crossed by moving the clock, never by sleeping. Nodes are simulated with
real keys: secp256k1 node and liveness keys and an RSA-3072 payload key.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import create_engine
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from nodeclient.clock import ManualClock
from nodeclient.coordinator import audit, models
from nodeclient.coordinator.app import create_app
from nodeclient.coordinator.client import CoordinatorClient
from nodeclient.coordinator.config import CoordinatorConfig, SybilPolicy
from nodeclient.coordinator.server import build_server, listen, url_of
from nodeclient.coordinator.service import Coordinator
from nodeclient.coordinator.store import Database
from nodeclient.protocol import eip712, envelope, manifest, messages
from nodeclient.protocol.proof import proof_of_execution
from nodeclient.protocol.secp import Secp256k1Key
from nodeclient.workloads import inference
from tests.models import identity_model

CHAIN = eip712.DEVNET_CHAIN_ID
START = 1_765_000_000.0
WALLET = "0x1111111111111111111111111111111111111111"
RECV_TIMEOUT = 10.0


@pytest.fixture(scope="session")
def rsa_keys() -> list[rsa.RSAPrivateKey]:
    """Three RSA-3072 payload keys, generated once (each takes a moment)."""
    return [rsa.generate_private_key(public_exponent=65537, key_size=3072) for _ in range(3)]


@dataclass
class SimNode:
    """A simulated node: its keys, and helpers that build correctly signed frames."""

    node_key: Secp256k1Key
    liveness: Secp256k1Key
    payload_key: rsa.RSAPrivateKey
    wallet: str = WALLET
    region: str = "eu-west"
    classes: tuple[str, ...] = ("ai.inference",)
    seq: int = 0
    ws: ClientConnection | None = field(default=None, repr=False)

    @property
    def node_id(self) -> str:
        return self.node_key.address

    def manifest(self, *, issued_at: int, **kw: Any) -> dict[str, Any]:
        args: dict[str, Any] = {
            "node_key": self.node_key,
            "liveness_address": self.liveness.address,
            "payload_key": self.payload_key,
            "wallet_address": self.wallet,
            "region": self.region,
            "cpu": {"model": "test", "cores": 4, "ram_gb": 8},
            "gpu": [],
            "workload_classes": list(self.classes),
            "max_parallel_subtasks": 1,
            "client_version": "0.1.0",
            "issued_at": issued_at,
            "chain_id": CHAIN,
        }
        args.update(kw)
        return manifest.build_manifest(**args)

    def auth(self, challenge: dict[str, Any], *, key: Secp256k1Key | None = None,
             issued_at: int | None = None) -> dict[str, Any]:  # fmt: skip
        msg = {
            "node_id": self.node_id,
            "coordinator_id": challenge["coordinator_id"],
            "nonce": bytes.fromhex(challenge["nonce"][2:]),
            "issued_at": int(START) if issued_at is None else issued_at,
        }
        sig = eip712.sign_typed(key or self.liveness, "LinkAuth", msg, chain_id=CHAIN)
        return messages.signed_frame("auth", msg, sig)

    def heartbeat(self, *, seq: int | None = None, key: Secp256k1Key | None = None,
                  state: str = "READY", running: tuple[str, ...] = ()) -> dict[str, Any]:  # fmt: skip
        if seq is None:
            self.seq += 1
            seq = self.seq
        msg = {
            "node_id": self.node_id, "seq": seq, "state": state,
            "running_tasks": [uuid.UUID(t).bytes for t in running],
            "load_permille": 0, "sent_at": int(START),
        }  # fmt: skip
        sig = eip712.sign_typed(key or self.liveness, "Heartbeat", msg, chain_id=CHAIN)
        return messages.signed_frame("heartbeat", msg, sig)

    def open(self, dispatch: dict[str, Any], *, now: int = int(START)) -> bytes:
        d = messages.Dispatch.from_wire(dispatch)
        return envelope.open_envelope(
            d.envelope, private_key=self.payload_key, task_id=d.task_id,
            node_id=self.node_id, now=now,
        )  # fmt: skip

    def result(self, dispatch: dict[str, Any], result: bytes, *, proof: bytes | None = None,
               key: Secp256k1Key | None = None, size: int | None = None) -> dict[str, Any]:  # fmt: skip
        task_id = uuid.UUID(dispatch["task_id"])
        msg = {
            "task_id": task_id.bytes,
            "job_id": uuid.UUID(dispatch["job_id"]).bytes,
            "node_id": self.node_id,
            "proof": proof
            or proof_of_execution(task_id=task_id, result=result, node_id=self.node_id),
            "result_size": len(result) if size is None else size,
            "completed_at": int(START),
        }
        sig = eip712.sign_typed(key or self.node_key, "Result", msg, chain_id=CHAIN)
        return messages.signed_frame("result", msg, sig, result=result)

    def reject(self, task_id: str, reason: str = "out of memory", *,
               lease_expires_at: int | None = None) -> dict[str, Any]:  # fmt: skip
        """A signed reject; with *lease_expires_at*, echoing that dispatch's lease."""
        msg = {"node_id": self.node_id, "task_id": uuid.UUID(task_id).bytes, "reason": reason,
               "rejected_at": int(START)}  # fmt: skip
        sig = eip712.sign_typed(self.node_key, "Reject", msg, chain_id=CHAIN)
        if lease_expires_at is None:  # as a node from before the echo sends it
            return messages.signed_frame("reject", msg, sig)
        return messages.signed_frame("reject", msg, sig, lease_expires_at=lease_expires_at)

    # --- link I/O ---------------------------------------------------------------------------

    def send(self, frame: dict[str, Any] | str) -> None:
        assert self.ws is not None
        self.ws.send(frame if isinstance(frame, str) else json.dumps(frame))

    def recv(self, *, skip: tuple[str, ...] = ()) -> dict[str, Any]:
        """The next frame, skipping the types in *skip* (e.g. a stray cancel)."""
        assert self.ws is not None
        while True:
            frame: dict[str, Any] = json.loads(self.ws.recv(timeout=RECV_TIMEOUT))
            if frame["type"] not in skip:
                return frame

    def call(self, frame: dict[str, Any] | str) -> dict[str, Any]:
        self.send(frame)
        return self.recv()


def make_node(keys: list[rsa.RSAPrivateKey], index: int, **kw: Any) -> SimNode:
    return SimNode(Secp256k1Key.generate(), Secp256k1Key.generate(), keys[index], **kw)


@dataclass
class Running:
    """A coordinator serving on a real port, with handles the tests need."""

    url: str
    coord: Coordinator
    clock: ManualClock
    client: CoordinatorClient
    config: CoordinatorConfig
    links: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    @property
    def ws_url(self) -> str:
        return "ws" + self.url[4:] + "/v1/link"

    def connect(self) -> ClientConnection:
        # Entered on the ExitStack: websockets wants its connections used as contexts.
        return self.links.enter_context(
            connect(self.ws_url, max_size=None, open_timeout=RECV_TIMEOUT)
        )

    def register(self, node: SimNode, **kw: Any) -> dict[str, Any]:
        return self.client.register(node.manifest(issued_at=int(self.clock.now()), **kw))

    def link(self, node: SimNode) -> dict[str, Any]:
        """Open the node's link and complete the handshake; returns the welcome frame."""
        node.ws = self.connect()
        challenge = node.recv()
        assert challenge["type"] == "challenge"
        return node.call(node.auth(challenge, issued_at=int(self.clock.now())))

    def wait_job(
        self, job_id: str, status: str, *, timeout: float = RECV_TIMEOUT
    ) -> dict[str, Any]:
        """Poll the job until *status* (the scheduler runs in the server's thread)."""
        end = time.monotonic() + timeout
        while True:
            job = self.client.job(job_id)
            if job["status"] == status or time.monotonic() > end:
                return job
            time.sleep(0.02)


def start(config: CoordinatorConfig, clock: ManualClock) -> tuple[Running, Any, threading.Thread]:
    app = create_app(config, clock=clock)
    sock = listen("127.0.0.1", 0)
    server = build_server(app, host="127.0.0.1", port=sock.getsockname()[1])
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    end = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < end, "coordinator did not start"
        time.sleep(0.01)
    url = url_of(sock, "127.0.0.1")
    return (
        Running(url, app.state.coordinator, clock, CoordinatorClient(url), config),
        server,
        thread,
    )


def stop(running: Running, server: Any, thread: threading.Thread) -> None:
    running.links.close()
    running.client.close()
    server.should_exit = True
    thread.join(timeout=10)


# Run the suite on another database (e.g. PostgreSQL) by URL; each test starts empty.
DB_URL = os.environ.get("NODECLIENT_TEST_DB_URL") or None


@pytest.fixture(autouse=True)
def _fresh_database() -> None:
    """With NODECLIENT_TEST_DB_URL set, drop every coordinator table before each test."""
    if DB_URL is not None:
        engine = create_engine(DB_URL)
        models.Base.metadata.drop_all(engine)
        engine.dispose()


def config_for(**kw: Any) -> CoordinatorConfig:
    args: dict[str, Any] = {
        "db_url": DB_URL,
        "coordinator_id": "coordinator-test",
        "heartbeat_interval": 30.0,
        "schedule_interval": 0.02,
        "lease_seconds": 300.0,
        "max_attempts": 3,
        "sybil": SybilPolicy(max_nodes_per_wallet=2),
    }
    args.update(kw)
    return CoordinatorConfig(**args)


@pytest.fixture
def start_coordinator(tmp_path: Path) -> Iterator[Callable[..., Running]]:
    """Start a coordinator with config overrides; all are stopped after the test."""
    started: list[tuple[Running, Any, threading.Thread]] = []

    def factory(*, clock: ManualClock | None = None, **kw: Any) -> Running:
        kw.setdefault("data_dir", tmp_path)
        item = start(config_for(**kw), clock or ManualClock(START))
        started.append(item)
        return item[0]

    yield factory
    for item in reversed(started):
        stop(*item)


@pytest.fixture
def coordinator(start_coordinator: Callable[..., Running]) -> Running:
    """A running coordinator with the default test configuration."""
    return start_coordinator()


def inference_payload(values: list[float]) -> bytes:
    """A real ai.inference request: the identity model over one float32 input."""
    model = identity_model(shape=[len(values)])
    return inference.make_request(model, {"x": np.asarray(values, dtype=np.float32)}).encode()


def inference_result(payload: bytes, values: list[float]) -> bytes:
    """A well-formed ai.inference result for *payload* with output y = values."""
    req = inference.InferenceRequest.decode(payload)
    return inference.encode_result(
        {"y": np.asarray(values, dtype=np.float32)}, model_sha256=req.model_sha256
    )


def run_inference_job(
    running: Running, node: SimNode, values: list[float], **kw: Any
) -> dict[str, Any]:
    """An ai.inference job over *values* run by *node* (registered and linked), as the
    jobs API shows it once it succeeded."""
    payload = inference_payload(values)
    job = running.client.submit_job("ai.inference", payload, **kw)
    dispatch = node.recv()
    ack = node.call(node.result(dispatch, inference_result(payload, values)))
    assert ack["status"] == "accepted", ack
    done = running.wait_job(job["job_id"], "succeeded")
    assert done["status"] == "succeeded"
    return done


def audit_job(running: Running, job: dict[str, Any], **kw: Any) -> audit.JobReport:
    """`verify` of *job* against *running*: its results, its manifests (unless *kw*
    gives another ``fetch_manifest``) and its job result, as the coordinator serves them."""
    client = running.client
    kw.setdefault("fetch_manifest", client.manifest)
    return audit.audit_job(
        job, client.task_result, lambda: client.raw_job_result(job["job_id"]), **kw
    )


def _drain(ws: ClientConnection) -> None:
    while True:
        ws.recv(timeout=RECV_TIMEOUT)


def closed_code(ws: ClientConnection) -> tuple[int, str]:
    """Read until the server closes; the close code and reason it sent."""
    with pytest.raises(ConnectionClosed) as info:
        _drain(ws)
    rcvd = info.value.rcvd
    assert rcvd is not None
    return rcvd.code, rcvd.reason


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    """A database of the test's own: SQLite in its temporary directory."""
    database = Database(f"sqlite:///{tmp_path / 'c.db'}")
    try:
        yield database
    finally:
        database.close()


@pytest.fixture
def any_db(tmp_path: Path) -> Iterator[Database]:
    """The suite's database: PostgreSQL with NODECLIENT_TEST_DB_URL, else SQLite."""
    database = Database(DB_URL or f"sqlite:///{tmp_path / 'c.db'}")
    try:
        yield database
    finally:
        database.close()


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """serve configures the nodeclient logger on the captured stderr: undo that after."""
    root = logging.getLogger("nodeclient")
    saved = (root.handlers[:], root.level, root.propagate)
    yield
    root.handlers[:], root.level, root.propagate = saved[0], saved[1], saved[2]
