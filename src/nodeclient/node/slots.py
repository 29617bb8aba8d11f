"""One slot's worker process and the pipes to it (2.3.5 Work Execution), and which
tasks the worker may take next.

A :class:`Slot` starts its worker, sends it one task at a time over the pipe protocol
(:mod:`nodeclient.node.worker`), reads its answer and progress frames, and kills its
whole process group when anything goes wrong; :class:`WorkerGone` says why the worker
is gone. :func:`affinity_of` says which tasks may follow a task in the same worker, and
:func:`fit_slot` how well a slot suits a task; the executor (:mod:`nodeclient.node.executor`)
picks slots with them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import itertools
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from nodeclient.errors import ProtocolError, RemoteProtocolError
from nodeclient.node import sandbox, worker

log = logging.getLogger("nodeclient.node.executor")  # its events stay the executor's

_TAIL: Final = 2048
_F_SETPIPE_SZ: Final = 1031  # Linux fcntl; not exported by Python 3.11
_PIPE_BYTES: Final = 1 << 20  # the default /proc/sys/fs/pipe-max-size
_JOIN_BYTES: Final = 256 * 1024  # payloads up to this size go down the pipe in one write
_REAP_TIMEOUT: Final = 30.0  # a killed worker's exit and the end of its pipes

# progress(done, total, note) as the executor reports it to the daemon
OnProgress = Callable[[float, float, str], None]


# Which tasks a worker may take after the ones it ran (see affinity_of): None for a fresh
# worker, which may take any.
Affinity = tuple[str, str] | None
_SINGLE_USE: Final = "task"  # the first part of the affinity of a worker reused for nothing


def affinity_of(workload_class: str, payload: bytes, *, job_id: object, key: str) -> Affinity:
    """Which tasks may follow this one in its worker: a task that ran code in the worker
    (an exploit of ONNX Runtime, PyTorch or Blender, the threat the sandbox is for) could
    see and change the tasks after it there, so only tasks of the same job, or of the
    same model, may follow.

    * an inference: more inferences of the same model, whoever requests them (warm
      sessions are what make a worker worth keeping; the model is read from the payload's
      header only). So requesters of one model share a worker: an exploit carried in one
      request's inputs could see the next requests for that model on this node
      (docs/operator.md says so);
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


def is_reusable(affinity: Affinity) -> bool:
    """Whether a worker that ran a task of *affinity* may take another task at all."""
    return affinity is None or affinity[0] != _SINGLE_USE


FIT_START: Final = 2  # a fit_slot from which a worker must start before the task runs


def fit_slot(slot: Slot, affinity: Affinity) -> int:
    """How well *slot* suits a task of *affinity*: lower is better (Executor._best_of_idle)."""
    if not slot.alive:
        return FIT_START  # a worker must start, but no warm one is lost
    if slot.affinity == affinity:
        return 0
    return 1 if slot.affinity is None else FIT_START + 1  # fresh, or to be replaced


def descendants(pid: int) -> list[int]:
    """The processes under *pid*: its children, theirs, and so on, as the kernel lists
    them for each thread (``/proc/<pid>/task/<tid>/children``), or, on a kernel that keeps
    no such lists, by every process's parent. Raises OSError if *pid* is gone."""
    if not _CHILDREN_LISTED:
        return _descendants_by_parent(pid)
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            threads = os.listdir(f"/proc/{parent}/task")
        except FileNotFoundError:
            if parent == pid:
                raise
            continue  # gone meanwhile
        for tid in threads:
            try:
                children = [
                    int(child) for child in _read_all(f"/proc/{parent}/task/{tid}/children").split()
                ]
            except (FileNotFoundError, ProcessLookupError):
                continue  # a thread that ended meanwhile
            found += children
            todo += children
    return found


