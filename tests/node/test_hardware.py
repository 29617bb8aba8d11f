"""The hardware probe (2.3.2 Capability Manifest).

GPU tests replay recorded NVML answers (tests/node/fixtures/nvml/*.json) through the real
child process: the same subprocess, timeout and parsing code a real driver goes through.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from nodeclient.errors import UsageError
from nodeclient.node import hardware, sandbox
from nodeclient.node.hardware import (
    CpuInfo,
    GpuDevice,
    GpuGroup,
    GpuProbe,
    HardwareInfo,
    group_devices,
    parse_cpuinfo_model,
    probe_cpu,
    probe_gpus,
    probe_hardware,
    vram_gib,
)
from nodeclient.node.nvml_probe import REPLAY_ENV

FIXTURES = Path(__file__).parent / "fixtures" / "nvml"
SRC = Path(__file__).resolve().parents[2] / "src"

H100 = "NVIDIA H100 80GB HBM3"
H200 = "NVIDIA H200"
A100_40 = "NVIDIA A100-SXM4-40GB"
RTX4090 = "NVIDIA GeForce RTX 4090"
RTX3080 = "NVIDIA GeForce RTX 3080"
T4 = "Tesla T4"

# fixture -> the manifest "gpu" groups it must produce, in manifest order.
GROUPS: dict[str, list[tuple[str, int, int]]] = {
    "h100_x1.json": [(H100, 1, 80)],
    "h100_80gb_hbm3_recorded.json": [(H100, 1, 80)],
    "h200_recorded.json": [(H200, 1, 140)],
    "h100_x4.json": [(H100, 4, 80)],
    "h100_x8.json": [(H100, 8, 80)],
    "a100_sxm4_40gb_x4.json": [(A100_40, 4, 40)],
    "rtx4090_x1.json": [(RTX4090, 1, 24)],
    "t4_x1.json": [(T4, 1, 15)],
    "mixed_2x4090_1xt4.json": [(RTX4090, 2, 24), (T4, 1, 15)],
    "rtx3080_10gb_and_12gb.json": [(RTX3080, 1, 12), (RTX3080, 1, 10)],
    "mixed_4090_t4_minor_numbers.json": [(RTX4090, 2, 24), (T4, 1, 15)],
    "driver_no_gpus.json": [],
}
# fixture -> (status, a fragment the detail must contain)
FAILURES: dict[str, tuple[str, str]] = {
    "driver_not_loaded.json": ("no-driver", "NVML_ERROR_DRIVER_NOT_LOADED"),
    "library_not_found.json": ("no-driver", "NVML_ERROR_LIBRARY_NOT_FOUND"),
    "lib_rm_version_mismatch.json": ("error", "NVML_ERROR_LIB_RM_VERSION_MISMATCH"),
    "gpu_lost_at_device_1.json": ("error", "device 1: GPU is lost (NVML_ERROR_GPU_IS_LOST)"),
    "crash.json": ("error", "SIGSEGV"),
    "h100_x2_mig_on_1.json": (
        "error",
        f"GPU 1 ({H100}, GPU-7c2e9a14-5b3d-4f86-a0e7-c1d4b9f8e352) is in MIG mode, and MIG "
        "is not supported yet",
    ),
}
HANGS = {"hang.json", "hang_with_helper.json"}


def replay_env(path: Path) -> dict[str, str]:
    """Our environment with the replay hook set, and without CUDA_VISIBLE_DEVICES (which
    would choose among the recorded cards)."""
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    return {**env, REPLAY_ENV: str(path)}


def replay(name: str, *, timeout: float = 10.0) -> GpuProbe:
    return probe_gpus(timeout=timeout, env=replay_env(FIXTURES / name))


def real_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != REPLAY_ENV}


def nvml_library_loads() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


def processes_replaying(path: Path) -> list[psutil.Process]:
    """Live processes whose environment points the replay hook at *path*."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(REPLAY_ENV) == str(path):
                found.append(proc)
        except psutil.Error:
            continue
    return found


@pytest.fixture
def private_hang(tmp_path: Path) -> Iterator[Path]:
    """A copy of the helper-spawning hang recording at a path no other test uses.

    Kills anything still replaying it afterwards, so a failing test leaks nothing.
    """
    path = tmp_path / "hang_with_helper.json"
    shutil.copy(FIXTURES / "hang_with_helper.json", path)
    yield path
    for proc in processes_replaying(path):
        proc.kill()


