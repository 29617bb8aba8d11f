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
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute

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
from nodeclient.coordinator.store import Database
from nodeclient.coordinator.tokens import METRICS, REQUESTER, TokenAuth, TokenSet
from nodeclient.errors import UsageError, is_disk_full

log = logging.getLogger("nodeclient.coordinator.http")
housekeeping_logger = logging.getLogger("nodeclient.coordinator.housekeeping")


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

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(scheduler.run(), name="coordinator-scheduler")
        sweeper = asyncio.create_task(
            housekeeping(coord, scheduler), name="coordinator-housekeeping"
        )
        try:
            yield
        finally:
            for background in (task, sweeper):
                background.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await background
            await coord.stop_background()  # dispatches and cancels in flight, before the db
            for link in list(coord.links.values()):
                await link.close(1001, "coordinator shutting down")
            await coord.heartbeats.close()  # what was acknowledged before its commit
            coord.close_cpu()
            db.close()

    app = FastAPI(
        title="nodeclient reference coordinator",
        version=__version__,
        lifespan=lifespan,
        description="Registration, node link, scheduling and results (spec 2.3.3-2.3.7).",
    )
    app.state.coordinator = coord
    app.state.scheduler = scheduler
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

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        return error(400, f"invalid request: {where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return http_error(exc, router.routes, request.url.path)

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

    router = build_router(coord)
    app.include_router(router)
    if REQUESTER in guards:
        with_bearer(app)

    _add_link(app, coord)
    return app


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
