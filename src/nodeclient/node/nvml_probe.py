"""The child-process side of the GPU probe (2.3.2 Capability Manifest).

``python -m nodeclient.node.nvml_probe`` asks NVML what GPUs the machine has and prints
exactly one JSON line on stdout, then exits 0. NVML is a C library inside the NVIDIA
driver: a wedged driver can hang a call forever and a broken one can crash the calling
process. That is why it is only ever loaded here, in a throw-away child, and never in the
node client itself; :func:`nodeclient.node.hardware.probe_gpus` starts this module with a
timeout and kills its process group when it does not answer.

The line printed (the only output on stdout)::

    {"status": "ok" | "no-driver" | "error",
     "detail": str,                      # "" when ok; otherwise the reason, for the operator
     "driver_version": str,              # "" unless ok
     "devices": [{"index": int, "name": str, "uuid": str, "vram_bytes": int,
                  "minor": int, "pci_bus_id": str, "mig": bool}, ...]}

``index`` is NVML's (PCI bus order, as ``nvidia-smi`` numbers the cards); ``minor`` is the
driver's minor number, which names the card's device file ``/dev/nvidia<minor>`` and may
differ from ``index``; ``pci_bus_id`` is ``""`` where NVML cannot say; ``mig`` is whether
the card runs in MIG mode now (the node does not use such a card, see
:func:`nodeclient.node.hardware.probe_gpus`).

``devices`` is empty unless ``status`` is ``"ok"``: one failing device fails the whole
probe, because a manifest that silently leaves out a card misstates the node's capacity.

Test and diagnostic hook: when the environment variable ``NODECLIENT_NVML_REPLAY`` names a
JSON file, the module replays that recorded NVML answer instead of loading the real
library. The replay goes through the same collection code as the real library and raises
the same ``pynvml.NVMLError_*`` classes, so a recording exercises exactly the code a real
driver would. A recording looks like::

    {"driver_version": "550.54.15",
     "devices": [{"name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-...",
                  "memory_total": 85520809984}]}

Each device may also hold ``"minor"`` (default: its position in the list),
``"pci_bus_id"`` (default: ``""``) and ``"mig"``: ``true`` for a card in MIG mode, ``false``
for a MIG-capable card with MIG off; without it, asking for the MIG mode raises
``NVML_ERROR_NOT_SUPPORTED``, as it does on cards that have no MIG.

With these special forms:

- ``{"error": "NVML_ERROR_DRIVER_NOT_LOADED"}``: ``nvmlInit`` raises that error (any
  ``NVML_ERROR_*`` name works; library-not-found and driver-not-loaded mean "no driver").
- ``{"error_at_device": 1, "error": "NVML_ERROR_GPU_IS_LOST", "devices": [...]}``: every
  query on device 1 raises, as a card that fell off the bus does.
- ``{"hang": true}``: ``nvmlInit`` never returns; with ``"spawn_helper": true`` it first
  starts a helper process that also sleeps, as a driver's helper processes might.
- ``{"crash": true}``: the process dies of SIGSEGV inside ``nvmlInit``.

Operators can use the hook to check what the node would declare for a given machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar

REPLAY_ENV: Final = "NODECLIENT_NVML_REPLAY"
_T = TypeVar("_T")

# NVML errors that mean "this machine has no usable NVIDIA driver": a CPU-only node, not
# a fault. Every other NVML error is reported as status "error" with its name.
_NO_DRIVER_ERRORS: Final = frozenset(
    {"NVML_ERROR_LIBRARY_NOT_FOUND", "NVML_ERROR_DRIVER_NOT_LOADED"}
)
# Asked of a card without MIG (or of a driver older than MIG), nvmlDeviceGetMigMode fails
# with one of these: the card is not in MIG mode. Asked of an older driver, so may
# nvmlDeviceGetPciInfo (its _v3 entry point): the bus id is then left unknown.
_NOT_THERE: Final = frozenset({"NVML_ERROR_NOT_SUPPORTED", "NVML_ERROR_FUNCTION_NOT_FOUND"})
_MIG_ENABLED: Final = 1  # NVML_DEVICE_MIG_ENABLE

# NVML_DEVICE_NAME_V2_BUFFER_SIZE is 96; anything longer is not what NVML returned.
_MAX_TEXT: Final = 256
_MAX_REPLAY_BYTES: Final = 1 << 20


class MemoryInfo(Protocol):
    """What ``nvmlDeviceGetMemoryInfo`` returns; only ``total`` (bytes) is read."""

    @property
    def total(self) -> int: ...


class PciInfo(Protocol):
    """What ``nvmlDeviceGetPciInfo`` returns; only ``busId`` is read."""

    @property
    def busId(self) -> str | bytes: ...


class NvmlLike(Protocol):
    """The slice of the ``pynvml`` module the probe uses.

    The real module satisfies it; so does :class:`ReplayNvml`. Errors are raised as
    ``pynvml.NVMLError`` subclasses in both cases.
    """

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlSystemGetDriverVersion(self) -> str | bytes: ...
    def nvmlDeviceGetCount(self) -> int: ...
    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any: ...
    def nvmlDeviceGetName(self, handle: Any) -> str | bytes: ...
    def nvmlDeviceGetUUID(self, handle: Any) -> str | bytes: ...
    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> MemoryInfo: ...
    def nvmlDeviceGetMinorNumber(self, handle: Any) -> int: ...
    def nvmlDeviceGetPciInfo(self, handle: Any) -> PciInfo: ...
    def nvmlDeviceGetMigMode(self, handle: Any) -> Sequence[int]: ...


def _error_names() -> dict[int, str]:
    import pynvml

    return {
        value: name
        for name, value in vars(pynvml).items()
        if name.startswith("NVML_ERROR_") and isinstance(value, int)
    }


def _text(value: str | bytes) -> str:
    # Old pynvml releases return bytes; current ones decode to str.
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return text.strip()[:_MAX_TEXT]


def _answer(
    status: str,
    detail: str = "",
    driver_version: str = "",
    devices: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "status": status,
        "detail": detail,
        "driver_version": driver_version,
        "devices": devices or [],
    }


def _optional(query: Callable[[Any], _T], handle: Any, names: Mapping[int, str]) -> _T | None:
    """*query*'s answer for the card *handle*, or None where NVML says the card or driver
    has no such thing (:data:`_NOT_THERE`); any other NVML error goes on up and fails the
    probe."""
    import pynvml

    try:
        return query(handle)
    except pynvml.NVMLError as exc:
        code = getattr(exc, "value", None)
        if isinstance(code, int) and names.get(code) in _NOT_THERE:
            return None
        raise


def collect(nvml: NvmlLike) -> dict[str, Any]:
    """Ask *nvml* for every device and return the answer object printed by :func:`main`.

    Shared by the real library and the replay, so recordings test this very code.
    """
    import pynvml

    names = _error_names()

    def describe(exc: Exception, where: str) -> str:
        code = getattr(exc, "value", None)
        if not isinstance(code, int):
            return f"{where}: {exc} ({type(exc).__name__})"
        return f"{where}: {exc} ({names.get(code, f'NVML error {code}')})"

    try:
        nvml.nvmlInit()
    except pynvml.NVMLError as exc:
        code = getattr(exc, "value", None)
        if isinstance(code, int) and names.get(code) in _NO_DRIVER_ERRORS:
            return _answer("no-driver", describe(exc, "nvmlInit"))
        return _answer("error", describe(exc, "nvmlInit"))
    where = "nvmlSystemGetDriverVersion"
    try:
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        where = "nvmlDeviceGetCount"
        devices: list[dict[str, Any]] = []
        for index in range(nvml.nvmlDeviceGetCount()):
            where = f"device {index}"
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            pci = _optional(nvml.nvmlDeviceGetPciInfo, handle, names)
            mig = _optional(nvml.nvmlDeviceGetMigMode, handle, names)
            devices.append(
                {
                    "index": index,
                    "name": _text(nvml.nvmlDeviceGetName(handle)),
                    "uuid": _text(nvml.nvmlDeviceGetUUID(handle)),
                    "vram_bytes": int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
                    "minor": int(nvml.nvmlDeviceGetMinorNumber(handle)),
                    "pci_bus_id": "" if pci is None else _text(pci.busId),
                    "mig": mig is not None and int(mig[0]) == _MIG_ENABLED,
                }
            )
    except pynvml.NVMLError as exc:
        return _answer("error", describe(exc, where))
    finally:
        # The answer is already decided; a failed shutdown changes nothing.
        with contextlib.suppress(pynvml.NVMLError):
            nvml.nvmlShutdown()
    return _answer("ok", "", driver, devices)


@dataclass(frozen=True)
class _ReplayMemory:
    total: int


@dataclass(frozen=True)
class _ReplayPci:
    busId: str


class ReplayNvml:
    """A stand-in for the ``pynvml`` module that answers from a recording (see module doc)."""

    def __init__(self, recording: Mapping[str, Any]) -> None:
        self._rec = recording
        devices = recording.get("devices", [])
        if not isinstance(devices, list) or not all(isinstance(d, dict) for d in devices):
            raise TypeError("'devices' must be a list of objects")
        self._devices: list[dict[str, Any]] = devices
        self._fail_at = recording.get("error_at_device")

    def _raise(self) -> None:
        import pynvml

        name = self._rec.get("error")
        code = getattr(pynvml, name, None) if isinstance(name, str) else None
        if (
            not isinstance(name, str)
            or not name.startswith("NVML_ERROR_")
            or not isinstance(code, int)
        ):
            raise ValueError(f"'error' is not an NVML_ERROR_* name: {name!r}")
        raise pynvml.NVMLError(code)  # maps to the NVMLError_* subclass, as the library does

    def nvmlInit(self) -> None:
        if self._rec.get("crash") is True:
            import resource

            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file for a test crash
            os.kill(os.getpid(), signal.SIGSEGV)
        if self._rec.get("hang") is True:
            if self._rec.get("spawn_helper") is True:
                subprocess.Popen(  # fixed argv; stays in our process group, so it dies with us
                    [sys.executable, "-c", "import time\nwhile True: time.sleep(60)"],
                    stdin=subprocess.DEVNULL,
                )
            while True:
                time.sleep(60)
        if "error" in self._rec and self._fail_at is None:
            self._raise()

    def nvmlShutdown(self) -> None:
        return None

    def nvmlSystemGetDriverVersion(self) -> str:
        return str(self._rec.get("driver_version", ""))

    def nvmlDeviceGetCount(self) -> int:
        return len(self._devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        import pynvml

        if not 0 <= index < len(self._devices):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return index

    def _device(self, handle: int) -> dict[str, Any]:
        if handle == self._fail_at:
            self._raise()
        return self._devices[handle]

    def nvmlDeviceGetName(self, handle: int) -> str:
        return str(self._device(handle)["name"])

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return str(self._device(handle)["uuid"])

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> _ReplayMemory:
        total = self._device(handle)["memory_total"]
        if not isinstance(total, int) or isinstance(total, bool):
            raise TypeError("'memory_total' must be an integer number of bytes")
        return _ReplayMemory(total)

    def nvmlDeviceGetMinorNumber(self, handle: int) -> int:
        minor = self._device(handle).get("minor", handle)
        if not isinstance(minor, int) or isinstance(minor, bool) or minor < 0:
            raise TypeError("'minor' must be a non-negative integer")
        return minor

    def nvmlDeviceGetPciInfo(self, handle: int) -> _ReplayPci:
        return _ReplayPci(str(self._device(handle).get("pci_bus_id", "")))

    def nvmlDeviceGetMigMode(self, handle: int) -> list[int]:
        import pynvml

        mig = self._device(handle).get("mig")
        if mig is None:  # as on a card without MIG
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if not isinstance(mig, bool):
            raise TypeError("'mig' must be true or false")
        mode = _MIG_ENABLED if mig else 0
        return [mode, mode]


def _load_replay(path: str) -> ReplayNvml:
    with open(path, "rb") as fh:
        raw = fh.read(_MAX_REPLAY_BYTES + 1)
    if len(raw) > _MAX_REPLAY_BYTES:
        raise ValueError("replay file is larger than 1 MiB")
    recording = json.loads(raw)
    if not isinstance(recording, dict):
        raise TypeError("replay file must hold a JSON object")
    return ReplayNvml(recording)


def run(environ: Mapping[str, str]) -> dict[str, Any]:
    """Probe through the replay named in *environ*, or through the real NVML library."""
    replay = environ.get(REPLAY_ENV)
    try:
        import pynvml
    except ImportError as exc:  # a broken install, not a CPU-only machine
        return _answer("error", f"nvidia-ml-py (pynvml) cannot be imported: {exc}")
    if replay:
        try:
            nvml: NvmlLike = _load_replay(replay)
            return collect(nvml)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            return _answer("error", f"bad NVML replay file {replay}: {exc}")
    return collect(pynvml)


def main() -> int:
    """Print the answer as one JSON line on stdout and exit 0."""
    answer = run(os.environ)
    sys.stdout.write(json.dumps(answer, separators=(",", ":")) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
