"""The node home and the secret files in it (2.3.1 Key Management: "Mode 0600 enforced").

Theory of operation
-------------------
Every secret the node holds lives in one directory, the *node home*, which must be a real
directory (not a symlink) owned by the effective uid and not writable by group or other.

Creating a secret never exposes it, whatever the umask: the bytes go into a temporary file
opened with ``O_CREAT | O_EXCL | O_NOFOLLOW`` and mode 0600, whose mode and owner are then
checked with ``fstat`` (the umask can only remove bits, but a filesystem that ignores modes
would add them). The bytes are written, ``fsync``-ed, read back and compared, and only then
does the file get its real name, after which the directory is ``fsync``-ed so that the name
survives a crash. A mode is never changed after the fact: a file that was born readable by
others has already leaked.

Loading a secret opens it with ``O_NOFOLLOW`` and checks the *open descriptor* with
``fstat`` (so the file checked is the file read): a regular file, owned by the effective
uid, with no group/other bits, and small. A refusal names the file, what is wrong and the
command that fixes it, and changes nothing on disk: fixing permissions is the operator's
decision, because a key that was readable by others may have to be rotated, not re-chmodded.

Several secrets created together (``init``'s three keys) are all written to temporary
files ``.NAME.BATCH.tmp`` first, one BATCH per call, and only then given their names, one
hard link at a time. A kill between two links leaves some names given, each the same inode
as its temporary file, and the others only as temporary files of the same batch:
:func:`finish_secrets` gives the missing names from those, and refuses, naming what to move
away, when they are not all there.

A process that holds a decrypted secret calls :func:`forbid_core_dumps` first, so that a
crash does not write the secret into a core file and no other process of the same user can
read its memory.

Everything else about keys (formats, the keystore) lives in :mod:`nodeclient.node.keys`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pwd
import re
import secrets
import shlex
import stat
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Final

from nodeclient.durable import fsync_directory
from nodeclient.errors import KeyFileError, UsageError

log = logging.getLogger("nodeclient.node")

HOME_ENV: Final = "NODECLIENT_HOME"
DEFAULT_HOME_NAME: Final = ".nodeclient"
DEFAULT_MAX_SIZE: Final = 65536
MISSING_FIX: Final = "run `nodeclient init` (or restore it from backup)"
# Where config.toml is there, init refuses the home (initialised): the key is restored,
# or the node starts over with a new identity.
START_OVER: Final = (
    "to start over as a new node (a new node_id), move node.key, liveness.key, "
    "payload.key, config.toml, wallet_proof.json and the outbox (outbox.db and the files "
    "beside it whose names start with it) out of the home"
)
MISSING_IN_HOME_FIX: Final = (
    f"restore it from your backup; or, {START_OVER}, then run `nodeclient init`"
)
_SECRET_MODE: Final = 0o600
_HOME_MODE: Final = 0o700
# A temporary file of _stage: "." + the final name + "." + the batch (16 hex digits) + ".tmp"
_TMP_RE: Final = re.compile(r"^\.(?P<name>.+)\.(?P<batch>[0-9a-f]{16})\.tmp$")
_PR_SET_DUMPABLE: Final = 4  # <linux/prctl.h>


def resolve_home(cli_home: str | os.PathLike[str] | None, env: Mapping[str, str]) -> Path:
    """Pick the node home: ``--home DIR``, else ``$NODECLIENT_HOME``, else ``~/.nodeclient``.
    An empty ``--home`` is refused (an unset shell variable); an empty
    ``$NODECLIENT_HOME`` counts as unset, as an empty environment variable commonly does.

    The environment is passed in (never read from ``os.environ`` here) so that the CLI is
    the only place that looks at the process's inputs. A leading ``~`` is expanded with the
    given environment's ``HOME``. Symlinks are deliberately not resolved: the home itself
    must not be one, and :func:`ensure_home` is where that is checked.
    """
    raw: str | os.PathLike[str]
    if cli_home is not None and os.fspath(cli_home) == "":
        # `--home "$DIR"` with DIR unset: taking another home (a second daemon on the
        # default one, or a new node made there by init) would be worse than stopping.
        raise UsageError(
            "--home is empty: give the node's home directory, or leave --home out to use "
            f"${HOME_ENV} or ~/{DEFAULT_HOME_NAME}"
        )
    if cli_home is not None:
        raw = cli_home
    elif env.get(HOME_ENV):
        raw = env[HOME_ENV]
    else:
        raw = os.path.join("~", DEFAULT_HOME_NAME)
    text = os.fspath(raw)
    if text == "~" or text.startswith("~/"):
        try:
            user_home = env.get("HOME") or str(Path.home())
        except RuntimeError:  # no $HOME, and no passwd entry for this uid (a container's)
            raise UsageError(
                "cannot tell this user's home directory (no $HOME, no passwd entry): pass "
                "--home or set NODECLIENT_HOME"
            ) from None
        text = user_home + text[1:]
    return Path(os.path.abspath(text))


def ensure_home(home: Path, *, create: bool) -> Path:
    """Validate the node home, creating it with mode 0700 first when ``create`` is true.

    Missing parents are created 0700 as well. An existing home is never modified, only
    checked: a symlink, a non-directory, another owner or group/other write is refused.
    """
    try:
        st = os.lstat(home)
    except FileNotFoundError:
        if not create:
            raise KeyFileError(
                f"node home {home} does not exist; fix: run `nodeclient init` "
                "(or pass --home / set NODECLIENT_HOME to the right directory)"
            ) from None
        _create_home(home)
        st = os.lstat(home)
    except OSError as exc:
        raise KeyFileError(f"cannot inspect node home {home}: {exc.strerror}") from exc
    problem = _home_problem(home, st)
    if problem is not None:
        raise KeyFileError(problem)
    return home


def _create_home(home: Path) -> None:
    """Make *home* and its missing parents, each exactly 0700 and its name fsynced into
    its parent, so that a crash after `init` printed the node_id cannot lose the home."""
    try:
        # Missing parents get 0700 too: Path.mkdir(parents=True) would give them
        # 0777 & ~umask, and a writable parent lets others rename the home away.
        for ancestor in [*reversed(home.parents), home]:
            if os.path.lexists(ancestor):
                continue
            try:
                os.mkdir(ancestor, _HOME_MODE)
            except FileExistsError:
                # Made meanwhile (another init under the same new parent): that level
                # exists, as someone else made it, and the levels below it are still
                # ours to make. The home is validated like any existing one after.
                continue
            _settle_directory(ancestor)
    except OSError as exc:
        raise KeyFileError(f"cannot create node home {home}: {exc.strerror}") from exc


def _settle_directory(path: Path) -> None:
    """A directory just made: exactly 0700 whatever the umask, and durable.

    A umask can only remove bits; a pathological one (e.g. 0o277) removes the owner's
    own, and the next directory could not be made in it. Restoring exactly 0700 on a
    directory we just made, still empty, widens nothing for anyone else, so it is not
    the forbidden "chmod after the fact"."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if stat.S_IMODE(os.fstat(fd).st_mode) != _HOME_MODE:
                os.fchmod(fd, _HOME_MODE)
        finally:
            os.close(fd)
        fsync_directory(path.parent)
    except OSError as exc:
        raise KeyFileError(f"cannot set up node home directory {path}: {exc.strerror}") from exc


