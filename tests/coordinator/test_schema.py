"""The database's schema version: an older database is brought up to date with its rows,
a newer one is refused, and a failed upgrade changes nothing."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, create_engine, inspect, text

from nodeclient.coordinator import cli, schema
from nodeclient.coordinator import models as m
from nodeclient.coordinator.client import CoordinatorClient
from nodeclient.coordinator.store import Database
from nodeclient.errors import RemoteProtocolError
from nodeclient.protocol import eip712
from tests.coordinator.conftest import (
    DB_URL,
    START,
    ManualClock,
    SimNode,
    audit_job,
    config_for,
    inference_payload,
    inference_result,
    make_node,
    run_inference_job,
    start,
    stop,
)

# The tables of the first release (commit b5a6c21), exactly as it created them on SQLite:
# no schema_version yet, and none of the columns and tables added since.
FIRST_RELEASE = """
CREATE TABLE meta ("key" VARCHAR(64) NOT NULL, value TEXT NOT NULL, PRIMARY KEY ("key"));
CREATE TABLE nodes (
    node_id VARCHAR(42) NOT NULL, wallet_address VARCHAR(42) NOT NULL,
    liveness_address VARCHAR(42) NOT NULL, pubkey_rsa TEXT NOT NULL,
    hardware_tier INTEGER NOT NULL, region VARCHAR(32) NOT NULL, workload_classes TEXT NOT NULL,
    max_parallel_subtasks INTEGER NOT NULL, manifest TEXT NOT NULL,
    manifest_hash VARCHAR(64) NOT NULL, issued_at BIGINT NOT NULL, registered_at FLOAT NOT NULL,
    updated_at FLOAT NOT NULL, last_seq BIGINT NOT NULL, state VARCHAR(16), last_seen FLOAT,
    unstaking_until BIGINT, PRIMARY KEY (node_id)
);
CREATE INDEX ix_nodes_wallet_address ON nodes (wallet_address);
CREATE TABLE jobs (
    job_id VARCHAR(36) NOT NULL, workload_class VARCHAR(64) NOT NULL,
    status VARCHAR(16) NOT NULL, reason TEXT, min_tier INTEGER NOT NULL, region VARCHAR(32),
    slices INTEGER NOT NULL, meta TEXT NOT NULL, created_at FLOAT NOT NULL, finished_at FLOAT,
    result BLOB, result_sha256 VARCHAR(64), PRIMARY KEY (job_id)
);
CREATE INDEX ix_jobs_status ON jobs (status);
CREATE TABLE equivocations (
    id INTEGER NOT NULL, task_id VARCHAR(36) NOT NULL, node_id VARCHAR(42) NOT NULL,
    accepted_proof VARCHAR(66) NOT NULL, conflicting_proof VARCHAR(66) NOT NULL,
    conflicting_signature VARCHAR(132) NOT NULL, conflicting_message TEXT NOT NULL,
    recorded_at FLOAT NOT NULL, PRIMARY KEY (id)
);
CREATE INDEX ix_equivocations_task_id ON equivocations (task_id);
CREATE INDEX ix_equivocations_node_id ON equivocations (node_id);
CREATE TABLE tasks (
    task_id VARCHAR(36) NOT NULL, job_id VARCHAR(36) NOT NULL, slice_index INTEGER NOT NULL,
    slice_count INTEGER NOT NULL, status VARCHAR(16) NOT NULL, node_id VARCHAR(42),
    attempts INTEGER NOT NULL, queued_at FLOAT NOT NULL, leased_at FLOAT, lease_deadline FLOAT,
    payload BLOB NOT NULL, result BLOB, result_sha256 VARCHAR(64), result_size BIGINT,
    proof VARCHAR(66), signature VARCHAR(132), message TEXT, completed_at FLOAT, reason TEXT,
    PRIMARY KEY (task_id), FOREIGN KEY(job_id) REFERENCES jobs (job_id)
);
CREATE INDEX ix_tasks_job_id ON tasks (job_id);
CREATE INDEX ix_tasks_node_id ON tasks (node_id);
CREATE INDEX ix_tasks_status_queued_at ON tasks (status, queued_at);
CREATE TABLE task_attempts (
    id INTEGER NOT NULL, task_id VARCHAR(36) NOT NULL, attempt INTEGER NOT NULL,
    node_id VARCHAR(42) NOT NULL, leased_at FLOAT NOT NULL, deadline FLOAT NOT NULL,
    ended_at FLOAT, outcome VARCHAR(32), PRIMARY KEY (id),
    FOREIGN KEY(task_id) REFERENCES tasks (task_id)
);
CREATE INDEX ix_task_attempts_task_id ON task_attempts (task_id);
"""
VALUES = [3.0, 4.0]


def _columns(url: str) -> dict[str, set[str]]:
    engine = create_engine(url)
    try:
        insp = inspect(engine)
        return {t: {c["name"] for c in insp.get_columns(t)} for t in insp.get_table_names()}
    finally:
        engine.dispose()


def _indexes(url: str, table: str) -> set[str]:
    engine = create_engine(url)
    try:
        return {str(ix["name"]) for ix in inspect(engine).get_indexes(table)}
    finally:
        engine.dispose()


def _version(url: str) -> str | None:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.scalar(
                text("SELECT value FROM meta WHERE key = :k"), {"k": schema.SCHEMA_KEY}
            )
    finally:
        engine.dispose()


def _as_written_by(path: Path, version: int, *statements: str) -> None:
    """Make the SQLite database at *path* what an older coordinator wrote: run
    *statements* (taking away what came later) and record *version*."""
    con = sqlite3.connect(path)
    try:
        for statement in statements:
            con.execute(statement)
        con.execute("UPDATE meta SET value = ? WHERE key = ?", (str(version), schema.SCHEMA_KEY))
        con.commit()
    finally:
        con.close()


def _one_job_done(data_dir: Path, clock: ManualClock, node: SimNode) -> dict[str, Any]:
    """A coordinator (SQLite in *data_dir*) that ran one inference job on *node*, then
    stopped: the job, as the API showed it."""
    first, server, thread = start(config_for(data_dir=data_dir, db_url=None), clock)
    try:
        first.register(node)
        first.link(node)
        return run_inference_job(first, node, VALUES)
    finally:
        stop(first, server, thread)


def _first_release_copy(current: Path, old: Path) -> None:
    """*old*: the first release's tables holding the rows of *current* (a database this
    version wrote), without schema_version: what an operator upgrading from it has."""
    con = sqlite3.connect(old)
    try:
        con.executescript(FIRST_RELEASE)
        con.execute("ATTACH DATABASE ? AS cur", (str(current),))
        for (table,) in con.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite%'"
        ).fetchall():
            cols = ", ".join(
                f'"{row[1]}"' for row in con.execute(f"PRAGMA main.table_info({table})")
            )
            con.execute(f"INSERT INTO main.{table} ({cols}) SELECT {cols} FROM cur.{table}")
        con.execute("DELETE FROM main.meta WHERE key = ?", (schema.SCHEMA_KEY,))
        con.commit()
    finally:
        con.close()


def test_a_first_release_database_is_upgraded_and_its_queued_job_runs(
    tmp_path: Path, rsa_keys
) -> None:
    """(SQLite, whose DDL the first release's layout is recorded in.) A database in the
    first release's layout (which made this version's scheduler fail
    on every round: no such column tasks.round_index) gets the columns and tables added
    since, keeps its node, job and coordinator_id, and its queued job is dispatched,
    verified and finished."""
    clock = ManualClock(START)
    node = make_node(rsa_keys, 0)
    payload = inference_payload(VALUES)
    first, server, thread = start(config_for(data_dir=tmp_path / "now", db_url=None), clock)
    try:
        first.register(node)
        job = first.client.submit_job("ai.inference", payload)
    finally:
        stop(first, server, thread)
    (tmp_path / "old").mkdir()
    old = tmp_path / "old" / "coordinator.db"
    _first_release_copy(tmp_path / "now" / "coordinator.db", old)
    url = f"sqlite:///{old}"
    assert "round_index" not in _columns(url)["tasks"]
    assert _version(url) is None

    again, server2, thread2 = start(config_for(data_dir=tmp_path / "old", db_url=None), clock)
    try:
        assert _version(url) == str(schema.SCHEMA_VERSION)
        cols = _columns(url)
        for table in m.Base.metadata.sorted_tables:
            assert cols[table.name] == {c.name for c in table.columns}, table.name
        (listed,) = again.client.nodes()
        assert listed["node_id"] == node.node_id
        assert again.client.manifest(listed["manifest_hash"])["node_id"] == node.node_id
        again.link(node)
        dispatch = node.recv()
        assert dispatch["type"] == "dispatch"
        assert dispatch["job_id"] == job["job_id"]
        ack = node.call(node.result(dispatch, inference_result(payload, VALUES)))
        assert ack["status"] == "accepted"
        assert again.wait_job(job["job_id"], "succeeded")["status"] == "succeeded"
    finally:
        stop(again, server2, thread2)


def _attempts_ddl_and_rows(path: Path) -> tuple[str, list[tuple[Any, ...]]]:
    con = sqlite3.connect(path)
    try:
        (ddl,) = con.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'task_attempts'"
        ).fetchone()
        rows = con.execute(
            "SELECT id, task_id, node_id, outcome FROM task_attempts ORDER BY id"
        ).fetchall()
        return ddl, rows
    finally:
        con.close()


def test_an_older_databases_task_attempts_are_rebuilt_never_to_reuse_an_id(
    tmp_path: Path, rsa_keys
) -> None:
    """(SQLite.) Version 5 rebuilds task_attempts with AUTOINCREMENT, so an id is never
    given twice (/metrics counts leases by id): its rows and indexes are kept, and the
    next lease gets a new id."""
    clock = ManualClock(START)
    node = make_node(rsa_keys, 0)
    _one_job_done(tmp_path / "now", clock, node)
    (tmp_path / "old").mkdir()
    old = tmp_path / "old" / "coordinator.db"
    _first_release_copy(tmp_path / "now" / "coordinator.db", old)
    ddl, before = _attempts_ddl_and_rows(old)
    assert "AUTOINCREMENT" not in ddl and len(before) == 1

    again, server2, thread2 = start(config_for(data_dir=tmp_path / "old", db_url=None), clock)
    try:
        ddl, after = _attempts_ddl_and_rows(old)
        assert "AUTOINCREMENT" in ddl
        assert after == before
        url = f"sqlite:///{old}"
        assert {"ix_task_attempts_task_id", "ix_task_attempts_manifest_hash"} <= _indexes(
            url, "task_attempts"
        )
        assert "task_attempts_before_v5" not in _columns(url)
        again.link(node)
        run_inference_job(again, node, VALUES)
        _, now = _attempts_ddl_and_rows(old)
        assert [row[0] for row in now] == [before[0][0], before[0][0] + 1]
    finally:
        stop(again, server2, thread2)


def test_a_version_1_database_gets_the_declared_resources_columns(tmp_path: Path, rsa_keys) -> None:
    """(SQLite.) Version 2 added jobs.ram_mb and jobs.vram_mb: a version 1 database gets
    them, its jobs declaring nothing (0), and its queued job is still dispatched."""
    clock = ManualClock(START)
    node = make_node(rsa_keys, 0)
    first, server, thread = start(config_for(data_dir=tmp_path, db_url=None), clock)
    try:
        first.register(node)
        job = first.client.submit_job("ai.inference", inference_payload(VALUES))
    finally:
        stop(first, server, thread)
    url = f"sqlite:///{tmp_path / 'coordinator.db'}"
    _as_written_by(  # what version 1 wrote
        tmp_path / "coordinator.db",
        1,
        "ALTER TABLE jobs DROP COLUMN ram_mb",
        "ALTER TABLE jobs DROP COLUMN vram_mb",
    )
    assert "ram_mb" not in _columns(url)["jobs"]
    again, server2, thread2 = start(config_for(data_dir=tmp_path, db_url=None), clock)
    try:
        assert _version(url) == str(schema.SCHEMA_VERSION)
        assert {"ram_mb", "vram_mb"} <= _columns(url)["jobs"]
        assert again.client.job(job["job_id"])["resources"] == {}
        again.link(node)
        dispatch = node.recv()
        assert dispatch["job_id"] == job["job_id"] and dispatch["resources"] == {}
    finally:
        stop(again, server2, thread2)


def test_a_version_3_database_publishes_its_nodes_manifests(tmp_path: Path, rsa_keys) -> None:
    """(SQLite.) Version 4 publishes every manifest a task names (node_manifests,
    tasks.manifest_hash): a version 3 database gets each node's current manifest published,
    a task leased before names none (so `verify` says so), and one leased after names the
    node's, and verifies."""
    clock = ManualClock(START)
    node = make_node(rsa_keys, 0)
    first, server, thread = start(config_for(data_dir=tmp_path, db_url=None), clock)
    try:
        first.register(node)
        first.link(node)
        before = run_inference_job(first, node, VALUES)
        current = first.client.node(node.node_id)["manifest_hash"]
    finally:
        stop(first, server, thread)
    url = f"sqlite:///{tmp_path / 'coordinator.db'}"
    _as_written_by(  # what version 3 wrote
        tmp_path / "coordinator.db",
        3,
        "DROP TABLE node_manifests",
        "DROP INDEX ix_tasks_manifest_hash",
        "ALTER TABLE tasks DROP COLUMN manifest_hash",
    )
    assert "node_manifests" not in _columns(url)
    again, server2, thread2 = start(config_for(data_dir=tmp_path, db_url=None), clock)
    try:
        assert _version(url) == str(schema.SCHEMA_VERSION)
        served = again.client.manifest(current)
        assert served["node_id"] == node.node_id
        old_job = again.client.job(before["job_id"])
        assert old_job["tasks"][0]["manifest_hash"] is None
        (line,) = audit_job(again, old_job).tasks
        assert line.ok is True and line.manifest_checked is False
        assert "before schema version 4" in line.detail
        again.link(node)
        done = run_inference_job(again, node, VALUES)
        assert done["tasks"][0]["manifest_hash"] == current
        assert audit_job(again, done).ok
    finally:
        stop(again, server2, thread2)


