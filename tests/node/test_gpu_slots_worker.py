"""A worker with a GPU lowers no address-space limit for a task (2.3.5 Work Execution).

CUDA reserves tens of GB of address space when it starts; a task's soft RLIMIT_AS, lowered
to what the worker holds plus the RAM the task declared, would make it fail. The worker
is run in a child process whose own hard limit is finite (as a daemon started under
``ulimit -v`` passes on), so that a lowered soft limit would show.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

_CHILD = r"""
import json, os, resource, sys, types
from pathlib import Path

HARD = int(sys.argv[2]) if sys.argv[2] != "unlimited" else resource.RLIM_INFINITY
resource.setrlimit(resource.RLIMIT_AS, (HARD, HARD))
from nodeclient.node import worker

class Reader:
    def run(self, payload, *, workdir, progress):
        return Path("/proc/self/limits").read_bytes()

class CpuOnlyReader(Reader):
    uses_gpu = False  # as Blender: never starts CUDA

module = types.ModuleType("limits_runtime")
module.factory = lambda cache: Reader()
module.cpu_factory = lambda cache: CpuOnlyReader()
sys.modules["limits_runtime"] = module
root = Path(sys.argv[1])
seen = {}
gpu = [{"uuid": "GPU-1", "minor": 0, "vram_bytes": 1 << 34}]
runs = (("gpu", gpu, "limits", 64 << 20), ("cpu", [], "limits", 64 << 20),
        ("gpu-cpu-only", gpu, "cpu_only", 64 << 20), ("gpu-cpu-only-undeclared", gpu, "cpu_only", None))
for name, gpus, wclass, declared in runs:
    work = root / name
    work.mkdir()
    config = {
        "workdir": str(work), "sandboxed": False, "max_result_bytes": 1 << 20,
        "cache_dir": str(work), "gpus": gpus,
        "runtimes": {"limits": "limits_runtime:factory", "cpu_only": "limits_runtime:cpu_factory"},
        "limits": {"memory_bytes": 1 << 30, "nproc": 512, "nofile": 256, "fsize_bytes": 1 << 30},
    }
    w = worker.Worker(config, out_fd=os.open(os.devnull, os.O_WRONLY))
    reply, body, clean = w._execute(1, {"class": wclass, "memory_bytes": declared}, b"")
    assert reply == {"op": "result"}, reply
    line = next(x for x in body.decode().splitlines() if x.startswith("Max address space"))
    seen[name] = line.split()[3:5]
    assert resource.getrlimit(resource.RLIMIT_AS) == (HARD, HARD)  # restored
print(json.dumps(seen))
"""


def test_a_gpu_workers_task_gets_no_lower_address_space_limit(tmp_path: Path) -> None:
    """Under an inherited finite hard RLIMIT_AS, a task that declares 64 MB keeps the
    whole limit in a worker with a GPU; in one without, its soft limit is lowered."""
    seen = _run_child(tmp_path, str(8 << 30))
    limit = str(8 << 30)
    assert seen["gpu"] == [limit, limit]
    assert seen["cpu"][1] == limit
    assert int(seen["cpu"][0]) < 8 << 30
    # A runtime that never starts CUDA (Blender) keeps its task's limit in a GPU worker:
    # what it declared, else the slot's share (1 GiB here), above what the worker holds.
    declared, undeclared = (int(seen[k][0]) for k in ("gpu-cpu-only", "gpu-cpu-only-undeclared"))
    assert declared < undeclared < 8 << 30
    assert undeclared - declared == (1 << 30) - (64 << 20)


def _run_child(tmp_path: Path, hard: str) -> dict[str, list[str]]:
    src = Path(__file__).resolve().parents[2] / "src"
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path), hard],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"},
    )
    seen: dict[str, list[str]] = json.loads(done.stdout)
    return seen


def test_a_runtime_without_cuda_is_limited_in_a_gpu_worker_without_a_hard_limit(
    tmp_path: Path,
) -> None:
    """A worker with a GPU usually has no address-space limit at all (none inherited):
    a runtime that never starts CUDA (Blender) still gets its task's soft limit there,
    what it declared or else the slot's share."""
    seen = _run_child(tmp_path, "unlimited")
    assert seen["gpu"] == ["unlimited", "unlimited"]
    for name in ("gpu-cpu-only", "gpu-cpu-only-undeclared"):
        soft, hard = seen[name]
        assert hard == "unlimited" and soft != "unlimited", (name, seen[name])
    assert int(seen["gpu-cpu-only"][0]) < int(seen["gpu-cpu-only-undeclared"][0])