def _home_problem(home: Path, st: os.stat_result) -> str | None:
    if stat.S_ISLNK(st.st_mode):
        return (
            f"refusing to use node home {home}: it is a symlink; "
            "fix: pass the real directory with --home (or NODECLIENT_HOME)"
        )
    if not stat.S_ISDIR(st.st_mode):
        return f"refusing to use node home {home}: it is not a directory"
    euid = os.geteuid()
    if st.st_uid != euid:
        return (
            f"refusing to use node home {home}: owned by uid {st.st_uid}, not by uid {euid} "
            f"that runs nodeclient; fix: {_ownership_fix(home, st.st_uid)}"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        return (
            f"refusing to use node home {home}: mode {mode:04o} lets group/other write to it "
            f"(they could swap the key files); fix: chmod 700 {_q(home)}"
        )
    return None


def secret_problem(
    path: Path, st: os.stat_result, *, max_size: int = DEFAULT_MAX_SIZE
) -> str | None:
    """Why a file with this ``stat`` must not be used as a secret, or None if it may.

    Pure (no I/O) so that loading and :func:`describe_file` give the same verdict and
    the same words.
    """
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISLNK(st.st_mode):
        return (
            f"refusing to use {path}: it is a symlink; "
            "fix: replace it with the real file (mode 0600)"
        )
    if not stat.S_ISREG(st.st_mode):
        return (
            f"refusing to use {path}: it is a {_kind(st.st_mode)}, not a regular file; "
            "fix: move it away and restore the key file from backup"
        )
    euid = os.geteuid()
    if st.st_uid != euid:
        return (
            f"refusing to use {path}: owned by uid {st.st_uid}, not by uid {euid} that runs "
            f"nodeclient; fix: {_ownership_fix(path, st.st_uid)}"
        )
    if mode & 0o077:
        return (
            f"refusing to use {path}: mode {mode:04o} {_exposure(mode)}; fix: chmod 600 {_q(path)}"
        )
    if st.st_size > max_size:
        return (
            f"refusing to use {path}: {st.st_size} bytes is more than a key file's "
            f"{max_size}; fix: move it away and restore the key file from backup"
        )
    return None


def _ownership_fix(path: Path, owner: int) -> str:
    """What to do about a file or home another user owns. Run as root, that is most
    likely the service user's home: handing it to root would break the service."""
    euid = os.geteuid()
    if euid == 0:
        try:
            name = pwd.getpwuid(owner).pw_name
        except KeyError:
            name = f"#{owner}"
        who = shlex.quote(name)
        return f"run nodeclient as its owner (sudo -u {who} nodeclient ...), not as root"
    return f"chown {euid} {_q(path)} (or run nodeclient as its owner)"


def _q(path: Path) -> str:
    """*path* as a shell word, for the commands in fixes: a path with a space, a quote or
    a glob character in it must name this file, and only it, when pasted into a shell."""
    return shlex.quote(str(path))


def _exposure(mode: int) -> str:
    who = {0o070: "group", 0o007: "other", 0o077: "group/other"}[
        (0o070 if mode & 0o070 else 0) | (0o007 if mode & 0o007 else 0)
    ]
    verbs = [
        v for bits, v in ((0o044, "read"), (0o022, "write"), (0o011, "execute")) if mode & bits
    ]
    return f"lets {who} {' and '.join(verbs)} it"


def _kind(mode: int) -> str:
    kinds = (
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISREG, "regular file"),
    )
    return next((name for test, name in kinds if test(mode)), "special file")


