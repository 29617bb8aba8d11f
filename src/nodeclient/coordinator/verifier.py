"""Result and reject verification (2.3.6 Proof-of-Execution, 2.3.7 Signed Return).

A result is accepted only if all of these hold, checked in this order:

1. the Result message names the link's node, and its EIP-712 signature recovers to
   that node_id (node.key; not the liveness key) -- else an ``error`` frame
   ``bad_signature`` and nothing changes;
2. ``result_size`` is the length of the delivered bytes and ``proof`` equals
   SHA-256(task_id || result || node_id), recomputed here;
3. the task exists, belongs to ``job_id``, and is or was leased to this node;
4. the bytes are a well-formed result of the job's workload class, and for a sliced
   class the very slice that the task asked for (its frames, its rows).

Then, exactly once: the first valid result is stored with its proof, signature and the
signed message, and acknowledged ``accepted``; the same result again is ``duplicate``;
a *different* signed result for the same task from the same node is equivocation,
recorded as evidence and ``rejected``. A result for a task that another node has
completed meanwhile is ``rejected`` with that reason. When every task of a job has
succeeded, the job's result is assembled and the job succeeds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from nodeclient.coordinator import classes, rounds, store
from nodeclient.coordinator import models as m
from nodeclient.coordinator.leases import Lost, close_attempt, requeue_or_fail
from nodeclient.errors import ProtocolError, SignatureError
from nodeclient.protocol import eip712
from nodeclient.protocol.messages import DRAINING_PREFIX, MAX_REASON, SignedFrame
from nodeclient.protocol.proof import proof_of_execution
from nodeclient.protocol.secp import parse_address, to_checksum_address

log = logging.getLogger("nodeclient.coordinator.verifier")


@dataclass(frozen=True, slots=True)
class ResultClaim:
    """A result frame whose signature is verified; its proof is not yet checked."""

    task_id: uuid.UUID
    job_id: uuid.UUID
    node_id: str
    proof: bytes
    result_size: int
    result: bytes
    signature: bytes
    message: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Decision:
    """What to answer (ResultAck status and reason) and what else to do."""

    status: str  # accepted | duplicate | rejected
    reason: str = ""
    event: str = ""
    job_done: str | None = None  # the job's final status, when this ended it
    cancel: tuple[tuple[str, str], ...] = ()
    lost: Lost | None = None  # the lease this ended (a result its class's checks refused)


def _signer_is(frame: SignedFrame, node_id: str, *, chain_id: int) -> None:
    """Fail closed unless the message names *node_id* and is signed by it (node.key)."""
    named = to_checksum_address(parse_address(frame.message["node_id"], field="node_id"))
    if named != node_id:
        raise SignatureError(f"{frame.primary_type} names node {named}, but this link is {node_id}")
    eip712.verify_typed(
        frame.primary_type, frame.message, frame.signature, signer=node_id, chain_id=chain_id
    )


def check_result_frame(frame: SignedFrame, *, node_id: str, chain_id: int) -> ResultClaim:
    """Step 1: signature by the link's node. Raises SignatureError."""
    _signer_is(frame, node_id, chain_id=chain_id)
    msg = frame.message
    return ResultClaim(
        task_id=uuid.UUID(bytes=msg["task_id"]),
        job_id=uuid.UUID(bytes=msg["job_id"]),
        node_id=node_id,
        proof=msg["proof"],
        result_size=msg["result_size"],
        result=frame.extra["result"],
        signature=frame.signature,
        message=msg,
    )


def check_reject_frame(frame: SignedFrame, *, node_id: str, chain_id: int) -> uuid.UUID:
    """A Reject must be signed by the link's node (node.key). Raises SignatureError."""
    _signer_is(frame, node_id, chain_id=chain_id)
    return uuid.UUID(bytes=frame.message["task_id"])


def check_proof(claim: ResultClaim) -> str | None:
    """Step 2, CPU-bound (runs off the event loop): None, or why the proof fails."""
    if claim.result_size != len(claim.result):
        return f"result_size {claim.result_size} does not match the {len(claim.result)} bytes sent"
    expected = proof_of_execution(task_id=claim.task_id, result=claim.result, node_id=claim.node_id)
    if expected != claim.proof:
        return (
            f"proof mismatch: SHA-256(task_id || result || node_id) is 0x{expected.hex()}, "
            f"the signed proof is 0x{claim.proof.hex()}"
        )
    return None


