"""A node's signed manifests are published (GET /v1/manifests/{hash}), each task names the
one its node had when it was leased, and `verify` checks it: what a node claimed stays
checkable after the node moved on to another manifest (coordinator/audit.py)."""

from __future__ import annotations

import copy

import pytest
from sqlalchemy import select, update

from nodeclient.coordinator import audit, cli, store
from nodeclient.coordinator import models as m
from nodeclient.coordinator.config import SybilPolicy
from nodeclient.coordinator.registry import MANIFEST_GRACE_S
from nodeclient.errors import ProtocolError
from nodeclient.protocol import manifest
from tests.coordinator.conftest import (
    CHAIN,
    Running,
    audit_job,
    inference_payload,
    inference_result,
    make_node,
    run_inference_job,
)

VALUES = [1.0, 2.0]


@pytest.fixture
def running(start_coordinator) -> Running:
    return start_coordinator(heartbeat_interval=1000.0, sybil=SybilPolicy(max_nodes_per_wallet=8))


def test_a_task_names_its_nodes_manifest_of_the_day_which_stays_published(
    running: Running, rsa_keys
) -> None:
    node = make_node(rsa_keys, 0)
    running.register(node)
    running.link(node)
    first = running.client.node(node.node_id)["manifest_hash"]
    job = run_inference_job(running, node, VALUES)
    (task,) = job["tasks"]
    assert task["manifest_hash"] == first
    served = running.client.manifest(first)
    v = manifest.verify_manifest(served, chain_id=CHAIN, now=served["issued_at"])
    assert v.manifest_hash.hex() == first and v.node_id == node.node_id
    # The node registers again later (a restart, a liveness key rotation): a new manifest
    # is its current one, and the task still names, and the API still serves, the old one.
    running.clock.advance(60)
    running.register(node, max_parallel_subtasks=1, client_version="0.1.1")
    second = running.client.node(node.node_id)["manifest_hash"]
    assert second != first
    assert running.client.manifest(second)["client_version"] == "0.1.1"
    assert running.client.job(job["job_id"])["tasks"][0]["manifest_hash"] == first
    assert running.client.manifest(first) == served
    report = audit_job(running, job, chain_id=CHAIN)
    assert report.ok, report.as_json()
    assert report.tasks[0].detail == "proof, signature and its node's manifest verified"


def test_the_manifest_route_answers_clearly(running: Running) -> None:
    for asked, status in (("ABC", 400), ("0" * 63, 400), ("A" * 64, 400), ("0" * 64, 404)):
        with pytest.raises(ProtocolError, match=str(status)):
            running.client.manifest(asked)


def _lie(running: Running, rsa_keys, how: str) -> audit.JobReport:
    node = make_node(rsa_keys, 0)
    other = make_node(rsa_keys, 1)
    for n in (node, other):
        running.register(n)
    running.link(node)
    job = copy.deepcopy(run_inference_job(running, node, VALUES))
    task = job["tasks"][0]
    mine = task["manifest_hash"]
    others = running.client.node(other.node_id)["manifest_hash"]
    fetch = running.client.manifest
    if how == "malformed":
        task["manifest_hash"] = "../jobs"
    elif how == "none":  # a coordinator that names no manifest
        task["manifest_hash"] = None
    elif how == "another node's":  # names a genuine manifest, of another node
        task["manifest_hash"] = others
    elif how == "served another":  # serves another genuine manifest under this task's name
        fetch = lambda _h: running.client.manifest(others)  # noqa: E731
    elif how == "tampered":  # the node's manifest with a better tier than it signed
        forged = {**running.client.manifest(mine), "hardware_tier": 4}
        fetch = lambda _h: forged  # noqa: E731
    elif how == "tier":  # says the job asked for less than the requester did
        job["min_tier"] = 4
    elif how == "class":  # the job relabelled to a class the node does not offer
        job["workload_class"] = "media.render"
    elif how == "missing":
        fetch = lambda h: running.client.manifest("0" * 64)  # noqa: E731
    elif how == "not an object":
        fetch = lambda _h: ["a", "list"]  # noqa: E731
    return audit_job(running, job, fetch_manifest=fetch)


@pytest.mark.parametrize(
    ("how", "says"),
    [
        ("malformed", "malformed manifest_hash"),
        ("another node's", "the manifest is node"),
        ("served another", "the manifest served hashes to"),
        ("tampered", "the node's manifest does not verify: hardware_tier"),
        ("tier", "the job asked for tier 4 or above"),
        ("class", "offers ai.inference, not media.render"),
        ("missing", "its node's manifest could not be fetched"),
        ("not an object", "the node's manifest is not a JSON object"),
    ],
)
def test_a_coordinator_that_misstates_what_the_node_claimed_is_caught(
    running: Running, rsa_keys, how: str, says: str
) -> None:
    report = _lie(running, rsa_keys, how)
    (line,) = report.tasks
    assert not report.ok and line.ok is False
    assert says in line.detail, line.detail


