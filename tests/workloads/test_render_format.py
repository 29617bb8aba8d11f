"""The media.render request/result formats, split and assembly (2.3.5, 2.3.6). No Blender."""

from __future__ import annotations

import hashlib
import json
import struct
import tracemalloc

import numpy as np
import pytest

from nodeclient.errors import LocalProtocolError, RemoteProtocolError
from nodeclient.workloads import render, render_slices
from nodeclient.workloads.render import RenderRequest, make_request, resolve_blobs
from nodeclient.workloads.render_slices import (
    assemble,
    check_result,
    check_slice,
    decode_result,
    encode_result,
    job_meta,
    slice_ranges,
    split,
)
from nodeclient.workloads.tensors import decode_tensors, encode_tensors

SCENE = b"BLENDER-v304 a tiny stand-in for a packed scene"
SHA = hashlib.sha256(SCENE).hexdigest()
W, H = 5, 4

# The vector published in docs/_parts/render.md: frame 7 of a 1x1 render, one red pixel,
# for the scene whose SHA-256 is that of no bytes at all.
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
VECTOR_RESULT_1X1 = bytes.fromhex(
    "00010000000000007b225f5f6d657461646174615f5f223a7b22636c61737322"
    "3a226d656469612e72656e646572222c226672616d655f656e64223a2237222c"
    "226672616d655f7374617274223a2237222c22686569676874223a2231222c22"
    "7363656e655f736861323536223a226533623063343432393866633163313439"
    "6166626634633839393666623932343237616534316534363439623933346361"
    "343935393931623738353262383535222c227769647468223a2231227d2c2266"
    "72616d655f303030303037223a7b226474797065223a225538222c2273686170"
    "65223a5b312c312c345d2c22646174615f6f666673657473223a5b302c345d7d"
    "7d20202020202020ff0000ff"
)


def _request(**kw: object) -> RenderRequest:
    args: dict[str, object] = {"frames": (1, 6), "width": W, "height": H, "samples": 4}
    args.update(kw)
    return make_request(SCENE, **args)  # type: ignore[arg-type]


def _meta(payload: bytes) -> dict:
    return job_meta(payload, 1 << 20)


def _frames(start: int, end: int) -> dict[int, np.ndarray]:
    return {
        f: np.random.default_rng(f).integers(0, 256, (H, W, 4), dtype=np.uint8)
        for f in range(start, end + 1)
    }


def _result(start: int, end: int, **kw: object) -> bytes:
    args: dict[str, object] = {"scene_sha256": SHA, "width": W, "height": H}
    args.update(kw)
    return encode_result(_frames(start, end), **args)  # type: ignore[arg-type]


# --- requests -----------------------------------------------------------------------------------


def test_request_round_trips_and_is_canonical() -> None:
    """Encoding is deterministic and decoding gives back every field."""
    request = _request(seed=9, frames_per_slice=2, max_seconds=60, allow_blank=True)
    data = request.encode()
    assert data == _request(seed=9, frames_per_slice=2, max_seconds=60, allow_blank=True).encode()
    back = RenderRequest.decode(data)
    assert back == request
    assert back.scene == SCENE
    _, meta = decode_tensors(data)
    assert meta["frame_start"] == "1"
    assert meta["allow_blank"] == "1"


def test_request_by_url_carries_no_scene() -> None:
    """A scene_url request carries the hash and the URL, no scene bytes."""
    request = _request(scene_url=f"/v1/blobs/{SHA}")
    tensors, meta = decode_tensors(request.encode())
    assert tensors == {}
    assert meta["scene_url"] == f"/v1/blobs/{SHA}"
    assert RenderRequest.decode(request.encode()).scene is None


@pytest.mark.parametrize(
    "url",
    [
        "/etc/passwd",
        "file:///etc/passwd",
        "../scene.blend",
        "scene.blend",
        "/v1/blobs/" + "0" * 64,  # another blob than the scene's hash
        "ftp://host/scene.blend",
    ],
)
def test_local_paths_and_other_schemes_are_refused(url: str) -> None:
    """A node never reads its own files for a requester: only blob refs or http(s)."""
    with pytest.raises(LocalProtocolError, match="scene_url"):
        _request(scene_url=url)


