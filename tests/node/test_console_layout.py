"""The status console's layout with long values, and its loop with values that rich cannot
lay out: labels and task ids stay whole, only values are cut, and nothing ends the loop.

Rendered into a recording rich Console of 80 columns, as in test_console.
"""

from __future__ import annotations

import io
from typing import Any

import pytest
from rich.console import Console, ConsoleOptions, RenderResult

from nodeclient.errors import NodeClientError
from nodeclient.node import console as con
from tests.node.test_console import NO_GPU, NOW, ScriptedKeys, status, task, text

LONG_ERROR = (
    "HTTPError: registration failed (503): the answer is not a JSON object (text/html): "
    "'<html><body>Service Unavailable</body></html>'"
)
LABELS = ("State", "Link", "Last error", "Tasks", "Outbox", "CPU · RAM", "GPU")


def rows(out: str) -> list[str]:
    """The panel's lines, without its borders."""
    return [line[2:-2] for line in out.rstrip("\n").split("\n")[1:-1]]


def test_a_long_link_error_cuts_only_its_own_value() -> None:
    """A long error and a long coordinator URL end in "…"; every label keeps its whole
    width and every other value is shown in full, as with short values."""
    link = {
        **status()["link"],
        "status": "down",
        "last_error": LONG_ERROR,
        "coordinator": "https://" + "c" * 150 + ".example",
    }
    shown = rows(text(con.render(status(link=link), NO_GPU, now=NOW), width=80))
    by_label = {label: line for line in shown for label in LABELS if line.startswith(label)}
    assert set(by_label) == set(LABELS), shown  # each label whole, at the line's start
    for line in by_label.values():
        assert line[10] == " " and line[11] != " ", line  # the values' column, 11 in
    assert by_label["Last error"].rstrip().endswith("…")
    assert by_label["Link"].rstrip().endswith("…")
    assert "completed 12 · failed 1 · rejected 2 · timed out 3" in by_label["Tasks"]
    assert "READY for 00:01:05   uptime 01:00:00" in by_label["State"]


def test_a_long_progress_note_keeps_every_task_id_and_class() -> None:
    """One task's long progress note is cut with "…"; every task's id (8 characters) and
    class stay whole, the others' values too."""
    ids = ["3f2a9c1e-aaaa-4bbb-8ccc-000000000001", "61309abc-aaaa-4bbb-8ccc-000000000002"]
    running = [
        task(ids[0], workload_class="ai.training",
             progress={"done": 4, "total": 10, "note": "step 1200 loss 0.1234 " * 5}),
        task(ids[1]),
    ]  # fmt: skip
    out = text(con.render(status(state="EXECUTING", running=running), NO_GPU, now=NOW))
    shown = rows(out)
    first, second = ([line for line in shown if line.startswith(i[:8] + " ")] for i in ids)
    assert len(first) == len(second) == 1, shown  # each id whole, at its line's start
    first, second = first[0], second[0]
    assert first.startswith("3f2a9c1e ai.training      ")
    assert "40% 2.5s step 1200" in first and first.rstrip().endswith("…")
    assert second.startswith("61309abc ai.inference     ") and "running 2.5s" in second


def test_progress_of_huge_numbers_is_drawn() -> None:
    """A task may report any finite numbers (1e308 of 1e308): the bar is drawn, full,
    where rich's own arithmetic on them overflowed and ended the console."""
    running = [task("abcdef12-0000-4000-8000-000000000000",
                    progress={"done": 1e308, "total": 1e308, "note": "n"})]  # fmt: skip
    out = Console(record=True, width=80, height=24, file=io.StringIO(), force_terminal=True)
    shown = status(state="EXECUTING", running=running)
    assert con.watch(lambda: shown, console=out, keys=ScriptedKeys([]), clock=lambda: NOW) == 0
    assert "100% 2.5s n" in out.export_text()


class Unshowable:
    """A picture whose layout fails, as one rich cannot lay out would."""

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        raise OverflowError("cannot convert float infinity to integer")


