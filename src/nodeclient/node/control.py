"""The local control socket: ``nodeclient status`` reads the running daemon through it.

A Unix socket in the node home, mode 0600 (created under a restrictive umask, never
chmod-ed afterwards), speaking one JSON request line and one JSON response line.

A Unix socket's address holds at most SOCKET_PATH_MAX bytes, and a node home may be
deeper than that leaves room for. Such a socket is bound and reached through an open
descriptor of the home (``/proc/self/fd/N/control.sock``, a few dozen bytes whatever the
home's length); every message names its real path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Final

from nodeclient.errors import NodeClientError, UsageError

SOCKET_NAME: Final = "control.sock"
MAX_REQUEST: Final = 4096
MAX_ANSWER: Final = 1 << 20  # a status is a few KiB; a history of transitions, tens
SOCKET_PATH_MAX: Final = 107  # the longest path a Unix socket may have (sun_path, its NUL)
STATUS_TRANSITIONS: Final = 10  # the latest state transitions a status answer holds
REQUEST_WAIT_S = 5.0  # how long a client may take to send its request line
# The open descriptors of this process, each a name for the file it holds (Linux /proc).
_FD_DIR: Final = "/proc/self/fd"

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]

log = logging.getLogger("nodeclient.node")


class DaemonNotRunning(NodeClientError):
    """No daemon answers on the control socket."""


class DaemonBusy(DaemonNotRunning):
    """The daemon accepted the request but did not answer in time.

    A kind of :class:`DaemonNotRunning` (no answer either way) so that callers that retry
    a missing daemon, such as the status console, retry a busy one too.
    """


async def serve(path: Path, handler: Handler) -> asyncio.AbstractServer:
    """Listen on *path* (replacing a stale socket left by a killed daemon)."""
    with contextlib.suppress(FileNotFoundError):
        if path.is_socket():
            path.unlink()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Every client gets an answer and a closed connection, whatever happens: an
        # unanswered one would wait out its timeout and report a busy daemon.
        try:
            try:
                response = await _answer(reader, handler)
                data = json.dumps(response, default=str).encode() + b"\n"
            except ConnectionError:  # the client went away: nobody to answer
                return
            except asyncio.CancelledError:
                # The daemon is stopping with this client still connected. Ended here,
                # quietly: asyncio's own callback for a client task would otherwise log
                # the cancellation as an error, a traceback in the middle of the JSON log.
                return
            except Exception as exc:  # a bug: answer, log it, and keep serving
                error = f"{type(exc).__name__}: {exc}"[:300]
                log.exception("control.error", extra={"error": error})
                response = {"error": f"internal error: {type(exc).__name__}"}
                data = json.dumps(response).encode() + b"\n"
            writer.write(data)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        finally:
            writer.close()

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    address = str(path)
    old = os.umask(0o177)  # the socket is created 0600
    try:
        with _address(path) as address:
            sock.bind(address)
    except OSError as exc:  # a file there; a path too long, where /proc is not mounted
        sock.close()
        raise UsageError(
            f"cannot create the control socket {path}: {exc.strerror or exc}"
            + (
                _too_long(path)
                if _over_limit(address)
                else "; remove what is there if no daemon runs for this home"
            )
        ) from exc
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    try:
        return await asyncio.start_unix_server(on_client, sock=sock)
    except BaseException:
        sock.close()
        raise


def reaches_deep_sockets() -> bool:
    """Whether a socket whose path is over SOCKET_PATH_MAX bytes can be bound and reached
    here, through a descriptor of its directory (/proc is mounted)."""
    return os.path.isdir(_FD_DIR)


def _over_limit(address: str) -> bool:
    return len(os.fsencode(address)) > SOCKET_PATH_MAX


def _too_long(path: Path) -> str:
    return (
        f"; its path is {len(os.fsencode(path))} bytes, over the {SOCKET_PATH_MAX} a Unix "
        "socket allows, and /proc/self/fd, which would give it a shorter name, is not "
        "available: use a shorter --home"
    )


@contextlib.contextmanager
def _address(path: Path) -> Iterator[str]:
    """The address to bind or connect the socket at *path* by.

    *path* itself where it fits in a Unix socket's address; otherwise the same file
    reached through a descriptor of its directory, open while the block runs. Where
    /proc is not mounted (or the directory cannot be opened), *path* itself, and bind
    or connect then says what is wrong with it.
    """
    plain = str(path)
    if not _over_limit(plain):
        yield plain
        return
    try:
        fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        yield plain
        return
    try:
        directory = f"{_FD_DIR}/{fd}"
        yield f"{directory}/{path.name}" if os.path.isdir(directory) else plain
    finally:
        os.close(fd)


async def _answer(reader: asyncio.StreamReader, handler: Handler) -> dict[str, Any]:
    """The response to one request line; a bad request is answered ``{"error": ...}``."""
    try:
        async with asyncio.timeout(REQUEST_WAIT_S):  # not wait_for: 3.11 may drop a cancel
            line = await reader.readline()
        if len(line) > MAX_REQUEST:
            raise ValueError("request too large")
        request = json.loads(line or b"{}")
        if not isinstance(request, dict):
            raise ValueError("request must be an object")  # noqa: TRY004 - answered, not raised on
    except RecursionError:  # "[[[[...": nested deeper than any request
        return {"error": "request nested too deeply"}
    except TimeoutError:  # its text is empty: the answer says what happened
        return {"error": f"no whole request line (ended by a newline) within {REQUEST_WAIT_S:g} s"}
    except ValueError as exc:
        return {"error": str(exc)}
    try:
        return await handler(request)
    except TimeoutError as exc:
        return {"error": str(exc) or "the daemon timed out answering"}
    except ValueError as exc:
        return {"error": str(exc)}


def _not_finite(text: str) -> float:
    raise ValueError(f"{text} is not a number an answer may hold")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is too large for a float")
    return value


def request(path: Path, payload: dict[str, Any], *, timeout: float = 5.0) -> dict[str, Any]:
    """One request to the daemon.

    DaemonNotRunning if nothing listens (no socket, or a stale one a killed daemon left),
    DaemonBusy if it does not answer within *timeout* seconds; any other socket error is
    one NodeClientError too, so that ``nodeclient status`` prints one line.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deadline = time.monotonic() + timeout  # for the whole exchange, not each read
    sock.settimeout(timeout)
    try:
        with _address(path) as address:
            try:
                sock.connect(address)
            except (FileNotFoundError, ConnectionRefusedError):
                raise DaemonNotRunning(
                    f"no node daemon is running for this home ({path} does not answer); "
                    "start it with `nodeclient run`"
                ) from None
            except OSError as exc:
                if not _over_limit(address):
                    raise
                # Not the daemon's fault: no daemon could listen there either.
                raise DaemonNotRunning(
                    f"cannot reach the control socket {path}{_too_long(path)}"
                ) from exc
        sock.sendall(json.dumps(payload).encode() + b"\n")
        buf = bytearray()
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
            if len(buf) > MAX_ANSWER:
                raise DaemonNotRunning(
                    f"the daemon at {path} sent an answer over {MAX_ANSWER} bytes: not a "
                    "nodeclient daemon, or a broken one"
                )
    except TimeoutError:  # socket.timeout is TimeoutError since 3.10
        raise DaemonBusy(
            f"the daemon did not answer within {timeout:g} s; it may be busy — try again, "
            "or check its logs (`journalctl -u nodeclient` under systemd)"
        ) from None
    except OSError as exc:  # e.g. EACCES on the socket, or the daemon died mid-answer
        raise DaemonNotRunning(
            f"cannot talk to the node daemon at {path}: {exc.strerror or exc}; "
            "check that `nodeclient run` is running for this home as this user"
        ) from exc
    finally:
        sock.close()
    try:  # a number without a finite float (NaN, Infinity, 1e309) is unreadable too
        out = json.loads(buf, parse_constant=_not_finite, parse_float=_finite)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, nested without end
        raise DaemonNotRunning(f"the daemon at {path} sent an unreadable answer") from None
    if not isinstance(out, dict):
        raise DaemonNotRunning(f"the daemon at {path} sent an unreadable answer")
    return out
