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
executor can tell (:func:`~nodeclient.node.slots.affinity_of`): inferences of the same
model, or tasks of the same job. A task goes to an idle worker that may take it, else to
a fresh one, else to a slot whose worker is replaced first; a worker that may take
nothing more is replaced at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

from nodeclient import logs
from nodeclient.errors import NodeClientError
from nodeclient.node import sandbox
from nodeclient.node.exec_config import (
    DEFAULT_MAX_PAYLOAD,
    WorkerConfig,
    deadline_clock,
    default_preload,
    default_runtimes,
    first_use_modules,
    gpus_from_probe,
)
from nodeclient.node.exec_workdirs import (
    TooManyEntries,
    chown_tree,
    disk_used,
    new_root,
    remove_tree,
    sweep_stale_roots,
)
from nodeclient.node.sandbox import MODE_BWRAP
from nodeclient.node.slots import (
    FIT_START,
    Affinity,
    OnProgress,
    Slot,
    WorkerGone,
    affinity_of,
    descendants,
    fit_slot,
    is_reusable,
)
from nodeclient.protocol.blobs import SHA256_HEX

# The executor's names, and what a caller builds one with, wherever they are defined.
__all__ = [
    "DEFAULT_MAX_PAYLOAD",
    "PROGRESS_INTERVAL_S",
    "Executor",
    "TaskFailed",
    "WorkerConfig",
    "gpus_from_probe",
]

log = logging.getLogger("nodeclient.node.executor")

_REPLACED: Final = "replaced after a failed or untidy task"
_SETTLE_TIMEOUT: Final = 300.0  # emptying a work directory of rendered frames takes a while
_SETTLE_WAIT: Final = 5.0  # a task waits this long for a settling worker that may take it
_UNBROKEN_POLL_S: Final = 0.05  # how often it looks for a slot whose worker can run its class
PROGRESS_INTERVAL_S: Final = 0.5  # a task's progress reports passed on at most this often
DISK_CHECK_S = 2.0  # a running task's work directory is measured this often (max_work_bytes)
# What a worker's work directory may hold after its clean-up beyond what it held once the
# worker had started (its empty directories, a /tmp on disk with what the runtimes' start
# wrote there).
CLEAN_MAX_BYTES: Final = 1 << 20
CLEAN_MAX_ENTRIES: Final = 1000  # and the files and directories it may hold then
# A task's deadline is read again on the executor's clock this often: the event loop's
# timers run on CLOCK_MONOTONIC, which stops while the system is suspended, and the
# executor's clock does not (exec_config.deadline_clock).
DEADLINE_CHECK_S = 1.0


_MAX_PENDING_EXTENSIONS: Final = 1024  # renewals of tasks whose timer has not started


