"""Node registration with the sybil pre-screen, and unstaking (2.3.2, 2.3.8).

2.3.2: "The coordinator verifies the signature against the declared public key and
checks the wallet for prior registrations (sybil pre-screen)." The manifest check is
``manifest.verify_manifest`` (schema, both signatures, recomputed tier, freshness). The
pre-screen looks up every other node registered by the same wallet and applies the
configured :class:`~nodeclient.coordinator.config.SybilPolicy`; a node whose unstake
cooldown has ended does not count toward the wallet's limit, and a node that proves its
wallet (the manifest's ``wallet_proof``, kept in ``wallet_proofs``) counts only the
wallet's other proven nodes. A re-registration of a
node_id already on record is an update (that is how a node rotates its liveness key),
never a new node, but it must not be older than the manifest on record.

Each outcome is a :class:`Reply` (HTTP status and JSON body), so the HTTP layer only
serialises; the decisions are made here, each in one SQL transaction.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import select
from sqlalchemy.orm import Session

from nodeclient.coordinator import models as m
from nodeclient.coordinator import store
from nodeclient.coordinator.config import UNSTAKE_MAX_SKEW_S, SybilPolicy
from nodeclient.coordinator.service import Coordinator
from nodeclient.coordinator.store import NodeInfo, node_info
from nodeclient.errors import ManifestClockError, ManifestError, SignatureError
from nodeclient.protocol import eip712
from nodeclient.protocol.manifest import VerifiedManifest, verify_manifest
from nodeclient.protocol.secp import parse_address, parse_signature_hex, to_checksum_address
from nodeclient.protocol.states import UNSTAKE_COOLDOWN_S

log = logging.getLogger("nodeclient.coordinator.registry")
_FORGET_BATCH = 500  # nodes (or manifests) deleted a transaction (store.forget_nodes_tx)
# A node with no accepted result on record (registered and never linked, or linked and
# never worked), neither seen nor registered for a day: forgotten then.
UNLINKED_RETENTION_S = 86400.0
MANIFEST_GRACE_S: Final = 3600.0  # a manifest replaced is kept at least this long


@dataclass(frozen=True, slots=True)
class Reply:
    """An HTTP status and JSON body decided by the domain logic."""

    status: int
    body: dict[str, Any]
    node: NodeInfo | None = None


UNCHANGED: Final = "unchanged"  # a registration of the manifest already registered
# 4001 on a live link whose liveness key a registration replaced (a node daemon that
# gets it takes it for another process with its node key: node/link.py ROTATED_REASON).
ROTATED_CLOSE_REASON: Final = "liveness key rotated: authenticate again with the new key"


def _error(status: int, message: str) -> Reply:
    return Reply(status, {"error": message})


def _register_tx(
    session: Session, v: VerifiedManifest, *, now: float, policy: SybilPolicy
) -> Reply:
    row = session.get(m.Node, v.node_id)
    if row is not None and v.issued_at < row.issued_at:
        return _error(
            409,
            f"stale manifest: issued_at {v.issued_at} is older than the registered "
            f"manifest's issued_at {row.issued_at}",
        )
    if (
        row is not None
        and v.issued_at == row.issued_at
        and v.liveness_address != row.liveness_address
    ):
        # Else the manifest a rotation replaced, signed in the same second (and public at
        # GET /v1/manifests), would put the old liveness key back for anyone who sent it.
        return _error(
            409,
            f"stale manifest: issued_at {v.issued_at} is the registered manifest's, which "
            "names another liveness key; a new key needs a manifest issued later",
        )
    if (
        row is not None
        and row.wallet_address != v.wallet_address
        and row.unstaking_until is not None
        and row.unstaking_until >= now
    ):
        # It holds one of its wallet's places until its cooldown ends: moved to another
        # wallet now, it would hand that place back at once for a new node to take.
        return _error(
            403,
            f"sybil pre-screen: node {v.node_id} is unstaking until {row.unstaking_until} "
            f"and holds a place of wallet {row.wallet_address} until then (policy "
            f"max_nodes_per_wallet={policy.max_nodes_per_wallet}); it cannot move to "
            f"wallet {v.wallet_address} before its cooldown ends",
        )
    others = list(
        session.scalars(
            select(m.Node)
            .where(m.Node.wallet_address == v.wallet_address, m.Node.node_id != v.node_id)
            .order_by(m.Node.registered_at, m.Node.node_id)
        )
    )
    if policy.require_wallet_proof and not v.wallet_proven:
        return _error(
            403,
            f"sybil pre-screen: the manifest carries no wallet_proof for wallet "
            f"{v.wallet_address} (policy require_wallet_proof=true); have the wallet sign "
            "this node's binding with `nodeclient wallet-proof`, then register again",
        )
    proven = (
        set(
            session.scalars(
                select(m.WalletProof.node_id).where(
                    m.WalletProof.wallet_address == v.wallet_address
                )
            )
        )
        if others  # the usual first node of a wallet: nothing to count, no query
        else set()
    )
    # A node whose unstake cooldown has ended is retired: it no longer holds one of the
    # wallet's places (it is still listed among the prior registrations). A node that
    # proves its wallet counts only the wallet's proven nodes: a mere claim on a wallet
    # cannot use up its owner's places. (So a wallet holds at most the limit of proven
    # nodes, and claims only while all its nodes together are under it: at most twice the
    # limit in all. --require-wallet-proof makes it the limit exactly.)
    counted = [o for o in others if o.unstaking_until is None or o.unstaking_until >= now]
    if v.wallet_proven:
        counted = [o for o in counted if o.node_id in proven]
    new_to_wallet = row is None or row.wallet_address != v.wallet_address
    # A node of the wallet that proves it now, unproven until now, joins the proven count
    # as much as a new node does: else a wallet's claims, registered first and proven
    # later, would hold twice the limit of proven nodes.
    if v.wallet_proven and not new_to_wallet:
        was = session.get(m.WalletProof, v.node_id)
        newly_proven = was is None or was.wallet_address != v.wallet_address
    else:
        newly_proven = False
    if (new_to_wallet or newly_proven) and len(counted) >= policy.max_nodes_per_wallet:
        which = (
            "nodes proven by its owner"
            if v.wallet_proven
            else "registered nodes (a node with a wallet_proof counts only the wallet's "
            "proven nodes: `nodeclient wallet-proof`)"
        )
        return _error(
            403,
            f"sybil pre-screen: wallet {v.wallet_address} already has {len(counted)} "
            f"{which} (policy max_nodes_per_wallet={policy.max_nodes_per_wallet})",
        )
    man = v.manifest
    fields: dict[str, Any] = {
        "wallet_address": v.wallet_address,
        "liveness_address": v.liveness_address,
        "pubkey_rsa": man["pubkey_rsa"],
        "hardware_tier": man["hardware_tier"],
        "region": man["region"],
        "workload_classes": json.dumps(sorted(man["workload_classes"])),
        "max_parallel_subtasks": man["max_parallel_subtasks"],
        "manifest": json.dumps(dict(man), sort_keys=True),
        "manifest_hash": v.manifest_hash.hex(),
        "issued_at": v.issued_at,
        "updated_at": now,
    }
    new_node = row is None
    _publish_manifest(
        session, v.node_id, fields, was=None if row is None else row.manifest_hash, now=now
    )
    if row is None:
        row = m.Node(node_id=v.node_id, registered_at=now, last_seq=0, **fields)
        session.add(row)
        status, label = 201, "registered"
    elif row.manifest_hash == fields["manifest_hash"]:
        # The registered manifest itself, sent again (a retried request; or anyone, since
        # it is public): nothing changes, not even the time it was last registered.
        status, label = 200, UNCHANGED
    else:
        for key, value in fields.items():
            setattr(row, key, value)
        status, label = 200, "updated"
    session.flush()
    node_proven = _record_wallet_proof(session, v, new_node=new_node)
    body = {
        "node_id": v.node_id,
        "status": label,
        "wallet_proven": node_proven,
        "prior_registrations": [
            {
                "node_id": o.node_id,
                "registered_at": o.registered_at,
                "wallet_proven": o.node_id in proven,
            }
            for o in others
        ],
        "policy": policy.to_json(),
    }
    return Reply(status, body, node_info(row))


def _publish_manifest(
    session: Session, node_id: str, fields: dict[str, Any], *, was: str | None, now: float
) -> None:
    """Keep the manifest *fields* holds in node_manifests (published by its hash), and
    date the end of the node's previous one, *was*, when it is another."""
    digest = fields["manifest_hash"]
    if was is not None and was != digest:
        replaced = session.get(m.NodeManifest, was)
        if replaced is not None:  # kept an hour from now at least (forget_manifests)
            replaced.replaced_at = now
    current = session.get(m.NodeManifest, digest)
    if current is not None:
        current.replaced_at = None  # current (again)
        return
    session.add(
        m.NodeManifest(
            manifest_hash=digest, node_id=node_id, manifest=fields["manifest"], registered_at=now
        )
    )


