"""Lease endings: re-queue or fail a task whose lease ended without a result, and its job.

A missed deadline, a node gone offline or a node's signed reject re-queues the task;
after ``max_attempts`` leases it fails, and so does its job, with the reason. Classes with
a :class:`RetryPolicy` (``media.render``) retry strictly: a slice fails hard once
``max_failed_nodes`` different nodes have failed it, and :func:`excluded_nodes` keeps
nodes from the slices they may no longer take (the rules:
:mod:`nodeclient.coordinator.scheduler`). A dispatch that never left is undone without
spending an attempt; a job that no node seen may take fails after ``queue_timeout``.

These are transactions, or parts of one: the caller owns the session.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from nodeclient.coordinator import models as m
from nodeclient.coordinator import rounds, store
from nodeclient.coordinator.selection import Candidate, is_eligible

if TYPE_CHECKING:
    from sqlalchemy.engine import CursorResult

log = logging.getLogger("nodeclient.coordinator.scheduler")
# Lease outcomes that count as the node failing the task (not "cancelled", "superseded",
# "undelivered": those are not the node's doing).
FAILED_OUTCOMES = ("rejected", "expired", "offline", "lost")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Strict retries for a sliceable class: see the rules in the docstring of
    :mod:`nodeclient.coordinator.scheduler`."""

    max_failed_nodes: int = 3
    max_node_failures_per_job: int = 3


RETRY_POLICIES: dict[str, RetryPolicy] = {"media.render": RetryPolicy()}
# Reasons that put a failure down to the job itself: a node's refusal of its payload or
# inputs, or a render whose frame came out blank (the scene's doing, on every node). Other
# failed result checks (a wrong size, frames the slice did not ask for) are the node's.
REQUESTER_FAULTS = ("rejected it: bad payload:", "rejected it: bad input:")
BLANK_FRAME = re.compile(r"returned a result that failed the checks: .*: frame \d+ is blank: ")


@dataclass(frozen=True, slots=True)
class Lost:
    """A lease that ended without a result: who held it, and whether it gave up."""

    task_id: str
    node_id: str | None
    failed: bool
    cancel: tuple[tuple[str, str], ...] = ()  # (node_id, task_id) leases to withdraw
    job: tuple[str, str] | None = None  # (job_id, status) when this ended its job


def report_job_end(lost: Lost) -> None:
    """Log the end of the job a lost lease ended (``job.failed``, or ``job.succeeded``
    when a training round closed without the slice and was the last)."""
    if lost.job is not None:
        log.info(f"job.{lost.job[1]}", extra={"job_id": lost.job[0]})


def excluded_nodes(
    policy: RetryPolicy, task_id: str, failures: Iterable[tuple[str, str]]
) -> frozenset[str]:
    """Nodes that may not take *task_id* under *policy*; pure, so it is tested directly.

    *failures* are the ``(task_id, node_id)`` failed leases of the task's whole job: a
    node is excluded if it failed this task, or failed enough of the job's tasks.
    """
    return frozenset(
        node_id
        for node_id, tasks in failed_per_node(failures).items()
        if task_id in tasks or len(tasks) >= policy.max_node_failures_per_job
    )


def failed_per_node(failures: Iterable[tuple[str, str]]) -> dict[str, set[str]]:
    """node_id -> the tasks of the job it failed, from ``(task_id, node_id)`` pairs."""
    per_node: dict[str, set[str]] = {}
    for failed_task, node_id in failures:
        per_node.setdefault(node_id, set()).add(failed_task)
    return per_node


def job_failures(session: Session, job_ids: Iterable[str]) -> dict[str, list[tuple[str, str]]]:
    """job_id -> its failed leases as ``(task_id, node_id)``."""
    out: dict[str, list[tuple[str, str]]] = {}
    ids = list(job_ids)
    if not ids:
        return out
    rows = session.execute(
        select(m.Task.job_id, m.TaskAttempt.task_id, m.TaskAttempt.node_id)
        .join(m.Task, m.Task.task_id == m.TaskAttempt.task_id)
        .where(m.Task.job_id.in_(ids), m.TaskAttempt.outcome.in_(FAILED_OUTCOMES))
    )
    for job_id, task_id, node_id in rows:
        out.setdefault(job_id, []).append((task_id, node_id))
    return out


