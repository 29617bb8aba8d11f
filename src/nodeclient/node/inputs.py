"""Content-addressed task inputs, fetched by the daemon before a task reaches a worker.

Workers run without network (the sandbox), so anything a payload references by URL and
SHA-256 is resolved here: an ONNX model goes into the shared model cache that the worker
reads (verified against its hash, written atomically, fetched once however many tasks
want it at the same time, and deleted again when a worker refuses it as no model it can
load), a Blender scene is inlined into the payload, and so are the assets its manifest
lists. Relative URLs are the coordinator's blob store (``/v1/blobs/<sha256>``).

The daemon runs outside the sandbox, on the operator's network, and a URL comes from a
requester. So a URL that is not the coordinator's own is fetched only from a public
address: its host is resolved once, every address must be global unicast (not loopback,
private, link-local, shared, multicast or reserved), and the request goes to the address
that was checked (Host header and TLS server name stay the URL's), so a second lookup
cannot send it elsewhere (DNS rebinding). Redirects are not followed. Without this a
requester could make nodes probe their operators' networks (a cloud metadata service at
169.254.169.254, a router, a local admin port) and read the answers off the refusals.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import ipaddress
import logging
import os
import re
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Final

import httpx

from nodeclient import httpbody, tlstrust
from nodeclient.errors import NodeClientError, ProtocolError, RemoteProtocolError
from nodeclient.node import sandbox
from nodeclient.node.exec_config import DEFAULT_MAX_PAYLOAD, deadline_clock
from nodeclient.protocol.blobs import BLOB_URL
from nodeclient.workloads.tensors import DEFAULT_MAX_BYTES, read_metadata

if TYPE_CHECKING:  # imported lazily: the daemon needs them only for models by URL
    from nodeclient.node.runtimes.onnx import ModelCache
    from nodeclient.workloads.inference import InferenceRequest

log = logging.getLogger("nodeclient.node")

MAX_FETCH_BYTES: Final = 256 * 1024 * 1024
WATCH_S: Final = 0.2  # how soon a download stops after its task is cancelled or times out
DEFAULT_BLOB_CACHE_BYTES: Final = 2 * 1024 * 1024 * 1024
_MAX_ERROR_CHARS: Final = 200
# What building and sending a request can raise for a URL the prefix check let through:
# httpx.InvalidURL (e.g. ``http://[::1/x``) is no HTTPError, and a host name the IDNA codec
# refuses (a label over 63 characters) surfaces as a UnicodeError.
_FETCH_ERRORS: Final = (httpx.HTTPError, httpx.InvalidURL, UnicodeError)

Fetch = Callable[[str], bytes]


class InputNotStored(NodeClientError):
    """A fetched input could not be made ready for the worker through no fault of the
    requester (this node's disk): the task is refused as the node's failure."""


class InputDeadline(RemoteProtocolError):
    """A download stopped at the task's deadline (its lease's end): the task timed out
    while its inputs were fetched, as one killed at its lease's end in a worker does, and
    is refused as such, not as a bad input."""


@dataclass(slots=True)
class FetchLimits:
    """What bounds the downloads of one task: its lease's end (a value of *clock*, the
    executor's deadline clock, which runs on while the system is suspended) and its
    cancellation. A thread cannot be cancelled: the download checks both between chunks,
    and a watcher shuts its connection down within WATCH_S of either, which ends a read
    that waits on a silent source."""

    deadline: float
    cancelled: threading.Event
    clock: Callable[[], float] = deadline_clock

    def extend(self, deadline: float) -> None:
        """A renewed lease: later chunks may come until *deadline*, if that is later (one
        float store, which the downloading thread reads between chunks)."""
        self.deadline = max(self.deadline, deadline)


_LIMITS: contextvars.ContextVar[FetchLimits | None] = contextvars.ContextVar(
    "nodeclient_fetch_limits", default=None
)


@contextlib.contextmanager
def fetch_limits(limits: FetchLimits) -> Iterator[None]:
    """Apply *limits* to every :func:`http_fetcher` download in this context (a thread
    started from it, by ``asyncio.to_thread`` or a copied context, included)."""
    token = _LIMITS.set(limits)
    try:
        yield
    finally:
        _LIMITS.reset(token)


def http_fetcher(
    base_url: str, *, max_bytes: int = MAX_FETCH_BYTES, timeout: float = 60.0
) -> Fetch:
    """GET a blob (relative URLs against *base_url*), refusing more than *max_bytes*, and
    stopping at the limits of the task it is for (:func:`fetch_limits`)."""

    home = _origin(httpx.URL(base_url))

    def fetch(url: str) -> bytes:
        if url.startswith("/"):
            url = base_url.rstrip("/") + url
        if not url.startswith(("http://", "https://")):
            raise RemoteProtocolError(f"blob URL must be http(s) or /v1/blobs/…: {url[:80]}")
        limits = _LIMITS.get()
        wait = timeout if limits is None else min(timeout, _left(limits, url))
        data = bytearray()
        try:
            targets, headers, extensions = _pinned(url, home)
            headers = {**headers, **httpbody.IDENTITY}  # the bytes as stored
            # The coordinator's blobs are verified as its link is (tlstrust): one trust store.
            with httpx.Client(timeout=wait, verify=tlstrust.client_context()) as client:
                for i, target in enumerate(targets):  # each checked address, in order
                    left = wait if limits is None or i == 0 else min(timeout, _left(limits, url))
                    request = client.build_request(
                        "GET", target, headers=headers, extensions=extensions, timeout=left
                    )
                    try:
                        resp = client.send(request, stream=True)
                    except (httpx.ConnectError, httpx.ConnectTimeout):
                        if i + 1 == len(targets):
                            raise
                        continue  # the next address, with what is left of the time
                    with contextlib.closing(resp), _stopped_at_limits(resp, limits):
                        if resp.status_code != 200:
                            raise RemoteProtocolError(f"GET {url[:80]} answered {resp.status_code}")
                        httpbody.check_identity(resp)  # never undone (httpbody)
                        for chunk in resp.iter_raw():
                            data += chunk
                            if len(data) > max_bytes:
                                raise RemoteProtocolError(
                                    f"blob at {url[:80]} exceeds {max_bytes} bytes"
                                )
                            if limits is not None:
                                _left(limits, url)
                    break
        except _FETCH_ERRORS as exc:
            if limits is not None:
                _left(limits, url)  # a read timed out at the deadline: say so
            raise RemoteProtocolError(f"GET {url[:80]!r} failed: {_short(exc)}") from exc
        return bytes(data)

    return fetch


@contextlib.contextmanager
def _stopped_at_limits(resp: httpx.Response, limits: FetchLimits | None) -> Iterator[None]:
    """While the body of *resp* is read: shut its connection down once the task is
    cancelled or its deadline passes (looked at every WATCH_S), so that a read waiting on
    a silent source returns then, rather than when its read timeout, fixed as the request
    began, runs out."""
    stream = resp.extensions.get("network_stream")
    sock = None if limits is None or stream is None else stream.get_extra_info("socket")
    if limits is None or not isinstance(sock, socket.socket):
        yield
        return
    done = threading.Event()

    def watch() -> None:
        while not done.wait(WATCH_S):
            if limits.cancelled.is_set() or limits.clock() >= limits.deadline:
                with contextlib.suppress(OSError):  # closed meanwhile
                    sock.shutdown(socket.SHUT_RDWR)
                return

    watcher = threading.Thread(target=watch, name="nodeclient-fetch-limits", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    default = {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, url.host.lower(), url.port or default


def _pinned(
    raw: str, home: tuple[str, str, int | None]
) -> tuple[list[httpx.URL], dict[str, str], dict[str, str]]:
    """The requests to try for the URL *raw*: itself on the coordinator's origin; elsewhere,
    one per public address its host resolved to, in the resolver's order (module
    docstring), or RemoteProtocolError when any address is not public."""
    url = httpx.URL(raw)
    origin = _origin(url)
    if origin == home:
        return [url], {}, {}
    scheme, _, port = origin
    host = url.raw_host.decode("ascii")  # IDNA-encoded as httpx sends it: the same name
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, port or 0, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            log.warning("input.unresolved", extra={"url": raw[:80], "error": _short(exc)})
            raise _not_public(raw) from None
        # In resolver order, once each; an IPv6 scope id is not part of the address.
        found = dict.fromkeys(str(info[4][0]).split("%")[0] for info in infos)
        addresses = [ipaddress.ip_address(a) for a in found]
    bad = [a for a in addresses if not _public(a)]
    if bad or not addresses:
        address = str(bad[0]) if bad else None
        log.warning("input.not_public", extra={"url": raw[:80], "address": address})
        raise _not_public(raw)
    headers = {"Host": url.netloc.decode("ascii")}
    extensions = {"sni_hostname": host} if scheme == "https" else {}
    return [url.copy_with(host=str(a)) for a in addresses], headers, extensions


def _not_public(raw: str) -> RemoteProtocolError:
    """The refusal of a URL whose host is not public or does not resolve: it goes, signed,
    to the coordinator and the requester, so it says neither which (whether a name exists
    on the operator's network) nor the address (only this node's log does)."""
    return RemoteProtocolError(
        f"refusing to fetch {raw[:80]!r}: its host is not a public address, or cannot be "
        "resolved from this node, and a node fetches a requester's URL only from its "
        "coordinator or the public internet"
    )


_NAT64: Final = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052's well-known prefix
_NOT_PUBLIC_V6: Final = (
    ipaddress.IPv6Network("fec0::/10"),  # site-local (deprecated, still routed in places)
)


def _public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Global unicast: not loopback, private, link-local, shared, multicast, reserved or
    unspecified. IPv6 forms that carry an IPv4 address (mapped, 6to4, and NAT64's
    well-known prefix, which an IPv6-only node's DNS64 answers for IPv4-only hosts) are
    judged by it."""
    if isinstance(address, ipaddress.IPv6Address):
        inner = address.ipv4_mapped or address.sixtofour
        if inner is None and address in _NAT64:
            inner = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if inner is not None:
            return _public(inner)
        if any(address in net for net in _NOT_PUBLIC_V6) or address.teredo is not None:
            return False
    return address.is_global and not address.is_multicast and not address.is_reserved


