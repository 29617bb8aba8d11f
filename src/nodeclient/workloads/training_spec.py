"""What an ``ai.training`` job asks for, as data: the model spec and the configuration.

2.3.5 Work Execution: nothing a requester sends is executed as code. The model is a
declarative list of layers from an allowlist (:class:`ModelSpec`): its parameter names and
shapes are computed exactly as ``torch.nn.Sequential`` names them, and its initial weights
are drawn deterministically. The rest of a job is a :class:`TrainingConfig` (rounds, the
inner and outer optimizers, the checks each round applies). Both are parsed from strict
JSON (:func:`load_json`), and every fault names the field.

The containers that carry them are in :mod:`nodeclient.workloads.training` and the
``training_*`` modules beside it.
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

CLASS: Final = "ai.training"
MAX_LAYERS: Final = 256
MAX_DEPTH: Final = 4
MAX_FEATURES: Final = 1 << 20
MAX_PARAMETERS: Final = 1 << 26
MAX_JSON_CHARS: Final = 64 * 1024
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
