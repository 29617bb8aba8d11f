"""2.3.3 Coordinator Link: handshake, close codes, one link per node, heartbeats, errors."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from nodeclient.coordinator import link as link_module
from nodeclient.coordinator import server
from nodeclient.coordinator.link import LinkSession, heartbeat_ack_text
from nodeclient.protocol import eip712, messages
from nodeclient.protocol.messages import HeartbeatAck
from nodeclient.protocol.secp import Secp256k1Key
from tests.coordinator.conftest import (
    CHAIN,
    START,
    Running,
    SimNode,
    closed_code,
    inference_payload,
    make_node,
)


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


def test_a_node_forgotten_while_its_welcome_is_sent_closes_4003(
    coordinator: Running, rsa_keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node retention deletes a node while its handshake awaits the welcome's send:
    the link is refused 4003 (the node registers again) instead of failing on the cache
    entry that went with the record, and the node is not attached."""
    node = make_node(rsa_keys, 0)
    coordinator.register(node)
    real_send = LinkSession.send

    async def send(self: LinkSession, frame: dict) -> bool:
        sent = await real_send(self, frame)
        if frame.get("type") == "welcome":
            coordinator.coord.forget_node(node.node_id)  # as registry.forget_nodes would
        return sent

    monkeypatch.setattr(LinkSession, "send", send)
    node.ws = coordinator.connect()
    node.send(node.auth(node.recv()))
    assert node.recv()["type"] == "welcome"
    assert closed_code(node.ws) == (4003, "not registered")
    assert node.node_id not in coordinator.coord.links


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


def test_a_heartbeat_near_its_stored_seq_is_acknowledged_before_its_commit(
    coordinator: Running, rsa_keys
) -> None:
    """Heartbeat commits may wait tens of ms (on SQLite, behind a scheduling round or a
    job's insert): a heartbeat within UNSTORED_SEQS of its node's stored seq is
    acknowledged without waiting for its commit, and one further above waits for it."""
    import asyncio
    import threading

    from nodeclient.coordinator.service import UNSTORED_SEQS
    from tests.coordinator.conftest import RECV_TIMEOUT

    node = make_node(rsa_keys, 0)
    coordinator.register(node)
    coordinator.link(node)
    held, release = threading.Event(), threading.Event()

    def hold(_conn: object) -> None:  # holds what heartbeat commits run on
        held.set()
        release.wait(RECV_TIMEOUT)

    db = coordinator.coord.db
    holder = threading.Thread(target=lambda: asyncio.run(db.run_heartbeats(hold)))
    holder.start()
    try:
        assert held.wait(RECV_TIMEOUT)
        ack = node.call(node.heartbeat(seq=1))
        assert (ack["type"], ack["seq"]) == ("heartbeat_ack", 1)
        far = UNSTORED_SEQS + 2  # above 0 (stored) + UNSTORED_SEQS
        node.send(node.heartbeat(seq=far))
        with pytest.raises(TimeoutError):
            node.ws.recv(timeout=0.5)
    finally:
        release.set()
        holder.join()
    ack = node.recv()
    assert (ack["type"], ack["seq"]) == ("heartbeat_ack", far)
    assert coordinator.coord.runtime[node.node_id].stored_seq == far


def test_a_heartbeat_flood_is_refused_before_it_costs_a_write(
    coordinator: Running, rsa_keys, caplog: pytest.LogCaptureFixture
) -> None:
    """Each heartbeat stored is a signature recovery and a database write: a link gets
    a burst, then HEARTBEAT_RATE a second. Beyond that a heartbeat gets error
    "too_frequent" and nothing is recorded (one log line, not one a frame); the budget
    comes back with time, and the link stays up."""
    import logging

    from nodeclient.coordinator.link import HEARTBEAT_BURST, HEARTBEAT_RATE

    node = make_node(rsa_keys, 0)
    coordinator.register(node)
    coordinator.link(node)
    frames = [node.heartbeat(seq=seq, state="IDLE") for seq in range(1, HEARTBEAT_BURST + 21)]
    with caplog.at_level(logging.INFO, logger="nodeclient.coordinator.link"):
        for frame in frames:
            node.send(frame)
        answers = [node.recv() for _ in frames]
    acked = [a["seq"] for a in answers if a["type"] == "heartbeat_ack"]
    refused = [a for a in answers if a["type"] == "error"]
    assert acked == list(range(1, HEARTBEAT_BURST + 1))
    assert len(refused) == 20 and {a["code"] for a in refused} == {"too_frequent"}
    logged = [r for r in caplog.records if r.getMessage() == "heartbeat.too_frequent"]
    assert len(logged) == 1
    runtime = coordinator.coord.runtime[node.node_id]
    assert runtime.last_seq == HEARTBEAT_BURST  # the refused ones changed nothing
    coordinator.clock.advance(2 / HEARTBEAT_RATE)  # two heartbeats' worth of budget back
    assert node.call(node.heartbeat(seq=1000, state="EXECUTING"))["type"] == "heartbeat_ack"
    assert coordinator.client.node(node.node_id)["state"] == "EXECUTING"


