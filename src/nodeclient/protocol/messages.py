"""Link messages (2.3.3 Coordinator Link), parsed and validated before anything acts on them.

Every frame on the link is one JSON object with a ``type``. ``parse`` enforces the frame
size limit, the JSON shape, every field's type and range, and returns a frozen dataclass;
anything else raises RemoteProtocolError with a reason that names the field. Signed
parts travel as ``{"message": <EIP-712 message JSON>, "signature": "0x..."}`` so a
verifier can rebuild the exact typed data (see eip712.typed_data_json).

Data frames. ``dispatch`` (its ``envelope``) and ``result`` (its ``result``) carry up to
32 MiB. Between peers that both announced :data:`BINARY_DATA` (the node in ``auth``, the
coordinator in ``welcome``) they travel as binary WebSocket frames::

    u32 header_len (big-endian) | header: the frame's JSON object without the data field | data

so neither side base64-encodes, JSON-scans or decodes hundreds of KiB per task. With a
peer that did not announce it, the data field is base64 in the JSON text frame, as before.
Both forms parse to the same message, and the signed part is the same JSON either way.

Direction and purpose (docs/protocol.md has the full table):

coordinator -> node: challenge, welcome, heartbeat_ack, dispatch, result_ack, cancel, error
node -> coordinator: auth, heartbeat, result, reject (signed), progress (advisory)
"""

from __future__ import annotations

import binascii
import json
import re
import struct
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

import pybase64

from nodeclient.errors import RemoteProtocolError, SignatureError
from nodeclient.protocol import eip712
from nodeclient.protocol.secp import parse_address, parse_signature_hex, strict_fromhex

MAX_CONTROL_FRAME: Final = 64 * 1024  # every frame but dispatch and result
MAX_DATA_FRAME: Final = 48 * 1024 * 1024  # dispatch and result: base64 of <= 32 MiB
MAX_REASON: Final = 512
MAX_COORDINATOR_ID: Final = 128  # characters; nodes refuse a longer one (coordinator_id_of)
# A Reject whose reason starts with this hands the task back because the node is stopping
# (SIGTERM): not a failure of the task or the node. The coordinator queues the task again
# without spending an attempt and sends that link no more work (docs/protocol.md).
DRAINING_PREFIX: Final = "draining: "
MAX_LARGE_FRAME_VALUES: Final = 256  # separators (, : [ {) a frame over MAX_CONTROL_FRAME may hold
MAX_DATA_BYTES: Final = (MAX_DATA_FRAME * 3) // 4  # the data of one dispatch or result
BINARY_DATA: Final = "binary-data"  # the feature: data frames as binary WebSocket frames
FEATURES: Final = (BINARY_DATA,)  # what this implementation announces
DATA_FIELDS: Final = {"dispatch": "envelope", "result": "result"}  # type -> its data field
_BINARY_PREFIX: Final = struct.Struct(">I")


def frame_size(frame: str | bytes, *, limit: int = MAX_CONTROL_FRAME) -> int:
    """The bytes *frame* took on the wire, which is what the frame limits count: a text
    frame travels as UTF-8, where one character is 1 to 4 bytes (60,000 characters of CJK
    are 180 KB).

    Exact wherever it could exceed *limit*; a text frame of at most a quarter of *limit*
    characters is at most *limit* bytes, so its length stands in (no more than *limit*
    either way). Only such a frame that is not ASCII is encoded to be measured:
    ``str.isascii`` is O(1), so a heartbeat or base64 data costs nothing.
    """
    if isinstance(frame, bytes) or 4 * len(frame) <= limit or frame.isascii():
        return len(frame)
    return len(frame.encode("utf-8", "surrogatepass"))


# --- field readers: each names the field it rejects ---------------------------------------


def _name(key: str) -> str:
    """*key* as an error names it: a key the coordinator chose (a resource's) may be as
    long as its frame, and the error goes into the node's log."""
    return repr(key[:32]) + ("..." if len(key) > 32 else "")


def _get(d: Mapping[str, Any], key: str) -> Any:
    try:
        return d[key]
    except KeyError:
        raise RemoteProtocolError(f"missing field {_name(key)}") from None


