"""GET /v1/jobs/{job_id}: every task by default, built off the database thread; the job
alone with ``?tasks=none``, which `submit --wait` polls.

A training job may have 100,000 task rows, each shown with its Result message as EIP-712
typed data: seconds of CPU. Built inside the transaction, that held the database thread,
which every other transaction waits for, on every poll.
"""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import httpx
import pytest

from nodeclient.coordinator import models as m
from nodeclient.coordinator import store
from nodeclient.protocol import eip712
from tests.coordinator.conftest import Running

TASKS = 30
NODE = "0x" + "ab" * 20


def _finished_job(running: Running) -> str:
    """A running job of TASKS finished tasks, each with a signed Result message."""
    message = {
        "task_id": b"\x01" * 16, "job_id": b"\x02" * 16, "node_id": NODE,
        "proof": b"\x03" * 32, "result_size": 100, "completed_at": 1,
    }  # fmt: skip
    as_json = json.dumps(eip712.message_to_json("Result", message))
    job_id = str(uuid.uuid4())

    def fill(s: Any) -> None:
        s.add(m.Job(
            job_id=job_id, workload_class="ai.training", status=m.RUNNING, min_tier=0,
            region=None, ram_mb=0, vram_mb=0, slices=TASKS, meta="{}", created_at=1.0,
        ))  # fmt: skip
        s.flush()
        for i in range(TASKS):
            s.add(m.Task(
                task_id=str(uuid.uuid4()), job_id=job_id, slice_index=i, slice_count=TASKS,
                round_index=0, status=m.SUCCEEDED, attempts=1, queued_at=1.0, payload=b"",
                node_id=NODE, proof="0x" + "03" * 32, signature="0x" + "04" * 65,
                result_sha256="0" * 64, result_size=100, message=as_json,
            ))  # fmt: skip

    running.coord.db.run_sync(fill)
    return job_id


def test_the_tasks_json_is_built_off_the_database_thread(
    coordinator: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every task, with its typed data, as before; none of it built on the database
    thread."""
    threads: set[str] = set()
    real = store.task_json

    def task_json(*args: Any, **kw: Any) -> dict[str, Any]:
        threads.add(threading.current_thread().name)
        return real(*args, **kw)

    monkeypatch.setattr(store, "task_json", task_json)
    job_id = _finished_job(coordinator)
    job = httpx.get(f"{coordinator.url}/v1/jobs/{job_id}").json()
    assert [t["slice_index"] for t in job["tasks"]] == list(range(TASKS))
    task = job["tasks"][0]
    assert task["typed_data"]["primaryType"] == "Result"
    assert task["progress"] is None
    assert task["result_size"] == 100
    assert threads, "no task was built"
    assert "coordinator-db" not in threads


def test_tasks_none_gives_the_job_alone(
    coordinator: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``?tasks=none``: the job's own fields, no task list, and no task JSON built."""
    job_id = _finished_job(coordinator)
    whole = httpx.get(f"{coordinator.url}/v1/jobs/{job_id}").json()
    built: list[str] = []
    monkeypatch.setattr(store, "task_json", lambda *a, **k: built.append("task"))
    r = httpx.get(f"{coordinator.url}/v1/jobs/{job_id}", params={"tasks": "none"})
    assert r.status_code == 200, r.text[:300]
    alone = r.json()
    assert "tasks" not in alone
    assert alone == {key: value for key, value in whole.items() if key != "tasks"}
    assert alone["status"] == "running"
    assert built == []
    client_view = coordinator.client.job(job_id, tasks=False)
    assert client_view == alone


def test_tasks_takes_all_or_none(coordinator: Running) -> None:
    """``?tasks=all`` is the default; another value is refused with a JSON 400."""
    job_id = _finished_job(coordinator)
    url = f"{coordinator.url}/v1/jobs/{job_id}"
    assert len(httpx.get(url, params={"tasks": "all"}).json()["tasks"]) == TASKS
    r = httpx.get(url, params={"tasks": "some"})
    assert r.status_code == 400
    assert "tasks" in r.json()["error"]
    r = httpx.get(f"{coordinator.url}/v1/jobs/{uuid.uuid4()}", params={"tasks": "none"})
    assert r.status_code == 404
    assert "no job" in r.json()["error"]