def test_a_version_4_databases_jobs_stay_readable_by_every_requester(
    tmp_path: Path, rsa_keys
) -> None:
    """(SQLite.) Version 5 records who submitted a job (jobs.requester), and a requester
    reads only its own jobs. A job of a version 4 database names no requester: any
    accepted token reads it, as any could when it was submitted."""
    clock = ManualClock(START)
    before = _one_job_done(tmp_path, clock, make_node(rsa_keys, 0))
    url = f"sqlite:///{tmp_path / 'coordinator.db'}"
    _as_written_by(  # what version 4 wrote
        tmp_path / "coordinator.db",
        4,
        "DROP INDEX ix_jobs_requester_created_at_job_id",
        "ALTER TABLE jobs DROP COLUMN requester",
    )
    tokens = tmp_path / "requesters"
    tokens.write_text("alice-token-0123456789abcdef\ncarol-token-0123456789abcdef\n")
    tokens.chmod(0o600)
    config = config_for(data_dir=tmp_path, db_url=None, requester_token_file=tokens)
    again, server2, thread2 = start(config, clock)
    try:
        assert _version(url) == str(schema.SCHEMA_VERSION)
        alice = CoordinatorClient(again.url, token="alice-token-0123456789abcdef")
        carol = CoordinatorClient(again.url, token="carol-token-0123456789abcdef")
        for requester in (alice, carol):
            assert requester.job(before["job_id"])["status"] == "succeeded"
            assert requester.raw_job_result(before["job_id"])
        new = alice.submit_job("ai.inference", inference_payload(VALUES))["job_id"]
        assert [j["job_id"] for j in carol.jobs()] == [before["job_id"]]
        with pytest.raises(RemoteProtocolError, match="404 no job"):
            carol.job(new)
    finally:
        stop(again, server2, thread2)


