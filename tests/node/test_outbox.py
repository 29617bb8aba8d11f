"""The outbox: what is signed is recorded with it, survives reopening, and is never replaced."""

from __future__ import annotations

import logging
import sqlite3
import stat
import uuid

import pytest

from nodeclient.node.outbox import INLINE_MAX, Outbox, OutboxBusy, OutboxCorrupt, read_history


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
    """The database runs in WAL mode with synchronous=FULL (2 in SQLite's numbering)."""
    box = Outbox(tmp_path / "o.db")
    assert box._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert box._db.execute("PRAGMA synchronous").fetchone()[0] == 2
    t = uuid.uuid4()
    commit(box, t, b"res")
    box.mark_acked(t, status="accepted", reason="", at=3.0)  # acks skip their own fsync...
    assert box._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # ...results never do


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
    box.close()  # a file the failed commit placed is an orphan, gone at the next open
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
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("nodeclient.node.outbox")
    logger.addHandler(handler)  # the project's logging may not propagate to pytest's
    try:
        assert [e.task_id for e in box.pending()] == [fine]
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["outbox.result_lost"]
    assert box.backlog() == 1 and box.counts()["failed"] == 1
    assert [e.task_id for e in box.pending()] == [fine]  # once: it is closed now
    assert box.get(lost).ack_status == "lost" and not box.get(lost).held
    truncated = uuid.uuid4()
    commit(box, truncated, big(6))
    (box.files / f"{truncated}.result").write_bytes(big(6)[:-1])
    with pytest.raises(OutboxCorrupt, match="not 65537"):
        box.get(truncated)


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
    assert {"result_file", "held"} <= columns


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