def initialised(home: Path) -> bool:
    """Whether init has run in *home*: its config.toml is there (init then refuses it)."""
    return (home / "config.toml").exists()


def read_secret(
    path: Path, *, max_size: int = DEFAULT_MAX_SIZE, missing_fix: str = MISSING_FIX
) -> bytes:
    """Read a secret file after checking the open descriptor; never modifies the file.

    ``missing_fix`` is what the refusal of a missing file tells the operator to do.
    ``O_NONBLOCK`` keeps a FIFO planted in place of a key from hanging the open; it has no
    effect on the regular files we go on to read.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise KeyFileError(f"no key file at {path}; fix: {missing_fix}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise KeyFileError(_symlink_problem(path, exc)) from exc
        # Not opened (another owner's file, a socket): what is wrong with it, with its
        # fix, where the file itself says (as `doctor` reads it), else the error alone.
        try:
            problem = secret_problem(path, os.lstat(path), max_size=max_size)
        except OSError:
            problem = None
        raise KeyFileError(problem or f"cannot open {path}: {exc.strerror}") from exc
    try:
        problem = secret_problem(path, os.fstat(fd), max_size=max_size)
        if problem is not None:
            raise KeyFileError(problem)
        chunks = list(_read_upto(fd, max_size + 1))
    except OSError as exc:
        raise KeyFileError(f"cannot read {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > max_size:  # grew between fstat and read
        raise KeyFileError(f"refusing to use {path}: more than a key file's {max_size} bytes")
    return data


def _symlink_problem(path: Path, exc: OSError, *, home: bool = False) -> str:
    """The refusal for an ``O_NOFOLLOW`` open that met a symlink (ELOOP)."""
    try:
        st = os.lstat(path)
    except OSError:
        return f"cannot open {path}: {exc.strerror}"
    problem = _home_problem(path, st) if home else secret_problem(path, st)
    return problem or f"cannot open {path}: {exc.strerror}"


def _read_upto(fd: int, limit: int) -> Iterator[bytes]:
    while limit > 0:
        chunk = os.read(fd, min(limit, 65536))
        if not chunk:
            return
        limit -= len(chunk)
        yield chunk


def describe_file(path: Path) -> dict[str, object]:
    """What ``keys show`` and ``doctor`` print about one secret file; never follows links.

    Keys: ``path``, ``exists``, ``kind``, ``mode`` (four octal digits, e.g. ``"0600"``),
    ``owner_uid``, ``size``, ``ok`` and ``problem`` (the refusal a load would give, or None).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        missing: dict[str, object] = dict.fromkeys(("kind", "mode", "owner_uid", "size"))
        missing.update(path=str(path), exists=False, ok=False, problem=f"{path} does not exist")
        return missing
    problem = secret_problem(path, st)
    return {
        "path": str(path),
        "exists": True,
        "kind": _kind(st.st_mode),
        "mode": f"{stat.S_IMODE(st.st_mode):04o}",
        "owner_uid": st.st_uid,
        "size": st.st_size,
        "ok": problem is None,
        "problem": problem,
    }


