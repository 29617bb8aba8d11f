"""2.3.2 Capability Manifest: build, sign and verify, on both sides.

The manifest carries the seed's fields exactly, plus ``liveness_address``, ``issued_at``
and ``node_signature``. Two signatures cover the same canonical bytes
(RFC 8785 JCS of the manifest without ``signature`` and ``node_signature``):

- ``signature``: RSA-PSS (SHA-256, MGF1-SHA-256, salt 32) by payload.key, proving the
  registrant holds the private half of ``pubkey_rsa`` (the key payloads are sealed to);
  it verifies with ``openssl dgst -sha256 -sigopt rsa_padding_mode:pss
  -sigopt rsa_pss_saltlen:32 -verify``.
- ``node_signature``: EIP-712 ``Registration`` by node.key over node_id, wallet_address,
  liveness_address, SHA-256 of the canonical bytes and issued_at, proving the registrant
  holds node.key and delegates the liveness key.

Optionally, ``wallet_proof`` (``{"issued_at", "signature"}``, covered by both signatures
above): the wallet's own EIP-712 ``WalletBinding`` over wallet_address, node_id and
issued_at, proving that the owner of ``wallet_address`` names this node as theirs. Without
it, ``wallet_address`` is only a claim, which anyone may make about any wallet; the
coordinator's sybil pre-screen counts proven nodes apart (``coordinator/registry.py``).

``verify_manifest`` is the coordinator's complete check; each failure names its check.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Final

import jsonschema
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from nodeclient.errors import (
    ManifestClockError,
    ManifestError,
    NodeClientError,
    RemoteProtocolError,
    SignatureError,
)
from nodeclient.protocol import tier
from nodeclient.protocol.canonical import canonical_json, sha256
from nodeclient.protocol.eip712 import sign_typed, verify_typed
from nodeclient.protocol.secp import (
    Secp256k1Key,
    parse_address,
    parse_signature_hex,
    strict_fromhex,
    to_checksum_address,
)

# Regions a node may declare. Coarse on purpose: a scheduling preference, not a location.
REGIONS: Final = (
    "local",  # devnets and tests
    "us-east", "us-west", "us-central", "ca-central", "sa-east",
    "eu-west", "eu-central", "eu-north", "eu-south",
    "me-central", "af-south",
    "ap-south", "ap-southeast", "ap-northeast", "ap-east", "oc-southeast",
)  # fmt: skip
WORKLOAD_CLASSES: Final = ("ai.inference", "ai.training", "media.render")
MIN_RSA_BITS: Final = 3072
MAX_RSA_BITS: Final = 8192
RSA_EXPONENT: Final = 65537
UNSIGNED_FIELDS: Final = frozenset({"signature", "node_signature"})
_PSS: Final = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)


# How far in the future a manifest's (or its wallet proof's) issued_at may be: clock skew.
MAX_SKEW_S: Final = 300


@cache
def manifest_schema() -> dict[str, Any]:
    """The JSON Schema shipped in the package (protocol/schemas/manifest.schema.json)."""
    text = resources.files("nodeclient.protocol").joinpath("schemas/manifest.schema.json")
    schema: dict[str, Any] = json.loads(text.read_text(encoding="utf-8"))
    return schema


MAX_ARRAY_ITEMS: Final = 16  # the schema's maxItems, for every array it has
MAX_NESTING: Final = 4  # levels of objects and arrays: the schema's deepest is 2 (gpu/0)


def _short_arrays(document: Mapping[str, Any]) -> None:
    """Refuse any array longer than the schema allows, and any object or array nested
    deeper than it allows, before the schema runs: jsonschema checks ``uniqueItems`` even
    past a failed ``maxItems``, comparing every pair of items it cannot sort (objects), so
    6,000 of them in an unauthenticated 64 KiB registration held the coordinator's event
    loop for about half a minute; and it compares nested lists by recursion, so two lists
    300 deep (1.2 KB) ended its check in a RecursionError, not a refusal."""
    todo: list[tuple[str, int, object]] = [("", 0, document)]
    while todo:
        where, depth, value = todo.pop()
        if isinstance(value, Mapping | list) and depth > MAX_NESTING:
            raise ManifestError(
                f"schema: {where.lstrip('/')}: nested deeper than {MAX_NESTING} levels"
            )
        if isinstance(value, Mapping):
            todo.extend((f"{where}/{key}", depth + 1, item) for key, item in value.items())
        elif isinstance(value, list):
            if len(value) > MAX_ARRAY_ITEMS:
                raise ManifestError(
                    f"schema: {where.lstrip('/') or '(root)'}: more than {MAX_ARRAY_ITEMS} items"
                )
            todo.extend((f"{where}/{index}", depth + 1, item) for index, item in enumerate(value))


@cache
def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(manifest_schema())


def signed_bytes(manifest: Mapping[str, Any]) -> bytes:
    """The canonical bytes both signatures cover: JCS of the manifest minus its signatures."""
    return canonical_json({k: v for k, v in manifest.items() if k not in UNSIGNED_FIELDS})


def registration_message(manifest: Mapping[str, Any], body: bytes) -> dict[str, Any]:
    """The EIP-712 Registration struct that node_signature covers."""
    return {
        "node_id": manifest["node_id"],
        "wallet_address": manifest["wallet_address"],
        "liveness_address": manifest["liveness_address"],
        "manifest_hash": sha256(body),
        "issued_at": manifest["issued_at"],
    }


def wallet_binding_message(wallet_address: str, node_id: str, issued_at: int) -> dict[str, Any]:
    """The EIP-712 WalletBinding struct a wallet signs to name *node_id* as its node."""
    return {"wallet_address": wallet_address, "node_id": node_id, "issued_at": issued_at}


def sign_wallet_proof(
    wallet_key: Secp256k1Key, node_id: str, *, issued_at: int, chain_id: int
) -> dict[str, Any]:
    """A manifest's ``wallet_proof``, signed with the wallet's own key."""
    message = wallet_binding_message(wallet_key.address, node_id, issued_at)
    signature = sign_typed(wallet_key, "WalletBinding", message, chain_id=chain_id)
    return {"issued_at": issued_at, "signature": "0x" + signature.hex()}


def check_wallet_proof(
    proof: Mapping[str, Any], *, wallet_address: str, node_id: str, chain_id: int
) -> None:
    """Raise SignatureError unless *proof* is *wallet_address*'s binding of *node_id*.

    The wallet's signature comes from a wallet app, and some give the recovery id as 0 or
    1: taken as 27 or 28 here (earlier releases stored such proofs as given)."""
    signature = parse_signature_hex(proof["signature"], field="wallet_proof signature")
    if signature[64] in (0, 1):
        signature = signature[:64] + bytes((signature[64] + 27,))
    message = wallet_binding_message(wallet_address, node_id, proof["issued_at"])
    verify_typed("WalletBinding", message, signature, signer=wallet_address, chain_id=chain_id)


def public_key_pem(key: rsa.RSAPublicKey) -> str:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def build_manifest(
    *,
    node_key: Secp256k1Key,
    liveness_address: str,
    payload_key: rsa.RSAPrivateKey,
    wallet_address: str,
    region: str,
    cpu: Mapping[str, Any],
    gpu: Sequence[Mapping[str, Any]],
    workload_classes: Sequence[str],
    max_parallel_subtasks: int,
    client_version: str,
    issued_at: int,
    chain_id: int,
    wallet_proof: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Build and sign a manifest. The tier is computed here, never taken from the caller."""
    manifest: dict[str, Any] = {
        "node_id": node_key.address,
        "wallet_address": to_checksum_address(parse_address(wallet_address, field="wallet")),
        "pubkey_rsa": public_key_pem(payload_key.public_key()),
        "hardware_tier": tier.hardware_tier(cpu, gpu),
        "cpu": dict(cpu),
        "gpu": [dict(g) for g in gpu],
        "region": region,
        "workload_classes": sorted(workload_classes),
        "max_parallel_subtasks": max_parallel_subtasks,
        "client_version": client_version,
        "liveness_address": to_checksum_address(parse_address(liveness_address)),
        "issued_at": issued_at,
    }
    if wallet_proof is not None:
        manifest["wallet_proof"] = {
            "issued_at": int(wallet_proof["issued_at"]),
            "signature": str(wallet_proof["signature"]),
        }
    return _signed(manifest, node_key=node_key, payload_key=payload_key, chain_id=chain_id)


