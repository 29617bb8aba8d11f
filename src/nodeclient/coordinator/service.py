"""The coordinator's shared state: node cache, live links, heartbeat writer, wake-ups.

One :class:`Coordinator` is built per app. The HTTP routes, the link sessions and the
scheduler all work through it; nothing here does network I/O itself. Registered nodes
are cached in memory (:class:`~nodeclient.coordinator.store.NodeInfo`), because every
heartbeat and every scheduling round consults them; the cache is loaded from SQL at
start and updated after each committed registration or unstake.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import functools
import ipaddress
import logging
import math
import uuid
from collections.abc import Callable, Coroutine, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Final, ParamSpec, Protocol, TypeVar

from nodeclient.clock import Clock
from nodeclient.coordinator.blobstore import BlobStore, payload_blobs
from nodeclient.coordinator.config import CoordinatorConfig
from nodeclient.coordinator.metrics import CoordinatorMetrics, last_attempt
from nodeclient.coordinator.store import (
    Database,
    NodeInfo,
    check_chain_id,
    coordinator_id,
    fill_job_blobs,
    load_nodes,
)
from nodeclient.coordinator.store import write_heartbeats as _write_heartbeats
from nodeclient.protocol import messages

log = logging.getLogger("nodeclient.coordinator")
MAX_WITHDRAWN: Final = 65536  # cancels remembered; a dispatch is sent within seconds of its lease
# How far above a node's last committed heartbeat seq a heartbeat may be acknowledged
# before its own commit (HeartbeatWriter); a restarted coordinator adds it to every
# stored seq, so that none acknowledged before the restart can be taken again.
UNSTORED_SEQS: Final = 16
# A heartbeat commit that no heartbeat waits on waits this long for others to join it:
# at 10,000 nodes, tens of commits a second instead of hundreds (a quarter of the
# coordinator's CPU per heartbeat), and nothing is slower, since their acks are sent.
COMMIT_GAP_S: Final = 0.02
# Threads for CPU-bound work off the event loop. Each one holds the GIL while it runs
# Python, and the loop must win it back at every socket call: with asyncio's default
# executor (up to CPUs + 4 threads) eight concurrent submissions took seven of every
# eight turns, and a 25 ms step on the loop (a scheduling round's roster of 10,000
# links) took 235 ms. Requesters' work (a job's decoding, checks and split, a job's
# JSON) and nodes' work (sealing a round's payloads, a result's proof) have threads of
# their own: however many requests queue, the nodes' work never waits behind them.
CPU_THREADS: Final = 2
NODE_CPU_THREADS: Final = 2
# A change of wall minus monotonic time larger than this between two readings is a step
# of the wall clock (an NTP correction, a VM restored from a snapshot), which the stored
# lease times are moved by (Scheduler.shift_times); smaller ones (NTP slewing: under a
# millisecond a second) are drift.
CLOCK_STEP_S: Final = 2.0
P = ParamSpec("P")
T = TypeVar("T")


class LinkPort(Protocol):
    """What the rest of the coordinator may do with one live node link."""

    node_id: str
    draining: bool  # the node is stopping: it gets no more work on this link

    async def send(self, frame: Mapping[str, Any]) -> bool:
        """Send one frame; False if the link is gone (the caller re-queues)."""
        ...

    async def close(self, code: int, reason: str) -> None: ...


class TokenBucket:
    """A token bucket on the monotonic clock: *burst* at once, then *rate* a second."""

    __slots__ = ("at", "burst", "rate", "tokens")

    def __init__(self, burst: float, rate: float, now: float) -> None:
        self.burst, self.rate = burst, rate
        self.tokens, self.at = float(burst), now

    def take(self, now: float, amount: float = 1.0) -> bool:
        """Take *amount* tokens if the bucket holds them (refilled up to *now*)."""
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < amount:
            return False
        self.tokens -= amount
        return True


class AddressLimiter:
    """Requests per client and minute: a :class:`TokenBucket` each, full (a minute's
    worth) for a client not seen lately. A client is its IPv4 address, or the /64 network
    of its IPv6 address (one host commonly holds a whole /64); an IPv4-mapped IPv6 address
    is its IPv4 address. Loopback (a devnet, a bench, a reverse proxy that names no
    client) and a request without a peer address (a Unix socket) are not limited; any
    other peer name is a client of its own. 0 a minute limits nothing. At most
    MAX_ADDRESSES buckets are held, least recently used first to go: a bucket unused for a
    minute is full again, and one in use stays."""

    MAX_ADDRESSES: Final = 65536

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._buckets: dict[str, TokenBucket] = {}  # least recently used first
        self._refused, self._reported_at = 0, -math.inf

    def refused(self, now: float) -> int:
        """Count a refusal; how many to report now, in one log line a minute at most (0:
        not yet), so that a flood of refusals is not a flood of lines."""
        self._refused += 1
        if now - self._reported_at < 60.0:
            return 0
        count, self._refused, self._reported_at = self._refused, 0, now
        return count

    def wait(self, address: str | None, now: float) -> float:
        """0.0 when a request from *address* may go on (it takes a token), else the
        seconds until it may (*now*: the monotonic clock)."""
        key = client_key(address)
        if self.per_minute <= 0 or key is None:
            return 0.0
        bucket = self._buckets.pop(key, None)  # put back last: the most recently used
        if bucket is None:
            while len(self._buckets) >= self.MAX_ADDRESSES:
                del self._buckets[next(iter(self._buckets))]
            bucket = TokenBucket(self.per_minute, self.per_minute / 60.0, now)
        self._buckets[key] = bucket
        if bucket.take(now):
            return 0.0
        return (1.0 - bucket.tokens) / bucket.rate


def client_key(address: str | None) -> str | None:
    """The client a request from *address* counts against (AddressLimiter), or None for
    one that is not limited."""
    if address is None:
        return None
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address  # a proxy's name for a client that has no address: its own
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 through a dual-stack socket: 127.0.0.1
    if ip.is_loopback:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class NodeRuntime:
    """Per-node liveness in memory; the durable parts are written behind to SQL."""

    __slots__ = (
        "beat", "budgets", "draining", "last_seen", "last_seq", "online", "state", "stored_seq"
    )  # fmt: skip

    def __init__(self, *, last_seq: int, last_seen: float | None, state: str | None) -> None:
        self.last_seq = last_seq  # the highest seq taken (acknowledged or refused above it)
        # The highest seq known to be committed in SQL: a heartbeat may be acknowledged
        # before its commit only while its seq is at most UNSTORED_SEQS above this one.
        self.stored_seq = last_seq
        self.last_seen = last_seen  # wall clock: stored, shown, and compared over days
        # The monotonic clock at the last heartbeat (or link) in this process: what
        # "offline after 3 missed intervals" is measured by, so that a wall clock set
        # forward (an NTP step) does not mark every linked node silent.
        self.beat: float | None = None
        self.state = state
        # Only a node that authenticated in this process can be online: after a restart
        # its leases wait for their deadline or for the node to come back (2.3.3).
        self.online = False
        # What the node's frames may cost (link.LinkBudgets), made at its first link and
        # kept across links: linking again does not refill it.
        self.budgets: Any = None
        # The node handed a task back because it is stopping ("draining: "): no link of
        # it gets work until it registers again, which a daemon does at every start (a
        # stopping daemon may link again to deliver what its grace finished).
        self.draining = False


class HeartbeatWriter:
    """Group commit for heartbeats, written behind their acknowledgements within a bound.

    Heartbeats that arrive while a commit runs, or within COMMIT_GAP_S before it, are
    written together by one commit, so 10,000 nodes cost tens of commits a second, not
    hundreds. A heartbeat whose seq is at most :data:`UNSTORED_SEQS` above its node's
    last committed seq is acknowledged at once and written by the next commit; one
    further above waits for its commit before its ack. So
    no seq ever acknowledged is more than UNSTORED_SEQS above the one stored, and a
    coordinator that starts again takes each node's last seq as the stored one plus
    UNSTORED_SEQS (:meth:`Coordinator.__init__`): a replayed seq is still refused after a
    restart, a crash of the process included, while the heartbeat path never waits on the
    database in the common case (a scheduling round or a job's insert holds SQLite's one
    writer for tens of milliseconds). On SQLite an operating-system crash or a power loss
    may take back more (heartbeat commits run with synchronous=NORMAL: see
    ``Database._run_heartbeat_conn``).
    """

    def __init__(self, db: Database, runtime: Mapping[str, NodeRuntime]) -> None:
        self._db = db
        self._runtime = runtime
        self._pending: dict[str, tuple[str, int, str, float]] = {}
        self._waiters: list[asyncio.Future[None]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def persist(
        self, node_id: str, seq: int, state: str, seen: float, *, wait: bool = True
    ) -> None:
        """Queue the node's seq, state and last-seen time for the next commit; with
        *wait*, return once it is committed (raising what the commit raised)."""
        self._pending[node_id] = (node_id, seq, state, seen)
        waiter: asyncio.Future[None] | None = None
        if wait:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        if waiter is not None:
            await waiter

    async def close(self) -> None:
        """Commit what is queued (at shutdown, before the database closes)."""
        if self._flusher is not None:
            with contextlib.suppress(Exception):
                await self._flusher

    async def _flush(self) -> None:
        while self._pending:
            if not self._waiters:  # nothing waits on it: gather more into one commit
                await asyncio.sleep(COMMIT_GAP_S)
            batch = list(self._pending.values())
            waiters, self._waiters = self._waiters, []
            self._pending = {}
            try:
                await self._db.run_heartbeats(functools.partial(_write_heartbeats, batch=batch))
            except Exception as exc:  # noqa: BLE001 (handed to every waiting heartbeat)
                # Their nodes' stored seqs stay where they were: once UNSTORED_SEQS above,
                # their heartbeats wait for a commit again, and get its error.
                log.error(
                    "heartbeat.store_failed",
                    extra={"heartbeats": len(batch), "error": f"{type(exc).__name__}: {exc}"},
                )
                for w in waiters:
                    if not w.done():
                        w.set_exception(exc)
                continue
            for node_id, seq, _, _ in batch:
                rt = self._runtime.get(node_id)
                if rt is not None and seq > rt.stored_seq:
                    rt.stored_seq = seq
            for w in waiters:
                if not w.done():
                    w.set_result(None)


class ProgressBoard:
    """Advisory progress of running tasks, as their nodes report it (memory only).

    Kept per node, so that one node can neither overwrite another's report nor grow
    memory without bound: a node holds at most ``2 x max_parallel_subtasks`` entries
    (its oldest go first), and all of them go when its link does. :meth:`get` gives one
    node's report for a task: the jobs API asks the node the task is leased to, so a
    node that held the task earlier cannot hide or replace its holder's report.
    """

    def __init__(self) -> None:
        self._by_node: dict[str, dict[str, dict[str, Any]]] = {}  # oldest first

    def record(self, node_id: str, task_id: str, entry: dict[str, Any], *, cap: int) -> None:
        mine = self._by_node.setdefault(node_id, {})
        mine.pop(task_id, None)
        mine[task_id] = {**entry, "node_id": node_id}
        while len(mine) > max(cap, 1):
            self._drop(node_id, next(iter(mine)))

    def get(self, task_id: str, *, node_id: str) -> dict[str, Any] | None:
        """*node_id*'s latest report on *task_id*, if it sent one."""
        return self._by_node.get(node_id, {}).get(task_id)

    def forget(self, node_id: str, task_id: str | None = None) -> None:
        """Drop one task's report from *node_id*, or all of its reports."""
        mine = self._by_node.get(node_id, {})
        for t in [task_id] if task_id is not None else list(mine):
            if t in mine:
                self._drop(node_id, t)

    def _drop(self, node_id: str, task_id: str) -> None:
        mine = self._by_node[node_id]
        del mine[task_id]
        if not mine:
            del self._by_node[node_id]

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_node.values())


