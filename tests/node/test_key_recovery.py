"""Getting a node home back into shape: an ``init`` killed part way, a lost liveness key.

The kills are real: ``nodeclient init`` runs in a child that SIGKILLs itself at a chosen
moment while the key files get their names, as a power cut or the OOM killer would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nodeclient.node import doctor, keys
from nodeclient.node.cli import main
from tests.node.killed import run_killed, temps

WALLET = "0x1111111111111111111111111111111111111111"
KEY_FILES = ("node.key", "liveness.key", "payload.key")


def killed_init(home: Path, kill_at: int, *args: str) -> None:
    """`nodeclient init --home H ...` in a child killed while the keys get their names."""
    run_killed(
        """
        from nodeclient.node.cli import main
        sys.exit(main(["init", *sys.argv[2:]]))
        """,
        kill_at, "--home", str(home), "--wallet", WALLET, *args,
    )  # fmt: skip


def listing(home: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(home.iterdir()) if p.is_file()}


def one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


# --- init killed while the key files get their names ------------------------------------------


@pytest.mark.parametrize("kill_at", [1, 2])
def test_init_killed_between_the_names_is_finished_by_running_it_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kill_at: int
) -> None:
    """The same init again names the rest from the killed one's staging files: the node
    keeps the node.key it had, every key is 0600, and no temporary file is left."""
    home = tmp_path / "home"
    killed_init(home, kill_at)
    given = [n for n in KEY_FILES if (home / n).exists()]
    assert given == list(KEY_FILES[:kill_at]) and len(temps(home)) == 3
    node_key = (home / "node.key").read_bytes()
    assert main(["init", "--home", str(home), "--wallet", WALLET]) == 0
    out = capsys.readouterr().out
    assert f"finished the interrupted init of {home}: kept its keys" in out
    assert f"named {' and '.join(KEY_FILES[kill_at:])} from its staging files" in out
    assert sorted(os.listdir(home)) == sorted([*KEY_FILES, "config.toml"])
    assert (home / "node.key").read_bytes() == node_key
    for name in KEY_FILES:
        assert (home / name).stat().st_mode & 0o777 == 0o600
    info = keys.key_info(home)  # all three load
    assert info.node_id in out and info.liveness_address in out


def test_an_encrypted_init_killed_between_the_names_is_finished_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With --encrypt the keystore node.key is kept as it is (no second passphrase asked)."""
    home = tmp_path / "home"
    pw = tmp_path / "pw"
    pw.write_text("correct horse battery staple\n")
    pw.chmod(0o600)
    killed_init(home, 1, "--encrypt", "--passphrase-file", str(pw))
    keystore = (home / "node.key").read_bytes()
    assert keystore.startswith(b"{")
    assert main(["init", "--home", str(home), "--wallet", WALLET, "--encrypt"]) == 0
    assert "finished the interrupted init" in capsys.readouterr().out
    assert (home / "node.key").read_bytes() == keystore
    assert keys.key_info(home).encrypted and temps(home) == []


@pytest.mark.parametrize("kill_at", [0, 3])
def test_init_removes_the_staging_files_a_kill_left(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kill_at: int
) -> None:
    """Killed before any name (a fresh init follows) or after all three (the init is
    finished): either way no `.NAME.*.tmp` file is left behind."""
    home = tmp_path / "home"
    killed_init(home, kill_at)
    assert len(temps(home)) == 3
    before = {n: (home / n).read_bytes() for n in KEY_FILES if (home / n).exists()}
    assert main(["init", "--home", str(home), "--wallet", WALLET]) == 0
    out = capsys.readouterr().out
    assert ("finished the interrupted init" in out) == (kill_at == 3)
    assert sorted(os.listdir(home)) == sorted([*KEY_FILES, "config.toml"])
    assert {n: (home / n).read_bytes() for n in before} == before