# How a node answers a lease itself: a signed reject or a result its class refused
# ("rejected"), a hand-back ("returned"). After that no result of the lease is taken: a
# second answer contradicts the first. A lease that ended otherwise (it ran out, the node
# went offline or lost its link, the coordinator cancelled it) may still be answered by
# a late result, which the task's status then decides on.
ANSWERED_OUTCOMES: Final = ("rejected", "returned")


def _delivery_refusal(session: Session, task: m.Task, node_id: str) -> str | None:
    """None if *node_id* may deliver a result of *task*: it holds the task, or its latest
    lease of it ended without its own answer (ANSWERED_OUTCOMES); otherwise why not."""
    if task.status == m.LEASED and task.node_id == node_id:
        return None
    latest = _latest_attempt(session, task.task_id, node_id)
    if latest is None:
        return f"task {task.task_id} was never leased to this node"
    if latest.outcome in ANSWERED_OUTCOMES:
        return (
            f"task {task.task_id}: this node's lease of it ended {latest.outcome} (a signed "
            "reject, a result refused, or a hand-back), so no later result of it is taken"
        )
    return None


def _latest_attempt(session: Session, task_id: str, node_id: str) -> m.TaskAttempt | None:
    """The node's latest lease of the task."""
    return session.scalars(
        select(m.TaskAttempt)
        .where(m.TaskAttempt.task_id == task_id, m.TaskAttempt.node_id == node_id)
        .order_by(m.TaskAttempt.attempt.desc(), m.TaskAttempt.id.desc())
        .limit(1)
    ).first()


def contradiction_tx(session: Session, claim: ResultClaim, problem: str, *, now: float) -> Decision:
    """A signed result whose bytes fail the proof check (*problem*): rejected, and, when
    its node already has an accepted result for the task with another proof, recorded as
    equivocation. The signed Result alone is the evidence (the table keeps no bytes), so a
    node cannot sign contradictions freely by sending them with bytes that do not match."""
    task = session.get(m.Task, str(claim.task_id))
    if (
        task is None
        or task.status != m.SUCCEEDED
        or task.node_id != claim.node_id
        or task.proof == "0x" + claim.proof.hex()
    ):
        return Decision("rejected", problem, event="result.rejected")
    return _equivocation(session, task, claim, now)


def _equivocation(session: Session, task: m.Task, claim: ResultClaim, now: float) -> Decision:
    """*claim*, signed by the node whose result with another proof was accepted for
    *task*: rejected, and stored as evidence (once per task and node)."""
    tid, proof_hex = task.task_id, "0x" + claim.proof.hex()
    reason = (
        f"equivocation: a different result (proof {proof_hex}) for task {tid}, whose "
        f"accepted result has proof {task.proof}"
    )
    if _equivocation_recorded(session, tid, claim.node_id):
        # One signed contradiction is the evidence; more add rows without end (a
        # node may sign any number of them), so they are answered, not stored.
        return Decision("rejected", reason)
    session.add(
        m.Equivocation(
            task_id=tid,
            node_id=claim.node_id,
            accepted_proof=task.proof or "",
            accepted_message=task.message,
            accepted_signature=task.signature,
            conflicting_proof=proof_hex,
            conflicting_signature="0x" + claim.signature.hex(),
            conflicting_message=json.dumps(eip712.message_to_json("Result", claim.message)),
            recorded_at=now,
        )
    )
    return Decision("rejected", reason, event="result.equivocation")


def _equivocation_recorded(session: Session, task_id: str, node_id: str) -> bool:
    found = session.scalar(
        select(m.Equivocation.id)
        .where(m.Equivocation.task_id == task_id, m.Equivocation.node_id == node_id)
        .limit(1)
    )
    return found is not None


