"""2.3.2 registration over HTTP: verification, updates, staleness, sybil pre-screen, unstake."""

from __future__ import annotations

import time

import httpx
import pytest

from nodeclient.coordinator import models as m
from nodeclient.coordinator.config import SybilPolicy
from nodeclient.errors import RemoteProtocolError
from nodeclient.protocol import eip712
from nodeclient.protocol import manifest as mf
from nodeclient.protocol.secp import Secp256k1Key
from nodeclient.protocol.states import UNSTAKE_COOLDOWN_S
from tests.coordinator.conftest import CHAIN, START, Running, make_node, run_inference_job


def _post(running: Running, body: object) -> httpx.Response:
    return httpx.post(running.url + "/v1/nodes", json=body)


def test_register_new_node(coordinator: Running, rsa_keys) -> None:
    """A valid manifest registers: 201, status registered, coordinator identity and policy."""
    node = make_node(rsa_keys, 0)
    r = _post(coordinator, node.manifest(issued_at=int(START)))
    assert r.status_code == 201
    body = r.json()
    assert body["node_id"] == node.node_id
    assert body["status"] == "registered"
    assert body["prior_registrations"] == []
    assert body["policy"] == {"max_nodes_per_wallet": 2, "require_wallet_proof": False}
    assert body["wallet_proven"] is False
    assert body["coordinator_id"] == "coordinator-test"
    assert body["chain_id"] == CHAIN
    listed = coordinator.client.nodes()
    assert [n["node_id"] for n in listed] == [node.node_id]
    assert listed[0]["tier"] == 0
    assert listed[0]["online"] is False


def test_reregistration_updates_liveness_key(coordinator: Running, rsa_keys) -> None:
    """Re-registering the same node_id is an update (200), e.g. a liveness key rotation."""
    node = make_node(rsa_keys, 0)
    coordinator.register(node)
    node.liveness = Secp256k1Key.generate()
    r = _post(coordinator, node.manifest(issued_at=int(START) + 1))
    assert r.status_code == 200
    assert r.json()["status"] == "updated"
    assert coordinator.client.node(node.node_id)["liveness_address"] == node.liveness.address


def test_stale_manifest_is_refused(coordinator: Running, rsa_keys) -> None:
    """A manifest older than the one on record is refused with 409 and changes nothing."""
    node = make_node(rsa_keys, 0)
    coordinator.register(node)
    old_liveness = node.liveness.address
    node.liveness = Secp256k1Key.generate()
    r = _post(coordinator, node.manifest(issued_at=int(START) - 60))
    assert r.status_code == 409
    assert r.json()["error"].startswith("stale manifest:")
    assert coordinator.client.node(node.node_id)["liveness_address"] == old_liveness


def test_a_new_liveness_key_needs_a_later_issued_at(coordinator: Running, rsa_keys) -> None:
    """Two manifests of one second, with different liveness keys: the second is refused
    (409), or the first, public once registered, sent again by anyone, would put back a
    key its rotation replaced. The node signs again a second later, and that one takes."""
    node = make_node(rsa_keys, 0)
    first = node.manifest(issued_at=int(START))
    assert _post(coordinator, first).status_code == 201
    old_liveness = node.liveness.address
    node.liveness = Secp256k1Key.generate()
    r = _post(coordinator, node.manifest(issued_at=int(START)))
    assert r.status_code == 409
    assert "names another liveness key" in r.json()["error"]
    assert coordinator.client.node(node.node_id)["liveness_address"] == old_liveness
    rotated = node.manifest(issued_at=int(START) + 1)
    assert _post(coordinator, rotated).json()["status"] == "updated"
    assert _post(coordinator, first).status_code == 409  # the replaced one: stale
    assert coordinator.client.node(node.node_id)["liveness_address"] == node.liveness.address


def test_the_registered_manifest_sent_again_changes_nothing(coordinator: Running, rsa_keys) -> None:
    """The registered manifest itself, sent again (a retried request, or anyone: it is
    public): 200 "unchanged", and neither the time it was registered nor a stopping
    node's draining (which only the node's own fresh registration clears) changes."""
    node = make_node(rsa_keys, 0)
    signed = node.manifest(issued_at=int(START))
    assert _post(coordinator, signed).status_code == 201
    before = coordinator.client.node(node.node_id)

    def updated_at() -> float:
        return coordinator.coord.db.run_sync(lambda s: s.get_one(m.Node, node.node_id).updated_at)

    registered = updated_at()
    coordinator.coord.runtime[node.node_id].draining = True
    coordinator.clock.advance(60)
    again = _post(coordinator, signed)
    assert (again.status_code, again.json()["status"]) == (200, "unchanged")
    assert coordinator.client.node(node.node_id) == before
    assert updated_at() == registered  # what keeps a node from being forgotten
    assert coordinator.coord.runtime[node.node_id].draining is True
    fresh = _post(coordinator, node.manifest(issued_at=int(START) + 60))
    assert fresh.json()["status"] == "updated"
    assert coordinator.coord.runtime[node.node_id].draining is False


