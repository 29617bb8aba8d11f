"""All coordinator state is in SQL: a restart mid-run loses nothing."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from nodeclient.coordinator.app import create_app
from nodeclient.coordinator.service import UNSTORED_SEQS
from nodeclient.errors import UsageError
from tests.coordinator.conftest import (
    START,
    ManualClock,
    config_for,
    inference_payload,
    inference_result,
    make_node,
    start,
    stop,
)

VALUES = [7.0, 8.0]


def test_restart_keeps_nodes_jobs_leases_and_last_seq(tmp_path: Path, rsa_keys) -> None:
    """After a restart on the same SQLite file: nodes and jobs are listed, the lease is
    kept, welcome reports the persisted last_seq plus UNSTORED_SEQS, an old seq is still
    refused as replayed, and the result of the pre-restart dispatch is accepted."""
    clock = ManualClock(START)
    config = config_for(data_dir=tmp_path)
    running, server, thread = start(config, clock)
    node = make_node(rsa_keys, 0)
    try:
        running.register(node)
        running.link(node)
        node.call(node.heartbeat(seq=3))
        payload = inference_payload(VALUES)
        job = running.client.submit_job("ai.inference", payload)
        dispatch = node.recv()
    finally:
        stop(running, server, thread)

    clock.advance(5)
    again, server2, thread2 = start(config, clock)
    try:
        assert [n["node_id"] for n in again.client.nodes()] == [node.node_id]
        task = again.client.job(job["job_id"])["tasks"][0]
        assert (task["status"], task["node_id"]) == ("leased", node.node_id)
        welcome = again.link(node)  # seqs up to 16 above the stored one may have been acked
        assert welcome["last_seq"] == 3 + UNSTORED_SEQS
        for seq in (3, 3 + UNSTORED_SEQS):
            replay = node.call(node.heartbeat(seq=seq))
            assert (replay["type"], replay["code"]) == ("error", "replayed")
        assert node.call(node.heartbeat(seq=4 + UNSTORED_SEQS))["type"] == "heartbeat_ack"
        ack = node.call(node.result(dispatch, inference_result(payload, VALUES)))
        assert ack["status"] == "accepted"
        assert again.wait_job(job["job_id"], "succeeded")["status"] == "succeeded"
    finally:
        stop(again, server2, thread2)


def test_heartbeats_acknowledged_before_their_commit_stay_refused_after_a_crash(
    tmp_path: Path, rsa_keys, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Heartbeats near the stored seq are acknowledged before their commit. Here no commit
    ever lands (as if the process died first): the node's first UNSTORED_SEQS heartbeats
    are acknowledged (the nodes API shows the last one's state), the next one waits for
    its commit and its link closes 1011 when that fails. The coordinator started again
    refuses every seq it acknowledged, though none was stored."""
    import logging

    from sqlalchemy.exc import OperationalError
    from websockets.exceptions import ConnectionClosed

    from nodeclient.coordinator import service

    def lost(_conn: object, *, batch: object) -> None:
        raise OperationalError("UPDATE nodes", {}, Exception("disk I/O error"))

    clock = ManualClock(START)
    config = config_for(data_dir=tmp_path)
    running, server, thread = start(config, clock)
    node = make_node(rsa_keys, 0)
    try:
        running.register(node)
        running.link(node)
        monkeypatch.setattr(service, "_write_heartbeats", lost)
        with caplog.at_level(logging.ERROR, logger="nodeclient.coordinator"):
            for seq in range(1, UNSTORED_SEQS + 1):
                ack = node.call(node.heartbeat(seq=seq, state="EXECUTING"))
                assert (ack["type"], ack["seq"]) == ("heartbeat_ack", seq)
            shown = running.client.node(node.node_id)
            assert (shown["state"], shown["last_seen"]) == ("EXECUTING", START)
            node.send(node.heartbeat(seq=UNSTORED_SEQS + 1))
            with pytest.raises(ConnectionClosed) as closed:
                node.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
        assert any(r.msg == "heartbeat.store_failed" for r in caplog.records)
    finally:
        stop(running, server, thread)
    monkeypatch.undo()

    again, server2, thread2 = start(config, clock)
    try:
        assert again.client.node(node.node_id)["state"] is None  # nothing was stored
        assert again.link(node)["last_seq"] == UNSTORED_SEQS
        replay = node.call(node.heartbeat(seq=UNSTORED_SEQS))
        assert (replay["type"], replay["code"]) == ("error", "replayed")
        assert node.call(node.heartbeat(seq=UNSTORED_SEQS + 1))["type"] == "heartbeat_ack"
    finally:
        stop(again, server2, thread2)


