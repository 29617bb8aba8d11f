"""EIP-712 signing, cross-checked against eth-account's independent implementation."""

from __future__ import annotations

import os
import uuid
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data

from nodeclient.errors import SignatureError
from nodeclient.protocol import eip712
from nodeclient.protocol.proof import proof_of_execution
from nodeclient.protocol.secp import Secp256k1Key, recover_address

CHAIN = eip712.DEVNET_CHAIN_ID
# Published in docs/protocol.md.
DOMAIN_SEPARATOR = "57334a576245b03c45ae39bb69ca92f23d6c6ccf9223053cdc476afa8b249e0d"
RESULT_DIGEST = "e9bc895f288832f94ff2ad9422a186b476897cb935117a2d41efffd800796ca2"
RESULT_HASH_STRUCT = "507b740a10d5fd78ebdfd69f381312790b2196426e7774152aece2f74c65f21d"
RESULT_SIGNATURE = (
    "f261305d5dc39cbbd0294572eb73b7b1f8ebea71976e169047fef19b951b782b"
    "1e417a81c5ecf6e368eb5db3029cf6b862b2f7b78dfde4a9e2f6751b214d50941b"
)


@pytest.fixture(scope="module")
def key() -> Secp256k1Key:
    return Secp256k1Key.from_hex("0x" + "4c" * 32)


def sample(primary: str, key: Secp256k1Key) -> dict[str, Any]:
    other = Secp256k1Key.from_hex("0x" + "11" * 32).address
    samples: dict[str, dict[str, Any]] = {
        "Registration": {
            "node_id": key.address,
            "wallet_address": other,
            "liveness_address": other,
            "manifest_hash": bytes(range(32)),
            "issued_at": 1_760_000_000,
        },
        "LinkAuth": {
            "node_id": key.address,
            "coordinator_id": "coordinator-devnet",
            "nonce": b"\x07" * 32,
            "issued_at": 1_760_000_001,
        },
        "Heartbeat": {
            "node_id": key.address,
            "seq": 42,
            "state": "EXECUTING",
            "running_tasks": [uuid.UUID(int=1).bytes, uuid.UUID(int=2).bytes],
            "load_permille": 730,
            "sent_at": 1_760_000_002,
        },
        "Result": {
            "task_id": uuid.UUID(int=3).bytes,
            "job_id": uuid.UUID(int=4).bytes,
            "node_id": key.address,
            "proof": b"\xab" * 32,
            "result_size": 1 << 40,
            "completed_at": 1_760_000_003,
        },
        "Reject": {
            "task_id": uuid.UUID(int=5).bytes,
            "node_id": key.address,
            "reason": "over capacity: 4 of 4 slots busy — ünïcode",
            "rejected_at": 1_760_000_004,
        },
        "Unstake": {"node_id": key.address, "requested_at": 1_760_000_005},
        "WalletBinding": {
            "wallet_address": "0x1111111111111111111111111111111111111111",
            "node_id": key.address,
            "issued_at": 1_760_000_006,
        },
    }
    return samples[primary]


@pytest.mark.parametrize("primary", sorted(eip712.TYPES))
def test_signature_recovers_with_eth_account(primary: str, key: Secp256k1Key) -> None:
    """Our signature over each struct recovers to the signer in eth-account."""
    msg = sample(primary, key)
    sig = eip712.sign_typed(key, primary, msg, chain_id=CHAIN)
    signable = encode_typed_data(full_message=eip712.typed_data_json(primary, msg, chain_id=CHAIN))
    assert Account.recover_message(signable, signature=sig) == key.address


@pytest.mark.parametrize("primary", sorted(eip712.TYPES))
def test_recovery_from_the_struct_hash_matches(primary: str, key: Secp256k1Key) -> None:
    """Recovering from hashStruct (what parsing a frame computes) gives the signer; a hash
    of another message gives someone else."""
    msg = sample(primary, key)
    sig = eip712.sign_typed(key, primary, msg, chain_id=CHAIN)
    struct_hash = eip712.hash_struct(primary, msg)
    assert eip712.recover_struct_hash(struct_hash, sig, chain_id=CHAIN) == key.address
    assert eip712.recover_struct_hash(struct_hash, sig, chain_id=CHAIN + 1) != key.address
    other = bytes(32) if struct_hash != bytes(32) else b"\x01" * 32
    assert eip712.recover_struct_hash(other, sig, chain_id=CHAIN) != key.address


