"""OnnxRuntime on a slot with a GPU: CUDA or a loud node failure, never a quiet CPU run,
and a failing GPU is the node's fault, not the requester's (2.3.5 Work Execution).

No GPU here: onnxruntime is the CPU build. ``GpuBuild`` stands in for onnxruntime-gpu
behind ``onnxruntime.InferenceSession``: a real CPU session underneath (so models, inputs
and the model's own errors are real), with ONNX Runtime's provider bookkeeping and its
fallback to the CPU (``onnxruntime_inference_collection.py``) copied, and errors raised
with the texts ONNX Runtime gave in recorded reports.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnxruntime.capi.onnxruntime_pybind11_state import EPFail, Fail, RuntimeException

from nodeclient.errors import RemoteProtocolError
from nodeclient.node import worker
from nodeclient.node.runtimes import onnx as onnx_runtime
from nodeclient.node.runtimes.base import DeviceFailure
from nodeclient.node.runtimes.onnx import CPU_PROVIDER, CUDA_PROVIDER, OnnxRuntime, usable
from nodeclient.workloads.inference import decode_result, make_request
from tests.models import add_model, identity_model, unknown_op_model

GPU = "GPU-6b3d1d0e-5c2a-4f7e-9a51-0c6f2e9d8a41"
REAL_SESSION = ort.InferenceSession
TRT_PROVIDER = "TensorrtExecutionProvider"

# --- recorded ONNX Runtime errors ------------------------------------------------------------
# Each is the text an onnxruntime-gpu build gave, as quoted in a public issue report.

# microsoft/onnxruntime#14710: a CUDA failure inside a kernel, at run time.
EINSUM_CUDA_FAILURE = (
    "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running "
    "Einsum node. Name:'/input_blocks.4/input_blocks.4.1/transformer_blocks.0/attn1/Einsum' "
    "Status Message: /onnxruntime_src/onnxruntime/core/providers/cpu/math/einsum_utils/"
    "einsum_auxiliary_ops.cc:298 std::unique_ptr<onnxruntime::Tensor> "
    "onnxruntime::EinsumOp::Transpose(const onnxruntime::Tensor&, const "
    "onnxruntime::TensorShape&, const gsl::span<const long unsigned int>&, "
    "onnxruntime::AllocatorPtr, void*, const Transpose&) 21Einsum op: Transpose failed: CUDA "
    "failure 1: invalid argument ; GPU=1 ; hostname=3eee3adbcb74 ; "
    "expr=cudaMemcpyAsync(output.MutableDataRaw(), input.DataRaw(), input.Shape().Size() * "
    "input.DataType()->Size(), cudaMemcpyDeviceToDevice, stream); "
)
# hacksider/Deep-Live-Cam#383: cuDNN failing to start a stream's handle; the C++ signature
# before the failure is longer than what a short reason keeps.
CUDNN_FAILURE = (
    "[ONNXRuntimeError] : 1 : FAIL : /onnxruntime_src/onnxruntime/core/providers/cuda/"
    "cuda_call.cc:121 std::conditional_t<THRW, void, onnxruntime::common::Status> "
    "onnxruntime::CudaCall(ERRTYPE, const char*, const char*, ERRTYPE, const char*, const "
    "char*, int) [with ERRTYPE = cudnnStatus_t; bool THRW = true; std::conditional_t<THRW, "
    "void, onnxruntime::common::Status> = void] /onnxruntime_src/onnxruntime/core/providers/"
    "cuda/cuda_call.cc:114 std::conditional_t<THRW, void, onnxruntime::common::Status> "
    "onnxruntime::CudaCall(ERRTYPE, const char*, const char*, ERRTYPE, const char*, const "
    "char*, int) [with ERRTYPE = cudnnStatus_t; bool THRW = true; std::conditional_t<THRW, "
    "void, onnxruntime::common::Status> = void] CUDNN failure 4: CUDNN_STATUS_INTERNAL_ERROR ; "
    "GPU=0 ; hostname=Vanillarch ; file=/onnxruntime_src/onnxruntime/core/providers/cuda/"
    "cuda_stream_handle.cc ; line=53 ; expr=cudnnCreate(&cudnn_handle_); "
)
# open-mmlab/mmdeploy#2519 (run_with_iobinding wraps it as "Error in execution: ...").
CUBLAS_FAILURE = (
    "Error in execution: Non-zero status code returned while running MatMul node. "
    "Name:'MatMul_282' Status Message: CUBLAS failure 7: CUBLAS_STATUS_INVALID_VALUE ; GPU=0 ; "
    "hostname=3d6eaf0e0c1c ; file=/onnxruntime_src/onnxruntime/core/providers/cuda/math/"
    "matmul.cc ; line=154 ; expr=cublasGemmHelper( GetCublasHandle(ctx), transB, transA, "
    "static_cast<int>(helper.N()), static_cast<int>(helper.M()), static_cast<int>(helper.K()), "
    "&alpha, reinterpret_cast<const CudaT*>(right_X->Data<T>()), ldb, reinterpret_cast<const "
    "CudaT*>(left_X->Data<T>()), lda, &zero, reinterpret_cast<CudaT*>(Y->MutableData<T>()), "
    "ldc, device_prop); "
)
# microsoft/onnxruntime#14186: the older "<LIB> error executing <call>" wording.
CUDNN_ERROR_EXECUTING = (
    "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Conv node. "
    "Name:'efficientnetb4/stem_conv/Conv2D' Status Message: CUDNN error executing "
    "cudnnConvolutionForward(s_.handle, &alpha, s_.x_tensor, s_.x_data, s_.w_desc, s_.w_data, "
    "s_.conv_desc, s_.algo, workspace.get(), s_.workspace_bytes, &beta, s_.y_tensor, s_.y_data)"
)
# microsoft/onnxruntime#5295 (the illegal memory access, 700, that stays with the process)
# in the CudaCall format of onnxruntime/core/providers/cuda/cuda_call.cc.
ILLEGAL_ADDRESS = (
    "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running MatMul node. "
    "Name:'/fc/MatMul' Status Message: CUDA failure 700: an illegal memory access was "
    "encountered ; GPU=0 ; hostname=hemantj-X299-A ; file=/onnxruntime_src/onnxruntime/core/"
    "providers/cuda/gpu_data_transfer.cc ; line=73 ; expr=cudaMemcpy(dst_data, src_data, "
    "bytes, cudaMemcpyHostToDevice); "
)
# microsoft/onnxruntime#22702: the CUDA arena cannot grow (GPU memory is used up).
ARENA_EXHAUSTED = (
    "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running "
    "Conv node. Name:'/patch_embed/stages/stages.0/blocks/blocks.0/mlp/fc1/Conv' Status "
    "Message: /onnxruntime_src/onnxruntime/core/framework/bfc_arena.cc:376 void* "
    "onnxruntime::BFCArena::AllocateRawInternal(size_t, bool, onnxruntime::Stream*, bool, "
    "onnxruntime::WaitNotificationFn) Failed to allocate memory for requested buffer of size "
    "4585490524328388608"
)
# deepinsight/insightface#2524: the CUDA provider cannot open a device when it starts.
NO_DEVICE = (
    "/onnxruntime_src/onnxruntime/core/providers/cuda/cuda_call.cc:121 "
    "std::conditional_t<THRW, void, onnxruntime::common::Status> onnxruntime::CudaCall(ERRTYPE, "
    "const char*, const char*, ERRTYPE, const char*, const char*, int) [with ERRTYPE = "
    "cudaError; bool THRW = true; std::conditional_t<THRW, void, onnxruntime::common::Status> "
    "= void] /onnxruntime_src/onnxruntime/core/providers/cuda/cuda_call.cc:114 "
    "std::conditional_t<THRW, void, onnxruntime::common::Status> onnxruntime::CudaCall(ERRTYPE, "
    "const char*, const char*, ERRTYPE, const char*, const char*, int) [with ERRTYPE = "
    "cudaError; bool THRW = true; std::conditional_t<THRW, void, onnxruntime::common::Status> "
    "= void] CUDA failure 100: no CUDA-capable device is detected ; GPU=32712 ; "
    "hostname=HOME-PC ; file=/onnxruntime_src/onnxruntime/core/providers/cuda/"
    "cuda_execution_provider.cc ; line=245 ; expr=cudaSetDevice(info_.device_id); "
)
# Gourieff/sd-webui-reactor#200: the CUDA provider's libraries do not load.
LIBRARIES_DO_NOT_LOAD = (
    "D:\\a\\_work\\1\\s\\onnxruntime\\python\\onnxruntime_pybind_state.cc:743 "
    "onnxruntime::python::CreateExecutionProviderInstance CUDA_PATH is set but CUDA wasn't "
    "able to be loaded. Please install the correct version of CUDA and cuDNN as mentioned in "
    "the GPU requirements page (https://onnxruntime.ai/docs/execution-providers/"
    "CUDA-ExecutionProvider.html#requirements), make sure they're in the PATH, and that your "
    "GPU is supported."
)


@dataclass
class GpuBuild:
    """onnxruntime-gpu as the runtime sees it: which providers it offers, whether its CUDA
    provider starts, and what its sessions raise."""

    available: list[str] = field(
        default_factory=lambda: [TRT_PROVIDER, CUDA_PROVIDER, CPU_PROVIDER]
    )
    cuda_loads: bool = True  # False: ONNX Runtime logs why and goes on without CUDA
    start_error: BaseException | None = None  # raised when the CUDA provider starts
    run_error: BaseException | None = None  # raised by a run on CUDA
    preloads: int = 0
    sessions: list[FakeSession] = field(default_factory=list)

    def session(
        self, model: bytes, sess_options: Any = None, providers: Any = None, **kwargs: Any
    ) -> FakeSession:
        made = FakeSession(self, model, sess_options, providers or [], kwargs)
        self.sessions.append(made)
        return made

    def preload_dlls(self) -> None:
        self.preloads += 1


class FakeSession:
    """``InferenceSession`` of onnxruntime-gpu: fallback to the CPU as ONNX Runtime does it
    (at creation for a ValueError or RuntimeError, at run for EPFail), unless turned off."""

    def __init__(
        self,
        build: GpuBuild,
        model: bytes,
        options: Any,
        providers: list[str],
        kwargs: dict[str, Any],
    ) -> None:
        self._build = build
        self.fallback = int(kwargs.get("enable_fallback", 1)) == 1
        self._cpu = REAL_SESSION(model, sess_options=options, providers=[CPU_PROVIDER])
        self._providers = [CPU_PROVIDER]
        if CUDA_PROVIDER not in providers:
            return
        error = build.start_error
        if error is not None:
            if not (self.fallback and isinstance(error, ValueError | RuntimeError)):
                raise error
            self.fallback = False  # "EP Error ... Falling back to ['CPUExecutionProvider']"
        elif build.cuda_loads:
            self._providers = [CUDA_PROVIDER, CPU_PROVIDER]

    def get_providers(self) -> list[str]:
        return list(self._providers)

    def get_inputs(self) -> Any:
        return self._cpu.get_inputs()

    def get_outputs(self) -> Any:
        return self._cpu.get_outputs()

    def disable_fallback(self) -> None:
        self.fallback = False

    def run(self, names: Any, feed: Any, run_options: Any = None) -> Any:
        error = self._build.run_error
        if CUDA_PROVIDER in self._providers and error is not None:
            if not (self.fallback and isinstance(error, EPFail)):
                raise error
            self._providers, self.fallback = [CPU_PROVIDER], False  # retried on the CPU, once
        return self._cpu.run(names, feed, run_options)


@pytest.fixture
def build(monkeypatch: pytest.MonkeyPatch) -> GpuBuild:
    """This process as a worker of a GPU slot, with onnxruntime-gpu standing in."""
    fake = GpuBuild()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", GPU)
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(fake.available))
    monkeypatch.setattr(ort, "InferenceSession", fake.session)
    monkeypatch.setattr(ort, "preload_dlls", fake.preload_dlls, raising=False)
    monkeypatch.setattr(onnx_runtime, "_preloaded", [], raising=False)  # a fresh process
    return fake


def _payload(model: bytes, **inputs: np.ndarray) -> bytes:
    return make_request(model, inputs).encode()


def _add_inputs() -> dict[str, np.ndarray]:
    return {"a": np.ones((2, 3), np.float32), "b": np.ones((2, 3), np.float32)}


# --- the provider must load: no quiet CPU ----------------------------------------------------


def test_a_gpu_slot_runs_on_cuda_and_preloads_the_libraries_once(build: GpuBuild) -> None:
    """CUDA first, CPU only for what CUDA lacks; preload_dlls() runs once per process, not
    per runtime or per model."""
    first, second = OnnxRuntime(), OnnxRuntime()
    for runtime in (first, second):
        outputs, _ = decode_result(runtime.run(_payload(add_model(), **_add_inputs())))
        np.testing.assert_array_equal(outputs["sum"], np.full((2, 3), 2.0))
        runtime.run(_payload(identity_model(), x=np.ones(1, np.float32)))
    assert first.providers() == [CUDA_PROVIDER, CPU_PROVIDER]
    assert [s.get_providers() for s in build.sessions] == [[CUDA_PROVIDER, CPU_PROVIDER]] * 4
    assert build.preloads == 1


def test_a_gpu_slot_works_where_onnxruntime_has_no_preload_dlls(
    build: GpuBuild, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Builds before 1.21 lack preload_dlls(): sessions are still created on CUDA."""
    monkeypatch.delattr(ort, "preload_dlls")
    outputs, _ = decode_result(OnnxRuntime().run(_payload(add_model(), **_add_inputs())))
    np.testing.assert_array_equal(outputs["sum"], np.full((2, 3), 2.0))
    assert build.sessions[0].get_providers()[0] == CUDA_PROVIDER


