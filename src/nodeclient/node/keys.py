"""The node's three keys and the encrypted keystore (2.3.1 Key Management).

The node home holds:

``node.key``
    The node's identity, a secp256k1 key: ``0x`` + 64 hex digits + newline (the form
    eth-account imports; geth's ``account import`` wants the digits without ``0x``), or,
    when encrypted, a Web3 Secret Storage v3 keystore JSON (scrypt n=2^18, r=8, p=1)
    under the same name; the format is told by the content (a keystore starts with
    ``{``). ``node_id`` is the EIP-55 address of its public key. It
    signs the capability manifest (2.3.2) and results (2.3.7).
``liveness.key``
    A second, separate secp256k1 key, always plaintext: the hot key the running daemon
    uses for routine liveness signatures, so that an unattended node need not keep the
    identity key decrypted. ``rotate_liveness`` replaces it without changing ``node_id``,
    and makes a new one where it is missing or malformed: it holds nothing to keep, and
    the next registration, signed by ``node.key``, binds the new one.
``payload.key``
    RSA-3072, PEM PKCS#8, unencrypted; it only decrypts dispatched payloads (2.3.4). Its
    public key is the manifest's ``pubkey_rsa``.

All three are created and loaded through :mod:`nodeclient.node.securefile`, which enforces
mode 0600. Keystores are parsed and bounded strictly *before* any key derivation runs, so a
hostile file cannot make us spend gigabytes of memory or hours of CPU.
"""

from __future__ import annotations

import errno
import getpass
import hashlib
import json
import os
import re
import stat
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TextIO

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey

from nodeclient.errors import KeyFileError, KeystoreError, SignatureError, UsageError
from nodeclient.node.securefile import (
    MISSING_FIX,
    MISSING_IN_HOME_FIX,
    describe_file,
    ensure_home,
    finish_secrets,
    initialised,
    read_secret,
    replace_secret,
    secret_problem,
    write_secrets,
)
from nodeclient.protocol.secp import Secp256k1Key, parse_address, to_checksum_address

_RECURSION_LIMIT = sys.getrecursionlimit()
from eth_account import Account  # noqa: E402

# eth-account imports py_ecc, which raises the interpreter's recursion limit to 100,000 as
# it is imported. At that depth a deeply nested JSON document ("[[[[...", from a peer)
# overflows the C stack inside json.loads and kills the process with SIGSEGV instead of
# raising RecursionError, which the frame parsers turn into a protocol error. Put it back.
sys.setrecursionlimit(_RECURSION_LIMIT)

NODE_KEY: Final = "node.key"
LIVENESS_KEY: Final = "liveness.key"
PAYLOAD_KEY: Final = "payload.key"
KEY_FILES: Final = (NODE_KEY, LIVENESS_KEY, PAYLOAD_KEY)
# liveness.key, missing or malformed, is made anew (see rotate_liveness), never restored
LIVENESS_FIX: Final = "run `nodeclient keys rotate-liveness` to make a new one"
PASSPHRASE_FILE_ENV: Final = "NODECLIENT_PASSPHRASE_FILE"  # noqa: S105 (a variable name)
RSA_BITS: Final = 3072
PASSPHRASE_FILE_MAX: Final = 4096

# What we write: the Web3 Secret Storage scrypt parameters geth uses for "standard" keys.
SCRYPT_N: Final = 1 << 18
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1
# What we accept from a keystore, checked before the KDF runs. scrypt costs about
# 128 * n * r bytes of memory and n * r * p block operations: the caps bound the cost
# itself to what our own files need (256 MiB, about a second), so geth's and
# eth-account's files are read, the older r=1, p=8 layout and geth's --lightkdf (n=4096,
# r=8, p=6) included. The floors refuse a file whose passphrase could be tried fast:
# geth's --lightkdf for scrypt; for PBKDF2, what wallets write (262,144 rounds).
MAX_SCRYPT_N: Final = 1 << 18
MAX_SCRYPT_R: Final = 8
MAX_SCRYPT_P: Final = 16
MAX_SCRYPT_COST: Final = 1 << 21  # n * r (the memory: 256 MiB) and n * r * p (the time)
MIN_SCRYPT_N: Final = 1 << 12
MIN_SCRYPT_NR: Final = 1 << 15  # n * r: 4 MiB of memory, as geth's --lightkdf takes
MAX_PBKDF2_C: Final = 1_000_000  # eth-account's own default
MIN_PBKDF2_C: Final = 1 << 18
MIN_SALT_BYTES: Final = 16
_DKLEN: Final = 32
_HEX_RE: Final = re.compile(r"^(?:0[xX])?([0-9a-fA-F]*)$")


