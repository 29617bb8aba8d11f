"""Every reject the daemon sends names the lease it refuses: the dispatch's
``lease_expires_at``, beside the signed Reject, so that the coordinator can tell a late
reject of an earlier lease from one of the task's current lease (docs/protocol.md,
Rejects). Refused at once, refused from the outbox's record, or failed while running."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from nodeclient.errors import RemoteProtocolError
from nodeclient.node import sandbox
from nodeclient.node.daemon import NodeDaemon
from nodeclient.node.dispatch import RunningTask
from nodeclient.node.executor import Executor, TaskFailed
from nodeclient.node.outbox import INLINE_MAX, CommitUncertain
from nodeclient.protocol import envelope, messages
from nodeclient.protocol.states import NodeState
from nodeclient.workloads.inference import make_request
from tests.models import identity_model
from tests.node.test_daemon_outbox import Answers, make_daemon, recover


def dispatch(
    daemon: NodeDaemon,
    task_id: uuid.UUID,
    lease_expires_at: int,
    *,
    workload_class: str = "ai.inference",
    sealed_for: uuid.UUID | None = None,
    payload: bytes = b"payload",
) -> str:
    """A dispatch frame of *task_id*, its envelope sealed to the daemon (for the task
    *sealed_for*, when given: one the daemon cannot open as this task's)."""
    env = envelope.seal(
        payload,
        public_key=daemon._payload_key.public_key(),
        task_id=sealed_for or task_id,
        node_id=daemon.node_id,
        expires_at=max(lease_expires_at, int(time.time()) + 60),
    )
    d = messages.Dispatch(task_id, uuid.uuid4(), workload_class, lease_expires_at, env)
    return json.dumps(d.to_wire())


def assert_refuses(frame: dict[str, Any], daemon: NodeDaemon, task_id: uuid.UUID,
                   lease: int, reason: str) -> None:  # fmt: skip
    """*frame* is the daemon's signed reject of *task_id* for the lease *lease*, and the
    coordinator's parser reads that lease from it."""
    assert frame["type"] == "reject" and frame["message"]["task_id"] == "0x" + task_id.hex
    assert reason in frame["message"]["reason"]
    assert frame["lease_expires_at"] == lease
    assert recover(frame) == daemon.node_id  # the signed part is the Reject, unchanged
    parsed = messages.parse_from_node(json.dumps(frame))
    assert isinstance(parsed, messages.SignedFrame)
    assert parsed.extra == {"lease_expires_at": lease}


def later() -> int:
    return int(time.time()) + 600


@pytest.mark.parametrize(
    "case", ["expired lease", "over capacity", "unstaking", "class not served"]
)
def test_a_dispatch_refused_at_once_is_rejected_with_its_lease(tmp_path: Path, case: str) -> None:
    """A dispatch the node will not run (its lease already over, no free slot, UNSTAKING,
    a class it does not serve) is refused, never run, naming that dispatch's lease."""
    daemon, _, link = make_daemon(tmp_path)  # NeverRun: running it fails the test
    task_id, lease, wclass = uuid.uuid4(), later(), "ai.inference"
    reason = {
        "expired lease": "lease already expired",
        "over capacity": "over capacity",
        "unstaking": "UNSTAKING",
        "class not served": "is not served by this node",
    }[case]
    if case == "expired lease":
        lease = int(time.time()) - 5
    elif case == "over capacity":
        busy = RunningTask(uuid.uuid4(), uuid.uuid4(), "ai.inference", None, time.time())
        daemon.running[busy.task_id] = busy
    elif case == "unstaking":
        daemon.state.transition(NodeState.UNSTAKING, reason="unstake accepted by the coordinator")
    else:
        wclass = "render.blender"
    asyncio.run(daemon._on_frame(dispatch(daemon, task_id, lease, workload_class=wclass)))
    (refused,) = link.frames
    assert_refuses(refused, daemon, task_id, lease, reason)
    # Counted under its class when served, else "other": the class is the coordinator's word.
    label = "other" if case == "class not served" else wclass
    counted = daemon.metrics.tasks.labels(workload_class=label, outcome="rejected")
    assert counted._value.get() == 1
    if case == "class not served":
        assert f'workload_class="{wclass}"' not in daemon.metrics.exposition().decode()


@pytest.mark.parametrize("case", ["pruned", "damaged"])
def test_a_dispatch_of_a_task_done_before_is_rejected_with_its_lease(
    tmp_path: Path, case: str
) -> None:
    """A dispatch of a task whose result this node no longer holds, or holds damaged, is
    refused, never run: the reject names the lease of that dispatch."""
    daemon, _, link = make_daemon(tmp_path)
    task_id = uuid.uuid4()
    size = 16 if case == "pruned" else INLINE_MAX + 1  # damaged: a result file, then gone
    daemon._commit(
        RunningTask(task_id, uuid.uuid4(), "ai.inference", None, time.time()), b"r" * size
    )
    daemon.outbox.mark_acked(task_id, status="accepted", reason="", at=time.time() - 3600)
    if case == "pruned":
        cutoff = time.time() - daemon.retention.seconds
        assert daemon.outbox.prune(acked_before=cutoff, keep_bytes=daemon.retention.bytes) == 1
    else:
        (daemon.outbox.files / f"{task_id}.result").unlink()
    lease = later()
    asyncio.run(daemon._on_frame(dispatch(daemon, task_id, lease)))
    (refused,) = link.frames
    why = "no longer held" if case == "pruned" else "stored result for the task is damaged"
    assert_refuses(refused, daemon, task_id, lease, why)


class DeadlineExceeded(Executor):
    """Every task runs past its lease, as the executor reports it."""

    async def run(self, *args: object, **kwargs: object) -> bytes:
        raise TaskFailed("deadline exceeded: killed at the lease's end", requester_fault=False)


@pytest.mark.parametrize("case", ["deadline exceeded", "undecryptable", "commit failed"])
def test_a_task_that_fails_is_rejected_with_its_lease(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """A task that ends without a result (past its lease, a payload it cannot open, a
    result it cannot store) is refused naming the lease it ran under: a reject that
    arrives after the task was leased to this node again cannot end the new lease."""
    executor = DeadlineExceeded if case == "deadline exceeded" else Answers
    daemon, _, link = make_daemon(tmp_path, executor)
    if case == "commit failed":

        def full(**kwargs: object) -> object:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(daemon.outbox, "commit_result", full)
    task_id, lease = uuid.uuid4(), later()
    sealed_for = uuid.uuid4() if case == "undecryptable" else None

    async def run() -> None:
        await daemon._on_frame(dispatch(daemon, task_id, lease, sealed_for=sealed_for))
        while daemon.running:
            await asyncio.sleep(0.01)

    asyncio.run(asyncio.wait_for(run(), 10))
    (refused,) = link.frames
    reason = {
        "deadline exceeded": "deadline exceeded",
        "undecryptable": "payload decryption failed",
        "commit failed": "No space left on device",
    }[case]
    assert_refuses(refused, daemon, task_id, lease, reason)


def test_a_commit_that_may_have_reached_the_disk_sends_no_reject(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An I/O error at the result's COMMIT (a failed fsync): the signed result may be on
    disk, and a restart would send it. So no Reject goes out (it could contradict that
    result); the failure is logged, and the lease runs out if nothing comes."""
    daemon, _, link = make_daemon(tmp_path, Answers)

    def failing_fsync(**kwargs: object) -> object:
        raise CommitUncertain(5, "the result's commit may or may not be on disk: disk I/O error")

    monkeypatch.setattr(daemon.outbox, "commit_result", failing_fsync)
    task_id = uuid.uuid4()

    async def run() -> None:
        await daemon._on_frame(dispatch(daemon, task_id, later()))
        while daemon.running:
            await asyncio.sleep(0.01)

    with caplog.at_level(logging.ERROR, logger="nodeclient.node"):
        asyncio.run(asyncio.wait_for(run(), 10))
    assert link.frames == []
    (record,) = [r for r in caplog.records if r.getMessage() == "outbox.commit_uncertain"]
    assert "disk I/O error" in record.__dict__["error"]
    failed = daemon.metrics.tasks.labels(workload_class="ai.inference", outcome="failed")
    assert failed._value.get() == 1


@pytest.mark.parametrize("fails", ["signing", "after the commit"])
def test_an_unexpected_error_in_the_commit_is_refused_or_sent_as_the_outbox_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fails: str
) -> None:
    """The result's commit raises what no branch expects (a bug in signing, a MemoryError
    once the row is stored). Nothing stored: a signed reject naming the error's type goes
    out at once; stored and signed: that result is sent. Either way the task is counted.
    (Before, the task ended as ``task.crashed``: no frame, no count, and the coordinator
    waited for the lease's end.)"""
    daemon, _, link = make_daemon(tmp_path, Answers)
    if fails == "signing":

        def broken(message_json: dict[str, Any]) -> bytes:
            raise TypeError("a bug in signing")

        monkeypatch.setattr(daemon, "_sign_result", broken)
    else:
        real = daemon.outbox.commit_result

        def stored_then_fails(**kwargs: Any) -> object:
            real(**kwargs)
            raise MemoryError

        monkeypatch.setattr(daemon.outbox, "commit_result", stored_then_fails)
    task_id, lease = uuid.uuid4(), later()

    async def run() -> None:
        await daemon._on_frame(dispatch(daemon, task_id, lease))
        while daemon.running:
            await asyncio.sleep(0.01)

    asyncio.run(asyncio.wait_for(run(), 10))
    (frame,) = link.frames
    counted = daemon.metrics.tasks.labels
    if fails == "signing":
        assert_refuses(frame, daemon, task_id, lease, "internal error: TypeError")
        assert daemon.outbox.get(task_id) is None
        assert counted(workload_class="ai.inference", outcome="failed")._value.get() == 1
    else:
        assert frame["type"] == "result" and frame["message"]["task_id"] == "0x" + task_id.hex
        stored = daemon.outbox.get(task_id)
        assert stored is not None and stored.signature is not None
        assert frame["signature"] == "0x" + stored.signature.hex()  # the stored, signed one
        assert counted(workload_class="ai.inference", outcome="completed")._value.get() == 1


class Held(Executor):
    """Runs a task until ``go`` is set; then its result is the same bytes as Answers'."""

    go: ClassVar[threading.Event] = threading.Event()

    async def run(self, *args: object, **kwargs: object) -> bytes:
        await asyncio.to_thread(self.go.wait, 10)
        return b"a result"


def test_a_dispatch_reserves_the_ram_it_declared_until_it_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The RAM a dispatch declares is promised to it from its admission (before its
    payload is even decrypted) to its end: a task admitted meanwhile is judged against
    what is left. Ended, the promise goes."""
    monkeypatch.setattr(sandbox, "available_memory_bytes", lambda: 3000 << 20)
    Held.go.clear()
    daemon, _, link = make_daemon(tmp_path, Held)
    task_id, lease = uuid.uuid4(), later()
    d = messages.Dispatch(
        task_id, uuid.uuid4(), "ai.inference", lease,
        messages.Dispatch.from_wire(json.loads(dispatch(daemon, task_id, lease))).envelope,
        resources={"ram_mb": 2000},
    )  # fmt: skip

    async def run() -> tuple[str, str]:
        await daemon._on_frame(json.dumps(d.to_wire()))
        while_running = daemon.executor.admission({"ram_mb": 1500})
        Held.go.set()
        while daemon.running:
            await asyncio.sleep(0.01)
        return while_running, daemon.executor.admission({"ram_mb": 1500})

    while_running, after = asyncio.run(asyncio.wait_for(run(), 10))
    assert while_running.endswith(
        "only 1000 MB is free (2000 MB more is promised to running tasks)"
    )
    assert after == ""
    (frame,) = link.frames
    assert frame["type"] == "result"


def test_the_answer_to_a_reject_never_settles_a_result_of_the_same_task(tmp_path: Path) -> None:
    """The node rejected an earlier lease of a task, then ran a newer lease and committed
    its result. The coordinator's answer to that reject ("ignored: an earlier lease") must
    leave the result unacknowledged (it is resent after a reconnect); the result's own
    answer settles it."""
    daemon, _, _ = make_daemon(tmp_path)
    task_id = uuid.uuid4()
    daemon._commit(RunningTask(task_id, uuid.uuid4(), "ai.inference", None, time.time()), b"r")
    stale = messages.ResultAck(task_id, "rejected", "reject for an earlier lease: ignored",
                               of="reject")  # fmt: skip
    asyncio.run(daemon._on_frame(json.dumps(stale.to_wire())))
    entry = daemon.outbox.get(task_id)
    assert entry is not None and entry.acked_at is None
    own = messages.ResultAck(task_id, "accepted")
    asyncio.run(daemon._on_frame(json.dumps(own.to_wire())))
    entry = daemon.outbox.get(task_id)
    assert entry is not None and (entry.acked_at is not None, entry.ack_status) == (
        True,
        "accepted",
    )
    old_coordinator = {k: v for k, v in own.to_wire().items() if k != "of"}
    assert messages.ResultAck.from_wire(old_coordinator).of == "result"
    with pytest.raises(RemoteProtocolError, match="'of'"):
        messages.ResultAck.from_wire({**own.to_wire(), "of": "other"})


class FailsWhenTold(Executor):
    """Runs until told, then fails as a task killed at its lease's end."""

    go: asyncio.Event

    async def run(self, *args: object, **kwargs: object) -> bytes:
        FailsWhenTold.go = asyncio.Event()
        await FailsWhenTold.go.wait()
        raise TaskFailed("deadline exceeded: killed at the lease's end", requester_fault=False)


def test_a_task_leased_again_while_it_runs_is_refused_under_the_new_lease(
    tmp_path: Path,
) -> None:
    """The coordinator leased the task again to this node while it still ran here (the
    first lease ended, no other node could take it): the second dispatch is not run twice,
    and a reject of the task names the new lease, which the coordinator holds now."""
    daemon, _, link = make_daemon(tmp_path, FailsWhenTold)
    task_id, first, second = uuid.uuid4(), later(), later() + 300

    async def run() -> None:
        await daemon._on_frame(dispatch(daemon, task_id, first))
        while not hasattr(FailsWhenTold, "go"):
            await asyncio.sleep(0.01)
        await daemon._on_frame(dispatch(daemon, task_id, second))
        assert list(daemon.running) == [task_id] and link.frames == []
        FailsWhenTold.go.set()
        while daemon.running:
            await asyncio.sleep(0.01)

    asyncio.run(asyncio.wait_for(run(), 10))
    (refused,) = link.frames
    assert_refuses(refused, daemon, task_id, second, "deadline exceeded")


class RecordsDeadline(Executor):
    """Answers every task, recording the time it was given (its deadline, from now)."""

    given: ClassVar[list[float]] = []

    async def run(self, *args: object, **kwargs: object) -> bytes:
        RecordsDeadline.given.append(kwargs["deadline"] - time.monotonic())  # type: ignore[operator]
        return b"a result"


def test_a_stale_dispatch_of_a_running_task_keeps_its_lease(tmp_path: Path) -> None:
    """A dispatch of a running task naming an earlier lease than the one it holds (a
    duplicate delivered late, a stale one) changes nothing. Before, it replaced the lease,
    and the task's deadline, read from its lease once its inputs are in, was cut short."""
    daemon, _, _ = make_daemon(tmp_path, RecordsDeadline)
    RecordsDeadline.given = []
    model = identity_model()
    downloading, downloaded = threading.Event(), threading.Event()

    def fetch(url: str) -> bytes:  # the task's model, downloading until told
        downloading.set()
        downloaded.wait(10)
        return model

    daemon._fetch = fetch
    payload = make_request(model, {"x": np.ones(3, np.float32)}, inline=False,
                           model_url="https://models.example/m").encode()  # fmt: skip
    task_id, lease, stale = uuid.uuid4(), later(), int(time.time()) + 5

    async def run() -> None:
        await daemon._on_frame(dispatch(daemon, task_id, lease, payload=payload))
        await asyncio.to_thread(downloading.wait, 10)
        await daemon._on_frame(dispatch(daemon, task_id, stale, payload=payload))
        downloaded.set()
        while daemon.running:
            await asyncio.sleep(0.01)

    asyncio.run(asyncio.wait_for(run(), 10))
    daemon._fetch_pool.shutdown(wait=True)
    (given,) = RecordsDeadline.given
    assert given > 500  # the lease's 600 s, not the stale dispatch's 5


def test_a_task_leased_again_while_its_cancel_unwinds_is_refused(tmp_path: Path) -> None:
    """A cancel ("lease ended") came and the task is still stopping when the coordinator
    leases it here again: the new lease is refused at once, naming it, rather than taken
    for a renewal of a task that is about to end without a result."""
    daemon, _, link = make_daemon(tmp_path)  # NeverRun: running it fails the test
    task_id, lease = uuid.uuid4(), later()
    stopping = RunningTask(task_id, uuid.uuid4(), "ai.inference", None, time.time())
    stopping.outcome = "cancelled"
    daemon.running[task_id] = stopping
    asyncio.run(daemon._on_frame(dispatch(daemon, task_id, lease)))
    (refused,) = link.frames
    assert_refuses(refused, daemon, task_id, lease, "cancelled here and is still stopping")


def test_unstaking_is_shown_since_the_unstake_not_since_a_restart(tmp_path: Path) -> None:
    """A daemon restarted 3 days into its cooldown learns UNSTAKING from the coordinator:
    `status` counts the state's time from the unstake (the end of the cooldown less 7
    days), not from the restart."""
    daemon, _, _ = make_daemon(tmp_path)
    now = time.time()
    daemon.session.unstaking_until = int(now + 4 * 86400)
    daemon.state.transition(NodeState.UNSTAKING, reason="unstake accepted by the coordinator")
    st = daemon.status()
    assert st["state"] == "UNSTAKING"
    assert abs(st["state_since"] - (now - 3 * 86400)) < 5
    assert 4 * 86400 - 5 <= st["unstake_remaining_s"] <= 4 * 86400


def test_the_unstake_countdown_runs_on_the_coordinators_clock(tmp_path: Path) -> None:
    """The end of the cooldown is a time on the coordinator's clock: a node whose own
    clock is an hour behind (the coordinator's is an hour ahead, as its heartbeat
    acknowledgements say) shows an hour less to go, and the unstake an hour earlier in
    its own clock's terms."""
    daemon, _, _ = make_daemon(tmp_path)
    now = time.time()
    daemon.coordinator_clock.saw(daemon.clock.now() + 3600)
    daemon.session.unstaking_until = int(now + 3600 + 4 * 86400)  # 4 days to go, theirs
    daemon.state.transition(NodeState.UNSTAKING, reason="unstake accepted by the coordinator")
    st = daemon.status()
    assert 4 * 86400 - 5 <= st["unstake_remaining_s"] <= 4 * 86400
    assert abs(st["state_since"] - (now - 3 * 86400)) < 5


def test_a_full_backlog_of_unacknowledged_results_refuses_new_work(tmp_path: Path) -> None:
    """Results awaiting acknowledgement are never dropped: once there are
    max_unacknowledged_results of them (a coordinator that takes results and never
    acknowledges them), a dispatch is refused, signed, naming why, and not run. The
    backlog is sent again meanwhile (once: not at every refusal), so that results whose
    acknowledgement was lost are answered again without waiting for a reconnect."""
    daemon, _, link = make_daemon(tmp_path)
    daemon.retention = dataclasses.replace(daemon.retention, max_unacknowledged=2)
    waiting = []
    for _ in range(2):
        task = RunningTask(uuid.uuid4(), uuid.uuid4(), "ai.inference", None, time.time())
        daemon._commit(task, b"a result never acknowledged")
        waiting.append("0x" + task.task_id.hex)
    link.frames.clear()
    task_id, lease = uuid.uuid4(), later()

    async def refused_twice() -> None:
        for _ in range(2):
            await daemon._on_frame(dispatch(daemon, task_id, lease))
            assert daemon._resend is not None
            await daemon._resend

    asyncio.run(refused_twice())
    refused, *resent, again = link.frames
    assert_refuses(refused, daemon, task_id, lease, "outbox backlog full: 2 results await")
    assert_refuses(again, daemon, task_id, lease, "outbox backlog full: 2 results await")
    assert [(f["type"], f["message"]["task_id"]) for f in resent] == [
        ("result", t) for t in waiting
    ]
    assert daemon.outbox.backlog() == 2


def test_the_backlogs_of_all_coordinators_together_are_bounded_too(tmp_path: Path) -> None:
    """A coordinator that comes back under another id starts a backlog of its own, and the
    old one's results wait until they are abandoned: each id's up to
    max_unacknowledged_results could fill the disk between them. Past
    ALL_BACKLOGS_FACTOR times that, all coordinators' together, no work is taken."""
    from nodeclient.node.dispatch import ALL_BACKLOGS_FACTOR

    daemon, _, link = make_daemon(tmp_path)
    daemon.retention = dataclasses.replace(daemon.retention, max_unacknowledged=2)
    for old in range(ALL_BACKLOGS_FACTOR):  # 2 each: full for each old id, none for ours
        for _ in range(2):
            task = RunningTask(
                uuid.uuid4(), uuid.uuid4(), "ai.inference", None, time.time(),
                coordinator_id=f"coordinator-{old}",
            )  # fmt: skip
            daemon._commit(task, b"a result never acknowledged")
    daemon.session.coordinator_id = "coordinator-now"
    link.frames.clear()
    task_id, lease = uuid.uuid4(), later()
    asyncio.run(daemon._on_frame(dispatch(daemon, task_id, lease)))
    (refused,) = link.frames
    assert_refuses(
        refused, daemon, task_id, lease, f"outbox backlog full: {2 * ALL_BACKLOGS_FACTOR} results"
    )
    assert "coordinators this node is not linked to" in refused["message"]["reason"]
    # Kept for ever by the operator's choice (abandoning off): not a reason to refuse all
    # work for good: the next dispatch is not refused.
    daemon.retention = dataclasses.replace(daemon.retention, abandon_seconds=0.0)
    taken = messages.Dispatch.from_wire(json.loads(dispatch(daemon, uuid.uuid4(), later())))
    assert daemon._refusal(taken, time.time()) == ""


def test_a_task_killed_at_its_deadline_counts_once_and_the_totals_survive_a_restart(
    tmp_path: Path,
) -> None:
    """A task killed at its lease's end was counted as rejected and as timed out (its
    reject is how the node reports it), and both counters lived in memory: a restart set
    them to 0 beside completed and failed, which it did not. One task, one counter now,
    and the totals are kept in the outbox."""
    daemon, _, link = make_daemon(tmp_path, DeadlineExceeded)

    async def run() -> None:
        await daemon._on_frame(dispatch(daemon, uuid.uuid4(), later()))
        while daemon.running:
            await asyncio.sleep(0.01)
        await daemon._on_frame(dispatch(daemon, uuid.uuid4(), later(), workload_class="x.y"))

    asyncio.run(asyncio.wait_for(run(), 10))
    assert [f["type"] for f in link.frames] == ["reject", "reject"]
    counters = ("completed", "failed", "rejected", "timed_out")
    before = {k: daemon.status()[k] for k in counters}
    assert before == {"completed": 0, "failed": 0, "rejected": 1, "timed_out": 1}
    daemon.outbox.close()
    restarted, _, _ = make_daemon(tmp_path)
    assert {k: restarted.status()[k] for k in counters} == before
    restarted.outbox.close()
