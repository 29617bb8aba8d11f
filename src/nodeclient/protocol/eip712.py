"""EIP-712 typed structured data: the one signing scheme of the protocol (2.3.2, 2.3.3, 2.3.7).

Every signed protocol message is an EIP-712 struct under one domain
``{name: "nodeclient", version: "1", chainId}``. We hash with our own encoder (keccak-256
in C, type hashes precomputed) and sign with libsecp256k1 through coincurve; the test
suite cross-checks every struct against eth-account's independent ``encode_typed_data``.
Any message can be exported as standard ``eth_signTypedData_v4`` JSON, so a stranger can
verify it with a stock Ethereum library.

Structs and who signs them:

============  ==============  ==================================================
struct        signed by       purpose
============  ==============  ==================================================
Registration  node.key        binds manifest hash, wallet and liveness delegation
LinkAuth      liveness.key    answers the coordinator's nonce when a link opens
Heartbeat     liveness.key    every 30 s: sequence number, state, tasks, load
Result        node.key        2.3.7 signed return: task, node, proof, size
Reject        node.key        a dispatched task that will not run, with reason
Unstake       node.key        starts the 7-day cooldown
WalletBinding the wallet      the wallet owner names a node as theirs (optional)
============  ==============  ==================================================

Only atomic field types and one-dimensional arrays of them are used (no nested
structs), which keeps the encoder small and auditable.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from nodeclient.errors import LocalProtocolError, SignatureError
from nodeclient.protocol.secp import (
    Secp256k1Key,
    keccak256,
    parse_address,
    recover_address,
    strict_fromhex,
    to_checksum_address,
)

DOMAIN_NAME: Final = "nodeclient"
DOMAIN_VERSION: Final = "1"
DEVNET_CHAIN_ID: Final = 31337  # the conventional local-devnet chain id (Anvil, Hardhat)

# The protocol's typed structs. Field order is part of the protocol.
TYPES: Final[Mapping[str, tuple[tuple[str, str], ...]]] = {
    "Registration": (
        ("node_id", "address"),
        ("wallet_address", "address"),
        ("liveness_address", "address"),
        ("manifest_hash", "bytes32"),
        ("issued_at", "uint64"),
    ),
    "LinkAuth": (
        ("node_id", "address"),
        ("coordinator_id", "string"),
        ("nonce", "bytes32"),
        ("issued_at", "uint64"),
    ),
    "Heartbeat": (
        ("node_id", "address"),
        ("seq", "uint64"),
        ("state", "string"),
        ("running_tasks", "bytes16[]"),
        ("load_permille", "uint32"),
        ("sent_at", "uint64"),
    ),
    "Result": (
        ("task_id", "bytes16"),
        ("job_id", "bytes16"),
        ("node_id", "address"),
        ("proof", "bytes32"),
        ("result_size", "uint64"),
        ("completed_at", "uint64"),
    ),
    "Reject": (
        ("task_id", "bytes16"),
        ("node_id", "address"),
        ("reason", "string"),
        ("rejected_at", "uint64"),
    ),
    "Unstake": (
        ("node_id", "address"),
        ("requested_at", "uint64"),
    ),
    "WalletBinding": (
        ("wallet_address", "address"),
        ("node_id", "address"),
        ("issued_at", "uint64"),
    ),
}

_UINT_RE: Final = re.compile(r"^uint(\d+)$")
_BYTES_RE: Final = re.compile(r"^bytes(\d+)$")


def _encode_type(name: str) -> bytes:
    fields = ",".join(f"{t} {n}" for n, t in TYPES[name])
    return f"{name}({fields})".encode()


_TYPE_HASHES: Final = {name: keccak256(_encode_type(name)) for name in TYPES}
_DOMAIN_TYPEHASH: Final = keccak256(b"EIP712Domain(string name,string version,uint256 chainId)")


def domain_separator(chain_id: int) -> bytes:
    """hashStruct(EIP712Domain) for our domain on *chain_id*."""
    return keccak256(
        _DOMAIN_TYPEHASH
        + keccak256(DOMAIN_NAME.encode())
        + keccak256(DOMAIN_VERSION.encode())
        + chain_id.to_bytes(32, "big")
    )


_DOMAIN_CACHE: dict[int, bytes] = {}


def _domain(chain_id: int) -> bytes:
    sep = _DOMAIN_CACHE.get(chain_id)
    if sep is None:
        sep = _DOMAIN_CACHE[chain_id] = domain_separator(chain_id)
    return sep


_Encoder = Callable[[Any, str], bytes]


def _enc_address(value: Any, field: str) -> bytes:
    return b"\x00" * 12 + parse_address(value, field=field)


def _enc_string(value: Any, field: str) -> bytes:
    if not isinstance(value, str):
        raise SignatureError(f"{field} must be a string")
    return keccak256(value.encode("utf-8"))


def _enc_bool(value: Any, field: str) -> bytes:
    if not isinstance(value, bool):
        raise SignatureError(f"{field} must be a boolean")
    return (1 if value else 0).to_bytes(32, "big")


def _enc_uint(bits: int) -> _Encoder:
    limit = 1 << bits

    def enc(value: Any, field: str) -> bytes:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < limit:
            raise SignatureError(f"{field} must be an integer in [0, 2**{bits})")
        return value.to_bytes(32, "big")

    return enc


def _enc_bytes(size: int) -> _Encoder:
    pad = b"\x00" * (32 - size)

    def enc(value: Any, field: str) -> bytes:
        if not isinstance(value, bytes) or len(value) != size:
            raise SignatureError(f"{field} must be {size} bytes")
        return value + pad

    return enc


def _enc_array(item: _Encoder) -> _Encoder:
    def enc(value: Any, field: str) -> bytes:
        if not isinstance(value, list | tuple):
            raise SignatureError(f"{field} must be a list")
        return keccak256(b"".join(item(v, field) for v in value))

    return enc


def _encoder_for(kind: str) -> _Encoder:
    """The 32-byte EIP-712 encoder of one field type; each validates its value."""
    if kind.endswith("[]"):
        return _enc_array(_encoder_for(kind[:-2]))
    if kind == "address":
        return _enc_address
    if kind == "string":
        return _enc_string
    if kind == "bool":
        return _enc_bool
    if m := _UINT_RE.match(kind):
        return _enc_uint(int(m.group(1)))
    if m := _BYTES_RE.match(kind):
        return _enc_bytes(int(m.group(1)))
    raise LocalProtocolError(f"unsupported EIP-712 type {kind}")  # a bug in TYPES


# Encoders resolved once per struct, so signing on the per-task path does no type parsing.
_ENCODERS: Final = {
    name: tuple((field, _encoder_for(kind)) for field, kind in fields)
    for name, fields in TYPES.items()
}


def hash_struct(primary_type: str, message: Mapping[str, Any]) -> bytes:
    """hashStruct(message) for one of our TYPES; fields are validated as they are encoded."""
    try:
        encoders = _ENCODERS[primary_type]
    except KeyError:
        raise SignatureError(f"unknown struct type {primary_type!r}") from None
    if len(message) != len(encoders):
        raise SignatureError(f"{primary_type} has fields {[n for n, _ in encoders]}")
    parts = [_TYPE_HASHES[primary_type]]
    for name, enc in encoders:
        try:
            value = message[name]
        except KeyError:
            raise SignatureError(f"{primary_type} lacks field {name}") from None
        parts.append(enc(value, name))
    return keccak256(b"".join(parts))


def signing_digest(primary_type: str, message: Mapping[str, Any], *, chain_id: int) -> bytes:
    """keccak256(0x19 0x01 || domainSeparator || hashStruct(message)): what is signed."""
    return keccak256(b"\x19\x01" + _domain(chain_id) + hash_struct(primary_type, message))


def sign_typed(
    key: Secp256k1Key, primary_type: str, message: Mapping[str, Any], *, chain_id: int
) -> bytes:
    """Sign a struct; returns the 65-byte r || s || v signature."""
    return key.sign_digest(signing_digest(primary_type, message, chain_id=chain_id))


def recover_typed(
    primary_type: str, message: Mapping[str, Any], signature: bytes, *, chain_id: int
) -> str:
    """The checksummed address that signed *message*; raises SignatureError if unrecoverable."""
    return recover_address(signing_digest(primary_type, message, chain_id=chain_id), signature)


def recover_struct_hash(struct_hash: bytes, signature: bytes, *, chain_id: int) -> str:
    """:func:`recover_typed` from an already computed ``hash_struct`` of the message."""
    return recover_address(keccak256(b"\x19\x01" + _domain(chain_id) + struct_hash), signature)


def verify_typed(
    primary_type: str,
    message: Mapping[str, Any],
    signature: bytes,
    *,
    signer: str,
    chain_id: int,
) -> None:
    """Raise SignatureError unless *signature* over *message* recovers to *signer*."""
    recovered = recover_typed(primary_type, message, signature, chain_id=chain_id)
    if recovered != to_checksum_address(parse_address(signer, field="signer")):
        raise SignatureError(f"{primary_type} signature recovers to {recovered}, expected {signer}")


def _json_value(kind: str, value: Any) -> Any:
    if kind.endswith("[]"):
        return [_json_value(kind[:-2], v) for v in value]
    if isinstance(value, bytes):
        return "0x" + value.hex()
    return value


def typed_data_json(
    primary_type: str, message: Mapping[str, Any], *, chain_id: int
) -> dict[str, Any]:
    """The eth_signTypedData_v4 JSON of a message: verifiable with any Ethereum library."""
    fields = TYPES[primary_type]
    return {
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "version", "type": "string"},
                {"name": "chainId", "type": "uint256"},
            ],
            primary_type: [{"name": n, "type": t} for n, t in fields],
        },
        "primaryType": primary_type,
        "domain": {"name": DOMAIN_NAME, "version": DOMAIN_VERSION, "chainId": chain_id},
        "message": message_to_json(primary_type, message),
    }


def message_to_json(primary_type: str, message: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON form of a message: bytesN as 0x-hex, everything else as is."""
    return {n: _json_value(t, message[n]) for n, t in TYPES[primary_type]}


