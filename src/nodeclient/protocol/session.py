"""The node's side of the link session, without I/O (2.3.3 Coordinator Link).

The daemon's asyncio adapter (node/link.py) feeds it parsed frames and sends what it
returns; tests drive it directly. It owns the handshake rules and the heartbeat
sequence numbers; it never touches a socket or the event loop.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from nodeclient.errors import RemoteProtocolError
from nodeclient.protocol import eip712, messages
from nodeclient.protocol.secp import Secp256k1Key
from nodeclient.protocol.states import NodeState


class CoordinatorMismatch(RemoteProtocolError):
    """The link's challenge names a coordinator other than the one registered with."""


class NodeSession:
    """Handshake and heartbeat state of one node across reconnects."""

    def __init__(
        self,
        *,
        node_id: str,
        liveness_key: Secp256k1Key,
        chain_id: int,
        clock: Callable[[], float],
        seq: int = 0,
    ) -> None:
        self.node_id = node_id
        self._liveness = liveness_key
        self.chain_id = chain_id
        self._clock = clock
        self.seq = seq
        self.authenticated = False
        self.coordinator_id: str | None = None
        self.heartbeat_interval: float | None = None
        self.unstaking_until: int | None = None
        self.binary = False  # the coordinator takes data frames as binary (welcome)
        # The coordinator_id the registration answer named: a challenge must name it too.
        self.registered_with: str | None = None

    def connection_lost(self) -> None:
        self.authenticated = False
        self.binary = False

    def on_challenge(self, challenge: messages.Challenge) -> dict[str, Any]:
        """Answer the coordinator's nonce with a LinkAuth signed by the liveness key."""
        if self.authenticated:
            raise RemoteProtocolError("challenge after the link was authenticated")
        if challenge.chain_id != self.chain_id:
            # Fail closed: never sign for a domain other than the configured one.
            raise RemoteProtocolError(
                f"coordinator chain_id {challenge.chain_id} != configured {self.chain_id}"
            )
        if self.registered_with is not None and challenge.coordinator_id != self.registered_with:
            # A LinkAuth names the coordinator it is for: signing one for another would let
            # the coordinator this node registered with relay it there (and the node's work).
            raise CoordinatorMismatch(
                f"the link's challenge comes from coordinator {challenge.coordinator_id!r}, "
                f"but this node registered with {self.registered_with!r}"
            )
        self.coordinator_id = challenge.coordinator_id
        self.heartbeat_interval = challenge.heartbeat_interval
        msg = {
            "node_id": self.node_id,
            "coordinator_id": challenge.coordinator_id,
            "nonce": challenge.nonce,
            "issued_at": int(self._clock()),
        }
        sig = eip712.sign_typed(self._liveness, "LinkAuth", msg, chain_id=self.chain_id)
        return {**messages.signed_frame("auth", msg, sig), "features": list(messages.FEATURES)}

    def on_welcome(self, welcome: messages.Welcome) -> None:
        if welcome.node_id.lower() != self.node_id.lower():
            raise RemoteProtocolError("welcome names another node")
        self.authenticated = True
        # Continue above whatever the coordinator saw, so a restarted node is never "replayed".
        self.seq = max(self.seq, welcome.last_seq)
        self.unstaking_until = welcome.unstaking_until
        self.binary = messages.BINARY_DATA in welcome.features  # results as binary frames

    def on_heartbeat_ack(self, ack: messages.HeartbeatAck) -> None:
        if ack.unstaking_until is not None:
            self.unstaking_until = ack.unstaking_until

    def heartbeat(
        self, *, state: NodeState, running: Sequence[uuid.UUID], load_permille: int
    ) -> dict[str, Any]:
        """The next signed heartbeat; the sequence number only ever grows."""
        if not self.authenticated:
            raise RemoteProtocolError("heartbeat before the link is authenticated")
        self.seq += 1
        msg = {
            "node_id": self.node_id,
            "seq": self.seq,
            "state": state.value,
            "running_tasks": [t.bytes for t in running],
            "load_permille": max(0, min(load_permille, 1_000_000)),
            "sent_at": int(self._clock()),
        }
        sig = eip712.sign_typed(self._liveness, "Heartbeat", msg, chain_id=self.chain_id)
        return messages.signed_frame("heartbeat", msg, sig, running=len(running))


def backoff(*, base: float = 0.5, cap: float = 60.0, rand: Callable[[], float]) -> Iterator[float]:
    """Exponential backoff with full jitter, capped: a plain generator tests can step."""
    attempt = 0
    while True:
        yield rand() * min(cap, base * (2**attempt))
        attempt = min(attempt + 1, 30)
