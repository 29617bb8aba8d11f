"""2.3.8 Status Console: ``nodeclient status --watch`` and ``nodeclient history``.

The console is a pure function from a status snapshot to a rich renderable
(:func:`render`), plus a thin loop (:func:`watch`) that fetches the daemon's status over
the control socket, samples CPU, RAM and GPUs, redraws once a second and reads keys
without blocking. Keeping the picture a pure function lets tests render it into a
recording ``Console`` of 80 columns and assert on the text, without a terminal.

It is designed for an SSH session in an 80x24 terminal: one panel, values that are cut
with an ellipsis rather than wrapped, and lists (running tasks, transitions) trimmed to
the height available. When the daemon goes away the console says so and keeps retrying.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import select
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final, NamedTuple, Protocol, TextIO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from nodeclient.errors import NodeClientError, UsageError
from nodeclient.node.cli_status import workers_line
from nodeclient.node.metrics import GpuSampler, GpuSnapshot
from nodeclient.node.outbox import OutboxEntry
from nodeclient.text import printable, printable_tree

STATE_STYLE: Final = {
    "READY": "bold green",
    "EXECUTING": "bold cyan",
    "IDLE": "bold yellow",
    "UNSTAKING": "bold magenta",
}
LINK_STYLE: Final = {"up": "green", "connecting": "yellow", "down": "red"}
QUIT_KEYS: Final = frozenset({"q", "Q", "\x03"})
# What a status answer of another version (or not a daemon's) raises when it is shown.
_UNSHOWABLE: Final = (
    KeyError,
    TypeError,
    ValueError,
    AttributeError,
    OverflowError,
    RecursionError,
    OSError,  # a time out of the platform's range: localtime's EOVERFLOW
)
_GIB: Final = 1 << 30
_BAR_WIDTH: Final = 22


@dataclass(frozen=True, slots=True)
class SystemSnapshot:
    """This machine's load as the console shows it beside the daemon's status."""

    cpu_percent: float
    ram_used_bytes: int
    ram_total_bytes: int
    gpu: GpuSnapshot


def sample_system(gpu: GpuSampler | None) -> SystemSnapshot:
    import psutil

    mem = psutil.virtual_memory()
    return SystemSnapshot(
        cpu_percent=float(psutil.cpu_percent(interval=None)),
        ram_used_bytes=int(mem.total - mem.available),
        ram_total_bytes=int(mem.total),
        gpu=gpu.latest() if gpu is not None else GpuSnapshot("no-gpu"),
    )


# --- formatting helpers -------------------------------------------------------------------------


def duration(seconds: float) -> str:
    """``[Nd ]HH:MM:SS``; negative durations count as zero."""
    s = max(0, int(seconds))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d " if d else "") + f"{h:02d}:{m:02d}:{s:02d}"


def ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    seconds = max(0.0, seconds)
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


def clock_time(ts: float) -> str:
    """A time of day in UTC, as the console's title shows the time."""
    return datetime.fromtimestamp(ts, UTC).strftime("%H:%M:%S")


def _gib(n: int) -> str:
    return f"{n / _GIB:.1f}"


def _short_id(node_id: str) -> str:
    return f"{node_id[:6]}…{node_id[-4:]}" if len(node_id) > 12 else node_id


# --- the picture --------------------------------------------------------------------------------


def _system_rows(system: SystemSnapshot) -> list[tuple[str, Text]]:
    ram_pct = 100 * system.ram_used_bytes / max(1, system.ram_total_bytes)
    rows = [
        (
            "CPU · RAM",
            Text(
                f"CPU {system.cpu_percent:.0f} %   RAM {_gib(system.ram_used_bytes)} / "
                f"{_gib(system.ram_total_bytes)} GiB ({ram_pct:.0f} %)"
            ),
        )
    ]
    gpu = system.gpu
    if gpu.status == "ok" and gpu.devices:
        for d in gpu.devices:
            rows.append(
                (
                    f"GPU {d.index}",
                    Text(
                        f"{printable(str(d.name))}  {d.util_percent} %  "
                        f"{_gib(d.mem_used_bytes)} / {_gib(d.mem_total_bytes)} GiB"
                    ),
                )
            )
    elif gpu.status in ("no-gpu", "ok"):
        rows.append(("GPU", Text("no GPU", style="dim")))
    elif gpu.status == "pending":
        rows.append(("GPU", Text("asking NVML…", style="dim")))
    else:
        rows.append(("GPU", Text(f"unavailable: {printable(str(gpu.detail))}", style="yellow")))
    return rows


