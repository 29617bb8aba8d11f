"""The node home and secret files: created 0700/0600 whatever the umask, refused when unsafe.

These tests run against the real filesystem in pytest's temporary directories. Where a
test needs a file owned by someone else it chowns one when running as root (as CI does)
and otherwise uses a system path that root owns.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodeclient.errors import KeyFileError
from nodeclient.node.securefile import (
    describe_file,
    ensure_home,
    read_secret,
    replace_secret,
    resolve_home,
    write_secret,
    write_secrets,
)

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


def test_ensure_home_refuses_another_users_directory(home: Path) -> None:
    """A home owned by another uid is refused with the chown fix."""
    target = _foreign_owned(home, "/")
    with pytest.raises(KeyFileError, match=r"owned by uid \d+.*chown"):
        ensure_home(target, create=False)


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
    with pytest.raises(KeyFileError, match=r"owned by uid \d+.*fix: chown"):
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
