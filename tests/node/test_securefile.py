"""The node home and secret files: created 0700/0600 whatever the umask, refused when unsafe.

These tests run against the real filesystem in pytest's temporary directories. Where a
test needs a file owned by someone else it chowns one when running as root (as CI does)
and otherwise uses a system path that root owns.
"""

from __future__ import annotations

import os
import pwd
import re
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodeclient.errors import KeyFileError
from nodeclient.node.securefile import (
    describe_file,
    ensure_home,
    finish_secrets,
    read_secret,
    replace_secret,
    resolve_home,
    write_secret,
    write_secrets,
)
from tests.node.killed import run_killed, temps

OTHER_UID = 4242
SECRET = b"0x" + b"ab" * 32 + b"\n"


@pytest.fixture
def umask0() -> Iterator[None]:
    """Run with umask 0, the worst case for files created without an explicit mode."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir(mode=0o700)
    return path


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _plant(path: Path, data: bytes = SECRET, mode: int = 0o600) -> Path:
    """Create a file directly (not through the code under test) with an exact mode."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, data)
    os.close(fd)
    os.chmod(path, mode)
    return path


def _foreign_owned(path: Path, fallback: str) -> Path:
    """``path`` chowned to another uid when we are root; otherwise a path root owns."""
    if os.geteuid() == 0:
        os.chown(path, OTHER_UID, -1)
        return path
    return Path(fallback)


# --- resolve_home ---------------------------------------------------------------------


def test_resolve_home_prefers_the_command_line(tmp_path: Path) -> None:
    """--home wins over $NODECLIENT_HOME."""
    env = {"NODECLIENT_HOME": str(tmp_path / "env"), "HOME": str(tmp_path)}
    assert resolve_home(tmp_path / "cli", env) == tmp_path / "cli"


def test_resolve_home_uses_the_environment_next(tmp_path: Path) -> None:
    """Without --home, $NODECLIENT_HOME is used."""
    env = {"NODECLIENT_HOME": str(tmp_path / "env"), "HOME": str(tmp_path)}
    assert resolve_home(None, env) == tmp_path / "env"


def test_resolve_home_defaults_to_dot_nodeclient_in_home(tmp_path: Path) -> None:
    """With neither, the home is ~/.nodeclient, ~ taken from the given environment."""
    assert resolve_home(None, {"HOME": str(tmp_path)}) == tmp_path / ".nodeclient"


def test_an_empty_home_flag_is_refused_and_an_empty_environment_is_unset(
    tmp_path: Path,
) -> None:
    """`--home "$DIR"` with DIR unset must not fall back to another home (the default one,
    where a daemon may run already, or init would make a new node); an empty
    $NODECLIENT_HOME is unset, as is usual for environment variables."""
    from nodeclient.errors import UsageError

    env = {"NODECLIENT_HOME": str(tmp_path / "env"), "HOME": str(tmp_path)}
    with pytest.raises(UsageError, match="--home is empty"):
        resolve_home("", env)
    assert resolve_home(None, {"NODECLIENT_HOME": "", "HOME": str(tmp_path)}) == (
        tmp_path / ".nodeclient"
    )


def test_a_home_that_cannot_be_told_is_a_one_line_usage_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No $HOME and no passwd entry for this uid (a container's arbitrary uid): a usage
    error saying what to pass, not Path.home()'s RuntimeError and a traceback."""
    import pwd

    from nodeclient.errors import UsageError

    def no_entry(uid: int) -> pwd.struct_passwd:
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    monkeypatch.delenv("HOME", raising=False)
    with pytest.raises(UsageError, match="pass --home or set NODECLIENT_HOME"):
        resolve_home(None, {})


# --- ensure_home ----------------------------------------------------------------------


@pytest.mark.usefixtures("umask0")
def test_ensure_home_creates_mode_0700_even_with_umask_0(tmp_path: Path) -> None:
    """A created home is 0700 although the umask would allow 0777."""
    home = ensure_home(tmp_path / "a" / "home", create=True)
    assert stat.S_ISDIR(os.lstat(home).st_mode)
    assert _mode(home) == 0o700


def test_ensure_home_without_create_refuses_a_missing_home(tmp_path: Path) -> None:
    """A missing home is an error that says how to create it, and is not created."""
    with pytest.raises(KeyFileError, match="nodeclient init"):
        ensure_home(tmp_path / "missing", create=False)
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o722])
def test_ensure_home_refuses_group_or_other_writable(home: Path, mode: int) -> None:
    """A home others can write to is refused with the chmod fix, and left as it is."""
    os.chmod(home, mode)
    with pytest.raises(KeyFileError, match=f"mode {mode:04o}.*chmod 700 {re.escape(str(home))}"):
        ensure_home(home, create=True)
    assert _mode(home) == mode


