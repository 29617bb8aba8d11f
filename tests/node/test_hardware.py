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
A100_40 = "NVIDIA A100-SXM4-40GB"
RTX4090 = "NVIDIA GeForce RTX 4090"
RTX3080 = "NVIDIA GeForce RTX 3080"
T4 = "Tesla T4"

# fixture -> the manifest "gpu" groups it must produce, in manifest order.
GROUPS: dict[str, list[tuple[str, int, int]]] = {
    "h100_x1.json": [(H100, 1, 80)],
    "h100_x4.json": [(H100, 4, 80)],
    "h100_x8.json": [(H100, 8, 80)],
    "a100_sxm4_40gb_x4.json": [(A100_40, 4, 40)],
    "rtx4090_x1.json": [(RTX4090, 1, 24)],
    "t4_x1.json": [(T4, 1, 15)],
    "mixed_2x4090_1xt4.json": [(RTX4090, 2, 24), (T4, 1, 15)],
    "rtx3080_10gb_and_12gb.json": [(RTX3080, 1, 12), (RTX3080, 1, 10)],
    "driver_no_gpus.json": [],
}
# fixture -> (status, a fragment the detail must contain)
FAILURES: dict[str, tuple[str, str]] = {
    "driver_not_loaded.json": ("no-driver", "NVML_ERROR_DRIVER_NOT_LOADED"),
    "library_not_found.json": ("no-driver", "NVML_ERROR_LIBRARY_NOT_FOUND"),
    "lib_rm_version_mismatch.json": ("error", "NVML_ERROR_LIB_RM_VERSION_MISMATCH"),
    "gpu_lost_at_device_1.json": ("error", "device 1: GPU is lost (NVML_ERROR_GPU_IS_LOST)"),
    "crash.json": ("error", "SIGSEGV"),
}
HANGS = {"hang.json", "hang_with_helper.json"}


def replay_env(path: Path) -> dict[str, str]:
    return {**os.environ, REPLAY_ENV: str(path)}


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
        )
        for i, d in enumerate(recording["devices"])
    )


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
    assert elapsed < 1.5 + 1.0
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

    from nodeclient.node import hardware

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
    assert cpu.ram_gb == psutil.virtual_memory().total // 2**30


def test_cpu_cores_counts_the_cpus_we_may_run_on() -> None:
    """cores is the affinity mask's size, so a pinned container declares its share."""
    assert probe_cpu().cores == len(os.sched_getaffinity(0))


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
        GpuDevice(0, T4, "GPU-a", 15843721216, "550.120"),
        GpuDevice(1, RTX4090, "GPU-b", 25757220864, "550.120"),
        GpuDevice(2, RTX4090, "GPU-c", 25757220864, "550.120"),
    ]
    expected = (GpuGroup(RTX4090, 2, 24), GpuGroup(T4, 1, 15))
    assert group_devices(cards) == expected
    assert group_devices(reversed(cards)) == expected
