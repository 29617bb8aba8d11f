"""Jobs end to end: submit, seal and dispatch, signed return, verification (2.3.4-2.3.7)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import uuid

import httpx
import numpy as np
import pybase64
import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from nodeclient.coordinator import classes, results, store
from nodeclient.coordinator import models as m
from nodeclient.errors import LocalProtocolError, RemoteProtocolError
from nodeclient.protocol import eip712
from nodeclient.workloads.inference import make_request
from nodeclient.workloads.tensors import decode_tensors, encode_tensors
from tests.coordinator.conftest import (
    RECV_TIMEOUT,
    Running,
    SimNode,
    closed_code,
    inference_payload,
    inference_result,
    make_node,
)
from tests.models import identity_model

VALUES = [1.0, 2.0, 3.0]


def _ready(running: Running, node: SimNode) -> None:
    running.register(node)
    running.link(node)


def _submit_and_dispatch(running: Running, node: SimNode) -> tuple[bytes, dict, dict]:
    payload = inference_payload(VALUES)
    job = running.client.submit_job("ai.inference", payload)
    dispatch = node.recv()
    assert dispatch["type"] == "dispatch"
    return payload, job, dispatch


def test_submit_returns_queued_job_with_one_task(coordinator: Running) -> None:
    """An ai.inference job is one queued task with the whole payload."""
    job = coordinator.client.submit_job("ai.inference", inference_payload(VALUES))
    assert job["status"] == "queued"
    assert [(t["slice_index"], t["status"], t["attempts"]) for t in job["tasks"]] == [
        (0, "queued", 0)
    ]
    assert coordinator.client.jobs()[0]["job_id"] == job["job_id"]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"workload_class": "ai.dance", "payload": "AAAA"}, "unknown workload class"),
        ({"workload_class": "ai.inference", "payload": "!!"}, "not valid base64"),
        ({"workload_class": "ai.inference", "payload": "AAAA"}, "ai.inference payload"),
        ({"workload_class": "ai.inference", "payload": "AAAA", "min_tier": 9}, "min_tier"),
        (
            {"workload_class": "ai.inference", "payload": "AAAA", "resources": {"ram_mb": -1}},
            "ram_mb",
        ),
        (
            {"workload_class": "ai.inference", "payload": "AAAA", "resources": {"gpus": 2}},
            "gpus",
        ),
        (
            {"workload_class": "ai.inference", "payload": "AAAA", "resources": {"vram_mb": "8"}},
            "vram_mb",
        ),
    ],
)
def test_submit_validates(coordinator: Running, body: dict, reason: str) -> None:
    """Bad jobs are refused with 400 and a reason: class, base64, payload format, limits."""
    r = httpx.post(coordinator.url + "/v1/jobs", json=body)
    assert r.status_code == 400
    assert reason in r.json()["error"]


@pytest.mark.parametrize("field", ["workload_class", "payload", "region"])
def test_lone_surrogate_in_the_body_is_a_400(coordinator: Running, field: str) -> None:
    """A JSON body may carry "\\ud800", a string UTF-8 cannot encode: wherever it is, the
    job is refused with a 400 and a reason that can itself be sent, never a 500."""
    body = {"workload_class": "ai.inference",
            "payload": pybase64.b64encode_as_string(inference_payload(VALUES))}  # fmt: skip
    body[field] = body.get(field, "") + "\ud800"
    raw = json.dumps(body)  # ASCII: the surrogate travels as the escape \\ud800
    assert "\\ud800" in raw
    r = httpx.post(coordinator.url + "/v1/jobs", content=raw,
                   headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 400, r.text
    assert r.json()["error"]
    assert coordinator.client.jobs() == []


def _with_split(monkeypatch: pytest.MonkeyPatch, split: classes.Split) -> None:
    """ai.inference, but with this split: class code the API runs on a submission."""
    wclass = classes.REGISTRY["ai.inference"]
    monkeypatch.setitem(classes.REGISTRY, "ai.inference", dataclasses.replace(wclass, split=split))


@pytest.mark.parametrize(
    "exc",
    [
        LocalProtocolError("a name or metadata string is not valid Unicode: \ud800"),
        ValueError("a value the class could not take"),
        UnicodeEncodeError("utf-8", "http://\ud800", 7, 8, "surrogates not allowed"),
    ],
)
def test_class_code_errors_are_a_400_with_the_reason(
    coordinator: Running, monkeypatch: pytest.MonkeyPatch, exc: Exception
) -> None:
    """Whatever ProtocolError or ValueError a class's code raises on a submission is a 400
    whose reason is the error's (a surrogate in it escaped), not a 500."""

    def split(_payload: bytes, _slices: int) -> list[bytes]:
        raise exc

    _with_split(monkeypatch, split)
    r = httpx.post(coordinator.url + "/v1/jobs", json={
        "workload_class": "ai.inference",
        "payload": pybase64.b64encode_as_string(inference_payload(VALUES)),
    })  # fmt: skip
    assert r.status_code == 400, r.text
    expected = str(exc).encode("utf-8", "backslashreplace").decode()
    assert r.json() == {"error": expected}
    assert coordinator.client.jobs() == []


