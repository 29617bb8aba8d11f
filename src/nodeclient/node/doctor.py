"""``nodeclient doctor``: check that this machine can serve as a node, and say how to fix it.

Each check returns one :class:`Check` (OK, WARN or FAIL, a one-line summary, and for
anything not OK the fix). The checks look at the real machine, the same way the daemon
will: key file modes (2.3.1), the bubblewrap sandbox (2.3.5), GPU and driver visibility
through the NVML child probe (2.3.2) and the device files CUDA needs, each runtime's
binaries and libraries, free disk for the model cache, and the coordinator's reachability
and clock (2.3.3; heartbeats and leases are timestamped, so a skewed clock looks like
replayed or expired messages).

Exit status: 0 when every check is OK, 1 when the worst is WARN, 2 when any check FAILs.
"""

from __future__ import annotations

import enum
import json
import math
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from nodeclient import httpbody, tlstrust
from nodeclient.errors import KeyFileError, KeystoreError, UsageError
from nodeclient.node import keys, sandbox, securefile, wallet
from nodeclient.node.config import CONFIG_FILE, NodeConfig

if TYPE_CHECKING:
    from nodeclient.node.hardware import GpuProbe, HardwareInfo

_GIB: Final = 1 << 30
DISK_WARN_BYTES: Final = 5 * _GIB
DISK_FAIL_BYTES: Final = 1 * _GIB
SKEW_WARN_S: Final = 2.0
SKEW_FAIL_S: Final = 30.0
BWRAP_TEST: Final = ("--ro-bind", "/", "/", "--unshare-all", "true")


class Level(enum.IntEnum):
    """Ordered, so the worst result is ``max``; the value is the exit status."""

    OK = 0
    WARN = 1
    FAIL = 2


@dataclass(frozen=True, slots=True)
class Check:
    """One line of the doctor's report."""

    name: str
    level: Level
    summary: str
    fix: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "check": self.name,
            "level": self.level.name,
            "summary": self.summary,
            "fix": self.fix,
        }


def check_key_files(home: Path) -> Check:
    """2.3.1: every key file exists, is a regular file we own, mode 0600, and holds a key
    of its kind (node.key: a key or a well-formed keystore, its secret unchecked without
    the passphrase); liveness.key is replaced when it does not, the others restored."""
    problems, fixes, seen = [], [], []
    quoted = shlex.quote(str(home))  # the commands below must name it when pasted
    rotate = f"run `nodeclient keys rotate-liveness --home {quoted}` to make a new liveness key"
    for name in keys.KEY_FILES:
        info = securefile.describe_file(home / name)
        liveness = name == keys.LIVENESS_KEY
        if info["ok"] and (malformed := _content_problem(home, name)) is not None:
            problems.append(f"{name}: {malformed}")
            fixes.append(
                rotate
                if liveness
                else f"restore {home / name} from your backup of the node home (a new "
                f"{name} would make another node, or one the coordinator cannot reach)"
            )
            continue
        if info["ok"]:
            seen.append(f"{name} {info['mode']}")
            continue
        text, sep, fix = str(info["problem"]).partition("; fix: ")  # securefile's own fix
        problems.append(f"{name}: {text}")
        path = home / name
        if sep:
            fixes.append(fix)
        elif not info["exists"] and liveness:
            fixes.append(rotate)
        elif not info["exists"] and securefile.initialised(home):
            fixes.append(f"{path}: {securefile.MISSING_IN_HOME_FIX}")
        elif not info["exists"]:
            fixes.append(f"run `nodeclient init --home {quoted} --wallet 0x…` (or restore {path})")
        elif info["kind"] == "regular file" and info["owner_uid"] == os.geteuid():
            fixes.append(f"chmod 600 {shlex.quote(str(path))}")
        else:
            fixes.append(f"replace {path} with a regular file owned by you, mode 0600")
    if problems:
        return Check("keys", Level.FAIL, "; ".join(problems), "; ".join(dict.fromkeys(fixes)))
    return Check("keys", Level.OK, ", ".join(seen))


def _content_problem(home: Path, name: str) -> str | None:
    """Why the key file *name*, a safe file, does not hold a key of its kind, or None."""
    load = {
        keys.LIVENESS_KEY: keys.load_liveness_key,
        keys.PAYLOAD_KEY: keys.load_payload_key,
        keys.NODE_KEY: keys.check_node_key,
    }[name]
    try:
        load(home)
    except (KeyFileError, KeystoreError) as exc:
        return str(exc).partition("; fix: ")[0]
    return None


