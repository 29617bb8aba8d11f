"""The node reaches a coordinator over TLS with one trust store (nodeclient.tlstrust):
registration, the link, input fetches, ``doctor`` and ``unstake`` all trust a private CA
named in NODECLIENT_CA_FILE, and all refuse the coordinator without it, saying what to
do. A redirect is named as one, and a plain http:// URL to another host is warned about.

The coordinator is a real HTTPS (or WSS) server on loopback whose certificate a throwaway
CA signed; SSL_CERT_FILE and SSL_CERT_DIR are unset, so that only what the test names is
trusted.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.server import ServerConnection, serve

from nodeclient import tlstrust
from nodeclient.errors import RemoteProtocolError
from nodeclient.node import doctor, inputs
from nodeclient.node import link as link_module
from nodeclient.node.cli import main
from nodeclient.node.daemon import NodeDaemon
from tests.http_server import serving
from tests.node.test_daemon_link import Events, capturing, make_daemon
from tests.test_tlstrust import MovedToHttps, Pki, clear_trust_env, make_pki, serving_tls

WALLET = "0x1111111111111111111111111111111111111111"
BLOB = "/v1/blobs/" + "ab" * 32


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(autouse=True)
def _no_cert_env(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_trust_env(monkeypatch)


@pytest.fixture
def events() -> Iterator[Events]:
    handler = Events()
    with capturing("nodeclient.node", handler):
        yield handler


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    assert main(["init", "--home", str(h), "--wallet", WALLET]) == 0
    return h


def _daemon(directory: Path, url: str) -> NodeDaemon:
    directory.mkdir(parents=True, exist_ok=True)
    return make_daemon(directory, url=url)


def _stop_after_the_first_failure(monkeypatch: pytest.MonkeyPatch, daemon: NodeDaemon) -> None:
    """The link loop's backoff stops the daemon at its first wait: one try, then the end."""

    def backoff(*, rand: object) -> Iterator[float]:
        daemon.request_stop()
        while True:
            yield 0.0

    monkeypatch.setattr(link_module, "backoff", lambda *, rand: backoff(rand=rand))


# --- one trust store: the CA file is trusted everywhere, and its absence explained ------------


def test_registration_trusts_the_ca_file_and_a_refusal_says_what_to_do(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch, events: Events
) -> None:
    """Registration used httpx's own trust (certifi): a CA installed for the link was not
    trusted there. Now the CA file is; without it the link loop's error and log name the
    fix."""
    with serving_tls(pki) as url:
        refused = _daemon(tmp_path / "refused", url)
        _stop_after_the_first_failure(monkeypatch, refused)
        try:
            asyncio.run(asyncio.wait_for(refused._link_loop(), 30))
        finally:
            refused.outbox.close()
        monkeypatch.setenv(tlstrust.CA_FILE_ENV, str(pki.ca))
        trusted = _daemon(tmp_path / "trusted", url)
        try:
            body = asyncio.run(trusted.register())
        finally:
            trusted.outbox.close()
    assert body["coordinator_id"] == "c-tls"
    assert "CERTIFICATE_VERIFY_FAILED" in refused.link.last_error
    assert refused.link.last_error.endswith(f"; fix: {tlstrust.TRUST_FIX}")
    (record,) = events.named("link.error")
    assert record.__dict__["fix"] == tlstrust.TRUST_FIX
    assert "CERTIFICATE_VERIFY_FAILED" in record.__dict__["error"]


