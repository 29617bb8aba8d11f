"""The executor: persistent sandboxed workers, their pipe protocol and failure reasons (2.3.5)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import json
import logging
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import psutil
import pytest

from nodeclient.errors import RemoteProtocolError
from nodeclient.node import exec_workdirs, sandbox, slots, worker
from nodeclient.node import executor as executor_module
from nodeclient.node.executor import Executor, TaskFailed, WorkerConfig
from nodeclient.node.runtimes.onnx import OnnxRuntime
from nodeclient.workloads.inference import make_request
from tests.models import matmul_relu_model
from tests.node import sandbox_harness
from tests.node.sandbox_harness import (
    HOSTILE,
    HOSTILE_JOB,
    INFERENCE,
    Node,
    make_executor,
    warm_node,
)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    yield from warm_node(tmp_path_factory)


# --- the pipe protocol -------------------------------------------------------------------------


def test_frame_round_trip() -> None:
    """A frame read back gives the same header and the body bytes untouched."""
    body = bytes(range(256)) * 3
    stream = io.BytesIO(worker.encode_frame({"op": "run", "id": 7}, body))
    frame = worker.read_frame(stream, max_body=len(body))
    assert frame == worker.Frame({"op": "run", "id": 7}, body)
    assert worker.read_frame(stream, max_body=1) is None  # clean EOF


def test_oversized_body_is_refused_before_reading() -> None:
    """The length prefix is checked against the limit before the body is read."""
    stream = io.BytesIO(worker.encode_frame({"op": "result"}, b"x" * 100))
    with pytest.raises(RemoteProtocolError):
        worker.read_frame(stream, max_body=99)


def test_truncated_frame_is_an_error() -> None:
    """A frame cut short is a protocol error, not a silent EOF."""
    raw = worker.encode_frame({"op": "result"}, b"abcdef")
    with pytest.raises(RemoteProtocolError):
        worker.read_frame(io.BytesIO(raw[:-2]), max_body=100)


def test_header_must_name_an_op() -> None:
    """Headers are JSON objects with an 'op'."""
    with pytest.raises(RemoteProtocolError):
        worker.parse_header(b'{"id": 1}')


def test_a_deeply_nested_header_is_a_protocol_error() -> None:
    """A header of 60,000 opening brackets is refused before the parser recurses into
    it; brackets inside a string (an error reason quoting an array) do not count."""
    with pytest.raises(RemoteProtocolError, match="nested deeper"):
        worker.parse_header(b"[" * 60000)
    with pytest.raises(RemoteProtocolError):
        worker.parse_header(b'{"op": "x", "a": ' + b"[" * 20 + b"]" * 20 + b"}")
    reason = "execution failed: " + '[[0. 1.] [2. 3.]] \\"[' * 20
    assert worker.parse_header(json.dumps({"op": "error", "reason": reason}).encode()) == {
        "op": "error",
        "reason": reason,
    }


def test_a_progress_number_too_large_for_a_float_is_a_protocol_error() -> None:
    """``done`` of 10**400 is a valid JSON number that no float holds."""
    with pytest.raises(RemoteProtocolError, match="bad progress frame"):
        slots._progress({"op": "progress", "done": 10**400, "total": 1})


def test_worker_answers_first_and_reports_its_clean_up_after(tmp_path: Path) -> None:
    """The result frame is written before the task directory is emptied; a clean frame
    follows once it is. The worker runs in a child of this process, as a worker is its
    own process: its check for processes a task left running counts every child of the
    process it runs in, and this one has others (the workers of other tests' executors),
    and every other process in its process group: the child takes a group of its own, as
    a worker has."""
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.setpgid(0, 0)
            _answers_first_then_cleans(tmp_path)
            status = 0
        except BaseException:  # the child reports any failure by its status
            traceback.print_exc()
        finally:
            os._exit(status)
    end = time.monotonic() + 60  # a child that hangs is killed, not left behind
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < end:
        time.sleep(0.01)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        done = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(done[1]) == 0  # its traceback, if any, is above


def _answers_first_then_cleans(tmp_path: Path) -> None:
    config = {
        "workdir": str(tmp_path),
        "sandboxed": False,
        "max_result_bytes": 1 << 20,
        "cache_dir": str(tmp_path / "cache"),
        "runtimes": {"test.hostile": "tests.node.hostile_runtime:factory"},
    }
    read_fd, write_fd = os.pipe()
    w = worker.Worker(config, out_fd=write_fd)
    seen_at_answer: list[list[str]] = []
    real_write = worker.write_frame

    def spying_write(fd: int, header: dict, body: bytes = b"", shared: object = None) -> None:
        seen_at_answer.append(sorted(os.listdir(w.task_dir)))
        real_write(fd, header, body, shared)  # type: ignore[arg-type]

    order = json.dumps({"do": "write", "path": "leftover.txt"}).encode()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(worker, "write_frame", spying_write)
        mp.chdir(tmp_path)  # the worker changes directory per task; the context restores it
        assert w.run_task({"id": 1, "class": "test.hostile"}, order) is True
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as stream:
        answer = worker.read_frame(stream, max_body=1 << 20)
        clean = worker.read_frame(stream, max_body=0)
        assert worker.read_frame(stream, max_body=0) is None
    assert answer is not None and clean is not None
    assert answer.header == {"op": "result", "id": 1, "restart": False}
    assert clean.header == {"op": "clean", "id": 1, "restart": False}
    assert seen_at_answer == [["leftover.txt"], []]  # answered before the clean-up


# --- bodies in shared memory ------------------------------------------------------------------


@pytest.fixture
def shared_pair() -> Iterator[tuple[worker.SharedBodies, worker.SharedBodies, int]]:
    """The daemon's and the worker's view of one sealed region of 2 x 4 KiB."""
    fd = worker.SharedBodies.create_fd(4096)
    daemon = worker.SharedBodies(fd, 4096, daemon_side=True)
    inside = worker.SharedBodies(fd, 4096, daemon_side=False)
    try:
        yield daemon, inside, fd
    finally:
        daemon.close()
        inside.close()
        os.close(fd)


def test_shared_bodies_cross_in_both_directions(shared_pair: tuple) -> None:
    """A payload goes down and a result comes up through the region, not the pipe; a
    body over the region's size, and an empty one, stay in the pipe."""
    daemon, inside, _ = shared_pair
    down = io.BytesIO()
    read_fd, write_fd = os.pipe()
    try:
        header, body = daemon.put({"op": "run", "id": 1}, b"payload" * 100)
        assert header == {"op": "run", "id": 1, "shm": 700} and body == b""
        down.write(worker.encode_frame(header, body))
        down.seek(0)
        frame = worker.read_frame(down, max_body=1 << 20, shared=inside)
        assert frame == worker.Frame({"op": "run", "id": 1, "shm": 700}, b"payload" * 100)

        worker.write_frame(write_fd, {"op": "result", "id": 1}, b"result" * 10, inside)
        worker.write_frame(write_fd, {"op": "result", "id": 2}, b"r" * 4097, inside)
        worker.write_frame(write_fd, {"op": "clean", "id": 2}, b"", inside)
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as up:
            raw = up.read()
    finally:
        with contextlib.suppress(OSError):
            os.close(write_fd)
    assert len(raw) < 4097 + 200  # only the large body crossed the pipe
    stream = io.BytesIO(raw)
    first = worker.read_frame(stream, max_body=1 << 20, shared=daemon)
    assert first == worker.Frame({"op": "result", "id": 1, "shm": 60}, b"result" * 10)
    second = worker.read_frame(stream, max_body=1 << 20, shared=daemon)
    assert second == worker.Frame({"op": "result", "id": 2}, b"r" * 4097)
    third = worker.read_frame(stream, max_body=1 << 20, shared=daemon)
    assert third == worker.Frame({"op": "clean", "id": 2}, b"")


def test_a_body_read_from_shared_memory_is_a_copy(shared_pair: tuple) -> None:
    """What the writer puts there afterwards does not change a body already read."""
    daemon, inside, _ = shared_pair
    inside.put({"op": "result"}, b"A" * 64)
    got = daemon.take(64)
    inside.put({"op": "result"}, b"B" * 64)
    assert got == b"A" * 64


def test_the_shared_region_cannot_be_resized(shared_pair: tuple) -> None:
    """Sealed: a worker that shrank the region would make the daemon's next read a SIGBUS."""
    _, _, fd = shared_pair
    for size in (0, 4096, 1 << 20):
        with pytest.raises(PermissionError):
            os.ftruncate(fd, size)
    assert os.fstat(fd).st_size == 2 * 4096


@pytest.mark.parametrize(
    ("value", "body"),
    [
        (0, b""),
        (-1, b""),
        (4097, b""),
        ("12", b""),
        (True, b""),
        (1.0, b""),
        (None, b""),
        (8, b"x"),
    ],
)
def test_bad_shared_lengths_are_protocol_errors(
    shared_pair: tuple, value: object, body: bytes
) -> None:
    """Out of the region, not an integer, or a body in the pipe as well: refused."""
    daemon, _, _ = shared_pair
    raw = worker.encode_frame({"op": "result", "id": 1, "shm": value}, body)
    with pytest.raises(RemoteProtocolError, match="bad shared body"):
        worker.read_frame(io.BytesIO(raw), max_body=1 << 20, shared=daemon)


def test_a_shared_body_without_a_region_is_refused() -> None:
    """A peer may not name shared memory that was never set up."""
    raw = worker.encode_frame({"op": "result", "id": 1, "shm": 8})
    with pytest.raises(RemoteProtocolError, match="bad shared body"):
        worker.read_frame(io.BytesIO(raw), max_body=1 << 20)


def test_a_shared_body_over_the_frame_limit_is_refused(shared_pair: tuple) -> None:
    """The reader's own body limit holds for a body in shared memory too."""
    daemon, _, _ = shared_pair
    raw = worker.encode_frame({"op": "result", "id": 1, "shm": 100})
    with pytest.raises(RemoteProtocolError, match="bad shared body"):
        worker.read_frame(io.BytesIO(raw), max_body=99, shared=daemon)


def test_executor_moves_bodies_through_shared_memory(node: Node) -> None:
    """Through the real sandboxed worker: payload and result are in the slot's region, and a
    task inside cannot resize it (the daemon's next read would be a SIGBUS)."""
    order = {"do": "echo", "data": "through shared memory"}
    assert node.hostile(order) == b"through shared memory"
    (slot,) = node.executor._slots
    assert slot.shared is not None
    payload = json.dumps(order).encode()
    assert slot.shared.map[: len(payload)] == payload
    assert slot.shared.take(21) == b"through shared memory"
    attempts = json.loads(node.hostile({"do": "resize_memfds"}))
    assert attempts and "resized" not in attempts.values()
    assert {attempts[k] for k in attempts if k.endswith(":0")} == {"EPERM"}  # sealed
    assert slot.shared.map.size() == 2 * slot.shared.size
    assert node.hostile(order) == b"through shared memory"  # and the next task is served


@pytest.mark.parametrize("how", ["single-use", "kept for its job", "crashed"])
def test_unsandboxed_a_process_left_behind_ends_with_its_worker(tmp_path: Path, how: str) -> None:
    """Without the sandbox no PID namespace dies with the worker: a process its task left
    in the worker's group ran on after the worker was replaced, past the task's deadline
    and the executor's close. It is ended with the worker: a single-use worker (no job)
    killed with its group; one kept for its job's next task, which reports itself tainted
    and exits; one that crashed under its task (the last two exit by themselves, and
    their group is killed as their exit is handled)."""
    executor = make_executor(tmp_path / "home", mode="unsandboxed")
    pid_file = tmp_path / "child.pid"
    job = None if how == "single-use" else "job-1"

    async def scenario() -> int:
        try:
            await executor.warm_up()
            order = {"do": "leave_child", "close_fds": True, "pid_file": str(pid_file)}
            if how == "crashed":
                with pytest.raises(TaskFailed, match="crashed"):
                    await executor.run(
                        HOSTILE, json.dumps({**order, "then_crash": True}).encode(), job_id=job
                    )
            else:
                said = json.loads(
                    await executor.run(HOSTILE, json.dumps(order).encode(), job_id=job)
                )
                assert said == "left a child"
            echo = json.dumps({"do": "echo", "data": "x"}).encode()
            assert await executor.run(HOSTILE, echo, job_id=job) == b"x"
            return int(pid_file.read_text())
        finally:
            await executor.aclose()

    child = asyncio.run(scenario())
    end = time.monotonic() + 5
    while psutil.pid_exists(child) and psutil.Process(child).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < end, "the task's child still runs"
        time.sleep(0.05)


def test_unsandboxed_a_child_left_behind_a_report_of_clean_ends_the_worker(
    tmp_path: Path,
) -> None:
    """Unsandboxed too, the clean-up report is the task's process's to change: a task that
    makes it say clean and leaves a child running is seen from outside (a process under
    the worker), and the worker is replaced at once, its child with it."""
    executor = make_executor(tmp_path / "home", mode="unsandboxed")

    async def scenario() -> tuple[int, int]:
        try:
            await executor.warm_up()
            lie = json.dumps({"do": "lie_clean", "child": True}).encode()
            assert await executor.run(HOSTILE, lie, job_id="job-1") == b'"lied"'
            (slot,) = executor._slots
            assert slot.proc is not None
            worker = slot.proc.pid
            echo = json.dumps({"do": "echo", "data": "x"}).encode()
            assert await executor.run(HOSTILE, echo, job_id="job-1") == b"x"
            assert slot.proc.pid != worker
            return worker, len(slots.descendants(slot.proc.pid))
        finally:
            await executor.aclose()

    replaced, left = asyncio.run(scenario())
    assert left == 0 and not psutil.pid_exists(replaced)


def test_what_a_clean_up_may_leave_is_counted_above_what_the_workers_start_left(
    tmp_path: Path,
) -> None:
    """A worker's start may write to its slot's directory (a /tmp on disk, where bwrap
    cannot size a tmpfs, with what the runtimes' start put there): a clean-up is judged on
    what it leaves above that, up to CLEAN_MAX_BYTES, not on the directory's whole size,
    or every task of such a node would replace its worker. Past CLEAN_MAX_ENTRIES files
    (empty ones take no bytes) the walk, which runs on the event loop, stops there."""
    ex = make_executor(tmp_path / "home", mode="unsandboxed")
    workdir = tmp_path / "slot"
    (workdir / "tmp").mkdir(parents=True)
    (workdir / "tmp" / "written-at-start").write_bytes(b"s" * (2 << 20))
    worker = subprocess.Popen(["sleep", "30"])
    try:
        slot = slots.Slot(
            index=0, workdir=workdir, tmp_dir=workdir / "tmp", argv=[], env={},
            mode="unsandboxed", max_output=0, max_result=0, shared_bytes=0,
            proc=worker,  # type: ignore[arg-type]
        )  # fmt: skip
        slot.base_bytes = exec_workdirs.disk_used(workdir, stop_after=1 << 40)
        assert ex._left_behind(slot) is None
        (workdir / "tmp" / "left").write_bytes(b"l" * (executor_module.CLEAN_MAX_BYTES // 2))
        assert ex._left_behind(slot) is None
        (workdir / "tmp" / "more").write_bytes(b"m" * executor_module.CLEAN_MAX_BYTES)
        assert ex._left_behind(slot) == (
            f"its task left over {executor_module.CLEAN_MAX_BYTES} bytes in its work directory"
        )
        for name in ("left", "more"):
            (workdir / "tmp" / name).unlink()
        many = executor_module.CLEAN_MAX_ENTRIES
        for i in range(many):  # empty files: no bytes, but a walk of each, on the loop
            (workdir / "tmp" / f"e{i}").touch()
        assert ex._left_behind(slot) == f"its task left over {many} files in its work directory"
    finally:
        worker.kill()
        worker.wait()


def test_unsandboxed_a_grandchild_left_in_the_workers_group_taints_it(tmp_path: Path) -> None:
    """A task double-forks: its grandchild is no child of the worker's, so the worker
    found nothing left and was kept for the job's next task, the grandchild running on
    beside it. Anything left in the worker's process group taints it: it is replaced,
    and the grandchild ends with it, before the next task runs."""
    executor = make_executor(tmp_path / "home", mode="unsandboxed")
    pid_file = tmp_path / "grandchild.pid"

    async def scenario() -> tuple[int, bool]:
        try:
            await executor.warm_up()
            order = json.dumps({"do": "leave_grandchild", "pid_file": str(pid_file)}).encode()
            assert await executor.run(HOSTILE, order, job_id="job-1") == b'"left a grandchild"'
            echo = json.dumps({"do": "echo", "data": "x"}).encode()
            assert await executor.run(HOSTILE, echo, job_id="job-1") == b"x"
            grandchild = int(pid_file.read_text())
            gone = not psutil.pid_exists(grandchild) or (
                psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE
            )
            return grandchild, gone
        finally:
            await executor.aclose()

    grandchild, gone = asyncio.run(scenario())
    assert gone, f"the task's grandchild {grandchild} still runs beside the next task"


def test_bodies_over_the_shared_size_still_cross_the_pipe(tmp_path: Path) -> None:
    """With a tiny region, a large payload and result go through the pipe and arrive whole;
    with shared memory turned off, everything does."""
    data = "y" * 50_000
    payload = json.dumps({"do": "echo", "data": data}).encode()

    async def scenario(shared_bytes: int) -> tuple[bytes, bytes]:
        executor = make_executor(tmp_path / str(shared_bytes), shared_bytes=shared_bytes)
        try:
            small = await executor.run(HOSTILE, json.dumps({"do": "echo", "data": "s"}).encode())
            return small, await executor.run(HOSTILE, payload)
        finally:
            await executor.aclose()

    for shared_bytes in (1024, 0):
        assert asyncio.run(scenario(shared_bytes)) == (b"s", data.encode())


@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
def test_a_bwrap_found_only_on_the_daemons_path_starts_the_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, relative: bool
) -> None:
    """bubblewrap installed outside /usr/local/bin, /usr/bin and /bin (in /opt, say), found
    on the daemon's PATH: the sandbox probe says it works, so the workers must start with
    it too, though they are started with the sandbox's own PATH. (Before, every worker
    failed to start with "bwrap: not found" while status said the node was sandboxed.)"""
    real = shutil.which("bwrap")
    assert real is not None  # the README's set-up installs bubblewrap
    opt = tmp_path / "opt-bin"
    opt.mkdir()
    mark = tmp_path / "bwrap-used"
    wrapper = opt / "bwrap"
    wrapper.write_text(f'#!/bin/sh\necho "$$" >> {shlex.quote(str(mark))}\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    # A relative PATH entry too: the daemon's directory is not the workers'.
    monkeypatch.chdir(tmp_path)
    entry = opt.name if relative else str(opt)
    monkeypatch.setenv("PATH", f"{entry}{os.pathsep}{os.environ['PATH']}")
    assert sandbox.probe()[0]
    mark.unlink()  # the probe ran it; what follows is the workers' own

    async def scenario() -> bytes:
        executor = make_executor(tmp_path / "home")
        try:
            return await executor.run(HOSTILE, json.dumps({"do": "echo", "data": "x"}).encode())
        finally:
            await executor.aclose()

    assert asyncio.run(scenario()) == b"x"
    assert mark.exists()  # the worker's sandbox was the wrapper's


# --- exit statuses ---------------------------------------------------------------------------


def test_sigkill_reads_as_out_of_memory() -> None:
    """A SIGKILL nobody in the daemon sent is the kernel's OOM killer."""
    assert sandbox.describe_exit(128 + signal.SIGKILL, mode=sandbox.MODE_BWRAP).startswith(
        "out of memory"
    )
    assert sandbox.describe_exit(-signal.SIGKILL, mode=sandbox.MODE_UNSANDBOXED).startswith(
        "out of memory"
    )


def test_other_signals_read_as_crashes() -> None:
    """bwrap reports a signal as 128 + N; a plain subprocess as -N."""
    assert sandbox.describe_exit(139, mode=sandbox.MODE_BWRAP) == "crashed (signal 11, SIGSEGV)"
    assert sandbox.describe_exit(-6, mode=sandbox.MODE_UNSANDBOXED) == "crashed (signal 6, SIGABRT)"
    assert sandbox.describe_exit(139, mode=sandbox.MODE_UNSANDBOXED).startswith("crashed (worker")


# --- the sandbox command line -----------------------------------------------------------------


def _layout(tmp_path: Path, gpus: tuple[sandbox.SlotGpu, ...] = ()) -> sandbox.Layout:
    return sandbox.make_layout(workdir=tmp_path / "w", cache_dir=tmp_path / "c", gpus=gpus)


def test_command_line_isolates(tmp_path: Path) -> None:
    """No network, a cleared environment, dies with the daemon, work and cache at fixed paths."""
    layout = _layout(tmp_path)
    argv = sandbox.bwrap_argv(layout, ["true"], env={"PATH": "/usr/bin"}, as_root=False)
    for flag in ("--unshare-net", "--unshare-pid", "--clearenv", "--die-with-parent"):
        assert flag in argv
    assert argv[argv.index("--unshare-user") :][:3] == ["--unshare-user", "--uid", "65534"]
    assert ["--bind", str(tmp_path / "w"), str(sandbox.INSIDE_WORK)] == argv[
        argv.index(str(tmp_path / "w")) - 1 :
    ][:3]
    assert not any("nvidia" in a for a in argv)


def test_gpu_slot_is_named_in_cuda_visible_devices(tmp_path: Path) -> None:
    """A slot with a GPU sees CUDA_VISIBLE_DEVICES naming it by UUID (a number would count
    among the one card the sandbox shows), in PCI bus order; one without
    sees CUDA_VISIBLE_DEVICES empty (no card, unsandboxed too) and none of the others."""
    gpu = sandbox.SlotGpu(uuid="GPU-5771190f", minor=1, vram_bytes=85520809984)
    env = sandbox.worker_env(_layout(tmp_path, (gpu,)))
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-5771190f"
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    plain = sandbox.worker_env(_layout(tmp_path))
    assert plain["CUDA_VISIBLE_DEVICES"] == ""
    assert "CUDA_DEVICE_ORDER" not in plain


def test_a_worker_that_cannot_be_started_is_a_failed_task_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bwrap gone between the probe and a worker's start (the shell that starts it exits
    127 at once): the task fails as the node's, saying so, rather than an error escaping
    from the pipe set-up (ValueError on the closed pipe)."""
    monkeypatch.setattr(sandbox, "bwrap_path", lambda: str(tmp_path / "gone" / "bwrap"))

    async def scenario() -> TaskFailed:
        executor = make_executor(tmp_path / "home")
        try:
            with pytest.raises(TaskFailed) as got:
                await executor.run(HOSTILE, json.dumps({"do": "echo", "data": "x"}).encode())
            return got.value
        finally:
            await executor.aclose()

    failed = asyncio.run(scenario())
    assert failed.requester_fault is False
    assert failed.reason.startswith("worker failed to start (status 127)")


def test_a_worker_can_always_name_its_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """getpass.getuser() reads USER and LOGNAME before it looks the uid up. In the sandbox
    (no /etc/passwd) they name the sandbox's user; an unsandboxed worker runs as the
    daemon's user, named as the system names it, or uid<N> where it has no name (a
    container started with --user N), where the lookup would fail."""
    import pwd

    env = sandbox.worker_env(_layout(tmp_path))
    assert env["USER"] == env["LOGNAME"] == "nobody"

    def known(uid: int) -> pwd.struct_passwd:
        return pwd.struct_passwd(("operator", "x", uid, uid, "", "/home/operator", "/bin/sh"))

    monkeypatch.setattr(pwd, "getpwuid", known)
    plain = sandbox.worker_env(_layout(tmp_path), sandboxed=False)
    assert plain["USER"] == plain["LOGNAME"] == "operator"

    def unknown(uid: int) -> pwd.struct_passwd:
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", unknown)
    nameless = sandbox.worker_env(_layout(tmp_path), sandboxed=False)
    assert nameless["USER"] == nameless["LOGNAME"] == f"uid{os.getuid()}"


def test_root_keeps_only_the_capabilities_to_drop_to_nobody(tmp_path: Path) -> None:
    """Started by root, bwrap keeps CAP_SETUID/CAP_SETGID so the worker can drop to 65534,
    and nothing else: without --cap-drop ALL it kept every capability root has, so the
    worker's start (interpreter, imports) ran with CAP_SYS_ADMIN and the rest. Run for
    real: the first process inside has exactly those two in effect (as a user, in its
    own user namespace, it has none it did not get there)."""
    as_root = os.geteuid() == 0
    layout = _layout(tmp_path)
    layout.workdir.mkdir()
    layout.cache_dir.mkdir()
    argv = sandbox.bwrap_argv(
        layout, ["/usr/bin/grep", "^Cap", "/proc/self/status"], env={}, as_root=as_root
    )
    assert ("--unshare-user" in argv) is not as_root
    assert argv.count("--cap-add") == (2 if as_root else 0)
    shown = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout
    caps = {line.split(":")[0]: int(line.split()[1], 16) for line in shown.splitlines()}
    setuid_setgid = 1 << 6 | 1 << 7
    if as_root:
        assert caps["CapEff"] == caps["CapPrm"] == setuid_setgid
    else:  # mapped to 65534 in a user namespace of its own: none at all
        assert caps["CapEff"] == caps["CapPrm"] == 0


# --- running tasks ---------------------------------------------------------------------------


def _inference_payload(x: np.ndarray) -> bytes:
    return make_request(matmul_relu_model(), {"x": x}).encode()


def test_inference_matches_in_process_run(node: Node) -> None:
    """The sandboxed worker returns exactly the bytes OnnxRuntime.run gives in-process."""
    payload = _inference_payload(np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4))
    assert node.wait(node.executor.run(INFERENCE, payload)) == OnnxRuntime().run(payload)


def test_workers_stay_warm(node: Node) -> None:
    """Successful tasks reuse the same worker: no start-up per task."""
    node.inference_still_works()
    starts = len(node.executor.start_seconds)
    for _ in range(5):
        node.inference_still_works()
    assert len(node.executor.start_seconds) == starts


def test_requester_fault_keeps_the_worker(node: Node) -> None:
    """A bad payload is the requester's fault; the warm worker keeps serving (the model's
    next task: a worker serves inferences of one model)."""
    node.inference_still_works()
    starts = len(node.executor.start_seconds)
    bad = make_request(matmul_relu_model(), {"x": np.ones((2, 5), np.float32)}).encode()
    with pytest.raises(TaskFailed) as info:
        node.wait(node.executor.run(INFERENCE, bad))
    assert info.value.requester_fault
    assert "bad payload" in info.value.reason
    node.inference_still_works()
    assert len(node.executor.start_seconds) == starts


def test_unknown_class_is_a_requester_fault(node: Node) -> None:
    """A class no runtime serves fails with a reason that names it."""
    with pytest.raises(TaskFailed) as info:
        node.wait(node.executor.run("media.nonexistent", b"x"))
    assert info.value.requester_fault
    assert "media.nonexistent" in info.value.reason


def test_crash_restarts_the_worker(node: Node) -> None:
    """A worker killed by SIGSEGV fails its task as a crash; the next task runs in a new one."""
    node.hostile({"do": "echo"})  # the worker has run this job's tasks: it is not replaced
    starts = len(node.executor.start_seconds)
    with pytest.raises(TaskFailed) as info:
        node.hostile({"do": "crash"})
    assert info.value.reason == "crashed (signal 11, SIGSEGV)"
    node.inference_still_works()
    assert len(node.executor.start_seconds) == starts + 1


def test_the_next_workers_events_do_not_carry_the_ended_tasks_id(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker is replaced after its task crashed, in the background: the new worker's
    events (worker.started, ...) belong to no task, so they must not carry the id bound
    for the task that ended, or filtering the log by task_id misleads."""
    from nodeclient import logs

    formatted: list[dict[str, object]] = []

    class AsEmitted(logging.Handler):  # formatted where it is logged: its context bound
        def emit(self, record: logging.LogRecord) -> None:
            formatted.append(json.loads(logs.JsonFormatter().format(record)))

    node.hostile({"do": "echo"})
    handler = AsEmitted(level=logging.INFO)
    executor_log = logging.getLogger("nodeclient.node.executor")
    executor_log.addHandler(handler)
    try:
        with caplog.at_level(logging.INFO, logger="nodeclient.node.executor"):
            with logs.bind(task_id="TASK-A", job_id="JOB-A"), pytest.raises(TaskFailed):
                node.hostile({"do": "crash"}, task_id="TASK-A")
            node.inference_still_works()  # waits for the replacement worker
    finally:
        executor_log.removeHandler(handler)
    started = [e for e in formatted if e["event"] == "worker.started"]
    assert started, formatted
    assert all("task_id" not in e and "job_id" not in e for e in started), started
    died = [e for e in formatted if e["event"] == "worker.died"]
    assert died and died[0].get("task_id") == "TASK-A"  # the task's own events keep it


