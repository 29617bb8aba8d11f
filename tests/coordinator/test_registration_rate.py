"""POST /v1/nodes is limited per client address (each verifies a manifest and may add a
row): over the limit, 429 with Retry-After, which the node daemon retries with backoff."""

from __future__ import annotations

import logging

import httpx
import pytest

from nodeclient.coordinator.config import CoordinatorConfig
from nodeclient.coordinator.service import AddressLimiter
from nodeclient.errors import UsageError
from tests.coordinator.conftest import START, make_node

A, B = "203.0.113.9", "198.51.100.7"  # documentation addresses, as a proxy names clients


def test_an_address_gets_a_minutes_worth_then_one_per_interval() -> None:
    limiter = AddressLimiter(3)
    assert [limiter.wait(A, 100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.wait(A, 100.0) == pytest.approx(20.0)  # 3 a minute: one each 20 s
    assert limiter.wait(B, 100.0) == 0.0  # each address its own bucket
    assert limiter.wait(A, 110.0) == pytest.approx(10.0)
    assert limiter.wait(A, 120.0) == 0.0
    assert limiter.wait(A, 120.0) > 0


@pytest.mark.parametrize("address", ["127.0.0.1", "127.8.9.10", "::1", "testclient", None])
def test_loopback_and_peers_without_an_ip_address_are_not_limited(address: str | None) -> None:
    limiter = AddressLimiter(1)
    assert all(limiter.wait(address, 0.0) == 0.0 for _ in range(100))


def test_zero_limits_nothing_and_a_negative_limit_is_refused() -> None:
    limiter = AddressLimiter(0)
    assert all(limiter.wait(A, 0.0) == 0.0 for _ in range(100))
    with pytest.raises(UsageError, match="registrations per minute"):
        CoordinatorConfig(registrations_per_minute=-1)


def test_the_buckets_held_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_ADDRESSES, buckets refilled to full go first, then the oldest: an address
    that is still limited stays limited while there is room."""
    monkeypatch.setattr(AddressLimiter, "MAX_ADDRESSES", 3)
    limiter = AddressLimiter(1)
    assert limiter.wait("192.0.2.1", 0.0) == 0.0  # drained; full again at 60 s
    assert limiter.wait("192.0.2.2", 50.0) == 0.0  # drained
    assert limiter.wait("192.0.2.3", 50.0) == 0.0
    assert limiter.wait("192.0.2.4", 70.0) == 0.0  # .1 is full again: it goes
    assert set(limiter._buckets) == {"192.0.2.2", "192.0.2.3", "192.0.2.4"}
    assert limiter.wait("192.0.2.2", 70.0) > 0  # still limited
    assert limiter.wait("192.0.2.5", 70.0) == 0.0  # none full: the oldest (.2) goes
    assert set(limiter._buckets) == {"192.0.2.3", "192.0.2.4", "192.0.2.5"}


def test_refusals_are_reported_one_line_a_minute_at_most() -> None:
    limiter = AddressLimiter(1)
    assert [limiter.refused(t) for t in (0.0, 1.0, 2.0, 59.0)] == [1, 0, 0, 0]
    assert limiter.refused(60.0) == 4  # the three held back, and this one


def test_a_client_over_the_limit_is_answered_429_with_retry_after(
    start_coordinator, rsa_keys, caplog: pytest.LogCaptureFixture
) -> None:
    """Behind a reverse proxy on this machine (X-Forwarded-For, which the coordinator
    takes from a loopback peer), each client has its own limit; the proxy's own
    requests, from loopback, have none. Every request counts, a refused manifest too."""
    running = start_coordinator(registrations_per_minute=2)
    url = running.url + "/v1/nodes"

    def post(body: object, client: str | None = None) -> httpx.Response:
        headers = {"X-Forwarded-For": client} if client else {}
        return httpx.post(url, json=body, headers=headers)

    with caplog.at_level(logging.WARNING, logger="nodeclient.coordinator.api"):
        assert [post({}, A).status_code for _ in range(2)] == [400, 400]
        limited = post({}, A)
        assert limited.status_code == 429
        assert limited.headers["Retry-After"] == "30"
        assert limited.json() == {
            "error": f"too many registrations from {A}: at most 2 a minute from one address; "
            "retry after 30 s"
        }
        node = make_node(rsa_keys, 0)
        assert post(node.manifest(issued_at=int(START)), A).status_code == 429
        assert post({}, B).status_code == 400
        assert all(post({}).status_code == 400 for _ in range(5))
        running.clock.advance(30.0)
        assert post(node.manifest(issued_at=int(START)), A).status_code == 201
    lines = [r for r in caplog.records if r.getMessage() == "registration.limited"]
    assert [(r.address, r.refused, r.per_minute) for r in lines] == [(A, 1, 2)]  # type: ignore[attr-defined]
