"""The ``media.render`` workload: Blender jobs split by frame range or into tiles.

2.3.5 Work Execution: "a parallelizable sub-task runs its slice". A render job names one
packed ``.blend`` scene by its SHA-256 and a frame range; the coordinator splits the range
into contiguous slices, each node renders only its slice's frames, and the coordinator
joins the frames back in order. A job of a single frame may instead be split into
``tiles`` horizontal bands: each node renders one band (a border render, cropped, with
compositing off), and the coordinator stitches the bands top to bottom. Cycles samples
each pixel from its own position and the seed, so a stitched frame has the same pixels as
one render of the whole frame with compositing off. Payloads and results use the tensor
container of :mod:`nodeclient.workloads.tensors`.

Request (the job payload, and each slice's payload with its narrowed range)::

    tensors:   "__scene__"  U8, shape [len(scene)]  the packed .blend, when sent inline
               "__asset_<sha256>__"  U8              an asset's bytes, when sent inline
    metadata:  "class"                  "media.render"
               "scene_sha256"           64 lowercase hex digits, SHA-256 of the .blend bytes
               "scene_url"              where the scene is fetched, when not inline
               "frame_start"            first frame, inclusive      (decimal, 0..999999)
               "frame_end"              last frame, inclusive       (decimal, >= frame_start)
               "width", "height"        output size in pixels       (decimal, 4..16384)
               "samples"                Cycles samples per pixel    (decimal, 1..65536)
               "seed"                   Cycles seed                 (decimal, 0..2147483647)
               optional "frames_per_slice"       how the job splits (decimal, >= 1)
               optional "max_seconds"            hard cap for one slice (decimal seconds)
               optional "max_seconds_per_frame"  no-progress timeout (decimal seconds)
               optional "allow_blank"            "1": frames of one colour are acceptable
               optional "tiles"                  split the (single) frame into this many
                                                 bands of rows (decimal, 2..height, at
                                                 most 256)
               optional "row_start", "row_end"   a band slice: render only these rows,
                                                 0 = top row, inclusive (set by the split)
               optional "assets"                 the asset manifest: files the .blend uses
                                                 by relative path, each by SHA-256, as JSON
                                                 [["textures/wood.png", "<sha256>"], ...]
                                                 sorted by path, no spaces

Exactly one of ``__scene__`` and ``scene_url`` is present; ``tiles`` excludes
``frames_per_slice`` and needs ``frame_start == frame_end``; a band slice carries both
row keys and no ``tiles``. An asset's path is relative to the .blend (Blender's ``//``):
``/``-separated names of letters, digits, ``.``, ``_`` and ``-``, none of them ``.`` or
``..``; assets come from the coordinator's blob store (``/v1/blobs/<sha256>``), and the
daemon inlines them (and a ``scene_url`` scene) before a worker, which has no network,
sees the payload. Numbers are canonical
decimals (no sign, no leading zeros), so one request has one encoding. ``scene_url`` is
either ``/v1/blobs/<scene_sha256>`` on the coordinator or an ``http(s)://`` URL: local
paths and other schemes are refused, because a node must never read its own files on a
requester's behalf. Every string is valid Unicode: one with a lone surrogate (JSON allows
``"\\ud800"``) has no UTF-8 encoding, so no slice payload could carry it, and is refused.

A job splits into at most 4096 slices. A slice carries whatever inline scene and assets it
is split from, so the slices together may hold at most 1 GiB; the coordinator therefore
moves a split job's inline scene and assets to its blob store before it splits
(``render_slices.hoist``), and each slice references them by ``/v1/blobs/<sha256>``.
A slice's result must fit 32 MiB (MAX_SLICE_RESULT_BYTES) and the assembled job result
256 MiB (MAX_JOB_RESULT_BYTES); a job that could not is refused when it is submitted.

Results, splitting and assembly are in :mod:`nodeclient.workloads.render_slices`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from nodeclient.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from nodeclient.protocol.blobs import SHA256_HEX, blob_url
from nodeclient.workloads.tensors import (
    DEFAULT_MAX_BYTES,
    decode_tensors,
    encode_tensors,
    read_metadata,
)

CLASS: Final = "media.render"
SCENE_TENSOR: Final = "__scene__"
CHANNELS: Final = 4  # RGBA
MAX_FRAME: Final = 999_999  # six digits in tensor names; Blender allows up to 1048574
MIN_SIDE: Final = 4  # Blender renders no side smaller: it makes 1..3 pixels 4
MAX_SIDE: Final = 16_384
MAX_SAMPLES: Final = 65_536
MAX_SEED: Final = 2**31 - 1
MAX_SECONDS: Final = 7 * 24 * 3600
# A slice's hard cap when the request names none (a node may hold its own lower).
DEFAULT_MAX_SECONDS: Final = 3600
MAX_URL_CHARS: Final = 2048
HEADER_ALLOWANCE: Final = 64 * 1024  # container header bytes allowed for in size checks
MAX_TILES: Final = 256  # bands of one frame: the most slices a tiled job becomes
MAX_SLICES: Final = 4096  # slices of one job, however asked for (the API's slices limit too)
MAX_SPLIT_BYTES: Final = 1 << 30  # all of a job's slice payloads together (each copies the scene)
# One slice's result travels in one result frame, and a node's worker refuses a larger one
# (the node's default result limit): a job whose slices could not fit it is refused.
MAX_SLICE_RESULT_BYTES: Final = 32 * 1024 * 1024
# The assembled job result is built in the coordinator's memory and kept in its database.
MAX_JOB_RESULT_BYTES: Final = 256 * 1024 * 1024
FRAME_ENTRY_BYTES: Final = 128  # the most one frame's entry takes in a result's header
SCENE_FILE: Final = "scene.blend"  # the scene's name beside its assets on a node

META_CLASS: Final = "class"
META_SCENE_SHA256: Final = "scene_sha256"
META_SCENE_URL: Final = "scene_url"
META_FRAME_START: Final = "frame_start"
META_FRAME_END: Final = "frame_end"
META_WIDTH: Final = "width"
META_HEIGHT: Final = "height"
META_SAMPLES: Final = "samples"
META_SEED: Final = "seed"
META_FRAMES_PER_SLICE: Final = "frames_per_slice"
META_MAX_SECONDS: Final = "max_seconds"
META_MAX_SECONDS_PER_FRAME: Final = "max_seconds_per_frame"
META_ALLOW_BLANK: Final = "allow_blank"
META_TILES: Final = "tiles"
META_ROW_START: Final = "row_start"
META_ROW_END: Final = "row_end"
META_ASSETS: Final = "assets"
ASSET_PREFIX: Final = "__asset_"
MAX_ASSETS: Final = 256
MAX_ASSET_PATH: Final = 240

_REQUEST_KEYS: Final = frozenset(
    {
        META_CLASS, META_SCENE_SHA256, META_SCENE_URL, META_FRAME_START, META_FRAME_END,
        META_WIDTH, META_HEIGHT, META_SAMPLES, META_SEED, META_FRAMES_PER_SLICE,
        META_MAX_SECONDS, META_MAX_SECONDS_PER_FRAME, META_ALLOW_BLANK, META_TILES,
        META_ROW_START, META_ROW_END, META_ASSETS,
    }
)  # fmt: skip
_DECIMAL_RE: Final = re.compile(r"0|[1-9][0-9]{0,9}")
_HTTP_RE: Final = re.compile(r"https?://[^/\s]+(/\S*)?")
_ASSET_PART_RE: Final = re.compile(r"[A-Za-z0-9._-]+")


def frame_name(frame: int) -> str:
    """The tensor name of *frame*: zero-padded so that name order is frame order."""
    return f"frame_{frame:06d}"


def _int(name: str, value: object, low: int, high: int, error: type[ProtocolError]) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise error(f"{name} must be an integer in {low}..{high}, got {value!r}")
    return value


def parse_int(metadata: Mapping[str, str], key: str) -> int | None:
    raw = metadata.get(key)
    if raw is None:
        return None
    if not _DECIMAL_RE.fullmatch(raw):
        raise RemoteProtocolError(f"metadata {key!r} must be a canonical decimal, got {raw[:20]!r}")
    return int(raw)


def required_int(metadata: Mapping[str, str], key: str) -> int:
    value = parse_int(metadata, key)
    if value is None:
        raise RemoteProtocolError(f"missing metadata key {key!r}")
    return value


def _check_text(name: str, value: str, error: type[ProtocolError]) -> None:
    """Refuse a string with no UTF-8 encoding: a lone surrogate, which JSON lets through."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise error(f"{name} {value[:80]!a} is not valid Unicode (a lone surrogate)") from None


