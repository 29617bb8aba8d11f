"""`nodeclient manifest` on the operator's terminal: text from the driver and the
hypervisor is shown escaped, and a machine where `nodeclient run` would refuse to start
for want of a sandbox is said to be one.

The cards come from recorded NVML answers through the real probe child; the device files
and /proc/cpuinfo are fakes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodeclient.node import hardware, sandbox
from nodeclient.node.cli import main
from nodeclient.node.nvml_probe import REPLAY_ENV
from nodeclient.protocol import manifest as mf

WALLET = "0x1111111111111111111111111111111111111111"
# A CPUID brand string is whatever the hypervisor sets; this one retitles the terminal.
HOSTILE_CPU = "AMD EPYC\x1b]0;owned\x07 7763"
HOSTILE_GPU = "NVIDIA\x00H100\x1b[31m"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    assert main(["init", "--home", str(h), "--wallet", WALLET, "--region", "eu-west"]) == 0
    return h


@pytest.fixture(autouse=True)
def _logging_put_back() -> Iterator[None]:
    """The commands configure the nodeclient logger; it is put back as it was."""
    root = logging.getLogger("nodeclient")
    saved = (list(root.handlers), root.level, root.propagate)
    yield
    root.handlers[:], root.level, root.propagate = saved


def hostile_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, mig: bool) -> None:
    """One card whose NVML name holds control characters (in MIG mode: then the probe's
    detail names it), its device files, and a CPU model that holds an escape sequence."""
    card = {"name": HOSTILE_GPU, "uuid": "GPU-1", "memory_total": 85520809984, "mig": mig}
    recording = tmp_path / "nvml.json"
    recording.write_text(json.dumps({"driver_version": "550.54.15", "devices": [card]}))
    monkeypatch.setenv(REPLAY_ENV, str(recording))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    dev = tmp_path / "dev"
    dev.mkdir()
    for name in ("nvidiactl", "nvidia-uvm", "nvidia0"):
        (dev / name).touch()
    monkeypatch.setattr(sandbox, "DEV", dev)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: {HOSTILE_CPU}\n")
    monkeypatch.setattr(hardware, "_CPUINFO", cpuinfo)


def assert_no_control_characters(text: str) -> None:
    assert not [c for c in text if ord(c) < 0x20 and c != "\n"], repr(text)


def test_gpu_names_and_the_cpu_model_are_shown_escaped(
    home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A GPU name and a CPU model with control characters reach the terminal as escapes
    (\\x1b), not as commands; the signed manifest keeps them as they are."""
    hostile_machine(tmp_path, monkeypatch, mig=False)
    capsys.readouterr()
    assert main(["manifest", "--home", str(home)]) == 0
    out = capsys.readouterr().out
    assert_no_control_characters(out)
    assert "cpu                   AMD EPYC\\x1b]0;owned\\x07 7763, " in out
    assert "gpu                   1x NVIDIA\\x00H100\\x1b[31m (80 GB)" in out
    assert main(["manifest", "--home", str(home), "--json"]) == 0
    signed = json.loads(capsys.readouterr().out)
    assert (signed["cpu"]["model"], signed["gpu"][0]["model"]) == (HOSTILE_CPU, HOSTILE_GPU)
    mf.verify_manifest(signed, chain_id=31337, now=signed["issued_at"])


def test_a_failed_gpu_probes_detail_is_shown_escaped(
    home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The probe's detail, which names the card NVML described, is escaped on the gpu
    line too."""
    hostile_machine(tmp_path, monkeypatch, mig=True)
    capsys.readouterr()
    assert main(["manifest", "--home", str(home)]) == 0
    out = capsys.readouterr().out
    assert_no_control_characters(out)
    assert "none: the GPU probe failed (error): GPU 0 (NVIDIA\\x00H100\\x1b[31m, GPU-1)" in out


def without_bubblewrap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


def warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("nodeclient: warning:")]


def test_manifest_warns_where_run_would_refuse_to_start_without_a_sandbox(
    home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Without bubblewrap, and allow_unsandboxed false, `run` exits 2 and serves nothing:
    `manifest` still shows what would be declared (exit 0), with one warning line on
    stderr that says so and how to fix it."""
    without_bubblewrap(tmp_path, monkeypatch)
    capsys.readouterr()
    assert main(["manifest", "--home", str(home)]) == 0
    (warning,) = warnings(capsys.readouterr().err)
    assert "`nodeclient run` would refuse to start" in warning
    assert sandbox.REFUSAL in warning and "(bwrap is not on PATH)" in warning
    assert main(["manifest", "--home", str(home), "--json"]) == 0
    captured = capsys.readouterr()
    assert len(warnings(captured.err)) == 1
    json.loads(captured.out)  # stdout stays the manifest alone
    assert main(["run", "--home", str(home), "--coordinator", "http://127.0.0.1:9"]) == 2
    assert sandbox.REFUSAL in capsys.readouterr().err


def test_manifest_does_not_warn_where_run_would_start(
    home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With allow_unsandboxed = true, `run` starts without bubblewrap: no warning."""
    without_bubblewrap(tmp_path, monkeypatch)
    config = home / "config.toml"
    config.write_text(
        config.read_text().replace("allow_unsandboxed = false", "allow_unsandboxed = true")
    )
    capsys.readouterr()
    assert main(["manifest", "--home", str(home)]) == 0
    assert warnings(capsys.readouterr().err) == []
