"""Every command a refusal or ``doctor`` prints as a fix names the real file when pasted.

The node home here holds a space, '#' and '?': unquoted, a shell splits such a path
into words, and a glob or a comment can make ``chmod`` act on other files. Each fix is
split the way a shell splits it (``shlex.split``) and must name exactly the file.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from nodeclient.errors import KeyFileError, UsageError
from nodeclient.node import config, doctor, keys, securefile
from nodeclient.node.cli import main

WALLET = "0x" + "11" * 20


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A home whose path a shell would split and glob."""
    return securefile.ensure_home(tmp_path / "node home #1?", create=True)


def _fix(message: str) -> list[str]:
    """The words of the command after "fix: ", as a shell reads them."""
    command = message.partition("; fix: ")[2]
    assert command, message
    return shlex.split(command)


def _commands(text: str) -> list[list[str]]:
    """The words of every `command` in *text*, as a shell reads them."""
    return [shlex.split(command) for command in re.findall(r"`([^`]*)`", text)]


def _with_uid(st: os.stat_result, uid: int) -> os.stat_result:
    fields = list(st)
    fields[4] = uid  # st_uid
    return os.stat_result(fields)


def test_a_key_file_open_to_others_is_refused_with_a_quoted_chmod(home: Path) -> None:
    """A key readable by others: the chmod in the refusal names that key."""
    path = home / "node.key"
    securefile.write_secret(path, b"0x" + b"ab" * 32 + b"\n")
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError) as caught:
        securefile.read_secret(path)
    assert _fix(str(caught.value)) == ["chmod", "600", str(path)]


def test_a_key_file_of_another_owner_is_refused_with_a_quoted_chown(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key owned by another uid: the chown in the refusal names that key (run as a
    user: as root, the fix is to run as the owner, test_securefile)."""
    path = home / "node.key"
    securefile.write_secret(path, b"0x" + b"ab" * 32 + b"\n")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    st = _with_uid(os.lstat(path), os.geteuid() + 1)
    problem = securefile.secret_problem(path, st)
    assert problem is not None
    assert _fix(problem)[:3] == ["chown", str(os.geteuid()), str(path)]


def test_a_home_others_can_write_is_refused_with_a_quoted_chmod(home: Path) -> None:
    """A group-writable home: the chmod in the refusal names the home."""
    os.chmod(home, 0o770)
    with pytest.raises(KeyFileError) as caught:
        securefile.ensure_home(home, create=False)
    assert _fix(str(caught.value)) == ["chmod", "700", str(home)]


def test_a_home_of_another_owner_is_refused_with_a_quoted_chown(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A home owned by another uid: the chown in the refusal names the home (run as a
    user: as root, the fix is to run as the owner, test_securefile)."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    st = _with_uid(os.lstat(home), os.geteuid() + 1)
    problem = securefile._home_problem(home, st)
    assert problem is not None
    assert _fix(problem)[:3] == ["chown", str(os.geteuid()), str(home)]


def test_a_config_others_can_write_is_refused_with_a_quoted_chmod(home: Path) -> None:
    """A group-writable config.toml: the chmod in the refusal names it."""
    path = config.write_config(home, config.NodeConfig(wallet_address=WALLET))
    os.chmod(path, 0o664)
    with pytest.raises(UsageError) as caught:
        config.load_config(home)
    assert _fix(str(caught.value))[:3] == ["chmod", "600", str(path)]


def test_a_config_of_another_owner_is_refused_with_a_quoted_chown(home: Path) -> None:
    """A config.toml owned by another uid: the chown in the refusal names it."""
    path = config.write_config(home, config.NodeConfig(wallet_address=WALLET))
    problem = config._config_problem(path, _with_uid(os.lstat(path), os.geteuid() + 1))
    assert problem is not None
    assert _fix(problem) == ["chown", str(os.geteuid()), str(path)]


def test_a_missing_config_names_the_home_in_its_init_command(home: Path) -> None:
    """No config.toml: the init command it suggests is for this home."""
    with pytest.raises(UsageError) as caught:
        config.load_config(home)
    (command,) = _commands(str(caught.value))
    assert command[:4] == ["nodeclient", "init", "--home", str(home)]


def test_doctor_fixes_name_the_files(home: Path) -> None:
    """doctor's key check: the chmod for a loose key, the rotate command for a lost
    liveness key, and (for an uninitialised home) the init command all name the real
    file or home."""
    keys.init_keys(home, passphrase=None)
    os.chmod(home / "node.key", 0o640)
    (home / keys.LIVENESS_KEY).unlink()
    (home / "payload.key").unlink()
    fixes = doctor.check_key_files(home).fix.split("; ")
    assert shlex.split(fixes[0]) == ["chmod", "600", str(home / "node.key")]
    assert _commands(fixes[1]) == [["nodeclient", "keys", "rotate-liveness", "--home", str(home)]]
    (init,) = _commands(fixes[2])
    assert init[:4] == ["nodeclient", "init", "--home", str(home)]


def test_doctor_fix_for_an_oversized_key_is_to_restore_it(home: Path) -> None:
    """A key file refused for its size, already mode 0600: a chmod would change
    nothing, so the fix is to restore the file, as a load's refusal says too."""
    keys.init_keys(home, passphrase=None)
    path = home / "payload.key"
    with path.open("ab") as f:
        f.write(b"x" * securefile.DEFAULT_MAX_SIZE)
    fix = doctor.check_key_files(home).fix
    assert "chmod" not in fix and fix == "move it away and restore the key file from backup"


def test_init_of_an_initialised_home_names_it_quoted(home: Path, capsys) -> None:
    """`init` on a home that has a config: the `keys show` it suggests is for this home."""
    assert main(["init", "--home", str(home), "--wallet", WALLET]) == 0
    capsys.readouterr()
    assert main(["init", "--home", str(home), "--wallet", WALLET]) == 2
    (command,) = _commands(capsys.readouterr().err)
    assert command == ["nodeclient", "keys", "show", "--home", str(home)]