def _sent_lease(session: Session, task_id: str, node_id: str) -> int | None:
    """The lease_expires_at the node's open attempt of the task was dispatched with (the
    attempt keeps it when a clock step moves the task's lease_deadline)."""
    deadline = session.scalar(
        select(m.TaskAttempt.deadline)
        .where(
            m.TaskAttempt.task_id == task_id,
            m.TaskAttempt.node_id == node_id,
            m.TaskAttempt.ended_at.is_(None),
        )
        .order_by(m.TaskAttempt.attempt.desc())
        .limit(1)
    )
    return None if deadline is None else int(deadline)


def _settle_attempt(session: Session, task_id: str, node_id: str, now: float) -> None:
    """The node's lease of the task ends in success: its open attempt, or, for a late
    result, its last one, which its lease's end closed as a failure (expired, offline).
    Left a failure, it would count against the node (a render job shuts out a node after
    three failed slices) although the node delivered."""
    if close_attempt(session, task_id, node_id, "succeeded", now):
        return
    row = session.scalars(  # a late result: the lease it comes from ended before it
        select(m.TaskAttempt)
        .where(
            m.TaskAttempt.task_id == task_id,
            m.TaskAttempt.node_id == node_id,
            m.TaskAttempt.outcome.not_in(("undelivered", *ANSWERED_OUTCOMES)),
        )
        .order_by(m.TaskAttempt.attempt.desc(), m.TaskAttempt.id.desc())
    ).first()
    if row is not None:
        row.outcome = "succeeded"


def _finish_job(session: Session, job: m.Job, now: float) -> str | None:
    if rounds.is_round_based(job.workload_class):  # ai.training: close the round, maybe more
        return rounds.finish_round_tx(session, job, now)
    tasks = session.scalars(
        select(m.Task).where(m.Task.job_id == job.job_id).order_by(m.Task.slice_index)
    ).all()
    if any(t.status != m.SUCCEEDED for t in tasks):
        return None
    wclass = classes.lookup(job.workload_class)
    try:
        result = wclass.assemble([t.result or b"" for t in tasks], json.loads(job.meta))
    except ProtocolError as exc:
        store.end_job(session, job, m.FAILED, now, f"assembly failed: {exc}")
        return m.FAILED
    except Exception as exc:  # a bug, or MemoryError: the job fails, the link and result stay
        # Raised, it would roll the acceptance back and drop the link, and the node's
        # re-sent result would meet the same end until the task ran out of attempts.
        log.exception("job.assembly_error", extra={"job_id": job.job_id})
        why = f"assembly failed: internal error ({type(exc).__name__})"
        store.end_job(session, job, m.FAILED, now, why)
        return m.FAILED
    job.result, job.result_sha256 = result, hashlib.sha256(result).hexdigest()
    store.end_job(session, job, m.SUCCEEDED, now, None)
    return m.SUCCEEDED


def _leased_manifest(session: Session, task_id: str, node_id: str) -> str | None:
    """The manifest *node_id* had when it was last leased *task_id*."""
    return session.scalar(
        select(m.TaskAttempt.manifest_hash)
        .where(m.TaskAttempt.task_id == task_id, m.TaskAttempt.node_id == node_id)
        .order_by(m.TaskAttempt.attempt.desc())
        .limit(1)
    )


