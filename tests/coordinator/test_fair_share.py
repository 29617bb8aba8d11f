"""Fair shares: equally loaded nodes take turns, least recently leased first.

When tasks are short and sparse, every node is idle at each pick; a tie broken by node_id
alone gave every task to the node with the lowest address. These tests hold pick_node,
Picker (round after round, with the roster's cached idle heaps going stale) and the
running coordinator to a round-robin among idle nodes.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from nodeclient.coordinator import selection
from nodeclient.coordinator.config import SybilPolicy
from nodeclient.coordinator.selection import Candidate, LeaseOrder, Picker, Roster, pick_node
from tests.coordinator.conftest import (
    Running,
    inference_payload,
    inference_result,
    make_node,
)

INF = frozenset({"ai.inference"})
ASK = {"workload_class": "ai.inference", "min_tier": 0, "region": None}


def _cand(node_id: str, *, tier: int = 0, region: str = "eu-west", cap: int = 1,
          classes_: frozenset[str] = INF, ram_mb: int = 0, vram_mb: int = 0) -> Candidate:  # fmt: skip
    return Candidate(node_id, tier, region, classes_, cap, ram_mb, vram_mb)


def _assert_round_robin(picks: list[str | None], ids: list[str]) -> None:
    """Each node got one of the first len(ids) picks, and every node the same share."""
    assert sorted(p for p in picks[: len(ids)] if p is not None) == sorted(ids)
    assert Counter(picks) == {n: len(picks) // len(ids) for n in ids}


def test_pick_node_gives_idle_nodes_turns() -> None:
    """Five idle nodes of equal capacity and region, one task at a time, each finished
    before the next: pick_node with the last leases hands them out in turn."""
    cands = [_cand(f"n{i}", cap=2) for i in range(5)]
    ids = [c.node_id for c in cands]
    free = dict.fromkeys(ids, 2)
    recency = LeaseOrder()
    picks = []
    for _ in range(50):
        choice = pick_node(candidates=cands, free=free, recency=recency.last, **ASK)
        assert choice is not None
        recency.leased(choice)
        picks.append(choice)
    assert picks[:5] == ids  # never leased first, then by node_id
    _assert_round_robin(picks, ids)
    # Load still comes first: a node with a lease waits behind idle ones, however much
    # longer ago than theirs its last lease was.
    free["n4"] = 1
    recent = {"n0": 99, "n1": 99, "n2": 99, "n3": 99}
    assert pick_node(candidates=cands, free=free, recency=recent, **ASK) == "n0"


def test_picker_gives_idle_nodes_turns_across_rounds_and_rosters() -> None:
    """The same through Picker: one task per round, a new Picker each round, the roster's
    cached idle heap built once, and the roster itself rebuilt now and then (the last
    leases outlive it, as they do in the scheduler)."""
    cands = [_cand(f"n{i}") for i in range(5)]
    ids = [c.node_id for c in cands]
    recency = LeaseOrder()
    roster = Roster(cands, recency=recency)
    picks = []
    for task in range(50):
        if task % 7 == 6:
            roster = Roster(cands, recency=recency)
        picks.append(Picker(roster, {}).pick(**ASK))
    _assert_round_robin(picks, ids)


def test_picker_shares_out_a_round_among_equal_nodes() -> None:
    """Within one round too: with two slots each, two tasks per round go to two nodes
    that took none in the last round, while such nodes remain."""
    cands = [_cand(f"n{i}", cap=2) for i in range(4)]
    roster = Roster(cands)
    rounds = []
    for _ in range(4):
        picker = Picker(roster, {})
        rounds.append({picker.pick(**ASK), picker.pick(**ASK)})
    assert rounds == [{"n0", "n1"}, {"n2", "n3"}, {"n0", "n1"}, {"n2", "n3"}]


@pytest.mark.parametrize("stale_min", [1, 3, 64])
def test_picker_chooses_as_pick_node_does_round_after_round(
    monkeypatch: pytest.MonkeyPatch, stale_min: int
) -> None:
    """Random candidates, leases, last leases, tried and excluded sets, regions and
    resources, over many rounds on one roster (its cached idle heaps going stale and,
    with a low STALE_MIN, dropped and rebuilt often): every pick of every round equals
    pick_node's with the last leases as they stand."""
    monkeypatch.setattr(selection, "STALE_MIN", stale_min)
    rng = random.Random(20_250 + stale_min)
    classes_ = ["ai.inference", "media.render"]
    regions = ["eu-west", "us-east", "ap-south"]
    rebuilt = 0
    for _roster in range(25):
        cands = [
            _cand(
                f"n{i:03d}",
                tier=rng.randint(0, 2),
                region=rng.choice(regions),
                cap=rng.randint(1, 3),
                classes_=frozenset(rng.sample(classes_, rng.randint(1, 2))),
                ram_mb=rng.choice([0, 8192]),
                vram_mb=rng.choice([0, 0, 7680]),
            )
            for i in range(rng.randint(1, 60))
        ]
        ids = [c.node_id for c in cands]
        recency = LeaseOrder({n: rng.randint(0, 4) for n in ids if rng.random() < 0.3})
        roster = Roster(cands, recency=recency)
        for _round in range(12):
            busy = rng.choice([0.0, 0.0, 0.1, 0.6])  # mostly idle: the idle heap's copies
            used = {n: rng.randint(0, 3) for n in ids if rng.random() < busy}
            used = {n: min(k, roster.by_id[n].capacity) for n, k in used.items()}
            free = {c.node_id: c.capacity - used.get(c.node_id, 0) for c in cands}
            cached = dict(roster._idle_heaps)
            picker = Picker(roster, used, max_groups=rng.choice([1, 4, 64]))
            for _task in range(rng.randint(0, 30)):
                ask = {
                    "workload_class": rng.choice(classes_),
                    "min_tier": rng.randint(0, 2),
                    "region": rng.choice([None, None, *regions, "nowhere"]),
                    "tried": rng.sample(ids, min(len(ids), rng.choice([0, 0, 0, 1, 3]))),
                    "excluded": rng.sample(ids, min(len(ids), rng.choice([0, 0, 0, 1, 2]))),
                    "ram_mb": rng.choice([0, 0, 4096, 9000]),
                    "vram_mb": rng.choice([0, 0, 0, 4096]),
                }
                expected = pick_node(candidates=cands, free=free, recency=dict(recency.last), **ask)
                assert picker.pick(**ask) == expected
                if expected is not None:
                    free[expected] -= 1
                    assert recency.last[expected] == max(recency.last.values())
                assert {n: picker.slots(n) for n in ids} == free
            rebuilt += sum(1 for g in cached if g not in roster._idle_heaps)
    if stale_min < 64:
        assert rebuilt > 0  # the path that drops a stale idle heap was taken


