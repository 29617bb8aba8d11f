"""How the node and the requester tools reach a coordinator: which certificates they trust,
what they say when one is refused, and the mistakes in a coordinator URL they point out.

Every client of a coordinator (the daemon's registration and its WebSocket link, its input
fetches, ``nodeclient doctor`` and ``unstake``, the requester client) verifies TLS with
the one context :func:`client_context` builds, so they all trust the same certificates:

- the system store (``update-ca-certificates`` and the like), or what ``SSL_CERT_FILE``
  and ``SSL_CERT_DIR`` name in its place, as OpenSSL reads them;
- certifi's bundle, which httpx trusted alone before: a machine whose OpenSSL has no
  store of its own (python.org's macOS builds, some minimal containers) still reaches a
  coordinator with a public certificate;
- the PEM file ``$NODECLIENT_CA_FILE`` names, if set: a private CA's certificate.

Verification is never turned off. A coordinator reached by plain ``http://`` on another
host is warned about (:func:`cleartext_warning`), and a redirect is named as one
(:func:`redirect_message`): no client follows redirects.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import threading
import urllib.parse
from typing import Final

import httpx

from nodeclient.errors import UsageError
from nodeclient.text import printable

CA_FILE_ENV: Final = "NODECLIENT_CA_FILE"
# OpenSSL's verify codes that need another fix than trusting a CA.
_NOT_YET_VALID: Final = 9  # X509_V_ERR_CERT_NOT_YET_VALID
_EXPIRED: Final = 10  # X509_V_ERR_CERT_HAS_EXPIRED
_MISMATCH: Final = (62, 64)  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
_MAX_SHOWN: Final = 200  # characters of a Location shown

TRUST_FIX: Final = (
    "the coordinator's TLS certificate is not signed by a CA this machine trusts: install "
    "its CA certificate in the system store (Debian/Ubuntu: copy it to "
    "/usr/local/share/ca-certificates/ and run update-ca-certificates), or name that PEM "
    f"file in {CA_FILE_ENV} (or SSL_CERT_FILE), then try again"
)
_HOSTNAME_FIX: Final = (
    "the coordinator's TLS certificate does not name the host (or address) in the coordinator URL: "
    "use a host name the certificate holds"
)
_EXPIRED_FIX: Final = (
    "the coordinator's TLS certificate has expired, or this machine's clock is wrong: check "
    "`date`, and ask the coordinator's operator to renew the certificate"
)


_NOT_YET_VALID_FIX: Final = (
    "the coordinator's TLS certificate is not valid yet by this machine's clock, which is "
    "most likely behind: check `date`, and enable time synchronisation (`timedatectl "
    "set-ntp true`)"
)
# Each thread's context and the environment it was built for. One context per thread,
# not per process: httpx sets a context's ALPN protocols at every connection, which
# frees what OpenSSL copies from while another thread makes a connection with it.
_contexts = threading.local()


def client_context() -> ssl.SSLContext:
    """The SSLContext every client of a coordinator verifies with (module docstring): built
    once per thread for the environment it sees. UsageError (one line) when
    ``$NODECLIENT_CA_FILE`` cannot be read as PEM certificates."""
    env = os.environ
    key = (env.get(CA_FILE_ENV) or None, env.get("SSL_CERT_FILE"), env.get("SSL_CERT_DIR"))
    held: tuple[tuple[str | None, ...], ssl.SSLContext] | None = getattr(_contexts, "held", None)
    if held is None or held[0] != key:
        held = key, _context(key[0])
        _contexts.held = held
    return held[1]


def _context(ca_file: str | None) -> ssl.SSLContext:
    """A context for the environment as it is (OpenSSL reads SSL_CERT_FILE and
    SSL_CERT_DIR itself)."""
    import certifi

    # The system store, with verification and host names on. httpx sets its ALPN to
    # http/1.1 (no client here speaks HTTP/2); the WebSocket link's upgrade is an
    # HTTP/1.1 request too.
    context = ssl.create_default_context()
    context.load_verify_locations(cafile=certifi.where())
    if ca_file is not None:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise UsageError(
                f"{CA_FILE_ENV}={ca_file}: cannot load it as PEM CA certificates ({why}); "
                "name a readable file holding the coordinator's CA certificate, or unset it"
            ) from None
    return context


def trust_fix(exc: BaseException) -> str | None:
    """What to do about *exc* when a certificate check failed anywhere in its chain of
    causes (a refused certificate wrapped by httpx or websockets); None otherwise."""
    refused = None
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:  # the chain, to its root cause
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError) or (
            "CERTIFICATE_VERIFY_FAILED" in str(current)
        ):
            refused = current
        current = current.__cause__ or current.__context__
    if refused is None:
        return None
    code, text = getattr(refused, "verify_code", None), str(refused)
    if code in _MISMATCH or "mismatch" in text:
        return _HOSTNAME_FIX
    if code == _EXPIRED or "certificate has expired" in text:
        return _EXPIRED_FIX
    if code == _NOT_YET_VALID or "not yet valid" in text:
        return _NOT_YET_VALID_FIX
    return TRUST_FIX


def with_trust_fix(text: str, exc: BaseException) -> str:
    """*text*, and ``; fix: ...`` when *exc* is a refused certificate (:func:`trust_fix`)."""
    fix = trust_fix(exc)
    return text if fix is None else f"{text}; fix: {fix}"


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 (bracketed or not, or IPv4-mapped) and ``localhost``."""
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def cleartext_warning(url: str) -> str | None:
    """The warning for a coordinator URL that is plain http:// to a host that is not
    loopback; None for https://, loopback, or a URL that does not parse (refused
    elsewhere)."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return None
    if parsed.scheme != "http" or not parsed.host or is_loopback(parsed.host):
        return None
    return (
        f"the coordinator URL {_shown(url)} is plain http:// to a host that is not this "
        "machine: requests, results and tokens travel in cleartext, and anyone on the path "
        "can read them and forge the coordinator's answers (dispatches, jobs, results); use "
        "an https:// URL"
    )


def redirect_message(response: httpx.Response, api_path: str) -> str | None:
    """For a 3xx answer with a Location to the request for *api_path* (under the
    coordinator URL): what it was and what to do, as one line. None for any other answer."""
    parts = redirect_parts(response, api_path)
    return None if parts is None else f"{parts[0]}: {parts[1]}"


def redirect_parts(response: httpx.Response, api_path: str) -> tuple[str, str] | None:
    """:func:`redirect_message` in two: ``redirected to <Location>``, and what to do."""
    location = response.headers.get("location")
    if not 300 <= response.status_code < 400 or not location:
        return None
    try:
        asked = str(response.request.url)
    except RuntimeError:  # an answer made without a request
        asked = None
    return redirect_words(location, asked, api_path)


def redirect_words(location: str, asked: str | None, api_path: str) -> tuple[str, str]:
    """``redirected to <Location>``, and what to do: the coordinator URL to use when the
    Location is *api_path* under another base URL (resolved against the URL *asked*;
    ws:// and wss:// count as http:// and https://)."""
    base = None
    try:
        resolved = urllib.parse.urlsplit(urllib.parse.urljoin(asked or "", location))
    except ValueError:  # a Location that is no URL
        resolved = None
    if resolved is not None and resolved.netloc and resolved.path.endswith(api_path):
        # The same API path under another base URL: that base is the coordinator URL.
        scheme = {"ws": "http", "wss": "https"}.get(resolved.scheme, resolved.scheme)
        prefix = resolved.path[: -len(api_path)].rstrip("/")
        base = f"{scheme}://{resolved.netloc}{prefix}"
    use = f"use {_shown(base)} as the coordinator URL" if base else (
        "use the URL it leads to, without the API path, as the coordinator URL")  # fmt: skip
    return f"redirected to {_shown(location)}", f"nodeclient follows no redirects; {use}"


def _shown(text: str) -> str:
    """*text* as one printable line (text.printable) of at most _MAX_SHOWN characters."""
    line = printable(text)
    return line if len(line) <= _MAX_SHOWN else line[: _MAX_SHOWN - 3] + "..."
