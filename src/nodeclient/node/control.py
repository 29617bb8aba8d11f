"""The local control socket: ``nodeclient status`` reads the running daemon through it.

A Unix socket in the node home, mode 0600 (created under a restrictive umask, never
chmod-ed afterwards), speaking one JSON request line and one JSON response line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

from nodeclient.errors import NodeClientError

SOCKET_NAME: Final = "control.sock"
MAX_REQUEST: Final = 4096

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class DaemonNotRunning(NodeClientError):
    """No daemon answers on the control socket."""


async def serve(path: Path, handler: Handler) -> asyncio.AbstractServer:
    """Listen on *path* (replacing a stale socket left by a killed daemon)."""
    with contextlib.suppress(FileNotFoundError):
        if path.is_socket():
            path.unlink()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=5)
            if len(line) > MAX_REQUEST:
                raise ValueError("request too large")
            request = json.loads(line or b"{}")
            if not isinstance(request, dict):
                raise ValueError("request must be an object")  # noqa: TRY004 - answered, not raised on
            response = await handler(request)
        except (ValueError, TimeoutError) as exc:
            response = {"error": str(exc)}
        writer.write(json.dumps(response, default=str).encode() + b"\n")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    old = os.umask(0o177)  # the socket is created 0600
    try:
        server = await asyncio.start_unix_server(on_client, path=str(path))
    finally:
        os.umask(old)
    return server


def request(path: Path, payload: dict[str, Any], *, timeout: float = 5.0) -> dict[str, Any]:
    """One request to the daemon; DaemonNotRunning if nothing listens."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        raise DaemonNotRunning(
            f"no node daemon is running for this home ({path} does not answer); "
            "start it with `nodeclient run`"
        ) from None
    try:
        sock.sendall(json.dumps(payload).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
    finally:
        sock.close()
    try:
        out: dict[str, Any] = json.loads(buf)
    except ValueError:
        raise DaemonNotRunning(f"the daemon at {path} sent an unreadable answer") from None
    return out
