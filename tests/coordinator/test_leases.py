"""Leases and liveness: expiry, offline nodes, retries, max attempts, unstaking, late results.

Time moves only through the coordinator's ManualClock; the scheduler notices on its next
round (every 20 ms in tests).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from websockets.exceptions import ConnectionClosed

from nodeclient.clock import ManualClock
from nodeclient.coordinator import models as m
from nodeclient.protocol import eip712
from nodeclient.protocol.states import UNSTAKE_COOLDOWN_S
from tests.coordinator.conftest import (
    CHAIN,
    RECV_TIMEOUT,
    START,
    Running,
    SimNode,
    closed_code,
    config_for,
    inference_payload,
    inference_result,
    make_node,
    start,
    stop,
)

VALUES = [4.0, 5.0]


def test_lease_expiry_requeues_to_another_node(start_coordinator, rsa_keys) -> None:
    """A missed lease deadline re-queues the task, preferring a node that has not tried it;
    the old holder is told to cancel."""
    running = start_coordinator(heartbeat_interval=1000.0)  # nobody goes offline here
    first, second = make_node(rsa_keys, 0), make_node(rsa_keys, 1)
    running.register(first)
    running.link(first)
    job = running.client.submit_job("ai.inference", inference_payload(VALUES))
    dispatch = first.recv()
    running.register(second)
    running.link(second)
    running.clock.advance(301)  # the 300 s lease is now missed
    cancel = first.recv()
    assert cancel == {"type": "cancel", "task_id": dispatch["task_id"], "reason": "lease ended"}
    again = second.recv()
    assert again["type"] == "dispatch"
    assert again["task_id"] == dispatch["task_id"]
    task = running.client.job(job["job_id"])["tasks"][0]
    assert (task["node_id"], task["attempts"], task["status"]) == (second.node_id, 2, "leased")
    assert task["reason"].startswith("lease expired")


def _frames_until(ws: Any, timeout: float) -> tuple[list[dict[str, Any]], Exception]:
    """The frames *ws* receives until a receive fails (the link closed, or *timeout*
    seconds without a frame), and that failure."""
    frames = []
    while True:
        try:
            frames.append(json.loads(ws.recv(timeout=timeout)))
        except (ConnectionClosed, TimeoutError) as exc:
            return frames, exc


def test_offline_node_tasks_are_requeued(coordinator: Running, rsa_keys) -> None:
    """No heartbeat for 3 intervals: the node is offline (link closed 4005) and its leased
    tasks go to another node. The node is told to drop them before its link is closed: a
    node that is silent but still linked would otherwise run them on, its slots busy."""
    first, second = make_node(rsa_keys, 0), make_node(rsa_keys, 1)
    coordinator.register(first)
    coordinator.register(second)
    coordinator.link(first)
    job = coordinator.client.submit_job("ai.inference", inference_payload(VALUES))
    dispatch = first.recv()
    coordinator.clock.advance(91)
    assert first.ws is not None
    frames, closed = _frames_until(first.ws, RECV_TIMEOUT)
    assert isinstance(closed, ConnectionClosed) and closed.rcvd is not None
    assert closed.rcvd.code == 4005
    assert closed.rcvd.reason.startswith("offline")
    cancels = [(f["task_id"], f["reason"]) for f in frames if f["type"] == "cancel"]
    assert cancels == [(dispatch["task_id"], "lease ended")], frames
    assert coordinator.client.node(first.node_id)["online"] is False
    coordinator.link(second)
    again = second.recv()
    assert again["type"] == "dispatch"
    assert again["task_id"] == dispatch["task_id"]
    task = coordinator.client.job(job["job_id"])["tasks"][0]
    assert task["node_id"] == second.node_id
    assert "went offline" in (task["reason"] or "")


def test_a_link_made_while_the_silent_ones_leases_are_written_stays_up(
    coordinator: Running, rsa_keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node links again while its silence is being handled (its leases written back
    to the queue): only the silent link is closed 4005; the new one, authenticated, gets
    the cancel of the task it lost and stays up."""
    from nodeclient.coordinator import scheduler as scheduler_mod

    node = make_node(rsa_keys, 0)
    coordinator.register(node)
    coordinator.link(node)
    coordinator.client.submit_job("ai.inference", inference_payload(VALUES))
    lost = node.recv()
    writing = threading.Event()
    real = scheduler_mod.node_lost_tx

    def slow(*args: Any, **kwargs: Any) -> Any:
        writing.set()
        time.sleep(1.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(scheduler_mod, "node_lost_tx", slow)
    coordinator.clock.advance(91)
    assert writing.wait(RECV_TIMEOUT)
    coordinator.link(node)  # while the leases are being written
    assert node.ws is not None
    frames, ended = _frames_until(node.ws, 2.0)
    assert isinstance(ended, TimeoutError), ended  # still up, not closed 4005
    assert ("cancel", lost["task_id"]) in [(f["type"], f.get("task_id")) for f in frames]


def test_a_node_back_from_offline_is_told_to_drop_the_task_it_lost(
    coordinator: Running, rsa_keys
) -> None:
    """A node cut off for three intervals (its cancel lost with its link) still runs the
    task that went to another node meanwhile. At its new link's first heartbeat, which
    names that task, it is told to drop it ("lease ended"), so that its slot is free for
    the work it is now counted free for; a task it still holds is left alone."""
    first, second = make_node(rsa_keys, 0), make_node(rsa_keys, 1)
    for node in (first, second):
        coordinator.register(node)
    coordinator.link(first)
    coordinator.client.submit_job("ai.inference", inference_payload(VALUES))
    lost = first.recv()
    assert lost["type"] == "dispatch"
    coordinator.link(second)
    for _ in range(3):  # the second node beats on; the first is silent
        coordinator.clock.advance(30.5)
        second.call(second.heartbeat())
    assert first.ws is not None
    closed_code(first.ws)
    assert second.recv(skip=("heartbeat_ack",))["task_id"] == lost["task_id"]
    coordinator.link(first)
    coordinator.client.submit_job("ai.inference", inference_payload(VALUES))
    kept = first.recv(skip=("heartbeat_ack",))
    assert kept["type"] == "dispatch"
    first.send(first.heartbeat(running=(lost["task_id"], kept["task_id"])))
    cancel = first.recv(skip=("heartbeat_ack",))
    assert (cancel["type"], cancel["task_id"], cancel["reason"]) == (
        "cancel", lost["task_id"], "lease ended"
    )  # fmt: skip
    assert first.ws is not None
    later, quiet = _frames_until(first.ws, 0.5)
    assert isinstance(quiet, TimeoutError)
    assert "cancel" not in [f["type"] for f in later], later  # none for the task it holds


def test_a_node_is_offline_as_its_silence_passes_three_intervals(
    coordinator: Running, rsa_keys
) -> None:
    """A check just before the limit (89.5 s of silence) schedules the next one for the
    moment the limit passes, so 90.5 s of silence is enough. (Before, checks came every
    half interval: after one at 89.5 s, the node stayed online until 104.5 s.)"""
    node = make_node(rsa_keys, 0)
    coordinator.register(node)
    coordinator.link(node)
    coordinator.clock.advance(89.5)
    time.sleep(0.5)  # rounds run every 20 ms: one checks at 89.5 s
    assert coordinator.client.node(node.node_id)["online"] is True
    coordinator.clock.advance(1.0)
    assert node.ws is not None
    code, reason = closed_code(node.ws)
    assert (code, reason) == (4005, "offline: no heartbeat for 90 s")
    assert coordinator.client.node(node.node_id)["online"] is False


class SteppedClock(ManualClock):
    """A wall clock that can be stepped (an NTP correction) apart from the monotonic one."""

    def __init__(self) -> None:
        super().__init__(START)
        self.mono = 0.0

    def monotonic(self) -> float:
        return self.mono

    def elapse(self, seconds: float) -> None:
        """Time passes: both clocks move (advance alone is a step of the wall clock)."""
        self.advance(seconds)
        self.mono += seconds


def test_a_wall_clock_step_marks_no_node_offline(start_coordinator, rsa_keys) -> None:
    """The coordinator's wall clock jumps 6 days forward between two heartbeats: silence is
    measured on the monotonic clock, so the linked node stays online (before, it was
    closed 4005 "no heartbeat for 518400 s" and its leases re-queued). Silence on the
    monotonic clock still marks it offline."""
    clock = SteppedClock()
    running = start_coordinator(clock=clock)
    node = make_node(rsa_keys, 0)
    running.register(node)
    running.link(node)
    clock.advance(6 * 86400)
    time.sleep(0.3)  # the scheduler's rounds (every 20 ms) run their offline check
    assert running.client.node(node.node_id)["online"] is True
    assert node.call(node.heartbeat())["type"] == "heartbeat_ack"
    clock.mono += 91
    assert node.ws is not None
    assert closed_code(node.ws)[0] == 4005


def _no_frame(node: SimNode, seconds: float = 0.3) -> None:
    assert node.ws is not None
    with pytest.raises(TimeoutError):
        node.ws.recv(timeout=seconds)


def _lease_ended(node: SimNode, dispatch: dict[str, Any]) -> None:
    """The next frame *node* gets is the cancel of *dispatch*'s lease, at its end."""
    cancel = {"type": "cancel", "task_id": dispatch["task_id"], "reason": "lease ended"}
    assert node.recv() == cancel


def _linked_on(
    clock: SteppedClock, start_coordinator: Any, rsa_keys: Any
) -> tuple[Running, SimNode]:
    """A coordinator on *clock*, with one node registered and linked."""
    running = start_coordinator(clock=clock, heartbeat_interval=1000.0)
    node = make_node(rsa_keys, 0)
    running.register(node)
    running.link(node)
    return running, node


def test_a_wall_clock_stepped_forward_expires_no_lease(
    start_coordinator, rsa_keys, caplog: pytest.LogCaptureFixture
) -> None:
    """The wall clock jumps a day forward while a task is leased (a VM restored from a
    snapshot, an NTP correction): the stored lease moves with it, so it is not expired at
    once (before: cancelled, an attempt spent and counted against the node); its result
    is accepted, and a lease made after the step ends 300 s after it began."""
    clock = SteppedClock()
    running, node = _linked_on(clock, start_coordinator, rsa_keys)
    payload = inference_payload(VALUES)
    job = running.client.submit_job("ai.inference", payload)
    dispatch = node.recv()
    assert dispatch["sent_at"] == START and dispatch["lease_expires_at"] == int(START) + 300
    with caplog.at_level(logging.WARNING, logger="nodeclient.coordinator"):
        clock.advance(86400)
        end = time.monotonic() + 10  # a round sees the step (20-40 ms, longer under load)
        while not any(r.getMessage() == "clock.stepped" for r in caplog.records):
            assert time.monotonic() < end, "no round saw the clock step"
            time.sleep(0.02)
        _no_frame(node)  # no cancel: the scheduler's rounds ran meanwhile
    (stepped,) = [r for r in caplog.records if r.getMessage() == "clock.stepped"]
    assert (stepped.__dict__["step_s"], stepped.__dict__["leases"]) == (86400, 1)
    task = running.client.job(job["job_id"])["tasks"][0]
    assert task["lease_deadline"] == START + 86400 + 300  # 300 s left, as before the step
    ack = node.call(node.result(dispatch, inference_result(payload, VALUES)))
    assert ack["status"] == "accepted"
    done = running.wait_job(job["job_id"], "succeeded")
    assert done["tasks"][0]["attempts"] == 1
    # Another task, leased after the step, ends when its 300 s have passed.
    now = START + 86400
    job = running.client.submit_job("ai.inference", payload)
    dispatch = node.recv()
    assert dispatch["sent_at"] == now and dispatch["lease_expires_at"] == int(now) + 300
    clock.elapse(299)
    _no_frame(node)
    clock.elapse(2)
    _lease_ended(node, dispatch)


def test_a_clock_step_whose_shift_fails_once_is_applied_by_the_next_round(
    start_coordinator, rsa_keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The step's transaction fails (a locked database, a server that went away with the
    snapshot that stepped the clock): the next round applies it, so the lease is still not
    expired at once. (Before, the step was taken as seen and lost with that round: the
    lease expired, an attempt spent and counted against the node.)"""
    from sqlalchemy.exc import OperationalError

    from nodeclient.coordinator import scheduler

    clock = SteppedClock()
    running, node = _linked_on(clock, start_coordinator, rsa_keys)
    job = running.client.submit_job("ai.inference", inference_payload(VALUES))
    node.recv()
    real, steps = scheduler.shift_times_tx, []

    def fails_once(session: Any, *, by: float) -> dict[str, int]:
        steps.append(by)
        if len(steps) == 1:
            raise OperationalError("UPDATE tasks", {}, Exception("database is locked"))
        return real(session, by=by)

    monkeypatch.setattr(scheduler, "shift_times_tx", fails_once)
    clock.advance(86400)
    end = time.monotonic() + 10
    while len(steps) < 2:  # the failed round, then the next one's
        assert time.monotonic() < end, f"the step was not applied again: {steps}"
        time.sleep(0.02)
    assert steps == [86400, 86400]
    _no_frame(node)  # no cancel
    task = running.client.job(job["job_id"])["tasks"][0]
    assert (task["status"], task["attempts"]) == ("leased", 1)
    assert task["lease_deadline"] == START + 86400 + 300


@pytest.mark.parametrize("step", [3600, -3600])
def test_a_reject_of_a_lease_dispatched_before_a_clock_step_is_taken(
    start_coordinator, rsa_keys, caplog: pytest.LogCaptureFixture, step: int
) -> None:
    """The node refuses a task leased before the wall clock stepped, echoing the
    lease_expires_at it was sent: that is still the current lease (its attempt keeps the
    value sent), so the reject is accepted and the task re-queued at once. (Before, the
    echo was compared with the moved lease only, and the reject ignored as another
    lease's: the task waited out its lease, then expired against the node.)"""
    clock = SteppedClock()
    running, node = _linked_on(clock, start_coordinator, rsa_keys)
    job = running.client.submit_job("ai.inference", inference_payload(VALUES))
    dispatch = node.recv()
    with caplog.at_level(logging.WARNING, logger="nodeclient.coordinator"):
        clock.advance(step)
        end = time.monotonic() + 10
        while not any(r.getMessage() == "clock.stepped" for r in caplog.records):
            assert time.monotonic() < end, "no round saw the clock step"
            time.sleep(0.02)
    reject = node.reject(
        dispatch["task_id"], "out of memory", lease_expires_at=dispatch["lease_expires_at"]
    )
    assert node.call(reject)["status"] == "accepted"
    task = running.client.job(job["job_id"])["tasks"][0]
    assert task["reason"].startswith(f"node {node.node_id} rejected it: out of memory")
    # A reject of an earlier lease (another lease_expires_at) is still ignored.
    again = node.recv()
    assert (again["type"], again["task_id"]) == ("dispatch", dispatch["task_id"])
    stale = node.reject(dispatch["task_id"], "late", lease_expires_at=dispatch["lease_expires_at"])
    assert node.call(stale)["status"] == "rejected"


def test_a_wall_clock_stepped_back_holds_no_lease_longer(start_coordinator, rsa_keys) -> None:
    """The wall clock goes back an hour while a task is leased: its lease still ends
    when its 300 s have passed, not an hour later."""
    clock = SteppedClock()
    running, node = _linked_on(clock, start_coordinator, rsa_keys)
    running.client.submit_job("ai.inference", inference_payload(VALUES))
    dispatch = node.recv()
    clock.advance(-3600)
    _no_frame(node)
    clock.elapse(301)
    _lease_ended(node, dispatch)


def test_a_lease_moved_by_a_step_stays_moved_after_a_restart(tmp_path: Path, rsa_keys) -> None:
    """The stored lease itself moves with a step, so a coordinator restarted after one
    reads the lease as it was meant: 100 s after the restart (105 s into a 300 s lease)
    the task is still leased, not expired by the day the wall clock jumped."""
    clock = SteppedClock()
    node = make_node(rsa_keys, 0)
    first, server, thread = start(config_for(data_dir=tmp_path, heartbeat_interval=1000.0), clock)
    try:
        first.register(node)
        first.link(node)
        job = first.client.submit_job("ai.inference", inference_payload(VALUES))
        node.recv()
        clock.advance(86400 + 1)
        clock.mono += 1
        end = time.monotonic() + 10
        while first.client.job(job["job_id"])["tasks"][0]["lease_deadline"] == START + 300:
            assert time.monotonic() < end, "the lease was never moved"
            time.sleep(0.02)
    finally:
        stop(first, server, thread)
    clock.elapse(4)
    again, server2, thread2 = start(config_for(data_dir=tmp_path, heartbeat_interval=1000.0), clock)
    try:
        clock.elapse(100)
        time.sleep(0.3)  # the scheduler's rounds run
        task = again.client.job(job["job_id"])["tasks"][0]
        assert (task["status"], task["lease_deadline"]) == ("leased", START + 86400 + 300)
    finally:
        stop(again, server2, thread2)


def test_max_attempts_fails_the_job_with_reason(start_coordinator, rsa_keys) -> None:
    """After max_attempts missed leases the task and its job fail, naming why."""
    running = start_coordinator(max_attempts=2, heartbeat_interval=1000.0)
    node = make_node(rsa_keys, 0)
    running.register(node)
    running.link(node)
    job = running.client.submit_job("ai.inference", inference_payload(VALUES))
    assert node.recv()["type"] == "dispatch"
    running.clock.advance(301)
    assert node.recv()["type"] == "cancel"
    retry = node.recv()
    assert retry["type"] == "dispatch"  # the only node: tried again rather than starved
    running.clock.advance(301)
    failed = running.wait_job(job["job_id"], "failed")
    assert failed["status"] == "failed"
    assert "gave up after 2 of 2 attempts" in failed["reason"]
    assert failed["tasks"][0]["status"] == "failed"
    assert failed["finished_at"] is not None


def test_a_node_that_refuses_everything_cannot_fail_a_job_alone(
    start_coordinator, rsa_keys
) -> None:
    """A task a node refused is not leased back to it while another node could take it,
    even one busy now: it waits for that node. A node that refuses whatever it gets is
    always the least loaded, so it would otherwise spend all of the task's attempts within
    a second while the honest node finished its other task."""
    running = start_coordinator(heartbeat_interval=1000.0)
    honest, hostile = make_node(rsa_keys, 0), make_node(rsa_keys, 1)
    running.register(honest)
    running.link(honest)
    first = running.client.submit_job("ai.inference", inference_payload(VALUES))
    busy = honest.recv()
    assert busy["type"] == "dispatch"  # the honest node's only slot is taken
    running.register(hostile)
    running.link(hostile)
    second = running.client.submit_job("ai.inference", inference_payload(VALUES))
    refused = hostile.recv()
    assert refused["job_id"] == second["job_id"]
    ack = hostile.call(
        hostile.reject(refused["task_id"], "no", lease_expires_at=refused["lease_expires_at"])
    )
    assert ack["status"] == "accepted", ack
    time.sleep(0.3)  # scheduling rounds run every 20 ms: none leases it back to the refuser
    job = running.client.job(second["job_id"])
    assert job["status"] != "failed" and job["tasks"][0]["status"] == "queued", job
    assert (
        honest.call(honest.result(busy, inference_result(honest.open(busy), VALUES)))["status"]
        == "accepted"
    )
    retry = honest.recv()
    assert (retry["type"], retry["task_id"]) == ("dispatch", refused["task_id"])
    assert (
        honest.call(honest.result(retry, inference_result(honest.open(retry), VALUES)))["status"]
        == "accepted"
    )
    assert running.wait_job(second["job_id"], "succeeded")["status"] == "succeeded"
    assert running.wait_job(first["job_id"], "succeeded")["status"] == "succeeded"


def test_unstaking_node_gets_no_new_work(coordinator: Running, rsa_keys) -> None:
    """2.3.8 UNSTAKING: no new dispatches, even to the node the region rule prefers; the
    node learns its cooldown end from heartbeat_ack."""
    preferred = make_node(rsa_keys, 0, region="eu-west")
    other = make_node(rsa_keys, 1, region="us-east")
    for node in (preferred, other):
        coordinator.register(node)
        coordinator.link(node)
    msg = {"node_id": preferred.node_id, "requested_at": int(START)}
    sig = eip712.sign_typed(preferred.node_key, "Unstake", msg, chain_id=CHAIN)
    coordinator.client.unstake(preferred.node_id, msg, sig)
    ack = preferred.call(preferred.heartbeat())
    assert ack["unstaking_until"] == int(START) + UNSTAKE_COOLDOWN_S
    job = coordinator.client.submit_job("ai.inference", inference_payload(VALUES), region="eu-west")
    assert other.recv()["type"] == "dispatch"
    assert coordinator.client.job(job["job_id"])["tasks"][0]["node_id"] == other.node_id


def test_region_preference(coordinator: Running, rsa_keys) -> None:
    """With equal nodes, the one in the job's region gets the task."""
    far = make_node(rsa_keys, 0, region="us-east")
    near = make_node(rsa_keys, 1, region="ap-south")
    for node in (far, near):
        coordinator.register(node)
        coordinator.link(node)
    job = coordinator.client.submit_job(
        "ai.inference", inference_payload(VALUES), region="ap-south"
    )
    assert near.recv()["type"] == "dispatch"
    assert coordinator.client.job(job["job_id"])["tasks"][0]["node_id"] == near.node_id


def test_min_tier_excludes_weaker_nodes(coordinator: Running, rsa_keys) -> None:
    """A job above every linked node's tier stays queued, while a job the node may take,
    submitted after it, is dispatched to it (so a scheduling round has seen both)."""
    node = make_node(rsa_keys, 0)
    coordinator.register(node)
    coordinator.link(node)
    job = coordinator.client.submit_job("ai.inference", inference_payload(VALUES), min_tier=1)
    plain = coordinator.client.submit_job("ai.inference", inference_payload(VALUES))
    dispatch = node.recv()
    assert (dispatch["type"], dispatch["job_id"]) == ("dispatch", plain["job_id"])
    assert coordinator.client.job(job["job_id"])["tasks"][0]["status"] == "queued"


def _attempt_outcomes(running: Running) -> list[tuple[str, str | None]]:
    """(node_id, outcome) of every lease, in the order they were made."""
    return running.coord.db.run_sync(
        lambda s: [
            (a.node_id, a.outcome) for a in s.query(m.TaskAttempt).order_by(m.TaskAttempt.attempt)
        ]
    )


@dataclass
class _LostLease:
    """A task leased to *first*, which went offline (three heartbeats missed), then to
    *second*; *first* is linked again, holding *dispatch*, its lost lease's."""

    first: SimNode
    second: SimNode
    payload: bytes
    job: dict[str, Any]
    dispatch: dict[str, Any]  # first's, of the lease it lost
    held: dict[str, Any]  # second's, of the lease it holds


def _lost_lease(coordinator: Running, rsa_keys: Any) -> _LostLease:
    first, second = make_node(rsa_keys, 0), make_node(rsa_keys, 1)
    coordinator.register(first)
    coordinator.register(second)
    coordinator.link(first)
    payload = inference_payload(VALUES)
    job = coordinator.client.submit_job("ai.inference", payload)
    dispatch = first.recv()
    coordinator.clock.advance(91)  # three heartbeats missed: offline, the task re-queued
    assert first.ws is not None
    closed_code(first.ws)
    coordinator.link(second)
    held = second.recv()
    coordinator.link(first)
    return _LostLease(first, second, payload, job, dispatch, held)


def test_late_result_from_earlier_lease_wins(coordinator: Running, rsa_keys) -> None:
    """A valid result from a node whose lease was lost is still accepted (it was leased to
    it); the current holder is cancelled, and its result is then refused."""
    lost = _lost_lease(coordinator, rsa_keys)
    first, second, dispatch, second_dispatch = lost.first, lost.second, lost.dispatch, lost.held
    job, result = lost.job, inference_result(lost.payload, VALUES)
    assert first.call(first.result(dispatch, result))["status"] == "accepted"
    assert second.recv()["type"] == "cancel"
    late = second.call(second.result(second_dispatch, result))
    assert late["status"] == "rejected"
    assert "completed by" in late["reason"]
    done = coordinator.wait_job(job["job_id"], "succeeded")
    assert done["tasks"][0]["node_id"] == first.node_id
    # The first node delivered: its lease, closed as "offline" when it went silent, is
    # a success now (a failure counts against a node: 3 shut it out of a render job).
    outcomes = _attempt_outcomes(coordinator)
    assert outcomes == [(first.node_id, "succeeded"), (second.node_id, "superseded")]


def test_a_result_after_its_node_rejected_the_task_is_refused(
    coordinator: Running, rsa_keys
) -> None:
    """A node that signed a Reject answered its lease: a result it sends afterwards (a
    second, contradicting answer) is refused, naming why, and the task's current holder
    keeps it; its failed attempt stays a failure (the retry rules count it)."""
    first, second = make_node(rsa_keys, 0), make_node(rsa_keys, 1)
    coordinator.register(first)
    coordinator.register(second)
    coordinator.link(first)
    payload = inference_payload(VALUES)
    job = coordinator.client.submit_job("ai.inference", payload)
    dispatch = first.recv()
    coordinator.link(second)  # where the task goes once the first node rejects it
    assert first.call(first.reject(dispatch["task_id"], "out of memory"))["status"] == "accepted"
    second_dispatch = second.recv()
    assert second_dispatch["task_id"] == dispatch["task_id"]
    result = inference_result(payload, VALUES)
    late = first.call(first.result(dispatch, result))
    assert late["status"] == "rejected"
    assert "this node's lease of it ended rejected" in late["reason"]
    assert second.call(second.result(second_dispatch, result))["status"] == "accepted"
    done = coordinator.wait_job(job["job_id"], "succeeded")
    assert done["tasks"][0]["node_id"] == second.node_id
    outcomes = _attempt_outcomes(coordinator)
    assert outcomes == [(first.node_id, "rejected"), (second.node_id, "succeeded")]


def test_a_result_of_an_expired_lease_is_refused_once_a_later_lease_was_rejected(
    start_coordinator, rsa_keys
) -> None:
    """A node's lease ran out (its result would still be taken, late), the task came back
    to it, and it rejected that lease: its latest answer stands, and a result for the
    task from it is refused, whatever an earlier lease of it allowed."""
    running = start_coordinator(max_attempts=5, heartbeat_interval=1000.0)
    node, other = make_node(rsa_keys, 0), make_node(rsa_keys, 1)
    running.register(node)
    running.register(other)
    running.link(node)
    payload = inference_payload(VALUES)
    running.client.submit_job("ai.inference", payload)
    first = node.recv()
    running.clock.advance(301)  # the first lease runs out
    assert node.recv()["type"] == "cancel"
    second = node.recv()  # the only node linked: leased to it again
    assert (second["type"], second["task_id"]) == ("dispatch", first["task_id"])
    running.link(other)  # where the task goes once this node rejects it
    assert node.call(node.reject(first["task_id"], "out of memory"))["status"] == "accepted"
    assert other.recv()["task_id"] == first["task_id"]
    late = node.call(node.result(first, inference_result(payload, VALUES)))
    assert late["status"] == "rejected"
    assert "this node's lease of it ended rejected" in late["reason"]


def _answers(running: Running) -> list[tuple[str, str | None, str | None]]:
    """(node_id, outcome, answer_type) of every lease, in the order they were made."""
    return running.coord.db.run_sync(
        lambda s: [
            (a.node_id, a.outcome, a.answer_type)
            for a in s.query(m.TaskAttempt).order_by(m.TaskAttempt.attempt)
        ]
    )


def _signer_of_answer(running: Running, node_id: str) -> str:
    """Who signed the answer kept on *node_id*'s latest lease, as eth-account recovers it
    from the stored message and signature alone."""
    row = running.coord.db.run_sync(
        lambda s: (
            s.query(m.TaskAttempt)
            .filter(m.TaskAttempt.node_id == node_id)
            .order_by(m.TaskAttempt.attempt.desc())
            .first()
        )
    )
    assert row is not None and row.answer_message is not None
    kind = str(row.answer_type)
    message = eip712.message_from_json(kind, json.loads(row.answer_message))
    typed = eip712.typed_data_json(kind, message, chain_id=CHAIN)
    signable = encode_typed_data(full_message=typed)
    return str(Account.recover_message(signable, signature=row.answer_signature))


def test_a_late_result_its_class_refuses_is_the_nodes_answer(
    coordinator: Running, rsa_keys
) -> None:
    """A node whose lease ended (it went offline) sends a result the class's checks
    refuse: that answers its lease, as a signed reject does. A second, different result
    from it is refused, and the task's current holder keeps it (it was cancelled, its
    work lost, when a late node could probe the checks and then answer again); what the
    node signed is kept on its lease, checkable with eth-account."""
    lost = _lost_lease(coordinator, rsa_keys)
    first, second, dispatch, held, job = lost.first, lost.second, lost.dispatch, lost.held, lost.job
    refused = first.call(first.result(dispatch, b"not a tensor container"))
    assert refused["status"] == "rejected"
    good = inference_result(lost.payload, VALUES)
    again = first.call(first.result(dispatch, good))
    assert again["status"] == "rejected"
    assert "this node's lease of it ended rejected" in again["reason"]
    assert _answers(coordinator) == [
        (first.node_id, "rejected", "Result"),
        (second.node_id, None, None),
    ]
    assert _signer_of_answer(coordinator, first.node_id) == first.node_id
    assert second.call(second.result(held, good))["status"] == "accepted"
    assert coordinator.wait_job(job["job_id"], "succeeded")["tasks"][0]["node_id"] == (
        second.node_id
    )


def test_a_reject_of_a_lease_that_ended_answers_it(coordinator: Running, rsa_keys) -> None:
    """A node's lease ended otherwise (it went offline) and the task went to another: its
    signed reject of that lease, sent once it is back, is "not leased to this node", but
    answers the lease: kept on it, and a later result of it is refused rather than taken
    over the current holder's."""
    lost = _lost_lease(coordinator, rsa_keys)
    first, dispatch = lost.first, lost.dispatch
    refused = first.call(first.reject(dispatch["task_id"], "out of memory"))
    assert refused["status"] == "rejected" and "not leased to this node" in refused["reason"]
    assert _answers(coordinator)[0] == (first.node_id, "rejected", "Reject")
    late = first.call(first.result(dispatch, inference_result(lost.payload, VALUES)))
    assert late["status"] == "rejected"
    assert "this node's lease of it ended rejected" in late["reason"]


def test_a_signed_reject_is_kept_on_the_lease_it_ends(coordinator: Running, rsa_keys) -> None:
    """The Reject a node signed is kept, message and signature, on the lease it ended:
    evidence of what the node said, recoverable to it with eth-account."""
    node, other = make_node(rsa_keys, 0), make_node(rsa_keys, 1)
    coordinator.register(node)
    coordinator.register(other)
    coordinator.link(node)
    coordinator.client.submit_job("ai.inference", inference_payload(VALUES))
    dispatch = node.recv()
    coordinator.link(other)
    assert node.call(node.reject(dispatch["task_id"], "out of memory"))["status"] == "accepted"
    assert other.recv()["task_id"] == dispatch["task_id"]
    assert _answers(coordinator)[0] == (node.node_id, "rejected", "Reject")
    assert _signer_of_answer(coordinator, node.node_id) == node.node_id


def _ack_and_dispatch(node: SimNode) -> tuple[dict[str, Any], dict[str, Any]]:
    """The result_ack of a reject that re-queued the task, and the task's next dispatch
    (the scheduler may send it before the ack)."""
    frames = {f["type"]: f for f in (node.recv(), node.recv())}
    return frames["result_ack"], frames["dispatch"]


def test_a_late_reject_of_an_earlier_lease_leaves_the_current_one(
    start_coordinator, rsa_keys
) -> None:
    """A task leased to the same node again after its lease ended: a reject echoing the
    earlier lease's lease_expires_at (sent late, or again) changes nothing, and the result
    of the current lease is accepted; one echoing the current lease, or none (an older
    node), ends the lease as before."""
    running = start_coordinator(max_attempts=5, heartbeat_interval=1000.0)
    node = make_node(rsa_keys, 0)
    running.register(node)
    running.link(node)
    payload = inference_payload(VALUES)
    job = running.client.submit_job("ai.inference", payload)
    first = node.recv()
    running.clock.advance(301)  # the lease ends as the node gives up on it
    assert node.recv()["type"] == "cancel"
    second = node.recv()  # the only node: leased to it again
    task_id = first["task_id"]
    lease1, lease2 = first["lease_expires_at"], second["lease_expires_at"]
    assert (second["type"], second["task_id"]) == ("dispatch", task_id) and lease2 > lease1

    def task() -> dict[str, Any]:
        return running.client.job(job["job_id"])["tasks"][0]

    stale = node.call(node.reject(task_id, "deadline exceeded", lease_expires_at=lease1))
    assert (stale["type"], stale["status"], stale["of"]) == ("result_ack", "rejected", "reject")
    assert stale["reason"] == (
        f"reject for an earlier lease of task {task_id} (lease_expires_at {lease1}, "
        f"current {lease2}): ignored"
    )
    now = task()
    assert (now["status"], now["node_id"], now["attempts"]) == ("leased", node.node_id, 2)
    assert now["reason"].startswith("lease expired")  # nothing recorded against it

    running.clock.advance(5)  # the next lease ends at another second
    node.send(node.reject(task_id, "out of memory", lease_expires_at=lease2))
    ack, third = _ack_and_dispatch(node)
    assert ack["status"] == "accepted" and third["lease_expires_at"] == lease2 + 5
    now = task()
    assert (now["status"], now["attempts"]) == ("leased", 3)
    assert now["reason"] == f"node {node.node_id} rejected it: out of memory"

    running.clock.advance(5)
    node.send(node.reject(task_id, "out of memory"))  # no echo: ends the current lease
    ack, fourth = _ack_and_dispatch(node)
    assert ack["status"] == "accepted" and task()["attempts"] == 4

    # The earlier reject again (resent after a reconnect, say): still only the old lease's.
    replayed = node.call(node.reject(task_id, "out of memory", lease_expires_at=lease2))
    assert replayed["status"] == "rejected" and replayed["reason"].endswith(": ignored")
    assert (task()["status"], task()["attempts"]) == ("leased", 4)
    result = node.call(node.result(fourth, inference_result(payload, VALUES)))
    assert result == {
        "type": "result_ack", "task_id": task_id, "status": "accepted", "reason": "", "of": "result"
    }  # fmt: skip
    assert running.wait_job(job["job_id"], "succeeded")["status"] == "succeeded"


def test_a_task_handed_back_by_a_stopping_node_spends_no_attempt(
    start_coordinator, rsa_keys
) -> None:
    """A node that is stopping (SIGTERM) refuses its dispatches, or hands back a task it
    cannot finish, with a reject whose reason starts "draining: ". That is no failure: the
    task is queued again without spending an attempt (one allowed here: a plain reject
    would fail the job), and the link gets no more work. Another node takes it."""
    from nodeclient.protocol.messages import DRAINING_PREFIX

    running = start_coordinator(max_attempts=1, heartbeat_interval=1000.0)
    stopping, other = make_node(rsa_keys, 0), make_node(rsa_keys, 1)
    running.register(stopping)
    running.link(stopping)
    job = running.client.submit_job("ai.inference", inference_payload(VALUES))
    dispatch = stopping.recv()
    reason = DRAINING_PREFIX + "node is shutting down"
    ack = stopping.call(
        stopping.reject(dispatch["task_id"], reason, lease_expires_at=dispatch["lease_expires_at"])
    )
    assert ack["status"] == "accepted", ack
    task = running.client.job(job["job_id"])["tasks"][0]
    assert (task["status"], task["attempts"]) == ("queued", 0), task
    second = running.client.submit_job("ai.inference", inference_payload(VALUES))
    time.sleep(0.3)  # scheduling rounds run: nothing goes to the stopping node
    assert running.client.job(second["job_id"])["status"] == "queued"
    running.register(other)
    running.link(other)
    for _ in range(2):
        d = other.recv()
        assert (
            other.call(other.result(d, inference_result(other.open(d), VALUES)))["status"]
            == "accepted"
        )
    done = running.wait_job(job["job_id"], "succeeded")
    assert done["status"] == "succeeded" and done["tasks"][0]["attempts"] == 1
    assert running.wait_job(second["job_id"], "succeeded")["status"] == "succeeded"


def test_a_node_that_links_again_without_its_task_gets_it_back_at_once(
    start_coordinator, rsa_keys
) -> None:
    """A node restarts (kill -9) and links again: the task it was running is gone with
    it. At the new link's second heartbeat, a lease whose dispatch went out on an older
    link, and that the node does not list as running, is queued again at once (the
    attempt spent, as for an expired lease) rather than after its lease. A task it still
    runs, and one dispatched on the new link, stay leased."""
    running = start_coordinator(max_attempts=3, heartbeat_interval=1000.0)
    node = make_node(rsa_keys, 0)
    running.register(node, max_parallel_subtasks=3)
    running.link(node)
    jobs = [running.client.submit_job("ai.inference", inference_payload(VALUES)) for _ in range(2)]
    kept, lost = node.recv(), node.recv()
    assert {kept["job_id"], lost["job_id"]} == {j["job_id"] for j in jobs}
    running.clock.advance(5)  # the node restarts
    running.link(node)  # the restarted node's link replaces the old one
    third = running.client.submit_job("ai.inference", inference_payload(VALUES))
    fresh = node.recv(skip=("heartbeat_ack",))
    assert fresh["job_id"] == third["job_id"]  # sent on the new link
    for _ in range(2):  # the second heartbeat reconciles
        ack = node.call(node.heartbeat(running=(kept["task_id"],)))
        assert ack["type"] == "heartbeat_ack", ack
    again = node.recv(skip=("heartbeat_ack",))  # the lost task, dispatched again
    assert (again["type"], again["task_id"]) == ("dispatch", lost["task_id"])
    tasks = {
        t["task_id"]: t for j in (*jobs, third) for t in running.client.job(j["job_id"])["tasks"]
    }
    assert tasks[lost["task_id"]]["attempts"] == 2
    assert "linked again without it" in tasks[lost["task_id"]]["reason"]
    assert tasks[kept["task_id"]]["attempts"] == 1 and tasks[kept["task_id"]]["status"] == "leased"
    assert tasks[fresh["task_id"]]["attempts"] == 1


def test_a_lease_made_for_the_new_link_is_not_reconciled_away(
    start_coordinator, rsa_keys, monkeypatch
) -> None:
    """A lease granted after the link was attached is this link's to send, however long
    its sealing takes: the second heartbeat, arriving before the dispatch does, must not
    re-queue it as lost (its dispatch would then be dropped, or the task run twice)."""
    from nodeclient.coordinator import scheduler as sch

    real = sch._seal_all
    sealed = threading.Event()  # set once the heartbeats are answered: no sleep to outrun

    def slow(jobs):  # a large payload is still being sealed when the heartbeats come
        sealed.wait(10)
        return real(jobs)

    monkeypatch.setattr(sch, "_seal_all", slow)
    running = start_coordinator(heartbeat_interval=1000.0)
    node = make_node(rsa_keys, 0)
    running.register(node)
    running.link(node)
    running.clock.advance(1)
    job = running.client.submit_job("ai.inference", inference_payload(VALUES))
    end = time.monotonic() + 10
    while running.client.job(job["job_id"])["tasks"][0]["status"] != "leased":
        assert time.monotonic() < end
        time.sleep(0.02)
    for _ in range(2):
        assert node.call(node.heartbeat())["type"] == "heartbeat_ack"
    sealed.set()
    dispatch = node.recv(skip=("heartbeat_ack",))
    assert dispatch["type"] == "dispatch"
    task = running.client.job(job["job_id"])["tasks"][0]
    assert (task["status"], task["attempts"]) == ("leased", 1), task


def test_a_node_that_handed_a_task_back_may_take_it_again(start_coordinator, rsa_keys) -> None:
    """A task handed back by a stopping node ('draining: ') is no failure of that node:
    once it links again it may take the task, even while another node that serves the
    class (busy now) has not tried it."""
    from nodeclient.protocol.messages import DRAINING_PREFIX

    running = start_coordinator(heartbeat_interval=1000.0)
    restarting, busy = make_node(rsa_keys, 0), make_node(rsa_keys, 1)
    running.register(busy)
    running.link(busy)
    first = running.client.submit_job("ai.inference", inference_payload(VALUES))
    assert busy.recv()["job_id"] == first["job_id"]  # its only slot taken
    running.register(restarting)
    running.link(restarting)
    job = running.client.submit_job("ai.inference", inference_payload(VALUES))
    handed = restarting.recv()
    reason = DRAINING_PREFIX + "node is shutting down"
    assert (
        restarting.call(
            restarting.reject(
                handed["task_id"], reason, lease_expires_at=handed["lease_expires_at"]
            )
        )["status"]
        == "accepted"
    )
    running.clock.advance(5)
    # Linked again without registering (a stopping daemon delivering its results): still
    # draining, so no work; the queued task is not offered to it.
    running.link(restarting)
    assert restarting.call(restarting.heartbeat())["type"] == "heartbeat_ack"
    assert restarting.ws is not None
    with pytest.raises(TimeoutError):  # no dispatch comes
        restarting.ws.recv(timeout=0.5)
    assert running.client.job(job["job_id"])["tasks"][0]["status"] == "queued"
    running.register(restarting)  # back after its restart: a daemon registers first
    running.link(restarting)
    again = restarting.recv(skip=("heartbeat_ack",))
    assert (again["type"], again["task_id"]) == ("dispatch", handed["task_id"])
    assert running.client.job(job["job_id"])["tasks"][0]["attempts"] == 1


def test_a_second_hand_back_of_one_task_spends_an_attempt(start_coordinator, rsa_keys) -> None:
    """A hand-back ('draining: ') is free once per task and node: a node that stops again
    and again while it holds the task (or only says so) cannot keep it for ever without
    spending an attempt. Its second hand-back is a plain reject; with one attempt allowed,
    the job then fails with the node's reason."""
    from nodeclient.protocol.messages import DRAINING_PREFIX

    running = start_coordinator(heartbeat_interval=1000.0, max_attempts=1)
    node = make_node(rsa_keys, 0)
    running.register(node)
    running.link(node)
    job = running.client.submit_job("ai.inference", inference_payload(VALUES))
    reason = DRAINING_PREFIX + "node is shutting down"
    for _ in range(2):
        dispatch = node.recv(skip=("heartbeat_ack", "cancel"))
        assert dispatch["type"] == "dispatch"
        frame = node.reject(
            dispatch["task_id"], reason, lease_expires_at=dispatch["lease_expires_at"]
        )
        assert node.call(frame)["status"] == "accepted"
        running.clock.advance(5)
        running.register(node)  # a restart
        running.link(node)
    done = running.wait_job(job["job_id"], "failed")
    assert done["status"] == "failed", done
    assert f"node {node.node_id} rejected it: {reason}" in done["reason"]
