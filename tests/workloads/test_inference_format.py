"""The tensor container and the ai.inference request/result formats (2.3.5, 2.3.6)."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from nodeclient.errors import LocalProtocolError, RemoteProtocolError
from nodeclient.workloads.inference import (
    CLASS,
    MODEL_TENSOR,
    InferenceRequest,
    blob_refs,
    decode_result,
    encode_result,
    make_request,
)
from nodeclient.workloads.tensors import DTYPES, decode_tensors, dtype_code, encode_tensors
from tests.models import identity_model

# The vectors published in docs/_parts/inference.md.
VECTOR_X = bytes.fromhex(
    "3800000000000000"
    "7b2278223a7b226474797065223a22463332222c227368617065223a5b325d2c"
    "22646174615f6f666673657473223a5b302c385d7d7d2020"
    "0000803f00000040"
)
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
VECTOR_RESULT = bytes.fromhex(
    "b000000000000000"
    "7b225f5f6d657461646174615f5f223a7b22636c617373223a2261692e696e66"
    "6572656e6365222c226d6f64656c5f736861323536223a226533623063343432"
    "3938666331633134396166626634633839393666623932343237616534316534"
    "363439623933346361343935393931623738353262383535227d2c2279223a7b"
    "226474797065223a22463332222c227368617065223a5b325d2c22646174615f"
    "6f666673657473223a5b302c385d7d7d"
    "0000803f00000040"
)


def _raw(header: dict[str, Any] | bytes, data: bytes = b"") -> bytes:
    """A container with a hand-written header, for feeding the decoder malformed input."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data


