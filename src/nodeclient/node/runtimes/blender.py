"""Run ``media.render`` slices with Blender (Cycles on the CPU), headless and pinned.

2.3.5 Work Execution: "a parallelizable sub-task runs its slice". :meth:`BlenderRuntime.run`
takes one decrypted slice payload (:mod:`nodeclient.workloads.render`), renders exactly
its frames and returns the canonical result bytes that the proof of execution covers.

Theory of operation:

* the scene is found by its SHA-256: inline bytes, else the on-disk cache, else
  ``fetch_scene(url)``; fetched bytes are hashed before use and only then cached. The
  scene, and the files of its asset manifest (inlined by the daemon, each checked
  against its SHA-256) at their relative paths next to it, are written to a private
  directory that is removed when the slice ends;
* Blender runs as ``blender -b --factory-startup -Y -noaudio scene.blend
  --python-exit-code 1 -P <override> -s <first> -e <last> -a -- <settings>``: no user
  preferences, no scripts from the .blend (``-Y``), and *our* override script
  (:data:`OVERRIDE_SCRIPT`, never the requester's) pins everything that must not vary or
  must not run (one view layer, at the request's samples; no stereo), refuses scenes that
  reference files outside themselves and their asset manifest, and steps unbaked
  simulations from the scene's first frame through the slice's last; then ``-s``/``-e``
  set the scene's range to the slice's frames and ``-a`` renders exactly those;
* each frame is written under a temporary name and renamed when complete, so a frame
  file that exists is a finished frame. The runtime watches that directory: every new
  frame reports progress, and Blender is killed when no frame appears within the
  no-progress timeout or the slice passes its hard cap. Blender leads its own process
  group and dies with its parent (``PR_SET_PDEATHSIG``), so a killed worker takes it along;
* a tile slice renders one band of rows of its frame: a border render cropped to the
  band, with compositing off (:mod:`nodeclient.workloads.render` stitches the bands);
* frames are written as uncompressed 32-bit TGA and decoded here with numpy, so the
  node needs no image library, and the result carries pixels, not files.

Faults the requester caused (a bad payload, a hash mismatch, external file references, a
scene without a camera) raise RemoteProtocolError. Failures of this node (a crash, out of
memory, a timeout) raise NodeClientError with a reason that tells them apart, which the
signed Reject carries to the coordinator.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, Final

import numpy as np
import numpy.typing as npt

from nodeclient.entry import die_with_parent
from nodeclient.errors import NodeClientError, RemoteProtocolError
from nodeclient.node.runtimes.base import Progress, child_address_space, no_progress
from nodeclient.node.runtimes.onnx import ModelCache
from nodeclient.workloads.render import (
    CHANNELS,
    CLASS,
    DEFAULT_MAX_SECONDS,
    SCENE_FILE,
    RenderRequest,
)
from nodeclient.workloads.render_slices import encode_result
from nodeclient.workloads.tensors import DEFAULT_MAX_BYTES

DEFAULT_MAX_SCENE_BYTES: Final = 256 * 1024 * 1024
DEFAULT_MAX_CACHE_BYTES: Final = 4 * 1024 * 1024 * 1024
DEFAULT_MAX_SECONDS_PER_FRAME: Final = 600
REJECT_MARKER: Final = "NODECLIENT-REJECT:"
REJECT_EXIT: Final = 3
_LOG_TAIL: Final = 4096
_FRAME_SUFFIX: Final = ".tga"
# Whole lines Blender, its allocator or the C++ runtime print when memory runs out. Only
# whole lines count, and never Cycles' "Fra:" status lines: those carry the requester's
# scene and view layer names, which may say anything.
_OOM_LINES: Final = re.compile(
    r"(?:Malloc|Calloc|Memoryblock \w+) returns null: len=\d+ in .*"  # guarded allocator
    r"|terminate called after throwing an instance of 'std::bad_alloc'"  # Cycles, OpenVDB
    r"|\s*what\(\):\s+std::bad_alloc"
    r"|\S+: error while loading shared libraries: \S+: failed to map segment from shared"
    r" object(?:: Cannot allocate memory)?"  # the dynamic linker, under an address-space limit
)
_STATUS_LINE: Final = "Fra:"
# What Blender prints, then exiting 1 (--python-exit-code), when the override script raised.
_SCRIPT_FAILED: Final = re.compile(r"Error: script failed, file: '.*', exiting\.")

# Our override script: runs inside Blender after the scene is loaded. Everything that
# decides the pixels is pinned here, for every scene in the file (a compositor can render
# other scenes), and everything that could run code or write files is switched off.
OVERRIDE_SCRIPT: Final = r"""
import json
import os
import re
import sys
import time

