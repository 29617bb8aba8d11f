"""The coordinator's one frozen configuration object (clocks live in nodeclient.clock).

Every rule that depends on time (heartbeat timeouts, leases, the unstake cooldown,
manifest freshness) reads an injected :class:`Clock`, never ``time.time()`` directly, so
tests move time forward by assignment and end-to-end tests can cross the 7-day unstake
cooldown through :class:`OffsetFileClock` without waiting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Final

from sqlalchemy.engine import URL

from nodeclient.errors import UsageError
from nodeclient.protocol.eip712 import DEVNET_CHAIN_ID
from nodeclient.protocol.messages import HEARTBEAT_INTERVAL_MIN, MAX_COORDINATOR_ID

DEFAULT_HEARTBEAT_INTERVAL: Final = 30.0  # 2.3.3 Coordinator Link: "Heartbeat every 30s"
MISSED_HEARTBEATS_OFFLINE: Final = 3  # a node silent for 3 intervals is offline
AUTH_TIMEOUT_S: Final = 10.0
AUTH_MAX_SKEW_S: Final = 300
UNSTAKE_MAX_SKEW_S: Final = 300
MIB: Final = 1024 * 1024
# A blob checked for a job is dated then: kept at least this long, the job is recorded
# long before a sweep could remove it (coordinator/blobstore.py).
MIN_BLOB_RETENTION: Final = 3600.0
MIN_QUEUE_TIMEOUT: Final = 60.0


@dataclass(frozen=True, slots=True)
class SybilPolicy:
    """The registration pre-screen (2.3.2: "checks the wallet for prior registrations").

    A wallet may hold at most ``max_nodes_per_wallet`` nodes; a node whose unstake
    cooldown has ended (``unstaking_until`` in the past) no longer counts, so a wallet
    that retired a node may register another.

    A manifest's ``wallet_address`` is only a claim unless it carries a ``wallet_proof``
    (the wallet's own signature naming the node), so a node that proves its wallet counts
    only the wallet's other *proven* nodes: nodes that merely name a wallet cannot use up
    its owner's places. ``require_wallet_proof`` refuses every node without a proof.
    """

    max_nodes_per_wallet: int = 8
    require_wallet_proof: bool = False

    def to_json(self) -> dict[str, int | bool]:
        return {
            "max_nodes_per_wallet": self.max_nodes_per_wallet,
            "require_wallet_proof": self.require_wallet_proof,
        }


@dataclass(frozen=True, slots=True)
class CoordinatorConfig:
    """Everything the coordinator is told at start-up; only ``cli.py`` builds it from argv.

    ``db_url`` is a SQLAlchemy URL; None means ``sqlite:///<data_dir>/coordinator.db``,
    for which ``data_dir`` must have a UTF-8 name (a URL is text).
    ``coordinator_id`` None means: the one persisted in the database, or a fresh
    ``coordinator-<8 hex>`` stored there on first start.
    """

    data_dir: Path = Path("coordinator-data")
    db_url: str | None = None
    chain_id: int = DEVNET_CHAIN_ID
    coordinator_id: str | None = None
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL
    sybil: SybilPolicy = field(default_factory=SybilPolicy)
    lease_seconds: float = 300.0
    max_attempts: int = 3
    auth_timeout: float = AUTH_TIMEOUT_S
    schedule_interval: float = 0.5  # the scheduler runs at least this often (seconds)
    # ... and at most this often (capped at schedule_interval): a burst of wake-ups (job
    # submissions, links, results) is placed by one round, so the per-round cost of
    # walking every link is shared.
    round_gap: float = 0.05
    max_blob_bytes: int = 256 * MIB
    # A blob no unfinished job references goes after this long unused (0: kept forever);
    # the store is swept this often (coordinator/blobstore.py).
    blob_retention: float = 7 * 24 * 3600.0
    blob_sweep_interval: float = 3600.0
    # A finished job (its tasks, results, proofs, attempts) is deleted this long after it
    # finished, at the same sweep (0: kept forever; store.forget_jobs_tx).
    job_retention: float = 30 * 86400.0
    # A job with tasks queued and none leased for this long, since anything last happened
    # to it, fails at the same sweep (0: waits for ever; leases.fail_stalled_tx).
    queue_timeout: float = 24 * 3600.0
    # A node not seen for this long, holding no lease, is deleted at the same sweep (0:
    # kept forever; registry.forget_nodes). It registers again if it comes back.
    node_retention: float = 30 * 86400.0
    max_payload_bytes: int = 32 * MIB  # a task payload and a result travel in one frame
    manifest_max_age: int = 24 * 3600
    # POST /v1/nodes from one client address, a minute; over it, 429 with Retry-After (0:
    # no limit; loopback is never limited: service.AddressLimiter).
    registrations_per_minute: int = 60
    # Bearer-token files guarding the requester routes and /metrics (None: open;
    # coordinator/tokens.py).
    requester_token_file: Path | None = None
    metrics_token_file: Path | None = None

    def __post_init__(self) -> None:
        # NaN compares false with everything, so it would pass every range check below
        # (a NaN retention would then remove every unreferenced blob at each sweep).
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                label = f.name.replace("_", " ")
                raise UsageError(f"{label} must be a finite number, not {value}")
        if self.coordinator_id is not None:
            _check_coordinator_id(self.coordinator_id)
        # Nodes refuse a challenge that offers a shorter interval (messages.Challenge).
        for bad, message in (
            (self.heartbeat_interval < HEARTBEAT_INTERVAL_MIN,
             f"heartbeat interval must be at least {HEARTBEAT_INTERVAL_MIN} seconds: nodes "
             "refuse a challenge that offers a shorter one"),
            (self.round_gap < 0, "the round gap must not be negative"),
            (self.lease_seconds <= 0, "lease seconds must be positive"),
            (self.max_attempts < 1, "max attempts must be at least 1"),
            (self.sybil.max_nodes_per_wallet < 1, "max nodes per wallet must be at least 1"),
            (self.registrations_per_minute < 0,
             "registrations per minute must be 0 (no limit) or more"),
            (not 1 <= self.chain_id < 2**63, "chain id must be positive and below 2**63"),
            (self.blob_sweep_interval <= 0, "the blob sweep interval must be positive"),
        ):  # fmt: skip
            if bad:
                raise UsageError(message)
        for value, least, message in (
            (self.blob_retention, MIN_BLOB_RETENTION, "blob retention must be 0 (keep every "
             "blob) or at least 1 hour"),
            (self.job_retention, MIN_BLOB_RETENTION, "job retention must be 0 (keep every "
             "job) or at least 1 hour"),
            (self.queue_timeout, MIN_QUEUE_TIMEOUT, "the queue timeout must be 0 (wait for "
             "ever) or at least 1 minute"),
            (self.node_retention, MIN_BLOB_RETENTION, "node retention must be 0 (keep every "
             "node) or at least 1 hour"),
        ):  # fmt: skip
            if value != 0 and value < least:
                raise UsageError(message)
        _check_default_database(self.data_dir, self.db_url)

    @property
    def database_url(self) -> str:
        if self.db_url:
            return self.db_url
        # Built, not formatted: in f"sqlite:///{path}" a "?" in the path would end the
        # database's name (the rest read as a query string) and a "%3F" be decoded.
        database = str(self.data_dir / "coordinator.db")
        return URL.create("sqlite", database=database).render_as_string(hide_password=False)

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def offline_after(self) -> float:
        return MISSED_HEARTBEATS_OFFLINE * self.heartbeat_interval


def _check_coordinator_id(coordinator_id: str) -> None:
    """Refuse an id that nodes refuse (messages.coordinator_id_of), in every challenge and
    registration answer: a coordinator with it would start, and no node would ever link.
    A command-line argument that is not UTF-8 reaches Python as lone surrogates."""
    if not coordinator_id.strip():
        raise UsageError("coordinator id must not be empty: leave it out to keep the stored one")
    if len(coordinator_id) > MAX_COORDINATOR_ID:
        raise UsageError(
            f"coordinator id must be at most {MAX_COORDINATOR_ID} characters (nodes refuse a "
            f"longer one), not {len(coordinator_id)}"
        )
    try:
        coordinator_id.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(
            "coordinator id must be valid Unicode (nodes refuse it): it holds bytes that are "
            "not UTF-8"
        ) from None


def _check_default_database(data_dir: Path, db_url: str | None) -> None:
    """Without *db_url*, refuse a data directory whose name is not UTF-8 (bytes that
    Python keeps as surrogate escapes): the default database's SQLAlchemy URL is text,
    and no URL names such a file (rendering one raises UnicodeEncodeError)."""
    if db_url:
        return
    name = str(data_dir)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        try:
            shown = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # a surrogate that no undecodable byte stands for
            shown = ascii(name)
        raise UsageError(
            f"the data directory {shown} is not a UTF-8 name, which the SQLite database's URL "
            "cannot hold; fix: choose another --data-dir (or name the database with --db)"
        ) from None
