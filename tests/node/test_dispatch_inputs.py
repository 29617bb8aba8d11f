"""What the daemon does with a model it fetched by URL when the task does not simply run.

The model cache cannot store it (a full or failing disk): the task runs with the model
inline, or, where the payload would then be too large, is refused as this node's failure;
never as the requester's. A worker cannot read the cached file: the daemon re-hashes it.
A worker refuses the bytes as no model it can load: the daemon deletes them, so only
models that loaded stay; a model that loaded stays whatever its tasks' inputs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import hashlib
import os
import uuid
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from onnx import TensorProto

from nodeclient.errors import RemoteProtocolError
from nodeclient.node import inputs
from nodeclient.node.daemon import NodeDaemon
from nodeclient.node.executor import Executor, TaskFailed
from nodeclient.node.runtimes.onnx import ModelUnavailable, OnnxRuntime
from nodeclient.workloads.inference import InferenceRequest, make_request
from tests.models import (
    add_model,
    external_data_model,
    identity_model,
    sparse_model,
    string_output_model,
    unknown_op_model,
)
from tests.node.test_daemon_outbox import make_daemon
from tests.node.test_daemon_rejects import dispatch, later

URL = "https://models.example/m.onnx"


class Records(Executor):
    """Runs nothing: keeps each payload it is given and answers the same bytes."""

    payloads: ClassVar[list[bytes]] = []

    async def run(self, workload_class: str, payload: bytes, **kwargs: object) -> bytes:
        Records.payloads.append(payload)
        return b"a result"


def _no_space(fd: int) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _run(daemon: NodeDaemon, payload: bytes) -> None:
    async def scenario() -> None:
        await daemon._on_frame(dispatch(daemon, uuid.uuid4(), later(), payload=payload))
        while daemon.running:
            await asyncio.sleep(0.01)

    asyncio.run(asyncio.wait_for(scenario(), 10))


@pytest.mark.parametrize("fits", [True, False])
def test_a_model_the_cache_cannot_store_is_not_the_requesters_fault(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fits: bool
) -> None:
    """The cache's write fails (ENOSPC): the task runs with the model inline; or, when the
    payload would then be over the executor's limit, is refused with a reason that names
    this node's disk, not "bad input" (the requester's fault)."""
    model = identity_model()
    payload = make_request(
        model, {"x": np.ones(3, np.float32)}, inline=False, model_url=URL
    ).encode()
    daemon, _, link = make_daemon(tmp_path, Records)
    Records.payloads = []
    daemon._fetch = lambda url: model
    if not fits:
        config = dataclasses.replace(daemon.executor.config, max_payload_bytes=len(payload) + 16)
        daemon.executor.config = config
    monkeypatch.setattr(os, "fsync", _no_space)  # the model cache's write fails
    _run(daemon, payload)
    daemon._fetch_pool.shutdown(wait=True)
    monkeypatch.undo()

    (sent,) = link.frames
    if fits:
        (given,) = Records.payloads
        request = InferenceRequest.decode(given)
        assert request.model == model and request.model_url is None
        assert sent["type"] == "result"
    else:
        assert Records.payloads == []
        assert sent["type"] == "reject"
        reason = sent["message"]["reason"]
        assert "could not store the fetched model" in reason
        assert not reason.startswith("bad input")


class FailsLikeABadCacheFile(Executor):
    """Answers as a worker does that finds the cached model's bytes wrong (it sees the
    cache read-only, so cannot delete the file): the node's failure, in the words the
    worker gives it (worker.py: ``execution failed: <type>: <message>``)."""

    reason: ClassVar[str] = f"execution failed: {ModelUnavailable.__name__}: not cached"

    async def run(self, workload_class: str, payload: bytes, **kwargs: object) -> bytes:
        raise TaskFailed(self.reason, requester_fault=False)


def test_a_corrupt_cached_model_is_dropped_after_a_worker_cannot_use_it(tmp_path: Path) -> None:
    """A cache file whose bytes do not match its name (rot, or left by an older release)
    passes the daemon's cheap check, and the worker cannot use it; after that failure the
    daemon drops it, so the next task for the model fetches it again."""
    model = identity_model()
    request = make_request(model, {"x": np.ones(3, np.float32)}, inline=False, model_url=URL)
    daemon, _, link = make_daemon(tmp_path, FailsLikeABadCacheFile)
    cached = daemon.executor.config.cache_dir / "models" / request.model_sha256
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(b"not the model")
    fetched: list[str] = []
    daemon._fetch = lambda url: fetched.append(url) or model
    _run(daemon, request.encode())
    daemon._fetch_pool.shutdown(wait=True)

    (sent,) = link.frames
    assert sent["type"] == "reject" and fetched == []  # the cache said it held the model
    assert not cached.exists()
    assert inputs.needs_fetch("ai.inference", request.encode(), cache_dir=cached.parent.parent)


def test_other_failures_of_a_task_do_not_reread_its_cached_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of memory, a timeout, a GPU fault: the model is not the cause, and re-reading
    and hashing it (up to 256 MiB) for every such failure is not done."""
    model = identity_model()
    request = make_request(model, {"x": np.ones(3, np.float32)}, inline=False, model_url=URL)
    monkeypatch.setattr(FailsLikeABadCacheFile, "reason", "out of memory (MemoryError)")
    daemon, _, link = make_daemon(tmp_path, FailsLikeABadCacheFile)
    cached = daemon.executor.config.cache_dir / "models" / request.model_sha256
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(b"not the model")
    rechecked: list[str] = []
    monkeypatch.setattr(inputs, "recheck_cached_model", lambda _d, sha: rechecked.append(sha))
    _run(daemon, request.encode())
    daemon._fetch_pool.shutdown(wait=True)
    (sent,) = link.frames
    assert sent["type"] == "reject" and rechecked == [] and cached.exists()


