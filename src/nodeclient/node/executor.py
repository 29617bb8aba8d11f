"""2.3.5 Work Execution: tasks run in persistent, sandboxed worker processes, one per slot.

The daemon decrypts (2.3.4) in its own process, so the payload key never enters a
worker; a worker gets the plaintext payload over a pipe and returns the result bytes
(the framing is in :mod:`nodeclient.node.worker`, the isolation in
:mod:`nodeclient.node.sandbox`). Workers start once and stay warm, so a warm inference
pays one pipe round trip instead of a process start.

Every way a task can go wrong ends in :class:`TaskFailed` with a reason the signed
Reject carries, and never takes the node down: a worker that crashed, ran out of memory,
printed too much, outlived its deadline, was cancelled, left processes behind, or broke
the pipe protocol in any way is killed (its whole process group, and with bubblewrap its
PID namespace) and replaced by a fresh one before the slot takes the next task.

A worker that ended its task cleanly is still a process that ran a stranger's code: a
task that exploited a runtime (ONNX Runtime, PyTorch, Blender) could wait there for the
next one. So a worker takes only tasks of the same requester after it, as far as the
executor can tell (:func:`_affinity`): inferences of the same model, or tasks of the same
job. A task goes to an idle worker that may take it, else to a fresh one, else to a slot
whose worker is replaced first; a worker that may take nothing more is replaced at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import itertools
import json
import logging
import math
import os
import shutil
import signal
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from nodeclient import logs
from nodeclient.errors import NodeClientError, ProtocolError, RemoteProtocolError
from nodeclient.node import sandbox, worker
from nodeclient.node.sandbox import MODE_BWRAP, Limits

log = logging.getLogger("nodeclient.node.executor")

DEFAULT_MAX_PAYLOAD: Final = 256 * 1024 * 1024
DEFAULT_MAX_RESULT: Final = 32 * 1024 * 1024  # within what one link frame carries
DEFAULT_MAX_OUTPUT: Final = 1024 * 1024
_TAIL: Final = 2048
_F_SETPIPE_SZ: Final = 1031  # Linux fcntl; not exported by Python 3.11
_PIPE_BYTES: Final = 1 << 20  # the default /proc/sys/fs/pipe-max-size
_JOIN_BYTES: Final = 256 * 1024  # payloads up to this size go down the pipe in one write
_REPLACED: Final = "replaced after a failed or untidy task"
_SETTLE_TIMEOUT: Final = 300.0  # emptying a work directory of rendered frames takes a while
_SETTLE_WAIT: Final = 5.0  # a task waits this long for a settling worker that may take it
_ROOT_PREFIX: Final = "nodeclient-work-"  # work roots in the temporary directory
_ROOT_LOCK: Final = ".lock"
_STAGING_PREFIX: Final = ".nodeclient-staging-"  # a root while it is made
_STAGING_STALE_S: Final = 3600.0  # a staging root this old was left by a killed daemon
_REAP_TIMEOUT: Final = 30.0  # a killed worker's exit and the end of its pipes
PROGRESS_INTERVAL_S: Final = 0.5  # a task's progress reports passed on at most this often

# progress(done, total, note) as the executor reports it to the daemon
OnProgress = Callable[[float, float, str], None]


_MAX_PENDING_EXTENSIONS: Final = 1024  # renewals of tasks whose timer has not started


class TaskFailed(NodeClientError):
    """The task did not produce a result; ``reason`` is what the signed Reject says."""

    def __init__(self, reason: str, *, requester_fault: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.requester_fault = requester_fault


def default_runtimes() -> dict[str, str]:
    """Every known runtime as ``class -> "module:factory"``, importable in a worker."""
    from nodeclient.node.runtimes import RUNTIMES

    return {
        name: f"{info.factory.__module__}:{info.factory.__qualname__}"
        for name, info in RUNTIMES.items()
    }


def default_preload() -> tuple[str, ...]:
    """Modules of the runtimes usable here, imported when a worker starts (those whose
    requirements say ``preload``)."""
    from nodeclient.node.runtimes import RUNTIMES

    return tuple(
        module
        for info in RUNTIMES.values()
        if info.requirements.preload and info.usable()[0]
        for module in info.requirements.python_modules
    )


def first_use_modules(runtimes: Mapping[str, str]) -> dict[str, list[str]]:
    """Per workload class of *runtimes*, the modules a worker imports before its first
    task of that class, outside the task's memory limit (runtimes not preloaded)."""
    from nodeclient.node.runtimes import RUNTIMES

    return {
        name: list(RUNTIMES[name].requirements.python_modules)
        for name in runtimes
        if name in RUNTIMES and not RUNTIMES[name].requirements.preload
    }


