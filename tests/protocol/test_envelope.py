"""Tests of the payload envelope (2.3.4 Payload Decryption).

The envelope is taken apart here with a small parser written from the documented format,
not with the module's own code, and its cryptography is cross-checked against the
``openssl`` command line, so a bug shared by sealer and opener still shows.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import subprocess
import tracemalloc
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from nodeclient.errors import EnvelopeError, LocalProtocolError
from nodeclient.protocol.canonical import canonical_json
from nodeclient.protocol.envelope import (
    ENVELOPE_ERROR_MESSAGE,
    MAX_CHUNK_SIZE,
    EnvelopeHeader,
    open_envelope,
    open_stream,
    peek_header,
    seal,
    seal_stream,
)

TASK = uuid.UUID("6f1c2a3e-9b0d-4c57-8e21-3d4f5a6b7c8d")
NODE = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"  # the EIP-55 example address
EXPIRES = 1_700_000_000
SMALL_CHUNK = 16
# Three full chunks and a short final one: every kind of chunk appears.
SMALL_PAYLOAD = bytes(range(3 * SMALL_CHUNK + 5))
OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    """The node's RSA-3072 key; generated once because keygen takes about a second."""
    return rsa.generate_private_key(public_exponent=65537, key_size=3072)


@pytest.fixture(scope="module")
def other_key() -> rsa.RSAPrivateKey:
    """Some other node's RSA-3072 key."""
    return rsa.generate_private_key(public_exponent=65537, key_size=3072)


@pytest.fixture(scope="module")
def small_env(key: rsa.RSAPrivateKey) -> bytes:
    """A four-chunk envelope small enough to tamper with at every byte."""
    return _seal(key, SMALL_PAYLOAD, chunk_size=SMALL_CHUNK)


# --- an independent reader of the documented format ----------------------------------


@dataclass(frozen=True)
class Chunk:
    offset: int  # where the chunk's nonce starts in the envelope
    nonce: bytes
    ct_len: int
    body: bytes  # ciphertext || tag

    @property
    def end(self) -> int:
        return self.offset + 16 + self.ct_len


@dataclass(frozen=True)
class Parsed:
    preamble: bytes
    header: bytes
    wrapped: bytes
    chunks: list[Chunk]


def parse(env: bytes) -> Parsed:
    """Split an envelope into its parts, straight from the byte layout in the docs."""
    assert env[:4] == b"NCE1"
    (header_len,) = struct.unpack(">I", env[4:8])
    header = env[8 : 8 + header_len]
    pos = 8 + header_len
    (wrapped_len,) = struct.unpack(">H", env[pos : pos + 2])
    wrapped = env[pos + 2 : pos + 2 + wrapped_len]
    pos += 2 + wrapped_len
    preamble = env[:pos]
    chunks = []
    while pos < len(env):
        (ct_len,) = struct.unpack(">I", env[pos + 12 : pos + 16])
        chunks.append(Chunk(pos, env[pos : pos + 12], ct_len, env[pos + 16 : pos + 16 + ct_len]))
        pos += 16 + ct_len
    assert pos == len(env)
    return Parsed(preamble, header, wrapped, chunks)


def chunk_aad(preamble: bytes, index: int, *, final: bool) -> bytes:
    """The documented AAD: SHA-256(preamble) || u64 BE index || u8 final flag."""
    return hashlib.sha256(preamble).digest() + struct.pack(">QB", index, int(final))


def rebuild(
    parsed: Parsed, *, header: bytes | None = None, chunks: list[bytes] | None = None
) -> bytes:
    """Reassemble an envelope, optionally with another header or another chunk list."""
    head = parsed.header if header is None else header
    body = [env_slice(c) for c in parsed.chunks] if chunks is None else chunks
    return b"".join(
        [
            b"NCE1",
            struct.pack(">I", len(head)),
            head,
            struct.pack(">H", len(parsed.wrapped)),
            parsed.wrapped,
            *body,
        ]
    )


def env_slice(c: Chunk) -> bytes:
    return c.nonce + struct.pack(">I", c.ct_len) + c.body


