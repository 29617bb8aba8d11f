"""Prometheus metrics (2.3.8): the node's, the coordinator's, and the GPU sampler.

Scrapes are parsed with prometheus_client's own parser, the way a Prometheus server
reads them. The end-to-end test runs a real coordinator and a real node daemon and checks
that the numbers move as jobs execute.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client.parser import text_string_to_metric_families

from nodeclient.clock import ManualClock
from nodeclient.coordinator.metrics import CoordinatorMetrics
from nodeclient.errors import UsageError
from nodeclient.node import metrics as nm
from nodeclient.node.config import load_config
from nodeclient.workloads.inference import make_request
from tests.coordinator.conftest import (
    START,
    config_for,
    inference_payload,
    inference_result,
    make_node,
    start,
    stop,
)
from tests.e2e.harness import CoordinatorProc, NodeProc, free_port, wait_for
from tests.models import identity_model

VALUES = [1.0, 2.0, 3.0]


def samples(text: str | bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape: (name, sorted labels) -> value."""
    if isinstance(text, bytes):
        text = text.decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(scrape: dict, name: str, **labels: str) -> float:
    return scrape.get((name, tuple(sorted(labels.items()))), 0.0)


def status(state: str = "EXECUTING", link: str = "up", rtt: float | None = 12.5) -> dict:
    return {
        "state": state,
        "link": {"status": link, "rtt_ms": rtt},
        "outbox_backlog": 3,
        "results_held_bytes": 4096,
        "running": [{"task_id": "t"}],
    }


# --- the node's registry --------------------------------------------------------------------


def test_state_is_one_hot_and_link_gauges_follow_status() -> None:
    """node_state is 1 for the current state only; link_up, rtt and backlog follow the snapshot."""
    m = nm.NodeMetrics()
    m.update_status(status())
    s = samples(m.exposition())
    assert [
        value(s, "node_state", state=x) for x in ("READY", "EXECUTING", "IDLE", "UNSTAKING")
    ] == [0, 1, 0, 0]
    assert value(s, "link_up") == 1 and value(s, "heartbeat_rtt_seconds") == 0.0125
    assert value(s, "outbox_backlog") == 3 and value(s, "tasks_running") == 1
    assert value(s, "outbox_results_held_bytes") == 4096
    m.update_status(status(state="IDLE", link="down", rtt=None))
    s = samples(m.exposition())
    assert (
        value(s, "node_state", state="IDLE") == 1 and value(s, "node_state", state="EXECUTING") == 0
    )
    assert value(s, "link_up") == 0
    assert math.isnan(value(s, "heartbeat_rtt_seconds"))  # not the gone link's last one


def test_task_counter_and_duration_histogram() -> None:
    """tasks_total counts by class and outcome; task_duration_seconds observes each duration."""
    m = nm.NodeMetrics()
    m.task_ended("ai.inference", "completed", 0.3)
    m.task_ended("ai.inference", "completed", 4.0)
    m.task_ended("ai.inference", "timed_out", 400.0)
    s = samples(m.exposition())
    assert value(s, "tasks_total", workload_class="ai.inference", outcome="completed") == 2
    assert value(s, "tasks_total", workload_class="ai.inference", outcome="timed_out") == 1
    assert value(s, "task_duration_seconds_count", workload_class="ai.inference") == 3
    assert value(s, "task_duration_seconds_bucket", workload_class="ai.inference", le="0.5") == 1
    with pytest.raises(ValueError, match="unknown task outcome"):
        m.task_ended("ai.inference", "vanished", 1.0)


def test_registries_are_per_instance() -> None:
    """Two daemons in one process do not share counters (no global registry)."""
    a, b = nm.NodeMetrics(), nm.NodeMetrics()
    a.task_ended("ai.inference", "failed", 1.0)
    assert (
        value(
            samples(b.exposition()), "tasks_total", workload_class="ai.inference", outcome="failed"
        )
        == 0
    )