def gpus_from_manifest(manifest: Mapping[str, Any]) -> tuple[tuple[int, int], ...]:
    """``(index, vram_mb)`` of every GPU the manifest declares, in device order."""
    found: list[tuple[int, int]] = []
    for group in manifest.get("gpu") or ():
        for _ in range(int(group.get("count", 1))):
            found.append((len(found), int(float(group.get("vram_gb", 0)) * 1024)))
    return tuple(found)


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """How workers are built. ``runtimes`` is injectable (tests add hostile ones)."""

    cache_dir: Path  # bound read-only at /nodeclient/cache; the daemon stores models in it
    limits: Limits | None = None  # default: an equal share of RAM per slot
    runtimes: Mapping[str, str] | None = None  # default: default_runtimes()
    preload: tuple[str, ...] | None = None  # modules imported at start; default: theirs
    extra_python_path: tuple[Path, ...] = ()  # bound read-only, put on PYTHONPATH
    gpus: tuple[tuple[int, int], ...] = ()  # (index, vram_mb); slot i gets gpus[i % n]
    work_root: Path | None = None  # default: a fresh directory outside the node home
    node_home: Path | None = None  # checked against every bind (sandbox.make_layout)
    threads: int | None = None  # OMP_NUM_THREADS of each worker
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD
    max_result_bytes: int = DEFAULT_MAX_RESULT
    max_output_bytes: int = DEFAULT_MAX_OUTPUT  # stdout + stderr per task
    shared_bytes: int = worker.SHARED_BYTES  # bodies up to this skip the pipe; 0: never
    start_timeout: float = 120.0


# Which tasks a worker may take after the ones it ran (see _affinity): None for a fresh
# worker, which may take any.
_Affinity = tuple[str, str] | None
_SINGLE_USE: Final = "task"  # the first part of the affinity of a worker reused for nothing


def _affinity(workload_class: str, payload: bytes, *, job_id: object, key: str) -> _Affinity:
    """Which tasks may follow this one in its worker: a task that ran code in the worker
    (an exploit of ONNX Runtime, PyTorch or Blender, the threat the sandbox is for) could
    see and change the tasks after it there, so only the same requester's may follow.

    * an inference: more inferences of the same model (warm sessions are what make a
      worker worth keeping; the model is read from the payload's header only);
    * a task of any other class: more tasks of the same job;
    * without a model hash or a job: nothing, and the worker is replaced after it.
    """
    from nodeclient.protocol.blobs import SHA256_HEX
    from nodeclient.workloads import inference  # imported here: numpy, which the CLI avoids
    from nodeclient.workloads.tensors import read_metadata

    if workload_class == inference.CLASS:
        try:
            sha256 = read_metadata(payload).get(inference.META_MODEL_SHA256)
        except ProtocolError:
            sha256 = None
        if isinstance(sha256, str) and SHA256_HEX.fullmatch(sha256):
            return (workload_class, sha256)
    elif job_id is not None:
        return ("job", str(job_id))
    return (_SINGLE_USE, key)


def _reusable(affinity: _Affinity) -> bool:
    """Whether a worker that ran a task of *affinity* may take another task at all."""
    return affinity is None or affinity[0] != _SINGLE_USE


_FIT_START: Final = 2  # a _fit from which a worker must start before the task runs


def _fit(slot: _Slot, affinity: _Affinity) -> int:
    """How well *slot* suits a task of *affinity*: lower is better (_best_of_idle)."""
    if not slot.alive:
        return _FIT_START  # a worker must start, but no warm one is lost
    if slot.affinity == affinity:
        return 0
    return 1 if slot.affinity is None else _FIT_START + 1  # fresh, or to be replaced


