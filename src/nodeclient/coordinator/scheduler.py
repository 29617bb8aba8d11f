"""Scheduling and leases: match queued tasks to nodes, seal, dispatch, expire, re-queue.

Rules (docs: "Scheduling and leases"):

- A node is eligible when it is linked and online, not UNSTAKING (2.3.8: "no new
  dispatches"), lists the job's workload class, has ``hardware_tier >= min_tier``, can
  hold the job's declared ``resources`` in a slot (RAM and GPU memory, from its manifest:
  ``tier.slot_memory_mb``), and has free capacity (``max_parallel_subtasks`` minus tasks
  leased to it). The dispatch carries the resources, and the node checks them itself.
- Among eligible nodes, prefer one that has not tried this task before, then one in
  the job's region (falling back to any region), then the least loaded.
- Each dispatch is a lease with a deadline (``lease_seconds``); the payload is sealed
  to the node's ``pubkey_rsa`` with the deadline as envelope expiry (2.3.4).
- A missed deadline, a node gone offline or a node's signed reject re-queues the task;
  after ``max_attempts`` leases it fails, and so does its job, with the reason.
- Classes with a :class:`RetryPolicy` (``media.render``) retry strictly: a failed slice
  goes only to a node that has not failed it; it fails hard once ``max_failed_nodes``
  different nodes have failed it (``max_attempts`` does not apply); and a node that has
  failed ``max_node_failures_per_job`` slices of one job gets no more slices of it. A
  slice that no eligible node may take waits in the queue for a new node. The node's
  reject reason (crash, out of memory, timeout) is kept in the task's reason.

Selection is a pure function (:func:`pick_node`); the database work is a few
transactions; the loop around them is the adapter, woken on events and at least
every ``schedule_interval`` seconds. A round places up to ``BATCH`` tasks with
:class:`Picker`, which makes the same choice as :func:`pick_node` from one heap per
(workload class, min tier, region, resources) instead of a scan of every node per task.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import functools
import heapq
import logging
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from nodeclient.coordinator import classes, rounds, store
from nodeclient.coordinator import models as m
from nodeclient.coordinator.service import Coordinator
from nodeclient.coordinator.store import NodeInfo, after_key, job_resources, leased_counts
from nodeclient.errors import ProtocolError
from nodeclient.protocol import envelope, messages

log = logging.getLogger("nodeclient.coordinator.scheduler")
BATCH = 256  # queued tasks looked at per page of a round
MAX_PAGES = 8  # pages a round may read while it has placed less than a page
# A round stops placing once the payloads it has placed reach this many bytes (it always
# places one): each is read, sealed and framed in memory before it is sent.
ROUND_BYTES = 256 * 1024 * 1024
ROUND_REST = 3.0  # a round that took d seconds is followed by at least this many d of rest
# Lease outcomes that count as the node failing the task (not "cancelled", "superseded",
# "undelivered": those are not the node's doing).
FAILED_OUTCOMES = ("rejected", "expired", "offline", "lost")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Strict retries for a sliceable class: see the module docstring."""

    max_failed_nodes: int = 3
    max_node_failures_per_job: int = 3


RETRY_POLICIES: dict[str, RetryPolicy] = {"media.render": RetryPolicy()}


@dataclass(frozen=True, slots=True)
class Candidate:
    node_id: str
    hardware_tier: int
    region: str
    workload_classes: frozenset[str]
    capacity: int
    ram_mb: int = 0  # what a task may count on in one slot
    vram_mb: int = 0


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


def pick_node(
    *,
    workload_class: str,
    min_tier: int,
    region: str | None,
    candidates: Iterable[Candidate],
    free: Mapping[str, int],
    tried: Iterable[str] = (),
    excluded: Iterable[str] = (),
    ram_mb: int = 0,
    vram_mb: int = 0,
) -> str | None:
    """The best eligible node for one task, or None; pure, so it is tested directly.

    A node that tried the task is chosen only when no other candidate could take it at
    all, free or busy: otherwise the task waits for one. A node that refuses or drops
    whatever it gets is always the least loaded; were it given the task back whenever
    the others are busy, it alone would spend the task's attempts within a second.
    """
    tried_set, excluded_set = set(tried), set(excluded)
    best: tuple[bool, bool, float, str] | None = None
    need = (workload_class, min_tier, ram_mb, vram_mb)
    cands = list(candidates)
    others = any(
        c.capacity > 0 and _eligible(c, need) and c.node_id not in tried_set | excluded_set
        for c in cands
    )
    for c in cands:
        slots = free.get(c.node_id, 0)
        if slots <= 0 or not _eligible(c, need):
            continue
        if c.node_id in excluded_set or (others and c.node_id in tried_set):
            continue
        key = (
            c.node_id in tried_set,
            region is not None and c.region != region,
            1.0 - slots / max(c.capacity, 1),
            c.node_id,
        )
        if best is None or key < best:
            best = key
    return None if best is None else best[3]