def test_a_cuda_provider_that_does_not_load_fails_as_the_nodes(build: GpuBuild) -> None:
    """ONNX Runtime only logs that the CUDA provider did not load and builds the session
    on the CPU: the node's failure (not the request's), naming what happened."""
    build.cuda_loads = False
    with pytest.raises(
        DeviceFailure, match="CUDA execution provider did not load on this GPU slot"
    ) as got:
        OnnxRuntime().run(_payload(add_model(), **_add_inputs()))
    assert "['CPUExecutionProvider']" in str(got.value)
    assert GPU not in str(got.value)  # the card's UUID stays on the node (reasons travel)


def test_a_cuda_provider_that_cannot_start_is_not_retried_on_the_cpu(build: GpuBuild) -> None:
    """ONNX Runtime would catch the provider's RuntimeError, print "Falling back", and
    build the session on the CPU: on a GPU slot that fallback is off."""
    build.start_error = RuntimeError(NO_DEVICE)
    with pytest.raises(
        DeviceFailure,
        match="the GPU failed while loading the model: CUDA failure 100: no CUDA-capable device",
    ) as got:
        OnnxRuntime().run(_payload(add_model(), **_add_inputs()))
    assert "HOME-PC" not in str(got.value)  # the host name stays on the node


def test_cuda_libraries_that_do_not_load_are_the_nodes_failure(build: GpuBuild) -> None:
    """The provider's "CUDA wasn't able to be loaded" is a broken install, not a bad model."""
    build.start_error = RuntimeError(LIBRARIES_DO_NOT_LOAD)
    with pytest.raises(DeviceFailure, match="CUDA wasn't able to be loaded"):
        OnnxRuntime().run(_payload(add_model(), **_add_inputs()))


