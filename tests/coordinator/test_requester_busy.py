"""The requester's client against a busy coordinator: a read answered 503 (the result
copies the coordinator sends at once are at their bound) is asked again after its
Retry-After, a few times, and then reported as no answer (nothing known), never as a
refusal of the request."""

from __future__ import annotations

import httpx
import pytest

from nodeclient.coordinator import client as client_module
from nodeclient.coordinator.client import BUSY_RETRIES, CoordinatorClient, NoAnswer

BUSY = {"error": "the coordinator is sending 1073741824 bytes of results already"}


def _client(answers: list[httpx.Response], asked: list[str]) -> CoordinatorClient:
    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        return answers.pop(0) if len(answers) > 1 else answers[0]

    return CoordinatorClient("http://coordinator.test", transport=httpx.MockTransport(handler))


def test_a_busy_read_is_asked_again_after_its_retry_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    waits: list[float] = []
    monkeypatch.setattr(client_module.time, "sleep", waits.append)
    asked: list[str] = []
    answers = [
        httpx.Response(503, json=BUSY, headers={"Retry-After": "3"}),
        httpx.Response(503, json=BUSY, headers={"Retry-After": "999"}),
        httpx.Response(200, content=b"the result"),
    ]
    with _client(answers, asked) as client:
        assert client.task_result("t1") == b"the result"
    assert asked == ["/v1/tasks/t1/result"] * 3
    assert waits == [3.0, client_module.BUSY_WAIT_MAX_S]


def test_a_coordinator_busy_for_good_is_no_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_module.time, "sleep", lambda _s: None)
    asked: list[str] = []
    answers = [httpx.Response(503, json=BUSY, headers={"Retry-After": "1"})]
    with _client(answers, asked) as client, pytest.raises(NoAnswer, match="is busy"):
        client.raw_job_result("j1")
    assert len(asked) == BUSY_RETRIES + 1


def test_a_busy_answer_to_a_submission_is_not_sent_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only reads are asked again: a POST answered 503 is reported at once."""
    monkeypatch.setattr(client_module.time, "sleep", lambda _s: pytest.fail("waited"))
    asked: list[str] = []
    answers = [httpx.Response(503, json=BUSY, headers={"Retry-After": "1"})]
    with _client(answers, asked) as client, pytest.raises(Exception, match="503"):
        client.upload_blob(b"x")
    assert asked == ["/v1/blobs"]


def test_a_503_without_retry_after_is_an_answer_not_a_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 503 that does not ask to be asked again (the coordinator's token file its operator
    must fix; a proxy's page) is reported at once, with its reason, not waited on."""
    monkeypatch.setattr(client_module.time, "sleep", lambda _s: pytest.fail("waited"))
    asked: list[str] = []
    unusable = {
        "error": "the coordinator's requester token file is unusable: its operator must fix it"
    }
    answers = [httpx.Response(503, json=unusable)]
    with _client(answers, asked) as client, pytest.raises(Exception, match="operator must fix"):
        client.jobs()
    assert asked == ["/v1/jobs"]
