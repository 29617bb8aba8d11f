"""How workers are built (2.3.5 Work Execution): the executor's configuration and its
defaults.

:class:`WorkerConfig` says what every worker gets: the model cache, the limits, the
runtimes it serves and the modules it imports at start, the GPUs of the slots and the
size caps of payloads, results and output. The defaults come from the runtime registry
(:mod:`nodeclient.node.runtimes`), imported only when a default is asked for.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from nodeclient.node import worker
from nodeclient.node.sandbox import Limits, SlotGpu

if TYPE_CHECKING:
    from nodeclient.node.hardware import GpuDevice

DEFAULT_MAX_PAYLOAD: Final = 256 * 1024 * 1024
DEFAULT_MAX_RESULT: Final = 32 * 1024 * 1024  # within what one link frame carries
DEFAULT_MAX_OUTPUT: Final = 1024 * 1024
# What a task may leave on disk in its work directory (and /tmp, where that is on disk):
# RLIMIT_FSIZE bounds one file, not how many (a render's simulation caches, say).
DEFAULT_MAX_WORK_BYTES: Final = 16 * 1024**3
# Files, directories and links in a slot's directory: empty files take no bytes, but an
# inode each, of the file system the node home and other services share.
DEFAULT_MAX_WORK_ENTRIES: Final = 100_000

# A task's deadline is its lease's end, a wall-clock time, turned into time left when the
# lease arrives. That time must count while the system is suspended: CLOCK_MONOTONIC
# (time.monotonic, the event loop's clock) stops then, so a node resumed an hour later
# would see its task's lease as it was and run on, though the coordinator has given the
# task to another node meanwhile. CLOCK_BOOTTIME runs on in suspend (Linux); it is
# shifted to read as time.monotonic at start-up, so that a deadline computed from either
# agrees until the first suspend. Without CLOCK_BOOTTIME, deadlines stay on time.monotonic.
_BOOTTIME: Final = getattr(time, "CLOCK_BOOTTIME", None)
_BOOT_OFFSET: Final = 0.0 if _BOOTTIME is None else time.clock_gettime(_BOOTTIME) - time.monotonic()


def deadline_clock() -> float:
    """Seconds on the clock of task deadlines: ``time.monotonic()``, plus the time the
    system has spent suspended since this module was imported (see above)."""
    if _BOOTTIME is None:
        return time.monotonic()
    return time.clock_gettime(_BOOTTIME) - _BOOT_OFFSET


def default_runtimes() -> dict[str, str]:
    """Every known runtime as ``class -> "module:factory"``, importable in a worker."""
    from nodeclient.node.runtimes import RUNTIMES

    return {
        name: f"{info.factory.__module__}:{info.factory.__qualname__}"
        for name, info in RUNTIMES.items()
    }


def default_preload() -> tuple[str, ...]:
    """Modules of the runtimes usable here, imported when a worker starts (those whose
    requirements say ``preload``)."""
    from nodeclient.node.runtimes import RUNTIMES

    return tuple(
        module
        for info in RUNTIMES.values()
        if info.requirements.preload and info.usable()[0]
        for module in info.requirements.python_modules
    )


def first_use_modules(runtimes: Mapping[str, str]) -> dict[str, list[str]]:
    """Per workload class of *runtimes*, the modules a worker imports before its first
    task of that class, outside the task's memory limit (runtimes not preloaded)."""
    from nodeclient.node.runtimes import RUNTIMES

    return {
        name: list(RUNTIMES[name].requirements.python_modules)
        for name in runtimes
        if name in RUNTIMES and not RUNTIMES[name].requirements.preload
    }


def gpus_from_probe(devices: Iterable[GpuDevice]) -> tuple[SlotGpu, ...]:
    """What the slots get of the cards the GPU probe kept (``GpuProbe.per_device``), in
    its order: NVML's, or ``CUDA_VISIBLE_DEVICES``'s where the daemon has it."""
    return tuple(SlotGpu(uuid=d.uuid, minor=d.minor, vram_bytes=d.vram_bytes) for d in devices)


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """How workers are built. ``runtimes`` is injectable (tests add hostile ones)."""

    cache_dir: Path  # bound read-only at /nodeclient/cache; the daemon stores models in it
    limits: Limits | None = None  # default: an equal share of RAM per slot
    runtimes: Mapping[str, str] | None = None  # default: default_runtimes()
    preload: tuple[str, ...] | None = None  # modules imported at start; default: theirs
    extra_python_path: tuple[Path, ...] = ()  # bound read-only, put on PYTHONPATH
    gpus: tuple[SlotGpu, ...] = ()  # slot i gets gpus[i % n] (gpus_from_probe)
    work_root: Path | None = None  # default: a fresh directory outside the node home
    node_home: Path | None = None  # checked against every bind (sandbox.make_layout)
    threads: int | None = None  # OMP_NUM_THREADS of each worker
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD
    max_result_bytes: int = DEFAULT_MAX_RESULT
    max_output_bytes: int = DEFAULT_MAX_OUTPUT  # stdout + stderr per task
    max_work_bytes: int = DEFAULT_MAX_WORK_BYTES  # on disk in a slot's directory, per task
    max_work_entries: int = DEFAULT_MAX_WORK_ENTRIES  # files and directories there, per task
    shared_bytes: int = worker.SHARED_BYTES  # bodies up to this skip the pipe; 0: never
    start_timeout: float = 120.0
