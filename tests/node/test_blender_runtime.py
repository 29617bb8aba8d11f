"""BlenderRuntime: media.render slices rendered by the real Blender (2.3.5 Work Execution).

Every test here runs the installed ``blender`` on tiny scenes (64x48, 4 samples), so a
render takes milliseconds per frame and most of each test is Blender's start-up.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nodeclient.coordinator.classes import REGISTRY
from nodeclient.errors import NodeClientError, RemoteProtocolError
from nodeclient.node.runtimes import RUNTIMES
from nodeclient.node.runtimes.base import no_progress
from nodeclient.node.runtimes.blender import OVERRIDE_SCRIPT, BlenderRuntime, decode_tga, usable
from nodeclient.workloads.render import CLASS, RenderRequest, make_request
from nodeclient.workloads.render_slices import decode_result
from tests.blender_scenes import BLENDER, FRAMES, HEIGHT, WIDTH, build_scenes

SAMPLES = 4
SEED = 7


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test scenes, built once for this module in one Blender run."""
    directory = tmp_path_factory.mktemp("scenes")
    build_scenes(
        directory,
        ("cube", "empty", "external", "textured", "autoexec", "stereo", "stereo-sbs",
         "layers", "rigidbody", "badname", "denoise", "stamp", "timelimit", "fileout",
         "fileout-unmuted", "geomute", "movie", "idprop", "customprop", "fileout-scene",
         "stamp-pointer", "stamp-tree-pointer", "stamp-backslash", "exposure",
         "nocam-composited", "cachename"),
    )  # fmt: skip
    return directory


@pytest.fixture(scope="module")
def scenes(scene_dir: Path) -> dict[str, bytes]:
    return {p.stem: p.read_bytes() for p in scene_dir.glob("*.blend")}


def _payload(scene: bytes, frames: tuple[int, int] = (1, FRAMES), **kw: object) -> bytes:
    kw.setdefault("width", WIDTH)
    kw.setdefault("height", HEIGHT)
    kw.setdefault("samples", SAMPLES)
    return make_request(scene, frames=frames, seed=SEED, **kw).encode()  # type: ignore[arg-type]


def _runtime(**kw: object) -> BlenderRuntime:
    return BlenderRuntime(threads=2, **kw)  # type: ignore[arg-type]


