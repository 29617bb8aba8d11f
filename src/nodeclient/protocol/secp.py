"""secp256k1 keys and Ethereum-style recoverable signatures, through libsecp256k1 (coincurve).

A signature is the 65 bytes ``r || s || v`` with ``v`` in {27, 28}, low-s (libsecp256k1
always produces low-s; we also refuse high-s on recovery, as Ethereum does since EIP-2),
which is the form eth-account, ethers and geth produce and accept.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Final

import coincurve
import sha3  # safe-pysha3: keccak-256 in C, ~1 us a call

from nodeclient.errors import KeyFileError, SignatureError

# Half the curve order: signatures with s above it are malleable twins and are refused.
_SECP256K1_N: Final = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_HALF_N: Final = _SECP256K1_N // 2
_ADDRESS_RE: Final = re.compile(r"0x[0-9a-fA-F]{40}")  # fullmatch: "$" allows a final "\n"
_HEX_RE: Final = re.compile(r"(?:[0-9a-fA-F]{2})*")


def strict_fromhex(digits: str) -> bytes:
    """``bytes.fromhex`` without its leniency (it skips whitespace): ValueError unless
    *digits* is an even number of hex digits and nothing else, so one value has one form."""
    if not _HEX_RE.fullmatch(digits):
        raise ValueError("not an even number of hex digits")
    return bytes.fromhex(digits)


def keccak256(data: bytes) -> bytes:
    """Keccak-256 (the pre-standard SHA-3 that Ethereum uses)."""
    return bytes(sha3.keccak_256(data).digest())


def to_checksum_address(raw: bytes) -> str:
    """EIP-55 checksummed hex of a 20-byte address."""
    if len(raw) != 20:
        raise ValueError("an address is 20 bytes")
    hex_addr = raw.hex()
    digest = keccak256(hex_addr.encode("ascii")).hex()
    return "0x" + "".join(
        c.upper() if c.isalpha() and int(digest[i], 16) >= 8 else c for i, c in enumerate(hex_addr)
    )


def parse_address(value: object, *, field: str = "address") -> bytes:
    """Parse a 0x-prefixed 40-hex-digit address into 20 bytes.

    All-lowercase and all-uppercase forms are accepted as carrying no checksum; a
    mixed-case form must carry a valid EIP-55 checksum.
    """
    if not isinstance(value, str) or not _ADDRESS_RE.fullmatch(value):
        raise SignatureError(f"{field} is not a 0x-prefixed 20-byte hex address: {value!r}")
    raw = _checked_address(value)
    if raw is None:
        raise SignatureError(f"{field} has a wrong EIP-55 checksum: {value}")
    return raw


@lru_cache(maxsize=65536)
def _checked_address(value: str) -> bytes | None:
    # Cached: the same few addresses are parsed on every heartbeat and result.
    raw = bytes.fromhex(value[2:])
    body = value[2:]
    if body not in (body.lower(), body.upper()) and to_checksum_address(raw) != value:
        return None
    return raw


def address_of_public_key(public_key: coincurve.PublicKey) -> str:
    """The checksummed Ethereum address of a secp256k1 public key."""
    return to_checksum_address(keccak256(public_key.format(compressed=False)[1:])[-20:])


class Secp256k1Key:
    """A secp256k1 private key that signs 32-byte digests the Ethereum way."""

    __slots__ = ("_key", "address")

    def __init__(self, secret: bytes) -> None:
        if len(secret) != 32:
            raise KeyFileError("a secp256k1 private key is exactly 32 bytes")
        try:
            self._key = coincurve.PrivateKey(secret)
        except ValueError as exc:
            raise KeyFileError(
                "not a valid secp256k1 private key (zero or >= curve order)"
            ) from exc
        self.address: str = address_of_public_key(self._key.public_key)

    @classmethod
    def generate(cls) -> Secp256k1Key:
        """A fresh key from the operating system's CSPRNG (via libsecp256k1's context)."""
        return cls(coincurve.PrivateKey().secret)

    @classmethod
    def from_hex(cls, text: str) -> Secp256k1Key:
        """Parse the 0x-prefixed 64-hex-digit form that geth and eth-account import."""
        body = text.strip()
        if body.startswith(("0x", "0X")):
            body = body[2:]
        if len(body) != 64:
            raise KeyFileError("expected 0x followed by 64 hex digits")
        try:
            return cls(bytes.fromhex(body))
        except ValueError as exc:
            raise KeyFileError("expected 0x followed by 64 hex digits") from exc

    @property
    def secret(self) -> bytes:
        return bytes(self._key.secret)

    def to_hex(self) -> str:
        return "0x" + self._key.secret.hex()

    def sign_digest(self, digest: bytes) -> bytes:
        """Sign a 32-byte digest; return r || s || v (v in {27, 28}), low-s."""
        if len(digest) != 32:
            raise ValueError("digest must be 32 bytes")
        sig = self._key.sign_recoverable(digest, hasher=None)
        return sig[:64] + bytes((sig[64] + 27,))

    def __repr__(self) -> str:  # never print the secret
        return f"Secp256k1Key(address={self.address})"


def recover_address(digest: bytes, signature: bytes) -> str:
    """Recover the checksummed signer address of a 65-byte r || s || v signature.

    Fails closed: malformed lengths, v outside {27, 28}, s = 0 or high-s and
    unrecoverable signatures all raise SignatureError. (v in {0, 1} is the same signature
    in another form: refused, so that one signature has one encoding.)
    """
    if len(digest) != 32:
        raise SignatureError("digest must be 32 bytes")
    if len(signature) != 65:
        raise SignatureError(f"signature must be 65 bytes, got {len(signature)}")
    if signature[64] not in (27, 28):
        raise SignatureError("signature recovery id v must be 27 or 28")
    v = signature[64] - 27
    s = int.from_bytes(signature[32:64], "big")
    r = int.from_bytes(signature[:32], "big")
    if not (0 < r < _SECP256K1_N) or not (0 < s <= _HALF_N):
        raise SignatureError("signature r/s out of range (high-s signatures are refused)")
    try:
        pub = coincurve.PublicKey.from_signature_and_message(
            signature[:64] + bytes((v,)), digest, hasher=None
        )
    except Exception as exc:  # coincurve raises bare Exception on failure
        raise SignatureError("signature does not recover to a public key") from exc
    return address_of_public_key(pub)


def parse_signature_hex(value: object, *, field: str = "signature") -> bytes:
    """Parse a 0x-prefixed 65-byte hex signature."""
    if not isinstance(value, str) or not value.startswith("0x") or len(value) != 132:
        raise SignatureError(f"{field} must be 0x followed by 130 hex digits")
    try:
        return strict_fromhex(value[2:])
    except ValueError as exc:
        raise SignatureError(f"{field} must be 0x followed by 130 hex digits") from exc
