"""What an operator sees when a node cannot start, or cannot stay started: the reason
named where it is (`doctor` before `run`, a JSON event where the logs are JSON), every
event carrying node_id, and the probes' findings logged with their fields.

Each case is made for real: a coordinator on another chain, a PATH without bubblewrap, a
damaged outbox, an NVML that answers with an error (the recorded replay).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodeclient.node import keys, securefile
from nodeclient.node.cli import main
from nodeclient.node.config import NodeConfig, write_config
from nodeclient.node.nvml_probe import REPLAY_ENV
from tests.e2e.harness import CoordinatorProc

WALLET = "0x1111111111111111111111111111111111111111"
NVML_FIXTURES = Path(__file__).parent / "fixtures" / "nvml"


def make_home(root: Path, **settings: Any) -> Path:
    """A node home with keys and a config.toml holding *settings*."""
    home = securefile.ensure_home(root / "node", create=True)
    keys.init_keys(home, passphrase=None)
    write_config(home, NodeConfig(wallet_address=WALLET, **settings))
    return home


def node_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """The real `nodeclient` in a child process; CPU only, as on a machine without cards."""
    return subprocess.run(
        [sys.executable, "-m", "nodeclient.node.cli", *args],
        capture_output=True, text=True, timeout=timeout, check=False,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})},
    )  # fmt: skip


def json_events(err: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in err.splitlines() if line.startswith("{")]


def error_line(err: str) -> str:
    """The CLI's one error line on stderr, whatever log events surround it; no traceback."""
    assert "Traceback" not in err, err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("nodeclient: error: ")]
    return line.removeprefix("nodeclient: error: ")


# --- chain_id: the coordinator's, or every signature is refused --------------------------------


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real coordinator on the devnet's chain (31337)."""
    root = tmp_path_factory.mktemp("coordinator")
    clock = root / "clock"
    clock.write_text("0")
    coord = CoordinatorProc(root, clock_file=clock)
    coord.start()
    try:
        yield coord.url
    finally:
        coord.stop()


