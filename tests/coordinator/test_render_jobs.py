"""media.render jobs on the coordinator: split by frames, assembled in order, strict retries.

Nodes here are simulated (real keys, real link, real sealing); their results are built
with the render result format from synthetic frames, so no Blender runs. The real
runtime's results are checked against the same registry in tests/node.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from nodeclient.coordinator.config import SybilPolicy
from nodeclient.coordinator.scheduler import RetryPolicy, excluded_nodes
from nodeclient.errors import RemoteProtocolError
from nodeclient.workloads import render
from tests.coordinator.conftest import Running, SimNode, make_node

SCENE = b"a packed .blend, as far as the coordinator cares"
W, H = 8, 6


def _payload(frames: tuple[int, int], **kw: Any) -> bytes:
    return render.make_request(SCENE, frames=frames, width=W, height=H, samples=4, **kw).encode()


def _frame(number: int) -> np.ndarray:
    """A deterministic, non-blank RGBA frame that differs per frame number."""
    rng = np.random.default_rng(number)
    return rng.integers(0, 256, size=(H, W, 4), dtype=np.uint8)


def _result_for(node: SimNode, dispatch: dict[str, Any]) -> bytes:
    request = render.RenderRequest.decode(node.open(dispatch))
    return render.encode_result(
        {f: _frame(f) for f in request.frames},
        scene_sha256=request.scene_sha256,
        width=W,
        height=H,
    )


def _render_node(running: Running, keys, index: int, wallet: str) -> SimNode:
    node = make_node(keys, index, classes=("media.render",), wallet=wallet)
    running.register(node)
    running.link(node)
    return node


def _complete(node: SimNode, dispatch: dict[str, Any]) -> None:
    """Return the slice's result and wait for its acknowledgement."""
    ack = node.call(node.result(dispatch, _result_for(node, dispatch)))
    assert ack["type"] == "result_ack"
    assert ack["status"] == "accepted", ack["reason"]


def _reject(node: SimNode, dispatch: dict[str, Any], reason: str) -> None:
    ack = node.call(node.reject(dispatch["task_id"], reason))
    assert (ack["type"], ack["status"]) == ("result_ack", "accepted"), ack


@pytest.fixture
def running(start_coordinator) -> Running:
    """Nobody goes offline; several nodes may share a wallet."""
    return start_coordinator(heartbeat_interval=1000.0, sybil=SybilPolicy(max_nodes_per_wallet=8))


def test_two_slices_are_two_tasks_and_assemble_in_order(running: Running, rsa_keys) -> None:
    """A 5-frame job with slices=2 becomes tasks of frames 1-3 and 4-5; the job's result
    is every frame in order, byte for byte what one result of all frames would be."""
    node = _render_node(running, rsa_keys, 0, "0x" + "11" * 20)
    job = running.client.submit_job("media.render", _payload((1, 5)), slices=2)
    assert [t["slice_index"] for t in job["tasks"]] == [0, 1]
    seen = []
    for _ in range(2):
        dispatch = node.recv()
        assert dispatch["type"] == "dispatch"
        request = render.RenderRequest.decode(node.open(dispatch))
        seen.append((dispatch["slice_index"], request.frame_start, request.frame_end))
        _complete(node, dispatch)
    assert sorted(seen) == [(0, 1, 3), (1, 4, 5)]
    done = running.wait_job(job["job_id"], "succeeded")
    assert done["status"] == "succeeded", done["reason"]
    expected = render.encode_result(
        {f: _frame(f) for f in range(1, 6)},
        scene_sha256=render.make_request(
            SCENE, frames=(1, 1), width=W, height=H, samples=4
        ).scene_sha256,
        width=W,
        height=H,
    )
    assert running.client.job_result(job["job_id"]) == expected


def test_frames_per_slice_in_the_payload_sets_the_split(running: Running) -> None:
    """frames_per_slice=2 over frames 1-5 gives three tasks; a contradicting count is a 400."""
    job = running.client.submit_job("media.render", _payload((1, 5), frames_per_slice=2))
    assert len(job["tasks"]) == 3
    with pytest.raises(RemoteProtocolError, match="gives 3 slices, but 2"):
        running.client.submit_job("media.render", _payload((1, 5), frames_per_slice=2), slices=2)


