"""Data frames between peers that announced binary-data: a dispatch arrives as a binary
frame, a result goes back as one, and a node that did not announce it gets base64 text."""

from __future__ import annotations

import json

from nodeclient.protocol import envelope, messages
from tests.coordinator.conftest import (
    RECV_TIMEOUT,
    START,
    Running,
    SimNode,
    closed_code,
    inference_payload,
    inference_result,
    make_node,
)

VALUES = [1.0, 2.0, 3.0]


def link_binary(running: Running, node: SimNode) -> dict:
    """Link *node*, announcing binary-data in its auth; returns the welcome frame."""
    running.register(node)
    node.ws = running.connect()
    challenge = node.recv()
    auth = {**node.auth(challenge, issued_at=int(running.clock.now())), "features": ["binary-data"]}
    return node.call(auth)


def test_binary_dispatch_and_result_round_trip(coordinator: Running, rsa_keys) -> None:
    """The dispatch is a binary frame that opens like the text one; a binary result is
    verified and accepted, and the stored result is the exact bytes sent."""
    node = make_node(rsa_keys, 0)
    welcome = link_binary(coordinator, node)
    assert welcome["features"] == ["binary-data"]
    payload = inference_payload(VALUES)
    job = coordinator.client.submit_job("ai.inference", payload)
    assert node.ws is not None
    raw = node.ws.recv(timeout=RECV_TIMEOUT)
    assert isinstance(raw, bytes) and raw[:4] != b"{"  # binary, not JSON sent as binary
    dispatch = messages.parse_from_coordinator(raw)
    assert isinstance(dispatch, messages.Dispatch)
    assert str(dispatch.job_id) == job["job_id"]
    # The coordinator's clock as it sent it: the node reads the lease's end against it.
    assert dispatch.sent_at == coordinator.clock.now()
    assert dispatch.lease_expires_at == int(dispatch.sent_at + coordinator.config.lease_seconds)
    opened = envelope.open_envelope(
        dispatch.envelope, private_key=node.payload_key, task_id=dispatch.task_id,
        node_id=node.node_id, now=int(START),
    )  # fmt: skip
    assert opened == payload
    result = inference_result(payload, VALUES)
    text_form = node.result(dispatch.to_wire(), result)  # the signed part, base64 result
    frame = {**text_form, "result": result}
    wire = messages.encode_frame(frame, binary=True)
    assert isinstance(wire, bytes)
    node.ws.send(wire)
    ack = node.recv()
    assert ack == {
        "type": "result_ack", "task_id": str(dispatch.task_id), "status": "accepted", "reason": "",
        "of": "result",
    }  # fmt: skip
    done = coordinator.wait_job(job["job_id"], "succeeded")
    assert coordinator.client.task_result(done["tasks"][0]["task_id"]) == result


def test_node_without_the_feature_gets_base64_text(coordinator: Running, rsa_keys) -> None:
    """An older node (no features in its auth) gets a JSON text dispatch, as before."""
    node = make_node(rsa_keys, 0)
    coordinator.register(node)
    welcome = coordinator.link(node)
    assert welcome["features"] == ["binary-data"]  # announced; the node may ignore it
    coordinator.client.submit_job("ai.inference", inference_payload(VALUES))
    assert node.ws is not None
    raw = node.ws.recv(timeout=RECV_TIMEOUT)
    assert isinstance(raw, str)
    frame = json.loads(raw)
    assert frame["type"] == "dispatch" and isinstance(frame["envelope"], str)


def test_malformed_binary_result_gets_an_error_and_the_link_stays(
    coordinator: Running, rsa_keys
) -> None:
    """A binary frame that is not a well-formed data frame is refused with a reason; the
    link keeps working (a heartbeat after it is acknowledged)."""
    node = make_node(rsa_keys, 0)
    link_binary(coordinator, node)
    assert node.ws is not None
    header = json.dumps({"type": "heartbeat"}).encode()
    for bad, why in [
        (b"\x00\x00", "shorter than its length prefix"),
        (b"\x00\x01\x00\x00" + b"{}", "out of bounds"),
        (len(header).to_bytes(4, "big") + header, "cannot be binary"),
        (b"\x00\x00\x00\x03abc", "not valid JSON"),
        (  # a header in UTF-16 (json.loads would guess it from bytes): UTF-8 only
            len(h16 := '{"type":"result"}'.encode("utf-16-le")).to_bytes(4, "big") + h16 + b"d",
            "not valid JSON",
        ),
    ]:
        node.ws.send(bad)
        error = node.recv()
        assert error["type"] == "error" and why in error["reason"], (bad, error)
    ack = node.call(node.heartbeat())
    assert ack["type"] == "heartbeat_ack"


def test_a_large_text_frame_of_many_small_values_is_refused_unparsed(
    coordinator: Running, rsa_keys
) -> None:
    """A node without binary frames may send up to 48 MB of JSON text (its results as
    base64), but a large frame of many small values, which would take some twenty times
    its size once parsed, is refused before it is; a large result frame as base64 text,
    from such a node, still goes through."""
    node = make_node(rsa_keys, 0)
    coordinator.register(node)
    coordinator.link(node)
    assert node.ws is not None
    bomb = '{"type":"progress","x":[' + "[]," * 100_000 + "[]]}"
    node.ws.send(bomb)
    error = node.recv()
    assert error["type"] == "error" and "JSON values" in error["reason"], error
    payload = inference_payload(VALUES)
    coordinator.client.submit_job("ai.inference", payload)
    dispatch = node.recv()
    frame = node.result(dispatch, inference_result(payload, VALUES))
    frame["padding"] = "A" * 200_000  # over the control limit, few values: parsed
    ack = node.call(frame)
    assert ack["type"] == "result_ack", ack


def test_nothing_binary_or_large_is_parsed_before_auth(coordinator: Running) -> None:
    """Before auth the link takes only a small text frame: a binary frame from a stranger
    is refused with 4000, unparsed (a binary data frame's data would be copied), and a
    text frame over the control-frame limit is refused by the server itself (1009)."""
    binary = b"\x00\x00\x00\x0f" + b'{"type":"result"}' + b"\x00" * 1000
    for first, expected in ((binary, 4000), ("x" * 70_000, 1009)):
        ws = coordinator.connect()
        assert json.loads(ws.recv(timeout=RECV_TIMEOUT))["type"] == "challenge"
        ws.send(first)
        code, reason = closed_code(ws)
        assert code == expected, (code, reason)
        assert code != 4000 or "before auth" in reason, reason
