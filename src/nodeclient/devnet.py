"""``nodeclient devnet``: a whole network on one machine, with one command.

Starts a reference coordinator on loopback (SQLite) and N node daemons with their own
homes, keys and shares of the CPUs, as real processes, all in one new directory in TMPDIR
that is removed afterwards (``--keep`` keeps it). Submits demo jobs: digits-classifier
inference on ONNX Runtime, and where their runtimes are usable here a Blender render
split into slices over the nodes and a DiLoCo training job on PyTorch. Shows progress,
checks every result the way a stranger would (SHA-256 and eth-account alone), prints
each node's state transitions and exits 0. ``--serve`` keeps the network up until
interrupted. Its children die with it, however it ends (:func:`_die_with_devnet`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import IO, Any, Final

import numpy as np

from nodeclient.coordinator import audit
from nodeclient.entry import die_with_parent
from nodeclient.errors import NodeClientError
from nodeclient.node import control, keys, securefile, wallet
from nodeclient.node.config import NodeConfig, write_config
from nodeclient.protocol.secp import Secp256k1Key
from nodeclient.text import printable

Print = Callable[[str], None]


class DevnetError(NodeClientError):
    """The devnet could not start or a demo job did not verify."""


# Ctrl-C, SIGTERM (kill, a supervisor) and SIGHUP (its terminal closed) all stop the devnet
# through run_devnet's cleanup: its children stopped, its directory (node keys) removed.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Each child in a process group of its own: the terminal's Ctrl-C (SIGINT) and hang-up
# (SIGHUP) reach the devnet alone, which stops its children in order (Devnet.stop); sent
# to them all at once, the coordinator would stop while its nodes still drain.
CHILD_PROCESS_GROUP: Final = 0
# Stopping: how long the nodes may finish their tasks before they are asked to hand them
# back, and how long anything may take before it is killed.
NODE_PATIENCE_S = 10.0
STOP_GRACE_S = 30.0
# What each child gets from the kernel when the devnet dies without its cleanup (SIGKILL,
# the OOM killer, a CI job's timeout): the stop it would have had, so that the coordinator
# closes its database and each node ends its own workers (an unsandboxed one is in no
# sandbox that dies with the node), instead of running on for ever as children of init.
ORPHAN_SIGNAL: Final = signal.SIGTERM
# The least free space the devnet starts with where its directory goes (its database,
# the nodes' outboxes, the tasks' work directories, the render's frames): on a disk that
# fills up midway its jobs wait for results that cannot be stored.
MIN_FREE_BYTES: Final = 256 * 2**20
# How long a job's status line may stay the same before the devnet quotes the latest
# warning or error its children logged: a devnet stuck on a full disk says why.
STALL_REPORT_S = 30.0
_PROBLEM_LEVELS: Final = frozenset({"warning", "error", "critical"})
_LOG_TAIL_BYTES: Final = 256 * 1024  # how much of a log's end is read for a reason
_NOT_QUOTED: Final = frozenset({"ts", "level", "logger", "event", "exc"})  # in the log only


@dataclass
class Devnet:
    workdir: Path
    heartbeat: float
    out: Print
    coordinator: subprocess.Popen[bytes] | None = None
    url: str = ""
    nodes: list[tuple[Path, subprocess.Popen[bytes]]] = field(default_factory=list)
    _sandbox: bool | None = None

    def start_coordinator(self, *, extra: list[str] | None = None) -> str:
        data = self.workdir / "coordinator"
        data.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, "-m", "nodeclient.coordinator.cli", "serve",
            "--host", "127.0.0.1", "--port", "0", "--data-dir", str(data),
            "--heartbeat-interval", str(self.heartbeat), *(extra or []),
        ]  # fmt: skip
        log = open(data / "coordinator.log", "ab")  # noqa: SIM115 - lives as long as the process
        self.coordinator = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=log, env=self.child_env(),
            process_group=CHILD_PROCESS_GROUP,
            preexec_fn=_die_with_devnet(),  # noqa: PLW1509 - safe with threads: see there
        )  # fmt: skip
        self.url = _wait_for_line(
            self.coordinator, "coordinator: ", timeout=60.0, log=data / "coordinator.log"
        )
        return self.url

    def child_env(self, **changes: str) -> dict[str, str]:
        """This process's environment with *changes*, and TMPDIR the devnet's directory:
        tempfile takes /tmp without a word where TMPDIR is full or read-only, and the
        children would otherwise write their temporary files there (the nodes their tasks'
        work directories), not where the devnet checked for room and removes afterwards."""
        return {**os.environ, "TMPDIR": str(self.workdir), **changes}

    def sandbox_available(self) -> bool:
        """Whether bubblewrap works here; a devnet without it runs tasks unsandboxed."""
        from nodeclient.node import sandbox

        if self._sandbox is None:
            self._sandbox = sandbox.probe()[0]
        return self._sandbox

    def add_node(self, index: int, cpus: set[int] | None = None, *, gpus: bool = False) -> Path:
        """Start node *index*; with *cpus* it runs (and sells) only those CPUs. Without
        *gpus* it is a CPU node; with it, it uses the GPUs this process may see (its
        CUDA_VISIBLE_DEVICES, else every card), as a node started here would."""
        home = securefile.ensure_home(self.workdir / f"node{index}", create=True)
        info = keys.init_keys(home, passphrase=None)
        # Each node's operator has a wallet of its own, which signs the node's binding
        # (the wallet proof the devnet's coordinator requires). A real wallet's key never
        # needs to be on the node: `nodeclient wallet-proof` takes a wallet app's signature.
        owner = Secp256k1Key.generate()
        config = NodeConfig(
            wallet_address=owner.address, region="local", coordinator=self.url,
            heartbeat_interval=self.heartbeat,
            # A local demo still runs without bubblewrap; a real node never does by default.
            allow_unsandboxed=not self.sandbox_available(),
        )  # fmt: skip
        write_config(home, config)
        proof = wallet.sign_proof(
            owner, wallet_address=owner.address, node_id=info.node_id,
            issued_at=int(time.time()), chain_id=config.chain_id,
        )  # fmt: skip
        wallet.save_proof(home, proof)
        log = open(home / "node.log", "ab")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(
            [sys.executable, "-m", "nodeclient.node.cli", "run", "--home", str(home)],
            stdout=subprocess.DEVNULL,
            stderr=log,
            # A network of CPU nodes: each node would take every GPU of this one machine,
            # and run nothing where onnxruntime or torch is a CPU build (the default).
            env=self.child_env() if gpus else self.child_env(CUDA_VISIBLE_DEVICES=""),
            process_group=CHILD_PROCESS_GROUP,
            preexec_fn=_die_with_devnet(),  # noqa: PLW1509 - safe with threads: see there
        )
        self.nodes.append((home, proc))  # at once: stop() ends it whatever happens next
        if cpus:  # set long before the node probes its hardware (interpreter start, imports)
            os.sched_setaffinity(proc.pid, cpus)
        return home

    def check_alive(self) -> None:
        """DevnetError, with its reason from its log (:func:`_reason`), for the first child
        that has exited: the devnet's network is the coordinator and every node, all up."""
        if self.coordinator is not None and self.coordinator.poll() is not None:
            why = _reason(self.coordinator_log)
            raise DevnetError(f"the coordinator {_ended(self.coordinator.returncode)}: {why}")
        for home, proc in self.nodes:
            if proc.poll() is not None:
                why = _reason(home / "node.log")
                raise DevnetError(f"node in {home} {_ended(proc.returncode)}: {why}")

    @property
    def coordinator_log(self) -> Path:
        return self.workdir / "coordinator" / "coordinator.log"

    def logs(self) -> list[Path]:
        """Every child's log: the coordinator's, then each node's."""
        return [self.coordinator_log, *(home / "node.log" for home, _ in self.nodes)]

    def stop(self, grace: float = STOP_GRACE_S, *, patience: float = NODE_PATIENCE_S) -> None:
        """The nodes first, while the coordinator is still up to take what they send and
        hand back: SIGTERM (they take no new work and finish their tasks), again after
        *patience* seconds to those still running (they hand their tasks back at once,
        signed, rather than wait out their own grace), and SIGKILL to any still running
        *grace* seconds after the first. Then the coordinator, SIGTERM then SIGKILL after
        *grace*. One deadline for all the nodes, not one each: nothing (run_devnet's
        cleanup ignores Ctrl-C) can cut the wait short."""
        _stop_all([p for _, p in self.nodes], patience=patience, grace=grace)
        if self.coordinator is not None:
            _stop_all([self.coordinator], patience=grace, grace=grace)