def test_inline_scene_with_wrong_hash_is_refused() -> None:
    """The inline scene must hash to scene_sha256."""
    _, meta = decode_tensors(_request().encode())
    forged = encode_tensors(
        {"__scene__": np.frombuffer(b"another scene", dtype=np.uint8)}, metadata=meta
    )
    with pytest.raises(RemoteProtocolError, match="inline scene has sha256"):
        RenderRequest.decode(forged)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("frame_start", "01", "canonical decimal"),
        ("samples", "+4", "canonical decimal"),
        ("frame_end", "0", "frame_end"),
        ("width", "0", "width"),
        ("width", "3", r"width must be an integer in 4\.\.16384"),  # Blender makes it 4
        ("height", "1", r"height must be an integer in 4\.\.16384"),
        ("seed", "2147483648", "seed"),
        ("allow_blank", "yes", "allow_blank"),
        ("tile", "1", "unknown metadata"),
        ("class", "ai.inference", "workload class"),
    ],
)
def test_bad_metadata_is_refused(key: str, value: str, match: str) -> None:
    """Each field is checked when a payload is decoded, as the peer's fault."""
    tensors, meta = decode_tensors(_request(frames=(3, 6)).encode())
    meta = {**meta, key: value}
    with pytest.raises(RemoteProtocolError, match=match):
        RenderRequest.decode(encode_tensors(dict(tensors), metadata=meta))


def test_a_side_smaller_than_blender_renders_is_refused() -> None:
    """Blender renders no side under 4 pixels (it makes 1..3 into 4, and the frame would
    fail every node's size check): such a request is refused when it is made."""
    with pytest.raises(LocalProtocolError, match=r"width must be an integer in 4\.\.16384"):
        _request(width=3)
    with pytest.raises(LocalProtocolError, match=r"height must be an integer in 4\.\.16384"):
        _request(height=1)
    assert _request(width=4, height=4).width == 4


def _container(metadata: dict[str, str]) -> bytes:
    """A tensor container with no tensors, its header written with JSON's \\u escapes (so
    a lone surrogate, which encode_tensors cannot write, gets in)."""
    header = json.dumps({"__metadata__": metadata}, separators=(",", ":")).encode("ascii")
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header


def test_scene_url_with_a_lone_surrogate_is_refused() -> None:
    """JSON lets "\\ud800" through, and the URL pattern matches it; a payload carrying it
    has no UTF-8 encoding, so it is refused when decoded, naming the field."""
    _, meta = decode_tensors(_request(scene_url=f"/v1/blobs/{SHA}").encode())
    payload = _container({**meta, "scene_url": "http://\ud800/scene.blend"})
    with pytest.raises(RemoteProtocolError, match=r"scene_url 'http://\\ud800/scene.blend' is "
                       "not valid Unicode"):  # fmt: skip
        RenderRequest.decode(payload)
    with pytest.raises(LocalProtocolError, match="not valid Unicode"):
        _request(scene_url="https://host/\ud800")
    assert RenderRequest.decode(_container(meta)).scene_url == f"/v1/blobs/{SHA}"


def test_resolve_blobs_inlines_a_fetched_scene() -> None:
    """The daemon's hook: a URL payload comes back inline, once the hash checks out."""
    payload = _request(scene_url="https://blobs.example/s").encode()
    resolved = RenderRequest.decode(resolve_blobs(payload, lambda _url: SCENE))
    assert resolved.scene == SCENE
    assert resolved.scene_url is None
    inline = _request().encode()
    assert resolve_blobs(inline, lambda _url: b"never fetched") == inline


def test_resolve_blobs_refuses_wrong_bytes() -> None:
    """Fetched bytes that do not hash to scene_sha256 are refused before use."""
    payload = _request(scene_url="https://blobs.example/s").encode()
    with pytest.raises(RemoteProtocolError, match="expected " + SHA):
        resolve_blobs(payload, lambda _url: b"tampered")


# --- asset manifest -----------------------------------------------------------------------------

TEX = b"texture bytes"
TEX_SHA = hashlib.sha256(TEX).hexdigest()


def test_asset_manifest_round_trips_canonically() -> None:
    """The manifest travels as compact JSON sorted by path; inline assets as U8 tensors."""
    other = hashlib.sha256(b"b").hexdigest()
    request = _request(
        assets=(("a/wood-1.png", TEX_SHA), ("b.exr", other)), asset_data=((TEX_SHA, TEX),)
    )
    payload = request.encode()
    _, meta = decode_tensors(payload)
    assert meta["assets"] == f'[["a/wood-1.png","{TEX_SHA}"],["b.exr","{other}"]]'
    back = RenderRequest.decode(payload)
    assert back.assets == request.assets and back.asset_data == ((TEX_SHA, TEX),)
    assert back.missing_assets() == [other]
    assert back.encode() == payload
    with pytest.raises(RemoteProtocolError, match="not carried inline"):
        back.asset_files()
    assert back.with_assets({other: b"b"}).asset_files() == [("a/wood-1.png", TEX), ("b.exr", b"b")]


