"""A task's deadline after the system was suspended: the event loop's timers run on
CLOCK_MONOTONIC, which stops in suspend, so a task would run on past its lease by as long
as the system slept. The executor reads its own clock (CLOCK_BOOTTIME, which runs on) and
stops the task; here that clock is injected and moved on, as a resume would."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from nodeclient.node import exec_config, sandbox
from nodeclient.node import executor as executor_module
from nodeclient.node.executor import Executor, TaskFailed
from tests.node.sandbox_harness import HOSTILE, make_executor

SLEPT = 3600.0


def _executor(home: Path, clock: Callable[[], float]) -> Executor:
    config = make_executor(home, mode=sandbox.MODE_UNSANDBOXED, preload=()).config
    return Executor(slots=1, mode=sandbox.MODE_UNSANDBOXED, config=config, clock=clock)


def _sleep(seconds: float) -> bytes:
    return json.dumps({"do": "sleep", "seconds": seconds}).encode()


def test_a_resume_past_the_deadline_stops_the_running_task_and_the_waiting_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two tasks with a minute left, one running (for 4 s), one waiting for the only
    slot; the system then sleeps an hour (the executor's clock jumps, the loop's does
    not). The running task is killed at its deadline, and the waiting one fails at its
    own, without waiting for the slot."""
    monkeypatch.setattr(executor_module, "DEADLINE_CHECK_S", 0.05)
    slept = [0.0]
    executor = _executor(tmp_path / "home", lambda: time.monotonic() + slept[0])

    async def scenario() -> tuple[BaseException | bytes, BaseException | bytes]:
        await executor.warm_up()
        try:
            deadline = executor.clock() + 60
            running = asyncio.create_task(
                executor.run(HOSTILE, _sleep(4), task_id="running", job_id="j", deadline=deadline)
            )
            while "running" not in executor._deadlines:
                await asyncio.sleep(0.01)
            waiting = asyncio.create_task(
                executor.run(HOSTILE, _sleep(0), task_id="waiting", job_id="j", deadline=deadline)
            )
            await asyncio.sleep(0.1)  # waiting for the slot
            slept[0] = SLEPT  # suspended, and resumed
            ran, waited = await asyncio.gather(running, waiting, return_exceptions=True)
            return ran, waited
        finally:
            await executor.aclose()

    ran, waited = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert isinstance(ran, TaskFailed), ran
    assert ran.reason.startswith("deadline exceeded: killed after 36")  # hours, as slept
    assert isinstance(waited, TaskFailed), waited
    assert waited.reason == "deadline exceeded while waiting for a free worker"


def test_the_deadline_clock_counts_suspended_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default clock of deadlines reads as time.monotonic until the system suspends,
    then runs ahead of it by the time suspended (CLOCK_BOOTTIME, which Linux has)."""
    assert Executor(slots=1, config=exec_config.WorkerConfig(Path("/x"))).clock is (
        exec_config.deadline_clock
    )
    assert exec_config.deadline_clock() == pytest.approx(time.monotonic(), abs=1.0)
    real = time.clock_gettime

    def resumed(clock_id: int) -> float:
        return real(clock_id) + (SLEPT if clock_id == exec_config._BOOTTIME else 0.0)

    monkeypatch.setattr(time, "clock_gettime", resumed)
    assert exec_config.deadline_clock() - time.monotonic() == pytest.approx(SLEPT, abs=1.0)
