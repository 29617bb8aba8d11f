"""The requester commands against a hostile coordinator: a real HTTP server on loopback
that answers what a coordinator could, but should not (a job result far longer than its
one task's, a listing whose next page leads back to itself, a job id with a terminal's
escape sequences). Each is refused with one line, having read no more than it needed."""

from __future__ import annotations

import hashlib
import http.server
import json
import queue
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest

from nodeclient.coordinator import cli
from nodeclient.protocol import eip712, manifest
from nodeclient.protocol.proof import proof_of_execution
from nodeclient.protocol.secp import Secp256k1Key
from tests.coordinator.conftest import (
    CHAIN,
    START,
    SimNode,
    inference_payload,
    inference_result,
)
from tests.http_server import serving

LONG = 128 << 20  # a body far longer than anything asked for, sent a MiB at a time
PIECE = 1 << 20
MAX_ASKS = 12  # a client still asking after this many requests is looping: it is told so


@dataclass
class Answer:
    status: int
    body: bytes | int  # an int: that many filler bytes, sent until the client stops reading
    headers: dict[str, str] = field(default_factory=dict)


class _Coordinator(http.server.BaseHTTPRequestHandler):
    """Answers each request from ``answers`` by its path and query (else by its path);
    records what was asked, and how many bytes of a long body went out."""

    answers: ClassVar[dict[str, Answer]]
    asked: ClassVar[list[str]]
    sent: ClassVar[queue.Queue[tuple[str, int]]]

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        type(self).asked.append(self.path)
        answer = self.answers.get(self.path) or self.answers.get(self.path.partition("?")[0])
        if len(self.asked) > MAX_ASKS:
            answer = Answer(500, b'{"error": "asked too many times: the client is looping"}')
        elif answer is None:
            answer = Answer(404, b'{"error": "no such route"}')
        self.send_response(answer.status)
        size = answer.body if isinstance(answer.body, int) else len(answer.body)
        self.send_header("Content-Length", str(size))
        for name, value in {"Content-Type": "application/json", **answer.headers}.items():
            self.send_header(name, value)
        self.end_headers()
        if isinstance(answer.body, bytes):
            self.wfile.write(answer.body)
            return
        sent = 0
        try:
            while sent < size:
                self.wfile.write(b"x" * PIECE)
                sent += PIECE
        except OSError:  # the client closed the connection: it read no more
            pass
        finally:
            type(self).sent.put((self.path, sent))

    do_GET = do_POST = _answer

    def log_message(self, *_args: object) -> None:
        return None


@dataclass
class Fake:
    url: str
    handler: type[_Coordinator]

    def answer(self, path: str, status: int, body: object, **headers: str) -> None:
        data = body if isinstance(body, bytes | int) else json.dumps(body).encode()
        self.handler.answers[path] = Answer(status, data, headers)

    @property
    def asked(self) -> list[str]:
        return self.handler.asked

    def sent(self) -> tuple[str, int]:
        """The path of the long body sent last, and how many of its bytes went out."""
        return self.handler.sent.get(timeout=60)


@pytest.fixture
def fake() -> Iterator[Fake]:
    handler = type(
        "Coordinator", (_Coordinator,), {"answers": {}, "asked": [], "sent": queue.Queue()}
    )
    with serving(handler) as url:
        yield Fake(url, handler)