def _die_with_devnet() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send the child ORPHAN_SIGNAL when the devnet
    dies, whatever kills it (:func:`~nodeclient.entry.die_with_parent`): its cleanup
    cannot run after a SIGKILL. The devnet starts its children from its main thread,
    which lives as long as the devnet does."""
    return die_with_parent(ORPHAN_SIGNAL)


def _stop_all(procs: list[subprocess.Popen[bytes]], *, patience: float, grace: float) -> None:
    """SIGTERM to each of *procs* still running, again after *patience*, SIGKILL after
    *grace*, each reaped."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        p.send_signal(signal.SIGTERM)
    start = time.monotonic()
    if patience < grace:
        _wait_all(alive, until=start + patience)
        for p in alive:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
    _wait_all(alive, until=start + grace)
    for p in alive:
        if p.poll() is None:
            p.kill()
            p.wait()


def _wait_all(procs: list[subprocess.Popen[bytes]], *, until: float) -> None:
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.0, until - time.monotonic()))


def _wait_for_line(proc: subprocess.Popen[bytes], prefix: str, *, timeout: float, log: Path) -> str:
    """Read the child's stdout until a line starts with *prefix*; return the rest. A child
    that exits first is reported with its reason from its *log* (its stderr)."""
    assert proc.stdout is not None
    found: list[str] = []
    stream: IO[bytes] = proc.stdout

    def reader() -> None:
        for raw in stream:
            line = raw.decode(errors="replace").strip()
            if line.startswith(prefix):
                found.append(line[len(prefix) :])
                return

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    t.join(timeout)
    if found:
        return found[0]
    if not t.is_alive():  # its stdout ended: the child exited (or is exiting) before it listened
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    if proc.poll() is not None:
        raise DevnetError(f"the coordinator {_ended(proc.returncode)}: {_reason(log)}")
    proc.kill()
    raise DevnetError(
        f"the coordinator did not report its address within {timeout:.0f} s (see {log})"
    )


