"""The hardware probe behind the capability manifest (2.3.2 Capability Manifest).

It produces the manifest's ``cpu`` and ``gpu`` objects, and from them (through the pure
rules in :mod:`nodeclient.protocol.tier`, which the coordinator runs too)
``hardware_tier`` and ``max_parallel_subtasks``.

CPU (:func:`probe_cpu`):

- ``model``: the first ``model name`` line of ``/proc/cpuinfo``; else
  ``platform.processor()``; else ``"unknown"``.
- ``cores``: the number of *logical* CPUs this process may run on,
  ``len(os.sched_getaffinity(0))``, so a container pinned to 8 of a host's 128 CPUs says
  8; where the call does not exist, ``os.cpu_count()``. Fewer where a CPU quota holds it
  (a container's ``--cpus``, a Kubernetes CPU limit, systemd's ``CPUQuota=``:
  :func:`cgroup_cpu_limit`), rounded up to whole CPUs: a 2-CPU quota on a 64-core host
  says 2. The cores set the slots the node declares, a claim of throughput; 32 slots
  sharing 2 CPUs' time would each run at a sixteenth of the speed the claim promises.
- ``ram_gb``: total RAM in GiB, rounded down (``psutil.virtual_memory().total // 2**30``),
  or the memory cgroup's limit where it is lower (a container's ``--memory``, systemd's
  ``MemoryMax=``: ``sandbox.cgroup_memory_limit``), so a container held to 8 GiB of a
  256 GiB host says 8, as it says its CPUs. The kernel keeps some memory for itself, so
  a machine sold with 256 GB says about 251.

GPUs (:func:`probe_gpus`): NVML is asked in a child process
(:mod:`nodeclient.node.nvml_probe`) under a timeout, because a wedged or crashing driver
must not take the node client down with it. On timeout the child's whole process group is
killed. The answer is a :class:`GpuProbe` whose ``status`` says what happened:

- ``"ok"``: NVML answered (possibly with zero devices);
- ``"no-driver"``: no NVIDIA library or driver; a CPU-only node, not a fault;
- ``"timeout"``: the child did not answer in time and was killed;
- ``"error"``: NVML or the child failed; ``detail`` says how.

In every status but ``"ok"`` the GPU list is empty, and nothing is logged: this module
never writes to stdout (the CLI owns it); callers show ``detail`` where they see fit.
The timeout grows with the cards the machine has (:func:`probe_timeout`): without
persistence mode the driver initialises every card when NVML starts, a second or more
each.

Which cards the node uses: every card NVML reports, in NVML's order (PCI bus order, as
``nvidia-smi`` numbers them), unless the daemon's own environment sets
``CUDA_VISIBLE_DEVICES`` (:func:`select_devices`): then only the cards it names, in its
order. NVML itself ignores that variable, so it is applied here; that is how an operator
keeps cards for other uses. A card in MIG mode is refused (status ``"error"``): MIG
instances need device files and names the node does not handle yet.

Cards are grouped per ``(model, vram_gb)``, where ``vram_gb`` is NVML's
``memory.total`` in GiB rounded to the nearest integer (halves up): an H100 80GB reports
about 79.6 GiB and declares 80; an RTX 4090 reports 23.99 GiB and declares 24.

An answer no manifest may carry (a card with more memory than
:data:`~nodeclient.protocol.tier.MAX_VRAM_GB`, more cards than ``MAX_GPUS`` or more
groups than ``MAX_GPU_GROUPS``) is status ``"error"``, as a card with negative memory
is: a broken driver makes the node CPU-only, and says why, instead of making the manifest
rules raise in ``nodeclient run`` and ``nodeclient manifest`` at every start.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import psutil

import nodeclient
from nodeclient.errors import HardwareProbeError
from nodeclient.node import sandbox
from nodeclient.protocol import tier

ProbeStatus = Literal["ok", "no-driver", "timeout", "error"]

_GIB: Final = 1 << 30
_CPUINFO: Final = Path("/proc/cpuinfo")
_MAX_ANSWER: Final = 1 << 20  # the child's one JSON line; far more than any real machine needs
_DETAIL_TAIL: Final = 500
_DEV: Final = Path("/dev")
_PROC_CGROUP: Final = Path("/proc/self/cgroup")
_CGROUP_ROOT: Final = Path("/sys/fs/cgroup")
VISIBLE_ENV: Final = "CUDA_VISIBLE_DEVICES"
PROBE_TIMEOUT_BASE: Final = 10.0  # seconds
PROBE_TIMEOUT_PER_CARD: Final = 5.0  # seconds more per /dev/nvidiaN


@dataclass(frozen=True)
class CpuInfo:
    """The manifest's ``cpu`` object."""

    model: str
    cores: int
    ram_gb: int

    def to_manifest(self) -> dict[str, Any]:
        return {"model": self.model, "cores": self.cores, "ram_gb": self.ram_gb}