def test_every_fixture_is_covered() -> None:
    """Each recorded NVML answer on disk has an expectation in this module."""
    on_disk = {p.name for p in FIXTURES.glob("*.json")}
    assert on_disk == set(GROUPS) | set(FAILURES) | HANGS


@pytest.mark.parametrize("name", sorted(GROUPS))
def test_recorded_machines_group_as_expected(name: str) -> None:
    """A recorded machine, probed through the child process, yields its manifest groups."""
    probe = replay(name)
    assert probe.status == "ok", probe.detail
    assert probe.detail == ""
    assert [(g.model, g.count, g.vram_gb) for g in probe.gpus] == GROUPS[name]
    assert len(probe.per_device) == sum(count for _, count, _ in GROUPS[name])


# What `python -m nodeclient.node.nvml_probe` printed on real nodes (driver 580.159.04),
# whose NVML answers the named recordings hold (bench/gpu.py records both and checks there
# that the replay answers as the card did).
def _real_answer(name: str, uuid: str, vram_bytes: int) -> dict[str, object]:
    return {
        "status": "ok",
        "detail": "",
        "driver_version": "580.159.04",
        "devices": [
            {
                "index": 0,
                "name": name,
                "uuid": uuid,
                "vram_bytes": vram_bytes,
                "minor": 0,
                "pci_bus_id": "00000000:00:06.0",
                "mig": False,
            }
        ],
    }


REAL_ANSWERS = {
    "h100_80gb_hbm3_recorded.json": _real_answer(
        H100, "GPU-8b94fb57-2c06-779b-6d32-4c0e7d70b876", 85520809984
    ),
    "h200_recorded.json": _real_answer(
        H200, "GPU-06b98777-0024-36a7-7180-7f7277dbddad", 150754820096
    ),
}


@pytest.mark.parametrize("name", sorted(REAL_ANSWERS))
def test_a_real_cards_recording_replays_as_the_card_answered(name: str) -> None:
    """The probe child, replaying NVML's answers recorded on a real card, prints what it
    printed there, and the node declares that card as it did there (an H100 as 80 GB and
    an H200 as 140 GB, both tier 2)."""
    env = replay_env(FIXTURES / name)
    done = subprocess.run(
        [sys.executable, "-m", "nodeclient.node.nvml_probe"],
        env=env, capture_output=True, check=True, timeout=30,
    )  # fmt: skip
    assert json.loads(done.stdout) == REAL_ANSWERS[name]
    probe = probe_gpus(env=env)
    assert [d.pci_bus_id for d in probe.per_device] == ["00000000:00:06.0"]
    assert [g.vram_gb for g in probe.gpus] == [GROUPS[name][0][2]]
    info = HardwareInfo(cpu=CpuInfo(model="x", cores=16, ram_gb=125), gpu=probe)
    assert info.hardware_tier == 2


def test_per_device_details_come_through() -> None:
    """Index, name, UUID, memory and driver version of every card reach the parent."""
    recording = json.loads((FIXTURES / "h100_x4.json").read_text())
    probe = replay("h100_x4.json")
    assert probe.per_device == tuple(
        GpuDevice(
            index=i,
            name=d["name"],
            uuid=d["uuid"],
            vram_bytes=d["memory_total"],
            driver_version="550.54.15",
            minor=i,  # a recording without minor numbers: each card's is its index
        )
        for i, d in enumerate(recording["devices"])
    )


MIXED_UUIDS = (
    "GPU-9b1e6f1a-3c55-4f0e-8d7e-0a4b1c2d3e4f",
    "GPU-5f0c2a77-81d4-4b39-9a61-6e2d3c4b5a69",
    "GPU-e4a8d0c3-6b2f-47a1-b5c9-3d7e8f9a0b1c",
)


def test_minor_numbers_and_bus_ids_come_through() -> None:
    """Each card's device-file minor number (not its NVML index) and PCI bus id reach the
    parent, in NVML order: the order the slots get the cards in."""
    probe = replay("mixed_4090_t4_minor_numbers.json")
    assert probe.status == "ok", probe.detail
    assert [(d.index, d.uuid, d.minor, d.pci_bus_id) for d in probe.per_device] == [
        (0, MIXED_UUIDS[0], 2, "00000000:17:00.0"),
        (1, MIXED_UUIDS[1], 0, "00000000:65:00.0"),
        (2, MIXED_UUIDS[2], 1, "00000000:CA:00.0"),
    ]
    assert [d.vram_bytes for d in probe.per_device] == [25757220864, 15843721216, 25757220864]


