"""The requester's client and CLI reach a coordinator as the node does (nodeclient.tlstrust):
they trust a private CA named in NODECLIENT_CA_FILE, and a refused certificate, a redirect
and a plain http:// URL to another host are each said in one line with what to do. The
next page of GET /v1/jobs is a query-only reference, so it stays under the path prefix of
a reverse proxy in front of the coordinator.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from nodeclient import tlstrust
from nodeclient.coordinator import cli
from nodeclient.coordinator.client import CoordinatorClient, Unreachable
from nodeclient.errors import RemoteProtocolError
from tests.coordinator.conftest import Running, inference_payload
from tests.http_server import serving
from tests.test_tlstrust import MovedToHttps, Pki, clear_trust_env, make_pki, serving_tls


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(autouse=True)
def _no_cert_env(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_trust_env(monkeypatch)
    monkeypatch.delenv(cli.TOKEN_ENV, raising=False)


def test_the_client_trusts_the_ca_file_and_a_refusal_says_what_to_do(
    pki: Pki, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """httpx's own trust (certifi) refused a coordinator whose CA the node's link trusted;
    the requester now trusts what every nodeclient client trusts, the CA file included."""
    with serving_tls(pki) as url:
        with CoordinatorClient(url) as client, pytest.raises(Unreachable) as refused:
            client.health()
        capsys.readouterr()
        assert cli.main(["jobs", "--coordinator", url]) == 2
        said = capsys.readouterr().err
        monkeypatch.setenv(tlstrust.CA_FILE_ENV, str(pki.ca))
        with CoordinatorClient(url) as client:
            assert client.health() == {"status": "ok"}
        assert cli.main(["jobs", "--coordinator", url]) == 0
    assert str(refused.value).endswith(f"; fix: {tlstrust.TRUST_FIX}")
    assert "CERTIFICATE_VERIFY_FAILED" in str(refused.value)
    assert said.count("\n") == 1 and said.endswith(f"fix: {tlstrust.TRUST_FIX}\n")


def test_a_redirect_to_https_says_which_url_to_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    payload = tmp_path / "req.bin"
    payload.write_bytes(b"x")
    with serving(MovedToHttps) as url:
        with CoordinatorClient(url) as client, pytest.raises(RemoteProtocolError) as moved:
            client.jobs(page=2)
        capsys.readouterr()
        args = ["submit", "--coordinator", url, "--class", "ai.inference", "--payload"]
        assert cli.main([*args, str(payload)]) == 1
        said = capsys.readouterr().err
    assert str(moved.value) == (
        "coordinator: GET /v1/jobs?limit=2: 301 redirected to "
        "https://coordinator.example/v1/jobs?limit=2: nodeclient follows no redirects; use "
        "https://coordinator.example as the coordinator URL"
    )
    assert said.count("\n") == 1
    assert "use https://coordinator.example as the coordinator URL" in said


def _answered_locally(
    monkeypatch: pytest.MonkeyPatch, handler: Callable[[httpx.Request], httpx.Response]
) -> None:
    """The CLI's client answers with *handler*: nothing leaves the machine."""
    transport = httpx.MockTransport(handler)
    monkeypatch.setattr(
        cli,
        "CoordinatorClient",
        lambda url, **kw: CoordinatorClient(url, transport=transport, **kw),
    )


