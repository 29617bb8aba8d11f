"""GPU node check and benchmark: what the node does on a machine with an NVIDIA GPU.

    python bench/gpu.py --out DIR                 # about 2 minutes; an NVIDIA GPU and driver
    python bench/gpu.py --out DIR --network-only  # part 6 alone

CI has no GPU, so the GPU paths are tested there against recorded NVML answers and stand-ins
for CUDA builds (tests/node/test_gpu_*). This script runs them for real and records what a
real card answered, so those recordings can be refreshed from a real machine:

1. The machine: driver, cards, device files, the installed torch and onnxruntime builds.
2. The NVML probe (2.3.2) as the node runs it, in a child process; DIR/nvml_probe.json is
   its answer and DIR/nvml_replay.json the same card as a ``NODECLIENT_NVML_REPLAY``
   recording (tests/node/fixtures/nvml/), utilisation and memory in use included.
3. What the node would declare: the GPU part of the manifest, the tier, the workload classes
   its GPU slots can serve, whether the sandbox works, and doctor's GPU and runtime checks.
4. ai.training on CUDA (2.3.5), in this process: one slice of the devnet's training job and
   one of a larger MLP, each run once to warm up and 3 times more on the GPU (the result
   bytes must be identical: the slice is deterministic per device kind) and once on the
   CPU in a child process. The GPU and CPU pseudo-gradients must agree to 1e-4 of the
   largest update for the short slice; for the long one the difference is printed only
   (AdamW grows float32 rounding differences once the loss is near zero). The slice's
   time is printed next to a bare PyTorch loop doing the same steps on the same device,
   the raw limit.
5. ai.inference on CUDA where the onnxruntime build has the CUDA execution provider.
6. A whole network: a coordinator and one GPU node (sandboxed where bubblewrap works) on
   loopback; a training job and, where the GPU slots serve inference, an inference job,
   each verified as a stranger would (``nodeclient-coordinator verify``). It prints each
   worker start (and the class it was started for) and each task's time, and fails if a
   worker was started during the training job: its slot's worker, started with the
   daemon, must serve every slice. DIR gets the node's log and status.

Each part reports its own failure and the script goes on; the exit status is 1 if any
part failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from nodeclient.workloads import training as tr

BIG_MLP = [
    {"type": "Linear", "in": 64, "out": 1024},
    {"type": "ReLU"},
    {"type": "Linear", "in": 1024, "out": 1024},
    {"type": "ReLU"},
    {"type": "Linear", "in": 1024, "out": 10},
]
FAILED: list[str] = []


def part(title: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            print(f"\n== {title}", flush=True)
            started = time.monotonic()
            try:
                return fn(*args)
            except Exception:  # reported, and the other parts still run
                traceback.print_exc(file=sys.stdout)
                FAILED.append(title)
                return None
            finally:
                print(f"({title}: {time.monotonic() - started:.1f} s)", flush=True)

        return run

    return wrap


def _sh(cmd: str) -> str:
    done = subprocess.run(cmd, shell=True, check=False, capture_output=True, text=True, timeout=60)
    return (done.stdout + done.stderr).strip()


@part("machine")
def machine() -> None:
    print(_sh("nvidia-smi --query-gpu=index,name,uuid,memory.total,driver_version --format=csv"))
    print(_sh("ls -l /dev/nvidia* /dev/nvidia-caps 2>&1"))
    print("LD_LIBRARY_PATH:", os.environ.get("LD_LIBRARY_PATH", "(unset)"))
    print("CUDA_VISIBLE_DEVICES:", os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)"))
    print(_sh("ldconfig -p | grep -E 'libcuda.so|libnvidia-ml.so'"))
    print("python:", sys.executable, sys.version.split()[0])
    print("bwrap:", shutil.which("bwrap"), _sh("bwrap --version"))
    import onnxruntime as ort
    import torch

    print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())
    print("onnxruntime", ort.__version__, ort.get_available_providers())


@part("NVML probe (2.3.2), recorded")
def nvml(out: Path) -> None:
    from nodeclient.node import hardware

    answer = subprocess.run(
        [sys.executable, "-m", "nodeclient.node.nvml_probe"],
        check=False,
        capture_output=True,
        timeout=60,
    )
    (out / "nvml_probe.json").write_bytes(answer.stdout)
    print("probe child:", answer.stdout.decode().strip())
    probe = hardware.probe_gpus()
    print("probe_gpus:", probe.status, probe.detail, probe.per_device, probe.fix)
    import pynvml

    pynvml.nvmlInit()
    try:
        devices = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            rec: dict[str, Any] = {
                "name": pynvml.nvmlDeviceGetName(h),
                "uuid": pynvml.nvmlDeviceGetUUID(h),
                "memory_total": int(mem.total),
                "memory_used": int(mem.used),
                "utilization": int(pynvml.nvmlDeviceGetUtilizationRates(h).gpu),
                "minor": int(pynvml.nvmlDeviceGetMinorNumber(h)),
                "pci_bus_id": pynvml.nvmlDeviceGetPciInfo(h).busId,
            }
            try:
                rec["mig"] = int(pynvml.nvmlDeviceGetMigMode(h)[0]) == 1
            except pynvml.NVMLError as exc:
                print(f"device {i}: nvmlDeviceGetMigMode: {exc}")
            devices.append(rec)
        replay = {"driver_version": pynvml.nvmlSystemGetDriverVersion(), "devices": devices}
    finally:
        pynvml.nvmlShutdown()
    text = json.dumps(replay, indent=2, default=lambda b: b.decode())
    (out / "nvml_replay.json").write_text(text + "\n")
    print(text)
    # The replay must give the node the answer the real library gave.
    env = {**os.environ, "NODECLIENT_NVML_REPLAY": str(out / "nvml_replay.json")}
    replayed = subprocess.run(
        [sys.executable, "-m", "nodeclient.node.nvml_probe"],
        check=False, capture_output=True, timeout=60, env=env,
    )  # fmt: skip
    if json.loads(replayed.stdout) != json.loads(answer.stdout):
        raise AssertionError(f"the replay answers differently: {replayed.stdout!r}")
    print("replay of the recording answers as the card did")
    from nodeclient.node import metrics

    sample = subprocess.run(
        [sys.executable, "-c",
         "import pynvml, json; from nodeclient.node import metrics; pynvml.nvmlInit(); "
         "print(json.dumps(metrics.sample_once(pynvml)))"],
        check=False, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    print("metrics sample:", sample.stdout.strip(), sample.stderr.strip()[-500:])
    del metrics


@part("what the node declares (manifest, tier, classes, doctor)")
def declares() -> None:
    from nodeclient.node import doctor, hardware, sandbox
    from nodeclient.node.runtimes import usable_workload_classes

    info = hardware.probe_hardware()
    print(json.dumps(info.to_manifest(), indent=1)[:2000])
    print("tier", info.hardware_tier, "max_parallel_subtasks", info.max_parallel_subtasks)
    sandboxed = sandbox.probe()[0]
    print("sandbox usable:", sandbox.probe())
    for name, (ok, why) in usable_workload_classes(sandboxed=sandboxed, gpus=True).items():
        print(f"  {name}: {'yes' if ok else 'no'} - {why}")
    for check in [doctor.check_gpus(), *doctor.check_runtimes()]:
        print("  doctor:", json.dumps(check.to_json()))


def _slice(spec: list[dict[str, Any]], steps: int, batch: int) -> tuple[bytes, tr.ModelSpec]:
    with resources.files("nodeclient.assets").joinpath("digits_test.npz").open("rb") as fh:
        data = np.load(fh)
        x, y = data["x"].astype(np.float32), data["y"].astype(np.int64)
    model = tr.ModelSpec.parse(spec)
    config = tr.TrainingConfig(inner_steps=steps, batch_size=batch, seed=7)
    return tr.JobRequest(model, config, x, y).round_zero(2)[0], model


_CPU_SLICE = """
import sys
from nodeclient.node.runtimes.torch_train import TorchTrainRuntime
payload = open(sys.argv[1], "rb").read()
open(sys.argv[2], "wb").write(TorchTrainRuntime(threads=4).run(payload))
"""


def _bare_loop(spec: tr.ModelSpec, payload: bytes, device: str, sync_each_step: bool) -> float:
    """The same steps in plain PyTorch (the raw limit): data on the device, no hashing,
    no decoding, no progress; seconds for the loop alone."""
    import torch
    import torch.nn.functional as F

    from nodeclient.node.runtimes.torch_train import (
        _deterministic,
        _optimizer,
        build_model,
        load_weights,
    )

    request = tr.SliceRequest.decode(payload)
    weights = tr.decode_weights(request.weights, request.model)
    x, y = tr.decode_shard(request.shard, request.model)
    model = build_model(spec)
    load_weights(model, weights)
    model.to(device).train()
    opt = _optimizer(model.parameters(), request.plan)
    inputs = torch.from_numpy(np.array(x, np.float32)).to(device)
    labels = torch.from_numpy(np.array(y, np.int64)).to(device)
    batch = min(request.plan.batch_size, len(labels))
    gen = torch.Generator().manual_seed(1)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with _deterministic(1):  # the slice's own settings: 1 CPU thread, deterministic kernels
        sync()
        started = time.perf_counter()
        for _ in range(request.plan.steps):
            index = torch.randint(0, len(labels), (batch,), generator=gen).to(device)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(inputs[index]), labels[index])
            loss.backward()
            opt.step()
            if sync_each_step:
                float(loss.detach().cpu())
        sync()
        return time.perf_counter() - started


@part("ai.training on CUDA (2.3.5)")
def training(out: Path, uuid: str) -> None:
    import torch

    from nodeclient.node.runtimes.torch_train import TorchTrainRuntime

    os.environ["CUDA_VISIBLE_DEVICES"] = uuid  # as the executor gives a GPU slot its card
    runtime = TorchTrainRuntime()
    device = str(runtime.device())
    print("TF32 matmuls:", torch.backends.cuda.matmul.allow_tf32)
    print("device:", device, torch.cuda.get_device_name(0) if uuid else "(no GPU: a dry run)")
    for label, spec, steps, batch in (
        ("devnet MLP 64-32-10", [{"type": "Linear", "in": 64, "out": 32}, {"type": "ReLU"},
                                 {"type": "Linear", "in": 32, "out": 10}], 30, 32),
        ("MLP 64-1024-1024-10", BIG_MLP, 300, 256),
    ):  # fmt: skip
        payload, model = _slice(spec, steps, batch)
        shapes = model.parameter_shapes()
        runtime.run(payload)  # warm: CUDA context, kernels, cuBLAS handles
        timings, results = [], []
        for _ in range(3):
            started = time.perf_counter()
            results.append(runtime.run(payload))
            timings.append(time.perf_counter() - started)
        same = all(r == results[0] for r in results)
        gpu = tr.PseudoGradient.decode(results[0], shapes=shapes, grad_dtype="F32")
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "p").write_bytes(payload)
            env = {
                **os.environ,
                "CUDA_VISIBLE_DEVICES": "",
                "PYTHONPATH": os.pathsep.join(sys.path),
            }
            subprocess.run(
                [sys.executable, "-c", _CPU_SLICE, f"{tmp}/p", f"{tmp}/r"],
                check=True, env=env, timeout=300,
            )  # fmt: skip
            cpu = tr.PseudoGradient.decode(
                Path(tmp, "r").read_bytes(), shapes=shapes, grad_dtype="F32"
            )
        worst = max(
            float(np.max(np.abs(gpu.deltas[k] - cpu.deltas[k])))
            / max(float(np.max(np.abs(cpu.deltas[k]))), 1e-12)
            for k in cpu.deltas
        )
        bare_async = min(_bare_loop(model, payload, device, False) for _ in range(3))
        bare_sync = min(_bare_loop(model, payload, device, True) for _ in range(3))
        ours = min(timings)
        print(
            f"{label}, {steps} steps of {batch}: slice {ours * 1e3:.1f} ms "
            f"(bare loop {bare_async * 1e3:.1f} ms: {ours / bare_async:.2f}x; bare loop that "
            f"reads the loss each step {bare_sync * 1e3:.1f} ms: {ours / bare_sync:.2f}x); "
            f"GPU results identical over 3 runs: {same}; loss {gpu.first_loss:.4f} -> "
            f"{gpu.last_loss:.4f} (CPU {cpu.first_loss:.4f} -> {cpu.last_loss:.4f}); "
            f"largest GPU-CPU difference {worst:.2e} of the largest update"
        )
        if not same:
            raise AssertionError("a slice gave different bytes on the same GPU")
        # Float32 rounding differs between the devices, and AdamW's normalised steps grow
        # the difference once the loss is near zero (the larger MLP's 300 steps): only the
        # short slice is held to agreement.
        if steps <= 30 and worst > 1e-4:
            raise AssertionError(f"GPU and CPU pseudo-gradients differ by {worst:.2e}")
    print("GPU memory now held by this process:", torch.cuda.memory_allocated())


@part("ai.inference on CUDA (2.3.5)")
def inference(uuid: str) -> None:
    from nodeclient.node.runtimes import onnx as onnx_runtime
    from nodeclient.workloads.inference import decode_result, make_request

    os.environ["CUDA_VISIBLE_DEVICES"] = uuid
    ok, why = onnx_runtime.gpu_usable()
    print("gpu_usable:", ok, why)
    if not ok or not uuid:
        print("not run: this onnxruntime build has no CUDA execution provider")
        return
    assets = resources.files("nodeclient.assets")
    model = assets.joinpath("digits.onnx").read_bytes()
    with assets.joinpath("digits_test.npz").open("rb") as fh:
        x = np.load(fh)["x"]
    with tempfile.TemporaryDirectory() as tmp:
        runtime = onnx_runtime.OnnxRuntime(cache_dir=Path(tmp))
        outputs, meta = decode_result(runtime.run(make_request(model, {"X": x}).encode()))
    print("outputs:", {k: v.shape for k, v in outputs.items()}, meta)


def _worker_starts(log: Path, job_id: str) -> tuple[list[dict[str, Any]], list[float]]:
    """From the node's JSON log: each ``worker.started`` (seconds, and the task it was
    started for, if any) and the seconds of each task of *job_id*, in order."""
    starts: list[dict[str, Any]] = []
    slices: list[float] = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "worker.started":
            keep = ("seconds", "slot", "for_class", "job_id")
            starts.append({k: event[k] for k in keep if k in event})
        elif event.get("event") == "task.executed" and event.get("job_id") == job_id:
            slices.append(event["seconds"])
    return starts, slices


@part("a whole network: coordinator + one GPU node, verified jobs")
def network(out: Path) -> None:
    from nodeclient import devnet
    from nodeclient.coordinator.client import CoordinatorClient
    from nodeclient.node import control
    from nodeclient.node.runtimes import usable_workload_classes

    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    workdir = Path(tempfile.mkdtemp(prefix="gpu-devnet-"))
    home = workdir / "node0"
    net = devnet.Devnet(workdir=workdir, heartbeat=2.0, out=print)
    try:
        url = net.start_coordinator()
        print("coordinator:", url, "sandbox:", net.sandbox_available())
        home = net.add_node(0, gpus=True)
        client = CoordinatorClient(url)
        devnet._wait_online(client, net, print)
        status = control.request(home / control.SOCKET_NAME, {"cmd": "status"})
        (out / "node_status.json").write_text(json.dumps(status, indent=1))
        print("status:", json.dumps(status)[:1500])
        started = time.monotonic()
        job = client.submit_job("ai.training", devnet.demo_training(), slices=2)
        devnet._verified_job(client, job["job_id"], print, net, payload=devnet.demo_training())
        print(f"training job verified in {time.monotonic() - started:.1f} s")
        starts, slices = _worker_starts(home / "node.log", job["job_id"])
        print(f"worker starts so far: {starts}; the job's slices: {slices}")
        if any(start.get("job_id") == job["job_id"] for start in starts):
            # Its slot's worker was started with the daemon: a start for one of the job's
            # slices means a worker was replaced between slices (an H100 node once paid
            # 10 s a slice that way).
            raise AssertionError("a worker was started during the training job")
        classes = usable_workload_classes(sandboxed=net.sandbox_available(), gpus=True)
        if classes["ai.inference"][0]:
            payload, _labels = devnet.demo_jobs(1)[0]
            job = client.submit_job(workload_class="ai.inference", payload=payload)
            devnet._verified_job(client, job["job_id"], print, net)
            starts, tasks = _worker_starts(home / "node.log", job["job_id"])
            print(f"inference task: {tasks} s; the last worker start: {starts[-1]}")
        status = control.request(home / control.SOCKET_NAME, {"cmd": "status"})
        print("states:", devnet.state_line(status))
    finally:
        net.stop()
        for name, path in (("node.log", home / "node.log"),
                           ("coordinator.log", workdir / "coordinator" / "coordinator.log")):  # fmt: skip
            if path.exists():
                shutil.copy(path, out / name)
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="where recordings and logs go")
    parser.add_argument(
        "--network-only", action="store_true", help="only part 6, the whole network"
    )
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    if args.network_only:
        network(out)
        return 1 if FAILED else 0
    machine()
    nvml(out)
    declares()
    from nodeclient.node import hardware

    cards = hardware.probe_gpus().per_device
    # No card: a dry run of the script on the CPU (the GPU parts then run on the CPU).
    uuid = cards[0].uuid if cards else ""
    if not cards:
        FAILED.append("no GPU found")
    network(out)  # before this process holds a CUDA context of its own
    training(out, uuid)
    inference(uuid)
    print(f"\nrecordings and logs in {out}")
    if FAILED:
        print("FAILED:", ", ".join(FAILED))
        return 1
    print("every part passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
