"""Run the coordinator under uvicorn, programmatically (``nodeclient-coordinator serve``).

As soon as the server listens it prints exactly one line, ``coordinator: http://HOST:PORT``
with the port actually bound (``--port 0`` lets the OS pick), and flushes: devnets and
end-to-end tests wait for that line. SIGTERM and SIGINT shut down cleanly with exit 0.
The link's WebSocket message limit is the protocol's data-frame limit once a node has
authenticated, and the control-frame limit before (:class:`LinkWebSockets`).

uvloop and httptools are used when they are importable (they are dependencies; the
fallbacks are asyncio's own loop and h11): with 10,000 links the event loop and the
transport callbacks are most of the coordinator's CPU per heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Generator
from types import FrameType
from typing import Any, TextIO

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from nodeclient import entry
from nodeclient.coordinator.link import ServerHooks
from nodeclient.errors import UsageError
from nodeclient.protocol.messages import MAX_CONTROL_FRAME, MAX_DATA_FRAME

MAX_PORT = 65535
_WS_OVERHEAD = 4096  # frame headers around the largest allowed JSON frame
# Garbage collection with 10,000 links: a link holds about 130 objects the collector
# tracks (protocol, parser, ASGI task, coroutine frames, queues), so a full collection
# walks more than a million objects and stops the event loop for a second or more. The
# thresholds make collections rarer: a young collection every 10,000 net allocations
# (not 700), a middle one every 1,000 young ones, and a full one only after 100 middle
# ones (and CPython's own rule that a quarter of the old objects must be new). What the
# process holds once it serves (modules, app, node cache) is frozen out of every
# collection; objects of links closed later are still collected.
#
# Each frame a link receives leaves a new chain of about 15 tracked objects (its
# coroutines, the awaited future, the parsed frame) waiting for the next frame, and
# frees the previous chain: net allocations stay flat, so no young collection runs for
# minutes while the young generation grows to every link's chain (150,000 objects at
# 10,000 links). The first collection after that (when job submissions allocate) walked
# them all and stopped the loop for 100-170 ms. A young collection every
# YOUNG_GC_INTERVAL_S walks only the chains made since the last one (a few ms); they
# then wait in the middle generation, which is collected rarely: after 1,000 young
# collections (every 8 minutes or so; it walks every link's chain, ~100 ms), and the
# old one after 100 of those (about half a day; a second or more at 10,000 links).
GC_THRESHOLDS = (10_000, 1000, 100)
YOUNG_GC_INTERVAL_S = 0.5
# The database threads run pure-Python ORM work (job inserts, scheduling rounds) beside
# the event loop. With CPython's default 5 ms switch interval the loop, which gives the
# GIL up at every socket call, can wait up to 5 ms to get it back each time; 0.5 ms
# keeps heartbeat acks moving while a transaction runs.
SWITCH_INTERVAL_S = 0.0005


class LinkWebSockets(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol, whose message limit stays small until auth.

    The configured limit (a 48 MB data frame) is for linked nodes' results. A stranger
    gets MAX_CONTROL_FRAME: the auth frame is a few hundred bytes, and a larger message is
    refused by its header (close 1009) instead of being read into memory first. The link
    lifts the limit through :meth:`open_frame_limit` once the node has authenticated
    (the app finds it in its scope, :class:`nodeclient.coordinator.link.ServerHooks`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # websockets >= 16 keeps the message limit as max_message_size, earlier ones as
        # max_size; the parser reads it afresh for every frame.
        self._limit_attr = (
            "max_message_size" if hasattr(self.conn, "max_message_size") else "max_size"
        )
        self._open_limit = getattr(self.conn, self._limit_attr)
        setattr(self.conn, self._limit_attr, MAX_CONTROL_FRAME)

    def open_frame_limit(self) -> None:
        """Allow messages up to the configured limit (the node has authenticated)."""
        setattr(self.conn, self._limit_attr, self._open_limit)


# A request's head (its request line and headers) must arrive whole within this of the
# connection's opening, or of the request's first byte; else the connection is closed.
REQUEST_HEAD_TIMEOUT_S = 10.0
# Dead peers (a node that lost power, a NAT that forgot the flow) are found by TCP
# keepalive at any stage of a connection: probes after 60 s of silence, 6 of them 10 s
# apart. Linux copies these options from the listening socket to every accepted one.
_KEEPALIVE: tuple[tuple[int, int, int], ...] = (
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60),
    (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10),
    (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 6),
)


# A response sent before its request's body was received whole (a route that reads no
# body, a refusal): the connection is closed this long after it, whatever comes meanwhile.
UNREAD_BODY_LINGER_S = 5.0


class RequestHeadDeadline(HttpToolsProtocol):
    """uvicorn's HTTP protocol, with a deadline on every request's head, and an end for a
    connection whose request body was still coming when its response had been sent.

    uvicorn times a connection only between requests (its keep-alive timeout, which starts
    once a response is sent): one that never sends a whole request, a node's link that
    died before its upgrade request or a stranger's on purpose, was held for ever, and
    enough of them used up the coordinator's file descriptors, so that no node could
    link. The head's deadline runs from the connection's opening and from each request's
    first byte, and stops once the headers are in (a WebSocket upgrade's too).

    A response sent before its request's body was in (``/healthz`` with a declared body,
    a 404) left the rest of the body to come: uvicorn's keep-alive timer, armed by the
    response, is cancelled by any byte that arrives, and no other timer ran, so one byte
    of it now and then held the connection for ever. Such a connection is closed
    UNREAD_BODY_LINGER_S after the response (time for the client to read it), as Go's
    server closes one whose handler left its body unread, unless the body ends first:
    then the next request's head has REQUEST_HEAD_TIMEOUT_S to come.
    """

    _head_timer: asyncio.TimerHandle | None = None
    _linger_timer: asyncio.TimerHandle | None = None

    def on_response_complete(self) -> None:
        # The cycle just answered; with pipelining, self.cycle may be the next request's
        # already (its response not complete): that one is not this timer's to judge.
        cycle = getattr(self, "cycle", None)
        unread = cycle is not None and cycle.response_complete and cycle.more_body
        super().on_response_complete()
        if unread and self._linger_timer is None and not self.transport.is_closing():
            self._linger_timer = self.loop.call_later(UNREAD_BODY_LINGER_S, self._close_now)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self._linger_timer is not None:  # answered already, and now the body is in:
            self._linger_timer.cancel()  # an idle connection, which the next request's
            self._linger_timer = None  # head must reach within its deadline
            self._arm_head_timer()

    def _close_now(self) -> None:
        self._linger_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._linger_timer is not None:  # the last body came whole: a new request
            self._linger_timer.cancel()
            self._linger_timer = None
        self._arm_head_timer()

    def on_headers_complete(self) -> None:
        self._disarm_head_timer()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(REQUEST_HEAD_TIMEOUT_S, self._head_overdue)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_overdue(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()


class _Server(uvicorn.Server):
    """uvicorn's server, minus re-raising the caught signal after shutdown.

    uvicorn re-raises SIGTERM once it has stopped, which would end the process with
    status -15; a clean, requested shutdown is exit 0.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signals can only be handled on the main thread (tests run us in one)
            return

        def handle(sig: int, frame: FrameType | None) -> None:
            self.handle_exit(sig, frame)

        # SIGHUP too, unless ignored at start (nohup): by default it would end the process
        # without closing its links and its database.
        previous = {s: signal.signal(s, handle) for s in entry.stop_signals()}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