@dataclass(frozen=True)
class KeyInfo:
    """What ``keys show`` prints: public facts only, never key material."""

    node_id: str
    liveness_address: str
    rsa_fingerprint: str
    encrypted: bool
    files: list[dict[str, object]]


def init_keys(home: Path, *, passphrase: bytes | None) -> KeyInfo:
    """Create the three keys in ``home``; with a passphrase, ``node.key`` is a keystore.

    Refuses, changing nothing, if any of the three files (or anything at their names)
    exists: overwriting a node key would silently orphan the node's registration.
    """
    if passphrase is not None:
        _passphrase_text(passphrase)  # refuse an empty one before anything is created
    ensure_home(home, create=True)
    existing = [n for n in KEY_FILES if os.path.lexists(home / n)]
    if existing:
        raise KeyFileError(
            f"refusing to overwrite existing keys in {home}: {', '.join(existing)}; "
            "nothing was changed (move them away first if you really mean to start over)"
        )
    node = Secp256k1Key.generate()
    liveness = Secp256k1Key.generate()
    payload = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    if passphrase is None:
        node_bytes = (node.to_hex() + "\n").encode("ascii")
    else:
        node_bytes = _encrypt_node_key(node, passphrase, home / NODE_KEY)
    payload_pem = payload.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_secrets(
        {
            home / NODE_KEY: node_bytes,
            home / LIVENESS_KEY: (liveness.to_hex() + "\n").encode("ascii"),
            home / PAYLOAD_KEY: payload_pem,
        }
    )
    return KeyInfo(
        node_id=node.address,
        liveness_address=liveness.address,
        rsa_fingerprint=rsa_fingerprint(payload.public_key()),
        encrypted=passphrase is not None,
        files=_describe_all(home),
    )


def load_node_key(home: Path, *, passphrase: Callable[[], bytes]) -> Secp256k1Key:
    """Load the identity key; ``passphrase()`` is called only for an encrypted node.key.

    A keystore is parsed and its KDF parameters capped before the passphrase is asked
    for, so nobody is prompted for a file that would be refused anyway.
    """
    path, data = _read_key(home, NODE_KEY)
    if not _looks_like_json(data):
        return _parse_hex_key(data, path)
    keystore = _parse_keystore(data, path)
    key = _decrypt(keystore, passphrase(), path)
    if keystore.address is not None and keystore.address != key.address:
        raise KeystoreError(
            f"{path}: the keystore's address field {keystore.address} does not match the key "
            f"inside it ({key.address}); the file was altered or mixed up"
        )
    return key


def load_liveness_key(home: Path) -> Secp256k1Key:
    """Load the hot liveness key, which is always plaintext.

    A missing or malformed file is refused with ``keys rotate-liveness`` as the fix.
    """
    path, data = _read_key(home, LIVENESS_KEY, missing_fix=LIVENESS_FIX)
    try:
        if _looks_like_json(data):
            raise KeyFileError(
                f"malformed {path}: the liveness key is plaintext hex, not a keystore"
            )
        return _parse_hex_key(data, path)
    except KeyFileError as exc:
        raise KeyFileError(f"{exc}; fix: {LIVENESS_FIX}") from exc


def load_payload_key(home: Path) -> RSAPrivateKey:
    """Load the RSA-3072 payload decryption key (2.3.4 Payload Decryption)."""
    path, data = _read_key(home, PAYLOAD_KEY)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(
            f"malformed {path}: not an unencrypted PEM private key (PKCS#8 expected)"
        ) from exc
    if not isinstance(key, RSAPrivateKey):
        raise KeyFileError(f"malformed {path}: not an RSA key (RSA-{RSA_BITS} expected)")
    if key.key_size != RSA_BITS:
        raise KeyFileError(f"malformed {path}: an RSA-{key.key_size} key, RSA-{RSA_BITS} expected")
    return key