def test_deadline_kills_the_task(node: Node) -> None:
    """A task still running at its deadline is killed with reason "deadline"."""
    began = time.monotonic()
    with pytest.raises(TaskFailed) as info:
        node.hostile({"do": "sleep", "seconds": 60}, deadline=time.monotonic() + 0.5)
    assert info.value.reason.startswith("deadline exceeded")
    assert time.monotonic() - began < 10
    node.inference_still_works()


@pytest.mark.parametrize("done", ["x", None, "Infinity", pytest.param(10**400, id="10**400")])
def test_a_forged_progress_frame_kills_the_worker_not_the_next_task(
    node: Node, done: object
) -> None:
    """A task that writes a progress frame of garbage to the worker's pipe fails with a
    protocol reason, and its worker is replaced: it is not put back while still busy,
    where the next task would read the old task's frames."""
    node.hostile({"do": "echo"})
    starts = len(node.executor.start_seconds)
    with pytest.raises(TaskFailed) as info:
        node.hostile({"do": "forge_progress", "done": done})
    assert "broke the pipe protocol" in info.value.reason
    assert "bad progress frame" in info.value.reason
    node.inference_still_works()
    assert len(node.executor.start_seconds) == starts + 1


def test_a_header_too_deep_to_parse_kills_the_worker_not_the_next_task(node: Node) -> None:
    """A task writes a frame header of 60,000 opening brackets and runs on: it fails at
    once with a protocol reason, its worker is killed, and the next task gets a new one
    (before, the slot was freed with the task still running, without a deadline)."""
    node.hostile({"do": "echo"})  # the worker has run this kind of task: none is replaced
    starts = len(node.executor.start_seconds)
    began = time.monotonic()
    with pytest.raises(TaskFailed) as info:
        node.hostile({"do": "forge_header", "header": "[" * 60000, "seconds": 30})
    assert info.value.reason.startswith("worker broke the pipe protocol")
    assert time.monotonic() - began < 20
    assert node.hostile({"do": "echo", "data": "next"}) == b"next"
    assert len(node.executor.start_seconds) == starts + 1


