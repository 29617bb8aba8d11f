"""Retention against damage and stops: a row prune cannot read is left and named, not a
reason to prune nothing; a stop ends a long prune between two batches."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path

from nodeclient.node import outbox
from nodeclient.node.outbox import Outbox
from tests.node.test_outbox import big, commit, damage


def held_in_db(path: Path) -> tuple[int, int, int]:
    """Rows still holding an acknowledged result, their bytes, and stored small results."""
    db = sqlite3.connect(path)
    try:
        (rows, size) = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(result_size), 0) FROM outbox "
            "WHERE held = 1 AND acked_at IS NOT NULL"
        ).fetchone()
        (stored,) = db.execute("SELECT COUNT(*) FROM outbox_results").fetchone()
    finally:
        db.close()
    return rows, size, stored


def held_ids(path: Path) -> set[uuid.UUID]:
    db = sqlite3.connect(path)
    try:
        rows = db.execute("SELECT task_id FROM outbox WHERE held = 1 AND acked_at IS NOT NULL")
        return {uuid.UUID(t) for (t,) in rows}
    finally:
        db.close()


def test_rows_prune_cannot_read_are_left_and_named_and_the_rest_pruned(tmp_path) -> None:
    """A row whose acked_at or result_size is not a number, or whose result_file is not a
    string, raised TypeError out of prune, which pruned nothing, then or ever after. Now
    such a row is left as it is (result kept) and described in *damaged*, as history
    describes a row it cannot decode; a file name that leads out of the results directory
    is never removed; every other due result is dropped, and held_bytes counts only what
    prune can drop, after reopening too."""
    path = tmp_path / "o.db"
    box = Outbox(path)
    good = [uuid.uuid4() for _ in range(3)]
    bad_time, bad_size, blob_name, outside, lost_blob = (uuid.uuid4() for _ in range(5))
    for t in (*good, bad_time, bad_size, outside):
        commit(box, t, b"r" * 10)
    commit(box, blob_name, big(1))
    commit(box, lost_blob, big(2))
    for i, t in enumerate((*good, bad_time, bad_size, blob_name, outside)):
        box.mark_acked(t, status="accepted", reason="", at=10.0 + i)
    box.close()
    victim = tmp_path / "victim"
    victim.write_bytes(b"not the outbox's")
    damage(path, bad_time, "acked_at", "garbage")
    damage(path, bad_size, "result_size", "ten")
    damage(path, blob_name, "result_file", f"{blob_name}.result".encode())
    damage(path, outside, "result_file", "../victim")
    damage(path, lost_blob, "ack_status", "lost")
    damage(path, lost_blob, "acked_at", 5.0)
    damage(path, lost_blob, "held", 0)
    damage(path, lost_blob, "result_file", b"\x00")
    box = Outbox(path)
    assert box.held_bytes() == 3 * 10  # the good ones: the damaged are not prune's to drop
    damaged: list[str] = []
    assert box.prune(acked_before=1e12, keep_bytes=0, damaged=damaged) == 3
    assert victim.read_bytes() == b"not the outbox's"
    assert held_ids(path) == {bad_time, bad_size, blob_name, outside}  # results kept
    assert box.held_bytes() == 0
    assert len(damaged) == 5 and all("the row of task" in d for d in damaged)
    for t in (bad_time, bad_size, blob_name, outside, lost_blob):
        assert sum(str(t) in d for d in damaged) == 1
    assert any("acked_at is text, not a number" in d for d in damaged)
    assert any("result_size is text, not an integer" in d for d in damaged)
    assert sum("result_file is not a result file's name" in d for d in damaged) == 3
    again: list[str] = []
    assert box.prune(acked_before=1e12, keep_bytes=0, damaged=again) == 0
    assert sorted(again) == sorted(damaged)  # named at every prune while they are there
    box.close()
    assert Outbox(path).held_bytes() == 0


def test_an_ack_of_a_row_with_a_damaged_size_is_recorded(tmp_path) -> None:
    """mark_acked added a row's result_size to held_bytes: a size that is not a number
    raised TypeError there, after the acknowledgement had been written. It is recorded,
    counted, and left out of the bytes that prune can drop."""
    path = tmp_path / "o.db"
    box = Outbox(path)
    t, fine = uuid.uuid4(), uuid.uuid4()
    commit(box, t, b"r")
    commit(box, fine, b"rr")
    box.close()
    damage(path, t, "result_size", "one")
    box = Outbox(path)
    box.mark_acked(t, status="accepted", reason="", at=1.0)
    box.mark_acked(fine, status="accepted", reason="", at=2.0)
    assert box.backlog() == 0 and box.counts()["completed"] == 2
    assert box.held_bytes() == 2
    damaged: list[str] = []
    assert box.prune(acked_before=10.0, keep_bytes=0, damaged=damaged) == 1
    assert len(damaged) == 1 and str(t) in damaged[0]


def test_forget_names_rows_it_cannot_date_and_forgets_the_others(tmp_path) -> None:
    """A pruned row whose acked_at is not a number is never forgotten (it cannot be
    dated): forget names it in *damaged* and deletes the other old rows."""
    path = tmp_path / "o.db"
    box = Outbox(path)
    rows = [uuid.uuid4() for _ in range(4)]
    for t in rows:
        commit(box, t, b"r")
        box.mark_acked(t, status="accepted", reason="", at=10.0)
    assert box.prune(acked_before=20.0, keep_bytes=0) == 4
    box.close()
    damage(path, rows[0], "acked_at", b"\xff")
    box = Outbox(path)
    damaged: list[str] = []
    assert box.forget(acked_before=20.0, damaged=damaged) == 3
    assert damaged == [f"the row of task {str(rows[0])!r} (acked_at is blob, not a number)"]
    assert [e.task_id for e in box.history(damaged=[])] == [rows[0]]


class StopsAfter(threading.Event):
    """A stop signal that is set at its *n*+1th look: a stop at a known batch boundary."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.left = n

    def is_set(self) -> bool:
        if self.left == 0:
            self.set()
        self.left -= 1
        return super().is_set()