def test_a_round_pops_a_bounded_number_of_stale_entries() -> None:
    """1,000 idle nodes, one task per round for 1,500 rounds on one roster: each lease
    leaves a stale entry in the cached idle heap, ahead of its true place. The cache is
    rebuilt once a round pops more than max(STALE_MIN, len // 8) of them, so no round
    pops more than that and two; without the rebuild, round r would pop r of them."""
    n = 1000
    cands = [_cand(f"n{i:04d}") for i in range(n)]
    roster = Roster(cands)
    limit = max(selection.STALE_MIN, n // 8)
    picks, pops = [], []
    for _ in range(1500):
        picker = Picker(roster, {})
        picks.append(picker.pick(**ASK))
        pops.append(picker.pops)
    assert max(pops) <= limit + 2
    assert sorted(p for p in picks[:n] if p is not None) == [c.node_id for c in cands]
    assert set(Counter(picks).values()) == {1, 2}
    # The roster puts each stale entry back in its place in the kept heap, once, before
    # the round copies it: a round of one task pops one entry (n/16 on average without).
    assert max(pops) <= 2 and sum(pops) <= 1.1 * len(pops)


def test_the_coordinator_gives_idle_nodes_turns(start_coordinator, rsa_keys) -> None:
    """Through the real scheduler: five linked nodes of one region and capacity, fifty
    jobs of one task, each finished before the next is submitted (so every node is idle
    at each pick), and the roster rebuilt between them: each node runs one of the first
    five tasks, and ten in all."""
    running: Running = start_coordinator(
        heartbeat_interval=1000.0, sybil=SybilPolicy(max_nodes_per_wallet=8)
    )
    nodes = [make_node(rsa_keys, i % len(rsa_keys)) for i in range(5)]
    for node in nodes:
        running.register(node)
        running.link(node)
    by_id = {node.node_id: node for node in nodes}
    values = [1.0, 2.0]
    payload = inference_payload(values)
    result = inference_result(payload, values)
    ran = []
    for _ in range(50):
        job = running.client.submit_job("ai.inference", payload)
        leased = running.wait_job(job["job_id"], "running")
        node_id = leased["tasks"][0]["node_id"]
        node = by_id[node_id]
        dispatch = node.recv()
        assert (dispatch["type"], dispatch["job_id"]) == ("dispatch", job["job_id"])
        assert node.call(node.result(dispatch, result))["status"] == "accepted"
        assert running.wait_job(job["job_id"], "succeeded")["status"] == "succeeded"
        ran.append(node_id)
        running.coord.roster_changed()  # the next round builds a new Roster
    _assert_round_robin(ran, list(by_id))
