"""The wallet proof a node keeps in its home (node/wallet.py): made from a wallet app's
signature, checked before it is stored, refused when it no longer fits the config."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest
from eth_account import Account

from nodeclient.errors import UsageError
from nodeclient.node import wallet
from nodeclient.protocol import manifest as mf
from nodeclient.protocol.secp import Secp256k1Key

CHAIN = 31337
WALLET = Secp256k1Key.from_hex("0x" + "7c" * 32)
NODE = Secp256k1Key.from_hex("0x" + "5a" * 32).address


def wallet_app_signs(typed: dict, key: Secp256k1Key = WALLET) -> str:
    """What a wallet app returns for eth_signTypedData_v4 (eth-account stands in)."""
    return "0x" + bytes(Account.sign_typed_data(key.to_hex(), full_message=typed).signature).hex()


def test_a_wallet_apps_signature_becomes_a_proof_the_manifest_check_takes(tmp_path: Path) -> None:
    typed = wallet.typed_data(WALLET.address.lower(), NODE, issued_at=1_765_000_000,
                              chain_id=CHAIN)  # fmt: skip
    assert typed["primaryType"] == "WalletBinding"
    assert typed["message"]["wallet_address"] == WALLET.address  # checksummed for the app
    signature = wallet_app_signs(typed).upper().replace("0X", "0x")  # as pasted, any case
    proof = wallet.make_proof(signature, wallet_address=WALLET.address, node_id=NODE,
                              issued_at=1_765_000_000, chain_id=CHAIN)  # fmt: skip
    path = wallet.save_proof(tmp_path, proof)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert wallet.load_proof(tmp_path, wallet_address=WALLET.address, node_id=NODE,
                             chain_id=CHAIN) == proof  # fmt: skip
    mf.check_wallet_proof(proof, wallet_address=WALLET.address, node_id=NODE, chain_id=CHAIN)


def test_a_wallet_that_gives_v_as_0_or_1_is_stored_in_the_protocols_form() -> None:
    """Some wallets give the recovery id as 0/1; the proof stores it as 27/28, the one
    form the protocol accepts."""
    typed = wallet.typed_data(WALLET.address, NODE, issued_at=1_765_000_000, chain_id=CHAIN)
    signature = wallet_app_signs(typed)
    low_v = signature[:-2] + f"{int(signature[-2:], 16) - 27:02x}"
    proof = wallet.make_proof(low_v, wallet_address=WALLET.address, node_id=NODE,
                              issued_at=1_765_000_000, chain_id=CHAIN)  # fmt: skip
    assert proof["signature"] == signature
    mf.check_wallet_proof(proof, wallet_address=WALLET.address, node_id=NODE, chain_id=CHAIN)
    # A proof an earlier release stored as the wallet gave it still checks (the node's
    # load at start, and a coordinator's registration check, both go through it).
    stored = {"issued_at": 1_765_000_000, "signature": low_v}
    mf.check_wallet_proof(stored, wallet_address=WALLET.address, node_id=NODE, chain_id=CHAIN)


def test_a_signature_that_is_not_the_wallets_binding_is_refused() -> None:
    """Another key's signature, or one over another issued_at: refused, saying what to sign."""
    typed = wallet.typed_data(WALLET.address, NODE, issued_at=1_765_000_000, chain_id=CHAIN)
    other = wallet_app_signs(typed, Secp256k1Key.from_hex("0x" + "9e" * 32))
    with pytest.raises(UsageError, match="not this wallet's binding of this node"):
        wallet.make_proof(other, wallet_address=WALLET.address, node_id=NODE,
                          issued_at=1_765_000_000, chain_id=CHAIN)  # fmt: skip
    with pytest.raises(UsageError, match="issued_at 1765000001"):
        wallet.make_proof(wallet_app_signs(typed), wallet_address=WALLET.address, node_id=NODE,
                          issued_at=1_765_000_001, chain_id=CHAIN)  # fmt: skip
    with pytest.raises(UsageError, match="wallet key is"):
        wallet.sign_proof(Secp256k1Key.from_hex("0x" + "9e" * 32), wallet_address=WALLET.address,
                          node_id=NODE, issued_at=1, chain_id=CHAIN)  # fmt: skip


def test_a_stored_proof_that_no_longer_fits_is_refused_with_the_fix(tmp_path: Path) -> None:
    """No file: no proof. The config's wallet or chain changed, or the file is damaged: the
    node refuses to start with it rather than be refused by the coordinator."""
    assert wallet.load_proof(tmp_path, wallet_address=WALLET.address, node_id=NODE,
                             chain_id=CHAIN) is None  # fmt: skip
    proof = wallet.sign_proof(WALLET, wallet_address=WALLET.address, node_id=NODE,
                              issued_at=1_765_000_000, chain_id=CHAIN)  # fmt: skip
    wallet.save_proof(tmp_path, proof)
    other_wallet = "0x" + "11" * 20
    with pytest.raises(UsageError, match="nodeclient wallet-proof"):
        wallet.load_proof(tmp_path, wallet_address=other_wallet, node_id=NODE, chain_id=CHAIN)
    with pytest.raises(UsageError, match="on chain 1 "):
        wallet.load_proof(tmp_path, wallet_address=WALLET.address, node_id=NODE, chain_id=1)
    (tmp_path / wallet.PROOF_FILE).unlink()
    wallet.save_proof(tmp_path, {"issued_at": "soon"})  # type: ignore[dict-item]
    with pytest.raises(UsageError, match="delete the file"):
        wallet.load_proof(tmp_path, wallet_address=WALLET.address, node_id=NODE, chain_id=CHAIN)
    assert json.loads((tmp_path / wallet.PROOF_FILE).read_text()) == {"issued_at": "soon"}


