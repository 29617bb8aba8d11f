"""What one task can leave for the next (2.3.5 Work Execution): nothing of its files, its
memory, its processes or its code, and never a planted model.

Each task runs in the real bubblewrap sandbox through the real executor, with the hostile
test runtime (``tests/node/hostile_runtime.py``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from nodeclient.node import executor as executor_module
from nodeclient.node import sandbox
from nodeclient.node.executor import Executor, TaskFailed
from nodeclient.node.runtimes.onnx import ModelCache, OnnxRuntime
from nodeclient.node.slots import affinity_of
from nodeclient.workloads.inference import make_request
from tests.models import identity_model, matmul_relu_model
from tests.node import sandbox_harness
from tests.node.sandbox_harness import (
    HOSTILE,
    HOSTILE_FACTORY,
    INFERENCE,
    Node,
    make_executor,
    warm_node,
)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    yield from warm_node(tmp_path_factory)


# --- /tmp ---------------------------------------------------------------------------------------


def test_tmp_is_a_tmpfs_of_a_bounded_size(tmp_path: Path) -> None:
    """The sandbox's /tmp is a tmpfs of the slot's share (1/8 of its memory by default):
    its pages are memory no rlimit counts."""
    layout = sandbox.make_layout(
        workdir=tmp_path / "w", cache_dir=tmp_path / "c", tmp_bytes=64 << 20
    )
    argv = sandbox.bwrap_argv(layout, ["true"], env={}, as_root=False)
    at = argv.index("--tmpfs")
    assert argv[at - 2 : at + 2] == ["--size", str(64 << 20), "--tmpfs", "/tmp"]
    assert sandbox.Limits(memory_bytes=4 << 30).tmp_size() == 512 << 20
    assert sandbox.Limits(memory_bytes=4 << 30, tmp_bytes=1 << 20).tmp_size() == 1 << 20


def test_without_tmpfs_sizes_tmp_is_on_disk_in_the_slot(tmp_path: Path) -> None:
    """A bwrap too old to size a tmpfs gets /tmp bound from the slot's directory on disk,
    never an unbounded tmpfs."""
    layout = sandbox.make_layout(
        workdir=tmp_path / "w", cache_dir=tmp_path / "c", tmp_bytes=64 << 20, tmpfs_size=False
    )
    argv = sandbox.bwrap_argv(layout, ["true"], env={}, as_root=False)
    assert "--size" not in argv
    assert argv[argv.index("/tmp") - 2 : argv.index("/tmp") + 1] == [
        "--bind",
        str(tmp_path / "w" / "tmp"),
        "/tmp",
    ]


@pytest.mark.parametrize(
    ("version", "sized"),
    [("bubblewrap 0.6.1", False), ("bubblewrap 0.8.0", True), ("bubblewrap 0.11.0", True)],
)
def test_tmpfs_sizes_are_known_from_the_bwrap_version(
    tmp_path: Path, version: str, sized: bool
) -> None:
    fake = tmp_path / "bwrap"
    fake.write_text(f"#!/bin/sh\necho '{version}'\n")
    fake.chmod(0o755)
    assert sandbox.tmpfs_size_supported(str(fake)) is sized
    assert sandbox.tmpfs_size_supported(str(tmp_path / "missing")) is False


def test_tmp_holds_no_more_than_its_size(node: Node) -> None:
    """Files past /tmp's size (16 MiB here) fail with ENOSPC instead of taking the host's
    memory."""
    done = json.loads(node.hostile({"do": "fill", "where": "/tmp", "files": 8, "mib": 4}))
    assert done == {"written": 3, "error": "No space left on device"}


def test_tmp_is_empty_at_every_start(node: Node) -> None:
    """What a task leaves in /tmp is gone before the next task, in the same worker."""
    # Between tasks, /tmp holds only what bubblewrap made for the paths it binds below
    # /tmp (the code and the interpreter of a checkout under /tmp): nothing, usually. A
    # worker's first task may find more (what its start-up left there, removed after that
    # task): the baseline is read once a task has run in this worker.
    node.hostile({"do": "echo"})
    baseline = json.loads(node.hostile({"do": "listdir", "path": "/tmp"}))
    starts = len(node.executor.start_seconds)
    assert node.hostile({"do": "write", "path": "/tmp/left-by-a"}) == b'"written"'
    assert json.loads(node.hostile({"do": "listdir", "path": "/tmp"})) == baseline
    assert len(node.executor.start_seconds) == starts  # one worker: emptied, not replaced


def test_on_disk_tmp_is_emptied_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With /tmp on disk (an old bwrap), it is the slot's own directory, not bound by the
    tmpfs size, and emptied after every task as well."""
    monkeypatch.setattr(sandbox, "tmpfs_size_supported", lambda bwrap="bwrap": False)
    executor = make_executor(tmp_path / "home")

    async def scenario() -> tuple[bytes, bytes, bytes]:
        try:
            listdir = b'{"do": "listdir", "path": "/tmp"}'
            # (what a worker's first task makes in /tmp as it starts goes after it)
            await executor.run(HOSTILE, b'{"do": "echo", "data": "warm"}', job_id="j")
            baseline = await executor.run(HOSTILE, listdir, job_id="j")  # see above
            fill = json.dumps({"do": "fill", "where": "/tmp", "files": 5, "mib": 4}).encode()
            filled = await executor.run(HOSTILE, fill, job_id="j")
            listed = await executor.run(HOSTILE, listdir, job_id="j")
            assert len(executor.start_seconds) == 1  # one worker: emptied, not replaced
            return baseline, filled, listed
        finally:
            await executor.aclose()

    baseline, filled, listed = asyncio.run(scenario())
    assert json.loads(filled) == {"written": 5, "error": None}  # 20 MiB: past the tmpfs size
    assert json.loads(listed) == json.loads(baseline)