def test_the_link_trusts_the_ca_file(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The link (wss://) verifies with the same context: with the CA file the TLS handshake
    succeeds (the test's coordinator then sends no challenge), without it the certificate
    is refused, with the fix."""

    async def no_challenge(ws: ServerConnection) -> None:
        await ws.send("not a challenge")
        await ws.wait_closed()

    async def connect_once(daemon: NodeDaemon) -> BaseException:
        async with serve(no_challenge, "127.0.0.1", 0, ssl=pki.server_context()) as server:
            port = server.sockets[0].getsockname()[1]
            daemon.url = f"https://127.0.0.1:{port}"
            try:
                await asyncio.wait_for(daemon._connect_once(), 10)
            except Exception as exc:  # what it was is the test
                return exc
            raise AssertionError("the link went up without a challenge")

    daemon = _daemon(tmp_path, "https://127.0.0.1:9")
    try:
        refused = asyncio.run(connect_once(daemon))
        monkeypatch.setenv(tlstrust.CA_FILE_ENV, str(pki.ca))
        passed = asyncio.run(connect_once(daemon))
    finally:
        daemon.outbox.close()
    assert isinstance(refused, ssl.SSLCertVerificationError), refused
    assert tlstrust.trust_fix(refused) == tlstrust.TRUST_FIX
    assert isinstance(passed, RemoteProtocolError), passed  # past TLS, at the first frame


def test_input_fetches_trust_the_ca_file(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    """A blob from the coordinator's store is fetched with the same trust as the link."""
    with serving_tls(pki) as url:
        with pytest.raises(RemoteProtocolError, match="CERTIFICATE_VERIFY_FAILED"):
            inputs.http_fetcher(url)(BLOB)
        monkeypatch.setenv(tlstrust.CA_FILE_ENV, str(pki.ca))
        assert inputs.http_fetcher(url)(BLOB) == b"the blob's bytes"


def test_doctor_trusts_the_ca_file_and_a_refusal_says_what_to_do(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    with serving_tls(pki) as url:
        (refused,) = doctor.check_coordinator(url)
        monkeypatch.setenv(tlstrust.CA_FILE_ENV, str(pki.ca))
        reach, _clock = doctor.check_coordinator(url)
    assert refused.level is doctor.Level.FAIL and "CERTIFICATE_VERIFY_FAILED" in refused.summary
    assert refused.fix == tlstrust.TRUST_FIX
    assert reach.level is doctor.Level.OK, reach


def test_doctor_reports_a_ca_file_that_cannot_be_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(tlstrust.CA_FILE_ENV, str(tmp_path / "missing.pem"))
    (check,) = doctor.check_coordinator("https://127.0.0.1:9")
    assert check.level is doctor.Level.FAIL and "cannot load it" in check.summary


def test_the_daemon_refuses_at_start_a_ca_file_that_cannot_be_read(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """One line before anything starts, not a registration retried for ever (the start
    would stop at the bad heartbeat interval next)."""
    monkeypatch.setenv(tlstrust.CA_FILE_ENV, str(tmp_path / "missing.pem"))
    capsys.readouterr()
    args = ["run", "--home", str(home), "--coordinator", "https://127.0.0.1:9"]
    assert main([*args, "--heartbeat-interval", "0"]) == 2
    err = capsys.readouterr().err
    # the plain line; the JSON log's daemon.fatal event says the same
    (line,) = [ln for ln in err.splitlines() if not ln.startswith("{")]
    assert line.startswith(
        f"nodeclient: error: {tlstrust.CA_FILE_ENV}={tmp_path / 'missing.pem'}: "
    )
    assert json.loads(err.splitlines()[0])["event"] == "daemon.fatal"


def test_unstake_trusts_the_ca_file_and_a_refusal_says_what_to_do(
    home: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with serving_tls(pki) as url:
        capsys.readouterr()
        assert main(["unstake", "--home", str(home), "--coordinator", url]) == 2
        refused = capsys.readouterr().err
        monkeypatch.setenv(tlstrust.CA_FILE_ENV, str(pki.ca))
        assert main(["unstake", "--home", str(home), "--coordinator", url]) == 2
        answered = capsys.readouterr().err
    assert refused.count("\n") == 1 and f"fix: {tlstrust.TRUST_FIX}" in refused
    assert "unstake refused (404)" in answered  # the test's coordinator knows no unstake


# --- redirects -----------------------------------------------------------------------------


def test_a_registration_redirected_to_https_says_which_url_to_use(tmp_path: Path) -> None:
    with serving(MovedToHttps) as url:
        daemon = _daemon(tmp_path, url)
        try:
            with pytest.raises(httpx.HTTPError) as failed:
                asyncio.run(daemon.register())
        finally:
            daemon.outbox.close()
    assert str(failed.value) == (
        "registration failed (301): redirected to https://coordinator.example/v1/nodes: "
        "nodeclient follows no redirects; use https://coordinator.example as the "
        "coordinator URL"
    )


def test_doctor_says_which_url_to_use_when_redirected() -> None:
    with serving(MovedToHttps) as url:
        (check,) = doctor.check_coordinator(url)
    assert check.level is doctor.Level.FAIL
    assert check.summary == (
        f"{url}/healthz answered HTTP 301: redirected to https://coordinator.example/healthz"
    )
    assert check.fix == (
        "nodeclient follows no redirects; use https://coordinator.example as the coordinator URL"
    )


# --- plain http:// to another host -----------------------------------------------------------


def _answered_locally(monkeypatch: pytest.MonkeyPatch, answer: httpx.Response) -> None:
    """Every ``httpx.Client`` made from here answers *answer*: nothing leaves the machine."""
    real_client = httpx.Client
    transport = httpx.MockTransport(lambda _request: answer)
    monkeypatch.setattr(httpx, "Client", lambda **kw: real_client(**{**kw, "transport": transport}))


def test_doctor_warns_about_plain_http_to_another_host(monkeypatch: pytest.MonkeyPatch) -> None:
    _answered_locally(monkeypatch, httpx.Response(200, json={"status": "ok"}))
    tls, reach, _clock = doctor.check_coordinator("http://192.0.2.1:8000")
    assert tls.name == "tls" and tls.level is doctor.Level.WARN
    assert "http://192.0.2.1:8000" in tls.summary and "cleartext" in tls.summary
    assert reach.level is doctor.Level.OK


def test_the_daemon_warns_at_start_about_plain_http_to_another_host(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Logged once at start, before anything is sent (here the start stops at the bad
    heartbeat interval that follows); a loopback coordinator is not warned about."""
    events = {}
    for url in ("http://192.0.2.1:8000", "http://127.0.0.1:9"):
        capsys.readouterr()
        args = ["run", "--home", str(home), "--coordinator", url, "--heartbeat-interval", "0"]
        assert main(args) == 2
        lines = capsys.readouterr().err.splitlines()
        events[url] = [json.loads(line) for line in lines if line.startswith("{")]
    (warned,) = [e for e in events["http://192.0.2.1:8000"] if e["event"] == "link.cleartext"]
    assert warned["level"] == "warning" and "cleartext" in warned["hint"]
    assert not [e for e in events["http://127.0.0.1:9"] if e["event"] == "link.cleartext"]


def test_unstake_warns_about_plain_http_to_another_host(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _answered_locally(monkeypatch, httpx.Response(200, json={"unstaking_until": 4_000_000_000}))
    capsys.readouterr()
    assert main(["unstake", "--home", str(home), "--coordinator", "http://192.0.2.1:8000"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("nodeclient: warning: the coordinator URL http://192.0.2.1:8000 is ")
    assert "cleartext" in err


@pytest.mark.parametrize("body", [b"<html>301 Moved Permanently</html>", b""])
def test_unstake_redirected_to_https_says_which_url_to_use(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], body: bytes
) -> None:
    """A proxy's redirect (with a page, or none) was reported as non-JSON, or as the
    coordinator refusing the unstake: it is named, with the coordinator URL to use."""
    real_client = httpx.Client

    def proxy(request: httpx.Request) -> httpx.Response:
        where = "https://c.example" + request.url.path  # the same path, over https
        return httpx.Response(308 if not body else 301, headers={"Location": where}, content=body)

    transport = httpx.MockTransport(proxy)
    monkeypatch.setattr(httpx, "Client", lambda **kw: real_client(**{**kw, "transport": transport}))
    capsys.readouterr()
    argv = ["unstake", "--home", str(home), "--coordinator", "http://127.0.0.1:8000/coord"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "unstake failed: redirected to https://c.example/coord/v1/nodes/" in err
    assert "use https://c.example/coord as the coordinator URL" in err and "refused" not in err


# --- a proxy that does not pass WebSocket upgrades ---------------------------------------------


class _NoUpgrade(http.server.BaseHTTPRequestHandler):
    """A reverse proxy that passed the link's request on as plain HTTP (its Upgrade header
    dropped): the coordinator behind it answers 426."""

    protocol_version = "HTTP/1.1"  # what a WebSocket client reads an answer as

    def do_GET(self) -> None:
        body = b'{"error": "/v1/link is a WebSocket"}'
        self.send_response(426)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


def test_a_link_refused_as_plain_http_names_the_proxy(tmp_path: Path, events: Events) -> None:
    """A link answered 426 (or 404) read as a wrong URL, with nothing on the proxy that
    dropped the upgrade: the error now says what the proxy must pass, in the log and in
    `nodeclient status`."""
    daemon = _daemon(tmp_path, "http://127.0.0.1:9")
    try:
        with serving(_NoUpgrade) as url:
            daemon.url = url
            try:
                asyncio.run(asyncio.wait_for(daemon._connect_once(), 10))
            except Exception as exc:  # what it was is the test
                daemon._link_failed(exc)
            else:
                raise AssertionError("the link went up through a proxy that drops upgrades")
    finally:
        daemon.outbox.close()
    assert "HTTP 426" in daemon.link.last_error
    assert daemon.link.last_error.endswith(f"; fix: {link_module.LINK_PROXY_FIX}")
    (record,) = events.named("link.error")
    assert record.__dict__["fix"] == link_module.LINK_PROXY_FIX


def test_doctor_opens_the_link_with_the_daemons_trust_whatever_the_schemes_case(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`HTTPS://` is a coordinator URL the daemon takes: doctor's link check derives the
    link's URL and trust as the daemon does (link.link_target), so the private CA named
    in NODECLIENT_CA_FILE is trusted there too."""
    monkeypatch.setenv(tlstrust.CA_FILE_ENV, str(pki.ca))

    async def challenge(ws: ServerConnection) -> None:
        await ws.send(json.dumps({"type": "challenge"}))
        await ws.wait_closed()

    async def check(scheme: str) -> doctor.Check:
        async with serve(challenge, "127.0.0.1", 0, ssl=pki.server_context()) as server:
            port = server.sockets[0].getsockname()[1]
            # a generous timeout: what is checked is the trust, not the speed (a loaded
            # machine took over the default 5 s for the TLS and WebSocket handshakes once)
            url = f"{scheme}://127.0.0.1:{port}"
            return await asyncio.to_thread(doctor.check_link, url, timeout=60.0)

    for scheme in ("https", "HTTPS"):
        result = asyncio.run(check(scheme))
        assert result.level is doctor.Level.OK, (scheme, result)