@pytest.mark.usefixtures("stock_recursion_limit")
def test_a_proof_file_nested_without_end_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A damaged wallet_proof.json of 3,000 '[' (well under its size cap) is refused like
    any other damaged proof, with the fix, not a RecursionError out of json.loads: `run`,
    `manifest` and `doctor` load the proof, and each would end in a traceback."""
    from nodeclient.node import keys
    from nodeclient.node.cli import main

    home = tmp_path / "home"
    assert main(["init", "--home", str(home), "--wallet", WALLET.address]) == 0
    fd = os.open(home / wallet.PROOF_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"[" * 3000)
    os.close(fd)
    with pytest.raises(UsageError, match="delete the file"):
        wallet.load_proof(home, wallet_address=WALLET.address, node_id=keys.node_id_of(home),
                          chain_id=CHAIN)  # fmt: skip
    capsys.readouterr()
    assert main(["manifest", "--home", str(home)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"nodeclient: error: {home / wallet.PROOF_FILE} is not a proof")
    assert err.count("\n") == 1


def test_the_wallet_proof_command_binds_the_node_and_the_manifest_carries_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`wallet-proof --json` prints the typed data; a wallet app's signature of it is
    stored with --issued-at/--signature; `manifest` then carries a proof the coordinator's
    check takes. A signature by another key is refused in one line, changing nothing."""
    from nodeclient.node.cli import main
    from tests.node.test_cli import run_cli

    home = tmp_path / "home"
    assert main(["init", "--home", str(home), "--wallet", WALLET.address.lower()]) == 0
    capsys.readouterr()
    assert main(["wallet-proof", "--home", str(home), "--json"]) == 0
    typed = json.loads(capsys.readouterr().out)
    issued_at = typed["message"]["issued_at"]
    bad = run_cli("wallet-proof", "--home", str(home), "--issued-at", str(issued_at),
                  "--signature", wallet_app_signs(typed, Secp256k1Key.generate()))  # fmt: skip
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "not this wallet's binding of this node" in bad.stderr
    assert not (home / wallet.PROOF_FILE).exists()
    signature = wallet_app_signs(typed)
    assert main(["wallet-proof", "--home", str(home), "--issued-at", str(issued_at),
                 "--signature", signature]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["manifest", "--home", str(home), "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["wallet_proof"] == {"issued_at": issued_at, "signature": signature}
    verified = mf.verify_manifest(manifest, chain_id=CHAIN, now=manifest["issued_at"])
    assert verified.wallet_proven and verified.wallet_address == WALLET.address


def test_wallet_proof_with_the_wallets_own_key_file(tmp_path: Path, capsys) -> None:
    """--wallet-key signs here (devnets, automation); the key file must be the wallet's."""
    from nodeclient.node.cli import main

    home = tmp_path / "home"
    assert main(["init", "--home", str(home), "--wallet", WALLET.address]) == 0
    key_file = tmp_path / "wallet.key"
    key_file.write_text(WALLET.to_hex() + "\n")
    key_file.chmod(0o600)
    assert main(["wallet-proof", "--home", str(home), "--wallet-key", str(key_file)]) == 0
    proof = json.loads((home / wallet.PROOF_FILE).read_text())
    from nodeclient.node import keys

    mf.check_wallet_proof(proof, wallet_address=WALLET.address, node_id=keys.node_id_of(home),
                          chain_id=CHAIN)  # fmt: skip
    other = tmp_path / "other.key"
    other.write_text(Secp256k1Key.generate().to_hex())
    other.chmod(0o600)
    capsys.readouterr()
    assert main(["wallet-proof", "--home", str(home), "--wallet-key", str(other)]) != 0
    assert "not the configured wallet_address" in capsys.readouterr().err


def test_a_wallet_key_file_that_cannot_be_used_is_named(tmp_path: Path, capsys) -> None:
    """A missing or garbled --wallet-key: the error names that file and what it must be,
    not `nodeclient init` (which makes no wallet key)."""
    from nodeclient.node.cli import main

    home = tmp_path / "home"
    assert main(["init", "--home", str(home), "--wallet", WALLET.address]) == 0
    capsys.readouterr()
    missing = tmp_path / "nope.key"
    assert main(["wallet-proof", "--home", str(home), "--wallet-key", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"--wallet-key {missing}: no such file" in err and "nodeclient init" not in err
    garbled = tmp_path / "garbled.key"
    garbled.write_text("not a key\n")
    garbled.chmod(0o600)
    assert main(["wallet-proof", "--home", str(home), "--wallet-key", str(garbled)]) == 2
    assert f"--wallet-key {garbled}: expected 0x followed by 64 hex" in capsys.readouterr().err
    assert not (home / wallet.PROOF_FILE).exists()


def test_a_proof_issued_in_the_future_is_not_stored(tmp_path: Path, capsys) -> None:
    """A signature for an issued_at 10 days ahead is the wallet's all right, but every
    coordinator would refuse registrations carrying it (more than 300 s in the future),
    and `run` would exit 78: refused when it is stored, saying why."""
    from nodeclient.node import keys
    from nodeclient.node.cli import main

    home = tmp_path / "home"
    assert main(["init", "--home", str(home), "--wallet", WALLET.address]) == 0
    ahead = int(time.time()) + 10 * 86400
    proof = mf.sign_wallet_proof(WALLET, keys.node_id_of(home), issued_at=ahead, chain_id=CHAIN)
    capsys.readouterr()
    rc = main(["wallet-proof", "--home", str(home), "--issued-at", str(ahead),
               "--signature", proof["signature"]])  # fmt: skip
    assert rc == 2
    assert "in the future: a coordinator refuses" in capsys.readouterr().err
    assert not (home / wallet.PROOF_FILE).exists()
