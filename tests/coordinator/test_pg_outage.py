"""The coordinator through a database outage: connections that give up on a vanished
PostgreSQL server, the one-coordinator claim checked while it serves, and HTTP answers
and scheduler logs while the database cannot be reached.

The claim tests run on the suite's database (PostgreSQL with NODECLIENT_TEST_DB_URL,
where the claim is a session's advisory lock that a restart drops; else SQLite, whose
``flock`` cannot be lost while the coordinator runs)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Connection, create_engine, event, func, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from nodeclient.clock import ManualClock
from nodeclient.coordinator import app as app_module
from nodeclient.coordinator.app import create_app
from nodeclient.coordinator.scheduler import OUTAGE_LOG_INTERVAL_S, Scheduler
from nodeclient.coordinator.server import build_server, listen
from nodeclient.coordinator.store import (
    _PG_LOCK_KEY,
    PG_CONNECT_ARGS,
    ClaimLost,
    Database,
    DatabaseInUse,
    make_engine,
)
from tests.coordinator.conftest import DB_URL, START, Running, config_for


class _Refused(Exception):
    """Raised instead of connecting: the test needs no server."""


def _connect_params(url: str) -> tuple[bool, dict[str, Any]]:
    """The engine's pre-ping setting, and the keyword arguments its driver would be
    called with to connect to *url* (caught at the connect, which never happens)."""
    engine = make_engine(url)
    seen: dict[str, Any] = {}

    @event.listens_for(engine, "do_connect")
    def _spy(_dialect: Any, _rec: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        seen.update(kwargs)
        raise _Refused

    try:
        with pytest.raises(_Refused):
            engine.connect()
        return bool(getattr(engine.pool, "_pre_ping", False)), seen
    finally:
        engine.dispose()


def test_postgresql_connections_give_up_on_a_vanished_server() -> None:
    """A failover whose old server vanished without a word froze the coordinator for as
    long as the kernel retried: libpq's connect timeout, TCP keepalives and
    tcp_user_timeout make a dead server an error within seconds, and pre-ping replaces
    a pooled connection that died with a restart. A parameter the URL sets wins."""
    pre_ping, params = _connect_params("postgresql+psycopg://u@127.0.0.1:1/db")
    assert pre_ping
    assert {k: params.get(k) for k in PG_CONNECT_ARGS} == {
        "connect_timeout": 10,
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 5,
        "keepalives_count": 3,
        "tcp_user_timeout": 30_000,
    }
    _, params = _connect_params("postgresql+psycopg://u@127.0.0.1:1/db?connect_timeout=3")
    assert params["connect_timeout"] == "3"
    assert params["keepalives_idle"] == 10


def test_sqlite_engines_keep_their_own_settings(tmp_path: Path) -> None:
    """The libpq parameters are PostgreSQL's: SQLite's driver would refuse them."""
    db = Database(f"sqlite:///{tmp_path / 'c.db'}")
    try:
        assert db.run_sync(lambda s: s.execute(text("SELECT 1")).scalar()) == 1
    finally:
        db.close()


# --- the one-coordinator claim ---------------------------------------------------------------


def _suite_url(tmp_path: Path) -> str:
    return DB_URL or f"sqlite:///{tmp_path / 'c.db'}"


def _claim_pid(db: Database) -> int | None:
    """The PostgreSQL session that holds *db*'s claim; None on SQLite."""
    conn: Connection | None = db._claim._conn
    if conn is None:
        return None
    return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def _terminate(url: str, pid: int) -> Connection:
    """Terminate session *pid* (what a restart does to it), from a session of our own,
    which is returned open (and really ends when closed: no pool keeps it)."""
    other = (
        create_engine(url, poolclass=NullPool)
        .connect()
        .execution_options(isolation_level="AUTOCOMMIT")
    )
    assert other.execute(select(func.pg_terminate_backend(pid))).scalar()
    for _ in range(500):  # the backend exits, and its locks go, shortly after
        gone = other.execute(
            text("SELECT count(*) FROM pg_stat_activity WHERE pid = :p"), {"p": pid}
        ).scalar()
        if not gone:
            break
        time.sleep(0.01)
    return other


