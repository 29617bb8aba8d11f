"""The ``media.render`` workload's slices: how a job splits, and how results are checked
and assembled (2.3.5: "a parallelizable sub-task runs its slice").

The request format is in :mod:`nodeclient.workloads.render`; this module is what the
coordinator does with it (through ``coordinator.classes``) and the result format the
node's Blender runtime writes.

Result (the bytes the proof of execution covers, 2.3.6)::

    tensors:   "frame_NNNNNN"  U8, shape [height, width, 4]: RGBA, top row first,
               one per frame, NNNNNN the frame number in 6 digits (so names sort in order)
    metadata:  "class" "media.render", "scene_sha256", "width", "height",
               "frame_start", "frame_end" (the range the result covers)

A band slice's result adds ``row_start`` and ``row_end`` to the metadata, and its frame
tensor holds only those rows: shape [row_end - row_start + 1, width, 4]. Otherwise a
slice result and the assembled job result have the same format. Decoded pixels rather
than PNG files are carried because the proof is over exact bytes (2.3.6): PNG files carry
timestamps and encoder choices, pixels from the same pinned render do not.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from nodeclient.errors import LocalProtocolError, RemoteProtocolError
from nodeclient.protocol.blobs import SHA256_HEX, blob_url
from nodeclient.workloads.render import (
    CHANNELS,
    CLASS,
    DEFAULT_MAX_SECONDS,
    FRAME_ENTRY_BYTES,
    HEADER_ALLOWANCE,
    MAX_FRAME,
    MAX_JOB_RESULT_BYTES,
    MAX_SLICE_RESULT_BYTES,
    MAX_SLICES,
    MAX_SPLIT_BYTES,
    META_CLASS,
    META_FRAME_END,
    META_FRAME_START,
    META_FRAMES_PER_SLICE,
    META_HEIGHT,
    META_ROW_END,
    META_ROW_START,
    META_SCENE_SHA256,
    META_TILES,
    META_WIDTH,
    RenderRequest,
    frame_name,
    parse_int,
    required_int,
)
from nodeclient.workloads.tensors import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_HEADER_BYTES,
    decode_tensors,
    encode_tensors,
    read_metadata,
)

# The most frames one job may have. The coordinator assembles a job's result from every
# slice, frame by frame, on its database thread: a job of a million 4x4 frames passes
# the result size limit in a few hundred bytes of payload, and its assembly would hold
# that thread for half a minute and take gigabytes. At this limit it takes a few seconds.
MAX_JOB_FRAMES: Final = 100_000

_RESULT_KEYS: Final = frozenset(
    {META_CLASS, META_SCENE_SHA256, META_WIDTH, META_HEIGHT, META_FRAME_START, META_FRAME_END}
)
_BAND_KEYS: Final = frozenset({META_ROW_START, META_ROW_END})
_FRAME_RE: Final = re.compile(r"frame_([0-9]{6})")


# --- splitting ----------------------------------------------------------------------------------


def slice_count(
    frame_start: int, frame_end: int, *, slices: int = 1, frames_per_slice: int | None = None
) -> int:
    """How many slices :func:`slice_ranges` gives, without building them."""
    total = frame_end - frame_start + 1
    if frames_per_slice is not None:
        count = -(-total // frames_per_slice)
        if slices not in (1, count):
            raise RemoteProtocolError(
                f"frames_per_slice {frames_per_slice} gives {count} slices, but {slices} were asked"
            )
        return count
    if not 1 <= slices <= total:
        raise RemoteProtocolError(f"slices must be in 1..{total} (one frame at least each)")
    return slices


def slice_ranges(
    frame_start: int, frame_end: int, *, slices: int = 1, frames_per_slice: int | None = None
) -> list[tuple[int, int]]:
    """Contiguous inclusive ranges covering the frames, in order.

    With *frames_per_slice* every slice but the last has exactly that many frames, and
    *slices* must be 1 (the API's default) or agree. Otherwise the frames are shared as
    evenly as possible among *slices*, earlier slices taking the remainder.
    """
    total = frame_end - frame_start + 1
    count = slice_count(frame_start, frame_end, slices=slices, frames_per_slice=frames_per_slice)
    if frames_per_slice is not None:
        sizes = [min(frames_per_slice, total - i * frames_per_slice) for i in range(count)]
    else:
        base, extra = divmod(total, count)
        sizes = [base + (1 if i < extra else 0) for i in range(count)]
    ranges, start = [], frame_start
    for size in sizes:
        ranges.append((start, start + size - 1))
        start += size
    return ranges


def split(payload: bytes, slices: int) -> list[bytes]:
    """One payload per slice, in frame order, or band order for tiles (the coordinator's).

    Each slice payload is self-contained: it carries the job's inline scene and assets,
    so a split costs about its slice count times the job payload's size. That product is
    bounded by MAX_SPLIT_BYTES, and the count by MAX_SLICES, before any slice is built; and
    the largest slice's result must fit MAX_SLICE_RESULT_BYTES (:func:`_job_slices`).
    The coordinator first moves an inline scene and assets to its blob store (:func:`hoist`),
    so what it splits is small.
    """
    request = RenderRequest.decode(payload)
    if request.rows is not None:
        raise RemoteProtocolError("a job payload must not carry row_start/row_end")
    count = _job_slices(
        request.frame_start,
        request.frame_end,
        request.frames_per_slice,
        request.tiles,
        slices,
        size=(request.width, request.height),
    )
    _check_split(count, len(payload))
    if request.tiles is not None:
        bands = slice_ranges(0, request.height - 1, slices=request.tiles)  # rows, top first
        return [request.band(start, end).encode() for start, end in bands]
    ranges = slice_ranges(
        request.frame_start,
        request.frame_end,
        slices=slices,
        frames_per_slice=request.frames_per_slice,
    )
    return [request.narrowed(start, end).encode() for start, end in ranges]


def hoist(payload: bytes, slices: int) -> tuple[bytes, list[tuple[str, bytes]]] | None:
    """A job that splits into several slices with its scene or assets inline: the same job
    with them by reference instead (``scene_url`` ``/v1/blobs/<scene_sha256>``, assets by
    their manifest), and the ``(sha256, bytes)`` the blob store must then hold.

    The coordinator calls it before :func:`split`, so each slice carries a few hundred
    bytes instead of a copy of the scene, and nodes fetch the scene from the blob store as
    for a job sent by URL. None when nothing would move: a job of one slice, or nothing
    inline. Call it on a payload that validated, which checked the inline bytes' hashes.

    It moves nothing itself: the caller stores the returned bytes, and only once the job
    has passed its other checks (blobs it references but does not carry) and its split, so
    a refused job leaves nothing behind. A slicing that :func:`split` would refuse (too
    many slices, too large a slice result, too many bytes of slice payloads) is refused
    here already, before a large payload is decoded.
    """
    meta = read_metadata(payload)  # the header alone: a one-slice job is not decoded again
    count = _job_slices(  # the split's own rules
        required_int(meta, META_FRAME_START),
        required_int(meta, META_FRAME_END),
        parse_int(meta, META_FRAMES_PER_SLICE),
        parse_int(meta, META_TILES),
        slices,
        size=(required_int(meta, META_WIDTH), required_int(meta, META_HEIGHT)),
    )
    if count <= 1:
        return None
    _check_split(count, 0)  # the slice count; the bytes once the payload is smaller, below
    request = RenderRequest.decode(payload)
    if request.scene is None and not request.asset_data:
        return None
    blobs = list(request.asset_data)
    if request.scene is not None:
        blobs.insert(0, (request.scene_sha256, request.scene))
        request = replace(request, scene=None, scene_url=blob_url(request.scene_sha256))
    hoisted = replace(request, asset_data=()).encode()
    _check_split(count, len(hoisted))
    return hoisted, blobs


def _job_slices(
    frame_start: int,
    frame_end: int,
    frames_per_slice: int | None,
    tiles: int | None,
    slices: int,
    *,
    size: tuple[int, int],
) -> int:
    """How many slices a job splits into when *slices* are asked (the split's own rule).

    Refuses a split whose largest slice result could not be carried: a node would render
    it, then its worker would refuse the result as too large, and the task would fail on
    every node in turn. *size* is the job's (width, height).
    """
    width, height = size
    if tiles is not None:
        if slices not in (1, tiles):
            raise RemoteProtocolError(
                f"tiles {tiles} gives {tiles} slices, but {slices} were asked"
            )
        band = -(-height // tiles)  # the first bands take the remainder
        _check_slice_result(1, width, band, advice="use more tiles or a smaller size")
        return tiles
    count = slice_count(frame_start, frame_end, slices=slices, frames_per_slice=frames_per_slice)
    total = frame_end - frame_start + 1
    if frames_per_slice is not None:
        largest, advice = min(frames_per_slice, total), "use a smaller frames_per_slice"
    else:
        largest, advice = -(-total // count), "ask for more slices, or set frames_per_slice"
    _check_slice_result(largest, width, height, advice=f"{advice}, or a smaller size")
    return count


def result_bytes(frames: int, frame_bytes: int) -> int:
    """An upper bound on the size of a result of *frames* frames of *frame_bytes* each."""
    return frames * (frame_bytes + FRAME_ENTRY_BYTES) + HEADER_ALLOWANCE


def _check_slice_result(frames: int, width: int, rows: int, *, advice: str) -> None:
    """Refuse a slice of *frames* frames of *width* x *rows* RGBA whose result would be over
    MAX_SLICE_RESULT_BYTES, or whose header would be over the container's header limit."""
    frame_bytes = width * rows * CHANNELS
    fit = min(
        (MAX_SLICE_RESULT_BYTES - HEADER_ALLOWANCE) // (frame_bytes + FRAME_ENTRY_BYTES),
        (DEFAULT_MAX_HEADER_BYTES - HEADER_ALLOWANCE) // FRAME_ENTRY_BYTES,
    )
    if frames > fit:
        raise RemoteProtocolError(
            f"a slice of {frames} frame(s) of {width}x{rows} RGBA would give a result of up "
            f"to {result_bytes(frames, frame_bytes)} bytes; a slice result holds at most "
            f"{fit} such frames (MAX_SLICE_RESULT_BYTES, {MAX_SLICE_RESULT_BYTES} bytes): "
            f"{advice}"
        )


def _check_split(count: int, payload_bytes: int) -> None:
    """Refuse a split of more than MAX_SLICES slices, or of more than MAX_SPLIT_BYTES."""
    if count > MAX_SLICES:
        raise RemoteProtocolError(
            f"the job would split into {count} slices, over the limit of {MAX_SLICES}"
        )
    total = count * payload_bytes  # a slice payload is the job's, bar a few metadata bytes
    if total > MAX_SPLIT_BYTES:
        raise RemoteProtocolError(
            f"{count} slices of a {payload_bytes}-byte payload would take {total} bytes, over "
            f"the limit of {MAX_SPLIT_BYTES} (MAX_SPLIT_BYTES) on one job's slices: every "
            "slice carries the inline scene and assets; use fewer slices, or upload the scene "
            "with POST /v1/blobs and send scene_url"
        )


# --- results ------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class RenderResult:
    """Decoded frames (read-only RGBA arrays) and what they claim to be."""

    scene_sha256: str
    width: int
    height: int
    frames: dict[int, npt.NDArray[np.uint8]]
    rows: tuple[int, int] | None = None  # a band slice's rows (0 = top), else whole frames

    @property
    def frame_start(self) -> int:
        return min(self.frames)

    @property
    def frame_end(self) -> int:
        return max(self.frames)


def encode_result(
    frames: Mapping[int, npt.NDArray[np.uint8]],
    *,
    scene_sha256: str,
    width: int,
    height: int,
    rows: tuple[int, int] | None = None,
) -> bytes:
    """The canonical result bytes for consecutive *frames* (2.3.6 covers exactly these).

    With *rows* the frames are one band of a *height*-row frame: only those rows.
    """
    numbers = sorted(frames)
    if not numbers or numbers != list(range(numbers[0], numbers[-1] + 1)):
        raise LocalProtocolError(f"a result holds consecutive frames, got {numbers[:10]}")
    band_height = height if rows is None else rows[1] - rows[0] + 1
    if rows is not None and not 0 <= rows[0] <= rows[1] < height:
        raise LocalProtocolError(f"rows {rows} are not a band of a {height}-row frame")
    shape = (band_height, width, CHANNELS)
    tensors: dict[str, npt.NDArray[Any]] = {}
    for number in numbers:
        array = frames[number]
        if array.dtype != np.uint8 or array.shape != shape:
            raise LocalProtocolError(
                f"frame {number} is {array.dtype} {array.shape}, not u8 {shape}"
            )
        tensors[frame_name(number)] = array
    meta = {
        META_CLASS: CLASS,
        META_SCENE_SHA256: scene_sha256,
        META_WIDTH: str(width),
        META_HEIGHT: str(height),
        META_FRAME_START: str(numbers[0]),
        META_FRAME_END: str(numbers[-1]),
    }
    if rows is not None:
        meta[META_ROW_START], meta[META_ROW_END] = str(rows[0]), str(rows[1])
    return encode_tensors(tensors, metadata=meta)


def decode_result(
    data: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
) -> RenderResult:
    """Parse a result; faults in its structure raise RemoteProtocolError.

    The header lists every frame (~100 bytes each). A slice's result (a node's, checked
    on arrival) must fit the default 1 MiB header (at most 7,680 frames a slice, checked
    at submission), so an untrusted node cannot make the coordinator parse more. A job's
    assembled result may list far more small frames: a requester decodes it with
    ``max_header_bytes=max_bytes``.
    """
    tensors, meta = decode_tensors(
        data, max_bytes=max_bytes, max_tensors=MAX_FRAME + 1, max_header_bytes=max_header_bytes
    )
    keys = set(meta)
    if keys not in (_RESULT_KEYS, _RESULT_KEYS | _BAND_KEYS) or meta[META_CLASS] != CLASS:
        raise RemoteProtocolError(
            f"result metadata keys must be {sorted(_RESULT_KEYS)} for {CLASS}, plus "
            f"{sorted(_BAND_KEYS)} for a band"
        )
    sha = meta[META_SCENE_SHA256]
    if not SHA256_HEX.fullmatch(sha):
        raise RemoteProtocolError("result scene_sha256 is not 64 lowercase hex digits")
    width, height = required_int(meta, META_WIDTH), required_int(meta, META_HEIGHT)
    start, end = required_int(meta, META_FRAME_START), required_int(meta, META_FRAME_END)
    if start > end:
        raise RemoteProtocolError(f"result frames {start}..{end}: one frame at least")
    frames: dict[int, npt.NDArray[np.uint8]] = {}
    for name, array in tensors.items():
        match = _FRAME_RE.fullmatch(name)
        if match is None:
            raise RemoteProtocolError(f"unexpected tensor {name!r} in a render result")
        frames[int(match[1])] = array
    # Counted before any range is built: start and end are the node's own numbers.
    if len(frames) != end - start + 1 or not all(start <= f <= end for f in frames):
        raise RemoteProtocolError(f"result must hold frames {start}..{end}, each exactly once")
    rows = None
    if META_ROW_START in meta:
        rows = (required_int(meta, META_ROW_START), required_int(meta, META_ROW_END))
        if not 0 <= rows[0] <= rows[1] < height:
            raise RemoteProtocolError(f"result rows {rows} are not a band of {height} rows")
    return RenderResult(sha, width, height, frames, rows)


def check_frames(result: RenderResult, *, width: int, height: int, allow_blank: bool) -> None:
    """Refuse frames of the wrong size or format, and blank ones (all one colour).

    A blank frame is what a broken render looks like (no camera in view, missing
    textures, a crashed shader): accepting it would pay for nothing. A band is not
    checked for blankness on its own (a band of clear sky is one colour); the stitched
    frame is, in :func:`assemble`.
    """
    rows = result.rows
    band_height = height if rows is None else rows[1] - rows[0] + 1
    shape = (band_height, width, CHANNELS)
    if (result.width, result.height) != (width, height):
        raise RemoteProtocolError(f"result is {result.width}x{result.height}, not {width}x{height}")
    for number, array in result.frames.items():
        if array.dtype != np.uint8 or array.shape != shape:
            raise RemoteProtocolError(
                f"frame {number} is {array.dtype} {list(array.shape)}, expected uint8 {list(shape)}"
            )
        if not allow_blank and rows is None:
            _refuse_blank(number, array)


def _refuse_blank(number: int, array: npt.NDArray[np.uint8]) -> None:
    pixels = array.reshape(-1, CHANNELS)
    if bool((pixels == pixels[0]).all()):
        raise RemoteProtocolError(
            f"frame {number} is blank: every pixel is {pixels[0].tolist()} (a scene that "
            'renders one colour on purpose sets "allow_blank": "1" in its payload)'
        )


def job_meta(payload: bytes, max_bytes: int) -> dict[str, Any]:
    """Validate a job payload; the metadata the coordinator keeps to check and assemble."""
    request = RenderRequest.decode(payload, max_bytes=max_bytes)
    if request.rows is not None:
        raise RemoteProtocolError("a job payload must not carry row_start/row_end")
    frames = len(request.frames)
    if frames > MAX_JOB_FRAMES:
        raise RemoteProtocolError(
            f"the job has {frames} frames ({request.frame_start}..{request.frame_end}), over "
            f"the limit of {MAX_JOB_FRAMES} (MAX_JOB_FRAMES) on the frames of one job; split "
            "the range into several jobs"
        )
    # The smallest a slice can be: one band of a tiled frame, else the frames per slice
    # asked for (no more than the job has), else one frame; the split checks the slices
    # it actually makes (_job_slices).
    if request.tiles is not None:
        rows = -(-request.height // request.tiles)
        smallest = request.width * rows * CHANNELS
        advice = "more tiles or a smaller size"
    else:
        smallest = min(request.frames_per_slice or 1, frames) * request.frame_bytes
        advice = "fewer frames per slice, tiles, or a smaller size"
    if smallest + HEADER_ALLOWANCE > max_bytes:
        raise RemoteProtocolError(
            f"a slice of {request.width}x{request.height} RGBA would be {smallest} bytes, "
            f"more than a {max_bytes}-byte result holds; use {advice}"
        )
    size = result_bytes(frames, request.frame_bytes)
    if size > MAX_JOB_RESULT_BYTES:  # assemble builds it in memory, and it is stored whole
        raise RemoteProtocolError(
            f"the job's result of {frames} frame(s) of {request.width}x{request.height} RGBA "
            f"would be up to {size} bytes, over the limit of {MAX_JOB_RESULT_BYTES} "
            "(MAX_JOB_RESULT_BYTES) on an assembled result; render fewer frames per job "
            "(split the range into several jobs) or a smaller size"
        )
    return {
        "scene_sha256": request.scene_sha256,
        "frame_start": request.frame_start,
        "frame_end": request.frame_end,
        "width": request.width,
        "height": request.height,
        "frames_per_slice": request.frames_per_slice,
        "allow_blank": request.allow_blank,
        "tiles": request.tiles,
        "max_seconds": request.max_seconds,
    }


def lease_seconds(meta: Mapping[str, Any]) -> float:
    """How long a slice may run: its hard cap, the request's or the default (a job stored
    before the cap was kept in its metadata gets the default)."""
    cap = meta.get("max_seconds")
    return float(cap if isinstance(cap, int) and cap > 0 else DEFAULT_MAX_SECONDS)


def check_result(data: bytes, meta: Mapping[str, Any], max_bytes: int) -> RenderResult:
    """A slice result for the job *meta* describes: its scene, size, a sub-range, no blanks."""
    result = decode_result(data, max_bytes=max_bytes)
    if result.scene_sha256 != meta["scene_sha256"]:
        raise RemoteProtocolError(
            f"result is for scene {result.scene_sha256}, expected {meta['scene_sha256']}"
        )
    if result.frame_start < meta["frame_start"] or result.frame_end > meta["frame_end"]:
        raise RemoteProtocolError(
            f"result frames {result.frame_start}..{result.frame_end} are outside the job's "
            f"{meta['frame_start']}..{meta['frame_end']}"
        )
    if bool(meta.get("tiles")) != (result.rows is not None):
        what = "a band of rows" if meta.get("tiles") else "whole frames"
        raise RemoteProtocolError(f"the job is split into {what}; the result is not")
    check_frames(
        result, width=meta["width"], height=meta["height"], allow_blank=bool(meta["allow_blank"])
    )
    return result


def check_slice(data: bytes, payload: bytes, max_bytes: int) -> None:
    """A result that is exactly the slice its own task *payload* asked for: frames and rows.

    :func:`check_result` holds a result to the job only; a node that returned other frames
    of the job, or another band, would pass it, and the job would then fail at assembly
    with no retry. Refused here, the task stays open, and goes to another node when its
    lease runs out. Only the payload's header is read: its scene is not hashed again.
    """
    result = decode_result(data, max_bytes=max_bytes)
    asked = read_metadata(payload, max_bytes=len(payload))  # our own stored payload
    frames = (required_int(asked, META_FRAME_START), required_int(asked, META_FRAME_END))
    row_start, row_end = parse_int(asked, META_ROW_START), parse_int(asked, META_ROW_END)
    rows = None if row_start is None or row_end is None else (row_start, row_end)
    if (result.frame_start, result.frame_end) != frames:
        raise RemoteProtocolError(
            f"result holds frames {result.frame_start}..{result.frame_end}, but its task "
            f"asked for frames {frames[0]}..{frames[1]}"
        )
    if result.rows != rows:
        raise RemoteProtocolError(
            f"result holds {_rows_text(result.rows)}, but its task asked for {_rows_text(rows)}"
        )


def _rows_text(rows: tuple[int, int] | None) -> str:
    return "whole frames" if rows is None else f"rows {rows[0]}..{rows[1]}"


def assemble(results: Sequence[bytes], meta: Mapping[str, Any]) -> bytes:
    """Join slice results (in slice order) into the job's result: every frame, once, in order."""
    if meta.get("tiles"):
        return _stitch(results, meta)
    frames: dict[int, npt.NDArray[np.uint8]] = {}
    expected = meta["frame_start"]
    for index, data in enumerate(results):
        part = decode_result(data, max_bytes=len(data))
        if part.frame_start != expected:
            raise RemoteProtocolError(
                f"slice {index} starts at frame {part.frame_start}, expected {expected}"
            )
        frames.update(part.frames)
        expected = part.frame_end + 1
    if expected != meta["frame_end"] + 1:
        raise RemoteProtocolError(f"slices end at frame {expected - 1}, not {meta['frame_end']}")
    return encode_result(
        frames, scene_sha256=meta["scene_sha256"], width=meta["width"], height=meta["height"]
    )


def _stitch(results: Sequence[bytes], meta: Mapping[str, Any]) -> bytes:
    """Bands (in slice order, top first) -> the one frame, checked whole for blankness."""
    frame, height = meta["frame_start"], meta["height"]
    bands: list[npt.NDArray[np.uint8]] = []
    expected = 0
    for index, data in enumerate(results):
        part = decode_result(data, max_bytes=len(data))
        if part.rows is None or part.rows[0] != expected or list(part.frames) != [frame]:
            raise RemoteProtocolError(
                f"slice {index} is not frame {frame}'s band starting at row {expected}"
            )
        check_frames(part, width=meta["width"], height=height, allow_blank=True)  # shapes
        bands.append(part.frames[frame])
        expected = part.rows[1] + 1
    if expected != height:
        raise RemoteProtocolError(f"bands end at row {expected - 1}, not {height - 1}")
    whole = np.ascontiguousarray(np.concatenate(bands, axis=0))
    if not meta["allow_blank"]:
        _refuse_blank(frame, whole)
    return encode_result(
        {frame: whole}, scene_sha256=meta["scene_sha256"], width=meta["width"], height=height
    )
