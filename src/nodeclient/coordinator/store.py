"""SQL access: one database worker thread, one transaction per call, and shared queries.

Every database call runs on a single dedicated thread (:meth:`Database.run`), so the
event loop that serves thousands of links never blocks on SQL, and transactions never
race each other inside this process: each call is one ``BEGIN .. COMMIT`` that sees a
consistent state (a result that arrives while its lease expires is decided by whichever
transaction runs first, and the other sees its outcome). Functions that take a
``Session`` are the transactions; the domain modules (registry, scheduler, verifier)
write their own and pass them to ``run``.

The heartbeat group commit (:meth:`Database.run_heartbeats`) only updates the liveness
columns of ``nodes`` and runs on a long-lived connection. It never queues behind job
inserts or scheduling rounds: on SQLite (one writer at a time) it jumps the database
thread's queue and waits only for the transaction in progress; on other databases
(PostgreSQL: row locks) it has a thread of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import hashlib
import json
import os
import secrets
import threading
import uuid
from collections import deque
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Final, TypeVar, cast

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Row,
    Select,
    Table,
    and_,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    or_,
    select,
    text,
    true,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import InstrumentedAttribute, Session
from sqlalchemy.pool import ConnectionPoolEntry

from nodeclient.coordinator import models as m
from nodeclient.coordinator import schema
from nodeclient.errors import ManifestError, UsageError
from nodeclient.protocol import eip712, tier

T = TypeVar("T")


def _sqlite_pragmas(dbapi_conn: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    # Connection set-up only, not query features: WAL lets readers run beside the writer.
    # synchronous=FULL: a commit is on disk before it is answered (an accepted result, a
    # submitted job), even across a power loss; NORMAL would only keep the file intact.
    # The heartbeat connection lowers it to NORMAL for itself (Database._run_heartbeat_conn).
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.close()
    # The driver's own transaction handling sends BEGIN only before a write, so a SAVEPOINT
    # that came first would open (and its RELEASE commit) a transaction of its own: part of
    # a scheduler round could commit early. SQLAlchemy's documented pysqlite recipe: the
    # driver stays out of it, and every transaction begins with an explicit BEGIN.
    dbapi_conn.isolation_level = None


def _sqlite_begin(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN")


# PostgreSQL connections find a server that vanished (a failover, a cut network) within
# seconds, not hours: without these, a query on a connection whose server went away
# without a FIN waited for the kernel's retransmissions to give up, and held the database
# thread (every transaction, the shutdown too) all that time. libpq parameters, which
# psycopg takes as keyword arguments: give up connecting after 10 s; probe an idle
# connection after 10 s of silence, 3 probes 5 s apart; and drop one whose sent data has
# gone unacknowledged for 30 s (tcp_user_timeout, in ms), which keepalive alone misses
# while a query waits to be sent.
PG_CONNECT_ARGS: Final[dict[str, int]] = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}


def make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql":
        # The URL's own parameters (?connect_timeout=3) win over these defaults.
        connect_args = {k: v for k, v in PG_CONNECT_ARGS.items() if k not in parsed.query}
        # pool_pre_ping: a pooled connection that died with its server (a restart) is
        # replaced when checked out, instead of failing the transaction given it.
        engine = create_engine(url, future=True, pool_pre_ping=True, connect_args=connect_args)
    else:
        engine = create_engine(url, future=True)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
    return engine


def _in_memory(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite" and engine.url.database in (None, "", ":memory:")


class _DbThread:
    """One worker thread running calls in order, except that urgent calls go first.

    The heartbeat group commit is urgent: it waits for the transaction in progress, never
    for the job inserts and scheduling rounds queued behind it.
    """

    def __init__(self, name: str) -> None:
        self._cv = threading.Condition()
        self._urgent: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._normal: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._closed = False
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], T], *, urgent: bool = False) -> Future[T]:
        fut: Future[T] = Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("the database is closed")
            (self._urgent if urgent else self._normal).append((fn, fut))
            self._cv.notify()
        return fut

    def _main(self) -> None:
        while True:
            with self._cv:
                while not (self._urgent or self._normal or self._closed):
                    self._cv.wait()
                if self._urgent:
                    fn, fut = self._urgent.popleft()
                elif self._normal:
                    fn, fut = self._normal.popleft()
                else:
                    return  # closed, and everything queued has run
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                result = fn()
            except BaseException as exc:  # noqa: BLE001 (handed to the caller, like an executor)
                fut.set_exception(exc)
            else:
                fut.set_result(result)

    def shutdown(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join()


class DatabaseInUse(UsageError):
    """Another coordinator process has the database open."""


# SQLite's result codes (the low byte) that say the database is busy, not that the
# statement is wrong: locked by another process past the busy timeout.
_SQLITE_BUSY: Final = frozenset({5, 6})  # SQLITE_BUSY, SQLITE_LOCKED
# PostgreSQL's SQLSTATEs of a server that cannot serve now: class 08 (connection
# exceptions) and these: shutting down, crashed, starting, statement cancelled.
_PG_UNAVAILABLE: Final = frozenset({"57P01", "57P02", "57P03", "57014"})


def is_unavailable(exc: BaseException) -> bool:
    """Whether a database error says the database cannot be used right now (a server
    down or restarting, a connection lost, SQLite locked by another process), rather
    than that a statement or the schema is wrong (``no such column``, a syntax error, a
    read-only file): a bug, which is a 500 with its trace."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if not isinstance(exc, OperationalError):
        return False
    code = getattr(exc.orig, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF in _SQLITE_BUSY
    state = getattr(exc.orig, "sqlstate", None)
    if not isinstance(state, str):  # psycopg: no SQLSTATE when no server answered
        return True
    return state.startswith("08") or state in _PG_UNAVAILABLE


class ClaimLost(DatabaseInUse):
    """This coordinator's claim on its database went away while it served (PostgreSQL
    restarted, or its session was terminated) and another coordinator holds it now."""


# pg_try_advisory_lock's key for "a coordinator serves this database" (advisory locks are
# per database): the first 8 bytes of SHA-256("nodeclient-coordinator"), as a signed int64.
_PG_LOCK_KEY: Final = 0x655518DE7F53D3EE
# The same lock as pg_locks shows a bigint key: its high and low 32 bits, objsubid 1.
_PG_LOCK_HELD: Final = text(
    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
    " AND pid = pg_backend_pid() AND classid = :high AND objid = :low AND objsubid = 1"
).bindparams(high=_PG_LOCK_KEY >> 32, low=_PG_LOCK_KEY & 0xFFFFFFFF)


class _Claim:
    """This process's claim on the database: one coordinator per database. A second one
    would keep its own in-memory view (heartbeat sequence numbers, links, the node
    cache) and lease and accept the same tasks as the first: replayed heartbeats taken,
    results stored under the wrong node. SQLite: an exclusive ``flock`` on a file beside
    the database; PostgreSQL: a session advisory lock on a connection held open. Both go
    when the process does, kill -9 included.

    PostgreSQL's lock also goes when its session does (a server restart, a failover,
    ``pg_terminate_backend``) while this process serves on: :meth:`check` finds that out
    and takes the lock again, or says that another coordinator has it now. A ``flock``
    lasts as long as its open file, which only this process closes."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._fd: int | None = None
        self._conn: Connection | None = None
        self._shown = engine.url.render_as_string(hide_password=True)
        if engine.dialect.name == "sqlite" and not _in_memory(engine):
            lock = f"{engine.url.database}.lock"
            try:
                self._fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise UsageError(f"cannot open the database's lock file {lock}: {exc}") from exc
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(self._fd)
                raise DatabaseInUse(
                    f"another coordinator is using the database {self._shown} (it holds "
                    f"{lock}): stop it first, or give --db another database"
                ) from None
        elif engine.dialect.name == "postgresql":
            self._conn = self._take_pg(DatabaseInUse)

    def _take_pg(self, refused: type[DatabaseInUse]) -> Connection:
        """A connection of its own holding the advisory lock; *refused* if another
        session holds it."""
        conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            got = conn.execute(select(func.pg_try_advisory_lock(_PG_LOCK_KEY))).scalar()
        except BaseException:
            conn.invalidate()
            conn.close()
            raise
        if not got:
            conn.close()
            raise refused(
                f"another coordinator is using the database {self._shown} (it holds the "
                "advisory lock): stop it first, or give --db another database"
            )
        return conn

    def check(self) -> bool:
        """Whether the claim was held all along (True), or had gone and is taken again
        (False). Raises :class:`ClaimLost` if another coordinator holds it now, and the
        database's error if it cannot be reached (the claim is checked again later)."""
        conn = self._conn
        if conn is not None:
            try:
                if conn.execute(_PG_LOCK_HELD).scalar():
                    return True
            except DBAPIError:  # its session is gone, and the lock with it
                pass
            # Never used again, and never back into the pool: a live one would keep the
            # session's other locks, if any.
            self._conn = None
            conn.invalidate()
            conn.close()
        elif self._engine.dialect.name != "postgresql":
            return True  # SQLite's flock lasts while its file is open
        self._conn = self._take_pg(ClaimLost)
        return False

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # the lock goes with it; the file stays, empty
            self._fd = None
        if self._conn is not None:
            with contextlib.suppress(Exception):  # a server gone: the lock went with it
                self._conn.execute(select(func.pg_advisory_unlock(_PG_LOCK_KEY)))
            self._conn.close()
            self._conn = None


class Database:
    """The SQL engine plus the one worker thread every transaction runs on."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        try:
            self._claim = _Claim(self.engine)  # one coordinator per database
        except BaseException:
            self.engine.dispose()
            raise
        try:
            schema.prepare(self.engine)  # create, upgrade, or refuse a newer database
        except BaseException:
            self._claim.release()
            self.engine.dispose()
            raise
        self._thread = _DbThread("coordinator-db")
        # Heartbeat commits: SQLite has one writer at a time, so they stay on the one
        # database thread and jump its queue (waiting on SQLite's lock from a second thread
        # would sleep in its busy handler); other databases give them their own thread.
        self._hb_thread = self._thread
        if self.engine.dialect.name != "sqlite":
            self._hb_thread = _DbThread("coordinator-db-heartbeats")
        self._hb_conn: Connection | None = None  # used only on the heartbeat thread
        # Transactions committed by run and run_core: whether the database answers again
        # after an outage (only the database thread adds to it).
        self.calls_ok = 0

    def run_sync(self, fn: Callable[[Session], T]) -> T:
        """Run *fn* in one transaction on the calling thread (start-up only)."""
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            result = fn(session)
        self.calls_ok += 1
        return result

    async def run(self, fn: Callable[[Session], T]) -> T:
        """Run *fn* in one transaction on the database thread."""
        return await asyncio.wrap_future(self._thread.submit(functools.partial(self.run_sync, fn)))

    def _run_conn(self, fn: Callable[[Connection], T]) -> T:
        with self.engine.begin() as conn:
            result = fn(conn)
        self.calls_ok += 1
        return result

    async def run_core(self, fn: Callable[[Connection], T]) -> T:
        """Run *fn* on a Core connection in one transaction on the database thread."""
        return await asyncio.wrap_future(self._thread.submit(functools.partial(self._run_conn, fn)))

    def read_aside(self, fn: Callable[[Connection], T]) -> T:
        """Run *fn* in one transaction on a connection of its own, on the calling thread:
        a long read (a large result's copy) that must not hold up the database thread.
        WAL lets it read beside the writer. An in-memory SQLite database (one per
        connection) runs it on the database thread instead."""
        if _in_memory(self.engine):
            return self._thread.submit(functools.partial(self._run_conn, fn)).result()
        with self.engine.connect() as conn, conn.begin():
            return fn(conn)

    def _run_heartbeat_conn(self, fn: Callable[[Connection], T]) -> T:
        if _in_memory(self.engine):  # one database per connection: use the pool's own
            return self._run_conn(fn)
        conn = self._hb_conn
        if conn is None:
            conn = self._hb_conn = self.engine.connect()
            if self.engine.dialect.name == "sqlite":
                # Heartbeats only: 10,000 nodes commit several times a second. A power loss
                # may take back the last stored seqs (never corrupt the file); a replay of
                # one of those would need the node's liveness key on an authenticated link.
                # On the driver's connection: outside a transaction (SQLite refuses it in one).
                raw = conn.connection.driver_connection
                if raw is not None:
                    raw.execute("PRAGMA synchronous=NORMAL")
        try:
            with conn.begin():
                return fn(conn)
        except BaseException:
            # A connection that failed mid-transaction is not trusted again: the next
            # commit opens a fresh one. Invalidated, not returned to the pool: the other
            # transactions would get it, and its synchronous=NORMAL with it.
            self._hb_conn = None
            conn.invalidate()
            conn.close()
            raise

    async def run_heartbeats(self, fn: Callable[[Connection], T]) -> T:
        """Run *fn* in one transaction on a long-lived Core connection, ahead of the queue."""
        call = functools.partial(self._run_heartbeat_conn, fn)
        return await asyncio.wrap_future(self._hb_thread.submit(call, urgent=True))

    def _close_heartbeat_conn(self) -> None:
        if self._hb_conn is not None:
            self._hb_conn.invalidate()  # never back into the pool: its synchronous=NORMAL
            self._hb_conn.close()
            self._hb_conn = None

    async def check_claim(self) -> bool:
        """Check this process's claim on the database (:meth:`_Claim.check`), on the
        database thread: True if it was held all along, False if it was taken again."""
        return await asyncio.wrap_future(self._thread.submit(self._claim.check))

    def close(self) -> None:
        self._hb_thread.submit(self._close_heartbeat_conn).result()
        if self._hb_thread is not self._thread:
            self._hb_thread.shutdown()
        self._thread.shutdown()
        self._claim.release()
        self.engine.dispose()


# --- coordinator identity ---------------------------------------------------------------------


def coordinator_id(session: Session, configured: str | None) -> str:
    """The persisted coordinator_id; the first start stores *configured* or a fresh one.

    An empty *configured* counts as not given: it must never replace the stored id."""
    configured = configured or None
    row = session.get(m.Meta, "coordinator_id")
    if row is not None and configured in (None, row.value):
        return row.value
    value = configured or f"coordinator-{secrets.token_hex(4)}"
    if row is None:
        session.add(m.Meta(key="coordinator_id", value=value))
    else:
        row.value = value
    return value


def check_chain_id(session: Session, configured: int) -> None:
    """Record the chain id at the first start; refuse another one later (UsageError).

    Every signature the database holds (results, manifests, rejects) was made for that
    chain's EIP-712 domain, and the jobs API rebuilds each task's ``typed_data`` with the
    coordinator's chain id: under another one, no stored signature would verify."""
    row = session.get(m.Meta, "chain_id")
    if row is None:
        session.add(m.Meta(key="chain_id", value=str(configured)))
        return
    if row.value != str(configured):
        raise UsageError(
            f"this database holds signatures made for chain_id {row.value}, and --chain-id "
            f"is {configured}: their typed data would no longer verify. Start with "
            f"--chain-id {row.value}, or give a new database (--db)"
        )


# --- nodes ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What scheduling and link checks need of a registered node, cached in memory."""

    node_id: str
    wallet_address: str
    liveness_address: str
    public_key: RSAPublicKey
    hardware_tier: int
    region: str
    workload_classes: frozenset[str]
    max_parallel_subtasks: int
    registered_at: float
    unstaking_until: int | None
    last_seq: int
    state: str | None
    last_seen: float | None
    slot_ram_mb: int = 0  # what a task may count on in one slot (tier.slot_memory_mb)
    slot_vram_mb: int = 0
    manifest_hash: str = ""  # its manifest's, which a task leased to it records


def node_info(row: m.Node) -> NodeInfo:
    key = serialization.load_pem_public_key(row.pubkey_rsa.encode("ascii"))
    if not isinstance(key, RSAPublicKey):  # verified at registration; a bug if not
        raise TypeError("stored pubkey_rsa is not an RSA key")
    try:  # verified at registration; a row changed since offers no declared resources
        manifest = json.loads(row.manifest)
        ram_mb, vram_mb = tier.slot_memory_mb(
            manifest["cpu"], manifest["gpu"], row.max_parallel_subtasks
        )
    except (ValueError, TypeError, KeyError, ManifestError):
        ram_mb = vram_mb = 0
    return NodeInfo(
        node_id=row.node_id,
        wallet_address=row.wallet_address,
        liveness_address=row.liveness_address,
        public_key=key,
        hardware_tier=row.hardware_tier,
        region=row.region,
        workload_classes=frozenset(json.loads(row.workload_classes)),
        max_parallel_subtasks=row.max_parallel_subtasks,
        registered_at=row.registered_at,
        unstaking_until=row.unstaking_until,
        last_seq=row.last_seq,
        state=row.state,
        last_seen=row.last_seen,
        slot_ram_mb=ram_mb,
        slot_vram_mb=vram_mb,
        manifest_hash=row.manifest_hash,
    )


def load_nodes(session: Session) -> list[NodeInfo]:
    return [node_info(row) for row in session.scalars(select(m.Node))]


_NODES = cast(Table, m.Node.__table__)
_HEARTBEAT_UPDATE = (
    update(_NODES)
    # The stored seq never goes back, even were the in-memory check wrong.
    .where(_NODES.c.node_id == bindparam("b_node_id"), _NODES.c.last_seq < bindparam("b_seq"))
    .values(last_seq=bindparam("b_seq"), state=bindparam("b_state"), last_seen=bindparam("b_seen"))
)


def write_heartbeats(conn: Connection, *, batch: Sequence[tuple[str, int, str, float]]) -> None:
    """Persist (node_id, seq, state, seen_at) for a batch of heartbeats: one commit for all.

    One executemany UPDATE in SQLAlchemy Core (this is the hot path: no ORM session).
    The in-memory seq check runs first and the cache is loaded from this table at
    start, so the stored seq only ever grows.
    """
    if batch:
        conn.execute(
            _HEARTBEAT_UPDATE,
            [{"b_node_id": n, "b_seq": q, "b_state": st, "b_seen": t} for n, q, st, t in batch],
        )


def touch_node(session: Session, node_id: str, seen: float) -> None:
    row = session.get(m.Node, node_id)
    if row is not None:
        row.last_seen = seen


def node_row_json(
    row: m.Node, *, online: bool, seen: tuple[str | None, float | None] | None = None
) -> dict[str, Any]:
    """The node as the nodes API shows it. *seen*: its (state, last_seen) in memory, which
    may be a heartbeat ahead of the row (heartbeats are written behind their acks)."""
    state, last_seen = (row.state, row.last_seen) if seen is None else seen
    return {
        "node_id": row.node_id,
        "wallet": row.wallet_address,
        "tier": row.hardware_tier,
        "region": row.region,
        "online": online,
        "state": state,
        "last_seen": last_seen,
        "unstaking_until": row.unstaking_until,
        "workload_classes": json.loads(row.workload_classes),
        "max_parallel_subtasks": row.max_parallel_subtasks,
        "liveness_address": row.liveness_address,
        "registered_at": row.registered_at,
        "manifest_hash": row.manifest_hash,  # GET /v1/manifests/{hash}: the signed manifest
    }


def forget_nodes_tx(
    session: Session,
    *,
    seen_before: float,
    keep: Collection[str],
    limit: int,
    after: str = "",
    unlinked_before: float | None = None,
    issued_before: float | None = None,
) -> tuple[list[str], str | None]:
    """Delete the nodes neither seen nor registered (or updated) since *seen_before*, and
    those with no accepted result on record (never linked, or linked and never worked)
    neither seen nor registered (or updated) since *unlinked_before*, with their wallet
    proofs: of the first *limit* such nodes by node_id after *after*,
    those not in *keep* (linked now) and holding no lease, and, with *issued_before*,
    whose manifest was issued before it. Returns the ids deleted and the key to go on
    from (None: no more). Tasks and equivocations keep naming a deleted node: its
    signatures are checked by its address, not by this row."""
    leased = select(m.Task.node_id).where(m.Task.status == m.LEASED, m.Task.node_id.is_not(None))
    gone = and_(
        func.coalesce(m.Node.last_seen, 0.0) < seen_before,  # neither linked
        m.Node.updated_at < seen_before,  # nor registered since
    )
    if unlinked_before is not None:
        worked = (
            select(m.Task.task_id)
            .where(m.Task.node_id == m.Node.node_id, m.Task.status == m.SUCCEEDED)
            .exists()
        )
        idle = and_(
            func.coalesce(m.Node.last_seen, 0.0) < unlinked_before,
            m.Node.updated_at < unlinked_before,
            ~worked,
        )
        gone = or_(gone, idle)
    if issued_before is not None:
        gone = and_(gone, m.Node.issued_at < issued_before)
    found = list(
        session.scalars(
            select(m.Node.node_id)
            .where(
                gone,
                m.Node.node_id > after,
                m.Node.node_id.not_in(leased),
            )
            .order_by(m.Node.node_id)
            .limit(limit)
        )
    )
    ids = [node_id for node_id in found if node_id not in keep]
    if ids:
        session.execute(delete(m.WalletProof).where(m.WalletProof.node_id.in_(ids)))
        session.execute(delete(m.Node).where(m.Node.node_id.in_(ids)))
    return ids, (found[-1] if len(found) == limit else None)


def unnamed_manifests(replaced_before: float) -> Select[Any]:
    """The hashes of the manifests forget_manifests_tx may delete. Each test of a name is
    an index lookup (nodes, tasks and task_attempts index manifest_hash): a scan per
    manifest would hold the database thread for a minute at 10,000 nodes."""
    digest = m.NodeManifest.manifest_hash
    named = (
        select(m.Node.node_id).where(m.Node.manifest_hash == digest),
        select(m.Task.task_id).where(m.Task.manifest_hash == digest),
        select(m.TaskAttempt.id).where(m.TaskAttempt.manifest_hash == digest),
    )
    since = func.coalesce(m.NodeManifest.replaced_at, m.NodeManifest.registered_at)
    return select(digest).where(since < replaced_before, *(~query.exists() for query in named))


def forget_manifests_tx(session: Session, *, replaced_before: float, limit: int) -> int:
    """Delete up to *limit* manifests that neither a node (as its current one), a task nor
    a lease names any more, replaced before *replaced_before* (or, of a node forgotten,
    registered before it); how many."""
    found = list(session.scalars(unnamed_manifests(replaced_before).limit(limit)))
    if found:
        session.execute(delete(m.NodeManifest).where(m.NodeManifest.manifest_hash.in_(found)))
    return len(found)


def list_nodes(
    session: Session, *, limit: int | None = None, after: tuple[float, str] | None = None
) -> list[m.Node]:
    """Nodes in the order they registered (then by id), from just after the node
    *after* names (its registered_at and node_id), at most *limit*."""
    query = select(m.Node)
    if after is not None:
        query = query.where(after_key(m.Node.registered_at, m.Node.node_id, after))
    return list(session.scalars(query.order_by(m.Node.registered_at, m.Node.node_id).limit(limit)))


def list_equivocations(
    session: Session, node_id: str, *, limit: int, after: int | None = None
) -> list[m.Equivocation]:
    """The node's recorded equivocations in the order they were recorded, from just after
    the record *after* (its id), at most *limit*."""
    query = select(m.Equivocation).where(m.Equivocation.node_id == node_id)
    if after is not None:
        query = query.where(m.Equivocation.id > after)
    return list(session.scalars(query.order_by(m.Equivocation.id).limit(limit)))


def equivocation_json(row: m.Equivocation, *, chain_id: int) -> dict[str, Any]:
    """An equivocation as the API shows it: the two Results the node signed for one task,
    each as EIP-712 typed data with its signature and proof, so that anyone can recover
    both signers with an Ethereum library. The accepted one is null in a record written
    before schema version 6 whose task was gone by then (only its proof is left)."""

    def signed(message: str | None, signature: str | None, proof: str) -> dict[str, Any]:
        typed = None
        if message is not None:
            parsed = eip712.message_from_json("Result", json.loads(message))
            typed = eip712.typed_data_json("Result", parsed, chain_id=chain_id)
        return {"proof": proof, "signature": signature, "typed_data": typed}

    return {
        "id": row.id,
        "task_id": row.task_id,
        "node_id": row.node_id,
        "recorded_at": row.recorded_at,
        "accepted": signed(row.accepted_message, row.accepted_signature, row.accepted_proof),
        "conflicting": signed(
            row.conflicting_message, row.conflicting_signature, row.conflicting_proof
        ),
    }


# --- jobs and tasks ---------------------------------------------------------------------------


def leased_counts(session: Session) -> dict[str, int]:
    """Tasks leased per node: what is subtracted from each node's capacity."""
    rows = session.execute(
        select(m.Task.node_id, func.count())
        .where(m.Task.status == m.LEASED)
        .group_by(m.Task.node_id)
    )
    return {node_id: n for node_id, n in rows if node_id is not None}


def task_json(task: m.Task | Row[Any], *, chain_id: int) -> dict[str, Any]:
    """A task as the API shows it, from its row or the columns :func:`job_task_rows`
    reads (the same names); its Result message as EIP-712 typed data."""
    typed: dict[str, Any] | None = None
    if task.message is not None:
        message = eip712.message_from_json("Result", json.loads(task.message))
        typed = eip712.typed_data_json("Result", message, chain_id=chain_id)
    return {
        "task_id": task.task_id,
        "slice_index": task.slice_index,
        "slice_count": task.slice_count,
        "round": task.round_index,
        "node_id": task.node_id,
        "manifest_hash": task.manifest_hash,
        "status": task.status,
        "attempts": task.attempts,
        "lease_deadline": task.lease_deadline,
        "proof": task.proof,
        "signature": task.signature,
        "result_sha256": task.result_sha256,
        "result_size": task.result_size,
        "typed_data": typed,
        "reason": task.reason,
    }


def job_tasks(session: Session, job_id: str) -> list[m.Task]:
    return list(
        session.scalars(
            select(m.Task)
            .where(m.Task.job_id == job_id)
            .order_by(m.Task.round_index, m.Task.slice_index)
        )
    )


# What task_json reads of a task: no payload or result, each up to hundreds of MiB.
_TASK_COLUMNS: Final = (
    m.Task.task_id, m.Task.slice_index, m.Task.slice_count, m.Task.round_index,
    m.Task.node_id, m.Task.status, m.Task.attempts, m.Task.lease_deadline, m.Task.proof,
    m.Task.signature, m.Task.result_sha256, m.Task.result_size, m.Task.message,
    m.Task.reason, m.Task.manifest_hash,
)  # fmt: skip


def job_task_rows(session: Session, job_id: str) -> list[Row[Any]]:
    """The columns :func:`task_json` reads of each of the job's tasks, in task order:
    plain rows, so that their JSON (a typed-data object each) can be built after the
    transaction, off the database thread."""
    query = select(*_TASK_COLUMNS).where(m.Task.job_id == job_id)
    return list(session.execute(query.order_by(m.Task.round_index, m.Task.slice_index)))


def job_head(job: m.Job) -> dict[str, Any]:
    """A job as the API shows it, without its task list."""
    return {
        "job_id": job.job_id,
        "workload_class": job.workload_class,
        "status": job.status,
        "reason": job.reason,
        "min_tier": job.min_tier,
        "region": job.region,
        "resources": job_resources(job),
        "slices": job.slices,
        "round": job.round_index,
        "created_at": job.created_at,
        "finished_at": job.finished_at,
        "result_sha256": job.result_sha256,
    }


@dataclass(frozen=True, slots=True)
class JobRows:
    """What a transaction reads for a job's JSON; :meth:`json` builds it afterwards."""

    head: dict[str, Any]
    tasks: list[Row[Any]] | None  # None: the task list was not asked for

    def json(self, *, chain_id: int) -> dict[str, Any]:
        """The job as the API shows it: CPU work (a typed-data object per finished task,
        seconds for 10,000 tasks), so a caller runs it outside the transaction."""
        if self.tasks is None:
            return dict(self.head)
        return {**self.head, "tasks": [task_json(t, chain_id=chain_id) for t in self.tasks]}


def readable_by(requester: str | None) -> ColumnElement[bool]:
    """The jobs *requester* (the SHA-256 of its token, hex) may read or cancel: its own,
    and those submitted while the requester routes were open (they name no requester:
    anyone could read them then); every job where the routes are open (None)."""
    if requester is None:
        return true()
    return or_(m.Job.requester.is_(None), m.Job.requester == requester)


def readable_job(session: Session, job_id: str, requester: str | None) -> m.Job | None:
    """The job *job_id* if *requester* may read it (:func:`readable_by`), else None."""
    query = select(m.Job).where(m.Job.job_id == job_id, readable_by(requester))
    return session.scalars(query).first()


def job_rows(
    session: Session, job_id: str, *, tasks: bool = True, requester: str | None = None
) -> JobRows | None:
    """The job's row and, with *tasks*, its tasks' rows; None if there is no such job
    that *requester* may read."""
    job = readable_job(session, job_id, requester)
    if job is None:
        return None
    return JobRows(job_head(job), job_task_rows(session, job_id) if tasks else None)


def job_resources(job: m.Job) -> dict[str, int]:
    """What each of the job's tasks declares it needs (the dispatch's ``resources``)."""
    declared = {"ram_mb": job.ram_mb or 0, "vram_mb": job.vram_mb or 0}
    return {key: value for key, value in declared.items() if value}


def after_key(
    first: InstrumentedAttribute[Any], second: InstrumentedAttribute[Any], after: tuple[Any, Any]
) -> ColumnElement[bool]:
    """Rows after *after* in the order (*first*, *second*): keyset paging, written out
    (portable: no row-value comparison)."""
    return or_(first > after[0], and_(first == after[0], second > after[1]))


def list_jobs(
    session: Session,
    *,
    limit: int | None = None,
    after: tuple[float, str] | None = None,
    status: str | None = None,
    requester: str | None = None,
) -> list[dict[str, Any]]:
    """Jobs in the order they were created (then by id), from just after the job
    *after* names (its created_at and job_id), at most *limit*, of *status* if given,
    that *requester* may read (:func:`readable_by`)."""
    cols = (m.Job.job_id, m.Job.workload_class, m.Job.status, m.Job.created_at)
    query = select(*cols).where(readable_by(requester))
    if status is not None:
        query = query.where(m.Job.status == status)
    if after is not None:
        query = query.where(after_key(m.Job.created_at, m.Job.job_id, after))
    rows = session.execute(query.order_by(m.Job.created_at, m.Job.job_id).limit(limit))
    return [{"job_id": j, "workload_class": c, "status": s, "created_at": t} for j, c, s, t in rows]


def insert_job(
    session: Session,
    *,
    workload_class: str,
    payloads: Sequence[bytes],
    min_tier: int,
    region: str | None,
    meta: dict[str, Any],
    now: float,
    blobs: Collection[str] = (),
    ram_mb: int = 0,
    vram_mb: int = 0,
    shared: bytes | None = None,
    requester: str | None = None,
) -> str:
    """Insert a job and one queued task per payload slice; returns the job_id. *blobs*:
    the SHA-256 of each blob-store blob its tasks reference (kept while it runs).
    *shared*: what every task of round 0 shares (``m.RoundInput``), when its class has it.
    *requester*: who submitted it (:func:`readable_by`)."""
    job_id = str(uuid.uuid4())
    session.add(
        m.Job(
            job_id=job_id,
            workload_class=workload_class,
            status=m.QUEUED,
            min_tier=min_tier,
            region=region,
            ram_mb=ram_mb,
            vram_mb=vram_mb,
            slices=len(payloads),
            meta=json.dumps(meta),
            created_at=now,
            requester=requester,
        )
    )
    session.flush()
    for index, payload in enumerate(payloads):
        session.add(
            m.Task(
                task_id=str(uuid.uuid4()),
                job_id=job_id,
                slice_index=index,
                slice_count=len(payloads),
                status=m.QUEUED,
                attempts=0,
                queued_at=now,
                payload=payload,
            )
        )
    session.add_all(m.JobBlob(job_id=job_id, sha256=sha) for sha in sorted(set(blobs)))
    if shared is not None:
        set_round_input(session, job_id, 0, shared)
    return job_id


def set_round_input(session: Session, job_id: str, round_index: int, data: bytes) -> str:
    """Record *data* as what every task of the job's round *round_index* shares (in place
    of the previous round's); returns its SHA-256."""
    sha256 = hashlib.sha256(data).hexdigest()
    row = session.get(m.RoundInput, job_id)
    if row is None:
        session.add(
            m.RoundInput(
                job_id=job_id, round_index=round_index, sha256=sha256, size=len(data), data=data
            )
        )
    else:
        row.round_index, row.sha256, row.size, row.data = round_index, sha256, len(data), data
    return sha256


def round_inputs(session: Session, job_ids: Collection[str]) -> dict[str, tuple[str, bytes]]:
    """job_id -> (sha256, data) of what each job's current round shares, for those of
    *job_ids* that have it."""
    if not job_ids:
        return {}
    rows = session.execute(
        select(m.RoundInput.job_id, m.RoundInput.sha256, m.RoundInput.data).where(
            m.RoundInput.job_id.in_(sorted(job_ids))
        )
    )
    return {job_id: (sha256, data) for job_id, sha256, data in rows}


def job_failed_reason(task_reason: str | None, job_reason: str) -> str:
    """The reason of a task withdrawn because its job failed: what happened to the task
    itself first (a node's refusal, say), when it has a reason, then the job's."""
    ended = f"job failed: {job_reason}"
    return ended if not task_reason else f"{task_reason}; {ended}"


def end_job(session: Session, job: m.Job, status: str, now: float, reason: str | None) -> None:
    """Mark *job* ended (succeeded or failed) and empty its tasks' payloads (and delete
    what its round's tasks shared).

    Nothing reads a payload once its job has ended: a late result of a task meets its
    status first. Proofs cover results, which stay until the job's retention ends; a
    payload (up to ``max_payload_bytes`` a task) would only fill the database meanwhile.
    """
    job.status, job.reason, job.finished_at = status, reason, now
    job.round_deadline = None
    session.execute(
        update(m.Task)
        .where(m.Task.job_id == job.job_id, func.length(m.Task.payload) > 0)
        .values(payload=b"")
        .execution_options(synchronize_session=False)
    )
    session.execute(
        delete(m.RoundInput)
        .where(m.RoundInput.job_id == job.job_id)
        .execution_options(synchronize_session=False)
    )


_JOB_BLOBS_FILLED: Final = "job_blobs_filled"
_UNFINISHED: Final = m.Job.status.not_in((m.SUCCEEDED, m.FAILED))


def fill_job_blobs(session: Session, refs: Callable[[str, bytes], Iterable[str]]) -> int:
    """Once per database: record the blobs of the unfinished jobs submitted before jobs
    recorded them (``job_blobs``), so that the blob store's sweep keeps them too.
    *refs(workload_class, payload)* lists a task payload's blobs. Returns the jobs filled.
    """
    if session.get(m.Meta, _JOB_BLOBS_FILLED) is not None:
        return 0
    filled = 0
    unfinished = select(m.Job.job_id, m.Job.workload_class).where(_UNFINISHED)
    for job_id, workload_class in session.execute(unfinished).all():
        payloads = session.execute(select(m.Task.payload).where(m.Task.job_id == job_id))
        shas = {sha for (payload,) in payloads for sha in refs(workload_class, payload)}
        session.add_all(m.JobBlob(job_id=job_id, sha256=sha) for sha in sorted(shas))
        filled += bool(shas)
    session.add(m.Meta(key=_JOB_BLOBS_FILLED, value="1"))
    return filled


def _finished_before(when: float) -> ColumnElement[bool]:
    """Jobs that ended (succeeded or failed) before *when*."""
    return and_(m.Job.status.in_((m.SUCCEEDED, m.FAILED)), m.Job.finished_at < when)


def count_finished_before(session: Session, *, finished_before: float) -> int:
    """How many jobs finished before *finished_before* (what ``forget_jobs_tx`` deletes)."""
    count = select(func.count()).select_from(m.Job).where(_finished_before(finished_before))
    return int(session.scalar(count) or 0)


def forget_jobs_tx(session: Session, *, finished_before: float, limit: int = 100) -> int:
    """Delete up to *limit* jobs that finished before *finished_before*, with their tasks,
    attempts, round metrics and blob references; how many. Equivocation evidence stays."""
    ids = list(
        session.scalars(
            select(m.Job.job_id)
            .where(_finished_before(finished_before))
            .order_by(m.Job.finished_at)
            .limit(limit)
        )
    )
    if not ids:
        return 0
    tasks = select(m.Task.task_id).where(m.Task.job_id.in_(ids))
    session.execute(delete(m.TaskAttempt).where(m.TaskAttempt.task_id.in_(tasks)))
    session.execute(delete(m.Task).where(m.Task.job_id.in_(ids)))
    for table in (m.TrainRound, m.JobBlob, m.RoundInput):
        session.execute(delete(table).where(table.job_id.in_(ids)))
    session.execute(delete(m.Job).where(m.Job.job_id.in_(ids)))
    return len(ids)


def blobs_in_use(session: Session) -> set[str]:
    """The blobs that some job not yet finished references (the blob store keeps them)."""
    rows = session.execute(
        select(m.JobBlob.sha256)
        .join(m.Job, m.Job.job_id == m.JobBlob.job_id)
        .where(_UNFINISHED)
        .distinct()
    )
    return {sha for (sha,) in rows}
