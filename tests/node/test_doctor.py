"""``nodeclient doctor``: each check fails for real, and says how to fix it.

The failures are made on the real machine: a key file chmod-ed too wide, a PATH without
bubblewrap, a port where nothing listens, a local HTTP server whose clock is off, a disk
threshold above the free space there actually is.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from nodeclient.node import doctor, keys, securefile
from nodeclient.node.cli import main
from nodeclient.node.config import NodeConfig, write_config
from nodeclient.node.hardware import GpuProbe
from nodeclient.node.nvml_probe import REPLAY_ENV
from tests.e2e.harness import CoordinatorProc, free_port

NVML_FIXTURES = Path(__file__).parent / "fixtures" / "nvml"

Level = doctor.Level


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = securefile.ensure_home(tmp_path / "node", create=True)
    keys.init_keys(h, passphrase=None)
    write_config(h, NodeConfig(wallet_address="0x" + "11" * 20))
    return h


# --- keys -------------------------------------------------------------------------------------


def test_keys_ok_when_0600(home: Path) -> None:
    """Freshly initialised keys are all 0600."""
    check = doctor.check_key_files(home)
    assert check.level is Level.OK and "node.key 0600" in check.summary


def test_keys_fail_on_wrong_mode_with_chmod_fix(home: Path) -> None:
    """A group-readable node.key fails, and the fix is the exact chmod."""
    os.chmod(home / "node.key", 0o640)
    check = doctor.check_key_files(home)
    assert check.level is Level.FAIL and "node.key" in check.summary
    assert f"chmod 600 {home / 'node.key'}" in check.fix


def test_keys_fail_when_missing(home: Path) -> None:
    """A missing node.key fails with the init command (or a restore) as the fix."""
    (home / "node.key").unlink()
    check = doctor.check_key_files(home)
    assert check.level is Level.FAIL and "nodeclient init" in check.fix


@pytest.mark.parametrize("content", [None, b"0xnot-a-key\n", b""])
def test_a_lost_or_malformed_liveness_key_fails_with_rotate_as_the_fix(
    home: Path, content: bytes | None
) -> None:
    """liveness.key missing, or a safe file holding no liveness key: the fix is
    `keys rotate-liveness` (init would refuse, node.key and payload.key being there)."""
    path = home / "liveness.key"
    if content is None:
        path.unlink()
    else:
        path.write_bytes(content)
    check = doctor.check_key_files(home)
    assert check.level is Level.FAIL and "liveness.key" in check.summary
    rotate = f"run `nodeclient keys rotate-liveness --home {home}` to make a new liveness key"
    assert check.fix == rotate
    assert "node.key" not in check.summary and "payload.key" not in check.summary


@pytest.mark.parametrize("name", ["node.key", "payload.key"])
@pytest.mark.parametrize("content", [b"garbage\n", b"{not a keystore", b""])
def test_a_node_or_payload_key_holding_no_key_fails_with_restore_as_the_fix(
    home: Path, name: str, content: bytes
) -> None:
    """A safe node.key or payload.key (0600, ours) that holds no key of its kind fails,
    naming the file, with a restore from backup as the fix: `run` would fail on it.
    (Before, doctor saw only the mode and said OK.)"""
    (home / name).write_bytes(content)
    check = doctor.check_key_files(home)
    assert check.level is Level.FAIL and check.summary.startswith(f"{name}: ")
    assert check.fix.startswith(f"restore {home / name} from your backup")


# --- sandbox ----------------------------------------------------------------------------------


def test_sandbox_ok_with_working_bwrap() -> None:
    """bubblewrap is installed here and creates its namespaces."""
    check = doctor.check_sandbox()
    assert check.level is Level.OK, check


def test_sandbox_fails_without_bubblewrap(tmp_path: Path) -> None:
    """A PATH without bwrap fails with the install command; allow_unsandboxed makes it a WARN."""
    empty = tmp_path / "bin"
    empty.mkdir()
    check = doctor.check_sandbox(path=str(empty))
    assert check.level is Level.FAIL and "not installed" in check.summary
    assert "apt-get install bubblewrap" in check.fix
    assert doctor.check_sandbox(path=str(empty), allow_unsandboxed=True).level is Level.WARN


def test_sandbox_fails_when_bwrap_cannot_unshare(tmp_path: Path) -> None:
    """A bwrap that exits non-zero (as when user namespaces are off) fails with the sysctl fix."""
    fake = tmp_path / "bin"
    fake.mkdir()
    script = fake / "bwrap"
    script.write_text(
        "#!/bin/sh\necho 'bwrap: No permissions to creating new namespace' >&2\nexit 1\n"
    )
    script.chmod(0o755)
    check = doctor.check_sandbox(path=str(fake))
    assert check.level is Level.FAIL and "No permissions" in check.summary
    assert "unprivileged_userns_clone" in check.fix


# --- GPUs -------------------------------------------------------------------------------------


def test_gpu_cpu_only_machine_is_ok(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No NVIDIA driver and no device files: a CPU-only node, which is fine (the real probe
    child, answering as NVML does where its library is not installed)."""
    monkeypatch.setenv(REPLAY_ENV, str(NVML_FIXTURES / "library_not_found.json"))
    check = doctor.check_gpus(dev=tmp_path)
    assert check.level is Level.OK and "no GPU" in check.summary


