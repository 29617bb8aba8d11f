"""The status console (2.3.8), ``nodeclient history``, and what the operator reads in the logs.

The console's picture is a pure function of a status snapshot, rendered here into a
recording rich Console of 80x24; the live loop is driven with a scripted key source and a
scripted status source, so nothing waits on a terminal or a clock.
"""

from __future__ import annotations

import io
import json
import logging
import sqlite3
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from rich.console import Console

from nodeclient import logs
from nodeclient.errors import UsageError
from nodeclient.node import console as con
from nodeclient.node.cli import main
from nodeclient.node.control import DaemonNotRunning
from nodeclient.node.metrics import GpuSnapshot, GpuUse
from nodeclient.node.outbox import Outbox

NOW = 1_765_000_000.0
NODE = "0x1234567890AbcdEF1234567890aBcdef12345678"
NO_GPU = con.SystemSnapshot(12.0, 3 << 30, 24 << 30, GpuSnapshot("no-gpu"))


def status(**over) -> dict:
    base = {
        "node_id": NODE,
        "state": "READY",
        "state_since": NOW - 65,
        "link": {
            "status": "up",
            "since": NOW - 100,
            "coordinator": "http://127.0.0.1:8000",
            "rtt_ms": 1.25,
            "last_heartbeat_ack": NOW - 2,
            "reconnects": 0,
            "last_error": "",
            "heartbeat_seq": 7,
        },
        "slots": 2,
        "running": [],
        "completed": 12,
        "failed": 1,
        "rejected": 2,
        "timed_out": 3,
        "outbox_backlog": 4,
        "uptime_s": 3600.0,
        "unstaking_until": None,
        "unstake_remaining_s": None,
        "transitions": [],
        "time": NOW,
    }
    base.update(over)
    return base


def text(renderable, *, height: int = 24, width: int = 80) -> str:
    c = Console(record=True, width=width, height=height, color_system=None)
    c.print(renderable)
    return c.export_text()


def task(tid: str, **over) -> dict:
    return {
        "task_id": tid,
        "job_id": str(uuid.uuid4()),
        "workload_class": "ai.inference",
        "seconds": 2.5,
        **over,
    }


# --- the picture ----------------------------------------------------------------------------


def test_shows_state_link_counters_and_backlog() -> None:
    """The header rows carry the state with its age, the link with rtt and ack age, every counter."""
    out = text(con.render(status(), NO_GPU, now=NOW))
    assert "READY for 00:01:05" in out
    assert "up · rtt 1.2 ms · ack 2s ago" in out
    assert "completed 12 · failed 1 · rejected 2 · timed out 3" in out
    assert "4 awaiting acknowledgement" in out
    assert "node 0x1234…5678" in out
    from nodeclient.node.cli_status import status_lines  # and plain `status`, all four too

    totals = next(line for line in status_lines(status()) if line.startswith("totals"))
    assert "12 completed, 1 failed, 2 rejected, 3 timed out, 4 awaiting" in totals


def test_fits_80x24_and_never_wraps() -> None:
    """A busy node (many tasks and transitions, a long URL) still fits in 80 columns by 24 rows."""
    many = [
        task(str(uuid.uuid4()), progress={"done": i, "total": 10, "note": "x" * 90})
        for i in range(24)
    ]
    trans = [
        {"from": "IDLE", "to": "EXECUTING", "reason": "r" * 200, "at": NOW - i} for i in range(10)
    ]
    link = {**status()["link"], "coordinator": "https://" + "c" * 150 + ".example"}
    shown = status(running=many, transitions=trans, link=link)
    out = text(con.render(shown, NO_GPU, now=NOW))
    lines = out.rstrip("\n").split("\n")
    assert len(lines) <= 24
    # A wrapped line would be two lines at 80 columns and one on a wide screen.
    wide = text(con.render(shown, NO_GPU, now=NOW), width=240).rstrip("\n").split("\n")
    assert len(lines) == len(wide)
    assert "… and" in out and "more" in out


def test_running_task_with_progress_shows_percent_and_note() -> None:
    """A task reporting progress shows its bar's percentage and its note."""
    t = task(
        "3f2a9c1e-aaaa-4bbb-8ccc-000000000001", progress={"done": 4, "total": 10, "note": "frame 4"}
    )
    out = text(con.render(status(state="EXECUTING", running=[t]), NO_GPU, now=NOW))
    assert "Running · 1 of 2 slots" in out
    assert "3f2a9c1e" in out and "40% 2.5s frame 4" in out


