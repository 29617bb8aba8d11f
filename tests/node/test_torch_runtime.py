"""The PyTorch ai.training runtime: allowlisted models, deterministic slices (2.3.5, 2.3.6)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from nodeclient.errors import RemoteProtocolError
from nodeclient.node import sandbox
from nodeclient.node.executor import Executor, TaskFailed, WorkerConfig
from nodeclient.node.runtimes import RUNTIMES
from nodeclient.node.runtimes.torch_train import TorchTrainRuntime, build_model
from nodeclient.workloads import training as tr
from nodeclient.workloads.tensors import decode_tensors, encode_tensors

MLP = [
    {"type": "Linear", "in": 64, "out": 32},
    {"type": "ReLU"},
    {"type": "Linear", "in": 32, "out": 10},
]


@pytest.fixture(scope="module")
def job() -> tr.JobRequest:
    """Digits (bundled with scikit-learn, no download), 2 slices, 20 AdamW steps each."""
    digits = load_digits()
    x, y = (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)
    config = tr.TrainingConfig(
        inner_steps=20, batch_size=32, seed=5, inner=tr.InnerOptimizer(lr=3e-3)
    )
    return tr.JobRequest(tr.ModelSpec.parse(MLP), config, x[:600], y[:600])


@pytest.fixture(scope="module")
def runtime() -> TorchTrainRuntime:
    return TorchTrainRuntime()


def _reference(payload: bytes) -> tuple[dict[str, np.ndarray], float, float]:
    """The documented slice semantics, written out with plain torch in this test."""
    request = tr.SliceRequest.decode(payload)
    weights, _ = decode_tensors(request.weights)
    shard, _ = decode_tensors(request.shard)
    plan = request.plan
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    model.load_state_dict({k: torch.tensor(np.array(v)) for k, v in weights.items()})
    opt = torch.optim.AdamW(
        model.parameters(), lr=plan.inner.lr, betas=plan.inner.betas, eps=plan.inner.eps,
        weight_decay=plan.inner.weight_decay,
    )  # fmt: skip
    x, y = torch.tensor(np.array(shard["x"])), torch.tensor(np.array(shard["y"]))
    gen = torch.Generator().manual_seed(plan.seed)
    batch = min(plan.batch_size, len(y))
    order, pos, losses = torch.randperm(len(y), generator=gen), 0, []
    for _ in range(plan.steps):
        if pos + batch > len(y):
            order, pos = torch.randperm(len(y), generator=gen), 0
        idx = order[pos : pos + batch]
        pos += batch
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    end = model.state_dict()
    return {k: np.array(v) - end[k].numpy() for k, v in weights.items()}, losses[0], losses[-1]


def test_model_is_built_from_the_spec_with_matching_parameter_names() -> None:
    """The torch module's state-dict names and shapes are exactly the spec's."""
    spec = tr.ModelSpec.parse(
        [
            {"type": "Flatten"},
            {
                "type": "Sequential",
                "layers": [{"type": "Linear", "in": 6, "out": 4}, {"type": "Tanh"}],
            },
            {"type": "LayerNorm", "dim": 4, "eps": 1e-6},
            {"type": "Dropout", "p": 0},
            {"type": "Linear", "in": 4, "out": 3, "bias": False},
            {"type": "Sigmoid"},
        ]
    )
    model = build_model(spec)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == spec.parameter_shapes()
    assert model(torch.zeros(2, 2, 3)).shape == (2, 3)


def test_slice_equals_the_reference_loop(job: tr.JobRequest, runtime: TorchTrainRuntime) -> None:
    """The pseudo-gradient is start - end of K AdamW steps under the documented batch rule."""
    payload = job.round_zero(2)[0]
    pg = tr.PseudoGradient.decode(
        runtime.run(payload), shapes=job.model.parameter_shapes(), grad_dtype="F32"
    )
    deltas, first, last = _reference(payload)
    for name, expected in deltas.items():
        np.testing.assert_allclose(pg.deltas[name], expected, atol=1e-6, rtol=0)
    assert pg.first_loss == pytest.approx(first, abs=1e-6)
    assert pg.last_loss == pytest.approx(last, abs=1e-6)
    assert pg.last_loss < pg.first_loss
    request = tr.SliceRequest.decode(payload)
    assert (pg.base_sha256, pg.shard_sha256, pg.steps) == (
        request.weights_sha256, request.shard_sha256, 20,
    )  # fmt: skip


def test_same_payload_gives_the_same_bytes(job: tr.JobRequest, runtime: TorchTrainRuntime) -> None:
    """Determinism (2.3.6): one payload, one result; another slice seed, another result."""
    payload = job.round_zero(2)[1]
    assert runtime.run(payload) == TorchTrainRuntime().run(payload)
    reseeded = tr.JobRequest(job.model, tr.TrainingConfig(inner_steps=20, seed=6), job.x, job.y)
    assert runtime.run(reseeded.round_zero(2)[1]) != runtime.run(payload)


def test_a_shard_that_fails_its_hash_is_refused(
    job: tr.JobRequest, runtime: TorchTrainRuntime
) -> None:
    """The runtime trains on nothing whose SHA-256 differs from what the payload names."""
    tensors, meta = decode_tensors(job.round_zero(2)[0])
    shard = bytearray(tensors["shard"].tobytes())
    shard[-1] ^= 1
    forged = encode_tensors({"weights": tensors["weights"], "shard": np.frombuffer(bytes(shard), np.uint8)},
                            metadata=meta)  # fmt: skip
    with pytest.raises(RemoteProtocolError, match="shard has sha256"):
        runtime.run(forged)


def test_fp16_pseudo_gradient_when_asked(job: tr.JobRequest, runtime: TorchTrainRuntime) -> None:
    """grad_dtype F16 halves the result; the values are the F32 ones rounded."""
    half = tr.JobRequest(job.model, tr.TrainingConfig(inner_steps=20, seed=5, grad_dtype="F16",
                                                      inner=job.config.inner), job.x, job.y)  # fmt: skip
    shapes = job.model.parameter_shapes()
    raw16, raw32 = runtime.run(half.round_zero(2)[0]), runtime.run(job.round_zero(2)[0])
    assert len(raw16) < 0.6 * len(raw32)  # the deltas, which are most of it, halve
    pg16 = tr.PseudoGradient.decode(raw16, shapes=shapes, grad_dtype="F16")
    pg32 = tr.PseudoGradient.decode(raw32, shapes=shapes, grad_dtype="F32")
    assert pg16.deltas["0.weight"].dtype == np.float16
    np.testing.assert_array_equal(
        pg16.deltas["0.weight"], pg32.deltas["0.weight"].astype(np.float16)
    )


@pytest.mark.parametrize(
    ("lr", "scale", "reason"),
    [(1e-7, 1.0, "every value is below F16's smallest"), (10.0, 1e6, "is past F16's")],
    ids=["underflow", "overflow"],
)
def test_an_update_f16_cannot_carry_is_the_requests_fault(
    runtime: TorchTrainRuntime, lr: float, scale: float, reason: str
) -> None:
    """An update too small for F16 would arrive as all zeros (refused as a forgery), one
    too large as infinity (refused as divergence), and on every node alike: the slice is
    refused as the request's fault, naming the dtype, not sent to be blamed on nodes."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 8)) * scale).astype(np.float32)
    y = rng.integers(0, 3, 64).astype(np.int64)
    inner = tr.InnerOptimizer(name="sgd", lr=lr, weight_decay=0.0)
    model = tr.ModelSpec.parse([{"type": "Linear", "in": 8, "out": 3}])
    for dtype in ("F32", "F16"):
        config = tr.TrainingConfig(inner_steps=1, batch_size=64, grad_dtype=dtype, inner=inner)
        [payload] = tr.JobRequest(model, config, x, y).round_zero(1)
        if dtype == "F32":
            runtime.run(payload)  # F32 carries it
            continue
        with pytest.raises(RemoteProtocolError, match=reason):
            runtime.run(payload)


