"""Finished jobs are deleted after --job-retention-days (default 30; 0: kept for ever),
with all that hangs off them; unfinished and recent jobs, and equivocation evidence, stay.
An ended job's task payloads go at once."""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from nodeclient.coordinator import models as m
from nodeclient.coordinator import store
from nodeclient.coordinator.blobstore import forget_jobs, warn_job_retention
from nodeclient.coordinator.cli import build_parser
from nodeclient.coordinator.config import CoordinatorConfig
from nodeclient.coordinator.leases import fail_job
from nodeclient.coordinator.scheduler import Scheduler
from nodeclient.coordinator.service import Coordinator
from nodeclient.coordinator.store import Database
from nodeclient.errors import UsageError
from tests.coordinator.test_queue_rules import NOW, add_job

DAY = 86400.0


def _finish(session: Session, job_id: str, status: str, at: float) -> None:
    job = session.get_one(m.Job, job_id)
    job.status, job.finished_at = status, at
    for task in session.scalars(select(m.Task).where(m.Task.job_id == job_id)):
        task.status = m.SUCCEEDED if status == m.SUCCEEDED else m.FAILED
        session.add(m.TaskAttempt(task_id=task.task_id, attempt=1, node_id="0x" + "ab" * 20,
                                  leased_at=at - 10, deadline=at + 290, ended_at=at,
                                  outcome="succeeded"))  # fmt: skip
    session.add(m.TrainRound(job_id=job_id, round_index=0, metrics="{}", closed_at=at))
    session.add(m.JobBlob(job_id=job_id, sha256="c" * 64))


def _count(session: Session, table: type, job_id: str) -> int:
    return session.scalar(select(func.count()).select_from(table).where(table.job_id == job_id))


def test_finished_jobs_past_retention_go_with_all_that_hangs_off_them(any_db: Database) -> None:
    """On the suite's database (PostgreSQL too): the old jobs go, whatever their status,
    a batch at a time; the recent and the unfinished stay whole."""
    db = any_db
    old_ok, _ = db.run_sync(lambda s: add_job(s, tasks=2))
    old_failed, _ = db.run_sync(lambda s: add_job(s, tasks=1))
    recent, _ = db.run_sync(lambda s: add_job(s, tasks=1))
    running, _ = db.run_sync(lambda s: add_job(s, tasks=1))  # never finished: always kept
    db.run_sync(lambda s: _finish(s, old_ok, m.SUCCEEDED, NOW - 40 * DAY))
    db.run_sync(lambda s: _finish(s, old_failed, m.FAILED, NOW - 31 * DAY))
    db.run_sync(lambda s: _finish(s, recent, m.SUCCEEDED, NOW - 1 * DAY))
    marker = str(uuid.uuid4())  # a task id of no job: evidence outlives jobs
    evidence = m.Equivocation(task_id=marker, node_id="0x" + "ab" * 20, accepted_proof="0x1",
                              conflicting_proof="0x2", conflicting_signature="0x3",
                              conflicting_message="{}", recorded_at=NOW)  # fmt: skip
    db.run_sync(lambda s: s.add(evidence))

    assert db.run_sync(lambda s: store.forget_jobs_tx(s, finished_before=NOW - 30 * DAY,
                                                      limit=1)) == 1  # fmt: skip
    while db.run_sync(lambda s: store.forget_jobs_tx(s, finished_before=NOW - 30 * DAY)):
        pass  # on a shared database, other tests' old jobs go too

    def left(s: Session) -> dict[str, tuple[int, ...]]:
        out = {}
        for name, job_id in (("old_ok", old_ok), ("old_failed", old_failed),
                             ("recent", recent), ("running", running)):  # fmt: skip
            tasks = select(m.Task.task_id).where(m.Task.job_id == job_id)
            attempts = s.scalar(
                select(func.count()).select_from(m.TaskAttempt)
                .where(m.TaskAttempt.task_id.in_(tasks))
            )  # fmt: skip
            out[name] = (
                int(s.get(m.Job, job_id) is not None), _count(s, m.Task, job_id), attempts,
                _count(s, m.TrainRound, job_id), _count(s, m.JobBlob, job_id),
            )  # fmt: skip
        return out

    assert db.run_sync(left) == {
        "old_ok": (0, 0, 0, 0, 0), "old_failed": (0, 0, 0, 0, 0),
        "recent": (1, 1, 1, 1, 1), "running": (1, 1, 0, 0, 0),
    }  # fmt: skip
    kept = select(func.count()).select_from(m.Equivocation).where(m.Equivocation.task_id == marker)
    assert db.run_sync(lambda s: s.scalar(kept)) == 1


