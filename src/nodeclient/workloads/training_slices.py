"""One slice of one ``ai.training`` round: the task payload, and the stub it is stored as.

2.3.5 Work Execution: "a parallelizable sub-task runs its slice". A slice is a
:class:`SlicePlan` (K steps of the inner optimizer from a seed) with the round's start
weights and one data shard, both named by their SHA-256: :class:`SliceRequest`, what a node
receives. The coordinator stores each slice as a :class:`SliceStub`, without the weights
that every slice of a round shares, and expands it into that payload, byte for byte, when
it seals the task for a node (:func:`expand_stub`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

import numpy as np

from nodeclient.errors import LocalProtocolError, RemoteProtocolError
from nodeclient.workloads.tensors import (
    DEFAULT_MAX_BYTES,
    decode_tensors,
    encode_tensors,
    read_metadata,
)
from nodeclient.workloads.training_containers import _bytes_tensor, _meta, _remote
from nodeclient.workloads.training_spec import (
    CLASS,
    GRAD_DTYPES,
    MAX_SEED,
    InnerOptimizer,
    ModelSpec,
    TrainingConfig,
    _from_dict,
    _int,
    dump_json,
    load_json,
    sha256_hex,
    slice_seed,
)

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