def _x_entry(**overrides: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    entry.update(overrides)
    return entry


# --- the tensor container -------------------------------------------------------------


def test_documented_vector_encodes_exactly() -> None:
    """One F32 tensor x = [1.0, 2.0] gives the bytes the documentation publishes."""
    assert encode_tensors({"x": np.array([1.0, 2.0], dtype=np.float32)}) == VECTOR_X


def test_documented_vector_decodes() -> None:
    """The published vector decodes back to x = [1.0, 2.0] with no metadata."""
    tensors, metadata = decode_tensors(VECTOR_X)
    assert metadata == {}
    assert list(tensors) == ["x"]
    assert tensors["x"].dtype == np.float32
    assert tensors["x"].tolist() == [1.0, 2.0]


def test_single_tensor_matches_safetensors_bytes() -> None:
    """Without metadata our canonical bytes equal the safetensors package's own output."""
    tensors = {"w": np.arange(12, dtype=np.float64).reshape(3, 4), "m": np.ones(3, np.int8)}
    assert encode_tensors(tensors) == st_save(tensors)


def _mixed() -> dict[str, np.ndarray]:
    return {
        "f16": np.array([0.5, -1.0], dtype=np.float16),
        "f32": np.arange(6, dtype=np.float32).reshape(2, 3),
        "f64": np.array(3.25),  # rank 0
        "i8": np.array([-1, 2, 3], dtype=np.int8),
        "i16": np.array([[1], [2]], dtype=np.int16),
        "i32": np.array([7], dtype=np.int32),
        "i64": np.array([-(2**40)], dtype=np.int64),
        "u8": np.array([255, 0], dtype=np.uint8),
        "u16": np.array([65535], dtype=np.uint16),
        "u32": np.array([1, 2, 3], dtype=np.uint32),
        "u64": np.array([2**63], dtype=np.uint64),
        "flag": np.array([True, False, True]),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }


def test_safetensors_reads_what_we_write(tmp_path: Path) -> None:
    """The safetensors package loads our containers: same tensors, same metadata."""
    tensors = _mixed()
    data = encode_tensors(tensors, metadata={"b": "2", "a": "ü"})
    loaded = st_load(data)
    assert set(loaded) == set(tensors)
    for name, array in tensors.items():
        assert loaded[name].dtype == array.dtype
        assert loaded[name].shape == array.shape
        assert np.array_equal(loaded[name], array)
    path = tmp_path / "t.safetensors"
    path.write_bytes(data)
    with safe_open(str(path), framework="np") as handle:
        assert handle.metadata() == {"a": "ü", "b": "2"}


def test_we_read_what_safetensors_writes() -> None:
    """Our decoder accepts the safetensors package's output, metadata included."""
    tensors = _mixed()
    decoded, metadata = decode_tensors(st_save(tensors, metadata={"k": "v"}))
    assert metadata == {"k": "v"}
    assert set(decoded) == set(tensors)
    for name, array in tensors.items():
        assert decoded[name].dtype == array.dtype
        assert np.array_equal(decoded[name], array)


def test_round_trip_keeps_every_dtype_and_shape() -> None:
    """Every supported dtype, a rank-0 and a zero-size tensor survive a round trip."""
    tensors = _mixed()
    assert {dtype_code(array.dtype) for array in tensors.values()} == set(DTYPES)
    decoded, _ = decode_tensors(encode_tensors(tensors))
    for name, array in tensors.items():
        assert decoded[name].shape == array.shape
        assert decoded[name].dtype == array.dtype
        assert decoded[name].tobytes() == array.tobytes()


def test_encoding_ignores_order_layout_and_byte_order() -> None:
    """Same values give same bytes whatever the dict order, memory layout or endianness."""
    base = np.arange(6, dtype=np.float32).reshape(2, 3)
    first = encode_tensors(
        {"a": base, "b": np.int64(5) * np.ones(2, np.int64)}, metadata={"p": "1", "q": "2"}
    )
    fortran = np.asfortranarray(base)
    big_endian = base.astype(">f4")
    assert (
        encode_tensors({"b": np.array([5, 5]), "a": fortran}, metadata={"q": "2", "p": "1"})
        == first
    )
    assert (
        encode_tensors({"b": np.array([5, 5]), "a": big_endian}, metadata={"q": "2", "p": "1"})
        == first
    )


def test_canonical_layout_keeps_every_tensor_aligned() -> None:
    """Tensors are laid out largest element first, so each starts at a multiple of its size."""
    data = encode_tensors(_mixed())
    (header_len,) = struct.unpack_from("<Q", data)
    assert (8 + header_len) % 8 == 0
    header = json.loads(data[8 : 8 + header_len])
    for entry in header.values():
        assert entry["data_offsets"][0] % DTYPES[entry["dtype"]].itemsize == 0


def test_decoded_arrays_are_read_only() -> None:
    """Decoded arrays are views into the payload; writing through them must fail."""
    tensors, _ = decode_tensors(VECTOR_X)
    with pytest.raises(ValueError, match="read-only"):
        tensors["x"][0] = 3.0


@pytest.mark.parametrize(
    ("tensors", "match"),
    [
        ({"c": np.array([1j])}, "unsupported dtype"),
        ({"s": np.array(["text"])}, "unsupported dtype"),
        ({"l": [1.0, 2.0]}, "not an ndarray"),
        ({"": np.zeros(1)}, "non-empty string"),
        ({"a\nb": np.zeros(1)}, "control character"),
        ({"__metadata__": np.zeros(1)}, "reserved"),
    ],
)
def test_encoder_refuses_what_it_cannot_represent(tensors: dict[str, Any], match: str) -> None:
    """Unsupported dtypes, non-arrays and bad names are our bug: LocalProtocolError."""
    with pytest.raises(LocalProtocolError, match=match):
        encode_tensors(tensors)


def test_encoder_refuses_non_string_metadata() -> None:
    """Metadata values are strings, as the safetensors format requires."""
    with pytest.raises(LocalProtocolError, match="must be a string"):
        encode_tensors({}, metadata={"n": 1})  # type: ignore[dict-item]


_EIGHT = b"\x00" * 8

MALFORMED = [
    pytest.param(b"\x01\x00", "truncated: 2 bytes", id="shorter-than-length-prefix"),
    pytest.param(VECTOR_X[:-1], "spans 8 bytes but 7", id="truncated-data"),
    pytest.param(
        struct.pack("<Q", 100) + b"{}", "header claims 100 bytes but only 2", id="truncated-header"
    ),
    pytest.param(struct.pack("<Q", 2**40) + b"{}", "exceeds the limit", id="header-too-large"),
    pytest.param(_raw(b"{not json"), "not valid JSON", id="not-json"),
    pytest.param(_raw(b"\xff\xfe"), "not valid UTF-8", id="not-utf8"),
    pytest.param(_raw(b"[1, 2]"), "not a JSON object", id="header-not-object"),
    pytest.param(
        _raw(
            b'{"x":'
            + json.dumps(_x_entry()).encode()
            + b',"x":'
            + json.dumps(_x_entry()).encode()
            + b"}",
            _EIGHT,
        ),
        "repeats the key 'x'",
        id="duplicate-name",
    ),
    pytest.param(
        _raw({"x": _x_entry(dtype="C64")}, _EIGHT), "dtype 'C64' is not supported", id="bad-dtype"
    ),
    pytest.param(
        _raw({"x": _x_entry(dtype="BF16")}, _EIGHT), "dtype 'BF16' is not supported", id="bf16"
    ),
    pytest.param(_raw({"x": _x_entry(shape=[2.0])}, _EIGHT), "non-integer number", id="float-dim"),
    pytest.param(_raw({"x": _x_entry(shape=[True, 2])}, _EIGHT), "list of integers", id="bool-dim"),
    pytest.param(_raw({"x": _x_entry(shape=[-2])}, _EIGHT), "out of range", id="negative-dim"),
    pytest.param(_raw({"x": _x_entry(shape=[1] * 33)}, _EIGHT), "rank 33 exceeds 32", id="rank"),
    pytest.param(
        _raw({"x": _x_entry(shape=[3])}, _EIGHT),
        "needs 12 bytes but data_offsets span 8",
        id="shape-bytes",
    ),
    pytest.param(_raw({"x": _x_entry(shape=[2**62, 2**62])}, _EIGHT), "needs", id="huge-shape"),
    pytest.param(
        _raw({"x": _x_entry(data_offsets=[4, 12])}, _EIGHT + _EIGHT[:4]),
        "begin at 4, expected 0",
        id="gap",
    ),
    pytest.param(
        _raw({"x": _x_entry(data_offsets=[8, 0])}, _EIGHT), "0 <= begin <= end", id="reversed"
    ),
    pytest.param(
        _raw({"x": _x_entry(data_offsets=[0])}, _EIGHT), "\\[begin, end\\]", id="one-offset"
    ),
    pytest.param(
        _raw({"x": _x_entry(shape=[4], data_offsets=[0, 16])}, _EIGHT),
        "spans 16 bytes but 8",
        id="out-of-range",
    ),
    pytest.param(
        _raw({"x": _x_entry()}, _EIGHT + b"\x00"), "spans 8 bytes but 9", id="trailing-bytes"
    ),
    pytest.param(
        _raw({"x": _x_entry(), "y": _x_entry(data_offsets=[4, 12])}, _EIGHT * 2),
        "begin at 4, expected 8",
        id="overlap",
    ),
    pytest.param(
        _raw({"x": {"dtype": "F32", "shape": [2]}}, _EIGHT),
        "exactly dtype, shape",
        id="missing-key",
    ),
    pytest.param(_raw({"x": _x_entry(extra=1)}, _EIGHT), "exactly dtype, shape", id="extra-key"),
    pytest.param(_raw({"__metadata__": {"k": 1}}), "must be a string", id="metadata-value"),
    pytest.param(_raw({"__metadata__": ["k"]}), "object of strings", id="metadata-shape"),
    pytest.param(
        _raw({"b": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}}, b"\x01\x02"),
        "BOOL bytes must be 0 or 1",
        id="bool-byte",
    ),
    pytest.param(_raw({"": _x_entry()}, _EIGHT), "non-empty string", id="empty-name"),
]


