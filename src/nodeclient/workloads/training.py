"""The ``ai.training`` workload: data-parallel local SGD (DiLoCo), formats shared by both sides.

2.3.5 Work Execution: "a parallelizable sub-task runs its slice". A training job is R
rounds; in each round every slice trains a copy of the global weights for K inner steps on
its own data shard and returns a *pseudo-gradient* (start weights minus end weights); the
coordinator checks, averages and applies them with an outer optimizer
(:mod:`nodeclient.coordinator.rounds`). Nothing a requester sends is executed as code: the
model is a declarative list of layers from an allowlist, weights and data are plain arrays
in the tensor container of :mod:`nodeclient.workloads.tensors`, all identified by SHA-256.

This module is numpy-only, so the coordinator never needs PyTorch: it parses and checks
model specs, computes parameter names and shapes exactly as ``torch.nn.Sequential`` names
them, initialises weights deterministically, shards data, and encodes and decodes:

* the job request (``POST /v1/jobs``), :class:`JobRequest`;
* one slice of one round (the task payload), :class:`SliceRequest`;
* one slice's result, :class:`PseudoGradient`;
* the job's result, :func:`encode_final` / :func:`decode_final`.

Byte formats are listed in docs (``training.md``); every fault in received bytes raises
RemoteProtocolError naming the field, and unknown keys are refused so that a later revision
cannot be half-understood.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from nodeclient.errors import LocalProtocolError, RemoteProtocolError
from nodeclient.protocol.blobs import SHA256_HEX
from nodeclient.workloads.tensors import (
    DEFAULT_MAX_BYTES,
    decode_tensors,
    encode_tensors,
    read_metadata,
)

CLASS: Final = "ai.training"
MAX_LAYERS: Final = 256
MAX_DEPTH: Final = 4
MAX_FEATURES: Final = 1 << 20
MAX_PARAMETERS: Final = 1 << 26
# Every slice of every round carries the whole model's weights (F32) and its shard: one
# slice's payload is bounded by what a task payload may be (the coordinator's default
# max_payload_bytes), all of a round's together by what the coordinator holds at once.
MAX_SLICE_BYTES: Final = 32 * 1024 * 1024
# What a slice's containers add to its weights and shard (the model's JSON, at most 64 KiB,
# the plan, a tensor entry per parameter), and its result's to the weights it sends back:
# held back from MAX_SLICE_BYTES, so that neither is refused at a task payload's limit.
SLICE_HEADER_ROOM: Final = 256 * 1024
MAX_SPLIT_BYTES: Final = 1 << 30
MAX_JSON_CHARS: Final = 64 * 1024
# Rounds x slices of one job: the final result carries a metrics entry per slice and round
# (a few hundred bytes at most), in its header, so this keeps that header within tens of MiB.
MAX_SLICE_ROUNDS: Final = 100_000
MAX_REASON_CHARS: Final = 300  # a dropped slice's reason, as kept in the round's metrics
MAX_SEED: Final = 2**63 - 1
GRAD_DTYPES: Final = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2")}
ACTIVATIONS: Final = frozenset({"ReLU", "GELU", "Tanh", "Sigmoid"})
# type -> allowed keys besides "type"; Dropout exists only as p=0 (no randomness).
LAYER_KEYS: Final[Mapping[str, frozenset[str]]] = {
    "Linear": frozenset({"in", "out", "bias"}),
    "LayerNorm": frozenset({"dim", "eps"}),
    "Dropout": frozenset({"p"}),
    "Flatten": frozenset(),
    "Sequential": frozenset({"layers"}),
    **{name: frozenset() for name in ACTIVATIONS},
}

Arrays = dict[str, npt.NDArray[Any]]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _refuse_constant(text: str) -> Any:
    raise RemoteProtocolError(f"JSON holds {text}, which is not a number")


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise RemoteProtocolError(f"JSON repeats the key {key!r}")
        out[key] = value
    return out


def load_json(text: str, *, what: str, max_chars: int = MAX_JSON_CHARS) -> Any:
    """Strict JSON: size-limited, no duplicate keys, no NaN/Infinity."""
    if len(text) > max_chars:
        raise RemoteProtocolError(f"{what} is {len(text)} characters, over {max_chars}")
    try:
        return json.loads(text, object_pairs_hook=_unique, parse_constant=_refuse_constant)
    except ValueError as exc:
        raise RemoteProtocolError(f"{what} is not valid JSON: {exc}") from exc
    except RecursionError:
        raise RemoteProtocolError(f"{what} nests too deeply") from None


def dump_json(value: Any) -> str:
    """Canonical JSON (sorted keys, no whitespace): the same value, the same bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _int(value: object, what: str, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise LocalProtocolError(f"{what} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _float(value: object, what: str, lo: float, hi: float, *, open_lo: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    try:
        number = float(value) if ok else math.nan  # type: ignore[arg-type]
    except OverflowError:  # an integer past a float's range
        number = math.inf
    if (
        not ok
        or not math.isfinite(number)
        or number > hi
        or number < lo
        or (open_lo and number == lo)
    ):
        side = "(" if open_lo else "["
        raise LocalProtocolError(f"{what} must be a number in {side}{lo}, {hi}], got {value!r}")
    return number


# --- model spec ------------------------------------------------------------------------------


def _normalize_layer(raw: object, depth: int, count: list[int]) -> dict[str, Any]:
    if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
        raise LocalProtocolError(
            f"a layer must be an object with a string 'type', got {raw!r}"[:200]
        )
    kind = raw["type"]
    allowed = LAYER_KEYS.get(kind)
    if allowed is None:
        raise LocalProtocolError(
            f"layer type {kind[:40]!r} is not allowed; allowed: {sorted(LAYER_KEYS)}"
        )
    unknown = sorted(set(raw) - allowed - {"type"})
    if unknown:
        raise LocalProtocolError(f"{kind} layer has unknown keys {unknown}")
    count[0] += 1
    if count[0] > MAX_LAYERS:
        raise LocalProtocolError(f"the model has more than {MAX_LAYERS} layers")
    if kind == "Linear":
        bias = raw.get("bias", True)
        if not isinstance(bias, bool):
            raise LocalProtocolError("Linear 'bias' must be true or false")
        size_in = _int(raw.get("in"), "Linear 'in'", 1, MAX_FEATURES)
        size_out = _int(raw.get("out"), "Linear 'out'", 1, MAX_FEATURES)
        return {"type": kind, "in": size_in, "out": size_out, "bias": bias}
    if kind == "LayerNorm":
        eps = _float(raw.get("eps", 1e-5), "LayerNorm 'eps'", 0.0, 1.0, open_lo=True)
        return {"type": kind, "dim": _int(raw.get("dim"), "LayerNorm 'dim'", 1, MAX_FEATURES),
                "eps": eps}  # fmt: skip
    if kind == "Dropout":
        if _float(raw.get("p", 0), "Dropout 'p'", 0.0, 1.0) != 0.0:
            raise LocalProtocolError(
                "Dropout is allowed only with p=0: slices must be deterministic"
            )
        return {"type": kind, "p": 0.0}
    if kind == "Sequential":
        return {"type": kind, "layers": _normalize_list(raw.get("layers"), depth + 1, count)}
    return {"type": kind}


def _normalize_list(raw: object, depth: int, count: list[int]) -> list[dict[str, Any]]:
    if depth > MAX_DEPTH:
        raise LocalProtocolError(f"Sequential nests deeper than {MAX_DEPTH}")
    if not isinstance(raw, list) or not raw:
        raise LocalProtocolError("a layer list must be a non-empty JSON array")
    return [_normalize_layer(item, depth, count) for item in raw]


def _walk(layers: Sequence[Mapping[str, Any]], prefix: str) -> list[tuple[str, Mapping[str, Any]]]:
    """(torch module path, layer) for every leaf layer, in order."""
    out: list[tuple[str, Mapping[str, Any]]] = []
    for index, layer in enumerate(layers):
        path = f"{prefix}{index}"
        if layer["type"] == "Sequential":
            out.extend(_walk(layer["layers"], path + "."))
        else:
            out.append((path, layer))
    return out


@dataclass(frozen=True, eq=False)
class ModelSpec:
    """A model as data: a ``torch.nn.Sequential`` of allowlisted layers, never code."""

    layers: tuple[dict[str, Any], ...]

    @classmethod
    def parse(cls, raw: object) -> ModelSpec:
        """Validate and normalise a layer list (defaults filled in); LocalProtocolError."""
        spec = cls(tuple(_normalize_list(raw, 1, [0])))
        total = sum(math.prod(shape) for shape in spec.parameter_shapes().values())
        if total > MAX_PARAMETERS:
            raise LocalProtocolError(f"the model has {total} parameters, over {MAX_PARAMETERS}")
        if total == 0:  # the inner optimizer would refuse it on every node
            raise LocalProtocolError("the model has no parameters to train")
        return spec

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        try:
            return cls.parse(load_json(text, what="model"))
        except LocalProtocolError as exc:
            raise RemoteProtocolError(f"model: {exc}") from None

    def to_json(self) -> str:
        return dump_json(list(self.layers))

    def leaves(self) -> list[tuple[str, Mapping[str, Any]]]:
        return _walk(self.layers, "")

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """State-dict names and shapes, as ``torch.nn.Sequential`` names them ("0.weight")."""
        shapes: dict[str, tuple[int, ...]] = {}
        for path, layer in self.leaves():
            if layer["type"] == "Linear":
                shapes[f"{path}.weight"] = (layer["out"], layer["in"])
                if layer["bias"]:
                    shapes[f"{path}.bias"] = (layer["out"],)
            elif layer["type"] == "LayerNorm":
                shapes[f"{path}.weight"] = shapes[f"{path}.bias"] = (layer["dim"],)
        return shapes

    def output_shape(self, sample_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The per-sample output shape for per-sample input *sample_shape*, or why not."""
        shape = tuple(sample_shape)
        for path, layer in self.leaves():
            kind = layer["type"]
            if kind == "Flatten":
                shape = (math.prod(shape),)
            elif kind in ("Linear", "LayerNorm"):
                want = layer["in"] if kind == "Linear" else layer["dim"]
                if not shape or shape[-1] != want:
                    raise LocalProtocolError(
                        f"layer {path} ({kind}) expects last dimension {want}, "
                        f"gets shape {list(shape)}"
                    )
                if kind == "Linear":
                    shape = (*shape[:-1], layer["out"])
        return shape

    def init_weights(self, seed: int) -> Arrays:
        """Deterministic initial weights: torch's default bounds, drawn from numpy's PCG64.

        Linear weight and bias ~ U(-1/sqrt(in), 1/sqrt(in)) (what torch's default init
        amounts to); LayerNorm weight 1, bias 0. Drawn in parameter order, so the same
        spec and seed give the same bytes on every coordinator.
        """
        rng = np.random.Generator(np.random.PCG64(seed))
        weights: Arrays = {}
        for path, layer in self.leaves():
            if layer["type"] == "Linear":
                bound = 1.0 / math.sqrt(layer["in"])
                shape = (layer["out"], layer["in"])
                weights[f"{path}.weight"] = rng.uniform(-bound, bound, shape).astype(np.float32)
                if layer["bias"]:
                    weights[f"{path}.bias"] = rng.uniform(-bound, bound, shape[:1]).astype(
                        np.float32
                    )
            elif layer["type"] == "LayerNorm":
                weights[f"{path}.weight"] = np.ones(layer["dim"], dtype=np.float32)
                weights[f"{path}.bias"] = np.zeros(layer["dim"], dtype=np.float32)
        return weights


# --- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InnerOptimizer:
    """The optimizer each slice runs for K steps (AdamW by default, as in DiLoCo)."""

    name: str = "adamw"  # adamw | sgd
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    momentum: float = 0.0  # sgd only

    def __post_init__(self) -> None:
        if self.name not in ("adamw", "sgd"):
            raise LocalProtocolError(f"inner optimizer must be 'adamw' or 'sgd', got {self.name!r}")
        _float(self.lr, "inner lr", 0.0, 10.0, open_lo=True)
        for beta in self.betas:
            _float(beta, "inner betas", 0.0, 0.999999)
        _float(self.eps, "inner eps", 0.0, 1.0, open_lo=True)
        _float(self.weight_decay, "inner weight_decay", 0.0, 1.0)
        _float(self.momentum, "inner momentum", 0.0, 0.999999)


@dataclass(frozen=True, slots=True)
class OuterOptimizer:
    """The coordinator's step on the averaged pseudo-gradient: SGD with Nesterov momentum."""

    lr: float = 0.7
    momentum: float = 0.9
    nesterov: bool = True

    def __post_init__(self) -> None:
        _float(self.lr, "outer lr", 0.0, 10.0, open_lo=True)
        _float(self.momentum, "outer momentum", 0.0, 0.999999)


@dataclass(frozen=True, slots=True)
class TrainingConfig:
    """Everything about a training job except the model and the data."""

    rounds: int = 1
    inner_steps: int = 100
    batch_size: int = 32
    seed: int = 0  # slice seeds derive from it (slice_seed)
    data_seed: int = 0  # shuffles the data before sharding
    init_seed: int = 0  # initial weights, when the job sends none
    round_deadline_s: float = 600.0
    grad_dtype: str = "F32"
    clip_ratio: float = 2.0
    reject_ratio: float = 10.0
    max_norm: float = 1e6
    inner: InnerOptimizer = field(default_factory=InnerOptimizer)
    outer: OuterOptimizer = field(default_factory=OuterOptimizer)

    def __post_init__(self) -> None:
        _int(self.rounds, "rounds", 1, 10_000)
        _int(self.inner_steps, "inner_steps", 1, 1_000_000)
        _int(self.batch_size, "batch_size", 1, 1_000_000)
        for name in ("seed", "data_seed", "init_seed"):
            _int(getattr(self, name), name, 0, MAX_SEED)
        _float(self.round_deadline_s, "round_deadline_s", 0.0, 7 * 86400.0, open_lo=True)
        if self.grad_dtype not in GRAD_DTYPES:
            raise LocalProtocolError(f"grad_dtype must be one of {sorted(GRAD_DTYPES)}")
        _float(self.clip_ratio, "clip_ratio", 1.0, 1e6)
        _float(self.reject_ratio, "reject_ratio", 1.0, 1e12, open_lo=True)
        _float(self.max_norm, "max_norm", 0.0, 1e30, open_lo=True)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: object) -> TrainingConfig:
        """Build from JSON values; unknown keys and wrong types raise LocalProtocolError."""
        config: TrainingConfig = _from_dict(cls, raw, "config")
        return config


_NESTED: dict[str, Any] = {}  # annotation text -> dataclass, filled below


def _from_dict(cls: Any, raw: object, what: str) -> Any:
    """A config dataclass from JSON values, by each field's annotation; LocalProtocolError."""
    if not isinstance(raw, dict):
        raise LocalProtocolError(f"{what} must be a JSON object")
    fields = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise LocalProtocolError(f"{what} has unknown keys {unknown}")
    args: dict[str, Any] = {}
    for name, value in raw.items():
        kind, where = fields[name], f"{what}.{name}"
        if kind in _NESTED:
            args[name] = _from_dict(_NESTED[kind], value, where)
        elif kind == "float":
            args[name] = _float(value, where, -math.inf, math.inf)
        elif kind.startswith("tuple["):
            if not isinstance(value, list | tuple) or len(value) != kind.count(",") + 1:
                raise LocalProtocolError(
                    f"{where} must be an array of {kind.count(',') + 1} numbers"
                )
            args[name] = tuple(_float(v, where, -math.inf, math.inf) for v in value)
        elif type(value).__name__ != kind:  # int, str, bool: exact JSON types (true is no 1)
            raise LocalProtocolError(f"{where} must be a {kind}")
        else:
            args[name] = value
    missing = sorted(
        f.name for f in dataclasses.fields(cls)
        if f.name not in args
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    )  # fmt: skip
    if missing:
        raise LocalProtocolError(f"{what} lacks {missing}")
    return cls(**args)


_NESTED.update({"InnerOptimizer": InnerOptimizer, "OuterOptimizer": OuterOptimizer})


def slice_seed(seed: int, round_index: int, slice_index: int) -> int:
    """A slice's training seed: independent per (job seed, round, slice), stable everywhere."""
    digest = hashlib.sha256(f"{seed}:{round_index}:{slice_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


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


# --- the job request (POST /v1/jobs) ---------------------------------------------------------


@dataclass(frozen=True, eq=False)
class JobRequest:
    """A whole training job: model, config, dataset, and optionally initial weights."""

    model: ModelSpec
    config: TrainingConfig
    x: npt.NDArray[Any]
    y: npt.NDArray[Any]
    weights: bytes | None = None  # a weights container; None: model.init_weights(init_seed)

    def encode(self) -> bytes:
        tensors: Arrays = {"x": np.asarray(self.x, np.float32), "y": np.asarray(self.y, np.int64)}
        if self.weights is not None:
            tensors["weights"] = np.frombuffer(self.weights, dtype=np.uint8)
        metadata = {"class": CLASS, "kind": "job", "model": self.model.to_json(),
                    "config": dump_json(self.config.to_dict())}  # fmt: skip
        return encode_tensors(tensors, metadata=metadata)

    @classmethod
    def decode(cls, data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> JobRequest:
        tensors, metadata = decode_tensors(data, max_bytes=max_bytes)
        _meta(metadata, "job", frozenset({"model", "config"}))
        model = ModelSpec.from_json(metadata["model"])
        try:
            config = TrainingConfig.from_dict(load_json(metadata["config"], what="config"))
        except LocalProtocolError as exc:
            raise _remote(exc, "config") from None
        unknown = sorted(set(tensors) - {"x", "y", "weights"})
        if unknown or "x" not in tensors or "y" not in tensors:
            raise RemoteProtocolError(
                f"a job holds tensors x, y and optionally weights, got {sorted(tensors)}"
            )
        check_dataset(model, tensors["x"], tensors["y"], "dataset")
        weights = None
        if "weights" in tensors:
            weights = _bytes_tensor(tensors, "weights")
            decode_weights(weights, model, max_bytes=max_bytes)
        return cls(model, config, tensors["x"], tensors["y"], weights)

    def initial_weights(self) -> bytes:
        if self.weights is not None:
            return self.weights
        return weights_container(self.model.init_weights(self.config.init_seed))

    def shards(self, slices: int) -> list[bytes]:
        """Deterministic shards: shuffle by data_seed, then split into near-equal parts."""
        if not 1 <= slices <= len(self.y):
            raise RemoteProtocolError(
                f"slices must be in [1, {len(self.y)}] (one sample each at least)"
            )
        order = np.random.Generator(np.random.PCG64(self.config.data_seed)).permutation(len(self.y))
        return [
            shard_container(self.x[part], self.y[part]) for part in np.array_split(order, slices)
        ]

    def round_zero(self, slices: int) -> list[bytes]:
        """The task payloads of round 0, one per slice, each with the initial weights
        (refused, before any is built, as :meth:`checked_shards` says)."""
        shards = self.checked_shards(slices)
        weights = self.initial_weights()
        return [
            SliceRequest(self.model, weights, shard, plan_for(self.config, 0, index)).encode()
            for index, shard in enumerate(shards)
        ]

    def round_zero_stored(self, slices: int) -> tuple[bytes, list[bytes]]:
        """Round 0 as the coordinator stores it: the initial weights once, and one
        :class:`SliceStub` per slice, which :func:`expand_stub` makes the payload that
        :meth:`round_zero` would give (the same checks)."""
        shards = self.checked_shards(slices)
        weights = self.initial_weights()
        digest = sha256_hex(weights)
        return weights, [
            SliceStub(self.model, digest, shard, plan_for(self.config, 0, index)).encode()
            for index, shard in enumerate(shards)
        ]

    def checked_shards(self, slices: int) -> list[bytes]:
        """:meth:`shards`, refused when a slice's payload would be over MAX_SLICE_BYTES,
        headers included, or a round's over MAX_SPLIT_BYTES together, or when the job's
        rounds times slices is over MAX_SLICE_ROUNDS."""
        if slices * self.config.rounds > MAX_SLICE_ROUNDS:
            raise RemoteProtocolError(
                f"{self.config.rounds} rounds of {slices} slices make "
                f"{slices * self.config.rounds} slice-rounds, over {MAX_SLICE_ROUNDS}: the "
                "result keeps metrics for each; use fewer rounds or fewer slices"
            )
        shards = self.shards(slices)
        weight_bytes = 4 * sum(math.prod(s) for s in self.model.parameter_shapes().values())
        largest = weight_bytes + max(map(len, shards))
        if largest > MAX_SLICE_BYTES - SLICE_HEADER_ROOM:
            raise RemoteProtocolError(
                f"a slice would carry {largest} bytes (the model's {weight_bytes} bytes of "
                f"weights and its shard), over {MAX_SLICE_BYTES - SLICE_HEADER_ROOM} "
                f"({MAX_SLICE_BYTES} less room for headers): every slice carries the whole "
                "model, and its result as many bytes again; use a smaller model or more slices"
            )
        total = slices * weight_bytes + sum(map(len, shards))
        if total > MAX_SPLIT_BYTES:
            raise RemoteProtocolError(
                f"{slices} slices would carry {total} bytes per round together, over "
                f"{MAX_SPLIT_BYTES}: every slice carries the whole model's "
                f"{weight_bytes} bytes of weights; use fewer slices or a smaller model"
            )
        return shards


# --- one slice of one round (the task payload) -----------------------------------------------


@dataclass(frozen=True, slots=True)
class SlicePlan:
    """What one slice runs: K steps of the inner optimizer from a given seed."""

    round: int
    slice: int
    steps: int
    batch_size: int
    seed: int
    grad_dtype: str = "F32"
    inner: InnerOptimizer = field(default_factory=InnerOptimizer)

    def __post_init__(self) -> None:
        _int(self.round, "round", 0, 10_000)
        _int(self.slice, "slice", 0, 1 << 20)
        _int(self.steps, "steps", 1, 1_000_000)
        _int(self.batch_size, "batch_size", 1, 1_000_000)
        _int(self.seed, "seed", 0, MAX_SEED)
        if self.grad_dtype not in GRAD_DTYPES:
            raise LocalProtocolError(f"grad_dtype must be one of {sorted(GRAD_DTYPES)}")


def plan_for(config: TrainingConfig, round_index: int, slice_index: int) -> SlicePlan:
    return SlicePlan(
        round=round_index, slice=slice_index, steps=config.inner_steps,
        batch_size=config.batch_size, seed=slice_seed(config.seed, round_index, slice_index),
        grad_dtype=config.grad_dtype, inner=config.inner,
    )  # fmt: skip


_SLICE_KEYS: Final = frozenset({"model", "weights_sha256", "shard_sha256", "plan"})


@dataclass(frozen=True, eq=False)
class SliceRequest:
    """Start weights and one shard, both as containers named by their SHA-256, plus the plan."""

    model: ModelSpec
    weights: bytes
    shard: bytes
    plan: SlicePlan

    @property
    def weights_sha256(self) -> str:
        return sha256_hex(self.weights)

    @property
    def shard_sha256(self) -> str:
        return sha256_hex(self.shard)

    def encode(self) -> bytes:
        return _encode_slice(
            self.weights, self.shard, _slice_metadata(
                self.model, self.weights_sha256, self.shard_sha256, self.plan, kind="slice"
            ),
        )  # fmt: skip

    @classmethod
    def decode(cls, data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> SliceRequest:
        """Parse a slice payload and verify both hashes (the node trusts nothing unhashed)."""
        tensors, metadata = decode_tensors(data, max_bytes=max_bytes)
        _meta(metadata, "slice", _SLICE_KEYS)
        if set(tensors) != {"weights", "shard"}:
            raise RemoteProtocolError(
                f"a slice holds tensors weights and shard, got {sorted(tensors)}"
            )
        model = ModelSpec.from_json(metadata["model"])
        try:
            plan = _from_dict(SlicePlan, load_json(metadata["plan"], what="plan"), "plan")
        except LocalProtocolError as exc:
            raise _remote(exc, "plan") from None
        request = cls(
            model, _bytes_tensor(tensors, "weights"), _bytes_tensor(tensors, "shard"), plan
        )
        for what in ("weights", "shard"):
            actual, claimed = getattr(request, f"{what}_sha256"), metadata[f"{what}_sha256"]
            if actual != claimed:
                raise RemoteProtocolError(f"{what} has sha256 {actual}, the payload says {claimed}")
        return request


def _slice_metadata(
    model: ModelSpec, weights_sha256: str, shard_sha256: str, plan: SlicePlan, *, kind: str
) -> dict[str, str]:
    return {
        "class": CLASS, "kind": kind, "model": model.to_json(),
        "weights_sha256": weights_sha256, "shard_sha256": shard_sha256,
        "plan": dump_json(dataclasses.asdict(plan)),
    }  # fmt: skip


def _encode_slice(weights: bytes, shard: bytes, metadata: Mapping[str, str]) -> bytes:
    tensors = {"weights": np.frombuffer(weights, np.uint8), "shard": np.frombuffer(shard, np.uint8)}
    return encode_tensors(tensors, metadata=metadata)


@dataclass(frozen=True, eq=False)
class SliceStub:
    """A slice as the coordinator stores it: a :class:`SliceRequest` without its weights.

    Every slice of a round starts from the same weights (up to MAX_SLICE_BYTES), so the
    coordinator stores them once a round, not once a slice (a request of a few KiB may
    name a model of tens of MiB, initialised from a seed), and puts them into each task's
    payload only when it seals the task for a node (:func:`expand_stub`). Never sent: a
    node receives the whole :class:`SliceRequest`.
    """

    model: ModelSpec
    weights_sha256: str
    shard: bytes
    plan: SlicePlan

    def encode(self) -> bytes:
        metadata = _slice_metadata(
            self.model, self.weights_sha256, sha256_hex(self.shard), self.plan, kind="slice-stub"
        )
        return encode_tensors({"shard": np.frombuffer(self.shard, np.uint8)}, metadata=metadata)


def is_stub(payload: bytes) -> bool:
    """Whether a stored task payload is a :class:`SliceStub` (header only)."""
    return read_metadata(payload, max_bytes=len(payload)).get("kind") == "slice-stub"


def _decode_stub(stub: bytes) -> tuple[dict[str, str], bytes]:
    """(metadata, shard) of a stored :class:`SliceStub`; RemoteProtocolError unless it is
    one."""
    tensors, metadata = decode_tensors(stub, max_bytes=len(stub))
    _meta(metadata, "slice-stub", _SLICE_KEYS)
    if set(tensors) != {"shard"}:
        raise RemoteProtocolError(f"a stored slice holds tensor shard, got {sorted(tensors)}")
    return metadata, _bytes_tensor(tensors, "shard")


def stored_slice(payload: bytes) -> tuple[str, str, bytes]:
    """(weights_sha256, shard_sha256, shard) of a stored slice: a :class:`SliceStub`, or a
    whole :class:`SliceRequest` (as stored before stubs; its hashes are checked)."""
    if not is_stub(payload):
        request = SliceRequest.decode(payload, max_bytes=len(payload))
        return request.weights_sha256, request.shard_sha256, request.shard
    metadata, shard = _decode_stub(payload)
    return metadata["weights_sha256"], metadata["shard_sha256"], shard


def expand_stub(stub: bytes, weights: bytes, weights_sha256: str) -> bytes:
    """The task payload for a stored :class:`SliceStub`: byte for byte the
    :class:`SliceRequest` with *weights*, whose SHA-256 the caller vouches for (the
    coordinator's own record of the round's weights; they are not hashed again per task).
    Raises RemoteProtocolError when the stub names other weights."""
    metadata, shard = _decode_stub(stub)
    if metadata["weights_sha256"] != weights_sha256:
        raise RemoteProtocolError(
            f"the slice starts from weights {metadata['weights_sha256']}, "
            f"the round's are {weights_sha256}"
        )
    return _encode_slice(weights, shard, {**metadata, "kind": "slice"})


# --- a slice's result ------------------------------------------------------------------------


def _loss_text(value: float) -> str:
    return repr(float(value))  # shortest round-trip form: deterministic bytes


_MAX_LOSS: Final = float(np.finfo(np.float32).max)  # what a float32 loss can be


def _parse_loss(text: str, what: str) -> float:
    if text not in ("nan", "inf", "-inf"):
        try:
            json.loads(text)
        except (ValueError, RecursionError):
            raise RemoteProtocolError(f"{what} {text[:40]!r} is not a number") from None
    try:
        loss = float(text)
    except ValueError:
        raise RemoteProtocolError(f"{what} {text[:40]!r} is not a number") from None
    if math.isfinite(loss) and abs(loss) > _MAX_LOSS:  # two such would average to inf
        raise RemoteProtocolError(f"{what} {text[:40]!r} is beyond a float32 loss")
    return loss


@dataclass(frozen=True, eq=False)
class PseudoGradient:
    """start weights - end weights, per parameter, plus what it was computed from."""

    deltas: Arrays
    base_sha256: str
    shard_sha256: str
    steps: int
    first_loss: float
    last_loss: float

    def encode(self) -> bytes:
        metadata = {
            "class": CLASS, "kind": "pseudo_gradient", "base_sha256": self.base_sha256,
            "shard_sha256": self.shard_sha256, "steps": str(self.steps),
            "first_loss": _loss_text(self.first_loss), "last_loss": _loss_text(self.last_loss),
        }  # fmt: skip
        return encode_tensors(self.deltas, metadata=metadata)

    @classmethod
    def decode(
        cls, data: bytes, *, shapes: Mapping[str, tuple[int, ...]], grad_dtype: str,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> PseudoGradient:  # fmt: skip
        """Structure only (names, shapes, dtype, metadata); values are judged per round."""
        tensors, metadata = decode_tensors(data, max_bytes=max_bytes)
        keys = frozenset({"base_sha256", "shard_sha256", "steps", "first_loss", "last_loss"})
        _meta(metadata, "pseudo_gradient", keys)
        check_parameters(tensors, shapes, dtypes=(grad_dtype,), what="pseudo-gradient")
        # The hashes end up in reasons stored in SQL: anything but a hexdigest (a lone
        # surrogate, a NUL) is refused here, and quoted with ascii() so the reason is too.
        for key in ("base_sha256", "shard_sha256"):
            if SHA256_HEX.fullmatch(metadata[key]) is None:
                raise RemoteProtocolError(
                    f"{key} {metadata[key][:80]!a} is not 64 lowercase hex digits"
                )
        steps = metadata["steps"]
        if not steps.isascii() or not steps.isdigit() or len(steps) > 9:
            raise RemoteProtocolError(f"steps {steps[:20]!r} is not a count")
        return cls(
            deltas=tensors, base_sha256=metadata["base_sha256"],
            shard_sha256=metadata["shard_sha256"], steps=int(steps),
            first_loss=_parse_loss(metadata["first_loss"], "first_loss"),
            last_loss=_parse_loss(metadata["last_loss"], "last_loss"),
        )  # fmt: skip


def check_pseudo_gradient(
    pg: PseudoGradient, *, base_sha256: str, shard_sha256: str, steps: int
) -> tuple[Arrays, float]:
    """The checks a pseudo-gradient passes on its own, in the documented order (docs,
    "Rounds, checks and aggregation", 3-6): computed from *base_sha256* on *shard_sha256*
    for *steps* steps, finite losses and values, not all zeros. Returns its values as F32
    and its L2 norm (float64); RemoteProtocolError names the first failure.

    The verifier runs it when a result arrives (:func:`check_slice`), and the round's
    close again, beside the checks that need the whole round.
    """
    _check_identity(pg, base_sha256=base_sha256, shard_sha256=shard_sha256, steps=steps)
    if not (math.isfinite(pg.first_loss) and math.isfinite(pg.last_loss)):
        raise RemoteProtocolError(f"loss is not finite ({pg.first_loss}, {pg.last_loss})")
    deltas = {name: np.asarray(a, dtype=np.float32) for name, a in pg.deltas.items()}
    for name, array in deltas.items():
        if not np.isfinite(array).all():
            raise RemoteProtocolError(f"pseudo-gradient {name!r} holds NaN or infinity")
    norm = math.sqrt(sum(float(np.square(a, dtype=np.float64).sum()) for a in deltas.values()))
    if norm == 0.0:
        raise RemoteProtocolError(_ALL_ZEROS)
    return deltas, norm


_ALL_ZEROS: Final = "pseudo-gradient is all zeros: no training was done"


def _check_identity(pg: PseudoGradient, *, base_sha256: str, shard_sha256: str,
                    steps: int) -> None:  # fmt: skip
    """What the slice was computed from: its weights, its shard, its step count."""
    if pg.base_sha256 != base_sha256:  # node-supplied strings are quoted with ascii()
        raise RemoteProtocolError(
            f"computed from weights {pg.base_sha256!a}, but the slice's are {base_sha256}"
        )
    if pg.shard_sha256 != shard_sha256:
        raise RemoteProtocolError(
            f"computed on shard {pg.shard_sha256!a}, but the slice's is {shard_sha256}"
        )
    if pg.steps != steps:
        raise RemoteProtocolError(f"ran {pg.steps} steps, the slice asks for {steps}")


# --- the job's result ------------------------------------------------------------------------


def encode_final(
    model: ModelSpec, weights: Mapping[str, npt.NDArray[Any]], metrics: list[Any]
) -> bytes:
    """Final global weights (F32) with the per-round metrics as JSON metadata."""
    metadata = {"class": CLASS, "kind": "weights", "model": model.to_json(),
                "weights_sha256": sha256_hex(weights_container(weights)),
                "rounds": str(len(metrics)), "metrics": dump_json(metrics)}  # fmt: skip
    return encode_tensors(
        {k: np.asarray(v, np.float32) for k, v in weights.items()}, metadata=metadata
    )


def decode_final(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[Arrays, list[Any]]:
    """(final weights, per-round metrics) of a finished job.

    The header holds every round's metrics, so it is bounded by *max_bytes* alone rather
    than by the default header limit (MAX_SLICE_ROUNDS keeps it to tens of MiB).
    """
    tensors, metadata = decode_tensors(data, max_bytes=max_bytes, max_header_bytes=max_bytes)
    _meta(metadata, "weights", frozenset({"model", "weights_sha256", "rounds", "metrics"}))
    model = ModelSpec.from_json(metadata["model"])
    check_parameters(tensors, model.parameter_shapes(), dtypes=("F32",), what="weights")
    if sha256_hex(weights_container(tensors)) != metadata["weights_sha256"]:
        raise RemoteProtocolError("final weights do not match their weights_sha256")
    metrics = load_json(metadata["metrics"], what="metrics", max_chars=max_bytes)
    if not isinstance(metrics, list):
        raise RemoteProtocolError("metrics must be a JSON array")
    return tensors, metrics


# --- the coordinator's class hooks (coordinator/classes.py) ----------------------------------


def job_meta(payload: bytes, max_bytes: int) -> dict[str, Any]:
    """Validate a job request; what the coordinator keeps with the job (model and config)."""
    request = JobRequest.decode(payload, max_bytes=max_bytes)
    return {"model": request.model.to_json(), "config": request.config.to_dict()}


def split(payload: bytes, slices: int) -> list[bytes]:
    """Round 0's task payloads: the initial weights and one shard per slice."""
    return JobRequest.decode(payload).round_zero(slices)


def split_shared(payload: bytes, slices: int) -> tuple[bytes, list[bytes]]:
    """Round 0 as the coordinator stores it: the initial weights, which every slice of the
    round shares, and one :class:`SliceStub` per slice (:meth:`JobRequest.round_zero_stored`)."""
    return JobRequest.decode(payload).round_zero_stored(slices)


def expand(stored: bytes, weights: bytes, weights_sha256: str) -> bytes:
    """The payload a node receives for a stored slice: a :class:`SliceStub` gets the
    round's *weights* (:func:`expand_stub`); a whole :class:`SliceRequest`, as stored
    before stubs, is sent as it is."""
    return expand_stub(stored, weights, weights_sha256) if is_stub(stored) else stored


def check_result(result: bytes, meta: Mapping[str, Any], max_bytes: int) -> None:
    """A result well-formed for the job's model and grad_dtype (its values: check_slice)."""
    model = ModelSpec.from_json(meta["model"])
    grad_dtype = TrainingConfig.from_dict(meta["config"]).grad_dtype
    PseudoGradient.decode(
        result, shapes=model.parameter_shapes(), grad_dtype=grad_dtype, max_bytes=max_bytes
    )


def check_slice(result: bytes, payload: bytes, max_bytes: int) -> None:
    """A result that answers its own task *payload*: computed from the slice's weights, on
    its shard, for its steps, with finite losses and values, and not all zeros
    (:func:`check_pseudo_gradient`, all of it).

    Run when the result arrives, so that a forgery is refused there and its task stays
    open for another node; were it accepted, its node would hold an accepted result for
    no work (NaN or all zeros cost nothing to send), and the slice would only be dropped
    when the round closes. A training that truly diverged is refused the same way: its
    slice is tried on other nodes until it has failed on enough of them or the round's
    deadline passes, and the round then completes without it. Only the payload's header is
    read: it is our own stored payload, whose hashes were computed when it was built, so
    the weights and shard are not hashed again.
    """
    asked = read_metadata(payload, max_bytes=len(payload))
    _meta(asked, "slice-stub" if asked.get("kind") == "slice-stub" else "slice", _SLICE_KEYS)
    model = ModelSpec.from_json(asked["model"])
    try:
        plan: SlicePlan = _from_dict(SlicePlan, load_json(asked["plan"], what="plan"), "plan")
    except LocalProtocolError as exc:
        raise _remote(exc, "plan") from None
    pg = PseudoGradient.decode(
        result, shapes=model.parameter_shapes(), grad_dtype=plan.grad_dtype, max_bytes=max_bytes
    )
    check_pseudo_gradient(
        pg, base_sha256=asked["weights_sha256"], shard_sha256=asked["shard_sha256"],
        steps=plan.steps,
    )  # fmt: skip


def assemble(_results: Sequence[bytes], _meta: Mapping[str, Any]) -> bytes:
    """Never the way a training job ends: rounds are closed by coordinator/rounds.py."""
    raise RemoteProtocolError(f"{CLASS} results are aggregated per round, not assembled")