def test_linking_again_does_not_refill_the_heartbeat_budget(coordinator: Running, rsa_keys) -> None:
    """The budgets are the node's, not the link's: a node that spent its heartbeat burst
    and links again is still refused, so relinking cannot buy 40 stored heartbeats a time."""
    from nodeclient.coordinator.link import HEARTBEAT_BURST

    node = make_node(rsa_keys, 0)
    coordinator.register(node)
    coordinator.link(node)
    for seq in range(1, HEARTBEAT_BURST + 1):
        assert node.call(node.heartbeat(seq=seq))["type"] == "heartbeat_ack"
    assert node.call(node.heartbeat(seq=HEARTBEAT_BURST + 1))["code"] == "too_frequent"
    coordinator.link(node)
    refused = node.call(node.heartbeat(seq=HEARTBEAT_BURST + 2))
    assert refused["type"] == "error" and refused["code"] == "too_frequent", refused
    assert "from this node" in refused["reason"]


def test_a_reject_flood_is_refused_before_it_costs_a_transaction(
    coordinator: Running, rsa_keys, caplog: pytest.LogCaptureFixture
) -> None:
    """Each reject is a signature recovery, a transaction and a log line: a node gets a
    burst, then REJECT_RATE a second, whatever its links. Beyond that a reject gets error
    "too_frequent", unchecked and unlogged but for one line a minute. A reject's reason
    is logged cut to MAX_REASON characters, as it is stored."""
    import logging

    from nodeclient.coordinator.link import REJECT_BURST

    node = make_node(rsa_keys, 0)
    coordinator.register(node)
    coordinator.link(node)
    long = node.reject(str(uuid.uuid4()), "x" * 60_000)
    frames = [node.reject(str(uuid.uuid4())) for _ in range(REJECT_BURST + 4)]
    with caplog.at_level(logging.INFO, logger="nodeclient.coordinator.link"):
        assert node.call(long)["status"] == "rejected"  # not leased to it
        for frame in frames:
            node.send(frame)
        answers = [node.recv() for _ in frames]
    answered = [a for a in answers if a["type"] == "result_ack"]
    refused = [a for a in answers if a["type"] == "error"]
    assert len(answered) == REJECT_BURST - 1 and len(refused) == 5, answers[-6:]
    assert {a["code"] for a in refused} == {"too_frequent"}
    messages_ = [r.getMessage() for r in caplog.records]
    assert messages_.count("reject.too_frequent") == 1
    assert messages_.count("task.reject_refused") == REJECT_BURST
    reasons = [len(r.reason) for r in caplog.records if r.getMessage() == "task.reject_refused"]
    assert max(reasons) == messages.MAX_REASON
    coordinator.link(node)
    assert node.call(node.reject(str(uuid.uuid4())))["code"] == "too_frequent"


