"""The three node keys, the encrypted keystore and passphrase sourcing (2.3.1 Key Management).

Real-parameter scrypt (n=2^18, 256 MiB, about a second) runs exactly three times in this
module: once to encrypt (the module-scoped ``encrypted_home``), once for eth-account to
decrypt our file, once for us to decrypt it. Every other keystore test uses a keystore that
eth-account makes with tiny parameters, or one that must be refused before any KDF runs.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from eth_account import Account

from nodeclient.errors import KeyFileError, KeystoreError, UsageError
from nodeclient.node import keys
from nodeclient.node.keys import (
    LIVENESS_KEY,
    NODE_KEY,
    PAYLOAD_KEY,
    init_keys,
    is_encrypted,
    key_info,
    load_liveness_key,
    load_node_key,
    load_payload_key,
    node_id_of,
    public_key_pem,
    read_passphrase,
    rotate_liveness,
    rsa_fingerprint,
    terminal_prompt,
)

PASSWORD = "correct horse battery staple"
SECRET = bytes.fromhex("4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318")
ALL_KEYS = (NODE_KEY, LIVENESS_KEY, PAYLOAD_KEY)
Kdf = Literal["scrypt", "pbkdf2"]


def _no_passphrase() -> bytes:
    raise AssertionError("the passphrase must not be asked for")


LOADERS: dict[str, Callable[[Path], object]] = {
    NODE_KEY: lambda home: load_node_key(home, passphrase=_no_passphrase),
    LIVENESS_KEY: load_liveness_key,
    PAYLOAD_KEY: load_payload_key,
}


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One plaintext home, made once: RSA-3072 generation is too slow to repeat per test."""
    home = tmp_path_factory.mktemp("template") / "home"
    init_keys(home, passphrase=None)
    return home


@pytest.fixture
def home(template: Path, tmp_path: Path) -> Path:
    """A private copy of the template home for one test to change."""
    copy = tmp_path / "home"
    os.mkdir(copy, 0o700)
    for name in ALL_KEYS:
        _write(copy / name, (template / name).read_bytes())
    return copy


@pytest.fixture(scope="module")
def encrypted_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home whose node.key is a real-parameter keystore (one scrypt run). Read-only."""
    home = tmp_path_factory.mktemp("encrypted") / "home"
    init_keys(home, passphrase=PASSWORD.encode())
    return home


@pytest.fixture
def umask0() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _write(path: Path, data: bytes) -> None:
    """Replace a key file's bytes directly, keeping mode 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, data)
    os.close(fd)


def _cheap_keystore(kdf: Kdf = "scrypt", secret: bytes = SECRET) -> dict[str, Any]:
    """A keystore made by eth-account itself, with the cheapest parameters accepted (the
    minimums: scrypt n = 4096, as geth's --lightkdf; PBKDF2 262,144 rounds)."""
    rounds = keys.MIN_SCRYPT_N if kdf == "scrypt" else keys.MIN_PBKDF2_C
    return Account.encrypt(secret, PASSWORD, kdf=kdf, iterations=rounds)


def _scrypt_keystore(secret: bytes, password: str, *, n: int, r: int, p: int) -> dict[str, Any]:
    """A v3 scrypt keystore with any r and p (eth-account writes p = 1 only), built from
    the Web3 Secret Storage definition: AES-128-CTR under the derived key's first half, a
    Keccak-256 MAC under its second half."""
    from Crypto.Hash import keccak
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    salt, iv = os.urandom(32), os.urandom(16)
    derived = hashlib.scrypt(
        password.encode(), salt=salt, n=n, r=r, p=p, dklen=32, maxmem=256 * 1024 * 1024
    )
    encryptor = Cipher(algorithms.AES(derived[:16]), modes.CTR(iv)).encryptor()
    ciphertext = encryptor.update(secret) + encryptor.finalize()
    mac = keccak.new(digest_bits=256, data=derived[16:] + ciphertext).hexdigest()
    return {
        "version": 3,
        "id": "3198bc9c-6672-5ab3-d995-4942343ae5b6",
        "crypto": {
            "cipher": "aes-128-ctr",
            "cipherparams": {"iv": iv.hex()},
            "ciphertext": ciphertext.hex(),
            "kdf": "scrypt",
            "kdfparams": {"n": n, "r": r, "p": p, "dklen": 32, "salt": salt.hex()},
            "mac": mac,
        },
    }


