"""What the coordinator's HTTP routes answer, as /openapi.json declares it.

The routes build their JSON themselves: the models here only describe it, and never
check, convert or filter an answer. tests/coordinator/test_api_contract.py drives every
route and holds each answer to what is declared here.
"""

from __future__ import annotations

from typing import Any, Final, Literal

from fastapi import FastAPI
from pydantic import BaseModel, Field


class Error(BaseModel):
    """Every error answer: one precise reason."""

    error: str


class Health(BaseModel):
    status: Literal["ok"]
    coordinator_id: str
    chain_id: int
    links: int
    server_time: float


class Registered(BaseModel):
    node_id: str
    status: Literal["registered", "updated", "unchanged"]
    wallet_proven: bool
    prior_registrations: list[dict[str, Any]]
    policy: dict[str, Any]
    coordinator_id: str
    chain_id: int


class NodeView(BaseModel):
    node_id: str
    wallet: str
    tier: int
    region: str
    online: bool
    state: str | None
    last_seen: float | None
    unstaking_until: int | None
    workload_classes: list[str]
    max_parallel_subtasks: int
    liveness_address: str
    registered_at: float
    manifest_hash: str | None


class Unstaked(BaseModel):
    node_id: str
    unstaking_until: int


class BlobStored(BaseModel):
    sha256: str
    url: str
    size: int


class Progress(BaseModel):
    done: float
    total: float
    note: str


class TaskView(BaseModel):
    task_id: str
    slice_index: int
    slice_count: int
    round: int
    node_id: str | None
    manifest_hash: str | None
    status: Literal["queued", "leased", "succeeded", "failed", "cancelled"]
    attempts: int
    lease_deadline: float | None
    proof: str | None
    signature: str | None
    result_sha256: str | None
    result_size: int | None
    typed_data: dict[str, Any] | None = Field(description="the signed Result as EIP-712 JSON")
    reason: str | None
    progress: Progress | None = Field(description="while leased: the node's latest progress")


class SignedResult(BaseModel):
    proof: str
    signature: str | None
    typed_data: dict[str, Any] | None = Field(description="the signed Result as EIP-712 JSON")


class EquivocationView(BaseModel):
    id: int = Field(description="the record's number: a page's cursor")
    task_id: str
    node_id: str
    recorded_at: float
    accepted: SignedResult = Field(description="the Result the coordinator accepted")
    conflicting: SignedResult = Field(description="another Result the node signed for it")


class JobSummary(BaseModel):
    job_id: str
    workload_class: str
    status: Literal["queued", "running", "succeeded", "failed"]
    created_at: float


class JobView(JobSummary):
    reason: str | None
    min_tier: int
    region: str | None
    resources: dict[str, int]
    slices: int
    round: int
    finished_at: float | None
    result_sha256: str | None
    tasks: list[TaskView] = Field(
        default_factory=list, description="absent with ?tasks=none and in a cancel's answer"
    )


RAW: Final = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
RAW_BODY: Final = {"requestBody": {"required": True, "content": RAW}}  # POST /v1/blobs
TOO_LARGE: Final = "the body is over its bound (see body limits); the connection is closed"
DISK_FULL: Final = "the coordinator's disk is full: nothing was stored"
SENDING_FULL: Final = (
    "the results being sent are at their limit: Retry-After says when to ask again"
)


def answers(
    ok: dict[int, tuple[str, Any]], errors: dict[int, str]
) -> dict[int | str, dict[str, Any]]:
    """A route's ``responses`` for OpenAPI: each success (a model, or content such as
    RAW) and each error (an :class:`Error`) with what it means, and ``default``: what
    any route may answer besides (500, 405 with ``Allow``)."""
    out: dict[int | str, dict[str, Any]] = {}
    for code, (why, what) in ok.items():
        out[code] = {"description": why, "content" if isinstance(what, dict) else "model": what}
    for code, why in errors.items():
        out[code] = {"description": why, "model": Error}
    out["default"] = {
        "description": "an internal error (500), a method the path does not take (405), or "
        "a body over its bound (413)",
        "model": Error,
    }
    return out


BEARER: Final = "requesterToken"
_ERROR_JSON: Final = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}