def public_key_pem(key: RSAPrivateKey | RSAPublicKey) -> str:
    """The manifest's ``pubkey_rsa``: PEM SubjectPublicKeyInfo (2.3.2 Capability Manifest)."""
    public = key.public_key() if isinstance(key, RSAPrivateKey) else key
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def rsa_fingerprint(public_key: RSAPublicKey) -> str:
    """``SHA256:`` + hex SHA-256 of the DER SubjectPublicKeyInfo, for operators to compare."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "SHA256:" + hashlib.sha256(der).hexdigest()


def node_id_of(home: Path, *, passphrase: Callable[[], bytes] | None = None) -> str:
    """The node_id, without the passphrase where it can be.

    For a keystore this is its ``address`` field, which is *unauthenticated* until the
    file is decrypted (``load_node_key`` checks it then); it is fine for display, not for
    trusting what the file holds. A keystore without one (it is optional) is decrypted
    with *passphrase*, read only then; without it, that is an error naming the fix.
    """
    path, data = _read_key(home, NODE_KEY)
    if not _looks_like_json(data):
        return _parse_hex_key(data, path).address
    keystore = _parse_keystore(data, path)
    if keystore.address is not None:
        return keystore.address
    if passphrase is None:
        raise KeystoreError(
            f"{path} has no address field; the node_id is known only after decrypting it"
        )
    return load_node_key(home, passphrase=passphrase).address


def check_node_key(home: Path) -> None:
    """Raise KeyFileError or KeystoreError unless node.key holds a key (plain hex) or a
    well-formed keystore; without the passphrase, a keystore's secret is not checked."""
    path, data = _read_key(home, NODE_KEY)
    if _looks_like_json(data):
        _parse_keystore(data, path)
    else:
        _parse_hex_key(data, path)


def is_encrypted(home: Path) -> bool:
    """Whether node.key is a keystore (told by content: a keystore starts with ``{``)."""
    return _looks_like_json(_read_key(home, NODE_KEY)[1])


def key_info(home: Path, *, passphrase: Callable[[], bytes] | None = None) -> KeyInfo:
    """Public facts about the keys in ``home``; loads (and so checks) all three files.
    *passphrase*: for a keystore without an address field (:func:`node_id_of`)."""
    return KeyInfo(
        node_id=node_id_of(home, passphrase=passphrase),
        liveness_address=load_liveness_key(home).address,
        rsa_fingerprint=rsa_fingerprint(load_payload_key(home).public_key()),
        encrypted=is_encrypted(home),
        files=_describe_all(home),
    )


def rotate_liveness(home: Path) -> tuple[str | None, str]:
    """Replace liveness.key atomically with a fresh key; return (old, new) addresses.

    The old address is None where there was no old key to load: liveness.key missing, or
    a regular file of ours, mode 0600, that holds no liveness key (malformed). The
    liveness key is a hot key with nothing to keep, so it is made anew then: the next
    registration, signed by node.key, binds the new one. A file that loading refuses as
    unsafe (mode, owner, a symlink, not a regular file, too big) is still refused,
    unchanged, as is an unsafe home: what to do about those is the operator's decision.
    """
    ensure_home(home, create=False)
    if not os.path.lexists(home / NODE_KEY):
        # A directory that is not a node home (a wrong --home): a liveness key made there
        # would later stop `init` as the leftover of an interrupted one.
        raise KeyFileError(
            f"{home} holds no node.key: it is not a node home; fix: pass the node's home "
            "with --home (or NODECLIENT_HOME), or make a node there with `nodeclient init`"
        )
    path = home / LIVENESS_KEY
    old: str | None
    try:
        old = load_liveness_key(home).address
    except KeyFileError:
        if not _replaceable(path):
            raise
        old = None
    new = Secp256k1Key.generate()
    replace_secret(path, (new.to_hex() + "\n").encode("ascii"))
    return old, new.address