def test_ensure_home_refuses_a_symlink(tmp_path: Path, home: Path) -> None:
    """A symlinked home is refused even though it points at a good directory."""
    link = tmp_path / "link"
    link.symlink_to(home)
    with pytest.raises(KeyFileError, match="symlink"):
        ensure_home(link, create=False)


def test_ensure_home_refuses_a_regular_file(tmp_path: Path) -> None:
    """A file where the home should be is refused, even with create=True."""
    not_a_dir = _plant(tmp_path / "home")
    with pytest.raises(KeyFileError, match="not a directory"):
        ensure_home(not_a_dir, create=True)


# What a refusal of another user's file or home says to do: as root, most likely the
# service user's home, to run as its owner (a chown to root would break the service);
# otherwise to chown it.
OWNER_FIX = (
    r"fix: run nodeclient as its owner \(sudo -u '#4242' nodeclient \.\.\.\), not as root"
    if os.geteuid() == 0
    else r"fix: chown \d+ "
)


def test_ensure_home_refuses_another_users_directory(home: Path) -> None:
    """A home owned by another uid is refused with the fix."""
    target = _foreign_owned(home, "/")
    with pytest.raises(KeyFileError, match=r"owned by uid \d+.*" + OWNER_FIX):
        ensure_home(target, create=False)


def test_as_root_a_service_users_home_is_to_be_used_as_that_user(tmp_path: Path) -> None:
    """Run as root on a home a named user owns (the service's), the fix names that
    user; run as anyone else, the fix is a chown to the user running it."""
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(home, nobody.pw_uid, nobody.pw_gid)
        expected = r"fix: run nodeclient as its owner \(sudo -u nobody nodeclient"
    else:
        home = Path("/")
        expected = rf"fix: chown {os.geteuid()} /"
    with pytest.raises(KeyFileError, match=expected):
        ensure_home(home, create=False)


def test_a_new_home_and_its_new_parents_are_0700_and_durable(
    tmp_path: Path, fsynced: list[str]
) -> None:
    """Under a umask that takes the owner's own bits (0277), every directory made for the
    home is exactly 0700 (a 0500 parent would refuse the next mkdir to anyone but root),
    and each one's name is fsynced into its parent: a crash after `init` printed the
    node_id must not lose the home."""
    home = tmp_path / "a" / "b" / "home"
    old = os.umask(0o277)
    try:
        ensure_home(home, create=True)
    finally:
        os.umask(old)
    for made in (home.parent.parent, home.parent, home):
        assert stat.S_IMODE(made.stat().st_mode) == 0o700, made
    assert fsynced == [str(tmp_path), str(tmp_path / "a"), str(tmp_path / "a" / "b")]


def test_a_parent_another_process_makes_meanwhile_is_taken_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two inits under one new parent race: the other makes the parent between our check
    and our mkdir of it. That level exists, so the home is made in it as usual (0700),
    rather than taken as made, which ended in a FileNotFoundError traceback; the other
    process's directory is left as it made it."""
    parent = tmp_path / "parent"
    real_mkdir = os.mkdir

    def racing_mkdir(path: str | os.PathLike[str], mode: int = 0o777) -> None:
        if Path(path) == parent and not parent.exists():
            real_mkdir(parent, 0o750)  # the other process wins the race
        real_mkdir(path, mode)

    monkeypatch.setattr(os, "mkdir", racing_mkdir)
    assert ensure_home(parent / "home", create=True) == parent / "home"
    assert _mode(parent / "home") == 0o700
    assert _mode(parent) == 0o750


# --- write_secret / write_secrets / replace_secret ------------------------------------


@pytest.mark.usefixtures("umask0")
def test_write_secret_creates_mode_0600_even_with_umask_0(home: Path) -> None:
    """The new file is 0600 and holds exactly the bytes given."""
    path = home / "node.key"
    write_secret(path, SECRET)
    assert _mode(path) == 0o600
    assert path.read_bytes() == SECRET


