"""The app factory: wire config, clock, SQL, routes, the link endpoint and the scheduler.

``create_app`` is cheap and does no network I/O: it opens the database (creating the
tables), loads the node cache and returns a FastAPI app. The scheduler starts with the
app's lifespan, so the same factory serves ``nodeclient-coordinator serve``, the devnet
and the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shlex
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Final

from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from nodeclient import __version__
from nodeclient.clock import Clock, SystemClock
from nodeclient.coordinator.api import (
    BodyLimit,
    Stalls,
    body_limit,
    body_limit_hint,
    build_router,
    disk_full,
    error,
)
from nodeclient.coordinator.blobstore import forget_jobs, sweep_once, warn_job_retention
from nodeclient.coordinator.config import CoordinatorConfig
from nodeclient.coordinator.link import LinkSession, ServerHooks
from nodeclient.coordinator.openapi import with_bearer
from nodeclient.coordinator.registry import forget_manifests, forget_nodes
from nodeclient.coordinator.scheduler import Scheduler, fail_stalled_jobs
from nodeclient.coordinator.service import Coordinator
from nodeclient.coordinator.store import ClaimLost, Database, is_unavailable
from nodeclient.coordinator.tokens import METRICS, REQUESTER, TokenAuth, TokenSet
from nodeclient.errors import UsageError, is_disk_full

log = logging.getLogger("nodeclient.coordinator.http")
housekeeping_logger = logging.getLogger("nodeclient.coordinator.housekeeping")
db_log = logging.getLogger("nodeclient.coordinator.database")

# How often a coordinator on PostgreSQL checks that it still holds the database's
# advisory lock (one coordinator per database): a server restart or a terminated session
# drops it without a word, and another coordinator could then start on the same database.
CLAIM_CHECK_INTERVAL_S = 30.0
DATABASE_UNAVAILABLE: Final = "the coordinator's database is unavailable; try again shortly"
RETRY_AFTER_S: Final = 5
# While the database stays unavailable, a reminder with the count of failed requests at
# most this often (a busy API would otherwise log every request).
OUTAGE_LOG_INTERVAL_S: Final = 60.0


async def housekeeping(coord: Coordinator, scheduler: Scheduler) -> None:
    """Every ``blob_sweep_interval`` seconds (an hour), for as long as it runs: fail the
    jobs that waited past the queue timeout, delete the finished jobs and the nodes past
    their retention and the manifests nothing names any more, then sweep the blob store.
    A step that fails is logged and tried again next time; the others run regardless."""
    steps: tuple[tuple[str, Callable[[], Awaitable[object]]], ...] = (
        ("jobs.stall_check_failed", lambda: fail_stalled_jobs(coord, scheduler)),
        ("jobs.forget_failed", lambda: forget_jobs(coord)),
        ("nodes.forget_failed", lambda: forget_nodes(coord)),
        ("manifests.forget_failed", lambda: forget_manifests(coord)),
        ("blobs.sweep_failed", lambda: sweep_once(coord)),
    )
    try:
        await warn_job_retention(coord)
    except Exception:  # only a warning: the sweeps go on
        housekeeping_logger.exception("jobs.count_failed")
    while True:
        await asyncio.sleep(coord.config.blob_sweep_interval)
        for event, step in steps:
            try:
                await step()
            except Exception:  # a full disk, a database hiccup: try again next time
                housekeeping_logger.exception(event)


async def watch_claim(db: Database, *, interval: float) -> ClaimLost:
    """Every *interval* seconds, check that this coordinator still holds its database
    (:meth:`Database.check_claim`): a claim that went away with its session is taken
    again (``database.claim_retaken``). Returns, having logged ``database.claim_lost``,
    once another coordinator holds it: two would lease and accept the same tasks."""
    while True:
        await asyncio.sleep(interval)
        try:
            held = await db.check_claim()
        except ClaimLost as exc:
            db_log.error(
                "database.claim_lost",
                extra={"error": str(exc), "action": "this coordinator stops serving"},
            )
            return exc
        except DBAPIError as exc:  # the database unreachable: checked again next time
            db_log.debug("database.claim_check_failed", extra={"error": str(exc)})
            continue
        except Exception:  # noqa: BLE001 (a bug: logged with its trace, checked again next time)
            db_log.exception("database.claim_check_failed")
            continue
        if not held:
            db_log.warning(
                "database.claim_retaken",
                extra={"action": "the database's session was lost (a restart?); taken again"},
            )


class DatabaseOutage:
    """An outage as the HTTP API meets it, logged as it begins (``database.unavailable``),
    at most every OUTAGE_LOG_INTERVAL_S while it lasts, and once a database call succeeds
    again (``database.back``), instead of a traceback per request."""

    def __init__(self, db: Database, monotonic: Callable[[], float]) -> None:
        self._db = db
        self._monotonic = monotonic
        self.down = False
        self._since = self._logged = 0.0
        self._failed = 0
        self._mark = 0  # the database's successful calls when the last request failed

    def failed(self, exc: BaseException, where: dict[str, object]) -> None:
        """A request failed on the database."""
        now = self._monotonic()
        self._mark = self._db.calls_ok
        self._failed += 1
        if not self.down:
            self.down, self._since, self._logged, self._failed = True, now, now, 1
            db_log.warning("database.unavailable", extra={**where, "error": str(exc)})
        elif now - self._logged >= OUTAGE_LOG_INTERVAL_S:
            self._logged = now
            db_log.warning(
                "database.still_unavailable",
                extra={"failed_requests": self._failed, "down_s": round(now - self._since, 1)},
            )

    def poll(self) -> None:
        """After a request: whether a database call succeeded since the last failure."""
        if self.down and self._db.calls_ok != self._mark:
            self.down = False
            db_log.warning(
                "database.back",
                extra={
                    "failed_requests": self._failed,
                    "down_s": round(self._monotonic() - self._since, 1),
                },
            )


class OutageWatch:
    """ASGI middleware: after each request during an outage, whether it has ended."""

    def __init__(self, app: ASGIApp, outage: DatabaseOutage) -> None:
        self.app = app
        self.outage = outage

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            if self.outage.down:
                self.outage.poll()


class Serving:
    """What runs beside the server, from its start to its stop: the scheduler, the
    housekeeping and the check of the claim on the database (the app's lifespan)."""

    def __init__(self, coord: Coordinator, scheduler: Scheduler) -> None:
        self.coord = coord
        self.scheduler = scheduler
        self.lost: ClaimLost | None = None  # the claim on the database, once lost
        self._background: list[asyncio.Task[None]] = []
        self._stopping: asyncio.Future[None] | None = None

    async def stop(self) -> None:
        """Stop the background work, close the links and the database, once: a second
        caller waits for the first's stop, and cancelling a caller (a shutdown arriving
        while a lost claim stops the coordinator) does not cut that stop short."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop())
        await asyncio.shield(self._stopping)

    async def _stop(self) -> None:
        coord = self.coord
        for task in self._background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await coord.stop_background()  # dispatches and cancels in flight, before the db
        for link in list(coord.links.values()):
            await link.close(1001, "coordinator shutting down")
        await coord.heartbeats.close()  # what was acknowledged before its commit
        coord.close_cpu()
        coord.db.close()

    async def _guard_claim(self) -> None:
        self.lost = await watch_claim(self.coord.db, interval=CLAIM_CHECK_INTERVAL_S)
        # Another coordinator serves this database now: stop at once (links closed,
        # nothing more committed), then leave the event loop and the process with a
        # failure status (the cli lets SystemExit through). The server's own shutdown
        # does not run: the loop's tasks are cancelled, the lifespan's among them.
        await self.stop()
        raise SystemExit(self.lost.exit_code)

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: FastAPI) -> AsyncIterator[None]:
        self._background = [
            asyncio.create_task(self.scheduler.run(), name="coordinator-scheduler"),
            asyncio.create_task(
                housekeeping(self.coord, self.scheduler), name="coordinator-housekeeping"
            ),
        ]
        claim = asyncio.create_task(self._guard_claim(), name="coordinator-claim")
        try:
            yield
        except asyncio.CancelledError:
            if self.lost is None:
                raise
            # Cancelled as the event loop ends after a lost claim: stopped already, and
            # not a failed shutdown to report.
        finally:
            if claim.done() and not claim.cancelled():
                claim.exception()  # its SystemExit did what it was for: no stray error
            elif self.lost is None:
                claim.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await claim
            # After a lost claim, its stop is under way: this waits for it whole, and the
            # claim's task then exits with its failure status.
            await self.stop()


def private_dir(path: Path) -> None:
    """Create the data directory mode 0700, or make an existing one of ours 0700: it holds
    the SQLite database (requesters' payloads and results, which the API keeps behind
    tokens) and the blob store, whose files are created under the umask. One owned by
    another user is refused: its owner could read and replace everything in it."""
    _make_private_dirs(path)
    st = path.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"refusing the data directory {path}: it is not a directory")
    euid = os.geteuid()
    if st.st_uid != euid:
        raise UsageError(
            f"refusing the data directory {path}: owned by uid {st.st_uid}, not by uid {euid} "
            f"that runs the coordinator; fix: chown {euid} {shlex.quote(str(path))} (or "
            "choose another --data-dir)"
        )
    if st.st_mode & 0o077:
        path.chmod(0o700)
        log.warning(
            "data_dir.mode_tightened",
            extra={"path": str(path), "was": f"{stat.S_IMODE(st.st_mode):04o}", "now": "0700"},
        )


def _make_private_dirs(path: Path) -> None:
    """Create *path* and its missing parents, each exactly mode 0700: Path.mkdir(parents=
    True) would give the parents 0777 & ~umask, and a parent others may write lets them
    rename the data directory away and put their own in its place."""
    for directory in (*reversed(path.parents), path):
        if os.path.lexists(directory):
            continue
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            continue  # made meanwhile by someone else: the leaf is checked as it stands
        # The umask can only remove bits (a pathological one, the owner's own): restore
        # exactly 0700 on the directory just made, still empty, never through a symlink.
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if stat.S_IMODE(os.fstat(fd).st_mode) != 0o700:
                os.fchmod(fd, 0o700)
        finally:
            os.close(fd)


LINK_NEEDS_UPGRADE: Final = (
    "/v1/link is a WebSocket, and this request asked for no upgrade: a reverse proxy in "
    "front of the coordinator must pass the Upgrade and Connection headers on /v1/link"
)


def http_error(exc: StarletteHTTPException, routes: Sequence[BaseRoute], path: str) -> JSONResponse:
    """The JSON error for an HTTPException (an unknown path, a method a path does not
    take), with its headers. A 405's ``Allow`` names every method the routes take at
    *path* (RFC 9110 15.5.6), where the router names those of the first route matched."""
    response = error(exc.status_code, str(exc.detail))
    response.headers.update(exc.headers or {})
    if exc.status_code == 405:
        methods: set[str] = set()
        for route in routes:
            if isinstance(route, APIRoute) and route.path_regex.match(path):
                methods |= route.methods or set()
        if methods:
            response.headers["Allow"] = ", ".join(sorted(methods))
    return response


def create_app(config: CoordinatorConfig, *, clock: Clock | None = None) -> FastAPI:
    """Build the coordinator app; its state is ``app.state.coordinator``."""
    guards = {  # read first: a token file that cannot be used stops the start
        kind: TokenSet(path)
        for kind, path in ((REQUESTER, config.requester_token_file),
                           (METRICS, config.metrics_token_file))
        if path is not None
    }  # fmt: skip
    private_dir(config.data_dir)
    db = Database(config.database_url)
    try:
        coord = Coordinator(config, clock=clock or SystemClock(), db=db)
    except BaseException:
        db.close()  # its lock too: a caller that goes on (a test, say) may open it again
        raise
    scheduler = Scheduler(coord)

    serving = Serving(coord, scheduler)

    app = FastAPI(
        title="nodeclient reference coordinator",
        version=__version__,
        lifespan=serving.lifespan,
        description="Registration, node link, scheduling and results (spec 2.3.3-2.3.7).",
    )
    app.state.coordinator = coord
    app.state.scheduler = scheduler
    outage = DatabaseOutage(db, coord.monotonic)
    app.add_middleware(OutageWatch, outage=outage)  # innermost: after each request
    # Bodies are bounded before any route reads them (api.py: BodyLimit).
    app.add_middleware(
        BodyLimit,
        limit=functools.partial(body_limit, config),
        hint=functools.partial(body_limit_hint, config),
    )
    # ... and a guarded route's caller is checked before that (coordinator/tokens.py).
    app.add_middleware(TokenAuth, guards=guards)
    app.add_middleware(Stalls)  # inside ServerHooks: it drops stalled clients by its abort
    app.add_middleware(ServerHooks)  # outermost but for errors: sees the server's send

    router = build_router(coord)
    _add_errors(app, outage, router.routes)
    app.include_router(router)
    if REQUESTER in guards:
        with_bearer(app)

    _add_link(app, coord)
    return app


def _add_errors(app: FastAPI, outage: DatabaseOutage, routes: Sequence[BaseRoute]) -> None:
    """The JSON errors: invalid requests, HTTP errors, the database's, everything else."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        return error(400, f"invalid request: {where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return http_error(exc, routes, request.url.path)

    @app.exception_handler(DBAPIError)
    async def _database(request: Request, exc: Exception) -> JSONResponse:
        # Handled inside the routes' error layer, so never re-raised to the server (the
        # Exception handler's are): a database outage is one warning and a 503 that
        # clients retry, not two tracebacks per request and a reset connection.
        if is_disk_full(exc) or not is_unavailable(exc):
            return await _unexpected(request, exc)
        outage.failed(exc, {"method": request.method, "path": request.url.path})
        response = error(503, DATABASE_UNAVAILABLE)
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Anything a route did not answer itself: still the documented JSON error, and
        # one structured event to find it by (a bug, or a disk that filled up).
        where = {"method": request.method, "path": request.url.path}
        if is_disk_full(exc):  # a blob's write, or the database's (SQLite, PostgreSQL)
            log.error("http.disk_full", extra={**where, "error": str(exc)})
            return disk_full()
        log.error(
            "http.unexpected_error",
            extra={**where, "error": f"{type(exc).__name__}: {exc}"},
            exc_info=exc,
        )
        return error(500, "internal error in the coordinator: logged as http.unexpected_error")


def _add_link(app: FastAPI, coord: Coordinator) -> None:
    """The nodes' WebSocket at /v1/link, and the answer to a plain GET there."""

    @app.websocket("/v1/link")
    async def link(ws: WebSocket) -> None:
        await LinkSession(coord, ws).run()

    @app.get("/v1/link", include_in_schema=False)
    async def link_without_upgrade() -> JSONResponse:
        """A plain GET of the link: most often a reverse proxy that dropped the request's
        Upgrade header. Said so (426), not 404, which reads as a wrong URL."""
        response = error(426, LINK_NEEDS_UPGRADE)
        response.headers.update({"Upgrade": "websocket", "Connection": "Upgrade"})
        return response