import bpy

cfg = json.loads(sys.argv[sys.argv.index("--") + 1])


def reject(reason):
    print("NODECLIENT-REJECT: " + reason, flush=True)
    sys.exit(3)


# Names with control characters are refused: Blender prints scene, layer and object names
# in its log, and a newline in one could print a line that reads as Blender's own (an
# out-of-memory message, say), which the runtime reads to tell failures apart.
def _names():
    for collection in (bpy.data.scenes, bpy.data.objects, bpy.data.materials,
                       bpy.data.meshes, bpy.data.collections, bpy.data.node_groups,
                       bpy.data.images, bpy.data.cameras, bpy.data.lights, bpy.data.worlds):
        for block in collection:
            yield block.name
    for scene in bpy.data.scenes:
        for layer in scene.view_layers:
            yield layer.name


bad = [name for name in _names() if any(ord(ch) < 32 or ord(ch) == 127 for ch in name)]
if bad:
    reject("names must not hold control characters: " + ", ".join(repr(n) for n in bad[:5]))


# Self-contained scenes only: an unpacked image, library, font or cache path would make
# Blender read files on this node (and a missing one silently renders differently). The
# one exception is a file of the request's asset manifest, which the runtime wrote next
# to the scene: a path that resolves to anything else is refused.
base = os.path.dirname(os.path.realpath(bpy.data.filepath))
allowed = {os.path.realpath(os.path.join(base, path)) for path in cfg.get("assets", [])}
external = [
    path
    for path in bpy.utils.blend_paths(absolute=True, packed=False, local=False)
    # (an empty path: a disk cache of the file's own, named below, not a file's)
    if path and os.path.realpath(path) not in allowed
]
if external:
    reject(
        "scene references external files outside its asset manifest (pack them or list "
        "them as assets): " + ", ".join(external[:5])
    )
# A movie or an image sequence is read from its path even when packed (ffmpeg opens the
# file; blend_paths, asked for unpacked files, skips it): one that is not a manifest
# asset would read any file of this node into the frame.
moving = [
    image.filepath
    for image in bpy.data.images
    if image.source in ("MOVIE", "SEQUENCE")
    and os.path.realpath(bpy.path.abspath(image.filepath, library=image.library)) not in allowed
]
if moving:
    reject(
        "scene has movies or image sequences outside its asset manifest (list them as "
        "assets): " + ", ".join(moving[:5])
    )

# Keyframes and drivers (simple-expression drivers run even with -Y) are evaluated again at
# every frame and in the render's own copy of the scene, after this script: one on a
# setting pinned below (a burnt-in stamp of the node's hostname and clock, a time limit
# that makes the pixels depend on the machine's speed, stereo output) would undo the pin,
# and one on a compositor node's mute would switch a File Output or Denoise node back on.
# A scene that animates any of them is refused.
PINNED = ("render.", "render[", "cycles.", "cycles[", "view_layers")
# An ID property path (``["cycles"]["samples"]``) reaches the same settings as the
# attribute one (``cycles.samples``): refused too, as is one that does not read as a
# plain key; a scene's own custom property (``["ctrl"]``) is the requester's.
ID_PROPERTY = re.compile(r'\[\s*(["\'])(.*?)\1\s*\]')


def _pinned(path):  # whether a scene's animation path reaches a setting pinned below
    if path.startswith(PINNED):
        return True
    if path.startswith("["):
        key = ID_PROPERTY.match(path)
        return key is None or key.group(2).lower().startswith("cycles")
    # a compositor node's mute, reached from the scene rather than from its tree
    return path.startswith("node_tree") and path.endswith(".mute")


