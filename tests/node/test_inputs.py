"""Which payloads make the daemon fetch an input before the (offline) worker runs them,
and how it fetches them into a model cache that sandboxed workers can write."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import os
import re
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from nodeclient.errors import RemoteProtocolError
from nodeclient.node import sandbox
from nodeclient.node.inputs import (
    FetchLimits,
    InputNotStored,
    fetch_limits,
    http_fetcher,
    needs_fetch,
    resolve,
)
from nodeclient.workloads.inference import make_request
from nodeclient.workloads.tensors import encode_tensors, read_metadata
from tests.http_server import serving
from tests.models import identity_model

X = {"x": np.ones(3, np.float32)}
EMPTY = Path("/nonexistent/model-cache")  # a cache that holds nothing


def test_inline_model_needs_no_fetch() -> None:
    """An inline model is run as sent: no thread hop, no network."""
    inline = make_request(identity_model(), X).encode()
    assert not needs_fetch("ai.inference", inline, cache_dir=EMPTY)


def test_model_by_url_is_fetched() -> None:
    """A model named by SHA-256 and URL is resolved by the daemon first."""
    payload = make_request(
        identity_model(), X, inline=False, model_url="https://c.example/m"
    ).encode()
    assert needs_fetch("ai.inference", payload, cache_dir=EMPTY)


def test_a_cached_model_needs_no_fetch(tmp_path) -> None:
    """A model named by URL is fetched only until it sits in the model cache."""
    import hashlib

    model = identity_model()
    sha = hashlib.sha256(model).hexdigest()
    payload = make_request(model, X, inline=False, model_url="/v1/blobs/" + sha).encode()
    assert needs_fetch("ai.inference", payload, cache_dir=tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / sha).write_bytes(model)
    assert not needs_fetch("ai.inference", payload, cache_dir=tmp_path)
    inline = make_request(model, X).encode()
    assert not needs_fetch("ai.inference", inline, cache_dir=tmp_path / "empty")


def test_render_scene_url_or_asset_manifest_is_resolved() -> None:
    """A render payload with a scene URL or an asset manifest goes through the daemon."""
    from nodeclient.workloads import render

    scene = b"scene"
    sha = "0" * 64
    inline = render.make_request(scene, frames=(1, 1), width=4, height=4, samples=1)
    assert not needs_fetch(render.CLASS, inline.encode(), cache_dir=EMPTY)
    by_url = render.make_request(
        scene, frames=(1, 1), width=4, height=4, samples=1, scene_url="https://b.example/s"
    )
    assert needs_fetch(render.CLASS, by_url.encode(), cache_dir=EMPTY)
    with_assets = render.make_request(
        scene, frames=(1, 1), width=4, height=4, samples=1, assets=(("t.png", sha),)
    )
    assert needs_fetch(render.CLASS, with_assets.encode(), cache_dir=EMPTY)


def test_unreadable_or_unknown_payloads_are_left_to_the_worker() -> None:
    """Garbage, or a class without URL inputs, is passed on for the worker to judge."""
    assert not needs_fetch("ai.inference", b"\xff" * 5, cache_dir=EMPTY)
    assert not needs_fetch(
        "ai.training", encode_tensors(X, metadata={"model_url": "x"}), cache_dir=EMPTY
    )


def test_read_metadata_matches_the_full_decode() -> None:
    """The header-only reader returns what decode_tensors would, without the tensors."""
    payload = encode_tensors(X, metadata={"b": "2", "a": "1"})
    assert read_metadata(payload) == {"a": "1", "b": "2"}


# --- a model cache that workers can write (they can plant symlinks in it) ---------------


def _by_url(model: bytes, url: str = "https://c.example/m") -> bytes:
    return make_request(model, X, inline=False, model_url=url).encode()


def _snapshot(directory: Path) -> dict[str, tuple[int, int, int, float, bytes]]:
    """Everything a write, an eviction or a chown through a link would change."""
    seen = {}
    for path in [directory, *sorted(directory.iterdir())]:
        st = path.lstat()
        data = path.read_bytes() if path.is_file() else b""
        seen[path.name] = (st.st_uid, st.st_gid, st.st_mode, st.st_mtime, data)
    return seen


def _stand_in_for_etc(tmp_path: Path) -> Path:
    """A scratch directory playing /etc: a root-owned 0600 file, and one named like a model
    (so an eviction or a cache write through a link would have something to hit)."""
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "shadow").write_bytes(b"root:secret")
    (etc / "shadow").chmod(0o600)
    (etc / hashlib.sha256(b"old").hexdigest()).write_bytes(b"old")
    return etc


def test_symlinked_models_directory_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker that replaced models/ with a link to /etc gets a Reject reason; the daemon
    fetches nothing and writes, evicts or chowns nothing in the link's target. The fault
    is this node's (InputNotStored), not the requester's payload, and the reason does not
    name the node's paths; its log does."""
    etc = _stand_in_for_etc(tmp_path)
    before = _snapshot(etc)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "models").symlink_to(etc)
    model = identity_model()
    payload = _by_url(model)
    fetched: list[str] = []

    def fetch(url: str) -> bytes:
        fetched.append(url)
        return model

    assert needs_fetch("ai.inference", payload, cache_dir=cache)  # handed on to resolve
    with pytest.raises(InputNotStored, match=r"^this node's model cache is unusable") as info:
        resolve("ai.inference", payload, fetch=fetch, cache_dir=cache, sandbox_owner=True)
    assert str(cache) not in str(info.value)
    (logged,) = [r for r in caplog.records if r.msg == "cache.unsafe"]
    assert re.search(r"models is a symlink.*refusing to follow", logged.error)  # type: ignore[attr-defined]
    assert fetched == []
    assert _snapshot(etc) == before
    assert (cache / "models").is_symlink()


