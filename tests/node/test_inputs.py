"""Which payloads make the daemon fetch an input before the (offline) worker runs them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nodeclient.node.inputs import needs_fetch
from nodeclient.workloads.inference import make_request
from nodeclient.workloads.tensors import encode_tensors, read_metadata
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
    inline = render.make_request(scene, frames=(1, 1), width=2, height=2, samples=1)
    assert not needs_fetch(render.CLASS, inline.encode(), cache_dir=EMPTY)
    by_url = render.make_request(
        scene, frames=(1, 1), width=2, height=2, samples=1, scene_url="https://b.example/s"
    )
    assert needs_fetch(render.CLASS, by_url.encode(), cache_dir=EMPTY)
    with_assets = render.make_request(
        scene, frames=(1, 1), width=2, height=2, samples=1, assets=(("t.png", sha),)
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