def demo_jobs(count: int) -> list[tuple[bytes, np.ndarray]]:
    """Digits-classifier inference jobs: (payload, expected labels) each."""
    from nodeclient.workloads.inference import make_request

    assets = resources.files("nodeclient.assets")
    model = assets.joinpath("digits.onnx").read_bytes()
    with assets.joinpath("digits_test.npz").open("rb") as fh:
        data = np.load(fh)
        x, y = data["x"], data["y"]
    out = []
    for part_x, part_y in zip(np.array_split(x, count), np.array_split(y, count), strict=True):
        out.append((make_request(model, {"X": part_x}).encode(), part_y))
    return out


RENDER_RAM_MB = 256  # what the demo render declares each slice needs (Blender, tiny scene)

DEMO_MLP = [
    {"type": "Linear", "in": 64, "out": 32},
    {"type": "ReLU"},
    {"type": "Linear", "in": 32, "out": 10},
]


def demo_render(client: Any) -> bytes:
    """A 6-frame animated scene, uploaded to the blob store and referenced by SHA-256."""
    from nodeclient.workloads import render

    scene = resources.files("nodeclient.assets").joinpath("demo_scene.blend").read_bytes()
    blob = client.upload_blob(scene)
    request = render.make_request(
        scene, frames=(1, 6), width=64, height=48, samples=4, scene_url=blob["url"]
    )
    return request.encode()


def demo_training() -> bytes:
    """A small MLP on the bundled digits images: 2 slices a round, 3 rounds."""
    from nodeclient.workloads import training as tr

    with resources.files("nodeclient.assets").joinpath("digits_test.npz").open("rb") as fh:
        data = np.load(fh)
        x, y = data["x"].astype(np.float32), data["y"].astype(np.int64)
    config = tr.TrainingConfig(
        rounds=3, inner_steps=30, batch_size=32, inner=tr.InnerOptimizer(lr=3e-3)
    )
    return tr.JobRequest(tr.ModelSpec.parse(DEMO_MLP), config, x, y).encode()