def test_a_lost_claim_is_taken_again(tmp_path: Path) -> None:
    """PostgreSQL: the claim's session terminated (a restart drops it the same way), the
    next check takes the lock again on a new session, and a second coordinator is still
    refused. SQLite: the claim holds all along."""
    url = _suite_url(tmp_path)
    db = Database(url)
    try:
        assert asyncio.run(db.check_claim()) is True
        pid = _claim_pid(db)
        if pid is not None:
            _terminate(url, pid).close()
            assert asyncio.run(db.check_claim()) is False  # lost, and taken again
            assert _claim_pid(db) not in (None, pid)
            assert asyncio.run(db.check_claim()) is True
        with pytest.raises(DatabaseInUse):
            Database(url)
    finally:
        db.close()
    Database(url).close()  # released on close


def test_a_claim_another_coordinator_took_is_lost(tmp_path: Path) -> None:
    """PostgreSQL: while the claim's session was gone, another session took the lock:
    the check says so (ClaimLost), and says so again until this one stops."""
    url = _suite_url(tmp_path)
    db = Database(url)
    try:
        pid = _claim_pid(db)
        if pid is None:  # SQLite: nobody else can take the flock while it is held
            assert asyncio.run(db.check_claim()) is True
            return
        other = _terminate(url, pid)
        try:
            assert other.execute(select(func.pg_try_advisory_lock(_PG_LOCK_KEY))).scalar()
            for _ in range(2):
                with pytest.raises(ClaimLost, match="another coordinator is using"):
                    asyncio.run(db.check_claim())
        finally:
            other.close()
    finally:
        db.close()


class _LostDatabase(Database):
    """SQLite cannot lose its claim: a database that reports it taken, to see what the
    server does then."""

    async def check_claim(self) -> bool:
        raise ClaimLost("another coordinator is using the database (test)")


def test_a_lost_claim_stops_the_server_with_a_failure_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Once another coordinator holds the database, this one logs database.claim_lost
    once and stops serving with a failure status (the start's refusal's, 2), its links
    closed and its database released."""
    monkeypatch.setattr(app_module, "CLAIM_CHECK_INTERVAL_S", 0.05)
    if DB_URL is None:
        monkeypatch.setattr(app_module, "Database", _LostDatabase)
    app = create_app(config_for(data_dir=tmp_path), clock=ManualClock(START))
    db: Database = app.state.coordinator.db
    sock = listen("127.0.0.1", 0)
    server = build_server(app, host="127.0.0.1", port=sock.getsockname()[1])
    exits: list[object] = []

    def serve() -> None:
        try:
            server.run(sockets=[sock])
        except SystemExit as exc:
            exits.append(exc.code)

    thread = threading.Thread(target=serve, daemon=True)
    other: Connection | None = None
    with caplog.at_level(logging.WARNING, logger="nodeclient.coordinator.database"):
        thread.start()
        try:
            end = time.monotonic() + 10
            while not server.started:
                assert time.monotonic() < end, "coordinator did not start"
                time.sleep(0.01)
            pid = _claim_pid(db)
            if pid is not None:  # PostgreSQL: its session ends, another coordinator's lock
                other = _terminate(DB_URL or "", pid)
                assert other.execute(select(func.pg_try_advisory_lock(_PG_LOCK_KEY))).scalar()
            thread.join(timeout=20)
            assert not thread.is_alive(), "the coordinator went on serving"
        finally:
            server.should_exit = True
            thread.join(timeout=10)
            if other is not None:
                other.close()
    assert exits == [2]
    lost = [r for r in caplog.records if r.getMessage() == "database.claim_lost"]
    assert len(lost) == 1 and lost[0].levelno == logging.ERROR
    with pytest.raises(RuntimeError, match="closed"):  # the lifespan's shutdown ran
        asyncio.run(db.run(lambda s: 1))


# --- HTTP and the scheduler while the database is down -----------------------------------------


def _down(*_args: Any, **_kw: Any) -> Any:
    raise OperationalError("SELECT 1", None, Exception("server closed the connection unexpectedly"))


def test_requests_during_an_outage_are_answered_503(
    coordinator: Running, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A database that cannot be reached: every request that needs it is a JSON 503
    with Retry-After (the requester client retries), not a 500, our traceback and the
    server's (a handler's exception re-raised to it); the outage is one warning, and
    one more line once the database answers again."""
    db = coordinator.coord.db
    url = coordinator.url + "/v1/jobs"
    with caplog.at_level(logging.WARNING), httpx.Client() as http:
        with monkeypatch.context() as patch:
            patch.setattr(db, "run_sync", _down)
            patch.setattr(db, "_run_conn", _down)
            for _ in range(3):
                response = http.get(url)
                assert response.status_code == 503
                assert response.headers["Retry-After"] == "5"
                assert response.json() == {
                    "error": "the coordinator's database is unavailable; try again shortly"
                }
        assert http.get(url).status_code == 200
        assert http.get(url).status_code == 200
    ours = [r for r in caplog.records if r.name == "nodeclient.coordinator.database"]
    assert [r.getMessage() for r in ours] == ["database.unavailable", "database.back"]
    assert getattr(ours[1], "failed_requests", None) == 3
    assert not [r for r in caplog.records if r.getMessage() == "http.unexpected_error"]
    assert not [r for r in caplog.records if r.name.startswith("uvicorn")]


