"""The coordinator under 10,000 linked nodes: heartbeat latency and dispatch throughput.

    python bench/coordinator_scale.py [--nodes 10000] [--interval 10] [--window 30]
                                      [--jobs 2000] [--clients N]

A real coordinator process (``nodeclient-coordinator serve`` on 127.0.0.1, port 0, SQLite in
a temporary data directory) and ``--clients`` client processes that simulate the nodes
(bench/_simnode.py): each node registers with its own signed manifest (POST /v1/nodes),
opens its link, does the real handshake (challenge -> LinkAuth signed by its liveness key
-> welcome) and sends signed heartbeats (2.3.3).

The heartbeat interval is compressed (``--interval``, 10 s by default, against the spec's
30 s), so 10,000 nodes send about 1,000 heartbeats a second: three times the real load.
Measured, in one run:

- registration throughput (manifests built beforehand, so only the coordinator's work and
  the HTTP round trips count);
- heartbeat round trip, heartbeat sent -> ``heartbeat_ack`` received, over ``--window``
  seconds after every node is linked and has settled: p50/p90/p99/max against the target
  p99 < 50 ms. The ack of a seq within 16 of its node's stored one does not wait for
  its commit (the group commit runs behind it), so this covers parsing, the signature
  check and both directions of the socket. It also covers the client processes' own event-loop delay (printed beside it): an upper
  bound of the coordinator's handling time;
- dispatch throughput: ``--jobs`` small ai.inference jobs (Identity model inline) submitted
  with POST /v1/jobs; tasks dispatched per second from the first submit to the last
  dispatch frame received by a simulated node. Nodes do not answer: each has 4 free slots,
  which is plenty. The heartbeats sent meanwhile are held to the same target: a
  coordinator both heartbeats and dispatches.

A heartbeat sent in a window and never answered counts as slower than every answered one.
The run is bounded (every phase has a deadline) and cleans up its processes on any exit.
Exit status: 0 when every node linked and the target was met, with no jobs and while
dispatching, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import multiprocessing as mp
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _simnode import WorkerSpec, raise_nofile, worker_main
from tests.models import identity_model

from nodeclient.coordinator.config import DEFAULT_HEARTBEAT_INTERVAL
from nodeclient.protocol.eip712 import DEVNET_CHAIN_ID
from nodeclient.workloads.inference import make_request

TARGET_P99_MS = 50.0
SUBMIT_CONCURRENCY = 8
# The coordinator, with its open-file limit raised to the hard limit first (one socket a link).
COORDINATOR = (
    "import resource, sys\n"
    "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
    "if hard != resource.RLIM_INFINITY and soft < hard:\n"
    "    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))\n"
    "from nodeclient.coordinator.cli import main\n"
    "raise SystemExit(main(sys.argv[1:]))\n"
)
# A measured phase, inside the coordinator: SIGUSR1 opens it, SIGUSR2 closes it. Meanwhile
# the coordinator records its garbage collections (generation, pause), written as JSON to
# $COORDINATOR_SCALE_GC, and with --profile runs cProfile on its event-loop thread during
# the phase numbered $COORDINATOR_SCALE_PROFILE_AT (1: the window, 2: dispatch).
WINDOW_HOOKS = (
    "import cProfile, gc, json, os, signal, time\n"
    "_prof = cProfile.Profile() if os.environ.get('COORDINATOR_SCALE_PROFILE') else None\n"
    "_gc = {'on': False, 't0': 0.0, 'pauses': []}\n"
    "def _gc_cb(phase, info):\n"
    "    if phase == 'start':\n"
    "        _gc['t0'] = time.perf_counter()\n"
    "    elif _gc['on']:\n"
    "        _gc['pauses'].append((info['generation'], time.perf_counter() - _gc['t0']))\n"
    "gc.callbacks.append(_gc_cb)\n"
    "_opened = [0]\n"
    "_prof_at = int(os.environ.get('COORDINATOR_SCALE_PROFILE_AT', '1'))\n"
    "def _open(*_):\n"
    "    _opened[0] += 1\n"
    "    _gc['on'], _gc['pauses'] = True, []\n"
    "    if _prof is not None and _opened[0] == _prof_at:\n"
    "        _prof.enable()\n"
    "def _close(*_):\n"
    "    _gc['on'] = False\n"
    "    if _prof is not None and _opened[0] == _prof_at:\n"
    "        _prof.disable()\n"
    "        _prof.dump_stats(os.environ['COORDINATOR_SCALE_PROFILE'])\n"
    "    with open(os.environ['COORDINATOR_SCALE_GC'], 'w') as f:\n"
    "        json.dump({'pauses': _gc['pauses'], 'tracked': len(gc.get_objects()),\n"
    "                   'frozen': gc.get_freeze_count()}, f)\n"
    "signal.signal(signal.SIGUSR1, _open)\n"
    "signal.signal(signal.SIGUSR2, _close)\n"
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=10_000)
    p.add_argument("--interval", type=float, default=10.0, help="heartbeat interval, seconds")
    p.add_argument("--window", type=float, default=30.0, help="heartbeat measurement, seconds")
    p.add_argument("--jobs", type=int, default=2000, help="ai.inference jobs to dispatch")
    p.add_argument("--clients", type=int, default=max(2, min(8, (os.cpu_count() or 2) - 1)))
    p.add_argument("--settle", type=float, default=None, help="seconds after linking (interval)")
    p.add_argument(
        "--dispatch-timeout", type=float, default=60.0, help="submit + dispatch deadline, s"
    )
    p.add_argument("--phase-timeout", type=float, default=180.0, help="deadline of each phase")
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="write a cProfile of the coordinator's event loop to this file",
    )
    p.add_argument(
        "--profile-phase",
        choices=("window", "dispatch"),
        default="window",
        help="what --profile covers: the heartbeat window (default) or the dispatch phase",
    )
    return p.parse_args(argv)


# --- processes ------------------------------------------------------------------------------


def start_coordinator(
    data_dir: Path, interval: float, profile: Path | None = None, profile_at: int = 1
) -> tuple[subprocess.Popen[bytes], str]:
    env = dict(os.environ, COORDINATOR_SCALE_GC=str(data_dir / "gc.json"))
    if profile is not None:
        env["COORDINATOR_SCALE_PROFILE"] = str(profile.resolve())
        env["COORDINATOR_SCALE_PROFILE_AT"] = str(profile_at)
    code = WINDOW_HOOKS + COORDINATOR
    cmd = [
        sys.executable, "-c", code, "serve", "--host", "127.0.0.1", "--port", "0",
        "--data-dir", str(data_dir), "--heartbeat-interval", str(interval),
    ]  # fmt: skip
    log = open(data_dir / "coordinator.log", "wb")  # noqa: SIM115 (the child holds it)
    # Its own session: Ctrl-C reaches only this script, which then stops it in order.
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=log, start_new_session=True, env=env
    )
    log.close()
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout=60):
            raise RuntimeError("the coordinator did not announce its URL within 60 s")
    line = proc.stdout.readline().decode().strip()
    if not line.startswith("coordinator: http://"):
        raise RuntimeError(f"unexpected coordinator output {line!r}; see its log")
    return proc, line.split(" ", 1)[1]


def stop_coordinator(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Clients:
    """The client processes and their pipes; every command goes to all and waits for all."""

    def __init__(self, specs: list[WorkerSpec]) -> None:
        ctx = mp.get_context("spawn")
        self.procs: list[BaseProcess] = []
        self.conns: list[Connection] = []
        for spec in specs:
            here, there = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(spec, there), daemon=True)
            proc.start()
            there.close()
            self.procs.append(proc)
            self.conns.append(here)

    def collect(self, timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        out = []
        for conn, proc in zip(self.conns, self.procs, strict=True):
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"client process {proc.pid} did not answer in {timeout:.0f} s")
            out.append(conn.recv())
        return out

    def command(self, name: str, timeout: float, arg: float | None = None) -> list[dict[str, Any]]:
        for conn in self.conns:
            conn.send((name, arg))
        return self.collect(timeout)

    def stop(self) -> None:
        for conn in self.conns:
            conn.close()
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()


# --- phases ---------------------------------------------------------------------------------


async def submit_jobs(url: str, jobs: int, deadline: float) -> tuple[float, float, int, str]:
    """POST up to *jobs* Identity ai.inference jobs until the monotonic *deadline*.

    Returns (first submit, last accepted, accepted, the first error).
    """
    payload = make_request(identity_model(shape=[4]), {"x": np.arange(4, dtype=np.float32)})
    body = {
        "workload_class": "ai.inference",
        "payload": base64.b64encode(payload.encode()).decode(),
    }
    ok, error, left = 0, "", jobs
    limits = httpx.Limits(max_connections=SUBMIT_CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:

        async def submitter() -> None:
            nonlocal ok, error, left
            while left > 0 and time.monotonic() < deadline:
                left -= 1
                resp = await http.post("/v1/jobs", json=body)
                if resp.status_code == 201:
                    ok += 1
                else:
                    error = error or f"{resp.status_code} {resp.text[:200]}"

        t0 = time.monotonic()
        await asyncio.gather(*(submitter() for _ in range(SUBMIT_CONCURRENCY)))
        return t0, time.monotonic(), ok, error


def wait_dispatched(clients: Clients, target: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        got = sum(int(r["dispatched"]) for r in clients.command("poll", timeout))
        if got >= target or time.monotonic() > deadline:
            return got
        time.sleep(0.25)


# --- figures --------------------------------------------------------------------------------


def pct(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def latency_line(rtts: list[float]) -> str:
    s = sorted(rtts)
    return (
        f"p50 {pct(s, 0.5) * 1e3:.1f} ms  p90 {pct(s, 0.9) * 1e3:.1f} ms  "
        f"p99 {pct(s, 0.99) * 1e3:.1f} ms  max {(s[-1] if s else float('nan')) * 1e3:.0f} ms"
    )


def log_summary(path: Path) -> str:
    """Warnings and errors the coordinator logged, by event name."""
    counts: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            counts["(unparsed line)"] += 1
            continue
        if doc.get("level") in ("warning", "error", "critical"):
            counts[str(doc.get("event"))] += 1
    return ", ".join(f"{k}: {v}" for k, v in counts.most_common(6)) or "none"


def gc_summary(path: Path) -> str:
    """Collections per generation and their longest pause, from the coordinator's record."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return "not recorded"
    by_gen: dict[int, list[float]] = {}
    for gen, seconds in record["pauses"]:
        by_gen.setdefault(int(gen), []).append(float(seconds))
    pauses = "; ".join(
        f"gen{g}: {len(v)}, total {sum(v) * 1e3:.0f} ms, max {max(v) * 1e3:.1f} ms"
        for g, v in sorted(by_gen.items())
    )
    return (
        f"{pauses or 'none'} ({record['tracked']} objects tracked at the end, "
        f"{record['frozen']} frozen)"
    )