def describe_result(wclass: str, data: bytes, job: dict[str, Any]) -> str:
    """One line saying what an assembled render or training result holds."""
    if wclass == "media.render":
        from nodeclient.workloads import render_slices

        frames = render_slices.decode_result(data, max_header_bytes=len(data))
        nodes = {t["node_id"] for t in job["tasks"] if t["status"] == "succeeded"}
        return (
            f"render assembled: {len(frames.frames)} frames of {frames.width}x{frames.height} "
            f"from {len(nodes)} node(s)"
        )
    from nodeclient.workloads import training as tr

    _weights, metrics = tr.decode_final(data)
    losses = [m.get("last_loss") for m in metrics if isinstance(m, dict)]
    shown = ", ".join(f"{v:.3f}" for v in losses if isinstance(v, int | float))
    return f"training finished {len(metrics)} rounds; loss per round: {shown or 'n/a'}"


def cpu_shares(nodes: int) -> list[set[int]]:
    """Each node's CPUs: the machine split into equal, disjoint shares, as separate machines
    would be (shared round-robin when there are more nodes than CPUs). A node advertises
    and uses only its share, so a job split over two nodes really runs on twice the CPUs."""
    cpus = sorted(os.sched_getaffinity(0))
    if nodes >= len(cpus):
        return [{cpus[i % len(cpus)]} for i in range(nodes)]
    base, extra = divmod(len(cpus), nodes)
    shares, start = [], 0
    for i in range(nodes):
        size = base + (1 if i < extra else 0)
        shares.append(set(cpus[start : start + size]))
        start += size
    return shares


def run_devnet(
    *, nodes: int, serve: bool, jobs: int, heartbeat: float, keep: bool, out: Print = print
) -> int:
    workdir = _make_workdir(nodes)
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    # SIGTERM and SIGHUP unwind like Ctrl-C, so the child processes are always stopped.
    _handle(signal.SIGTERM, signal.SIGHUP, handler=_raise_stopped)
    net = Devnet(workdir=workdir, heartbeat=heartbeat, out=out)
    failed = False
    stopped_by: int | None = None
    try:
        _run(net, nodes=nodes, jobs=jobs, serve=serve)
    except _Stopped as exc:
        stopped_by = exc.signum
        return 128 + exc.signum  # as a shell reports a command that the signal ended
    except BrokenPipeError:  # its reader went (`nodeclient devnet | head`): as an interrupt
        return 128 + signal.SIGPIPE
    except Exception:
        failed = True  # the logs say what went wrong; an interrupt leaves nothing to read
        raise
    finally:
        # A second Ctrl-C or signal must not cut the cleanup short: the children would
        # keep running and the nodes' private keys stay on disk, without a word.
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        try:
            net.stop()
            if not (keep or failed):
                shutil.rmtree(workdir, ignore_errors=True)
            # On stderr: seen when stdout is a pipe (or went away), or the terminal
            # closed (SIGHUP), where it cannot be written at all.
            with contextlib.suppress(OSError):
                if stopped_by is not None:  # Ctrl-C's line is the CLI's: "interrupted"
                    print(_stopped_line(stopped_by, workdir), file=sys.stderr)
                elif keep or failed:
                    print(f"devnet files kept in {workdir}", file=sys.stderr)
        finally:
            for sig, handler in previous.items():
                if handler is not None:  # None: set outside Python, cannot be put back
                    signal.signal(sig, handler)
    return 0


def _stopped_line(signum: int, workdir: Path) -> str:
    """The one line a devnet that SIGTERM or SIGHUP stopped ends with, once its cleanup
    is done: as Ctrl-C's "interrupted", else a supervisor's stop would pass without a
    word. It says where the files are, if any are left (--keep)."""
    files = f"are kept in {workdir}" if workdir.exists() else "are removed"
    return (
        f"nodeclient: devnet stopped by {signal.Signals(signum).name}: its processes have "
        f"ended and its files {files}"
    )