def test_a_version_5_databases_equivocations_keep_their_accepted_results(
    tmp_path: Path, rsa_keys
) -> None:
    """(SQLite.) Version 6 keeps each equivocation's accepted Result in its record, so the
    evidence outlives the task's row: a record of a version 5 database gets it from its
    task, which is still there, as it is upgraded; the leases get the answer columns."""
    clock = ManualClock(START)
    node = make_node(rsa_keys, 0)
    task = _one_job_done(tmp_path, clock, node)["tasks"][0]
    path = tmp_path / "coordinator.db"
    _as_written_by(  # what version 5 wrote, with one equivocation recorded
        path,
        5,
        "ALTER TABLE equivocations DROP COLUMN accepted_message",
        "ALTER TABLE equivocations DROP COLUMN accepted_signature",
        "ALTER TABLE task_attempts DROP COLUMN answer_type",
        "ALTER TABLE task_attempts DROP COLUMN answer_message",
        "ALTER TABLE task_attempts DROP COLUMN answer_signature",
        "INSERT INTO equivocations (task_id, node_id, accepted_proof, conflicting_proof, "
        "conflicting_signature, conflicting_message, recorded_at) VALUES "
        f"('{task['task_id']}', '{node.node_id}', '{task['proof']}', '0x{'02' * 32}', "
        f"'0x{'03' * 65}', '{{}}', {START})",
    )
    again, server2, thread2 = start(config_for(data_dir=tmp_path, db_url=None), clock)
    try:
        url = f"sqlite:///{path}"
        assert _version(url) == str(schema.SCHEMA_VERSION)
        (row,) = again.coord.db.run_sync(lambda s: s.query(m.Equivocation).all())
        assert row.accepted_signature == task["signature"]
        signed = eip712.typed_data_json(
            "Result",
            eip712.message_from_json("Result", json.loads(row.accepted_message)),
            chain_id=again.coord.config.chain_id,
        )
        assert signed == task["typed_data"]
        assert {"answer_type", "answer_message", "answer_signature"} <= _columns(url)[
            "task_attempts"
        ]
    finally:
        stop(again, server2, thread2)