@pytest.fixture
def signed_job(rsa_keys: list[Any]) -> tuple[dict[str, Any], bytes, dict[str, Any]]:
    """A succeeded ai.inference job as the jobs API shows it, genuinely signed by its node
    (its Result and its manifest): (the job, its one task's result, the node's manifest)."""
    node = SimNode(Secp256k1Key.generate(), Secp256k1Key.generate(), rsa_keys[0])
    signed = node.manifest(issued_at=int(START))
    result = inference_result(inference_payload([1.5, -2.0]), [1.5, -2.0])
    task_id, job_id = uuid.uuid4(), uuid.uuid4()
    message = {
        "task_id": task_id.bytes, "job_id": job_id.bytes, "node_id": node.node_id,
        "proof": proof_of_execution(task_id=task_id, result=result, node_id=node.node_id),
        "result_size": len(result), "completed_at": int(START),
    }  # fmt: skip
    signature = eip712.sign_typed(node.node_key, "Result", message, chain_id=CHAIN)
    digest = hashlib.sha256(result).hexdigest()
    task = {
        "task_id": str(task_id), "slice_index": 0, "slice_count": 1, "round": 0,
        "node_id": node.node_id, "status": "succeeded", "attempts": 1,
        "manifest_hash": hashlib.sha256(manifest.signed_bytes(signed)).hexdigest(),
        "lease_deadline": None, "proof": "0x" + message["proof"].hex(),
        "signature": "0x" + signature.hex(), "result_sha256": digest,
        "result_size": len(result), "reason": None,
        "typed_data": eip712.typed_data_json("Result", message, chain_id=CHAIN),
    }  # fmt: skip
    job = {
        "job_id": str(job_id), "workload_class": "ai.inference", "status": "succeeded",
        "min_tier": 0, "slices": 1, "result_sha256": digest, "tasks": [task],
    }  # fmt: skip
    return job, result, signed


def _serve_job(fake: Fake, job: dict[str, Any], result: bytes, signed: dict[str, Any]) -> None:
    task = job["tasks"][0]
    fake.answer(f"/v1/jobs/{job['job_id']}", 200, job)
    fake.answer(f"/v1/tasks/{task['task_id']}/result", 200, result)
    fake.answer(f"/v1/manifests/{task['manifest_hash']}", 200, signed)


def test_the_fake_coordinators_job_verifies(fake: Fake, signed_job, capsys) -> None:
    """What the tests below change is all that is wrong: served as it is, the job verifies."""
    job, result, signed = signed_job
    _serve_job(fake, job, result, signed)
    fake.answer(f"/v1/jobs/{job['job_id']}/result", 200, result)
    assert cli.main(["verify", job["job_id"], "--coordinator", fake.url]) == 0
    assert f"job {job['job_id']} (ai.inference, succeeded): verified" in capsys.readouterr().out


def test_verify_reads_no_more_of_a_job_result_than_its_one_task_gives(
    fake: Fake, signed_job, capsys
) -> None:
    """An ai.inference job's result must be its one task's verified result: `verify`
    compares it as it comes, and stops reading once it is longer (here a body of 128
    MiB). Before, the whole body (up to 16 GiB) was read into memory, then hashed."""
    job, result, signed = signed_job
    _serve_job(fake, job, result, signed)
    path = f"/v1/jobs/{job['job_id']}/result"
    fake.answer(path, 200, LONG, **{"Content-Type": "application/octet-stream"})
    assert cli.main(["verify", job["job_id"], "--coordinator", fake.url]) == 1
    where, sent = fake.sent()
    assert where == path
    assert sent < LONG // 2, sent  # sent, not read: what the socket buffers took at most
    out = capsys.readouterr().out
    assert "NOT VERIFIED" in out
    assert (
        f"FAILED job result: not equal to its one task's verified result: longer than its "
        f"{len(result)} bytes (not read further)"
    ) in out


def test_jobs_stops_at_a_next_page_it_has_read_already(fake: Fake, capsys) -> None:
    """A Link rel="next" that leads back to a page already read would list the same jobs
    for ever: `jobs` prints each page as it comes, then stops with one line (exit 1)."""
    first, second = str(uuid.uuid4()), str(uuid.uuid4())

    def page(job_id: str) -> list[dict[str, object]]:
        return [{"job_id": job_id, "workload_class": "ai.inference", "status": "queued"}]

    again = f"/v1/jobs?after={first}"
    fake.answer("/v1/jobs", 200, page(first), Link=f'<{again}>; rel="next"')
    fake.answer(again, 200, page(second), Link=f'<{again}>; rel="next"')
    assert cli.main(["jobs", "--coordinator", fake.url]) == 1
    assert fake.asked == ["/v1/jobs", again]
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"{first}  ai.inference  queued", f"{second}  ai.inference  queued"]
    assert err.count("\n") == 1
    assert f'its Link rel="next" leads to {again}, a page already read' in err


