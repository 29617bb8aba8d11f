"""Run ``ai.training`` slices on PyTorch: K inner steps, then the pseudo-gradient.

2.3.5 Work Execution: "a parallelizable sub-task runs its slice". :meth:`TorchTrainRuntime.run`
takes the decrypted slice payload (2.3.4) and returns the canonical result bytes the proof
of execution covers (2.3.6).

Theory of operation:

* nothing from the requester is executed as code: the model is rebuilt from the allowlisted
  layer list of :class:`~nodeclient.workloads.training.ModelSpec`, weights are loaded into
  it with ``load_state_dict`` from plain arrays (never ``torch.load``, never TorchScript),
  and the weights and shard containers are hashed before anything uses them;
* a slice is deterministic: ``torch.use_deterministic_algorithms(True)``, a fixed thread
  count, Dropout only with p=0, and minibatches drawn from a ``torch.Generator`` seeded with
  the slice's seed. The batch rule: ``randperm(n)`` from that generator, consecutive chunks
  of ``min(batch_size, n)`` samples, and a fresh permutation when fewer remain. Same payload
  on the same kind of device with the same thread count, same result bytes (the thread
  count changes how reductions are summed, so slots of another size differ in the last
  bits; the coordinator never compares slices across nodes);
* the device is CUDA when PyTorch sees one (it honours ``CUDA_VISIBLE_DEVICES``), else
  CPU; on CUDA, ``CUBLAS_WORKSPACE_CONFIG`` is set so cuBLAS can be deterministic too.
  On a slot with a GPU (see :mod:`.base`) a PyTorch that sees none is the node's failure
  (DeviceFailure), never a slice quietly trained on the CPU. CPU and GPU results differ
  in the last bits, so a slice's bytes are reproducible per device kind, not across kinds.

torch is imported on first use, so building the runtime is cheap and the CLI starts fast.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Final

import numpy as np
import numpy.typing as npt

from nodeclient.errors import RemoteProtocolError
from nodeclient.node.runtimes.base import DeviceFailure, Progress, gpu_slot, no_progress
from nodeclient.workloads.tensors import DEFAULT_MAX_BYTES
from nodeclient.workloads.training import (
    CLASS,
    InnerOptimizer,
    ModelSpec,
    PseudoGradient,
    SlicePlan,
    SliceRequest,
    decode_shard,
    decode_weights,
)

if TYPE_CHECKING:
    import torch

PROGRESS_REPORTS: Final = 10  # progress is reported about this many times per slice
CUBLAS_DETERMINISTIC: Final = ":4096:8"
# What a GPU worker's start-up check trains for two steps with each inner optimizer: every
# allowlisted layer kind, so that a job's first slice finds cuBLAS, the kernels and the
# optimizers already loaded (on an H200 node that first slice took 4.0 s, the next 0.05 s).
WARM_UP_MODEL: Final = [
    {"type": "Flatten"},
    {"type": "Linear", "in": 8, "out": 8},
    {"type": "LayerNorm", "dim": 8},
    {"type": "ReLU"},
    {"type": "Sequential", "layers": [
        {"type": "Linear", "in": 8, "out": 8}, {"type": "GELU"}, {"type": "Dropout"},
        {"type": "Linear", "in": 8, "out": 8}, {"type": "Tanh"},
        {"type": "Linear", "in": 8, "out": 8, "bias": False}, {"type": "Sigmoid"},
    ]},
    {"type": "Linear", "in": 8, "out": 4},
]  # fmt: skip


def usable() -> tuple[bool, str]:
    """Whether this node can offer ``ai.training`` (2.3.2 Capability Manifest), and why.

    Read from the package metadata, not by importing torch: the import takes seconds and
    the CLI asks on every start. The device (CUDA or CPU) is chosen when a slice runs.
    """
    from importlib import metadata

    try:
        version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        return False, (
            "torch is not installed (into nodeclient's own Python: pip install 'torch>=2.3'; "
            "the CPU build from --index-url https://download.pytorch.org/whl/cpu)"
        )
    return True, f"torch {version} (CUDA when visible, else CPU)"


def gpu_usable() -> tuple[bool, str]:
    """Whether ``ai.training`` can use the GPUs this node gives its slots: the installed
    torch is a CUDA build (it ships libtorch_cuda), read from the package's file list, not
    by importing torch."""
    from importlib import metadata

    try:
        files = metadata.files("torch") or []
        version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        return False, "torch is not installed"
    if any(f.name.startswith("libtorch_cuda") for f in files):
        return True, f"torch {version} (a CUDA build)"
    return False, (
        f"torch {version} is a CPU build, and this node gives its slots GPUs, where slices "
        "never run on the CPU: install the CUDA build of torch, or start the node with "
        "CUDA_VISIBLE_DEVICES= (empty) to serve on the CPU"
    )


def build_model(spec: ModelSpec) -> torch.nn.Sequential:
    """A ``torch.nn.Sequential`` from the allowlisted layers; parameter names match the spec."""
    from torch import nn

    def build(layers: Sequence[Mapping[str, Any]]) -> nn.Sequential:
        modules: list[nn.Module] = []
        for layer in layers:
            kind = layer["type"]
            if kind == "Linear":
                modules.append(nn.Linear(layer["in"], layer["out"], bias=layer["bias"]))
            elif kind == "LayerNorm":
                modules.append(nn.LayerNorm(layer["dim"], eps=layer["eps"]))
            elif kind == "Sequential":
                modules.append(build(layer["layers"]))
            elif kind == "Flatten":
                modules.append(nn.Flatten())
            elif kind == "Dropout":
                modules.append(nn.Dropout(0.0))
            else:  # the activations; ModelSpec.parse admitted nothing else
                modules.append({"ReLU": nn.ReLU, "GELU": nn.GELU, "Tanh": nn.Tanh,
                                "Sigmoid": nn.Sigmoid}[kind]())  # fmt: skip
        return nn.Sequential(*modules)

    return build(spec.layers)


def load_weights(model: torch.nn.Module, weights: Mapping[str, npt.NDArray[Any]]) -> None:
    """Copy plain arrays into the model's parameters (strict: every name, exact shapes)."""
    import torch

    state = {
        name: torch.from_numpy(np.array(array, dtype=np.float32)) for name, array in weights.items()
    }
    model.load_state_dict(state, strict=True)