TRUSTED_PROXIES = "127.0.0.1,::1,::ffff:127.0.0.1"  # unless FORWARDED_ALLOW_IPS says


def build_server(app: FastAPI, *, host: str, port: int) -> uvicorn.Server:
    config = uvicorn.Config(
        # Outside the app's own error middleware, which wraps an HTTP request's send: so
        # the hooks see uvicorn's own for HTTP requests too (a result's stalled reader).
        ServerHooks(app),
        host=host,
        port=port,
        log_config=None,  # our JSON logs only (nodeclient.logs)
        access_log=False,
        http=RequestHeadDeadline,
        ws=LinkWebSockets,
        ws_max_size=MAX_DATA_FRAME + _WS_OVERHEAD,  # once authenticated (LinkWebSockets)
        # Nodes heartbeat every interval and a silent node is closed as offline (4005);
        # server pings to 10,000 links every 20 s would cost more frames than heartbeats.
        ws_ping_interval=None,
        # Link frames are small JSON or already-encrypted payloads: compressing them costs
        # coordinator CPU on every heartbeat and saves almost nothing.
        ws_per_message_deflate=False,
        # The proxies whose X-Forwarded-For names the client (the per-client registration
        # limit, log lines): loopback, also as a dual-stack socket ("--host ::") reports
        # it, whatever uvicorn's own default is (only 127.0.0.1 in earlier releases).
        forwarded_allow_ips=os.environ.get("FORWARDED_ALLOW_IPS", TRUSTED_PROXIES),
        lifespan="on",
    )
    return _Server(config)


def listen(host: str, port: int) -> socket.socket:
    """Bind and listen ourselves, so a busy port is a clean error and the port is known."""
    if not 0 <= port <= MAX_PORT:  # bind() would raise OverflowError, not OSError
        raise UsageError(f"cannot listen on {host}:{port}: the port must be 0 to {MAX_PORT}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        for level, option, value in _KEEPALIVE:
            sock.setsockopt(level, option, value)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket, host: str) -> str:
    """The http:// URL of a listening socket."""
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


async def serve(
    app: FastAPI, *, sock: socket.socket, host: str, announce: TextIO | None = None
) -> int:
    """Serve on *sock* until a signal; print the URL line once listening. Returns the status."""
    server = build_server(app, host=host, port=sock.getsockname()[1])
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    young = None
    if server.started:
        gc.collect()
        gc.freeze()
        young = asyncio.create_task(collect_young(YOUNG_GC_INTERVAL_S), name="young-gc")
        out = announce or sys.stdout
        out.write(f"coordinator: {url_of(sock, host)}\n")
        out.flush()
    try:
        await task
    finally:
        if young is not None:
            young.cancel()
    return 0 if server.started else 1


async def collect_young(interval: float) -> None:
    """Collect the young generation every *interval* seconds (see YOUNG_GC_INTERVAL_S),
    or an older one when it is due, as CPython's own trigger chooses: these collections
    reset the young count, so the automatic one, which alone collects the older
    generations, may never run again, and garbage cycles that outlived a young
    collection (a closed link's) would stay for good."""
    while True:
        await asyncio.sleep(interval)
        counts, thresholds = gc.get_count(), gc.get_threshold()
        generation = 0
        if counts[1] > thresholds[1]:
            generation = 2 if counts[2] > thresholds[2] else 1
        gc.collect(generation)


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when it is installed, else None (asyncio's default loop)."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(app: FastAPI, *, sock: socket.socket, host: str) -> int:
    gc.set_threshold(*GC_THRESHOLDS)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(serve(app, sock=sock, host=host))
