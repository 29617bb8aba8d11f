"""The node's sans-I/O link session, and the wire parsers, fed frames directly."""

from __future__ import annotations

import dataclasses
import itertools
import json
import subprocess
import sys
import uuid

import pytest

from nodeclient.clock import ManualClock
from nodeclient.errors import RemoteProtocolError
from nodeclient.protocol import eip712, messages
from nodeclient.protocol.secp import Secp256k1Key
from nodeclient.protocol.session import NodeSession, backoff
from nodeclient.protocol.states import NodeState

CHAIN = 31337


@pytest.fixture
def parts() -> tuple[NodeSession, Secp256k1Key, Secp256k1Key, ManualClock]:
    node = Secp256k1Key.from_hex("0x" + "31" * 32)
    live = Secp256k1Key.from_hex("0x" + "32" * 32)
    clock = ManualClock()
    session = NodeSession(node_id=node.address, liveness_key=live, chain_id=CHAIN, clock=clock.now)
    return session, node, live, clock


def challenge(chain: int = CHAIN) -> messages.Challenge:
    return messages.Challenge("coord-1", b"\x09" * 32, chain, 30.0)


def test_auth_frame_is_linkauth_by_liveness_key(parts) -> None:
    """The answer to a challenge parses on the coordinator side and recovers to the liveness key."""
    session, node, live, _ = parts
    frame = session.on_challenge(challenge())
    parsed = messages.parse_from_node(json.dumps(frame))
    assert parsed.primary_type == "LinkAuth"
    assert parsed.message["nonce"] == b"\x09" * 32
    assert parsed.message["coordinator_id"] == "coord-1"
    signer = eip712.recover_typed("LinkAuth", parsed.message, parsed.signature, chain_id=CHAIN)
    assert signer == live.address != node.address


def test_refuses_to_sign_for_another_chain(parts) -> None:
    """A coordinator announcing a different chain id gets no signature (fail closed)."""
    session, *_ = parts
    with pytest.raises(RemoteProtocolError, match="chain_id"):
        session.on_challenge(challenge(chain=1))


def test_heartbeat_seq_continues_above_coordinator(parts) -> None:
    """After welcome(last_seq=41) the next heartbeat is 42 and sequence numbers only grow."""
    session, node, live, _ = parts
    with pytest.raises(RemoteProtocolError):
        session.heartbeat(state=NodeState.READY, running=[], load_permille=0)
    session.on_challenge(challenge())
    session.on_welcome(messages.Welcome(node.address, 41, None))
    t = uuid.uuid4()
    frame = session.heartbeat(state=NodeState.EXECUTING, running=[t], load_permille=250)
    parsed = messages.parse_from_node(json.dumps(frame))
    assert parsed.message["seq"] == 42
    assert parsed.message["running_tasks"] == [t.bytes]
    assert parsed.extra["running"] == 1
    assert (
        eip712.recover_typed("Heartbeat", parsed.message, parsed.signature, chain_id=CHAIN)
        == live.address
    )
    seqs = [
        messages.parse_from_node(
            json.dumps(session.heartbeat(state=NodeState.IDLE, running=[], load_permille=0))
        ).message["seq"]
        for _ in range(3)
    ]
    assert seqs == [43, 44, 45]
    session.connection_lost()
    session.on_challenge(challenge())
    session.on_welcome(messages.Welcome(node.address, 10, None))  # coordinator behind: keep ours
    assert (
        session.heartbeat(state=NodeState.IDLE, running=[], load_permille=0)["message"]["seq"] == 46
    )


def test_welcome_for_another_node_refused(parts) -> None:
    """A welcome naming someone else is a protocol error."""
    session, *_ = parts
    session.on_challenge(challenge())
    with pytest.raises(RemoteProtocolError):
        session.on_welcome(messages.Welcome("0x" + "00" * 20, 0, None))


def test_backoff_is_capped_full_jitter() -> None:
    """Delays grow exponentially up to 60 s, each scaled by a random factor in [0, 1)."""
    top = list(itertools.islice(backoff(rand=lambda: 1.0), 12))
    assert top[:4] == [0.5, 1.0, 2.0, 4.0]
    assert max(top) == 60.0
    assert all(d == 0 for d in itertools.islice(backoff(rand=lambda: 0.0), 5))


@pytest.mark.parametrize(
    "frame",
    [
        b"not json",
        b"[]",
        b'{"type": 5}',
        b'{"type": "bogus"}',
        b'{"type": "dispatch", "task_id": "x"}',
        b'{"type": "heartbeat_ack", "seq": -1, "server_time": 1}',
        b'{"type": "result_ack", "task_id": "00000000-0000-0000-0000-000000000000", "status": "maybe", "reason": ""}',
        b'{"type": "error", "code": "x", "reason": "' + b"r" * 70000 + b'"}',
    ],
)
def test_malformed_coordinator_frames_rejected(frame: bytes) -> None:
    """Every malformed frame raises RemoteProtocolError with a reason, never anything else."""
    with pytest.raises(RemoteProtocolError):
        messages.parse_from_coordinator(frame)