@pytest.mark.parametrize(
    ("issued_at", "says"),
    [(int(START) + 600, "600 s in the future"), (int(START) - 2 * 86400, "s old (max 86400")],
)
def test_a_manifest_out_of_step_with_the_coordinators_clock_is_a_409(
    coordinator: Running, rsa_keys, issued_at: int, says: str
) -> None:
    """A manifest issued too far in the future or the past for the coordinator's clock:
    one of the two clocks is off, which clears once they agree, so 409 (which a node
    retries), not 400 (final: a node stops, and systemd does not restart it)."""
    node = make_node(rsa_keys, 0)
    r = _post(coordinator, node.manifest(issued_at=issued_at))
    assert r.status_code == 409, r.text
    assert says in r.json()["error"] and "clock skew?" in r.json()["error"]
    wallet = Secp256k1Key.generate()  # a wallet whose clock runs 10 min ahead
    ahead = make_node(rsa_keys, 1, wallet=wallet.address)
    proof = mf.sign_wallet_proof(wallet, ahead.node_id, issued_at=int(START) + 600, chain_id=CHAIN)
    r = _post(coordinator, ahead.manifest(issued_at=int(START), wallet_proof=proof))
    assert r.status_code == 409, r.text
    assert "wallet_proof: issued_at is 600 s in the future" in r.json()["error"]


def test_invalid_signature_is_refused(coordinator: Running, rsa_keys) -> None:
    """A manifest altered after signing fails verification: 400 naming the check."""
    node = make_node(rsa_keys, 0)
    manifest = node.manifest(issued_at=int(START))
    manifest["region"] = "us-east"
    r = _post(coordinator, manifest)
    assert r.status_code == 400
    assert r.json()["error"].startswith("signature:")
    assert coordinator.client.nodes() == []


def test_sybil_prescreen_names_the_policy(coordinator: Running, rsa_keys) -> None:
    """A wallet at max_nodes_per_wallet cannot add another node: 403 naming the policy."""
    first, second, third = (make_node(rsa_keys, i) for i in range(3))
    coordinator.register(first)
    r2 = coordinator.register(second)
    assert [p["node_id"] for p in r2["prior_registrations"]] == [first.node_id]
    r = _post(coordinator, third.manifest(issued_at=int(START)))
    assert r.status_code == 403
    assert r.json()["error"] == (
        f"sybil pre-screen: wallet {first.wallet} already has 2 registered nodes (a node "
        "with a wallet_proof counts only the wallet's proven nodes: `nodeclient "
        "wallet-proof`) (policy max_nodes_per_wallet=2)"
    )


def test_sybil_prescreen_allows_reregistration(coordinator: Running, rsa_keys) -> None:
    """A node already registered by a full wallet may still update its own record."""
    first, second = make_node(rsa_keys, 0), make_node(rsa_keys, 1)
    coordinator.register(first)
    coordinator.register(second)
    r = _post(coordinator, first.manifest(issued_at=int(START) + 5))
    assert r.status_code == 200


def test_a_node_past_its_unstake_cooldown_leaves_the_wallet_quota(
    start_coordinator, rsa_keys
) -> None:
    """With one node per wallet, a node that unstaked still holds the wallet's place
    during its cooldown; once the cooldown has ended another node may register."""
    running = start_coordinator(sybil=SybilPolicy(max_nodes_per_wallet=1))
    first, second = make_node(rsa_keys, 0), make_node(rsa_keys, 1)
    running.register(first)
    msg, sig = _unstake_body(first.node_key, first.node_id, int(START))
    until = running.client.unstake(first.node_id, msg, sig)["unstaking_until"]
    running.clock.set(until)  # the last second of the cooldown: still counted
    r = _post(running, second.manifest(issued_at=until))
    assert r.status_code == 403
    assert "already has 1 registered nodes" in r.json()["error"]
    running.clock.set(until + 1)
    reply = running.register(second)
    assert reply["status"] == "registered"
    assert [p["node_id"] for p in reply["prior_registrations"]] == [first.node_id]
    # ... and the retired node is not what it was: a third is refused again.
    third = make_node(rsa_keys, 2)
    r = _post(running, third.manifest(issued_at=until + 1))
    assert r.status_code == 403
    assert "already has 1 registered nodes" in r.json()["error"]