def _int(d: Mapping[str, Any], key: str, *, lo: int = 0, hi: int = (1 << 63) - 1) -> int:
    v = _get(d, key)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise RemoteProtocolError(f"field {_name(key)} must be an integer in [{lo}, {hi}]")
    return v


# The heartbeat intervals a node takes in a challenge (seconds); a coordinator offers one.
HEARTBEAT_INTERVAL_MIN: Final = 0.05
HEARTBEAT_INTERVAL_MAX: Final = 300.0


def _num(d: Mapping[str, Any], key: str, *, lo: float, hi: float) -> float:
    v = _get(d, key)
    if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
        raise RemoteProtocolError(f"field {_name(key)} must be a number in [{lo}, {hi}]")
    return float(v)


def _str(d: Mapping[str, Any], key: str, *, max_len: int = 256) -> str:
    v = _get(d, key)
    if not isinstance(v, str) or len(v) > max_len:
        raise RemoteProtocolError(f"field {_name(key)} must be a string of at most {max_len} chars")
    if not v.isascii():  # JSON's \ud800 escapes decode to lone surrogates, which no
        try:  # database, log or response can encode: refused here, once
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise RemoteProtocolError(f"field {_name(key)} is not valid Unicode") from None
    return v


# The one spelling of a UUID on the wire (docs: lower-case 8-4-4-4-12); uuid.UUID alone
# also takes braces, upper case, misplaced hyphens and non-ASCII digits.
_UUID_TEXT = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def is_uuid_text(value: object) -> bool:
    """Whether *value* is a UUID as the wire spells it (lower-case 8-4-4-4-12)."""
    return isinstance(value, str) and _UUID_TEXT.fullmatch(value) is not None


def _uuid(d: Mapping[str, Any], key: str) -> uuid.UUID:
    v = _get(d, key)
    if not is_uuid_text(v):
        raise RemoteProtocolError(
            f"field {_name(key)} must be a UUID string (lower-case 8-4-4-4-12)"
        )
    return uuid.UUID(v)


def _hex(d: Mapping[str, Any], key: str, *, size: int) -> bytes:
    v = _get(d, key)
    if not isinstance(v, str) or len(v) != 2 + 2 * size or not v.startswith("0x"):
        raise RemoteProtocolError(
            f"field {_name(key)} must be 0x followed by {2 * size} hex digits"
        )
    try:
        return strict_fromhex(v[2:])
    except ValueError:
        raise RemoteProtocolError(f"field {_name(key)} must be hex") from None


def _b64(d: Mapping[str, Any], key: str, *, max_bytes: int) -> bytes:
    v = _get(d, key)
    if not isinstance(v, str) or len(v) > (max_bytes * 4) // 3 + 4:
        raise RemoteProtocolError(f"field {_name(key)} must be base64 of at most {max_bytes} bytes")
    try:
        return pybase64.b64decode(v, validate=True)  # strict, as base64's validate=True
    except (binascii.Error, ValueError):
        raise RemoteProtocolError(f"field {_name(key)} is not valid base64") from None