def _cut(value: Text) -> Text:
    """*value*, cut with an ellipsis at its column's end instead of wrapping.

    The cut is the Text's own, and its column may wrap: a no_wrap column would take the
    value's whole length, and rich would then squeeze every column of the table to fit
    it, labels and task ids included ("Sta…")."""
    value.no_wrap = True
    value.overflow = "ellipsis"
    return value


def _grid(rows: Sequence[tuple[str, Text]]) -> Table:
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold", width=10, no_wrap=True)
    grid.add_column()  # the values: each cut by _cut
    for label, value in rows:
        grid.add_row(label, _cut(value))
    return grid


def _fraction(progress: Mapping[str, Any]) -> float | None:
    """How much of a task is done, from 0 to 1; None when it reports no usable total.
    Any finite numbers may come (a task's own), 1e308 of 1e308 too: the bar is drawn from
    the fraction, since rich's own arithmetic on such numbers overflows."""
    total, done = float(progress.get("total") or 0), float(progress.get("done") or 0)
    if not (math.isfinite(total) and total > 0) or not math.isfinite(done):
        return None
    return min(1.0, max(0.0, done / total))


def _task_row(task: Mapping[str, Any]) -> tuple[Text, Text, RenderableType, Text]:
    ident = Text(str(task["task_id"])[:8], style="bold")
    cls = Text(str(task["workload_class"])[:16])
    progress = task.get("progress")
    secs = f"{float(task.get('seconds', 0)):.1f}s"
    fraction = _fraction(progress) if isinstance(progress, Mapping) else None
    if isinstance(progress, Mapping) and fraction is not None:
        bar: RenderableType = ProgressBar(total=1.0, completed=fraction, width=_BAR_WIDTH)
        note = str(progress.get("note") or "")
        info = Text(f"{100 * fraction:3.0f}% {secs} {note}".rstrip())
    else:
        bar = ProgressBar(total=None, width=_BAR_WIDTH)  # pulses: no progress reported
        info = Text(f"running {secs}")
    return ident, cls, bar, info


def _running(status: Mapping[str, Any], room: int) -> list[RenderableType]:
    running: Sequence[Mapping[str, Any]] = status.get("running") or []
    out: list[RenderableType] = [
        Rule(f"Running · {len(running)} of {status.get('slots', '?')} slots", align="left")
    ]
    if not running:
        out.append(Text("  no task running", style="dim"))
        return out
    # Past the room: one line says how many more (a room of one line shows the first task;
    # its rule has the count).
    shown = running if len(running) <= room else running[: max(1, room - 1)]
    table = Table.grid(padding=(0, 1))
    table.add_column(no_wrap=True, width=8)
    table.add_column(no_wrap=True, width=16, overflow="ellipsis")
    table.add_column(no_wrap=True, width=_BAR_WIDTH)
    table.add_column()  # percent, time and note: cut by _cut
    for task in shown:
        ident, cls, bar, info = _task_row(task)
        table.add_row(ident, cls, bar, _cut(info))
    out.append(table)
    if len(shown) < len(running) and room > 1:
        out.append(Text(f"  … and {len(running) - len(shown)} more", style="dim"))
    return out


def _transitions(status: Mapping[str, Any], room: int) -> list[RenderableType]:
    items: Sequence[Mapping[str, Any]] = status.get("transitions") or []
    out: list[RenderableType] = [Rule("Recent transitions", align="left")]
    if not items:
        out.append(Text("  none since the daemon started", style="dim"))
        return out
    for t in list(items)[-max(1, room) :][::-1]:  # newest first
        line = Text(f"{clock_time(float(t['at']))}  ", no_wrap=True, overflow="ellipsis")
        line.append(str(t["from"]), style=STATE_STYLE.get(str(t["from"]), ""))
        line.append(" → ")
        line.append(str(t["to"]), style=STATE_STYLE.get(str(t["to"]), ""))
        line.append(f"  {t.get('reason', '')}", style="dim")
        out.append(line)
    return out


