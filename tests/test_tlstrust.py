"""The one trust store of every client of a coordinator (nodeclient.tlstrust), and what the
clients say about a refused certificate, a plain http:// URL and a redirect.

Also the helpers the node's and the requester's TLS tests share: a throwaway CA and a
server certificate it signs (made here with ``cryptography``), and a real HTTPS server on
loopback that presents it.
"""

from __future__ import annotations

import contextlib
import datetime
import http.server
import ipaddress
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nodeclient import tlstrust
from nodeclient.errors import UsageError
from tests.e2e.harness import free_port

# --- a throwaway CA and an HTTPS server on loopback ------------------------------------------


CA_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


@dataclass(frozen=True)
class Pki:
    """A CA's certificate, and a server certificate it signed (with its key), as PEM files."""

    ca: Path
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        return context


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_pki(
    directory: Path,
    *,
    hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
    starts_in: datetime.timedelta = datetime.timedelta(hours=-1),
) -> Pki:
    """A fresh CA and a server certificate for *hosts* (IP addresses or names), valid now
    (or, the server's, from *starts_in* from now)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("nodeclient test CA"))
        .issuer_name(_name("nodeclient test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(CA_USAGE, critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("coordinator"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + starts_in)
        .not_valid_after(now + starts_in + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    pki = Pki(ca=directory / "ca.pem", cert=directory / "server.pem", key=directory / "server.key")
    pki.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    pki.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pki


class MovedToHttps(http.server.BaseHTTPRequestHandler):
    """A proxy's http:// listener: everything is moved to https://, with an HTML page."""

    def _moved(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        page = b"<html><body><h1>301 Moved Permanently</h1></body></html>"
        self.send_response(301)
        self.send_header("location", f"https://coordinator.example{self.path}")
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)

    do_GET = do_POST = _moved

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def clear_trust_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Trust as a machine with nothing set: no SSL_CERT_FILE, SSL_CERT_DIR or CA file (a
    test machine may name its own bundle in them)."""
    for name in ("SSL_CERT_FILE", "SSL_CERT_DIR", tlstrust.CA_FILE_ENV):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def no_cert_env(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_trust_env(monkeypatch)


class Coordinator(http.server.BaseHTTPRequestHandler):
    """Answers as a coordinator would the requests these tests send: /healthz, a
    registration, a blob, an empty list of jobs."""

    ANSWERS: ClassVar[dict[tuple[str, str], tuple[int, bytes]]] = {
        ("GET", "/healthz"): (200, b'{"status": "ok"}'),
        ("POST", "/v1/nodes"): (
            201,
            json.dumps(
                {"status": "registered", "prior_registrations": [], "coordinator_id": "c-tls"}
            ).encode(),
        ),
        ("GET", "/v1/blobs/" + "ab" * 32): (200, b"the blob's bytes"),
        ("GET", "/v1/jobs"): (200, b"[]"),
    }

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        status, body = self.ANSWERS.get((self.command, self.path), (404, b'{"error": "no"}'))
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *_args: object) -> None:
        pass


class _TLSServer(http.server.ThreadingHTTPServer):
    """Each connection's TLS handshake in its request thread, and a client that refuses the
    certificate (the handshake fails) is no error. Leaving joins the request threads."""

    daemon_threads = False
    block_on_close = True

    def __init__(self, handler: type[http.server.BaseHTTPRequestHandler], pki: Pki) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.context = pki.server_context()

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = self.socket.accept()
        sock.settimeout(5.0)
        wrapped = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return wrapped, address

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.do_handshake()
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a refused certificate, seen from the server


@contextlib.contextmanager
def serving_tls(
    pki: Pki, handler: type[http.server.BaseHTTPRequestHandler] = Coordinator
) -> Iterator[str]:
    """Serve *handler* over HTTPS on a free loopback port; yields the base URL."""
    httpd = _TLSServer(handler, pki)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


# --- the trust store ------------------------------------------------------------------------


def test_the_ca_file_is_trusted_besides_the_system_store(
    pki: Pki, no_cert_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without NODECLIENT_CA_FILE a private CA's server is refused, whatever httpx would
    trust; with it, the same context verifies it (and still checks the host name)."""
    with serving_tls(pki) as url:
        with pytest.raises(httpx.ConnectError) as refused:
            httpx.get(f"{url}/healthz", verify=tlstrust.client_context())
        assert tlstrust.trust_fix(refused.value) == tlstrust.TRUST_FIX
        monkeypatch.setenv(tlstrust.CA_FILE_ENV, str(pki.ca))
        context = tlstrust.client_context()
        assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
        assert httpx.get(f"{url}/healthz", verify=context).json() == {"status": "ok"}
    assert tlstrust.client_context() is context  # built once for the same environment