def run(args: argparse.Namespace) -> int:
    interval, n = args.interval, args.nodes
    settle = interval if args.settle is None else args.settle
    raise_nofile()
    load = os.getloadavg()[0]
    print(
        f"machine: {os.cpu_count()} CPUs, load average {load:.2f} at start; "
        f"{n} nodes over {args.clients} client processes, heartbeat every {interval:g} s"
    )
    with tempfile.TemporaryDirectory(prefix="coordinator-scale-") as tmp:
        data = Path(tmp)
        coordinator, url = start_coordinator(
            data, interval, args.profile, 2 if args.profile_phase == "dispatch" else 1
        )
        clients: Clients | None = None
        try:
            cproc = psutil.Process(coordinator.pid)
            key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            shares = [n // args.clients + (i < n % args.clients) for i in range(args.clients)]
            specs = [
                WorkerSpec(index=i, count=c, url=url, rsa_pem=pem, chain_id=DEVNET_CHAIN_ID,
                           seed=1000 * i)
                for i, c in enumerate(shares) if c
            ]  # fmt: skip
            clients = Clients(specs)
            built = clients.collect(args.phase_timeout * 2)
            print(
                f"manifests built in {max(b['seconds'] for b in built):.1f} s (client side)",
                flush=True,
            )

            t0 = time.monotonic()
            reg = clients.command("register", args.phase_timeout + 30, args.phase_timeout)
            t_reg = time.monotonic() - t0
            registered = sum(r["ok"] for r in reg)
            reg_errors = [r["error"] for r in reg if r["error"]]
            print(f"registered {registered}/{n} in {t_reg:.1f} s", flush=True)
            t0 = time.monotonic()
            links = clients.command("link", args.phase_timeout + 30, args.phase_timeout)
            t_link = time.monotonic() - t0
            linked = sum(r["linked"] for r in links)
            print(
                f"linked {linked}/{n} in {t_link:.1f} s; settling {settle:g} s, then "
                f"measuring heartbeats for {args.window:g} s",
                flush=True,
            )

            time.sleep(settle)  # every node has sent a heartbeat; phases are random
            coordinator.send_signal(signal.SIGUSR1)
            cpu0, w0 = cproc.cpu_times(), time.monotonic()
            time.sleep(args.window)
            cpu1, w1 = cproc.cpu_times(), time.monotonic()
            coordinator.send_signal(signal.SIGUSR2)
            rss_mb = cproc.memory_info().rss / 2**20
            time.sleep(0.5)  # the coordinator writes its record of the window
            gc_pauses = gc_summary(data / "gc.json")

            d0 = d1 = t_submit0 = t_submit1 = 0.0
            submitted, dispatched, submit_error = 0, 0, ""
            dispatch_gc = "not measured"
            if args.jobs:
                print(f"submitting {args.jobs} ai.inference jobs", flush=True)
                coordinator.send_signal(signal.SIGUSR1)  # the coordinator's record: dispatch
                d0 = time.monotonic()
                deadline = d0 + args.dispatch_timeout
                t_submit0, t_submit1, submitted, submit_error = asyncio.run(
                    submit_jobs(url, args.jobs, deadline)
                )
                grace = max(5.0, deadline - time.monotonic())  # dispatches still in flight
                dispatched = wait_dispatched(clients, submitted, grace)
                d1 = time.monotonic()
                coordinator.send_signal(signal.SIGUSR2)
                # The record (and a profile) is written; the heartbeats sent just before
                # the end get their answers rather than counting as never answered.
                time.sleep(1.0)
                dispatch_gc = gc_summary(data / "gc.json")

            reports = clients.command("stop", args.phase_timeout)
        finally:
            if clients is not None:
                clients.stop()
            stop_coordinator(coordinator)
        coord_log = log_summary(data / "coordinator.log")

    samples = [s for r in reports for s in r["samples"]]
    window = [rtt for sent, rtt in samples if w0 <= sent < w1]
    during = [rtt for sent, rtt in samples if d0 <= sent < d1]
    lags = sorted(lag for r in reports for t, lag in r["lags"] if w0 <= t < w1)
    busy_lags = sorted(lag for r in reports for t, lag in r["lags"] if d0 <= t < d1)
    errors: Counter[str] = Counter()
    closes: Counter[str] = Counter()
    for r in reports:
        errors.update(r["errors"])
        closes.update(r["closes"])
    unanswered = [t for r in reports for t in r["unanswered"]]
    lost = sum(1 for t in unanswered if w0 <= t < w1)
    # A heartbeat sent in a window and never answered counts as slower than any answered.
    window += [math.inf] * lost
    during += [math.inf] * sum(1 for t in unanswered if d0 <= t < d1)
    times = sorted(t for r in reports for t in r["dispatches"])
    cpu_s = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)

    rate = (len(window) - lost) / (w1 - w0)
    p99 = pct(sorted(window), 0.99) * 1e3
    met = "met" if p99 < TARGET_P99_MS else "NOT met"
    busy_p99 = pct(sorted(during), 0.99) * 1e3 if during else math.nan
    busy_met = "met" if busy_p99 < TARGET_P99_MS else "NOT met"
    print()
    print(
        f"nodes linked {linked}/{n} in {t_link:.1f} s ({linked / t_link:.0f}/s); "
        f"registered {registered}/{n} in {t_reg:.1f} s ({registered / t_reg:.0f}/s)"
    )
    print(
        f"heartbeats: {rate:.0f}/s for {w1 - w0:.0f} s (expected {linked / interval:.0f}/s; "
        f"the spec's {DEFAULT_HEARTBEAT_INTERVAL:g} s interval gives "
        f"{linked / DEFAULT_HEARTBEAT_INTERVAL:.0f}/s); round trip {latency_line(window)}"
        f"   target p99 < {TARGET_P99_MS:g} ms, no jobs: {met}"
    )
    print(
        f"  coordinator: {cpu_s / (w1 - w0) * 100:.0f}% of one core during the window "
        f"({cpu_s / max(len(window), 1) * 1e6:.0f} us CPU per heartbeat, pings and scheduler "
        f"included), RSS {rss_mb:.0f} MiB;  client event-loop delay p50 "
        f"{pct(lags, 0.5) * 1e3:.1f} ms p99 {pct(lags, 0.99) * 1e3:.1f} ms in the window "
        f"(inside the round trip)"
    )
    print(f"  coordinator garbage collections in the window: {gc_pauses}")
    if args.jobs:
        span = (times[-1] - t_submit0) if times else float("nan")
        print(
            f"dispatch: {dispatched} of {submitted} submitted tasks in {span:.1f} s = "
            f"{len(times) / span:.0f} tasks/s (submitted {submitted} of {args.jobs} in "
            f"{t_submit1 - t_submit0:.1f} s = {submitted / (t_submit1 - t_submit0):.0f} jobs/s)"
        )
        print(
            f"  heartbeats meanwhile: {len(during)} sent, round trip {latency_line(during)}"
            f"   target p99 < {TARGET_P99_MS:g} ms, while dispatching: {busy_met}"
        )
        print(
            f"  client event-loop delay meanwhile p50 {pct(busy_lags, 0.5) * 1e3:.1f} ms p99 "
            f"{pct(busy_lags, 0.99) * 1e3:.1f} ms; coordinator garbage collections "
            f"meanwhile: {dispatch_gc}"
        )
    problems = [f"registration: {e}" for e in reg_errors[:2]]
    if submit_error:
        problems.append(f"submit: {submit_error}")
    print(
        f"errors: {sum(errors.values())} ({', '.join(f'{k} x{v}' for k, v in errors.most_common(4)) or 'none'}); "
        f"links closed by the coordinator: {sum(closes.values())} {dict(closes) or ''}; "
        f"heartbeats unanswered at stop: {len(unanswered)} ({lost} sent in the window); "
        f"coordinator warnings: {coord_log}"
    )
    for p in problems:
        print(f"  {p}")
    busy_ok = not args.jobs or busy_p99 < TARGET_P99_MS
    return 0 if linked == n and p99 < TARGET_P99_MS and busy_ok else 1


def _interrupt(_sig: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # a kill runs the same clean-up as Ctrl-C
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted; processes stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
