"""A persistent, sandboxed worker process: one per slot (2.3.5 Work Execution).

Started once per slot as ``python -m nodeclient.node.worker --config JSON`` (inside
bubblewrap, see :mod:`nodeclient.node.sandbox`), the worker drops privileges, sets its
rlimits, builds every runtime once (so ONNX sessions stay warm), runs the runtimes'
start-up checks (``self_check``: on a GPU slot, CUDA on its card; with ``--check-only
CLASS``, that class's alone, for a worker started for a task of that class, which is all
it will serve) and then serves tasks one at a time over its stdin and stdout. Each task
starts in an empty work directory and an empty /tmp, both emptied again afterwards (or, if
that fails, the worker is replaced with a fresh one).

Pipe protocol, both directions: frames of ::

    u32 header_len (big-endian) | u32 body_len (big-endian) | header | body

where *header* is a UTF-8 JSON object with an ``op`` and *body* raw bytes. The daemon sends
``{"op": "run", "id": N, "class": C, "memory_bytes": M|null}`` + payload. The worker sends
``{"op": "ready", "pid", "classes", "broken"}`` once, then per task any number of
``{"op": "progress", "id", "done", "total", "note"}`` and exactly one of
``{"op": "result", "id", "restart"}`` + result bytes or
``{"op": "error", "id", "kind": "requester"|"oom"|"failed", "reason", "restart"}``. Then,
unless that answer said ``"restart": true`` (the worker exits), one
``{"op": "clean", "id", "restart"}`` once the work directory and /tmp are empty again and
nothing the task started is left running; ``"restart": true`` there means it was not, and the
worker exits. EOF on stdin means stop.

Bodies of up to :data:`SHARED_BYTES` travel through shared memory instead of the pipe. The
daemon creates one memfd per worker (``--shm-fd N``), twice that size and sealed so that
neither side can shrink or grow it: the first half carries run payloads down, the second
half results up. A frame whose body is in its half says ``"shm": length`` in its header
and has a body length of 0 in its prefix. The pipe then carries a few hundred bytes a
task, and a body costs one copy in and one out: on the reference machine a 512 KiB body
reached an asyncio reader in ~0.3 ms this way and in ~1.6 ms through the pipe. Each side
copies a body out of the region when it reads the frame, so nothing the other side writes
there later can change what was read; the daemon writes a payload only to an idle worker,
and a worker writes a result only as its answer. Larger bodies go through the pipe.

The worker's original stdout is kept as the protocol channel; file descriptor 1 is pointed
at stderr, so whatever a task prints lands on stderr, which the daemon caps and logs.

Trust: a task that fails for any reason other than the requester's own fault (a crash,
out of memory, a limit, processes or threads left behind) may have changed the worker, so
the worker answers and then exits; the daemon starts a fresh one for the next task.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import importlib
import json
import mmap
import os
import resource
import shutil
import stat
import struct
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

from nodeclient.errors import RemoteProtocolError
from nodeclient.node.runtimes.base import set_child_address_space

PREFIX: Final = struct.Struct(">II")
MAX_HEADER: Final = 64 * 1024
MAX_HEADER_DEPTH: Final = 16  # nesting of a header's JSON (ours nest at most 2 deep)
EXIT_TAINTED: Final = 3
SHARED_BYTES: Final = 4 * 1024 * 1024  # per direction; resident only once a body used it
SHM_KEY: Final = "shm"
_PROGRESS_INTERVAL: Final = 0.05  # at most 20 progress frames a second


@dataclass(frozen=True, slots=True)
class Frame:
    header: dict[str, Any]
    body: bytes


class SharedBodies:
    """One side's view of a worker's shared memory: it writes bodies to one half and reads
    the other side's from the other half (see the module docstring)."""

    def __init__(self, fd: int, size: int, *, daemon_side: bool) -> None:
        self.size = size
        self.map = mmap.mmap(fd, 2 * size)  # MAP_SHARED; the mapping outlives the fd
        self._out = 0 if daemon_side else size
        self._in = size if daemon_side else 0

    @staticmethod
    def create_fd(size: int) -> int:
        """A memfd of two halves of *size*, sealed against resizing (a worker that shrank it
        would make the daemon's next read of the mapping a SIGBUS)."""
        fd = os.memfd_create("nodeclient-slot", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, 2 * size)
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def put(self, header: Mapping[str, Any], body: bytes) -> tuple[Mapping[str, Any], bytes]:
        """(header, body) as they go down the pipe: a body that fits is moved to the region."""
        if not body or len(body) > self.size:
            return header, body
        self.map[self._out : self._out + len(body)] = body
        return {**header, SHM_KEY: len(body)}, b""

    def take(self, length: int) -> bytes:
        """A copy of the body the other side put in its half."""
        return self.map[self._in : self._in + length]

    def close(self) -> None:
        self.map.close()


