"""The coordinator's SQL tables (SQLAlchemy 2.x declarative models).

All coordinator state lives here, so that a restart mid-run loses nothing: nodes and
their last heartbeat sequence number, jobs, tasks with their leases, accepted results
with the exact signed message, and recorded equivocations. Only portable column types
are used (strings, integers, floats, text, binary) and JSON is stored as text, so the
same schema runs on SQLite and PostgreSQL.

Times are float Unix seconds from the coordinator's clock; protocol integers that are
signed (issued_at, requested_at) are BigInteger.
"""

from __future__ import annotations

from typing import Final

from sqlalchemy import BigInteger, Float, ForeignKey, Index, Integer, LargeBinary, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

ADDRESS: Final = 42  # 0x + 40 hex digits
UUID_LEN: Final = 36

# Task statuses. A task is leased to at most one node at a time.
QUEUED: Final = "queued"
LEASED: Final = "leased"
SUCCEEDED: Final = "succeeded"
FAILED: Final = "failed"
CANCELLED: Final = "cancelled"
# Job statuses (the API's): queued, running, succeeded, failed.
RUNNING: Final = "running"
JOB_STATUSES: Final = frozenset({QUEUED, RUNNING, SUCCEEDED, FAILED})


class Base(DeclarativeBase):
    pass


class Meta(Base):
    """Small key/value facts about this coordinator (its persisted coordinator_id)."""

    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Node(Base):
    """A registered node: its latest verified manifest plus link and unstake state."""

    __tablename__ = "nodes"
    node_id: Mapped[str] = mapped_column(String(ADDRESS), primary_key=True)
    wallet_address: Mapped[str] = mapped_column(String(ADDRESS), index=True)
    liveness_address: Mapped[str] = mapped_column(String(ADDRESS))
    pubkey_rsa: Mapped[str] = mapped_column(Text)
    hardware_tier: Mapped[int] = mapped_column(Integer)
    region: Mapped[str] = mapped_column(String(32))
    workload_classes: Mapped[str] = mapped_column(Text)  # JSON array
    max_parallel_subtasks: Mapped[int] = mapped_column(Integer)
    manifest: Mapped[str] = mapped_column(Text)  # the manifest JSON as verified
    # Indexed: the hourly sweep of node_manifests asks which manifests are current.
    manifest_hash: Mapped[str] = mapped_column(String(64), index=True)
    issued_at: Mapped[int] = mapped_column(BigInteger)
    registered_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    last_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    state: Mapped[str | None] = mapped_column(String(16), nullable=True)
    last_seen: Mapped[float | None] = mapped_column(Float, nullable=True)
    unstaking_until: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class NodeManifest(Base):
    """Every signed manifest a node registered with, by its hash (the SHA-256 of its
    canonical signed bytes): a task records the hash its node had when it was leased, and
    ``GET /v1/manifests/{hash}`` publishes the manifest, so anyone can check what the node
    claimed when it ran the task. Kept while a node row, a task or a lease names it."""

    __tablename__ = "node_manifests"
    manifest_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    node_id: Mapped[str] = mapped_column(String(ADDRESS), index=True)
    manifest: Mapped[str] = mapped_column(Text)  # the manifest JSON as verified
    registered_at: Mapped[float] = mapped_column(Float)
    # When its node registered another one (None: still current, or its node forgotten).
    replaced_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Job(Base):
    """A requester's job; split into one task per slice (one task for a whole inference)."""

    __tablename__ = "jobs"
    job_id: Mapped[str] = mapped_column(String(UUID_LEN), primary_key=True)
    workload_class: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    min_tier: Mapped[int] = mapped_column(Integer)
    region: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # What each task declares it needs in its slot (the dispatch's resources; 0: nothing).
    ram_mb: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    vram_mb: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    slices: Mapped[int] = mapped_column(Integer)
    meta: Mapped[str] = mapped_column(Text)  # JSON object from the workload's validator
    created_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    result: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True, deferred=True)
    result_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # Round-based classes (ai.training, coordinator/rounds.py): the current round, when its
    # deadline passes, and the outer optimizer's state (weights, momentum); the metrics of
    # closed rounds are rows of train_rounds.
    round_index: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    round_deadline: Mapped[float | None] = mapped_column(Float, nullable=True)
    train_state: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True, deferred=True)
    # Who submitted it: the SHA-256 (hex) of the requester token it came with; None when
    # the requester routes were open (coordinator/tokens.py: who may read it).
    requester: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # GET /v1/jobs pages through jobs in this order (one requester's, or all).
    __table_args__ = (
        Index("ix_jobs_created_at_job_id", "created_at", "job_id"),
        Index("ix_jobs_requester_created_at_job_id", "requester", "created_at", "job_id"),
    )


