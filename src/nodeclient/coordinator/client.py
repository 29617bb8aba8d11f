"""A small synchronous HTTP client for the coordinator's API (requesters, nodes, devnets).

Error responses become :class:`~nodeclient.errors.RemoteProtocolError` with the
coordinator's ``{"error": ...}`` reason, so callers and the CLI print one line instead of
a traceback. Transport failures are told apart by whether the request got out::

    UsageError
    └── Unreachable     no connection: nothing was sent, nothing happened
    NodeClientError
    └── NoAnswer        sent, but no complete answer (a timeout, a dropped connection):
                        a POST may have been applied all the same
"""

from __future__ import annotations

import hashlib
import io
import ssl
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final
from urllib.parse import urlencode

import httpx
import pybase64

from nodeclient import httpbody, tlstrust
from nodeclient.errors import NodeClientError, RemoteProtocolError, UsageError
from nodeclient.protocol.messages import is_uuid_text

# What fails before a request leaves: no connection, a bad URL, no free pooled connection.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.ProxyError,
             httpx.UnsupportedProtocol)  # fmt: skip


# What an answer may hold at most, read as sent: a JSON document (a job of 4,096 tasks
# with their signed messages is a few MB), a blob or a task's result (both far under the
# blob store's 256 MiB), and a job's assembled result (a long render: many GiB at most).
MAX_JSON_ANSWER: Final = 64 << 20
MAX_BLOB_ANSWER: Final = 256 << 20
MAX_JOB_RESULT: Final = 16 << 30
BUSY_RETRIES: Final = 5  # a read answered 503 (Retry-After) is asked again this many times
BUSY_WAIT_MAX_S: Final = 30.0  # and waits at most this long before each


class Unreachable(UsageError):
    """The coordinator could not be reached: the request was never sent."""


class NoAnswer(NodeClientError):
    """The request was sent but no complete answer came back (a timeout, a connection
    dropped mid-response): the coordinator may have applied it."""


