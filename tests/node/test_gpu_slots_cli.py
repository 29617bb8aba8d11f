"""`nodeclient run` and `nodeclient manifest` with GPUs: the slots get the cards the probe
kept, the very cards the manifest declares; missing device files stop the start; a GPU
probe that failed is logged.

The cards come from recorded NVML answers through the real probe child; the daemon itself
is replaced by a stand-in that records what it was given, and the device files are fakes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodeclient.node import daemon, hardware, sandbox
from nodeclient.node.cli import main
from nodeclient.node.nvml_probe import REPLAY_ENV
from nodeclient.node.sandbox import SlotGpu
from nodeclient.protocol import tier

FIXTURES = Path(__file__).parent / "fixtures" / "nvml"
WALLET = "0x1111111111111111111111111111111111111111"
RTX4090, T4 = "NVIDIA GeForce RTX 4090", "Tesla T4"
# NVML order of mixed_4090_t4_minor_numbers.json: (uuid, minor number, bytes)
CARDS = (
    SlotGpu("GPU-9b1e6f1a-3c55-4f0e-8d7e-0a4b1c2d3e4f", 2, 25757220864),
    SlotGpu("GPU-5f0c2a77-81d4-4b39-9a61-6e2d3c4b5a69", 0, 15843721216),
    SlotGpu("GPU-e4a8d0c3-6b2f-47a1-b5c9-3d7e8f9a0b1c", 1, 25757220864),
)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    assert main(["init", "--home", str(h), "--wallet", WALLET, "--region", "eu-west"]) == 0
    return h


@pytest.fixture
def events() -> Iterator[list[logging.LogRecord]]:
    """Every record logged under nodeclient.node; the nodeclient logger is put back as it
    was afterwards (`run` configures it)."""
    root = logging.getLogger("nodeclient")
    saved = (list(root.handlers), root.level, root.propagate)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("nodeclient.node")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)
    root.handlers[:], root.level, root.propagate = saved


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """What `run` gave the daemon, which returns at once instead of linking."""
    given: list[dict[str, Any]] = []

    class StandIn:
        def __init__(self, **kwargs: Any) -> None:
            given.append(kwargs)

        async def run(self) -> int:
            given[-1]["outbox"].close()
            return 0

    monkeypatch.setattr(daemon, "NodeDaemon", StandIn)
    return given


@pytest.fixture
def machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The recorded three-card machine, with all its device files; CUDA_VISIBLE_DEVICES
    unset."""
    monkeypatch.setenv(REPLAY_ENV, str(FIXTURES / "mixed_4090_t4_minor_numbers.json"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    dev = tmp_path / "dev"
    dev.mkdir()
    for name in ("nvidiactl", "nvidia-uvm", "nvidia0", "nvidia1", "nvidia2"):
        (dev / name).touch()
    monkeypatch.setattr(sandbox, "DEV", dev)
    return dev


def run(home: Path) -> int:
    return main(["run", "--home", str(home), "--coordinator", "http://127.0.0.1:9"])


def test_run_gives_each_slot_its_card_in_nvml_order(
    home: Path, machine: Path, started: list[dict[str, Any]]
) -> None:
    """Slot i gets NVML's card i, by UUID and minor number, with its exact memory; the
    manifest declares the same three cards."""
    assert run(home) == 0
    (given,) = started
    assert given["executor"].config.gpus == CARDS
    assert given["executor"].slots == 3
    manifest = given["manifest"]
    assert manifest["gpu"] == [
        {"model": RTX4090, "count": 2, "vram_gb": 24},
        {"model": T4, "count": 1, "vram_gb": 15},
    ]


def test_run_uses_only_the_cards_cuda_visible_devices_names(
    home: Path, machine: Path, started: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """CUDA_VISIBLE_DEVICES=1,2 in the daemon's environment: the slots get cards 1 and 2 in
    that order, and the manifest declares those two and no other, with their tier."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,2")
    assert run(home) == 0
    (given,) = started
    assert given["executor"].config.gpus == (CARDS[1], CARDS[2])
    manifest = given["manifest"]
    assert manifest["gpu"] == [
        {"model": RTX4090, "count": 1, "vram_gb": 24},
        {"model": T4, "count": 1, "vram_gb": 15},
    ]
    assert manifest["max_parallel_subtasks"] == given["executor"].slots == 2
    assert manifest["hardware_tier"] == tier.hardware_tier(manifest["cpu"], manifest["gpu"])


def test_run_with_no_card_visible_serves_without_gpus(
    home: Path, machine: Path, started: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """CUDA_VISIBLE_DEVICES= (empty) keeps every card for other uses: no GPU declared or
    given to a slot, and no device file is asked for."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    (machine / "nvidia-uvm").unlink()
    assert run(home) == 0
    (given,) = started
    assert (given["executor"].config.gpus, given["manifest"]["gpu"]) == ((), [])


def test_run_without_nvidia_uvm_serves_without_gpus_and_says_why(
    home: Path,
    machine: Path,
    started: list[dict[str, Any]],
    events: list[logging.LogRecord],
) -> None:
    """GPUs found but /dev/nvidia-uvm missing: no worker could use them, so the node starts
    without them (its CPU work goes on): none declared or given to a slot, and a warning
    names the file and the fix."""
    (machine / "nvidia-uvm").unlink()
    assert run(home) == 0
    (given,) = started
    assert (given["executor"].config.gpus, given["manifest"]["gpu"]) == ((), [])
    (failed,) = [r for r in events if r.msg == "hardware.gpu_probe_failed"]
    assert f"{machine / 'nvidia-uvm'} is missing" in failed.detail  # type: ignore[attr-defined]
    assert "`nvidia-modprobe -u -c=0`" in failed.fix  # type: ignore[attr-defined]


def test_run_logs_a_gpu_probe_that_failed(
    home: Path,
    machine: Path,
    started: list[dict[str, Any]],
    events: list[logging.LogRecord],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A driver error makes the node CPU-only: logged as hardware.gpu_probe_failed with
    the status and the reason, as a warning."""
    monkeypatch.setenv(REPLAY_ENV, str(FIXTURES / "lib_rm_version_mismatch.json"))
    assert run(home) == 0
    (record,) = [r for r in events if r.getMessage() == "hardware.gpu_probe_failed"]
    assert record.levelno == logging.WARNING
    assert record.status == "error"  # type: ignore[attr-defined]
    assert "NVML_ERROR_LIB_RM_VERSION_MISMATCH" in record.detail  # type: ignore[attr-defined]
    (given,) = started
    assert (given["executor"].config.gpus, given["manifest"]["gpu"]) == ((), [])


def test_manifest_logs_a_gpu_probe_that_timed_out_and_says_so(
    home: Path,
    machine: Path,
    events: list[logging.LogRecord],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`nodeclient manifest` logs the timeout too, and shows why it declares no GPU."""
    monkeypatch.setenv(REPLAY_ENV, str(FIXTURES / "hang.json"))
    monkeypatch.setattr(hardware, "probe_timeout", lambda dev=None: 1.0)
    capsys.readouterr()
    assert main(["manifest", "--home", str(home)]) == 0
    (record,) = [r for r in events if r.getMessage() == "hardware.gpu_probe_failed"]
    assert record.status == "timeout"  # type: ignore[attr-defined]
    assert "within 1 s" in record.detail  # type: ignore[attr-defined]
    out = capsys.readouterr().out
    assert "gpu                   none: the GPU probe failed (timeout): NVML probe" in out


def test_no_driver_is_not_logged(
    home: Path, machine: Path, events: list[logging.LogRecord], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No NVIDIA driver at all is a CPU-only machine, not a failed probe: nothing logged."""
    monkeypatch.setenv(REPLAY_ENV, str(FIXTURES / "driver_not_loaded.json"))
    assert main(["manifest", "--home", str(home), "--json"]) == 0
    assert [r for r in events if r.getMessage() == "hardware.gpu_probe_failed"] == []


def test_a_gpu_node_offers_no_class_whose_build_cannot_use_its_gpus(
    home: Path,
    machine: Path,
    started: list[dict[str, Any]],
    events: list[logging.LogRecord],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every slot of a GPU node gets a card and never runs on the CPU instead, so a CPU
    build of onnxruntime (this machine's) would fail every inference task: the manifest
    does not offer ai.inference, and the start says why. Hiding the cards
    (CUDA_VISIBLE_DEVICES= empty) serves it on the CPU."""
    from nodeclient.node.runtimes import onnx as onnx_runtime

    monkeypatch.setattr(onnx_runtime, "gpu_usable", lambda: (False, "no CUDA in this build"))
    assert run(home) == 0
    assert "ai.inference" not in started[-1]["manifest"]["workload_classes"]
    # nor built in its workers, whose start would otherwise check CUDA for it, and fail
    assert "ai.inference" not in started[-1]["executor"].config.runtimes
    (said,) = [
        r
        for r in events
        if r.msg == "workload.not_offered" and r.workload_class == "ai.inference"  # type: ignore[attr-defined]
    ]
    assert said.reason == "no CUDA in this build"  # type: ignore[attr-defined]

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert run(home) == 0
    assert "ai.inference" in started[-1]["manifest"]["workload_classes"]
    assert "ai.inference" in started[-1]["executor"].config.runtimes

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(onnx_runtime, "gpu_usable", lambda: (True, "onnxruntime-gpu"))
    assert run(home) == 0
    assert "ai.inference" in started[-1]["manifest"]["workload_classes"]