def _obj(d: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    v = _get(d, key)
    if not isinstance(v, dict):
        raise RemoteProtocolError(f"field {_name(key)} must be an object")
    return v


def _signed(d: Mapping[str, Any], primary: str) -> tuple[dict[str, Any], bytes, bytes]:
    """The EIP-712 message, signature and hashStruct of a signed frame, type-checked (not
    yet verified: the hash lets the verifier recover the signer without hashing again)."""
    try:
        message = eip712.message_from_json(primary, _obj(d, "message"))
        struct_hash = eip712.hash_struct(primary, message)  # validates every field's type
        sig = parse_signature_hex(_get(d, "signature"))
    except (SignatureError, ValueError) as exc:  # ValueError: a lone surrogate has no UTF-8
        raise RemoteProtocolError(f"{primary}: {exc}"[:300]) from exc
    return message, sig, struct_hash


def b64(data: bytes) -> str:
    return pybase64.b64encode_as_string(data)


def encode_frame(frame: Mapping[str, Any], *, binary: bool) -> str | bytes:
    """The wire form of *frame*, whose data field (if any) holds raw bytes.

    With *binary* (the peer announced :data:`BINARY_DATA`) a data frame becomes a binary
    frame: length-prefixed JSON header, then the bytes as they are. Otherwise the bytes are
    base64 in a JSON text frame. Frames without data are JSON text either way.
    """
    name = DATA_FIELDS.get(frame["type"], "")
    data = frame.get(name)
    if not isinstance(data, bytes):
        return json.dumps(frame)
    header = json.dumps({k: v for k, v in frame.items() if k != name})
    if binary:
        head = header.encode()
        return b"".join((_BINARY_PREFIX.pack(len(head)), head, data))
    # Base64 needs no JSON escaping, so it is spliced in rather than scanned by the encoder
    # (hundreds of KiB); the text parses to the same object as json.dumps would give.
    return "".join((header[:-1], f', "{name}": "', b64(data), '"}'))


def features_of(d: Mapping[str, Any]) -> frozenset[str]:
    """The optional ``features`` list of an auth or welcome frame (unknown ones ignored)."""
    v = d.get("features", [])
    if not isinstance(v, list) or len(v) > 32 or not all(isinstance(f, str) for f in v):
        raise RemoteProtocolError("field 'features' must be a list of at most 32 strings")
    return frozenset(v)


# --- messages ---------------------------------------------------------------------------------


def coordinator_id_of(d: Mapping[str, Any]) -> str:
    """The ``coordinator_id`` of a challenge, or of the registration answer that a
    challenge must match: a string of at most :data:`MAX_COORDINATOR_ID` characters."""
    return _str(d, "coordinator_id", max_len=MAX_COORDINATOR_ID)


@dataclass(frozen=True, slots=True)
class Challenge:
    """coordinator -> node, first frame: prove you hold the registered liveness key."""

    TYPE: ClassVar[str] = "challenge"
    coordinator_id: str
    nonce: bytes
    chain_id: int
    heartbeat_interval: float

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "coordinator_id": self.coordinator_id,
            "nonce": "0x" + self.nonce.hex(),
            "chain_id": self.chain_id,
            "heartbeat_interval": self.heartbeat_interval,
        }

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Challenge:
        return cls(
            coordinator_id_of(d),
            _hex(d, "nonce", size=32),
            _int(d, "chain_id", lo=1),
            _num(d, "heartbeat_interval", lo=HEARTBEAT_INTERVAL_MIN, hi=HEARTBEAT_INTERVAL_MAX),
        )


@dataclass(frozen=True, slots=True)
class SignedFrame:
    """A node -> coordinator frame carrying one EIP-712 struct and its signature."""

    type: str
    primary_type: str
    message: dict[str, Any]
    signature: bytes
    extra: Mapping[str, Any] = field(default_factory=dict)
    struct_hash: bytes = b""  # eip712.hash_struct(primary_type, message), from parsing


SIGNED_TYPES: Final = {
    "auth": "LinkAuth",
    "heartbeat": "Heartbeat",
    "result": "Result",
    "reject": "Reject",
}


@dataclass(frozen=True, slots=True)
class Welcome:
    """coordinator -> node after a valid auth."""

    TYPE: ClassVar[str] = "welcome"
    node_id: str
    last_seq: int  # the highest heartbeat seq the coordinator has seen from this node
    unstaking_until: int | None
    features: frozenset[str] = frozenset()  # what the coordinator takes (BINARY_DATA)

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "node_id": self.node_id,
            "last_seq": self.last_seq,
            "unstaking_until": self.unstaking_until,
            "features": sorted(self.features),
        }

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Welcome:
        until = d.get("unstaking_until")
        return cls(
            _str(d, "node_id", max_len=42),
            _int(d, "last_seq"),
            None if until is None else _int(d, "unstaking_until"),
            features_of(d),
        )


@dataclass(frozen=True, slots=True)
class HeartbeatAck:
    TYPE: ClassVar[str] = "heartbeat_ack"
    seq: int
    server_time: float
    unstaking_until: int | None

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "seq": self.seq,
            "server_time": self.server_time,
            "unstaking_until": self.unstaking_until,
        }

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> HeartbeatAck:
        until = d.get("unstaking_until")
        return cls(
            _int(d, "seq"),
            _num(d, "server_time", lo=0, hi=1e12),
            None if until is None else _int(d, "unstaking_until"),
        )


