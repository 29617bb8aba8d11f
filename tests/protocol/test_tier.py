"""Hardware tier and parallelism rules (2.3.2 Capability Manifest)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from nodeclient.errors import ManifestError, UsageError
from nodeclient.protocol import tier
from nodeclient.protocol.manifest import MAX_ARRAY_ITEMS, manifest_schema
from nodeclient.protocol.tier import (
    TIERS,
    check_declared,
    effective_parallelism,
    hardware_tier,
    max_parallel_subtasks,
    slot_memory_mb,
    validate_hardware,
)

SPEC_CPU = {"model": "EPYC 7763", "cores": 128, "ram_gb": 512}
SPEC_GPU = [{"model": "NVIDIA H100", "count": 4, "vram_gb": 80}]
LAPTOP_CPU = {"model": "Intel(R) Core(TM) i7-1165G7 @ 2.80GHz", "cores": 8, "ram_gb": 16}


def cpu(cores: int = 128, ram_gb: int = 512) -> dict[str, Any]:
    return {"model": "AMD EPYC 7763 64-Core Processor", "cores": cores, "ram_gb": ram_gb}


def gpu(model: str, count: int, vram_gb: int) -> dict[str, Any]:
    return {"model": model, "count": count, "vram_gb": vram_gb}


H100 = "NVIDIA H100 80GB HBM3"
A100_40 = "NVIDIA A100-SXM4-40GB"
RTX4090 = "NVIDIA GeForce RTX 4090"
T4 = "Tesla T4"


def test_spec_example_is_tier_3() -> None:
    """The spec's manifest (EPYC 7763, 128 cores, 512 GB, 4 x H100 80 GB) declares tier 3."""
    assert hardware_tier(SPEC_CPU, SPEC_GPU) == 3


def test_spec_example_parallelism_is_4() -> None:
    """The spec's manifest declares max_parallel_subtasks 4: one slot per H100."""
    assert max_parallel_subtasks(SPEC_CPU, SPEC_GPU) == 4


def test_cpu_only_laptop_is_lowest_tier() -> None:
    """An 8-core, 16 GB laptop without a GPU is tier 0."""
    assert hardware_tier(LAPTOP_CPU, []) == TIERS[0].level == 0


@pytest.mark.parametrize(
    ("cpu_obj", "gpus", "expected"),
    [
        (cpu(8, 31), [gpu(T4, 1, 15)], 1),
        (cpu(16, 62), [gpu(RTX4090, 1, 24)], 2),
        (cpu(16, 125), [gpu(RTX4090, 2, 24), gpu(T4, 1, 15)], 2),
        (cpu(64, 503), [gpu(A100_40, 4, 40)], 3),
        (cpu(224, 2015), [gpu(H100, 8, 80)], 4),
        (cpu(128, 503), [gpu(H100, 1, 80)], 2),
    ],
    ids=["t4", "rtx4090", "2x4090+t4", "4xa100-40", "8xh100-dgx", "1xh100"],
)
def test_tier_table_cases(
    cpu_obj: dict[str, Any], gpus: list[dict[str, Any]], expected: int
) -> None:
    """Typical machines land in the tier the table gives them."""
    assert hardware_tier(cpu_obj, gpus) == expected


@pytest.mark.parametrize(
    ("gpus", "expected"),
    [
        ([gpu("card", 1, 23)], 1),
        ([gpu("card", 1, 24)], 2),
        ([gpu("card", 3, 80)], 2),
        ([gpu("card", 4, 40)], 3),
        ([gpu("card", 4, 39)], 2),
        ([gpu("big", 3, 80), gpu("small", 1, 40)], 3),
        ([gpu("big", 3, 80), gpu("small", 1, 39)], 2),
        ([gpu("card", 7, 80)], 3),
        ([gpu("card", 8, 80)], 4),
        ([gpu("card", 8, 79)], 3),
        ([gpu("big", 7, 80), gpu("small", 1, 48)], 3),
    ],
)
def test_gpu_boundaries(gpus: list[dict[str, Any]], expected: int) -> None:
    """Card counts and per-card memory decide the tier at exactly the table's thresholds."""
    assert hardware_tier(cpu(256, 2015), gpus) == expected


@pytest.mark.parametrize(
    ("cores", "ram_gb", "expected"),
    [
        (64, 480, 4),
        (63, 480, 3),
        (64, 479, 3),
        (32, 240, 3),
        (31, 240, 2),
        (32, 239, 2),
        (4, 15, 2),
        (3, 15, 1),
        (4, 14, 1),
    ],
)
def test_host_minimums_cap_the_tier(cores: int, ram_gb: int, expected: int) -> None:
    """8 x 80 GB cards reach only the highest tier whose cores and RAM minimums the host meets."""
    assert hardware_tier(cpu(cores, ram_gb), [gpu(H100, 8, 80)]) == expected


