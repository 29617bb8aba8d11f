"""The status console as an operator sees it: a real terminal (tmux, 80x24) over a real network.

A coordinator and a node daemon run as processes; ``nodeclient status --watch`` runs in a
detached tmux session of 80 columns by 24 rows, and the test reads the screen with
``tmux capture-pane`` while a job runs: READY first, EXECUTING with the task on screen
while it runs, IDLE after. Then it types ``q`` and checks the console has exited.
Needs tmux (Debian package ``tmux``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from nodeclient.workloads.inference import make_request
from tests.e2e.harness import CoordinatorProc, NodeProc, wait_for
from tests.models import slow_model

pytestmark = pytest.mark.timeout(240)


class Tmux:
    """One tmux server on its own socket, so the test touches no other session."""

    def __init__(self) -> None:
        tmux = shutil.which("tmux")
        assert tmux is not None, "install tmux (apt-get install -y tmux)"
        self.argv = [tmux, "-L", f"nodeclient-test-{uuid.uuid4().hex[:8]}", "-f", "/dev/null"]
        self.session = "console"

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.argv, *args], capture_output=True, text=True, timeout=30, check=check
        )

    def start(self, command: list[str]) -> None:
        self.run(
            "new-session",
            "-d",
            "-s",
            self.session,
            "-x",
            "80",
            "-y",
            "24",
            subprocess.list2cmdline(command),
        )

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", self.session).stdout

    def alive(self) -> bool:
        return self.run("has-session", "-t", self.session, check=False).returncode == 0

    def kill(self) -> None:
        self.run("kill-server", check=False)


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    t = Tmux()
    yield t
    t.kill()


def test_console_in_a_terminal_follows_a_task(tmp_path: Path, tmux: Tmux) -> None:
    """READY, then EXECUTING with the running task, then IDLE; q quits and the session ends."""
    clock_file = tmp_path / "clock"
    clock_file.write_text("0")
    coord = CoordinatorProc(tmp_path, clock_file=clock_file)
    coord.start()
    node = NodeProc(tmp_path, "n1", coordinator=coord.url, clock_file=clock_file)
    node.start()
    screens: list[str] = []

    def shows(*words: str) -> str | None:
        screen = tmux.screen()
        screens.append(screen)
        return screen if all(w in screen for w in words) else None

    try:
        node.wait_linked()
        tmux.start(
            [
                sys.executable,
                "-m",
                "nodeclient.node.cli",
                "status",
                "--watch",
                "--home",
                str(node.home),
            ]
        )
        ready = wait_for(
            lambda: shows("READY for", "up · rtt", "no GPU"),
            timeout=30,
            what="READY, the link and the GPU line",
        )
        lines = ready.rstrip("\n").split("\n")
        # The whole frame is on the 80x24 screen: its title on the first row and its
        # footer on the last drawn one (a frame too tall would have scrolled its top off).
        assert "nodeclient · node" in lines[0] and "q quit" in lines[-1]
        assert "completed 0" in ready and "none since the daemon started" in ready

        x = np.ones((1024, 512), np.float32)
        job = coord.client().submit_job(
            "ai.inference", make_request(slow_model(depth=400), {"x": x}).encode()
        )
        executing = wait_for(
            lambda: shows("EXECUTING for", "ai.inference"),
            timeout=60,
            what="EXECUTING with the task",
        )
        assert "Running · 1 of" in executing
        (task,) = coord.client().job(job["job_id"])["tasks"]
        assert task["task_id"][:8] in executing

        idle = wait_for(lambda: shows("IDLE for", "completed 1"), timeout=60, what="IDLE")
        assert "EXECUTING → IDLE" in idle and "0 awaiting acknowledgement" in idle

        tmux.run("send-keys", "-t", tmux.session, "q")
        wait_for(lambda: not tmux.alive(), timeout=10, what="the console to exit on q")
    finally:
        (tmp_path / "screens.txt").write_text("\n\f\n".join(screens))  # for a failure's report
        node.stop()
        coord.stop()
    # The node's own log lines for the task carry node_id and task_id (JSON on stderr).
    executed = [e for e in node.events() if e.get("event") == "task.executed"]
    assert executed and executed[0]["node_id"] == node.node_id
    assert executed[0]["task_id"] == task["task_id"]


def test_console_says_daemon_not_running_and_quits(tmp_path: Path, tmux: Tmux) -> None:
    """Without a daemon the console shows "daemon not running" instead of crashing; q quits."""
    home = tmp_path / "nohome"
    home.mkdir(mode=0o700)
    tmux.start(
        [sys.executable, "-m", "nodeclient.node.cli", "status", "--watch", "--home", str(home)]
    )
    screen = wait_for(
        lambda: "daemon not running" in (s := tmux.screen()) and s,
        timeout=30,
        what="the not-running screen",
    )
    assert "retrying every 1 s" in screen
    tmux.run("send-keys", "-t", tmux.session, "q")
    wait_for(lambda: not tmux.alive(), timeout=10, what="the console to exit on q")