def test_the_sweep_forgets_in_batches_only_when_asked(db: Database) -> None:
    """0 keeps every job; a retention deletes every job past it, batch after
    batch, at the blob sweep."""
    ids = [db.run_sync(lambda s: add_job(s, tasks=1))[0] for _ in range(3)]
    for job_id in ids:
        db.run_sync(lambda s, j=job_id: _finish(s, j, m.SUCCEEDED, NOW - 10 * DAY))

    def coord(retention: float) -> SimpleNamespace:
        return SimpleNamespace(db=db, now=lambda: NOW,
                               config=SimpleNamespace(job_retention=retention))  # fmt: skip

    assert asyncio.run(forget_jobs(coord(0.0))) == 0  # type: ignore[arg-type]
    assert asyncio.run(forget_jobs(coord(30 * DAY))) == 0  # type: ignore[arg-type]
    assert asyncio.run(forget_jobs(coord(7 * DAY))) == 3  # type: ignore[arg-type]
    assert db.run_sync(lambda s: s.scalar(select(func.count()).select_from(m.Job))) == 0


def test_a_failed_job_keeps_no_payload(any_db: Database) -> None:
    """A job that fails drops its tasks' payloads (nothing reads them again); another
    job's stay."""
    db = any_db
    failing, _ = db.run_sync(lambda s: add_job(s, tasks=2))
    other, _ = db.run_sync(lambda s: add_job(s, tasks=1))
    db.run_sync(lambda s: fail_job(s, failing, "no node could run it", NOW))

    def payloads(s: Session, job_id: str) -> list[int]:
        lengths = select(func.length(m.Task.payload)).where(m.Task.job_id == job_id)
        return sorted(s.scalars(lengths))

    assert db.run_sync(lambda s: payloads(s, failing)) == [0, 0]
    assert db.run_sync(lambda s: payloads(s, other)) == [len(b"payload 0")]
    job = db.run_sync(lambda s: s.get_one(m.Job, failing))
    assert (job.status, job.reason, job.finished_at) == (m.FAILED, "no node could run it", NOW)