def accept_result_tx(  # noqa: PLR0911 (one early answer per check)
    session: Session, claim: ResultClaim, *, now: float, max_payload: int, max_attempts: int
) -> Decision:
    """Steps 3-4 and the exactly-once bookkeeping, in one transaction.

    A result its class refuses (a blank frame, another slice's rows, a pseudo-gradient of
    other weights) is the holder's answer, and a wrong one: its lease ends there and the
    task goes to another node (an attempt spent, as a reject), rather than waiting out a
    lease that may last an hour (a render slice's) or the round (a training slice's)."""
    tid = str(claim.task_id)
    task = session.get(m.Task, tid)
    if task is None:
        return Decision("rejected", f"unknown task {tid}")
    proof_hex = "0x" + claim.proof.hex()
    if task.status == m.SUCCEEDED and task.node_id == claim.node_id and task.proof != proof_hex:
        # The task_id alone names the task: another result signed for it, whatever job_id
        # that message names, is a contradiction.
        return _equivocation(session, task, claim, now)
    if task.job_id != str(claim.job_id):
        return Decision("rejected", f"task {tid} does not belong to job {claim.job_id}")
    if task.status == m.SUCCEEDED:
        if task.node_id != claim.node_id:
            return Decision("rejected", f"task {tid} is no longer leased to this node: "
                            f"it was re-queued and completed by {task.node_id}")  # fmt: skip
        if task.proof == proof_hex:
            return Decision("duplicate", "this result was already accepted")
        return _equivocation(session, task, claim, now)
    refusal = _delivery_refusal(session, task, claim.node_id)
    if refusal is not None:
        return Decision("rejected", refusal)
    if task.status in (m.FAILED, m.CANCELLED):
        return Decision("rejected", f"task {tid} is {task.status}: {task.reason}")
    job = session.get_one(m.Job, task.job_id)
    refused = _check(
        session, task, job, claim, now=now, max_payload=max_payload, max_attempts=max_attempts
    )
    if refused is not None:
        return refused
    cancel: tuple[tuple[str, str], ...] = ()
    if task.status == m.LEASED and task.node_id not in (None, claim.node_id):
        # A late result from an earlier lease wins; the current holder is told to stop.
        close_attempt(session, tid, task.node_id, "superseded", now)
        cancel = ((task.node_id, tid),)
    _settle_attempt(session, tid, claim.node_id, now)
    task.manifest_hash = (  # an earlier lease's result: what that node claimed then
        task.manifest_hash
        if claim.node_id == task.node_id
        else _leased_manifest(session, tid, claim.node_id)
    )
    task.status, task.node_id, task.reason = m.SUCCEEDED, claim.node_id, None
    task.result, task.result_size = claim.result, len(claim.result)
    task.result_sha256 = hashlib.sha256(claim.result).hexdigest()
    task.proof, task.signature = proof_hex, "0x" + claim.signature.hex()
    task.message = json.dumps(eip712.message_to_json("Result", claim.message))
    task.completed_at = now
    return Decision(
        "accepted", event="result.accepted", job_done=_finish_job(session, job, now), cancel=cancel
    )


def _check(
    session: Session,
    task: m.Task,
    job: m.Job,
    claim: ResultClaim,
    *,
    now: float,
    max_payload: int,
    max_attempts: int,
) -> Decision | None:
    """The class's checks of the result (format, shape, what the job asked for): None when
    it passes, else the rejection (the task re-queued if this node holds it)."""
    try:
        classes.lookup(job.workload_class).check(
            claim.result, json.loads(job.meta), max_payload, task=lambda: task.payload
        )
    except ProtocolError as exc:
        lost = None
        if task.status == m.LEASED and task.node_id == claim.node_id:
            lost = requeue_or_fail(
                session, task, outcome="rejected", now=now, max_attempts=max_attempts,
                detail=f"node {claim.node_id} returned a result that failed the checks: {exc}",
            )  # fmt: skip
        # Its lease answered (and ended, if it was still the node's): like a signed reject,
        # no later result of that lease is taken, and what it signed is kept.
        _record_answer(
            session, task.task_id, claim.node_id, ("Result", claim.message, claim.signature)
        )
        return Decision("rejected", str(exc), lost=lost)
    except SQLAlchemyError:
        # The database failed under the check (the task's payload read cancelled, the
        # server gone): its transaction is lost and the result unjudged. No answer: the
        # link closes as for any database failure, and the node sends it again.
        raise
    except Exception as exc:  # a check that broke on it: fail closed, keep the link
        log.exception("result.check_failed", extra={"task_id": task.task_id})
        return Decision("rejected", f"the result could not be checked ({type(exc).__name__})")
    return None


def _handed_back_before(session: Session, task: m.Task, node_id: str) -> bool:
    """Whether *node_id* has handed *task* back before (an attempt of outcome returned)."""
    earlier = session.scalar(
        select(m.TaskAttempt.id)
        .where(
            m.TaskAttempt.task_id == task.task_id,
            m.TaskAttempt.node_id == node_id,
            m.TaskAttempt.outcome == "returned",
        )
        .limit(1)
    )
    return earlier is not None