@pytest.mark.parametrize(("data", "match"), MALFORMED)
def test_decoder_refuses_malformed_containers(data: bytes, match: str) -> None:
    """Each malformation raises RemoteProtocolError naming what is wrong."""
    with pytest.raises(RemoteProtocolError, match=match):
        decode_tensors(data)


def test_decoder_refuses_oversized_container_before_parsing() -> None:
    """A container larger than max_bytes is refused on its length alone."""
    with pytest.raises(RemoteProtocolError, match="over the limit of 16"):
        decode_tensors(VECTOR_X, max_bytes=16)


def test_decoder_enforces_max_tensors() -> None:
    """More tensors than max_tensors is refused."""
    data = encode_tensors({f"t{i}": np.zeros(1, np.uint8) for i in range(5)})
    assert len(decode_tensors(data, max_tensors=5)[0]) == 5
    with pytest.raises(RemoteProtocolError, match="5 tensors, over the limit of 4"):
        decode_tensors(data, max_tensors=4)


def test_a_header_seen_before_is_still_held_to_its_data() -> None:
    """Headers are parsed once and remembered; what depends on the data is checked again
    on every decode: the data's length, BOOL bytes, and a copy of the metadata each time."""
    data = encode_tensors({"x": np.ones(2, np.float32)}, metadata={"k": "v"})
    tensors, metadata = decode_tensors(data)
    metadata["k"] = "changed"
    assert decode_tensors(data)[1] == {"k": "v"}
    np.testing.assert_array_equal(decode_tensors(data)[0]["x"], tensors["x"])
    with pytest.raises(RemoteProtocolError, match="spans 8 bytes but 9 bytes follow"):
        decode_tensors(data + b"\0")
    with pytest.raises(RemoteProtocolError, match="spans 8 bytes but 7 bytes follow"):
        decode_tensors(data[:-1])
    flags = encode_tensors({"b": np.array([True, False])})
    decode_tensors(flags)
    with pytest.raises(RemoteProtocolError, match="BOOL bytes must be 0 or 1"):
        decode_tensors(flags[:-1] + b"\x02")