def _run(net: Devnet, *, nodes: int, jobs: int, serve: bool) -> None:
    """Start the network, run and verify the demo jobs; with *serve*, wait for a signal."""
    from nodeclient.coordinator.client import CoordinatorClient
    from nodeclient.workloads.inference import decode_result

    out = net.out
    url = net.start_coordinator(extra=["--require-wallet-proof"])
    out(f"coordinator: {url}")
    if not net.sandbox_available():
        out("bubblewrap is not usable here: the devnet's nodes run tasks UNSANDBOXED")
    shares = cpu_shares(nodes)
    for i in range(nodes):
        home = net.add_node(i, shares[i])
        cpus = ",".join(map(str, sorted(shares[i])))
        out(f"node {i}: {keys.node_id_of(home)}  (CPUs {cpus}, home {home})")
    client = CoordinatorClient(url)
    _wait_online(client, net, out)
    submitted = _submit_demo_jobs(client, jobs, out, sandboxed=net.sandbox_available())
    correct = total = 0
    for wclass, job_id, labels in submitted:
        # a render job is assembled again from its verified slices, a training job's
        # rounds replayed from its verified pseudo-gradients, given its payload
        payload = labels if wclass in ("media.render", "ai.training") else None
        assembled = _verified_job(client, job_id, out, net, payload=payload)
        if wclass == "ai.inference":
            outputs, _meta = decode_result(assembled)
            correct += int((outputs["label"] == labels).sum())
            total += len(labels)
        else:
            out("  " + describe_result(wclass, assembled, client.job(job_id)))
    share = correct / max(total, 1)
    out(f"digits classified: {correct}/{total} correct ({share:.1%}), every result verified")
    for i, (home, _proc) in enumerate(net.nodes):
        st = control.request(home / control.SOCKET_NAME, {"cmd": "status"})
        out(f"node {i} states: {state_line(st)}")
    if serve:
        out("devnet is running; press Ctrl-C to stop")
        stop = threading.Event()
        _handle(*STOP_SIGNALS, handler=lambda *_: stop.set())
        while not stop.wait(0.5):
            net.check_alive()  # else a crashed coordinator still shows "running"
        out("stopping the devnet")


def _make_workdir(nodes: int) -> Path:
    """A new temporary directory, short enough for its nodes' control sockets' paths
    where no shorter name reaches them (/proc not mounted: see node.control), on a file
    system with MIN_FREE_BYTES free."""
    try:
        workdir = Path(tempfile.mkdtemp(prefix="nodeclient-devnet-"))
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        raise DevnetError(
            f"cannot create the devnet's directory{where}: {exc.strerror or exc}; "
            "set TMPDIR to a writable directory"
        ) from exc
    longest = len(os.fsencode(workdir / f"node{nodes - 1}" / control.SOCKET_NAME))
    if longest > control.SOCKET_PATH_MAX and not control.reaches_deep_sockets():
        # Every node would fail to start, one by one.
        workdir.rmdir()
        raise DevnetError(
            f"the devnet's directory {workdir} is too long for its nodes' control sockets "
            f"({longest} bytes, over the {control.SOCKET_PATH_MAX} a Unix socket allows): set "
            "TMPDIR to a shorter directory"
        )
    free = shutil.disk_usage(workdir).free
    if free < MIN_FREE_BYTES:
        # Else its jobs wait out their timeouts in silence, once the disk fills up.
        workdir.rmdir()
        raise DevnetError(
            f"only {free // 2**20} MB free on the file system of {workdir.parent}, where the "
            f"devnet's directory goes (it needs {MIN_FREE_BYTES // 2**20} MB): free space "
            "there, or set TMPDIR to a directory with room"
        )
    return workdir


def state_line(status: dict[str, Any]) -> str:
    """A node's state path, current state and completed tasks, from its status. The
    status holds only the latest control.STATUS_TRANSITIONS transitions: a path that may be cut
    says so, instead of beginning at READY as if it were the whole history."""
    transitions = status["transitions"]
    now = f"now {status['state']}, {status['completed']} completed"
    if not transitions:
        return f"{status['state']}  ({now})"
    path = " -> ".join([transitions[0]["from"]] + [t["to"] for t in transitions])
    # READY is where a daemon starts and no transition leads back to: a path from it is whole.
    if len(transitions) < control.STATUS_TRANSITIONS or transitions[0]["from"] == "READY":
        return f"{path}  ({now})"
    return f"... -> {path}  (the last {len(transitions)} transitions; {now})"


