"""The wallet proof: the wallet's owner names this node as theirs (2.3.2 sybil pre-screen).

The manifest's ``wallet_address`` says which wallet the node works for. Only node.key and
payload.key sign the manifest, so without more that is a claim anyone can make about any
wallet, and a coordinator that counts nodes per wallet could be filled up with nodes that
merely name someone else's wallet. The optional ``wallet_proof`` closes that: an EIP-712
``WalletBinding{wallet_address, node_id, issued_at}`` signed by the wallet's own key
(docs/protocol.md), which coordinators count apart from mere claims.

The wallet's key never needs to be on the node: ``nodeclient wallet-proof`` prints the
``eth_signTypedData_v4`` JSON to sign in any wallet app, and stores the signature it is then
given, once it has checked that the signature recovers to the configured wallet. The proof
is kept in the node home as ``wallet_proof.json`` (mode 0600, like every file there) and
goes into every manifest the node builds from then on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

from nodeclient.errors import KeyFileError, SignatureError, UsageError
from nodeclient.node import securefile
from nodeclient.protocol import eip712
from nodeclient.protocol import manifest as mf
from nodeclient.protocol.secp import Secp256k1Key, parse_address, to_checksum_address

PROOF_FILE: Final = "wallet_proof.json"


def typed_data(
    wallet_address: str, node_id: str, *, issued_at: int, chain_id: int
) -> dict[str, Any]:
    """The ``eth_signTypedData_v4`` JSON a wallet app signs to bind *node_id*."""
    message = mf.wallet_binding_message(_checksum(wallet_address), node_id, issued_at)
    return eip712.typed_data_json("WalletBinding", message, chain_id=chain_id)


def make_proof(
    signature: str, *, wallet_address: str, node_id: str, issued_at: int, chain_id: int
) -> dict[str, Any]:
    """A proof from a wallet's signature; UsageError, saying why, unless it is the wallet's
    binding of this node at *issued_at* on this chain."""
    text = signature.strip().lower()
    if len(text) == 132 and text[-2:] in ("00", "01"):  # some wallets give v as 0 or 1
        text = text[:-2] + f"{int(text[-2:], 16) + 27:02x}"  # the protocol's form: 27 or 28
    proof = {"issued_at": issued_at, "signature": text}
    try:
        mf.check_wallet_proof(
            proof, wallet_address=_checksum(wallet_address), node_id=node_id, chain_id=chain_id
        )
    except SignatureError as exc:
        raise UsageError(
            f"the signature is not this wallet's binding of this node: {exc}; sign the typed "
            f"data `nodeclient wallet-proof` prints with the wallet {wallet_address}, for "
            f"issued_at {issued_at} and chain {chain_id}"
        ) from None
    return proof


def sign_proof(
    wallet_key: Secp256k1Key, *, wallet_address: str, node_id: str, issued_at: int,
    chain_id: int,
) -> dict[str, Any]:  # fmt: skip
    """A proof signed here, with the wallet's own key (devnets and automation)."""
    if wallet_key.address != _checksum(wallet_address):
        raise UsageError(
            f"the wallet key is {wallet_key.address}, not the configured wallet_address "
            f"{wallet_address}"
        )
    return mf.sign_wallet_proof(wallet_key, node_id, issued_at=issued_at, chain_id=chain_id)


def save_proof(home: Path, proof: dict[str, Any]) -> Path:
    path = home / PROOF_FILE
    securefile.replace_secret(path, (json.dumps(proof, sort_keys=True) + "\n").encode())
    return path


def load_proof(
    home: Path, *, wallet_address: str, node_id: str, chain_id: int
) -> dict[str, Any] | None:
    """The stored proof, or None without one. A proof that no longer fits (the wallet or
    the chain changed in the config, a damaged file) is refused with what to do, rather
    than sent to be refused by the coordinator."""
    path = home / PROOF_FILE
    try:
        raw = securefile.read_secret(path, max_size=4096)
    except KeyFileError as exc:
        if not path.exists() and not path.is_symlink():
            return None
        raise UsageError(f"{path}: {exc}") from None
    try:
        doc = json.loads(raw)
        proof = {"issued_at": int(doc["issued_at"]), "signature": str(doc["signature"])}
        mf.check_wallet_proof(
            proof, wallet_address=_checksum(wallet_address), node_id=node_id, chain_id=chain_id
        )
    # RecursionError: a file nested without end ("[[[[..."), which no proof is; under the
    # 4096-byte cap it is still deep enough to reach the stock recursion limit
    except (ValueError, TypeError, KeyError, RecursionError, SignatureError) as exc:
        raise UsageError(
            f"{path} is not a proof for wallet {wallet_address} on chain {chain_id} ({exc}); "
            "make a new one with `nodeclient wallet-proof`, or delete the file to register "
            "without one"
        ) from None
    return proof


def _checksum(address: str) -> str:
    try:
        return to_checksum_address(parse_address(address, field="wallet_address"))
    except SignatureError as exc:
        raise UsageError(str(exc)) from None
