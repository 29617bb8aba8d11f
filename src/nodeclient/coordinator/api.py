"""HTTP routes: registration, unstaking, blobs, jobs, results, health (docs: "HTTP API").

Every error is JSON ``{"error": "..."}`` with a precise reason; validation failures of
request bodies are 400, not FastAPI's default 422 shape. Request bodies are bounded
before anything reads them (:class:`BodyLimit`): a job's by the payload limit, a blob's
by the blob limit (the upload route streams it to disk), every other body by 64 KiB.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import hashlib
import io
import logging
import math
import os
import re
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Final, Literal, TypeVar
from urllib.parse import urlencode

import pybase64
from fastapi import APIRouter, Body, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nodeclient.coordinator import classes, leases, metrics, openapi, registry, results, store
from nodeclient.coordinator import models as m
from nodeclient.coordinator.config import CoordinatorConfig
from nodeclient.coordinator.link import ABORT_KEY
from nodeclient.coordinator.scheduler import cancel_leases
from nodeclient.coordinator.service import Coordinator
from nodeclient.errors import ProtocolError, RemoteProtocolError, SignatureError, is_disk_full
from nodeclient.protocol.blobs import SHA256_HEX
from nodeclient.protocol.secp import parse_address, to_checksum_address

# Where TokenAuth (coordinator/tokens.py) leaves the requester an accepted token speaks
# for, in the request's state.
REQUESTER_KEY: Final = "requester"


def requester_of(request: Request) -> str | None:
    """The requester whose accepted token came with *request* (the token's SHA-256, hex);
    None where the requester routes are open (no token file). Which jobs it may read:
    ``store.readable_by``."""
    found = request.scope.get("state", {}).get(REQUESTER_KEY)
    return found if isinstance(found, str) else None


def error(status: int, message: str) -> JSONResponse:
    # A reason may quote the request; a lone surrogate in it would make the reply itself
    # fail (no UTF-8 encoding), so it is escaped instead.
    text = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse({"error": text}, status_code=status)


# A path prefix as a reverse proxy names it: segments of URL path characters, no more.
_PREFIX = re.compile(r"(?:/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)+")


def _forwarded_prefix(request: Request) -> str:
    """The path prefix the proxy in front serves the coordinator under (its
    ``X-Forwarded-Prefix``, e.g. ``/coord``), or "". It only shapes links this answer
    gives back to the same client, so it needs no trust; one of another form is ignored."""
    prefix = request.headers.get("x-forwarded-prefix", "").rstrip("/")
    return prefix if len(prefix) <= 200 and _PREFIX.fullmatch(prefix) else ""


def _next_page(request: Request, path: str, query: Mapping[str, object]) -> dict[str, str]:
    """The headers of a page that may have a next one: its Link, by the absolute path,
    which clients before 0.1 follow (a query-only reference would end their paging at the
    first page), under the prefix a reverse proxy serves the coordinator at, when it says
    so (X-Forwarded-Prefix)."""
    return {"Link": f'<{_forwarded_prefix(request)}{path}?{urlencode(query)}>; rel="next"'}


def _reply(r: registry.Reply) -> JSONResponse:
    return JSONResponse(r.body, status_code=r.status)


log = logging.getLogger("nodeclient.coordinator.api")

JSON_BODY_LIMIT: Final = 64 * 1024  # a manifest or an unstake is a few KiB
UPLOAD_WRITE_BYTES: Final = 1024 * 1024  # an upload is written to disk in batches of this


def disk_full() -> JSONResponse:
    """507: what a write that found no space (ENOSPC, EDQUOT, a full database) answers."""
    return error(507, "the coordinator's disk is full: nothing was stored; try again later")


def base64_size(n: int) -> int:
    """The length of the padded base64 text of *n* bytes."""
    return 4 * -(-n // 3)


def body_limit(config: CoordinatorConfig, path: str) -> int | None:
    """The most bytes a request body to *path* may have; None: the route bounds it."""
    if path == "/v1/blobs":
        return None  # streamed to disk, counted against max_blob_bytes by the route
    if path == "/v1/jobs":
        # The base64 payload, a sixteenth more for JSON encoders that escape "/" as
        # "\/", and room for the other fields.
        encoded = base64_size(config.max_payload_bytes)
        return encoded + encoded // 16 + JSON_BODY_LIMIT
    return JSON_BODY_LIMIT


# The reason of a job its requester cancelled (POST /v1/jobs/{job_id}/cancel).
CANCELLED_REASON: Final = "cancelled by the requester"
# What a requester whose job payload is over the limit can do instead.
PAYLOAD_ADVICE = (
    "upload a large model or scene to the blob store first (POST /v1/blobs) and name it "
    "in the payload by its URL (model_url, scene_url) or, for a scene's files, in its asset "
    "manifest (assets); an ai.training payload has no such form and must fit the limit"
)


def body_limit_hint(config: CoordinatorConfig, path: str) -> str:
    """What a 413 for a body over :func:`body_limit` adds: the payload's own bound, which
    the body's (base64 and JSON around it) is not, and what to do."""
    if path == "/v1/jobs":
        return (
            f": a job's payload may be at most {config.max_payload_bytes} bytes; {PAYLOAD_ADVICE}"
        )
    return ""


# An HTTP client that sends none of the rest of its request body, or takes nothing of
# the response, for this long is dropped (results' own readers: results.SEND_TIMEOUT_S).
HTTP_STALL_S = 60.0
# And one that sends it slower than this on average, once HTTP_STALL_S have passed since
# its body began: a byte every minute would otherwise hold a handler for weeks.
MIN_BODY_RATE = 1024  # bytes a second


class _BodyStalled(ClientDisconnect):
    """The client sent nothing of its body for HTTP_STALL_S; it was dropped, and a route
    cleans up as for a client that went away (an upload's temporary file is removed)."""


class Stalls:
    """ASGI middleware: drop an HTTP client that stalls, so that it holds no handler,
    socket, temporary file or open blob for ever.

    A request body of which nothing arrives for HTTP_STALL_S (an upload that stopped
    half-way, its peer silent but connected), or that comes slower than MIN_BODY_RATE on
    average once HTTP_STALL_S have passed, and a response of which the client takes
    nothing for as long (a blob download nobody reads: the socket's buffers full) end
    with the connection reset. Waiting for a client's disconnect once its body is in is
    not timed. Needs the server's abort (ServerHooks) in the scope.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or ABORT_KEY not in scope:
            await self.app(scope, receive, send)
            return
        body_done = dropped = False
        where = {"method": scope.get("method"), "path": scope.get("path")}
        began: float | None = None  # when the app first asked for the body
        received = 0

        def drop(event: str) -> None:
            nonlocal dropped
            if not dropped:
                dropped = True
                log.info(event, extra={**where, "stalled_s": HTTP_STALL_S})
                scope[ABORT_KEY]()

        async def timed_receive() -> Message:
            nonlocal body_done, began, received
            if body_done or dropped:
                return await receive()  # a disconnect, whenever it comes
            now = time.monotonic()
            began = now if began is None else began
            try:
                async with asyncio.timeout(HTTP_STALL_S):
                    message = await receive()
            except TimeoutError:
                drop("http.body_stalled")
                raise _BodyStalled from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
                return message
            received += len(message.get("body", b""))
            spent = time.monotonic() - began
            if spent > HTTP_STALL_S and received < MIN_BODY_RATE * spent:
                drop("http.body_too_slow")
                raise _BodyStalled
            return message

        async def timed_send(message: Message) -> None:
            if dropped:
                return  # reset: nothing more goes out
            try:
                async with asyncio.timeout(HTTP_STALL_S):
                    await send(message)
            except TimeoutError:
                drop("http.reader_stalled")

        await self.app(scope, timed_receive, timed_send)


class _TooLarge(Exception):
    """Raised into the app by a bounded receive once the body passes its limit."""


class BodyLimit:
    """ASGI middleware: refuse a request body over its route's bound with 413 before any
    route reads or parses it.

    A declared Content-Length over the bound is refused at once, without reading a byte;
    a chunked body is counted as it arrives and refused as soon as it passes the bound.
    The reply closes the connection, so the rest of the body is never read.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        limit: Callable[[str], int | None],
        hint: Callable[[str], str] = lambda _path: "",
    ) -> None:
        self.app = app
        self.limit = limit
        self.hint = hint  # what the 413 adds for the path (body_limit_hint)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.limit(scope["path"]) if scope["type"] == "http" else None
        if limit is None:
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await self._refuse(scope, receive, send, limit)
                return
        received = 0
        exceeded = started = False

        async def bounded_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise _TooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                return  # the route's answer to a body it never had whole: 413 instead
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, bounded_receive, guarded_send)
        except Exception:
            if not exceeded or started:
                raise
        if exceeded and not started:
            await self._refuse(scope, receive, send, limit)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        path = scope["path"]
        log.info("http.body_too_large", extra={"path": path, "limit": limit})
        response = too_large(
            f"request body exceeds the {limit}-byte limit of {path}{self.hint(path)}"
        )
        await response(scope, receive, send)