def _submit_demo_jobs(
    client: Any, jobs: int, out: Print, *, sandboxed: bool
) -> list[tuple[str, str, Any]]:
    """Inference jobs always; a render and a training job where their runtimes are usable."""
    from nodeclient.node.runtimes import usable_workload_classes

    classes = usable_workload_classes(sandboxed=sandboxed)
    usable = {c for c, (ok, _why) in classes.items() if ok}
    submitted: list[tuple[str, str, Any]] = []
    for payload, labels in demo_jobs(jobs):
        job = client.submit_job(workload_class="ai.inference", payload=payload)
        submitted.append(("ai.inference", job["job_id"], labels))
        out(f"job {job['job_id']}: submitted (digits classifier, {len(labels)} images)")
    if "media.render" in usable:
        render_payload = demo_render(client)
        # Declared, as a requester would: each slice goes only where a slot has the RAM.
        job = client.submit_job("media.render", render_payload, slices=2, ram_mb=RENDER_RAM_MB)
        submitted.append(("media.render", job["job_id"], render_payload))
        out(
            f"job {job['job_id']}: submitted (Blender render, 6 frames in 2 slices, "
            f"{RENDER_RAM_MB} MB of RAM each)"
        )
    else:
        out(f"media.render skipped: {classes['media.render'][1]}")
    if "ai.training" in usable:
        training_payload = demo_training()
        job = client.submit_job("ai.training", training_payload, slices=2)
        submitted.append(("ai.training", job["job_id"], training_payload))
        out(f"job {job['job_id']}: submitted (training, 2 slices x 3 rounds, DiLoCo)")
    else:
        out(f"ai.training skipped: {classes['ai.training'][1]}")
    return submitted


def _verified_job(
    client: Any, job_id: str, out: Print, net: Devnet, *, payload: bytes | None = None
) -> bytes:
    """Wait for a job, check every task and the result as a stranger would
    (``nodeclient-coordinator verify``), return the assembled result."""
    job = _wait_job(client, job_id, out, net)
    if job["status"] != "succeeded":
        raise DevnetError(f"job {job_id} failed: {job.get('reason')}")
    result = bytes(client.raw_job_result(job_id))
    report = audit.audit_job(
        job, client.task_result, lambda: result,
        fetch_manifest=client.manifest, job_id=job_id, payload=payload,
    )  # fmt: skip
    for t in report.tasks:
        if t.ok is None:
            continue  # a slice dropped from a training round: nothing to verify
        if not t.ok:
            raise DevnetError(t.detail)
        proof = (t.proof or "")[:18]
        out(
            f"  task {t.task_id} on {t.node_id}: proof {proof}… verified, signature "
            "verified, node manifest verified"
        )
    if not report.ok:
        raise DevnetError(f"job {job_id}: {report.result}")
    out(f"  job result: {report.result}")
    return result


class _Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, unwinding like Ctrl-C; the devnet exits 128 + its number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum: int, _frame: object) -> None:
    raise _Stopped(signum)


def _handle(*signals: signal.Signals, handler: Callable[[int, Any], None]) -> None:
    """Catch *signals*, except one the devnet was started with ignored (nohup: SIGHUP)."""
    for sig in signals:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, handler)


def _ended(returncode: int) -> str:
    """How a child ended: "exited with 3", or "was killed by signal 9 (SIGKILL)" (kill -9,
    the OOM killer), where Popen's returncode is the signal's number, negated."""
    if returncode >= 0:
        return f"exited with {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        return f"was killed by signal {-returncode}"
    return f"was killed by signal {-returncode} ({name})"


def _reason(log: Path) -> str:
    """Why a child exited, from its log: its last line where that is not a log event (a
    traceback's last line, an argument error: what ended it); else its last warning or
    error, since a process killed (kill -9, the OOM killer) writes nothing, and its last
    event is whatever it did last; else its last line."""
    lines = _log_lines(log)
    if lines is None:
        return "(no log)"
    if not lines:
        return "(no output)"
    last = _event(lines[-1])
    if last is None:
        return printable(lines[-1][-300:])
    for line in reversed(lines):
        event = _event(line)
        if event is not None and event["level"] in _PROBLEM_LEVELS:
            return _quoted(event)
    return _quoted(last)


def _latest_problem(net: Devnet, *, since: float) -> str | None:
    """The latest warning or error any child logged at or after *since* (the logs' own
    wall-clock times), with the log it is in; None if there is none."""
    found: tuple[float, Path, dict[str, Any]] | None = None
    for log in net.logs():
        for line in _log_lines(log) or []:
            event = _event(line)
            if event is None or event["level"] not in _PROBLEM_LEVELS:
                continue
            ts = event.get("ts")
            if isinstance(ts, int | float) and ts >= since and (found is None or ts >= found[0]):
                found = (ts, log, event)
    if found is None:
        return None
    _ts, log, event = found
    return f"{log.relative_to(net.workdir)}: {_quoted(event)}"


