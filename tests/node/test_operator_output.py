"""What the operator's commands show, whatever the daemon, the coordinator or the disk
hold: never a terminal's commands, never a traceback, never a hang."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from rich.console import Console

from nodeclient import logs
from nodeclient.errors import UsageError
from nodeclient.node import console as con
from nodeclient.node import control, doctor, service
from nodeclient.node.cli import main
from nodeclient.node.control import DaemonBusy, DaemonNotRunning
from nodeclient.node.outbox import Outbox
from tests.node.test_console import NO_GPU, NOW, ScriptedKeys, record, status, text

HOSTILE = "\x1b[2J\x1b[H\x1b]0;owned\x1b\\\x1b[32mstate        READY\nlink         up\x1b[0m"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "h"
    home.mkdir(mode=0o700)
    return home


@pytest.fixture
def fake_daemon(home: Path) -> Iterator[Callable[[Callable[[socket.socket], None]], None]]:
    """A stand-in daemon on the home's control socket; each client gets *answer*."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(home / control.SOCKET_NAME))
    server.listen()
    answers: list[Callable[[socket.socket], None]] = []

    def loop() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.recv(4096)
                with contextlib.suppress(OSError):  # the client gave up: the point
                    answers[0](conn)

    threading.Thread(target=loop, daemon=True).start()
    try:
        yield answers.append
    finally:
        server.close()


def _send(doc: object) -> Callable[[socket.socket], None]:
    return lambda conn: conn.sendall(json.dumps(doc).encode() + b"\n")