def _b64decode(text: str) -> bytes:
    try:
        return pybase64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RemoteProtocolError("payload is not valid base64") from None


def _write(out: io.BufferedWriter, digest: Any, chunks: list[bytes]) -> None:
    for chunk in chunks:
        digest.update(chunk)
        out.write(chunk)


def _discard(out: io.BufferedWriter, tmp: str) -> None:
    """Close and remove an upload's temporary file (gone already once published)."""
    with contextlib.suppress(OSError):  # a full disk refusing buffered bytes: dropped
        out.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)


# One range of bytes (RFC 9110 14.1.2): FIRST-LAST, FIRST- (to the end) or -SUFFIX (the
# last SUFFIX bytes). FileResponse would answer any other form in plain text.
_RANGE: Final = re.compile(
    r"bytes=(?:([0-9]{1,19})-([0-9]{0,19})|-([0-9]{1,19}))", re.ASCII | re.IGNORECASE
)


def range_refusal(header: str, size: int) -> JSONResponse | None:
    """None if the Range *header* asks for one range that a blob of *size* bytes can
    serve; otherwise the JSON error: 400 for anything but one range of bytes, 416 (with
    ``Content-Range: bytes */size``) for one that lies outside the blob."""
    match = _RANGE.fullmatch(header.strip())
    quoted = repr(header.strip()[:100])
    if match is None:
        return error(
            400,
            f"Range {quoted} is not one range of bytes: bytes=FIRST-LAST, bytes=FIRST- or "
            "bytes=-N, each number of up to 19 digits",
        )
    first, last, suffix = match.groups()
    if suffix is not None:
        fits = size > 0 and int(suffix) > 0
    elif last and int(last) < int(first):
        return error(400, f"Range {quoted}: the last byte comes before the first")
    else:
        fits = int(first) < size
    if fits:
        return None
    refused = error(416, f"Range {quoted} lies outside the blob of {size} bytes")
    refused.headers["Content-Range"] = f"bytes */{size}"
    return refused