def close_attempt(session: Session, task_id: str, node_id: str, outcome: str, now: float) -> bool:
    """End the node's open attempt at the task with *outcome*; whether it had one."""
    row = session.scalars(
        select(m.TaskAttempt)
        .where(
            m.TaskAttempt.task_id == task_id,
            m.TaskAttempt.node_id == node_id,
            m.TaskAttempt.ended_at.is_(None),
        )
        .order_by(m.TaskAttempt.attempt.desc())
    ).first()
    if row is None:
        return False
    row.ended_at, row.outcome = now, outcome
    return True


def fail_job(session: Session, job_id: str, reason: str, now: float) -> list[tuple[str, str]]:
    """Fail a job and withdraw its other tasks; returns leases to cancel on the nodes."""
    job = session.get(m.Job, job_id)
    if job is None or job.status in (m.SUCCEEDED, m.FAILED):
        return []
    cancel: list[tuple[str, str]] = []
    for task in session.scalars(
        select(m.Task).where(m.Task.job_id == job_id, m.Task.status.in_((m.QUEUED, m.LEASED)))
    ):
        if task.status == m.LEASED and task.node_id is not None:
            cancel.append((task.node_id, task.task_id))
            close_attempt(session, task.task_id, task.node_id, "cancelled", now)
        task.status, task.reason = m.CANCELLED, store.job_failed_reason(task.reason, reason)
    store.end_job(session, job, m.FAILED, now, reason)
    return cancel


def _needs(workload_class: str, min_tier: int, ram_mb: int, vram_mb: int) -> str:
    """What a node must offer to take a job's tasks, in words."""
    need = f"{workload_class} at tier {min_tier} or above"
    sizes = [f"{mb} MB of {what}" for what, mb in (("RAM", ram_mb), ("GPU memory", vram_mb)) if mb]
    return need + (f" with {' and '.join(sizes)} a slot" if sizes else "")


def fail_stalled_tx(
    session: Session, *, now: float, timeout: float, candidates: Sequence[Candidate]
) -> list[tuple[str, str]]:
    """Fail every unfinished job that has had tasks queued, and none leased, for *timeout*
    seconds since anything last happened to it (its submission, a task queued, a lease
    begun or ended), and whose queued tasks no node of *candidates* (those online, or
    seen within the timeout) may take: none offers what they need, or the retry rules
    keep every one that does from this job. A job waiting behind others for a node that
    can take it is never failed. Without this, a job that asks for what no node offers
    would stay queued, and keep its blobs, for ever. Returns ``(job_id, reason)`` of
    each job failed.
    """
    cutoff = now - timeout
    leased = select(m.Task.job_id).where(m.Task.status == m.LEASED)
    queued = select(m.Task.job_id).where(m.Task.status == m.QUEUED)
    rows = session.execute(
        select(
            m.Job.job_id, m.Job.workload_class, m.Job.min_tier, m.Job.ram_mb, m.Job.vram_mb,
            func.max(m.Task.queued_at), func.max(m.TaskAttempt.leased_at),
            func.max(m.TaskAttempt.ended_at),
        )
        .join(m.Task, m.Task.job_id == m.Job.job_id)
        .outerjoin(m.TaskAttempt, m.TaskAttempt.task_id == m.Task.task_id)
        .where(
            m.Job.status.in_((m.QUEUED, m.RUNNING)),
            m.Job.created_at < cutoff,  # a younger job cannot have waited that long
            m.Job.job_id.in_(queued),
            m.Job.job_id.not_in(leased),
        )
        .group_by(m.Job.job_id, m.Job.workload_class, m.Job.min_tier, m.Job.ram_mb, m.Job.vram_mb)
    ).all()  # fmt: skip
    failed = []
    for job_id, workload_class, min_tier, ram_mb, vram_mb, *moments in rows:
        if max((t for t in moments if t is not None), default=0.0) >= cutoff:
            continue
        need = (workload_class, min_tier, ram_mb, vram_mb)
        able = {c.node_id for c in candidates if c.capacity > 0 and is_eligible(c, need)}
        needs = _needs(*need)
        waited = f"no node took its tasks for {timeout / 3600:g} h"
        if not able:
            reason = (
                f"{waited}: no node seen in that time offers {needs}; submit it again once one does"
            )
        else:
            policy = RETRY_POLICIES.get(workload_class)
            if policy is None:
                continue  # it waits its turn
            failures = job_failures(session, [job_id]).get(job_id, [])
            waiting = session.scalars(
                select(m.Task.task_id).where(m.Task.job_id == job_id, m.Task.status == m.QUEUED)
            )
            blocked = list(waiting)
            if any(able - excluded_nodes(policy, t, failures) for t in blocked):
                continue  # some task may go to one of them: it waits its turn
            last = _last_failure(session, blocked)
            reason = (
                f"{waited}: every node seen in that time that offers {needs} has failed this "
                f"job's tasks, and the retry rules keep them from it; {last}"
            )
        fail_job(session, job_id, reason, now)
        failed.append((job_id, reason))
    return failed