def test_gpu_device_files_without_driver_fail(tmp_path: Path) -> None:
    """/dev/nvidia0 present but NVML finds no driver: FAIL with the driver fix."""
    dev = tmp_path / "dev"
    dev.mkdir()
    (dev / "nvidia0").touch()
    probe = GpuProbe(
        gpus=(), per_device=(), status="no-driver", detail="NVML_ERROR_LIBRARY_NOT_FOUND"
    )
    check = doctor.check_gpus(probe=lambda: probe, dev=dev)
    assert check.level is Level.FAIL and "nvidia-smi" in check.fix


def test_gpu_driver_without_cards_is_ok(tmp_path: Path) -> None:
    """NVML answers ok with zero cards and there are no device files: OK, not a failed probe."""
    dev = tmp_path / "dev"
    dev.mkdir()
    (dev / "nvidiactl").touch()  # the control device alone is not a card
    probe = GpuProbe(gpus=(), per_device=(), status="ok", detail="")
    check = doctor.check_gpus(probe=lambda: probe, dev=dev)
    assert check.level is Level.OK, check
    assert "driver present, no GPU visible" in check.summary


def test_gpu_driver_without_cards_but_device_files_warns(tmp_path: Path) -> None:
    """NVML answers ok with zero cards while /dev/nvidia0 exists: WARN, naming the file."""
    dev = tmp_path / "dev"
    dev.mkdir()
    (dev / "nvidia0").touch()
    probe = GpuProbe(gpus=(), per_device=(), status="ok", detail="")
    check = doctor.check_gpus(probe=lambda: probe, dev=dev)
    assert check.level is Level.WARN, check
    assert "nvidia0" in check.summary and "nvidia-smi" in check.fix
    assert "probe failed" not in check.summary


def test_gpu_driver_without_cards_from_a_recording(tmp_path: Path) -> None:
    """The real child probe, replaying a driver with no devices: OK on a machine without
    /dev/nvidia*."""
    from nodeclient.node import hardware

    rec = tmp_path / "none.json"
    rec.write_text('{"driver_version": "550.54.15", "devices": []}')
    env = {**os.environ, "NODECLIENT_NVML_REPLAY": str(rec)}
    empty = tmp_path / "dev"
    empty.mkdir()
    check = doctor.check_gpus(probe=lambda: hardware.probe_gpus(timeout=10.0, env=env), dev=empty)
    assert check.level is Level.OK, check


def test_gpu_probe_timeout_fails(monkeypatch, tmp_path: Path) -> None:
    """A hung driver (the recorded-NVML hang) makes the real child probe time out: FAIL."""
    from nodeclient.node import hardware

    rec = tmp_path / "hang.json"
    rec.write_text('{"hang": true}')
    env = {**os.environ, "NODECLIENT_NVML_REPLAY": str(rec)}
    check = doctor.check_gpus(probe=lambda: hardware.probe_gpus(timeout=2.0, env=env))
    assert check.level is Level.FAIL and "timeout" in check.summary
    assert "reboot" in check.fix


def _fake_dev(tmp_path: Path, *names: str) -> Path:
    dev = tmp_path / "dev"
    dev.mkdir()
    for name in names:
        (dev / name).touch()
    return dev


def _replayed(name: str, **env: str) -> GpuProbe:
    from nodeclient.node import hardware

    fixture = Path(__file__).parent / "fixtures" / "nvml" / name
    ours = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    return hardware.probe_gpus(
        timeout=10.0, env={**ours, "NODECLIENT_NVML_REPLAY": str(fixture), **env}
    )