# A heap entry: (region mismatch, load, node_id, free slots when pushed). The first three
# are pick_node's preference after "not tried before"; the last detects entries made stale
# by a pick, or by leases the entry did not know of.
_Entry = tuple[bool, float, str, int]
_Need = tuple[str, int, int, int]  # what a task asks: workload class, min tier, RAM, VRAM
_Group = tuple[_Need, str | None]  # and its region preference
_Offer = tuple[int, int, int]  # what a node offers a task: hardware tier, slot RAM, slot VRAM
# Groups a round keeps a heap for (each may hold every node): a task of a further group
# waits for a later round, which starts with the oldest tasks' groups.
MAX_GROUPS = 64
START_GRACE_S = 90.0  # after a start, before deadlines that passed meanwhile are enforced
MAX_OFFERS = 32  # per class in a queued-task query; more are merged into one upper bound


def _frontier(offers: Iterable[_Offer]) -> list[_Offer]:
    """The offers no other offer matches or beats in every figure: a task some node can
    take fits one of them. Past MAX_OFFERS, their upper bound alone (a looser filter)."""
    out: list[_Offer] = []
    for offer in sorted(set(offers), reverse=True):  # a dominating offer sorts first
        if not any(o[0] >= offer[0] and o[1] >= offer[1] and o[2] >= offer[2] for o in out):
            out.append(offer)
    if len(out) > MAX_OFFERS:
        out = [(max(o[0] for o in out), max(o[1] for o in out), max(o[2] for o in out))]
    return out


def _offer(c: Candidate) -> _Offer:
    return c.hardware_tier, c.ram_mb, c.vram_mb


def _load(c: Candidate, slots: int) -> float:
    return 1.0 - slots / max(c.capacity, 1)  # exactly pick_node's load term


def _candidate(node_id: str, info: NodeInfo) -> Candidate:
    """Registered node *node_id* as the scheduler weighs it."""
    return Candidate(
        node_id, info.hardware_tier, info.region, info.workload_classes,
        info.max_parallel_subtasks, info.slot_ram_mb, info.slot_vram_mb,
    )  # fmt: skip


def _eligible(c: Candidate, need: _Need) -> bool:
    workload_class, min_tier, ram_mb, vram_mb = need
    return (
        workload_class in c.workload_classes
        and c.hardware_tier >= min_tier
        and c.ram_mb >= ram_mb
        and c.vram_mb >= vram_mb
    )


