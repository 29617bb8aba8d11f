"""The command line (serve and requester commands) and the blob store."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

import nodeclient
from nodeclient.coordinator.cli import main
from nodeclient.coordinator.client import CoordinatorClient
from nodeclient.coordinator.config import CoordinatorConfig
from nodeclient.errors import RemoteProtocolError, UsageError
from nodeclient.workloads import inference
from tests.coordinator.conftest import Running, inference_payload, inference_result, make_node
from tests.models import identity_model

VALUES = [3.0, 1.0]
SRC = str(Path(nodeclient.__file__).resolve().parent.parent)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["sigterm", "sighup"])
def test_serve_prints_url_and_stops_cleanly_on_sigterm(tmp_path: Path, sig: int) -> None:
    """serve --port 0 prints one "coordinator: http://HOST:PORT" line; SIGTERM exits 0,
    and so does SIGHUP (its terminal closed), whose default would end it on the spot."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "nodeclient.coordinator.cli", "serve", "--port", "0",
         "--data-dir", str(tmp_path), "--log-format", "text"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        # as started from a terminal, whatever the test runner's own SIGHUP is (nohup)
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL),  # noqa: PLW1509
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.fullmatch(r"coordinator: (http://127\.0\.0\.1:(\d+))\n", line)
        assert match, line
        assert int(match.group(2)) > 0
        assert httpx.get(match.group(1) + "/healthz").json()["status"] == "ok"
        proc.send_signal(sig)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (tmp_path / "coordinator.db").is_file()


