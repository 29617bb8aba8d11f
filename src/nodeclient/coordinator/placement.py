"""Placement: lease queued tasks to eligible nodes, a page of the queue at a time.

:func:`assign_tx` reads the queued tasks that some candidate can take, oldest first,
``BATCH`` at a time, chooses a node for each with
:class:`~nodeclient.coordinator.selection.Picker` (under the retry rules of
:mod:`nodeclient.coordinator.leases`), and leases them: each lease has a deadline
(``lease_seconds``), and its :class:`Assignment` is what the scheduler seals to the node
(2.3.4) and dispatches.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from nodeclient.coordinator import classes, store
from nodeclient.coordinator import models as m
from nodeclient.coordinator.leases import (
    FAILED_OUTCOMES,
    RETRY_POLICIES,
    excluded_nodes,
    fail_job,
    failed_per_node,
    job_failures,
)
from nodeclient.coordinator.selection import Candidate, Offer, Picker, Roster
from nodeclient.coordinator.store import after_key, job_resources, leased_counts
from nodeclient.errors import ProtocolError

log = logging.getLogger("nodeclient.coordinator.scheduler")
BATCH = 256  # queued tasks looked at per page of a round
MAX_PAGES = 8  # pages a round may read while it has placed less than a page
# A round stops placing once the payloads it has placed reach this many bytes (it always
# places one): each is read, sealed and framed in memory before it is sent.
ROUND_BYTES = 256 * 1024 * 1024
# Added to a class's own run time (lease_for): inputs fetched before, the result sent after.
LEASE_GRACE_S = 120.0


@dataclass(frozen=True, slots=True)
class Assignment:
    task_id: str
    job_id: str
    workload_class: str
    node_id: str
    payload: bytes
    deadline: float
    slice_index: int
    slice_count: int
    attempt: int
    resources: Mapping[str, int] = dataclasses.field(default_factory=dict)


@dataclass(slots=True)
class QueueCursor:
    """Where a round starts reading the queue: None, from its oldest task.

    A round that read MAX_PAGES full pages and placed nothing leaves the cursor after the
    last task it read: a head of the queue that no free node may take now (each of its
    tasks waits for a busy node that has not tried it) then cannot hide the tasks behind
    it for good. A round that reaches the queue's end, or places a task, starts the next
    one from the oldest again.
    """

    after: tuple[float, str] | None = None


def assign_tx(
    session: Session,
    candidates: Sequence[Candidate] | Roster,
    *,
    now: float,
    lease_seconds: float,
    withdrawn: list[tuple[str, str]] | None = None,
    cursor: QueueCursor | None = None,
) -> list[Assignment]:
    """Lease queued tasks to eligible nodes, oldest first; returns what to dispatch.
    *withdrawn* gets the (node_id, task_id) leases to cancel on their nodes, of a job
    failed meanwhile (a stored payload that cannot be sent). *cursor*: where to start
    reading, and where the next round should (:class:`QueueCursor`).

    Only tasks that some candidate can take (its class, tier and slot sizes: the
    candidates' :attr:`Roster.offers`) are read, a page of BATCH at a time. A round goes
    on to the next page while it has placed fewer than BATCH tasks and slots are still
    free, up to MAX_PAGES: so tasks that no node can take now (every eligible node
    excluded by the retry rules, say) cannot keep the tasks queued behind them waiting,
    nor hold a round to the few placeable tasks among them, while a round still places
    at most about a page.
    """
    roster = candidates if isinstance(candidates, Roster) else Roster(candidates)
    counts = leased_counts(session)
    if not roster.any_free(counts) or not roster.classes:
        return []
    picker = Picker(roster, counts)
    placed: list[tuple[m.Task, m.Job, str, str]] = []
    after = None if cursor is None else cursor.after
    budget = ROUND_BYTES
    # The first page asks only what some candidate offers (class, tier, slot sizes); the
    # next ones, only what a node with a free slot now can take: so a long queue of tasks
    # that only busy nodes serve cannot hide the tasks behind it from idle nodes.
    offers = roster.offers
    # Jobs none of whose tasks any free node may take now (every free node that serves
    # the class failed too many of the job's tasks): later pages skip them, so a job of
    # thousands of such slices cannot fill every page and hide the jobs queued behind it.
    blocked: set[str] = set()
    resume: tuple[float, str] | None = None  # where the next round starts (the cursor)
    for page_number in range(MAX_PAGES):
        page = _queued_page(session, offers, after, skip=blocked)
        failures = job_failures(session, {q[1] for q in page if q[2] in RETRY_POLICIES})
        more, size = _place(session, picker, page, budget, failures)
        placed += more
        budget -= size
        if len(page) < BATCH or len(placed) >= BATCH or budget <= 0:
            break
        offers = picker.free_offers()
        if not offers:  # no slot free any more
            break
        blocked |= _blocked_jobs(picker, page, failures)
        after = (page[-1][5], page[-1][0])
        if page_number + 1 == MAX_PAGES and not placed:
            resume = after  # every page full and nothing placed: go on from here next
    if cursor is not None:
        cursor.after = resume
    if not placed:
        return []
    # Payloads (up to tens of MiB each) are read only for the tasks placed.
    ids = [t.task_id for t, _, _, _ in placed]
    rows = session.execute(select(m.Task.task_id, m.Task.payload).where(m.Task.task_id.in_(ids)))
    payloads: dict[str, bytes] = dict(rows.all())
    broken = _expand(session, placed, payloads, now, withdrawn)
    out: list[Assignment] = []
    leases: dict[str, float] = {}
    for task, job, wclass, choice in placed:
        if job.job_id in broken:
            continue
        if job.job_id not in leases:
            leases[job.job_id] = lease_for(job, wclass, lease_seconds)
        deadline = now + leases[job.job_id]
        task.status, task.node_id, task.attempts = m.LEASED, choice, task.attempts + 1
        task.manifest_hash = roster.by_id[choice].manifest_hash or None  # what it claimed
        task.leased_at, task.lease_deadline = now, deadline  # reason: why it was re-queued
        session.add(
            m.TaskAttempt(
                task_id=task.task_id, attempt=task.attempts, node_id=choice,
                leased_at=now, deadline=deadline, manifest_hash=task.manifest_hash,
            )
        )  # fmt: skip
        if job.status == m.QUEUED:
            job.status = m.RUNNING
        out.append(
            Assignment(
                task.task_id, job.job_id, wclass, choice, payloads[task.task_id], deadline,
                task.slice_index, task.slice_count, task.attempts, job_resources(job),
            )
        )  # fmt: skip
    return out


def lease_for(job: m.Job, workload_class: str, lease_seconds: float) -> float:
    """How long a lease of one of the job's tasks lasts: *lease_seconds*, or for a class
    that says how long its tasks may run (a render slice's hard cap, a training slice's
    round deadline), that and LEASE_GRACE_S more, if longer. A lease shorter than the
    work would fail every attempt of a long slice on every node."""
    wc = classes.REGISTRY.get(workload_class)
    if wc is None or wc.lease is None:
        return lease_seconds
    try:
        runs = wc.lease(json.loads(job.meta))
    except (ValueError, KeyError, TypeError):  # metadata of another revision: the default
        return lease_seconds
    return max(lease_seconds, runs + LEASE_GRACE_S) if math.isfinite(runs) else lease_seconds


def _expand(
    session: Session,
    placed: Sequence[tuple[m.Task, m.Job, str, str]],
    payloads: dict[str, bytes],
    now: float,
    withdrawn: list[tuple[str, str]] | None = None,
) -> set[str]:
    """Put into each placed task's payload what its round's tasks share (stored once,
    ``round_inputs``), for the classes that have it; returns the jobs failed because a
    stored payload and its round's input do not fit together (never, but for a damaged
    database: the job fails with the reason rather than its nodes refusing the payload)."""
    hooks = {w: wc.expand for w in {p[2] for p in placed} if (wc := classes.REGISTRY.get(w))}
    jobs = {job.job_id for _, job, wclass, _ in placed if hooks.get(wclass) is not None}
    shared = store.round_inputs(session, jobs)
    broken: set[str] = set()
    for task, job, wclass, _ in placed:
        expand = hooks.get(wclass)
        if expand is None or job.job_id in broken:
            continue
        sha256, data = shared.get(job.job_id, ("", b""))
        try:
            payloads[task.task_id] = expand(payloads[task.task_id], data, sha256)
        except ProtocolError as exc:
            reason = f"the coordinator's stored task {task.task_id} cannot be sent: {exc}"
            log.error("job.payload_unusable", extra={"job_id": job.job_id, "reason": reason})
            cancel = fail_job(session, job.job_id, reason, now)
            if withdrawn is not None:
                withdrawn.extend(cancel)
            broken.add(job.job_id)
    return broken


# task_id, job_id, class, min_tier, region, queued_at, payload size, RAM MB, VRAM MB
_QueuedRow = tuple[str, str, str, int, str | None, float, int, int, int]


def _blocked_jobs(
    picker: Picker, page: Sequence[_QueuedRow], failures: Mapping[str, list[tuple[str, str]]]
) -> set[str]:
    """The jobs of *page* under a strict retry policy that no node with a free slot may
    take any task of: every free node serving the class has failed enough of the job's
    tasks (*failures*, per job) to be excluded from all of them (:func:`excluded_nodes`)."""
    classes = {q[1]: q[2] for q in page if q[2] in RETRY_POLICIES}
    blocked = set()
    for job_id, failed in failures.items():
        policy = RETRY_POLICIES[classes[job_id]]
        barred = {
            node_id
            for node_id, tasks in failed_per_node(failed).items()
            if len(tasks) >= policy.max_node_failures_per_job
        }
        if barred and not picker.any_free_outside(classes[job_id], barred):
            blocked.add(job_id)
    return blocked


def _queued_page(
    session: Session,
    offers: Mapping[str, Sequence[Offer]],
    after: tuple[float, str] | None,
    *,
    skip: Iterable[str] = (),
) -> list[_QueuedRow]:
    """The next BATCH queued tasks (oldest first) that one of *offers* (class -> what
    nodes offer: tier, slot RAM, slot VRAM) can take, with their payload sizes; none of
    the jobs in *skip*."""
    servable = or_(
        *(
            and_(
                m.Job.workload_class == w,
                m.Job.min_tier <= tier,
                m.Job.ram_mb <= ram_mb,
                m.Job.vram_mb <= vram_mb,
            )
            for w, points in sorted(offers.items())
            for tier, ram_mb, vram_mb in points
        )
    )
    query = (
        select(
            m.Task.task_id, m.Job.job_id, m.Job.workload_class, m.Job.min_tier, m.Job.region,
            m.Task.queued_at,
            func.length(m.Task.payload) + func.coalesce(m.RoundInput.size, 0),
            m.Job.ram_mb, m.Job.vram_mb,
        )
        .join(m.Job, m.Job.job_id == m.Task.job_id)
        .outerjoin(m.RoundInput, m.RoundInput.job_id == m.Task.job_id)
        .where(m.Task.status == m.QUEUED, servable)
    )  # fmt: skip
    if after is not None:  # keyset paging, in the order below
        query = query.where(after_key(m.Task.queued_at, m.Task.task_id, after))
    skipped = sorted(skip)
    if skipped:
        query = query.where(m.Task.job_id.not_in(skipped))
    rows = session.execute(query.order_by(m.Task.queued_at, m.Task.task_id).limit(BATCH))
    return [tuple(r) for r in rows]


def _place(
    session: Session,
    picker: Picker,
    queued: Sequence[_QueuedRow],
    budget: int,
    failures: Mapping[str, list[tuple[str, str]]],
) -> tuple[list[tuple[m.Task, m.Job, str, str]], int]:
    """Choose a node for each task of *queued* that one can take: (task, job, class, node),
    until the payload bytes placed reach *budget*; also returns those bytes. *failures*:
    the failed leases of the page's jobs under a retry policy (:func:`job_failures`)."""
    if not queued:
        return [], 0
    ids = [q[0] for q in queued]
    # The nodes whose lease of a task failed (not one handed back by a stopping node, nor
    # one whose dispatch never left: neither was the node's doing).
    tried: dict[str, list[str]] = {}
    for task_id, node_id in session.execute(
        select(m.TaskAttempt.task_id, m.TaskAttempt.node_id).where(
            m.TaskAttempt.task_id.in_(ids), m.TaskAttempt.outcome.in_(FAILED_OUTCOMES)
        )
    ):
        tried.setdefault(task_id, []).append(node_id)
    # The page's tasks and jobs in two queries, not two per task: each lookup by primary
    # key would also flush the previous task's lease first.
    tasks = {t.task_id: t for t in session.scalars(select(m.Task).where(m.Task.task_id.in_(ids)))}
    jobs = {
        j.job_id: j
        for j in session.scalars(select(m.Job).where(m.Job.job_id.in_({q[1] for q in queued})))
    }
    out: list[tuple[m.Task, m.Job, str, str]] = []
    placed_bytes = 0
    for task_id, job_id, wclass, min_tier, region, _, size, ram_mb, vram_mb in queued:
        if placed_bytes >= budget:
            break
        policy = RETRY_POLICIES.get(wclass)
        choice = picker.pick(
            workload_class=wclass,
            min_tier=min_tier,
            region=region,
            ram_mb=ram_mb or 0,
            vram_mb=vram_mb or 0,
            tried=tried.get(task_id, ()),
            excluded=()
            if policy is None
            else excluded_nodes(policy, task_id, failures.get(job_id, ())),
        )
        if choice is not None:
            out.append((tasks[task_id], jobs[job_id], wclass, choice))
            placed_bytes += size or 0
    return out, placed_bytes


def any_queued(session: Session) -> bool:
    return (
        session.scalar(select(m.Task.task_id).where(m.Task.status == m.QUEUED).limit(1)) is not None
    )