def test_tier_ignores_group_order() -> None:
    """The same cards listed in another order give the same tier and parallelism."""
    groups = [gpu(RTX4090, 2, 24), gpu(T4, 1, 15), gpu(A100_40, 2, 40)]
    reordered = list(reversed(groups))
    assert hardware_tier(cpu(), groups) == hardware_tier(cpu(), reordered)
    assert max_parallel_subtasks(cpu(), groups) == max_parallel_subtasks(cpu(), reordered) == 5


def test_tier_table_rows_get_stricter() -> None:
    """Each row asks at least what the row below asks, so 'highest row met' is a cap."""
    assert [row.level for row in TIERS] == list(range(len(TIERS)))
    for lower, higher in itertools.pairwise(TIERS):
        assert higher.min_cards >= lower.min_cards
        assert higher.min_vram_gb >= lower.min_vram_gb
        assert higher.min_cores >= lower.min_cores
        assert higher.min_ram_gb >= lower.min_ram_gb


def test_parallelism_is_one_slot_per_gpu() -> None:
    """With GPUs, every card of every group is one slot, whatever the core count."""
    assert max_parallel_subtasks(cpu(8, 64), [gpu(RTX4090, 2, 24), gpu(T4, 1, 15)]) == 3


@pytest.mark.parametrize(
    ("cores", "ram_gb", "expected"),
    [(8, 16, 8), (8, 6, 3), (64, 512, 64), (4, 1, 1), (4, 0, 1), (1, 64, 1)],
)
def test_cpu_only_parallelism(cores: int, ram_gb: int, expected: int) -> None:
    """CPU-only: one slot per core while each slot has 2 GiB, and never fewer than one."""
    assert max_parallel_subtasks(cpu(cores, ram_gb), []) == expected


@pytest.mark.parametrize(("cores", "ram_gb"), [(1200, 4096), (8192, 65536), (1025, 2050)])
def test_cpu_only_parallelism_stops_at_the_schemas_maximum(cores: int, ram_gb: int) -> None:
    """A CPU-only server with more threads than a manifest may declare slots (an 8-socket
    Xeon's 1200) declares the schema's maximum, 1024, which the schema and the
    coordinator's recomputation accept: never a number its own verifier refuses."""
    schema_max = manifest_schema()["properties"]["max_parallel_subtasks"]["maximum"]
    assert max_parallel_subtasks(cpu(cores, ram_gb), []) == schema_max == 1024
    check_declared(cpu(cores, ram_gb), [], hardware_tier=0, max_parallel_subtasks=schema_max)
    with pytest.raises(ManifestError, match="max_parallel_subtasks"):
        check_declared(cpu(cores, ram_gb), [], hardware_tier=0, max_parallel_subtasks=1025)


def test_the_rules_limits_are_the_manifest_schemas() -> None:
    """Every limit the rules apply is the shipped schema's: what the node's rules let it
    sign, the coordinator's schema accepts, and the other way round."""
    props = manifest_schema()["properties"]
    cpu_props = props["cpu"]["properties"]
    group = props["gpu"]["items"]["properties"]
    assert cpu_props["cores"]["maximum"] == tier.MAX_CORES
    assert cpu_props["ram_gb"]["maximum"] == tier.MAX_RAM_GB
    assert cpu_props["model"]["maxLength"] == group["model"]["maxLength"] == tier.MAX_MODEL_CHARS
    assert group["count"]["maximum"] == tier.MAX_GPUS
    assert group["vram_gb"]["maximum"] == tier.MAX_VRAM_GB
    assert props["gpu"]["maxItems"] == MAX_ARRAY_ITEMS == tier.MAX_GPU_GROUPS
    assert props["max_parallel_subtasks"]["maximum"] == tier.MAX_SLOTS
    assert props["hardware_tier"]["maximum"] == TIERS[-1].level


def test_more_gpu_groups_than_the_schema_allows_are_refused() -> None:
    """17 kinds of card: the schema refuses the manifest, and so do the rules, naming
    the limit; 16 pass."""
    groups = [gpu(f"Card {i}", 1, 80) for i in range(17)]
    with pytest.raises(ManifestError, match="more than 16 groups"):
        validate_hardware(cpu(), groups)
    assert max_parallel_subtasks(cpu(), groups[:16]) == 16


def test_effective_parallelism_defaults_to_computed() -> None:
    """Without configuration the computed parallelism is declared."""
    assert effective_parallelism(4, None) == 4


def test_effective_parallelism_may_lower() -> None:
    """Configuration may lower the parallelism."""
    assert effective_parallelism(4, 1) == 1


@pytest.mark.parametrize("configured", [5, 0, -1])
def test_effective_parallelism_refuses_out_of_range(configured: int) -> None:
    """Raising it, or going below 1, is a usage error that names the allowed range."""
    with pytest.raises(UsageError, match="from 1 to 4"):
        effective_parallelism(4, configured)


def test_effective_parallelism_refuses_bool() -> None:
    """True is not a number of slots, even though Python treats it as 1."""
    with pytest.raises(UsageError):
        effective_parallelism(4, True)


