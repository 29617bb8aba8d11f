"""Simulated nodes for bench/coordinator_scale.py: one client process drives thousands.

Each simulated node has what a real node shows the coordinator: its own secp256k1 node and
liveness keys, its own wallet, a manifest built and signed by ``manifest.build_manifest``
(2.3.2), the real link handshake and signed heartbeats through ``protocol.session.NodeSession``
(2.3.3). What it does not have is a payload key of its own: every simulated node shares one
RSA-3072 key, because generating 10,000 of them would take longer than the benchmark and the
coordinator does not require them to differ. Dispatches are counted, never opened or answered.

A worker process is driven over a ``multiprocessing`` pipe by the benchmark's main process:

    main -> worker: ("register", deadline_s) ("link", deadline_s) ("poll", None) ("stop", None)
    worker -> main: one reply per command (a dict), after a start-up ("built", ...) message

Heartbeats follow the interval the coordinator announces in its challenge, at a fixed rate
from a random phase per node. For every heartbeat the worker keeps (send time, round trip
to its ``heartbeat_ack``), both on ``time.monotonic`` (CLOCK_MONOTONIC, shared by every
process on Linux, so the main process can cut a measurement window out of them). The round
trip includes this process's own event-loop delay, so it is an upper bound of the
coordinator's handling time; the worker measures that delay separately (``loop_lag``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import random
import resource
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from nodeclient.node.link import LINK_OPTIONS
from nodeclient.protocol import manifest, messages, tier
from nodeclient.protocol.secp import Secp256k1Key, to_checksum_address
from nodeclient.protocol.session import NodeSession
from nodeclient.protocol.states import NodeState

CPU = {"model": "sim", "cores": 4, "ram_gb": 8}
CLASSES = ("ai.inference",)
LAG_PROBE_S = 0.05  # how often the event-loop delay probe wakes


def raise_nofile() -> int:
    """Raise this process's open-file limit to the hard limit: one socket per link."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What one client process is told: its share of nodes and where the coordinator is."""

    index: int
    count: int
    url: str
    rsa_pem: bytes  # the one payload key all simulated nodes share (PKCS#8 PEM)
    chain_id: int
    register_concurrency: int = 4
    connect_concurrency: int = 32
    seed: int = 0


@dataclass
class SimNode:
    node_key: Secp256k1Key
    liveness: Secp256k1Key
    wallet: str
    manifest: dict[str, Any]
    session: NodeSession
    sent: dict[int, float] = field(default_factory=dict)  # seq -> monotonic send time
    ws: ClientConnection | None = None