def test_symlinked_cache_file_is_not_followed(tmp_path: Path) -> None:
    """A cache file replaced by a link is not a cached model: the daemon fetches the model
    and stores it in place of the link; the link's target is neither written nor chowned."""
    etc = _stand_in_for_etc(tmp_path)
    before = _snapshot(etc)
    model = identity_model()
    sha = hashlib.sha256(model).hexdigest()
    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    (cache / "models" / sha).symlink_to(etc / "shadow")
    payload = _by_url(model)
    assert needs_fetch("ai.inference", payload, cache_dir=cache)

    as_root = os.geteuid() == 0  # only root can hand files to the sandbox uid
    out = resolve(
        "ai.inference", payload, fetch=lambda _: model, cache_dir=cache, sandbox_owner=as_root
    )
    assert out == payload
    stored = cache / "models" / sha
    assert not stored.is_symlink()
    assert stored.read_bytes() == model
    if as_root:
        assert (stored.stat().st_uid, stored.stat().st_gid) == (
            sandbox.SANDBOX_UID,
            sandbox.SANDBOX_GID,
        )
        assert (cache / "models").stat().st_uid == sandbox.SANDBOX_UID
    assert _snapshot(etc) == before
    assert not needs_fetch("ai.inference", payload, cache_dir=cache)


# --- URLs that the prefix check lets through but httpx cannot use --------------------------


def test_invalid_url_becomes_a_reason_naming_it() -> None:
    """httpx.InvalidURL is no httpx.HTTPError; it still ends as RemoteProtocolError."""
    fetch = http_fetcher("https://coordinator.example")
    with pytest.raises(RemoteProtocolError, match=r"GET 'http://\[::1/x' failed: Invalid port"):
        fetch("http://[::1/x")


def test_unusable_urls_are_reasons_with_the_url_truncated(tmp_path: Path) -> None:
    """An unparseable URL, or a host the IDNA codec refuses, ends in resolve's
    RemoteProtocolError with the URL cut to 80 characters, not a raw exception."""
    fetch = http_fetcher("https://coordinator.example")
    for url in ("http://[::1/" + "x" * 200, "http://" + "a" * 300 + "/model"):
        payload = _by_url(identity_model(), url)
        with pytest.raises(RemoteProtocolError) as info:
            resolve("ai.inference", payload, fetch=fetch, cache_dir=tmp_path, sandbox_owner=False)
        assert repr(url[:80]) in str(info.value)
        assert url not in str(info.value)
    assert not (tmp_path / "models").exists()  # nothing was fetched, so nothing stored


def test_httpx_errors_from_an_injected_fetcher_are_reasons(tmp_path: Path) -> None:
    """resolve translates httpx errors that a fetcher let through, InvalidURL included."""
    payload = _by_url(identity_model())

    def fetch(url: str) -> bytes:
        raise httpx.InvalidURL("Invalid port: ':1'")

    with pytest.raises(RemoteProtocolError, match="input could not be fetched: Invalid port"):
        resolve("ai.inference", payload, fetch=fetch, cache_dir=tmp_path, sandbox_owner=False)


def test_the_daemon_fills_the_cache_within_the_workers_bound(tmp_path: Path) -> None:
    """The daemon stores fetched models in the workers' cache under the same size bound,
    so it never evicts the shared cache down to a smaller one of its own."""
    from nodeclient.node import inputs
    from nodeclient.node.runtimes.onnx import OnnxRuntime

    worker_side = OnnxRuntime(cache_dir=tmp_path / "models")
    assert worker_side.cache is not None
    assert inputs._model_cache(tmp_path).max_bytes == worker_side.cache.max_bytes