def test_oversized_frame_rejected_before_parsing() -> None:
    """A frame over the data limit is refused by size alone."""
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        messages.parse_from_coordinator(b" " * (messages.MAX_DATA_FRAME + 1))


def test_deeply_nested_json_is_malformed_not_a_crash() -> None:
    """'[[[[...' deeper than the interpreter's stack is a protocol error on both sides, in
    a process that loaded the node's CLI, key store and devnet, as `nodeclient run` does:
    eth-account's py_ecc raises the recursion limit to 100,000 as it is imported, and at
    that depth json.loads overflows the C stack (SIGSEGV) instead of raising. (Checked in a
    fresh interpreter: this test process has imported eth-account directly.)"""
    code = """
import sys
from nodeclient.node import cli, keys
from nodeclient import devnet
from nodeclient.errors import RemoteProtocolError
from nodeclient.protocol import messages
deep = "[" * 32_000 + "]" * 32_000  # within the control limit (larger: refused unparsed)
for parse in (messages.parse_from_coordinator, messages.parse_from_node):
    try:
        parse(deep)
    except RemoteProtocolError as exc:
        assert "nested too deeply" in str(exc), exc
print(sys.getrecursionlimit())
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout) <= 1000


def test_a_large_json_frame_is_refused_unparsed_where_none_may_come() -> None:
    """With max_text, a JSON frame over the limit is refused before json.loads runs."""
    big = json.dumps({"type": "result", "pad": "x" * 70_000})
    with pytest.raises(RemoteProtocolError, match="exceeds the 65536-byte limit"):
        messages.parse_from_node(big, max_text=messages.MAX_CONTROL_FRAME)
    with pytest.raises(RemoteProtocolError) as caught:  # without it: parsed, then refused
        messages.parse_from_node(big)
    assert "exceeds the 65536-byte limit" not in str(caught.value)


def test_lone_surrogates_are_refused_with_a_reason(parts) -> None:
    """JSON may escape a lone surrogate (\\ud800), which no database or log can encode: a
    signed message or an advisory note carrying one is malformed, not a crash."""
    session, node, _, _ = parts
    session.on_challenge(challenge())
    session.on_welcome(messages.Welcome(node.address, 0, None))
    frame = session.heartbeat(state=NodeState.READY, running=[], load_permille=1)
    text = json.dumps(frame).replace('"READY"', '"\\ud800"')
    with pytest.raises(RemoteProtocolError, match="heartbeat|Heartbeat|state"):
        messages.parse_from_node(text)
    progress = messages.ProgressFrame(uuid.uuid4(), 1, 2, "x").to_wire()
    with pytest.raises(RemoteProtocolError, match="not valid Unicode"):
        messages.parse_from_node(json.dumps(progress).replace('"x"', '"\\ud800"'))


def test_a_long_key_is_named_cut_in_the_error() -> None:
    """A dispatch's resource keys are the coordinator's: one as long as the frame (48 MiB)
    went whole into the error, and from there into the node's log (link.bad_frame). The
    error names at most 32 characters of it."""
    frame = {
        "type": "dispatch",
        "task_id": str(uuid.uuid4()),
        "job_id": str(uuid.uuid4()),
        "workload_class": "ai.inference",
        "lease_expires_at": 1,
        "envelope": "",
        "resources": {"k" * 100_000: "x"},
    }
    with pytest.raises(RemoteProtocolError) as caught:
        messages.parse_from_coordinator(json.dumps(frame))
    assert str(caught.value) == f"field {'k' * 32!r}... must be an integer in [0, {(1 << 63) - 1}]"


def test_dispatch_round_trip() -> None:
    """A dispatch survives the wire unchanged."""
    d = messages.Dispatch(
        uuid.uuid4(), uuid.uuid4(), "ai.inference", 123, b"\x00\x01envelope", 0, 1, {"ram_mb": 64}
    )
    assert messages.parse_from_coordinator(json.dumps(d.to_wire())) == d
    assert "sent_at" not in d.to_wire()  # as a coordinator from before it sends it
    sent = dataclasses.replace(d, sent_at=1_765_000_000.25)
    assert messages.parse_from_coordinator(json.dumps(sent.to_wire())) == sent


@pytest.mark.parametrize("bad", ["1765000000", True, -1, 1e13, "NaN"])
def test_a_dispatch_with_a_bad_sent_at_is_refused(bad: object) -> None:
    """The coordinator's clock as it sent a dispatch must be a plausible time."""
    d = messages.Dispatch(uuid.uuid4(), uuid.uuid4(), "ai.inference", 123, b"env")
    text = json.dumps({**d.to_wire(), "sent_at": bad}).replace('"NaN"', "NaN")
    with pytest.raises(RemoteProtocolError, match="sent_at"):
        messages.parse_from_coordinator(text)