def message_from_json(primary_type: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of typed_data_json's message part: 0x-hex strings back to bytes for bytesN."""
    try:
        fields = TYPES[primary_type]
    except KeyError:
        raise SignatureError(f"unknown struct type {primary_type!r}") from None
    out: dict[str, Any] = {}
    for name, kind in fields:
        if name not in data:
            raise SignatureError(f"{primary_type} lacks field {name}")
        out[name] = _from_json(kind, data[name], name)
    if len(data) != len(fields):
        raise SignatureError(f"{primary_type} has unexpected fields")
    return out


def _from_json(kind: str, value: Any, field: str) -> Any:
    if kind.endswith("[]"):
        if not isinstance(value, list):
            raise SignatureError(f"{field} must be a list")
        return [_from_json(kind[:-2], v, field) for v in value]
    if _BYTES_RE.match(kind):
        if not isinstance(value, str) or not value.startswith("0x"):
            raise SignatureError(f"{field} must be 0x-prefixed hex")
        try:
            return strict_fromhex(value[2:])
        except ValueError as exc:
            raise SignatureError(f"{field} must be 0x-prefixed hex") from exc
    return value


__all__: Sequence[str] = (
    "DEVNET_CHAIN_ID",
    "TYPES",
    "domain_separator",
    "hash_struct",
    "message_from_json",
    "message_to_json",
    "recover_typed",
    "sign_typed",
    "signing_digest",
    "typed_data_json",
    "verify_typed",
)