class TaskFailed(NodeClientError):
    """The task did not produce a result; ``reason`` is what the signed Reject says."""

    def __init__(self, reason: str, *, requester_fault: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.requester_fault = requester_fault


class Executor:
    """Persistent sandboxed workers, one per slot; see the module docstring."""

    def __init__(
        self,
        *,
        slots: int,
        config: WorkerConfig,
        mode: str = MODE_BWRAP,
        clock: Callable[[], float] = deadline_clock,
    ) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.slots = slots
        self.mode = mode
        self.config = config
        # Called as each worker has started, with what it found broken (slot.broken): the
        # daemon withdraws a class broken in every worker, and offers again one no longer
        # broken in every worker, and registers again.
        self.on_worker_started: Callable[[], None] | None = None
        self.limits = config.limits or sandbox.default_limits(slots)
        self._clock = clock
        self._runtimes = dict(config.runtimes) if config.runtimes is not None else None
        self._own_root = config.work_root is None
        self._root_lock: int | None = None  # flock on our own root's lock file while it lives
        self._root: Path | None = config.work_root
        self._slots: list[Slot] = []
        self._idle: asyncio.Queue[Slot] | None = None
        self._running: dict[str, Slot] = {}
        self._reserved: dict[str, int] = {}  # task -> RAM it declared, admitted (reserve)
        self._deadlines: dict[str, asyncio.Timeout] = {}  # a running task's, to extend
        self._ends: dict[str, float] = {}  # a running task's deadline, on the clock
        self._extended: dict[str, float] = {}  # renewed before the task's timer started
        self._progress: dict[str, dict[str, Any]] = {}
        self._restarts: set[asyncio.Task[None]] = set()
        self._anon = itertools.count()
        # seconds each of the last workers took to start (bench/execution.py reads them)
        self.start_seconds: collections.deque[float] = collections.deque(maxlen=1000)

    @property
    def clock(self) -> Callable[[], float]:
        """The clock of task deadlines (:func:`~nodeclient.node.exec_config.deadline_clock`
        unless one was injected): it runs on while the system is suspended."""
        return self._clock

    # --- lifecycle ---------------------------------------------------------------------------

    def _build_slots(self) -> None:
        if self._root is None:
            tmp = sandbox.scratch_root()
            sweep_stale_roots(tmp)
            try:
                self._root, self._root_lock = new_root(tmp)
            except OSError as exc:  # a full or read-only /tmp: one line, what to do
                raise sandbox.scratch_failed(tmp, exc) from exc
        as_root = os.geteuid() == 0
        sandboxed = self.mode == MODE_BWRAP
        cache = self.config.cache_dir
        cache.mkdir(mode=0o700, parents=True, exist_ok=True)
        if sandboxed and as_root:
            chown_tree(cache)
        runtimes = self._runtimes if self._runtimes is not None else default_runtimes()
        preload = self.config.preload if self.config.preload is not None else default_preload()
        bwrap = sandbox.bwrap_path()
        tmpfs_size = sandboxed and sandbox.tmpfs_size_supported(bwrap)
        if sandboxed and not tmpfs_size:
            log.warning("worker.tmp_on_disk", extra={"why": "bwrap older than 0.8: no --size"})
        for i in range(self.slots):
            workdir = self._root / f"slot-{i}"
            gpus = (self.config.gpus[i % len(self.config.gpus)],) if self.config.gpus else ()
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
                # what the work directory keeps between tasks (each emptied on its own)
                "work_keep": ["task"] + ([layout.tmp_dir.name] if layout.tmp_dir else []),
                "sandboxed": sandboxed,
                "drop_privileges": sandboxed and as_root,
                "runtimes": runtimes,
                "preload": list(preload),
                "first_use": first_use_modules(runtimes),
                "limits": self.limits.to_wire(),
                "max_payload_bytes": self.config.max_payload_bytes,
                "max_result_bytes": self.config.max_result_bytes,
                "shared_bytes": self.config.shared_bytes,
                # A worker with a GPU sets no RLIMIT_AS (sandbox.apply_limits).
                "gpus": [gpu.to_wire() for gpu in gpus],
            }
            # -P: the directory it starts in is not put first on sys.path (with -m, Python
            # would import from the work directory, which tasks write, before the stdlib).
            command = [str(layout.python), "-P", "-m", "nodeclient.node.worker", "--config"]
            command.append(json.dumps(inside, separators=(",", ":")))
            env = sandbox.worker_env(layout, threads=self.config.threads, sandboxed=sandboxed)
            if sandboxed:
                argv = sandbox.bwrap_argv(layout, command, env=env, as_root=as_root, bwrap=bwrap)
                env = {"PATH": env["PATH"]}
            else:
                argv = command
            argv = sandbox.oom_first(argv)
            self._slots.append(
                Slot(
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

    def _fresh_workdir(self, slot: Slot) -> None:
        """An empty work directory for the slot's next worker, or WorkerGone saying why
        not (nothing of a task may be left for the next one to see)."""
        try:
            remove_tree(slot.workdir)
            slot.workdir.mkdir(mode=0o700, parents=True)
            made = [slot.workdir]
            if slot.tmp_dir is not None:
                # Traversable (not listable) by others: it is the sandbox's /tmp, and a
                # worker started by root (no CAP_DAC_OVERRIDE left) must pass through it to
                # an interpreter or package bound under /tmp. On the host it lies inside
                # the slot's directory, which stays 0700.
                slot.tmp_dir.mkdir(mode=0o711)
                slot.tmp_dir.chmod(0o711)  # whatever the umask
                made.append(slot.tmp_dir)
            if self.mode == MODE_BWRAP and os.geteuid() == 0:
                for path in made:
                    os.chown(path, sandbox.SANDBOX_UID, sandbox.SANDBOX_GID)
        except OSError as exc:
            raise WorkerGone(f"could not empty the slot's work directory: {exc}") from None

    async def _start(self, slot: Slot, *, for_class: str | None = None) -> None:
        """Start *slot*'s worker; *for_class*: for a task of that class, which is all the
        worker will run, so that class's self-check alone runs (Slot.start)."""
        await slot.end_previous()  # its processes gone before its directories are emptied
        self._fresh_workdir(slot)
        seconds = await slot.start(self.config.start_timeout, check_only=for_class)
        self.start_seconds.append(seconds)
        if self.on_worker_started is not None:
            self.on_worker_started()  # a class may break, or mend, in every worker
        try:  # what a clean-up leaves it (_left_behind): what the worker's start made there
            slot.base_bytes = await asyncio.to_thread(
                disk_used, slot.workdir, stop_after=CLEAN_MAX_BYTES << 4
            )
        except OSError:
            slot.base_bytes = 0
        extra: dict[str, object] = {"slot": slot.index, "seconds": round(seconds, 3)}
        if for_class is not None:
            extra["for_class"] = for_class
        log.info("worker.started", extra=extra)

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
            if isinstance(outcome, WorkerGone):
                log.error("worker.start_failed", extra={"slot": slot.index, "reason": outcome})
            elif isinstance(outcome, BaseException):
                raise outcome
            self._idle.put_nowait(slot)

    @property
    def workers_ready(self) -> int:
        """Slots whose worker is up and has reported ready (0 before warm_up): fewer than
        the slots while the daemon starts them (seconds on a GPU node, whose workers start
        CUDA) or replaces one."""
        return sum(1 for slot in self._slots if slot.alive and slot.ready)

    def broken_everywhere(self) -> dict[str, str]:
        """Workload classes that every started worker reported broken (a runtime that
        failed to build, or its self-check: CUDA that does not load on a GPU slot), with
        one worker's reason; empty before warm_up or with no worker started. A slot whose
        worker is starting counts with what its last worker reported: else a class broken
        on every other slot would look broken everywhere while the one good slot restarts."""
        started = [slot for slot in self._slots if slot.ready or slot.reported]
        if not started:
            return {}
        common = set(started[0].broken)
        for slot in started[1:]:
            common &= set(slot.broken)
        return {name: started[0].broken[name] for name in sorted(common)}

    def recheck(self) -> bool:
        """Replace one idle worker with a fresh one that runs every class's self-check, so
        that a class every worker found broken (a card that fell off the bus) is judged
        again (on_worker_started) where no task would start a worker: a node whose classes
        are all withdrawn gets none. Whether a worker was replaced (none idle: no)."""
        if self._idle is None or self._idle.empty():
            return False
        slot = self._idle.get_nowait()
        slot.kill("replaced: its classes' self-checks run again")
        task = asyncio.create_task(
            self._replace(slot), context=logs.context_without("task_id", "job_id")
        )
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)
        return True

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
            slot.kill_leftovers()  # of a worker that exited by itself, not yet handled
            slot.close_shared()
            if slot.drain is not None:
                slot.drain.cancel()
        if self._root is not None:
            # remove_tree, not rmtree: a tree the last task made read-only goes too (the
            # clean-up that would have emptied it, _replace, was just cancelled).
            for path in [s.workdir for s in self._slots] + ([self._root] if self._own_root else []):
                try:
                    remove_tree(path)
                except OSError as exc:  # the next start sweeps old roots; say what stays
                    log.warning("workdir.not_removed", extra={"path": str(path), "error": str(exc)})
        if self._root_lock is not None:
            os.close(self._root_lock)
            self._root_lock = None

    # --- tasks ------------------------------------------------------------------------------

    def admission(self, resources: Mapping[str, int], *, task_id: object = None) -> str:
        """Why a task that declares *resources* cannot run here, or "" when it can.

        Free memory is MemAvailable less what the tasks already admitted (``reserve``)
        declared and have not yet taken: a task still decrypting, fetching its inputs or
        starting its worker has allocated nothing, and several dispatched at once would
        otherwise each see the same free memory. *task_id*: a task admitted (and reserved)
        before, held as its worker starts to what the tasks reserved before it left."""
        ram_mb = int(resources.get("ram_mb", 0))
        vram_mb = int(resources.get("vram_mb", 0))
        per_slot = self.limits.memory_bytes >> 20
        if ram_mb > per_slot:
            return f"task needs {ram_mb} MB of RAM, over this node's {per_slot} MB per slot"
        if ram_mb > 0:  # a task that declares nothing is held by the slot's rlimit alone
            # A task admitted before is held to what is free now less what was promised
            # before it, not to the promises made after it (its own admission left room
            # for it, so theirs did not count it).
            promised = self._promised_bytes(before=None if task_id is None else str(task_id))
            free = max(0, sandbox.available_memory_bytes() - promised) >> 20
            if ram_mb > free:
                held = (
                    f" ({promised >> 20} MB more is promised to running tasks)" if promised else ""
                )
                return f"task needs {ram_mb} MB of RAM, only {free} MB is free{held}"
        if vram_mb > 0:
            if not self.config.gpus:
                return f"task needs {vram_mb} MB of GPU memory, this node has no GPU"
            # The card's exact size as NVML reports it, not the manifest's rounded vram_gb:
            # a slot may get any card, so the smallest counts.
            least = min(gpu.vram_bytes for gpu in self.config.gpus)
            if vram_mb << 20 > least:
                return f"task needs {vram_mb} MB of GPU memory, a slot's GPU has {least >> 20} MB"
        return ""

    def reserve(self, task_id: object, resources: Mapping[str, int]) -> None:
        """Count the RAM an admitted task declared against the tasks admitted after it,
        until ``release``; what its worker has taken since it started is not counted
        twice (MemAvailable already holds it)."""
        ram = int(resources.get("ram_mb", 0)) << 20
        if ram > 0:
            self._reserved[str(task_id)] = ram

    def release(self, task_id: object) -> None:
        """The task is over, whether it ran or not: what it reserved, and a renewal kept
        for a run that never started (a failed decryption or input fetch), go."""
        self._reserved.pop(str(task_id), None)
        self._extended.pop(str(task_id), None)

    def _promised_bytes(self, *, before: str | None = None) -> int:
        """What the reserved tasks declared and have not yet taken: all of it for a task
        not yet on a worker; for one running, its declaration less the growth of its
        worker's process tree since the task began (all of it when that cannot be read).
        With *before* (a reserved task): only the tasks reserved before it."""
        total = 0
        for key, declared in self._reserved.items():  # in the order they were reserved
            if key == before:
                break
            taken = 0
            slot = self._running.get(key)
            if slot is not None and slot.proc is not None and slot.task_rss is not None:
                now = sandbox.process_tree_rss_bytes(slot.proc.pid)
                taken = 0 if now is None else max(0, now - slot.task_rss)
            total += max(0, declared - taken)
        return total

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
        self._ends[key] = max(deadline, self._ends.get(key, deadline))
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
        metadata: Mapping[str, str] | None = None,
    ) -> bytes:
        """Run one task in a worker; raise TaskFailed with a reason on any failure.

        *deadline* is a value of the executor's clock (:attr:`clock`; it agrees with
        ``time.monotonic`` until the system is first suspended). *job_id* is the
        dispatch's: a worker that ran a task of a job (other than an inference) takes no
        task of another job, and without it none at all (see
        :func:`~nodeclient.node.slots.affinity_of`). *metadata* is the payload's container
        metadata when the caller has read it (``inputs.task_metadata``): the header is then
        not parsed again, here on the event loop.
        """
        if len(payload) > self.config.max_payload_bytes:
            raise TaskFailed(
                f"payload of {len(payload)} bytes is over {self.config.max_payload_bytes}",
                requester_fault=True,
            )
        refusal = self.admission(resources or {}, task_id=task_id)
        if refusal:
            raise TaskFailed(refusal, requester_fault=True)
        await self.warm_up()
        assert self._idle is not None
        key = str(task_id) if task_id is not None else f"anonymous-{next(self._anon)}"
        affinity = _affinity(workload_class, payload, metadata, job_id=job_id, key=key)
        slot = await self._slot_for(key, deadline, affinity, workload_class=workload_class)
        try:
            if slot.alive and slot.affinity not in (None, affinity):
                await self._retire(slot, "replaced: it ran another requester's task")
            elif slot.alive and slot.checked_for not in (None, workload_class):
                # Started for a task of another class (of the same job, were a job ever of
                # two classes), it skipped this class's start-up check.
                await self._retire(slot, "replaced: it was started for another class")
            if not slot.alive:
                try:
                    await self._start(slot, for_class=workload_class)
                except WorkerGone as exc:
                    raise TaskFailed(exc.reason, requester_fault=False) from None
                except BaseException:  # cancelled half-way: a worker not known to be ready
                    slot.kill("start interrupted")
                    raise
            self._running[key] = slot
            slot.affinity = affinity  # from now on, what the worker may have seen
            if key in self._reserved and slot.proc is not None:  # what it takes: admission
                slot.task_rss = sandbox.process_tree_rss_bytes(slot.proc.pid)
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
            self._ends.pop(key, None)
            slot.busy = False
            slot.task_rss = None
            self._release(slot)

    async def _slot_for(
        self, key: str, deadline: float | None, affinity: Affinity, *, workload_class: str = ""
    ) -> Slot:
        """A free slot for a task of *affinity* and *workload_class* (see _best_of_idle).
        Where the free ones would need a worker started first while one that may take the
        task as it is finishes its clean-up (its last task answered a moment ago), that one
        is waited for, a while at most. Where every free one's worker reported the class
        broken, one that did not is waited for (_unbroken_slot)."""
        slot = self._best_of_idle(await self._free_slot(key, deadline), affinity, workload_class)
        if workload_class in slot.broken:
            return await self._unbroken_slot(slot, key, deadline, affinity, workload_class)
        if fit_slot(slot, affinity) < FIT_START:
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
        return self._best_of_idle(await self._free_slot(key, deadline), affinity, workload_class)

    async def _unbroken_slot(
        self, slot: Slot, key: str, deadline: float | None, affinity: Affinity, workload_class: str
    ) -> Slot:
        """*slot*, whose worker reported *workload_class* broken (CUDA that did not start
        on its card), is the best free one: wait, _SETTLE_WAIT at most (and never past the
        deadline), for a slot whose worker did not, busy with a short task, cleaning up
        or starting a worker; then take it, else *slot*, where the task fails as the
        node's failure and its worker is started again (which tries CUDA again)."""
        assert self._idle is not None
        if all(workload_class in s.broken for s in self._slots):
            return slot  # nothing to wait for: the class is broken on every slot
        # Counted in polls, not read on the executor's clock alone, which may stand still
        # (an injected one) or jump (a suspend): the wait stays bounded either way.
        for _ in range(round(_SETTLE_WAIT / _UNBROKEN_POLL_S)):
            if deadline is not None and self._clock() >= deadline:
                break
            self._idle.put_nowait(slot)  # free for other classes' tasks meanwhile
            await asyncio.sleep(_UNBROKEN_POLL_S)
            slot = self._best_of_idle(
                await self._free_slot(key, deadline), affinity, workload_class
            )
            if workload_class not in slot.broken:
                return slot
        return slot

    def _best_of_idle(self, first: Slot, affinity: Affinity, workload_class: str = "") -> Slot:
        """Of *first* and every other idle slot, the one best for a task of *affinity*:
        a worker that may take it as it is, then a fresh worker, then a slot without a
        worker, and last one whose worker must be replaced first. A slot whose worker
        reported *workload_class* broken (CUDA that did not start on its card) comes after
        all of them: its task would fail there, as the node's failure, while another slot
        could run it. The others stay idle."""
        assert self._idle is not None
        idle = [first]
        while not self._idle.empty():
            idle.append(self._idle.get_nowait())
        best = min(idle, key=lambda slot: (workload_class in slot.broken, fit_slot(slot, affinity)))
        for slot in idle:
            if slot is not best:
                self._idle.put_nowait(slot)
        return best

    async def _retire(self, slot: Slot, reason: str) -> None:
        """Kill a reusable worker that may not take the next task, and wait for its end."""
        slot.kill(reason)
        if await slot.reap() is None:
            assert slot.proc is not None
            log.error("worker.did_not_exit", extra={"slot": slot.index, "pid": slot.proc.pid})

    async def _free_slot(self, key: str, deadline: float | None) -> Slot:
        """An idle slot, waited for at most until the task's deadline (all slots may be
        restarting a worker), read again on the executor's clock every DEADLINE_CHECK_S."""
        assert self._idle is not None
        if deadline is None:
            return await self._idle.get()
        while True:
            deadline = max(deadline, self._extended.get(key, deadline))  # a renewed lease
            left = deadline - self._clock()
            try:
                async with asyncio.timeout(max(0.0, min(left, DEADLINE_CHECK_S))):
                    return await self._idle.get()
            except TimeoutError:
                if self._extended.get(key, deadline) > deadline or self._clock() < deadline:
                    continue  # renewed while it waited, or not yet: wait on to the end
                raise TaskFailed(
                    "deadline exceeded while waiting for a free worker", requester_fault=False
                ) from None

    async def _run_on(
        self,
        slot: Slot,
        key: str,
        workload_class: str,
        payload: bytes,
        *,
        deadline: float | None,
        resources: Mapping[str, int] | None,
        on_progress: OnProgress | None,
    ) -> bytes:
        progress = _ProgressRelay(self._clock, self._progress, key, on_progress)
        gate = progress.gate

        ram_mb = int((resources or {}).get("ram_mb", 0))
        header: dict[str, Any] = {"op": "run", "class": workload_class}
        header["memory_bytes"] = (ram_mb << 20) or None
        extended = self._extended.pop(key, None)
        if extended is not None and deadline is not None:
            deadline = max(deadline, extended)
        started = self._clock()
        timeout = None if deadline is None else deadline - started
        if timeout is not None and timeout <= 0:
            raise TaskFailed("deadline exceeded before the task started", requester_fault=False)
        slot.busy = True
        try:
            async with asyncio.timeout(timeout) as timer:  # no extra task, unlike wait_for
                self._deadlines[key] = timer
                unwatch = self._watch(slot, key, deadline)
                try:
                    frame = await slot.execute(header, payload, progress)
                finally:
                    self._deadlines.pop(key, None)
                    unwatch()
                    progress.close()  # the task is over: no report of it goes out
                    if gate.dropped:
                        log.info(
                            "task.progress_dropped",
                            extra={"slot": slot.index, "dropped": gate.dropped},
                        )
        except TimeoutError:
            slot.kill("deadline")
            raise TaskFailed(
                f"deadline exceeded: killed after {self._clock() - started:.1f} s",
                requester_fault=False,
            ) from None
        except asyncio.CancelledError:
            slot.kill("cancelled")
            raise
        except WorkerGone as exc:
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

    def _watch(self, slot: Slot, key: str, deadline: float | None) -> Callable[[], None]:
        """Watch the task running on *slot* (its deadline timer set): its work directory's
        size once it has run DISK_CHECK_S (a timer, not a task, for the many that end
        sooner), and its deadline on the executor's clock (_recheck). The function returned
        stops both."""
        loop = asyncio.get_running_loop()
        watch: list[asyncio.Task[None]] = []
        armed = loop.call_later(
            DISK_CHECK_S, lambda: watch.append(asyncio.create_task(self._watch_disk(slot)))
        )
        recheck: list[asyncio.TimerHandle] = []
        if deadline is not None:
            self._ends[key] = deadline
            recheck.append(loop.call_later(DEADLINE_CHECK_S, self._recheck, key, recheck))

        def stop() -> None:
            armed.cancel()
            for handle in recheck:
                handle.cancel()
            for task in watch:
                task.cancel()

        return stop

    def _recheck(self, key: str, handles: list[asyncio.TimerHandle]) -> None:
        """Expire a running task's deadline timer once the executor's clock has passed the
        task's deadline, else look again in DEADLINE_CHECK_S: after a suspend the timer,
        on the event loop's clock, would strike only as long after the deadline as the
        system slept (and the coordinator has given the task to another node by then)."""
        timer, end = self._deadlines.get(key), self._ends.get(key)
        if timer is None or end is None or timer.expired():
            return
        loop = asyncio.get_running_loop()
        if self._clock() < end:
            handles[:] = [loop.call_later(DEADLINE_CHECK_S, self._recheck, key, handles)]
            return
        with contextlib.suppress(RuntimeError):  # expiring in this very turn of the loop
            timer.reschedule(loop.time())

    async def _watch_disk(self, slot: Slot) -> None:
        """Kill the slot's worker once its directory holds more than max_work_bytes on disk
        (RLIMIT_FSIZE bounds one file, not how many) or more than max_work_entries files
        and directories (empty ones take inodes, not bytes), or cannot be measured."""
        limit, most = self.config.max_work_bytes, self.config.max_work_entries
        while slot.killed is None:
            try:
                used = await asyncio.to_thread(
                    disk_used, slot.workdir, stop_after=limit, max_entries=most
                )
            except TooManyEntries:
                slot.kill(
                    f"entry limit exceeded: more than {most} files and directories in its "
                    "work directory"
                )
                return
            except OSError as exc:
                slot.kill(f"disk limit: its work directory could not be measured ({exc.strerror})")
                return
            if used > limit:
                slot.kill(f"disk limit exceeded: more than {limit} bytes in its work directory")
                return
            await asyncio.sleep(DISK_CHECK_S)

    def _release(self, slot: Slot) -> None:
        assert self._idle is not None
        if slot.in_flight:  # its task may still run: the worker must go, whatever happened
            slot.kill("task still running when its slot was released")
        if slot.alive and not is_reusable(slot.affinity):  # replaced now, not when next needed
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

    def _left_behind(self, slot: Slot) -> str | None:
        """What the slot's last task left behind that its worker's clean-up report denied,
        as seen from outside, or None. The report comes from the process that ran the task,
        which the task could have changed (its own threads and memory are not checked
        here; they are the worker's, and go when it does): processes still running (in
        bubblewrap, the sandbox's init and the worker are the only ones there are) and
        bytes in the work directory, which would wait for whichever task comes next."""
        expected = 2 if self.mode == MODE_BWRAP else 0
        assert slot.proc is not None
        try:
            running = len(descendants(slot.proc.pid)) - expected
            used = disk_used(
                slot.workdir,
                stop_after=slot.base_bytes + CLEAN_MAX_BYTES,
                max_entries=CLEAN_MAX_ENTRIES,  # and the walk, on the event loop, short
            )
        except TooManyEntries:
            return f"its task left over {CLEAN_MAX_ENTRIES} files in its work directory"
        except OSError as exc:
            return f"its clean-up could not be checked: {exc}"[:300]
        if running > 0:
            return f"its task left {running} process(es) running past its clean-up report"
        if used > slot.base_bytes + CLEAN_MAX_BYTES:
            return f"its task left over {CLEAN_MAX_BYTES} bytes in its work directory"
        return None

    async def _settle(self, slot: Slot) -> None:
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
            elif (doubt := self._left_behind(slot)) is not None:  # ~40 us: no thread hop
                slot.kill(doubt)
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

    async def _replace(self, slot: Slot) -> None:
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
        except WorkerGone as exc:  # the next task on this slot retries and reports it
            log.error("worker.restart_failed", extra={"slot": slot.index, "reason": exc.reason})
        except Exception:  # a bug: the slot must not be lost with it
            log.exception("worker.restart_failed", extra={"slot": slot.index})
        finally:
            assert self._idle is not None
            self._idle.put_nowait(slot)