def test_served_over_http_on_the_opt_in_address() -> None:
    """serve() listens on HOST:PORT and answers a scrape; close() stops it."""
    m = nm.NodeMetrics()
    m.update_status(status(state="READY"))
    server = m.serve(f"127.0.0.1:{free_port()}")
    try:
        body = httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=5).text
        assert value(samples(body), "node_state", state="READY") == 1
    finally:
        server.close()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=2)


def test_metrics_address_is_validated(tmp_path: Path) -> None:
    """A malformed address is refused in config.toml and on the command line."""
    with pytest.raises(UsageError, match="HOST:PORT"):
        nm.parse_metrics_address("9101")
    assert nm.parse_metrics_address("[::1]:9101") == ("::1", 9101)
    (tmp_path / "config.toml").write_text(
        'wallet_address = "0x1111111111111111111111111111111111111111"\n'
        'metrics_address = "localhost:99999"\n'
    )
    with pytest.raises(UsageError, match="HOST:PORT"):
        load_config(tmp_path)


# --- GPU sampling (through the recorded-NVML hook; the real child process runs) --------------


def recording(tmp_path: Path, doc: dict) -> dict[str, str]:
    path = tmp_path / "nvml.json"
    path.write_text(json.dumps(doc))
    return {
        "NODECLIENT_NVML_REPLAY": str(path),
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": ":".join(sys.path),
    }


def test_gpu_sampler_reports_utilisation(tmp_path: Path) -> None:
    """The sampler child reports each card's utilisation and memory; metrics carry them."""
    env = recording(
        tmp_path,
        {
            "devices": [
                {
                    "name": "NVIDIA H100 80GB HBM3",
                    "memory_total": 85520809984,
                    "memory_used": 1 << 30,
                    "utilization": 37,
                }
            ]
        },
    )
    sampler = nm.GpuSampler(interval=0.2, env=env).start()
    try:
        snap = wait_for(
            lambda: (s := sampler.latest()).status == "ok" and s, timeout=30, what="a GPU sample"
        )
    finally:
        sampler.close()
    (gpu,) = snap.devices
    assert (gpu.name, gpu.util_percent, gpu.mem_used_bytes) == (
        "NVIDIA H100 80GB HBM3",
        37,
        1 << 30,
    )
    m = nm.NodeMetrics()
    m.update_gpus(snap)
    s = samples(m.exposition())
    assert value(s, "gpu_utilization_percent", gpu="0", model="NVIDIA H100 80GB HBM3") == 37


def test_gpu_sampler_restarts_after_an_error_and_drops_stale_figures(tmp_path: Path) -> None:
    """The child dies: the gauges drop the last figures instead of showing them for ever,
    and a fresh child, started after the retry delay, reports again."""
    env = recording(tmp_path, {"devices": [{"name": "B", "memory_total": 10, "utilization": 80}]})
    sampler = nm.GpuSampler(interval=0.2, env=env, retry_after=0.3).start()
    m = nm.NodeMetrics(gpu=sampler)
    try:
        wait_for(lambda: sampler.latest().status == "ok", timeout=30, what="a GPU sample")
        m.update_status(status())
        assert value(samples(m.exposition()), "gpu_utilization_percent", gpu="0", model="B") == 80
        child = sampler._proc
        assert child is not None
        os.killpg(child.pid, signal.SIGKILL)  # the child dies (a driver fault, say)
        error = wait_for(
            lambda: (s := sampler.latest()).status == "error" and s, timeout=30, what="the error"
        )
        assert error.detail == "the NVML sampler exited"
        m.update_status(status())
        assert not [k for k in samples(m.exposition()) if k[0].startswith("gpu_")]
        wait_for(lambda: sampler.latest().status == "ok", timeout=30, what="a sample again")
        assert sampler._proc is not child
        m.update_status(status())
    finally:
        sampler.close()
    assert value(samples(m.exposition()), "gpu_utilization_percent", gpu="0", model="B") == 80


