"""The scheduler's transactions on a real SQL database: what a round reads and places, and
what a failed job leaves behind (no sockets: the transactions are called directly)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from nodeclient.coordinator import leases, placement, scheduler, selection
from nodeclient.coordinator import models as m
from nodeclient.coordinator.cli import build_parser
from nodeclient.coordinator.config import CoordinatorConfig
from nodeclient.coordinator.leases import node_lost_tx, undeliverable_tx
from nodeclient.coordinator.placement import assign_tx
from nodeclient.coordinator.scheduler import Scheduler
from nodeclient.coordinator.selection import Candidate
from nodeclient.coordinator.store import Database
from nodeclient.coordinator.verifier import reject_tx
from nodeclient.errors import UsageError

NOW = 1_800_000_000.0


def add_job(
    session: Session,
    *,
    tasks: int,
    workload_class: str = "ai.inference",
    min_tier: int = 0,
    queued_at: float = NOW,
    status: str = m.QUEUED,
    node_id: str | None = None,
    attempts: int = 0,
    ram_mb: int = 0,
    vram_mb: int = 0,
) -> tuple[str, list[str]]:
    job_id = str(uuid.uuid4())
    session.add(
        m.Job(
            job_id=job_id, workload_class=workload_class, status=m.RUNNING, min_tier=min_tier,
            region=None, slices=tasks, meta="{}", created_at=queued_at, ram_mb=ram_mb,
            vram_mb=vram_mb,
        )
    )  # fmt: skip
    ids = []
    for i in range(tasks):
        task_id = str(uuid.uuid4())
        ids.append(task_id)
        session.add(
            m.Task(
                task_id=task_id, job_id=job_id, slice_index=i, slice_count=tasks, status=status,
                node_id=node_id, attempts=attempts, queued_at=queued_at + i * 1e-3,
                payload=f"payload {i}".encode(),
                lease_deadline=NOW + 300 if status == m.LEASED else None,
            )
        )  # fmt: skip
        if status == m.LEASED and node_id is not None:
            session.add(
                m.TaskAttempt(
                    task_id=task_id, attempt=attempts, node_id=node_id, leased_at=NOW,
                    deadline=NOW + 300,
                )
            )  # fmt: skip
    return job_id, ids


def node(
    node_id: str = "0xA", *, tier: int = 1, capacity: int = 2, ram_mb: int = 0, vram_mb: int = 0
) -> Candidate:
    return Candidate(
        node_id, tier, "eu-west", frozenset({"ai.inference"}), capacity, ram_mb, vram_mb
    )


def test_tasks_no_node_can_take_do_not_block_the_ones_behind(db: Database) -> None:
    """More than a page of queued tasks that need a tier (or a class) no linked node has,
    submitted first: a task behind them that a node can take is still placed."""
    db.run_sync(lambda s: add_job(s, tasks=placement.BATCH + 10, min_tier=4))
    db.run_sync(lambda s: add_job(s, tasks=placement.BATCH + 10, workload_class="media.render"))
    later, (task_id,) = db.run_sync(lambda s: add_job(s, tasks=1, queued_at=NOW + 60))
    placed = db.run_sync(lambda s: assign_tx(s, [node()], now=NOW, lease_seconds=300))
    assert [(a.task_id, a.job_id, a.node_id) for a in placed] == [(task_id, later, "0xA")]
    assert placed[0].payload == b"payload 0"


def test_tasks_no_node_can_hold_do_not_block_the_ones_behind(db: Database) -> None:
    """More than MAX_PAGES pages of tasks declaring more RAM, or GPU memory, than any
    linked node's slot holds, submitted first: the tasks behind them are still placed (the
    query asks only for what some node offers, each figure and their combinations)."""
    pages = placement.MAX_PAGES * placement.BATCH + 10
    db.run_sync(lambda s: add_job(s, tasks=pages, ram_mb=1_000_000))
    db.run_sync(lambda s: add_job(s, tasks=pages, vram_mb=30_000))
    db.run_sync(lambda s: add_job(s, tasks=pages, ram_mb=8192, vram_mb=8000))  # no node has both
    later, (task_id,) = db.run_sync(lambda s: add_job(s, tasks=1, queued_at=NOW + 60, ram_mb=512))
    nodes = [node("0xA", ram_mb=8192), node("0xB", ram_mb=1024, vram_mb=23_552)]
    placed = db.run_sync(lambda s: assign_tx(s, nodes, now=NOW, lease_seconds=300))
    assert [(a.task_id, a.job_id, a.resources) for a in placed] == [
        (task_id, later, {"ram_mb": 512})
    ]


def test_many_groups_of_tasks_for_busy_nodes_do_not_keep_an_idle_node_idle(
    db: Database,
) -> None:
    """More kinds of task (tier x region) queued first than a round keeps heaps for, all
    for busy nodes: the task behind them is still placed on the idle node in the round."""
    regions = [f"r{i}" for i in range(17)]
    busy = [
        Candidate(f"0xB{i}", 4, region, frozenset({"ai.inference"}), 1)
        for i, region in enumerate(regions)
    ]
    for c in busy:  # each busy node's one slot is taken
        db.run_sync(lambda s, c=c: add_job(s, tasks=1, status=m.LEASED, node_id=c.node_id))

    def queue_for_busy(s: Session) -> None:
        for tier in range(1, 5):
            for region in regions:
                job_id, _ = add_job(s, tasks=1, min_tier=tier)
                s.get_one(m.Job, job_id).region = region

    db.run_sync(queue_for_busy)
    _, (task_id,) = db.run_sync(lambda s: add_job(s, tasks=1, queued_at=NOW + 60))
    idle = Candidate("0xI", 0, "r0", frozenset({"ai.inference"}), 4)
    placed = db.run_sync(lambda s: assign_tx(s, [*busy, idle], now=NOW, lease_seconds=300))
    assert [(a.task_id, a.node_id) for a in placed] == [(task_id, "0xI")]


def test_a_round_pages_past_tasks_every_eligible_node_is_excluded_from(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tasks the node may serve but may not take (excluded by the retry rules) fill the
    first pages: the round reads on, up to MAX_PAGES, and places the task behind them."""
    blocked_job, _ = db.run_sync(lambda s: add_job(s, tasks=2 * placement.BATCH))
    _, (task_id,) = db.run_sync(lambda s: add_job(s, tasks=1, queued_at=NOW + 60))
    real_pick = selection.Picker.pick
    job_of = db.run_sync(lambda s: {t.task_id: t.job_id for t in s.scalars(select(m.Task))})
    seen: list[str] = []

    def pick(self: selection.Picker, **kw: object) -> str | None:
        seen.append("x")
        return None if len(seen) <= 2 * placement.BATCH else real_pick(self, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(selection.Picker, "pick", pick)
    placed = db.run_sync(lambda s: assign_tx(s, [node()], now=NOW, lease_seconds=300))
    assert [a.task_id for a in placed] == [task_id]
    assert job_of[task_id] != blocked_job
    assert len(seen) == 2 * placement.BATCH + 1


def test_a_job_every_free_node_is_barred_from_does_not_hide_the_queue(db: Database) -> None:
    """A render job of more slices than a round's pages hold, all queued, whose only node
    has failed 3 of its slices (so it may take none of them): an inference job queued
    behind it is still placed, in the first round. Before, every page of every round was
    that job's, until the queue timeout failed it a day later."""
    pages = placement.MAX_PAGES * placement.BATCH + 52
    render, slices = db.run_sync(lambda s: add_job(s, tasks=pages, workload_class="media.render"))

    def failed_three(s: Session) -> None:
        for i, task_id in enumerate(slices[:3]):
            s.add(m.TaskAttempt(task_id=task_id, attempt=1, node_id="0xA", leased_at=NOW,
                                deadline=NOW + 1, ended_at=NOW + i, outcome="rejected"))  # fmt: skip

    db.run_sync(failed_three)
    _, (behind,) = db.run_sync(lambda s: add_job(s, tasks=1, queued_at=NOW + 60))
    both = Candidate("0xA", 1, "eu-west", frozenset({"ai.inference", "media.render"}), 2)
    placed = db.run_sync(lambda s: assign_tx(s, [both], now=NOW, lease_seconds=300))
    assert [(a.task_id, a.node_id) for a in placed] == [(behind, "0xA")]
    other = Candidate("0xB", 1, "eu-west", frozenset({"media.render"}), 1)  # not barred
    placed = db.run_sync(lambda s: assign_tx(s, [both, other], now=NOW, lease_seconds=300))
    assert [(a.job_id, a.node_id) for a in placed] == [(render, "0xB")]


def test_a_round_that_placed_a_few_pages_on_while_slots_are_free(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first page where only one task can be placed (the rest excluded for the node) does
    not end the round while the node has a free slot: the task on the next page is placed
    too, not one round later per task."""
    _, first_page = db.run_sync(lambda s: add_job(s, tasks=placement.BATCH))
    _, (behind,) = db.run_sync(lambda s: add_job(s, tasks=1, queued_at=NOW + 60))
    real_pick = selection.Picker.pick
    seen: list[str] = []

    def pick(self: selection.Picker, **kw: object) -> str | None:
        seen.append("x")
        blocked = 1 < len(seen) <= placement.BATCH  # all but the first of the first page
        return None if blocked else real_pick(self, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(selection.Picker, "pick", pick)
    placed = db.run_sync(lambda s: assign_tx(s, [node(capacity=2)], now=NOW, lease_seconds=300))
    assert [a.task_id for a in placed] == [first_page[0], behind]


def test_a_round_stops_paging_once_the_slots_are_full(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no free slot left after the first page, the next page is not read."""
    db.run_sync(lambda s: add_job(s, tasks=2 * placement.BATCH))
    pages: list[object] = []
    real_page = placement._queued_page

    def counted(*args: object, **kw: object) -> object:
        pages.append(1)
        return real_page(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(placement, "_queued_page", counted)
    placed = db.run_sync(lambda s: assign_tx(s, [node(capacity=2)], now=NOW, lease_seconds=300))
    assert len(placed) == 2 and len(pages) == 1


def test_a_long_queue_for_busy_nodes_does_not_hide_work_from_idle_ones(db: Database) -> None:
    """Far more than MAX_PAGES pages of tier-3 render slices, which only a busy node can
    take, queued first: an inference task behind them is placed on an idle tier-0 node in
    the same round (later pages ask only for what a free node can take)."""
    db.run_sync(
        lambda s: add_job(
            s, tasks=placement.MAX_PAGES * placement.BATCH + 50,
            workload_class="media.render", min_tier=3,
        )
    )  # fmt: skip
    _, (inference,) = db.run_sync(lambda s: add_job(s, tasks=1, queued_at=NOW + 60))
    renderer = Candidate("0xR", 3, "eu-west", frozenset({"media.render"}), 1)
    idle = Candidate("0xI", 0, "eu-west", frozenset({"ai.inference"}), 4)
    placed = db.run_sync(lambda s: assign_tx(s, [renderer, idle], now=NOW, lease_seconds=300))
    assert sorted((a.workload_class, a.node_id) for a in placed) == [
        ("ai.inference", "0xI"), ("media.render", "0xR"),
    ]  # fmt: skip
    assert next(a for a in placed if a.node_id == "0xI").task_id == inference


def test_a_round_places_payloads_up_to_its_byte_budget(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A round reads, seals and frames every payload it places in memory: it stops at
    ROUND_BYTES (always placing one, however large), and the rest wait for the next."""
    monkeypatch.setattr(placement, "ROUND_BYTES", 18)  # each test payload is 9 bytes
    db.run_sync(lambda s: add_job(s, tasks=5))
    first = db.run_sync(lambda s: assign_tx(s, [node(capacity=8)], now=NOW, lease_seconds=300))
    assert len(first) == 2
    monkeypatch.setattr(placement, "ROUND_BYTES", 1)
    second = db.run_sync(lambda s: assign_tx(s, [node(capacity=8)], now=NOW, lease_seconds=300))
    assert len(second) == 1


def test_pages_stop_at_the_limit(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """A round reads at most MAX_PAGES pages when nothing can be placed."""
    db.run_sync(lambda s: add_job(s, tasks=3 * placement.BATCH))
    monkeypatch.setattr(placement, "MAX_PAGES", 2)
    calls: list[int] = []

    def pick(self: selection.Picker, **kw: object) -> None:
        calls.append(1)

    monkeypatch.setattr(selection.Picker, "pick", pick)
    assert db.run_sync(lambda s: assign_tx(s, [node()], now=NOW, lease_seconds=300)) == []
    assert len(calls) == 2 * placement.BATCH


def test_a_failed_jobs_other_tasks_stay_withdrawn(db: Database) -> None:
    """A node holding two slices of one job goes offline; the first slice has used its
    last attempt, so the job fails: the second slice is withdrawn, not queued again."""
    job_id, (first, second) = db.run_sync(
        lambda s: add_job(s, tasks=2, status=m.LEASED, node_id="0xA", attempts=1)
    )
    db.run_sync(lambda s: s.get_one(m.Task, second).__setattr__("attempts", 0))
    lost = db.run_sync(
        lambda s: node_lost_tx(s, node_id="0xA", detail="gone", now=NOW, max_attempts=1)
    )
    assert [(x.task_id, x.failed) for x in lost] == [(first, True)]
    assert set(lost[0].cancel) == {("0xA", second)}
    statuses = db.run_sync(
        lambda s: (
            {t.task_id: t.status for t in s.scalars(select(m.Task))}
            | {"job": s.get_one(m.Job, job_id).status}
        )
    )
    assert statuses == {first: m.FAILED, second: m.CANCELLED, "job": m.FAILED}
    assert db.run_sync(lambda s: assign_tx(s, [node()], now=NOW, lease_seconds=300)) == []


def test_a_lease_withdrawn_while_its_payload_was_sealed_is_not_dispatched(db: Database) -> None:
    """dispatch_all seals in a thread, and meanwhile the job may fail and its cancel go
    out: only leases that still stand are sent, so a withdrawn task never reaches a node."""
    import asyncio
    from types import SimpleNamespace

    from cryptography.hazmat.primitives.asymmetric import rsa

    from nodeclient.coordinator.leases import fail_job
    from nodeclient.coordinator.scheduler import Scheduler
    from nodeclient.protocol.secp import Secp256k1Key

    address = Secp256k1Key.generate().address
    public_key = rsa.generate_private_key(public_exponent=65537, key_size=3072).public_key()
    withdrawn, _ = db.run_sync(lambda s: add_job(s, tasks=1))
    placed = db.run_sync(lambda s: assign_tx(s, [node(address)], now=NOW, lease_seconds=300))
    _, (standing,) = db.run_sync(lambda s: add_job(s, tasks=1, queued_at=NOW + 1))
    placed += db.run_sync(lambda s: assign_tx(s, [node(address)], now=NOW, lease_seconds=300))
    assert len(placed) == 2
    db.run_sync(lambda s: fail_job(s, withdrawn, "withdrawn while sealing", NOW))
    sent: list[dict] = []

    async def send_to(node_id: str, frame: dict) -> bool:
        sent.append(frame)
        return True

    coord = SimpleNamespace(
        db=db, nodes={address: SimpleNamespace(public_key=public_key, unstaking_until=None)}, send_to=send_to,
        now=lambda: NOW, wake=lambda: None, withdrawn={}, in_node_cpu=asyncio.to_thread,
    )  # fmt: skip
    asyncio.run(Scheduler.dispatch_all(SimpleNamespace(coord=coord), placed))  # type: ignore[arg-type]
    assert [f["task_id"] for f in sent] == [standing]


def test_a_cancel_on_its_way_is_not_overtaken_by_its_dispatch(db: Database) -> None:
    """A lease may end just after dispatch_all read which leases stand, with its cancel
    on its way before the dispatch's send starts: that dispatch is not sent at all (it
    would reach the node after the cancel and run a withdrawn task); the others are, and a
    new lease of the same task on that node is dispatched again."""
    import asyncio
    import collections
    from types import SimpleNamespace

    from cryptography.hazmat.primitives.asymmetric import rsa

    from nodeclient.coordinator.scheduler import Scheduler
    from nodeclient.coordinator.service import Coordinator
    from nodeclient.protocol.secp import Secp256k1Key

    address = Secp256k1Key.generate().address
    public_key = rsa.generate_private_key(public_exponent=65537, key_size=3072).public_key()
    _, (ending,) = db.run_sync(lambda s: add_job(s, tasks=1))
    _, (standing,) = db.run_sync(lambda s: add_job(s, tasks=1, queued_at=NOW + 1))
    placed = db.run_sync(lambda s: assign_tx(s, [node(address)], now=NOW, lease_seconds=300))
    placed += db.run_sync(lambda s: assign_tx(s, [node(address)], now=NOW, lease_seconds=300))
    assert sorted(a.task_id for a in placed) == sorted([ending, standing])
    sent: list[tuple[str, str]] = []
    background: list[asyncio.Future[object]] = []

    async def send_to(node_id: str, frame: dict) -> bool:
        sent.append((frame["type"], frame["task_id"]))
        return True

    class RacingDb:
        """The lease read is the last db call before the sends: the cancel of *ending*
        goes out as it returns, as when its job failed on another thread meanwhile."""

        async def run(self, fn: object) -> object:
            result = await db.run(fn)  # type: ignore[arg-type]
            if getattr(fn, "func", None) is not None:  # functools.partial(_live_leases, ...)
                Coordinator.send_cancel(coord, address, ending, "job failed")  # type: ignore[arg-type]
            return result

    coord = SimpleNamespace(
        db=RacingDb(), nodes={address: SimpleNamespace(public_key=public_key, unstaking_until=None)},
        send_to=send_to, now=lambda: NOW, wake=lambda: None,
        withdrawn=collections.OrderedDict(),
        spawn=lambda coro, what: background.append(asyncio.ensure_future(coro)),
        in_node_cpu=asyncio.to_thread,
    )  # fmt: skip
    scheduler = SimpleNamespace(coord=coord)

    async def main() -> None:
        await Scheduler.dispatch_all(scheduler, placed)  # type: ignore[arg-type]
        await asyncio.gather(*background)

    asyncio.run(main())
    assert sorted(sent) == sorted([("cancel", ending), ("dispatch", standing)])
    Coordinator.granted(coord, [(address, ending)])  # type: ignore[arg-type]
    assert (address, ending) not in coord.withdrawn  # a new lease is dispatched again


def test_a_failed_send_undoes_only_its_own_lease(any_db: Database) -> None:
    """A slow send of attempt 1 that fails after the task went back to the queue and out
    again to the same node (attempt 2) leaves the newer lease alone."""
    _, (task_id,) = any_db.run_sync(
        lambda s: add_job(s, tasks=1, status=m.LEASED, node_id="0xA", attempts=2)
    )
    any_db.run_sync(lambda s: undeliverable_tx(s, task_id, "0xA", NOW, attempt=1))
    task = any_db.run_sync(lambda s: s.get_one(m.Task, task_id))
    assert (task.status, task.node_id, task.attempts) == (m.LEASED, "0xA", 2)
    any_db.run_sync(lambda s: undeliverable_tx(s, task_id, "0xA", NOW, attempt=2))
    task = any_db.run_sync(lambda s: s.get_one(m.Task, task_id))
    assert (task.status, task.node_id, task.attempts) == (m.QUEUED, None, 1)


def test_a_long_reject_reason_is_stored_cut_to_the_protocol_limit(any_db: Database) -> None:
    """The node's reason is held to MAX_REASON (512) characters, whatever a node sends."""
    _, (task_id,) = any_db.run_sync(
        lambda s: add_job(s, tasks=1, status=m.LEASED, node_id="0xA", attempts=1)
    )
    any_db.run_sync(
        lambda s: reject_tx(s, uuid.UUID(task_id), "0xA", "x" * 60_000, now=NOW, max_attempts=3)
    )
    task = any_db.run_sync(lambda s: s.get_one(m.Task, task_id))
    assert task.reason.endswith("x" * 512) and "x" * 513 not in task.reason


def test_a_reject_reason_with_control_characters_is_stored_escaped(any_db: Database) -> None:
    """A node's reason is free text: a NUL (which PostgreSQL cannot store as text) or an
    escape sequence is kept as \\xNN, so it neither breaks the link nor a terminal."""
    _, (task_id,) = any_db.run_sync(
        lambda s: add_job(s, tasks=1, status=m.LEASED, node_id="0xA", attempts=1)
    )
    decision, _ = any_db.run_sync(
        lambda s: reject_tx(
            s, uuid.UUID(task_id), "0xA", "out of\x00 memory \x1b[31m\tand\nmore",
            now=NOW, max_attempts=3,
        )
    )  # fmt: skip
    assert decision.status == "accepted"
    task = any_db.run_sync(lambda s: s.get_one(m.Task, task_id))
    assert task.status == m.QUEUED
    assert task.reason.endswith("out of\\x00 memory \\x1b[31m\tand\nmore")


def test_a_reject_for_another_lease_changes_nothing(any_db: Database) -> None:
    """A reject whose echoed lease_expires_at is not the current lease's (an earlier lease
    of the task to the same node) leaves the lease and its attempt count alone; the
    current one's, or none, re-queues the task."""
    _, (task_id,) = any_db.run_sync(
        lambda s: add_job(s, tasks=1, status=m.LEASED, node_id="0xA", attempts=2)
    )
    current = int(NOW + 300)  # add_job's lease_deadline, as the dispatch carried it
    for echo, which in ((current - 301, "an earlier"), (current + 1, "another")):
        decision, lost = any_db.run_sync(
            lambda s, echo=echo: reject_tx(
                s, uuid.UUID(task_id), "0xA", "deadline exceeded", now=NOW, max_attempts=3,
                lease_expires_at=echo,
            )
        )  # fmt: skip
        assert (decision.status, lost) == ("rejected", None)
        assert decision.reason == (
            f"reject for {which} lease of task {task_id} (lease_expires_at {echo}, "
            f"current {current}): ignored"
        )
        task = any_db.run_sync(lambda s: s.get_one(m.Task, task_id))
        assert (task.status, task.node_id, task.attempts, task.reason) == (
            m.LEASED, "0xA", 2, None,
        )  # fmt: skip
    decision, lost = any_db.run_sync(
        lambda s: reject_tx(
            s, uuid.UUID(task_id), "0xA", "out of memory", now=NOW, max_attempts=3,
            lease_expires_at=current,
        )
    )  # fmt: skip
    assert decision.status == "accepted" and lost is not None and not lost.failed
    task = any_db.run_sync(lambda s: s.get_one(m.Task, task_id))
    assert (task.status, task.node_id, task.attempts) == (m.QUEUED, None, 2)


HOUR = 3600.0


def _attempt(session: Session, task_id: str, leased_at: float, ended_at: float) -> None:
    session.add(m.TaskAttempt(task_id=task_id, attempt=1, node_id="0x" + "ab" * 20,
                              leased_at=leased_at, deadline=leased_at + 300, ended_at=ended_at,
                              outcome="expired"))  # fmt: skip


def test_a_job_no_node_takes_fails_after_the_queue_timeout(any_db: Database) -> None:
    """On the suite's database (PostgreSQL too): a job whose tasks sat queued, none leased,
    for the timeout since anything last happened to it fails, saying what no node offered;
    a job that moved within the timeout, one under way, a young one and an ended one stay."""
    db, timeout = any_db, 24 * HOUR
    old = NOW - 48 * HOUR
    stalled, _ = db.run_sync(lambda s: add_job(s, tasks=2, min_tier=3, queued_at=old,
                                               ram_mb=16_384))  # fmt: skip
    retried, (retried_task,) = db.run_sync(lambda s: add_job(s, tasks=1, queued_at=old))
    db.run_sync(lambda s: _attempt(s, retried_task, NOW - 3 * HOUR, NOW - 2 * HOUR))
    once, (once_task,) = db.run_sync(lambda s: add_job(s, tasks=1, queued_at=old))
    db.run_sync(lambda s: _attempt(s, once_task, old + HOUR, old + 2 * HOUR))
    busy, (_, busy_leased) = db.run_sync(lambda s: add_job(s, tasks=2, queued_at=old))

    def lease(s: Session) -> None:
        task = s.get_one(m.Task, busy_leased)
        task.status, task.node_id, task.lease_deadline = m.LEASED, "0x" + "cd" * 20, NOW + 60

    db.run_sync(lease)
    young, _ = db.run_sync(lambda s: add_job(s, tasks=1, queued_at=NOW - HOUR))
    ended, _ = db.run_sync(lambda s: add_job(s, tasks=1, queued_at=old))
    db.run_sync(lambda s: leases.fail_job(s, ended, "earlier", old + 1))

    # No node online at all.
    failed = dict(db.run_sync(
        lambda s: leases.fail_stalled_tx(s, now=NOW, timeout=timeout, candidates=[])
    ))  # fmt: skip
    mine = {stalled, retried, once, busy, young, ended}
    assert sorted(j for j in failed if j in mine) == sorted([stalled, once])
    assert failed[stalled] == (
        "no node took its tasks for 24 h: no node seen in that time offers ai.inference at "
        "tier 3 or above with 16384 MB of RAM a slot; submit it again once one does"
    )

    def state(s: Session, job_id: str) -> tuple[str, list[str]]:
        tasks = s.scalars(select(m.Task.status).where(m.Task.job_id == job_id))
        return s.get_one(m.Job, job_id).status, sorted(tasks)

    assert db.run_sync(lambda s: state(s, stalled)) == (m.FAILED, [m.CANCELLED] * 2)
    assert db.run_sync(lambda s: state(s, retried))[0] == m.RUNNING
    assert db.run_sync(lambda s: state(s, busy)) == (m.RUNNING, [m.LEASED, m.QUEUED])
    assert db.run_sync(lambda s: state(s, young))[0] == m.RUNNING
    assert db.run_sync(lambda s: s.get_one(m.Job, ended).reason) == "earlier"
    # Run again: nothing more to fail among these.
    again = db.run_sync(
        lambda s: leases.fail_stalled_tx(s, now=NOW, timeout=timeout, candidates=[])
    )
    assert not {j for j, _ in again} & mine


def test_a_job_waiting_its_turn_is_not_failed_by_the_queue_timeout(any_db: Database) -> None:
    """A job that waited past the timeout while a node that can take it is online (busy
    with the jobs ahead) waits on; one that only a smaller node is online for fails."""
    db, timeout, old = any_db, 24 * HOUR, NOW - 48 * HOUR
    backlog, _ = db.run_sync(lambda s: add_job(s, tasks=1, min_tier=1, queued_at=old))
    too_big, _ = db.run_sync(lambda s: add_job(s, tasks=1, min_tier=1, queued_at=old,
                                               ram_mb=16_384))  # fmt: skip
    online = [node("0xA", tier=1, ram_mb=8192)]
    failed = dict(db.run_sync(
        lambda s: leases.fail_stalled_tx(s, now=NOW, timeout=timeout, candidates=online)
    ))  # fmt: skip
    assert backlog not in failed
    assert too_big in failed
    assert db.run_sync(lambda s: s.get_one(m.Job, backlog).status) == m.RUNNING


def test_a_node_seen_within_the_queue_timeout_counts_as_able() -> None:
    """The stall check counts, beside the linked nodes, every node seen within the
    timeout that is not unstaking (by record or by its own heartbeats): one reconnecting
    at the sweep's moment still counts."""
    info = SimpleNamespace(unstaking_until=None, hardware_tier=2, region="eu-west",
                           workload_classes=frozenset({"ai.inference"}),
                           max_parallel_subtasks=1, slot_ram_mb=4096, slot_vram_mb=0,
                           manifest_hash="")  # fmt: skip
    leaving = SimpleNamespace(**{**vars(info), "unstaking_until": int(NOW) + 86400})
    coord = SimpleNamespace(
        nodes={"recent": info, "long_gone": info, "leaving": leaving, "says_leaving": info},
        runtime={"recent": SimpleNamespace(last_seen=NOW - HOUR, state="READY"),
                 "long_gone": SimpleNamespace(last_seen=NOW - 48 * HOUR, state=None),
                 "leaving": SimpleNamespace(last_seen=NOW, state="READY"),
                 "says_leaving": SimpleNamespace(last_seen=NOW, state="UNSTAKING")},
    )  # fmt: skip
    linked = node("0xA")
    sched = SimpleNamespace(coord=coord, candidates=lambda: [linked])
    seen = Scheduler.seen_since(sched, NOW - 24 * HOUR)  # type: ignore[arg-type]
    assert sorted(c.node_id for c in seen) == ["0xA", "recent"]
    (recent,) = [c for c in seen if c.node_id == "recent"]
    assert (recent.hardware_tier, recent.capacity, recent.ram_mb) == (2, 1, 4096)


def test_a_render_no_online_node_may_take_fails_after_the_queue_timeout(
    any_db: Database,
) -> None:
    """The retry rules keep a node that failed 3 of a render's slices from the job: when
    every online node that renders is kept from it, the job fails at the timeout, saying
    so; while another may take a slice, it waits."""
    db, timeout, old = any_db, 24 * HOUR, NOW - 48 * HOUR
    job_id, tasks = db.run_sync(lambda s: add_job(s, tasks=4, workload_class="media.render",
                                                  queued_at=old))  # fmt: skip

    def failed_on(s: Session, node_id: str) -> None:
        for task_id in tasks[:3]:  # three slices failed on it, then queued again
            s.add(m.TaskAttempt(task_id=task_id, attempt=1, node_id=node_id, leased_at=old,
                                deadline=old + 300, ended_at=old + 1, outcome="rejected"))  # fmt: skip

    db.run_sync(lambda s: failed_on(s, "0xA"))
    render = frozenset({"media.render"})
    a = Candidate("0xA", 1, "eu-west", render, 2)
    b = Candidate("0xB", 1, "eu-west", render, 2)

    def stall(candidates: list[Candidate]) -> dict[str, str]:
        return dict(db.run_sync(lambda s: leases.fail_stalled_tx(
            s, now=NOW, timeout=timeout, candidates=candidates)))  # fmt: skip

    assert job_id not in stall([a, b])  # b may take them
    assert stall([a])[job_id] == (
        "no node took its tasks for 24 h: every node seen in that time that offers "
        "media.render at tier 0 or above has failed this job's tasks, and the retry rules "
        "keep them from it; submit it again"
    )


REFUSED = "node 0xA rejected it: bad payload: the scene has no active camera"
EXPIRED = "lease expired on node 0xA (attempt 1)"
BLANK = (
    "node 0xA returned a result that failed the checks: media.render result: frame 1 is "
    "blank: every pixel is [70, 70, 70, 255] (a scene that renders one colour on purpose "
    'sets "allow_blank": "1" in its payload)'
)
WRONG_SIZE = (
    "node 0xA returned a result that failed the checks: media.render result: result is "
    "10x10, not 1920x1080"
)


@pytest.mark.parametrize(
    ("latest", "earlier", "advice"),
    [
        (REFUSED, EXPIRED, "fix the job before submitting it again"),
        (EXPIRED, REFUSED, "submit it again"),
        (BLANK, EXPIRED, "fix the job before submitting it again"),
        (WRONG_SIZE, EXPIRED, "submit it again"),
    ],
    ids=["refused-last", "expired-last", "blank", "wrong-size"],
)
def test_a_render_its_nodes_failed_fails_with_the_latest_failure(
    any_db: Database, latest: str, earlier: str, advice: str
) -> None:
    """A render every online node failed fails at the queue timeout with the failure that
    ended last (its tasks were all queued at once), and says whether the job itself is at
    fault: a payload the nodes refused, or a blank frame, needs fixing; a lease that ran
    out, or a result of the wrong size (the node's doing), does not. Each task keeps what
    happened to it."""
    db, timeout, old = any_db, 24 * HOUR, NOW - 48 * HOUR
    job_id, tasks = db.run_sync(lambda s: add_job(s, tasks=3, workload_class="media.render",
                                                  queued_at=old))  # fmt: skip
    stories = {tasks[0]: (latest, old + 1000), tasks[1]: (earlier, old + 1),
               tasks[2]: (earlier, old + 2)}  # fmt: skip

    def failed(s: Session) -> None:
        for task_id, (reason, ended) in stories.items():
            task = s.get_one(m.Task, task_id)
            task.queued_at, task.reason = old, reason  # queued together, as a job's are
            s.add(m.TaskAttempt(task_id=task_id, attempt=1, node_id="0xA", leased_at=old,
                                deadline=old + 300, ended_at=ended, outcome="rejected"))  # fmt: skip

    db.run_sync(failed)
    a = Candidate("0xA", 1, "eu-west", frozenset({"media.render"}), 2)
    stalled = dict(db.run_sync(lambda s: leases.fail_stalled_tx(
        s, now=NOW, timeout=timeout, candidates=[a])))  # fmt: skip
    assert stalled[job_id].endswith(f"keep them from it; the last: {latest}; {advice}")
    reasons = db.run_sync(lambda s: {t: s.get_one(m.Task, t).reason for t in tasks})
    assert reasons == {t: f"{r}; job failed: {stalled[job_id]}" for t, (r, _) in stories.items()}


def test_the_queue_timeout_is_an_option(tmp_path: Path) -> None:
    """24 hours unless told otherwise; 0 waits for ever; the hourly sweep applies it."""
    assert build_parser().parse_args(["serve"]).queue_timeout_hours == 24
    assert CoordinatorConfig(data_dir=tmp_path).queue_timeout == 24 * HOUR
    with pytest.raises(UsageError, match="queue timeout must be 0"):
        CoordinatorConfig(data_dir=tmp_path, queue_timeout=30.0)
    db = Database(f"sqlite:///{tmp_path / 'c.db'}")
    try:
        stalled, _ = db.run_sync(lambda s: add_job(s, tasks=1, queued_at=NOW - 48 * HOUR))

        def coord(timeout: float) -> SimpleNamespace:
            return SimpleNamespace(db=db, now=lambda: NOW,
                                   config=SimpleNamespace(queue_timeout=timeout))  # fmt: skip

        nobody = SimpleNamespace(seen_since=lambda since: [])
        for timeout, failed in ((0.0, 0), (72 * HOUR, 0), (24 * HOUR, 1)):
            count = scheduler.fail_stalled_jobs(coord(timeout), nobody)  # type: ignore[arg-type]
            assert asyncio.run(count) == failed
        assert db.run_sync(lambda s: s.get_one(m.Job, stalled).status) == m.FAILED
    finally:
        db.close()


def test_tasks_waiting_for_a_busy_node_do_not_hide_the_queue_for_good(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More than a round's pages of tasks that the one free node has failed each, and that
    so wait for the busy node that has not tried them, head the queue: a round reads its
    pages of them and places nothing. The next round reads on from there (the queue
    cursor), so the task queued behind them reaches the free node a round later, not
    never; a round that reaches the queue's end starts the next from the oldest again."""
    monkeypatch.setattr(placement, "BATCH", 4)
    monkeypatch.setattr(placement, "MAX_PAGES", 2)
    _, waiting = db.run_sync(lambda s: add_job(s, tasks=3 * 4))

    def failed_on_a(s: Session) -> None:
        for task_id in waiting:
            s.add(m.TaskAttempt(task_id=task_id, attempt=1, node_id="0xA", leased_at=NOW,
                                deadline=NOW + 1, ended_at=NOW, outcome="rejected"))  # fmt: skip

    db.run_sync(failed_on_a)
    _, (behind,) = db.run_sync(lambda s: add_job(s, tasks=1, queued_at=NOW + 60))
    free, busy = node("0xA", capacity=1), node("0xB", capacity=1)
    db.run_sync(lambda s: add_job(s, tasks=1, status=m.LEASED, node_id="0xB"))  # B is busy
    cursor = placement.QueueCursor()

    def round_() -> list[str]:
        placed = db.run_sync(
            lambda s: assign_tx(s, [free, busy], now=NOW, lease_seconds=300, cursor=cursor)
        )
        return [a.task_id for a in placed]

    assert round_() == [] and cursor.after is not None  # 2 full pages of waiting tasks
    assert round_() == [behind] and cursor.after is None  # read on: the task behind them