def _left(limits: FetchLimits, url: str) -> float:
    """Seconds left to download *url*; RemoteProtocolError once the task is cancelled,
    InputDeadline once there are none."""
    if limits.cancelled.is_set():
        raise RemoteProtocolError(f"GET {url[:80]!r} stopped: the task was cancelled")
    left = limits.deadline - limits.clock()
    if left <= 0:
        raise InputDeadline(f"GET {url[:80]!r} did not finish before the task's deadline")
    return left


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS] + "..."


# The metadata keys through which each class references inputs by URL or by hash.
_URL_KEYS: Final = {"ai.inference": ("model_url",), "media.render": ("scene_url", "assets")}
# A header this small is parsed in microseconds, and read_metadata keeps what it parsed
# (the same model's requests, task after task); a larger one (up to the container's
# 1 MiB) may take a tenth of a second to parse, too long for the daemon's event loop.
SMALL_HEADER_BYTES: Final = 4096


def task_metadata(workload_class: str, payload: bytes) -> dict[str, str] | None:
    """The payload's container metadata, for what the daemon decides before a worker has
    the task (:func:`needs_fetch`, and the worker the executor picks for it): read once
    per task and handed to both. ``{}`` when the header cannot be read (the worker reports
    the precise decoding error); None for a class whose payload none of that reads."""
    if workload_class not in _URL_KEYS:
        return None
    try:
        return read_metadata(payload)
    except ProtocolError:
        return {}