def test_scheduler_logs_an_outage_once_and_its_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Rounds failing on an unreachable database (twice a second): one warning with no
    traceback, a reminder with the count only after OUTAGE_LOG_INTERVAL_S, and one line
    when a round succeeds; any other failure keeps its traceback every time."""
    clock = ManualClock(START)
    app = create_app(config_for(data_dir=tmp_path), clock=clock)
    scheduler: Scheduler = app.state.scheduler
    db: Database = app.state.coordinator.db
    failures: list[BaseException] = [_error() for _ in range(5)]

    async def tick() -> None:
        if failures:
            raise failures.pop(0)

    monkeypatch.setattr(scheduler, "tick", tick)
    try:
        with caplog.at_level(logging.INFO, logger="nodeclient.coordinator.scheduler"):
            for _ in range(3):
                asyncio.run(scheduler.run_round())
            clock.advance(OUTAGE_LOG_INTERVAL_S)
            asyncio.run(scheduler.run_round())  # the reminder: 4 rounds failed
            asyncio.run(scheduler.run_round())  # the 5th, within the minute: quiet
            asyncio.run(scheduler.run_round())  # succeeds
            asyncio.run(scheduler.run_round())
            failures.append(RuntimeError("a bug"))
            asyncio.run(scheduler.run_round())
    finally:
        db.close()
    records = [r for r in caplog.records if r.name == "nodeclient.coordinator.scheduler"]
    assert [r.getMessage() for r in records] == [
        "scheduler.database_unavailable",
        "scheduler.database_unavailable",
        "scheduler.database_back",
        "scheduler.error",
    ]
    assert records[0].exc_info is None and records[1].exc_info is None
    assert getattr(records[1], "failed_rounds", None) == 4
    assert getattr(records[2], "failed_rounds", None) == 5
    assert records[3].exc_info is not None


def test_scheduler_logs_a_full_disk_once_not_a_traceback_a_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A database whose disk is full fails every round's writes (SQLite's SQLITE_FULL):
    one warning that says so, with no traceback, as for a database that cannot be
    reached, not a traceback twice a second until the operator frees space."""
    import sqlite3

    app = create_app(config_for(data_dir=tmp_path), clock=ManualClock(START))
    scheduler: Scheduler = app.state.scheduler
    db: Database = app.state.coordinator.db
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = sqlite3.SQLITE_FULL
    full.sqlite_errorname = "SQLITE_FULL"

    async def tick() -> None:
        raise OperationalError("INSERT INTO tasks", {}, full)

    monkeypatch.setattr(scheduler, "tick", tick)
    try:
        with caplog.at_level(logging.INFO, logger="nodeclient.coordinator.scheduler"):
            for _ in range(3):
                asyncio.run(scheduler.run_round())
    finally:
        db.close()
    records = [r for r in caplog.records if r.name == "nodeclient.coordinator.scheduler"]
    assert [r.getMessage() for r in records] == ["scheduler.database_unavailable"]
    assert records[0].exc_info is None
    assert "database or disk is full" in getattr(records[0], "error", "")


