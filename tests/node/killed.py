"""Children that SIGKILL themselves while key files get their names (as a power cut or
the OOM killer would), for the tests of an interrupted ``write_secrets`` and ``init``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

# Prepended to a child's own code: SIGKILL just before link number KILL_AT + 1 (so after
# KILL_AT names are given), or, with KILL_AT = 3, after every link but before the
# temporary files are removed. KILL_AT is the child's first argument.
_HOOKS = textwrap.dedent(
    """
    import os, signal, sys
    real_link, links = os.link, []
    kill_at = int(sys.argv[1])

    def link(*args, **kwargs):
        if len(links) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        real_link(*args, **kwargs)
        links.append(args)

    def unlink(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    os.link = link
    if kill_at == 3:
        os.unlink = unlink
    """
)


def run_killed(code: str, kill_at: int, *args: str) -> None:
    """Run *code* (its arguments: ``sys.argv[2:]``) in a child killed at *kill_at*."""
    proc = subprocess.run(
        [sys.executable, "-c", _HOOKS + textwrap.dedent(code), str(kill_at), *args],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == -9, proc.stderr


def temps(home: Path) -> list[str]:
    """The temporary files a write left in *home*."""
    return sorted(n for n in os.listdir(home) if n.endswith(".tmp"))
