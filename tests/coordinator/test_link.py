"""2.3.3 Coordinator Link: handshake, close codes, one link per node, heartbeats, errors."""

from __future__ import annotations

import json

from nodeclient.coordinator.link import heartbeat_ack_text
from nodeclient.protocol.messages import HeartbeatAck
from nodeclient.protocol.secp import Secp256k1Key
from tests.coordinator.conftest import CHAIN, START, Running, closed_code, make_node


def test_handshake_challenge_then_welcome(coordinator: Running, rsa_keys) -> None:
    """The challenge names coordinator, chain and interval; a valid auth gets welcome."""
    node = make_node(rsa_keys, 0)
    coordinator.register(node)
    node.ws = coordinator.connect()
    challenge = node.recv()
    assert challenge["type"] == "challenge"
    assert challenge["coordinator_id"] == "coordinator-test"
    assert challenge["chain_id"] == CHAIN
    assert challenge["heartbeat_interval"] == 30.0
    assert len(bytes.fromhex(challenge["nonce"][2:])) == 32
    welcome = node.call(node.auth(challenge))
    assert welcome == {
        "type": "welcome", "node_id": node.node_id, "last_seq": 0, "unstaking_until": None,
        "features": ["binary-data"],
    }  # fmt: skip
    assert coordinator.client.node(node.node_id)["online"] is True


def test_wrong_liveness_key_closes_4001(coordinator: Running, rsa_keys) -> None:
    """An auth signed by any key but the registered liveness key closes with 4001."""
    node = make_node(rsa_keys, 0)
    coordinator.register(node)
    node.ws = coordinator.connect()
    node.send(node.auth(node.recv(), key=node.node_key))
    assert closed_code(node.ws) == (
        4001, "auth failed: signature does not match the registered liveness key",
    )  # fmt: skip


def test_unregistered_node_closes_4003(coordinator: Running, rsa_keys) -> None:
    """A node_id with no registration closes with 4003."""
    node = make_node(rsa_keys, 0)
    node.ws = coordinator.connect()
    node.send(node.auth(node.recv()))
    assert closed_code(node.ws) == (4003, "not registered")


def test_nonce_mismatch_closes_4001(coordinator: Running, rsa_keys) -> None:
    """An auth answering a different nonce (a replayed auth) closes with 4001."""
    node = make_node(rsa_keys, 0)
    coordinator.register(node)
    node.ws = coordinator.connect()
    challenge = node.recv()
    challenge["nonce"] = "0x" + "00" * 32
    node.send(node.auth(challenge))
    assert closed_code(node.ws)[0] == 4001


def test_stale_auth_closes_4001(coordinator: Running, rsa_keys) -> None:
    """An auth whose issued_at is more than 300 s off closes with 4001."""
    node = make_node(rsa_keys, 0)
    coordinator.register(node)
    node.ws = coordinator.connect()
    node.send(node.auth(node.recv(), issued_at=int(START) - 301))
    code, reason = closed_code(node.ws)
    assert code == 4001
    assert "issued_at" in reason


def test_malformed_auth_closes_4000(coordinator: Running, rsa_keys) -> None:
    """A first frame that is not a valid auth closes with 4000."""
    node = make_node(rsa_keys, 0)
    node.ws = coordinator.connect()
    node.recv()
    node.send("{not json")
    assert closed_code(node.ws)[0] == 4000


def test_auth_timeout_closes_4002(start_coordinator, rsa_keys) -> None:
    """No auth within the timeout closes with 4002."""
    running = start_coordinator(auth_timeout=0.2)
    node = make_node(rsa_keys, 0)
    node.ws = running.connect()
    node.recv()
    assert closed_code(node.ws) == (4002, "auth timeout")


def test_second_link_replaces_first(coordinator: Running, rsa_keys) -> None:
    """A newly authenticated link replaces the old one, which is closed with 4004."""
    node = make_node(rsa_keys, 0)
    coordinator.register(node)
    coordinator.link(node)
    first = node.ws
    assert first is not None
    coordinator.link(node)
    assert closed_code(first) == (4004, "replaced by a newer link")
    assert node.call(node.heartbeat())["type"] == "heartbeat_ack"


def test_heartbeat_is_acknowledged_and_persisted(coordinator: Running, rsa_keys) -> None:
    """A heartbeat gets heartbeat_ack with its seq; last_seq and state are stored."""
    node = make_node(rsa_keys, 0)
    coordinator.register(node)
    coordinator.link(node)
    ack = node.call(node.heartbeat(state="IDLE"))
    assert ack == {
        "type": "heartbeat_ack", "seq": 1, "server_time": START, "unstaking_until": None,
    }  # fmt: skip
    listed = coordinator.client.node(node.node_id)
    assert listed["state"] == "IDLE"
    assert listed["last_seen"] == START