def test_a_provider_failure_at_run_is_not_retried_on_the_cpu(build: GpuBuild) -> None:
    """ONNX Runtime would answer an EPFail by switching the session to the CPU for good:
    on a GPU slot the failure is the node's instead."""
    build.run_error = EPFail("[ONNXRuntimeError] : 11 : EP_FAIL : the CUDA provider failed")
    with pytest.raises(DeviceFailure, match="the GPU failed while running the model"):
        OnnxRuntime().run(_payload(add_model(), **_add_inputs()))
    assert build.sessions[0].get_providers()[0] == CUDA_PROVIDER


def test_a_cpu_build_of_onnxruntime_on_a_gpu_slot_fails_as_the_nodes(build: GpuBuild) -> None:
    """A node with a GPU and the CPU build of onnxruntime would run every inference on the
    CPU while declaring the GPU: refused, saying what to install."""
    build.available = ["AzureExecutionProvider", CPU_PROVIDER]
    with pytest.raises(DeviceFailure, match="no CUDAExecutionProvider .* install onnxruntime-gpu"):
        OnnxRuntime().run(_payload(add_model(), **_add_inputs()))
    assert build.sessions == []


def test_usable_says_that_cuda_is_built_in_not_that_it_works(build: GpuBuild) -> None:
    """get_available_providers() lists what the build contains, not what loads: usable()
    says so, and says what a build without CUDA means for GPU slots."""
    ok, detail = usable()
    assert ok and "CUDAExecutionProvider is built in and must load on slots with a GPU" in detail
    build.available = [CPU_PROVIDER]
    ok, detail = usable()
    assert ok and "no CUDAExecutionProvider, so slots with a GPU fail ai.inference" in detail