def test_blank_slice_result_is_rejected(running: Running, rsa_keys) -> None:
    """A slice whose frame is one colour everywhere is refused; the task stays leased."""
    node = _render_node(running, rsa_keys, 0, "0x" + "11" * 20)
    job = running.client.submit_job("media.render", _payload((1, 1)))
    dispatch = node.recv()
    request = render.RenderRequest.decode(node.open(dispatch))
    blank = render.encode_result(
        {1: np.zeros((H, W, 4), dtype=np.uint8)},
        scene_sha256=request.scene_sha256,
        width=W,
        height=H,
    )
    ack = node.call(node.result(dispatch, blank))
    assert ack["status"] == "rejected"
    assert "blank" in ack["reason"]
    assert running.client.job(job["job_id"])["tasks"][0]["status"] == "leased"


def test_failed_slice_is_retried_on_a_different_node(running: Running, rsa_keys) -> None:
    """A node's reject sends the slice to another node, never back to the one that failed
    it (were it offered back, node A would take it and B would wait in vain); the task's
    reason keeps the node's words, so a crash reads differently from out of memory."""
    a = _render_node(running, rsa_keys, 0, "0x" + "11" * 20)
    job = running.client.submit_job("media.render", _payload((1, 2)))
    first = a.recv()
    _reject(a, first, "crash: blender died of signal SIGSEGV")
    b = _render_node(running, rsa_keys, 1, "0x" + "11" * 20)
    again = b.recv()
    assert again["type"] == "dispatch"
    assert again["task_id"] == first["task_id"]
    task = running.client.job(job["job_id"])["tasks"][0]
    assert (task["node_id"], task["attempts"]) == (b.node_id, 2)
    assert "crash: blender died of signal SIGSEGV" in task["reason"]


def test_slice_fails_hard_after_three_different_nodes(running: Running, rsa_keys) -> None:
    """Three different nodes fail the slice: the task and its job fail, with the reasons."""
    job = running.client.submit_job("media.render", _payload((1, 2)))
    reasons = [
        "crash: blender died of signal SIGSEGV",
        "timeout: no progress, no frame saved for 600 s",
        "out of memory: blender was killed (SIGKILL, the OOM killer)",
    ]
    for index, reason in enumerate(reasons):
        node = _render_node(running, rsa_keys, index, "0x" + "11" * 20)
        _reject(node, node.recv(), reason)
    failed = running.wait_job(job["job_id"], "failed")
    assert failed["status"] == "failed"
    assert "failed on 3 different nodes" in failed["reason"]
    assert "out of memory" in failed["reason"]
    assert failed["tasks"][0]["attempts"] == 3


def test_node_that_failed_three_slices_gets_no_more_of_the_job(running: Running, rsa_keys) -> None:
    """Node A fails three slices of a four-slice job and is offered none after that: all
    four go to B, which completes the job (had A been offered slice 4, it would hold it)."""
    a = _render_node(running, rsa_keys, 0, "0x" + "11" * 20)
    job = running.client.submit_job("media.render", _payload((1, 4)), slices=4)
    failed_by_a = set()
    for _ in range(3):
        dispatch = a.recv()
        failed_by_a.add(dispatch["slice_index"])
        _reject(a, dispatch, "crash: blender exited with code 1")
    assert len(failed_by_a) == 3
    b = _render_node(running, rsa_keys, 1, "0x" + "11" * 20)
    for _ in range(4):
        dispatch = b.recv()
        assert dispatch["type"] == "dispatch"
        _complete(b, dispatch)
    done = running.wait_job(job["job_id"], "succeeded")
    assert done["status"] == "succeeded", done["reason"]
    assert {t["node_id"] for t in done["tasks"]} == {b.node_id}


def test_excluded_nodes_rule() -> None:
    """Pure rule: a node is excluded from a task it failed, and from every task of a job
    once it has failed three of that job's tasks; other jobs' failures do not count."""
    policy = RetryPolicy()
    failures = [("t1", "a"), ("t2", "a"), ("t1", "b"), ("t3", "a")]
    assert excluded_nodes(policy, "t1", failures) == {"a", "b"}
    assert excluded_nodes(policy, "t4", failures) == {"a"}
    assert excluded_nodes(policy, "t4", failures[:3]) == frozenset()