def _status_rows(st: Mapping[str, Any]) -> list[tuple[str, Text]]:
    now = float(st["time"])
    state = str(st["state"])
    state_text = Text(state, style=STATE_STYLE.get(state, "bold"))
    state_text.append(f" for {duration(now - float(st['state_since']))}")
    state_text.append(f"   uptime {duration(float(st.get('uptime_s', 0)))}", style="dim")
    if st.get("stopping"):
        state_text.append("   stopping: finishing its tasks", style="bold yellow")
    link = st["link"]
    link_text = Text(str(link["status"]), style=LINK_STYLE.get(str(link["status"]), ""))
    if link.get("rtt_ms") is not None:
        link_text.append(f" · rtt {float(link['rtt_ms']):.1f} ms")
    last = link.get("last_heartbeat_ack")
    link_text.append(f" · ack {ago(None if last is None else now - float(last))}")
    link_text.append(f" · {link.get('coordinator', '')}", style="dim")
    rows = [("State", state_text), ("Link", link_text)]
    if (workers := workers_line(st)) is not None:
        rows.append(("Workers", Text(workers, style="yellow")))
    if link.get("status") != "up" and link.get("last_error"):
        rows.append(("Last error", Text(str(link["last_error"]), style="red")))
    rows.append(
        (
            "Tasks",
            Text(
                f"completed {st.get('completed', 0)} · failed {st.get('failed', 0)} · "
                f"rejected {st.get('rejected', 0)} · timed out {st.get('timed_out', 0)}"
            ),
        )
    )
    backlog = int(st.get("outbox_backlog", 0))
    rows.append(
        ("Outbox", Text(f"{backlog} awaiting acknowledgement", style="yellow" if backlog else ""))
    )
    if st.get("unstaking_until") is not None or state == "UNSTAKING":
        remaining = st.get("unstake_remaining_s")
        until = st.get("unstaking_until")
        if remaining is not None and remaining <= 0 and isinstance(until, int | float):
            text = "cooldown ended: this node is retired and gets no more work"
        elif remaining is not None:
            text = f"cooldown ends in {duration(float(remaining))}"
        else:
            text = "cooldown running"
        rows.append(("Unstake", Text(text, style="magenta")))
    return rows


class Fit(NamedTuple):
    """How many lines each part of the console gets (0: left out)."""

    status: int  # rows of the node's status
    system: int  # CPU, RAM and GPU rows: all or none
    running: int  # running tasks, under their rule
    transitions: int  # recent transitions, under their rule


def fit_lines(inner: int, n_status: int, n_system: int, n_running: int) -> Fit:
    """Share the panel's *inner* lines, most telling first: the node's status (as many rows
    as fit), the running tasks (a rule and one line), the machine's rows, the recent
    transitions (a rule and one line); then more running tasks, and the rest to the
    transitions. A short terminal so shows what the node is doing, and the panel's frame
    and footer, rather than losing its bottom lines to the terminal's edge."""
    status = max(0, min(n_status, inner))
    left = inner - status
    running = 1 if left >= 2 else 0
    left -= 2 * running
    system = n_system if left >= n_system else 0
    left -= system
    transitions = 1 if left >= 2 else 0
    left -= 2 * transitions
    more = min(left, n_running - 1) if running and n_running > 1 else 0
    return Fit(status, system, running + more, transitions + left - more if transitions else 0)


def render(
    status: Mapping[str, Any] | None,
    system: SystemSnapshot,
    *,
    now: float,
    error: str = "",
    height: int = 24,
    interval: float = 1.0,
    headline: str = "daemon not running",
) -> RenderableType:
    """The whole console for one status snapshot (None: no usable answer, for the reason
    *headline* names, *error* saying more)."""
    status, error = printable_tree(status), printable(error)  # never a terminal's commands
    footer = Text(f"q quit · updates every {interval:g} s", style="dim")
    stamp = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    if status is None:
        body = Group(
            Text(headline, style="bold red"),
            Text(error or "no answer on the control socket", style="red", overflow="fold"),
            Text(f"retrying every {interval:g} s · start it with `nodeclient run`", style="dim"),
            Text(""),
            _grid(_system_rows(system)),
        )
        return Panel(body, title=f"nodeclient · {stamp}", subtitle=footer, border_style="red")
    rows, system_rows = _status_rows(status), _system_rows(system)
    fit = fit_lines(height - 2, len(rows), len(system_rows), len(status.get("running") or []))
    parts: list[RenderableType] = [_grid(rows[: fit.status] + system_rows[: fit.system])]
    if fit.running:
        parts += _running(status, fit.running)
    if fit.transitions:
        parts += _transitions(status, fit.transitions)
    body = Group(*parts)
    title = f"nodeclient · node {_short_id(str(status['node_id']))} · {stamp}"
    return Panel(body, title=title, subtitle=footer, border_style="blue")