STANDARD_HEADER = {
    "v": 1,
    "alg": "RSA-OAEP-256+A256GCM",
    "task_id": str(TASK),
    "node_id": NODE,
    "expires_at": EXPIRES,
    "chunk_size": SMALL_CHUNK,
}
SMALL_PIECES = [
    SMALL_PAYLOAD[i : i + SMALL_CHUNK] for i in range(0, len(SMALL_PAYLOAD), SMALL_CHUNK)
]


def hand_built(
    wrapped: bytes,
    aes_key: bytes,
    pieces: list[bytes],
    *,
    header: bytes | None = None,
    magic: bytes = b"NCE1",
) -> bytes:
    """A correctly authenticated envelope, built from the documented format alone.

    Lets a test present framings the sealer never produces, with valid tags, so that only
    the opener's own checks can refuse them.
    """
    head = canonical_json(STANDARD_HEADER) if header is None else header
    preamble = (
        magic + struct.pack(">I", len(head)) + head + struct.pack(">H", len(wrapped)) + wrapped
    )
    body = b""
    for i, piece in enumerate(pieces):
        nonce = os.urandom(12)
        aad = chunk_aad(preamble, i, final=i == len(pieces) - 1)
        ct = AESGCM(aes_key).encrypt(nonce, piece, aad)
        body += nonce + struct.pack(">I", len(ct)) + ct
    return preamble + body


def by_hand(key: rsa.RSAPrivateKey, pieces: list[bytes], *, header: bytes | None = None) -> bytes:
    """hand_built with a fresh AES key wrapped by the cryptography package."""
    aes_key = os.urandom(32)
    return hand_built(key.public_key().encrypt(aes_key, OAEP), aes_key, pieces, header=header)


# --- helpers -------------------------------------------------------------------------


def _seal(key: rsa.RSAPrivateKey, data: bytes, *, chunk_size: int = SMALL_CHUNK) -> bytes:
    return seal(
        data,
        public_key=key.public_key(),
        task_id=TASK,
        node_id=NODE,
        expires_at=EXPIRES,
        chunk_size=chunk_size,
    )


def _open(env: bytes, key: rsa.RSAPrivateKey, **overrides: object) -> bytes:
    kwargs: dict[str, object] = {"task_id": TASK, "node_id": NODE, "now": EXPIRES}
    kwargs.update(overrides)
    return open_envelope(env, private_key=key, **kwargs)  # type: ignore[arg-type]


def _rejected(env: bytes, key: rsa.RSAPrivateKey, **overrides: object) -> EnvelopeError | None:
    """The EnvelopeError that opening raises, or None if it opened."""
    try:
        _open(env, key, **overrides)
    except EnvelopeError as exc:
        return exc
    return None


def assert_rejected(env: bytes, key: rsa.RSAPrivateKey, **overrides: object) -> None:
    """Opening fails with the one fixed message and no cause that tells failures apart."""
    exc = _rejected(env, key, **overrides)
    assert exc is not None, "envelope opened but should not have"
    assert str(exc) == ENVELOPE_ERROR_MESSAGE
    assert exc.__cause__ is None
    assert exc.__context__ is None


def flip(data: bytes, offset: int, bit: int = 0) -> bytes:
    out = bytearray(data)
    out[offset] ^= 1 << bit
    return bytes(out)


# --- round trips ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "size",
    [0, 1, SMALL_CHUNK - 1, SMALL_CHUNK, 4 * SMALL_CHUNK, 4 * SMALL_CHUNK + 1],
    ids=["empty", "one-byte", "under-one-chunk", "one-chunk", "exact-multiple", "multiple+1"],
)
def test_round_trip(key: rsa.RSAPrivateKey, size: int) -> None:
    """Payloads of every boundary size open to exactly what was sealed."""
    data = os.urandom(size)
    assert _open(_seal(key, data), key) == data


def test_empty_payload_is_one_empty_final_chunk(key: rsa.RSAPrivateKey) -> None:
    """An empty payload is framed as a single chunk holding only a tag."""
    chunks = parse(_seal(key, b"")).chunks
    assert [c.ct_len for c in chunks] == [16]