def _replaceable(path: Path) -> bool:
    """Whether a liveness.key that did not load may be replaced: it is missing, or it is a
    file that passes every safety check and only its content is wrong."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return secret_problem(path, st) is None


def finish_init(home: Path) -> list[str]:
    """Give the key files of an ``init`` killed while it named them the names they lack.

    See :func:`nodeclient.node.securefile.finish_secrets`: the missing names come from
    the same batch's temporary files, or it refuses, naming what to move aside; the
    leftover temporary files are removed. Returns the names given now.
    """
    ensure_home(home, create=False)
    return finish_secrets([home / n for n in KEY_FILES])


# --- passphrases -----------------------------------------------------------------------


def read_passphrase(
    *,
    passphrase_file: Path | None,
    env: Mapping[str, str],
    prompt: Callable[[str], str] | None,
    confirm: bool = False,
) -> bytes:
    """Get the node.key passphrase: ``--passphrase-file``, else ``$NODECLIENT_PASSPHRASE_FILE``,
    else ``prompt`` (pass one only when stdin is a terminal; see :func:`terminal_prompt`).

    From a file, exactly one trailing line ending (``\\n`` or ``\\r\\n``) is removed; any
    other bytes, including more newlines or spaces, are the passphrase.
    ``confirm`` asks a prompt twice (for ``init``). Empty and non-UTF-8 passphrases are
    refused: keystores are read by tools that treat passphrases as text.
    """
    file = passphrase_file
    if file is None and env.get(PASSPHRASE_FILE_ENV):
        file = Path(env[PASSPHRASE_FILE_ENV])
    if file is not None:
        raw, origin = _read_passphrase_file(file), f"passphrase file {file}"
    elif prompt is not None:
        try:
            first = prompt("Passphrase for node.key: ")
            if confirm and prompt("Repeat the passphrase: ") != first:
                raise UsageError("the two passphrases differ; nothing was changed")
        except EOFError:  # Ctrl-D at the prompt
            raise UsageError("no passphrase entered") from None
        try:
            raw, origin = first.encode("utf-8"), "the prompt"
        except UnicodeEncodeError as exc:
            raise UsageError("the passphrase typed is not valid UTF-8") from exc
    else:
        raise UsageError(
            "node.key is encrypted and no passphrase was given: pass --passphrase-file FILE, "
            f"set {PASSPHRASE_FILE_ENV}=FILE, or run on a terminal to be prompted"
        )
    if not raw:
        raise UsageError(f"empty passphrase from {origin}; an empty passphrase is refused")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"the passphrase from {origin} is not valid UTF-8") from exc
    return raw


def terminal_prompt(stdin: TextIO) -> Callable[[str], str] | None:
    """``getpass.getpass`` when ``stdin`` is a terminal, else None (never prompt a pipe)."""
    return getpass.getpass if stdin.isatty() else None


def _passphrase_file_private(file: Path, st: os.stat_result) -> bool:
    """This user's, readable by nobody else. Or a systemd credential (``LoadCredential=``,
    in the service's own ``$CREDENTIALS_DIRECTORY``, which only the service can enter):
    systemd makes it root's, mode 0400, and grants the service's user an ACL, which shows
    as group bits (0440): there, root's or ours, with no bit for others and none to write."""
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid == os.geteuid() and not mode & 0o077:
        return True
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if not credentials:
        return False
    return (
        os.path.realpath(os.path.dirname(os.path.abspath(file))) == os.path.realpath(credentials)
        and st.st_uid in (0, os.geteuid())
        and not mode & 0o227  # no write bits, nothing for others
    )


