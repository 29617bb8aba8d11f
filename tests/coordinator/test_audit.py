"""A requester's own check of a job (coordinator/audit.py, `nodeclient-coordinator verify`):
it passes on what a real coordinator publishes, and catches a coordinator that lies."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import tempfile
import tracemalloc
from typing import Any

import numpy as np
import pytest
from sqlalchemy import update

from nodeclient.coordinator import audit, classes, cli
from nodeclient.coordinator import models as m
from nodeclient.coordinator.config import SybilPolicy
from nodeclient.protocol import eip712
from nodeclient.protocol.secp import Secp256k1Key
from nodeclient.workloads import inference, render, render_slices
from tests.coordinator.conftest import (
    Running,
    audit_job,
    inference_payload,
    make_node,
    run_inference_job,
)
from tests.coordinator.test_render_jobs import SCENE, H, W, _complete, _render_node
from tests.models import identity_model

VALUES = [1.5, -2.0]
# secp256k1's group order: (r, n - s) is the high-s twin of a signature (r, s)
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


@pytest.fixture
def running(start_coordinator) -> Running:
    return start_coordinator(heartbeat_interval=1000.0, sybil=SybilPolicy(max_nodes_per_wallet=8))


def _inference_job(running: Running, rsa_keys) -> dict[str, Any]:
    node = make_node(rsa_keys, 0)
    running.register(node)
    running.link(node)
    return run_inference_job(running, node, VALUES)


def test_a_real_inference_job_verifies(running: Running, rsa_keys) -> None:
    job = _inference_job(running, rsa_keys)
    report = audit_job(running, job, chain_id=eip712.DEVNET_CHAIN_ID)
    assert report.ok, report.as_json()
    (task,) = report.tasks
    assert task.ok and task.detail == "proof, signature and its node's manifest verified"
    assert report.result_ok and report.result == "equal to its one task's verified result"


def _lie(running: Running, job: dict[str, Any], how: str) -> audit.JobReport:
    """What a coordinator that lies in one way publishes, and the audit of it."""
    job = copy.deepcopy(job)
    task = job["tasks"][0]
    real = running.client.task_result(task["task_id"])
    fetch_task = running.client.task_result
    fetch_job = lambda: running.client.raw_job_result(job["job_id"])  # noqa: E731
    other = Secp256k1Key.generate()
    if how == "result bytes":  # served bytes that the node never signed
        fetch_task = lambda _tid: real[:-1] + bytes([real[-1] ^ 1])  # noqa: E731
    elif how == "node":  # credit another node with the work
        task["node_id"] = other.address
    elif how == "proof":  # a proof for other bytes, in the published message too
        fake = "0x" + hashlib.sha256(b"other").hexdigest()
        task["proof"] = fake
        task["typed_data"]["message"]["proof"] = fake
    elif how == "signed message":  # the message says another result size
        task["typed_data"]["message"]["result_size"] += 1
    elif how == "signature":  # a signature by someone else over the same message
        message = eip712.message_from_json("Result", task["typed_data"]["message"])
        sig = eip712.sign_typed(other, "Result", message, chain_id=eip712.DEVNET_CHAIN_ID)
        task["signature"] = "0x" + sig.hex()
    elif how in ("high s", "v 0 or 1"):  # the node's own signature in another encoding
        sig = bytes.fromhex(task["signature"][2:])
        if how == "high s":  # (r, n - s) with the other v: the same signer, twice
            s = int.from_bytes(sig[32:64], "big")
            sig = sig[:32] + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - sig[64]])
        else:
            sig = sig[:64] + bytes([sig[64] - 27])
        task["signature"] = "0x" + sig.hex()
    elif how == "domain types":  # types eth-account takes from the protocol, not the answer
        task["typed_data"]["types"]["EIP712Domain"] = [
            {"name": "name", "type": "bytes32"},
            {"name": "version", "type": "bool"},
            {"name": "chainId", "type": "string"},
        ]
    elif how == "extra type":
        task["typed_data"]["types"]["Extra"] = [{"name": "x", "type": "uint8"}]
    elif how == "task hash":  # the task's published hash of bytes it does not serve
        task["result_sha256"] = "00" * 32
    elif how == "task size":
        task["result_size"] += 1
    elif how in ("job result", "longer job result"):  # not its task's, with a matching hash
        forged = real[:-1] + bytes([real[-1] ^ 1]) if how == "job result" else real + b"\x00"
        job["result_sha256"] = hashlib.sha256(forged).hexdigest()
        fetch_job = lambda: forged  # noqa: E731
    elif how == "job hash":  # the result served does not match the published hash
        fetch_job = lambda: real[:-1] + bytes([real[-1] ^ 1])  # noqa: E731
    return audit.audit_job(job, fetch_task, fetch_job, fetch_manifest=running.client.manifest)


@pytest.mark.parametrize(
    ("how", "says"),
    [
        ("result bytes", "published proof is not SHA-256 of the result bytes"),
        ("node", "published proof is not SHA-256 of the result bytes"),
        ("proof", "published proof is not SHA-256 of the result bytes"),
        ("signed message", "signed message's result_size"),
        ("signature", "the signature recovers to"),
        ("job result", "not equal to its one task's verified result"),
        ("longer job result", "verified result: longer than its"),
        ("job hash", "not the published result_sha256"),
        ("high s", "high-s signatures are refused"),
        ("v 0 or 1", "recovery id v must be 27 or 28"),
        ("domain types", "the signed message's types are not this protocol's"),
        ("extra type", "the signed message's types are not this protocol's"),
        ("task hash", f"its published result_sha256 is {'00' * 32!r}"),
        ("task size", "its published result_size is"),
    ],
)
def test_a_coordinator_that_lies_is_caught(running: Running, rsa_keys, how: str, says: str) -> None:
    job = _inference_job(running, rsa_keys)
    report = _lie(running, job, how)
    assert not report.ok
    found = [t.detail for t in report.tasks if t.ok is False] + [report.result]
    assert any(says in text for text in found), found


def test_eth_account_alone_catches_a_signature_this_projects_recovery_misreads(
    running: Running, rsa_keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The audit recovers each signature twice, with this project's code and with
    eth-account, an implementation independent of it: a fault in the first (here made
    to answer the task's node whatever it is given) does not verify a Result signed by
    another key, nor a manifest whose node_signature is another key's."""
    job = _inference_job(running, rsa_keys)
    task = job["tasks"][0]
    node = task["node_id"]
    monkeypatch.setattr(audit.eip712, "recover_typed", lambda *a, **kw: node)
    report = _lie(running, job, "signature")
    assert not report.ok
    (line,) = report.tasks
    assert "the signature recovers to" in line.detail, line.detail
    assert f"recovers to {node}" not in line.detail  # eth-account's reading: another key

    from nodeclient.protocol import manifest as manifest_mod

    other = Secp256k1Key.generate()
    real_verify = manifest_mod.verify_manifest
    served: dict[str, Any] = {}

    def forged(manifest_hash: str) -> Any:
        signed = running.client.manifest(manifest_hash)
        assert isinstance(signed, dict)
        served["real"] = copy.deepcopy(signed)
        message = manifest_mod.registration_message(signed, manifest_mod.signed_bytes(signed))
        sig = eip712.sign_typed(other, "Registration", message, chain_id=eip712.DEVNET_CHAIN_ID)
        signed["node_signature"] = "0x" + sig.hex()
        return signed

    # This project's manifest check, made to pass it as the genuine one.
    monkeypatch.setattr(
        audit.manifest, "verify_manifest", lambda _signed, **kw: real_verify(served["real"], **kw)
    )
    report = audit.audit_job(
        job,
        running.client.task_result,
        lambda: running.client.raw_job_result(job["job_id"]),
        fetch_manifest=forged,
    )
    assert not report.ok
    (line,) = report.tasks
    assert f"node_signature recovers to {other.address}" in line.detail, line.detail