def reissue_manifest(
    manifest: Mapping[str, Any],
    *,
    node_key: Secp256k1Key,
    payload_key: rsa.RSAPrivateKey,
    issued_at: int,
    chain_id: int,
) -> dict[str, Any]:
    """The same manifest, issued at *issued_at* and signed again: a daemon registers again
    (after the coordinator lost its record, say) long after the one it built at start
    has passed the coordinator's freshness limit."""
    fresh = {k: v for k, v in manifest.items() if k not in UNSIGNED_FIELDS}
    fresh["issued_at"] = issued_at
    return _signed(fresh, node_key=node_key, payload_key=payload_key, chain_id=chain_id)


def _signed(
    manifest: dict[str, Any],
    *,
    node_key: Secp256k1Key,
    payload_key: rsa.RSAPrivateKey,
    chain_id: int,
) -> dict[str, Any]:
    body = signed_bytes(manifest)
    manifest["signature"] = "0x" + payload_key.sign(body, _PSS, hashes.SHA256()).hex()
    node_sig = sign_typed(
        node_key, "Registration", registration_message(manifest, body), chain_id=chain_id
    )
    manifest["node_signature"] = "0x" + node_sig.hex()
    return manifest


@dataclass(frozen=True, slots=True)
class VerifiedManifest:
    """A manifest that passed every check, with the values the coordinator acts on."""

    manifest: Mapping[str, Any]
    node_id: str
    wallet_address: str
    liveness_address: str
    public_key: rsa.RSAPublicKey
    manifest_hash: bytes
    issued_at: int
    wallet_proven: bool = False  # a valid wallet_proof came with it