def test_encoder_checks_every_call_and_keys_its_header_on_everything() -> None:
    """A remembered header is reused only for the same names, dtypes, shapes and metadata;
    bad input is refused every time, also after a good encode of the same layout."""
    x = np.ones(2, np.float32)
    plain = encode_tensors({"x": x}, metadata={"k": "v"})
    assert encode_tensors({"x": x}, metadata={"k": "w"}) != plain
    assert encode_tensors({"x": x.astype(np.float64)}, metadata={"k": "v"}) != plain
    assert encode_tensors({"x": np.ones(3, np.float32)}, metadata={"k": "v"}) != plain
    assert encode_tensors({"y": x}, metadata={"k": "v"}) != plain
    for _ in range(2):
        with pytest.raises(LocalProtocolError, match="must be a string"):
            encode_tensors({"x": x}, metadata={"k": 1})  # type: ignore[dict-item]
        with pytest.raises(LocalProtocolError, match="not valid Unicode"):
            encode_tensors({"x": x}, metadata={"k": "\ud800"})
    decoded, metadata = decode_tensors(plain)
    assert metadata == {"k": "v"}
    np.testing.assert_array_equal(decoded["x"], x)


# --- ai.inference requests ------------------------------------------------------------


def _inputs() -> dict[str, np.ndarray]:
    return {"x": np.array([[1.0, 2.0]], dtype=np.float32)}


def test_inline_request_round_trips() -> None:
    """An inline request decodes to the same model, hash, inputs and output names."""
    model = identity_model()
    request = make_request(model, _inputs(), output_names=["y"])
    decoded = InferenceRequest.decode(request.encode())
    assert decoded.model == model
    assert decoded.model_sha256 == hashlib.sha256(model).hexdigest()
    assert decoded.model_url is None
    assert decoded.output_names == ("y",)
    assert list(decoded.inputs) == ["x"]
    assert np.array_equal(decoded.inputs["x"], _inputs()["x"])


