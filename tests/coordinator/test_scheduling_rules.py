"""The pure parts: node selection, clocks, config checks and the workload registry."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from nodeclient.clock import ManualClock, OffsetFileClock
from nodeclient.coordinator import classes
from nodeclient.coordinator.config import CoordinatorConfig
from nodeclient.coordinator.selection import Candidate, LeaseOrder, Picker, Roster, pick_node
from nodeclient.errors import RemoteProtocolError, UsageError
from tests.coordinator.conftest import inference_payload, inference_result

INF = frozenset({"ai.inference"})


def _cand(node_id: str, *, tier: int = 0, region: str = "eu-west", cap: int = 1,
          classes_: frozenset[str] = INF, ram_mb: int = 0, vram_mb: int = 0) -> Candidate:  # fmt: skip
    return Candidate(node_id, tier, region, classes_, cap, ram_mb, vram_mb)


def _pick(cands: list[Candidate], *, free: dict[str, int] | None = None, **kw) -> str | None:
    args = {"workload_class": "ai.inference", "min_tier": 0, "region": None}
    args.update(kw)
    return pick_node(candidates=cands, free=free or {c.node_id: c.capacity for c in cands}, **args)


def test_pick_requires_class_tier_and_capacity() -> None:
    """Only nodes with the class, enough tier and a free slot are eligible."""
    cands = [
        _cand("a", classes_=frozenset({"media.render"})),
        _cand("b", tier=0),
        _cand("c", tier=2),
        _cand("d", tier=3),
    ]
    assert _pick(cands, min_tier=2, free={"a": 1, "b": 1, "c": 0, "d": 1}) == "d"
    assert _pick(cands, min_tier=4) is None


def test_pick_requires_the_declared_resources() -> None:
    """A task that declares RAM or GPU memory goes only to a node whose slot holds it;
    one that declares nothing goes anywhere."""
    cands = [
        _cand("cpu", ram_mb=8192, cap=4),
        _cand("gpu", ram_mb=4096, vram_mb=23_552),
        _cand("big", ram_mb=65_536, vram_mb=7680),
    ]
    assert _pick(cands, ram_mb=8192, free={"cpu": 4, "gpu": 1, "big": 0}) == "cpu"
    assert _pick(cands, ram_mb=8192, free={"cpu": 0, "gpu": 1, "big": 0}) is None
    assert _pick(cands, ram_mb=8193) == "big"
    assert _pick(cands, vram_mb=8000) == "gpu"
    assert _pick(cands, ram_mb=8192, vram_mb=8000) is None  # no node has both
    assert _pick(cands, vram_mb=1) in ("gpu", "big")
    assert _pick(cands, free={"cpu": 0, "gpu": 1, "big": 0}) == "gpu"


def test_pick_prefers_untried_then_region_then_load() -> None:
    """A node that already tried the task comes last; then region; then lower load."""
    cands = [_cand("a", region="eu-west"), _cand("b", region="us-east", cap=4)]
    assert _pick(cands, region="eu-west") == "a"
    assert _pick(cands, region="eu-west", tried=["a"]) == "b"
    assert _pick([_cand("a")], tried=["a"]) == "a"  # fallback: the same node beats none
    # A node that tried it gets it again only when no other node could take it at all:
    # while one could, busy or not, the task waits for it.
    assert _pick(cands, tried=["b"], free={"a": 0, "b": 4}) is None
    assert _pick(cands, tried=["a", "b"], free={"a": 0, "b": 4}) == "b"
    assert _pick(cands, tried=["b"], excluded=["a"], free={"a": 0, "b": 4}) == "b"
    assert _pick([_cand("a"), _cand("b", tier=3)], min_tier=2, tried=["b"]) == "b"
    busy = {"a": 1, "b": 1}
    assert _pick([_cand("a", cap=4), _cand("b", cap=1)], free=busy) == "b"


def test_region_falls_back_to_other_regions() -> None:
    """A region preference is not a requirement."""
    assert _pick([_cand("a", region="us-east")], region="ap-south") == "a"


def test_picker_chooses_as_pick_node_does() -> None:
    """A round of picks from the grouped heaps equals pick_node called task by task, with
    the nodes' last leases (some tied, some recorded after the idle heaps were built)."""
    rng = random.Random(7)
    classes_ = ["ai.inference", "media.render"]
    regions = ["eu-west", "us-east", "ap-south"]
    for _round in range(60):
        cands = [
            _cand(
                f"n{i:03d}",
                tier=rng.randint(0, 3),
                region=rng.choice(regions),
                cap=rng.randint(1, 4),
                classes_=frozenset(rng.sample(classes_, rng.randint(1, 2))),
                ram_mb=rng.choice([0, 2048, 8192]),
                vram_mb=rng.choice([0, 0, 7680, 23_552]),
            )
            for i in range(rng.randint(1, 40))
        ]
        busy = rng.choice([0.05, 0.5, 1.0])  # few leases (idle heap copied) or many
        used = {c.node_id: rng.randint(0, c.capacity) if rng.random() < busy else 0 for c in cands}
        free = {c.node_id: c.capacity - used[c.node_id] for c in cands}
        ids = [c.node_id for c in cands]
        recency = LeaseOrder({n: rng.randint(0, 3) for n in ids if rng.random() < 0.5})
        roster = Roster(cands, recency=recency)
        if rng.random() < 0.5:  # idle heaps already built by an earlier round
            roster.idle_heap((("ai.inference", 0, 0, 0), None))
            for node_id in rng.sample(ids, rng.randint(0, len(ids))):  # leased since
                recency.leased(node_id)
        picker = Picker(roster, used, max_groups=rng.choice([1, 3, 10_000]))  # heaps or scans
        assert roster.any_free(used) == any(v > 0 for v in free.values())
        for _task in range(rng.randint(1, 80)):
            ask = {
                "workload_class": rng.choice(classes_),
                "min_tier": rng.randint(0, 3),
                "region": rng.choice([None, *regions, "mars-1", "nowhere"]),
                "tried": rng.sample(ids, min(len(ids), rng.choice([0, 0, 1, 2, 5]))),
                "excluded": rng.sample(ids, min(len(ids), rng.choice([0, 0, 1, 3]))),
                "ram_mb": rng.choice([0, 0, 1024, 8192, 9000]),
                "vram_mb": rng.choice([0, 0, 0, 4096, 20_000]),
            }
            expected = pick_node(candidates=cands, free=free, recency=dict(recency.last), **ask)
            assert picker.pick(**ask) == expected
            if expected is not None:
                free[expected] -= 1
                assert recency.last[expected] == max(recency.last.values())
            assert {n: picker.slots(n) for n in ids} == free


