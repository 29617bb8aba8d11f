"""OnnxRuntime: whole inference requests on ONNX Runtime (2.3.5 Work Execution)."""

from __future__ import annotations

import builtins
import errno
import hashlib
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from nodeclient.errors import RemoteProtocolError, UsageError
from nodeclient.node.runtimes import onnx as onnx_runtime
from nodeclient.node.runtimes.onnx import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    PARTIAL_MAX_AGE_S,
    ModelCache,
    ModelUnavailable,
    OnnxRuntime,
    UnsafeCacheError,
    default_providers,
    usable,
)
from nodeclient.workloads.inference import decode_result, make_request
from tests.models import (
    MATMUL_WEIGHTS,
    DigitsClassifier,
    add_model,
    external_data_model,
    identity_model,
    matmul_relu_model,
    sparse_model,
    string_output_model,
    train_digits_classifier,
    unknown_op_model,
)

URL = "https://coordinator.example/blobs/model"


@pytest.fixture(scope="module")
def digits() -> DigitsClassifier:
    """Trained once per module: fitting takes about a second."""
    return train_digits_classifier()


def _runtime(**kwargs: Any) -> OnnxRuntime:
    kwargs.setdefault("intra_op_threads", 1)
    return OnnxRuntime(providers=[CPU_PROVIDER], **kwargs)


def _run(runtime: OnnxRuntime, model: bytes, **inputs: np.ndarray) -> dict[str, np.ndarray]:
    outputs, _ = decode_result(runtime.run(make_request(model, inputs).encode()))
    return outputs


def _direct(model: bytes, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model, providers=[CPU_PROVIDER])
    return list(session.run(None, inputs))


class CountingFetcher:
    """Serves one model by URL and counts calls; an injected function, not a patch."""

    def __init__(self, model: bytes) -> None:
        self.model = model
        self.calls: list[str] = []

    def __call__(self, url: str) -> bytes:
        self.calls.append(url)
        return self.model


# --- running models -------------------------------------------------------------------


def test_identity_returns_input_bit_for_bit() -> None:
    """Identity gives back exactly the input bits, NaN payloads and signed zeros included."""
    x = np.array([1.5, -0.0, np.nan, np.inf], dtype=np.float32)
    y = _run(_runtime(), identity_model(), x=x)["y"]
    assert y.tobytes() == x.tobytes()


def test_add_of_two_inputs() -> None:
    """A model with two named inputs gets each from the tensor of the same name."""
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.full((2, 3), 0.5, dtype=np.float32)
    assert np.array_equal(_run(_runtime(), add_model(), a=a, b=b)["sum"], a + b)


def test_matmul_relu_matches_numpy_and_direct_session() -> None:
    """relu(x @ W) agrees with numpy, and bit for bit with a direct InferenceSession."""
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    y = _run(_runtime(), matmul_relu_model(), x=x)["y"]
    np.testing.assert_allclose(y, np.maximum(x @ MATMUL_WEIGHTS, 0), rtol=1e-6, atol=1e-6)
    assert y.tobytes() == _direct(matmul_relu_model(), {"x": x})[0].tobytes()


def test_digits_classifier_accuracy(digits: DigitsClassifier) -> None:
    """A real classifier, run through the node, is accurate on held-out digits."""
    labels = _run(_runtime(), digits.onnx_model, X=digits.x_test)["label"]
    assert labels.shape == digits.y_test.shape
    assert float(np.mean(labels == digits.y_test)) > 0.9


def test_digits_classifier_agrees_with_sklearn(digits: DigitsClassifier) -> None:
    """The ONNX run predicts what scikit-learn predicts on at least 99% of samples."""
    labels = _run(_runtime(), digits.onnx_model, X=digits.x_test)["label"]
    assert float(np.mean(labels == digits.estimator.predict(digits.x_test))) >= 0.99


def test_digits_outputs_equal_direct_session(digits: DigitsClassifier) -> None:
    """Labels and probabilities equal a direct onnxruntime run bit for bit."""
    outputs = _run(_runtime(), digits.onnx_model, X=digits.x_test)
    label, probabilities = _direct(digits.onnx_model, {"X": digits.x_test})
    assert outputs["label"].tobytes() == label.tobytes()
    assert outputs["probabilities"].tobytes() == probabilities.tobytes()


def test_result_bytes_are_deterministic(digits: DigitsClassifier) -> None:
    """The same request gives identical result bytes, on one runtime or on two (2.3.6)."""
    payload = make_request(digits.onnx_model, {"X": digits.x_test}).encode()
    runtime = _runtime()
    first = runtime.run(payload)
    assert runtime.run(payload) == first
    assert _runtime().run(payload) == first


def test_requested_outputs_only() -> None:
    """With output names, the result holds those outputs only."""
    request = make_request(
        matmul_relu_model(), {"x": np.ones((2, 4), np.float32)}, output_names=["y"]
    )
    outputs, metadata = decode_result(_runtime().run(request.encode()))
    assert list(outputs) == ["y"]
    assert metadata["model_sha256"] == hashlib.sha256(matmul_relu_model()).hexdigest()