# --- whose fault a failure is ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        pytest.param(
            Fail(ILLEGAL_ADDRESS), "CUDA failure 700: an illegal memory access", id="cuda-700"
        ),
        pytest.param(
            RuntimeException(EINSUM_CUDA_FAILURE),
            "CUDA failure 1: invalid argument",
            id="cuda-in-kernel",
        ),
        pytest.param(
            Fail(CUDNN_FAILURE), "CUDNN failure 4: CUDNN_STATUS_INTERNAL_ERROR", id="cudnn"
        ),
        pytest.param(
            RuntimeError(CUBLAS_FAILURE),
            "CUBLAS failure 7: CUBLAS_STATUS_INVALID_VALUE",
            id="cublas",
        ),
        pytest.param(
            Fail(CUDNN_ERROR_EXECUTING),
            "CUDNN error executing cudnnConvolutionForward",
            id="cudnn-old",
        ),
        pytest.param(
            Fail(  # a cudaError_t by name, as the review quoted it, in a node's Status Message
                "Non-zero status code returned while running Add node. Name:'add' Status "
                "Message: CUDA error cudaErrorIllegalAddress:an illegal memory access was "
                "encountered"
            ),
            "CUDA error cudaErrorIllegalAddress",
            id="cuda-error-name",
        ),
    ],
)
def test_a_cuda_failure_at_run_is_the_nodes(
    build: GpuBuild, error: BaseException, reason: str
) -> None:
    """A failure ONNX Runtime names as CUDA's, cuDNN's or cuBLAS's is the node's (the
    worker is replaced), not the requester's; the reason starts at the failure, however
    long the C++ signature before it."""
    build.run_error = error
    with pytest.raises(DeviceFailure) as got:
        OnnxRuntime().run(_payload(add_model(), **_add_inputs()))
    assert not isinstance(got.value, RemoteProtocolError)
    assert str(got.value).startswith(f"the GPU failed while running the model: {reason}")
    assert "hostname=(withheld)" in str(got.value) or "hostname" not in str(error)


