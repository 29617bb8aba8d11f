"""Scheduling and leases: match queued tasks to nodes, seal, dispatch, expire, re-queue.

Rules (docs: "Scheduling and leases"):

- A node is eligible when it is linked and online, not UNSTAKING (2.3.8: "no new
  dispatches"), lists the job's workload class, has ``hardware_tier >= min_tier``, can
  hold the job's declared ``resources`` in a slot (RAM and GPU memory, from its manifest:
  ``tier.slot_memory_mb``), and has free capacity (``max_parallel_subtasks`` minus tasks
  leased to it). The dispatch carries the resources, and the node checks them itself.
- Among eligible nodes, prefer one that has not tried this task before, then one in
  the job's region (falling back to any region), then the least loaded, then the one
  leased a task least recently (idle nodes take turns), then the lowest node_id.
- Each dispatch is a lease with a deadline (``lease_seconds``); the payload is sealed
  to the node's ``pubkey_rsa`` with the deadline as envelope expiry (2.3.4).
- A missed deadline, a node gone offline or a node's signed reject re-queues the task;
  after ``max_attempts`` leases it fails, and so does its job, with the reason.
- Classes with a :class:`~nodeclient.coordinator.leases.RetryPolicy` (``media.render``)
  retry strictly: a failed slice goes only to a node that has not failed it; it fails
  hard once ``max_failed_nodes`` different nodes have failed it (``max_attempts`` does
  not apply); and a node that has failed ``max_node_failures_per_job`` slices of one job
  gets no more slices of it. A slice that no eligible node may take waits in the queue
  for a new node. The node's reject reason (crash, out of memory, timeout) is kept in
  the task's reason.

Selection is a pure function (:func:`~nodeclient.coordinator.selection.pick_node`); the
database work is a few transactions; the loop around them is the adapter, woken on
events and at least every ``schedule_interval`` seconds. A round places up to ``BATCH``
tasks with :class:`~nodeclient.coordinator.selection.Picker`, which makes the same
choice from one heap per (workload class, min tier, region, resources) instead of a
scan of every node per task.

The pieces: node choice in :mod:`nodeclient.coordinator.selection`, reading the queue and
leasing in :mod:`nodeclient.coordinator.placement`, how leases end in
:mod:`nodeclient.coordinator.leases`; this module is the loop, and the sealing and
sending of the dispatches.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import uuid
from collections.abc import Iterable, Sequence

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from sqlalchemy import select
from sqlalchemy.orm import Session

from nodeclient.coordinator import models as m
from nodeclient.coordinator import rounds
from nodeclient.coordinator.leases import (
    Lost,
    expire_tx,
    fail_stalled_tx,
    node_lost_tx,
    report_job_end,
    shift_times_tx,
    undeliverable_tx,
)
from nodeclient.coordinator.placement import Assignment, QueueCursor, any_queued, assign_tx
from nodeclient.coordinator.selection import Candidate, LeaseOrder, Roster, to_candidate
from nodeclient.coordinator.service import Coordinator
from nodeclient.coordinator.store import NodeInfo, is_unavailable
from nodeclient.errors import is_disk_full
from nodeclient.protocol import envelope, messages

log = logging.getLogger("nodeclient.coordinator.scheduler")
ROUND_REST = 3.0  # a round that took d seconds is followed by at least this many d of rest
START_GRACE_S = 90.0  # after a start, before deadlines that passed meanwhile are enforced
_JUST_PAST = 0.001  # seconds past a node's offline_after at which its check is due
OUTAGE_LOG_INTERVAL_S = 60.0  # while the database fails every round: a reminder at most this often


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


# --- the loop -----------------------------------------------------------------------------------


class Scheduler:
    """The background adapter around the transactions of placement and leases."""

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
        # When each node was last leased a task, for the round-robin among equally loaded
        # nodes: every Roster shares it, so it outlives their rebuilds. In memory only:
        # after a restart every node starts again as never leased.
        self._recency = LeaseOrder()
        # The last candidate list and the coordinator's roster_version it was built at.
        self._roster: tuple[int, Roster] = (-1, Roster((), recency=self._recency))
        # While the database fails every round: (when it began, rounds failed, when last
        # logged), on the monotonic clock; None while it answers.
        self._outage: tuple[float, int, float] | None = None
        # A wall-clock step seen but not yet applied to the stored times (its transaction
        # failed): applied, with any later step, by the next round.
        self._unapplied_step = 0.0

    def roster(self) -> Roster:
        """Linked, online, not unstaking nodes; rebuilt only when the roster changed."""
        version = self.coord.roster_version
        if self._roster[0] != version:
            candidates = self._build_candidates()
            if len(self._recency.last) > 2 * len(candidates) + 1024:  # nodes gone for good
                self._recency.keep_only(c.node_id for c in candidates)
            self._roster = (version, Roster(candidates, recency=self._recency))
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
                and rt.state != "UNSTAKING"
                and (rt.last_seen or 0.0) >= since
            ):
                out[node_id] = to_candidate(node_id, info)
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
            if rt.state == "UNSTAKING":  # by its own heartbeats, whatever is on record here
                continue
            cached = cache.get(node_id)
            if cached is None or cached[0] is not info:
                cache[node_id] = cached = (info, to_candidate(node_id, info))
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
                # Not wait_for: on 3.11 it drops a cancel (the server's stop) that arrives
                # as the event is set, and the loop would run on.
                async with asyncio.timeout(cfg.schedule_interval):
                    await event.wait()
            event.clear()
            started = loop.time()
            await self.run_round()
            # Wake-ups during the rest are served together by the next round. A round that
            # took d seconds (10,000 candidates to weigh) rests ROUND_REST * d (at most
            # schedule_interval), so rounds take a bounded share of the event loop and
            # of the database thread.
            took = loop.time() - started
            rest = min(ROUND_REST * took, cfg.schedule_interval)
            await asyncio.sleep(max(gap - took, rest, 0.0))

    async def run_round(self) -> None:
        """One round (:meth:`tick`), whose failure is logged, never raised: the loop must
        survive. A database that cannot be reached (down, restarting) fails every round,
        twice a second: that is one warning as it begins, a reminder with the count at
        most every OUTAGE_LOG_INTERVAL_S, and one line when a round succeeds again, not
        a traceback per round; so is a database whose disk is full (each round's writes
        fail until space is freed), its error saying so. Any other failure is logged with
        its trace."""
        try:
            await self.tick()
        except Exception as exc:
            if not (is_unavailable(exc) or is_disk_full(exc)):  # a bug, or a refused statement
                log.exception("scheduler.error")
                return
            self._database_failed(exc)
        else:
            if self._outage is not None:
                since, failed, _ = self._outage
                self._outage = None
                log.warning(
                    "scheduler.database_back",
                    extra={
                        "failed_rounds": failed,
                        "down_s": round(self.coord.monotonic() - since, 1),
                    },
                )

    def _database_failed(self, exc: BaseException) -> None:
        now = self.coord.monotonic()
        error = str(getattr(exc, "orig", None) or exc)  # the driver's words
        if self._outage is None:
            self._outage = (now, 1, now)
            log.warning("scheduler.database_unavailable", extra={"error": error})
            return
        since, failed, logged = self._outage
        failed += 1
        if now - logged >= OUTAGE_LOG_INTERVAL_S:
            logged = now
            log.warning(
                "scheduler.database_unavailable",
                extra={
                    "failed_rounds": failed,
                    "down_s": round(now - since, 1),
                    "error": error,
                },
            )
        self._outage = (since, failed, logged)

    async def tick(self) -> None:
        """One round: offline check, lease expiry, then assignment and dispatch."""
        coord, cfg = self.coord, self.coord.config
        self._unapplied_step += coord.clock_step()
        if self._unapplied_step:  # leases, rounds and queue times keep their time left (docs)
            await self.shift_times(self._unapplied_step)  # a database failure keeps it
            self._unapplied_step = 0.0
        now, mono = coord.now(), coord.monotonic()
        if mono >= self._next_offline_check:
            self._next_offline_check = mono + cfg.heartbeat_interval / 2  # if it fails
            self._next_offline_check = await self.check_offline(now)
        # One transaction for the round's housekeeping: expired leases, ai.training rounds
        # past their deadline (in the grace after start, only deadlines passed since), and
        # whether anything is queued at all.
        after = None if mono - self._started >= self._grace else self._started_at

        def housekeeping(s: Session) -> tuple[list[Lost], list[rounds.RoundClose], bool]:
            return (
                expire_tx(s, now=now, max_attempts=cfg.max_attempts, passed_after=after),
                rounds.deadline_tx(s, now=now, passed_after=after),
                any_queued(s),
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

    async def shift_times(self, step: float) -> None:
        """The wall clock jumped by *step* seconds (an NTP correction, a VM restored from a
        snapshot): move every stored time still counted against it (lease deadlines,
        training round deadlines, queued tasks' waits) by as much, so that a step forward
        expires no lease at once, and one back holds none longer."""
        moved = await self.coord.db.run(functools.partial(shift_times_tx, by=step))
        self._started_at += step  # the start's grace for deadlines that passed meanwhile
        log.warning("clock.stepped", extra={"step_s": round(step, 3), **moved})

    async def check_offline(self, now: float) -> float:
        """Mark nodes silent for more than ``offline_after`` offline and re-queue their
        leases; return when (monotonic) the next check is due: as the oldest heartbeat
        of an online node passes the limit, and at least every half interval (a node that
        links meanwhile beats later than now, so its limit is never passed before a check
        that sees it). Checked every half interval instead, a silence was found up to half
        an interval late (3.5 missed heartbeats, not 3)."""
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
            detail = f"node {node_id} went offline (no heartbeat for {silent:.0f} s)"
            max_attempts = coord.config.max_attempts
            silent_link = coord.links.get(node_id)  # the one to close: not one made meanwhile
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
            # Its cancels go out before the link is closed, so that a node whose link is
            # still open (silent, not gone) stops the tasks it no longer holds, instead of
            # running them to their end with its slots busy while they count as free here.
            self._report_lost(lost, "task.requeued")
            # Only the silent link: one the node made while the leases were written is up
            # and authenticated (it replaced this one), and is left alone.
            if silent_link is not None and coord.links.get(node_id) is silent_link:
                reason = f"offline: no heartbeat for {silent:.0f} s"
                coord.spawn(silent_link.close(4005, reason), "close")
        oldest = min(
            (rt.beat for rt in coord.runtime.values() if rt.online and rt.beat is not None),
            default=math.inf,
        )
        # Just past the limit: a node is offline once its silence is more than offline_after.
        return min(mono + coord.config.heartbeat_interval / 2, oldest + limit + _JUST_PAST)

    def _report_lost(self, lost: Sequence[Lost], event: str) -> None:
        report_lost(self.coord, lost, event)

    async def dispatch(self, a: Assignment) -> None:
        await self.dispatch_all([a])

    async def dispatch_all(self, assigned: Sequence[Assignment]) -> None:
        """Seal a round's payloads in one worker-thread call, then send them concurrently."""
        coord = self.coord
        try:
            jobs = [(a, coord.nodes[a.node_id].public_key) for a in assigned]
            sealed = await coord.in_node_cpu(_seal_all, jobs)
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
        sent_at = coord.now()  # lease_expires_at is read against it
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
                sent_at=sent_at,
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