def test_generated_coordinator_id_is_persisted(tmp_path: Path) -> None:
    """Without --coordinator-id, the first start stores coordinator-<8 hex> and keeps it."""
    config = config_for(data_dir=tmp_path, coordinator_id=None)
    first, server, thread = start(config, ManualClock(START))
    ident = first.client.health()["coordinator_id"]
    stop(first, server, thread)
    assert re.fullmatch(r"coordinator-[0-9a-f]{8}", ident)
    second, server2, thread2 = start(config, ManualClock(START))
    try:
        assert second.client.health()["coordinator_id"] == ident
    finally:
        stop(second, server2, thread2)


def test_a_restart_with_another_chain_id_is_refused(tmp_path: Path) -> None:
    """The signatures a database holds were made for its chain's EIP-712 domain, and the
    jobs API rebuilds each task's typed_data with the coordinator's chain id: a restart on
    the same database with another chain id would make every stored result fail to
    verify, so it is refused (a UsageError: `serve` prints it as one line, exit 2), and the
    database is let go; the same chain id starts as before."""
    config = config_for(data_dir=tmp_path, chain_id=31337)
    create_app(config, clock=ManualClock(START)).state.coordinator.db.close()
    other = dataclasses.replace(config, chain_id=1)
    with pytest.raises(UsageError, match="holds signatures made for chain_id 31337, and --chain"):
        create_app(other, clock=ManualClock(START))
    create_app(config, clock=ManualClock(START)).state.coordinator.db.close()


def test_a_second_coordinator_on_the_same_database_is_refused(tmp_path: Path) -> None:
    """One coordinator per database: a second would keep its own view of heartbeats,
    links and nodes and lease the same tasks. Its start is refused with a line that says
    what to do, and the database can be opened again once the first has closed it (on
    the suite's database URL when one is given, so PostgreSQL's lock is checked too)."""
    import os
    import subprocess
    import sys

    import pytest

    from nodeclient.coordinator.store import Database, DatabaseInUse
    from tests.coordinator.conftest import DB_URL

    url = DB_URL or f"sqlite:///{tmp_path / 'coordinator.db'}"
    first = Database(url)
    try:
        with pytest.raises(DatabaseInUse, match="another coordinator is using the database"):
            Database(url)
        served = subprocess.run(
            [sys.executable, "-m", "nodeclient.coordinator.cli", "serve", "--port", "0",
             "--data-dir", str(tmp_path), "--db", url],
            capture_output=True, text=True, timeout=60, check=False,
            env={**os.environ, "NODECLIENT_LOG_FORMAT": "text"},
        )  # fmt: skip
        assert served.returncode == 2, served.stderr
        assert "another coordinator is using the database" in served.stderr
        assert "Traceback" not in served.stderr
    finally:
        first.close()
    Database(url).close()


def test_sqlite_commits_are_durable_but_heartbeats_are_cheap(tmp_path: Path) -> None:
    """An answered commit (an accepted result, a submitted job) must survive a power
    loss: synchronous=FULL. The heartbeat connection alone keeps NORMAL (a power loss
    may take back its last seqs, never corrupt the file)."""
    import asyncio

    import pytest
    from sqlalchemy import text

    from nodeclient.coordinator.store import Database

    db = Database(f"sqlite:///{tmp_path / 'c.db'}")
    try:
        assert db.run_sync(lambda s: s.execute(text("PRAGMA synchronous")).scalar()) == 2
        level = asyncio.run(
            db.run_heartbeats(lambda conn: conn.exec_driver_sql("PRAGMA synchronous").scalar())
        )
        assert level == 1
        assert db.run_sync(lambda s: s.execute(text("PRAGMA synchronous")).scalar()) == 2

        def fails(conn: object) -> None:
            raise RuntimeError("a heartbeat commit that failed")

        with pytest.raises(RuntimeError):  # its connection is dropped, never pooled
            asyncio.run(db.run_heartbeats(fails))
        assert asyncio.run(db.run(lambda s: s.execute(text("PRAGMA synchronous")).scalar())) == 2
        assert db.run_sync(lambda s: s.execute(text("PRAGMA synchronous")).scalar()) == 2
    finally:
        db.close()