def write_secret(path: Path, data: bytes) -> None:
    """Create ``path`` holding ``data`` (mode 0600); refuse if anything exists at ``path``."""
    write_secrets({path: data})


def write_secrets(files: Mapping[Path, bytes]) -> None:
    """Create several secret files in one directory, all or nothing.

    Every file is first written in full to a temporary name; only then are they given
    their real names, with ``link`` (which, unlike ``rename``, refuses to replace an
    existing name, atomically). If any name is taken, the names already given are taken
    back and every temporary file is removed, so the directory is left as it was.
    """
    if not files:
        return
    parents = {p.parent for p in files}
    if len(parents) != 1:
        raise ValueError("write_secrets writes into one directory")
    directory = parents.pop()
    batch = secrets.token_hex(8)  # one for all the files: finish_secrets relies on it
    with _open_dir(directory) as dfd:
        staged: list[tuple[str, str, int]] = []  # (temporary name, final name, inode)
        committed: list[tuple[str, int]] = []
        try:
            for path, data in files.items():
                tmp, ino = _stage(dfd, path, data, batch)
                staged.append((tmp, path.name, ino))
            for tmp, name, ino in staged:
                _link_no_replace(dfd, tmp, directory / name)
                committed.append((name, ino))
        except BaseException:
            for name, ino in committed:
                _unlink_if_same(dfd, name, ino)
            raise
        finally:
            for tmp, _, _ in staged:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)
        _fsync_dir(dfd, directory)


def finish_secrets(paths: Sequence[Path]) -> list[str]:
    """Finish a :func:`write_secrets` of ``paths`` that was killed while it gave the names.

    Some names given and the others missing is finished only when it is provably one
    batch cut short: every name there is the same inode as its own temporary file of one
    batch, and that batch's temporary file of every missing name is there, a regular file
    of ours, mode 0600. The missing names are then given from those files (a link, which
    never replaces a name) and the directory is synced. Anything else is refused,
    changing nothing, with the files to move aside (never to delete: one of them may be
    the only copy of a key).

    With no name or every name there, there is nothing to finish. Unless it refuses, it
    then removes the leftover temporary files of these names: each is either a second
    link to a file that has its name, or a secret that never got one and so was never
    used. Returns the names given now.
    """
    if not paths:
        return []
    parents = {p.parent for p in paths}
    if len(parents) != 1:
        raise ValueError("finish_secrets works in one directory")
    directory = parents.pop()
    names = [p.name for p in paths]
    with _open_dir(directory) as dfd:
        temps = _leftovers(dfd, directory, names)
        present = [n for n in names if _exists(dfd, n)]
        missing = [n for n in names if n not in present]
        given: list[str] = []
        if present and missing:
            batch = _batch_of(dfd, present, temps)
            sources = {
                name: tmp
                for name in missing
                if batch is not None
                and (tmp := temps.get(name, {}).get(batch)) is not None
                and _usable_temp(dfd, directory / tmp)
            }
            if len(sources) != len(missing):
                raise KeyFileError(_unfinishable(directory, present, missing, temps))
            for name, tmp in sources.items():
                _link_no_replace(dfd, tmp, directory / name)
                given.append(name)
            _fsync_dir(dfd, directory)
        for by_batch in temps.values():
            for tmp in by_batch.values():
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)
        return given