class _WorkerGone(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(eq=False)
class _Slot:
    """One worker process and the pipes to it."""

    index: int
    workdir: Path
    tmp_dir: Path | None  # the host directory bound at /tmp, if /tmp is not a tmpfs
    argv: list[str]
    env: dict[str, str]
    mode: str
    max_output: int
    max_result: int
    shared_bytes: int
    proc: asyncio.subprocess.Process | None = None
    shared: worker.SharedBodies | None = None  # this worker's memory for bodies
    killed: str | None = None  # why we killed it; None when it died by itself
    output: int = 0
    busy: bool = False
    settling: bool = False  # answered; its clean-up frame is still to come
    in_flight: bool = False  # a task was sent and its answer not read: never reusable
    answered: object = None  # the id of the task whose clean-up frame is awaited
    tail: collections.deque[bytes] = field(default_factory=lambda: collections.deque(maxlen=16))
    drain: asyncio.Task[None] | None = None
    ids: itertools.count[int] = field(default_factory=itertools.count)
    affinity: _Affinity = None  # what its worker ran, so what it may run next (_affinity)
    settle_task: asyncio.Task[None] | None = None  # its clean-up wait while settling

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None and self.killed is None

    async def start(self, timeout: float) -> float:
        """Start the worker and wait until its runtimes are built; seconds it took."""
        started = time.monotonic()
        self.killed, self.output, self.settling, self.in_flight = None, 0, False, False
        self.affinity = None  # a fresh worker: it may take any task
        self.tail.clear()
        self.close_shared()  # a fresh region per worker: nothing of the last one carries over
        argv = self.argv
        fds: tuple[int, ...] = ()
        if self.shared_bytes:
            fd = worker.SharedBodies.create_fd(self.shared_bytes)
            self.shared = worker.SharedBodies(fd, self.shared_bytes, daemon_side=True)
            argv, fds = [*argv, "--shm-fd", str(fd)], (fd,)  # the worker's command is last
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self.env,
                cwd=self.workdir,
                start_new_session=True,  # its own process group, killed as one
                pass_fds=fds,
            )
        finally:
            for fd in fds:
                os.close(fd)  # the mapping stays
        for pipe in (self.proc.stdin, self.proc.stdout):
            _widen_pipe(pipe)
        self.drain = asyncio.create_task(self._drain_stderr(self.proc))
        try:
            frame = await asyncio.wait_for(self._read(), timeout)
        except TimeoutError:
            self.kill("start-up timed out")
            frame = None
        except RemoteProtocolError as exc:  # garbage before its ready frame
            self.kill(f"worker broke the pipe protocol at start: {exc}")
            frame = None
        if frame is None or frame.header.get("op") != "ready":
            self.kill(self.killed or "no ready frame")
            rc = await self.reap()
            raise _WorkerGone(f"worker failed to start (status {rc}): {self.stderr_tail()}")
        if frame.header.get("broken"):
            log.warning("worker.runtime_broken", extra={"broken": frame.header["broken"]})
        return time.monotonic() - started

    async def _drain_stderr(self, proc: asyncio.subprocess.Process) -> None:
        """Count and keep the tail of what the task prints; over the cap, kill the worker."""
        assert proc.stderr is not None
        while chunk := await proc.stderr.read(65536):
            if proc is not self.proc:  # an earlier worker's pipe, held open by what it left
                continue
            self.tail.append(chunk[-_TAIL:])
            if self.busy:
                self.output += len(chunk)
                if self.output > self.max_output:
                    self.kill(f"output limit exceeded: more than {self.max_output} bytes printed")

    def close_shared(self) -> None:
        if self.shared is not None:
            self.shared.close()
            self.shared = None

    def stderr_tail(self) -> str:
        text = b"".join(self.tail)[-_TAIL:].decode("utf-8", "replace")
        return " | ".join(text.strip().splitlines()[-4:])

    async def _read(self) -> worker.Frame | None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        stdout = self.proc.stdout
        try:
            prefix = await stdout.readexactly(worker.PREFIX.size)
            header_len, body_len = worker.parse_prefix(prefix, max_body=self.max_result)
            header = worker.parse_header(await stdout.readexactly(header_len))
            body = await stdout.readexactly(body_len) if body_len else b""
        except asyncio.IncompleteReadError:
            return None
        # A body in shared memory is copied out: the worker cannot change it after this.
        return worker.Frame(header, worker.frame_body(header, body, self.shared, self.max_result))

    async def execute(
        self, header: dict[str, Any], payload: bytes, on_progress: OnProgress
    ) -> worker.Frame:
        """Send one task and wait for its answer; _WorkerGone if the worker dies first.

        Whatever goes wrong before the answer arrives, the worker is killed: one left
        running would go on with the task, without a deadline, in a slot taken as free.
        """
        assert self.proc is not None
        assert self.proc.stdin is not None
        header["id"] = next(self.ids)
        self.output = 0
        wire: Mapping[str, Any] = header
        if self.shared is not None:  # the worker is idle: it reads no body meanwhile
            wire, payload = self.shared.put(header, payload)
        self.in_flight = True
        try:
            head = worker.encode_header(wire, len(payload))
            if len(payload) <= _JOIN_BYTES:  # one write, so the worker wakes up once
                self.proc.stdin.write(head + payload)
            else:  # not worth a copy of a large payload
                self.proc.stdin.write(head)
                self.proc.stdin.write(payload)
            await self.proc.stdin.drain()
            while True:
                frame = await self._read()
                if frame is None:
                    break
                if frame.header.get("id") != header["id"]:
                    raise RemoteProtocolError("worker answered another task")
                if frame.header["op"] == "progress":
                    on_progress(*_progress(frame.header))
                    continue
                self.in_flight = False
                return frame
        except (BrokenPipeError, ConnectionResetError):
            pass
        except RemoteProtocolError as exc:  # over the result cap, or garbage
            self.kill(f"worker broke the pipe protocol: {exc}")
        except Exception as exc:  # noqa: BLE001 (anything unforeseen: the task must end)
            self.kill(f"worker broke the pipe protocol: {type(exc).__name__}: {exc}"[:300])
        rc = await self.reap()
        if rc is None:  # cannot happen to a killed worker, short of a stuck kernel
            self.kill("did not exit")
            raise _WorkerGone(self.killed or "worker did not exit")
        raise _WorkerGone(self.killed or sandbox.describe_exit(rc, mode=self.mode))

    def kill(self, reason: str) -> None:
        """SIGKILL the worker's process group (with bwrap, its whole PID namespace)."""
        if self.killed is None:
            self.killed = reason
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    async def stop(self) -> None:
        """Wait for a worker that announced its exit; kill it if it lingers."""
        if self.proc is None:
            return
        if await self.reap(5.0) is None:
            self.kill("did not exit")
            await self.reap()

    async def reap(self, timeout: float = _REAP_TIMEOUT) -> int | None:
        """Wait for the worker to exit (killed, or exiting by itself); its exit status, or
        None if it has not exited within *timeout*.

        ``Process.wait()`` returns once the worker has exited and its pipes have ended.
        What the worker wrote to its answer pipe that nobody will read (a killed task's
        half-sent result, junk a task's thread wrote after its answer) would, past the
        reader's limit, pause that pipe, so its end would never be seen, wait() never
        return and the slot be lost: it is read and dropped meanwhile. If the worker has
        exited but something else holds its pipes (unsandboxed, a process that left its
        group), its exit status is taken without waiting for them.
        """
        proc = self.proc
        assert proc is not None
        drop = None if proc.stdout is None else asyncio.create_task(_discard(proc.stdout))
        try:
            async with asyncio.timeout(timeout):
                return await proc.wait()
        except TimeoutError:
            if proc.returncode is not None:
                log.warning(
                    "worker.pipes_held",
                    extra={"slot": self.index, "pid": proc.pid, "status": proc.returncode},
                )
            return proc.returncode
        finally:
            if drop is not None:
                drop.cancel()


