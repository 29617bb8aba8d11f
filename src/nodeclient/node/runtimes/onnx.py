"""Run ``ai.inference`` requests on ONNX Runtime, with warm sessions and a model cache.

2.3.5 Work Execution: "An AI inference request runs whole". :meth:`OnnxRuntime.run`
takes the decrypted payload bytes (2.3.4) and returns the canonical result bytes that the
proof of execution covers (2.3.6), so nothing here knows about envelopes or the link.

Theory of operation:

* the model is found by its SHA-256: a warm session first, then the inline bytes, then
  the on-disk cache, then ``fetch_model(url)``; fetched bytes are hashed before anything uses
  or stores them, and are cached only once ONNX Runtime has loaded them;
* inline models are never written to disk: they travelled sealed to this node, and a
  plaintext copy on disk would outlive the task;
* models that reference external data are refused before ONNX Runtime sees them: loaded
  from bytes, ONNX Runtime resolves such paths against the working directory (even
  ``../``), which would let a request read the operator's files back as outputs; so are
  sparse tensors over the model limit once dense, and sessions load ONNX protobufs only,
  never ONNX Runtime's own format (which the checks would not have read);
* inputs are checked against the session's declared names, dtypes and fixed dimensions
  so a requester gets a precise reason, and no implicit casts change the numbers;
* sessions use deterministic compute, so the same request on the same node gives the
  same result bytes;
* on a slot with a GPU (see :mod:`.base`) sessions run on CUDA or not at all: the CUDA
  libraries are preloaded once, ONNX Runtime's fallback to the CPU is off, and a session
  whose CUDA provider did not load is refused. A slot without a GPU (its cards hidden:
  ``CUDA_VISIBLE_DEVICES`` empty) runs on the CPU alone; outside a worker (the variable
  unset), CUDA first when the build offers it, with ONNX Runtime's own fallback.

Faults the requester caused (a bad model, bad inputs, a hash mismatch, a non-tensor
output) raise RemoteProtocolError. On a session that runs on CUDA, an ONNX Runtime error
that names a CUDA, cuBLAS or cuDNN failure raises DeviceFailure and one that names a GPU
allocation failure MemoryError: the node's fault, and the worker is replaced. onnxruntime
and onnx are imported on first use only, so building an OnnxRuntime is cheap and the CLI
starts fast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import importlib
import math
import os
import re
import secrets
import shutil
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Final

import numpy as np
import numpy.typing as npt

from nodeclient.errors import NodeClientError, RemoteProtocolError, UsageError
from nodeclient.node.runtimes.base import (
    DeviceFailure,
    Progress,
    gpu_slot,
    gpus_hidden,
    no_progress,
)
from nodeclient.protocol.blobs import SHA256_HEX
from nodeclient.workloads.inference import CLASS, InferenceRequest, encode_result
from nodeclient.workloads.tensors import DEFAULT_MAX_BYTES, MAX_RANK, check_name, dtype_code

CPU_PROVIDER: Final = "CPUExecutionProvider"
CUDA_PROVIDER: Final = "CUDAExecutionProvider"
DEFAULT_MAX_MODEL_BYTES: Final = 256 * 1024 * 1024
DEFAULT_MAX_CACHE_BYTES: Final = 4 * 1024 * 1024 * 1024
_MAX_ERROR_CHARS: Final = 400
_PARTIAL_PREFIX: Final = ".partial-"  # a cache write under way, renamed when complete
PARTIAL_MAX_AGE_S: Final = 3600.0  # one older than this was cut short by a kill
TOUCH_INTERVAL_S: Final = 60.0  # contains() refreshes an entry's time at most this often
# A cache write leaves at least this much free on its file system, evicting to make room:
# the outbox shares the disk, and a result that cannot be stored is work lost. On a small
# file system, a tenth of it (RESERVE_SHARE) where that is less: a 4 GiB disk keeps 410 MB.
MIN_FREE_BYTES: Final = 1 << 30
RESERVE_SHARE: Final = 10
_DIRECTORY_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

# ONNX Runtime's type strings for the tensor types the result container can carry.
_ORT_DTYPES: Final[Mapping[str, np.dtype[Any]]] = {
    "tensor(bool)": np.dtype(np.bool_),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(uint16)": np.dtype(np.uint16),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(uint32)": np.dtype(np.uint32),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(float)": np.dtype(np.float32),
    "tensor(uint64)": np.dtype(np.uint64),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(double)": np.dtype(np.float64),
}


# How ONNX Runtime words a failure of the GPU or of a CUDA library, at load or at run.
# CudaCall (core/providers/cuda/cuda_call.cc) formats "<LIB> failure <code>: <text> ;
# GPU=<n> ; hostname=<host> ; file=<file> ; line=<n> ; expr=<call>;" with LIB one of CUDA,
# CUBLAS, CUDNN, CUDNN_FE, CURAND, CUFFT, CUSPARSE, NCCL; other paths name a cudaError_t
# ("CUDA error cudaErrorIllegalAddress:..."), a library status (CUBLAS_STATUS_...), or say
# that the CUDA provider's libraries did not load.
_GPU_FAILURE: Final = re.compile(
    r"\b(?:CUDA|CUBLAS(?:LT)?|CUDNN(?:_FE)?|CURAND|CUFFT|CUSPARSE|NCCL) (?:failure|error)\b"
    r"|\bcudaError[A-Z]\w*"
    r"|\b(?:CUBLAS|CUDNN|CURAND|CUFFT|CUSPARSE)_STATUS_[A-Z_]+"
    r"|\bCUDA wasn'?t able to be loaded",
    re.IGNORECASE,
)
# An allocation on the GPU that failed: the CUDA arena (BFCArena), the CUDA allocator
# ("CUDA failure 2: out of memory"), or a library's own workspace.
_GPU_ALLOCATION: Final = re.compile(
    r"Failed to allocate memory|\bout of memory\b|_STATUS_ALLOC_FAILED|cudaErrorMemoryAllocation",
    re.IGNORECASE,
)
_HOSTNAME: Final = re.compile(r"hostname=[^;\s]*")  # the node's host name stays on the node


def usable() -> tuple[bool, str]:
    """Whether this node can offer ``ai.inference`` (2.3.2 Capability Manifest), and why.

    ``get_available_providers`` lists the providers this onnxruntime build contains, not
    those that load here: whether CUDA does is known only when a slot with a GPU creates
    its first session, which then fails loudly rather than running on the CPU.
    """
    try:
        import onnx  # noqa: F401  # needed to vet models before loading them
        import onnxruntime as ort
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name in ("onnx", "onnxruntime"):
            return False, f"onnxruntime or onnx is not installed: {exc}"
        # Installed, but it does not import: a build for NumPy 1 under NumPy 2, or a
        # dependency of it missing (protobuf for onnx).
        return False, (
            f"onnxruntime or onnx is installed but does not import: {exc}; reinstall them "
            "into nodeclient's own Python (pip install --upgrade onnxruntime onnx)"
        )
    if CUDA_PROVIDER in ort.get_available_providers():
        return True, (
            f"onnxruntime {ort.__version__} with {CPU_PROVIDER}; {CUDA_PROVIDER} is built in "
            "and must load on slots with a GPU (checked when each session is created)"
        )
    return True, (
        f"onnxruntime {ort.__version__} with {CPU_PROVIDER} only: this build has no "
        f"{CUDA_PROVIDER}, so slots with a GPU fail ai.inference tasks (install "
        "onnxruntime-gpu on GPU nodes)"
    )


def gpu_usable() -> tuple[bool, str]:
    """Whether ``ai.inference`` can use the GPUs this node gives its slots: its onnxruntime
    build has the CUDA execution provider (whether it loads is known at the first session)."""
    import onnxruntime as ort

    if CUDA_PROVIDER in ort.get_available_providers():
        return True, f"onnxruntime {ort.__version__} with {CUDA_PROVIDER}"
    return False, (
        f"this onnxruntime {ort.__version__} build has no {CUDA_PROVIDER}, and this node "
        "gives its slots GPUs, where tasks never run on the CPU: install onnxruntime-gpu, "
        "or start the node with CUDA_VISIBLE_DEVICES= (empty) to serve on the CPU"
    )


def default_providers(available: Sequence[str]) -> list[str]:
    """CUDA first when this onnxruntime build offers it, CPU always as the fallback."""
    return [CUDA_PROVIDER, CPU_PROVIDER] if CUDA_PROVIDER in available else [CPU_PROVIDER]


def _short(exc: BaseException) -> str:
    return _clip(str(exc))


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS] + "..."


_preload_lock = threading.Lock()
_preloaded: list[str] = []  # empty until tried; then one entry, "" or why it failed


def _preload_cuda_libraries(ort: Any) -> str:
    """Load the CUDA and cuDNN libraries of the nvidia-* wheels, once per process; "" or
    why it failed.

    The sandbox passes no LD_LIBRARY_PATH, so ONNX Runtime's CUDA provider finds pip's
    CUDA libraries only once ``onnxruntime.preload_dlls()`` (1.21 and later) has loaded
    them; older builds lack it and rely on the system's library path.
    """
    with _preload_lock:
        if not _preloaded:
            preload = getattr(ort, "preload_dlls", None)
            error = ""
            if callable(preload):
                try:
                    preload()
                except (OSError, RuntimeError, ValueError, ImportError) as exc:
                    error = f"onnxruntime.preload_dlls() failed: {_short(exc)}"
            _preloaded.append(error)
        return _preloaded[0]


class UnsafeCacheError(OSError):
    """A cache path is a symlink or not a directory: planted there, not a disk fault.

    Workers see the model cache read-only, but those of earlier releases could write it,
    and what they left may still be there; the daemon, which writes it from outside the
    sandbox, must not follow it.
    """


class ModelCache:
    """Content-addressed files on disk (ONNX models; the daemon's render blobs, see
    ``inputs.blob_cache``): one file per model, named by its SHA-256 hex.

    Files are written atomically (temporary file, fsync, rename) with mode 0600, checked
    against their name's hash on every read (a corrupt file is deleted and reported as a
    miss), and evicted least recently used first, by modification time, once the total
    passes *max_bytes*, or as far as a write needs to leave *min_free_bytes* free on the
    file system (a model that would not leave it free even then is not stored). A hit in
    :meth:`get` or :meth:`contains` refreshes that time from the injected clock: workers
    see the cache read-only and cannot, so the daemon's :meth:`contains` before each task
    that names a model is what keeps it recent. Every write also removes what is not an
    entry (see :meth:`_sweep`). The cache is an optimisation: disk errors make it miss,
    never fail a task.

    Workers of earlier releases could write the directory, and the daemon writes it from
    outside the sandbox, so nothing here follows a symlink: the directory is opened with
    ``O_NOFOLLOW`` and every file is created, read, renamed, chowned and unlinked relative
    to that open directory, never by path. A directory that is a symlink (or not a
    directory) is refused: :meth:`contains` raises :class:`UnsafeCacheError`, and the other
    methods miss. Entries that are not regular files are skipped, never opened.
    """

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int,
        clock: Callable[[], float] = time.time,
        min_free_bytes: int | None = None,
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.min_free_bytes = min_free_bytes  # None: MIN_FREE_BYTES, less on a small disk
        self._clock = clock
        self._lock = threading.Lock()  # one writer or evicter at a time

    def path_for(self, sha256: str) -> Path:
        if not SHA256_HEX.fullmatch(sha256):  # the name becomes a path: no traversal
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.directory / sha256

    def _open_directory(self, *, create: bool) -> int:
        """The cache directory, opened without following a symlink at its last component.

        Raises UnsafeCacheError when it is a symlink or not a directory, FileNotFoundError
        when it is missing (and not *create*), OSError otherwise. Its parents are the
        operator's, not the sandbox's, and are followed.
        """
        if create:
            self.directory.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):  # mkdir never follows a planted link
                os.mkdir(self.directory, 0o700)
        try:
            return os.open(self.directory, _DIRECTORY_FLAGS)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UnsafeCacheError(
                    f"model cache {self.directory} is a symlink or not a directory; "
                    "refusing to follow it (a task may have planted it: remove it)",
                ) from exc
            raise

    def contains(self, sha256: str) -> bool:
        """Whether model *sha256* is stored as a regular file (readers check its hash); a
        hit counts as a use, for eviction (refreshed at most every TOUCH_INTERVAL_S).

        Raises UnsafeCacheError if the cache directory is a symlink or not a directory;
        any other disk error is a miss.
        """
        name = self.path_for(sha256).name
        try:
            dir_fd = self._open_directory(create=False)
        except UnsafeCacheError:
            raise
        except OSError:
            return False
        try:
            info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            now = self._clock()
            if stat.S_ISREG(info.st_mode) and info.st_mtime < now - TOUCH_INTERVAL_S:
                with contextlib.suppress(OSError):  # a read-only disk: still a hit
                    os.utime(name, (now, now), dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            return False
        finally:
            os.close(dir_fd)
        return stat.S_ISREG(info.st_mode)

    def get(self, sha256: str) -> bytes | None:
        """The verified bytes of model *sha256*, or None."""
        name = self.path_for(sha256).name
        with self._lock:
            try:
                dir_fd = self._open_directory(create=False)
            except OSError:
                return None
            try:
                return self._read(dir_fd, name)
            finally:
                os.close(dir_fd)

    def _read(self, dir_fd: int, sha256: str) -> bytes | None:
        try:
            # O_NONBLOCK: a planted FIFO must not hang the reader; a symlink fails (ELOOP).
            fd = os.open(
                sha256, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
            )
        except OSError:
            return None
        try:
            with os.fdopen(fd, "rb") as handle:
                info = os.fstat(handle.fileno())
                if not stat.S_ISREG(info.st_mode):
                    return None
                if info.st_size > self.max_bytes:
                    os.unlink(sha256, dir_fd=dir_fd)
                    return None
                # What fstat says, plus one to see growth: a read of max_bytes would
                # reserve that much (4 GiB) up front, past a worker's address-space limit.
                data = handle.read(info.st_size + 1)
                if hashlib.sha256(data).hexdigest() != sha256:
                    os.unlink(sha256, dir_fd=dir_fd)
                    return None
                now = self._clock()
                with contextlib.suppress(OSError):  # read-only in the sandbox: still a hit
                    os.utime(handle.fileno(), (now, now))
        except OSError:
            return None
        return data

    def put(self, sha256: str, data: bytes, *, owner: tuple[int, int] | None = None) -> bool:
        """Store *data* (whose hash the caller has checked); False if it was not stored.

        With *owner* ``(uid, gid)``, the directory and the file are handed to that user
        (the sandbox's, so workers can read and evict what the daemon stored).
        """
        name = self.path_for(sha256).name
        if len(data) > self.max_bytes:
            return False
        with self._lock:
            try:
                dir_fd = self._open_directory(create=True)
            except OSError:
                return False
            try:
                return self._write(dir_fd, name, data, owner)
            finally:
                os.close(dir_fd)

    def _write(self, dir_fd: int, sha256: str, data: bytes, owner: tuple[int, int] | None) -> bool:
        if not self._make_room(dir_fd, len(data)):
            return False
        tmp = f"{_PARTIAL_PREFIX}{secrets.token_hex(8)}"
        written = False
        try:
            if owner is not None:
                os.fchown(dir_fd, *owner)
            # O_EXCL: a name planted in the meantime, symlink or not, fails the create.
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(tmp, flags, 0o600, dir_fd=dir_fd)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                if owner is not None:  # the open file, not a path a worker could swap
                    os.fchown(handle.fileno(), *owner)
                now = self._clock()
                os.utime(handle.fileno(), (now, now))
                os.fsync(handle.fileno())
            # rename replaces a planted link at the name instead of writing through it
            os.replace(tmp, sha256, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            written = True
            self._evict(dir_fd, keep=sha256)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # filled meanwhile (the outbox?)
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dir_fd)
                self._make_room(dir_fd, 0)  # the cache gives the space back
            return False
        finally:
            if not written:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dir_fd)
        return True

    def entries(self) -> list[tuple[str, int, float]]:
        """``(sha256, size, mtime)`` of every cached model, least recently used first."""
        try:
            dir_fd = self._open_directory(create=False)
        except OSError:
            return []
        try:
            return self._entries(dir_fd)
        finally:
            os.close(dir_fd)

    def _entries(self, dir_fd: int) -> list[tuple[str, int, float]]:
        found: list[tuple[str, int, float]] = []
        try:
            with os.scandir(dir_fd) as children:
                for child in children:
                    if not SHA256_HEX.fullmatch(child.name):
                        continue
                    try:
                        info = child.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    if stat.S_ISREG(info.st_mode):
                        found.append((child.name, info.st_size, info.st_mtime))
        except OSError:
            return []
        found.sort(key=lambda entry: (entry[2], entry[0]))
        return found

    def _sweep(self, dir_fd: int) -> None:
        """Remove everything in the directory that is not an entry (a regular file named
        by a SHA-256): eviction would never count or remove it.

        That is the temporary files of writes that a kill cut short (SIGKILL of the
        daemon), once untouched for PARTIAL_MAX_AGE_S (another process may be writing a
        fresh one), and anything else: files, links and directories that workers of
        earlier releases, which saw the cache writable, left to fill the disk.
        """
        cutoff = self._clock() - PARTIAL_MAX_AGE_S
        try:
            with os.scandir(dir_fd) as children:
                found = list(children)
        except OSError:
            return
        for child in found:
            with contextlib.suppress(OSError):  # gone meanwhile: renamed, or swept
                info = child.stat(follow_symlinks=False)
                regular = stat.S_ISREG(info.st_mode)
                if regular and SHA256_HEX.fullmatch(child.name):
                    continue
                if regular and child.name.startswith(_PARTIAL_PREFIX) and info.st_mtime >= cutoff:
                    continue
                if stat.S_ISDIR(info.st_mode):
                    shutil.rmtree(child.name, dir_fd=dir_fd)  # never follows a link
                else:
                    os.unlink(child.name, dir_fd=dir_fd)

    def _make_room(self, dir_fd: int, size: int) -> bool:
        """Whether *size* bytes can be written leaving the reserve free on the file system
        (min_free_bytes; by default MIN_FREE_BYTES, or a RESERVE_SHARE-th of a smaller
        file system). The cache holds nothing of a disk below that reserve (the outbox shares
        it): least recently used entries go until the reserve is back, and as many more
        as the write needs, if evicting them all would make room for it (else the write
        is not made, and no more are evicted for it). A file system that cannot say how
        much is free is written to."""
        try:
            free = _free_bytes(dir_fd)
            reserve = self.min_free_bytes
            if reserve is None:
                reserve = min(MIN_FREE_BYTES, _disk_bytes(dir_fd) // RESERVE_SHARE)
        except OSError:
            return True
        if free - size >= reserve:
            return True
        entries = self._entries(dir_fd)
        fits = free + sum(entry_size for _, entry_size, _ in entries) - size >= reserve
        need = size if fits else 0
        for sha256, _, _ in entries:
            if free - need >= reserve:
                break
            try:
                os.unlink(sha256, dir_fd=dir_fd)
                free = _free_bytes(dir_fd)  # as the disk has it: an open file's stay used
            except FileNotFoundError:
                continue
            except OSError:
                return False
        return fits and free - size >= reserve

    def _evict(self, dir_fd: int, *, keep: str) -> None:
        self._sweep(dir_fd)
        entries = self._entries(dir_fd)
        total = sum(size for _, size, _ in entries)
        for sha256, size, _ in entries:
            if total <= self.max_bytes:
                break
            if sha256 != keep:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(sha256, dir_fd=dir_fd)
                total -= size


def _free_bytes(fd: int) -> int:
    """Bytes free to an unprivileged user on the file system that holds *fd*."""
    info = os.fstatvfs(fd)
    return info.f_bavail * info.f_frsize


def _disk_bytes(fd: int) -> int:
    """The size of the file system that holds *fd*."""
    info = os.fstatvfs(fd)
    return info.f_blocks * info.f_frsize


@dataclass(frozen=True)
class _Port:
    """One declared input or output of a loaded model."""

    name: str
    type: str
    shape: tuple[int | str | None, ...]

    @property
    def dtype(self) -> np.dtype[Any] | None:
        return _ORT_DTYPES.get(self.type)


_Shapes = tuple[tuple[str, np.dtype[Any], tuple[int, ...]], ...]
_PlanKey = tuple[tuple[str, ...] | None, _Shapes]
_MAX_PLANS: Final = 16  # request shapes remembered per model


@dataclass(frozen=True, eq=False)
class _Warm:
    session: Any  # onnxruntime.InferenceSession, untyped upstream
    inputs: dict[str, _Port]
    outputs: dict[str, _Port]
    on_gpu: bool = False  # the session runs on CUDA: its errors may be the GPU's
    planted: tuple[str, ...] = ()  # the model's texts that read like a GPU failure
    # Inputs the model declares as scalars (rank 0): onnxruntime reports their shape as
    # [], as it does an input of unknown rank, so the model itself says which.
    scalars: frozenset[str] = frozenset()
    # (requested outputs, input names/dtypes/shapes) -> outputs to run, once checked: a
    # stream of like requests skips the checks, which cost more than a small model's run.
    plans: dict[_PlanKey, list[str]] = dataclasses.field(default_factory=dict)

    def plan(
        self, requested: tuple[str, ...] | None, inputs: Mapping[str, npt.NDArray[Any]]
    ) -> list[str]:
        """The outputs to compute for a request; RemoteProtocolError when it does not fit."""
        key = (requested, tuple((name, a.dtype, a.shape) for name, a in inputs.items()))
        names = self.plans.get(key)
        if names is None:
            names = _select_outputs(self, requested)
            _check_feed(self, inputs)
            if len(self.plans) < _MAX_PLANS:
                self.plans[key] = names
        return names


@dataclass(frozen=True, slots=True)
class _Scan:
    """What :func:`_scan_model` found."""

    external: list[str]  # tensors that point at external data
    planted: list[str]  # texts that read like a GPU failure
    sparse_bytes: int  # the dense size of every sparse tensor, as loading makes them


def _scan_model(model: Any) -> _Scan:
    """Walk every message of *model* once: the names of the TensorProtos that point at
    external data, the model's texts (names, op types, attribute strings) that read
    like a GPU failure, and the bytes its sparse tensors take once made dense.

    ONNX Runtime makes a sparse initializer (or a Constant's sparse value) dense as it
    loads the model: one value declared over 2^28 elements is a 100-byte model that takes
    1 GiB before any input is looked at.

    ONNX Runtime quotes node and tensor names in its errors, so a model could name a node
    "CUDA failure 700: ..." to make its own failure look like the node's; those texts are
    taken out of an error before it is classified (see :func:`_ort_failure`).
    """
    import onnx

    external: list[str] = []
    planted: list[str] = []
    sparse_bytes = 0

    def suspect(text: str | bytes) -> None:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        if _GPU_FAILURE.search(text) or _GPU_ALLOCATION.search(text):
            planted.append(text)

    stack: list[Any] = [model]
    while stack:
        message = stack.pop()
        if isinstance(message, onnx.TensorProto):
            if message.data_location == onnx.TensorProto.EXTERNAL or len(message.external_data):
                external.append(message.name or "<unnamed>")
            suspect(message.name)  # its contents are numbers, never quoted in an error
            continue
        if isinstance(message, onnx.SparseTensorProto):
            try:
                itemsize = onnx.helper.tensor_dtype_to_np_dtype(message.values.data_type).itemsize
            except (KeyError, ValueError, TypeError):  # no such type: loading refuses it
                itemsize = 8
            sparse_bytes += math.prod(max(0, d) for d in message.dims) * itemsize
        for field, value in message.ListFields():
            if field.message_type is not None:
                if hasattr(value, "ListFields"):  # a singular message, not a repeated container
                    stack.append(value)
                else:
                    stack.extend(value)
            elif field.type in (field.TYPE_STRING, field.TYPE_BYTES):
                for text in [value] if isinstance(value, str | bytes) else value:
                    suspect(text)
    return _Scan(external, planted, sparse_bytes)


@dataclass(frozen=True, slots=True)
class _Vetted:
    planted: tuple[str, ...]  # the model's texts that read like a GPU failure, longest first
    scalars: frozenset[str]  # the graph's inputs declared rank 0


def _vet_model(model: bytes, *, max_dense_bytes: int = DEFAULT_MAX_MODEL_BYTES) -> _Vetted:
    """Refuse models that are not ONNX protobufs, that reference external data, or whose
    sparse tensors would take more than *max_dense_bytes* once made dense; what the
    session needs to know of the model besides."""
    import onnx

    # Looked up, not imported: protobuf ships no type stubs, and this is its only use here.
    decode_error = importlib.import_module("google.protobuf.message").DecodeError
    try:
        proto = onnx.load_model_from_string(model)
    except (decode_error, ValueError) as exc:
        raise RemoteProtocolError(f"model is not a valid ONNX protobuf: {_short(exc)}") from exc
    scan = _scan_model(proto)
    if scan.external:
        raise RemoteProtocolError(
            f"model references external data (tensors {scan.external[:5]}); "
            "models must be self-contained"
        )
    if scan.sparse_bytes > max_dense_bytes:
        raise RemoteProtocolError(
            f"model's sparse tensors take {scan.sparse_bytes} bytes once made dense, over "
            f"this node's model limit of {max_dense_bytes}"
        )
    scalars = frozenset(
        port.name
        for port in proto.graph.input
        if port.type.HasField("tensor_type")
        and port.type.tensor_type.HasField("shape")
        and not port.type.tensor_type.shape.dim
    )
    planted = tuple(sorted(set(scan.planted), key=len, reverse=True))  # longest first
    return _Vetted(planted, scalars)


def _ort_errors() -> tuple[type[BaseException], ...]:
    """The exception types ONNX Runtime raises, translated once at this boundary."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    native = tuple(
        value
        for value in vars(state).values()
        if isinstance(value, type) and issubclass(value, Exception)
    )
    return (*native, RuntimeError, ValueError, TypeError)


def _provider_failure_types() -> tuple[type[BaseException], ...]:
    """The ONNX Runtime exception types that blame an execution provider, not the model."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    found = (getattr(state, name, None) for name in ("EPFail", "DeviceReset"))
    return tuple(t for t in found if isinstance(t, type) and issubclass(t, BaseException))


def _ort_failure(
    exc: BaseException, *, requester: str, stage: str, on_gpu: bool, planted: Sequence[str]
) -> Exception:
    """The exception to raise for ONNX Runtime's *exc*.

    The requester's (RemoteProtocolError, prefixed *requester*), except on a session that
    runs on CUDA when ONNX Runtime names an allocation on the GPU that failed (MemoryError:
    out of memory) or a failure of the GPU or a CUDA library (DeviceFailure). Both replace
    the worker: a CUDA error such as an illegal memory access is sticky, and would fail
    every later task of the process. *planted*: the model's own texts that read like such
    a failure, which are not ONNX Runtime's words and are taken out first.
    """
    if on_gpu:
        text = str(exc)
        for fake in planted:
            text = text.replace(fake, " ")
        allocation = _GPU_ALLOCATION.search(text)
        if allocation is not None:
            return MemoryError(f"out of GPU memory {stage}: {_gpu_excerpt(text, allocation)}")
        failure = _GPU_FAILURE.search(text)
        if failure is not None or isinstance(exc, _provider_failure_types()):
            excerpt = _short(exc) if failure is None else _gpu_excerpt(text, failure)
            return DeviceFailure(f"the GPU failed {stage}: {excerpt}")
    return RemoteProtocolError(f"{requester}: {_short(exc)}")


def _gpu_excerpt(text: str, found: re.Match[str]) -> str:
    """ONNX Runtime's message from what *found* matched on (what precedes it is a C++
    signature, or names from the model), without the node's host name."""
    return _clip(_HOSTNAME.sub("hostname=(withheld)", text[found.start() :]))


