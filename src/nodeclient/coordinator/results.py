"""Stored results read out for the result routes, never whole in memory (2.3.7).

An accepted result stays in its row (``tasks.result``, ``jobs.result``): the bytes the
proof covers, up to 256 MiB. ``GET .../result`` must not read one whole into memory
(several requesters fetching large results at once would each hold one), nor on the
database thread that every transaction waits for (a copy of 256 MiB takes seconds). So
a result over :data:`CHUNK_BYTES` is copied, beside that thread, on a connection of its
own and in one read transaction, into an unnamed file beside the blobs, which the route
then sends. At most :data:`MAX_SPOOLS` copies run at once; others wait their turn.

A copy lives until its reader has had the last byte, so copies are bounded by what a
reader does too: the spool files alive at once hold at most :data:`MAX_SPOOL_BYTES`
together (a request over that is answered 503 with ``Retry-After``, :class:`SpoolFull`),
and a reader that takes no chunk for :data:`SEND_TIMEOUT_S` is dropped and its copy
closed (:class:`SpooledResponse`). Otherwise a few clients that ask for a large result
and then read nothing would each hold a copy of it on the coordinator's disk for as long
as they keep their connection open.

How each database gives a value out in pieces:

* SQLite: the driver's incremental blob reader (``substr`` would load the whole value
  for every piece);
* others (PostgreSQL): ``substr``, in at most :data:`MAX_PIECES` pieces. A compressed
  value is decompressed from its start for every piece (PostgreSQL decompresses only up
  to the slice asked for), so 1 MiB pieces of a 256 MiB render result took 35 s against
  6 s read whole; 16 pieces of 16 MiB cost a few times one whole read, in a sixteenth of
  the memory. ``COPY ... TO STDOUT`` gives no such relief: a row arrives in one block.
"""

from __future__ import annotations

import asyncio
import io
import logging
import sqlite3
import tempfile
from collections.abc import Callable
from typing import BinaryIO, Final

from sqlalchemy import Connection, LargeBinary, case, func, literal_column, select
from sqlalchemy.orm import InstrumentedAttribute
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from nodeclient.coordinator import models as m
from nodeclient.coordinator.blobstore import BlobStore
from nodeclient.coordinator.store import Database, readable_by

log = logging.getLogger("nodeclient.coordinator.api")

CHUNK_BYTES = 1024 * 1024  # a larger result is spooled to disk, and sent in these
MAX_SPOOLS: Final = 4  # result copies at once
MAX_PIECES: Final = 16  # substr reads of one result (see above)
# The bytes of all spool copies alive at once (being made, or being sent): four of the
# largest results (a render job's assembled result, 256 MiB). A copy is always allowed
# when no other is alive, so a result over this can still be fetched.
MAX_SPOOL_BYTES = 1024 * 1024 * 1024
SEND_TIMEOUT_S = 60.0  # a reader that takes no chunk for this long is dropped
RETRY_AFTER_S: Final = 10  # what a 503 for a full spool asks the requester to wait

Row = type[m.Job] | type[m.Task]


class ResultGone(Exception):
    """The row went (retention) or changed between the look and the copy."""


Columns = tuple[
    InstrumentedAttribute[str], InstrumentedAttribute[str], InstrumentedAttribute[bytes | None]
]


def _columns(row: Row) -> Columns:
    """The row's key, status and result columns."""
    if row is m.Job:
        return m.Job.job_id, m.Job.status, m.Job.result
    return m.Task.task_id, m.Task.status, m.Task.result


def head(
    row: Row, key: str, conn: Connection, requester: str | None = None
) -> tuple[str, int | None, bytes | None] | None:
    """The row's status, its result's size (None: no result), and the result itself when
    it is at most CHUNK_BYTES, in one query; None when there is no such row, or it is of
    a job *requester* may not read (``store.readable_by``)."""
    pk, status_column, result = _columns(row)
    size = func.length(result)
    small = case((size <= CHUNK_BYTES, result), else_=None)
    query = select(status_column, size, small).where(pk == key)
    if requester is not None:
        if row is m.Task:
            query = query.join(m.Job, m.Job.job_id == m.Task.job_id)
        query = query.where(readable_by(requester))
    found = conn.execute(query).first()
    if found is None:
        return None
    status, length, data = found
    return status, length, None if data is None else bytes(data)