@dataclass(frozen=True)
class GpuDevice:
    """One card as NVML reported it (what the slots get; not in the manifest).

    ``index`` is NVML's; ``minor`` names the card's device file, ``/dev/nvidia<minor>``.
    """

    index: int
    name: str
    uuid: str
    vram_bytes: int
    driver_version: str
    minor: int
    pci_bus_id: str = ""  # "" where NVML could not say
    mig: bool = False  # in MIG mode: refused by probe_gpus

    @property
    def vram_gb(self) -> int:
        return vram_gib(self.vram_bytes)


@dataclass(frozen=True)
class GpuGroup:
    """One entry of the manifest's ``gpu`` list: identical cards, counted."""

    model: str
    count: int
    vram_gb: int

    def to_manifest(self) -> dict[str, Any]:
        return {"model": self.model, "count": self.count, "vram_gb": self.vram_gb}


@dataclass(frozen=True)
class GpuProbe:
    """What the GPU probe found, and how it went.

    ``per_device`` holds the cards the node uses, in the order slots get them;
    ``gpus`` groups the same cards for the manifest. ``detail`` says why the status is not
    ``"ok"`` (with ``"ok"``, which cards ``CUDA_VISIBLE_DEVICES`` kept, if it is set);
    ``fix``, where known, what the operator can do about it.
    """

    gpus: tuple[GpuGroup, ...]
    per_device: tuple[GpuDevice, ...]
    status: ProbeStatus
    detail: str
    fix: str = ""

    def to_manifest(self) -> list[dict[str, Any]]:
        return [group.to_manifest() for group in self.gpus]


@dataclass(frozen=True)
class HardwareInfo:
    """The CPU and GPU probes together, and the tier rules applied to them."""

    cpu: CpuInfo
    gpu: GpuProbe

    @property
    def hardware_tier(self) -> int:
        return tier.hardware_tier(self.cpu.to_manifest(), self.gpu.to_manifest())

    @property
    def max_parallel_subtasks(self) -> int:
        return tier.max_parallel_subtasks(self.cpu.to_manifest(), self.gpu.to_manifest())

    def to_manifest(self, *, configured_parallelism: int | None = None) -> dict[str, Any]:
        """The manifest's hardware fields.

        *configured_parallelism* (from the node's configuration) may lower
        ``max_parallel_subtasks`` but never raise it; see
        :func:`nodeclient.protocol.tier.effective_parallelism`.
        """
        cpu = self.cpu.to_manifest()
        gpu = self.gpu.to_manifest()
        computed = tier.max_parallel_subtasks(cpu, gpu)
        return {
            "cpu": cpu,
            "gpu": gpu,
            "hardware_tier": tier.hardware_tier(cpu, gpu),
            "max_parallel_subtasks": tier.effective_parallelism(computed, configured_parallelism),
        }


