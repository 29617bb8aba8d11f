"""``nodeclient service install``: a hardened systemd unit for the node daemon.

The unit runs ``nodeclient run`` as an unprivileged user with the node home as its
systemd state directory (``/var/lib/nodeclient``, created 0700 and owned by that user),
a read-only view of the rest of the system, and device access limited to the standard
pseudo-devices plus the NVIDIA character devices, so CUDA still works. It keeps what
the daemon needs and nothing else:

- bubblewrap (the task sandbox, 2.3.5) creates user namespaces, so the unit must not set
  ``RestrictNamespaces=``, ``PrivateUsers=`` or a ``SystemCallFilter=`` that drops them;
  ``NoNewPrivileges=yes`` is fine because bwrap is not used set-uid;
- SIGTERM makes the daemon stop taking work, finish running tasks and flush its outbox,
  so ``TimeoutStopSec=`` is longer than the daemon's drain (60 s of tasks plus 10 s of
  outbox) before systemd resorts to SIGKILL;
- ``LimitCORE=0``: the daemon holds the decrypted node key, which a core file would put
  on disk (the daemon also makes itself non-dumpable, see ``securefile.forbid_core_dumps``);
- ``Restart=on-failure`` with ``RestartPreventExitStatus=78``: a daemon that exits 0 was
  stopped on purpose, and one that exits 78 (NeedsOperator: registration refused by the
  coordinator, a damaged outbox) would fail the same way again, so it stays down with its
  one-line reason in the journal. Anything else restarts after 10 s, bad configuration
  included: some causes pass by themselves (a sandbox probe that timed out at a loaded
  boot, a mount not there yet).
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import re
import shlex
import shutil
import stat
import sys
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from nodeclient.errors import NeedsOperator, UsageError
from nodeclient.node.config import CONFIG_FILE, MAX_CONFIG_BYTES, check_coordinator_url

NO_RESTART_STATUSES: Final = (NeedsOperator.exit_code,)  # 78: see nodeclient.errors

DEFAULT_UNIT_PATH: Final = Path("/etc/systemd/system/nodeclient.service")
# The unit's layout: raised whenever render_unit writes something else (a test pins each
# version's text), so a node upgraded without installing the unit again is told. Units
# written before the version line count as 1.
UNIT_VERSION: Final = 2
_UNIT_VERSION_LINE: Final = "# nodeclient unit version: "
DEFAULT_HOME: Final = Path("/var/lib/nodeclient")
DEFAULT_USER: Final = "nodeclient"
STOP_TIMEOUT_S: Final = 120  # > the daemon's drain: 60 s for running tasks + 10 s of outbox
_USER_RE: Final = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
# /dev/nvidia0..N and /dev/nvidiactl share the "nvidia-frontend" major; UVM and the
# capability devices have majors of their own. Names as in /proc/devices.
NVIDIA_DEVICE_GROUPS: Final = ("char-nvidia-frontend", "char-nvidia-uvm", "char-nvidia-caps")
NVIDIA_DEVICE_NODES: Final = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools")


_HOME_ROOTS: Final = (Path("/home"), Path("/root"), Path("/run/user"))


def _code_paths() -> tuple[Path, ...]:
    """Where this process's interpreter, its standard library and nodeclient live (a
    virtual environment's prefix is not its interpreter's: both count)."""
    import nodeclient

    found = (
        Path(sys.prefix).resolve(),
        Path(sys.base_prefix).resolve(),
        Path(sys.executable).resolve().parent,
        Path(nodeclient.__file__).resolve().parent,
    )
    return tuple(dict.fromkeys(found))


# pip (distlib) writes a console script whose interpreter path has a space, or would make
# a ``#!`` line longer than the kernel reads (127 bytes), as a shell script that executes
# the interpreter on itself: ``#!/bin/sh``, then ``'''exec' "/path/python" "$0" "$@"``.
_SHELLS: Final = ("/bin/sh", "/usr/bin/sh")
_SH_EXEC: Final = b"'''exec' "


def _sh_exec_interpreter(line: bytes) -> str | None:
    """The interpreter a pip shell launcher's second *line* runs, or None (another line)."""
    if not line.startswith(_SH_EXEC):
        return None
    try:
        words = shlex.split(os.fsdecode(line[len(_SH_EXEC) :]))
    except ValueError:  # unbalanced quotes: not pip's line
        return None
    if len(words) < 3 or words[-2:] != ["$0", "$@"]:
        return None
    return words[0]