def test_an_unstaking_node_cannot_hand_its_wallets_place_back_by_changing_wallet(
    start_coordinator, rsa_keys
) -> None:
    """A node in its cooldown holds its wallet's place: registered again under another
    wallet (a throwaway one, with that wallet's own proof), it is refused, names the
    policy, keeps its wallet; and the wallet's place stays taken until the cooldown ends."""
    running = start_coordinator(
        sybil=SybilPolicy(max_nodes_per_wallet=1, require_wallet_proof=True)
    )
    owner, throwaway = Secp256k1Key.generate(), Secp256k1Key.generate()
    first, second = make_node(rsa_keys, 0), make_node(rsa_keys, 1)
    assert _post(running, _proven(first, owner, int(START))).status_code == 201
    msg, sig = _unstake_body(first.node_key, first.node_id, int(START))
    until = running.client.unstake(first.node_id, msg, sig)["unstaking_until"]
    r = _post(running, _proven(first, throwaway, int(START) + 1))
    assert r.status_code == 403
    assert f"is unstaking until {until}" in r.json()["error"]
    assert "max_nodes_per_wallet=1" in r.json()["error"]
    assert running.client.node(first.node_id)["wallet"] == owner.address
    assert _post(running, _proven(second, owner, int(START) + 1)).status_code == 403
    running.clock.set(until + 1)  # the cooldown over: the place is free, the move allowed
    assert _post(running, _proven(second, owner, until + 1)).status_code == 201
    assert _post(running, _proven(first, throwaway, until + 1)).status_code == 200


def _proven(node, wallet_key: Secp256k1Key, issued_at: int) -> dict:
    """*node*'s manifest for *wallet_key*'s wallet, with the wallet's own proof."""
    node.wallet = wallet_key.address
    proof = mf.sign_wallet_proof(wallet_key, node.node_id, issued_at=issued_at, chain_id=CHAIN)
    return node.manifest(issued_at=issued_at, wallet_proof=proof)


def test_a_mere_claim_on_a_wallet_cannot_use_up_its_owners_places(
    coordinator: Running, rsa_keys
) -> None:
    """Two nodes that only name a wallet fill its two places for other such claims; the
    owner's nodes, which prove the wallet, count only each other and still register."""
    owner = Secp256k1Key.generate()
    squatters = [make_node(rsa_keys, i, wallet=owner.address) for i in range(2)]
    for node in squatters:
        coordinator.register(node)
    r = _post(coordinator, make_node(rsa_keys, 2, wallet=owner.address).manifest(
        issued_at=int(START)))  # fmt: skip
    assert r.status_code == 403
    assert "a node with a wallet_proof counts only the wallet's proven nodes" in r.json()["error"]
    first, second, third = (make_node(rsa_keys, i) for i in range(3))
    r = _post(coordinator, _proven(first, owner, int(START)))
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["wallet_proven"] is True
    assert sorted((p["node_id"], p["wallet_proven"]) for p in body["prior_registrations"]) == (
        sorted((n.node_id, False) for n in squatters)
    )
    assert _post(coordinator, _proven(second, owner, int(START))).status_code == 201
    r = _post(coordinator, _proven(third, owner, int(START)))
    assert r.status_code == 403
    assert r.json()["error"] == (
        f"sybil pre-screen: wallet {owner.address} already has 2 nodes proven by its owner "
        "(policy max_nodes_per_wallet=2)"
    )
    # A proven node that registers again without its proof stays proven (the wallet's
    # signature still stands), so it cannot step out of the count to make room.
    r = _post(coordinator, first.manifest(issued_at=int(START) + 1))
    assert (r.status_code, r.json()["wallet_proven"]) == (200, True)
    assert _post(coordinator, _proven(third, owner, int(START) + 1)).status_code == 403
    # Moved to another wallet, it is a mere claim there, and its place here is free.
    first.wallet = Secp256k1Key.generate().address
    r = _post(coordinator, first.manifest(issued_at=int(START) + 2))
    assert (r.status_code, r.json()["wallet_proven"]) == (200, False)
    assert _post(coordinator, _proven(third, owner, int(START) + 2)).status_code == 201


