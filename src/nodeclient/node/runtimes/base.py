"""The one execution contract every runtime implements (2.3.5 Work Execution).

A workload class is described once in ``nodeclient.workloads`` (payload and result
formats, and for sliceable classes how a job splits and assembles), which both sides
import. On the node, a *runtime* executes it behind :class:`Runtime`: it is built once per
worker process (so models and sessions stay warm), runs one task or one slice from the
decrypted payload bytes inside a private work directory, reports progress, and returns
the result bytes the proof of execution will cover.

:class:`RuntimeInfo` says what a runtime needs (binaries, GPU, memory) and whether it is
usable on this machine; that feeds the manifest's ``workload_classes``.

A slot's device is what the executor says: a worker whose slot has a GPU has
``CUDA_VISIBLE_DEVICES`` naming it (by UUID), a worker without one has it empty (every card
hidden, unsandboxed too).
On a GPU slot a runtime runs on that GPU or fails with :class:`DeviceFailure`; it never
falls back to the CPU on its own (the node declared, and is matched for, its GPUs).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

from nodeclient.errors import NodeClientError

# progress(done, total, note): e.g. (3, 10, "frame 4 saved") or (120, 500, "step 120")
Progress = Callable[[float, float, str], None]


def no_progress(_done: float, _total: float, _note: str) -> None:
    """The progress callback used when nobody listens."""


# The address space a program a runtime starts for the task (Blender) may map: set by the
# worker for one task on a GPU slot, where the worker's own limit must leave room for what
# CUDA reserved in it (tens of GB of address space), which a freshly started program does
# not hold. None: the program inherits the worker's limit (a slot without a GPU, where that
# limit is the task's).
_child_address_space: list[int | None] = [None]


def set_child_address_space(limit: int | None) -> None:
    """Set (or, with None, clear) :func:`child_address_space` for the task about to run."""
    _child_address_space[0] = limit


def child_address_space() -> int | None:
    """The RLIMIT_AS a program started for this task gets, or None (it inherits ours)."""
    return _child_address_space[0]


def gpu_slot() -> str | None:
    """The GPU the executor gave this worker's slot (``CUDA_VISIBLE_DEVICES``), or None:
    unset, empty, or hiding every card as CUDA reads it (a leading negative number)."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    return None if not value or value.startswith("-") else value


def gpus_hidden() -> bool:
    """Whether ``CUDA_VISIBLE_DEVICES`` is set and hides every card: the executor sets it
    empty for a slot without a GPU, so that its tasks never take another slot's card."""
    return "CUDA_VISIBLE_DEVICES" in os.environ and gpu_slot() is None


class DeviceFailure(NodeClientError):
    """The slot's GPU, or the library that drives it, failed or did not start: the node's
    fault, never the request's. Not a RemoteProtocolError, so the worker reports the task
    as failed and is replaced: a CUDA context that hit an error such as an illegal memory
    access stays broken for every later task of that process."""


class Runtime(Protocol):
    """Executes one workload class inside a worker process.

    Optional: ``self_check()``, which the worker calls when it starts. Raising withdraws the
    class from that worker (CUDA that does not start on the slot's card, say); what it
    starts and keeps running (PyTorch's autograd thread for a CUDA device) is counted as
    the worker's own, not as threads a task left running.
    """

    workload_class: ClassVar[str]

    def run(self, payload: bytes, *, workdir: Path, progress: Progress) -> bytes:
        """Run one task or slice; raise RemoteProtocolError for a requester fault."""
        ...


@dataclass(frozen=True, slots=True)
class Requirements:
    """What a runtime needs from the machine."""

    binaries: tuple[str, ...] = ()
    python_modules: tuple[str, ...] = ()
    gpu: bool = False  # True: cannot run without one; False: uses one when assigned
    min_ram_mb: int = 256
    # True: python_modules are imported when a worker starts, so the first task is warm.
    # False: on the worker's first task of the class, before the task's memory limit (a
    # large library, such as torch, ~125 MiB a worker, is paid only where it is used).
    preload: bool = True
    # True: offered only where tasks run in the sandbox, even if the operator allows
    # unsandboxed execution (the runtime acts on the request before any check can).
    sandbox: bool = False


@dataclass(frozen=True, slots=True)
class RuntimeInfo:
    """A runtime as the node sees it before any worker exists."""

    workload_class: str
    requirements: Requirements
    factory: Callable[[Path], Runtime]  # builds the runtime in a worker; arg: cache dir
    extra_check: Callable[[], tuple[bool, str]] = field(default=lambda: (True, ""))
    # Asked too when the node gives its slots GPUs: whether what is installed can use one
    # (a CPU build cannot, and a GPU slot never runs its tasks on the CPU instead).
    gpu_check: Callable[[], tuple[bool, str]] | None = None

    def usable(self, *, gpus: bool = False) -> tuple[bool, str]:
        """(usable here, why not): binaries on PATH, modules importable, extra check; with
        *gpus* (the slots have GPUs), the GPU check too."""
        import importlib.util

        for binary in self.requirements.binaries:
            if shutil.which(binary) is None:
                return False, f"{binary} not found on PATH"
        for module in self.requirements.python_modules:
            if importlib.util.find_spec(module) is None:
                return False, f"Python module {module} is not installed"
        ok, why = self.extra_check()
        if ok and gpus and self.gpu_check is not None:
            return self.gpu_check()
        return ok, why
