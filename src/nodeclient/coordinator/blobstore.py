"""The coordinator's blob store: content-addressed inputs (models, scenes, assets) that
nodes fetch from ``/v1/blobs/<sha256>``, one file per blob in ``<data-dir>/blobs/``.

Every write is atomic and durable (a temporary file, fsynced, renamed, the directory
fsynced), so a job committed after a write never references a blob that a crash could
lose. A blob's modification time is set, on the coordinator's clock, whenever it is
used: uploaded, stored for a job, referenced by a submitted job, or fetched by a node.

Retention: :meth:`BlobStore.sweep` removes a blob that no unfinished job references and
that nobody has used for the retention period (``--blob-retention-hours``, 7 days by
default, at least an hour; 0 keeps every blob), and temporary files that an
interrupted upload left behind. Checking a blob for a job and removing one are
serialised by one lock, so a job can never be accepted for a blob that the sweep
removes: either the job's check dates it first, and no retention removes a blob used
within the hour (the job is recorded long before), or the blob is gone first and the
job is refused with "upload it first".
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from nodeclient.coordinator import classes, store
from nodeclient.durable import fsync_directory
from nodeclient.errors import ProtocolError
from nodeclient.protocol.blobs import SHA256_HEX

if TYPE_CHECKING:
    from nodeclient.coordinator.service import Coordinator

log = logging.getLogger("nodeclient.coordinator.blobs")

TEMP_PREFIXES: Final = (".upload-", ".hoist-")
STALE_TEMP_S: Final = 24 * 3600.0  # an upload still unfinished after a day is abandoned


@dataclass(frozen=True, slots=True)
class Swept:
    """What one sweep did."""

    removed: int  # blobs removed
    freed_bytes: int  # their size together
    kept: int  # blobs that stay (in use, or used within the retention period)
    temporaries: int  # abandoned temporary files removed


class BlobStore:
    """The files of the blob store, with the clock that dates their use."""

    def __init__(self, directory: Path, *, clock: Callable[[], float]) -> None:
        self.directory = directory
        self._now = clock
        self._lock = threading.Lock()  # held by use() and by each removal of a sweep
        self._undatable_said = False

    def path(self, sha256: str) -> Path:
        if not SHA256_HEX.fullmatch(sha256):
            raise ValueError(f"not a SHA-256: {sha256!r}")
        return self.directory / sha256

    def temporary(self, prefix: str) -> tuple[int, str]:
        """A new temporary file in the store's directory, for :meth:`publish`: (fd, path).
        The directory is made at the first one, and its parent fsynced, so that its name
        survives a crash as the blobs' names in it do (:meth:`publish`)."""
        if not self.directory.is_dir():
            self.directory.mkdir(parents=True, exist_ok=True)
            fsync_directory(self.directory.parent)
        return tempfile.mkstemp(dir=self.directory, prefix=prefix)

    def publish(self, tmp: str, sha256: str) -> None:
        """Rename a written and fsynced temporary file to the blob's name (atomic: readers
        see all or nothing), fsync the directory so the name survives a crash as well as
        the bytes, and date the blob's use."""
        final = self.path(sha256)
        with self._lock:  # a sweep never sees the new name undated
            os.replace(tmp, final)
            self._date(final)
        fsync_directory(self.directory)

    def store(self, sha256: str, data: bytes) -> None:
        """Hold *data*, whose SHA-256 the caller checked, as ``sha256``; a blob already
        held stays (and is dated as used)."""
        final = self.path(sha256)
        with contextlib.suppress(FileNotFoundError):  # swept meanwhile: write it again
            if self.use(sha256) and final.stat().st_size == len(data):
                return
        fd, tmp = self.temporary(".hoist-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            self.publish(tmp, sha256)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def use(self, sha256: str) -> bool:
        """Whether the store holds *sha256* (as a regular file); if it does, the blob is
        dated as used now, so the next sweep keeps it for another retention period."""
        if not SHA256_HEX.fullmatch(sha256):
            return False
        path = self.directory / sha256
        with self._lock:
            try:
                if not stat.S_ISREG(path.lstat().st_mode):
                    return False
            except FileNotFoundError:
                return False
            self._date(path)
            return True

    def _date(self, path: Path) -> None:
        """Set the blob's times to now; a blob this process may not date (another owner, a
        read-only mount) is still served, and goes by its old date (said once)."""
        now = self._now()
        try:
            os.utime(path, (now, now), follow_symlinks=False)
        except FileNotFoundError:
            raise
        except OSError as exc:
            if not self._undatable_said:
                self._undatable_said = True
                log.warning(
                    "blobs.undatable",
                    extra={
                        "blob": path.name,
                        "error": str(exc),
                        "fix": "give the coordinator's user ownership of its blob directory",
                    },
                )

    def sweep(self, *, in_use: Collection[str], retention: float) -> Swept:
        """Remove every blob not in *in_use* whose last use is more than *retention*
        seconds ago, and temporary files older than a day; *retention* 0 removes no blob.

        Blobs are dated on the coordinator's clock; temporary files by the system's, since
        their age is how long ago an upload stopped writing."""
        now, wall = self._now(), time.time()
        removed = freed = kept = temporaries = 0
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return Swept(0, 0, 0, 0)
        failed: OSError | None = None
        for name in names:
            path = self.directory / name
            try:
                if name.startswith(TEMP_PREFIXES):
                    st = path.lstat()
                    if stat.S_ISREG(st.st_mode) and wall - st.st_mtime > STALE_TEMP_S:
                        path.unlink()
                        temporaries += 1
                    continue
                if not SHA256_HEX.fullmatch(name):
                    continue  # not the store's: left alone
                with self._lock:
                    st = path.lstat()
                    if not stat.S_ISREG(st.st_mode):
                        continue  # nor is anything but a regular file (never served)
                    if retention <= 0 or name in in_use or now - st.st_mtime <= retention:
                        kept += 1
                        continue
                    path.unlink()
                removed += 1
                freed += st.st_size
            except FileNotFoundError:
                continue
            except OSError as exc:  # a read-only mount, another owner: it stays
                failed = failed or exc
                kept += not name.startswith(TEMP_PREFIXES)
        if failed is not None:
            log.warning("blobs.sweep_incomplete", extra={"error": str(failed)})
        return Swept(removed, freed, kept, temporaries)


async def sweep_once(coord: Coordinator) -> Swept:
    """One sweep of *coord*'s blob store, keeping what its unfinished jobs reference."""
    in_use = await coord.db.run(store.blobs_in_use)
    swept = await asyncio.to_thread(
        coord.blobs.sweep, in_use=in_use, retention=coord.config.blob_retention
    )
    if swept.removed or swept.temporaries:
        log.info(
            "blobs.swept",
            extra={
                "removed": swept.removed,
                "freed_bytes": swept.freed_bytes,
                "kept": swept.kept,
                "temporaries": swept.temporaries,
                "retention_hours": round(coord.config.blob_retention / 3600, 2),
            },
        )
    return swept


async def warn_job_retention(coord: Coordinator) -> int:
    """At start: say how many finished jobs the first sweep will delete, an hour from now
    (an upgrade from a release that kept every job by default finds them all at once)."""
    retention = coord.config.job_retention
    if not retention:
        return 0
    due = await coord.db.run(
        functools.partial(store.count_finished_before, finished_before=coord.now() - retention)
    )
    if due:
        log.warning(
            "jobs.retention_due",
            extra={
                "jobs": due,
                "retention_days": round(retention / 86400, 2),
                "in_seconds": coord.config.blob_sweep_interval,
                "fix": "to keep them, restart with --job-retention-days 0 (or a longer one)",
            },
        )
    return due


async def forget_jobs(coord: Coordinator) -> int:
    """Delete the jobs finished longer than ``job_retention`` ago, in batches; how many."""
    if not coord.config.job_retention:
        return 0
    before = coord.now() - coord.config.job_retention
    forgotten = 0
    while n := await coord.db.run(functools.partial(store.forget_jobs_tx, finished_before=before)):
        forgotten += n
    if forgotten:
        log.info(
            "jobs.forgotten",
            extra={
                "jobs": forgotten,
                "retention_days": round(coord.config.job_retention / 86400, 2),
            },
        )
    return forgotten


def payload_blobs(max_bytes: int) -> Callable[[str, bytes], list[str]]:
    """``refs(workload_class, payload)``: the blobs a stored task payload references."""

    def refs(workload_class: str, payload: bytes) -> list[str]:
        wclass = classes.REGISTRY.get(workload_class)
        if wclass is None:
            return []
        try:
            return [sha for _, sha in wclass.blobs(payload, max_bytes)]
        except (ProtocolError, ValueError):  # validated when submitted: cannot happen
            return []

    return refs