def test_a_claim_proven_later_counts_like_a_new_proven_node(start_coordinator, rsa_keys) -> None:
    """A node registered as a mere claim on a wallet, which proves the wallet later, joins
    the wallet's proven nodes only where a new proven node could: else claims registered
    first and proven afterwards would hold twice the limit of proven nodes."""
    running = start_coordinator(sybil=SybilPolicy(max_nodes_per_wallet=1))
    owner = Secp256k1Key.generate()
    claim, proven = make_node(rsa_keys, 0, wallet=owner.address), make_node(rsa_keys, 1)
    assert _post(running, claim.manifest(issued_at=int(START))).status_code == 201
    assert _post(running, _proven(proven, owner, int(START))).status_code == 201
    r = _post(running, _proven(claim, owner, int(START) + 1))
    assert r.status_code == 403
    assert r.json()["error"] == (
        f"sybil pre-screen: wallet {owner.address} already has 1 nodes proven by its owner "
        "(policy max_nodes_per_wallet=1)"
    )
    # Proven already, it registers again with its proof as before.
    r = _post(running, _proven(proven, owner, int(START) + 1))
    assert (r.status_code, r.json()["wallet_proven"]) == (200, True)


def test_require_wallet_proof_refuses_a_claim(start_coordinator, rsa_keys) -> None:
    """With require_wallet_proof, a node without the wallet's signature is refused, naming
    the policy and the fix; a proof for another wallet or node fails verification (400)."""
    running = start_coordinator(sybil=SybilPolicy(max_nodes_per_wallet=2,
                                                  require_wallet_proof=True))  # fmt: skip
    owner, stranger = Secp256k1Key.generate(), Secp256k1Key.generate()
    claim = make_node(rsa_keys, 0, wallet=owner.address)
    r = _post(running, claim.manifest(issued_at=int(START)))
    assert r.status_code == 403
    assert "require_wallet_proof=true" in r.json()["error"]
    assert "nodeclient wallet-proof" in r.json()["error"]
    forged = mf.sign_wallet_proof(stranger, claim.node_id, issued_at=int(START), chain_id=CHAIN)
    r = _post(running, claim.manifest(issued_at=int(START), wallet_proof=forged))
    assert r.status_code == 400
    assert r.json()["error"].startswith("wallet_proof: WalletBinding signature recovers to")
    r = _post(running, _proven(claim, owner, int(START)))
    assert r.status_code == 201
    assert r.json()["policy"] == {"max_nodes_per_wallet": 2, "require_wallet_proof": True}


def test_client_turns_errors_into_one_line(coordinator: Running, rsa_keys) -> None:
    """CoordinatorClient raises RemoteProtocolError carrying the coordinator's reason."""
    node = make_node(rsa_keys, 0)
    manifest = node.manifest(issued_at=int(START) - 2 * 24 * 3600)
    with pytest.raises(RemoteProtocolError, match="409 issued_at: manifest is"):
        coordinator.client.register(manifest)


def _unstake_body(node_key: Secp256k1Key, node_id: str, requested_at: int) -> tuple[dict, str]:
    msg = {"node_id": node_id, "requested_at": requested_at}
    sig = eip712.sign_typed(node_key, "Unstake", msg, chain_id=CHAIN)
    return msg, "0x" + sig.hex()


def test_unstake_sets_cooldown_idempotently(coordinator: Running, rsa_keys) -> None:
    """A signed Unstake records now + 7 days; a second one keeps the first end time."""
    node = make_node(rsa_keys, 0)
    coordinator.register(node)
    msg, sig = _unstake_body(node.node_key, node.node_id, int(START))
    first = coordinator.client.unstake(node.node_id, msg, sig)
    assert first == {"node_id": node.node_id, "unstaking_until": int(START) + UNSTAKE_COOLDOWN_S}
    coordinator.clock.advance(100)
    msg2, sig2 = _unstake_body(node.node_key, node.node_id, int(START) + 100)
    assert coordinator.client.unstake(node.node_id, msg2, sig2) == first
    assert coordinator.client.node(node.node_id)["unstaking_until"] == first["unstaking_until"]


