"""One node link over WebSocket (2.3.3 Coordinator Link), coordinator side.

Handshake: the coordinator sends ``challenge`` (coordinator_id, a fresh 32-byte nonce,
chain_id, heartbeat_interval); the node answers within ``auth_timeout`` with ``auth``,
an EIP-712 LinkAuth signed by its registered *liveness* key. Fail closed, with close
codes:

====  ===================================================================
4000  the first frame is malformed or not ``auth``
4001  coordinator_id / nonce mismatch, issued_at more than 300 s off, or the
      signature does not recover to the registered liveness key; and, on a live link,
      a re-registration replaced the liveness key it authenticated with
4002  no auth within the timeout
4003  node_id not registered
4004  replaced by a newer link for the same node (one live link per node)
4005  marked offline: no heartbeat for 3 intervals
1001  the coordinator is shutting down
1008  after auth, over a budget (data bytes; progress and malformed frames)
1009  before auth, a message over the 64 KiB control-frame limit
1011  the database failed under a frame (or a bug, logged with its traceback)
====  ===================================================================

After ``welcome``, every frame is checked before it acts: malformed -> ``error``
``malformed``; wrongly signed -> ``error`` ``bad_signature``; a heartbeat seq not above
the last seen -> ``error`` ``replayed``. None of these changes state or closes the link.

A node that stops reading its socket must not hold up anyone else: every send waits at
most :func:`send_limit` seconds (10 s, plus one second per MiB of the frame and of the
one before it, which may still be leaving the server's buffer). A send
that runs out of time drops the link (``link.stalled``): the node is detached at once,
so it gets no more work, its connection is aborted, and its leases go elsewhere when it
misses its heartbeats or its lease deadlines, as with any lost node.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import secrets
import socket
import struct
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy.exc import OperationalError, SQLAlchemyError
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from nodeclient.coordinator import models as m
from nodeclient.coordinator import verifier
from nodeclient.coordinator.config import AUTH_MAX_SKEW_S
from nodeclient.coordinator.leases import node_lost_tx, report_job_end, strays_tx
from nodeclient.coordinator.scheduler import cancel_leases, report_lost
from nodeclient.coordinator.service import UNSTORED_SEQS, Coordinator, TokenBucket
from nodeclient.coordinator.store import NodeInfo
from nodeclient.errors import RemoteProtocolError, SignatureError
from nodeclient.protocol import eip712, messages
from nodeclient.protocol.secp import parse_address, to_checksum_address
from nodeclient.protocol.states import NodeState

log = logging.getLogger("nodeclient.coordinator.link")
_STATES = frozenset(s.value for s in NodeState)
SEND_TIMEOUT_S = 10.0  # what any send may wait for the node to read, whatever its size
MIN_SEND_RATE = 1 << 20  # bytes per second a node must read at least; slower is stalled
CLOSE_TIMEOUT_S = 5.0


ABORT_KEY = "nodeclient.abort"  # scope key: the server transport's abort (ServerHooks)
OPEN_FRAMES_KEY = "nodeclient.open_frames"  # scope key: lift the pre-auth message limit


class ServerHooks:
    """ASGI middleware: put two of the WebSocket server's own controls into the scope.

    Starlette wraps ``send`` before the endpoint sees it, so only the outermost layer
    holds the server's own callable (uvicorn's protocol method). From its protocol:
    - the transport's abort (:data:`ABORT_KEY`): a link whose node stopped reading, or
      an HTTP client that stopped reading a result, is dropped this way, since a close
      would wait forever on the full buffer;
    - the lift of the message limit kept small until auth (:data:`OPEN_FRAMES_KEY`,
      :class:`nodeclient.coordinator.server.LinkWebSockets`).
    Servers that expose neither get neither: the link then checks a frame's size itself,
    after the server has read it.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("websocket", "http"):  # http: a result's stalled reader
            protocol = getattr(send, "__self__", None)
            transport = getattr(protocol, "transport", None)
            if callable(getattr(transport, "abort", None)):
                scope[ABORT_KEY] = functools.partial(_reset, transport)
        if scope["type"] == "websocket":
            open_frames = getattr(protocol, "open_frame_limit", None)
            if callable(open_frames):
                scope[OPEN_FRAMES_KEY] = open_frames
        await self.app(scope, receive, send)


def _reset(transport: Any) -> None:
    """Reset the connection: RST now, what the kernel still buffers for the node dropped.

    A plain close (or asyncio's abort) would leave the kernel sending the buffered frames
    for as long as the node keeps reading slowly, or not at all.
    """
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def send_limit(size: int) -> float:
    """Seconds a send of *size* bytes may take before the link counts as stalled."""
    return SEND_TIMEOUT_S + size / MIN_SEND_RATE