class Executor:
    """Persistent sandboxed workers, one per slot; see the module docstring."""

    def __init__(
        self,
        *,
        slots: int,
        config: WorkerConfig,
        mode: str = MODE_BWRAP,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.slots = slots
        self.mode = mode
        self.config = config
        self.limits = config.limits or sandbox.default_limits(slots)
        self._clock = clock
        self._runtimes = dict(config.runtimes) if config.runtimes is not None else None
        self._own_root = config.work_root is None
        self._root_lock: int | None = None  # flock on our own root's lock file while it lives
        self._root: Path | None = config.work_root
        self._slots: list[_Slot] = []
        self._idle: asyncio.Queue[_Slot] | None = None
        self._running: dict[str, _Slot] = {}
        self._deadlines: dict[str, asyncio.Timeout] = {}  # a running task's, to extend
        self._extended: dict[str, float] = {}  # renewed before the task's timer started
        self._progress: dict[str, dict[str, Any]] = {}
        self._restarts: set[asyncio.Task[None]] = set()
        self._anon = itertools.count()
        # seconds each of the last workers took to start (bench/execution.py reads them)
        self.start_seconds: collections.deque[float] = collections.deque(maxlen=1000)

    # --- lifecycle ---------------------------------------------------------------------------

    def _build_slots(self) -> None:
        if self._root is None:
            tmp = Path(tempfile.gettempdir())
            _sweep_stale_roots(tmp)
            self._root, self._root_lock = _new_root(tmp)
        as_root = os.geteuid() == 0
        sandboxed = self.mode == MODE_BWRAP
        cache = self.config.cache_dir
        cache.mkdir(mode=0o700, parents=True, exist_ok=True)
        if sandboxed and as_root:
            _chown_tree(cache)
        runtimes = self._runtimes if self._runtimes is not None else default_runtimes()
        preload = self.config.preload if self.config.preload is not None else default_preload()
        tmpfs_size = sandboxed and sandbox.tmpfs_size_supported()
        if sandboxed and not tmpfs_size:
            log.warning("worker.tmp_on_disk", extra={"why": "bwrap older than 0.8: no --size"})
        for i in range(self.slots):
            workdir = self._root / f"slot-{i}"
            gpus = (self.config.gpus[i % len(self.config.gpus)][0],) if self.config.gpus else ()
            layout = sandbox.make_layout(
                workdir=workdir,
                cache_dir=cache,
                extra_python_path=self.config.extra_python_path,
                gpus=gpus,
                node_home=self.config.node_home,
                tmp_bytes=self.limits.tmp_size() if sandboxed else None,
                tmpfs_size=tmpfs_size,
            )
            inside = {
                "workdir": str(sandbox.INSIDE_WORK if sandboxed else workdir),
                "cache_dir": str(sandbox.INSIDE_CACHE if sandboxed else cache),
                # emptied after every task; unsandboxed, /tmp is the host's and is left alone
                "tmp_dir": "/tmp" if sandboxed else None,  # noqa: S108
                "sandboxed": sandboxed,
                "drop_privileges": sandboxed and as_root,
                "runtimes": runtimes,
                "preload": list(preload),
                "first_use": first_use_modules(runtimes),
                "limits": self.limits.to_wire(),
                "max_payload_bytes": self.config.max_payload_bytes,
                "max_result_bytes": self.config.max_result_bytes,
                "shared_bytes": self.config.shared_bytes,
            }
            command = [str(layout.python), "-m", "nodeclient.node.worker", "--config"]
            command.append(json.dumps(inside, separators=(",", ":")))
            env = sandbox.worker_env(layout, threads=self.config.threads)
            if sandboxed:
                argv = sandbox.bwrap_argv(layout, command, env=env, as_root=as_root)
                env = {"PATH": env["PATH"]}
            else:
                argv = command
            argv = sandbox.oom_first(argv)
            self._slots.append(
                _Slot(
                    index=i,
                    workdir=workdir,
                    tmp_dir=layout.tmp_dir,
                    argv=argv,
                    env=env,
                    mode=self.mode,
                    max_output=self.config.max_output_bytes,
                    max_result=self.config.max_result_bytes,
                    shared_bytes=self.config.shared_bytes,
                )
            )

    def _fresh_workdir(self, slot: _Slot) -> None:
        """An empty work directory for the slot's next worker, or _WorkerGone saying why
        not (nothing of a task may be left for the next one to see)."""
        try:
            _remove_tree(slot.workdir)
            slot.workdir.mkdir(mode=0o700, parents=True)
            made = [slot.workdir]
            if slot.tmp_dir is not None:
                slot.tmp_dir.mkdir(mode=0o700)
                made.append(slot.tmp_dir)
            if self.mode == MODE_BWRAP and os.geteuid() == 0:
                for path in made:
                    os.chown(path, sandbox.SANDBOX_UID, sandbox.SANDBOX_GID)
        except OSError as exc:
            raise _WorkerGone(f"could not empty the slot's work directory: {exc}") from None

    async def _start(self, slot: _Slot) -> None:
        self._fresh_workdir(slot)
        seconds = await slot.start(self.config.start_timeout)
        self.start_seconds.append(seconds)
        log.info("worker.started", extra={"slot": slot.index, "seconds": round(seconds, 3)})

    async def warm_up(self) -> None:
        """Start every worker now, so the first task does not pay for start-up."""
        if self._idle is not None:
            return
        self._build_slots()
        self._idle = asyncio.Queue()
        results = await asyncio.gather(
            *(self._start(s) for s in self._slots), return_exceptions=True
        )
        for slot, outcome in zip(self._slots, results, strict=True):
            if isinstance(outcome, _WorkerGone):
                log.error("worker.start_failed", extra={"slot": slot.index, "reason": outcome})
            elif isinstance(outcome, BaseException):
                raise outcome
            self._idle.put_nowait(slot)

    async def aclose(self) -> None:
        """Like shutdown(), and wait until every worker process and its pipes are closed.

        The pipes are read to their end on this loop: a transport left open would be
        closed by the garbage collector after the loop has gone, with a traceback.
        """
        for task in self._restarts:
            task.cancel()
        for slot in self._slots:
            slot.kill("shutdown")
        for slot in self._slots:
            proc = slot.proc
            if proc is None:
                continue
            if await slot.reap() is None:
                log.error("worker.did_not_exit", extra={"slot": slot.index, "pid": proc.pid})
                continue
            with contextlib.suppress(Exception):  # best effort: a pipe that will not end
                async with asyncio.timeout(5.0):
                    if proc.stdout is not None:
                        await proc.stdout.read()  # to EOF (a cancelled reader left it)
                    if slot.drain is not None:
                        await slot.drain  # stderr, to EOF
            if proc.stdin is not None:
                proc.stdin.close()
        self.shutdown()

    def shutdown(self) -> None:
        """Kill every worker and remove the work directories."""
        for task in self._restarts:
            task.cancel()
        for slot in self._slots:
            slot.kill("shutdown")
            slot.close_shared()
            if slot.drain is not None:
                slot.drain.cancel()
        if self._root is not None:
            for slot in self._slots:
                shutil.rmtree(slot.workdir, ignore_errors=True)
            if self._own_root:
                shutil.rmtree(self._root, ignore_errors=True)
        if self._root_lock is not None:
            os.close(self._root_lock)
            self._root_lock = None

    # --- tasks ------------------------------------------------------------------------------

    def admission(self, resources: Mapping[str, int]) -> str:
        """Why a task that declares *resources* cannot run here, or "" when it can."""
        ram_mb = int(resources.get("ram_mb", 0))
        vram_mb = int(resources.get("vram_mb", 0))
        per_slot = self.limits.memory_bytes >> 20
        if ram_mb > per_slot:
            return f"task needs {ram_mb} MB of RAM, over this node's {per_slot} MB per slot"
        if ram_mb > 0:  # a task that declares nothing is held by the slot's rlimit alone
            free = sandbox.available_memory_bytes() >> 20
            if ram_mb > free:
                return f"task needs {ram_mb} MB of RAM, only {free} MB is free"
        if vram_mb > 0:
            if not self.config.gpus:
                return f"task needs {vram_mb} MB of GPU memory, this node has no GPU"
            least = min(v for _, v in self.config.gpus)
            if vram_mb > least:
                return f"task needs {vram_mb} MB of GPU memory, a slot's GPU has {least} MB"
        return ""

    def progress(self, task_id: object) -> dict[str, Any] | None:
        """The latest ``{"done", "total", "note"}`` a running task reported, if any."""
        return self._progress.get(str(task_id))

    def extend(self, task_id: object, deadline: float) -> bool:
        """Move a task's deadline (a value of the executor's clock) to *deadline*, if that
        is later: its lease was renewed. A task still waiting for its slot or its worker
        gets it when it starts. False when its deadline has already struck."""
        key = str(task_id)
        timer = self._deadlines.get(key)
        if timer is None:  # not started yet: applied when it starts (bounded, in case not)
            self._extended[key] = max(deadline, self._extended.get(key, deadline))
            if len(self._extended) > _MAX_PENDING_EXTENSIONS:
                del self._extended[next(iter(self._extended))]
            return True
        if timer.expired():
            return False
        when = asyncio.get_running_loop().time() + (deadline - self._clock())
        current = timer.when()
        if current is not None and when > current:
            try:
                timer.reschedule(when)
            except RuntimeError:  # expiring in this very turn of the loop
                return False
        return True

    async def cancel(self, task_id: object) -> bool:
        """Kill the worker running *task_id*; its run() fails with "cancelled"."""
        slot = self._running.get(str(task_id))
        if slot is None:
            return False
        slot.kill("cancelled by the coordinator")
        return True

    async def run(
        self,
        workload_class: str,
        payload: bytes,
        *,
        task_id: object = None,
        job_id: object = None,
        deadline: float | None = None,
        resources: Mapping[str, int] | None = None,
        on_progress: OnProgress | None = None,
    ) -> bytes:
        """Run one task in a worker; raise TaskFailed with a reason on any failure.

        *deadline* is a value of the executor's clock (``time.monotonic`` by default).
        *job_id* is the dispatch's: a worker that ran a task of a job (other than an
        inference) takes no task of another job, and without it none at all (see
        :func:`_affinity`).
        """
        if len(payload) > self.config.max_payload_bytes:
            raise TaskFailed(
                f"payload of {len(payload)} bytes is over {self.config.max_payload_bytes}",
                requester_fault=True,
            )
        refusal = self.admission(resources or {})
        if refusal:
            raise TaskFailed(refusal, requester_fault=True)
        await self.warm_up()
        assert self._idle is not None
        key = str(task_id) if task_id is not None else f"anonymous-{next(self._anon)}"
        affinity = _affinity(workload_class, payload, job_id=job_id, key=key)
        slot = await self._slot_for(key, deadline, affinity)
        try:
            if slot.alive and slot.affinity not in (None, affinity):
                await self._retire(slot, "replaced: it ran another requester's task")
            if not slot.alive:
                try:
                    await self._start(slot)
                except _WorkerGone as exc:
                    raise TaskFailed(exc.reason, requester_fault=False) from None
                except BaseException:  # cancelled half-way: a worker not known to be ready
                    slot.kill("start interrupted")
                    raise
            self._running[key] = slot
            slot.affinity = affinity  # from now on, what the worker may have seen
            return await self._run_on(
                slot,
                key,
                workload_class,
                payload,
                deadline=deadline,
                resources=resources,
                on_progress=on_progress,
            )
        finally:
            self._running.pop(key, None)
            self._progress.pop(key, None)
            self._extended.pop(key, None)
            slot.busy = False
            self._release(slot)

    async def _slot_for(self, key: str, deadline: float | None, affinity: _Affinity) -> _Slot:
        """A free slot for a task of *affinity* (see _best_of_idle). Where the free ones
        would need a worker started first while one that may take the task as it is
        finishes its clean-up (its last task answered a moment ago), that one is waited
        for, a while at most."""
        slot = self._best_of_idle(await self._free_slot(key, deadline), affinity)
        if _fit(slot, affinity) < _FIT_START:
            return slot
        settling = [
            s.settle_task
            for s in self._slots
            if s.settling and s.affinity == affinity and s.settle_task is not None
        ]
        if not settling:
            return slot
        assert self._idle is not None
        self._idle.put_nowait(slot)
        wait = _SETTLE_WAIT if deadline is None else min(_SETTLE_WAIT, deadline - self._clock())
        await asyncio.wait(settling, timeout=max(0.0, wait))
        return self._best_of_idle(await self._free_slot(key, deadline), affinity)

    def _best_of_idle(self, first: _Slot, affinity: _Affinity) -> _Slot:
        """Of *first* and every other idle slot, the one best for a task of *affinity*:
        a worker that may take it as it is, then a fresh worker, then a slot without a
        worker, and last one whose worker must be replaced first. The others stay idle."""
        assert self._idle is not None
        idle = [first]
        while not self._idle.empty():
            idle.append(self._idle.get_nowait())
        best = min(idle, key=lambda slot: _fit(slot, affinity))
        for slot in idle:
            if slot is not best:
                self._idle.put_nowait(slot)
        return best

    async def _retire(self, slot: _Slot, reason: str) -> None:
        """Kill a reusable worker that may not take the next task, and wait for its end."""
        slot.kill(reason)
        if await slot.reap() is None:
            assert slot.proc is not None
            log.error("worker.did_not_exit", extra={"slot": slot.index, "pid": slot.proc.pid})

    async def _free_slot(self, key: str, deadline: float | None) -> _Slot:
        """An idle slot, waited for at most until the task's deadline (all slots may be
        restarting a worker)."""
        assert self._idle is not None
        if deadline is None:
            return await self._idle.get()
        while True:
            deadline = max(deadline, self._extended.get(key, deadline))  # a renewed lease
            try:
                async with asyncio.timeout(max(0.0, deadline - self._clock())):
                    return await self._idle.get()
            except TimeoutError:
                if self._extended.get(key, deadline) > deadline:
                    continue  # renewed while it waited: wait on to the new end
                raise TaskFailed(
                    "deadline exceeded while waiting for a free worker", requester_fault=False
                ) from None

    async def _run_on(
        self,
        slot: _Slot,
        key: str,
        workload_class: str,
        payload: bytes,
        *,
        deadline: float | None,
        resources: Mapping[str, int] | None,
        on_progress: OnProgress | None,
    ) -> bytes:
        gate = _ProgressGate(self._clock)

        def progress(done: float, total: float, note: str) -> None:
            if gate.admit(done, total):
                self._progress[key] = {"done": done, "total": total, "note": note}
                if on_progress is not None:
                    on_progress(done, total, note)

        ram_mb = int((resources or {}).get("ram_mb", 0))
        header: dict[str, Any] = {"op": "run", "class": workload_class}
        header["memory_bytes"] = (ram_mb << 20) or None
        extended = self._extended.pop(key, None)
        if extended is not None and deadline is not None:
            deadline = max(deadline, extended)
        timeout = None if deadline is None else deadline - self._clock()
        if timeout is not None and timeout <= 0:
            raise TaskFailed("deadline exceeded before the task started", requester_fault=False)
        slot.busy = True
        try:
            async with asyncio.timeout(timeout) as timer:  # no extra task, unlike wait_for
                self._deadlines[key] = timer
                try:
                    frame = await slot.execute(header, payload, progress)
                finally:
                    self._deadlines.pop(key, None)
                    if gate.dropped:
                        log.info(
                            "task.progress_dropped",
                            extra={"slot": slot.index, "dropped": gate.dropped},
                        )
        except TimeoutError:
            slot.kill("deadline")
            raise TaskFailed(
                f"deadline exceeded: killed after {timeout:.1f} s", requester_fault=False
            ) from None
        except asyncio.CancelledError:
            slot.kill("cancelled")
            raise
        except _WorkerGone as exc:
            log.warning(
                "worker.died",
                extra={"slot": slot.index, "reason": exc.reason, "stderr": slot.stderr_tail()},
            )
            raise TaskFailed(exc.reason, requester_fault=False) from None
        if slot.killed is not None:  # e.g. the output limit, with the answer already read
            raise TaskFailed(slot.killed, requester_fault=False)
        if frame.header.get("restart"):
            slot.killed = _REPLACED
        else:
            slot.settling = True  # reusable once its "clean" frame arrives (_settle)
            slot.answered = frame.header.get("id")
        if frame.header["op"] == "result":
            return frame.body
        kind = frame.header.get("kind")
        raise TaskFailed(
            str(frame.header.get("reason", "failed")), requester_fault=kind == "requester"
        )

    def _release(self, slot: _Slot) -> None:
        assert self._idle is not None
        if slot.in_flight:  # its task may still run: the worker must go, whatever happened
            slot.kill("task still running when its slot was released")
        if slot.alive and not _reusable(slot.affinity):  # replaced now, not when next needed
            slot.kill("replaced: its task shares a worker with no other")
        if slot.alive and not slot.settling:
            self._idle.put_nowait(slot)
            return
        # The slot's next worker serves later tasks: its events are not the ended task's.
        task = asyncio.create_task(
            self._settle(slot) if slot.alive else self._replace(slot),
            context=logs.context_without("task_id", "job_id"),
        )
        slot.settle_task = task if slot.alive else None
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    async def _settle(self, slot: _Slot) -> None:
        """Wait for the worker's clean-up after an answered task, then reuse or replace it.

        Whatever happens here, the slot ends up back in the idle queue: reused, or (any
        doubt about the worker) with a fresh worker.
        """
        answered = slot.answered
        try:
            async with asyncio.timeout(_SETTLE_TIMEOUT):
                frame = await slot._read()
            if frame is None or frame.header.get("op") != "clean":
                slot.kill("worker broke the pipe protocol: no clean-up report after a task")
            elif frame.header.get("id") != answered:
                slot.kill("worker broke the pipe protocol: clean-up report for another task")
            elif frame.header.get("restart"):
                slot.killed = _REPLACED  # it left something behind and exits by itself
        except TimeoutError:
            slot.kill(f"no clean-up report within {_SETTLE_TIMEOUT:.0f} s of a task")
        except asyncio.CancelledError:
            slot.kill("shutdown")
            raise
        except Exception as exc:  # noqa: BLE001 (a pipe error, garbage: never lose the slot)
            slot.kill(f"worker broke the pipe protocol: {type(exc).__name__}: {exc}"[:300])
        finally:
            slot.settling = False
        if slot.alive:
            assert self._idle is not None
            self._idle.put_nowait(slot)
        else:
            await self._replace(slot)

    async def _replace(self, slot: _Slot) -> None:
        """Stop a worker that may not be reused and start a fresh one in its slot."""
        try:
            if slot.proc is not None and slot.proc.returncode is None:
                if slot.killed == _REPLACED:
                    await slot.stop()  # it announced its exit: let it go cleanly
                else:
                    slot.kill(slot.killed or "replaced")
                    if await slot.reap() is None:
                        log.error(
                            "worker.did_not_exit", extra={"slot": slot.index, "pid": slot.proc.pid}
                        )
            await self._start(slot)
        except _WorkerGone as exc:  # the next task on this slot retries and reports it
            log.error("worker.restart_failed", extra={"slot": slot.index, "reason": exc.reason})
        except Exception:  # a bug: the slot must not be lost with it
            log.exception("worker.restart_failed", extra={"slot": slot.index})
        finally:
            assert self._idle is not None
            self._idle.put_nowait(slot)


async def _discard(stream: asyncio.StreamReader) -> None:
    """Read *stream* to its end, dropping what it holds."""
    with contextlib.suppress(Exception):
        while await stream.read(1 << 20):
            pass


class _ProgressGate:
    """Which of a task's progress reports go on to the daemon (and the coordinator): one
    every PROGRESS_INTERVAL_S at most, and one at most that says the task is done.

    The worker's own throttle is code the task can bypass (it can write frames to the
    pipe itself): without this, each of a flood of frames would become a send.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._last: float | None = None
        self._finished = False
        self.dropped = 0

    def admit(self, done: float, total: float) -> bool:
        now = self._clock()
        finished = done >= total
        if finished and not self._finished:  # the end is news, whenever it comes
            self._finished = True
        elif finished or (self._last is not None and now - self._last < PROGRESS_INTERVAL_S):
            self.dropped += 1
            return False
        self._last = now
        return True


def _progress(header: Mapping[str, Any]) -> tuple[float, float, str]:
    """(done, total, note) of a progress frame; RemoteProtocolError for garbage (what a
    task prints through its runtime's progress callback is the task's to choose)."""
    try:
        done, total = float(header["done"]), float(header["total"])
    except (KeyError, TypeError, ValueError, ArithmeticError) as exc:  # float(10**400)
        raise RemoteProtocolError(f"bad progress frame: {exc!r}"[:200]) from None
    if not (math.isfinite(done) and math.isfinite(total)):
        raise RemoteProtocolError(f"bad progress frame: done {done}, total {total}")
    total = max(total, 0.0)
    return min(max(done, 0.0), total), total, str(header.get("note", ""))[:200]


def _remove_tree(path: Path) -> None:
    """Remove a work directory and everything in it, including what a task made read-only
    (a directory of mode 0555 keeps its entries from an unlink): such a parent is made
    writable and the removal tried again."""

    def retry(func: Callable[[str], object], name: str, _exc: object) -> None:
        parent = os.path.dirname(name)
        with contextlib.suppress(FileNotFoundError):  # already gone, by a retry below
            os.chmod(parent, stat.S_IMODE(os.lstat(parent).st_mode) | stat.S_IRWXU)
            if os.path.isdir(name) and not os.path.islink(name):
                os.chmod(name, stat.S_IRWXU)
                remove(name)  # with its entries now reachable
            else:
                func(name)

    def remove(name: str | Path) -> None:
        if sys.version_info >= (3, 12):
            shutil.rmtree(name, onexc=retry)
        else:
            shutil.rmtree(name, onerror=retry)

    if path.exists() or path.is_symlink():
        remove(path)


def _widen_pipe(stream: object) -> None:
    """Grow a pipe to 1 MiB so a payload or result crosses in a few wake-ups, not dozens."""
    transport = getattr(stream, "transport", None) or getattr(stream, "_transport", None)
    pipe = None if transport is None else transport.get_extra_info("pipe")
    if pipe is not None:
        with contextlib.suppress(OSError):
            fcntl.fcntl(pipe.fileno(), _F_SETPIPE_SZ, _PIPE_BYTES)


def _new_root(tmp: Path) -> tuple[Path, int]:
    """A fresh work root in *tmp*, and the held lock that marks it live. It is made and
    locked under a name the sweep ignores, then renamed into view, so that another
    daemon's sweep can never see it unlocked."""
    staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=tmp))
    fd = _hold_root(staging)
    root = tmp / (_ROOT_PREFIX + staging.name[len(_STAGING_PREFIX) :])
    try:  # mkdtemp's random name is new; at worst it replaces an empty directory
        os.rename(staging, root)
    except OSError:  # the root keeps its staging name (swept like one, once stale)
        return staging, fd
    return root, fd