def _record_answer(
    session: Session, task_id: str, node_id: str, answer: tuple[str, Mapping[str, Any], bytes]
) -> None:
    """Keep the node's signed *answer* (its type, a Reject or a refused Result, message
    and signature) on its latest lease of the task, which it ends as answered
    ("rejected", unless it was handed back): a lease that had already ended otherwise (ran
    out, the node went offline) is answered too, and takes no second answer
    (_delivery_refusal)."""
    primary_type, message, signature = answer
    row = _latest_attempt(session, task_id, node_id)
    if row is None:
        return
    if row.outcome not in ANSWERED_OUTCOMES:
        row.outcome = "rejected"
    row.answer_type = primary_type
    row.answer_message = json.dumps(eip712.message_to_json(primary_type, message))
    row.answer_signature = "0x" + signature.hex()


# C0 controls (but tab and newline) and DEL, as \xNN: a node's free text, stored and shown
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F) if c not in (0x09, 0x0A)}


def reject_tx(
    session: Session, task_id: uuid.UUID, node_id: str, reason: str, *, now: float,
    max_attempts: int, lease_expires_at: int | None = None,
    signed: tuple[Mapping[str, Any], bytes] | None = None,
) -> tuple[Decision, Lost | None]:  # fmt: skip
    """A node's signed refusal: re-queue the task elsewhere (the attempt counts).

    *lease_expires_at* is the refused dispatch's, echoed by the node (None from an older
    node). A task can be leased to the same node again once a lease ends; a reject of the
    earlier lease that arrives late (or is sent again) must not end the new one, so one
    whose echo is not the current lease's leaves the task alone and changes nothing.
    *signed* (the Reject message and its signature) is kept on the lease it ends.
    """
    # Held to the protocol's limit (the node's own is the same), then stored as text:
    # PostgreSQL refuses a NUL.
    reason = reason[:MAX_REASON].translate(_CONTROL)
    task = session.get(m.Task, str(task_id))
    if task is None or task.status != m.LEASED or task.node_id != node_id:
        if (
            task is not None
            and signed is not None
            and task.status in (m.QUEUED, m.LEASED)
            and _delivery_refusal(session, task, node_id) is None
        ):
            # Its lease ended otherwise (ran out, the node went offline) and the task is
            # still open: the reject answers that lease, and no later result of it is
            # taken (it would displace the task's current holder).
            _record_answer(session, task.task_id, node_id, ("Reject", *signed))
        return Decision("rejected", f"task {task_id} is not leased to this node"), None
    # The dispatch's lease_expires_at is int(lease_deadline) (Scheduler.dispatch_all).
    current = None if task.lease_deadline is None else int(task.lease_deadline)
    if (
        lease_expires_at is not None
        and lease_expires_at != current
        # the current lease as it was sent, before a step of the wall clock moved it
        and lease_expires_at != _sent_lease(session, task.task_id, node_id)
    ):
        which = "an earlier" if current is not None and lease_expires_at < current else "another"
        return Decision(
            "rejected",
            f"reject for {which} lease of task {task_id} (lease_expires_at {lease_expires_at}, "
            f"current {current}): ignored",
        ), None
    if reason.startswith(DRAINING_PREFIX) and not _handed_back_before(session, task, node_id):
        # Handed back by a node that is stopping: queued again, the attempt not spent and
        # not counted against the node (outcome "returned" is no failure). Once per task
        # and node: a node that stops again and again while holding one task (or says so)
        # would otherwise hold it for ever without spending an attempt; its next hand-back
        # of the task is a plain reject.
        close_attempt(session, task.task_id, node_id, "returned", now)
        task.status, task.node_id, task.lease_deadline = m.QUEUED, None, None
        task.attempts -= 1
        task.reason = f"handed back by node {node_id}: {reason}"
        if signed is not None:
            _record_answer(session, task.task_id, node_id, ("Reject", *signed))
        return Decision("accepted", event="task.returned_by_node"), None
    lost = requeue_or_fail(
        session, task, outcome="rejected", detail=f"node {node_id} rejected it: {reason}",
        now=now, max_attempts=max_attempts,
    )  # fmt: skip
    if signed is not None:
        _record_answer(session, task.task_id, node_id, ("Reject", *signed))
    return Decision("accepted", event="task.rejected_by_node"), lost