def test_a_late_result_of_an_earlier_lease_names_that_nodes_manifest(
    running: Running, rsa_keys
) -> None:
    """Leased to A, then (A silent) to B; A's late result wins: the task names the
    manifest A had when it was leased the task, not B's, and verifies."""
    first, second = make_node(rsa_keys, 0), make_node(rsa_keys, 1)
    running.register(first)
    running.register(second)
    running.link(first)
    payload = inference_payload(VALUES)
    job = running.client.submit_job("ai.inference", payload)
    dispatch = first.recv()
    mine = running.client.node(first.node_id)["manifest_hash"]
    # B is linked before A's lease runs out: were A the only node linked then, the
    # scheduler would lease the task to A again (a tried node, if no other can take it).
    running.link(second)
    running.clock.advance(1001)  # A misses its lease
    second.recv()  # leased to B now
    assert running.client.job(job["job_id"])["tasks"][0]["node_id"] == second.node_id
    running.link(first)
    ack = first.call(first.result(dispatch, inference_result(payload, VALUES)))
    assert ack["status"] == "accepted"
    done = running.wait_job(job["job_id"], "succeeded")
    (task,) = done["tasks"]
    assert (task["node_id"], task["manifest_hash"]) == (first.node_id, mine)
    report = audit_job(running, done)
    assert report.ok, report.as_json()


def test_manifests_nothing_names_are_forgotten_after_the_grace(running: Running, rsa_keys) -> None:
    node = make_node(rsa_keys, 0)
    running.register(node)
    running.link(node)
    job = run_inference_job(running, node, VALUES)
    named = job["tasks"][0]["manifest_hash"]
    running.clock.advance(60)
    running.register(node, client_version="0.1.1")  # current; a task names the first
    running.clock.advance(60)
    running.register(node, client_version="0.1.2")  # the second: named by nothing now
    current = running.client.node(node.node_id)["manifest_hash"]
    db = running.coord.db

    def hashes() -> set[str]:
        return set(db.run_sync(lambda s: list(s.scalars(select(m.NodeManifest.manifest_hash)))))

    def forget(at: float) -> int:
        return db.run_sync(lambda s: store.forget_manifests_tx(s, replaced_before=at, limit=1))

    assert len(hashes()) == 3
    now = running.clock.now()
    assert forget(now - MANIFEST_GRACE_S) == 0  # both replaced within the hour
    while forget(now + 1):  # one a transaction: the batches go on to the end
        pass
    assert hashes() == {named, current}
    db.run_sync(lambda s: store.forget_jobs_tx(s, finished_before=now + 1))
    while forget(now + 1):
        pass
    assert hashes() == {current}
    assert running.client.node(node.node_id)["manifest_hash"] == current


def test_the_grace_runs_from_a_manifests_replacement(running: Running, rsa_keys) -> None:
    """A manifest registered days ago and replaced a moment ago stays an hour: a round
    built on the roster it was current in may still lease a task naming it."""
    node = make_node(rsa_keys, 0)
    running.register(node)
    old = running.client.node(node.node_id)["manifest_hash"]
    running.clock.advance(2 * 86400)
    running.register(node, client_version="0.1.1")
    db, now = running.coord.db, running.clock.now()

    def forget(at: float) -> int:
        return db.run_sync(lambda s: store.forget_manifests_tx(s, replaced_before=at, limit=10))

    assert forget(now - MANIFEST_GRACE_S) == 0
    assert running.client.manifest(old)["node_id"] == node.node_id
    assert forget(now + 1) == 1
    with pytest.raises(ProtocolError, match="404"):
        running.client.manifest(old)


def test_the_sweep_looks_names_up_by_index(db) -> None:
    """(SQLite's plan.) Whether a manifest is still named is an index lookup in nodes,
    tasks and task_attempts: with a scan of nodes per manifest (nodes.manifest_hash was
    not indexed) the sweep held the database thread for seconds at 3,000 nodes."""
    sql = store.unnamed_manifests(0.0).compile(
        dialect=db.engine.dialect, compile_kwargs={"literal_binds": True}
    )
    with db.engine.connect() as conn:
        plan = [row[-1] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}")]
    scans = [step for step in plan if step.startswith("SCAN") and "node_manifests" not in step]
    assert scans == [], plan


@pytest.mark.parametrize("how", ["null", "absent"])
def test_a_task_without_a_published_manifest_is_verified_all_but_that(
    running: Running, rsa_keys, how: str
) -> None:
    """A coordinator before schema version 4 names no manifest (no manifest_hash, or null
    for a task leased before it): the rest verifies, and the verdict says what could not
    be checked (exit 3), never "verified" (exit 0) nor a failure (exit 1)."""
    node = make_node(rsa_keys, 0)
    running.register(node)
    running.link(node)
    job = copy.deepcopy(run_inference_job(running, node, VALUES))
    if how == "null":
        job["tasks"][0]["manifest_hash"] = None
    else:
        del job["tasks"][0]["manifest_hash"]
    report = audit_job(running, job)
    (line,) = report.tasks
    assert line.ok is True and line.manifest_checked is False
    assert "manifest is not published" in line.detail
    assert not report.ok and report.result_ok is True
    assert report.verdict == "tasks and result verified; their nodes' manifests are not published"


def test_verify_exits_3_when_the_manifests_are_not_published(
    running: Running, rsa_keys, capsys
) -> None:
    """`verify` against tasks that name no manifest (leased before schema version 4):
    exit 3, all that could be checked verified, and the line says what was not."""
    node = make_node(rsa_keys, 0)
    running.register(node)
    running.link(node)
    job = run_inference_job(running, node, VALUES)
    running.coord.db.run_sync(lambda s: s.execute(update(m.Task).values(manifest_hash=None)))
    argv = ["verify", job["job_id"], "--coordinator", running.url]
    assert cli.main(argv) == 3
    out = capsys.readouterr().out
    assert "their nodes' manifests are not published" in out
    assert "manifest is not published" in out
