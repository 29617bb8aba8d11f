"""The operator CLI on bad input: one line, non-zero exit, no traceback, nothing changed on disk."""

from __future__ import annotations

import errno
import json
import os
import pwd
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

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
    assert {(f["owner_uid"], f["owner_name"]) for f in info["files"]} == {
        (os.geteuid(), pwd.getpwuid(os.geteuid()).pw_name)
    }
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
    # One line (argparse puts its usage, perhaps wrapped, above its own; `run` logs its
    # error as a JSON event too, for a reader of its log).
    said = [line for line in out.stderr.splitlines() if not line.startswith(("usage:", " ", "{"))]
    assert len(said) == 1 and needle in said[0], out.stderr
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
    pw.chmod(0o600)
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
    wrong.chmod(0o600)
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


def without_log_events(err: str) -> str:
    """stderr without the JSON log's events: `run` logs the error that stops it as one
    (daemon.fatal) besides its line."""
    return "".join(line for line in err.splitlines(keepends=True) if not line.startswith("{"))


def one_error_line(err: str) -> str:
    """stderr holds exactly one line, the error, and no traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("nodeclient: error: "), err
    return lines[0]


# --- unstake: whatever the coordinator (or a proxy in front of it) answers -------------------


class _Answer(BaseHTTPRequestHandler):
    answer: tuple[int, str, bytes] = (200, "application/json", b"{}")
    received: list[bytes] = []  # noqa: RUF012 (the requests' bodies, newest last)

    def do_POST(self) -> None:
        self.received.append(self.rfile.read(int(self.headers.get("content-length", 0))))
        status, kind, body = self.answer
        self.send_response(status)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def coordinator(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[int, str, bytes], str]]:
    """A local HTTP server; calling the fixture sets its next answer and returns its URL."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def answer(status: int, kind: str, body: bytes) -> str:
        _Answer.answer = (status, kind, body)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield answer
    server.shutdown()
    server.server_close()


HTML_502 = b"<html>\n<head><title>502 Bad Gateway</title></head>\n<body>nginx</body>\n</html>\n"


@pytest.mark.parametrize(
    ("status", "kind", "body", "needles"),
    [
        (502, "text/html", HTML_502, ["HTTP 502", "non-JSON (text/html)", "--coordinator"]),
        (200, "text/html", HTML_502, ["HTTP 200", "non-JSON", "--coordinator"]),
        (200, "application/json", b"[1, 2]", ["HTTP 200", "not an object"]),
        (200, "application/json", b'{"node_id": "0x"}', ["unstaking_until", "nodeclient status"]),
        (200, "application/json", b'{"unstaking_until": "soon"}', ["unstaking_until", "soon"]),
        (200, "application/json", b'{"unstaking_until": 1e300}', ["unstaking_until"]),
        (409, "application/json", b'{"error": "not\\nregistered"}', ["(409)", "not registered"]),
    ],
    ids=["proxy-502-html", "200-html", "not-object", "no-field", "str-field", "huge", "409"],
)
def test_unstake_bad_answer_is_one_line(
    home: Path,
    coordinator: Callable[[int, str, bytes], str],
    capsys: pytest.CaptureFixture[str],
    status: int,
    kind: str,
    body: bytes,
    needles: list[str],
) -> None:
    """An HTML error page, a non-object or a missing/odd unstaking_until: one line, exit 2."""
    url = coordinator(status, kind, body)
    capsys.readouterr()
    assert main(["unstake", "--home", str(home), "--coordinator", url]) == 2
    out = capsys.readouterr()
    line = one_error_line(out.err)
    assert "<html>" not in line
    for needle in needles:
        assert needle in line
    assert out.out == ""


def test_unstake_accepted_prints_cooldown_end(
    home: Path, coordinator: Callable[[int, str, bytes], str], capsys: pytest.CaptureFixture[str]
) -> None:
    """The coordinator's 200 with unstaking_until is shown as a UTC date."""
    url = coordinator(200, "application/json", b'{"node_id": "x", "unstaking_until": 4102444800}')
    assert main(["unstake", "--home", str(home), "--coordinator", url]) == 0
    assert "the 7-day cooldown ends at 2100-01-01 00:00:00 UTC" in capsys.readouterr().out