def test_running_task_without_progress_shows_elapsed() -> None:
    """Progress is optional: a task without it shows how long it has been running."""
    out = text(
        con.render(status(running=[task("abcdef12-0000-4000-8000-000000000000")]), NO_GPU, now=NOW)
    )
    assert "abcdef12" in out and "running 2.5s" in out


def test_transitions_newest_first() -> None:
    """The last transitions are listed newest first, with their reasons."""
    trans = [
        {"from": "READY", "to": "EXECUTING", "reason": "task a started", "at": NOW - 30},
        {
            "from": "EXECUTING",
            "to": "IDLE",
            "reason": "the last running task finished",
            "at": NOW - 10,
        },
    ]
    out = text(con.render(status(state="IDLE", transitions=trans), NO_GPU, now=NOW))
    assert out.index("EXECUTING → IDLE") < out.index("READY → EXECUTING")
    assert datetime.fromtimestamp(NOW - 10, UTC).strftime("%H:%M:%S") in out


def test_unstake_countdown_only_when_unstaking() -> None:
    """UNSTAKING shows the cooldown countdown; other states do not."""
    out = text(
        con.render(
            status(state="UNSTAKING", unstaking_until=NOW + 604_000, unstake_remaining_s=604_000),
            NO_GPU,
            now=NOW,
        )
    )
    assert "cooldown ends in 6d 23:46:40" in out
    assert "cooldown" not in text(con.render(status(), NO_GPU, now=NOW))
    ended = status(state="UNSTAKING", unstaking_until=NOW - 10, unstake_remaining_s=0)
    out = text(con.render(ended, NO_GPU, now=NOW))
    assert "cooldown ended: this node is retired" in out and "ends in" not in out


def test_status_line_after_the_cooldown_says_the_node_is_retired() -> None:
    """`nodeclient status`: the time left, then, once the 7 days are over, that the node
    is retired (it gets no more work) and how to serve again."""
    from nodeclient.node.cli_status import unstake_line

    assert unstake_line(NOW + 90, 90) == "cooldown ends in 00:01:30"
    line = unstake_line(0, 0)
    assert line.startswith("cooldown ended at 1970-01-01 00:00:00 UTC: this node is retired")
    assert "nodeclient init" in line


def test_no_gpu_and_gpu_rows() -> None:
    """Without NVML the console says "no GPU"; with it, one row per card with use and memory."""
    assert "no GPU" in text(con.render(status(), NO_GPU, now=NOW))
    gpus = GpuSnapshot("ok", "", (GpuUse(0, "NVIDIA H100", 45, 10 << 30, 80 << 30),))
    out = text(con.render(status(), con.SystemSnapshot(50, 1, 2, gpus), now=NOW))
    assert "GPU 0" in out and "NVIDIA H100  45 %  10.0 / 80.0 GiB" in out


def test_link_down_shows_last_error() -> None:
    """A link that is down shows why."""
    link = {**status()["link"], "status": "down", "last_error": "ConnectError: refused"}
    out = text(con.render(status(link=link), NO_GPU, now=NOW))
    assert "down" in out and "ConnectError: refused" in out


def test_workers_not_all_up_are_shown() -> None:
    """While the daemon starts its workers (the link waits for them) the console and the
    text status say how many are up and why the link is down; a slot without a worker
    later is counted; all up, or an older daemon that does not say, shows nothing."""
    from nodeclient.node.cli_status import status_lines

    down = {**status()["link"], "status": "down"}
    starting = status(link=down, workers_ready=0, starting=True)
    out = text(con.render(starting, NO_GPU, now=NOW))
    assert "0 of 2 ready: starting them (the link waits for them)" in out
    assert "workers      0 of 2 ready: starting them" in "\n".join(status_lines(starting))
    one = status(workers_ready=1, starting=False)
    assert "1 of 2 ready" in text(con.render(one, NO_GPU, now=NOW))
    assert "starting them" not in text(con.render(one, NO_GPU, now=NOW))
    for quiet in (status(workers_ready=2, starting=False), status()):
        assert "ready" not in text(con.render(quiet, NO_GPU, now=NOW))
        assert not any(line.startswith("workers") for line in status_lines(quiet))


def test_a_stopping_daemon_says_so() -> None:
    """After SIGTERM the daemon drains (finishes its tasks, hands new dispatches back):
    the console and the text status say so beside the state."""
    from nodeclient.node.cli_status import status_lines

    assert "stopping" in text(con.render(status(stopping=True), NO_GPU, now=NOW))
    assert "stopping" not in text(con.render(status(), NO_GPU, now=NOW))
    lines = status_lines({**status(stopping=True), "time": NOW})
    assert any(line.startswith("stopping") for line in lines)


