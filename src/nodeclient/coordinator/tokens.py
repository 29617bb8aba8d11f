"""Bearer tokens for the coordinator's requester API and its /metrics (docs: "HTTP API").

Nodes prove who they are by signatures (registration, link, unstake); requesters and
scrapers have no key the coordinator knows. A coordinator reachable from other machines
therefore takes ``--requester-token-file`` (``POST /v1/jobs``, ``POST /v1/blobs`` and every
read under ``/v1/jobs`` and ``/v1/tasks``) and ``--metrics-token-file`` (``/metrics``);
without them those routes are open, as on the loopback devnet. Everything a node uses
stays open: registration and unstake are signed, the link authenticates by signature,
``GET /v1/blobs/{sha256}`` serves content by its hash (a node learns the hash only from a
payload sealed to it), and ``/healthz``, ``GET /v1/nodes`` and ``GET /v1/manifests``
(what nodes sign to be checked by anyone) hold nothing secret.

A token file holds one token per line (``#`` starts a comment); it is a secret, so it
must be a regular file owned by the coordinator's user with no group or other bits, like
a node's key files. The coordinator keeps only the SHA-256 of each token and compares
digests, re-reads the file at most once a second when it changed (its contents, inode,
mode or owner: adding or revoking a requester needs no restart), and fails closed: a
file that turned unreadable or unsafe refuses every request to its routes until it is
fixed. Each token is a requester of its own: the jobs it submits record its SHA-256
(``jobs.requester``), and it reads and cancels only those (``store.readable_by``).
``nodeclient-coordinator token new --file PATH`` appends a fresh token.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import secrets
import shlex
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from starlette.types import ASGIApp, Receive, Scope, Send

from nodeclient.coordinator.api import REQUESTER_KEY, error
from nodeclient.errors import UsageError

log = logging.getLogger("nodeclient.coordinator.http")

MIN_TOKEN_CHARS: Final = 16
MAX_TOKEN_CHARS: Final = 512
MAX_FILE_BYTES: Final = 1 << 20  # about 20,000 tokens
RELOAD_CHECK_S: Final = 1.0
NEW_TOKEN_BYTES: Final = 32  # 43 characters of URL-safe base64: 256 bits


class TokenFileError(UsageError):
    """A token file that cannot be used: missing, unsafe, malformed."""


def _problem(path: Path, st: os.stat_result) -> str | None:
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    if st.st_uid != os.geteuid():
        return f"{path} is owned by uid {st.st_uid}, not uid {os.geteuid()}; fix: chown it"
    if mode & 0o077:
        return (
            f"{path} has mode {mode:04o}: others may read its tokens; "
            f"fix: chmod 600 {shlex.quote(str(path))}"
        )
    if st.st_size > MAX_FILE_BYTES:
        return f"{path} holds {st.st_size} bytes, more than a token file's {MAX_FILE_BYTES}"
    return None


def parse_tokens(text: str, path: Path) -> list[str]:
    """The tokens in a token file's text, in order; raises on a malformed line."""
    tokens = []
    for number, line in enumerate(text.splitlines(), start=1):
        token = line.split("#", 1)[0].strip()
        if not token:
            continue
        if any(c.isspace() for c in token) or not token.isprintable() or not token.isascii():
            raise TokenFileError(f"{path} line {number}: a token is one word of printable ASCII")
        if not MIN_TOKEN_CHARS <= len(token) <= MAX_TOKEN_CHARS:
            raise TokenFileError(
                f"{path} line {number}: a token has {MIN_TOKEN_CHARS} to {MAX_TOKEN_CHARS} "
                "characters (`nodeclient-coordinator token new` makes one)"
            )
        tokens.append(token)
    return tokens


def _identity(st: os.stat_result) -> tuple[int, ...]:
    """What changes when the file is replaced, written, or has its mode or owner changed
    (chmod and chown touch only the ctime)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def read_token_file(path: Path) -> tuple[list[str], tuple[int, ...]]:
    """The tokens of *path* and the identity of the file they were read from."""
    try:
        fd, st = _open_checked(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise TokenFileError(
            f"no token file at {path}; "
            f"fix: `nodeclient-coordinator token new --file {shlex.quote(str(path))}`"
        ) from None
    try:
        data = os.read(fd, MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise TokenFileError(f"cannot read the token file {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    try:
        text = data[:MAX_FILE_BYTES].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TokenFileError(f"{path} is not UTF-8 text: {exc}") from exc
    return parse_tokens(text, path), _identity(st)


def _open_checked(path: Path, flags: int) -> tuple[int, os.stat_result]:
    """Open *path* (never through a symlink) and check the open file as a token file
    (:func:`_problem`); its descriptor and stat. TokenFileError, the descriptor closed,
    if it may not be used; FileNotFoundError as it comes."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise TokenFileError(f"cannot open the token file {path}: {_why(exc)}") from exc
    try:
        st = os.fstat(fd)
        problem = _problem(path, st)
    except OSError as exc:
        os.close(fd)
        raise TokenFileError(f"cannot read the token file {path}: {exc.strerror}") from exc
    if problem is not None:
        os.close(fd)
        raise TokenFileError(f"refusing the token file: {problem}")
    return fd, st