def test_exact_multiple_has_no_empty_trailing_chunk(key: rsa.RSAPrivateKey) -> None:
    """A payload of whole chunks ends with a full final chunk, not an empty one."""
    chunks = parse(_seal(key, bytes(4 * SMALL_CHUNK))).chunks
    assert [c.ct_len for c in chunks] == [SMALL_CHUNK + 16] * 4


def test_multi_mebibyte_with_small_chunks(key: rsa.RSAPrivateKey) -> None:
    """A 3 MiB payload in 4 KiB chunks round-trips through many chunks."""
    data = os.urandom((3 << 20) + 123)
    env = _seal(key, data, chunk_size=4096)
    assert len(parse(env).chunks) == len(data) // 4096 + 1
    assert _open(env, key) == data


class TrickleReader(io.RawIOBase):
    """A raw stream that hands out at most 7 bytes per read, like a slow socket."""

    def __init__(self, data: bytes) -> None:
        self._src = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        chunk = self._src.read(min(7, len(buf)))
        buf[: len(chunk)] = chunk
        return len(chunk)


def test_streaming_round_trip_with_short_reads(key: rsa.RSAPrivateKey) -> None:
    """seal_stream and open_stream agree byte counts and survive short reads on both sides."""
    data = os.urandom(10_000)
    sealed = io.BytesIO()
    written = seal_stream(
        TrickleReader(data),  # type: ignore[arg-type]
        sealed,
        public_key=key.public_key(),
        task_id=TASK,
        node_id=NODE,
        expires_at=EXPIRES,
        chunk_size=1000,
    )
    assert written == len(sealed.getvalue())
    out = io.BytesIO()
    n = open_stream(
        TrickleReader(sealed.getvalue()),  # type: ignore[arg-type]
        out,
        private_key=key,
        task_id=TASK,
        node_id=NODE,
        now=EXPIRES,
    )
    assert n == len(data)
    assert out.getvalue() == data


class Sink(io.RawIOBase):
    """A writable stream that discards everything."""

    def writable(self) -> bool:
        return True

    def write(self, b: object) -> int:
        return len(memoryview(b))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "wrap",
    [io.BytesIO, lambda b: io.BufferedReader(io.BytesIO(b))],
    ids=["bytesio", "buffered-reader"],
)
def test_open_stream_memory_is_bounded_by_chunk_size(
    key: rsa.RSAPrivateKey, wrap: Callable[[bytes], io.IOBase]
) -> None:
    """Opening 8 MiB in 64 KiB chunks allocates a few chunks' worth, not the payload.

    Both source kinds: an in-memory BytesIO (sliced in place) and a buffered stream
    (read chunk by chunk into a reused buffer, as a file or socket would be).
    """
    chunk = 64 << 10
    src = wrap(_seal(key, os.urandom(8 << 20), chunk_size=chunk))
    tracemalloc.start()
    try:
        n = open_stream(src, Sink(), private_key=key, task_id=TASK, node_id=NODE, now=EXPIRES)  # type: ignore[arg-type]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == 8 << 20
    assert peak < 4 * chunk


def test_open_stream_leaves_bytesio_after_the_envelope(
    key: rsa.RSAPrivateKey, small_env: bytes
) -> None:
    """An in-memory source ends positioned after the envelope, as a plain read would leave it."""
    src = io.BytesIO(b"prefix" + small_env)
    src.seek(len(b"prefix"))
    open_stream(src, io.BytesIO(), private_key=key, task_id=TASK, node_id=NODE, now=EXPIRES)
    assert src.tell() == len(b"prefix") + len(small_env)


def test_sealing_is_randomised(key: rsa.RSAPrivateKey) -> None:
    """The same payload sealed twice shares no wrapped key or nonce; nonces differ per chunk."""
    a, b = parse(_seal(key, SMALL_PAYLOAD)), parse(_seal(key, SMALL_PAYLOAD))
    assert a.wrapped != b.wrapped
    nonces = [c.nonce for c in a.chunks + b.chunks]
    assert len(set(nonces)) == len(nonces)


