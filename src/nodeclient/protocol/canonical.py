"""Canonical JSON (RFC 8785, JCS) and the small hashing helpers every signature is built on.

Signatures in this protocol never cover "some JSON": they cover the JCS bytes of a value,
so the signer and any verifier derive identical bytes from the same object, whatever
key order or whitespace travelled on the wire.
"""

from __future__ import annotations

import hashlib
from typing import Any

import rfc8785

from nodeclient.errors import RemoteProtocolError


def canonical_json(value: Any) -> bytes:
    """Return the RFC 8785 canonical UTF-8 bytes of *value*.

    Raises RemoteProtocolError for values JCS cannot represent (NaN, floats out of the
    IEEE range, integers beyond 2**53, non-string keys, nesting past the recursion limit).
    """
    try:
        return bytes(rfc8785.dumps(value))
    except (rfc8785.CanonicalizationError, TypeError, ValueError, RecursionError) as exc:
        raise RemoteProtocolError(f"value cannot be canonicalized (RFC 8785): {exc}") from exc


def sha256(data: bytes) -> bytes:
    """SHA-256 digest of *data*."""
    return hashlib.sha256(data).digest()