# --- models no worker can load ----------------------------------------------------------


def _run_in_a_worker(tmp_path: Path, request: InferenceRequest) -> tuple[str, Path]:
    """Run *request*, its model by URL, through a daemon whose executor starts real
    workers (the ONNX runtime; unsandboxed): the reason of its signed reject, and where
    the daemon's cache keeps the model."""
    daemon, _, link = make_daemon(tmp_path, Executor)
    model = request.model
    assert model is not None
    by_url = dataclasses.replace(request, model=None, model_url=URL)
    daemon._fetch = lambda url: model

    async def scenario() -> None:
        try:
            await daemon._on_frame(dispatch(daemon, uuid.uuid4(), later(), payload=by_url.encode()))
            while daemon.running:
                await asyncio.sleep(0.01)
        finally:
            await daemon.executor.aclose()

    asyncio.run(asyncio.wait_for(scenario(), 60))
    daemon._fetch_pool.shutdown(wait=True)
    (sent,) = link.frames
    assert sent["type"] == "reject"
    cached = daemon.executor.config.cache_dir / "models" / request.model_sha256
    return str(sent["message"]["reason"]), cached


def _garbage_request(size: int) -> InferenceRequest:
    """A "model" of *size* bytes of 0xff, named by its true hash: no ONNX protobuf."""
    garbage = b"\xff" * size
    sha256 = hashlib.sha256(garbage).hexdigest()
    return InferenceRequest(
        model_sha256=sha256, inputs={"x": np.ones(1, np.float32)}, model=garbage
    )


def test_a_fetched_model_no_worker_can_load_is_not_kept(tmp_path: Path) -> None:
    """Bytes that match the hash the requester named but are no ONNX model (3 MiB of
    0xff) are fetched into the cache before the worker sees them; the worker refuses
    them, and the daemon then deletes them: the cache keeps only models that loaded, so a
    requester cannot fill it with blobs of the sizes it likes."""
    request = _garbage_request(3 << 20)
    reason, cached = _run_in_a_worker(tmp_path, request)
    assert reason.startswith("bad payload: model is not a valid ONNX protobuf")
    assert not cached.exists()
    payload = dataclasses.replace(request, model=None, model_url=URL).encode()
    assert inputs.needs_fetch("ai.inference", payload, cache_dir=cached.parent.parent)


def test_a_model_that_loaded_stays_cached_when_its_task_fails_on_a_bad_input(
    tmp_path: Path,
) -> None:
    """A good model, fetched, whose task sends an input of the wrong dtype: the run is
    refused, but the model loaded and stays for the next task."""
    request = make_request(identity_model(), {"x": np.ones(3, np.int32)})
    reason, cached = _run_in_a_worker(tmp_path, request)
    assert reason.startswith("bad payload: input 'x' is I32")
    assert cached.read_bytes() == identity_model()


def _worker_reason(model: bytes, **feed: np.ndarray) -> str:
    """The reason a worker gives for a requester's fault in running *model* on *feed*
    (worker.py: ``bad payload: <message>``), from the runtime it runs."""
    request = make_request(model, feed)
    with pytest.raises(RemoteProtocolError) as refused:
        OnnxRuntime().run(request.encode())
    return f"bad payload: {refused.value}"[:400]


X1 = np.ones(1, np.float32)


