"""Training rounds on the coordinator: check, aggregate, outer step, next round (DiLoCo).

2.3.5 Work Execution: an ``ai.training`` job (:mod:`nodeclient.workloads.training`) runs R
rounds of one task per slice. A round closes when every slice task of it is finished, or
when its deadline passes (the unfinished ones are then cancelled and dropped, never waited
for). Closing a round is one transaction:

1. every returned pseudo-gradient is checked: well-formed, computed from this round's base
   weights (hash) on this slice's shard (hash) for K steps, finite losses and values, not
   all zeros, norm at most ``max_norm``, and, with three valid slices or more, norm at most
   ``reject_ratio`` times the median norm of the *other* slices and at least their lower
   median over ``reject_ratio``. A slice that fails is dropped with its reason. Every
   check but those against the other slices' norms already ran when the result arrived
   (training.check_slice, through the verifier), so a forgery (or a diverged training:
   NaN or infinity, a norm over ``max_norm``) was
   refused there and its task went to another node; they run again here as a second
   line;
2. with two survivors or more, they are clipped against their median norm ``m`` (of two,
   the smaller norm): a pseudo-gradient with norm ``n > clip_ratio * m`` is scaled by
   ``clip_ratio * m / n``; then the survivors are averaged;
3. the outer optimizer (SGD with Nesterov momentum, as ``torch.optim.SGD``) updates the
   fp32 global weights; its momentum is kept in SQL with them (``jobs.train_state``), so a
   coordinator restart continues where it was, and the round's metrics are a row of
   ``train_rounds``;
4. the next round's tasks are queued (new task rows, ``round_index`` + 1), or, after the
   last round, the job succeeds with the final weights and per-round metrics. A round with
   no valid slice fails the job with every slice's reason.

Why three for rejection (``MEDIAN_MIN_SLICES``): the median of one other slice is that
slice, so with two the smaller update would always veto the larger one, and a node that
returns zeros or a tiny update would have the honest slice dropped and its own used alone.
Two slices cannot say which of them is the outlier, so neither is dropped; but the larger
counts for at most ``clip_ratio`` times the smaller (clipped against the lower median, the
smaller norm). Without that, a forged update of any norm under ``max_norm`` (1e6 by
default, far above an honest one) was the round's update whenever only two slices were
valid: in every two-slice job, and in a larger one whose other slices missed the deadline.
The price is the other way round: a tiny forgery against one honest slice scales the
honest one down, and that round makes little progress, which is the lesser harm. An
all-zero update, the cheapest thing to return without training, is refused whatever the
count.

Why both sides: with only the upper bound, a near-zero forgery (all zeros but one tiny
value) passed, diluted the mean, and two of them out of three slices had the honest one
dropped as too large. The lower bound uses the *lower* median of the others: with three
slices the others are two, whose plain median is their mean, and one large forged norm
could raise that mean until both honest norms fell under it, so that every slice of the
round was dropped. The rule looks at norms only, and a round's norms scaled by any factor
are judged alike: two near-zero forgeries and one honest slice look like two honest slices
and one large forgery, and the pair is used. Two forgers out of three can therefore still
replace a round's update by a negligible one (the round makes no progress), but no longer
dilute an honest majority's mean.

Closing one job's round never stops another's: each runs inside a SAVEPOINT
(:func:`_close_isolated`), and one that raises is rolled back and fails its own job with a
generic reason (the error goes to the log). Node-supplied strings enter reasons only quoted
by ``repr``/``ascii``, so a reason always fits a SQL text column.

A round's deadline starts when its first slice is leased (a job waiting for nodes does not
burn it) and is stored in ``jobs.round_deadline``. The math (:func:`aggregate`,
:func:`outer_step`) is pure and tested on its own; the rest are transactions.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt
from sqlalchemy import func, or_, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from nodeclient.coordinator import models as m
from nodeclient.coordinator import store
from nodeclient.errors import ProtocolError, RemoteProtocolError
from nodeclient.workloads import training as tr
from nodeclient.workloads.tensors import decode_tensors, encode_tensors

if TYPE_CHECKING:
    from nodeclient.coordinator.service import Coordinator

log = logging.getLogger("nodeclient.coordinator.rounds")
Arrays = dict[str, npt.NDArray[Any]]
_W: Final = "weights/"
_M: Final = "momentum/"
MEDIAN_MIN_SLICES: Final = 3  # fewer: no rejection or clipping against the median (module doc)


def is_round_based(workload_class: str) -> bool:
    """Whether finished tasks of this class close a round rather than assemble a result."""
    return workload_class == tr.CLASS


# --- the math --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Submission:
    """One slice's outcome in a round: its result bytes, or why there are none."""

    slice_index: int
    shard_sha256: str
    result: bytes | None
    reason: str = ""