# --- warm sessions --------------------------------------------------------------------


def test_session_stays_warm() -> None:
    """A second request for the same model reuses the session."""
    runtime = _runtime()
    _run(runtime, identity_model(), x=np.zeros(2, np.float32))
    _run(runtime, identity_model(), x=np.ones(3, np.float32))
    assert runtime.sessions_created == 1


def test_sessions_are_bounded_lru() -> None:
    """Past max_sessions the least recently used session is dropped and later rebuilt."""
    runtime = _runtime(max_sessions=2)
    identity, add, matmul = identity_model(), add_model(), matmul_relu_model()
    pair = {"a": np.zeros((1, 3), np.float32), "b": np.zeros((1, 3), np.float32)}
    _run(runtime, identity, x=np.zeros(1, np.float32))
    _run(runtime, add, **pair)
    _run(runtime, identity, x=np.zeros(1, np.float32))  # identity is now most recent
    _run(runtime, matmul, x=np.zeros((1, 4), np.float32))  # evicts add
    assert runtime.warm_models == [
        hashlib.sha256(identity).hexdigest(),
        hashlib.sha256(matmul).hexdigest(),
    ]
    assert runtime.sessions_created == 3
    _run(runtime, add, **pair)
    assert runtime.sessions_created == 4


def test_concurrent_requests_for_a_new_model_build_one_session() -> None:
    """Threads racing on one new model fetch it once and build one session."""
    model = identity_model()
    fetcher = CountingFetcher(model)
    runtime = _runtime(fetch_model=fetcher)
    payload = _url_payload(model, x=np.ones(2, np.float32))
    barrier = threading.Barrier(8)

    def worker() -> bytes:
        barrier.wait()
        return runtime.run(payload)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: worker(), range(8)))
    assert len(set(results)) == 1
    assert fetcher.calls == [URL]
    assert runtime.sessions_created == 1


def test_warm_model_is_served_while_another_is_fetched() -> None:
    """A slow fetch of one model does not hold up requests for a warm one."""
    slow_model = add_model()
    fetching, release = threading.Event(), threading.Event()
    timed_out: list[bool] = []

    def slow_fetch(url: str) -> bytes:
        fetching.set()
        timed_out.append(not release.wait(timeout=10))
        return slow_model

    runtime = _runtime(fetch_model=slow_fetch)
    warm_payload = make_request(identity_model(), {"x": np.ones(2, np.float32)}).encode()
    runtime.run(warm_payload)
    pair = {"a": np.ones((1, 3), np.float32), "b": np.ones((1, 3), np.float32)}
    with ThreadPoolExecutor(max_workers=1) as pool:
        slow = pool.submit(runtime.run, _url_payload(slow_model, **pair))
        assert fetching.wait(timeout=10)
        try:
            runtime.run(warm_payload)  # must complete while the fetch is still blocked
        finally:
            release.set()
        outputs, _ = decode_result(slow.result(timeout=10))
    assert timed_out == [False]
    assert outputs["sum"].tolist() == [[2.0, 2.0, 2.0]]


# --- fetching and the on-disk cache ---------------------------------------------------


def _url_payload(model: bytes, **inputs: np.ndarray) -> bytes:
    return make_request(model, inputs, inline=False, model_url=URL).encode()


def test_fetched_model_is_cached_and_reused(tmp_path: Path) -> None:
    """A model fetched by URL is stored under its hash and a new runtime uses it unfetched."""
    model = identity_model()
    sha = hashlib.sha256(model).hexdigest()
    payload = _url_payload(model, x=np.ones(2, np.float32))
    fetcher = CountingFetcher(model)
    first = _runtime(cache_dir=tmp_path, fetch_model=fetcher)
    result = first.run(payload)
    assert fetcher.calls == [URL]
    assert (tmp_path / sha).read_bytes() == model
    assert first.run(payload) == result
    assert fetcher.calls == [URL]  # warm session: no second fetch

    refetch = CountingFetcher(model)
    second = _runtime(cache_dir=tmp_path, fetch_model=refetch)
    assert second.run(payload) == result
    assert refetch.calls == []  # served from disk


def test_wrong_hash_fetch_is_rejected_and_not_cached(tmp_path: Path) -> None:
    """Bytes whose SHA-256 differs from the request are refused and never stored."""
    payload = _url_payload(identity_model(), x=np.ones(2, np.float32))
    runtime = _runtime(cache_dir=tmp_path, fetch_model=CountingFetcher(add_model()))
    with pytest.raises(RemoteProtocolError, match=r"has sha256 \w+, but the request says"):
        runtime.run(payload)
    assert list(tmp_path.iterdir()) == []
    assert runtime.sessions_created == 0


def test_url_model_without_fetcher_is_refused_as_the_nodes_failure() -> None:
    """A worker (no fetcher) runs a by-URL request only from the cache, which the daemon
    filled before the task: a model not there (evicted for another task's since, or
    unreadable) is this node's failure, not a bad request, so the task may go elsewhere
    without blaming the requester."""
    with pytest.raises(ModelUnavailable, match="not in this node's cache") as info:
        _runtime().run(_url_payload(identity_model(), x=np.ones(2, np.float32)))
    assert not isinstance(info.value, RemoteProtocolError)


