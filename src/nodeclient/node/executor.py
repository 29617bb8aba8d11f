"""2.3.5 Work Execution: tasks run in separate worker processes.

The daemon decrypts (2.3.4) in its own process, so the payload key never enters a
worker; workers get only the plaintext payload and return the result bytes. Each worker
keeps its runtimes warm across tasks (an ONNX session per model hash), and one worker
per slot gives real parallelism up to max_parallel_subtasks. A worker that crashes
fails only its task: the pool is rebuilt and the daemon keeps serving.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodeclient.errors import NodeClientError, RemoteProtocolError

# Worker-process globals: built once per worker by _init_worker.
_RUNTIMES: dict[str, Any] = {}


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    cache_dir: Path
    coordinator_url: str | None
    intra_op_threads: int
    max_cache_bytes: int = 2 << 30


class TaskFailed(NodeClientError):
    """The task did not produce a result; ``reason`` is what the signed Reject says."""

    def __init__(self, reason: str, *, requester_fault: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.requester_fault = requester_fault


def _fetch_model(base_url: str | None, max_bytes: int) -> Any:
    def fetch(url: str) -> bytes:
        import httpx

        if url.startswith("/"):
            if base_url is None:
                raise RemoteProtocolError("model_url is relative but no coordinator is known")
            url = base_url.rstrip("/") + url
        with httpx.stream("GET", url, timeout=60.0) as resp:
            resp.raise_for_status()
            data = bytearray()
            for chunk in resp.iter_bytes():
                data += chunk
                if len(data) > max_bytes:
                    raise RemoteProtocolError(f"model at {url} exceeds {max_bytes} bytes")
        return bytes(data)

    return fetch


def _init_worker(cfg: WorkerConfig) -> None:
    from nodeclient.node.runtimes.onnx import OnnxRuntime

    _RUNTIMES["ai.inference"] = OnnxRuntime(
        cache_dir=cfg.cache_dir,
        max_cache_bytes=cfg.max_cache_bytes,
        intra_op_threads=cfg.intra_op_threads,
        fetch_model=_fetch_model(cfg.coordinator_url, cfg.max_cache_bytes),
    )


def _run_in_worker(workload_class: str, payload: bytes) -> bytes:
    runtime = _RUNTIMES.get(workload_class)
    if runtime is None:
        raise RemoteProtocolError(f"workload class {workload_class!r} is not served by this node")
    result: bytes = runtime.run(payload)
    return result


def _warm(_: int) -> int:
    return os.getpid()


class Executor:
    """A pool of worker processes, one per slot."""

    def __init__(self, *, slots: int, config: WorkerConfig) -> None:
        self.slots = slots
        self._config = config
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        # forkserver: workers never inherit the daemon's event loop, sockets or keys.
        ctx = multiprocessing.get_context("forkserver")
        return ProcessPoolExecutor(
            max_workers=self.slots,
            mp_context=ctx,
            initializer=_init_worker,
            initargs=(self._config,),
        )

    async def warm_up(self) -> None:
        """Start every worker now, so the first task does not pay for process start-up."""
        loop = asyncio.get_running_loop()
        await asyncio.gather(
            *(loop.run_in_executor(self._pool, _warm, i) for i in range(self.slots))
        )

    async def run(self, workload_class: str, payload: bytes) -> bytes:
        """Run one task in a worker; raise TaskFailed with a reason on any failure."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, _run_in_worker, workload_class, payload)
        except RemoteProtocolError as exc:
            raise TaskFailed(f"bad payload: {exc}", requester_fault=True) from exc
        except BrokenProcessPool as exc:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()
            raise TaskFailed(
                "worker process crashed (killed or out of memory)", requester_fault=False
            ) from exc
        except Exception as exc:
            raise TaskFailed(
                f"execution failed: {type(exc).__name__}: {exc}"[:400], requester_fault=False
            ) from exc

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