def frame_body(
    header: Mapping[str, Any], body: bytes, shared: SharedBodies | None, max_body: int
) -> bytes:
    """A frame's body: *body* as read from the pipe, or a copy of the one in shared memory
    when the header says so (checked against the region and *max_body*)."""
    if SHM_KEY not in header:
        return body
    length = header[SHM_KEY]
    limit = 0 if shared is None else min(shared.size, max_body)
    if type(length) is not int or not 0 < length <= limit or body:
        raise RemoteProtocolError(f"bad shared body: {SHM_KEY}={length!r} with {len(body)} bytes")
    assert shared is not None  # a limit of 0 refused it
    return shared.take(length)


def encode_header(header: Mapping[str, Any], body_len: int) -> bytes:
    """The prefix and header of a frame; the body follows as is (no copy of large payloads)."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    if len(raw) > MAX_HEADER:
        raise ValueError(f"frame header of {len(raw)} bytes is over {MAX_HEADER}")
    return PREFIX.pack(len(raw), body_len) + raw


def encode_frame(header: Mapping[str, Any], body: bytes = b"") -> bytes:
    return encode_header(header, len(body)) + body


def parse_prefix(prefix: bytes, *, max_body: int) -> tuple[int, int]:
    """Header and body lengths, checked before anything is read or allocated."""
    header_len, body_len = PREFIX.unpack(prefix)
    if header_len > MAX_HEADER or body_len > max_body:
        raise RemoteProtocolError(f"frame of {header_len}+{body_len} bytes is over the limit")
    return header_len, body_len


def parse_header(raw: bytes) -> dict[str, Any]:
    """A frame's header; RemoteProtocolError for anything but a JSON object with an ``op``.

    The other side may be a task's code writing to the pipe, so every way the parse can
    fail is a protocol error: deep nesting (``[[[[...``) is refused before it is parsed
    (the parser would recurse into it until RecursionError).
    """
    if _too_deep(raw):
        raise RemoteProtocolError(f"frame header is nested deeper than {MAX_HEADER_DEPTH}")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise RemoteProtocolError(f"frame header is not JSON: {exc}") from exc
    if not isinstance(header, dict) or not isinstance(header.get("op"), str):
        raise RemoteProtocolError("frame header must be an object with an 'op'")
    return header


def _too_deep(raw: bytes) -> bool:
    """Whether JSON text *raw* nests arrays and objects deeper than MAX_HEADER_DEPTH.

    The count of opening brackets bounds the depth and costs next to nothing; only a
    header with more of them than that (brackets in a long error reason, or a hostile
    ``[[[[...``) is scanned, skipping strings, for its real depth.
    """
    if raw.count(b"[") + raw.count(b"{") <= MAX_HEADER_DEPTH:
        return False
    depth, in_string, escaped = 0, False, False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > MAX_HEADER_DEPTH:
                return True
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return False


def read_frame(
    stream: IO[bytes], *, max_body: int, shared: SharedBodies | None = None
) -> Frame | None:
    """One frame from a blocking stream, or None at a clean EOF."""
    prefix = stream.read(PREFIX.size)
    if not prefix:
        return None
    if len(prefix) != PREFIX.size:
        raise RemoteProtocolError("truncated frame")
    header_len, body_len = parse_prefix(prefix, max_body=max_body)
    raw = stream.read(header_len)
    body = stream.read(body_len) if body_len else b""
    if len(raw) != header_len or len(body) != body_len:
        raise RemoteProtocolError("truncated frame")
    header = parse_header(raw)
    return Frame(header, frame_body(header, body, shared, max_body))


def write_frame(
    fd: int, header: Mapping[str, Any], body: bytes = b"", shared: SharedBodies | None = None
) -> None:
    """Write a whole frame to *fd* (a pipe), without joining a large body to its header."""
    if shared is not None:
        header, body = shared.put(header, body)
    parts = [memoryview(encode_header(header, len(body))), memoryview(body)]
    while parts:
        sent = os.writev(fd, parts)
        while parts and sent >= len(parts[0]):
            sent -= len(parts[0])
            parts.pop(0)
        if parts and sent:
            parts[0] = parts[0][sent:]


def _load_factory(spec: str) -> Callable[[Path], Any]:
    module_name, _, attr = spec.partition(":")
    factory = getattr(importlib.import_module(module_name), attr)
    if not callable(factory):
        raise TypeError(f"{spec} is not callable")
    return factory  # type: ignore[no-any-return]


class Worker:
    """The task loop; I/O is on the two file descriptors it is given."""

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        out_fd: int,
        shared: SharedBodies | None = None,
        check_only: str | None = None,
    ) -> None:
        """*check_only*: run that class's self-check alone (a worker started for a task of
        that class, which is all it will run: see ``slots.affinity_of``); by default every
        class's."""
        self.out_fd = out_fd
        self.shared = shared
        self.work_root = Path(config["workdir"])
        self.sandboxed = bool(config["sandboxed"])
        self.max_result = int(config["max_result_bytes"])
        # A worker with a GPU has no address-space limit, per task neither (apply_limits).
        self.limit_address_space = not config.get("gpus")
        # A worker with a GPU keeps no address-space limit of its own (CUDA), but a runtime
        # that never starts CUDA (Blender) gets its task's: what it declared, else the slot's
        # share of the memory, above what the worker holds.
        limits = config.get("limits")
        self.slot_memory = int(limits["memory_bytes"]) if limits else None
        self.task_dir = self.work_root / "task"  # emptied after every task
        self.task_dir.mkdir(mode=0o700, exist_ok=True)
        # What the work directory keeps between tasks, each emptied on its own: the task
        # directory, and /tmp where it is on disk (the slot's ``tmp``, bound at /tmp).
        self.work_keep = frozenset(config.get("work_keep", ("task",)))
        tmp = config.get("tmp_dir")  # the sandbox's /tmp: emptied after every task too
        self.tmp_dir = None if tmp is None else Path(tmp)
        # What /tmp holds before any task: the directories bubblewrap made for the paths it
        # binds below /tmp (the code, the interpreter, when they live there), not the
        # task's and never removed. Nothing else of it is writable by the task.
        self.tmp_keep = frozenset(os.listdir(tmp)) if tmp is not None else frozenset()
        self.runtimes: dict[str, Any] = {}
        self.broken: dict[str, str] = {}
        cache = Path(config["cache_dir"])
        for workload_class, spec in sorted(config["runtimes"].items()):
            try:
                self.runtimes[workload_class] = _load_factory(spec)(cache)
            except Exception as exc:  # noqa: BLE001 (reported per task; other classes serve on)
                self.broken[workload_class] = f"{type(exc).__name__}: {exc}"[:300]
        _import_all(config.get("preload", ()))  # e.g. onnxruntime: the first task is warm
        # What the worker holds before any runtime starts CUDA (the self-checks below): the
        # base of the limit of a program a task on a GPU slot starts (set_child_address_space).
        self._base_vm = _virtual_memory()
        for workload_class, runtime in list(self.runtimes.items()):
            check = getattr(runtime, "self_check", None)
            if check is None or check_only not in (None, workload_class):
                continue
            try:  # e.g. CUDA that does not load on this GPU slot: every task would fail
                check()
            except Exception as exc:  # noqa: BLE001 (the class is withdrawn, not the worker)
                self.broken[workload_class] = f"{type(exc).__name__}: {exc}"[:300]
                del self.runtimes[workload_class]
        # class -> modules imported before its first task here (e.g. torch), then dropped
        self.first_use: dict[str, list[str]] = dict(config.get("first_use", {}))
        # Counted after the self-checks: what a runtime starts there and keeps (PyTorch's
        # autograd thread for a CUDA device, which holds a Python thread state) is the
        # worker's own, not a thread a task left running.
        self._threads = _python_threads()
        self._holders = _memory_holders()  # the shared bodies' mapping, any a runtime keeps

    def serve(self, stream: IO[bytes], *, max_payload: int) -> int:
        write_frame(
            self.out_fd,
            {
                "op": "ready",
                "pid": os.getpid(),
                "classes": sorted(self.runtimes),
                "broken": self.broken,
            },
        )
        while True:
            frame = read_frame(stream, max_body=max_payload, shared=self.shared)
            if frame is None:
                return 0
            if frame.header["op"] != "run":
                raise RemoteProtocolError(f"unknown op {frame.header['op']!r}")
            if not self.run_task(frame.header, frame.body):
                return EXIT_TAINTED

    def run_task(self, header: Mapping[str, Any], payload: bytes) -> bool:
        """Run one task and answer it; False when the worker must not be reused.

        The answer goes out first and the clean-up after it, so a task's latency does not
        include emptying its directory; the daemon waits for the ``clean`` frame before
        it gives this worker another task.
        """
        task_id = int(header["id"])
        reply, body, clean = self._execute(task_id, header, payload)
        answer = {**reply, "id": task_id, "restart": not clean}
        write_frame(self.out_fd, answer, body, self.shared)
        if not clean:
            return False
        emptied = (
            self._empty_task_dir()
            and (self.tmp_dir is None or _empty(self.tmp_dir, keep=self.tmp_keep))
            and self._empty_work_root()
        )
        tainted = not emptied or self._left_behind()
        write_frame(self.out_fd, {"op": "clean", "id": task_id, "restart": tainted})
        return not tainted

    def _execute(
        self, task_id: int, header: Mapping[str, Any], payload: bytes
    ) -> tuple[dict[str, Any], bytes, bool]:
        """(reply header, reply body, whether the task left the worker clean)."""
        workload_class = str(header["class"])
        runtime = self.runtimes.get(workload_class)
        if runtime is None and workload_class in self.broken:
            # This worker's runtime did not build or failed its self-check (CUDA that did not
            # start on this slot's card, say): the node's failure, and a fresh worker tries
            # again, rather than this one failing every task of the class that comes.
            reason = f"execution failed: {self.broken[workload_class]}"[:400]
            return {"op": "error", "kind": "failed", "reason": reason}, b"", False
        if runtime is None:
            reason = f"workload class {workload_class!r} is not served by this node"
            return {"op": "error", "kind": "requester", "reason": reason}, b"", True
        last = [0.0]

        def progress(done: float, total: float, note: str) -> None:
            now = time.monotonic()
            if done < total and now - last[0] >= _PROGRESS_INTERVAL:  # the answer means done
                last[0] = now
                msg = {"op": "progress", "id": task_id, "done": done, "total": total}
                write_frame(self.out_fd, {**msg, "note": str(note)[:200]})

        workdir = self.task_dir
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        try:
            os.chdir(workdir)
            # Before the task's own limit: the library is the worker's, not the task's.
            _import_all(self.first_use.pop(workload_class, ()))
            overhead = getattr(runtime, "address_space_overhead", 0)
            if self.limit_address_space:
                _limit_memory(header.get("memory_bytes"), hard, overhead=overhead)
            elif not getattr(runtime, "uses_gpu", True):
                declared = header.get("memory_bytes") or self.slot_memory
                _limit_memory(declared, hard, overhead=overhead)
                if isinstance(declared, int) and declared > 0:
                    # The program the runtime starts (Blender) holds none of what CUDA
                    # reserved here: its limit is the task's, above what the worker held
                    # before any GPU runtime started.
                    set_child_address_space(self._base_vm + max(0, overhead) + declared)
            result = runtime.run(payload, workdir=workdir, progress=progress)
            if not isinstance(result, bytes):
                raise TypeError(f"runtime returned {type(result).__name__}, not bytes")
            if len(result) > self.max_result:
                raise OverflowError(f"result of {len(result)} bytes is over {self.max_result}")
        except RemoteProtocolError as exc:
            reason = f"bad payload: {exc}"[:400]
            return {"op": "error", "kind": "requester", "reason": reason}, b"", True
        except MemoryError:
            return (
                {"op": "error", "kind": "oom", "reason": "out of memory (MemoryError)"},
                b"",
                False,
            )
        except BaseException as exc:  # noqa: BLE001 (a task's SystemExit too: it fails, we answer)
            reason = f"execution failed: {type(exc).__name__}: {exc}"[:400]
            return {"op": "error", "kind": "failed", "reason": reason}, b"", False
        finally:
            set_child_address_space(None)
            if resource.getrlimit(resource.RLIMIT_AS)[0] != hard:  # lowered for this task
                resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
            os.chdir(self.work_root)
        return {"op": "result"}, result, True

    def _empty_task_dir(self) -> bool:
        """Empty the task directory for the next task (cheaper than a new one); False if not,
        or if the task replaced it (with a symlink to a directory it prepared, say)."""
        if not _real_dir(self.task_dir):
            return False
        try:
            os.chmod(self.task_dir, 0o700)
        except OSError:
            return False
        return _empty(self.task_dir)

    def _empty_work_root(self) -> bool:
        """Remove what the task left in the work directory beside the directories it keeps
        (a file written to ``../``): the whole directory is writable, and the next task, on
        this worker, would find it. False if something stays, or a kept name is no longer
        a directory of its own (then the worker is replaced, and its directory emptied)."""
        return _empty(self.work_root, keep=self.work_keep) and all(
            _real_dir(self.work_root / name) for name in self.work_keep
        )

    def _left_behind(self) -> bool:
        """Threads or processes the task started and did not end, or memory it holds
        outside every limit: a memfd it kept open, a System V shared-memory segment (in
        the sandbox's own IPC namespace; either is freed only when the worker goes)."""
        if _python_threads() > self._threads:
            return True
        if not _memory_holders() <= self._holders:
            return True
        if self.sandboxed and _sysv_segments():
            return True
        while True:  # reap our own finished children first
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                return True  # a child still runs
        if not self.sandboxed:
            # A process the task double-forked is no child of this one's (init adopted it),
            # but stays in its process group, which the daemon kills with it.
            return _others_in_my_group()
        # In the sandbox's PID namespace: pid 1 is bubblewrap's init, the rest is the task's.
        mine = {1, os.getpid()}
        return any(name.isdigit() and int(name) not in mine for name in os.listdir("/proc"))


def _others_in_my_group() -> bool:
    """Whether a live process other than this one is in this process's group (read from
    /proc: each process's stat names its group after its command, whose name, in
    parentheses, may hold anything)."""
    me, group = os.getpid(), os.getpgrp()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):  # gone meanwhile, or unreadable: not ours
            continue
        if len(fields) > 2 and fields[2] == str(group).encode() and fields[0] != b"Z":
            return True
    return False


def _memory_holders() -> frozenset[tuple[int, str, int]]:
    """This process's open memfds and sockets: (descriptor, what it names, its inode).
    A socket too: a memfd passed through one (SCM_RIGHTS) and closed here stays alive in
    it; and the inode, so that a memfd put in place of one of ours (dup2) is told apart."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            path = f"/proc/self/fd/{name}"
            target = os.readlink(path)
            if target.startswith(("/memfd:", "socket:")):
                found.append((int(name), target, os.stat(path).st_ino))
        except OSError:  # the listing's own descriptor, closed meanwhile
            continue
    return frozenset(found)


def _sysv_segments() -> int:
    """System V shared-memory segments in this IPC namespace (the sandbox's own)."""
    try:
        with open("/proc/sysvipc/shm", encoding="ascii", errors="replace") as listing:
            return max(0, sum(1 for _ in listing) - 1)  # less the header line
    except OSError:
        return 0


def _python_threads() -> int:
    """The threads the interpreter knows (its thread states), however started and whatever
    they run: ``threading.active_count`` misses those of ``_thread.start_new_thread``, and
    ``sys._current_frames`` one that runs only C code (a deque draining an iterator), either
    of which a task could leave running. Native threads that never enter Python (a
    runtime's thread pools) are not counted. Walked with the GIL held (ctypes.pythonapi):
    a thread state is unlinked only under it."""
    api = ctypes.pythonapi
    count, state = 0, api.PyInterpreterState_ThreadHead(api.PyInterpreterState_Get())
    while state:
        count += 1
        state = api.PyThreadState_Next(state)
    return count


def _declare_thread_api() -> None:
    api = ctypes.pythonapi
    api.PyInterpreterState_Get.restype = ctypes.c_void_p
    api.PyInterpreterState_Get.argtypes = []
    api.PyInterpreterState_ThreadHead.restype = ctypes.c_void_p
    api.PyInterpreterState_ThreadHead.argtypes = [ctypes.c_void_p]
    api.PyThreadState_Next.restype = ctypes.c_void_p
    api.PyThreadState_Next.argtypes = [ctypes.c_void_p]


_declare_thread_api()


def _real_dir(path: Path) -> bool:
    """*path* is a directory itself, not a symlink to one."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _empty(directory: Path, *, keep: frozenset[str] = frozenset()) -> bool:
    """Remove everything in *directory* but the names in *keep*; False if something else
    is left (a subdirectory the task made unreadable, say: then the worker is replaced,
    and its directories with it)."""
    try:
        with os.scandir(directory) as entries:
            leftovers = [Path(e.path) for e in entries if e.name not in keep]
        for path in leftovers:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        return not any(p.name not in keep for p in directory.iterdir())
    except OSError:
        return False


def _import_all(modules: Iterable[str]) -> None:
    """Import *modules*; one that is missing is left to its runtime to report, per task."""
    for module in modules:
        with contextlib.suppress(ImportError):
            importlib.import_module(module)


def _limit_memory(memory_bytes: object, hard: int, *, overhead: int = 0) -> None:
    """Lower the soft RLIMIT_AS to what the task declared, above what the worker holds
    (in a worker without a GPU: see :func:`nodeclient.node.sandbox.apply_limits`).

    *overhead*: address space a runtime's own program maps before it does the task's work
    (a Blender process: shared libraries and allocator arenas, inherited with this limit),
    which is the runtime's, not the task's."""
    if not isinstance(memory_bytes, int) or memory_bytes <= 0:
        return
    held = _virtual_memory() + max(0, overhead)
    # No hard limit (a worker with a GPU, whose runtimes that never start CUDA still get a
    # limit): the soft one alone, which Blender (no requester code runs in it) keeps.
    soft = held + memory_bytes if hard == resource.RLIM_INFINITY else min(hard, held + memory_bytes)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _virtual_memory() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def main(argv: list[str] | None = None) -> int:
    from nodeclient.node import sandbox

    args = sys.argv[1:] if argv is None else argv
    options = dict(zip(args[2::2], args[3::2], strict=False))
    if (
        len(args) % 2
        or args[:1] != ["--config"]
        or len(options) != len(args[2:]) // 2
        or not set(options) <= {"--shm-fd", "--check-only"}
        or not (shm_fd := options.get("--shm-fd", "0")).isascii()
        or not shm_fd.isdigit()
    ):
        print(
            "usage: python -m nodeclient.node.worker --config JSON [--shm-fd N] "
            "[--check-only CLASS]",
            file=sys.stderr,
        )
        return 2
    config = json.loads(args[1])
    out_fd = os.dup(1)  # the protocol channel
    os.dup2(2, 1)  # a task's prints go to stderr, which the daemon caps
    if config.get("drop_privileges") and os.getuid() == 0:
        sandbox.drop_privileges()
    os.chdir(config["workdir"])  # its own from here (bwrap started by root could not enter it)
    limits = sandbox.Limits.from_wire(config["limits"])
    sandbox.apply_limits(limits, address_space=not config.get("gpus"))
    shared = None
    if "--shm-fd" in options:
        fd = int(options["--shm-fd"])
        shared = SharedBodies(fd, int(config["shared_bytes"]), daemon_side=False)
        os.close(fd)  # the mapping stays (with mmap's own descriptor, sealed like this one)
    worker = Worker(config, out_fd=out_fd, shared=shared, check_only=options.get("--check-only"))
    if config.get("sandboxed"):
        # Its runtimes are built (their thread pools too); no task has run yet.
        from nodeclient.node import seccomp

        seccomp.install()
    with open(0, "rb", buffering=1 << 16, closefd=False) as stream:
        return worker.serve(stream, max_payload=int(config["max_payload_bytes"]))


if __name__ == "__main__":
    sys.exit(main())