def test_gpu_without_nvidia_uvm_fails_with_the_fix(tmp_path: Path) -> None:
    """NVML sees the cards, but /dev/nvidia-uvm is missing (CUDA cannot start in a worker,
    which cannot load the module): FAIL, naming the file and `nvidia-modprobe -u -c=0`."""
    probe = _replayed("mixed_4090_t4_minor_numbers.json")
    dev = _fake_dev(tmp_path, "nvidiactl", "nvidia0", "nvidia1", "nvidia2")
    check = doctor.check_gpus(probe=lambda: probe, dev=dev)
    assert check.level is Level.FAIL, check
    assert f"{dev / 'nvidia-uvm'} is missing" in check.summary
    assert "nvidia-modprobe -u -c=0" in check.fix


def test_gpu_without_its_card_device_file_fails(tmp_path: Path) -> None:
    """A card whose /dev/nvidia<minor> is missing fails too; the minor number counts, not
    the NVML index (the recording's card 0 has minor number 2)."""
    probe = _replayed("mixed_4090_t4_minor_numbers.json", CUDA_VISIBLE_DEVICES="0")
    dev = _fake_dev(tmp_path, "nvidiactl", "nvidia-uvm", "nvidia0", "nvidia1")
    check = doctor.check_gpus(probe=lambda: probe, dev=dev)
    assert check.level is Level.FAIL, check
    assert f"{dev / 'nvidia2'} is missing" in check.summary
    assert "`nvidia-modprobe -c=2`" in check.fix


def test_gpu_with_every_device_file_is_ok(tmp_path: Path) -> None:
    """The cards, nvidiactl and nvidia-uvm all there: OK, naming the cards."""
    probe = _replayed("mixed_4090_t4_minor_numbers.json")
    dev = _fake_dev(tmp_path, "nvidiactl", "nvidia-uvm", "nvidia0", "nvidia1", "nvidia2")
    check = doctor.check_gpus(probe=lambda: probe, dev=dev)
    assert check.level is Level.OK, check
    assert "2x NVIDIA GeForce RTX 4090, 1x Tesla T4, driver 550.120" in check.summary


def test_gpu_all_left_out_by_cuda_visible_devices_is_ok(tmp_path: Path) -> None:
    """CUDA_VISIBLE_DEVICES= (empty): the operator keeps every card; OK, and says so."""
    probe = _replayed("mixed_4090_t4_minor_numbers.json", CUDA_VISIBLE_DEVICES="")
    dev = _fake_dev(tmp_path, "nvidiactl", "nvidia0", "nvidia1", "nvidia2")
    check = doctor.check_gpus(probe=lambda: probe, dev=dev)
    assert check.level is Level.OK, check
    assert "0 of 3 GPUs used" in check.summary


def test_gpu_in_mig_mode_fails_with_its_own_fix(tmp_path: Path) -> None:
    """A card in MIG mode: FAIL, with how to turn MIG off or leave the card out, not the
    driver-reinstall advice."""
    probe = _replayed("h100_x2_mig_on_1.json")
    dev = _fake_dev(tmp_path, "nvidiactl", "nvidia-uvm", "nvidia0", "nvidia1")
    check = doctor.check_gpus(probe=lambda: probe, dev=dev)
    assert check.level is Level.FAIL, check
    assert "MIG is not supported yet" in check.summary
    assert "nvidia-smi -i 1 -mig 0" in check.fix and "reinstall" not in check.fix


# --- runtimes ---------------------------------------------------------------------------------


def test_runtimes_report_each_class() -> None:
    """The real runtime table: ai.inference is served here (onnxruntime is installed)."""
    checks = {c.name: c for c in doctor.check_runtimes()}
    assert checks["runtime ai.inference"].level is Level.OK


def test_runtime_missing_binary_warns_and_none_fails() -> None:
    """A runtime whose binary is missing warns with what is missing; none usable at all fails."""
    checks = doctor.check_runtimes({"media.render": (False, "blender not found on PATH")})
    assert checks[0].level is Level.WARN and "blender not found" in checks[0].fix
    assert checks[-1].level is Level.FAIL and "no workload class" in checks[-1].summary


