"""The console scripts' entry points: the command-line modules import for a second or
two (eth-account, httpx, FastAPI), and a Ctrl-C in that time must end the command as a
Ctrl-C later does (status 130, one line), not with a traceback from inside an import."""

from __future__ import annotations

import sys

INTERRUPTED = 130


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