def _read_passphrase_file(file: Path) -> bytes:
    """The file's bytes, held to the key files' own rules: a regular file, not a symlink,
    owned by this user and readable by nobody else, or a systemd credential as systemd
    makes it (:func:`_passphrase_file_private`): it unlocks node.key."""
    try:
        fd = os.open(file, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UsageError(f"passphrase file {file} is a symlink: name the file itself") from exc
        raise UsageError(f"cannot open passphrase file {file}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"passphrase file {file} is not a regular file")
        if not _passphrase_file_private(file, st):
            raise UsageError(
                f"passphrase file {file} is mode {stat.S_IMODE(st.st_mode):04o}, owner uid "
                f"{st.st_uid}: it unlocks node.key, so it must be this user's, mode 0600 or "
                f"0400 (chmod 600 {file})"
            )
        raw = os.read(fd, PASSPHRASE_FILE_MAX + 1)
    except OSError as exc:
        raise UsageError(f"cannot read passphrase file {file}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    if len(raw) > PASSPHRASE_FILE_MAX:
        raise UsageError(f"passphrase file {file} is over {PASSPHRASE_FILE_MAX} bytes")
    if raw.endswith(b"\r\n"):
        return raw[:-2]
    return raw[:-1] if raw.endswith(b"\n") else raw


# --- internals ---------------------------------------------------------------------------


def _read_key(home: Path, name: str, *, missing_fix: str = MISSING_FIX) -> tuple[Path, bytes]:
    ensure_home(home, create=False)
    path = home / name
    if missing_fix == MISSING_FIX and initialised(home):
        missing_fix = MISSING_IN_HOME_FIX  # init would refuse this home
    return path, read_secret(path, missing_fix=missing_fix)


def _describe_all(home: Path) -> list[dict[str, object]]:
    return [describe_file(home / n) for n in KEY_FILES]


def _looks_like_json(data: bytes) -> bool:
    return data.lstrip()[:1] == b"{"


def _parse_hex_key(data: bytes, path: Path) -> Secp256k1Key:
    """Parse ``0x`` + 64 hex digits; the error names the file but never echoes its bytes."""
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise KeyFileError(f"malformed {path}: not ASCII hex") from None
    match = _HEX_RE.match(text)
    if match is None:
        raise KeyFileError(f"malformed {path}: expected 0x followed by 64 hex digits")
    digits = match.group(1)
    if len(digits) != 64:
        raise KeyFileError(
            f"malformed {path}: expected 0x followed by 64 hex digits (32 bytes), "
            f"found {len(digits)} hex digits"
        )
    try:
        return Secp256k1Key(bytes.fromhex(digits))
    except KeyFileError as exc:
        raise KeyFileError(f"malformed {path}: {exc}") from exc


@dataclass(frozen=True)
class _Keystore:
    """A keystore after strict parsing: ``document`` holds exactly the validated fields,
    so eth-account decrypts what we checked, never a field we did not look at."""

    document: dict[str, object]
    address: str | None


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        lowered = key.lower()  # eth-account matches keys case-insensitively
        if lowered in out:
            raise KeystoreError(f"duplicate field {key!r}")
        out[lowered] = value
    return out


def _reject_constant(name: str) -> object:
    raise KeystoreError(f"non-standard JSON number {name}")


class _Checker:
    """Field checks for one keystore; every refusal names the file and the field."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, what: str) -> KeystoreError:
        return KeystoreError(f"refusing keystore {self.path}: {what}")

    def obj(self, parent: dict[str, object], field: str) -> dict[str, object]:
        value = parent.get(field)
        if not isinstance(value, dict):
            raise self.fail(f"{field} must be an object")
        return value

    def integer(self, params: dict[str, object], field: str, low: int, high: int) -> int:
        value = params.get(field)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(f"kdfparams.{field} must be an integer")
        if value > high:
            raise self.fail(f"kdfparams.{field} = {value} exceeds the cap {high}")
        if value < low:
            raise self.fail(f"kdfparams.{field} = {value} is below the minimum {low}")
        return value

    def hex(self, parent: dict[str, object], field: str, low: int, high: int) -> str:
        value = parent.get(field)
        match = _HEX_RE.match(value) if isinstance(value, str) else None
        if match is None or len(match.group(1)) % 2:
            raise self.fail(f"{field} must be a hex string")
        size = len(match.group(1)) // 2
        if not low <= size <= high:
            raise self.fail(f"{field} must be {low}..{high} bytes, not {size}")
        return match.group(1).lower()


def _parse_keystore(data: bytes, path: Path) -> _Keystore:
    """Validate a v3 keystore completely, and cap its KDF cost, without running the KDF."""
    try:
        doc = json.loads(
            data.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_reject_constant,
        )
    except KeystoreError as exc:
        raise KeystoreError(f"malformed keystore {path}: {exc}") from exc
    # JSONDecodeError, UnicodeDecodeError, the int digit limit; RecursionError: nested too
    # deep ("[[[[..."), which no keystore is
    except (ValueError, RecursionError) as exc:
        raise KeystoreError(f"malformed keystore {path}: not valid JSON") from exc
    check = _Checker(path)
    if not isinstance(doc, dict):
        raise check.fail("not a JSON object")
    version = doc.get("version")
    if version != 3 or isinstance(version, bool) or not isinstance(version, int):
        raise check.fail(f"version must be 3, not {version!r}")
    crypto = check.obj(doc, "crypto")
    if crypto.get("cipher") != "aes-128-ctr":
        raise check.fail(f"cipher must be aes-128-ctr, not {crypto.get('cipher')!r}")
    kdf, kdfparams = _kdf_params(check, crypto)
    document: dict[str, object] = {
        "version": 3,
        "crypto": {
            "cipher": "aes-128-ctr",
            "cipherparams": {"iv": check.hex(check.obj(crypto, "cipherparams"), "iv", 16, 16)},
            "ciphertext": check.hex(crypto, "ciphertext", 32, 32),
            "kdf": kdf,
            "kdfparams": kdfparams,
            "mac": check.hex(crypto, "mac", 32, 32),
        },
    }
    return _Keystore(document, _keystore_address(check, doc.get("address")))


def _kdf_params(check: _Checker, crypto: dict[str, object]) -> tuple[str, dict[str, object]]:
    """The KDF name and its parameters, each within its cap (see MAX_SCRYPT_N and friends)."""
    params = check.obj(crypto, "kdfparams")
    kdf = crypto.get("kdf")
    clean: dict[str, object]
    if kdf == "scrypt":
        n = check.integer(params, "n", 2, MAX_SCRYPT_N)
        if n & (n - 1):
            raise check.fail(f"kdfparams.n = {n} is not a power of two")
        _at_least(check, "kdfparams.n", n, MIN_SCRYPT_N)
        r = check.integer(params, "r", 1, MAX_SCRYPT_R)
        p = check.integer(params, "p", 1, MAX_SCRYPT_P)
        if n * r * p > MAX_SCRYPT_COST:  # n * r is at most 2^21 by the caps of each
            raise check.fail(f"kdfparams n*r*p = {n * r * p} exceeds the cap {MAX_SCRYPT_COST}")
        _at_least(check, "kdfparams n*r", n * r, MIN_SCRYPT_NR)
        clean = {"n": n, "r": r, "p": p}
    elif kdf == "pbkdf2":
        c = check.integer(params, "c", 1, MAX_PBKDF2_C)
        _at_least(check, "kdfparams.c", c, MIN_PBKDF2_C)
        if params.get("prf") != "hmac-sha256":
            raise check.fail(f"kdfparams.prf must be hmac-sha256, not {params.get('prf')!r}")
        clean = {"c": c, "prf": "hmac-sha256"}
    else:
        raise check.fail(f"kdf must be scrypt or pbkdf2, not {kdf!r}")
    clean["dklen"] = check.integer(params, "dklen", _DKLEN, _DKLEN)
    salt = clean["salt"] = check.hex(params, "salt", 1, 64)
    _at_least(check, "bytes of kdfparams.salt", len(salt) // 2, MIN_SALT_BYTES)
    return kdf, clean


def _at_least(check: _Checker, what: str, value: int, minimum: int) -> None:
    """Refuse a keystore whose passphrase could be tried too fast."""
    if value < minimum:
        raise check.fail(
            f"{what} = {value} is below the minimum {minimum}: a passphrase behind it can "
            "be tried too fast; fix: encrypt the key again with stronger parameters (e.g. "
            "eth-account's Account.encrypt defaults, or `geth account update`)"
        )


def _keystore_address(check: _Checker, address: object) -> str | None:
    """The optional address field (geth: lowercase, eth-account: checksummed; no 0x)."""
    if address is None:
        return None
    if not isinstance(address, str):
        raise check.fail("address must be a hex string")
    try:
        raw = parse_address(address if address[:2] in ("0x", "0X") else "0x" + address)
    except SignatureError as exc:
        raise check.fail(str(exc)) from exc
    return to_checksum_address(raw)


def _passphrase_text(passphrase: bytes) -> str:
    if not passphrase:
        raise UsageError("an empty passphrase is refused")
    try:
        return passphrase.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError("the passphrase is not valid UTF-8") from exc


def _decrypt(keystore: _Keystore, passphrase: bytes, path: Path) -> Secp256k1Key:
    password = _passphrase_text(passphrase)
    try:
        secret = bytes(Account.decrypt(keystore.document, password))
    except ValueError as exc:
        # Every field was validated above, so eth-account's only remaining ValueError is
        # its MAC mismatch: the passphrase (or, rarely, a corrupted file) is wrong.
        raise KeystoreError(f"wrong passphrase for {path}") from exc
    try:
        return Secp256k1Key(secret)
    except KeyFileError as exc:
        raise KeystoreError(f"{path} decrypts to an invalid secp256k1 key: {exc}") from exc


def _encrypt_node_key(key: Secp256k1Key, passphrase: bytes, path: Path) -> bytes:
    """The keystore bytes for ``key``, re-read through our own strict parser as a check."""
    keystore = Account.encrypt(
        key.secret, _passphrase_text(passphrase), kdf="scrypt", iterations=SCRYPT_N
    )
    data = (json.dumps(keystore, sort_keys=True) + "\n").encode("utf-8")
    parsed = _parse_keystore(data, path)
    crypto = parsed.document["crypto"]
    params = crypto.get("kdfparams") if isinstance(crypto, dict) else None
    expected = {"n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P, "dklen": _DKLEN}
    if not isinstance(params, dict) or any(params.get(k) != v for k, v in expected.items()):
        raise KeystoreError(f"eth-account produced unexpected scrypt parameters: {params}")
    if parsed.address != key.address:
        raise KeystoreError("eth-account produced a keystore with the wrong address")
    return data
