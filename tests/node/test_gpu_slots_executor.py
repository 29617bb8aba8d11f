"""GPU slots (2.3.5 Work Execution): which card each slot gets, what its sandbox shows of it,
the limits of its worker, and what a task's declared GPU memory is checked against.

The cards come from recorded NVML answers (tests/node/fixtures/nvml) through the real probe
child; device files are fakes in a directory of their own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from nodeclient.node import hardware, sandbox
from nodeclient.node.exec_config import gpus_from_probe
from nodeclient.node.executor import Executor, TaskFailed, WorkerConfig
from nodeclient.node.nvml_probe import REPLAY_ENV
from nodeclient.node.sandbox import MODE_BWRAP, MODE_UNSANDBOXED, Limits, SlotGpu
from tests.node.sandbox_harness import HERE, HOSTILE, HOSTILE_FACTORY

FIXTURES = Path(__file__).parent / "fixtures" / "nvml"
MIXED = "mixed_4090_t4_minor_numbers.json"
# NVML order of the recording: (uuid, minor number, bytes)
MIXED_CARDS = (
    ("GPU-9b1e6f1a-3c55-4f0e-8d7e-0a4b1c2d3e4f", 2, 25757220864),
    ("GPU-5f0c2a77-81d4-4b39-9a61-6e2d3c4b5a69", 0, 15843721216),
    ("GPU-e4a8d0c3-6b2f-47a1-b5c9-3d7e8f9a0b1c", 1, 25757220864),
)
H100_BYTES = 85520809984  # NVML's memory.total of an H100 80GB HBM3: 81559 MiB, "80 GB"


def probed(name: str, **env: str) -> hardware.GpuProbe:
    """The recorded machine *name*, with *env* (CUDA_VISIBLE_DEVICES, say) added to ours
    less our own CUDA_VISIBLE_DEVICES."""
    ours = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    probe = hardware.probe_gpus(timeout=10.0, env={**ours, REPLAY_ENV: str(FIXTURES / name), **env})
    assert probe.status == "ok", probe.detail
    return probe


def executor(tmp_path: Path, gpus: tuple[SlotGpu, ...], *, slots: int, mode: str) -> Executor:
    return Executor(
        slots=slots,
        mode=mode,
        config=WorkerConfig(
            cache_dir=tmp_path / "models",
            gpus=gpus,
            work_root=tmp_path / "work",
            runtimes={HOSTILE: HOSTILE_FACTORY},
            preload=(),
            extra_python_path=(HERE,),
            limits=Limits(memory_bytes=2 << 30, nproc=96, nofile=128, fsize_bytes=8 << 20),
            threads=1,
        ),
    )


def unsandboxed(
    tmp_path: Path,
    cards: tuple[SlotGpu, ...],
    runtimes: dict[str, str],
    *,
    slots: int = 1,
    **kwargs: Any,
) -> Executor:
    """An unsandboxed executor whose slots get *cards*, serving *runtimes* (this
    directory's stand-ins on the workers' path); *kwargs* go to Executor (a clock)."""
    return Executor(
        slots=slots,
        mode=MODE_UNSANDBOXED,
        config=WorkerConfig(
            cache_dir=tmp_path / "models", gpus=cards, work_root=tmp_path / "work",
            runtimes=runtimes, preload=(), extra_python_path=(HERE,), threads=1,
        ),
        **kwargs,
    )  # fmt: skip


@pytest.fixture
def fake_dev(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Device files of the recorded machine, in a directory the sandbox takes for /dev."""
    dev = tmp_path / "dev"
    dev.mkdir()
    for name in ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia0", "nvidia1", "nvidia2"):
        (dev / name).touch()
    monkeypatch.setattr(sandbox, "DEV", dev)
    return dev


def _config_of(argv: list[str]) -> dict[str, object]:
    at = argv.index("--config")
    config: dict[str, object] = json.loads(argv[at + 1])
    return config