def test_declared_sizes_share_the_heap_of_the_slot_size_that_holds_them() -> None:
    """Tasks declaring many different sizes use one heap per slot size on offer (the same
    nodes hold them), and a round keeps at most max_groups heaps: a task of a further
    group is placed by a scan, as pick_node would."""
    cands = [_cand(f"n{i}", ram_mb=8192 if i % 2 else 4096, cap=100) for i in range(6)]
    roster = Roster(cands)
    picker = Picker(roster, {}, max_groups=2)
    ask = {"workload_class": "ai.inference", "min_tier": 0, "region": None}
    for ram in range(1, 4097, 97):
        assert picker.pick(**ask, ram_mb=ram) is not None
    assert len(picker._heaps) == 1
    assert picker.pick(**ask, ram_mb=5000) in ("n1", "n3", "n5")
    assert picker.pick(**ask, ram_mb=1, vram_mb=0) is not None  # a group it keeps
    assert picker.pick(**ask, ram_mb=9000) is None  # no slot that large
    # A third group: no heap is kept for it, and its tasks are placed all the same.
    free = {c.node_id: picker.slots(c.node_id) for c in cands}
    ask_eu = {**ask, "region": "eu-west"}
    expected = pick_node(candidates=cands, free=free, recency=roster.recency.last, **ask_eu)
    assert picker.pick(**ask_eu) == expected is not None
    assert len(picker._heaps) == 2 and picker.slots(expected) == free[expected] - 1
    assert len(roster._idle_heaps) <= 3


def test_regions_no_node_is_in_share_one_heap() -> None:
    """Job regions are free text: a region no candidate is in is ordered as no preference
    (every node misses it alike), from one cached heap, not a heap of every node per name."""
    cands = [_cand(f"n{i}", region="eu-west", cap=2) for i in range(5)]
    roster = Roster(cands)
    picker, plain = Picker(roster, {}), Picker(Roster(cands), {})
    for i in range(12):
        ask = {"workload_class": "ai.inference", "min_tier": 0}
        assert picker.pick(**ask, region=f"made-up-{i}") == plain.pick(**ask, region=None)
    assert len(picker._heaps) == 1
    roster.idle_heap((("ai.inference", 0, 0, 0), None))
    assert len(roster._idle_heaps) == 1


def test_offset_file_clock_reads_offset_at_most_once_a_second(tmp_path: Path) -> None:
    """The test-hook clock adds the file's offset, re-reading it at most once a second."""
    wall = ManualClock(1000.0)
    path = tmp_path / "offset"
    clock = OffsetFileClock(path, wall=wall)
    assert clock.now() == 1000.0  # missing file: offset 0
    path.write_text("604800.5")
    assert clock.now() == 1000.0  # not re-read within the second
    wall.advance(1.0)
    assert clock.now() == 1001.0 + 604800.5
    path.write_text("garbage")
    wall.advance(1.0)
    assert clock.now() == 1002.0
    path.write_text("604800")
    wall.advance(1.0)
    assert clock.now() == 1003.0 + 604800
    assert clock.monotonic() == 1003.0  # the offset jumps the wall clock only


def test_config_rejects_nonsense() -> None:
    """Configuration errors are UsageError (exit 2), not later crashes."""
    with pytest.raises(UsageError):
        CoordinatorConfig(max_attempts=0)
    with pytest.raises(UsageError):
        CoordinatorConfig(heartbeat_interval=0)


def test_inference_class_round_trip() -> None:
    """ai.inference: validate keeps the model hash; the result must be for that model."""
    wc = classes.lookup("ai.inference")
    payload = inference_payload([1.0])
    meta = wc.validate(payload, 1 << 20)
    assert wc.split(payload, 1) == [payload]
    result = inference_result(payload, [1.0])
    wc.check_result(result, meta, 1 << 20)
    other = inference_result(inference_payload([1.0, 2.0]), [1.0, 2.0])
    with pytest.raises(RemoteProtocolError, match="expected"):
        wc.check_result(other, meta, 1 << 20)
    assert wc.assemble([result], meta) == result


def test_unknown_class_names_known_ones() -> None:
    """An unknown workload class is refused with the list of known ones."""
    with pytest.raises(RemoteProtocolError, match=r"known: ai\.inference"):
        classes.lookup("ai.dance")