class ModelUnavailable(NodeClientError):
    """A by-URL model the worker cannot get: the node's failure, not the request's."""


class OnnxRuntime:
    """Executes ``ai.inference`` payloads; thread-safe, sessions kept warm per model hash."""

    workload_class: ClassVar[str] = CLASS

    def __init__(
        self,
        *,
        cache_dir: Path | None = None,
        max_sessions: int = 8,
        max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES,
        max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES,
        max_payload_bytes: int = DEFAULT_MAX_BYTES,
        providers: list[str] | None = None,
        intra_op_threads: int | None = None,
        fetch_model: Callable[[str], bytes] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_sessions < 1:
            raise UsageError("max_sessions must be at least 1")
        self.cache = (
            None
            if cache_dir is None
            else ModelCache(cache_dir, max_bytes=max_cache_bytes, clock=clock)
        )
        self._max_sessions = max_sessions
        self._max_model_bytes = max_model_bytes
        self._max_payload_bytes = max_payload_bytes
        self._requested_providers = None if providers is None else list(providers)
        self._providers: list[str] | None = None
        self._intra_op_threads = intra_op_threads
        self._fetch_model = fetch_model
        self._sessions: OrderedDict[str, _Warm] = OrderedDict()
        self._building: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._sessions_created = 0
        self._errors: tuple[type[BaseException], ...] | None = None
        self._preload_error = ""

    @property
    def sessions_created(self) -> int:
        """How many sessions this runtime has built and kept warm; warm hits do not count."""
        return self._sessions_created

    @property
    def warm_models(self) -> list[str]:
        """Hashes of the models with a warm session, least recently used first."""
        with self._lock:
            return list(self._sessions)

    def providers(self) -> list[str]:
        """The execution providers sessions use, resolved (and checked) on first call.

        By default CUDA first when this build offers it, then the CPU (for operators CUDA
        lacks). On a slot with a GPU a build without CUDA is the node's failure
        (DeviceFailure), and the CUDA libraries are preloaded before the first session.
        """
        if self._providers is None:
            import onnxruntime as ort

            available = ort.get_available_providers()
            gpu = gpu_slot()
            if self._requested_providers is None:
                if gpu is not None and CUDA_PROVIDER not in available:
                    raise DeviceFailure(
                        f"this slot has a GPU but this onnxruntime "
                        f"build has no {CUDA_PROVIDER} (it offers {available}); refusing to run "
                        "on the CPU: install onnxruntime-gpu"
                    )
                # A slot without a GPU: the CPU alone (no CUDA provider that would find no
                # card, and print why at every session it makes).
                providers = [CPU_PROVIDER] if gpus_hidden() else default_providers(available)
            else:
                missing = [p for p in self._requested_providers if p not in available]
                if missing or not self._requested_providers:
                    raise UsageError(
                        f"execution providers {missing} are not available; "
                        f"this onnxruntime offers {available}"
                    )
                providers = list(self._requested_providers)
            if gpu is not None and CUDA_PROVIDER in providers:
                self._preload_error = _preload_cuda_libraries(ort)
            self._providers = providers
        return self._providers

    def run(
        self,
        payload: bytes,
        *,
        workdir: Path | None = None,
        progress: Progress = no_progress,
    ) -> bytes:
        """Run one whole inference request and return the canonical result bytes.

        An inference request runs whole (2.3.5), in memory: *workdir* is unused and
        progress is reported once, when the request is done.
        """
        request = InferenceRequest.decode(payload, max_bytes=self._max_payload_bytes)
        warm = self._warm_session(request)
        names = warm.plan(request.output_names, request.inputs)
        try:
            values = warm.session.run(names, request.inputs)
        except self._ort_error_types() as exc:
            raise _ort_failure(
                exc,
                requester="inference failed",
                stage="while running the model",
                on_gpu=warm.on_gpu,
                planted=warm.planted,
            ) from exc
        outputs: dict[str, npt.NDArray[Any]] = {}
        for name, value in zip(names, values, strict=True):
            if not isinstance(value, np.ndarray) or dtype_code(value.dtype) is None:
                kind = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
                raise RemoteProtocolError(f"output {name!r} is {kind}, which a result cannot carry")
            if value.ndim > MAX_RANK:  # the model's output, so the requester's fault
                raise RemoteProtocolError(
                    f"output {name!r} has rank {value.ndim}; a result carries at most {MAX_RANK}"
                )
            outputs[name] = value
        progress(1, 1, "inference done")
        return encode_result(outputs, model_sha256=request.model_sha256)

    def _ort_error_types(self) -> tuple[type[BaseException], ...]:
        if self._errors is None:
            self._errors = _ort_errors()
        return self._errors

    def _warm_session(self, request: InferenceRequest) -> _Warm:
        # Fetching and loading a model can take long: they run under a lock of that model
        # alone, so concurrent requests for one new model build one session, and requests
        # for warm models never wait behind them. Runs happen outside every lock.
        sha256 = request.model_sha256
        with self._lock:
            warm = self._hit(sha256)
            if warm is not None:
                return warm
            building = self._building.setdefault(sha256, threading.Lock())
        with building:
            with self._lock:
                warm = self._hit(sha256)
            if warm is not None:
                return warm
            try:
                model, fetched = self._model_bytes(request)
                warm = self._create(model)
                if fetched and self.cache is not None:
                    self.cache.put(sha256, model)
                with self._lock:  # published before the building lock is dropped
                    self._sessions_created += 1
                    self._sessions[sha256] = warm
                    while len(self._sessions) > self._max_sessions:
                        self._sessions.popitem(last=False)
            finally:
                with self._lock:
                    self._building.pop(sha256, None)
            return warm

    def _hit(self, sha256: str) -> _Warm | None:
        warm = self._sessions.get(sha256)
        if warm is not None:
            self._sessions.move_to_end(sha256)
        return warm

    def _model_bytes(self, request: InferenceRequest) -> tuple[bytes, bool]:
        """The model's bytes and whether they were just fetched (and so may be cached)."""
        if request.model is not None:  # its hash was checked when the request was decoded
            model, fetched = request.model, False
        else:
            cached = None if self.cache is None else self.cache.get(request.model_sha256)
            if cached is not None:
                return cached, False
            if request.model_url is None:
                raise RemoteProtocolError("the request has neither a model nor a model_url")
            if self._fetch_model is None:
                # A worker (no network): the daemon fetched the model into the cache before
                # the task, so it went since (evicted for another task's model) or cannot be
                # read. This node's fault, not the requester's: the task may run elsewhere.
                raise ModelUnavailable(
                    f"model {request.model_sha256} is not in this node's cache (evicted or "
                    "unreadable since it was fetched) and a worker cannot fetch models"
                )
            model, fetched = self._fetch_model(request.model_url), True
        if len(model) > self._max_model_bytes:
            raise RemoteProtocolError(
                f"model is {len(model)} bytes, over this node's limit of {self._max_model_bytes}"
            )
        if fetched:
            actual = hashlib.sha256(model).hexdigest()
            if actual != request.model_sha256:
                raise RemoteProtocolError(
                    f"model fetched from {request.model_url} has sha256 {actual}, "
                    f"but the request says {request.model_sha256}"
                )
        return model, fetched

    def self_check(self) -> None:
        """At a worker's start, on a slot with a GPU: one session of a one-node model on
        CUDA, made as a task's would be. DeviceFailure where the CUDA provider does not
        load (its libraries, the driver), so that the node withdraws ``ai.inference``
        rather than fail every task; nothing on a slot without a GPU."""
        if gpu_slot() is None:
            return
        from onnx import TensorProto, helper

        graph = helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])],
            "self_check",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8  # what every onnxruntime this project takes (>= 1.17) reads
        self._create(model.SerializeToString())

    def _create(self, model: bytes) -> _Warm:
        import onnxruntime as ort

        vetted = _vet_model(model, max_dense_bytes=self._max_model_bytes)
        planted = vetted.planted
        providers = self.providers()
        gpu = gpu_slot()
        # On a slot with a GPU, CUDA or nothing: ONNX Runtime's fallback would otherwise
        # retry on the CPU when the CUDA provider fails to start, or when it fails a run.
        strict = gpu is not None and CUDA_PROVIDER in providers
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: warnings would go to stderr, not our log
        options.use_deterministic_compute = True  # 2.3.6: same request, same result bytes
        if self._intra_op_threads is not None:
            options.intra_op_num_threads = self._intra_op_threads
        # Idle intra-op threads would spin and compete with the daemon and other slots.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # No CPU memory arena: an arena keeps the peak of every run, so one request that
        # expanded to hundreds of MB (and failed) would leave its idle worker holding them,
        # and admission, which counts free memory, would then refuse honest tasks. Freed
        # buffers go back to the allocator instead (no measurable cost on a MatMul chain).
        options.enable_cpu_mem_arena = False
        # ONNX protobuf only: given bytes with "ORTM" at offset 4, onnxruntime would load its
        # own flatbuffer format, which the checks above (onnx's protobuf parse) never saw;
        # such bytes can be a valid protobuf too, of another, harmless-looking model.
        options.add_session_config_entry("session.load_model_format", "ONNX")
        if gpu is not None:
            # Constant folding runs the model's constant subgraphs on the CPU as the session
            # is made: a ConstantOfShape of 2^28 in a 182-byte model took 2 GiB there. A
            # CPU slot's address-space limit bounds that; a GPU slot's worker has none (the
            # driver maps the card's memory into it), so the subgraph runs with the task.
            options.add_session_config_entry(
                "optimization.disable_specified_optimizers", "ConstantFolding"
            )
        fallback = {"enable_fallback": 0} if strict else {}
        try:
            session = ort.InferenceSession(
                model, sess_options=options, providers=providers, **fallback
            )
            if strict:  # also for builds that ignore the keyword: no fallback at run time
                session.disable_fallback()
            # A name that is not UTF-8 fails only when read (UnicodeDecodeError, a ValueError).
            inputs = {
                arg.name: _Port(arg.name, arg.type, tuple(arg.shape))
                for arg in session.get_inputs()
            }
            outputs = {
                arg.name: _Port(arg.name, arg.type, tuple(arg.shape))
                for arg in session.get_outputs()
            }
        except self._ort_error_types() as exc:
            raise _ort_failure(
                exc,
                requester="model cannot be loaded",
                stage="while loading the model",
                on_gpu=strict,
                planted=planted,
            ) from exc
        active = list(session.get_providers())
        if strict and CUDA_PROVIDER not in active:
            # ONNX Runtime logs why (a CUDA or cuDNN library it cannot load, a device it
            # cannot open) and goes on with what did load: never on a GPU slot.
            preload = f"; {self._preload_error}" if self._preload_error else ""
            raise DeviceFailure(
                f"the CUDA execution provider did not load on this GPU slot: "
                f"the session would run on {active}{preload}; "
                "ONNX Runtime's log on the worker's stderr says why"
            )
        for port in inputs.values():
            if port.dtype is None:
                raise RemoteProtocolError(
                    f"model input {port.name!r} has type {port.type}; only numeric and bool "
                    "tensors are supported"
                )
        return _Warm(
            session=session,
            inputs=inputs,
            outputs=outputs,
            on_gpu=CUDA_PROVIDER in active,
            planted=planted,
            scalars=vetted.scalars,
        )