@pytest.mark.parametrize("primary", sorted(eip712.TYPES))
def test_identical_to_eth_account_signature(primary: str, key: Secp256k1Key) -> None:
    """RFC 6979 makes signatures deterministic: ours equals eth-account's byte for byte."""
    msg = sample(primary, key)
    ours = eip712.sign_typed(key, primary, msg, chain_id=CHAIN)
    signable = encode_typed_data(full_message=eip712.typed_data_json(primary, msg, chain_id=CHAIN))
    theirs = Account.sign_message(signable, private_key=key.secret).signature
    assert ours == bytes(theirs)


@pytest.mark.parametrize("primary", sorted(eip712.TYPES))
def test_digest_matches_eth_account(primary: str, key: Secp256k1Key) -> None:
    """The EIP-712 digest equals keccak(0x19 0x01 || domain || struct) computed by eth-account."""
    from eth_utils import keccak

    msg = sample(primary, key)
    signable = encode_typed_data(full_message=eip712.typed_data_json(primary, msg, chain_id=CHAIN))
    expected = keccak(b"\x19" + signable.version + signable.header + signable.body)
    assert eip712.signing_digest(primary, msg, chain_id=CHAIN) == expected


def test_chain_id_is_bound(key: Secp256k1Key) -> None:
    """A signature made for one chain does not recover to the signer on another."""
    msg = sample("Unstake", key)
    sig = eip712.sign_typed(key, "Unstake", msg, chain_id=1)
    assert eip712.recover_typed("Unstake", msg, sig, chain_id=CHAIN) != key.address
    eip712.verify_typed("Unstake", msg, sig, signer=key.address, chain_id=1)


def test_tampered_field_fails_verification(key: Secp256k1Key) -> None:
    """Changing any field after signing makes verify_typed fail closed."""
    msg = sample("Result", key)
    sig = eip712.sign_typed(key, "Result", msg, chain_id=CHAIN)
    for field in msg:
        tampered = dict(msg)
        value = tampered[field]
        if isinstance(value, bytes):
            tampered[field] = bytes([value[0] ^ 1]) + value[1:]
        elif isinstance(value, int):
            tampered[field] = value + 1
        else:
            tampered[field] = Secp256k1Key.from_hex("0x" + "22" * 32).address
        with pytest.raises(SignatureError):
            eip712.verify_typed("Result", tampered, sig, signer=key.address, chain_id=CHAIN)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seq", -1),
        ("seq", 1 << 64),
        ("seq", True),
        ("state", 5),
        ("running_tasks", [b"\x00" * 15]),
        ("running_tasks", "not a list"),
        ("node_id", "0x1234"),
        ("load_permille", 1.5),
    ],
)
def test_out_of_range_fields_refused(field: str, value: Any, key: Secp256k1Key) -> None:
    """Values outside their EIP-712 type are refused before anything is signed."""
    msg = sample("Heartbeat", key)
    msg[field] = value
    with pytest.raises(SignatureError):
        eip712.sign_typed(key, "Heartbeat", msg, chain_id=CHAIN)


def test_missing_and_extra_fields_refused(key: Secp256k1Key) -> None:
    """A struct with a missing or an unknown field is refused."""
    msg = sample("Unstake", key)
    with pytest.raises(SignatureError):
        eip712.hash_struct("Unstake", {"node_id": key.address})
    with pytest.raises(SignatureError):
        eip712.hash_struct("Unstake", {**msg, "extra": 1})
    with pytest.raises(SignatureError):
        eip712.hash_struct("Bogus", msg)


def test_high_s_and_bad_v_refused(key: Secp256k1Key) -> None:
    """Malleable high-s twins and invalid recovery ids fail closed."""
    digest = os.urandom(32)
    sig = key.sign_digest(digest)
    n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
    s = int.from_bytes(sig[32:64], "big")
    twin = sig[:32] + (n - s).to_bytes(32, "big") + bytes([55 - sig[64]])
    with pytest.raises(SignatureError):
        recover_address(digest, twin)
    with pytest.raises(SignatureError):
        recover_address(digest, sig[:64] + b"\x05")
    with pytest.raises(SignatureError, match="27 or 28"):  # the same signature, other form
        recover_address(digest, sig[:64] + bytes([sig[64] - 27]))
    with pytest.raises(SignatureError):
        recover_address(digest, sig[:64])
    with pytest.raises(SignatureError):
        recover_address(digest, b"\x00" * 65)


