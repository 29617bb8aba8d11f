"""Frame parsing details of nodeclient.protocol.messages not covered with the link tests."""

from __future__ import annotations

import json
import uuid

import pytest

from nodeclient.errors import RemoteProtocolError
from nodeclient.protocol import eip712, messages
from nodeclient.protocol.secp import Secp256k1Key

TASK = uuid.UUID("00112233-4455-6677-8899-aabbccddeeff")


def test_a_uuid_in_its_one_spelling_parses() -> None:
    frame = json.dumps(messages.Cancel(TASK, "withdrawn").to_wire())
    parsed = messages.parse_from_coordinator(frame)
    assert isinstance(parsed, messages.Cancel) and parsed.task_id == TASK


@pytest.mark.parametrize(
    "spelling",
    [
        "00112233-4455-6677-8899-AABBCCDDEEFF",  # upper case
        "----00112233445566778899aabbccddeeff",  # hyphens anywhere
        "{00112233445566778899aabbccddeeff}--",  # braces
        "00112233-4455-6677-8899-aabbccddeef\u0661",  # an Arabic-Indic digit
        "urn:uuid:00112233-4455-6677-8899-aab",
    ],
)
def test_a_uuid_in_another_spelling_is_refused(spelling: str) -> None:
    """docs/protocol.md: UUIDs are lower-case 8-4-4-4-12. uuid.UUID alone also takes
    upper case, braces, hyphens anywhere and non-ASCII digits (before, all of these parsed
    as the same task)."""
    frame = json.dumps({"type": "cancel", "task_id": spelling, "reason": "withdrawn"})
    with pytest.raises(RemoteProtocolError, match=r"field 'task_id' must be a UUID string"):
        messages.parse_from_coordinator(frame)


def _text_frame_of(frame: dict[str, object], size: int) -> str:
    """*frame* as JSON text of exactly *size* UTF-8 bytes, padded with three-byte
    characters in an extra field, so that it has about a third as many characters."""
    base = json.dumps({**frame, "pad": ""}, ensure_ascii=False)
    wide, narrow = divmod(size - len(base.encode()), 3)
    text = json.dumps({**frame, "pad": "\u4e00" * wide + "x" * narrow}, ensure_ascii=False)
    assert len(text.encode()) == size and len(text) < messages.MAX_CONTROL_FRAME
    return text


@pytest.mark.parametrize(
    ("message", "parse"),
    [
        (messages.Cancel(TASK, "withdrawn"), messages.parse_from_coordinator),
        (messages.ProgressFrame(TASK, 1, 2, "frame 1"), messages.parse_from_node),
    ],
)
def test_the_control_frame_limit_counts_a_text_frames_utf8_bytes(message, parse) -> None:
    """docs/protocol.md: control frames are at most 64 KiB, and a WebSocket text frame is
    UTF-8. A frame of 64 KiB is taken; one byte more is refused, however few characters
    it has (before, one of 180 KB passed as 60,000 characters)."""
    limit = messages.MAX_CONTROL_FRAME
    assert parse(_text_frame_of(message.to_wire(), limit)) == message
    with pytest.raises(RemoteProtocolError, match=f"exceeds {limit} bytes"):
        parse(_text_frame_of(message.to_wire(), limit + 1))


def test_a_heartbeat_over_64_kib_of_utf8_is_refused_before_it_is_parsed() -> None:
    """The coordinator passes max_text=MAX_CONTROL_FRAME where no large JSON frame may
    come: a heartbeat of 60,000 three-byte characters (180 KB) is refused unparsed, and
    without max_text it is still over the heartbeat's own 64 KiB."""
    key = Secp256k1Key(b"\x11" * 32)
    heartbeat = {
        "node_id": key.address,
        "seq": 1,
        "state": "\u4e00" * 60_000,
        "running_tasks": [],
        "load_permille": 0,
        "sent_at": 1,
    }
    signature = eip712.sign_typed(key, "Heartbeat", heartbeat, chain_id=1)
    frame = json.dumps(messages.signed_frame("heartbeat", heartbeat, signature), ensure_ascii=False)
    assert len(frame) < messages.MAX_CONTROL_FRAME < len(frame.encode())
    with pytest.raises(RemoteProtocolError, match=r"frame of 180\d{3} bytes exceeds the 65536"):
        messages.parse_from_node(frame, max_text=messages.MAX_CONTROL_FRAME)
    with pytest.raises(RemoteProtocolError, match="heartbeat frame exceeds 65536 bytes"):
        messages.parse_from_node(frame)


def test_frame_size_is_exact_wherever_a_frame_could_pass_the_limit() -> None:
    """A character is 1 to 4 bytes in UTF-8: a text frame is encoded to be measured only
    where 4 x its length could pass the limit and it is not ASCII (base64 data is)."""
    limit = messages.MAX_CONTROL_FRAME
    assert messages.frame_size("\u4e00" * 30_000) == 90_000
    assert messages.frame_size("\U0001f600" * 16_385) == 65_540
    assert messages.frame_size("x" * 100_000) == 100_000
    assert messages.frame_size(b"\xe4\xb8\x80" * 100) == 300
    short = "\U0001f600" * (limit // 4)  # at most the limit, whatever its bytes
    assert messages.frame_size(short) <= limit
    assert messages.frame_size("\u4e00" * 1000, limit=1000) == 3000