def test_unstake_signed_by_liveness_key_is_refused(coordinator: Running, rsa_keys) -> None:
    """Only node.key may unstake: a liveness-key signature is 403 and records nothing."""
    node = make_node(rsa_keys, 0)
    coordinator.register(node)
    msg, sig = _unstake_body(node.liveness, node.node_id, int(START))
    with pytest.raises(RemoteProtocolError, match="403"):
        coordinator.client.unstake(node.node_id, msg, sig)
    assert coordinator.client.node(node.node_id)["unstaking_until"] is None


def test_unstake_with_stale_requested_at_is_refused(coordinator: Running, rsa_keys) -> None:
    """requested_at more than 300 s from the coordinator's clock is refused (replay guard)."""
    node = make_node(rsa_keys, 0)
    coordinator.register(node)
    msg, sig = _unstake_body(node.node_key, node.node_id, int(START) - 301)
    with pytest.raises(RemoteProtocolError, match="requested_at"):
        coordinator.client.unstake(node.node_id, msg, sig)


def test_healthz_and_openapi(coordinator: Running) -> None:
    """/healthz answers and the OpenAPI document lists the job routes."""
    assert coordinator.client.health()["status"] == "ok"
    spec = httpx.get(coordinator.url + "/openapi.json").json()
    assert "/v1/jobs" in spec["paths"]
    assert "/v1/nodes/{node_id}/unstake" in spec["paths"]


def test_a_node_gone_past_the_retention_is_forgotten_and_can_register_again(
    start_coordinator, rsa_keys
) -> None:
    """At the hourly sweep (here every 50 ms), a node not seen for --node-retention-days
    is deleted: GET answers 404, its wallet's place is free. Back, it registers anew."""
    running = start_coordinator(blob_sweep_interval=0.05, node_retention=30 * 86400.0)
    node, other = make_node(rsa_keys, 0), make_node(rsa_keys, 1)  # one wallet
    running.register(node)
    running.clock.advance(31 * 86400)
    end = time.monotonic() + 10
    while node.node_id in running.coord.nodes:
        assert time.monotonic() < end, "the node was not forgotten"
        time.sleep(0.02)
    assert node.node_id not in running.coord.runtime
    assert httpx.get(f"{running.url}/v1/nodes/{node.node_id}").status_code == 404
    assert running.register(other)["prior_registrations"] == []
    again = running.register(node)
    assert again["status"] == "registered"
    assert [p["node_id"] for p in again["prior_registrations"]] == [other.node_id]
    assert running.link(node)["type"] == "welcome"


def test_a_node_is_forgotten_only_once_its_manifests_cannot_be_registered(
    start_coordinator, rsa_keys
) -> None:
    """Its row is what refuses a node's older manifests as stale: forgotten after a
    short retention (1 h) while they were still young enough to register, the manifest
    from before its liveness key rotation (public at GET /v1/manifests) registered as
    new, and its old key linked. The row stays until the registered manifest is past
    --manifest-max-age (24 h), and by then every older one is refused as too old."""
    running = start_coordinator(blob_sweep_interval=0.05, node_retention=3600.0)
    node, witness = make_node(rsa_keys, 0), make_node(rsa_keys, 1)
    before_rotation = node.manifest(issued_at=int(START))
    assert _post(running, before_rotation).status_code == 201
    # A node whose manifest is nearly a day old: forgotten at the first sweep after the
    # clock moves, which shows that a sweep ran.
    assert _post(running, witness.manifest(issued_at=int(START) - 23 * 3600)).status_code == 201
    node.liveness = Secp256k1Key.generate()
    running.clock.advance(60)
    assert running.register(node)["status"] == "updated"
    running.clock.advance(2 * 3600)
    end = time.monotonic() + 10
    while witness.node_id in running.coord.nodes:
        assert time.monotonic() < end, "no sweep forgot the witness"
        time.sleep(0.02)
    assert node.node_id in running.coord.nodes
    replay = _post(running, before_rotation)
    assert replay.status_code == 409 and replay.json()["error"].startswith("stale manifest")
    running.clock.advance(23 * 3600)
    end = time.monotonic() + 10
    while node.node_id in running.coord.nodes:
        assert time.monotonic() < end, "the node was not forgotten"
        time.sleep(0.02)
    replay = _post(running, before_rotation)
    assert replay.status_code == 409 and "old (max 86400" in replay.json()["error"]


