"""The operator's configuration file, ``config.toml`` in the node home.

One frozen object per program (house style); only ``cli.py`` turns flags into it. The
file is TOML because operators edit it by hand; unknown keys are refused rather than
ignored, so a typo never silently changes behaviour.
"""

from __future__ import annotations

import errno
import os
import shlex
import stat
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Final

from nodeclient.errors import SignatureError, UsageError
from nodeclient.node import securefile
from nodeclient.protocol.eip712 import DEVNET_CHAIN_ID
from nodeclient.protocol.manifest import REGIONS
from nodeclient.protocol.messages import HEARTBEAT_INTERVAL_MAX, HEARTBEAT_INTERVAL_MIN
from nodeclient.protocol.secp import parse_address, to_checksum_address

CONFIG_FILE: Final = "config.toml"
MAX_CONFIG_BYTES: Final = 64 * 1024
# What a node accepts in a challenge, so what it may ask for itself.
HEARTBEAT_MIN_S: Final = HEARTBEAT_INTERVAL_MIN
HEARTBEAT_MAX_S: Final = HEARTBEAT_INTERVAL_MAX

# The TOML type each key must have, checked before any value is used: a hand-edited
# `coordinator = 5` is a one-line UsageError, never an AttributeError. bool is refused
# wherever a number is expected (in Python it is an int, in TOML it is not). Every field
# of NodeConfig needs an entry here.
_NUMBER: Final = (int, float)
_EXPECTED: Final[dict[str, tuple[tuple[type, ...], str]]] = {
    "wallet_address": ((str,), 'a quoted string, e.g. "0x…"'),
    "region": ((str,), 'a quoted string, e.g. "eu-west"'),
    "chain_id": ((int,), "an integer"),
    "coordinator": ((str,), 'a quoted string, e.g. "https://…"'),
    "max_parallel_subtasks": ((int,), "an integer"),
    "heartbeat_interval": (_NUMBER, "a number (seconds)"),
    "allow_unsandboxed": ((bool,), "true or false"),
    "metrics_address": ((str,), 'a quoted string, e.g. "127.0.0.1:9101"'),
    "result_retention_hours": (_NUMBER, "a number (hours)"),
    "result_retention_mb": ((int,), "an integer"),
    "history_retention_days": (_NUMBER, "a number (days)"),
    "history_max_rows": ((int,), "an integer"),
    "max_unacknowledged_results": ((int,), "an integer"),
    "abandon_results_after_days": (_NUMBER, "a number (days)"),
}
_OPTIONAL: Final = frozenset({"coordinator", "max_parallel_subtasks", "metrics_address"})


# Periods: (key, the most it may be, what 0 means, said in its error)
_PERIODS: Final = (
    ("result_retention_hours", 24 * 365, ""),
    ("history_retention_days", 36500, " (keep for ever)"),
    ("abandon_results_after_days", 36500, " (keep for ever)"),
)

