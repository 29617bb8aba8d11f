"""TorchTrainRuntime on a slot with a GPU: CUDA, or the node's failure, never a slice
quietly trained on the CPU (2.3.5 Work Execution).

Each test sets up the build and devices it is about by patching torch, so it passes the
same on a machine whose torch is the CUDA build and sees a card (where these tests were
also run) as on the CPU-only machines CI has.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from nodeclient.node.runtimes.base import DeviceFailure
from nodeclient.node.runtimes.torch_train import CUBLAS_DETERMINISTIC, TorchTrainRuntime
from nodeclient.workloads import training as tr
from nodeclient.workloads.training_spec import LAYER_KEYS

GPU = "GPU-6b3d1d0e-5c2a-4f7e-9a51-0c6f2e9d8a41"
MLP = [{"type": "Linear", "in": 4, "out": 3}]


def _slice_payload() -> bytes:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 4)).astype(np.float32), np.arange(16, dtype=np.int64) % 3
    config = tr.TrainingConfig(inner_steps=2, batch_size=8, seed=1)
    job = tr.JobRequest(tr.ModelSpec.parse(MLP), config, x, y)
    return job.round_zero(1)[0]


def test_a_gpu_slot_whose_torch_sees_no_gpu_fails_as_the_nodes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CPU build of torch on a GPU slot: the slice fails as the node's failure, naming
    why, and nothing is cached (every slice says so until the worker is replaced)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", GPU)
    monkeypatch.setattr(torch.version, "cuda", None)  # what the CPU build says
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    runtime = TorchTrainRuntime()
    for _ in range(2):
        with pytest.raises(DeviceFailure, match="a CPU build of torch") as got:
            runtime.run(_slice_payload())
        assert GPU not in str(got.value)  # the card's UUID stays on the node
        assert "refusing to train on the CPU" in str(got.value)


# What torch 2.11.0+cu130 raised from torch.cuda.init() on an H100 node whose
# CUDA_VISIBLE_DEVICES named no card of the machine.
NO_CUDA_GPUS = "No CUDA GPUs are available"


def test_the_reason_is_what_initialising_cuda_says(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CUDA build that sees no device: the reason is CUDA's own, which
    ``is_available()`` hides."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", GPU)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def init() -> None:
        raise RuntimeError(NO_CUDA_GPUS)

    monkeypatch.setattr(torch.cuda, "init", init)
    with pytest.raises(DeviceFailure, match=f"sees no CUDA device \\({NO_CUDA_GPUS}\\)"):
        TorchTrainRuntime().device()


def test_a_gpu_slot_trains_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """A PyTorch that sees the slot's GPU: the device is CUDA, with cuBLAS's deterministic
    workspace set before cuBLAS starts."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", GPU)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert TorchTrainRuntime().device() == torch.device("cuda")
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_DETERMINISTIC


def test_a_cpu_slot_trains_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a GPU in the slot nothing changes: the CPU, where PyTorch sees no GPU."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    runtime = TorchTrainRuntime()
    assert runtime.device() == torch.device("cpu")
    result = runtime.run(_slice_payload())
    shapes = tr.ModelSpec.parse(MLP).parameter_shapes()
    assert tr.PseudoGradient.decode(result, shapes=shapes, grad_dtype="F32").steps == 2


def test_a_cpu_build_of_torch_cannot_serve_a_gpu_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read from the package's files (no import): a CPU build has no libtorch_cuda, so a
    node whose slots get GPUs does not offer ai.training; a CUDA build ships it. (The
    installed torch's file list is edited both ways: PyPI's Linux wheel is a CUDA build,
    the one from PyTorch's CPU index is not.)"""
    from importlib import metadata

    from nodeclient.node.runtimes import torch_train

    real = [f for f in metadata.files("torch") or [] if not f.name.startswith("libtorch_cuda")]
    monkeypatch.setattr(metadata, "files", lambda _name: real)
    ok, why = torch_train.gpu_usable()
    assert not ok
    assert "is a CPU build" in why and "CUDA_VISIBLE_DEVICES= (empty)" in why
    cuda_lib = metadata.PackagePath("torch/lib/libtorch_cuda.so")
    monkeypatch.setattr(metadata, "files", lambda _name: [*real, cuda_lib])
    assert torch_train.gpu_usable()[0]


def test_the_start_up_check_imports_nothing_on_a_cpu_slot() -> None:
    """Every worker runs the self-check when it starts: on a slot without a GPU it must
    not import torch (seconds, and ~125 MiB a worker on nodes that never train)."""
    code = (
        "import sys\n"
        "from nodeclient.node.runtimes.torch_train import TorchTrainRuntime\n"
        "TorchTrainRuntime().self_check()\n"
        "print('torch' in sys.modules)\n"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "False"


def test_the_start_up_check_on_a_gpu_slot_fails_where_torch_sees_no_card(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a GPU slot the self-check starts CUDA; where torch sees no card it fails with the
    reason, and the worker withdraws ai.training (test_gpu_slots_executor)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", GPU)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceFailure, match="refusing to train on the CPU"):
        TorchTrainRuntime().self_check()


def _kinds(layers: list[dict[str, object]] | tuple[dict[str, object], ...]) -> set[object]:
    kinds = {layer["type"] for layer in layers}
    for layer in layers:
        if layer["type"] == "Sequential":
            kinds |= _kinds(layer["layers"])  # type: ignore[arg-type]
    return kinds


def test_the_start_up_check_on_a_gpu_slot_warms_up_what_a_slice_uses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After starting CUDA, the check trains every allowlisted layer kind for two steps
    with each inner optimizer, through the slice's own path and settings, so a job's first
    slice does not pay for loading cuBLAS and the kernels (4.0 s against 0.05 s on an
    H200). Torch's deterministic mode and thread count are left as they were. (The CPU
    stands in for the slot's card here.)"""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", GPU)
    threads = torch.get_num_threads() + 1  # not the thread count it starts with
    runtime = TorchTrainRuntime(device="cpu", threads=threads)
    trained: list[tuple[str, set[object], bool, int]] = []
    train = runtime._train

    def spy(request: tr.SliceRequest, *args: object) -> object:
        trained.append((
            request.plan.inner.name, _kinds(request.model.layers),
            torch.are_deterministic_algorithms_enabled(), torch.get_num_threads(),
        ))  # fmt: skip
        return train(request, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(runtime, "_train", spy)
    before = (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads())
    assert before[0] is False
    runtime.self_check()
    assert [name for name, *_ in trained] == ["adamw", "sgd"]
    assert all(kinds == set(LAYER_KEYS) for _, kinds, _, _ in trained)
    assert all(deterministic and count == threads for *_, deterministic, count in trained)
    assert (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()) == before


def test_a_slice_after_the_warm_up_is_the_slice_without_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The warm-up leaves nothing a slice reads (seeds, deterministic flags, thread
    count): a slice run after it gives the bytes a runtime that never warmed up gives."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", GPU)
    fresh = TorchTrainRuntime(device="cpu").run(_slice_payload())
    warmed = TorchTrainRuntime(device="cpu")
    warmed.self_check()
    assert warmed.run(_slice_payload()) == fresh
