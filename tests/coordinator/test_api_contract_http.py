"""HTTP semantics of the API: a refused upload closes its connection, a 405 names the
methods allowed, HEAD answers a GET's headers, and a new job's tasks show the keys a
read of the job shows."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest

from nodeclient.coordinator import results
from tests.coordinator.conftest import Running, inference_payload, make_node, run_inference_job


@pytest.fixture
def small_blobs(start_coordinator: Callable[..., Running]) -> Running:
    return start_coordinator(max_blob_bytes=1000)


def test_an_upload_declared_over_the_blob_limit_closes_the_connection(
    small_blobs: Running,
) -> None:
    """Refused by its Content-Length: the rest of the body is not read, so the
    connection cannot be kept."""
    r = httpx.post(small_blobs.url + "/v1/blobs", content=b"x" * 1001)
    assert r.status_code == 413
    assert r.json() == {"error": "blob of 1001 bytes exceeds the 1000-byte limit"}
    assert r.headers["connection"] == "close"


def test_an_upload_that_passes_the_blob_limit_while_it_arrives_closes_the_connection(
    small_blobs: Running,
) -> None:
    def chunks() -> Iterator[bytes]:
        yield from (b"x" * 600, b"x" * 600)

    r = httpx.post(small_blobs.url + "/v1/blobs", content=chunks())
    assert "content-length" not in r.request.headers
    assert r.status_code == 413
    assert r.json() == {"error": "blob exceeds the 1000-byte limit"}
    assert r.headers["connection"] == "close"


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/v1/jobs", "GET, POST"),
        ("DELETE", "/v1/nodes", "GET, POST"),
        ("PUT", "/healthz", "GET, HEAD"),
        ("GET", "/v1/jobs/00000000-0000-0000-0000-000000000000/cancel", "POST"),
        ("POST", "/v1/blobs/" + "a" * 64, "GET, HEAD"),
    ],
)
def test_a_405_names_every_method_the_path_takes(
    coordinator: Running, method: str, path: str, allowed: str
) -> None:
    """RFC 9110 15.5.6: a 405 carries Allow, with the methods of every route at the path
    (two routes share /v1/jobs and /v1/nodes), and the API's JSON error."""
    r = httpx.request(method, coordinator.url + path)
    assert r.status_code == 405
    assert r.headers["allow"] == allowed
    assert r.json() == {"error": "Method Not Allowed"}


def _same_headers(url: str, path: str) -> None:
    """HEAD answers 200 with the GET's Content-Length and Content-Type, and no body."""
    get, head = httpx.get(url + path), httpx.head(url + path)
    assert (get.status_code, head.status_code) == (200, 200), (path, head.text)
    for name in ("content-length", "content-type"):
        assert head.headers[name] == get.headers[name], (path, name)
    assert head.content == b""
    assert int(head.headers["content-length"]) == len(get.content) > 0


def test_head_answers_a_gets_headers_for_results_blobs_and_jobs(
    coordinator: Running, rsa_keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HEAD on the raw results (one over the size that is spooled to disk), a blob and
    a job: the same headers as GET, without the body; a HEAD copies no result out."""
    node = make_node(rsa_keys, 0)
    coordinator.register(node)
    coordinator.link(node)
    values = [float(i) for i in range(results.CHUNK_BYTES // 4 + 1000)]  # float32: > 1 MiB
    done = run_inference_job(coordinator, node, values)
    task = done["tasks"][0]
    assert task["result_size"] > results.CHUNK_BYTES
    _same_headers(coordinator.url, f"/v1/tasks/{task['task_id']}/result")
    _same_headers(coordinator.url, f"/v1/jobs/{done['job_id']}/result")
    _same_headers(coordinator.url, f"/v1/jobs/{done['job_id']}")

    async def no_spool(*_args: object) -> None:
        raise AssertionError("a HEAD spooled a result")

    with monkeypatch.context() as patched:
        patched.setattr(results.Spooler, "spool", no_spool)
        head = httpx.head(coordinator.url + f"/v1/tasks/{task['task_id']}/result")
        assert (head.status_code, head.headers["content-length"]) == (
            200,
            str(task["result_size"]),
        )
    small = run_inference_job(coordinator, node, [1.0, 2.0])  # read with the look, not spooled
    _same_headers(coordinator.url, f"/v1/tasks/{small['tasks'][0]['task_id']}/result")
    sha = coordinator.client.upload_blob(b"0123456789")["sha256"]
    _same_headers(coordinator.url, f"/v1/blobs/{sha}")
    ranged = httpx.head(coordinator.url + f"/v1/blobs/{sha}", headers={"Range": "bytes=2-4"})
    assert (ranged.status_code, ranged.headers["content-length"]) == (206, "3")
    assert httpx.head(coordinator.url + "/healthz").status_code == 200


def test_a_new_jobs_tasks_have_the_keys_a_read_of_the_job_shows(coordinator: Running) -> None:
    """The 201 answer of POST /v1/jobs shows each task as GET /v1/jobs/{id} does:
    progress included (null: no node has it yet)."""
    created = coordinator.client.submit_job("ai.inference", inference_payload([1.0]))
    read = coordinator.client.job(created["job_id"])
    assert [set(t) for t in created["tasks"]] == [set(t) for t in read["tasks"]]
    assert [t["progress"] for t in created["tasks"]] == [None]