JOBS_PAGE: Final = 1000  # GET /v1/jobs: jobs per page unless ?limit= says otherwise
MAX_JOBS_PAGE: Final = 10_000
NODES_PAGE: Final = 1000  # GET /v1/nodes: nodes per page unless ?limit= says otherwise
MAX_NODES_PAGE: Final = 10_000
EQUIVOCATIONS_PAGE: Final = 1000  # GET /v1/nodes/{node_id}/equivocations: at most, a page
MAX_RAM_MB: Final = 16 << 20  # 16 TiB
MAX_VRAM_MB: Final = 1 << 20  # 1 TiB


def _node_cursor(text: str) -> tuple[float, str] | None:
    """(registered_at, node_id) from a GET /v1/nodes cursor, or None if it is not one."""
    registered, _, node_id = text.partition(",")
    try:
        value = float(registered)
        address = to_checksum_address(parse_address(node_id, field="node_id"))
    except (ValueError, SignatureError):
        return None
    return (value, address) if math.isfinite(value) else None


def _job_cursor(text: str) -> tuple[float, str] | None:
    """(created_at, job_id) from a GET /v1/jobs cursor, or None if it is not one."""
    created, _, job_id = text.partition(",")
    try:
        value = float(created)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    key = uuid_key(job_id)
    return None if key is None else (value, key)


def uuid_key(text: str) -> str | None:
    """*text* as the key a job or task is stored under (a UUID's canonical text), or None
    if it is not a UUID: such a path is a 404 without a query (PostgreSQL refuses a NUL
    in text with an error, not an empty answer)."""
    if len(text) > 64:
        return None
    try:
        return str(uuid.UUID(text))
    except ValueError:
        return None