@pytest.mark.parametrize("dtype", ["F32", "F16"])
def test_an_update_of_all_zeros_is_the_requests_fault(
    runtime: TorchTrainRuntime, dtype: str
) -> None:
    """A learning rate too small to move an F32 weight leaves every weight as it was: the
    slice is refused as the request's fault, saying so, not sent as an all-zero update
    that the coordinator would refuse as "no training was done" and blame on the node."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 8)).astype(np.float32)
    y = rng.integers(0, 3, 64).astype(np.int64)
    inner = tr.InnerOptimizer(name="sgd", lr=1e-12, weight_decay=0.0)
    model = tr.ModelSpec.parse([{"type": "Linear", "in": 8, "out": 3}])
    config = tr.TrainingConfig(inner_steps=2, batch_size=64, grad_dtype=dtype, inner=inner)
    [payload] = tr.JobRequest(model, config, x, y).round_zero(1)
    with pytest.raises(RemoteProtocolError, match="left every weight unchanged .* too small"):
        runtime.run(payload)


def test_progress_is_reported_with_step_and_loss(
    job: tr.JobRequest, runtime: TorchTrainRuntime
) -> None:
    """progress(step, K, "step i loss x") about ten times, ending at K of K."""
    calls: list[tuple[float, float, str]] = []
    runtime.run(job.round_zero(2)[0], progress=lambda d, t, n: calls.append((d, t, n)))
    assert [c[0] for c in calls] == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    assert calls[-1][1] == 20
    assert calls[-1][2].startswith("step 20 loss ")


def test_deterministic_mode_is_restored_after_a_slice(
    job: tr.JobRequest, runtime: TorchTrainRuntime
) -> None:
    """A slice turns on deterministic algorithms and a fixed thread count only while it runs."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads())
    seen: list[Any] = []
    runtime.run(job.round_zero(2)[0], progress=lambda *_: seen.append(
        (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads())))  # fmt: skip
    assert seen[0] == (True, 1)
    assert (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()) == before