def _fcurves(action):
    if action is None:
        return []
    curves = list(getattr(action, "fcurves", None) or ())  # layered actions (4.4+) below
    for layer in getattr(action, "layers", ()):
        for strip in layer.strips:
            for bag in getattr(strip, "channelbags", ()):
                curves += list(bag.fcurves)
    return curves


def _strips(strips):
    for strip in strips:
        yield strip
        yield from _strips(strip.strips)  # a meta strip's own


def _animated(block):  # the data paths block animates: drivers, its action, NLA strips
    data = block.animation_data
    if data is None:
        return []
    actions = [data.action] + [s.action for t in data.nla_tracks for s in _strips(t.strips)]
    return [d.data_path for d in data.drivers] + [
        f.data_path for a in actions for f in _fcurves(a)
    ]


COMPOSITING = [s.node_tree for s in bpy.data.scenes if s.node_tree is not None]
COMPOSITING += [g for g in bpy.data.node_groups if g.bl_idname == "CompositorNodeTree"]
pinned = {p for s in bpy.data.scenes for p in _animated(s) if _pinned(p)}
pinned |= {p for t in COMPOSITING for p in _animated(t) if p.endswith(".mute")}

# The same settings reached through a pointer: a compositor's Render Layers node points at
# a scene (``nodes["Render Layers"].scene.render.use_stamp``), so any data-block's
# animation can write them. Every animated path of every data-block is read step by
# step, and one that passes into another data-block (but its own embedded node tree), or
# into render, image format, view layer or Cycles settings, is refused. A path that does
# not resolve writes nothing.
PINNED_STRUCTS = {
    "RenderSettings", "ImageFormatSettings", "ViewLayer", "CyclesRenderSettings",
    "CyclesRenderLayerSettings", "BakeSettings", "FFmpegSettings", "RenderView",
    "Stereo3dFormat",
}


def _steps(path):  # the path's prefixes, each ending before a "." or "[" outside quotes
    quote, escaped = None, False
    for i, ch in enumerate(path):
        if quote is not None:  # in a quoted key: a backslash escapes the next character
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch in ".[" and i > 0:
            yield path[:i]
    if quote is not None:  # a key never closed: not a path this check can read
        yield None


def _crosses(owner, path):
    for step in _steps(path):
        if step is None:
            return True  # unreadable: refused (it may still reach something)
        try:
            value = owner.path_resolve(step)
        except (ValueError, TypeError, AttributeError):
            return False  # does not resolve: Blender writes nothing through it either
        if isinstance(value, bpy.types.ID):
            if value != owner and not getattr(value, "is_embedded_data", False):
                return True
        elif isinstance(value, bpy.types.bpy_struct):
            if value.rna_type.identifier in PINNED_STRUCTS:
                return True
    return False


def _data_blocks():  # every data-block, and the node trees embedded in them
    for name in dir(bpy.data):
        collection = getattr(bpy.data, name, None)
        if not isinstance(collection, bpy.types.bpy_prop_collection):
            continue
        for block in collection:
            if isinstance(block, bpy.types.ID):
                yield block
                tree = getattr(block, "node_tree", None)
                if isinstance(tree, bpy.types.ID) and tree is not block:
                    yield tree


pinned |= {
    path
    for block in _data_blocks()
    if getattr(block, "animation_data", None) is not None
    for path in _animated(block)
    if _crosses(block, path)
}
if pinned:
    reject(
        "the scene animates settings the node pins (keyframes or drivers on "
        + ", ".join(sorted(pinned)[:5])
        + "): remove that animation"
    )

