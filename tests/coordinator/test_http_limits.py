"""The HTTP layer's guards: body limits before parsing, disk work off the event loop, and
the JSON error body for what no route answers itself (500, and 507 for a full disk)."""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pybase64
import pytest
from sqlalchemy import event

from nodeclient.coordinator import store
from nodeclient.coordinator.api import JSON_BODY_LIMIT, body_limit
from nodeclient.coordinator.config import CoordinatorConfig
from tests.coordinator.conftest import RECV_TIMEOUT, Running, inference_payload

JSON = {"content-type": "application/json"}


def test_a_declared_body_over_the_bound_is_a_413_before_it_is_parsed(start_coordinator) -> None:
    """A job body longer than the payload limit allows is refused by its Content-Length
    (413, the JSON error), not decoded and then found invalid (400)."""
    running = start_coordinator(max_payload_bytes=1000)
    limit = body_limit(running.config, "/v1/jobs")
    body = json.dumps({"workload_class": "ai.inference", "payload": "!" * (limit + 1)})
    r = httpx.post(running.url + "/v1/jobs", content=body, headers=JSON)
    assert r.status_code == 413, r.text
    assert r.json() == {
        "error": f"request body exceeds the {limit}-byte limit of /v1/jobs: a job's payload "
        "may be at most 1000 bytes; upload a large model or scene to the blob store first "
        "(POST /v1/blobs) and name it in the payload by its URL (model_url, scene_url) or, "
        "for a scene's files, in its asset manifest (assets); an ai.training payload has no "
        "such form and must fit the limit"
    }
    assert r.headers["connection"] == "close"
    assert running.client.jobs() == []


def test_a_registration_body_is_bounded_to_64_kib(coordinator: Running) -> None:
    """A manifest is a few KiB: a 100 KiB body to /v1/nodes is 413, not read as JSON."""
    body = json.dumps({"padding": "x" * 100_000})
    r = httpx.post(coordinator.url + "/v1/nodes", content=body, headers=JSON)
    assert r.status_code == 413, r.text
    assert "65536-byte limit of /v1/nodes" in r.json()["error"]


def test_a_chunked_body_is_counted_and_refused_while_it_arrives(coordinator: Running) -> None:
    """Without a Content-Length the body is counted as it comes: refused once past the
    bound, long before the 50 MiB the client meant to send were read."""
    sent = 0
    total = 50 * 1024 * 1024

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        while sent < total:
            sent += 65536
            yield b"[" * 65536

    r = httpx.post(coordinator.url + "/v1/nodes", content=chunks(), headers=JSON)
    assert "content-length" not in r.request.headers
    assert r.status_code == 413, r.text
    assert r.json()["error"] == "request body exceeds the 65536-byte limit of /v1/nodes"
    assert sent < total // 2
    assert coordinator.client.health()["status"] == "ok"


def test_a_job_of_the_largest_payload_fits_the_bound() -> None:
    """The bound of /v1/jobs holds a payload at the limit, from an encoder that escapes
    "/" and pretty-prints; every other JSON route is held to 64 KiB, blobs by their own
    route."""
    config = CoordinatorConfig(max_payload_bytes=3 * 1024 * 1024)
    payload = pybase64.b64encode_as_string(os.urandom(config.max_payload_bytes))
    body = json.dumps(
        {"workload_class": "media.render", "payload": payload, "min_tier": 4,
         "region": "r" * 32, "slices": 4096},
        indent=8,
    ).replace("/", "\\/")  # fmt: skip
    assert len(body) <= body_limit(config, "/v1/jobs")
    assert body_limit(config, "/v1/nodes") == JSON_BODY_LIMIT
    assert body_limit(config, "/v1/nodes/0xabc/unstake") == JSON_BODY_LIMIT
    assert body_limit(config, "/v1/blobs") is None


def test_a_job_within_the_bound_is_still_accepted(coordinator: Running) -> None:
    """The guard refuses only what is over: an ordinary job goes through."""
    job = coordinator.client.submit_job("ai.inference", inference_payload([1.0]))
    assert job["status"] == "queued"