def test_leases_that_ran_out_while_the_coordinator_was_down_wait_for_their_nodes(
    tmp_path: Path, rsa_keys
) -> None:
    """The coordinator is down longer than a lease had left (an upgrade, a reboot). At its
    start the lease is not expired at once, before any node could link: its node links
    again within the grace and delivers what it finished meanwhile, which is accepted
    (with one attempt allowed, an expiry would have failed the job). After the grace a
    lease that ran out meanwhile expires as usual."""
    import time

    from nodeclient.coordinator.scheduler import START_GRACE_S

    clock = ManualClock(START)
    config = config_for(data_dir=tmp_path, max_attempts=1, heartbeat_interval=1000.0)
    running, server, thread = start(config, clock)
    node = make_node(rsa_keys, 0)
    payload = inference_payload(VALUES)
    try:
        running.register(node)
        running.link(node)
        job = running.client.submit_job("ai.inference", payload)
        dispatch = node.recv()
        other = running.client.submit_job("ai.inference", payload)  # queued: one slot
        finished = node.result(dispatch, inference_result(payload, VALUES))
    finally:
        stop(running, server, thread)
    clock.advance(config.lease_seconds + 1)  # down past the lease's deadline
    running, server, thread = start(config, clock)
    try:
        time.sleep(0.3)  # scheduling rounds run meanwhile
        assert running.client.job(job["job_id"])["status"] == "running"
        running.link(node)
        assert node.call(finished)["status"] == "accepted"
        assert running.wait_job(job["job_id"], "succeeded")["status"] == "succeeded"
        second = node.recv()  # the queued job's task, now that the slot is free
        assert second["job_id"] == other["job_id"]
        clock.advance(config.lease_seconds + START_GRACE_S)  # its node never answers
        failed = running.wait_job(other["job_id"], "failed")
        assert "lease expired" in failed["reason"], failed
    finally:
        stop(running, server, thread)


def test_a_stop_while_a_round_is_sealed_undoes_its_leases(
    tmp_path: Path, rsa_keys, monkeypatch
) -> None:
    """The coordinator stops (SIGTERM) while a round's payloads are being sealed: nothing
    was sent, so the leases are undone as undelivered (no attempt spent) before the
    database closes, rather than left to run out after the next start and count as the
    node's failure."""
    import time

    from nodeclient.coordinator import scheduler as sch
    from nodeclient.coordinator.store import Database

    real = sch._seal_all

    def slow(jobs):  # a payload of tens of MiB takes this long to seal
        time.sleep(1.0)
        return real(jobs)

    monkeypatch.setattr(sch, "_seal_all", slow)
    clock = ManualClock(START)
    config = config_for(data_dir=tmp_path)
    running, server, thread = start(config, clock)
    node = make_node(rsa_keys, 0)
    try:
        running.register(node)
        running.link(node)
        job = running.client.submit_job("ai.inference", inference_payload(VALUES))
        end = time.monotonic() + 10
        while running.client.job(job["job_id"])["tasks"][0]["status"] != "leased":
            assert time.monotonic() < end
            time.sleep(0.02)
    finally:
        stop(running, server, thread)  # while the round is still being sealed
    db = Database(config.database_url)
    try:
        from nodeclient.coordinator import models as m

        rows = db.run_sync(
            lambda s: [
                (t.status, t.attempts, [a.outcome for a in s.query(m.TaskAttempt).all()])
                for t in s.query(m.Task).all()
            ]
        )
    finally:
        db.close()
    assert rows == [("queued", 0, ["undelivered"])]
