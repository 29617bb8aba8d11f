"""The node daemon: the asyncio adapter around the protocol core (2.3.3 to 2.3.8).

Per task: receive -> decrypt (2.3.4, in this process) -> execute (2.3.5, in a worker
process) -> proof (2.3.6) -> record in the outbox, then sign (2.3.7) -> send -> mark done
on acknowledgement. The outbox makes delivery survive kill -9 and restarts; the
coordinator accepts exactly once, so resending is always safe.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import json
import logging
import os
import random
import signal
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

import httpx
from cryptography.hazmat.primitives.asymmetric import rsa
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from nodeclient import httpbody, logs
from nodeclient.clock import Clock
from nodeclient.errors import EnvelopeError, NeedsOperator, NodeClientError, RemoteProtocolError
from nodeclient.node import control, inputs, sandbox
from nodeclient.node.executor import Executor, TaskFailed
from nodeclient.node.metrics import NodeMetrics
from nodeclient.node.outbox import Outbox, OutboxCorrupt, OutboxEntry
from nodeclient.node.sandbox import describe_mode
from nodeclient.protocol import eip712, envelope, messages
from nodeclient.protocol import manifest as manifest_mod
from nodeclient.protocol.proof import proof_of_execution
from nodeclient.protocol.secp import Secp256k1Key
from nodeclient.protocol.session import CoordinatorMismatch, NodeSession, backoff
from nodeclient.protocol.states import UNSTAKE_COOLDOWN_S, NodeState, StateMachine

log = logging.getLogger("nodeclient.node")
_T = TypeVar("_T")

# The node's link client options (the scale benchmark's simulated nodes use them too).
# Signed heartbeats already prove liveness both ways; a slow WebSocket ping only catches
# a half-open connection, so it need not add frames at the heartbeat's rate.
LINK_OPTIONS: Final[dict[str, Any]] = {
    "max_size": messages.MAX_DATA_FRAME,
    "open_timeout": 10,
    "ping_interval": 60,
    "ping_timeout": 30,
    "compression": None,  # small JSON or encrypted bytes: nothing to gain, CPU to lose
}
CLOSE_NOT_REGISTERED: Final = 4003
CLOSE_AUTH_FAILED: Final = 4001
CLOSE_REPLACED: Final = 4004
# An authenticated session that lasted this long resets the reconnect backoff, however it
# ended; one that ends sooner (even with a clean close) backs off further.
STABLE_LINK_S: Final = 10.0
_UNANSWERED_HEARTBEATS: Final = 64  # send times kept for the round trip of their acks
# Unacknowledged results a heartbeat lists as held (about 40 bytes each in its JSON: the
# frame stays far below the 64 KiB a control frame may have).
HEARTBEAT_HELD_RESULTS: Final = 512
# A link replaced (4004) by another process with this node's keys: the daemon links
# again after this pause; replaced again within the window, it stops (LinkReplaced).
REPLACED_PAUSE_S: Final = 60.0
REPLACED_WINDOW_S: Final = 900.0
MAX_ANSWER_BYTES: Final = 1 << 20  # a registration answer is a few hundred bytes
# An acknowledgement whose write fails (a locked or failing disk) is tried again after
# these pauses; the frames after it wait meanwhile, so that a dispatch right after it sees
# the backlog it leaves.
ACK_RETRY_S: Final = (0.05, 0.2, 0.5)
# While the backlog is full, the coordinator's unacknowledged results are sent again at
# most this often (and not within this long of a reconnect, which sends them anyway), so
# that one whose acknowledgement was lost is answered again without waiting for a reconnect.
RESEND_FULL_BACKLOG_S: Final = 300.0


@dataclass(frozen=True, slots=True)
class Retention:
    """How long acknowledged results' bytes are kept (``result_retention_*`` in config),
    and their history rows (``history_retention_days``; 0 keeps them for ever)."""

    seconds: float = 72 * 3600.0
    bytes: int = 4096 << 20
    every: float = 3600.0  # how often prune runs (and once at start)
    history_seconds: float = 180 * 86400.0
    # Results awaiting acknowledgement are never dropped, so past this many new work is
    # refused (``max_unacknowledged_results``): a coordinator that takes results and never
    # acknowledges them cannot fill the disk.
    max_unacknowledged: int = 256


_REPLACED_FIX: Final = (
    "another connection with this node's key replaced this link: two daemons are running "
    "with the same node key (a copied node home?). This one cancelled its running tasks, "
    "and stops if it is replaced again, so that the two do not both run and sign the same "
    "tasks. Each node needs its own home, made with `nodeclient init`. If no other daemon "
    "of yours runs, someone has this node's liveness key: run `nodeclient keys "
    "rotate-liveness`, then start this one again"
)


def _pruned_reason(entry: OutboxEntry) -> str:
    if entry.ack_status == "lost":
        return (
            "already completed, but this node's stored result could not be read and was "
            "given up as lost; the task is not run again"
        )
    return (
        f"already completed and acknowledged ({entry.ack_status}); its result is past this "
        "node's retention and no longer held, so the task is not run again"
    )


class RegistrationRefused(NeedsOperator):
    """The coordinator refused the manifest for a reason retrying will not fix (exit 78:
    the systemd unit does not restart it; the operator has to act first)."""


class LinkReplaced(NeedsOperator):
    """Another process linked with this node's keys, and the coordinator closed this
    daemon's live link for it (4004), twice within REPLACED_WINDOW_S. Linking again
    would close the other one in turn, and the two would take turns for ever, each
    running tasks the other may be given again after a lease ends: this one stops
    instead (exit 78)."""


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


@dataclass
class LinkInfo:
    status: str = "down"  # down | connecting | up
    since: float = 0.0
    last_heartbeat_ack: float | None = None
    rtt_ms: float | None = None
    reconnects: int = 0
    last_error: str = ""
    sent_at: dict[int, float] = field(default_factory=dict)


class NodeDaemon:
    def __init__(
        self,
        *,
        home: Path,
        coordinator_url: str,
        chain_id: int,
        node_key: Secp256k1Key,
        liveness_key: Secp256k1Key,
        payload_key: rsa.RSAPrivateKey,
        manifest: dict[str, Any],
        executor: Executor,
        outbox: Outbox,
        clock: Clock,
        heartbeat_interval: float,
        shutdown_grace: float = 60.0,
        metrics: NodeMetrics | None = None,
        retention: Retention | None = None,
    ) -> None:
        self.home = home
        self.url = coordinator_url.rstrip("/")
        self.chain_id = chain_id
        self.node_id = node_key.address
        self._node_key = node_key
        self._payload_key = payload_key
        self.manifest = manifest
        self.executor = executor
        self.outbox = outbox
        self.clock = clock
        self.heartbeat_interval = heartbeat_interval
        self.shutdown_grace = shutdown_grace
        self.retention = retention if retention is not None else Retention()
        self.slots = int(manifest["max_parallel_subtasks"])
        self.classes = frozenset(manifest["workload_classes"])
        self.state = StateMachine(clock=clock.now, logger=log)
        self.session = NodeSession(
            node_id=self.node_id, liveness_key=liveness_key, chain_id=chain_id, clock=clock.now
        )
        self.link = LinkInfo()
        self.running: dict[uuid.UUID, RunningTask] = {}
        self.metrics = metrics if metrics is not None else NodeMetrics()
        self._started_mono = time.monotonic()  # uptime: immune to the wall clock's steps
        self._ws: ClientConnection | None = None
        self._stopping = asyncio.Event()
        self._rand = random.SystemRandom()
        self._fatal: NeedsOperator | None = None
        self._replaced_at: float | None = None  # when another process last took the link
        self._pause = 0.0  # the next reconnect waits at least this long
        self._fetch = inputs.http_fetcher(self.url)
        # Downloads of task inputs run here, so that a slow source can hold at most one
        # thread per slot, never the default pool's threads that commit and ack results.
        self._fetch_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.slots, thread_name_prefix="nodeclient-fetch"
        )
        self._blobs = inputs.blob_cache(home / "blobs")  # render scenes, fetched once
        self._pending_sends: set[asyncio.Future[object]] = set()
        self._resend: asyncio.Future[object] | None = None  # a resend of a full backlog
        self._resent_at = -RESEND_FULL_BACKLOG_S  # time.monotonic() of the last backlog sent

    @property
    def rejected(self) -> int:
        """Signed rejects sent (but for tasks that timed out), kept across restarts."""
        return self.outbox.tallies()["rejected"]

    @property
    def timed_out(self) -> int:
        """Tasks that ended at their lease's end, kept across restarts."""
        return self.outbox.tallies()["timed_out"]

    # --- lifecycle -------------------------------------------------------------------------

    async def run(self) -> int:
        logs.bind_global(node_id=self.node_id)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        server = await control.serve(self.home / control.SOCKET_NAME, self._control)
        log.info("daemon.start", extra={"coordinator": self.url, "slots": self.slots})
        try:
            await self.executor.warm_up()
            link = asyncio.create_task(self._link_loop())
            refresh = asyncio.create_task(self._refresh_metrics())
            prune = asyncio.create_task(self._prune_results())
            # The link loop retries every error, and ends by itself only after setting
            # _stopping (a refused registration). Ending any other way is a bug that would
            # leave the process alive to systemd but never again in touch with the
            # coordinator: stop as for SIGTERM, and exit 1, so that the unit's
            # Restart=on-failure starts a fresh process.
            stop = asyncio.create_task(self._stopping.wait())
            await asyncio.wait((link, stop), return_when=asyncio.FIRST_COMPLETED)
            status = 0 if self._stopping.is_set() else self._link_ended(link)
            await self._drain()
            link.cancel()
            refresh.cancel()
            prune.cancel()
            # Its exception, if any, is logged (_link_ended) or kept in self._fatal.
            await asyncio.gather(link, return_exceptions=True)
            if self._fatal is not None:
                raise self._fatal
        finally:
            server.close()
            with contextlib.suppress(FileNotFoundError):
                (self.home / control.SOCKET_NAME).unlink()
            self._fetch_pool.shutdown(wait=False, cancel_futures=True)
            await self.executor.aclose()
        log.info("daemon.stop", extra={"backlog": self.outbox.backlog(), "exit_status": status})
        return status

    def _link_ended(self, link: asyncio.Task[None]) -> int:
        """The link task ended without a stop request: log why, stop, and return 1."""
        exc = None if link.cancelled() else link.exception()
        if exc is not None:
            error = f"{type(exc).__name__}: {exc}"
        else:
            error = "cancelled" if link.cancelled() else "returned"
        log.error("link.task_ended", extra={"error": error[:300]}, exc_info=exc)
        self.link.last_error = error[:300]
        self._set_link("down")
        self.request_stop()
        return 1

    async def _refresh_metrics(self) -> None:
        """Keep the Prometheus gauges current (2.3.8); counters are bumped where tasks end."""
        while True:
            self.metrics.update_status(self.status())
            await asyncio.sleep(1.0)

    async def _prune_results(self) -> None:
        """Drop acknowledged results past the retention window or byte budget, hourly."""
        while True:
            try:
                dropped = await asyncio.to_thread(
                    self.outbox.prune,
                    acked_before=self.clock.now() - self.retention.seconds,
                    keep_bytes=self.retention.bytes,
                )
                forgotten = 0
                if self.retention.history_seconds > 0:
                    forgotten = await asyncio.to_thread(
                        self.outbox.forget,
                        acked_before=self.clock.now() - self.retention.history_seconds,
                    )
            except (OSError, sqlite3.Error) as exc:  # a full or failing disk: try again later
                log.error("outbox.prune_failed", extra={"error": str(exc)})
            else:
                if dropped or forgotten:
                    log.info("outbox.pruned", extra={"results": dropped, "rows": forgotten})
            await asyncio.sleep(self.retention.every)

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
                task.handle.cancel()
                self._task_ended(task, "cancelled")

    def request_stop(self) -> None:
        """SIGTERM: take no new work, finish running tasks (hand back, signed, those still
        running after shutdown_grace), flush the outbox, exit 0."""
        if not self._stopping.is_set():
            log.info("daemon.stopping", extra={"running": len(self.running)})
            self._stopping.set()

    async def _drain(self) -> None:
        handles = [t.handle for t in self.running.values() if t.handle is not None]
        if handles:
            await asyncio.wait(handles, timeout=self.shutdown_grace)
        await self._hand_back()
        deadline = time.monotonic() + 10.0
        # Only what this link sends: another coordinator's results wait for that one.
        mine = self.session.coordinator_id
        while self.outbox.backlog(mine) and self._ws is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def _hand_back(self) -> None:
        """At the end of shutdown_grace: cancel the tasks still running and refuse each,
        signed and naming its lease, while the link is still up, so that the coordinator
        leases them to another node now rather than when their leases end. A task whose
        result is being committed (finishing) is left to end: its result is sent instead;
        one already cancelled (the coordinator's Cancel) needs no refusal."""
        left = [
            (t, t.handle)
            for t in self.running.values()
            if t.handle is not None
            and not t.handle.done()
            and not t.finishing
            and t.outcome is None
        ]
        for task, handle in left:  # first, so that none of them can still commit a result
            handle.cancel()
            self._task_ended(task, "cancelled")
        for task, _ in left:
            await self._reject(
                task.task_id,
                f"{messages.DRAINING_PREFIX}node shutting down: the task did not finish "
                f"within {self.shutdown_grace:g} s",
                lease_expires_at=task.lease_expires_at,
            )
        if left:  # their workers are killed as they unwind
            await asyncio.wait([handle for _, handle in left], timeout=10.0)

    # --- registration and link ----------------------------------------------------------------

    async def register(self) -> dict[str, Any]:
        self.manifest = manifest_mod.reissue_manifest(
            self.manifest,
            node_key=self._node_key,
            payload_key=self._payload_key,
            issued_at=int(self.clock.now()),
            chain_id=self.chain_id,
        )
        async with httpx.AsyncClient(timeout=30.0) as client:
            request = client.build_request(
                "POST", f"{self.url}/v1/nodes", json=self.manifest, headers=httpbody.IDENTITY
            )
            resp = await client.send(request, stream=True)
            try:  # read as sent, never inflated, and no more than an answer could hold
                content = await httpbody.aread(resp, limit=MAX_ANSWER_BYTES)
            except httpbody.AnswerRefused as exc:  # retried, as any failed registration
                raise httpx.HTTPError(f"registration failed: {exc}: check --coordinator") from exc
            finally:
                await resp.aclose()
        text = content.decode("utf-8", "replace")
        try:
            body = json.loads(content) if content else {}
        except (ValueError, RecursionError):  # not JSON, not UTF-8, nested without end
            body = None
        if not isinstance(body, dict):
            # Not the coordinator's answer (a reverse proxy's HTML error page, a redirect):
            # retried with backoff, whatever the status code.
            kind = resp.headers.get("content-type", "no content type")
            raise httpx.HTTPError(
                f"registration failed ({resp.status_code}): the answer is not a JSON object "
                f"({kind}): {text[:200]!r}"
            )
        if resp.status_code in (200, 201):
            coordinator = body.get("coordinator_id")
            self.session.registered_with = coordinator if isinstance(coordinator, str) else None
            prior = body.get("prior_registrations")  # only logged: never a reason to fail
            log.info(
                "node.registered",
                extra={
                    "status": body.get("status"),
                    "prior": len(prior) if isinstance(prior, list) else 0,
                    "coordinator_id": self.session.registered_with,
                },
            )
            return body
        error = body.get("error")
        reason = error if isinstance(error, str) and error else text[:300] or "no reason"
        # Final (exit 78, no restart) only for the coordinator's own refusal: a 4xx with its
        # {"error": ...}, but 409 (below). 408 and 429 (a proxy's timeout or rate limit)
        # pass, and so does a 4xx without the coordinator's error (an empty 404 or 403
        # from a proxy in front of it, mid-deploy): retried with backoff, and shown in
        # status meanwhile.
        refusal = isinstance(error, str) and bool(error)
        if resp.status_code == 409:
            # "stale manifest": the one on record was issued later, on a clock that ran
            # up to 5 min ahead and was then set right. Each try issues a new manifest, so
            # this clears by itself once this clock passes it: retried, not final.
            raise httpx.HTTPError(
                f"registration refused for now ({resp.status_code}): {reason}; retried until "
                "this node's clock passes the registered manifest's issued_at"
            )
        if 400 <= resp.status_code < 500 and resp.status_code not in (408, 429) and refusal:
            raise RegistrationRefused(f"registration refused ({resp.status_code}): {reason}")
        raise httpx.HTTPError(f"registration failed ({resp.status_code}): {reason}")

    async def _link_loop(self) -> None:
        delays = backoff(rand=self._rand.random)
        registered = False
        while not self._stopping.is_set():
            try:
                if not registered:
                    await self.register()
                    registered = True
                await self._connect_once()
            except RegistrationRefused as exc:
                log.error("node.registration_refused", extra={"reason": str(exc)})
                self.link.last_error = str(exc)
                self._fatal = exc
                self._stopping.set()
                raise
            except ConnectionClosed as exc:
                if self._link_closed(exc):
                    # The coordinator lost the node's record (a restored database), or
                    # refused its auth (a clock that jumped): register again, freshly issued.
                    registered = False
            except (OSError, httpx.HTTPError, InvalidHandshake, InvalidURI, TimeoutError) as exc:
                self.link.last_error = f"{type(exc).__name__}: {exc}"[:300]
                log.warning("link.error", extra={"error": self.link.last_error})
            except CoordinatorMismatch as exc:  # its id changed, or a relay: ask it again
                self.link.last_error = str(exc)
                log.error("link.coordinator_mismatch", extra={"error": str(exc)})
                registered = False
            except RemoteProtocolError as exc:
                self.link.last_error = str(exc)
                log.error("link.protocol_error", extra={"error": str(exc)})
            except Exception as exc:  # a bug: say so, and reconnect like after any other error
                self.link.last_error = f"{type(exc).__name__}: {exc}"[:300]
                log.error("link.error", extra={"error": self.link.last_error}, exc_info=exc)
            # Reset after a session that was authenticated and stayed up, however it ended:
            # drops spread over months must not add up to the cap, and a coordinator that
            # closes every link at once (even cleanly) must not be hammered.
            if self.link.status == "up" and self.clock.now() - self.link.since >= STABLE_LINK_S:
                delays = backoff(rand=self._rand.random)
            self._set_link("down")
            if self._stopping.is_set():
                break
            self.link.reconnects += 1
            delay, self._pause = max(next(delays), self._pause), 0.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=delay)

    def _link_closed(self, exc: ConnectionClosed) -> bool:
        """Log how the coordinator closed the link; True when the node must register again.

        4004 on the live link means another process linked with this node's keys: cancel
        the running tasks and link again after REPLACED_PAUSE_S; the second time within
        REPLACED_WINDOW_S, stop (LinkReplaced) rather than replace that link in turn.
        """
        code = exc.rcvd.code if exc.rcvd else None
        reason = exc.rcvd.reason if exc.rcvd else ""
        self.link.last_error = f"closed {code}: {reason}"
        if code != CLOSE_REPLACED:
            log.warning("link.closed", extra={"code": code, "reason": reason})
            return code in (CLOSE_NOT_REGISTERED, CLOSE_AUTH_FAILED)
        if self._stopping.is_set():  # stopping anyway: nothing more to do
            log.error("link.replaced", extra={"code": code, "reason": reason})
            return False
        # The running tasks go either way: the other process holds the link now.
        self._abandon_running()
        now = self.clock.now()
        again = self._replaced_at is not None and now - self._replaced_at <= REPLACED_WINDOW_S
        self._replaced_at = now
        log.error(
            "link.replaced",
            extra={
                "code": code,
                "reason": reason,
                "action": "stopping" if again else f"linking again in {REPLACED_PAUSE_S:.0f} s",
                "fix": _REPLACED_FIX,
            },
        )
        if not again:  # once may be a fluke (a proxy's): link again, after a pause
            self._pause = REPLACED_PAUSE_S
            return False
        self._fatal = LinkReplaced(_REPLACED_FIX)
        self._set_link("down")
        self._stopping.set()
        raise self._fatal from None

    def _set_link(self, status: str) -> None:
        if self.link.status != status:
            self.link.status = status
            self.link.since = self.clock.now()
            log.info("link.status", extra={"link": status})
        if status != "up":
            self._ws = None
            self.session.connection_lost()

    async def _connect_once(self) -> None:
        ws_url = "ws" + self.url[len("http") :] + "/v1/link"
        self._set_link("connecting")
        async with connect(ws_url, **LINK_OPTIONS) as ws:
            challenge = messages.parse_from_coordinator(await asyncio.wait_for(ws.recv(), 10))
            if not isinstance(challenge, messages.Challenge):
                raise RemoteProtocolError("expected a challenge as the first frame")
            await ws.send(json.dumps(self.session.on_challenge(challenge)))
            welcome = messages.parse_from_coordinator(await asyncio.wait_for(ws.recv(), 10))
            if not isinstance(welcome, messages.Welcome):
                raise RemoteProtocolError(f"expected welcome, got {type(welcome).__name__}")
            self.session.on_welcome(welcome)
            self._ws = ws
            self._set_link("up")
            self._apply_unstaking()
            log.info("link.authenticated", extra={"coordinator_id": challenge.coordinator_id})
            beat = asyncio.create_task(self._heartbeats(ws, challenge.heartbeat_interval))
            try:
                self._resent_at = time.monotonic()
                await self._send_backlog()
                async for frame in ws:
                    await self._on_frame(frame)
            finally:
                beat.cancel()
                if self._resend is not None:  # a full backlog's, on this link
                    self._resend.cancel()
                # Its own end (a send on the closed link, usually) is the link's: retrieve it,
                # so that asyncio does not log it later as an exception never retrieved.
                await asyncio.gather(beat, return_exceptions=True)

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
                    log.exception("outbox.resend_failed", extra={"task_id": str(entry.task_id)})
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
        self._resend = self._background(self._send_backlog())

    async def _heartbeats(self, ws: ClientConnection, coordinator_interval: float) -> None:
        interval = min(self.heartbeat_interval, coordinator_interval)
        while True:
            # The tasks this node holds: running, and (the oldest few hundred) finished with
            # a result this coordinator has not acknowledged yet, which it may be sending
            # now. The coordinator re-queues at once a lease its node does not hold.
            held = self.outbox.pending_ids(
                coordinator_id=self.session.coordinator_id, limit=HEARTBEAT_HELD_RESULTS
            )
            running = list(dict.fromkeys([*self.running, *held]))
            load = int(os.getloadavg()[0] / max(1, os.cpu_count() or 1) * 1000)
            frame = self.session.heartbeat(
                state=self.state.state, running=running, load_permille=load
            )
            self.link.sent_at[self.session.seq] = time.monotonic()
            if len(self.link.sent_at) > _UNANSWERED_HEARTBEATS:  # a coordinator that never acks
                del self.link.sent_at[min(self.link.sent_at)]
            await ws.send(json.dumps(frame))
            await asyncio.sleep(interval)

    async def _on_frame(self, frame: str | bytes) -> None:
        try:
            msg = messages.parse_from_coordinator(frame)
        except RemoteProtocolError as exc:
            log.warning("link.bad_frame", extra={"error": str(exc)})
            return
        if isinstance(msg, messages.HeartbeatAck):
            sent = self.link.sent_at.pop(msg.seq, None)
            self.link.sent_at = {s: t for s, t in self.link.sent_at.items() if s > msg.seq}
            if sent is not None:
                self.link.rtt_ms = round((time.monotonic() - sent) * 1000, 2)
            self.link.last_heartbeat_ack = self.clock.now()
            self.session.on_heartbeat_ack(msg)
            self._apply_unstaking()
        elif isinstance(msg, messages.Dispatch):
            await self._on_dispatch(msg)
        elif isinstance(msg, messages.ResultAck) and msg.of == "reject":
            # Rejects are not kept in the outbox: the answer settles nothing there (a result
            # of the same task, committed for a newer lease, waits for its own answer).
            level = logging.INFO if msg.status == "accepted" else logging.WARNING
            log.log(
                level,
                "reject.ack",
                extra={"task_id": str(msg.task_id), "status": msg.status, "reason": msg.reason},
            )
        elif isinstance(msg, messages.ResultAck):
            if not await self._record_ack(msg):
                return
            level = logging.INFO if msg.status != "rejected" else logging.WARNING
            log.log(
                level,
                "result.ack",
                extra={"task_id": str(msg.task_id), "status": msg.status, "reason": msg.reason},
            )
        elif isinstance(msg, messages.Cancel):
            task = self.running.get(msg.task_id)
            if task and task.finishing:  # executed: its result is committed and sent anyway
                log.info("task.cancel_too_late", extra={"task_id": str(msg.task_id)})
            elif task and task.handle:
                task.handle.cancel()
                timed_out = msg.reason == "lease ended"  # the coordinator's lease expired
                self._task_ended(task, "timed_out" if timed_out else "cancelled")
                log.info(
                    "task.cancelled", extra={"task_id": str(msg.task_id), "reason": msg.reason}
                )
        elif isinstance(msg, messages.ErrorFrame):
            log.warning("link.error_frame", extra={"code": msg.code, "reason": msg.reason})

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
                    log.exception("result.ack_failed", extra={"task_id": str(msg.task_id)})
                    return False
                await asyncio.sleep(pause)
            else:
                return True

    def _apply_unstaking(self) -> None:
        if self.session.unstaking_until is not None and self.state.state is not NodeState.UNSTAKING:
            self.state.transition(NodeState.UNSTAKING, reason="unstake accepted by the coordinator")

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
            reason = self._refusal(d)
            if reason:
                self._ended(d.workload_class, "rejected", self.clock.now())
                await self._reject(d.task_id, reason, lease_expires_at=d.lease_expires_at)
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
            self.running[d.task_id] = task
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
        await self._reject(d.task_id, reason, lease_expires_at=d.lease_expires_at)

    async def _on_redispatch(self, running: RunningTask, d: messages.Dispatch) -> None:
        """The coordinator leased a task again while it still runs here (its last lease
        ended, and no other node could take it)."""
        if running.outcome is not None:  # cancelled, still unwinding: refuse the new lease
            await self._reject(
                d.task_id,
                "the task was cancelled here and is still stopping; lease it again later",
                lease_expires_at=d.lease_expires_at,
            )
            return
        # It runs on, to the new lease's end, and a reject of it names the new lease, or
        # the coordinator would take it for the old one's and ignore it.
        running.lease_expires_at = d.lease_expires_at
        until = time.monotonic() + max(0.0, d.lease_expires_at - self.clock.now())
        if running.fetch_limits is not None:  # its inputs may still be downloading
            running.fetch_limits.extend(until)
        self.executor.extend(d.task_id, until)
        log.info("task.lease_renewed", extra={"task_id": str(d.task_id)})

    def _free_slot(self, task: RunningTask) -> None:
        """The task no longer holds its slot (once: both ends of a task call this)."""
        if self.running.get(task.task_id) is task:
            del self.running[task.task_id]
            if not self.running and self.state.state is NodeState.EXECUTING:
                self.state.transition(NodeState.IDLE, reason="the last running task finished")

    def _task_gone(self, task: RunningTask, handle: asyncio.Task[None]) -> None:
        """A task's coroutine has ended, however: even cancelled before its first step
        (a cancel read in the same turn as its dispatch), when its ``finally`` never ran."""
        self._free_slot(task)
        if not handle.cancelled() and handle.exception() is not None:  # a bug: say so
            log.error(
                "task.crashed", extra={"task_id": str(task.task_id)}, exc_info=handle.exception()
            )

    def _refusal(self, d: messages.Dispatch) -> str:  # noqa: PLR0911 (one return a reason)
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
        if d.lease_expires_at < self.clock.now():
            return "lease already expired"
        return self.executor.admission(d.resources)  # 2.3.5: never run out of memory

    async def _execute(self, task: RunningTask, d: messages.Dispatch) -> None:
        with logs.bind(task_id=str(task.task_id), job_id=str(task.job_id)):
            try:
                try:
                    payload = await self._off_loop(
                        envelope.open_envelope,
                        d.envelope,
                        private_key=self._payload_key,
                        task_id=d.task_id,
                        node_id=self.node_id,
                        now=int(self.clock.now()),
                    )
                    started = time.monotonic()
                    cache_dir = self.executor.config.cache_dir
                    if inputs.needs_fetch(task.workload_class, payload, cache_dir=cache_dir):
                        payload = await self._fetch_inputs(
                            task, payload, task.lease_expires_at or d.lease_expires_at
                        )
                    # The task's lease, renewed if it was leased here again meanwhile.
                    lease_end = task.lease_expires_at or d.lease_expires_at
                    lease_left = max(0.0, lease_end - self.clock.now())
                    result = await self.executor.run(
                        task.workload_class,
                        payload,
                        task_id=task.task_id,
                        job_id=d.job_id,  # whose worker may serve it (executor: reuse)
                        deadline=time.monotonic() + lease_left,  # the executor's clock
                        resources=d.resources,
                        on_progress=self._progress_reporter(task.task_id),
                    )
                except EnvelopeError as exc:  # only open_envelope raises it
                    self._task_ended(task, "rejected")
                    await self._reject(
                        task.task_id,
                        f"payload decryption failed: {exc}",
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
                        lease_expires_at=task.lease_expires_at,
                        counted=not timed_out,
                    )
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
                        lease_expires_at=task.lease_expires_at,
                    )
                    return
                log.info(
                    "task.executed",
                    extra={
                        "seconds": round(time.monotonic() - started, 4),
                        "result_size": len(result),
                    },
                )
                # The work is done: a cancel from here on (a lease that just ended, say)
                # no longer stops the commit, whose thread would go on anyway, nor the
                # sending of what it signed (the coordinator takes a late result).
                task.finishing = True
                await self._finish(task, result)
            except asyncio.CancelledError:
                log.info("task.cancelled")
                raise
            finally:  # at once: a dispatch right after the result finds the slot free
                self._free_slot(task)

    async def _finish(self, task: RunningTask, result: bytes) -> None:
        """Record, sign and send a finished task's result (2.3.6, 2.3.7)."""
        try:
            entry = await self._off_loop(self._commit, task, result)
        except OutboxCorrupt as exc:  # its row, of an earlier lease, is damaged: never re-sign
            log.error("outbox.result_missing", extra={"error": str(exc)})
            self._task_ended(task, "failed")
            await self._reject(
                task.task_id,
                "this node's stored result for the task is damaged",
                lease_expires_at=task.lease_expires_at,
            )
            return
        except (OSError, sqlite3.Error) as exc:  # a full or failing disk
            # Nothing was recorded, signed or sent: refuse, so the task goes elsewhere
            # now rather than when its lease runs out.
            log.error("outbox.commit_failed", extra={"error": str(exc)})
            self._task_ended(task, "failed")
            await self._reject(
                task.task_id,
                f"node could not store the result durably: {exc}"[: messages.MAX_REASON],
                lease_expires_at=task.lease_expires_at,
            )
            return
        self._task_ended(task, "completed")
        await self._deliver(entry)

    def _progress_reporter(self, task_id: uuid.UUID) -> Callable[[float, float, str], None]:
        """Forward a task's progress to the coordinator (the executor has throttled it: at
        most twice a second, and one end)."""

        def report(done: float, total: float, note: str) -> None:
            frame = messages.ProgressFrame(task_id, min(done, total), total, note[:200])
            self._background(self._send(frame.to_wire()))

        return report

    def _background(self, coro: Coroutine[Any, Any, object]) -> asyncio.Future[object]:
        task = asyncio.ensure_future(coro)
        self._pending_sends.add(task)
        task.add_done_callback(self._pending_sends.discard)
        return task

    async def _fetch_inputs(self, task: RunningTask, payload: bytes, lease_end: float) -> bytes:
        """_resolve_inputs in the fetch threads (one per slot, apart from the threads that
        commit and acknowledge results), stopped at the lease's end or a cancel."""
        limits = task.fetch_limits = inputs.FetchLimits(
            deadline=time.monotonic() + max(0.0, lease_end - self.clock.now()),
            cancelled=threading.Event(),
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
            )
        except RemoteProtocolError as exc:
            raise TaskFailed(f"bad input: {exc}", requester_fault=True) from exc

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
        log.info(
            "result.sent",
            extra={"task_id": str(entry.task_id), "proof": "0x" + (entry.proof or b"").hex()},
        )
        return True

    async def _reject(
        self,
        task_id: uuid.UUID,
        reason: str,
        *,
        lease_expires_at: int | None,
        counted: bool = True,
    ) -> None:
        """Refuse a dispatch, signed (2.3.7). *lease_expires_at* is that dispatch's: sent
        beside the signed Reject, it tells the coordinator which lease of the task this
        refuses, so that a late reject cannot end a newer lease of the same task to this
        node (None: not known, and not sent). Counted in the status's ``rejected`` unless
        *counted* is False (a task counted as timed out: one task, one counter)."""
        if counted:
            self.outbox.tally("rejected")
        message = {
            "task_id": task_id.bytes,
            "node_id": self.node_id,
            "reason": reason[: messages.MAX_REASON],
            "rejected_at": int(self.clock.now()),
        }
        sig = eip712.sign_typed(self._node_key, "Reject", message, chain_id=self.chain_id)
        log.warning("task.rejected", extra={"task_id": str(task_id), "reason": reason})
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

    # --- status ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = self.clock.now()
        until = self.session.unstaking_until
        counts, tallies = self.outbox.counts(), self.outbox.tallies()
        since = self.state.entered_at
        if self.state.state is NodeState.UNSTAKING and until is not None:
            # Since the unstake itself (the coordinator's end of the cooldown less the
            # cooldown), not since this process learnt of it after a restart.
            since = min(since, until - UNSTAKE_COOLDOWN_S)
        return {
            "node_id": self.node_id,
            "state": self.state.state.value,
            "state_since": since,
            # SIGTERM received: finishing running tasks, handing back new dispatches.
            "stopping": self._stopping.is_set(),
            "link": {
                "status": self.link.status,
                "since": self.link.since,
                "coordinator": self.url,
                "coordinator_id": self.session.coordinator_id,
                "rtt_ms": self.link.rtt_ms,
                "last_heartbeat_ack": self.link.last_heartbeat_ack,
                "reconnects": self.link.reconnects,
                "last_error": self.link.last_error,
                "heartbeat_seq": self.session.seq,
            },
            "slots": self.slots,
            "sandbox": describe_mode(self.executor.mode),
            "running": [
                {
                    "task_id": str(t.task_id),
                    "job_id": str(t.job_id),
                    "workload_class": t.workload_class,
                    "seconds": round(now - t.received_at, 1),
                    "progress": self.executor.progress(t.task_id),
                }
                for t in self.running.values()
            ],
            "completed": counts["completed"],
            "failed": counts["failed"],
            "rejected": tallies["rejected"],
            "timed_out": tallies["timed_out"],
            "outbox_backlog": counts["unacknowledged"],
            # Each waits for the coordinator that dispatched it (None: recorded before
            # coordinator ids were, sent to any); link.coordinator_id is the linked one.
            "outbox_backlog_by_coordinator": [
                {"coordinator_id": coordinator, "results": n}
                for coordinator, n in sorted(
                    self.outbox.waiting().items(), key=lambda item: item[0] or ""
                )
            ],
            "results_held_bytes": self.outbox.held_bytes(),
            "uptime_s": round(time.monotonic() - self._started_mono, 1),
            "unstaking_until": until,
            "unstake_remaining_s": None if until is None else max(0, round(until - now)),
            "transitions": [
                {"from": t.from_state.value, "to": t.to_state.value, "reason": t.reason, "at": t.at}
                for t in self.state.history[-10:]
            ],
            "time": now,
        }

    async def _control(self, request: dict[str, Any]) -> dict[str, Any]:
        if request.get("cmd", "status") == "status":
            return self.status()
        return {"error": f"unknown command {request.get('cmd')!r}"}