def declare_bearer(schema: dict[str, Any]) -> None:
    """Declare in an OpenAPI *schema* the bearer token of the routes that the requester
    token file guards (tokens.py: route_kind), with their 401 and 503 answers: for a
    coordinator that has such a file (without one, those routes are open)."""
    from nodeclient.coordinator.tokens import REQUESTER, route_kind  # tokens imports api

    schema.setdefault("components", {}).setdefault("securitySchemes", {})[BEARER] = {
        "type": "http",
        "scheme": "bearer",
        "description": "a token of this coordinator's requester token file "
        "(--requester-token-file), checked before the request's body is read",
    }
    unusable = "the requester token file is unusable: its operator must fix it"
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            if route_kind(method.upper(), path) != REQUESTER:
                continue
            operation["security"] = [{BEARER: []}]
            responses = operation.setdefault("responses", {})
            responses["401"] = {
                "description": "no bearer token, or one not accepted (WWW-Authenticate)",
                "content": _ERROR_JSON,
            }
            if "503" in responses:  # a result route's own 503
                responses["503"]["description"] += f"; or {unusable}"
            else:
                responses["503"] = {"description": unusable, "content": _ERROR_JSON}


def with_bearer(app: FastAPI) -> None:
    """Make *app*'s OpenAPI document declare the requester token (:func:`declare_bearer`)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            declare_bearer(generate())  # which keeps it as app.openapi_schema
        return generate()

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI: "Extending OpenAPI"


# --- each route's answers, by route -------------------------------------------------------

HEALTH: Final = answers({200: ("ok", Health)}, {})
REGISTER: Final = answers(
    {
        201: ("registered: a new node", Registered),
        200: ("updated: a node on record registered again", Registered),
    },
    {
        400: "a malformed body, or a manifest that fails verification: the failed check",
        403: "the sybil pre-screen refuses the node: the policy",
        409: "a stale manifest, or one out of step with the coordinator's clock",
        413: TOO_LARGE,
        429: "too many registrations from this client address: Retry-After says when to "
        "try again (--registrations-per-minute)",
        507: DISK_FULL,
    },
)
NODES: Final = answers(
    {200: ("a page of nodes, in the order they registered; Link: the next page", list[NodeView])},
    {400: "a bad limit or cursor"},
)
NODE: Final = answers(
    {200: ("the node", NodeView)},
    {400: "node_id is not an address", 404: "no such node"},
)
EQUIVOCATIONS: Final = answers(
    {
        200: (
            "a page of the node's equivocations, in the order they were recorded; Link: "
            "the next page",
            list[EquivocationView],
        )
    },
    {400: "node_id is not an address, or a bad limit or cursor"},
)
MANIFEST: Final = answers(
    {200: ("the signed manifest, as the coordinator verified it", dict[str, Any])},
    {400: "not 64 lowercase hex digits", 404: "no such manifest"},
)
UNSTAKE: Final = answers(
    {200: ("the cooldown's end (the first unstake's, if repeated)", Unstaked)},
    {
        400: "a malformed body, or requested_at more than 300 s off",
        403: "the signature is not node.key's",
        404: "no such node",
        413: TOO_LARGE,
        507: DISK_FULL,
    },
)
BLOB_UPLOAD: Final = answers(
    {201: ("stored", BlobStored)},
    {
        400: "the upload ended before its last byte",
        413: "the blob is over the blob limit; the connection is closed",
        507: DISK_FULL,
    },
)
BLOB: Final = answers(
    {200: ("the blob's bytes", RAW), 206: ("the range asked for", RAW)},
    {
        400: "not 64 lowercase hex digits, or a Range of another form",
        404: "no such blob",
        416: "a Range outside the blob (Content-Range: bytes */SIZE)",
    },
)
SUBMIT: Final = answers(
    {201: ("the job, queued", JobView)},
    {
        400: "a malformed request or payload, or one that references a blob the "
        "store does not hold",
        413: "the payload is over the payload limit",
        507: DISK_FULL,
    },
)
JOBS: Final = answers(
    {200: ("a page of jobs, oldest first; Link: the next page", list[JobSummary])},
    {400: "a bad limit, status or cursor"},
)
JOB: Final = answers(
    {200: ("the job", JobView)},
    {400: "tasks is neither all nor none", 404: "no such job"},
)
CANCEL: Final = answers(
    {200: ("the job, failed, without its tasks", JobView)},
    {404: "no such job", 409: "the job has ended", 507: DISK_FULL},
)
JOB_RESULT: Final = answers(
    {200: ("the assembled result", RAW)},
    {
        404: "no such job, or its result is no longer kept",
        409: "the job has not succeeded",
        503: SENDING_FULL,
    },
)
TASK_RESULT: Final = answers(
    {200: ("the result bytes that the proof covers", RAW)},
    {
        404: "no such task, or its result is no longer kept",
        409: "the task has no result",
        503: SENDING_FULL,
    },
)
