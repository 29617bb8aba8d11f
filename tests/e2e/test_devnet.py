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
    assert "render assembled: 6 frames of 64x48 from 2 node(s)" in out.stdout
    assert re.search(
        r"training finished 3 rounds; loss per round: [\d.]+, [\d.]+, [\d.]+", out.stdout
    )
    m = re.search(r"digits classified: (\d+)/(\d+) correct", out.stdout)
    assert m and int(m.group(1)) / int(m.group(2)) > 0.9
    assert len(re.findall(r"node \d states: READY", out.stdout)) == 2
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