# --- header --------------------------------------------------------------------------


def test_header_is_canonical_json_of_documented_fields(small_env: bytes) -> None:
    """The header is the RFC 8785 encoding of exactly the documented fields."""
    header = parse(small_env).header
    expected = {
        "v": 1,
        "alg": "RSA-OAEP-256+A256GCM",
        "task_id": str(TASK),
        "node_id": NODE,
        "expires_at": EXPIRES,
        "chunk_size": SMALL_CHUNK,
    }
    assert header == canonical_json(expected)


def test_peek_header_reads_fields_without_a_key(small_env: bytes) -> None:
    """peek_header returns the routing fields of an envelope."""
    assert peek_header(small_env) == EnvelopeHeader(
        version=1,
        algorithm="RSA-OAEP-256+A256GCM",
        task_id=TASK,
        node_id=NODE,
        expires_at=EXPIRES,
        chunk_size=SMALL_CHUNK,
    )


def test_peek_header_rejects_garbage() -> None:
    """peek_header fails closed with the one message on input that is not an envelope."""
    with pytest.raises(EnvelopeError, match=f"^{ENVELOPE_ERROR_MESSAGE}$"):
        peek_header(b"NCE1\x00\x00\x00\x05{}")


# --- tamper matrix -------------------------------------------------------------------


def _reencoded(small_env: bytes, field: str, value: object) -> bytes:
    header = json.loads(parse(small_env).header)
    header[field] = value
    return rebuild(parse(small_env), header=canonical_json(header))


def test_reencoding_unchanged_header_still_opens(key: rsa.RSAPrivateKey, small_env: bytes) -> None:
    """Control for the field tampering below: the re-encoding helper alone breaks nothing."""
    assert _open(_reencoded(small_env, "v", 1), key) == SMALL_PAYLOAD


OTHER_TASK = uuid.UUID("00000000-0000-4000-8000-000000000001")
OTHER_NODE = "0x" + "11" * 20


@pytest.mark.parametrize(
    ("field", "value", "overrides"),
    [
        ("v", 2, {}),
        ("alg", "RSA-OAEP-256+A128GCM", {}),
        # The opener is told to expect the altered value, so only the AAD can catch it.
        ("task_id", str(OTHER_TASK), {"task_id": OTHER_TASK}),
        ("node_id", OTHER_NODE, {"node_id": OTHER_NODE}),
        ("expires_at", EXPIRES + 3600, {}),
        ("chunk_size", 2 * SMALL_CHUNK, {}),
        ("chunk_size", SMALL_CHUNK + 1, {}),
    ],
)
def test_altered_header_field_is_rejected(
    key: rsa.RSAPrivateKey,
    small_env: bytes,
    field: str,
    value: object,
    overrides: dict[str, object],
) -> None:
    """Each header field, changed and validly re-encoded, makes the envelope fail."""
    assert_rejected(_reencoded(small_env, field, value), key, **overrides)


def test_every_bit_of_header_is_authenticated(key: rsa.RSAPrivateKey, small_env: bytes) -> None:
    """Flipping any one bit of magic, header length, header or key length is rejected."""
    wrapped_start = len(parse(small_env).preamble) - len(parse(small_env).wrapped)
    opened = [
        (i, bit)
        for i in range(wrapped_start)
        for bit in range(8)
        if _rejected(flip(small_env, i, bit), key) is None
    ]
    assert opened == []


def test_every_byte_of_wrapped_key_is_authenticated(
    key: rsa.RSAPrivateKey, small_env: bytes
) -> None:
    """Flipping a bit in any byte of the wrapped AES key is rejected (bit varies by byte)."""
    p = parse(small_env)
    start = len(p.preamble) - len(p.wrapped)
    for i in range(start, len(p.preamble)):
        assert_rejected(flip(small_env, i, i % 8), key)


