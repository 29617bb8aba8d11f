"""The ``ai.training`` workload: data-parallel local SGD (DiLoCo), formats shared by both sides.

2.3.5 Work Execution: "a parallelizable sub-task runs its slice". A training job is R
rounds; in each round every slice trains a copy of the global weights for K inner steps on
its own data shard and returns a *pseudo-gradient* (start weights minus end weights); the
coordinator checks, averages and applies them with an outer optimizer
(:mod:`nodeclient.coordinator.rounds`). Nothing a requester sends is executed as code: the
model is a declarative list of layers from an allowlist, weights and data are plain arrays
in the tensor container of :mod:`nodeclient.workloads.tensors`, all identified by SHA-256.

The workload is numpy-only, so the coordinator never needs PyTorch: it parses and checks
model specs, computes parameter names and shapes exactly as ``torch.nn.Sequential`` names
them, initialises weights deterministically (:mod:`nodeclient.workloads.training_spec`),
shards data (the containers inside containers: :mod:`nodeclient.workloads.training_containers`),
and encodes and decodes:

* the job request (``POST /v1/jobs``), :class:`JobRequest` (this module, with the size
  limits a job is refused by and the coordinator's class hooks);
* one slice of one round (the task payload), :class:`SliceRequest`
  (:mod:`nodeclient.workloads.training_slices`);
* one slice's result, :class:`PseudoGradient`, and the job's result, :func:`encode_final` /
  :func:`decode_final` (:mod:`nodeclient.workloads.training_results`).

Byte formats are listed in docs/protocol.md ("Training"); every fault in received bytes raises
RemoteProtocolError naming the field, and unknown keys are refused so that a later revision
cannot be half-understood.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from nodeclient.errors import LocalProtocolError, RemoteProtocolError
from nodeclient.workloads.tensors import (
    DEFAULT_MAX_BYTES,
    decode_tensors,
    encode_tensors,
    read_metadata,
)

# The class's public names, wherever they are defined: callers import the workload
# as one module (`from nodeclient.workloads import training as tr`).
from nodeclient.workloads.training_containers import (
    _bytes_tensor,
    _meta,
    _remote,
    check_dataset,
    decode_shard,
    decode_weights,
    shard_container,
    weights_container,
)
from nodeclient.workloads.training_results import (
    PseudoGradient,
    check_pseudo_gradient,
    decode_final,
    encode_final,
)
from nodeclient.workloads.training_slices import (
    _SLICE_KEYS,
    SlicePlan,
    SliceRequest,
    SliceStub,
    expand_stub,
    is_stub,
    plan_for,
    stored_slice,
)
from nodeclient.workloads.training_spec import (
    CLASS,
    Arrays,
    InnerOptimizer,
    ModelSpec,
    OuterOptimizer,
    TrainingConfig,
    _from_dict,
    dump_json,
    load_json,
    sha256_hex,
)

__all__ = [
    "CLASS",
    "MAX_REASON_CHARS",
    "MAX_SLICE_BYTES",
    "MAX_SLICE_ROUNDS",
    "MAX_SPLIT_BYTES",
    "MAX_STORED_BYTES",
    "SLICE_HEADER_ROOM",
    "InnerOptimizer",
    "JobRequest",
    "ModelSpec",
    "OuterOptimizer",
    "PseudoGradient",
    "SlicePlan",
    "SliceRequest",
    "SliceStub",
    "TrainingConfig",
    "assemble",
    "check_pseudo_gradient",
    "check_result",
    "check_slice",
    "decode_final",
    "decode_shard",
    "decode_weights",
    "dump_json",
    "encode_final",
    "expand",
    "job_meta",
    "lease_seconds",
    "plan_for",
    "sha256_hex",
    "split",
    "split_shared",
    "stored_slice",
    "weights_container",
]

# Every slice of every round carries the whole model's weights (F32) and its shard: one
# slice's payload is bounded by what a task payload may be (the coordinator's default
# max_payload_bytes), all of a round's together by what the coordinator holds at once.
MAX_SLICE_BYTES: Final = 32 * 1024 * 1024
# What a slice's containers add to its weights and shard (the model's JSON, at most 64 KiB,
# the plan, a tensor entry per parameter), and its result's to the weights it sends back:
# held back from MAX_SLICE_BYTES, so that neither is refused at a task payload's limit.
SLICE_HEADER_ROOM: Final = 256 * 1024
MAX_SPLIT_BYTES: Final = 1 << 30
# Rounds x slices of one job, each a task: the final result carries a metrics entry per
# slice and round (a few hundred bytes at most) in its header, and the job's JSON (GET
# /v1/jobs/{id}, what `verify` checks) a task entry of about 1.4 KB with its signed typed
# data (4 KB with the longest reason), so this keeps that JSON within 40 MB, under what a
# requester's client reads (64 MiB).
MAX_SLICE_ROUNDS: Final = 10_000
# Every round's pseudo-gradients stay with the job (a stranger verifies each task from its
# bytes, and replays every round: coordinator/audit.py), so a job's whole life is bounded:
# rounds x slices x the bytes of one update.
MAX_STORED_BYTES: Final = 32 << 30
MAX_REASON_CHARS: Final = 300  # a dropped slice's reason, as kept in the round's metrics


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
        rounds times slices is over MAX_SLICE_ROUNDS, or the results it would keep over
        MAX_STORED_BYTES."""
        if slices * self.config.rounds > MAX_SLICE_ROUNDS:
            raise RemoteProtocolError(
                f"{self.config.rounds} rounds of {slices} slices make "
                f"{slices * self.config.rounds} slice-rounds, over {MAX_SLICE_ROUNDS}: the "
                "result keeps metrics for each; use fewer rounds or fewer slices"
            )
        count = sum(math.prod(s) for s in self.model.parameter_shapes().values())
        shards = self.shards(slices)
        weight_bytes = 4 * count
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
        kept = slices * self.config.rounds * count * (2 if self.config.grad_dtype == "F16" else 4)
        if kept > MAX_STORED_BYTES:
            raise RemoteProtocolError(
                f"{self.config.rounds} rounds of {slices} slices would keep {kept} bytes of "
                f"pseudo-gradients, over {MAX_STORED_BYTES}: every round's results are kept "
                "so that each task can be verified and every round replayed; use fewer "
                "rounds or slices, a smaller model, or grad_dtype F16"
            )
        return shards