for scene in bpy.data.scenes:
    r = scene.render
    r.engine = "CYCLES"
    c = scene.cycles
    c.device = "CPU"  # GPU kernels differ from one card and driver to the next
    c.samples = cfg["samples"]
    c.seed = cfg["seed"]
    c.use_animated_seed = False
    c.use_adaptive_sampling = False  # exactly `samples` samples per pixel
    c.time_limit = 0
    c.use_denoising = False  # Debian's Blender has no OpenImageDenoise anyway
    c.use_preview_denoising = False
    c.shading_system = False  # OSL runs shader scripts
    # One view layer renders: the first one enabled, which is the one Blender writes when
    # nothing is composited. Every enabled layer would otherwise render in full, each at
    # its own sample count: a layer's samples above 0 replace the scene's.
    first = next((layer for layer in scene.view_layers if layer.use), None)
    for layer in scene.view_layers:
        layer.cycles.use_denoising = False
        layer.samples = 0
        layer.use = layer == first
    r.use_freestyle = False  # Freestyle style modules are Python, even with -Y
    r.use_sequencer = False  # strips can pull in other scenes and movie files
    r.resolution_x = cfg["width"]
    r.resolution_y = cfg["height"]
    r.resolution_percentage = 100
    if (r.resolution_x, r.resolution_y) != (cfg["width"], cfg["height"]):  # Blender clamps
        reject(
            "Blender cannot render %dx%d (it makes it %dx%d)"
            % (cfg["width"], cfg["height"], r.resolution_x, r.resolution_y)
        )
    r.use_multiview = False  # stereo views would write other files, or a wider image
    r.pixel_aspect_x = r.pixel_aspect_y = 1.0
    band = cfg.get("band")  # a tile slice: rows [top, bottom] (0 = top row), inclusive
    r.use_border = band is not None
    if band is not None:
        # Border edges are fractions from the bottom-left; Blender truncates edge * size
        # to whole pixels, so each edge sits half a pixel inside its row.
        top, bottom, h = band[0], band[1], cfg["height"]
        r.border_min_x, r.border_max_x = 0.0, 1.0
        r.border_min_y = (h - 1 - bottom + 0.5) / h
        r.border_max_y = (h - top + 0.5) / h
        r.use_crop_to_border = True
        r.use_compositing = False  # a compositor sees the whole frame, a band is not one
    r.threads_mode = "FIXED"
    r.threads = cfg["threads"]
    r.dither_intensity = 0.0  # no noise added when converting to 8 bits
    r.use_stamp = False  # no burnt-in text
    r.use_file_extension = False
    r.use_overwrite = True
    r.use_placeholder = False
    settings = r.image_settings
    settings.file_format = "TARGA_RAW"
    settings.color_mode = "RGBA"
    settings.views_format = "INDIVIDUAL"
# Compositor nodes that must not act: a File Output would write files wherever the scene
# says, so it is removed; a Denoise node would run OpenImageDenoise in a Blender built with
# it (Debian's is not), so that two nodes' frames of the same slice would differ. Muted,
# it passes its image through (and no animation may unmute it: refused above).
for tree in COMPOSITING:
    for node in list(tree.nodes):
        if node.type == "OUTPUT_FILE":
            tree.nodes.remove(node)
        elif node.type == "DENOISE":
            node.mute = True

scene = bpy.context.scene
if scene.camera is None:
    reject("the scene has no active camera")
if not any(layer.use for layer in scene.view_layers):
    reject("the scene has no view layer enabled for rendering")
# A compositor's Render Layers node renders its own scene: one Blender cannot render
# (no camera, no view layer) would stop the render on every node alike, the requester's.
if scene.use_nodes and scene.node_tree is not None and scene.render.use_compositing:
    for node in scene.node_tree.nodes:
        used = getattr(node, "scene", None) if node.type == "R_LAYERS" else None
        if used is None or used == scene or node.mute:
            continue
        if used.camera is None:
            reject("the compositor renders scene %r, which has no active camera" % used.name)
        if not any(layer.use for layer in used.view_layers):
            reject("the compositor renders scene %r, which has no view layer enabled" % used.name)