def copy(row: Row, key: str, size: int, out: BinaryIO, conn: Connection) -> None:
    """Write the row's result, of *size* bytes, to *out* in pieces."""
    raw = conn.connection.driver_connection
    table = row.__tablename__
    pk, _, result = _columns(row)
    if isinstance(raw, sqlite3.Connection):
        rowid = conn.execute(
            select(literal_column("rowid")).select_from(row).where(pk == key)
        ).scalar()
        if rowid is None:
            raise ResultGone(f"{table} {key} is gone")
        with raw.blobopen(table, "result", int(rowid), readonly=True) as blob:
            while piece := blob.read(CHUNK_BYTES):
                out.write(piece)
    else:
        step = max(CHUNK_BYTES, -(-size // MAX_PIECES))
        for offset in range(0, size, step):
            part = func.substr(result, offset + 1, step, type_=LargeBinary)
            out.write(conn.execute(select(part).where(pk == key)).scalar() or b"")
    if out.tell() != size:
        raise ResultGone(f"{table} {key}: copied {out.tell()} of its result's {size} bytes")


def whole(row: Row, key: str, conn: Connection) -> bytes:
    """The row's result, read whole; ResultGone if it has none any more."""
    pk, _, result = _columns(row)
    data = conn.execute(select(result).where(pk == key)).scalar()
    if data is None:
        raise ResultGone(f"{row.__tablename__} {key} is gone")
    return bytes(data)


class SpoolFull(Exception):
    """The copies alive now hold too many bytes for another: the requester tries later."""


class Spooled:
    """A result's copy, rewound (a file, or the bytes in memory where no file could be
    written), and its share of the spool's bytes, given back when it is closed."""

    def __init__(self, file: BinaryIO, size: int, release: Callable[[int], None]) -> None:
        self.file = file
        self.size = size
        self._release: Callable[[int], None] | None = release

    @property
    def closed(self) -> bool:
        return self._release is None

    def close(self) -> None:
        """Close the copy (an unnamed file: its disk space is freed) and give back its
        bytes; once only, however often it is called."""
        release, self._release = self._release, None
        if release is not None:
            try:
                self.file.close()
            finally:
                release(self.size)


class Spooler:
    """Copies of large results: at most MAX_SPOOLS made at once, each off the database
    thread, and at most *max_bytes* of them alive at once (MAX_SPOOL_BYTES by default).

    Only the event loop calls :meth:`spool` and closes what it gives, so the count of
    bytes alive needs no lock."""

    def __init__(
        self,
        db: Database,
        blobs: BlobStore,
        *,
        max_bytes: int | None = None,
        send_timeout: float | None = None,
    ) -> None:
        self._db = db
        self._blobs = blobs
        self._turns = asyncio.Semaphore(MAX_SPOOLS)
        self._max_bytes = MAX_SPOOL_BYTES if max_bytes is None else max_bytes
        self.send_timeout = SEND_TIMEOUT_S if send_timeout is None else send_timeout
        self._alive = 0

    @property
    def alive_bytes(self) -> int:
        """The bytes of the copies alive now (being made, waiting, or being sent)."""
        return self._alive

    def _release(self, size: int) -> None:
        self._alive -= size

    async def head(
        self, row: Row, key: str, requester: str | None = None
    ) -> tuple[str, int | None, bytes | None] | None:
        return await self._db.run_core(lambda conn: head(row, key, conn, requester))

    async def spool(self, row: Row, key: str, size: int) -> Spooled:
        """A copy of the row's result, rewound; close it when it has been sent.

        SpoolFull if the copies alive now and this one would hold more than the limit
        (one copy alone is always allowed); ResultGone if the result went meanwhile.
        Where no file can be written (a full or read-only disk), the result itself, read
        whole: a requester still gets what the database holds, and it counts against the
        same limit."""
        if self._alive and self._alive + size > self._max_bytes:
            raise SpoolFull(
                f"the coordinator is sending {self._alive} bytes of results already; a "
                f"result of {size} bytes would pass its limit of {self._max_bytes}"
            )
        self._alive += size  # reserved before the wait for a turn: waiting copies count
        try:
            async with self._turns:
                file = await self._copy(row, key, size)
        except BaseException:
            self._release(size)
            raise
        return Spooled(file, size, self._release)

    async def _copy(self, row: Row, key: str, size: int) -> BinaryIO:
        try:
            return await asyncio.to_thread(self._spool, row, key, size)
        except OSError as exc:
            log.warning(
                "results.spool_failed",
                extra={"error": f"{exc.strerror or exc}", "size": size, "key": key},
            )
        data = await asyncio.to_thread(self._db.read_aside, lambda c: whole(row, key, c))
        return io.BytesIO(data)

    def _spool(self, row: Row, key: str, size: int) -> BinaryIO:
        # Beside the blobs, on the coordinator's disk (/tmp may be memory); it has no
        # name, so nothing is left behind whatever happens to the response.
        self._blobs.directory.mkdir(parents=True, exist_ok=True)
        out = tempfile.TemporaryFile(dir=self._blobs.directory, prefix=".result-")  # noqa: SIM115 (Spooled closes it)
        try:
            self._db.read_aside(lambda conn: copy(row, key, size, out, conn))
            out.seek(0)
        except BaseException:
            out.close()
            raise
        return out


class _Stalled(Exception):
    """The reader took nothing for the send timeout."""


class SpooledResponse(Response):
    """A spooled result sent in CHUNK_BYTES pieces with its length; the copy is closed
    (its disk space freed, its bytes given back to the spooler) however the sending ends.

    Each message must be taken by the connection within *send_timeout* seconds: a reader
    that stops reading fills the socket's buffers, the server then holds each write back,
    and once one is held back that long the response is abandoned and the connection
    closed. A reader that goes away ends the sending at once."""

    media_type = "application/octet-stream"

    def __init__(self, spooled: Spooled, *, key: str, send_timeout: float) -> None:
        super().__init__(headers={"Content-Length": str(spooled.size)})
        self._spooled = spooled
        self._key = key
        self._send_timeout = send_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            sending = asyncio.ensure_future(self._send(scope, send))
            watching = asyncio.ensure_future(_disconnected(receive))
            try:
                await asyncio.wait({sending, watching}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                sending.cancel()
                watching.cancel()
                await asyncio.gather(sending, watching, return_exceptions=True)
            failed = None if sending.cancelled() else sending.exception()
            if failed is not None:
                raise failed
        finally:
            self._spooled.close()

    async def _send(self, scope: Scope, send: Send) -> None:
        sent = 0

        async def timed(message: Message) -> None:
            try:
                async with asyncio.timeout(self._send_timeout):  # wait_for may drop a cancel
                    await send(message)
            except TimeoutError:
                raise _Stalled from None

        try:
            await timed(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            while piece := await asyncio.to_thread(self._spooled.file.read, CHUNK_BYTES):
                await timed({"type": "http.response.body", "body": piece, "more_body": True})
                sent += len(piece)
            await timed({"type": "http.response.body", "body": b"", "more_body": False})
        except _Stalled:
            log.info(
                "results.reader_stalled",
                extra={
                    "key": self._key,
                    "sent": sent,
                    "size": self._spooled.size,
                    "timeout_s": self._send_timeout,
                },
            )
            # Reset the connection: a close would wait for the reader to take what the
            # buffers still hold, for as long as it keeps reading nothing. (Returning
            # without the last message also makes the server close it, where the server
            # gives no abort.)
            from nodeclient.coordinator.link import ABORT_KEY  # link imports this module's users

            abort = scope.get(ABORT_KEY)
            if callable(abort):
                abort()
                await asyncio.sleep(0)  # the server sees the connection lost first


async def _disconnected(receive: Receive) -> None:
    """Return once the client has gone (or the response is complete)."""
    while (await receive())["type"] != "http.disconnect":
        pass
