"""The results of ``ai.training``: a slice's pseudo-gradient, and the job's final weights.

A slice returns its start weights minus its end weights after K inner steps
(:class:`PseudoGradient`); :func:`check_pseudo_gradient` holds the checks one passes on its
own, before :mod:`nodeclient.coordinator.rounds` checks a round's together, averages them
and applies them with the outer optimizer. A finished job's result is the final weights
with every round's metrics (:func:`encode_final` / :func:`decode_final`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from nodeclient.errors import RemoteProtocolError
from nodeclient.protocol.blobs import SHA256_HEX
from nodeclient.workloads.tensors import DEFAULT_MAX_BYTES, decode_tensors, encode_tensors
from nodeclient.workloads.training_containers import _meta, check_parameters, weights_container
from nodeclient.workloads.training_spec import (
    CLASS,
    Arrays,
    ModelSpec,
    dump_json,
    load_json,
    sha256_hex,
)

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

    The verifier runs it when a result arrives
    (:func:`~nodeclient.workloads.training.check_slice`), and the round's
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