def test_without_the_sandbox_render_is_reported_not_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a node that runs tasks unsandboxed (allowed by its operator) the daemon does not
    offer media.render: doctor says so (WARN, with why) rather than OK."""
    failed = doctor.Check("sandbox", Level.WARN, "bwrap cannot create namespaces")
    monkeypatch.setattr(doctor, "check_sandbox", lambda **_kw: failed)
    monkeypatch.setattr(doctor, "check_coordinator", lambda _url, **_: [])
    # A CPU node, whatever this machine has: slots with GPUs would not be offered
    # ai.inference by a CPU build of onnxruntime.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    checks = {c.name: c for c in doctor.run_all(tmp_path, coordinator=None, allow_unsandboxed=True)}
    render = checks["runtime media.render"]
    assert render.level is Level.WARN and "needs the bubblewrap sandbox" in render.summary
    assert checks["runtime ai.inference"].level is Level.OK


# --- disk -------------------------------------------------------------------------------------


def test_task_work_directories_need_a_writable_temporary_directory_with_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Task work directories live in $TMPDIR: none writable (a full or read-only /tmp)
    fails, naming what to do; one with too little room warns or fails, as the home does."""
    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    free = shutil.disk_usage(tmp_path).free
    ok = doctor.check_scratch(warn_below=0, fail_below=0)
    assert ok.level is Level.OK and str(tmp_path) in ok.summary
    warn = doctor.check_scratch(warn_below=free + (1 << 30), fail_below=0)
    assert warn.level is Level.WARN and "set TMPDIR" in warn.fix
    fail = doctor.check_scratch(warn_below=free + (2 << 30), fail_below=free + (1 << 30))
    assert fail.level is Level.FAIL
    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.setattr(tempfile, "_candidate_tempdir_list", lambda: ["/nonexistent/no-tmp"])
    none = doctor.check_scratch()
    assert none.level is Level.FAIL and none.name == "workdir"
    assert "no directory for task work can be written" in none.summary
    assert "set TMPDIR" in none.fix


def test_disk_thresholds(tmp_path: Path) -> None:
    """Free space below the FAIL threshold fails, below the WARN threshold warns, else OK."""
    free = shutil.disk_usage(tmp_path).free
    assert doctor.check_disk(tmp_path, warn_below=0, fail_below=0).level is Level.OK
    warn = doctor.check_disk(tmp_path, warn_below=free + 1 << 30, fail_below=0)
    assert warn.level is Level.WARN and "GiB free" in warn.summary
    fail = doctor.check_disk(tmp_path, warn_below=free + 2 << 30, fail_below=free + 1 << 30)
    assert fail.level is Level.FAIL and "free space" in fail.fix
    assert doctor.DISK_WARN_BYTES == 5 << 30 and doctor.DISK_FAIL_BYTES == 1 << 30


# --- coordinator and clock --------------------------------------------------------------------