def test_a_mig_card_is_refused_with_what_to_do() -> None:
    """A card in MIG mode fails the probe, naming the card; the fix turns MIG off or
    leaves the card out."""
    probe = replay("h100_x2_mig_on_1.json")
    assert (probe.status, probe.per_device) == ("error", ())
    assert "nvidia-smi -i 1 -mig 0" in probe.fix and "CUDA_VISIBLE_DEVICES" in probe.fix


def test_a_mig_card_left_out_by_cuda_visible_devices_is_no_obstacle() -> None:
    """The operator can keep a MIG card out of the node's hands: the others are used."""
    env = {**replay_env(FIXTURES / "h100_x2_mig_on_1.json"), "CUDA_VISIBLE_DEVICES": "0"}
    probe = probe_gpus(env=env)
    assert probe.status == "ok", probe.detail
    assert [d.index for d in probe.per_device] == [0]
    assert [(g.model, g.count) for g in probe.gpus] == [(H100, 1)]


def _probe_with_visible(visible: str) -> GpuProbe:
    env = {**replay_env(FIXTURES / "mixed_4090_t4_minor_numbers.json")}
    env["CUDA_VISIBLE_DEVICES"] = visible
    return probe_gpus(env=env)


@pytest.mark.parametrize(
    ("visible", "indices"),
    [
        ("2,0", [2, 0]),
        (" 1 ", [1]),
        ("GPU-e4a8d0c3,1", [2, 1]),  # a UUID prefix that names one card, as CUDA takes it
        (MIXED_UUIDS[1].upper(), [1]),
        ("0,-1,1", [0]),  # a negative number ends the list, as in CUDA
        ("-1", []),
        ("", []),
    ],
)
def test_cuda_visible_devices_selects_the_cards_used(visible: str, indices: list[int]) -> None:
    """The daemon's CUDA_VISIBLE_DEVICES (NVML ignores it) chooses the cards, in its order;
    the manifest's groups, tier and slots follow those cards and no others."""
    probe = _probe_with_visible(visible)
    assert probe.status == "ok", probe.detail
    assert [d.index for d in probe.per_device] == indices
    assert list(probe.gpus) == list(group_devices(probe.per_device))
    assert f"{len(indices)} of 3 GPUs used" in probe.detail
    info = HardwareInfo(cpu=CpuInfo("EPYC", 64, 256), gpu=probe)
    assert info.max_parallel_subtasks == (len(indices) or 64)  # CPU-only: one per core
    assert info.hardware_tier == (0 if not indices else 2 if 0 in indices or 2 in indices else 1)


@pytest.mark.parametrize(
    ("visible", "fragment"),
    [
        ("3", "names GPU 3, and this machine has 3 (0 to 2)"),
        ("0,0", "names GPU 0 (GPU-9b1e6f1a-3c55-4f0e-8d7e-0a4b1c2d3e4f) twice"),
        ("GPU-0000", "'GPU-0000' names no GPU of this machine"),
        ("GPU-", "'GPU-' names 3 GPUs of this machine"),
        ("MIG-5f0c2a77", "MIG is not supported yet"),
        ("first", "'first' is neither a GPU index nor a GPU UUID"),
        ("0,,1", "'' is neither"),
    ],
)
def test_cuda_visible_devices_that_cannot_be_followed_is_an_error(
    visible: str, fragment: str
) -> None:
    """A CUDA_VISIBLE_DEVICES naming no card, or one twice, fails the probe with the fix:
    the node must not quietly declare other cards than the operator chose."""
    probe = _probe_with_visible(visible)
    assert (probe.status, probe.gpus, probe.per_device) == ("error", (), ())
    assert f"CUDA_VISIBLE_DEVICES={visible!r} cannot be followed" in probe.detail
    assert fragment in probe.detail
    assert "nvidia-smi -L" in probe.fix


def test_probe_timeout_grows_with_the_cards(tmp_path: Path) -> None:
    """10 s, plus 5 s per card device file: an 8-card machine without persistence mode
    needs more than 10 s to bring NVML up."""
    dev = tmp_path / "dev"
    dev.mkdir()
    for name in ("nvidiactl", "nvidia-uvm", "nvidia-caps"):
        (dev / name).touch()
    assert hardware.probe_timeout(dev) == 10.0
    for i in range(8):
        (dev / f"nvidia{i}").touch()
    assert hardware.probe_timeout(dev) == 50.0


