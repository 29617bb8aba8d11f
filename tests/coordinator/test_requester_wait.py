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

J1 = "6f1c2a3e-9b0d-4c57-8e21-3d4f5a6b7c8d"  # a job id, as the protocol has them
JOB = {"job_id": J1, "workload_class": "ai.training", "status": "queued", "tasks": []}


def _submit_and_wait(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, polls: list[dict[str, object]]
) -> tuple[int, list[str]]:
    """`submit --wait` of a training job against a coordinator that answers each poll with
    the job (without its tasks) updated by the next of *polls*; the exit status and the
    URLs polled."""
    asked: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(201, json=JOB)
        asked.append(str(request.url))
        job = {key: value for key, value in JOB.items() if key != "tasks"}
        return httpx.Response(200, json={**job, **polls.pop(0)})

    def client(url: str, token: str | None = None) -> CoordinatorClient:
        return CoordinatorClient(url, token=token, transport=httpx.MockTransport(handler))

    monkeypatch.setattr(cli, "POLL_S", 0.0)
    monkeypatch.setattr(cli, "CoordinatorClient", client)
    (tmp_path / "p.bin").write_bytes(b"payload")
    rc = main(["submit", "--class", "ai.training", "--payload", str(tmp_path / "p.bin"),
               "--wait", "--coordinator", "http://c.example"])  # fmt: skip
    return rc, asked


def test_wait_polls_the_job_without_its_tasks(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each poll asks for ?tasks=none, and a job answered without a task list is a job;
    the wait ends on its status and reports its reason."""
    polls = [{"status": s, "reason": "loss went NaN"} for s in ("queued", "running", "failed")]
    rc, asked = _submit_and_wait(monkeypatch, tmp_path, polls)
    assert rc == 1
    assert asked == [f"http://c.example/v1/jobs/{J1}?tasks=none"] * 3
    assert f"job {J1} failed: loss went NaN" in capsys.readouterr().err


def test_wait_shows_each_status_and_round_once_on_stderr(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """While it waits, each new status (and training round) is one line on stderr, not a
    line per poll; stdout holds the job id alone."""
    seen = [("queued", 0), ("running", 0), ("running", 0), ("running", 1), ("succeeded", 2)]
    rc, _ = _submit_and_wait(monkeypatch, tmp_path, [{"status": s, "round": r} for s, r in seen])
    out = capsys.readouterr()
    assert rc == 0
    assert out.out == J1 + "\n"
    assert out.err.splitlines() == [
        f"job {J1}: queued, round 0",
        f"job {J1}: running, round 0",
        f"job {J1}: running, round 1",
    ]


def test_a_timeout_without_wait_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--timeout bounds --wait: alone it would be ignored, so it is refused (exit 2)
    before anything is sent."""
    (tmp_path / "p.bin").write_bytes(b"payload")
    rc = main(["submit", "--class", "ai.inference", "--payload", str(tmp_path / "p.bin"),
               "--timeout", "5", "--coordinator", "http://127.0.0.1:9"])  # fmt: skip
    assert rc == 2
    assert "--timeout is how long --wait waits: add --wait" in capsys.readouterr().err


def test_job_shows_each_tasks_round_and_progress(capsys: pytest.CaptureFixture[str]) -> None:
    """A training job's tasks name their round (a slice runs once a round), and a running
    task its progress."""
    task = {"task_id": "t", "slice_index": 1, "node_id": "0xA", "attempts": 1}
    cli._print_job({
        "job_id": J1, "workload_class": "ai.training", "status": "running",
        "tasks": [
            {**task, "round": 0, "status": "succeeded"},
            {**task, "round": 1, "status": "leased",
             "progress": {"done": 3000.0, "total": 30000.0, "note": "step 3000 loss 0.0049"}},
        ],
    })  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:] == [
        "  task t round 0 slice 1: succeeded on 0xA, attempts 1",
        "  task t round 1 slice 1: leased on 0xA, attempts 1",
        "    progress 3000 of 30000  step 3000 loss 0.0049",
    ]