def _write_keystore(home: Path, keystore: dict[str, Any]) -> None:
    _write(home / NODE_KEY, json.dumps(keystore).encode())


# --- init -----------------------------------------------------------------------------


@pytest.mark.usefixtures("umask0")
def test_init_creates_home_0700_and_keys_0600_with_umask_0(tmp_path: Path) -> None:
    """Init makes the home 0700 and each of the three keys 0600 even with umask 0."""
    home = tmp_path / "home"
    init_keys(home, passphrase=None)
    assert _mode(home) == 0o700
    assert sorted(os.listdir(home)) == sorted(ALL_KEYS)
    for name in ALL_KEYS:
        assert _mode(home / name) == 0o600, name


def test_node_key_is_hex_that_eth_account_imports(template: Path) -> None:
    """node.key is 0x + 64 hex + newline, and eth-account derives the same node_id."""
    text = (template / NODE_KEY).read_text()
    assert text.startswith("0x")
    assert len(text) == 67
    assert text.endswith("\n")
    assert Account.from_key(text.strip()).address == node_id_of(template)


def test_liveness_key_is_a_separate_key(template: Path) -> None:
    """The liveness key has its own address, distinct from node_id."""
    assert load_liveness_key(template).address != node_id_of(template)


def test_payload_key_is_pkcs8_rsa_3072(template: Path) -> None:
    """payload.key is an unencrypted PKCS#8 PEM of an RSA-3072 key."""
    data = (template / PAYLOAD_KEY).read_bytes()
    assert data.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert load_payload_key(template).key_size == 3072


def test_rsa_fingerprint_is_sha256_of_der_spki(template: Path) -> None:
    """The fingerprint is SHA256: + hex SHA-256 of the DER SubjectPublicKeyInfo."""
    public = load_payload_key(template).public_key()
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert rsa_fingerprint(public) == "SHA256:" + hashlib.sha256(der).hexdigest()


def test_public_key_pem_is_spki_of_the_payload_key(template: Path) -> None:
    """pubkey_rsa is a SubjectPublicKeyInfo PEM, the same from the private or public key."""
    private = load_payload_key(template)
    pem = public_key_pem(private)
    assert pem.startswith("-----BEGIN PUBLIC KEY-----")
    assert pem == public_key_pem(private.public_key())
    loaded = serialization.load_pem_public_key(pem.encode())
    assert isinstance(loaded, rsa.RSAPublicKey)
    assert loaded.public_numbers() == private.public_key().public_numbers()


@pytest.mark.parametrize("name", ALL_KEYS)
def test_init_refuses_if_any_key_exists(tmp_path: Path, name: str) -> None:
    """One existing key stops init; it keeps its bytes and no other key is created."""
    home = tmp_path / "home"
    os.mkdir(home, 0o700)
    _write(home / name, b"precious\n")
    with pytest.raises(KeyFileError, match=f"refusing to overwrite existing keys.*{name}"):
        init_keys(home, passphrase=None)
    assert os.listdir(home) == [name]
    assert (home / name).read_bytes() == b"precious\n"


def test_init_refuses_an_empty_passphrase_before_creating_anything(tmp_path: Path) -> None:
    """An empty passphrase is refused and no home is created."""
    with pytest.raises(UsageError, match="empty passphrase"):
        init_keys(tmp_path / "home", passphrase=b"")
    assert not (tmp_path / "home").exists()


def test_key_info_reports_public_facts(template: Path) -> None:
    """key_info gives node_id, liveness address, fingerprint and three ok files."""
    info = key_info(template)
    assert info.node_id == node_id_of(template)
    assert info.liveness_address == load_liveness_key(template).address
    assert info.rsa_fingerprint.startswith("SHA256:")
    assert info.encrypted is False
    assert [f["ok"] for f in info.files] == [True, True, True]


# --- rotation -------------------------------------------------------------------------


def test_rotate_liveness_keeps_node_id_and_changes_the_hot_key(home: Path) -> None:
    """Rotation returns (old, new), keeps node_id, and the new file is 0600."""
    node_id = node_id_of(home)
    before = load_liveness_key(home).address
    old, new = rotate_liveness(home)
    assert old == before
    assert new != old
    assert load_liveness_key(home).address == new
    assert node_id_of(home) == node_id
    assert _mode(home / LIVENESS_KEY) == 0o600