def test_an_on_disk_tmp_lets_the_worker_reach_code_bound_under_tmp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With /tmp on disk, the slot's directory is the sandbox's /tmp; an interpreter or a
    package installed under the host's /tmp is bound beneath it. A worker started by root
    holds no CAP_DAC_OVERRIDE (only what it needs to drop to 65534), so that directory
    must be traversable: at 0700 the worker could not start (execvp: Permission denied)."""
    import shutil

    monkeypatch.setattr(sandbox, "tmpfs_size_supported", lambda bwrap="bwrap": False)
    code = tmp_path / "code"  # under the host's /tmp, as a checkout in /tmp would be
    code.mkdir()
    shutil.copy(Path(sandbox_harness.__file__).with_name("hostile_runtime.py"), code)
    executor = make_executor(tmp_path / "home", extra_python_path=(code,))

    async def scenario() -> bytes:
        try:
            return await executor.run(HOSTILE, b'{"do": "echo", "data": "up"}', job_id="j")
        finally:
            await executor.aclose()

    assert str(tmp_path).startswith("/tmp/")  # what the test is about
    assert asyncio.run(scenario()) == b"up"


def _failed_then_next(executor: Executor, order: dict[str, object]) -> tuple[str, bytes]:
    """Run the hostile *order*, which must fail, then another job's echo: the failure's
    reason, and what the echo answered."""

    async def scenario() -> tuple[str, bytes]:
        try:
            with pytest.raises(TaskFailed) as caught:
                await executor.run(HOSTILE, json.dumps(order).encode(), job_id="j")
            after = await executor.run(HOSTILE, b'{"do": "echo", "data": "next"}', job_id="k")
            return str(caught.value), after
        finally:
            await executor.aclose()

    return asyncio.run(scenario())


def test_a_task_that_fills_its_work_directory_is_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RLIMIT_FSIZE bounds one file, not how many: a task that leaves more than
    max_work_bytes on disk in its work directory (6 files of 1 MiB against 4 MiB here) is
    killed with the reason, its files go with its worker, and the next task runs."""
    monkeypatch.setattr(executor_module, "DISK_CHECK_S", 0.1)
    executor = make_executor(tmp_path / "home", max_work_bytes=4 << 20)
    fill = {"do": "fill", "where": ".", "files": 6, "mib": 1, "sleep": 60}
    failed, after = _failed_then_next(executor, fill)
    assert failed == f"disk limit exceeded: more than {4 << 20} bytes in its work directory"
    assert after == b"next"