def verify_manifest(  # noqa: PLR0912, PLR0915 - one flat list of checks reads best
    manifest: object,
    *,
    chain_id: int,
    now: int,
    max_age: int = 24 * 3600,
    max_skew: int = MAX_SKEW_S,
) -> VerifiedManifest:
    """Verify a manifest completely or raise ManifestError naming the failed check.

    Checks, in order (cheap before expensive, fail closed): schema, region, addresses and
    their checksums, issued_at freshness (not older than *max_age*, not more than
    *max_skew* seconds in the future), RSA public key (RSA, >= 3072 bits), the recomputed
    hardware tier and parallelism bound, the RSA-PSS ``signature``, the EIP-712
    ``node_signature`` recovering to node_id, then, when present, the ``wallet_proof``
    recovering to wallet_address (not issued in the future).
    """
    if not isinstance(manifest, Mapping):
        raise ManifestError("schema: manifest must be a JSON object")
    _short_arrays(manifest)
    errors = sorted(_validator().iter_errors(manifest), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        where = "/".join(str(p) for p in err.absolute_path) or "(root)"
        raise ManifestError(f"schema: {where}: {err.message[:200]}")
    m: Mapping[str, Any] = manifest
    # JSON Schema's "integer" takes 4.0 too; the protocol's integers are JSON integers.
    proof_issued = (m.get("wallet_proof") or {}).get("issued_at", 0)
    for name, value in (
        ("hardware_tier", m["hardware_tier"]),
        ("max_parallel_subtasks", m["max_parallel_subtasks"]),
        ("issued_at", m["issued_at"]),
        ("wallet_proof/issued_at", proof_issued),
    ):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ManifestError(f"schema: {name}: {value!r} is not a JSON integer")
    # The schema's patterns end in "$", which Python's re also matches before a final
    # newline; the other patterned fields are parsed strictly below (addresses, hex).
    version = m.get("client_version")
    if isinstance(version, str) and version.endswith("\n"):
        raise ManifestError("schema: client_version: ends with a newline")
    if m["region"] not in REGIONS:
        raise ManifestError(f"region: {m['region']!r} is not one of {', '.join(REGIONS)}")
    try:
        node_id = to_checksum_address(parse_address(m["node_id"], field="node_id"))
        wallet = to_checksum_address(parse_address(m["wallet_address"], field="wallet_address"))
        liveness = to_checksum_address(
            parse_address(m["liveness_address"], field="liveness_address")
        )
    except SignatureError as exc:
        raise ManifestError(f"address: {exc}") from exc
    if liveness == node_id:
        raise ManifestError("liveness_address: must be a separate key from node.key")
    issued_at = m["issued_at"]
    if issued_at > now + max_skew:
        raise ManifestClockError(f"issued_at: {issued_at - now} s in the future (clock skew?)")
    if now - issued_at > max_age:
        raise ManifestClockError(
            f"issued_at: manifest is {now - issued_at} s old (max {max_age}; clock skew?)"
        )
    try:
        public_key = serialization.load_pem_public_key(m["pubkey_rsa"].encode("ascii"))
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:  # e.g. an EC key on secp112r1
        raise ManifestError("pubkey_rsa: not a PEM SubjectPublicKeyInfo public key") from exc
    if (
        not isinstance(public_key, rsa.RSAPublicKey)
        or not MIN_RSA_BITS <= public_key.key_size <= MAX_RSA_BITS
        or public_key.public_numbers().e != RSA_EXPONENT
    ):
        # A huge modulus or exponent would make every check and seal slow (a 3070-bit
        # exponent: ~120 times the CPU of e = 65537), on the coordinator's event loop.
        raise ManifestError(
            f"pubkey_rsa: must be an RSA key of {MIN_RSA_BITS} to {MAX_RSA_BITS} bits with "
            f"public exponent {RSA_EXPONENT}"
        )
    try:
        expected_tier = tier.hardware_tier(m["cpu"], m["gpu"])
        slots = tier.max_parallel_subtasks(m["cpu"], m["gpu"])
    except NodeClientError as exc:
        raise ManifestError(f"hardware: {exc}") from exc
    if m["hardware_tier"] != expected_tier:
        raise ManifestError(
            f"hardware_tier: declared {m['hardware_tier']}, but cpu and gpu give {expected_tier}"
        )
    if m["max_parallel_subtasks"] > slots:
        raise ManifestError(
            f"max_parallel_subtasks: declared {m['max_parallel_subtasks']}, the rule allows {slots}"
        )
    try:
        body = signed_bytes(m)
    except RemoteProtocolError as exc:  # e.g. a lone surrogate in a string: no UTF-8 form
        raise ManifestError(f"canonical form: {exc}") from exc
    try:
        public_key.verify(strict_fromhex(m["signature"][2:]), body, _PSS, hashes.SHA256())
    except (InvalidSignature, ValueError):  # ValueError: not hex digits alone
        raise ManifestError(
            "signature: RSA-PSS signature does not verify against pubkey_rsa"
        ) from None
    try:
        node_sig = parse_signature_hex(m["node_signature"], field="node_signature")
        verify_typed(
            "Registration",
            registration_message(m, body),
            node_sig,
            signer=node_id,
            chain_id=chain_id,
        )
    except SignatureError as exc:
        raise ManifestError(f"node_signature: {exc}") from exc
    proof = m.get("wallet_proof")
    if proof is not None:
        if proof["issued_at"] > now + max_skew:
            raise ManifestClockError(
                f"wallet_proof: issued_at is {proof['issued_at'] - now} s in the future"
            )
        try:
            check_wallet_proof(proof, wallet_address=wallet, node_id=node_id, chain_id=chain_id)
        except SignatureError as exc:
            raise ManifestError(f"wallet_proof: {exc}") from exc
    return VerifiedManifest(
        manifest=m,
        node_id=node_id,
        wallet_address=wallet,
        liveness_address=liveness,
        public_key=public_key,
        manifest_hash=sha256(body),
        issued_at=issued_at,
        wallet_proven=proof is not None,
    )
