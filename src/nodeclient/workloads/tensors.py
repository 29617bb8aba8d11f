"""Named tensors in the safetensors layout, encoded deterministically and decoded defensively.

Every workload payload and result that carries arrays uses this container (2.3.5 Work
Execution). The layout is safetensors (https://github.com/huggingface/safetensors), so any
safetensors reader can open what we write::

    u64 little-endian N | N bytes of UTF-8 JSON header, padded with spaces | tensor bytes

The header maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets relative to the first byte after the header) and may carry ``"__metadata__"``, a
flat ``{str: str}`` object.

Why our own encoder rather than ``safetensors.numpy.save``: the proof of execution is
SHA-256 over the exact result bytes (2.3.6 Proof-of-Execution), so identical outputs must
give identical bytes, and the safetensors package writes ``__metadata__`` in Rust
hash-map order, which changes from one process to the next. Our canonical form is:

* tensors laid out by descending element size, ties broken by name in code point order
  (this keeps every tensor aligned to its element size once the header is padded);
* the header lists ``__metadata__`` first (keys in code point order), then the tensors in
  layout order, each as ``{"dtype","shape","data_offsets"}`` in that key order;
* JSON without whitespace, non-ASCII written as raw UTF-8, then spaces until
  ``8 + N`` is a multiple of 8; the metadata object is left out when empty.

For one tensor, or tensors of distinct element sizes, this is byte for byte what the
safetensors package writes too.

The decoder accepts any valid safetensors layout (not only the canonical one) but checks
every limit before it allocates: total size, header size, tensor count, rank, dtype,
contiguous in-range offsets, and that each shape's element count matches its bytes.
Arrays come back as read-only views into the input, without copying.
"""

from __future__ import annotations

import functools
import json
import math
import re
import struct
from collections.abc import Mapping
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from nodeclient.errors import LocalProtocolError, RemoteProtocolError

DEFAULT_MAX_BYTES: Final = 256 * 1024 * 1024
DEFAULT_MAX_HEADER_BYTES: Final = 1024 * 1024
DEFAULT_MAX_TENSORS: Final = 1024
MAX_RANK: Final = 32
MAX_NAME_CHARS: Final = 1024
METADATA_KEY: Final = "__metadata__"

