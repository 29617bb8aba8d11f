"""2.3.8 node states: the transition table, its log events, and illegal transitions."""

from __future__ import annotations

import json
import logging

import pytest

from nodeclient.clock import ManualClock
from nodeclient.errors import StateError
from nodeclient.logs import JsonFormatter
from nodeclient.protocol.states import TRANSITIONS, NodeState, StateMachine

S = NodeState


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[dict] = []
        self.setFormatter(JsonFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


def machine() -> tuple[StateMachine, ManualClock, Capture]:
    clock = ManualClock()
    logger = logging.getLogger("test.states")
    logger.handlers[:] = []
    cap = Capture()
    logger.addHandler(cap)
    logger.setLevel(logging.INFO)
    return StateMachine(clock=clock.now, logger=logger), clock, cap


def test_task_cycle_logs_each_transition() -> None:
    """READY -> EXECUTING -> IDLE -> EXECUTING, one state.transition event each."""
    sm, clock, cap = machine()
    sm.transition(S.EXECUTING, reason="task 1 started")
    clock.advance(5)
    sm.transition(S.IDLE, reason="done")
    sm.transition(S.EXECUTING, reason="task 2 started")
    assert [(e["from"], e["to"]) for e in cap.lines] == [
        ("READY", "EXECUTING"),
        ("EXECUTING", "IDLE"),
        ("IDLE", "EXECUTING"),
    ]
    assert all(e["event"] == "state.transition" for e in cap.lines)
    assert cap.lines[1]["time"] == clock.now()
    assert cap.lines[0]["reason"] == "task 1 started"


@pytest.mark.parametrize("src", list(S))
@pytest.mark.parametrize("dst", list(S))
def test_only_table_transitions_allowed(src: NodeState, dst: NodeState) -> None:
    """Every pair not in the table raises StateError and leaves the state unchanged."""
    sm = StateMachine(clock=lambda: 0.0, initial=src)
    if (src, dst) in TRANSITIONS:
        sm.transition(dst, reason="t")
        assert sm.state is dst
    else:
        with pytest.raises(StateError):
            sm.transition(dst, reason="t")
        assert sm.state is src


def test_unstaking_is_terminal_and_refuses_dispatch() -> None:
    """UNSTAKING accepts no dispatch and has no way out."""
    sm, _, _ = machine()
    assert sm.accepts_dispatch()
    sm.transition(S.UNSTAKING, reason="unstake")
    assert not sm.accepts_dispatch()
    for dst in S:
        assert not sm.can(dst)


def test_a_state_named_by_its_string_moves_like_the_enum() -> None:
    """The name "UNSTAKING" is NodeState.UNSTAKING: the state, the history and the log
    event are the enum's, and dispatch is refused at once (before, the plain string became
    the state and the log call raised AttributeError, leaving accepts_dispatch() true while
    UNSTAKING)."""
    sm, _, cap = machine()
    t = sm.transition("UNSTAKING", reason="unstake")
    assert sm.state is S.UNSTAKING and t.to_state is S.UNSTAKING
    assert sm.history == [t]
    assert not sm.accepts_dispatch()
    assert [(e["from"], e["to"]) for e in cap.lines] == [("READY", "UNSTAKING")]


def test_an_unknown_state_name_is_a_state_error_and_changes_nothing() -> None:
    """A name that is no NodeState raises the module's StateError (not ValueError), and
    the state, the history and the log are as they were."""
    sm, _, cap = machine()
    with pytest.raises(StateError, match="PAUSED"):
        sm.transition("PAUSED", reason="pause")
    assert sm.state is S.READY and sm.history == [] and cap.lines == []
