"""Hardware tier and parallelism rules (2.3.2 Capability Manifest).

Pure functions of the manifest's ``cpu`` and ``gpu`` objects, nothing else, so that the
node (which declares ``hardware_tier`` and ``max_parallel_subtasks``) and the coordinator
(which recomputes both from the same manifest and rejects a mismatch) agree by
construction. The coordinator runs them on untrusted input: every field is checked first
and anything negative, non-integer or absurd raises :class:`ManifestError` naming it.

Theory of operation
-------------------

A machine's tier is the highest row of :data:`TIERS` whose every requirement it meets:

=====  ==============  ==================================  =========  ===========
tier   name            GPU requirement                     min cores  min RAM GiB
=====  ==============  ==================================  =========  ===========
0      cpu             none                                1          0
1      gpu             at least 1 card (any memory)        1          0
2      gpu-large       at least 1 card with >= 24 GiB      4          15
3      datacentre      at least 4 cards with >= 40 GiB     32         240
4      datacentre-xl   at least 8 cards with >= 80 GiB     64         480
=====  ==============  ==================================  =========  ===========

"N cards with >= V GiB" counts cards of any models whose ``vram_gb`` is at least V, so
mixed boxes are judged by what they really have. A machine whose GPUs qualify for a tier
but whose host does not (too few cores or too little RAM to feed the cards) falls to the
highest tier its host also meets: four H100s on a 16-core, 128 GiB host are tier 2.

The RAM minimums sit 1/16 below the nominal sizes (16, 256, 512 GB) because the manifest
declares the RAM the kernel reports, rounded down, and the kernel keeps a little for
itself: a 256 GB server declares about 251. GPU memory is declared rounded to the
*nearest* GiB, so an H100 (79.6 GiB) counts as 80 and an RTX 4090 (23.99 GiB) as 24; a
card sold as "24 GB" in decimal units, such as the A10 (22.5 GiB), counts as 22.

Examples: the spec's EPYC 7763 (128 cores, 512 GB) with 4 x H100 80 GB is tier 3;
a CPU-only 8-core, 16 GB laptop is tier 0.

``max_parallel_subtasks``: with GPUs, one slot per card (the spec's 4 x H100 gives 4);
CPU-only, one slot per core as long as each gets at least 2 GiB of RAM, and no more than
the manifest schema allows (:data:`MAX_SLOTS`, 1024):
``max(1, min(cores, ram_gb // 2, 1024))``. Without that cap a 1200-thread server would sign
1200, a manifest every coordinator refuses. Configuration may lower the number, never
raise it (:func:`effective_parallelism`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from nodeclient.errors import ManifestError, UsageError

# Limits on what a manifest may claim. Generous for any single machine that exists, small
# enough that a hostile manifest cannot make the rules do absurd work or absurd claims.
# Each is also the manifest schema's (protocol/schemas/manifest.schema.json), which this
# module cannot read without importing what imports it; a test holds the two together.
MAX_CORES: Final = 8192  # Linux's largest NR_CPUS on x86_64
MAX_RAM_GB: Final = 65536  # 64 TiB, the physical limit of 4-level paging on x86_64
MAX_GPUS: Final = 64  # cards in one machine, all groups together
MAX_GPU_GROUPS: Final = 16  # distinct (model, vram_gb) groups: the schema's gpu maxItems
MAX_VRAM_GB: Final = 1024  # per card
MAX_MODEL_CHARS: Final = 256
MAX_SLOTS: Final = 1024  # max_parallel_subtasks
MIN_RAM_GB_PER_CPU_SLOT: Final = 2


@dataclass(frozen=True)
class Tier:
    """One row of the tier table: every requirement must be met to reach ``level``."""

    level: int
    name: str
    min_cards: int  # cards with at least min_vram_gb each
    min_vram_gb: int
    min_cores: int
    min_ram_gb: int


TIERS: Final[tuple[Tier, ...]] = (
    Tier(level=0, name="cpu", min_cards=0, min_vram_gb=0, min_cores=1, min_ram_gb=0),
    Tier(level=1, name="gpu", min_cards=1, min_vram_gb=0, min_cores=1, min_ram_gb=0),
    Tier(level=2, name="gpu-large", min_cards=1, min_vram_gb=24, min_cores=4, min_ram_gb=15),
    Tier(level=3, name="datacentre", min_cards=4, min_vram_gb=40, min_cores=32, min_ram_gb=240),
    Tier(level=4, name="datacentre-xl", min_cards=8, min_vram_gb=80, min_cores=64, min_ram_gb=480),
)


@dataclass(frozen=True)
class _Hardware:
    cores: int
    ram_gb: int
    cards: tuple[int, ...]  # vram_gb of every card, one entry per card


def _int_field(value: object, field: str, low: int, high: int) -> int:
    # bool is an int subclass in Python and 80.0 is not an integer in the manifest schema.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ManifestError(f"{field} must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise ManifestError(f"{field} must be between {low} and {high}, got {value}")
    return value


def _model_field(value: object, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ManifestError(f"{field} must be a non-empty string")
    if len(value) > MAX_MODEL_CHARS:
        raise ManifestError(f"{field} is longer than {MAX_MODEL_CHARS} characters")
    return value


def _parse(cpu: Mapping[str, Any], gpu: Sequence[Mapping[str, Any]]) -> _Hardware:
    if not isinstance(cpu, Mapping):
        raise ManifestError("cpu must be an object")
    _model_field(cpu.get("model"), "cpu.model")
    cores = _int_field(cpu.get("cores"), "cpu.cores", 1, MAX_CORES)
    ram_gb = _int_field(cpu.get("ram_gb"), "cpu.ram_gb", 0, MAX_RAM_GB)
    if isinstance(gpu, str | bytes) or not isinstance(gpu, Sequence):
        raise ManifestError("gpu must be a list")
    if len(gpu) > MAX_GPU_GROUPS:
        raise ManifestError(f"gpu lists more than {MAX_GPU_GROUPS} groups")
    cards: list[int] = []
    seen: set[tuple[str, int]] = set()
    for i, group in enumerate(gpu):
        if not isinstance(group, Mapping):
            raise ManifestError(f"gpu[{i}] must be an object")
        model = _model_field(group.get("model"), f"gpu[{i}].model")
        count = _int_field(group.get("count"), f"gpu[{i}].count", 1, MAX_GPUS)
        vram_gb = _int_field(group.get("vram_gb"), f"gpu[{i}].vram_gb", 0, MAX_VRAM_GB)
        if (model, vram_gb) in seen:
            raise ManifestError(f"gpu[{i}] repeats model {model!r} with {vram_gb} GB")
        seen.add((model, vram_gb))
        cards.extend([vram_gb] * count)
        if len(cards) > MAX_GPUS:
            raise ManifestError(f"gpu declares more than {MAX_GPUS} cards in all")
    return _Hardware(cores=cores, ram_gb=ram_gb, cards=tuple(cards))


def _meets(hw: _Hardware, row: Tier) -> bool:
    qualifying = sum(1 for vram_gb in hw.cards if vram_gb >= row.min_vram_gb)
    return qualifying >= row.min_cards and hw.cores >= row.min_cores and hw.ram_gb >= row.min_ram_gb


def validate_hardware(cpu: Mapping[str, Any], gpu: Sequence[Mapping[str, Any]]) -> None:
    """Raise ManifestError unless the ``cpu`` and ``gpu`` objects are well formed and sane."""
    _parse(cpu, gpu)


def _tier_of(hw: _Hardware) -> int:
    return max(row.level for row in TIERS if _meets(hw, row))


def _slots_of(hw: _Hardware) -> int:
    if hw.cards:
        return len(hw.cards)  # at most MAX_GPUS, below MAX_SLOTS
    return max(1, min(hw.cores, hw.ram_gb // MIN_RAM_GB_PER_CPU_SLOT, MAX_SLOTS))


def hardware_tier(cpu: Mapping[str, Any], gpu: Sequence[Mapping[str, Any]]) -> int:
    """The highest :data:`TIERS` level this hardware meets (see the module docstring)."""
    return _tier_of(_parse(cpu, gpu))


def max_parallel_subtasks(cpu: Mapping[str, Any], gpu: Sequence[Mapping[str, Any]]) -> int:
    """Slots for parallel sub-tasks (2.3.5 Work Execution): one per card, else per core.

    CPU-only, each slot also needs MIN_RAM_GB_PER_CPU_SLOT GiB of RAM; never below 1,
    never above MAX_SLOTS (the most a manifest may declare).
    """
    return _slots_of(_parse(cpu, gpu))


def slot_memory_mb(
    cpu: Mapping[str, Any], gpu: Sequence[Mapping[str, Any]], slots: int
) -> tuple[int, int]:
    """(RAM, VRAM) in MB that a task may count on in any one of *slots* slots: an equal
    share of seven eighths of ``ram_gb`` (the rest is the system's: the node refuses a
    task that declares more than the memory available when it arrives), and the smallest
    card's ``vram_gb`` less 512 MB (it was rounded to the nearest GiB), 0 without a GPU.
    A coordinator matches a job's declared resources against these; the node, which knows
    its exact figures, has the last word (a signed Reject)."""
    hw = _parse(cpu, gpu)
    ram_mb = hw.ram_gb * 1024 * 7 // 8 // max(1, slots)
    vram_mb = max(0, min(hw.cards) * 1024 - 512) if hw.cards else 0
    return ram_mb, vram_mb


def effective_parallelism(computed: int, configured: int | None) -> int:
    """The ``max_parallel_subtasks`` to declare: *configured* may lower *computed*, not raise it.

    Raises UsageError, naming the allowed range, if *configured* is outside 1..computed.
    """
    if isinstance(computed, bool) or not isinstance(computed, int) or computed < 1:
        raise ValueError(f"computed parallelism must be a positive integer, got {computed!r}")
    if configured is None:
        return computed
    if isinstance(configured, bool) or not isinstance(configured, int):
        raise UsageError(f"max_parallel_subtasks must be an integer from 1 to {computed}")
    if not 1 <= configured <= computed:
        raise UsageError(
            f"max_parallel_subtasks must be from 1 to {computed} on this machine "
            f"(the hardware allows {computed}); got {configured}"
        )
    return configured


def check_declared(
    cpu: Mapping[str, Any],
    gpu: Sequence[Mapping[str, Any]],
    *,
    hardware_tier: object,
    max_parallel_subtasks: object,
) -> None:
    """The coordinator's check of a manifest's declared tier and parallelism.

    The tier must equal the one recomputed here; the parallelism may be anything from 1 to
    the recomputed maximum, since operators may lower it. Raises ManifestError otherwise.
    """
    hw = _parse(cpu, gpu)
    expected_tier = _tier_of(hw)
    declared_tier = _int_field(hardware_tier, "hardware_tier", 0, TIERS[-1].level)
    if declared_tier != expected_tier:
        raise ManifestError(
            f"hardware_tier {declared_tier} does not match the declared hardware, "
            f"which is tier {expected_tier}"
        )
    _int_field(max_parallel_subtasks, "max_parallel_subtasks", 1, _slots_of(hw))
