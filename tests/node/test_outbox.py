"""The outbox: what is signed is recorded with it, survives reopening, and is never replaced."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sqlite3
import stat
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodeclient.errors import UsageError
from nodeclient.node import outbox
from nodeclient.node.outbox import INLINE_MAX, CommitUncertain, Outbox
from nodeclient.node.outbox_files import OutboxBusy
from nodeclient.node.outbox_schema import (
    FORMAT_VERSION,
    OutboxCorrupt,
    OutboxTooNew,
    read_history,
)


def commit(box: Outbox, task: uuid.UUID, result: bytes, sign=lambda m: b"s" * 65):
    return box.commit_result(
        task_id=task, job_id=uuid.UUID(int=9), workload_class="ai.inference", slice_index=None,
        kind="result", result=result, proof=b"p" * 32, message={"r": result.hex()},
        received_at=1.0, completed_at=2.0, sign=sign,
    )  # fmt: skip


def test_first_result_wins_and_is_never_resigned(tmp_path) -> None:
    """A second, different result for the same task gets the first one back, unsigned anew."""
    box = Outbox(tmp_path / "o.db")
    t = uuid.uuid4()
    signed: list[dict] = []

    def sign(message: dict) -> bytes:
        signed.append(message)
        return bytes([len(signed)]) * 65

    first = commit(box, t, b"one", sign)
    second = commit(box, t, b"two", sign)
    assert first.result == second.result == b"one"
    assert second.signature == first.signature == b"\x01" * 65
    assert signed == [{"r": b"one".hex()}]


def test_failed_signing_leaves_no_row(tmp_path) -> None:
    """If signing raises, the transaction rolls back: nothing is recorded, nothing pending."""
    box = Outbox(tmp_path / "o.db")
    t = uuid.uuid4()

    def broken(_message: dict) -> bytes:
        raise RuntimeError("key unavailable")

    with pytest.raises(RuntimeError):
        commit(box, t, b"res", broken)
    assert box.get(t) is None
    assert box.pending() == []
    assert commit(box, t, b"res").signature == b"s" * 65


def test_pending_until_acked_and_survives_reopen(tmp_path) -> None:
    """Committed entries stay pending across a reopen until acknowledged."""
    box = Outbox(tmp_path / "o.db")
    t = uuid.uuid4()
    commit(box, t, b"res")
    box.close()
    box = Outbox(tmp_path / "o.db")
    (entry,) = box.pending()
    assert entry.signature == b"s" * 65 and entry.result == b"res"
    assert box.backlog() == 1
    box.mark_acked(t, status="accepted", reason="", at=3.0)
    box.mark_acked(t, status="rejected", reason="late", at=4.0)  # first ack stands
    assert box.pending() == []
    assert box.get(t).ack_status == "accepted"
    assert box.counts()["completed"] == 1


def test_wal_and_full_sync(tmp_path) -> None:
    """The database runs in WAL mode with synchronous=FULL (2 in SQLite's numbering), and
    a result's transaction runs under it: the setting is read inside the transaction (from
    the signing callback), and no statement lowers it on the way to the result's COMMIT.
    Acks may skip their own fsync, and the setting is FULL again after them."""
    box = Outbox(tmp_path / "o.db")
    assert box._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert box._db.execute("PRAGMA synchronous").fetchone()[0] == 2
    inside: list[int] = []
    statements: list[str] = []

    def sign(_message: dict) -> bytes:
        inside.append(box._db.execute("PRAGMA synchronous").fetchone()[0])
        return b"s" * 65

    box._db.set_trace_callback(statements.append)
    t = uuid.uuid4()
    commit(box, t, b"res", sign=sign)
    box._db.set_trace_callback(None)
    assert inside == [2]
    assert any(s.strip().upper().startswith("COMMIT") for s in statements)
    sets = [s.upper().replace(" ", "") for s in statements if "=" in s]
    lowered = [s for s in sets if "SYNCHRONOUS=" in s and "SYNCHRONOUS=FULL" not in s]
    assert lowered == [], lowered
    box.mark_acked(t, status="accepted", reason="", at=3.0)  # acks skip their own fsync...
    assert box._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # ...and restore it


# --- large results as files ---------------------------------------------------------------


def big(seed: int, size: int = INLINE_MAX + 1) -> bytes:
    return bytes([seed]) * size


def files_of(box: Outbox) -> list[str]:
    return sorted(p.name for p in box.files.iterdir())


def test_large_result_is_a_private_file_and_round_trips(tmp_path) -> None:
    """Over INLINE_MAX the bytes go to a 0600 file, not the row; get/pending read them back."""
    box = Outbox(tmp_path / "o.db")
    small, large = uuid.uuid4(), uuid.uuid4()
    commit(box, small, b"x" * INLINE_MAX)  # at the limit: stays in the row
    commit(box, large, big(7))
    assert files_of(box) == [f"{large}.result"]
    path = box.files / f"{large}.result"
    assert path.read_bytes() == big(7)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(box.files.stat().st_mode) == 0o700
    (row_bytes,) = box._db.execute(
        "SELECT result FROM outbox WHERE task_id = ?", (str(large),)
    ).fetchone()
    assert row_bytes is None
    box.close()
    box = Outbox(tmp_path / "o.db")
    assert {e.task_id: e.result for e in box.pending()} == {
        small: b"x" * INLINE_MAX,
        large: big(7),
    }
    assert box.get(large).result == big(7)


def test_large_result_first_wins_and_leaves_one_file(tmp_path) -> None:
    """A second, different large result for a task is dropped: one file, the first bytes."""
    box = Outbox(tmp_path / "o.db")
    t = uuid.uuid4()
    commit(box, t, big(1))
    again = commit(box, t, big(2))
    assert again.result == big(1)
    assert files_of(box) == [f"{t}.result"]


def test_large_result_failed_signing_leaves_no_file(tmp_path) -> None:
    """A rolled-back commit removes the file it placed: no row, no file, nothing pending."""
    box = Outbox(tmp_path / "o.db")
    t = uuid.uuid4()

    def broken(_message: dict) -> bytes:
        raise RuntimeError("key unavailable")

    with pytest.raises(RuntimeError):
        commit(box, t, big(3), broken)
    assert box.get(t) is None and box.pending() == []
    assert files_of(box) == []  # at once: the transaction never reached its COMMIT
    box.close()
    box = Outbox(tmp_path / "o.db")
    assert files_of(box) == []
    assert commit(box, t, big(3)).result == big(3)  # and the task can still be recorded


def test_orphan_files_are_removed_on_open(tmp_path) -> None:
    """Files no row names (a crash between file and commit) go when the outbox opens."""
    box = Outbox(tmp_path / "o.db")
    kept = uuid.uuid4()
    commit(box, kept, big(4))
    box.close()
    (box.files / f"{uuid.uuid4()}.result").write_bytes(b"orphan")
    (box.files / f".{uuid.uuid4()}.0badcafe.tmp").write_bytes(b"half-written")
    (box.files / "operator-notes.txt").write_bytes(b"not ours")
    box = Outbox(tmp_path / "o.db")
    assert files_of(box) == sorted([f"{kept}.result", "operator-notes.txt"])
    assert box.get(kept).result == big(4)


def _hide_rows(path: Path, table: str, hidden: int) -> None:
    """Damage *path*'s database as a bad disk may: the leaf page of *table* says it holds
    *hidden* fewer cells than it does, so a scan of the table misses them, and succeeds."""
    db = sqlite3.connect(path)
    (root,) = db.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()
    (page_size,) = db.execute("PRAGMA page_size").fetchone()
    db.close()
    header = (root - 1) * page_size + 3  # a b-tree page's cell count, big-endian
    with open(path, "r+b") as f:
        f.seek(header)
        (cells,) = struct.unpack(">H", f.read(2))
        f.seek(header)
        f.write(struct.pack(">H", cells - hidden))


def test_a_damaged_database_deletes_no_result_file_at_open(tmp_path) -> None:
    """Damage that hides rows from a scan made their signed, unacknowledged results' files
    look like a crash's orphans: they were deleted at open, and the damage found just
    after. A database is checked before any result file goes: damaged, it is refused as
    such (SQLITE_CORRUPT, which `nodeclient run` turns into its exit 78), and every file
    stays for the operator to move aside."""
    path = tmp_path / "o.db"
    box = Outbox(path)
    for _ in range(5):
        commit(box, uuid.uuid4(), big(4))
    box.close()
    before = files_of(box)
    _hide_rows(path, "outbox", 2)  # closed: the write-ahead log is in the file
    with pytest.raises(sqlite3.DatabaseError, match="malformed") as refused:
        Outbox(path)
    assert refused.value.sqlite_errorcode == sqlite3.SQLITE_CORRUPT
    assert files_of(box) == before


@contextlib.contextmanager
def logged(level: int) -> Iterator[list[logging.LogRecord]]:
    """The outbox's log records at *level* and above, while the block runs."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("nodeclient.node.outbox")
    logger.addHandler(handler)  # the project's logging may not propagate to pytest's
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def test_missing_result_file_is_reported_not_sent(tmp_path) -> None:
    """A result file lost from disk: get raises OutboxCorrupt; pending logs it once and
    closes it as lost (a failed task, no longer in the backlog), and sends the rest."""
    box = Outbox(tmp_path / "o.db")
    lost, fine = uuid.uuid4(), uuid.uuid4()
    commit(box, lost, big(5))
    commit(box, fine, b"ok")
    (box.files / f"{lost}.result").unlink()
    with pytest.raises(OutboxCorrupt, match="No such file"):
        box.get(lost)
    with logged(logging.ERROR) as records:
        assert [e.task_id for e in box.pending()] == [fine]
    assert [r.getMessage() for r in records] == ["outbox.result_lost"]
    assert box.backlog() == 1 and box.counts()["failed"] == 1
    assert [e.task_id for e in box.pending()] == [fine]  # once: it is closed now
    assert box.get(lost).ack_status == "lost" and not box.get(lost).held
    truncated = uuid.uuid4()
    commit(box, truncated, big(6))
    (box.files / f"{truncated}.result").write_bytes(big(6)[:-1])
    with pytest.raises(OutboxCorrupt, match="not 65537"):
        box.get(truncated)