@dataclass(frozen=True, eq=False)
class RoundOutcome:
    """What a round produced: the averaged pseudo-gradient and which slices made it."""

    delta: Arrays | None  # None: no valid slice
    used: tuple[int, ...]
    dropped: tuple[tuple[int, str], ...]
    clipped: tuple[int, ...] = ()
    norms: Mapping[int, float] = field(default_factory=dict)
    first_loss: float | None = None  # means over the used slices
    last_loss: float | None = None

    def metrics(self, round_index: int, base_sha256: str) -> dict[str, Any]:
        return {
            "round": round_index,
            "base_sha256": base_sha256,
            "used": list(self.used),
            "dropped": [{"slice": s, "reason": r[: tr.MAX_REASON_CHARS]} for s, r in self.dropped],
            "clipped": list(self.clipped),
            "norms": {str(k): v for k, v in sorted(self.norms.items())},
            "first_loss": self.first_loss,
            "last_loss": self.last_loss,
        }


def _check(
    sub: Submission, *, shapes: Mapping[str, tuple[int, ...]], base_sha256: str,
    config: tr.TrainingConfig,
) -> tuple[Arrays, float, tr.PseudoGradient]:  # fmt: skip
    """One slice's checks in the documented order; RemoteProtocolError names the first failure.

    The verifier ran the hash, step and all-zero checks when the result arrived
    (training.check_slice); they run again here over what is stored, which may predate it.
    """
    if sub.result is None:
        raise RemoteProtocolError(sub.reason or "no result")
    pg = tr.PseudoGradient.decode(sub.result, shapes=shapes, grad_dtype=config.grad_dtype)
    deltas, norm = tr.check_pseudo_gradient(
        pg, base_sha256=base_sha256, shard_sha256=sub.shard_sha256, steps=config.inner_steps
    )
    if norm > config.max_norm:
        raise RemoteProtocolError(tr.norm_over_max(norm, config.max_norm))
    return deltas, norm, pg


