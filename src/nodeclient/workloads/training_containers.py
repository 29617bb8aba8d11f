"""The containers inside ``ai.training`` containers: weights and data shards.

A set of weights and a data shard each travel as a tensor container of
:mod:`nodeclient.workloads.tensors` (weights named by the SHA-256 of
:func:`weights_container`) inside the job, slice and result containers. This module
encodes them, checks them against a :class:`~nodeclient.workloads.training_spec.ModelSpec`
(parameter names, shapes and dtypes; a dataset's shapes and labels), and holds the header
check every training container passes (``_meta``). Every fault in received bytes raises
RemoteProtocolError naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from nodeclient.errors import LocalProtocolError, RemoteProtocolError
from nodeclient.workloads.tensors import DEFAULT_MAX_BYTES, decode_tensors, encode_tensors
from nodeclient.workloads.training_spec import CLASS, GRAD_DTYPES, Arrays, ModelSpec

# --- containers inside containers ------------------------------------------------------------


def weights_container(weights: Mapping[str, npt.NDArray[Any]]) -> bytes:
    """The canonical F32 weights container; its SHA-256 names a set of weights."""
    return encode_tensors({k: np.asarray(v, dtype=np.float32) for k, v in weights.items()})


def decode_weights(data: bytes, model: ModelSpec, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Arrays:
    """Weights for *model*: exactly its parameter names and shapes, F32, finite."""
    tensors, _ = decode_tensors(data, max_bytes=max_bytes)
    check_parameters(tensors, model.parameter_shapes(), dtypes=("F32",), what="weights")
    for name, array in tensors.items():
        if not np.isfinite(array).all():
            raise RemoteProtocolError(f"weights: {name!r} holds NaN or infinity")
    return tensors


def check_parameters(
    tensors: Mapping[str, npt.NDArray[Any]],
    shapes: Mapping[str, tuple[int, ...]],
    *,
    dtypes: Sequence[str],
    what: str,
) -> None:
    """The tensors are exactly the model's parameters, with its shapes and an allowed dtype."""
    if set(tensors) != set(shapes):
        missing, extra = sorted(set(shapes) - set(tensors)), sorted(set(tensors) - set(shapes))
        raise RemoteProtocolError(f"{what}: parameters missing {missing[:5]}, unknown {extra[:5]}")
    allowed = [GRAD_DTYPES[d] for d in dtypes]
    for name, array in tensors.items():
        if array.shape != shapes[name]:
            raise RemoteProtocolError(
                f"{what}: {name!r} has shape {list(array.shape)}, "
                f"the model needs {list(shapes[name])}"
            )
        if array.dtype not in allowed:
            raise RemoteProtocolError(f"{what}: {name!r} is {array.dtype}, expected {list(dtypes)}")


def shard_container(x: npt.NDArray[Any], y: npt.NDArray[Any]) -> bytes:
    return encode_tensors({"x": np.asarray(x, np.float32), "y": np.asarray(y, np.int64)})


def check_dataset(model: ModelSpec, x: npt.NDArray[Any], y: npt.NDArray[Any], what: str) -> None:
    """x F32 [n, ...], y I64 [n] class indices the model's output can score, all finite."""
    if x.dtype != np.float32 or x.ndim < 2 or x.shape[0] < 1:
        raise RemoteProtocolError(f"{what}: x must be F32 with shape [n, ...], n >= 1")
    if y.dtype != np.int64 or y.shape != x.shape[:1]:
        raise RemoteProtocolError(f"{what}: y must be I64 with shape [{x.shape[0]}]")
    try:
        out = model.output_shape(tuple(x.shape[1:]))
    except LocalProtocolError as exc:
        raise RemoteProtocolError(f"{what}: {exc}") from None
    if len(out) != 1:
        raise RemoteProtocolError(
            f"{what}: the model's output per sample is {list(out)}, not [classes]"
        )
    if int(y.min()) < 0 or int(y.max()) >= out[0]:
        raise RemoteProtocolError(f"{what}: labels must lie in [0, {out[0]}) for {out[0]} outputs")
    if not np.isfinite(x).all():
        raise RemoteProtocolError(f"{what}: x holds NaN or infinity")


def decode_shard(data: bytes, model: ModelSpec, *, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[
    npt.NDArray[Any], npt.NDArray[Any]
]:  # fmt: skip
    tensors, _ = decode_tensors(data, max_bytes=max_bytes)
    if set(tensors) != {"x", "y"}:
        raise RemoteProtocolError(f"shard must hold exactly x and y, got {sorted(tensors)}")
    check_dataset(model, tensors["x"], tensors["y"], "shard")
    return tensors["x"], tensors["y"]


def _bytes_tensor(tensors: Arrays, name: str) -> bytes:
    array = tensors.get(name)
    if array is None or array.dtype != np.uint8 or array.ndim != 1:
        raise RemoteProtocolError(f"{name!r} must be a one-dimensional U8 tensor")
    return array.tobytes()


def _meta(metadata: Mapping[str, str], kind: str, keys: frozenset[str]) -> None:
    unknown = sorted(set(metadata) - keys - {"class", "kind"})
    if unknown:
        raise RemoteProtocolError(f"unknown metadata keys: {unknown}")
    if metadata.get("class") != CLASS or metadata.get("kind") != kind:
        raise RemoteProtocolError(
            f"container is {metadata.get('class')!r}/{metadata.get('kind')!r}, "
            f"expected {CLASS!r}/{kind!r}"
        )
    missing = sorted(keys - set(metadata))
    if missing:
        raise RemoteProtocolError(f"metadata keys missing: {missing}")


def _remote(exc: LocalProtocolError, what: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"{what}: {exc}")