def test_write_secret_refuses_to_overwrite_and_cleans_up(home: Path) -> None:
    """An existing file keeps its bytes, and no temporary file is left behind."""
    path = _plant(home / "node.key", b"old\n")
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        write_secret(path, SECRET)
    assert path.read_bytes() == b"old\n"
    assert sorted(os.listdir(home)) == ["node.key"]


def test_write_secrets_is_all_or_nothing(home: Path) -> None:
    """When the second name is taken, the first file is taken back too."""
    taken = _plant(home / "b.key", b"keep\n")
    with pytest.raises(KeyFileError, match=r"b\.key"):
        write_secrets({home / "a.key": SECRET, taken: SECRET})
    assert sorted(os.listdir(home)) == ["b.key"]
    assert taken.read_bytes() == b"keep\n"


def test_write_secret_refuses_a_group_writable_directory(home: Path) -> None:
    """Secrets are not written into a directory others could swap them in."""
    os.chmod(home, 0o770)
    with pytest.raises(KeyFileError, match="chmod 700"):
        write_secret(home / "node.key", SECRET)
    assert os.listdir(home) == []


@pytest.mark.usefixtures("umask0")
def test_replace_secret_swaps_content_atomically(home: Path) -> None:
    """Replacing gives the new bytes in a 0600 file and leaves no temporary file."""
    path = _plant(home / "liveness.key", b"old\n")
    replace_secret(path, SECRET)
    assert path.read_bytes() == SECRET
    assert _mode(path) == 0o600
    assert os.listdir(home) == ["liveness.key"]


def test_replace_secret_removes_what_an_earlier_kill_left_of_the_same_name(
    home: Path, fsynced: list[str]
) -> None:
    """A replace killed before its rename leaves the new secret in `.NAME.BATCH.tmp`,
    never used and removed by nothing else. The next replace of that name removes such
    files, and syncs the directory after; another name's temporary file (an interrupted
    init's staging file) is not its to remove."""
    path = _plant(home / "liveness.key", b"old\n")
    _plant(home / ".liveness.key.0123456789abcdef.tmp", b"never used\n")
    other = _plant(home / ".payload.key.0123456789abcdef.tmp", b"staged\n")
    replace_secret(path, SECRET)
    assert path.read_bytes() == SECRET
    assert sorted(os.listdir(home)) == [other.name, "liveness.key"]
    assert fsynced[-1] == str(home)


def test_replace_secret_replaces_a_symlink_not_its_target(tmp_path: Path, home: Path) -> None:
    """A symlink at the name is replaced by a real file; what it pointed at is untouched."""
    victim = _plant(tmp_path / "victim", b"victim\n", 0o644)
    (home / "liveness.key").symlink_to(victim)
    replace_secret(home / "liveness.key", SECRET)
    assert victim.read_bytes() == b"victim\n"
    assert stat.S_ISREG(os.lstat(home / "liveness.key").st_mode)


# --- read_secret ----------------------------------------------------------------------


def test_read_secret_returns_the_bytes_of_a_safe_file(home: Path) -> None:
    """A 0600 regular file owned by us is read in full."""
    assert read_secret(_plant(home / "node.key")) == SECRET


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o601])
def test_read_secret_refuses_group_or_other_bits(home: Path, mode: int) -> None:
    """The refusal names the file, its mode and chmod 600, and changes nothing."""
    path = _plant(home / "node.key", mode=mode)
    with pytest.raises(KeyFileError) as info:
        read_secret(path)
    message = str(info.value)
    assert str(path) in message
    assert f"mode {mode:04o}" in message
    assert f"chmod 600 {path}" in message
    assert path.read_bytes() == SECRET
    assert _mode(path) == mode


def test_read_secret_says_who_can_read(home: Path) -> None:
    """The wording for 0644 says group/other can read the key."""
    path = _plant(home / "node.key", mode=0o644)
    with pytest.raises(KeyFileError, match="mode 0644 lets group/other read it; fix: chmod 600"):
        read_secret(path)


def test_read_secret_refuses_a_symlink(tmp_path: Path, home: Path) -> None:
    """A symlinked key is refused (O_NOFOLLOW), with the fix, though its target is 0600."""
    target = _plant(tmp_path / "real.key")
    link = home / "node.key"
    link.symlink_to(target)
    with pytest.raises(
        KeyFileError, match=f"{re.escape(str(link))}: it is a symlink.*replace it with the real"
    ):
        read_secret(link)
    assert os.path.islink(link)
    assert target.read_bytes() == SECRET