def test_probe_gpus_waits_for_probe_timeout_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a timeout given, the probe waits as long as probe_timeout says."""
    monkeypatch.setattr(hardware, "probe_timeout", lambda dev=None: 1.25)
    probe = probe_gpus(env=replay_env(FIXTURES / "hang.json"))
    assert probe.status == "timeout"
    assert "within 1.25 s" in probe.detail


class _FakeNvml:
    """An NVML whose per-card queries answer from *answers*: a value, or an NVML error
    name to raise."""

    def __init__(self, **answers: object) -> None:
        self.answers = answers

    def _answer(self, name: str) -> object:
        import pynvml

        value = self.answers[name]
        if isinstance(value, str) and value.startswith("NVML_ERROR_"):
            raise pynvml.NVMLError(getattr(pynvml, value))
        return value

    def nvmlInit(self) -> None:
        return None

    def nvmlShutdown(self) -> None:
        return None

    def nvmlSystemGetDriverVersion(self) -> str:
        return "550.54.15"

    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return b"NVIDIA A100-SXM4-40GB"

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return "GPU-1"

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> object:
        return type("Memory", (), {"total": 42949672960})()

    def nvmlDeviceGetMinorNumber(self, handle: int) -> object:
        return self._answer("minor")

    def nvmlDeviceGetPciInfo(self, handle: int) -> object:
        return type("Pci", (), {"busId": self._answer("bus")})()

    def nvmlDeviceGetMigMode(self, handle: int) -> object:
        return self._answer("mig")


def test_collect_reads_minor_bus_id_and_mig_mode() -> None:
    """The real library's answers: bytes for the bus id, [current, pending] MIG modes."""
    from nodeclient.node import nvml_probe

    answer = nvml_probe.collect(_FakeNvml(minor=4, bus=b"00000000:3B:00.0", mig=[1, 0]))
    assert answer["status"] == "ok", answer
    assert answer["devices"][0] | {"name": "", "uuid": ""} == {
        "index": 0,
        "name": "",
        "uuid": "",
        "vram_bytes": 42949672960,
        "minor": 4,
        "pci_bus_id": "00000000:3B:00.0",
        "mig": True,
    }
    pending = nvml_probe.collect(_FakeNvml(minor=0, bus="x", mig=[0, 1]))  # on at next reset
    assert pending["devices"][0]["mig"] is False


def test_collect_takes_no_mig_and_no_bus_id_where_nvml_has_none() -> None:
    """A card without MIG (NOT_SUPPORTED) or a driver without the call (FUNCTION_NOT_FOUND):
    no MIG, bus id unknown; a card that fails the query otherwise fails the probe."""
    from nodeclient.node import nvml_probe

    answer = nvml_probe.collect(
        _FakeNvml(minor=0, bus="NVML_ERROR_FUNCTION_NOT_FOUND", mig="NVML_ERROR_NOT_SUPPORTED")
    )
    assert answer["status"] == "ok", answer
    assert (answer["devices"][0]["pci_bus_id"], answer["devices"][0]["mig"]) == ("", False)
    lost = nvml_probe.collect(_FakeNvml(minor=0, bus="x", mig="NVML_ERROR_GPU_IS_LOST"))
    assert lost["status"] == "error" and "NVML_ERROR_GPU_IS_LOST" in lost["detail"]
    no_minor = nvml_probe.collect(_FakeNvml(minor="NVML_ERROR_NOT_SUPPORTED", bus="x", mig=[0, 0]))
    assert no_minor["status"] == "error" and "device 0" in no_minor["detail"]


def test_a_bad_minor_number_in_a_recording_is_an_error(tmp_path: Path) -> None:
    """A recording whose minor number is not a non-negative integer is refused, clearly."""
    path = tmp_path / "bad_minor.json"
    device = {"name": H100, "uuid": "GPU-1", "memory_total": 85520809984, "minor": -1}
    path.write_text(json.dumps({"driver_version": "550", "devices": [device]}))
    probe = probe_gpus(env=replay_env(path))
    assert probe.status == "error"
    assert "'minor' must be a non-negative integer" in probe.detail


def _card(i: int, name: str = H100, vram_bytes: int = 85520809984) -> dict[str, object]:
    return {"name": name, "uuid": f"GPU-{i:08x}-aaaa-bbbb-cccc-dddddddddddd",
            "memory_total": vram_bytes}  # fmt: skip


