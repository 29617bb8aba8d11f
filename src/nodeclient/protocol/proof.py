"""2.3.6 Proof-of-Execution: SHA-256(task_id || result || node_id).

``task_id`` is the 16 raw bytes of the task's UUID and ``node_id`` the 20 raw bytes of the
node's address. Both are fixed-width, so the concatenation is unambiguous: no two
different (task, result, node) triples hash the same bytes. The result is hashed in one
streaming pass, so a result of any size costs one read and constant memory.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import BinaryIO, Final

from nodeclient.protocol.secp import parse_address

_READ_SIZE: Final = 1 << 20


class ProofHasher:
    """Incremental proof computation: feed the result as it is produced, then finish."""

    __slots__ = ("_h", "_node", "size")

    def __init__(self, *, task_id: uuid.UUID, node_id: str) -> None:
        self._node = parse_address(node_id, field="node_id")
        self._h = hashlib.sha256(task_id.bytes)
        self.size = 0

    def update(self, chunk: bytes | bytearray | memoryview) -> None:
        self._h.update(chunk)
        self.size += len(chunk)

    def finish(self) -> bytes:
        """The 32-byte proof; the hasher must not be used afterwards."""
        self._h.update(self._node)
        return self._h.digest()


def proof_of_execution(*, task_id: uuid.UUID, result: bytes, node_id: str) -> bytes:
    """The 32-byte proof for an in-memory result."""
    h = ProofHasher(task_id=task_id, node_id=node_id)
    h.update(result)
    return h.finish()


def proof_of_stream(*, task_id: uuid.UUID, stream: BinaryIO, node_id: str) -> tuple[bytes, int]:
    """The proof and byte count of a result read from *stream* until EOF, in one pass."""
    h = ProofHasher(task_id=task_id, node_id=node_id)
    buf = bytearray(_READ_SIZE)
    view = memoryview(buf)
    while True:
        n = stream.readinto(view)  # type: ignore[attr-defined]
        if not n:
            break
        h.update(view[:n])
    return h.finish(), h.size