class JobBlob(Base):
    """A blob of the coordinator's store that a job's tasks reference: the blob store's
    sweep keeps every blob an unfinished job references (coordinator/blobstore.py)."""

    __tablename__ = "job_blobs"
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.job_id"), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)


class WalletProof(Base):
    """A node's proof that its wallet's owner names it (the manifest's ``wallet_proof``):
    the sybil pre-screen counts proven nodes apart (coordinator/registry.py)."""

    __tablename__ = "wallet_proofs"
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.node_id"), primary_key=True)
    wallet_address: Mapped[str] = mapped_column(String(ADDRESS), index=True)
    issued_at: Mapped[int] = mapped_column(BigInteger)
    signature: Mapped[str] = mapped_column(String(132))


class TrainRound(Base):
    """A closed round of a training job and its metrics (coordinator/rounds.py): one row
    a round, so closing a round writes its own metrics, never all of the earlier ones."""

    __tablename__ = "train_rounds"
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.job_id"), primary_key=True)
    round_index: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    metrics: Mapped[str] = mapped_column(Text)  # JSON object, as in the job's final result
    closed_at: Mapped[float] = mapped_column(Float)


class RoundInput(Base):
    """What every task of a job's current round shares, stored once rather than in each
    task's payload: a training round's start weights (coordinator/classes.py's
    ``split_shared``), put into a task's payload when it is sealed to a node. Replaced when
    the round closes, deleted when the job ends."""

    __tablename__ = "round_inputs"
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.job_id"), primary_key=True)
    round_index: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    data: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)


class Task(Base):
    """One unit of dispatch: a whole job, or one slice of it."""

    __tablename__ = "tasks"
    __table_args__ = (Index("ix_tasks_status_queued_at", "status", "queued_at"),)
    task_id: Mapped[str] = mapped_column(String(UUID_LEN), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.job_id"), index=True)
    slice_index: Mapped[int] = mapped_column(Integer)
    slice_count: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    node_id: Mapped[str | None] = mapped_column(String(ADDRESS), nullable=True, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    queued_at: Mapped[float] = mapped_column(Float)
    leased_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    lease_deadline: Mapped[float | None] = mapped_column(Float, nullable=True)
    payload: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    result: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True, deferred=True)
    result_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    result_size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    proof: Mapped[str | None] = mapped_column(String(66), nullable=True)
    signature: Mapped[str | None] = mapped_column(String(132), nullable=True)
    message: Mapped[str | None] = mapped_column(Text, nullable=True)  # Result message JSON
    completed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    round_index: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The node's manifest (node_manifests) when the task was last leased to it; None for a
    # task never leased, or leased by a coordinator before schema version 4.
    manifest_hash: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)


class TaskAttempt(Base):
    """One lease of a task to a node, and how it ended: the task's dispatch history."""

    __tablename__ = "task_attempts"
    # Ids are never used twice, even after the newest rows are deleted (job retention):
    # /metrics counts each lease once by its id (coordinator/metrics.py). PostgreSQL's
    # sequences never reuse one; SQLite needs AUTOINCREMENT for that.
    __table_args__ = ({"sqlite_autoincrement": True},)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.task_id"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    node_id: Mapped[str] = mapped_column(String(ADDRESS))
    leased_at: Mapped[float] = mapped_column(Float)
    deadline: Mapped[float] = mapped_column(Float)
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    outcome: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # The node's manifest when this lease was made (node_manifests): a late result of
    # this lease makes it the task's manifest_hash.
    manifest_hash: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    # The node's own signed answer that ended this lease, kept as evidence of what it
    # said: a Reject, or a Result its class's checks refused (answer_type names which);
    # the message as eip712.message_to_json, the signature as 0x-hex.
    answer_type: Mapped[str | None] = mapped_column(String(16), nullable=True)
    answer_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    answer_signature: Mapped[str | None] = mapped_column(String(132), nullable=True)


class Equivocation(Base):
    """A node signed two different results for one task: kept as evidence."""

    __tablename__ = "equivocations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(String(UUID_LEN), index=True)
    node_id: Mapped[str] = mapped_column(String(ADDRESS), index=True)
    accepted_proof: Mapped[str] = mapped_column(String(66))
    # The accepted Result itself, so the evidence outlives the task's row (job retention
    # deletes it): two messages the node signed, for one task. None in a record written
    # before version 6 whose task was gone by then.
    accepted_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    accepted_signature: Mapped[str | None] = mapped_column(String(132), nullable=True)
    conflicting_proof: Mapped[str] = mapped_column(String(66))
    conflicting_signature: Mapped[str] = mapped_column(String(132))
    conflicting_message: Mapped[str] = mapped_column(Text)
    recorded_at: Mapped[float] = mapped_column(Float)