def test_any_error_while_a_task_runs_kills_its_worker(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error nobody foresaw while a task's frames are read (here, one injected into
    the progress parser) fails the task and kills its worker, instead of escaping with
    the worker still running the task in a slot taken as free."""

    def unforeseen(header: object) -> tuple[float, float, str]:
        raise LookupError("unforeseen")

    node.hostile({"do": "echo"})
    starts = len(node.executor.start_seconds)
    monkeypatch.setattr(slots, "_progress", unforeseen)
    with pytest.raises(TaskFailed) as info:
        node.hostile({"do": "sleep", "seconds": 30})  # reports progress, then sleeps
    assert info.value.reason == "worker broke the pipe protocol: LookupError: unforeseen"
    monkeypatch.undo()
    assert node.hostile({"do": "echo", "data": "next"}) == b"next"
    assert len(node.executor.start_seconds) == starts + 1


def test_a_read_only_tree_left_by_a_task_does_not_end_its_slot(node: Node) -> None:
    """A task leaves a directory of mode 0555 with a file in it and one of mode 0000: the
    worker cannot empty its directory, so it is replaced, and the fresh worker's
    directory is emptied all the same (as root, or as the operator's own user)."""
    node.hostile({"do": "echo"})  # the slot's worker is this job's now, whatever ran before
    starts = len(node.executor.start_seconds)
    assert json.loads(node.hostile({"do": "readonly_tree"})) == "left a read-only tree"
    node.inference_still_works()
    assert len(node.executor.start_seconds) == starts + 1  # replaced, once
    assert json.loads(node.hostile({"do": "listdir", "path": "."})) == []
    node.inference_still_works()


def test_remove_tree_removes_what_a_task_made_read_only(tmp_path: Path) -> None:
    """The same, for the removal itself, where permissions hold: a root test process
    gives up the capabilities that let root ignore them."""
    script = """
import os, shutil, sys
from pathlib import Path
from nodeclient.node.exec_workdirs import remove_tree
root = Path(sys.argv[1]) / "slot"
(root / "ro").mkdir(parents=True)
(root / "ro" / "f").write_text("x")
os.chmod(root / "ro", 0o555)
(root / "none" / "deep").mkdir(parents=True)
(root / "none" / "deep" / "g").write_text("y")
os.chmod(root / "none", 0)
try:
    shutil.rmtree(root)
    sys.exit("a plain rmtree worked: permissions are not enforced here")
except PermissionError:
    pass
remove_tree(root)
print("gone" if not root.exists() else "left")
"""
    prefix = ["setpriv", "--bounding-set=-dac_override,-fowner,-dac_read_search"]
    command = [*(prefix if os.geteuid() == 0 else []), sys.executable, "-c", script]
    done = subprocess.run(
        [*command, str(tmp_path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "gone"


def test_a_run_cancelled_while_its_worker_starts_leaves_no_half_started_worker(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run that must restart a dead worker is cancelled while the worker starts: the
    half-started worker is killed, so the next task gets a fresh one instead of reading
    the old one's late ready frame as its answer."""
    executor = node.executor
    (slot,) = executor._slots
    node.inference_still_works()
    node.wait(_stop_idle_worker(executor, slot))
    starting = asyncio.Event()
    real_start = type(slot).start

    async def start(self: object, timeout: float, **kwargs: Any) -> float:
        starting.set()
        return await real_start(self, timeout, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(type(slot), "start", start)

    async def scenario() -> None:
        run = asyncio.create_task(executor.run(HOSTILE, b'{"do": "echo", "data": "late"}'))
        await asyncio.wait_for(starting.wait(), 30)
        await asyncio.sleep(0.05)  # inside the start: bubblewrap and Python take longer
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run

    node.wait(scenario())
    assert node.hostile({"do": "echo", "data": "next"}) == b"next"
    node.inference_still_works()


async def _stop_idle_worker(executor: object, slot: object) -> None:
    """Once the slot is idle (its clean-up report read, no restart under way), kill its
    worker: the next run has to start one."""
    while executor._idle.qsize() == 0:  # type: ignore[attr-defined]
        await asyncio.sleep(0.01)
    slot.kill("stopped by the test")  # type: ignore[attr-defined]
    await slot.proc.wait()  # type: ignore[attr-defined]


def test_an_extended_deadline_lets_the_task_finish(node: Node) -> None:
    """A lease renewed while its task runs: extend() moves the deadline later, and the task
    that would have been killed at the first one finishes; an earlier one changes nothing.
    A renewal that comes before the task reaches its worker applies when it starts.
    The first deadline leaves time for a worker to start on a loaded machine (the slot's
    last worker ran a single-use task, so one may be starting), or the task would fail
    before it ran, "deadline exceeded before the task started"."""
    sleep = json.dumps({"do": "sleep", "seconds": 2.5}).encode()

    async def scenario() -> tuple[bytes, bytes]:
        task = asyncio.ensure_future(
            node.executor.run(HOSTILE, sleep, task_id="renewed", deadline=time.monotonic() + 1.5)
        )
        while "renewed" not in node.executor._deadlines:
            await asyncio.sleep(0.01)
        assert node.executor.extend("renewed", time.monotonic() + 10)
        assert node.executor.extend("renewed", time.monotonic() + 0.1)  # earlier: kept at 10 s
        first = await task
        assert node.executor.extend("early", time.monotonic() + 10)  # before it starts
        second = await node.executor.run(
            HOSTILE, sleep, task_id="early", deadline=time.monotonic() + 1.5
        )
        return first, second

    assert all(node.wait(scenario()))  # each slept 2.5 s, past its first deadline of 1.5 s
    assert node.executor._extended == {}


def test_expired_deadline_fails_before_running(node: Node) -> None:
    """A deadline already passed (by the injected clock) never reaches a worker."""
    with pytest.raises(TaskFailed) as info:
        node.hostile({"do": "echo"}, deadline=time.monotonic() - 1)
    assert "deadline" in info.value.reason


def test_cancel_kills_and_reports_progress(node: Node) -> None:
    """Progress of a running task is visible; cancel kills its worker with a reason."""
    executor = node.executor
    seen: list[tuple[float, float, str]] = []
    reported = asyncio.Event()

    def on_progress(done: float, total: float, note: str) -> None:
        seen.append((done, total, note))
        reported.set()

    async def scenario() -> str:
        payload = json.dumps({"do": "sleep", "seconds": 60}).encode()
        task = asyncio.create_task(
            executor.run(HOSTILE, payload, task_id="t-cancel", on_progress=on_progress)
        )
        await asyncio.wait_for(reported.wait(), 30)
        assert executor.progress("t-cancel") == {"done": 1, "total": 2, "note": "sleeping"}
        assert await executor.cancel("t-cancel")
        with pytest.raises(TaskFailed) as info:
            await task
        return info.value.reason

    assert node.wait(scenario()) == "cancelled by the coordinator"
    assert seen == [(1, 2, "sleeping")]
    assert executor.progress("t-cancel") is None
    node.inference_still_works()


def test_cancelling_the_caller_kills_the_worker(node: Node) -> None:
    """When the daemon cancels the asyncio task, the worker is killed and replaced."""
    node.hostile({"do": "echo"})
    starts = len(node.executor.start_seconds)

    async def scenario() -> None:
        payload = json.dumps({"do": "sleep", "seconds": 60}).encode()
        run = node.executor.run(HOSTILE, payload, task_id="t-x", job_id=HOSTILE_JOB)
        task = asyncio.create_task(run)
        while node.executor.progress("t-x") is None:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    node.wait(scenario())
    node.inference_still_works()
    assert len(node.executor.start_seconds) == starts + 1


def test_admission_refuses_what_a_slot_cannot_hold(node: Node) -> None:
    """RAM over the per-slot budget, or VRAM on a node without GPUs, is refused up front."""
    executor = node.executor
    assert executor.admission({"ram_mb": 100}) == ""
    assert "per slot" in executor.admission({"ram_mb": 4096})
    assert "no GPU" in executor.admission({"vram_mb": 1000})
    with pytest.raises(TaskFailed) as info:
        node.hostile({"do": "echo"}, resources={"ram_mb": 4096})
    assert info.value.requester_fault


def test_declared_memory_lowers_the_limit(node: Node) -> None:
    """A task that declares 64 MB cannot allocate 512 MB, though the slot allows 2 GiB."""
    with pytest.raises(TaskFailed) as info:
        node.hostile({"do": "alloc", "bytes": 512 << 20}, resources={"ram_mb": 64})
    assert info.value.reason.startswith("out of memory")
    assert node.hostile({"do": "alloc", "bytes": 512 << 20}) == b'"allocated 536870912 bytes"'


def test_oversized_payload_is_refused(node: Node) -> None:
    """Payloads over the limit never reach a worker."""
    limit = node.executor.config.max_payload_bytes
    with pytest.raises(TaskFailed) as info:
        node.wait(node.executor.run(HOSTILE, b"x" * (limit + 1)))
    assert info.value.requester_fault


def test_unsandboxed_mode_runs_plain_workers(tmp_path: Path) -> None:
    """With allow_unsandboxed, workers are plain subprocesses that still answer tasks."""
    home = tmp_path / "home"
    home.mkdir()
    executor = make_executor(home, mode=sandbox.MODE_UNSANDBOXED, preload=())

    async def scenario() -> bytes:
        try:
            payload = json.dumps({"do": "echo", "data": "plain"}).encode()
            return await executor.run(HOSTILE, payload)
        finally:
            await executor.aclose()

    assert asyncio.run(scenario()) == b"plain"
    assert executor.mode == sandbox.MODE_UNSANDBOXED


# --- after the answer: the clean-up report -------------------------------------------------


class _FakeSlot:
    """What Executor._settle touches of a slot, with a scripted clean-up report."""

    def __init__(self, read: object) -> None:
        self._script = read
        self.killed: str | None = None
        self.settling = True
        self.answered = 7

    @property
    def alive(self) -> bool:
        return self.killed is None

    def kill(self, reason: str) -> None:
        self.killed = self.killed or reason

    async def _read(self) -> worker.Frame | None:
        if isinstance(self._script, BaseException):
            raise self._script
        if self._script == "hang":
            await asyncio.sleep(3600)
        return self._script  # type: ignore[return-value]


_CLEAN = worker.Frame({"op": "clean", "id": 7, "restart": False}, b"")


@pytest.mark.parametrize(
    ("report", "reused", "why"),
    [
        (_CLEAN, True, None),
        (worker.Frame({"op": "clean", "id": 7, "restart": True}, b""), False, "replaced after"),
        (worker.Frame({"op": "clean", "id": 8, "restart": False}, b""), False, "another task"),
        (worker.Frame({"op": "result", "id": 7}, b"x"), False, "no clean-up report"),
        (None, False, "no clean-up report"),
        (ConnectionResetError("pipe"), False, "ConnectionResetError"),
        ("hang", False, "within 0 s"),
        (_CLEAN, False, "its task left 1 process(es) running"),
    ],
)
def test_settle_reuses_only_a_clean_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, report: object, reused: bool, why: str | None
) -> None:
    """The slot always returns to the idle queue: as it is after a clean report that what
    is seen from outside bears out, through a fresh worker after anything else (restart
    asked, wrong id or op, EOF, error, silence, something left that the report denied)."""
    left = why if report is _CLEAN and why is not None else None

    monkeypatch.setattr(executor_module, "_SETTLE_TIMEOUT", 0.05)
    ex = make_executor(tmp_path)
    replaced: list[object] = []

    async def fake_replace(slot: object) -> None:
        replaced.append(slot)
        assert ex._idle is not None
        ex._idle.put_nowait(slot)

    monkeypatch.setattr(ex, "_replace", fake_replace)
    monkeypatch.setattr(ex, "_left_behind", lambda _slot: left)
    slot = _FakeSlot(report)

    async def go() -> object:
        ex._idle = asyncio.Queue()
        await ex._settle(slot)  # type: ignore[arg-type]
        return ex._idle.get_nowait()

    assert asyncio.run(go()) is slot
    assert slot.settling is False
    assert (replaced == []) is reused
    if why is not None:
        assert slot.killed is not None and why in slot.killed


def test_executor_refuses_a_layout_that_shows_the_node_home(tmp_path: Path) -> None:
    """Given the node home, the executor checks every bind before it starts a worker: a
    model cache that contains the home (and so its key files) is refused."""
    from nodeclient.errors import UsageError

    home = tmp_path / "cache" / "home"
    home.mkdir(parents=True)
    executor = make_executor(tmp_path / "x", cache_dir=tmp_path / "cache", node_home=home)
    with pytest.raises(UsageError, match="contains the node home"):
        asyncio.run(executor.warm_up())
    executor.shutdown()


def test_a_worker_killed_with_unread_answers_still_frees_its_slot(node: Node) -> None:
    """A task answers, then its thread writes 4 MiB of junk to the worker's answer pipe
    and keeps the worker from exiting. The worker is replaced (killed after 5 s), and
    the slot comes back: before, waiting for the killed worker never ended (its unread
    pipe was never seen to end) and every later task waited for a slot for ever."""
    assert node.hostile({"do": "junk_thread"}) == b'"answered"'
    payload = json.dumps({"do": "echo", "data": "next"}).encode()
    began = time.monotonic()
    late = node.wait(asyncio.wait_for(node.executor.run(sandbox_harness.HOSTILE, payload), 60))
    assert late == b"next"
    assert time.monotonic() - began < 45
    node.inference_still_works()


def _occupy_the_slot(node: Node, *, seconds: float) -> asyncio.Task[bytes]:
    """A task that keeps the executor's only slot busy for *seconds*, started."""
    sleeper = node.loop.create_task(
        node.executor.run(
            sandbox_harness.HOSTILE,
            json.dumps({"do": "sleep", "seconds": seconds}).encode(),
            deadline=time.monotonic() + 30,
        )
    )
    node.wait(asyncio.sleep(0.2))
    return sleeper


def test_a_lease_renewed_while_the_task_waits_for_a_slot_counts(node: Node) -> None:
    """The task waits for the only slot past its first deadline, its lease renewed
    meanwhile: it runs, instead of failing at the deadline it was given first."""
    sleeper = _occupy_the_slot(node, seconds=1.5)
    waiting = node.loop.create_task(
        node.executor.run(
            sandbox_harness.HOSTILE,
            json.dumps({"do": "echo", "data": "renewed"}).encode(),
            task_id="renewed-task",
            deadline=time.monotonic() + 0.5,
        )
    )
    node.wait(asyncio.sleep(0.1))
    assert node.executor.extend("renewed-task", time.monotonic() + 30)
    assert node.wait(waiting) == b"renewed"
    node.wait(sleeper)


def test_a_renewal_for_a_task_that_never_ran_goes_with_it(tmp_path: Path) -> None:
    """A lease renewed while its task decrypts or fetches its inputs is kept for the run;
    when the task ends before it (a failed decryption or fetch), its release drops it (it
    stayed, up to a bound, one entry for each such task)."""
    executor = make_executor(tmp_path / "home")
    assert executor.extend("never-ran", time.monotonic() + 30)
    assert "never-ran" in executor._extended
    executor.release("never-ran")
    assert executor._extended == {}


def test_a_task_waiting_for_a_slot_fails_at_its_deadline(node: Node) -> None:
    """With the only slot busy, a task waits for it no longer than its deadline."""
    sleeper = _occupy_the_slot(node, seconds=3)
    with pytest.raises(TaskFailed, match="deadline exceeded while waiting for a free worker"):
        node.hostile({"do": "echo"}, deadline=time.monotonic() + 0.5)
    node.wait(sleeper)
    node.inference_still_works()


def test_work_roots_left_by_a_dead_daemon_are_swept(tmp_path: Path) -> None:
    """A root whose lock no live process holds (its daemon was killed) is removed with
    the task files in it; a live daemon's root, one without a lock file (an older
    release's) and a link are left alone."""

    def root(name: str, *, lock: bool) -> Path:
        path = tmp_path / f"nodeclient-work-{name}"
        (path / "slot-0" / "task").mkdir(parents=True)
        (path / "slot-0" / "task" / "frame.png").write_bytes(b"a requester's frame")
        (path / "slot-0" / "task").chmod(0o555)  # what a task may leave
        if lock:
            (path / ".lock").write_bytes(b"")
        return path

    dead, old = root("dead", lock=True), root("old", lock=False)
    live = root("live", lock=True)
    held = exec_workdirs._hold_root(live)
    elsewhere = tmp_path / "elsewhere"  # unlocked, with a lock file: only a link names it
    elsewhere.mkdir()
    (elsewhere / ".lock").write_bytes(b"")
    (elsewhere / "keep").write_bytes(b"not the sweep's")
    (tmp_path / "nodeclient-work-link").symlink_to(elsewhere)
    fresh, fresh_lock = exec_workdirs.new_root(tmp_path)  # made and locked before it shows
    try:
        assert fresh.name.startswith("nodeclient-work-")
        exec_workdirs.sweep_stale_roots(tmp_path)
        assert not dead.exists()
        assert live.exists() and old.exists() and fresh.exists()
        assert (elsewhere / "keep").exists() and (tmp_path / "nodeclient-work-link").is_symlink()
    finally:
        os.close(held)
        os.close(fresh_lock)
    exec_workdirs.sweep_stale_roots(tmp_path)  # their daemons gone now: removed too
    assert not live.exists() and not fresh.exists() and old.exists()


def test_a_stale_root_that_cannot_be_removed_does_not_stop_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale = tmp_path / "nodeclient-work-stuck"
    stale.mkdir()
    (stale / ".lock").write_bytes(b"")

    def busy(path: Path) -> None:
        raise OSError(16, "Device or resource busy")

    monkeypatch.setattr(exec_workdirs, "remove_tree", busy)
    exec_workdirs.sweep_stale_roots(tmp_path)  # logged and left, not raised
    assert stale.exists()


def test_only_old_unlocked_staging_roots_are_swept(tmp_path: Path) -> None:
    """A root is made under a staging name: a daemon killed while making it leaves one. An
    old one, without a lock file or with one nobody holds, is removed; a fresh one (a
    daemon making it right now) and an old one whose lock is held are left."""

    def staging(name: str, *, age: float, lock: bool) -> Path:
        path = tmp_path / f".nodeclient-staging-{name}"
        path.mkdir()
        if lock:
            (path / ".lock").write_bytes(b"")
        os.utime(path, (time.time() - age, time.time() - age))
        return path

    old_bare, old_lock = staging("a", age=7200, lock=False), staging("b", age=7200, lock=True)
    fresh, held_root = staging("c", age=10, lock=False), staging("d", age=7200, lock=True)
    held = exec_workdirs._hold_root(held_root)
    try:
        exec_workdirs.sweep_stale_roots(tmp_path)
    finally:
        os.close(held)
    assert not old_bare.exists() and not old_lock.exists()
    assert fresh.exists() and held_root.exists()


# --- progress reports ----------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_goes_on_twice_a_second_and_the_end_once() -> None:
    """Of a task's progress reports, one each half second goes on, and the first that
    says the task is done (whenever it comes); the rest are dropped and counted."""
    clock = _Clock()
    gate = executor_module._ProgressGate(clock)
    assert gate.admit(1, 10)
    clock.now += 0.1
    assert not gate.admit(2, 10)
    assert gate.admit(10, 10)  # the end: news even within the half second
    clock.now += 0.1
    assert not gate.admit(3, 10)
    clock.now += 5
    assert not gate.admit(10, 10)  # the end again: never news twice
    assert gate.admit(4, 10)
    assert gate.dropped == 3


def test_a_report_held_back_is_shown_at_once_and_sent_when_its_interval_ends() -> None:
    """Frame 2 saved 0.2 s after frame 1: status shows it at once, and it goes to the
    coordinator once the half second has passed (it was dropped, and frame 1 shown until
    the next frame, many minutes later). Nothing goes after the task has ended."""
    board: dict[str, dict[str, object]] = {}
    sent: list[tuple[float, float, str]] = []

    async def scenario() -> None:
        relay = executor_module._ProgressRelay(
            time.monotonic, board, "k", lambda *r: sent.append(r)
        )
        relay(1, 3, "frame 1 saved")
        relay(2, 3, "frame 2 saved")
        assert board["k"]["note"] == "frame 2 saved"
        assert sent == [(1, 3, "frame 1 saved")]
        await asyncio.sleep(executor_module.PROGRESS_INTERVAL_S + 0.3)
        assert sent == [(1, 3, "frame 1 saved"), (2, 3, "frame 2 saved")]
        assert relay.gate.dropped == 0
        relay(2.5, 3, "stepping")  # within the interval: held back
        relay.close()  # the task ended
        await asyncio.sleep(executor_module.PROGRESS_INTERVAL_S + 0.3)
        assert len(sent) == 2 and board["k"]["note"] == "stepping"

    asyncio.run(scenario())


def test_a_flood_of_progress_frames_is_not_passed_on(node: Node) -> None:
    """A task that writes 20,000 progress frames to its pipe, past the worker's own
    throttle, gets a couple through to the daemon, not 20,000 sends."""
    reports: list[tuple[float, float, str]] = []
    payload = json.dumps({"do": "flood_progress", "n": 20000}).encode()
    result = node.wait(
        node.executor.run(HOSTILE, payload, on_progress=lambda *report: reports.append(report))
    )
    assert result == b'"flooded"'
    assert 1 <= len(reports) <= 4
    assert sum(1 for done, total, _ in reports if done >= total) <= 1


def test_disk_used_counts_allocated_blocks_and_follows_no_link(tmp_path: Path) -> None:
    """What a work directory takes on disk: blocks allocated (a sparse file's hole counts
    nothing), through subdirectories, not through a symlink to elsewhere; the count stops
    once it passes the limit it is asked about."""
    from nodeclient.node.exec_workdirs import disk_used

    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "sub" / "data").write_bytes(b"\1" * (1 << 20))
    with open(work / "sparse", "wb") as fh:
        fh.truncate(1 << 30)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "big").write_bytes(b"\1" * (4 << 20))
    (work / "link").symlink_to(elsewhere, target_is_directory=True)
    used = disk_used(work, stop_after=1 << 40)
    assert 1 << 20 <= used < 2 << 20
    assert disk_used(work, stop_after=0) > 0


@pytest.mark.parametrize("readable", [True, False])
def test_disk_used_follows_no_link_swapped_in_for_a_directory_while_it_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, readable: bool
) -> None:
    """The task swaps a directory it made for a symlink (to /, to the node home) between
    the daemon's look at the entry and its opening of it: the walk opens each directory
    relative to its parent without following a link, so it counts nothing of where the
    link leads, and a directory the task made unreadable is made readable again through
    a handle, never by a path that a link could have replaced."""
    work = tmp_path / "work"
    (work / "d").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (elsewhere / "big").write_bytes(b"\1" * (4 << 20))
    real_scandir = os.scandir

    def racing(where: Any) -> Any:
        entries = real_scandir(where)

        class Racing:
            def __iter__(self) -> Racing:
                return self

            def __next__(self) -> os.DirEntry[str]:
                entry = next(entries)
                if entry.name == "d":
                    entry.stat(follow_symlinks=False)  # seen as a directory (and cached)
                    (work / "d").rmdir()
                    (work / "d").symlink_to(elsewhere, target_is_directory=True)
                return entry

            def close(self) -> None:
                entries.close()

            def __enter__(self) -> Racing:
                return self

            def __exit__(self, *_exc: object) -> None:
                entries.close()

        return Racing()

    if not readable:  # the race after PermissionError, as a daemon that is not root
        monkeypatch.setattr(exec_workdirs.os, "open", _refusing_directories(os.open, refused="d"))
    monkeypatch.setattr(exec_workdirs.os, "scandir", racing)
    assert exec_workdirs.disk_used(work, stop_after=1 << 40) < 1 << 20
    assert stat.S_IMODE(elsewhere.stat().st_mode) == 0o700  # never chmodded through the link


def _refusing_directories(real_open: Any, *, refused: str) -> Any:
    """os.open that answers EACCES for reading directory *refused*, as a directory of
    mode 0 does to a daemon that is not root."""

    def opener(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if path == refused and flags & os.O_DIRECTORY and not flags & os.O_PATH:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, flags, *args, **kwargs)

    return opener


def test_disk_used_cannot_measure_directories_nested_too_deep(tmp_path: Path) -> None:
    """A tree nested deeper than MAX_WALK_DEPTH cannot be measured (OSError): the disk
    watcher then stops the task, as for any directory it cannot measure."""
    deep = tmp_path / "work"
    deep.mkdir()
    fd = os.open(deep, os.O_RDONLY)
    try:
        for _ in range(exec_workdirs.MAX_WALK_DEPTH + 1):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = child
    finally:
        os.close(fd)
    with pytest.raises(OSError, match="nested over"):
        exec_workdirs.disk_used(deep, stop_after=1 << 40)


def _scripted_slot(tmp_path: Path, *, after_ready: str, before_ready: str = "") -> slots.Slot:
    """An unsandboxed slot whose worker is a script: *before_ready*, its ready frame, then
    *after_ready* (Python lines)."""
    script = "\n".join(
        [
            "import os, sys, time",
            before_ready,
            "from nodeclient.node import worker",
            "worker.write_frame(1, {'op': 'ready', 'pid': os.getpid(), 'classes': [], 'broken': {}})",
            after_ready,
        ]
    )
    return slots.Slot(
        index=0, workdir=tmp_path, tmp_dir=None, argv=[sys.executable, "-c", script],
        env=dict(os.environ), mode="unsandboxed", max_output=1 << 16, max_result=1 << 20,
        shared_bytes=0,
    )  # fmt: skip


def test_a_worker_that_prints_while_idle_is_killed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Idle (ready, no task, its clean-up reported), a worker runs nothing, so prints
    nothing: whatever does was left running by its last task (a thread the worker could
    not see). It is killed at once, rather than read without limit by the daemon, or
    blamed on the next task. What it prints at start-up is not held against it."""
    slot = _scripted_slot(
        tmp_path,
        before_ready="sys.stderr.write('a warning at import\\n'); sys.stderr.flush()",
        after_ready="time.sleep(0.3)\nwhile True: os.write(2, b'left behind ' * 1000)",
    )

    async def scenario() -> int | None:
        await slot.start(timeout=30)
        assert slot.killed is None  # its start-up output is its own
        return await slot.reap(10)

    with caplog.at_level(logging.WARNING, logger="nodeclient.node"):
        rc = asyncio.run(scenario())
    assert rc is not None and rc < 0  # SIGKILL
    assert slot.killed == "printed while idle: its last task left something running"
    (record,) = [r for r in caplog.records if r.getMessage() == "worker.idle_output"]
    assert "left behind" in record.__dict__["printed"]


def test_a_worker_that_exits_while_idle_is_reported_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker that dies with no task (the OOM killer, an operator's kill, a crash) is
    logged when it goes, with why, not found silently by the next task; one the daemon
    stops itself is not reported."""
    slot = _scripted_slot(tmp_path, after_ready="time.sleep(0.3)\nos._exit(3)")
    quiet = _scripted_slot(tmp_path, after_ready="time.sleep(60)")

    async def scenario() -> None:
        await slot.start(timeout=30)
        assert slot.drain is not None
        await asyncio.wait_for(slot.drain, 10)
        await quiet.start(timeout=30)
        quiet.kill("shutdown")
        await quiet.reap(10)
        assert quiet.drain is not None
        await asyncio.wait_for(quiet.drain, 10)

    with caplog.at_level(logging.WARNING, logger="nodeclient.node"):
        asyncio.run(scenario())
    (record,) = [r for r in caplog.records if r.getMessage() == "worker.exited_idle"]
    assert record.__dict__["status"] == 3
    assert record.__dict__["reason"] == "crashed (worker exited with status 3)"
    assert "journalctl -k" in record.__dict__["action"]
    assert not slot.alive and slot.killed == "exited while idle"


def test_a_worker_that_closes_its_stderr_while_idle_is_killed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its stderr closed but the worker runs on (after the wait for its exit): it cannot be
    trusted, so it is killed, and said. One given a task meanwhile is left to that task,
    which reports what becomes of it."""
    monkeypatch.setattr(slots, "_REAP_TIMEOUT", 0.5)
    closes = "time.sleep(0.2)\nos.close(2)\ntime.sleep(60)"
    idle, taken = (
        _scripted_slot(tmp_path, after_ready=closes),
        _scripted_slot(tmp_path, after_ready=closes),
    )

    async def scenario() -> int | None:
        await idle.start(timeout=30)
        await taken.start(timeout=30)
        await asyncio.sleep(0.4)  # both closed stderr; their waits for the exit run
        taken.busy = True  # a task arrived meanwhile
        for slot in (idle, taken):
            assert slot.drain is not None
            await asyncio.wait_for(slot.drain, 10)
        assert taken.killed is None
        taken.kill("test over")
        await taken.reap(10)
        return await idle.reap(10)

    with caplog.at_level(logging.WARNING, logger="nodeclient.node"):
        rc = asyncio.run(scenario())
    assert rc is not None and rc < 0  # killed
    assert idle.killed == "closed its stderr while idle"
    (record,) = [r for r in caplog.records if r.getMessage() == "worker.exited_idle"]
    assert record.__dict__["status"] is None and record.__dict__["reason"] == "still running"


def test_a_fresh_worker_starts_only_once_the_killed_one_has_exited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker killed while idle stays in its slot until the next task starts one: the
    start waits for the killed one to exit first, so no process of its last task still
    runs when a fresh worker takes the slot's directories."""
    slot = _scripted_slot(tmp_path, after_ready="time.sleep(60)")
    real_exec = asyncio.create_subprocess_exec
    previous_at_spawn: list[int | None] = []

    async def spawn(*args: Any, **kwargs: Any) -> Any:
        if slot.proc is not None:
            previous_at_spawn.append(slot.proc.returncode)
        return await real_exec(*args, **kwargs)

    monkeypatch.setattr(slots.asyncio, "create_subprocess_exec", spawn)

    async def scenario() -> None:
        await slot.start(timeout=30)
        slot.kill("printed while idle: its last task left something running")
        await slot.start(timeout=30)  # at once: the kill is not yet reaped
        slot.kill("done")
        await slot.reap(10)

    asyncio.run(scenario())
    assert len(previous_at_spawn) == 1 and previous_at_spawn[0] is not None


def _unsandboxed(tmp_path: Path, *, slots: int = 1, **config: Any) -> Executor:
    """An unsandboxed executor whose models and work directories are under *tmp_path*."""
    return Executor(
        slots=slots, mode="unsandboxed",
        config=WorkerConfig(cache_dir=tmp_path / "models", work_root=tmp_path / "work", **config),
    )  # fmt: skip


def test_the_slots_directory_is_emptied_only_once_the_killed_worker_has_exited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The executor empties a slot's work directory for its next worker only after the
    previous one (killed while idle, not yet reaped) has exited: before, it emptied it
    first, and a process of that worker's last task could still write into the fresh one."""
    executor = _unsandboxed(tmp_path)
    slot = _scripted_slot(tmp_path / "slot", after_ready="time.sleep(60)")
    slot.workdir.mkdir()
    real_fresh = Executor._fresh_workdir
    previous_at_emptying: list[int | None] = []

    def fresh(self: Executor, s: slots.Slot) -> None:
        if s.proc is not None:
            previous_at_emptying.append(s.proc.returncode)
        real_fresh(self, s)

    monkeypatch.setattr(Executor, "_fresh_workdir", fresh)

    async def scenario() -> None:
        await executor._start(slot)
        slot.kill("printed while idle: its last task left something running")
        await executor._start(slot)  # at once: the kill is not yet reaped
        slot.kill("done")
        await slot.reap(10)

    asyncio.run(scenario())
    assert len(previous_at_emptying) == 1 and previous_at_emptying[0] is not None


def test_shutdown_removes_a_tree_the_last_task_made_read_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At shutdown a slot's directory goes even if its last task left entries that cannot
    be unlinked (a 0555 directory: EACCES for a daemon not run as root, simulated here
    since root is exempt). Before, rmtree ignored the error and the task's files stayed."""
    executor = _unsandboxed(tmp_path)
    executor._build_slots()
    workdir = executor._slots[0].workdir
    locked = workdir / "task" / "ro"
    locked.mkdir(parents=True)
    (locked / "f").write_text("left by a task")
    locked.chmod(0o555)
    real_unlink, refused = os.unlink, []

    def unlink(path: Any, *, dir_fd: int | None = None) -> None:
        if path == "f" and not refused:  # what a non-root owner gets in a 0555 directory
            refused.append(path)
            raise PermissionError(errno.EACCES, "Permission denied", path)
        real_unlink(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "unlink", unlink)
    executor.shutdown()
    assert refused == ["f"]
    assert not workdir.exists()


def _big_slots(tmp_path: Path) -> Executor:
    limits = sandbox.Limits(
        memory_bytes=16 << 30, nproc=64, nofile=256, fsize_bytes=1 << 30, tmp_bytes=1 << 30
    )
    return _unsandboxed(tmp_path, slots=2, limits=limits)


def test_ram_admission_counts_what_admitted_tasks_declared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two tasks of 14 GB dispatched together against 20 GB free: the first is admitted
    and reserved, the second refused, since the first has taken nothing yet (before, each
    saw 20 GB free, and the kernel's OOM killer settled it). Its own reservation never
    counts against a task; released, the memory is free again."""
    monkeypatch.setattr(sandbox, "available_memory_bytes", lambda: 20_000 << 20)
    ex = _big_slots(tmp_path)
    first = uuid.uuid4()
    assert ex.admission({"ram_mb": 14_000}) == ""
    ex.reserve(first, {"ram_mb": 14_000})
    assert ex.admission({"ram_mb": 14_000}) == (
        "task needs 14000 MB of RAM, only 6000 MB is free "
        "(14000 MB more is promised to running tasks)"
    )
    assert ex.admission({"ram_mb": 6_000}) == ""
    assert ex.admission({"ram_mb": 14_000}, task_id=first) == ""  # its own
    second = uuid.uuid4()
    ex.reserve(second, {"ram_mb": 7_000})  # 21 GB promised: nothing left for a third
    assert "only 0 MB is free" in ex.admission({"ram_mb": 1})
    # ... but the first, admitted before the second, is held to what is free as it
    # starts, not to the promise made to the second after it; the second, to what the
    # first has not taken yet.
    assert ex.admission({"ram_mb": 14_000}, task_id=first) == ""
    assert "only 6000 MB is free" in ex.admission({"ram_mb": 7_000}, task_id=second)
    ex.release(second)
    ex.reserve(uuid.uuid4(), {})  # declares nothing: reserves nothing
    ex.release(first)
    assert ex.admission({"ram_mb": 14_000}) == ""


def test_ram_admission_does_not_count_twice_what_a_running_task_took(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A running task's worker has grown by 10 GB of its 14 GB: MemAvailable holds those
    10 GB already, so only the 4 GB it has not taken are promised; with its tree unreadable,
    all 14 GB are."""
    monkeypatch.setattr(sandbox, "available_memory_bytes", lambda: 20_000 << 20)
    ex = _big_slots(tmp_path)
    task = uuid.uuid4()
    ex.reserve(task, {"ram_mb": 14_000})
    ex._build_slots()
    slot = ex._slots[0]
    slot.proc = SimpleNamespace(pid=4242)  # type: ignore[assignment]
    slot.task_rss = 1 << 30
    ex._running[str(task)] = slot
    tree: list[int | None] = [(1 << 30) + (10_000 << 20)]
    monkeypatch.setattr(sandbox, "process_tree_rss_bytes", lambda pid: tree[0])
    assert "only 16000 MB is free (4000 MB more" in ex.admission({"ram_mb": 16_001})
    tree[0] = None
    assert "only 6000 MB is free (14000 MB more" in ex.admission({"ram_mb": 16_001})


def test_process_tree_rss_counts_the_children_too(tmp_path: Path) -> None:
    """The memory of a worker's process tree: a child holding 200 MB counts in its
    parent's tree, not in the parent alone; a pid that does not exist reads as None."""
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; b = bytearray(200 << 20); sys.stdout.write('ok\\n'); "
         "sys.stdout.flush(); time.sleep(60)"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ok\n"
        alone = sandbox.process_tree_rss_bytes(child.pid)
        me = sandbox.process_tree_rss_bytes(os.getpid())
        mine_only = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf(
            "SC_PAGE_SIZE"
        )
        assert alone is not None and alone >= 200 << 20
        assert me is not None and me - mine_only >= 200 << 20
    finally:
        child.kill()
        child.wait()
    assert sandbox.process_tree_rss_bytes(child.pid) is None


def test_disk_used_holds_one_descriptor_per_level_and_leaks_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each slot's watcher walks at once: it holds one descriptor per directory level
    (a scan's own is closed before the next level opens), not two, and none is left
    open when a scan fails (EMFILE) half-way."""
    deep = tmp_path / "work"
    level = deep
    for _ in range(40):
        level = level / "d"
    level.mkdir(parents=True)
    real_scandir = os.scandir
    held: list[int] = []

    def counting(where: Any) -> Any:
        held.append(len(os.listdir("/proc/self/fd")))
        return real_scandir(where)

    before = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(exec_workdirs.os, "scandir", counting)
    assert exec_workdirs.disk_used(deep, stop_after=1 << 40) > 0
    assert max(held) - before <= 40 + 3, (before, max(held))

    def failing(where: Any) -> Any:
        if len(held) > 50:
            raise OSError(errno.EMFILE, "Too many open files")
        held.append(0)
        return real_scandir(where)

    monkeypatch.setattr(exec_workdirs.os, "scandir", failing)
    with pytest.raises(OSError, match="Too many open files"):
        exec_workdirs.disk_used(deep, stop_after=1 << 40)
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--config"],
        ["--config", "{}", "--shm-fd"],
        ["--config", "{}", "--check-only"],
        ["--config", "{}", "--other", "1"],
        ["--config", "{}", "--shm-fd", "3", "--shm-fd", "4"],
        ["--config", "{}", "--shm-fd", "three"],
        ["--config", "{}", "--shm-fd", "-3"],
        ["--config", "{}", "--shm-fd", "\u00b3"],  # a digit to str.isdigit, not to int()
        ["--settings", "{}"],
    ],
)
def test_the_worker_refuses_a_command_line_it_does_not_know(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """The worker's command line is the executor's alone; anything else is a usage error
    (exit 2) before it touches its descriptors."""
    assert worker.main(args) == 2
    assert capsys.readouterr().err.startswith("usage: python -m nodeclient.node.worker")


def test_a_wide_directory_is_not_read_whole_to_find_it_holds_too_many(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """disk_used with max_entries stops listing a directory at the bound: the outside
    check of a clean-up runs on the event loop, and a directory of 20,000 files (a task
    may leave 100,000) was listed and each file stat'ed (about 300 ms for 100,000) before
    the count was looked at."""
    wide = tmp_path / "slot" / "tmp"
    wide.mkdir(parents=True)
    for i in range(20_000):
        (wide / f"e{i}").touch()
    seen = 0
    real_scandir = os.scandir

    class Counted:
        def __init__(self, fd: int) -> None:
            self._it = real_scandir(fd)

        def __enter__(self) -> Counted:
            return self

        def __exit__(self, *exc: object) -> None:
            self._it.close()

        def __iter__(self) -> Counted:
            return self

        def __next__(self) -> os.DirEntry[str]:
            nonlocal seen
            entry = next(self._it)
            seen += 1
            return entry

    monkeypatch.setattr(os, "scandir", Counted)
    with pytest.raises(exec_workdirs.TooManyEntries):
        exec_workdirs.disk_used(tmp_path / "slot", stop_after=1 << 40, max_entries=1000)
    assert seen <= 1002