def test_gpu_sampler_never_waits_on_a_child_it_killed(tmp_path: Path) -> None:
    """A child that stays after SIGKILL (a wedged driver keeps it in uninterruptible sleep)
    is reaped in the background: latest() and close() return at once."""
    import subprocess
    import threading
    import time

    child = subprocess.Popen(["sleep", "60"], start_new_session=True)
    released = threading.Event()
    real_wait = child.wait

    def stuck_wait(timeout: float | None = None) -> int:
        if threading.current_thread() is threading.main_thread():
            raise AssertionError("the caller waited on a child it could not kill")
        released.wait()  # the reaper: until the driver lets go
        return real_wait(timeout)

    real_poll = child.poll
    child.wait = stuck_wait  # type: ignore[method-assign]
    child.poll = lambda: real_poll() if released.is_set() else None  # type: ignore[method-assign]
    sampler = nm.GpuSampler(interval=0.01, retry_after=0.0)
    sampler._proc = child  # a child that has gone quiet
    sampler._last_line -= 60
    started = time.monotonic()
    try:
        assert sampler.latest().status == "error"
        # Retries come, but no new child is started while the stuck one is there (it would
        # hang the same way: they would pile up), and it gets one reaper only.
        for _ in range(3):
            assert sampler.latest().status == "error"
            assert sampler._proc is child
        assert sampler._reaping == {child.pid}
        sampler.close()
        assert time.monotonic() - started < 2.0
    finally:
        released.set()
    assert real_wait(10) == -9  # it was killed, and reaped
    # and its pid forgotten, so a later child that is given the same pid gets a reaper
    wait_for(lambda: not sampler._reaping, timeout=10, what="the reaper to finish")


def test_gpu_sampler_without_driver_says_no_gpu(tmp_path: Path) -> None:
    """No NVIDIA driver: one no-gpu answer, and the child exits."""
    env = recording(tmp_path, {"error": "NVML_ERROR_LIBRARY_NOT_FOUND"})
    sampler = nm.GpuSampler(interval=0.2, env=env).start()
    try:
        snap = wait_for(
            lambda: (s := sampler.latest()).status != "pending" and s,
            timeout=30,
            what="the sampler's answer",
        )
    finally:
        sampler.close()
    assert snap.status == "no-gpu" and "LIBRARY_NOT_FOUND" in snap.detail


H100_AT_37 = {"name": "NVIDIA H100 80GB HBM3", "memory_total": 85520809984, "utilization": 37}


def test_an_nvml_that_failed_to_start_is_an_error_and_retried(tmp_path: Path) -> None:
    """nvmlInit fails with NVML_ERROR_UNKNOWN on a machine with a card: an error, not "no
    GPU here", so a fresh child tries again, and once the driver answers the GPU gauges
    are back, instead of gone for the daemon's life."""
    env = recording(tmp_path, {"error": "NVML_ERROR_UNKNOWN", "devices": [H100_AT_37]})
    sampler = nm.GpuSampler(interval=0.2, env=env, retry_after=0.3).start()
    m = nm.NodeMetrics(gpu=sampler)
    try:
        error = wait_for(
            lambda: (s := sampler.latest()).status != "pending" and s,
            timeout=30,
            what="the sampler's answer",
        )
        assert error.status == "error" and "NVML_ERROR_UNKNOWN" in error.detail
        Path(env["NODECLIENT_NVML_REPLAY"]).write_text(json.dumps({"devices": [H100_AT_37]}))
        wait_for(lambda: sampler.latest().status == "ok", timeout=30, what="a sample")
        m.update_status(status())
    finally:
        sampler.close()
    scrape = samples(m.exposition())
    assert value(scrape, "gpu_utilization_percent", gpu="0", model="NVIDIA H100 80GB HBM3") == 37