# Counts: (key, the least it may be, the most (None: no bound), what its error says it must be)
_COUNTS: Final = (
    ("result_retention_mb", 0, None, "a whole number >= 0"),
    ("history_max_rows", 0, None, "a whole number >= 0 (0: no cap)"),
    ("max_unacknowledged_results", 1, 1_000_000, "between 1 and 1000000"),
)


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Everything the operator configures; defaults are safe for a first run."""

    wallet_address: str
    region: str = "local"
    chain_id: int = DEVNET_CHAIN_ID
    coordinator: str | None = None
    max_parallel_subtasks: int | None = None  # may lower the computed bound, never raise it
    heartbeat_interval: float = 30.0  # 2.3.3: every 30 s
    allow_unsandboxed: bool = False
    metrics_address: str | None = None  # HOST:PORT for Prometheus (2.3.8); off by default
    result_retention_hours: float = 72.0  # acknowledged results' bytes, then history only
    result_retention_mb: int = 4096  # and at most this much of them, oldest dropped first
    history_retention_days: float = 180.0  # then their history rows too (0: kept for ever)
    # and at most this many rows (about 1 KB each), oldest acknowledged first (0: no cap)
    history_max_rows: int = 2_000_000
    max_unacknowledged_results: int = 256  # past this many, new work is refused
    # unacknowledged results of a coordinator other than the linked one: then closed
    abandon_results_after_days: float = 30.0  # (0: kept for ever)

    def __post_init__(self) -> None:
        _check_types(self)
        try:
            wallet = to_checksum_address(parse_address(self.wallet_address, field="wallet"))
        except SignatureError as exc:
            raise UsageError(f"wallet_address: {exc}") from exc
        object.__setattr__(self, "wallet_address", wallet)
        if self.region not in REGIONS:
            raise UsageError(f"region {self.region!r} is not one of: {', '.join(REGIONS)}")
        if (
            isinstance(self.chain_id, bool)
            or not isinstance(self.chain_id, int)
            or not 1 <= self.chain_id < 2**63
        ):
            raise UsageError("chain_id must be a positive integer below 2**63")
        if self.max_parallel_subtasks is not None and (
            isinstance(self.max_parallel_subtasks, bool)
            or not isinstance(self.max_parallel_subtasks, int)
            or self.max_parallel_subtasks < 1
        ):
            raise UsageError("max_parallel_subtasks must be a positive integer")
        check_heartbeat_interval(self.heartbeat_interval)
        if self.coordinator is not None:
            check_coordinator_url(self.coordinator)
        if not isinstance(self.allow_unsandboxed, bool):
            raise UsageError("allow_unsandboxed must be true or false")
        for name, low, high, said in _COUNTS:
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or not low <= value <= (high if high is not None else value)
            ):
                raise UsageError(f"{name} must be {said}")
        for name, high, zero in _PERIODS:
            if not _number_within(getattr(self, name), 0, high):
                raise UsageError(f"{name} must be between 0{zero} and {high}")
        results_days = self.result_retention_hours / 24
        if 0 < self.history_retention_days < results_days:  # a row outlives its result bytes
            object.__setattr__(self, "history_retention_days", results_days)
        if self.metrics_address is not None:
            from nodeclient.node.metrics import parse_metrics_address

            parse_metrics_address(str(self.metrics_address))

    def to_toml(self) -> str:
        """The file as init writes it, with a comment per key."""
        lines = [
            "# nodeclient configuration (see docs/operator.md)",
            f'wallet_address = "{self.wallet_address}"  # where earnings go',
            f'region = "{self.region}"',
            f"chain_id = {self.chain_id}  # EIP-712 domain; must match the coordinator",
            f"heartbeat_interval = {self.heartbeat_interval}  # seconds (spec 2.3.3: 30)",
            f"allow_unsandboxed = {'true' if self.allow_unsandboxed else 'false'}",
        ]
        lines.append(
            f'coordinator = "{self.coordinator}"'
            if self.coordinator
            else '# coordinator = "https://coordinator.example.net"'
        )
        lines.append(
            f"max_parallel_subtasks = {self.max_parallel_subtasks}"
            if self.max_parallel_subtasks
            else "# max_parallel_subtasks = 1  # may lower the hardware bound, never raise it"
        )
        lines.append(
            f"result_retention_hours = {self.result_retention_hours}  # acknowledged results"
        )
        lines.append(f"result_retention_mb = {self.result_retention_mb}  # at most, oldest first")
        lines.append(
            f"history_retention_days = {self.history_retention_days}  # then the rows (0: never)"
        )
        lines.append(
            f"abandon_results_after_days = {self.abandon_results_after_days}"
            "  # results another coordinator never acknowledged (0: kept)"
        )
        lines.append(
            f'metrics_address = "{self.metrics_address}"'
            if self.metrics_address
            else '# metrics_address = "127.0.0.1:9101"  # Prometheus metrics, off by default'
        )
        return "\n".join(lines) + "\n"


def _number_within(value: object, low: float, high: float) -> bool:
    """A TOML number (not a bool, not nan) from *low* to *high*."""
    return isinstance(value, int | float) and not isinstance(value, bool) and low <= value <= high


def check_heartbeat_interval(value: object, *, name: str = "heartbeat_interval") -> float:
    """A heartbeat interval in seconds, 0.05..300 (2.3.3 asks for 30); nan is refused.

    The one check for both ``config.toml`` and ``nodeclient run --heartbeat-interval``.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not HEARTBEAT_MIN_S <= value <= HEARTBEAT_MAX_S  # False for nan
    ):
        raise UsageError(
            f"{name} must be between {HEARTBEAT_MIN_S:g} and {HEARTBEAT_MAX_S:g} seconds, "
            f"not {value!r}"
        )
    return float(value)