def test_a_database_of_a_newer_coordinator_is_refused_untouched(tmp_path: Path) -> None:
    url = DB_URL or f"sqlite:///{tmp_path / 'c.db'}"
    Database(url).close()
    assert _version(url) == str(schema.SCHEMA_VERSION)  # recorded at creation
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE meta SET value = :v WHERE key = :k"),
            {"v": str(schema.SCHEMA_VERSION + 1), "k": schema.SCHEMA_KEY},
        )
        conn.execute(text("DROP TABLE train_rounds"))  # "newer" layouts may differ
    engine.dispose()
    with pytest.raises(schema.SchemaError, match="newer nodeclient-coordinator"):
        Database(url)
    assert "train_rounds" not in _columns(url)  # nothing created in a database it refuses
    assert _version(url) == str(schema.SCHEMA_VERSION + 1)


def test_serve_refuses_a_newer_database_in_one_line(
    tmp_path: Path, capsys, restore_logging
) -> None:
    path = tmp_path / "c.db"
    Database(f"sqlite:///{path}").close()
    con = sqlite3.connect(path)
    con.execute("UPDATE meta SET value = '99' WHERE key = ?", (schema.SCHEMA_KEY,))
    con.commit()
    con.close()
    data = tmp_path / "data"  # not the default, ./coordinator-data, in the tests' directory
    code = cli.main(["serve", "--port", "0", "--data-dir", str(data), "--db", f"sqlite:///{path}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert "schema version 99" in err and "Upgrade nodeclient" in err


@pytest.mark.parametrize("value", ["x", "0", "-3"])
def test_a_schema_version_that_is_not_one_is_refused(tmp_path: Path, value: str) -> None:
    path = tmp_path / "c.db"
    Database(f"sqlite:///{path}").close()
    con = sqlite3.connect(path)
    con.execute("UPDATE meta SET value = ? WHERE key = ?", (value, schema.SCHEMA_KEY))
    con.commit()
    con.close()
    with pytest.raises(schema.SchemaError, match="not a version number"):
        Database(f"sqlite:///{path}")


def test_a_failed_upgrade_leaves_the_database_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upgrade is one transaction: a step that fails after the columns were added
    takes them back, and the version stays unrecorded."""
    path = tmp_path / "c.db"
    con = sqlite3.connect(path)
    con.executescript(FIRST_RELEASE)
    con.close()
    before = _columns(f"sqlite:///{path}")

    def broken(_conn: Any) -> None:
        raise RuntimeError("step failed")

    monkeypatch.setitem(schema._STEPS, schema.SCHEMA_VERSION, broken)
    with pytest.raises(RuntimeError, match="step failed"):
        Database(f"sqlite:///{path}")
    assert _columns(f"sqlite:///{path}") == before
    assert _version(f"sqlite:///{path}") is None
    monkeypatch.delitem(schema._STEPS, schema.SCHEMA_VERSION)
    Database(f"sqlite:///{path}").close()  # and it upgrades once the step works
    assert "round_index" in _columns(f"sqlite:///{path}")["tasks"]


def test_a_column_that_cannot_be_added_stops_the_upgrade(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'c.db'}")
    table = Table("t", MetaData(), Column("a", Integer), Column("b", Integer, nullable=False))
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (a INTEGER)"))
        with pytest.raises(schema.SchemaError, match=r"column t\.b is missing"):
            schema._add_missing(conn, table)
    engine.dispose()


def test_every_column_added_since_the_first_release_can_be_added() -> None:
    """Columns that the first release's tables lack must be nullable or have a server
    default (ALTER TABLE .. ADD COLUMN fills the rows already there), and no key."""
    engine = create_engine("sqlite://")
    with engine.begin() as conn:
        for statement in FIRST_RELEASE.split(";"):
            if statement.strip():
                conn.execute(text(statement))
        old = {t: {c["name"] for c in inspect(conn).get_columns(t)} for t in
               inspect(conn).get_table_names()}  # fmt: skip
    for table in m.Base.metadata.sorted_tables:
        for column in table.columns:
            if table.name in old and column.name not in old[table.name]:
                assert not column.primary_key and not column.foreign_keys
                assert column.nullable or column.server_default is not None, column


def test_an_unversioned_database_gets_the_missing_columns_on_any_database(tmp_path: Path) -> None:
    """The same upgrade through the suite's database (PostgreSQL's ALTER TABLE too)."""
    url = DB_URL or f"sqlite:///{tmp_path / 'c.db'}"
    Database(url).close()
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE tasks DROP COLUMN round_index"))
        conn.execute(text("ALTER TABLE jobs DROP COLUMN train_state"))
        conn.execute(text("DROP INDEX ix_tasks_node_id"))
        conn.execute(text("DELETE FROM meta WHERE key = :k"), {"k": schema.SCHEMA_KEY})
    engine.dispose()
    Database(url).close()
    cols = _columns(url)
    assert "round_index" in cols["tasks"] and "train_state" in cols["jobs"]
    assert "ix_tasks_node_id" in _indexes(url, "tasks")
    assert _version(url) == str(schema.SCHEMA_VERSION)


def _layout() -> str:
    """SHA-256 of the tables' layout: each column's name, SQL type, nullability, key,
    default and reference, and each index's name, columns and uniqueness (read from the
    models, not from generated DDL, whose spacing a SQLAlchemy release may change)."""
    import hashlib
    import json

    from sqlalchemy.dialects import sqlite

    dialect = sqlite.dialect()
    layout = []
    for table in m.Base.metadata.sorted_tables:
        columns = [
            [
                c.name,
                c.type.compile(dialect=dialect),
                c.nullable,
                c.primary_key,
                None if c.server_default is None else str(c.server_default.arg),  # type: ignore[attr-defined]
                sorted(fk.target_fullname for fk in c.foreign_keys),
            ]
            for c in table.columns
        ]
        indexes = sorted(
            [str(ix.name), [c.name for c in ix.columns], bool(ix.unique)] for ix in table.indexes
        )
        layout.append([table.name, columns, indexes])
    return hashlib.sha256(json.dumps(layout).encode()).hexdigest()


# The layout of each schema version, as _layout() hashes it. A change to the models needs
# a new SCHEMA_VERSION (and its line here): a database of the old layout recorded as the
# same version would be taken as current by other builds.
LAYOUTS = {
    4: "a24133e69e1ae36acbca71ff4ea676136a52959e4b117399629eb0757f588cd4",
    5: "f6a21be8295a1f56f03eadf22327510417612a33fb932e10945eeae4828db219",
    6: "7f7f9ff722135bc591816c19d4b682fc244a503bf4e9054b85f20da1c8f21450",
}


def test_the_models_layout_is_the_one_recorded_for_the_schema_version() -> None:
    assert _layout() == LAYOUTS.get(schema.SCHEMA_VERSION), (
        "the models' layout changed: raise schema.SCHEMA_VERSION, say what the new version "
        "adds (schema.py, docs/protocol.md), and record the new layout in LAYOUTS"
    )


def test_an_early_version_4_database_gets_the_columns_it_lacked(tmp_path: Path) -> None:
    """(SQLite.) An early build of version 4 lacked node_manifests.replaced_at,
    task_attempts.manifest_hash and their indexes: recorded as 4, it gets them on its way
    to the current version."""
    url = f"sqlite:///{tmp_path / 'c.db'}"
    Database(url).close()
    _as_written_by(
        tmp_path / "c.db",
        4,
        "DROP INDEX ix_nodes_manifest_hash",
        "DROP INDEX ix_task_attempts_manifest_hash",
        "ALTER TABLE node_manifests DROP COLUMN replaced_at",
        "ALTER TABLE task_attempts DROP COLUMN manifest_hash",
    )
    Database(url).close()
    cols = _columns(url)
    assert "replaced_at" in cols["node_manifests"]
    assert "manifest_hash" in cols["task_attempts"]
    assert "ix_nodes_manifest_hash" in _indexes(url, "nodes")
    assert _version(url) == str(schema.SCHEMA_VERSION)


def test_a_current_database_short_of_a_column_gets_it_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A database recorded as the current version but lacking a column and an index (a
    layout changed without a new version) gets them at the next start, and says so."""
    url = DB_URL or f"sqlite:///{tmp_path / 'c.db'}"
    Database(url).close()
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_task_attempts_manifest_hash"))
        conn.execute(text("ALTER TABLE task_attempts DROP COLUMN manifest_hash"))
    engine.dispose()
    with caplog.at_level("WARNING", logger="nodeclient.coordinator.schema"):
        Database(url).close()
    assert "manifest_hash" in _columns(url)["task_attempts"]
    (added,) = [r for r in caplog.records if r.msg == "database.columns_added"]
    assert added.added == [  # type: ignore[attr-defined]
        "task_attempts.manifest_hash",
        "ix_task_attempts_manifest_hash",
    ]
    assert _version(url) == str(schema.SCHEMA_VERSION)
