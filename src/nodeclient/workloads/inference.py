"""The ``ai.inference`` workload: request and result formats, shared by coordinator and node.

2.3.5 Work Execution: "An AI inference request runs whole". One request carries one ONNX
model and the inputs of one run; the node runs the whole graph once and returns the named
outputs. Both directions use the tensor container of :mod:`nodeclient.workloads.tensors`.

Request (the payload sealed to the node, 2.3.4 Payload Decryption)::

    tensors:   one per model input, named as the model's inputs
               "__model__"  U8, shape [len(model)]  the ONNX model bytes, when sent inline
    metadata:  "class"         "ai.inference"
               "model_sha256"  64 lowercase hex digits, SHA-256 of the ONNX model bytes
               "model_url"     where the node fetches the model, when not sent inline
               "outputs"       optional JSON array of output names, e.g. ["label"]

Exactly one of ``__model__`` and ``model_url`` is present. Tensor names starting with
``__`` are reserved for the format, so a model input cannot use them. Unknown metadata
keys are refused, so that a later revision cannot be half-understood.

Result (the bytes the proof of execution covers, 2.3.6 Proof-of-Execution)::

    tensors:   one per output, named as the model's outputs
    metadata:  "class" "ai.inference", "model_sha256" of the model that produced them

Because the container is canonical, the same outputs always give the same result bytes.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from nodeclient.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from nodeclient.protocol.blobs import BLOB_URL, SHA256_HEX
from nodeclient.workloads.tensors import (
    DEFAULT_MAX_BYTES,
    check_name,
    decode_tensors,
    encode_tensors,
    read_metadata,
)

CLASS: Final = "ai.inference"
MODEL_TENSOR: Final = "__model__"
RESERVED_PREFIX: Final = "__"
META_CLASS: Final = "class"
META_MODEL_SHA256: Final = "model_sha256"
META_MODEL_URL: Final = "model_url"
META_OUTPUTS: Final = "outputs"
MAX_URL_CHARS: Final = 2048
MAX_OUTPUT_NAMES: Final = 1024

_REQUEST_KEYS: Final = frozenset({META_CLASS, META_MODEL_SHA256, META_MODEL_URL, META_OUTPUTS})
_RESULT_KEYS: Final = frozenset({META_CLASS, META_MODEL_SHA256})
_URL_BAD_CHAR_RE: Final = re.compile(r"[\s\x00-\x1f\x7f]")  # whitespace (Unicode too), controls


def check_sha256(value: object, *, error: type[ProtocolError] = LocalProtocolError) -> str:
    """A model hash is exactly 64 lowercase hex digits; one spelling keeps cache keys unique."""
    if not isinstance(value, str) or not SHA256_HEX.fullmatch(value):
        raise error(f"model_sha256 must be 64 lowercase hex digits, got {value!r}")
    return value


def _check_url(url: str, error: type[ProtocolError]) -> None:
    if not isinstance(url, str) or not url:
        raise error("model_url must be a non-empty string")
    if len(url) > MAX_URL_CHARS:
        raise error(f"model_url is {len(url)} characters, over the limit of {MAX_URL_CHARS}")
    if _URL_BAD_CHAR_RE.search(url):
        raise error("model_url contains whitespace or a control character")
    if not url.startswith(("http://", "https://", "/")):
        raise error("model_url must be an http:// or https:// URL, or /v1/blobs/<sha256>")


def _check_request(request: InferenceRequest, error: type[ProtocolError]) -> None:
    check_sha256(request.model_sha256, error=error)
    if (request.model is None) == (request.model_url is None):
        raise error("a request carries exactly one of an inline model and a model_url")
    if request.model is not None:
        if not isinstance(request.model, bytes):
            raise error("an inline model must be bytes")
        actual = hashlib.sha256(request.model).hexdigest()
        if actual != request.model_sha256:
            raise error(
                f"inline model has sha256 {actual}, but model_sha256 says {request.model_sha256}"
            )
    if request.model_url is not None:
        _check_url(request.model_url, error)
        blob = f"/v1/blobs/{request.model_sha256}"
        if request.model_url.startswith("/") and request.model_url != blob:
            raise error(
                f"model_url {request.model_url[:80]!r} is a path other than {blob}: a path "
                "is the coordinator's blob store, where the model is named by its model_sha256"
            )
    for name, array in request.inputs.items():
        check_name(name, error=error)
        if name.startswith(RESERVED_PREFIX):
            raise error(f"input name {name!r} starts with the reserved prefix {RESERVED_PREFIX!r}")
        if not isinstance(array, np.ndarray):
            raise error(f"input {name!r} is a {type(array).__name__}, not an ndarray")
    if request.output_names is not None:
        _check_output_names(request.output_names, error)


def _check_output_names(names: tuple[str, ...], error: type[ProtocolError]) -> None:
    if not isinstance(names, tuple) or not names:
        raise error("output names, when given, are a non-empty tuple")
    if len(names) > MAX_OUTPUT_NAMES:
        raise error(f"{len(names)} output names, over the limit of {MAX_OUTPUT_NAMES}")
    for name in names:
        check_name(name, error=error)
    if len(set(names)) != len(names):
        raise error(f"output names repeat: {list(names)}")


@dataclass(frozen=True, eq=False)
class InferenceRequest:
    """One whole inference: a model (inline or by URL), its inputs, and the outputs wanted.

    ``eq=False`` because field-wise equality over ndarrays raises; compare encodings instead.
    Building one validates it (LocalProtocolError); :meth:`decode` re-raises the same
    checks as RemoteProtocolError, since then the peer is at fault.
    """

    model_sha256: str
    inputs: dict[str, npt.NDArray[Any]]
    model: bytes | None = None
    model_url: str | None = None
    output_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        _check_request(self, LocalProtocolError)

    def encode(self) -> bytes:
        """The canonical request payload, ready to be sealed to a node."""
        tensors: dict[str, npt.NDArray[Any]] = dict(self.inputs)
        metadata = {META_CLASS: CLASS, META_MODEL_SHA256: self.model_sha256}
        if self.model is not None:
            tensors[MODEL_TENSOR] = np.frombuffer(self.model, dtype=np.uint8)
        if self.model_url is not None:
            metadata[META_MODEL_URL] = self.model_url
        if self.output_names is not None:
            metadata[META_OUTPUTS] = json.dumps(
                list(self.output_names), separators=(",", ":"), ensure_ascii=False
            )
        return encode_tensors(tensors, metadata=metadata)

    @classmethod
    def decode(cls, data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> InferenceRequest:
        """Parse and validate a request payload; every fault raises RemoteProtocolError."""
        tensors, metadata = decode_tensors(data, max_bytes=max_bytes)
        _check_metadata(metadata, allowed=_REQUEST_KEYS)
        model: bytes | None = None
        model_array = tensors.pop(MODEL_TENSOR, None)
        if model_array is not None:
            if model_array.dtype != np.uint8 or model_array.ndim != 1:
                raise RemoteProtocolError(f"{MODEL_TENSOR} must be a one-dimensional U8 tensor")
            model = model_array.tobytes()
        output_names = _parse_output_names(metadata.get(META_OUTPUTS))
        try:
            return cls(
                model_sha256=metadata.get(META_MODEL_SHA256, ""),
                inputs=tensors,
                model=model,
                model_url=metadata.get(META_MODEL_URL),
                output_names=output_names,
            )
        except LocalProtocolError as exc:  # the same checks, but now the peer broke them
            raise RemoteProtocolError(str(exc)) from None


def _check_metadata(metadata: Mapping[str, str], *, allowed: frozenset[str]) -> None:
    unknown = sorted(set(metadata) - allowed)
    if unknown:
        raise RemoteProtocolError(f"unknown metadata keys: {unknown}")
    workload = metadata.get(META_CLASS)
    if workload != CLASS:
        raise RemoteProtocolError(f"workload class is {workload!r}, expected {CLASS!r}")
    check_sha256(metadata.get(META_MODEL_SHA256), error=RemoteProtocolError)


def _parse_output_names(raw: str | None) -> tuple[str, ...] | None:
    if raw is None:
        return None
    try:
        names = json.loads(raw)
    except ValueError as exc:
        raise RemoteProtocolError(f"metadata 'outputs' is not valid JSON: {exc}") from exc
    except RecursionError:
        raise RemoteProtocolError("metadata 'outputs' nests too deeply") from None
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise RemoteProtocolError("metadata 'outputs' must be a JSON array of strings")
    return tuple(names)


def blob_refs(payload: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> list[tuple[str, str]]:
    """``[("model", sha256)]`` when ``model_url`` is ``/v1/blobs/<sha256>``, else ``[]``.

    What a node would fetch from the coordinator's own blob store; an inline model, or
    one at any other URL, is not the coordinator's to hold. Header only: the coordinator
    asks this after the payload has been decoded in full.
    """
    url = read_metadata(payload, max_bytes=max_bytes).get(META_MODEL_URL)
    match = None if url is None else BLOB_URL.fullmatch(url)
    return [] if match is None else [("model", match[1])]


def make_request(
    model: bytes,
    inputs: Mapping[str, npt.NDArray[Any]],
    *,
    inline: bool = True,
    model_url: str | None = None,
    output_names: Sequence[str] | None = None,
) -> InferenceRequest:
    """Build a request for *model*, hashing it; inline, or by *model_url* when not inline.

    The coordinator always holds the model bytes, so the hash is computed here rather
    than trusted from elsewhere.
    """
    if inline and model_url is not None:
        raise LocalProtocolError("an inline request does not also take a model_url")
    if not inline and model_url is None:
        raise LocalProtocolError("a request that does not send the model inline needs a model_url")
    return InferenceRequest(
        model_sha256=hashlib.sha256(model).hexdigest(),
        inputs=dict(inputs),
        model=model if inline else None,
        model_url=model_url,
        output_names=None if output_names is None else tuple(output_names),
    )


def encode_result(outputs: Mapping[str, npt.NDArray[Any]], *, model_sha256: str) -> bytes:
    """The canonical result bytes that the proof of execution covers (2.3.6)."""
    check_sha256(model_sha256)
    return encode_tensors(outputs, metadata={META_CLASS: CLASS, META_MODEL_SHA256: model_sha256})


def decode_result(
    data: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    expected_model_sha256: str | None = None,
    expected_outputs: Sequence[str] | None = None,
) -> tuple[dict[str, npt.NDArray[Any]], dict[str, str]]:
    """Parse a node's result into ``(outputs, metadata)``; faults raise RemoteProtocolError.

    A result holds one output at least. With *expected_model_sha256* the coordinator also
    checks that the node ran the model it was sent, not some other one, and with
    *expected_outputs* (the names the request asked for) that it holds exactly those.
    """
    outputs, metadata = decode_tensors(data, max_bytes=max_bytes)
    _check_metadata(metadata, allowed=_RESULT_KEYS)
    if expected_model_sha256 is not None and metadata[META_MODEL_SHA256] != expected_model_sha256:
        raise RemoteProtocolError(
            f"result is for model {metadata[META_MODEL_SHA256]}, expected {expected_model_sha256}"
        )
    if not outputs:
        raise RemoteProtocolError("result holds no output tensor")
    if expected_outputs is not None and sorted(outputs) != sorted(expected_outputs):
        raise RemoteProtocolError(
            f"result holds outputs {sorted(outputs)[:8]}, the request asked for "
            f"{sorted(expected_outputs)[:8]}"
        )
    return outputs, metadata