def test_a_small_result_missing_from_the_database_is_closed_as_lost(tmp_path) -> None:
    """A result kept in the database whose bytes are gone (a damaged row of
    outbox_results) is not sent as empty bytes with its signature (which the coordinator
    would refuse): it is closed as lost, as a result file of the wrong size is."""
    box = Outbox(tmp_path / "o.db")
    damaged, fine = uuid.uuid4(), uuid.uuid4()
    commit(box, damaged, b"x" * 1000)
    commit(box, fine, b"ok")
    box._db.execute("DELETE FROM outbox_results WHERE task_id = ?", (str(damaged),))
    with pytest.raises(OutboxCorrupt, match="holds 0 bytes, not 1000"):
        box.get(damaged)
    with logged(logging.ERROR) as records:
        assert [e.task_id for e in box.pending()] == [fine]
    assert [r.getMessage() for r in records] == ["outbox.result_lost"]
    assert box.get(damaged).ack_status == "lost"


def test_a_damaged_count_of_forgotten_entries_does_not_stop_the_open(tmp_path) -> None:
    """One row of outbox_forgotten with a bucket this release does not know (damaged, or
    a newer release's) counts for nothing; the outbox opens (a daemon that could not
    would never send its backlog)."""
    box = Outbox(tmp_path / "o.db")
    commit(box, uuid.uuid4(), b"ok")
    box._db.execute("INSERT INTO outbox_forgotten (bucket, count) VALUES ('garbled', 3)")
    box.close()
    box = Outbox(tmp_path / "o.db")
    assert box.counts() == {"completed": 0, "failed": 0, "rejected": 0, "unacknowledged": 1}


def test_a_result_file_name_edited_to_lead_elsewhere_is_never_read(tmp_path) -> None:
    """A row whose result_file was edited (or damaged) to name a file outside the results
    directory, even one of the right size, is a corrupt entry: the file is not read, and
    the entry is closed as lost rather than sent as the task's result."""
    box = Outbox(tmp_path / "o.db")
    task = uuid.uuid4()
    commit(box, task, big(7))
    outside = tmp_path / "secret"
    outside.write_bytes(b"x" * len(big(7)))
    with box._db:
        box._db.execute(
            "UPDATE outbox SET result_file = ? WHERE task_id = ?", ("../secret", str(task))
        )
    with pytest.raises(OutboxCorrupt, match="not a result file's name"):
        box.get(task)
    with logged(logging.ERROR) as records:
        assert box.pending() == []
    assert [r.getMessage() for r in records] == ["outbox.result_lost"]