def _lower_median(values: Sequence[float]) -> float:
    """The median of an odd count; of an even count, the lower of the two middle values."""
    return sorted(values)[(len(values) - 1) // 2]


def _outlier(norm: float, others: Sequence[float], ratio: float) -> str | None:
    """Why *norm* is an outlier against the *others* (module doc), or None.

    Too large: over *ratio* times their median. Too small: under their lower median over
    *ratio*; the lower median, because the plain median of an even count (two others,
    with three slices) is a mean that one large forged norm could raise until the honest
    norms all fell below it.
    """
    median = float(np.median(others))
    if norm > ratio * median:
        return (
            f"norm {norm:.6g} is over {ratio:g} times the median {median:.6g} of the other slices"
        )
    low = _lower_median(others)
    if norm < low / ratio:
        return (
            f"norm {norm:.6g} is under 1/{ratio:g} of the lower median {low:.6g} "
            "of the other slices"
        )
    return None


def aggregate(
    submissions: Sequence[Submission], *, shapes: Mapping[str, tuple[int, ...]],
    base_sha256: str, config: tr.TrainingConfig,
) -> RoundOutcome:  # fmt: skip
    """Check, reject outliers, clip against the median, and average (see the module doc).

    Rejection (too large or too small) needs ``MEDIAN_MIN_SLICES`` (3) valid slices;
    clipping needs two (against the lower median: of two, the smaller norm). One valid
    slice is bounded only by ``max_norm`` and used as it is.
    """
    dropped: list[tuple[int, str]] = []
    valid: list[tuple[int, Arrays, float, tr.PseudoGradient]] = []
    for sub in sorted(submissions, key=lambda s: s.slice_index):
        try:
            deltas, norm, pg = _check(sub, shapes=shapes, base_sha256=base_sha256, config=config)
        except ProtocolError as exc:
            dropped.append((sub.slice_index, str(exc)))
            continue
        valid.append((sub.slice_index, deltas, norm, pg))
    if len(valid) >= MEDIAN_MIN_SLICES:  # leave-one-out medians, all over the same set
        norms = [v[2] for v in valid]
        kept = []
        for i, item in enumerate(valid):
            why = _outlier(item[2], norms[:i] + norms[i + 1 :], config.reject_ratio)
            if why is None:
                kept.append(item)
            else:
                dropped.append((item[0], why))
        valid = kept
    dropped.sort()
    if not valid:
        return RoundOutcome(None, (), tuple(dropped))
    limit = math.inf
    if len(valid) >= MEDIAN_MIN_SLICES:
        limit = config.clip_ratio * float(np.median([v[2] for v in valid]))
    elif len(valid) == 2:  # no median to trust: the larger counts for clip_ratio x the other
        limit = config.clip_ratio * _lower_median([v[2] for v in valid])
    total = {name: np.zeros(shape, dtype=np.float64) for name, shape in shapes.items()}
    clipped: list[int] = []
    for index, deltas, norm, _ in valid:
        scale = 1.0
        if norm > limit:
            scale = limit / norm
            clipped.append(index)
        for name, array in deltas.items():
            total[name] += array.astype(np.float64) * scale
    mean = {name: (t / len(valid)).astype(np.float32) for name, t in total.items()}
    return RoundOutcome(
        delta=mean,
        used=tuple(v[0] for v in valid),
        dropped=tuple(dropped),
        clipped=tuple(clipped),
        norms={v[0]: v[2] for v in valid},
        first_loss=float(np.mean([v[3].first_loss for v in valid])),
        last_loss=float(np.mean([v[3].last_loss for v in valid])),
    )


def outer_step(
    weights: Mapping[str, npt.NDArray[Any]], momentum: Mapping[str, npt.NDArray[Any]],
    delta: Mapping[str, npt.NDArray[Any]], outer: tr.OuterOptimizer,
) -> tuple[Arrays, Arrays]:  # fmt: skip
    """SGD with (Nesterov) momentum on the pseudo-gradient, in fp32, as torch.optim.SGD does.

    ``buf = mu * buf + g``; ``update = g + mu * buf`` (Nesterov) or ``buf``; ``w -= lr * update``.
    """
    mu, lr = np.float32(outer.momentum), np.float32(outer.lr)
    new_w: Arrays = {}
    new_m: Arrays = {}
    for name, w in weights.items():
        g = np.asarray(delta[name], np.float32)
        buf = mu * np.asarray(momentum[name], np.float32) + g
        update = g + mu * buf if outer.nesterov else buf
        new_w[name] = (np.asarray(w, np.float32) - lr * update).astype(np.float32)
        new_m[name] = buf.astype(np.float32)
    return new_w, new_m


# --- state kept in SQL -----------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class TrainState:
    """The global fp32 weights and the outer momentum (``jobs.train_state``).

    The metrics of closed rounds are rows of ``train_rounds``, one a round, so a round's
    close writes only its own. A state from before that table carries them in its metadata
    (``legacy_metrics``); :func:`close_round` moves them into rows at its next close.
    """

    weights: Arrays
    momentum: Arrays
    legacy_metrics: list[dict[str, Any]] = field(default_factory=list)

    def encode(self) -> bytes:
        tensors = {_W + k: v for k, v in self.weights.items()}
        tensors.update({_M + k: v for k, v in self.momentum.items()})
        return encode_tensors(tensors, metadata={"class": tr.CLASS, "kind": "state"})

    @classmethod
    def decode(cls, data: bytes) -> TrainState:
        # Our own bytes from our own database: bounded by their size alone (an old state's
        # metadata held every round's metrics, over the default header limit for long jobs).
        tensors, meta = decode_tensors(data, max_bytes=len(data), max_header_bytes=len(data))
        weights = {k[len(_W) :]: np.array(v) for k, v in tensors.items() if k.startswith(_W)}
        momentum = {k[len(_M) :]: np.array(v) for k, v in tensors.items() if k.startswith(_M)}
        legacy = json.loads(meta["metrics"]) if "metrics" in meta else []
        return cls(weights, momentum, legacy)


def _record_round(session: Session, job: m.Job, state: TrainState, row: dict[str, Any],
                  now: float) -> None:  # fmt: skip
    """Store a closed round's metrics (and, once, those an old state still carried: written
    before train_rounds, it has no rows yet, and the state is written back without them)."""
    for metrics in (*state.legacy_metrics, row):
        session.add(m.TrainRound(job_id=job.job_id, round_index=metrics["round"],
                                 metrics=tr.dump_json(metrics), closed_at=now))  # fmt: skip
    session.flush()


def round_metrics(session: Session, job_id: str) -> list[dict[str, Any]]:
    """The metrics of a job's closed rounds, in order."""
    rows = session.scalars(
        select(m.TrainRound.metrics)
        .where(m.TrainRound.job_id == job_id)
        .order_by(m.TrainRound.round_index)
    )
    return [json.loads(text) for text in rows]


@dataclass(frozen=True, slots=True)
class RoundClose:
    """What closing a round did: the job's end status if it ended, leases to withdraw."""

    job_status: str | None
    cancel: tuple[tuple[str, str], ...] = ()
    job_id: str | None = None  # the job, when it ended (job_status set)


def _round_tasks(session: Session, job: m.Job) -> list[m.Task]:
    return list(
        session.scalars(
            select(m.Task)
            .where(m.Task.job_id == job.job_id, m.Task.round_index == job.round_index)
            .order_by(m.Task.slice_index)
        )
    )


def _withdraw(
    session: Session, task: m.Task, reason: str, now: float, *, outcome: str = "round_deadline"
) -> tuple[str, str] | None:
    """Cancel an unfinished task; the lease to withdraw on its node, if it had one."""
    lease = None
    if task.status == m.LEASED and task.node_id is not None:
        lease = (task.node_id, task.task_id)
        attempt = session.scalars(
            select(m.TaskAttempt)
            .where(m.TaskAttempt.task_id == task.task_id, m.TaskAttempt.ended_at.is_(None))
            .order_by(m.TaskAttempt.attempt.desc())
        ).first()
        if attempt is not None:
            attempt.ended_at, attempt.outcome = now, outcome
    task.status, task.reason, task.lease_deadline = m.CANCELLED, reason, None
    return lease


def close_round(
    session: Session, job: m.Job, now: float, *, deadline_passed: bool
) -> RoundClose | None:
    """Close the job's current round if it is complete (or its deadline passed)."""
    if job.status not in (m.QUEUED, m.RUNNING):
        return None
    tasks = _round_tasks(session, job)
    open_tasks = [t for t in tasks if t.status in (m.QUEUED, m.LEASED)]
    if open_tasks and not deadline_passed:
        return None
    r = job.round_index
    meta = json.loads(job.meta)
    model = tr.ModelSpec.from_json(meta["model"])
    config = tr.TrainingConfig.from_dict(meta["config"])
    reason = f"missed the deadline of round {r}"
    cancel = tuple(c for t in open_tasks if (c := _withdraw(session, t, reason, now)) is not None)
    stored = {t.slice_index: tr.stored_slice(t.payload) for t in tasks}
    base_sha256 = stored[tasks[0].slice_index][0]
    state = (
        TrainState.decode(job.train_state)
        if job.train_state is not None
        else TrainState(
            weights={
                k: np.array(v)
                for k, v in tr.decode_weights(_start_weights(session, job, tasks), model).items()
            },
            momentum={k: np.zeros(s, np.float32) for k, s in model.parameter_shapes().items()},
        )
    )
    for t in tasks:  # read for the last time: the next round's payloads are built from them
        t.payload = b""  # the round's results, which proofs cover, stay
    subs = [
        Submission(t.slice_index, stored[t.slice_index][1],
                   t.result if t.status == m.SUCCEEDED else None, t.reason or t.status)
        for t in tasks
    ]  # fmt: skip
    outcome = aggregate(
        subs, shapes=model.parameter_shapes(), base_sha256=base_sha256, config=config
    )
    _record_round(session, job, state, outcome.metrics(r, base_sha256), now)
    log.info(
        "training.round_closed",
        extra={"job_id": job.job_id, "round": r, "used": list(outcome.used),
               "dropped": [s for s, _ in outcome.dropped]},
    )  # fmt: skip
    job.round_deadline = None
    if outcome.delta is None:
        why = "; ".join(f"slice {s}: {reason}" for s, reason in outcome.dropped)
        job.train_state = TrainState(state.weights, state.momentum).encode()
        reason = f"round {r} has no valid pseudo-gradient: {why}"[:4000]
        store.end_job(session, job, m.FAILED, now, reason)
        return RoundClose(m.FAILED, cancel, job.job_id)
    weights, momentum = outer_step(state.weights, state.momentum, outcome.delta, config.outer)
    job.train_state = TrainState(weights, momentum).encode()
    if r + 1 >= config.rounds:
        job.result = tr.encode_final(model, weights, round_metrics(session, job.job_id))
        job.result_sha256 = hashlib.sha256(job.result).hexdigest()
        store.end_job(session, job, m.SUCCEEDED, now, None)
        return RoundClose(m.SUCCEEDED, cancel, job.job_id)
    job.round_index = r + 1
    # The round's start weights are stored once; each task's payload names them by their
    # SHA-256 and gets them when it is sealed to a node (placement.assign_tx).
    digest = store.set_round_input(session, job.job_id, r + 1, tr.weights_container(weights))
    for index, (_, _, shard) in sorted(stored.items()):
        plan = tr.plan_for(config, r + 1, index)
        session.add(
            m.Task(
                task_id=str(uuid.uuid4()), job_id=job.job_id, slice_index=index,
                slice_count=job.slices, status=m.QUEUED, attempts=0, queued_at=now,
                round_index=r + 1,
                payload=tr.SliceStub(model, digest, shard, plan).encode(),
            )
        )  # fmt: skip
    return RoundClose(None, cancel)


def _start_weights(session: Session, job: m.Job, tasks: Sequence[m.Task]) -> bytes:
    """The weights container round 0 started from: the job's round input, or (a job
    submitted before round inputs) the first task's own payload."""
    shared = store.round_inputs(session, [job.job_id]).get(job.job_id)
    if shared is not None:
        return shared[1]
    return tr.SliceRequest.decode(tasks[0].payload, max_bytes=len(tasks[0].payload)).weights


def _fail_job(session: Session, job: m.Job, reason: str, now: float) -> RoundClose:
    """Fail the job and cancel its unfinished tasks, as leases.fail_job does."""
    open_tasks = session.scalars(
        select(m.Task).where(m.Task.job_id == job.job_id, m.Task.status.in_((m.QUEUED, m.LEASED)))
    ).all()
    cancel = tuple(
        c
        for t in open_tasks
        if (c := _withdraw(session, t, store.job_failed_reason(t.reason, reason), now,
                           outcome="cancelled")) is not None
    )  # fmt: skip
    store.end_job(session, job, m.FAILED, now, reason)
    return RoundClose(m.FAILED, cancel, job.job_id)


def _close_isolated(
    session: Session, job: m.Job, now: float, step: Callable[[], RoundClose | None]
) -> RoundClose | None:
    """Run one job's round *step* in a SAVEPOINT; if it raises, fail this job alone.

    The caller's transaction may carry other jobs' rounds and the scheduler's whole tick,
    so a fault in one job's data (or a bug it reaches) is rolled back to the savepoint
    and ends that job with a generic reason, never the transaction. The database being
    unable to serve (OperationalError: connection lost, lock timeout) is not the job's
    fault: that still fails the caller's transaction, which is retried.
    """
    job_id, r = job.job_id, job.round_index
    session.flush()  # the caller's own pending writes fail the caller, not this job
    try:
        with session.begin_nested():  # released (and flushed) on the way out: errors land here
            closed = step()
    except OperationalError:
        raise
    except Exception:
        log.exception("training.round_close_failed", extra={"job_id": job_id, "round": r})
    else:
        return closed
    with session.begin_nested():
        return _fail_job(session, job, f"round {r} could not be closed: internal error", now)


def close_if_complete(session: Session, job: m.Job, now: float) -> RoundClose | None:
    """Close the job's round if none of its slices is open any more (isolated: a fault
    fails this job alone); None while one is."""
    step = functools.partial(close_round, session, job, now, deadline_passed=False)
    return _close_isolated(session, job, now, step)


def finish_round_tx(session: Session, job: m.Job, now: float) -> str | None:
    """After an accepted result: close the round if complete; the job's end status, if any."""
    closed = close_if_complete(session, job, now)
    return None if closed is None else closed.job_status


def _deadline_step(
    session: Session, job: m.Job, now: float, passed_after: float | None = None
) -> RoundClose | None:
    """Start the round's clock at its first lease; close the round once it has run out
    (with *passed_after*, only if it ran out after that)."""
    if job.round_deadline is None:
        # The round's first lease that left (or may yet). A task's own leased_at holds
        # only its latest delivered lease, which a re-lease moves later, so its attempts
        # are asked too; a dispatch that never left (undelivered) starts nothing.
        in_round = (m.Task.job_id == job.job_id, m.Task.round_index == job.round_index)
        delivered = session.scalar(
            select(func.min(m.TaskAttempt.leased_at))
            .join(m.Task, m.Task.task_id == m.TaskAttempt.task_id)
            .where(
                *in_round,
                or_(m.TaskAttempt.outcome.is_(None), m.TaskAttempt.outcome != "undelivered"),
            )
        )
        latest = session.scalar(select(func.min(m.Task.leased_at)).where(*in_round))
        known = [t for t in (delivered, latest) if t is not None]
        if not known:
            return None
        first = min(known)
        config = tr.TrainingConfig.from_dict(json.loads(job.meta)["config"])
        job.round_deadline = first + config.round_deadline_s
    if now < job.round_deadline:
        return None
    if passed_after is not None and job.round_deadline < passed_after:
        return None  # passed while the coordinator was down: its nodes may deliver yet
    closed = close_round(session, job, now, deadline_passed=True)
    if closed is not None:
        log.info("training.round_deadline", extra={"job_id": job.job_id})
    return closed


def deadline_tx(
    session: Session, *, now: float, passed_after: float | None = None
) -> list[RoundClose]:
    """Start round clocks at first lease; close the rounds past their deadline, each alone
    (with *passed_after*, only those whose deadline passed after it)."""
    closes: list[RoundClose] = []
    jobs = session.scalars(
        select(m.Job).where(m.Job.workload_class == tr.CLASS, m.Job.status == m.RUNNING)
    ).all()
    for job in jobs:
        if job.round_deadline is not None and now < job.round_deadline:
            continue  # a round under way (most jobs, most ticks): no savepoint needed
        step = functools.partial(_deadline_step, session, job, now, passed_after)
        closed = _close_isolated(session, job, now, step)
        if closed is not None:
            closes.append(closed)
    return closes


def report_closes(coord: Coordinator, closes: Sequence[RoundClose]) -> None:
    """After :func:`deadline_tx`: tell nodes to drop their slices, wake the scheduler."""
    for node_id, task_id in (lease for close in closes for lease in close.cancel):
        coord.send_cancel(node_id, task_id, "round deadline passed")  # in the background
    for close in closes:
        if close.job_status is not None:
            log.info(f"job.{close.job_status}", extra={"job_id": close.job_id})
    if closes:  # a next round may be queued
        coord.wake()
