"""Node metrics (2.3.8 Status Console): Prometheus gauges and counters, and GPU sampling.

Two consumers read the same numbers: ``nodeclient status --watch`` on the operator's
terminal and a Prometheus server scraping ``nodeclient run --metrics-address``. Metrics
are opt-in (no listening socket unless asked for) and live in a per-daemon
``CollectorRegistry``, never the process-global one, so tests can run several daemons
in one process.

GPU utilisation comes from NVML, which is only ever loaded in a child process (the same
reason as :mod:`nodeclient.node.nvml_probe`: a wedged driver can hang or crash its
caller). :class:`GpuSampler` keeps one long-lived child, ``python -m
nodeclient.node.metrics --gpu-sampler SECONDS``, that prints one JSON line per interval::

    {"status": "ok" | "no-gpu" | "error", "detail": str,
     "devices": [{"index": int, "name": str, "util_percent": int,
                  "mem_used_bytes": int, "mem_total_bytes": int}, ...]}

On a machine without an NVIDIA driver (NVML cannot start for want of its library or its
kernel module, as :mod:`nodeclient.node.nvml_probe` reads ``no-driver``) the child prints
one ``no-gpu`` line and exits. Any other failure to start NVML is an ``error``, which the
parent retries: a driver that failed once may answer the next time. On a node that
declared GPUs (``GpuSampler(gpus_declared=True)``) even ``no-gpu`` is an error: its cards
are there, and a driver being reloaded will be back. The recorded-NVML hook of the probe
(``NODECLIENT_NVML_REPLAY``) works here too: each recorded device may carry
``"utilization"`` (percent) and ``"memory_used"`` (bytes), and ``{"error":
"NVML_ERROR_..."}`` makes ``nvmlInit`` raise that error.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from nodeclient.errors import UsageError
from nodeclient.protocol.states import NodeState

OUTCOMES: Final = ("completed", "failed", "rejected", "timed_out", "cancelled")
DURATION_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)
_REPLAY_ENV: Final = "NODECLIENT_NVML_REPLAY"
_STALE_AFTER: Final = 3.0  # intervals without a line before a sample counts as stale
_MAX_RETRY_DELAY: Final = 600.0  # seconds between two starts of a failing sampler, at most


@dataclass(frozen=True, slots=True)
class GpuUse:
    """One card's utilisation at one moment."""

    index: int
    name: str
    util_percent: int
    mem_used_bytes: int
    mem_total_bytes: int


@dataclass(frozen=True, slots=True)
class GpuSnapshot:
    """What the sampler last saw: ``status`` ok / no-gpu / error / pending, and why."""

    status: str
    detail: str = ""
    devices: tuple[GpuUse, ...] = ()

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> GpuSnapshot:
        devices = tuple(
            GpuUse(
                index=int(d["index"]),
                name=str(d["name"])[:64],
                util_percent=max(0, min(100, int(d["util_percent"]))),
                mem_used_bytes=max(0, int(d["mem_used_bytes"])),
                mem_total_bytes=max(0, int(d["mem_total_bytes"])),
            )
            for d in doc.get("devices", [])
        )
        return cls(str(doc.get("status", "error")), str(doc.get("detail", ""))[:300], devices)


def parse_metrics_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9101`` for IPv6) -> (host, port); UsageError otherwise."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"metrics address {text!r} must be HOST:PORT, e.g. 127.0.0.1:9101")
    return host, int(port)