def test_corrupt_cache_entry_is_dropped_and_refetched(tmp_path: Path) -> None:
    """A cached file that no longer matches its hash is deleted and the model refetched."""
    model = identity_model()
    sha = hashlib.sha256(model).hexdigest()
    (tmp_path / sha).write_bytes(b"tampered")
    fetcher = CountingFetcher(model)
    _runtime(cache_dir=tmp_path, fetch_model=fetcher).run(
        _url_payload(model, x=np.ones(1, np.float32))
    )
    assert fetcher.calls == [URL]
    assert (tmp_path / sha).read_bytes() == model


def test_inline_models_are_not_written_to_disk(tmp_path: Path) -> None:
    """Inline models travelled sealed; the node keeps no plaintext copy on disk."""
    _run(_runtime(cache_dir=tmp_path), identity_model(), x=np.ones(2, np.float32))
    assert list(tmp_path.iterdir()) == []


def test_unloadable_fetched_model_is_not_cached(tmp_path: Path) -> None:
    """Only models that ONNX Runtime loaded are kept: a bad one with a right hash is not."""
    model = unknown_op_model()
    payload = _url_payload(model, x=np.ones(1, np.float32))
    runtime = _runtime(cache_dir=tmp_path, fetch_model=CountingFetcher(model))
    with pytest.raises(RemoteProtocolError, match="model cannot be loaded"):
        runtime.run(payload)
    assert list(tmp_path.iterdir()) == []


class FakeClock:
    """A settable clock for cache recency."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_cache_evicts_least_recently_used(tmp_path: Path) -> None:
    """Past max_bytes, the entry read or written longest ago goes first."""
    clock = FakeClock()
    cache = ModelCache(tmp_path, max_bytes=20, clock=clock)
    a, b, c = b"a" * 8, b"b" * 8, b"c" * 8
    assert cache.put(_digest(a), a)
    clock.now += 10
    assert cache.put(_digest(b), b)
    clock.now += 10
    assert cache.get(_digest(a)) == a  # a is now more recent than b
    clock.now += 10
    assert cache.put(_digest(c), c)
    assert [sha for sha, _, _ in cache.entries()] == [_digest(a), _digest(c)]


_FOLDED_AT_LOAD = """
import resource
import onnxruntime as ort
from onnx import TensorProto, helper
from nodeclient.node.runtimes.onnx import OnnxRuntime

# onnxruntime-gpu standing in, its sessions made on the CPU with the options given
real = ort.InferenceSession
ort.get_available_providers = lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
ort.preload_dlls = lambda *args, **kwargs: None


class OnTheCard:
    def __init__(self, model, sess_options, providers, **kwargs):
        self._cpu = real(model, sess_options=sess_options, providers=["CPUExecutionProvider"])

    def get_providers(self):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def __getattr__(self, name):
        return getattr(self._cpu, name)


ort.InferenceSession = OnTheCard
shape = helper.make_tensor("shape", TensorProto.INT64, [1], [1 << 28])  # 1 GiB of floats
one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
graph = helper.make_graph(
    [
        helper.make_node("ConstantOfShape", ["shape"], ["big"], value=one),
        helper.make_node("ReduceMax", ["big"], ["m"], keepdims=1),
        helper.make_node("Add", ["x", "m"], ["y"]),
    ],
    "g",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    initializer=[shape],
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
model.ir_version = 8
data = model.SerializeToString()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
OnnxRuntime(intra_op_threads=1)._create(data)
print(len(data), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) >> 10)
"""


def test_a_tiny_model_cannot_take_gigabytes_as_a_gpu_slot_loads_it() -> None:
    """A GPU slot's worker has no address-space limit. ONNX Runtime's constant folding
    would run a 182-byte model's ConstantOfShape of 2^28 floats on the CPU as the session
    is made (2 GiB, before any request is looked at); on a GPU slot it is not folded, and
    the subgraph runs with the task, on the card."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0"}
    out = subprocess.run(
        [sys.executable, "-c", _FOLDED_AT_LOAD], capture_output=True, text=True, env=env,
        check=True, timeout=120,
    )  # fmt: skip
    size, grew_mib = map(int, out.stdout.split())
    assert size < 256
    assert grew_mib < 256, f"a {size}-byte model took {grew_mib} MiB as it loaded"


class SmallDisk:
    """A file system of *capacity* bytes that holds the cache directory and *elsewhere*
    bytes of other files (the outbox, say): what a cache sees free on it."""

    def __init__(self, directory: Path, capacity: int, elsewhere: int = 0) -> None:
        self.directory, self.capacity, self.elsewhere = directory, capacity, elsewhere

    def free(self, _fd: int) -> int:
        held = sum(f.stat().st_size for f in self.directory.iterdir() if f.is_file())
        return self.capacity - self.elsewhere - held


