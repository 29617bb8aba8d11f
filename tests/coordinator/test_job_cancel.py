"""A requester ends a job that has not ended: POST /v1/jobs/{job_id}/cancel, and
`nodeclient-coordinator cancel JOB_ID`."""

from __future__ import annotations

import logging
import uuid

import pytest

from nodeclient.coordinator import cli
from nodeclient.errors import RemoteProtocolError
from tests.coordinator.conftest import Running, inference_payload, make_node

VALUES = [1.0, 2.0, 3.0]


def test_a_leased_job_is_cancelled_on_its_node_and_fails(start_coordinator, rsa_keys) -> None:
    """The job fails with the requester's reason, its task is cancelled (and says why),
    and the node holding it is told to drop it; its result, sent anyway, is refused."""
    running: Running = start_coordinator(heartbeat_interval=1000.0)
    node = make_node(rsa_keys, 0)
    running.register(node)
    running.link(node)
    job = running.client.submit_job("ai.inference", inference_payload(VALUES))
    dispatch = node.recv()
    ended = running.client.cancel_job(job["job_id"])
    assert (ended["status"], ended["reason"]) == ("failed", "cancelled by the requester")
    assert node.recv() == {
        "type": "cancel", "task_id": dispatch["task_id"], "reason": "job cancelled"
    }  # fmt: skip
    (task,) = running.client.job(job["job_id"])["tasks"]
    assert (task["status"], task["reason"]) == (
        "cancelled", "job failed: cancelled by the requester"
    )  # fmt: skip
    payload = node.open(dispatch)
    ack = node.call(node.result(dispatch, payload))
    assert ack["status"] == "rejected"
    assert ack["reason"] == (
        f"task {dispatch['task_id']} is cancelled: job failed: cancelled by the requester"
    )


def test_a_queued_job_is_cancelled_and_an_ended_one_is_refused(
    coordinator: Running, caplog: pytest.LogCaptureFixture
) -> None:
    """No node: the queued job fails at once, logged as job.failed (what counts job ends)
    with the reason. Cancelling it again is 409 (it has ended), and an unknown job is 404."""
    job = coordinator.client.submit_job("ai.inference", inference_payload(VALUES))
    with caplog.at_level(logging.INFO, logger="nodeclient.coordinator"):
        assert coordinator.client.cancel_job(job["job_id"])["status"] == "failed"
    (ended,) = [r for r in caplog.records if r.msg == "job.failed"]
    assert (ended.job_id, ended.reason) == (job["job_id"], "cancelled by the requester")  # type: ignore[attr-defined]
    with pytest.raises(RemoteProtocolError, match="409 job .* has already ended: failed"):
        coordinator.client.cancel_job(job["job_id"])
    with pytest.raises(RemoteProtocolError, match="404 no job"):
        coordinator.client.cancel_job(str(uuid.uuid4()))
    with pytest.raises(RemoteProtocolError, match="404 no job"):
        coordinator.client.cancel_job("not-a-uuid")


def test_the_cancel_command_prints_the_ended_job(
    coordinator: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    job = coordinator.client.submit_job("ai.inference", inference_payload(VALUES))
    rc = cli.main(["cancel", job["job_id"], "--coordinator", coordinator.url])
    assert rc == 0
    assert capsys.readouterr().out == (
        f"{job['job_id']}  ai.inference  failed (cancelled by the requester)\n"
    )
