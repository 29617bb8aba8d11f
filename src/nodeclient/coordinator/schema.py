"""The coordinator database's schema version, and bringing an older database up to date.

``meta.schema_version`` records the layout a database has. At start the coordinator:

- gives a new database every table and records :data:`SCHEMA_VERSION`;
- brings an older database up to date (one written before the version was recorded
  counts as version 0): missing tables are created, then the columns and indexes added
  since are added, then the steps of each later version in :data:`_STEPS` run (data
  changes), and the new version is recorded. It is one transaction: SQLite's and
  PostgreSQL's DDL is transactional, so a failed upgrade leaves the database as it was;
- adds missing columns and indexes to a database of the current version too, at every
  start (a few catalogue reads): a layout changed without a new version (as version 4's
  was during its development) cannot leave a database short of a column. A test pins the
  layout of each version, so a later change to the models needs a new version;
- refuses a database written by a newer coordinator, which this one would misread.

Every column added after the first release is nullable or has a server default, so
``ALTER TABLE .. ADD COLUMN`` fills the rows already there; a test checks it against the
first release's layout. A column that is neither cannot be added this way and stops the
upgrade with a clear error rather than a half-done one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

from sqlalchemy import Column, Connection, Engine, Table, insert, inspect, select, sql, update
from sqlalchemy.schema import CreateColumn

from nodeclient.coordinator import models as m
from nodeclient.errors import UsageError

log = logging.getLogger("nodeclient.coordinator.schema")

SCHEMA_VERSION: Final = 6
SCHEMA_KEY: Final = "schema_version"

# version -> the data changes that take a database from version - 1 to it, run after the
# additive DDL (new tables, columns, indexes). Version 1 needs none: it is the first
# release's layout plus nullable or defaulted columns and new tables. Neither does 2
# (jobs.ram_mb and jobs.vram_mb, defaulted to 0: nothing declared; the index that pages
# GET /v1/jobs), nor 3 (round_inputs: a training round's start weights, stored once;
# its tasks' payloads may then be slice stubs, which a coordinator before it would send
# to nodes as they are, so it must refuse such a database). A job of an older database
# goes on: its stored whole slices are sent as they are, and its next round is stored
# the new way. Version 4 (node_manifests, tasks.manifest_hash) copies each node's current
# manifest into node_manifests, so the tasks leased to it from now on name a manifest that
# is published; tasks leased before name none. An early build of version 4 lacked
# node_manifests.replaced_at, task_attempts.manifest_hash, ix_nodes_manifest_hash and
# ix_task_attempts_manifest_hash: its databases get them at the next start, as any
# database of the current version short of a column or index does (no new version, so a
# coordinator of the released version 4 can still open them). Version 5 adds
# jobs.requester and its index (a job submitted before it names no requester, which any
# accepted requester token may read, as any could when it was submitted), and on SQLite
# rebuilds task_attempts with AUTOINCREMENT, whose ids are then never used twice.
# Version 6 keeps evidence: each equivocation's accepted Result (message and signature,
# copied from its task where the task is still there, so the record no longer needs the
# task's row, which job retention deletes), and the signed answer that ended a lease
# (task_attempts.answer_*: a Reject, or a Result its class's checks refused).


def _publish_current_manifests(conn: Connection) -> None:
    known = select(m.NodeManifest.manifest_hash)
    rows = select(m.Node.manifest_hash, m.Node.node_id, m.Node.manifest, m.Node.updated_at)
    conn.execute(
        insert(m.NodeManifest).from_select(
            ["manifest_hash", "node_id", "manifest", "registered_at"],
            rows.where(m.Node.manifest_hash.not_in(known)),
        )
    )


def _never_reuse_attempt_ids(conn: Connection) -> None:
    """SQLite: rebuild task_attempts with AUTOINCREMENT, its rows kept. Without it, a new
    row takes the largest id there plus one, so once job retention deleted the newest
    leases their ids came again, and /metrics, which counts each lease once by its id,
    stopped counting until the ids passed the last one it had seen."""
    if conn.dialect.name != "sqlite":
        return  # PostgreSQL: a sequence, which never gives an id twice
    ddl = conn.exec_driver_sql(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'task_attempts'"
    ).scalar()
    if ddl is None or "AUTOINCREMENT" in str(ddl).upper():
        return
    table = m.Base.metadata.tables["task_attempts"]
    for index in table.indexes:  # the renamed table keeps them, by the same names
        conn.exec_driver_sql(f'DROP INDEX IF EXISTS "{index.name}"')
    conn.exec_driver_sql("ALTER TABLE task_attempts RENAME TO task_attempts_before_v5")
    table.create(conn)
    names = [c.name for c in table.columns]
    before = sql.table("task_attempts_before_v5", *map(sql.column, names))
    conn.execute(insert(table).from_select(names, select(*before.columns)))
    conn.exec_driver_sql("DROP TABLE task_attempts_before_v5")


def _keep_accepted_results(conn: Connection) -> None:
    """Copy each equivocation's accepted Result from its task, while the task is there."""
    task = m.Task.__table__
    same = task.c.task_id == m.Equivocation.task_id
    conn.execute(
        update(m.Equivocation)
        .where(m.Equivocation.accepted_message.is_(None))
        .values(
            accepted_message=select(task.c.message).where(same).scalar_subquery(),
            accepted_signature=select(task.c.signature).where(same).scalar_subquery(),
        )
    )