def test_slots_get_the_cards_in_nvml_order_with_uuid_and_minor(tmp_path: Path) -> None:
    """Slot i gets NVML's card i (not the manifest's groups, which put both RTX 4090s first),
    named by its UUID, with its minor number and exact memory in the worker's config."""
    gpus = gpus_from_probe(probed(MIXED).per_device)
    assert gpus == tuple(SlotGpu(uuid=u, minor=m, vram_bytes=b) for u, m, b in MIXED_CARDS)
    ex = executor(tmp_path, gpus, slots=3, mode=MODE_UNSANDBOXED)
    ex._build_slots()
    try:
        for slot, (uuid, minor, vram) in zip(ex._slots, MIXED_CARDS, strict=True):
            assert slot.env["CUDA_VISIBLE_DEVICES"] == uuid
            assert slot.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
            assert _config_of(slot.argv)["gpus"] == [
                {"uuid": uuid, "minor": minor, "vram_bytes": vram}
            ]
    finally:
        ex.shutdown()


def test_cuda_visible_devices_of_the_daemon_chooses_the_slots_cards(tmp_path: Path) -> None:
    """With CUDA_VISIBLE_DEVICES=2,GPU-9b1e6f1a the slots get NVML's card 2, then card 0."""
    probe = probed(MIXED, CUDA_VISIBLE_DEVICES="2,GPU-9b1e6f1a")
    gpus = gpus_from_probe(probe.per_device)
    assert [g.uuid for g in gpus] == [MIXED_CARDS[2][0], MIXED_CARDS[0][0]]
    assert [(g.model, g.count) for g in probe.gpus] == [("NVIDIA GeForce RTX 4090", 2)]


def test_sandbox_binds_the_device_file_of_the_cards_minor_number(
    tmp_path: Path, fake_dev: Path
) -> None:
    """/dev/nvidia<minor> is bound, not /dev/nvidia<index>: the recording's card 0 has minor
    number 2. The driver's shared device files are bound too; no other card's."""
    gpus = gpus_from_probe(probed(MIXED).per_device)
    ex = executor(tmp_path, gpus, slots=1, mode=MODE_BWRAP)
    ex._build_slots()
    try:
        argv = ex._slots[0].argv
    finally:
        ex.shutdown()
    bound = [(argv[i + 1], argv[i + 2]) for i, a in enumerate(argv) if a == "--dev-bind"]
    assert bound == [
        (str(fake_dev / name), f"/dev/{name}")
        for name in ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia2")
    ]
    set_env = {argv[i + 1]: argv[i + 2] for i, a in enumerate(argv) if a == "--setenv"}
    assert set_env["CUDA_VISIBLE_DEVICES"] == MIXED_CARDS[0][0]


def test_missing_device_files_are_named_with_the_fix(fake_dev: Path) -> None:
    """nvidiactl and nvidia-uvm, and each card's own file, are required; the tools node is
    not. The fix names `nvidia-modprobe -u -c=0`."""
    (fake_dev / "nvidia-uvm").unlink()
    (fake_dev / "nvidia-uvm-tools").unlink()
    assert sandbox.missing_gpu_nodes([0, 2]) == [fake_dev / "nvidia-uvm"]
    assert sandbox.missing_gpu_nodes([]) == []
    assert sandbox.missing_gpu_nodes([7], dev=fake_dev) == [
        fake_dev / "nvidia-uvm",
        fake_dev / "nvidia7",
    ]
    problem = sandbox.gpu_nodes_problem([0])
    assert problem is not None
    assert problem[0] == f"GPUs are declared, but {fake_dev / 'nvidia-uvm'} is missing"
    assert "`nvidia-modprobe -u -c=0`" in problem[1]
    assert sandbox.gpu_nodes_problem([]) is None


def test_vram_admission_uses_the_cards_exact_size(tmp_path: Path) -> None:
    """An H100 holds 81559 MiB: a task declaring 81560 MB is refused, though the manifest's
    rounded 80 GiB (81920 MB) would have let it in; 81559 MB is admitted."""
    gpus = gpus_from_probe(probed("h100_x1.json").per_device)
    assert gpus[0].vram_bytes == H100_BYTES
    ex = executor(tmp_path, gpus, slots=1, mode=MODE_UNSANDBOXED)
    assert ex.admission({"vram_mb": H100_BYTES >> 20}) == ""
    refusal = ex.admission({"vram_mb": 81700})
    assert refusal == "task needs 81700 MB of GPU memory, a slot's GPU has 81559 MB"
    assert ex.admission({"vram_mb": (H100_BYTES >> 20) + 1}) != ""