def test_url_request_round_trips_without_model_bytes() -> None:
    """A by-URL request carries the hash and URL but no __model__ tensor."""
    request = make_request(
        identity_model(), _inputs(), inline=False, model_url="https://c.example/m"
    )
    tensors, metadata = decode_tensors(request.encode())
    assert MODEL_TENSOR not in tensors
    assert metadata["model_url"] == "https://c.example/m"
    decoded = InferenceRequest.decode(request.encode())
    assert decoded.model is None
    assert decoded.model_url == "https://c.example/m"


def test_blob_refs_name_only_a_model_in_the_coordinators_blob_store() -> None:
    """A model_url of /v1/blobs/<sha256> is the coordinator's to hold; an inline model, an
    external URL, or a relative URL that is no blob id is not listed."""
    model = identity_model()
    sha = hashlib.sha256(model).hexdigest()

    def refs(**kw: Any) -> list[tuple[str, str]]:
        return blob_refs(make_request(model, _inputs(), **kw).encode())

    assert refs(inline=False, model_url=f"/v1/blobs/{sha}") == [("model", sha)]
    assert refs() == []
    assert refs(inline=False, model_url=f"https://c.example/v1/blobs/{sha}") == []


def test_blob_store_url_must_name_the_models_own_hash() -> None:
    """A /v1/blobs/ model_url for another blob (or another spelling) is refused, both when a
    requester builds it and when a payload arrives, so the store check and the node's fetch
    look at the same blob."""
    model = identity_model()
    sha = hashlib.sha256(model).hexdigest()
    other = hashlib.sha256(b"another model").hexdigest()
    for url in (
        f"/v1/blobs/{other}",
        f"/v1/blobs/{sha.upper()}",
        f"/v1/blobs/{sha}/x",
        f"/v1/./blobs/{sha}",  # an HTTP client would normalise it to the blob path
        "/elsewhere/model.onnx",
    ):
        with pytest.raises(LocalProtocolError, match="is a path other than"):
            make_request(model, _inputs(), inline=False, model_url=url)
        tensors, metadata = decode_tensors(
            make_request(model, _inputs(), inline=False, model_url=f"/v1/blobs/{sha}").encode()
        )
        forged = encode_tensors(tensors, metadata={**metadata, "model_url": url})
        with pytest.raises(RemoteProtocolError, match="is a path other than"):
            InferenceRequest.decode(forged)


def test_request_encoding_is_deterministic() -> None:
    """Building the same request twice gives identical payload bytes."""
    model = identity_model()
    assert make_request(model, _inputs()).encode() == make_request(model, _inputs()).encode()


def test_request_metadata_layout() -> None:
    """The model travels as a U8 tensor; class, hash and outputs travel as metadata."""
    model = identity_model()
    tensors, metadata = decode_tensors(make_request(model, _inputs(), output_names=["y"]).encode())
    assert tensors[MODEL_TENSOR].dtype == np.uint8
    assert tensors[MODEL_TENSOR].tobytes() == model
    assert metadata == {
        "class": CLASS,
        "model_sha256": hashlib.sha256(model).hexdigest(),
        "outputs": '["y"]',
    }


def test_make_request_needs_exactly_one_model_form() -> None:
    """Inline with a URL, or not inline without one, is a local mistake."""
    with pytest.raises(LocalProtocolError, match="does not also take"):
        make_request(identity_model(), _inputs(), model_url="https://c.example/m")
    with pytest.raises(LocalProtocolError, match="needs a model_url"):
        make_request(identity_model(), _inputs(), inline=False)


def test_building_an_inconsistent_request_fails_locally() -> None:
    """The dataclass validates itself: a wrong inline hash is a LocalProtocolError."""
    with pytest.raises(LocalProtocolError, match="inline model has sha256"):
        InferenceRequest(model_sha256="0" * 64, inputs={}, model=identity_model())


def _request_container(
    *, metadata: dict[str, str], model: bytes | None = None, **tensors: np.ndarray
) -> bytes:
    all_tensors = dict(tensors)
    if model is not None:
        all_tensors[MODEL_TENSOR] = np.frombuffer(model, dtype=np.uint8)
    return encode_tensors(all_tensors, metadata=metadata)


_MODEL = identity_model()
_SHA = hashlib.sha256(_MODEL).hexdigest()
_X = np.zeros(2, np.float32)