def test_read_secret_refuses_another_users_file(home: Path) -> None:
    """A key owned by another uid is refused with the chown fix."""
    path = _foreign_owned(_plant(home / "node.key"), "/etc/passwd")
    with pytest.raises(KeyFileError, match=r"owned by uid \d+.*" + OWNER_FIX):
        read_secret(path)


def test_read_secret_refuses_a_fifo_without_hanging(home: Path) -> None:
    """A FIFO planted as the key is refused (opening it must not block on a writer)."""
    path = home / "node.key"
    os.mkfifo(path, 0o600)
    with pytest.raises(KeyFileError, match="FIFO, not a regular file"):
        read_secret(path)


def test_read_secret_refuses_a_directory(home: Path) -> None:
    """A directory in place of the key is refused by name."""
    path = home / "node.key"
    path.mkdir(mode=0o700)
    with pytest.raises(KeyFileError, match="directory, not a regular file"):
        read_secret(path)


def test_read_secret_caps_the_size(home: Path) -> None:
    """A file bigger than the cap is refused before it is read."""
    path = _plant(home / "payload.key", b"x" * 101)
    with pytest.raises(KeyFileError, match="101 bytes"):
        read_secret(path, max_size=100)


def test_read_secret_missing_file_says_how_to_create_it(home: Path) -> None:
    """A missing key names the file and suggests init."""
    with pytest.raises(
        KeyFileError, match=f"no key file at {re.escape(str(home / 'node.key'))}.*init"
    ):
        read_secret(home / "node.key")


# --- describe_file --------------------------------------------------------------------


def test_describe_file_reports_a_good_file(home: Path) -> None:
    """A safe key is described with its octal mode, owner and ok=True."""
    info = describe_file(_plant(home / "node.key"))
    assert info["mode"] == "0600"
    assert info["owner_uid"] == os.geteuid()
    assert info["ok"] is True
    assert info["problem"] is None


def test_describe_file_reports_the_refusal_for_a_bad_file(home: Path) -> None:
    """An unsafe key is ok=False with the same words a load would use."""
    path = _plant(home / "node.key", mode=0o640)
    info = describe_file(path)
    assert info["mode"] == "0640"
    assert info["ok"] is False
    assert f"chmod 600 {path}" in str(info["problem"])


def test_describe_file_reports_a_missing_file(home: Path) -> None:
    """A missing key is exists=False, ok=False."""
    info = describe_file(home / "node.key")
    assert info["exists"] is False
    assert info["ok"] is False


# --- finish_secrets: a write_secrets killed while it gave the names --------------------------

NAMES = ("node.key", "liveness.key", "payload.key")


def _killed_write(home: Path, kill_at: int) -> None:
    """Run write_secrets of NAMES in a child that is SIGKILLed part way (tests/node/killed.py)."""
    run_killed(
        """
        from pathlib import Path
        from nodeclient.node.securefile import write_secrets
        home = Path(sys.argv[2])
        write_secrets({home / n: n.encode() * 4 for n in sys.argv[3:]})
        """,
        kill_at, str(home), *NAMES,
    )  # fmt: skip


def _listing(home: Path) -> dict[str, tuple[bytes, int, int]]:
    return {
        n: ((home / n).read_bytes(), os.lstat(home / n).st_ino, _mode(home / n))
        for n in sorted(os.listdir(home))
    }


@pytest.mark.parametrize("kill_at", [1, 2])
def test_finish_secrets_gives_the_names_a_kill_left_missing(home: Path, kill_at: int) -> None:
    """Killed between two links: the missing names come from the same batch's temporary
    files, every file holds what was written, 0600, and no temporary file is left."""
    _killed_write(home, kill_at)
    assert [n for n in NAMES if (home / n).exists()] == list(NAMES[:kill_at])
    assert len(temps(home)) == 3
    assert finish_secrets([home / n for n in NAMES]) == list(NAMES[kill_at:])
    assert sorted(os.listdir(home)) == sorted(NAMES)
    for name in NAMES:
        assert (home / name).read_bytes() == name.encode() * 4
        assert _mode(home / name) == 0o600
        assert os.lstat(home / name).st_nlink == 1