def test_a_picture_that_fails_in_its_layout_is_reported_not_fatal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """rich lays a picture out only when it draws it: a failure there is shown as an
    answer that could not be shown, and the console goes on to its next frame."""
    real = con.render
    calls: list[Any] = []

    def render(st: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(st)
        return Unshowable() if len(calls) == 1 else real(st, *args, **kwargs)

    monkeypatch.setattr(con, "render", render)
    out = Console(record=True, width=80, height=24, file=io.StringIO(), force_terminal=True)
    keys = ScriptedKeys([None, "q"])
    assert con.watch(status, console=out, keys=keys, clock=lambda: NOW) == 0
    shown = out.export_text()
    assert "daemon answer not understood" in shown and "OverflowError" in shown
    assert calls[1] is None and calls[2] is not None  # the fallback, then the next frame
    assert "READY for" in shown
    assert keys.entered == keys.exited == 1


def test_a_terminal_that_cannot_take_the_picture_is_one_error() -> None:
    """A terminal whose encoding is not UTF-8 cannot take the console's own characters
    (·, →, …): refused with one line before the screen is taken, not a traceback."""
    terminal = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    out = Console(file=terminal, width=80, height=24, force_terminal=True)
    keys = ScriptedKeys([])
    with pytest.raises(NodeClientError, match="encoding is ascii: use a UTF-8 locale"):
        con.watch(status, console=out, keys=keys, clock=lambda: NOW)
    assert keys.entered == 0


@pytest.mark.parametrize("term", ["dumb", "unknown"])
def test_a_dumb_terminal_is_one_error(monkeypatch: pytest.MonkeyPatch, term: str) -> None:
    """TERM=dumb: rich would draw nothing until the console stops, a blank screen for as
    long as it runs. Refused with one line naming the commands that work there, before
    the screen or the keyboard is taken."""
    monkeypatch.setenv("TERM", term)
    terminal = io.StringIO()
    out = Console(file=terminal, width=80, height=24, force_terminal=True)
    keys = ScriptedKeys([])
    with pytest.raises(NodeClientError, match=r"`nodeclient status` or `nodeclient status --json`"):
        con.watch(status, console=out, keys=keys, clock=lambda: NOW)
    assert keys.entered == 0 and terminal.getvalue() == ""


def test_a_time_out_of_the_platforms_range_is_reported_not_fatal() -> None:
    """A transition at 1e18 s cannot be turned into a time of day (the platform's
    localtime says EOVERFLOW, an OSError): the answer is reported as not understood, and
    the console goes on."""
    odd = status(transitions=[{"from": "IDLE", "to": "READY", "at": 1e18, "reason": "r"}])
    answers = iter([odd, status()])
    out = Console(record=True, width=80, height=24, file=io.StringIO(), force_terminal=True)
    keys = ScriptedKeys([None, "q"])
    assert con.watch(lambda: next(answers), console=out, keys=keys, clock=lambda: NOW) == 0
    shown = out.export_text()
    assert "daemon answer not understood" in shown and "OSError" in shown
    assert "READY for" in shown


@pytest.mark.parametrize("height", [4, 6, 8, 10, 12, 14, 16, 20, 24, 40])
def test_a_short_terminal_keeps_the_frame_and_what_the_node_is_doing(height: int) -> None:
    """However short the terminal, the picture fits it whole, its footer included (the
    terminal would cut its bottom lines), and what is shown goes most telling first: the
    state and link, then the running tasks, then the machine, then the transitions."""
    running = [task(f"{i:08x}-aaaa-4bbb-8ccc-000000000001") for i in range(3)]
    transitions = [
        {"at": NOW - 9 + i, "from": "IDLE", "to": "EXECUTING", "reason": f"task {i}"}
        for i in range(9)
    ]
    st = status(state="EXECUTING", running=running, transitions=transitions, slots=4)
    out = text(con.render(st, NO_GPU, now=NOW, height=height), height=height)
    lines = out.rstrip("\n").split("\n")
    assert len(lines) <= height, out
    assert "q quit" in lines[-1], out
    shown = rows(out)
    assert shown[0].startswith("State      EXECUTING")
    assert (len(shown) >= 2) == shown[1].startswith("Link") if height > 3 else True
    has = {part: any(line.startswith(part) for line in shown)
           for part in ("Running", "00000000", "CPU · RAM", "Recent transitions")}  # fmt: skip
    # Each part only when every part before it is there.
    assert list(has.values()) == sorted(has.values(), reverse=True), (has, out)
    if height >= 24:  # room for all: every task and every transition
        assert all(any(line.startswith(f"{i:08x}") for line in shown) for i in range(3))
        assert sum("IDLE → EXECUTING" in line for line in shown) == 9


def test_the_fit_gives_lines_most_telling_first() -> None:
    """fit_lines: the status rows first, then a running task, the machine's rows (all or
    none), one transition, more running tasks, and the rest to the transitions."""
    assert con.fit_lines(3, 4, 2, 3) == con.Fit(3, 0, 0, 0)
    assert con.fit_lines(6, 4, 2, 3) == con.Fit(4, 0, 1, 0)
    assert con.fit_lines(8, 4, 2, 3) == con.Fit(4, 2, 1, 0)
    assert con.fit_lines(10, 4, 2, 3) == con.Fit(4, 2, 1, 1)
    assert con.fit_lines(12, 4, 2, 3) == con.Fit(4, 2, 3, 1)
    assert con.fit_lines(20, 4, 2, 3) == con.Fit(4, 2, 3, 9)
    assert con.fit_lines(20, 4, 2, 0) == con.Fit(4, 2, 1, 11)