def serve_healthz(offset: float, *, status: int = 200) -> Iterator[str]:
    """A real HTTP server whose Date header is *offset* seconds off."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b'{"status": "ok"}'
            self.send_response_only(status)
            self.send_header("Date", formatdate(time.time() + offset, usegmt=True))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def skewed(request) -> Iterator[str]:
    yield from serve_healthz(request.param)


@pytest.mark.parametrize("skewed", [0.0], indirect=True)
def test_coordinator_reachable_and_clock_ok(skewed: str) -> None:
    """A coordinator with the same time: both checks OK."""
    reach, clock = doctor.check_coordinator(skewed)
    assert reach.level is Level.OK and clock.level is Level.OK


@pytest.mark.parametrize("skewed", [10.0], indirect=True)
def test_clock_skew_warns(skewed: str) -> None:
    """10 s of skew warns (> 2 s) and names time synchronisation as the fix."""
    _, clock = doctor.check_coordinator(skewed)
    assert clock.level is Level.WARN and "behind" in clock.summary
    assert "timedatectl set-ntp true" in clock.fix


@pytest.mark.parametrize("skewed", [-120.0], indirect=True)
def test_clock_skew_fails(skewed: str) -> None:
    """Two minutes of skew fails (> 30 s)."""
    _, clock = doctor.check_coordinator(skewed)
    assert clock.level is Level.FAIL and "ahead of" in clock.summary


def test_reference_coordinator_server_time_skew(tmp_path: Path) -> None:
    """Against the real coordinator (its clock moved 100 s ahead): server_time gives a FAIL."""
    clock = tmp_path / "clock"
    clock.write_text("100")
    coord = CoordinatorProc(tmp_path, clock_file=clock)
    coord.start()
    try:
        reach, skew = doctor.check_coordinator(coord.url)
    finally:
        coord.stop()
    assert reach.level is Level.OK
    assert skew.level is Level.FAIL and "behind the coordinator" in skew.summary
    assert skew.summary.startswith("local clock is 100.") or skew.summary.startswith(
        "local clock is 99."
    )


def test_unreachable_coordinator_fails() -> None:
    """Nothing listens on the port: FAIL, with the URL and network as the fix."""
    (check,) = doctor.check_coordinator(f"http://127.0.0.1:{free_port()}", timeout=2.0)
    assert check.level is Level.FAIL and "cannot reach" in check.summary
    assert "coordinator URL in config.toml" in check.fix


def test_malformed_coordinator_url_fails_without_traceback() -> None:
    """A URL httpx cannot parse (InvalidURL, not an HTTPError) is a FAIL line, not a crash."""
    (check,) = doctor.check_coordinator("http://[::1")
    assert check.level is Level.FAIL and "cannot reach" in check.summary
    assert "InvalidURL" in check.summary


def test_no_coordinator_configured_warns() -> None:
    """No coordinator anywhere: a WARN telling where to set it."""
    (check,) = doctor.check_coordinator(None)
    assert check.level is Level.WARN and "config.toml" in check.fix


# --- the command ------------------------------------------------------------------------------


def test_report_lines_and_exit_status() -> None:
    """One line per check, a fix line under each failure, and exit status = the worst level."""
    checks = [doctor.Check("a", Level.OK, "fine"), doctor.Check("b", Level.FAIL, "bad", "do x")]
    lines = doctor.report_lines(checks)
    assert lines[0].startswith("OK    a") and lines[1].startswith("FAIL  b")
    assert lines[2].strip() == "fix: do x" and lines[-1] == "result: FAIL (exit status 2)"
    assert doctor.exit_status(checks) == 2 and doctor.exit_status(checks[:1]) == 0
    assert doctor.exit_status([doctor.Check("c", Level.WARN, "meh")]) == 1


@pytest.mark.parametrize("how", ["missing", "world-writable"])
def test_doctor_without_a_usable_home_fails(tmp_path: Path, capsys, how: str) -> None:
    """No node home, or one others may write (and swap the keys in): doctor's FAIL, exit
    2, not 1 (WARN), which a monitor would read as a warning."""
    home = tmp_path / "h"
    if how == "world-writable":
        home.mkdir()
        home.chmod(0o777)
    assert main(["doctor", "--home", str(home)]) == 2
    assert capsys.readouterr().err.startswith("nodeclient: error: ")


def test_doctor_command_fails_on_bad_key_mode(home: Path, capsys) -> None:
    """`nodeclient doctor` on a home with a 0644 key exits 2 and prints the chmod fix."""
    os.chmod(home / "payload.key", 0o644)
    rc = main(["doctor", "--home", str(home), "--coordinator", f"http://127.0.0.1:{free_port()}"])
    out = capsys.readouterr().out
    assert rc == 2
    assert f"fix: chmod 600 {home / 'payload.key'}" in out
    assert "FAIL  coordinator" in out and "OK    sandbox" in out


def test_a_missing_runtime_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """doctor's fix for a runtime that is not served carries the install command."""
    from importlib import metadata

    from nodeclient.node.runtimes import blender, torch_train

    ok, why = blender.usable("no-such-blender-binary")
    assert not ok and "apt-get install blender" in why

    def absent(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", absent)
    ok, why = torch_train.usable()
    assert not ok and "pip install 'torch>=2.3'" in why
    check = doctor.check_runtimes({"ai.training": (ok, why)})[0]
    assert check.name == "runtime ai.training" and "pip install" in check.fix


@pytest.mark.parametrize("sent", [10**400, True, float("nan"), "1765000000"])
def test_a_server_time_that_is_no_time_is_ignored(sent: object) -> None:
    """An integer past any float, a boolean, NaN or a string: not a clock to compare with
    (before, the integer was an OverflowError traceback and True a huge skew)."""
    assert doctor.server_time({}, {"server_time": sent}) is None
    assert doctor.server_time({}, {"server_time": 1765000000}) == 1765000000.0


def test_the_link_is_checked_past_healthz(tmp_path: Path) -> None:
    """/healthz can answer while the link cannot (a proxy that does not pass WebSocket
    upgrades): doctor opens the link too and expects its challenge."""
    from tests.http_server import serving
    from tests.node.test_tls_coordinator import _NoUpgrade

    clock = tmp_path / "clock"
    clock.write_text("0")
    coord = CoordinatorProc(tmp_path, clock_file=clock)
    coord.start()
    try:
        ok = doctor.check_link(coord.url)
    finally:
        coord.stop()
    assert ok.level is doctor.Level.OK and ok.summary.endswith("/v1/link sends its challenge")
    with serving(_NoUpgrade) as url:
        refused = doctor.check_link(url)
    assert refused.level is doctor.Level.FAIL and "HTTP 426" in refused.summary
    assert "must pass WebSocket upgrades" in refused.fix


@pytest.mark.parametrize("reached", [Level.OK, Level.FAIL])
def test_doctor_checks_the_link_once_the_coordinator_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reached: Level
) -> None:
    """The link is opened only after /healthz answered: a coordinator that cannot be
    reached is one FAIL, not two."""
    reach = doctor.Check("coordinator", reached, "as the test says")
    link = doctor.Check("link", Level.FAIL, "426")
    monkeypatch.setattr(doctor, "check_coordinator", lambda _url, **_: [reach])
    monkeypatch.setattr(doctor, "check_link", lambda _url: link)
    checks = doctor.run_all(tmp_path, coordinator="https://c.example", allow_unsandboxed=True)
    assert (link in checks) is (reached is Level.OK)