def test_a_cuda_failure_while_loading_is_the_nodes(build: GpuBuild) -> None:
    """A cuDNN that fails while a session is built (ZLUDA/ZLUDA#321's recorded text) is
    not a model that cannot be loaded."""
    build.start_error = RuntimeException(
        "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Exception during initialization: "
        "D:\\a_work\\1\\s\\onnxruntime\\core\\providers\\cuda\\cuda_call.cc:121 "
        "onnxruntime::CudaCall D:\\a_work\\1\\s\\onnxruntime\\core\\providers\\cuda\\"
        "cuda_call.cc:114 onnxruntime::CudaCall CUDNN failure 4: CUDNN_STATUS_INTERNAL_ERROR ; "
        "GPU=0 ; hostname=DESKTOP-8DCH4H4 ; file=D:\\a_work\\1\\s\\onnxruntime\\core\\providers"
        "\\cuda\\cuda_execution_provider.cc ; line=182 ; expr=cudnnCreate(&cudnn_handle_); "
    )
    with pytest.raises(DeviceFailure, match="while loading the model: CUDNN failure 4"):
        OnnxRuntime().run(_payload(add_model(), **_add_inputs()))


def test_gpu_memory_that_runs_out_is_out_of_memory(build: GpuBuild) -> None:
    """The CUDA arena that cannot grow is out of memory, not a bad payload."""
    build.run_error = RuntimeException(ARENA_EXHAUSTED)
    with pytest.raises(MemoryError, match="Failed to allocate memory for requested buffer"):
        OnnxRuntime().run(_payload(add_model(), **_add_inputs()))


