"""`nodeclient devnet`, the README's main command, run as an operator would."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(300)


def test_devnet_runs_jobs_verifies_and_exits_zero() -> None:
    """Two nodes, demo inference jobs, every result verified, state paths printed, exit 0."""
    out = subprocess.run(
        [sys.executable, "-m", "nodeclient.node.cli", "devnet", "--nodes", "2", "--jobs", "3"],
        capture_output=True, text=True, timeout=280, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert re.fullmatch(r"coordinator: http://127\.0\.0\.1:\d+", lines[0])
    assert sum("verified, signature verified" in line for line in lines) == 3
    m = re.search(r"digits classified: (\d+)/(\d+) correct", out.stdout)
    assert m and int(m.group(1)) / int(m.group(2)) > 0.9
    assert len(re.findall(r"node \d states: READY", out.stdout)) == 2
    assert "EXECUTING -> IDLE" in out.stdout
    assert "Traceback" not in out.stderr
