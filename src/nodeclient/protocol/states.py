"""2.3.8 local node states, as a transition table (theory of operation below).

Theory of operation
-------------------
The node is always in exactly one of four states. The link to the coordinator is *not*
a state: it is reported beside the state (``link: up | down | connecting``), because a
node that loses its link keeps running its tasks and keeps its place in the cycle.

=========  ============================================================================
READY      awaiting its first dispatch since the daemon started (whether it has
           registered and linked yet is the link's to say, beside the state)
EXECUTING  running at least one dispatched task or slice
IDLE       had work, finished all of it; no active work, back in the READY pool
UNSTAKING  the 7-day cooldown after a signed Unstake: no new dispatches are accepted;
           work in flight finishes and is delivered. Terminal for this daemon.
=========  ============================================================================

Every rule that affects the state lives in ``TRANSITIONS``; ``StateMachine.transition``
is the one setter, it refuses anything the table does not allow (``StateError``) and
logs each change as one structured ``state.transition`` event with from, to, reason and
time. The clock is injected, so tests cross the 7 days without waiting.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from nodeclient.errors import StateError

UNSTAKE_COOLDOWN_S: Final = 7 * 24 * 3600


class NodeState(enum.StrEnum):
    READY = "READY"
    EXECUTING = "EXECUTING"
    IDLE = "IDLE"
    UNSTAKING = "UNSTAKING"


S = NodeState
# (from, to) -> when it happens. The table is the whole state machine.
TRANSITIONS: Final[Mapping[tuple[NodeState, NodeState], str]] = {
    (S.READY, S.EXECUTING): "a dispatched task started",
    (S.IDLE, S.EXECUTING): "a dispatched task started",
    (S.EXECUTING, S.IDLE): "the last running task finished",
    (S.READY, S.UNSTAKING): "unstake accepted by the coordinator",
    (S.IDLE, S.UNSTAKING): "unstake accepted by the coordinator",
    (S.EXECUTING, S.UNSTAKING): "unstake accepted; running work still finishes",
}


@dataclass(frozen=True, slots=True)
class Transition:
    """One state change, as logged and as kept in the recent-transitions ring."""

    from_state: NodeState
    to_state: NodeState
    reason: str
    at: float


class StateMachine:
    """The node's current state; ``transition`` is the only way to change it."""

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        logger: logging.Logger | None = None,
        initial: NodeState = NodeState.READY,
        history: int = 50,
    ) -> None:
        self._clock = clock
        self._log = logger or logging.getLogger("nodeclient.state")
        self._state = initial
        self._history_size = history
        self.history: list[Transition] = []
        self.entered_at = clock()

    @property
    def state(self) -> NodeState:
        return self._state

    def can(self, to: NodeState) -> bool:
        return (self._state, to) in TRANSITIONS

    def transition(self, to: NodeState | str, *, reason: str) -> Transition:
        """Move to *to* (a NodeState or its name) or raise StateError if the table does not
        allow it.

        A name is made the enum first: a StrEnum hashes as its value, so "UNSTAKING" would
        pass the table and become the state as a plain string, which ``accepts_dispatch``
        (an identity check) and the log event (``.value``) do not take for UNSTAKING.
        """
        try:
            to = NodeState(to)
        except ValueError:
            raise StateError(f"unknown state {to!r} ({reason})") from None
        if (self._state, to) not in TRANSITIONS:
            raise StateError(f"illegal state transition {self._state} -> {to} ({reason})")
        t = Transition(self._state, to, reason, self._clock())
        self._state = to
        self.entered_at = t.at
        self.history.append(t)
        del self.history[: -self._history_size]
        self._log.info(
            "state.transition",
            extra={
                "event": "state.transition",
                "from": t.from_state.value,
                "to": t.to_state.value,
                "reason": reason,
                "time": t.at,
            },
        )
        return t

    def accepts_dispatch(self) -> bool:
        """UNSTAKING takes no new work; every other state does (capacity permitting)."""
        return self._state is not NodeState.UNSTAKING
