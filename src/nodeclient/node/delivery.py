"""Sending to the coordinator (2.3.7 Signed Return): the outbox's committed results,
sent again until the coordinator acknowledges them, signed rejects, and the
acknowledgements written back to the outbox.

A result goes only to the coordinator that dispatched it; the coordinator accepts exactly
once and answers a repeat "duplicate", so resending is always safe.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import sqlite3
import time
import uuid
from collections.abc import Coroutine
from typing import Any, Final

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from nodeclient import logs
from nodeclient.clock import Clock, PeerClock
from nodeclient.errors import NodeClientError
from nodeclient.node.outbox import Outbox, OutboxEntry
from nodeclient.protocol import eip712, messages
from nodeclient.protocol.secp import Secp256k1Key
from nodeclient.protocol.session import NodeSession

log = logging.getLogger("nodeclient.node")

# An acknowledgement whose write fails (a locked or failing disk) is tried again after
# these pauses; the frames after it wait meanwhile, so that a dispatch right after it sees
# the backlog it leaves.
ACK_RETRY_S: Final = (0.05, 0.2, 0.5)
# While the backlog is full, the coordinator's unacknowledged results are sent again at
# most this often (and not within this long of a reconnect, which sends them anyway), so
# that one whose acknowledgement was lost is answered again without waiting for a reconnect.
RESEND_FULL_BACKLOG_S: Final = 300.0
# The job of each of the tasks this node last sent a result or a reject of: the
# coordinator's answer names the task alone, and its log event names the job too
# (docs/operator.md, Logs). More than a full backlog (max_unacknowledged_results).
JOBS_REMEMBERED: Final = 4096


class ResultDelivery:
    """The daemon's sending half, the lowest of NodeDaemon's layers (then TaskDispatcher,
    LinkClient): NodeDaemon.__init__ sets the attributes declared here."""

    node_id: str
    chain_id: int
    outbox: Outbox
    clock: Clock
    # The coordinator's clock by its heartbeat acks: what a dispatch without sent_at (from
    # a coordinator before it) is read against.
    coordinator_clock: PeerClock
    session: NodeSession
    _node_key: Secp256k1Key
    _ws: ClientConnection | None
    _pending_sends: set[asyncio.Future[object]]
    _resend: asyncio.Future[object] | None  # a resend of a full backlog
    _resent_at: float  # time.monotonic() of the last backlog sent

    @functools.cached_property
    def _jobs(self) -> dict[uuid.UUID, uuid.UUID]:
        """task_id -> job_id of the last JOBS_REMEMBERED tasks sent (a result or a reject),
        the latest last."""
        return {}

    def _remember_job(self, task_id: uuid.UUID, job_id: uuid.UUID) -> None:
        self._jobs.pop(task_id, None)
        self._jobs[task_id] = job_id
        if len(self._jobs) > JOBS_REMEMBERED:
            del self._jobs[next(iter(self._jobs))]

    def _ids(self, task_id: uuid.UUID) -> dict[str, str]:
        """The log fields that name a task the coordinator answers about: its task_id, and
        its job_id when this node sent it lately."""
        job_id = self._jobs.get(task_id)
        ids = {"task_id": str(task_id)}
        if job_id is not None:
            ids["job_id"] = str(job_id)
        return ids

    async def _send_backlog(self) -> None:
        """Send this link's coordinator its unacknowledged results (those it dispatched, and
        those recorded before coordinator ids were), after a restart too, one at a time.

        Other coordinators' results wait for theirs. Whatever goes wrong with one entry is
        that entry's alone: a damaged one is closed as lost (``_result_frame``), and any
        other error is logged and the next one sent, so that no entry can end every link
        before its first frame is read. A failing disk keeps the link too: the rest are
        sent after the next reconnect; so are they if the link goes meanwhile.
        """
        try:
            for entry in self.outbox.iter_pending(coordinator_id=self.session.coordinator_id):
                try:
                    if not await self._deliver(entry):
                        return  # the link went: the rest wait for the next one
                except Exception:  # a bug: say so, and send the rest
                    log.exception(
                        "outbox.resend_failed",
                        extra={"task_id": str(entry.task_id), "job_id": str(entry.job_id)},
                    )
        except Exception as exc:  # a failing disk (OSError, sqlite3.Error), or a bug
            log.error(
                "outbox.pending_failed",
                extra={"error": f"{type(exc).__name__}: {exc}"[:300]},
                exc_info=None if isinstance(exc, OSError | sqlite3.Error) else exc,
            )

    def _resend_full_backlog(self) -> None:
        """The backlog is full: send it again, in the background, unless that was done (or
        a link came up) within RESEND_FULL_BACKLOG_S. An acknowledgement lost here (its
        write failed) is answered again ("duplicate"), so new work is taken again without
        waiting for a reconnect."""
        now = time.monotonic()
        busy = self._resend is not None and not self._resend.done()
        if busy or now - self._resent_at < RESEND_FULL_BACKLOG_S:
            return
        self._resent_at = now
        # Asked for while a dispatch is refused, inside its task's log context: the
        # backlog is no part of that task, and each result logs its own ids.
        self._resend = self._background(
            self._send_backlog(), context=logs.context_without("task_id", "job_id")
        )

    async def _record_ack(self, msg: messages.ResultAck) -> bool:
        """Write the coordinator's answer to a result in the outbox (off the event loop),
        tried again after each of ACK_RETRY_S on an error ("database is locked", a failing
        disk); whether it was written. Only an entry of the answering coordinator (or one
        recorded before coordinator ids were) is settled."""
        at, pauses = self.clock.now(), iter(ACK_RETRY_S)
        while True:
            try:
                await asyncio.to_thread(
                    self.outbox.mark_acked,
                    msg.task_id,
                    status=msg.status,
                    reason=msg.reason,
                    at=at,
                    coordinator_id=self.session.coordinator_id,
                )
            except Exception:  # e.g. a failing disk: keep the link
                pause = next(pauses, None)
                if pause is None:
                    # The result stays unacknowledged and is sent again on the next
                    # reconnect (or while the backlog is full), which is safe: the
                    # coordinator answers a duplicate with the same ack.
                    log.exception("result.ack_failed", extra=self._ids(msg.task_id))
                    return False
                await asyncio.sleep(pause)
            else:
                return True

    def _background(
        self, coro: Coroutine[Any, Any, object], *, context: contextvars.Context | None = None
    ) -> asyncio.Future[object]:
        """Run *coro* as a task of its own, kept until it ends; in *context* (by default a
        copy of the current one, with its log fields)."""
        task = asyncio.get_running_loop().create_task(coro, context=context)
        self._pending_sends.add(task)
        task.add_done_callback(self._pending_sends.discard)
        return task

    async def _deliver(self, entry: OutboxEntry) -> bool:
        """Send a committed outbox entry; it stays queued until the coordinator acks it.
        Whether it went out (no link, a link that closed, or one to a coordinator other
        than the entry's: it waits for the next link, or for that coordinator's). An entry
        that can never be sent is closed as lost (``_result_frame``): True, the link took
        nothing but is fine."""
        frame = self._result_frame(entry)
        return frame is None or await self._send_result(entry, frame)

    def _result_frame(self, entry: OutboxEntry) -> dict[str, Any] | None:
        """The signed result frame of an outbox entry; None for one whose stored message
        or signature cannot make one (damaged on disk, edited by hand), which can never be
        sent: it is closed as lost, as the outbox closes a damaged row, and logged once."""
        try:
            if entry.signature is None:  # commit_result signs every row it writes
                raise ValueError("the result was never signed")
            message = eip712.message_from_json("Result", entry.message)
            return messages.signed_frame(
                "result", message, entry.signature, raw=True, result=entry.result
            )
        except (NodeClientError, ValueError, TypeError, KeyError, AttributeError) as exc:
            why = f"its stored message cannot be sent ({type(exc).__name__}: {exc})"
            try:
                self.outbox.close_lost(entry.task_id, why)
            except (OSError, sqlite3.Error) as error:  # it stays, and is tried again later
                log.error("outbox.pending_failed", extra={"error": str(error)})
            return None

    async def _send_result(self, entry: OutboxEntry, frame: dict[str, Any]) -> bool:
        """Send *frame*, the entry's, to the coordinator that dispatched it: never to
        another (it does not know the task, and would answer "unknown task"). Whether
        the link took it."""
        if entry.coordinator_id not in (None, self.session.coordinator_id):
            return False
        if not await self._send(frame):
            return False
        self._remember_job(entry.task_id, entry.job_id)
        log.info(
            "result.sent",
            extra={
                "task_id": str(entry.task_id),
                "job_id": str(entry.job_id),
                "proof": "0x" + (entry.proof or b"").hex(),
            },
        )
        return True

    async def _reject(
        self,
        task_id: uuid.UUID,
        reason: str,
        *,
        job_id: uuid.UUID,
        lease_expires_at: int | None,
        counted: bool = True,
    ) -> None:
        """Refuse a dispatch of *task_id* (of *job_id*, named in the logs only), signed
        (2.3.7). *lease_expires_at* is that dispatch's: sent beside the signed Reject, it
        tells the coordinator which lease of the task this refuses, so that a late reject
        cannot end a newer lease of the same task to this node (None: not known, and not
        sent). Counted in the status's ``rejected`` unless *counted* is False (a task
        counted as timed out: one task, one counter)."""
        if counted:
            self.outbox.tally("rejected")
        message = {
            "task_id": task_id.bytes,
            "node_id": self.node_id,
            "reason": reason[: messages.MAX_REASON],
            "rejected_at": int(self.clock.now()),
        }
        sig = eip712.sign_typed(self._node_key, "Reject", message, chain_id=self.chain_id)
        self._remember_job(task_id, job_id)
        log.warning(
            "task.rejected",
            extra={"task_id": str(task_id), "job_id": str(job_id), "reason": reason},
        )
        frame = messages.signed_frame("reject", message, sig)
        if lease_expires_at is not None:  # unsigned, beside the message: the Reject type is fixed
            frame["lease_expires_at"] = lease_expires_at
        await self._send(frame)

    async def _send(self, frame: dict[str, Any]) -> bool:
        """Send *frame* on the live link; whether it went out (results that did not wait in
        the outbox; rejects are re-derived via lease expiry)."""
        ws = self._ws
        if ws is None:
            return False
        try:
            await ws.send(messages.encode_frame(frame, binary=self.session.binary))
        except ConnectionClosed:
            return False
        return True