# --- the live loop ------------------------------------------------------------------------------


class KeySource(Protocol):
    def __enter__(self) -> KeySource: ...
    def __exit__(self, *exc: object) -> None: ...
    def read(self, timeout: float) -> str | None:
        """The keys typed within *timeout* seconds, or None."""
        ...


class TerminalKeys:
    """Keys from a terminal in cbreak mode (no Enter needed); restores it on exit.

    Ctrl-C still raises KeyboardInterrupt (cbreak keeps signals). When stdin is not a
    terminal, ``read`` only waits: the console then stops with Ctrl-C or a signal.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._fd = -1
        self._saved: list[Any] | None = None

    def __enter__(self) -> TerminalKeys:
        import termios
        import tty

        with contextlib.suppress(AttributeError, OSError, ValueError):
            if self._stream.isatty():
                self._fd = self._stream.fileno()
                self._saved = termios.tcgetattr(self._fd)
                tty.setcbreak(self._fd)
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None = None,
        _exc: BaseException | None = None,
        _tb: TracebackType | None = None,
    ) -> None:
        import termios

        if self._saved is not None:
            termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved)
            self._saved = None

    def read(self, timeout: float) -> str | None:
        if self._saved is None:
            time.sleep(timeout)
            return None
        ready, _, _ = select.select([self._fd], [], [], timeout)
        if not ready:
            return None
        return os.read(self._fd, 64).decode("utf-8", "replace") or None


def watch(
    fetch: Callable[[], Mapping[str, Any]],
    *,
    console: Console | None = None,
    keys: KeySource | None = None,
    gpu: GpuSampler | None = None,
    interval: float = 1.0,
    clock: Callable[[], float] = time.time,
) -> int:
    """Redraw until q or Ctrl-C; a daemon that stops answering is retried, never fatal."""
    from nodeclient.node.control import DaemonBusy, DaemonNotRunning

    console = console or Console()
    key_source = keys or TerminalKeys(sys.stdin)
    try:
        if not console.encoding.replace("-", "").replace("_", "").startswith("utf"):
            # The picture is drawn with characters (·, →, …) such a terminal cannot take,
            # and rich keeps a write that failed to encode, failing every later one with it.
            raise NodeClientError(
                "the console draws with Unicode characters, and this terminal's encoding is "
                f"{console.encoding}: use a UTF-8 locale (LANG=C.UTF-8), or `nodeclient status`"
            )
        if console.is_dumb_terminal:
            # TERM=dumb (or unknown): rich draws a live display on such a terminal only
            # when it stops, so the screen would stay empty until q.
            raise NodeClientError(
                "the console redraws the screen, and this terminal (TERM dumb or unknown) "
                "cannot: use `nodeclient status` or `nodeclient status --json`"
            )
        with key_source, Live(console=console, screen=True, auto_refresh=False) as live:
            while True:
                frame_started = time.monotonic()
                error, headline = "", "daemon not running"
                status: Mapping[str, Any] | None
                try:
                    status = fetch()
                except DaemonBusy as exc:  # a slow daemon is not a stopped one: no restart
                    status, error = None, str(exc) or type(exc).__name__
                    headline = "daemon not answering (busy?)"
                except (DaemonNotRunning, OSError, ValueError) as exc:
                    status, error = None, str(exc) or type(exc).__name__
                if status is not None and "state" not in status:
                    error = f"the daemon answered: {status.get('error', 'no state')}"
                    status, headline = None, "daemon answer not understood"
                system = sample_system(gpu)
                try:
                    picture = render(
                        status, system, now=clock(), error=error, height=console.height,
                        interval=interval, headline=headline,
                    )  # fmt: skip
                    # rich lays the picture out only here: what fails in its layout fails
                    # before anything is written, and the picture below replaces it.
                    live.update(picture, refresh=True)
                except _UNSHOWABLE as exc:
                    # A daemon of another version, or not ours: say so, and keep asking.
                    bad = f"the daemon's answer could not be shown ({type(exc).__name__}: {exc})"
                    picture = render(
                        None, system, now=clock(), error=bad[:300], height=console.height,
                        interval=interval, headline="daemon answer not understood",
                    )  # fmt: skip
                    live.update(picture, refresh=True)
                # The next frame starts *interval* after this one did: at least 1 Hz.
                typed = key_source.read(max(0.05, interval - (time.monotonic() - frame_started)))
                if typed and QUIT_KEYS.intersection(typed):
                    return 0
    except KeyboardInterrupt:
        return 0
    finally:
        if gpu is not None:
            gpu.close()


# --- history ------------------------------------------------------------------------------------

_DURATION_RE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_S: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, *, now: float) -> float:
    """``--since``: a duration back from now (``90m``, ``24h``, ``7d``) or an ISO date/time.

    A date/time without a zone is local time, as an operator types it.
    """
    m = _DURATION_RE.match(text)
    if m:
        return now - float(m.group(1)) * _UNIT_S[m.group(2)]
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(
            f"--since {text!r} is neither a duration (30m, 24h, 7d) nor an ISO date/time "
            "(2025-01-31 or 2025-01-31T12:00:00)"
        ) from None
    try:
        # A naive date is local time: near the ends of datetime's range the zone offset
        # takes it out of range (0001-01-01 east of UTC is year 0), or the C library refuses.
        return when.timestamp()
    except (ValueError, OverflowError, OSError):
        raise UsageError(
            f"--since {text!r} is out of the range of dates this machine can handle"
        ) from None


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def outcome_of(entry: OutboxEntry) -> str:
    """accepted / duplicate / rejected by the coordinator, or awaiting its acknowledgement."""
    if entry.kind != "result":
        return "refused"
    return entry.ack_status or "unacknowledged"


def history_rows(entries: Sequence[OutboxEntry]) -> list[dict[str, Any]]:
    """The machine-readable history (``nodeclient history --json``)."""
    return [
        {
            "task_id": str(e.task_id),
            "job_id": str(e.job_id),
            "workload_class": e.workload_class,
            "slice_index": e.slice_index,
            "outcome": outcome_of(e),
            "duration_s": round(max(0.0, e.completed_at - e.received_at), 3),
            "result_size": e.result_size,
            "proof": None if e.proof is None else "0x" + e.proof.hex(),
            "received_at": _iso(e.received_at),
            "acknowledged_at": _iso(e.acked_at),
            "ack_reason": e.ack_reason or "",
        }
        for e in entries
    ]


def history_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The table ``nodeclient history`` prints: one line per task, newest first."""
    head = (
        f"{'TASK':36}  {'CLASS':14}  {'SLICE':>5}  {'OUTCOME':14}  {'SECONDS':>8}  "
        f"{'PROOF':15}  ACKNOWLEDGED"
    )
    out = [head]
    for r in map(printable_tree, rows):  # a class name came from the coordinator
        proof = r["proof"] or "-"
        short = f"{proof[:8]}…{proof[-6:]}" if len(proof) > 15 else proof
        slice_ = "-" if r["slice_index"] is None else str(r["slice_index"])
        out.append(
            f"{r['task_id']:36}  {r['workload_class'][:14]:14}  {slice_:>5}  "
            f"{r['outcome'][:14]:14}  {r['duration_s']:8.2f}  {short:15}  "
            f"{r['acknowledged_at'] or '-'}"
        )
    return out


def read_history(
    home: Path, *, since: float | None = None, damaged: list[str] | None = None
) -> list[dict[str, Any]]:
    """Every task the node recorded, from ``outbox.db`` opened read-only (no daemon needed);
    rows that cannot be read are described in *damaged* instead."""
    import sqlite3

    from nodeclient.node import outbox

    try:
        entries = outbox.read_history(home / "outbox.db", since=since, damaged=damaged)
    except sqlite3.Error as exc:
        raise UsageError(f"cannot read {home / 'outbox.db'}: {exc}") from exc
    rows: list[dict[str, Any]] = []
    for entry in entries:  # a row whose values are of the wrong kind (text for a time)
        try:
            rows += history_rows([entry])
        except (TypeError, ValueError, OverflowError, OSError) as exc:
            if damaged is None:
                raise
            damaged.append(f"the row of task {entry.task_id} ({type(exc).__name__}: {exc})")
    return rows