def check_coordinator_url(url: str, *, name: str = "coordinator") -> str:
    """A coordinator base URL: ``http://`` or ``https://`` with a host; returned unchanged.

    Only those two schemes: the daemon derives the link's ``ws://`` / ``wss://`` URL from
    it. Parsed here, once, so that a malformed URL (``http://[::1``) is one line, never a
    traceback from httpx where it is first used.
    """
    import httpx

    shown = url if len(url) <= 60 else url[:57] + "..."
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise UsageError(f"{name} {shown!r} is not a valid URL: {exc}") from None
    if parsed.scheme not in ("http", "https") or not url.lower().startswith(
        ("http://", "https://")
    ):
        raise UsageError(f"{name} {shown!r} must be an http:// or https:// URL")
    if not parsed.host:
        raise UsageError(f"{name} {shown!r} has no host name")
    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        raise UsageError(f"{name} {shown!r} has port {parsed.port}, not 1..65535")
    # The daemon appends its paths (/v1/nodes, /v1/link) to the URL as text: a query or a
    # fragment would swallow them, and a user:password would show in status and logs.
    if parsed.query or parsed.fragment or "?" in url or "#" in url:
        raise UsageError(f"{name} {shown!r} must have no query (?) or fragment (#)")
    if parsed.userinfo:
        raise UsageError(
            f"{name} {shown!r} must not carry a user name or password: the node "
            "authenticates with its keys"
        )
    if any(ch in url for ch in '"\\') or any(ord(ch) < 0x21 or ord(ch) == 0x7F for ch in url):
        raise UsageError(f"{name} {shown!r} holds a quote, backslash, space or control character")
    return url


def _toml_type(value: object) -> str:
    """What the operator wrote, in TOML's words."""
    for kind, name in (
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a float"),
        (str, "a string"),
        (list, "an array"),
        (dict, "a table"),
    ):
        if isinstance(value, kind):
            return name
    return "a date/time" if hasattr(value, "isoformat") else type(value).__name__


def _check_types(config: NodeConfig) -> None:
    for f in fields(config):
        value = getattr(config, f.name)
        if value is None and f.name in _OPTIONAL:
            continue
        types, expected = _EXPECTED[f.name]
        if isinstance(value, types) and (bool in types or not isinstance(value, bool)):
            continue
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise UsageError(f"{f.name} must be {expected}, not {_toml_type(value)} ({shown})")


def _config_problem(path: Path, st: os.stat_result) -> str | None:
    """Why config.toml with this stat must not be used, or None."""
    if not stat.S_ISREG(st.st_mode):
        return f"refusing {path}: it is not a regular file"
    if st.st_uid != os.geteuid():
        return (
            f"refusing {path}: owned by uid {st.st_uid}, not by uid {os.geteuid()} that runs "
            f"nodeclient; fix: chown {os.geteuid()} {shlex.quote(str(path))}"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        return (
            f"refusing {path}: mode {mode:04o} lets others change the wallet that is paid "
            f"and the coordinator; fix: chmod 600 {shlex.quote(str(path))} (and check what it "
            "says)"
        )
    return None


def load_config(home: Path) -> NodeConfig:
    """Read and validate ``config.toml``; errors name the file and say what to fix."""
    path = home / CONFIG_FILE
    # It names the wallet that is paid, the coordinator, and whether work may run
    # unsandboxed: only its owner may change it. O_NOFOLLOW and O_NONBLOCK: a symlink is
    # refused, a FIFO put in its place does not hang the open.
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise UsageError(
            f"{path} not found: run `nodeclient init --home {shlex.quote(str(home))} "
            "--wallet 0x...` first"
        ) from None
    except OSError as exc:
        what = "it is a symlink; replace it with the file" if exc.errno == errno.ELOOP else (
            exc.strerror)  # fmt: skip
        raise UsageError(f"cannot read {path}: {what}") from exc
    try:
        problem = _config_problem(path, os.fstat(fd))
        if problem is not None:
            raise UsageError(problem)
        raw = os.read(fd, MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    if len(raw) > MAX_CONFIG_BYTES:
        raise UsageError(f"{path} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        data: dict[str, Any] = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is not valid TOML: {exc}") from exc
    known = {f.name for f in fields(NodeConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UsageError(f"{path}: unknown setting(s) {', '.join(unknown)}")
    if "wallet_address" not in data:
        raise UsageError(f"{path}: wallet_address is missing")
    try:
        return NodeConfig(**data)
    except UsageError as exc:
        raise UsageError(f"{path}: {exc}") from exc


def write_config(home: Path, config: NodeConfig) -> Path:
    """Write ``config.toml`` atomically: all of it or nothing, mode 0600, never overwriting.

    The text goes to a temporary file beside it, is ``fsync``-ed and only then linked to
    its real name (:func:`securefile.write_secrets`), so a full disk or a kill never
    leaves a partial file. Refuses (KeyFileError, one line) if the name is taken.
    """
    path = home / CONFIG_FILE
    securefile.write_secrets({path: config.to_toml().encode("utf-8")})
    return path