def _recorded(tmp_path: Path, cards: list[dict[str, object]]) -> Path:
    path = tmp_path / "recording.json"
    path.write_text(json.dumps({"driver_version": "550.54.15", "devices": cards}))
    return path


@pytest.mark.parametrize(
    ("cards", "fragment"),
    [
        ([_card(0, vram_bytes=1 << 50)], "1048576 GiB of memory on GPU 0, more than the 1024"),
        ([_card(i) for i in range(65)], "65 GPUs in 1 groups"),
        ([_card(i, name=f"Card {i}") for i in range(17)], "17 GPUs in 17 groups"),
    ],
)
def test_an_answer_no_manifest_may_carry_fails_the_probe_not_the_node(
    tmp_path: Path, cards: list[dict[str, object]], fragment: str
) -> None:
    """A driver that reports 1 PiB on a card, 65 cards or 17 kinds of card fails the probe
    ("error", no GPU, and why), as negative memory does: the node is CPU-only. Declared,
    such cards would make the manifest rules raise in `run` and `manifest` at every start,
    or have the node sign a manifest its coordinator refuses for good."""
    probe = probe_gpus(env=replay_env(_recorded(tmp_path, cards)))
    assert (probe.status, probe.gpus, probe.per_device) == ("error", (), ())
    assert fragment in probe.detail
    assert "more than" in probe.detail
    info = HardwareInfo(cpu=CpuInfo("EPYC", 64, 256), gpu=probe)
    assert info.to_manifest()["gpu"] == []
    assert info.max_parallel_subtasks == 64


def test_too_many_kinds_of_card_can_be_narrowed_with_cuda_visible_devices(
    tmp_path: Path,
) -> None:
    """The fix for more cards than a manifest may carry names CUDA_VISIBLE_DEVICES, and
    following it gives the cards chosen."""
    path = _recorded(tmp_path, [_card(i, name=f"Card {i}") for i in range(17)])
    assert "CUDA_VISIBLE_DEVICES" in probe_gpus(env=replay_env(path)).fix
    chosen = ",".join(str(i) for i in range(16))
    probe = probe_gpus(env={**replay_env(path), "CUDA_VISIBLE_DEVICES": chosen})
    assert probe.status == "ok", probe.detail
    assert len(probe.gpus) == 16


def test_the_most_a_manifest_may_carry_is_declared(tmp_path: Path) -> None:
    """64 cards in 16 groups, those of one of 1024 GiB: at the limits, not past them."""
    cards = [_card(i, name=f"Card {i // 4}") for i in range(4, 64)]
    cards += [_card(i, name="Card 0", vram_bytes=1024 << 30) for i in range(4)]
    probe = probe_gpus(env=replay_env(_recorded(tmp_path, cards)))
    assert probe.status == "ok", probe.detail
    assert (len(probe.per_device), len(probe.gpus)) == (64, 16)
    info = HardwareInfo(cpu=CpuInfo("EPYC", 256, 2048), gpu=probe)
    assert info.to_manifest()["max_parallel_subtasks"] == 64


def test_a_name_longer_than_a_manifest_may_carry_fails_the_probe() -> None:
    """The probe child cuts names at 256 characters; an answer with a longer one is not
    its, and fails the probe rather than the manifest rules."""
    answer = {"status": "ok", "detail": "", "driver_version": "550", "devices": [
        {"index": 0, "name": "X" * 257, "uuid": "GPU-1", "vram_bytes": 85520809984,
         "minor": 0}]}  # fmt: skip
    probe = hardware._parse_answer(json.dumps(answer).encode() + b"\n")
    assert (probe.status, probe.gpus) == ("error", ())
    assert "a name of 257 characters for GPU 0" in probe.detail


def test_spec_machine_manifest() -> None:
    """The spec's machine (EPYC 7763, 128 cores, 512 GB, 4 x H100) declares tier 3 and 4 slots."""
    info = HardwareInfo(
        cpu=CpuInfo("AMD EPYC 7763 64-Core Processor", 128, 512), gpu=replay("h100_x4.json")
    )
    assert info.to_manifest() == {
        "cpu": {"model": "AMD EPYC 7763 64-Core Processor", "cores": 128, "ram_gb": 512},
        "gpu": [{"model": H100, "count": 4, "vram_gb": 80}],
        "hardware_tier": 3,
        "max_parallel_subtasks": 4,
    }