def predict(
    spec: ModelSpec, weights: Mapping[str, npt.NDArray[Any]], x: npt.NDArray[Any]
) -> npt.NDArray[Any]:
    """The model's outputs for *x* on CPU: e.g. to score final weights on held-out data."""
    import torch

    model = build_model(spec)
    load_weights(model, weights)
    model.eval()
    with torch.no_grad():
        out: npt.NDArray[Any] = model(torch.from_numpy(np.array(x, dtype=np.float32))).numpy()
    return out


_F16_MAX: Final = float(np.finfo(np.float16).max)


def _check_f16(deltas: Mapping[str, npt.NDArray[np.float32]]) -> None:
    """Refuse, as the request's fault, an update that F16 cannot carry: finite values
    past its range would arrive as infinity, and an update of only values below its
    smallest would arrive as all zeros; the coordinator refuses both as a diverged or a
    forged slice, on every node. (Non-finite values, a diverged run, pass: they are the
    coordinator's to reject.)"""
    # Judged on the converted values: up to just under 65520 rounds to F16's largest,
    # 65504, and arrives finite; only past that does a value turn into infinity.
    finite = [d[np.isfinite(d)] for d in deltas.values()]
    if any(np.isinf(f.astype(np.float16)).any() for f in finite):
        biggest = max(float(np.max(np.abs(f), initial=0.0)) for f in finite)
        raise RemoteProtocolError(
            f"grad_dtype F16 cannot hold this update: a value of {biggest:.3g} is past F16's "
            f"{_F16_MAX:g}; ask for F32, or a smaller learning rate"
        )
    moved = any(np.any(d != 0) for d in deltas.values())
    if moved and not any(np.any(d.astype(np.float16) != 0) for d in deltas.values()):
        raise RemoteProtocolError(
            "grad_dtype F16 cannot hold this update: every value is below F16's smallest "
            "and would arrive as all zeros; ask for F32, or more steps or a larger "
            "learning rate"
        )


