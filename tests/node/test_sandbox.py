"""The sandbox holds (2.3.5 Work Execution): hostile tasks fail with a reason, the node serves on.

Each hostile task runs in the real bubblewrap sandbox through the real executor; after it,
a normal inference must still give OnnxRuntime's exact bytes.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodeclient.errors import NodeClientError, UsageError
from nodeclient.node import sandbox, slots
from nodeclient.node.exec_workdirs import chown_tree
from nodeclient.node.executor import TaskFailed
from tests.node.sandbox_harness import Node, warm_node


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    yield from warm_node(tmp_path_factory)


def _fails(node: Node, order: dict[str, object]) -> str:
    with pytest.raises(TaskFailed) as info:
        node.hostile(order)
    assert not info.value.requester_fault
    return info.value.reason


# --- the probe and the mode ---------------------------------------------------------------


def test_bubblewrap_works_on_this_machine() -> None:
    """The probe runs a command in the sandbox the workers get; here it must succeed."""
    ok, why = sandbox.probe()
    assert ok, why


def test_missing_bubblewrap_refuses_with_install_hint() -> None:
    """Without a sandbox and without allow_unsandboxed, the daemon refuses to run work."""
    with pytest.raises(UsageError) as info:
        sandbox.choose_mode(allow_unsandboxed=False, probed=(False, "bwrap is not on PATH"))
    assert "apt-get install bubblewrap" in str(info.value)
    assert "allow_unsandboxed" in str(info.value)


def test_allow_unsandboxed_falls_back_to_plain_workers() -> None:
    """The operator's explicit opt-in is the only way to run without bubblewrap."""
    mode = sandbox.choose_mode(allow_unsandboxed=True, probed=(False, "bwrap is not on PATH"))
    assert mode == sandbox.MODE_UNSANDBOXED
    assert sandbox.describe_mode(mode) == "UNSANDBOXED (allowed by config)"


def test_probe_reports_a_missing_binary(tmp_path: Path) -> None:
    """A bwrap that cannot run is reported, not trusted."""
    ok, why = sandbox.probe(str(tmp_path / "no-such-bwrap"))
    assert not ok
    assert "bwrap" in why


def test_probe_explains_a_covered_proc(tmp_path: Path) -> None:
    """Where parts of /proc are covered (systemd's ProtectKernelTunables=, a container's
    masks), bubblewrap cannot mount /proc: the reason says why and what to do. (The real
    failure, with the real bwrap, is in tests/node/test_service.py.)"""
    fake = tmp_path / "bwrap"
    fake.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = --version ]; then echo "bubblewrap 0.8.0"; exit 0; fi\n'
        'echo "bwrap: Can\'t mount proc on /newroot/proc: Operation not permitted" >&2\n'
        "exit 1\n"
    )
    fake.chmod(0o755)
    ok, why = sandbox.probe(str(fake))
    assert not ok
    assert why.startswith("bwrap does not work here: bwrap: Can't mount proc")
    assert "ProtectKernelTunables=" in why and "run the node without them" in why


# --- the node home stays outside ----------------------------------------------------------


def _home(tmp_path: Path) -> Path:
    home = tmp_path.resolve() / "home" / ".nodeclient"
    home.mkdir(parents=True)
    (home / "node.key").write_bytes(b"secret")
    return home


def test_layout_with_the_home_kept_out(tmp_path: Path) -> None:
    """The usual layout passes: the cache in its own directory of the home, work outside."""
    home = _home(tmp_path)
    layout = sandbox.make_layout(
        workdir=tmp_path / "work" / "slot-0", cache_dir=home / "models", node_home=home
    )
    assert layout.read_only
    for path in (*layout.read_only, layout.workdir):
        assert not home.is_relative_to(path)
        assert not path.is_relative_to(home)