class Roster:
    """The scheduling candidates, plus what rounds reuse until the candidates change.

    For each group of tasks it keeps a heap of its eligible nodes keyed as if none had a
    lease (load 0). A round copies it (a C-level list copy) instead of weighing every
    node again: an entry of a node with leases is then ahead of its true place, which
    :class:`Picker` corrects when it pops it.
    """

    def __init__(self, candidates: Iterable[Candidate]) -> None:
        self.candidates = list(candidates)
        self.by_id = {c.node_id: c for c in self.candidates}
        self.capacity = sum(max(c.capacity, 0) for c in self.candidates)
        # What any candidate serves at all: queued tasks outside it are not even read.
        self.classes = frozenset(w for c in self.candidates for w in c.workload_classes)
        self.regions = frozenset(c.region for c in self.candidates)
        self._idle_heaps: dict[_Group, list[_Entry]] = {}
        # Per class and offer, the nodes that serve the class with that offer.
        self._by_offer: dict[str, dict[_Offer, list[Candidate]]] = {}
        for c in self.candidates:
            if c.capacity > 0:
                for w in c.workload_classes:
                    self._by_offer.setdefault(w, {}).setdefault(_offer(c), []).append(c)
        # What some candidate offers per class: queued tasks beyond it are not even read.
        self.offers = {w: _frontier(groups) for w, groups in self._by_offer.items()}
        # Slot sizes on offer, ascending: a task's need is rounded up to one (same nodes).
        self._ram = sorted({c.ram_mb for c in self.candidates})
        self._vram = sorted({c.vram_mb for c in self.candidates})

    def serves(self, need: _Need, *, barred: set[str]) -> bool:
        """Whether a candidate not in *barred* could take a task of *need*, free or not
        (it stops at the first: at most the barred few are passed over)."""
        workload_class, min_tier, ram_mb, vram_mb = need
        return any(
            tier >= min_tier
            and ram >= ram_mb
            and vram >= vram_mb
            and any(c.node_id not in barred for c in nodes)
            for (tier, ram, vram), nodes in self._by_offer.get(workload_class, {}).items()
        )

    def nodes_serving(self, workload_class: str) -> Iterable[list[Candidate]]:
        """The candidates (with slots) that serve *workload_class*, grouped by offer."""
        return self._by_offer.get(workload_class, {}).values()

    def free_offers(self, used: Mapping[str, int]) -> dict[str, list[_Offer]]:
        """Per class, :attr:`offers` among the nodes with a free slot (classes with none
        are left out): what a queued task may ask for and be placed now."""
        out: dict[str, list[_Offer]] = {}
        for workload_class, groups in self._by_offer.items():
            free = [
                offer
                for offer, nodes in groups.items()
                if any(used.get(c.node_id, 0) < c.capacity for c in nodes)
            ]
            if free:
                out[workload_class] = _frontier(free)
        return out

    def normal(self, need: _Need) -> _Need | None:
        """*need* with its RAM and VRAM rounded up to a slot size some candidate has: the
        same nodes hold it, and tasks of many sizes share a few groups. None when no
        candidate's slot is that large."""
        workload_class, min_tier, ram_mb, vram_mb = need
        i, j = bisect.bisect_left(self._ram, ram_mb), bisect.bisect_left(self._vram, vram_mb)
        if i == len(self._ram) or j == len(self._vram):
            return None
        return workload_class, min_tier, self._ram[i], self._vram[j]

    def idle_heap(self, group: _Group) -> list[_Entry]:
        """A fresh copy of the group's heap with every node idle."""
        heap = self._idle_heaps.get(group)
        if heap is None:
            need, region = group
            heap = [
                (region is not None and c.region != region, _load(c, c.capacity), c.node_id,
                 c.capacity)
                for c in self.candidates
                if c.capacity > 0 and _eligible(c, need)
            ]  # fmt: skip
            heapq.heapify(heap)
            if len(self._idle_heaps) < MAX_GROUPS:
                self._idle_heaps[group] = heap
        return list(heap)

    def any_free(self, used: Mapping[str, int]) -> bool:
        """Whether some candidate has a free slot, given tasks leased per node (O(leased))."""
        free = self.capacity
        for node_id, n in used.items():
            c = self.by_id.get(node_id)
            if c is not None:
                cap = max(c.capacity, 0)
                free -= cap - max(0, cap - n)
        return free > 0