def test_every_bit_of_every_chunk_is_authenticated(
    key: rsa.RSAPrivateKey, small_env: bytes
) -> None:
    """Flipping any one bit of any chunk's nonce, length, ciphertext or tag is rejected."""
    start = len(parse(small_env).preamble)
    opened = [
        (i, bit)
        for i in range(start, len(small_env))
        for bit in range(8)
        if _rejected(flip(small_env, i, bit), key) is None
    ]
    assert opened == []


@pytest.mark.parametrize("index", range(4))
@pytest.mark.parametrize(
    ("part", "rel"),
    [
        ("nonce", 0),
        ("nonce", 11),
        ("length", 12),
        ("length", 15),
        ("ciphertext", 16),
        ("tag", -16),
        ("tag", -1),
    ],
)
def test_flip_at_chunk_boundary(
    key: rsa.RSAPrivateKey, small_env: bytes, index: int, part: str, rel: int
) -> None:
    """A flipped bit at the edges of each chunk's fields fails with the one message."""
    c = parse(small_env).chunks[index]
    offset = c.offset + rel if rel >= 0 else c.end + rel
    assert_rejected(flip(small_env, offset, 7), key)


def test_truncation_at_every_offset_is_rejected(key: rsa.RSAPrivateKey, small_env: bytes) -> None:
    """Every proper prefix of an envelope, including the empty one, fails to open."""
    for cut in range(len(small_env)):
        assert_rejected(small_env[:cut], key)


def test_dropping_final_chunk_at_boundary_is_rejected(
    key: rsa.RSAPrivateKey, small_env: bytes
) -> None:
    """Cutting exactly before the final chunk leaves well-framed full chunks; still refused."""
    p = parse(small_env)
    assert_rejected(small_env[: p.chunks[-1].offset], key)
    # Also for a payload of whole chunks, where the remainder looks like a complete payload.
    whole = _seal(key, bytes(4 * SMALL_CHUNK))
    assert_rejected(whole[: parse(whole).chunks[-1].offset], key)


def test_open_stream_truncation_is_detected_at_the_end(
    key: rsa.RSAPrivateKey, small_env: bytes
) -> None:
    """open_stream may have written verified chunks before it detects truncation.

    This is the documented contract: the consumer must discard dst when it raises.
    """
    out = io.BytesIO()
    with pytest.raises(EnvelopeError, match=f"^{ENVELOPE_ERROR_MESSAGE}$"):
        open_stream(
            io.BytesIO(small_env[: parse(small_env).chunks[-1].offset]),
            out,
            private_key=key,
            task_id=TASK,
            node_id=NODE,
            now=EXPIRES,
        )
    assert out.getvalue() == SMALL_PAYLOAD[: 2 * SMALL_CHUNK]


def test_reordered_chunks_are_rejected(key: rsa.RSAPrivateKey, small_env: bytes) -> None:
    """Swapping two full chunks is rejected."""
    p = parse(small_env)
    body = [env_slice(c) for c in p.chunks]
    body[0], body[1] = body[1], body[0]
    assert_rejected(rebuild(p, chunks=body), key)


def test_duplicated_chunk_is_rejected(key: rsa.RSAPrivateKey, small_env: bytes) -> None:
    """Repeating a chunk is rejected."""
    p = parse(small_env)
    body = [env_slice(c) for c in p.chunks]
    body.insert(1, body[1])
    assert_rejected(rebuild(p, chunks=body), key)


@pytest.mark.parametrize("extra", [b"\x00", bytes(12), bytes(16), None], ids=str)
def test_appended_bytes_are_rejected(
    key: rsa.RSAPrivateKey, small_env: bytes, extra: bytes | None
) -> None:
    """Anything after the final chunk (bytes, or a copy of the final chunk) is rejected."""
    tail = env_slice(parse(small_env).chunks[-1]) if extra is None else extra
    assert_rejected(small_env + tail, key)


def test_wrong_private_key_is_rejected(other_key: rsa.RSAPrivateKey, small_env: bytes) -> None:
    """Another node's key cannot open the envelope."""
    assert_rejected(small_env, other_key)


def test_wrong_task_is_rejected(key: rsa.RSAPrivateKey, small_env: bytes) -> None:
    """An envelope for another task is refused."""
    assert_rejected(small_env, key, task_id=OTHER_TASK)


