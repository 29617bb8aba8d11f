"""The isolation a task runs in (2.3.5 Work Execution): bubblewrap, rlimits, failure reasons.

A dispatched task is code and data from a stranger. The daemon decrypts it (2.3.4) in its
own process, so no key ever enters a worker; the worker that runs it lives in a sandbox
built here:

* bubblewrap (``bwrap``) gives it new IPC, PID, network and UTS namespaces, so it has no
  network at all (only a loopback device that nothing listens on), sees only its own
  processes, and dies with the daemon (``--die-with-parent``); ``--new-session`` keeps it
  off the operator's terminal;
* the file system is an empty tmpfs root with ``/usr``, the library directories, a few
  files of ``/etc`` (the dynamic linker's cache, the time zone), the Python installation,
  the nodeclient package and the model cache (``/nodeclient/cache``, which only the daemon
  fills) bound **read-only**; ``/tmp`` is a private tmpfs of a bounded size
  (:meth:`Limits.tmp_size`; on disk in the slot's directory where bwrap is too old to
  size one); the only writable host directory is the slot's work directory
  (``/nodeclient/work``); nothing else of the node home, and so no key file, is inside
  (given the node home, :func:`make_layout` refuses any bind that would show it);
* it runs as an unprivileged uid (65534). Started by root, bwrap drops every capability
  but CAP_SETUID and CAP_SETGID (``--cap-drop ALL``: it would keep root's whole set
  otherwise), and the worker drops to 65534 as its first act, then enters the work
  directory (bwrap, without CAP_DAC_OVERRIDE, cannot), so the kernel counts its
  processes against RLIMIT_NPROC (the kernel exempts uid 0 from that limit, even inside a
  user namespace). Started by anyone else, bwrap maps the caller to 65534 in a new user
  namespace;
* GPU device nodes are bound only for the GPU assigned to the slot (``/dev/nvidia<minor>``,
  plus the driver's shared ``nvidiactl`` and ``nvidia-uvm`` nodes), and
  ``CUDA_VISIBLE_DEVICES`` names it by its UUID: CUDA counts only the cards whose device
  files it can open, so inside the sandbox the slot's card is CUDA's device 0, whatever
  its number outside (:func:`worker_env`).

The worker applies the resource limits itself (:func:`apply_limits`), before it imports
any runtime (a worker with a GPU without RLIMIT_AS: CUDA reserves tens of GB of address
space when it starts, and fails under a lower limit); it is started with an
``oom_score_adj`` of 1000 (:func:`oom_first`), so that the kernel's OOM killer takes
sandbox processes before the daemon. Without a working bwrap
the node refuses to run work unless the operator set ``allow_unsandboxed = true``; then
workers are plain subprocesses with the same limits.

This module builds argument vectors and interprets exit statuses; it starts nothing
except in :func:`probe` and :func:`tmpfs_size_supported` (``bwrap --version``).
"""

from __future__ import annotations

import functools
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from nodeclient.errors import NodeClientError, UsageError