def _why(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "it is a symlink; fix: name the file itself, not a link to it"
    return str(exc.strerror)


def _digest(token: str | bytes) -> bytes:
    return hashlib.sha256(token.encode() if isinstance(token, str) else token).digest()


class TokenSet:
    """The accepted tokens of one file, kept as SHA-256 digests and reloaded on change.

    *clock* is a monotonic clock (tests pass their own). Built from a file that cannot
    be used, it raises :class:`TokenFileError`: a coordinator does not start that way.
    """

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._clock = clock
        tokens, self._seen = read_token_file(path)
        self._digests: frozenset[bytes] | None = frozenset(map(_digest, tokens))
        self._checked = clock()
        log.info("auth.tokens_loaded", extra={"path": str(path), "tokens": len(tokens)})

    def __len__(self) -> int:
        return len(self._digests or ())

    def _refresh(self) -> None:
        now = self._clock()
        if now - self._checked < RELOAD_CHECK_S:
            return
        self._checked = now
        try:
            st = os.stat(self.path)
            if _identity(st) == self._seen and self._digests is not None:
                return
            tokens, self._seen = read_token_file(self.path)
        except (OSError, TokenFileError) as exc:
            if self._digests is not None:  # logged once, when it turns bad
                log.error("auth.token_file_unusable", extra={"path": str(self.path),
                          "error": str(exc), "action": "every request to its routes is "
                          "refused until the file is fixed"})  # fmt: skip
            self._digests, self._seen = None, ()
            return
        self._digests = frozenset(map(_digest, tokens))
        log.info("auth.tokens_loaded", extra={"path": str(self.path), "tokens": len(tokens)})

    def check(self, presented: bytes | None) -> str | None:
        """None when *presented* (the bearer token, or None for no header) is accepted;
        otherwise why not, for the 401/503 answer."""
        self._refresh()
        if self._digests is None:
            return "unusable"
        if presented is None:
            return "missing"
        return None if _digest(presented) in self._digests else "wrong"


REQUESTER: Final = "requester"
METRICS: Final = "metrics"


def requester_id(token: str | bytes) -> str:
    """Who a requester token speaks for: its SHA-256, hex (``jobs.requester``; which jobs
    it may read: ``store.readable_by``)."""
    return _digest(token).hex()


def route_kind(method: str, path: str) -> str | None:
    """Which token set guards an HTTP request, or None for the routes left open."""
    if path == "/metrics":
        return METRICS
    if path in ("/v1/jobs", "/v1/tasks") or path.startswith(("/v1/jobs/", "/v1/tasks/")):
        return REQUESTER
    if path == "/v1/blobs" and method != "GET":
        return REQUESTER
    return None


def bearer(scope: Scope) -> bytes | None:
    """The token of an ``Authorization: Bearer`` header, or None."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = bytes(value).partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
            return None
    return None


class TokenAuth:
    """ASGI middleware: refuse a guarded route without an accepted token, before any
    route (or the body limit) reads its body. WebSocket scopes pass untouched."""

    def __init__(self, app: ASGIApp, *, guards: dict[str, TokenSet]) -> None:
        self.app = app
        self.guards = guards

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.guards:
            await self.app(scope, receive, send)
            return
        kind = route_kind(scope["method"], scope["path"])
        guard = self.guards.get(kind) if kind is not None else None
        token = bearer(scope)
        verdict = guard.check(token) if guard is not None else None
        if verdict is None:
            if kind == REQUESTER and token is not None and guard is not None:
                scope.setdefault("state", {})[REQUESTER_KEY] = requester_id(token)
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        log.info("http.unauthorized", extra={"path": scope["path"], "kind": kind,
                 "why": verdict, "client": client[0] if client else None})  # fmt: skip
        if verdict == "unusable":
            response = error(503, f"the coordinator's {kind} token file is unusable: its "
                             "operator must fix it (see the coordinator's log)")  # fmt: skip
        else:
            said = "no bearer token" if verdict == "missing" else "the token is not accepted"
            response = error(401, f"{said}: {kind} routes of this coordinator need "
                             "`Authorization: Bearer <token>` (nodeclient-coordinator: "
                             "--token-file or $NODECLIENT_COORDINATOR_TOKEN)")  # fmt: skip
            response.headers["www-authenticate"] = 'Bearer realm="nodeclient-coordinator"'
        response.headers["connection"] = "close"  # the body, if any, is not read
        await response(scope, receive, send)


def new_token() -> str:
    return secrets.token_urlsafe(NEW_TOKEN_BYTES)


def append_token(path: Path, token: str, *, label: str | None = None) -> None:
    """Append *token* to the token file at *path*, creating it mode 0600 if missing; an
    existing file must pass the same checks as when the coordinator reads it."""
    if label is not None and (not label.isprintable() or "#" in label):
        raise TokenFileError("a token's label is one line of printable text without '#'")
    try:
        fd, st = _open_checked(path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
    except FileNotFoundError as exc:  # its directory is missing
        raise TokenFileError(f"cannot open the token file {path}: {exc.strerror}") from exc
    try:
        # A last line without its newline (written by hand) is ended first.
        lead = "\n" if st.st_size and os.pread(fd, 1, st.st_size - 1) != b"\n" else ""
        comment = f"  # {label}" if label else ""
        _append_whole(fd, f"{lead}{token}{comment}\n".encode(), st.st_size)
    except OSError as exc:
        raise TokenFileError(
            f"cannot write the token file {path}: {exc.strerror}; it is as it was"
        ) from exc
    finally:
        os.close(fd)


def _append_whole(fd: int, data: bytes, size: int) -> None:
    """Append *data* and make it durable, or cut the file back to *size* and raise: a
    token cut short by a full disk would make the file unusable (refusing every
    requester), or worse, accept a prefix of the token it printed."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError:
        os.ftruncate(fd, size)
        os.fsync(fd)
        raise