@pytest.mark.usefixtures("restore_logging")
def test_serve_on_busy_port_is_one_line_error(coordinator: Running, capsys) -> None:
    """A port in use is a one-line error and a non-zero exit, not a traceback."""
    port = coordinator.url.rsplit(":", 1)[1]
    assert main(["serve", "--port", port, "--data-dir", str(coordinator.config.data_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nodeclient-coordinator: cannot listen on")
    assert err.count("\n") == 1


def test_submit_wait_jobs_job_and_result(coordinator: Running, rsa_keys, tmp_path, capsys) -> None:
    """submit --wait returns 0 once a node delivers; jobs, job and result show the job."""
    node = make_node(rsa_keys, 0)
    coordinator.register(node)
    coordinator.link(node)
    payload = inference_payload(VALUES)
    (tmp_path / "req.bin").write_bytes(payload)
    rc: list[int] = []
    waiter = threading.Thread(target=lambda: rc.append(main([
        "submit", "--coordinator", coordinator.url, "--class", "ai.inference",
        "--payload", str(tmp_path / "req.bin"), "--wait", "--timeout", "30",
        "--ram-mb", "512",
    ])))  # fmt: skip
    waiter.start()
    dispatch = node.recv()
    assert dispatch["resources"] == {"ram_mb": 512}
    result = inference_result(payload, VALUES)
    assert node.call(node.result(dispatch, result))["status"] == "accepted"
    waiter.join(timeout=30)
    assert rc == [0]
    job_id = capsys.readouterr().out.strip()
    assert job_id == dispatch["job_id"]

    assert main(["jobs", "--coordinator", coordinator.url]) == 0
    assert f"{job_id}  ai.inference  succeeded" in capsys.readouterr().out
    assert main(["job", job_id, "--coordinator", coordinator.url]) == 0
    shown = capsys.readouterr().out
    assert "each task needs ram_mb 512" in shown
    assert "proof 0x" in shown
    assert "signature 0x" in shown
    out = tmp_path / "result.bin"
    assert main(["result", job_id, "--coordinator", coordinator.url, "-o", str(out)]) == 0
    assert out.read_bytes() == result
    capsys.readouterr()
    missing = tmp_path / "no" / "such" / "dir" / "result.bin"
    assert main(["result", job_id, "--coordinator", coordinator.url, "-o", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write the result to" in err


def _answers(status: int, body: bytes, content_type: str = "application/json") -> CoordinatorClient:
    """A client whose every request gets *status* and *body* (a proxy, a broken server)."""

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/result"):
            return httpx.Response(status, content=body, headers={"content-type": content_type})
        job = {
            "job_id": "6f1c2a3e-9b0d-4c57-8e21-3d4f5a6b7c8d",
            "workload_class": "ai.inference",
            "status": "succeeded",
        }
        return httpx.Response(200, json={**job, "tasks": [], "result_sha256": "0" * 64})

    return CoordinatorClient("http://c.example", transport=httpx.MockTransport(answer))


@pytest.mark.parametrize(
    ("status", "body", "says"),
    [
        (301, b"<html>moved</html>", "301 <html>moved</html>"),
        (400, b'["no"]', '400 ["no"]'),
        (200, b"bytes that are not the job's result", "has SHA-256"),
    ],
)
def test_a_result_that_is_not_the_jobs_is_never_saved(status: int, body: bytes, says: str) -> None:
    """A proxy's redirect page, an error whose JSON is not an object, or bytes that do not
    match the job's published result_sha256: an error naming it, never a saved file."""
    with pytest.raises(RemoteProtocolError, match=re.escape(says)):
        _answers(status, body).job_result("j")


def test_requester_errors_are_one_line(coordinator: Running, capsys) -> None:
    """An unknown job is one line on stderr and exit 1; no traceback."""
    assert main(["job", "no-such-job", "--coordinator", coordinator.url]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "404" in err
    assert "no job no-such-job" in err


def test_unreachable_coordinator_is_one_line(capsys) -> None:
    """A coordinator that cannot be reached is a usage error (exit 2), one line."""
    assert main(["jobs", "--coordinator", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nodeclient-coordinator: cannot reach the coordinator")
    assert err.count("\n") == 1


def test_blob_upload_and_fetch(coordinator: Running) -> None:
    """Blobs are content-addressed by SHA-256 and served back byte for byte."""
    data = os.urandom(200_000)
    meta = coordinator.client.upload_blob(data)
    digest = hashlib.sha256(data).hexdigest()
    assert meta == {"sha256": digest, "url": f"/v1/blobs/{digest}", "size": len(data)}
    assert coordinator.client.blob(digest) == data
    assert (coordinator.config.blob_dir / digest).read_bytes() == data
    assert [p.name for p in coordinator.config.blob_dir.iterdir()] == [digest]  # no temp left


def test_blob_limits_and_lookups(start_coordinator) -> None:
    """Oversized uploads are 413; a malformed id is 400; an unknown one is 404."""
    running = start_coordinator(max_blob_bytes=1000)
    r = httpx.post(running.url + "/v1/blobs", content=b"x" * 1001)
    assert r.status_code == 413
    assert "1000-byte limit" in r.json()["error"]
    assert httpx.get(running.url + "/v1/blobs/xyz").status_code == 400
    assert httpx.get(running.url + "/v1/blobs/" + "0" * 64).status_code == 404


def _model_by_url(url: str | None = None) -> tuple[bytes, str, bytes]:
    """(model, its sha256, an ai.inference payload fetching it from *url*, default its blob)."""
    model = identity_model(shape=[2])
    sha = hashlib.sha256(model).hexdigest()
    request = inference.make_request(
        model, {"x": np.asarray(VALUES, dtype=np.float32)}, inline=False,
        model_url=f"/v1/blobs/{sha}" if url is None else url,
    )  # fmt: skip
    return model, sha, request.encode()


def test_inference_model_must_be_in_the_blob_store(coordinator: Running) -> None:
    """A model_url of /v1/blobs/<sha256> that the store does not hold refuses the job (400,
    naming the sha256, nothing stored); once the model is uploaded it is accepted."""
    model, sha, payload = _model_by_url()
    with pytest.raises(RemoteProtocolError, match=rf"400 .*model \(sha256 {sha}\)"):
        coordinator.client.submit_job("ai.inference", payload)
    assert coordinator.client.jobs() == []
    assert coordinator.client.upload_blob(model)["sha256"] == sha
    job = coordinator.client.submit_job("ai.inference", payload)
    assert [j["job_id"] for j in coordinator.client.jobs()] == [job["job_id"]]


def test_inference_model_at_an_external_url_is_not_looked_up(coordinator: Running) -> None:
    """A model the requester serves elsewhere is not the coordinator's to hold."""
    _model, _sha, payload = _model_by_url("https://models.example/identity.onnx")
    assert coordinator.client.submit_job("ai.inference", payload)["status"] == "queued"


def test_submit_of_a_job_with_a_missing_blob_is_one_line(
    coordinator: Running, tmp_path: Path, capsys
) -> None:
    """The CLI shows the refusal as one line on stderr, exit 1, and prints no job id."""
    _model, sha, payload = _model_by_url()
    (tmp_path / "req.bin").write_bytes(payload)
    rc = main(["submit", "--coordinator", coordinator.url, "--class", "ai.inference",
               "--payload", str(tmp_path / "req.bin")])  # fmt: skip
    assert rc == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("nodeclient-coordinator: coordinator: POST /v1/jobs: 400 ")
    assert f"model (sha256 {sha})" in err
    assert coordinator.client.jobs() == []


def test_jobs_are_listed_page_by_page(coordinator: Running) -> None:
    """GET /v1/jobs pages through the jobs oldest first: a full page carries a Link to
    the next; the client follows them; status filters; a bad cursor or status is a 400."""
    ids = [
        coordinator.client.submit_job("ai.inference", inference_payload(VALUES))["job_id"]
        for _ in range(5)
    ]
    every = coordinator.client.jobs()
    assert sorted(j["job_id"] for j in every) == sorted(ids)
    assert [(j["created_at"], j["job_id"]) for j in every] == sorted(
        (j["created_at"], j["job_id"]) for j in every
    )
    first = httpx.get(coordinator.url + "/v1/jobs", params={"limit": 2})
    assert [j["job_id"] for j in first.json()] == [j["job_id"] for j in every[:2]]
    after = first.links["next"]["url"]
    assert after.startswith("/v1/jobs?limit=2&after=")
    second = httpx.get(coordinator.url + after)
    assert [j["job_id"] for j in second.json()] == [j["job_id"] for j in every[2:4]]
    assert coordinator.client.jobs(page=2) == every
    assert coordinator.client.jobs(page=5) == every  # a full last page: one empty page more
    last = httpx.get(coordinator.url + "/v1/jobs", params={"limit": 10})
    assert "link" not in last.headers and len(last.json()) == 5
    assert coordinator.client.jobs(status="queued", page=2) == every
    assert coordinator.client.jobs(status="failed") == []
    for params in ({"after": "soon"}, {"after": "nan,x"}, {"status": "lost"}, {"limit": 0}):
        bad = httpx.get(coordinator.url + "/v1/jobs", params=params)
        assert bad.status_code == 400, params


@pytest.mark.parametrize("command", ["jobs", "job"])
def test_json_output(coordinator: Running, capsys, command: str) -> None:
    """--json prints the API's JSON."""
    job = coordinator.client.submit_job("ai.inference", inference_payload(VALUES))
    args = [command, "--json", "--coordinator", coordinator.url]
    if command == "job":
        args.insert(1, job["job_id"])
    assert main(args) == 0
    shown = json.loads(capsys.readouterr().out)
    expected = (
        coordinator.client.jobs() if command == "jobs" else coordinator.client.job(job["job_id"])
    )
    assert shown == expected


def test_a_chain_id_past_a_signed_64_bit_integer_is_refused() -> None:
    """EIP-712 takes a uint256, but the link's Challenge and SQL take 63 bits: refused at
    configuration instead of an OverflowError at the first signature."""
    with pytest.raises(UsageError, match="below 2\\*\\*63"):
        CoordinatorConfig(chain_id=2**63)
    assert CoordinatorConfig(chain_id=2**63 - 1).chain_id == 2**63 - 1