def _read_all(path: str) -> bytes:
    """A small /proc file's bytes (os.read: no file object, on a path run after every task)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _descendants_by_parent(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()  # after "(comm)"
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        parents.setdefault(int(fields[1]), []).append(int(name))
    if not os.path.isdir(f"/proc/{pid}"):
        raise FileNotFoundError(f"process {pid} is gone")
    found: list[int] = []
    todo = [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


_CHILDREN_LISTED: Final = os.path.exists(f"/proc/self/task/{os.getpid()}/children")


class WorkerGone(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(eq=False)
class Slot:
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
    ready: bool = False  # its worker sent its ready frame: from then on idle means quiet
    # A worker of the slot has reported what it found broken (broken): that stands while
    # the slot's next worker starts (Executor.broken_everywhere).
    reported: bool = False
    in_flight: bool = False  # a task was sent and its answer not read: never reusable
    answered: object = None  # the id of the task whose clean-up frame is awaited
    tail: collections.deque[bytes] = field(default_factory=lambda: collections.deque(maxlen=16))
    drain: asyncio.Task[None] | None = None
    ids: itertools.count[int] = field(default_factory=itertools.count)
    affinity: Affinity = None  # what its worker ran, so what it may run next (affinity_of)
    settle_task: asyncio.Task[None] | None = None  # its clean-up wait while settling
    broken: dict[str, str] = field(default_factory=dict)  # class -> why, from its ready frame
    checked_for: str | None = None  # the one class its worker checked; None: all of them
    task_rss: int | None = None  # its process tree's memory as its task began (admission)
    swept: bool = False  # its exited worker's process group was killed (kill_leftovers)
    base_bytes: int = 0  # its work directory's size once its worker had started

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None and self.killed is None

    async def end_previous(self) -> None:
        """Kill the slot's previous worker if it still runs (killed while idle, not yet
        reaped) and wait for it to exit; WorkerGone if it does not. Before its directories
        are emptied for the next worker, or a process of its last task could write there
        again (another requester's, say)."""
        if self.proc is not None and self.proc.returncode is None:
            self.kill(self.killed or "replaced")
            if await self.reap() is None:
                raise WorkerGone(f"the slot's previous worker (pid {self.proc.pid}) did not exit")
        self.kill_leftovers()

    def kill_leftovers(self) -> None:
        """SIGKILL what is left in the process group of a worker that has exited by
        itself (it asked to be replaced, it failed, it crashed): unsandboxed, a process its
        task started outlives it there (with bwrap, its PID namespace went with it). The
        group's id is not reused while any member lives; it is signalled once, as the exit
        is handled, not later, when its id may have been taken by a new group."""
        if self.proc is not None and self.proc.returncode is not None and not self.swept:
            self.swept = True
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    async def start(self, timeout: float, *, check_only: str | None = None) -> float:
        """Start the worker and wait until its runtimes are built; seconds it took. A
        previous worker still exiting (killed while idle) is waited for first: its task
        processes must be gone before a fresh worker takes the slot's directories.

        *check_only*: the worker runs that class's self-check alone (it is started for a
        task of that class, and will run no other: see :func:`affinity_of`). What the
        last worker reported of the other classes stands: a GPU node's worker for an
        inference then neither imports PyTorch nor loads cuBLAS.
        """
        await self.end_previous()
        started = time.monotonic()
        self.killed, self.output, self.settling, self.in_flight = None, 0, False, False
        self.ready = False
        self.affinity = None  # a fresh worker: it may take any task
        self.tail.clear()
        self.close_shared()  # a fresh region per worker: nothing of the last one carries over
        argv = self.argv
        fds: tuple[int, ...] = ()
        if self.shared_bytes:
            fd = worker.SharedBodies.create_fd(self.shared_bytes)
            self.shared = worker.SharedBodies(fd, self.shared_bytes, daemon_side=True)
            argv, fds = [*argv, "--shm-fd", str(fd)], (fd,)  # the worker's command is last
        if check_only is not None:
            argv = [*argv, "--check-only", check_only]
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
            self.swept = False  # a new group, not yet signalled after an exit
        finally:
            for fd in fds:
                os.close(fd)  # the mapping stays
        for pipe in (self.proc.stdin, self.proc.stdout):
            _widen_pipe(pipe)
        self.drain = asyncio.create_task(self._drain_stderr(self.proc))
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for drops a cancel that arrives
            # as the frame does, and the task (cancelled, handed back) would run on.
            async with asyncio.timeout(timeout):
                frame = await self._read()
        except TimeoutError:
            self.kill("start-up timed out")
            frame = None
        except RemoteProtocolError as exc:  # garbage before its ready frame
            self.kill(f"worker broke the pipe protocol at start: {exc}")
            frame = None
        if frame is None or frame.header.get("op") != "ready":
            self.kill(self.killed or "no ready frame")
            rc = await self.reap()
            raise WorkerGone(f"worker failed to start (status {rc}): {self.stderr_tail()}")
        broken = frame.header.get("broken")
        reported = {str(k): str(v) for k, v in broken.items()} if isinstance(broken, dict) else {}
        if reported:  # what this worker found, not what an earlier one did
            log.warning("worker.runtime_broken", extra={"broken": reported})
        if check_only is not None:  # the other classes were not checked: the last word stands
            kept = {k: v for k, v in self.broken.items() if k != check_only}
            reported = {**kept, **reported}
        self.broken, self.checked_for = reported, check_only
        self.ready = self.reported = True
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
            elif self.ready and not self.settling and self.killed is None:
                # Idle, a worker runs nothing and prints nothing: a thread or process the
                # last task left running does. It goes now, before the daemon reads it
                # without limit, or blames the next task (another requester's) for it.
                self.kill("printed while idle: its last task left something running")
                log.warning(
                    "worker.idle_output",
                    extra={"slot": self.index, "printed": chunk[-200:].decode("utf-8", "replace")},
                )
        if proc is self.proc and self.ready and not (self.busy or self.settling or self.killed):
            await self._exited_idle(proc)

    async def _exited_idle(self, proc: asyncio.subprocess.Process) -> None:
        """The worker ended its stderr while idle, so it exited (or is exiting) with no
        task and nobody in the daemon asking it to: the kernel's OOM killer, an operator,
        a crash. Said now, with why, rather than found by the next task; that task starts
        a fresh worker."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_REAP_TIMEOUT):
                await proc.wait()
        if proc is not self.proc or self.killed is not None or self.busy or self.settling:
            return  # meanwhile replaced, killed by the daemon, or given a task: it says
        status = proc.returncode
        if status is None:  # its stderr closed, yet it runs on: it cannot be trusted
            self.kill("closed its stderr while idle")
        else:
            self.killed = "exited while idle"
            self.kill_leftovers()  # now, as its exit is handled: not at the next task
        log.warning(
            "worker.exited_idle",
            extra={
                "slot": self.index,
                "pid": proc.pid,
                "status": status,
                "reason": "still running"
                if status is None
                else sandbox.describe_exit(status, mode=self.mode),
                "stderr": self.stderr_tail(),
                "action": "the slot's next task starts a fresh worker; if this repeats, look "
                "for the OOM killer in the kernel log (journalctl -k)",
            },
        )

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
        """Send one task and wait for its answer; WorkerGone if the worker dies first.

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
            raise WorkerGone(self.killed or "worker did not exit")
        raise WorkerGone(self.killed or sandbox.describe_exit(rc, mode=self.mode))

    def kill(self, reason: str) -> None:
        """SIGKILL the worker's process group (with bwrap, its whole PID namespace)."""
        if self.killed is None:
            self.killed = reason
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    async def stop(self) -> None:
        """Wait for a worker that announced its exit; kill it if it lingers, and what its
        task left in its process group if it does not."""
        if self.proc is None:
            return
        if await self.reap(5.0) is None:
            self.kill("did not exit")
            await self.reap()
        self.kill_leftovers()

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


async def _discard(stream: asyncio.StreamReader) -> None:
    """Read *stream* to its end, dropping what it holds."""
    with contextlib.suppress(Exception):
        while await stream.read(1 << 20):
            pass


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


def _widen_pipe(stream: object) -> None:
    """Grow a pipe to 1 MiB so a payload or result crosses in a few wake-ups, not dozens."""
    transport = getattr(stream, "transport", None) or getattr(stream, "_transport", None)
    pipe = None if transport is None else transport.get_extra_info("pipe")
    if pipe is not None:
        # ValueError: the pipe is already closed (a worker that could not be started).
        with contextlib.suppress(OSError, ValueError):
            fcntl.fcntl(pipe.fileno(), _F_SETPIPE_SZ, _PIPE_BYTES)