def test_a_node_that_never_linked_is_forgotten_after_a_day(start_coordinator, rsa_keys) -> None:
    """Registration takes no token: a registration never followed by a link is dropped a
    day later, not held (in memory too) for the whole --node-retention-days; a node that
    did work stays for that, and one registered since stays too."""
    running = start_coordinator(blob_sweep_interval=0.05, node_retention=30 * 86400.0)
    idle, linked = make_node(rsa_keys, 0), make_node(rsa_keys, 1)
    late = make_node(rsa_keys, 2, wallet="0x" + "22" * 20)  # the first wallet holds two
    running.register(idle)
    running.register(linked)
    assert running.link(linked)["type"] == "welcome"
    run_inference_job(running, linked, [1.0, 2.0])
    running.clock.advance(20 * 3600)
    running.register(late)
    running.clock.advance(5 * 3600)  # idle: 25 h, late: 5 h, linked: 25 h but it worked
    end = time.monotonic() + 10
    while idle.node_id in running.coord.nodes:
        assert time.monotonic() < end, "the node that never linked was not forgotten"
        time.sleep(0.02)
    assert httpx.get(f"{running.url}/v1/nodes/{idle.node_id}").status_code == 404
    time.sleep(0.2)  # a few more sweeps
    for kept in (linked, late):
        assert httpx.get(f"{running.url}/v1/nodes/{kept.node_id}").status_code == 200
    assert running.register(idle)["status"] == "registered"  # back: registered anew
    assert httpx.get(f"{running.url}/v1/nodes/{idle.node_id}").status_code == 200


def test_a_node_that_linked_and_never_worked_is_forgotten_a_day_after_it_was_seen(
    start_coordinator, rsa_keys
) -> None:
    """A link is one handshake: a node that linked (and beat) but has no accepted result
    on record is forgotten a day after it was last seen, not held, in memory too, for the
    whole --node-retention-days; one that did work is kept for that."""
    running = start_coordinator(blob_sweep_interval=0.05, node_retention=30 * 86400.0)
    idle = make_node(rsa_keys, 0, wallet=Secp256k1Key.generate().address)
    worker = make_node(rsa_keys, 1, wallet=Secp256k1Key.generate().address)
    for node in (idle, worker):
        running.register(node)
        running.link(node)
    # (its heartbeat says UNSTAKING: no dispatch, so the job is the other node's)
    assert idle.call(idle.heartbeat(state="UNSTAKING"))["type"] == "heartbeat_ack"
    run_inference_job(running, worker, [1.0, 2.0])
    for node in (idle, worker):
        assert node.ws is not None
        node.ws.close()
    running.clock.advance(25 * 3600)
    end = time.monotonic() + 10
    while idle.node_id in running.coord.nodes:
        assert time.monotonic() < end, "the node that never worked was not forgotten"
        time.sleep(0.02)
    time.sleep(0.2)  # a few more sweeps
    assert httpx.get(f"{running.url}/v1/nodes/{worker.node_id}").status_code == 200
    assert idle.node_id not in running.coord.runtime


def test_the_node_list_comes_in_pages(coordinator: Running, rsa_keys) -> None:
    """GET /v1/nodes is paged as GET /v1/jobs is (?limit=, a Link to the next page, in the
    order the nodes registered): one request no longer builds the whole node table. The
    client follows the pages; a cursor that is not one is a 400."""
    nodes = [make_node(rsa_keys, i, wallet=Secp256k1Key.generate().address) for i in range(3)]
    for node in nodes:
        coordinator.register(node)
    whole = [n["node_id"] for n in coordinator.client.nodes()]
    assert sorted(whole) == sorted(n.node_id for n in nodes)
    first = httpx.get(coordinator.url + "/v1/nodes?limit=2", timeout=10)
    assert [n["node_id"] for n in first.json()] == whole[:2]
    nxt = first.links["next"]["url"]
    assert nxt.startswith("/v1/nodes?limit=2&after=")
    second = httpx.get(coordinator.url + nxt, timeout=10)
    assert [n["node_id"] for n in second.json()] == whole[2:]
    assert "next" not in second.links
    assert [n["node_id"] for n in coordinator.client.nodes(page=1)] == whole
    for bad in ("x", "1.0,not-an-address", "nan," + whole[0], "1.0"):
        answer = httpx.get(coordinator.url + "/v1/nodes", params={"after": bad}, timeout=10)
        assert answer.status_code == 400, (bad, answer.text)
    assert httpx.get(coordinator.url + "/v1/nodes?limit=0", timeout=10).status_code in (400, 422)
