"""Slots that get one new model at the same time fetch it once: the first task downloads
it into the model cache, the others wait for that download and find the model there.

The downloads run in the daemon's fetch threads, so these tests resolve in threads too,
against a source that holds its first download until the test releases it. A task that
waits looks at its limits every WATCH_S; its clock notes each look, which is how a test
knows that it waits, without sleeping on a guess.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from nodeclient.errors import RemoteProtocolError
from nodeclient.node import inputs
from nodeclient.node.inputs import Fetch, FetchLimits, InputDeadline, fetch_limits, resolve
from nodeclient.workloads.inference import make_request
from tests.models import add_model, identity_model

URL = "https://models.example/m.onnx"
MODEL = identity_model()
PAYLOAD = make_request(MODEL, {"x": np.ones(3, np.float32)}, inline=False, model_url=URL).encode()
WAIT_S = 10.0  # for what happens at once: only a failure waits this long


class SlowSource:
    """Serves MODEL, counting calls: the first download holds until *release* is set,
    then answers *first*; a later one answers at once, and sets *other*."""

    def __init__(self, first: bytes | Exception = MODEL) -> None:
        self.first = first
        self.calls: list[str] = []
        self.started = threading.Event()
        self.release = threading.Event()
        self.other = threading.Event()

    def __call__(self, url: str) -> bytes:
        self.calls.append(url)
        if len(self.calls) > 1:
            self.other.set()
            return MODEL
        self.started.set()
        assert self.release.wait(WAIT_S)
        if isinstance(self.first, Exception):
            raise self.first
        return self.first


def _limits(looked: threading.Event, *, deadline_s: float = 60.0) -> FetchLimits:
    """A task's limits, *deadline_s* from now, whose clock sets *looked* when read."""

    def clock() -> float:
        looked.set()
        return time.monotonic()

    return FetchLimits(
        deadline=time.monotonic() + deadline_s, cancelled=threading.Event(), clock=clock
    )


class Task:
    """One task's resolve of *payload*, in a thread of its own (a fetch thread's)."""

    def __init__(
        self,
        cache_dir: Path,
        fetch: Fetch,
        limits: FetchLimits | None = None,
        payload: bytes = PAYLOAD,
    ) -> None:
        self.outcome: list[bytes | Exception] = []

        def run() -> None:
            with contextlib.ExitStack() as stack:
                if limits is not None:
                    stack.enter_context(fetch_limits(limits))
                try:
                    got = resolve(
                        "ai.inference",
                        payload,
                        fetch=fetch,
                        cache_dir=cache_dir,
                        sandbox_owner=False,
                    )
                except Exception as exc:  # the test looks at what it was
                    self.outcome.append(exc)
                else:
                    self.outcome.append(got)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def result(self) -> bytes | Exception:
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive()
        (outcome,) = self.outcome
        return outcome


@pytest.fixture(autouse=True)
def _quick_looks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A waiting task looks at its limits every 10 ms, not every 200."""
    monkeypatch.setattr(inputs, "WATCH_S", 0.01)


def _cached(cache_dir: Path, model: bytes) -> bytes:
    return (cache_dir / "models" / hashlib.sha256(model).hexdigest()).read_bytes()


def test_two_tasks_that_need_one_new_model_at_once_fetch_it_once(tmp_path: Path) -> None:
    """While the first task downloads the model, the second waits for that download
    (rather than starting its own: twice the traffic, and the model twice in the daemon's
    memory), then finds the model in the cache. Both run it by URL, from the cache."""
    source = SlowSource()
    first = Task(tmp_path, source)
    assert source.started.wait(WAIT_S)
    second = Task(tmp_path, source, _limits(source.other))
    assert source.other.wait(WAIT_S)  # it waits (its limits looked at), or fetched too
    source.release.set()
    assert first.result() == PAYLOAD
    assert second.result() == PAYLOAD
    assert source.calls == [URL]
    assert _cached(tmp_path, MODEL) == MODEL


@pytest.mark.parametrize("stop", ["deadline", "cancelled"])
def test_a_task_waiting_for_anothers_download_stops_at_its_own_limits(
    tmp_path: Path, stop: str
) -> None:
    """The task that waits for another's download of its model stops when it is
    cancelled, or at its deadline, as its own download would, while the download it
    waited for goes on for the task that began it."""
    source = SlowSource()
    first = Task(tmp_path, source)
    assert source.started.wait(WAIT_S)
    looked = threading.Event()
    limits = _limits(looked, deadline_s=0.05 if stop == "deadline" else 60.0)
    second = Task(tmp_path, source, limits)
    assert looked.wait(WAIT_S)
    if stop == "cancelled":
        limits.cancelled.set()
    stopped = second.result()  # before the first download ends
    assert isinstance(stopped, RemoteProtocolError)
    assert stop in str(stopped)
    assert isinstance(stopped, InputDeadline) == (stop == "deadline")
    source.release.set()
    assert first.result() == PAYLOAD
    assert source.calls == [URL]


def test_when_the_download_waited_for_fails_the_waiting_task_fetches_the_model(
    tmp_path: Path,
) -> None:
    """The first task's download fails (its source answered 503, say): the task that
    waited for it then fetches the model itself, and runs."""
    source = SlowSource(first=RemoteProtocolError(f"GET {URL} answered 503"))
    first = Task(tmp_path, source)
    assert source.started.wait(WAIT_S)
    looked = threading.Event()
    second = Task(tmp_path, source, _limits(looked))
    assert looked.wait(WAIT_S)  # waiting for the first download
    source.release.set()
    assert isinstance(first.result(), RemoteProtocolError)
    assert second.result() == PAYLOAD
    assert source.calls == [URL, URL]
    assert _cached(tmp_path, MODEL) == MODEL


def test_a_download_of_one_model_holds_up_no_other(tmp_path: Path) -> None:
    """Only tasks for the same model wait for its download: another model is fetched
    meanwhile."""
    source = SlowSource()
    slow = Task(tmp_path, source)
    assert source.started.wait(WAIT_S)
    other = add_model()
    feed = {"a": np.ones((1, 3), np.float32), "b": np.ones((1, 3), np.float32)}
    url = "https://models.example/add.onnx"
    payload = make_request(other, feed, inline=False, model_url=url).encode()
    quick = Task(tmp_path, lambda url: other, payload=payload)
    assert quick.result() == payload  # while the first model's download still holds
    assert _cached(tmp_path, other) == other
    source.release.set()
    assert slow.result() == PAYLOAD
