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


def test_a_blobs_etag_is_its_hash_and_if_range_resumes_a_download(coordinator: Running) -> None:
    """Each fetch dates the blob's file as used (retention): its validators must not
    move with it. The ETag is the quoted hash on every fetch, no Last-Modified is sent,
    and a Range with a matching If-Range is served (206); with another If-Range the
    whole blob is (200), even for a range outside it (RFC 9110: the Range is ignored)."""
    sha = coordinator.client.upload_blob(BLOB)["sha256"]
    url = f"{coordinator.url}/v1/blobs/{sha}"
    first = httpx.get(url)
    coordinator.clock.advance(5)
    second = httpx.head(url)
    assert first.headers["etag"] == second.headers["etag"] == f'"{sha}"'
    assert "last-modified" not in first.headers and "last-modified" not in second.headers
    assert "immutable" in first.headers["cache-control"]
    coordinator.clock.advance(5)
    resumed = httpx.get(url, headers={"Range": "bytes=95-", "If-Range": f'"{sha}"'})
    assert (resumed.status_code, resumed.content) == (206, b"56789")
    for asked in ("bytes=95-", "bytes=5000-"):
        whole = httpx.get(url, headers={"Range": asked, "If-Range": '"another"'})
        assert (whole.status_code, whole.content) == (200, BLOB)
