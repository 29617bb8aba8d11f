"""The console scripts' entry points: the command-line modules import for a second or
two (eth-account, httpx, FastAPI), and a Ctrl-C in that time must end the command as a
Ctrl-C later does (status 130, one line), not with a traceback from inside an import.
And the signals that stop the long-running ones (:func:`stop_signals`)."""

from __future__ import annotations

import signal
import sys

INTERRUPTED = 130


def stop_signals() -> tuple[signal.Signals, ...]:
    """What stops the node daemon and the coordinator cleanly (as SIGTERM does): SIGINT
    (Ctrl-C), and SIGHUP (the terminal closed, an SSH session ended) unless it was
    ignored at start (nohup), where its default would end the process on the spot."""
    hangup = () if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN else (signal.SIGHUP,)
    return (signal.SIGTERM, signal.SIGINT, *hangup)


def _interrupted(prog: str) -> int:
    print(f"{prog}: interrupted", file=sys.stderr)
    return INTERRUPTED


def node() -> int:
    """``nodeclient``."""
    try:
        from nodeclient.node.cli import main
    except KeyboardInterrupt:
        return _interrupted("nodeclient")
    return main()


def coordinator() -> int:
    """``nodeclient-coordinator``."""
    try:
        from nodeclient.coordinator.cli import main
    except KeyboardInterrupt:
        return _interrupted("nodeclient-coordinator")
    return main()
