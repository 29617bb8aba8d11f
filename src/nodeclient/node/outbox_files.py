"""The outbox's files beside its database: modes, the process lock and result files.

The database and its ``-wal`` and ``-shm`` are made or tightened to 0600 before SQLite opens
them; ``<database>.lock`` is held exclusively while the outbox is open (one process at a
time); a large result is a file in ``<database>.results/``, whose names and fsyncs are here,
as is telling a full disk (nothing written) from an I/O error (maybe written).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import stat
from pathlib import Path
from typing import Final

from nodeclient.errors import UsageError

log = logging.getLogger("nodeclient.node.outbox")  # the outbox's log, shared with outbox.py

_FILE_SUFFIX: Final = ".result"
# A result's file: <task_id>.result, or <task_id>.<8 hex>.result where a file of the first
# name was there already (another outbox database's, kept: see Outbox._commit_locked).
_OURS: Final = re.compile(
    r"(\.[0-9a-f-]{36}\.[0-9a-f]{8}\.tmp|[0-9a-f-]{36}(\.[0-9a-f]{8})?\.result)"
)
_RESULT_NAME: Final = re.compile(r"[0-9a-f-]{36}(\.[0-9a-f]{8})?\.result")


class OutboxBusy(UsageError):
    """Another process has this outbox open (a second daemon on the same home)."""


def _make_private(path: Path) -> None:
    """Create the database 0600, or take group and other access off it and its -wal, -shm.

    SQLite creates a new database with the umask (0644 under umask 022), and a new -wal or
    -shm with the database's own mode (its unix VFS copies it, whatever the umask), so a
    0600 database keeps them 0600; looser ones left by an older release are tightened here.
    """
    for name, create in ((path.name, os.O_CREAT), (path.name + "-wal", 0), (path.name + "-shm", 0)):
        file = path.with_name(name)
        try:
            fd = os.open(file, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | create, 0o600)
        except FileNotFoundError:
            continue
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UsageError(f"{file} is a symbolic link: the outbox must be a file") from None
            raise
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
            if mode & 0o077:
                os.fchmod(fd, mode & 0o700)
                log.info("outbox.mode_tightened", extra={"file": name, "mode": oct(mode)})
        finally:
            os.close(fd)


def _lock_exclusively(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutboxBusy(
            f"{path.with_suffix('')} is in use by another process: is a nodeclient daemon "
            "already running with this home? Stop it first."
        ) from None
    return fd