def test_wrong_node_is_rejected(key: rsa.RSAPrivateKey, small_env: bytes) -> None:
    """An envelope for another node is refused."""
    assert_rejected(small_env, key, node_id=OTHER_NODE)


def test_node_id_compares_address_bytes(key: rsa.RSAPrivateKey, small_env: bytes) -> None:
    """The expected node id may be given in lower case: the 20 bytes are what count."""
    assert _open(small_env, key, node_id=NODE.lower()) == SMALL_PAYLOAD


def test_expired_is_rejected_and_expiry_second_is_not(
    key: rsa.RSAPrivateKey, small_env: bytes
) -> None:
    """Expired means now > expires_at: the expiry second itself still opens."""
    assert _open(small_env, key, now=EXPIRES) == SMALL_PAYLOAD
    assert_rejected(small_env, key, now=EXPIRES + 1)


def test_max_plaintext_is_enforced(key: rsa.RSAPrivateKey, small_env: bytes) -> None:
    """A payload above max_plaintext is refused; one exactly at it opens."""
    assert _open(small_env, key, max_plaintext=len(SMALL_PAYLOAD)) == SMALL_PAYLOAD
    assert_rejected(small_env, key, max_plaintext=len(SMALL_PAYLOAD) - 1)


# --- malformed framing ---------------------------------------------------------------


def test_bad_magic_is_rejected(key: rsa.RSAPrivateKey) -> None:
    """Input that does not start with NCE1 is refused, even with tags computed over it."""
    aes_key = os.urandom(32)
    wrapped = key.public_key().encrypt(aes_key, OAEP)
    assert_rejected(hand_built(wrapped, aes_key, SMALL_PIECES, magic=b"NCE2"), key)


def test_absurd_header_length_is_rejected(key: rsa.RSAPrivateKey, small_env: bytes) -> None:
    """A header length of 4 GiB is refused before anything is read or allocated."""
    env = b"NCE1\xff\xff\xff\xff" + small_env[8:]
    tracemalloc.start()
    try:
        assert_rejected(env, key)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_absurd_chunk_size_is_rejected(key: rsa.RSAPrivateKey, small_env: bytes) -> None:
    """A header announcing chunks above MAX_CHUNK_SIZE is refused."""
    assert_rejected(_reencoded(small_env, "chunk_size", MAX_CHUNK_SIZE + 1), key)


def test_absurd_chunk_length_is_rejected(key: rsa.RSAPrivateKey, small_env: bytes) -> None:
    """A chunk length field beyond chunk_size + tag is refused."""
    p = parse(small_env)
    body = [env_slice(c) for c in p.chunks]
    body[0] = body[0][:12] + b"\xff\xff\xff\xff" + body[0][16:]
    assert_rejected(rebuild(p, chunks=body), key)


@pytest.mark.parametrize("ct_len", [0, 1, 15])
def test_chunk_shorter_than_a_tag_is_rejected(
    key: rsa.RSAPrivateKey, small_env: bytes, ct_len: int
) -> None:
    """A final chunk whose length field cannot even hold a tag is refused."""
    p = parse(small_env)
    body = [env_slice(c) for c in p.chunks]
    last = p.chunks[-1]
    body[-1] = last.nonce + struct.pack(">I", ct_len) + last.body[:ct_len]
    assert_rejected(rebuild(p, chunks=body), key)


def test_hand_built_control_opens(key: rsa.RSAPrivateKey) -> None:
    """Control for the framing tests below: the hand builder's standard envelope opens."""
    assert _open(by_hand(key, SMALL_PIECES), key) == SMALL_PAYLOAD


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b'"v":1', b'"v": 1'),  # whitespace
        (b'"v":1', b'"v":2,"v":1'),  # duplicate key, last one right
        (b'"v":1', b'"v":1.0'),  # a float where JCS writes an integer
        (str(TASK).encode(), str(TASK).upper().encode()),  # non-canonical UUID text
        (NODE.encode(), NODE.lower().encode()),  # node_id without its EIP-55 checksum
    ],
    ids=["space", "duplicate-key", "float", "uuid-case", "node-case"],
)
def test_authenticated_non_canonical_header_is_rejected(
    key: rsa.RSAPrivateKey, old: bytes, new: bytes
) -> None:
    """A header that is not the one JCS encoding is refused even with valid tags."""
    header = canonical_json(STANDARD_HEADER).replace(old, new, 1)
    assert_rejected(by_hand(key, SMALL_PIECES, header=header), key)