def _leftovers(dfd: int, directory: Path, names: Sequence[str]) -> dict[str, dict[str, str]]:
    """The temporary files of ``names`` in the directory: {name: {batch: file name}}."""
    found: dict[str, dict[str, str]] = {}
    try:
        entries = os.listdir(dfd)
    except OSError as exc:
        raise KeyFileError(f"cannot list {directory}: {exc.strerror}") from exc
    for entry in entries:
        match = _TMP_RE.match(entry)
        if match is not None and match["name"] in names:
            found.setdefault(match["name"], {})[match["batch"]] = entry
    return found


def _batch_of(
    dfd: int, present: Sequence[str], temps: Mapping[str, Mapping[str, str]]
) -> str | None:
    """The one batch whose temporary files are the very files (inodes) named ``present``."""
    batches: set[str] = set()
    for name in present:
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        same = {b for b, tmp in temps.get(name, {}).items() if _same_file(dfd, tmp, st)}
        if len(same) != 1:
            return None
        batches |= same
    return batches.pop() if len(batches) == 1 else None


def _same_file(dfd: int, name: str, st: os.stat_result) -> bool:
    try:
        other = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except OSError:
        return False
    return (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino)


def _usable_temp(dfd: int, path: Path) -> bool:
    try:
        st = os.stat(path.name, dir_fd=dfd, follow_symlinks=False)
    except OSError:
        return False
    return secret_problem(path, st) is None


def _unfinishable(
    directory: Path,
    present: Sequence[str],
    missing: Sequence[str],
    temps: Mapping[str, Mapping[str, str]],
) -> str:
    """The refusal when the given names cannot be completed: what to restore or move."""
    aside = directory / "interrupted-init"
    move = [directory / n for n in present]
    move += [directory / t for n in sorted(temps) for t in sorted(temps[n].values())]
    quoted = " ".join(shlex.quote(str(p)) for p in move)
    return (
        f"cannot finish the interrupted init in {directory}: {_and(present)} "
        f"{'is' if len(present) == 1 else 'are'} there but {_and(missing)} "
        f"{'is' if len(missing) == 1 else 'are'} not, and the staging files of the same "
        "batch to finish it from are not all there; nothing was changed. Fix: restore "
        f"{_and(missing)} from a backup, or, to start over with new keys, move "
        f"{'it' if len(move) == 1 else 'these'} aside (do not delete: "
        f"{'it' if len(move) == 1 else 'one'} may be the only copy of a key): "
        f"`mkdir -m 700 {shlex.quote(str(aside))} && mv {quoted} "
        f"{shlex.quote(str(aside))}/`, then run init again"
    )


def _and(names: Sequence[str]) -> str:
    return " and ".join(filter(None, (", ".join(names[:-1]), names[-1])))


def replace_secret(path: Path, data: bytes) -> None:
    """Atomically replace (or create) ``path`` with ``data`` (mode 0600), e.g. to rotate a key.

    ``rename`` replaces the name itself, never following a symlink found there.

    A replace killed between writing its temporary file and the rename leaves that file,
    a complete secret that never got the name; nothing else removes it in a home that is
    initialised (only ``init`` finishes staging files, and it refuses such a home). Once
    the name holds the new secret, the leftover temporary files of that name are removed
    with it: each never got the name, so was never used (or is a second link to a file
    that had it, from an init killed after its links), and the name now holds a newer one.
    A second replace of the same name running at the same moment may so lose its own
    temporary file before its rename: that one then fails, changing nothing, and the name
    holds the secret of the one that succeeded.
    """
    with _open_dir(path.parent) as dfd:
        tmp, _ = _stage(dfd, path, data, secrets.token_hex(8))
        try:
            os.rename(tmp, path.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise KeyFileError(f"cannot replace {path}: {exc.strerror}") from exc
        # Best effort: the replace itself has succeeded, and a leftover that stays is
        # removed by the next one.
        with contextlib.suppress(KeyFileError):
            for leftover in _leftovers(dfd, path.parent, [path.name]).get(path.name, {}).values():
                with contextlib.suppress(OSError):
                    os.unlink(leftover, dir_fd=dfd)
        _fsync_dir(dfd, path.parent)  # the new name and the removals alike


def forbid_core_dumps() -> None:
    """Keep the secrets this process is about to hold out of core files and other eyes.

    ``RLIMIT_CORE`` 0, soft and hard, so nothing later in the process can raise it again:
    no core file. ``PR_SET_DUMPABLE`` 0 as well, because the limit alone is not enough: a
    ``core_pattern`` pipe (systemd-coredump, apport) is started whatever the limit, and
    the flag also keeps other processes of the same user from attaching with ptrace or
    reading ``/proc/PID/mem``. Programs this process executes start dumpable again (the
    kernel resets the flag on exec), but keep the limit. Where either is not available
    (not Linux, no prctl in the C library) it logs at debug level and goes on.
    """
    import resource

    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as exc:
        log.debug("process.core_limit_unchanged", extra={"reason": str(exc)})
    if not sys.platform.startswith("linux"):
        log.debug("process.dumpable_unchanged", extra={"reason": f"no prctl on {sys.platform}"})
        return
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError) as exc:
        log.debug("process.dumpable_unchanged", extra={"reason": f"no prctl: {exc}"})
        return
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    if prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        reason = os.strerror(ctypes.get_errno())
        log.debug("process.dumpable_unchanged", extra={"reason": f"prctl: {reason}"})