def test_daemon_not_running_picture() -> None:
    """No status: the console says the daemon is not running and that it keeps retrying."""
    out = text(con.render(None, NO_GPU, now=NOW, error="no node daemon is running"))
    assert "daemon not running" in out and "retrying every 1 s" in out


# --- the live loop --------------------------------------------------------------------------


class ScriptedKeys:
    """Returns the scripted keys one per read, without waiting."""

    def __init__(self, script: list[str | None]) -> None:
        self.script = list(script)
        self.entered = self.exited = 0

    def __enter__(self):
        self.entered += 1
        return self

    def __exit__(self, *exc) -> None:
        self.exited += 1

    def read(self, timeout: float) -> str | None:
        return self.script.pop(0) if self.script else "q"


def test_watch_retries_when_daemon_goes_away_and_quits_on_q() -> None:
    """A daemon that stops answering is shown as such and retried; q ends the loop with 0."""
    answers: list = [status(), DaemonNotRunning("gone"), status(state="IDLE")]
    out = Console(record=True, width=80, height=24, file=io.StringIO(), force_terminal=True)

    def fetch() -> dict:
        item = answers.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    keys = ScriptedKeys([None, "x", "q"])
    rc = con.watch(fetch, console=out, keys=keys, clock=lambda: NOW)
    assert rc == 0 and not answers  # three redraws: ok, gone, back
    shown = out.export_text()
    assert "daemon not running" in shown and "gone" in shown and "IDLE for" in shown
    assert keys.entered == keys.exited == 1  # the terminal is restored


def test_a_busy_daemon_is_not_shown_as_a_stopped_one() -> None:
    """A daemon that took the request but did not answer in time is slow, not stopped:
    the headline must not send the operator to restart a healthy daemon."""
    from nodeclient.node.control import DaemonBusy

    answers: list = [DaemonBusy("the daemon did not answer within 2 s; it may be busy")]
    out = Console(record=True, width=80, height=24, file=io.StringIO(), force_terminal=True)

    def fetch() -> dict:
        raise answers.pop(0)

    assert con.watch(fetch, console=out, keys=ScriptedKeys([]), clock=lambda: NOW) == 0
    shown = out.export_text()
    assert "daemon not answering (busy?)" in shown and "may be busy" in shown
    assert "daemon not running" not in shown


def test_watch_exits_on_ctrl_c() -> None:
    """Ctrl-C (KeyboardInterrupt) ends the console cleanly with status 0."""

    class Interrupting(ScriptedKeys):
        def read(self, timeout: float) -> str | None:
            raise KeyboardInterrupt

    keys = Interrupting([])
    out = Console(file=io.StringIO(), width=80, height=24)
    assert con.watch(status, console=out, keys=keys) == 0
    assert keys.exited == 1


def test_status_watch_and_json_refused(tmp_path: Path, capsys) -> None:
    """--watch with --json is refused: --json is one snapshot for scripts."""
    home = tmp_path / "h"
    home.mkdir(mode=0o700)
    assert main(["status", "--home", str(home), "--watch", "--json"]) == 2
    assert "do not combine" in capsys.readouterr().err


# --- history --------------------------------------------------------------------------------


def record(box: Outbox, *, completed_at: float, slice_index: int | None = None) -> uuid.UUID:
    t = uuid.uuid4()
    box.commit_result(
        task_id=t,
        job_id=uuid.uuid4(),
        workload_class="ai.inference",
        slice_index=slice_index,
        kind="result",
        result=b"r",
        proof=bytes(range(32)),
        message={"m": 1},
        received_at=completed_at - 1.5,
        completed_at=completed_at,
        sign=lambda _m: b"s" * 65,
    )
    return t


def test_parse_since_durations_and_dates() -> None:
    """--since takes 30m / 24h / 7d back from now, or an ISO date/time; nonsense is refused."""
    assert con.parse_since("24h", now=NOW) == NOW - 86400
    assert con.parse_since("7d", now=NOW) == NOW - 7 * 86400
    assert con.parse_since("90m", now=NOW) == NOW - 5400
    assert con.parse_since("2025-01-31T12:00:00+00:00", now=NOW) == 1738324800.0
    with pytest.raises(UsageError, match="neither a duration"):
        con.parse_since("yesterday", now=NOW)