def test_with_the_payload_an_inference_result_must_name_its_model(
    running: Running, rsa_keys
) -> None:
    job = _inference_job(running, rsa_keys)
    report = audit_job(running, job, payload=inference_payload(VALUES))
    assert report.ok and report.result.endswith(", from your model, with the outputs you asked for")
    other = inference_payload([1.0, 2.0, 3.0])  # another model (its input shape differs)
    report = audit_job(running, job, payload=other)
    assert not report.ok and "model" in report.result


def test_what_you_submitted_must_be_what_the_coordinator_reports(
    running: Running, rsa_keys, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing signs a job's min_tier: given what the requester submitted, the
    coordinator's account must say the same, and the tasks' nodes are held to the
    requester's min_tier. (Before, a job run below the tier asked for, and reported with
    the lower tier, verified.)"""
    job = _inference_job(running, rsa_keys)  # min_tier 0, on a tier-0 node
    assert audit_job(running, job, submitted={"min_tier": 0, "slices": 1}).ok
    report = audit_job(running, job, submitted={"min_tier": 1, "slices": None})
    assert not report.ok and report.verdict == "NOT VERIFIED"
    assert report.result == "the coordinator reports min_tier 0, you submitted 1"
    assert "and the job asked for tier 1 or above" in report.tasks[0].detail
    # slices are held to what was submitted for a training job only (its test): a render
    # job's are what its split gives, an inference job's always 1.
    assert audit_job(running, job, submitted={"slices": 2}).ok
    argv = ["verify", job["job_id"], "--coordinator", running.url]
    assert cli.main([*argv, "--min-tier", "0", "--slices", "1"]) == 0
    assert cli.main([*argv, "--min-tier", "1"]) == 1
    assert "you submitted 1" in capsys.readouterr().out


def test_a_job_whose_tasks_name_two_chains_is_caught(running: Running, rsa_keys) -> None:
    """Without --chain-id every task of a job must name the chain its first signed task
    names: a second task whose Result is genuinely signed by its node, but for another
    network, fails. (Before, each task was checked on whatever chain it named.)"""
    node = make_node(rsa_keys, 0)
    running.register(node)
    running.link(node)
    job = run_inference_job(running, node, VALUES)
    second = copy.deepcopy(job["tasks"][0])
    second["typed_data"]["domain"]["chainId"] = 1
    message = eip712.message_from_json("Result", second["typed_data"]["message"])
    second["signature"] = (
        "0x" + eip712.sign_typed(node.node_key, "Result", message, chain_id=1).hex()
    )
    forged = {**job, "tasks": [job["tasks"][0], second]}
    report = audit_job(running, forged)
    assert report.tasks[0].ok is True
    assert report.tasks[1].ok is False
    assert "chainId is 1, not 31337" in report.tasks[1].detail


def test_with_the_payload_an_inference_result_must_have_the_outputs_asked_for(
    running: Running, rsa_keys
) -> None:
    """The requester's payload named the outputs it wants: a result with others (here the
    model's only output, y, against a request for z) does not verify."""
    job = _inference_job(running, rsa_keys)
    asked = inference.make_request(
        identity_model(shape=[len(VALUES)]), {"x": np.asarray(VALUES, np.float32)},
        output_names=["z"],
    ).encode()  # fmt: skip
    report = audit_job(running, job, payload=asked)
    assert not report.ok and "could not be checked" in report.result, report.result
    assert "output" in report.result, report.result


