"""A model fetched by URL that the model cache cannot store (a full or failing disk): the
worker, which cannot fetch, must still get the model, or the task must fail as the node's
fault; before, it was handed on by URL and the worker refused it as the requester's."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from nodeclient.errors import RemoteProtocolError
from nodeclient.node import inputs
from nodeclient.node.inputs import InputNotStored, needs_fetch, resolve
from nodeclient.node.runtimes.onnx import OnnxRuntime
from nodeclient.workloads.inference import InferenceRequest, make_request
from tests.models import identity_model

X = {"x": np.arange(3, dtype=np.float32)}
URL = "https://models.example/m.onnx"


def _no_space(fd: int) -> None:
    """os.fsync on a full disk (ENOSPC surfaces at the flush of what was written)."""
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_model_the_cache_cannot_store_goes_to_the_worker_inline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache's write fails: the payload the worker gets carries the fetched model
    inline (no URL left for it to refuse), the worker's own runtime runs it to the bytes
    an inline request gives, and nothing of the failed write is left in the cache."""
    model = identity_model()
    payload = make_request(model, X, inline=False, model_url=URL).encode()
    fetched: list[str] = []

    def fetch(url: str) -> bytes:
        fetched.append(url)
        return model

    monkeypatch.setattr(os, "fsync", _no_space)
    out = resolve("ai.inference", payload, fetch=fetch, cache_dir=tmp_path, sandbox_owner=False)
    monkeypatch.undo()

    assert fetched == [URL]
    request = InferenceRequest.decode(out)
    assert request.model == model and request.model_url is None
    assert request.model_sha256 == hashlib.sha256(model).hexdigest()
    assert list((tmp_path / "models").iterdir()) == []  # the partial file was removed
    # What the worker builds (no fetcher, the same cache directory) runs it.
    worker = OnnxRuntime(cache_dir=tmp_path / "models")
    assert worker.run(out) == OnnxRuntime().run(make_request(model, X).encode())
    # Nothing is cached, so the next task fetches the model again (a miss, not a failure).
    assert needs_fetch("ai.inference", payload, cache_dir=tmp_path)


def test_a_model_too_large_to_send_inline_fails_as_the_nodes_fault(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the model inline the payload would be over what a worker takes: the task is
    refused with InputNotStored (the node's disk), never RemoteProtocolError (the
    requester's), and never handed on by URL."""
    model = identity_model()
    payload = make_request(model, X, inline=False, model_url=URL).encode()
    monkeypatch.setattr(os, "fsync", _no_space)
    with pytest.raises(InputNotStored, match=r"could not store the fetched model .* full or"):
        resolve(
            "ai.inference",
            payload,
            fetch=lambda _: model,
            cache_dir=tmp_path,
            sandbox_owner=False,
            max_payload_bytes=len(payload) + 16,
        )


def test_fetch_limits_read_their_own_clock() -> None:
    """A download's deadline is a value of the limits' clock (the executor's, which runs on
    while the system is suspended), not of time.monotonic."""
    limits = inputs.FetchLimits(deadline=100.0, cancelled=threading.Event(), clock=lambda: 99.5)
    assert inputs._left(limits, URL) == pytest.approx(0.5)
    limits.clock = lambda: 100.5  # the system slept past the deadline
    with pytest.raises(RemoteProtocolError, match="before the task's deadline"):
        inputs._left(limits, URL)