def _check_url(url: str, sha256: str, error: type[ProtocolError]) -> None:
    if not isinstance(url, str) or not url or len(url) > MAX_URL_CHARS:
        raise error(f"scene_url must be a string of 1..{MAX_URL_CHARS} characters")
    _check_text("scene_url", url, error)  # _HTTP_RE's [^/\s] matches a surrogate too
    if url == f"/v1/blobs/{sha256}" or _HTTP_RE.fullmatch(url):
        return
    raise error(
        f"scene_url {url[:80]!r} must be /v1/blobs/<scene_sha256> or an http(s) URL; "
        "local paths and other schemes are refused"
    )


def asset_tensor(sha256: str) -> str:
    """The tensor name that carries the asset whose SHA-256 is *sha256*, inline."""
    return f"{ASSET_PREFIX}{sha256}__"


def encode_assets(assets: Sequence[tuple[str, str]]) -> str:
    """The canonical ``assets`` metadata value: sorted by path, compact JSON."""
    return json.dumps(sorted([path, sha] for path, sha in assets), separators=(",", ":"))


def _check_asset_path(path: object, error: type[ProtocolError]) -> str:
    if not isinstance(path, str) or not 0 < len(path) <= MAX_ASSET_PATH:
        raise error(f"asset path must be a string of 1..{MAX_ASSET_PATH} characters")
    for part in path.split("/"):
        if part in (".", "..") or not _ASSET_PART_RE.fullmatch(part):
            raise error(
                f"asset path {path[:80]!r} must be relative: '/'-separated names of letters, "
                "digits, '.', '_' and '-', none of them '.' or '..'"
            )
    return path