def test_init_that_cannot_be_finished_says_what_to_move_and_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A staging file gone: refused in one line, nothing changed; the mv it names moves
    the old node.key aside (kept, not deleted) and the next init starts over."""
    home = tmp_path / "home"
    killed_init(home, 1)
    os.unlink(home / next(t for t in temps(home) if t.startswith(".liveness.key.")))
    before = listing(home)
    assert main(["init", "--home", str(home), "--wallet", WALLET]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "node.key is there but liveness.key and payload.key are not" in line
    assert listing(home) == before
    command = line.split("`")[1]
    assert command.startswith("mkdir -m 700 ") and " && mv " in command
    subprocess.run(["sh", "-c", command], check=True)
    assert main(["init", "--home", str(home), "--wallet", WALLET]) == 0
    assert "initialised" in capsys.readouterr().out
    aside = home / "interrupted-init"
    assert (aside / "node.key").read_bytes() == before["node.key"]
    assert (home / "node.key").read_bytes() != before["node.key"]
    assert temps(home) == []


@pytest.mark.parametrize(
    ("flag", "value", "said"),
    [("--wallet", "0x12", "wallet_address"), ("--chain-id", "0", "chain_id must be")],
)
def test_an_init_refused_for_its_flags_makes_no_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str, said: str
) -> None:
    """A --wallet or --chain-id that config.toml could not hold is refused before the home
    is made: neither the home nor the parents it would have needed are left behind, to be
    found later as an empty node home."""
    home = tmp_path / "new" / "home"
    args = {"--wallet": WALLET, "--chain-id": "31337", flag: value}
    assert main(["init", "--home", str(home), *(w for kv in args.items() for w in kv)]) == 2
    assert said in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "new").exists()


# --- a lost or malformed liveness.key ---------------------------------------------------------


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    assert main(["init", "--home", str(h), "--wallet", WALLET]) == 0
    return h


@pytest.mark.parametrize("damage", ["missing", "malformed"])
def test_a_lost_liveness_key_is_replaced_by_rotate_liveness(
    home: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    """The refusal and doctor name `keys rotate-liveness`, which makes a new liveness.key
    (init would refuse: node.key and payload.key exist); node_id is unchanged after."""
    node_id = keys.node_id_of(home)
    if damage == "missing":
        (home / "liveness.key").unlink()
    else:
        (home / "liveness.key").write_text("0xnot-a-key\n")
    capsys.readouterr()
    assert main(["keys", "show", "--home", str(home)]) == 1
    assert "fix: run `nodeclient keys rotate-liveness`" in one_error_line(capsys.readouterr().err)
    check = doctor.check_key_files(home)
    assert check.level is doctor.Level.FAIL and "liveness.key" in check.summary
    assert f"nodeclient keys rotate-liveness --home {home}" in check.fix
    assert "nodeclient init" not in check.fix
    assert main(["keys", "rotate-liveness", "--home", str(home)]) == 0
    out = capsys.readouterr().out
    assert "new liveness key" in out and "missing or malformed" in out
    assert main(["keys", "show", "--home", str(home), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["node_id"] == node_id and shown["liveness_address"] in out
    assert doctor.check_key_files(home).level is doctor.Level.OK


def test_a_rotation_killed_before_its_rename_leaves_no_key_behind_once_run_again(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Killed between writing the new key and renaming it over liveness.key, a rotation
    leaves that key in its temporary file: a private key that never got the name. The
    next rotation removes it, so no `.liveness.key.*.tmp` stays in the home for good (init,
    which removes staging files, refuses an initialised home), and the key in use is the
    one that rotation made."""
    killed = textwrap.dedent(
        """
        import os, signal, sys
        os.rename = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
        from nodeclient.node.cli import main
        sys.exit(main(["keys", "rotate-liveness", "--home", sys.argv[1]]))
        """
    )
    proc = subprocess.run([sys.executable, "-c", killed, str(home)], capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip
    assert proc.returncode == -9, proc.stderr
    [left] = temps(home)
    assert left.startswith(".liveness.key.")
    unused = (home / left).read_bytes()
    before = (home / "liveness.key").read_bytes()
    capsys.readouterr()
    assert main(["keys", "rotate-liveness", "--home", str(home)]) == 0
    assert temps(home) == []
    assert (home / "liveness.key").read_bytes() not in (before, unused)
    assert f" -> {keys.load_liveness_key(home).address}\n" in capsys.readouterr().out
    assert doctor.check_key_files(home).level is doctor.Level.OK