MODE_BWRAP: Final = "bubblewrap"
MODE_UNSANDBOXED: Final = "unsandboxed"
SANDBOX_UID: Final = 65534  # "nobody": owns nothing on the host
SANDBOX_USER: Final = "nobody"
SANDBOX_GID: Final = 65534
TMP_FRACTION: Final = 8  # the sandbox's /tmp holds at most this share of the slot's memory
OOM_SCORE_ADJ: Final = 1000  # of every worker process: the OOM killer's first choice
# Where the work directory and the model cache appear inside; a name no installation
# lives under, so neither can hide another bind (an editable install often sits under
# /work or /home).
INSIDE_WORK: Final = Path("/nodeclient/work")
INSIDE_CACHE: Final = Path("/nodeclient/cache")
_LIB_DIRS: Final = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# What the dynamic linker and Python need from /etc; no passwd, hosts, resolv.conf or ssl.
_ETC_FILES: Final = (
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/alternatives",
)
# Bound into every sandbox whatever the layout; the node home must not be among them.
_SYSTEM_BINDS: Final = ("/usr", *_LIB_DIRS, *_ETC_FILES)
DEV: Final = Path("/dev")  # where the host's device files are (tests put fakes elsewhere)
# The driver's device files every CUDA process needs, besides its card's own
# /dev/nvidia<minor>; nvidia-uvm-tools only profilers need, so it is bound where present.
_GPU_REQUIRED_NODES: Final = ("nvidiactl", "nvidia-uvm")
_GPU_SHARED_NODES: Final = (*_GPU_REQUIRED_NODES, "nvidia-uvm-tools")
REFUSAL: Final = (
    "no working sandbox: install bubblewrap (`apt-get install bubblewrap`) "
    "or set allow_unsandboxed = true in config.toml"
)


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-worker resource limits; the worker sets them on itself before any task runs.

    ``memory_bytes`` becomes the hard RLIMIT_AS of a worker without a GPU; a task there
    that declares its RAM gets a lower soft limit for its duration. A worker with a GPU
    gets no RLIMIT_AS (see :func:`apply_limits`). ``nproc`` counts threads too (onnxruntime
    runs a pool per session), and in bubblewrap mode all slots share the sandbox uid.
    """

    memory_bytes: int
    nproc: int = 512
    nofile: int = 256
    fsize_bytes: int = 1 << 30
    cpu_seconds: int | None = None
    tmp_bytes: int | None = None  # the sandbox's /tmp; default: tmp_size()

    def __post_init__(self) -> None:
        if self.memory_bytes < 64 << 20:
            raise UsageError("the per-slot memory limit must be at least 64 MiB")
        if self.nproc < 16 or self.nofile < 32 or self.fsize_bytes < 1 << 20:
            raise UsageError("nproc >= 16, nofile >= 32 and fsize >= 1 MiB are required")
        if self.tmp_bytes is not None and self.tmp_bytes < 1 << 20:
            raise UsageError("the sandbox's /tmp must hold at least 1 MiB")

    def tmp_size(self) -> int:
        """Bytes the sandbox's /tmp may hold. Its pages are memory no rlimit counts (and
        the OOM killer does not see as a process's), so it gets a share of the slot's:
        1/TMP_FRACTION of it unless set."""
        if self.tmp_bytes is not None:
            return self.tmp_bytes
        return max(16 << 20, self.memory_bytes // TMP_FRACTION)

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> Limits:
        cpu = data.get("cpu_seconds")
        tmp = data.get("tmp_bytes")
        return cls(
            memory_bytes=int(data["memory_bytes"]),
            nproc=int(data["nproc"]),
            nofile=int(data["nofile"]),
            fsize_bytes=int(data["fsize_bytes"]),
            cpu_seconds=None if cpu is None else int(cpu),
            tmp_bytes=None if tmp is None else int(tmp),
        )


@dataclass(frozen=True, slots=True)
class SlotGpu:
    """The GPU a slot gets, as NVML reported it: its UUID (which CUDA_VISIBLE_DEVICES
    names), the minor number of its device file (``/dev/nvidia<minor>``) and its memory."""

    uuid: str
    minor: int
    vram_bytes: int

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Layout:
    """What one slot's worker sees: host paths to bind, and how to start Python."""

    workdir: Path  # host directory of this slot, writable, bound at INSIDE_WORK
    cache_dir: Path  # host model cache, bound read-only at INSIDE_CACHE
    read_only: tuple[Path, ...]  # Python installation, package source, extra import paths
    python_path: tuple[Path, ...]  # PYTHONPATH inside (package source first)
    python: Path = Path(sys.executable)
    gpus: tuple[SlotGpu, ...] = ()
    tmp_bytes: int | None = None  # size of the /tmp tmpfs; None: unbounded (the probe's)
    # A host directory bound at /tmp instead of a tmpfs: where bwrap cannot size one
    # (before 0.8), /tmp is on disk in the slot's directory rather than unbounded in RAM.
    tmp_dir: Path | None = None


def physical_memory_bytes() -> int:
    """Physical RAM of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True, slots=True)
class MemoryCgroup:
    """A memory cgroup this process is held by: its directory, and the names of its limit
    and usage files (cgroup v2 or v1)."""

    directory: Path
    limit_file: str  # memory.max (v2: "max" for none) or memory.limit_in_bytes (v1)
    usage_file: str  # memory.current (v2) or memory.usage_in_bytes (v1)


def cgroups_of(controller: str, proc_cgroup: Path, root: Path) -> Iterator[tuple[bool, Path]]:
    """The directories of the cgroups that hold this process for *controller* ("memory",
    "cpu"), as (cgroup v2, directory): for v2 and for v1's hierarchy of that controller,
    its own first and each one above it, up to the mount's root (in a container, the
    container's own cgroup). Nothing where *proc_cgroup* cannot be read."""
    try:
        lines = proc_cgroup.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and not controllers:
            v2, base = True, root
        elif controller in controllers.split(","):
            # v1 mounts cpu with cpuacct as "cpu,cpuacct", with a "cpu" link to it.
            v2 = False
            base = root / controller if (root / controller).is_dir() else root / controllers
        else:
            continue
        parts = [p for p in path.split("/") if p not in ("", ".", "..")]
        for depth in range(len(parts), -1, -1):  # its own first, the mount's root last
            yield v2, base.joinpath(*parts[:depth])


