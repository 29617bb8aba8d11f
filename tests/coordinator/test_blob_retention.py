"""The blob store's retention: what a sweep removes and what it keeps (coordinator/blobstore.py)."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from sqlalchemy import delete, update
from sqlalchemy.orm import Session

from nodeclient.clock import ManualClock
from nodeclient.coordinator import models as m
from nodeclient.coordinator import store
from nodeclient.coordinator.blobstore import STALE_TEMP_S, BlobStore, Swept, payload_blobs
from nodeclient.coordinator.cli import build_parser
from nodeclient.coordinator.config import CoordinatorConfig
from nodeclient.errors import RemoteProtocolError, UsageError
from nodeclient.workloads import inference, render
from tests.coordinator.conftest import START, Running
from tests.models import identity_model

HOUR = 3600.0


def _blob(store_: BlobStore, data: bytes) -> str:
    sha = hashlib.sha256(data).hexdigest()
    store_.store(sha, data)
    return sha


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
def blobs(tmp_path: Path, clock: ManualClock) -> BlobStore:
    return BlobStore(tmp_path / "blobs", clock=clock.now)


def test_a_blob_unused_past_retention_goes_and_the_rest_stays(
    blobs: BlobStore, clock: ManualClock
) -> None:
    old, used, running = (_blob(blobs, data) for data in (b"old", b"used again", b"in a job"))
    clock.advance(2 * HOUR)
    assert blobs.use(used)  # e.g. a node fetched it, or a new job referenced it
    fresh = _blob(blobs, b"uploaded just now")
    clock.advance(0.5 * HOUR)

    swept = blobs.sweep(in_use={running}, retention=HOUR)

    assert swept == Swept(removed=1, freed_bytes=3, kept=3, temporaries=0)
    assert sorted(p.name for p in blobs.directory.iterdir()) == sorted([used, running, fresh])
    assert not blobs.use(old)  # gone: a job that references it is refused until re-uploaded
    assert (blobs.directory / used).stat().st_mtime == START + 2 * HOUR  # dated on our clock


def test_retention_zero_keeps_every_blob(blobs: BlobStore, clock: ManualClock) -> None:
    sha = _blob(blobs, b"kept forever")
    clock.advance(10 * 365 * 24 * HOUR)
    assert blobs.sweep(in_use=set(), retention=0) == Swept(0, 0, 1, 0)
    assert blobs.use(sha)


def test_abandoned_temporaries_go_by_the_system_clock_and_foreign_files_stay(
    blobs: BlobStore, clock: ManualClock
) -> None:
    """A temporary file is an upload that stopped writing: its age is real time (the
    coordinator's clock may be offset for tests). Files the store did not name stay."""
    fd, abandoned = blobs.temporary(".upload-")
    os.close(fd)
    two_days_ago = time.time() - 2 * STALE_TEMP_S
    os.utime(abandoned, (two_days_ago, two_days_ago))
    fd, writing = blobs.temporary(".hoist-")
    os.close(fd)
    foreign = blobs.directory / "README"
    foreign.write_text("an operator's note")
    os.utime(foreign, (0, 0))
    clock.advance(30 * 24 * HOUR)  # the coordinator's clock far ahead changes nothing here

    assert blobs.sweep(in_use=set(), retention=HOUR) == Swept(0, 0, 0, 1)
    assert not Path(abandoned).exists() and Path(writing).exists() and foreign.exists()


def test_a_blob_swept_away_is_written_again_when_a_job_stores_it(
    blobs: BlobStore, clock: ManualClock
) -> None:
    sha = _blob(blobs, b"scene")
    clock.advance(2 * HOUR)
    assert blobs.sweep(in_use=set(), retention=HOUR).removed == 1
    blobs.store(sha, b"scene")
    assert (blobs.directory / sha).read_bytes() == b"scene"
    assert (blobs.directory / sha).stat().st_mtime == START + 2 * HOUR


def test_names_that_are_not_a_sha256_are_never_held(blobs: BlobStore) -> None:
    _blob(blobs, b"x")
    assert not blobs.use("../blobs")
    assert not blobs.use("A" * 64)
    with pytest.raises(ValueError, match="not a SHA-256"):
        blobs.path("0" * 63)


# --- on a running coordinator -------------------------------------------------------------


@pytest.fixture
def running(start_coordinator) -> Running:
    return start_coordinator(blob_retention=HOUR)


def _model_job(running: Running) -> tuple[str, str]:
    """Upload a model and submit an ai.inference job that fetches it: (job_id, sha256)."""
    model = identity_model(shape=[2])
    sha = running.client.upload_blob(model)["sha256"]
    request = inference.make_request(
        model, {"x": np.asarray([1.0, 2.0], dtype=np.float32)}, inline=False,
        model_url=f"/v1/blobs/{sha}",
    )  # fmt: skip
    job = running.client.submit_job("ai.inference", request.encode())
    return job["job_id"], sha


def _sweep(running: Running) -> Swept:
    in_use = running.coord.db.run_sync(store.blobs_in_use)
    return running.coord.blobs.sweep(in_use=in_use, retention=running.config.blob_retention)


def _finish(running: Running, job_id: str, status: str) -> None:
    running.coord.db.run_sync(
        lambda s: s.execute(update(m.Job).where(m.Job.job_id == job_id).values(status=status))
    )


@pytest.mark.parametrize("status", [m.SUCCEEDED, m.FAILED])
def test_a_blob_stays_while_a_job_references_it(running: Running, status: str) -> None:
    """However long a job waits for a node, its model stays; once the job has finished,
    the model goes after the retention period, and a job that needs it again is refused
    until it is uploaded again."""
    job_id, sha = _model_job(running)
    running.clock.advance(3 * HOUR)
    assert _sweep(running).removed == 0
    assert httpx.get(f"{running.url}/v1/blobs/{sha}").status_code == 200

    _finish(running, job_id, status)
    running.clock.advance(0.5 * HOUR)
    assert _sweep(running).removed == 0  # the fetch above dated it
    running.clock.advance(HOUR)
    assert _sweep(running).removed == 1
    assert httpx.get(f"{running.url}/v1/blobs/{sha}").status_code == 404
    with pytest.raises(RemoteProtocolError, match=rf"400 .*{sha}"):
        _model_job_again(running, sha)


def _model_job_again(running: Running, sha: str) -> None:
    model = identity_model(shape=[2])
    request = inference.make_request(
        model, {"x": np.asarray([1.0, 2.0], dtype=np.float32)}, inline=False,
        model_url=f"/v1/blobs/{sha}",
    )  # fmt: skip
    running.client.submit_job("ai.inference", request.encode())


def test_a_new_job_keeps_an_old_blob(running: Running) -> None:
    """Submitting a job that references a blob dates it as used."""
    first, sha = _model_job(running)
    _finish(running, first, m.SUCCEEDED)
    running.clock.advance(0.9 * HOUR)
    _model_job_again(running, sha)
    (second,) = [j["job_id"] for j in running.client.jobs() if j["job_id"] != first]
    _finish(running, second, m.SUCCEEDED)
    running.clock.advance(0.9 * HOUR)  # 1.8 h after the upload, 0.9 h after the new job
    assert _sweep(running).removed == 0


def test_a_hoisted_scene_is_referenced_by_its_job(running: Running) -> None:
    """A render job split two ways has its inline scene moved to the blob store; the job
    references it, so it stays until the job has finished."""
    scene = b"a packed .blend, as far as the coordinator cares"
    sha = hashlib.sha256(scene).hexdigest()
    payload = render.make_request(scene, frames=(0, 1), width=8, height=6, samples=1).encode()
    job = running.client.submit_job("media.render", payload, slices=2)
    running.clock.advance(2 * HOUR)
    assert running.coord.db.run_sync(store.blobs_in_use) == {sha}
    assert _sweep(running).removed == 0
    _finish(running, job["job_id"], m.FAILED)
    assert _sweep(running) == Swept(removed=1, freed_bytes=len(scene), kept=0, temporaries=0)


def test_the_coordinator_sweeps_by_itself(start_coordinator) -> None:
    """The background sweep keeps an unused blob while it is within its retention and
    removes it, unasked, once it is past."""
    running = start_coordinator(blob_retention=HOUR, blob_sweep_interval=0.05)
    sha = running.client.upload_blob(b"nobody needs this")["sha256"]
    assert (running.config.blob_dir / sha).exists()
    time.sleep(0.5)  # ten sweeps while it is within its retention
    assert (running.config.blob_dir / sha).exists()
    running.clock.advance(2 * HOUR)
    end = time.monotonic() + 10
    while (running.config.blob_dir / sha).exists():
        assert time.monotonic() < end, "the blob was not swept"
        time.sleep(0.02)


@pytest.mark.parametrize("hours", [-1.0, 0.5])
def test_a_retention_under_an_hour_is_refused(hours: float) -> None:
    """A blob checked for a job is dated then; an hour at least leaves the job ample time
    to be recorded before any sweep could remove what it references."""
    with pytest.raises(UsageError, match="0 \\(keep every blob\\) or at least 1 hour"):
        CoordinatorConfig(blob_retention=hours * HOUR)


def test_retention_settings_reach_the_config() -> None:
    assert CoordinatorConfig(blob_retention=0).blob_retention == 0
    with pytest.raises(UsageError, match="sweep interval"):
        CoordinatorConfig(blob_sweep_interval=0)
    args = build_parser().parse_args(["serve", "--blob-retention-hours", "2.5"])
    assert args.blob_retention_hours == 2.5
    assert build_parser().parse_args(["serve"]).blob_retention_hours == 7 * 24


def test_links_and_directories_are_never_held_nor_swept(
    blobs: BlobStore, clock: ManualClock
) -> None:
    target = _blob(blobs, b"a real blob")
    link = hashlib.sha256(b"link").hexdigest()
    (blobs.directory / link).symlink_to(blobs.directory / target)
    folder = hashlib.sha256(b"folder").hexdigest()
    (blobs.directory / folder).mkdir()
    assert not blobs.use(link) and not blobs.use(folder) and blobs.use(target)
    clock.advance(2 * HOUR)
    assert blobs.sweep(in_use=set(), retention=HOUR) == Swept(1, 11, 0, 0)
    assert (blobs.directory / link).is_symlink() and (blobs.directory / folder).is_dir()


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.events: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.events.append(record.getMessage())


def test_a_blob_this_process_may_not_date_or_remove_is_still_served(
    blobs: BlobStore, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another owner, a read-only mount: serving goes on, and the sweep says what it could
    not do instead of failing."""
    sha = _blob(blobs, b"owned by someone else")

    def refuse(*_args: object, **_kw: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "utime", refuse)
    monkeypatch.setattr(Path, "unlink", refuse)
    records = _Records()
    logger = logging.getLogger("nodeclient.coordinator.blobs")
    logger.addHandler(records)  # whatever logs.configure did to propagation
    try:
        assert blobs.use(sha) and blobs.use(sha)
        clock.advance(2 * HOUR)
        assert blobs.sweep(in_use=set(), retention=HOUR) == Swept(0, 0, 1, 0)
    finally:
        logger.removeHandler(records)
    assert records.events == ["blobs.undatable", "blobs.sweep_incomplete"]  # once each


def test_jobs_from_before_job_blobs_are_filled_once(running: Running) -> None:
    """A database from before jobs recorded their blobs: at start, the coordinator reads
    the blobs of every unfinished job from its task payloads, once."""
    job_id, sha = _model_job(running)
    finished, _ = _model_job(running)
    _finish(running, finished, m.SUCCEEDED)

    def as_before(s: Session) -> None:
        s.execute(delete(m.JobBlob))
        s.execute(delete(m.Meta).where(m.Meta.key == "job_blobs_filled"))

    running.coord.db.run_sync(as_before)
    assert running.coord.db.run_sync(store.blobs_in_use) == set()
    refs = payload_blobs(running.config.max_payload_bytes)
    assert running.coord.db.run_sync(lambda s: store.fill_job_blobs(s, refs)) == 1
    assert running.coord.db.run_sync(store.blobs_in_use) == {sha}
    rows = running.coord.db.run_sync(lambda s: s.query(m.JobBlob.job_id).all())
    assert [r for (r,) in rows] == [job_id]  # the finished job needs none
    assert running.coord.db.run_sync(lambda s: store.fill_job_blobs(s, refs)) == 0


def test_the_first_blob_makes_its_directory_durable_too(tmp_path: Path, fsynced: list[str]) -> None:
    """The blob directory is made at the first blob: its parent is fsynced then, or a
    crash could lose the directory (and every blob in it) though each blob's own name was
    fsynced into it. Later blobs fsync only the blob directory."""
    blobs = BlobStore(tmp_path / "data" / "blobs", clock=time.time)
    (tmp_path / "data").mkdir()
    for data in (b"first", b"second"):
        blobs.store(hashlib.sha256(data).hexdigest(), data)
    directories = [p for p in fsynced if Path(p).is_dir()]
    assert directories == [str(tmp_path / "data"), *[str(tmp_path / "data" / "blobs")] * 2]