def _override(
    scene: bytes, directory: Path, **settings: object
) -> subprocess.CompletedProcess[str]:
    """One plain ``blender -b`` run of *scene* with the override script and *settings*
    (frames 1..FRAMES of WIDTH x HEIGHT by default), its frames in ``directory/frames``."""
    directory.mkdir()
    blend, script = directory / "scene.blend", directory / "override.py"
    blend.write_bytes(scene)
    script.write_text(OVERRIDE_SCRIPT)
    (directory / "frames").mkdir()
    cfg = {"frame_start": 1, "frame_end": FRAMES, "width": WIDTH, "height": HEIGHT,
           "samples": SAMPLES, "seed": SEED, "threads": 1, "out": str(directory / "frames")}  # fmt: skip
    cfg.update(settings)
    return subprocess.run(
        [BLENDER, "-b", "--factory-startup", "-Y", "-noaudio", str(blend),
         "--python-exit-code", "1", "-P", str(script),
         "-s", str(cfg["frame_start"]), "-e", str(cfg["frame_end"]), "-a",
         "--", json.dumps(cfg)],
        check=False, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _direct_render(scene: bytes, tmp_path: Path) -> dict[int, np.ndarray]:
    """All frames in one plain ``blender -b`` run with the same override, read by Pillow."""
    out = tmp_path / "direct" / "frames"
    _override(scene, tmp_path / "direct").check_returncode()
    return {
        f: np.asarray(Image.open(out / f"frame_{f:06d}.tga", formats=["TGA"]).convert("RGBA"))
        for f in range(1, FRAMES + 1)
    }


def test_a_worker_that_cannot_find_blender_withdraws_render(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon's check looks on its own PATH; a worker, in the sandbox, sees /usr and
    the library directories only. Blender linked from a PATH directory to a tree the
    worker does not see (an install under /opt) is a link that leads nowhere there: the
    worker's start-up check fails, naming what to do, and the class is withdrawn rather
    than every slice failing as the node's. Blender the worker finds passes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "blender").symlink_to(tmp_path / "opt" / "blender-4.2" / "blender")  # not there
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(NodeClientError, match="not found inside the worker.*under /usr"):
        BlenderRuntime().self_check()
    monkeypatch.setenv("PATH", "/usr/local/bin:/usr/bin:/bin")  # the worker's, in the sandbox
    BlenderRuntime().self_check()


def test_sliced_render_matches_one_direct_render(scenes, tmp_path: Path) -> None:
    """Split into 3 slices by the registry, rendered by the runtime and assembled, the job
    has exactly the pixels of one direct Blender render of all frames."""
    wclass = REGISTRY[CLASS]
    payload = _payload(scenes["cube"])
    meta = wclass.validate(payload, 32 << 20)
    slices = wclass.split(payload, 3)
    assert len(slices) == 3
    runtime = _runtime()
    results = []
    for part in slices:
        result = runtime.run(part, workdir=tmp_path)
        wclass.check_result(result, meta, 32 << 20)
        results.append(result)
    assembled = decode_result(wclass.assemble(results, meta))
    direct = _direct_render(scenes["cube"], tmp_path)
    assert sorted(assembled.frames) == list(range(1, FRAMES + 1))
    for frame, pixels in direct.items():
        assert pixels.shape == (HEIGHT, WIDTH, 4)
        np.testing.assert_array_equal(assembled.frames[frame], pixels, err_msg=f"frame {frame}")
    assert not np.array_equal(direct[1], direct[FRAMES])  # the cube does move
    assert list(tmp_path.glob("render-*")) == []  # the private directory is gone


def test_tiled_frame_matches_one_direct_render(scenes, tmp_path: Path) -> None:
    """One frame split into 3 bands (border renders, cropped) by the registry, rendered
    and stitched, has exactly the pixels of that frame in one direct Blender render."""
    wclass = REGISTRY[CLASS]
    frame = FRAMES // 2 + 1
    payload = _payload(scenes["cube"], frames=(frame, frame), tiles=3)
    meta = wclass.validate(payload, 32 << 20)
    slices = wclass.split(payload, 1)
    runtime = _runtime()
    results = []
    for part in slices:
        result = runtime.run(part, workdir=tmp_path)
        wclass.check_result(result, meta, 32 << 20)
        band = decode_result(result)
        assert band.rows is not None
        assert band.frames[frame].shape == (band.rows[1] - band.rows[0] + 1, WIDTH, 4)
        results.append(result)
    stitched = decode_result(wclass.assemble(results, meta))
    assert stitched.rows is None and list(stitched.frames) == [frame]
    direct = _direct_render(scenes["cube"], tmp_path)[frame]
    np.testing.assert_array_equal(stitched.frames[frame], direct)
    top = decode_result(results[0]).frames[frame]
    assert not np.array_equal(top, direct[-top.shape[0] :])  # bands are not the same rows


def test_same_slice_gives_the_same_result_bytes(scenes, tmp_path: Path) -> None:
    """Pinned seed and samples: two runs, with different thread counts, give equal bytes,
    so proofs of execution from two nodes can be compared (2.3.6)."""
    payload = _payload(scenes["cube"], frames=(2, 3))
    one = BlenderRuntime(threads=1).run(payload, workdir=tmp_path)
    two = BlenderRuntime(threads=2).run(payload, workdir=tmp_path)
    assert hashlib.sha256(one).digest() == hashlib.sha256(two).digest()


def test_progress_is_reported_as_frames_are_saved(scenes, tmp_path: Path) -> None:
    """Frames saved report (done, total, "frame N saved"), in order, the last saved of
    each look (frames saved between two looks are one report), to the last frame."""
    calls: list[tuple[float, float, str]] = []
    _runtime().run(
        _payload(scenes["cube"], frames=(4, 6)),
        workdir=tmp_path,
        progress=lambda d, t, n: calls.append((d, t, n)),
    )
    assert calls[-1] == (3, 3, "frame 6 saved"), calls
    assert [d for d, _, _ in calls] == sorted({d for d, _, _ in calls})  # never back
    assert all(note == f"frame {3 + int(d)} saved" for d, _, note in calls), calls


class _SavesTwo:
    """Stands in for Blender saving frames 1 and 2 between two looks, then 3 and exiting."""

    def __init__(self, out: Path) -> None:
        self.out, self.waits = out, 0
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self.waits += 1
        if self.waits == 1:
            for frame in (1, 2):
                (self.out / f"frame_{frame:06d}.tga").write_bytes(b"")
            raise subprocess.TimeoutExpired("blender", timeout or 0)
        (self.out / "frame_000003.tga").write_bytes(b"")
        self.returncode = 0
        return 0


def test_frames_saved_between_two_looks_are_one_report_of_the_latest(tmp_path: Path) -> None:
    """Two frames saved between two looks give one report, of the second: a report of the
    first, sent just before it, would be held back by the throttles and the first shown
    while the next frame renders."""
    runtime = BlenderRuntime(threads=1)
    request = RenderRequest.decode(_payload(b"scene", frames=(1, 3)))
    calls: list[tuple[float, float, str]] = []
    proc = _SavesTwo(tmp_path)
    runtime._watch(proc, request, tmp_path, lambda d, t, n: calls.append((d, t, n)))  # type: ignore[arg-type]
    assert calls == [(2, 3, "frame 2 saved"), (3, 3, "frame 3 saved")]


def _frame(runtime: BlenderRuntime, payload: bytes, workdir: Path, frame: int) -> np.ndarray:
    return decode_result(runtime.run(payload, workdir=workdir)).frames[frame]


def test_view_layer_samples_do_not_override_the_request(scenes, tmp_path: Path) -> None:
    """A view layer's own sample count (2000 here) would replace the scene's in Cycles: the
    request's samples hold, and the pixels are those of the same scene without it."""
    runtime = _runtime()
    layers = _frame(runtime, _payload(scenes["layers"], frames=(2, 2)), tmp_path, 2)
    plain = _frame(runtime, _payload(scenes["cube"], frames=(2, 2)), tmp_path, 2)
    np.testing.assert_array_equal(layers, plain)


def test_only_the_first_enabled_view_layer_renders(scenes, tmp_path: Path) -> None:
    """Every enabled view layer would render in full; only the first one does, the one
    Blender writes when nothing is composited (Cycles names it in its status lines)."""
    run = _override(scenes["layers"], tmp_path / "direct", frame_end=1)
    run.check_returncode()
    rendered = {line.split(" | ")[-2] for line in run.stdout.splitlines()
                if line.startswith("Fra:") and "Sample" in line}  # fmt: skip
    assert rendered == {"Scene, ViewLayer"}


@pytest.mark.parametrize("variant", ["stereo", "stereo-sbs"])
def test_stereo_output_is_turned_off(scenes, tmp_path: Path, variant: str) -> None:
    """A scene set up for stereo renders one plain view: no file per view (which the
    rename of the frame file would not find), no side-by-side image twice as wide."""
    runtime = _runtime()
    stereo = _frame(runtime, _payload(scenes[variant], frames=(1, 1)), tmp_path, 1)
    plain = _frame(runtime, _payload(scenes["cube"], frames=(1, 1)), tmp_path, 1)
    np.testing.assert_array_equal(stereo, plain)


def test_compositor_denoise_nodes_are_muted(scenes, tmp_path: Path) -> None:
    """A compositor Denoise node (in the scene's tree or a node group) would run
    OpenImageDenoise in a Blender built with it, so two nodes' frames of one slice could
    differ: the override mutes every one, as it does File Output nodes."""
    check = tmp_path / "check.py"
    check.write_text(
        "import bpy\n"
        "trees = [s.node_tree for s in bpy.data.scenes] + list(bpy.data.node_groups)\n"
        "print('DENOISE', sorted(n.mute for t in trees if t for n in t.nodes"
        " if n.type == 'DENOISE'))\n"
    )
    directory = tmp_path / "direct"
    directory.mkdir()
    (directory / "frames").mkdir()
    (directory / "scene.blend").write_bytes(scenes["denoise"])
    (directory / "override.py").write_text(OVERRIDE_SCRIPT)
    cfg = {"frame_start": 2, "frame_end": 1, "width": WIDTH, "height": HEIGHT,  # no frame
           "samples": SAMPLES, "seed": SEED, "threads": 1, "out": str(directory / "frames")}  # fmt: skip
    run = subprocess.run(
        [BLENDER, "-b", "--factory-startup", "-Y", "-noaudio", str(directory / "scene.blend"),
         "--python-exit-code", "1", "-P", str(directory / "override.py"), "-P", str(check),
         "--", json.dumps(cfg)],
        check=True, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "DENOISE [True, True]" in run.stdout


@pytest.mark.parametrize(
    ("variant", "path"),
    [
        ("stamp", "render.use_stamp"),
        ("timelimit", "cycles.time_limit"),
        ("idprop", '["cycles"]["samples"]'),  # the same settings, as ID properties
        ("fileout-scene", 'node_tree.nodes["FO"].mute'),  # from the scene, not its tree
        ("fileout-unmuted", 'nodes["FO"].mute'),
        # through a pointer: a Render Layers node's scene, from the scene or its tree
        ("stamp-pointer", 'node_tree.nodes["Render Layers"].scene.render.use_stamp'),
        ("stamp-tree-pointer", 'nodes["Render Layers"].scene.render.use_stamp'),
        # a key ending in an escaped backslash (a node named R\), read as a closed key
        ("stamp-backslash", 'node_tree.nodes["R\\\\"].scene.render.use_stamp'),
    ],
)
def test_a_scene_that_animates_a_pinned_setting_is_refused(
    scenes, scene_dir: Path, tmp_path: Path, variant: str, path: str
) -> None:
    """Keyframes and drivers run again at every frame and in the render's own copy of the
    scene, after the override: a keyframed stamp would burn the node's hostname and clock
    into the pixels, a driven time limit would make them depend on the machine's speed,
    and a keyframed mute would switch a File Output back on. Such a scene is refused as
    the requester's fault, and nothing is written where its File Output points."""
    refused = "the scene animates settings the node pins .*" + re.escape(path)
    with pytest.raises(RemoteProtocolError, match=refused):
        _runtime().run(_payload(scenes[variant], frames=(1, 1)), workdir=tmp_path)
    assert not (scene_dir / f"{variant}.blend.fileout").exists()


def test_an_animated_view_transform_is_the_scenes_own(scenes, tmp_path: Path) -> None:
    """An animated exposure (colour management, not a pinned setting, and reached with no
    pointer to another data-block) is the requester's animation: the scene renders."""
    frame = _frame(_runtime(), _payload(scenes["exposure"], frames=(1, 1)), tmp_path, 1)
    assert frame.shape == (HEIGHT, WIDTH, 4)


def test_a_composited_scene_blender_cannot_render_is_the_requesters_fault(
    scenes, tmp_path: Path
) -> None:
    """The compositor's second Render Layers node renders a scene with no camera: Blender
    would stop with "Cannot render, no camera" on every node, which read as a node's
    crash, charged to three nodes before the job failed. It is refused as the request's."""
    refused = "the compositor renders scene 'Other', which has no active camera"
    with pytest.raises(RemoteProtocolError, match=re.escape(refused)):
        _runtime().run(_payload(scenes["nocam-composited"], frames=(1, 1)), workdir=tmp_path)


def test_a_point_cache_named_as_a_path_is_refused(scenes, tmp_path: Path) -> None:
    """A disk cache's files are named after the cache: a name that is a path (which
    Blender's interface never makes, a file edited by hand may) would write outside the
    slice's directory. Refused, naming it."""
    marker, evil = b"CACHENAMEMARKER00", b"../../../../tmp/x"
    assert len(marker) == len(evil) and marker in scenes["cachename"]
    # named as Blender names it, the same disk cache renders (its empty path is no file)
    frame = _frame(_runtime(), _payload(scenes["cachename"], frames=(1, 1)), tmp_path, 1)
    assert frame.shape == (HEIGHT, WIDTH, 4)
    scene = scenes["cachename"].replace(marker, evil)
    with pytest.raises(RemoteProtocolError, match="point cache names must not be paths"):
        _runtime().run(_payload(scene, frames=(1, 1)), workdir=tmp_path)


def test_an_animated_mute_outside_the_compositor_is_the_scenes_own(scenes, tmp_path: Path) -> None:
    """Only a compositor node's mute is pinned: a geometry-nodes node whose mute is
    keyframed is the requester's animation, and the scene renders."""
    frame = _frame(_runtime(), _payload(scenes["geomute"], frames=(1, 1)), tmp_path, 1)
    assert frame.shape == (HEIGHT, WIDTH, 4)


def test_an_animated_custom_property_of_the_scene_is_the_scenes_own(scenes, tmp_path: Path) -> None:
    """A keyframed custom property of the scene (``["ctrl"]``, which drivers elsewhere may
    read) reaches no pinned setting: the scene renders. Only ``["cycles..."]`` paths, or
    ones that do not read as a plain key, are refused."""
    frame = _frame(_runtime(), _payload(scenes["customprop"], frames=(1, 1)), tmp_path, 1)
    assert frame.shape == (HEIGHT, WIDTH, 4)


def test_a_file_output_node_writes_nothing(scenes, scene_dir: Path, tmp_path: Path) -> None:
    """A compositor File Output node would write each frame where the scene says: the
    override removes it, and the frame renders as it would without it."""
    frame = _frame(_runtime(), _payload(scenes["fileout"], frames=(1, 1)), tmp_path, 1)
    assert frame.shape == (HEIGHT, WIDTH, 4)
    assert not (scene_dir / "fileout.blend.fileout").exists()


def test_a_size_blender_would_change_is_refused(scenes, tmp_path: Path) -> None:
    """Blender makes a side of 1..3 pixels 4 (requests refuse them before a node sees
    one): the override refuses to render at another size than the one asked for."""
    run = _override(scenes["cube"], tmp_path / "direct", frame_end=1, width=3)
    assert run.returncode == 3
    assert "NODECLIENT-REJECT: Blender cannot render 3x48 (it makes it 4x48)" in run.stdout
    assert list((tmp_path / "direct" / "frames").iterdir()) == []


def test_a_later_slice_of_a_simulation_matches_the_whole_render(scenes, tmp_path: Path) -> None:
    """An unbaked rigid body advances one frame at a time from the scene's first frame: a
    slice of frames 4..6 steps through frames 1..3 first, so its frames are those of a
    render of 1..6."""
    runtime = _runtime()
    whole = decode_result(runtime.run(_payload(scenes["rigidbody"]), workdir=tmp_path))
    late = decode_result(
        runtime.run(_payload(scenes["rigidbody"], frames=(4, FRAMES)), workdir=tmp_path)
    )
    for frame in range(4, FRAMES + 1):
        np.testing.assert_array_equal(late.frames[frame], whole.frames[frame], f"frame {frame}")


def test_external_file_reference_is_refused(scenes, tmp_path: Path) -> None:
    """A scene that points at a file outside itself is the requester's fault."""
    with pytest.raises(RemoteProtocolError, match="external files"):
        _runtime().run(_payload(scenes["external"], frames=(1, 1)), workdir=tmp_path)


def test_a_packed_movie_reading_a_file_of_the_node_is_refused(
    scenes, scene_dir: Path, tmp_path: Path
) -> None:
    """A packed image switched to a movie is read from its path, not its packed data: it
    would bring a file of the node (here a green PNG beside the scene) into the frame.
    Refused as the requester's fault, unless the path is one of the request's assets."""
    assert (scene_dir / "movie.blend.secret.png").exists()
    with pytest.raises(RemoteProtocolError, match="movies or image sequences outside its asset"):
        _runtime().run(_payload(scenes["movie"], frames=(1, 1)), workdir=tmp_path)


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(out, format="PNG")
    return out.getvalue()


def _with_texture(scene: bytes, path: str, texture: bytes) -> bytes:
    sha = hashlib.sha256(texture).hexdigest()
    return _payload(scene, frames=(3, 3), assets=((path, sha),), asset_data=((sha, texture),))


def test_asset_manifest_supplies_a_relative_texture(scenes, tmp_path: Path) -> None:
    """A scene that uses //textures/checker.png renders with the file the manifest
    supplies, and a different file there gives different pixels."""
    grid = np.indices((8, 8)).sum(axis=0) % 2 * 255
    checker = np.stack([grid, 255 - grid, grid, np.full_like(grid, 255)], -1).astype(np.uint8)
    green = np.zeros((8, 8, 4), np.uint8)
    green[..., 1] = green[..., 3] = 255
    runtime = _runtime()
    frames = []
    for texture in (checker, green):
        payload = _with_texture(scenes["textured"], "textures/checker.png", _png(texture))
        frames.append(decode_result(runtime.run(payload, workdir=tmp_path)).frames[3])
    first, second = frames
    assert not np.array_equal(first, second)  # the texture really comes from the manifest
    assert list(tmp_path.glob("render-*")) == []  # assets are gone with the slice


def test_scene_file_outside_the_manifest_is_refused(scenes, tmp_path: Path) -> None:
    """No manifest, or a manifest naming another path: the relative texture is refused."""
    with pytest.raises(RemoteProtocolError, match="outside its asset manifest"):
        _runtime().run(_payload(scenes["textured"], frames=(1, 1)), workdir=tmp_path)
    other = _with_texture(scenes["textured"], "textures/other.png", b"\x89PNG not used")
    with pytest.raises(RemoteProtocolError, match="textures/checker.png"):
        _runtime().run(other, workdir=tmp_path)


def test_scripts_inside_the_blend_do_not_run(scenes, scene_dir: Path, tmp_path: Path) -> None:
    """-Y: a text block registered to run on load stays inert; with -y it would run."""
    marker = scene_dir / "autoexec.blend.autorun-marker"
    _runtime().run(_payload(scenes["autoexec"], frames=(1, 1)), workdir=tmp_path)
    assert not marker.exists()
    subprocess.run(
        [BLENDER, "-b", "--factory-startup", "-y", "-noaudio", str(scene_dir / "autoexec.blend")],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    assert marker.read_text() == "ran"
    marker.unlink()


def test_blank_render_is_rejected_by_the_coordinator(scenes, tmp_path: Path) -> None:
    """A render with one colour everywhere fails the coordinator's result check."""
    payload = _payload(scenes["empty"], frames=(1, 1))
    result = _runtime().run(payload, workdir=tmp_path)
    wclass = REGISTRY[CLASS]
    with pytest.raises(RemoteProtocolError, match="blank"):
        wclass.check_result(result, wclass.validate(payload, 32 << 20), 32 << 20)


def test_wrong_size_render_is_rejected_by_the_coordinator(scenes, tmp_path: Path) -> None:
    """A result rendered at another size than the job asked for is refused."""
    wclass = REGISTRY[CLASS]
    meta = wclass.validate(_payload(scenes["cube"]), 32 << 20)
    small = _runtime().run(
        _payload(scenes["cube"], frames=(1, 1), width=32, height=24), workdir=tmp_path
    )
    with pytest.raises(RemoteProtocolError, match="32x24, not 64x48"):
        wclass.check_result(small, meta, 32 << 20)


def test_fetched_scene_with_wrong_hash_is_refused(scenes, tmp_path: Path) -> None:
    """Bytes fetched for scene_url must hash to scene_sha256 before anything uses them."""
    payload = make_request(
        scenes["cube"], frames=(1, 1), width=WIDTH, height=HEIGHT, samples=SAMPLES,
        scene_url="https://blobs.example/scene",
    ).encode()  # fmt: skip
    runtime = _runtime(cache_dir=tmp_path / "cache", fetch_scene=lambda _url: scenes["empty"])
    with pytest.raises(RemoteProtocolError, match="fetched scene has sha256"):
        runtime.run(payload, workdir=tmp_path)
    assert runtime.cache is not None
    assert runtime.cache.entries() == []


def test_fetched_scene_is_cached_by_hash(scenes, tmp_path: Path) -> None:
    """A scene fetched once is served from the cache the next time."""
    fetched: list[str] = []

    def fetch(url: str) -> bytes:
        fetched.append(url)
        return scenes["cube"]

    payload = make_request(
        scenes["cube"], frames=(1, 1), width=WIDTH, height=HEIGHT, samples=SAMPLES,
        scene_url="https://blobs.example/scene",
    ).encode()  # fmt: skip
    runtime = _runtime(cache_dir=tmp_path / "cache", fetch_scene=fetch)
    first = runtime.run(payload, workdir=tmp_path)
    assert runtime.run(payload, workdir=tmp_path) == first
    assert fetched == ["https://blobs.example/scene"]


class _Stepping:
    """Stands in for Blender while the override steps the scene: every wait, the clock
    moves on 0.6 s and ``.stepped`` names the next frame; it exits after *steps* waits."""

    def __init__(self, out: Path, clock: list[float], steps: int, *, marks: bool) -> None:
        self.out, self.clock, self.left, self.marks = out, clock, steps, marks
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self.clock[0] += 0.6
        self.left -= 1
        if self.marks:
            (self.out / ".stepped").write_text(str(1000 - self.left))
        if self.left <= 0:
            (self.out / "frame_001000.tga").write_bytes(b"")
            self.returncode = 0
            return 0
        raise subprocess.TimeoutExpired("blender", timeout or 0)


@pytest.mark.parametrize("marks", [True, False])
def test_stepping_a_long_scene_to_the_slices_first_frame_is_progress(
    tmp_path: Path, marks: bool
) -> None:
    """A slice that starts late in a long scene steps through every frame before it (for
    simulations) before its first frame is saved: minutes in a heavy scene. Each change
    of the override's ``.stepped`` counts as progress, so the no-progress timeout (1 s
    here, 6 s of stepping) does not kill a slice that is working; without the marks it
    does. (Before, the stepping counted for nothing, and the slice failed as the node's
    fault.)"""
    clock = [0.0]
    runtime = BlenderRuntime(threads=1, max_seconds_per_frame=1, clock=lambda: clock[0])
    request = RenderRequest.decode(_payload(b"scene", frames=(1000, 1000)))
    proc = _Stepping(tmp_path, clock, steps=10, marks=marks)
    if marks:
        runtime._watch(proc, request, tmp_path, no_progress)  # type: ignore[arg-type]
        assert proc.returncode == 0
    else:
        with pytest.raises(NodeClientError, match="no progress, no frame saved"):
            runtime._watch(proc, request, tmp_path, no_progress)  # type: ignore[arg-type]


def test_the_override_marks_its_stepping(scenes, tmp_path: Path) -> None:
    """The override writes the frame its stepping reached to ``.stepped`` in the output
    directory (at once, then every 0.2 s), which the runtime's watcher reads."""
    run = _override(scenes["cube"], tmp_path / "direct", frame_start=2000, frame_end=2000)
    assert run.returncode == 0, run.stdout[-2000:]
    reached = int((tmp_path / "direct" / "frames" / ".stepped").read_text())
    assert 1 <= reached <= 2000


def test_no_progress_timeout_kills_blender(scenes, tmp_path: Path) -> None:
    """No frame saved within max_seconds_per_frame: Blender is killed and the reason says so."""
    slow = _payload(scenes["cube"], frames=(1, 2), width=640, height=480, samples=65536,
                    max_seconds_per_frame=1)  # fmt: skip
    started = time.monotonic()
    with pytest.raises(
        NodeClientError, match=r"no progress, no frame saved \(nor the scene stepped\) for 1 s"
    ):
        _runtime().run(slow, workdir=tmp_path)
    assert time.monotonic() - started < 10
    assert list(tmp_path.glob("render-*")) == []


def test_hard_cap_kills_blender(scenes, tmp_path: Path) -> None:
    """The slice's hard cap holds even while the no-progress timeout has not run out."""
    slow = _payload(scenes["cube"], frames=(1, 2), width=640, height=480, samples=65536,
                    max_seconds=1)  # fmt: skip
    with pytest.raises(NodeClientError, match="hard cap of 1 s"):
        _runtime().run(slow, workdir=tmp_path)


_WORKER = """
import sys
from pathlib import Path
from nodeclient.node.runtimes.blender import BlenderRuntime
BlenderRuntime(threads=1).run(Path(sys.argv[1]).read_bytes(), workdir=Path(sys.argv[2]))
"""


def _children(pid: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:  # not a process, or gone
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # the field after the state
            found.append(int(name))
    return found


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")  # a zombie has ended


def test_blender_dies_with_its_worker(scenes, tmp_path: Path) -> None:
    """Blender leads its own process group, so killing the worker's group (how the
    executor ends an unsandboxed worker) misses it; it still dies with the worker instead
    of rendering on with no cap."""
    payload = tmp_path / "slow.payload"
    payload.write_bytes(_payload(scenes["cube"], frames=(1, 1), width=640, height=480,
                                 samples=65536))  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    worker = subprocess.Popen(
        [sys.executable, "-c", _WORKER, str(payload), str(tmp_path)],
        env=env, start_new_session=True,
    )  # fmt: skip
    blender: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while not blender and time.monotonic() < deadline and worker.poll() is None:
            time.sleep(0.1)
            blender = _children(worker.pid)
        assert blender, "the worker started no Blender"
        assert os.getpgid(blender[0]) != worker.pid  # its own group: killpg misses it
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
        deadline = time.monotonic() + 10
        while _running(blender[0]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(blender[0])
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        for pid in blender:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


# What Blender 3.4 prints when Cycles cannot allocate under an address-space limit (captured
# from a real 8000x8000 render under RLIMIT_AS; reproducing it takes a minute of rendering).
ALLOC_FAILURE = (
    "Malloc returns null: len=1280000000 in Cycles Aligned Alloc, total 9146112\n"
    "terminate called after throwing an instance of 'std::bad_alloc'\n"
)


STATUS_NAMED_OOM = (
    "Fra:1 Mem:9.00M (Peak 9.00M) | Time:00:00.01 | Mem:0.00M, Peak:0.00M | Scene, "
    "Out of memory: Malloc returns null | Sample 0/4"
)
SCRIPT_FAILED = "echo \"Error: script failed, file: '/tmp/override.py', exiting.\""
MALLOC_NULL = "Malloc returns null: len=1280000000 in Cycles Aligned Alloc, total 9146112"


@pytest.mark.parametrize(
    ("script", "reason"),
    [
        ("kill -SEGV $$", "crash: blender died of signal SIGSEGV"),
        ("kill -KILL $$", "out of memory: blender was killed"),
        (f"printf '{ALLOC_FAILURE}'; kill -ABRT $$", "out of memory: blender could not allocate"),
        ("echo 'Error: Cannot read file'; exit 1", "crash: blender exited with code 1"),
        # Cycles' status lines carry the requester's scene and view layer names.
        (f"echo '{STATUS_NAMED_OOM}'; kill -ABRT $$", "crash: blender died of signal SIGABRT"),
        (f"echo '{STATUS_NAMED_OOM}'; {SCRIPT_FAILED}; exit 1", "crash: the override"),
        # The override script raised: a crash, whatever else the log holds.
        (f"echo '{MALLOC_NULL}'; {SCRIPT_FAILED}; exit 1", "crash: the override script failed"),
        (f"echo '{MALLOC_NULL}'; exit 1", "out of memory: blender could not allocate"),
    ],
)
def test_crash_and_oom_are_told_apart(tmp_path: Path, script: str, reason: str) -> None:
    """Crashes, the OOM killer and failed allocations each give their own reason."""
    fake = tmp_path / "blender"
    fake.write_text(f"#!/bin/sh\n{script}\n")
    fake.chmod(0o700)
    runtime = _runtime(blender=str(fake))
    payload = _payload(b"not a real scene", frames=(1, 1))
    with pytest.raises(NodeClientError, match=reason):
        runtime.run(payload, workdir=tmp_path)


def test_decode_tga_reads_bottom_up_bgra() -> None:
    """Blender's raw TGA: BGRA rows stored bottom row first; decoded RGBA is top row first."""
    header = bytes([0, 0, 2] + [0] * 9) + (2).to_bytes(2, "little") + (2).to_bytes(2, "little")
    rows = bytes([3, 2, 1, 255, 7, 6, 5, 255]) + bytes([13, 12, 11, 255, 17, 16, 15, 255])
    pixels = decode_tga(header + bytes([32, 8]) + rows, width=2, height=2)
    assert pixels.tolist() == [
        [[11, 12, 13, 255], [15, 16, 17, 255]],
        [[1, 2, 3, 255], [5, 6, 7, 255]],
    ]


def test_runtime_is_registered_and_usable() -> None:
    """media.render is offered when blender is on PATH, with its version in the reason."""
    info = RUNTIMES[CLASS]
    assert info.requirements.binaries == ("blender",)
    ok, why = usable()
    assert ok
    assert why.startswith(("Blender 3.", "Blender 4."))
    assert info.usable()[0]


def test_render_is_offered_only_where_tasks_run_in_the_sandbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blender writes a scene's disk caches (a particle system's, named in the .blend)
    while it loads the file, before the override can refuse the scene: a node that runs
    tasks unsandboxed (allowed by its operator) does not offer media.render, and its
    manifest says so; the other classes are unchanged."""
    from nodeclient.node import cli_keys, keys
    from nodeclient.node.config import NodeConfig
    from nodeclient.node.runtimes import NEEDS_SANDBOX, usable_workload_classes

    unsandboxed = usable_workload_classes(sandboxed=False)
    assert unsandboxed[CLASS] == (False, NEEDS_SANDBOX)
    assert unsandboxed["ai.inference"] == usable_workload_classes()["ai.inference"]
    assert usable_workload_classes(sandboxed=True)[CLASS][0]
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    keys.init_keys(home, passphrase=None)
    config = NodeConfig(wallet_address="0x" + "11" * 20)
    monkeypatch.setattr(cli_keys.wallet, "load_proof", lambda *a, **k: None)
    classes = {
        sandboxed: cli_keys.build_local_manifest(home, config, lambda: b"", sandboxed=sandboxed)[
            "workload_classes"
        ]
        for sandboxed in (True, False)
    }
    assert CLASS in classes[True] and CLASS not in classes[False]
    assert set(classes[True]) - set(classes[False]) == {CLASS}


def test_a_slice_declaring_little_memory_renders_in_the_sandbox(scenes, tmp_path: Path) -> None:
    """Blender maps ~0.75 GiB before it renders anything (it touches far less): a slice
    that declares 256 MB of RAM renders in a sandboxed worker, with the same bytes as in
    this process. Blender's own mapping is not counted against the declaration."""
    import asyncio

    from nodeclient.node import sandbox
    from nodeclient.node.executor import Executor, WorkerConfig

    payload = _payload(scenes["cube"], frames=(2, 3))
    executor = Executor(
        slots=1, config=WorkerConfig(cache_dir=tmp_path / "cache", threads=1),
        mode=sandbox.choose_mode(allow_unsandboxed=False),
    )  # fmt: skip

    async def render() -> bytes:
        try:
            return await executor.run(CLASS, payload, resources={"ram_mb": 256})
        finally:
            await executor.aclose()

    assert asyncio.run(render()) == BlenderRuntime(threads=1).run(payload, workdir=tmp_path)


def test_a_name_with_a_control_character_is_refused(scenes, tmp_path: Path) -> None:
    """Blender prints layer and object names in its log, which the runtime reads to tell
    an out-of-memory from a crash: a name holding a newline could print a line of
    Blender's own wording. Such a scene is refused as the request's fault."""
    with pytest.raises(RemoteProtocolError, match="control characters"):
        _runtime().run(_payload(scenes["badname"], frames=(1, 1)), workdir=tmp_path)


def test_blender_starts_with_the_limit_the_worker_set_for_the_tasks_program() -> None:
    """On a GPU slot the worker sets the limit of the program a task starts (its own holds
    CUDA's reservations, which Blender does not): Blender starts with it, and reports it
    when it runs out of memory. Without one, Blender inherits the worker's limit."""
    import resource

    from nodeclient.node.runtimes import base, blender

    show = [
        sys.executable,
        "-c",
        "import resource; print(*resource.getrlimit(resource.RLIMIT_AS))",
    ]

    def child_limits() -> tuple[int, int]:
        done = subprocess.run(
            show, preexec_fn=blender._blender_preexec(),
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        soft, hard = map(int, done.stdout.split())
        return soft, hard

    own = resource.getrlimit(resource.RLIMIT_AS)[0]
    base.set_child_address_space(3 << 30)
    try:
        assert child_limits() == (3 << 30, 3 << 30)  # the hard one too: Blender keeps it
        assert blender._memory_limit() == (
            3 << 30 if own == resource.RLIM_INFINITY else min(own, 3 << 30)
        )
    finally:
        base.set_child_address_space(None)
    assert child_limits()[0] == own