def _last_failure(session: Session, task_ids: Sequence[str]) -> str:
    """The end of a stalled job's reason: the latest failure of its blocked tasks, and
    whether submitting it again may help (not when the nodes found the job at fault)."""
    last = session.scalar(  # the task whose last attempt ended last
        select(m.Task.reason)
        .join(m.TaskAttempt, m.TaskAttempt.task_id == m.Task.task_id)
        .where(
            m.Task.task_id.in_(task_ids),
            m.Task.reason.is_not(None),
            m.TaskAttempt.ended_at.is_not(None),
        )
        .order_by(m.TaskAttempt.ended_at.desc(), m.TaskAttempt.id.desc())
        .limit(1)
    )
    if last is None:
        return "submit it again"
    if any(mark in last for mark in REQUESTER_FAULTS) or BLANK_FRAME.search(last):
        return f"the last: {last}; fix the job before submitting it again"
    return f"the last: {last}; submit it again"


def requeue_or_fail(
    session: Session, task: m.Task, *, outcome: str, detail: str, now: float, max_attempts: int
) -> Lost:
    """End the task's current lease; queue it again, or fail it after max_attempts."""
    holder = task.node_id
    if holder is not None:
        close_attempt(session, task.task_id, holder, outcome, now)
    task.node_id, task.lease_deadline = None, None
    job = session.get_one(m.Job, task.job_id)
    policy = RETRY_POLICIES.get(job.workload_class)
    give_up = f"gave up after {task.attempts} of {max_attempts} attempts"
    exhausted = task.attempts >= max_attempts
    if policy is not None:  # strict retries count different failing nodes, not leases
        failures = job_failures(session, [task.job_id]).get(task.job_id, [])
        failed_on = {node for tid, node in failures if tid == task.task_id}
        give_up = f"failed on {len(failed_on)} different nodes"
        exhausted = len(failed_on) >= policy.max_failed_nodes
    if exhausted:
        task.status = m.FAILED
        task.reason = f"{detail}; {give_up}"
        if rounds.is_round_based(job.workload_class):
            # A training slice that fails everywhere is dropped from its round, as one that
            # misses the round's deadline is; the round closes now if it was the last open
            # slice (a round with no valid slice fails the job there, with every reason).
            closed = rounds.close_if_complete(session, job, now)
            ended = None if closed is None else closed.job_status
            return Lost(
                task.task_id, holder, failed=True, cancel=closed.cancel if closed else (),
                job=None if ended is None else (job.job_id, ended),
            )  # fmt: skip
        job_reason = f"task {task.task_id} (slice {task.slice_index}) failed: {task.reason}"
        cancel = fail_job(session, task.job_id, job_reason, now)
        return Lost(
            task.task_id, holder, failed=True, cancel=tuple(cancel), job=(job.job_id, m.FAILED)
        )
    task.status, task.reason = m.QUEUED, detail
    return Lost(task.task_id, holder, failed=False)


def shift_times_tx(session: Session, *, by: float) -> dict[str, int]:
    """Move by *by* seconds the stored times still counted against the wall clock, which
    just jumped: leased tasks' lease (and their open attempts' leased_at; an attempt's
    ``deadline`` is kept as it was dispatched, which a node's reject echoes), running
    jobs' round deadlines, and queued tasks' queueing time (the queue timeout). How many
    of each."""
    task, attempt, job = m.Task, m.TaskAttempt, m.Job
    statements = {
        "leases": update(task)
        .where(task.status == m.LEASED)
        .values(lease_deadline=task.lease_deadline + by, leased_at=task.leased_at + by),
        # The attempt's deadline stays as it was sent: the node echoes it in a reject.
        "attempts": update(attempt)
        .where(attempt.ended_at.is_(None))
        .values(leased_at=attempt.leased_at + by),
        "rounds": update(job)
        .where(job.status.in_((m.QUEUED, m.RUNNING)), job.round_deadline.is_not(None))
        .values(round_deadline=job.round_deadline + by),
        "queued": update(task).where(task.status == m.QUEUED).values(queued_at=task.queued_at + by),
    }
    return {
        name: cast("CursorResult[Any]", session.execute(stmt)).rowcount
        for name, stmt in statements.items()
    }