def test_authenticated_empty_trailing_chunk_is_rejected(key: rsa.RSAPrivateKey) -> None:
    """An empty final chunk after data, validly tagged, is refused: one framing per payload."""
    whole = [bytes(SMALL_CHUNK)] * 3
    assert _open(by_hand(key, whole), key) == bytes(3 * SMALL_CHUNK)  # control
    assert_rejected(by_hand(key, [*whole, b""]), key)


@pytest.mark.parametrize("key_len", [16, 24])
def test_authenticated_shorter_aes_key_is_rejected(key: rsa.RSAPrivateKey, key_len: int) -> None:
    """Chunks sealed under an AES-128 or AES-192 key are refused: the format is AES-256."""
    aes_key = os.urandom(key_len)
    wrapped = key.public_key().encrypt(aes_key, OAEP)
    assert_rejected(hand_built(wrapped, aes_key, SMALL_PIECES), key)


def test_authenticated_short_middle_chunk_is_rejected(key: rsa.RSAPrivateKey) -> None:
    """A short chunk that is not the final one is refused even with valid tags."""
    pieces = [SMALL_PIECES[0][:5], *SMALL_PIECES[1:]]
    assert_rejected(by_hand(key, pieces), key)


def test_authenticated_wrapped_key_length_mismatch_is_rejected(key: rsa.RSAPrivateKey) -> None:
    """A wrapped key that is not exactly the modulus length is refused."""
    aes_key = os.urandom(32)
    wrapped = b"\x00" + key.public_key().encrypt(aes_key, OAEP)
    assert_rejected(hand_built(wrapped, aes_key, SMALL_PIECES), key)


def test_padding_and_tag_failures_look_the_same(key: rsa.RSAPrivateKey, small_env: bytes) -> None:
    """A wrapped key that fails OAEP and one that unwraps to the wrong AES key fail alike."""
    p = parse(small_env)
    garbage = os.urandom(len(p.wrapped))  # fails OAEP padding
    wrong = key.public_key().encrypt(os.urandom(32), OAEP)  # valid padding, wrong AES key
    short = key.public_key().encrypt(os.urandom(16), OAEP)  # valid padding, wrong length
    errors = []
    for wrapped in (garbage, wrong, short):
        env = b"".join([p.preamble[: -len(p.wrapped)], wrapped, small_env[len(p.preamble) :]])
        exc = _rejected(env, key)
        assert exc is not None
        errors.append((type(exc), str(exc), exc.__cause__))
    assert errors == [(EnvelopeError, ENVELOPE_ERROR_MESSAGE, None)] * 3


# --- sealing argument errors ---------------------------------------------------------


def test_seal_refuses_a_key_below_rsa_3072() -> None:
    """Sealing to a weaker key is a local bug, not an envelope failure."""
    weak = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(LocalProtocolError):
        _seal(weak, b"x")


def test_larger_rsa_keys_round_trip() -> None:
    """A node key above RSA-3072, which a manifest may declare, seals and opens."""
    big = rsa.generate_private_key(public_exponent=65537, key_size=4096)
    env = _seal(big, SMALL_PAYLOAD)
    assert len(parse(env).wrapped) == 512
    assert _open(env, big) == SMALL_PAYLOAD


@pytest.mark.parametrize("chunk_size", [0, 15, MAX_CHUNK_SIZE + 1])
def test_seal_refuses_absurd_chunk_size(key: rsa.RSAPrivateKey, chunk_size: int) -> None:
    """Chunk sizes outside the accepted range are refused when sealing too."""
    with pytest.raises(LocalProtocolError):
        _seal(key, b"x", chunk_size=chunk_size)