def test_submit_refuses_a_job_id_that_is_not_a_uuid_and_prints_nothing_of_it(
    fake: Fake, capsys
) -> None:
    """A job id with a terminal's escape sequences (it retitles the window, clears the
    screen) and a path in it: not a job id as the protocol has them (a UUID), so not a job
    object. `submit --wait` says so in one line, exit 1, and neither prints the id nor asks
    for it; its control characters never reach the terminal."""
    evil = "\x1b]0;owned\x07\x1b[2J/../../nodes?x="
    job = {"job_id": evil, "workload_class": "ai.inference", "status": "queued", "tasks": []}
    fake.answer("/v1/jobs", 201, job)
    # Any file is a payload here: the fake takes whatever is posted.
    args = ["submit", "--class", "ai.inference", "--payload", __file__, "--wait"]
    assert cli.main([*args, "--coordinator", fake.url]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "\x1b" not in err and "\x07" not in err
    assert "did not answer a job object" in err and "may have been created" in err
    assert fake.asked == ["/v1/jobs"]


@pytest.mark.parametrize(
    "given",
    [
        "{6F1C2A3E-9B0D-4C57-8E21-3D4F5A6B7C8D}",
        "6F1C2A3E-9B0D-4C57-8E21-3D4F5A6B7C8D",
        "urn:uuid:6f1c2a3e-9b0d-4c57-8e21-3d4f5a6b7c8d",
        "6f1c2a3e9b0d4c578e213d4f5a6b7c8d",
        "\u0666" * 32,
        "\r" + "0" * 31,
    ],
)
def test_submit_refuses_every_spelling_of_a_job_id_but_the_protocols(
    fake: Fake, capsys, given: str
) -> None:
    """A job id is a UUID as the protocol spells it, lower-case 8-4-4-4-12; the other
    spellings Python's uuid.UUID takes (braces, upper case, a URN, no hyphens, other
    scripts' digits, a leading control character) are no job id either."""
    job = {"job_id": given, "workload_class": "ai.inference", "status": "queued", "tasks": []}
    fake.answer("/v1/jobs", 201, job)
    args = ["submit", "--class", "ai.inference", "--payload", __file__]
    assert cli.main([*args, "--coordinator", fake.url]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "did not answer a job object" in err


@pytest.mark.parametrize("given", [".", "..", "../v1/jobs", "a/b?c"])
def test_an_id_a_coordinator_gave_is_one_path_segment_whatever_it_holds(given: str) -> None:
    """A job or task id comes from the coordinator (`submit --wait` polls the id it was
    given; `verify` fetches each listed task's result): a `.` or `..` in it, which an HTTP
    client resolves against the path before it, a `/` or a `?` never make the request
    another route. Each request goes to one segment under its own route."""
    import httpx

    from nodeclient.coordinator.client import CoordinatorClient

    asked: list[bytes] = []

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.raw_path)
        return httpx.Response(404, json={"error": "no such job"})

    client = CoordinatorClient("http://c.example", transport=httpx.MockTransport(answer))
    for call in (client.job, client.cancel_job, client.task_result):
        with pytest.raises(Exception):  # noqa: B017 (a 404 of each kind: not the subject)
            call(given)
    jobs, cancel, task = asked
    for path, route, tail in (
        (jobs, b"/v1/jobs/", b""),
        (cancel, b"/v1/jobs/", b"/cancel"),
        (task, b"/v1/tasks/", b"/result"),
    ):
        assert path.startswith(route) and path.endswith(tail), path
        segment = path[len(route) : len(path) - len(tail)]
        assert b"/" not in segment and b"?" not in segment and b"." not in segment, path