BAD_REQUESTS = [
    pytest.param(
        _request_container(
            metadata={"class": "media.render", "model_sha256": _SHA}, model=_MODEL, x=_X
        ),
        "workload class is 'media.render'",
        id="unknown-class",
    ),
    pytest.param(
        _request_container(metadata={"model_sha256": _SHA}, model=_MODEL, x=_X),
        "workload class is None",
        id="missing-class",
    ),
    pytest.param(
        _request_container(
            metadata={"class": CLASS, "model_sha256": _SHA, "model_url": "https://c.example/m"},
            model=_MODEL,
            x=_X,
        ),
        "exactly one of an inline model and a model_url",
        id="both-model-forms",
    ),
    pytest.param(
        _request_container(metadata={"class": CLASS, "model_sha256": _SHA}, x=_X),
        "exactly one of an inline model and a model_url",
        id="neither-model-form",
    ),
    pytest.param(
        _request_container(metadata={"class": CLASS, "model_sha256": "1" * 64}, model=_MODEL, x=_X),
        "inline model has sha256",
        id="hash-mismatch",
    ),
    pytest.param(
        _request_container(metadata={"class": CLASS, "model_sha256": _SHA.upper()}, model=_MODEL),
        "64 lowercase hex digits",
        id="hash-uppercase",
    ),
    pytest.param(
        _request_container(metadata={"class": CLASS, "model_sha256": _SHA + "\n"}, model=_MODEL),
        "64 lowercase hex digits",
        id="hash-trailing-newline",
    ),
    pytest.param(
        _request_container(
            metadata={"class": CLASS, "model_sha256": _SHA, "priority": "1"}, model=_MODEL
        ),
        "unknown metadata keys: \\['priority'\\]",
        id="unknown-metadata",
    ),
    pytest.param(
        _request_container(metadata={"class": CLASS, "model_sha256": _SHA}, model=_MODEL, __x=_X),
        "reserved prefix",
        id="reserved-input-name",
    ),
    pytest.param(
        encode_tensors(
            {MODEL_TENSOR: np.frombuffer(_MODEL, np.uint8).reshape(1, -1)},
            metadata={"class": CLASS, "model_sha256": _SHA},
        ),
        "one-dimensional U8",
        id="model-not-1d",
    ),
    pytest.param(
        _request_container(
            metadata={"class": CLASS, "model_sha256": _SHA, "outputs": "y"}, model=_MODEL
        ),
        "not valid JSON",
        id="outputs-not-json",
    ),
    pytest.param(
        _request_container(
            metadata={"class": CLASS, "model_sha256": _SHA, "outputs": '{"y": 1}'}, model=_MODEL
        ),
        "JSON array of strings",
        id="outputs-not-list",
    ),
    pytest.param(
        _request_container(
            metadata={"class": CLASS, "model_sha256": _SHA, "outputs": '["y","y"]'}, model=_MODEL
        ),
        "output names repeat",
        id="outputs-repeat",
    ),
    pytest.param(
        _request_container(
            metadata={"class": CLASS, "model_sha256": _SHA, "model_url": "https://a b"}
        ),
        "whitespace",
        id="url-whitespace",
    ),
]


@pytest.mark.parametrize(("data", "match"), BAD_REQUESTS)
def test_bad_requests_are_refused(data: bytes, match: str) -> None:
    """Each inconsistent request raises RemoteProtocolError with a precise reason."""
    with pytest.raises(RemoteProtocolError, match=match):
        InferenceRequest.decode(data)


def test_request_decode_enforces_max_bytes() -> None:
    """The payload limit applies before the request is parsed."""
    data = make_request(identity_model(), _inputs()).encode()
    with pytest.raises(RemoteProtocolError, match="over the limit of 64"):
        InferenceRequest.decode(data, max_bytes=64)


# --- ai.inference results -------------------------------------------------------------