def memory_cgroups(
    proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")
) -> tuple[MemoryCgroup, ...]:
    """The memory cgroups that hold this process: its own (v2, and v1's ``memory``
    hierarchy) and each one above it, up to the mount's root, which in a container is
    the container's own cgroup. Those whose files cannot be read are left out."""
    found = []
    for v2, directory in cgroups_of("memory", proc_cgroup, root):
        files = (
            ("memory.max", "memory.current")
            if v2
            else ("memory.limit_in_bytes", "memory.usage_in_bytes")
        )
        if (directory / files[0]).is_file():
            found.append(MemoryCgroup(directory, *files))
    return tuple(found)


def _read_bytes_file(path: Path) -> int | None:
    """A cgroup file's number of bytes; None for "max" (no limit) or what cannot be read."""
    try:
        return int(path.read_text(encoding="ascii").strip())
    except (OSError, ValueError, UnicodeError):
        return None


def _cgroup_headroom(
    cgroups: tuple[MemoryCgroup, ...],
) -> tuple[int | None, int | None]:
    """(The smallest limit of *cgroups*, the least room left under any of them): None for
    either where none sets a limit. The room is a limit less its usage, without the page
    cache the kernel would reclaim first (``inactive_file`` of ``memory.stat``)."""
    limit = room = None
    for cgroup in cgroups:
        cap = _read_bytes_file(cgroup.directory / cgroup.limit_file)
        if cap is None:
            continue
        limit = cap if limit is None else min(limit, cap)
        used = _read_bytes_file(cgroup.directory / cgroup.usage_file)
        if used is not None:
            left = cap - max(0, used - _inactive_file(cgroup.directory))
            room = left if room is None else min(room, left)
    return limit, None if room is None else max(0, room)


