"""Text that came from elsewhere, made safe to show on a terminal.

A coordinator's error, a reject reason, a task's progress note or a close reason can hold
anything, and the operator's terminal obeys escape sequences: one could clear the screen,
draw a fake status, retitle the window or write to the clipboard (OSC 52). Every place
that shows such text on a terminal (``nodeclient status``, the ``--watch`` console,
``history``, text logs, the requester CLI) passes it through :func:`printable`: C0 and C1
control characters, DEL and the Unicode bidirectional controls (which can make text read
in another order than it is) become visible escapes, so one value stays on one line and
means what it shows. So do lone surrogates (U+D800 to U+DFFF: a JSON ``"\\ud800"``, or a
file name that is not UTF-8, decoded with ``surrogateescape``), which no UTF-8 stream can
encode: written as they are, they would end the command with a UnicodeEncodeError. JSON
output escapes them too: ``json.dumps`` writes C0 controls as escapes itself, and
:func:`json_terminal_safe` does the rest where a document keeps other non-ASCII text
readable (the JSON log lines).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any, Final

_BIDI: Final = (*range(0x202A, 0x202F), *range(0x2066, 0x206A))
_SURROGATES: Final = range(0xD800, 0xE000)
_ESCAPES: Final = {
    **{c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))},
    **{c: f"\\u{c:04x}" for c in (*_BIDI, *_SURROGATES)},
}


# What json.dumps(ensure_ascii=False) leaves raw that a terminal acts on or reorders: DEL,
# C1 (U+009B alone starts a control sequence), the bidi controls and the line separators;
# and the lone surrogates, which no UTF-8 stream can write (the escape is valid JSON).
_JSON_ESCAPES: Final = {
    c: f"\\u{c:04x}" for c in (*range(0x7F, 0xA0), *_BIDI, 0x2028, 0x2029, *_SURROGATES)
}


def json_terminal_safe(document: str) -> str:
    """A JSON text from ``json.dumps(..., ensure_ascii=False)`` with every character a
    terminal would obey written as a ``\\uXXXX`` escape: the same JSON value, safe to print.
    (They can only stand inside strings there, where the escape means the same.)"""
    return document.translate(_JSON_ESCAPES)


def printable(text: str) -> str:
    """*text* with every control character written as an escape (``\\x1b``, ``\\n``), and
    every lone surrogate too (``\\ud800``): the result can be written to any UTF-8 stream."""
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


class _Watched:
    """sys.stdout that remembers whether writing to it failed (a full disk behind ``>``,
    ``/dev/full``), so that the command's error can be told from its output's."""

    def __init__(self, stream: Any, parent: _Watched | None = None) -> None:
        self._stream = stream
        self._parent = parent
        self.failed = False
        self.error: OSError | None = None  # the failure, also when a caller swallowed it

    def _fail(self, exc: OSError) -> None:
        self.failed = True
        self.error = exc
        if self._parent is not None:
            self._parent._fail(exc)

    def write(self, data: Any) -> int:
        try:
            written: int = self._stream.write(data)
        except OSError as exc:
            self._fail(exc)
            raise
        return written

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as exc:
            self._fail(exc)
            raise

    @property
    def buffer(self) -> _Watched:  # bytes written to stdout (a job's result) count too
        return _Watched(self._stream.buffer, self)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def watched_stdout() -> Iterator[None]:
    """Within: sys.stdout is watched (:func:`stdout_failed`); restored afterwards."""
    original = sys.stdout
    if original is not None:
        sys.stdout = _Watched(original)
    try:
        yield
    finally:
        if isinstance(sys.stdout, _Watched):
            sys.stdout = original


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, inside :func:`watched_stdout`. ``--help`` and
    ``--version`` print and exit 0 from argparse, which ignores a failed write: their text
    is flushed first, so that one lost to a full disk fails the same way as any
    command's output."""
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:
        if exc.code in (0, None) and sys.stdout is not None:  # closed: argparse used stderr
            sys.stdout.flush()
            lost = getattr(sys.stdout, "error", None)  # a write argparse swallowed
            if lost is not None:
                raise lost from None
        raise


def output_lost(prog: str, exc: OSError | AttributeError) -> int:
    """After stdout failed otherwise than by a closed pipe (a full disk behind ``>``,
    ``/dev/full``, stdout closed with ``>&-``): one line on stderr, stdout pointed at
    /dev/null so that the flush at exit does not fail again with a traceback, status 1.
    Whatever the command did is done; only what it printed is lost."""
    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "stdout is closed"
    print(f"{prog}: error: cannot write the output: {why}", file=sys.stderr)
    if sys.stdout is not None:
        try:
            with open(os.devnull, "wb") as devnull:
                os.dup2(devnull.fileno(), sys.stdout.fileno())
        except (OSError, ValueError):  # no descriptor behind it
            sys.stdout = None
    return 1


def stdout_failed(exc: OSError | AttributeError) -> bool:
    """Whether *exc* came from writing stdout (within :func:`watched_stdout`), or, for an
    AttributeError, from stdout closed before the start (``>&-``: ``sys.stdout`` is None)."""
    if isinstance(exc, AttributeError):
        return sys.stdout is None
    return bool(getattr(sys.stdout, "failed", False))