def test_a_certificate_for_another_host_says_so(
    tmp_path: Path, no_cert_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trusted CA but a certificate that does not name the URL's host: the fix is the
    URL's host name, not another CA."""
    other = make_pki(tmp_path, hosts=("coordinator.example",))
    monkeypatch.setenv(tlstrust.CA_FILE_ENV, str(other.ca))
    with serving_tls(other) as url, pytest.raises(httpx.ConnectError) as refused:
        httpx.get(f"{url}/healthz", verify=tlstrust.client_context())
    assert "does not name the host" in (tlstrust.trust_fix(refused.value) or "")


def test_a_certificate_not_valid_yet_points_at_the_clock(
    tmp_path: Path, no_cert_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trusted CA, but a certificate valid only from tomorrow: what a node whose clock
    is behind sees. The fix is the clock, not another CA."""
    early = make_pki(tmp_path, starts_in=datetime.timedelta(days=1))
    monkeypatch.setenv(tlstrust.CA_FILE_ENV, str(early.ca))
    with serving_tls(early) as url, pytest.raises(httpx.ConnectError) as refused:
        httpx.get(f"{url}/healthz", verify=tlstrust.client_context())
    fix = tlstrust.trust_fix(refused.value) or ""
    assert "not valid yet by this machine's clock" in fix and "timedatectl" in fix


def test_each_thread_has_a_context_of_its_own(no_cert_env: None) -> None:
    """httpx sets a context's ALPN protocols at every connection: one context shared by
    threads connecting at once would be changed under OpenSSL's copy of it."""
    here = tlstrust.client_context()
    there: list[ssl.SSLContext] = []
    thread = threading.Thread(target=lambda: there.append(tlstrust.client_context()))
    thread.start()
    thread.join()
    assert tlstrust.client_context() is here and there and there[0] is not here


@pytest.mark.parametrize("content", [None, b"not a certificate\n"])
def test_a_ca_file_that_cannot_be_loaded_is_one_line(
    tmp_path: Path, no_cert_env: None, monkeypatch: pytest.MonkeyPatch, content: bytes | None
) -> None:
    path = tmp_path / "ca.pem"
    if content is not None:
        path.write_bytes(content)
    monkeypatch.setenv(tlstrust.CA_FILE_ENV, str(path))
    with pytest.raises(UsageError, match=f"^{tlstrust.CA_FILE_ENV}=.*cannot load it"):
        tlstrust.client_context()


def test_an_error_that_is_no_refused_certificate_gets_no_fix() -> None:
    with pytest.raises(httpx.ConnectError) as refused:
        httpx.get(f"http://127.0.0.1:{free_port()}/healthz", verify=tlstrust.client_context())
    assert tlstrust.trust_fix(refused.value) is None
    assert tlstrust.with_trust_fix("cannot reach", refused.value) == "cannot reach"


# --- plain http:// and redirects --------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000",
        "http://127.5.6.7",
        "http://[::1]:8000",
        "http://localhost:8000/prefix",
        "HTTP://LOCALHOST",
        "https://192.0.2.1:8443",
        "http://[::1",  # does not parse: refused where the URL is checked
    ],
)
def test_loopback_and_https_are_not_warned_about(url: str) -> None:
    assert tlstrust.cleartext_warning(url) is None


@pytest.mark.parametrize(
    "url", ["http://192.0.2.1:8000", "http://coordinator.example", "http://[2001:db8::1]:80"]
)
def test_plain_http_to_another_host_is_warned_about(url: str) -> None:
    warning = tlstrust.cleartext_warning(url)
    assert warning is not None
    assert url in warning and "cleartext" in warning and "forge" in warning
    assert "use an https:// URL" in warning


def test_a_redirect_names_the_coordinator_url_to_use() -> None:
    request = httpx.Request("POST", "http://coord.example/prefix/v1/nodes")
    moved = httpx.Response(
        301, headers={"location": "https://coord.example/prefix/v1/nodes"}, request=request
    )
    assert tlstrust.redirect_message(moved, "/v1/nodes") == (
        "redirected to https://coord.example/prefix/v1/nodes: nodeclient follows no "
        "redirects; use https://coord.example/prefix as the coordinator URL"
    )
    elsewhere = httpx.Response(302, headers={"location": "/login"}, request=request)
    said = tlstrust.redirect_message(elsewhere, "/v1/nodes")
    assert said is not None and said.startswith("redirected to /login: nodeclient follows no")
    assert tlstrust.redirect_message(httpx.Response(404, request=request), "/v1/nodes") is None
    assert tlstrust.redirect_message(httpx.Response(304, request=request), "/v1/nodes") is None


def test_a_link_redirect_names_the_coordinator_url_as_http() -> None:
    """The link's redirect comes as a ws(s):// Location: the coordinator URL to use is
    its http(s):// base; a Location that is no URL is shown, not followed."""
    moved, fix = tlstrust.redirect_words(
        "wss://c.example/coord/v1/link", "ws://127.0.0.1:8000/v1/link", "/v1/link"
    )
    assert moved == "redirected to wss://c.example/coord/v1/link"
    assert (
        fix == "nodeclient follows no redirects; use https://c.example/coord as the coordinator URL"
    )
    moved, fix = tlstrust.redirect_words(
        "/elsewhere\x1b[2J", "ws://127.0.0.1:8000/v1/link", "/v1/link"
    )
    assert moved == "redirected to /elsewhere\\x1b[2J" and "without the API path" in fix