def header_is_small(payload: bytes) -> bool:
    """Whether :func:`task_metadata` of *payload* is cheap enough for the event loop: a
    header of at most SMALL_HEADER_BYTES (its length is the container's first 8 bytes,
    little-endian), or none to read at all."""
    return len(payload) < 8 or int.from_bytes(payload[:8], "little") <= SMALL_HEADER_BYTES


def needs_fetch(
    workload_class: str,
    payload: bytes,
    *,
    cache_dir: Path,
    metadata: Mapping[str, str] | None = None,
) -> bool:
    """Whether :func:`resolve` has work to do: an input named by URL (or, for a render, an
    asset manifest) that is not already in the model cache.

    Header-only, so a task whose model is warm pays one ``stat`` and no full decode; with
    *metadata* (:func:`task_metadata` of the payload) the header is not read again. A
    payload whose header cannot be read is handed on unchanged; the worker reports the
    precise decoding error.
    """
    if metadata is None:
        metadata = task_metadata(workload_class, payload)
    keys = _URL_KEYS.get(workload_class, ())
    if metadata is None or not any(key in metadata for key in keys):
        return False
    if workload_class == "ai.inference":
        try:  # the worker verifies the file's hash when it reads it
            return not _model_cache(cache_dir).contains(metadata.get("model_sha256", ""))
        except (ValueError, OSError):
            return True  # resolve reports the bad hash, or refuses the planted cache
    return True