def expire_tx(
    session: Session, *, now: float, max_attempts: int, passed_after: float | None = None
) -> list[Lost]:
    """Re-queue (or fail) the leases past their deadline; with *passed_after*, only those
    whose deadline passed after it (the others wait: see Scheduler's start grace)."""
    expired = [m.Task.status == m.LEASED, m.Task.lease_deadline < now]
    if passed_after is not None:
        expired.append(m.Task.lease_deadline >= passed_after)
    rows = session.scalars(select(m.Task).where(*expired)).all()
    return [
        requeue_or_fail(
            session,
            t,
            outcome="expired",
            detail=f"lease expired on node {t.node_id} (attempt {t.attempts})",
            now=now,
            max_attempts=max_attempts,
        )
        for t in rows
        # An earlier task's last failure may have failed the job and withdrawn this one.
        if t.status == m.LEASED
    ]


def node_lost_tx(
    session: Session,
    *,
    node_id: str,
    detail: str,
    now: float,
    max_attempts: int,
    outcome: str = "offline",
    spare: Callable[[m.Task], bool] | None = None,
) -> list[Lost]:
    """End the leases *node_id* holds (but those *spare* keeps): re-queue or fail each."""
    rows = session.scalars(
        select(m.Task).where(m.Task.status == m.LEASED, m.Task.node_id == node_id)
    ).all()
    return [
        requeue_or_fail(
            session, t, outcome=outcome, detail=detail, now=now, max_attempts=max_attempts
        )
        for t in rows
        # as in expire_tx: not one its job's failure withdrew
        if t.status == m.LEASED and (spare is None or not spare(t))
    ]


def strays_tx(session: Session, node_id: str, task_ids: Sequence[str]) -> list[str]:
    """Of the tasks *node_id* says it holds, those that are no longer its to run: leased to
    another node, ended (failed, cancelled, or succeeded on another node), or unknown
    here. A task queued again is not among them: its next lease may be this node's, which
    then goes on with the run it has (a dispatch of a task a node runs only extends its
    lease)."""
    if not task_ids:
        return []
    rows = session.execute(
        select(m.Task.task_id, m.Task.status, m.Task.node_id).where(m.Task.task_id.in_(task_ids))
    )
    mine = {
        task_id
        for task_id, status, holder in rows
        # (one it finished: it holds the result, awaiting its acknowledgement)
        if status == m.QUEUED or (status in (m.LEASED, m.SUCCEEDED) and holder == node_id)
    }
    return [t for t in task_ids if t not in mine]


def undeliverable_tx(
    session: Session, task_id: str, node_id: str, now: float, *, attempt: int
) -> None:
    """A dispatch that never left: undo its lease without spending an attempt, if that
    lease (*attempt*) still stands: a slow send that fails after the task went back to
    the queue and out again, even to the same node, must not undo the newer lease."""
    task = session.get(m.Task, task_id)
    if (
        task is None
        or task.status != m.LEASED
        or task.node_id != node_id
        or task.attempts != attempt
    ):
        return
    close_attempt(session, task_id, node_id, "undelivered", now)
    # The task's last delivered lease, if any: a lease that never left starts nothing (a
    # training round's clock starts at the round's first delivered lease).
    previous = session.scalar(
        select(m.TaskAttempt.leased_at)
        .where(
            m.TaskAttempt.task_id == task_id,
            m.TaskAttempt.attempt < attempt,
            m.TaskAttempt.outcome != "undelivered",
        )
        .order_by(m.TaskAttempt.attempt.desc())
        .limit(1)
    )
    task.status, task.node_id, task.lease_deadline = m.QUEUED, None, None
    task.manifest_hash = None
    task.leased_at = previous
    task.attempts -= 1
    job = session.get(m.Job, task.job_id)
    if (
        job is not None
        and job.round_deadline is not None
        and job.round_index == task.round_index
        and rounds.is_round_based(job.workload_class)
    ):
        job.round_deadline = None  # set again from the round's delivered leases, if any