@pytest.mark.parametrize(
    "path", ["/etc/passwd", "../x.png", "a/../../x.png", "./x.png", "a//b.png", "a b.png",
             "a\\b.png", "", "x" * 300]
)  # fmt: skip
def test_asset_paths_must_stay_inside_the_scene_folder(path: str) -> None:
    with pytest.raises(LocalProtocolError, match="asset path"):
        _request(assets=((path, TEX_SHA),))


def test_bad_asset_manifests_are_refused() -> None:
    with pytest.raises(LocalProtocolError, match="unique and sorted"):
        _request(assets=(("b.png", TEX_SHA), ("a.png", TEX_SHA)))
    with pytest.raises(LocalProtocolError, match="sha256 of 64"):
        _request(assets=(("a.png", "00"),))
    with pytest.raises(LocalProtocolError, match="not in the asset manifest"):
        _request(asset_data=((TEX_SHA, TEX),))
    with pytest.raises(LocalProtocolError, match="inline asset has sha256"):
        _request(assets=(("a.png", TEX_SHA),), asset_data=((TEX_SHA, b"tampered"),))
    tensors, meta = decode_tensors(_request().encode())
    for raw, match in (
        (f'[ ["a.png","{TEX_SHA}"]]', "canonical"),
        ('{"a.png": 1}', "list of"),
        ("[[", "not JSON"),
        (f'[["../a.png","{TEX_SHA}"]]', "asset path"),
    ):
        with pytest.raises(RemoteProtocolError, match=match):
            RenderRequest.decode(encode_tensors(dict(tensors), metadata={**meta, "assets": raw}))
    extra = {**tensors, render.asset_tensor(TEX_SHA): np.frombuffer(TEX, np.uint8)}
    with pytest.raises(RemoteProtocolError, match="unexpected tensors"):
        RenderRequest.decode(encode_tensors(extra, metadata=meta))  # not in a manifest


def test_resolve_blobs_fetches_each_asset_from_the_blob_store() -> None:
    """Missing assets come from /v1/blobs/<sha256>, hash-checked; inline ones are kept."""
    asked: list[str] = []

    def fetch(url: str) -> bytes:
        asked.append(url)
        return {"/v1/blobs/" + TEX_SHA: TEX, "https://blobs.example/s": SCENE}[url]

    payload = _request(scene_url="https://blobs.example/s", assets=(("t.png", TEX_SHA),))
    resolved = RenderRequest.decode(resolve_blobs(payload.encode(), fetch))
    assert resolved.scene == SCENE and resolved.asset_files() == [("t.png", TEX)]
    assert sorted(asked) == sorted(["https://blobs.example/s", "/v1/blobs/" + TEX_SHA])
    asked.clear()
    done = resolved.encode()
    assert resolve_blobs(done, fetch) == done and asked == []
    with pytest.raises(RemoteProtocolError, match="asset at /v1/blobs/.* expected " + TEX_SHA):
        resolve_blobs(_request(assets=(("t.png", TEX_SHA),)).encode(), lambda _u: b"evil")
    parts = split(_request(assets=(("t.png", TEX_SHA),)).encode(), 2)
    assert all(RenderRequest.decode(p).assets == (("t.png", TEX_SHA),) for p in parts)


def test_blob_refs_name_what_a_node_fetches_from_the_blob_store() -> None:
    """The scene at /v1/blobs/<scene_sha256> and each asset not carried inline, by path;
    a scene at an http(s) URL, an inline scene and inline assets are not listed."""
    other = hashlib.sha256(b"b").hexdigest()
    by_blob = _request(
        scene_url=render.blob_url(SHA),
        assets=(("a/wood.png", TEX_SHA), ("b.exr", other)),
        asset_data=((TEX_SHA, TEX),),
    ).encode()
    assert render.blob_refs(by_blob) == [("scene", SHA), ("asset b.exr", other)]
    external = _request(scene_url="https://blobs.example/s", assets=(("t.png", TEX_SHA),))
    assert render.blob_refs(external.encode()) == [("asset t.png", TEX_SHA)]
    assert render.blob_refs(_request().encode()) == []
    assert render.blob_refs(_request(scene_url="https://blobs.example/s").encode()) == []