def test_requests_that_do_not_fit_the_model_stay_the_requesters_on_a_gpu_slot(
    build: GpuBuild,
) -> None:
    """The runtime's own checks, ONNX Runtime's refusal of a graph, and a run that fails on
    the request's shapes are the requester's on a GPU slot too."""
    runtime = OnnxRuntime()
    with pytest.raises(RemoteProtocolError, match="'a' has shape \\[1, 4\\]"):
        runtime.run(
            _payload(add_model(), a=np.ones((1, 4), np.float32), b=np.ones((1, 4), np.float32))
        )
    with pytest.raises(RemoteProtocolError, match="inference failed: .*Add"):
        runtime.run(
            _payload(add_model(), a=np.ones((2, 3), np.float32), b=np.ones((3, 3), np.float32))
        )
    with pytest.raises(RemoteProtocolError, match="model cannot be loaded: .*NoSuchOperator"):
        runtime.run(_payload(unknown_op_model(), x=np.ones(1, np.float32)))


def _named_failure_model() -> bytes:
    """A Reshape to 7 elements, whose node is named like ONNX Runtime's CUDA failure and
    whose constant is named like an allocation failure."""
    bad = helper.make_tensor(
        "Failed to allocate memory for requested buffer of size 1", TensorProto.INT64, [1], [7]
    )
    node = helper.make_node(
        "Reshape", ["x", bad.name], ["y"], name=ILLEGAL_ADDRESS.split("Status Message: ")[1]
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [bad],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def test_a_model_cannot_pass_its_own_failure_off_as_the_gpus(build: GpuBuild) -> None:
    """ONNX Runtime quotes node names in its errors: a model whose node is named "CUDA
    failure 700: ..." and whose failing Reshape is the model's own fault stays the
    requester's, and leaves the worker in place."""
    with pytest.raises(
        RemoteProtocolError, match="inference failed: .*running Reshape node"
    ) as got:
        OnnxRuntime().run(_payload(_named_failure_model(), x=np.ones(3, np.float32)))
    assert "CUDA failure 700" in str(got.value)  # ONNX Runtime did quote the node's name


def test_outside_a_worker_it_is_as_before(build: GpuBuild, monkeypatch: pytest.MonkeyPatch) -> None:
    """No CUDA_VISIBLE_DEVICES at all (this runtime used outside a worker: a worker without
    a GPU has it empty, below): CUDA first when the build offers it, ONNX Runtime's own
    fallback to the CPU when it does not start, nothing preloaded, and a run's errors on a
    CPU session are the requester's whatever they say."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    build.start_error = RuntimeError(NO_DEVICE)
    runtime = OnnxRuntime()
    outputs, _ = decode_result(runtime.run(_payload(add_model(), **_add_inputs())))
    np.testing.assert_array_equal(outputs["sum"], np.full((2, 3), 2.0))
    assert runtime.providers() == [CUDA_PROVIDER, CPU_PROVIDER]
    assert build.sessions[0].get_providers() == [CPU_PROVIDER] and build.preloads == 0
    build.run_error = Fail(ILLEGAL_ADDRESS)  # never raised: the session is on the CPU
    runtime.run(_payload(add_model(), **_add_inputs()))


# --- through the worker: who is blamed, and whether it is replaced ----------------------------


def _worker_answer(tmp_path: Path, payload: bytes) -> dict[str, Any]:
    """The answer a worker (unsandboxed, in this process) gives for one ai.inference task."""
    config = {
        "workdir": str(tmp_path),
        "sandboxed": False,
        "max_result_bytes": 1 << 20,
        "cache_dir": str(tmp_path / "cache"),
        "runtimes": {"ai.inference": "nodeclient.node.runtimes:_onnx"},
    }
    read_fd, write_fd = os.pipe()
    try:
        w = worker.Worker(config, out_fd=write_fd)
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(tmp_path)  # the worker changes directory per task; the context restores it
            w.run_task({"id": 1, "class": "ai.inference"}, payload)
    finally:
        os.close(write_fd)
    with os.fdopen(read_fd, "rb") as stream:
        answer = worker.read_frame(stream, max_body=1 << 20)
    assert answer is not None
    return dict(answer.header)


@pytest.mark.parametrize(
    ("error", "kind", "reason"),
    [
        pytest.param(
            Fail(ILLEGAL_ADDRESS),
            "failed",
            "execution failed: DeviceFailure: the GPU failed",
            id="cuda",
        ),
        pytest.param(
            RuntimeException(ARENA_EXHAUSTED), "oom", "out of memory (MemoryError)", id="gpu-oom"
        ),
        pytest.param(None, "requester", "bad payload: input 'a' has shape [1, 4]", id="bad-input"),
    ],
)
def test_the_worker_is_replaced_after_a_gpu_failure_and_kept_after_a_bad_request(
    build: GpuBuild, tmp_path: Path, error: BaseException | None, kind: str, reason: str
) -> None:
    """A CUDA failure is the node's ("failed") and an exhausted GPU out of memory ("oom"):
    both replace the worker, whose CUDA context may be broken; a request that does not fit
    the model is the requester's and keeps it warm."""
    build.run_error = error
    shape = (2, 3) if error is not None else (1, 4)
    payload = _payload(add_model(), a=np.ones(shape, np.float32), b=np.ones(shape, np.float32))
    answer = _worker_answer(tmp_path, payload)
    assert answer["op"] == "error" and answer["kind"] == kind
    assert answer["reason"].startswith(reason)
    assert answer["restart"] is (kind != "requester")


@pytest.mark.parametrize("hidden", ["", "-1"])
def test_a_slot_whose_cards_are_hidden_runs_on_the_cpu_alone(
    build: GpuBuild, monkeypatch: pytest.MonkeyPatch, hidden: str
) -> None:
    """The executor sets CUDA_VISIBLE_DEVICES empty for a slot without a GPU (and CUDA
    reads -1 as none too): such a worker asks for the CPU only, even from a build that
    offers CUDA, so that an unsandboxed one cannot take another slot's card."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
    runtime = OnnxRuntime()
    outputs, _ = decode_result(runtime.run(_payload(add_model(), **_add_inputs())))
    np.testing.assert_array_equal(outputs["sum"], np.full((2, 3), 2.0))
    assert runtime.providers() == [CPU_PROVIDER]
    assert build.preloads == 0


def test_a_cpu_build_of_onnxruntime_cannot_serve_a_gpu_node(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A node whose slots get GPUs offers ai.inference only with a build that has the CUDA
    provider (RUNTIMES' GPU check); a node without GPUs offers it either way."""
    from nodeclient.node.runtimes import RUNTIMES, usable_workload_classes

    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU_PROVIDER])
    ok, why = usable_workload_classes(gpus=True)["ai.inference"]
    assert not ok and "no CUDAExecutionProvider" in why and "onnxruntime-gpu" in why
    assert usable_workload_classes(gpus=False)["ai.inference"][0]
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA_PROVIDER, CPU_PROVIDER])
    assert RUNTIMES["ai.inference"].usable(gpus=True)[0]


def test_the_self_check_finds_cuda_that_does_not_load(
    build: GpuBuild, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At a worker's start on a GPU slot, one session of a one-node model is made as a
    task's would be: where CUDA does not load, DeviceFailure (the worker then reports the
    class broken, and the node withdraws it); where it loads, nothing; on a slot without
    a GPU, no session is made at all."""
    OnnxRuntime().self_check()
    assert [s.get_providers() for s in build.sessions] == [[CUDA_PROVIDER, CPU_PROVIDER]]
    build.cuda_loads = False
    with pytest.raises(DeviceFailure, match="did not load on this GPU slot"):
        OnnxRuntime().self_check()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    made = len(build.sessions)
    OnnxRuntime().self_check()
    assert len(build.sessions) == made