def test_render_blobs_are_fetched_once_per_node(tmp_path: Path) -> None:
    """The slices of one job name the same scene and assets in the blob store: the daemon
    fetches each once and answers later slices from its own cache, which re-hashes what it
    reads (a file changed on disk is fetched again) and never keeps bytes of the wrong hash."""
    from nodeclient.node.inputs import blob_cache
    from nodeclient.workloads import render

    scene, tex = b"a packed scene" * 100, b"a texture"
    sha, tex_sha = hashlib.sha256(scene).hexdigest(), hashlib.sha256(tex).hexdigest()
    store = {render.blob_url(sha): scene, render.blob_url(tex_sha): tex}
    fetched: list[str] = []

    def fetch(url: str) -> bytes:
        fetched.append(url)
        return store[url]

    def slice_payload(frame: int) -> bytes:
        return render.make_request(
            scene, frames=(frame, frame), width=4, height=4, samples=1,
            scene_url=render.blob_url(sha), assets=(("t.png", tex_sha),),
        ).encode()  # fmt: skip

    cache = blob_cache(tmp_path / "blobs")
    args = {"fetch": fetch, "cache_dir": EMPTY, "sandbox_owner": False, "blobs": cache}
    first = resolve(render.CLASS, slice_payload(1), **args)
    second = resolve(render.CLASS, slice_payload(2), **args)
    assert sorted(fetched) == sorted(store)  # each once
    assert render.RenderRequest.decode(first).scene == scene
    assert second == render.resolve_blobs(slice_payload(2), store.__getitem__)
    assert (tmp_path / "blobs" / sha).stat().st_mode & 0o777 == 0o600

    (tmp_path / "blobs" / sha).write_bytes(b"changed on disk")
    resolve(render.CLASS, slice_payload(3), **args)
    assert fetched.count(render.blob_url(sha)) == 2

    store[render.blob_url(sha)] = b"not the scene"  # a coordinator serving the wrong bytes
    (tmp_path / "blobs" / sha).unlink()
    with pytest.raises(RemoteProtocolError, match="scene at /v1/blobs/.* has sha256"):
        resolve(render.CLASS, slice_payload(4), **args)
    assert not (tmp_path / "blobs" / sha).exists()


# --- a download's limits: the task's deadline and its cancellation --------------------------


@pytest.mark.parametrize("path", ["/drip", "/stall"])
def test_a_download_stops_at_the_tasks_deadline(drip: str, path: str) -> None:
    """A source that sends a byte now and then (every read well within the read timeout)
    or nothing at all cannot hold a fetch past the task's deadline."""
    limits = FetchLimits(deadline=time.monotonic() + 0.5, cancelled=threading.Event())
    began = time.monotonic()
    with fetch_limits(limits), pytest.raises(RemoteProtocolError, match="deadline"):
        http_fetcher(drip)(path)
    assert time.monotonic() - began < 3