@pytest.mark.parametrize("kill_at", [0, 3])
def test_finish_secrets_removes_what_a_kill_before_or_after_the_links_left(
    home: Path, kill_at: int
) -> None:
    """Killed before the first link (no name) or after the last (all names): nothing to
    finish, and the leftover temporary files are removed; the names are kept as they are."""
    _killed_write(home, kill_at)
    assert len(temps(home)) == 3
    before = {n: (home / n).read_bytes() for n in NAMES if (home / n).exists()}
    assert finish_secrets([home / n for n in NAMES]) == []
    assert temps(home) == []
    assert {n: (home / n).read_bytes() for n in NAMES if (home / n).exists()} == before


def _lose_liveness_temp(home: Path) -> None:
    os.unlink(home / next(t for t in temps(home) if t.startswith(".liveness.key.")))


def _other_batch(home: Path) -> None:
    """The payload temporary file renamed into another batch."""
    old = next(t for t in temps(home) if t.startswith(".payload.key."))
    os.rename(home / old, home / ".payload.key.0123456789abcdef.tmp")


def _node_key_replaced(home: Path) -> None:
    """node.key is no longer the batch's file (same bytes, another inode)."""
    data = (home / "node.key").read_bytes()
    os.unlink(home / "node.key")
    _plant(home / "node.key", data)


def _node_key_symlink(home: Path) -> None:
    tmp = next(t for t in temps(home) if t.startswith(".node.key."))
    os.unlink(home / "node.key")
    os.symlink(tmp, home / "node.key")


def _liveness_temp_loose(home: Path) -> None:
    os.chmod(home / next(t for t in temps(home) if t.startswith(".liveness.key.")), 0o644)


@pytest.mark.parametrize(
    "spoil", [_lose_liveness_temp, _other_batch, _node_key_replaced, _node_key_symlink,
              _liveness_temp_loose],
)  # fmt: skip
def test_finish_secrets_refuses_what_it_cannot_prove(home: Path, spoil) -> None:
    """Some names given but the rest not provably from the same batch: refused, nothing
    changed, and the message names the mv that moves the files aside (never deleting)."""
    _killed_write(home, 1)
    spoil(home)
    before = _listing(home)
    with pytest.raises(KeyFileError) as info:
        finish_secrets([home / n for n in NAMES])
    message = str(info.value)
    assert "node.key is there but liveness.key and payload.key are not" in message
    assert "restore liveness.key and payload.key from a backup" in message
    aside = home / "interrupted-init"
    moved = " ".join(str(home / n) for n in ["node.key", *temps(home)])
    assert f"`mkdir -m 700 {aside} && mv {moved} {aside}/`" in message
    assert _listing(home) == before


def test_finish_secrets_never_replaces_a_name_given_meanwhile(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name that appears while finishing is not replaced (link, never rename over)."""
    _killed_write(home, 1)
    real_link = os.link

    def link(src: str, dst: str, **kwargs: object) -> None:
        if dst == "liveness.key" and not (home / dst).exists():
            _plant(home / dst, b"meanwhile\n")
        real_link(src, dst, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "link", link)
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        finish_secrets([home / n for n in NAMES])
    assert (home / "liveness.key").read_bytes() == b"meanwhile\n"
    assert (home / "node.key").read_bytes() == b"node.key" * 4


# --- forbid_core_dumps ------------------------------------------------------------------------

_DUMPABLE_AFTER = textwrap.dedent(
    """
    import ctypes, resource
    from nodeclient.node.securefile import forbid_core_dumps

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    PR_GET_DUMPABLE = 3
    print(prctl(PR_GET_DUMPABLE, 0, 0, 0, 0), *resource.getrlimit(resource.RLIMIT_CORE))
    forbid_core_dumps()
    print(prctl(PR_GET_DUMPABLE, 0, 0, 0, 0), *resource.getrlimit(resource.RLIMIT_CORE))
    """
)


def test_forbid_core_dumps_makes_the_process_undumpable_for_good() -> None:
    """In a child of its own: not dumpable (no core file, no ptrace, no /proc/PID/mem for
    others) and RLIMIT_CORE (0, 0), which nothing in the process can raise again."""
    proc = subprocess.run(
        [sys.executable, "-c", _DUMPABLE_AFTER],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    before, after = proc.stdout.splitlines()
    assert before.split()[0] == "1"  # a plain process starts dumpable
    assert after.split() == ["0", "0", "0"]