# --- split --------------------------------------------------------------------------------------


def test_slice_ranges_share_frames_evenly_in_order() -> None:
    """Earlier slices take the remainder; ranges are contiguous and cover every frame."""
    assert slice_ranges(1, 7, slices=3) == [(1, 3), (4, 5), (6, 7)]
    assert slice_ranges(10, 10, slices=1) == [(10, 10)]
    assert slice_ranges(1, 5, frames_per_slice=2) == [(1, 2), (3, 4), (5, 5)]
    assert slice_ranges(1, 5, slices=3, frames_per_slice=2) == [(1, 2), (3, 4), (5, 5)]


def test_more_slices_than_frames_is_refused() -> None:
    """Every slice renders at least one frame."""
    with pytest.raises(RemoteProtocolError, match="slices must be in 1..2"):
        slice_ranges(1, 2, slices=3)


def test_split_narrows_only_the_frame_range() -> None:
    """Each slice payload is the job's request with its own frames."""
    parts = [RenderRequest.decode(p) for p in split(_request(seed=5).encode(), 2)]
    assert [(p.frame_start, p.frame_end) for p in parts] == [(1, 3), (4, 6)]
    assert all(p.scene == SCENE and p.seed == 5 and p.width == W for p in parts)


def test_split_hashes_the_scene_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scene is hashed when the job payload is decoded, not again for each of its
    slices; a slice is still checked (a range the job cannot have is refused)."""
    hashed: list[int] = []
    real = hashlib.sha256

    def counting(data: bytes = b"", **kw: bool) -> hashlib._Hash:
        hashed.append(len(data))
        return real(data, **kw)

    payload = _request().encode()
    monkeypatch.setattr(hashlib, "sha256", counting)
    parts = split(payload, 6)
    assert len(parts) == 6 and hashed.count(len(SCENE)) == 1
    monkeypatch.undo()
    assert [RenderRequest.decode(p).frames for p in parts] == [range(f, f + 1) for f in range(1, 7)]
    with pytest.raises(LocalProtocolError, match="frame_end"):
        _request().narrowed(4, 3)
    with pytest.raises(LocalProtocolError, match="row_end"):
        _frame_request().band(1, H)


def test_split_over_the_byte_limit_is_refused_before_a_slice_is_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every slice carries the inline scene: 4096 slices of a 1 MiB scene (4 GiB) are
    refused, naming the limit, with no more memory taken than a few copies of the payload.
    The limit counts slices times the payload's size: as many as fit are split."""
    scene = bytes(range(256)) * 4096  # 1 MiB
    payload = make_request(scene, frames=(0, 4095), width=W, height=H, samples=1).encode()
    tracemalloc.start()
    try:
        with pytest.raises(RemoteProtocolError, match="MAX_SPLIT_BYTES") as info:
            split(payload, 4096)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert f"limit of {render.MAX_SPLIT_BYTES}" in str(info.value)
    assert peak < 16 * len(payload)
    monkeypatch.setattr(render_slices, "MAX_SPLIT_BYTES", 8 * len(payload))
    assert len(split(payload, 8)) == 8
    with pytest.raises(RemoteProtocolError, match="9 slices of a"):
        split(payload, 9)


def test_frames_per_slice_cannot_get_round_the_slice_limit() -> None:
    """A job splits into at most MAX_SLICES slices, however the count is asked for."""
    last = render.MAX_SLICES
    with pytest.raises(RemoteProtocolError, match="4097 slices, over the limit of 4096"):
        split(_request(frames=(0, last), frames_per_slice=1, scene_url=f"/v1/blobs/{SHA}")
              .encode(), 1)  # fmt: skip
    parts = split(_request(frames=(1, last), frames_per_slice=1).encode(), 1)
    assert len(parts) == last


def test_job_that_cannot_fit_a_result_is_refused() -> None:
    """frames_per_slice frames of RGBA must fit the coordinator's payload limit."""
    payload = _request(frames=(1, 10), width=1024, height=1024, frames_per_slice=8).encode()
    with pytest.raises(RemoteProtocolError, match="more than a 33554432-byte result holds"):
        job_meta(payload, 32 << 20)