# --- what `run` refuses to start with, doctor FAILs with the same words ------------------------


def _run_refuses(home: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """The error `nodeclient run` stops with on *home*, before it would link."""
    capsys.readouterr()
    argv = ["run", "--home", str(home), "--coordinator", f"http://127.0.0.1:{free_port()}"]
    assert main([*argv, "--log-format", "text"]) == 2
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("nodeclient: ")]
    return line.removeprefix("nodeclient: error: ")


def _doctor_checks(home: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    capsys.readouterr()
    rc = main(["doctor", "--home", str(home), "--json"])
    return rc, {c["check"]: c for c in json.loads(capsys.readouterr().out)}


def test_a_wallet_proof_for_another_wallet_fails_as_run_refuses_it(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """wallet_proof.json made for one wallet, then config.toml changed to another: `run`
    refuses to start (exit 2), and doctor, which said nothing, FAILs with run's words."""
    from nodeclient.protocol.secp import Secp256k1Key

    wallet_key = Secp256k1Key.generate()
    key_file = tmp_path / "wallet.key"
    key_file.write_text(wallet_key.to_hex())
    key_file.chmod(0o600)
    _set_config(home, wallet_address=wallet_key.address, allow_unsandboxed=True)
    assert main(["wallet-proof", "--home", str(home), "--wallet-key", str(key_file)]) == 0
    _set_config(home, wallet_address="0x" + "22" * 20, allow_unsandboxed=True)
    refused = _run_refuses(home, capsys)
    assert "wallet_proof.json is not a proof for wallet 0x" in refused
    rc, checks = _doctor_checks(home, capsys)
    assert rc == 2, checks
    assert (
        checks["wallet proof"]["level"] == "FAIL" and checks["wallet proof"]["summary"] == refused
    )
    assert "nodeclient wallet-proof" in checks["wallet proof"]["fix"]
    _set_config(home, wallet_address=wallet_key.address, allow_unsandboxed=True)
    _, checks = _doctor_checks(home, capsys)  # the wallet it was made for: fine again
    assert checks["wallet proof"]["level"] == "OK", checks


def test_a_max_parallel_subtasks_over_the_hardware_fails_as_run_refuses_it(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """More slots configured than this machine allows: `run` refuses to start (exit 2),
    and doctor FAILs with run's words (it was green)."""
    _set_config(home, max_parallel_subtasks=100_000, allow_unsandboxed=True)
    refused = _run_refuses(home, capsys)
    assert refused.startswith("max_parallel_subtasks must be from 1 to ")
    rc, checks = _doctor_checks(home, capsys)
    assert rc == 2, checks
    assert checks["parallelism"]["level"] == "FAIL" and checks["parallelism"]["summary"] == refused
    assert str(home / "config.toml") in checks["parallelism"]["fix"]
    _set_config(home, max_parallel_subtasks=1, allow_unsandboxed=True)
    _, checks = _doctor_checks(home, capsys)
    assert checks["parallelism"]["level"] == "OK", checks


def _set_config(home: Path, **settings: Any) -> None:
    """Write config.toml afresh, with *settings* over the fixture's wallet."""
    (home / "config.toml").unlink()
    write_config(home, NodeConfig(**{"wallet_address": "0x" + "11" * 20, **settings}))