def vram_gib(total_bytes: int) -> int:
    """NVML's ``memory.total`` in GiB, rounded to the nearest integer, halves up."""
    return (total_bytes + _GIB // 2) // _GIB


def parse_cpuinfo_model(text: str) -> str | None:
    """The first ``model name`` value of a ``/proc/cpuinfo`` text, whitespace collapsed."""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "model name":
            model = " ".join(value.split())
            if model:
                return model[: tier.MAX_MODEL_CHARS]
    return None


def _cpu_model() -> str:
    try:
        model = parse_cpuinfo_model(_CPUINFO.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        model = None
    if model:
        return model
    fallback = " ".join(platform.processor().split())
    return fallback[: tier.MAX_MODEL_CHARS] if fallback else "unknown"


def _read_ints(path: Path) -> list[int] | None:
    """The whitespace-separated numbers of a cgroup file (``max`` read as -1); None where
    it cannot be read."""
    try:
        words = path.read_text(encoding="ascii").split()
        return [-1 if word == "max" else int(word) for word in words]
    except (OSError, ValueError, UnicodeError):
        return None


def _cpus_of(quota: int, period: int) -> int | None:
    """A CFS quota in whole CPUs, rounded up (1.5 CPUs keep 2 busy part of the time); None
    for no quota (-1) or numbers no kernel writes."""
    if quota <= 0 or period <= 0:
        return None
    return -(-quota // period)


def _v2_cpu_quota(directory: Path) -> int | None:
    # cpu.max: "QUOTA PERIOD" in microseconds, "max 100000" for none.
    numbers = _read_ints(directory / "cpu.max")
    if not numbers or len(numbers) > 2:
        return None
    return _cpus_of(numbers[0], numbers[1] if len(numbers) == 2 else 100_000)


def _v1_cpu_quota(directory: Path) -> int | None:
    # cpu.cfs_quota_us is -1 for none; cpu.cfs_period_us beside it.
    quota = _read_ints(directory / "cpu.cfs_quota_us")
    period = _read_ints(directory / "cpu.cfs_period_us")
    if quota is None or period is None or len(quota) != 1 or len(period) != 1:
        return None
    return _cpus_of(quota[0], period[0])


def cgroup_cpu_limit(proc_cgroup: Path = _PROC_CGROUP, root: Path = _CGROUP_ROOT) -> int | None:
    """The fewest whole CPUs a CPU quota of the cgroups holding this process allows (a
    container's ``--cpus``, a Kubernetes CPU limit, systemd's ``CPUQuota=``), or None where
    none sets one.

    The cgroups are found as the memory limit's are (:func:`sandbox.cgroups_of`): its own
    (v2 ``cpu.max``, and v1's ``cpu`` hierarchy, with ``cpu.cfs_quota_us`` and
    ``cpu.cfs_period_us``) and each one above it, up to the mount's root under *root*,
    which in a container is the container's own cgroup: a quota on a parent (a systemd
    slice, a Kubernetes pod) holds its children too.
    """
    found = [
        cpus
        for v2, directory in sandbox.cgroups_of("cpu", proc_cgroup, root)
        if (cpus := (_v2_cpu_quota if v2 else _v1_cpu_quota)(directory)) is not None
    ]
    return min(found, default=None)


def _logical_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_limit(_PROC_CGROUP, _CGROUP_ROOT)
    if quota is not None:
        cores = min(cores, quota)
    return max(1, cores)


def probe_cpu() -> CpuInfo:
    """Probe the CPU model, usable logical cores and total RAM (see the module docstring)."""
    try:
        total = int(psutil.virtual_memory().total)
    except (OSError, RuntimeError) as exc:
        raise HardwareProbeError(f"cannot read the machine's total memory: {exc}") from exc
    limit = sandbox.cgroup_memory_limit()  # a container's limit, systemd's MemoryMax=
    if limit is not None:
        total = min(total, limit)
    return CpuInfo(model=_cpu_model(), cores=_logical_cores(), ram_gb=total // _GIB)


def group_devices(devices: Iterable[GpuDevice]) -> tuple[GpuGroup, ...]:
    """Count cards per ``(model, vram_gb)``; largest memory first, then by model name.

    The order is fixed so that the same machine always signs the same manifest bytes.
    """
    counts: dict[tuple[str, int], int] = {}
    for device in devices:
        key = (device.name, device.vram_gb)
        counts[key] = counts.get(key, 0) + 1
    ordered = sorted(counts.items(), key=lambda item: (-item[0][1], item[0][0]))
    return tuple(GpuGroup(model=m, count=n, vram_gb=v) for (m, v), n in ordered)


def _failed(status: ProbeStatus, detail: str, fix: str = "") -> GpuProbe:
    return GpuProbe(gpus=(), per_device=(), status=status, detail=detail, fix=fix)


class NotSelectable(ValueError):
    """``CUDA_VISIBLE_DEVICES`` names something that is not a usable card of this machine."""


def select_devices(devices: Sequence[GpuDevice], visible: str | None) -> tuple[GpuDevice, ...]:
    """The cards of *devices* (all of them, in NVML order) that ``CUDA_VISIBLE_DEVICES``
    *visible* lets the node use, in its order.

    Unset (None): all of them. Empty, or starting with a negative number (``-1``): none.
    Otherwise a comma-separated list of NVML indices (as ``nvidia-smi`` numbers the cards)
    and ``GPU-`` UUIDs (or a prefix of one that names one card, as CUDA takes them); a
    negative number ends the list, as in CUDA. Anything else (an index past the last
    card, a UUID of no card or of several, a card named twice, a MIG instance) raises
    NotSelectable: CUDA would quietly use fewer cards, and the node would declare cards
    it was not meant to have, or none at all.
    """
    if visible is None:
        return tuple(devices)
    if not visible.strip():
        return ()
    chosen: list[GpuDevice] = []
    for raw in visible.split(","):
        entry = raw.strip()
        if re.fullmatch(r"-?[0-9]+", entry):
            number = int(entry)
            if number < 0:
                break
            if number >= len(devices):
                raise NotSelectable(
                    f"it names GPU {number}, and this machine has {len(devices)} "
                    f"(0 to {len(devices) - 1})"
                    if devices
                    else f"it names GPU {number}, and NVML sees no GPU"
                )
            device = devices[number]
        elif entry.upper().startswith("GPU-"):
            found = [d for d in devices if d.uuid.lower().startswith(entry.lower())]
            if len(found) != 1:
                how = "no GPU" if not found else f"{len(found)} GPUs"
                raise NotSelectable(f"{entry!r} names {how} of this machine")
            device = found[0]
        elif entry.upper().startswith("MIG-"):
            raise NotSelectable(f"{entry!r} is a MIG instance: MIG is not supported yet")
        else:
            raise NotSelectable(f"{entry!r} is neither a GPU index nor a GPU UUID")
        if device in chosen:
            raise NotSelectable(f"it names GPU {device.index} ({device.uuid}) twice")
        chosen.append(device)
    return tuple(chosen)


def _child_env(env: Mapping[str, str] | None) -> dict[str, str]:
    # The child must import this same nodeclient, installed or run from a source tree.
    child = dict(os.environ if env is None else env)
    root = str(Path(nodeclient.__file__).resolve().parent.parent)
    existing = child.get("PYTHONPATH")
    child["PYTHONPATH"] = root if not existing else root + os.pathsep + existing
    return child


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    # start_new_session made the child a group leader: the group id is its pid. Killing
    # the group also takes down anything the driver or the child started.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    try:
        proc.communicate(timeout=2.0)
    except subprocess.TimeoutExpired:
        # Still there after SIGKILL: held in uninterruptible sleep by a wedged driver. Do
        # not wait on it (that could be for ever): a thread reaps it whenever it ends.
        threading.Thread(target=proc.wait, name="nvml-probe-reaper", daemon=True).start()


def _tail(data: bytes) -> str:
    return " ".join(data.decode("utf-8", "replace").split())[-_DETAIL_TAIL:]


def _parse_answer(stdout: bytes, visible: str | None = None) -> GpuProbe:
    line = stdout[:_MAX_ANSWER].split(b"\n", 1)[0]
    try:
        answer = json.loads(line)
        status = answer["status"]
        detail = str(answer.get("detail", ""))
        if status in ("no-driver", "error"):
            return _failed(status, detail)
        if status != "ok":
            return _failed("error", f"NVML probe answered an unknown status {status!r}")
        driver = str(answer["driver_version"])
        devices = tuple(
            GpuDevice(
                index=int(d["index"]),
                name=str(d["name"]),
                uuid=str(d["uuid"]),
                vram_bytes=int(d["vram_bytes"]),
                driver_version=driver,
                minor=int(d["minor"]),
                pci_bus_id=str(d.get("pci_bus_id", "")),
                mig=d.get("mig") is True,
            )
            for d in answer["devices"]
        )
    except (ValueError, TypeError, KeyError) as exc:
        return _failed("error", f"NVML probe answered something unreadable: {exc}")
    if any(d.vram_bytes < 0 or not d.name.strip() or d.minor < 0 for d in devices):
        return _failed(
            "error", "NVML probe reported a card with no name, negative memory or minor number"
        )
    absurd = _past_manifest_limits(devices)
    if absurd is not None:
        return _failed("error", absurd)
    return _usable(devices, visible)


def _past_manifest_limits(devices: Iterable[GpuDevice]) -> str | None:
    """Why no manifest may declare one of *devices* (memory or a name no card has), or
    None: declared, such a card would make the manifest rules raise at every start."""
    for d in devices:
        if d.vram_gb > tier.MAX_VRAM_GB:
            return (
                f"NVML probe reported {d.vram_gb} GiB of memory on GPU {d.index}, more than "
                f"the {tier.MAX_VRAM_GB} GiB a manifest may declare for one card"
            )
        if len(d.name) > tier.MAX_MODEL_CHARS:
            return (
                f"NVML probe reported a name of {len(d.name)} characters for GPU {d.index}, "
                f"more than the {tier.MAX_MODEL_CHARS} a manifest may declare"
            )
    return None


def _usable(devices: tuple[GpuDevice, ...], visible: str | None) -> GpuProbe:
    """The probe's answer for the cards that *visible* (``CUDA_VISIBLE_DEVICES``) selects."""
    try:
        chosen = select_devices(devices, visible)
    except NotSelectable as exc:
        return _failed(
            "error",
            f"{VISIBLE_ENV}={visible!r} cannot be followed: {exc}",
            f"set {VISIBLE_ENV} to indices (as `nvidia-smi` numbers the cards) or UUIDs "
            "(`nvidia-smi -L`) of this machine's GPUs, or unset it to use them all",
        )
    for device in chosen:
        if device.mig:
            return _failed(
                "error",
                f"GPU {device.index} ({device.name}, {device.uuid}) is in MIG mode, and MIG "
                "is not supported yet",
                f"turn MIG off on it (`nvidia-smi -i {device.index} -mig 0` as root, then "
                f"reset the GPU or reboot), or leave it out with {VISIBLE_ENV}",
            )
    groups = group_devices(chosen)
    if len(chosen) > tier.MAX_GPUS or len(groups) > tier.MAX_GPU_GROUPS:
        return _failed(
            "error",
            f"NVML probe reported {len(chosen)} GPUs in {len(groups)} groups (model and "
            f"memory), more than a manifest may declare ({tier.MAX_GPUS} cards in at most "
            f"{tier.MAX_GPU_GROUPS} groups)",
            f"choose the cards the node uses with {VISIBLE_ENV} (indices, or UUIDs from "
            "`nvidia-smi -L`)",
        )
    detail = ""
    if visible is not None:
        detail = f"{VISIBLE_ENV}={visible!r}: {len(chosen)} of {len(devices)} GPUs used"
    return GpuProbe(gpus=groups, per_device=chosen, status="ok", detail=detail)


def card_device_files(dev: Path = _DEV) -> list[str]:
    """The NVIDIA card device files in *dev* (``nvidia0``, ``nvidia1``, ...), sorted; none
    where it cannot be read."""
    try:
        return sorted(p.name for p in dev.glob("nvidia[0-9]*"))
    except OSError:
        return []


def probe_timeout(dev: Path = _DEV) -> float:
    """Seconds the GPU probe may take: PROBE_TIMEOUT_BASE, plus PROBE_TIMEOUT_PER_CARD per
    card device file in *dev*."""
    return PROBE_TIMEOUT_BASE + PROBE_TIMEOUT_PER_CARD * len(card_device_files(dev))


def probe_gpus(*, timeout: float | None = None, env: Mapping[str, str] | None = None) -> GpuProbe:
    """Ask NVML for the GPUs in a child process, giving up after *timeout* seconds
    (default: :func:`probe_timeout`).

    *env* is the child's environment (default: ours); its ``CUDA_VISIBLE_DEVICES`` selects
    the cards used (:func:`select_devices`). Never raises for a driver problem: the
    returned ``status`` and ``detail`` say what went wrong.
    """
    if timeout is None:
        timeout = probe_timeout()
    if timeout <= 0:
        raise ValueError("timeout must be positive")
    visible = (os.environ if env is None else env).get(VISIBLE_ENV)
    argv = [sys.executable, "-m", "nodeclient.node.nvml_probe"]
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_child_env(env),
            start_new_session=True,
        )
    except OSError as exc:
        return _failed("error", f"cannot start the NVML probe: {exc}")
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        return _failed("timeout", f"NVML probe gave no answer within {timeout:g} s and was killed")
    except BaseException:
        _kill_group(proc)  # e.g. KeyboardInterrupt: leave no orphan behind
        raise
    if proc.returncode != 0:
        if proc.returncode < 0:
            try:
                cause = f"died of {signal.Signals(-proc.returncode).name}"
            except ValueError:
                cause = f"died of signal {-proc.returncode}"
        else:
            cause = f"exited with status {proc.returncode}"
        stderr_tail = _tail(stderr)
        return _failed("error", f"NVML probe {cause}" + (f": {stderr_tail}" if stderr_tail else ""))
    return _parse_answer(stdout, visible)


def probe_hardware(*, gpu_timeout: float | None = None) -> HardwareInfo:
    """Probe the CPU and (in a child process) the GPUs."""
    return HardwareInfo(cpu=probe_cpu(), gpu=probe_gpus(timeout=gpu_timeout))