def _small_disk(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, clock: FakeClock
) -> tuple[ModelCache, SmallDisk, list[bytes]]:
    """A cache on a 10 KiB disk that keeps 2 KiB free, holding three 2 KiB entries
    written in turn (the first least recently used): 4 KiB free."""
    disk = SmallDisk(tmp_path, capacity=10 << 10)
    monkeypatch.setattr(onnx_runtime, "_free_bytes", disk.free)
    cache = ModelCache(tmp_path, max_bytes=1 << 20, clock=clock, min_free_bytes=2 << 10)
    held = [bytes([i]) * (2 << 10) for i in range(3)]
    for data in held:
        assert cache.put(_digest(data), data)
        clock.now += 10
    assert disk.free(0) == 4 << 10
    return cache, disk, held


def test_a_cache_write_leaves_its_disk_the_reserve_evicting_the_oldest(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A write that would leave less than min_free_bytes free evicts least recently used
    entries, as many as it needs, and the disk keeps its reserve: the cache is far under
    its max_bytes, but the disk is small."""
    cache, disk, held = _small_disk(monkeypatch, tmp_path, FakeClock())
    new = b"n" * (3 << 10)
    assert cache.put(_digest(new), new)
    assert [sha for sha, _, _ in cache.entries()] == [
        _digest(held[1]),
        _digest(held[2]),
        _digest(new),
    ]
    assert disk.free(0) >= 2 << 10


def test_a_model_that_would_not_leave_the_reserve_is_not_stored_nor_evicts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A model that would not leave the reserve free even with every entry gone is not
    stored, and costs no entry; once other files take the disk below its reserve, the
    next write gives the cache's space back, oldest first, until the reserve is there."""
    cache, disk, held = _small_disk(monkeypatch, tmp_path, FakeClock())
    huge = b"h" * (9 << 10)
    assert not cache.put(_digest(huge), huge)
    assert len(cache.entries()) == 3
    disk.elsewhere = 3 << 10  # the outbox grew: 1 KiB free
    assert not cache.put(_digest(huge), huge)
    assert [sha for sha, _, _ in cache.entries()] == [_digest(held[1]), _digest(held[2])]
    assert disk.free(0) == 3 << 10


@pytest.mark.parametrize(
    ("disk", "reserve"),
    [(4 << 30, (4 << 30) // 10), (64 << 30, 1 << 30)],
    ids=["4 GiB disk", "64 GiB disk"],
)
def test_the_default_reserve_is_a_tenth_of_a_small_disk(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, disk: int, reserve: int
) -> None:
    """By default the cache leaves 1 GiB free, or a tenth of a smaller file system: on a
    4 GiB disk with 500 MB free a model is still cached (1 GiB would never be free
    there), and one that would leave less than the reserve is not."""
    free = 500 << 20
    monkeypatch.setattr(onnx_runtime, "_free_bytes", lambda _fd: free)
    monkeypatch.setattr(onnx_runtime, "_disk_bytes", lambda _fd: disk)
    cache = ModelCache(tmp_path, max_bytes=1 << 30)
    small, large = b"s" * 1024, b"l" * 1024
    assert cache.put(_digest(small), small) is (free - 1024 >= reserve)
    free = reserve + 512  # the next write would cross the reserve
    assert cache.put(_digest(large), large) is False


def test_a_disk_filled_during_a_cache_write_gets_the_caches_space_back(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """ENOSPC in the middle of a write (another writer took the disk meanwhile): nothing
    half-written stays, the write is not made, and the cache gives back what it holds
    until the reserve is free again."""
    cache, disk, held = _small_disk(monkeypatch, tmp_path, FakeClock())
    real_fsync = os.fsync

    def disk_full(fd: int) -> None:
        disk.elsewhere = 5 << 10  # the outbox took it all, and more
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    new = b"n" * 100
    assert not cache.put(_digest(new), new)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert [p.name for p in tmp_path.iterdir()] == [_digest(held[2])]
    assert disk.free(0) == 3 << 10


def test_cache_removes_writes_a_kill_cut_short(tmp_path: Path) -> None:
    """A temporary file left by a killed write goes at the next write once an hour old;
    a younger one (another process may be writing it) stays."""
    now = time.time()
    cache = ModelCache(tmp_path, max_bytes=1 << 20, clock=lambda: now)
    stale, fresh = tmp_path / ".partial-0a1b", tmp_path / ".partial-2c3d"
    for path in (stale, fresh):
        path.write_bytes(b"z" * 1000)
    os.utime(stale, (now - PARTIAL_MAX_AGE_S - 1, now - PARTIAL_MAX_AGE_S - 1))
    os.utime(fresh, (now - PARTIAL_MAX_AGE_S + 60, now - PARTIAL_MAX_AGE_S + 60))
    assert cache.put(_digest(b"model"), b"model")
    assert not stale.exists()
    assert fresh.exists()
    assert cache.get(_digest(b"model")) == b"model"


def test_cache_removes_what_is_not_an_entry(tmp_path: Path) -> None:
    """The next write removes every name that is not a regular file named by a SHA-256
    (junk that workers which saw the cache writable left): files, directories, links
    (not followed) and hash-named non-files; the entries stay."""
    cache = ModelCache(tmp_path / "models", max_bytes=1 << 20)
    assert cache.put(_digest(b"kept"), b"kept")
    models = tmp_path / "models"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("the operator's")
    (models / "junk-0").write_bytes(b"\1" * 1000)
    (models / "deep" / "er").mkdir(parents=True)
    (models / "deep" / "er" / "junk").write_bytes(b"\1" * 1000)
    (models / "link").symlink_to(outside)
    (models / _digest(b"x").upper()).write_bytes(b"x")
    (models / _digest(b"dir")).mkdir()
    assert cache.put(_digest(b"new"), b"new")
    assert sorted(p.name for p in models.iterdir()) == sorted([_digest(b"kept"), _digest(b"new")])
    assert (outside / "precious").read_text() == "the operator's"


def test_a_daemon_side_lookup_keeps_a_model_recent(tmp_path: Path) -> None:
    """Workers read the cache read-only, so their reads cannot refresh an entry: the
    daemon's contains() before a task does, and eviction spares the model in use."""
    clock = FakeClock()
    cache = ModelCache(tmp_path, max_bytes=20, clock=clock)
    a, b, c = b"a" * 8, b"b" * 8, b"c" * 8
    assert cache.put(_digest(a), a)
    clock.now += 100
    assert cache.put(_digest(b), b)
    clock.now += 100
    assert cache.contains(_digest(a))  # a task names model a
    clock.now += 100
    assert cache.put(_digest(c), c)
    assert [sha for sha, _, _ in cache.entries()] == [_digest(a), _digest(c)]


def test_cache_refuses_entries_larger_than_itself(tmp_path: Path) -> None:
    """A model larger than the whole cache is not stored (and evicts nothing)."""
    cache = ModelCache(tmp_path, max_bytes=4)
    assert not cache.put(_digest(b"too large"), b"too large")
    assert cache.entries() == []


def test_cache_files_are_private(tmp_path: Path) -> None:
    """Cached models are readable by the node's user only."""
    cache = ModelCache(tmp_path / "models", max_bytes=100)
    cache.put(_digest(b"m"), b"m")
    assert (tmp_path / "models").stat().st_mode & 0o777 == 0o700
    assert cache.path_for(_digest(b"m")).stat().st_mode & 0o777 == 0o600


def test_cache_paths_only_take_hashes(tmp_path: Path) -> None:
    """A cache key is a hash, never a path."""
    with pytest.raises(ValueError, match="sha256"):
        ModelCache(tmp_path, max_bytes=1).path_for("../etc/passwd")


def _tree(directory: Path) -> dict[str, tuple[int, int, int, float, bytes]]:
    """Owner, mode, mtime and bytes of *directory* and its files, links not followed."""
    seen = {}
    for path in [directory, *sorted(directory.iterdir())]:
        st = path.lstat()
        data = path.read_bytes() if path.is_file() and not path.is_symlink() else b""
        seen[path.name] = (st.st_uid, st.st_gid, st.st_mode, st.st_mtime, data)
    return seen


def test_cache_never_follows_a_symlinked_directory(tmp_path: Path) -> None:
    """A cache directory a worker replaced with a link (to /etc, say) is refused: nothing is
    written, read, evicted or chowned in the target, and contains() says why."""
    etc = tmp_path / "etc"
    etc.mkdir()
    old = b"o" * 16
    (etc / _digest(old)).write_bytes(old)  # evictable, were the link followed
    (etc / "passwd").write_bytes(b"root:x:0:0")
    before = _tree(etc)
    (tmp_path / "models").symlink_to(etc)
    cache = ModelCache(tmp_path / "models", max_bytes=20)
    new = b"n" * 16
    owner = (os.geteuid(), os.getegid()) if os.geteuid() else (65534, 65534)
    with pytest.raises(UnsafeCacheError, match="is a symlink or not a directory"):
        cache.contains(_digest(new))
    assert not cache.put(_digest(new), new, owner=owner)
    assert cache.get(_digest(old)) is None
    assert cache.entries() == []
    assert _tree(etc) == before


def test_cache_refuses_a_directory_that_is_a_file(tmp_path: Path) -> None:
    """A file planted where the cache directory belongs is refused the same way."""
    (tmp_path / "models").write_bytes(b"not a directory")
    cache = ModelCache(tmp_path / "models", max_bytes=20)
    with pytest.raises(UnsafeCacheError):
        cache.contains(_digest(b"m"))
    assert not cache.put(_digest(b"m"), b"m")
    assert (tmp_path / "models").read_bytes() == b"not a directory"


def test_cache_never_follows_a_symlinked_entry(tmp_path: Path) -> None:
    """A cache file replaced by a link is a miss, is never read, is not counted as an
    entry, a put replaces the link itself, and a later put's sweep removes the other link
    (not what it points at); the target keeps its bytes, owner and mode."""
    etc = tmp_path / "etc"
    etc.mkdir()
    model = b"m" * 8
    (etc / "shadow").write_bytes(model)  # even bytes that match the hash are not trusted
    (etc / "shadow").chmod(0o600)
    before = _tree(etc)
    clock = FakeClock()
    cache = ModelCache(tmp_path / "models", max_bytes=20, clock=clock)
    cache.directory.mkdir()
    (cache.directory / _digest(model)).symlink_to(etc / "shadow")
    linked = cache.directory / _digest(b"l")
    linked.symlink_to(etc / "shadow")
    assert not cache.contains(_digest(model))
    assert cache.get(_digest(model)) is None
    assert cache.entries() == []
    owner = (os.geteuid(), os.getegid()) if os.geteuid() else (65534, 65534)
    assert cache.put(_digest(model), model, owner=owner)
    stored = cache.path_for(_digest(model))
    assert not stored.is_symlink()
    assert (stored.stat().st_uid, stored.stat().st_gid) == owner
    assert cache.get(_digest(model)) == model
    clock.now += 10
    big = b"b" * 16
    assert cache.put(_digest(big), big)  # 24 bytes: the older model is evicted
    assert [sha for sha, _, _ in cache.entries()] == [_digest(big)]
    assert not linked.is_symlink()  # swept: not an entry
    assert _tree(etc) == before


def test_cache_does_not_hang_on_a_planted_fifo(tmp_path: Path) -> None:
    """A FIFO named like a model is a miss at once, not a read that waits for a writer."""
    cache = ModelCache(tmp_path, max_bytes=20)
    os.mkfifo(tmp_path / _digest(b"m"))
    assert not cache.contains(_digest(b"m"))
    assert cache.get(_digest(b"m")) is None
    assert cache.put(_digest(b"m"), b"m")
    assert cache.get(_digest(b"m")) == b"m"


# --- refusing what the requester got wrong --------------------------------------------


def test_external_data_model_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model pointing at a file beside the node is refused, so the file cannot leak."""
    (tmp_path / "secret.txt").write_bytes(b"operator secret")
    monkeypatch.chdir(tmp_path)
    model = external_data_model("secret.txt", 15)
    with pytest.raises(RemoteProtocolError, match="external data"):
        _run(_runtime(), model)


def test_zipmap_output_is_refused_with_advice(digits: DigitsClassifier) -> None:
    """A sequence-of-maps output cannot be a result tensor; the error says how to export."""
    with pytest.raises(RemoteProtocolError, match=r"seq\(map.*zipmap"):
        _run(_runtime(), digits.zipmap_model, X=digits.x_test[:2])


def test_zipmap_model_runs_when_only_tensor_outputs_are_requested(
    digits: DigitsClassifier,
) -> None:
    """Asking for the tensor outputs of such a model still works."""
    payload = make_request(
        digits.zipmap_model, {"X": digits.x_test[:3]}, output_names=["output_label"]
    )
    outputs, _ = decode_result(_runtime().run(payload.encode()))
    assert outputs["output_label"].tolist() == digits.estimator.predict(digits.x_test[:3]).tolist()


def test_string_output_is_refused() -> None:
    """String tensors are not in the result container's dtypes."""
    with pytest.raises(RemoteProtocolError, match="'label' has type tensor\\(string\\)"):
        _run(_runtime(), string_output_model(), x=np.array([1, 2], np.int64))


def _two_outputs_model(odd: str) -> bytes:
    """x -> two copies, one output named *odd*, the other "y"."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], [odd]), helper.make_node("Identity", ["x"], ["y"])],
        "odd_output",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [
            helper.make_tensor_value_info(odd, TensorProto.FLOAT, [2]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [2]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


@pytest.mark.parametrize("odd", ["__metadata__", "a\x01b"])
def test_an_output_name_no_result_can_carry_is_the_requesters_fault(odd: str) -> None:
    """An output named as the container's reserved key, or with a control character, cannot
    be written to a result: that is the model's fault, so a RemoteProtocolError (a bad
    payload, not a node failure that every node would retry). Other outputs still run."""
    model = _two_outputs_model(odd)
    x = np.array([1.0, 2.0], np.float32)
    with pytest.raises(RemoteProtocolError, match="output name cannot be carried in a result"):
        _run(_runtime(), model, x=x)
    request = make_request(model, {"x": x}, output_names=["y"])
    outputs, _ = decode_result(_runtime().run(request.encode()))
    assert list(outputs) == ["y"]


def _model(nodes: list[Any], inputs: list[Any], initializers: list[Any] | None = None) -> bytes:
    graph = helper.make_graph(
        nodes,
        "g",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializers or [],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def test_an_output_of_rank_over_32_is_the_requesters_fault() -> None:
    """A model whose output has more dimensions than a result carries (32) is refused as a
    bad payload (RemoteProtocolError), not as a node failure that restarts the worker."""
    shape = helper.make_tensor("s", TensorProto.INT64, [33], [1] * 33)
    model = _model(
        [helper.make_node("Reshape", ["x", "s"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [shape],
    )
    with pytest.raises(RemoteProtocolError, match="output 'y' has rank 33; a result carries"):
        _run(_runtime(), model, x=np.ones(1, np.float32))


def test_an_input_name_that_is_not_utf8_is_the_requesters_fault() -> None:
    """onnxruntime loads a model whose input name is not UTF-8 and fails only when the
    name is read: that is a model that cannot be loaded, the requester's fault."""
    model = _model(
        [helper.make_node("Identity", ["xx"], ["y"])],
        [helper.make_tensor_value_info("xx", TensorProto.FLOAT, None)],
    ).replace(b"xx", b"x\xff")
    with pytest.raises(RemoteProtocolError, match="model cannot be loaded: .*utf-8"):
        _run(_runtime(), model)


def _rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_a_failed_run_leaves_no_memory_held() -> None:
    """A request that expands to 256 MB and then fails leaves the (warm) session holding
    no more than a few MB: with ONNX Runtime's CPU arena on, the process would keep the
    run's peak, and an idle worker would hold it until replaced (admission, which counts
    free memory, would then refuse honest tasks)."""
    bad_shape = helper.make_tensor("bad", TensorProto.INT64, [1], [7])
    model = _model(
        [
            helper.make_node("Expand", ["x", "n"], ["big"]),
            helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
            helper.make_node("Reshape", ["s", "bad"], ["y"]),
        ],
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("n", TensorProto.INT64, None),
        ],
        [bad_shape],
    )
    runtime = _runtime()
    x = np.ones(1, np.float32)
    with pytest.raises(RemoteProtocolError, match="inference failed"):  # loads the session
        _run(runtime, model, x=x, n=np.array([1, 1], np.int64))
    before = _rss_mib()
    with pytest.raises(RemoteProtocolError, match="inference failed"):
        _run(runtime, model, x=x, n=np.array([64, 1 << 20], np.int64))  # 256 MB of float32
    assert _rss_mib() - before < 64


def test_garbage_model_is_refused() -> None:
    """Bytes that are not an ONNX model give a load error, not a crash."""
    with pytest.raises(RemoteProtocolError, match="not a valid ONNX protobuf"):
        _run(_runtime(), b"\xff\xff\xff not onnx")


def test_model_onnxruntime_cannot_load_is_refused() -> None:
    """A parseable model that ONNX Runtime rejects is the requester's fault, reported as such."""
    with pytest.raises(RemoteProtocolError, match=r"model cannot be loaded: .*NoSuchOperator"):
        _run(_runtime(), unknown_op_model(), x=np.ones(1, np.float32))


def test_model_over_size_cap_is_refused() -> None:
    """A node refuses models larger than its max_model_bytes."""
    with pytest.raises(RemoteProtocolError, match="over this node's limit of 16"):
        _run(_runtime(max_model_bytes=16), identity_model(), x=np.ones(1, np.float32))


def test_payload_over_limit_is_refused() -> None:
    """The payload limit applies before decoding."""
    with pytest.raises(RemoteProtocolError, match="over the limit of 32"):
        _run(_runtime(max_payload_bytes=32), identity_model(), x=np.ones(1, np.float32))


@pytest.mark.parametrize(
    ("inputs", "match"),
    [
        pytest.param({"a": np.zeros((1, 3), np.float32)}, "missing inputs \\['b'\\]", id="missing"),
        pytest.param(
            {
                "a": np.zeros((1, 3), np.float32),
                "b": np.zeros((1, 3), np.float32),
                "c": np.zeros(1),
            },
            "unknown inputs \\['c'\\]",
            id="unknown",
        ),
        pytest.param(
            {"a": np.zeros((1, 3), np.float64), "b": np.zeros((1, 3), np.float32)},
            "'a' is F64, the model expects tensor\\(float\\)",
            id="dtype",
        ),
        pytest.param(
            {"a": np.zeros((1, 4), np.float32), "b": np.zeros((1, 4), np.float32)},
            "'a' has shape \\[1, 4\\], the model expects \\['N', 3\\]",
            id="fixed-dim",
        ),
        pytest.param(
            {"a": np.zeros(3, np.float32), "b": np.zeros(3, np.float32)},
            "'a' has shape \\[3\\]",
            id="rank",
        ),
        pytest.param(
            {"a": np.zeros((2, 3), np.float32), "b": np.zeros((3, 3), np.float32)},
            "inference failed: .*Add",
            id="fails-at-run-time",
        ),
    ],
)
def test_bad_inputs_are_refused(inputs: dict[str, np.ndarray], match: str) -> None:
    """Inputs that do not fit the model's declared inputs raise a precise reason, also on
    a session that has run good requests (whose checks it remembers) and does again."""
    fresh, warm = _runtime(), _runtime()
    good = {"a": np.ones((2, 3), np.float32), "b": np.ones((2, 3), np.float32)}
    np.testing.assert_array_equal(_run(warm, add_model(), **good)["sum"], np.full((2, 3), 2.0))
    for runtime in (fresh, warm):
        with pytest.raises(RemoteProtocolError, match=match):
            _run(runtime, add_model(), **inputs)
    np.testing.assert_array_equal(_run(warm, add_model(), **good)["sum"], np.full((2, 3), 2.0))


def test_unknown_requested_output_is_refused() -> None:
    """Requesting an output the model lacks names the outputs it has."""
    runtime = _runtime()
    _run(runtime, identity_model(), x=np.ones(1, np.float32))  # the same inputs, all outputs
    payload = make_request(identity_model(), {"x": np.ones(1, np.float32)}, output_names=["z"])
    with pytest.raises(RemoteProtocolError, match="no output 'z'; its outputs are \\['y'\\]"):
        runtime.run(payload.encode())


def test_undeclared_shape_accepts_any_rank() -> None:
    """With no declared shape (reported like a scalar), every rank is passed through."""
    model = identity_model(elem_type=TensorProto.INT32, shape=None)
    x = np.arange(24, dtype=np.int32).reshape(2, 3, 4)
    assert np.array_equal(_run(_runtime(), model, x=x)["y"], x)


# --- providers and availability -------------------------------------------------------


def test_usable_reports_onnxruntime_and_providers() -> None:
    """usable() says yes here and names the providers sessions would use."""
    ok, detail = usable()
    assert ok
    assert ort.__version__ in detail
    assert CPU_PROVIDER in detail


def test_usable_tells_missing_from_broken(monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime absent, or present but failing to import (a build for NumPy 1 under
    NumPy 2 raises ImportError): the operator is told which, and what to do."""
    real_import = builtins.__import__

    def broken(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "onnxruntime":
            raise ImportError("A module that was compiled using NumPy 1.x cannot be run")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken)
    ok, why = usable()
    assert not ok and "installed but does not import" in why and "NumPy 1.x" in why
    assert "pip install --upgrade onnxruntime onnx" in why

    def without_protobuf(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "onnx":  # onnx is there, but what it imports is not
            raise ModuleNotFoundError("No module named 'google'", name="google")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_protobuf)
    ok, why = usable()
    assert not ok and "installed but does not import" in why and "'google'" in why
    monkeypatch.setattr(builtins, "__import__", real_import)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails: not installed
    ok, why = usable()
    assert not ok and why.startswith("onnxruntime or onnx is not installed")


def test_default_providers_prefer_cuda() -> None:
    """CUDA goes first when available, CPU is always the fallback."""
    assert default_providers([CPU_PROVIDER, CUDA_PROVIDER]) == [CUDA_PROVIDER, CPU_PROVIDER]
    assert default_providers([CPU_PROVIDER]) == [CPU_PROVIDER]


def test_unavailable_provider_is_a_usage_error() -> None:
    """Asking for a provider this onnxruntime lacks fails with a configuration error."""
    runtime = OnnxRuntime(providers=["NoSuchExecutionProvider"])
    with pytest.raises(UsageError, match="NoSuchExecutionProvider"):
        _run(runtime, identity_model(), x=np.ones(1, np.float32))


def test_a_sparse_tensor_too_large_once_dense_is_refused_before_loading() -> None:
    """ONNX Runtime makes sparse initializers dense as it loads a model: 2^28 floats
    declared in about 100 bytes would take 1 GiB (unbounded on a GPU worker, which has no
    address-space limit). Refused against the node's model limit; a small one runs."""
    huge = sparse_model(1 << 28)
    assert len(huge) < 128
    with pytest.raises(RemoteProtocolError, match=r"sparse tensors take 1073741824 bytes"):
        _run(_runtime(), huge, x=np.ones(1, np.float32))
    outputs = _run(_runtime(), sparse_model(4), x=np.full(1, 2.0, np.float32))
    assert outputs["y"].tolist() == [3.0, 2.0, 2.0, 2.0]


def test_a_model_in_onnxruntimes_own_format_is_not_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bytes with "ORTM" at offset 4 are ONNX Runtime's flatbuffer format, which it loads
    unasked; such bytes can parse as another (empty) ONNX protobuf, so the model checks
    would vet one model and the session run another. Sessions load ONNX protobufs only:
    here the checks are let through, and loading still refuses the ORT-format model."""
    from nodeclient.node.runtimes import onnx as runtime_module

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "identity.ort")
    options.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(identity_model(), options, providers=[CPU_PROVIDER])
    ort_format = (tmp_path / "identity.ort").read_bytes()
    assert ort_format[4:8] == b"ORTM"
    real_vet = runtime_module._vet_model
    monkeypatch.setattr(
        runtime_module, "_vet_model", lambda model, **kw: real_vet(identity_model(), **kw)
    )
    with pytest.raises(RemoteProtocolError, match="model cannot be loaded"):
        _run(_runtime(), ort_format, x=np.ones(3, np.float32))


def _neg_model(shape: list[int] | None) -> bytes:
    """y = -x, x declared with *shape* ([]: a scalar; None: no shape, any rank)."""
    graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["y"])],
        "neg",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def test_an_input_declared_scalar_takes_only_a_scalar() -> None:
    """onnxruntime reports [] for a declared scalar and for an input of unknown rank
    alike; the model says which. A scalar input refuses a matrix; an input of unknown
    rank takes any."""
    scalar, any_rank = _neg_model([]), _neg_model(None)
    assert _run(_runtime(), scalar, x=np.array(2.0, np.float32))["y"].tolist() == -2.0
    with pytest.raises(RemoteProtocolError, match=r"shape \[2, 3\], the model expects a scalar"):
        _run(_runtime(), scalar, x=np.ones((2, 3), np.float32))
    assert _run(_runtime(), any_rank, x=np.ones((2, 3), np.float32))["y"].shape == (2, 3)