@pytest.fixture
def tokyo(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Local time is Asia/Tokyo (UTC+9), as on an operator's machine there."""
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("tokyo")
@pytest.mark.parametrize("text", ["0001-01-01", "0001-01-01T05:00:00"])
def test_parse_since_out_of_range_local_date_is_a_usage_error(text: str) -> None:
    """0001-01-01 local time east of UTC is before year 1 in UTC: refused, naming the value."""
    with pytest.raises(UsageError, match=f"--since '{text}' is out of the range"):
        con.parse_since(text, now=NOW)


@pytest.mark.usefixtures("tokyo")
def test_history_since_out_of_range_is_one_line(tmp_path: Path, capsys) -> None:
    """`history --since 0001-01-01` in Tokyo: one line, exit 2, no traceback."""
    home = tmp_path / "h"
    home.mkdir(mode=0o700)
    assert main(["history", "--home", str(home), "--since", "0001-01-01"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nodeclient: error: --since '0001-01-01'") and err.count("\n") == 1


def test_history_json_lists_every_task_with_outcome(tmp_path: Path, capsys) -> None:
    """history --json: class, slice, outcome, duration, proof and acknowledgement time per task."""
    home = tmp_path / "h"
    home.mkdir(mode=0o700)
    box = Outbox(home / "outbox.db")
    acked = record(box, completed_at=NOW - 10, slice_index=3)
    pending = record(box, completed_at=NOW - 5)
    box.mark_acked(acked, status="accepted", reason="", at=NOW - 9)
    box.close()
    assert main(["history", "--home", str(home), "--json"]) == 0
    rows = {r["task_id"]: r for r in json.loads(capsys.readouterr().out)}
    a, p = rows[str(acked)], rows[str(pending)]
    assert a["outcome"] == "accepted" and a["slice_index"] == 3 and a["duration_s"] == 1.5
    assert a["proof"] == "0x" + bytes(range(32)).hex()
    assert a["acknowledged_at"] == datetime.fromtimestamp(NOW - 9, UTC).isoformat(
        timespec="seconds"
    )
    assert p["outcome"] == "unacknowledged" and p["acknowledged_at"] is None


def test_history_since_filters_and_needs_no_daemon(tmp_path: Path, capsys) -> None:
    """--since drops older tasks; the table reads the file read-only, without a daemon."""
    home = tmp_path / "h"
    home.mkdir(mode=0o700)
    box = Outbox(home / "outbox.db")
    record(box, completed_at=1.0e9)  # 2001: outside any recent window
    recent = record(box, completed_at=4.0e9)  # 2096: inside every window
    box.close()
    before = (home / "outbox.db").read_bytes()
    assert main(["history", "--home", str(home), "--since", "7d"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("TASK") and len(out) == 2 and str(recent) in out[1]
    assert (home / "outbox.db").read_bytes() == before


def test_history_read_only_does_not_create_a_database(tmp_path: Path, capsys) -> None:
    """A home without outbox.db has no history, and reading it creates nothing."""
    home = tmp_path / "h"
    home.mkdir(mode=0o700)
    assert main(["history", "--home", str(home)]) == 0
    assert "no tasks recorded" in capsys.readouterr().out
    assert not (home / "outbox.db").exists()


def test_history_unreadable_database_is_one_line_error(tmp_path: Path, capsys) -> None:
    """A file that is not the outbox gives a one-line error, not a traceback."""
    home = tmp_path / "h"
    home.mkdir(mode=0o700)
    sqlite3.connect(home / "outbox.db").execute("CREATE TABLE other (x)").connection.close()
    assert main(["history", "--home", str(home)]) == 2
    err = capsys.readouterr().err
    assert "cannot read" in err and err.count("\n") == 1


# --- logs -----------------------------------------------------------------------------------


def emit_task_event(fmt: str, capsys) -> str:
    logs.configure(fmt=fmt)
    try:
        with logs.bind(node_id=NODE), logs.bind(task_id="t-1"):
            logging.getLogger("nodeclient.node").info("task.executed", extra={"seconds": 0.5})
        return capsys.readouterr().err
    finally:
        logs.configure(fmt="json", level="warning")


def test_json_log_line_carries_node_and_task(capsys) -> None:
    """--log-format json: a task event is one JSON object with node_id and task_id bound."""
    line = emit_task_event("json", capsys).strip()
    doc = json.loads(line)
    assert doc["event"] == "task.executed"
    assert doc["node_id"] == NODE and doc["task_id"] == "t-1" and doc["seconds"] == 0.5


def test_text_log_format(capsys) -> None:
    """--log-format text: a human line with the event name and the bound fields."""
    line = emit_task_event("text", capsys).strip()
    assert "task.executed" in line and f"node_id={NODE}" in line and "task_id=t-1" in line
    with pytest.raises(ValueError):
        json.loads(line)
