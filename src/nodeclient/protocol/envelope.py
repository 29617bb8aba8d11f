"""The payload envelope: how the coordinator seals work for one node (2.3.4 Payload Decryption).

Theory of operation
-------------------
A dispatched payload is encrypted for exactly one node, under that node's RSA-3072 key
(the ``pubkey_rsa`` of its capability manifest, 2.3.2). Hybrid encryption keeps the RSA
work constant whatever the payload size: a fresh AES-256-GCM key per payload is wrapped
with RSA-OAEP (SHA-256, MGF1-SHA-256, no label), and the payload is cut into chunks so
that a node can decrypt a payload larger than its memory, one chunk at a time::

    envelope = preamble || chunk_0 || chunk_1 || ... || chunk_last
    preamble = b"NCE1" || u32 BE header_len || header || u16 BE wrapped_key_len || wrapped_key
    chunk_i  = nonce (12 random bytes) || u32 BE ct_len || ciphertext || tag (16 bytes)
    AAD_i    = SHA-256(preamble) || u64 BE i || u8 final   (final = 1 on the last chunk only)

``header`` is the RFC 8785 (JCS) encoding of a small JSON object binding format version,
algorithm, task, node, expiry and chunk size. Because every chunk's AAD hashes the whole
preamble, no byte of the header or the wrapped key can change without every tag failing;
because it carries the chunk's index and a final-chunk flag, reordering, duplicating,
dropping (including dropping the final chunk exactly at a boundary) and appending chunks
all fail too. The final flag is not on the wire: the opener infers it from end of input,
so a truncated stream is authenticated as "final" where the sealer said "not final".

Failure policy: every way an envelope can fail to open raises ``EnvelopeError`` with the
one message ``ENVELOPE_ERROR_MESSAGE``, raised afresh at the public function with no
cause, no context and no traceback into the check that failed. An RSA-OAEP padding failure
is not even raised where it happens: the opener goes on with a random AES key and fails
at the first tag, so padding and tag failures take the same path (a Manger-style oracle
needs to tell them apart). Mistakes by the caller that do not depend on the envelope
(a malformed expected ``node_id``, a sealing key below RSA-3072) raise
``LocalProtocolError`` instead, because they are bugs on our side, not hostile input.

This module does no I/O of its own: the streaming functions read and write the file-like
objects they are handed, and the clock is the ``now`` argument.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO, Final, NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from nodeclient.errors import EnvelopeError, LocalProtocolError, NodeClientError
from nodeclient.protocol.canonical import canonical_json
from nodeclient.protocol.secp import parse_address, to_checksum_address

__all__ = [
    "ALGORITHM",
    "DEFAULT_CHUNK_SIZE",
    "ENVELOPE_ERROR_MESSAGE",
    "MAGIC",
    "MAX_CHUNK_SIZE",
    "MAX_HEADER_LEN",
    "MIN_CHUNK_SIZE",
    "VERSION",
    "EnvelopeHeader",
    "open_envelope",
    "open_stream",
    "peek_header",
    "seal",
    "seal_stream",
]

MAGIC: Final = b"NCE1"
VERSION: Final = 1
ALGORITHM: Final = "RSA-OAEP-256+A256GCM"
DEFAULT_CHUNK_SIZE: Final = 1 << 20
# Limits on what an opener accepts from the wire, checked before anything is allocated:
# the header is ~200 bytes in practice, and the chunk size bounds the opener's memory.
MAX_HEADER_LEN: Final = 1024
MIN_CHUNK_SIZE: Final = 16
MAX_CHUNK_SIZE: Final = 1 << 24
ENVELOPE_ERROR_MESSAGE: Final = "payload envelope could not be opened"

RSA_KEY_BITS: Final = 3072
NONCE_LEN: Final = 12
TAG_LEN: Final = 16
AES_KEY_LEN: Final = 32
_MAX_JSON_INT: Final = (1 << 53) - 1  # the largest integer JCS (I-JSON) represents exactly
_HEADER_KEYS: Final = frozenset({"v", "alg", "task_id", "node_id", "expires_at", "chunk_size"})
_U32: Final = struct.Struct(">I")
_U16: Final = struct.Struct(">H")
_INDEX_FINAL: Final = struct.Struct(">QB")
_OAEP: Final = padding.OAEP(
    mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None
)
# cryptography >= 47 decrypts into a caller's buffer; older releases allocate per chunk,
# which is still bounded by the chunk size, only slower.
_HAS_INTO: Final = hasattr(AESGCM, "decrypt_into") and hasattr(AESGCM, "encrypt_into")


def _fail() -> NoReturn:
    """Raise the one envelope error; ``from None`` so no cause tells the failures apart."""
    raise EnvelopeError(ENVELOPE_ERROR_MESSAGE) from None


@dataclass(frozen=True)
class EnvelopeHeader:
    """The authenticated header of an envelope; validates itself when built.

    ``node_id`` is normalised to its EIP-55 checksummed form, which is what goes on the
    wire, so the header of an envelope has exactly one byte encoding.
    """

    version: int
    algorithm: str
    task_id: uuid.UUID
    node_id: str
    expires_at: int
    chunk_size: int

    def __post_init__(self) -> None:
        if self.version != VERSION or type(self.version) is not int:
            raise LocalProtocolError(f"envelope version must be {VERSION}")
        if self.algorithm != ALGORITHM:
            raise LocalProtocolError(f"envelope algorithm must be {ALGORITHM}")
        if not isinstance(self.task_id, uuid.UUID):
            raise LocalProtocolError("task_id must be a uuid.UUID")
        try:
            raw = parse_address(self.node_id, field="node_id")
        except NodeClientError as exc:
            raise LocalProtocolError(str(exc)) from exc
        object.__setattr__(self, "node_id", to_checksum_address(raw))
        if type(self.expires_at) is not int or not 0 <= self.expires_at <= _MAX_JSON_INT:
            raise LocalProtocolError("expires_at must be a unix time in [0, 2**53)")
        if type(self.chunk_size) is not int or not (
            MIN_CHUNK_SIZE <= self.chunk_size <= MAX_CHUNK_SIZE
        ):
            raise LocalProtocolError(f"chunk_size must be in [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}]")

    @property
    def node_address(self) -> bytes:
        """The 20 address bytes of ``node_id``: what node checks compare."""
        return bytes.fromhex(self.node_id[2:])

    def to_bytes(self) -> bytes:
        """The RFC 8785 bytes that travel in the envelope and feed every chunk's AAD."""
        return canonical_json(
            {
                "v": self.version,
                "alg": self.algorithm,
                "task_id": str(self.task_id),
                "node_id": self.node_id,
                "expires_at": self.expires_at,
                "chunk_size": self.chunk_size,
            }
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> EnvelopeHeader:
        """Parse header bytes; anything but the canonical encoding of a valid header fails."""
        try:
            obj: Any = json.loads(raw.decode("utf-8"))
            if not isinstance(obj, dict) or obj.keys() != _HEADER_KEYS:
                _fail()
            task_text = obj["task_id"]
            if not isinstance(task_text, str):
                _fail()
            header = cls(
                version=obj["v"],
                algorithm=obj["alg"],
                task_id=uuid.UUID(task_text),
                node_id=obj["node_id"],
                expires_at=obj["expires_at"],
                chunk_size=obj["chunk_size"],
            )
            # One encoding only: duplicate keys, whitespace, key order, upper-case UUIDs or
            # a lower-case node_id all re-encode differently and are refused.
            if header.to_bytes() != raw:
                _fail()
        except (NodeClientError, ValueError, TypeError, RecursionError):
            _fail()
        return header


def _aad(digest: bytes, index: int, *, final: bool) -> bytes:
    """AAD of chunk *index*: SHA-256(preamble) || u64 BE index || u8 final flag."""
    return digest + _INDEX_FINAL.pack(index, 1 if final else 0)


def _check_node_id(node_id: str) -> bytes:
    """The expected node's address bytes; a malformed one is the caller's bug."""
    try:
        return parse_address(node_id, field="node_id")
    except NodeClientError as exc:
        raise LocalProtocolError(str(exc)) from exc


# --- sealing (coordinator side) -------------------------------------------------------


def seal(
    plaintext: bytes,
    *,
    public_key: RSAPublicKey,
    task_id: uuid.UUID,
    node_id: str,
    expires_at: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> bytes:
    """Seal *plaintext* for the node holding the private half of *public_key*."""
    out = io.BytesIO()
    _seal(
        _Source(plaintext),
        out,
        public_key=public_key,
        task_id=task_id,
        node_id=node_id,
        expires_at=expires_at,
        chunk_size=chunk_size,
    )
    return out.getvalue()


def seal_stream(
    src: BinaryIO,
    dst: BinaryIO,
    *,
    public_key: RSAPublicKey,
    task_id: uuid.UUID,
    node_id: str,
    expires_at: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> int:
    """Seal everything *src* yields into *dst*; return the number of bytes written.

    Memory stays at about three chunk sizes: the sealer reads one chunk ahead, because a
    chunk's final flag (in its AAD) depends on whether any input follows it. A payload
    that is an exact multiple of the chunk size therefore ends with a full final chunk,
    never an empty one; an empty payload is one empty final chunk.
    """
    source = _Source(src)
    try:
        return _seal(
            source,
            dst,
            public_key=public_key,
            task_id=task_id,
            node_id=node_id,
            expires_at=expires_at,
            chunk_size=chunk_size,
        )
    finally:
        source.close()


def _seal(
    source: _Source,
    dst: BinaryIO,
    *,
    public_key: RSAPublicKey,
    task_id: uuid.UUID,
    node_id: str,
    expires_at: int,
    chunk_size: int,
) -> int:
    # RSA-3072 is the node key size (2.3.1); a larger key, which a manifest may declare,
    # is no weaker, and the opener takes the wrapped key length from its own modulus.
    if not isinstance(public_key, RSAPublicKey) or public_key.key_size < RSA_KEY_BITS:
        raise LocalProtocolError(
            f"envelopes are sealed to an RSA public key of at least {RSA_KEY_BITS} bits"
        )
    header = EnvelopeHeader(
        version=VERSION,
        algorithm=ALGORITHM,
        task_id=task_id,
        node_id=node_id,
        expires_at=expires_at,
        chunk_size=chunk_size,
    )
    header_bytes = header.to_bytes()
    key = AESGCM.generate_key(bit_length=256)
    wrapped = public_key.encrypt(key, _OAEP)
    preamble = b"".join(
        (MAGIC, _U32.pack(len(header_bytes)), header_bytes, _U16.pack(len(wrapped)), wrapped)
    )
    digest = hashlib.sha256(preamble).digest()
    aead = AESGCM(key)
    written = _write_all(dst, preamble)

    spare, ahead_buf = bytearray(chunk_size), bytearray(chunk_size)
    out = bytearray(chunk_size + TAG_LEN)
    current = source.read(chunk_size, spare)
    index = 0
    while True:
        # A short read is end of input, so only a full chunk can have a successor.
        ahead = source.read(chunk_size, ahead_buf) if len(current) == chunk_size else None
        final = not ahead
        nonce = os.urandom(NONCE_LEN)
        aad = _aad(digest, index, final=final)
        ct_len = len(current) + TAG_LEN
        if _HAS_INTO:
            aead.encrypt_into(nonce, current, aad, memoryview(out)[:ct_len])
            sealed: bytes | memoryview = memoryview(out)[:ct_len]
        else:
            sealed = aead.encrypt(nonce, bytes(current), aad)
        written += _write_all(dst, nonce + _U32.pack(ct_len))
        written += _write_all(dst, sealed)
        if ahead is None or final:
            return written
        current, spare, ahead_buf = ahead, ahead_buf, spare
        index += 1


# --- opening (node side) --------------------------------------------------------------


def peek_header(data: bytes) -> EnvelopeHeader:
    """Parse the header of an envelope WITHOUT authenticating it.

    For routing and logging only: anyone can write any header. Nothing in it may be
    trusted until ``open_envelope``/``open_stream`` succeeded on the same bytes.
    """
    view = memoryview(data)
    if len(view) < len(MAGIC) + _U32.size or bytes(view[: len(MAGIC)]) != MAGIC:
        _fail()
    header_len: int = _U32.unpack_from(view, len(MAGIC))[0]
    start = len(MAGIC) + _U32.size
    if header_len > MAX_HEADER_LEN or len(view) < start + header_len:
        _fail()
    return EnvelopeHeader.from_bytes(bytes(view[start : start + header_len]))


def open_envelope(
    envelope: bytes,
    *,
    private_key: RSAPrivateKey,
    task_id: uuid.UUID,
    node_id: str,
    now: int,
    max_plaintext: int | None = None,
) -> bytes:
    """Open a whole in-memory envelope and return its plaintext (see ``open_stream``)."""
    out = io.BytesIO()
    _open_guarded(
        _Source(envelope),
        out,
        private_key=private_key,
        task_id=task_id,
        node_id=node_id,
        now=now,
        max_plaintext=max_plaintext,
    )
    return out.getvalue()


def open_stream(
    src: BinaryIO,
    dst: BinaryIO,
    *,
    private_key: RSAPrivateKey,
    task_id: uuid.UUID,
    node_id: str,
    now: int,
    max_plaintext: int | None = None,
) -> int:
    """Open the envelope that *src* yields, writing the plaintext to *dst*; return its length.

    Refuses an envelope for another task or node, or one where ``now > expires_at``.
    Memory is bounded by the header's chunk size (at most ``MAX_CHUNK_SIZE``), never by
    the payload. Each chunk is written to *dst* only after its tag verified, but a
    truncated or extended stream is detected only at its end: if this raises, the
    consumer MUST discard everything already written to *dst*. *src* must be a blocking
    stream (a short read is taken as end of input). I/O errors of *src* or *dst*
    propagate unchanged; everything about the envelope itself raises ``EnvelopeError``.
    """
    return _open_guarded(
        _Source(src),
        dst,
        private_key=private_key,
        task_id=task_id,
        node_id=node_id,
        now=now,
        max_plaintext=max_plaintext,
    )


def _open_guarded(
    source: _Source,
    dst: BinaryIO,
    *,
    private_key: RSAPrivateKey,
    task_id: uuid.UUID,
    node_id: str,
    now: int,
    max_plaintext: int | None,
) -> int:
    """Run ``_open`` and re-raise any envelope failure afresh.

    The new EnvelopeError carries no context and a traceback that ends here, so not even
    a logged traceback says which check failed; dropping the original also frees the
    frames that still referenced the input.
    """
    expected_node = _check_node_id(node_id)
    if max_plaintext is not None and max_plaintext < 0:
        raise LocalProtocolError("max_plaintext must be >= 0")
    with contextlib.suppress(EnvelopeError):
        try:
            return _open(
                source,
                dst,
                private_key=private_key,
                task_id=task_id,
                node=expected_node,
                now=now,
                max_plaintext=max_plaintext,
            )
        finally:
            source.close()
    _fail()


def _open(
    source: _Source,
    dst: BinaryIO,
    *,
    private_key: RSAPrivateKey,
    task_id: uuid.UUID,
    node: bytes,
    now: int,
    max_plaintext: int | None,
) -> int:
    header, digest, aead = _open_preamble(
        source, private_key=private_key, task_id=task_id, node=node, now=now
    )
    chunk_size = header.chunk_size
    full_ct_len = chunk_size + TAG_LEN
    ct_buf = None if source.in_memory else bytearray(full_ct_len)
    # No bigger than the input can fill: a 1 KiB payload must not pay for zeroing (and,
    # with a fresh mapping, faulting in) a whole 1 MiB chunk buffer.
    pt_buf = bytearray(min(chunk_size, source.remaining() if source.in_memory else chunk_size))
    total = 0
    index = 0
    nonce = source.exact(NONCE_LEN)
    while True:
        ct_len: int = _U32.unpack(source.exact(_U32.size))[0]
        if not TAG_LEN <= ct_len <= full_ct_len:
            _fail()
        ct = source.read(ct_len, ct_buf)
        if len(ct) != ct_len:
            _fail()
        next_nonce = bytes(source.read(NONCE_LEN))
        final = not next_nonce
        pt_len = ct_len - TAG_LEN
        # The only framing the sealer produces: full non-final chunks, and an empty final
        # chunk only when it is the whole (empty) payload.
        if (not final and ct_len != full_ct_len) or (final and index > 0 and pt_len == 0):
            _fail()
        total += pt_len
        if max_plaintext is not None and total > max_plaintext:
            _fail()
        plain = _decrypt_chunk(aead, nonce, ct, _aad(digest, index, final=final), pt_buf)
        _write_all(dst, plain)
        if final:
            return total
        if len(next_nonce) != NONCE_LEN:
            _fail()
        nonce = next_nonce
        index += 1


def _open_preamble(
    source: _Source,
    *,
    private_key: RSAPrivateKey,
    task_id: uuid.UUID,
    node: bytes,
    now: int,
) -> tuple[EnvelopeHeader, bytes, AESGCM]:
    """Read and check magic, header and wrapped key; return header, preamble hash, cipher.

    All of the preamble is public, so checking task, node and expiry before the RSA
    operation leaks nothing and spares the work on envelopes that are not for us.
    """
    fixed = source.exact(len(MAGIC) + _U32.size)
    header_len: int = _U32.unpack_from(fixed, len(MAGIC))[0]
    if fixed[: len(MAGIC)] != MAGIC or header_len > MAX_HEADER_LEN:
        _fail()
    header_bytes = source.exact(header_len)
    header = EnvelopeHeader.from_bytes(header_bytes)
    if header.task_id != task_id or header.node_address != node or now > header.expires_at:
        _fail()
    wrapped_len_bytes = source.exact(_U16.size)
    wrapped_len: int = _U16.unpack(wrapped_len_bytes)[0]
    if wrapped_len != (private_key.key_size + 7) // 8:
        _fail()
    wrapped = source.exact(wrapped_len)
    digest = hashlib.sha256(fixed + header_bytes + wrapped_len_bytes + wrapped).digest()
    return header, digest, AESGCM(_unwrap(private_key, wrapped))


def _decrypt_chunk(
    aead: AESGCM, nonce: bytes, ct: memoryview, aad: bytes, pt_buf: bytearray
) -> bytes | memoryview:
    """Verify and decrypt one chunk, into *pt_buf* where the library allows it."""
    pt_len = len(ct) - TAG_LEN
    try:
        if _HAS_INTO:
            out = memoryview(pt_buf)[:pt_len]
            aead.decrypt_into(nonce, ct, aad, out)
            return out
        return aead.decrypt(nonce, bytes(ct), aad)
    except InvalidTag:
        _fail()


def _unwrap(private_key: RSAPrivateKey, wrapped: bytes) -> bytes:
    """RSA-OAEP unwrap with implicit rejection.

    A padding failure returns a random key instead of raising, so the envelope then fails
    at the first GCM tag exactly as a tampered chunk would: one code path, one message.
    """
    try:
        key = private_key.decrypt(wrapped, _OAEP)
    except ValueError:
        return os.urandom(AES_KEY_LEN)
    if len(key) != AES_KEY_LEN:
        return os.urandom(AES_KEY_LEN)
    return key


# --- input and output -----------------------------------------------------------------


class _Source:
    """The input being sealed or opened, read without copying where it is already in memory.

    ``bytes`` and an exact ``io.BytesIO`` are sliced in place (CPython's
    ``BytesIO.getvalue()`` hands out its buffer without a copy unless a ``getbuffer()``
    view of it is alive), so opening an in-memory envelope costs no extra memcpy. Any
    other stream is read, with ``readinto`` where it has one, into the caller's reused
    buffer; it must be blocking, as a short read is taken for end of input.
    """

    __slots__ = ("_mem", "_pos", "_read_into", "_stream")

    def __init__(self, src: BinaryIO | bytes | bytearray | memoryview) -> None:
        self._stream: io.BytesIO | None = None
        self._mem: memoryview | None = None
        self._read_into: Callable[[memoryview], int] | None = None
        self._pos = 0
        if isinstance(src, bytes | bytearray | memoryview):
            self._mem = memoryview(src).cast("B")
        elif type(src) is io.BytesIO:
            self._stream = src
            self._pos = src.tell()
            self._mem = memoryview(src.getvalue())
        else:
            native = getattr(src, "readinto", None)
            if native is not None:
                self._read_into = lambda view: int(native(view) or 0)
            else:
                self._read_into = functools.partial(_read_copy, src)

    @property
    def in_memory(self) -> bool:
        """True where reads are views of the input and need no buffer of their own."""
        return self._mem is not None

    def remaining(self) -> int:
        """Bytes left in an in-memory input (its plaintext is no longer than that)."""
        assert self._mem is not None
        return len(self._mem) - self._pos

    def read(self, size: int, buf: bytearray | None = None) -> memoryview:
        """Up to *size* bytes, fewer only at end of input, as a view.

        The view is into the in-memory input, else into *buf* (a fresh buffer if None);
        it is valid until *buf* is reused.
        """
        if self._mem is not None:
            view = self._mem[self._pos : self._pos + size]
            self._pos += len(view)
            return view
        assert self._read_into is not None
        target = memoryview(bytearray(size) if buf is None else buf)[:size]
        got = 0
        while got < size:
            n = self._read_into(target[got:])
            if n <= 0:
                break
            got += n
        return target[:got]

    def exact(self, size: int) -> bytes:
        """Exactly *size* bytes; end of input first means a truncated envelope."""
        view = self.read(size)
        if len(view) != size:
            _fail()
        return bytes(view)

    def close(self) -> None:
        """Leave an in-memory stream positioned after what was consumed, as a read would."""
        if self._stream is not None:
            self._stream.seek(self._pos)


def _read_copy(src: BinaryIO, view: memoryview) -> int:
    """readinto for streams that only offer read."""
    data = src.read(len(view))
    view[: len(data)] = data
    return len(data)


def _write_all(dst: BinaryIO, data: bytes | memoryview) -> int:
    """Write all of *data*, looping over short writes of raw streams.

    A stream that takes nothing (a non-blocking one that would block) is an I/O error,
    never a silent loss of plaintext.
    """
    view = memoryview(data)
    done = 0
    while done < len(view):
        n = dst.write(view[done:])
        if not n or n < 0:
            raise BlockingIOError("destination stream accepted no bytes")
        done += n
    return done