def test_rotate_liveness_refuses_a_directory_that_is_not_a_node_home(tmp_path: Path) -> None:
    """A wrong --home (a safe directory without node.key) is refused, and nothing is
    written there: a liveness.key left in it would stop a later `init` as the leftover
    of an interrupted one."""
    elsewhere = tmp_path / "not-a-home"
    elsewhere.mkdir(mode=0o700)
    with pytest.raises(KeyFileError, match="holds no node.key: it is not a node home"):
        rotate_liveness(elsewhere)
    assert list(elsewhere.iterdir()) == []


def test_rotate_liveness_refuses_an_unsafe_liveness_key(home: Path) -> None:
    """Rotation loads the old key first, so a 0644 liveness.key is refused, unchanged."""
    os.chmod(home / LIVENESS_KEY, 0o644)
    before = (home / LIVENESS_KEY).read_bytes()
    with pytest.raises(KeyFileError, match="chmod 600"):
        rotate_liveness(home)
    assert (home / LIVENESS_KEY).read_bytes() == before


def _liveness_missing(home: Path) -> None:
    os.unlink(home / LIVENESS_KEY)


def _liveness_garbled(home: Path) -> None:
    _write(home / LIVENESS_KEY, b"0xnot a key\n")


def _liveness_short(home: Path) -> None:
    _write(home / LIVENESS_KEY, b"0x" + b"ab" * 31 + b"\n")


def _liveness_keystore(home: Path) -> None:
    _write(home / LIVENESS_KEY, json.dumps(_cheap_keystore()).encode())


def _liveness_empty(home: Path) -> None:
    _write(home / LIVENESS_KEY, b"")


@pytest.mark.parametrize(
    "lose", [_liveness_missing, _liveness_garbled, _liveness_short, _liveness_keystore,
             _liveness_empty],
)  # fmt: skip
def test_rotate_liveness_makes_a_new_key_for_a_lost_or_malformed_one(home: Path, lose) -> None:
    """A missing or malformed liveness.key (a hot key, nothing to keep) is made anew:
    (None, new), the file 0600 holding the new key; node.key and payload.key untouched."""
    others = {n: (home / n).read_bytes() for n in (NODE_KEY, PAYLOAD_KEY)}
    lose(home)
    old, new = rotate_liveness(home)
    assert old is None
    assert load_liveness_key(home).address == new
    assert _mode(home / LIVENESS_KEY) == 0o600
    assert {n: (home / n).read_bytes() for n in (NODE_KEY, PAYLOAD_KEY)} == others
    assert sorted(os.listdir(home)) == sorted(ALL_KEYS)  # no temporary file left


def _liveness_symlink(home: Path) -> None:
    target = home.parent / "elsewhere.key"
    _write(target, (home / LIVENESS_KEY).read_bytes())
    os.unlink(home / LIVENESS_KEY)
    os.symlink(target, home / LIVENESS_KEY)


def _liveness_dangling_symlink(home: Path) -> None:
    os.unlink(home / LIVENESS_KEY)
    os.symlink(home.parent / "nowhere.key", home / LIVENESS_KEY)


def _liveness_directory(home: Path) -> None:
    os.unlink(home / LIVENESS_KEY)
    os.mkdir(home / LIVENESS_KEY, 0o700)


def _liveness_fifo(home: Path) -> None:
    os.unlink(home / LIVENESS_KEY)
    os.mkfifo(home / LIVENESS_KEY, 0o600)


def _liveness_malformed_and_loose(home: Path) -> None:
    _write(home / LIVENESS_KEY, b"garbage\n")
    os.chmod(home / LIVENESS_KEY, 0o640)