def test_validate_and_split_run_off_the_event_loop(
    coordinator: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While one submission's split is still working (a large render job's can take
    seconds), the coordinator keeps answering: /healthz replies before the split ends."""
    started, release = threading.Event(), threading.Event()

    def slow_split(payload: bytes, slices: int) -> list[bytes]:
        started.set()
        release.wait(timeout=RECV_TIMEOUT)
        return [payload] * slices

    _with_split(monkeypatch, slow_split)
    replies: list[httpx.Response] = []
    body = {"workload_class": "ai.inference",
            "payload": pybase64.b64encode_as_string(inference_payload(VALUES))}  # fmt: skip
    url = coordinator.url + "/v1/jobs"
    submit = threading.Thread(
        target=lambda: replies.append(httpx.post(url, json=body, timeout=2 * RECV_TIMEOUT))
    )
    submit.start()
    try:
        assert started.wait(timeout=RECV_TIMEOUT)
        health = httpx.get(coordinator.url + "/healthz", timeout=RECV_TIMEOUT / 2)
        assert health.status_code == 200
        assert not replies  # the submission is still waiting for its split
    finally:
        release.set()
        submit.join(timeout=2 * RECV_TIMEOUT)
    assert replies[0].status_code == 201, replies[0].text


def test_inference_cannot_be_sliced(coordinator: Running) -> None:
    """2.3.5: an inference request runs whole, so slices must be 1."""
    with pytest.raises(RemoteProtocolError, match="runs whole"):
        coordinator.client.submit_job("ai.inference", inference_payload(VALUES), slices=2)


def test_dispatch_result_and_public_verification(coordinator: Running, rsa_keys) -> None:
    """A linked node gets the sealed payload; its signed result completes the job, and the
    exported proof and EIP-712 signature verify with hashlib and eth-account alone."""
    node = make_node(rsa_keys, 0)
    _ready(coordinator, node)
    payload, job, dispatch = _submit_and_dispatch(coordinator, node)
    assert dispatch["job_id"] == job["job_id"]
    assert dispatch["workload_class"] == "ai.inference"
    assert dispatch["lease_expires_at"] == int(coordinator.clock.now() + 300)
    assert node.open(dispatch) == payload
    result = inference_result(payload, VALUES)
    ack = node.call(node.result(dispatch, result))
    assert ack == {"type": "result_ack", "task_id": dispatch["task_id"], "status": "accepted",
                   "reason": "", "of": "result"}  # fmt: skip

    done = coordinator.wait_job(job["job_id"], "succeeded")
    assert done["status"] == "succeeded"
    task = done["tasks"][0]
    assert task["node_id"] == node.node_id
    assert task["attempts"] == 1
    expected = hashlib.sha256(
        uuid.UUID(task["task_id"]).bytes + result + bytes.fromhex(node.node_id[2:])
    ).hexdigest()
    assert task["proof"] == "0x" + expected
    assert task["result_sha256"] == hashlib.sha256(result).hexdigest()
    assert task["result_size"] == len(result)
    signable = encode_typed_data(full_message=task["typed_data"])
    assert Account.recover_message(signable, signature=task["signature"]) == node.node_id
    assert task["typed_data"]["message"]["proof"] == task["proof"]
    assert coordinator.client.job_result(job["job_id"]) == result
    assert coordinator.client.task_result(task["task_id"]) == result
    # The payload is no longer kept: nothing reads it once the job has ended.
    stored = select(func.length(m.Task.payload)).where(m.Task.task_id == task["task_id"])
    assert coordinator.coord.db.run_sync(lambda s: s.scalar(stored)) == 0


def _finished(running: Running, rsa_keys) -> tuple[dict, dict]:
    """A job whose one task a node finished: (job, task) as the API shows them."""
    node = make_node(rsa_keys, 0)
    _ready(running, node)
    payload, job, dispatch = _submit_and_dispatch(running, node)
    assert node.call(node.result(dispatch, inference_result(payload, VALUES)))["status"] == (
        "accepted"
    )
    done = running.wait_job(job["job_id"], "succeeded")
    return done, done["tasks"][0]


def _set_result(running: Running, job_id: str, task_id: str, data: bytes) -> None:
    """Store *data* as both the task's and the job's result, as a large one would be."""

    def tx(s) -> None:
        s.get(m.Task, task_id).result = data
        s.get(m.Job, job_id).result = data

    running.coord.db.run_sync(tx)


def test_a_large_result_is_served_in_chunks_unchanged(
    coordinator: Running, rsa_keys, monkeypatch
) -> None:
    """A result larger than one chunk is copied out of the database in pieces (SQLite's
    blob reader, PostgreSQL's substr), beside the database thread, and served
    whole with its length; compressible or not, at and around the chunk size."""
    monkeypatch.setattr(results, "CHUNK_BYTES", 1000)
    threads: set[str] = set()
    real_copy = results.copy

    def copy(*args, **kw) -> None:
        threads.add(threading.current_thread().name)
        real_copy(*args, **kw)

    monkeypatch.setattr(results, "copy", copy)
    job, task = _finished(coordinator, rsa_keys)
    rng = np.random.default_rng(7)
    for data in (rng.bytes(1000), rng.bytes(1001), bytes(70_000), rng.bytes(7 * 1000 + 13)):
        _set_result(coordinator, job["job_id"], task["task_id"], data)
        for path in (f"/v1/jobs/{job['job_id']}/result", f"/v1/tasks/{task['task_id']}/result"):
            r = httpx.get(coordinator.url + path)
            assert r.status_code == 200, r.text
            assert r.headers["content-length"] == str(len(data))
            assert r.content == data
    assert threads, "no result was copied in pieces"
    assert "coordinator-db" not in threads


def test_a_large_result_is_served_when_no_file_can_be_written(
    coordinator: Running, rsa_keys, monkeypatch
) -> None:
    """The coordinator's disk is full: a large result cannot be spooled to a file, and is
    read whole instead (at most MAX_SPOOLS at once), not refused with a 507 while the
    database still holds it."""
    import errno

    def disk_full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(results, "CHUNK_BYTES", 1000)
    monkeypatch.setattr(results.tempfile, "TemporaryFile", disk_full)
    job, task = _finished(coordinator, rsa_keys)
    data = np.random.default_rng(3).bytes(5000)
    _set_result(coordinator, job["job_id"], task["task_id"], data)
    for path in (f"/v1/jobs/{job['job_id']}/result", f"/v1/tasks/{task['task_id']}/result"):
        r = httpx.get(coordinator.url + path)
        assert r.status_code == 200, r.text
        assert r.content == data


def test_a_result_gone_before_its_copy_is_refused(coordinator: Running) -> None:
    """A row that went (retention) between the look and the copy is ResultGone on both
    databases, not a short result."""
    import asyncio
    import tempfile

    spooler = results.Spooler(coordinator.coord.db, coordinator.coord.blobs)
    for row in (m.Task, m.Job):
        with pytest.raises(results.ResultGone):
            asyncio.run(spooler.spool(row, str(uuid.uuid4()), 5000))
    with tempfile.TemporaryFile() as out, pytest.raises(results.ResultGone):
        coordinator.coord.db.read_aside(
            lambda conn: results.copy(m.Task, str(uuid.uuid4()), 10, out, conn)
        )


def test_serving_a_result_does_not_hold_it_in_memory(coordinator: Running, rsa_keys) -> None:
    """Serving a 64 MiB result allocates a few MiB in the coordinator, not the result:
    several requesters fetching 256 MiB results at once would otherwise each hold one."""
    import tracemalloc

    job, task = _finished(coordinator, rsa_keys)
    data = np.random.default_rng(1).bytes(64 << 20)
    _set_result(coordinator, job["job_id"], task["task_id"], data)
    want = hashlib.sha256(data).hexdigest()
    del data
    tracemalloc.start()
    try:
        digest = hashlib.sha256()
        with httpx.stream("GET", f"{coordinator.url}/v1/tasks/{task['task_id']}/result") as r:
            assert r.status_code == 200
            for chunk in r.iter_bytes():
                digest.update(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert digest.hexdigest() == want
    assert peak < 16 << 20, f"peak {peak >> 20} MiB while serving a 64 MiB result"


def test_declared_resources_go_to_a_node_that_holds_them(coordinator: Running, rsa_keys) -> None:
    """A job's declared RAM and GPU memory are shown, sent with each dispatch, and only a
    node whose slot holds them (by its manifest) is offered the task; a job declaring
    nothing is dispatched without resources."""
    small, big = make_node(rsa_keys, 0), make_node(rsa_keys, 1)
    _ready(coordinator, small)  # 8 GiB, one slot: 7168 MB a slot (7/8 of it)
    payload = inference_payload(VALUES)
    job = coordinator.client.submit_job("ai.inference", payload, ram_mb=16_384)
    assert job["resources"] == {"ram_mb": 16_384}
    coordinator.register(big, cpu={"model": "test", "cores": 4, "ram_gb": 64})
    coordinator.link(big)
    dispatch = big.recv()
    assert dispatch["type"] == "dispatch" and dispatch["job_id"] == job["job_id"]
    assert dispatch["resources"] == {"ram_mb": 16_384}
    assert coordinator.client.job(job["job_id"])["tasks"][0]["node_id"] == big.node_id
    plain = coordinator.client.submit_job("ai.inference", payload)
    assert plain["resources"] == {}
    again = small.recv()
    assert again["job_id"] == plain["job_id"] and again["resources"] == {}
    gpu_job = coordinator.client.submit_job("ai.inference", payload, vram_mb=1)
    assert gpu_job["resources"] == {"vram_mb": 1}
    assert coordinator.client.job(gpu_job["job_id"])["tasks"][0]["status"] == "queued"


def test_job_result_before_success_is_409(coordinator: Running) -> None:
    """The result of a job that has not succeeded is 409 with its status."""
    job = coordinator.client.submit_job("ai.inference", inference_payload(VALUES))
    r = httpx.get(f"{coordinator.url}/v1/jobs/{job['job_id']}/result")
    assert r.status_code == 409
    assert "queued" in r.json()["error"]


def test_duplicate_result_is_acknowledged_as_duplicate(coordinator: Running, rsa_keys) -> None:
    """The same result again gets "duplicate" and changes nothing."""
    node = make_node(rsa_keys, 0)
    _ready(coordinator, node)
    payload, job, dispatch = _submit_and_dispatch(coordinator, node)
    frame = node.result(dispatch, inference_result(payload, VALUES))
    assert node.call(frame)["status"] == "accepted"
    again = node.call(frame)
    assert again["status"] == "duplicate"
    assert coordinator.wait_job(job["job_id"], "succeeded")["tasks"][0]["attempts"] == 1


def test_different_result_is_equivocation(coordinator: Running, rsa_keys) -> None:
    """A different signed result for an accepted task is recorded and rejected."""
    node = make_node(rsa_keys, 0)
    _ready(coordinator, node)
    payload, job, dispatch = _submit_and_dispatch(coordinator, node)
    first = inference_result(payload, VALUES)
    assert node.call(node.result(dispatch, first))["status"] == "accepted"
    ack = node.call(node.result(dispatch, inference_result(payload, [9.0, 9.0, 9.0])))
    assert ack["status"] == "rejected"
    assert ack["reason"].startswith("equivocation:")
    # More contradictions are answered the same way but not stored: one is the evidence,
    # and a node could sign any number of them (rows that job retention never deletes).
    for k in range(3):
        again = node.call(node.result(dispatch, inference_result(payload, [k, k, k])))
        assert again["status"] == "rejected" and again["reason"].startswith("equivocation:")
    rows = coordinator.coord.db.run_sync(lambda s: s.query(m.Equivocation).all())
    assert [(r.task_id, r.node_id) for r in rows] == [(dispatch["task_id"], node.node_id)]
    assert coordinator.client.job_result(job["job_id"]) == first


def test_an_equivocation_is_published_with_both_results_and_outlives_its_job(
    coordinator: Running, rsa_keys
) -> None:
    """GET /v1/nodes/{node_id}/equivocations: each task for which the node signed two
    different Results, both as EIP-712 typed data with their signatures, so that anyone
    recovers the node from each with eth-account and sees two proofs for one task_id.
    The record keeps both, so it stays evidence once the job is deleted (retention)."""
    node = make_node(rsa_keys, 0)
    _ready(coordinator, node)
    payload, job, dispatch = _submit_and_dispatch(coordinator, node)
    assert node.call(node.result(dispatch, inference_result(payload, VALUES)))["status"] == (
        "accepted"
    )
    other = inference_result(payload, [9.0, 9.0, 9.0])
    assert node.call(node.result(dispatch, other))["status"] == "rejected"
    url = f"{coordinator.url}/v1/nodes/{node.node_id}/equivocations"

    def evidence() -> dict:
        answer = httpx.get(url)
        assert answer.status_code == 200, answer.text
        (record,) = answer.json()
        return record

    published = evidence()
    assert (published["task_id"], published["node_id"]) == (dispatch["task_id"], node.node_id)
    proofs = set()
    for side in ("accepted", "conflicting"):
        signed = published[side]
        typed = signed["typed_data"]
        signer = Account.recover_message(
            encode_typed_data(full_message=typed), signature=signed["signature"]
        )
        assert signer == node.node_id
        assert typed["message"]["task_id"] == "0x" + uuid.UUID(dispatch["task_id"]).hex
        assert typed["message"]["proof"] == signed["proof"]
        proofs.add(signed["proof"])
    assert len(proofs) == 2
    coordinator.coord.db.run_sync(
        lambda s: store.forget_jobs_tx(s, finished_before=coordinator.clock.now() + 10**9)
    )
    with pytest.raises(RemoteProtocolError, match="404"):
        coordinator.client.job(job["job_id"])
    assert evidence() == published
    assert httpx.get(url.replace(node.node_id, "0x12")).status_code == 400


def test_a_contradiction_sent_with_bytes_that_miss_its_proof_is_still_equivocation(
    coordinator: Running, rsa_keys
) -> None:
    """After its result was accepted, a node signs a Result with another proof but sends
    bytes that do not match it: the signed message alone is the evidence (the table keeps
    no bytes), so it is recorded as equivocation rather than dropped as a proof mismatch.
    A proof mismatch on a task the node has no accepted result for stays a plain one."""
    node = make_node(rsa_keys, 0)
    _ready(coordinator, node)
    payload, job, dispatch = _submit_and_dispatch(coordinator, node)
    wrong = node.call(node.result(dispatch, inference_result(payload, VALUES), proof=b"\x01" * 32))
    assert wrong["reason"].startswith("proof mismatch")
    first = inference_result(payload, VALUES)
    assert node.call(node.result(dispatch, first))["status"] == "accepted"
    ack = node.call(node.result(dispatch, first, proof=b"\x02" * 32))
    assert ack["status"] == "rejected" and ack["reason"].startswith("equivocation:"), ack
    rows = coordinator.coord.db.run_sync(lambda s: s.query(m.Equivocation).all())
    assert [(r.task_id, r.conflicting_proof) for r in rows] == [
        (dispatch["task_id"], "0x" + "02" * 32)
    ]
    assert coordinator.client.job_result(job["job_id"]) == first


@pytest.mark.parametrize("bytes_match", [True, False], ids=["valid-bytes", "proof-only"])
def test_a_contradiction_naming_another_job_is_still_equivocation(
    coordinator: Running, rsa_keys, bytes_match: bool
) -> None:
    """The task_id alone names the task: a second Result for it with another proof is
    equivocation whatever job_id the signed message names, with bytes that match its
    proof or not. The same result under another job_id is rejected, not a duplicate."""
    node = make_node(rsa_keys, 0)
    _ready(coordinator, node)
    payload, job, dispatch = _submit_and_dispatch(coordinator, node)
    first = inference_result(payload, VALUES)
    assert node.call(node.result(dispatch, first))["status"] == "accepted"
    other = dict(dispatch, job_id=str(uuid.uuid4()))
    same = node.call(node.result(other, first))
    assert same["status"] == "rejected" and "does not belong to job" in same["reason"], same
    if bytes_match:
        frame = node.result(other, inference_result(payload, [1.0, 1.0, 1.0]))
    else:
        frame = node.result(other, first, proof=b"\x07" * 32)
    ack = node.call(frame)
    assert ack["status"] == "rejected" and ack["reason"].startswith("equivocation:"), ack
    rows = coordinator.coord.db.run_sync(lambda s: s.query(m.Equivocation).all())
    assert [(r.task_id, r.node_id) for r in rows] == [(dispatch["task_id"], node.node_id)]
    assert "0x" + uuid.UUID(other["job_id"]).hex in rows[0].conflicting_message
    assert coordinator.client.job_result(job["job_id"]) == first


def test_wrong_proof_is_rejected(coordinator: Running, rsa_keys) -> None:
    """A signed result whose proof does not recompute is rejected; the task stays leased."""
    node = make_node(rsa_keys, 0)
    _ready(coordinator, node)
    payload, job, dispatch = _submit_and_dispatch(coordinator, node)
    ack = node.call(node.result(dispatch, inference_result(payload, VALUES), proof=b"\x00" * 32))
    assert ack["status"] == "rejected"
    assert ack["reason"].startswith("proof mismatch")
    assert coordinator.client.job(job["job_id"])["tasks"][0]["status"] == "leased"


def test_wrong_size_is_rejected(coordinator: Running, rsa_keys) -> None:
    """result_size must equal the delivered byte count."""
    node = make_node(rsa_keys, 0)
    _ready(coordinator, node)
    payload, _job, dispatch = _submit_and_dispatch(coordinator, node)
    result = inference_result(payload, VALUES)
    ack = node.call(node.result(dispatch, result, size=len(result) + 1))
    assert ack["status"] == "rejected"
    assert "result_size" in ack["reason"]


def test_result_signed_by_liveness_key_is_bad_signature(coordinator: Running, rsa_keys) -> None:
    """2.3.7: results are signed by node.key; one signed by any other key is rejected,
    named by its task (so that the node settles it rather than resending it for ever),
    and changes nothing: the node's correctly signed result is still accepted."""
    node = make_node(rsa_keys, 0)
    _ready(coordinator, node)
    payload, job, dispatch = _submit_and_dispatch(coordinator, node)
    result = inference_result(payload, VALUES)
    ack = node.call(node.result(dispatch, result, key=node.liveness))
    assert (ack["type"], ack["task_id"], ack["status"]) == (
        "result_ack",
        dispatch["task_id"],
        "rejected",
    )
    assert ack["reason"].startswith("bad signature:")
    assert coordinator.client.job(job["job_id"])["tasks"][0]["status"] == "leased"
    assert node.call(node.result(dispatch, result))["status"] == "accepted"


def test_malformed_inference_result_is_rejected(coordinator: Running, rsa_keys) -> None:
    """Bytes that are not an ai.inference result are rejected even with a valid proof."""
    node = make_node(rsa_keys, 0)
    _ready(coordinator, node)
    _payload, _job, dispatch = _submit_and_dispatch(coordinator, node)
    ack = node.call(node.result(dispatch, b"not a tensor container"))
    assert ack["status"] == "rejected"
    assert "ai.inference result" in ack["reason"]


def test_result_for_task_never_leased_is_rejected(coordinator: Running, rsa_keys) -> None:
    """A node cannot deliver a result for a task it was never given."""
    holder, other = make_node(rsa_keys, 0), make_node(rsa_keys, 1)
    _ready(coordinator, holder)
    payload, _job, dispatch = _submit_and_dispatch(coordinator, holder)
    _ready(coordinator, other)
    ack = other.call(other.result(dispatch, inference_result(payload, VALUES)))
    assert ack["status"] == "rejected"
    assert "never leased to this node" in ack["reason"]


def test_result_for_wrong_job_is_rejected(coordinator: Running, rsa_keys) -> None:
    """The signed job_id must be the task's job."""
    node = make_node(rsa_keys, 0)
    _ready(coordinator, node)
    payload, _job, dispatch = _submit_and_dispatch(coordinator, node)
    ack = node.call(node.result({**dispatch, "job_id": str(uuid.uuid4())},
                                inference_result(payload, VALUES)))  # fmt: skip
    assert ack["status"] == "rejected"
    assert "does not belong to job" in ack["reason"]


def test_signed_reject_requeues_elsewhere(coordinator: Running, rsa_keys) -> None:
    """A node's signed reject re-queues the task to another node; the attempt counts."""
    first, second = make_node(rsa_keys, 0), make_node(rsa_keys, 1)
    _ready(coordinator, first)
    _payload, job, dispatch = _submit_and_dispatch(coordinator, first)
    _ready(coordinator, second)
    assert first.call(first.reject(dispatch["task_id"]))["status"] == "accepted"
    again = second.recv()
    assert again["type"] == "dispatch"
    assert again["task_id"] == dispatch["task_id"]
    task = coordinator.client.job(job["job_id"])["tasks"][0]
    assert task["node_id"] == second.node_id
    assert task["attempts"] == 2


def test_eip712_typed_data_matches_signed_struct(coordinator: Running, rsa_keys) -> None:
    """The exported typed_data is exactly our Result struct on our domain."""
    node = make_node(rsa_keys, 0)
    _ready(coordinator, node)
    payload, job, dispatch = _submit_and_dispatch(coordinator, node)
    node.call(node.result(dispatch, inference_result(payload, VALUES)))
    typed = coordinator.wait_job(job["job_id"], "succeeded")["tasks"][0]["typed_data"]
    assert typed["primaryType"] == "Result"
    assert typed["domain"] == {"name": "nodeclient", "version": "1", "chainId": 31337}
    assert [f["name"] for f in typed["types"]["Result"]] == [n for n, _ in eip712.TYPES["Result"]]


def test_progress_of_a_leased_task_shows_in_the_jobs_api(coordinator: Running, rsa_keys) -> None:
    """A node's progress frames appear on its leased task, are refused when malformed,
    and disappear once the task has its result."""
    node = make_node(rsa_keys, 0)
    _ready(coordinator, node)
    payload, job, dispatch = _submit_and_dispatch(coordinator, node)
    assert coordinator.client.job(job["job_id"])["tasks"][0]["progress"] is None
    node.send({"type": "progress", "task_id": dispatch["task_id"], "done": 2, "total": 6,
               "note": "frame 3 saved"})  # fmt: skip
    node.send({"type": "progress", "task_id": dispatch["task_id"], "done": 9, "total": 6,
               "note": ""})  # fmt: skip
    err = node.recv(skip=("heartbeat_ack",))
    assert err["type"] == "error" and err["code"] == "malformed"
    task = coordinator.client.job(job["job_id"])["tasks"][0]
    assert task["progress"] == {"done": 2.0, "total": 6.0, "note": "frame 3 saved"}
    ack = node.call(node.result(dispatch, inference_result(payload, VALUES)))
    assert ack["status"] == "accepted"
    done = coordinator.wait_job(job["job_id"], "succeeded")
    assert done["tasks"][0]["progress"] is None


def test_progress_is_kept_only_for_tasks_the_node_was_sent_or_says_it_holds(
    coordinator: Running, rsa_keys
) -> None:
    """Progress on a task id this link never dispatched and the node's heartbeats do not
    list is dropped (a node could otherwise fill two entries a slot it declares with ids
    of its own making, shown nowhere). After a relink, a task dispatched on the old link
    and listed in the new link's first heartbeat still shows its progress; an id of the
    node's own making listed there does not."""
    node = make_node(rsa_keys, 0)
    _ready(coordinator, node)
    _, job, dispatch = _submit_and_dispatch(coordinator, node)
    made_up = str(uuid.uuid4())
    node.send({"type": "progress", "task_id": made_up, "done": 1, "total": 2, "note": "x"})
    assert node.call(node.heartbeat())["type"] == "heartbeat_ack"  # its frame was read
    assert coordinator.coord.progress.get(made_up, node_id=node.node_id) is None
    coordinator.link(node)  # a new link: nothing dispatched on it yet
    # its first heartbeat names the task it holds, and an id of its own making
    held = (dispatch["task_id"], made_up)
    assert node.call(node.heartbeat(running=held))["type"] == "heartbeat_ack"
    node.send({"type": "progress", "task_id": dispatch["task_id"], "done": 3, "total": 6,
               "note": "frame 3 saved"})  # fmt: skip
    node.send({"type": "progress", "task_id": made_up, "done": 1, "total": 2, "note": "x"})
    node.send(node.heartbeat(running=(dispatch["task_id"],)))
    assert node.recv(skip=("cancel",))["type"] == "heartbeat_ack"  # (the made-up id's cancel)
    task = coordinator.client.job(job["job_id"])["tasks"][0]
    assert task["progress"] == {"done": 3.0, "total": 6.0, "note": "frame 3 saved"}
    assert coordinator.coord.progress.get(made_up, node_id=node.node_id) is None


def test_a_former_holder_cannot_hide_the_holders_progress(start_coordinator, rsa_keys) -> None:
    """A node whose lease of a task ended still knows its id: its later progress frames
    on it neither replace nor hide the report of the node that holds the task now."""
    running = start_coordinator(heartbeat_interval=1000.0)
    old, new = make_node(rsa_keys, 0), make_node(rsa_keys, 1)
    running.register(old)
    running.link(old)
    job = running.client.submit_job("ai.inference", inference_payload(VALUES))
    first = old.recv()
    running.register(new)
    running.link(new)
    running.clock.advance(301)  # the lease ends; the task goes to the other node
    assert old.recv()["type"] == "cancel"
    second = new.recv()
    assert second["task_id"] == first["task_id"]
    new.send({"type": "progress", "task_id": first["task_id"], "done": 5, "total": 10,
              "note": "holder"})  # fmt: skip
    assert new.call(new.heartbeat())["type"] == "heartbeat_ack"  # its frame was read
    running.clock.advance(1)  # the former holder's report is the newer one
    old.send({"type": "progress", "task_id": first["task_id"], "done": 0, "total": 10,
              "note": "former"})  # fmt: skip
    assert old.call(old.heartbeat())["type"] == "heartbeat_ack"
    task = running.client.job(job["job_id"])["tasks"][0]
    assert (task["node_id"], task["status"]) == (new.node_id, "leased")
    assert task["progress"] == {"done": 5.0, "total": 10.0, "note": "holder"}


def test_a_result_check_that_breaks_rejects_the_result_and_keeps_the_link(
    coordinator: Running, rsa_keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A class's result check that raises something unforeseen (RecursionError on deep
    JSON, an OverflowError) fails closed: the result is rejected with the error's type, and
    the node's link stays up instead of dropping with the task still leased."""
    node = make_node(rsa_keys, 0)
    _ready(coordinator, node)
    payload, job, dispatch = _submit_and_dispatch(coordinator, node)
    wclass = classes.REGISTRY["ai.inference"]

    def check(*_args: object, **_kw: object) -> None:
        raise RecursionError("maximum recursion depth exceeded")

    broken = dataclasses.replace(wclass, check_result=check)
    monkeypatch.setitem(classes.REGISTRY, "ai.inference", broken)
    ack = node.call(node.result(dispatch, inference_result(payload, VALUES)))
    assert ack["status"] == "rejected"
    assert ack["reason"] == "the result could not be checked (RecursionError)"
    assert node.call(node.heartbeat())["type"] == "heartbeat_ack"  # the same link
    assert coordinator.client.job(job["job_id"])["status"] == "running"


def test_a_database_error_under_a_result_check_is_no_rejection(
    coordinator: Running, rsa_keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A check's read of the database that fails (the task's payload read cancelled by a
    statement timeout, the server gone): the transaction is lost, so the result cannot
    be judged. It was answered 'rejected', which the node takes as final, and a valid
    result was thrown away. Now the link closes as for any database failure (1011), no
    ack is sent, and the node's resend after relinking is accepted."""
    node = make_node(rsa_keys, 0)
    _ready(coordinator, node)
    payload, job, dispatch = _submit_and_dispatch(coordinator, node)
    wclass = classes.REGISTRY["ai.inference"]

    def check(*_args: object, **_kw: object) -> None:
        raise OperationalError(
            "SELECT tasks.payload", {}, Exception("canceling statement due to statement timeout")
        )

    monkeypatch.setitem(
        classes.REGISTRY, "ai.inference", dataclasses.replace(wclass, check_result=check)
    )
    result = inference_result(payload, VALUES)
    node.send(node.result(dispatch, result))
    assert node.ws is not None
    code, reason = closed_code(node.ws)
    assert (code, reason) == (1011, "coordinator database unavailable; link again later")
    monkeypatch.setitem(classes.REGISTRY, "ai.inference", wclass)
    coordinator.link(node)
    ack = node.call(node.result(dispatch, result))
    assert ack["status"] == "accepted", ack
    assert coordinator.wait_job(job["job_id"], "succeeded")["status"] == "succeeded"


@pytest.mark.parametrize("field", ["model_url", "outputs"])
def test_a_payload_nested_too_deeply_is_a_400(
    coordinator: Running, field: str, stock_recursion_limit: None
) -> None:
    body = {"workload_class": "ai.inference", "payload": "", "slices": 1}
    request = make_request(identity_model(shape=[2]), {"x": np.zeros(2, np.float32)})
    tensors, meta = decode_tensors(request.encode())
    meta = {**meta, field: "[" * 50_000}
    body["payload"] = pybase64.b64encode_as_string(encode_tensors(tensors, metadata=meta))
    r = httpx.post(coordinator.url + "/v1/jobs", json=body)
    assert r.status_code == 400, r.text


def test_an_unexpected_error_in_assembly_fails_the_job_and_keeps_the_link(
    coordinator: Running, rsa_keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Assembly that breaks in an unforeseen way (a bug, MemoryError) fails the job with
    a reason and acknowledges the result; before, the acceptance rolled back and the link
    dropped, and the node's re-sent result met the same end until attempts ran out."""

    def broken(_results: object, _meta: object) -> bytes:
        raise ValueError("a bug in assembly")

    wclass = classes.REGISTRY["ai.inference"]
    monkeypatch.setitem(
        classes.REGISTRY, "ai.inference", dataclasses.replace(wclass, assemble=broken)
    )
    node = make_node(rsa_keys, 0)
    _ready(coordinator, node)
    payload, job, dispatch = _submit_and_dispatch(coordinator, node)
    ack = node.call(node.result(dispatch, inference_result(payload, VALUES)))
    assert ack["status"] == "accepted"
    done = coordinator.wait_job(job["job_id"], "failed")
    assert (done["status"], done["reason"]) == (
        "failed",
        "assembly failed: internal error (ValueError)",
    )
    assert node.call(node.heartbeat())["type"] == "heartbeat_ack"  # the link stayed up


@pytest.mark.parametrize(
    "extra",
    [{"min_teir": 4}, {"slice": 3}, {"resource": {"ram_mb": 999}}, {"slices": True},
     {"min_tier": "3"}, {"min_tier": 2.0}, {"region": 7}],
)  # fmt: skip
def test_a_job_with_a_misspelt_or_mistyped_field_is_refused(
    coordinator: Running, extra: dict
) -> None:
    """A misspelt field or a value of another type is 400 naming it, never dropped or
    coerced: a job meant for tier 4 nodes would otherwise run anywhere."""
    body = {"workload_class": "ai.inference",
            "payload": pybase64.b64encode(inference_payload(VALUES)).decode()}  # fmt: skip
    r = httpx.post(f"{coordinator.url}/v1/jobs", json={**body, **extra})
    assert r.status_code == 400, r.text
    assert next(iter(extra)) in r.json()["error"]
    assert coordinator.client.jobs() == []
    assert httpx.post(f"{coordinator.url}/v1/jobs", json=body).status_code == 201
