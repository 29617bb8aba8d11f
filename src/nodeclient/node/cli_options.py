"""The options many ``nodeclient`` commands share, turned into values: the node home
(``--home``), the deferred passphrase (``--passphrase-file``), the coordinator URL
(``--coordinator``, config.toml, or the running daemon's) and ``--heartbeat-interval``.

Each is checked where it is read, as config.toml's value is, so a bad flag is one line
on stderr naming it (a :class:`~nodeclient.errors.UsageError`), never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from nodeclient.errors import NodeClientError, UsageError
from nodeclient.node import keys, securefile
from nodeclient.node.config import NodeConfig, check_coordinator_url, check_heartbeat_interval


def home_dir(args: argparse.Namespace, *, create: bool = False) -> Path:
    home = securefile.resolve_home(args.home, os.environ)
    return securefile.ensure_home(home, create=create)


def passphrase_source(args: argparse.Namespace, *, confirm: bool = False) -> Callable[[], bytes]:
    """Deferred: the passphrase is read only if node.key turns out to be encrypted."""
    file = Path(args.passphrase_file) if getattr(args, "passphrase_file", None) else None

    def read() -> bytes:
        prompt = _tty_prompt if sys.stdin.isatty() else None
        return keys.read_passphrase(
            passphrase_file=file, env=os.environ, prompt=prompt, confirm=confirm
        )

    return read


def _tty_prompt(text: str) -> str:
    import getpass

    return getpass.getpass(text)


def coordinator_option(
    args: argparse.Namespace, config: NodeConfig, *, daemon_home: Path | None = None
) -> str | None:
    """``--coordinator`` if given (checked here), else config.toml's (checked on load),
    else, with *daemon_home*, the one the running daemon of that home was started with
    (`nodeclient run --coordinator URL`, as the README's tour does)."""
    flag = getattr(args, "coordinator", None)
    if flag:
        return check_coordinator_url(flag, name="--coordinator").rstrip("/")
    if config.coordinator:
        return config.coordinator.rstrip("/")
    return _daemons_coordinator(daemon_home) if daemon_home is not None else None


def _daemons_coordinator(home: Path) -> str | None:
    """The coordinator URL the daemon running for *home* uses, or None (none runs, or it
    answers something else)."""
    from nodeclient.node import control

    try:
        link = control.request(home / control.SOCKET_NAME, {"cmd": "status"}, timeout=2.0).get(
            "link"
        )
        url = link.get("coordinator") if isinstance(link, dict) else None
        if not isinstance(url, str):
            return None
        return check_coordinator_url(url, name="the daemon's coordinator").rstrip("/")
    except (NodeClientError, OSError):
        return None


def resolve_coordinator_url(
    args: argparse.Namespace, config: NodeConfig, *, daemon_home: Path | None = None
) -> str:
    url = coordinator_option(args, config, daemon_home=daemon_home)
    if not url:
        raise UsageError(
            "no coordinator: pass --coordinator URL or set coordinator in config.toml"
            + (" (and no daemon runs for this home to ask)" if daemon_home else "")
        )
    return url


def checked_heartbeat_interval(args: argparse.Namespace, config: NodeConfig) -> float:
    """``--heartbeat-interval`` if given (0 included), checked as config.toml's is."""
    if args.heartbeat_interval is None:
        return config.heartbeat_interval
    return check_heartbeat_interval(args.heartbeat_interval, name="--heartbeat-interval")
