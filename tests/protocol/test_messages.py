"""Frame parsing details of nodeclient.protocol.messages not covered with the link tests."""

from __future__ import annotations

import json
import uuid

import pytest

from nodeclient.errors import RemoteProtocolError
from nodeclient.protocol import messages

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