def _record_wallet_proof(session: Session, v: VerifiedManifest, *, new_node: bool) -> bool:
    """Keep the node's latest wallet_proof; whether the node is proven for its wallet now.

    A re-registration without a proof keeps the one on record while the wallet is the
    same (the wallet's signature of this node still stands): were it dropped, a proven
    node could step out of the proven count by registering once without it, and make
    room for one more proven node, again and again. A new wallet drops it.
    """
    proof = v.manifest.get("wallet_proof") if v.wallet_proven else None
    if new_node and proof is None:
        return False  # a node registered just now has no proof on record
    row = session.get(m.WalletProof, v.node_id)
    if proof is None:
        if row is not None and row.wallet_address != v.wallet_address:
            session.delete(row)
            return False
        return row is not None
    fields = {
        "wallet_address": v.wallet_address,
        "issued_at": proof["issued_at"],
        "signature": proof["signature"],
    }
    if row is None:
        session.add(m.WalletProof(node_id=v.node_id, **fields))
    else:
        for key, value in fields.items():
            setattr(row, key, value)
    return True


async def register(coord: Coordinator, manifest: object) -> Reply:
    """POST /v1/nodes: verify, pre-screen, insert or update."""
    now = coord.now()
    try:
        verified = verify_manifest(
            manifest,
            chain_id=coord.config.chain_id,
            now=int(now),
            max_age=coord.config.manifest_max_age,
        )
    except ManifestError as exc:
        log.info("node.registration_refused", extra={"reason": str(exc)})
        # A clock out of step clears by itself (the node retries 409; 400 is final to it).
        return _error(409 if isinstance(exc, ManifestClockError) else 400, str(exc))
    policy = coord.config.sybil
    reply = await coord.db.run(lambda s: _register_tx(s, verified, now=now, policy=policy))
    if reply.node is None:
        log.info(
            "node.registration_refused",
            extra={"node_id": verified.node_id, "reason": reply.body["error"]},
        )
        return reply
    before = coord.nodes.get(verified.node_id)
    coord.cache_node(reply.node)
    if reply.body["status"] != UNCHANGED:  # a manifest signed anew: a fresh start
        coord.runtime[verified.node_id].draining = False  # it takes work again
    link = coord.links.get(verified.node_id)
    if (
        link is not None
        and before is not None
        and before.liveness_address != reply.node.liveness_address
    ):
        # Authenticated with the key just replaced (perhaps a stolen one): it gets no more
        # work from now, and must authenticate again, with the new key.
        coord.detach(verified.node_id, link)
        reason = ROTATED_CLOSE_REASON
        coord.spawn(link.close(4001, reason), "link.close")
        log.info("link.closed", extra={"node_id": verified.node_id, "reason": reason})
    body = {**reply.body, "coordinator_id": coord.coordinator_id, "chain_id": coord.config.chain_id}
    log.info(
        "node.registered" if reply.status == 201 else "node.updated",
        extra={
            "node_id": verified.node_id,
            "wallet": verified.wallet_address,
            "tier": reply.node.hardware_tier,
            "prior_registrations": len(body["prior_registrations"]),
            "wallet_proven": body["wallet_proven"],
        },
    )
    return Reply(reply.status, body, reply.node)