@pytest.mark.parametrize(
    ("kw", "fits"),
    [
        ({"frames": (1, 1), "width": 4096, "height": 4096, "tiles": 256}, True),
        ({"frames": (1, 1), "width": 4096, "height": 2160, "tiles": 8}, True),
        ({"frames": (1, 1), "width": 4096, "height": 4096, "tiles": 2}, False),  # 32 MiB bands
        ({"frames": (1, 2), "width": 1920, "height": 1080, "frames_per_slice": 10}, True),
    ],
)
def test_the_job_check_counts_the_slices_it_would_make(kw: dict, fits: bool) -> None:
    """A tiled frame is refused only when one band cannot fit a result, not when the whole
    frame cannot (tiling is what large frames are for); frames_per_slice counts no more
    frames than the job has. What the check accepts, the split accepts."""
    payload = _request(**kw).encode()
    if not fits:
        with pytest.raises(RemoteProtocolError, match="use more tiles"):
            job_meta(payload, 32 << 20)
        return
    job_meta(payload, 32 << 20)
    assert split(payload, 1)


# --- results ------------------------------------------------------------------------------------


def test_result_vector_is_stable() -> None:
    """The published 1x1 example, byte for byte, and it decodes back to its one pixel."""
    pixel = np.array([[[255, 0, 0, 255]]], dtype=np.uint8)
    data = encode_result({7: pixel}, scene_sha256=EMPTY_SHA256, width=1, height=1)
    assert data == VECTOR_RESULT_1X1
    assert decode_result(data).frames[7].tolist() == pixel.tolist()


def test_good_slice_result_passes_the_check() -> None:
    """Right scene, size, format and range, not blank: accepted."""
    meta = _meta(_request().encode())
    checked = check_result(_result(3, 4), meta, 1 << 20)
    assert (checked.frame_start, checked.frame_end) == (3, 4)


def test_wrong_size_is_rejected() -> None:
    """Frames of another size than the job's are refused."""
    meta = _meta(_request().encode())
    data = encode_result(
        {1: np.ones((2, 2, 4), dtype=np.uint8) * np.arange(4, dtype=np.uint8)},
        scene_sha256=SHA,
        width=2,
        height=2,
    )
    with pytest.raises(RemoteProtocolError, match="2x2, not 5x4"):
        check_result(data, meta, 1 << 20)


def test_wrong_format_is_rejected() -> None:
    """A frame tensor that is not U8 RGBA is refused, even if the metadata claims the size."""
    meta = _meta(_request().encode())
    _, result_meta = decode_tensors(_result(1, 1))
    floats = encode_tensors(
        {"frame_000001": np.random.default_rng(0).random((H, W, 4), dtype=np.float32)},
        metadata=result_meta,
    )
    with pytest.raises(RemoteProtocolError, match="expected uint8"):
        check_result(floats, meta, 1 << 20)


def test_blank_frame_is_rejected_unless_allowed() -> None:
    """A frame of one colour is refused; allow_blank accepts it (a fade to black)."""
    blank = {1: np.full((H, W, 4), 7, dtype=np.uint8), 2: _frames(2, 2)[2]}
    data = encode_result(blank, scene_sha256=SHA, width=W, height=H)
    with pytest.raises(
        RemoteProtocolError, match=r"frame 1 is blank: every pixel is \[.*allow_blank"
    ):
        check_result(data, _meta(_request().encode()), 1 << 20)
    check_result(data, _meta(_request(allow_blank=True).encode()), 1 << 20)


def test_other_scene_or_frames_outside_the_job_are_rejected() -> None:
    """A result for another scene, or for frames the job does not have, is refused."""
    meta = _meta(_request(frames=(2, 5)).encode())
    with pytest.raises(RemoteProtocolError, match="for scene"):
        check_result(_result(2, 2, scene_sha256="ab" * 32), meta, 1 << 20)
    with pytest.raises(RemoteProtocolError, match="outside the job"):
        check_result(_result(5, 6), meta, 1 << 20)


def test_result_with_missing_frame_is_rejected() -> None:
    """The metadata's range must match the frame tensors exactly."""
    tensors, meta = decode_tensors(_result(1, 3))
    del tensors["frame_000002"]
    with pytest.raises(RemoteProtocolError, match="frames 1..3"):
        decode_result(encode_tensors(dict(tensors), metadata=meta))


