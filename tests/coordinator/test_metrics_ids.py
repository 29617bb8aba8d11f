"""/metrics counts each lease's wait once, by its task attempt's id: ids are never used
twice, even after job retention deleted the newest attempts (SQLite: AUTOINCREMENT)."""

from __future__ import annotations

import uuid

from sqlalchemy.orm import Session

from nodeclient.coordinator import models as m
from nodeclient.coordinator import store
from nodeclient.coordinator.metrics import CoordinatorMetrics, last_attempt, read_facts
from nodeclient.coordinator.store import Database


def _job_with_a_lease(s: Session, *, finished_at: float | None = None) -> int:
    """A job of one task, leased once (finished at *finished_at*, if given); the
    attempt's id."""
    job_id, task_id = str(uuid.uuid4()), str(uuid.uuid4())
    s.add(m.Job(job_id=job_id, workload_class="ai.inference",
                status=m.SUCCEEDED if finished_at else m.QUEUED, min_tier=0, region=None,
                slices=1, meta="{}", created_at=1.0, finished_at=finished_at))  # fmt: skip
    s.flush()
    s.add(m.Task(task_id=task_id, job_id=job_id, slice_index=0, slice_count=1,
                 status=m.LEASED, attempts=1, queued_at=10.0, payload=b"x"))  # fmt: skip
    s.flush()
    attempt = m.TaskAttempt(task_id=task_id, attempt=1, node_id="0x" + "1" * 40,
                            leased_at=15.0, deadline=99.0)  # fmt: skip
    s.add(attempt)
    s.flush()
    return attempt.id


def _observed(metrics: CoordinatorMetrics) -> float:
    for family in metrics.registry.collect():
        if family.name == "dispatch_latency_seconds":
            (count,) = [x.value for x in family.samples if x.name.endswith("_count")]
            return count
    raise AssertionError("no dispatch_latency_seconds")


def _scrape(db: Database, metrics: CoordinatorMetrics) -> None:
    after = metrics.last_attempt_id
    metrics.update(db.run_sync(lambda s: read_facts(s, after_attempt=after)), {})


def test_leases_after_retention_deleted_the_newest_are_counted(any_db: Database) -> None:
    metrics = CoordinatorMetrics(after_attempt=any_db.run_sync(last_attempt))
    first = [any_db.run_sync(lambda s: _job_with_a_lease(s, finished_at=2.0)) for _ in range(3)]
    _scrape(any_db, metrics)
    assert _observed(metrics) == 3
    assert any_db.run_sync(lambda s: store.forget_jobs_tx(s, finished_before=100.0)) == 3
    later = [any_db.run_sync(_job_with_a_lease) for _ in range(3)]
    assert min(later) > max(first)  # no id given twice
    _scrape(any_db, metrics)
    assert _observed(metrics) == 6