def test_a_reject_of_a_dispatch_sent_is_never_refused_as_too_frequent(
    start_coordinator: Callable[..., Running], rsa_keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An honest node may refuse every dispatch (no memory for it, a full backlog) while
    the scheduler refills its free slots twice a second: a reject of a dispatch the link
    sent is answered whatever the budget (the dispatches bound those), else its task would
    stay leased to a node that runs nothing. Rejects of anything else are still charged.
    (Here the budget is 2.)"""
    from nodeclient.coordinator import link

    monkeypatch.setattr(link, "REJECT_BURST", 2)
    monkeypatch.setattr(link, "REJECT_RATE", 0.001)
    running = start_coordinator(max_attempts=100)
    node = make_node(rsa_keys, 0)
    running.register(node)
    running.link(node)
    running.client.submit_job("ai.inference", inference_payload([1.0]))
    for _ in range(6):
        dispatch = node.recv(skip=("heartbeat_ack",))
        assert dispatch["type"] == "dispatch", dispatch
        frame = node.reject(dispatch["task_id"], lease_expires_at=dispatch["lease_expires_at"])
        ack = node.call(frame)
        assert (ack["type"], ack["status"]) == ("result_ack", "accepted"), ack
    # The last reject queued the task again, for this node, its only one: that dispatch
    # is read first, or it could arrive in place of a stray's answer.
    assert node.recv(skip=("heartbeat_ack",))["type"] == "dispatch"
    stray = [node.call(node.reject(str(uuid.uuid4()))) for _ in range(3)]
    assert [a["type"] for a in stray] == ["result_ack", "result_ack", "error"], stray
    assert stray[-1]["code"] == "too_frequent"


def _linked_with_a_300_kb_data_budget(
    start_coordinator: Callable[..., Running], rsa_keys: Any, monkeypatch: pytest.MonkeyPatch
) -> SimNode:
    """A linked node whose data budget is a burst of 300 KB and no refill."""
    monkeypatch.setattr(link_module, "DATA_BURST_BYTES", 300_000)
    monkeypatch.setattr(link_module, "DATA_RATE_BYTES", 1)
    running = start_coordinator()
    node = make_node(rsa_keys, 0)
    running.register(node)
    running.link(node)
    return node


def test_a_node_over_its_data_budget_is_closed_before_the_frame_is_parsed(
    start_coordinator: Callable[..., Running], rsa_keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large JSON frames hold the event loop every link shares while they are parsed: a
    node gets a burst of data bytes, then DATA_RATE_BYTES a second. A frame over it closes
    the link (1008) unparsed; the node links again later and resends. (Here the burst is
    300 KB, so two 200 KB frames cross it.)"""
    node = _linked_with_a_300_kb_data_budget(start_coordinator, rsa_keys, monkeypatch)
    big = {"type": "progress", "pad": "x" * 200_000}
    first = node.call(big)
    assert first["type"] == "error" and first["code"] == "malformed", first  # parsed
    node.send(big)
    code, reason = closed_code(node.ws)
    assert code == 1008 and "data frames come faster than" in reason, (code, reason)


def test_a_text_frame_is_charged_its_bytes_not_its_characters(
    start_coordinator: Callable[..., Running], rsa_keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A text frame of 4-byte characters was charged a quarter of its size (its length
    as a string): 60,000 of them, 240 KB, were not charged at all, being under the 64 KiB
    control-frame limit by that count."""
    node = _linked_with_a_300_kb_data_budget(start_coordinator, rsa_keys, monkeypatch)
    wide = json.dumps({"type": "progress", "pad": "\U0001f600" * 60_000}, ensure_ascii=False)
    assert node.ws is not None
    node.ws.send(wide)  # 240 KB of UTF-8 in 60,000 characters
    assert node.recv()["code"] == "malformed"  # charged 240 KB of the 300 KB
    node.ws.send(wide)
    code, reason = closed_code(node.ws)
    assert code == 1008 and "data frames come faster than" in reason, (code, reason)


def test_a_node_flooding_progress_or_malformed_frames_is_closed(
    start_coordinator: Callable[..., Running], rsa_keys
) -> None:
    """Progress (at most two a second a running task) and malformed frames (none from an
    honest node) each cost the coordinator work and a log line; they had no bound. A node
    gets a burst (8 s of its rate: 16 a second at least, 4 a second a slot), then is
    closed (1008) and links again later. (The test clock does not move: no refill.)"""
    running = start_coordinator()
    node = make_node(rsa_keys, 0)
    running.register(node)
    running.link(node)
    burst = int(link_module.CHATTER_MIN_RATE * link_module.CHATTER_BURST_S)
    progress = {"type": "progress", "task_id": str(uuid.uuid4()), "done": 1, "total": 2,
                "note": ""}  # fmt: skip
    for _ in range(burst):  # each taken silently
        node.send(progress)
    node.send({"type": "nonsense"})  # one more than the burst: no error frame, the close
    code, reason = closed_code(node.ws)
    assert code == 1008 and "progress and refused frames come faster" in reason


def _burst() -> int:
    return int(link_module.CHATTER_MIN_RATE * link_module.CHATTER_BURST_S)


def test_a_node_that_goes_on_past_its_heartbeat_budget_is_closed(
    start_coordinator: Callable[..., Running], rsa_keys
) -> None:
    """Heartbeats refused as too frequent cost the coordinator a parse and an answer each,
    and a node that sends them regardless was never closed: each is charged to its
    chatter budget too, and past it the link is closed (1008). Another node's heartbeats
    are answered meanwhile. (The test clock does not move: no refill.)"""
    running = start_coordinator(heartbeat_interval=1000.0)
    good, bad = make_node(rsa_keys, 0), make_node(rsa_keys, 1)
    for node in (good, bad):
        running.register(node)
        running.link(node)
    beats = link_module.HEARTBEAT_BURST + _burst() + 1
    for seq in range(1, beats + 1):  # refused as too frequent once past HEARTBEAT_BURST
        bad.send(bad.heartbeat(seq=seq))
    code, reason = closed_code(bad.ws)
    assert code == 1008 and "progress and refused frames come faster" in reason
    assert good.call(good.heartbeat())["type"] == "heartbeat_ack"


def test_wrongly_signed_results_are_charged_and_end_the_link(
    coordinator: Running, rsa_keys, caplog: pytest.LogCaptureFixture
) -> None:
    """A result signed by the wrong key is parsed, recovered, answered and logged: small
    ones have no data budget, and a node could send them for ever. Each is charged to its
    chatter budget: past the burst the link is closed (1008), and the log holds at most a
    burst of them."""
    import logging

    node = make_node(rsa_keys, 0)
    coordinator.register(node)
    coordinator.link(node)
    task = {"task_id": str(uuid.uuid4()), "job_id": str(uuid.uuid4())}
    wrong = node.result(task, b"x" * 100, key=node.liveness)
    with caplog.at_level(logging.INFO, logger="nodeclient.coordinator.link"):
        for _ in range(_burst() + 1):
            node.send(wrong)
        code, _ = closed_code(node.ws)
    assert code == 1008
    logged = [r for r in caplog.records if r.getMessage() == "result.rejected"]
    assert len(logged) == _burst()


def test_a_heartbeat_seq_is_kept_below_what_a_restart_adds(
    start_coordinator: Callable[..., Running], rsa_keys
) -> None:
    """After a restart the coordinator takes each node's stored seq plus UNSTORED_SEQS as
    seen, and says so in welcome.last_seq, which the protocol bounds by 2^63-1: a seq
    within UNSTORED_SEQS of that bound is malformed (a node that used it could never link
    again after a restart); one at MAX_HEARTBEAT_SEQ is taken."""
    running = start_coordinator(heartbeat_interval=1000.0)
    node = make_node(rsa_keys, 0)
    running.register(node)
    running.link(node)
    top = link_module.MAX_HEARTBEAT_SEQ
    assert top + link_module.UNSTORED_SEQS == (1 << 63) - 1
    refused = node.call(node.heartbeat(seq=top + 1))
    assert (refused["type"], refused["code"]) == ("error", "malformed")
    assert node.call(node.heartbeat(seq=top))["type"] == "heartbeat_ack"


def test_a_stray_listed_many_times_is_cancelled_once(coordinator: Running, rsa_keys) -> None:
    """A first heartbeat that names one unknown task 1,600 times gets one cancel, not
    1,600 (each a send, and an entry of the coordinator's bounded withdrawn list)."""
    node = make_node(rsa_keys, 0)
    coordinator.register(node)
    coordinator.link(node)
    stray = str(uuid.uuid4())
    node.send(node.heartbeat(running=(stray,) * 1600))
    assert node.ws is not None
    frames = []
    with contextlib.suppress(TimeoutError):
        while True:
            frames.append(json.loads(node.ws.recv(timeout=1.0)))
    assert sorted(f["type"] for f in frames) == ["cancel", "heartbeat_ack"]
    assert [f["task_id"] for f in frames if f["type"] == "cancel"] == [stray]


class _BufferedSocket:
    """A WebSocket whose frames are all in its buffer already (what one read of a
    flooding node's socket gives): receive and send return without waiting."""

    application_state = None  # never connected: close() sends nothing

    def __init__(self, frames: list[str]) -> None:
        self.scope: dict[str, object] = {}
        self.frames = frames
        self.sent = 0

    async def receive(self) -> dict[str, object]:
        if not self.frames:
            return {"type": "websocket.disconnect"}
        return {"type": "websocket.receive", "text": self.frames.pop(0)}

    async def send_text(self, _text: str) -> None:
        self.sent += 1


def test_other_links_run_between_two_frames_of_one(coordinator: Running, rsa_keys) -> None:
    """Frames a node has already sent are received without a wait, and refused ones are
    answered without one: the loop turns to the coordinator's other links between two
    frames of one link, so that no node's flood holds up the others' heartbeats."""
    node = make_node(rsa_keys, 0)
    coordinator.register(node)
    frames = [json.dumps({"type": "nonsense"})] * 20
    socket_ = _BufferedSocket(frames)
    others = 0

    async def scenario() -> int:
        nonlocal others
        session = LinkSession(coordinator.coord, socket_)  # type: ignore[arg-type]
        session.node_id = node.node_id

        async def another_link() -> None:
            nonlocal others
            while True:
                others += 1
                await asyncio.sleep(0)

        beside = asyncio.create_task(another_link())
        await asyncio.sleep(0)
        others = 0
        with contextlib.suppress(link_module._Closed):
            await session._loop()
        beside.cancel()
        return socket_.sent

    answered = asyncio.run(scenario())  # the session alone, on a loop of its own
    assert answered == 20  # each refused, within the chatter burst
    assert others >= 19  # the other link ran between every two


def test_the_chatter_budget_follows_the_nodes_slots() -> None:
    """A node registered again with more slots sends more progress frames: its budget
    (kept across its links) takes the new rate, its tokens kept."""
    budgets = link_module.LinkBudgets(0.0, 30.0)
    one = budgets.chatter_for(1, 0.0)
    assert one.rate == link_module.CHATTER_MIN_RATE
    sixteen = budgets.chatter_for(16, 1.0)
    assert sixteen is one and sixteen.rate == 16 * link_module.CHATTER_RATE_PER_SLOT
    assert sixteen.burst == sixteen.rate * link_module.CHATTER_BURST_S


def test_a_close_after_a_large_frame_waits_for_it(
    start_coordinator: Callable[..., Running], rsa_keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The close frame goes out once the frame before it has left the server's buffer:
    its time counts that frame's, as a frame's does. With the close's own seconds alone,
    a node reading an 8 MiB dispatch at 2 MiB/s (twice the minimum) was reset, never
    seeing the close's code."""
    monkeypatch.setattr(link_module, "CLOSE_TIMEOUT_S", 1.0)
    running = start_coordinator(heartbeat_interval=1000.0)
    node = make_node(rsa_keys, 0)
    running.register(node)
    raw = FastRawLink(running.ws_url)
    session = _raw_linked(running, node, raw)
    assert _on_loop(session, session.send_wire(b"\0" * (8 << 20))).result(10) is True
    closing = _on_loop(session, session.close(4004, "replaced by a newer link"))
    while data := raw.sock.recv(64 << 10):  # about 2 MiB/s
        raw.proto.receive_data(data)
        time.sleep(0.03)
    raw.proto.receive_eof()
    closing.result(30)
    assert raw.proto.close_rcvd is not None and raw.proto.close_rcvd.code == 4004


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
    """A heartbeat naming another node_id on this link is refused and changes nothing:
    signed by the other node's key (a bad signature on this link), and signed by this
    link's own key (the node_id check itself: a signature alone would not catch it)."""
    node, other = make_node(rsa_keys, 0), make_node(rsa_keys, 1)
    coordinator.register(node)
    coordinator.register(other)
    coordinator.link(node)
    err = node.call(other.heartbeat(seq=1))
    assert err["type"] == "error"
    msg = {
        "node_id": other.node_id, "seq": 1, "state": "EXECUTING", "running_tasks": [],
        "load_permille": 0, "sent_at": int(coordinator.clock.now()),
    }  # fmt: skip
    sig = eip712.sign_typed(node.liveness, "Heartbeat", msg, chain_id=eip712.DEVNET_CHAIN_ID)
    err = node.call(messages.signed_frame("heartbeat", msg, sig))
    assert (err["type"], err["code"]) == ("error", "malformed"), err
    assert coordinator.client.node(other.node_id)["state"] is None
    assert coordinator.client.node(node.node_id)["state"] != "EXECUTING"


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


def test_a_link_of_the_replaced_liveness_key_is_closed(coordinator: Running, rsa_keys) -> None:
    """A link authenticated with the liveness key a re-registration just replaced (a
    stolen key, say) is closed with 4001 and gets no more work; the new key links."""
    node = make_node(rsa_keys, 0)
    coordinator.register(node)
    coordinator.link(node)
    stale = node.ws
    assert stale is not None
    node.liveness = Secp256k1Key.generate()
    coordinator.client.register(node.manifest(issued_at=int(START) + 1))
    assert closed_code(stale) == (4001, "liveness key rotated: authenticate again with the new key")
    assert node.node_id not in coordinator.coord.links
    assert coordinator.link(node)["type"] == "welcome"
    coordinator.client.register(node.manifest(issued_at=int(START) + 2))  # the same key
    assert node.call(node.heartbeat())["type"] == "heartbeat_ack"  # still linked


def test_a_rotation_during_the_handshake_refuses_the_link_of_the_old_key(
    coordinator: Running, rsa_keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node re-registers with a new liveness key after its old key's LinkAuth was
    checked, while the welcome is being sent: the rotation finds no link to close yet, so
    the handshake itself sees the key changed and refuses the link (4001), which is never
    attached. (Before, it was attached, online, and got dispatches.)"""
    sending, rotated = threading.Event(), threading.Event()
    real_send = LinkSession.send

    async def send(self: LinkSession, frame: dict) -> None:
        if frame.get("type") == "welcome":
            sending.set()
            await asyncio.to_thread(rotated.wait, 10)  # the loop serves the registration
        await real_send(self, frame)

    monkeypatch.setattr(LinkSession, "send", send)
    node = make_node(rsa_keys, 0)
    coordinator.register(node)
    old = node.liveness
    node.ws = coordinator.connect()
    node.send(node.auth(node.recv(), key=old))
    assert sending.wait(10)
    node.liveness = Secp256k1Key.generate()
    coordinator.client.register(node.manifest(issued_at=int(START) + 1))
    rotated.set()
    assert node.recv()["type"] == "welcome"
    assert closed_code(node.ws) == (
        4001, "auth failed: the liveness key was rotated during the handshake"
    )  # fmt: skip
    assert node.node_id not in coordinator.coord.links
    monkeypatch.setattr(LinkSession, "send", real_send)
    assert coordinator.link(node)["type"] == "welcome"  # the new key links


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


class RawLink:
    """A node link on a bare socket (websockets' sans-I/O protocol): it reads only when
    told to, so a test can stop reading and let the coordinator's sends back up."""

    def __init__(self, ws_url: str) -> None:
        import socket

        from websockets.client import ClientProtocol
        from websockets.uri import parse_uri

        uri = parse_uri(ws_url)
        self.sock = socket.create_connection((uri.host, uri.port), timeout=10)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.proto = ClientProtocol(uri, max_size=None)
        self.proto.send_request(self.proto.connect())
        self._flush()

    def _flush(self) -> None:
        for chunk in self.proto.data_to_send():
            self.sock.sendall(chunk)

    def recv(self) -> dict:
        while True:
            for event in self.proto.events_received():
                if hasattr(event, "data"):
                    return json.loads(event.data)
            self.proto.receive_data(self.sock.recv(65536))
            self._flush()

    def send(self, frame: dict) -> None:
        self.proto.send_text(json.dumps(frame).encode())
        self._flush()


def drain(sock: socket.socket) -> None:
    """Read until the peer ends the connection."""
    while sock.recv(1 << 20):
        pass


def test_a_node_that_stops_reading_is_dropped_and_holds_up_nobody(
    start_coordinator, rsa_keys, monkeypatch
) -> None:
    """A node links and then never reads: once the socket buffers are full, a send to it
    runs out of time, the link is dropped (detached, connection aborted), and the
    scheduler keeps serving other nodes; its leases go elsewhere when they run out."""
    import time

    import numpy as np

    from nodeclient.coordinator import link as link_module
    from tests.coordinator.conftest import inference_payload

    monkeypatch.setattr(link_module, "SEND_TIMEOUT_S", 0.5)
    monkeypatch.setattr(link_module, "MIN_SEND_RATE", 1 << 40)  # the size adds nothing
    running = start_coordinator(heartbeat_interval=1000.0)  # nobody goes offline by silence
    stuck, healthy = make_node(rsa_keys, 0), make_node(rsa_keys, 1)
    running.register(stuck, max_parallel_subtasks=4)
    raw = RawLink(running.ws_url)
    raw.send(stuck.auth(raw.recv(), issued_at=int(running.clock.now())))
    assert raw.recv()["type"] == "welcome"  # ... and from now on it never reads
    big = inference_payload(np.full(2 << 20, 0.5).tolist())  # 8 MiB a dispatch
    jobs = [running.client.submit_job("ai.inference", big)["job_id"] for _ in range(4)]
    end = time.monotonic() + 30
    while stuck.node_id in running.coord.links:
        assert time.monotonic() < end, "the stalled link was never dropped"
        time.sleep(0.05)
    # Aborted, not closed: a close would wait on the full buffer for as long as the node
    # keeps not reading. An abort resets the connection (what was buffered is discarded).
    raw.sock.settimeout(10)
    with pytest.raises(ConnectionResetError):
        drain(raw.sock)
    running.register(healthy)
    running.link(healthy)
    small = running.client.submit_job("ai.inference", inference_payload([1.0]))["job_id"]
    dispatch = healthy.recv()
    assert dispatch["type"] == "dispatch" and dispatch["job_id"] in (small, *jobs)
    # The stuck node's leases run out and are dispatched to the healthy node.
    running.clock.advance(301)
    seen = {dispatch["job_id"]}
    healthy.send(healthy.reject(dispatch["task_id"]))
    while len(seen) < 5:
        frame = healthy.recv(skip=("cancel", "result_ack"))
        assert frame["type"] == "dispatch"
        seen.add(frame["job_id"])
        healthy.send(healthy.reject(frame["task_id"]))  # frees the slot for the next one
    assert seen == {small, *jobs}
    raw.sock.close()


def test_a_large_frame_before_auth_is_refused_by_its_header(coordinator: Running, rsa_keys) -> None:
    """Before auth the server's message limit is the control frame's: a frame that
    declares 48 MB is refused (1009) on its header alone, before a byte of its payload
    arrives, so a stranger cannot make the coordinator hold 48 MB per connection."""
    node = make_node(rsa_keys, 0)
    coordinator.register(node)
    node.ws = coordinator.connect()
    assert node.recv()["type"] == "challenge"
    size = 48 * 1024 * 1024
    node.ws.socket.sendall(bytes([0x81, 0x80 | 127]) + size.to_bytes(8, "big") + bytes(4))
    code, _ = closed_code(node.ws)
    assert code == 1009  # message too big


def test_the_link_checks_a_large_frame_before_auth_itself(
    start_coordinator: Callable[..., Running], rsa_keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Behind a server that lets a large frame through before auth (here: a pre-auth
    limit raised to 200 KB), the link refuses 100 KB of JSON with 4000 by its size
    alone, unparsed."""
    monkeypatch.setattr(server, "MAX_CONTROL_FRAME", 200_000)
    coordinator = start_coordinator()
    node = make_node(rsa_keys, 0)
    coordinator.register(node)
    node.ws = coordinator.connect()
    assert node.recv()["type"] == "challenge"
    node.send({"type": "auth", "pad": "x" * 100_000})
    code, reason = closed_code(node.ws)
    assert code == 4000 and "100027-byte frame before auth" in reason


def test_a_binary_node_may_not_send_large_json(coordinator: Running, rsa_keys) -> None:
    """A node that announced binary data frames sends results binary: a JSON frame over
    64 KiB from it is malformed (refused unparsed), and the link stays up."""
    node = make_node(rsa_keys, 0)
    coordinator.register(node)
    node.ws = coordinator.connect()
    auth = node.auth(node.recv())
    auth["features"] = ["binary-data"]
    assert node.call(auth)["type"] == "welcome"
    error = node.call({"type": "result", "pad": "x" * 100_000})
    assert error["type"] == "error" and error["code"] == "malformed"
    assert "exceeds the 65536-byte limit" in error["reason"]
    assert node.call(node.heartbeat())["type"] == "heartbeat_ack"


def test_progress_is_kept_per_node_and_bounded() -> None:
    """One node can neither overwrite nor hide another's report (a node that held the
    task earlier reports on it after its holder did) nor grow the board without bound;
    a node's reports go with its link."""
    from nodeclient.coordinator.service import ProgressBoard

    board = ProgressBoard()
    board.record("0xA", "t1", {"done": 1, "total": 4, "note": "", "at": 1.0}, cap=2)
    board.record("0xB", "t1", {"done": 0, "total": 4, "note": "spoof", "at": 2.0}, cap=2)
    assert board.get("t1", node_id="0xA") == {
        "done": 1, "total": 4, "note": "", "at": 1.0, "node_id": "0xA"
    }  # fmt: skip
    assert board.get("t1", node_id="0xB")["note"] == "spoof"  # type: ignore[index]
    assert board.get("t1", node_id="0xC") is None
    board.forget("0xB")
    assert board.get("t1", node_id="0xB") is None
    for i in range(1000):  # random task ids from one node: only its newest `cap` are kept
        board.record("0xB", f"r{i}", {"done": 0, "total": 1, "note": "", "at": 3.0 + i}, cap=2)
    assert len(board) == 3
    assert board.get("r999", node_id="0xB") is not None and board.get("r0", node_id="0xB") is None
    board.forget("0xA", "t1")
    assert board.get("t1", node_id="0xA") is None and len(board) == 2


def test_a_database_failure_closes_the_link_1011_and_serving_goes_on(
    coordinator: Running, rsa_keys, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """The database fails under a frame (locked, its server gone): the link closes with
    1011 and a reason (the node links again with backoff and resends what is
    unacknowledged), one structured event is logged, and the coordinator serves on."""
    import logging
    import uuid

    from sqlalchemy.exc import OperationalError

    from nodeclient.coordinator import verifier

    def locked(*args: object, **kwargs: object) -> None:
        raise OperationalError("UPDATE tasks", {}, Exception("database is locked"))

    node = make_node(rsa_keys, 0)
    coordinator.register(node)
    coordinator.link(node)
    monkeypatch.setattr(verifier, "reject_tx", locked)
    with caplog.at_level(logging.ERROR, logger="nodeclient.coordinator.link"):
        node.send(node.reject(str(uuid.uuid4())))
        assert closed_code(node.ws) == (1011, "coordinator database unavailable; link again later")
    (event,) = [r for r in caplog.records if r.getMessage() == "link.database_error"]
    assert "database is locked" in event.error  # type: ignore[attr-defined]
    monkeypatch.undo()
    coordinator.link(node)  # links again, and is served
    assert node.call(node.heartbeat(state="IDLE"))["type"] == "heartbeat_ack"

    # Any other database error is a bug, not an outage: said so, with its traceback.
    from sqlalchemy.exc import IntegrityError

    def broken(*args: object, **kwargs: object) -> None:
        raise IntegrityError("INSERT INTO tasks", {}, Exception("UNIQUE constraint failed"))

    monkeypatch.setattr(verifier, "reject_tx", broken)
    with caplog.at_level(logging.ERROR, logger="nodeclient.coordinator.link"):
        node.send(node.reject(str(uuid.uuid4())))
        assert closed_code(node.ws) == (1011, "coordinator internal error; reported in its log")
    (bug,) = [r for r in caplog.records if r.getMessage() == "link.internal_error"]
    assert bug.exc_info is not None


def test_the_heartbeat_budget_follows_a_short_interval(start_coordinator, rsa_keys) -> None:
    """A coordinator with a short heartbeat interval (tests, benchmarks: 0.05 s is
    allowed) lets its nodes send that often: the budget is 4 heartbeats an interval, at
    least HEARTBEAT_RATE a second."""
    from nodeclient.coordinator.link import HEARTBEAT_BURST

    running = start_coordinator(heartbeat_interval=0.05)
    node = make_node(rsa_keys, 0)
    running.register(node)
    running.link(node)
    frames = [node.heartbeat() for _ in range(HEARTBEAT_BURST + 20)]
    answers = []
    for frame in frames:  # as a node at that interval would, but faster still
        running.clock.advance(0.025)  # twice as fast as the interval: within 4 an interval
        answers.append(node.call(frame)["type"])
    assert set(answers) == {"heartbeat_ack"}


def test_heartbeats_that_need_no_wait_share_a_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Acknowledged before their commit, heartbeats arriving a millisecond apart are
    written by one commit every COMMIT_GAP_S, not one each; the stored seqs follow."""
    import asyncio

    from nodeclient.coordinator import service
    from nodeclient.coordinator.service import HeartbeatWriter, NodeRuntime

    commits: list[list[tuple[str, int, str, float]]] = []

    class Db:
        async def run_heartbeats(self, fn: Callable[[object], None]) -> None:
            fn(None)

    monkeypatch.setattr(
        service, "_write_heartbeats", lambda _conn, *, batch: commits.append(list(batch))
    )
    runtime = {f"n{i}": NodeRuntime(last_seq=0, last_seen=None, state=None) for i in range(20)}

    async def beats() -> None:
        writer = HeartbeatWriter(Db(), runtime)  # type: ignore[arg-type]
        for i in range(20):
            await writer.persist(f"n{i}", 1, "IDLE", 0.0, wait=False)
            await asyncio.sleep(0.001)
        await writer.close()

    asyncio.run(beats())
    assert sum(len(c) for c in commits) == 20
    assert len(commits) <= 10, [len(c) for c in commits]
    assert all(rt.stored_seq == 1 for rt in runtime.values())


def test_cpu_work_runs_on_a_bounded_pool_with_the_callers_context(
    coordinator: Running,
) -> None:
    """Job decoding, JSON, sealing and proofs run on CPU_THREADS threads, not asyncio's
    default executor of CPUs + 4: each such thread takes GIL turns from the event loop.
    The caller's context (the log fields bound to it) goes with the call."""
    import asyncio
    import contextvars
    import threading
    import time

    from nodeclient.coordinator.service import CPU_THREADS

    bound = contextvars.ContextVar("bound", default="")

    def work() -> tuple[str, str]:
        time.sleep(0.05)
        return threading.current_thread().name, bound.get()

    async def calls() -> list[tuple[str, str]]:
        bound.set("task 7")
        return await asyncio.gather(*(coordinator.coord.in_cpu(work) for _ in range(6)))

    done = asyncio.run(calls())
    names = {name for name, _ in done}
    assert len(names) == CPU_THREADS and all(n.startswith("coordinator-cpu") for n in names)
    assert {value for _, value in done} == {"task 7"}


def test_nodes_cpu_work_never_waits_behind_requesters(coordinator: Running) -> None:
    """Requests may keep every requester CPU thread busy (large jobs, large job JSON):
    result proofs and sealing run on threads of their own and are not held up."""
    import asyncio
    import threading

    from nodeclient.coordinator.service import CPU_THREADS

    release = threading.Event()
    coord = coordinator.coord

    async def run() -> int:
        busy = [asyncio.ensure_future(coord.in_cpu(release.wait, 10)) for _ in range(CPU_THREADS)]
        try:
            return await asyncio.wait_for(coord.in_node_cpu(lambda: 7), 5)
        finally:
            release.set()
            await asyncio.gather(*busy)

    assert asyncio.run(run()) == 7


class FastRawLink(RawLink):
    """A RawLink with the kernel's own receive buffer: it can read as fast as it likes."""

    def __init__(self, ws_url: str) -> None:
        import socket

        from websockets.client import ClientProtocol
        from websockets.uri import parse_uri

        uri = parse_uri(ws_url)
        self.sock = socket.create_connection((uri.host, uri.port), timeout=10)
        self.proto = ClientProtocol(uri, max_size=None)
        self.proto.send_request(self.proto.connect())
        self._flush()


def _raw_linked(running: Running, node: SimNode, link: RawLink) -> Any:
    link.send(node.auth(link.recv(), issued_at=int(running.clock.now())))
    assert link.recv()["type"] == "welcome"
    return running.coord.links[node.node_id]


def _on_loop(session: Any, coro: Any) -> Any:
    assert session._task is not None
    return asyncio.run_coroutine_threadsafe(coro, session._task.get_loop())


def test_replacing_a_stalled_link_leaves_the_new_one_up(
    start_coordinator, rsa_keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old link's node no longer reads (a half-open connection: why it links again):
    the old link's close waits behind its stuck send, then meets a connection already
    gone. Before, the new link's handshake awaited that close, and what it raised ended
    the new, healthy link (1006). Now the old one is closed aside, and nothing escapes."""
    monkeypatch.setattr(link_module, "SEND_TIMEOUT_S", 2.0)
    raised: list[tuple[int, str]] = []
    close = link_module.LinkSession.close

    async def recorded(self: LinkSession, code: int, reason: str) -> None:
        try:
            await close(self, code, reason)
        except BaseException as exc:
            raised.append((code, type(exc).__name__))
            raise

    monkeypatch.setattr(link_module.LinkSession, "close", recorded)
    running = start_coordinator(heartbeat_interval=1000.0)
    node = make_node(rsa_keys, 0)
    running.register(node)
    old = _raw_linked(running, node, RawLink(running.ws_url))
    _on_loop(old, old.send_wire(b"\0" * (24 << 20))).result(10)
    stuck = _on_loop(old, old.send_wire('{"type":"x"}'))
    time.sleep(0.2)
    assert running.link(node)["type"] == "welcome"  # the node links again
    assert running.coord.links[node.node_id] is not old
    assert node.call(node.heartbeat())["type"] == "heartbeat_ack"
    assert stuck.result(30) is False
    assert node.call(node.heartbeat())["type"] == "heartbeat_ack"
    assert node.node_id in running.coord.links and raised == []


def test_a_large_frames_time_carries_over_to_the_frame_after_it(
    start_coordinator, rsa_keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server writes a frame once the one before has left its buffer: the frame after
    an 8 MiB one waits for those 8 MiB to be read. A node reading at 2 MiB/s, twice the
    documented minimum, was dropped: the small frame had only its own 0.5 s."""
    monkeypatch.setattr(link_module, "SEND_TIMEOUT_S", 0.5)  # MIN_SEND_RATE: 1 MiB/s
    running = start_coordinator(heartbeat_interval=1000.0)
    node = make_node(rsa_keys, 0)
    running.register(node)
    raw = FastRawLink(running.ws_url)
    session = _raw_linked(running, node, raw)
    size = 8 << 20
    read = [0]

    def slow_reader() -> None:  # about 2 MiB/s
        while read[0] < size:
            data = raw.sock.recv(64 << 10)
            if not data:
                return
            read[0] += len(data)
            time.sleep(0.03)

    reader = threading.Thread(target=slow_reader, daemon=True)
    reader.start()
    assert _on_loop(session, session.send_wire(b"\0" * size)).result(10) is True
    small = _on_loop(session, session.send_wire('{"type":"error","code":"x","reason":"y"}'))
    assert small.result(30) is True
    assert node.node_id in running.coord.links
    reader.join(30)


def test_a_close_behind_a_frame_being_sent_still_reaches_the_node(
    start_coordinator, rsa_keys
) -> None:
    """A close (here 4004: another process linked) waits for the frame being sent; a
    frame the node sends meanwhile ended the session without it (the node saw 1006, and
    so never learnt that another process held its keys). Now the session waits for its
    close, and the node reads the 4004 after the data."""
    running = start_coordinator(heartbeat_interval=1000.0)
    node = make_node(rsa_keys, 0)
    running.register(node)
    raw = FastRawLink(running.ws_url)
    session = _raw_linked(running, node, raw)
    _on_loop(session, session.send_wire(b"\0" * (32 << 20))).result(10)
    pending = _on_loop(session, session.send_wire('{"type":"cancel"}'))
    time.sleep(0.2)
    closing = _on_loop(session, session.close(4004, "replaced by a newer link"))
    time.sleep(0.2)
    raw.send({"type": "progress", "task_id": "00000000-0000-4000-8000-000000000001",
              "done": 1, "total": 2, "note": ""})  # fmt: skip
    time.sleep(0.5)
    raw.sock.settimeout(10)
    while data := raw.sock.recv(1 << 20):  # now the node reads everything
        raw.proto.receive_data(data)
    raw.proto.receive_eof()
    closing.result(10)
    pending.result(10)
    assert raw.proto.close_rcvd is not None
    assert (raw.proto.close_rcvd.code, raw.proto.close_rcvd.reason) == (
        4004, "replaced by a newer link"
    )  # fmt: skip
