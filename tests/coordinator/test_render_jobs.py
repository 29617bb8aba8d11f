"""media.render jobs on the coordinator: split by frames, assembled in order, strict retries.

Nodes here are simulated (real keys, real link, real sealing); their results are built
with the render result format from synthetic frames, so no Blender runs. The real
runtime's results are checked against the same registry in tests/node.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import httpx
import numpy as np
import pybase64
import pytest

from nodeclient.coordinator import classes
from nodeclient.coordinator import models as m
from nodeclient.coordinator.config import SybilPolicy
from nodeclient.coordinator.leases import RetryPolicy, excluded_nodes
from nodeclient.coordinator.placement import LEASE_GRACE_S
from nodeclient.errors import RemoteProtocolError
from nodeclient.workloads import render, render_slices
from nodeclient.workloads.tensors import decode_tensors, encode_tensors
from tests.coordinator.conftest import Running, SimNode, make_node

SCENE = b"a packed .blend, as far as the coordinator cares"
SCENE_SHA = hashlib.sha256(SCENE).hexdigest()
TEXTURE = b"wood grain, as far as the coordinator cares"
TEXTURE_SHA = hashlib.sha256(TEXTURE).hexdigest()
W, H = 8, 6


def _payload(frames: tuple[int, int], **kw: Any) -> bytes:
    return render.make_request(SCENE, frames=frames, width=W, height=H, samples=4, **kw).encode()


def _frame(number: int) -> np.ndarray:
    """A deterministic, non-blank RGBA frame that differs per frame number."""
    rng = np.random.default_rng(number)
    return rng.integers(0, 256, size=(H, W, 4), dtype=np.uint8)


def _result_for(node: SimNode, dispatch: dict[str, Any]) -> bytes:
    request = render.RenderRequest.decode(node.open(dispatch))
    return render_slices.encode_result(
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
    expected = render_slices.encode_result(
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
    """A slice whose frame is one colour everywhere is refused, and its lease ends there:
    the slice waits for another node (this one failed it), with the reason."""
    node = _render_node(running, rsa_keys, 0, "0x" + "11" * 20)
    job = running.client.submit_job("media.render", _payload((1, 1)))
    dispatch = node.recv()
    request = render.RenderRequest.decode(node.open(dispatch))
    blank = render_slices.encode_result(
        {1: np.zeros((H, W, 4), dtype=np.uint8)},
        scene_sha256=request.scene_sha256,
        width=W,
        height=H,
    )
    ack = node.call(node.result(dispatch, blank))
    assert ack["status"] == "rejected"
    assert "blank" in ack["reason"]
    task = running.client.job(job["job_id"])["tasks"][0]
    assert (task["status"], task["node_id"], task["attempts"]) == ("queued", None, 1)
    assert (
        "returned a result that failed the checks" in task["reason"] and "blank" in task["reason"]
    )


def _ack(
    node: SimNode, dispatch: dict[str, Any], result: bytes, later: list[dict[str, Any]]
) -> dict[str, Any]:
    """Send a result for *dispatch* and return its acknowledgement. Dispatches may come
    first (the node's free slot takes another slice): kept in *later*, for the test's
    next turn."""
    node.send(node.result(dispatch, result))
    while (frame := node.recv())["type"] == "dispatch":
        later.append(frame)
    assert frame["type"] == "result_ack", frame
    return frame


def _retried_elsewhere(
    running: Running, rsa_keys: Any, refused: dict[str, Any] | None
) -> tuple[SimNode, dict[str, Any]]:
    """A second node, linked now, and its dispatch: the slice whose result was refused
    goes to it (never back to the node that answered it)."""
    assert refused is not None
    other = _render_node(running, rsa_keys, 1, "0x" + "22" * 20)
    again = other.recv()
    assert again["task_id"] == refused["task_id"]
    return other, again


def test_result_for_another_slice_is_rejected_and_the_task_stays_open(
    running: Running, rsa_keys
) -> None:
    """Frames 1-20 in two slices: a valid, non-blank frame 1 returned for slice 1 (frames
    11-20) is rejected with a reason and the slice queued again, where before it was
    accepted and failed the whole job at assembly. The slice's own frames, sent after it
    for the same lease, are refused too (the node answered that lease already); the slice
    goes to another node, whose frames complete the job."""
    a = _render_node(running, rsa_keys, 0, "0x" + "11" * 20)
    job = running.client.submit_job("media.render", _payload((1, 20)), slices=2)
    later: list[dict[str, Any]] = []
    refused = None
    for _ in range(2):
        dispatch = later.pop(0) if later else a.recv()
        if dispatch["slice_index"] == 1:
            wrong = render_slices.encode_result(
                {1: _frame(1)}, scene_sha256=SCENE_SHA, width=W, height=H
            )
            ack = _ack(a, dispatch, wrong, later)
            assert ack["status"] == "rejected"
            assert "result holds frames 1..1, but its task asked for frames 11..20" in ack["reason"]
            assert running.client.job(job["job_id"])["tasks"][1]["status"] == "queued"
            ack = _ack(a, dispatch, _result_for(a, dispatch), later)
            assert ack["status"] == "rejected"
            assert "this node's lease of it ended rejected" in ack["reason"]
            refused = dispatch
            continue
        assert _ack(a, dispatch, _result_for(a, dispatch), later)["status"] == "accepted"
    b, again = _retried_elsewhere(running, rsa_keys, refused)
    _complete(b, again)
    done = running.wait_job(job["job_id"], "succeeded")
    assert done["status"] == "succeeded", done["reason"]
    assert sorted(
        render_slices.decode_result(running.client.job_result(job["job_id"])).frames
    ) == list(range(1, 21))


def test_band_result_for_other_rows_is_rejected(running: Running, rsa_keys) -> None:
    """A tiled frame: a band of rows 0..0 returned for the band of rows 2..3 is rejected,
    and so is the whole frame (sent after, for the same lease); each task's own band
    (the refused one's from another node) completes the job, stitched whole."""
    a = _render_node(running, rsa_keys, 0, "0x" + "11" * 20)
    job = running.client.submit_job("media.render", _payload((3, 3), tiles=3))
    pixels = _frame(3)

    def band(node: SimNode, dispatch: dict[str, Any]) -> bytes:
        rows = render.RenderRequest.decode(node.open(dispatch)).rows
        assert rows is not None
        return render_slices.encode_result({3: pixels[rows[0] : rows[1] + 1]},
                                           scene_sha256=SCENE_SHA, width=W, height=H,
                                           rows=rows)  # fmt: skip

    later: list[dict[str, Any]] = []
    refused = None
    for _ in range(3):
        dispatch = later.pop(0) if later else a.recv()
        if dispatch["slice_index"] == 1:
            assert render.RenderRequest.decode(a.open(dispatch)).rows == (2, 3)
            other_rows = render_slices.encode_result(
                {3: pixels[0:1]}, scene_sha256=SCENE_SHA, width=W, height=H, rows=(0, 0)
            )
            ack = _ack(a, dispatch, other_rows, later)
            assert ack["status"] == "rejected"
            assert "result holds rows 0..0, but its task asked for rows 2..3" in ack["reason"]
            whole = render_slices.encode_result(
                {3: pixels}, scene_sha256=SCENE_SHA, width=W, height=H
            )
            assert _ack(a, dispatch, whole, later)["status"] == "rejected"
            refused = dispatch
            continue
        assert _ack(a, dispatch, band(a, dispatch), later)["status"] == "accepted"
    b, again = _retried_elsewhere(running, rsa_keys, refused)
    assert _ack(b, again, band(b, again), [])["status"] == "accepted"
    done = running.wait_job(job["job_id"], "succeeded")
    assert done["status"] == "succeeded", done["reason"]
    stitched = render_slices.decode_result(running.client.job_result(job["job_id"]))
    assert stitched.frames[3].tolist() == pixels.tolist()


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


# --- blobs a job references -----------------------------------------------------------------------


def _refused(running: Running, payload: bytes, **body: Any) -> str:
    """POST the render job; it must be refused as the requester's fault. Returns the reason."""
    r = httpx.post(running.url + "/v1/jobs", json={
        "workload_class": "media.render", "payload": pybase64.b64encode_as_string(payload), **body,
    })  # fmt: skip
    assert r.status_code == 400, r.text
    reason: str = r.json()["error"]
    return reason


def _stored(running: Running) -> tuple[int, int]:
    """(jobs, tasks) in the coordinator's database."""
    return running.coord.db.run_sync(lambda s: (s.query(m.Job).count(), s.query(m.Task).count()))


def test_an_inline_scene_split_many_ways_is_stored_once(running: Running) -> None:
    """A 1 MiB inline scene split 4096 ways would be 4 GiB of slice payloads: the scene
    goes to the blob store once, and every slice references it by /v1/blobs/<sha256>,
    as a job sent by URL does. A job of one slice keeps its scene inline."""
    scene = bytes(range(256)) * 4096  # 1 MiB
    sha = hashlib.sha256(scene).hexdigest()
    many = render.make_request(scene, frames=(0, 4095), width=W, height=H, samples=1).encode()
    job = running.client.submit_job("media.render", many, slices=4096)
    assert len(job["tasks"]) == 4096
    assert (running.coord.config.blob_dir / sha).read_bytes() == scene
    assert [p.name for p in running.coord.config.blob_dir.iterdir()] == [sha]  # no temp left

    def payloads(s: Any) -> list[bytes]:
        return [p for (p,) in s.query(m.Task.payload).filter(m.Task.job_id == job["job_id"])]

    stored = running.coord.db.run_sync(payloads)
    assert len(stored) == 4096 and sum(map(len, stored)) < 4096 * 2048  # no scene in any
    first = render.RenderRequest.decode(stored[0])
    assert first.scene is None and first.scene_url == render.blob_url(sha)
    assert first.scene_sha256 == sha

    whole = render.make_request(scene, frames=(0, 0), width=W, height=H, samples=1).encode()
    one = running.client.submit_job("media.render", whole, slices=1)
    (kept,) = running.coord.db.run_sync(
        lambda s: [p for (p,) in s.query(m.Task.payload).filter(m.Task.job_id == one["job_id"])]
    )
    assert render.RenderRequest.decode(kept).scene == scene


def test_a_split_over_the_band_limit_is_refused(running: Running) -> None:
    """16384 bands of a 16384-row frame, one per row, are refused with a 400 naming the
    limit, and nothing is stored."""
    scene = bytes(range(256)) * 4096
    bands = render.make_request(scene, frames=(0, 0), width=4, height=16384, samples=1,
                                tiles=2).encode()  # fmt: skip
    tensors, meta = decode_tensors(bands)
    tall = encode_tensors(tensors, metadata={**meta, "tiles": "16384"})
    assert "tiles must be an integer in 2..256" in _refused(running, tall)
    assert _stored(running) == (0, 0)


def test_scene_url_with_a_lone_surrogate_is_a_400(running: Running) -> None:
    """A payload whose scene_url holds "\\ud800" (JSON allows it; UTF-8 has no encoding
    for it) is refused as the requester's fault, not a 500 when its slices are encoded."""
    _, meta = decode_tensors(_payload((1, 2), scene_url="https://host/scene.blend"))
    meta["scene_url"] = "http://\ud800"
    header = json.dumps({"__metadata__": meta}, separators=(",", ":")).encode("ascii")
    header += b" " * (-len(header) % 8)
    reason = _refused(running, struct.pack("<Q", len(header)) + header, slices=2)
    assert "scene_url 'http://\\ud800' is not valid Unicode" in reason
    assert _stored(running) == (0, 0)


def test_job_whose_asset_blob_is_missing_is_refused_until_it_is_uploaded(running: Running) -> None:
    """An asset the blob store does not hold would fail every slice on its node: the job is
    refused at submission, naming the asset's path and sha256, and nothing is stored. Once
    the asset is uploaded, the same submission is accepted."""
    payload = _payload((1, 4), assets=(("textures/wood.png", TEXTURE_SHA),))
    reason = _refused(running, payload, slices=2)
    assert f"asset textures/wood.png (sha256 {TEXTURE_SHA})" in reason
    assert "POST /v1/blobs" in reason
    assert running.client.jobs() == []
    assert _stored(running) == (0, 0)

    assert running.client.upload_blob(TEXTURE)["sha256"] == TEXTURE_SHA
    job = running.client.submit_job("media.render", payload, slices=2)
    assert job["status"] == "queued" and len(job["tasks"]) == 2
    assert [j["job_id"] for j in running.client.jobs()] == [job["job_id"]]
    assert _stored(running) == (1, 2)


def test_scene_by_blob_url_must_be_in_the_blob_store(running: Running) -> None:
    """A scene_url of /v1/blobs/<scene_sha256> is checked like an asset, and every missing
    blob is named at once; a scene at an http(s) URL is the requester's to serve."""
    payload = _payload((1, 1), scene_url=render.blob_url(SCENE_SHA),
                       assets=(("wood.png", TEXTURE_SHA),))  # fmt: skip
    reason = _refused(running, payload)
    assert "2 blob(s)" in reason
    assert f"scene (sha256 {SCENE_SHA})" in reason
    assert f"asset wood.png (sha256 {TEXTURE_SHA})" in reason
    running.client.upload_blob(TEXTURE)
    reason = _refused(running, payload)
    assert f"scene (sha256 {SCENE_SHA})" in reason and TEXTURE_SHA not in reason
    assert _stored(running) == (0, 0)
    running.client.upload_blob(SCENE)
    assert running.client.submit_job("media.render", payload)["status"] == "queued"
    external = _payload((1, 1), scene_url="https://blobs.example/scene.blend")
    assert running.client.submit_job("media.render", external)["status"] == "queued"


def test_inline_assets_need_no_blob(running: Running) -> None:
    """An asset carried inline in the payload is not looked for in the blob store."""
    payload = _payload((1, 1), assets=(("wood.png", TEXTURE_SHA),),
                       asset_data=((TEXTURE_SHA, TEXTURE),))  # fmt: skip
    assert running.client.submit_job("media.render", payload)["status"] == "queued"


def test_a_refusal_names_the_first_missing_blobs_and_counts_the_rest() -> None:
    """Pure rule: up to MAX_LISTED_BLOBS missing blobs are named, the rest counted; a held
    blob is never named."""
    shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(12)]
    assets = tuple(sorted((f"t/{i:02d}.png", sha) for i, sha in enumerate(shas)))
    payload = _payload((1, 1), assets=assets)
    wclass = classes.lookup(render.CLASS)
    with pytest.raises(RemoteProtocolError) as info:
        wclass.require_blobs(payload, 1 << 20, held=lambda sha: sha == shas[0])
    reason = str(info.value)
    assert "11 blob(s)" in reason and reason.endswith(" and 3 more")
    assert shas[0] not in reason
    assert [sha for sha in shas if sha in reason] == shas[1 : 1 + classes.MAX_LISTED_BLOBS]
    wclass.require_blobs(payload, 1 << 20, held=lambda _sha: True)  # all held: no error


def test_a_job_whose_slice_result_cannot_fit_is_a_400(running: Running) -> None:
    """Twenty frames of 1024x1024 in one slice (80 MiB of result), or ten in each of two,
    would be rendered and then refused by every node's worker in turn: refused at
    submission instead, with what to change, and nothing is stored, not even the inline
    scene that a split job has moved to the blob store. Four slices of five frames fit."""
    payload = render.make_request(
        SCENE, frames=(0, 19), width=1024, height=1024, samples=1
    ).encode()
    for slices in (1, 2):
        reason = _refused(running, payload, slices=slices)
        assert "MAX_SLICE_RESULT_BYTES" in reason and "ask for more slices" in reason
    assert _stored(running) == (0, 0)
    blob_dir = running.coord.config.blob_dir
    assert not blob_dir.exists() or list(blob_dir.iterdir()) == []
    job = running.client.submit_job("media.render", payload, slices=4)
    assert len(job["tasks"]) == 4


def test_a_job_whose_assembled_result_is_too_large_is_a_400(running: Running) -> None:
    """4096 frames of 2048x2048, one per slice, would assemble into 64 GiB in the
    coordinator's memory: refused at submission, naming the limit."""
    payload = render.make_request(
        SCENE, frames=(0, 4095), width=2048, height=2048, samples=1, frames_per_slice=1
    ).encode()
    reason = _refused(running, payload)
    assert "MAX_JOB_RESULT_BYTES" in reason and "several jobs" in reason
    assert _stored(running) == (0, 0)


def test_a_slice_is_leased_for_as_long_as_it_may_run(running: Running, rsa_keys) -> None:
    """A render slice's lease lasts its hard cap (the request's max_seconds, else the
    default hour) and a grace more, not the coordinator's 300 s: a slice that renders for
    ten minutes, saving frames all along, is not cut off on every node in turn."""
    node = _render_node(running, rsa_keys, 0, "0x" + "11" * 20)
    now = running.clock.now()
    capped = running.client.submit_job("media.render", _payload((1, 1), max_seconds=5400))
    dispatch = node.recv()
    assert dispatch["job_id"] == capped["job_id"]
    assert dispatch["lease_expires_at"] == int(now + 5400 + LEASE_GRACE_S)
    _complete(node, dispatch)
    plain = running.client.submit_job("media.render", _payload((1, 1)))
    dispatch = node.recv()
    assert dispatch["job_id"] == plain["job_id"]
    assert dispatch["lease_expires_at"] == int(now + render.DEFAULT_MAX_SECONDS + LEASE_GRACE_S)
    _complete(node, dispatch)
    quick = running.client.submit_job("media.render", _payload((1, 1), max_seconds=10))
    dispatch = node.recv()  # a cap under the coordinator's lease: that lease
    assert dispatch["job_id"] == quick["job_id"]
    assert dispatch["lease_expires_at"] == int(now + running.config.lease_seconds)