def test_a_task_that_makes_files_without_end_is_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Empty files take no bytes, so no byte limit sees them, but each takes an inode of
    the file system the node home shares: past max_work_entries (2,000 here) files and
    directories the task is killed with the reason, and the next task runs."""
    monkeypatch.setattr(executor_module, "DISK_CHECK_S", 0.1)
    executor = make_executor(tmp_path / "home", max_work_entries=2000)
    many = {"do": "empty_files", "n": 3000, "sleep": 60}
    failed, after = _failed_then_next(executor, many)
    assert failed == (
        "entry limit exceeded: more than 2000 files and directories in its work directory"
    )
    assert after == b"next"


# --- the model cache ------------------------------------------------------------------------


def _cached_model_payload(node: Node) -> bytes:
    """A request that names a model by URL, which the daemon has stored in the cache (as
    inputs.resolve does: handed to the sandbox uid when the node runs as root)."""
    model = matmul_relu_model()
    sha = hashlib.sha256(model).hexdigest()
    owner = (sandbox.SANDBOX_UID, sandbox.SANDBOX_GID) if os.geteuid() == 0 else None
    cache = ModelCache(node.executor.config.cache_dir / "models", max_bytes=1 << 30)
    assert cache.put(sha, model, owner=owner)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    return make_request(model, {"x": x}, inline=False, model_url=f"/v1/blobs/{sha}").encode()


def test_a_task_cannot_write_the_model_cache(node: Node) -> None:
    """The cache is bound read-only: no task can plant a file under a model's hash (the
    daemon would take the model as cached, and a later requester's task would fail) or
    fill the disk through it."""
    payload = _cached_model_payload(node)
    sha = hashlib.sha256(matmul_relu_model()).hexdigest()
    for path in (f"{sandbox.INSIDE_CACHE}/models/{sha}", f"{sandbox.INSIDE_CACHE}/junk"):
        with pytest.raises(TaskFailed) as info:
            node.hostile({"do": "write", "path": path})
        assert "Read-only file system" in info.value.reason
    assert not (node.executor.config.cache_dir / "junk").exists()
    got = node.wait(node.executor.run(INFERENCE, payload))  # the model is intact
    assert got == OnnxRuntime(cache_dir=node.executor.config.cache_dir / "models").run(payload)


def test_a_cached_model_serves_through_the_read_only_cache(node: Node) -> None:
    """A worker reads a model the daemon cached, though it cannot refresh the file's time
    (before, that refused write made every read a miss)."""
    payload = _cached_model_payload(node)
    expected = OnnxRuntime(cache_dir=node.executor.config.cache_dir / "models").run(payload)
    for _ in range(2):
        assert node.wait(node.executor.run(INFERENCE, payload)) == expected


# --- which tasks share a worker ----------------------------------------------------------------


def _inference(model: bytes, *, inline: bool = True) -> bytes:
    sha = hashlib.sha256(model).hexdigest()
    x = {"x": np.ones((2, 4), np.float32)}
    url = None if inline else f"/v1/blobs/{sha}"
    return make_request(model, x, inline=inline, model_url=url).encode()


def test_which_tasks_may_follow_in_a_worker() -> None:
    """Inferences of one model share workers, wherever the model comes from; other tasks
    share them with their own job's; a task without either shares with none."""
    model, other = matmul_relu_model(), identity_model()
    inline, by_url = _inference(model), _inference(model, inline=False)
    assert affinity_of(INFERENCE, inline, job_id="j1", key="t1") == affinity_of(
        INFERENCE, by_url, job_id="j2", key="t2"
    )
    assert affinity_of(INFERENCE, inline, job_id="j", key="t") != affinity_of(
        INFERENCE, _inference(other), job_id="j", key="t"
    )
    assert affinity_of(INFERENCE, b"garbage", job_id="j", key="t1") == ("task", "t1")
    for workload_class in ("media.render", "ai.training", HOSTILE):
        assert affinity_of(workload_class, b"x", job_id="j1", key="t1") == ("job", "j1")
        assert affinity_of(workload_class, b"x", job_id=None, key="t1") == ("task", "t1")


