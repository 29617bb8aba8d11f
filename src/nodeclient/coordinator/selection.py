"""Node selection: which eligible node takes a queued task; pure, no database, no I/O.

A node is eligible for a task when it lists the task's workload class, has
``hardware_tier >= min_tier``, and a slot of it can hold the task's declared ``resources``
(RAM and GPU memory, from its manifest: ``tier.slot_memory_mb``). Among eligible nodes,
prefer one that has not tried the task before, then one in the job's region (falling back
to any region), then the least loaded, then the one leased a task least recently (the rules:
:mod:`nodeclient.coordinator.scheduler`). The last is a round-robin among equally loaded
nodes: when tasks are short and sparse, every node is idle at each pick, and a tie broken
by node_id alone would give every task to the node with the lowest address.

Selection is a pure function (:func:`pick_node`). A round places its tasks with
:class:`Picker`, which makes the same choice as :func:`pick_node` from one heap per
(workload class, min tier, region, resources) of a :class:`Roster`, instead of a scan of
every node per task.
"""

from __future__ import annotations

import bisect
import heapq
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from nodeclient.coordinator.store import NodeInfo


@dataclass(frozen=True, slots=True)
class Candidate:
    node_id: str
    hardware_tier: int
    region: str
    workload_classes: frozenset[str]
    capacity: int
    ram_mb: int = 0  # what a task may count on in one slot
    vram_mb: int = 0
    manifest_hash: str = ""  # what a task leased to it records (models.Task.manifest_hash)


_NEVER_LEASED: Mapping[str, int] = types.MappingProxyType({})


class LeaseOrder:
    """When each node was last leased a task, as the value of a count of every lease made:
    a node leased more recently has a higher value; one never leased reads 0.

    The scheduler keeps one for as long as it runs, across rebuilds of its
    :class:`Roster`. It is kept in memory only: after a restart of the coordinator every
    node reads 0 again, which costs one uneven turn of the round-robin at most.
    """

    __slots__ = ("_count", "last")

    def __init__(self, last: Mapping[str, int] | None = None) -> None:
        self.last: dict[str, int] = dict(last or {})  # node_id -> count at its last lease
        self._count = max(self.last.values(), default=0)

    def leased(self, node_id: str) -> int:
        """A task was leased to *node_id*: it is now the most recently leased node; returns
        its new value."""
        self._count += 1
        self.last[node_id] = self._count
        return self._count

    def keep_only(self, node_ids: Iterable[str]) -> None:
        """Forget every node but *node_ids* (nodes gone for good leave no entry behind);
        one that comes back reads 0, like a new node. A round running meanwhile (in the
        database thread) may then lose the record of a lease: a matter of turns only."""
        last = self.last
        self.last = {n: last[n] for n in node_ids if n in last}


def pick_node(
    *,
    workload_class: str,
    min_tier: int,
    region: str | None,
    candidates: Iterable[Candidate],
    free: Mapping[str, int],
    tried: Iterable[str] = (),
    excluded: Iterable[str] = (),
    ram_mb: int = 0,
    vram_mb: int = 0,
    recency: Mapping[str, int] = _NEVER_LEASED,
) -> str | None:
    """The best eligible node for one task, or None; pure, so it is tested directly.

    A node that tried the task is chosen only when no other candidate could take it at
    all, free or busy: otherwise the task waits for one. A node that refuses or drops
    whatever it gets is always the least loaded; were it given the task back whenever
    the others are busy, it alone would spend the task's attempts within a second.

    Among nodes equal in all that, the one leased a task least recently (*recency*:
    :attr:`LeaseOrder.last`, 0 for a node never leased) wins, then the lowest node_id:
    idle nodes take turns, rather than the lowest node_id taking every task.
    """
    tried_set, excluded_set = set(tried), set(excluded)
    best: tuple[bool, bool, float, int, str] | None = None
    need = (workload_class, min_tier, ram_mb, vram_mb)
    cands = list(candidates)
    others = any(
        c.capacity > 0 and is_eligible(c, need) and c.node_id not in tried_set | excluded_set
        for c in cands
    )
    for c in cands:
        slots = free.get(c.node_id, 0)
        if slots <= 0 or not is_eligible(c, need):
            continue
        if c.node_id in excluded_set or (others and c.node_id in tried_set):
            continue
        key = (
            c.node_id in tried_set,
            region is not None and c.region != region,
            1.0 - slots / max(c.capacity, 1),
            recency.get(c.node_id, 0),
            c.node_id,
        )
        if best is None or key < best:
            best = key
    return None if best is None else best[4]