class Picker:
    """:func:`pick_node` for many tasks in one round, O(log nodes) per task.

    Candidates are grouped by what a task asks of them (workload class, min tier,
    resources, region); each group keeps a heap keyed by (region mismatch, load, node_id). Load
    only goes up during a round, so an entry whose slot count is out of date is ahead
    of its true place: it is popped early and pushed back with its current load. Nodes
    that already tried the task, or may not take it, are set aside during a pick and
    put back after it. When every eligible node has tried the task, the best of the
    (few) nodes that tried it is chosen, as pick_node does; while some other node could
    take it, busy or not, the task waits for one.
    """

    def __init__(
        self, roster: Roster, used: Mapping[str, int], *, max_groups: int = MAX_GROUPS
    ) -> None:
        self._roster = roster
        self._cands = roster.by_id
        self._used = dict(used)  # node_id -> tasks leased to it; pick() adds one
        self._heaps: dict[_Group, list[_Entry]] = {}
        self._max_groups = max_groups

    def any_free(self) -> bool:
        """Whether some candidate still has a free slot, this round's picks included."""
        return self._roster.any_free(self._used)

    def free_offers(self) -> dict[str, list[_Offer]]:
        """Roster.free_offers, this round's picks included."""
        return self._roster.free_offers(self._used)

    def any_free_outside(self, workload_class: str, barred: set[str]) -> bool:
        """Whether a candidate serving *workload_class*, not in *barred*, has a free slot
        (it stops at the first: at most the barred few are passed over)."""
        groups = self._roster.nodes_serving(workload_class)
        return any(
            c.node_id not in barred and self.slots(c.node_id) > 0 for nodes in groups for c in nodes
        )

    def slots(self, node_id: str) -> int:
        """Free slots of a candidate now (capacity minus leases, this round's included)."""
        return self._cands[node_id].capacity - self._used.get(node_id, 0)

    def pick(
        self,
        *,
        workload_class: str,
        min_tier: int,
        region: str | None,
        tried: Iterable[str] = (),
        excluded: Iterable[str] = (),
        ram_mb: int = 0,
        vram_mb: int = 0,
    ) -> str | None:
        """The node pick_node would choose; its free slots go down by one. A task of a new
        group, once this round keeps ``max_groups`` heaps, is placed by a scan of every
        candidate instead (the same choice, without a heap kept for it)."""
        tried_set, excluded_set = set(tried), set(excluded)
        need = self._roster.normal((workload_class, min_tier, ram_mb, vram_mb))
        if need is None:
            return None  # no slot of any candidate is that large
        if region not in self._roster.regions:
            # No candidate is there: every node misses it alike, which orders them as no
            # preference does. One group for all such regions, not one cached heap of every
            # node per name a requester made up.
            region = None
        group = (need, region)
        heap = self._heaps.get(group)
        if heap is None:
            if len(self._heaps) >= self._max_groups:
                return self._scan(need, region, tried_set, excluded_set)
            heap = self._heaps[group] = self._start_heap(group)
        aside: list[_Entry] = []
        choice: str | None = None
        while heap:
            entry = heapq.heappop(heap)
            mismatch, _, node_id, pushed_slots = entry
            slots = self.slots(node_id)
            if slots <= 0:
                continue  # full: gone from this group for the rest of the round
            if slots != pushed_slots:
                c = self._cands[node_id]
                heapq.heappush(heap, (mismatch, _load(c, slots), node_id, slots))
                continue
            if node_id in excluded_set or node_id in tried_set:
                aside.append(entry)
                continue
            choice = node_id
            break
        for entry in aside:
            heapq.heappush(heap, entry)
        if choice is None:  # every eligible node with a free slot tried it (or none is)
            return self._pick_tried(need, region, tried_set, excluded_set)
        self._used[choice] = self._used.get(choice, 0) + 1
        slots = self.slots(choice)
        if slots > 0:
            c = self._cands[choice]
            mismatch = region is not None and c.region != region
            heapq.heappush(heap, (mismatch, _load(c, slots), choice, slots))
        return choice

    def _scan(
        self, need: _Need, region: str | None, tried: set[str], excluded: set[str]
    ) -> str | None:
        """pick_node over every candidate, with this round's picks; its slots go down."""
        workload_class, min_tier, ram_mb, vram_mb = need
        choice = pick_node(
            workload_class=workload_class,
            min_tier=min_tier,
            region=region,
            candidates=self._roster.candidates,
            free={c.node_id: self.slots(c.node_id) for c in self._roster.candidates},
            tried=tried,
            excluded=excluded,
            ram_mb=ram_mb,
            vram_mb=vram_mb,
        )
        if choice is not None:
            self._used[choice] = self._used.get(choice, 0) + 1  # its heap entries are now stale
        return choice

    def _start_heap(self, group: _Group) -> list[_Entry]:
        """The group's heap at the start of the round.

        Few nodes with leases: a copy of the idle heap (their entries get corrected as
        they come up). Many: weigh every node now, rather than correct most entries.
        """
        if len(self._used) * 8 < len(self._cands):
            return self._roster.idle_heap(group)
        need, region = group
        heap: list[_Entry] = []
        for c in self._roster.candidates:
            slots = self.slots(c.node_id)
            if slots > 0 and _eligible(c, need):
                mismatch = region is not None and c.region != region
                heap.append((mismatch, _load(c, slots), c.node_id, slots))
        heapq.heapify(heap)
        return heap

    def _pick_tried(
        self, need: _Need, region: str | None, tried: set[str], excluded: set[str]
    ) -> str | None:
        """The best of the nodes that tried the task, when no other node could take it at
        all (free or busy; else the task waits for one, see pick_node); its slots go down."""
        if not tried or self._roster.serves(need, barred=tried | excluded):
            return None
        choice = self._best_tried(need, region, tried, excluded)
        if choice is not None:
            self._used[choice] = self._used.get(choice, 0) + 1  # its entry is now stale
        return choice

    def _best_tried(
        self, need: _Need, region: str | None, tried: set[str], excluded: set[str]
    ) -> str | None:
        best: tuple[bool, float, str] | None = None
        for node_id in tried - excluded:
            c = self._cands.get(node_id)
            if c is None:
                continue
            slots = self.slots(node_id)
            if slots <= 0 or not _eligible(c, need):
                continue
            key = (region is not None and c.region != region, _load(c, slots), node_id)
            if best is None or key < best:
                best = key
        return None if best is None else best[2]


