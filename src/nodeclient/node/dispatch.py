"""Tasks on the node (2.3.4 to 2.3.7): a dispatch taken or refused, the payload
decrypted (2.3.4, in this process), its inputs fetched, executed (2.3.5, in a worker
process), proved (2.3.6) and recorded in the outbox, signed (2.3.7) and sent; the running
tasks' slots and how each ended.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeVar

from cryptography.hazmat.primitives.asymmetric import rsa

from nodeclient import logs
from nodeclient.errors import EnvelopeError, RemoteProtocolError
from nodeclient.node import inputs, sandbox
from nodeclient.node.delivery import ResultDelivery
from nodeclient.node.executor import Executor, TaskFailed
from nodeclient.node.metrics import NodeMetrics
from nodeclient.node.outbox import CommitUncertain, OutboxCorrupt, OutboxEntry, Retention
from nodeclient.protocol import eip712, envelope, messages
from nodeclient.protocol.proof import proof_of_execution
from nodeclient.protocol.states import NodeState, StateMachine

if TYPE_CHECKING:
    from nodeclient.node.runtimes.onnx import ModelCache

log = logging.getLogger("nodeclient.node")
# Results awaiting acknowledgement from every coordinator together, as a multiple of
# max_unacknowledged_results (which bounds the linked coordinator's own): past it, no work
# is taken, so that coordinators that change their id cannot fill the disk between them.
ALL_BACKLOGS_FACTOR: Final = 4
MODELS_THAT_RAN: Final = 4096  # the models remembered as ones that ran here (_model_ran)
_T = TypeVar("_T")


def _pruned_reason(entry: OutboxEntry) -> str:
    if entry.ack_status == "lost":
        return (
            "already completed, but this node's stored result could not be read and was "
            "given up as lost; the task is not run again"
        )
    if entry.ack_status == "abandoned":
        return (
            "already completed, but never acknowledged by the coordinator that dispatched "
            "it, and given up by this node with its result; the task is not run again"
        )
    return (
        f"already completed and acknowledged ({entry.ack_status}); its result is past this "
        "node's retention and no longer held, so the task is not run again"
    )


@dataclass
class RunningTask:
    task_id: uuid.UUID
    job_id: uuid.UUID
    workload_class: str
    slice_index: int | None
    received_at: float
    handle: asyncio.Task[None] | None = None
    outcome: str | None = None  # how it ended, once counted (_task_ended)
    finishing: bool = False  # executed: its result is committed and sent, cancel or not
    lease_expires_at: int | None = None  # its dispatch's, echoed in a reject of it
    fetch_limits: inputs.FetchLimits | None = None  # while its inputs download
    coordinator_id: str | None = None  # the link's that dispatched it: its result goes there
    stop_reason: str | None = None  # why it was stopped, for its one task.cancelled line
    # Its dispatch's (or latest renewal's) arrival: the executor's clock then, and the
    # coordinator's (its sent_at). The lease's end and the envelope's expiry, times on the
    # coordinator's clock, are read from these, so no step of either wall clock moves them.
    arrived: float = 0.0
    coordinator_then: float = 0.0

    def coordinator_now(self, now: float) -> float:
        """The coordinator's clock when the executor's reads *now*."""
        return self.coordinator_then + (now - self.arrived)

    def deadline(self, lease_expires_at: float) -> float:
        """*lease_expires_at* as a deadline on the executor's clock."""
        return self.arrived + max(0.0, lease_expires_at - self.coordinator_then)