def test_the_json_of_a_job_of_the_most_tasks_fits_what_verify_reads(
    running: Running, rsa_keys
) -> None:
    """A training job may have MAX_SLICE_ROUNDS tasks; its JSON (GET /v1/jobs/{id}), which
    `verify` reads whole, must fit the client's MAX_JSON_ANSWER even if every task were a
    succeeded one with its typed data and a reason of the longest kind. (With 100,000 tasks
    it did not: about 133 MB, against 64 MiB.)"""
    from nodeclient.coordinator.client import MAX_JSON_ANSWER
    from nodeclient.coordinator.verifier import _CONTROL
    from nodeclient.protocol.messages import MAX_REASON
    from nodeclient.workloads.training import MAX_SLICE_ROUNDS

    job = _inference_job(running, rsa_keys)
    # The longest reason stored: MAX_REASON control characters, each kept as "\\xNN".
    worst = ("\x01" * MAX_REASON).translate(_CONTROL)
    task = {**job["tasks"][0], "reason": worst, "round": 9999, "slice_index": 9999}

    def served(value: object) -> int:  # as the API renders it (Starlette's JSONResponse)
        return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())

    each = served(task) + 1  # and the comma between entries
    total = MAX_SLICE_ROUNDS * each + served({**job, "tasks": []})
    assert total < MAX_JSON_ANSWER, (each, total)