def test_no_driver_on_a_node_that_declared_gpus_is_an_error_and_retried(
    tmp_path: Path,
) -> None:
    """A node whose manifest declares GPUs has them: NVML finding no driver there (one
    being reloaded, say) is an error, retried, not the final "no-gpu" of a CPU-only
    machine."""
    env = recording(tmp_path, {"error": "NVML_ERROR_DRIVER_NOT_LOADED"})
    sampler = nm.GpuSampler(interval=0.2, env=env, retry_after=0.3, gpus_declared=True).start()
    try:
        error = wait_for(
            lambda: (s := sampler.latest()).status != "pending" and s,
            timeout=30,
            what="the sampler's answer",
        )
        assert error.status == "error" and "NVML_ERROR_DRIVER_NOT_LOADED" in error.detail
        assert "the node declared GPUs" in error.detail
        Path(env["NODECLIENT_NVML_REPLAY"]).write_text(json.dumps({"devices": [H100_AT_37]}))
        wait_for(lambda: sampler.latest().status == "ok", timeout=30, what="a sample")
    finally:
        sampler.close()


def test_sampler_child_says_which_start_failures_mean_no_driver(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    """The child's one line for an nvmlInit that fails: "no-gpu" only where NVML says
    there is no driver, as the hardware probe reads "no-driver"; "error" otherwise."""
    for error, expected in [
        ("NVML_ERROR_LIBRARY_NOT_FOUND", "no-gpu"),
        ("NVML_ERROR_DRIVER_NOT_LOADED", "no-gpu"),
        ("NVML_ERROR_UNKNOWN", "error"),
        ("NVML_ERROR_LIB_RM_VERSION_MISMATCH", "error"),
        ("not an NVML error", "error"),
    ]:
        env = recording(tmp_path, {"error": error})
        monkeypatch.setenv("NODECLIENT_NVML_REPLAY", env["NODECLIENT_NVML_REPLAY"])
        assert nm.sampler_main(0.0, lines=1) == 0
        (line,) = capsys.readouterr().out.splitlines()
        answer = json.loads(line)
        assert (answer["status"], answer["devices"]) == (expected, []), error
        assert error in answer["detail"]


def test_sampler_child_line_format(tmp_path: Path, capsys, monkeypatch) -> None:
    """The child prints one JSON line per interval in the documented shape."""
    env = recording(tmp_path, {"devices": [{"name": "A", "memory_total": 100, "utilization": 5}]})
    monkeypatch.setenv("NODECLIENT_NVML_REPLAY", env["NODECLIENT_NVML_REPLAY"])
    assert nm.sampler_main(0.0, lines=2) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert json.loads(lines[0]) == {
        "status": "ok",
        "detail": "",
        "devices": [
            {
                "index": 0,
                "name": "A",
                "util_percent": 5,
                "mem_used_bytes": 0,
                "mem_total_bytes": 100,
            }
        ],
    }


# --- the coordinator's /metrics ---------------------------------------------------------------


@pytest.fixture
def coordinator(tmp_path: Path):
    running, server, thread = start(config_for(data_dir=tmp_path), ManualClock(START))
    yield running
    stop(running, server, thread)


def test_coordinator_counts_latency_verification_and_queue(coordinator) -> None:
    """A job that waited 5 s, a result with a bad proof, then the right one: every metric moves."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    node = make_node([key], 0)
    coordinator.register(node)
    payload = inference_payload(VALUES)
    job = coordinator.client.submit_job("ai.inference", payload)
    scrape = lambda: samples(httpx.get(f"{coordinator.url}/metrics", timeout=10).text)  # noqa: E731
    before = scrape()
    assert value(before, "queue_depth") == 1 and value(before, "nodes_registered") == 1
    coordinator.clock.advance(5.0)  # the task waits 5 s for a node
    coordinator.link(node)
    dispatch = node.recv()
    assert dispatch["type"] == "dispatch"
    bad = node.call(node.result(dispatch, inference_result(payload, VALUES), proof=b"\0" * 32))
    assert bad["status"] == "rejected"
    during = scrape()
    assert value(during, "verification_failures_total", check="proof") == 1
    assert value(during, "dispatch_latency_seconds_count") == 1
    assert value(during, "dispatch_latency_seconds_sum") == 5.0
    assert value(during, "queue_depth") == 0 and value(during, "tasks", status="leased") == 1
    assert (
        sum(
            value(during, "nodes_online", state=s)
            for s in ("READY", "EXECUTING", "IDLE", "UNSTAKING")
        )
        == 1
    )
    assert (
        node.call(node.result(dispatch, inference_result(payload, VALUES)))["status"] == "accepted"
    )
    coordinator.wait_job(job["job_id"], "succeeded")
    after = scrape()
    assert value(after, "tasks", status="succeeded") == 1
    assert value(after, "jobs", status="succeeded") == 1
    assert value(after, "dispatch_latency_seconds_count") == 1  # never counted twice
    assert value(after, "verification_failures_total", check="proof") == 1


def test_concurrent_scrapes_share_one_read(coordinator, monkeypatch: pytest.MonkeyPatch) -> None:
    """GET /metrics needs no authentication: requests that come while a scrape runs share
    its one database read instead of queueing one each; a later request reads afresh."""
    import time as _time
    from concurrent.futures import ThreadPoolExecutor

    from nodeclient.coordinator import metrics as cm

    reads: list[int] = []
    real = cm.read_facts

    def slow(*args, **kwargs):  # type: ignore[no-untyped-def]
        reads.append(1)
        _time.sleep(0.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(cm, "read_facts", slow)
    url = f"{coordinator.url}/metrics"
    with ThreadPoolExecutor(max_workers=12) as pool:
        answers = list(pool.map(lambda _i: httpx.get(url, timeout=10), range(12)))
    assert all(a.status_code == 200 and "queue_depth" in a.text for a in answers)
    assert len(reads) <= 2  # twelve at once: one read (two if some came just after it)
    before = len(reads)
    assert httpx.get(url, timeout=10).status_code == 200
    assert len(reads) == before + 1


def test_coordinator_metrics_refuse_unknown_check() -> None:
    """Only the named verification checks are counted."""
    with pytest.raises(ValueError, match="unknown verification check"):
        CoordinatorMetrics().verification_failed("vibes")


# --- end to end: real processes ---------------------------------------------------------------


@pytest.mark.timeout(240)
def test_metrics_move_as_a_network_runs_jobs(tmp_path: Path) -> None:
    """Coordinator and node daemon processes: two jobs move tasks_total and the coordinator's counts."""
    clock_file = tmp_path / "clock"
    clock_file.write_text("0")
    coord = CoordinatorProc(tmp_path, clock_file=clock_file)
    coord.start()
    node = NodeProc(tmp_path, "n1", coordinator=coord.url, clock_file=clock_file)
    port = free_port()
    with open(node.home / "config.toml", "a") as fh:  # the config route to the opt-in address
        fh.write(f'metrics_address = "127.0.0.1:{port}"\n')
    node.start()
    node_scrape = lambda: samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)  # noqa: E731
    coord_scrape = lambda: samples(httpx.get(f"{coord.url}/metrics", timeout=5).text)  # noqa: E731
    try:
        node.wait_linked()
        first = wait_for(
            lambda: (s := node_scrape()) and value(s, "link_up") == 1 and s,
            what="link_up in the node's metrics",
        )
        assert value(first, "node_state", state="READY") == 1
        done = ("tasks_total", {"workload_class": "ai.inference", "outcome": "completed"})
        assert value(first, done[0], **done[1]) == 0
        assert value(coord_scrape(), "tasks", status="succeeded") == 0
        client = coord.client()
        x = np.arange(12, dtype=np.float32).reshape(3, 4)
        jobs = [
            client.submit_job("ai.inference", make_request(identity_model(), {"x": x + i}).encode())
            for i in range(2)
        ]
        for job in jobs:
            wait_for(
                lambda j=job: client.job(j["job_id"])["status"] == "succeeded", what="job success"
            )
        s = wait_for(
            lambda: (
                (s := node_scrape())
                and value(s, "node_state", state="IDLE") == 1
                and value(s, "outbox_backlog") == 0
                and s
            ),
            what="IDLE, backlog 0",
        )
        assert value(s, done[0], **done[1]) == 2
        assert value(s, "task_duration_seconds_count", workload_class="ai.inference") == 2
        assert value(s, "heartbeat_rtt_seconds") > 0
        c = coord_scrape()
        assert (
            value(c, "tasks", status="succeeded") == 2 and value(c, "jobs", status="succeeded") == 2
        )
        assert value(c, "dispatch_latency_seconds_count") == 2
        assert value(c, "queue_depth") == 0 and value(c, "nodes_registered") == 1
        wait_for(
            lambda: value(coord_scrape(), "nodes_online", state="IDLE") == 1,
            what="the coordinator sees the node IDLE",
        )
        assert uuid.UUID(jobs[0]["job_id"])
    finally:
        assert node.stop() == 0
        coord.stop()