@dataclass(frozen=True, slots=True)
class Dispatch:
    """coordinator -> node: one sealed task (2.3.4 envelope) with its lease."""

    TYPE: ClassVar[str] = "dispatch"
    task_id: uuid.UUID
    job_id: uuid.UUID
    workload_class: str
    lease_expires_at: int
    envelope: bytes
    slice_index: int | None = None
    slice_count: int | None = None
    resources: Mapping[str, int] = field(default_factory=dict)
    # The coordinator's clock as it sent the dispatch (None from a coordinator before it):
    # the node reads lease_expires_at against it, not against its own clock.
    sent_at: float | None = None

    def to_wire(self, *, raw: bool = False) -> dict[str, Any]:
        """The frame; with *raw* the envelope stays bytes, for :func:`encode_frame`."""
        wire = {
            "type": self.TYPE,
            "task_id": str(self.task_id),
            "job_id": str(self.job_id),
            "workload_class": self.workload_class,
            "lease_expires_at": self.lease_expires_at,
            "envelope": self.envelope if raw else b64(self.envelope),
            "slice_index": self.slice_index,
            "slice_count": self.slice_count,
            "resources": dict(self.resources),
        }
        if self.sent_at is not None:
            wire["sent_at"] = self.sent_at
        return wire

    @classmethod
    def from_wire(cls, d: Mapping[str, Any], data: bytes | None = None) -> Dispatch:
        """From the JSON frame; *data* is the envelope when it came as a binary frame."""
        res = d.get("resources") or {}
        if not isinstance(res, dict) or len(res) > 8:
            raise RemoteProtocolError("field 'resources' must be a small object")
        resources = {str(k): _int(res, k) for k in res}
        si, sc = d.get("slice_index"), d.get("slice_count")
        return cls(
            _uuid(d, "task_id"),
            _uuid(d, "job_id"),
            _str(d, "workload_class", max_len=64),
            _int(d, "lease_expires_at"),
            _b64(d, "envelope", max_bytes=MAX_DATA_BYTES) if data is None else data,
            None if si is None else _int(d, "slice_index", hi=1 << 20),
            None if sc is None else _int(d, "slice_count", lo=1, hi=1 << 20),
            resources,
            None if d.get("sent_at") is None else _num(d, "sent_at", lo=0, hi=1e12),
        )


@dataclass(frozen=True, slots=True)
class ResultAck:
    """coordinator -> node: the answer to a ``result``, or (``of`` "reject") to a ``reject``.

    ``of`` tells the two apart: a node keeps its results in its outbox by task_id, and the
    answer to a reject must never settle a result of the same task (a reject of an earlier
    lease, answered after the node committed the result of a newer one). A coordinator
    that does not send it answers results only as far as the node can tell.
    """

    TYPE: ClassVar[str] = "result_ack"
    task_id: uuid.UUID
    status: str  # accepted | duplicate | rejected
    reason: str = ""
    of: str = "result"  # result | reject

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "task_id": str(self.task_id),
            "status": self.status,
            "reason": self.reason,
            "of": self.of,
        }

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> ResultAck:
        status = _str(d, "status", max_len=16)
        if status not in ("accepted", "duplicate", "rejected"):
            raise RemoteProtocolError("field 'status' must be accepted, duplicate or rejected")
        of = _str(d, "of", max_len=8) if d.get("of") is not None else "result"
        if of not in ("result", "reject"):
            raise RemoteProtocolError("field 'of' must be result or reject")
        return cls(_uuid(d, "task_id"), status, _str(d, "reason", max_len=MAX_REASON), of)


@dataclass(frozen=True, slots=True)
class Cancel:
    TYPE: ClassVar[str] = "cancel"
    task_id: uuid.UUID
    reason: str

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "task_id": str(self.task_id), "reason": self.reason}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Cancel:
        return cls(_uuid(d, "task_id"), _str(d, "reason", max_len=MAX_REASON))


@dataclass(frozen=True, slots=True)
class ErrorFrame:
    """Either side: a message was refused; the link stays up unless a close follows."""

    TYPE: ClassVar[str] = "error"
    code: str
    reason: str

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "code": self.code, "reason": self.reason}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> ErrorFrame:
        return cls(_str(d, "code", max_len=64), _str(d, "reason", max_len=MAX_REASON))


_FROM_COORDINATOR: Final = {
    c.TYPE: c for c in (Challenge, Welcome, HeartbeatAck, Dispatch, ResultAck, Cancel, ErrorFrame)
}