def test_node_frame_with_bad_field_types_rejected(parts) -> None:
    """A heartbeat whose signed fields are out of type range is refused at parse time."""
    session, node, _, _ = parts
    session.on_challenge(challenge())
    session.on_welcome(messages.Welcome(node.address, 0, None))
    frame = session.heartbeat(state=NodeState.READY, running=[], load_permille=1)
    frame["message"]["seq"] = -5
    with pytest.raises(RemoteProtocolError):
        messages.parse_from_node(json.dumps(frame))
    frame["message"]["seq"] = 5
    frame["signature"] = "0x1234"
    with pytest.raises(RemoteProtocolError):
        messages.parse_from_node(json.dumps(frame))


def test_progress_frame_round_trip_and_limits() -> None:
    """The advisory progress frame parses on the coordinator side; done > total is refused."""
    t = uuid.uuid4()
    frame = messages.ProgressFrame(t, 3, 10, "step 3")
    parsed = messages.parse_from_node(json.dumps(frame.to_wire()))
    assert parsed == frame
    bad = {**frame.to_wire(), "done": 11}
    with pytest.raises(RemoteProtocolError):
        messages.parse_from_node(json.dumps(bad))


def test_text_data_frame_splices_base64_and_parses_the_same() -> None:
    """A data frame's text form parses to exactly what json.dumps gives with the data as
    base64, escapes elsewhere intact; a frame without raw data is plain json.dumps."""
    import os

    result = os.urandom(300_000)
    frame = {"type": "result", "message": {"note": 'quote " back \\ \n'}, "signature": "0x01"}
    spliced = messages.encode_frame({**frame, "result": result}, binary=False)
    assert isinstance(spliced, str)
    assert json.loads(spliced) == json.loads(json.dumps({**frame, "result": messages.b64(result)}))
    assert messages._b64(json.loads(spliced), "result", max_bytes=1 << 20) == result
    plain = {**frame, "result": 'not "base64"'}
    assert messages.encode_frame(plain, binary=True) == json.dumps(plain)


# --- binary data frames ------------------------------------------------------------------------

DISPATCH_VECTOR = messages.Dispatch(
    uuid.UUID("00000000-0000-4000-8000-000000000001"),
    uuid.UUID("00000000-0000-4000-8000-000000000002"),
    "ai.inference",
    1700000000,
    b"\x01\x02\x03",
)
# docs/protocol.md shows this frame byte for byte
DISPATCH_VECTOR_HEX = (
    "000000f6"
    + json.dumps({k: v for k, v in DISPATCH_VECTOR.to_wire().items() if k != "envelope"})
    .encode()
    .hex()
    + "010203"
)


def test_binary_dispatch_matches_the_documented_vector_and_the_text_form() -> None:
    """The binary frame is prefix | JSON header without the envelope | envelope bytes, and
    parses to the same Dispatch as the base64 text frame."""
    wire = messages.encode_frame(DISPATCH_VECTOR.to_wire(raw=True), binary=True)
    assert isinstance(wire, bytes)
    assert wire.hex() == DISPATCH_VECTOR_HEX
    assert int.from_bytes(wire[:4], "big") == len(wire) - 4 - 3
    text = messages.encode_frame(DISPATCH_VECTOR.to_wire(raw=True), binary=False)
    assert isinstance(text, str) and json.loads(text)["envelope"] == "AQID"
    assert messages.parse_from_coordinator(wire) == DISPATCH_VECTOR
    assert messages.parse_from_coordinator(text) == DISPATCH_VECTOR
    assert messages.parse_from_coordinator(text.encode()) == DISPATCH_VECTOR  # JSON as bytes


def test_binary_result_parses_like_the_text_result(parts) -> None:
    """A signed result sent binary or as base64 text gives the same SignedFrame."""
    _, node, _, _ = parts
    message = {
        "task_id": b"\x01" * 16, "job_id": b"\x02" * 16, "node_id": node.address,
        "proof": b"\x03" * 32, "result_size": 5, "completed_at": 1700000000,
    }  # fmt: skip
    sig = eip712.sign_typed(node, "Result", message, chain_id=CHAIN)
    raw = messages.signed_frame("result", message, sig, raw=True, result=b"bytes")
    assert raw["result"] == b"bytes"
    binary = messages.encode_frame(raw, binary=True)
    text = messages.encode_frame(raw, binary=False)
    assert isinstance(binary, bytes) and isinstance(text, str)
    from_binary = messages.parse_from_node(binary)
    assert from_binary == messages.parse_from_node(text)
    assert isinstance(from_binary, messages.SignedFrame)
    assert from_binary.extra["result"] == b"bytes"
    assert from_binary.struct_hash == eip712.hash_struct("Result", message)