def build_nodes(spec: WorkerSpec) -> list[SimNode]:
    """Keys, wallets and signed manifests for this worker's share of the nodes."""
    key = serialization.load_pem_private_key(spec.rsa_pem, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    rng = random.Random(spec.seed)
    slots = tier.max_parallel_subtasks(CPU, [])
    nodes = []
    for _ in range(spec.count):
        node_key, liveness = Secp256k1Key.generate(), Secp256k1Key.generate()
        wallet = to_checksum_address(rng.randbytes(20))
        man = manifest.build_manifest(
            node_key=node_key,
            liveness_address=liveness.address,
            payload_key=key,
            wallet_address=wallet,
            region="local",
            cpu=CPU,
            gpu=[],
            workload_classes=CLASSES,
            max_parallel_subtasks=slots,
            client_version="0.1.0",
            issued_at=int(time.time()),
            chain_id=spec.chain_id,
        )
        session = NodeSession(
            node_id=node_key.address, liveness_key=liveness, chain_id=spec.chain_id,
            clock=time.time,
        )  # fmt: skip
        nodes.append(SimNode(node_key, liveness, wallet, man, session))
    return nodes


class Worker:
    """The asyncio side of one client process: registration, links, heartbeats, counts."""

    def __init__(self, spec: WorkerSpec, nodes: list[SimNode]) -> None:
        self.spec = spec
        self.nodes = nodes
        self.rng = random.Random(spec.seed + 1)
        self.samples: list[tuple[float, float]] = []  # (send time, round trip), monotonic s
        self.dispatches: list[float] = []  # monotonic receive times of dispatch frames
        self.errors: Counter[str] = Counter()  # error frames by code, client-side failures
        self.closes: Counter[str] = Counter()  # links closed by the coordinator, by code
        self.lags: list[tuple[float, float]] = []  # (when, event-loop oversleep), seconds
        self.linked = 0
        self.tasks: list[asyncio.Task[None]] = []

    # --- registration ---------------------------------------------------------------------

    async def register(self, deadline: float) -> dict[str, Any]:
        """POST every manifest; what is not done within *deadline* seconds is abandoned."""
        ok, failed, first_error = 0, 0, ""
        queue = list(self.nodes)
        limits = httpx.Limits(max_connections=self.spec.register_concurrency)
        async with httpx.AsyncClient(base_url=self.spec.url, timeout=120, limits=limits) as http:

            async def one_by_one() -> None:
                nonlocal ok, failed, first_error
                while queue:
                    node = queue.pop()
                    try:
                        resp = await http.post("/v1/nodes", json=node.manifest)
                    except httpx.HTTPError as exc:
                        failed += 1
                        first_error = first_error or f"{type(exc).__name__}: {exc}"
                        continue
                    if resp.status_code in (200, 201):
                        ok += 1
                    else:
                        failed += 1
                        first_error = first_error or f"{resp.status_code} {resp.text[:200]}"

            runners = [
                asyncio.create_task(one_by_one()) for _ in range(self.spec.register_concurrency)
            ]
            _, late = await asyncio.wait(runners, timeout=deadline)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        if late:
            first_error = first_error or f"not all registered within {deadline:.0f} s"
        return {"ok": ok, "failed": len(self.nodes) - ok, "error": first_error}

    # --- links ----------------------------------------------------------------------------

    async def link_all(self, deadline: float) -> dict[str, Any]:
        """Link every node; those not linked within *deadline* seconds are given up."""
        gate = asyncio.Semaphore(self.spec.connect_concurrency)
        ws_url = "ws" + self.spec.url[len("http") :] + "/v1/link"
        ready: list[asyncio.Future[bool]] = []
        loop = asyncio.get_running_loop()
        for node in self.nodes:
            fut: asyncio.Future[bool] = loop.create_future()
            ready.append(fut)
            self.tasks.append(asyncio.create_task(self._run_node(node, ws_url, gate, fut)))
        await asyncio.wait(ready, timeout=deadline)
        self.linked = sum(1 for f in ready if f.done() and f.result())
        for fut, task in zip(ready, self.tasks, strict=True):
            if not fut.done():  # still connecting: stop it, so the window sees a fixed set
                task.cancel()
                self.errors[f"link: not linked within {deadline:.0f} s"] += 1
        return {"linked": self.linked, "failed": len(ready) - self.linked}

    async def _run_node(
        self, node: SimNode, url: str, gate: asyncio.Semaphore, ready: asyncio.Future[bool]
    ) -> None:
        """Handshake (challenge -> auth -> welcome), then heartbeats until cancelled."""
        try:
            async with gate:
                # The same client options as the node daemon (node/link.py).
                ws = await connect(url, **{**LINK_OPTIONS, "open_timeout": 60})
                challenge = messages.parse_from_coordinator(await asyncio.wait_for(ws.recv(), 60))
                assert isinstance(challenge, messages.Challenge)
                await ws.send(json.dumps(node.session.on_challenge(challenge)))
                welcome = messages.parse_from_coordinator(await asyncio.wait_for(ws.recv(), 60))
                if not isinstance(welcome, messages.Welcome):
                    raise TypeError(f"expected welcome, got {welcome!r}"[:200])
                node.session.on_welcome(welcome)
                node.ws = ws
        except Exception as exc:  # counted and reported; the benchmark goes on without it
            self.errors[f"link: {type(exc).__name__}: {exc}"[:160]] += 1
            ready.set_result(False)
            return
        ready.set_result(True)
        beat = asyncio.create_task(self._heartbeats(node, ws, challenge.heartbeat_interval))
        try:
            async for raw in ws:
                self._on_frame(node, raw)
        except ConnectionClosed:
            pass
        finally:
            beat.cancel()
        self.closes[str(ws.close_code)] += 1  # 1006: the connection dropped without a close

    def _on_frame(self, node: SimNode, raw: str | bytes) -> None:
        now = time.monotonic()
        if isinstance(raw, bytes):  # only data frames travel binary: here, a dispatch
            self.dispatches.append(now)
            return
        frame = json.loads(raw)
        kind = frame.get("type")
        if kind == "heartbeat_ack":
            sent = node.sent.pop(frame["seq"], None)
            if sent is not None:
                self.samples.append((sent, now - sent))
        elif kind == "dispatch":
            self.dispatches.append(now)
        elif kind == "error":
            self.errors[f"error frame: {frame.get('code')}"] += 1

    async def _heartbeats(self, node: SimNode, ws: ClientConnection, interval: float) -> None:
        """Fixed rate from a random phase, so 10,000 nodes spread evenly over the interval."""
        due = time.monotonic() + self.rng.uniform(0, interval)
        try:
            while True:
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                due += interval
                frame = node.session.heartbeat(state=NodeState.READY, running=(), load_permille=0)
                text = json.dumps(frame)
                node.sent[node.session.seq] = time.monotonic()
                await ws.send(text)
        except ConnectionClosed:
            pass

    async def probe_lag(self) -> None:
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(LAG_PROBE_S)
            self.lags.append((t0, time.monotonic() - t0 - LAG_PROBE_S))

    def report(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "dispatches": self.dispatches,
            "errors": dict(self.errors),
            "closes": dict(self.closes),
            "lags": self.lags,
            "unanswered": [t for n in self.nodes for t in n.sent.values()],  # send times
        }


async def _serve(conn: Connection, worker: Worker) -> None:
    """Answer the main process's commands, one at a time, until "stop" or a closed pipe."""
    recv: Callable[[], Any] = conn.recv
    lag = asyncio.create_task(worker.probe_lag())
    while True:
        try:
            command, arg = await asyncio.to_thread(recv)
        except EOFError:  # the main process is gone: stop quietly
            break
        if command == "register":
            conn.send(await worker.register(arg))
        elif command == "link":
            reply = await worker.link_all(arg)
            # Thousands of links are long-lived: keep the collector from walking them
            # while heartbeats are timed (a pause here would count as coordinator latency).
            gc.collect()
            gc.freeze()
            conn.send(reply)
        elif command == "poll":
            conn.send({"dispatched": len(worker.dispatches)})
        elif command == "stop":
            conn.send(worker.report())
            break
    lag.cancel()
    for task in worker.tasks:
        task.cancel()


def worker_main(spec: WorkerSpec, conn: Connection) -> None:
    """Entry point of one client process (multiprocessing target)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process owns shutdown on Ctrl-C
    raise_nofile()
    gc.set_threshold(10_000, 50, 100)  # fewer collections while measuring (see _serve)
    t0 = time.monotonic()
    nodes = build_nodes(spec)
    conn.send({"built": len(nodes), "seconds": time.monotonic() - t0})
    with contextlib.suppress(BrokenPipeError, EOFError, KeyboardInterrupt):
        asyncio.run(_serve(conn, Worker(spec, nodes)))