@pytest.mark.parametrize(
    ("model", "feed"),
    [
        (b"\xff" * 64, {"x": X1}),  # no protobuf
        (external_data_model("secret.txt", 15), {}),
        (sparse_model(1 << 28), {"x": X1}),  # 1 GiB once dense
        (unknown_op_model(), {"x": X1}),  # ONNX Runtime cannot load it
        (identity_model(elem_type=TensorProto.STRING), {"x": X1}),  # no tensor to feed
    ],
    ids=["garbage", "external data", "sparse", "unknown operator", "string input"],
)
def test_each_way_a_worker_refuses_a_models_bytes_drops_them(
    model: bytes, feed: dict[str, np.ndarray]
) -> None:
    """Each way the runtime refuses a model as no model it can load, in a worker's words,
    is one after which the daemon deletes the cached bytes."""
    assert inputs.model_refused(_worker_reason(model, **feed))


@pytest.mark.parametrize(
    ("model", "feed"),
    [
        (identity_model(), {"x": np.ones(3, np.int32)}),  # the wrong dtype
        (add_model(), {"a": np.ones((1, 3), np.float32)}),  # an input missing
        (add_model(), {"a": np.ones((2, 3), np.float32), "b": np.ones((3, 3), np.float32)}),
        (string_output_model(), {"x": np.ones(2, np.int64)}),  # an output no result carries
    ],
    ids=["dtype", "missing input", "failed run", "string output"],
)
def test_a_failed_run_of_a_model_that_loaded_keeps_it(
    model: bytes, feed: dict[str, np.ndarray]
) -> None:
    """The model loaded, and the request did not fit it, or its run failed: another
    request may run it, so it stays."""
    assert not inputs.model_refused(_worker_reason(model, **feed))


_LOAD_UNDER_A_LIMIT = """
import os, resource, sys
import numpy as np
from onnx import TensorProto, helper, numpy_helper
from nodeclient.node.runtimes.onnx import OnnxRuntime
import onnxruntime  # imported before the task's limit, as a worker's preload does

w = np.ones((64 << 20) // 4, np.float32)  # a good 64 MiB model
graph = helper.make_graph(
    [helper.make_node("Add", ["x", "w"], ["y"])], "g",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [w.size])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [w.size])],
    initializer=[numpy_helper.from_array(w, "w")],
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
model.ir_version = 8
data = model.SerializeToString()
runtime = OnnxRuntime(providers=["CPUExecutionProvider"], intra_op_threads=1)
with open("/proc/self/statm") as statm:
    held = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
resource.setrlimit(resource.RLIMIT_AS, (held + (int(sys.argv[1]) << 20), resource.RLIM_INFINITY))
try:
    runtime._create(data)
except Exception as exc:
    print(f"bad payload: {exc}"[:400])
else:
    print("loaded")
"""


@pytest.mark.parametrize("room_mb", [40, 80], ids=["protobuf parser", "onnx runtime"])
def test_a_good_model_that_ran_out_of_memory_as_it_loaded_is_kept(room_mb: int) -> None:
    """A task that declared too little RAM for a good model (its worker's address space
    held to it): the load fails, in the protobuf parser's or ONNX Runtime's words for an
    allocation that failed, which read like a refusal of the bytes. Such a model is not
    taken for one no worker can load, so the daemon keeps it."""
    import subprocess
    import sys

    said = subprocess.run(
        [sys.executable, "-c", _LOAD_UNDER_A_LIMIT, str(room_mb)],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout.strip()  # fmt: skip
    assert said.startswith("bad payload: model "), said  # refused as it loaded
    assert not inputs.model_refused(said), said


def test_a_refusal_that_quotes_memory_words_from_the_model_is_still_one() -> None:
    """ONNX Runtime's messages quote the model's own node names: a model with an unknown
    operator in a node named "out of memory" or "std::bad_alloc" is refused as no model it
    can load all the same (only how a failed allocation's message ends counts)."""
    for name in ("out of memory", "Arena alloc failed", "std::bad_alloc", "MemoryError"):
        reason = _worker_reason(unknown_op_model(node_name=name), x=X1)
        assert name in reason
        assert inputs.model_refused(reason), reason


def test_a_model_that_ran_here_is_never_dropped_for_a_later_refusal(tmp_path: Path) -> None:
    """Bytes that loaded and ran on this node are a model, whatever a later task's
    failure says: only a model that never ran here is dropped when a worker refuses it."""
    daemon, _, _ = make_daemon(tmp_path)
    models = daemon.executor.config.cache_dir / "models"
    models.mkdir(parents=True)
    ran, never = "a" * 64, "b" * 64
    for sha in (ran, never):
        (models / sha).write_bytes(b"model")
    daemon._model_ran({"model_sha256": ran})
    refusal = "bad payload: model cannot be loaded: the load failed"
    for sha in (ran, never):
        asyncio.run(daemon._after_model_failure(refusal, {"model_sha256": sha}))
    assert (models / ran).exists() and not (models / never).exists()
    daemon._fetch_pool.shutdown(wait=True)
