"""The memory a node declares and admits against where a cgroup holds it (a container's
``--memory``, systemd's ``MemoryMax=``): cgroup v2 and v1 trees built under tmp_path."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from nodeclient.node import hardware, sandbox

GIB = 1 << 30


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _v2_tree(root: Path, *, service_max: str, slice_max: str) -> Path:
    """A service under a slice, each with its own memory.max; the root has none."""
    _write(root / "cgroup.controllers", "cpu memory pids\n")
    _write(root / "node.slice/memory.max", slice_max + "\n")
    _write(root / "node.slice/memory.current", str(5 * GIB))
    _write(root / "node.slice/nodeclient.service/memory.max", service_max + "\n")
    _write(root / "node.slice/nodeclient.service/memory.current", str(3 * GIB))
    _write(root / "node.slice/nodeclient.service/memory.stat", f"anon 1\ninactive_file {GIB}\n")
    proc = root.parent / "proc-cgroup"
    proc.write_text("0::/node.slice/nodeclient.service\n")
    return proc


def test_v2_the_smallest_limit_of_the_cgroup_and_those_above_it_holds(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    proc = _v2_tree(root, service_max="max", slice_max=str(8 * GIB))
    found = sandbox.memory_cgroups(proc, root)
    assert [c.directory for c in found] == [
        root / "node.slice/nodeclient.service",
        root / "node.slice",
    ]
    limit, room = sandbox._cgroup_headroom(found)
    assert limit == 8 * GIB
    assert room == 3 * GIB  # the slice's 8 GiB less its 5 GiB used (no page cache said)


def test_v2_room_leaves_out_the_page_cache_the_kernel_reclaims_first(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    proc = _v2_tree(root, service_max=str(4 * GIB), slice_max="max")
    limit, room = sandbox._cgroup_headroom(sandbox.memory_cgroups(proc, root))
    assert limit == 4 * GIB
    assert room == 2 * GIB  # 4 GiB less (3 GiB used less 1 GiB inactive_file)


def test_v1_in_a_container_reads_the_limit_at_the_mounts_root(tmp_path: Path) -> None:
    """Docker on cgroup v1 without a cgroup namespace: /proc/self/cgroup names the host's
    path, which the container's mount does not have; its root is the container's."""
    root = tmp_path / "cgroup"
    _write(root / "memory/memory.limit_in_bytes", f"{6 * GIB}\n")
    _write(root / "memory/memory.usage_in_bytes", f"{GIB}\n")
    # v1's usage counts the cgroup's whole subtree, and so does total_inactive_file; the
    # plain inactive_file (listed first) is the cgroup's own pages only
    _write(root / "memory/memory.stat", f"cache 5\ninactive_file 7\ntotal_inactive_file {GIB}\n")
    proc = tmp_path / "proc-cgroup"
    proc.write_text("12:pids:/docker/abc\n4:memory:/docker/abc\n0::/docker/abc\n")
    found = sandbox.memory_cgroups(proc, root)
    assert [c.directory for c in found] == [root / "memory"]
    assert sandbox._cgroup_headroom(found) == (6 * GIB, 6 * GIB)  # 6 less (1 used less 1)


@pytest.mark.parametrize(
    "text", ["", "garbage\n", "0::/gone\n", "4:memory:/../../etc\n", "not:a:cgroup:line"]
)
def test_no_limit_where_nothing_can_be_read(tmp_path: Path, text: str) -> None:
    proc = tmp_path / "proc-cgroup"
    proc.write_text(text)
    (tmp_path / "cgroup/memory").mkdir(parents=True)
    found = sandbox.memory_cgroups(proc, tmp_path / "cgroup")
    assert found == ()
    assert sandbox._cgroup_headroom(found) == (None, None)
    assert sandbox.memory_cgroups(tmp_path / "missing", tmp_path / "cgroup") == ()


def test_an_unreadable_limit_file_counts_for_nothing(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    proc = _v2_tree(root, service_max="not a number", slice_max="max")
    assert sandbox._cgroup_headroom(sandbox.memory_cgroups(proc, root)) == (None, None)


def test_a_container_held_to_8_gib_declares_8_and_admits_against_its_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manifest's ram_gb and the per-slot limits are the cgroup's, and admission's
    free memory is the room left under it, when these are below the machine's."""
    root = tmp_path / "cgroup"
    proc = _v2_tree(root, service_max=str(8 * GIB), slice_max="max")
    found = sandbox.memory_cgroups(proc, root)
    monkeypatch.setattr(sandbox, "_own_memory_cgroups", lambda: found)
    assert psutil.virtual_memory().total > 8 * GIB  # this machine has more (tests need it)
    assert hardware.probe_cpu().ram_gb == 8
    assert sandbox.total_memory_bytes() == 8 * GIB
    assert sandbox.default_limits(2).memory_bytes == 4 * GIB
    assert sandbox.available_memory_bytes() == 6 * GIB  # 8 less (3 used less 1 cache)