def _log_lines(log: Path) -> list[str] | None:
    """The lines of *log*'s last _LOG_TAIL_BYTES (a node's log grows for as long as it
    runs), or None when it cannot be read."""
    try:
        with log.open("rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - _LOG_TAIL_BYTES))
            tail = fh.read()
    except OSError:
        return None
    lines = tail.decode(errors="replace").strip().splitlines()
    return lines[1:] if size > _LOG_TAIL_BYTES and len(lines) > 1 else lines  # one cut


def _event(line: str) -> dict[str, Any] | None:
    """A structured log line's event (nodeclient.logs: JSON with its level), else None."""
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if isinstance(event, dict) and isinstance(event.get("level"), str):
        return event
    return None


def _quoted(event: dict[str, Any]) -> str:
    """An event as the devnet quotes it, cut to 300 characters: its level, name and
    fields; its time, logger and traceback stay in the log."""
    fields = " ".join(f"{k}={v}" for k, v in event.items() if k not in _NOT_QUOTED)
    text = f"{event['level']} {event.get('event')}" + (f": {fields}" if fields else "")
    return printable(text)[:300]


def _wait_online(client: Any, net: Devnet, out: Print, timeout: float = 90.0) -> None:
    """Wait until every node is linked; fail fast, with its last log line, if one dies
    (or the coordinator does)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        net.check_alive()
        online = [n for n in client.nodes() if n.get("online")]
        if len(online) >= len(net.nodes):
            out(f"{len(online)} node(s) registered, linked and heartbeating")
            return
        time.sleep(0.2)
    raise DevnetError(f"nodes did not come online within {timeout:.0f} s (see node*/node.log)")


def _wait_job(
    client: Any, job_id: str, out: Print, net: Devnet, timeout: float = 300.0
) -> dict[str, Any]:
    """Poll a job, printing each change: task states and the nodes' per-slice progress.
    A status that stays the same for STALL_REPORT_S is followed by the latest warning or
    error the children logged meanwhile (a full disk, a refused result; each said once),
    or that there is none."""
    deadline = time.monotonic() + timeout
    since = time.time()  # as the logs' times are
    last = ""
    changed = time.monotonic()
    quoted: str | None = None
    while time.monotonic() < deadline:
        net.check_alive()  # a node that died would leave its tasks waiting out their leases
        job: dict[str, Any] = client.job(job_id)
        progress = _progress(net)
        parts = []
        for t in job["tasks"]:
            node = t.get("node_id")
            where = f" on {node[:10]}" if node else ""  # a queued task has no node yet
            # the coordinator's view of progress, else the node's own
            p = t.get("progress") or progress.get(t["task_id"])
            extra = f" {p['done']:g}/{p['total']:g}" if p else ""
            parts.append(f" [{t['status']}{where}{extra}]")
        line = f"job {job_id}: {job['status']}" + "".join(parts)
        if line != last:
            out(line)
            last, changed = line, time.monotonic()
        if job["status"] in ("succeeded", "failed"):
            return job
        if time.monotonic() - changed >= STALL_REPORT_S:
            changed = time.monotonic()  # the next look after as long again
            problem = _latest_problem(net, since=since)
            said = (
                f"latest warning or error: {problem}"
                if problem
                else "no warning or error in the devnet's logs meanwhile"
            )
            if said != quoted:
                out(f"  no change for {STALL_REPORT_S:g} s; {said}")
                quoted = said
        time.sleep(0.1)
    problem = _latest_problem(net, since=since)
    why = f"; latest warning or error: {problem}" if problem else ""
    raise DevnetError(f"job {job_id} did not finish within {timeout:.0f} s{why}")


def _progress(net: Devnet) -> dict[str, dict[str, float]]:
    """task_id -> latest progress, read from every node's control socket."""
    found: dict[str, dict[str, float]] = {}
    for home, _proc in net.nodes:
        try:
            st = control.request(home / control.SOCKET_NAME, {"cmd": "status"}, timeout=1.0)
        except (NodeClientError, OSError):
            continue
        for t in st.get("running", []):
            if t.get("progress"):
                found[t["task_id"]] = t["progress"]
    return found
