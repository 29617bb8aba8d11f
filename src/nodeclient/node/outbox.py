"""The node's result outbox (2.3.7 Signed Return, crash-safe).

SQLite in WAL mode with ``synchronous=FULL``: once ``commit_result`` returns, the signed
result survives a kill -9 or a power cut. The rules that make "no lost result, no
duplicate, never two different signed results for one task" hold:

1. ``commit_result`` writes the result row, signs it, and commits row and signature in
   one transaction (one fsync) before anything is sent. If the task already has a row,
   that row is returned instead: a result that differs from what was recorded is never
   signed (the stored one is re-sent). A crash before the commit leaves no row and no
   signature outside the process, so there is nothing to contradict later.
2. The result is sent only after ``commit_result`` returns.
3. ``mark_acked`` on the coordinator's acknowledgement (no fsync of its own: a lost ack
   costs one re-send answered "duplicate"). Everything not acknowledged is
   sent again after a reconnect or a restart (``pending``); the coordinator accepts
   exactly once and answers a repeat with "duplicate".
4. A row records the coordinator that dispatched its task (``coordinator_id``), and is
   sent to that coordinator only: another one does not know the task, and its "unknown
   task" answer would settle the result as failed for good. Rows written before the id
   was recorded have none, and go to whichever coordinator the node links to.

The table doubles as the node's task history (``history``), which never reads result
bytes.

Storage: a result of up to :data:`INLINE_MAX` bytes is a row of ``outbox_results``, kept
apart so that reading history, counts or the prune index never walks result bytes; a
larger one is a file in ``<database>.results/`` (0600, in a 0700 directory), written and
fsynced before the row that names it commits. SQLite's WAL would otherwise write a large
result twice (WAL, then checkpoint) and fsync it twice; as in SQLite's own "Internal
Versus External BLOBs" measurements, files win above ~100 KiB. A transaction that
certainly did not commit (it failed before its COMMIT, or the COMMIT found the disk full)
removes the file it named; a crash between the file and the commit, or a COMMIT that
failed in a way that leaves it unknown (an I/O error), leaves an orphan file, removed when
the outbox next opens. Result files that were in the directory when the database was
created are another database's (one moved aside without them, or replaced): they are
recorded (``outbox_foreign``), never removed, and logged at each open. The database
holds result bytes too, so it and its ``-wal`` and ``-shm`` are 0600 whatever the umask
(looser ones are tightened at open). One process at a time: the outbox holds an
exclusive lock on ``<database>.lock`` while open.

A result file that cannot be read: only a file that is gone or the wrong size, or a row
that cannot be decoded (damaged on disk, or edited by hand), closes its entry as ``lost``
(``pending``, ``get``), and the row keeps the file's name, so the orphan sweep
never removes a file that a row names; ``prune`` removes it once the entry was closed
longer ago than the retention period. Any other error (EMFILE, EIO, ENOMEM, EACCES...)
says nothing about the file: the entry stays pending and is sent after a later reconnect.

Retention: the result bytes of an acknowledged task are needed only if the coordinator
asks for the task again. ``prune`` drops them once acknowledged more than a retention
period ago, or oldest first beyond a byte budget; the row (proof, signature, sizes, times)
stays as history. Unacknowledged results are never pruned, except those of a coordinator
the node no longer links to, long after they were completed: ``abandon`` closes them as
acknowledged (``abandoned``), and their bytes then go as above. Pruning goes in small
batches, so the event loop never waits long for the lock, and a stop (a ``threading.Event``)
ends it between two batches, so that a prune of millions of rows never holds up the exit.
A row that prune cannot read (a time or size that is not a number, a file name that is
not a result file's) is left as it is and described, as ``history`` describes a row it
cannot decode; the others are pruned. A later dispatch of a pruned task is refused with
a signed reason rather than run again (``OutboxEntry.held``).

SQLite 3.8.0 or newer (:data:`~nodeclient.node.outbox_schema.SQLITE_MIN`, checked at
open): the prune index is a partial index. Nothing newer is used (no ``RETURNING``,
3.35; no upsert, 3.24; no window functions, 3.25), so a Python linked to the system
SQLite of Debian 11 (3.34) or Ubuntu 20.04 (3.31) runs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import math
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

from nodeclient.durable import fsync_directory
from nodeclient.errors import is_disk_full
from nodeclient.node.outbox_files import (
    _FILE_SUFFIX,
    _OURS,
    _RESULT_NAME,
    _lock_exclusively,
    _make_private,
)

# The outbox's public names, wherever they are defined: callers use the outbox as one module.
from nodeclient.node.outbox_schema import (
    _ACKED_OK,
    _ADDED_COLUMNS,
    _COLUMNS,
    _FILE_OK,
    _HISTORY_COLUMNS,
    _INDEXES,
    _LOAD,
    _SENT_TO,
    _SIZE_OK,
    FORMAT_VERSION,
    SCHEMA,
    CommitUncertain,
    OutboxCorrupt,
    OutboxEntry,
    OutboxOfAnotherNode,
    _decode,
    _decode_all,
    _entry,
    _format_version,
    _require_sqlite,
    _RowDamaged,
    read_history,
)

__all__ = [
    "FORMAT_VERSION",
    "INLINE_MAX",
    "TALLIES",
    "CommitUncertain",
    "Outbox",
    "OutboxCorrupt",
    "OutboxEntry",
    "OutboxOfAnotherNode",
    "Retention",
    "read_history",
]

log = logging.getLogger("nodeclient.node.outbox")

INLINE_MAX: Final = 64 * 1024  # larger results are files beside the database
UNREADABLE_TRIES: Final = 5  # reconnects a result file may fail to read before it is lost
TALLIES: Final = ("rejected", "timed_out")  # status totals that no outbox row records
_PRUNE_BATCH: Final = 200  # rows per prune transaction
_PRUNE_PAUSE: Final = 0.005  # seconds between batches, for the others waiting on the lock
_ABANDONED: Final = "abandoned: never acknowledged by the coordinator that dispatched it,"


@dataclasses.dataclass(frozen=True, slots=True)
class Retention:
    """How long acknowledged results' bytes are kept (``result_retention_*`` in config),
    and their history rows (``history_retention_days``; 0 keeps them for ever)."""

    seconds: float = 72 * 3600.0
    bytes: int = 4096 << 20
    every: float = 3600.0  # how often prune runs (and once at start)
    history_seconds: float = 180 * 86400.0
    history_max_rows: int = 2_000_000  # (``history_max_rows``; 0: no cap)
    # Results awaiting acknowledgement are never dropped, so past this many new work is
    # refused (``max_unacknowledged_results``): a coordinator that takes results and never
    # acknowledges them cannot fill the disk.
    max_unacknowledged: int = 256
    # Results awaiting a coordinator other than the linked one, completed longer ago than
    # this, are closed as abandoned (``abandon_results_after_days``; 0: kept for ever).
    abandon_seconds: float = 30 * 86400.0


class Outbox:
    """A durable queue of signed results; safe to call from the event loop and threads."""

    def __init__(self, path: Path) -> None:
        _require_sqlite()
        self.path = path
        self.files = path.with_name(path.name + ".results")
        self._lock_fd = _lock_exclusively(path.with_name(path.name + ".lock"))
        try:
            _make_private(path)  # before SQLite creates it (or its -wal, -shm) with the umask
            if not self.files.is_dir():
                self.files.mkdir(mode=0o700)
                fsync_directory(self.files.parent)  # the directory itself survives a power cut
            self._lock = threading.Lock()
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            version = _format_version(self._db, path)  # before anything writes to it
            (tables,) = self._db.execute(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'outbox'"
            ).fetchone()
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._prepare(created=tables == 0, version=version)
            self._remove_orphans()
            self._counts: dict[str, int] = {}
            self._waiting: dict[str | None, int] = {}
            self._recount()
            self._tally = dict.fromkeys(TALLIES, 0)
            self._tally.update(self._db.execute("SELECT name, count FROM outbox_tally"))
            self._unreadable: dict[str, int] = {}  # task_id -> failed reads in pending()
            (held,) = self._db.execute(
                "SELECT COALESCE(SUM(result_size), 0) FROM outbox "
                f"WHERE held = 1 AND acked_at IS NOT NULL AND {_ACKED_OK} AND {_SIZE_OK} "
                f"AND {_FILE_OK}"
            ).fetchone()
            # Acknowledged results still held, that prune can drop: its budget. A row it
            # cannot read (damaged) is left out, here and in mark_acked.
            self._held_bytes = int(held)
        except BaseException:
            db = getattr(self, "_db", None)
            if db is not None:
                db.close()
            os.close(self._lock_fd)
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()
        os.close(self._lock_fd)

    def get(self, task_id: uuid.UUID) -> OutboxEntry | None:
        """The task's entry with its result bytes (b"" once pruned or lost, see ``held``).

        Raises OutboxCorrupt if its result file is gone or the wrong size, and OSError if
        the file could not be read just now (EMFILE, EIO...): nothing is changed. A row
        that cannot be decoded raises OutboxCorrupt too, and, if still unacknowledged, is
        closed as ``lost`` first (as ``pending`` would: it can never be sent).
        """
        with self._lock:  # the file is read under the lock too: prune cannot remove it midway
            row = self._db.execute(f"{_LOAD} WHERE o.task_id = ?", (str(task_id),)).fetchone()
            if row is None:
                return None
            try:
                return self._load(row)
            except _RowDamaged as exc:
                if row[12] is None:  # acked_at: still pending
                    self._close_lost(row[0], row[16], str(exc))
                raise

    def commit_result(
        self,
        *,
        task_id: uuid.UUID,
        job_id: uuid.UUID,
        workload_class: str,
        slice_index: int | None,
        kind: str,
        result: bytes,
        proof: bytes | None,
        message: dict[str, Any],
        received_at: float,
        completed_at: float,
        sign: Callable[[dict[str, Any]], bytes],
        coordinator_id: str | None = None,
    ) -> OutboxEntry:
        """Record a result, sign it, and make both durable in one transaction.

        The row is written inside the transaction before ``sign`` is called, and the
        transaction commits (one fsync) before this returns, so nothing signed can leave
        the process unrecorded. If the task already has a row, that row is returned (and
        signed now if an older write left it unsigned): the node never signs two
        different results for one task. A large result's file is written and fsynced
        before the transaction, outside the lock, so two slots' writes overlap.
        *coordinator_id* names the coordinator that dispatched the task: the only one
        ``pending`` hands the entry to for it.
        """
        # a row in _COLUMNS order: unsigned, unacknowledged, held (the result lives apart)
        fresh = (
            str(task_id), str(job_id), workload_class, slice_index, kind, None, len(result),
            proof, json.dumps(message, sort_keys=True), None, received_at, completed_at,
            None, None, None, 1, coordinator_id,
        )  # fmt: skip
        staged = self._stage(task_id, result) if len(result) > INLINE_MAX else None
        try:
            with self._lock:
                return self._commit_locked(staged, fresh, result, sign)
        finally:
            if staged is not None:
                with contextlib.suppress(OSError):  # clean-up only: the next open sweeps it
                    staged.unlink()  # still there: the row already existed, or no commit

    def _commit_locked(
        self,
        staged: Path | None,
        fresh: tuple[Any, ...],
        result: bytes,
        sign: Callable[[dict[str, Any]], bytes],
    ) -> OutboxEntry:
        task_id = fresh[0]
        final = self.files / (task_id + _FILE_SUFFIX)
        renamed = committing = False
        try:
            with self._transaction():
                row = self._db.execute(f"{_LOAD} WHERE o.task_id = ?", (task_id,)).fetchone()
                if row is None:
                    if staged is not None:
                        if os.path.lexists(final):
                            # Another outbox database's file for this task (the task was
                            # leased here again after only outbox.db was lost): its only
                            # copy of a signed result, kept under its name.
                            final = final.with_name(
                                f"{task_id}.{os.urandom(4).hex()}{_FILE_SUFFIX}"
                            )
                        os.replace(staged, final)  # the data is already durable
                        renamed = True
                        fsync_directory(self.files)  # and now its name
                    else:
                        self._db.execute(
                            "INSERT INTO outbox_results (task_id, data) VALUES (?, ?)",
                            (task_id, result),
                        )
                    self._db.execute(
                        f"INSERT INTO outbox ({_COLUMNS}, result_file) "
                        f"VALUES ({', '.join('?' * 18)})",
                        (*fresh, final.name if staged is not None else None),
                    )
                    entry = _entry(fresh, result)
                else:
                    entry = self._load(row)
                if entry.signature is None:
                    signature = sign(entry.message)
                    self._db.execute(
                        "UPDATE outbox SET signature = ? WHERE task_id = ?", (signature, task_id)
                    )
                    entry = dataclasses.replace(entry, signature=signature)
                committing = True  # what fails from here on is the COMMIT
        except BaseException as exc:
            # The renamed file goes when the row certainly did not commit: the transaction
            # failed before its COMMIT, or the COMMIT found the disk full (SQLite wrote no
            # commit record). After an I/O error (a failed fsync) the commit may be on disk
            # after all and its row need the file: it stays, and the next open removes it
            # if no row names it.
            certain = not committing or is_disk_full(exc)
            if renamed and certain:
                with contextlib.suppress(OSError):
                    final.unlink()
            if certain or not isinstance(exc, (OSError, sqlite3.Error)):
                raise
            with contextlib.suppress(OSError, sqlite3.Error):  # as the database has it now
                self._recount()
            raise CommitUncertain(
                errno.EIO, f"the result's commit may or may not be on disk: {exc}"
            ) from exc
        if row is None:
            self._counts["unacknowledged"] += 1
            self._waiting[fresh[16]] = self._waiting.get(fresh[16], 0) + 1
            self._rows += 1
        return entry

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction (call with the lock held): committed, or rolled back on any
        error without a failing ROLLBACK hiding the original one."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise

    def _stage(self, task_id: uuid.UUID, result: bytes) -> Path:
        """Write *result* to a new temporary file in the results directory, fsynced."""
        staged = self.files / f".{task_id}.{os.urandom(4).hex()}.tmp"
        fd = os.open(
            staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            view = memoryview(result)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            staged.unlink()
            raise
        os.close(fd)
        return staged

    def _load(self, row: tuple[Any, ...]) -> OutboxEntry:
        """An entry from a ``_LOAD`` row, reading its result file if it has one and holds it.

        OutboxCorrupt for a row that cannot be decoded (_RowDamaged) or a file that is gone
        or the wrong size; any other OSError is raised as it is, since it says nothing about
        the file (too many open files, EIO).
        """
        entry = _decode(row[:-1])  # a damaged row raises before any file is read
        name = row[-1]
        if not row[15]:  # not held (pruned), or a lost entry that keeps its file's name
            return entry
        if name is None:  # held in the database: its row of outbox_results (or the column)
            if len(entry.result) != row[6]:
                raise OutboxCorrupt(
                    f"task {row[0]}: its stored result holds {len(entry.result)} bytes, "
                    f"not {row[6]}"
                )
            return entry
        if not isinstance(name, str) or not _RESULT_NAME.fullmatch(name):
            # Edited by hand, or damaged: never read (and send) a file outside the results
            # directory as this task's signed result (the name prune's deletions accept).
            raise OutboxCorrupt(
                f"task {row[0]}: result_file {name!r:.80} is not a result file's name"
            )
        path = self.files / name
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError as exc:
            raise OutboxCorrupt(f"result file {path} of task {row[0]}: {exc}") from None
        if len(data) != row[6]:
            raise OutboxCorrupt(f"result file {path} holds {len(data)} bytes, not {row[6]}")
        return dataclasses.replace(entry, result=data)

    def mark_acked(
        self,
        task_id: uuid.UUID,
        *,
        status: str,
        reason: str,
        at: float,
        coordinator_id: str | None = None,
    ) -> None:
        """Record the coordinator's acknowledgement, without an fsync of its own.

        An acknowledgement lost to a power cut only means the result is sent once more
        and answered "duplicate"; the next result's commit makes it durable anyway (same
        WAL). A kill -9 loses nothing: the write is in the WAL either way. With
        *coordinator_id* (the answering one), an entry recorded for another coordinator is
        left as it is: that one never got the result from this node. An entry closed as
        abandoned takes the acknowledgement (its coordinator came back and dispatched the
        task again, which re-sent the result): it is that coordinator's answer that counts.
        """
        with self._lock:
            self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                # SELECT, then UPDATE in the same transaction: RETURNING needs SQLite 3.35
                with self._transaction():
                    done = self._db.execute(
                        f"SELECT kind, result_size, held = 1 AND {_SIZE_OK} AND {_FILE_OK}, "
                        "coordinator_id, ack_status FROM outbox WHERE task_id = ? "
                        f"AND (acked_at IS NULL OR ack_status = 'abandoned') AND {_SENT_TO}",
                        (str(task_id), coordinator_id, coordinator_id),
                    ).fetchone()
                    if done is not None:
                        self._db.execute(
                            "UPDATE outbox SET acked_at = ?, ack_status = ?, ack_reason = ? "
                            "WHERE task_id = ?",
                            (at, status, reason, str(task_id)),
                        )
            finally:
                self._db.execute("PRAGMA synchronous=FULL")
            if done is not None:
                kind, size, held, coordinator, before = done
                self._counts[_bucket(kind, status)] += 1
                if before == "abandoned":  # counted as failed, and its bytes, when closed
                    self._counts[_bucket(kind, before)] -= 1
                    return
                self._settled(coordinator)
                # held: and readable by prune (a damaged size or file name is never dropped)
                self._held_bytes += size if held else 0

    def _settled(self, coordinator_id: str | None) -> None:
        """One entry recorded for *coordinator_id* is no longer unacknowledged."""
        self._counts["unacknowledged"] -= 1
        left = self._waiting.get(coordinator_id, 0) - 1
        if left > 0:
            self._waiting[coordinator_id] = left
        else:
            self._waiting.pop(coordinator_id, None)

    def pending(self, *, coordinator_id: str | None = None) -> list[OutboxEntry]:
        """Committed entries not yet acknowledged, oldest first; with *coordinator_id*, only
        those to send to that coordinator: its own, and those recorded before coordinator
        ids were (others wait for the coordinator that dispatched them).

        An entry whose result file is gone or the wrong size (a damaged disk), or whose row
        cannot be decoded, cannot be sent: it is logged and closed as ``lost``, and the
        coordinator's lease on it runs out, so the task goes to another node. The row keeps
        the file's name, so the orphan sweep leaves a file that turns up again. A file that
        cannot be read for another reason (EMFILE, EIO...) is logged and left out this time
        only: the entry stays pending and is tried again at the next reconnect, up to
        UNREADABLE_TRIES times in this process; then it is closed as ``lost`` too (a
        permanent EACCES would otherwise keep it pending for good, and every stop would
        wait for it), the file kept.
        """
        return list(self.iter_pending(coordinator_id=coordinator_id))

    def pending_ids(self, *, coordinator_id: str | None, limit: int) -> list[uuid.UUID]:
        """The task ids of up to *limit* entries ``pending`` would send to *coordinator_id*,
        oldest first, read from the index alone (no result, no decoding)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT task_id FROM outbox WHERE acked_at IS NULL AND {_SENT_TO} "
                "ORDER BY completed_at LIMIT ?",
                (coordinator_id, coordinator_id, limit),
            ).fetchall()
        out = []
        for (task_id,) in rows:
            with contextlib.suppress(ValueError, TypeError):  # a damaged row: not listed
                out.append(uuid.UUID(task_id))
        return out

    def iter_pending(self, *, coordinator_id: str | None = None) -> Iterator[OutboxEntry]:
        """``pending``, one entry at a time: the daemon sends each before the next one's
        result is read, so a backlog of large results is never in memory all at once.
        Which entries are pending is read when the iteration starts."""
        with self._lock:
            ids = [
                r[0]
                for r in self._db.execute(
                    f"SELECT task_id FROM outbox WHERE acked_at IS NULL AND {_SENT_TO} "
                    "ORDER BY completed_at",
                    (coordinator_id, coordinator_id),
                )
            ]
        for task_id in ids:
            with self._lock:
                row = self._db.execute(
                    f"{_LOAD} WHERE o.task_id = ? AND o.acked_at IS NULL", (task_id,)
                ).fetchone()
                if row is None:  # acknowledged meanwhile
                    continue
                try:
                    entry = self._load(row)
                    self._unreadable.pop(task_id, None)
                except OutboxCorrupt as exc:  # a file gone or cut short, or a damaged row
                    self._close_lost(task_id, row[16], str(exc))
                    continue
                except OSError as exc:  # not the file's fault, maybe: it stays, and the entry
                    tries = self._unreadable[task_id] = self._unreadable.get(task_id, 0) + 1
                    log.warning(
                        "outbox.result_unreadable",
                        extra={
                            "task_id": task_id,
                            "job_id": row[1],
                            "error": str(exc),
                            "tries": tries,
                        },
                    )
                    if tries >= UNREADABLE_TRIES:
                        del self._unreadable[task_id]
                        self._close_lost(task_id, row[16], f"unreadable {tries} times: {exc}")
                    continue
            yield entry

    def close_lost(self, task_id: uuid.UUID, why: str) -> None:
        """Close an unacknowledged entry whose result can never be sent (the daemon found
        its stored message unusable) as ``lost``, as ``pending`` closes a damaged one."""
        with self._lock:
            row = self._db.execute(
                "SELECT coordinator_id FROM outbox WHERE task_id = ? AND acked_at IS NULL",
                (str(task_id),),
            ).fetchone()
            if row is not None:
                self._close_lost(str(task_id), row[0], why)

    def _close_lost(self, task_id: str, coordinator_id: str | None, why: str) -> None:
        """Close a pending entry whose result cannot be sent (under the lock); its row and
        file stay, for the operator to look at."""
        job = self._db.execute("SELECT job_id FROM outbox WHERE task_id = ?", (task_id,)).fetchone()
        log.error(
            "outbox.result_lost",
            extra={"task_id": task_id, "job_id": job[0] if job else None, "error": why},
        )
        self._db.execute(
            "UPDATE outbox SET acked_at = ?, ack_status = 'lost', ack_reason = ?, "
            "held = 0 WHERE task_id = ?",
            (time.time(), why[:300], task_id),
        )
        self._settled(coordinator_id)
        self._counts["failed"] += 1

    def prune(
        self,
        *,
        acked_before: float,
        keep_bytes: int,
        stop: threading.Event | None = None,
        damaged: list[str] | None = None,
    ) -> int:
        """Drop the result bytes of acknowledged tasks that are not needed any more.

        Dropped: every result acknowledged before *acked_before*, then the oldest
        acknowledged ones until the rest hold at most *keep_bytes*; and the files that
        entries closed as lost before *acked_before* still name. Unacknowledged results
        are never touched. Rows stay (history); their ``held`` turns 0. Runs in batches of
        a few hundred rows, each its own transaction. Returns how many were dropped.

        *stop*, once set, ends it before the next batch: what is left is dropped by the
        next call. A row that prune cannot read (an acknowledgement time or size that is
        not a number, a file name that is not a result file's: damaged on disk, or edited
        by hand) is left as it is, its result kept, and described in *damaged*, when
        given, as ``history`` describes a row it cannot decode; the others are pruned.
        """
        dropped = 0
        while not _stopped(stop):
            with self._lock:
                batch = self._db.execute(
                    "SELECT task_id, result_size, result_file, acked_at FROM outbox "
                    "INDEXED BY outbox_prune WHERE held = 1 AND acked_at IS NOT NULL "
                    f"AND {_ACKED_OK} AND {_SIZE_OK} AND {_FILE_OK} "
                    "ORDER BY acked_at LIMIT ?",
                    (_PRUNE_BATCH,),
                ).fetchall()
                drop, excess = [], self._held_bytes - keep_bytes
                for task_id, size, name, acked_at in batch:  # oldest first
                    if acked_at >= acked_before and excess <= 0:
                        break
                    drop.append((task_id, size, name))
                    excess -= size
                if not drop:
                    break
                self._drop(drop)
            for _, _, name in drop:  # after the commit: a crash before it keeps every file
                if name is not None:
                    with contextlib.suppress(FileNotFoundError):
                        (self.files / name).unlink()
            dropped += len(drop)
            # A released lock is not handed to a waiter: without a pause this loop takes it
            # straight back and the event loop waits for the whole prune, not one batch.
            time.sleep(_PRUNE_PAUSE)
        dropped += self._prune_lost(acked_before, stop)
        if damaged is not None and not _stopped(stop):
            damaged.extend(self._unprunable())
        return dropped

    def abandon(
        self,
        *,
        linked: str,
        completed_before: float,
        now: float,
        stop: threading.Event | None = None,
    ) -> dict[str, int]:
        """Close as ``abandoned`` the entries still awaiting a coordinator other than
        *linked* (the one the node is linked to now) that were completed before
        *completed_before*; how many, per coordinator.

        Such a result is sent to its own coordinator only, so while the node works for
        another it would wait for ever, and its bytes with it (a coordinator rebuilt under
        a new id, another network on the same home). Long after its lease its task has run
        elsewhere; closed, it leaves the backlog, counts as failed, and its bytes go at the
        next prune once acknowledged results' retention has passed (``now`` is its
        acknowledgement time). The row stays as history; a coordinator that dispatches the
        task again is answered from it, as after any acknowledgement. Entries recorded
        without a coordinator (before ids were) go to any coordinator and are never
        closed here. *stop* as for ``prune``.
        """
        closed: dict[str, int] = {}
        while not _stopped(stop):
            with self._lock:
                # By rowid: a row damaged on disk may have lost its task_id (NULL), and an
                # UPDATE by task_id would match nothing while the row came back each batch.
                batch = self._db.execute(
                    "SELECT rowid, kind, coordinator_id, result_size, "
                    f"held = 1 AND {_SIZE_OK} AND {_FILE_OK} FROM outbox "
                    "INDEXED BY outbox_pending WHERE acked_at IS NULL "
                    "AND coordinator_id IS NOT NULL AND coordinator_id != ? "
                    "AND completed_at < ? LIMIT ?",
                    (linked, completed_before, _PRUNE_BATCH),
                ).fetchall()
                done = []
                with self._transaction():
                    for rowid, kind, coordinator, size, held in batch:
                        changed = self._db.execute(
                            "UPDATE outbox SET acked_at = ?, ack_status = 'abandoned', "
                            "ack_reason = ? WHERE rowid = ? AND acked_at IS NULL",
                            (now, f"{_ABANDONED} {coordinator}; the node links to {linked}"[:300],
                             rowid),
                        ).rowcount  # fmt: skip
                        if changed == 1:
                            done.append((kind, coordinator, size, held))
                for kind, coordinator, size, held in done:  # once committed
                    self._settled(coordinator)
                    self._counts[_bucket(kind, "abandoned")] += 1
                    self._held_bytes += size if held else 0
                    closed[coordinator] = closed.get(coordinator, 0) + 1
            if not done:  # nothing (more) to close
                break
            time.sleep(_PRUNE_PAUSE)
        return closed

    def forget(
        self,
        *,
        acked_before: float,
        max_rows: int = 0,
        stop: threading.Event | None = None,
        damaged: list[str] | None = None,
    ) -> int:
        """Delete the history rows of entries answered before *acked_before* whose result
        bytes are already gone (pruned, or a lost entry's file removed), in batches; with
        *max_rows*, the oldest such rows too while the outbox holds more rows than that
        (each is about 1 KB: a busy node's 180 days would be many gigabytes).

        The status totals keep counting them (``outbox_forgotten``). A forgotten task that
        a coordinator dispatched again would be run again: that is why the history period
        is long (180 days by default) and never shorter than the results'. Returns how many.
        *stop* and *damaged* as for ``prune``: a row whose acknowledgement time is not a
        number is never forgotten, and described in *damaged*.
        """
        forgotten = 0
        while not _stopped(stop):
            done = self._forget_batch(acked_before, _PRUNE_BATCH)
            if not done:
                break
            forgotten += done
            time.sleep(_PRUNE_PAUSE)
        # The cap: the oldest answered rows, whatever their age, a batch at a time (the
        # lock held for one batch only, as above), until no more rows than max_rows stay.
        # acked_at < inf: numbers only (a damaged, text one sorts after them).
        excess = self._rows - max_rows if max_rows > 0 else 0
        while excess > 0 and not _stopped(stop):
            done = self._forget_batch(math.inf, min(_PRUNE_BATCH, excess))
            if not done:
                break
            forgotten += done
            excess -= done
            time.sleep(_PRUNE_PAUSE)
        if damaged is not None and not _stopped(stop):
            with self._lock:
                # Text and blobs sort after every number (SQLite's order: NULL, numbers,
                # text, blobs), so this reads the index's far end only, never all of it.
                rows = self._db.execute(
                    "SELECT task_id, typeof(acked_at) FROM outbox INDEXED BY outbox_pending "
                    "WHERE acked_at >= '' AND held = 0 AND result_file IS NULL"
                ).fetchall()
            damaged.extend(_unreadable_row(t, f"acked_at is {k}, not a number") for t, k in rows)
        return forgotten

    def _forget_batch(self, acked_before: float, limit: int) -> int:
        """Delete up to *limit* forgettable rows answered before *acked_before*, oldest
        first, in one transaction under the lock; how many."""
        with self._lock:
            batch = self._db.execute(
                "SELECT task_id, kind, ack_status FROM outbox INDEXED BY outbox_pending "
                "WHERE acked_at < ? AND held = 0 AND result_file IS NULL "
                "ORDER BY acked_at LIMIT ?",
                (acked_before, limit),
            ).fetchall()
            if not batch:
                return 0
            per_bucket: dict[str, int] = {}
            for _, kind, status in batch:
                bucket = _bucket(kind, status)
                per_bucket[bucket] = per_bucket.get(bucket, 0) + 1
            ids = [(task_id,) for task_id, _, _ in batch]
            with self._transaction():
                self._db.executemany("DELETE FROM outbox_results WHERE task_id = ?", ids)
                self._db.executemany("DELETE FROM outbox WHERE task_id = ?", ids)
                counts = sorted(per_bucket.items())
                self._db.executemany(  # no upsert: SQLite before 3.24 has none
                    "INSERT OR IGNORE INTO outbox_forgotten (bucket, count) VALUES (?, 0)",
                    [(bucket,) for bucket, _ in counts],
                )
                self._db.executemany(
                    "UPDATE outbox_forgotten SET count = count + ? WHERE bucket = ?",
                    [(n, bucket) for bucket, n in counts],
                )
            self._rows -= len(batch)
        return len(batch)

    def _prune_lost(self, acked_before: float, stop: threading.Event | None) -> int:
        """Remove the files of entries closed as lost before *acked_before* (kept until then
        for the operator to inspect); the rows stay, naming no file. Returns how many."""
        removed = 0
        while not _stopped(stop):
            with self._lock:
                batch = self._db.execute(
                    "SELECT task_id, result_file FROM outbox INDEXED BY outbox_lost "
                    "WHERE ack_status = 'lost' AND result_file IS NOT NULL AND acked_at < ? "
                    f"AND {_ACKED_OK} AND {_FILE_OK} ORDER BY acked_at LIMIT ?",
                    (acked_before, _PRUNE_BATCH),
                ).fetchall()
                if not batch:
                    break
                with self._transaction():
                    self._db.executemany(
                        "UPDATE outbox SET result_file = NULL WHERE task_id = ?",
                        [(task_id,) for task_id, _ in batch],
                    )
            for _, name in batch:  # after the commit, as in prune
                with contextlib.suppress(FileNotFoundError):
                    (self.files / name).unlink()
            removed += len(batch)
            time.sleep(_PRUNE_PAUSE)
        return removed

    def _unprunable(self) -> list[str]:
        """Descriptions of the rows prune leaves because it cannot read them: held results
        and lost entries' files whose row fails _ACKED_OK, _SIZE_OK or _FILE_OK."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT task_id, typeof(acked_at), typeof(result_size), {_FILE_OK} "
                "FROM outbox INDEXED BY outbox_prune WHERE held = 1 AND acked_at IS NOT NULL "
                f"AND NOT ({_ACKED_OK} AND {_SIZE_OK} AND {_FILE_OK})"
            ).fetchall()
            rows += self._db.execute(
                f"SELECT task_id, typeof(acked_at), 'integer', {_FILE_OK} "
                "FROM outbox INDEXED BY outbox_lost "
                "WHERE ack_status = 'lost' AND result_file IS NOT NULL "
                f"AND NOT ({_ACKED_OK} AND {_FILE_OK})"
            ).fetchall()
        out: dict[Any, str] = {}  # by task: a row edited into both sets is described once
        for task_id, acked, size, file_ok in rows:
            why = []
            if acked not in ("integer", "real"):
                why.append(f"acked_at is {acked}, not a number")
            if size != "integer":
                why.append(f"result_size is {size}, not an integer")
            if not file_ok:
                why.append("result_file is not a result file's name")
            out[task_id] = _unreadable_row(task_id, "; ".join(why))
        return list(out.values())

    def _drop(self, drop: list[tuple[str, int, str | None]]) -> None:
        ids = [(task_id,) for task_id, _, _ in drop]
        with self._transaction():
            self._db.executemany("DELETE FROM outbox_results WHERE task_id = ?", ids)
            self._db.executemany(
                "UPDATE outbox SET result = NULL, result_file = NULL, held = 0 WHERE task_id = ?",
                ids,
            )
        self._held_bytes -= sum(size for _, size, _ in drop)

    def _prepare(self, *, created: bool, version: int) -> None:
        """The tables, columns and indexes this format has, and its version.

        Creating the database (*created*: it had no tables) is one transaction with the
        recording of the result files already in the directory: no crash of this database
        left them, so they are another's, moved aside without its results or replaced by
        this one (:meth:`_remove_orphans` keeps them). A first open cut short (a full disk,
        a kill) leaves no tables, and the next open is a first open again, not the open of
        a database whose leftover files are orphans to delete."""
        self._db.executescript(("BEGIN IMMEDIATE;\n" if created else "") + SCHEMA)
        try:
            have = {row[1] for row in self._db.execute("PRAGMA table_info(outbox)")}
            for name, decl in _ADDED_COLUMNS:
                if name not in have:
                    self._db.execute(f"ALTER TABLE outbox ADD COLUMN {name} {decl}")
            for index in _INDEXES:
                self._db.execute(index)
            if version < FORMAT_VERSION:
                self._db.execute(f"PRAGMA user_version = {FORMAT_VERSION}")
            if created:
                found = [
                    (e.name,) for e in os.scandir(self.files) if _RESULT_NAME.fullmatch(e.name)
                ]
                self._db.executemany(
                    "INSERT OR IGNORE INTO outbox_foreign (name) VALUES (?)", found
                )
                self._db.execute("COMMIT")
        except BaseException:
            if created:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
            raise

    def _check_intact(self) -> None:
        """Raise sqlite3.DatabaseError (SQLITE_CORRUPT) if SQLite's quick check of the
        database finds it damaged: a scan of a damaged table may miss rows, not fail."""
        found = [row for (row,) in self._db.execute("PRAGMA quick_check(5)")]
        if found != ["ok"]:
            error = sqlite3.DatabaseError(
                "database disk image is malformed: " + "; ".join(map(str, found))[:300]
            )
            error.sqlite_errorcode = sqlite3.SQLITE_CORRUPT
            error.sqlite_errorname = "SQLITE_CORRUPT"
            raise error

    def _remove_orphans(self) -> None:
        """Delete result files no row names: a crash came between a file and its commit.

        Never those that were in the directory when this database was created (recorded
        in outbox_foreign then, :meth:`_prepare`): removing them would lose results
        another database names. They are kept, and logged at every open while any is
        left; a half-written temporary file names no result and goes either way.
        """
        named = {
            name
            for (name,) in self._db.execute(
                "SELECT result_file FROM outbox WHERE result_file IS NOT NULL"
            )
        }
        foreign = {name for (name,) in self._db.execute("SELECT name FROM outbox_foreign")}
        kept: set[str] = set()
        orphans: list[os.DirEntry[str]] = []
        for entry in os.scandir(self.files):
            if entry.name in named:  # a row of this database names it (a task run again)
                continue
            if entry.name in foreign:
                kept.add(entry.name)
            elif _OURS.fullmatch(entry.name):
                orphans.append(entry)
        if any(_RESULT_NAME.fullmatch(entry.name) for entry in orphans):
            # A result file no row names is a crash's, or a damaged database's that no
            # longer shows its row: checked before a signed result is deleted.
            self._check_intact()
        for entry in orphans:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
            log.info("outbox.orphan_removed", extra={"file": entry.name})
        if foreign - kept:  # removed by the operator since (or this database's now)
            with self._transaction():
                self._db.executemany(
                    "DELETE FROM outbox_foreign WHERE name = ?", [(n,) for n in foreign - kept]
                )
        if kept:
            log.warning(
                "outbox.foreign_results",
                extra={
                    "directory": str(self.files),
                    "files": len(kept),
                    "fix": "these result files were there before this outbox database was "
                    "created: another outbox database names them (one moved aside without "
                    "them, or replaced). They are kept: put them beside that database, or "
                    "delete them once it has no unacknowledged results",
                },
            )

    def _recount(self) -> None:
        """The in-memory totals, read from the database: at open, and after a commit
        that may or may not have reached it (CommitUncertain)."""
        self._counts = self._count_all()
        # unacknowledged entries per coordinator (None: recorded before ids were)
        self._waiting = dict(
            self._db.execute(
                "SELECT coordinator_id, COUNT(*) FROM outbox WHERE acked_at IS NULL "
                "GROUP BY coordinator_id"
            ).fetchall()
        )

    def _count_all(self) -> dict[str, int]:
        out = {"completed": 0, "failed": 0, "rejected": 0, "unacknowledged": 0}
        rows = 0
        for kind, status, n in self._db.execute(
            "SELECT kind, ack_status, COUNT(*) FROM outbox GROUP BY kind, ack_status"
        ):
            out["unacknowledged" if status is None else _bucket(kind, status)] += n
            rows += n
        self._rows = rows  # the outbox's rows, kept in step by commits and forget
        for bucket, n in self._db.execute("SELECT bucket, count FROM outbox_forgotten"):
            if bucket in out and isinstance(n, int):  # a damaged row counts for nothing
                out[bucket] += n
        return out

    def backlog(self, coordinator_id: str | None = None) -> int:
        """Entries awaiting acknowledgement; with *coordinator_id*, only those ``pending``
        would send to that coordinator (its own, and those recorded without an id)."""
        if coordinator_id is None:
            return self._counts["unacknowledged"]
        return self._waiting.get(None, 0) + self._waiting.get(coordinator_id, 0)

    def waiting(self) -> dict[str | None, int]:
        """Entries awaiting acknowledgement, per coordinator that dispatched them (None:
        recorded before coordinator ids were)."""
        return dict(self._waiting)

    def held_bytes(self) -> int:
        """Bytes of acknowledged results still kept, which retention will drop."""
        return self._held_bytes

    def counts(self) -> dict[str, int]:
        """Completed / failed / rejected totals for the status console (kept in memory)."""
        return dict(self._counts)

    def tally(self, name: str) -> None:
        """Count one more of *name* (TALLIES: a reject sent, a task timed out), a status
        total that no row records, kept across restarts. Written without an fsync, as an
        acknowledgement: a power cut may lose the last few. A failed write is logged, and
        the count kept in memory is written with the next one."""
        with self._lock:
            self._tally[name] += 1
            try:
                self._db.execute("PRAGMA synchronous=NORMAL")
                try:
                    self._db.execute(
                        "INSERT OR REPLACE INTO outbox_tally (name, count) VALUES (?, ?)",
                        (name, self._tally[name]),
                    )
                finally:
                    self._db.execute("PRAGMA synchronous=FULL")
            except sqlite3.Error as exc:
                log.warning("outbox.tally_failed", extra={"tally": name, "error": str(exc)})

    def tallies(self) -> dict[str, int]:
        """The TALLIES totals, since the outbox was made."""
        return dict(self._tally)

    def claim(self, node_id: str) -> None:
        """Record this outbox as *node_id*'s, or refuse it as another node's
        (:class:`OutboxOfAnotherNode`): a node started over in the same home (new keys,
        the old outbox kept) would otherwise take the old node's unstake as its own (and
        stay UNSTAKING), show its history and totals, and send its unacknowledged results
        over its own link. An outbox from before owners were recorded is its rows' signer's
        (the node_id of its latest signed message), or, with none, *node_id*'s."""
        with self._lock, self._transaction():
            row = self._db.execute("SELECT node_id FROM outbox_owner").fetchone()
            owner = str(row[0]) if row is not None else self._latest_signer()
            if owner is not None and owner.lower() != node_id.lower():
                raise OutboxOfAnotherNode(self.path, owner=owner, node_id=node_id)
            if row is None:
                self._db.execute("INSERT INTO outbox_owner (node_id) VALUES (?)", (node_id,))

    def _latest_signer(self) -> str | None:
        """The node_id its latest message names, if it names one (damaged: None)."""
        row = self._db.execute("SELECT message FROM outbox ORDER BY rowid DESC LIMIT 1").fetchone()
        try:
            node_id = json.loads(row[0]).get("node_id") if row is not None else None
        except (TypeError, ValueError, AttributeError):
            return None
        return node_id if isinstance(node_id, str) else None

    def unstake(self, coordinator_url: str) -> tuple[str, int] | None:
        """(coordinator_id, end of the cooldown) of the unstake the coordinator at
        *coordinator_url* last confirmed for this node, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT coordinator_id, until FROM node_unstake WHERE coordinator_url = ?",
                (coordinator_url,),
            ).fetchone()
        return None if row is None else (str(row[0]), int(row[1]))

    def record_unstake(self, coordinator_url: str, coordinator_id: str, until: int | None) -> None:
        """Keep (or, with *until* None, drop) the unstake a coordinator confirmed, so that a
        restarted daemon shows UNSTAKING before it links again."""
        with self._lock, self._transaction():
            if until is None:
                self._db.execute(
                    "DELETE FROM node_unstake WHERE coordinator_url = ?", (coordinator_url,)
                )
            else:
                self._db.execute(
                    "INSERT OR REPLACE INTO node_unstake (coordinator_url, coordinator_id, "
                    "until) VALUES (?, ?, ?)",
                    (coordinator_url, coordinator_id, int(until)),
                )

    def history(
        self, *, since: float | None = None, limit: int = 1000, damaged: list[str] | None = None
    ) -> Iterator[OutboxEntry]:
        """Newest first, without result bytes (``result`` is b""). A row that cannot be
        decoded is left out and described in *damaged*, when given, as in read_history."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_HISTORY_COLUMNS} FROM outbox WHERE completed_at >= ? "
                "ORDER BY completed_at DESC LIMIT ?",
                (since or 0.0, limit),
            ).fetchall()
        return iter(_decode_all(rows, damaged))


def _stopped(stop: threading.Event | None) -> bool:
    return stop is not None and stop.is_set()


def _unreadable_row(task_id: object, why: str) -> str:
    """A row prune or forget leaves, described as _decode describes one it cannot decode."""
    return f"the row of task {str(task_id)[:40]!r} ({why})"


def _bucket(kind: str, status: str) -> str:
    """Which status-console counter an acknowledged row counts in."""
    if kind == "reject":
        return "rejected"
    return "completed" if status in ("accepted", "duplicate") else "failed"
