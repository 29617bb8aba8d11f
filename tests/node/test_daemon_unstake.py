"""An unstake the coordinator confirmed outlives a daemon restart (2.3.8 UNSTAKING).

The daemon keeps the confirmed end of the cooldown in its outbox database, so that a
daemon restarted during the cooldown is UNSTAKING, takes no work and shows the countdown
from its start, not only once it has linked again.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path

import pytest

from nodeclient.node.daemon import NodeDaemon
from nodeclient.node.outbox import Outbox
from nodeclient.protocol import messages
from nodeclient.protocol.states import NodeState
from tests.node.test_daemon_outbox import make_daemon
from tests.node.test_daemon_rejects import assert_refuses, dispatch, later


def _welcome(daemon: NodeDaemon, coordinator_id: str, until: int | None) -> None:
    """What the link does with a welcome (LinkClient._link_once)."""
    daemon.session.coordinator_id = coordinator_id
    daemon.session.on_welcome(messages.Welcome(daemon.node_id, 0, until))
    daemon._apply_unstaking(welcome=True)


def _restarted(daemon: NodeDaemon, home: Path) -> NodeDaemon:
    """The same node on the same home, as after a restart: its outbox opened again."""
    daemon.outbox.close()
    again, _, _ = make_daemon(home)
    again.outbox.close()
    again.outbox = Outbox(home / "outbox.db")
    return again


def test_a_restarted_daemon_is_unstaking_before_it_links(tmp_path: Path) -> None:
    """Linked, a welcome confirms the unstake; a daemon started again on the home (the
    coordinator unreachable) is UNSTAKING with the countdown at once, and refuses work."""
    daemon, _, _ = make_daemon(tmp_path)
    until = int(time.time()) + 4 * 86400
    _welcome(daemon, "coordinator-1", until)
    assert daemon.state.state is NodeState.UNSTAKING

    again = _restarted(daemon, tmp_path)
    assert again.state.state is NodeState.READY  # nothing read before run()

    async def started() -> dict[str, object]:
        run = asyncio.create_task(again.run())  # its coordinator (port 9) never answers
        try:
            for _ in range(200):
                await asyncio.sleep(0.02)
                if again.state.state is NodeState.UNSTAKING:
                    break
            st = again.status()
            task_id, lease = uuid.uuid4(), later()
            await again._on_frame(dispatch(again, task_id, lease))
            (refused,) = again._ws.frames  # type: ignore[union-attr]
            assert_refuses(refused, again, task_id, lease, "node is UNSTAKING")
            return st
        finally:
            again.request_stop()
            await asyncio.wait_for(run, 30)

    st = asyncio.run(started())
    assert st["state"] == "UNSTAKING"
    assert st["link"]["status"] != "up"  # type: ignore[index]
    assert st["unstaking_until"] == until
    assert 4 * 86400 - 60 <= st["unstake_remaining_s"] <= 4 * 86400  # type: ignore[operator]
    assert abs(st["state_since"] - (until - 7 * 86400)) < 5  # type: ignore[operator]


def test_the_record_is_written_once_and_kept_per_coordinator_url(tmp_path: Path) -> None:
    """Heartbeat acks repeat the same end: it is written once. Another coordinator URL
    (the home pointed elsewhere) starts READY."""
    daemon, _, _ = make_daemon(tmp_path)
    until = int(time.time()) + 86400
    _welcome(daemon, "coordinator-1", until)
    writes = []
    daemon.outbox.record_unstake = lambda *a: writes.append(a)  # type: ignore[method-assign]
    for seq in (1, 2, 3):
        daemon.session.on_heartbeat_ack(messages.HeartbeatAck(seq, time.time(), until))
        daemon._apply_unstaking()
    assert writes == []
    assert daemon.outbox.unstake(daemon.url) == ("coordinator-1", until)
    assert daemon.outbox.unstake("http://elsewhere:8000") is None

    elsewhere = _restarted(daemon, tmp_path)
    elsewhere.url = "http://elsewhere:8000"
    elsewhere.restore_unstake()
    assert elsewhere.state.state is NodeState.READY


def test_a_coordinator_with_no_unstake_on_record_drops_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Restored from the record, then linked to a coordinator that has no unstake on
    record for the node (its database restored from before it): the daemon stays
    UNSTAKING (terminal) and says so, and the next start takes work again."""
    daemon, _, _ = make_daemon(tmp_path)
    _welcome(daemon, "coordinator-1", int(time.time()) + 86400)
    again = _restarted(daemon, tmp_path)
    again.restore_unstake()
    assert again.state.state is NodeState.UNSTAKING
    with caplog.at_level(logging.WARNING, logger="nodeclient.node"):
        _welcome(again, "coordinator-1", None)
    assert again.state.state is NodeState.UNSTAKING
    (warning,) = [r for r in caplog.records if r.msg == "unstake.not_on_record"]
    assert "until it is restarted" in warning.hint  # type: ignore[attr-defined]
    assert again.outbox.unstake(again.url) is None

    third = _restarted(again, tmp_path)
    third.restore_unstake()
    assert third.state.state is NodeState.READY
    assert third.state.accepts_dispatch()