def interpreter_of(executable: Path) -> Path | None:
    """The interpreter named by *executable*'s ``#!`` line (a console script's), or by the
    ``exec`` line of pip's ``#!/bin/sh`` launcher, resolved; or None (a binary, an ``env``
    lookup, an unreadable file)."""
    try:
        with executable.open("rb") as fh:
            first = fh.readline(4096)
            second = fh.readline(4096)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    words = [os.fsdecode(w) for w in first[2:].split()]
    if words and words[0] in _SHELLS:
        named = _sh_exec_interpreter(second)
        if named is not None:
            words = [named]
    if not words or not words[0].startswith("/") or words[0].endswith("/env"):
        return None
    return Path(words[0]).resolve()


def code_paths_for(executable: Path, *, ours: bool) -> tuple[Path, ...]:
    """What the unit's daemon loads: the directory of the interpreter *executable* names,
    and, when *executable* is this very install (*ours*), this process's code paths."""
    interpreter = interpreter_of(executable)
    found = [interpreter.parent] if interpreter is not None else []
    return tuple(dict.fromkeys([*found, *(_code_paths() if ours else ())]))


def _ids(user: str) -> tuple[int, set[int]] | None:
    """(uid, gids) of *user*, or None if it does not exist yet (useradd comes later)."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return None
    return entry.pw_uid, set(os.getgrouplist(user, entry.pw_gid))


def unreachable(user: str, paths: tuple[Path, ...]) -> str | None:
    """Why *user* could not reach one of *paths* (a directory on the way it may not
    enter), or None. A user that does not exist yet is judged by the "other" bits."""
    ids = _ids(user)
    if ids is not None and ids[0] == 0:
        return None
    # A link counts where it leads too: starting it opens every directory on both ways.
    for path in dict.fromkeys(seen for given in paths for seen in (given, given.resolve())):
        for directory in [*reversed(path.parents), path]:
            try:
                st = directory.stat()
            except OSError:
                break  # not there: nothing to judge by
            if not stat.S_ISDIR(st.st_mode):
                break
            if ids is not None and st.st_uid == ids[0]:
                bit = 0o100
            elif ids is not None and st.st_gid in ids[1]:
                bit = 0o010
            else:
                bit = 0o001
            if not st.st_mode & bit:
                mode = stat.S_IMODE(st.st_mode)
                return f"{directory} (mode {mode:04o}, uid {st.st_uid}) keeps {user} from {path}"
    return None


# The unit's PrivateTmp=yes gives it empty directories of its own here.
PRIVATE_TMP_ROOTS: tuple[Path, ...] = (Path("/tmp"), Path("/var/tmp"))  # noqa: S108 (only compared)


def under_private_tmp(paths: tuple[Path, ...]) -> str | None:
    """Which of *paths* (the interpreter and the code) the unit would not see, because
    PrivateTmp= replaces the directory it lives in with an empty one; or None."""
    for path in paths:
        for seen in dict.fromkeys([path, path.resolve()]):
            for root in PRIVATE_TMP_ROOTS:
                if seen.is_relative_to(root):
                    return (
                        f"{path} is under {root}, which the unit's PrivateTmp=yes replaces "
                        "with an empty directory"
                    )
    return None


def protect_home(paths: tuple[Path, ...]) -> str:
    """``yes`` (hide home directories) unless the daemon's own code lives in one, as named
    or where a link leads (ProtectHome= would hide the link's target)."""
    seen = {s for p in paths for s in (p, p.resolve())}
    roots = {s for r in _HOME_ROOTS for s in (r, r.resolve())}
    inside = any(p.is_relative_to(root) for p in seen for root in roots)
    return "read-only" if inside else "yes"


def _is_utf8(value: str) -> bool:
    """Whether *value* (a path as Python decodes it) is valid UTF-8 on disk too."""
    try:
        os.fsencode(value).decode("utf-8")
    except UnicodeError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class UnitOptions:
    """What the unit is built from; validated so the file never carries a stray newline."""

    executable: Path
    user: str = DEFAULT_USER
    home: Path = DEFAULT_HOME
    # Where the interpreter and the package live: if under /home or /root, ProtectHome=
    # can only make home directories read-only, not hide them, or the daemon cannot start.
    code_paths: tuple[Path, ...] = field(default_factory=_code_paths)

    def __post_init__(self) -> None:
        if not _USER_RE.match(self.user):
            raise UsageError(f"--user {self.user!r} is not a valid system user name")
        if not self.executable.is_absolute() or not self.home.is_absolute():
            raise UsageError("the executable and the node home must be absolute paths")
        for value in (str(self.executable), str(self.home)):
            if not _is_utf8(value):
                raise UsageError(
                    f"{value!r}: paths in the unit must be valid UTF-8 (systemd reads unit "
                    "files as UTF-8)"
                )
            if any(c in value for c in "\n\r \t\"'\\%$;"):
                raise UsageError(f"{value!r}: paths in the unit may not contain spaces or quotes")
        if self.home.parent != Path("/var/lib") or self.home.name in ("", ".", ".."):
            raise UsageError(
                "the node home must be a directory directly under /var/lib (StateDirectory=)"
            )


def find_executable() -> Path:
    """The absolute path of the installed ``nodeclient`` command."""
    found = shutil.which("nodeclient")
    if found:
        return Path(found).resolve()
    beside = Path(sys.executable).parent / "nodeclient"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    raise UsageError("cannot find the nodeclient executable on PATH; pass --executable")


def render_unit(opts: UnitOptions) -> str:
    """The unit file text."""
    state = opts.home.name
    devices = [f"DeviceAllow={d} rw" for d in (*NVIDIA_DEVICE_GROUPS, *NVIDIA_DEVICE_NODES)]
    lines = [
        "# nodeclient node daemon (written by `nodeclient service install`)",
        f"{_UNIT_VERSION_LINE}{UNIT_VERSION}",
        "[Unit]",
        "Description=nodeclient compute node daemon",
        "Wants=network-online.target",
        "After=network-online.target",
        "# Leases, manifests and link auth compare this clock with the coordinator's: start",
        "# once it is synchronised where the machine has a unit that says so.",
        "Wants=time-sync.target",
        "After=time-sync.target",
        "",
        "[Service]",
        "Type=exec",
        f"User={opts.user}",
        f"Group={opts.user}",
        f"ExecStart={opts.executable} run --home {opts.home} --log-format json",
        f"Environment=NODECLIENT_HOME={opts.home}",
        "# The node home: created by systemd, owned by the user, mode 0700.",
        f"StateDirectory={state}",
        "StateDirectoryMode=0700",
        "UMask=0077",
        "# No core files: a crash must not write the decrypted node key to disk.",
        "LimitCORE=0",
        "# Stop: SIGTERM drains running tasks and the outbox, then the daemon exits 0.",
        "# KillMode=mixed: SIGTERM to the daemon only, so its workers finish their tasks.",
        "KillSignal=SIGTERM",
        "KillMode=mixed",
        f"TimeoutStopSec={STOP_TIMEOUT_S}",
        "# Anything but 78 restarts (some causes pass by themselves); 78 (a refused",
        "# registration, a damaged outbox) would not go better: it waits for the operator.",
        "Restart=on-failure",
        "RestartSec=10",
        "# Descriptors: each slot's worker pipes, and its disk watcher's walk (up to 64).",
        "LimitNOFILE=65536",
        f"RestartPreventExitStatus={' '.join(map(str, NO_RESTART_STATUSES))}",
        "# Hardening. No RestrictNamespaces=/PrivateUsers=: the bubblewrap sandbox needs them.",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        f"ProtectHome={protect_home((opts.executable, *opts.code_paths))}",
        "PrivateTmp=yes",
        "# No ProtectKernelTunables=/ProtectKernelLogs=: they cover parts of /proc, which the",
        "# kernel then refuses to mount afresh in bubblewrap's namespaces.",
        "ProtectKernelModules=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "RestrictSUIDSGID=yes",
        "RestrictRealtime=yes",
        "LockPersonality=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        "# Devices: the standard pseudo-devices plus the NVIDIA cards (CUDA, NVML).",
        "DevicePolicy=closed",
        *devices,
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"


def unit_version(text: str) -> int:
    """The layout version an installed unit's text records (1: none recorded)."""
    for line in text.splitlines():
        if line.startswith(_UNIT_VERSION_LINE):
            value = line[len(_UNIT_VERSION_LINE) :].strip()
            return int(value) if value.isdigit() else 0
    return 1


# Where systemd reads system units from, the administrator's first.
UNIT_DIRS: Final = (Path("/etc/systemd/system"), Path("/run/systemd/system"),
                    Path("/usr/local/lib/systemd/system"), Path("/usr/lib/systemd/system"),
                    Path("/lib/systemd/system"))  # fmt: skip


def started_from(cgroup: Path = Path("/proc/self/cgroup")) -> Path | None:
    """The unit file of the system service this process runs in (its cgroup names the
    unit, ``.../nodeclient.service``), where systemd reads it from; None outside one, for
    a user service (a terminal's, say), or when no such file is found."""
    try:
        lines = cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        path = line.split(":", 2)[-1]
        if path.startswith("/user.slice/"):
            return None  # a user's session or service: not one `service install` wrote
        unit = path.rsplit("/", 1)[-1]
        if unit.endswith(".service"):
            for directory in UNIT_DIRS:
                if (directory / unit).is_file():
                    return directory / unit
            return None
    return None


def outdated_unit(path: Path | None = None) -> str | None:
    """Why the unit installed at *path* (default DEFAULT_UNIT_PATH) is not this release's,
    with what to do; None when it is, or when none is installed there (or it cannot be
    read: nothing to say)."""
    path = DEFAULT_UNIT_PATH if path is None else path
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    if "nodeclient" not in text:  # not ours
        return None
    found = unit_version(text)
    if found >= UNIT_VERSION:
        return None
    return (
        f"the systemd unit {path} was written by an older nodeclient (unit version {found}, "
        f"this release writes {UNIT_VERSION}): fixes to it since do not apply. Run `sudo "
        "nodeclient service install` again with the options you gave it, then `sudo "
        "systemctl daemon-reload && sudo systemctl restart nodeclient`"
    )


# A unit name systemd loads (systemd.unit(5)): these characters, a non-empty name before
# the suffix, at most 255 characters in all. A leading dot would make it a hidden file,
# which systemd skips when it reads a unit directory.
_SERVICE_NAME_RE: Final = re.compile(r"[A-Za-z0-9:_\\-][A-Za-z0-9:_.\\-]*\.service")
_UNIT_NAME_MAX: Final = 255


def write_unit(path: Path, text: str) -> Path:
    """Write the unit (0644, as systemd expects), replacing an older one atomically."""
    name = path.name
    if len(name) > _UNIT_NAME_MAX or not _SERVICE_NAME_RE.fullmatch(name) or path.is_dir():
        raise UsageError(
            f"--output {str(path)!r} must name a file whose name systemd loads as a unit, "
            "such as nodeclient.service: ASCII letters, digits and : - _ . \\ only, not "
            "starting with a dot, ending in .service, at most 255 characters"
        )
    data = text.encode("utf-8")  # before the temp file: an encoding error leaves nothing
    # A temp name of its own (a unit's name may take all 255 bytes a file name has), hidden
    # so that systemd never loads it; removed on any error.
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".nodeclient-unit-", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # a unit file is public: mkstemp made it 0600
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:  # a full disk, an interrupt: leave no half-written file behind
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(exc, OSError):
            raise UsageError(f"cannot write {path}: {exc.strerror} (run as root?)") from exc
        raise
    return path


@dataclass(frozen=True, slots=True)
class HomeConfig:
    """What ``service install`` found of the unit home's config.toml at *path*: whether it
    *exists* (no: init is still to come), the *coordinator* it names, or the *problem*
    that keeps the daemon from using it. The unit's ExecStart= names no coordinator, so
    the daemon has only this one."""

    path: Path
    exists: bool
    coordinator: str | None = None
    problem: str | None = None


def read_home_config(home: Path) -> HomeConfig:
    """Read the coordinator from *home*'s config.toml, only to advise: the file belongs
    to the unit's user, not to root that runs ``service install``, so it is not loaded
    as the daemon loads it (which refuses a file it does not own); the daemon checks
    the rest at its start. Never blocks on a FIFO, never follows a symlink."""
    path = home / CONFIG_FILE
    try:
        raw = _read_regular_file(path)
    except FileNotFoundError:
        return HomeConfig(path, exists=False)
    except OSError as exc:
        why = "it is a symlink" if exc.errno == errno.ELOOP else f"cannot read it: {exc.strerror}"
        return HomeConfig(path, exists=True, problem=why)
    url, problem = _coordinator_in(raw)
    return HomeConfig(path, exists=True, coordinator=url, problem=problem)


def _read_regular_file(path: Path) -> bytes:
    """*path*'s first bytes (as many as a config.toml may hold, and one more); OSError
    for a symlink (ELOOP), anything but a regular file, or a failed read."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        return os.read(fd, MAX_CONFIG_BYTES + 1)
    finally:
        os.close(fd)


def _coordinator_in(raw: bytes) -> tuple[str | None, str | None]:
    """The coordinator a config.toml's text *raw* names, or why the daemon would find none
    it can use in it: (url, None), (None, None) where it names none, or (None, why)."""
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        return None, f"it is not valid TOML ({exc})"
    url = data.get("coordinator")
    if url is None:
        return None, None
    if not isinstance(url, str):
        return None, "coordinator must be a quoted string"
    try:
        check_coordinator_url(url)
    except UsageError as exc:
        return None, str(exc)
    return url, None


def coordinator_warning(found: HomeConfig, unit_path: Path) -> str | None:
    """What to tell the operator when the unit's daemon would find no coordinator in
    *found* (it would stop at every start, and systemd start it again every 10 s); None
    when it names one, or when init, among the next steps, is still to write it."""
    if not found.exists or (found.coordinator is not None and found.problem is None):
        return None
    what = f"{found.path} names no coordinator"
    if found.problem is not None:
        what = f"{found.path}: {found.problem}"
    return (
        f"{what}: the unit's daemon would stop at every start, and systemd start it again "
        f'every 10 s; set coordinator = "https://..." in it (the coordinator\'s URL) before '
        f"`systemctl enable --now {shlex.quote(unit_path.name)}`"
    )


def next_steps(path: Path, opts: UnitOptions, found: HomeConfig | None = None) -> list[str]:
    """What the operator runs after the unit is written (as root), quoted for the shell.

    *found*: the unit home's config.toml (default: read now). The daemon's coordinator
    can come only from there: init writes it, where the home has no config.toml yet; a
    config.toml that names none gets a step saying to set it."""
    found = read_home_config(opts.home) if found is None else found
    u, home, exe = (
        shlex.quote(opts.user),
        shlex.quote(str(opts.home)),
        shlex.quote(str(opts.executable)),
    )
    unit = shlex.quote(path.name)
    if not found.exists:
        setup = [
            f"  sudo -u {u} {exe} init --home {home} --wallet 0x... "
            "--coordinator https://...   # once"
        ]
    elif coordinator_warning(found, path) is not None:
        setup = [
            f'  # edit {shlex.quote(str(found.path))}: set coordinator = "https://..." (the '
            f"coordinator's URL), keeping its owner {u} and mode 0600"
        ]
    else:
        setup = []
    return [
        # A directory name that is not UTF-8 could not be printed to a UTF-8 terminal.
        f"wrote {path}" if _is_utf8(str(path)) else f"wrote {str(path)!r}",
        "next, as root:",
        f"  id {u} || useradd --system --home-dir {home} --shell /usr/sbin/nologin {u}",
        f"  install -d -m 0700 -o {u} -g {u} {home}",
        *setup,
        "  systemctl daemon-reload",
        f"  systemctl enable --now {unit}",
        f"  journalctl -u {unit} -f   # the daemon's JSON logs",
        f"  sudo -u {u} {exe} status --watch --home {home}",
    ]