MAX_SEQ = (1 << 63) - 1  # SQL BIGINT is signed; a uint64 seq above it could not be stored
# The highest seq a heartbeat may carry: after a restart the coordinator takes the stored
# seq plus UNSTORED_SEQS as seen (Coordinator.__init__), and welcome.last_seq must still
# be a number the protocol allows.
MAX_HEARTBEAT_SEQ = MAX_SEQ - UNSTORED_SEQS
# What a node's frames may cost, per node and not per link (linking again refills
# nothing). Each budget is a burst, then a rate; a frame over it costs nothing more.
# Heartbeats: each stored one is a signature recovery and a database write; a node sends
# one every interval (30 s; at least 0.05 s even in tests), so only a node flooding its
# own link meets the bound.
RECONCILE_AT_BEAT = 2  # the heartbeat of a link at which its node's leases are reconciled
HEARTBEAT_BURST = 40
HEARTBEAT_RATE = 4.0
# Rejects: each is a signature recovery, a transaction and a log line. A node rejects a
# dispatch it cannot run, and a stopping node hands back each task it holds at once.
REJECT_BURST = 128
REJECT_RATE = 8.0
# A reject of a dispatch this link sent (and the node has not answered yet) is not
# charged: an honest node may refuse every dispatch (no memory, a full backlog), and the
# scheduler refills its free slots twice a second. The ones remembered, oldest dropped.
MAX_OWED = 4096
# Data frames (results) over the control-frame limit, in bytes: parsing 48 MB of JSON
# text holds the event loop, which every link shares, for some 130 ms. A node over it is
# closed (1008) before the frame is parsed; it links again with backoff and resends.
DATA_BURST_BYTES = 4 * messages.MAX_DATA_FRAME
DATA_RATE_BYTES = 16 * 1024 * 1024
# Progress frames (a node sends at most two a second for each running task) and frames
# that are malformed or unexpected (an honest node sends none): each costs a dictionary
# entry or a log line and an error frame. A node over it is closed (1008) and links again.
CHATTER_RATE_PER_SLOT = 4.0
CHATTER_MIN_RATE = 16.0
CHATTER_BURST_S = 8.0  # seconds of the rate
_TOO_FREQUENT_LOG_S = 60.0  # one log line a minute for a node's refused frames of a kind


class LinkBudgets:
    """A node's budgets (heartbeats, rejects, data bytes, chatter), kept in its
    NodeRuntime."""

    __slots__ = ("beats", "chatter", "data", "rejects")

    def __init__(self, now: float, heartbeat_interval: float) -> None:
        # At least HEARTBEAT_RATE a second, and 4 an interval for a coordinator whose
        # interval is short (tests and benchmarks: 0.05 s is allowed).
        rate = max(HEARTBEAT_RATE, 4.0 / heartbeat_interval)
        self.beats = TokenBucket(HEARTBEAT_BURST, rate, now)
        self.rejects = TokenBucket(REJECT_BURST, REJECT_RATE, now)
        self.data = TokenBucket(DATA_BURST_BYTES, DATA_RATE_BYTES, now)
        self.chatter: TokenBucket | None = None  # sized to the node's slots once it is known

    def chatter_for(self, slots: int, now: float) -> TokenBucket:
        """The chatter budget, sized to *slots* (the node's current manifest: a node
        registered again with more slots gets the rate they need, its tokens kept)."""
        rate = max(CHATTER_MIN_RATE, CHATTER_RATE_PER_SLOT * slots)
        if self.chatter is None:
            self.chatter = TokenBucket(rate * CHATTER_BURST_S, rate, now)
        elif self.chatter.rate != rate:
            self.chatter.rate, self.chatter.burst = rate, rate * CHATTER_BURST_S
        return self.chatter


def heartbeat_ack_text(seq: int, server_time: float, unstaking_until: int | None) -> str:
    """The JSON text of ``messages.HeartbeatAck(...).to_wire()``, without building a dict.

    Byte for byte what ``json.dumps(..., separators=(",", ":"))`` gives (a test checks it):
    the ack is sent once per heartbeat, so it skips the generic encoder.
    """
    until = "null" if unstaking_until is None else str(int(unstaking_until))
    if type(server_time) is float and math.isfinite(server_time):
        now = float.__repr__(server_time)  # what json.dumps writes for a finite float
    else:
        now = json.dumps(server_time)
    return (
        f'{{"type":"heartbeat_ack","seq":{int(seq)},"server_time":{now},"unstaking_until":{until}}}'
    )