def _liveness_foreign(home: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file to another uid")
    _write(home / LIVENESS_KEY, b"garbage\n")
    os.chown(home / LIVENESS_KEY, 4242, -1)


@pytest.mark.parametrize(
    ("spoil", "needle"),
    [
        (_liveness_symlink, "symlink"),
        (_liveness_dangling_symlink, "symlink"),
        (_liveness_directory, "directory, not a regular file"),
        (_liveness_fifo, "FIFO, not a regular file"),
        (_liveness_malformed_and_loose, "chmod 600"),
        (_liveness_foreign, "owned by uid 4242"),
    ],
)
def test_rotate_liveness_still_refuses_an_unsafe_file(home: Path, spoil, needle: str) -> None:
    """Making a new key never covers up an unsafe file: a symlink, a non-regular file, a
    wrong mode or owner (even with malformed content) is refused, and left as it was."""
    spoil(home)
    path = home / LIVENESS_KEY
    before = os.lstat(path)
    link = os.readlink(path) if os.path.islink(path) else None
    with pytest.raises(KeyFileError, match=needle):
        rotate_liveness(home)
    after = os.lstat(path)
    assert (after.st_ino, after.st_mode, after.st_uid) == (
        before.st_ino,
        before.st_mode,
        before.st_uid,
    )
    assert (os.readlink(path) if os.path.islink(path) else None) == link
    assert not [n for n in os.listdir(home) if n.endswith(".tmp")]


@pytest.mark.parametrize("lose", [_liveness_missing, _liveness_garbled, _liveness_keystore])
def test_a_lost_liveness_key_is_refused_with_rotate_as_the_fix(home: Path, lose) -> None:
    """Loading a missing or malformed liveness.key says to run `keys rotate-liveness`
    (init would refuse: node.key and payload.key are there)."""
    lose(home)
    with pytest.raises(KeyFileError, match=r"fix: run `nodeclient keys rotate-liveness`") as info:
        load_liveness_key(home)
    assert "nodeclient init" not in str(info.value)


# --- loading and malformed files --------------------------------------------------------


def test_plaintext_node_key_loads_without_a_passphrase(home: Path) -> None:
    """A plaintext node.key never asks for a passphrase."""
    assert load_node_key(home, passphrase=_no_passphrase).address == node_id_of(home)


def test_load_refuses_a_readable_node_key_before_anything_else(home: Path) -> None:
    """A 0644 node.key is refused through the key API too, naming the file."""
    os.chmod(home / NODE_KEY, 0o644)
    with pytest.raises(
        KeyFileError, match=f"refusing to use {re.escape(str(home / NODE_KEY))}: mode 0644"
    ):
        load_node_key(home, passphrase=_no_passphrase)
    assert _mode(home / NODE_KEY) == 0o644


@pytest.mark.parametrize(
    ("content", "detail"),
    [
        (b"0x" + b"zz" * 32 + b"\n", "64 hex digits"),
        (b"0x" + b"ab" * 31 + b"\n", "found 62 hex digits"),
        (b"0x" + b"00" * 32 + b"\n", "not a valid secp256k1"),
        (b"\xff\xfe\n", "not ASCII"),
    ],
    ids=["bad-hex", "31-bytes", "zero-key", "binary"],
)
@pytest.mark.parametrize("name", [NODE_KEY, LIVENESS_KEY])
def test_malformed_secp_key_names_the_file(
    home: Path, name: str, content: bytes, detail: str
) -> None:
    """Bad hex, a short key, an invalid scalar or binary each name the file."""
    _write(home / name, content)
    load = LOADERS[name]
    with pytest.raises(KeyFileError, match=f"malformed {re.escape(str(home / name))}.*{detail}"):
        load(home)


def test_liveness_key_must_not_be_a_keystore(home: Path) -> None:
    """The hot key is plaintext by design; a keystore there is refused."""
    _write(home / LIVENESS_KEY, json.dumps(_cheap_keystore()).encode())
    with pytest.raises(KeyFileError, match="plaintext"):
        load_liveness_key(home)


def test_garbage_pem_payload_key_names_the_file(home: Path) -> None:
    """A payload.key that is not PEM is refused by name."""
    _write(
        home / PAYLOAD_KEY, b"-----BEGIN PRIVATE KEY-----\nnot base64!\n-----END PRIVATE KEY-----\n"
    )
    with pytest.raises(KeyFileError, match=f"malformed {re.escape(str(home / PAYLOAD_KEY))}"):
        load_payload_key(home)


def test_rsa_2048_payload_key_is_refused(home: Path) -> None:
    """Only RSA-3072 is accepted; a 2048-bit key is named as such."""
    small = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = small.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write(home / PAYLOAD_KEY, pem)
    with pytest.raises(
        KeyFileError, match=f"malformed {re.escape(str(home / PAYLOAD_KEY))}: an RSA-2048 key"
    ):
        load_payload_key(home)


# --- the encrypted keystore (real parameters) ---------------------------------------------


def test_encrypted_node_key_is_a_v3_scrypt_keystore(encrypted_home: Path) -> None:
    """node.key holds v3 JSON with scrypt n=2^18, r=8, p=1, dklen=32, mode 0600."""
    doc = json.loads((encrypted_home / NODE_KEY).read_text())
    assert doc["version"] == 3
    assert doc["crypto"]["cipher"] == "aes-128-ctr"
    assert doc["crypto"]["kdf"] == "scrypt"
    params = doc["crypto"]["kdfparams"]
    assert (params["n"], params["r"], params["p"], params["dklen"]) == (262144, 8, 1, 32)
    assert _mode(encrypted_home / NODE_KEY) == 0o600
    assert is_encrypted(encrypted_home)


def test_node_id_of_keystore_needs_no_passphrase(encrypted_home: Path) -> None:
    """node_id comes from the address field, checksummed, with no KDF run."""
    doc = json.loads((encrypted_home / NODE_KEY).read_text())
    node_id = node_id_of(encrypted_home)
    assert node_id.lower() == "0x" + doc["address"].lower()
    assert key_info(encrypted_home).node_id == node_id


def test_eth_account_decrypts_our_keystore(encrypted_home: Path) -> None:
    """eth-account's Account.decrypt reads our node.key to the key behind node_id."""
    secret = Account.decrypt((encrypted_home / NODE_KEY).read_text(), PASSWORD)
    assert Account.from_key(secret).address == node_id_of(encrypted_home)


def test_we_decrypt_our_keystore(encrypted_home: Path) -> None:
    """load_node_key asks for the passphrase once and yields the node_id key."""
    asked: list[int] = []

    def passphrase() -> bytes:
        asked.append(1)
        return PASSWORD.encode()

    key = load_node_key(encrypted_home, passphrase=passphrase)
    assert key.address == node_id_of(encrypted_home)
    assert asked == [1]


# --- keystores from elsewhere (cheap parameters) --------------------------------------------


@pytest.mark.parametrize("kdf", ["scrypt", "pbkdf2"])
def test_we_decrypt_an_eth_account_keystore(home: Path, kdf: Kdf) -> None:
    """A keystore made by eth-account's Account.encrypt decrypts to the same secret."""
    _write_keystore(home, _cheap_keystore(kdf))
    key = load_node_key(home, passphrase=PASSWORD.encode)
    assert key.secret == SECRET


def test_wrong_passphrase_is_named(home: Path) -> None:
    """A wrong passphrase gives exactly 'wrong passphrase for <file>'."""
    _write_keystore(home, _cheap_keystore())
    with pytest.raises(KeystoreError) as info:
        load_node_key(home, passphrase=lambda: b"not it")
    assert str(info.value) == f"wrong passphrase for {home / NODE_KEY}"


def test_keystore_address_field_must_match_the_key(home: Path) -> None:
    """An address field that lies about the key inside is caught after decrypting."""
    keystore = _cheap_keystore()
    keystore["address"] = Account.create().address[2:]
    _write_keystore(home, keystore)
    with pytest.raises(KeystoreError, match="does not match"):
        load_node_key(home, passphrase=PASSWORD.encode)


@pytest.mark.parametrize(
    ("kdf", "field", "value", "message"),
    [
        ("scrypt", "n", 1 << 20, "kdfparams.n = 1048576 exceeds the cap 262144"),
        ("scrypt", "r", 1024, "kdfparams.r = 1024 exceeds the cap 8"),
        ("scrypt", "p", 32, "kdfparams.p = 32 exceeds the cap 16"),
        ("scrypt", "n", 3000, "not a power of two"),
        ("scrypt", "dklen", 64, "kdfparams.dklen = 64 exceeds the cap 32"),
        ("pbkdf2", "c", 10**9, "kdfparams.c = 1000000000 exceeds the cap 1000000"),
        ("pbkdf2", "prf", "hmac-sha512", "prf must be hmac-sha256"),
    ],
)
def test_hostile_keystore_is_refused_before_the_kdf(
    home: Path, kdf: Kdf, field: str, value: object, message: str
) -> None:
    """Oversized KDF parameters are refused by name, before the passphrase is even asked."""
    keystore = _cheap_keystore(kdf)
    crypto = keystore["crypto"]
    crypto["kdfparams"][field] = value
    if kdf == "scrypt" and field != "n":
        crypto["kdfparams"]["n"] = 1 << 18  # real-size n, so a run of the KDF would show
    _write_keystore(home, keystore)
    with pytest.raises(KeystoreError, match=message):
        load_node_key(home, passphrase=_no_passphrase)


def test_scrypt_cost_is_capped(home: Path) -> None:
    """n, r and p each under their caps are still refused when the work they ask for,
    n*r*p, is over its cap (what geth's standard parameters need, about a second)."""
    keystore = _cheap_keystore()
    params = keystore["crypto"]["kdfparams"]
    params.update(n=1 << 18, r=8, p=2)
    _write_keystore(home, keystore)
    with pytest.raises(KeystoreError, match=r"n\*r\*p = 4194304 exceeds the cap 2097152"):
        load_node_key(home, passphrase=_no_passphrase)


@pytest.mark.parametrize(
    ("kdf", "field", "value", "message"),
    [
        ("scrypt", "n", 2048, "kdfparams.n = 2048 is below the minimum 4096"),
        ("scrypt", "r", 1, "kdfparams n\\*r = 4096 is below the minimum 32768"),
        ("pbkdf2", "c", 10_000, "kdfparams.c = 10000 is below the minimum 262144"),
        ("scrypt", "salt", "ab" * 8 + "cd" * 7, "bytes of kdfparams.salt = 15 is below"),
    ],
)
def test_a_keystore_whose_passphrase_can_be_tried_fast_is_refused(
    home: Path, kdf: Kdf, field: str, value: object, message: str
) -> None:
    """A KDF too cheap (a weak file, or one made so on purpose) is refused before the
    passphrase is asked, naming the parameter, its minimum and how to fix it."""
    keystore = _cheap_keystore(kdf)
    keystore["crypto"]["kdfparams"][field] = value
    _write_keystore(home, keystore)
    with pytest.raises(KeystoreError, match=message) as info:
        load_node_key(home, passphrase=_no_passphrase)
    assert "fix: encrypt the key again with stronger parameters" in str(info.value)


def test_a_geth_lightkdf_keystore_is_read(home: Path) -> None:
    """geth --lightkdf writes scrypt n=4096, r=8, p=6: accepted (its cost is a tenth of
    the standard parameters'), and it decrypts to what eth-account decrypts it to."""
    keystore = _scrypt_keystore(SECRET, PASSWORD, n=4096, r=8, p=6)
    assert Account.decrypt(keystore, PASSWORD) == SECRET  # an independent reading
    _write_keystore(home, keystore)
    assert load_node_key(home, passphrase=PASSWORD.encode).secret == SECRET


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(version=4), "version must be 3"),
        (lambda d: d["crypto"].update(cipher="aes-256-gcm"), "cipher must be aes-128-ctr"),
        (lambda d: d["crypto"].update(kdf="argon2"), "kdf must be scrypt or pbkdf2"),
        (lambda d: d["crypto"].update(ciphertext="00" * 31), "ciphertext must be 32..32 bytes"),
        (lambda d: d["crypto"].update(mac="xyz"), "mac must be a hex string"),
        (lambda d: d.update(address="0xnope"), "address"),
    ],
    ids=["version", "cipher", "kdf", "ciphertext", "mac", "address"],
)
def test_malformed_keystore_field_is_named(
    home: Path, change: Callable[[dict[str, Any]], object], message: str
) -> None:
    """Each malformed field is refused by name without asking for the passphrase."""
    keystore = _cheap_keystore()
    change(keystore)
    _write_keystore(home, keystore)
    with pytest.raises(KeystoreError, match=message):
        load_node_key(home, passphrase=_no_passphrase)