@pytest.mark.parametrize("stop", ["deadline", "cancelled"])
def test_a_read_that_began_late_does_not_wait_past_the_stop(
    drip: str, stop: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A source that goes silent after 1.5 s: the read then waiting is cut off at the
    deadline (2 s) or the cancel (at 2 s) by the download's watcher, which shuts its
    connection down, not left to its read timeout, fixed as the request began (2 s, or
    60 s), which would end it later."""
    import socket

    cut: list[int] = []
    real_shutdown = socket.socket.shutdown

    def shutdown(sock: socket.socket, how: int) -> None:
        if threading.current_thread().name == "nodeclient-fetch-limits":
            cut.append(how)
        real_shutdown(sock, how)

    monkeypatch.setattr(socket.socket, "shutdown", shutdown)
    limits = FetchLimits(
        deadline=time.monotonic() + (2.0 if stop == "deadline" else 60.0),
        cancelled=threading.Event(),
    )
    if stop == "cancelled":
        threading.Timer(2.0, limits.cancelled.set).start()
    with fetch_limits(limits), pytest.raises(RemoteProtocolError, match=stop):
        http_fetcher(drip)("/drip-then-stall")
    assert cut == [socket.SHUT_RDWR]  # the watcher ended the read, not its timeout


def test_a_renewed_lease_lets_a_download_go_on(drip: str) -> None:
    """The task was leased here again while its inputs were downloading: the download goes
    on past the first lease's end, to the new one's."""
    limits = FetchLimits(deadline=time.monotonic() + 0.5, cancelled=threading.Event())
    began = time.monotonic()
    renew = threading.Timer(0.2, limits.extend, args=(time.monotonic() + 1.5,))
    renew.start()
    with fetch_limits(limits), pytest.raises(RemoteProtocolError, match="deadline"):
        http_fetcher(drip)("/drip")
    renew.join()
    assert 1.3 < time.monotonic() - began < 4  # stopped at the new end, not the first
    limits.extend(time.monotonic() - 60)  # an earlier end changes nothing
    assert limits.deadline > time.monotonic() - 1


def test_a_cancelled_tasks_download_stops(drip: str) -> None:
    """The daemon sets the flag when it cancels the task; the fetching thread stops at its
    next chunk instead of holding a thread for the whole download."""
    limits = FetchLimits(deadline=time.monotonic() + 60, cancelled=threading.Event())
    threading.Timer(0.3, limits.cancelled.set).start()
    began = time.monotonic()
    with fetch_limits(limits), pytest.raises(RemoteProtocolError, match="cancelled"):
        http_fetcher(drip)("/drip")
    assert time.monotonic() - began < 3


def test_limits_follow_a_thread_started_in_their_context(drip: str) -> None:
    """asyncio.to_thread (and the daemon's copied context) carry the limits along."""
    limits = FetchLimits(deadline=time.monotonic() + 0.3, cancelled=threading.Event())

    async def fetch_in_a_thread() -> bytes:
        with fetch_limits(limits):
            return await asyncio.to_thread(http_fetcher(drip), "/drip")

    with pytest.raises(RemoteProtocolError, match="deadline"):
        asyncio.run(fetch_in_a_thread())


# --- a requester's URL is fetched only from the coordinator or a public address -------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/admin",
        "http://localhost/m",  # a name that resolves to loopback
        "http://169.254.169.254/latest/meta-data/",  # a cloud's metadata service
        "http://10.0.0.1/m",
        "http://100.64.0.1/m",  # shared address space (carrier-grade NAT)
        "http://0.0.0.0:22/",
        "http://[::1]/m",
        "http://[::ffff:127.0.0.1]/m",
        "http://[fe80::1]/m",
        "https://224.0.0.1/m",
        "http://[2002:a9fe:a9fe::]/m",  # 6to4 of 169.254.169.254
        "http://[64:ff9b::a9fe:a9fe]/m",  # NAT64 of 169.254.169.254
        "http://[fec0::1]/m",  # site-local
        "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/m",  # Teredo
    ],
)
def test_a_url_on_the_operators_network_is_refused_before_any_request(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon runs on the operator's network: a requester's URL that is not the
    coordinator's and leads to a loopback, private, link-local, shared, multicast or
    unspecified address is refused without a request, saying why: no connection to it is
    even tried."""
    import socket

    tried: list[object] = []

    def no_connection(*args: object, **kwargs: object) -> None:
        tried.append(args)
        raise AssertionError("a connection was tried")

    monkeypatch.setattr(socket, "create_connection", no_connection)
    monkeypatch.setattr(socket.socket, "connect", no_connection)
    monkeypatch.setattr(socket.socket, "connect_ex", no_connection)
    fetch = http_fetcher("https://coordinator.example")
    with pytest.raises(RemoteProtocolError, match="not a public address"):
        fetch(url)
    assert tried == []


def test_nat64_addresses_are_judged_by_the_ipv4_address_they_carry() -> None:
    """An IPv6-only node behind NAT64 resolves an IPv4-only host (DNS64) to 64:ff9b::/96
    plus its IPv4 address: a public one is fetched, as the same host is on IPv4."""
    from nodeclient.node.inputs import _public

    assert _public(ipaddress.ip_address("64:ff9b::808:808"))  # 8.8.8.8
    assert not _public(ipaddress.ip_address("64:ff9b::a00:1"))  # 10.0.0.1
    assert not _public(ipaddress.ip_address("64:ff9b::7f00:1"))  # 127.0.0.1
    assert not _public(ipaddress.ip_address("64:ff9b:1::808:808"))  # local-use, RFC 8215


def test_a_refusal_tells_the_requester_neither_the_address_nor_whether_the_name_exists(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The reason goes, signed, to the coordinator, which shows it to the requester: a
    requester naming http://db.corp.internal/... learnt from it whether the operator's
    resolver knows the name, and its private address. Both refusals now read the same,
    the address and the resolver's words left to the node's own log."""
    from nodeclient.node import inputs

    def getaddrinfo(host: str, *args: object, **kwargs: object) -> list:
        if host == "db.corp.internal":
            return [(2, 1, 6, "", ("10.20.30.40", 80))]
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(inputs.socket, "getaddrinfo", getaddrinfo)
    fetch = http_fetcher("https://coordinator.example")
    reasons = []
    with caplog.at_level(logging.WARNING, logger="nodeclient.node"):
        for host in ("db.corp.internal", "nothing.corp.internal"):
            with pytest.raises(RemoteProtocolError) as caught:
                fetch(f"http://{host}/m")
            reasons.append(str(caught.value).replace(host, "HOST"))
    assert reasons[0] == reasons[1]
    assert "not a public address, or cannot be resolved" in reasons[0]
    assert "10.20.30.40" not in reasons[0] and "Name or service" not in reasons[0]
    logged = {r.getMessage(): r.__dict__ for r in caplog.records}
    assert logged["input.not_public"]["address"] == "10.20.30.40"
    assert "Name or service not known" in logged["input.unresolved"]["error"]


def test_the_coordinators_own_origin_may_be_local(drip: str) -> None:
    """A devnet's coordinator on 127.0.0.1: its URLs, relative or absolute, are fetched."""
    fetch = http_fetcher(drip, max_bytes=10)
    for url in ("/m", drip + "/m"):
        with pytest.raises(RemoteProtocolError, match="exceeds 10 bytes"):  # it was fetched
            fetch(url)


def test_a_public_host_is_fetched_at_the_address_that_was_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The host is resolved once, checked, and the request sent to that address with the
    URL's Host header: a second lookup (DNS rebinding) cannot send it elsewhere."""
    import http.server

    from nodeclient.node import inputs

    seen: list[str] = []

    class Echo(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(str(self.headers["Host"]))
            self.send_response(200)
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"model")

        def log_message(self, *_args: object) -> None:
            return None

    with serving(Echo) as base:
        port = int(base.rsplit(":", 1)[1])
        lookups: list[str] = []
        real = inputs.socket.getaddrinfo

        def getaddrinfo(host: str, *args: object, **kwargs: object) -> list:
            if host != "models.example":  # the connection to the address itself
                return real(host, *args, **kwargs)  # type: ignore[arg-type]
            lookups.append(host)  # the first answer is "public"; a second would be the trap
            if len(lookups) > 1:
                return [(2, 1, 6, "", ("10.9.9.9", port))]
            # Two addresses: nothing listens on the first, so the second is tried.
            return [(2, 1, 6, "", ("127.0.0.2", port)), (2, 1, 6, "", ("127.0.0.1", port))]

        monkeypatch.setattr(inputs.socket, "getaddrinfo", getaddrinfo)
        monkeypatch.setattr(inputs, "_public", lambda a: str(a) in ("127.0.0.1", "127.0.0.2"))
        assert (
            http_fetcher("https://coordinator.example")(f"http://models.example:{port}/m")
            == b"model"
        )
    assert lookups == ["models.example"]
    assert seen == [f"models.example:{port}"]


def test_a_non_ascii_host_is_resolved_as_it_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    """The name looked up is the one the request names (IDNA 2008, as httpx encodes it),
    not Python's IDNA 2003 reading of it ("faß.de" is not "fass.de")."""
    from nodeclient.node import inputs

    asked: list[str] = []

    def getaddrinfo(host: str, *args: object, **kwargs: object) -> list:
        asked.append(host)
        return [(2, 1, 6, "", ("10.0.0.1", 443))]  # refused: nothing is fetched

    monkeypatch.setattr(inputs.socket, "getaddrinfo", getaddrinfo)
    with pytest.raises(RemoteProtocolError, match="not a public address"):
        http_fetcher("https://coordinator.example")("https://faß.de/model")
    assert asked == ["xn--fa-hia.de"]


def test_a_compressed_answer_is_refused_undecoded() -> None:
    """Blobs are fetched as stored (``Accept-Encoding: identity``) and never decoded: a
    source that compresses anyway is refused, so a few hundred bytes of nested gzip cannot
    expand into gigabytes in the daemon before the size limit is checked."""
    import gzip
    import http.server

    bomb = gzip.compress(gzip.compress(bytes(64 << 20)))
    asked: list[str | None] = []

    class Bomb(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.headers["Accept-Encoding"])
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip, gzip")
            self.send_header("Content-Length", str(len(bomb)))
            self.end_headers()
            self.wfile.write(bomb)

        def log_message(self, *_args: object) -> None:
            return None

    with (
        serving(Bomb) as origin,
        pytest.raises(RemoteProtocolError, match="Content-Encoding 'gzip, gzip'"),
    ):
        http_fetcher(origin, max_bytes=1 << 20)("/v1/blobs/" + "0" * 64)
    assert asked == ["identity"]
