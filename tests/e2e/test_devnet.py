"""`nodeclient devnet`, the README's main command, run as an operator would."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(300)


def test_devnet_runs_jobs_verifies_and_exits_zero() -> None:
    """Two nodes; inference, a 2-slice render on 2 nodes and a 2-slice training job; every
    task verified with hashlib and eth-account; per-slice progress and state paths printed."""
    out = subprocess.run(
        [sys.executable, "-m", "nodeclient.node.cli", "devnet", "--nodes", "2", "--jobs", "3"],
        capture_output=True, text=True, timeout=280, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert re.fullmatch(r"coordinator: http://127\.0\.0\.1:\d+", lines[0])
    # 3 inference tasks + 2 render slices + 2 slices x 3 training rounds, all verified.
    assert sum("verified, signature verified" in line for line in lines) == 3 + 2 + 6
    # Each job's result is checked as a requester would (nodeclient-coordinator verify).
    assert out.stdout.count("job result: equal to its one task's verified result") == 3
    assert "job result: equal to its 2 verified slices assembled in order" in out.stdout
    assert "job result: equal to its 3 rounds replayed from the verified" in out.stdout
    assert "render assembled: 6 frames of 64x48 from 2 node(s)" in out.stdout
    assert re.search(
        r"training finished 3 rounds; loss per round: [\d.]+, [\d.]+, [\d.]+", out.stdout
    )
    m = re.search(r"digits classified: (\d+)/(\d+) correct", out.stdout)
    assert m and int(m.group(1)) / int(m.group(2)) > 0.9
    # from READY, or "..." where a node made more transitions than its status holds
    assert len(re.findall(r"node \d states: (READY|\.\.\.) -> ", out.stdout)) == 2
    assert "EXECUTING -> IDLE" in out.stdout
    assert "Traceback" not in out.stderr
    # Each node runs on its own share of the CPUs, as separate machines would.
    shares = re.findall(r"node \d: 0x[0-9a-fA-F]{40}  \(CPUs ([\d,]+), home ", out.stdout)
    assert len(shares) == 2
    if len(os.sched_getaffinity(0)) >= 2:
        assert not set(shares[0].split(",")) & set(shares[1].split(","))


def test_cpu_shares_split_the_machine_into_disjoint_equal_parts(monkeypatch) -> None:
    """Earlier nodes take the remainder; more nodes than CPUs share them round-robin."""
    from nodeclient import devnet

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3, 4, 5, 6, 7})
    assert devnet.cpu_shares(3) == [{0, 1, 2}, {3, 4, 5}, {6, 7}]
    assert devnet.cpu_shares(1) == [set(range(8))]
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {2, 5})
    assert devnet.cpu_shares(2) == [{2}, {5}]
    assert devnet.cpu_shares(3) == [{2}, {5}, {2}]


def test_job_lines_name_a_node_only_once_a_task_has_one(tmp_path) -> None:
    """A queued task shows as [queued], a leased one with its node and progress; the line
    is printed when it changes, and the job is returned once it ends."""
    from nodeclient import devnet

    node = "0x5AC20D91669eB190243eA549D979Ad1421E1Fef9"
    states = iter(
        [
            [{"task_id": "a", "status": "queued", "node_id": None}],
            [{"task_id": "a", "status": "queued", "node_id": None}],
            [
                {
                    "task_id": "a",
                    "status": "leased",
                    "node_id": node,
                    "progress": {"done": 1, "total": 3},
                }
            ],
            [{"task_id": "a", "status": "succeeded", "node_id": node}],
        ]
    )

    class Client:
        def job(self, job_id: str) -> dict:
            tasks = next(states)
            done = tasks[0]["status"] == "succeeded"
            return {"status": "succeeded" if done else "running", "tasks": tasks}

    printed: list[str] = []
    net = devnet.Devnet(workdir=tmp_path, heartbeat=1.0, out=printed.append)
    job = devnet._wait_job(Client(), "j1", printed.append, net)
    assert job["status"] == "succeeded"
    assert printed == [
        "job j1: running [queued]",
        "job j1: running [leased on 0x5AC20D91 1/3]",
        "job j1: succeeded [succeeded on 0x5AC20D91]",
    ]