def excluded_nodes(
    policy: RetryPolicy, task_id: str, failures: Iterable[tuple[str, str]]
) -> frozenset[str]:
    """Nodes that may not take *task_id* under *policy*; pure, so it is tested directly.

    *failures* are the ``(task_id, node_id)`` failed leases of the task's whole job: a
    node is excluded if it failed this task, or failed enough of the job's tasks.
    """
    return frozenset(
        node_id
        for node_id, tasks in _failed_per_node(failures).items()
        if task_id in tasks or len(tasks) >= policy.max_node_failures_per_job
    )


def _failed_per_node(failures: Iterable[tuple[str, str]]) -> dict[str, set[str]]:
    """node_id -> the tasks of the job it failed, from ``(task_id, node_id)`` pairs."""
    per_node: dict[str, set[str]] = {}
    for failed_task, node_id in failures:
        per_node.setdefault(node_id, set()).add(failed_task)
    return per_node


# --- transactions -------------------------------------------------------------------------------


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
        task.status, task.reason = m.CANCELLED, f"job failed: {reason}"
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
        able = {c.node_id for c in candidates if c.capacity > 0 and _eligible(c, need)}
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
            if any(able - excluded_nodes(policy, t, failures) for t in waiting):
                continue  # some task may go to one of them: it waits its turn
            reason = (
                f"{waited}: every node seen in that time that offers {needs} has failed this "
                "job's tasks, and the retry rules keep them from it; submit it again"
            )
        fail_job(session, job_id, reason, now)
        failed.append((job_id, reason))
    return failed


