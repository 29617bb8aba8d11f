"""Structured logs: one JSON object per line on stderr (journald-friendly).

Context such as ``node_id`` and ``task_id`` is bound with ``bind()`` (contextvars, so it
follows asyncio tasks) and lands on every event logged inside it. Events are logged as
``log.info("task.done", extra={...})``: the message is the event name, the extras are
fields.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any, Final

from nodeclient.text import json_terminal_safe, printable

_CONTEXT: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("log_context", default={})  # noqa: B039
_STANDARD: Final = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys() | {"message", "asctime"}
)


@contextlib.contextmanager
def bind(**fields: Any) -> Iterator[None]:
    """Bind fields (node_id, task_id, ...) to every log event inside the block."""
    token = _CONTEXT.set({**_CONTEXT.get(), **fields})
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def context_without(*keys: str) -> contextvars.Context:
    """A copy of the current context with *keys* unbound: for a task started on behalf of
    one task (a worker's replacement after it) that must not log under its id."""
    ctx = contextvars.copy_context()
    ctx.run(_CONTEXT.set, {k: v for k, v in _CONTEXT.get().items() if k not in keys})
    return ctx


def bind_global(**fields: Any) -> None:
    """Bind fields for the rest of this context (used once at daemon start for node_id)."""
    _CONTEXT.set({**_CONTEXT.get(), **fields})


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    out: dict[str, Any] = dict(_CONTEXT.get())
    for k, v in record.__dict__.items():
        if k not in _STANDARD and not k.startswith("_"):
            out[k] = v
    return out


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        doc.update(_fields(record))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        # Readable non-ASCII text, but no character a terminal obeys (a coordinator's
        # error text is logged, and the log may go to the operator's terminal).
        return json_terminal_safe(json.dumps(doc, default=str, ensure_ascii=False))


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        when = time.strftime("%H:%M:%S", time.localtime(record.created))
        # One event, one line, whatever a field holds (a coordinator's error text).
        extras = " ".join(
            f"{k}={printable(str(v))}" for k, v in _fields(record).items() if k != "event"
        )
        message = printable(record.getMessage())
        line = f"{when} {record.levelname.lower():7} {message} {extras}".rstrip()
        if record.exc_info:
            # A traceback takes several lines: each is marked as part of this event, and its
            # text (an exception's message can quote the network) has its control
            # characters written out, so no line of it can pass for an event of its own.
            trace = self.formatException(record.exc_info)
            line += "".join(f"\n  | {printable(part)}" for part in trace.splitlines())
        return line


def configure(*, fmt: str = "json", level: str = "info") -> None:
    """Route the nodeclient loggers to stderr in the chosen format."""
    # Events carry no source location, thread or process name: skip computing them for
    # every record (the logging HOWTO's "Optimization" section); it halves a log call.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("nodeclient")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