def test_a_claimed_frame_range_is_counted_before_it_is_built() -> None:
    """A node's metadata may claim frames 1..2,000,000 for a result of two frames: the
    claim is refused on the count, with no list of two million frame numbers built on
    the coordinator's database thread (a few hundred bytes of result cost over 1 GB at
    30 million frames)."""
    tensors, meta = decode_tensors(_result(1, 2))
    meta["frame_end"] = "2000000"
    data = encode_tensors(dict(tensors), metadata=meta)
    tracemalloc.start()
    try:
        with pytest.raises(RemoteProtocolError, match="frames 1..2000000, each exactly once"):
            decode_result(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20


def test_assemble_joins_slices_in_frame_order() -> None:
    """The job result equals one result of all frames, byte for byte."""
    meta = _meta(_request().encode())
    joined = assemble([_result(1, 3), _result(4, 6)], meta)
    assert joined == _result(1, 6)


def test_assemble_refuses_gaps_and_disorder() -> None:
    """Slices out of order, overlapping or missing frames fail the assembly."""
    meta = _meta(_request().encode())
    with pytest.raises(RemoteProtocolError, match="slice 0 starts at frame 4"):
        assemble([_result(4, 6), _result(1, 3)], meta)
    with pytest.raises(RemoteProtocolError, match="slices end at frame 5"):
        assemble([_result(1, 3), _result(4, 5)], meta)
    with pytest.raises(RemoteProtocolError, match="slice 1 starts at frame 3"):
        assemble([_result(1, 3), _result(3, 6)], meta)


# --- tiles: one frame split into bands of rows ----------------------------------------------------


def _frame_request(**kw: object) -> RenderRequest:
    return _request(frames=(2, 2), **kw)


def _band(rows: tuple[int, int], pixels: np.ndarray, frame: int = 2) -> bytes:
    band = pixels[rows[0] : rows[1] + 1]
    return encode_result({frame: band}, scene_sha256=SHA, width=W, height=H, rows=rows)


def test_tiles_split_one_frame_into_bands_top_first() -> None:
    """tiles=3 gives 3 band payloads covering every row once, the larger bands first."""
    parts = split(_frame_request(tiles=3).encode(), 1)
    requests = [RenderRequest.decode(p) for p in parts]
    assert [r.rows for r in requests] == slice_ranges(0, H - 1, slices=3)
    assert requests[0].rows == (0, -(-H // 3) - 1) and requests[-1].rows[1] == H - 1
    assert all(r.tiles is None and (r.frame_start, r.frame_end) == (2, 2) for r in requests)
    assert split(_frame_request(tiles=3).encode(), 3) == parts  # slices may repeat the count


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"frames": (1, 2), "tiles": 2}, "single frame"),
        ({"frames": (2, 2), "tiles": 1}, "tiles must be an integer in 2"),
        ({"frames": (2, 2), "tiles": H + 1}, "tiles must be an integer in 2"),
        ({"frames": (2, 2), "height": 16384, "tiles": 16384}, r"tiles must be .* in 2\.\.256,"),
        ({"frames": (2, 2), "height": 300, "tiles": 257}, r"tiles must be .* in 2\.\.256,"),
        ({"frames": (2, 2), "tiles": 2, "frames_per_slice": 1}, "not both"),
        ({"frames": (2, 2), "row_start": 0}, "both row_start and row_end"),
        ({"frames": (2, 2), "row_start": 1, "row_end": 0}, "row_end must be"),
        ({"frames": (2, 2), "row_start": 0, "row_end": H}, "row_end must be"),
    ],
)
def test_bad_tiles_are_refused(kw: dict, match: str) -> None:
    with pytest.raises(LocalProtocolError, match=match):
        _request(**kw)


def test_tiles_are_at_most_256_and_each_band_has_a_row() -> None:
    """256 bands is the most; a frame of fewer rows has at most one band per row."""
    parts = split(_request(frames=(2, 2), height=300, tiles=render.MAX_TILES).encode(), 1)
    rows = [RenderRequest.decode(p).rows for p in parts]
    assert len(rows) == 256 and all(r is not None and r[0] <= r[1] for r in rows)
    assert len(split(_frame_request(tiles=H).encode(), 1)) == H
    _, meta = decode_tensors(_frame_request(tiles=2).encode())
    payload = {**meta, "height": "16384", "tiles": "16384"}
    with pytest.raises(RemoteProtocolError, match="tiles must be"):
        split(encode_tensors({}, metadata=payload), 1)