def check_sandbox(
    *, path: str | None = None, allow_unsandboxed: bool = False, timeout: float = 10.0
) -> Check:
    """2.3.5: bubblewrap is installed and can actually create its namespaces here."""
    bad = Level.WARN if allow_unsandboxed else Level.FAIL
    note = " (allow_unsandboxed = true: tasks run without isolation)" if allow_unsandboxed else ""
    bwrap = shutil.which("bwrap", path=path)
    if bwrap is None:
        return Check(
            "sandbox",
            bad,
            "bubblewrap (bwrap) is not installed" + note,
            "install it: `apt-get install bubblewrap` (Fedora/RHEL: `dnf install bubblewrap`)",
        )
    try:
        proc = subprocess.run(
            [bwrap, *BWRAP_TEST], capture_output=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check("sandbox", bad, f"{bwrap} could not run: {exc}" + note, "reinstall bubblewrap")
    if proc.returncode != 0:
        why = proc.stderr.decode(errors="replace").strip().splitlines()
        return Check(
            "sandbox",
            bad,
            f"bwrap cannot create namespaces: {why[-1] if why else proc.returncode}" + note,
            "allow unprivileged user namespaces: `sysctl -w kernel.unprivileged_userns_clone=1`"
            " and, on Ubuntu 24.04+, `sysctl -w kernel.apparmor_restrict_unprivileged_userns=0`"
            "; in a container, run it with user namespaces allowed",
        )
    from nodeclient.node import seccomp

    refused = seccomp.probe(timeout)
    if refused is not None:
        return Check(
            "sandbox",
            bad,
            f"{sandbox.SECCOMP_REFUSED}: {refused}" + note,
            "run the node on a kernel with seccomp filters (CONFIG_SECCOMP_FILTER), outside "
            "a container profile that forbids seccomp(2)",
        )
    return Check("sandbox", Level.OK, f"bubblewrap works ({bwrap})")


def check_gpus(*, probe: Callable[[], Any] | None = None, dev: Path = Path("/dev")) -> Check:
    """2.3.2: the NVML probe sees the cards the device files say are there, and the
    device files CUDA needs for the cards the node would use are all there (2.3.5)."""
    from nodeclient.node import hardware

    result = (probe or (lambda: hardware.probe_gpus(timeout=hardware.probe_timeout(dev))))()
    device_files = hardware.card_device_files(dev)
    if result.status == "ok":
        return _gpus_answered(result, dev, device_files)
    if result.status == "no-driver" and not device_files:
        return Check("gpu", Level.OK, "no GPU: a CPU-only node (ai.inference runs on CPU)")
    if result.status == "no-driver":
        return Check(
            "gpu",
            Level.FAIL,
            f"{len(device_files)} NVIDIA device file(s) in {dev} but NVML finds no driver: "
            f"{result.detail}",
            "install or repair the NVIDIA driver so that `nvidia-smi` works for this user",
        )
    return Check(
        "gpu",
        Level.FAIL,
        f"the GPU probe failed ({result.status}): {result.detail}",
        result.fix
        or "check `nvidia-smi`; a hung or crashing driver needs a driver reinstall or a reboot",
    )


def _gpus_answered(result: GpuProbe, dev: Path, device_files: Sequence[str]) -> Check:
    """check_gpus where NVML answered: the cards the node uses and their device files."""
    if result.per_device:
        names = ", ".join(f"{g.count}x {g.model}" for g in result.gpus)
        driver = result.per_device[0].driver_version
        chosen = f" ({result.detail})" if result.detail else ""  # CUDA_VISIBLE_DEVICES
        missing = sandbox.gpu_nodes_problem((d.minor for d in result.per_device), dev=dev)
        if missing is not None:
            return Check("gpu", Level.FAIL, f"{names}{chosen}: {missing[0]}", missing[1])
        return Check("gpu", Level.OK, f"{names}, driver {driver}{chosen}")
    if result.detail and device_files:  # CUDA_VISIBLE_DEVICES="" (or -1): none used
        return Check("gpu", Level.OK, f"no GPU used: {result.detail}")
    if device_files:  # NVML answered "ok" with zero cards
        return Check(
            "gpu",
            Level.WARN,
            f"the NVIDIA driver answers but sees no GPU, though {dev} has "
            f"{len(device_files)} device file(s) ({', '.join(device_files)}); "
            "the node declares no GPU",
            "check `nvidia-smi` as this user: a card may be disabled, in a bad state, or its "
            "device file not accessible to this user",
        )
    return Check("gpu", Level.OK, "NVIDIA driver present, no GPU visible: a CPU-only node")


def check_runtimes(usable: Mapping[str, tuple[bool, str]] | None = None) -> list[Check]:
    """Each workload class's runtime: binaries on PATH, libraries importable."""
    if usable is None:
        from nodeclient.node.runtimes import RUNTIMES

        usable = {name: info.usable() for name, info in RUNTIMES.items()}
    checks = []
    for name, (ok, why) in sorted(usable.items()):
        if ok:
            checks.append(Check(f"runtime {name}", Level.OK, "binaries and libraries present"))
        else:
            checks.append(
                Check(
                    f"runtime {name}",
                    Level.WARN,
                    f"not served: {why}",
                    f"install what is missing ({why}), then restart the daemon",
                )
            )
    if usable and not any(ok for ok, _ in usable.values()):
        checks.append(
            Check(
                "runtimes",
                Level.FAIL,
                "no workload class can run on this machine",
                "install at least one runtime; `pip install onnxruntime` serves ai.inference",
            )
        )
    return checks


def check_disk(
    home: Path, *, warn_below: int = DISK_WARN_BYTES, fail_below: int = DISK_FAIL_BYTES
) -> Check:
    """The model cache lives in the home: WARN under 5 GiB free, FAIL under 1 GiB."""
    return _room(
        "disk", home, f"for the model cache in {home}",
        f"free space on the file system of {home}, or move the node home (--home)",
        warn_below=warn_below, fail_below=fail_below,
    )  # fmt: skip


def check_scratch(*, warn_below: int = DISK_WARN_BYTES, fail_below: int = DISK_FAIL_BYTES) -> Check:
    """Task work directories live in $TMPDIR (else /tmp): it must be writable, with room
    for a task's inputs and outputs (WARN under 5 GiB free, FAIL under 1 GiB)."""
    try:
        tmp = sandbox.scratch_root()
    except sandbox.NoScratchSpace as exc:
        return Check("workdir", Level.FAIL, str(exc), sandbox.SCRATCH_FIX)
    return _room(
        "workdir", tmp, f"for task work directories in {tmp}",
        f"free space on the file system of {tmp}, or set TMPDIR to a directory with room",
        warn_below=warn_below, fail_below=fail_below,
    )  # fmt: skip


def _room(
    name: str, where: Path, what: str, fix: str, *, warn_below: int, fail_below: int
) -> Check:
    """Check *name*: the space free on *where*'s file system."""
    free = shutil.disk_usage(where).free
    summary = f"{free / _GIB:.1f} GiB free {what}"
    if free < fail_below:
        return Check(name, Level.FAIL, summary, fix)
    if free < warn_below:
        return Check(name, Level.WARN, summary, fix)
    return Check(name, Level.OK, summary)


def server_time(headers: Mapping[str, str], body: Any) -> float | None:
    """The coordinator's clock: a ``server_time`` field if it sends one, else ``Date``."""
    sent = body.get("server_time") if isinstance(body, dict) else None
    if isinstance(sent, int | float) and not isinstance(sent, bool):
        try:
            value = float(sent)
        except OverflowError:  # an integer past any float: no time at all
            return None
        return value if math.isfinite(value) else None  # NaN would pass every comparison
    date = headers.get("date")
    if not date:
        return None
    try:
        # Date is truncated to the second: its middle is the best estimate (error <= 0.5 s).
        return parsedate_to_datetime(date).timestamp() + 0.5
    except (TypeError, ValueError):
        return None


def check_coordinator(
    url: str | None,
    *,
    chain_id: int | None = None,
    home: Path | None = None,
    timeout: float = 5.0,
    clock: Callable[[], float] = time.time,
) -> list[Check]:
    """Reachability (GET /healthz) and clock skew against the coordinator's clock, after a
    warning for a plain http:// URL to another host (tlstrust.cleartext_warning); with
    *chain_id* and *home* (config.toml's), that /healthz names the same chain id."""
    import httpx

    if not url:
        return [
            Check(
                "coordinator",
                Level.WARN,
                "no coordinator configured",
                'set coordinator = "https://…" in config.toml or pass --coordinator',
            )
        ]
    out = []
    cleartext = tlstrust.cleartext_warning(url)
    if cleartext is not None:
        out.append(Check("tls", Level.WARN, cleartext, "use the coordinator's https:// URL"))
    try:
        verify = tlstrust.client_context()  # the certificates the daemon trusts
    except UsageError as exc:  # a NODECLIENT_CA_FILE that cannot be read
        return [*out, Check("coordinator", Level.FAIL, str(exc), f"fix {tlstrust.CA_FILE_ENV}")]
    health = f"{url.rstrip('/')}/healthz"
    try:
        with httpx.Client(verify=verify, timeout=timeout, headers=httpbody.IDENTITY) as client:
            sent = clock()
            with client.stream("GET", health) as resp:
                content = httpbody.read(resp, limit=1 << 20)  # as sent: a few hundred bytes
    except (httpx.HTTPError, httpx.InvalidURL) as exc:  # InvalidURL is not an HTTPError
        return [
            *out,
            Check(
                "coordinator",
                Level.FAIL,
                f"cannot reach {health}: {type(exc).__name__}: {exc}",
                tlstrust.trust_fix(exc)
                or "check the coordinator URL in config.toml, DNS, and that outbound HTTPS is "
                "allowed",
            ),
        ]
    received = clock()
    try:
        body = json.loads(content)
    except (ValueError, RecursionError):  # not JSON, or nested without end
        body = None
    if resp.status_code != 200:
        moved = tlstrust.redirect_parts(resp, "/healthz")  # http:// to https://, say
        what, fix = moved or (
            "",
            "check the coordinator URL (it must be the coordinator's base URL)",
        )
        return [
            *out,
            Check(
                "coordinator",
                Level.FAIL,
                f"{health} answered HTTP {resp.status_code}" + (f": {what}" if what else ""),
                fix,
            ),
        ]
    out.append(
        Check("coordinator", Level.OK, f"{url} answers in {1000 * (received - sent):.0f} ms")
    )
    if chain_id is not None and home is not None:
        out.extend(_chain_id(chain_id, body, home))
    theirs = server_time(resp.headers, body)
    if theirs is None:
        out.append(
            Check(
                "clock",
                Level.WARN,
                "the coordinator sent no time to compare with",
                "compare by hand: `date -u` here and on the coordinator",
            )
        )
        return out
    # The server read its clock somewhere in the round trip: compare with the middle.
    skew = (sent + received) / 2 - theirs
    summary = (
        f"local clock is {abs(skew):.1f} s {'ahead of' if skew > 0 else 'behind'} the coordinator"
    )
    fix = "enable time synchronisation: `timedatectl set-ntp true` (systemd-timesyncd or chrony)"
    level = (
        Level.FAIL
        if abs(skew) > SKEW_FAIL_S
        else Level.WARN
        if abs(skew) > SKEW_WARN_S
        else Level.OK
    )
    out.append(Check("clock", level, summary, fix if level else ""))
    return out


def _chain_id(ours: int, health: Any, home: Path) -> list[Check]:
    """The coordinator's chain id (in its /healthz answer) against config.toml's: the
    daemon's own words where they differ (link.chain_id_mismatch); nothing where the
    coordinator names none (one from before it did)."""
    from nodeclient.node.link import chain_id_mismatch

    theirs = health.get("chain_id") if isinstance(health, dict) else None
    if isinstance(theirs, bool) or not isinstance(theirs, int):
        return []
    mismatch = chain_id_mismatch(ours, health, home=home)
    if mismatch is not None:
        return [Check("chain_id", Level.FAIL, *mismatch)]
    return [Check("chain_id", Level.OK, f"{ours}, the coordinator's")]


def check_node_settings(home: Path, config: NodeConfig, hw: HardwareInfo) -> list[Check]:
    """What ``nodeclient run`` refuses to start with, found as it finds it (cli_keys) and
    said in its words: more tasks at a time than this machine allows, and a stored wallet
    proof that is not for config.toml's wallet and chain and this node."""
    from nodeclient.node.cli_keys import declared_parallelism, stored_wallet_proof

    config_path = shlex.quote(str(home / CONFIG_FILE))
    bound = hw.max_parallel_subtasks
    try:
        slots = declared_parallelism(config, hw)
        allowed = f"{slots} at a time (this machine allows {bound})"
        checks = [Check("parallelism", Level.OK, allowed)]
    except UsageError as exc:
        checks = [
            Check(
                "parallelism",
                Level.FAIL,
                str(exc),
                f"set max_parallel_subtasks to at most {bound} in {config_path}, or remove it "
                "to run as many as the hardware allows",
            )
        ]
    proof = home / wallet.PROOF_FILE
    if not proof.exists() and not proof.is_symlink():
        checks.append(Check("wallet proof", Level.OK, "none stored: the manifest carries none"))
        return checks
    quoted = shlex.quote(str(home))
    try:
        node_id = keys.node_id_of(home)  # a keystore's address field: no passphrase needed
    except KeystoreError as exc:  # one without it: the key is known only once decrypted
        checks.append(
            Check(
                "wallet proof",
                Level.WARN,
                f"not checked: {str(exc).partition('; fix: ')[0]}",
                f"run `nodeclient manifest --home {quoted}`: it checks the proof with the "
                "passphrase, as `run` does",
            )
        )
        return checks
    except KeyFileError:  # node.key missing or unsafe: the keys check FAILs, with the fix
        return checks
    try:
        stored_wallet_proof(home, config, node_id=node_id)
    except UsageError as exc:
        checks.append(
            Check(
                "wallet proof",
                Level.FAIL,
                str(exc),
                f"make a new one for this wallet and chain with `nodeclient wallet-proof "
                f"--home {quoted}`, or delete {shlex.quote(str(proof))} to register without one",
            )
        )
    else:
        checks.append(
            Check("wallet proof", Level.OK, f"signed by {config.wallet_address} for this node")
        )
    return checks


def run_all(
    home: Path,
    *,
    coordinator: str | None,
    allow_unsandboxed: bool,
    config: NodeConfig | None = None,
) -> list[Check]:
    """Every check, in the order an operator would fix them; with *config* (config.toml),
    also what ``run`` would refuse in it, and the coordinator's chain id against it."""
    sandbox = check_sandbox(allow_unsandboxed=allow_unsandboxed)
    checks = [check_key_files(home), sandbox]
    from nodeclient.node import hardware

    gpus = hardware.probe_gpus(timeout=hardware.probe_timeout())
    checks.append(check_gpus(probe=lambda: gpus))
    from nodeclient.node.runtimes import usable_workload_classes

    # What the daemon would offer: a class that needs the sandbox is not served without it,
    # nor, where the slots get GPUs, one whose install cannot use them.
    usable = usable_workload_classes(
        sandboxed=sandbox.level is Level.OK, gpus=gpus.status == "ok" and bool(gpus.per_device)
    )
    checks.extend(check_runtimes(usable))
    if config is not None:
        from nodeclient.node.cli_keys import probe_local_hardware

        # The hardware as `run` declares it (cards CUDA could not start on left out).
        checks.extend(check_node_settings(home, config, probe_local_hardware(gpus)))
    checks.append(check_disk(home))
    checks.append(check_scratch())
    chain_id = None if config is None else config.chain_id
    reach = check_coordinator(coordinator, chain_id=chain_id, home=home)
    checks.extend(reach)
    if coordinator and any(c.name == "coordinator" and c.level is Level.OK for c in reach):
        checks.append(check_link(coordinator))
    return checks


def check_link(url: str, *, timeout: float = 5.0) -> Check:
    """The link's first step (2.3.3): a WebSocket at /v1/link that sends its challenge.
    /healthz may answer while the link cannot: a reverse proxy that does not pass
    WebSocket upgrades answers every link with 426 or 404."""
    from websockets.exceptions import InvalidStatus, WebSocketException
    from websockets.sync.client import connect

    from nodeclient.node.link import LINK_PROXY_FIX, link_target, proxy_fix

    ws_url, tls = link_target(url)  # the daemon's URL and trust
    try:
        with connect(ws_url, open_timeout=timeout, max_size=1 << 16, **tls) as ws:
            first = ws.recv(timeout=timeout)
    except (OSError, TimeoutError, WebSocketException) as exc:
        fix = tlstrust.trust_fix(exc) or proxy_fix(exc)
        if fix is None and isinstance(exc, InvalidStatus):
            fix = LINK_PROXY_FIX
        return Check(
            "link",
            Level.FAIL,
            f"cannot open the link at {ws_url}: {type(exc).__name__}: {exc}",
            fix or "check that outbound connections to the coordinator are allowed",
        )
    try:
        kind = json.loads(first).get("type")
    except (ValueError, AttributeError, RecursionError):
        kind = None
    if kind != "challenge":
        return Check(
            "link",
            Level.FAIL,
            f"{ws_url} sent no challenge: {str(first)[:80]!r}",
            "check the coordinator URL (it must be a nodeclient coordinator's base URL)",
        )
    return Check("link", Level.OK, f"{ws_url} sends its challenge")


def exit_status(checks: Sequence[Check]) -> int:
    return int(max((c.level for c in checks), default=Level.OK))


def report_lines(checks: Sequence[Check]) -> list[str]:
    """``OK    name         summary`` per check, and ``      fix: …`` under each non-OK one."""
    width = max((len(c.name) for c in checks), default=0)
    out = []
    for c in checks:
        out.append(f"{c.level.name:5} {c.name:{width}}  {c.summary}")
        if c.level is not Level.OK and c.fix:
            out.append(f"{'':5} {'':{width}}  fix: {c.fix}")
    worst = Level(exit_status(checks))
    out.append(f"result: {worst.name} (exit status {int(worst)})")
    return out
