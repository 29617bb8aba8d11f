"""What the sandbox and executor tests share: one warm executor per test module.

The executor serves the real ``ai.inference`` runtime and the hostile test runtime
(``tests/node/hostile_runtime.py``) side by side, in bubblewrap, with small limits so that
misbehaving tasks hit them quickly. Its event loop lives as long as the module, so workers
stay warm across tests as they do in the daemon.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from nodeclient.node.exec_config import default_runtimes
from nodeclient.node.executor import Executor, WorkerConfig
from nodeclient.node.runtimes.onnx import OnnxRuntime
from nodeclient.node.sandbox import MODE_BWRAP, Limits
from nodeclient.workloads.inference import make_request
from tests.models import matmul_relu_model

HERE = Path(__file__).resolve().parent
HOSTILE = "test.hostile"
HOSTILE_FACTORY = "hostile_runtime:factory"
INFERENCE = "ai.inference"
HOSTILE_JOB = "the hostile tests' job"
T = TypeVar("T")


@dataclass
class Node:
    """An executor and the loop it runs on, with helpers the tests share."""

    executor: Executor
    loop: asyncio.AbstractEventLoop
    home: Path

    def wait(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def hostile(self, order: dict[str, Any], **kwargs: Any) -> bytes:
        """Run a hostile task; all of them are of one job unless *job_id* says otherwise,
        so that they share a worker (a worker takes tasks of one job only)."""
        payload = json.dumps(order).encode()
        kwargs.setdefault("job_id", HOSTILE_JOB)
        return self.wait(self.executor.run(HOSTILE, payload, **kwargs))

    def inference_still_works(self) -> None:
        """A normal inference through the sandbox gives OnnxRuntime's exact bytes."""
        payload = make_request(
            matmul_relu_model(), {"x": np.arange(8, dtype=np.float32).reshape(2, 4)}
        ).encode()
        got = self.wait(self.executor.run(INFERENCE, payload))
        assert got == OnnxRuntime().run(payload)


def make_executor(
    home: Path, *, mode: str = MODE_BWRAP, slots: int = 1, **overrides: Any
) -> Executor:
    settings: dict[str, Any] = {
        "cache_dir": home / "models",
        "limits": Limits(
            memory_bytes=2 << 30, nproc=96, nofile=128, fsize_bytes=8 << 20, tmp_bytes=16 << 20
        ),
        "runtimes": {HOSTILE: HOSTILE_FACTORY, INFERENCE: default_runtimes()[INFERENCE]},
        "preload": ("onnxruntime",),
        "extra_python_path": (HERE,),
        "work_root": home.parent / f"{home.name}-work",
        "max_output_bytes": 64 * 1024,
        "threads": 1,
    }
    settings.update(overrides)
    return Executor(slots=slots, mode=mode, config=WorkerConfig(**settings))


def warm_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """A warm bubblewrap executor whose node home holds a (fake) key file."""
    home = tmp_path_factory.mktemp("home")
    home.chmod(0o700)
    key = home / "node.key"
    key.write_text(json.dumps({"secret": "do not read"}))
    key.chmod(0o600)
    loop = asyncio.new_event_loop()
    executor = make_executor(home)
    loop.run_until_complete(executor.warm_up())
    try:
        yield Node(executor, loop, home)
    finally:
        loop.run_until_complete(executor.aclose())
        loop.close()