async def fail_stalled_jobs(coord: Coordinator, scheduler: Scheduler) -> int:
    """``fail_stalled_tx`` with the coordinator's ``queue_timeout`` (0: never), over the
    nodes online or seen within it; how many."""
    timeout = coord.config.queue_timeout
    if not timeout:
        return 0
    now = coord.now()
    stalled = functools.partial(
        fail_stalled_tx, now=now, timeout=timeout, candidates=scheduler.seen_since(now - timeout)
    )
    failed = await coord.db.run(stalled)
    for job_id, reason in failed:
        log.info("job.failed", extra={"job_id": job_id, "reason": reason})
    return len(failed)


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
    for task, job, wclass, choice in placed:
        if job.job_id in broken:
            continue
        deadline = now + lease_seconds
        task.status, task.node_id, task.attempts = m.LEASED, choice, task.attempts + 1
        task.leased_at, task.lease_deadline = now, deadline  # reason: why it was re-queued
        session.add(
            m.TaskAttempt(
                task_id=task.task_id, attempt=task.attempts, node_id=choice,
                leased_at=now, deadline=deadline,
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
            for node_id, tasks in _failed_per_node(failed).items()
            if len(tasks) >= policy.max_node_failures_per_job
        }
        if barred and not picker.any_free_outside(classes[job_id], barred):
            blocked.add(job_id)
    return blocked


def _queued_page(
    session: Session,
    offers: Mapping[str, Sequence[_Offer]],
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


def _any_queued(session: Session) -> bool:
    return (
        session.scalar(select(m.Task.task_id).where(m.Task.status == m.QUEUED).limit(1)) is not None
    )


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


# --- the loop -----------------------------------------------------------------------------------


class Scheduler:
    """The background adapter around the transactions above."""

    def __init__(self, coord: Coordinator) -> None:
        self.coord = coord
        self._next_offline_check = float("-inf")
        # Leases and training rounds whose deadline passed while the coordinator was down
        # wait this long after its start: their nodes link again (their backoff is at most
        # 60 s) and deliver what they finished meanwhile, rather than have it refused as
        # the task failed, and the attempt counted against them. Deadlines that pass once
        # it runs are kept as they come.
        self._started, self._started_at = coord.monotonic(), coord.now()
        self._cursor = QueueCursor()  # where the next round reads the queue from
        self._grace = min(coord.config.offline_after, START_GRACE_S)
        # node_id -> (the NodeInfo it was built from, its Candidate): a round with 10,000
        # links rebuilds only the candidates whose registration changed.
        self._cands: dict[str, tuple[NodeInfo, Candidate]] = {}
        # The last candidate list and the coordinator's roster_version it was built at.
        self._roster: tuple[int, Roster] = (-1, Roster(()))

    def roster(self) -> Roster:
        """Linked, online, not unstaking nodes; rebuilt only when the roster changed."""
        version = self.coord.roster_version
        if self._roster[0] != version:
            self._roster = (version, Roster(self._build_candidates()))
        return self._roster[1]

    def candidates(self) -> list[Candidate]:
        return self.roster().candidates

    def seen_since(self, since: float) -> list[Candidate]:
        """The candidates, and the registered nodes not unstaking that were seen since
        *since* (a node reconnecting right now is not online, yet may take work soon)."""
        coord = self.coord
        out = {c.node_id: c for c in self.candidates()}
        for node_id, rt in coord.runtime.items():
            info = coord.nodes.get(node_id)
            if (
                node_id not in out
                and info is not None
                and info.unstaking_until is None
                and (rt.last_seen or 0.0) >= since
            ):
                out[node_id] = _candidate(node_id, info)
        return list(out.values())

    def _build_candidates(self) -> list[Candidate]:
        coord = self.coord
        nodes, runtime, cache = coord.nodes, coord.runtime, self._cands
        out = []
        for node_id, link in list(coord.links.items()):
            info = nodes.get(node_id)
            if info is None or info.unstaking_until is not None or link.draining:
                continue
            rt = runtime.get(node_id)
            if rt is None or not rt.online:  # is_online, inlined: the link is there
                continue
            cached = cache.get(node_id)
            if cached is None or cached[0] is not info:
                cache[node_id] = cached = (info, _candidate(node_id, info))
            out.append(cached[1])
        if len(cache) > 2 * len(out) + 1024:  # nodes gone for good leave no entry behind
            self._cands = {c.node_id: cache[c.node_id] for c in out}
        return out

    async def run(self) -> None:
        event = self.coord.wake_event()
        cfg = self.coord.config
        gap = min(cfg.round_gap, cfg.schedule_interval)
        loop = asyncio.get_running_loop()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), cfg.schedule_interval)
            event.clear()
            started = loop.time()
            try:
                await self.tick()
            except Exception:  # the loop must survive; the failure is logged with its trace
                log.exception("scheduler.error")
            # Wake-ups during the rest are served together by the next round. A round that
            # took d seconds (10,000 candidates to weigh) rests ROUND_REST * d (at most
            # schedule_interval), so rounds take a bounded share of the event loop and
            # of the database thread.
            took = loop.time() - started
            rest = min(ROUND_REST * took, cfg.schedule_interval)
            await asyncio.sleep(max(gap - took, rest, 0.0))

    async def tick(self) -> None:
        """One round: offline check, lease expiry, then assignment and dispatch."""
        coord, cfg = self.coord, self.coord.config
        now, mono = coord.now(), coord.monotonic()
        if mono >= self._next_offline_check:
            self._next_offline_check = mono + cfg.heartbeat_interval / 2
            await self.check_offline(now)
        # One transaction for the round's housekeeping: expired leases, ai.training rounds
        # past their deadline (in the grace after start, only deadlines passed since), and
        # whether anything is queued at all.
        after = None if mono - self._started >= self._grace else self._started_at

        def housekeeping(s: Session) -> tuple[list[Lost], list[rounds.RoundClose], bool]:
            return (
                expire_tx(s, now=now, max_attempts=cfg.max_attempts, passed_after=after),
                rounds.deadline_tx(s, now=now, passed_after=after),
                _any_queued(s),
            )

        lost, closes, queued = await coord.db.run(housekeeping)
        self._report_lost(lost, "task.lease_expired")
        rounds.report_closes(coord, closes)  # ai.training: drop slices late for their round
        if not queued:
            return  # nothing to place: skip building a candidate per link (10,000 of them)
        roster = self.roster()
        if not roster.candidates:
            return
        withdrawn: list[tuple[str, str]] = []
        assigned = await coord.db.run(
            lambda s: assign_tx(
                s,
                roster,
                now=now,
                lease_seconds=cfg.lease_seconds,
                withdrawn=withdrawn,
                cursor=self._cursor,
            )
        )
        cancel_leases(coord, withdrawn, "job failed")
        if assigned:  # sealed and sent in the background: a slow node holds up no round
            coord.granted((a.node_id, a.task_id) for a in assigned)
            coord.spawn(self.dispatch_all(assigned), "dispatch")

    async def check_offline(self, now: float) -> None:
        coord = self.coord
        limit = coord.config.offline_after
        mono = coord.monotonic()  # silence is measured on the clock that never jumps
        # One pass over every registered node (10,000 of them) in a comprehension; the
        # loop below sees only the few that went silent.
        silent_nodes = [
            (node_id, rt)
            for node_id, rt in coord.runtime.items()
            if rt.online and rt.beat is not None and mono - rt.beat > limit
        ]
        for node_id, rt in silent_nodes:
            if not rt.online or rt.beat is None or mono - rt.beat <= limit:
                continue  # it came back while an earlier one was being handled
            rt.online = False
            coord.roster_changed()
            silent = mono - rt.beat
            log.warning("node.offline", extra={"node_id": node_id, "silent_s": round(silent, 1)})
            link = coord.links.get(node_id)
            if link is not None:
                coord.spawn(link.close(4005, f"offline: no heartbeat for {silent:.0f} s"), "close")
            detail = f"node {node_id} went offline (no heartbeat for {silent:.0f} s)"
            max_attempts = coord.config.max_attempts
            try:
                lost = await coord.db.run(
                    functools.partial(
                        node_lost_tx,
                        node_id=node_id,
                        detail=detail,
                        now=now,
                        max_attempts=max_attempts,
                    )
                )
            except BaseException:
                # Its leases were not re-queued: online again, it is found silent (and its
                # leases re-queued) at a later tick, instead of never.
                rt.online = True
                raise
            self._report_lost(lost, "task.requeued")

    def _report_lost(self, lost: Sequence[Lost], event: str) -> None:
        report_lost(self.coord, lost, event)

    async def dispatch(self, a: Assignment) -> None:
        await self.dispatch_all([a])

    async def dispatch_all(self, assigned: Sequence[Assignment]) -> None:
        """Seal a round's payloads in one worker-thread call, then send them concurrently."""
        coord = self.coord
        try:
            jobs = [(a, coord.nodes[a.node_id].public_key) for a in assigned]
            sealed = await asyncio.to_thread(_seal_all, jobs)
            # While sealing ran, a lease may have ended (its job failed, say) and its cancel
            # gone out: a dispatch sent after it would run a withdrawn task. Send only live
            # leases, and start their sends before this step ends, so a later cancel follows.
            live = await coord.db.run(functools.partial(_live_leases, assigned=assigned))
        except asyncio.CancelledError:  # the coordinator is stopping: nothing was sent
            await asyncio.shield(_undo(coord, list(assigned)))
            raise
        except Exception:  # a bug, or the database: nothing was sent
            # Left leased, the round's tasks would wait for their leases to end and count
            # as the nodes' failures (an expired lease spends an attempt).
            log.exception("dispatch.failed", extra={"tasks": len(assigned)})
            await _undo(coord, list(assigned))
            return
        # A lease that ended after that read, with its cancel already on its way (its send
        # started before the ones below would), is not sent either: it would overtake it.
        keep = [
            i
            for i, a in enumerate(assigned)
            if (a.task_id, a.node_id, a.attempt) in live
            and (a.node_id, a.task_id) not in coord.withdrawn
        ]
        # A node that unstaked meanwhile (its cooldown recorded after this round read the
        # roster) would refuse the dispatch, and its signed refusal would spend an attempt:
        # undo its leases here instead, for free, checked in the same step as the sends start.
        unstaked: list[Assignment] = []
        staying: list[int] = []
        for i in keep:
            a = assigned[i]
            if coord.nodes[a.node_id].unstaking_until is None:
                staying.append(i)
            else:
                unstaked.append(a)
        assigned, sealed = [assigned[i] for i in staying], [sealed[i] for i in staying]
        frames = [
            messages.Dispatch(
                task_id=uuid.UUID(a.task_id),
                job_id=uuid.UUID(a.job_id),
                workload_class=a.workload_class,
                lease_expires_at=int(a.deadline),
                envelope=env,
                slice_index=a.slice_index,
                slice_count=a.slice_count,
                resources=a.resources,
            ).to_wire(raw=True)  # the link encodes the envelope: binary, or base64 for old nodes
            for a, env in zip(assigned, sealed, strict=True)
        ]
        sends = [
            asyncio.ensure_future(coord.send_to(a.node_id, f))
            for a, f in zip(assigned, frames, strict=True)
        ]
        try:
            sent = await asyncio.gather(*sends)
        except asyncio.CancelledError:  # stopping mid-send: undo what did not leave
            left = [
                a
                for a, s in zip(assigned, sends, strict=True)
                if not (s.done() and not s.cancelled() and s.exception() is None and s.result())
            ]
            await asyncio.shield(_undo(coord, [*unstaked, *left]))
            raise
        undelivered: list[Assignment] = list(unstaked)
        for a, ok in zip(assigned, sent, strict=True):
            if ok:
                log.info(
                    "task.dispatched",
                    extra={"task_id": a.task_id, "node_id": a.node_id, "attempt": a.attempt},
                )
            else:
                undelivered.append(a)
        if undelivered:
            await _undo(coord, undelivered)


