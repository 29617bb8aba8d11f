"""A runtime that misbehaves on request, to prove the sandbox holds (tests only).

The executor's tests inject it as workload class ``test.hostile`` (import path
``hostile_runtime:factory``, with this directory on the worker's PYTHONPATH). The payload
is a JSON object whose ``do`` says what to attempt; the result is JSON of what happened,
so a test can see both a refusal the task caught and a failure the executor reports.
"""

from __future__ import annotations

import errno
import getpass
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

CLASS = "test.hostile"


class HostileRuntime:
    workload_class: ClassVar[str] = CLASS

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir

    def run(
        self, payload: bytes, *, workdir: Path, progress: Callable[[float, float, str], None]
    ) -> bytes:
        order: dict[str, Any] = json.loads(payload)
        action = getattr(self, "do_" + str(order["do"]))
        out: Any = action(order, workdir, progress)
        return out if isinstance(out, bytes) else json.dumps(out).encode()

    def do_echo(self, order: dict[str, Any], workdir: Path, progress: Any) -> bytes:
        return str(order.get("data", "")).encode()

    def do_whoami(self, order: dict[str, Any], workdir: Path, progress: Any) -> dict[str, Any]:
        return {
            "uid": os.getuid(),
            "euid": os.geteuid(),
            "user": getpass.getuser(),
            "cwd": os.getcwd(),
            "workdir": str(workdir),
            "env": dict(os.environ),
            "root": sorted(os.listdir("/")),
            "cache_dir": str(self.cache_dir),
            "sys_path": list(sys.path),
        }

    def do_connect(self, order: dict[str, Any], workdir: Path, progress: Any) -> str:
        with socket.create_connection((order["host"], int(order["port"])), timeout=5):
            return "connected"

    def do_write(self, order: dict[str, Any], workdir: Path, progress: Any) -> str:
        Path(order["path"]).write_text("written by a task")
        return "written"

    def do_read(self, order: dict[str, Any], workdir: Path, progress: Any) -> str:
        return Path(order["path"]).read_text()

    def do_listdir(self, order: dict[str, Any], workdir: Path, progress: Any) -> list[str]:
        return sorted(os.listdir(order.get("path") or workdir))

    def do_fork_bomb(self, order: dict[str, Any], workdir: Path, progress: Any) -> str:
        children = 0
        while children < int(order.get("max", 100_000)):
            if os.fork() == 0:
                time.sleep(60)
                os._exit(0)
            children += 1
        return f"forked {children} children"

    def do_alloc(self, order: dict[str, Any], workdir: Path, progress: Any) -> str:
        block = bytearray(int(order["bytes"]))
        return f"allocated {len(block)} bytes"

    def do_print_forever(self, order: dict[str, Any], workdir: Path, progress: Any) -> str:
        line = "x" * 1000
        while True:
            print(line)

    def do_big_file(self, order: dict[str, Any], workdir: Path, progress: Any) -> str:
        chunk = b"\0" * (1 << 20)
        with open(workdir / "big", "wb") as fh:
            while True:
                fh.write(chunk)
                fh.flush()

    def do_sleep(self, order: dict[str, Any], workdir: Path, progress: Any) -> str:
        progress(1, 2, "sleeping")
        time.sleep(float(order["seconds"]))
        return "slept"

    def do_crash(self, order: dict[str, Any], workdir: Path, progress: Any) -> str:
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGSEGV)
        return "unreachable"

    def do_progress(self, order: dict[str, Any], workdir: Path, progress: Any) -> str:
        for step in range(3):
            progress(step, 3, f"step {step}")
        progress(3, 3, "done")
        return "progressed"

    def do_resize_memfds(
        self, order: dict[str, Any], workdir: Path, progress: Any
    ) -> dict[str, str]:
        """Try to shrink and grow every memfd the worker holds; what each attempt gave."""
        outcome = {}
        for name in sorted(os.listdir("/proc/self/fd")):
            try:
                target = os.readlink(f"/proc/self/fd/{name}")
            except OSError:  # the directory's own descriptor, closed by now
                continue
            if target.startswith("/memfd:"):
                for size in (0, 1 << 30):
                    try:
                        os.ftruncate(int(name), size)
                        outcome[f"{name}:{size}"] = "resized"
                    except OSError as exc:  # EPERM from the seals (or EFBIG from the rlimit)
                        outcome[f"{name}:{size}"] = errno.errorcode.get(exc.errno or 0, "?")
        return outcome

    def do_forge_progress(self, order: dict[str, Any], workdir: Path, progress: Any) -> str:
        """Write a progress frame of garbage for this task straight to the worker's answer
        pipe (a task can: the descriptor and the task's id are in its own process), then
        take a while."""
        worker = _run_task_locals()
        fd, task_id = worker["self"].out_fd, worker["task_id"]
        header = json.dumps({"op": "progress", "id": task_id, "done": order["done"]}).encode()
        os.write(fd, len(header).to_bytes(4, "big") + (0).to_bytes(4, "big") + header)
        time.sleep(2)
        return "forged"

    def do_forge_header(self, order: dict[str, Any], workdir: Path, progress: Any) -> str:
        """Write a frame whose header is the order's ``header`` text, verbatim, to the
        worker's answer pipe, then go on for ``seconds``."""
        fd = _run_task_locals()["self"].out_fd
        header = str(order["header"]).encode()
        os.write(fd, len(header).to_bytes(4, "big") + (0).to_bytes(4, "big") + header)
        time.sleep(float(order.get("seconds", 2)))
        return "forged"

    def do_fill(self, order: dict[str, Any], workdir: Path, progress: Any) -> dict[str, Any]:
        """Write ``files`` files of ``mib`` MiB each into ``where``; how many were written
        whole, and the error that stopped the rest (after ``sleep`` seconds more, if given)."""
        chunk = b"\1" * (1 << 20)
        written, error = 0, None
        for i in range(int(order["files"])):
            try:
                with open(Path(order["where"]) / f"junk-{i}", "wb") as fh:
                    for _ in range(int(order["mib"])):
                        fh.write(chunk)
            except OSError as exc:
                error = exc.strerror
                break
            written += 1
        time.sleep(float(order.get("sleep", 0)))
        return {"written": written, "error": error}

    def do_empty_files(self, order: dict[str, Any], workdir: Path, progress: Any) -> int:
        """Make *n* empty files in the work directory (no blocks, an inode each), then
        sleep *sleep* seconds; how many were made."""
        made = 0
        for i in range(int(order["n"])):
            (workdir / f"e{i}").touch()
            made += 1
        time.sleep(float(order.get("sleep", 0)))
        return made

    def do_flood_progress(self, order: dict[str, Any], workdir: Path, progress: Any) -> str:
        """Write ``n`` progress frames straight to the worker's answer pipe (past the
        worker's throttle), half of them saying the task is done."""
        worker = _run_task_locals()
        fd, task_id = worker["self"].out_fd, worker["task_id"]
        n = int(order["n"])
        frames = []
        for i in range(n):
            done = n if i % 2 else i
            header = {"op": "progress", "id": task_id, "done": done, "total": n, "note": "x"}
            raw = json.dumps(header).encode()
            frames.append(len(raw).to_bytes(4, "big") + (0).to_bytes(4, "big") + raw)
        os.write(fd, b"".join(frames))
        return "flooded"

    def do_remember(self, order: dict[str, Any], workdir: Path, progress: Any) -> list[str]:
        """Keep the order's ``data`` in the worker's memory, where a task that took over
        the worker would keep what later tasks send it; everything kept so far."""
        _REMEMBERED.append(str(order["data"]))
        return _REMEMBERED

    def do_oom_score(self, order: dict[str, Any], workdir: Path, progress: Any) -> dict[str, Any]:
        """The task's oom_score_adj, its child's, and what came of lowering it to 0 (made
        dumpable first, so that /proc/self is its own to write after the worker dropped
        privileges)."""
        import ctypes

        def score() -> int:
            return int(Path("/proc/self/oom_score_adj").read_text())

        read_end, write_end = os.pipe()
        if os.fork() == 0:
            os.write(write_end, str(score()).encode())
            os._exit(0)
        os.wait()
        child = int(os.read(read_end, 32))
        own = score()
        ctypes.CDLL(None, use_errno=True).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE
        try:
            Path("/proc/self/oom_score_adj").write_text("0")
            lowered = f"lowered to {score()}"
        except OSError as exc:
            lowered = f"refused: {exc.strerror}"
        return {"own": own, "child": child, "lowered": lowered}

    def do_junk_thread(self, order: dict[str, Any], workdir: Path, progress: Any) -> str:
        """Answer at once, leaving a thread that fills the worker's answer pipe with junk
        after the clean-up report and keeps the worker from exiting."""
        import threading

        fd = _run_task_locals()["self"].out_fd

        def junk() -> None:
            time.sleep(0.5)
            for _ in range(int(order.get("chunks", 64))):
                os.write(fd, b"j" * 65536)
            time.sleep(600)

        threading.Thread(target=junk).start()
        return "answered"

    def do_swap_task_dir(self, order: dict[str, Any], workdir: Path, progress: Any) -> str:
        """Prepare a directory beside the task's, with a file in it, and leave a symlink to
        it where the task directory was: the next task would start in it."""
        prepared = workdir.parent / "prepared"
        workdir.rename(prepared)
        (prepared / "planted.txt").write_text("from an earlier task")
        workdir.symlink_to("prepared")
        return "swapped"

    def do_readonly_tree(self, order: dict[str, Any], workdir: Path, progress: Any) -> str:
        """Leave a directory whose entries cannot be unlinked, and one that cannot be read."""
        (workdir / "ro").mkdir()
        (workdir / "ro" / "f").write_text("x")
        (workdir / "ro").chmod(0o555)
        (workdir / "none" / "deep").mkdir(parents=True)
        (workdir / "none" / "deep" / "g").write_text("y")
        (workdir / "none").chmod(0)
        return "left a read-only tree"

    def do_socket(self, order: dict[str, Any], workdir: Path, progress: Any) -> str:
        """Make a socket of the family *family* (a number: 40 is AF_VSOCK)."""
        try:
            socket.socket(int(order["family"]), socket.SOCK_STREAM).close()
        except OSError as exc:
            return f"refused: {errno.errorcode.get(exc.errno or 0, exc.errno)}"
        return "made"

    def do_fallocate(self, order: dict[str, Any], workdir: Path, progress: Any) -> dict[str, Any]:
        """fallocate(2) of *bytes* with *mode* (1: FALLOC_FL_KEEP_SIZE) on a new file in
        the work directory: the errno, or the bytes it took on disk."""
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(workdir / "reserved", os.O_CREAT | os.O_WRONLY, 0o600)
        try:
            done = libc.fallocate(
                fd, int(order["mode"]), ctypes.c_long(0), ctypes.c_long(int(order["bytes"]))
            )
            if done != 0:
                return {"refused": errno.errorcode.get(ctypes.get_errno(), ctypes.get_errno())}
            return {"on_disk": os.fstat(fd).st_blocks * 512}
        finally:
            os.close(fd)

    def do_keyring(self, order: dict[str, Any], workdir: Path, progress: Any) -> str:
        """add_key(2) of a "user" key to the user key ring, as a task would leave data
        for the next requester's task."""
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        user_keyring = -4  # KEY_SPEC_USER_KEYRING
        data = b"requester A's data"
        done = libc.syscall(
            ctypes.c_long(248), b"user", b"left-by-a-task", data, ctypes.c_size_t(len(data)),
            ctypes.c_int(user_keyring),
        )  # fmt: skip
        if done < 0:
            return f"refused: {errno.errorcode.get(ctypes.get_errno(), ctypes.get_errno())}"
        return "added"

    def do_new_userns(self, order: dict[str, Any], workdir: Path, progress: Any) -> str:
        """unshare(CLONE_NEWUSER): a namespace in which the task could mount a tmpfs."""
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(0x10000000) != 0:
            return f"refused: {errno.errorcode.get(ctypes.get_errno(), ctypes.get_errno())}"
        return "made"

    def do_raw_thread(self, order: dict[str, Any], workdir: Path, progress: Any) -> str:
        """Leave a thread started with _thread (threading does not count it) that waits
        *after* seconds, then prints without end."""
        import _thread

        def spam() -> None:
            time.sleep(float(order.get("after", 0.0)))
            while True:
                os.write(2, b"s" * 65536)

        if order.get("c_only"):  # a thread that runs no Python frame: C code alone
            import collections
            import itertools

            sleeps = map(time.sleep, [float(order.get("after", 0.0))])
            writes = map(os.write, itertools.repeat(2), itertools.repeat(b"c" * 65536))
            _thread.start_new_thread(collections.deque, (itertools.chain(sleeps, writes), 0))
        else:
            _thread.start_new_thread(spam, ())
        return "left a thread"

    def do_keep_memory(self, order: dict[str, Any], workdir: Path, progress: Any) -> str:
        """Hold memory past the task outside the address-space limit: a memfd written to
        and kept open, or a System V shared-memory segment created and detached."""
        size = int(order.get("bytes", 1 << 20))
        if order.get("how") in ("memfd", "passed"):
            fd = os.memfd_create("kept")
            os.write(fd, b"k" * size)
            if order["how"] == "memfd":
                _KEPT.append(fd)
                return "kept a memfd"
            # passed through a socket pair (SCM_RIGHTS) and closed here: it lives on in
            # the socket, which no memfd listing shows
            ends = socket.socketpair(socket.AF_UNIX)
            socket.send_fds(ends[0], [b"m"], [fd])
            os.close(fd)
            _KEPT.extend(end.detach() for end in ends)
            return "kept a memfd"
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        ipc_private, ipc_creat = 0, 0o1000
        segment = libc.shmget(ipc_private, ctypes.c_size_t(size), ipc_creat | 0o600)
        if segment < 0:
            return f"shmget refused: {os.strerror(ctypes.get_errno())}"
        return "kept a segment"

    def do_leave_child(self, order: dict[str, Any], workdir: Path, progress: Any) -> str:
        pid = os.fork()
        if pid == 0:
            if order.get("close_fds"):  # holds no pipe of the worker's: nothing waits on it
                os.closerange(0, 65536)
            time.sleep(60)
            os._exit(0)
        if order.get("pid_file"):  # (unsandboxed: the test's own path)
            Path(order["pid_file"]).write_text(str(pid))
        if order.get("then_crash"):  # the worker dies under its task, the child lives on
            os._exit(9)
        return f"left a child {pid}" if order.get("say_pid") else "left a child"

    def do_lie_clean(self, order: dict[str, Any], workdir: Path, progress: Any) -> str:
        """Change the worker that runs this task (the process is the task's to change) so
        that its clean-up empties nothing and finds nothing left; then leave a child
        running (*child*) or *bytes* in a file of the work directory (*file*)."""
        worker = sys.modules["__main__"].Worker
        worker._left_behind = lambda _self: False
        worker._empty_task_dir = lambda _self: True
        if order.get("child") and os.fork() == 0:
            os.closerange(0, 65536)
            time.sleep(60)
            os._exit(0)
        if order.get("file"):
            (workdir / "left").write_bytes(b"x" * int(order["bytes"]))
        return "lied"

    def do_leave_grandchild(self, order: dict[str, Any], workdir: Path, progress: Any) -> str:
        """A double fork: the grandchild is no child of the worker's (init adopts it) but
        stays in its process group."""
        child = os.fork()
        if child == 0:
            if os.fork() == 0:
                os.closerange(0, 65536)
                Path(order["pid_file"]).write_text(str(os.getpid()))
                time.sleep(60)
            os._exit(0)
        os.waitpid(child, 0)
        deadline = time.monotonic() + 5
        while not Path(order["pid_file"]).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return "left a grandchild"


_REMEMBERED: list[str] = []  # what do_remember kept, for as long as the worker lives
_KEPT: list[int] = []  # the descriptors do_keep_memory kept open


def _run_task_locals() -> dict[str, Any]:
    """The worker's ``run_task`` frame's locals (its answer pipe, the task's id): a task can
    reach them, being in the same process."""
    frame = sys._getframe()
    while frame.f_code.co_name != "run_task":
        assert frame.f_back is not None
        frame = frame.f_back
    return frame.f_locals


def factory(cache_dir: Path) -> HostileRuntime:
    return HostileRuntime(cache_dir)
