"""The host directories workers work in (2.3.5 Work Execution): the work root, its
lock, the sweep of roots that dead daemons left, and the model cache's owner.

Each executor makes its own work root in the temporary directory (one ``slot-N``
directory per slot under it) and holds a lock on it while it lives: a root whose lock
nobody holds was left by a daemon that died without its clean-up, and the next daemon
removes it with the files of its last tasks. With bubblewrap as root, the model cache is
given to the sandbox uid so that workers can read it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from nodeclient.errors import NodeClientError
from nodeclient.node import sandbox

log = logging.getLogger("nodeclient.node.executor")  # its events stay the executor's

_ROOT_PREFIX: Final = "nodeclient-work-"  # work roots in the temporary directory
_ROOT_LOCK: Final = ".lock"
_STAGING_PREFIX: Final = ".nodeclient-staging-"  # a root while it is made
_STAGING_STALE_S: Final = 3600.0  # a staging root this old was left by a killed daemon


def remove_tree(path: Path) -> None:
    """Remove a work directory and everything in it, including what a task made read-only
    (a directory of mode 0555 keeps its entries from an unlink): such a parent is made
    writable and the removal tried again."""

    def retry(func: Callable[[str], object], name: str, _exc: object) -> None:
        parent = os.path.dirname(name)
        with contextlib.suppress(FileNotFoundError):  # already gone, by a retry below
            os.chmod(parent, stat.S_IMODE(os.lstat(parent).st_mode) | stat.S_IRWXU)
            if os.path.isdir(name) and not os.path.islink(name):
                os.chmod(name, stat.S_IRWXU)
                remove(name)  # with its entries now reachable
            else:
                func(name)

    def remove(name: str | Path) -> None:
        if sys.version_info >= (3, 12):
            shutil.rmtree(name, onexc=retry)
        else:
            shutil.rmtree(name, onerror=retry)

    if path.exists() or path.is_symlink():
        remove(path)


# A directory walk opens each directory relative to its parent, never following a link:
# the task may swap a directory it made for a symlink (to /, to the node home) while the
# daemon walks it.
_WALK: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Directories nested deeper: the work dir cannot be measured (the task is stopped). The
# walk holds one descriptor per level, and runs in every slot at once.
MAX_WALK_DEPTH: Final = 64


class TooManyEntries(Exception):
    """A directory holds more entries than :func:`disk_used` was told to allow."""


def disk_used(path: Path, *, stop_after: int, max_entries: int | None = None) -> int:
    """The bytes of disk that *path* and everything under it take (allocated blocks, so a
    sparse file counts what it holds), symlinks never followed (not even one swapped in
    for a directory while it is counted); counting stops once it passes *stop_after*. An
    entry that goes while it is counted counts nothing. A directory the task made
    unreadable is made readable again (it is ours); OSError if it cannot be, or if
    directories nest deeper than MAX_WALK_DEPTH, since what they hold goes uncounted.

    With *max_entries*, TooManyEntries once more files, directories and links than that
    are found: empty files take no blocks, but each takes one of the file system's inodes,
    and the walk visits each."""
    try:
        parent = os.open(path.parent, _WALK)
    except (FileNotFoundError, NotADirectoryError):
        return 0
    top = _open_child(parent, path.name, close_parent=True)
    if top is None:
        return 0
    total = entries = 0
    stack = [(top, _entries(top, max_entries))]  # each level: its descriptor, its entries
    try:
        while stack and total <= stop_after:
            fd, pending = stack[-1]
            if not pending:
                stack.pop()
                os.close(fd)
                continue
            name, blocks = pending.pop()
            total += blocks
            entries += 1
            if max_entries is not None and entries > max_entries:
                raise TooManyEntries(f"more than {max_entries} files and directories")
            if name is None:
                continue
            if len(stack) >= MAX_WALK_DEPTH:
                raise OSError(errno.ELOOP, f"directories nested over {MAX_WALK_DEPTH} deep")
            child = _open_child(fd, name)
            if child is not None:
                left = None if max_entries is None else max_entries - entries
                try:
                    stack.append((child, _entries(child, left)))
                except BaseException:
                    os.close(child)
                    raise
    finally:
        for fd, _ in stack:
            os.close(fd)
    return total


def _entries(fd: int, most: int | None = None) -> list[tuple[str | None, int]]:
    """The blocks each entry of directory *fd* takes, in bytes, with the names of those
    that are directories (None for the rest); read whole, so the scan's own descriptor
    is closed at once. TooManyEntries past *most* entries: a directory of 100,000 files
    is not read whole (and each stat'ed) to find it holds more than a few."""
    out: list[tuple[str | None, int]] = []
    with os.scandir(fd) as entries:
        for entry in entries:
            if most is not None and len(out) >= most:
                raise TooManyEntries(f"more than {most} files and directories")
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:  # gone meanwhile: counts nothing
                continue
            out.append((entry.name if stat.S_ISDIR(st.st_mode) else None, st.st_blocks * 512))
    return out


def _open_child(parent: int, name: str, *, close_parent: bool = False) -> int | None:
    """Directory *name* in *parent*, opened for reading without following a link; None
    when it is gone or no longer a directory (a symlink now counts as the link it is)."""
    try:
        try:
            return os.open(name, _WALK, dir_fd=parent)
        except PermissionError:
            pass  # made unreadable by the task: below
        # Made readable again through a handle that cannot be a link: chmod by its path
        # would follow one swapped in meanwhile (as root, to any directory on the host).
        handle = os.open(
            name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent
        )
        try:
            inode = f"/proc/self/fd/{handle}"  # the directory itself, whatever its name is now
            os.chmod(inode, stat.S_IMODE(os.fstat(handle).st_mode) | stat.S_IRWXU)
            return os.open(inode, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        finally:
            os.close(handle)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a symlink: never followed
            return None
        raise
    finally:
        if close_parent:
            os.close(parent)


def new_root(tmp: Path) -> tuple[Path, int]:
    """A fresh work root in *tmp*, and the held lock that marks it live. It is made and
    locked under a name the sweep ignores, then renamed into view, so that another
    daemon's sweep can never see it unlocked."""
    staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=tmp))
    fd = _hold_root(staging)
    root = tmp / (_ROOT_PREFIX + staging.name[len(_STAGING_PREFIX) :])
    try:  # mkdtemp's random name is new; at worst it replaces an empty directory
        os.rename(staging, root)
    except OSError:  # the root keeps its staging name (swept like one, once stale)
        return staging, fd
    return root, fd