def test_a_wrong_chain_is_caught(running: Running, rsa_keys) -> None:
    job = _inference_job(running, rsa_keys)
    report = audit_job(running, job, chain_id=1)
    assert not report.ok
    assert "chainId" in report.tasks[0].detail


def test_a_render_job_is_assembled_again_from_its_verified_slices(
    running: Running, rsa_keys
) -> None:
    node = _render_node(running, rsa_keys, 0, "0x" + "11" * 20)
    payload = render.make_request(SCENE, frames=(1, 5), width=W, height=H, samples=4).encode()
    job = running.client.submit_job("media.render", payload, slices=2)
    for _ in range(2):
        _complete(node, node.recv())
    done = running.wait_job(job["job_id"], "succeeded")
    report = audit_job(running, done, payload=payload)
    assert report.ok, report.as_json()
    assert report.result == "equal to its 2 verified slices assembled in order"
    assert [t.ok for t in report.tasks] == [True, True]
    without = audit_job(running, done)  # no payload: the hash only, and it says so
    assert not without.ok and without.result_ok is None and "give --payload" in without.result
    assert without.verdict == "tasks verified; the result only by its hash"
    other = render.make_request(SCENE, frames=(2, 6), width=W, height=H, samples=4).encode()
    wrong = audit_job(running, done, payload=other)
    assert not wrong.ok and wrong.result_ok is False
    # A coordinator that had another scene rendered, and published the frames as the
    # requester's scene's: each slice's own signed header names the scene it rendered.
    mine = render.make_request(b"my scene", frames=(1, 5), width=W, height=H, samples=4)
    meta = classes.lookup("media.render").validate(mine.encode(), 1 << 30)
    parts = [running.client.task_result(t["task_id"]) for t in done["tasks"]]
    forged = render_slices.assemble(parts, meta)
    lied = {**done, "result_sha256": hashlib.sha256(forged).hexdigest()}
    report = audit.audit_job(
        lied, running.client.task_result, lambda: forged,
        fetch_manifest=running.client.manifest, payload=mine.encode(),
    )  # fmt: skip
    assert not report.ok and "scene" in report.result
    # A slice count the coordinator made up is counted, not built into a list first.
    many = {**done, "slices": 2_000_000}
    tracemalloc.start()
    try:
        report = audit_job(running, many, payload=payload)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not report.ok and "each of its 2000000 slices once" in report.result
    assert peak < 16 << 20


def test_another_genuine_job_in_the_answer_is_caught(running: Running, rsa_keys) -> None:
    """Asked for job A, the coordinator answers with job B, every signature of which is
    genuine: the answer is not the job asked for."""
    job = _inference_job(running, rsa_keys)
    asked = "11111111-2222-3333-4444-555555555555"
    report = audit_job(running, job, job_id=asked)
    assert not report.ok and f"not {asked}" in report.result
    assert audit_job(running, job, job_id=job["job_id"].upper()).ok  # the same id, any case


@pytest.mark.parametrize("how", ["relabelled", "made up", "no tasks", "failed"])
def test_a_result_no_task_gives_is_not_verified(running: Running, rsa_keys, how: str) -> None:
    """Forged result bytes with a matching hash, under another class (render, or one this
    check does not know), with no tasks listed, or a job said failed: never verified."""
    job = copy.deepcopy(_inference_job(running, rsa_keys))
    forged = b"forged result"
    job["result_sha256"] = hashlib.sha256(forged).hexdigest()
    if how == "relabelled":
        job["workload_class"] = "ai.training"
    elif how == "made up":
        job["workload_class"] = "made.up"
    elif how == "no tasks":
        job["tasks"] = []
    else:
        job["status"], job["tasks"] = "failed", []
    client = running.client
    report = audit.audit_job(
        job, client.task_result, lambda: forged, fetch_manifest=client.manifest
    )
    assert not report.ok and report.verdict != "verified"
    payload = inference_payload(VALUES)  # and with the payload, a relabel is refused outright
    with_payload = audit.audit_job(
        job, client.task_result, lambda: forged, fetch_manifest=client.manifest, payload=payload
    )
    assert not with_payload.ok and with_payload.result_ok is not True