class _Closed(Exception):
    """The peer went away; unwinds the session."""


class LinkSession:
    """One WebSocket connection: handshake, then the frame loop."""

    def __init__(self, coord: Coordinator, ws: WebSocket) -> None:
        self.coord = coord
        self.ws = ws
        self.node_id = ""
        self._node_raw = b""
        self._liveness_info: NodeInfo | None = None
        self._liveness = ""
        self._send_lock = asyncio.Lock()
        self._closed = False
        self._closing: asyncio.Event | None = None  # set once a close() has finished
        self._last_sent = 0  # bytes of the last frame written (may still be in the buffer)
        # Set by a reject that hands a task back because the node is stopping: the link
        # gets no more work (the scheduler's roster leaves it out) until it is replaced.
        self.draining = False
        # Reconciling the node's leases with what it runs (_reconcile): the dispatches sent
        # on this link until then, and the heartbeats before it (None once done).
        self._sent_here: set[str] | None = set()
        self._owed: dict[str, None] = {}  # dispatches sent on this link, not yet answered
        # Tasks dispatched on an earlier link that the node still holds, as its first
        # heartbeat here named them and the database confirmed (_cancel_strays): their
        # progress is kept, as that of the tasks dispatched on this link (_owed).
        self._holds: frozenset[bytes] = frozenset()
        self._beats_seen = 0
        self._strays_checked = False  # at the first heartbeat (_cancel_strays)
        self._attached_at = math.inf
        self._budgets = LinkBudgets(coord.monotonic(), coord.config.heartbeat_interval)
        self._chatter: TokenBucket | None = None  # the node's chatter budget, once linked
        # Frames refused over a budget, per kind, since the last log line about them, and
        # when that line was written.
        self._too_frequent: dict[str, tuple[int, float]] = {}
        self._task: asyncio.Task[Any] | None = None  # the task running this session
        self.binary = False  # the node announced BINARY_DATA in its auth

    # --- LinkPort ---------------------------------------------------------------------------

    async def send(self, frame: Mapping[str, Any]) -> bool:
        """Send one frame; a data field of raw bytes goes binary when the node takes it."""
        if frame.get("type") == "dispatch":
            task_id = str(frame["task_id"])
            if self._sent_here is not None:
                self._sent_here.add(task_id)
            # Its answer (a result or a reject) is owed: a reject of it is not charged to
            # the node's reject budget (the dispatches bound those already).
            self._owed[task_id] = None
            if len(self._owed) > MAX_OWED:
                del self._owed[next(iter(self._owed))]
        return await self.send_wire(messages.encode_frame(frame, binary=self.binary))

    async def send_wire(self, wire: str | bytes) -> bool:
        """Send one frame already encoded (text or binary); False if the link is gone."""
        if self._closed:
            return False
        limit = 0.0
        try:
            async with self._send_lock:  # the clock starts when this frame is written
                if self._closed:  # dropped while this frame waited for its turn
                    return False
                # The server writes a frame once the previous one has left its buffer: this
                # one's time covers that one's bytes too, which may still be on their way.
                limit = send_limit(len(wire) + self._last_sent)
                async with asyncio.timeout(limit):
                    if isinstance(wire, bytes):
                        await self.ws.send_bytes(wire)
                    else:
                        await self.ws.send_text(wire)
                self._last_sent = len(wire)
        except TimeoutError:
            self._stalled(f"a {len(wire)}-byte frame was not read within {limit:.0f} s")
            return False
        except (WebSocketDisconnect, RuntimeError, OSError):
            self._closed = True
            return False
        return True

    async def close(self, code: int, reason: str) -> None:
        """Send the close frame, after a frame being sent (bounded by its own limit);
        nothing it meets escapes (a connection gone: the close is moot). The session's
        run waits for it to end, so that the node gets *code*, not a dropped connection."""
        if self._closed:
            return
        self._closed = True
        self._closing = asyncio.Event()
        limit = CLOSE_TIMEOUT_S
        try:
            async with self._send_lock:
                # The server writes it once the frame before has left its buffer: that
                # frame's time counts, as for any frame (send_wire).
                limit = send_limit(self._last_sent) + CLOSE_TIMEOUT_S
                async with asyncio.timeout(limit):
                    if self.ws.application_state == WebSocketState.CONNECTED:
                        await self.ws.close(code=code, reason=reason)
        except TimeoutError:
            self._stalled(f"the close frame ({code}) was not read within {limit:.0f} s")
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass
        finally:
            self._closing.set()

    def _stalled(self, why: str) -> None:
        """Drop a link whose node does not read: detach it now and abort the connection."""
        self._closed = True
        log.warning("link.stalled", extra={"node_id": self.node_id, "reason": why})
        if self.node_id:
            self.coord.detach(self.node_id, self)
        # The ASGI API has no abort, and a close would wait on the same full buffer: the
        # server's own abort, captured by ServerHooks when the connection came in.
        abort = self.ws.scope.get(ABORT_KEY)
        if callable(abort):
            abort()  # the receive loop then sees a disconnect and ends
        elif self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()

    # --- session ----------------------------------------------------------------------------

    async def _receive(self) -> str | bytes:
        msg = await self.ws.receive()
        if msg["type"] == "websocket.disconnect":
            self._closed = True
            raise _Closed
        text: str | None = msg.get("text")
        return text if text is not None else bytes(msg.get("bytes") or b"")

    async def run(self) -> None:
        self._task = asyncio.current_task()
        await self.ws.accept()
        try:
            if await self._handshake():
                await self._loop()
        except (_Closed, WebSocketDisconnect):
            pass
        except SQLAlchemyError as exc:
            error = f"{type(exc).__name__}: {exc}"[:300]
            if isinstance(exc, OperationalError) or getattr(exc, "connection_invalidated", False):
                # The database failed under this frame (locked past the timeout, the server
                # gone). Nothing of it was committed; the node links again with backoff and
                # resends what is unacknowledged, which the database may serve by then.
                log.error("link.database_error", extra={"node_id": self.node_id, "error": error})
                await self.close(1011, "coordinator database unavailable; link again later")
            else:  # a bug (an integrity or data error a frame should never cause): the trace
                log.error(
                    "link.internal_error",
                    extra={"node_id": self.node_id, "error": error},
                    exc_info=exc,
                )
                await self.close(1011, "coordinator internal error; reported in its log")
        finally:
            if self._closing is not None and not self._closing.is_set():
                # Closed by another task (replaced, offline, a rotated key), whose close frame
                # waits behind a frame being sent: ending the session now would drop the
                # connection without it. Bounded: that frame's limit, then the close's.
                with contextlib.suppress(TimeoutError):  # close() is bounded: a safety net
                    async with asyncio.timeout(2 * send_limit(messages.MAX_DATA_FRAME)):
                        await self._closing.wait()
            if self.node_id:
                self.coord.detach(self.node_id, self)
                log.info("link.closed", extra={"node_id": self.node_id})

    async def _refuse(self, code: int, reason: str, **fields: Any) -> bool:
        log.info("link.refused", extra={"code": code, "reason": reason, **fields})
        await self.close(code, reason)
        return False

    async def _handshake(self) -> bool:  # noqa: PLR0911, PLR0912 (each check fails closed)
        coord = self.coord
        nonce = secrets.token_bytes(32)
        challenge = messages.Challenge(
            coord.coordinator_id, nonce, coord.config.chain_id, coord.config.heartbeat_interval
        )
        await self.send(challenge.to_wire())
        try:
            async with asyncio.timeout(coord.config.auth_timeout):  # wait_for may drop a cancel
                raw = await self._receive()
        except TimeoutError:
            return await self._refuse(4002, "auth timeout")
        # Nothing before auth may be large or binary: a stranger's large frame is neither
        # parsed nor copied (a binary data frame's data would be). Under LinkWebSockets the
        # server has already refused one over MAX_CONTROL_FRAME by its header (1009).
        if not isinstance(raw, str) or len(raw) > messages.MAX_CONTROL_FRAME:
            kind = "binary" if isinstance(raw, bytes) else f"{len(raw)}-byte"
            return await self._refuse(4000, f"malformed auth: a {kind} frame before auth")
        try:
            frame = messages.parse_from_node(raw, max_text=messages.MAX_CONTROL_FRAME)
        except RemoteProtocolError as exc:
            return await self._refuse(4000, f"malformed auth: {exc}"[:120])
        if not isinstance(frame, messages.SignedFrame) or frame.type != "auth":
            return await self._refuse(4000, f"malformed auth: expected auth, got {frame.type}")
        msg = frame.message
        node_id = to_checksum_address(parse_address(msg["node_id"]))
        info = coord.nodes.get(node_id)
        if info is None:
            return await self._refuse(4003, "not registered", node_id=node_id)
        if msg["coordinator_id"] != coord.coordinator_id or msg["nonce"] != nonce:
            return await self._refuse(
                4001, "auth failed: coordinator_id or nonce mismatch", node_id=node_id
            )
        skew = msg["issued_at"] - coord.now()
        if abs(skew) > AUTH_MAX_SKEW_S:
            return await self._refuse(
                4001, f"auth failed: issued_at is {skew:+.0f} s off", node_id=node_id
            )
        try:
            eip712.verify_typed(
                "LinkAuth", msg, frame.signature,
                signer=info.liveness_address, chain_id=coord.config.chain_id,
            )  # fmt: skip
        except SignatureError:
            return await self._refuse(
                4001,
                "auth failed: signature does not match the registered liveness key",
                node_id=node_id,
            )
        self.node_id = node_id
        self._node_raw = parse_address(node_id)
        open_frames = self.ws.scope.get(OPEN_FRAMES_KEY)
        if callable(open_frames):
            open_frames()  # its results may now come, up to the data-frame limit
        node_rt = coord.runtime[node_id]
        if node_rt.budgets is None:
            node_rt.budgets = self._budgets
        self._budgets = node_rt.budgets
        self.draining = node_rt.draining  # stopping since its last registration: no work
        self.binary = messages.BINARY_DATA in frame.extra.get("features", ())
        rt = coord.runtime[node_id]
        until = coord.nodes[node_id].unstaking_until
        features = frozenset(messages.FEATURES)
        # welcome first: attached, the link may get a dispatch, which must not come before it
        await self.send(messages.Welcome(node_id, rt.last_seq, until, features).to_wire())
        if node_id not in coord.runtime:  # its record was deleted meanwhile (retention)
            return await self._refuse(4003, "not registered", node_id=node_id)
        now_info = coord.nodes.get(node_id)
        if now_info is None or now_info.liveness_address != info.liveness_address:
            # Re-registered with another liveness key while the welcome was sent: the
            # rotation found no link to close, and this one is signed by the revoked key.
            return await self._refuse(
                4001, "auth failed: the liveness key was rotated during the handshake",
                node_id=node_id,
            )  # fmt: skip
        self._attached_at = coord.now()  # a lease from now on is this link's to send
        old = coord.attach(node_id, self)
        if old is not None:
            # Not awaited: its close frame may wait behind a frame that node does not read.
            coord.spawn(old.close(4004, "replaced by a newer link"), "link.close")
            log.info("link.replaced", extra={"node_id": node_id})
        log.info("link.authenticated", extra={"node_id": node_id})
        coord.wake()
        return True

    async def _error(self, code: str, reason: str) -> None:
        log.info(f"frame.{code}", extra={"node_id": self.node_id, "reason": reason})
        await self.send(messages.ErrorFrame(code, reason[: messages.MAX_REASON]).to_wire())

    async def _loop(self) -> None:
        handlers = {"heartbeat": self._heartbeat, "result": self._result, "reject": self._reject}
        # A node that sends its results as binary frames never needs a large JSON frame.
        max_text = messages.MAX_CONTROL_FRAME if self.binary else messages.MAX_DATA_FRAME
        info = self.coord.nodes.get(self.node_id)
        self._chatter = self._budgets.chatter_for(
            info.max_parallel_subtasks if info is not None else 1, self.coord.monotonic()
        )
        while not self._closed:
            # Frames already read from the socket come without a wait: one node's flood
            # of them (frames answered without a database call, refused ones above all)
            # would otherwise hold the loop, every other link's heartbeats with it.
            await asyncio.sleep(0)
            raw = await self._receive()
            if self._closed:  # closed by another task while this frame came: not handled
                return
            # Its size in bytes (a text frame's UTF-8), exact wherever it passes the limit.
            size = messages.frame_size(raw)
            if size > messages.MAX_CONTROL_FRAME and not self._budgets.data.take(
                self.coord.monotonic(), size
            ):
                reason = (
                    f"data frames come faster than {DATA_RATE_BYTES >> 20} MiB a second "
                    f"(after a burst of {DATA_BURST_BYTES >> 20} MiB): link again later"
                )
                log.warning("link.data_budget", extra={"node_id": self.node_id, "bytes": size})
                await self.close(1008, reason)
                return
            try:
                frame = messages.parse_from_node(raw, max_text=max_text)
            except RemoteProtocolError as exc:
                if not await self._chatter_ok():
                    return
                await self._error("malformed", str(exc))
                continue
            if isinstance(frame, messages.ProgressFrame):
                if not await self._chatter_ok():
                    return
                self._progress(frame)
                continue
            handler = handlers.get(frame.type)
            if handler is None:
                if not await self._chatter_ok():
                    return
                await self._error("malformed", f"unexpected {frame.type} frame after auth")
                continue
            await handler(frame)

    async def _chatter_ok(self) -> bool:
        """Take one from the node's chatter budget (progress frames, and frames refused:
        malformed, out of place, replayed, wrongly signed, over their own budget); over
        it, close the link (1008)."""
        chatter = self._chatter
        if chatter is None or chatter.take(self.coord.monotonic()):
            return True
        reason = (
            f"progress and refused frames come faster than {chatter.rate:g} a second "
            "(after a burst): link again later"
        )
        log.warning("link.chatter_budget", extra={"node_id": self.node_id})
        await self.close(1008, reason)
        return False

    async def _refuse_frame(self, code: str, text: str) -> None:
        """Answer a refused frame with an error, charged to the chatter budget."""
        if await self._chatter_ok():
            await self._error(code, text)

    def _progress(self, frame: messages.ProgressFrame) -> None:
        """Remember a running task's progress; the jobs API shows it while it is leased.
        Only of a task this link dispatched (not yet answered), or one dispatched before
        that the node still holds (its first heartbeat on this link named it, and it is
        not a stray): reports on any other id would only take memory (up to two a slot,
        of the slots the node declares), shown nowhere."""
        task_id = frame.task_id
        if str(task_id) not in self._owed and task_id.bytes not in self._holds:
            return
        info = self.coord.nodes.get(self.node_id)
        slots = info.max_parallel_subtasks if info is not None else 1
        entry = {"done": frame.done, "total": frame.total, "note": frame.note}
        entry["at"] = self.coord.now()
        self.coord.progress.record(self.node_id, str(frame.task_id), entry, cap=2 * slots)

    async def _heartbeat(self, frame: messages.SignedFrame) -> None:
        coord, msg = self.coord, frame.message
        mono = coord.monotonic()
        if not self._budgets.beats.take(mono):  # before any cost: no recovery, no write
            await self._refuse_too_frequent(
                "heartbeat",
                mono,
                f"heartbeats come faster than {self._budgets.beats.rate:g} a second from "
                f"this node (after a burst of {HEARTBEAT_BURST}): this one is not recorded; "
                f"send one every heartbeat_interval "
                f"({self.coord.config.heartbeat_interval:g} s)",
            )
            return
        # parse_from_node has already checked node_id is a well-formed address; compare raw
        # bytes (parse_address is cached) instead of re-checksumming it on every heartbeat.
        if parse_address(msg["node_id"]) != self._node_raw:
            await self._refuse_frame(
                "malformed", f"heartbeat for {msg['node_id']} on {self.node_id}'s link"
            )
            return
        info = coord.nodes[self.node_id]
        try:
            recovered = eip712.recover_struct_hash(  # the message was hashed while parsed
                frame.struct_hash, frame.signature, chain_id=coord.config.chain_id
            )
            if recovered != self._liveness_of(info):
                raise SignatureError(
                    f"Heartbeat signature recovers to {recovered}, expected {info.liveness_address}"
                )
        except SignatureError as exc:
            await self._refuse_frame("bad_signature", f"heartbeat: {exc}")
            return
        rt = coord.runtime[self.node_id]
        seq, state = msg["seq"], msg["state"]
        if state not in _STATES or seq > MAX_HEARTBEAT_SEQ:
            await self._refuse_frame(
                "malformed",
                f"heartbeat: state must be one of {sorted(_STATES)} and seq at most "
                f"{MAX_HEARTBEAT_SEQ}",
            )
            return
        if seq <= rt.last_seq:
            if not await self._chatter_ok():
                return
            log.warning(
                "heartbeat.replayed",
                extra={"node_id": self.node_id, "seq": seq, "last_seq": rt.last_seq},
            )
            await self.send(
                messages.ErrorFrame(
                    "replayed", f"heartbeat seq {seq} is not above the last seen {rt.last_seq}"
                ).to_wire()
            )
            return
        now = coord.now()
        was_online, was_unstaking = rt.online, rt.state == "UNSTAKING"
        rt.last_seq, rt.state, rt.last_seen, rt.online = seq, state, now, True
        if was_unstaking != (state == "UNSTAKING"):
            coord.roster_changed()  # now: a round during the awaits below reads it
        rt.beat = coord.monotonic()
        # Acknowledged before its commit only within UNSTORED_SEQS of the stored seq.
        wait = seq > rt.stored_seq + UNSTORED_SEQS
        await coord.heartbeats.persist(self.node_id, seq, state, now, wait=wait)
        until = coord.nodes[self.node_id].unstaking_until
        await self.send_wire(heartbeat_ack_text(seq, now, until))
        if not self._strays_checked:  # before the scheduler is woken for this node
            self._strays_checked = True
            await self._cancel_strays(msg["running_tasks"])
        if not was_online or was_unstaking != (state == "UNSTAKING"):
            # A node that says it is UNSTAKING gets no work, even with no unstake on
            # record here (a coordinator's database restored from before it): each
            # dispatch would only come back refused, an attempt spent.
            coord.roster_changed()
            coord.wake()
        if self._sent_here is not None:
            self._beats_seen += 1
            if self._beats_seen >= RECONCILE_AT_BEAT:
                sent_here, self._sent_here = self._sent_here, None
                await self._reconcile(msg["running_tasks"], sent_here)

    async def _cancel_strays(self, running_tasks: Sequence[bytes]) -> None:
        """Once a link, at its first heartbeat: tell the node to drop the tasks it runs
        that are no longer its (leased to another node, ended, unknown here). Their cancels
        were lost with its last link (one found offline is closed; an expired lease's
        cancel finds no link), and it would run them to their end, its slots busy while
        they count as free here: each dispatch meanwhile would come back refused."""
        if not running_tasks:
            return
        running_tasks = list(dict.fromkeys(running_tasks))  # each id once, however often listed
        ids = [str(uuid.UUID(bytes=b)) for b in running_tasks]
        node_id = self.node_id
        strays = await self.coord.db.run(lambda s: strays_tx(s, node_id, ids))
        gone = set(strays)
        self._holds = frozenset(
            raw for raw, t in zip(running_tasks, ids, strict=True) if t not in gone
        )
        if strays:
            log.info("link.strays_cancelled", extra={"node_id": node_id, "tasks": strays[:20]})
        cancel_leases(self.coord, ((node_id, t) for t in strays), "lease ended")

    async def _reconcile(self, running_tasks: Sequence[bytes], sent_here: set[str]) -> None:
        """Once a link, at its second heartbeat: a task still leased to this node whose
        dispatch went out on no link of this node that is up now (it was sent on an older
        link, or never: the coordinator stopped between the lease and the send), and that
        the node does not run, is one the node will never deliver (it restarted, or never
        got it). Queued again now, the attempt spent as for an expired lease, rather than
        waiting out its lease. The first heartbeat comes before the node has sent its
        unacknowledged results; by the second they are in."""
        coord, cfg = self.coord, self.coord.config
        running = {str(uuid.UUID(bytes=b)) for b in running_tasks}
        keep = running | sent_here
        node_id, now, attached = self.node_id, coord.now(), self._attached_at

        def spare(t: m.Task) -> bool:  # held, or leased for this link (may be on its way)
            return t.task_id in keep or (t.leased_at is not None and t.leased_at >= attached)

        detail = (
            f"node {node_id} linked again without it (it restarted, or the dispatch never "
            "reached it)"
        )
        lost = await coord.db.run(
            lambda s: node_lost_tx(
                s,
                node_id=node_id,
                detail=detail,
                now=now,
                max_attempts=cfg.max_attempts,
                outcome="lost",
                spare=spare,
            )
        )
        report_lost(coord, lost, "task.lost_on_relink", tell_holder=False)  # it has none

    async def _refuse_too_frequent(self, kind: str, mono: float, reason: str) -> None:
        """Answer a frame over its budget: nothing is checked or recorded. Logged once a
        minute per kind with the count (``heartbeat.too_frequent``,
        ``reject.too_frequent``), not once a frame: a flood would flood the log too."""
        count, logged = self._too_frequent.get(kind, (0, -_TOO_FREQUENT_LOG_S))
        count += 1
        if mono - logged >= _TOO_FREQUENT_LOG_S:
            log.warning(f"{kind}.too_frequent", extra={"node_id": self.node_id, "refused": count})
            count, logged = 0, mono
        self._too_frequent[kind] = (count, logged)
        if await self._chatter_ok():  # a node that goes on regardless is closed
            await self.send(messages.ErrorFrame("too_frequent", reason).to_wire())

    def _liveness_of(self, info: NodeInfo) -> str:
        """The checksummed liveness address of *info*, computed once per cached NodeInfo."""
        if info is not self._liveness_info:
            self._liveness = to_checksum_address(
                parse_address(info.liveness_address, field="signer")
            )
            self._liveness_info = info
        return self._liveness

    async def _result(self, frame: messages.SignedFrame) -> None:
        coord = self.coord
        cfg = coord.config
        self._owed.pop(str(uuid.UUID(bytes=frame.message["task_id"])), None)  # answered
        try:
            claim = verifier.check_result_frame(frame, node_id=self.node_id, chain_id=cfg.chain_id)
        except SignatureError as exc:
            # Answered as a rejection of its task: no valid signature ever comes for a
            # result this node signed wrongly (it signs once), so the node settles it in
            # its outbox rather than sending it again after every reconnect.
            if not await self._chatter_ok():
                return
            coord.metrics.verification_failed("signature")
            task_id = uuid.UUID(bytes=frame.message["task_id"])
            reason = f"bad signature: {exc}"[: messages.MAX_REASON]
            log.warning(
                "result.rejected",
                extra={"node_id": self.node_id, "task_id": str(task_id), "reason": reason},
            )
            await self.send(messages.ResultAck(task_id, "rejected", reason).to_wire())
            return
        fields = {"node_id": self.node_id, "task_id": str(claim.task_id)}
        coord.progress.forget(self.node_id, str(claim.task_id))  # its task is over
        problem = await coord.in_node_cpu(verifier.check_proof, claim)
        now = coord.now()
        if problem is not None:  # still evidence if it contradicts an accepted result
            decision = await coord.db.run(
                lambda s: verifier.contradiction_tx(s, claim, problem, now=now)
            )
        else:
            decision = await coord.db.run(
                lambda s: verifier.accept_result_tx(
                    s,
                    claim,
                    now=now,
                    max_payload=cfg.max_payload_bytes,
                    max_attempts=cfg.max_attempts,
                )
            )
        if decision.status == "rejected":
            coord.metrics.verification_failed("proof" if problem is not None else "acceptance")
        level = logging.WARNING if decision.status == "rejected" else logging.INFO
        log.log(
            level,
            decision.event or f"result.{decision.status}",
            extra={**fields, "reason": decision.reason},
        )
        await self.send(
            messages.ResultAck(claim.task_id, decision.status, decision.reason[:512]).to_wire()
        )
        cancel_leases(coord, decision.cancel, "completed by another node")
        if decision.job_done is not None:
            log.info(f"job.{decision.job_done}", extra={"job_id": str(claim.job_id)})
        if decision.lost is not None:  # refused by its class: queued again, or failed
            cancel_leases(coord, decision.lost.cancel, "job failed")
            report_job_end(decision.lost)
        if decision.status == "accepted" or decision.lost is not None:
            coord.wake()

    async def _reject(self, frame: messages.SignedFrame) -> None:
        coord = self.coord
        cfg = coord.config
        mono = coord.monotonic()
        owed = self._owed.pop(str(uuid.UUID(bytes=frame.message["task_id"])), False) is None
        if not owed and not self._budgets.rejects.take(mono):  # before any cost
            await self._refuse_too_frequent(
                "reject",
                mono,
                f"rejects come faster than {REJECT_RATE:g} a second from this node (after "
                f"a burst of {REJECT_BURST}): this one is not recorded; send it again later",
            )
            return
        try:
            task_id = verifier.check_reject_frame(
                frame, node_id=self.node_id, chain_id=cfg.chain_id
            )
        except SignatureError as exc:
            await self._refuse_frame("bad_signature", f"reject: {exc}")
            return
        now = coord.now()
        reason = frame.message["reason"]
        shown = reason[: messages.MAX_REASON]  # what the log gets (the store cuts it too)
        coord.progress.forget(self.node_id, str(task_id))
        if reason.startswith(messages.DRAINING_PREFIX) and not self.draining:
            # Stopping: no more work on this link, whatever the task, nor on a link it
            # makes before it registers again (NodeRuntime.draining).
            self.draining = True
            if self.node_id in coord.runtime:
                coord.runtime[self.node_id].draining = True
            coord.roster_changed()
            log.info("link.draining", extra={"node_id": self.node_id, "reason": shown})
        lease = frame.extra.get("lease_expires_at")  # None from a node that does not echo it
        decision, lost = await coord.db.run(
            lambda s: verifier.reject_tx(
                s,
                task_id,
                self.node_id,
                reason,
                now=now,
                max_attempts=cfg.max_attempts,
                lease_expires_at=lease,
                signed=(frame.message, frame.signature),
            )
        )
        log.info(
            decision.event or "task.reject_refused",
            extra={
                "node_id": self.node_id,
                "task_id": str(task_id),
                "reason": shown,
                "lease_expires_at": lease,
                "refusal": decision.reason,
            },
        )
        ack = messages.ResultAck(task_id, decision.status, decision.reason, of="reject")
        await self.send(ack.to_wire())
        if lost is not None:
            cancel_leases(coord, lost.cancel, "job failed")
            report_job_end(lost)
            coord.wake()