def test_an_upload_publishes_off_the_event_loop(
    coordinator: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While an upload's fsync and rename are stuck on a slow disk the coordinator keeps
    answering: /healthz replies before the upload ends."""
    started, release = threading.Event(), threading.Event()
    blobs = coordinator.coord.blobs
    publish = blobs.publish

    def slow_publish(tmp: str, sha256: str) -> None:
        started.set()
        release.wait(timeout=RECV_TIMEOUT)
        publish(tmp, sha256)

    monkeypatch.setattr(blobs, "publish", slow_publish)
    replies: list[httpx.Response] = []
    url = coordinator.url + "/v1/blobs"
    body = b"x" * 3_000_000
    upload = threading.Thread(
        target=lambda: replies.append(httpx.post(url, content=body, timeout=2 * RECV_TIMEOUT))
    )
    upload.start()
    try:
        assert started.wait(timeout=RECV_TIMEOUT)
        health = httpx.get(coordinator.url + "/healthz", timeout=RECV_TIMEOUT / 2)
        assert health.status_code == 200
        assert not replies  # the upload is still publishing
    finally:
        release.set()
        upload.join(timeout=2 * RECV_TIMEOUT)
    assert replies[0].status_code == 201, replies[0].text
    assert replies[0].json()["size"] == 3_000_000
    assert [p.name for p in coordinator.config.blob_dir.iterdir()] == [replies[0].json()["sha256"]]


def _no_space(*_args: Any, **_kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_during_an_upload_is_a_507(
    coordinator: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC while storing a blob: 507 saying the coordinator's disk is full, and the
    temporary file is gone."""
    monkeypatch.setattr(coordinator.coord.blobs, "publish", _no_space)
    r = httpx.post(coordinator.url + "/v1/blobs", content=b"blob bytes")
    assert r.status_code == 507, r.text
    assert "the coordinator's disk is full" in r.json()["error"]
    assert list(coordinator.config.blob_dir.iterdir()) == []


def test_an_unexpected_error_is_a_logged_json_500(
    coordinator: Running, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in a route answers the documented {"error": ...} with 500, and is logged as
    one structured event naming the request."""

    def broken(_session: Any, **_query: Any) -> list[dict[str, Any]]:
        raise RuntimeError("a bug")

    monkeypatch.setattr(store, "list_jobs", broken)
    with caplog.at_level(logging.ERROR, logger="nodeclient.coordinator"):
        r = httpx.get(coordinator.url + "/v1/jobs")
    assert r.status_code == 500
    assert r.json() == {
        "error": "internal error in the coordinator: logged as http.unexpected_error"
    }
    [record] = [rec for rec in caplog.records if rec.getMessage() == "http.unexpected_error"]
    assert (record.method, record.path, record.error) == ("GET", "/v1/jobs", "RuntimeError: a bug")


def test_a_full_disk_anywhere_is_a_507(
    coordinator: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC that a route does not handle itself is 507 too, not a 500."""
    monkeypatch.setattr(store, "list_jobs", _no_space)
    r = httpx.get(coordinator.url + "/v1/jobs")
    assert r.status_code == 507
    assert "the coordinator's disk is full" in r.json()["error"]


def test_a_full_database_is_a_507_too(start_coordinator) -> None:
    """SQLite's own "database or disk is full" (SQLITE_FULL, here from a page cap, as a
    filled disk gives it) is the documented 507, not a 500; once there is room again,
    the same request succeeds."""
    running = start_coordinator(db_url=None)  # SQLite's error, whatever the suite runs on
    engine = running.coord.db.engine
    cap: list[int] = []

    @event.listens_for(engine, "connect")
    def _capped(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        pages = cursor.execute("PRAGMA page_count").fetchone()[0]
        cursor.execute(f"PRAGMA max_page_count = {cap[0] if cap else pages}")
        cursor.close()

    engine.dispose()  # the pool's connections are made again, capped
    payload = pybase64.b64encode(inference_payload([1.0] * 50_000)).decode()
    job = {"workload_class": "ai.inference", "payload": payload}
    r = httpx.post(running.url + "/v1/jobs", json=job, timeout=RECV_TIMEOUT)
    assert r.status_code == 507, r.text
    assert "the coordinator's disk is full" in r.json()["error"]
    cap.append(1 << 30)  # room again
    engine.dispose()
    r = httpx.post(running.url + "/v1/jobs", json=job, timeout=RECV_TIMEOUT)
    assert r.status_code == 201, r.text


@pytest.mark.parametrize(
    "path",
    ["/v1/jobs/%00", "/v1/jobs/%00/result", "/v1/tasks/%00/result", "/v1/jobs/not-a-uuid",
     "/v1/jobs/" + "a" * 5000],
)  # fmt: skip
def test_an_id_that_is_no_uuid_is_a_404_on_any_database(coordinator: Running, path: str) -> None:
    """A NUL in a path id reached PostgreSQL, which refuses NUL in text with an error: a
    500. An id that is no UUID is now a 404 without a query (the suite runs on both)."""
    r = httpx.get(coordinator.url + path)
    assert r.status_code == 404, r.text


def test_a_region_or_cursor_with_a_control_character_is_a_400(coordinator: Running) -> None:
    body = {"workload_class": "ai.inference", "payload": "", "region": "eu\x00west"}
    r = httpx.post(coordinator.url + "/v1/jobs", json=body)
    assert r.status_code == 400 and "region" in r.json()["error"], r.text
    r = httpx.get(coordinator.url + "/v1/jobs", params={"after": "1.0,a\x00b"})
    assert r.status_code == 400, r.text
    assert coordinator.client.health()["status"] == "ok"


def test_an_upload_abandoned_by_its_client_is_no_coordinator_error(
    coordinator: Running, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that goes away in the middle of a blob upload: the temporary file goes,
    and the log says `blobs.upload_abandoned` at info, not a 500's traceback."""
    import socket
    import time
    from urllib.parse import urlsplit

    url = urlsplit(coordinator.url)
    with caplog.at_level(logging.INFO, logger="nodeclient.coordinator"):
        with socket.create_connection((url.hostname, url.port), timeout=RECV_TIMEOUT) as sock:
            sock.sendall(
                b"POST /v1/blobs HTTP/1.1\r\nHost: c\r\nContent-Length: 5000000\r\n"
                b"Content-Type: application/octet-stream\r\n\r\n" + b"\0" * 2_000_000
            )
        deadline = time.monotonic() + RECV_TIMEOUT
        while time.monotonic() < deadline and not any(
            rec.getMessage() == "blobs.upload_abandoned" for rec in caplog.records
        ):
            time.sleep(0.05)
    [record] = [rec for rec in caplog.records if rec.getMessage() == "blobs.upload_abandoned"]
    assert record.levelno == logging.INFO and 0 < record.received <= 2_000_000
    assert not [rec for rec in caplog.records if rec.getMessage() == "http.unexpected_error"]
    assert list(coordinator.config.blob_dir.iterdir()) == []


def test_a_payload_over_the_limit_says_what_to_do_instead(start_coordinator) -> None:
    """A payload over max_payload_bytes, in a body within its bound: 413 naming the limit
    and the blob store, where a large model or scene goes."""
    running = start_coordinator(max_payload_bytes=999)
    body = {"workload_class": "ai.inference", "payload": pybase64.b64encode(b"x" * 1000).decode()}
    r = httpx.post(running.url + "/v1/jobs", json=body)
    assert r.status_code == 413, r.text
    assert r.json()["error"] == (
        "payload exceeds the 999-byte limit; upload a large model or scene to the blob store "
        "first (POST /v1/blobs) and name it in the payload by its URL (model_url, scene_url) or, "
        "for a scene's files, in its asset manifest (assets); an ai.training payload has no "
        "such form and must fit the limit"
    )