# safetensors dtype code -> little-endian numpy dtype. Only types numpy holds natively;
# BF16 and the F8 family would need a third-party dtype and are refused for now.
DTYPES: Final[Mapping[str, np.dtype[Any]]] = {
    "BOOL": np.dtype("?"),
    "U8": np.dtype("u1"),
    "I8": np.dtype("i1"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "F16": np.dtype("<f2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "F32": np.dtype("<f4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F64": np.dtype("<f8"),
}
_CODE_BY_KIND: Final = {(dt.kind, dt.itemsize): code for code, dt in DTYPES.items()}
_U64: Final = struct.Struct("<Q")
_ENTRY_KEYS: Final = frozenset({"dtype", "shape", "data_offsets"})
_MAX_DIM: Final = 2**63 - 1
_MAX_EMPTY_DIMS: Final = 2**31  # the product of an empty tensor's non-zero dimensions
# Headers seen again (the same model's requests and results, task after task) are parsed
# and checked once: a worker then spends its time on the model, not on JSON. Only small
# headers are kept (at most 16 tensors, 4096 characters of names and metadata), so each
# cache stays within a few MB even with the longest names and highest ranks.
_CACHED_HEADER_BYTES: Final = 4096
_CACHED_TENSORS: Final = 16
_CACHE_ENTRIES: Final = 64


def dtype_code(dtype: np.dtype[Any]) -> str | None:
    """The safetensors code of a numpy dtype (any byte order), or None if unsupported."""
    return _CODE_BY_KIND.get((dtype.kind, dtype.itemsize))


_NAME_CONTROL: Final = re.compile("[\x00-\x1f\x7f]")  # one C scan, not a loop per character
_KEY_CONTROL: Final = re.compile("[\x00-\x1f]")


def check_name(name: object, *, error: type[Exception] = LocalProtocolError) -> str:
    """Validate a tensor name: a non-empty string without control characters.

    Control characters are refused so that names print safely in logs and errors, and
    ``__metadata__`` because the header reserves it.
    """
    if not isinstance(name, str) or not name:
        raise error(f"tensor name must be a non-empty string, got {name!r}")
    if len(name) > MAX_NAME_CHARS:
        raise error(f"tensor name is {len(name)} characters, over the limit of {MAX_NAME_CHARS}")
    if _NAME_CONTROL.search(name):
        raise error(f"tensor name {name!r} contains a control character")
    if name == METADATA_KEY:
        raise error(f"{METADATA_KEY!r} is reserved for the header's metadata")
    return name


def _check_metadata_pair(key: object, value: object, *, error: type[Exception]) -> None:
    if not isinstance(key, str) or not key or _KEY_CONTROL.search(key):
        raise error(f"metadata key must be a non-empty string without control characters: {key!r}")
    if not isinstance(value, str):
        raise error(f"metadata value for {key!r} must be a string, got {type(value).__name__}")


def encode_tensors(
    tensors: Mapping[str, npt.NDArray[Any]], *, metadata: Mapping[str, str] | None = None
) -> bytes:
    """Encode named arrays (and optional string metadata) in the canonical layout.

    The same names, dtypes, shapes, values and metadata always give the same bytes,
    whatever the insertion order, memory layout or byte order of the inputs. Raises
    LocalProtocolError for input we could not encode (unsupported dtype, bad names).
    """
    prepared: list[tuple[int, str, str, npt.NDArray[Any]]] = []
    for name, array in tensors.items():
        check_name(name)
        if not isinstance(array, np.ndarray):
            raise LocalProtocolError(f"tensor {name!r} is a {type(array).__name__}, not an ndarray")
        code = dtype_code(array.dtype)
        if code is None:
            raise LocalProtocolError(
                f"tensor {name!r} has unsupported dtype {array.dtype}; "
                f"supported: {', '.join(sorted(DTYPES))}"
            )
        if array.ndim > MAX_RANK:
            raise LocalProtocolError(f"tensor {name!r} has rank {array.ndim} > {MAX_RANK}")
        little = np.asarray(array, dtype=DTYPES[code], order="C")  # keeps 0-d shapes
        prepared.append((little.itemsize, name, code, little))
    prepared.sort(key=lambda item: (-item[0], item[1]))
    if metadata:
        for key, value in metadata.items():
            _check_metadata_pair(key, value, error=LocalProtocolError)
    layout = tuple((name, code, little.shape) for _, name, code, little in prepared)
    pairs = tuple(sorted(metadata.items())) if metadata else ()
    small = len(layout) <= _CACHED_TENSORS and (
        sum(len(name) for name, _, _ in layout) + sum(len(k) + len(v) for k, v in pairs)
        <= _CACHED_HEADER_BYTES
    )
    header_bytes = _encoded_header(layout, pairs) if small else _encode_header(layout, pairs)
    chunks = [little.reshape(-1).view(np.uint8).data for *_, little in prepared]
    return b"".join([_U64.pack(len(header_bytes)), header_bytes, *chunks])


_Layout = tuple[tuple[str, str, tuple[int, ...]], ...]  # (name, dtype code, shape) in order


def _encode_header(layout: _Layout, pairs: tuple[tuple[str, str], ...]) -> bytes:
    """The padded JSON header of tensors laid out as *layout*, with checked metadata."""
    header: dict[str, Any] = {METADATA_KEY: dict(pairs)} if pairs else {}
    offset = 0
    for name, code, shape in layout:
        nbytes = math.prod(shape) * DTYPES[code].itemsize
        header[name] = {
            "dtype": code,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    try:
        header_bytes = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError as exc:
        raise LocalProtocolError(f"a name or metadata string is not valid Unicode: {exc}") from exc
    return header_bytes + b" " * (-len(header_bytes) % 8)


_encoded_header = functools.lru_cache(maxsize=_CACHE_ENTRIES)(_encode_header)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise RemoteProtocolError(f"header repeats the key {key!r}")
        result[key] = value
    return result


def _refuse_float(text: str) -> Any:
    raise RemoteProtocolError(f"header holds a non-integer number {text[:40]!r}")


def _parse_header(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
        header = json.loads(
            text,
            object_pairs_hook=_reject_duplicates,
            parse_float=_refuse_float,
            parse_constant=_refuse_float,
        )
    except UnicodeDecodeError as exc:
        raise RemoteProtocolError(f"header is not valid UTF-8: {exc}") from exc
    except ValueError as exc:  # json.JSONDecodeError, and integers beyond Python's digit cap
        raise RemoteProtocolError(f"header is not valid JSON: {exc}") from exc
    except RecursionError:
        raise RemoteProtocolError("header nests too deeply") from None
    if not isinstance(header, dict):
        raise RemoteProtocolError("header is not a JSON object")
    return header


def _int_list(value: object, *, what: str, name: str) -> list[int]:
    # bool is an int subclass in Python; JSON true/false must not pass as 1/0.
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise RemoteProtocolError(f"tensor {name!r}: {what} must be a list of integers")
    return value


def _parse_entry(name: str, entry: object) -> tuple[str, tuple[int, ...], int, int]:
    check_name(name, error=RemoteProtocolError)
    if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
        raise RemoteProtocolError(
            f"tensor {name!r}: entry must be an object with exactly dtype, shape, data_offsets"
        )
    code = entry["dtype"]
    if not isinstance(code, str) or code not in DTYPES:
        raise RemoteProtocolError(
            f"tensor {name!r}: dtype {code!r} is not supported; "
            f"supported: {', '.join(sorted(DTYPES))}"
        )
    shape = _int_list(entry["shape"], what="shape", name=name)
    if len(shape) > MAX_RANK:
        raise RemoteProtocolError(f"tensor {name!r}: rank {len(shape)} exceeds {MAX_RANK}")
    if any(not 0 <= dim <= _MAX_DIM for dim in shape):
        raise RemoteProtocolError(f"tensor {name!r}: shape {shape} has a dimension out of range")
    offsets = _int_list(entry["data_offsets"], what="data_offsets", name=name)
    if len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1]:
        raise RemoteProtocolError(
            f"tensor {name!r}: data_offsets {offsets} must be [begin, end] with 0 <= begin <= end"
        )
    return code, tuple(shape), offsets[0], offsets[1]


def _split(data: bytes, *, max_bytes: int, max_header_bytes: int) -> tuple[bytes, int]:
    """Check the sizes; return the raw header and the offset of the tensor data."""
    size = len(data)
    if size > max_bytes:
        raise RemoteProtocolError(f"container is {size} bytes, over the limit of {max_bytes}")
    if size < _U64.size:
        raise RemoteProtocolError(
            f"container is truncated: {size} bytes, the header length needs 8"
        )
    (header_len,) = _U64.unpack_from(data, 0)
    if header_len > max_header_bytes:
        raise RemoteProtocolError(
            f"header length {header_len} exceeds the limit of {max_header_bytes} bytes"
        )
    if header_len > size - _U64.size:
        raise RemoteProtocolError(
            f"container is truncated: header claims {header_len} bytes "
            f"but only {size - _U64.size} follow"
        )
    return bytes(data[_U64.size : _U64.size + header_len]), _U64.size + header_len


_Entry = tuple[int, int, str, str, tuple[int, ...]]  # begin, end, name, dtype code, shape


def _check_layout(entries: list[_Entry]) -> int:
    """Offsets must tile the data section from 0, and each shape must match its bytes;
    the length of the data section they describe."""
    expected = 0
    for begin, end, name, code, shape in entries:
        if begin != expected:
            raise RemoteProtocolError(
                f"tensor {name!r}: data_offsets begin at {begin}, expected {expected} "
                "(tensor data must be contiguous, without gaps or overlaps)"
            )
        expected = end
        needed = math.prod(shape) * DTYPES[code].itemsize
        if needed != end - begin:
            raise RemoteProtocolError(
                f"tensor {name!r}: shape {list(shape)} of {code} needs {needed} "
                f"bytes but data_offsets span {end - begin}"
            )
    return expected


def _view(data: bytes, start: int, entry: _Entry) -> npt.NDArray[Any]:
    begin, _, name, code, shape = entry
    dtype = DTYPES[code]
    count = math.prod(shape)
    if count == 0:  # no data: the other dimensions could be anything numpy refuses
        if math.prod(d for d in shape if d) > _MAX_EMPTY_DIMS:
            raise RemoteProtocolError(f"tensor {name!r}: shape {list(shape)[:8]} is too large")
        array = np.empty(shape, dtype=dtype)
    else:
        array = np.frombuffer(data, dtype=dtype, count=count, offset=start + begin)
        # Any byte but 0 or 1 in a numpy bool is undefined behaviour downstream.
        if code == "BOOL" and bool((array.view(np.uint8) > 1).any()):
            raise RemoteProtocolError(f"tensor {name!r}: BOOL bytes must be 0 or 1")
        array = array.reshape(shape)
    array.flags.writeable = False
    return array


def _metadata(header: dict[str, Any]) -> dict[str, str]:
    raw_metadata = header.pop(METADATA_KEY, {})
    if not isinstance(raw_metadata, dict):
        raise RemoteProtocolError(f"{METADATA_KEY} must be an object of strings")
    for key, value in raw_metadata.items():
        _check_metadata_pair(key, value, error=RemoteProtocolError)
    return raw_metadata


_Pairs = tuple[tuple[str, str], ...]


def _parse_metadata(raw: bytes) -> _Pairs:
    """The checked ``__metadata__`` of a raw header, sorted by key."""
    return tuple(sorted(_metadata(_parse_header(raw)).items()))


def _parse_layout(raw: bytes, max_tensors: int) -> tuple[tuple[_Entry, ...], _Pairs, int]:
    """A raw header, checked in full: (entries in data order, metadata by key, data length)."""
    header = _parse_header(raw)
    metadata = _metadata(header)
    if len(header) > max_tensors:
        raise RemoteProtocolError(
            f"container holds {len(header)} tensors, over the limit of {max_tensors}"
        )
    entries: list[_Entry] = []
    for name, entry in header.items():
        code, shape, begin, end = _parse_entry(name, entry)
        entries.append((begin, end, name, code, shape))
    entries.sort()
    data_len = _check_layout(entries)
    return tuple(entries), tuple(sorted(metadata.items())), data_len


# Failures raise, so only headers that passed every check are kept.
_parsed_metadata = functools.lru_cache(maxsize=_CACHE_ENTRIES)(_parse_metadata)
_parsed_layout = functools.lru_cache(maxsize=_CACHE_ENTRIES)(_parse_layout)


def read_metadata(
    data: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
) -> dict[str, str]:
    """Only the container's ``__metadata__``, from the header: no tensor is looked at.

    For routing decisions on a hot path (is a model referenced by URL?); whoever acts on
    the payload still decodes it in full with ``decode_tensors``.
    """
    raw, _start = _split(data, max_bytes=max_bytes, max_header_bytes=max_header_bytes)
    parse = _parsed_metadata if len(raw) <= _CACHED_HEADER_BYTES else _parse_metadata
    return dict(parse(raw))


def decode_tensors(
    data: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_tensors: int = DEFAULT_MAX_TENSORS,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
) -> tuple[dict[str, npt.NDArray[Any]], dict[str, str]]:
    """Decode a safetensors container into ``(tensors, metadata)``, both sorted by name.

    Every limit is checked before anything proportional to a claimed size is allocated;
    any violation raises RemoteProtocolError naming the offending field. The arrays are
    read-only views into *data*.
    """
    raw, start = _split(data, max_bytes=max_bytes, max_header_bytes=max_header_bytes)
    parse = _parsed_layout if len(raw) <= _CACHED_HEADER_BYTES else _parse_layout
    entries, metadata, data_len = parse(raw, max_tensors)
    if data_len != len(data) - start:
        raise RemoteProtocolError(
            f"tensor data spans {data_len} bytes but {len(data) - start} bytes follow the header"
        )
    tensors = {entry[2]: _view(data, start, entry) for entry in entries}  # in data order
    return {name: tensors[name] for name in sorted(tensors)}, dict(metadata)