@pytest.mark.parametrize(
    ("frame", "why"),
    [
        (b"\x00\x00", "shorter than its length prefix"),
        (b"\x00\x00\x00\x09{}", "out of bounds"),
        (b"\x00\x01\x00\x01" + b" " * 65537, "out of bounds"),  # header over the control limit
        (b"\x00\x00\x00\x03abc", "not valid JSON"),
        (b"\x00\x00\x00\x02[]", "JSON object"),
        (b'\x00\x00\x00\x13{"type": "welcome"}', "cannot be binary"),
        (b'\x00\x00\x00\x28{"type": "dispatch", "envelope": "AQID"}' + b"x", "repeats"),
    ],
)
def test_malformed_binary_frames_rejected(frame: bytes, why: str) -> None:
    """Each malformed binary frame names what is wrong, on either side's parser."""
    with pytest.raises(RemoteProtocolError, match=why):
        messages.parse_from_coordinator(frame)
    with pytest.raises(RemoteProtocolError):
        messages.parse_from_node(frame)


def test_binary_frame_over_the_data_limit_is_refused_by_size() -> None:
    """Over the frame limit, or data over what the text form could carry: refused."""
    header = json.dumps({"type": "result"}).encode()
    frame = len(header).to_bytes(4, "big") + header
    whole = frame + b"\x00" * (messages.MAX_DATA_FRAME + 1 - len(frame))
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        messages.parse_from_node(whole)
    data = frame + b"\x00" * (messages.MAX_DATA_BYTES + 1)
    with pytest.raises(RemoteProtocolError, match=f"exceeds {messages.MAX_DATA_BYTES}"):
        messages.parse_from_node(data)


def test_features_are_announced_and_checked(parts) -> None:
    """The node announces binary-data in auth; welcome's features switch results to binary;
    a malformed features field is refused."""
    session, node, _, _ = parts
    auth = session.on_challenge(challenge())
    assert auth["features"] == ["binary-data"]
    parsed = messages.parse_from_node(json.dumps(auth))
    assert isinstance(parsed, messages.SignedFrame)
    assert parsed.extra["features"] == {"binary-data"}
    session.on_welcome(messages.Welcome(node.address, 0, None))
    assert session.binary is False  # an older coordinator: base64 text
    session.on_welcome(messages.Welcome(node.address, 0, None, frozenset({"binary-data"})))
    assert session.binary is True
    session.connection_lost()
    assert session.binary is False
    bad = {**messages.Welcome(node.address, 0, None).to_wire(), "features": "binary-data"}
    with pytest.raises(RemoteProtocolError, match="features"):
        messages.parse_from_coordinator(json.dumps(bad))


def test_a_reject_echoes_its_lease_beside_the_signed_message(parts) -> None:
    """A reject's lease_expires_at is a frame field outside the signed Reject: parsed as an
    integer when present, refused when it is not one, and absent from an older node."""
    _, node, _, _ = parts
    msg = {"task_id": uuid.uuid4().bytes, "node_id": node.address, "reason": "over capacity",
           "rejected_at": 1_700_000_000}  # fmt: skip
    sig = eip712.sign_typed(node, "Reject", msg, chain_id=CHAIN)
    plain = messages.signed_frame("reject", msg, sig)
    echoed = messages.signed_frame("reject", msg, sig, lease_expires_at=1_700_000_300)
    assert echoed["message"] == plain["message"] and echoed["signature"] == plain["signature"]
    parsed = messages.parse_from_node(json.dumps(echoed))
    assert isinstance(parsed, messages.SignedFrame)
    assert parsed.extra == {"lease_expires_at": 1_700_000_300}
    old = messages.parse_from_node(json.dumps(plain))
    assert isinstance(old, messages.SignedFrame) and old.extra == {}
    for bad in ("1700000300", -1, 1.5, True):
        with pytest.raises(RemoteProtocolError, match="lease_expires_at"):
            messages.parse_from_node(json.dumps({**plain, "lease_expires_at": bad}))


def test_a_large_frame_of_many_small_values_is_refused_before_parsing() -> None:
    """On the node too: a coordinator's 48 MB frame of "[],[],..." would take some twenty
    times its size once parsed; a frame over the control limit holds few JSON values."""
    from nodeclient.protocol import messages

    bomb = '{"type":"cancel","x":[' + "[]," * 50_000 + "[]]}"
    with pytest.raises(RemoteProtocolError, match="JSON values"):
        messages.parse_from_coordinator(bomb)
    with pytest.raises(RemoteProtocolError, match="JSON values"):
        messages.parse_from_coordinator(bomb.encode())