# A heap entry: (region mismatch, load, last lease, node_id, free slots when pushed). The
# first four are pick_node's preference after "not tried before"; the last lease and the
# free slots as they were when it was pushed detect an entry made stale by a pick, or by
# leases it did not know of. Both only ever make a node's true key larger: a stale entry
# is ahead of its true place, never behind it.
_Entry = tuple[bool, float, int, str, int]
_Need = tuple[str, int, int, int]  # what a task asks: workload class, min tier, RAM, VRAM
_Group = tuple[_Need, str | None]  # and its region preference
Offer = tuple[int, int, int]  # what a node offers a task: hardware tier, slot RAM, slot VRAM
# Groups a round keeps a heap for (each may hold every node): a task of a further group
# waits for a later round, which starts with the oldest tasks' groups.
MAX_GROUPS = 64
MAX_OFFERS = 32  # per class in a queued-task query; more are merged into one upper bound
# A round that pops more than max(STALE_MIN, len // 8) entries with an out-of-date last
# lease from a copy of a cached idle heap (len entries) has the roster build it again.
STALE_MIN = 64


def _frontier(offers: Iterable[Offer]) -> list[Offer]:
    """The offers no other offer matches or beats in every figure: a task some node can
    take fits one of them. Past MAX_OFFERS, their upper bound alone (a looser filter)."""
    out: list[Offer] = []
    for offer in sorted(set(offers), reverse=True):  # a dominating offer sorts first
        if not any(o[0] >= offer[0] and o[1] >= offer[1] and o[2] >= offer[2] for o in out):
            out.append(offer)
    if len(out) > MAX_OFFERS:
        out = [(max(o[0] for o in out), max(o[1] for o in out), max(o[2] for o in out))]
    return out


def _offer(c: Candidate) -> Offer:
    return c.hardware_tier, c.ram_mb, c.vram_mb


def _load(c: Candidate, slots: int) -> float:
    return 1.0 - slots / max(c.capacity, 1)  # exactly pick_node's load term


def to_candidate(node_id: str, info: NodeInfo) -> Candidate:
    """Registered node *node_id* as the scheduler weighs it."""
    return Candidate(
        node_id, info.hardware_tier, info.region, info.workload_classes,
        info.max_parallel_subtasks, info.slot_ram_mb, info.slot_vram_mb, info.manifest_hash,
    )  # fmt: skip


def is_eligible(c: Candidate, need: _Need) -> bool:
    workload_class, min_tier, ram_mb, vram_mb = need
    return (
        workload_class in c.workload_classes
        and c.hardware_tier >= min_tier
        and c.ram_mb >= ram_mb
        and c.vram_mb >= vram_mb
    )