def test_status_refresh_takes_the_gpu_sample(tmp_path: Path) -> None:
    """With a sampler attached, each status refresh also updates the GPU gauges."""
    env = recording(tmp_path, {"devices": [{"name": "B", "memory_total": 10, "utilization": 80}]})
    sampler = nm.GpuSampler(interval=0.2, env=env).start()
    m = nm.NodeMetrics(gpu=sampler)
    try:
        wait_for(lambda: sampler.latest().status == "ok", timeout=30, what="a GPU sample")
        m.update_status(status())
    finally:
        sampler.close()
    assert value(samples(m.exposition()), "gpu_utilization_percent", gpu="0", model="B") == 80


def test_a_restarted_coordinator_counts_only_its_own_leases(tmp_path: Path) -> None:
    """The lease-wait histogram is per process, as Prometheus counters are: a restart does
    not count the history again (its first scrape read every attempt ever, on the one
    database thread results and heartbeats wait for), and a scrape reads a bounded batch."""
    from nodeclient.coordinator import models as m
    from nodeclient.coordinator.metrics import read_facts

    config = config_for(data_dir=tmp_path)
    running, server, thread = start(config, ManualClock(START))
    try:

        def history(s) -> None:
            s.add(m.Job(job_id="j", workload_class="ai.inference", status="succeeded",
                        min_tier=0, slices=1, meta="{}", created_at=START))  # fmt: skip
            s.flush()
            for i in range(25):
                s.add(m.Task(task_id=f"t{i}", job_id="j", slice_index=0, slice_count=1,
                             status="succeeded", attempts=1, queued_at=START, payload=b""))  # fmt: skip
                s.flush()
                s.add(m.TaskAttempt(task_id=f"t{i}", attempt=1, node_id="0xA",
                                    leased_at=START + 1, deadline=START + 9))  # fmt: skip

        running.coord.db.run_sync(history)
        batch = running.coord.db.run_sync(lambda s: read_facts(s, after_attempt=0, limit=10))
        assert len(batch.waits) == 10 and batch.last_attempt_id == 10
    finally:
        stop(running, server, thread)
    again, server, thread = start(config, ManualClock(START))
    try:
        text = httpx.get(f"{again.url}/metrics", timeout=10).text
        assert value(samples(text), "dispatch_latency_seconds_count") == 0
    finally:
        stop(again, server, thread)


def test_the_gpu_sampler_reads_a_real_cards_recording() -> None:
    """The sampler child's line for NVML's answers recorded on a real, idle H100 is the line
    it printed there (bench/gpu.py): utilisation and memory in use as NVML gave them."""
    recording = Path(__file__).parent / "fixtures" / "nvml" / "h100_80gb_hbm3_recorded.json"
    replay = nm._Replay(str(recording))
    replay.nvmlInit()
    assert nm.sample_once(replay) == {
        "status": "ok",
        "detail": "",
        "devices": [
            {
                "index": 0,
                "name": "NVIDIA H100 80GB HBM3",
                "util_percent": 0,
                "mem_used_bytes": 506724352,
                "mem_total_bytes": 85520809984,
            }
        ],
    }