def test_configured_parallelism_lowers_the_declared_value() -> None:
    """Configuration may declare fewer slots than the hardware gives."""
    info = HardwareInfo(cpu=CpuInfo("EPYC 7763", 128, 512), gpu=replay("h100_x4.json"))
    assert info.to_manifest(configured_parallelism=2)["max_parallel_subtasks"] == 2
    assert info.max_parallel_subtasks == 4


def test_configured_parallelism_cannot_raise_it() -> None:
    """Configuring more slots than GPUs is a usage error."""
    info = HardwareInfo(cpu=CpuInfo("EPYC 7763", 128, 512), gpu=replay("h100_x4.json"))
    with pytest.raises(UsageError, match="from 1 to 4"):
        info.to_manifest(configured_parallelism=5)


@pytest.mark.parametrize("name", sorted(FAILURES))
def test_driver_failures_give_an_empty_list_and_a_reason(name: str) -> None:
    """No driver, a driver error mid-query, or a crashing child: no GPUs, a status and why."""
    status, fragment = FAILURES[name]
    probe = replay(name)
    assert (probe.status, probe.gpus, probe.per_device) == (status, (), ())
    assert fragment in probe.detail


def test_hang_times_out_and_leaves_no_child() -> None:
    """A probe that never answers returns "timeout" within the timeout and is reaped."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    started = time.monotonic()
    probe = replay("hang.json", timeout=1.5)
    elapsed = time.monotonic() - started
    assert (probe.status, probe.gpus) == ("timeout", ())
    assert "1.5 s" in probe.detail
    assert elapsed < 10  # it returned (the hung probe never ends), with a CI's margin
    after = {p.pid for p in psutil.Process().children(recursive=True)}
    assert after - before == set()


def test_hang_kills_the_whole_process_group(private_hang: Path) -> None:
    """Helpers the hung probe started die with it, not only the child itself."""
    probe = probe_gpus(timeout=1.5, env=replay_env(private_hang))
    assert probe.status == "timeout"
    assert processes_replaying(private_hang) == []


def test_a_child_that_outlives_its_sigkill_is_not_waited_for() -> None:
    """A wedged driver can hold the probe in uninterruptible sleep after SIGKILL: the probe
    gives up on it (a thread reaps it later) instead of hanging `run`, `manifest`, `doctor`."""
    import threading

    child = subprocess.Popen(["sleep", "60"], start_new_session=True)
    released = threading.Event()
    real_wait = child.wait

    def stuck_communicate(timeout: float | None = None) -> tuple[bytes, bytes]:
        raise subprocess.TimeoutExpired(["sleep"], timeout or 0.0)

    def stuck_wait(timeout: float | None = None) -> int:
        if threading.current_thread() is threading.main_thread():
            raise AssertionError("the caller waited on a child it could not kill")
        released.wait()  # the reaper: until the driver lets go
        return real_wait(timeout)

    child.communicate = stuck_communicate  # type: ignore[method-assign]
    child.wait = stuck_wait  # type: ignore[method-assign]
    started = time.monotonic()
    try:
        hardware._kill_group(child)
        assert time.monotonic() - started < 2.0
    finally:
        released.set()
    assert real_wait(10) == -9


def test_unreadable_replay_file_is_an_error(tmp_path: Path) -> None:
    """A broken recording is reported as an error, not as a machine without GPUs."""
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    probe = probe_gpus(env=replay_env(path))
    assert (probe.status, probe.gpus) == ("error", ())
    assert "bad NVML replay file" in probe.detail


def test_child_prints_exactly_one_json_line() -> None:
    """The child's stdout is one JSON line and nothing else; stderr stays empty."""
    env = replay_env(FIXTURES / "mixed_2x4090_1xt4.json")
    env["PYTHONPATH"] = str(SRC)
    done = subprocess.run(
        [sys.executable, "-m", "nodeclient.node.nvml_probe"],
        env=env,
        capture_output=True,
        timeout=30,
        check=True,
    )
    lines = done.stdout.decode().splitlines()
    assert len(lines) == 1
    answer = json.loads(lines[0])
    assert answer["status"] == "ok"
    assert [d["index"] for d in answer["devices"]] == [0, 1, 2]
    assert done.stderr == b""


def test_real_nvml_without_driver_reports_no_driver() -> None:
    """The real library path says "no-driver" with no GPUs where libnvidia-ml is absent."""
    probe = probe_gpus(env=real_env())
    if nvml_library_loads():
        assert probe.status in {"ok", "no-driver", "error"}
        assert (probe.status == "ok") or probe.gpus == ()
    else:
        assert (probe.status, probe.gpus, probe.per_device) == ("no-driver", (), ())
        assert "NVML_ERROR_LIBRARY_NOT_FOUND" in probe.detail