def _inactive_file(directory: Path) -> int:
    """The cgroup's reclaimable page cache: v1's ``total_inactive_file`` (its whole
    subtree, as its usage counts), else v2's ``inactive_file`` (hierarchical there)."""
    try:
        text = (directory / "memory.stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return 0
    found = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if value.strip().isdigit():
            found[name] = int(value)
    return found.get("total_inactive_file", found.get("inactive_file", 0))


@functools.cache
def _own_memory_cgroups() -> tuple[MemoryCgroup, ...]:
    return memory_cgroups()  # a process does not change cgroup under a service manager


def cgroup_memory_limit() -> int | None:
    """The smallest memory limit of the cgroups that hold this process (a container's,
    systemd's ``MemoryMax=``), or None where none sets one."""
    return _cgroup_headroom(_own_memory_cgroups())[0]


def total_memory_bytes() -> int:
    """The RAM this process may use: the machine's, or less where a memory cgroup holds
    it (:func:`cgroup_memory_limit`)."""
    physical, limit = physical_memory_bytes(), cgroup_memory_limit()
    return physical if limit is None else min(physical, limit)


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping), or less
    where a memory cgroup holds this process and has less room left under its limit."""
    try:
        fd = os.open("/proc/meminfo", os.O_RDONLY | os.O_CLOEXEC)
        try:
            text = os.read(fd, 16384)
        finally:
            os.close(fd)
        start = text.index(b"MemAvailable:") + len(b"MemAvailable:")
        free = int(text[start : text.index(b"kB", start)]) * 1024
    except (OSError, ValueError):
        free = total_memory_bytes()
    _, room = _cgroup_headroom(_own_memory_cgroups())
    return free if room is None else min(free, room)


def process_tree_rss_bytes(pid: int) -> int | None:
    """Resident memory of *pid* and every process below it (``/proc/<pid>/task/*/children``),
    or None when *pid* itself cannot be read (gone). A process below it that exits while
    the tree is read counts for nothing, and so do its children on a kernel without the
    ``children`` files: then the figure is *pid*'s own, a lower bound."""
    page = os.sysconf("SC_PAGE_SIZE")
    total, todo, seen = 0, [pid], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            with open(f"/proc/{current}/statm", "rb") as statm:
                total += int(statm.read().split()[1]) * page
            threads = os.listdir(f"/proc/{current}/task")
        except (OSError, ValueError, IndexError):
            if current == pid:
                return None
            continue  # exited while the tree was read
        for tid in threads:
            try:
                with open(f"/proc/{current}/task/{tid}/children", "rb") as children:
                    todo.extend(int(child) for child in children.read().split())
            except (OSError, ValueError):  # a thread that has exited: no children to read
                continue
    return total


def default_limits(slots: int) -> Limits:
    """Each slot may use an equal share of the machine's RAM."""
    return Limits(memory_bytes=max(256 << 20, total_memory_bytes() // max(1, slots)))


def package_root() -> Path:
    """The directory holding the ``nodeclient`` package (a source tree when editable)."""
    return Path(__file__).resolve().parents[2]


def python_roots() -> tuple[Path, ...]:
    """The Python installation and site-packages, outermost paths only, /usr excluded."""
    candidates = {Path(sys.prefix), Path(sys.base_prefix), Path(sys.exec_prefix)}
    candidates.add(Path(sys.executable).resolve().parent.parent)
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        candidates.add(Path(sysconfig.get_paths()[key]))
    return _outermost(p.resolve() for p in candidates if p.exists())


def _outermost(paths: Iterable[Path]) -> tuple[Path, ...]:
    kept: list[Path] = []
    for path in sorted(set(paths), key=lambda p: len(p.parts)):
        if path == Path("/") or path.is_relative_to("/usr"):
            continue
        if not any(path.is_relative_to(k) for k in kept):
            kept.append(path)
    return tuple(kept)


def make_layout(
    *,
    workdir: Path,
    cache_dir: Path,
    extra_python_path: Sequence[Path] = (),
    gpus: Sequence[SlotGpu] = (),
    node_home: Path | None = None,
    tmp_bytes: int | None = None,
    tmpfs_size: bool = True,
) -> Layout:
    """The layout of one slot: this interpreter, this package, plus *extra_python_path*.

    *tmp_bytes* bounds the sandbox's /tmp: a tmpfs of that size, or, where bubblewrap
    cannot size a tmpfs (not *tmpfs_size*, see :func:`tmpfs_size_supported`), the
    directory ``tmp`` in *workdir*, on disk.

    With *node_home*, a layout that would put the home's key files inside the sandbox is
    refused (UsageError): see :func:`_check_home_hidden`.
    """
    pkg = package_root()
    extra = tuple(p.resolve() for p in extra_python_path)
    python = python_roots()
    read_only = _outermost([*python, pkg, *extra])
    for path in read_only:
        if path.is_relative_to(INSIDE_WORK.parent):
            raise UsageError(f"{path} collides with the sandbox's {INSIDE_WORK.parent}")
    if node_home is not None:
        kinds = dict.fromkeys(extra, "extra_python_path entry")
        kinds[pkg] = "nodeclient package"
        kinds.update(dict.fromkeys(python, "Python installation"))
        _check_home_hidden(
            node_home.resolve(),
            read_only=[(p, kinds[p]) for p in read_only],
            writable=[(workdir.resolve(), "work directory"), (cache_dir.resolve(), "model cache")],
        )
    return Layout(
        workdir=workdir,
        cache_dir=cache_dir,
        read_only=read_only,
        python_path=(pkg, *extra),
        gpus=tuple(gpus),
        tmp_bytes=tmp_bytes,
        tmp_dir=None if tmp_bytes is None or tmpfs_size else workdir / "tmp",
    )


# The other way out of a refusal, by what the offending bind is.
_ELSE_MOVE: Final = {
    "Python installation": ", or use a Python installed outside it (not in the home's tree)",
    "nodeclient package": ", or install nodeclient outside it",
    "extra_python_path entry": ", or take the entry out of extra_python_path",
}


def _check_home_hidden(
    home: Path, *, read_only: Sequence[tuple[Path, str]], writable: Sequence[tuple[Path, str]]
) -> None:
    """Refuse a bind that would show the node home inside the sandbox.

    Without root, bwrap maps the daemon's uid to the worker's, so the home's 0600 key files
    are readable by any task that can see them. A read-only bind may be neither the home,
    nor inside it, nor one of its ancestors; nor may the system directories every sandbox
    gets. The writable work directory and model cache may sit in their own directory
    inside the home (the model cache does by default), but may not be it or contain it.
    """
    system = [(Path(p).resolve(), "system directory") for p in _SYSTEM_BINDS if os.path.exists(p)]
    for path, kind in [*read_only, *system]:
        if home.is_relative_to(path):
            raise UsageError(
                f"the {kind} {path} is bound read-only into the sandbox and contains the node "
                f"home {home}, so tasks could read its key files; move the node home "
                f"(--home or NODECLIENT_HOME) out of {path}{_ELSE_MOVE.get(kind, '')}"
            )
        if path.is_relative_to(home):
            raise UsageError(
                f"the {kind} {path} is bound read-only into the sandbox and lies inside the "
                f"node home {home}, so tasks could see part of the home; move the node home "
                f"(--home or NODECLIENT_HOME) or the {kind} so that neither contains the other"
            )
    for path, kind in writable:
        if home.is_relative_to(path):
            raise UsageError(
                f"the {kind} {path} is bound into the sandbox and contains the node home "
                f"{home}, so tasks could read its key files; use a directory outside it"
            )


def worker_env(
    layout: Layout, *, threads: int | None = None, sandboxed: bool = True
) -> dict[str, str]:
    """The whole environment of a worker: nothing of the daemon's leaks in. *sandboxed*:
    whether it runs in the sandbox, as SANDBOX_UID (else as the daemon's user)."""
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": "/tmp",  # noqa: S108 (the sandbox's own private tmpfs)
        "LANG": "C.UTF-8",
        "PYTHONPATH": os.pathsep.join(str(p) for p in layout.python_path),
        "PYTHONNOUSERSITE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    # getpass.getuser() (which PyTorch's CUDA build calls while a slice runs, for its cache
    # directories) reads these before it looks the uid up, a lookup that fails in the
    # sandbox (no /etc/passwd) and for a uid without a passwd entry (a container's).
    env["USER"] = env["LOGNAME"] = SANDBOX_USER if sandboxed else _user_name()
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    if layout.gpus:
        # By UUID: a number would count among the cards the sandbox shows (only the
        # slot's), not among the host's. PCI bus order is NVML's, should a runtime count.
        env["CUDA_VISIBLE_DEVICES"] = ",".join(g.uuid for g in layout.gpus)
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    else:  # no card for this slot: CUDA sees none, unsandboxed (no device files bound) too
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _user_name() -> str:
    """The name of the user this process runs as, or ``uid<N>`` where it has none."""
    import pwd

    uid = os.getuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid{uid}"


def gpu_nodes(gpus: Sequence[SlotGpu], *, dev: Path | None = None) -> list[Path]:
    """Host device files a slot with *gpus* gets, those that exist; empty without a GPU
    (nothing is bound). *dev*: where the device files are (default DEV)."""
    if not gpus:
        return []
    root = DEV if dev is None else dev
    names = [*_GPU_SHARED_NODES, *(f"nvidia{g.minor}" for g in gpus)]
    return [root / name for name in names if os.path.exists(root / name)]


def missing_gpu_nodes(minors: Iterable[int], *, dev: Path | None = None) -> list[Path]:
    """The device files CUDA needs for the cards of *minors* that do not exist: the
    driver's ``nvidiactl`` and ``nvidia-uvm``, and each card's ``nvidia<minor>``. Empty
    without cards."""
    cards = [f"nvidia{minor}" for minor in dict.fromkeys(minors)]
    if not cards:
        return []
    root = DEV if dev is None else dev
    return [root / name for name in (*_GPU_REQUIRED_NODES, *cards) if not (root / name).exists()]


def gpu_nodes_problem(minors: Iterable[int], *, dev: Path | None = None) -> tuple[str, str] | None:
    """(what is missing, the fix) when the device files the cards of *minors* need are
    not all there, else None.

    NVML works without ``nvidia-uvm``, so the cards are found and declared; but CUDA cannot
    start in a worker without it, and neither the sandbox nor the systemd unit
    (NoNewPrivileges, ProtectKernelModules) lets a worker load the module or make its
    device files, as CUDA otherwise tries to: every GPU task would fail or run on the CPU.
    """
    missing = missing_gpu_nodes(minors, dev=dev)
    if not missing:
        return None
    names = ", ".join(str(path) for path in missing)
    summary = f"GPUs are declared, but {names} {'is' if len(missing) == 1 else 'are'} missing"
    # -c=0 below makes /dev/nvidia0; every other card's file needs its own -c=N.
    cards = [p.name for p in missing if p.name.removeprefix("nvidia").isdigit()]
    cards = [name for name in cards if name != "nvidia0"]
    fix = (
        "create the device files at boot, as root: `nvidia-modprobe -u -c=0` (it loads the "
        "nvidia-uvm module and makes /dev/nvidiactl, /dev/nvidia-uvm and /dev/nvidia0)"
    )
    if cards:
        more = ", ".join(f"`nvidia-modprobe -c={name.removeprefix('nvidia')}`" for name in cards)
        fix += f", then {more}"
    fix += (
        "; or have the nvidia-uvm module loaded at boot (/etc/modules-load.d/) where the "
        "driver's udev rules make its device files; then restart the node, which serves "
        "without its GPUs meanwhile"
    )
    return summary, fix


def bwrap_argv(
    layout: Layout,
    command: Sequence[str],
    *,
    env: Mapping[str, str],
    as_root: bool,
    bwrap: str = "bwrap",
    dev: Path | None = None,
) -> list[str]:
    """The bubblewrap command line that runs *command* in *layout*'s sandbox. *dev*: where
    the host's device files are (default DEV); they appear at /dev inside."""
    argv = [bwrap, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts"]
    argv += ["--unshare-cgroup-try", "--die-with-parent", "--new-session"]
    if as_root:  # the worker drops to SANDBOX_UID itself; then NPROC applies
        # bwrap started by root keeps every capability it has unless told otherwise:
        # the worker starts (interpreter, imports) with only the two it needs to drop.
        argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        argv += ["--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_GID)]
    argv += ["--clearenv"]
    for key, value in sorted(env.items()):
        argv += ["--setenv", key, value]
    argv += ["--ro-bind", "/usr", "/usr"]
    for name in _LIB_DIRS:
        if os.path.islink(name):
            argv += ["--symlink", os.readlink(name), name]
        elif os.path.isdir(name):
            argv += ["--ro-bind", name, name]
    # bwrap would create /etc 0700 root; the sandbox uid must traverse it (Debian's
    # /etc/alternatives links lead to shared libraries Blender needs, for one).
    argv += ["--perms", "0755", "--dir", "/etc"]
    for name in _ETC_FILES:
        argv += ["--ro-bind-try", name, name]
    argv += ["--proc", "/proc", "--dev", "/dev", *_tmp_mount(layout)]
    for node in gpu_nodes(layout.gpus, dev=dev):
        argv += ["--dev-bind", str(node), f"/dev/{node.name}"]
    # bwrap makes missing mount points 0700 root; the sandbox uid must traverse them.
    targets = [*layout.read_only, INSIDE_WORK, INSIDE_CACHE]
    for parent in sorted({p for t in targets for p in t.parents}, key=lambda p: len(p.parts)):
        if parent != Path("/"):
            argv += ["--perms", "0755", "--dir", str(parent)]
    for path in layout.read_only:
        argv += ["--ro-bind", str(path), str(path)]
    argv += ["--bind", str(layout.workdir), str(INSIDE_WORK)]
    # Read-only: the daemon alone stores models (workers have no network to fetch them),
    # so no task can plant a file under a model's hash or fill the disk through it.
    argv += ["--ro-bind", str(layout.cache_dir), str(INSIDE_CACHE)]
    # The root and /dev are tmpfs mounts bwrap made: without a user namespace they are
    # root's, but with one (a daemon not run as root) they are the task's own uid's, and
    # unbounded. Read-only, only the work directory and /tmp (bounded) are writable.
    argv += ["--remount-ro", "/dev", "--remount-ro", "/"]
    # Started by root, bwrap has no CAP_DAC_OVERRIDE left to enter the work directory
    # (SANDBOX_UID's, 0700): the worker enters it once it is that uid (worker.main).
    argv += ["--chdir", "/" if as_root else str(INSIDE_WORK), "--", *command]
    return argv


@functools.cache
def tmpfs_size_supported(bwrap: str = "bwrap") -> bool:
    """Whether *bwrap* can size a tmpfs (``--size``, bubblewrap 0.8.0 and later), by the
    version it reports; False when it cannot be asked."""
    try:
        done = subprocess.run(
            [bwrap, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return False
    found = re.search(r"(\d+)\.(\d+)", done.stdout)
    return found is not None and (int(found[1]), int(found[2])) >= (0, 8)


def oom_first(argv: Sequence[str]) -> list[str]:
    """*argv*, started with an ``oom_score_adj`` of OOM_SCORE_ADJ, so that the kernel's OOM
    killer takes a worker, and whatever its tasks start (they inherit it), before the
    daemon.

    A stopgap: RLIMIT_AS bounds each process, so a task that forks holds its slot's limit
    once per process; only a memory cgroup per slot would bound them together. A shell
    sets the value and then becomes *argv*. Started by root it holds CAP_SYS_RESOURCE
    (unless a container dropped it), so nothing in the sandbox can lower the value again:
    without that capability a process may lower it only down to what a privileged one
    last set. Otherwise a task could lower it to the daemon's own, no further.
    """
    script = f'echo {OOM_SCORE_ADJ} 2>/dev/null >/proc/self/oom_score_adj; exec "$@"'
    return ["/bin/sh", "-c", script, "sh", *argv]


def _tmp_mount(layout: Layout) -> list[str]:
    """The bwrap arguments that make the sandbox's /tmp."""
    if layout.tmp_dir is not None:  # on disk, emptied after every task like the work dir
        return ["--bind", str(layout.tmp_dir), "/tmp"]  # noqa: S108 (the slot's own)
    # A private, empty tmpfs of a bounded size: unbounded, its pages would be memory
    # beyond every limit, held for as long as the worker lives.
    size = [] if layout.tmp_bytes is None else ["--size", str(layout.tmp_bytes)]
    return ["--perms", "1777", *size, "--tmpfs", "/tmp"]  # noqa: S108


PROC_COVERED: Final = (
    "parts of /proc are covered here (systemd's ProtectKernelTunables= or ProtectKernelLogs=, "
    "or a container runtime's masks), so the kernel refuses the sandbox a /proc of its own: "
    "run the node without them (the unit from `nodeclient service install` has neither)"
)


SECCOMP_REFUSED: Final = (
    "the sandbox's seccomp filter cannot be installed here (it needs a kernel with seccomp "
    "filters, and no container profile that forbids seccomp(2))"
)
SCRATCH_FIX: Final = "free space there, or set TMPDIR to a directory with room"


class NoScratchSpace(NodeClientError):
    """No directory for task work ($TMPDIR, /tmp, /var/tmp) can be written: full, or
    read-only."""


def scratch_root() -> Path:
    """The directory task work directories are made in ($TMPDIR, else /tmp, ...), or
    NoScratchSpace saying what to do: Python's own error names no cause and no fix."""
    try:
        return Path(tempfile.gettempdir())
    except OSError as exc:  # "No usable temporary directory found in [...]"
        raise NoScratchSpace(
            f"no directory for task work can be written ({exc}): {SCRATCH_FIX}"
        ) from exc


def scratch_failed(where: Path, exc: OSError) -> NoScratchSpace:
    """The error for a work directory that could not be made in *where*."""
    return NoScratchSpace(
        f"cannot create a work directory in {where}: {exc.strerror or exc}; {SCRATCH_FIX}"
    )


def _found_bwrap() -> str | None:
    """bubblewrap's absolute path on the daemon's PATH, or None. Absolute even where PATH
    has a relative entry: workers start in their slot's directory."""
    found = shutil.which("bwrap")
    return os.path.abspath(found) if found else None


def bwrap_path() -> str:
    """The bubblewrap :func:`probe` tries ("bwrap" when there is none). Workers are started
    with this path: they are started with the sandbox's own PATH
    (/usr/local/bin:/usr/bin:/bin), where a bwrap installed elsewhere, in /opt or a home
    directory say, would not be found."""
    return _found_bwrap() or "bwrap"


def probe(bwrap: str | None = None, *, timeout: float = 10.0) -> tuple[bool, str]:
    """Whether bubblewrap works here: run ``true`` in the sandbox the workers would get.
    Raises NoScratchSpace when no scratch directory for it can be made."""
    found = bwrap or _found_bwrap()
    if found is None:
        return False, "bwrap is not on PATH"
    tmp = scratch_root()
    try:
        scratch_dir = tempfile.TemporaryDirectory(prefix="nodeclient-probe-", dir=tmp)
    except OSError as exc:
        raise scratch_failed(tmp, exc) from exc
    with scratch_dir as scratch:
        layout = Layout(
            workdir=Path(scratch),
            cache_dir=Path(scratch),
            read_only=(),
            python_path=(),
            tmp_bytes=(16 << 20) if tmpfs_size_supported(found) else None,
        )
        argv = bwrap_argv(
            layout, ["true"], env={"PATH": "/usr/bin:/bin"}, as_root=os.geteuid() == 0, bwrap=found
        )
        try:
            done = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            return False, f"bwrap failed to start: {exc}"
    if done.returncode != 0:
        err = done.stderr.decode("utf-8", "replace").strip().splitlines()
        why = f"bwrap does not work here: {err[-1] if err else done.returncode}"
        if err and "Can't mount proc" in err[-1]:
            why += f"; {PROC_COVERED}"
        return False, why
    from nodeclient.node import seccomp

    refused = seccomp.probe(timeout)
    if refused is not None:
        return False, f"{SECCOMP_REFUSED}: {refused}"
    return True, found


def choose_mode(*, allow_unsandboxed: bool, probed: tuple[bool, str] | None = None) -> str:
    """The sandbox mode to run in, or UsageError (the daemon refuses to run work)."""
    ok, why = probe() if probed is None else probed
    if ok:
        return MODE_BWRAP
    if allow_unsandboxed:
        return MODE_UNSANDBOXED
    raise UsageError(f"{REFUSAL} ({why})")


def describe_mode(mode: str) -> str:
    """The line ``nodeclient status`` shows."""
    return mode if mode == MODE_BWRAP else "UNSANDBOXED (allowed by config)"


# --- inside the worker --------------------------------------------------------------------


def drop_privileges(uid: int = SANDBOX_UID, gid: int = SANDBOX_GID) -> None:
    """Become *uid* for good: supplementary groups, gid, then uid (clears capabilities)."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getuid() != uid or os.geteuid() != uid:
        raise PermissionError("could not drop privileges")


def apply_limits(limits: Limits, *, address_space: bool = True) -> None:
    """Set this process's rlimits; soft and hard alike, so a task cannot raise them.

    Without *address_space* (a worker with a GPU) RLIMIT_AS is left as it is: CUDA
    reserves tens of GB of virtual address space when it starts (on the card's memory and
    the host's together) and fails with CUDA_ERROR_OUT_OF_MEMORY under a lower limit, after
    which PyTorch and ONNX Runtime run on the CPU. The RAM a task declares is still
    checked when it arrives (Executor.admission).
    """
    pairs = [(resource.RLIMIT_AS, limits.memory_bytes)] if address_space else []
    pairs += [
        (resource.RLIMIT_NPROC, limits.nproc),
        (resource.RLIMIT_NOFILE, limits.nofile),
        (resource.RLIMIT_FSIZE, limits.fsize_bytes),
        (resource.RLIMIT_CORE, 0),
    ]
    if limits.cpu_seconds is not None:
        pairs.append((resource.RLIMIT_CPU, limits.cpu_seconds))
    for which, value in pairs:
        resource.setrlimit(which, (value, value))


# --- after the worker ---------------------------------------------------------------------


def exit_signal(returncode: int, *, mode: str) -> int | None:
    """The signal that ended a worker, if one did (bwrap reports it as 128 + N)."""
    if returncode < 0:
        return -returncode
    if mode == MODE_BWRAP and returncode > 128:
        return returncode - 128
    return None


def describe_exit(returncode: int, *, mode: str) -> str:
    """Why a worker died under a task, as a Reject reason.

    A SIGKILL nobody in the daemon sent is the kernel's OOM killer (RLIMIT_AS makes most
    overruns a MemoryError, reported before the worker exits); any other signal is a crash.
    """
    sig = exit_signal(returncode, mode=mode)
    if sig == signal.SIGKILL:
        return "out of memory (worker killed by SIGKILL)"
    if sig is not None:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = "unknown"
        return f"crashed (signal {sig}, {name})"
    return f"crashed (worker exited with status {returncode})"