# --- the coordinator's class hooks (coordinator/classes.py) ----------------------------------


def job_meta(payload: bytes, max_bytes: int) -> dict[str, Any]:
    """Validate a job request; what the coordinator keeps with the job (model and config)."""
    request = JobRequest.decode(payload, max_bytes=max_bytes)
    return {"model": request.model.to_json(), "config": request.config.to_dict()}


def lease_seconds(meta: Mapping[str, Any]) -> float:
    """How long a slice may run: until its round's deadline, when the round goes on
    without it (coordinator/rounds.py)."""
    return float(meta["config"]["round_deadline_s"])


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


def check_slice(
    result: bytes, payload: bytes, max_bytes: int, *, max_norm: float = math.inf
) -> None:
    """A result that answers its own task *payload*: computed from the slice's weights, on
    its shard, for its steps, with finite losses and values, and not all zeros
    (:func:`check_pseudo_gradient`, all of it), with a norm of at most *max_norm* (the
    job's ``max_norm``: the round's close would drop it, too late for another node to run
    the slice, and its node would hold an accepted result for a forgery).

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
    _, norm = check_pseudo_gradient(
        pg, base_sha256=asked["weights_sha256"], shard_sha256=asked["shard_sha256"],
        steps=plan.steps,
    )  # fmt: skip
    if norm > max_norm:
        raise RemoteProtocolError(norm_over_max(norm, max_norm))


def norm_over_max(norm: float, max_norm: float) -> str:
    """The reason a pseudo-gradient over the job's ``max_norm`` is refused (on arrival and
    at the round's close alike)."""
    return f"norm {norm:.6g} exceeds max_norm {max_norm:.6g}"


def job_max_norm(meta: Mapping[str, Any]) -> float:
    """The ``max_norm`` of a job, from the metadata its validation stored."""
    return TrainingConfig.from_dict(meta["config"]).max_norm


def assemble(_results: Sequence[bytes], _meta: Mapping[str, Any]) -> bytes:
    """Never the way a training job ends: rounds are closed by coordinator/rounds.py."""
    raise RemoteProtocolError(f"{CLASS} results are aggregated per round, not assembled")
