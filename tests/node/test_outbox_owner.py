"""An outbox is one node's: a node started over in the same home (new keys, the old
outbox.db kept) is stopped with the way out, instead of taking the old node's unstake,
history and unacknowledged results as its own."""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path

import pytest

from nodeclient.errors import NeedsOperator
from nodeclient.node.outbox import Outbox, OutboxOfAnotherNode
from nodeclient.protocol.secp import Secp256k1Key
from tests.node.test_cli import error_lines, home, run_node, runnable  # noqa: F401 (fixtures)
from tests.node.test_outbox import commit

OLD, NEW = Secp256k1Key.generate().address, Secp256k1Key.generate().address


def test_an_outbox_is_claimed_once_and_refused_to_another_node(tmp_path: Path) -> None:
    """The first claim records the node; the same node again (in any letter case) is
    fine, even after a reopen; another node is refused, exit 78, naming both nodes and
    how to move the outbox aside, and nothing is changed."""
    path = tmp_path / "outbox.db"
    box = Outbox(path)
    box.claim(OLD)
    box.claim(OLD.lower())
    box.close()
    box = Outbox(path)
    box.claim(OLD)
    with pytest.raises(OutboxOfAnotherNode) as refused:
        box.claim(NEW)
    box.close()
    assert isinstance(refused.value, NeedsOperator) and refused.value.exit_code == 78
    text = str(refused.value)
    assert f"the outbox of node {OLD}" in text and f"node {NEW}'s" in text
    assert f"mv {path}* " in text and "not yet acknowledged" in text
    db = sqlite3.connect(path)
    assert db.execute("SELECT node_id FROM outbox_owner").fetchall() == [(OLD,)]
    db.close()


def test_an_outbox_from_before_owners_is_its_latest_signers(tmp_path: Path) -> None:
    """An outbox written before owners were recorded belongs to the node its latest
    signed message names: another node is refused; that node claims it."""
    path = tmp_path / "outbox.db"
    box = Outbox(path)
    box.commit_result(
        task_id=uuid.uuid4(), job_id=uuid.uuid4(), workload_class="ai.inference",
        slice_index=None, kind="result", result=b"r", proof=b"p" * 32,
        message={"node_id": OLD, "task_id": "0x00"}, received_at=1.0, completed_at=2.0,
        sign=lambda m: b"s" * 65,
    )  # fmt: skip
    box.close()
    box = Outbox(path)
    with pytest.raises(OutboxOfAnotherNode):
        box.claim(NEW)
    box.claim(OLD)
    box.close()


def test_an_outbox_from_before_owners_whose_rows_name_no_node_is_claimed(
    tmp_path: Path,
) -> None:
    """Rows that name no node (or cannot be read) leave the claim to the node starting,
    whose it is from then on: another node is refused."""
    path = tmp_path / "outbox.db"
    box = Outbox(path)
    commit(box, uuid.uuid4(), b"r")  # its message: {"r": ...}
    box.claim(NEW)
    box.close()
    box = Outbox(path)
    with pytest.raises(OutboxOfAnotherNode):
        box.claim(OLD)
    box.close()


def test_run_in_a_home_started_over_with_the_old_outbox_is_exit_78(runnable: Path) -> None:  # noqa: F811
    """`nodeclient run` with new keys in a home whose outbox is another node's: one line
    saying to move the outbox aside and keep it, exit 78 (not restarted), the outbox kept
    and still the other node's."""
    box = Outbox(runnable / "outbox.db")
    box.claim(OLD)
    box.close()
    out = run_node(runnable)
    assert out.returncode == 78, out.stderr
    (line,) = error_lines(out.stderr)
    assert f"the outbox of node {OLD}" in line and "move that outbox aside" in line
    db = sqlite3.connect(runnable / "outbox.db")
    assert db.execute("SELECT node_id FROM outbox_owner").fetchall() == [(OLD,)]
    db.close()
