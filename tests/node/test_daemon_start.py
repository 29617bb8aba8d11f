"""What the daemon sets up for itself at start: its open-file limit, and a word when the
systemd unit that started it is older than this release."""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodeclient.node import service
from nodeclient.node.daemon import NodeDaemon
from tests.node.test_daemon_outbox import make_daemon


def _start_and_stop(daemon: NodeDaemon) -> None:
    """Run the daemon until it is up (its coordinator, port 9, never answers), then stop."""

    async def briefly() -> None:
        run = asyncio.create_task(daemon.run())
        for _ in range(100):
            await asyncio.sleep(0.02)
            if daemon.link.status == "connecting" or daemon.link.reconnects:
                break
        daemon.request_stop()
        await asyncio.wait_for(run, 30)

    asyncio.run(briefly())


@pytest.fixture
def low_open_files() -> Iterator[int]:
    """This process's soft RLIMIT_NOFILE lowered to 512 for the test, then restored."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))
    try:
        yield hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_daemon_raises_its_soft_open_file_limit(tmp_path: Path, low_open_files: int) -> None:
    """Started by hand (or by an older unit) with a soft limit of 512, the daemon asks
    for 65536 within the hard limit, as the unit's LimitNOFILE would give it."""
    hard = low_open_files
    daemon, _, _ = make_daemon(tmp_path)
    _start_and_stop(daemon)
    want = 65536 if hard == resource.RLIM_INFINITY else min(65536, hard)
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == want


def test_an_outdated_unit_is_logged_when_systemd_started_the_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Started by systemd from a unit of an older release (no version line): a warning
    names it with what to do; a current one says nothing."""
    unit = tmp_path / "nodeclient.service"
    current = service.render_unit(service.UnitOptions(executable=Path("/usr/bin/nodeclient")))
    unit.write_text("\n".join(line for line in current.splitlines() if "unit version" not in line))
    monkeypatch.setattr(service, "started_from", lambda: unit)
    (tmp_path / "a").mkdir()
    with caplog.at_level(logging.WARNING, logger="nodeclient.node"):
        _start_and_stop(make_daemon(tmp_path / "a")[0])
    (warned,) = [r for r in caplog.records if r.msg == "service.unit_outdated"]
    assert str(unit) in warned.hint  # type: ignore[attr-defined]
    assert "daemon-reload" in warned.hint  # type: ignore[attr-defined]

    caplog.clear()
    unit.write_text(current)
    (tmp_path / "b").mkdir()
    with caplog.at_level(logging.WARNING, logger="nodeclient.node"):
        _start_and_stop(make_daemon(tmp_path / "b")[0])
    assert not [r for r in caplog.records if r.msg == "service.unit_outdated"]


def test_the_unit_is_found_from_this_processs_cgroup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The unit that started the daemon is the one its cgroup names, where systemd reads
    it from (the administrator's directory first), not a fixed path; none for a user's
    service (a terminal's) or outside systemd."""
    etc, lib = tmp_path / "etc", tmp_path / "lib"
    for directory in (etc, lib):
        directory.mkdir()
        (directory / "node-a.service").write_text("[Service]\n")
    monkeypatch.setattr(service, "UNIT_DIRS", (etc, lib))
    cgroup = tmp_path / "cgroup"
    cases = {
        "0::/system.slice/node-a.service\n": etc / "node-a.service",
        "1:name=systemd:/system.slice/node-a.service\n0::/\n": etc / "node-a.service",
        "0::/system.slice/other.service\n": None,
        "0::/user.slice/user-1000.slice/user@1000.service/app.slice/node-a.service\n": None,
        "0::/\n": None,
    }
    for text, found in cases.items():
        cgroup.write_text(text)
        assert service.started_from(cgroup) == found, text
    (etc / "node-a.service").unlink()
    cgroup.write_text("0::/system.slice/node-a.service\n")
    assert service.started_from(cgroup) == lib / "node-a.service"
    assert service.started_from(tmp_path / "none") is None