# Point caches (cloth, soft bodies, particles, rigid bodies, dynamic paint) written to
# disk are named blendcache_<file>/<name>_NNNNNN_SS.bphys: a name that is a path would
# write outside the slice's directory. Blender's interface cleans the name; a file made
# by hand need not be.
def _point_caches():
    for ob in bpy.data.objects:
        for md in ob.modifiers:
            yield getattr(md, "point_cache", None)
            canvas = getattr(md, "canvas_settings", None)
            for surface in getattr(canvas, "canvas_surfaces", ()) if canvas else ():
                yield surface.point_cache
        for system in ob.particle_systems:
            yield system.point_cache
    for sc in bpy.data.scenes:
        world = sc.rigidbody_world
        yield None if world is None else world.point_cache


bad_caches = [
    cache.name
    for pc in _point_caches()
    if pc is not None
    for cache in pc.point_caches
    if "/" in cache.name or "\\" in cache.name or ".." in cache.name
]
if bad_caches:
    reject("point cache names must not be paths: " + ", ".join(repr(n) for n in bad_caches[:5]))
# Blender renders the slice's frames after this script: the command line goes on with
# -s/-e (the slice's first and last frame, set on this scene) and -a. Unbaked simulations
# (rigid bodies, cloth, particles) advance one frame at a time from the scene's first
# frame, and the render reads each frame from their caches: so the scene is stepped here,
# without rendering, from its first frame through the slice's last. A slice's frames then
# show what a render of the whole range shows, wherever the slice starts.
# That stepping is progress too (a late slice of a long scene may step for minutes before
# its first frame): the frame reached is written to .stepped every 0.2 s, which the
# runtime's no-progress timer reads as it reads saved frames.
marked = float("-inf")  # the first frame stepped is marked at once
for frame in range(scene.frame_start, cfg["frame_end"] + 1):
    scene.frame_set(frame)
    if time.monotonic() - marked >= 0.2:
        with open(os.path.join(cfg["out"], ".stepped"), "w") as mark:
            mark.write(str(frame))
        marked = time.monotonic()
scene.frame_step = 1  # -a renders every frame of the range
# Each frame is written without a suffix and renamed to frame_NNNNNN.tga once Blender has
# written it whole, so a frame file that exists is complete.
scene.render.filepath = os.path.join(cfg["out"], "frame_######")


def _written(*_args):
    for name in os.listdir(cfg["out"]):
        if not name.endswith(".tga") and not name.startswith("."):
            path = os.path.join(cfg["out"], name)
            os.replace(path, path + ".tga")


bpy.app.handlers.render_write.append(_written)
"""


def usable(blender: str = "blender") -> tuple[bool, str]:
    """Whether this node can offer ``media.render`` (2.3.2), and why: Blender with Cycles."""
    path = shutil.which(blender)
    if path is None:
        return False, f"{blender} not found on PATH (Debian/Ubuntu: apt-get install blender)"
    try:
        out = subprocess.run(
            [path, "-b", "--factory-startup", "-noaudio", "--version"],
            capture_output=True,
            timeout=60,
            check=False,
            env=_clean_env(Path(tempfile.gettempdir())),
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"{blender} does not start: {exc}"
    first = out.stdout.decode(errors="replace").strip().splitlines()[:1]
    if out.returncode != 0 or not first or not first[0].startswith("Blender "):
        return False, f"{blender} --version failed (exit {out.returncode})"
    return True, f"{first[0]} (Cycles on the CPU)"


def slot_threads() -> int:
    """The CPUs this worker may run on: an executor that pins a slot gets its cores."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _clean_env(home: Path) -> dict[str, str]:
    # Nothing from the operator's environment reaches Blender: no PYTHONPATH, no
    # BLENDER_USER_SCRIPTS, no display; its home and temporary files are the slice's.
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "TMPDIR": str(home),
        "LANG": "C.UTF-8",
    }


