"""The outbox: what is signed is recorded first, survives reopening, and is never replaced."""

from __future__ import annotations

import uuid

from nodeclient.node.outbox import Outbox


def claim(box: Outbox, task: uuid.UUID, result: bytes):
    return box.claim_signing(
        task_id=task, job_id=uuid.UUID(int=9), workload_class="ai.inference", slice_index=None,
        kind="result", result=result, proof=b"p" * 32, message={"r": result.hex()},
        received_at=1.0, completed_at=2.0,
    )  # fmt: skip


def test_first_claim_wins(tmp_path) -> None:
    """A second, different result for the same task gets the first one back."""
    box = Outbox(tmp_path / "o.db")
    t = uuid.uuid4()
    first = claim(box, t, b"one")
    second = claim(box, t, b"two")
    assert first.result == second.result == b"one"
    assert second.message == {"r": b"one".hex()}


def test_pending_until_acked_and_survives_reopen(tmp_path) -> None:
    """Signed entries stay pending across a reopen until acknowledged."""
    box = Outbox(tmp_path / "o.db")
    t = uuid.uuid4()
    claim(box, t, b"res")
    box.record_signed(t, b"s" * 65)
    box.record_signed(t, b"x" * 65)  # a second signature never replaces the first
    box.close()
    box = Outbox(tmp_path / "o.db")
    (entry,) = box.pending()
    assert entry.signature == b"s" * 65
    assert box.backlog() == 1
    box.mark_acked(t, status="accepted", reason="", at=3.0)
    assert box.pending() == []
    assert box.counts()["completed"] == 1


def test_wal_and_full_sync(tmp_path) -> None:
    """The database runs in WAL mode with synchronous=FULL (2 in SQLite's numbering)."""
    box = Outbox(tmp_path / "o.db")
    assert box._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert box._db.execute("PRAGMA synchronous").fetchone()[0] == 2
