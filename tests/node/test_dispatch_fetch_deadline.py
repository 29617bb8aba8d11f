"""A task whose input download is stopped at its lease's end timed out: it is counted as
timed out, and its Reject says so, as for a task killed at its lease's end in a worker;
it is no bad input of the requester's, and not counted as rejected too."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import numpy as np

from nodeclient.node.inputs import http_fetcher
from nodeclient.protocol import envelope, messages
from nodeclient.workloads.inference import make_request
from tests.models import identity_model
from tests.node.test_daemon_outbox import Answers, make_daemon


def test_a_download_stopped_at_the_lease_end_counts_as_timed_out(tmp_path: Path, drip: str) -> None:
    """A model URL that drips a byte now and then, and a lease that ends within a second:
    the download stops there, and the task is a timeout (status, metric, reason)."""
    daemon, key, link = make_daemon(tmp_path, executor=Answers)
    daemon._fetch = http_fetcher(drip)
    task_id = uuid.uuid4()
    request = make_request(
        identity_model(), {"x": np.zeros(4, np.float32)}, inline=False, model_url=drip + "/m"
    )
    env = envelope.seal(
        request.encode(), public_key=key.public_key(), task_id=task_id,
        node_id=daemon.node_id, expires_at=int(time.time()) + 600,
    )  # fmt: skip
    lease_end = int(time.time()) + 1  # within a second
    frame = messages.Dispatch(task_id, uuid.uuid4(), "ai.inference", lease_end, env)

    async def scenario() -> None:
        await daemon._on_frame(json.dumps(frame.to_wire()))
        while daemon.running:
            await asyncio.sleep(0.05)

    try:
        asyncio.run(asyncio.wait_for(scenario(), 15))
        (refused,) = link.frames
        assert refused["type"] == "reject"
        reason = refused["message"]["reason"]
        assert reason.startswith("deadline exceeded: input download GET "), reason
        assert "did not finish before the task's deadline" in reason
        status = daemon.status()
        assert (status["timed_out"], status["rejected"], status["failed"]) == (1, 0, 0)
        metrics = daemon.metrics.exposition().decode()
        assert 'tasks_total{outcome="timed_out",workload_class="ai.inference"} 1.0' in metrics
        assert 'outcome="rejected"' not in metrics
    finally:
        daemon._fetch_pool.shutdown(wait=True)
        daemon.outbox.close()