def _select_outputs(warm: _Warm, requested: tuple[str, ...] | None) -> list[str]:
    """The outputs to compute: the requested ones, or all; each must be a plain tensor
    whose name the result container can carry (the model's fault, so the requester's)."""
    names = list(warm.outputs) if requested is None else list(requested)
    for name in names:
        port = warm.outputs.get(name)
        if port is None:
            raise RemoteProtocolError(
                f"the model has no output {name!r}; its outputs are {sorted(warm.outputs)}"
            )
        try:
            check_name(name, error=RemoteProtocolError)
        except RemoteProtocolError as exc:
            raise RemoteProtocolError(
                f"model output name cannot be carried in a result: {exc}; request other "
                "outputs, or rename it in the model"
            ) from None
        if port.dtype is None:
            raise RemoteProtocolError(
                f"output {name!r} has type {port.type}, not a numeric or bool tensor; "
                "request other outputs, or export the model without it (for scikit-learn "
                "classifiers convert with skl2onnx options {'zipmap': False})"
            )
    return names


def _check_feed(warm: _Warm, inputs: Mapping[str, npt.NDArray[Any]]) -> None:
    """Check the request's inputs against the model's declared inputs, exactly."""
    missing = sorted(set(warm.inputs) - set(inputs))
    if missing:
        raise RemoteProtocolError(
            f"missing inputs {missing}; the model's inputs are {sorted(warm.inputs)}"
        )
    unknown = sorted(set(inputs) - set(warm.inputs))
    if unknown:
        raise RemoteProtocolError(
            f"unknown inputs {unknown}; the model's inputs are {sorted(warm.inputs)}"
        )
    for name, array in inputs.items():
        port = warm.inputs[name]
        if array.dtype != port.dtype:
            raise RemoteProtocolError(
                f"input {name!r} is {dtype_code(array.dtype)}, the model expects {port.type}"
            )
        # onnxruntime reports an unknown rank as [], like a scalar (warm.scalars says which).
        if not port.shape and name in warm.scalars and array.ndim:
            raise RemoteProtocolError(
                f"input {name!r} has shape {list(array.shape)}, the model expects a scalar []"
            )
        if port.shape and (
            array.ndim != len(port.shape)
            or any(
                isinstance(want, int) and want != got
                for want, got in zip(port.shape, array.shape, strict=True)
            )
        ):
            declared = [dim if isinstance(dim, int) else (dim or "?") for dim in port.shape]
            raise RemoteProtocolError(
                f"input {name!r} has shape {list(array.shape)}, the model expects {declared}"
            )