class TaskDispatcher(ResultDelivery):
    """The daemon's task half, above ResultDelivery: NodeDaemon.__init__ sets the
    attributes declared here."""

    slots: int
    classes: frozenset[str]
    state: StateMachine
    running: dict[uuid.UUID, RunningTask]
    executor: Executor
    metrics: NodeMetrics
    retention: Retention
    _payload_key: rsa.RSAPrivateKey
    _stopping: asyncio.Event
    _fetch: inputs.Fetch
    _fetch_pool: concurrent.futures.ThreadPoolExecutor  # one fetch thread per slot
    _blobs: ModelCache  # render scenes, fetched once
    _models_that_ran: dict[str, None]  # model hashes whose tasks ran here, oldest first

    def _ended(self, workload_class: str, outcome: str, received_at: float) -> None:
        # The class is the coordinator's word: one this node does not serve is "other", so
        # that made-up names cannot add metric series without end.
        label = workload_class if workload_class in self.classes else "other"
        self.metrics.task_ended(label, outcome, self.clock.now() - received_at)

    def _task_ended(self, task: RunningTask, outcome: str) -> None:
        """Count how a running task ended, once (a cancel may follow its commit)."""
        if task.outcome is None:
            task.outcome = outcome
            if outcome == "timed_out":
                self.outbox.tally("timed_out")
            self._ended(task.workload_class, outcome, task.received_at)

    def _abandon_running(self) -> None:
        """Cancel every running task: a task still executing has its worker killed and is
        never signed (the coordinator gives it out again when its lease ends); a result
        already being committed stays in the outbox and is sent on the next link."""
        for task in self.running.values():
            if task.handle is not None and not task.handle.done() and not task.finishing:
                task.stop_reason = "another process of this node holds the link now"
                task.handle.cancel()
                self._task_ended(task, "cancelled")

    # --- tasks -----------------------------------------------------------------------------

    async def _on_dispatch(self, d: messages.Dispatch) -> None:
        with logs.bind(task_id=str(d.task_id), job_id=str(d.job_id)):
            log.info("task.received", extra={"workload_class": d.workload_class})
            try:
                done = self.outbox.get(d.task_id)
            except OutboxCorrupt as exc:  # signed once already: never run it again
                log.error("outbox.result_missing", extra={"error": str(exc)})
                await self._reject(
                    d.task_id,
                    "this node's stored result for the task is damaged",
                    job_id=d.job_id,
                    lease_expires_at=d.lease_expires_at,
                )
                return
            except (OSError, sqlite3.Error) as exc:  # not read just now (EIO, a locked or
                # damaged database, EMFILE): nothing is known
                # Neither run it (it may be done) nor refuse it (the result may be intact):
                # the coordinator's lease runs out, or it dispatches the task again later.
                log.error("outbox.lookup_failed", extra={"error": str(exc)})
                return
            if done is not None:  # already finished: re-send, never re-execute
                await self._on_done_dispatch(done, d)
                return
            running = self.running.get(d.task_id)
            if running is not None:
                await self._on_redispatch(running, d)
                return
            arrived, coordinator_then = self._arrival(d)
            reason = self._refusal(d, coordinator_then)
            if reason:
                self._ended(d.workload_class, "rejected", self.clock.now())
                await self._reject(
                    d.task_id, reason, job_id=d.job_id, lease_expires_at=d.lease_expires_at
                )
                return
            task = RunningTask(
                d.task_id,
                d.job_id,
                d.workload_class,
                d.slice_index,
                self.clock.now(),
                lease_expires_at=d.lease_expires_at,
                coordinator_id=self.session.coordinator_id,
            )
            task.arrived, task.coordinator_then = arrived, coordinator_then
            self.running[d.task_id] = task
            self.executor.reserve(d.task_id, d.resources)  # until _free_slot
            if self.state.state in (NodeState.READY, NodeState.IDLE):
                self.state.transition(NodeState.EXECUTING, reason=f"task {d.task_id} started")
            task.handle = asyncio.create_task(self._execute(task, d))
            task.handle.add_done_callback(functools.partial(self._task_gone, task))

    async def _on_done_dispatch(self, done: OutboxEntry, d: messages.Dispatch) -> None:
        """A dispatch of a task this node has a result of: re-send it, or refuse (signed)
        when it cannot be sent: its bytes are gone, its record is damaged, or another
        coordinator dispatched it (a result goes only to the one that dispatched it)."""
        if done.coordinator_id not in (None, self.session.coordinator_id):
            reason = "already completed for another coordinator; the task is not run again"
        elif not done.held:
            reason = _pruned_reason(done)
        else:
            frame = self._result_frame(done)
            if frame is not None:
                await self._send_result(done, frame)
                return
            reason = "this node's stored result for the task is damaged"
        await self._reject(d.task_id, reason, job_id=d.job_id, lease_expires_at=d.lease_expires_at)

    async def _on_redispatch(self, running: RunningTask, d: messages.Dispatch) -> None:
        """The coordinator leased a task again while it still runs here (its last lease
        ended, and no other node could take it)."""
        if running.outcome is not None:  # cancelled, still unwinding: refuse the new lease
            await self._reject(
                d.task_id,
                "the task was cancelled here and is still stopping; lease it again later",
                job_id=d.job_id,
                lease_expires_at=d.lease_expires_at,
            )
            return
        if running.lease_expires_at is not None and d.lease_expires_at <= running.lease_expires_at:
            # A duplicate, or a stale dispatch of an earlier lease: a lease only moves
            # forward, or the task's deadline (read from it after its inputs) would shrink.
            log.info("task.lease_kept", extra={"task_id": str(d.task_id)})
            return
        # It runs on, to the new lease's end, and a reject of it names the new lease, or
        # the coordinator would take it for the old one's and ignore it.
        running.lease_expires_at = d.lease_expires_at
        running.arrived, running.coordinator_then = self._arrival(d)
        until = running.deadline(d.lease_expires_at)
        if running.fetch_limits is not None:  # its inputs may still be downloading
            running.fetch_limits.extend(until)
        self.executor.extend(d.task_id, until)
        log.info("task.lease_renewed", extra={"task_id": str(d.task_id)})

    def _free_slot(self, task: RunningTask) -> None:
        """The task no longer holds its slot (once: both ends of a task call this)."""
        if self.running.get(task.task_id) is task:
            del self.running[task.task_id]
            self.executor.release(task.task_id)
            if not self.running and self.state.state is NodeState.EXECUTING:
                self.state.transition(NodeState.IDLE, reason="the last running task finished")

    def _task_gone(self, task: RunningTask, handle: asyncio.Task[None]) -> None:
        """A task's coroutine has ended, however: even cancelled before its first step
        (a cancel read in the same turn as its dispatch), when its ``finally`` never ran."""
        self._free_slot(task)
        if handle.cancelled():  # once, here: a task cancelled before its first step too
            log.info("task.cancelled", extra={"reason": task.stop_reason or "cancelled"})
        elif handle.exception() is not None:  # a bug: say so
            log.error(
                "task.crashed", extra={"task_id": str(task.task_id)}, exc_info=handle.exception()
            )

    def _refusal(  # noqa: PLR0911 (one return a reason)
        self, d: messages.Dispatch, coordinator_now: float
    ) -> str:
        """Why *d* is not run here ("" if it is); *coordinator_now*: the coordinator's
        clock as *d* arrived (_arrival)."""
        if self._stopping.is_set():  # handed back: the coordinator spends no attempt on it
            return f"{messages.DRAINING_PREFIX}node is shutting down"
        if not self.state.accepts_dispatch():
            return "node is UNSTAKING: no new dispatches"
        if d.workload_class not in self.classes:
            return f"workload class {d.workload_class!r} is not served by this node"
        if len(self.running) >= self.slots:
            return f"over capacity: {len(self.running)} of {self.slots} slots busy"
        # This coordinator's: those waiting for another one are never sent to it.
        waiting = self.outbox.backlog(self.session.coordinator_id)
        if waiting >= self.retention.max_unacknowledged:
            self._resend_full_backlog()
            return (
                f"outbox backlog full: {waiting} results await the coordinator's "
                "acknowledgement (max_unacknowledged_results); they are sent again at each "
                "reconnect, and every few minutes while the backlog is full"
            )
        # All coordinators' together: one that comes back under a new id starts a backlog
        # of its own, and the old one's results wait until they are abandoned (30 days).
        # Not where the operator keeps them for ever (abandon_results_after_days = 0):
        # no work would ever be taken again, and the disk is theirs to watch.
        everyone = self.outbox.backlog()
        if (
            self.retention.abandon_seconds > 0
            and everyone >= ALL_BACKLOGS_FACTOR * self.retention.max_unacknowledged
        ):
            return (
                f"outbox backlog full: {everyone} results await acknowledgement, most of "
                "them from coordinators this node is not linked to (they are closed as "
                "abandoned after abandon_results_after_days)"
            )
        if d.lease_expires_at < coordinator_now:  # on its clock, not ours
            return "lease already expired"
        return self.executor.admission(d.resources)  # 2.3.5: never run out of memory

    async def _execute(self, task: RunningTask, d: messages.Dispatch) -> None:
        with logs.bind(task_id=str(task.task_id), job_id=str(task.job_id)):
            metadata: dict[str, str] | None = None
            try:
                try:
                    payload = await self._off_loop(
                        envelope.open_envelope,
                        d.envelope,
                        private_key=self._payload_key,
                        task_id=d.task_id,
                        node_id=self.node_id,
                        now=int(task.coordinator_now(self.executor.clock())),
                    )
                    started = time.monotonic()
                    metadata = await self._metadata(task.workload_class, payload)
                    if inputs.needs_fetch(
                        task.workload_class,
                        payload,
                        cache_dir=self.executor.config.cache_dir,
                        metadata=metadata,
                    ):
                        payload = await self._fetch_inputs(
                            task, payload, task.lease_expires_at or d.lease_expires_at
                        )
                    result = await self.executor.run(
                        task.workload_class,
                        payload,
                        task_id=task.task_id,
                        job_id=d.job_id,  # whose worker may serve it (executor: reuse)
                        # The task's lease, renewed if it was leased here again meanwhile.
                        deadline=task.deadline(task.lease_expires_at or d.lease_expires_at),
                        resources=d.resources,
                        on_progress=self._progress_reporter(task.task_id),
                        metadata=metadata,  # the affinity of the worker it may share
                    )
                except EnvelopeError as exc:  # only open_envelope raises it
                    self._task_ended(task, "rejected")
                    await self._reject(
                        task.task_id,
                        f"payload decryption failed: {exc}",
                        job_id=task.job_id,
                        lease_expires_at=task.lease_expires_at,
                    )
                    return
                except TaskFailed as exc:
                    log.warning("task.failed", extra={"reason": exc.reason})
                    timed_out = exc.reason.startswith("deadline exceeded")  # the lease's end
                    self._task_ended(task, "timed_out" if timed_out else "failed")
                    await self._reject(
                        task.task_id,
                        exc.reason,
                        job_id=task.job_id,
                        lease_expires_at=task.lease_expires_at,
                        counted=not timed_out,
                    )
                    await self._after_model_failure(exc.reason, metadata)
                    return
                except Exception as exc:  # a bug, or garbage from a worker
                    # Nothing is committed yet, so a signed reject contradicts nothing, and
                    # the task goes elsewhere now rather than when its lease runs out. The
                    # reason names only the type: the traceback stays in this node's log.
                    log.exception("task.internal_error")
                    self._task_ended(task, "failed")
                    await self._reject(
                        task.task_id,
                        f"internal error: {type(exc).__name__}",
                        job_id=task.job_id,
                        lease_expires_at=task.lease_expires_at,
                    )
                    return
                self._model_ran(metadata)
                log.info(
                    "task.executed",
                    extra={
                        "seconds": round(time.monotonic() - started, 4),
                        "result_size": len(result),
                    },
                )
                if task.outcome is not None:
                    # Ended meanwhile (cancelled, handed back, abandoned) by a cancel that
                    # reached it as its run returned and was lost: never sign its result.
                    log.info("task.result_discarded", extra={"outcome": task.outcome})
                    return
                # The work is done: a cancel from here on (a lease that just ended, say)
                # no longer stops the commit, whose thread would go on anyway, nor the
                # sending of what it signed (the coordinator takes a late result).
                task.finishing = True
                await self._finish(task, result)
            finally:  # at once: a dispatch right after the result finds the slot free
                self._free_slot(task)

    async def _finish(self, task: RunningTask, result: bytes) -> None:
        """Record, sign and send a finished task's result (2.3.6, 2.3.7). Once the commit
        has stored it, the task's slot is free, before it is sent: a send may wait on a
        slow or stalled link, and the backlog holds the result (a stop's drain waits for
        the backlog). A refusal after a failed commit is no backlog's: the slot is held
        until it is sent, so that the drain waits for it too."""
        try:
            entry = await self._off_loop(self._commit, task, result)
        except OutboxCorrupt as exc:  # its row, of an earlier lease, is damaged: never re-sign
            log.error("outbox.result_missing", extra={"error": str(exc)})
            self._task_ended(task, "failed")
            await self._reject(  # the slot held meanwhile: a stop's drain waits for it
                task.task_id,
                "this node's stored result for the task is damaged",
                job_id=task.job_id,
                lease_expires_at=task.lease_expires_at,
            )
            return
        except CommitUncertain as exc:  # a failing disk: the result may be stored after all
            # A reject now could contradict the signed result, which the backlog then
            # holds and sends at the next reconnect: say nothing, and let the lease run
            # out if it is not there.
            log.error("outbox.commit_uncertain", extra={"error": str(exc)})
            self._task_ended(task, "failed")
            self._free_slot(task)
            return
        except (OSError, sqlite3.Error) as exc:  # a full disk, or failed before its commit
            # Nothing was recorded, signed or sent: refuse, so the task goes elsewhere
            # now rather than when its lease runs out.
            log.error("outbox.commit_failed", extra={"error": str(exc)})
            self._task_ended(task, "failed")
            await self._reject(  # the slot held meanwhile: a stop's drain waits for it
                task.task_id,
                f"node could not store the result durably: {exc}"[: messages.MAX_REASON],
                job_id=task.job_id,
                lease_expires_at=task.lease_expires_at,
            )
            return
        except Exception as exc:  # a bug, or MemoryError: what the outbox holds decides
            log.exception("outbox.commit_error")
            await self._after_commit_error(task, exc)
            return
        self._task_ended(task, "completed")
        self._free_slot(task)
        await self._deliver(entry)

    async def _after_commit_error(self, task: RunningTask, exc: Exception) -> None:
        """The commit raised something no branch of _finish expects (a signing bug, a
        MemoryError): a result stored and signed is sent; none stored is refused (signed,
        so the task goes elsewhere now, not when its lease runs out); with the outbox
        unreadable, nothing is said, as for a commit that may be on disk. The slot is
        free at once, as after any commit (_finish)."""
        try:
            entry = self.outbox.get(task.task_id)
        except Exception:  # noqa: BLE001 (unknown: a reject could contradict a result)
            self._task_ended(task, "failed")
            self._free_slot(task)
            return
        if entry is not None:
            self._task_ended(task, "failed" if entry.signature is None else "completed")
            self._free_slot(task)
            if entry.signature is not None:  # (unsigned: signed and sent by a later commit)
                await self._deliver(entry)
            return
        self._task_ended(task, "failed")
        self._free_slot(task)
        await self._reject(
            task.task_id,
            f"internal error: {type(exc).__name__}",
            job_id=task.job_id,
            lease_expires_at=task.lease_expires_at,
        )

    def _arrival(self, d: messages.Dispatch) -> tuple[float, float]:
        """The executor's clock now, and the coordinator's: *d*'s own sent_at (its transit
        and queueing make its lease look a little longer, never shorter: the coordinator's
        cancel at the lease's end still stops it), or, from a coordinator that sends none,
        ours plus the offset its heartbeat acknowledgements gave (``coordinator_clock``)."""
        theirs = (
            self.clock.now() + self.coordinator_clock.offset if d.sent_at is None else d.sent_at
        )
        return self.executor.clock(), theirs

    async def _metadata(self, workload_class: str, payload: bytes) -> dict[str, str] | None:
        """The payload's metadata (``inputs.task_metadata``), read once per task: on the
        event loop when its header is small, else in a thread, so that a requester's header
        of up to a MiB (the container's limit), slow to parse, holds up no other task."""
        if inputs.header_is_small(payload):
            return inputs.task_metadata(workload_class, payload)
        return await asyncio.to_thread(inputs.task_metadata, workload_class, payload)

    async def _after_model_failure(self, reason: str, metadata: dict[str, str] | None) -> None:
        """A task failed: where its worker could not use the model in the cache, which it
        sees read-only, the daemon mends the cache for the next task. A file it could not
        read is re-hashed, and deleted if its bytes are wrong; bytes it refused as no model
        it can load are deleted, as only models that loaded are kept. Other failures (a
        bad input, a timeout, a GPU fault) leave the model as it is."""
        model = (metadata or {}).get("model_sha256", "")
        cache_dir = self.executor.config.cache_dir
        if model and inputs.model_unavailable(reason):
            await asyncio.to_thread(inputs.recheck_cached_model, cache_dir, model)
        elif model and inputs.model_refused(reason) and model not in self._models_that_ran:
            await asyncio.to_thread(inputs.drop_cached_model, cache_dir, model)

    def _model_ran(self, metadata: dict[str, str] | None) -> None:
        """Remember that the task's model ran here: bytes that loaded and ran are a model,
        whatever a later task's failure says (_after_model_failure never drops them)."""
        model = (metadata or {}).get("model_sha256")
        if model:
            ran = self._models_that_ran
            ran.pop(model, None)
            ran[model] = None  # the most recent last
            if len(ran) > MODELS_THAT_RAN:
                del ran[next(iter(ran))]

    def _progress_reporter(self, task_id: uuid.UUID) -> Callable[[float, float, str], None]:
        """Forward a task's progress to the coordinator (the executor has throttled it: at
        most twice a second, and one end)."""

        def report(done: float, total: float, note: str) -> None:
            frame = messages.ProgressFrame(task_id, min(done, total), total, note[:200])
            self._background(self._send(frame.to_wire()))

        return report

    async def _fetch_inputs(self, task: RunningTask, payload: bytes, lease_end: float) -> bytes:
        """_resolve_inputs in the fetch threads (one per slot, apart from the threads that
        commit and acknowledge results), stopped at the lease's end or a cancel."""
        limits = task.fetch_limits = inputs.FetchLimits(
            deadline=task.deadline(lease_end),
            cancelled=threading.Event(),
            clock=self.executor.clock,
        )
        with inputs.fetch_limits(limits):
            context = contextvars.copy_context()
        loop = asyncio.get_running_loop()
        try:
            call = functools.partial(context.run, self._resolve_inputs, task, payload)
            return await loop.run_in_executor(self._fetch_pool, call)
        except asyncio.CancelledError:
            limits.cancelled.set()  # the thread stops at its next chunk
            raise

    def _resolve_inputs(self, task: RunningTask, payload: bytes) -> bytes:
        """Fetch content-addressed inputs the offline worker needs (models, scenes)."""
        try:
            return inputs.resolve(
                task.workload_class,
                payload,
                fetch=self._fetch,
                cache_dir=self.executor.config.cache_dir,
                sandbox_owner=self.executor.mode == sandbox.MODE_BWRAP and os.geteuid() == 0,
                blobs=self._blobs,
                max_payload_bytes=self.executor.config.max_payload_bytes,
            )
        except inputs.InputDeadline as exc:  # the lease ended: a timeout, nobody's bad input
            raise TaskFailed(
                f"deadline exceeded: input download {exc}", requester_fault=False
            ) from exc
        except RemoteProtocolError as exc:
            raise TaskFailed(f"bad input: {exc}", requester_fault=True) from exc
        except inputs.InputNotStored as exc:  # this node's disk: the task may run elsewhere
            raise TaskFailed(str(exc), requester_fault=False) from exc

    async def _off_loop(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
        """Run blocking per-task work (the RSA unwrap, hashing, the outbox fsync) in a thread
        while other tasks run, so their work goes on meanwhile (both release the GIL); run
        it inline when this task is alone, since a thread hop costs ~0.1 ms of latency."""
        if len(self.running) > 1:
            return await asyncio.to_thread(fn, *args, **kwargs)
        return fn(*args, **kwargs)

    def _commit(self, task: RunningTask, result: bytes) -> OutboxEntry:
        proof = proof_of_execution(task_id=task.task_id, result=result, node_id=self.node_id)
        finished = self.clock.now()  # the outbox keeps sub-second time for `history`
        completed_at = int(finished)
        message = {
            "task_id": task.task_id.bytes,
            "job_id": task.job_id.bytes,
            "node_id": self.node_id,
            "proof": proof,
            "result_size": len(result),
            "completed_at": completed_at,
        }
        # Recorded, signed and made durable in one transaction before anything is sent.
        return self.outbox.commit_result(
            task_id=task.task_id,
            job_id=task.job_id,
            workload_class=task.workload_class,
            slice_index=task.slice_index,
            kind="result",
            result=result,
            proof=proof,
            message=eip712.message_to_json("Result", message),
            received_at=task.received_at,
            completed_at=finished,
            sign=self._sign_result,
            coordinator_id=task.coordinator_id,
        )

    def _sign_result(self, message_json: dict[str, Any]) -> bytes:
        message = eip712.message_from_json("Result", message_json)
        return eip712.sign_typed(self._node_key, "Result", message, chain_id=self.chain_id)
