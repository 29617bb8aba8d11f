"""`nodeclient devnet` when something outside it fails: the devnet itself killed, a full
disk, a child killed. Each says what happened and leaves nothing running; the network is
a real coordinator and node where the kernel's part is what is tested, else stand-ins."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodeclient import devnet
from nodeclient.node.cli import main

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A TMPDIR short enough for a devnet's control sockets (tmp_path is too deep)."""
    path = Path(tempfile.mkdtemp(prefix="dn-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _running(pid: int) -> bool:
    """Whether *pid* still runs: a zombie (ended, its parent has not reaped it yet) does
    not, nor does a pid that is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _wait_until_ended(pids: list[int], *, bound: float = 90.0) -> list[int]:
    """Those of *pids* still running once all have ended or *bound* seconds have passed:
    a bound on a hang, not a measure of speed."""
    deadline = time.monotonic() + bound
    while any(_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if _running(p)]


# A devnet's network, started as run_devnet starts it (a real coordinator and a real
# node), whose pids are printed once both run; then it waits to be killed.
_NETWORK = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from nodeclient import devnet
    from nodeclient.node import control

    net = devnet.Devnet(workdir=Path(sys.argv[1]), heartbeat=1.0, out=print)
    net.start_coordinator()
    home = net.add_node(0)
    while not (home / control.SOCKET_NAME).exists():  # the node's daemon is up
        net.check_alive()
        time.sleep(0.1)
    print("children:", net.coordinator.pid, net.nodes[0][1].pid, flush=True)
    time.sleep(3600)
    """
)


def test_the_devnets_children_end_when_it_is_killed_with_sigkill(short_tmp: Path) -> None:
    """SIGKILL (the OOM killer, a CI job's timeout) leaves the devnet no cleanup to run:
    the kernel stops its coordinator and nodes for it (PR_SET_PDEATHSIG), where they ran
    on for ever as children of init before."""
    script = subprocess.Popen(
        [sys.executable, "-c", _NETWORK, str(short_tmp / "net")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert script.stdout is not None
    children: list[int] = []
    try:
        line = script.stdout.readline()
        assert line.startswith("children:"), (line, script.communicate(timeout=30))
        children = [int(pid) for pid in line.split()[1:]]
        assert all(_running(pid) for pid in children)
        script.kill()
        script.wait()
        assert _wait_until_ended(children) == []
    finally:
        if script.poll() is None:
            script.kill()
            script.wait()
        for pid in children:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


def test_the_children_put_their_temporary_files_in_the_devnets_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where TMPDIR is full, tempfile makes the devnet's directory in /tmp instead, without
    a word: the coordinator and the nodes are given that directory as their TMPDIR, not
    the full one they would inherit, so their work goes where the devnet found room."""
    started: list[dict[str, str]] = []

    class Recorded:  # a child's stdout says where a coordinator listens
        pid = os.getpid()

        def __init__(self, _argv: list[str], **kwargs: Any) -> None:
            started.append(kwargs["env"])
            self.stdout = io.BytesIO(b"coordinator: http://127.0.0.1:1\n")

    monkeypatch.setattr(devnet.subprocess, "Popen", Recorded)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "full"))
    workdir = tmp_path / "nodeclient-devnet-x"
    net = devnet.Devnet(workdir=workdir, heartbeat=1.0, out=lambda _line: None)
    net._sandbox = True
    net.start_coordinator()
    net.add_node(0)
    assert [env["TMPDIR"] for env in started] == [str(workdir)] * 2
    assert started[1]["PATH"] == os.environ["PATH"]  # the rest as it was


def test_a_disk_without_room_for_the_devnet_is_refused_before_anything_starts(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Under MIN_FREE_BYTES free where its directory goes, the devnet says so in one line
    naming the directory and what to do, and leaves nothing there: on a disk that fills
    up, its jobs waited 300 s each in silence."""
    free = devnet.MIN_FREE_BYTES - 1
    real_usage = shutil.disk_usage

    def usage(path: str | os.PathLike[str]) -> Any:
        return real_usage(path)._replace(free=free)

    def run(_net: devnet.Devnet, **_kw: Any) -> None:
        raise AssertionError("the devnet started")

    monkeypatch.setattr(tempfile, "tempdir", str(short_tmp))
    monkeypatch.setattr(devnet.shutil, "disk_usage", usage)
    monkeypatch.setattr(devnet, "_run", run)
    assert main(["devnet"]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"nodeclient: error: only {free // 2**20} MB free on the file system of {short_tmp}, "
        f"where the devnet's directory goes (it needs {devnet.MIN_FREE_BYTES // 2**20} MB): "
        "free space there, or set TMPDIR to a directory with room\n"
    )
    assert os.listdir(short_tmp) == []


def _log(path: Path, *events: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        for event in events:
            fh.write(json.dumps(event) + "\n")


def test_a_job_that_stays_the_same_is_followed_by_the_latest_warning_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job whose status line does not change for STALL_REPORT_S is followed by the
    latest warning or error any child logged while the devnet waited for it (the
    coordinator's disk that filled up), said once, not only "did not finish within 300 s"
    at the end. What was logged before the wait began is not quoted."""
    monkeypatch.setattr(devnet, "STALL_REPORT_S", 0.0)
    now = time.time()
    coordinator_log = tmp_path / "coordinator" / "coordinator.log"
    _log(coordinator_log, {"ts": now - 60, "level": "warning", "event": "data_dir.mode_tightened"})
    polls = iter(["running"] * 3 + ["succeeded"])

    class Client:
        def job(self, _job_id: str) -> dict[str, Any]:
            status = next(polls)
            if status == "running":  # logged while the devnet waits
                _log(
                    coordinator_log,
                    {"ts": time.time(), "level": "info", "event": "http.request"},
                    {"ts": time.time(), "level": "error", "logger": "nodeclient.coordinator",
                     "event": "http.disk_full", "error": "database or disk is full"},
                )  # fmt: skip
            return {"status": status, "tasks": []}

    printed: list[str] = []
    net = devnet.Devnet(workdir=tmp_path, heartbeat=1.0, out=printed.append)
    devnet._wait_job(Client(), "j1", printed.append, net)
    assert printed == [
        "job j1: running",
        "  no change for 0 s; latest warning or error: coordinator/coordinator.log: error "
        "http.disk_full: error=database or disk is full",
        "job j1: succeeded",
    ]


def test_a_node_killed_with_sigkill_is_named_with_the_signal_and_its_last_warning(
    tmp_path: Path,
) -> None:
    """kill -9 (or the OOM killer) leaves a node no last word: the devnet says it was
    killed by SIGKILL, and quotes its last warning or error, not its last line, which is
    whatever it did last (an info event)."""
    home = tmp_path / "node0"
    _log(
        home / "node.log",
        {"ts": 1.0, "level": "warning", "logger": "nodeclient.node", "event": "outbox.slow",
         "exc": "Traceback ..."},
        {"ts": 2.0, "level": "info", "logger": "nodeclient.node", "event": "result.ack"},
    )  # fmt: skip
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    killed.kill()
    killed.wait()
    net = devnet.Devnet(workdir=tmp_path, heartbeat=1.0, out=print)
    net.nodes.append((home, killed))
    with pytest.raises(devnet.DevnetError) as died:
        net.check_alive()
    assert str(died.value) == (
        f"node in {home} was killed by signal 9 (SIGKILL): warning outbox.slow"
    )


def test_a_node_that_crashed_is_named_with_its_traceback_not_an_earlier_warning(
    tmp_path: Path,
) -> None:
    """A node that ended by itself wrote why last (a traceback's last line, on its
    stderr): that line is its reason, not a warning it logged earlier."""
    home = tmp_path / "node0"
    _log(home / "node.log", {"ts": 1.0, "level": "warning", "event": "link.error"})
    with (home / "node.log").open("a") as fh:
        fh.write("Traceback (most recent call last):\nRuntimeError: boom\n")
    crashed = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])
    crashed.wait()
    net = devnet.Devnet(workdir=tmp_path, heartbeat=1.0, out=print)
    net.nodes.append((home, crashed))
    with pytest.raises(devnet.DevnetError, match=r"node0 exited with 1: RuntimeError: boom$"):
        net.check_alive()


def test_devnet_help_says_what_it_starts_where_its_files_go_and_how_it_exits(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`nodeclient devnet --help` is where one looks before running it: what it starts and
    submits, where its files go and what --keep does, its options' ranges and defaults,
    and its exit statuses."""
    with pytest.raises(SystemExit) as done:
        main(["devnet", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for part in (
        "digits-classifier inference", "Blender render in 2 slices", "training job",
        "directory in $TMPDIR", f"{devnet.MIN_FREE_BYTES // 2**20} MB free", "unless --keep",
        "node daemons, 1 to 16 (default 2)", "1 to 64 (default 4)", "0.05 to 300 (default 2)",
        "130 Ctrl-C, 143 SIGTERM, 129 SIGHUP",
    ):  # fmt: skip
        assert part in text