def test_seal_refuses_malformed_node_id(key: rsa.RSAPrivateKey) -> None:
    """A node id that is not an address is refused before any crypto."""
    with pytest.raises(LocalProtocolError):
        seal(b"x", public_key=key.public_key(), task_id=TASK, node_id="node-1", expires_at=1)


# --- independent implementation: openssl ---------------------------------------------


def _openssl(tmp_path: Path, key: rsa.RSAPrivateKey, mode: str, data: bytes) -> bytes:
    """Run ``openssl pkeyutl`` with RSA-OAEP, SHA-256 and MGF1-SHA-256 on *data*."""
    pem = tmp_path / "key.pem"
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pem.chmod(0o600)
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    result = subprocess.run(
        [
            "openssl",
            "pkeyutl",
            mode,
            "-inkey",
            str(pem),
            "-in",
            str(src),
            "-pkeyopt",
            "rsa_padding_mode:oaep",
            "-pkeyopt",
            "rsa_oaep_md:sha256",
            "-pkeyopt",
            "rsa_mgf1_md:sha256",
        ],
        capture_output=True,
        check=True,
        timeout=30,
    )
    return result.stdout


def test_openssl_unwraps_key_that_decrypts_chunks(
    key: rsa.RSAPrivateKey, small_env: bytes, tmp_path: Path
) -> None:
    """openssl unwraps the AES key; a separate AESGCM opens first and last chunk with it."""
    p = parse(small_env)
    aes_key = _openssl(tmp_path, key, "-decrypt", p.wrapped)
    assert len(aes_key) == 32
    aead = AESGCM(aes_key)
    first, last = p.chunks[0], p.chunks[-1]
    aad0 = chunk_aad(p.preamble, 0, final=False)
    assert aead.decrypt(first.nonce, first.body, aad0) == SMALL_PAYLOAD[:SMALL_CHUNK]
    aad_last = chunk_aad(p.preamble, len(p.chunks) - 1, final=True)
    assert aead.decrypt(last.nonce, last.body, aad_last) == SMALL_PAYLOAD[3 * SMALL_CHUNK :]


def test_envelope_built_by_hand_with_openssl_opens(key: rsa.RSAPrivateKey, tmp_path: Path) -> None:
    """An envelope assembled from the documented format, key wrapped by openssl, opens."""
    aes_key = os.urandom(32)
    wrapped = _openssl(tmp_path, key, "-encrypt", aes_key)
    assert _open(hand_built(wrapped, aes_key, SMALL_PIECES), key) == SMALL_PAYLOAD


def test_allocating_path_for_older_cryptography(
    key: rsa.RSAPrivateKey, small_env: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without AESGCM.*_into (cryptography < 47) sealing and opening still agree and fail closed."""
    from nodeclient.protocol import envelope

    monkeypatch.setattr(envelope, "_HAS_INTO", False)
    assert _open(_seal(key, SMALL_PAYLOAD), key) == SMALL_PAYLOAD
    assert _open(small_env, key) == SMALL_PAYLOAD
    assert_rejected(flip(small_env, len(small_env) - 1), key)


class ReadOnly:
    """A stream offering only read(), returning at most 5 bytes a call."""

    def __init__(self, data: bytes) -> None:
        self._src = io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self._src.read(min(n, 5))


def test_streams_without_readinto_work(key: rsa.RSAPrivateKey) -> None:
    """Sources that only implement read() are sealed and opened correctly."""
    sealed = io.BytesIO()
    seal_stream(
        ReadOnly(SMALL_PAYLOAD),  # type: ignore[arg-type]
        sealed,
        public_key=key.public_key(),
        task_id=TASK,
        node_id=NODE,
        expires_at=EXPIRES,
        chunk_size=SMALL_CHUNK,
    )
    out = io.BytesIO()
    src = ReadOnly(sealed.getvalue())
    open_stream(src, out, private_key=key, task_id=TASK, node_id=NODE, now=EXPIRES)  # type: ignore[arg-type]
    assert out.getvalue() == SMALL_PAYLOAD
