"""Workload classes the coordinator accepts: validate, split into tasks, check, assemble.

2.3.5 Work Execution: "An AI inference request runs whole; a parallelizable sub-task runs
its slice." Each class is one :class:`WorkloadClass` in :data:`REGISTRY`; a sliceable
class plugs in by adding an entry whose ``split`` returns one payload per slice and whose
``assemble`` joins the slice results in slice order; its ``check_slice`` holds a result
to the one task it answers (:meth:`WorkloadClass.check`). ``blobs`` lists what a payload
references in the coordinator's blob store, so that a job whose inputs a node could not
fetch is refused when it is submitted (:meth:`WorkloadClass.require_blobs`), and ``hoist``
moves large inline inputs of a job split many ways into the blob store, so that they are
stored once rather than once per slice. ``split_shared`` and ``expand`` do the same for an
input the coordinator makes itself and that no requester uploaded (a training round's
start weights): it is stored once a round (``round_inputs``) and put into a task's payload
when the task is sealed to a node. Nothing else in the coordinator knows about payload
formats.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from nodeclient.errors import ProtocolError, RemoteProtocolError
from nodeclient.workloads import inference, render, render_slices, training

P = ParamSpec("P")
R = TypeVar("R")

# validate(payload, max_bytes) -> metadata kept with the job (raises RemoteProtocolError)
Validate = Callable[[bytes, int], Mapping[str, Any]]
# split(payload, slices) -> one payload per task
Split = Callable[[bytes, int], list[bytes]]
# check_result(result, job metadata, max_bytes): raises RemoteProtocolError if unusable
CheckResult = Callable[[bytes, Mapping[str, Any], int], None]
# check_slice(result, the task's own payload, job metadata, max_bytes): raises
# RemoteProtocolError unless the result is what that one task asked for (a render slice's
# frames and rows, a training slice's update of its own weights and shard), not just some
# part of the job
CheckSlice = Callable[[bytes, bytes, Mapping[str, Any], int], None]
# assemble(slice results in slice order, job metadata) -> the job's result bytes
Assemble = Callable[[Sequence[bytes], Mapping[str, Any]], bytes]
# blobs(validated payload, max_bytes) -> (what, sha256) of each input a node fetches from
# this coordinator's blob store (/v1/blobs/<sha256>)
Blobs = Callable[[bytes, int], Sequence[tuple[str, str]]]
# hoist(validated payload, slices) -> the payload with its inline inputs by blob reference,
# and the (sha256, bytes) the blob store must hold for it; None when nothing moves
Hoist = Callable[[bytes, int], tuple[bytes, list[tuple[str, bytes]]] | None]
# split_shared(validated payload, slices) -> (what every task of the job's current round
# shares, stored once in round_inputs; the task payloads as stored, without it)
SplitShared = Callable[[bytes, int], tuple[bytes, list[bytes]]]
# expand(stored task payload, the round's shared bytes, their sha256) -> the payload sealed
# to a node
Expand = Callable[[bytes, bytes, str], bytes]

MAX_LISTED_BLOBS = 8  # a refusal names this many missing blobs, then counts the rest


@dataclass(frozen=True, slots=True)
class WorkloadClass:
    name: str
    sliceable: bool
    validate: Validate
    split: Split
    check_result: CheckResult
    assemble: Assemble
    blobs: Blobs
    check_slice: CheckSlice | None = None  # None: every task's result is checked as the job's
    hoist: Hoist | None = None  # None: a split copies the payload's inline inputs per slice
    # Both or neither: a round's tasks share an input that the coordinator itself makes
    # (a training round's start weights), stored once a round and put into each task's
    # payload when it is dispatched (coordinator/scheduler.py, coordinator/rounds.py).
    split_shared: SplitShared | None = None
    expand: Expand | None = None
    # How long a task of a job (given its metadata) may run; its lease lasts that long and
    # a grace more (coordinator/placement.py). None: the coordinator's lease_seconds.
    lease: Callable[[Mapping[str, Any]], float] | None = None

    def check(
        self, result: bytes, meta: Mapping[str, Any], max_bytes: int, *, task: Callable[[], bytes]
    ) -> None:
        """A result for one task: usable for the job, and the very slice the task asked for.

        *task* gives the task's payload; it is called only by a class with ``check_slice``
        (a sliced payload is read back from the database for it, a whole one is not).
        """
        self.check_result(result, meta, max_bytes)
        if self.check_slice is not None:
            self.check_slice(result, task(), meta, max_bytes)

    def require_blobs(
        self, payload: bytes, max_bytes: int, held: Callable[[str], bool]
    ) -> set[str]:
        """Refuse a validated payload that references a blob the store does not hold;
        return the SHA-256 of every blob it references.

        A node fetches such an input from ``/v1/blobs/<sha256>`` before a worker sees the
        task (node/inputs.py); were it missing, the task would fail there, after a
        dispatch, as the requester's fault. *held* says whether the store holds a SHA-256.
        """
        refs = self.blobs(payload, max_bytes)
        missing = [(what, sha) for what, sha in refs if not held(sha)]
        if not missing:
            return {sha for _, sha in refs}
        listed = ", ".join(f"{what} (sha256 {sha})" for what, sha in missing[:MAX_LISTED_BLOBS])
        more = len(missing) - MAX_LISTED_BLOBS
        raise RemoteProtocolError(
            f"{self.name} payload references {len(missing)} blob(s) this coordinator does not "
            f"hold; upload each with POST /v1/blobs first: {listed}"
            + (f" and {more} more" if more > 0 else "")
        )


def _blamed(what: str, fn: Callable[P, R]) -> Callable[P, R]:
    """*fn* with any ProtocolError re-raised as the requester's or node's fault, prefixed."""

    def wrapped(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except ProtocolError as exc:
            raise RemoteProtocolError(f"{what}: {exc}") from exc

    return wrapped


def _inference_validate(payload: bytes, max_bytes: int) -> Mapping[str, Any]:
    try:
        request = inference.InferenceRequest.decode(payload, max_bytes=max_bytes)
    except ProtocolError as exc:
        raise RemoteProtocolError(f"ai.inference payload: {exc}") from exc
    meta: dict[str, Any] = {"model_sha256": request.model_sha256}
    if request.output_names is not None:
        meta["outputs"] = list(request.output_names)
    return meta


def _whole(payload: bytes, slices: int) -> list[bytes]:
    if slices != 1:
        raise RemoteProtocolError("ai.inference runs whole (2.3.5): slices must be 1")
    return [payload]


def _inference_check(result: bytes, meta: Mapping[str, Any], max_bytes: int) -> None:
    try:
        inference.decode_result(
            result,
            max_bytes=max_bytes,
            expected_model_sha256=meta.get("model_sha256"),
            expected_outputs=meta.get("outputs"),
        )
    except ProtocolError as exc:
        raise RemoteProtocolError(f"ai.inference result: {exc}") from exc


def _no_blobs(_payload: bytes, _max_bytes: int) -> list[tuple[str, str]]:
    return []


def _single(results: Sequence[bytes], _meta: Mapping[str, Any]) -> bytes:
    if len(results) != 1:
        raise RemoteProtocolError("ai.inference has exactly one task")
    return results[0]


REGISTRY: dict[str, WorkloadClass] = {
    inference.CLASS: WorkloadClass(
        name=inference.CLASS,
        sliceable=False,
        validate=_inference_validate,
        split=_whole,
        check_result=_inference_check,
        assemble=_single,
        blobs=_blamed("ai.inference payload", inference.blob_refs),
    ),
}


def _render_check(result: bytes, meta: Mapping[str, Any], max_bytes: int) -> None:
    render_slices.check_result(result, meta, max_bytes)  # the decoded frames are not needed here


# media.render: split by frame range, frames joined in order (workloads/render_slices.py).
def _render_slice(result: bytes, payload: bytes, _meta: Mapping[str, Any], max_bytes: int) -> None:
    render_slices.check_slice(result, payload, max_bytes)


REGISTRY[render.CLASS] = WorkloadClass(
    name=render.CLASS,
    sliceable=True,
    validate=_blamed("media.render payload", render_slices.job_meta),
    split=_blamed("media.render payload", render_slices.split),
    check_result=_blamed("media.render result", _render_check),
    assemble=render_slices.assemble,
    blobs=_blamed("media.render payload", render.blob_refs),
    check_slice=_blamed("media.render result", _render_slice),
    hoist=_blamed("media.render payload", render_slices.hoist),
    lease=render_slices.lease_seconds,
)


# ai.training: one shard per slice, R rounds; finished rounds are aggregated by
# coordinator/rounds.py (verifier._finish_job), so assemble is never reached. check_slice
# holds a pseudo-gradient to its own task (base weights, shard, steps) and refuses
# non-finite or all-zero values and losses, and a norm over the job's max_norm, when it
# arrives, so that its task goes to another node; the round's close checks them all
# again, with the checks that need the whole round.
def _training_slice(result: bytes, payload: bytes, meta: Mapping[str, Any], max_bytes: int) -> None:
    training.check_slice(result, payload, max_bytes, max_norm=training.job_max_norm(meta))


REGISTRY[training.CLASS] = WorkloadClass(
    name=training.CLASS,
    sliceable=True,
    validate=_blamed("ai.training payload", training.job_meta),
    split=_blamed("ai.training payload", training.split),
    check_result=_blamed("ai.training result", training.check_result),
    assemble=training.assemble,
    blobs=_no_blobs,  # its model spec, weights and data travel in the payload itself
    check_slice=_blamed("ai.training result", _training_slice),
    split_shared=_blamed("ai.training payload", training.split_shared),
    expand=training.expand,
    lease=training.lease_seconds,
)


def lookup(name: str) -> WorkloadClass:
    """The class called *name*, or RemoteProtocolError naming the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise RemoteProtocolError(
            f"unknown workload class {name[:64]!r} (known: {known})"
        ) from None