def decode_tga(data: bytes, *, width: int, height: int) -> npt.NDArray[np.uint8]:
    """Uncompressed 32-bit true-colour TGA (as Blender writes it) -> RGBA, top row first."""
    if len(data) < 18:
        raise NodeClientError("frame file is truncated (no TGA header)")
    id_len, cmap_type, image_type = data[0], data[1], data[2]
    w, h = int.from_bytes(data[12:14], "little"), int.from_bytes(data[14:16], "little")
    depth, descriptor = data[16], data[17]
    if cmap_type != 0 or image_type != 2 or depth != 32:
        raise NodeClientError(f"frame file is not 32-bit raw TGA (type {image_type}, {depth} bpp)")
    if (w, h) != (width, height):
        raise NodeClientError(f"frame file is {w}x{h}, expected {width}x{height}")
    start = 18 + id_len
    size = w * h * CHANNELS
    if len(data) < start + size:
        raise NodeClientError("frame file is truncated")
    bgra = np.frombuffer(data, dtype=np.uint8, count=size, offset=start).reshape(h, w, CHANNELS)
    rgba = bgra[:, :, [2, 1, 0, 3]]
    if not descriptor & 0x20:  # origin bottom-left: the first row stored is the bottom one
        rgba = rgba[::-1]
    if descriptor & 0x10:  # origin on the right
        rgba = rgba[:, ::-1]
    return np.ascontiguousarray(rgba)


def _tail(path: Path) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - _LOG_TAIL))
            return handle.read().decode(errors="replace")
    except OSError:
        return ""


def _memory_limit() -> int | None:
    """Blender's address-space limit: the one the worker set for this task's program on a
    GPU slot (:func:`~.base.child_address_space`), else this process's (the sandbox sets
    one), which Blender inherits; None when there is none."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    own = None if soft == resource.RLIM_INFINITY else soft
    child = child_address_space()
    if child is None:
        return own
    return child if own is None else min(child, own)


def _blender_preexec() -> Callable[[], None] | None:
    """The ``preexec_fn`` Blender starts with: :func:`_die_with_parent`'s, and, where the
    worker set a limit for the task's program (:func:`~.base.child_address_space`), that
    RLIMIT_AS. The limit is worked out here, before the fork; the child calls setrlimit
    last, just before the exec: until then it holds the worker's address space (CUDA's
    reservation too), far over the limit, where any new mapping would fail."""
    die = _die_with_parent()
    cap = _memory_limit()
    if child_address_space() is None or cap is None:
        return die
    setrlimit, address_space = resource.setrlimit, resource.RLIMIT_AS

    def preexec() -> None:
        if die is not None:
            die()
        setrlimit(address_space, (cap, cap))  # hard too: Blender cannot raise it again

    return preexec


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel SIGKILL Blender when its parent dies
    (:func:`~nodeclient.entry.die_with_parent`). Blender leads its own process group, so
    killing the worker's group (what the executor does to an unsandboxed worker) would
    miss it, and it would render on with no cap. The thread that calls
    :meth:`BlenderRuntime.run`, which started Blender, outlives the render: the call
    waits for Blender."""
    return die_with_parent(signal.SIGKILL)


def _failure(returncode: int, log: str) -> NodeClientError | RemoteProtocolError:
    """Why Blender failed, with crashes, out-of-memory and requester faults told apart."""
    lines = log.splitlines()
    for line in reversed(lines):
        if line.startswith(REJECT_MARKER) and returncode == REJECT_EXIT:
            return RemoteProtocolError(line[len(REJECT_MARKER) :].strip()[:400])
    last = " | ".join(line for line in log.strip().splitlines()[-3:] if line)[-300:]
    if returncode == -signal.SIGKILL:
        return NodeClientError("out of memory: blender was killed (SIGKILL, the OOM killer)")
    if returncode == 1 and any(_SCRIPT_FAILED.fullmatch(line) for line in lines):
        return NodeClientError(f"crash: the override script failed in blender ({last})")
    if any(_OOM_LINES.fullmatch(line) for line in lines if not line.startswith(_STATUS_LINE)):
        return NodeClientError(f"out of memory: blender could not allocate ({last})")
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        limit = _memory_limit()
        hint = "" if limit is None else f"; a {limit >> 20} MiB memory limit was in force"
        return NodeClientError(f"crash: blender died of signal {name} ({last}){hint}")
    return NodeClientError(f"crash: blender exited with code {returncode} ({last})")


