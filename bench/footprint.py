"""What a node costs its operator at rest and over many tasks: real processes on loopback.

    python bench/footprint.py                 # ~5 minutes on a quiet 2-core machine
    python bench/footprint.py --tasks 300 --idle 30

A reference coordinator and one node daemon (``nodeclient run``, 2 slots, bubblewrap
workers, the production heartbeat of 30 s) run as separate processes. Measured from
outside, on the daemon and every process under it (bubblewrap and the workers):

1. At rest, linked and idle for ``--idle`` seconds: CPU time used (the limit is zero; a
   heartbeat every 30 s is the only work), and memory: USS (pages only this process
   has) and RSS per process. Next to the daemon's, a bare interpreter that imports the
   same modules and runs nothing: what is the libraries' and what is the daemon's own.
2. Two batches of ``--tasks`` inference tasks (Identity, 1 KiB) submitted to the
   coordinator and run by the node: the node's CPU per task, and what it holds before
   and after each batch: open file descriptors, threads, processes, USS. Pools and
   caches fill in the first batch (SQLite's page cache, a thread pool's last thread); a
   node that runs for months must hold the same after the second.
3. At rest again: idle CPU back to what it was.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.e2e.harness import CoordinatorProc, NodeProc, reap_all, wait_for
from tests.models import identity_model

from nodeclient.workloads.inference import make_request

HEARTBEAT_S = 30.0  # production: 2.3.3
MIB = 1024 * 1024


def tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return total


def held(pid: int) -> dict[str, float]:
    procs = tree(pid)
    mem = [p.memory_full_info() for p in procs]
    return {
        "processes": len(procs),
        "fds": sum(p.num_fds() for p in procs),
        "threads": sum(p.num_threads() for p in procs),
        "daemon_uss": mem[0].uss / MIB,
        "daemon_rss": mem[0].rss / MIB,
        "workers_uss": sum(m.uss for m in mem[1:]) / MIB,
        "workers_rss": sum(m.rss for m in mem[1:]) / MIB,
    }


def idle_cpu(pid: int, seconds: float) -> float:
    """CPU seconds the node's processes use over *seconds* of wall time at rest."""
    before = cpu_seconds(tree(pid))
    time.sleep(seconds)
    return cpu_seconds(tree(pid)) - before


def bare_daemon_uss() -> float:
    """USS of an interpreter that imports what ``nodeclient run`` imports and runs nothing."""
    code = (
        "import sys, time\n"
        "import nodeclient.node.cli, nodeclient.node.daemon, nodeclient.node.executor\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(0.5)
        return psutil.Process(proc.pid).memory_full_info().uss / MIB
    finally:
        proc.kill()
        proc.wait()


def run_tasks(coord: CoordinatorProc, n: int) -> float:
    """Submit *n* Identity inference jobs at once; seconds until every one succeeded."""
    payload = make_request(identity_model(), {"x": np.zeros(256, np.float32)}).encode()
    client = coord.client()
    t0 = time.monotonic()
    ids = [client.submit_job("ai.inference", payload)["job_id"] for _ in range(n)]
    for job_id in ids:  # placed in the order submitted: one light poll at a time
        job = wait_for(
            lambda j=job_id: (job := client.job(j))["status"] in ("succeeded", "failed") and job,
            timeout=600, what=f"job {job_id}",
        )  # fmt: skip
        if job["status"] != "succeeded":
            raise SystemExit(f"job {job_id} failed: {job.get('reason')}")
    elapsed = time.monotonic() - t0
    client.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--idle", type=float, default=60.0, help="seconds at rest, each time")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        clock = root / "clock"
        coord = CoordinatorProc(root, clock_file=clock)
        try:
            run(coord, root, clock, args)
        finally:
            reap_all()


def run(coord: CoordinatorProc, root: Path, clock: Path, args: argparse.Namespace) -> None:
    import tests.e2e.harness as harness

    harness.HEARTBEAT = HEARTBEAT_S  # both sides' interval, as in production
    coord.start()
    node = NodeProc(root, "node", coordinator=coord.url, clock_file=clock, slots=2)
    node.start()
    node.wait_linked(timeout=120)
    assert node.proc is not None
    pid = node.proc.pid
    time.sleep(5)  # the start-up's last writes settle
    rest = held(pid)
    cpu_rest = idle_cpu(pid, args.idle)
    floor = bare_daemon_uss()
    print(f"1. at rest, linked, {args.idle:.0f} s, heartbeat every {HEARTBEAT_S:.0f} s:")
    print(
        f"   CPU {cpu_rest * 1e3:.0f} ms over {args.idle:.0f} s = "
        f"{cpu_rest / args.idle * 100:.3f} % of one core (limit: 0)"
    )
    print(
        f"   daemon USS {rest['daemon_uss']:.1f} MiB (RSS {rest['daemon_rss']:.1f}); the same "
        f"modules imported, nothing running: {floor:.1f} MiB; the daemon's own "
        f"{rest['daemon_uss'] - floor:.1f} MiB"
    )
    print(
        f"   {rest['processes'] - 1:.0f} processes under it (bubblewrap, 2 workers): USS "
        f"{rest['workers_uss']:.1f} MiB (RSS {rest['workers_rss']:.1f})"
    )
    print(f"   open files {rest['fds']:.0f}, threads {rest['threads']:.0f} (daemon and workers)")

    warm = run_tasks(coord, 50)  # the model cached, sessions built
    print(f"2. inference tasks (Identity, 1 KiB) in two batches of {args.tasks}, after "
          f"{warm:.1f} s of warm-up; what the node holds before, after each, and the change:")  # fmt: skip
    counts = [held(pid)]
    for batch in (1, 2):
        cpu0 = cpu_seconds(tree(pid))
        elapsed = run_tasks(coord, args.tasks)
        cpu_tasks = cpu_seconds(tree(pid)) - cpu0
        time.sleep(2)  # acknowledgements and clean-up reports
        counts.append(held(pid))
        print(
            f"   batch {batch}: {elapsed:.1f} s ({args.tasks / elapsed:.0f} tasks/s through "
            f"the coordinator); node CPU {cpu_tasks / args.tasks * 1e3:.2f} ms a task "
            "(daemon and workers)"
        )
    for key, unit in (("fds", ""), ("threads", ""), ("processes", ""),
                      ("daemon_uss", " MiB"), ("workers_uss", " MiB")):  # fmt: skip
        a, b, c = (h[key] for h in counts)
        print(
            f"   {key:<12} {a:7.1f}  {b:7.1f}  {c:7.1f}{unit:<4}   batch 1 {b - a:+.1f}, "
            f"batch 2 {c - b:+.1f}"
            + (f" ({(c - b) * 1024 / args.tasks:+.2f} KiB a task)" if unit else "")
        )
    cpu_again = idle_cpu(pid, args.idle)
    print(
        f"3. at rest again, {args.idle:.0f} s: CPU {cpu_again * 1e3:.0f} ms = "
        f"{cpu_again / args.idle * 100:.3f} % of one core"
    )
    node.stop()
    coord.stop()


if __name__ == "__main__":
    main()