def test_a_lost_entry_keeps_its_file_name_and_the_sweep_keeps_the_file(tmp_path) -> None:
    """Closed as lost (gone, or the wrong size), a row still names its file: a short file
    stays for inspection and a file that turns up again is not swept as an orphan; get,
    history, counts and prune treat the row as closed and holding nothing, and prune
    removes the file once the entry is older than the retention period."""
    box = Outbox(tmp_path / "o.db")
    gone, short, acked = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    for t, seed in ((gone, 1), (short, 2), (acked, 3)):
        commit(box, t, big(seed))
    box.mark_acked(acked, status="accepted", reason="", at=5.0)
    (box.files / f"{gone}.result").unlink()
    (box.files / f"{short}.result").write_bytes(b"torn")
    with logged(logging.ERROR) as records:
        assert box.pending() == []
    assert [r.getMessage() for r in records] == ["outbox.result_lost"] * 2
    names = dict(box._db.execute("SELECT task_id, result_file FROM outbox").fetchall())
    assert names == {str(t): f"{t}.result" for t in (gone, short, acked)}
    (box.files / f"{gone}.result").write_bytes(big(1))  # the disk comes back, say
    box.close()
    box = Outbox(tmp_path / "o.db")
    assert files_of(box) == sorted(f"{t}.result" for t in (gone, short, acked))
    assert box.pending() == []  # closed once, for good
    for t in (gone, short):
        entry = box.get(t)  # no read of the file: a lost entry holds no bytes
        assert entry.ack_status == "lost" and not entry.held and entry.result == b""
    assert box.counts() == {"completed": 1, "failed": 2, "rejected": 0, "unacknowledged": 0}
    assert box.held_bytes() == len(big(0))  # only the acknowledged result
    history = {e.task_id: e.ack_status for e in box.history()}
    assert history == {gone: "lost", short: "lost", acked: "accepted"}
    assert box.prune(acked_before=10.0, keep_bytes=0) == 1  # the acknowledged one only
    assert files_of(box) == sorted(f"{t}.result" for t in (gone, short))
    assert box.held_bytes() == 0
    # Past the retention period the lost entries' files go too; the rows stay, closed.
    assert box.prune(acked_before=1e12, keep_bytes=0) == 2
    assert files_of(box) == []
    box.close()
    box = Outbox(tmp_path / "o.db")
    assert {e.task_id: e.ack_status for e in box.history()} == history
    assert box.get(gone).ack_status == "lost" and box.prune(acked_before=1e12, keep_bytes=0) == 0


