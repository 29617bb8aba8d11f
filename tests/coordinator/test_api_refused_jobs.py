"""POST /v1/jobs: a job the coordinator refuses leaves nothing in its blob store.

A media.render job split several ways has its inline scene and assets moved to the blob
store, so that each slice carries a reference instead of a copy. That move must come
after every check that can still refuse the job: an inline scene can be as large as the
payload limit, and a blob that no job references stays for the whole retention period.
"""

from __future__ import annotations

import hashlib
import os

import httpx
import pybase64
import pytest

from nodeclient.workloads import render
from tests.coordinator.conftest import Running

SCENE = b"a packed .blend, as far as the coordinator cares" + bytes(range(256))
SCENE_SHA = hashlib.sha256(SCENE).hexdigest()
ABSENT_ASSET = ("tex/a.png", "b" * 64)  # referenced by its hash, never uploaded


def _post(running: Running, payload: bytes, slices: int) -> httpx.Response:
    body = {
        "workload_class": "media.render",
        "payload": pybase64.b64encode(payload).decode(),
        "slices": slices,
    }
    return httpx.post(running.url + "/v1/jobs", json=body, timeout=30)


def _blobs(running: Running) -> list[str]:
    directory = running.config.blob_dir
    return sorted(os.listdir(directory)) if directory.exists() else []


@pytest.mark.parametrize(
    ("options", "slices", "reason"),
    [
        # 10,000 slices of one frame each: over MAX_SLICES.
        ({"frames": (0, 9999), "frames_per_slice": 1}, 1, "over the limit of 4096"),
        # Two slices, but an asset that the coordinator does not hold.
        ({"frames": (0, 9), "assets": (ABSENT_ASSET,)}, 2, "upload each with POST /v1/blobs"),
    ],
    ids=["too-many-slices", "missing-asset"],
)
def test_a_refused_job_stores_no_inline_scene(
    coordinator: Running, options: dict[str, object], slices: int, reason: str
) -> None:
    """The job is refused with 400, and its inline scene is not in the blob store."""
    payload = render.make_request(SCENE, width=4, height=4, samples=1, **options).encode()  # type: ignore[arg-type]
    r = _post(coordinator, payload, slices)
    assert r.status_code == 400, r.text[:300]
    assert reason in r.json()["error"]
    assert _blobs(coordinator) == []
    assert coordinator.client.jobs() == []


def test_a_refused_job_leaves_a_blob_another_upload_holds(coordinator: Running) -> None:
    """The scene was uploaded before: a refused job that carries it inline leaves it."""
    assert coordinator.client.upload_blob(SCENE)["sha256"] == SCENE_SHA
    payload = render.make_request(
        SCENE, frames=(0, 9), width=4, height=4, samples=1, assets=(ABSENT_ASSET,)
    ).encode()
    assert _post(coordinator, payload, 2).status_code == 400
    assert _blobs(coordinator) == [SCENE_SHA]
    assert coordinator.client.blob(SCENE_SHA) == SCENE


def test_an_accepted_job_still_stores_its_inline_scene(coordinator: Running) -> None:
    """What the checks pass is moved as before: the slices reference the stored scene."""
    payload = render.make_request(SCENE, frames=(0, 9), width=4, height=4, samples=1).encode()
    r = _post(coordinator, payload, 2)
    assert r.status_code == 201, r.text[:300]
    assert _blobs(coordinator) == [SCENE_SHA]
    assert coordinator.client.blob(SCENE_SHA) == SCENE


def test_a_job_of_too_many_frames_is_refused_at_submission(coordinator: Running) -> None:
    """A million 4x4 frames: a few hundred bytes of payload, refused with a 400 that names
    the frame limit, before any task exists."""
    payload = render.make_request(
        SCENE, frames=(0, 999_999), width=4, height=4, samples=1, allow_blank=True
    ).encode()
    r = _post(coordinator, payload, 4096)
    assert r.status_code == 400, r.text[:300]
    assert "the job has 1000000 frames" in r.json()["error"]
    assert "MAX_JOB_FRAMES" in r.json()["error"]
    assert coordinator.client.jobs() == []