def _with(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        if value is _MISSING:
            out.pop(key)
        else:
            out[key] = value
    return out


_MISSING = object()
_GOOD_GPU = gpu(H100, 4, 80)


@pytest.mark.parametrize(
    ("cpu_obj", "gpus", "field"),
    [
        (_with(SPEC_CPU, cores=-8), [], "cpu.cores"),
        (_with(SPEC_CPU, cores=0), [], "cpu.cores"),
        (_with(SPEC_CPU, cores=True), [], "cpu.cores"),
        (_with(SPEC_CPU, cores=8.0), [], "cpu.cores"),
        (_with(SPEC_CPU, cores="8"), [], "cpu.cores"),
        (_with(SPEC_CPU, cores=10**9), [], "cpu.cores"),
        (_with(SPEC_CPU, cores=_MISSING), [], "cpu.cores"),
        (_with(SPEC_CPU, ram_gb=-1), [], "cpu.ram_gb"),
        (_with(SPEC_CPU, ram_gb=10**7), [], "cpu.ram_gb"),
        (_with(SPEC_CPU, model=""), [], "cpu.model"),
        (_with(SPEC_CPU, model=_MISSING), [], "cpu.model"),
        (_with(SPEC_CPU, model="x" * 257), [], "cpu.model"),
        (SPEC_CPU, [_with(_GOOD_GPU, count=0)], r"gpu\[0\].count"),
        (SPEC_CPU, [_with(_GOOD_GPU, count=-4)], r"gpu\[0\].count"),
        (SPEC_CPU, [_GOOD_GPU, _with(_GOOD_GPU, vram_gb=-80)], r"gpu\[1\].vram_gb"),
        (SPEC_CPU, [_with(_GOOD_GPU, vram_gb=100_000)], r"gpu\[0\].vram_gb"),
        (SPEC_CPU, [_with(_GOOD_GPU, vram_gb=79.6)], r"gpu\[0\].vram_gb"),
        (SPEC_CPU, [_with(_GOOD_GPU, model=None)], r"gpu\[0\].model"),
        (SPEC_CPU, ["NVIDIA H100"], r"gpu\[0\]"),
        (SPEC_CPU, [gpu("a", 40, 80), gpu("b", 40, 80)], "more than 64 cards"),
        (SPEC_CPU, [_GOOD_GPU, _GOOD_GPU], "repeats"),
        (SPEC_CPU, "NVIDIA H100", "gpu must be a list"),
        (["EPYC", 128, 512], [], "cpu must be an object"),
    ],
)
def test_hostile_or_broken_fields_are_refused(cpu_obj: Any, gpus: Any, field: str) -> None:
    """Anything negative, mistyped, missing or absurd raises ManifestError naming the field."""
    with pytest.raises(ManifestError, match=field):
        hardware_tier(cpu_obj, gpus)
    with pytest.raises(ManifestError, match=field):
        max_parallel_subtasks(cpu_obj, gpus)
    with pytest.raises(ManifestError, match=field):
        validate_hardware(cpu_obj, gpus)


def test_check_declared_accepts_the_spec_example() -> None:
    """The spec's declared tier 3 and parallelism 4 pass the coordinator's recomputation."""
    check_declared(SPEC_CPU, SPEC_GPU, hardware_tier=3, max_parallel_subtasks=4)


def test_check_declared_accepts_lowered_parallelism() -> None:
    """An operator who lowered the parallelism still registers."""
    check_declared(SPEC_CPU, SPEC_GPU, hardware_tier=3, max_parallel_subtasks=2)


@pytest.mark.parametrize("declared", [4, 2, "3", None])
def test_check_declared_refuses_a_wrong_tier(declared: object) -> None:
    """A declared tier other than the recomputed one is refused."""
    with pytest.raises(ManifestError, match="hardware_tier"):
        check_declared(SPEC_CPU, SPEC_GPU, hardware_tier=declared, max_parallel_subtasks=4)


@pytest.mark.parametrize("declared", [5, 0, True])
def test_check_declared_refuses_inflated_parallelism(declared: object) -> None:
    """Declaring more slots than the hardware allows, or none, is refused."""
    with pytest.raises(ManifestError, match="max_parallel_subtasks"):
        check_declared(SPEC_CPU, SPEC_GPU, hardware_tier=3, max_parallel_subtasks=declared)


def test_slot_memory_is_a_share_of_ram_and_the_smallest_card() -> None:
    """What a coordinator may promise a task in one slot: seven eighths of the RAM split
    evenly over the slots, and the smallest card's memory less the half GiB its rounding
    may have added."""
    assert slot_memory_mb(SPEC_CPU, SPEC_GPU, 4) == (448 * 1024 // 4, 80 * 1024 - 512)
    mixed = [gpu(T4, 1, 15), gpu(RTX4090, 1, 24)]
    assert slot_memory_mb(cpu(16, 64), mixed, 2) == (28 * 1024, 15 * 1024 - 512)
    assert slot_memory_mb(LAPTOP_CPU, [], 3) == (14 * 1024 // 3, 0)
    assert slot_memory_mb(cpu(4, 0), [gpu(T4, 1, 0)], 1) == (0, 0)
    with pytest.raises(ManifestError):
        slot_memory_mb({"cores": 4}, [], 1)
