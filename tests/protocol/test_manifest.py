"""2.3.2 Capability Manifest: both signatures, the schema, and every verification check."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from eth_account import Account
from eth_account.messages import encode_typed_data

from nodeclient.errors import ManifestError, RemoteProtocolError
from nodeclient.protocol import eip712
from nodeclient.protocol import manifest as mf
from nodeclient.protocol.canonical import canonical_json
from nodeclient.protocol.secp import Secp256k1Key

CHAIN = eip712.DEVNET_CHAIN_ID
NOW = 1_765_000_000
SEED_CPU = {"model": "EPYC 7763", "cores": 128, "ram_gb": 512}
SEED_GPU = [{"model": "NVIDIA H100", "count": 4, "vram_gb": 80}]


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=3072)


@pytest.fixture(scope="module")
def node_key() -> Secp256k1Key:
    return Secp256k1Key.from_hex("0x" + "5a" * 32)


@pytest.fixture(scope="module")
def liveness() -> Secp256k1Key:
    return Secp256k1Key.from_hex("0x" + "6b" * 32)


WALLET = "0x1111111111111111111111111111111111111111"


def build(rsa_key: rsa.RSAPrivateKey, node_key: Secp256k1Key, liveness: Secp256k1Key, **kw: Any):
    args: dict[str, Any] = {
        "node_key": node_key,
        "liveness_address": liveness.address,
        "payload_key": rsa_key,
        "wallet_address": WALLET,
        "region": "eu-west",
        "cpu": SEED_CPU,
        "gpu": SEED_GPU,
        "workload_classes": ["ai.training", "ai.inference", "media.render"],
        "max_parallel_subtasks": 4,
        "client_version": "0.1.0",
        "issued_at": NOW,
        "chain_id": CHAIN,
    }
    args.update(kw)
    return mf.build_manifest(**args)


@pytest.fixture(scope="module")
def seed_manifest(rsa_key, node_key, liveness) -> dict[str, Any]:
    return build(rsa_key, node_key, liveness)


def test_a_lone_surrogate_fails_verification_with_a_reason(seed_manifest) -> None:
    """A string with no UTF-8 form (JSON's \\ud800) has no canonical bytes to check a
    signature over: a ManifestError naming that, not another exception."""
    bad = {**seed_manifest, "cpu": {**seed_manifest["cpu"], "model": "\ud800"}}
    with pytest.raises(mf.ManifestError, match="canonical form"):
        mf.verify_manifest(bad, chain_id=CHAIN, now=NOW + 10)


def test_seed_example_verifies_as_tier_3(seed_manifest) -> None:
    """The seed's example machine yields tier 3 and a manifest that verifies completely."""
    assert seed_manifest["hardware_tier"] == 3
    v = mf.verify_manifest(seed_manifest, chain_id=CHAIN, now=NOW + 10)
    assert v.node_id == seed_manifest["node_id"]
    assert v.liveness_address == seed_manifest["liveness_address"]


def test_fields_exactly_as_seed_plus_three(seed_manifest) -> None:
    """Field names are the seed's, plus liveness_address, issued_at and node_signature."""
    seed_fields = {
        "node_id", "wallet_address", "pubkey_rsa", "hardware_tier", "cpu", "gpu", "region",
        "workload_classes", "max_parallel_subtasks", "client_version", "signature",
    }  # fmt: skip
    assert set(seed_manifest) == seed_fields | {"liveness_address", "issued_at", "node_signature"}
    assert set(seed_manifest["cpu"]) == {"model", "cores", "ram_gb"}
    assert set(seed_manifest["gpu"][0]) == {"model", "count", "vram_gb"}


def test_shipped_schema_validates(seed_manifest) -> None:
    """The JSON Schema shipped in the package accepts our manifest and is itself valid."""
    schema = mf.manifest_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(seed_manifest, schema)


def test_signature_verifies_with_openssl(seed_manifest, tmp_path: Path) -> None:
    """`signature` verifies with the openssl command line, exactly as the issue states."""
    (tmp_path / "pub.pem").write_text(seed_manifest["pubkey_rsa"])
    (tmp_path / "body.json").write_bytes(mf.signed_bytes(seed_manifest))
    (tmp_path / "sig.bin").write_bytes(bytes.fromhex(seed_manifest["signature"][2:]))
    cmd = [
        "openssl", "dgst", "-sha256", "-sigopt", "rsa_padding_mode:pss",
        "-sigopt", "rsa_pss_saltlen:32", "-verify", str(tmp_path / "pub.pem"),
        "-signature", str(tmp_path / "sig.bin"), str(tmp_path / "body.json"),
    ]  # fmt: skip
    ok = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    assert "Verified OK" in ok.stdout
    (tmp_path / "body.json").write_bytes(mf.signed_bytes({**seed_manifest, "region": "us-east"}))
    bad = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert bad.returncode != 0


def test_node_signature_recovers_with_eth_account(seed_manifest) -> None:
    """`node_signature` recovers to node_id through eth-account's EIP-712 implementation."""
    body = mf.signed_bytes(seed_manifest)
    typed = eip712.typed_data_json(
        "Registration", mf.registration_message(seed_manifest, body), chain_id=CHAIN
    )
    signable = encode_typed_data(full_message=typed)
    recovered = Account.recover_message(
        signable, signature=bytes.fromhex(seed_manifest["node_signature"][2:])
    )
    assert recovered == seed_manifest["node_id"]


def test_signed_bytes_ignore_key_order(seed_manifest) -> None:
    """JCS: the same manifest in another key order has the same signed bytes."""
    shuffled = dict(reversed(list(seed_manifest.items())))
    assert mf.signed_bytes(shuffled) == mf.signed_bytes(seed_manifest)
    mf.verify_manifest(shuffled, chain_id=CHAIN, now=NOW)


def _pem(exponent: int, m: dict[str, Any]) -> str:
    """The manifest's own RSA modulus with another public exponent, as PEM."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_public_key(m["pubkey_rsa"].encode())
    assert isinstance(key, rsa.RSAPublicKey)
    other = rsa.RSAPublicNumbers(exponent, key.public_numbers().n).public_key()
    return other.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


# An EC public key on a curve the cryptography library cannot load (openssl ecparam
# -name secp112r1): it raises UnsupportedAlgorithm, not ValueError.
EC_SECP112R1_PEM = """-----BEGIN PUBLIC KEY-----
MDIwEAYHKoZIzj0CAQYFK4EEAAYDHgAEPHcnkaqxbXLfD0DgbbutHcoe997i6n0e
kBqL2Q==
-----END PUBLIC KEY-----
"""


@pytest.mark.parametrize(
    ("mutate", "check"),
    [
        (lambda m: m.update(region="us-east"), "signature"),
        (lambda m: m.update(region="mars-north"), "region"),
        (lambda m: m["cpu"].update(cores=64), "signature"),
        (lambda m: m.update(hardware_tier=4), "hardware_tier"),
        (lambda m: m.update(max_parallel_subtasks=64), "max_parallel_subtasks"),
        (lambda m: m.update(workload_classes=["ai.inference"]), "signature"),
        (lambda m: m.update(signature="0x" + "00" * 384), "signature"),
        (lambda m: m.update(node_signature="0x" + "00" * 65), "node_signature"),
        (lambda m: m.pop("node_signature"), "schema"),
        (lambda m: m.update(extra=1), "schema"),
        (lambda m: m.update(node_id="0x1234"), "schema"),
        (lambda m: m.update(issued_at=NOW - 2 * 86400), "issued_at"),
        (lambda m: m.update(issued_at=NOW + 3600), "issued_at"),
        (lambda m: m.update(pubkey_rsa="-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"), "pubkey_rsa"),
        (lambda m: m.update(wallet_address="0x2222222222222222222222222222222222222222"), "signature"),
        (lambda m: m.update(node_id="0x" + m["node_id"][2:].swapcase()), "address"),
        (lambda m: m.update(hardware_tier=float(m["hardware_tier"])), "schema: hardware_tier"),
        (lambda m: m.update(max_parallel_subtasks=4.0), "schema: max_parallel_subtasks"),
        (lambda m: m.update(issued_at=float(NOW)), "schema: issued_at"),
        (lambda m: m.update(wallet_proof={"issued_at": 1.0, "signature": "0x" + "00" * 65}),
         "schema: wallet_proof/issued_at"),
        (lambda m: m.update(client_version=m["client_version"] + "\n"), "schema: client_version"),
        (lambda m: m.update(signature=m["signature"] + "\n"), "signature"),
        (lambda m: m.update(pubkey_rsa=_pem(3, m)), "pubkey_rsa"),
        (lambda m: m.update(pubkey_rsa=_pem((1 << 3000) + 1, m)), "pubkey_rsa"),
        (lambda m: m.update(pubkey_rsa=EC_SECP112R1_PEM), "pubkey_rsa"),  # cryptography: unsupported
    ],
)  # fmt: skip
def test_each_check_fails_closed(seed_manifest, mutate, check: str) -> None:
    """Every tampered field is refused, and the error names the failed check."""
    m = copy.deepcopy(seed_manifest)
    mutate(m)
    with pytest.raises(ManifestError, match=rf"^{check}"):
        mf.verify_manifest(m, chain_id=CHAIN, now=NOW)


def test_wrong_chain_id_rejected(seed_manifest) -> None:
    """A manifest signed for another chain id does not verify."""
    with pytest.raises(ManifestError, match="^node_signature"):
        mf.verify_manifest(seed_manifest, chain_id=1, now=NOW)


def test_node_signature_by_another_key_rejected(rsa_key, liveness) -> None:
    """A manifest whose node_id is not the signer of node_signature is refused."""
    impostor = Secp256k1Key.from_hex("0x" + "7c" * 32)
    honest = build(rsa_key, Secp256k1Key.from_hex("0x" + "5a" * 32), liveness)
    forged = build(rsa_key, impostor, liveness)
    forged["node_id"] = honest["node_id"]
    # Re-sign the RSA part so only node_signature is wrong.
    from cryptography.hazmat.primitives import hashes

    forged["signature"] = (
        "0x" + rsa_key.sign(mf.signed_bytes(forged), mf._PSS, hashes.SHA256()).hex()
    )
    with pytest.raises(ManifestError, match="^node_signature: .*recovers to"):
        mf.verify_manifest(forged, chain_id=CHAIN, now=NOW)


def test_small_rsa_key_rejected(node_key, liveness) -> None:
    """An RSA key under 3072 bits is refused even if everything is correctly signed."""
    small = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    m = build(small, node_key, liveness)
    with pytest.raises(ManifestError, match="^(schema|pubkey_rsa)"):
        mf.verify_manifest(m, chain_id=CHAIN, now=NOW)


def test_liveness_must_differ_from_node_key(rsa_key, node_key) -> None:
    """Delegating the node key itself as liveness key defeats the split and is refused."""
    m = build(rsa_key, node_key, node_key)
    with pytest.raises(ManifestError, match="^liveness_address"):
        mf.verify_manifest(m, chain_id=CHAIN, now=NOW)


@pytest.mark.parametrize(
    ("field", "items"),
    [
        ("workload_classes", [{"": i} for i in range(6000)]),  # objects: every pair compared
        ("workload_classes", [i if i % 2 else str(i) for i in range(6000)]),  # unsortable mix
        ("gpu", [{"n": i} for i in range(17)]),
    ],
)
def test_an_array_past_the_schemas_bound_is_refused_before_the_schema_runs(
    seed_manifest, monkeypatch: pytest.MonkeyPatch, field: str, items: list[object]
) -> None:
    """jsonschema checks uniqueItems even past a failed maxItems, comparing every pair of
    items it cannot sort: 6,000 objects in a 64 KiB registration took it about half a
    minute, on the coordinator's event loop. Arrays longer than the schema allows are now
    refused first, by length, and the schema never sees them."""
    m = copy.deepcopy(seed_manifest)
    m[field] = items

    def no_schema() -> object:
        raise AssertionError("the schema ran")

    monkeypatch.setattr(mf, "_validator", no_schema)
    with pytest.raises(ManifestError, match=rf"^schema: {field}: more than 16 items$"):
        mf.verify_manifest(m, chain_id=CHAIN, now=NOW)


@pytest.mark.usefixtures("stock_recursion_limit")
@pytest.mark.parametrize(
    ("field", "value", "where"),
    [
        ("workload_classes", [json.loads("[" * 300 + "]" * 300)] * 2, "workload_classes/1/0/0/0"),
        ("gpu", [{"a": {"b": {"c": {}}}}], "gpu/0/a/b/c"),
    ],
)
def test_nesting_deeper_than_the_schemas_is_refused_before_the_schema_runs(
    seed_manifest, field: str, value: object, where: str
) -> None:
    """Two lists 300 deep (1.2 KB, an unauthenticated registration) ended the schema's
    uniqueItems check, which compares nested lists by recursion, in a RecursionError: a
    500 and a 141 KB traceback in the coordinator's log for each. Any object or array
    nested deeper than the schema's own is refused first, and the schema never sees it."""
    m = copy.deepcopy(seed_manifest)
    m[field] = value
    with pytest.raises(ManifestError, match=rf"^schema: {where}: nested deeper than 4 levels$"):
        mf.verify_manifest(m, chain_id=CHAIN, now=NOW)


def _nested(depth: int) -> list[object]:
    value: list[object] = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.usefixtures("stock_recursion_limit")
def test_canonical_json_refuses_what_it_cannot_encode_in_one_error() -> None:
    """Nested past the recursion limit is one of them: a RemoteProtocolError, as the
    function promises, not a RecursionError."""
    with pytest.raises(RemoteProtocolError, match="cannot be canonicalized"):
        canonical_json(_nested(5000))


def test_non_object_rejected() -> None:
    """Anything but a JSON object is a schema error."""
    for bad in (None, [], "manifest", 3):
        with pytest.raises(ManifestError, match="^schema"):
            mf.verify_manifest(bad, chain_id=CHAIN, now=NOW)


# --- wallet_proof: the wallet names the node as its own --------------------------------------

WALLET_KEY = Secp256k1Key.from_hex("0x" + "7c" * 32)


def test_wallet_proof_signed_by_eth_account_verifies(rsa_key, node_key, liveness) -> None:
    """A wallet signs the WalletBinding with a stock Ethereum library (eth_signTypedData_v4
    JSON, as any wallet app would be given it): the manifest carrying it verifies as proven."""
    message = mf.wallet_binding_message(WALLET_KEY.address, node_key.address, NOW - 60)
    typed = eip712.typed_data_json("WalletBinding", message, chain_id=CHAIN)
    signed = Account.sign_typed_data(WALLET_KEY.to_hex(), full_message=typed)
    proof = {"issued_at": NOW - 60, "signature": "0x" + bytes(signed.signature).hex()}
    assert proof == mf.sign_wallet_proof(
        WALLET_KEY, node_key.address, issued_at=NOW - 60, chain_id=CHAIN
    )
    manifest = build(rsa_key, node_key, liveness, wallet_address=WALLET_KEY.address,
                     wallet_proof=proof)  # fmt: skip
    verified = mf.verify_manifest(manifest, chain_id=CHAIN, now=NOW)
    assert verified.wallet_proven
    assert not mf.verify_manifest(build(rsa_key, node_key, liveness), chain_id=CHAIN, now=NOW)\
        .wallet_proven  # fmt: skip


def test_a_wallet_proof_proves_nothing_else(rsa_key, node_key, liveness) -> None:
    """A proof by another key, one made for another node, one issued in the future, or one
    taken off a signed manifest: each fails verification and names wallet_proof (or the
    node signature that covered it)."""
    other_node = Secp256k1Key.from_hex("0x" + "8d" * 32)
    cases = {
        "recovers to": mf.sign_wallet_proof(
            Secp256k1Key.from_hex("0x" + "9e" * 32), node_key.address, issued_at=NOW,
            chain_id=CHAIN,
        ),
        "expected": mf.sign_wallet_proof(
            WALLET_KEY, other_node.address, issued_at=NOW, chain_id=CHAIN
        ),
        "in the future": mf.sign_wallet_proof(
            WALLET_KEY, node_key.address, issued_at=NOW + 3600, chain_id=CHAIN
        ),
    }  # fmt: skip
    for why, proof in cases.items():
        manifest = build(rsa_key, node_key, liveness, wallet_address=WALLET_KEY.address,
                         wallet_proof=proof)  # fmt: skip
        with pytest.raises(ManifestError, match=f"^wallet_proof: .*{why}"):
            mf.verify_manifest(manifest, chain_id=CHAIN, now=NOW)
    good = mf.sign_wallet_proof(WALLET_KEY, node_key.address, issued_at=NOW, chain_id=CHAIN)
    manifest = build(rsa_key, node_key, liveness, wallet_address=WALLET_KEY.address,
                     wallet_proof=good)  # fmt: skip
    stripped = {k: v for k, v in manifest.items() if k != "wallet_proof"}
    with pytest.raises(ManifestError, match="^signature: "):
        mf.verify_manifest(stripped, chain_id=CHAIN, now=NOW)
    with pytest.raises(ManifestError, match="^schema: wallet_proof"):
        mf.verify_manifest({**manifest, "wallet_proof": {"issued_at": NOW}}, chain_id=CHAIN,
                           now=NOW)  # fmt: skip


def test_the_longest_cpu_name_the_probe_keeps_is_one_the_check_takes(
    rsa_key, node_key, liveness
) -> None:
    """The hardware probe keeps CPU and GPU names up to 256 characters and Linux counts up
    to 8192 CPUs: a manifest of such a machine verifies (the schema once stopped at 128
    characters and 4096 cores, so such a node could never register)."""
    cpu = {"model": "x" * 256, "cores": 8192, "ram_gb": 512}
    gpu = [{"model": "y" * 256, "count": 1, "vram_gb": 80}]
    manifest = build(rsa_key, node_key, liveness, cpu=cpu, gpu=gpu, max_parallel_subtasks=1)
    assert mf.verify_manifest(manifest, chain_id=CHAIN, now=NOW).manifest["cpu"] == cpu
