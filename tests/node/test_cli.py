"""The operator CLI on bad input: one line, non-zero exit, no traceback, nothing changed on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nodeclient.node.cli import main
from nodeclient.protocol import manifest as mf

WALLET = "0x1111111111111111111111111111111111111111"


def run_cli(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """The real console entry point in a child process, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "nodeclient.node.cli", *args],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, **(env or {})}, input=stdin,
    )  # fmt: skip


def snapshot(home: Path) -> dict[str, tuple[bytes, int]]:
    return {
        p.name: (p.read_bytes(), p.stat().st_mode) for p in sorted(home.iterdir()) if p.is_file()
    }


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    assert main(["init", "--home", str(h), "--wallet", WALLET, "--region", "eu-west"]) == 0
    return h


def test_init_then_manifest_json_verifies(home: Path, capsys) -> None:
    """`manifest --json` prints a manifest that the coordinator's verifier accepts."""
    capsys.readouterr()
    assert main(["manifest", "--home", str(home), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    v = mf.verify_manifest(m, chain_id=31337, now=m["issued_at"])
    assert v.wallet_address == WALLET
    assert m["region"] == "eu-west"
    assert "ai.inference" in m["workload_classes"]


def test_keys_show_json_lists_modes(home: Path, capsys) -> None:
    """`keys show --json` reports node_id, liveness address and each file at 0600."""
    capsys.readouterr()
    assert main(["keys", "show", "--home", str(home), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["node_id"] != info["liveness_address"]
    assert {f["mode"] for f in info["files"]} == {"0600"}
    assert info["rsa_fingerprint"].startswith("SHA256:")


def test_home_from_environment(tmp_path: Path) -> None:
    """$NODECLIENT_HOME is used when --home is absent."""
    h = tmp_path / "envhome"
    out = run_cli("init", "--wallet", WALLET, env={"NODECLIENT_HOME": str(h)})
    assert out.returncode == 0, out.stderr
    assert (h / "node.key").exists()
    assert (h.stat().st_mode & 0o777) == 0o700


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["init", "--wallet", "0x1234"], "wallet"),
        (["init", "--wallet", WALLET, "--region", "mars"], "invalid choice"),
        (["init", "--wallet", WALLET], "already"),
        (["keys", "bogus"], "invalid choice"),
        (["manifest", "--json", "--bogus"], "unrecognized"),
        (["proof", "--task-id", "x", "--node-id", WALLET, "/nonexistent"], "not a UUID"),
        (["run", "--coordinator", "ftp://x"], "http"),
        (["status"], "no node daemon is running"),
    ],
)
def test_bad_input_one_line_no_traceback_no_change(
    home: Path, args: list[str], needle: str
) -> None:
    """Each bad invocation exits non-zero with a one-line reason and leaves the home untouched."""
    before = snapshot(home)
    out = run_cli(*args, "--home", str(home)) if args[0] != "keys" else run_cli(*args)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert needle in out.stderr
    assert snapshot(home) == before


def test_loose_mode_refused_without_fixing(home: Path) -> None:
    """A 0644 key is refused by every command that loads it; the mode stays 0644."""
    (home / "liveness.key").chmod(0o644)
    before = snapshot(home)
    for cmd in (["manifest"], ["keys", "show"], ["keys", "rotate-liveness"]):
        out = run_cli(*cmd, "--home", str(home))
        assert out.returncode != 0
        assert "chmod 600" in out.stderr and "liveness.key" in out.stderr
        assert "Traceback" not in out.stderr
    assert snapshot(home) == before


def test_encrypted_home_needs_passphrase(tmp_path: Path) -> None:
    """--encrypt with a passphrase file; manifest works with the file and fails cleanly without."""
    h = tmp_path / "enc"
    pw = tmp_path / "pw"
    pw.write_text("correct horse battery staple\n")
    out = run_cli(
        "init", "--home", str(h), "--wallet", WALLET, "--encrypt", "--passphrase-file", str(pw)
    )
    assert out.returncode == 0, out.stderr
    assert (h / "node.key").read_text().lstrip().startswith("{")
    ok = run_cli("manifest", "--home", str(h), "--json", "--passphrase-file", str(pw))
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["node_id"]
    missing = run_cli("manifest", "--home", str(h), stdin="")
    assert missing.returncode != 0 and "passphrase" in missing.stderr
    assert "Traceback" not in missing.stderr
    wrong = tmp_path / "wrong"
    wrong.write_text("nope\n")
    bad = run_cli("manifest", "--home", str(h), "--passphrase-file", str(wrong))
    assert bad.returncode != 0 and "wrong passphrase" in bad.stderr
    env_ok = run_cli("manifest", "--home", str(h), env={"NODECLIENT_PASSPHRASE_FILE": str(pw)})
    assert env_ok.returncode == 0, env_ok.stderr


def test_rotate_liveness_keeps_node_id(home: Path, capsys) -> None:
    """rotate-liveness changes the liveness address only, and the new manifest still verifies."""
    capsys.readouterr()
    main(["keys", "show", "--home", str(home), "--json"])
    before = json.loads(capsys.readouterr().out)
    assert main(["keys", "rotate-liveness", "--home", str(home)]) == 0
    capsys.readouterr()
    main(["manifest", "--home", str(home), "--json"])
    m = json.loads(capsys.readouterr().out)
    assert m["node_id"] == before["node_id"]
    assert m["liveness_address"] != before["liveness_address"]
    mf.verify_manifest(m, chain_id=31337, now=m["issued_at"])


def test_config_typo_is_refused(home: Path) -> None:
    """An unknown key in config.toml is refused with the file named, not ignored."""
    cfg = home / "config.toml"
    cfg.write_text(cfg.read_text() + "max_paralel_subtasks = 1\n")
    out = run_cli("manifest", "--home", str(home))
    assert out.returncode != 0
    assert "unknown setting" in out.stderr and "config.toml" in out.stderr


def test_config_cannot_raise_parallelism(home: Path) -> None:
    """max_parallel_subtasks may lower the hardware bound but never raise it."""
    cfg = home / "config.toml"
    cfg.write_text(cfg.read_text() + "max_parallel_subtasks = 100000\n")
    out = run_cli("manifest", "--home", str(home))
    assert out.returncode != 0 and "max_parallel_subtasks" in out.stderr
