"""A node that unstakes while a scheduling round is under way gets no dispatch from it, nor
does a node whose own heartbeats say it is UNSTAKING."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from nodeclient.coordinator import models as m
from nodeclient.coordinator.placement import assign_tx
from nodeclient.coordinator.scheduler import Scheduler
from nodeclient.coordinator.store import Database
from nodeclient.protocol.secp import Secp256k1Key
from tests.coordinator.conftest import Running, inference_payload, make_node
from tests.coordinator.test_queue_rules import NOW, add_job, node


def test_a_node_that_unstaked_during_the_round_gets_no_dispatch(db: Database) -> None:
    """The round read the roster before the node's unstake was recorded: its lease is
    undone without spending an attempt (the node would refuse it, signed, and the refusal
    would count), and the task is queued for another node; the other node's is sent."""
    leaving, staying = Secp256k1Key.generate().address, Secp256k1Key.generate().address
    public_key = rsa.generate_private_key(public_exponent=65537, key_size=3072).public_key()
    _, (first,) = db.run_sync(lambda s: add_job(s, tasks=1))
    placed = db.run_sync(lambda s: assign_tx(s, [node(leaving)], now=NOW, lease_seconds=300))
    _, (second,) = db.run_sync(lambda s: add_job(s, tasks=1, queued_at=NOW + 1))
    placed += db.run_sync(lambda s: assign_tx(s, [node(staying)], now=NOW, lease_seconds=300))
    assert [(a.task_id, a.node_id) for a in placed] == [(first, leaving), (second, staying)]
    sent: list[tuple[str, str]] = []

    async def send_to(node_id: str, frame: dict) -> bool:
        sent.append((node_id, frame["task_id"]))
        return True

    nodes = {
        leaving: SimpleNamespace(public_key=public_key, unstaking_until=int(NOW) + 7 * 86400),
        staying: SimpleNamespace(public_key=public_key, unstaking_until=None),
    }
    coord = SimpleNamespace(
        db=db, nodes=nodes, send_to=send_to, now=lambda: NOW, wake=lambda: None, withdrawn={},
        in_node_cpu=asyncio.to_thread,
    )  # fmt: skip
    asyncio.run(Scheduler.dispatch_all(SimpleNamespace(coord=coord), placed))  # type: ignore[arg-type]
    assert sent == [(staying, second)]
    task = db.run_sync(lambda s: s.get_one(m.Task, first))
    assert (task.status, task.node_id, task.attempts) == (m.QUEUED, None, 0)
    assert db.run_sync(lambda s: s.get_one(m.Task, second).status) == m.LEASED


def test_a_round_whose_sealing_fails_is_undone_not_left_leased(
    db: Database, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Sealing breaks (a bug, a key the library refuses): nothing is sent, and the round's
    leases are undone for free. Before, they stayed leased until their leases ended and
    then counted as the nodes' failures, spending attempts."""
    from nodeclient.coordinator import scheduler as scheduler_mod

    address = Secp256k1Key.generate().address
    _, (task_id,) = db.run_sync(lambda s: add_job(s, tasks=1))
    placed = db.run_sync(lambda s: assign_tx(s, [node(address)], now=NOW, lease_seconds=300))
    assert len(placed) == 1

    def broken(_jobs: object) -> list[bytes]:
        raise ValueError("a key the library refuses")

    monkeypatch.setattr(scheduler_mod, "_seal_all", broken)
    sent: list[str] = []

    async def send_to(node_id: str, frame: dict) -> bool:
        sent.append(node_id)
        return True

    nodes = {address: SimpleNamespace(public_key=None, unstaking_until=None)}
    coord = SimpleNamespace(
        db=db, nodes=nodes, send_to=send_to, now=lambda: NOW, wake=lambda: None, withdrawn={},
        in_node_cpu=asyncio.to_thread,
    )  # fmt: skip
    with caplog.at_level(logging.ERROR, logger="nodeclient.coordinator.scheduler"):
        asyncio.run(Scheduler.dispatch_all(SimpleNamespace(coord=coord), placed))  # type: ignore[arg-type]
    assert sent == []
    task = db.run_sync(lambda s: s.get_one(m.Task, task_id))
    assert (task.status, task.node_id, task.attempts) == (m.QUEUED, None, 0)
    assert [r.getMessage() for r in caplog.records] == ["dispatch.failed"]
    assert str(caplog.records[0].exc_info[1]) == "a key the library refuses"  # that failure


def test_a_node_whose_loss_could_not_be_recorded_is_checked_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Re-queuing a silent node's leases fails (the database): the node is not left
    marked offline with its leases held, but found silent again at the next tick."""
    from nodeclient.coordinator import scheduler as scheduler_mod

    calls: list[str] = []

    async def run(fn: object) -> list[object]:
        calls.append("run")
        if len(calls) == 1:
            raise RuntimeError("database is locked")
        return []

    rt = SimpleNamespace(online=True, last_seen=NOW - 1000, beat=NOW - 1000)
    coord = SimpleNamespace(
        monotonic=lambda: NOW,
        config=SimpleNamespace(offline_after=90.0, max_attempts=3, heartbeat_interval=30.0),
        runtime={"0xA": rt},
        links={},
        db=SimpleNamespace(run=run),
        roster_changed=lambda: None,
        wake=lambda: None,
    )
    scheduler = SimpleNamespace(coord=coord, _report_lost=lambda lost, event: None)
    with pytest.raises(RuntimeError, match="database is locked"):
        asyncio.run(scheduler_mod.Scheduler.check_offline(scheduler, NOW))  # type: ignore[arg-type]
    assert rt.online is True
    asyncio.run(scheduler_mod.Scheduler.check_offline(scheduler, NOW))  # type: ignore[arg-type]
    assert rt.online is False and calls == ["run", "run"]


def test_a_node_whose_heartbeats_say_unstaking_gets_no_dispatch(
    coordinator: Running, rsa_keys
) -> None:
    """The node says UNSTAKING though this coordinator holds no unstake for it (its
    database restored from before the node's Unstake): the node would refuse every
    dispatch, each refusal an attempt spent, and fail a job alone. It gets none while its
    heartbeats say so; a heartbeat saying otherwise makes it a candidate again."""
    node = make_node(rsa_keys, 0)
    coordinator.register(node)
    coordinator.link(node)
    assert node.call(node.heartbeat(state="UNSTAKING"))["type"] == "heartbeat_ack"
    coordinator.client.submit_job("ai.inference", inference_payload([1.0]))
    with pytest.raises(TimeoutError):
        node.ws.recv(timeout=1.0)
    node.send(node.heartbeat(state="READY"))
    assert node.recv(skip=("heartbeat_ack",))["type"] == "dispatch"
