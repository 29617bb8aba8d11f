"""media.render size limits: what a job may ask for before any node renders it.

A slice result must fit one result frame, the assembled result the coordinator's memory
and database, and a payload with its blobs inlined the worker's payload limit; each is
refused when it first can be, as the requester's fault.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from nodeclient.errors import RemoteProtocolError
from nodeclient.node.executor import DEFAULT_MAX_PAYLOAD
from nodeclient.workloads import render, render_slices
from nodeclient.workloads.render import RenderRequest, make_request, resolve_blobs
from nodeclient.workloads.render_slices import hoist, job_meta, split
from nodeclient.workloads.tensors import DEFAULT_MAX_BYTES, decode_tensors, encode_tensors

SCENE = b"BLENDER-v304 a tiny stand-in for a packed scene"
SHA = hashlib.sha256(SCENE).hexdigest()
COORDINATOR_LIMIT = 32 << 20  # the coordinator's default payload limit


def _request(**kw: object) -> RenderRequest:
    args: dict[str, object] = {"frames": (0, 99), "width": 2048, "height": 2048, "samples": 1}
    args.update(kw)
    return make_request(SCENE, **args)  # type: ignore[arg-type]


# --- one slice's result -------------------------------------------------------------------------


def test_a_slice_whose_result_cannot_fit_is_refused_when_split() -> None:
    """Ten frames of 1024x1024 RGBA (40 MiB) in one slice pass the job's own checks, which
    cannot know the slice count; the split, which does, refuses them (and so does hoist,
    which the coordinator calls first), naming the limit and what to change. Without this
    a node would render the slice, its worker would refuse the result, and the task would
    fail on every node in turn."""
    payload = _request(frames=(0, 9), width=1024, height=1024).encode()
    job_meta(payload, COORDINATOR_LIMIT)
    for divide in (split, hoist):
        with pytest.raises(RemoteProtocolError, match="MAX_SLICE_RESULT_BYTES") as info:
            divide(payload, 1)
        assert "a slice of 10 frame(s) of 1024x1024" in str(info.value)
        assert "ask for more slices" in str(info.value)
    with pytest.raises(RemoteProtocolError, match="a slice of 50 frame"):
        split(_request().encode(), 2)  # 100 frames of 2048x2048 in 2 slices
    assert len(split(payload, 2)) == 2  # five 4 MiB frames each


def test_a_slice_result_must_fit_the_container_header_too() -> None:
    """Tiny frames, but 10,000 of them in one slice: the result's header would pass the
    container's header limit, and the coordinator could not decode it."""
    payload = _request(frames=(0, 9999), width=4, height=4).encode()
    with pytest.raises(RemoteProtocolError, match="a slice of 10000 frame"):
        split(payload, 1)
    assert len(split(payload, 2)) == 2


def test_a_tiled_jobs_bands_must_fit_a_slice_result() -> None:
    """A 4096x4096 frame (64 MiB) in 2 bands of 32 MiB each is refused; 4 bands fit."""
    payload = _request(frames=(0, 0), width=4096, height=4096, tiles=2).encode()
    with pytest.raises(RemoteProtocolError, match="use more tiles"):
        split(payload, 2)
    four = _request(frames=(0, 0), width=4096, height=4096, tiles=4).encode()
    assert len(split(four, 4)) == 4


def test_frames_per_slice_is_held_to_the_slice_result_limit() -> None:
    """The split checks frames_per_slice as well, whatever limit the validator was given."""
    payload = _request(frames_per_slice=3).encode()
    with pytest.raises(RemoteProtocolError, match="use a smaller frames_per_slice"):
        split(payload, 1)
    assert len(split(_request(frames=(0, 9), frames_per_slice=1).encode(), 1)) == 10


# --- the assembled job result -------------------------------------------------------------------


def test_a_job_whose_assembled_result_is_too_large_is_refused() -> None:
    """4096 frames of 2048x2048 (64 GiB) would be built in the coordinator's memory and
    stored whole: refused at submission, naming the limit and what to change. Fifteen
    such frames fit under MAX_JOB_RESULT_BYTES, sixteen do not."""
    many = _request(frames=(0, 4095), frames_per_slice=1).encode()
    with pytest.raises(RemoteProtocolError, match="MAX_JOB_RESULT_BYTES") as info:
        job_meta(many, COORDINATOR_LIMIT)
    assert f"over the limit of {render.MAX_JOB_RESULT_BYTES}" in str(info.value)
    assert "split the range into several jobs" in str(info.value)
    job_meta(_request(frames=(0, 14), frames_per_slice=1).encode(), COORDINATOR_LIMIT)
    with pytest.raises(RemoteProtocolError, match="MAX_JOB_RESULT_BYTES"):
        job_meta(_request(frames=(0, 15), frames_per_slice=1).encode(), COORDINATOR_LIMIT)