def test_runtime_is_registered_for_ai_training(tmp_path: Path) -> None:
    """The node advertises ai.training when torch imports, and the factory builds the runtime."""
    info = RUNTIMES["ai.training"]
    usable, why = info.usable()
    assert usable, why
    assert why.startswith("torch ")
    assert isinstance(info.factory(tmp_path), TorchTrainRuntime)


def _torch_mapped(pid: int) -> bool:
    with open(f"/proc/{pid}/maps", encoding="ascii", errors="replace") as fh:
        return "libtorch" in fh.read()


def test_a_worker_imports_torch_at_its_first_slice_outside_the_slices_memory_limit(
    tmp_path: Path, job: tr.JobRequest, runtime: TorchTrainRuntime
) -> None:
    """Workers do not hold torch (~125 MiB each) until a slice comes. Imported then, it
    counts against the worker, not against the slice's declared memory: a slice that
    declares 128 MB runs, in the sandbox, and gives the same bytes as in this process."""
    executor = Executor(
        slots=1, config=WorkerConfig(cache_dir=tmp_path / "cache", threads=1),
        mode=sandbox.choose_mode(allow_unsandboxed=False),
    )  # fmt: skip
    payload = job.round_zero(2)[0]

    async def scenario() -> tuple[bool, bytes, list[bool]]:
        try:
            await executor.warm_up()
            (worker,) = [p for p in psutil.Process().children(recursive=True)  # not bwrap
                         if p.cmdline()[1:4] == ["-P", "-m", "nodeclient.node.worker"]]  # fmt: skip
            before = _torch_mapped(worker.pid)
            # Read while the slice runs (its progress reports): once it has answered, the
            # worker may be replaced at any moment, and its /proc entry be gone.
            during: list[bool] = []
            result = await executor.run(
                "ai.training", payload, resources={"ram_mb": 128},
                on_progress=lambda *_: during.append(_torch_mapped(worker.pid)),
            )  # fmt: skip
            return before, result, during
        finally:
            await executor.aclose()

    before, result, during = asyncio.run(scenario())
    assert not before, "torch was loaded before any slice"
    assert result == runtime.run(payload)
    assert during and all(during)


def test_a_slice_past_its_declared_memory_fails_as_out_of_memory(tmp_path: Path) -> None:
    """A batch whose activations do not fit the memory a slice declared: PyTorch's
    allocator reports it as a RuntimeError, which the node reports as out of memory (the
    request asked too little), not as a failed execution."""
    model = tr.ModelSpec.parse([{"type": "Linear", "in": 64, "out": 4096}, {"type": "ReLU"},
                                {"type": "Linear", "in": 4096, "out": 10}])  # fmt: skip
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4096, 64)).astype(np.float32)
    y = rng.integers(0, 10, 4096).astype(np.int64)
    config = tr.TrainingConfig(inner_steps=1, batch_size=4096)  # 64 MiB an activation
    [payload] = tr.JobRequest(model, config, x, y).round_zero(1)
    executor = Executor(
        slots=1, config=WorkerConfig(cache_dir=tmp_path / "cache", threads=1),
        mode=sandbox.choose_mode(allow_unsandboxed=False),
    )  # fmt: skip

    async def scenario() -> str:
        try:
            await executor.warm_up()
            await executor.run("ai.training", payload, resources={"ram_mb": 96})
        except TaskFailed as exc:
            return exc.reason
        finally:
            await executor.aclose()
        return "it ran"

    reason = asyncio.run(scenario())
    assert reason.startswith("out of memory"), reason


def test_an_f16_update_is_judged_on_its_converted_values() -> None:
    """Up to just under 65520 a value rounds to F16's largest, 65504, and arrives finite:
    such an update is carried (it was refused as past F16's range); 65520 turns into
    infinity and is refused."""
    from nodeclient.node.runtimes.torch_train import _check_f16

    _check_f16({"a": np.array([65510.0, 1.0], np.float32), "b": np.array([np.nan], np.float32)})
    assert np.isfinite(np.float32(65519.0).astype(np.float16))
    with pytest.raises(RemoteProtocolError, match="is past F16's"):
        _check_f16({"a": np.array([65520.0, 1.0], np.float32)})