def test_doctor_fails_a_chain_id_that_is_not_the_coordinators(
    tmp_path: Path, coordinator: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """config.toml on chain 1, the coordinator on 31337: doctor said OK, then `run` was
    refused with a signature that "recovers to" another address. It FAILs, naming both
    chain ids and the setting to change."""
    home = make_home(tmp_path, chain_id=1, coordinator=coordinator, allow_unsandboxed=True)
    capsys.readouterr()
    assert main(["doctor", "--home", str(home), "--json"]) == 2
    checks = {c["check"]: c for c in json.loads(capsys.readouterr().out)}
    chain = checks["chain_id"]
    assert chain["level"] == "FAIL", checks
    assert "chain_id 1" in chain["summary"] and "31337" in chain["summary"]
    assert f"set chain_id = 31337 in {home / 'config.toml'}" in chain["fix"]


def test_doctor_passes_the_coordinators_chain_id(
    tmp_path: Path, coordinator: str, capsys: pytest.CaptureFixture[str]
) -> None:
    home = make_home(tmp_path, chain_id=31337, coordinator=coordinator, allow_unsandboxed=True)
    capsys.readouterr()
    main(["doctor", "--home", str(home), "--json"])
    checks = {c["check"]: c for c in json.loads(capsys.readouterr().out)}
    assert checks["chain_id"]["level"] == "OK", checks


def test_run_on_another_chain_stops_naming_chain_id(tmp_path: Path, coordinator: str) -> None:
    """The daemon, refused for it, says that chain_id is the cause and what to set, and
    exits 78 as for any refused registration (systemd does not restart it: starting again
    would be refused again)."""
    home = make_home(tmp_path, chain_id=1, coordinator=coordinator, allow_unsandboxed=True)
    out = node_cli("run", "--home", str(home))
    assert out.returncode == 78, out.stderr
    line = error_line(out.stderr)
    assert "chain_id 1" in line and "31337" in line, line
    assert f"set chain_id = 31337 in {home / 'config.toml'}" in line
    refused = [e for e in json_events(out.stderr) if e["event"] == "node.registration_refused"]
    assert refused and "set chain_id = 31337" in refused[0]["reason"]


# --- run --log-format json: a fatal error is an event too ------------------------------------


def test_a_fatal_start_up_error_is_a_json_event_too(tmp_path: Path) -> None:
    """No working sandbox (no bwrap on PATH, allow_unsandboxed false): the one plain line
    stays, and the JSON log gets `daemon.fatal` with the same error, the exit status and
    node_id, for whatever reads the JSON log (before, nothing there said why it stopped)."""
    home = make_home(tmp_path)
    node_id = keys.node_id_of(home)
    args = ["run", "--home", str(home), "--coordinator", "http://127.0.0.1:9"]
    out = node_cli(*args, "--log-format", "json", env={"PATH": str(tmp_path / "no-bin")})
    assert out.returncode == 2, out.stderr
    line = error_line(out.stderr)
    assert line.startswith("no working sandbox")
    (fatal,) = [e for e in json_events(out.stderr) if e["event"] == "daemon.fatal"]
    assert fatal["level"] == "error" and fatal["error"] == line
    assert fatal["exit_status"] == 2 and fatal["node_id"] == node_id
    text = node_cli(*args, "--log-format", "text", env={"PATH": str(tmp_path / "no-bin")})
    assert text.returncode == 2 and "daemon.fatal" not in text.stderr
    assert error_line(text.stderr) == line


def test_a_damaged_outbox_is_a_json_event_with_exit_status_78(tmp_path: Path) -> None:
    home = make_home(tmp_path, allow_unsandboxed=True)
    (home / "outbox.db").write_bytes(b"not a database " * 400)
    out = node_cli("run", "--home", str(home), "--coordinator", "http://127.0.0.1:9")
    assert out.returncode == 78, out.stderr
    line = error_line(out.stderr)
    (fatal,) = [e for e in json_events(out.stderr) if e["event"] == "daemon.fatal"]
    assert fatal["error"] == line and "outbox.db is damaged" in line
    assert fatal["exit_status"] == 78 and fatal["node_id"] == keys.node_id_of(home)


def test_the_cleartext_warning_carries_node_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """node_id is on every event of `run`, the warning about a plain http:// coordinator
    on another host included (it was logged before node_id was bound)."""
    home = make_home(tmp_path)
    capsys.readouterr()
    args = ["run", "--home", str(home), "--coordinator", "http://192.0.2.1:8000"]
    assert main([*args, "--heartbeat-interval", "0"]) == 2  # stops there, nothing sent
    events = json_events(capsys.readouterr().err)
    (warned,) = [e for e in events if e["event"] == "link.cleartext"]
    assert warned["node_id"] == keys.node_id_of(home)


# --- the hardware probe's findings, logged with their fields -------------------------------------


@pytest.mark.parametrize("command", ["manifest", "doctor"])
def test_commands_that_probe_the_hardware_log_what_they_found(tmp_path: Path, command: str) -> None:
    """A GPU probe that failed (a driver upgraded without a reboot, replayed) is logged as a
    text event with its status, detail and fix, where Python's last-resort handler printed
    the bare event name; the classes left out (no bubblewrap or Blender on this PATH) are
    logged too, as the docs say `manifest` does."""
    home = make_home(tmp_path)
    env = {
        REPLAY_ENV: str(NVML_FIXTURES / "lib_rm_version_mismatch.json"),
        "PATH": str(tmp_path / "no-bin"),
    }
    out = subprocess.run(
        [sys.executable, "-m", "nodeclient.node.cli", command, "--home", str(home)],
        capture_output=True, text=True, timeout=120, check=False,
        env={**{k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}, **env},
    )  # fmt: skip
    assert "Traceback" not in out.stderr, out.stderr
    (probe,) = [ln for ln in out.stderr.splitlines() if "hardware.gpu_probe_failed" in ln]
    assert " warning hardware.gpu_probe_failed status=error " in probe, probe
    assert "detail=" in probe and "NVML_ERROR_LIB_RM_VERSION_MISMATCH" in probe
    assert "fix=" in probe
    if command == "manifest":
        assert out.returncode == 0, out.stderr
        left_out = [ln for ln in out.stderr.splitlines() if "workload.not_offered" in ln]
        assert any("workload_class=media.render reason=" in ln for ln in left_out), out.stderr
