"""Runtimes that execute workloads on this machine (2.3.5 Work Execution).

``RUNTIMES`` maps each workload class to its :class:`~.base.RuntimeInfo`;
``usable_workload_classes`` feeds the manifest's ``workload_classes``: a class is
advertised only when its runtime can actually run here.
"""

from __future__ import annotations

import os
from pathlib import Path

from nodeclient.node.runtimes.base import Requirements, Runtime, RuntimeInfo


def slot_threads() -> int | None:
    """The worker's share of the cores: the executor sets OMP_NUM_THREADS per slot.

    onnxruntime and torch do not all read that variable themselves, so runtimes pass it
    on explicitly; without it each slot would use every core and slots would fight.
    """
    try:
        n = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return None
    return n if n > 0 else None


def _onnx(cache_dir: Path) -> Runtime:
    from nodeclient.node.runtimes.onnx import OnnxRuntime

    return OnnxRuntime(cache_dir=cache_dir / "models", intra_op_threads=slot_threads())


def _onnx_check() -> tuple[bool, str]:
    from nodeclient.node.runtimes import onnx

    return onnx.usable()


def _onnx_gpu_check() -> tuple[bool, str]:
    from nodeclient.node.runtimes import onnx

    return onnx.gpu_usable()


def _blender(cache_dir: Path) -> Runtime:
    from nodeclient.node.runtimes.blender import BlenderRuntime

    return BlenderRuntime(cache_dir=cache_dir / "scenes", threads=slot_threads())


def _blender_check() -> tuple[bool, str]:
    from nodeclient.node.runtimes import blender

    return blender.usable()


def _torch_train(_cache_dir: Path) -> Runtime:
    from nodeclient.node.runtimes.torch_train import TorchTrainRuntime

    return TorchTrainRuntime(threads=slot_threads() or 1)


def _torch_check() -> tuple[bool, str]:
    from nodeclient.node.runtimes import torch_train

    return torch_train.usable()


def _torch_gpu_check() -> tuple[bool, str]:
    from nodeclient.node.runtimes import torch_train

    return torch_train.gpu_usable()


RUNTIMES: dict[str, RuntimeInfo] = {
    "ai.inference": RuntimeInfo(
        "ai.inference",
        Requirements(python_modules=("onnxruntime", "onnx")),
        _onnx,
        _onnx_check,
        _onnx_gpu_check,
    ),
    "media.render": RuntimeInfo(
        "media.render",
        # Blender writes a scene's disk caches (a particle system's, named in the .blend)
        # while it loads the file, before the override script can refuse the scene: only
        # the sandbox keeps those writes inside the task's directory.
        Requirements(binaries=("blender",), sandbox=True),
        _blender,
        _blender_check,
    ),
    "ai.training": RuntimeInfo(
        "ai.training",
        # Slices run for seconds to minutes: a first one may import torch (~2 s) rather
        # than every worker holding it (~125 MiB each) on nodes that never train. On a GPU
        # slot the runtime's self-check imports it and starts CUDA when a worker starts.
        Requirements(python_modules=("torch",), min_ram_mb=1024, preload=False),
        _torch_train,
        _torch_check,
        _torch_gpu_check,
    ),
}


NEEDS_SANDBOX = (
    "needs the bubblewrap sandbox, which is not usable here (Blender writes files a scene "
    "names while it loads the scene, before any check can refuse it)"
)


def usable_workload_classes(
    *, sandboxed: bool = True, gpus: bool = False
) -> dict[str, tuple[bool, str]]:
    """Each known workload class -> (usable here, why or why not); *sandboxed*: whether
    tasks run in the bubblewrap sandbox here (else a class that needs it is not offered);
    *gpus*: whether the slots get GPUs (else a class whose install cannot use one, such as
    a CPU build of onnxruntime, is not offered: its tasks would fail on every slot)."""
    return {
        name: (False, NEEDS_SANDBOX)
        if info.requirements.sandbox and not sandboxed
        else info.usable(gpus=gpus)
        for name, info in RUNTIMES.items()
    }
