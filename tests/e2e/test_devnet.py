"""`nodeclient devnet`, the README's main command, run as an operator would."""

from __future__ import annotations

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