def test_vram_admission_counts_the_smallest_card(tmp_path: Path) -> None:
    """A slot may get any card: the T4 (15109 MiB) is what every task can count on."""
    ex = executor(tmp_path, gpus_from_probe(probed(MIXED).per_device), slots=3, mode=MODE_BWRAP)
    assert ex.admission({"vram_mb": 15109}) == ""
    assert "a slot's GPU has 15109 MB" in ex.admission({"vram_mb": 15110})


def _address_space(limits_text: str) -> list[str]:
    line = next(x for x in limits_text.splitlines() if x.startswith("Max address space"))
    return line.split()[3:5]  # soft, hard


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _limits_seen(ex: Executor, loop: asyncio.AbstractEventLoop) -> list[str]:
    """A task that declares 64 MB of RAM reads its own address-space limits."""
    order = json.dumps({"do": "read", "path": "/proc/self/limits"}).encode()
    try:
        raw = loop.run_until_complete(
            ex.run(HOSTILE, order, job_id="limits", resources={"ram_mb": 64})
        )
    finally:
        loop.run_until_complete(ex.aclose())
    return _address_space(json.loads(raw))


def test_a_gpu_workers_address_space_is_not_limited(
    tmp_path: Path, loop: asyncio.AbstractEventLoop
) -> None:
    """A worker with a GPU has no RLIMIT_AS, not even the per-task one of a task that
    declares its RAM (CUDA reserves tens of GB of address space when it starts); a CPU
    worker keeps both, and its task's RAM is still checked on arrival."""
    gpu = SlotGpu(uuid="GPU-9b1e6f1a-3c55-4f0e-8d7e-0a4b1c2d3e4f", minor=0, vram_bytes=1 << 34)
    with_gpu = executor(tmp_path / "gpu", (gpu,), slots=1, mode=MODE_BWRAP)
    assert _limits_seen(with_gpu, loop) == ["unlimited", "unlimited"]
    with pytest.raises(TaskFailed, match="per slot"):  # RAM admission applies all the same
        loop.run_until_complete(with_gpu.run(HOSTILE, b"{}", resources={"ram_mb": 4096}))
    cpu = executor(tmp_path / "cpu", (), slots=1, mode=MODE_BWRAP)
    soft, hard = _limits_seen(cpu, loop)
    assert hard == str(2 << 30)
    assert int(soft) < 2 << 30  # lowered to what the worker holds plus the task's 64 MB


