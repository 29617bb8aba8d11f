"""End-to-end: a real coordinator process and real node processes on loopback.

Covers registration, link, heartbeats, dispatch, decryption, inference, proof, signed
return, verification and acknowledgement; sybil rejection; a wrong liveness key; a
replayed heartbeat; kill -9 of a node and of the coordinator mid-run; and an unstake
across the 7-day cooldown (the processes' clocks are moved through --clock-file).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from websockets.sync.client import connect

from nodeclient.node import keys
from nodeclient.node.cli_keys import build_local_manifest
from nodeclient.node.config import load_config
from nodeclient.protocol import eip712, messages
from nodeclient.protocol.secp import Secp256k1Key
from nodeclient.workloads.inference import decode_result, make_request
from tests.e2e.harness import CoordinatorProc, NodeProc, wait_for
from tests.models import identity_model, slow_model

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def clock_file(tmp_path: Path) -> Path:
    f = tmp_path / "clock"
    f.write_text("0")
    return f


@pytest.fixture
def coordinator(tmp_path: Path, clock_file: Path):
    c = CoordinatorProc(tmp_path, clock_file=clock_file, extra=["--lease-seconds", "20"])
    c.start()
    yield c
    c.stop()


def verify_with_stock_tools(base_url: str, job_id: str) -> list[dict]:
    """What a stranger does: the jobs API, hashlib and eth-account, nothing of ours."""
    job = httpx.get(f"{base_url}/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job
    for task in job["tasks"]:
        result = httpx.get(f"{base_url}/v1/tasks/{task['task_id']}/result").content
        concat = uuid.UUID(task["task_id"]).bytes + result + bytes.fromhex(task["node_id"][2:])
        assert task["proof"] == "0x" + hashlib.sha256(concat).hexdigest()
        typed = task["typed_data"]
        assert typed["message"]["proof"] == task["proof"]
        assert typed["message"]["task_id"] == "0x" + uuid.UUID(task["task_id"]).hex
        assert typed["message"]["result_size"] == len(result)
        signer = Account.recover_message(
            encode_typed_data(full_message=typed), signature=bytes.fromhex(task["signature"][2:])
        )
        assert signer == task["node_id"]
    return job["tasks"]


def test_full_loop_inference_verified_by_strangers(tmp_path, coordinator, clock_file) -> None:
    """Register, link, heartbeat, dispatch, decrypt, infer, prove, sign, verify, acknowledge."""
    node = NodeProc(tmp_path, "n1", coordinator=coordinator.url, clock_file=clock_file)
    node.start()
    try:
        node.wait_linked()
        # Heartbeats flow: the sequence number grows and acknowledgements come back.
        first = wait_for(lambda: node.status()["link"]["heartbeat_seq"] >= 2, what="heartbeats")
        assert first
        assert node.status()["state"] == "READY"
        x = np.arange(12, dtype=np.float32).reshape(3, 4)
        client = coordinator.client()
        job = client.submit_job("ai.inference", make_request(identity_model(), {"x": x}).encode())
        wait_for(lambda: client.job(job["job_id"])["status"] == "succeeded", what="job success")
        tasks = verify_with_stock_tools(coordinator.url, job["job_id"])
        assert [t["node_id"] for t in tasks] == [node.node_id]
        outputs, _ = decode_result(client.job_result(job["job_id"]))
        np.testing.assert_array_equal(outputs["y"], x)
        # A model too large to inline travels by SHA-256 and blob URL: the daemon fetches
        # it (the sandboxed worker has no network), checks the hash and caches it.
        model = identity_model()
        blob = client.upload_blob(model)
        by_url = make_request(model, {"x": x * 2}, inline=False, model_url=blob["url"])
        job2 = client.submit_job("ai.inference", by_url.encode())
        wait_for(lambda: client.job(job2["job_id"])["status"] == "succeeded", what="url job")
        verify_with_stock_tools(coordinator.url, job2["job_id"])
        np.testing.assert_array_equal(
            decode_result(client.job_result(job2["job_id"]))[0]["y"], x * 2
        )
        assert any(p.name == blob["sha256"] for p in (node.home / "models").rglob("*"))
        st = wait_for(lambda: (s := node.status())["outbox_backlog"] == 0 and s, what="ack")
        assert st["completed"] == 2
        assert [(t["from"], t["to"]) for t in st["transitions"]] == [
            ("READY", "EXECUTING"),
            ("EXECUTING", "IDLE"),
            ("IDLE", "EXECUTING"),
            ("EXECUTING", "IDLE"),
        ]
        events = [e["event"] for e in node.events()]
        for expected in ("node.registered", "link.authenticated", "task.received", "state.transition",
                         "task.executed", "result.sent", "result.ack"):  # fmt: skip
            assert expected in events
        transition = next(e for e in node.events() if e["event"] == "state.transition")
        assert transition["node_id"] == node.node_id and "task_id" in transition
    finally:
        assert node.stop() == 0  # SIGTERM: drain and exit 0
    assert not (node.home / "control.sock").exists()


def test_sybil_prescreen_rejects_second_node_of_wallet(tmp_path, clock_file) -> None:
    """With max_nodes_per_wallet=1 a second node of the same wallet is refused, with the policy named."""
    c = CoordinatorProc(tmp_path, clock_file=clock_file, extra=["--max-nodes-per-wallet", "1"])
    c.start()
    try:
        a = NodeProc(tmp_path, "a", coordinator=c.url, clock_file=clock_file)
        b = NodeProc(tmp_path, "b", coordinator=c.url, clock_file=clock_file, wallet=a.wallet)
        a.start()
        a.wait_linked()
        b.start()
        assert b.proc is not None
        rc = b.proc.wait(timeout=60)
        assert rc == 78  # EX_CONFIG: the systemd unit does not restart it
        refusal = [e for e in b.events() if e["event"] == "node.registration_refused"]
        assert refusal and "sybil pre-screen" in refusal[0]["reason"]
        assert "max_nodes_per_wallet=1" in refusal[0]["reason"]
        nodes = {n["node_id"] for n in c.client().nodes()}
        assert nodes == {a.node_id}
        a.stop()
    finally:
        c.stop()


def _registered_home(tmp_path: Path, coordinator: CoordinatorProc, clock_file: Path) -> NodeProc:
    """A node home registered with the coordinator, without a daemon (we drive the link)."""
    node = NodeProc(tmp_path, "raw", coordinator=coordinator.url, clock_file=clock_file)
    manifest = build_local_manifest(node.home, load_config(node.home), lambda: b"")
    coordinator.client().register(manifest)
    return node


def _auth(ws, node: NodeProc, liveness: Secp256k1Key) -> messages.Challenge:
    challenge = messages.parse_from_coordinator(ws.recv(timeout=10))
    assert isinstance(challenge, messages.Challenge)
    msg = {
        "node_id": node.node_id,
        "coordinator_id": challenge.coordinator_id,
        "nonce": challenge.nonce,
        "issued_at": int(time.time()),
    }
    sig = eip712.sign_typed(liveness, "LinkAuth", msg, chain_id=challenge.chain_id)
    ws.send(json.dumps(messages.signed_frame("auth", msg, sig)))
    return challenge


def test_wrong_liveness_key_is_refused(tmp_path, coordinator, clock_file) -> None:
    """A LinkAuth signed by any key but the registered liveness key closes the link with 4001."""
    node = _registered_home(tmp_path, coordinator, clock_file)
    ws_url = coordinator.url.replace("http", "ws") + "/v1/link"
    with connect(ws_url) as ws:
        _auth(ws, node, Secp256k1Key.generate())
        with pytest.raises(Exception) as info:
            ws.recv(timeout=10)
    assert getattr(info.value, "rcvd", None) is not None
    assert info.value.rcvd.code == 4001
    assert "liveness" in info.value.rcvd.reason


def test_replayed_heartbeat_rejected_link_stays_up(tmp_path, coordinator, clock_file) -> None:
    """The same signed heartbeat twice: the second is refused as replayed; the link carries on."""
    node = _registered_home(tmp_path, coordinator, clock_file)
    liveness = keys.load_liveness_key(node.home)
    ws_url = coordinator.url.replace("http", "ws") + "/v1/link"
    with connect(ws_url) as ws:
        challenge = _auth(ws, node, liveness)
        welcome = messages.parse_from_coordinator(ws.recv(timeout=10))
        assert isinstance(welcome, messages.Welcome)

        def beat(seq: int) -> str:
            msg = {"node_id": node.node_id, "seq": seq, "state": "READY", "running_tasks": [],
                   "load_permille": 0, "sent_at": int(time.time())}  # fmt: skip
            sig = eip712.sign_typed(liveness, "Heartbeat", msg, chain_id=challenge.chain_id)
            return json.dumps(messages.signed_frame("heartbeat", msg, sig, running=0))

        def next_frame() -> messages.Message:
            while True:
                m = messages.parse_from_coordinator(ws.recv(timeout=10))
                if not isinstance(m, messages.Dispatch):
                    return m

        frame = beat(welcome.last_seq + 1)
        ws.send(frame)
        ack = next_frame()
        assert isinstance(ack, messages.HeartbeatAck) and ack.seq == welcome.last_seq + 1
        ws.send(frame)  # replay
        err = next_frame()
        assert isinstance(err, messages.ErrorFrame) and err.code == "replayed"
        ws.send(beat(welcome.last_seq + 2))
        ack2 = next_frame()
        assert isinstance(ack2, messages.HeartbeatAck) and ack2.seq == welcome.last_seq + 2


def test_kill9_node_and_coordinator_mid_run_loses_nothing(tmp_path, clock_file) -> None:
    """A result finished while the coordinator is down survives kill -9 of the node and is
    delivered once after both restart; the task is not executed again."""
    c = CoordinatorProc(tmp_path, clock_file=clock_file)
    c.start()
    node = NodeProc(tmp_path, "n", coordinator=c.url, clock_file=clock_file, slots=1)
    node.start()
    node.wait_linked()
    x = np.ones((1024, 512), dtype=np.float32)
    job = c.client().submit_job(
        "ai.inference", make_request(slow_model(depth=400), {"x": x}).encode()
    )
    wait_for(lambda: node.status()["running"], what="task running")
    c.kill9()  # the coordinator dies mid-run
    st = wait_for(
        lambda: (s := node.status())["outbox_backlog"] == 1 and not s["running"] and s,
        timeout=120, what="result finished into the outbox",
    )  # fmt: skip
    assert st["link"]["status"] != "up"
    node.kill9()  # and the node dies with an undelivered, signed result
    (task_id,) = [e["task_id"] for e in node.events() if e["event"] == "task.executed"]
    c.start()
    node.start()
    client = c.client()
    wait_for(
        lambda: client.job(job["job_id"])["status"] == "succeeded", timeout=90, what="delivery"
    )
    (task,) = verify_with_stock_tools(c.url, job["job_id"])
    assert task["task_id"] == task_id and task["attempts"] == 1
    second_run = node.events()
    assert not [e for e in second_run if e["event"] in ("task.received", "task.executed")]
    assert [e for e in second_run if e["event"] == "result.sent" and e.get("task_id") == task_id]
    wait_for(lambda: node.status()["outbox_backlog"] == 0, what="acknowledged")
    node.stop()
    c.stop()


def test_node_killed_while_executing_task_is_redone_once(tmp_path, clock_file) -> None:
    """kill -9 mid-execution: the restarted node's heartbeat does not list the task, so the
    coordinator queues it again at once (its lease need not run out), and one result lands.
    The lease is long enough for the second run on a slow, loaded machine: a lease that
    ran out mid-run would cancel it and spend an attempt."""
    c = CoordinatorProc(tmp_path, clock_file=clock_file, extra=["--lease-seconds", "60"])
    c.start()
    node = NodeProc(tmp_path, "n", coordinator=c.url, clock_file=clock_file, slots=1)
    node.start()
    node.wait_linked()
    x = np.ones((1024, 512), dtype=np.float32)
    job = c.client().submit_job(
        "ai.inference", make_request(slow_model(depth=400), {"x": x}).encode()
    )
    wait_for(lambda: node.status()["running"], what="task running")
    node.kill9()
    node.start()
    client = c.client()
    done = wait_for(
        lambda: (j := client.job(job["job_id"]))["status"] in ("succeeded", "failed") and j,
        timeout=150, what="redo",
    )  # fmt: skip
    assert done["status"] == "succeeded", done
    (task,) = verify_with_stock_tools(c.url, job["job_id"])
    assert task["attempts"] == 2  # the kill cost the first; the second one delivered
    node.stop()
    c.stop()


def test_unstake_across_seven_days(tmp_path, coordinator, clock_file) -> None:
    """Unstake stops new dispatches; the countdown runs over the injected clock to zero."""
    node = NodeProc(tmp_path, "n", coordinator=coordinator.url, clock_file=clock_file)
    node.start()
    try:
        node.wait_linked()
        out = subprocess.run(
            [sys.executable, "-m", "nodeclient.node.cli", "unstake", "--home", str(node.home),
             "--clock-file", str(clock_file)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert "cooldown ends" in out.stdout
        st = wait_for(lambda: (s := node.status())["state"] == "UNSTAKING" and s, what="UNSTAKING")
        assert 7 * 86400 - 120 <= st["unstake_remaining_s"] <= 7 * 86400
        client = coordinator.client()
        job = client.submit_job(
            "ai.inference", make_request(identity_model(), {"x": np.ones(2, np.float32)}).encode()
        )
        time.sleep(3 * 0.5 + 1)
        assert client.job(job["job_id"])["status"] == "queued"  # nothing dispatched to it
        assert node.status()["completed"] == 0
        clock_file.write_text(str(6 * 86400))
        st = wait_for(
            lambda: (s := node.status())["unstake_remaining_s"] < 86400 + 60 and s, what="6 days on"
        )
        assert st["state"] == "UNSTAKING" and st["unstake_remaining_s"] > 86400 - 60
        clock_file.write_text(str(7 * 86400 + 5))
        wait_for(lambda: node.status()["unstake_remaining_s"] == 0, what="cooldown over")
        assert client.node(node.node_id)["unstaking_until"] <= time.time() + 7 * 86400 + 5
    finally:
        assert node.stop() == 0


def test_status_without_daemon_fails_cleanly(tmp_path, clock_file) -> None:
    """`nodeclient status` with no daemon: one line, exit 1, no traceback."""
    node = NodeProc(tmp_path, "idle", coordinator="http://127.0.0.1:9", clock_file=clock_file)
    out = subprocess.run(
        [sys.executable, "-m", "nodeclient.node.cli", "status", "--home", str(node.home)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 1
    assert "no node daemon is running" in out.stderr and "Traceback" not in out.stderr
    assert out.stderr.count("\n") == 1