def test_python_installed_around_the_home_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python under $HOME (pyenv, ~/bin/python3) whose tree holds the node home is refused:
    bound read-only, it would show the key files to every task."""
    home = _home(tmp_path)
    monkeypatch.setattr(sys, "base_prefix", str(tmp_path / "home"))
    with pytest.raises(UsageError) as info:
        sandbox.make_layout(workdir=tmp_path / "work", cache_dir=home / "models", node_home=home)
    message = str(info.value)
    assert f"Python installation {(tmp_path / 'home').resolve()}" in message
    assert "contains the node home" in message
    assert "move the node home" in message
    assert "or use a Python installed outside it" in message


@pytest.mark.parametrize(
    ("where", "match"),
    [
        ("extra=ancestor", "extra_python_path entry .* contains the node home"),
        ("extra=home", "extra_python_path entry .* contains the node home"),
        ("extra=inside", "extra_python_path entry .* lies inside the node home"),
        ("workdir=home", "work directory .* contains the node home"),
        ("cache=ancestor", "model cache .* contains the node home"),
    ],
)
def test_binds_that_show_the_home_are_refused(tmp_path: Path, where: str, match: str) -> None:
    """No bind may be the home or one of its ancestors, and no read-only bind inside it."""
    home = _home(tmp_path)
    paths = {"ancestor": tmp_path / "home", "home": home, "inside": home / "plugins"}
    paths["inside"].mkdir()
    kind, _, which = where.partition("=")
    kwargs: dict[str, Any] = {"workdir": tmp_path / "work", "cache_dir": home / "models"}
    if kind == "extra":
        kwargs["extra_python_path"] = [paths[which]]
    else:
        kwargs["workdir" if kind == "workdir" else "cache_dir"] = paths[which]
    with pytest.raises(UsageError, match=match):
        sandbox.make_layout(node_home=home, **kwargs)
    sandbox.make_layout(**kwargs)  # without a home nothing is checked: existing callers work


def test_home_under_usr_is_refused(tmp_path: Path) -> None:
    """Every sandbox sees /usr, so a node home there would be visible too."""
    with pytest.raises(UsageError, match="system directory /usr .* contains the node home"):
        sandbox.make_layout(
            workdir=tmp_path / "work",
            cache_dir=tmp_path / "models",
            node_home=Path("/usr/local/var/nodeclient"),
        )


# --- handing the model cache to the sandbox uid --------------------------------------------


def _sandbox_ids(monkeypatch: pytest.MonkeyPatch) -> tuple[int, int]:
    """65534 as root (as CI runs); otherwise our own ids, the only ones we may chown to."""
    if os.geteuid() == 0:
        return sandbox.SANDBOX_UID, sandbox.SANDBOX_GID
    monkeypatch.setattr(sandbox, "SANDBOX_UID", os.geteuid())
    monkeypatch.setattr(sandbox, "SANDBOX_GID", os.getegid())
    return os.geteuid(), os.getegid()


def _owners(directory: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(directory.parent)): (p.lstat().st_uid, p.lstat().st_gid)
        for p in [directory, *directory.rglob("*")]
    }


def test_chown_tree_never_follows_a_planted_symlink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Links a worker left in the cache are chowned themselves; what they point at is not."""
    ids = _sandbox_ids(monkeypatch)
    etc = tmp_path / "etc"
    (etc / "sub").mkdir(parents=True)
    (etc / "shadow").write_bytes(b"root:secret")
    (etc / "sub" / "file").write_bytes(b"x")
    before = _owners(etc)
    cache = tmp_path / "cache"
    (cache / "scenes").mkdir(parents=True)
    (cache / "scenes" / "a").write_bytes(b"a")
    (cache / "models").symlink_to(etc)
    (cache / "scenes" / "b").symlink_to(etc / "shadow")
    chown_tree(cache)
    assert _owners(etc) == before
    assert set(_owners(cache).values()) == {ids}  # the links included, via lchown


def test_chown_tree_follows_the_operators_link_to_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache directory itself may be a link the operator made (to a larger disk): it
    is followed to that directory, and links inside it still are not."""
    ids = _sandbox_ids(monkeypatch)
    big = tmp_path / "big" / "models"
    big.mkdir(parents=True)
    (big / "m").write_bytes(b"m")
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "shadow").write_bytes(b"root:secret")
    before = _owners(etc)
    (big / "planted").symlink_to(etc / "shadow")
    (tmp_path / "models").symlink_to(big)
    chown_tree(tmp_path / "models")
    assert set(_owners(big).values()) == {ids}
    assert _owners(etc) == before


def test_chown_tree_refuses_a_cache_that_is_not_a_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file where the cache should be is refused with a one-line reason."""
    _sandbox_ids(monkeypatch)
    (tmp_path / "models").write_bytes(b"not a directory")
    with pytest.raises(NodeClientError, match="is not a directory"):
        chown_tree(tmp_path / "models")


# --- what the sandbox looks like from inside -----------------------------------------------