def test_a_class_broken_on_every_gpu_slot_is_withdrawn_before_registering(
    tmp_path: Path, fake_dev: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A runtime whose self-check fails in every worker (CUDA that does not load on the GPU
    slots) is left out of the manifest the daemon registers with, saying why, rather than
    offered and failing every task; on a node without GPUs it stays."""
    from nodeclient.node.daemon import NodeDaemon
    from tests.node.test_daemon_outbox import make_daemon
    from tests.node.test_daemon_start import _start_and_stop

    checked = "test.self_check"

    def node(gpus: tuple[SlotGpu, ...], home: Path) -> NodeDaemon:
        home.mkdir()
        daemon, _, _ = make_daemon(home)
        daemon.executor = Executor(
            slots=2, mode=MODE_UNSANDBOXED,
            config=WorkerConfig(
                cache_dir=home / "models", gpus=gpus, work_root=home / "work",
                runtimes={checked: "self_check_runtime:factory", HOSTILE: HOSTILE_FACTORY},
                preload=(), extra_python_path=(HERE,), threads=1,
            ),
        )  # fmt: skip
        daemon.classes = frozenset({checked, HOSTILE})
        daemon.manifest = {**daemon.manifest, "workload_classes": [checked, HOSTILE]}
        return daemon

    cards = tuple(SlotGpu(uuid, minor, vram) for uuid, minor, vram in MIXED_CARDS[:2])
    gpu_node = node(cards, tmp_path / "gpu")
    with caplog.at_level(logging.WARNING, logger="nodeclient.node"):
        _start_and_stop(gpu_node)  # its coordinator never answers: it never registers
    assert gpu_node.manifest["workload_classes"] == [HOSTILE]
    assert gpu_node.classes == frozenset({HOSTILE})
    (said,) = [r for r in caplog.records if r.msg == "workload.withdrawn"]
    assert said.workload_class == checked  # type: ignore[attr-defined]
    assert "did not load on this GPU slot" in said.reason  # type: ignore[attr-defined]

    cpu_node = node((), tmp_path / "cpu")
    _start_and_stop(cpu_node)
    assert cpu_node.manifest["workload_classes"] == [checked, HOSTILE]


def _registering_daemon(tmp_path: Path, workload_class: str) -> tuple[Any, list[list[str]]]:
    """A daemon offering *workload_class*, whose registrations are recorded (the classes
    each one sent) instead of sent."""
    from tests.node.test_daemon_outbox import make_daemon

    (tmp_path / "home").mkdir()
    daemon, _, _ = make_daemon(tmp_path / "home")
    daemon.classes = frozenset({workload_class})
    daemon.manifest = {**daemon.manifest, "workload_classes": [workload_class]}
    registered: list[list[str]] = []

    async def register() -> dict[str, object]:
        registered.append(list(daemon.manifest["workload_classes"]))
        return {}

    daemon.register = register
    return daemon, registered


def _node_whose_card_falls_off(tmp_path: Path) -> tuple[Any, list[list[str]]]:
    """A recording daemon (_registering_daemon) with one GPU slot serving ``test.gpu``,
    whose card goes away once ``card-gone`` is written in the model cache."""
    daemon, registered = _registering_daemon(tmp_path, "test.gpu")
    cards = (SlotGpu(*MIXED_CARDS[0]),)
    daemon.executor = unsandboxed(
        tmp_path, cards, {"test.gpu": "self_check_runtime:falls_off_factory"}
    )
    return daemon, registered


def test_a_card_lost_while_the_node_runs_withdraws_its_class_and_registers_again(
    tmp_path: Path, fake_dev: Path
) -> None:
    """A card that falls off the bus after the start: its task fails as the node's, the
    worker started after it finds the class broken, and the executor says so; the daemon
    withdraws the class and registers again at once, on a link that stays up, so that
    the coordinator stops sending it work that would fail (and the node, idle for it,
    would draw ever more)."""
    gpu = "test.gpu"
    daemon, registered = _node_whose_card_falls_off(tmp_path)

    async def scenario() -> None:
        ex = daemon.executor
        try:
            await ex.warm_up()
            ex.on_worker_started = daemon._classes_changed
            assert await ex.run(gpu, b"fine") == b"fine"
            (tmp_path / "models" / "card-gone").write_text("Xid 79")
            with pytest.raises(TaskFailed) as failed:
                await ex.run(gpu, b"lost")
            assert failed.value.requester_fault is False
            async with asyncio.timeout(60):
                while not registered:
                    await asyncio.sleep(0.05)
        finally:
            await ex.aclose()

    asyncio.run(scenario())
    assert daemon.classes == frozenset()
    assert registered == [[]]  # the manifest registered again has it no more


def test_a_class_withdrawn_while_the_node_runs_is_offered_again_once_it_runs(
    tmp_path: Path, fake_dev: Path
) -> None:
    """The card comes back (a transient failure of its start, a driver reloaded): a worker
    started to run every self-check again (the daemon does so every RECHECK_WITHDRAWN_S
    while a class is withdrawn, since no task of it comes) passes it, and the class is
    offered again, the node registering again at once, rather than left out until a
    restart."""
    gpu = "test.gpu"
    daemon, registered = _node_whose_card_falls_off(tmp_path)
    gone = tmp_path / "models" / "card-gone"

    async def scenario() -> bytes:
        ex = daemon.executor
        try:
            await ex.warm_up()
            ex.on_worker_started = daemon._classes_changed
            gone.write_text("Xid 79")
            with pytest.raises(TaskFailed):
                await ex.run(gpu, b"lost")
            async with asyncio.timeout(60):
                while not registered:
                    await asyncio.sleep(0.05)
            gone.unlink()  # the card works again
            # No task of the withdrawn class comes (the node refuses it, and the
            # coordinator sends none): the daemon's periodic recheck starts a worker that
            # runs every self-check.
            assert ex.recheck()
            async with asyncio.timeout(60):
                while len(registered) < 2:
                    await asyncio.sleep(0.05)
            return await ex.run(gpu, b"fine")
        finally:
            await ex.aclose()

    assert asyncio.run(scenario()) == b"fine"
    assert daemon.classes == frozenset({gpu})
    assert registered == [[], [gpu]]


def test_a_task_of_a_class_broken_in_its_worker_is_the_nodes_failure(
    tmp_path: Path, fake_dev: Path
) -> None:
    """A worker whose runtime failed its self-check (CUDA that did not start on its card)
    answers a task of that class as the node's failure, not the requester's, and is
    replaced, so that a fresh worker checks again rather than failing every such task."""
    cards = (SlotGpu(*MIXED_CARDS[0]),)
    ex = unsandboxed(tmp_path, cards, {"test.self_check": "self_check_runtime:factory"})

    async def twice() -> list[TaskFailed]:
        failures = []
        try:
            await ex.warm_up()
            for _ in range(2):
                with pytest.raises(TaskFailed) as got:
                    await ex.run("test.self_check", b"x")
                failures.append(got.value)
        finally:
            await ex.aclose()
        return failures

    failures = asyncio.run(twice())
    for failed in failures:
        assert failed.requester_fault is False
        assert failed.reason.startswith("execution failed: RuntimeError: the CUDA execution")
    assert len(ex.start_seconds) >= 2  # the worker was started again after the first


def test_a_task_goes_to_a_slot_whose_worker_can_run_its_class(
    tmp_path: Path, fake_dev: Path
) -> None:
    """One card whose CUDA does not start (its worker reports the class broken) and one
    that works: while the good slot is idle, every task of the class goes there, rather
    than failing on the bad card as the node's failure and restarting its worker."""
    from tests.node.self_check_runtime import BAD_CARD

    cards = tuple(SlotGpu(*card) for card in MIXED_CARDS[:2])
    assert cards[0].uuid == BAD_CARD
    ex = unsandboxed(
        tmp_path, cards, {"test.one_card": "self_check_runtime:one_card_factory"}, slots=2
    )

    async def tasks() -> list[bytes]:
        try:
            await ex.warm_up()
            while not all(s.ready for s in ex._slots):  # both workers up, one broken
                await asyncio.sleep(0.01)
            assert [bool(s.broken) for s in ex._slots] == [True, False]
            # Each task its own job: none may reuse the last one's worker as it is.
            done = [await ex.run("test.one_card", b"%d" % i, job_id=f"job-{i}") for i in range(6)]
            # Two at once: the second waits for the good slot rather than take the bad one.
            done += await asyncio.gather(
                *(ex.run("test.one_card", b"%d" % i, job_id=f"job-{i}") for i in (6, 7))
            )
            # A task of no job: its worker is replaced in the background after it, and the
            # next task waits for that rather than take the bad slot.
            done.append(await ex.run("test.one_card", b"8"))
            done.append(await ex.run("test.one_card", b"9", job_id="job-9"))
            return done
        finally:
            await ex.aclose()

    assert asyncio.run(tasks()) == [b"%d" % i for i in range(10)]


def test_the_wait_for_a_slot_that_can_run_the_class_is_bounded(
    tmp_path: Path, fake_dev: Path
) -> None:
    """The good slot stays busy: a task of the class waits for it a while (5 s), then
    runs on the slot that reported the class broken and fails there as the node's
    failure. The wait is counted in polls: an executor clock that stands still (an
    injected one) must not make it wait for ever."""
    import time

    from tests.node.self_check_runtime import BAD_CARD

    cards = tuple(SlotGpu(*card) for card in MIXED_CARDS[:2])
    assert cards[0].uuid == BAD_CARD
    ex = unsandboxed(
        tmp_path, cards,
        {"test.one_card": "self_check_runtime:one_card_factory", HOSTILE: HOSTILE_FACTORY},
        slots=2, clock=lambda: 1000.0,  # a clock that stands still
    )  # fmt: skip

    def sleep(seconds: float) -> bytes:
        return json.dumps({"do": "sleep", "seconds": seconds}).encode()

    async def scenario() -> tuple[float, TaskFailed | bytes]:
        try:
            await ex.warm_up()
            while not all(s.ready for s in ex._slots):
                await asyncio.sleep(0.01)
            short = asyncio.ensure_future(ex.run(HOSTILE, sleep(0.2), job_id="short"))
            await asyncio.sleep(0.05)  # the short task takes the first free slot, the bad one
            long = asyncio.ensure_future(ex.run(HOSTILE, sleep(60), job_id="long"))
            await short
            assert not ex._slots[0].busy and ex._slots[1].busy  # the good card is taken
            started = time.monotonic()
            try:
                outcome: TaskFailed | bytes = await ex.run("test.one_card", b"x", job_id="j")
            except TaskFailed as exc:
                outcome = exc
            waited = time.monotonic() - started
            long.cancel()
            await asyncio.gather(long, return_exceptions=True)
            return waited, outcome
        finally:
            await ex.aclose()

    waited, outcome = asyncio.run(scenario())
    assert isinstance(outcome, TaskFailed), outcome
    assert outcome.requester_fault is False and BAD_CARD in outcome.reason
    assert 4.0 <= waited <= 30.0, waited  # it waited its 5 s (in polls), then gave up


def test_a_thread_a_runtimes_self_check_keeps_does_not_cost_the_worker(
    tmp_path: Path,
) -> None:
    """PyTorch starts a thread for a CUDA device at its first backward pass, and keeps it.
    Started by the runtime's self-check when the worker starts, it is counted as the
    worker's own, and the job's next tasks reuse the worker (seen on an H100 node: it was
    started inside the first slice, the worker was replaced after every slice, and each
    slice paid about 10 s for a fresh CUDA start). A thread a task starts still gets the
    worker replaced (test_executor, test_isolation)."""
    kept = "test.device_thread"
    executor = Executor(
        slots=1, mode=MODE_BWRAP,
        config=WorkerConfig(
            cache_dir=tmp_path / "models", work_root=tmp_path / "work",
            runtimes={kept: "self_check_runtime:device_thread_factory"},
            preload=(), extra_python_path=(HERE,), threads=1,
        ),
    )  # fmt: skip

    async def scenario() -> list[bytes]:
        try:
            return [
                await executor.run(kept, b"", task_id=f"t{i}", job_id="job-1") for i in range(3)
            ]
        finally:
            await executor.aclose()

    assert asyncio.run(scenario()) == [b"1", b"2", b"3"]  # one worker ran all three


def test_a_gpu_slots_worker_whose_torch_sees_no_card_withdraws_training(
    tmp_path: Path,
) -> None:
    """The training runtime checks CUDA when a worker on a GPU slot starts, as the
    inference runtime does: where torch cannot use the card (here the machine has none,
    whatever torch's build), the worker reports ai.training broken, and its slices fail as
    the node's failure, naming why, without a slice being tried on the CPU."""
    from nodeclient.node.exec_config import default_runtimes

    cards = (SlotGpu(*MIXED_CARDS[0]),)
    ex = Executor(
        slots=1, mode=MODE_UNSANDBOXED,
        config=WorkerConfig(
            cache_dir=tmp_path / "models", gpus=cards, work_root=tmp_path / "work",
            runtimes={"ai.training": default_runtimes()["ai.training"]},
            preload=(), threads=1,
        ),
    )  # fmt: skip

    async def scenario() -> tuple[dict[str, str], TaskFailed]:
        try:
            await ex.warm_up()
            broken = ex.broken_everywhere()
            with pytest.raises(TaskFailed) as got:
                await ex.run("ai.training", b"x")
            return broken, got.value
        finally:
            await ex.aclose()

    broken, failed = asyncio.run(scenario())
    assert "DeviceFailure" in broken["ai.training"]
    assert failed.requester_fault is False
    assert failed.reason.startswith("execution failed: DeviceFailure")


def test_a_program_a_task_starts_on_a_gpu_slot_gets_the_tasks_memory_not_cudas(
    tmp_path: Path,
) -> None:
    """On a GPU slot the worker's own limit must leave room for the address space CUDA
    reserved in it (tens of GB, here 32 GiB reserved by a stand-in): a program the task
    starts (Blender) holds none of it, so its limit is the task's declared memory plus the
    runtime's overhead, above what the worker held before any GPU runtime started, not
    above what it holds now. Each task sets its own; none is left for the next."""
    cards = (SlotGpu(*MIXED_CARDS[0]),)
    name = "test.reserves"
    ex = unsandboxed(
        tmp_path, cards,
        {name: "self_check_runtime:reserves_factory",
         "test.gpu_user": "self_check_runtime:gpu_user_factory"},
    )  # fmt: skip

    async def scenario() -> list[dict[str, int]]:
        try:
            answers = []
            for ram_mb in (256, 512):
                body = await ex.run(name, b"", job_id="j", resources={"ram_mb": ram_mb})
                answers.append(json.loads(body))
            body = await ex.run("test.gpu_user", b"", job_id="j", resources={"ram_mb": 256})
            answers.append(json.loads(body))
            return answers
        finally:
            await ex.aclose()

    small, large, gpu_task = asyncio.run(scenario())
    assert gpu_task["child"] is None  # a GPU task's programs get no limit, none left over
    assert small["held"] > 32 << 30  # the worker holds the reservation
    assert small["child"] < 4 << 30  # its program does not get it
    assert large["child"] - small["child"] == 256 << 20  # the declared memory, each task's


def test_a_worker_started_for_a_task_checks_that_tasks_class_alone(
    tmp_path: Path, fake_dev: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker started at warm-up checks every class. One started on a task's path (the
    slot's worker ran another job) runs only that class's self-check, since it will run no
    other: on a GPU node, an inference's worker does not import PyTorch. It is replaced
    before a task of another class, even of the same job; the worker that replaces a
    single-use one after its task, off any task's path, checks every class again. What the
    slot's last worker reported of the other classes stands, and is not logged again."""
    cards = (SlotGpu(*MIXED_CARDS[0]),)
    ex = unsandboxed(
        tmp_path,
        cards,
        {
            "test.a": "self_check_runtime:counted_a_factory",
            "test.b": "self_check_runtime:counted_b_factory",
            "test.self_check": "self_check_runtime:factory",  # fails on every GPU slot
        },
    )
    checks = tmp_path / "models" / "checks.log"

    def seen() -> str:
        return " ".join(checks.read_text().split())

    async def tasks() -> list[str]:
        try:
            await ex.warm_up()
            log = [seen()]
            assert await ex.run("test.a", b"1", job_id="job-1") == b"1"  # the warm worker
            assert await ex.run("test.b", b"2", job_id="job-2") == b"2"  # a worker for b
            log.append(seen())
            assert await ex.run("test.a", b"3", job_id="job-2") == b"3"  # same job, not b
            log.append(seen())
            assert "test.self_check" in ex._slots[0].broken
            assert await ex.run("test.b", b"4") == b"4"  # no job: single use
            for _ in range(6000):  # its replacement starts in the background (60 s at most)
                if seen().count("b") == 4 and ex._slots[0].ready:
                    break
                await asyncio.sleep(0.01)
            log.append(seen())
            return log
        finally:
            await ex.aclose()

    with caplog.at_level(logging.INFO, logger="nodeclient.node"):
        assert asyncio.run(tasks()) == ["a b", "a b b", "a b b a", "a b b a b a b"]
    started = [r for r in caplog.records if r.getMessage() == "worker.started"]
    assert [getattr(r, "for_class", None) for r in started] == [
        None, "test.b", "test.a", "test.b", None
    ]  # fmt: skip
    broken = [r for r in caplog.records if r.getMessage() == "worker.runtime_broken"]
    assert len(broken) == 2  # the two workers that ran its check


def test_a_class_that_passes_its_check_in_a_worker_started_for_it_is_no_longer_broken(
    tmp_path: Path, fake_dev: Path
) -> None:
    """The slot's first worker found the class broken (its card's CUDA did not start); a
    worker started later for a task of that class finds it working: the slot no longer
    reports it broken, and the task runs there."""
    cards = (SlotGpu(*MIXED_CARDS[0]),)
    ex = unsandboxed(
        tmp_path,
        cards,
        {"test.a": "self_check_runtime:counted_a_factory",
         "test.flaky": "self_check_runtime:flaky_factory"},
    )  # fmt: skip
    marker = tmp_path / "models" / "broken-card"
    marker.parent.mkdir(parents=True)
    marker.touch()

    async def tasks() -> tuple[dict[str, str], bytes, dict[str, str]]:
        try:
            await ex.warm_up()
            before = dict(ex._slots[0].broken)
            assert await ex.run("test.a", b"1", job_id="job-1") == b"1"
            marker.unlink()  # the card works now
            done = await ex.run("test.flaky", b"2", job_id="job-2")
            return before, done, dict(ex._slots[0].broken)
        finally:
            await ex.aclose()

    before, done, after = asyncio.run(tasks())
    assert list(before) == ["test.flaky"]
    assert done == b"2"
    assert after == {}


def _reporting_slots(*specs: tuple[bool, dict[str, str]]) -> list[SimpleNamespace]:
    """Stand-ins for slots whose workers have reported: (ready now, what was broken)."""
    return [
        SimpleNamespace(ready=ready, reported=True, checked_for=None, broken=dict(broken))
        for ready, broken in specs
    ]


def test_a_class_broken_on_one_card_stays_offered_while_the_good_slot_restarts(
    tmp_path: Path,
) -> None:
    """Two cards, the class broken on one: as the other's worker restarts (after a task,
    for another job) and the broken one's reports, the class is not broken everywhere:
    a slot that is starting counts with what its last worker found. Else the class was
    withdrawn and offered again at every such restart, each time registering again."""
    x = "ai.inference"
    daemon, registered = _registering_daemon(tmp_path, x)
    good, bad = _reporting_slots((False, {}), (True, {x: "CUDA did not start on card 1"}))
    daemon.executor._slots = [good, bad]

    async def scenario() -> None:
        daemon._classes_changed()  # the bad card's worker has started; the good one's not
        good.ready = True
        daemon._classes_changed()
        await asyncio.sleep(0.05)

    asyncio.run(scenario())
    assert registered == [] and daemon.classes == frozenset({x})


def test_a_change_made_while_the_link_is_being_made_is_registered(tmp_path: Path) -> None:
    """A class withdrawn while the link loop's own registration is in flight: that
    registration, of the manifest before the change, does not count as the current one,
    and once the link is up the node registers the change."""
    x = "ai.inference"
    daemon, registered = _registering_daemon(tmp_path, x)
    daemon._ws = None

    async def scenario() -> list[list[str]]:
        gate, linked = asyncio.Event(), asyncio.Event()

        async def register() -> dict[str, object]:
            registered.append(list(daemon.manifest["workload_classes"]))
            if len(registered) == 1:
                await gate.wait()  # the link loop's registration, in flight
            return {}

        async def connect_once() -> None:
            daemon._ws = object()  # type: ignore[assignment]
            if not daemon._registered:  # as _connect_once does once welcomed
                daemon._background(daemon._register_again())
            linked.set()
            await asyncio.sleep(3600)  # the link stays up

        daemon.register = register  # type: ignore[method-assign]
        daemon._connect_once = connect_once  # type: ignore[method-assign]
        loop = asyncio.create_task(daemon._link_loop())
        while not registered:
            await asyncio.sleep(0)
        daemon.executor._slots = _reporting_slots((True, {x: "the card is gone"}))
        daemon._classes_changed()  # a worker started meanwhile finds it broken
        gate.set()
        await linked.wait()
        async with asyncio.timeout(10):
            while len(registered) < 2:
                await asyncio.sleep(0.01)
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        return registered

    assert asyncio.run(scenario()) == [[x], []]