async def forget_nodes(coord: Coordinator) -> int:
    """Delete the nodes not seen for ``node_retention`` (0: never) that hold no lease, in
    batches, and sooner, after UNLINKED_RETENTION_S, those with no accepted result on
    record: registered and never linked, or linked and never worked (registration takes
    no token, and a link one handshake: a flood of fresh wallets' nodes would otherwise be
    held, in memory too, for the whole retention); how many. A node that comes back
    registers again (its link is refused 4003, and the daemon registers on that), under
    the sybil policy of the day."""
    retention = coord.config.node_retention
    if not retention:
        return 0
    now = coord.now()
    cutoff = now - retention
    unlinked = now - min(retention, UNLINKED_RETENTION_S)
    forgotten, after = 0, ""
    while True:
        # Linked nodes, and those seen since (the database learns of heartbeats in
        # batches: a node that linked a moment ago may have no last_seen there yet), stay
        # whatever their row says.
        # (Within the shorter window: the database's last_seen, in step but for the last
        # few seconds, keeps a node seen since the longer one that did work.)
        keep = set(coord.links)
        keep.update(n for n, rt in coord.runtime.items() if (rt.last_seen or 0) >= unlinked)
        ids, more = await coord.db.run(
            functools.partial(
                store.forget_nodes_tx,
                seen_before=cutoff, keep=keep, limit=_FORGET_BATCH, after=after,
                unlinked_before=unlinked,
                # Its row is what refuses its older manifests (stale): kept until the
                # registered one, and so each older one, is too old to be registered,
                # or one from before a liveness key rotation would register as new.
                issued_before=now - coord.config.manifest_max_age,
            )
        )  # fmt: skip
        for node_id in ids:
            coord.forget_node(node_id)
        forgotten += len(ids)
        if more is None:
            break
        after = more
    if forgotten:
        log.info(
            "nodes.forgotten",
            extra={"nodes": forgotten, "retention_days": round(retention / 86400, 2)},
        )
    return forgotten


