"""The coordinator's Prometheus metrics, served at ``GET /metrics`` (docs: "Metrics").

Each app has its own ``CollectorRegistry`` (never the process-global one), so tests can
build several coordinators in one process. Most values are read at scrape time from the
state that already exists, rather than counted beside it, so they survive a restart and
can never drift from the truth:

- ``nodes_online{state}``: linked nodes by their last heartbeat's state (memory);
- ``nodes_registered``, ``queue_depth`` and ``tasks{status}``, ``jobs{status}`` (SQL);
- ``dispatch_latency_seconds``: how long each lease waited in the queue, folded in
  incrementally from ``task_attempts`` (the first lease waits from the task's
  ``queued_at``, a re-lease from the end of the previous attempt);
- ``verification_failures_total{check}``: counted by the link when a result fails
  verification (signature, proof, or the acceptance rules), because a refused result
  leaves no row behind.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections import Counter as Tally
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, aliased

from nodeclient.coordinator import models as m

if TYPE_CHECKING:
    from nodeclient.coordinator.service import Coordinator

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS: Final = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
CHECKS: Final = ("signature", "proof", "acceptance")
MAX_WAITS_PER_SCRAPE: Final = 10_000  # lease waits read per scrape; the rest the next time
STATES: Final = ("READY", "EXECUTING", "IDLE", "UNSTAKING")


@dataclass
class SqlFacts:
    """What one scrape read from SQL."""

    registered: int = 0
    tasks: dict[str, int] = field(default_factory=dict)
    jobs: dict[str, int] = field(default_factory=dict)
    waits: list[tuple[int, float]] = field(default_factory=list)  # (attempt id, wait) read
    last_attempt_id: int = 0


def last_attempt(session: Session) -> int:
    """The newest task attempt's id (0: none): a process counts lease waits from there,
    since the ones before it were an earlier process's to count."""
    return int(session.scalar(select(func.max(m.TaskAttempt.id))) or 0)


def read_facts(
    session: Session, *, after_attempt: int, limit: int = MAX_WAITS_PER_SCRAPE
) -> SqlFacts:
    """One transaction: counts by status and the lease waits of up to *limit* attempts
    past *after_attempt* (the rest at the next scrape: one scrape never holds the
    database thread for a long history)."""
    facts = SqlFacts(last_attempt_id=after_attempt)
    facts.registered = int(session.scalar(select(func.count()).select_from(m.Node)) or 0)
    for status, n in session.execute(select(m.Task.status, func.count()).group_by(m.Task.status)):
        facts.tasks[str(status)] = int(n)
    for status, n in session.execute(select(m.Job.status, func.count()).group_by(m.Job.status)):
        facts.jobs[str(status)] = int(n)
    prev = aliased(m.TaskAttempt)
    previous_end = (
        select(func.max(prev.ended_at))
        .where(prev.task_id == m.TaskAttempt.task_id, prev.id < m.TaskAttempt.id)
        .scalar_subquery()
    )
    rows = session.execute(
        select(m.TaskAttempt.id, m.TaskAttempt.leased_at, m.Task.queued_at, previous_end)
        .join(m.Task, m.Task.task_id == m.TaskAttempt.task_id)
        .where(m.TaskAttempt.id > after_attempt)
        .order_by(m.TaskAttempt.id)
        .limit(limit)
    ).all()
    for attempt_id, leased_at, queued_at, ended in rows:
        since = ended if ended is not None else queued_at
        facts.waits.append((int(attempt_id), max(0.0, float(leased_at) - float(since))))
        facts.last_attempt_id = int(attempt_id)
    return facts


class _Snapshot(Collector):
    """Gauges computed at scrape time from the last facts the route handed over."""

    def __init__(self, owner: CoordinatorMetrics) -> None:
        self._owner = owner

    def collect(self) -> Iterator[Metric]:
        o = self._owner
        online = GaugeMetricFamily(
            "nodes_online", "nodes with a live link, by their last reported state", labels=["state"]
        )
        for state in STATES:
            online.add_metric([state], o.online.get(state, 0))
        yield online
        yield GaugeMetricFamily("nodes_registered", "registered nodes", value=o.facts.registered)
        yield GaugeMetricFamily(
            "queue_depth", "tasks waiting for a node", value=o.facts.tasks.get(m.QUEUED, 0)
        )
        tasks = GaugeMetricFamily("tasks", "tasks by status", labels=["status"])
        for status in (m.QUEUED, m.LEASED, m.SUCCEEDED, m.FAILED, m.CANCELLED):
            tasks.add_metric([status], o.facts.tasks.get(status, 0))
        yield tasks
        jobs = GaugeMetricFamily("jobs", "jobs by status", labels=["status"])
        for status in (m.QUEUED, m.RUNNING, m.SUCCEEDED, m.FAILED):
            jobs.add_metric([status], o.facts.jobs.get(status, 0))
        yield jobs


class CoordinatorMetrics:
    """One coordinator's metrics: a registry, the link's counter, and scrape-time gauges."""

    def __init__(self, *, after_attempt: int = 0) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.facts = SqlFacts(last_attempt_id=after_attempt)  # leases before it: not ours
        self.online: dict[str, int] = {}
        self._lock = threading.Lock()
        self.inflight: asyncio.Future[bytes] | None = None  # the scrape under way (scrape)
        self.verification_failures = Counter(
            "verification_failures",
            "results that failed verification, by the check",
            ["check"],
            registry=self.registry,
        )
        for check in CHECKS:
            self.verification_failures.labels(check=check)
        self.dispatch_latency = Histogram(
            "dispatch_latency_seconds",
            "time a task waited in the queue before each lease",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_Snapshot(self))

    def verification_failed(self, check: str) -> None:
        """The link refused a result; *check* is one of CHECKS."""
        if check not in CHECKS:
            raise ValueError(f"unknown verification check {check!r}")
        self.verification_failures.labels(check=check).inc()

    def update(self, facts: SqlFacts, online_states: Mapping[str, int]) -> None:
        """Take one scrape's SQL facts; lease waits are observed exactly once each."""
        with self._lock:
            seen = self.facts.last_attempt_id
            for attempt_id, wait in facts.waits:
                if attempt_id > seen:  # overlapping scrapes never count a lease twice
                    self.dispatch_latency.observe(wait)
            facts.last_attempt_id = max(seen, facts.last_attempt_id)
            self.facts = facts
            self.online = dict(online_states)

    @property
    def last_attempt_id(self) -> int:
        with self._lock:
            return self.facts.last_attempt_id

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


async def scrape(coord: Coordinator) -> bytes:
    """``GET /metrics``: read SQL on the database thread, then render the registry.

    Requests that come while a scrape is under way share it: the route needs no
    authentication, and one transaction per concurrent request would fill the database
    thread's queue, in which registrations, results and scheduling rounds wait too.
    """
    metrics: CoordinatorMetrics = coord.metrics
    if metrics.inflight is None:
        task = metrics.inflight = asyncio.ensure_future(_scrape(coord))
        task.add_done_callback(lambda _t: setattr(metrics, "inflight", None))
    return await asyncio.shield(metrics.inflight)  # a request that goes away stops no other


async def _scrape(coord: Coordinator) -> bytes:
    metrics: CoordinatorMetrics = coord.metrics
    facts = await coord.db.run(functools.partial(read_facts, after_attempt=metrics.last_attempt_id))
    online = Tally(
        coord.runtime[node_id].state or "READY"
        for node_id in list(coord.links)
        if coord.is_online(node_id) and node_id in coord.runtime
    )
    metrics.update(facts, online)
    return metrics.exposition()
