"""A plain HTTP request for the link, as a reverse proxy sends one when it drops the
Upgrade header: 426 with what the proxy must pass, not a 404 that reads as a wrong URL."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from nodeclient.coordinator.app import LINK_NEEDS_UPGRADE
from tests.coordinator.conftest import Running


def test_a_get_of_the_link_without_upgrade_is_426(
    start_coordinator: Callable[..., Running],
) -> None:
    running = start_coordinator()
    r = httpx.get(running.url + "/v1/link")
    assert r.status_code == 426
    assert r.json() == {"error": LINK_NEEDS_UPGRADE}
    assert "must pass the Upgrade and Connection headers" in LINK_NEEDS_UPGRADE
    assert r.headers["upgrade"] == "websocket"
    other = httpx.post(running.url + "/v1/link")  # a method the link never takes
    assert other.status_code == 405 and other.headers["allow"] == "GET"
