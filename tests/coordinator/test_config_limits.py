"""CoordinatorConfig refuses what every node would refuse on the link, so that an embedded
coordinator fails at start-up, as ``serve`` does, instead of being one no node links to
(each would refuse its challenges and retry for ever)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodeclient.coordinator.config import CoordinatorConfig
from nodeclient.errors import RemoteProtocolError, UsageError
from nodeclient.protocol import messages


def test_a_coordinator_id_as_long_as_nodes_take_is_accepted(tmp_path: Path) -> None:
    longest = "c" * messages.MAX_COORDINATOR_ID
    assert messages.coordinator_id_of({"coordinator_id": longest}) == longest
    assert CoordinatorConfig(data_dir=tmp_path, coordinator_id=longest).coordinator_id == longest


def test_a_coordinator_id_longer_than_nodes_take_is_refused(tmp_path: Path) -> None:
    """Nodes take a coordinator_id of at most 128 characters (messages.coordinator_id_of),
    in a challenge and in the registration answer."""
    too_long = "c" * (messages.MAX_COORDINATOR_ID + 1)
    with pytest.raises(RemoteProtocolError):
        messages.coordinator_id_of({"coordinator_id": too_long})
    with pytest.raises(UsageError, match="^coordinator id must be at most 128 characters"):
        CoordinatorConfig(data_dir=tmp_path, coordinator_id=too_long)


def test_a_coordinator_id_that_is_not_unicode_is_refused(tmp_path: Path) -> None:
    """A command-line argument that is not UTF-8 reaches Python as lone surrogates, which
    JSON escapes and every node refuses as not valid Unicode."""
    not_unicode = "coordinator-\udcff"
    with pytest.raises(RemoteProtocolError, match="not valid Unicode"):
        messages.coordinator_id_of({"coordinator_id": not_unicode})
    with pytest.raises(UsageError, match="^coordinator id must be valid Unicode"):
        CoordinatorConfig(data_dir=tmp_path, coordinator_id=not_unicode)


@pytest.mark.parametrize("interval", [0.0, 0.01, messages.HEARTBEAT_INTERVAL_MIN / 2])
def test_a_heartbeat_interval_shorter_than_nodes_take_is_refused(
    tmp_path: Path, interval: float
) -> None:
    """Nodes take a challenge's heartbeat_interval from 0.05 s (the CLI says the same)."""
    with pytest.raises(UsageError, match="^heartbeat interval must be at least 0.05 seconds"):
        CoordinatorConfig(data_dir=tmp_path, heartbeat_interval=interval)


def test_the_shortest_heartbeat_interval_nodes_take_is_accepted(tmp_path: Path) -> None:
    shortest = messages.HEARTBEAT_INTERVAL_MIN
    config = CoordinatorConfig(data_dir=tmp_path, heartbeat_interval=shortest)
    assert config.heartbeat_interval == shortest
