"""The node daemon: the asyncio adapter around the protocol core (2.3.3 to 2.3.8).

Per task: receive -> decrypt (2.3.4, in this process) -> execute (2.3.5, in a worker
process) -> proof (2.3.6) -> record in the outbox, then sign (2.3.7) -> send -> mark done
on acknowledgement. The outbox makes delivery survive kill -9 and restarts; the
coordinator accepts exactly once, so resending is always safe.

NodeDaemon is built in layers, each in its own module: ``delivery.py`` sends results
and rejects (2.3.7), ``dispatch.py`` takes, runs and signs tasks (2.3.4 to 2.3.7),
``link.py`` keeps the coordinator link (2.3.3); this module starts and stops the daemon
(the SIGTERM drain) and reports its status (2.3.8).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import random
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

from cryptography.hazmat.primitives.asymmetric import rsa
from websockets.asyncio.client import ClientConnection

from nodeclient import entry, logs, openfiles
from nodeclient.clock import Clock, PeerClock
from nodeclient.errors import NeedsOperator
from nodeclient.node import control, inputs, service
from nodeclient.node.delivery import RESEND_FULL_BACKLOG_S
from nodeclient.node.dispatch import RunningTask
from nodeclient.node.executor import Executor
from nodeclient.node.link import LinkClient, LinkInfo
from nodeclient.node.metrics import NodeMetrics
from nodeclient.node.outbox import Outbox, Retention
from nodeclient.node.sandbox import describe_mode
from nodeclient.protocol import messages
from nodeclient.protocol.secp import Secp256k1Key
from nodeclient.protocol.session import NodeSession
from nodeclient.protocol.states import UNSTAKE_COOLDOWN_S, NodeState, StateMachine

log = logging.getLogger("nodeclient.node")
_T = TypeVar("_T")

DRAIN_FLUSH_S: Final = 10.0  # after a stop's grace, how long unacknowledged results are sent
_DAMAGED_LOGGED: Final = 20  # damaged rows described in one outbox.rows_damaged event


# The open files the daemon asks for (its soft limit, up to the hard one): each slot's
# worker pipes, its disk watcher's walk (up to 64), the links, the outbox's files.
OPEN_FILES: Final = 65536
# How often an idle worker is replaced by one that runs every self-check while a class is
# withdrawn (_recheck_withdrawn): a card back after a failure is offered again within it.
RECHECK_WITHDRAWN_S = 600.0


def _raise_open_file_limit() -> None:
    """Raise the soft RLIMIT_NOFILE towards OPEN_FILES (within the hard limit), as the unit
    does with LimitNOFILE: a daemon started by hand or by an older unit gets 1024."""
    limit = openfiles.raise_soft_limit(OPEN_FILES)
    if limit.error:
        log.warning("daemon.open_files_limit", extra={"soft": limit.soft, "error": limit.error})


def _prune_failed(exc: Exception) -> None:
    """Log a retention step that failed: a full or failing disk in one line, anything
    else (a bug, or damage no check foresaw) with its traceback."""
    if isinstance(exc, OSError | sqlite3.Error):
        log.error("outbox.prune_failed", extra={"error": str(exc)})
    else:
        log.error(
            "outbox.prune_failed",
            extra={"error": f"{type(exc).__name__}: {exc}"[:300]},
            exc_info=exc,
        )


class NodeDaemon(LinkClient):
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
        # The coordinator's clock, from the times it sends (dispatch sent_at, heartbeat_ack
        # server_time): what its lease ends are read against.
        self.coordinator_clock = PeerClock(clock)
        self.heartbeat_interval = heartbeat_interval
        self.shutdown_grace = shutdown_grace
        self.retention = retention if retention is not None else Retention()
        self.slots = int(manifest["max_parallel_subtasks"])
        self.classes = frozenset(manifest["workload_classes"])
        # Classes withdrawn because every worker found them broken, in the order the
        # manifest had them: offered again once a worker runs them.
        self._withdrawn: list[str] = []
        self._registered, self._generation = False, 0
        self._register_lock = asyncio.Lock()
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
        self._hurry = asyncio.Event()  # a second stop signal: hand back without the grace
        self._stop_requests = 0  # request_stop calls (stop signals)
        self._prune_stop = threading.Event()  # ends a prune in its thread (_prune_step)
        self._rand = random.SystemRandom()
        self._fatal: NeedsOperator | None = None
        self._replaced_at: float | None = None  # when another process last took the link
        self._pause = 0.0  # the next reconnect waits at least this long
        self._workers_started = False  # run()'s first start of every slot's worker is done
        self._replaced_while_stopping = False  # then the drain links no more (_link_closed)
        self._unstake_record: tuple[str, int] | None = None  # restore_unstake, _keep_unstake
        self._fetch = inputs.http_fetcher(self.url)
        # Downloads of task inputs run here, so that a slow source can hold at most one
        # thread per slot, never the default pool's threads that commit and ack results.
        self._fetch_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.slots, thread_name_prefix="nodeclient-fetch"
        )
        self._blobs = inputs.blob_cache(home / "blobs")  # render scenes, fetched once
        self._models_that_ran = {}
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
        self.outbox.claim(self.node_id)  # another node's (a home started over): exit 78
        self.restore_unstake()
        _raise_open_file_limit()
        unit = service.started_from()  # started by systemd: is its unit this release's?
        outdated = None if unit is None else service.outdated_unit(unit)
        if outdated is not None:
            log.warning("service.unit_outdated", extra={"hint": outdated})
        loop = asyncio.get_running_loop()
        for sig in entry.stop_signals():
            loop.add_signal_handler(sig, self.request_stop)
        server = await control.serve(self.home / control.SOCKET_NAME, self._control)
        log.info("daemon.start", extra={"coordinator": self.url, "slots": self.slots})
        try:
            await self.executor.warm_up()
            self._workers_started = True
            self._withdraw_broken_classes()
            self.executor.on_worker_started = self._classes_changed  # and any that break later
            link = asyncio.create_task(self._link_loop())
            refresh = asyncio.create_task(self._refresh_metrics())
            prune = asyncio.create_task(self._prune_results())
            recheck = asyncio.create_task(self._recheck_withdrawn())
            # The link loop retries every error, and ends by itself only after setting
            # _stopping (a refused registration). Ending any other way is a bug that would
            # leave the process alive to systemd but never again in touch with the
            # coordinator: stop as for SIGTERM, and exit 1, so that the unit's
            # Restart=on-failure starts a fresh process.
            stop = asyncio.create_task(self._stopping.wait())
            await asyncio.wait((link, stop), return_when=asyncio.FIRST_COMPLETED)
            status = 0 if self._stopping.is_set() else self._link_ended(link)
            await self._drain(link)
            link.cancel()
            refresh.cancel()
            prune.cancel()
            recheck.cancel()
            # Its exception, if any, is logged (_link_ended) or kept in self._fatal. The
            # prune task ends once its thread has (one batch at most): nothing uses the
            # outbox after run returns.
            await asyncio.gather(link, prune, return_exceptions=True)
            if self._fatal is not None:
                raise self._fatal
        finally:
            server.close()
            try:
                (self.home / control.SOCKET_NAME).unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:  # a home gone read-only: the clean-up below still runs
                log.warning(
                    "control.socket_not_removed",
                    extra={"path": str(self.home / control.SOCKET_NAME), "error": str(exc)},
                )
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
        failing = False
        while True:
            try:
                self.metrics.update_status(self.status())
            except Exception as exc:  # a bug or a damaged row: said once, and tried again
                if not failing:
                    log.error("metrics.refresh_failed", exc_info=exc)
                failing = True
            else:
                failing = False
            await asyncio.sleep(1.0)

    async def _prune_results(self) -> None:
        """Drop acknowledged results past the retention window or byte budget, and history
        rows past theirs, hourly.

        No error ends this loop, or retention would stop until the next start (and stop
        again there): it is logged and the next round runs at the usual interval. Rows
        the outbox cannot read are left as they are and logged, and the rest is pruned.
        """
        while True:
            damaged: list[str] = []
            await self._abandon_stranded()
            try:
                dropped = await self._prune_step(
                    self.outbox.prune,
                    acked_before=self.clock.now() - self.retention.seconds,
                    keep_bytes=self.retention.bytes,
                    damaged=damaged,
                )
                forgotten = 0
                if self.retention.history_seconds > 0 or self.retention.history_max_rows > 0:
                    period = self.retention.history_seconds
                    forgotten = await self._prune_step(
                        self.outbox.forget,
                        acked_before=self.clock.now() - period if period > 0 else -math.inf,
                        max_rows=self.retention.history_max_rows,
                        damaged=damaged,
                    )
            except Exception as exc:  # noqa: BLE001 (logged; the next round tries again)
                _prune_failed(exc)
            else:
                if dropped or forgotten:
                    log.info("outbox.pruned", extra={"results": dropped, "rows": forgotten})
            if damaged:
                log.warning(
                    "outbox.rows_damaged",
                    extra={"rows": len(damaged), "damaged": damaged[:_DAMAGED_LOGGED]},
                )
            await asyncio.sleep(self.retention.every)

    async def _abandon_stranded(self) -> None:
        """Close the results that wait, past ``abandon_seconds``, for a coordinator other
        than the one this node links to (Outbox.abandon): nothing would ever send them."""
        linked = self.session.coordinator_id
        if not self.retention.abandon_seconds or linked is None or not self.outbox.waiting():
            return
        now = self.clock.now()
        try:
            closed = await self._prune_step(
                self.outbox.abandon,
                linked=linked,
                completed_before=now - self.retention.abandon_seconds,
                now=now,
            )
        except Exception as exc:  # noqa: BLE001 (logged; the round's prune runs all the same)
            _prune_failed(exc)
            return
        # str: a coordinator id damaged on disk may be of another type, which sorts apart
        for coordinator, n in sorted(closed.items(), key=lambda item: str(item[0])):
            log.warning(
                "outbox.results_abandoned",
                extra={
                    "results": n,
                    "coordinator_id": coordinator,
                    "linked_coordinator_id": linked,
                    "after_days": round(self.retention.abandon_seconds / 86400, 2),
                },
            )

    async def _prune_step(self, step: Callable[..., _T], **kwargs: Any) -> _T:
        """Run outbox.prune or outbox.forget in a thread, handing it the stop signal.

        A cancelled await does not stop a thread, and asyncio.run waits for it: a prune of
        millions of rows (the first start after retention was lowered) would hold the
        exit past systemd's stop timeout. So a cancellation sets the signal, which the
        outbox checks between batches, and waits for the thread: one batch at most.
        """
        work = asyncio.ensure_future(asyncio.to_thread(step, stop=self._prune_stop, **kwargs))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            self._prune_stop.set()
            with contextlib.suppress(Exception):  # its outcome is of no use now
                await work
            raise

    def request_stop(self) -> None:
        """SIGTERM: take no new work, finish running tasks (hand back, signed, those still
        running after shutdown_grace), flush the outbox, exit 0. A second one (Ctrl-C
        twice) cuts the grace short: the running tasks are handed back at once."""
        self._stop_requests += 1
        if self._stop_requests == 1:  # the daemon may be stopping already by itself
            log.info("daemon.stopping", extra={"running": len(self.running)})
            self._stopping.set()
            self._prune_stop.set()  # a prune under way ends after its current batch
        elif not self._hurry.is_set():
            log.warning(
                "daemon.stopping_now",
                extra={"running": len(self.running), "action": "asked to stop again: the "
                       "running tasks are handed back now, without the rest of the grace"},
            )  # fmt: skip
            self._hurry.set()

    async def _drain(self, link: asyncio.Task[None]) -> None:
        handles = [t.handle for t in self.running.values() if t.handle is not None]
        if handles:
            finished = asyncio.ensure_future(asyncio.wait(handles))
            hurry = asyncio.ensure_future(self._hurry.wait())
            await asyncio.wait(
                (finished, hurry), timeout=self.shutdown_grace, return_when=asyncio.FIRST_COMPLETED
            )
            finished.cancel()  # the wait, not the tasks: those are handed back next
            hurry.cancel()
        await self._hand_back()
        deadline = time.monotonic() + DRAIN_FLUSH_S
        # Only what this link sends: another coordinator's results wait for that one. The
        # link may be down meanwhile (a coordinator restarting): the link loop makes it
        # again, and sends the backlog on it, until this ends.
        # A task left to finish (its result was being committed at the hand-back) is
        # waited for too: its result is in no backlog until its commit ends, and is sent
        # right after it, on this link.
        mine = self.session.coordinator_id
        while (
            (self.outbox.backlog(mine) or self._finishing())
            and not link.done()
            and time.monotonic() < deadline
        ):
            await asyncio.sleep(0.05)

    def _finishing(self) -> bool:
        """Whether a task is still committing its result, or sending the refusal of a
        commit that failed (a result committed is the backlog's, which the drain waits
        for: its slot is free by then)."""
        return any(
            t.finishing and t.handle is not None and not t.handle.done()
            for t in self.running.values()
        )

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
            task.stop_reason = "node shutting down: handed back"
            handle.cancel()
            self._task_ended(task, "cancelled")
        # (a second stop signal cuts the grace short: the reason says which ended it)
        waited = (
            "before a second stop signal ended the grace"
            if self._hurry.is_set()
            else f"within {self.shutdown_grace:g} s"
        )
        for task, _ in left:
            await self._reject(
                task.task_id,
                f"{messages.DRAINING_PREFIX}node shutting down: the task did not finish {waited}",
                job_id=task.job_id,
                lease_expires_at=task.lease_expires_at,
            )
        if left:  # their workers are killed as they unwind
            await asyncio.wait([handle for _, handle in left], timeout=10.0)

    def _withdraw_broken_classes(self) -> bool:
        """Leave out of the manifest, before registering, a class no worker can run (its
        runtime broken in every one: CUDA that does not load on the GPU slots, say), so
        that the coordinator sends none of it rather than have every task fail here;
        whether one was withdrawn."""
        withdrawn = False
        for name, why in self.executor.broken_everywhere().items():
            if name in self.classes:
                withdrawn = True
                self.classes = self.classes - {name}
                self._withdrawn.append(name)
                log.warning("workload.withdrawn", extra={"workload_class": name, "reason": why})
        if withdrawn:
            self._set_workload_classes()
        return withdrawn

    def _classes_changed(self) -> None:
        """A worker has started, and what it found may change what the node can serve: a
        class now broken in every worker (a card fallen off the bus, its driver gone) is
        withdrawn as at the start; one withdrawn that a worker now runs (the card back) is
        offered again. Either way the node registers again at once if linked (the link
        stays up), so that the coordinator sends what will run here, and nothing else. A
        registration that fails now is made again before the next link."""
        changed = self._withdraw_broken_classes()
        broken = self.executor.broken_everywhere()
        mended = [name for name in self._withdrawn if name not in broken]
        if mended:
            self._withdrawn = [name for name in self._withdrawn if name in broken]
            self.classes = self.classes | set(mended)
            self._set_workload_classes(mended)
            for name in mended:
                log.warning("workload.offered_again", extra={"workload_class": name})
            changed = True
        if not changed:
            return
        self._generation += 1
        self._registered = False
        if self._ws is not None:  # else the link, once made, registers it (_connect_once)
            self._background(self._register_again())

    async def _recheck_withdrawn(self) -> None:
        """Every RECHECK_WITHDRAWN_S while a class is withdrawn (every worker found it
        broken), replace an idle worker with one that runs every self-check: tasks of other
        classes start workers that check their own class only, and a node whose classes are
        all withdrawn gets no task at all; so the class is offered again once it runs."""
        while True:
            await asyncio.sleep(RECHECK_WITHDRAWN_S)
            if self._withdrawn:
                self.executor.recheck()

    def _set_workload_classes(self, added: Sequence[str] = ()) -> None:
        """The manifest's workload_classes: those it has that are still offered, then
        *added* (offered again)."""
        kept = [c for c in self.manifest["workload_classes"] if c in self.classes]
        self.manifest = {**self.manifest, "workload_classes": kept + list(added)}

    def restore_unstake(self) -> None:
        """An unstake a coordinator confirmed before this start (kept by _keep_unstake):
        the daemon is UNSTAKING, takes no work and shows the countdown from the start,
        not only once it has linked again."""
        try:
            record = self.outbox.unstake(self.url)
        except sqlite3.Error as exc:
            log.warning("unstake.record_unreadable", extra={"error": str(exc)})
            return
        if record is None or self.state.state is NodeState.UNSTAKING:
            return
        self._unstake_record = record
        self.session.unstaking_until = record[1]
        self.state.transition(
            NodeState.UNSTAKING,
            reason=f"unstake confirmed by coordinator {record[0]} before this start",
        )

    # --- status ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = self.clock.now()
        until = self.session.unstaking_until
        # The end of the cooldown is a time on the coordinator's clock: counted against
        # that clock as this node reads it, so a skewed local clock does not move it.
        offset = self.coordinator_clock.offset
        counts, tallies = self.outbox.counts(), self.outbox.tallies()
        since = self.state.entered_at
        if self.state.state is NodeState.UNSTAKING and until is not None:
            # Since the unstake itself (the coordinator's end of the cooldown less the
            # cooldown), not since this process learnt of it after a restart.
            since = min(since, until - UNSTAKE_COOLDOWN_S - offset)
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
            # Fewer than slots while workers start; at the daemon's start ("starting") the
            # link waits for them (a GPU node's start CUDA: seconds): "down" is no fault yet.
            "workers_ready": self.executor.workers_ready,
            "starting": not self._workers_started,
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
                    # str: an id damaged on disk may be of another type (never a crash)
                    ((None if c is None else str(c), n) for c, n in self.outbox.waiting().items()),
                    key=lambda item: item[0] or "",
                )
            ],
            "results_held_bytes": self.outbox.held_bytes(),
            "uptime_s": round(time.monotonic() - self._started_mono, 1),
            "unstaking_until": until,
            "unstake_remaining_s": (
                None if until is None else max(0, round(until - (now + offset)))
            ),
            "transitions": [
                {"from": t.from_state.value, "to": t.to_state.value, "reason": t.reason, "at": t.at}
                for t in self.state.history[-control.STATUS_TRANSITIONS :]
            ],
            "time": now,
        }

    async def _control(self, request: dict[str, Any]) -> dict[str, Any]:
        if request.get("cmd", "status") == "status":
            return self.status()
        return {"error": f"unknown command {request.get('cmd')!r}"}