@contextlib.contextmanager
def _deterministic(threads: int) -> Iterator[None]:
    """Deterministic kernels and a fixed thread count for one slice, restored afterwards."""
    import torch

    previous = (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads())
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.set_num_threads(previous[1])


def _optimizer(params: Any, plan: SlicePlan) -> torch.optim.Optimizer:
    import torch

    inner = plan.inner
    if inner.name == "sgd":
        return torch.optim.SGD(
            params, lr=inner.lr, momentum=inner.momentum, weight_decay=inner.weight_decay
        )
    return torch.optim.AdamW(
        params, lr=inner.lr, betas=inner.betas, eps=inner.eps, weight_decay=inner.weight_decay
    )


def _cuda_unavailable() -> str:
    """Why PyTorch sees no CUDA device: ``is_available()`` hides it, initialising says it
    (a CPU build, no driver, a device it cannot open, CUDA that fails to start)."""
    import torch

    if torch.version.cuda is None:
        return "a CPU build of torch: install the CUDA build on GPU nodes"
    try:
        torch.cuda.init()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
    except (RuntimeError, AssertionError) as exc:
        return " ".join(str(exc).split())[:300]
    return f"torch.cuda.device_count() is {torch.cuda.device_count()}"


class TorchTrainRuntime:
    """Executes ``ai.training`` slices; one slice at a time per worker process."""

    workload_class: ClassVar[str] = CLASS

    def __init__(
        self,
        *,
        device: str | None = None,
        threads: int = 1,
        max_payload_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        if threads < 1:
            raise ValueError("threads must be at least 1")
        self._requested_device = device
        self._device: torch.device | None = None
        self._threads = threads
        self._max_payload_bytes = max_payload_bytes

    def device(self) -> torch.device:
        """The device slices run on, resolved on first use: CUDA when visible, else CPU.

        On a slot with a GPU, DeviceFailure when PyTorch sees none (nothing is cached, so
        every slice says so until the worker is replaced).
        """
        if self._device is None:
            import torch

            gpu = gpu_slot()
            if self._requested_device is None and gpu is not None and not torch.cuda.is_available():
                raise DeviceFailure(
                    f"this slot has a GPU but PyTorch "
                    f"{torch.__version__} sees no CUDA device ({_cuda_unavailable()}); "
                    "refusing to train on the CPU"
                )
            name = self._requested_device or ("cuda" if torch.cuda.is_available() else "cpu")
            if name.startswith("cuda"):
                # Must be set before cuBLAS initialises, or deterministic mode refuses matmuls.
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)
            self._device = torch.device(name)
        return self._device

    def self_check(self) -> None:
        """At a worker's start, on a slot with a GPU: CUDA started on the slot's card, and
        a short training run there (:meth:`_warm_up`). DeviceFailure where PyTorch cannot
        (a CPU build, a card it cannot open), so that the node withdraws ``ai.training``
        rather than fail every slice, as ``ai.inference`` does. The run's backward passes
        start PyTorch's autograd thread for the device, which holds a Python thread state
        and lives as long as the process: started here, before the worker counts its
        threads, it is the worker's; started by a slice, it read as a thread the slice
        left running, and the worker was replaced after every slice (seen on an H100 node:
        about 10 s a slice for the torch import and CUDA start, for a 60 ms slice). The run
        also loads what a slice's first steps would: cuBLAS, the layers' kernels, both
        optimizers. Nothing on a slot without a GPU: torch stays unimported until a slice
        needs it, and the CPU starts no such thread."""
        if gpu_slot() is None:
            return
        self.device()  # DeviceFailure, with why, where PyTorch sees no card
        self._warm_up()

    def _warm_up(self) -> None:
        """Two steps of :data:`WARM_UP_MODEL` with each inner optimizer, through the path a
        slice takes, under the same deterministic settings."""
        spec = ModelSpec.parse(WARM_UP_MODEL)
        rng = np.random.default_rng(0)
        x = rng.normal(size=(8, 2, 4)).astype(np.float32)
        y = np.arange(8, dtype=np.int64) % 4
        for inner in (InnerOptimizer(), InnerOptimizer(name="sgd", momentum=0.9)):
            plan = SlicePlan(round=0, slice=0, steps=2, batch_size=4, seed=0, inner=inner)
            request = SliceRequest(spec, b"", b"", plan)
            with _deterministic(self._threads):
                self._train(request, spec.init_weights(0), x, y, no_progress)

    def run(
        self,
        payload: bytes,
        *,
        workdir: Path | None = None,
        progress: Progress = no_progress,
    ) -> bytes:
        """Run one slice and return its canonical pseudo-gradient container.

        Training happens in memory: *workdir* is unused. RemoteProtocolError for a payload
        that fails its hashes or checks; a diverging run is not an error here (its
        non-finite pseudo-gradient is the coordinator's to reject).
        """
        request = SliceRequest.decode(payload, max_bytes=self._max_payload_bytes)
        weights = decode_weights(request.weights, request.model, max_bytes=self._max_payload_bytes)
        x, y = decode_shard(request.shard, request.model, max_bytes=self._max_payload_bytes)
        with _deterministic(self._threads):
            try:
                deltas, first, last = self._train(request, weights, x, y, progress)
            except RuntimeError as exc:
                # PyTorch's allocator reports the slot's memory limit as a RuntimeError:
                # it is the worker's MemoryError (an out-of-memory, told apart from a crash).
                if "allocate memory" in str(exc) or "out of memory" in str(exc).lower():
                    raise MemoryError(str(exc)[:200]) from exc
                raise
        return PseudoGradient(
            deltas=deltas,
            base_sha256=request.weights_sha256,
            shard_sha256=request.shard_sha256,
            steps=request.plan.steps,
            first_loss=first,
            last_loss=last,
        ).encode()

    def _train(
        self,
        request: SliceRequest,
        weights: Mapping[str, npt.NDArray[Any]],
        x: npt.NDArray[Any],
        y: npt.NDArray[Any],
        progress: Progress,
    ) -> tuple[dict[str, npt.NDArray[Any]], float, float]:
        import torch
        import torch.nn.functional as F

        plan, device = request.plan, self.device()
        torch.manual_seed(plan.seed)
        model = build_model(request.model)
        load_weights(model, weights)
        model.to(device).train()
        optimizer = _optimizer(model.parameters(), plan)
        inputs = torch.from_numpy(np.array(x, dtype=np.float32)).to(device)
        labels = torch.from_numpy(np.array(y, dtype=np.int64)).to(device)
        generator = torch.Generator().manual_seed(plan.seed)
        count, batch = len(labels), min(plan.batch_size, len(labels))
        order, position = torch.randperm(count, generator=generator), 0
        every = max(1, plan.steps // PROGRESS_REPORTS)
        first = last = float("nan")
        for step in range(1, plan.steps + 1):
            if position + batch > count:
                order, position = torch.randperm(count, generator=generator), 0
            index = order[position : position + batch].to(device)
            position += batch
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(inputs[index]), labels[index])
            loss.backward()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
            optimizer.step()
            last = float(loss.detach().cpu())
            if step == 1:
                first = last
            if step % every == 0 or step == plan.steps:
                progress(step, plan.steps, f"step {step} loss {last:.4f}")
        end = {name: t.detach().cpu().numpy() for name, t in model.state_dict().items()}
        full = {name: np.asarray(start, np.float32) - end[name] for name, start in weights.items()}
        if not any(np.any(d != 0) for d in full.values()):
            # Every step left every weight as it was (a learning rate too small to move an
            # F32 weight, gradients all zero): the request's doing, the same on every node;
            # sent, it would be refused as "no training was done" and blamed on the node.
            raise RemoteProtocolError(
                f"{plan.steps} steps left every weight unchanged (the update is all zeros): "
                "the learning rate is too small to move the weights, or the gradients are "
                "all zero; raise the learning rate or check the model and data"
            )
        if plan.grad_dtype == "F16":
            _check_f16(full)
            return {name: d.astype(np.float16) for name, d in full.items()}, first, last
        return full, first, last