def _hold_root(root: Path) -> int:
    """Lock *root*'s lock file for as long as this process lives: a root whose lock nobody
    holds was left by a process that died without its clean-up (kill -9, a crash)."""
    fd = os.open(root / _ROOT_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _sweep_stale_roots(tmp: Path) -> None:
    """Remove the work roots in *tmp* that daemons of this user left when they died: the
    files of their last tasks stay there otherwise (under systemd, PrivateTmp empties
    /tmp anyway). A root is ours to remove only if it is a real directory owned by this
    user whose lock file exists and no live process holds; another daemon's, or one from
    a release before the lock, is left alone."""
    uid = os.geteuid()
    try:
        candidates = [p for p in tmp.iterdir() if p.name.startswith(_ROOT_PREFIX)]
        # A staging root is a live daemon's for a moment before it is locked: only an
        # old one (its daemon killed while making it) is stale.
        staged = [p for p in tmp.iterdir() if p.name.startswith(_STAGING_PREFIX)]
    except OSError:
        return
    for root in candidates + staged:
        try:
            st = os.lstat(root)
        except OSError:
            continue  # gone meanwhile
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
            continue
        if root in staged and time.time() - st.st_mtime < _STAGING_STALE_S:
            continue
        try:
            fd: int | None = os.open(root / _ROOT_LOCK, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            if root not in staged:
                continue  # a root from a release before the lock: not known to be stale
            fd = None  # an old staging root killed before its lock file was made
        except OSError:
            continue  # gone, or not ours to open
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live daemon's
            finally:
                os.close(fd)
        try:
            _remove_tree(root)
        except OSError as exc:  # a mount left in it, a read-only disk: start all the same
            log.warning("worker.stale_root_kept", extra={"path": str(root), "error": str(exc)})
            continue
        log.info("worker.stale_root_removed", extra={"path": str(root)})


def _chown_tree(path: Path) -> None:
    """Give the model cache to the sandbox uid, so workers can read it (bound read-only).

    Workers of earlier releases could write it and plant symlinks in it, so nothing
    inside it is followed: ``os.fwalk`` descends only into real directories, and every
    chown is relative to an open directory and does not follow a link. The cache
    directory itself is the operator's (the root of the sandbox's bind, which no task can
    replace), so a link there, say to a larger disk, is followed to the directory it
    names.
    """
    uid, gid = sandbox.SANDBOX_UID, sandbox.SANDBOX_GID
    try:
        real = os.path.realpath(path)
        top = os.open(real, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise NodeClientError(
            f"model cache {path} is not a directory ({exc.strerror}); "
            "the daemon will not hand it to the sandbox uid: make it a plain directory"
        ) from exc
    try:
        for _, dirs, files, dir_fd in os.fwalk(".", dir_fd=top, follow_symlinks=False):
            for name in (*dirs, *files):
                with contextlib.suppress(OSError):
                    os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
        os.fchown(top, uid, gid)
    finally:
        os.close(top)