Message = (
    Challenge | Welcome | HeartbeatAck | Dispatch | ResultAck | Cancel | ErrorFrame | SignedFrame
)


def _load(frame: str | bytes, *, size: int, max_size: int) -> dict[str, Any]:
    """The JSON object of *frame*, whose :func:`frame_size` is *size*."""
    if size > max_size:
        raise RemoteProtocolError(f"frame of {size} bytes exceeds the {max_size}-byte limit")
    if size > MAX_CONTROL_FRAME:  # a dispatch or result with its data as base64 text
        # Its bulk is one base64 string; JSON of many small values ("[[],[],..." or
        # "1,1,1,...") would take some twenty times its size in memory once parsed, so
        # such a frame is refused before it is.
        if isinstance(frame, str):
            values = sum(frame.count(m) for m in ",:[{")
        else:
            values = sum(frame.count(m) for m in (b",", b":", b"[", b"{"))
        if values > MAX_LARGE_FRAME_VALUES:
            raise RemoteProtocolError(
                f"frame of {size} bytes holds more than {MAX_LARGE_FRAME_VALUES} JSON "
                "values: a large frame carries one data field and a few others"
            )
    try:  # UTF-8 only (json.loads would guess UTF-16 or UTF-32 from bytes)
        d = json.loads(frame.decode("utf-8") if isinstance(frame, bytes) else frame)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RemoteProtocolError(f"frame is not valid JSON: {exc}") from None
    except RecursionError:  # "[[[[..." deeper than the interpreter's stack
        raise RemoteProtocolError("frame is not valid JSON: nested too deeply") from None
    if not isinstance(d, dict) or not isinstance(d.get("type"), str):
        raise RemoteProtocolError("frame must be a JSON object with a string 'type'")
    return d


def _load_any(
    frame: str | bytes, max_text: int = MAX_DATA_FRAME
) -> tuple[dict[str, Any], bytes | None, int]:
    """A frame's JSON object, its data when it came as a binary data frame, and its
    :func:`frame_size` (exact above MAX_CONTROL_FRAME and above *max_text*).

    A binary frame must be a dispatch or result whose header leaves out the data field;
    the header is held to the control-frame limit. (Before auth the coordinator takes
    only a text frame.) (A JSON text frame sent as binary,
    starting with ``{``, is still read as JSON: a header length never starts with 0x7b.)
    A JSON frame over *max_text* bytes (a text frame's UTF-8) is refused before it is
    parsed.
    """
    size = frame_size(frame, limit=min(max_text, MAX_CONTROL_FRAME))
    if isinstance(frame, str) or frame[:1] == b"{":
        return _load(frame, size=size, max_size=max_text), None, size
    if len(frame) > MAX_DATA_FRAME:
        raise RemoteProtocolError(
            f"frame of {len(frame)} bytes exceeds the {MAX_DATA_FRAME}-byte limit"
        )
    if len(frame) < _BINARY_PREFIX.size:
        raise RemoteProtocolError("binary frame is shorter than its length prefix")
    (header_len,) = _BINARY_PREFIX.unpack_from(frame)
    end = _BINARY_PREFIX.size + header_len
    if header_len > MAX_CONTROL_FRAME or end > len(frame):
        raise RemoteProtocolError(f"binary frame header of {header_len} bytes is out of bounds")
    d = _load(frame[_BINARY_PREFIX.size : end], size=header_len, max_size=MAX_CONTROL_FRAME)
    name = DATA_FIELDS.get(d["type"])
    if name is None:
        raise RemoteProtocolError(f"a {d['type'][:32]!r} frame cannot be binary")
    if name in d:
        raise RemoteProtocolError(f"binary {d['type']} frame repeats {name!r} in its header")
    if len(frame) - end > MAX_DATA_BYTES:
        raise RemoteProtocolError(
            f"binary {d['type']} data of {len(frame) - end} bytes exceeds {MAX_DATA_BYTES}"
        )
    return d, frame[end:], size