def test_a_token_sent_over_plain_http_to_another_host_is_warned_about_once(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The token (and the payloads and results) would travel in cleartext, and the answers
    could be forged: said once, before anything is sent; not for a loopback or https://
    coordinator."""
    _answered_locally(monkeypatch, lambda _request: httpx.Response(200, json=[]))
    monkeypatch.setenv(cli.TOKEN_ENV, "a-requester-token")
    capsys.readouterr()
    assert cli.main(["jobs", "--coordinator", "http://192.0.2.1:8000"]) == 0
    warned = capsys.readouterr().err
    assert cli.main(["jobs", "--coordinator", "http://127.0.0.1:8000"]) == 0
    assert cli.main(["jobs", "--coordinator", "https://192.0.2.1:8443"]) == 0
    assert capsys.readouterr().err == ""
    assert warned.count("\n") == 1
    assert warned.startswith(
        "nodeclient-coordinator: warning: the coordinator URL http://192.0.2.1:8000 is plain "
    )
    assert "tokens travel in cleartext" in warned and "use an https:// URL" in warned


# --- GET /v1/jobs pages behind a proxy that adds a path prefix --------------------------------


def test_the_next_page_stays_under_a_proxy_path_prefix(coordinator: Running) -> None:
    """The coordinator sees /v1/jobs; behind a proxy serving it at /coord/ the requester
    asks for /coord/v1/jobs. A proxy that says its prefix (X-Forwarded-Prefix) gets a
    next-page Link under it, which any client resolves; without one the Link is
    /v1/jobs?..., the form older clients follow (a relative one would stop their paging
    at the first page), and a prefix of another form is ignored."""
    for _ in range(5):
        coordinator.client.submit_job("ai.inference", inference_payload([1.0]))
    every = coordinator.client.jobs()
    asked: list[str] = []

    def proxy(request: httpx.Request) -> httpx.Response:
        path = request.url.raw_path.decode()
        asked.append(path)
        if not path.startswith("/coord/"):
            return httpx.Response(404, text="not under /coord/")
        upstream = httpx.get(
            coordinator.url + path.removeprefix("/coord"),
            headers={"X-Forwarded-Prefix": "/coord"},
        )
        kept = {k: v for k, v in upstream.headers.items() if k in ("content-type", "link")}
        return httpx.Response(upstream.status_code, headers=kept, content=upstream.content)

    transport = httpx.MockTransport(proxy)
    with httpx.Client(transport=transport) as browser:
        first = browser.get("http://proxy.test/coord/v1/jobs?limit=2")
        nxt = first.links["next"]["url"]
        assert nxt.startswith("/coord/v1/jobs?limit=2&after=")
        second = browser.get(first.url.join(nxt))  # as any client resolves a reference
    assert second.status_code == 200
    assert [j["job_id"] for j in second.json()] == [j["job_id"] for j in every[2:4]]
    with CoordinatorClient("http://proxy.test/coord", transport=transport) as client:
        assert client.jobs(page=2) == every
    assert all(path.startswith("/coord/v1/jobs") for path in asked), asked
    direct = httpx.get(coordinator.url + "/v1/jobs", params={"limit": 2})
    assert direct.links["next"]["url"].startswith("/v1/jobs?limit=2&after=")
    for odd in ("coord", "/co ord", "/coord\\x", "/" + "c" * 300):
        odd_answer = httpx.get(
            coordinator.url + "/v1/jobs", params={"limit": 2}, headers={"X-Forwarded-Prefix": odd}
        )
        assert odd_answer.links["next"]["url"].startswith("/v1/jobs?limit=2&after="), odd


def test_the_client_still_follows_the_path_form_of_older_coordinators() -> None:
    """An older coordinator's ``</v1/jobs?...>`` is followed under the client's base URL;
    a Link elsewhere is not followed."""
    pages = {
        "": ("</v1/jobs?limit=1&after=a>", "a"),
        "a": ("<https://elsewhere.example/v1/jobs?after=b>", "b"),
    }
    asked: list[str] = []

    def old(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.raw_path.decode())
        link, job = pages[request.url.params.get("after", "")]
        job_id = str(uuid.uuid5(uuid.NAMESPACE_URL, job))  # job ids are UUIDs
        body = [{"job_id": job_id, "workload_class": "ai.inference", "status": "queued"}]
        return httpx.Response(200, json=body, headers={"link": f'{link}; rel="next"'})

    with CoordinatorClient("http://old.test/coord", transport=httpx.MockTransport(old)) as client:
        listed = client.jobs(page=1)
    assert [j["job_id"] for j in listed] == [str(uuid.uuid5(uuid.NAMESPACE_URL, j)) for j in "ab"]
    assert asked == ["/coord/v1/jobs?limit=1", "/coord/v1/jobs?limit=1&after=a"]
