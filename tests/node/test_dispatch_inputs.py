"""A task whose model, fetched by URL, the model cache cannot store (a full or failing
disk): it runs with the model inline, or, where the payload would then be too large, is
refused as this node's failure; never as the requester's."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import os
import uuid
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from nodeclient.node import inputs
from nodeclient.node.daemon import NodeDaemon
from nodeclient.node.executor import Executor, TaskFailed
from nodeclient.node.runtimes.onnx import ModelUnavailable
from nodeclient.workloads.inference import InferenceRequest, make_request
from tests.models import identity_model
from tests.node.test_daemon_outbox import make_daemon
from tests.node.test_daemon_rejects import dispatch, later

URL = "https://models.example/m.onnx"


class Records(Executor):
    """Runs nothing: keeps each payload it is given and answers the same bytes."""

    payloads: ClassVar[list[bytes]] = []

    async def run(self, workload_class: str, payload: bytes, **kwargs: object) -> bytes:
        Records.payloads.append(payload)
        return b"a result"


def _no_space(fd: int) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _run(daemon: NodeDaemon, payload: bytes) -> None:
    async def scenario() -> None:
        await daemon._on_frame(dispatch(daemon, uuid.uuid4(), later(), payload=payload))
        while daemon.running:
            await asyncio.sleep(0.01)

    asyncio.run(asyncio.wait_for(scenario(), 10))


@pytest.mark.parametrize("fits", [True, False])
def test_a_model_the_cache_cannot_store_is_not_the_requesters_fault(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fits: bool
) -> None:
    """The cache's write fails (ENOSPC): the task runs with the model inline; or, when the
    payload would then be over the executor's limit, is refused with a reason that names
    this node's disk, not "bad input" (the requester's fault)."""
    model = identity_model()
    payload = make_request(
        model, {"x": np.ones(3, np.float32)}, inline=False, model_url=URL
    ).encode()
    daemon, _, link = make_daemon(tmp_path, Records)
    Records.payloads = []
    daemon._fetch = lambda url: model
    if not fits:
        config = dataclasses.replace(daemon.executor.config, max_payload_bytes=len(payload) + 16)
        daemon.executor.config = config
    monkeypatch.setattr(os, "fsync", _no_space)  # the model cache's write fails
    _run(daemon, payload)
    daemon._fetch_pool.shutdown(wait=True)
    monkeypatch.undo()

    (sent,) = link.frames
    if fits:
        (given,) = Records.payloads
        request = InferenceRequest.decode(given)
        assert request.model == model and request.model_url is None
        assert sent["type"] == "result"
    else:
        assert Records.payloads == []
        assert sent["type"] == "reject"
        reason = sent["message"]["reason"]
        assert "could not store the fetched model" in reason
        assert not reason.startswith("bad input")


class FailsLikeABadCacheFile(Executor):
    """Answers as a worker does that finds the cached model's bytes wrong (it sees the
    cache read-only, so cannot delete the file): the node's failure, in the words the
    worker gives it (worker.py: ``execution failed: <type>: <message>``)."""

    reason: ClassVar[str] = f"execution failed: {ModelUnavailable.__name__}: not cached"

    async def run(self, workload_class: str, payload: bytes, **kwargs: object) -> bytes:
        raise TaskFailed(self.reason, requester_fault=False)


def test_a_corrupt_cached_model_is_dropped_after_a_worker_cannot_use_it(tmp_path: Path) -> None:
    """A cache file whose bytes do not match its name (rot, or left by an older release)
    passes the daemon's cheap check, and the worker cannot use it; after that failure the
    daemon drops it, so the next task for the model fetches it again."""
    model = identity_model()
    request = make_request(model, {"x": np.ones(3, np.float32)}, inline=False, model_url=URL)
    daemon, _, link = make_daemon(tmp_path, FailsLikeABadCacheFile)
    cached = daemon.executor.config.cache_dir / "models" / request.model_sha256
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(b"not the model")
    fetched: list[str] = []
    daemon._fetch = lambda url: fetched.append(url) or model
    _run(daemon, request.encode())
    daemon._fetch_pool.shutdown(wait=True)

    (sent,) = link.frames
    assert sent["type"] == "reject" and fetched == []  # the cache said it held the model
    assert not cached.exists()
    assert inputs.needs_fetch("ai.inference", request.encode(), cache_dir=cached.parent.parent)


def test_other_failures_of_a_task_do_not_reread_its_cached_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of memory, a timeout, a GPU fault: the model is not the cause, and re-reading
    and hashing it (up to 256 MiB) for every such failure is not done."""
    model = identity_model()
    request = make_request(model, {"x": np.ones(3, np.float32)}, inline=False, model_url=URL)
    monkeypatch.setattr(FailsLikeABadCacheFile, "reason", "out of memory (MemoryError)")
    daemon, _, link = make_daemon(tmp_path, FailsLikeABadCacheFile)
    cached = daemon.executor.config.cache_dir / "models" / request.model_sha256
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(b"not the model")
    rechecked: list[str] = []
    monkeypatch.setattr(inputs, "recheck_cached_model", lambda _d, sha: rechecked.append(sha))
    _run(daemon, request.encode())
    daemon._fetch_pool.shutdown(wait=True)
    (sent,) = link.frames
    assert sent["type"] == "reject" and rechecked == [] and cached.exists()