def _fsync_dir(dfd: int, directory: Path) -> None:
    """Make the new names durable: without this a crash can lose a freshly renamed key."""
    try:
        os.fsync(dfd)
    except OSError as exc:
        raise KeyFileError(f"cannot sync directory {directory}: {exc.strerror}") from exc


@contextlib.contextmanager
def _open_dir(directory: Path) -> Iterator[int]:
    """Open the directory secrets go into and check that it is a safe home for them."""
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise KeyFileError(_symlink_problem(directory, exc, home=True)) from exc
        raise KeyFileError(f"cannot open directory {directory}: {exc.strerror}") from exc
    try:
        problem = _home_problem(directory, os.fstat(dfd))
        if problem is not None:
            raise KeyFileError(problem)
        yield dfd
    finally:
        os.close(dfd)


def _stage(dfd: int, path: Path, data: bytes, batch: str) -> tuple[str, int]:
    """Write ``data`` to a fresh 0600 temporary file beside ``path``; return name and inode."""
    tmp = f".{path.name}.{batch}.tmp"
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, _SECRET_MODE, dir_fd=dfd)
    except OSError as exc:
        raise KeyFileError(f"cannot create a temporary file for {path}: {exc.strerror}") from exc
    try:
        try:
            # 0600 whatever the umask: one that takes the owner's own bits (0277, say)
            # would leave 0400, which no later load accepts. Only owner bits are added. A
            # filesystem without modes refuses: the check below then says so.
            with contextlib.suppress(OSError):
                os.fchmod(fd, _SECRET_MODE)
            st = os.fstat(fd)
            mode = stat.S_IMODE(st.st_mode)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or mode != _SECRET_MODE:
                raise KeyFileError(
                    f"cannot create {path} safely: the new file got mode {mode:04o} and owner "
                    f"uid {st.st_uid} instead of 0600 and uid {os.geteuid()} "
                    "(check the umask and that the filesystem honours modes)"
                )
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            if os.pread(fd, len(data) + 1, 0) != data:
                raise KeyFileError(f"cannot create {path}: read-back differs from what was written")
        except OSError as exc:
            raise KeyFileError(f"cannot write {path}: {exc.strerror}") from exc
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)
        raise
    return tmp, st.st_ino


def _link_no_replace(dfd: int, tmp: str, target: Path) -> None:
    name = target.name
    try:
        os.link(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
    except FileExistsError:
        raise KeyFileError(f"refusing to overwrite existing {target}") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
            raise KeyFileError(f"cannot create {target}: {exc.strerror}") from exc
        # A filesystem without hard links: check, then rename. The window between the two
        # is the price of such a filesystem; the home is 0700, so only we can race us.
        if _exists(dfd, name):
            raise KeyFileError(f"refusing to overwrite existing {target}") from None
        try:
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except OSError as exc2:
            raise KeyFileError(f"cannot create {target}: {exc2.strerror}") from exc2


def _exists(dfd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _unlink_if_same(dfd: int, name: str, ino: int) -> None:
    """Take back a name we gave, but only if it still points at our file."""
    with contextlib.suppress(OSError):
        if os.stat(name, dir_fd=dfd, follow_symlinks=False).st_ino == ino:
            os.unlink(name, dir_fd=dfd)