class BlenderRuntime:
    """Executes ``media.render`` slices; one Blender process per slice."""

    workload_class: ClassVar[str] = CLASS
    # Blender inherits the worker's address-space limit, and an idle `blender -b` maps
    # about 0.75 GiB (shared libraries, allocator arenas) of which it touches ~0.2: the
    # worker allows that on top of what a slice declares (worker._limit_memory).
    address_space_overhead: ClassVar[int] = 1 << 30
    # Cycles is pinned to the CPU: in a worker with a GPU (no address-space limit of its
    # own, for CUDA) Blender still gets its task's limit.
    uses_gpu: ClassVar[bool] = False

    def __init__(
        self,
        *,
        cache_dir: Path | None = None,
        blender: str = "blender",
        threads: int | None = None,
        max_seconds: int = DEFAULT_MAX_SECONDS,
        max_seconds_per_frame: int = DEFAULT_MAX_SECONDS_PER_FRAME,
        max_scene_bytes: int = DEFAULT_MAX_SCENE_BYTES,
        max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES,
        max_payload_bytes: int = DEFAULT_MAX_BYTES,
        fetch_scene: Callable[[str], bytes] | None = None,
        poll_interval: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cache = None if cache_dir is None else ModelCache(cache_dir, max_bytes=max_cache_bytes)
        self.blender = blender
        self.threads = threads or slot_threads()
        self.max_seconds = max_seconds
        self.max_seconds_per_frame = max_seconds_per_frame
        self._max_scene_bytes = max_scene_bytes
        self._max_payload_bytes = max_payload_bytes
        self._fetch_scene = fetch_scene
        self._poll = poll_interval
        self._clock = clock

    def self_check(self) -> None:
        """At a worker's start: Blender as this worker finds it, on its PATH and in what
        the sandbox shows of the file system. The daemon's check (:func:`usable`) looked
        on its own PATH and the whole file system: Blender installed under /opt and linked
        from /usr/local/bin is found there, but in the sandbox, which binds /usr and the
        library directories only, the link leads nowhere, and every slice would fail as
        the node's fault. Raising withdraws ``media.render`` from the node."""
        if shutil.which(self.blender) is None:
            raise NodeClientError(
                f"{self.blender} is not found inside the worker (PATH "
                f"{os.environ.get('PATH', '')}; the sandbox shows /usr and the library "
                "directories only): install Blender under /usr (Debian/Ubuntu: apt-get "
                "install blender), not under /opt or a home directory"
            )

    def run(self, payload: bytes, *, workdir: Path, progress: Progress = no_progress) -> bytes:
        """Render the slice's frames and return the canonical result bytes."""
        request = RenderRequest.decode(payload, max_bytes=self._max_payload_bytes)
        scene = self._scene(request)
        run_dir = Path(tempfile.mkdtemp(prefix="render-", dir=workdir))
        try:
            return self._render(request, scene, run_dir, progress)
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)  # the scene must not outlive the slice

    def _scene(self, request: RenderRequest) -> bytes:
        if request.scene is not None:
            return request.scene  # hashed when the payload was decoded
        sha = request.scene_sha256
        cached = None if self.cache is None else self.cache.get(sha)
        if cached is not None:
            return cached
        if self._fetch_scene is None or request.scene_url is None:
            raise RemoteProtocolError(f"scene {sha} is not inline, cached, or fetchable here")
        scene = self._fetch_scene(request.scene_url)
        if len(scene) > self._max_scene_bytes:
            raise RemoteProtocolError(f"scene is over the limit of {self._max_scene_bytes} bytes")
        actual = hashlib.sha256(scene).hexdigest()
        if actual != sha:
            raise RemoteProtocolError(f"fetched scene has sha256 {actual}, expected {sha}")
        if self.cache is not None:
            self.cache.put(sha, scene)
        return scene

    def command(
        self, scene_path: Path, script_path: Path, settings: dict[str, object]
    ) -> list[str]:
        """The exact Blender command line (argument order matters: see ``blender --help``)."""
        return [
            self.blender, "-b", "--factory-startup", "-Y", "-noaudio", str(scene_path),
            "--python-exit-code", "1", "-P", str(script_path),
            "-s", str(settings["frame_start"]), "-e", str(settings["frame_end"]), "-a",
            "--", json.dumps(settings, separators=(",", ":")),
        ]  # fmt: skip

    def _render(
        self, request: RenderRequest, scene: bytes, run_dir: Path, progress: Progress
    ) -> bytes:
        out_dir = run_dir / "frames"
        out_dir.mkdir(mode=0o700)
        scene_dir = run_dir / "scene"  # Blender's "//": the scene and its assets only
        scene_dir.mkdir(mode=0o700)
        scene_path, script_path = scene_dir / SCENE_FILE, run_dir / "override.py"
        scene_path.write_bytes(scene)
        script_path.write_text(OVERRIDE_SCRIPT)
        for relative, data in request.asset_files():  # checked: relative, no ".."
            target = scene_dir / relative
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            target.write_bytes(data)
        settings: dict[str, object] = {
            "frame_start": request.frame_start,
            "frame_end": request.frame_end,
            "width": request.width,
            "height": request.height,
            "samples": request.samples,
            "seed": request.seed,
            "threads": self.threads,
            "out": str(out_dir),
        }
        if request.rows is not None:
            settings["band"] = list(request.rows)
        if request.assets:
            settings["assets"] = [path for path, _ in request.assets]
        log_path = run_dir / "blender.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                self.command(scene_path, script_path, settings),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=run_dir,
                env=_clean_env(run_dir),
                start_new_session=True,  # its own process group, killed as one
                # and killed with the worker; safe with threads: see _die_with_parent
                preexec_fn=_blender_preexec(),  # noqa: PLW1509
            )
            try:
                self._watch(proc, request, out_dir, progress)
            finally:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        if proc.returncode != 0:
            raise _failure(proc.returncode, _tail(log_path))
        frames = {}
        for frame in request.frames:
            path = out_dir / f"frame_{frame:06d}{_FRAME_SUFFIX}"
            if not path.is_file():
                raise NodeClientError(f"crash: blender exited without writing frame {frame}")
            data = path.read_bytes()
            frames[frame] = decode_tga(data, width=request.width, height=request.out_height)
        return encode_result(
            frames,
            scene_sha256=request.scene_sha256,
            width=request.width,
            height=request.height,
            rows=request.rows,
        )

    def _watch(
        self,
        proc: subprocess.Popen[bytes],
        request: RenderRequest,
        out_dir: Path,
        progress: Progress,
    ) -> None:
        """Wait for Blender, reporting each saved frame; enforce both timeouts."""
        hard = min(request.max_seconds or self.max_seconds, self.max_seconds)
        stall = min(
            request.max_seconds_per_frame or self.max_seconds_per_frame,
            self.max_seconds_per_frame,
        )
        total = len(request.frames)
        started = last = self._clock()
        seen: set[str] = set()
        stepped = b""  # the frame the override's stepping reached (.stepped), as last read
        while True:
            finished = proc.poll() is not None
            now = self._clock()
            with contextlib.suppress(OSError):
                reached = (out_dir / ".stepped").read_bytes()[:16]
                if reached != stepped:  # stepping the scene to the slice's first frame
                    stepped, last = reached, now
            new = sorted(
                p.name
                for p in out_dir.iterdir()
                if p.suffix == _FRAME_SUFFIX and p.name not in seen
            )
            if new:  # one report a look, of the latest frame: never one behind it
                seen.update(new)
                progress(len(seen), total, f"frame {int(new[-1][6:12])} saved")
                last = now
            if finished:
                return
            if now - started > hard:
                raise NodeClientError(
                    f"timeout: the slice passed its hard cap of {hard} s "
                    f"({len(seen)} of {total} frames saved)"
                )
            if now - last > stall:
                raise NodeClientError(
                    f"timeout: no progress, no frame saved (nor the scene stepped) for {stall} s "
                    f"({len(seen)} of {total} frames saved)"
                )
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=self._poll)