class CoordinatorClient:
    """Sync httpx client for one coordinator base URL; usable as a context manager."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        token: str | None = None,
        verify: ssl.SSLContext | None = None,
    ) -> None:
        """*token*: the bearer token a coordinator with requester tokens asks for. *verify*:
        the certificates to trust (default: tlstrust's, as every nodeclient client)."""
        self.base_url = base_url.rstrip("/")
        self._prefix = urllib.parse.urlsplit(self.base_url).path  # a proxy's, if any
        headers = dict(httpbody.IDENTITY)
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=timeout,
            transport=transport,
            headers=headers,
            verify=verify if verify is not None else tlstrust.client_context(),
        )

    def __enter__(self) -> CoordinatorClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(
        self,
        method: str,
        path: str,
        *,
        unanswered: str | None = None,
        limit: int = MAX_JSON_ANSWER,
        **kwargs: Any,
    ) -> httpx.Response:
        """Send one request; *unanswered* says what to check when a change may have been
        applied without an answer (default: a general warning for anything but a GET).
        The answer is read as sent and at most *limit* bytes of it (``httpbody``)."""
        try:
            response = httpbody.request(self._http, method, path, limit=limit, **kwargs)
            # A coordinator sending as many results as it will at once answers 503 with
            # Retry-After: a read is asked again after that long, a few times.
            for _ in range(BUSY_RETRIES):
                wait = _busy_wait(method, response)
                if wait is None:
                    break
                time.sleep(wait)
                response = httpbody.request(self._http, method, path, limit=limit, **kwargs)
        except httpbody.AnswerRefused as exc:
            raise RemoteProtocolError(f"coordinator: {method} {path}: {exc}") from exc
        except _NOT_SENT as exc:
            said = f"cannot reach the coordinator at {self.base_url}: {exc}"
            raise Unreachable(tlstrust.with_trust_fix(said, exc)) from exc
        except httpx.TransportError as exc:
            what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if unanswered is None and method != "GET":
                unanswered = "it may have been applied: check before sending it again"
            raise NoAnswer(
                f"no answer from the coordinator at {self.base_url} to {method} {path} "
                f"({what})" + (f"; {unanswered}" if unanswered else "")
            ) from exc
        if not 200 <= response.status_code < 300:  # a redirect is a proxy's, not an answer
            moved = tlstrust.redirect_message(response, path.partition("?")[0])
            if moved is not None:  # http:// to https://, say: nothing was done
                raise RemoteProtocolError(
                    f"coordinator: {method} {path}: {response.status_code} {moved}"
                )
            try:
                body = response.json()
            except (ValueError, RecursionError):  # not JSON, or nested without end
                body = None
            error = body.get("error") if isinstance(body, dict) else None
            reason = str(error or response.text[:200] or response.reason_phrase)
            if _busy_wait(method, response) is not None:  # busy still: nothing is known
                raise NoAnswer(
                    f"the coordinator at {self.base_url} is busy: GET {path} was answered 503 "
                    f"{BUSY_RETRIES + 1} times ({reason}); try again later"
                )
            raise RemoteProtocolError(
                f"coordinator: {method} {path}: {response.status_code} {reason}"
            )
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return _decoded(self._request(method, path, **kwargs), path)

    # --- nodes --------------------------------------------------------------------------------

    def register(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """POST /v1/nodes with a signed manifest (2.3.2)."""
        result: dict[str, Any] = self._json("POST", "/v1/nodes", json=dict(manifest))
        return result

    def unstake(
        self, node_id: str, message: Mapping[str, Any], signature: str | bytes
    ) -> dict[str, Any]:
        """POST /v1/nodes/{node_id}/unstake; *message* is the Unstake message JSON."""
        sig = signature if isinstance(signature, str) else "0x" + signature.hex()
        result: dict[str, Any] = self._json(
            "POST",
            f"/v1/nodes/{node_id}/unstake",
            json={"message": dict(message), "signature": sig},
        )
        return result

    def nodes(self, *, page: int | None = None) -> list[dict[str, Any]]:
        """Every registered node, in the order they registered: GET /v1/nodes, page after
        page (of *page* nodes; the coordinator's default otherwise), as :meth:`_pages`
        reads them."""
        out: list[dict[str, Any]] = []
        for path, batch in self._pages("/v1/nodes", {"limit": page} if page else {}):
            if not all(isinstance(n, dict) for n in batch):
                raise RemoteProtocolError(f"coordinator: {path} did not answer a list of nodes")
            out += batch
        return out

    def node(self, node_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._json("GET", f"/v1/nodes/{node_id}")
        return result

    def manifest(self, manifest_hash: str) -> Any:
        """GET /v1/manifests/{hash}: a node's signed manifest, as the coordinator serves it
        (checked by the caller: :func:`nodeclient.protocol.manifest.verify_manifest`)."""
        return self._json("GET", f"/v1/manifests/{manifest_hash}")

    def health(self) -> dict[str, Any]:
        result: dict[str, Any] = self._json("GET", "/healthz")
        return result

    # --- blobs and jobs -------------------------------------------------------------------------

    def upload_blob(self, data: bytes) -> dict[str, Any]:
        """POST /v1/blobs; returns {"sha256", "url", "size"}."""
        result: dict[str, Any] = self._json(
            "POST", "/v1/blobs", content=data,
            headers={"content-type": "application/octet-stream"},
        )  # fmt: skip
        return result

    def blob(self, sha256: str) -> bytes:
        return self._request("GET", f"/v1/blobs/{sha256}", limit=MAX_BLOB_ANSWER).content

    def submit_job(
        self,
        workload_class: str,
        payload: bytes,
        *,
        min_tier: int = 0,
        region: str | None = None,
        slices: int = 1,
        ram_mb: int = 0,
        vram_mb: int = 0,
    ) -> dict[str, Any]:
        """POST /v1/jobs; returns the new job (job_id, status, tasks). *ram_mb* and
        *vram_mb*: what each task needs in its slot (0: nothing declared)."""
        body: dict[str, Any] = {
            "workload_class": workload_class,
            "payload": pybase64.b64encode_as_string(payload),
            "min_tier": min_tier,
            "region": region,
            "slices": slices,
        }
        resources = {"ram_mb": ram_mb, "vram_mb": vram_mb}
        if any(resources.values()):
            body["resources"] = {key: value for key, value in resources.items() if value}
        check = "the job may have been created all the same: list the jobs " \
            "(`nodeclient-coordinator jobs`) before submitting it again"  # fmt: skip
        answer = self._json("POST", "/v1/jobs", json=body, unanswered=check)
        return _job_object(answer, "POST /v1/jobs", then=check)

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        """POST /v1/jobs/{job_id}/cancel: the job, failed ("cancelled by the requester"),
        without its tasks; a job that has ended already is a 409."""
        path = f"{_job_path(job_id)}/cancel"
        answer = self._json("POST", path, unanswered="it may have been cancelled: look at the job")
        return _job_object(answer, f"POST {path}", tasks=False)

    def job(self, job_id: str, *, tasks: bool = True) -> dict[str, Any]:
        """The job with every task; without *tasks*, the job alone (``?tasks=none``): far
        less for the coordinator to build for a job of many tasks, for a poll that reads
        only its status."""
        path = _job_path(job_id) + ("" if tasks else "?tasks=none")
        return _job_object(self._json("GET", path), f"GET {path}", tasks=tasks)

    def jobs(self, *, status: str | None = None, page: int | None = None) -> list[dict[str, Any]]:
        """Every job (of *status*, if given), oldest first: :meth:`iter_jobs`, listed."""
        return list(self.iter_jobs(status=status, page=page))

    def iter_jobs(
        self, *, status: str | None = None, page: int | None = None
    ) -> Iterator[dict[str, Any]]:
        """Every job (of *status*, if given), oldest first, as each page comes: GET
        /v1/jobs, page after page (of *page* jobs; the coordinator's default otherwise) as
        its ``Link: <...>; rel="next"`` headers lead. A next page that was read already
        (a coordinator's bug, or a hostile one) would list the same jobs for ever: it is a
        RemoteProtocolError, after the jobs of the pages before it."""
        query = {k: v for k, v in (("status", status), ("limit", page)) if v is not None}
        for path, batch in self._pages("/v1/jobs", query):
            yield from [_job_object(item, f"GET {path}", tasks=False) for item in batch]

    def _pages(self, route: str, query: Mapping[str, object]) -> Iterator[tuple[str, list[Any]]]:
        """(path, items) of each page of GET *route* (a list in each answer), as its
        ``Link: <...>; rel="next"`` headers lead, until a page is empty or names no next.
        A next page that was read already (a coordinator's bug, or a hostile one) would
        list the same items for ever: it is a RemoteProtocolError, after the pages before
        it."""
        path: str | None = route + (f"?{urlencode(query)}" if query else "")
        read: set[str] = set()
        while path is not None:
            read.add(path)
            response = self._request("GET", path)
            batch = _decoded(response, path)
            if not isinstance(batch, list):
                raise RemoteProtocolError(f"coordinator: {path} did not answer a list")
            yield path, batch
            then = _next_page(response, self._prefix, route) if batch else None
            if then in read:
                raise RemoteProtocolError(
                    f'coordinator: GET {path}: its Link rel="next" leads to {then}, a page '
                    "already read, so the listing would never end: it stops here; tell the "
                    "coordinator's operator"
                )
            path = then

    def raw_job_result(self, job_id: str) -> bytes:
        """The job's result bytes as served, unchecked, all in memory (up to
        MAX_JOB_RESULT): :meth:`read_job_result` hands them on as they come instead."""
        return self._request("GET", f"{_job_path(job_id)}/result", limit=MAX_JOB_RESULT).content

    def read_job_result(self, job_id: str, sink: Callable[[bytes], object]) -> int:
        """Stream the job's result bytes as served, unchecked, to *sink* chunk by chunk
        (at most MAX_JOB_RESULT of them): their size. ``verify`` checks them as they come
        (``audit``), and stops reading once they are longer than they could rightly be
        by raising from *sink*: the exception is not caught here."""
        path = f"{_job_path(job_id)}/result"
        size = 0

        def counted(chunk: bytes) -> None:
            nonlocal size
            size += len(chunk)
            sink(chunk)

        self._request("GET", path, limit=MAX_JOB_RESULT, sink=counted)
        return size

    def job_result(self, job_id: str) -> bytes:
        """The job's result bytes, checked against the result_sha256 the job publishes."""
        out = io.BytesIO()
        self.save_job_result(job_id, out.write)
        return out.getvalue()

    def save_job_result(self, job_id: str, write: Callable[[bytes], object]) -> int:
        """Stream the job's result to *write*, chunk by chunk (a render's result can be
        gigabytes), and check it against the result_sha256 the job publishes; its size.
        RemoteProtocolError when it does not match: what *write* got must then be
        discarded (the requester CLI writes into a temporary file, renamed only after)."""
        digest = hashlib.sha256()
        size = 0

        def sink(chunk: bytes) -> None:
            nonlocal size
            size += len(chunk)
            digest.update(chunk)
            write(chunk)

        self.read_job_result(job_id, sink)
        expected = self.job(job_id, tasks=False).get("result_sha256")
        actual = digest.hexdigest()
        if actual != expected:
            raise RemoteProtocolError(
                f"coordinator: the result of job {job_id} has SHA-256 {actual}, but the job "
                f"says {expected}: not saved"
            )
        return size

    def task_result(self, task_id: str) -> bytes:
        """GET /v1/tasks/{task_id}/result (the id as the coordinator listed it: one path
        segment, whatever it holds)."""
        path = f"/v1/tasks/{_segment(task_id)}/result"
        return self._request("GET", path, limit=MAX_BLOB_ANSWER).content


_JOB_FIELDS: Final = ("job_id", "workload_class", "status")


def _job_object(value: Any, what: str, *, tasks: bool = True, then: str = "") -> dict[str, Any]:
    """*value* if it is a job object as the API documents it (its job_id a UUID, its
    workload_class and status strings, and, with *tasks*, a list of task objects), else a
    one-line RemoteProtocolError: an answer of another shape (a proxy's, another
    service's, or a job id that is not one, which would otherwise be printed and polled)."""
    fields_ok = (
        isinstance(value, dict)
        and all(isinstance(value.get(k), str) for k in _JOB_FIELDS)
        and is_uuid_text(value["job_id"])  # the protocol's: anything else is no job of its
    )
    listed = value.get("tasks", []) if fields_ok else None
    if not fields_ok or (
        tasks and not (isinstance(listed, list) and all(isinstance(t, dict) for t in listed))
    ):
        raise RemoteProtocolError(
            f"coordinator: {what} did not answer a job object (job_id, workload_class, "
            "status, tasks): is --coordinator a nodeclient coordinator?"
            + (f" {then}" if then else "")
        )
    job: dict[str, Any] = value
    return job


def _job_path(job_id: str) -> str:
    """/v1/jobs/{job_id}, the id one path segment whatever it holds: it may be the
    coordinator's own answer (``submit --wait`` polls the id it was given), and a ``/``,
    ``?`` or ``..`` in it must not make it another route of the coordinator's."""
    return "/v1/jobs/" + _segment(job_id)


def _segment(text: str) -> str:
    """*text* as one path segment: every character but letters, digits, ``-``, ``_`` and
    ``~`` percent-encoded, dots too (``quote`` keeps them, and an HTTP client resolves a
    segment of ``.`` or ``..`` against the path before it)."""
    return urllib.parse.quote(text, safe="", errors="surrogatepass").replace(".", "%2E")


def _next_page(response: httpx.Response, prefix: str = "", route: str = "/v1/jobs") -> str | None:
    """The path of the next page of GET *route* (/v1/jobs or /v1/nodes, under the client's
    base URL), from the answer's ``Link: <...>; rel="next"``: ``</v1/jobs?...>``, or under
    *prefix*, the coordinator URL's own path (``</coord/v1/jobs?...>``, from a
    coordinator a proxy told its prefix), or a query-only reference (``<?limit=...>``,
    the same path). Only a page of this coordinator's: a Link elsewhere is not followed."""
    nxt = response.links.get("next", {}).get("url")
    if not isinstance(nxt, str):
        return None
    if nxt.startswith("?"):
        return route + nxt
    for start in dict.fromkeys((prefix, "")):
        if nxt.startswith(start + route + "?"):
            return nxt[len(start) :]
    return None


def _busy_wait(method: str, response: httpx.Response) -> float | None:
    """How long to wait before asking again (within 1 to BUSY_WAIT_MAX_S seconds) when a
    read was answered 503 with a Retry-After in seconds; None for any other answer (a
    503 without one, a token file its operator must fix or a proxy's, is an answer)."""
    if method != "GET" or response.status_code != 503:
        return None
    seconds = httpbody.retry_after(response)
    return None if seconds is None else min(max(seconds, 1.0), BUSY_WAIT_MAX_S)


def _decoded(response: httpx.Response, path: str) -> Any:
    try:
        return response.json()
    except (ValueError, RecursionError) as exc:  # not JSON, or nested without end
        raise RemoteProtocolError(f"coordinator: {path} did not answer JSON") from exc
