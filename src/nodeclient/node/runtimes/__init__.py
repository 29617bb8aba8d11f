"""Runtimes that execute workloads on this machine (2.3.5 Work Execution).

``RUNTIMES`` maps each workload class to its :class:`~.base.RuntimeInfo`;
``usable_workload_classes`` feeds the manifest's ``workload_classes``: a class is
advertised only when its runtime can actually run here.
"""

from __future__ import annotations

from pathlib import Path

from nodeclient.node.runtimes.base import Requirements, Runtime, RuntimeInfo


def _onnx(cache_dir: Path) -> Runtime:
    from nodeclient.node.runtimes.onnx import OnnxRuntime

    return OnnxRuntime(cache_dir=cache_dir / "models")


def _onnx_check() -> tuple[bool, str]:
    from nodeclient.node.runtimes import onnx

    return onnx.usable()


RUNTIMES: dict[str, RuntimeInfo] = {
    "ai.inference": RuntimeInfo(
        "ai.inference",
        Requirements(python_modules=("onnxruntime", "onnx")),
        _onnx,
        _onnx_check,
    ),
}


def usable_workload_classes() -> dict[str, tuple[bool, str]]:
    """Each known workload class -> (usable here, why or why not)."""
    return {name: info.usable() for name, info in RUNTIMES.items()}