_STEPS: Final[dict[int, Callable[[Connection], None]]] = {
    4: _publish_current_manifests,
    5: _never_reuse_attempt_ids,
    6: _keep_accepted_results,
}


class SchemaError(UsageError):
    """The database cannot be used by this coordinator as it is."""


def prepare(engine: Engine) -> int:
    """Create or bring up to date the coordinator's tables; the version found (0: none,
    or a database from before versions were recorded). Raises SchemaError for a database
    from a newer coordinator, or one this version cannot upgrade."""
    with engine.begin() as conn:
        existing = set(inspect(conn).get_table_names())
        found = _version(conn) if "meta" in existing else 0
        if found > SCHEMA_VERSION:
            raise SchemaError(
                f"the database {engine.url.render_as_string(hide_password=True)} has schema "
                f"version {found}, written by a newer nodeclient-coordinator; this one knows "
                f"versions up to {SCHEMA_VERSION}. Upgrade nodeclient, or give --db another "
                "database"
            )
        m.Base.metadata.create_all(conn)  # the tables that are missing, with their indexes
        added = [
            name
            for table in m.Base.metadata.sorted_tables
            if table.name in existing
            for name in _add_missing(conn, table)
        ]
        if found == SCHEMA_VERSION and added:
            log.warning("database.columns_added", extra={"version": found, "added": added})
        if found < SCHEMA_VERSION:
            for version in range(found + 1, SCHEMA_VERSION + 1):
                step = _STEPS.get(version)
                if step is not None:
                    step(conn)
            _record(conn, SCHEMA_VERSION, existing=found > 0)
            if existing:
                log.info(
                    "database.upgraded", extra={"from_version": found, "to_version": SCHEMA_VERSION}
                )
        return found


def _version(conn: Connection) -> int:
    """The version a database with a ``meta`` table records (0: none recorded)."""
    value = conn.scalar(select(m.Meta.value).where(m.Meta.key == SCHEMA_KEY))
    if value is None:
        return 0
    try:
        version = int(value)
    except ValueError:
        version = -1
    if version < 1:
        raise SchemaError(
            f"the database's {SCHEMA_KEY} is {value!r}, not a version number: it was not "
            "written by nodeclient-coordinator, or it was damaged"
        )
    return version


def _record(conn: Connection, version: int, *, existing: bool) -> None:
    if existing:
        conn.execute(update(m.Meta).where(m.Meta.key == SCHEMA_KEY).values(value=str(version)))
    else:
        conn.execute(insert(m.Meta).values(key=SCHEMA_KEY, value=str(version)))


def _add_missing(conn: Connection, table: Table) -> list[str]:
    """Add the columns and indexes of *table* that the database's copy lacks; their names
    (``table.column``, and the indexes' own)."""
    insp = inspect(conn)
    added = []
    have = {c["name"] for c in insp.get_columns(table.name)}
    for column in table.columns:
        if column.name not in have:
            _add_column(conn, table, column)
            added.append(f"{table.name}.{column.name}")
    indexes = {ix["name"] for ix in insp.get_indexes(table.name)}
    for index in table.indexes:
        if index.name not in indexes:
            index.create(conn)
            added.append(str(index.name))
    return added


def _add_column(conn: Connection, table: Table, column: Column[object]) -> None:
    if (
        column.primary_key
        or column.foreign_keys
        or (not column.nullable and column.server_default is None)
    ):
        raise SchemaError(
            f"cannot upgrade the database: column {table.name}.{column.name} is missing, "
            "and it can only be added to an empty table (not nullable, no default, or a "
            "key). Restore the database this coordinator version was meant to open"
        )
    spec = CreateColumn(column).compile(dialect=conn.dialect)
    name = conn.dialect.identifier_preparer.format_table(table)
    conn.exec_driver_sql(f"ALTER TABLE {name} ADD COLUMN {spec}")
    log.info("database.column_added", extra={"table": table.name, "column": column.name})
