"""The coordinator's data directory (coordinator/app.py::private_dir): private from the
first directory it creates, never another user's, and named so its database URL holds."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodeclient.coordinator.app import create_app, private_dir
from nodeclient.coordinator.cli import main
from nodeclient.coordinator.config import CoordinatorConfig
from nodeclient.errors import UsageError

NOBODY = 65534  # a uid no test runs as; chown to it needs root, as the suite runs


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_000() -> Iterator[None]:
    saved = os.umask(0)
    try:
        yield
    finally:
        os.umask(saved)


@pytest.mark.usefixtures("umask_000")
def test_missing_parents_are_created_0700_whatever_the_umask(tmp_path: Path) -> None:
    """Under umask 000, mkdir(parents=True) made the parents 0777: anyone could rename
    the data directory away and put their own in its place."""
    data = tmp_path / "a" / "b" / "data"
    private_dir(data)
    assert [mode(p) for p in (tmp_path / "a", tmp_path / "a" / "b", data)] == [0o700] * 3


def test_a_pathological_umask_still_gives_the_owner_0700(tmp_path: Path) -> None:
    """A umask that removes the owner's own bits does not leave the directories 0500."""
    saved = os.umask(0o277)
    try:
        private_dir(tmp_path / "a" / "data")
    finally:
        os.umask(saved)
    assert [mode(tmp_path / "a"), mode(tmp_path / "a" / "data")] == [0o700, 0o700]


def test_one_of_ours_that_others_may_enter_is_tightened(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o755)
    private_dir(data)
    assert mode(data) == 0o700


def test_a_data_directory_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    """Its owner could read requesters' payloads and results, and replace them: the
    coordinator does not start there, and creates and changes nothing in it."""
    theirs = tmp_path / "their data"
    theirs.mkdir()
    theirs.chmod(0o777)
    os.chown(theirs, NOBODY, NOBODY)
    config = CoordinatorConfig(data_dir=theirs)
    with pytest.raises(UsageError) as refused:
        create_app(config)
    said = str(refused.value)
    assert said.startswith(f"refusing the data directory {theirs}: owned by uid {NOBODY}")
    assert f"chown {os.geteuid()} '{theirs}'" in said and "another --data-dir" in said
    assert "\n" not in said
    assert list(theirs.iterdir()) == []
    assert mode(theirs) == 0o777 and theirs.stat().st_uid == NOBODY


def test_a_data_directory_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "data").write_text("")
    with pytest.raises(UsageError, match="data: it is not a directory$"):
        private_dir(tmp_path / "data")


@pytest.fixture
def busy_port() -> Iterator[str]:
    """A port something else listens on: a serve that got past its options stops there."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield str(sock.getsockname()[1])


@pytest.mark.usefixtures("restore_logging")
def test_serve_refuses_a_data_dir_whose_name_is_not_utf8(
    tmp_path: Path, busy_port: str, capsys
) -> None:
    """The default database's URL cannot name a file under it: one line and exit 2, where
    rendering the URL ended in a UnicodeEncodeError traceback."""
    data = os.fsdecode(bytes(tmp_path) + b"/x\xffdata")
    assert main(["serve", "--port", busy_port, "--data-dir", data]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"nodeclient-coordinator: the data directory {tmp_path}/x\\xffdata is not a UTF-8 "
        "name, which the SQLite database's URL cannot hold; fix: choose another --data-dir "
        "(or name the database with --db)\n"
    )
    assert not os.path.lexists(data)
    with pytest.raises(UsageError, match="is not a UTF-8 name"):
        CoordinatorConfig(data_dir=Path(data))


def test_a_non_utf8_data_dir_with_its_own_database_url_is_accepted(tmp_path: Path) -> None:
    """Only the default SQLite URL names a file in the data directory."""
    data = Path(os.fsdecode(bytes(tmp_path) + b"/x\xffdata"))
    config = CoordinatorConfig(data_dir=data, db_url=f"sqlite:///{tmp_path}/c.db")
    assert config.database_url == f"sqlite:///{tmp_path}/c.db"
    assert config.blob_dir == data / "blobs"
