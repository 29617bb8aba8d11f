"""Runtimes for the tests of what GPU runtimes do in a worker (loaded in workers as
``self_check_runtime:factory`` and the other factories below, with this directory on the
worker's PYTHONPATH): a self-check that fails on a slot with a GPU, as ONNX Runtime's does
where CUDA does not load, a thread kept from the self-check on, and address space reserved
as CUDA reserves it."""

from __future__ import annotations

import os
import threading
from pathlib import Path


class CudaThatDoesNotLoad:
    def self_check(self) -> None:
        if os.environ.get("CUDA_VISIBLE_DEVICES"):
            raise RuntimeError("the CUDA execution provider did not load on this GPU slot")

    def run(self, payload: bytes, *, workdir: Path, progress: object = None) -> bytes:
        return payload


def factory(_cache: Path) -> CudaThatDoesNotLoad:
    return CudaThatDoesNotLoad()


BAD_CARD = "GPU-9b1e6f1a-3c55-4f0e-8d7e-0a4b1c2d3e4f"  # the first card of the mixed recording


class CudaThatFailsOnOneCard(CudaThatDoesNotLoad):
    """CUDA that does not start on one card (BAD_CARD) and does on the others."""

    def self_check(self) -> None:
        if os.environ.get("CUDA_VISIBLE_DEVICES") == BAD_CARD:
            raise RuntimeError(f"the CUDA execution provider did not load on {BAD_CARD}")


def one_card_factory(_cache: Path) -> CudaThatFailsOnOneCard:
    return CudaThatFailsOnOneCard()


class KeepsADeviceThread:
    """Starts, on first use, a thread that lives as long as the process and holds a
    Python thread state, as PyTorch's autograd thread for a CUDA device does (started at
    the first backward pass on the device): in ``self_check()`` when the worker starts,
    else in the first task. Each answer is how many tasks this instance has run."""

    def __init__(self) -> None:
        self.runs = 0
        self.started = False

    def _start_device_thread(self) -> None:
        if not self.started:
            self.started = True
            threading.Thread(target=threading.Event().wait, daemon=True).start()

    def self_check(self) -> None:
        self._start_device_thread()

    def run(self, payload: bytes, *, workdir: Path, progress: object = None) -> bytes:
        self._start_device_thread()
        self.runs += 1
        return str(self.runs).encode()


def device_thread_factory(_cache: Path) -> KeepsADeviceThread:
    return KeepsADeviceThread()


class ReservesLikeCuda:
    """A CPU runtime (``uses_gpu`` False, as Blender's) in a worker on a GPU slot whose
    self-check reserves 32 GiB of address space and keeps it, as a CUDA context does. Each
    answer says, as JSON, the limit a program it started would get, and what the worker
    holds."""

    uses_gpu = False
    address_space_overhead = 1 << 30

    def self_check(self) -> None:
        import mmap

        # Reserved, not committed: private PROT_NONE pages (prot 0) cost no memory.
        self.reserved = mmap.mmap(-1, 32 << 30, flags=mmap.MAP_PRIVATE, prot=0)

    def run(self, payload: bytes, *, workdir: Path, progress: object = None) -> bytes:
        import json

        from nodeclient.node.runtimes.base import child_address_space

        with open("/proc/self/statm", encoding="ascii") as fh:
            held = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        return json.dumps({"child": child_address_space(), "held": held}).encode()


class UsesTheGpu(ReservesLikeCuda):
    """The same answers from a runtime that uses the GPU: its tasks set no limit."""

    uses_gpu = True


def reserves_factory(_cache: Path) -> ReservesLikeCuda:
    return ReservesLikeCuda()


def gpu_user_factory(_cache: Path) -> UsesTheGpu:
    return UsesTheGpu()


class CountsItsChecks:
    """Appends its name to ``checks.log`` in the model cache at every self-check, so a test
    can count which classes' checks each worker ran."""

    def __init__(self, cache: Path, name: str) -> None:
        self.log, self.name = cache / "checks.log", name

    def self_check(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("a", encoding="ascii") as fh:
            fh.write(self.name + "\n")

    def run(self, payload: bytes, *, workdir: Path, progress: object = None) -> bytes:
        return payload


def counted_a_factory(cache: Path) -> CountsItsChecks:
    return CountsItsChecks(cache, "a")


def counted_b_factory(cache: Path) -> CountsItsChecks:
    return CountsItsChecks(cache, "b")


class FailsWhileMarked(CountsItsChecks):
    """Fails its self-check while ``broken-card`` exists in the model cache (a card whose
    CUDA did not start, then did), counting its checks as ``flaky``."""

    def self_check(self) -> None:
        super().self_check()
        if (self.log.parent / "broken-card").exists():
            raise RuntimeError("the CUDA execution provider did not load on this GPU slot")


def flaky_factory(cache: Path) -> FailsWhileMarked:
    return FailsWhileMarked(cache, "flaky")


class FallsOffTheBus:
    """A GPU runtime whose card goes away while the node runs (a ``card-gone`` file in
    the model cache stands for the driver's loss of it): a task then fails as the node's
    (DeviceFailure), and a worker started after it fails its self-check, as CUDA does."""

    def __init__(self, cache: Path) -> None:
        self.gone = cache / "card-gone"

    def self_check(self) -> None:
        if self.gone.exists():
            raise RuntimeError("the CUDA execution provider did not load: no device")

    def run(self, payload: bytes, *, workdir: Path, progress: object = None) -> bytes:
        from nodeclient.node.runtimes.base import DeviceFailure

        if self.gone.exists():
            raise DeviceFailure("CUDA error: unspecified launch failure (the card is gone)")
        return payload


def falls_off_factory(cache: Path) -> FallsOffTheBus:
    return FallsOffTheBus(cache)