class Resources(BaseModel):
    """What each task of a job needs in its slot; a node without it is not offered the
    task, and a node refuses a task it cannot hold (2.3.5 admission control)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    ram_mb: int = Field(default=0, ge=0, le=MAX_RAM_MB, description="RAM in MB")
    vram_mb: int = Field(default=0, ge=0, le=MAX_VRAM_MB, description="GPU memory in MB")


class JobRequest(BaseModel):
    """POST /v1/jobs. A misspelt field (``min_teir``) or a value of another type
    (``"slices": true``) is refused, never dropped or coerced: the job would otherwise
    run with the default, on nodes the requester meant to avoid."""

    model_config = ConfigDict(extra="forbid", strict=True)

    workload_class: str = Field(max_length=64)
    payload: str = Field(description="base64 of the workload payload bytes")
    min_tier: int = Field(default=0, ge=0, le=4)
    region: str | None = Field(default=None, max_length=32, pattern=r"^[^\x00-\x1f\x7f]*$")
    slices: int = Field(default=1, ge=1, le=4096)
    resources: Resources = Field(default_factory=Resources)


class UnstakeRequest(BaseModel):
    """POST /v1/nodes/{node_id}/unstake: an EIP-712 Unstake signed by node.key."""

    message: dict[str, Any]
    signature: str


_Endpoint = TypeVar("_Endpoint", bound=Callable[..., Any])


def build_router(coord: Coordinator) -> APIRouter:  # noqa: PLR0915 (one route each)
    router = APIRouter()
    chain_id = coord.config.chain_id
    spooler = results.Spooler(coord.db, coord.blobs)

    def get_and_head(path: str, **declared: Any) -> Callable[[_Endpoint], _Endpoint]:
        """Route GET and HEAD at *path* to the endpoint: a HEAD answers the headers of the
        GET without its body (RFC 9110 9.3.2). Only the GET is in the OpenAPI document,
        where two operations of one route would share an operation id."""

        def register(endpoint: _Endpoint) -> _Endpoint:
            router.add_api_route(
                path, endpoint, methods=["HEAD"], include_in_schema=False, **declared
            )
            return router.get(path, **declared)(endpoint)

        return register

    @get_and_head("/healthz", response_model=None, responses=openapi.HEALTH)
    async def healthz() -> dict[str, Any]:
        return {
            "status": "ok",
            "coordinator_id": coord.coordinator_id,
            "chain_id": chain_id,
            "links": len(coord.links),
            "server_time": coord.now(),  # lets `nodeclient doctor` measure clock skew
        }

    @router.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(await metrics.scrape(coord), media_type=metrics.CONTENT_TYPE)

    # --- nodes ------------------------------------------------------------------------------

    @router.post(
        "/v1/nodes",
        status_code=201,
        responses=openapi.REGISTER,
    )
    async def register_node(
        request: Request,
        manifest: dict[str, Any] = Body(...),  # noqa: B008
    ) -> JSONResponse:
        address = request.client.host if request.client is not None else None
        now = coord.monotonic()
        wait = coord.registrations.wait(address, now)
        if wait > 0:
            refused = coord.registrations.refused(now)
            if refused:
                log.warning(
                    "registration.limited",
                    extra={"address": address, "refused": refused,
                           "per_minute": coord.registrations.per_minute},
                )  # fmt: skip
            limited = error(
                429,
                f"too many registrations from {address}: at most "
                f"{coord.registrations.per_minute} a minute from one address; retry after "
                f"{math.ceil(wait)} s",
            )
            limited.headers["Retry-After"] = str(math.ceil(wait))
            return limited
        return _reply(await registry.register(coord, manifest))

    def node_json(row: m.Node) -> dict[str, Any]:
        rt = coord.runtime.get(row.node_id)
        seen = None if rt is None or rt.last_seen is None else (rt.state, rt.last_seen)
        return store.node_row_json(row, online=coord.is_online(row.node_id), seen=seen)

    @router.get(
        "/v1/nodes",
        response_model=None,
        responses=openapi.NODES,
    )
    async def list_nodes(
        request: Request,
        limit: int = Query(default=NODES_PAGE, ge=1, le=MAX_NODES_PAGE),
        after: str | None = Query(default=None, max_length=100),
    ) -> Response:
        cursor = None
        if after is not None:
            cursor = _node_cursor(after)
            if cursor is None:
                return error(400, "after must be the cursor a Link header gave")
        rows = await coord.db.run(lambda s: store.list_nodes(s, limit=limit, after=cursor))
        headers = {}
        if len(rows) == limit:  # perhaps more: where the next page starts
            last = rows[-1]
            after_last = f"{last.registered_at!r},{last.node_id}"
            headers = _next_page(request, "/v1/nodes", {"limit": limit, "after": after_last})
        # Built off the event loop, which every link's heartbeats share: a page of
        # thousands of nodes is a few hundred milliseconds of dictionaries and JSON.
        return await coord.in_cpu(
            lambda: JSONResponse([node_json(r) for r in rows], headers=headers)
        )

    @router.get(
        "/v1/nodes/{node_id}",
        responses=openapi.NODE,
    )
    async def get_node(node_id: str) -> JSONResponse:
        try:
            nid = to_checksum_address(parse_address(node_id, field="node_id"))
        except SignatureError as exc:
            return error(400, str(exc))
        row = await coord.db.run(lambda s: s.get(m.Node, nid))
        if row is None:
            return error(404, f"node {nid} is not registered")
        return JSONResponse(node_json(row))

    @router.get(
        "/v1/nodes/{node_id}/equivocations",
        response_model=None,
        responses=openapi.EQUIVOCATIONS,
    )
    async def list_equivocations(
        request: Request,
        node_id: str,
        limit: int = Query(default=EQUIVOCATIONS_PAGE, ge=1, le=EQUIVOCATIONS_PAGE),
        after: int | None = Query(default=None, ge=0, le=(1 << 63) - 1),
    ) -> Response:
        """Evidence against a node: each task for which it signed a Result other than the
        one accepted, both Results as EIP-712 typed data. Kept after the job is deleted
        and after the node is forgotten (so a node no longer registered may have some)."""
        try:
            nid = to_checksum_address(parse_address(node_id, field="node_id"))
        except SignatureError as exc:
            return error(400, str(exc))
        rows = await coord.db.run(
            lambda s: store.list_equivocations(s, nid, limit=limit, after=after)
        )
        headers = {}
        if len(rows) == limit:  # perhaps more: where the next page starts
            path, after_last = f"/v1/nodes/{nid}/equivocations", rows[-1].id
            headers = _next_page(request, path, {"limit": limit, "after": after_last})
        chain = coord.config.chain_id
        return await coord.in_cpu(
            lambda: JSONResponse(
                [store.equivocation_json(r, chain_id=chain) for r in rows], headers=headers
            )
        )

    @router.get(
        "/v1/manifests/{manifest_hash}",
        responses=openapi.MANIFEST,
    )
    async def get_manifest(manifest_hash: str) -> Response:
        """A signed manifest a node registered with, by the SHA-256 of its canonical
        signed bytes (a node's and a task's ``manifest_hash``), exactly as verified."""
        if not SHA256_HEX.fullmatch(manifest_hash):
            return error(400, "manifest_hash must be 64 lowercase hex digits")
        row = await coord.db.run(lambda s: s.get(m.NodeManifest, manifest_hash))
        if row is None:
            return error(404, f"no manifest {manifest_hash}")
        return Response(row.manifest, media_type="application/json")

    @router.post(
        "/v1/nodes/{node_id}/unstake",
        responses=openapi.UNSTAKE,
    )
    async def unstake(node_id: str, body: UnstakeRequest) -> JSONResponse:
        return _reply(await registry.unstake(coord, node_id, body.model_dump()))

    # --- blobs ------------------------------------------------------------------------------

    def finish_upload(out: io.BufferedWriter, digest: Any, rest: list[bytes], tmp: str) -> str:
        """Write the last bytes, make them durable, then publish (blobstore.py: the file is
        fsynced before its rename, the directory after)."""
        _write(out, digest, rest)
        out.flush()
        os.fsync(out.fileno())
        out.close()
        hexdigest: str = digest.hexdigest()
        coord.blobs.publish(tmp, hexdigest)
        return hexdigest

    @router.post(
        "/v1/blobs",
        status_code=201,
        responses=openapi.BLOB_UPLOAD,
        openapi_extra=openapi.RAW_BODY,
    )
    async def upload_blob(request: Request) -> JSONResponse:
        limit = coord.config.max_blob_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return too_large(f"blob of {declared} bytes exceeds the {limit}-byte limit")
        # The disk work (writes, fsyncs, the rename) runs in a thread, a batch at a time,
        # so a slow or full disk never stops the event loop, links' heartbeats included.
        digest, size = hashlib.sha256(), 0
        try:
            fd, tmp = await asyncio.to_thread(coord.blobs.temporary, ".upload-")
        except OSError as exc:
            if is_disk_full(exc):
                return disk_full()
            raise
        out = os.fdopen(fd, "wb")
        try:
            pending: list[bytes] = []
            held = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    return too_large(f"blob exceeds the {limit}-byte limit")
                pending.append(chunk)
                held += len(chunk)
                if held >= UPLOAD_WRITE_BYTES:
                    await asyncio.to_thread(_write, out, digest, pending)
                    pending, held = [], 0
            hexdigest = await asyncio.to_thread(finish_upload, out, digest, pending, tmp)
        except ClientDisconnect:
            # The uploader went away before its last byte: nothing is kept, nobody to answer.
            log.info("blobs.upload_abandoned", extra={"received": size})
            return error(400, "the upload ended before its last byte")
        except OSError as exc:
            if is_disk_full(exc):
                log.warning("blobs.disk_full", extra={"error": str(exc)})
                return disk_full()
            raise
        finally:
            await asyncio.to_thread(_discard, out, tmp)
        return JSONResponse(
            {"sha256": hexdigest, "url": f"/v1/blobs/{hexdigest}", "size": size}, status_code=201
        )

    @get_and_head(
        "/v1/blobs/{sha256}",
        response_class=Response,
        response_model=None,
        responses=openapi.BLOB,
    )
    async def get_blob(request: Request, sha256: str) -> FileResponse | JSONResponse:
        if not SHA256_HEX.fullmatch(sha256):
            return error(400, "blob id must be 64 lowercase hex digits (its SHA-256)")
        # A node's fetch dates the blob as used: a job still running keeps it anyway.
        if not await asyncio.to_thread(coord.blobs.use, sha256):
            return error(404, f"no blob {sha256}")
        path = coord.blobs.path(sha256)
        asked = request.headers.get("range")
        validator = f'"{sha256}"'  # the content never changes: its hash is its ETag
        if_range = request.headers.get("if-range")
        if if_range is not None and if_range.strip() != validator:
            asked = None  # not the blob the client has part of: the whole of it (RFC 9110)
        if asked is not None:
            try:
                size = (await asyncio.to_thread(path.stat)).st_size
            except FileNotFoundError:  # swept since the look: as if it had not been there
                return error(404, f"no blob {sha256}")
            refused = range_refusal(asked, size)
            if refused is not None:
                return refused
        return BlobResponse(path, validator)

    def prepare(
        wclass: classes.WorkloadClass, payload: bytes, slices: int
    ) -> tuple[dict[str, Any], list[bytes], set[str], bytes | None, list[tuple[str, bytes]]]:
        """Validate, check the blobs, split, and take inline inputs out for the blob store:
        CPU-bound (a media.render job hashes an inline scene of up to max_payload_bytes),
        so it runs off the event loop. Also returns the blobs the job references, each
        dated as used by the check (the sweep keeps them), what the tasks of its first
        round share (stored once, beside them), if its class has it, and the inline inputs
        (sha256, bytes) the caller then stores (disk work: not on the CPU threads).

        Inline inputs are stored last, once every check and the split have passed: a job
        refused here leaves nothing in the blob store (an inline scene of up to
        max_payload_bytes would otherwise stay there for the whole retention period)."""
        max_bytes = coord.config.max_payload_bytes
        meta = dict(wclass.validate(payload, max_bytes))
        moved = None if wclass.hoist is None else wclass.hoist(payload, slices)
        hoisted: list[tuple[str, bytes]] = []
        if moved is not None:
            payload, hoisted = moved
        inline = {sha256 for sha256, _ in hoisted}  # held once stored, below

        def held(sha256: str) -> bool:
            return sha256 in inline or coord.blobs.use(sha256)

        referenced = wclass.require_blobs(payload, max_bytes, held=held)
        shared: bytes | None = None
        if wclass.split_shared is not None:
            shared, parts = wclass.split_shared(payload, slices)
        else:
            parts = wclass.split(payload, slices)
        return meta, parts, referenced, shared, hoisted

    def store_inline(hoisted: list[tuple[str, bytes]]) -> None:
        for sha256, data in hoisted:
            coord.blobs.store(sha256, data)

    # --- jobs -------------------------------------------------------------------------------

    # A sliceable job's split may hold up to 1 GiB of slice payloads until they are stored:
    # two such submissions at a time, so concurrent large jobs cannot add up. A whole job
    # (one task) holds only its own payload, bounded by the request size, and is not held
    # up behind them.
    splitting = asyncio.Semaphore(2)

    @router.post(
        "/v1/jobs",
        status_code=201,
        responses=openapi.SUBMIT,
    )
    async def submit_job(request: Request, body: JobRequest) -> JSONResponse:
        wclass = classes.REGISTRY.get(body.workload_class)
        if wclass is None or not wclass.sliceable:
            return await _submit_job(body, requester_of(request))
        async with splitting:
            return await _submit_job(body, requester_of(request))

    async def _submit_job(body: JobRequest, requester: str | None) -> JSONResponse:
        cfg = coord.config
        try:
            wclass = classes.lookup(body.workload_class)
            if len(body.payload) > base64_size(cfg.max_payload_bytes):  # not worth decoding
                limit = cfg.max_payload_bytes
                return error(413, f"payload exceeds the {limit}-byte limit; {PAYLOAD_ADVICE}")
            payload = await coord.in_cpu(_b64decode, body.payload)
            if len(payload) > cfg.max_payload_bytes:
                limit = cfg.max_payload_bytes
                return error(
                    413,
                    f"payload of {len(payload)} bytes exceeds the {limit}-byte limit; "
                    f"{PAYLOAD_ADVICE}",
                )
            meta, parts, blobs, shared, hoisted = await coord.in_cpu(
                prepare, wclass, payload, body.slices
            )
            if hoisted:  # stored last, once every check has passed
                await asyncio.to_thread(store_inline, hoisted)
        except (ProtocolError, ValueError) as exc:  # a class's ValueError too (UnicodeError)
            return error(400, str(exc))
        except (RecursionError, ArithmeticError) as exc:  # deep nesting, huge numbers
            return error(400, f"payload could not be read: {type(exc).__name__}")
        now = coord.now()

        def tx(s: Session) -> store.JobRows:
            job_id = store.insert_job(
                s, workload_class=wclass.name, payloads=parts, min_tier=body.min_tier,
                region=body.region, meta=meta, now=now, blobs=blobs,
                ram_mb=body.resources.ram_mb, vram_mb=body.resources.vram_mb, shared=shared,
                requester=requester,
            )  # fmt: skip
            return store.JobRows(
                store.job_head(s.get_one(m.Job, job_id)), store.job_task_rows(s, job_id)
            )

        rows = await coord.db.run(tx)
        coord.wake()
        return await coord.in_cpu(_job_response, rows, chain_id, {}, 201)  # progress: null

    @router.get(
        "/v1/jobs",
        response_model=None,
        responses=openapi.JOBS,
    )
    async def list_jobs(
        request: Request,
        limit: int = Query(default=JOBS_PAGE, ge=1, le=MAX_JOBS_PAGE),
        after: str | None = Query(default=None, max_length=100),
        status: str | None = Query(default=None, max_length=16),
    ) -> Response:
        if status is not None and status not in m.JOB_STATUSES:
            return error(400, f"status must be one of {sorted(m.JOB_STATUSES)}")
        cursor = None
        if after is not None:
            cursor = _job_cursor(after)
            if cursor is None:
                return error(400, "after must be the cursor a Link header gave")
        requester = requester_of(request)
        page = await coord.db.run(
            lambda s: store.list_jobs(
                s, limit=limit, after=cursor, status=status, requester=requester
            )
        )
        headers = {}
        if len(page) == limit:  # perhaps more: where the next page starts
            last = page[-1]
            query = {"limit": limit, "after": f"{last['created_at']!r},{last['job_id']}"}
            if status is not None:
                query["status"] = status
            headers = _next_page(request, "/v1/jobs", query)
        return JSONResponse(page, headers=headers)

    @get_and_head(
        "/v1/jobs/{job_id}",
        responses=openapi.JOB,
    )
    async def get_job(
        request: Request, job_id: str, tasks: Literal["all", "none"] = Query(default="all")
    ) -> Response:
        key = uuid_key(job_id)
        with_tasks = tasks == "all"
        requester = requester_of(request)
        rows = None
        if key is not None:
            rows = await coord.db.run(
                lambda s: store.job_rows(s, key, tasks=with_tasks, requester=requester)
            )
        if rows is None:
            return error(404, f"no job {job_id}")
        # The transaction read the rows only: their JSON (a typed-data object for each
        # finished task, seconds for a training job's 10,000 tasks) is built in a worker
        # thread, where the database thread and the event loop do not wait for it.
        progress: dict[str, dict[str, Any]] = {}
        for task in rows.tasks or ():
            p = None
            if task.status == m.LEASED and task.node_id is not None:
                p = coord.progress.get(task.task_id, node_id=task.node_id)
            if p is not None:
                progress[task.task_id] = {name: p[name] for name in ("done", "total", "note")}
        return await coord.in_cpu(_job_response, rows, chain_id, progress, 200)

    @router.post(
        "/v1/jobs/{job_id}/cancel",
        responses=openapi.CANCEL,
    )
    async def cancel_job(request: Request, job_id: str) -> Response:
        """End a job that has not ended: failed, with the reason CANCELLED_REASON, its
        queued tasks withdrawn and its leased ones cancelled on their nodes."""
        key = uuid_key(job_id)
        if key is None:
            return error(404, f"no job {job_id}")
        now = coord.now()
        requester = requester_of(request)

        def tx(s: Session) -> tuple[str | None, list[tuple[str, str]], store.JobRows | None]:
            job = store.readable_job(s, key, requester)
            if job is None or job.status in (m.SUCCEEDED, m.FAILED):
                return None if job is None else job.status, [], None
            cancel = leases.fail_job(s, key, CANCELLED_REASON, now)
            return m.FAILED, cancel, store.JobRows(store.job_head(s.get_one(m.Job, key)), None)

        status, cancel, rows = await coord.db.run(tx)
        if status is None:
            return error(404, f"no job {job_id}")
        if rows is None:
            return error(409, f"job {job_id} has already ended: {status}")
        cancel_leases(coord, cancel, "job cancelled")  # best effort: the leases are gone anyway
        log.info(
            "job.failed",
            extra={"job_id": key, "reason": CANCELLED_REASON, "leases_cancelled": len(cancel)},
        )
        coord.wake()  # its nodes' slots are free
        return await coord.in_cpu(_job_response, rows, chain_id, None, 200)

    @get_and_head(
        "/v1/jobs/{job_id}/result",
        response_class=Response,
        response_model=None,
        responses=openapi.JOB_RESULT,
    )
    async def job_result(request: Request, job_id: str) -> Response:
        key = uuid_key(job_id)
        found = None if key is None else await spooler.head(m.Job, key, requester_of(request))
        if key is None or found is None:
            return error(404, f"no job {job_id}")
        status, size, data = found
        if status != m.SUCCEEDED or size is None:
            return error(409, f"job {job_id} is {status}, not succeeded")
        return await _result(spooler, m.Job, key, size, data, head=request.method == "HEAD")

    @get_and_head(
        "/v1/tasks/{task_id}/result",
        response_class=Response,
        response_model=None,
        responses=openapi.TASK_RESULT,
    )
    async def task_result(request: Request, task_id: str) -> Response:
        key = uuid_key(task_id)
        found = None if key is None else await spooler.head(m.Task, key, requester_of(request))
        if key is None or found is None:
            return error(404, f"no task {task_id}")
        status, size, data = found
        if size is None:
            return error(409, f"task {task_id} is {status} and has no result")
        return await _result(spooler, m.Task, key, size, data, head=request.method == "HEAD")

    return router


class BlobResponse(FileResponse):
    """A blob's bytes, with its hash as its ETag (Range with If-Range works across
    fetches) and no Last-Modified: the file's time records its last use, for the blob
    store's retention, and would tell a cache the content changed at every fetch."""

    def __init__(self, path: os.PathLike[str] | str, etag: str) -> None:
        super().__init__(
            path,
            media_type="application/octet-stream",
            headers={"etag": etag, "cache-control": "public, max-age=31536000, immutable"},
        )

    def set_stat_headers(self, stat_result: os.stat_result) -> None:
        self.headers.setdefault("content-length", str(stat_result.st_size))

    def _should_use_range(self, http_if_range: str) -> bool:  # Starlette's, which also
        return http_if_range.strip() == self.headers["etag"]  # reads Last-Modified