def _check_assets(assets: object, error: type[ProtocolError]) -> None:
    if not isinstance(assets, tuple) or len(assets) > MAX_ASSETS:
        raise error(f"assets must be at most {MAX_ASSETS} (path, sha256) pairs")
    paths = []
    for entry in assets:
        if not isinstance(entry, tuple) or len(entry) != 2:
            raise error("each asset is a (path, sha256) pair")
        paths.append(_check_asset_path(entry[0], error))
        if not isinstance(entry[1], str) or not SHA256_HEX.fullmatch(entry[1]):
            raise error(f"asset {entry[0][:80]!r} needs a sha256 of 64 lowercase hex digits")
    if paths != sorted(set(paths)):
        raise error("asset paths must be unique and sorted")
    files = set(paths)
    for path in paths:  # a file may not also be a folder of another asset
        parts = path.split("/")
        for depth in range(1, len(parts)):
            folder = "/".join(parts[:depth])
            if folder in files:
                raise error(f"asset {folder[:80]!r} is also a folder of asset {path[:80]!r}")
    if any(path.split("/")[0] == SCENE_FILE for path in paths):
        raise error(
            f"an asset may not be named {SCENE_FILE!r} or lie under it: that is the scene's "
            "own file"
        )


def _parse_assets(raw: str | None) -> tuple[tuple[str, str], ...]:
    if raw is None:
        return ()
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise RemoteProtocolError(f"metadata 'assets' is not JSON: {exc}") from None
    except RecursionError:
        raise RemoteProtocolError("metadata 'assets' nests too deeply") from None
    if not isinstance(value, list) or not all(
        isinstance(e, list) and len(e) == 2 and all(isinstance(x, str) for x in e) for e in value
    ):
        raise RemoteProtocolError("metadata 'assets' must be a list of [path, sha256] pairs")
    assets = tuple((e[0], e[1]) for e in value)
    _check_assets(assets, RemoteProtocolError)
    if encode_assets(assets) != raw:
        raise RemoteProtocolError("metadata 'assets' is not in canonical form (compact, sorted)")
    return assets