def test_tile_job_split_into_a_different_count_is_refused() -> None:
    with pytest.raises(RemoteProtocolError, match="tiles 3 gives 3 slices, but 2"):
        split(_frame_request(tiles=3).encode(), 2)
    band = _frame_request().band(0, 1).encode()
    with pytest.raises(RemoteProtocolError, match="must not carry row_start"):
        split(band, 1)
    with pytest.raises(RemoteProtocolError, match="must not carry row_start"):
        _meta(band)


def test_bands_stitch_into_the_whole_frame() -> None:
    """Stitched bands equal one whole-frame result, byte for byte; every band is checked."""
    meta = _meta(_frame_request(tiles=3).encode())
    pixels = np.random.default_rng(5).integers(0, 256, (H, W, 4), dtype=np.uint8)
    bands = [_band(rows, pixels) for rows in slice_ranges(0, H - 1, slices=3)]
    for band in bands:
        assert check_result(band, meta, 1 << 20).rows is not None
    whole = encode_result({2: pixels}, scene_sha256=SHA, width=W, height=H)
    assert assemble(bands, meta) == whole
    with pytest.raises(RemoteProtocolError, match="band of rows; the result is not"):
        check_result(whole, meta, 1 << 20)  # a whole frame where a band was asked
    with pytest.raises(RemoteProtocolError, match="whole frames; the result is not"):
        check_result(bands[0], _meta(_frame_request().encode()), 1 << 20)


def test_stitch_refuses_gaps_disorder_and_a_blank_frame() -> None:
    meta = _meta(_frame_request(tiles=2).encode())
    pixels = np.random.default_rng(6).integers(0, 256, (H, W, 4), dtype=np.uint8)
    top, bottom = (_band(rows, pixels) for rows in slice_ranges(0, H - 1, slices=2))
    with pytest.raises(RemoteProtocolError, match="slice 0 is not frame 2's band"):
        assemble([bottom, top], meta)
    with pytest.raises(RemoteProtocolError, match="bands end at row 1"):
        assemble([top], meta)
    with pytest.raises(RemoteProtocolError, match="slice 1 is not frame 2's band"):
        assemble([top, _band(slice_ranges(0, H - 1, slices=2)[1], pixels, frame=3)], meta)
    flat = np.zeros((H, W, 4), dtype=np.uint8)
    flat_bands = [_band(rows, flat) for rows in slice_ranges(0, H - 1, slices=2)]
    for band in flat_bands:  # a band of one colour alone is fine (clear sky)...
        check_result(band, meta, 1 << 20)
    with pytest.raises(RemoteProtocolError, match="frame 2 is blank"):  # ...a whole frame not
        assemble(flat_bands, meta)


def test_slice_result_must_be_its_own_tasks_frames() -> None:
    """Frames 1..20 in 2 slices: slice 1's task asked for frames 11..20. One good frame 1
    (inside the job, not blank: check_result passes it) is refused, as are 11..19 and
    12..20; exactly 11..20 is accepted."""
    meta = _meta(_request(frames=(1, 20)).encode())
    parts = split(_request(frames=(1, 20)).encode(), 2)
    check_result(_result(1, 1), meta, 1 << 20)  # the job alone cannot tell
    for start, end in ((1, 1), (11, 19), (12, 20), (1, 10)):
        with pytest.raises(RemoteProtocolError, match=f"result holds frames {start}..{end}, "
                           "but its task asked for frames 11..20"):  # fmt: skip
            check_slice(_result(start, end), parts[1], 1 << 20)
    check_slice(_result(11, 20), parts[1], 1 << 20)
    check_slice(_result(1, 10), parts[0], 1 << 20)


def test_band_result_must_be_its_own_tasks_rows() -> None:
    """A band slice's result holds that band's rows of the job's frame, nothing else."""
    parts = split(_frame_request(tiles=3).encode(), 1)
    pixels = np.random.default_rng(7).integers(0, 256, (H, W, 4), dtype=np.uint8)
    rows = slice_ranges(0, H - 1, slices=3)
    check_slice(_band(rows[1], pixels), parts[1], 1 << 20)
    with pytest.raises(RemoteProtocolError, match=f"result holds rows 0..0, but its task "
                       f"asked for rows {rows[1][0]}..{rows[1][1]}"):  # fmt: skip
        check_slice(_band((0, 0), pixels), parts[1], 1 << 20)
    with pytest.raises(RemoteProtocolError, match=f"rows {rows[0][0]}..{rows[0][1]}, but"):
        check_slice(_band(rows[0], pixels), parts[1], 1 << 20)
    with pytest.raises(RemoteProtocolError, match="asked for frames 2..2"):
        check_slice(_band(rows[1], pixels, frame=3), parts[1], 1 << 20)
    whole = encode_result({2: pixels}, scene_sha256=SHA, width=W, height=H)
    with pytest.raises(RemoteProtocolError, match="result holds whole frames, but its task"):
        check_slice(whole, parts[1], 1 << 20)
    with pytest.raises(RemoteProtocolError, match="holds rows 0..1, but its task asked for "
                       "whole frames"):  # fmt: skip
        check_slice(_band((0, 1), pixels), _frame_request().encode(), 1 << 20)


