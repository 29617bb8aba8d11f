"""2.3.6 Proof-of-Execution: SHA-256(task_id || result || node_id).

``task_id`` is the 16 raw bytes of the task's UUID and ``node_id`` the 20 raw bytes of the
node's address. Both are fixed-width, so the concatenation is unambiguous: no two
different (task, result, node) triples hash the same bytes. The result is hashed in one
streaming pass, so a result of any size costs one read and constant memory.
"""

from __future__ import annotations

import hashlib
import io
import mmap
import os
import stat
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
    """The proof and byte count of a result read from *stream* until EOF, in one pass.

    A regular file is hashed through mmap, so its bytes are never copied and hashing
    runs at hashlib's own speed; anything else is read in 1 MiB chunks into one reused
    buffer.
    """
    h = ProofHasher(task_id=task_id, node_id=node_id)
    try:
        fd = stream.fileno()
        size = os.fstat(fd).st_size - stream.tell()
    except (OSError, AttributeError, io.UnsupportedOperation):
        size = -1
    if size > 0 and stat.S_ISREG(os.fstat(fd).st_mode):
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mm, memoryview(mm) as view:
            h.update(view[stream.tell() :])
        return h.finish(), h.size
    buf = bytearray(_READ_SIZE)
    view = memoryview(buf)
    while True:
        n = stream.readinto(view)  # type: ignore[attr-defined]
        if not n:
            break
        h.update(view[:n])
    return h.finish(), h.size
