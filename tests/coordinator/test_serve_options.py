"""`serve` options that must be refused up front: non-finite numbers, an empty
coordinator id, a port out of range; and the stored coordinator id they must not touch."""

from __future__ import annotations

import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from nodeclient.coordinator import store
from nodeclient.coordinator.cli import main
from nodeclient.coordinator.config import CoordinatorConfig
from nodeclient.coordinator.server import listen
from nodeclient.errors import UsageError
from tests.coordinator.conftest import START, ManualClock, config_for, start, stop


@pytest.fixture
def busy_port() -> Iterator[str]:
    """A port something else listens on: a serve that got past its options would stop
    there, with "cannot listen", instead of serving for ever."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield str(sock.getsockname()[1])


@pytest.mark.parametrize(
    "field",
    ["heartbeat_interval", "lease_seconds", "blob_retention", "blob_sweep_interval",
     "auth_timeout", "schedule_interval", "round_gap"],
)  # fmt: skip
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_setting_is_refused(field: str, value: float) -> None:
    """NaN passes every comparison, so it would pass the range checks: refused by name."""
    label = field.replace("_", " ")
    with pytest.raises(UsageError, match=f"^{label} must be a finite number, not {value}$"):
        CoordinatorConfig(**{field: value})


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize(
    ("option", "says"),
    [
        ("--blob-retention-hours", "blob retention must be a finite number, not nan"),
        ("--lease-seconds", "lease seconds must be a finite number, not nan"),
    ],
)
def test_serve_refuses_nan_in_one_line(
    option: str, says: str, busy_port: str, tmp_path: Path, capsys
) -> None:
    """`serve --blob-retention-hours nan` (which would remove every unreferenced blob at
    each sweep) and its kin exit 2 with one line, before anything starts."""
    argv = ["serve", option, "nan", "--port", busy_port, "--data-dir", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"nodeclient-coordinator: {says}\n"


@pytest.mark.usefixtures("restore_logging")
def test_serve_refuses_an_empty_coordinator_id(busy_port: str, tmp_path: Path, capsys) -> None:
    """--coordinator-id "" would have replaced the stored id with a new random one."""
    argv = ["serve", "--coordinator-id", "", "--port", busy_port, "--data-dir", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("nodeclient-coordinator: coordinator id must not be empty")
    assert err.count("\n") == 1
    with pytest.raises(UsageError, match="must not be empty"):
        CoordinatorConfig(coordinator_id="  ")


def test_an_empty_configured_id_keeps_the_stored_one(tmp_path: Path) -> None:
    """At the store, an empty id counts as not given: the stored id stays."""
    config = config_for(data_dir=tmp_path, coordinator_id=None)
    first, server, thread = start(config, ManualClock(START))
    ident = first.client.health()["coordinator_id"]
    stop(first, server, thread)
    engine = create_engine(config.database_url)
    try:
        with Session(engine) as session, session.begin():
            assert store.coordinator_id(session, "") == ident
        with Session(engine) as session:
            assert store.coordinator_id(session, None) == ident
    finally:
        engine.dispose()


@pytest.mark.parametrize("port", ["70000", "65536", "-1"])
def test_serve_refuses_a_port_out_of_range(port: str, capsys) -> None:
    """A port outside 0..65535 is a usage error (exit 2) naming the range, no traceback."""
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--port", port])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"the port must be 0 to 65535, not {int(port)}" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("interval", ["600", "0.01", "0", "nan"])
def test_serve_refuses_a_heartbeat_interval_no_node_accepts(interval: str, capsys) -> None:
    """Nodes take 0.05 to 300 s in the challenge: a coordinator offering another interval
    had every node refuse its link, with nothing on its side saying why."""
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--heartbeat-interval", interval])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--heartbeat-interval" in err and "Traceback" not in err


def test_listen_refuses_a_port_out_of_range() -> None:
    """Callers that skip the command line get a UsageError, not an OverflowError."""
    with pytest.raises(UsageError, match="the port must be 0 to 65535"):
        listen("127.0.0.1", 70000)


def test_the_data_directory_is_private(tmp_path: Path) -> None:
    """It holds requesters' payloads and results (the database) and blobs: created 0700,
    and an existing one others could enter is made 0700 (logged), so no local user reads
    the database behind the API's tokens."""
    from nodeclient.coordinator.app import create_app

    fresh = tmp_path / "fresh" / "data"
    create_app(config_for(data_dir=fresh)).state.coordinator.db.close()
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    old = tmp_path / "old"
    old.mkdir(mode=0o755)
    old.chmod(0o755)
    create_app(config_for(data_dir=old)).state.coordinator.db.close()
    assert stat.S_IMODE(old.stat().st_mode) == 0o700