async def _undo(coord: Coordinator, undelivered: Sequence[Assignment]) -> None:
    """Undo leases whose dispatch never left, without spending their attempts."""
    now = coord.now()

    def undo(s: Session) -> None:
        for a in undelivered:
            undeliverable_tx(s, a.task_id, a.node_id, now, attempt=a.attempt)

    await coord.db.run(undo)
    for a in undelivered:
        log.info("task.undeliverable", extra={"task_id": a.task_id, "node_id": a.node_id})
    coord.wake()


def _live_leases(session: Session, assigned: Sequence[Assignment]) -> set[tuple[str, str, int]]:
    """(task_id, node_id, attempt) of the assignments whose lease still stands."""
    rows = session.execute(
        select(m.Task.task_id, m.Task.node_id, m.Task.attempts).where(
            m.Task.task_id.in_([a.task_id for a in assigned]), m.Task.status == m.LEASED
        )
    )
    return {(t, n, k) for t, n, k in rows if n is not None}


def _seal_all(jobs: Sequence[tuple[Assignment, RSAPublicKey]]) -> list[bytes]:
    """Seal each assignment's payload to its node (2.3.4), the lease deadline as expiry."""
    return [
        envelope.seal(
            a.payload,
            public_key=key,
            task_id=uuid.UUID(a.task_id),
            node_id=a.node_id,
            expires_at=int(a.deadline),
        )
        for a, key in jobs
    ]


def report_lost(
    coord: Coordinator, lost: Sequence[Lost], event: str, *, tell_holder: bool = True
) -> None:
    """Log leases that ended without a result (*event*, or ``task.failed``), tell their
    nodes (unless *tell_holder* is False: they hold nothing) and those of a job that
    failed with them, and wake the scheduler."""
    for item in lost:
        log.info(
            "task.failed" if item.failed else event,
            extra={"task_id": item.task_id, "node_id": item.node_id},
        )
        if tell_holder and item.node_id is not None:
            coord.send_cancel(item.node_id, item.task_id, "lease ended")
        cancel_leases(coord, item.cancel, "job failed")
        report_job_end(item)
    if lost:
        coord.wake()


def cancel_leases(coord: Coordinator, leases: Iterable[tuple[str, str]], reason: str) -> None:
    """Tell nodes to drop tasks they no longer hold (best effort: the lease is gone anyway).

    Sent in the background, so that a node that does not read holds up nobody else.
    """
    for node_id, task_id in leases:
        coord.send_cancel(node_id, task_id, reason)