def test_band_result_with_rows_outside_the_frame_is_rejected() -> None:
    tensors, meta = decode_tensors(_band((0, 1), np.zeros((H, W, 4), np.uint8)))
    meta = {**meta, "row_end": str(H)}
    with pytest.raises(RemoteProtocolError, match="not a band"):
        decode_result(encode_tensors(dict(tensors), metadata=meta))


def test_class_name() -> None:
    """The workload class string matches the manifest's (2.3.2)."""
    assert render.CLASS == "media.render"


# --- hoisting inline inputs to the blob store -----------------------------------------------------


def test_hoist_moves_an_inline_scene_and_assets_out_of_a_split_job() -> None:
    """Split in several slices, a job's inline scene and assets become blob references,
    and hoist returns exactly the bytes the blob store must hold; the slices of the hoisted
    job, once a node inlines the blobs, are the slices of the original job."""
    job = _request(assets=(("tex.png", TEX_SHA),), asset_data=((TEX_SHA, TEX),))
    moved = render_slices.hoist(job.encode(), 3)
    assert moved is not None
    payload, blobs = moved
    assert blobs == [(SHA, SCENE), (TEX_SHA, TEX)]
    light = RenderRequest.decode(payload)
    assert light.scene is None and light.scene_url == render.blob_url(SHA)
    assert light.asset_data == () and light.assets == job.assets
    assert light.blob_refs() == [("scene", SHA), ("asset tex.png", TEX_SHA)]
    store = {render.blob_url(sha): data for sha, data in blobs}
    resolved = [resolve_blobs(p, store.__getitem__) for p in split(payload, 3)]
    assert resolved == split(job.encode(), 3)
    assert len(payload) < len(job.encode()) - len(SCENE)


def test_hoist_leaves_what_needs_no_move() -> None:
    """One slice, or nothing inline: None (the job is split as it came). A slice count the
    split would refuse is refused the same way."""
    assert render_slices.hoist(_request().encode(), 1) is None
    assert render_slices.hoist(_request(frames=(1, 1)).encode(), 1) is None
    one_frame = _request(frames=(1, 1)).encode()
    with pytest.raises(RemoteProtocolError, match="slices must be in 1..1"):
        render_slices.hoist(one_frame, 4)
    with pytest.raises(RemoteProtocolError, match="slices must be in 1..1"):
        split(one_frame, 4)
    by_url = _request(scene_url=render.blob_url(SHA)).encode()
    assert render_slices.hoist(by_url, 3) is None
    tiled = _request(frames=(1, 1), tiles=2).encode()
    moved = render_slices.hoist(tiled, 2)
    assert moved is not None and moved[1] == [(SHA, SCENE)]


def test_a_result_with_no_frames_is_refused() -> None:
    """frame_start above frame_end and no tensors: refused when decoded, not an empty
    set of frames that a check then takes the min() of."""
    _, meta = decode_tensors(_result(1, 1))
    meta = {**meta, "frame_start": "5", "frame_end": "4"}
    with pytest.raises(RemoteProtocolError, match="one frame at least"):
        decode_result(encode_tensors({}, metadata=meta))


@pytest.mark.parametrize(
    ("paths", "says"),
    [
        (["a", "a/b"], "also a folder"),
        (["a", "a-x", "a/b/c"], "also a folder"),
        (["scene.blend"], "scene's own file"),
        (["scene.blend/tex.png"], "scene's own file"),
    ],
)
def test_asset_paths_that_would_collide_on_the_node_are_refused(
    paths: list[str], says: str
) -> None:
    """A file that is also another asset's folder, or an asset named as the scene's file,
    cannot be laid out beside the scene: refused at submission, not failed on a node."""
    assets = tuple((p, "ab" * 32) for p in sorted(paths))
    with pytest.raises(LocalProtocolError, match=says):
        make_request(SCENE, frames=(1, 1), width=W, height=H, samples=1, assets=assets)