def test_serve_collects_the_young_generation_on_a_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    """With 10,000 links the young generation grows without a collection (each frame frees
    as much as it makes) until one walks every link's waiting coroutines for 100+ ms:
    serve collects it every YOUNG_GC_INTERVAL_S instead, from its start until it stops."""
    import asyncio
    import io
    import types

    from nodeclient.coordinator import server

    calls: list[tuple[str, int | None]] = []
    fake_gc = types.SimpleNamespace(
        collect=lambda generation=None: calls.append(("collect", generation)),
        freeze=lambda: calls.append(("freeze", None)),
        get_count=lambda: (0, 0, 0),
        get_threshold=lambda: server.GC_THRESHOLDS,
    )

    class FakeServer:  # serves for 0.5 s, then stops as after a signal
        started = False

        async def serve(self, sockets: object) -> None:
            self.started = True
            await asyncio.sleep(0.5)

    monkeypatch.setattr(server, "gc", fake_gc)
    monkeypatch.setattr(server, "YOUNG_GC_INTERVAL_S", 0.05)
    monkeypatch.setattr(server, "build_server", lambda app, host, port: FakeServer())

    async def run() -> tuple[int, int]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            status = await server.serve(None, sock=sock, host="127.0.0.1", announce=io.StringIO())  # type: ignore[arg-type]
        young = calls.count(("collect", 0))
        await asyncio.sleep(0.2)  # stopped with the server
        assert calls.count(("collect", 0)) == young
        return status, young

    status, young = asyncio.run(run())
    assert status == 0
    assert calls[:2] == [("collect", None), ("freeze", None)]  # what it holds at start: frozen
    assert 5 <= young <= 11


def test_young_collections_still_collect_the_older_generations() -> None:
    """The timer's collections reset the count that triggers CPython's own collections,
    the only ones that reach the older generations: the timer must collect those itself
    when they are due, or garbage cycles that outlived a young collection (a closed link's
    objects) would never be freed."""
    import asyncio
    import gc
    import weakref

    from nodeclient.coordinator import server

    class Cycle:
        me: object

    refs: list[weakref.ref[Cycle]] = []

    async def run() -> None:
        timer = asyncio.create_task(server.collect_young(0.005))
        alive = []
        for _ in range(50):
            c = Cycle()
            c.me = c
            alive.append(c)
            refs.append(weakref.ref(c))
        del c
        await asyncio.sleep(0.05)  # young collections meanwhile: they are older now
        alive.clear()  # garbage, out of the young generation's reach
        await asyncio.sleep(0.3)  # 60 young collections: a middle one after 5, an old
        timer.cancel()  # one after 2 middle ones, wherever the cycles have got to

    saved = gc.get_threshold()
    gc.set_threshold(10_000, 5, 2)
    try:
        asyncio.run(run())
    finally:
        gc.set_threshold(*saved)
    assert [r for r in refs if r() is not None] == []


def test_a_database_url_whose_driver_is_missing_is_one_line(tmp_path: Path, capsys) -> None:
    """A URL naming a driver this install lacks (psycopg comes with nodeclient[postgres]
    only) exits 2 with one line that says what to install, not a traceback."""
    argv = ["serve", "--port", "0", "--data-dir", str(tmp_path),
            "--db", "postgresql+pg8000://user@127.0.0.1:1/none"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("nodeclient-coordinator: cannot open the coordinator database: ")
    assert "No module named 'pg8000'" in err and "nodeclient[postgres]" in err
    assert err.count("\n") == 1