def test_typed_data_json_round_trips(key: Secp256k1Key) -> None:
    """message_from_json inverts the exported JSON, and the signature still verifies."""
    msg = sample("Heartbeat", key)
    sig = eip712.sign_typed(key, "Heartbeat", msg, chain_id=CHAIN)
    exported = eip712.typed_data_json("Heartbeat", msg, chain_id=CHAIN)
    back = eip712.message_from_json("Heartbeat", exported["message"])
    assert back == msg
    eip712.verify_typed("Heartbeat", back, sig, signer=key.address, chain_id=CHAIN)


def test_secp_key_matches_eth_account() -> None:
    """Our address derivation equals eth-account's for random keys."""
    for _ in range(5):
        k = Secp256k1Key.generate()
        assert Account.from_key(k.secret).address == k.address
        assert Secp256k1Key.from_hex(k.to_hex()).address == k.address


TASK = uuid.UUID("00112233-4455-6677-8899-aabbccddeeff")


def test_published_result_vector() -> None:
    """The Result vector in docs/protocol.md: digest and signature for a fixed key."""
    k = Secp256k1Key.from_hex("0x" + "4c" * 32)
    assert k.address == "0xdB00079cad3e665853Bf766eFe26F4C38cdbdCDA"
    msg = {
        "task_id": TASK.bytes,
        "job_id": uuid.UUID("ffeeddcc-bbaa-9988-7766-554433221100").bytes,
        "node_id": k.address,
        # The empty result's proof for this very node (docs: "Proof of execution").
        "proof": proof_of_execution(task_id=TASK, result=b"", node_id=k.address),
        "result_size": 0,
        "completed_at": 1765000000,
    }
    assert eip712.domain_separator(CHAIN).hex() == DOMAIN_SEPARATOR
    assert eip712.hash_struct("Result", msg).hex() == RESULT_HASH_STRUCT
    assert eip712.signing_digest("Result", msg, chain_id=CHAIN).hex() == RESULT_DIGEST
    assert eip712.sign_typed(k, "Result", msg, chain_id=CHAIN).hex() == RESULT_SIGNATURE


def test_the_struct_table_in_the_docs_is_the_code() -> None:
    """Every row of docs/protocol.md's struct table: its type string and type hash are the
    code's (keccak-256 by eth-utils, independently of our own), and every struct is in it."""
    import re
    from pathlib import Path

    from eth_utils import keccak

    doc = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \| `([^`]+)` \| `(0x[0-9a-f]{64})` \|", doc, re.MULTILINE)
    assert sorted(name for name, _, _ in rows) == sorted(eip712.TYPES)
    for name, type_string, type_hash in rows:
        assert eip712._encode_type(name).decode() == type_string
        assert "0x" + keccak(text=type_string).hex() == type_hash


@pytest.mark.parametrize(
    "text",
    ["00 " * 20 + "0000", "00\n" * 32, "0" * 63, "0g" * 32],
)
def test_hex_has_one_form(text: str) -> None:
    """bytes.fromhex skips whitespace, so one value had many spellings: every hex field
    is an even number of hex digits and nothing else."""
    from nodeclient.protocol import messages
    from nodeclient.protocol.secp import parse_signature_hex, strict_fromhex

    with pytest.raises(ValueError, match="hex digits"):
        strict_fromhex(text)
    with pytest.raises(SignatureError):
        eip712._from_json("bytes32", "0x" + text, "nonce")
    if text.strip("0") and not text.isalnum():  # 130 characters, not 65 bytes of hex
        with pytest.raises(SignatureError):
            parse_signature_hex("0x" + (text * 9)[:130])
    frame = {"type": "challenge", "coordinator_id": "c", "nonce": "0x" + text, "chain_id": 1}
    frame["heartbeat_interval"] = 30
    with pytest.raises(messages.RemoteProtocolError):
        messages.Challenge.from_wire(frame)
    assert strict_fromhex("00aAfF") == b"\x00\xaa\xff"


def test_an_address_with_a_trailing_newline_is_refused() -> None:
    from nodeclient.protocol.secp import parse_address

    with pytest.raises(SignatureError):
        parse_address("0x" + "ab" * 20 + "\n")
    assert parse_address("0x" + "ab" * 20) == bytes.fromhex("ab" * 20)