def test_probe_gpus_rejects_a_non_positive_timeout() -> None:
    """A zero timeout would kill every probe before it starts; it is refused."""
    with pytest.raises(ValueError, match="timeout"):
        probe_gpus(timeout=0)


def test_cpu_probe_is_sane() -> None:
    """This machine has a CPU model, at least one usable core and at least 1 GiB of RAM."""
    cpu = probe_cpu()
    assert cpu.model.strip() == cpu.model != ""
    assert cpu.cores >= 1
    assert cpu.ram_gb >= 1
    limit = sandbox.cgroup_memory_limit()  # a container's, where it holds less
    total = psutil.virtual_memory().total
    assert cpu.ram_gb == (total if limit is None else min(total, limit)) // 2**30


def test_cpu_cores_counts_the_cpus_we_may_run_on() -> None:
    """cores is the affinity mask's size, so a pinned container declares its share, or
    this machine's CPU quota where that is smaller."""
    quota = hardware.cgroup_cpu_limit()
    affinity = len(os.sched_getaffinity(0))
    assert probe_cpu().cores == (affinity if quota is None else min(affinity, quota))


# --- CPU quotas (a container's --cpus, a Kubernetes CPU limit, systemd's CPUQuota=) -----------
# cgroup v2 and v1 trees built under tmp_path, as the memory limit's tests build theirs.


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _v2_cpu_tree(root: Path, *, service_max: str, slice_max: str) -> Path:
    """A service under a slice, each with its own cpu.max; the root has none."""
    _write(root / "cgroup.controllers", "cpu memory pids\n")
    _write(root / "node.slice/cpu.max", slice_max + "\n")
    _write(root / "node.slice/nodeclient.service/cpu.max", service_max + "\n")
    proc = root.parent / "proc-cgroup"
    proc.write_text("0::/node.slice/nodeclient.service\n")
    return proc


def _v1_cpu_tree(root: Path, *, quota: str, mount: str = "cpu") -> Path:
    """Docker on cgroup v1 without a cgroup namespace: /proc/self/cgroup names the host's
    path, which the container's mount does not have; its root is the container's."""
    _write(root / mount / "cpu.cfs_quota_us", quota + "\n")
    _write(root / mount / "cpu.cfs_period_us", "100000\n")
    proc = root.parent / "proc-cgroup"
    proc.write_text("12:pids:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/docker/abc\n")
    return proc


@pytest.mark.parametrize(
    ("service_max", "slice_max", "cpus"),
    [
        ("max 100000", "200000 100000", 2),  # the slice's quota holds the service too
        ("400000 100000", "max 100000", 4),
        ("300000 100000", "200000 100000", 2),  # the smallest of them
        ("150000 100000", "max 100000", 2),  # 1.5 CPUs keep 2 busy part of the time
        ("50000 100000", "max", 1),
        ("max 100000", "max 100000", None),  # no quota
    ],
)
def test_v2_cpu_quota_of_the_cgroup_or_one_above_it_in_whole_cpus(
    tmp_path: Path, service_max: str, slice_max: str, cpus: int | None
) -> None:
    root = tmp_path / "cgroup"
    proc = _v2_cpu_tree(root, service_max=service_max, slice_max=slice_max)
    assert hardware.cgroup_cpu_limit(proc, root) == cpus


@pytest.mark.parametrize(("quota", "cpus"), [("200000", 2), ("250000", 3), ("-1", None)])
@pytest.mark.parametrize("mount", ["cpu", "cpu,cpuacct"])
def test_v1_cpu_quota_in_a_container_is_read_at_the_mounts_root(
    tmp_path: Path, quota: str, cpus: int | None, mount: str
) -> None:
    """cpu.cfs_quota_us over cpu.cfs_period_us, -1 for none; under the "cpu" mount, or
    the "cpu,cpuacct" one where no "cpu" link names it."""
    root = tmp_path / "cgroup"
    proc = _v1_cpu_tree(root, quota=quota, mount=mount)
    assert hardware.cgroup_cpu_limit(proc, root) == cpus