class Roster:
    """The scheduling candidates, plus what rounds reuse until the candidates change.

    For each group of tasks it keeps a heap of its eligible nodes keyed as if none had a
    lease (load 0), with their last leases (*recency*) as they were when it was built. A
    round copies it (a C-level list copy) instead of weighing every node again: an entry
    of a node with leases, or leased since, is then ahead of its true place, which
    :class:`Picker` corrects when it pops it. Before each copy, the entries at the top
    that leases made stale are put back in their place in the kept heap itself, once
    each (O(log nodes) a lease); a heap with many stale entries further down (nodes
    leased past the top) is dropped (:meth:`drop_idle_heap`) and built again when next
    asked for.

    *recency*: the leases the rounds record, kept by the caller across rosters; a fresh
    one by default.
    """

    def __init__(
        self, candidates: Iterable[Candidate], *, recency: LeaseOrder | None = None
    ) -> None:
        self.candidates = list(candidates)
        self.recency = LeaseOrder() if recency is None else recency
        self.by_id = {c.node_id: c for c in self.candidates}
        self.capacity = sum(max(c.capacity, 0) for c in self.candidates)
        # What any candidate serves at all: queued tasks outside it are not even read.
        self.classes = frozenset(w for c in self.candidates for w in c.workload_classes)
        self.regions = frozenset(c.region for c in self.candidates)
        self._idle_heaps: dict[_Group, list[_Entry]] = {}
        # Per class and offer, the nodes that serve the class with that offer.
        self._by_offer: dict[str, dict[Offer, list[Candidate]]] = {}
        for c in self.candidates:
            if c.capacity > 0:
                for w in c.workload_classes:
                    self._by_offer.setdefault(w, {}).setdefault(_offer(c), []).append(c)
        # What some candidate offers per class: queued tasks beyond it are not even read.
        self.offers = {w: _frontier(groups) for w, groups in self._by_offer.items()}
        # Slot sizes on offer, ascending: a task's need is rounded up to one (same nodes).
        self._ram = sorted({c.ram_mb for c in self.candidates})
        self._vram = sorted({c.vram_mb for c in self.candidates})

    def serves(self, need: _Need, *, barred: set[str]) -> bool:
        """Whether a candidate not in *barred* could take a task of *need*, free or not
        (it stops at the first: at most the barred few are passed over)."""
        workload_class, min_tier, ram_mb, vram_mb = need
        return any(
            tier >= min_tier
            and ram >= ram_mb
            and vram >= vram_mb
            and any(c.node_id not in barred for c in nodes)
            for (tier, ram, vram), nodes in self._by_offer.get(workload_class, {}).items()
        )

    def nodes_serving(self, workload_class: str) -> Iterable[list[Candidate]]:
        """The candidates (with slots) that serve *workload_class*, grouped by offer."""
        return self._by_offer.get(workload_class, {}).values()

    def free_offers(self, used: Mapping[str, int]) -> dict[str, list[Offer]]:
        """Per class, :attr:`offers` among the nodes with a free slot (classes with none
        are left out): what a queued task may ask for and be placed now."""
        out: dict[str, list[Offer]] = {}
        for workload_class, groups in self._by_offer.items():
            free = [
                offer
                for offer, nodes in groups.items()
                if any(used.get(c.node_id, 0) < c.capacity for c in nodes)
            ]
            if free:
                out[workload_class] = _frontier(free)
        return out

    def normal(self, need: _Need) -> _Need | None:
        """*need* with its RAM and VRAM rounded up to a slot size some candidate has: the
        same nodes hold it, and tasks of many sizes share a few groups. None when no
        candidate's slot is that large."""
        workload_class, min_tier, ram_mb, vram_mb = need
        i, j = bisect.bisect_left(self._ram, ram_mb), bisect.bisect_left(self._vram, vram_mb)
        if i == len(self._ram) or j == len(self._vram):
            return None
        return workload_class, min_tier, self._ram[i], self._vram[j]

    def idle_heap(self, group: _Group) -> list[_Entry]:
        """A fresh copy of the group's heap with every node idle."""
        heap = self._idle_heaps.get(group)
        if heap is None:
            need, region = group
            last = self.recency.last
            heap = [
                (region is not None and c.region != region, _load(c, c.capacity),
                 last.get(c.node_id, 0), c.node_id, c.capacity)
                for c in self.candidates
                if c.capacity > 0 and is_eligible(c, need)
            ]  # fmt: skip
            heapq.heapify(heap)
            if len(self._idle_heaps) < MAX_GROUPS:
                self._idle_heaps[group] = heap
        else:
            # Nodes leased since sit at the top, ahead of their true place: put each back
            # where its last lease puts it once, here, rather than in every round's copy.
            # (Only the database thread's rounds ask: the heap is never shared.)
            last = self.recency.last
            while heap and heap[0][2] != (now := last.get(heap[0][3], 0)):
                mismatch, load, _, node_id, slots = heap[0]
                heapq.heapreplace(heap, (mismatch, load, now, node_id, slots))
        return list(heap)

    def drop_idle_heap(self, group: _Group) -> None:
        """Forget the group's idle heap: the next :meth:`idle_heap` builds it again, with
        the last leases as they are then."""
        self._idle_heaps.pop(group, None)

    def any_free(self, used: Mapping[str, int]) -> bool:
        """Whether some candidate has a free slot, given tasks leased per node (O(leased))."""
        free = self.capacity
        for node_id, n in used.items():
            c = self.by_id.get(node_id)
            if c is not None:
                cap = max(c.capacity, 0)
                free -= cap - max(0, cap - n)
        return free > 0


