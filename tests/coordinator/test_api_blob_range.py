"""GET /v1/blobs/{sha256} with a Range header: one range of bytes is served (206), and
every refusal is the API's JSON ``{"error": ...}``, not the file server's plain text."""

from __future__ import annotations

import httpx
import pytest

from tests.coordinator.conftest import Running

BLOB = b"0123456789" * 10  # 100 bytes


@pytest.mark.parametrize(
    ("asked", "served"),
    [("bytes=0-4", b"01234"), ("bytes=95-", b"56789"), ("bytes=-3", b"789"),
     ("bytes=98-1000", b"89"), ("BYTES=10-10", b"0")],
)  # fmt: skip
def test_one_range_is_served(coordinator: Running, asked: str, served: bytes) -> None:
    sha = coordinator.client.upload_blob(BLOB)["sha256"]
    r = httpx.get(f"{coordinator.url}/v1/blobs/{sha}", headers={"Range": asked})
    assert r.status_code == 206
    assert r.content == served


@pytest.mark.parametrize(
    ("asked", "status", "reason"),
    [
        ("bytes=5-1", 400, "the last byte comes before the first"),
        ("bytes=x", 400, "is not one range of bytes"),
        ("items=0-4", 400, "is not one range of bytes"),
        ("bytes=0-1,5-6", 400, "is not one range of bytes"),
        ("bytes=0-" + "9" * 30, 400, "up to 19 digits"),
        ("bytes=100-", 416, "lies outside the blob of 100 bytes"),
        ("bytes=-0", 416, "lies outside the blob of 100 bytes"),
    ],
)
def test_a_bad_range_is_refused_in_json(
    coordinator: Running, asked: str, status: int, reason: str
) -> None:
    sha = coordinator.client.upload_blob(BLOB)["sha256"]
    r = httpx.get(f"{coordinator.url}/v1/blobs/{sha}", headers={"Range": asked})
    assert r.status_code == status
    assert r.headers["content-type"] == "application/json"
    assert reason in r.json()["error"]
    if status == 416:
        assert r.headers["content-range"] == "bytes */100"


def test_no_range_serves_the_whole_blob(coordinator: Running) -> None:
    sha = coordinator.client.upload_blob(BLOB)["sha256"]
    r = httpx.get(f"{coordinator.url}/v1/blobs/{sha}")
    assert r.status_code == 200
    assert r.content == BLOB