@pytest.mark.parametrize("code", [errno.EMFILE, errno.EIO, errno.ENOMEM, errno.EACCES])
def test_an_unreadable_result_file_stays_pending(tmp_path, monkeypatch, code: int) -> None:
    """Too many open files, EIO, ENOMEM, EACCES say nothing about the file: pending logs it
    and leaves the entry out this time only; row, file and backlog stay, across a reopen."""
    box = Outbox(tmp_path / "o.db")
    stuck, fine = uuid.uuid4(), uuid.uuid4()
    commit(box, stuck, big(8))
    commit(box, fine, b"ok")
    real_open = open

    def failing_open(file, *args, **kwargs):
        if Path(file).parent == box.files:
            raise OSError(code, os.strerror(code), str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(outbox, "open", failing_open, raising=False)
    with logged(logging.WARNING) as records:
        assert [e.task_id for e in box.pending()] == [fine]
        assert [e.task_id for e in box.pending()] == [fine]  # the next reconnect tries again
    assert [r.getMessage() for r in records] == ["outbox.result_unreadable"] * 2
    with pytest.raises(OSError) as raised:  # not OutboxCorrupt: the daemon must not reject it
        box.get(stuck)
    assert raised.value.errno == code
    assert box.backlog() == 2 and box.counts()["failed"] == 0
    monkeypatch.undo()
    box.close()
    box = Outbox(tmp_path / "o.db")
    assert files_of(box) == [f"{stuck}.result"]
    assert {e.task_id: e.result for e in box.pending()} == {stuck: big(8), fine: b"ok"}
    assert box.get(stuck).ack_status is None


def test_a_result_file_unreadable_at_every_reconnect_is_closed_as_lost(
    tmp_path, monkeypatch
) -> None:
    """A file that fails to read UNREADABLE_TRIES times in a row (a permanent EACCES) is
    closed as lost, its file kept; one that reads again before that stays pending."""
    box = Outbox(tmp_path / "o.db")
    stuck, recovers = uuid.uuid4(), uuid.uuid4()
    commit(box, stuck, big(8))
    commit(box, recovers, big(9))
    real_open = open
    failing = {f"{stuck}.result", f"{recovers}.result"}

    def failing_open(file, *args, **kwargs):
        if Path(file).parent == box.files and Path(file).name in failing:
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(outbox, "open", failing_open, raising=False)
    for _ in range(outbox.UNREADABLE_TRIES - 1):
        assert box.pending() == []
    failing.discard(f"{recovers}.result")  # this one reads again: its count starts over
    assert [e.task_id for e in box.pending()] == [recovers]
    assert box.get(stuck).ack_status == "lost"  # the fifth failure in a row
    assert box.backlog() == 1 and box.counts()["failed"] == 1
    monkeypatch.undo()
    box.close()
    box = Outbox(tmp_path / "o.db")
    assert sorted(files_of(box)) == sorted([f"{stuck}.result", f"{recovers}.result"])


# --- retention ----------------------------------------------------------------------------


def test_prune_by_age_and_budget_never_touches_unacknowledged(tmp_path) -> None:
    """Old acknowledged results and the oldest beyond the budget lose their bytes; rows stay."""
    box = Outbox(tmp_path / "o.db")
    old, mid, new, unacked = (uuid.uuid4() for _ in range(4))
    for t, seed in ((old, 1), (mid, 2), (new, 3), (unacked, 4)):
        commit(box, t, big(seed))
    box.mark_acked(old, status="accepted", reason="", at=100.0)
    box.mark_acked(mid, status="accepted", reason="", at=200.0)
    box.mark_acked(new, status="duplicate", reason="", at=300.0)
    assert box.held_bytes() == 3 * len(big(0))  # acknowledged and held; unacked not counted
    # nothing is old enough and everything fits: nothing to do
    assert box.prune(acked_before=50.0, keep_bytes=10 * len(big(0))) == 0
    # age: acknowledged before 150 goes
    assert box.prune(acked_before=150.0, keep_bytes=10 * len(big(0))) == 1
    # budget: room for one acknowledged result, the newest stays
    assert box.prune(acked_before=0.0, keep_bytes=len(big(0))) == 1
    assert files_of(box) == sorted([f"{new}.result", f"{unacked}.result"])
    assert [box.get(t).held for t in (old, mid, new, unacked)] == [False, False, True, True]
    assert box.get(old).result == b"" and box.get(new).result == big(3)
    assert box.held_bytes() == len(big(0))
    # even a budget of zero leaves the unacknowledged result alone
    assert box.prune(acked_before=1e12, keep_bytes=0) == 1
    assert box.held_bytes() == 0
    assert files_of(box) == [f"{unacked}.result"]
    assert [e.task_id for e in box.pending()] == [unacked]
    history = {e.task_id: e for e in box.history()}
    assert len(history) == 4 and history[old].result_size == len(big(1))
    assert history[old].signature == b"s" * 65 and not history[old].held


def test_prune_drops_inline_results_too(tmp_path) -> None:
    box = Outbox(tmp_path / "o.db")
    t = uuid.uuid4()
    commit(box, t, b"small result")
    box.mark_acked(t, status="accepted", reason="", at=10.0)
    assert box.prune(acked_before=20.0, keep_bytes=1 << 30) == 1
    (row_bytes,) = box._db.execute("SELECT result FROM outbox").fetchone()
    assert row_bytes is None and not box.get(t).held


def test_history_reads_no_result_bytes(tmp_path) -> None:
    """history and read_history return sizes, not bytes: a months-long history stays cheap."""
    box = Outbox(tmp_path / "o.db")
    t, u = uuid.uuid4(), uuid.uuid4()
    commit(box, t, big(6))
    commit(box, u, b"inline")
    for entries in (list(box.history()), read_history(tmp_path / "o.db")):
        assert {e.task_id: (e.result, e.result_size) for e in entries} == {
            t: (b"", len(big(6))),
            u: (b"", 6),
        }


OLD_SCHEMA = """
CREATE TABLE outbox (
    task_id TEXT PRIMARY KEY, job_id TEXT NOT NULL, workload_class TEXT NOT NULL,
    slice_index INTEGER, kind TEXT NOT NULL, result BLOB, result_size INTEGER NOT NULL DEFAULT 0,
    proof BLOB, message TEXT NOT NULL, signature BLOB, received_at REAL NOT NULL,
    completed_at REAL NOT NULL, acked_at REAL, ack_status TEXT, ack_reason TEXT
);
CREATE INDEX outbox_pending ON outbox (acked_at);
"""


def test_outbox_from_an_earlier_release_is_upgraded_in_place(tmp_path) -> None:
    """A database without result_file/held reads (history too) and gains them on open."""
    path = tmp_path / "o.db"
    t = uuid.uuid4()
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    db.execute(
        "INSERT INTO outbox VALUES (?, ?, 'ai.inference', NULL, 'result', ?, 3, ?, '{}', ?, "
        "1.0, 2.0, NULL, NULL, NULL)",
        (str(t), str(uuid.UUID(int=9)), b"old", b"p" * 32, b"s" * 65),
    )
    db.commit()
    db.close()
    (entry,) = read_history(path)  # read-only: works before any upgrade
    assert entry.task_id == t and entry.held
    box = Outbox(path)
    (entry,) = box.pending()
    assert entry.result == b"old" and entry.held and entry.signature == b"s" * 65
    columns = {row[1] for row in box._db.execute("PRAGMA table_info(outbox)")}
    assert {"result_file", "held", "coordinator_id"} <= columns
    # Recorded before coordinator ids were: it goes to whichever coordinator links.
    assert entry.coordinator_id is None
    assert [e.task_id for e in box.pending(coordinator_id="coordinator-1")] == [t]


def test_a_second_process_cannot_open_the_outbox(tmp_path) -> None:
    """Two daemons on one home would sweep each other's files: the second is refused."""
    box = Outbox(tmp_path / "o.db")
    with pytest.raises(OutboxBusy, match="another process"):
        Outbox(tmp_path / "o.db")
    box.close()
    Outbox(tmp_path / "o.db").close()


def test_small_results_live_apart_from_the_rows(tmp_path) -> None:
    """Inline results are rows of outbox_results, not a column before the history fields;
    prune deletes them."""
    box = Outbox(tmp_path / "o.db")
    t = uuid.uuid4()
    commit(box, t, b"small")
    assert box._db.execute("SELECT result FROM outbox").fetchall() == [(None,)]
    assert box._db.execute("SELECT data FROM outbox_results").fetchall() == [(b"small",)]
    box.mark_acked(t, status="accepted", reason="", at=1.0)
    assert box.prune(acked_before=2.0, keep_bytes=1 << 30) == 1
    assert box._db.execute("SELECT COUNT(*) FROM outbox_results").fetchone() == (0,)


def test_counts_kept_in_memory_match_a_fresh_count(tmp_path) -> None:
    """The status counters, updated per commit and ack, equal a recount after reopening."""
    box = Outbox(tmp_path / "o.db")
    tasks = [uuid.uuid4() for _ in range(5)]
    for t in tasks:
        commit(box, t, b"r")
    box.mark_acked(tasks[0], status="accepted", reason="", at=1.0)
    box.mark_acked(tasks[1], status="duplicate", reason="", at=1.0)
    box.mark_acked(tasks[2], status="rejected", reason="bad proof", at=1.0)
    box.mark_acked(tasks[2], status="accepted", reason="", at=2.0)  # ignored: acked already
    live = box.counts()
    assert live == {"completed": 2, "failed": 1, "rejected": 0, "unacknowledged": 2}
    assert box.backlog() == 2 and box.held_bytes() == 3
    box.close()
    again = Outbox(tmp_path / "o.db")
    assert again.counts() == live and again.held_bytes() == 3


def test_prune_works_through_many_batches(tmp_path) -> None:
    """More rows than one batch: every old acknowledged result goes, in several commits."""
    box = Outbox(tmp_path / "o.db")
    tasks = [uuid.uuid4() for _ in range(450)]
    for i, t in enumerate(tasks):
        commit(box, t, b"r%d" % i)
        box.mark_acked(t, status="accepted", reason="", at=float(i))
    assert box.prune(acked_before=400.0, keep_bytes=1 << 30) == 400
    held = [box.get(t).held for t in tasks]
    assert held == [False] * 400 + [True] * 50
    assert box.prune(acked_before=0.0, keep_bytes=10 * 4) == 40  # budget: 10 of 4 bytes each
    assert sum(box.get(t).held for t in tasks) == 10


# --- file modes ---------------------------------------------------------------------------


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """The umask of a shell (022), under which SQLite would make a new database 0644."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def modes(directory: Path) -> dict[str, int]:
    return {
        p.name: stat.S_IMODE(p.stat().st_mode)
        for p in directory.iterdir()
        if p.name.startswith("o.db") and p.is_file()
    }


@pytest.mark.usefixtures("loose_umask")
def test_the_database_and_its_wal_are_private_under_a_loose_umask(tmp_path) -> None:
    """Small results are rows: o.db, -wal and -shm are 0600 like the result files, also
    the -shm and -wal that a read-only history reader makes once the daemon is gone."""
    box = Outbox(tmp_path / "o.db")
    commit(box, uuid.uuid4(), b"small result")  # in the WAL first
    assert modes(tmp_path) == dict.fromkeys(["o.db", "o.db-wal", "o.db-shm", "o.db.lock"], 0o600)
    box.close()
    assert len(read_history(tmp_path / "o.db")) == 1
    assert "o.db-shm" in modes(tmp_path)
    assert set(modes(tmp_path).values()) == {0o600}


@pytest.mark.usefixtures("loose_umask")
def test_a_loose_database_from_an_older_release_is_tightened_at_open(tmp_path) -> None:
    """A database SQLite made 0644, with a 0644 -wal and -shm, is 0600 once the outbox
    opens it, and keeps its rows."""
    path = tmp_path / "o.db"
    older = sqlite3.connect(path, isolation_level=None)
    older.execute("PRAGMA journal_mode=WAL")
    older.executescript(OLD_SCHEMA)
    try:
        assert modes(tmp_path) == dict.fromkeys(["o.db", "o.db-wal", "o.db-shm"], 0o644)
        box = Outbox(path)
        assert set(modes(tmp_path).values()) == {0o600}
        assert box.pending() == []
        box.close()
    finally:
        older.close()


def test_a_symlinked_database_is_refused(tmp_path) -> None:
    """The outbox is a file of the node home, never something a link points at."""
    (tmp_path / "elsewhere.db").write_bytes(b"")
    (tmp_path / "o.db").symlink_to(tmp_path / "elsewhere.db")
    with pytest.raises(UsageError, match="symbolic link"):
        Outbox(tmp_path / "o.db")


# --- SQLite version -----------------------------------------------------------------------


def test_an_sqlite_older_than_the_minimum_is_refused_in_one_line(tmp_path, monkeypatch) -> None:
    """Below 3.8.0 (partial indexes) the outbox refuses to open, naming both versions,
    before it creates anything."""
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 7, 17))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.7.17")
    with pytest.raises(UsageError, match=r"needs SQLite 3\.8\.0 or newer.* uses SQLite 3\.7\.17"):
        Outbox(tmp_path / "o.db")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    Outbox(tmp_path / "o.db").close()
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 7, 17))
    with pytest.raises(UsageError, match=r"needs SQLite 3\.8\.0"):
        read_history(tmp_path / "o.db")


# Constructs newer than SQLITE_MIN: RETURNING 3.35, upsert 3.24, window functions 3.25,
# FILTER 3.30, NULLS FIRST/LAST 3.30, RENAME COLUMN 3.25, DROP COLUMN 3.35, STRICT 3.37,
# -> and ->> 3.38.
NEWER_SQL = re.compile(
    r"\bRETURNING\b|\bON\s+CONFLICT\b|\bOVER\s*\(|\bFILTER\s*\(|\bNULLS\s+(FIRST|LAST)\b"
    r"|\bRENAME\s+COLUMN\b|\bDROP\s+COLUMN\b|\bSTRICT\b|->",
    re.IGNORECASE,
)


def test_no_statement_needs_an_sqlite_newer_than_the_minimum(tmp_path, monkeypatch) -> None:
    """Every statement of a whole life (open, commit, ack, resend, prune, history) runs on
    the system SQLite of Debian 11 (3.34) and Ubuntu 20.04 (3.31): none uses RETURNING."""
    statements: list[str] = []
    real_connect = sqlite3.connect

    def tracing(*args, **kwargs):
        db = real_connect(*args, **kwargs)
        db.set_trace_callback(statements.append)
        return db

    monkeypatch.setattr(sqlite3, "connect", tracing)
    box = Outbox(tmp_path / "o.db")
    small, large = uuid.uuid4(), uuid.uuid4()
    commit(box, small, b"small")
    commit(box, large, big(9))
    box.mark_acked(small, status="accepted", reason="", at=1.0)
    box.mark_acked(small, status="rejected", reason="late", at=2.0)  # the first ack stands
    assert [e.task_id for e in box.pending()] == [large]
    box.mark_acked(large, status="duplicate", reason="", at=3.0)
    assert box.prune(acked_before=10.0, keep_bytes=0) == 2
    assert len(list(box.history())) == 2
    box.close()
    assert len(read_history(tmp_path / "o.db")) == 2
    assert any("UPDATE outbox SET acked_at" in s for s in statements)
    assert [s for s in statements if NEWER_SQL.search(s)] == []


def test_forget_deletes_old_history_rows_and_keeps_the_totals(tmp_path) -> None:
    """Months of tasks must not grow the outbox for ever: rows answered before the history
    period whose result bytes are gone are deleted, in batches; rows still holding their
    result, unanswered ones and newer ones stay; the status totals still count them all,
    after reopening too."""
    box = Outbox(tmp_path / "o.db")
    old = [uuid.uuid4() for _ in range(450)]  # more than two batches
    held, recent, unacked = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    for t in (*old, held, recent, unacked):
        commit(box, t, b"r")
    for i, t in enumerate(old):
        box.mark_acked(t, status="rejected" if i % 3 == 0 else "accepted", reason="", at=10.0)
    box.mark_acked(held, status="accepted", reason="", at=10.0)
    box.mark_acked(recent, status="accepted", reason="", at=1000.0)
    box.prune(acked_before=20.0, keep_bytes=1 << 30)  # the old ones lose their bytes
    box._db.execute(  # as if it were held still (a large budget, say)
        "UPDATE outbox SET held = 1 WHERE task_id = ?", (str(held),)
    )
    before = box.counts()
    assert box.forget(acked_before=500.0) == 450
    assert box.forget(acked_before=500.0) == 0
    remaining = {e.task_id for e in box.history()}
    assert remaining == {held, recent, unacked}
    assert box.counts() == before == {
        "completed": 302, "failed": 150, "rejected": 0, "unacknowledged": 1
    }  # fmt: skip
    box.close()
    assert Outbox(tmp_path / "o.db").counts() == before  # the forgotten are still counted


def test_an_outbox_of_a_newer_release_is_refused_untouched(tmp_path) -> None:
    """The outbox records its format version; one from a newer release (whose layout this
    one could misread, sending a result as empty) is refused in one line, by the daemon's
    open and by history alike, and left as it was."""
    path = tmp_path / "o.db"
    box = Outbox(path)
    t = uuid.uuid4()
    commit(box, t, b"kept")
    assert box._db.execute("PRAGMA user_version").fetchone() == (FORMAT_VERSION,)
    box._db.execute(f"PRAGMA user_version = {FORMAT_VERSION + 1}")
    box.close()
    before = path.read_bytes()
    for open_it in (Outbox, read_history):
        with pytest.raises(OutboxTooNew, match="written by a newer nodeclient") as info:
            open_it(path)
        assert "\n" not in str(info.value)
    assert path.read_bytes() == before
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 0")  # (a release before the version was recorded)
    db.close()
    box = Outbox(path)  # reopened by this release: recorded again, the row intact
    assert box._db.execute("PRAGMA user_version").fetchone() == (FORMAT_VERSION,)
    assert [e.result for e in box.pending()] == [b"kept"]
    box.close()


def test_pending_results_are_read_one_at_a_time(tmp_path) -> None:
    """The backlog sent on a reconnect is read an entry at a time, each result when its
    turn comes (a backlog of 32 MiB results was all read into memory at once); an entry
    acknowledged meanwhile is skipped."""
    box = Outbox(tmp_path / "o.db")
    tasks = [uuid.uuid4() for _ in range(3)]
    for i, t in enumerate(tasks):
        commit(box, t, bytes([i]) * (INLINE_MAX + 1))  # files, read when loaded
    backlog = box.iter_pending()
    first = next(backlog)
    assert first.task_id == tasks[0] and first.result == b"\x00" * (INLINE_MAX + 1)
    box.mark_acked(tasks[1], status="accepted", reason="", at=1.0)
    assert [(e.task_id, e.result[:1]) for e in backlog] == [(tasks[2], b"\x02")]
    box.close()


# --- what goes wrong: a damaged row, another coordinator, a new database, a full disk -------


def damage(path: Path, task: uuid.UUID, column: str, value: object) -> None:
    """Write *value* over one column of a task's row, as bit rot or a hand edit would."""
    db = sqlite3.connect(path)
    db.execute(f"UPDATE outbox SET {column} = ? WHERE task_id = ?", (value, str(task)))
    db.commit()
    db.close()


def test_a_row_that_cannot_be_decoded_is_closed_as_lost_once(tmp_path) -> None:
    """A pending row whose message is not JSON, or whose job_id is not a UUID, can never be
    sent. It raised out of pending (the daemon's replay of the backlog: every link died
    there, for good); now pending and get close it as lost, logged once with its task_id,
    keep the row for the operator, and go on with the rest. history leaves it out, named,
    as read_history does."""
    path = tmp_path / "o.db"
    box = Outbox(path)
    bad_json, bad_job, fine, later = (uuid.uuid4() for _ in range(4))
    for t in (bad_json, bad_job, fine):
        commit(box, t, b"r")
    commit(box, later, big(1))
    damage(path, bad_json, "message", '{"r": "72"} trailing bytes')
    damage(path, bad_job, "job_id", "not-a-uuid")
    with logged(logging.ERROR) as records:
        assert [e.task_id for e in box.pending()] == [fine, later]
        assert [e.task_id for e in box.pending()] == [fine, later]  # closed: once
    assert [r.__dict__["task_id"] for r in records] == [str(bad_json), str(bad_job)]
    assert [r.getMessage() for r in records] == ["outbox.result_lost"] * 2
    assert box.backlog() == 2 and box.counts()["failed"] == 2
    for t in (bad_json, bad_job):
        with pytest.raises(OutboxCorrupt, match=str(t)):
            box.get(t)  # the daemon refuses a dispatch of it, signed, and never runs it
    damaged: list[str] = []
    assert [e.task_id for e in box.history(damaged=damaged)] == [later, fine]
    assert len(damaged) == 2 and all("the row of task" in d for d in damaged)
    box.close()
    again: list[str] = []
    assert len(read_history(path, damaged=again)) == 2 and sorted(again) == sorted(damaged)
    db = sqlite3.connect(path)
    rows = db.execute("SELECT task_id, ack_status FROM outbox WHERE ack_status = 'lost'")
    assert sorted(rows) == sorted([(str(bad_json), "lost"), (str(bad_job), "lost")])
    db.close()


def test_get_closes_a_damaged_pending_row_as_lost(tmp_path) -> None:
    """A dispatch of a task whose row is damaged reads it with get before any reconnect:
    the row is closed as lost there (logged once) and OutboxCorrupt raised."""
    path = tmp_path / "o.db"
    box = Outbox(path)
    t = uuid.uuid4()
    commit(box, t, b"r")
    damage(path, t, "message", "{")
    with logged(logging.ERROR) as records:
        for _ in range(2):
            with pytest.raises(OutboxCorrupt, match="JSONDecodeError"):
                box.get(t)
    assert [r.getMessage() for r in records] == ["outbox.result_lost"]
    assert box.backlog() == 0 and box.pending() == [] and box.counts()["failed"] == 1


def test_results_wait_for_the_coordinator_that_dispatched_them(tmp_path) -> None:
    """Each entry records its coordinator: pending for coordinator B leaves A's entries
    out (B never dispatched them, and would answer "unknown task"), and B's answer for one
    of them settles nothing. Entries without an id go to any coordinator."""
    box = Outbox(tmp_path / "o.db")
    of_a, of_b, legacy = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    commit_for = {of_a: "coord-A", of_b: "coord-B", legacy: None}
    for t, coordinator in commit_for.items():
        box.commit_result(
            task_id=t, job_id=uuid.UUID(int=9), workload_class="ai.inference",
            slice_index=None, kind="result", result=b"r", proof=b"p" * 32, message={},
            received_at=1.0, completed_at=2.0, sign=lambda m: b"s" * 65,
            coordinator_id=coordinator,
        )  # fmt: skip
    assert box.get(of_a).coordinator_id == "coord-A"
    assert [e.task_id for e in box.pending(coordinator_id="coord-B")] == [of_b, legacy]
    assert [e.task_id for e in box.pending()] == [of_a, of_b, legacy]  # every one
    assert box.backlog() == 3 and box.backlog("coord-B") == 2 and box.backlog("coord-C") == 1
    assert box.waiting() == {"coord-A": 1, "coord-B": 1, None: 1}
    box.mark_acked(of_a, status="rejected", reason="unknown task", at=3.0, coordinator_id="coord-B")
    assert box.get(of_a).acked_at is None and box.backlog() == 3  # not B's to settle
    box.mark_acked(of_b, status="accepted", reason="", at=3.0, coordinator_id="coord-B")
    box.mark_acked(legacy, status="accepted", reason="", at=3.0, coordinator_id="coord-B")
    assert box.waiting() == {"coord-A": 1} and box.backlog("coord-B") == 0
    box.close()
    box = Outbox(tmp_path / "o.db")  # recorded, and counted again at open
    assert box.waiting() == {"coord-A": 1}
    assert [e.task_id for e in box.pending(coordinator_id="coord-A")] == [of_a]
    assert [(e.task_id, e.coordinator_id) for e in read_history(tmp_path / "o.db")][-1] == (
        of_a,
        "coord-A",
    )
    box.mark_acked(of_a, status="accepted", reason="", at=4.0, coordinator_id="coord-A")
    assert box.counts() == {"completed": 3, "failed": 0, "rejected": 0, "unacknowledged": 0}


def test_a_new_database_keeps_the_result_files_it_finds(tmp_path) -> None:
    """outbox.db moved aside without outbox.db.results/ (or lost): the database created in
    its place took the other one's result files for orphans and deleted them. It keeps
    them now, at this open and every later one, warning with the directory and the count,
    while its own crash leftovers are still swept; the database moved aside, put back,
    finds its results."""
    path = tmp_path / "outbox.db"
    box = Outbox(path)
    theirs = uuid.uuid4()
    commit(box, theirs, big(2))
    box.close()
    (tmp_path / "aside").mkdir()
    for name in ("outbox.db", "outbox.db-wal", "outbox.db-shm"):
        if (tmp_path / name).exists():
            (tmp_path / name).rename(tmp_path / "aside" / name)
    with logged(logging.WARNING) as records:
        box = Outbox(path)
    assert files_of(box) == [f"{theirs}.result"]
    (record,) = records
    assert record.getMessage() == "outbox.foreign_results"
    assert record.__dict__["directory"] == str(box.files) and record.__dict__["files"] == 1
    ours = uuid.uuid4()
    commit(box, ours, big(3))
    box.close()
    crashed = f"{uuid.uuid4()}.result"  # a crash between a file and its commit, later on
    (box.files / crashed).write_bytes(b"orphan")
    with logged(logging.WARNING) as records:
        box = Outbox(path)  # an existing database now: the sweep runs, and still keeps them
    assert files_of(box) == sorted([f"{theirs}.result", f"{ours}.result"])
    assert [r.getMessage() for r in records] == ["outbox.foreign_results"]
    box.close()
    for name in ("outbox.db", "outbox.db-wal", "outbox.db-shm"):
        (tmp_path / name).unlink(missing_ok=True)
        if (tmp_path / "aside" / name).exists():
            (tmp_path / "aside" / name).rename(tmp_path / name)
    box = Outbox(path)  # the first database back: its result reads
    assert box.get(theirs).result == big(2)
    assert files_of(box) == [f"{theirs}.result"]  # the other database's is its orphan


def _another_databases_result(tmp_path: Path) -> tuple[uuid.UUID, Path]:
    """A result committed by an outbox database that was then lost (only its results
    directory is left): the task and the directory."""
    box = Outbox(tmp_path / "outbox.db")
    theirs = uuid.uuid4()
    commit(box, theirs, big(2))
    box.close()
    for name in ("outbox.db", "outbox.db-wal", "outbox.db-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    return theirs, tmp_path / "outbox.db.results"


def test_a_first_open_cut_short_keeps_the_files_it_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The open that creates a database records the result files already there (another
    database's) in the same transaction as the tables: cut short after the tables were
    made (here, the directory cannot be listed: a full disk or a kill does the same), it
    leaves no tables, so the next open is a first open again, and keeps the files rather
    than sweeping them as this database's orphans."""
    theirs, _ = _another_databases_result(tmp_path)
    real_scandir = os.scandir

    def fails_once(path: object) -> object:
        monkeypatch.setattr(outbox.os, "scandir", real_scandir)
        raise OSError(errno.EIO, "cut short")

    monkeypatch.setattr(outbox.os, "scandir", fails_once)
    with pytest.raises(OSError, match="cut short"):
        Outbox(tmp_path / "outbox.db")
    box = Outbox(tmp_path / "outbox.db")
    assert files_of(box) == [f"{theirs}.result"]
    box.close()
    box = Outbox(tmp_path / "outbox.db")  # and at every later open
    assert files_of(box) == [f"{theirs}.result"]


def test_a_task_run_again_keeps_another_databases_file_for_it(tmp_path: Path) -> None:
    """Only outbox.db was lost, and the coordinator leased its unacknowledged task here
    again: the new result is written beside the other database's file for that task,
    never over it (its only copy of a signed result), under a name of its own."""
    theirs, results = _another_databases_result(tmp_path)
    kept = (results / f"{theirs}.result").read_bytes()
    box = Outbox(tmp_path / "outbox.db")
    assert commit(box, theirs, big(5)).result == big(5)
    assert (results / f"{theirs}.result").read_bytes() == kept
    ours = [name for name in files_of(box) if name != f"{theirs}.result"]
    assert len(ours) == 1 and re.fullmatch(rf"{theirs}\.[0-9a-f]{{8}}\.result", ours[0])
    box.close()
    box = Outbox(tmp_path / "outbox.db")  # the sweep keeps both
    assert box.get(theirs).result == big(5)
    assert sorted(files_of(box)) == sorted([f"{theirs}.result", *ours])
    # acknowledged, it is held and pruned as any result file is (not taken for damaged)
    box.mark_acked(theirs, status="accepted", reason="", at=3.0)
    assert box.held_bytes() == len(big(5))
    damaged: list[str] = []
    assert box.prune(acked_before=1e12, keep_bytes=0, damaged=damaged) == 1
    assert damaged == [] and files_of(box) == [f"{theirs}.result"]


def test_the_files_found_by_a_new_database_are_forgotten_once_removed(tmp_path) -> None:
    """The operator deletes the kept files: the warning stops, and a file of that name
    written later (a crash leftover) is swept like any other."""
    path = tmp_path / "o.db"
    box = Outbox(path)
    stray = f"{uuid.uuid4()}.result"
    box.close()
    path.unlink()
    (box.files / stray).write_bytes(b"another database's")
    Outbox(path).close()
    (box.files / stray).unlink()
    with logged(logging.WARNING) as records:
        Outbox(path).close()
    assert records == []
    (box.files / stray).write_bytes(b"a crash leftover")
    box = Outbox(path)
    assert files_of(box) == []


class FailingCommit:
    """The outbox's connection, but for its COMMIT, which fails with *error*."""

    def __init__(self, db: sqlite3.Connection, error: sqlite3.Error) -> None:
        self.db, self.error = db, error

    def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
        if sql == "COMMIT":
            raise self.error
        return self.db.execute(sql, *args)

    def __getattr__(self, name: str) -> object:
        return getattr(self.db, name)


class CommitThenFail(FailingCommit):
    """The outbox's connection, whose COMMIT reaches the disk and then reports an I/O
    error (a failed fsync whose data made it after all)."""

    def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
        if sql == "COMMIT":
            self.db.execute(sql, *args)
            raise self.error
        return self.db.execute(sql, *args)


def test_a_commit_that_reached_the_disk_despite_its_error_is_counted(tmp_path) -> None:
    """CommitUncertain after a COMMIT that did land: the result is in the backlog (sent
    at the next reconnect, not only after a restart), and its acknowledgement brings the
    backlog to 0, not -1."""
    box = Outbox(tmp_path / "o.db")
    real = box._db
    box._db = CommitThenFail(real, sqlite_error("disk I/O error", SQLITE_IOERR_FSYNC))
    task_id = uuid.uuid4()
    with pytest.raises(CommitUncertain):
        commit(box, task_id, b"landed")
    box._db = real
    assert box.backlog() == 1 and [e.task_id for e in box.pending()] == [task_id]
    box.mark_acked(task_id, status="accepted", reason="", at=time.time())
    assert box.backlog() == 0 and box.counts()["completed"] == 1


def sqlite_error(message: str, code: int) -> sqlite3.OperationalError:
    """An error as SQLite raises it: with its result code (Python 3.11)."""
    error = sqlite3.OperationalError(message)
    error.sqlite_errorcode = code  # type: ignore[attr-defined]
    return error


SQLITE_IOERR_FSYNC = 10 | (4 << 8)


def test_a_commit_that_finds_the_disk_full_leaves_no_result_file(tmp_path) -> None:
    """The COMMIT fails with SQLITE_FULL: SQLite wrote no commit record, so the row is
    not there and the result file renamed for it goes at once (it stayed until a restart:
    a node whose disk filled kept filling it with every task). After an I/O error
    (a failed fsync) the commit may have reached the disk: the file stays for its row,
    and the next open removes it if there is no row."""
    box = Outbox(tmp_path / "o.db")
    real = box._db
    box._db = FailingCommit(real, sqlite_error("database or disk is full", sqlite3.SQLITE_FULL))
    for _ in range(3):
        with pytest.raises(sqlite3.OperationalError, match="disk is full"):
            commit(box, uuid.uuid4(), big(4))
    assert files_of(box) == [] and box.backlog() == 0
    box._db = FailingCommit(real, sqlite_error("disk I/O error", SQLITE_IOERR_FSYNC))
    unsure = uuid.uuid4()
    with pytest.raises(CommitUncertain, match="may or may not be on disk: disk I/O") as raised:
        commit(box, unsure, big(5))
    assert isinstance(raised.value.__cause__, sqlite3.OperationalError)
    assert files_of(box) == [f"{unsure}.result"]
    box._db = real
    box.close()
    assert files_of(Outbox(tmp_path / "o.db")) == []  # no row names it: an orphan


def test_a_row_the_full_disk_refused_leaves_no_result_file(tmp_path) -> None:
    """SQLITE_FULL before the COMMIT, as SQLite raises it (the database at its page
    limit): nothing committed, no file left."""
    box = Outbox(tmp_path / "o.db")
    (pages,) = box._db.execute("PRAGMA page_count").fetchone()
    box._db.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(sqlite3.OperationalError, match="full") as raised:
        commit(box, uuid.uuid4(), big(6))
    assert raised.value.sqlite_errorcode == sqlite3.SQLITE_FULL
    assert files_of(box) == [] and box.backlog() == 0


def test_status_tallies_are_kept_across_reopening(tmp_path) -> None:
    """Rejects sent and tasks timed out are no rows of the outbox; their totals are kept
    in it all the same, so that status does not show them reset by a restart beside
    totals that are not."""
    box = Outbox(tmp_path / "o.db")
    assert box.tallies() == {"rejected": 0, "timed_out": 0}
    for name in ("rejected", "rejected", "timed_out"):
        box.tally(name)
    box.close()
    box = Outbox(tmp_path / "o.db")
    assert box.tallies() == {"rejected": 2, "timed_out": 1}