def model_unavailable(reason: str) -> bool:
    """Whether a task failed because its worker could not read the model the daemon had
    fetched into the cache (the runtime's ``ModelUnavailable``, named in the reason the
    worker gives: ``execution failed: ModelUnavailable: ...``)."""
    return reason.startswith("execution failed: ModelUnavailable:")


def recheck_cached_model(cache_dir: Path, sha256: str) -> None:
    """After a task whose model was in the cache failed on this node: read the entry
    through the cache, which deletes a file whose bytes do not match its hash (rotted,
    or left by an older release), so the next task fetches the model again. Workers see
    the cache read-only: one that finds a bad file can only report the model missing
    (``ModelUnavailable``), and without this every task for it would fail here."""
    with contextlib.suppress(ValueError, OSError):
        _model_cache(cache_dir).get(sha256)


# How a worker refuses a model's bytes as no model it can load (runtimes/onnx.py:
# _vet_model and OnnxRuntime._create), in the words it gives them to the daemon
# (worker.py: ``bad payload: <message>``). Not the refusals of a run (inputs that do not
# fit, an output the request names wrongly, a failure inside the model): those leave the
# model as good as it was.
_MODEL_REFUSALS: Final = tuple(
    f"bad payload: {text}"
    for text in (
        "model is not a valid ONNX protobuf:",
        "model references external data",
        "model's sparse tensors take ",
        "model cannot be loaded:",
        "model input ",  # of a type no request can feed
    )
)
_DIRECTORY_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


# How the protobuf parser's and ONNX Runtime's messages end when a load ran out of memory
# (the address-space limit a task's declared RAM sets, on a CPU slot): such a model may be
# good. At the end only: ONNX Runtime's other messages quote the model's own node names.
_OUT_OF_MEMORY: Final = re.compile(r"(: Arena alloc failed|: std::bad_alloc)\s*$")


def model_refused(reason: str) -> bool:
    """Whether a task failed because its worker refused the model's bytes as no model it
    can load (not an ONNX protobuf, external data, a load that failed), rather than
    because a run of a loaded model did, or its load ran out of memory (a requester that
    declared too little RAM for a good model would otherwise have it deleted)."""
    return reason.startswith(_MODEL_REFUSALS) and _OUT_OF_MEMORY.search(reason) is None


