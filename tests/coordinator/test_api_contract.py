"""/openapi.json against what the coordinator really answers.

Each route is driven through its real answers (errors included), and every answer must
be declared for its path and method, with the media type it came in and, for JSON, a
schema its body fits. No FastAPI 422 shape is left (validation errors are 400
``{"error": ...}``), the raw routes declare octet-stream, and the requester token is
declared on exactly the routes that answer 401 without it.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from nodeclient.coordinator.client import CoordinatorClient
from nodeclient.coordinator.tokens import REQUESTER, route_kind
from nodeclient.protocol import eip712
from nodeclient.protocol.secp import Secp256k1Key
from tests.coordinator.conftest import (
    CHAIN,
    START,
    Running,
    inference_payload,
    make_node,
    run_inference_job,
)

TOKEN = "requester-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
UNKNOWN = "00000000-0000-0000-0000-000000000000"
RAW_ROUTES = ("/v1/blobs/{sha256}", "/v1/jobs/{job_id}/result", "/v1/tasks/{task_id}/result")


@pytest.fixture
def guarded(start_coordinator: Callable[..., Running], tmp_path: Path) -> Running:
    tokens = tmp_path / "requesters"
    tokens.write_text(f"{TOKEN}\n")
    tokens.chmod(0o600)
    return start_coordinator(
        requester_token_file=tokens, max_blob_bytes=1000, max_payload_bytes=10_000
    )


class Contract:
    """The served OpenAPI document, and a checker of answers against it."""

    def __init__(self, running: Running) -> None:
        self.url = running.url
        self.spec: dict[str, Any] = httpx.get(running.url + "/openapi.json").json()
        self.seen: set[tuple[str, str, int]] = set()

    def call(
        self, method: str, template: str, path: str | None = None, **kw: Any
    ) -> httpx.Response:
        """Send the request and check its answer against the declared operation."""
        answer = httpx.request(method, self.url + (path or template), **kw)
        operation = self.spec["paths"][template][method.lower()]
        declared = operation["responses"].get(str(answer.status_code))
        assert declared is not None, (
            f"{method} {template} answered {answer.status_code} ({answer.text[:200]}), "
            f"which it does not declare: {sorted(operation['responses'])}"
        )
        media = answer.headers["content-type"].split(";")[0]
        content = declared.get("content", {})
        assert media in content, (method, template, answer.status_code, media, list(content))
        if media == "application/json":
            schema = {**content[media]["schema"], "components": self.spec["components"]}
            jsonschema.validate(answer.json(), schema)
        self.seen.add((method, template, answer.status_code))
        return answer


def _unstake(key: Secp256k1Key, node_id: str) -> dict[str, Any]:
    msg = {"node_id": node_id, "requested_at": int(START)}
    return {"message": msg, "signature": "0x" + eip712.sign_typed(key, "Unstake", msg,
                                                                   chain_id=CHAIN).hex()}  # fmt: skip


def test_every_answer_is_declared_with_a_schema_it_fits(guarded: Running, rsa_keys) -> None:
    """Success and error answers of every route, through real requests: each status is
    declared for its path and method (not just by ``default``), and each body fits."""
    c = Contract(guarded)
    c.call("GET", "/healthz")
    # Nodes: registration (new, updated, refused each way), reads, unstake.
    nodes = [make_node(rsa_keys, i) for i in range(3)]  # one wallet
    man = [n.manifest(issued_at=int(START)) for n in nodes]
    assert c.call("POST", "/v1/nodes", json=man[0]).status_code == 201
    newer = nodes[0].manifest(issued_at=int(START) + 1)
    assert c.call("POST", "/v1/nodes", json=newer).status_code == 200
    assert c.call("POST", "/v1/nodes", json=man[0]).status_code == 409  # stale
    assert c.call("POST", "/v1/nodes", json={}).status_code == 400
    assert c.call("POST", "/v1/nodes", json=[1]).status_code == 400  # not an object
    assert c.call("POST", "/v1/nodes", json={"x": "y" * 70_000}).status_code == 413
    assert c.call("POST", "/v1/nodes", json=man[1]).status_code == 201
    assert c.call("POST", "/v1/nodes", json=man[2]).status_code == 403  # 2 per wallet
    assert c.call("GET", "/v1/nodes").status_code == 200
    one = "/v1/nodes/{node_id}"
    got = c.call("GET", one, f"/v1/nodes/{nodes[0].node_id}")
    assert c.call("GET", one, "/v1/nodes/xyz").status_code == 400
    assert c.call("GET", one, "/v1/nodes/0x" + "00" * 19 + "01").status_code == 404
    evidence = "/v1/nodes/{node_id}/equivocations"
    at_node = f"/v1/nodes/{nodes[0].node_id}/equivocations"
    assert c.call("GET", evidence, at_node).json() == []
    assert c.call("GET", evidence, "/v1/nodes/xyz/equivocations").status_code == 400
    assert c.call("GET", evidence, at_node + "?limit=0").status_code == 400
    assert c.call("GET", evidence, at_node + f"?after={1 << 63}").status_code == 400
    manifest = "/v1/manifests/{manifest_hash}"
    assert (
        c.call("GET", manifest, f"/v1/manifests/{got.json()['manifest_hash']}").status_code == 200
    )
    assert c.call("GET", manifest, "/v1/manifests/xyz").status_code == 400
    assert c.call("GET", manifest, "/v1/manifests/" + "a" * 64).status_code == 404
    unstake = "/v1/nodes/{node_id}/unstake"
    first, third = nodes[1], nodes[2]
    at = f"/v1/nodes/{first.node_id}/unstake"
    assert c.call("POST", unstake, at, json={}).status_code == 400
    assert (
        c.call("POST", unstake, at, json=_unstake(first.liveness, first.node_id)).status_code == 403
    )
    assert c.call("POST", unstake, f"/v1/nodes/{third.node_id}/unstake",
                  json=_unstake(third.node_key, third.node_id)).status_code == 404  # fmt: skip
    assert (
        c.call("POST", unstake, at, json=_unstake(first.node_key, first.node_id)).status_code == 200
    )

    # Blobs: the upload is guarded, the read open.
    assert c.call("POST", "/v1/blobs", content=b"blob").status_code == 401
    stored = c.call("POST", "/v1/blobs", content=b"0123456789", headers=AUTH)
    assert stored.status_code == 201
    assert c.call("POST", "/v1/blobs", content=b"x" * 1001, headers=AUTH).status_code == 413
    blob = "/v1/blobs/{sha256}"
    at = stored.json()["url"]
    assert c.call("GET", blob, at).status_code == 200
    assert c.call("GET", blob, at, headers={"Range": "bytes=0-1"}).status_code == 206
    assert c.call("GET", blob, at, headers={"Range": "bytes=50-"}).status_code == 416
    assert c.call("GET", blob, "/v1/blobs/xyz").status_code == 400
    assert c.call("GET", blob, "/v1/blobs/" + "b" * 64).status_code == 404

    # Jobs and results.
    payload = inference_payload([1.0, 2.0])
    body = {"workload_class": "ai.inference", "payload": base64.b64encode(payload).decode()}
    assert c.call("POST", "/v1/jobs", json=body).status_code == 401
    assert c.call("POST", "/v1/jobs", json={**body, "min_teir": 1}, headers=AUTH).status_code == 400
    assert c.call("POST", "/v1/jobs", json={**body, "payload": "A" * 20_000},
                  headers=AUTH).status_code == 413  # fmt: skip
    job = c.call("POST", "/v1/jobs", json=body, headers=AUTH)
    assert job.status_code == 201
    job_id, task_id = job.json()["job_id"], job.json()["tasks"][0]["task_id"]
    assert c.call("GET", "/v1/jobs", headers=AUTH).status_code == 200
    assert c.call("GET", "/v1/jobs", "/v1/jobs?limit=0", headers=AUTH).status_code == 400
    one = "/v1/jobs/{job_id}"
    assert c.call("GET", one, f"/v1/jobs/{job_id}", headers=AUTH).status_code == 200
    assert c.call("GET", one, f"/v1/jobs/{job_id}?tasks=none", headers=AUTH).status_code == 200
    assert c.call("GET", one, f"/v1/jobs/{job_id}?tasks=x", headers=AUTH).status_code == 400
    assert c.call("GET", one, f"/v1/jobs/{UNKNOWN}", headers=AUTH).status_code == 404
    result = "/v1/jobs/{job_id}/result"
    assert c.call("GET", result, f"/v1/jobs/{job_id}/result", headers=AUTH).status_code == 409
    assert c.call("GET", result, f"/v1/jobs/{UNKNOWN}/result", headers=AUTH).status_code == 404
    task = "/v1/tasks/{task_id}/result"
    assert c.call("GET", task, f"/v1/tasks/{task_id}/result", headers=AUTH).status_code == 409
    assert c.call("GET", task, f"/v1/tasks/{UNKNOWN}/result", headers=AUTH).status_code == 404
    cancel = "/v1/jobs/{job_id}/cancel"
    assert c.call("POST", cancel, f"/v1/jobs/{job_id}/cancel", headers=AUTH).status_code == 200
    assert c.call("POST", cancel, f"/v1/jobs/{job_id}/cancel", headers=AUTH).status_code == 409
    assert c.call("POST", cancel, f"/v1/jobs/{UNKNOWN}/cancel", headers=AUTH).status_code == 404

    # A job that succeeds: its results, raw.
    guarded.client.close()
    guarded.client = CoordinatorClient(guarded.url, token=TOKEN)
    guarded.link(nodes[0])
    done = run_inference_job(guarded, nodes[0], [1.0, 2.0])
    assert c.call("GET", one, f"/v1/jobs/{done['job_id']}", headers=AUTH).status_code == 200
    assert (
        c.call("GET", result, f"/v1/jobs/{done['job_id']}/result", headers=AUTH).status_code == 200
    )
    at = f"/v1/tasks/{done['tasks'][0]['task_id']}/result"
    assert c.call("GET", task, at, headers=AUTH).status_code == 200

    # Every operation in the document was driven to an answer here.
    driven = {(method, template) for method, template, _ in c.seen}
    listed = {(m.upper(), p) for p, ops in c.spec["paths"].items() for m in ops}
    assert listed == driven


def test_no_validation_error_shape_is_declared(guarded: Running) -> None:
    """FastAPI's 422 {"detail": [...]} is never answered, so it is never declared."""
    spec = Contract(guarded).spec
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            assert "422" not in operation["responses"], (method, path)
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    assert "HTTPValidationError" not in json.dumps(spec)