def test_the_result_bound_covers_what_encode_result_writes() -> None:
    """result_bytes is an upper bound on the real encoding, header entries included."""
    frames = {f: np.zeros((3, 5, 4), np.uint8) for f in range(999_000, 999_999 + 1)}
    data = render_slices.encode_result(frames, scene_sha256=SHA, width=5, height=3)
    assert len(data) <= render_slices.result_bytes(len(frames), 3 * 5 * 4)


# --- inlining blobs on the node -----------------------------------------------------------------


def test_resolve_blobs_stops_once_the_payload_passes_the_worker_limit() -> None:
    """Assets are fetched into memory one by one; once they would take the payload past
    the worker's payload limit, resolve_blobs stops fetching and refuses the payload as
    the requester's fault, instead of holding every asset and then failing on the node."""
    blobs = {hashlib.sha256(bytes([i]) * 1000).hexdigest(): bytes([i]) * 1000 for i in range(5)}
    assets = tuple(sorted((f"t{i}.png", sha) for i, sha in enumerate(blobs)))
    payload = _request(frames=(0, 0), width=4, height=4, assets=assets).encode()
    fetched: list[str] = []

    def fetch(url: str) -> bytes:
        fetched.append(url)
        return blobs[url.rsplit("/", 1)[1]]

    with pytest.raises(RemoteProtocolError, match="over the worker's payload limit"):
        resolve_blobs(payload, fetch, max_bytes=len(payload) + 1500)
    assert len(fetched) == 2
    fetched.clear()
    resolved = resolve_blobs(payload, fetch, max_bytes=len(payload) + 5000 + 4096)
    assert len(fetched) == 5 and len(RenderRequest.decode(resolved).asset_files()) == 5


def test_resolve_blobs_counts_the_fetched_scene() -> None:
    """A scene by URL counts towards the limit as well."""
    payload = _request(frames=(0, 0), scene_url="https://blobs.example/s").encode()
    with pytest.raises(RemoteProtocolError, match="payload limit of"):
        resolve_blobs(payload, lambda _url: SCENE, max_bytes=len(payload) + len(SCENE) - 1)


def test_resolve_blobs_defaults_to_the_workers_payload_limit() -> None:
    """The daemon calls resolve_blobs with its default limit: the worker's own default."""
    assert DEFAULT_MAX_BYTES == DEFAULT_MAX_PAYLOAD


# --- metadata JSON ------------------------------------------------------------------------------


def test_an_asset_manifest_nested_too_deeply_is_a_protocol_error(
    stock_recursion_limit: None,
) -> None:
    """JSON nested past the recursion limit is the requester's bad payload, not a crash."""
    tensors, meta = decode_tensors(_request(frames=(0, 0)).encode())
    payload = encode_tensors(dict(tensors), metadata={**meta, "assets": "[" * 200_000})
    with pytest.raises(RemoteProtocolError, match="'assets' nests too deeply"):
        RenderRequest.decode(payload)


def test_an_assembled_result_of_many_small_frames_decodes() -> None:
    """20,000 frames of 2x2: a header of ~2 MB, over the default 1 MiB header limit, in a
    result the job-result limit allows; a requester reads it with a header bound as large
    as the result, while the default (a node's slice result) stays 1 MiB."""
    frames = {n: np.full((2, 2, 4), n % 251, np.uint8) for n in range(20_000)}
    data = render_slices.encode_result(frames, scene_sha256="a" * 64, width=2, height=2)
    assert int.from_bytes(data[:8], "little") > 1 << 20
    with pytest.raises(RemoteProtocolError, match="header length"):
        render_slices.decode_result(data)  # as the coordinator reads a node's slice result
    result = render_slices.decode_result(data, max_header_bytes=len(data))
    assert len(result.frames) == 20_000 and result.frames[19_999][0, 0, 0] == 19_999 % 251