def test_unstake_after_the_cooldown_says_the_node_is_retired(
    home: Path, coordinator: Callable[[int, str, bytes], str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Unstaked before, and its cooldown is over: the coordinator answers with the old end,
    and the command says the node is retired rather than that a cooldown starts."""
    url = coordinator(200, "application/json", b'{"node_id": "x", "unstaking_until": 0}')
    assert main(["unstake", "--home", str(home), "--coordinator", url]) == 0
    out = capsys.readouterr().out
    assert "cooldown ended at 1970-01-01 00:00:00 UTC: this node is retired" in out
    assert "cooldown ends at" not in out


def test_unstake_runs_on_the_daemons_clock(
    home: Path,
    tmp_path: Path,
    coordinator: Callable[[int, str, bytes], str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With the --clock-file testing aid (the daemon's and the coordinator's clock in the
    end-to-end tests), the signed requested_at and the "cooldown over" check use it."""
    import json
    import time

    offset = 8 * 86400.0
    clock_file = tmp_path / "clock"
    clock_file.write_text(str(offset))
    ends = int(time.time()) + 86400  # tomorrow on the system clock, past on this one
    url = coordinator(200, "application/json", json.dumps({"unstaking_until": ends}).encode())
    _Answer.received.clear()
    args = ["unstake", "--home", str(home), "--coordinator", url, "--clock-file", str(clock_file)]
    assert main(args) == 0
    assert "this node is retired" in capsys.readouterr().out
    sent = json.loads(_Answer.received[-1])["message"]["requested_at"]
    assert abs(sent - (time.time() + offset)) < 60


# --- run: an outbox that cannot be opened ------------------------------------------------------


@pytest.fixture
def runnable(home: Path) -> Path:
    """A home whose `run` gets as far as the outbox without bubblewrap (it fails there)."""
    cfg = home / "config.toml"
    cfg.write_text(cfg.read_text().replace("allow_unsandboxed = false", "allow_unsandboxed = true"))
    return home


def run_node(home: Path, *, inject: str = "") -> subprocess.CompletedProcess[str]:
    """`nodeclient run` in a child process; *inject* is code run first (fault injection)."""
    code = (
        f"import sys\n{inject}\nfrom nodeclient.node.cli import main\n"
        f"sys.exit(main(['run', '--home', {str(home)!r}, '--coordinator', 'http://127.0.0.1:9']))"
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )


def error_lines(err: str) -> list[str]:
    """The CLI's own lines on stderr (the daemon's JSON log events aside), no traceback."""
    assert "Traceback" not in err, err
    return [ln for ln in err.splitlines() if ln.startswith("nodeclient: ")]


def test_run_damaged_outbox_is_one_line_and_kept(runnable: Path) -> None:
    """A corrupt outbox.db: one line saying to move it aside (never delete), exit 78, file kept."""
    garbage = b"not a database, but maybe someone's signed results " * 200
    (runnable / "outbox.db").write_bytes(garbage)
    out = run_node(runnable)
    assert out.returncode == 78  # NeedsOperator: the systemd unit does not restart on 78
    (line,) = error_lines(out.stderr)
    assert "outbox.db is damaged" in line and "mv " in line and "never delete" in line
    assert (runnable / "outbox.db").read_bytes() == garbage


def test_run_with_an_outbox_of_a_newer_release_is_exit_78_and_kept(runnable: Path) -> None:
    """An outbox a newer release wrote: one line saying to upgrade, exit 78 (not restarted:
    starting again cannot help), the file untouched."""
    import sqlite3

    from nodeclient.node.outbox import FORMAT_VERSION

    db = sqlite3.connect(runnable / "outbox.db")
    db.execute(f"PRAGMA user_version = {FORMAT_VERSION + 1}")
    db.close()
    before = (runnable / "outbox.db").read_bytes()
    out = run_node(runnable)
    assert out.returncode == 78
    (line,) = error_lines(out.stderr)
    assert "written by a newer nodeclient" in line and "Upgrade nodeclient" in line
    assert (runnable / "outbox.db").read_bytes() == before


def test_run_outbox_unopenable_is_one_line(runnable: Path) -> None:
    """SQLite cannot open outbox.db (here: it is a directory): one line naming it, exit 1."""
    (runnable / "outbox.db").mkdir()
    out = run_node(runnable)
    assert out.returncode == 1
    (line,) = error_lines(out.stderr)
    assert f"cannot open {runnable / 'outbox.db'}" in line and "writable" in line


# No temporary directory can be written (/tmp full or read-only, TMPDIR unset): what
# Python's tempfile then finds, for real, with its list of candidates narrowed to one
# that cannot be used.
NO_TMP = (
    "import tempfile\n"
    "tempfile.tempdir = None\n"
    "tempfile._candidate_tempdir_list = lambda: ['/nonexistent/nodeclient-no-tmp']\n"
)


def test_run_without_a_writable_temporary_directory_is_one_line(runnable: Path) -> None:
    """/tmp full (or read-only): `run` says so in one line and exits 1 (systemd retries
    it), where it printed FileNotFoundError's traceback."""
    out = run_node(runnable, inject=NO_TMP)
    assert out.returncode == 1, out.stderr
    (line,) = error_lines(out.stderr)
    assert "no directory for task work can be written" in line and "set TMPDIR" in line


def test_manifest_without_a_writable_temporary_directory_is_one_line(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.setattr(tempfile, "_candidate_tempdir_list", lambda: ["/nonexistent/no-tmp"])
    capsys.readouterr()
    assert main(["manifest", "--home", str(home), "--json"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("nodeclient: error: no directory for task work can be written")
    assert err.count("\n") == 1


def test_run_outbox_disk_full_is_one_line(runnable: Path) -> None:
    """ENOSPC while the outbox opens: one line saying to free space, exit 1 (systemd retries)."""
    inject = (
        "import errno, os\n"
        "real_open = os.open\n"
        "def full(path, *a, **k):\n"
        "    if str(path).endswith('outbox.db.lock'):\n"
        "        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))\n"
        "    return real_open(path, *a, **k)\n"
        "os.open = full\n"
    )
    out = run_node(runnable, inject=inject)
    assert out.returncode == 1
    (line,) = error_lines(out.stderr)
    assert "outbox.db" in line and "No space left on device" in line and "free some space" in line


# --- status: a daemon that is busy, or gone --------------------------------------------------


def test_status_busy_daemon_times_out_in_one_line(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A daemon that accepts but does not answer within the timeout: one line, exit 1."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(home / "control.sock"))
    listener.listen(1)  # never accepted: connect succeeds, the answer never comes
    try:
        capsys.readouterr()
        assert main(["status", "--home", str(home)]) == 1
    finally:
        listener.close()
    line = one_error_line(capsys.readouterr().err)
    assert "did not answer within 5 s" in line and "busy" in line and "logs" in line


def test_status_stale_socket_says_no_daemon(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A socket file left by a killed daemon (nothing listens): the usual 'no daemon' line."""
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(home / "control.sock"))
    dead.listen(1)
    dead.close()  # the file stays, as after kill -9
    assert (home / "control.sock").is_socket()
    capsys.readouterr()
    assert main(["status", "--home", str(home)]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "no node daemon is running" in line and "nodeclient run" in line


# --- config.toml: a value of the wrong type --------------------------------------------------


def set_config(home: Path, key: str, line: str) -> None:
    """Replace *key*'s line in config.toml (or add it) with *line*."""
    cfg = home / "config.toml"
    kept = [ln for ln in cfg.read_text().splitlines() if not ln.startswith(f"{key} =")]
    cfg.write_text("\n".join([*kept, line]) + "\n")


@pytest.mark.parametrize(
    ("key", "value", "expected", "got"),
    [
        ("coordinator", "5", "a quoted string", "an integer"),
        ("region", "[]", "a quoted string", "an array"),
        ("wallet_address", "0x1111111111111111111111111111111111111111", "a quoted", "an integer"),
        ("chain_id", '"31337"', "an integer", "a string"),
        ("heartbeat_interval", '"30"', "a number", "a string"),
        ("heartbeat_interval", "true", "a number", "a boolean"),
        ("allow_unsandboxed", '"yes"', "true or false", "a string"),
        ("max_parallel_subtasks", "1.5", "an integer", "a float"),
        ("metrics_address", "9101", "a quoted string", "an integer"),
        ("result_retention_hours", "{ h = 1 }", "a number", "a table"),
        ("result_retention_mb", "1979-05-27", "an integer", "a date/time"),
    ],
)
def test_config_wrong_type_is_one_line(
    home: Path, capsys: pytest.CaptureFixture[str], key: str, value: str, expected: str, got: str
) -> None:
    """A value of the wrong TOML type names the file, the key and the type it must be; exit 2."""
    set_config(home, key, f"{key} = {value}")
    capsys.readouterr()
    assert main(["manifest", "--home", str(home)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(home / "config.toml") in line
    assert f"{key} must be {expected}" in line and f"not {got}" in line


@pytest.mark.parametrize("value", ["0", str(2**63), str(2**256)])
def test_a_chain_id_out_of_range_is_one_line(
    home: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    """A chain id of 0 or past 63 bits (the link's Challenge and SQL) is refused when the
    config is read, not met as an OverflowError at the first signature."""
    set_config(home, "chain_id", f"chain_id = {value}")
    capsys.readouterr()
    assert main(["manifest", "--home", str(home)]) == 2
    assert "chain_id must be a positive integer below 2**63" in one_error_line(
        capsys.readouterr().err
    )


# --- init: atomic config, and an interrupted init can be finished ----------------------------


def test_init_finishes_after_keys_without_config(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Keys but no config.toml (init killed between them): init again keeps the keys, writes it."""
    capsys.readouterr()
    assert main(["keys", "show", "--home", str(home), "--json"]) == 0
    node_id = json.loads(capsys.readouterr().out)["node_id"]
    (home / "config.toml").unlink()
    keys_before = {n: b for n, b in snapshot(home).items() if n.endswith(".key")}
    assert main(["init", "--home", str(home), "--wallet", WALLET, "--region", "us-east"]) == 0
    out = capsys.readouterr().out
    assert "kept its keys" in out and node_id in out
    assert {n: b for n, b in snapshot(home).items() if n.endswith(".key")} == keys_before
    cfg = home / "config.toml"
    assert (cfg.stat().st_mode & 0o777) == 0o600
    assert 'region = "us-east"' in cfg.read_text()
    assert main(["manifest", "--home", str(home), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["node_id"] == node_id


def test_init_resume_refuses_encrypt_over_plaintext_key(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Finishing an init with --encrypt over a plaintext node.key is refused, nothing written."""
    (home / "config.toml").unlink()
    before = snapshot(home)
    capsys.readouterr()
    assert main(["init", "--home", str(home), "--wallet", WALLET, "--encrypt"]) == 2
    assert "without --encrypt" in one_error_line(capsys.readouterr().err)
    assert snapshot(home) == before


def test_init_disk_full_at_config_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """ENOSPC while config.toml is written: one line, no config.toml at all; init again works."""
    h = tmp_path / "home"
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if "config.toml" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert main(["init", "--home", str(h), "--wallet", WALLET]) != 0
    line = one_error_line(capsys.readouterr().err)
    assert "No space left on device" in line and "run the same `nodeclient init` again" in line
    assert sorted(p.name for p in h.iterdir()) == ["liveness.key", "node.key", "payload.key"]
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert main(["init", "--home", str(h), "--wallet", WALLET]) == 0
    assert "kept its keys" in capsys.readouterr().out
    assert (h / "config.toml").stat().st_mode & 0o777 == 0o600


# --- init: a passphrase file without --encrypt ---------------------------------------------------


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_init_refuses_a_passphrase_file_without_encrypt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    """A passphrase file, by flag or by $NODECLIENT_PASSPHRASE_FILE, without --encrypt would
    be ignored and node.key written in plaintext: exit 2, one line naming --encrypt, and
    not even the home is created."""
    pw = tmp_path / "pw"
    pw.write_text("correct horse battery staple\n")
    pw.chmod(0o600)
    h = tmp_path / "home"
    extra = ["--passphrase-file", str(pw)] if how == "flag" else []
    if how == "environment":
        monkeypatch.setenv("NODECLIENT_PASSPHRASE_FILE", str(pw))
    assert main(["init", "--home", str(h), "--wallet", WALLET, *extra]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "without --encrypt" in line or "--encrypt is not given" in line
    assert "add --encrypt" in line and "plaintext" in line
    assert not h.exists()


def test_init_with_the_passphrase_variable_emptied_writes_plaintext(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NODECLIENT_PASSPHRASE_FILE= (empty) counts as unset: a plaintext init, as asked."""
    monkeypatch.setenv("NODECLIENT_PASSPHRASE_FILE", "")
    h = tmp_path / "home"
    assert main(["init", "--home", str(h), "--wallet", WALLET]) == 0
    assert (h / "node.key").read_text().startswith("0x")


# --- core dumps: no command that holds a key can leave it in a core file -----------------------

_DUMPABLE_AFTER_EACH = """
import contextlib, ctypes, io, json, resource, sys
from nodeclient.node.cli import main

prctl = ctypes.CDLL(None).prctl
PR_GET_DUMPABLE, PR_SET_DUMPABLE = 3, 4
seen = {}
for argv in json.loads(sys.argv[1]):
    prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)  # each command must take it away by itself
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        main(argv)
    seen[argv[0] if argv[0] != "keys" else " ".join(argv[:2])] = prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)
print(json.dumps({"dumpable": seen, "core": resource.getrlimit(resource.RLIMIT_CORE)}))
"""

HOLDS_KEYS = {
    "init", "keys show", "keys rotate-liveness", "manifest", "run", "unstake", "wallet-proof",
    "doctor",
}  # fmt: skip


def test_every_command_that_holds_a_key_is_undumpable(tmp_path: Path) -> None:
    """In one child: after each command that reads or makes a key (run and doctor cut
    short: the protection comes before anything else) the process is not dumpable and
    RLIMIT_CORE is (0, 0); `status`, which holds none, is left alone."""
    h = str(tmp_path / "home")
    commands = [
        ["init", "--home", h, "--wallet", WALLET],
        ["keys", "show", "--home", h],
        ["keys", "rotate-liveness", "--home", h],
        ["manifest", "--home", h, "--json"],
        ["wallet-proof", "--home", h, "--json"],
        ["unstake", "--home", h, "--coordinator", "http://127.0.0.1:9"],
        ["run", "--home", h, "--coordinator", "ftp://x"],
        ["doctor", "--home", str(tmp_path / "absent")],
        ["status", "--home", h],
    ]
    proc = subprocess.run(
        [sys.executable, "-c", _DUMPABLE_AFTER_EACH, json.dumps(commands)],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    result = json.loads(proc.stdout)
    assert result["dumpable"] == {**dict.fromkeys(HOLDS_KEYS, 0), "status": 1}
    assert result["core"] == [0, 0]


def test_only_commands_without_keys_are_left_dumpable() -> None:
    """Every command is either marked as holding keys or is one that never reads one: a
    new command has to be put on one side or the other."""
    from argparse import _SubParsersAction

    from nodeclient.node.cli import build_parser

    def commands(parser, prefix: str = "") -> dict[str, bool]:
        found: dict[str, bool] = {}
        for action in parser._actions:
            if isinstance(action, _SubParsersAction):
                for name, sub in action.choices.items():
                    nested = commands(sub, f"{prefix}{name} ")
                    found |= nested or {prefix + name: bool(sub.get_default("holds_keys"))}
        return found

    marked = commands(build_parser())
    assert {c for c, holds in marked.items() if holds} == HOLDS_KEYS
    assert {c for c, holds in marked.items() if not holds} == {
        "status", "history", "devnet", "proof", "service install",
    }  # fmt: skip


# --- the coordinator URL: checked once, where it is read -------------------------------------


MALFORMED_URL = "http://[::1"  # httpx.InvalidURL, which is not an httpx.HTTPError


@pytest.mark.parametrize("command", ["unstake", "doctor", "run"])
def test_malformed_coordinator_flag_is_one_line(
    home: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """--coordinator 'http://[::1' is a one-line usage error naming the flag, exit 2."""
    capsys.readouterr()
    assert main([command, "--home", str(home), "--coordinator", MALFORMED_URL]) == 2
    line = one_error_line(without_log_events(capsys.readouterr().err))
    assert f"--coordinator {MALFORMED_URL!r} is not a valid URL" in line


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        (MALFORMED_URL, "is not a valid URL"),
        ("ftp://coordinator.example.net", "must be an http:// or https:// URL"),
        ("ws://coordinator.example.net", "must be an http:// or https:// URL"),
        ("http://", "has no host name"),
        ("https://coordinator.example.net:99999", "port 99999"),
        # The daemon appends /v1/nodes and /v1/link as text: a query or fragment would
        # swallow them; a user:password would show in status and logs.
        ("https://coordinator.example.net/#x", "no query (?) or fragment (#)"),
        ("https://coordinator.example.net/?a=1", "no query (?) or fragment (#)"),
        ("https://user:pw@coordinator.example.net", "must not carry a user name or password"),
        ("https://coordinator.example.net/a b", "quote, backslash, space or control"),
    ],
)
def test_malformed_coordinator_in_config_is_one_line(
    home: Path, capsys: pytest.CaptureFixture[str], url: str, needle: str
) -> None:
    """A bad `coordinator =` in config.toml is refused when the file is read, naming it."""
    set_config(home, "coordinator", f'coordinator = "{url}"')
    capsys.readouterr()
    assert main(["doctor", "--home", str(home)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(home / "config.toml") in line and f"coordinator {url!r}" in line and needle in line


@pytest.mark.parametrize(
    ("answer", "code"), [({"state": "READY", "link": "up"}, 0), ({"error": "internal"}, 1)]
)
def test_status_json_exits_non_zero_on_an_error_answer(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    answer: dict, code: int,
) -> None:  # fmt: skip
    """`status --json` prints the daemon's answer as it came; an error answer (no state)
    exits 1, as the text form does (before, 0: a script saw a broken daemon as fine)."""
    from nodeclient.node import control

    monkeypatch.setattr(control, "request", lambda *a, **kw: answer)
    assert main(["status", "--home", str(home), "--json"]) == code
    assert json.loads(capsys.readouterr().out) == answer


def test_coordinator_flag_replaces_a_good_config_value(home: Path) -> None:
    """A valid --coordinator is used as given (trailing slash dropped), else config.toml's."""
    from nodeclient.node.cli import build_parser
    from nodeclient.node.cli_options import coordinator_option
    from nodeclient.node.config import NodeConfig

    config = NodeConfig(wallet_address=WALLET, coordinator="https://a.example.net/")
    flag = build_parser().parse_args(["unstake", "--coordinator", "http://[::1]:8000/"])
    assert coordinator_option(flag, config) == "http://[::1]:8000"
    plain = build_parser().parse_args(["unstake"])
    assert coordinator_option(plain, config) == "https://a.example.net"


# --- run --heartbeat-interval: the config file's range, 0 included ----------------------------


@pytest.mark.parametrize("value", ["0", "-1", "0.001", "nan", "inf", "301"])
def test_run_heartbeat_interval_out_of_range_is_refused(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    """--heartbeat-interval outside 0.05..300 s (0 too: not 'unset') is refused before start."""
    from nodeclient.node import daemon

    def must_not_start(**_: object) -> None:
        raise AssertionError("the daemon started with a bad --heartbeat-interval")

    monkeypatch.setattr(daemon, "NodeDaemon", must_not_start)
    capsys.readouterr()
    args = ["run", "--home", str(home), "--coordinator", "http://127.0.0.1:9"]
    assert main([*args, "--heartbeat-interval", value]) == 2
    line = one_error_line(without_log_events(capsys.readouterr().err))
    assert "--heartbeat-interval must be between 0.05 and 300 seconds" in line


def test_run_heartbeat_interval_flag_or_config() -> None:
    """The flag wins when given, checked as config.toml's is; absent, config.toml's is used."""
    from nodeclient.node.cli import build_parser
    from nodeclient.node.cli_options import checked_heartbeat_interval
    from nodeclient.node.config import NodeConfig

    config = NodeConfig(wallet_address=WALLET, heartbeat_interval=12.5)
    given = build_parser().parse_args(["run", "--heartbeat-interval", "0.05"])
    assert checked_heartbeat_interval(given, config) == 0.05
    assert checked_heartbeat_interval(build_parser().parse_args(["run"]), config) == 12.5


# --- init --encrypt: Ctrl-D at the passphrase prompt ------------------------------------------


def test_init_encrypt_end_of_input_at_prompt_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-D at the terminal prompt (getpass raises EOFError): one line, exit 2, no keys."""
    import getpass
    import io

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    def ctrl_d(prompt: str = "") -> str:
        raise EOFError

    monkeypatch.setattr(sys, "stdin", Terminal())
    monkeypatch.setattr(getpass, "getpass", ctrl_d)
    h = tmp_path / "enc"
    assert main(["init", "--home", str(h), "--wallet", WALLET, "--encrypt"]) == 2
    assert one_error_line(capsys.readouterr().err) == "nodeclient: error: no passphrase entered"
    assert not any(h.iterdir())


# --- keys show: mode and owner of each file ---------------------------------------------------


def test_keys_show_prints_each_files_mode_and_owner(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The text output names each key file with its mode and its owner (name and uid)."""
    import pwd

    me = f"{pwd.getpwuid(os.geteuid()).pw_name} (uid {os.geteuid()})"
    capsys.readouterr()
    assert main(["keys", "show", "--home", str(home)]) == 0
    out = capsys.readouterr().out
    for name in ("node.key", "liveness.key", "payload.key"):
        assert f"{home / name}  mode 0600  owner {me}" in out


def test_a_keystore_without_an_address_is_shown_and_bound_with_its_passphrase(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A keystore need not carry its address (eth-account's and geth's do; others may
    not): `keys show` and `wallet-proof` take --passphrase-file and decrypt it to learn
    the node_id, where before they could only fail."""
    from eth_account import Account

    secret = bytes.fromhex("4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318")
    keystore = Account.encrypt(secret, "pass phrase", kdf="scrypt", iterations=1 << 12)
    del keystore["address"]
    (home / "node.key").write_text(json.dumps(keystore))
    pw = home.parent / "pw"
    pw.write_text("pass phrase\n")
    pw.chmod(0o600)
    node_id = Account.from_key(secret).address
    capsys.readouterr()
    assert main(["keys", "show", "--home", str(home), "--json"]) == 2  # no passphrase here
    assert "no passphrase was given: pass --passphrase-file FILE" in capsys.readouterr().err
    assert main(["keys", "show", "--home", str(home), "--passphrase-file", str(pw), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["node_id"] == node_id
    assert main(["wallet-proof", "--home", str(home), "--passphrase-file", str(pw), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["message"]["node_id"] == node_id


@pytest.mark.parametrize(
    ("module", "args", "where"),
    [
        ("nodeclient.node.cli", ["keys", "show"], "/dev/full"),
        ("nodeclient.node.cli", ["manifest", "--json"], "/dev/full"),
        ("nodeclient.node.cli", ["keys", "show"], "closed"),
        ("nodeclient.coordinator.cli", ["token", "new", "--file", "{tmp}/t.tok"], "/dev/full"),
        # argparse prints these itself and ignores a failed write
        ("nodeclient.node.cli", ["--version"], "/dev/full"),
        ("nodeclient.node.cli", ["proof", "--help"], "/dev/full"),
        ("nodeclient.coordinator.cli", ["serve", "--help"], "/dev/full"),
    ],
)
def test_output_that_cannot_be_written_is_one_line(
    home: Path, tmp_path: Path, module: str, args: list[str], where: str
) -> None:
    """stdout on a full disk (/dev/full) or closed (>&-): one line saying the output could
    not be written, exit 1, no traceback; what the command did stays done (the token is
    in its file)."""
    argv = [sys.executable, "-m", module, *(a.replace("{tmp}", str(tmp_path)) for a in args)]
    env = {**os.environ, "NODECLIENT_HOME": str(home)}
    if where == "closed":
        out = subprocess.run(["bash", "-c", '"$@" >&-', "-", *argv], capture_output=True,
                             text=True, timeout=120, check=False, env=env)  # fmt: skip
    else:
        with open(where, "w") as full:
            out = subprocess.run(argv, stdout=full, stderr=subprocess.PIPE, text=True,
                                 timeout=120, check=False, env=env)  # fmt: skip
    why = "stdout is closed" if where == "closed" else "No space left on device"
    assert out.returncode == 1, out.stderr
    assert out.stderr.endswith(f"error: cannot write the output: {why}\n"), out.stderr
    assert out.stderr.count("\n") == 1
    if "token" in args:
        assert len((tmp_path / "t.tok").read_text().split()) == 1


def test_a_config_others_may_change_is_refused(home: Path) -> None:
    """config.toml names the wallet that is paid, the coordinator and whether work may run
    unsandboxed: group- or world-writable, a symlink, or a FIFO in its place is refused
    in one line that says what to fix, and changes nothing."""
    config = home / "config.toml"
    text = config.read_bytes()
    config.chmod(0o666)
    out = run_cli("manifest", "--home", str(home))
    assert out.returncode == 2 and "mode 0666 lets others change the wallet" in out.stderr
    assert "chmod 600" in out.stderr and config.read_bytes() == text
    config.chmod(0o644)  # readable by others is fine: it holds no secret
    assert run_cli("manifest", "--home", str(home)).returncode == 0
    moved = home.parent / "config-elsewhere.toml"
    config.rename(moved)
    config.symlink_to(moved)
    out = run_cli("manifest", "--home", str(home))
    assert out.returncode == 2 and "it is a symlink" in out.stderr
    config.unlink()
    os.mkfifo(config)
    out = run_cli("manifest", "--home", str(home))  # a FIFO does not hang the command
    assert out.returncode == 2 and "not a regular file" in out.stderr


def test_unstake_sent_without_an_answer_may_have_been_accepted(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The coordinator took the request and closed the connection without answering: the
    unstake may be recorded, so the message is not "cannot reach" but says how to check;
    a port where nothing listens is "cannot reach"."""
    server = socket.create_server(("127.0.0.1", 0))

    def take_and_close() -> None:
        conn, _ = server.accept()
        conn.recv(65536)
        conn.close()

    threading.Thread(target=take_and_close, daemon=True).start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}"
    try:
        assert main(["unstake", "--home", str(home), "--coordinator", url]) == 2
    finally:
        server.close()
    line = one_error_line(capsys.readouterr().err)
    assert "no answer from the coordinator" in line and "may have been accepted" in line
    assert "cannot reach" not in line
    assert main(["unstake", "--home", str(home), "--coordinator", "http://127.0.0.1:9"]) == 2
    assert "cannot reach the coordinator" in one_error_line(capsys.readouterr().err)


def test_run_binds_node_id_before_the_outbox_opens(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every event of `run` carries node_id, the outbox's at its opening included (a mode
    tightened, an orphaned result removed: what an operator looks for after a kill -9)."""
    import json as json_mod

    from nodeclient.node import daemon, keys
    from nodeclient.node.outbox import Outbox

    Outbox(home / "outbox.db").close()
    (home / "outbox.db").chmod(0o644)  # tightened, and logged, when run opens it

    class Stopped:
        def __init__(self, **_: object) -> None:
            pass

        async def run(self) -> int:
            return 0

    monkeypatch.setattr(daemon, "NodeDaemon", Stopped)
    capsys.readouterr()
    args = ["run", "--home", str(home), "--coordinator", "http://127.0.0.1:9"]
    assert main([*args, "--log-format", "json"]) == 0
    events = [json_mod.loads(line) for line in capsys.readouterr().err.splitlines() if line]
    tightened = [e for e in events if e.get("event") == "outbox.mode_tightened"]
    assert tightened, events
    node_id = keys.load_node_key(home, passphrase=None).address
    assert all(e.get("node_id") == node_id for e in events), events


def test_run_signs_its_link_with_the_liveness_key_its_manifest_names(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`run` loads liveness.key once: a `keys rotate-liveness` between two loads would have
    registered one key and authenticated with another, which the coordinator refuses
    (4001) again and again. Here each load gives a new key, as a rotation would."""
    from nodeclient.node import daemon as daemon_module
    from nodeclient.node import keys
    from nodeclient.protocol.secp import Secp256k1Key

    monkeypatch.setattr(keys, "load_liveness_key", lambda _home: Secp256k1Key.generate())
    made: dict[str, Any] = {}

    class Captured:
        def __init__(self, **kwargs: Any) -> None:
            made.update(kwargs)

        async def run(self) -> int:
            return 0

    monkeypatch.setattr(daemon_module, "NodeDaemon", Captured)
    assert main(["run", "--home", str(home), "--coordinator", "http://127.0.0.1:9"]) == 0
    assert made["manifest"]["liveness_address"] == made["liveness_key"].address


# --- init --coordinator: the daemon has a coordinator to go to --------------------------------


def test_init_writes_the_coordinator_given(tmp_path: Path) -> None:
    """`init --coordinator URL` writes it into config.toml (trailing slash dropped, as
    `run --coordinator` takes it): a daemon started with no flag, as the systemd unit
    starts it, then has a coordinator instead of exiting at every start."""
    from nodeclient.node.config import load_config

    h = tmp_path / "h"
    argv = ["init", "--home", str(h), "--wallet", WALLET]
    assert main([*argv, "--coordinator", "https://coordinator.example.net/"]) == 0
    assert load_config(h).coordinator == "https://coordinator.example.net"
    assert 'coordinator = "https://coordinator.example.net"\n' in (h / "config.toml").read_text()


def test_init_without_a_coordinator_says_how_to_set_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["init", "--home", str(tmp_path / "h"), "--wallet", WALLET]) == 0
    out = capsys.readouterr().out
    assert 'coordinator = "https://' in out and "config.toml" in out


def test_init_refuses_a_malformed_coordinator_before_making_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Checked as run's --coordinator is, before anything is written."""
    h = tmp_path / "h"
    argv = ["init", "--home", str(h), "--wallet", WALLET, "--coordinator", MALFORMED_URL]
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"--coordinator {MALFORMED_URL!r} is not a valid URL" in line
    assert not h.exists() or list(h.iterdir()) == []