async def forget_manifests(coord: Coordinator) -> int:
    """Delete the manifests that no node holds as its current one and no task or lease
    names, in batches; how many. One replaced within the last hour stays: a scheduling
    round may still be placing tasks on the roster it was current in."""
    before = coord.now() - MANIFEST_GRACE_S
    forgotten = 0
    while n := await coord.db.run(
        functools.partial(store.forget_manifests_tx, replaced_before=before, limit=_FORGET_BATCH)
    ):
        forgotten += n
    if forgotten:
        log.info("manifests.forgotten", extra={"manifests": forgotten})
    return forgotten


def _unstake_tx(session: Session, node_id: str, until: int) -> int | None:
    row = session.get(m.Node, node_id)
    if row is None:
        return None
    if row.unstaking_until is None:  # idempotent: a second unstake keeps the first end
        row.unstaking_until = until
    return row.unstaking_until


def _parse_unstake(path_node_id: str, body: object) -> tuple[str, dict[str, Any], bytes]:
    if not isinstance(body, Mapping) or not isinstance(body.get("message"), Mapping):
        raise SignatureError('body must be {"message": {...}, "signature": "0x.."}')
    message = eip712.message_from_json("Unstake", body["message"])
    eip712.hash_struct("Unstake", message)  # type-checks every field
    signature = parse_signature_hex(body.get("signature"))
    node_id = to_checksum_address(parse_address(message["node_id"], field="node_id"))
    path = to_checksum_address(parse_address(path_node_id, field="node_id in the path"))
    if node_id != path:
        raise SignatureError(f"message node_id {node_id} does not match the path's {path}")
    return node_id, message, signature


async def unstake(coord: Coordinator, path_node_id: str, body: object) -> Reply:
    """POST /v1/nodes/{node_id}/unstake: start the 7-day cooldown (2.3.8 UNSTAKING)."""
    try:
        node_id, message, signature = _parse_unstake(path_node_id, body)
    except SignatureError as exc:
        return _error(400, f"unstake: {exc}")
    if node_id not in coord.nodes:
        return _error(404, f"unstake: node {node_id} is not registered")
    now = coord.now()
    skew = message["requested_at"] - now
    if abs(skew) > UNSTAKE_MAX_SKEW_S:
        return _error(
            400,
            f"unstake: requested_at is {skew:+.0f} s from the coordinator's clock "
            f"(allowed +/-{UNSTAKE_MAX_SKEW_S} s)",
        )
    try:
        eip712.verify_typed(
            "Unstake", message, signature, signer=node_id, chain_id=coord.config.chain_id
        )
    except SignatureError as exc:
        return _error(403, f"unstake: {exc}")
    until = int(now) + UNSTAKE_COOLDOWN_S
    recorded = await coord.db.run(lambda s: _unstake_tx(s, node_id, until))
    if recorded is None:
        return _error(404, f"unstake: node {node_id} is not registered")
    coord.set_unstaking(node_id, recorded)
    log.info("node.unstaking", extra={"node_id": node_id, "unstaking_until": recorded})
    return Reply(200, {"node_id": node_id, "unstaking_until": recorded})
