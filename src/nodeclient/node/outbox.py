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

The table doubles as the node's task history (``history``).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS outbox (
    task_id        TEXT PRIMARY KEY,
    job_id         TEXT NOT NULL,
    workload_class TEXT NOT NULL,
    slice_index    INTEGER,
    kind           TEXT NOT NULL,          -- result | reject
    result         BLOB,
    result_size    INTEGER NOT NULL DEFAULT 0,
    proof          BLOB,
    message        TEXT NOT NULL,          -- the EIP-712 message JSON that is (to be) signed
    signature      BLOB,                   -- NULL until signed
    received_at    REAL NOT NULL,
    completed_at   REAL NOT NULL,
    acked_at       REAL,
    ack_status     TEXT,
    ack_reason     TEXT
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (acked_at);
"""


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    task_id: uuid.UUID
    job_id: uuid.UUID
    workload_class: str
    slice_index: int | None
    kind: str
    result: bytes
    result_size: int
    proof: bytes | None
    message: dict[str, Any]
    signature: bytes | None
    received_at: float
    completed_at: float
    acked_at: float | None
    ack_status: str | None
    ack_reason: str | None


_COLUMNS: Final = (
    "task_id, job_id, workload_class, slice_index, kind, result, result_size, proof, message, "
    "signature, received_at, completed_at, acked_at, ack_status, ack_reason"
)


def _entry(row: tuple[Any, ...]) -> OutboxEntry:
    return OutboxEntry(
        uuid.UUID(row[0]),
        uuid.UUID(row[1]),
        row[2],
        row[3],
        row[4],
        bytes(row[5] or b""),
        row[6],
        None if row[7] is None else bytes(row[7]),
        json.loads(row[8]),
        None if row[9] is None else bytes(row[9]),
        row[10],
        row[11],
        row[12],
        row[13],
        row[14],
    )


class Outbox:
    """A durable queue of signed results; safe to call from the event loop and threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def get(self, task_id: uuid.UUID) -> OutboxEntry | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM outbox WHERE task_id = ?", (str(task_id),)
            ).fetchone()
        return None if row is None else _entry(row)

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
    ) -> OutboxEntry:
        """Record a result, sign it, and make both durable in one transaction.

        The row is written inside the transaction before ``sign`` is called, and the
        transaction commits (one fsync) before this returns, so nothing signed can leave
        the process unrecorded. If the task already has a row, that row is returned (and
        signed now if an older write left it unsigned): the node never signs two
        different results for one task.
        """
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    f"SELECT {_COLUMNS} FROM outbox WHERE task_id = ?", (str(task_id),)
                ).fetchone()
                if row is None:
                    stored = json.dumps(message, sort_keys=True)
                    self._db.execute(
                        f"INSERT INTO outbox ({_COLUMNS}) VALUES "
                        "(?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, ?, NULL, NULL, NULL)",
                        (
                            str(task_id), str(job_id), workload_class, slice_index, kind,
                            result, len(result), proof, stored, received_at, completed_at,
                        ),
                    )  # fmt: skip
                    row = (
                        str(task_id), str(job_id), workload_class, slice_index, kind, result,
                        len(result), proof, stored, None, received_at, completed_at,
                        None, None, None,
                    )  # fmt: skip
                entry = _entry(row)
                if entry.signature is None:
                    signature = sign(entry.message)
                    self._db.execute(
                        "UPDATE outbox SET signature = ? WHERE task_id = ?",
                        (signature, str(task_id)),
                    )
                    entry = _entry((*row[:9], signature, *row[10:]))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return entry

    def mark_acked(self, task_id: uuid.UUID, *, status: str, reason: str, at: float) -> None:
        """Record the coordinator's acknowledgement, without an fsync of its own.

        An acknowledgement lost to a power cut only means the result is sent once more
        and answered "duplicate"; the next result's commit makes it durable anyway (same
        WAL). A kill -9 loses nothing: the write is in the WAL either way.
        """
        with self._lock:
            self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._db.execute(
                    "UPDATE outbox SET acked_at = ?, ack_status = ?, ack_reason = ? "
                    "WHERE task_id = ? AND acked_at IS NULL",
                    (at, status, reason, str(task_id)),
                )
            finally:
                self._db.execute("PRAGMA synchronous=FULL")

    def pending(self) -> list[OutboxEntry]:
        """Committed entries not yet acknowledged, oldest first."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM outbox WHERE acked_at IS NULL ORDER BY completed_at"
            ).fetchall()
        return [_entry(r) for r in rows]

    def backlog(self) -> int:
        with self._lock:
            (n,) = self._db.execute("SELECT COUNT(*) FROM outbox WHERE acked_at IS NULL").fetchone()
        return int(n)

    def counts(self) -> dict[str, int]:
        """Completed / failed / rejected totals for the status console."""
        with self._lock:
            rows = self._db.execute(
                "SELECT kind, ack_status, COUNT(*) FROM outbox GROUP BY kind, ack_status"
            ).fetchall()
        out = {"completed": 0, "failed": 0, "rejected": 0, "unacknowledged": 0}
        for kind, status, n in rows:
            if status is None:
                out["unacknowledged"] += n
            elif kind == "reject":
                out["rejected"] += n
            elif status in ("accepted", "duplicate"):
                out["completed"] += n
            else:
                out["failed"] += n
        return out

    def history(self, *, since: float | None = None, limit: int = 1000) -> Iterator[OutboxEntry]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM outbox WHERE completed_at >= ? "
                "ORDER BY completed_at DESC LIMIT ?",
                (since or 0.0, limit),
            ).fetchall()
        return iter([_entry(r) for r in rows])


def read_history(
    path: Path, *, since: float | None = None, limit: int = 100_000
) -> list[OutboxEntry]:
    """The task history for ``nodeclient history``, newest first, read-only.

    Opens the file with ``mode=ro`` so it works beside a running daemon and without one,
    and never creates or alters the database.
    """
    if not path.is_file():
        return []
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        rows = db.execute(
            f"SELECT {_COLUMNS} FROM outbox WHERE completed_at >= ? "
            "ORDER BY completed_at DESC LIMIT ?",
            (since or 0.0, limit),
        ).fetchall()
    finally:
        db.close()
    return [_entry(r) for r in rows]