def test_replayed_heartbeat_is_rejected_without_state_change(
    coordinator: Running, rsa_keys
) -> None:
    """A seq not above the last seen gets error "replayed", stores nothing, link stays up."""
    node = make_node(rsa_keys, 0)
    coordinator.register(node)
    coordinator.link(node)
    node.call(node.heartbeat(seq=5, state="IDLE"))
    coordinator.clock.advance(10)
    err = node.call(node.heartbeat(seq=5, state="EXECUTING"))
    assert err["type"] == "error"
    assert err["code"] == "replayed"
    listed = coordinator.client.node(node.node_id)
    assert listed["state"] == "IDLE"
    assert listed["last_seen"] == START
    assert node.call(node.heartbeat(seq=6))["type"] == "heartbeat_ack"


def test_heartbeat_signed_by_node_key_is_bad_signature(coordinator: Running, rsa_keys) -> None:
    """Heartbeats must be signed by the liveness key; otherwise error bad_signature."""
    node = make_node(rsa_keys, 0)
    coordinator.register(node)
    coordinator.link(node)
    err = node.call(node.heartbeat(seq=1, key=node.node_key))
    assert err["type"] == "error"
    assert err["code"] == "bad_signature"
    assert node.call(node.heartbeat(seq=1))["type"] == "heartbeat_ack"


def test_malformed_frames_get_error_and_link_stays_up(coordinator: Running, rsa_keys) -> None:
    """Bad JSON, unknown types and broken fields each get error malformed; link stays up."""
    node = make_node(rsa_keys, 0)
    coordinator.register(node)
    coordinator.link(node)
    broken = node.heartbeat(seq=1)
    broken["message"]["seq"] = "one"
    for frame in ("[]", "{oops", json.dumps({"type": "dance"}), json.dumps(broken)):
        err = node.call(frame)
        assert (err["type"], err["code"]) == ("error", "malformed"), frame
    assert node.call(node.heartbeat(seq=1))["type"] == "heartbeat_ack"


def test_heartbeat_for_another_node_is_refused(coordinator: Running, rsa_keys) -> None:
    """A heartbeat naming another node_id on this link is refused and changes nothing."""
    node, other = make_node(rsa_keys, 0), make_node(rsa_keys, 1)
    coordinator.register(node)
    coordinator.register(other)
    coordinator.link(node)
    err = node.call(other.heartbeat(seq=1))
    assert err["type"] == "error"
    assert coordinator.client.node(other.node_id)["state"] is None


def test_rotated_liveness_key_takes_effect(coordinator: Running, rsa_keys) -> None:
    """After re-registration with a new liveness key, the old one no longer authenticates."""
    node = make_node(rsa_keys, 0)
    coordinator.register(node)
    old = node.liveness
    node.liveness = Secp256k1Key.generate()
    coordinator.client.register(node.manifest(issued_at=int(START) + 1))
    node.ws = coordinator.connect()
    node.send(node.auth(node.recv(), key=old))
    assert closed_code(node.ws)[0] == 4001
    assert coordinator.link(node)["type"] == "welcome"


def test_heartbeat_with_unknown_state_is_malformed(coordinator: Running, rsa_keys) -> None:
    """A heartbeat state outside READY/EXECUTING/IDLE/UNSTAKING is refused as malformed."""
    node = make_node(rsa_keys, 0)
    coordinator.register(node)
    coordinator.link(node)
    err = node.call(node.heartbeat(seq=1, state="DANCING"))
    assert (err["type"], err["code"]) == ("error", "malformed")
    assert coordinator.client.node(node.node_id)["state"] is None


def test_heartbeat_ack_text_is_the_ack_frame_as_json() -> None:
    """The hand-built ack is byte for byte the JSON of messages.HeartbeatAck."""
    for seq, now, until in [
        (1, 1764117000.123456, None),
        ((1 << 63) - 1, 1e-7, 1764721800),
        (42, 1764117000.0, 0),
        (7, 1764117000, None),  # a clock may hand back an int
    ]:
        expected = json.dumps(HeartbeatAck(seq, now, until).to_wire(), separators=(",", ":"))
        assert heartbeat_ack_text(seq, now, until) == expected