def test_status_shows_network_text_as_escapes(home: Path, fake_daemon, capsys) -> None:
    """A coordinator's error with escape sequences and a newline is shown on one line,
    written out: the terminal gets no command (clear screen, title, colours)."""
    answer = status()
    answer["link"] = {**answer["link"], "status": "down", "last_error": HOSTILE}
    fake_daemon(_send(answer))
    assert main(["status", "--home", str(home)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out
    (line,) = [li for li in out.splitlines() if li.startswith("last error")]
    assert "\\x1b[2J" in line and "\\x0alink" in line
    assert main(["status", "--home", str(home), "--json"]) == 0  # JSON escapes by itself
    assert json.loads(capsys.readouterr().out)["link"]["last_error"] == HOSTILE


def test_console_shows_network_text_as_escapes() -> None:
    answer = status()
    answer["link"] = {**answer["link"], "status": "down", "last_error": HOSTILE}
    answer["transitions"] = [{"from": "READY", "to": "IDLE", "reason": HOSTILE, "at": NOW}]
    shown = text(con.render(answer, NO_GPU, now=NOW))
    assert "\x1b" not in shown and "\\x1b[2J" in shown


SURROGATE = "registration failed (503): \ud800 maintenance"


def _with_surrogates() -> dict:
    """A daemon's answer whose link error and running task's progress note hold lone
    surrogates."""
    answer = status(state="EXECUTING")
    answer["link"] = {**answer["link"], "status": "down", "last_error": SURROGATE}
    answer["running"] = [
        {"task_id": "t1", "workload_class": "ai.inference", "seconds": 1.0,
         "progress": {"done": 1, "total": 2, "note": "frame \udce9"}}
    ]  # fmt: skip
    return answer


def test_status_shows_a_lone_surrogate_as_an_escape(home: Path, fake_daemon, capsys) -> None:
    """A coordinator's JSON error with "\\ud800" in it (a lone surrogate, which no UTF-8
    stream can encode) and a task's progress note with one: `status` prints them written
    out instead of ending with a UnicodeEncodeError (capsys writes UTF-8, strictly)."""
    answer = _with_surrogates()
    fake_daemon(_send(answer))
    assert main(["status", "--home", str(home)]) == 0
    out = capsys.readouterr().out
    (line,) = [li for li in out.splitlines() if li.startswith("last error")]
    assert line == "last error   registration failed (503): \\ud800 maintenance"
    assert "frame \\udce9" in out


def test_console_shows_a_lone_surrogate_as_an_escape() -> None:
    """The --watch console, drawing on a UTF-8 terminal, shows lone surrogates from the
    daemon's answer (the link's error, a progress note, a transition's reason) and from a
    control socket's path that is not UTF-8 written out, and goes on: it never crashes."""
    answer = _with_surrogates()
    answer["transitions"] = [{"from": "READY", "to": "IDLE", "reason": "\udfff", "at": NOW}]
    gone = DaemonNotRunning("no daemon at /home/caf\udce9/control.sock")
    answers: list = [answer, gone]

    def fetch() -> dict:
        item = answers.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    terminal = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")  # strict, as a terminal's
    out = Console(file=terminal, record=True, width=80, height=24, force_terminal=True)
    assert con.watch(fetch, console=out, keys=ScriptedKeys([None, "q"]), clock=lambda: NOW) == 0
    assert not answers
    shown = out.export_text()
    assert "\\ud800 maintenance" in shown and "frame \\udce9" in shown
    assert "\\udfff" in shown and "caf\\udce9/control.sock" in shown


def test_a_malformed_status_answer_is_one_line(home: Path, fake_daemon, capsys) -> None:
    """A daemon of another version (or not ours) answering without the fields status shows:
    one line and exit 1 from `status`; the console shows it and goes on asking."""
    fake_daemon(_send({"state": "READY", "node_id": "0x1"}))
    assert main(["status", "--home", str(home)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lacks or mangles a field" in err and "KeyError" in err
    out = Console(record=True, width=80, height=24, file=io.StringIO(), force_terminal=True)
    fetch = lambda: {"state": "READY", "node_id": "0x1"}  # noqa: E731
    assert con.watch(fetch, console=out, keys=ScriptedKeys([None, "q"]), clock=lambda: NOW) == 0
    assert "could not be shown" in out.export_text()


@pytest.mark.usefixtures("stock_recursion_limit")
def test_a_status_answer_nested_without_end_is_one_line(home: Path, fake_daemon, capsys) -> None:
    """An answer JSON can parse but the status lines cannot walk (a field nested 800
    deep): one line from `status`, and the console shows it and goes on asking."""
    deep = b'{"state": "READY", "x": ' + b"[" * 800 + b"]" * 800 + b"}\n"
    fake_daemon(lambda c: c.sendall(deep))
    assert main(["status", "--home", str(home)]) == 1
    err = capsys.readouterr().err
    # Python 3.11 and 3.12 stop decoding at the recursion limit; 3.13 (whose JSON decoder's
    # C recursion has a limit of its own) decodes it and finds no link field.
    assert err.count("\n") == 1
    assert "RecursionError" in err or (
        sys.version_info >= (3, 13) and "lacks or mangles a field (KeyError: 'link')" in err
    )
    nested: object = []
    for _ in range(5000):
        nested = [nested]
    broken = {**status(), "uptime_s": 10.0**300 * 10.0**10}  # inf: timedelta overflows
    for answer in ({**status(), "x": nested}, broken):
        out = Console(record=True, width=80, height=24, file=io.StringIO(), force_terminal=True)
        fetch = lambda a=answer: a  # noqa: E731
        keys = ScriptedKeys([None, "q"])
        assert con.watch(fetch, console=out, keys=keys, clock=lambda: NOW) == 0
        assert "could not be shown" in out.export_text()


@pytest.mark.parametrize(
    ("answer", "error", "match"),
    [
        (lambda c: c.sendall(b"[" * 200_000 + b"\n"), DaemonNotRunning, "unreadable answer"),
        (lambda c: [c.sendall(b" " * 65536) for _ in range(64)], DaemonNotRunning, "over 1048576"),
        (
            lambda c: c.sendall(b'{"state": "READY", "uptime_s": Infinity}\n'),
            DaemonNotRunning,
            "unreadable answer",
        ),
        (
            lambda c: c.sendall(b'{"state": "READY", "uptime_s": 1e309}\n'),
            DaemonNotRunning,
            "unreadable answer",
        ),
    ],
    ids=["nested", "endless", "infinity", "overflowing-float"],
)
@pytest.mark.usefixtures("stock_recursion_limit")  # as the status command keeps it
def test_a_hostile_answer_is_refused(
    home: Path, fake_daemon, answer, error: type[Exception], match: str
) -> None:
    fake_daemon(answer)
    with pytest.raises(error, match=match):
        control.request(home / control.SOCKET_NAME, {"cmd": "status"}, timeout=5.0)


def test_a_trickled_answer_ends_at_the_timeout(home: Path, fake_daemon) -> None:
    """A byte now and then: the timeout is for the whole answer, not for each read (with
    a timeout for each read, the trickle would go on to its end, 5 s, and its answer be
    refused as no daemon's, not as a busy one's)."""

    def trickle(conn: socket.socket) -> None:
        for _ in range(50):
            conn.sendall(b" ")
            time.sleep(0.1)

    fake_daemon(trickle)
    with pytest.raises(DaemonBusy, match="did not answer within 1 s"):
        control.request(home / control.SOCKET_NAME, {"cmd": "status"}, timeout=1.0)


def test_text_logs_keep_one_event_on_one_line(capsys) -> None:
    logs.configure(fmt="text")
    try:
        logging.getLogger("nodeclient.node").warning("link.error", extra={"error": HOSTILE})
    finally:
        logs.configure(fmt="json")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\x1b" not in err and "\\x1b]0;owned" in err


def test_a_traceback_in_text_logs_cannot_forge_an_event(capsys) -> None:
    """An exception whose message quotes the network (newlines, escape sequences): each
    line of its traceback is marked `  | ` and has its control characters written out,
    so none of it reads as an event line of its own or reaches the terminal as a
    command."""
    logs.configure(fmt="text")
    try:
        try:
            raise ValueError("bad frame\n12:00:00 info    node.registered forged\x1b[2J")
        except ValueError:
            logging.getLogger("nodeclient.node").exception("link.error")
    finally:
        logs.configure(fmt="json")
    first, *trace = capsys.readouterr().err.splitlines()
    assert " error   link.error" in first
    assert trace and all(line.startswith("  | ") for line in trace)
    assert "\x1b" not in "".join(trace) and "\\x1b[2J" in "".join(trace)


def test_history_leaves_a_damaged_row_out_and_says_so(home: Path, capsys) -> None:
    box = Outbox(home / "outbox.db")
    try:
        good = record(box, completed_at=NOW)
        bad = record(box, completed_at=NOW - 10)
        odd = record(box, completed_at=NOW - 20)
    finally:
        box.close()
    db = sqlite3.connect(home / "outbox.db")
    db.execute("UPDATE outbox SET message = 'not json' WHERE task_id = ?", (str(bad),))
    db.execute("UPDATE outbox SET received_at = 'garbled' WHERE task_id = ?", (str(odd),))
    db.commit()
    db.close()
    assert main(["history", "--home", str(home)]) == 1
    captured = capsys.readouterr()
    assert str(good) in captured.out
    assert str(bad) not in captured.out and str(odd) not in captured.out
    assert captured.err.count("\n") == 1 and "2 damaged row(s)" in captured.err


def test_output_piped_to_a_reader_that_stops_is_no_traceback(home: Path) -> None:
    """`nodeclient history | head -1` on a long history: exit 141, nothing on stderr."""
    code = (
        "import sys\n"
        "from nodeclient.node import cli\n"
        "def flood(args):\n"
        "    for i in range(200000):\n"
        "        print('line', i)\n"
        "    return 0\n"
        "cli.cmd_history = flood\n"
        "sys.exit(cli.main(sys.argv[1:]))\n"
    )
    done = subprocess.run(
        ["bash", "-c", f'"{sys.executable}" -c "$0" history --home "$1" | head -1; '
         'echo "rc=${PIPESTATUS[0]}" >&2', code, str(home)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.stdout == "line 0\n"
    assert done.stderr == "rc=141\n"


def test_a_control_socket_path_too_long_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where /proc is not mounted, no shorter name reaches a deep home's socket."""
    import asyncio

    monkeypatch.setattr(control, "_FD_DIR", str(tmp_path / "no-proc"))
    deep = tmp_path / ("d" * 120)
    deep.mkdir()

    async def handler(_request: dict) -> dict:
        return {}

    with pytest.raises(UsageError, match="over the 107 a Unix socket allows"):
        asyncio.run(control.serve(deep / control.SOCKET_NAME, handler))


def test_doctor_takes_no_nan_for_the_coordinators_time() -> None:
    assert doctor.server_time({}, {"server_time": float("nan")}) is None
    assert doctor.server_time({}, {"server_time": 1.5}) == 1.5


def test_operator_mistakes_are_refused_before_anything_starts(home: Path, capsys) -> None:
    assert main(["devnet", "--jobs", "0"]) == 2
    assert "--jobs must be between 1 and 64" in capsys.readouterr().err
    assert main(["status", "--home", str(home), "--watch"]) == 2  # stdout is no terminal here
    assert "standard output is not one" in capsys.readouterr().err
    for output in (home, Path("")):
        with pytest.raises(UsageError, match="must name a file"):
            service.write_unit(output, "[Unit]\n")
    with pytest.raises(UsageError, match="directly under /var/lib"):
        service.UnitOptions(home=Path("/var/lib/.."), executable=Path("/usr/bin/nodeclient"))
    assert [p.name for p in home.iterdir()] == []  # nothing half-written left


def test_unstake_and_doctor_ask_the_running_daemon_for_its_coordinator(
    home: Path, fake_daemon, capsys
) -> None:
    """The README's tour starts the daemon with `run --coordinator URL` and config.toml
    names none: `unstake` and `doctor` then use the coordinator the daemon runs with,
    instead of refusing for want of one."""
    assert main(["init", "--home", str(home), "--wallet", "0x" + "11" * 20]) == 0
    capsys.readouterr()
    answer = status()
    answer["link"] = {**answer["link"], "coordinator": "http://127.0.0.1:9"}  # nobody there
    fake_daemon(_send(answer))
    assert main(["doctor", "--home", str(home), "--json"]) != 0
    checks = {c["check"]: c for c in json.loads(capsys.readouterr().out)}
    said = checks["coordinator"]["summary"] + checks["coordinator"]["fix"]
    assert "http://127.0.0.1:9" in said, said
    assert main(["unstake", "--home", str(home)]) == 2
    assert "cannot reach the coordinator at http://127.0.0.1:9" in capsys.readouterr().err