class Coordinator:
    """Shared state of one coordinator process (built by ``create_app``)."""

    def __init__(self, config: CoordinatorConfig, *, clock: Clock, db: Database) -> None:
        self.config = config
        self.clock = clock
        self.db = db
        self.blobs = BlobStore(config.blob_dir, clock=clock.now)
        self.coordinator_id: str = db.run_sync(lambda s: coordinator_id(s, config.coordinator_id))
        db.run_sync(lambda s: check_chain_id(s, config.chain_id))
        # Jobs submitted before jobs recorded their blobs: recorded once, before any sweep.
        refs = payload_blobs(config.max_payload_bytes)
        db.run_sync(lambda s: fill_job_blobs(s, refs))
        # Bumped whenever what makes a node a scheduling candidate may have changed: its
        # registration (node cache), its link, or its online flag (roster_changed()). The
        # scheduler rebuilds its candidate list only when this moves.
        self.roster_version = 0
        self.nodes: dict[str, NodeInfo] = {}
        self.runtime: dict[str, NodeRuntime] = {}
        for info in db.run_sync(load_nodes):
            self.cache_node(info)
            # The last run may have acknowledged up to UNSTORED_SEQS seqs above the stored
            # one before it stopped (HeartbeatWriter): none of them may be taken again.
            # (Heartbeats carry at most MAX_SEQ - UNSTORED_SEQS: link.MAX_HEARTBEAT_SEQ.)
            self.runtime[info.node_id].last_seq = info.last_seq + UNSTORED_SEQS
        self.links: dict[str, LinkPort] = {}
        self.progress = ProgressBoard()  # advisory, per node and task, bounded
        # POST /v1/nodes per client address (each verifies a manifest, and may add a row)
        self.registrations = AddressLimiter(config.registrations_per_minute)
        self.heartbeats = HeartbeatWriter(db, self.runtime)
        # GET /metrics (2.3.8); per app, never global; lease waits from this start on
        self.metrics = CoordinatorMetrics(after_attempt=db.run_sync(last_attempt))
        self._wake: asyncio.Event | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._skew: float | None = None  # wall minus monotonic at the last clock_step()
        self._cpu = ThreadPoolExecutor(CPU_THREADS, thread_name_prefix="coordinator-cpu")
        self._node_cpu = ThreadPoolExecutor(
            NODE_CPU_THREADS, thread_name_prefix="coordinator-nodes"
        )
        # (node_id, task_id) of leases a cancel went out for, newest last (see send_cancel)
        self.withdrawn: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()

    def now(self) -> float:
        return self.clock.now()

    def clock_step(self) -> float:
        """How far the wall clock jumped since the last call (0.0: it did not), seen as a
        change of more than CLOCK_STEP_S in wall minus monotonic time; slow drift (NTP
        slewing) is followed, not counted. Call it from the event loop."""
        skew = self.clock.now() - self.clock.monotonic()
        last, self._skew = self._skew, skew
        if last is None or abs(skew - last) <= CLOCK_STEP_S:
            return 0.0
        return skew - last

    def monotonic(self) -> float:
        return self.clock.monotonic()

    # --- node cache -------------------------------------------------------------------------

    def roster_changed(self) -> None:
        """A node's registration, link or online flag changed (see ``roster_version``)."""
        self.roster_version += 1

    def cache_node(self, info: NodeInfo) -> None:
        self.roster_changed()
        self.nodes[info.node_id] = info
        if info.node_id not in self.runtime:
            self.runtime[info.node_id] = NodeRuntime(
                last_seq=info.last_seq, last_seen=info.last_seen, state=info.state
            )

    def forget_node(self, node_id: str) -> None:
        """Drop a node whose record was deleted (``store.forget_nodes_tx``) from the cache.

        One that linked while its record was being deleted keeps its place here, since its
        link relies on it, and its link is closed 4003: it registers again, and so has a
        record again."""
        link = self.links.get(node_id)
        if link is not None:
            self.spawn(link.close(4003, "not registered: register again"), "close")
            return
        self.roster_changed()
        self.nodes.pop(node_id, None)
        self.runtime.pop(node_id, None)

    def set_unstaking(self, node_id: str, until: int) -> None:
        info = self.nodes.get(node_id)
        if info is not None:
            self.roster_changed()
            self.nodes[node_id] = replace(info, unstaking_until=until)

    def is_online(self, node_id: str) -> bool:
        rt = self.runtime.get(node_id)
        return bool(rt and rt.online and node_id in self.links)

    # --- links ------------------------------------------------------------------------------

    def attach(self, node_id: str, link: LinkPort) -> LinkPort | None:
        """Make *link* the node's one live link; returns the one it replaces, if any."""
        self.roster_changed()
        old = self.links.get(node_id)
        self.links[node_id] = link
        rt = self.runtime[node_id]
        rt.online = True
        rt.last_seen, rt.beat = self.now(), self.clock.monotonic()
        return old if old is not link else None

    def detach(self, node_id: str, link: LinkPort) -> None:
        """Forget *link* if it is still the node's live one (a replaced link is not)."""
        if self.links.get(node_id) is link:
            self.roster_changed()
            del self.links[node_id]
            self.progress.forget(node_id)

    async def send_to(self, node_id: str, frame: Mapping[str, Any]) -> bool:
        link = self.links.get(node_id)
        return False if link is None else await link.send(frame)

    def send_cancel(self, node_id: str, task_id: str, reason: str) -> None:
        """Tell *node_id* to drop *task_id*, in the background (a node that does not read
        holds up nobody), and remember it, so a dispatch of that lease not yet sent is not
        sent after all (Scheduler.dispatch_all): frames to a node go out in the order their
        sends start, and a dispatch whose send started first reaches the node first."""
        self.withdrawn[(node_id, task_id)] = None
        self.withdrawn.move_to_end((node_id, task_id))
        while len(self.withdrawn) > MAX_WITHDRAWN:
            self.withdrawn.popitem(last=False)
        frame = messages.Cancel(uuid.UUID(task_id), reason).to_wire()
        self.spawn(self.send_to(node_id, frame), "cancel")

    def granted(self, leases: Iterable[tuple[str, str]]) -> None:
        """New leases of (node_id, task_id): a cancel remembered for an earlier lease of the
        same task on the same node says nothing about these."""
        for lease in leases:
            self.withdrawn.pop(lease, None)

    async def in_cpu(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a requester's CPU-bound *fn* on one of the CPU_THREADS threads
        (``asyncio.to_thread``'s contract otherwise: the caller's context goes with it)."""
        return await _run_in(self._cpu, fn, *args, **kwargs)

    async def in_node_cpu(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """As :meth:`in_cpu`, for the nodes' work, on the NODE_CPU_THREADS threads."""
        return await _run_in(self._node_cpu, fn, *args, **kwargs)

    def close_cpu(self) -> None:
        """Let the CPU threads go once what runs there ends (at shutdown)."""
        self._cpu.shutdown(wait=False, cancel_futures=True)
        self._node_cpu.shutdown(wait=False, cancel_futures=True)

    def spawn(self, coro: Coroutine[Any, Any, Any], what: str) -> None:
        """Run *coro* in the background (sends to nodes: a slow node must not hold up the
        caller); kept referenced until done, and a failure is logged, never lost."""
        task = asyncio.create_task(coro)
        self._background.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._background.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("background.failed", extra={"what": what}, exc_info=t.exception())

        task.add_done_callback(done)

    async def stop_background(self) -> None:
        """Cancel what spawn() started and wait for it (at shutdown, before the database)."""
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- scheduler wake-ups -----------------------------------------------------------------

    def wake_event(self) -> asyncio.Event:
        if self._wake is None:
            self._wake = asyncio.Event()
        return self._wake

    def wake(self) -> None:
        """Ask the scheduler for a round now (new job, node linked, result, heartbeat)."""
        self.wake_event().set()


async def _run_in(
    pool: ThreadPoolExecutor, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
) -> T:
    call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(pool, call)