@pytest.mark.parametrize("answer", [["not", "a", "job"], {"job_id": "x", "tasks": 5}])
def test_an_answer_that_is_not_a_job_is_not_verified(answer: object) -> None:
    report = audit.audit_job(answer, lambda _t: b"", lambda: b"", fetch_manifest=dict)  # type: ignore[arg-type]
    assert not report.ok and "not a job" in report.result


def test_malformed_answers_are_failures_not_tracebacks(running: Running, rsa_keys) -> None:
    real = _inference_job(running, rsa_keys)
    job = copy.deepcopy(real)
    job["tasks"][0]["slice_index"] = "x"
    job["tasks"].append({"task_id": "t"})
    job["tasks"].append({**real["tasks"][0], "round": math.inf})  # JSON Infinity
    report = audit_job(running, job)
    assert not report.ok
    assert [t.ok for t in report.tasks] == [False, False, False]
    assert all("malformed task" in t.detail for t in report.tasks)
    bad_id = copy.deepcopy(real)
    bad_id["job_id"] = "not-a-uuid"
    assert not audit_job(running, bad_id).ok


def test_verify_command_exit_status_and_output(running: Running, rsa_keys, capsys) -> None:
    job = _inference_job(running, rsa_keys)
    argv = ["verify", job["job_id"], "--coordinator", running.url]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert f"job {job['job_id']} (ai.inference, succeeded): verified" in out
    assert cli.main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verified"] is True

    # The coordinator's stored result changes under it (a bug, or a lie): exit 1.
    task_id = job["tasks"][0]["task_id"]

    def tamper(s: Any) -> None:
        s.execute(update(m.Task).where(m.Task.task_id == task_id).values(result=b"forged"))

    running.coord.db.run_sync(tamper)
    assert cli.main(argv) == 1
    out = capsys.readouterr().out
    assert "NOT VERIFIED" in out and "FAILED" in out


def test_verify_command_for_an_unknown_job_is_one_line(running: Running, capsys) -> None:
    code = cli.main(["verify", "0" * 8, "--coordinator", running.url])
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1 and "no job" in err


def test_a_training_result_is_replayed_from_its_spooled_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A training job's final weights are needed whole by the replay: `verify` streams
    them into a temporary file and decodes them mapped from it (not copied into memory),
    and they decode as the bytes sent do."""
    from nodeclient.workloads import training as tr

    model = tr.ModelSpec.parse([{"type": "Linear", "in": 3, "out": 2}])
    weights = {k: np.full(shape, 0.25, np.float32) for k, shape in model.parameter_shapes().items()}
    sent = tr.encode_final(model, weights, [{"round": 0}])
    decoded: list[dict[str, np.ndarray]] = []

    def replay(_payload: bytes, _job: object, _results: object, data: bytes) -> tuple[bool, str]:
        final, metrics = tr.decode_final(data, max_bytes=len(data))
        decoded.append(dict(final))
        return metrics == [{"round": 0}], "replayed"

    monkeypatch.setattr(audit, "_replay_training", replay)
    pieces = [sent[i : i + 7] for i in range(0, len(sent), 7)]  # as a connection hands it on
    streamed = audit.StreamedResult(lambda sink: [sink(piece) for piece in pieces])
    with tempfile.TemporaryFile() as spool:
        read = audit._read_job_result(streamed, None, spool)
        assert (read.size, read.sha256) == (len(sent), hashlib.sha256(sent).hexdigest())
        assert audit._replay_spooled(b"", {}, {}, spool) == (True, "replayed")
    (final,) = decoded
    assert tr.weights_container(final) == tr.weights_container(weights)