@pytest.mark.parametrize(
    "text", ["", "garbage\n", "0::/gone\n", "4:cpu:/../../etc\n", "not:a:cgroup:line"]
)
def test_no_cpu_quota_where_nothing_can_be_read(tmp_path: Path, text: str) -> None:
    proc = tmp_path / "proc-cgroup"
    proc.write_text(text)
    (tmp_path / "cgroup/cpu").mkdir(parents=True)
    assert hardware.cgroup_cpu_limit(proc, tmp_path / "cgroup") is None
    assert hardware.cgroup_cpu_limit(tmp_path / "missing", tmp_path / "cgroup") is None
    _write(tmp_path / "cgroup/cpu.max", "not a quota\n")
    proc.write_text("0::/\n")
    assert hardware.cgroup_cpu_limit(proc, tmp_path / "cgroup") is None


@pytest.mark.parametrize(
    ("slice_max", "cores"),
    [
        ("200000 100000", 2),  # docker --cpus 2 on a 64-core host
        ("9600000 100000", 64),  # a quota of 96 CPUs: the 64 it may run on
        ("max 100000", 64),
    ],
)
def test_a_cpu_quota_lowers_the_declared_cores_and_slots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slice_max: str, cores: int
) -> None:
    """A 64-core host whose cgroup holds the node to 2 CPUs' time declares 2 cores and 2
    slots, not 64 and 32: the slots are a throughput claim, and 32 of them sharing 2 CPUs
    would each run at a sixteenth of the speed claimed."""
    root = tmp_path / "cgroup"
    proc = _v2_cpu_tree(root, service_max="max 100000", slice_max=slice_max)
    monkeypatch.setattr(hardware, "_PROC_CGROUP", proc)
    monkeypatch.setattr(hardware, "_CGROUP_ROOT", root)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    cpu = probe_cpu()
    assert cpu.cores == cores
    no_gpu = GpuProbe(gpus=(), per_device=(), status="no-driver", detail="")
    info = HardwareInfo(cpu=CpuInfo(cpu.model, cpu.cores, 256), gpu=no_gpu)
    assert info.max_parallel_subtasks == cores


def test_probe_hardware_combines_both_probes() -> None:
    """probe_hardware gives a manifest whose tier and parallelism the rules accept."""
    info = probe_hardware(gpu_timeout=10.0)
    manifest = info.to_manifest()
    assert manifest["cpu"] == info.cpu.to_manifest()
    assert manifest["gpu"] == info.gpu.to_manifest()
    assert manifest["hardware_tier"] == info.hardware_tier
    assert 1 <= manifest["max_parallel_subtasks"] == info.max_parallel_subtasks


def test_cpuinfo_model_is_the_first_model_name() -> None:
    """The first "model name" line wins, with its whitespace collapsed."""
    text = (
        "processor\t: 0\nvendor_id\t: AuthenticAMD\n"
        "model name\t: AMD EPYC 7763   64-Core Processor\n\n"
        "processor\t: 1\nmodel name\t: something else\n"
    )
    assert parse_cpuinfo_model(text) == "AMD EPYC 7763 64-Core Processor"


def test_cpuinfo_without_model_name_gives_none() -> None:
    """ARM-style cpuinfo without "model name" falls through to the fallbacks."""
    assert parse_cpuinfo_model("processor\t: 0\nBogoMIPS\t: 50.00\nmodel\t: 1\n") is None


@pytest.mark.parametrize(
    ("total", "expected"),
    [
        (85520809984, 80),  # H100 80GB HBM3: 79.6 GiB
        (42949672960, 40),  # A100-SXM4-40GB
        (25757220864, 24),  # RTX 4090: 23.99 GiB
        (15843721216, 15),  # Tesla T4: 14.76 GiB
        (3 * 2**29, 2),  # exactly 1.5 GiB: halves round up
        (3 * 2**29 - 1, 1),
    ],
)
def test_vram_rounds_to_nearest_gib(total: int, expected: int) -> None:
    """VRAM is declared in GiB rounded to the nearest integer, halves up."""
    assert vram_gib(total) == expected


def test_grouping_does_not_depend_on_enumeration_order() -> None:
    """The same cards enumerated in another order give the same groups (same signed bytes)."""
    cards = [
        GpuDevice(0, T4, "GPU-a", 15843721216, "550.120", minor=0),
        GpuDevice(1, RTX4090, "GPU-b", 25757220864, "550.120", minor=1),
        GpuDevice(2, RTX4090, "GPU-c", 25757220864, "550.120", minor=2),
    ]
    expected = (GpuGroup(RTX4090, 2, 24), GpuGroup(T4, 1, 15))
    assert group_devices(cards) == expected
    assert group_devices(reversed(cards)) == expected