class Picker:
    """:func:`pick_node` for many tasks in one round, O(log nodes) per task.

    Candidates are grouped by what a task asks of them (workload class, min tier,
    resources, region); each group keeps a heap keyed by (region mismatch, load, last
    lease, node_id). Load and last lease only go up, so an entry whose slot count or last
    lease is out of date is ahead of its true place: it is popped early and pushed back
    with its current values. Every pick records its lease in the roster's
    :class:`LeaseOrder`. When a round pops many entries with an out-of-date last lease
    (more than ``max(STALE_MIN, len // 8)``) from a copy of the roster's idle heap, the
    roster builds that idle heap again for the next round. The roster corrects its idle
    heap's top before each copy (:meth:`Roster.idle_heap`), so with one task a round
    (every node idle, each lease making the top stale) a round pops about one entry.
    Nodes that already tried the task, or may not take it, are set aside during a pick
    and put back after it. When every eligible node has tried the task, the best of the
    (few) nodes that tried it is chosen, as pick_node does; while some other node could
    take it, busy or not, the task waits for one.
    """

    def __init__(
        self, roster: Roster, used: Mapping[str, int], *, max_groups: int = MAX_GROUPS
    ) -> None:
        self._roster = roster
        self._cands = roster.by_id
        self._used = dict(used)  # node_id -> tasks leased to it; pick() adds one
        self._heaps: dict[_Group, list[_Entry]] = {}
        self._max_groups = max_groups
        self._recency = roster.recency
        # Per group whose heap is a copy of the roster's idle heap: how many more entries
        # with an out-of-date last lease may be popped before that idle heap is rebuilt.
        self._stale_left: dict[_Group, int] = {}
        self.pops = 0  # heap entries popped this round: what a round's work grows with

    def any_free(self) -> bool:
        """Whether some candidate still has a free slot, this round's picks included."""
        return self._roster.any_free(self._used)

    def free_offers(self) -> dict[str, list[Offer]]:
        """Roster.free_offers, this round's picks included."""
        return self._roster.free_offers(self._used)

    def any_free_outside(self, workload_class: str, barred: set[str]) -> bool:
        """Whether a candidate serving *workload_class*, not in *barred*, has a free slot
        (it stops at the first: at most the barred few are passed over)."""
        groups = self._roster.nodes_serving(workload_class)
        return any(
            c.node_id not in barred and self.slots(c.node_id) > 0 for nodes in groups for c in nodes
        )

    def slots(self, node_id: str) -> int:
        """Free slots of a candidate now (capacity minus leases, this round's included)."""
        return self._cands[node_id].capacity - self._used.get(node_id, 0)

    def pick(
        self,
        *,
        workload_class: str,
        min_tier: int,
        region: str | None,
        tried: Iterable[str] = (),
        excluded: Iterable[str] = (),
        ram_mb: int = 0,
        vram_mb: int = 0,
    ) -> str | None:
        """The node pick_node would choose; its free slots go down by one. A task of a new
        group, once this round keeps ``max_groups`` heaps, is placed by a scan of every
        candidate instead (the same choice, without a heap kept for it)."""
        tried_set, excluded_set = set(tried), set(excluded)
        need = self._roster.normal((workload_class, min_tier, ram_mb, vram_mb))
        if need is None:
            return None  # no slot of any candidate is that large
        if region not in self._roster.regions:
            # No candidate is there: every node misses it alike, which orders them as no
            # preference does. One group for all such regions, not one cached heap of every
            # node per name a requester made up.
            region = None
        group = (need, region)
        heap = self._heaps.get(group)
        if heap is None:
            if len(self._heaps) >= self._max_groups:
                return self._scan(need, region, tried_set, excluded_set)
            heap = self._heaps[group] = self._start_heap(group)
        aside: list[_Entry] = []
        choice: str | None = None
        last = self._recency.last
        while heap:
            entry = heapq.heappop(heap)
            self.pops += 1
            mismatch, _, pushed_lease, node_id, pushed_slots = entry
            slots = self.slots(node_id)
            if slots <= 0:
                continue  # full: gone from this group for the rest of the round
            lease = last.get(node_id, 0)
            if slots != pushed_slots or lease != pushed_lease:
                if lease != pushed_lease:
                    self._stale_popped(group)
                c = self._cands[node_id]
                heapq.heappush(heap, (mismatch, _load(c, slots), lease, node_id, slots))
                continue
            if node_id in excluded_set or node_id in tried_set:
                aside.append(entry)
                continue
            choice = node_id
            break
        for entry in aside:
            heapq.heappush(heap, entry)
        if choice is None:  # every eligible node with a free slot tried it (or none is)
            return self._pick_tried(need, region, tried_set, excluded_set)
        lease = self._lease(choice)
        slots = self.slots(choice)
        if slots > 0:
            c = self._cands[choice]
            mismatch = region is not None and c.region != region
            heapq.heappush(heap, (mismatch, _load(c, slots), lease, choice, slots))
        return choice

    def _lease(self, node_id: str) -> int:
        """Count a lease to *node_id*: one slot less, and it is the most recently leased
        (its entries in every other heap are now stale); returns its last lease."""
        self._used[node_id] = self._used.get(node_id, 0) + 1
        return self._recency.leased(node_id)

    def _stale_popped(self, group: _Group) -> None:
        """An entry with an out-of-date last lease was popped from the group's heap; past
        the limit, the roster builds its idle heap again for the next round (this round
        goes on with its copy, whose stale entries are corrected as they are popped)."""
        left = self._stale_left.get(group)
        if left is None:
            return  # not a copy of the roster's idle heap
        if left == 0:
            self._roster.drop_idle_heap(group)
            del self._stale_left[group]
        else:
            self._stale_left[group] = left - 1

    def _scan(
        self, need: _Need, region: str | None, tried: set[str], excluded: set[str]
    ) -> str | None:
        """pick_node over every candidate, with this round's picks; its slots go down."""
        workload_class, min_tier, ram_mb, vram_mb = need
        choice = pick_node(
            workload_class=workload_class,
            min_tier=min_tier,
            region=region,
            candidates=self._roster.candidates,
            free={c.node_id: self.slots(c.node_id) for c in self._roster.candidates},
            tried=tried,
            excluded=excluded,
            ram_mb=ram_mb,
            vram_mb=vram_mb,
            recency=self._recency.last,
        )
        if choice is not None:
            self._lease(choice)
        return choice

    def _start_heap(self, group: _Group) -> list[_Entry]:
        """The group's heap at the start of the round.

        Few nodes with leases: a copy of the idle heap (their entries get corrected as
        they come up). Many: weigh every node now, rather than correct most entries.
        """
        if len(self._used) * 8 < len(self._cands):
            heap = self._roster.idle_heap(group)
            self._stale_left[group] = max(STALE_MIN, len(heap) // 8)
            return heap
        need, region = group
        last = self._recency.last
        heap = []
        for c in self._roster.candidates:
            slots = self.slots(c.node_id)
            if slots > 0 and is_eligible(c, need):
                mismatch = region is not None and c.region != region
                heap.append((mismatch, _load(c, slots), last.get(c.node_id, 0), c.node_id, slots))
        heapq.heapify(heap)
        return heap

    def _pick_tried(
        self, need: _Need, region: str | None, tried: set[str], excluded: set[str]
    ) -> str | None:
        """The best of the nodes that tried the task, when no other node could take it at
        all (free or busy; else the task waits for one, see pick_node); its slots go down."""
        if not tried or self._roster.serves(need, barred=tried | excluded):
            return None
        choice = self._best_tried(need, region, tried, excluded)
        if choice is not None:
            self._lease(choice)
        return choice

    def _best_tried(
        self, need: _Need, region: str | None, tried: set[str], excluded: set[str]
    ) -> str | None:
        best: tuple[bool, float, int, str] | None = None
        last = self._recency.last
        for node_id in tried - excluded:
            c = self._cands.get(node_id)
            if c is None:
                continue
            slots = self.slots(node_id)
            if slots <= 0 or not is_eligible(c, need):
                continue
            mismatch = region is not None and c.region != region
            key = (mismatch, _load(c, slots), last.get(node_id, 0), node_id)
            if best is None or key < best:
                best = key
        return None if best is None else best[3]
