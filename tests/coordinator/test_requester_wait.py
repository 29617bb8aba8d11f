"""`submit --wait` polls the job without its task list (GET /v1/jobs/{id}?tasks=none).

Every poll of the whole job made the coordinator build each task's typed data (seconds
for a training job of 100,000 tasks) twice a second, for a status."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from nodeclient.coordinator import cli
from nodeclient.coordinator.cli import main
from nodeclient.coordinator.client import CoordinatorClient

JOB = {"job_id": "j1", "workload_class": "ai.training", "status": "queued", "tasks": []}


def test_wait_polls_the_job_without_its_tasks(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each poll asks for ?tasks=none, and a job answered without a task list is a job;
    the wait ends on its status and reports its reason."""
    asked: list[str] = []
    statuses = ["queued", "running", "failed"]

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(201, json=JOB)
        asked.append(str(request.url))
        status = statuses.pop(0)
        job = {key: value for key, value in JOB.items() if key != "tasks"}
        return httpx.Response(200, json={**job, "status": status, "reason": "loss went NaN"})

    def client(url: str, token: str | None = None) -> CoordinatorClient:
        return CoordinatorClient(url, token=token, transport=httpx.MockTransport(handler))

    monkeypatch.setattr(cli, "POLL_S", 0.0)
    monkeypatch.setattr(cli, "CoordinatorClient", client)
    (tmp_path / "p.bin").write_bytes(b"payload")
    rc = main(["submit", "--class", "ai.training", "--payload", str(tmp_path / "p.bin"),
               "--wait", "--coordinator", "http://c.example"])  # fmt: skip
    assert rc == 1
    assert asked == ["http://c.example/v1/jobs/j1?tasks=none"] * 3
    assert "job j1 failed: loss went NaN" in capsys.readouterr().err
