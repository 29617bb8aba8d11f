"""Content addresses, as both sides write and check them: a SHA-256 is 64 lowercase hex
digits (``hashlib``'s ``hexdigest()``: one spelling, so cache keys and file names are
unique), and the coordinator's blob store serves the bytes of each at
``/v1/blobs/<sha256>``. Match with ``fullmatch``: ``$`` would let a trailing newline in."""

from __future__ import annotations

import re
from typing import Final

SHA256_HEX: Final = re.compile(r"[0-9a-f]{64}")
BLOB_URL: Final = re.compile(r"/v1/blobs/([0-9a-f]{64})")  # group 1: the SHA-256


def blob_url(sha256: str) -> str:
    """Where the coordinator's blob store serves the bytes whose SHA-256 is *sha256*."""
    return f"/v1/blobs/{sha256}"
