"""The console scripts' entry points: the command-line modules import for a second or
two (eth-account, httpx, FastAPI), and a Ctrl-C in that time must end the command as a
Ctrl-C later does (status 130, one line), not with a traceback from inside an import.
And the signals that stop the long-running ones (:func:`stop_signals`), and the one a
child gets when its parent dies (:func:`die_with_parent`)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

INTERRUPTED = 130
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def stop_signals() -> tuple[signal.Signals, ...]:
    """What stops the node daemon and the coordinator cleanly (as SIGTERM does): SIGINT
    (Ctrl-C), and SIGHUP (the terminal closed, an SSH session ended) unless it was
    ignored at start (nohup), where its default would end the process on the spot."""
    hangup = () if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN else (signal.SIGHUP,)
    return (signal.SIGTERM, signal.SIGINT, *hangup)


def die_with_parent(sig: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send the child *sig* when this process dies,
    whatever kills it (``PR_SET_PDEATHSIG``; no cleanup of ours runs after a SIGKILL).

    Linux only (elsewhere None). ``preexec_fn`` runs between fork and exec, where another
    thread of this process may hold a lock: the child only calls prctl, getppid and kill,
    looked up here, before the fork. A parent that died before the prctl is seen by the
    child's parent having changed: it kills itself before anything of it has started. The
    signal comes when the *thread* that started the child ends, so that thread must live
    as long as the child is meant to.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (AttributeError, OSError):
        return None
    getppid, parent = os.getppid, os.getpid()
    kill, pid = os.kill, os.getpid

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if getppid() != parent:  # the parent died before prctl: nobody will signal us
            kill(pid(), signal.SIGKILL)

    return preexec


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