def drop_cached_model(cache_dir: Path, sha256: str) -> None:
    """After a task failed because its worker refused the cached model as no model it
    can load (:func:`model_refused`): delete the entry.

    The daemon stores a model as it fetches it, before any worker has parsed it, but only
    models that loaded are kept: bytes that merely match the hash a requester named, of
    any size up to the fetch limit, would otherwise stay, and a requester could fill
    every node's cache with them, pushing out the models that run. The worker sees the
    cache read-only, so the daemon deletes them; a later task for the same bytes fetches
    them again, and is refused again. The file is unlinked relative to the directory,
    opened without following a link, as the cache itself does.
    """
    cache = _model_cache(cache_dir)
    with contextlib.suppress(ValueError, OSError):  # a bad hash, or nothing to delete
        name = cache.path_for(sha256).name
        dir_fd = os.open(cache.directory, _DIRECTORY_FLAGS)
        try:
            os.unlink(name, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
        log.info("cache.model_dropped", extra={"model_sha256": sha256})


def resolve(
    workload_class: str,
    payload: bytes,
    *,
    fetch: Fetch,
    cache_dir: Path,
    sandbox_owner: bool,
    blobs: ModelCache | None = None,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD,
) -> bytes:
    """The payload a worker can run offline; raises RemoteProtocolError on a bad reference,
    InputDeadline (one) when a download did not finish before the task's deadline,
    InputNotStored when this node cannot make a fetched input ready (its disk).

    *cache_dir* is the executor's cache directory (bound into the sandbox); with
    *sandbox_owner* the cached file is handed to the sandbox uid so the worker can read it.
    *blobs* (see :func:`blob_cache`) keeps what a render fetches from the coordinator's
    blob store, so the slices of one job fetch their scene once per node.
    *max_payload_bytes* is the most the executor hands a worker.
    """
    try:
        if workload_class == "ai.inference":
            cache = _model_cache(cache_dir)
            return _resolve_model(payload, fetch, cache, sandbox_owner, max_payload_bytes)
        if workload_class == "media.render":
            from nodeclient.workloads import render

            return render.resolve_blobs(payload, _cached(fetch, blobs))
    except (httpx.HTTPError, httpx.InvalidURL) as exc:  # a fetcher that did not translate
        raise RemoteProtocolError(f"input could not be fetched: {_short(exc)}") from exc
    return payload


def blob_cache(directory: Path, *, max_bytes: int = DEFAULT_BLOB_CACHE_BYTES) -> ModelCache:
    """The daemon's own cache of blobs (``/v1/blobs/<sha256>``) that it inlines into render
    payloads: in the node home, which no sandbox sees, so one requester's scene is never
    readable by another's task. Least recently used first out past *max_bytes*."""
    from nodeclient.node.runtimes.onnx import ModelCache

    return ModelCache(directory, max_bytes=max_bytes)


def _cached(fetch: Fetch, cache: ModelCache | None) -> Fetch:
    """*fetch*, answering ``/v1/blobs/<sha256>`` from *cache* when it holds the blob (every
    read re-hashes the file) and storing what it fetches there when the bytes are the blob
    the URL names. Other URLs, and any cache error, go to *fetch*."""
    if cache is None:
        return fetch

    def get(url: str) -> bytes:
        found = BLOB_URL.fullmatch(url)
        if found is None:
            return fetch(url)
        sha256 = found.group(1)
        data = cache.get(sha256)
        if data is None:
            data = fetch(url)
            if hashlib.sha256(data).hexdigest() == sha256:  # else the caller refuses it
                cache.put(sha256, data)
        return data

    return get


def _model_cache(cache_dir: Path) -> ModelCache:
    """The executor's model cache (``<cache_dir>/models``, as the worker's runtime sees it).

    With the workers' own bound: a smaller one here would evict the shared cache down to it
    on every model the daemon stores, and large models would keep pushing each other out.
    """
    from nodeclient.node.runtimes.onnx import DEFAULT_MAX_CACHE_BYTES, ModelCache

    return ModelCache(cache_dir / "models", max_bytes=DEFAULT_MAX_CACHE_BYTES)


def _resolve_model(
    payload: bytes, fetch: Fetch, cache: ModelCache, sandbox_owner: bool, max_payload_bytes: int
) -> bytes:
    from nodeclient.workloads.inference import InferenceRequest

    try:
        request = InferenceRequest.decode(payload)
    except ProtocolError:
        return payload  # the worker reports the precise decoding error
    if request.model is not None or request.model_url is None:
        return payload
    if _holds(cache, request.model_sha256):
        return payload  # the worker verifies the hash when it reads the file
    with _MODEL_FETCHES.turn(cache.path_for(request.model_sha256), request.model_url):
        if _holds(cache, request.model_sha256):
            return payload  # fetched by the task this one waited for
        data = fetch(request.model_url)
        actual = hashlib.sha256(data).hexdigest()
        if actual != request.model_sha256:
            raise RemoteProtocolError(
                f"model at {request.model_url[:80]} has sha256 {actual}, "
                f"expected {request.model_sha256}"
            )
        owner = (sandbox.SANDBOX_UID, sandbox.SANDBOX_GID) if sandbox_owner else None
        stored = cache.put(request.model_sha256, data, owner=owner)
    if stored:
        return payload
    return _with_model_inline(request, data, max_payload_bytes)


def _holds(cache: ModelCache, sha256: str) -> bool:
    """Whether *cache* has model *sha256*; InputNotStored when the cache is unusable.

    Workers see the cache read-only, but a cache directory left by an older release (or
    by hand) may hold anything: a symlink there is refused here, before anything is
    fetched, and put() never follows one.
    """
    from nodeclient.node.runtimes.onnx import UnsafeCacheError

    try:
        return cache.contains(sha256)
    except UnsafeCacheError as exc:  # this node's disk, not the requester's payload
        log.error("cache.unsafe", extra={"error": str(exc)})
        raise InputNotStored("this node's model cache is unusable (see the node's log)") from exc


@dataclass(slots=True)
class _Turn:
    """The fetch of one model under way, and the tasks that wait for it."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    users: int = 0  # the task that fetches and those waiting: the last one forgets it


class _OneFetchEach:
    """One fetch of a model into a cache entry at a time, in the daemon's fetch threads.

    Slots that get one new model at once would each download it: as much traffic again,
    and each download holds the model in memory while the other does. The first task
    fetches; the others wait for it (stopping, as a download does, at their own task's
    deadline or cancellation) and then find the model in the cache, or, when that fetch
    failed (a bad URL, its own task's end), fetch it themselves, one after another. The
    lock of an entry is held across that entry's fetch and store alone, never another's.
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._turns: dict[Path, _Turn] = {}

    @contextlib.contextmanager
    def turn(self, entry: Path, url: str) -> Iterator[None]:
        """Hold *entry* while the block fetches and stores it (*url*, for a reason to
        give when the task stops while it waits)."""
        with self._guard:
            turn = self._turns.setdefault(entry, _Turn())
            turn.users += 1
        try:
            _acquire(turn.lock, url)
            try:
                yield
            finally:
                turn.lock.release()
        finally:
            with self._guard:
                turn.users -= 1
                if not turn.users:
                    del self._turns[entry]


def _acquire(lock: threading.Lock, url: str) -> None:
    """Take *lock*, looking every WATCH_S at the limits of the task this thread works for
    (:func:`fetch_limits`): RemoteProtocolError once it is cancelled, InputDeadline once
    its deadline passes, as its own download of *url* would stop."""
    limits = _LIMITS.get()
    if limits is None:
        lock.acquire()
        return
    while not lock.acquire(timeout=WATCH_S):
        _left(limits, url)


_MODEL_FETCHES: Final = _OneFetchEach()


def _with_model_inline(request: InferenceRequest, model: bytes, max_payload_bytes: int) -> bytes:
    """The request with its fetched *model* inline: the model cache could not store it (a
    full or failing disk), and the worker, which cannot fetch, finds models by URL only
    there.

    The cache is an optimisation, and a disk fault must make it miss, never fail a task:
    handed on by URL, the task would be refused by the worker ("not cached") as the
    requester's fault. Refusing it here as this node's fault would spare the requester,
    but this node would still refuse every such task, each after its download, until its
    disk is mended. Inline, the task runs as any inline request does (the model held in
    memory, never written to disk), at the cost of one more copy of it for the task, and
    the next task fetches the model again, as on any miss. Only a payload that would then
    be over what a worker takes is refused, and as this node's fault: on another node the
    model fits in the cache.
    """
    log.warning(
        "input.model_not_cached",
        extra={"model_sha256": request.model_sha256, "bytes": len(model)},
    )
    limit = min(max_payload_bytes, DEFAULT_MAX_BYTES)  # the executor's, the worker's decoder's
    inline = b""
    if len(model) <= limit:
        inline = replace(request, model=model, model_url=None).encode()
    if not inline or len(inline) > limit:
        raise InputNotStored(
            f"this node could not store the fetched model {request.model_sha256} in its "
            f"model cache (a full or failing disk), and sent inline it would be over the "
            f"{limit} bytes a worker takes"
        )
    return inline