def _hold_root(root: Path) -> int:
    """Lock *root*'s lock file for as long as this process lives: a root whose lock nobody
    holds was left by a process that died without its clean-up (kill -9, a crash)."""
    fd = os.open(root / _ROOT_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def sweep_stale_roots(tmp: Path) -> None:
    """Remove the work roots in *tmp* that daemons of this user left when they died: the
    files of their last tasks stay there otherwise (under systemd, PrivateTmp empties
    /tmp anyway). A root is ours to remove only if it is a real directory owned by this
    user whose lock file exists and no live process holds; another daemon's, or one from
    a release before the lock, is left alone."""
    uid = os.geteuid()
    try:
        candidates = [p for p in tmp.iterdir() if p.name.startswith(_ROOT_PREFIX)]
        # A staging root is a live daemon's for a moment before it is locked: only an
        # old one (its daemon killed while making it) is stale.
        staged = [p for p in tmp.iterdir() if p.name.startswith(_STAGING_PREFIX)]
    except OSError:
        return
    for root in candidates + staged:
        try:
            st = os.lstat(root)
        except OSError:
            continue  # gone meanwhile
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
            continue
        if root in staged and time.time() - st.st_mtime < _STAGING_STALE_S:
            continue
        try:
            fd: int | None = os.open(root / _ROOT_LOCK, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            if root not in staged:
                continue  # a root from a release before the lock: not known to be stale
            fd = None  # an old staging root killed before its lock file was made
        except OSError:
            continue  # gone, or not ours to open
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live daemon's
            finally:
                os.close(fd)
        try:
            remove_tree(root)
        except OSError as exc:  # a mount left in it, a read-only disk: start all the same
            log.warning("worker.stale_root_kept", extra={"path": str(root), "error": str(exc)})
            continue
        log.info("worker.stale_root_removed", extra={"path": str(root)})


def chown_tree(path: Path) -> None:
    """Give the model cache to the sandbox uid, so workers can read it (bound read-only).

    Workers of earlier releases could write it and plant symlinks in it, so nothing
    inside it is followed: ``os.fwalk`` descends only into real directories, and every
    chown is relative to an open directory and does not follow a link. The cache
    directory itself is the operator's (the root of the sandbox's bind, which no task can
    replace), so a link there, say to a larger disk, is followed to the directory it
    names.
    """
    uid, gid = sandbox.SANDBOX_UID, sandbox.SANDBOX_GID
    try:
        real = os.path.realpath(path)
        top = os.open(real, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise NodeClientError(
            f"model cache {path} is not a directory ({exc.strerror}); "
            "the daemon will not hand it to the sandbox uid: make it a plain directory"
        ) from exc
    try:
        for _, dirs, files, dir_fd in os.fwalk(".", dir_fd=top, follow_symlinks=False):
            for name in (*dirs, *files):
                with contextlib.suppress(OSError):
                    os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
        os.fchown(top, uid, gid)
    finally:
        os.close(top)
