"""Text that came from elsewhere, made safe to show on a terminal.

A coordinator's error, a reject reason, a task's progress note or a close reason can hold
anything, and the operator's terminal obeys escape sequences: one could clear the screen,
draw a fake status, retitle the window or write to the clipboard (OSC 52). Every place
that shows such text on a terminal (``nodeclient status``, the ``--watch`` console,
``history``, text logs, the requester CLI) passes it through :func:`printable`: C0 and C1
control characters, DEL and the Unicode bidirectional controls (which can make text read
in another order than it is) become visible escapes, so one value stays on one line and
means what it shows. JSON output needs none of this: ``json.dumps`` escapes them itself.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Final

_BIDI: Final = (*range(0x202A, 0x202F), *range(0x2066, 0x206A))
_ESCAPES: Final = {
    **{c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))},
    **{c: f"\\u{c:04x}" for c in _BIDI},
}


def printable(text: str) -> str:
    """*text* with every control character written as an escape (``\\x1b``, ``\\n``)."""
    return text.translate(_ESCAPES)


def printable_tree(value: Any) -> Any:
    """A copy of a JSON-like value with :func:`printable` applied to every string in it,
    keys included."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {printable_tree(k): printable_tree(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [printable_tree(v) for v in value]
    return value


STOPPED_READING: Final = 141  # the exit status of a command a closed pipe ended (128 + SIGPIPE)


def reader_gone() -> int:
    """After a BrokenPipeError on stdout (``nodeclient history | head``): point stdout at
    /dev/null, so that the flush at exit does not fail a second time with a traceback,
    and return the status a shell expects of a command its reader stopped."""
    with open(os.devnull, "wb") as devnull:
        os.dup2(devnull.fileno(), sys.stdout.fileno())
    return STOPPED_READING
