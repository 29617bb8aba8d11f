"""POST /v1/nodes is limited per client address (each verifies a manifest and may add a
row): over the limit, 429 with Retry-After, which the node daemon retries with backoff."""

from __future__ import annotations

import logging

import httpx
import pytest

from nodeclient.coordinator.config import CoordinatorConfig
from nodeclient.coordinator.service import AddressLimiter, client_key
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


@pytest.mark.parametrize("address", ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1", None])
def test_loopback_and_requests_without_a_peer_address_are_not_limited(
    address: str | None,
) -> None:
    """Loopback, also as a dual-stack socket reports it (IPv4-mapped), and a request with
    no peer address (a Unix socket) are never limited."""
    limiter = AddressLimiter(1)
    assert all(limiter.wait(address, 0.0) == 0.0 for _ in range(100))


def test_a_client_is_an_ipv4_address_or_an_ipv6_64() -> None:
    """One host commonly holds a whole IPv6 /64: its addresses share one bucket. An
    IPv4-mapped address is its IPv4 address; a peer name that is no address (a proxy's
    "unknown") is limited as a client of its own."""
    assert (
        client_key("2001:db8:1:2::1") == client_key("2001:db8:1:2:ffff::9") == ("2001:db8:1:2::/64")
    )
    assert client_key("2001:db8:1:3::1") == "2001:db8:1:3::/64"
    assert client_key("::ffff:203.0.113.9") == client_key(A) == A
    assert client_key("unknown") == "unknown"
    limiter = AddressLimiter(1)
    assert limiter.wait("2001:db8:1:2::1", 0.0) == 0.0
    assert limiter.wait("2001:db8:1:2::2", 0.0) > 0
    assert limiter.wait("::ffff:203.0.113.9", 0.0) == 0.0
    assert limiter.wait(A, 0.0) > 0
    assert limiter.wait("unknown", 0.0) == 0.0
    assert limiter.wait("unknown", 0.0) > 0


def test_zero_limits_nothing_and_a_negative_limit_is_refused() -> None:
    limiter = AddressLimiter(0)
    assert all(limiter.wait(A, 0.0) == 0.0 for _ in range(100))
    with pytest.raises(UsageError, match="registrations per minute"):
        CoordinatorConfig(registrations_per_minute=-1)


def test_the_buckets_held_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_ADDRESSES, the least recently used bucket goes: a client still being
    refused keeps its bucket (and stays refused) while idle ones go first."""
    monkeypatch.setattr(AddressLimiter, "MAX_ADDRESSES", 3)
    limiter = AddressLimiter(1)
    assert limiter.wait("192.0.2.1", 0.0) == 0.0
    assert limiter.wait("192.0.2.2", 1.0) == 0.0
    assert limiter.wait("192.0.2.3", 2.0) == 0.0
    assert limiter.wait("192.0.2.1", 3.0) > 0  # refused, and now the most recently used
    assert limiter.wait("192.0.2.4", 4.0) == 0.0  # .2 goes: the least recently used
    assert list(limiter._buckets) == ["192.0.2.3", "192.0.2.1", "192.0.2.4"]
    assert limiter.wait("192.0.2.1", 5.0) > 0  # still refused


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


@pytest.mark.parametrize(
    ("allowed", "peer", "trusted"),
    [
        (None, "127.0.0.1", True),
        (None, "::1", True),
        (None, "::ffff:127.0.0.1", True),  # loopback through a dual-stack socket (--host ::)
        (None, "192.0.2.1", False),
        ("192.0.2.1", "192.0.2.1", True),  # FORWARDED_ALLOW_IPS names the proxies instead
        ("192.0.2.1", "127.0.0.1", False),
    ],
)
def test_the_proxies_trusted_to_name_the_client(
    monkeypatch: pytest.MonkeyPatch, allowed: str | None, peer: str, trusted: bool
) -> None:
    """The client a request counts against comes from X-Forwarded-For only when a proxy
    the server trusts sent it (uvicorn's own middleware, as the server loads it): loopback
    however the socket reports it, or the proxies FORWARDED_ALLOW_IPS names."""
    import asyncio

    from fastapi import FastAPI
    from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

    from nodeclient.coordinator.server import build_server

    if allowed is None:
        monkeypatch.delenv("FORWARDED_ALLOW_IPS", raising=False)
    else:
        monkeypatch.setenv("FORWARDED_ALLOW_IPS", allowed)
    config = build_server(FastAPI(), host="::", port=0).config
    seen: list[str] = []

    async def app(scope: dict[str, object], _receive: object, _send: object) -> None:
        seen.append(scope["client"][0])  # type: ignore[index]

    middleware = ProxyHeadersMiddleware(app, trusted_hosts=config.forwarded_allow_ips)  # type: ignore[arg-type]
    scope = {"type": "http", "scheme": "http", "client": (peer, 40000),
             "headers": [(b"x-forwarded-for", A.encode())]}  # fmt: skip
    asyncio.run(middleware(scope, None, None))  # type: ignore[arg-type]
    assert seen == [A if trusted else peer]
