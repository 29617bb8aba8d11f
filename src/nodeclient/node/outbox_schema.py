"""The outbox's database layout and how its rows read back (2.3.7 Signed Return).

The tables and indexes of ``outbox.db``, its format version (SQLite's ``user_version``; a
newer one is refused), :class:`OutboxEntry` and the decoding of a row into one, and
:func:`read_history`, which reads the task history read-only, beside a running daemon or
without one. SQLite 3.8.0 or newer (:data:`SQLITE_MIN`): the prune index is a partial
index.
"""

from __future__ import annotations

import json
import shlex
import sqlite3
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from nodeclient.errors import NeedsOperator, UsageError

SQLITE_MIN: Final = (3, 8, 0)  # partial indexes (outbox_prune)
# The layout's version, in SQLite's user_version (0: a release before it was recorded, which
# the columns and indexes below bring up to date). A newer one is refused at open.
# 2: outbox.coordinator_id (which a release that reads version 1 would not heed, sending a
# result to a coordinator that never dispatched it), outbox_tally and outbox_foreign.
FORMAT_VERSION: Final = 2

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS outbox (
    task_id        TEXT PRIMARY KEY,
    job_id         TEXT NOT NULL,
    workload_class TEXT NOT NULL,
    slice_index    INTEGER,
    kind           TEXT NOT NULL,          -- result | reject
    result         BLOB,                   -- written by releases before outbox_results
    result_size    INTEGER NOT NULL DEFAULT 0,
    proof          BLOB,
    message        TEXT NOT NULL,          -- the EIP-712 message JSON that is (to be) signed
    signature      BLOB,                   -- NULL until signed
    received_at    REAL NOT NULL,
    completed_at   REAL NOT NULL,
    acked_at       REAL,
    ack_status     TEXT,
    ack_reason     TEXT,
    result_file    TEXT,                   -- file name in the results directory, or NULL
    held           INTEGER NOT NULL DEFAULT 1,  -- 0 once prune dropped the result bytes
    coordinator_id TEXT                    -- the coordinator that dispatched it, or NULL
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (acked_at);
CREATE TABLE IF NOT EXISTS outbox_results (  -- results up to INLINE_MAX, by task
    task_id        TEXT PRIMARY KEY,
    data           BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox_forgotten (  -- rows deleted by forget(), per counter
    bucket         TEXT PRIMARY KEY,           -- completed | failed | rejected
    count          INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox_tally (  -- status totals that no row records
    name           TEXT PRIMARY KEY,       -- rejected (rejects sent) | timed_out
    count          INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox_foreign (  -- result files there when the database was
    name           TEXT PRIMARY KEY            -- created: another database's, never swept
);
CREATE TABLE IF NOT EXISTS outbox_owner (  -- the node whose results these are (one row)
    node_id        TEXT PRIMARY KEY
);
CREATE TABLE IF NOT EXISTS node_unstake (  -- an unstake a coordinator confirmed (2.3.8)
    coordinator_url TEXT PRIMARY KEY,       -- the daemon's --coordinator
    coordinator_id  TEXT NOT NULL,          -- the coordinator that confirmed it
    until           INTEGER NOT NULL        -- the end of the cooldown, on its clock
);
"""
# Added after the first release: older databases get them by ALTER TABLE.
_ADDED_COLUMNS: Final = (
    ("result_file", "TEXT"),
    ("held", "INTEGER NOT NULL DEFAULT 1"),
    ("coordinator_id", "TEXT"),
)
_INDEXES: Final = (
    # history, newest first
    "CREATE INDEX IF NOT EXISTS outbox_completed ON outbox (completed_at)",
    # prune: acknowledged results still held, oldest first, without reading the table
    # (a row enters it when acknowledged, so a result's commit writes one index fewer)
    "CREATE INDEX IF NOT EXISTS outbox_prune ON outbox "
    "(acked_at, result_size, result_file, task_id) WHERE held = 1 AND acked_at IS NOT NULL",
    # prune: the files of lost entries, kept for inspection for the retention period
    "CREATE INDEX IF NOT EXISTS outbox_lost ON outbox (acked_at, result_file, task_id) "
    "WHERE ack_status = 'lost' AND result_file IS NOT NULL",
)


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
    held: bool = True  # False once prune dropped the result bytes (result is then b"")
    coordinator_id: str | None = None  # who dispatched it (None: recorded before ids were)


_COLUMNS: Final = (
    "task_id, job_id, workload_class, slice_index, kind, result, result_size, proof, message, "
    "signature, received_at, completed_at, acked_at, ack_status, ack_reason, held, "
    "coordinator_id"
)
# History never needs result bytes: a column of NULL takes the result's place.
_HISTORY_COLUMNS: Final = _COLUMNS.replace(" result,", " NULL,", 1)
# A row the coordinator named by the parameter (given twice) gets; NULL: any coordinator.
_SENT_TO: Final = "(? IS NULL OR coordinator_id IS NULL OR coordinator_id = ?)"
# What prune relies on in a row, as SQL, so that a row without it (damaged on disk, or
# edited by hand) never enters a batch and cannot stop the others' pruning: a numeric
# acked_at and an integer result_size, and a result_file that is NULL or a result file
# name as the outbox writes them (a task id and ".result", as _RESULT_NAME), so that a
# name leading out of the results directory is never removed.
_ACKED_OK: Final = "typeof(acked_at) IN ('integer', 'real')"
_SIZE_OK: Final = "typeof(result_size) = 'integer'"
# A result file's name as outbox_files._RESULT_NAME has it: <task_id>.result, or
# <task_id>.<8 hex>.result (written beside another outbox database's file of that name).
_FILE_OK: Final = (
    "(result_file IS NULL OR (typeof(result_file) = 'text' "
    "AND substr(result_file, 1, 36) NOT GLOB '*[^0-9a-f-]*' "
    "AND ((length(result_file) = 43 AND substr(result_file, 37) = '.result') "
    "OR (length(result_file) = 52 AND substr(result_file, 37, 1) = '.' "
    "AND substr(result_file, 38, 8) NOT GLOB '*[^0-9a-f]*' "
    "AND substr(result_file, 46) = '.result'))))"
)
# What read_history reads for a column that an outbox of an older release lacks.
_MISSING: Final = {"held": "1", "coordinator_id": "NULL"}
# An entry with its result: from outbox_results, or the legacy column; then result_file.
_LOAD: Final = (
    "SELECT "  # noqa: S608
    + ", ".join(
        "COALESCE(d.data, o.result)" if c == "result" else f"o.{c}" for c in _COLUMNS.split(", ")
    )
    + ", o.result_file FROM outbox o LEFT JOIN outbox_results d ON d.task_id = o.task_id"
)


def _entry(row: tuple[Any, ...], result: bytes | None = None) -> OutboxEntry:
    return OutboxEntry(
        uuid.UUID(row[0]),
        uuid.UUID(row[1]),
        row[2],
        row[3],
        row[4],
        bytes(row[5] or b"") if result is None else result,
        row[6],
        None if row[7] is None else bytes(row[7]),
        json.loads(row[8]),
        None if row[9] is None else bytes(row[9]),
        row[10],
        row[11],
        row[12],
        row[13],
        row[14],
        bool(row[15]),
        row[16],
    )


def _decode(row: tuple[Any, ...], result: bytes | None = None) -> OutboxEntry:
    """``_entry``, or _RowDamaged for a row that cannot be decoded (a bad UUID or JSON)."""
    try:
        return _entry(row, result)
    except (ValueError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
        raise _RowDamaged(
            f"the row of task {str(row[0])[:40]!r} ({type(exc).__name__}: {exc})"
        ) from None


class OutboxCorrupt(Exception):
    """A row names a result file that is missing or the wrong size, or cannot be decoded."""


class CommitUncertain(OSError):
    """A result's COMMIT failed with an I/O error (a failed fsync, say), not for want of
    space: it may be on disk after all, and a restart would then find it and send it."""


class _RowDamaged(OutboxCorrupt, ValueError):
    """The row itself cannot be decoded: damaged on disk, or edited by hand (a ValueError
    too, as the decoding error it stands for)."""


class OutboxTooNew(NeedsOperator):
    """The outbox was written by a newer release (exit 78: restarting cannot help)."""


class OutboxOfAnotherNode(NeedsOperator):
    """The outbox is another node's: the home's keys were replaced (a node started over in
    the same home) and its outbox kept (exit 78: restarting cannot help)."""

    def __init__(self, path: Path, *, owner: str, node_id: str) -> None:
        aside = shlex.quote(str(path.with_name(f"outbox.{owner[:10]}")))
        super().__init__(
            f"{path} is the outbox of node {owner}, and this home's keys are node {node_id}'s "
            "(a node started over in this home): move that outbox aside, e.g. `mkdir "
            f"{aside} && mv {shlex.quote(str(path))}* {aside}/`, and keep it (it may hold "
            f"{owner}'s signed results not yet acknowledged, which that node's keys send "
            "when they run with it again); `nodeclient run` then starts a new outbox. Or, "
            f"if this home should still be {owner}, put back its keys"
        )


def _decode_all(rows: list[tuple[Any, ...]], damaged: list[str] | None) -> list[OutboxEntry]:
    """The rows' entries; one that cannot be decoded is described in *damaged* and left
    out, or, without *damaged*, raises _RowDamaged (an OutboxCorrupt)."""
    entries = []
    for row in rows:
        try:
            entries.append(_decode(row))
        except _RowDamaged as exc:
            if damaged is None:
                raise
            damaged.append(str(exc))
    return entries


def _require_sqlite() -> None:
    if sqlite3.sqlite_version_info < SQLITE_MIN:
        raise UsageError(
            f"the outbox needs SQLite {'.'.join(map(str, SQLITE_MIN))} or newer, and this "
            f"Python uses SQLite {sqlite3.sqlite_version}: run nodeclient with a newer Python"
        )


def _format_version(db: sqlite3.Connection, path: Path) -> int:
    """The outbox's format version; UsageError for a newer release's (misreading its layout
    could send a result as empty, or lose one)."""
    (version,) = db.execute("PRAGMA user_version").fetchone()
    if version > FORMAT_VERSION:
        raise OutboxTooNew(
            f"{path} has format version {version}, written by a newer nodeclient; this one "
            f"reads versions up to {FORMAT_VERSION}. Upgrade nodeclient: the outbox may hold "
            "results not yet acknowledged"
        )
    return int(version)


def read_history(
    path: Path,
    *,
    since: float | None = None,
    limit: int = 100_000,
    damaged: list[str] | None = None,
) -> list[OutboxEntry]:
    """The task history for ``nodeclient history``, newest first, read-only.

    Opens the file with ``mode=ro`` so it works beside a running daemon and without one,
    and never creates or alters the database. A row that cannot be read (damaged on disk,
    or edited by hand) is left out and described in *damaged*, when given; else it raises.
    """
    if not path.is_file():
        return []
    _require_sqlite()
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        _format_version(db, path)
        columns = {row[1] for row in db.execute("PRAGMA table_info(outbox)")}
        # Columns an older outbox lacks: written before pruning existed, it holds every
        # result (held = 1); before coordinator ids were recorded, none is known.
        select = ", ".join(
            _MISSING[c] if c in _MISSING and c not in columns else c
            for c in _HISTORY_COLUMNS.split(", ")
        )
        rows = db.execute(
            f"SELECT {select} FROM outbox WHERE completed_at >= ? "  # noqa: S608
            "ORDER BY completed_at DESC LIMIT ?",
            (since or 0.0, limit),
        ).fetchall()
    finally:
        db.close()
    return _decode_all(rows, damaged)  # a bad UUID, JSON or value in a row: left out