def _affinity(
    workload_class: str,
    payload: bytes,
    metadata: Mapping[str, str] | None,
    *,
    job_id: object,
    key: str,
) -> Affinity:
    """:func:`~nodeclient.node.slots.affinity_of`, taken from *metadata* (the payload's,
    already read) rather than from the payload's header, for an inference."""
    from nodeclient.workloads import inference  # imported here: numpy, which the CLI avoids

    if metadata is not None and workload_class == inference.CLASS:
        sha256 = metadata.get(inference.META_MODEL_SHA256)
        if isinstance(sha256, str) and SHA256_HEX.fullmatch(sha256):
            return (workload_class, sha256)
        payload = b""  # no header, as far as affinity_of can tell: a worker for this task only
    return affinity_of(workload_class, payload, job_id=job_id, key=key)


class _ProgressRelay:
    """A task's progress reports, as its worker sends them: the latest goes into *board*
    at once (what status shows: a local write, whatever the rate), and on to
    *on_progress* (the coordinator) through a :class:`_ProgressGate`. The last report the
    gate held back within an interval is sent when that interval ends, if none came
    after it: a frame saved just after another is shown, not the one before it until the
    next (which may be many minutes away)."""

    def __init__(
        self,
        clock: Callable[[], float],
        board: dict[str, dict[str, Any]],
        key: str,
        on_progress: OnProgress | None,
    ) -> None:
        self.gate = _ProgressGate(clock)
        self._board, self._key, self._send = board, key, on_progress
        self._held: tuple[float, float, str] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def __call__(self, done: float, total: float, note: str) -> None:
        self._board[self._key] = {"done": done, "total": total, "note": note}
        if self.gate.admit(done, total):
            self._held = None
            if self._send is not None:
                self._send(done, total, note)
        elif done < total:  # held back, not lost: sent once the interval has passed
            self._held = (done, total, note)
            if self._timer is None:
                loop = asyncio.get_running_loop()
                self._timer = loop.call_later(self.gate.due_in(), self._send_held)

    def _send_held(self) -> None:
        self._timer = None
        held, self._held = self._held, None
        if held is not None and self.gate.admit(held[0], held[1]):
            self.gate.dropped -= 1  # counted when it was held back: sent after all
            if self._send is not None:
                self._send(*held)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _ProgressGate:
    """Which of a task's progress reports go on to the daemon (and the coordinator): one
    every PROGRESS_INTERVAL_S at most, and one at most that says the task is done. (The
    last one held back within an interval goes when it ends: Executor._run_on.)

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

    def due_in(self) -> float:
        """Seconds until a report would be admitted again."""
        if self._last is None:
            return 0.0
        return max(0.0, PROGRESS_INTERVAL_S - (self._clock() - self._last))
