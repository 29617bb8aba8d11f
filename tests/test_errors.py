"""errors.is_disk_full: which errors say a write found no space (so nothing of it is on
disk), as SQLite, SQLAlchemy and the OS raise them for real."""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.exc import OperationalError

from nodeclient.errors import is_disk_full


def _fill(con: sqlite3.Connection) -> None:
    """Write past a page cap: SQLite's SQLITE_FULL, as a full disk gives it."""
    pages = con.execute("PRAGMA page_count").fetchone()[0]
    con.execute(f"PRAGMA max_page_count = {pages}")
    con.execute("INSERT INTO t VALUES (?)", (b"x" * 100_000,))


def test_sqlites_full_database_is_disk_full(tmp_path: Path) -> None:
    con = sqlite3.connect(tmp_path / "a.db")
    con.execute("CREATE TABLE t (b BLOB)")
    with pytest.raises(sqlite3.Error) as full:
        _fill(con)
    assert is_disk_full(full.value)
    with pytest.raises(sqlite3.Error) as other:
        con.execute("SELECT * FROM no_such_table")
    assert not is_disk_full(other.value)
    con.close()


def test_sqlalchemy_wrapping_sqlites_full_database_is_disk_full(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'b.db'}")

    @event.listens_for(engine, "connect")
    def _table(dbapi_connection: sqlite3.Connection, _record: object) -> None:
        dbapi_connection.execute("CREATE TABLE IF NOT EXISTS t (b BLOB)")

    with engine.connect() as conn:
        pages = conn.execute(text("PRAGMA page_count")).scalar_one()
        conn.execute(text(f"PRAGMA max_page_count = {pages}"))
        with pytest.raises(OperationalError) as wrapped:
            conn.execute(text("INSERT INTO t VALUES (:b)"), {"b": b"y" * 200_000})
    assert is_disk_full(wrapped.value)
    with engine.connect() as conn, pytest.raises(OperationalError) as other:
        conn.execute(text("SELECT * FROM no_such_table"))
    assert not is_disk_full(other.value)
    engine.dispose()


@pytest.mark.parametrize(
    ("code", "full"), [(errno.ENOSPC, True), (errno.EDQUOT, True), (errno.EIO, False)]
)
def test_os_errors(code: int, full: bool) -> None:
    assert is_disk_full(OSError(code, "x")) is full
    assert not is_disk_full(ValueError("No space left on device"))