def fill_due(path: Path, n: int) -> None:
    """*n* acknowledged small results, all due, as a release that kept every result left
    them: written at once, the outbox closed."""
    Outbox(path).close()
    db = sqlite3.connect(path)
    rows = [
        (str(uuid.uuid4()), str(uuid.uuid4()), "ai.inference", None, "result", 100, b"p",
         json.dumps({}), b"s", 1.0 + i, 1.0 + i, 1.0 + i, "accepted", "", 1, "c1")
        for i in range(n)
    ]  # fmt: skip
    db.executemany(
        "INSERT INTO outbox (task_id, job_id, workload_class, slice_index, kind, result_size, "
        "proof, message, signature, received_at, completed_at, acked_at, ack_status, "
        "ack_reason, held, coordinator_id) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        rows,
    )
    db.executemany(
        "INSERT INTO outbox_results (task_id, data) VALUES (?, ?)",
        [(r[0], b"x" * 100) for r in rows],
    )
    db.commit()
    db.close()


def test_a_stop_ends_a_long_prune_between_batches_and_the_next_one_finishes(
    tmp_path,
) -> None:
    """A prune of tens of thousands of due rows (the first start after retention was
    lowered) ran every batch before returning, and a stop had to wait for all of them.
    Set, the stop signal ends prune and forget before their next batch; every batch done
    is whole (rows, stored results and held_bytes agree), and the next call does the
    rest."""
    path = tmp_path / "o.db"
    n = 20_000
    fill_due(path, n)
    box = Outbox(path)
    assert box.held_bytes() == n * 100
    batches = 3
    dropped = box.prune(acked_before=1e12, keep_bytes=0, stop=StopsAfter(batches))
    assert dropped == batches * outbox._PRUNE_BATCH
    left = n - dropped
    assert held_in_db(path) == (left, left * 100, left)
    assert box.held_bytes() == left * 100
    assert box.forget(acked_before=1e12, stop=StopsAfter(1)) == outbox._PRUNE_BATCH
    assert box.prune(acked_before=1e12, keep_bytes=0) == left
    assert held_in_db(path) == (0, 0, 0) and box.held_bytes() == 0
    assert box.forget(acked_before=1e12) == n - outbox._PRUNE_BATCH
    assert box.counts()["completed"] == n  # the forgotten are still counted
    box.close()
    assert Outbox(path).held_bytes() == 0


def test_a_stop_set_from_another_thread_ends_a_prune_under_way(tmp_path) -> None:
    """The daemon sets the stop from the event loop while prune runs in a thread: prune
    returns after the batch it is in, well before the end of the work."""
    path = tmp_path / "o.db"
    n = 20_000
    fill_due(path, n)
    box = Outbox(path)
    stop, done = threading.Event(), []
    worker = threading.Thread(
        target=lambda: done.append(box.prune(acked_before=1e12, keep_bytes=0, stop=stop))
    )
    worker.start()
    while box.held_bytes() == n * 100 and worker.is_alive():  # until a first batch is done
        time.sleep(0.001)
    stop.set()
    worker.join()
    (dropped,) = done
    assert 0 < dropped < n
    assert held_in_db(path) == (n - dropped, box.held_bytes(), n - dropped)


def test_forget_keeps_at_most_max_rows_oldest_answered_first(tmp_path) -> None:
    """A busy node's 180 days of history rows (about 1 KB each) would be many gigabytes:
    with max_rows, the oldest answered rows whose results are gone go while the outbox
    holds more rows than that, whatever their age. Rows still holding a result, or not
    yet answered, are never among them, and the totals keep counting what went."""
    box = Outbox(tmp_path / "o.db")
    answered = [uuid.uuid4() for _ in range(6)]
    for i, t in enumerate(answered):
        commit(box, t, b"r")
        box.mark_acked(t, status="accepted", reason="", at=100.0 + i)
    assert box.prune(acked_before=1e9, keep_bytes=0) == 6  # their results are gone
    held, waiting = uuid.uuid4(), uuid.uuid4()
    commit(box, held, b"r")
    box.mark_acked(held, status="accepted", reason="", at=50.0)  # older, result still held
    commit(box, waiting, b"r")  # never answered
    assert box.forget(acked_before=0.0, max_rows=5) == 3  # 8 rows: the 3 oldest forgettable go
    left = {e.task_id for e in box.history()}
    assert left == {*answered[3:], held, waiting}
    assert box.counts()["completed"] == 7
    assert box.forget(acked_before=0.0, max_rows=5) == 0  # at the cap: nothing more
    assert box.forget(acked_before=0.0, max_rows=0) == 0  # no cap, nothing old enough
    box.close()
    # Rows whose answer time is damaged (text) are never forgotten, and take nothing from
    # the cap's work on the others (they sort after every number).
    damage(tmp_path / "o.db", answered[3], "acked_at", "garbled")
    damage(tmp_path / "o.db", answered[4], "acked_at", "garbled")
    box = Outbox(tmp_path / "o.db")
    assert box.forget(acked_before=0.0, max_rows=3) == 1  # 5 rows: the one numeric one
    assert {e.task_id for e in box.history(damaged=[])} == {*answered[3:5], held, waiting}
    box.close()
