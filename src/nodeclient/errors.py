"""The one exception tree of the project.

Third-party errors (cryptography, coincurve, eth-account, SQLAlchemy, websockets) are
translated into these once, where they enter, with ``raise ... from exc``::

    NodeClientError                 base of everything we raise on purpose
    ├── UsageError                  bad command-line input or configuration
    ├── KeyFileError                a key file or the node home is unsafe or malformed
    ├── KeystoreError               a v3 keystore is malformed, hostile, or the passphrase wrong
    ├── ProtocolError               a message breaks the protocol
    │   ├── LocalProtocolError      we were about to break it (a bug on our side)
    │   └── RemoteProtocolError     the peer broke it (malformed, oversized, out of order)
    ├── SignatureError              a signature is malformed or recovers to the wrong signer
    ├── ManifestError               a manifest fails verification (the message names the check)
    │   └── ManifestClockError      ... only because its issued_at and the verifier's clock disagree
    ├── EnvelopeError               an envelope cannot be opened (one message for every cause)
    ├── StateError                  an illegal node state transition
    ├── HardwareProbeError          the hardware probe could not run at all
    └── NeedsOperator               stopped until the operator acts (exit 78, not restarted)

The CLI prints ``str(exc)`` of any of these as one line and exits non-zero; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import sqlite3


class NodeClientError(Exception):
    """Base class of every error nodeclient raises on purpose."""

    exit_code: int = 1


class UsageError(NodeClientError):
    """Bad command-line input or configuration."""

    exit_code = 2


class KeyFileError(NodeClientError):
    """A key file or the node home is unsafe, missing or malformed."""


class KeystoreError(NodeClientError):
    """A Web3 Secret Storage v3 keystore is malformed, hostile, or the passphrase is wrong."""


class ProtocolError(NodeClientError):
    """A message breaks the protocol."""


class LocalProtocolError(ProtocolError):
    """We were about to break the protocol: a bug on our side."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol: malformed, oversized, replayed or out-of-order input."""


class SignatureError(NodeClientError):
    """A signature is malformed or does not recover to the expected signer."""


class ManifestError(NodeClientError):
    """A capability manifest fails verification; the message names the failed check."""


class ManifestClockError(ManifestError):
    """A manifest (or its wallet proof) was issued too far in the future or the past for
    the verifier's clock: one of the two clocks is off, which clears by itself once they
    agree, unlike every other failed check."""


class EnvelopeError(NodeClientError):
    """A payload envelope cannot be opened.

    Deliberately one type and one message for every cause (wrong key, padding, tag,
    truncation, wrong task or node, expiry) so that callers cannot become an oracle.
    """


class StateError(NodeClientError):
    """An illegal node state transition."""


class HardwareProbeError(NodeClientError):
    """The hardware probe could not run at all."""


class NeedsOperator(NodeClientError):
    """Stopped for a reason that starting again cannot fix: the operator has to act first.

    Exit status 78 (``EX_CONFIG`` in sysexits.h), the one status the systemd unit does not
    restart on (``RestartPreventExitStatus=78``). Every other failure is restarted, since
    its cause may pass (a slow boot, a mount not there yet, a full disk freed).
    """

    exit_code = 78


# PostgreSQL's SQLSTATE for "could not extend file: No space left on device".
_PG_DISK_FULL = "53100"


def is_disk_full(exc: BaseException) -> bool:
    """Whether *exc* says a write found no space: ENOSPC or EDQUOT, SQLite's SQLITE_FULL,
    PostgreSQL's disk_full, or a SQLAlchemy error wrapping one of them. Such a write left
    nothing on disk, unlike an I/O error (a failed fsync), after which it may be there."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_FULL
    if getattr(exc, "sqlstate", None) == _PG_DISK_FULL:  # psycopg
        return True
    orig = getattr(exc, "orig", None)  # sqlalchemy.exc.DBAPIError: the driver's error
    return isinstance(orig, BaseException) and orig is not exc and is_disk_full(orig)