def test_documented_result_vector_encodes_exactly() -> None:
    """The published result vector is what encode_result writes for y = [1.0, 2.0]."""
    data = encode_result({"y": np.array([1.0, 2.0], np.float32)}, model_sha256=EMPTY_SHA256)
    assert data == VECTOR_RESULT


def test_result_round_trips() -> None:
    """decode_result returns the outputs and the class and model hash metadata."""
    outputs, metadata = decode_result(VECTOR_RESULT, expected_model_sha256=EMPTY_SHA256)
    assert metadata == {"class": CLASS, "model_sha256": EMPTY_SHA256}
    assert outputs["y"].tolist() == [1.0, 2.0]


def test_result_for_another_model_is_refused() -> None:
    """A coordinator can insist that the result names the model it sent."""
    with pytest.raises(RemoteProtocolError, match="result is for model e3b0"):
        decode_result(VECTOR_RESULT, expected_model_sha256="0" * 64)


def test_result_without_class_is_refused() -> None:
    """A container that does not say ai.inference is not an inference result."""
    with pytest.raises(RemoteProtocolError, match="workload class is None"):
        decode_result(VECTOR_X)


def test_result_with_extra_metadata_is_refused() -> None:
    """Results carry exactly class and model_sha256 metadata."""
    data = encode_tensors({}, metadata={"class": CLASS, "model_sha256": EMPTY_SHA256, "x": "1"})
    with pytest.raises(RemoteProtocolError, match="unknown metadata keys"):
        decode_result(data)


def test_a_result_must_hold_the_outputs_asked_for() -> None:
    """No output at all, or other outputs than the request named: a node is not paid for
    a result that answers nothing the requester asked."""
    sha = "ab" * 32
    empty = encode_tensors({}, metadata={"class": CLASS, "model_sha256": sha})
    with pytest.raises(RemoteProtocolError, match="no output tensor"):
        decode_result(empty, expected_model_sha256=sha)
    other = encode_result({"noise": np.zeros(2, np.float32)}, model_sha256=sha)
    with pytest.raises(RemoteProtocolError, match="asked for"):
        decode_result(other, expected_model_sha256=sha, expected_outputs=["label"])
    right = encode_result({"label": np.zeros(2, np.float32)}, model_sha256=sha)
    outputs, _ = decode_result(right, expected_model_sha256=sha, expected_outputs=["label"])
    assert list(outputs) == ["label"]


def test_a_container_header_nested_too_deeply_is_a_protocol_error(
    stock_recursion_limit: None,
) -> None:
    header = b"[" * 100_000
    data = struct.pack("<Q", len(header)) + header
    with pytest.raises(RemoteProtocolError, match="nests too deeply"):
        decode_tensors(data)


def test_output_names_nested_too_deeply_are_a_protocol_error(
    stock_recursion_limit: None,
) -> None:
    """JSON nested past the recursion limit in 'outputs' is the requester's bad payload,
    refused like any other malformed metadata, not an unhandled RecursionError."""
    request = make_request(identity_model(), {"x": np.zeros(4, np.float32)})
    tensors, metadata = decode_tensors(request.encode())
    payload = encode_tensors(dict(tensors), metadata={**metadata, "outputs": "[" * 200_000})
    with pytest.raises(RemoteProtocolError, match="'outputs' nests too deeply"):
        InferenceRequest.decode(payload)


def test_an_empty_tensor_with_huge_dimensions_is_a_protocol_error() -> None:
    """Zero elements, so no data to bound it, but numpy refuses the shape itself."""
    header = json.dumps({"t": {"dtype": "F32", "shape": [0, 2**62, 2**62], "data_offsets": [0, 0]}})
    raw = header.encode()
    with pytest.raises(RemoteProtocolError, match="too large"):
        decode_tensors(struct.pack("<Q", len(raw)) + raw)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://c.example/m", "m.onnx"])
def test_a_model_url_must_be_http_or_the_blob_store(url: str) -> None:
    """Refused when the job is submitted, instead of on a node after a dispatch."""
    with pytest.raises(LocalProtocolError, match="model_url must be an http"):
        make_request(identity_model(), {"x": np.zeros(4, np.float32)}, inline=False, model_url=url)