def test_raw_routes_declare_octet_stream(guarded: Running) -> None:
    paths = Contract(guarded).spec["paths"]
    for template in RAW_ROUTES:
        assert list(paths[template]["get"]["responses"]["200"]["content"]) == [
            "application/octet-stream"
        ], template
    assert list(paths["/v1/blobs/{sha256}"]["get"]["responses"]["206"]["content"]) == [
        "application/octet-stream"
    ]
    upload = paths["/v1/blobs"]["post"]["requestBody"]
    assert upload["content"]["application/octet-stream"]["schema"] == {
        "type": "string",
        "format": "binary",
    }


def test_the_bearer_token_is_declared_where_it_is_asked_for(guarded: Running) -> None:
    """Every operation, asked without a token: 401 exactly where the document declares
    the bearer scheme, and such an operation declares its 401 and 503."""
    spec = Contract(guarded).spec
    scheme = spec["components"]["securitySchemes"]["requesterToken"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    for template, operations in spec["paths"].items():
        path = template.format(
            node_id="0x" + "00" * 20, manifest_hash="a" * 64, sha256="a" * 64, job_id=UNKNOWN,
            task_id=UNKNOWN,
        )  # fmt: skip
        for method, operation in operations.items():
            answer = httpx.request(method.upper(), guarded.url + path, content=b"{}")
            declared = operation.get("security") == [{"requesterToken": []}]
            assert (answer.status_code == 401) == declared, (method, template, answer.text)
            assert declared == (route_kind(method.upper(), template) == REQUESTER)
            if declared:
                assert {"401", "503"} <= set(operation["responses"]), (method, template)


def test_an_open_coordinator_declares_no_token(coordinator: Running) -> None:
    """Without a requester token file the requester routes are open: nothing declares
    a token or a 401."""
    spec = Contract(coordinator).spec
    assert "securitySchemes" not in spec.get("components", {})
    for operations in spec["paths"].values():
        for operation in operations.values():
            assert "security" not in operation
            assert "401" not in operation["responses"]
