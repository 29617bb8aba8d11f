"""A seccomp filter the sandboxed worker installs before it runs any task (2.3.5).

bubblewrap's namespaces leave two ways out that no namespace closes:

- socket families that are not namespaced, above all ``AF_VSOCK``: a task could talk to
  the hypervisor and the host's agents (CID 2), or take their ports. Only ``AF_UNIX``,
  ``AF_INET``, ``AF_INET6`` (in the sandbox's empty network namespace) and
  ``AF_NETLINK`` sockets may be made; any other family is ``EAFNOSUPPORT``;
- new user namespaces (``unshare`` or ``clone`` with ``CLONE_NEWUSER``), in which a task
  could mount a tmpfs of its own, memory beyond every limit: ``EPERM``;
- ``fallocate`` with any mode but 0: ``FALLOC_FL_KEEP_SIZE`` reserves a file's blocks
  without growing it, so neither ``RLIMIT_FSIZE`` nor the work directory's size as seen
  between two disk checks would stop one call from taking the whole disk:
  ``EOPNOTSUPP`` (the C library's ``posix_fallocate`` and SQLite use mode 0);
- the kernel's key rings (``add_key``, ``request_key``, ``keyctl``): no namespace of the
  sandbox has its own, so a key added by one task would wait, past the task, for the next
  requester's in any slot, and for the host's processes of the same uid: ``ENOSYS``, as
  under Docker's default filter.

``clone3`` answers ``ENOSYS`` (its flags sit in memory a filter cannot read), so the C
library falls back to ``clone``, as under Docker's and systemd's filters; the
``io_uring`` calls do too (an io_uring can make sockets without a ``socket`` call), and
so do x32-ABI calls. Everything else is allowed: this is a fence around the sandbox's
gaps, not a whitelist of what runtimes may do.

The classic-BPF program is assembled here (a few dozen instructions, Linux x86_64 only,
which the project targets) and installed with ``seccomp(SECCOMP_SET_MODE_FILTER,
SECCOMP_FILTER_FLAG_TSYNC)``, so that it holds in every thread the worker has already
started (its runtimes' thread pools) and in every process a task starts.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
import subprocess
import sys
from typing import Final

# <linux/filter.h>, <linux/seccomp.h>, <linux/audit.h>
_LD_ABS_W: Final = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ: Final = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGE: Final = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_JSET: Final = 0x45  # BPF_JMP | BPF_JSET | BPF_K
_RET: Final = 0x06  # BPF_RET | BPF_K
ALLOW: Final = 0x7FFF0000
_KILL_PROCESS: Final = 0x80000000
_ERRNO: Final = 0x00050000
_ARCH_X86_64: Final = 0xC000003E
_X32_BIT: Final = 0x40000000
# struct seccomp_data: nr, arch, instruction_pointer, args[6] (the low half of args[0]
# at 16 on a little-endian machine)
_NR: Final = 0
_ARCH: Final = 4
_ARG0: Final = 16
_ARG1: Final = 24

# x86_64 system call numbers
SOCKET: Final = 41
SOCKETPAIR: Final = 53
CLONE: Final = 56
UNSHARE: Final = 272
CLONE3: Final = 435
IO_URING: Final = (425, 426, 427)  # io_uring_setup, io_uring_enter, io_uring_register
KEYRINGS: Final = (248, 249, 250)  # add_key, request_key, keyctl
FALLOCATE: Final = 285
_SECCOMP: Final = 317
_SET_MODE_FILTER: Final = 1
_FLAG_TSYNC: Final = 1
_PR_SET_NO_NEW_PRIVS: Final = 38

ALLOWED_FAMILIES: Final = (
    1,  # AF_UNIX
    2,  # AF_INET
    10,  # AF_INET6
    16,  # AF_NETLINK
)
CLONE_NEWUSER: Final = 0x10000000

Instruction = tuple[int, "str | int", "str | int", int]


def _assemble(program: list[Instruction | str]) -> bytes:
    """Pack *program* (instructions, and label strings marking where they are) as
    struct sock_filter entries; a jump names its target label, always a later one."""
    labels: dict[str, int] = {}
    count = 0
    for item in program:
        if isinstance(item, str):
            labels[item] = count
        else:
            count += 1
    out = []
    index = 0
    for item in program:
        if isinstance(item, str):
            continue
        code, jt, jf, k = item
        offsets = []
        for target in (jt, jf):
            offset = labels[target] - index - 1 if isinstance(target, str) else target
            if not 0 <= offset <= 255:
                raise ValueError(f"jump from {index} to {target!r} is out of range")
            offsets.append(offset)
        out.append(struct.pack("=HBBI", code, offsets[0], offsets[1], k))
        index += 1
    return b"".join(out)


def program() -> bytes:
    """The filter, as the kernel takes it (an array of struct sock_filter)."""
    p: list[Instruction | str] = [
        (_LD_ABS_W, 0, 0, _ARCH),
        (_JEQ, 1, 0, _ARCH_X86_64),
        (_RET, 0, 0, _KILL_PROCESS),  # another ABI's calls: nothing here makes them
        (_LD_ABS_W, 0, 0, _NR),
        (_JGE, "enosys", 0, _X32_BIT),
        (_JEQ, "family", 0, SOCKET),
        (_JEQ, "family", 0, SOCKETPAIR),
        (_JEQ, "userns", 0, UNSHARE),
        (_JEQ, "userns", 0, CLONE),
        (_JEQ, "enosys", 0, CLONE3),
        (_JEQ, "fallocate", 0, FALLOCATE),
        *[(_JEQ, "enosys", 0, nr) for nr in (*IO_URING, *KEYRINGS)],
        (_RET, 0, 0, ALLOW),
        "fallocate",
        (_LD_ABS_W, 0, 0, _ARG1),  # its mode (an int)
        (_JEQ, "allow", 0, 0),
        (_RET, 0, 0, _ERRNO | errno.EOPNOTSUPP),
        "family",
        (_LD_ABS_W, 0, 0, _ARG0),
        *[(_JEQ, "allow", 0, family) for family in ALLOWED_FAMILIES],
        (_RET, 0, 0, _ERRNO | errno.EAFNOSUPPORT),
        "userns",
        (_LD_ABS_W, 0, 0, _ARG0),
        (_JSET, "eperm", "allow", CLONE_NEWUSER),
        "eperm",
        (_RET, 0, 0, _ERRNO | errno.EPERM),
        "enosys",
        (_RET, 0, 0, _ERRNO | errno.ENOSYS),
        "allow",
        (_RET, 0, 0, ALLOW),
    ]
    return _assemble(p)


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


def install(code: bytes | None = None) -> None:
    """Install the filter (or the program *code*) in this process, all its threads and
    its future children.

    Raises OSError when the kernel refuses it (no seccomp, an unknown flag): the worker
    then does not start, rather than run tasks with the gaps open.
    """
    if platform.machine() != "x86_64":
        raise OSError(errno.ENOTSUP, f"the seccomp filter is for x86_64, not {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:  # set by bubblewrap already
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    code = program() if code is None else code
    buffer = ctypes.create_string_buffer(code, len(code))
    fprog = _SockFprog(len(code) // 8, ctypes.addressof(buffer))
    libc.syscall.restype = ctypes.c_long
    done = libc.syscall(
        ctypes.c_long(_SECCOMP), ctypes.c_long(_SET_MODE_FILTER), ctypes.c_long(_FLAG_TSYNC),
        ctypes.byref(fprog),
    )  # fmt: skip
    if done != 0:  # > 0: a thread that could not take it (TSYNC); < 0: errno
        err = ctypes.get_errno() if done < 0 else errno.EBUSY
        raise OSError(err, f"seccomp filter not installed: {os.strerror(err)}")


def probe(timeout: float = 10.0) -> str | None:
    """Whether the filter installs on this machine, tried in a child process: None if it
    does, else why not (a kernel without seccomp filters, a container profile that
    forbids seccomp(2)). Every sandboxed worker installs it, and one that cannot never
    starts, so the daemon asks before it offers sandboxed work."""
    code = "from nodeclient.node import seccomp; seccomp.install()"
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"the seccomp check could not run: {exc}"
    if done.returncode == 0:
        return None
    lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
    return lines[-1] if lines else f"the seccomp check exited with {done.returncode}"