def test_a_start_that_will_forget_jobs_says_so(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """At start, jobs past the retention (an upgrade from a release that kept them all)
    are counted in a warning that says how to keep them; none, no warning."""
    old = [db.run_sync(lambda s: add_job(s, tasks=1))[0] for _ in range(2)]
    for job_id in old:
        db.run_sync(lambda s, j=job_id: _finish(s, j, m.SUCCEEDED, NOW - 40 * DAY))

    def coord(retention: float) -> SimpleNamespace:
        return SimpleNamespace(db=db, now=lambda: NOW, config=SimpleNamespace(
            job_retention=retention, blob_sweep_interval=3600.0))  # fmt: skip

    with caplog.at_level(logging.WARNING, logger="nodeclient.coordinator.blobs"):
        assert asyncio.run(warn_job_retention(coord(30 * DAY))) == 2  # type: ignore[arg-type]
        assert asyncio.run(warn_job_retention(coord(60 * DAY))) == 0  # type: ignore[arg-type]
        assert asyncio.run(warn_job_retention(coord(0.0))) == 0  # type: ignore[arg-type]
    (record,) = [r for r in caplog.records if r.getMessage() == "jobs.retention_due"]
    assert record.jobs == 2  # type: ignore[attr-defined]
    assert "--job-retention-days 0" in record.fix  # type: ignore[attr-defined]


def test_job_retention_is_validated(tmp_path: Path) -> None:
    """30 days unless told otherwise: a coordinator's database must not grow for ever."""
    assert build_parser().parse_args(["serve"]).job_retention_days == 30
    assert CoordinatorConfig(data_dir=tmp_path).job_retention == 30 * DAY
    args = build_parser().parse_args(["serve", "--job-retention-days", "0"])
    assert args.job_retention_days == 0
    assert CoordinatorConfig(data_dir=tmp_path, job_retention=30 * DAY).job_retention == 30 * DAY
    with pytest.raises(UsageError, match="job retention must be 0"):
        CoordinatorConfig(data_dir=tmp_path, job_retention=60.0)
    with pytest.raises(UsageError, match="finite"):
        CoordinatorConfig(data_dir=tmp_path, job_retention=float("nan"))


def _node(session: Session, *, seen: float | None, updated: float, proof: bool = False) -> str:
    """A node row (and its wallet proof) as registration leaves one; its id."""
    node_id = "0x" + uuid.uuid4().hex + "00000000"
    session.add(m.Node(
        node_id=node_id, wallet_address="0x" + "11" * 20, liveness_address="0x" + "22" * 20,
        pubkey_rsa="pem", hardware_tier=0, region="eu-west", workload_classes="[]",
        max_parallel_subtasks=1, manifest="{}", manifest_hash="0" * 64, issued_at=int(updated),
        registered_at=updated, updated_at=updated, last_seq=0, last_seen=seen,
    ))  # fmt: skip
    if proof:
        session.flush()
        session.add(m.WalletProof(node_id=node_id, wallet_address="0x" + "11" * 20,
                                  issued_at=int(updated), signature="0x00"))  # fmt: skip
    return node_id


def test_nodes_not_seen_past_retention_go_with_their_wallet_proofs(any_db: Database) -> None:
    """On the suite's database (PostgreSQL too): a node last seen (or, never linked,
    registered) before the cut goes, with its wallet proof; one seen since, one registered
    again since, one linked now, and one holding a lease stay."""
    db = any_db
    cut = NOW - 30 * DAY
    gone = db.run_sync(lambda s: _node(s, seen=cut - DAY, updated=cut - 40 * DAY, proof=True))
    never_linked = db.run_sync(lambda s: _node(s, seen=None, updated=cut - 1))
    recent = db.run_sync(lambda s: _node(s, seen=cut + 1, updated=cut - 40 * DAY))
    # linked long ago, registered again since, not linked yet
    came_back = db.run_sync(lambda s: _node(s, seen=cut - 10 * DAY, updated=cut + 1))
    linked = db.run_sync(lambda s: _node(s, seen=cut - DAY, updated=cut - DAY))
    leasing = db.run_sync(lambda s: _node(s, seen=cut - DAY, updated=cut - DAY))
    db.run_sync(lambda s: add_job(s, tasks=1, status=m.LEASED, node_id=leasing))

    forgotten: list[str] = []
    after: str | None = ""
    while after is not None:  # one at a time; a shared database's other old nodes go too
        batch, after = db.run_sync(
            lambda s, a=after: store.forget_nodes_tx(
                s, seen_before=cut, keep={linked}, limit=1, after=a
            )
        )
        forgotten += batch
    mine = {gone, never_linked, recent, came_back, linked, leasing}
    assert sorted(n for n in forgotten if n in mine) == sorted([gone, never_linked])
    left = db.run_sync(lambda s: set(s.scalars(select(m.Node.node_id))))
    assert left & mine == {recent, came_back, linked, leasing}
    proofs = select(func.count()).select_from(m.WalletProof).where(m.WalletProof.node_id == gone)
    assert db.run_sync(lambda s: s.scalar(proofs)) == 0


def test_node_retention_is_an_option(tmp_path: Path) -> None:
    """30 days unless told otherwise; 0 keeps every node."""
    assert build_parser().parse_args(["serve"]).node_retention_days == 30
    assert CoordinatorConfig(data_dir=tmp_path).node_retention == 30 * DAY
    with pytest.raises(UsageError, match="node retention must be 0"):
        CoordinatorConfig(data_dir=tmp_path, node_retention=60.0)


def test_a_forgotten_node_leaves_nothing_in_memory_unless_it_linked_meanwhile() -> None:
    """forget_node drops the node's cache entries; a node that linked while its row was
    deleted keeps them (its link relies on them) and is told 4003 to register again."""
    closed: list[tuple[int, str]] = []

    class Port:
        async def close(self, code: int, reason: str) -> None:
            closed.append((code, reason))

    async def scenario() -> SimpleNamespace:
        spawned: list[asyncio.Task[None]] = []
        coord = SimpleNamespace(
            links={"linked": Port()}, nodes={"linked": 1, "gone": 2},
            runtime={"linked": 1, "gone": 2}, roster_changed=lambda: None,
            spawn=lambda coro, what: spawned.append(asyncio.ensure_future(coro)),
        )  # fmt: skip
        Coordinator.forget_node(coord, "gone")  # type: ignore[arg-type]
        Coordinator.forget_node(coord, "linked")  # type: ignore[arg-type]
        await asyncio.gather(*spawned)
        return coord

    coord = asyncio.run(scenario())
    assert coord.nodes == {"linked": 1} and coord.runtime == {"linked": 1}
    assert closed == [(4003, "not registered: register again")]


def test_the_candidate_cache_keeps_no_node_that_is_gone() -> None:
    """The scheduler's per-node candidate cache is rebuilt from the linked nodes once it
    holds far more than them: nodes that left for good leave no entry behind."""
    info = SimpleNamespace(unstaking_until=None, hardware_tier=0, region="eu-west",
                           workload_classes=frozenset({"ai.inference"}),
                           max_parallel_subtasks=1, slot_ram_mb=0, slot_vram_mb=0,
                           manifest_hash="")  # fmt: skip
    ids = [f"node-{i}" for i in range(3000)]
    link = SimpleNamespace(draining=False)
    coord = SimpleNamespace(nodes=dict.fromkeys(ids, info),
                            runtime={i: SimpleNamespace(online=True, state="READY") for i in ids},
                            links=dict.fromkeys(ids, link))  # fmt: skip
    sched = SimpleNamespace(coord=coord, _cands={})
    assert len(Scheduler._build_candidates(sched)) == 3000  # type: ignore[arg-type]
    assert len(sched._cands) == 3000
    coord.links = {"node-7": link}  # the others left
    assert [c.node_id for c in Scheduler._build_candidates(sched)] == ["node-7"]  # type: ignore[arg-type]
    assert list(sched._cands) == ["node-7"]
