"""The node's side of the coordinator link (2.3.3 Coordinator Link): registration, the
authenticated WebSocket with its heartbeats, reconnects with backoff, and the frames the
coordinator sends on it (a dispatch, an acknowledgement, a cancel, the unstaking state).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import sqlite3
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from nodeclient import httpbody, logs, tlstrust
from nodeclient.errors import NeedsOperator, RemoteProtocolError
from nodeclient.node.config import CONFIG_FILE
from nodeclient.node.dispatch import TaskDispatcher
from nodeclient.protocol import manifest as manifest_mod
from nodeclient.protocol import messages
from nodeclient.protocol.session import CoordinatorMismatch, backoff
from nodeclient.protocol.states import NodeState

log = logging.getLogger("nodeclient.node")

# The node's link client options (the scale benchmark's simulated nodes use them too).
# Signed heartbeats already prove liveness both ways; a slow WebSocket ping only catches
# a half-open connection, so it need not add frames at the heartbeat's rate.
LINK_OPTIONS: Final[dict[str, Any]] = {
    "max_size": messages.MAX_DATA_FRAME,
    "open_timeout": 10,
    "ping_interval": 60,
    "ping_timeout": 30,
    "compression": None,  # small JSON or encrypted bytes: nothing to gain, CPU to lose
}
CLOSE_NOT_REGISTERED: Final = 4003
CLOSE_AUTH_FAILED: Final = 4001
CLOSE_REPLACED: Final = 4004
HANDSHAKE_TIMEOUT_S: Final = 10.0  # for each of the challenge and the welcome
DRAIN_RELINK_S: Final = 1.0  # the longest pause between links while draining after a stop
# An authenticated session that lasted this long resets the reconnect backoff, however it
# ended; one that ends sooner (even with a clean close) backs off further.
STABLE_LINK_S: Final = 10.0
_UNANSWERED_HEARTBEATS: Final = 64  # send times kept for the round trip of their acks
# Unacknowledged results a heartbeat lists as held (about 40 bytes each in its JSON: the
# frame stays far below the 64 KiB a control frame may have).
HEARTBEAT_HELD_RESULTS: Final = 512
# A link replaced (4004) by another process with this node's keys: the daemon links
# again after this pause; replaced again within the window, it stops (LinkReplaced).
REPLACED_PAUSE_S: Final = 60.0
REPLACED_WINDOW_S: Final = 900.0
MAX_ANSWER_BYTES: Final = 1 << 20  # a registration answer is a few hundred bytes
# The whole registration, request and answer: httpx's timeout bounds each read, and an
# answer that trickles in (a byte every 29 s) would hold the link loop for ever.
REGISTER_TIMEOUT_S: Final = 60.0
MAX_RETRY_AFTER_S: Final = 600.0  # a registration's Retry-After is honoured up to this
HEALTH_TIMEOUT_S: Final = 10.0  # /healthz, asked after a refused registration
_MAX_ERROR_CHARS: Final = 300  # of a coordinator's text in last_error and the log


_REPLACED_FIX: Final = (
    "another connection with this node's key replaced this link: two daemons are running "
    "with the same node key (a copied node home?). This one cancelled its running tasks, "
    "and stops if it is replaced again, so that the two do not both run and sign the same "
    "tasks. Each node needs its own home, made with `nodeclient init`. If no other daemon "
    "of yours runs, someone has this node's liveness key: run `nodeclient keys "
    "rotate-liveness`, then start this one again"
)

# The coordinator's reason for 4001 on a live link when a registration of this node
# named another liveness key: a manifest signed with this node's key, by another process.
ROTATED_REASON: Final = "liveness key rotated"
_ROTATED_FIX: Final = (
    "a registration signed with this node's key named another liveness key, and the "
    "coordinator closed this link, which authenticated with the replaced one: two daemons "
    "are running with the same node key and different liveness keys (a copied node home "
    "whose liveness key was rotated?). This one cancelled its running tasks, registers "
    "its own key again after a pause, and stops if it is replaced again, so that the two "
    "do not take the node from each other for ever. Each node needs its own home, made "
    "with `nodeclient init`. If no other daemon of yours runs, someone has this node's "
    "node.key: stop using it (a new node: `nodeclient init` in a new home)"
)


# What a link refused with 426 (or 404, from a proxy that passed the request as plain
# HTTP to a coordinator older than the 426) most likely means.
LINK_PROXY_FIX: Final = (
    "check the coordinator URL; a reverse proxy in front of the coordinator must pass "
    "WebSocket upgrades (the Upgrade and Connection headers) on /v1/link"
)


def _retry_after(resp: httpx.Response, rand: float) -> float:
    """The seconds a 429 or 503 answer's ``Retry-After`` asks for (a number of seconds;
    an HTTP date or nonsense counts as none), at most MAX_RETRY_AFTER_S, stretched by up
    to half again by *rand* in [0, 1), so that the nodes behind one address that were
    refused together do not all come back at the same second."""
    seconds = httpbody.retry_after(resp)
    if seconds is None or seconds <= 0.0:
        return 0.0
    return min(seconds, MAX_RETRY_AFTER_S) * (1.0 + rand / 2)


def chain_id_mismatch(ours: int, health: object, *, home: Path) -> tuple[str, str] | None:
    """What is wrong, and the fix, when the coordinator's ``/healthz`` answer *health*
    names another chain_id than *ours* (config.toml's, in *home*); None when it names
    ours, or none at all (a coordinator from before it sent one, a proxy's answer).

    Every signature binds the chain id (EIP-712): on another chain than the coordinator's,
    the node's registration "recovers to" another address and is refused, which names
    neither chain. ``nodeclient doctor`` and the daemon say it with the same words."""
    theirs = health.get("chain_id") if isinstance(health, dict) else None
    if isinstance(theirs, bool) or not isinstance(theirs, int) or theirs == ours:
        return None
    config = home / CONFIG_FILE
    return (
        f"chain_id {ours} in config.toml is not the coordinator's chain_id {theirs}: the "
        "coordinator refuses every registration and signature of this node",
        f"set chain_id = {theirs} in {config}, then start the node again",
    )


def link_target(url: str) -> tuple[str, dict[str, Any]]:
    """The link's WebSocket URL under coordinator URL *url*, and the TLS arguments of its
    connection: for wss://, the one trust store of every client of the coordinator
    (tlstrust); ws:// takes no SSL context at all. (The scheme's case is any: HTTPS://
    gives wss too.)"""
    ws_url = "ws" + url.rstrip("/")[len("http") :] + "/v1/link"
    secure = urllib.parse.urlsplit(ws_url).scheme == "wss"
    return ws_url, {"ssl": tlstrust.client_context()} if secure else {}


def proxy_fix(exc: BaseException) -> str | None:
    """What to do about a link the coordinator's side answered as plain HTTP, or None."""
    if isinstance(exc, InvalidStatus) and exc.response.status_code in (404, 426):
        return LINK_PROXY_FIX
    return None


class _NoRedirects(connect):
    """websockets' connect(), but a redirect fails the handshake instead of being followed:
    websockets follows one to any host and port, and a hostile coordinator (or whoever
    answers an http:// one) could point the node's link at the operator's own network on
    every reconnect. Registration and input fetches follow none either."""

    def process_redirect(self, exc: Exception) -> Exception | str:
        if not isinstance(exc, InvalidStatus) or "Location" not in exc.response.headers:
            return exc
        moved, fix = tlstrust.redirect_words(exc.response.headers["Location"], self.uri, "/v1/link")
        return InvalidHandshake(f"the link was {moved} ({exc.response.status_code}): {fix}")


class RegistrationRefused(NeedsOperator):
    """The coordinator refused the manifest for a reason retrying will not fix (exit 78:
    the systemd unit does not restart it; the operator has to act first)."""


class LinkReplaced(NeedsOperator):
    """Another process linked with this node's keys, and the coordinator closed this
    daemon's live link for it (4004), twice within REPLACED_WINDOW_S. Linking again
    would close the other one in turn, and the two would take turns for ever, each
    running tasks the other may be given again after a lease ends: this one stops
    instead (exit 78)."""


@dataclass
class LinkInfo:
    status: str = "down"  # down | connecting | up
    since: float = 0.0  # wall clock, shown in status
    since_mono: float = 0.0  # the same moment on the monotonic clock, for durations
    last_heartbeat_ack: float | None = None
    rtt_ms: float | None = None
    reconnects: int = 0
    last_error: str = ""
    sent_at: dict[int, float] = field(default_factory=dict)


class LinkClient(TaskDispatcher):
    """The daemon's link half, above TaskDispatcher: NodeDaemon.__init__ sets the
    attributes declared here."""

    url: str
    home: Path
    manifest: dict[str, Any]
    heartbeat_interval: float
    link: LinkInfo
    _rand: random.SystemRandom
    _fatal: NeedsOperator | None
    _replaced_at: float | None  # when another process last took the link (monotonic)
    _pause: float  # the next reconnect waits at least this long
    _replaced_while_stopping: bool  # a 4004 during the drain: link no more
    _unstake_record: tuple[str, int] | None  # (coordinator_id, until) kept in the outbox
    _registered: bool  # the manifest as it is now is registered: the next link needs none
    _generation: int  # bumped at each change of the manifest's classes (_registered's)
    _register_lock: asyncio.Lock  # one registration at a time, of the manifest as it is then

    # --- registration and link ----------------------------------------------------------------

    async def register(self) -> dict[str, Any]:
        self.manifest = manifest_mod.reissue_manifest(
            self.manifest,
            node_key=self._node_key,
            payload_key=self._payload_key,
            issued_at=int(self.clock.now()),
            chain_id=self.chain_id,
        )
        try:
            async with (
                asyncio.timeout(REGISTER_TIMEOUT_S),
                httpx.AsyncClient(timeout=30.0, verify=tlstrust.client_context()) as client,
            ):
                request = client.build_request(
                    "POST", f"{self.url}/v1/nodes", json=self.manifest, headers=httpbody.IDENTITY
                )
                resp = await client.send(request, stream=True)
                try:  # read as sent, never inflated, and no more than an answer could hold
                    content = await httpbody.aread(resp, limit=MAX_ANSWER_BYTES)
                finally:
                    await resp.aclose()
        except httpbody.AnswerRefused as exc:  # retried, as any failed registration
            raise httpx.HTTPError(f"registration failed: {exc}: check --coordinator") from exc
        except TimeoutError as exc:  # retried with backoff, like a connection that failed
            raise httpx.HTTPError(
                f"registration failed: no complete answer within {REGISTER_TIMEOUT_S:.0f} s: "
                "check --coordinator"
            ) from exc
        moved = tlstrust.redirect_message(resp, "/v1/nodes")
        if moved is not None:  # a proxy's http:// to https://, say: followed by no client
            raise httpx.HTTPError(f"registration failed ({resp.status_code}): {moved}")
        text = content.decode("utf-8", "replace")
        try:
            body = json.loads(content) if content else {}
        except (ValueError, RecursionError):  # not JSON, not UTF-8, nested without end
            body = None
        if not isinstance(body, dict):
            # Not the coordinator's answer (a reverse proxy's HTML error page, a redirect):
            # retried with backoff, whatever the status code.
            kind = resp.headers.get("content-type", "no content type")
            raise httpx.HTTPError(
                f"registration failed ({resp.status_code}): the answer is not a JSON object "
                f"({kind}): {text[:200]!r}"
            )
        if resp.status_code in (200, 201):
            # Every challenge must name it, held to the challenge's rule (<= 128 chars). An
            # answer without one is refused too (every release names it): else the
            # coordinator could switch off the check, and relay another's challenge here.
            try:
                coordinator = messages.coordinator_id_of(body)
            except RemoteProtocolError as exc:  # retried, as any failed registration
                raise httpx.HTTPError(
                    f"registration failed ({resp.status_code}): the answer's {exc}: check "
                    "--coordinator"
                ) from exc
            self.session.registered_with = coordinator
            prior = body.get("prior_registrations")  # only logged: never a reason to fail
            log.info(
                "node.registered",
                extra={
                    "status": body.get("status"),
                    "prior": len(prior) if isinstance(prior, list) else 0,
                    "coordinator_id": self.session.registered_with,
                },
            )
            return body
        error = body.get("error")
        # The coordinator's text, as much as a line of status or log should hold.
        reason = (error if isinstance(error, str) and error else text or "no reason")[
            :_MAX_ERROR_CHARS
        ]
        # Final (exit 78, no restart) only for the coordinator's own refusal: a 4xx with its
        # {"error": ...}, but 409 (below). 408 and 429 (a timeout, or a rate limit: the
        # coordinator's per address, or a proxy's) pass, and so does a 4xx without the
        # coordinator's error (an empty 404 or 403 from a proxy in front of it, mid-deploy):
        # retried with backoff, and shown in status meanwhile.
        refusal = isinstance(error, str) and bool(error)
        if resp.status_code in (429, 503):
            self._pause = max(self._pause, _retry_after(resp, self._rand.random()))
        if resp.status_code == 409:
            # "stale manifest" (the one on record was issued later, on a clock that ran up
            # to 5 min ahead and was then set right), or an issued_at too far from the
            # coordinator's clock (this one, or the coordinator's, is off). Each try issues
            # a new manifest, so this clears by itself once the clocks agree: retried.
            raise httpx.HTTPError(
                f"registration refused for now ({resp.status_code}): {reason}; retried until "
                "this node's clock and the coordinator's agree (`timedatectl` shows whether "
                "this one is synchronised)"
            )
        if 400 <= resp.status_code < 500 and resp.status_code not in (408, 429) and refusal:
            # A refused signature says which address it recovers to, not why: the chain id
            # is the usual cause, and the coordinator's /healthz names its own.
            mismatch = await self._chain_id_mismatch()
            if mismatch is not None:
                reason = "; fix: ".join(mismatch)
            raise RegistrationRefused(f"registration refused ({resp.status_code}): {reason}")
        raise httpx.HTTPError(f"registration failed ({resp.status_code}): {reason}")

    async def _register_current(self) -> None:
        """Register the manifest as it is now, one registration at a time (each issued
        later than the one before, so the last to land is the latest); registered, unless
        its classes changed meanwhile (then the next registration sends the change)."""
        async with self._register_lock:
            generation = self._generation
            await self.register()
        self._registered = generation == self._generation

    async def _register_again(self) -> None:
        """Register the manifest as it is now while the link stays up (a class withdrawn
        or offered again since); one that fails is made again before the next link, or
        after its welcome (_connect_once)."""
        try:
            await self._register_current()
        except (httpx.HTTPError, OSError, RemoteProtocolError, RegistrationRefused) as exc:
            log.warning("node.register_again_failed", extra={"error": str(exc)[:300]})

    async def _chain_id_mismatch(self) -> tuple[str, str] | None:
        """:func:`chain_id_mismatch` by the coordinator's ``/healthz``, asked once its
        registration was refused (only then: the answer costs a request, and a refusal
        stops the daemon); None where it names no other chain or cannot be read (the
        coordinator's own reason is shown then)."""
        verify = tlstrust.client_context()  # the trust registration used a moment ago
        try:
            async with (
                asyncio.timeout(HEALTH_TIMEOUT_S),
                httpx.AsyncClient(timeout=HEALTH_TIMEOUT_S, verify=verify) as client,
            ):
                request = client.build_request(
                    "GET", f"{self.url}/healthz", headers=httpbody.IDENTITY
                )
                resp = await client.send(request, stream=True)
                try:
                    content = await httpbody.aread(resp, limit=MAX_ANSWER_BYTES)
                finally:
                    await resp.aclose()
        except (httpx.HTTPError, OSError, TimeoutError):  # AnswerRefused is an HTTPError
            return None
        if resp.status_code != 200:
            return None
        try:
            health = json.loads(content)
        except (ValueError, RecursionError):
            return None
        return chain_id_mismatch(self.chain_id, health, home=self.home)

    async def _link_loop(self) -> None:
        delays = backoff(rand=self._rand.random)
        self._registered = False
        # After a stop, the link is made again while the drain may still need it (results
        # still running or unsent), so what the grace finished is still sent, until run()
        # cancels this (dispatches on such a link are refused as draining).
        while not self._stopping.is_set() or self._drain_needs_link():
            try:
                if not self._registered:
                    await self._register_current()
                await self._connect_once()
            except RegistrationRefused as exc:
                log.error("node.registration_refused", extra={"reason": str(exc)})
                self.link.last_error = str(exc)
                self._fatal = exc
                self._stopping.set()
                raise
            except ConnectionClosed as exc:
                if self._link_closed(exc):
                    # The coordinator lost the node's record (a restored database), or
                    # refused its auth (a clock that jumped): register again, freshly issued.
                    self._registered = False
            except (OSError, httpx.HTTPError, InvalidHandshake, InvalidURI, TimeoutError) as exc:
                self._link_failed(exc)
            except CoordinatorMismatch as exc:  # its id changed, or a relay: ask it again
                self.link.last_error = str(exc)[:_MAX_ERROR_CHARS]
                log.error("link.coordinator_mismatch", extra={"error": self.link.last_error})
                self._registered = False
            except RemoteProtocolError as exc:
                self.link.last_error = str(exc)[:_MAX_ERROR_CHARS]
                log.error("link.protocol_error", extra={"error": self.link.last_error})
            except Exception as exc:  # a bug: say so, and reconnect like after any other error
                self.link.last_error = f"{type(exc).__name__}: {exc}"[:_MAX_ERROR_CHARS]
                log.error("link.error", extra={"error": self.link.last_error}, exc_info=exc)
            # Reset after a session that was authenticated and stayed up, however it ended:
            # drops spread over months must not add up to the cap, and a coordinator that
            # closes every link at once (even cleanly) must not be hammered.
            # (On the monotonic clock: a step of the wall clock says nothing of how long.)
            up_for = self.clock.monotonic() - self.link.since_mono
            if self.link.status == "up" and up_for >= STABLE_LINK_S:
                delays = backoff(rand=self._rand.random)
            self._set_link("down")
            draining = self._stopping.is_set()
            if draining and not self._drain_needs_link():
                return
            self.link.reconnects += 1
            delay, self._pause = max(next(delays), self._pause), 0.0
            if draining:  # the flush has seconds, not minutes
                await asyncio.sleep(min(delay, DRAIN_RELINK_S))
                continue
            with contextlib.suppress(TimeoutError):  # a stop wakes it: link now to flush
                async with asyncio.timeout(delay):  # not wait_for: it may drop a cancel
                    await self._stopping.wait()

    def _link_failed(self, exc: Exception) -> None:
        """Show and log a registration or link that failed on the way (no connection, a
        refused certificate, a proxy's answer), with what to do about a refused
        certificate."""
        error = f"{type(exc).__name__}: {exc}"[:_MAX_ERROR_CHARS]
        fix = tlstrust.trust_fix(exc) or proxy_fix(exc)
        if fix is None:
            self.link.last_error = error
            log.warning("link.error", extra={"error": error})
        else:  # what to do, in the log and in `nodeclient status`
            self.link.last_error = f"{error}; fix: {fix}"
            log.warning("link.error", extra={"error": error, "fix": fix})

    def _drain_needs_link(self) -> bool:
        """Whether a stopping daemon still needs its link: tasks still running (their
        results, or their hand-backs, are to be sent) or results not yet acknowledged,
        and no other process took the link lately (linking again would take it back
        from that one, whose tasks would then be abandoned)."""
        if self._replaced_while_stopping or (
            self._replaced_at is not None
            and self.clock.monotonic() - self._replaced_at <= REPLACED_WINDOW_S
        ):
            return False
        return bool(self.running) or self.outbox.backlog(self.session.coordinator_id) > 0

    def _link_closed(self, exc: ConnectionClosed) -> bool:
        """Log how the coordinator closed the link; True when the node must register again.

        4004 on the live link means another process linked with this node's keys, and 4001
        "liveness key rotated" that another process registered this node with its own
        liveness key: cancel the running tasks and link again (register again, for the
        latter) after REPLACED_PAUSE_S; the second time within REPLACED_WINDOW_S, stop
        (LinkReplaced) rather than take the node back in turn.
        """
        code = exc.rcvd.code if exc.rcvd else None
        reason = exc.rcvd.reason if exc.rcvd else ""
        self.link.last_error = f"closed {code}: {reason}"
        rotated = code == CLOSE_AUTH_FAILED and reason.startswith(ROTATED_REASON)
        if code != CLOSE_REPLACED and not rotated:
            log.warning("link.closed", extra={"code": code, "reason": reason})
            return code in (CLOSE_NOT_REGISTERED, CLOSE_AUTH_FAILED)
        fix = _ROTATED_FIX if rotated else _REPLACED_FIX
        if self._stopping.is_set():  # stopping anyway: link no more, the other process has it
            log.error("link.replaced", extra={"code": code, "reason": reason})
            self._replaced_while_stopping = True
            return False
        # The running tasks go either way: the other process holds the link now.
        self._abandon_running()
        now = self.clock.monotonic()  # a wall clock stepped back would shrink the window
        again = self._replaced_at is not None and now - self._replaced_at <= REPLACED_WINDOW_S
        self._replaced_at = now
        log.error(
            "link.replaced",
            extra={
                "code": code,
                "reason": reason,
                "action": "stopping" if again else f"linking again in {REPLACED_PAUSE_S:.0f} s",
                "fix": fix,
            },
        )
        if not again:  # once may be a fluke (a proxy's): link again, after a pause
            self._pause = REPLACED_PAUSE_S
            return rotated  # its own key registered again, for the link to authenticate
        self._fatal = LinkReplaced(fix)
        self._set_link("down")
        self._stopping.set()
        raise self._fatal from None

    def _set_link(self, status: str) -> None:
        if self.link.status != status:
            self.link.status = status
            self.link.since = self.clock.now()
            self.link.since_mono = self.clock.monotonic()
            log.info("link.status", extra={"link": status})
        if status != "up":
            self._ws = None
            self.link.rtt_ms = None  # of a link that is gone: not shown beside "down"
            self.session.connection_lost()

    async def _connect_once(self) -> None:
        ws_url, tls = link_target(self.url)
        self._set_link("connecting")
        async with _NoRedirects(ws_url, **LINK_OPTIONS, **tls) as ws:
            # asyncio.timeout, not wait_for: on 3.11 wait_for drops a cancel (a stop) that
            # arrives as the frame does, and the link would live on after the stop.
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                challenge = messages.parse_from_coordinator(await ws.recv())
            if not isinstance(challenge, messages.Challenge):
                raise RemoteProtocolError("expected a challenge as the first frame")
            await ws.send(json.dumps(self.session.on_challenge(challenge)))
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                welcome = messages.parse_from_coordinator(await ws.recv())
            if not isinstance(welcome, messages.Welcome):
                raise RemoteProtocolError(f"expected welcome, got {type(welcome).__name__}")
            self.session.on_welcome(welcome)
            self._ws = ws
            self._set_link("up")
            if not self._registered:  # its classes changed as the link was being made
                self._background(self._register_again())
            self._apply_unstaking(welcome=True)
            log.info("link.authenticated", extra={"coordinator_id": challenge.coordinator_id})
            beat = asyncio.create_task(self._heartbeats(ws, challenge.heartbeat_interval))
            beat.add_done_callback(lambda task: self._heartbeats_ended(ws, task))
            try:
                self._resent_at = time.monotonic()
                # The backlog goes out while this link's frames are read: awaited first, a
                # long one (a slow uplink after an outage) left its acknowledgements, cancels
                # and pongs unread, until the keepalive closed the link and they were lost.
                self._resend = self._background(
                    self._send_backlog(), context=logs.context_without("task_id", "job_id")
                )
                async for frame in ws:
                    await self._on_frame(frame)
            finally:
                beat.cancel()
                if self._resend is not None:  # a full backlog's, on this link
                    self._resend.cancel()
                # Its own end (a send on the closed link, usually) is the link's: retrieve it,
                # so that asyncio does not log it later as an exception never retrieved.
                await asyncio.gather(beat, return_exceptions=True)

    def _heartbeats_ended(self, ws: ClientConnection, task: asyncio.Task[None]) -> None:
        """The heartbeat task ended other than by the link's end or a cancel (a bug): said,
        and the link closed, so that a new one starts now rather than the coordinator
        finding this node silent, and offline, three intervals later."""
        if task.cancelled() or isinstance(task.exception(), ConnectionClosed | None):
            return
        log.error("link.heartbeat_failed", exc_info=task.exception())
        self._background(ws.close(1011, "heartbeats failed"))

    async def _heartbeats(self, ws: ClientConnection, coordinator_interval: float) -> None:
        interval = min(self.heartbeat_interval, coordinator_interval)
        while True:
            # The tasks this node holds: running, and (the oldest few hundred) finished with
            # a result this coordinator has not acknowledged yet, which it may be sending
            # now. The coordinator re-queues at once a lease its node does not hold.
            try:
                held = self.outbox.pending_ids(
                    coordinator_id=self.session.coordinator_id, limit=HEARTBEAT_HELD_RESULTS
                )
            except (OSError, sqlite3.Error) as exc:  # a failing disk: beat all the same
                log.warning("heartbeat.held_unread", extra={"error": f"{exc}"[:300]})
                held = []
            running = list(dict.fromkeys([*self.running, *held]))
            load = int(os.getloadavg()[0] / max(1, os.cpu_count() or 1) * 1000)
            frame = self.session.heartbeat(
                state=self.state.state, running=running, load_permille=load
            )
            self.link.sent_at[self.session.seq] = time.monotonic()
            if len(self.link.sent_at) > _UNANSWERED_HEARTBEATS:  # a coordinator that never acks
                del self.link.sent_at[min(self.link.sent_at)]
            await ws.send(json.dumps(frame))
            await asyncio.sleep(interval)

    async def _on_frame(self, frame: str | bytes) -> None:
        try:
            msg = messages.parse_from_coordinator(frame)
        except RemoteProtocolError as exc:
            log.warning("link.bad_frame", extra={"error": str(exc)[:_MAX_ERROR_CHARS]})
            return
        if isinstance(msg, messages.HeartbeatAck):
            sent = self.link.sent_at.pop(msg.seq, None)
            self.link.sent_at = {s: t for s, t in self.link.sent_at.items() if s > msg.seq}
            if sent is not None:
                self.link.rtt_ms = round((time.monotonic() - sent) * 1000, 2)
            self.link.last_heartbeat_ack = self.clock.now()
            self.coordinator_clock.saw(msg.server_time)
            self.session.on_heartbeat_ack(msg)
            self._apply_unstaking()
        elif isinstance(msg, messages.Dispatch):
            await self._on_dispatch(msg)
        elif isinstance(msg, messages.ResultAck) and msg.of == "reject":
            # Rejects are not kept in the outbox: the answer settles nothing there (a result
            # of the same task, committed for a newer lease, waits for its own answer).
            level = logging.INFO if msg.status == "accepted" else logging.WARNING
            log.log(
                level,
                "reject.ack",
                extra={**self._ids(msg.task_id), "status": msg.status, "reason": msg.reason},
            )
        elif isinstance(msg, messages.ResultAck):
            if not await self._record_ack(msg):
                return
            level = logging.INFO if msg.status != "rejected" else logging.WARNING
            log.log(
                level,
                "result.ack",
                extra={**self._ids(msg.task_id), "status": msg.status, "reason": msg.reason},
            )
        elif isinstance(msg, messages.Cancel):
            task = self.running.get(msg.task_id)
            ids = {"task_id": str(msg.task_id), "job_id": str(task.job_id)} if task else {}
            if task and task.finishing:  # executed: its result is committed and sent anyway
                log.info("task.cancel_too_late", extra=ids)
            elif task and task.handle:
                task.stop_reason = msg.reason  # logged once, as its run unwinds
                task.handle.cancel()
                timed_out = msg.reason == "lease ended"  # the coordinator's lease expired
                self._task_ended(task, "timed_out" if timed_out else "cancelled")
        elif isinstance(msg, messages.ErrorFrame):
            log.warning("link.error_frame", extra={"code": msg.code, "reason": msg.reason})

    def _apply_unstaking(self, *, welcome: bool = False) -> None:
        until = self.session.unstaking_until
        if until is not None and self.state.state is not NodeState.UNSTAKING:
            self.state.transition(NodeState.UNSTAKING, reason="unstake accepted by the coordinator")
        self._keep_unstake(until, welcome=welcome)

    def _keep_unstake(self, until: int | None, *, welcome: bool) -> None:
        """Keep the unstake the coordinator confirmed in the outbox database (a write only
        when it changes), so that a restarted daemon shows UNSTAKING, and takes no work,
        before it links again (NodeDaemon.restore_unstake). A welcome without one drops
        the record: the coordinator has none on record, so this daemon stays UNSTAKING
        (the state is terminal) but the next start takes work again."""
        coordinator = self.session.coordinator_id or ""
        record = self._unstake_record
        if until is not None and record != (coordinator, until):
            self._unstake_record = (coordinator, until)
        elif until is None and welcome and record is not None:
            self._unstake_record = None
            log.warning(
                "unstake.not_on_record",
                extra={
                    "coordinator_id": coordinator,
                    "recorded_by": record[0],
                    "recorded_until": record[1],
                    "hint": "this coordinator has no unstake on record for this node: the "
                    "daemon stays UNSTAKING and takes no work until it is restarted",
                },
            )
        else:
            return
        try:
            self.outbox.record_unstake(self.url, coordinator, until)
        except (OSError, sqlite3.Error) as exc:  # shown again after a restart only once linked
            log.warning("unstake.not_recorded", extra={"error": str(exc)})