def too_large(message: str) -> JSONResponse:
    """413 for a body over its bound (BodyLimit's, an upload's over the blob limit); the
    connection is closed, so the rest of the body is not read."""
    response = error(413, message)
    response.headers["connection"] = "close"
    return response


def _job_response(
    rows: store.JobRows, chain_id: int, progress: dict[str, dict[str, Any]] | None, status: int
) -> JSONResponse:
    """The job's JSON, rendered; with *progress*, each task carries its entry there (None
    if it has none)."""
    job = rows.json(chain_id=chain_id)
    if progress is not None:
        for task in job.get("tasks", ()):
            task["progress"] = progress.get(task["task_id"])
    return JSONResponse(job, status_code=status)


async def _result(
    spooler: results.Spooler,
    row: results.Row,
    key: str,
    size: int,
    data: bytes | None,
    *,
    head: bool = False,
) -> Response:
    """The result's bytes: *data* when the look read them (a small result), else spooled
    and sent chunk by chunk with their length (results.py); 503 while the copies being
    sent already hold as many bytes as the coordinator allows. For a HEAD (*head*), only
    the headers a GET would have: nothing is spooled."""
    if head:
        return Response(
            headers={"Content-Length": str(size)}, media_type="application/octet-stream"
        )
    if data is not None:
        return Response(data, media_type="application/octet-stream")
    try:
        spooled = await spooler.spool(row, key, size)
    except results.ResultGone:
        return error(404, f"the result of {key} is no longer kept")
    except results.SpoolFull as exc:
        log.info("results.spool_full", extra={"key": key, "size": size})
        busy = error(503, f"{exc}; try again in {results.RETRY_AFTER_S} s")
        busy.headers["Retry-After"] = str(results.RETRY_AFTER_S)
        return busy
    return results.SpooledResponse(spooled, key=key, send_timeout=spooler.send_timeout)
