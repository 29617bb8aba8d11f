"""Stored results read out for the result routes, never whole in memory (2.3.7).

An accepted result stays in its row (``tasks.result``, ``jobs.result``): the bytes the
proof covers, up to 256 MiB. ``GET .../result`` must not read one whole into memory
(several requesters fetching large results at once would each hold one), nor on the
database thread that every transaction waits for (a copy of 256 MiB takes seconds). So
a result over :data:`CHUNK_BYTES` is copied, beside that thread, on a connection of its
own and in one read transaction, into an unnamed file beside the blobs, which the route
then sends. At most :data:`MAX_SPOOLS` copies run at once; others wait their turn.

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
import logging
import sqlite3
import tempfile
from collections.abc import AsyncIterator
from typing import BinaryIO, Final

from sqlalchemy import Connection, LargeBinary, case, func, literal_column, select
from sqlalchemy.orm import InstrumentedAttribute

from nodeclient.coordinator import models as m
from nodeclient.coordinator.blobstore import BlobStore
from nodeclient.coordinator.store import Database

log = logging.getLogger("nodeclient.coordinator.api")

CHUNK_BYTES = 1024 * 1024  # a larger result is spooled to disk, and sent in these
MAX_SPOOLS: Final = 4  # result copies at once
MAX_PIECES: Final = 16  # substr reads of one result (see above)

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


def head(row: Row, key: str, conn: Connection) -> tuple[str, int | None, bytes | None] | None:
    """The row's status, its result's size (None: no result), and the result itself when
    it is at most CHUNK_BYTES, in one query; None when there is no such row."""
    pk, status_column, result = _columns(row)
    size = func.length(result)
    small = case((size <= CHUNK_BYTES, result), else_=None)
    found = conn.execute(select(status_column, size, small).where(pk == key)).first()
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


class Spooler:
    """Copies of large results, at most MAX_SPOOLS at once, each off the database thread."""

    def __init__(self, db: Database, blobs: BlobStore) -> None:
        self._db = db
        self._blobs = blobs
        self._turns = asyncio.Semaphore(MAX_SPOOLS)

    async def head(self, row: Row, key: str) -> tuple[str, int | None, bytes | None] | None:
        return await self._db.run_core(lambda conn: head(row, key, conn))

    async def spool(self, row: Row, key: str, size: int) -> BinaryIO | bytes:
        """A file holding the row's result, rewound; ResultGone if it went meanwhile.

        Where no file can be written (a full or read-only disk), the result itself, read
        whole: a requester still gets what the database holds, and at most MAX_SPOOLS
        results are in memory at once."""
        async with self._turns:
            try:
                return await asyncio.to_thread(self._spool, row, key, size)
            except OSError as exc:
                log.warning(
                    "results.spool_failed",
                    extra={"error": f"{exc.strerror or exc}", "size": size, "key": key},
                )
                return await asyncio.to_thread(self._db.read_aside, lambda c: whole(row, key, c))

    def _spool(self, row: Row, key: str, size: int) -> BinaryIO:
        # Beside the blobs, on the coordinator's disk (/tmp may be memory); it has no
        # name, so nothing is left behind whatever happens to the response.
        self._blobs.directory.mkdir(parents=True, exist_ok=True)
        out = tempfile.TemporaryFile(dir=self._blobs.directory, prefix=".result-")  # noqa: SIM115 (the response closes it)
        try:
            self._db.read_aside(lambda conn: copy(row, key, size, out, conn))
            out.seek(0)
        except BaseException:
            out.close()
            raise
        return out


async def chunks(spooled: BinaryIO) -> AsyncIterator[bytes]:
    """The spooled result in CHUNK_BYTES pieces, read off the event loop; closes it."""
    try:
        while piece := await asyncio.to_thread(spooled.read, CHUNK_BYTES):
            yield piece
    finally:
        spooled.close()
