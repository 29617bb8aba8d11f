"""The outbox: what is signed is recorded with it, survives reopening, and is never replaced."""

from __future__ import annotations

import uuid

import pytest

from nodeclient.node.outbox import Outbox


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