def parse_from_coordinator(frame: str | bytes) -> Message:
    """Parse a frame the node received; raises RemoteProtocolError."""
    d, data, size = _load_any(frame)
    cls = _FROM_COORDINATOR.get(d["type"])
    if cls is None:
        raise RemoteProtocolError(f"unknown message type {d['type'][:32]!r}")
    if d["type"] != "dispatch" and size > MAX_CONTROL_FRAME:
        raise RemoteProtocolError(f"{d['type']} frame exceeds {MAX_CONTROL_FRAME} bytes")
    if cls is Dispatch:
        return Dispatch.from_wire(d, data)
    return cls.from_wire(d)


@dataclass(frozen=True, slots=True)
class ProgressFrame:
    """node -> coordinator: how far a running task is (frames saved, steps run).

    Advisory and unsigned: it arrives on a link already authenticated by LinkAuth, and the
    coordinator only records it for a task leased to that link's node. Nothing is paid or
    verified on the strength of it.
    """

    TYPE: ClassVar[str] = "progress"
    task_id: uuid.UUID
    done: float
    total: float
    note: str = ""

    @property
    def type(self) -> str:
        return self.TYPE

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "task_id": str(self.task_id),
            "done": self.done,
            "total": self.total,
            "note": self.note,
        }

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> ProgressFrame:
        total = _num(d, "total", lo=0, hi=1e12)
        done = _num(d, "done", lo=0, hi=total)
        return cls(_uuid(d, "task_id"), done, total, _str(d, "note", max_len=200))


def parse_from_node(
    frame: str | bytes, *, max_text: int = MAX_DATA_FRAME
) -> SignedFrame | ProgressFrame:
    """Parse a frame the coordinator received; raises RemoteProtocolError.

    Signature *verification* needs the registry (which key?) and happens in the
    coordinator; here the message is only shape- and type-checked. *max_text* bounds a
    JSON frame before it is parsed: the coordinator passes MAX_CONTROL_FRAME where no
    large JSON frame may come (before auth, and from a node that sends data binary).
    """
    d, data, size = _load_any(frame, max_text)
    if d["type"] == ProgressFrame.TYPE:
        if size > MAX_CONTROL_FRAME:
            raise RemoteProtocolError(f"progress frame exceeds {MAX_CONTROL_FRAME} bytes")
        return ProgressFrame.from_wire(d)
    primary = SIGNED_TYPES.get(d["type"])
    if primary is None:
        raise RemoteProtocolError(f"unknown message type {d['type'][:32]!r}")
    if d["type"] != "result" and size > MAX_CONTROL_FRAME:
        raise RemoteProtocolError(f"{d['type']} frame exceeds {MAX_CONTROL_FRAME} bytes")
    message, sig, struct_hash = _signed(d, primary)
    extra: dict[str, Any] = {}
    if d["type"] == "result":
        extra["result"] = _b64(d, "result", max_bytes=MAX_DATA_BYTES) if data is None else data
    elif d["type"] == "heartbeat":
        extra["running"] = _int(d, "running", hi=4096) if "running" in d else 0
    elif d["type"] == "auth":
        extra["features"] = features_of(d)
    elif d["type"] == "reject" and d.get("lease_expires_at") is not None:
        # The refused dispatch's lease_expires_at, echoed unsigned beside the Reject (whose
        # EIP-712 type stays as it is): it names the lease the reject is for. The link is
        # authenticated (LinkAuth), so only this node can have sent it, and a wrong value
        # can only make the coordinator ignore this node's own reject.
        extra["lease_expires_at"] = _int(d, "lease_expires_at")
    if "node_id" in message:
        try:
            parse_address(message["node_id"], field="node_id")
        except SignatureError as exc:
            raise RemoteProtocolError(str(exc)) from exc
    return SignedFrame(d["type"], primary, message, sig, extra, struct_hash)


def signed_frame(
    type_: str, message: Mapping[str, Any], signature: bytes, *, raw: bool = False, **extra: Any
) -> dict[str, Any]:
    """Build the wire form of a signed node -> coordinator frame; bytes become base64,
    except the data field when *raw* (then encode the frame with :func:`encode_frame`)."""
    primary = SIGNED_TYPES[type_]
    wire: dict[str, Any] = {
        "type": type_,
        "message": eip712.message_to_json(primary, message),
        "signature": "0x" + signature.hex(),
    }
    for k, v in extra.items():
        keep = raw and k == DATA_FIELDS.get(type_)
        wire[k] = b64(v) if isinstance(v, bytes) and not keep else v
    return wire
