"""Real processes on loopback: a coordinator and node daemons, started and killed for real."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nodeclient.coordinator.client import CoordinatorClient
from nodeclient.node import control, keys, securefile
from nodeclient.node.config import NodeConfig, write_config
from nodeclient.protocol.secp import to_checksum_address

HEARTBEAT = 0.5
# Every process a test starts, so tests/e2e/conftest.py can kill what a failing test left.
LIVE: list[subprocess.Popen[bytes]] = []


def reap_all() -> None:
    """Kill whatever is still running (a failed test never leaves daemons behind)."""
    for proc in LIVE:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    LIVE.clear()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    predicate: Callable[[], Any], *, timeout: float = 60.0, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception as exc:
            last_exc = exc
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last error: {last_exc!r})")


class CoordinatorProc:
    def __init__(self, root: Path, *, clock_file: Path, extra: list[str] | None = None) -> None:
        self.data = root / "coordinator"
        self.data.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.clock_file = clock_file
        self.extra = extra or []
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [
            sys.executable, "-m", "nodeclient.coordinator.cli", "serve",
            "--host", "127.0.0.1", "--port", str(self.port), "--data-dir", str(self.data),
            "--heartbeat-interval", str(HEARTBEAT), "--clock-file", str(self.clock_file),
            *self.extra,
        ]  # fmt: skip
        log = open(self.data / "coordinator.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log)
        LIVE.append(self.proc)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode().strip()
        assert line == f"coordinator: {self.url}", line

    def client(self) -> CoordinatorClient:
        return CoordinatorClient(self.url)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


class NodeProc:
    def __init__(
        self,
        root: Path,
        name: str,
        *,
        coordinator: str,
        clock_file: Path,
        wallet: str | None = None,
        slots: int | None = None,
    ) -> None:
        self.home = securefile.ensure_home(root / name, create=True)
        keys.init_keys(self.home, passphrase=None)
        self.node_id = keys.node_id_of(self.home)
        self.wallet = wallet or to_checksum_address(secrets.token_bytes(20))
        write_config(
            self.home,
            NodeConfig(
                wallet_address=self.wallet, region="local", coordinator=coordinator,
                heartbeat_interval=HEARTBEAT, max_parallel_subtasks=slots,
            ),
        )  # fmt: skip
        self.clock_file = clock_file
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    @property
    def log_path(self) -> Path:
        return self.home / f"node.{self.runs}.log"

    def start(self) -> None:
        self.runs += 1
        log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nodeclient.node.cli", "run", "--home", str(self.home),
             "--clock-file", str(self.clock_file)],
            stdout=subprocess.DEVNULL, stderr=log,
            # CPU nodes, on a machine with a GPU too: a node there would give its slots
            # the card, where a CPU build of onnxruntime serves no ai.inference.
            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        )  # fmt: skip
        LIVE.append(self.proc)

    def status(self) -> dict[str, Any]:
        return control.request(self.home / control.SOCKET_NAME, {"cmd": "status"})

    def wait_linked(self, timeout: float = 60.0) -> dict[str, Any]:
        return wait_for(
            lambda: (s := self.status())["link"]["status"] == "up" and s,
            timeout=timeout, what=f"{self.node_id} linked",
        )  # fmt: skip

    def events(self, run: int | None = None) -> list[dict[str, Any]]:
        path = self.home / f"node.{run or self.runs}.log"
        out = []
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)
