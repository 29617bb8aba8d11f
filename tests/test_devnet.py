"""`nodeclient devnet` without the whole network: its signals, its work directory, the
coordinator's start and its summary lines. The network is stood in for by small child
processes, or by a real coordinator alone (tests/e2e/test_devnet.py runs all of it)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodeclient import devnet
from nodeclient.node import control
from nodeclient.node.cli import main
from nodeclient.protocol.states import NodeState, StateMachine

pytestmark = pytest.mark.timeout(60)

# `nodeclient devnet --nodes 1 [OPTIONS]` whose coordinator is a stand-in child that prints
# its pid, then waits; on SIGTERM it says so, and exits at once ("fast") or only on SIGUSR1
# ("slow", as a node draining a long task would). Nothing else is faked: the devnet's own
# signal handling, cleanup and exit status are what runs.
_DEVNET = textwrap.dedent(
    """
    import signal, subprocess, sys, time
    from nodeclient import devnet
    from nodeclient.node.cli import main

    # as started from a terminal, whatever the test runner's own signals are
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)

    STAND_IN = '''
    import os, signal, sys
    def on_term(*_):
        print("stand-in: SIGTERM", flush=True)
        if sys.argv[1] == "fast":
            sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGUSR1, lambda *_: sys.exit(0))
    print("stand-in: ready", os.getpid(), flush=True)
    while True:
        signal.pause()
    '''

    def start_coordinator(self, *, extra=None):
        self.coordinator = subprocess.Popen([sys.executable, "-c", STAND_IN, sys.argv[1]])
        time.sleep(3600)  # the coordinator never answers: the devnet is not up yet

    devnet.Devnet.start_coordinator = start_coordinator
    sys.exit(main(["devnet", "--nodes", "1", *sys.argv[2:]]))
    """
)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A TMPDIR short enough for a devnet's control sockets (tmp_path is too deep)."""
    path = Path(tempfile.mkdtemp(prefix="dn-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _start_devnet(tmpdir: Path, mode: str, *options: str) -> tuple[subprocess.Popen[str], int]:
    """The stand-in devnet, once its coordinator is up; returns it and that child's pid."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _DEVNET, mode, *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(tmpdir)},
    )
    line = _read_until(proc, "stand-in: ready")
    return proc, int(line.split()[-1])


def _read_until(proc: subprocess.Popen[str], prefix: str) -> str:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(prefix):
            return line
    raise AssertionError(f"the devnet ended before {prefix!r}: {proc.wait()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize(
    ("sig", "status"),
    [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)],
    ids=["ctrl-c", "sigterm", "sighup"],
)
def test_a_signal_before_the_devnet_is_up_stops_it_and_removes_its_files(
    short_tmp: Path, sig: signal.Signals, status: int
) -> None:
    """Ctrl-C, SIGTERM or SIGHUP (a closed terminal) while the devnet starts: its children
    are stopped and its directory, node private keys included, removed (an interrupt is
    not a failure to look into), and it exits 128 + the signal's number, as a shell says."""
    proc, stand_in = _start_devnet(short_tmp, "fast")
    try:
        os.kill(proc.pid, sig)
        assert proc.wait(timeout=30) == status
        assert not _alive(stand_in)  # stopped and reaped by the devnet
        out, err = proc.communicate(timeout=30)
        assert "kept in" not in out + err
        assert os.listdir(short_tmp) == []
    finally:
        if _alive(stand_in):
            os.kill(stand_in, signal.SIGKILL)


@pytest.mark.parametrize(
    ("sig", "options", "files"),
    [
        (signal.SIGTERM, (), "are removed"),
        (signal.SIGHUP, (), "are removed"),
        (signal.SIGTERM, ("--keep",), "are kept in {workdir}"),
    ],
    ids=["sigterm", "sighup", "sigterm-keep"],
)
def test_a_devnet_stopped_by_sigterm_or_sighup_says_so_in_one_line(
    short_tmp: Path, sig: signal.Signals, options: tuple[str, ...], files: str
) -> None:
    """A supervisor's SIGTERM or a closed terminal's SIGHUP ends the devnet with one line
    on stderr, as Ctrl-C's "interrupted": the signal, and that its processes have ended and
    its files are removed (or kept, with --keep, and where); before, it ended in silence."""
    proc, stand_in = _start_devnet(short_tmp, "fast", *options)
    try:
        os.kill(proc.pid, sig)
        _out, err = proc.communicate(timeout=30)
        assert proc.returncode == 128 + sig
        left = [short_tmp / name for name in os.listdir(short_tmp)]
        workdir = left[0] if left else None
        assert err == (
            f"nodeclient: devnet stopped by {sig.name}: its processes have ended and its "
            f"files {files.format(workdir=workdir)}\n"
        )
        assert len(left) == len(options)  # the directory, with --keep
    finally:
        if _alive(stand_in):
            os.kill(stand_in, signal.SIGKILL)


def test_a_second_signal_does_not_cut_the_cleanup_short(short_tmp: Path) -> None:
    """SIGTERM, then Ctrl-C while the devnet waits for its children to stop: the second
    signal is ignored, so the cleanup still waits them out and removes the directory."""
    proc, stand_in = _start_devnet(short_tmp, "slow")
    try:
        os.kill(proc.pid, signal.SIGTERM)
        _read_until(proc, "stand-in: SIGTERM")  # the cleanup is under way
        os.kill(proc.pid, signal.SIGINT)
        os.kill(stand_in, signal.SIGUSR1)  # now it stops
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 143
        assert err == (
            "nodeclient: devnet stopped by SIGTERM: its processes have ended and its files "
            "are removed\n"
        )
        assert "kept in" not in out
        assert os.listdir(short_tmp) == []
    finally:
        if _alive(stand_in):
            os.kill(stand_in, signal.SIGKILL)


def test_stop_gives_all_children_one_grace_period_together(tmp_path: Path) -> None:
    """Children that ignore SIGTERM are killed once one grace period has passed for all of
    them, not one each: nothing cuts run_devnet's cleanup short, so its wait stays bounded
    however many nodes there are."""
    stubborn = (
        "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); signal.pause()"
    )
    net = devnet.Devnet(workdir=tmp_path, heartbeat=1.0, out=print)
    waited: list[float] = []  # the timeouts the stop's waits were given, all children's
    for i in range(3):
        child = subprocess.Popen([sys.executable, "-c", stubborn], stdout=subprocess.PIPE)
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        real_wait = child.wait

        def wait(timeout: float | None = None, real_wait: Any = real_wait) -> int:
            if timeout is not None:
                waited.append(timeout)
            return int(real_wait(timeout=timeout))

        child.wait = wait  # type: ignore[method-assign]
        net.nodes.append((tmp_path / f"node{i}", child))
    net.stop(grace=1.0)
    assert len(waited) == 3 and 0.5 < sum(waited) <= 1.0  # one grace period, not three
    assert [p.returncode for _, p in net.nodes] == [-signal.SIGKILL] * 3


# A child that writes "<name> TERM <monotonic>" to its log at each SIGTERM, and exits at
# the second one (a node: the first makes it finish its tasks, the second hand them back)
# or at the first ("coordinator").
_RECORDS_TERMS = textwrap.dedent(
    """
    import signal, sys, time
    name, log = sys.argv[1], sys.argv[2]
    seen = []
    def on_term(*_):
        seen.append(1)
        with open(log, "a") as f:
            f.write(f"{name} TERM {time.monotonic()}\\n")
        if name == "coordinator" or len(seen) == 2:
            sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    print("ready", flush=True)
    while True:
        signal.pause()
    """
)


def test_stop_asks_the_nodes_twice_and_stops_the_coordinator_last(tmp_path: Path) -> None:
    """The nodes drain while the coordinator is up to take what they send and hand back:
    SIGTERM to every node, again after the patience to those still running (they hand
    their tasks back at once), and the coordinator's SIGTERM only once they are gone."""
    log = tmp_path / "terms.log"

    def child(name: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-c", _RECORDS_TERMS, name, str(log)], stdout=subprocess.PIPE
        )
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        return proc

    net = devnet.Devnet(workdir=tmp_path, heartbeat=1.0, out=print)
    net.nodes = [(tmp_path / f"node{i}", child(f"node{i}")) for i in range(2)]
    net.coordinator = child("coordinator")
    net.stop(grace=10.0, patience=0.5)
    terms = [line.split() for line in log.read_text().splitlines()]
    names = [name for name, _, _ in terms]
    assert sorted(names[:4]) == ["node0", "node0", "node1", "node1"]
    assert names[4:] == ["coordinator"]
    firsts = {name: float(at) for name, _, at in reversed(terms)}  # each one's first TERM
    seconds = {name: float(at) for name, _, at in terms if name != "coordinator"}
    assert all(seconds[n] - firsts[n] >= 0.4 for n in ("node0", "node1"))
    assert firsts["coordinator"] >= max(seconds.values())
    assert [p.returncode for _, p in net.nodes] == [0, 0] and net.coordinator.returncode == 0


_CTRL_C_AT_THE_TERMINAL = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    from nodeclient import devnet

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # this script stands in for the devnet
    net = devnet.Devnet(workdir=Path(sys.argv[1]), heartbeat=1.0, out=print)
    net.start_coordinator()
    os.killpg(os.getpgrp(), signal.SIGINT)  # what the terminal does at Ctrl-C
    time.sleep(1.0)
    print("coordinator alive:", net.coordinator.poll() is None, flush=True)
    net.stop()
    """
)


def test_ctrl_c_at_the_terminal_reaches_the_devnet_alone(tmp_path: Path) -> None:
    """The terminal sends Ctrl-C's SIGINT to its whole foreground process group: the
    devnet's children are in groups of their own, so it reaches the devnet alone, which
    stops them in order (the nodes while the coordinator still runs), where before the
    coordinator began to stop at once, under its draining nodes."""
    done = subprocess.run(
        [sys.executable, "-c", _CTRL_C_AT_THE_TERMINAL, str(tmp_path)],
        check=False, capture_output=True, text=True, timeout=60,
        start_new_session=True,  # its own process group, as a shell gives a command
    )  # fmt: skip
    assert "coordinator alive: True" in done.stdout, (done.stdout, done.stderr)


def test_a_child_that_died_is_named_with_its_last_log_line(tmp_path: Path) -> None:
    """The devnet's waits (a node online, a job done, --serve) notice a child that died
    at once, and say which, with its last log line."""
    (tmp_path / "node0").mkdir()
    (tmp_path / "node0" / "node.log").write_text("first\nnode.crashed: out of disk\n")
    net = devnet.Devnet(workdir=tmp_path, heartbeat=1.0, out=print)
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    dead.wait()
    net.nodes.append((tmp_path / "node0", dead))
    with pytest.raises(devnet.DevnetError, match=r"node in .*node0 exited with 3: node.crashed"):
        net.check_alive()


def test_a_reader_that_went_away_is_an_interrupt_and_the_files_go(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`nodeclient devnet | head`: once the reader closes the pipe, a write fails with
    EPIPE. That is an interrupt (exit 141, as a shell says), not a failure: the children
    are stopped and the directory, node keys included, is removed, not kept without a
    word on the gone stdout."""
    monkeypatch.setenv("TMPDIR", str(short_tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)
    started: list[Path] = []

    def run(net: devnet.Devnet, **_kw: Any) -> None:
        started.append(net.workdir)
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(devnet, "_run", run)
    assert devnet.run_devnet(nodes=1, serve=False, jobs=1, heartbeat=1.0, keep=False) == 141
    assert started and not started[0].exists()


def test_a_coordinator_that_exits_at_start_is_reported_with_its_reason(tmp_path: Path) -> None:
    """A coordinator that refuses its options exits at once: the devnet says so with the
    last line of coordinator.log, not 'did not report its address within 60 s'."""
    net = devnet.Devnet(workdir=tmp_path, heartbeat=0.0, out=print)
    try:
        with pytest.raises(devnet.DevnetError) as failed:
            net.start_coordinator()
    finally:
        net.stop()
    assert str(failed.value) == (
        "the coordinator exited with 2: nodeclient-coordinator serve: error: argument "
        "--heartbeat-interval: must be 0.05 to 300 seconds, not 0.0"
    )


def test_an_unusable_tmpdir_is_one_line_that_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A temporary directory that cannot be made is an error line naming TMPDIR, not a
    traceback."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    assert main(["devnet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"nodeclient: error: cannot create the devnet's directory {tmp_path}")
    assert err.endswith("No such file or directory; set TMPDIR to a writable directory\n")
    assert err.count("\n") == 1


def test_a_tmpdir_too_deep_for_the_control_sockets_is_refused_before_anything_starts(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where /proc is not mounted, a node's control socket path may have 107 bytes: a
    TMPDIR that leaves the last node's one byte over is refused at once, naming TMPDIR (a
    devnet has no --home), and nothing is left in it; otherwise every node would fail to
    start, one by one. (With /proc, deeper sockets are reached by a shorter name.)"""
    monkeypatch.setattr(control, "_FD_DIR", str(short_tmp / "no-proc"))
    socket = len("/nodeclient-devnet-12345678/node2/control.sock")
    base = short_tmp / ("d" * (control.SOCKET_PATH_MAX + 1 - socket - len(f"{short_tmp}/")))
    base.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(base))
    with pytest.raises(devnet.DevnetError, match=r"\(108 bytes, over the 107 a Unix socket"):
        devnet.run_devnet(nodes=3, serve=False, jobs=1, heartbeat=1.0, keep=False, out=print)
    assert os.listdir(base) == []


def test_a_deep_tmpdir_is_used_where_proc_gives_sockets_a_shorter_name(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With /proc mounted, the nodes' daemons bind and reach their control sockets
    through a descriptor of their home, whatever its length: the devnet takes the
    TMPDIR as it is."""
    assert control.reaches_deep_sockets()
    base = short_tmp / ("d" * 200)
    base.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(base))
    workdir = devnet._make_workdir(16)
    assert workdir.parent == base
    workdir.rmdir()


def _status(busy_periods: int) -> dict[str, Any]:
    """A node's status after *busy_periods* tasks, as the daemon returns it."""
    sm = StateMachine(clock=lambda: 0.0)
    for _ in range(busy_periods):
        sm.transition(NodeState.EXECUTING, reason="a dispatched task started")
        sm.transition(NodeState.IDLE, reason="the last running task finished")
    transitions = sm.history[-control.STATUS_TRANSITIONS :]
    return {
        "state": sm.state.value,
        "completed": busy_periods,
        "transitions": [{"from": t.from_state.value, "to": t.to_state.value} for t in transitions],
    }


def test_a_cut_state_history_is_shown_cut() -> None:
    """A node's status holds its last 10 transitions only: a longer history is shown as
    '... -> ' and says so, not as a path that begins at READY; one from READY is whole."""
    assert devnet.state_line(_status(7)) == (
        "... -> " + " -> ".join(["IDLE", "EXECUTING"] * 5 + ["IDLE"])
        + "  (the last 10 transitions; now IDLE, 7 completed)"
    )  # fmt: skip
    assert devnet.state_line(_status(5)) == (  # 10 transitions, all of them
        " -> ".join(["READY"] + ["EXECUTING", "IDLE"] * 5) + "  (now IDLE, 5 completed)"
    )


def test_the_coordinator_database_stays_in_a_directory_named_with_a_question_mark(
    tmp_path: Path,
) -> None:
    """The database URL is built, not formatted: a "?" in the devnet's directory does not
    start a query string that would put coordinator.db somewhere else."""
    workdir = tmp_path / "a?b"
    net = devnet.Devnet(workdir=workdir, heartbeat=2.0, out=print)
    try:
        net.start_coordinator()
    finally:
        net.stop()
    assert (workdir / "coordinator" / "coordinator.db").is_file()
    assert sorted(os.listdir(tmp_path)) == ["a?b"]


def test_devnet_nodes_are_started_with_every_gpu_hidden(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A devnet is a network of CPU nodes: each node process gets CUDA_VISIBLE_DEVICES
    empty, else every node would take every GPU of the one machine, and none would run
    inference with a CPU build of onnxruntime (the default install)."""
    started: list[dict[str, str]] = []

    class Recorded:
        pid = os.getpid()

        def __init__(self, _argv: list[str], **kwargs: Any) -> None:
            started.append(kwargs["env"])

    monkeypatch.setattr(devnet.subprocess, "Popen", Recorded)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    net = devnet.Devnet(workdir=tmp_path, heartbeat=1.0, out=lambda _line: None, url="http://x")
    net._sandbox = True
    net.add_node(0)
    (env,) = started
    assert env["CUDA_VISIBLE_DEVICES"] == ""
    assert env["PATH"] == os.environ["PATH"]  # the rest of the environment as it was


def test_a_node_started_is_stopped_even_if_pinning_it_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node process is in the devnet's list as soon as it starts: when pinning it to
    its CPUs fails (the CPU set changed meanwhile), stop() still ends it. (Before, it was
    listed only afterwards, and kept running while its home was removed.)"""
    started: list[Any] = []

    class Recorded:
        pid = os.getpid()

        def __init__(self, _argv: list[str], **kwargs: Any) -> None:
            started.append(self)

    def refused(pid: int, cpus: set[int]) -> None:
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(devnet.subprocess, "Popen", Recorded)
    monkeypatch.setattr(devnet.os, "sched_setaffinity", refused)
    net = devnet.Devnet(workdir=tmp_path, heartbeat=1.0, out=lambda _line: None, url="http://x")
    net._sandbox = True
    with pytest.raises(OSError, match="Invalid argument"):
        net.add_node(0, cpus={0})
    assert [proc for _, proc in net.nodes] == started