@dataclass(frozen=True)
class RenderRequest:
    """One render job or slice. Building one validates it (LocalProtocolError)."""

    scene_sha256: str
    frame_start: int
    frame_end: int
    width: int
    height: int
    samples: int
    seed: int = 0
    scene: bytes | None = None
    scene_url: str | None = None
    frames_per_slice: int | None = None
    max_seconds: int | None = None
    max_seconds_per_frame: int | None = None
    allow_blank: bool = False
    tiles: int | None = None
    row_start: int | None = None
    row_end: int | None = None
    assets: tuple[tuple[str, str], ...] = ()  # (path relative to the .blend, sha256)
    asset_data: tuple[tuple[str, bytes], ...] = ()  # (sha256, bytes) carried inline

    def __post_init__(self) -> None:
        self.check(LocalProtocolError)

    def check(self, error: type[ProtocolError]) -> None:
        """Every rule of the format; *error* says whose fault a violation is."""
        self._check_fields(error)
        self._check_hashes(error)

    def _check_fields(self, error: type[ProtocolError]) -> None:
        """Every rule but the SHA-256s of the inline bytes. Strings other than scene_url
        are held to ASCII patterns, so only scene_url needs the Unicode check."""
        if not isinstance(self.scene_sha256, str) or not SHA256_HEX.fullmatch(self.scene_sha256):
            raise error(f"scene_sha256 must be 64 lowercase hex digits, got {self.scene_sha256!r}")
        _int("frame_start", self.frame_start, 0, MAX_FRAME, error)
        _int("frame_end", self.frame_end, self.frame_start, MAX_FRAME, error)
        _int("width", self.width, MIN_SIDE, MAX_SIDE, error)
        _int("height", self.height, MIN_SIDE, MAX_SIDE, error)
        _int("samples", self.samples, 1, MAX_SAMPLES, error)
        _int("seed", self.seed, 0, MAX_SEED, error)
        for name, value, high in (
            ("frames_per_slice", self.frames_per_slice, MAX_FRAME),
            ("max_seconds", self.max_seconds, MAX_SECONDS),
            ("max_seconds_per_frame", self.max_seconds_per_frame, MAX_SECONDS),
        ):
            if value is not None:
                _int(name, value, 1, high, error)
        self._check_tiles(error)
        if (self.scene is None) == (self.scene_url is None):
            raise error("a request carries exactly one of an inline scene and a scene_url")
        if self.scene_url is not None:
            _check_url(self.scene_url, self.scene_sha256, error)
        _check_assets(self.assets, error)
        wanted = {sha for _, sha in self.assets}
        for sha, _data in self.asset_data:
            if sha not in wanted:
                raise error(f"inline asset {sha} is not in the asset manifest")

    def _check_hashes(self, error: type[ProtocolError]) -> None:
        """The inline scene and assets are the bytes their SHA-256s name."""
        if self.scene is not None:
            actual = hashlib.sha256(self.scene).hexdigest()
            if actual != self.scene_sha256:
                raise error(f"inline scene has sha256 {actual}, but scene_sha256 says "
                            f"{self.scene_sha256}")  # fmt: skip
        for sha, data in self.asset_data:
            actual = hashlib.sha256(data).hexdigest()
            if actual != sha:
                raise error(f"inline asset has sha256 {actual}, but the manifest says {sha}")

    def _check_tiles(self, error: type[ProtocolError]) -> None:
        if self.tiles is not None:  # each band at least one row, and at most MAX_TILES bands
            _int("tiles", self.tiles, 2, min(self.height, MAX_TILES), error)
            if self.frame_start != self.frame_end:
                raise error("tiles split a single frame: frame_start must equal frame_end")
            if self.frames_per_slice is not None:
                raise error("a request has tiles or frames_per_slice, not both")
        if (self.row_start is None) != (self.row_end is None):
            raise error("a band slice carries both row_start and row_end")
        if self.row_start is not None:
            if self.tiles is not None:
                raise error("a band slice carries row_start/row_end and no tiles")
            _int("row_start", self.row_start, 0, self.height - 1, error)
            _int("row_end", self.row_end, self.row_start, self.height - 1, error)

    @property
    def frames(self) -> range:
        return range(self.frame_start, self.frame_end + 1)

    @property
    def rows(self) -> tuple[int, int] | None:
        """The band (first row, last row; 0 = top) a band slice renders, else None."""
        if self.row_start is None or self.row_end is None:
            return None
        return self.row_start, self.row_end

    @property
    def out_height(self) -> int:
        """Rows in each rendered frame: the band's, or the whole frame's."""
        rows = self.rows
        return self.height if rows is None else rows[1] - rows[0] + 1

    @property
    def frame_bytes(self) -> int:
        return self.width * self.out_height * CHANNELS

    def encode(self) -> bytes:
        """The canonical payload, ready to be sealed to a node."""
        meta = {
            META_CLASS: CLASS,
            META_SCENE_SHA256: self.scene_sha256,
            META_FRAME_START: str(self.frame_start),
            META_FRAME_END: str(self.frame_end),
            META_WIDTH: str(self.width),
            META_HEIGHT: str(self.height),
            META_SAMPLES: str(self.samples),
            META_SEED: str(self.seed),
        }
        for key, value in (
            (META_FRAMES_PER_SLICE, self.frames_per_slice),
            (META_MAX_SECONDS, self.max_seconds),
            (META_MAX_SECONDS_PER_FRAME, self.max_seconds_per_frame),
            (META_TILES, self.tiles),
            (META_ROW_START, self.row_start),
            (META_ROW_END, self.row_end),
        ):
            if value is not None:
                meta[key] = str(value)
        if self.allow_blank:
            meta[META_ALLOW_BLANK] = "1"
        if self.assets:
            meta[META_ASSETS] = encode_assets(self.assets)
        tensors: dict[str, npt.NDArray[Any]] = {
            asset_tensor(sha): np.frombuffer(data, dtype=np.uint8) for sha, data in self.asset_data
        }
        if self.scene is not None:
            tensors[SCENE_TENSOR] = np.frombuffer(self.scene, dtype=np.uint8)
        else:
            meta[META_SCENE_URL] = str(self.scene_url)
        return encode_tensors(tensors, metadata=meta)

    @classmethod
    def decode(cls, data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> RenderRequest:
        """Parse and validate a payload; every fault raises RemoteProtocolError."""
        tensors, meta = decode_tensors(data, max_bytes=max_bytes)
        unknown = sorted(set(meta) - _REQUEST_KEYS)
        if unknown:
            raise RemoteProtocolError(f"unknown metadata keys: {unknown}")
        if meta.get(META_CLASS) != CLASS:
            raise RemoteProtocolError(f"workload class is {meta.get(META_CLASS)!r}, not {CLASS!r}")
        assets = _parse_assets(meta.get(META_ASSETS))
        inline = {asset_tensor(sha): sha for _, sha in assets}
        extra = sorted(set(tensors) - {SCENE_TENSOR} - set(inline))
        if extra:
            raise RemoteProtocolError(
                f"unexpected tensors {extra[:5]}; only {SCENE_TENSOR} and listed assets"
            )
        for name, array in tensors.items():
            if array.dtype != np.uint8 or array.ndim != 1:
                raise RemoteProtocolError(f"{name} must be a one-dimensional U8 tensor")
        scene = tensors[SCENE_TENSOR].tobytes() if SCENE_TENSOR in tensors else None
        asset_data = tuple(
            (inline[name], tensors[name].tobytes()) for name in sorted(tensors) if name in inline
        )
        allow = meta.get(META_ALLOW_BLANK)
        if allow not in (None, "1"):
            raise RemoteProtocolError(f"metadata {META_ALLOW_BLANK!r} must be '1' when present")
        try:
            return cls(
                scene_sha256=meta.get(META_SCENE_SHA256, ""),
                frame_start=required_int(meta, META_FRAME_START),
                frame_end=required_int(meta, META_FRAME_END),
                width=required_int(meta, META_WIDTH),
                height=required_int(meta, META_HEIGHT),
                samples=required_int(meta, META_SAMPLES),
                seed=required_int(meta, META_SEED),
                scene=scene,
                scene_url=meta.get(META_SCENE_URL),
                frames_per_slice=parse_int(meta, META_FRAMES_PER_SLICE),
                max_seconds=parse_int(meta, META_MAX_SECONDS),
                max_seconds_per_frame=parse_int(meta, META_MAX_SECONDS_PER_FRAME),
                allow_blank=allow == "1",
                tiles=parse_int(meta, META_TILES),
                row_start=parse_int(meta, META_ROW_START),
                row_end=parse_int(meta, META_ROW_END),
                assets=assets,
                asset_data=asset_data,
            )
        except LocalProtocolError as exc:  # the same checks, but now the peer broke them
            raise RemoteProtocolError(str(exc)) from None

    def narrowed(self, frame_start: int, frame_end: int) -> RenderRequest:
        """The same request for a sub-range: one slice's payload."""
        return self._derived(frame_start=frame_start, frame_end=frame_end)

    def band(self, row_start: int, row_end: int) -> RenderRequest:
        """The same frame, rows *row_start*..*row_end* only: one tile slice's payload."""
        return self._derived(tiles=None, row_start=row_start, row_end=row_end)

    def _derived(self, **changes: int | None) -> RenderRequest:
        """:func:`dataclasses.replace` for changes that keep the inline bytes as they are.

        The changed request is checked again, except for the SHA-256s of its scene and
        assets: they are this request's bytes, already hashed when it was built, and a
        split would otherwise hash a scene of tens of MiB once per slice.
        """
        if not set(changes) <= {f.name for f in fields(self)}:
            raise LocalProtocolError(f"not all of {sorted(changes)} are RenderRequest fields")
        derived = copy.copy(self)  # no __init__, so no __post_init__ hashing
        for name, value in changes.items():
            object.__setattr__(derived, name, value)  # frozen: the way dataclasses set it
        derived._check_fields(LocalProtocolError)
        return derived

    def inlined(self, scene: bytes) -> RenderRequest:
        """The same request with the scene carried inline instead of by URL."""
        return replace(self, scene=scene, scene_url=None)

    def missing_assets(self) -> list[str]:
        """The SHA-256s of manifest assets not carried inline (each fetched once)."""
        carried = {sha for sha, _ in self.asset_data}
        return sorted({sha for _, sha in self.assets} - carried)

    def blob_refs(self) -> list[tuple[str, str]]:
        """(what, sha256) of each input a node fetches from the coordinator's blob store.

        The scene when ``scene_url`` is ``/v1/blobs/<scene_sha256>``, and every manifest
        asset not carried inline, by its path. A scene at an ``http(s)`` URL is not listed:
        the requester serves it, not the coordinator.
        """
        refs = []
        if self.scene_url == blob_url(self.scene_sha256):
            refs.append(("scene", self.scene_sha256))
        carried = {sha for sha, _ in self.asset_data}
        refs += [(f"asset {path}", sha) for path, sha in self.assets if sha not in carried]
        return refs

    def with_assets(self, blobs: Mapping[str, bytes]) -> RenderRequest:
        """The same request with these assets (sha256 -> bytes) carried inline too."""
        merged = dict(self.asset_data)
        merged.update(blobs)
        return replace(self, asset_data=tuple(sorted(merged.items())))

    def asset_files(self) -> list[tuple[str, bytes]]:
        """(path, bytes) of every manifest asset; RemoteProtocolError if one is not inline."""
        data = dict(self.asset_data)
        missing = self.missing_assets()
        if missing:
            raise RemoteProtocolError(f"assets not carried inline: {missing[:3]}")
        return [(path, data[sha]) for path, sha in self.assets]


def make_request(
    scene: bytes,
    *,
    frames: tuple[int, int],
    width: int,
    height: int,
    samples: int,
    seed: int = 0,
    scene_url: str | None = None,
    **options: Any,
) -> RenderRequest:
    """A request for *scene* (hashed here): inline, or by *scene_url* when one is given."""
    return RenderRequest(
        scene_sha256=hashlib.sha256(scene).hexdigest(),
        frame_start=frames[0],
        frame_end=frames[1],
        width=width,
        height=height,
        samples=samples,
        seed=seed,
        scene=None if scene_url is not None else scene,
        scene_url=scene_url,
        **options,
    )


def resolve_blobs(
    payload: bytes, fetch: Callable[[str], bytes], *, max_bytes: int = DEFAULT_MAX_BYTES
) -> bytes:
    """Inline a URL-referenced scene and the manifest's assets, so an offline worker can run.

    The daemon calls this before dispatching to a worker; *fetch* maps a URL to bytes
    (assets come from ``/v1/blobs/<sha256>``). Every fetched blob is checked against its
    SHA-256 before it is used. A payload that is already self-contained comes back unchanged.

    The inlined payload must still fit *max_bytes* (the worker's payload limit, 256 MiB by
    default, the same as the container's): a running total of the fetched bytes stops the
    fetching once it passes, so a manifest of many large assets is refused as the
    requester's fault after at most one blob past the limit, not held in memory in full.
    """
    request = RenderRequest.decode(payload, max_bytes=max_bytes)
    missing = request.missing_assets()
    if request.scene_url is None and not missing:
        return payload
    total = len(payload)

    def fetched(url: str, sha256: str, what: str) -> bytes:
        nonlocal total
        data = _fetch_checked(fetch, url, sha256, what)
        total += len(data)
        if total > max_bytes:
            raise RemoteProtocolError(
                f"inlining the scene and assets takes the payload to {total} bytes or more, "
                f"over the worker's payload limit of {max_bytes}; use a smaller scene, or "
                "fewer or smaller assets"
            )
        return data

    if request.scene_url is not None:
        request = request.inlined(fetched(request.scene_url, request.scene_sha256, "scene"))
    blobs = {sha: fetched(blob_url(sha), sha, "asset") for sha in missing}
    return request.with_assets(blobs).encode()


def blob_refs(payload: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> list[tuple[str, str]]:
    """:meth:`RenderRequest.blob_refs` of a payload: what must be in the blob store.

    The coordinator asks this when a job is submitted. A payload whose header names
    neither a ``scene_url`` nor an asset manifest references nothing, and is not decoded
    again (an inline scene can be tens of MiB).
    """
    metadata = read_metadata(payload, max_bytes=max_bytes)
    if META_SCENE_URL not in metadata and META_ASSETS not in metadata:
        return []
    return RenderRequest.decode(payload, max_bytes=max_bytes).blob_refs()


def _fetch_checked(fetch: Callable[[str], bytes], url: str, sha256: str, what: str) -> bytes:
    data = fetch(url)
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise RemoteProtocolError(f"{what} at {url[:80]} has sha256 {actual}, expected {sha256}")
    return data
