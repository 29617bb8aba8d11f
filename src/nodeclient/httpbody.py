"""HTTP answers read as they were sent, and no more of them than could be meant.

httpx decodes a ``Content-Encoding`` (stacked ones too) while it reads, before any size
check sees the bytes: a few hundred bytes of gzip inside gzip, from a hostile or a
misconfigured server, become gigabytes in the reading process. Answers this project
reads from a server (the coordinator's, for the daemon's registration, ``doctor``,
``unstake`` and the requester client) are asked for with :data:`IDENTITY`, read raw by
:func:`read` or :func:`aread`, and refused (:class:`AnswerRefused`) with any other
encoding or past a limit fitting what they hold. An error answer (not 2xx) is read only
to :data:`MAX_ERROR_ANSWER`, whatever the route's limit: it says why in a line, and a
hostile server's 500 of gigabytes on a result's route is never read whole. Blobs from
requesters' URLs have their own loop (``node.inputs``: the task's deadline and
cancellation), with the same check.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Final

import httpx

IDENTITY: Final = {"Accept-Encoding": "identity"}
# What is read of an answer that is not a success: its reason, a JSON object of a line or a
# proxy's page. The rest is left unread (the connection is closed with it).
MAX_ERROR_ANSWER: Final = 64 << 10


class AnswerRefused(httpx.HTTPError):
    """An answer with a content coding, or longer than its limit: not read further."""


def check_identity(resp: httpx.Response) -> None:
    """AnswerRefused unless *resp* is sent without a content coding."""
    encoding = resp.headers.get("Content-Encoding", "identity")
    if encoding.strip().lower() != "identity":
        raise AnswerRefused(
            f"the answer ({resp.status_code}) came with Content-Encoding {encoding[:40]!r}, "
            "though none was asked for: it is not read"
        )


def _over(resp: httpx.Response, limit: int) -> AnswerRefused:
    return AnswerRefused(
        f"the answer ({resp.status_code}) is over {limit} bytes, more than it could hold: "
        "not read further"
    )


def read(resp: httpx.Response, *, limit: int) -> bytes:
    """The body of a streamed answer, as sent (see the module docstring)."""
    check_identity(resp)
    if _in_memory(resp):
        if len(resp.content) > limit:  # without a content coding (checked): as given
            raise _over(resp, limit)
        return resp.content
    body = bytearray()
    for chunk in resp.iter_raw():
        body += chunk
        if len(body) > limit:
            raise _over(resp, limit)
    return bytes(body)


def read_head(resp: httpx.Response, *, limit: int) -> bytes:
    """The first *limit* bytes at most of a streamed answer, as sent; what follows them is
    not read (closing the answer then closes its connection)."""
    check_identity(resp)
    if _in_memory(resp):
        return resp.content[:limit]
    head = bytearray()
    for chunk in resp.iter_raw():
        head += chunk
        if len(head) >= limit:
            break
    return bytes(head[:limit])


def read_into(resp: httpx.Response, sink: Callable[[bytes], object], *, limit: int) -> int:
    """:func:`read`, each chunk handed to *sink* as it comes instead of kept: the body's
    size, which is at most *limit*."""
    check_identity(resp)
    if _in_memory(resp):
        if len(resp.content) > limit:
            raise _over(resp, limit)
        sink(resp.content)
        return len(resp.content)
    size = 0
    for chunk in resp.iter_raw():
        size += len(chunk)
        if size > limit:
            raise _over(resp, limit)
        sink(chunk)
    return size


def request(
    client: httpx.Client,
    method: str,
    url: str,
    *,
    limit: int,
    sink: Callable[[bytes], object] | None = None,
    **kwargs: Any,
) -> httpx.Response:
    """Send a request with *client* and return its answer, read by :func:`read` (as
    sent, at most *limit* bytes), as an ``httpx.Response`` with its content. With *sink*,
    a successful (2xx) answer's body goes to *sink* chunk by chunk (:func:`read_into`)
    and the response returned has none: a body of gigabytes is never held in memory.

    Any other answer (an error, a redirect, a 503 to wait on) keeps only the first
    :data:`MAX_ERROR_ANSWER` bytes of its body (:func:`read_head`), however large
    *limit* is: *limit* fits what a success holds (16 GiB for a job's result), and an
    error's reason is a line."""
    sent = client.build_request(method, url, **kwargs)
    streamed = client.send(sent, stream=True)
    try:
        if not streamed.is_success:
            content = read_head(streamed, limit=min(limit, MAX_ERROR_ANSWER))
        elif sink is not None:
            read_into(streamed, sink, limit=limit)
            content = b""
        else:
            content = read(streamed, limit=limit)
    finally:
        streamed.close()
    return httpx.Response(
        streamed.status_code, headers=streamed.headers, content=content, request=sent
    )


async def aread(resp: httpx.Response, *, limit: int) -> bytes:
    """:func:`read` for an ``httpx.AsyncClient``'s streamed answer."""
    if _in_memory(resp):
        return read(resp, limit=limit)
    check_identity(resp)
    body = bytearray()
    async for chunk in resp.aiter_raw():
        body += chunk
        if len(body) > limit:
            raise _over(resp, limit)
    return bytes(body)


def retry_after(resp: httpx.Response) -> float | None:
    """The seconds an answer's ``Retry-After`` names, or None without a finite number
    there (an HTTP date counts as none: the coordinator sends seconds)."""
    try:
        seconds = float(resp.headers.get("retry-after", ""))
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) else None


def _in_memory(resp: httpx.Response) -> bool:
    """An answer an in-process transport made from bytes, which httpx read at once."""
    return resp.is_stream_consumed