def test_task_runs_unprivileged_with_a_minimal_environment(node: Node) -> None:
    """uid 65534, a cleared environment, and a root with only the expected directories.
    The task can still name its user (getpass.getuser(), which PyTorch's CUDA build calls
    while a slice runs; there is no /etc/passwd to look the uid up in)."""
    seen = json.loads(node.hostile({"do": "whoami"}))
    assert seen["uid"] == seen["euid"] == sandbox.SANDBOX_UID
    assert seen["user"] == "nobody"
    assert set(seen["env"]) <= {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "LANG",
        "PYTHONPATH",
        "PYTHONNOUSERSITE",
        "PYTHONDONTWRITEBYTECODE",
        "OMP_NUM_THREADS",
        "CUDA_VISIBLE_DEVICES",
        "PWD",
    }
    assert seen["env"]["CUDA_VISIBLE_DEVICES"] == ""  # no GPU assigned: every card hidden
    assert seen["cwd"] == seen["workdir"] == str(sandbox.INSIDE_WORK / "task")
    # The directory the worker starts in is not on its import path (python -P): tasks
    # write the work directory, and "-m" would import from there before the stdlib.
    for start in ("", "/", str(sandbox.INSIDE_WORK)):
        assert start not in seen["sys_path"], seen["sys_path"]
    layout = sandbox.make_layout(
        workdir=node.home,
        cache_dir=node.home,
        extra_python_path=node.executor.config.extra_python_path,
    )
    bound = {path.parts[1] for path in layout.read_only}
    system = {"usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "proc", "dev", "tmp"}
    assert set(seen["root"]) <= system | bound | {sandbox.INSIDE_WORK.parts[1]}


def test_task_directory_is_empty_at_every_start(node: Node) -> None:
    """Files a task leaves behind are gone before the next task starts."""
    node.hostile({"do": "write", "path": "leftover.txt"})
    listed = json.loads(node.hostile({"do": "listdir", "path": "."}))
    assert listed == []


def test_files_beside_the_task_directory_are_gone_before_the_next_task(node: Node) -> None:
    """The whole work directory is writable: what a task writes beside its own directory
    (``../leak.txt``) is removed after it too, so the next task on the same worker (the
    same job's, or another requester's inference of the same model) never reads it."""
    work = str(sandbox.INSIDE_WORK)
    before = json.loads(node.hostile({"do": "listdir", "path": work}))
    assert node.hostile({"do": "write", "path": f"{work}/leak.txt"}) == b'"written"'
    starts = len(node.executor.start_seconds)
    assert json.loads(node.hostile({"do": "listdir", "path": work})) == before
    assert len(node.executor.start_seconds) == starts  # emptied, not replaced
    _fails(node, {"do": "read", "path": f"{work}/leak.txt"})


def test_a_task_directory_swapped_for_a_symlink_gets_a_fresh_worker(node: Node) -> None:
    """A task that leaves a symlink where its directory was, to a directory it prepared,
    does not choose where the next task starts: its worker is replaced, and the next task
    starts in an empty directory of its own, with nothing beside it."""
    work = str(sandbox.INSIDE_WORK)
    before = json.loads(node.hostile({"do": "listdir", "path": work}))
    starts = len(node.executor.start_seconds)
    assert node.hostile({"do": "swap_task_dir"}) == b'"swapped"'
    assert json.loads(node.hostile({"do": "listdir", "path": "."})) == []
    assert json.loads(node.hostile({"do": "listdir", "path": work})) == before
    assert len(node.executor.start_seconds) == starts + 1


# --- hostile tasks ---------------------------------------------------------------------------


def test_network_is_unreachable(node: Node) -> None:
    """A task cannot connect to a server listening on the host's loopback."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        port = server.getsockname()[1]
        reason = _fails(node, {"do": "connect", "host": "127.0.0.1", "port": port})
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing ever arrived
    assert "Connection" in reason or "unreachable" in reason
    node.inference_still_works()


def test_no_socket_family_outside_the_network_namespace(node: Node) -> None:
    """AF_VSOCK (to the hypervisor and the host's agents) is no namespace's: the worker's
    seccomp filter refuses it, and every family but AF_UNIX, AF_INET, AF_INET6 and
    AF_NETLINK; those still work (in the sandbox's empty network namespace). Nor can a
    task make a user namespace of its own, where it could mount a tmpfs beyond its limits.
    Threads and child processes (clone3 falls back to clone) still run."""
    vsock, packet = 40, 17
    assert node.hostile({"do": "socket", "family": vsock}) == b'"refused: EAFNOSUPPORT"'
    assert node.hostile({"do": "socket", "family": packet}) == b'"refused: EAFNOSUPPORT"'
    for family in (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6):
        assert node.hostile({"do": "socket", "family": int(family)}) == b'"made"'
    assert node.hostile({"do": "new_userns"}) == b'"refused: EPERM"'
    node.hostile({"do": "leave_child"})  # a fork: still allowed
    node.inference_still_works()  # ONNX Runtime's threads


def test_no_disk_reserved_past_the_file_size_limit(node: Node) -> None:
    """fallocate with FALLOC_FL_KEEP_SIZE reserves blocks without growing the file, so no
    file-size limit sees them: one call could take the whole disk the work directory is
    on (the outbox's too) before the next disk check. The filter refuses every mode but
    0, which the file-size limit does see (a task's own files are written as before)."""
    keep_size = json.loads(node.hostile({"do": "fallocate", "mode": 1, "bytes": 1 << 30}))
    assert keep_size == {"refused": errno.errorcode[errno.EOPNOTSUPP]}
    plain = json.loads(node.hostile({"do": "fallocate", "mode": 0, "bytes": 1 << 20}))
    assert plain == {"on_disk": 1 << 20}
    node.inference_still_works()


def test_no_kernel_key_ring_to_leave_data_in(node: Node) -> None:
    """No namespace of the sandbox has key rings of its own: a key added to the user key
    ring would wait, past the task, for the next requester's task in any slot, and for the
    host's processes of the sandbox's uid. The calls are not there."""
    assert node.hostile({"do": "keyring"}) == b'"refused: ENOSYS"'
    node.inference_still_works()


def test_system_directories_are_read_only(node: Node) -> None:
    """Writing into /usr fails because it is mounted read-only (EROFS comes before any
    permission check): not merely because the task's uid may not write there, which a
    read-write mount would also give."""
    reason = _fails(node, {"do": "write", "path": "/usr/lib/planted"})
    assert "Read-only file system" in reason
    assert not Path("/usr/lib/planted").exists()
    node.inference_still_works()


def test_node_home_is_invisible(node: Node) -> None:
    """The node home does not exist inside: writing there fails."""
    reason = _fails(node, {"do": "write", "path": str(node.home / "planted")})
    assert "No such file or directory" in reason
    assert not (node.home / "planted").exists()


def test_key_files_cannot_be_read(node: Node) -> None:
    """Reading the node's key file by its real path fails: it is not there."""
    reason = _fails(node, {"do": "read", "path": str(node.home / "node.key")})
    assert "No such file or directory" in reason  # not there at all: not merely unreadable
    node.inference_still_works()


def test_tmp_is_private(node: Node) -> None:
    """What a task writes to /tmp never reaches the host's /tmp."""
    name = f"/tmp/nodeclient-sandbox-test-{uuid.uuid4().hex}"
    assert node.hostile({"do": "write", "path": name}) == b'"written"'
    assert not Path(name).exists()


def test_fork_bomb_is_bounded(node: Node) -> None:
    """Forking without end hits RLIMIT_NPROC; the node and the next task are fine."""
    reason = _fails(node, {"do": "fork_bomb"})
    assert "Resource temporarily unavailable" in reason or "BlockingIOError" in reason
    node.inference_still_works()


def test_memory_hog_is_out_of_memory(node: Node) -> None:
    """Allocating 10 GB under a 2 GiB limit fails as "out of memory"."""
    reason = _fails(node, {"do": "alloc", "bytes": 10 * 10**9})
    assert reason.startswith("out of memory")
    node.inference_still_works()


def test_endless_printing_hits_the_output_limit(node: Node) -> None:
    """A task that prints forever is killed once it passes the output cap."""
    reason = _fails(node, {"do": "print_forever"})
    assert reason.startswith("output limit exceeded")
    node.inference_still_works()


def test_huge_file_hits_the_file_size_limit(node: Node) -> None:
    """A file past RLIMIT_FSIZE fails the write (EFBIG) instead of filling the disk."""
    reason = _fails(node, {"do": "big_file"})
    assert "File too large" in reason
    node.inference_still_works()


@pytest.mark.parametrize("c_only", [False, True])
def test_a_raw_thread_left_behind_gets_a_fresh_worker(node: Node, c_only: bool) -> None:
    """A thread started with _thread.start_new_thread, which threading.active_count does
    not count, left running by a task (one running only C code has no Python frame
    either): its worker is replaced all the same, and the next task of the job is not
    blamed for what that thread prints."""
    node.hostile({"do": "echo"})
    starts = len(node.executor.start_seconds)
    order = {"do": "raw_thread", "after": 0.3, "c_only": c_only}
    assert node.hostile(order) == b'"left a thread"'
    assert node.hostile({"do": "echo", "data": "next"}) == b"next"
    assert len(node.executor.start_seconds) == starts + 1


def test_processes_left_behind_get_a_fresh_worker(node: Node) -> None:
    """A task that leaves a child running still returns, and its worker is replaced."""
    node.hostile({"do": "echo"})  # the worker has run this job's tasks: it is not replaced
    starts = len(node.executor.start_seconds)
    assert node.hostile({"do": "leave_child"}) == b'"left a child"'
    node.inference_still_works()
    assert len(node.executor.start_seconds) == starts + 1


@pytest.mark.parametrize("left", [{"child": True}, {"file": True, "bytes": 4 << 20}])
def test_what_a_task_leaves_gets_a_fresh_worker_even_if_its_report_says_clean(
    node: Node, left: dict[str, object]
) -> None:
    """The clean-up report comes from the process that ran the task, which the task can
    change: one that makes it report clean whatever it left (a process running, bytes in
    the work directory) is seen from outside, and its worker replaced at once, not when
    another job's task comes: the process and the bytes go with it (an idle slot's
    leftovers would take the CPU, the disk, and the process limit its uid shares with the
    other slots)."""
    node.hostile({"do": "echo"})  # the worker has run this job's tasks: it is not replaced
    starts = len(node.executor.start_seconds)
    assert node.hostile({"do": "lie_clean", **left}) == b'"lied"'
    assert "left" not in json.loads(node.hostile({"do": "listdir"}))  # the same job's
    assert len(node.executor.start_seconds) == starts + 1
    (slot,) = node.executor._slots
    assert slot.proc is not None and len(slots.descendants(slot.proc.pid)) == 2
    node.inference_still_works()


@pytest.mark.parametrize("how", ["memfd", "passed", "sysv"])
def test_memory_kept_past_the_task_gets_a_fresh_worker(node: Node, how: str) -> None:
    """A task that keeps memory no limit counts (a memfd left open, a System V segment in
    the sandbox's IPC namespace) held it for as long as its worker lived, through other
    jobs' tasks: the worker is replaced, which frees it."""
    node.hostile({"do": "echo"})
    starts = len(node.executor.start_seconds)
    order = {"do": "keep_memory", "how": how, "bytes": 8 << 20}
    assert node.hostile(order) == (b'"kept a segment"' if how == "sysv" else b'"kept a memfd"')
    assert node.hostile({"do": "echo", "data": "next"}) == b"next"
    assert len(node.executor.start_seconds) == starts + 1


def test_a_machine_that_refuses_the_seccomp_filter_is_no_sandbox(tmp_path: Path) -> None:
    """Where the filter cannot be installed (here: under a filter that refuses seccomp(2),
    as some container profiles do), every worker would fail at start: the probe says so,
    so the daemon does not offer sandboxed work it cannot run, and doctor fails it."""
    script = (
        "import errno, sys\n"
        "from nodeclient.node import doctor, sandbox, seccomp as sc\n"
        "assert sc.probe() is None\n"
        "sc.install(sc._assemble([(sc._LD_ABS_W, 0, 0, sc._NR), (sc._JEQ, 0, 1, 317),\n"
        "    (sc._RET, 0, 0, sc._ERRNO | errno.EPERM), (sc._RET, 0, 0, sc.ALLOW)]))\n"
        "ok, why = sandbox.probe()\n"
        "check = doctor.check_sandbox()\n"
        "print(ok, why, check.level.name, check.summary, sep='|')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    ok, why, level, summary = done.stdout.strip().split("|")
    assert ok == "False" and why.startswith(sandbox.SECCOMP_REFUSED)
    assert "Operation not permitted" in why
    assert level == "FAIL" and summary.startswith(sandbox.SECCOMP_REFUSED)