def test_keystore_with_case_twin_fields_is_refused(home: Path) -> None:
    """'Crypto' beside 'crypto' is ambiguous (eth-account folds case) and refused."""
    keystore = _cheap_keystore()
    text = json.dumps(keystore)[:-1] + ', "Crypto": ' + json.dumps(keystore["crypto"]) + "}"
    _write(home / NODE_KEY, text.encode())
    with pytest.raises(KeystoreError, match="duplicate field 'Crypto'"):
        load_node_key(home, passphrase=_no_passphrase)


def test_truncated_keystore_json_is_refused(home: Path) -> None:
    """A keystore cut short is malformed JSON, named as such."""
    _write(home / NODE_KEY, json.dumps(_cheap_keystore()).encode()[:100])
    with pytest.raises(
        KeystoreError, match=f"malformed keystore {re.escape(str(home / NODE_KEY))}"
    ):
        node_id_of(home)


@pytest.mark.usefixtures("stock_recursion_limit")
def test_deeply_nested_keystore_json_is_malformed(home: Path, capsys) -> None:
    """A node.key of '{' and 30,000 '[' is a malformed keystore, not a RecursionError."""
    _write(home / NODE_KEY, b'{"crypto": ' + b"[" * 30_000)
    with pytest.raises(KeystoreError, match="not valid JSON"):
        node_id_of(home)
    from nodeclient.node.cli import main

    assert main(["keys", "show", "--home", str(home)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("nodeclient: error: malformed keystore") and err.count("\n") == 1


# --- passphrases ------------------------------------------------------------------------


def _file(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "pass"
    path.write_bytes(data)
    path.chmod(0o600)
    return path


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_a_passphrase_file_others_can_read_is_refused(tmp_path: Path, mode: int) -> None:
    """The passphrase file unlocks node.key: held to the key files' rules, it must be this
    user's and readable by nobody else (before, a world-readable one was used silently)."""
    path = _file(tmp_path, b"pw\n")
    path.chmod(mode)
    with pytest.raises(UsageError, match=rf"is mode {mode:04o}, owner uid \d+: .*chmod 600"):
        read_passphrase(passphrase_file=path, env={}, prompt=None)
    path.chmod(0o400)
    assert read_passphrase(passphrase_file=path, env={}, prompt=None) == b"pw"


def test_a_systemd_credential_is_a_passphrase_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LoadCredential= files are root's, mode 0400, with an ACL for the service's user that
    shows as 0440: taken from the service's $CREDENTIALS_DIRECTORY, not from elsewhere, and
    not when others could read or anyone write it."""
    creds = tmp_path / "credentials"
    creds.mkdir()
    path = _file(creds, b"pw\n")
    path.chmod(0o440)
    with pytest.raises(UsageError, match="is mode 0440"):  # no credentials directory here
        read_passphrase(passphrase_file=path, env={}, prompt=None)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert read_passphrase(passphrase_file=path, env={}, prompt=None) == b"pw"
    for mode in (0o444, 0o460):  # readable by others; writable by the group
        path.chmod(mode)
        with pytest.raises(UsageError, match=f"is mode {mode:04o}"):
            read_passphrase(passphrase_file=path, env={}, prompt=None)


def test_a_passphrase_file_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    target = _file(tmp_path, b"pw\n")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(UsageError, match="is a symlink: name the file itself"):
        read_passphrase(passphrase_file=link, env={}, prompt=None)


def test_passphrase_file_loses_exactly_one_newline(tmp_path: Path) -> None:
    """Only one trailing newline is stripped; a second one is part of the passphrase."""
    path = _file(tmp_path, b"pw\n\n")
    assert read_passphrase(passphrase_file=path, env={}, prompt=None) == b"pw\n"


def test_passphrase_file_crlf_counts_as_one_line_ending(tmp_path: Path) -> None:
    """A final CRLF is stripped whole; a lone trailing CR is kept."""
    assert read_passphrase(passphrase_file=_file(tmp_path, b"pw\r\n"), env={}, prompt=None) == b"pw"
    assert read_passphrase(passphrase_file=_file(tmp_path, b"pw\r"), env={}, prompt=None) == b"pw\r"


def test_passphrase_file_flag_wins_over_environment(tmp_path: Path) -> None:
    """--passphrase-file is used before NODECLIENT_PASSPHRASE_FILE."""
    flag = _file(tmp_path, b"from-flag")
    other = tmp_path / "other"
    other.write_bytes(b"from-env")
    env = {"NODECLIENT_PASSPHRASE_FILE": str(other)}
    assert read_passphrase(passphrase_file=flag, env=env, prompt=None) == b"from-flag"


def test_passphrase_environment_file_is_used_before_the_prompt(tmp_path: Path) -> None:
    """NODECLIENT_PASSPHRASE_FILE is read and the prompt is not used."""
    env = {"NODECLIENT_PASSPHRASE_FILE": str(_file(tmp_path, b"from-env\n"))}

    def prompt(_: str) -> str:
        raise AssertionError("must not prompt")

    assert read_passphrase(passphrase_file=None, env=env, prompt=prompt) == b"from-env"


def test_prompt_confirmation_must_match() -> None:
    """With confirm=True two different answers are refused."""
    answers = iter(["one", "two"])
    with pytest.raises(UsageError, match="differ"):
        read_passphrase(passphrase_file=None, env={}, prompt=lambda _: next(answers), confirm=True)


def test_end_of_input_at_the_prompt_is_no_passphrase() -> None:
    """Ctrl-D (getpass raises EOFError) at either prompt of init is a one-line UsageError."""

    def ctrl_d(_: str) -> str:
        raise EOFError

    def ctrl_d_at_repeat(text: str) -> str:
        return ctrl_d(text) if text.startswith("Repeat") else "first"

    for prompt in (ctrl_d, ctrl_d_at_repeat):
        with pytest.raises(UsageError, match="no passphrase entered"):
            read_passphrase(passphrase_file=None, env={}, prompt=prompt, confirm=True)


def test_prompt_answer_is_returned_as_utf8() -> None:
    """The prompted passphrase comes back as its UTF-8 bytes."""
    assert read_passphrase(passphrase_file=None, env={}, prompt=lambda _: "pässword") == (
        "pässword".encode()
    )


def test_no_passphrase_source_says_how_to_give_one() -> None:
    """Without a file, variable or terminal the error names every way to give one."""
    with pytest.raises(UsageError, match=r"--passphrase-file.*NODECLIENT_PASSPHRASE_FILE"):
        read_passphrase(passphrase_file=None, env={}, prompt=None)


def test_empty_passphrase_is_refused(tmp_path: Path) -> None:
    """A file holding only a newline is an empty passphrase and refused."""
    with pytest.raises(UsageError, match="empty passphrase"):
        read_passphrase(passphrase_file=_file(tmp_path, b"\n"), env={}, prompt=None)


def test_passphrase_file_must_be_a_regular_file(tmp_path: Path) -> None:
    """A directory given as the passphrase file is refused by name."""
    with pytest.raises(UsageError, match=f"{re.escape(str(tmp_path))} is not a regular file"):
        read_passphrase(passphrase_file=tmp_path, env={}, prompt=None)


def test_terminal_prompt_is_none_off_a_terminal() -> None:
    """Piped stdin never gets a prompt."""
    assert terminal_prompt(io.StringIO()) is None


def test_module_exports_the_file_names() -> None:
    """The three file names other modules rely on are stable."""
    assert (keys.NODE_KEY, keys.LIVENESS_KEY, keys.PAYLOAD_KEY) == (
        "node.key",
        "liveness.key",
        "payload.key",
    )


# --- operator mistakes around key files (review of the key tools) ------------------------


def test_a_key_missing_from_an_initialised_home_says_how_to_recover(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """init refuses a home with config.toml, so a missing key there is restored, or the
    node starts over with its files moved aside: the error says that, not "run init",
    and init's refusal names the same way out."""
    from nodeclient.node.cli import main

    home = tmp_path / "home"
    init = ["init", "--home", str(home), "--wallet", "0x" + "11" * 20]
    assert main(init) == 0
    (home / "payload.key").rename(tmp_path / "payload.key.aside")
    with pytest.raises(KeyFileError, match="restore it from your backup; or, to start over"):
        keys.load_payload_key(home)
    capsys.readouterr()
    assert main(init) == 2
    err = capsys.readouterr().err
    assert "already exists: this home is initialised" in err
    assert "move node.key, liveness.key, payload.key, config.toml" in err


def test_a_socket_in_place_of_a_key_is_named_not_an_errno(tmp_path: Path) -> None:
    """A key path that cannot even be opened (a socket: ENXIO) is described as the file it
    is, with the fix, as `doctor` describes it, not as a bare "No such device"."""
    import socket as socket_module

    home = tmp_path / "home"
    keys.init_keys(home, passphrase=None)
    (home / "liveness.key").unlink()
    server = socket_module.socket(socket_module.AF_UNIX)
    try:
        server.bind(str(home / "liveness.key"))
        with pytest.raises(KeyFileError) as info:
            keys.load_liveness_key(home)
    finally:
        server.close()
    assert "No such device" not in str(info.value)
    assert "socket" in str(info.value) or "not a regular file" in str(info.value), info.value


def test_init_under_a_umask_that_takes_the_owners_bits_makes_0600_keys(tmp_path: Path) -> None:
    """The docs promise keys 0600 from the start whatever the umask: one of 0277 (no write
    for the owner) made init fail with files of mode 0400."""
    home = tmp_path / "home"
    old = os.umask(0o277)
    try:
        keys.init_keys(home, passphrase=None)
    finally:
        os.umask(old)
    for name in keys.KEY_FILES:
        assert stat.S_IMODE((home / name).stat().st_mode) == 0o600, name
    assert keys.load_liveness_key(home).address