class NodeMetrics:
    """The node's Prometheus metrics; the daemon updates them from its event loop.

    With a *gpu* sampler, every status refresh also takes its latest GPU sample.
    """

    def __init__(self, *, gpu: GpuSampler | None = None) -> None:
        self.gpu = gpu
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.node_state = Gauge(
            "node_state",
            "1 for the node's current state (2.3.8), 0 for the others",
            ["state"],
            registry=r,
        )
        self.link_up = Gauge("link_up", "1 while the coordinator link is up", registry=r)
        self.heartbeat_rtt = Gauge(
            "heartbeat_rtt_seconds", "round trip of the last acknowledged heartbeat", registry=r
        )
        self.tasks = Counter(
            "tasks",
            "tasks ended on this node, by workload class and outcome",
            ["workload_class", "outcome"],
            registry=r,
        )
        self.duration = Histogram(
            "task_duration_seconds",
            "from dispatch received to result or refusal",
            ["workload_class"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.outbox_backlog = Gauge(
            "outbox_backlog", "signed results not yet acknowledged by the coordinator", registry=r
        )
        self.results_held = Gauge(
            "outbox_results_held_bytes",
            "bytes of acknowledged results still kept on disk (dropped by retention)",
            registry=r,
        )
        self.running = Gauge("tasks_running", "tasks executing now", registry=r)
        self.gpu_util = Gauge(
            "gpu_utilization_percent", "NVML GPU utilisation", ["gpu", "model"], registry=r
        )
        self.gpu_mem = Gauge(
            "gpu_memory_used_bytes", "NVML GPU memory in use", ["gpu", "model"], registry=r
        )
        for state in NodeState:
            self.node_state.labels(state=state.value).set(0)

    def update_status(self, status: Mapping[str, Any]) -> None:
        """Refresh the gauges from one ``NodeDaemon.status()`` snapshot."""
        for state in NodeState:
            self.node_state.labels(state=state.value).set(1 if status["state"] == state else 0)
        link = status["link"]
        self.link_up.set(1 if link["status"] == "up" else 0)
        # NaN without a link: its last round trip was the gone link's, not this one's
        rtt = link.get("rtt_ms")
        self.heartbeat_rtt.set(math.nan if rtt is None else float(rtt) / 1000)
        self.outbox_backlog.set(int(status["outbox_backlog"]))
        self.results_held.set(int(status.get("results_held_bytes", 0)))
        self.running.set(len(status["running"]))
        if self.gpu is not None:
            self.update_gpus(self.gpu.latest())

    def task_ended(self, workload_class: str, outcome: str, seconds: float) -> None:
        """Count one task's end; *outcome* is one of OUTCOMES."""
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown task outcome {outcome!r}")
        self.tasks.labels(workload_class=workload_class, outcome=outcome).inc()
        self.duration.labels(workload_class=workload_class).observe(max(0.0, seconds))

    def update_gpus(self, snapshot: GpuSnapshot) -> None:
        """Set the GPU gauges from *snapshot*; without a good one, drop them rather than
        go on showing the last figures of a sampler that has failed."""
        if snapshot.status != "ok":
            self.gpu_util.clear()
            self.gpu_mem.clear()
            return
        for d in snapshot.devices:
            self.gpu_util.labels(gpu=str(d.index), model=d.name).set(d.util_percent)
            self.gpu_mem.labels(gpu=str(d.index), model=d.name).set(d.mem_used_bytes)

    def exposition(self) -> bytes:
        """The Prometheus text format, as a scrape would get it."""
        return generate_latest(self.registry)

    def serve(self, address: str) -> MetricsServer:
        """Start the HTTP endpoint on *address* (``HOST:PORT``) in a daemon thread."""
        from prometheus_client import start_http_server

        host, port = parse_metrics_address(address)
        try:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise UsageError(f"cannot listen for metrics on {address}: {exc.strerror}") from exc
        return MetricsServer(server, thread)


class MetricsServer:
    """A running metrics endpoint; ``close`` stops it."""

    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.port: int = int(server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


# --- GPU sampling: the parent side --------------------------------------------------------------


class GpuSampler:
    """Keeps the latest GPU utilisation from a long-lived NVML child process.

    ``latest()`` never blocks: it returns ``pending`` until the first line, the last
    snapshot afterwards, and ``error`` when the child has gone quiet (a wedged driver),
    in which case its process group is killed. After an error (a transient NVML fault, a
    child that exited or hung) a fresh child is started, first after *retry_after*
    seconds, then after twice as long each time, up to 10 minutes; a ``no-gpu`` answer is
    final, unless *gpus_declared*: on a node whose manifest declares GPUs, NVML seeing none
    is a fault like any other, and one failed start must not drop the GPU gauges for the
    daemon's life. A child that a wedged driver keeps in uninterruptible sleep after its
    SIGKILL is reaped by a background thread, so nothing here waits on it.
    """

    def __init__(
        self,
        *,
        interval: float = 1.0,
        env: Mapping[str, str] | None = None,
        retry_after: float = 30.0,
        gpus_declared: bool = False,
    ) -> None:
        self.interval = interval
        self._env = dict(os.environ if env is None else env)
        self._gpus_declared = gpus_declared
        self._lock = threading.Lock()
        self._latest = GpuSnapshot("pending", "asking NVML")
        self._last_line = time.monotonic()
        self._proc: subprocess.Popen[bytes] | None = None
        self._done = False
        self._closed = False
        self._first_retry = retry_after
        self._retry_delay = retry_after
        self._retry_at: float | None = None  # when a child that failed is started again
        self._reaping: set[int] = set()  # children a reaper thread waits for

    def start(self) -> GpuSampler:
        if self._closed:  # close() came between a retry's decision and this start
            return self
        argv = [
            sys.executable,
            "-m",
            "nodeclient.node.metrics",
            "--gpu-sampler",
            str(self.interval),
        ]
        try:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env=self._env,
                start_new_session=True,
            )
        except OSError as exc:
            self._set(GpuSnapshot("error", f"cannot start the NVML sampler: {exc}"), done=True)
            return self
        threading.Thread(target=self._read, args=(self._proc,), daemon=True).start()
        return self

    def _set(self, snapshot: GpuSnapshot, *, done: bool = False) -> None:
        with self._lock:
            self._latest = snapshot
            self._last_line = time.monotonic()
            if snapshot.status == "ok":
                self._retry_delay = self._first_retry  # healthy again: the next retry is soon
            self._finish(done)

    def _finish(self, done: bool) -> None:
        """With the lock held: the child has answered for good; plan a retry after an error."""
        if done and not self._done:
            self._done = True
            if self._latest.status == "error" and not self._closed:
                self._retry_at = time.monotonic() + self._retry_delay
                self._retry_delay = min(self._retry_delay * 2, _MAX_RETRY_DELAY)

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            try:
                snapshot = GpuSnapshot.from_json(json.loads(raw))
            except (ValueError, KeyError, TypeError):
                snapshot = GpuSnapshot("error", "the NVML sampler answered something unreadable")
            if proc is not self._proc:  # a child given up on: a newer one answers now
                return
            if snapshot.status == "no-gpu" and self._gpus_declared:
                snapshot = GpuSnapshot("error", f"{snapshot.detail} (the node declared GPUs)")
            self._set(snapshot, done=snapshot.status != "ok")
        with self._lock:
            if proc is self._proc and not self._done:
                self._latest = GpuSnapshot("error", "the NVML sampler exited")
                self._finish(True)

    def latest(self) -> GpuSnapshot:
        restart = False
        with self._lock:
            now = time.monotonic()
            quiet = now - self._last_line
            if not self._done and quiet > max(10.0, _STALE_AFTER * self.interval):
                self._latest = GpuSnapshot("error", f"NVML gave no answer for {quiet:.0f} s")
                self._finish(True)
                self._kill()
            elif self._retry_at is not None and now >= self._retry_at and not self._closed:
                self._kill()
                if self._proc is not None and self._proc.poll() is None:
                    # Still there after SIGKILL: a wedged driver holds it. Another child
                    # would hang the same way and pile up; wait until this one is gone.
                    self._retry_at = now + self._retry_delay
                else:
                    # The old child's reader sees it is no longer the child and stays
                    # silent; the error stays on show until the new one answers.
                    self._proc, self._retry_at = None, None
                    self._done, self._last_line, restart = False, now, True
            latest = self._latest
        if restart:
            self.start()
        return latest

    def _kill(self) -> None:
        """SIGKILL the child's group without waiting: a thread reaps it whenever it ends."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            if proc.pid not in self._reaping:  # one reaper per child
                self._reaping.add(proc.pid)
                threading.Thread(
                    target=self._reap, args=(proc,), name="gpu-sampler-reaper", daemon=True
                ).start()

    def _reap(self, proc: subprocess.Popen[bytes]) -> None:
        """Wait for a killed child, then forget its pid: a later child may be given it."""
        proc.wait()
        self._reaping.discard(proc.pid)

    def close(self) -> None:
        with self._lock:
            self._closed = self._done = True
            self._retry_at = None
            self._kill()


# --- GPU sampling: the child side ---------------------------------------------------------------


def _nvml() -> Any:
    path = os.environ.get(_REPLAY_ENV)
    if path:
        return _Replay(path)
    import pynvml

    return pynvml


class _Replay:
    """The recorded-NVML hook: enough of pynvml for utilisation sampling."""

    def __init__(self, path: str) -> None:
        with open(path, encoding="utf-8") as fh:
            self._rec: dict[str, Any] = json.loads(fh.read(1 << 20))

    def nvmlInit(self) -> None:
        if "error" in self._rec:
            import pynvml

            name = self._rec["error"]
            code = getattr(pynvml, name, None) if isinstance(name, str) else None
            if not isinstance(code, int) or not name.startswith("NVML_ERROR_"):
                raise ValueError(f"'error' is not an NVML_ERROR_* name: {name!r}")
            raise pynvml.NVMLError(code)  # as the library raises it

    def nvmlShutdown(self) -> None:
        return None

    def nvmlDeviceGetCount(self) -> int:
        return len(self._rec.get("devices", []))

    def nvmlDeviceGetHandleByIndex(self, index: int) -> dict[str, Any]:
        device: dict[str, Any] = self._rec["devices"][index]
        return device

    def nvmlDeviceGetName(self, handle: dict[str, Any]) -> str:
        return str(handle["name"])

    def nvmlDeviceGetUtilizationRates(self, handle: dict[str, Any]) -> Any:
        return _Obj(gpu=int(handle.get("utilization", 0)))

    def nvmlDeviceGetMemoryInfo(self, handle: dict[str, Any]) -> Any:
        return _Obj(used=int(handle.get("memory_used", 0)), total=int(handle["memory_total"]))


class _Obj:
    def __init__(self, **kw: int) -> None:
        self.__dict__.update(kw)


def sample_once(nvml: Any) -> dict[str, Any]:
    """One sampler line from an initialised NVML."""
    devices = []
    for i in range(nvml.nvmlDeviceGetCount()):
        h = nvml.nvmlDeviceGetHandleByIndex(i)
        name = nvml.nvmlDeviceGetName(h)
        mem = nvml.nvmlDeviceGetMemoryInfo(h)
        devices.append(
            {
                "index": i,
                "name": name.decode() if isinstance(name, bytes) else str(name),
                "util_percent": int(nvml.nvmlDeviceGetUtilizationRates(h).gpu),
                "mem_used_bytes": int(mem.used),
                "mem_total_bytes": int(mem.total),
            }
        )
    if not devices:
        return {"status": "no-gpu", "detail": "NVML sees no GPU", "devices": []}
    return {"status": "ok", "detail": "", "devices": devices}


def _emit(doc: Mapping[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


def _start_failure(exc: Exception) -> dict[str, Any]:
    """The line for NVML failing to start: ``no-gpu`` where it says there is no driver
    (the probe's ``no-driver``), ``error`` for anything else, which the parent retries."""
    import pynvml

    from nodeclient.node import nvml_probe  # the probe's reading of NVML's errors, shared

    code = getattr(exc, "value", None)
    name = nvml_probe._error_names().get(code) if isinstance(code, int) else None
    no_driver = isinstance(exc, pynvml.NVMLError) and name in nvml_probe._NO_DRIVER_ERRORS
    status = "no-gpu" if no_driver else "error"
    detail = f"nvmlInit: {type(exc).__name__}: {exc}" + (f" ({name})" if name else "")
    return {"status": status, "detail": detail[:300], "devices": []}


def sampler_main(interval: float, *, lines: int | None = None) -> int:
    """The child: one JSON line per *interval* until stdout closes (or *lines* are out)."""
    try:
        nvml = _nvml()
        nvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 (told to the parent, which retries an error)
        _emit(_start_failure(exc))
        return 0
    try:
        n = 0
        while lines is None or n < lines:
            try:
                doc = sample_once(nvml)
            except Exception as exc:  # noqa: BLE001 (reported to the parent, who shows it)
                doc = {"status": "error", "detail": f"{type(exc).__name__}: {exc}"[:300]}
            _emit(doc)
            if doc["status"] != "ok":
                return 0
            n += 1
            time.sleep(interval)
    except BrokenPipeError:
        return 0
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--gpu-sampler":
        sys.exit(sampler_main(max(0.1, float(sys.argv[2]))))
    sys.exit("usage: python -m nodeclient.node.metrics --gpu-sampler SECONDS")