def _remember(node: Node, data: str, *, job_id: str | None) -> list[str]:
    out: list[str] = json.loads(node.hostile({"do": "remember", "data": data}, job_id=job_id))
    return out


def test_a_worker_is_not_shared_across_jobs(node: Node) -> None:
    """What a task of one job leaves in its worker's memory (as code that took over the
    worker would) is never there for another job's task, in either direction; tasks of
    one job share their warm worker. (Job ids of this test's own: a worker left by
    another test's job-a would otherwise be warm for the first task.)"""
    assert _remember(node, "a1", job_id="across-a") == ["a1"]
    assert _remember(node, "a2", job_id="across-a") == ["a1", "a2"]
    assert _remember(node, "victim", job_id="across-b") == ["victim"]
    assert _remember(node, "a3", job_id="across-a") == ["a3"]


def test_a_task_without_a_job_shares_its_worker_with_none(node: Node) -> None:
    """Without a job to tell whose it is, a task gets a worker of its own, replaced once
    it is done (before the next task needs one)."""
    assert _remember(node, "anonymous", job_id=None) == ["anonymous"]
    assert _remember(node, "next", job_id=None) == ["next"]
    assert _remember(node, "a", job_id="job-a") == ["a"]


def test_inferences_of_one_model_keep_their_worker_warm(node: Node) -> None:
    """Inferences of the same model run in one warm worker; another model's (or any other
    task) gets a fresh worker first."""
    same = _inference(matmul_relu_model())
    node.wait(node.executor.run(INFERENCE, same))
    starts = len(node.executor.start_seconds)
    for _ in range(3):
        node.wait(node.executor.run(INFERENCE, same))
    assert len(node.executor.start_seconds) == starts
    node.wait(node.executor.run(INFERENCE, _inference(identity_model())))
    assert len(node.executor.start_seconds) == starts + 1
    node.wait(node.executor.run(INFERENCE, same))
    assert len(node.executor.start_seconds) == starts + 2


def test_a_task_goes_to_a_worker_that_may_take_it(tmp_path: Path) -> None:
    """With two slots, a job's task goes to the worker that ran its job before, or to a
    fresh one, rather than replacing another job's warm worker."""
    executor = make_executor(
        tmp_path / "home", slots=2, preload=(), runtimes={HOSTILE: HOSTILE_FACTORY}
    )

    async def scenario() -> list[list[str]]:
        try:
            await executor.warm_up()
            seen = []
            for job, data in (("a", "a1"), ("b", "b1"), ("b", "b2"), ("a", "a2")):
                order = json.dumps({"do": "remember", "data": data}).encode()
                seen.append(json.loads(await executor.run(HOSTILE, order, job_id=job)))
            return seen
        finally:
            await executor.aclose()

    assert asyncio.run(scenario()) == [["a1"], ["b1"], ["b1", "b2"], ["a1", "a2"]]
    assert len(executor.start_seconds) == 2  # the two started at warm-up, none since


# --- memory ------------------------------------------------------------------------------------


def _has_cap_sys_resource() -> bool:
    status = Path("/proc/self/status").read_text()
    effective = int(status.split("CapEff:")[1].split()[0], 16)
    return bool(effective >> 24 & 1)  # CAP_SYS_RESOURCE


def test_the_oom_killer_takes_a_task_before_the_daemon(node: Node) -> None:
    """Every process of a worker, what its tasks fork too, has oom_score_adj 1000; where
    the daemon holds CAP_SYS_RESOURCE (root, outside a container that drops it), no task
    can lower it."""
    node.hostile({"do": "echo"})
    seen = json.loads(node.hostile({"do": "oom_score"}))
    assert seen["own"] == seen["child"] == sandbox.OOM_SCORE_ADJ
    if _has_cap_sys_resource():
        assert seen["lowered"].startswith("refused")