def _error() -> OperationalError:
    return OperationalError("SELECT 1", None, Exception("connection refused"))


def _sqlite_error(statement: str) -> OperationalError:
    """The error SQLite really raises for *statement* (on a scratch database)."""
    import sqlite3

    connection = sqlite3.connect(":memory:")
    try:
        connection.execute(statement)
    except sqlite3.OperationalError as exc:
        return OperationalError(statement, {}, exc)
    finally:
        connection.close()
    raise AssertionError(f"{statement!r} did not fail")


def test_only_a_database_that_cannot_serve_now_is_unavailable(tmp_path: Path) -> None:
    """A server gone, a connection lost or SQLite busy answer 503 (try again shortly); a
    statement or schema that is wrong (no such column, a syntax error) is a bug, a 500
    with its trace, whatever exception class the driver gives it."""
    import sqlite3

    from nodeclient.coordinator.store import is_unavailable

    assert not is_unavailable(_sqlite_error("SELECT frobnicate FROM sqlite_master"))
    assert not is_unavailable(_sqlite_error("SELEC 1"))
    path = tmp_path / "busy.db"
    holder = sqlite3.connect(path, timeout=0)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    other = sqlite3.connect(path, timeout=0)
    try:
        other.execute("SELECT * FROM t")
    except sqlite3.OperationalError as exc:
        busy = OperationalError("SELECT * FROM t", {}, exc)
    else:
        raise AssertionError("a database locked by another connection was read")
    finally:
        other.close()
        holder.close()
    assert is_unavailable(busy)
    import psycopg

    assert is_unavailable(OperationalError("connect", {}, psycopg.OperationalError("no server")))


_SHUTDOWN_DURING_THE_CLAIMS_STOP = """
import asyncio, types
from nodeclient.coordinator import app as A
from nodeclient.coordinator.store import ClaimLost
A.CLAIM_CHECK_INTERVAL_S = 0.01
done = []
class DB:
    async def check_claim(self): raise ClaimLost("taken (test)")
    def close(self): done.append("db.close"); print("steps:", done, flush=True)
class Heartbeats:
    async def close(self): done.append("heartbeats.flushed")
async def stop_background():
    await asyncio.sleep(0.5)  # dispatches in flight, a slow commit
    done.append("stop_background")
coord = types.SimpleNamespace(db=DB(), links={}, heartbeats=Heartbeats(),
                              stop_background=stop_background,
                              close_cpu=lambda: done.append("close_cpu"))
async def idle(): await asyncio.Event().wait()
A.housekeeping = lambda c, s: idle()
async def main():
    serving = A.Serving(coord, types.SimpleNamespace(run=idle))
    async with serving.lifespan(None):
        await asyncio.sleep(0.1)  # the claim is lost at 0.01 s; then the shutdown comes
asyncio.run(main())
"""


def test_a_shutdown_during_a_lost_claims_stop_waits_for_it_and_keeps_the_status() -> None:
    """SIGTERM while a lost claim stops the coordinator: the stop runs whole (links,
    heartbeats flushed, the database closed, which frees the lock), and the process still
    exits 2, as for any lost claim; before, the shutdown cut the stop short and exited 0."""
    import subprocess
    import sys

    ran = subprocess.run(
        [sys.executable, "-c", _SHUTDOWN_DURING_THE_CLAIMS_STOP],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert ran.returncode == 2, ran.stderr
    assert "steps: ['stop_background', 'heartbeats.flushed', 'close_cpu', 'db.close']" in ran.stdout
