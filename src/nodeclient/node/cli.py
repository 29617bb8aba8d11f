"""``nodeclient``: the operator's command line. The only module that reads argv.

Every command takes ``--home``. Errors we raise on purpose print as one line on stderr
with a non-zero exit, never a traceback; anything else is a bug and keeps its traceback.
A command that reads or makes key material is marked ``holds_keys`` in the parser, and
:func:`main` forbids core dumps (``securefile.forbid_core_dumps``) before it starts.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import shlex
import sqlite3
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nodeclient import __version__, httpbody
from nodeclient.errors import KeyFileError, NeedsOperator, NodeClientError, UsageError
from nodeclient.node import keys, securefile, wallet
from nodeclient.node.config import (
    NodeConfig,
    check_coordinator_url,
    check_heartbeat_interval,
    load_config,
    write_config,
)
from nodeclient.protocol.manifest import REGIONS
from nodeclient.protocol.secp import Secp256k1Key
from nodeclient.text import (
    output_lost,
    printable,
    printable_tree,
    reader_gone,
    stdout_failed,
    watched_stdout,
)

if TYPE_CHECKING:
    import httpx

    from nodeclient.node.outbox import Outbox

Handler = Callable[[argparse.Namespace], int]


def _home(args: argparse.Namespace, *, create: bool = False) -> Path:
    home = securefile.resolve_home(args.home, os.environ)
    return securefile.ensure_home(home, create=create)


def _passphrase_source(args: argparse.Namespace, *, confirm: bool = False) -> Callable[[], bytes]:
    """Deferred: the passphrase is read only if node.key turns out to be encrypted."""
    file = Path(args.passphrase_file) if getattr(args, "passphrase_file", None) else None

    def read() -> bytes:
        prompt = _tty_prompt if sys.stdin.isatty() else None
        return keys.read_passphrase(
            passphrase_file=file, env=os.environ, prompt=prompt, confirm=confirm
        )

    return read


def _tty_prompt(text: str) -> str:
    import getpass

    return getpass.getpass(text)


def cmd_init(args: argparse.Namespace) -> int:
    """Create the node's keys, then ``config.toml``; each step is atomic.

    An init cut short between the two (killed, or the disk full) leaves the keys and no
    config.toml; one killed while the key files got their names leaves some of them and
    the others as temporary files. Running the same init again finishes it: it gives the
    missing names from those files (``keys.finish_init``, which refuses, naming what to
    move aside, where they are not all there), keeps the keys and writes only config.toml,
    from the flags given now (the keys hold no wallet or region). It never replaces a key
    or an existing config.toml.
    """
    _refuse_passphrase_without_encrypt(args)
    home = _home(args, create=True)
    config = NodeConfig(wallet_address=args.wallet, region=args.region, chain_id=args.chain_id)
    if (home / "config.toml").exists():
        raise UsageError(f"{home / 'config.toml'} already exists: this home is initialised")
    named = keys.finish_init(home)
    resumed = all(os.path.lexists(home / n) for n in keys.KEY_FILES)
    if resumed:
        info = keys.key_info(home)  # loads, and so checks, all three before anything is written
        if args.encrypt and not info.encrypted:
            raise UsageError(
                f"{home} holds the keys of an unfinished init, with node.key in plaintext: run "
                "init again without --encrypt to finish it, or move the keys away to start over"
            )
    else:  # none of the keys: finish_init refused if only some of them exist
        passphrase = _passphrase_source(args, confirm=True)() if args.encrypt else None
        info = keys.init_keys(home, passphrase=passphrase)
    try:
        write_config(home, config)
    except KeyFileError as exc:
        raise KeyFileError(
            f"{exc}; the keys were kept and no config.toml was written: fix that and run the "
            "same `nodeclient init` again to finish"
        ) from exc
    if resumed:
        named_now = f" (named {' and '.join(named)} from its staging files)" if named else ""
        print(
            f"finished the interrupted init of {home}: kept its keys{named_now}, wrote config.toml"
        )
    else:
        print(f"initialised {home}")
    print(f"  node_id           {info.node_id}")
    print(f"  liveness address  {info.liveness_address}")
    print(f"  payload key       {info.rsa_fingerprint}")
    print(f"  node.key          {'encrypted keystore (scrypt)' if info.encrypted else 'plaintext'}")
    print("next: `nodeclient manifest` shows the signed capability manifest")
    return 0


def _refuse_passphrase_without_encrypt(args: argparse.Namespace) -> None:
    """A passphrase file without --encrypt would be ignored and node.key written in
    plaintext: refused, by flag or by environment (whoever sets the variable means
    node.key to be encrypted; ``NODECLIENT_PASSPHRASE_FILE=`` empty counts as unset)."""
    if args.encrypt:
        return
    if args.passphrase_file:
        raise UsageError(
            "--passphrase-file without --encrypt: init would write node.key in plaintext "
            "and never use the passphrase; add --encrypt to encrypt node.key with it, or "
            "drop --passphrase-file for a plaintext node.key"
        )
    if os.environ.get(keys.PASSPHRASE_FILE_ENV):
        raise UsageError(
            f"{keys.PASSPHRASE_FILE_ENV} is set but --encrypt is not given: init would write "
            "node.key in plaintext and never use the passphrase; add --encrypt to encrypt "
            f"node.key with it, or run init with {keys.PASSPHRASE_FILE_ENV}= (empty) for a "
            "plaintext node.key"
        )


def cmd_keys_show(args: argparse.Namespace) -> int:
    info = keys.key_info(_home(args))
    if args.json:
        print(json.dumps(_key_info_dict(info), indent=2))
        return 0
    print(f"node_id           {info.node_id}")
    print(f"liveness address  {info.liveness_address}")
    print(f"payload key       {info.rsa_fingerprint}")
    print(f"node.key          {'encrypted keystore' if info.encrypted else 'plaintext'}")
    for f in info.files:
        status = "ok" if f.get("ok") else "UNSAFE"
        print(f"  {f['path']}  mode {f.get('mode')}  owner {_owner(f.get('owner_uid'))}  {status}")
    return 0


def _owner(uid: object) -> str:
    """``name (uid N)``, or just the uid where it has no name in the user database."""
    import pwd

    if not isinstance(uid, int):
        return "unknown"
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _key_info_dict(info: keys.KeyInfo) -> dict[str, Any]:
    return {
        "node_id": info.node_id,
        "liveness_address": info.liveness_address,
        "rsa_fingerprint": info.rsa_fingerprint,
        "encrypted": info.encrypted,
        "files": info.files,
    }


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    old, new = keys.rotate_liveness(_home(args))
    if old is None:
        print(f"new liveness key {new} (liveness.key was missing or malformed)")
    else:
        print(f"liveness key rotated: {old} -> {new}")
    print("re-register (restart `nodeclient run`) so the coordinator learns the new key")
    return 0


def build_local_manifest(
    home: Path,
    config: NodeConfig,
    passphrase: Callable[[], bytes],
    *,
    now: int | None = None,
    node_key: Any = None,
) -> dict[str, Any]:
    """Probe this machine and build the signed manifest (2.3.2)."""
    from nodeclient.node import hardware
    from nodeclient.node.runtimes import usable_workload_classes
    from nodeclient.protocol import manifest as mf
    from nodeclient.protocol import tier

    hw = hardware.probe_hardware()
    cpu, gpu = hw.cpu.to_manifest(), hw.gpu.to_manifest()
    slots = tier.effective_parallelism(
        tier.max_parallel_subtasks(cpu, gpu), config.max_parallel_subtasks
    )
    classes = [c for c, (ok, _why) in usable_workload_classes().items() if ok]
    node_key = node_key or keys.load_node_key(home, passphrase=passphrase)
    proof = wallet.load_proof(
        home,
        wallet_address=config.wallet_address,
        node_id=node_key.address,
        chain_id=config.chain_id,
    )
    return mf.build_manifest(
        node_key=node_key,
        liveness_address=keys.load_liveness_key(home).address,
        payload_key=keys.load_payload_key(home),
        wallet_address=config.wallet_address,
        region=config.region,
        cpu=cpu,
        gpu=gpu,
        workload_classes=classes,
        max_parallel_subtasks=slots,
        client_version=__version__,
        issued_at=int(time.time()) if now is None else now,
        chain_id=config.chain_id,
        wallet_proof=proof,
    )


def _wallet_key(path: Path) -> Secp256k1Key:
    """The wallet's own key from --wallet-key (hex, mode 0600); errors name that file."""
    if not path.exists() and not path.is_symlink():
        raise UsageError(f"--wallet-key {path}: no such file (the wallet's key, hex, mode 0600)")
    try:
        text = securefile.read_secret(path).decode("ascii", "replace").strip()
        return Secp256k1Key.from_hex(text)
    except (KeyFileError, ValueError) as exc:
        raise UsageError(f"--wallet-key {path}: {exc}") from exc


def cmd_wallet_proof(args: argparse.Namespace) -> int:
    """Bind this node to the configured wallet: print what the wallet signs, or store its
    signature (node/wallet.py)."""
    home = _home(args)
    config = load_config(home)
    node_id = keys.node_id_of(home)
    if args.signature is not None or args.wallet_key is not None:
        issued_at = int(time.time()) if args.issued_at is None else args.issued_at
        from nodeclient.protocol.manifest import MAX_SKEW_S

        ahead = issued_at - int(time.time())
        if ahead > MAX_SKEW_S:  # a coordinator would refuse every registration with it
            raise UsageError(
                f"--issued-at {issued_at} is {ahead} s in the future: a coordinator refuses a "
                f"wallet proof issued more than {MAX_SKEW_S} s ahead; sign the typed data "
                "`nodeclient wallet-proof` prints now"
            )
        if args.wallet_key is not None:
            wallet_key = _wallet_key(Path(args.wallet_key))
            proof = wallet.sign_proof(
                wallet_key, wallet_address=config.wallet_address, node_id=node_id,
                issued_at=issued_at, chain_id=config.chain_id,
            )  # fmt: skip
        else:
            if args.issued_at is None:
                raise UsageError("--signature needs the --issued-at that was signed")
            proof = wallet.make_proof(
                args.signature, wallet_address=config.wallet_address, node_id=node_id,
                issued_at=issued_at, chain_id=config.chain_id,
            )  # fmt: skip
        path = wallet.save_proof(home, proof)
        print(f"wallet proof stored in {path}: wallet {config.wallet_address} names node {node_id}")
        print("it goes into the manifest from the next start of `nodeclient run`")
        return 0
    issued_at = int(time.time()) if args.issued_at is None else args.issued_at
    typed = wallet.typed_data(
        config.wallet_address, node_id, issued_at=issued_at, chain_id=config.chain_id
    )
    if args.json:
        print(json.dumps(typed, indent=2))
        return 0
    print(f"Sign this with the wallet {config.wallet_address} (eth_signTypedData_v4):\n")
    print(json.dumps(typed, indent=2))
    print("\nthen store the signature it gives you:")
    home_flag = f" --home {shlex.quote(str(home))}" if "home" in args else ""
    print(f"  nodeclient wallet-proof{home_flag} --issued-at {issued_at} --signature 0x…")
    return 0


def cmd_manifest(args: argparse.Namespace) -> int:
    home = _home(args)
    config = load_config(home)
    manifest = build_local_manifest(home, config, _passphrase_source(args))
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    gpus = ", ".join(f"{g['count']}x {g['model']} ({g['vram_gb']} GB)" for g in manifest["gpu"])
    print(f"node_id               {manifest['node_id']}")
    print(f"wallet_address        {manifest['wallet_address']}")
    proven = "yes, signed by the wallet" if "wallet_proof" in manifest else "no (`wallet-proof`)"
    print(f"wallet_proof          {proven}")
    print(f"liveness_address      {manifest['liveness_address']}")
    print(f"region                {manifest['region']}")
    print(f"hardware_tier         {manifest['hardware_tier']}")
    cpu = manifest["cpu"]
    print(f"cpu                   {cpu['model']}, {cpu['cores']} cores, {cpu['ram_gb']} GiB RAM")
    print(f"gpu                   {gpus or 'none'}")
    print(f"workload_classes      {', '.join(manifest['workload_classes']) or 'none'}")
    print(f"max_parallel_subtasks {manifest['max_parallel_subtasks']}")
    print(f"client_version        {manifest['client_version']}")
    print(f"issued_at             {manifest['issued_at']}")
    print("signed                RSA-PSS by payload.key, EIP-712 Registration by node.key")
    print("(--json prints the full signed manifest)")
    return 0


def cmd_proof(args: argparse.Namespace) -> int:
    from nodeclient.protocol.proof import proof_of_stream
    from nodeclient.protocol.secp import parse_address

    try:
        task_id = uuid.UUID(args.task_id)
    except ValueError:
        raise UsageError(f"--task-id {args.task_id!r} is not a UUID") from None
    parse_address(args.node_id, field="--node-id")
    try:
        with open(args.file, "rb") as fh:
            proof, _size = proof_of_stream(task_id=task_id, stream=fh, node_id=args.node_id)
    except OSError as exc:
        raise UsageError(f"cannot read {args.file}: {exc.strerror}") from exc
    print("0x" + proof.hex())
    return 0


def _coordinator_option(
    args: argparse.Namespace, config: NodeConfig, *, daemon_home: Path | None = None
) -> str | None:
    """``--coordinator`` if given (checked here), else config.toml's (checked on load),
    else, with *daemon_home*, the one the running daemon of that home was started with
    (`nodeclient run --coordinator URL`, as the README's tour does)."""
    flag = getattr(args, "coordinator", None)
    if flag:
        return check_coordinator_url(flag, name="--coordinator").rstrip("/")
    if config.coordinator:
        return config.coordinator.rstrip("/")
    return _daemons_coordinator(daemon_home) if daemon_home is not None else None


def _daemons_coordinator(home: Path) -> str | None:
    """The coordinator URL the daemon running for *home* uses, or None (none runs, or it
    answers something else)."""
    from nodeclient.node import control

    try:
        link = control.request(home / control.SOCKET_NAME, {"cmd": "status"}, timeout=2.0).get(
            "link"
        )
        url = link.get("coordinator") if isinstance(link, dict) else None
        if not isinstance(url, str):
            return None
        return check_coordinator_url(url, name="the daemon's coordinator").rstrip("/")
    except (NodeClientError, OSError):
        return None


def _coordinator_url(
    args: argparse.Namespace, config: NodeConfig, *, daemon_home: Path | None = None
) -> str:
    url = _coordinator_option(args, config, daemon_home=daemon_home)
    if not url:
        raise UsageError(
            "no coordinator: pass --coordinator URL or set coordinator in config.toml"
            + (" (and no daemon runs for this home to ask)" if daemon_home else "")
        )
    return url


def _heartbeat_interval(args: argparse.Namespace, config: NodeConfig) -> float:
    """``--heartbeat-interval`` if given (0 included), checked as config.toml's is."""
    if args.heartbeat_interval is None:
        return config.heartbeat_interval
    return check_heartbeat_interval(args.heartbeat_interval, name="--heartbeat-interval")


def cmd_run(args: argparse.Namespace) -> int:
    import asyncio

    from nodeclient import logs
    from nodeclient.clock import make_clock
    from nodeclient.node import sandbox
    from nodeclient.node.daemon import NodeDaemon, Retention
    from nodeclient.node.executor import Executor, WorkerConfig, gpus_from_manifest
    from nodeclient.node.metrics import GpuSampler, NodeMetrics

    logs.configure(fmt=args.log_format)
    home = _home(args)
    config = load_config(home)
    metrics_address = args.metrics_address or config.metrics_address
    url = _coordinator_url(args, config)
    heartbeat_interval = _heartbeat_interval(args, config)
    passphrase = _passphrase_source(args)
    node_key = keys.load_node_key(home, passphrase=passphrase)
    # On every event from here, the outbox's at its opening (orphans removed) included.
    logs.bind_global(node_id=node_key.address)
    manifest = build_local_manifest(home, config, lambda: b"", node_key=node_key)
    slots = int(manifest["max_parallel_subtasks"])
    cores = int(manifest["cpu"]["cores"])
    metrics = NodeMetrics()
    # 2.3.5: no working bubblewrap and no allow_unsandboxed -> UsageError, one line, exit 2
    mode = sandbox.choose_mode(allow_unsandboxed=config.allow_unsandboxed)
    executor = Executor(
        slots=slots,
        mode=mode,
        config=WorkerConfig(
            cache_dir=home / "models",
            threads=max(1, cores // slots),
            gpus=gpus_from_manifest(manifest),
            node_home=home,  # no bind into the sandbox may show the home's key files
        ),
    )
    daemon = NodeDaemon(
        home=home,
        coordinator_url=url,
        chain_id=config.chain_id,
        node_key=node_key,
        liveness_key=keys.load_liveness_key(home),
        payload_key=keys.load_payload_key(home),
        manifest=manifest,
        executor=executor,
        outbox=_open_outbox(home / "outbox.db"),
        clock=make_clock(args.clock_file),
        heartbeat_interval=heartbeat_interval,
        metrics=metrics,
        retention=Retention(
            seconds=config.result_retention_hours * 3600.0,
            bytes=config.result_retention_mb << 20,
            history_seconds=config.history_retention_days * 86400.0,
            max_unacknowledged=config.max_unacknowledged_results,
        ),
    )
    server = metrics.serve(metrics_address) if metrics_address else None  # 2.3.8, opt-in
    if server is not None and manifest["gpu"]:
        metrics.gpu = GpuSampler(interval=5.0).start()  # NVML in a child process only
    try:
        return asyncio.run(daemon.run())
    finally:
        if server is not None:
            server.close()
        if metrics.gpu is not None:
            metrics.gpu.close()


def _open_outbox(path: Path) -> Outbox:
    """Open the outbox; a damaged file or a full disk is one line, not a traceback.

    A damaged outbox exits 78 (NeedsOperator), which the systemd unit does not restart
    on: starting again cannot help, and the operator must keep the file (it holds signed
    results the coordinator has not acknowledged). Anything else exits 1 and is retried.
    """
    from nodeclient.node.outbox import Outbox

    try:
        return Outbox(path)
    except sqlite3.Error as exc:
        code = exc.sqlite_errorcode & 0xFF  # the primary result code
        if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
            aside = shlex.quote(str(path.with_name("outbox.damaged")))
            raise NeedsOperator(
                f"{path} is damaged ({exc}): move it and its companions aside, e.g. "
                f"`mkdir {aside} && mv {shlex.quote(str(path))}* {aside}/`, and never delete "
                "them (they hold signed results not yet acknowledged); `nodeclient run` then "
                "starts a new outbox"
            ) from exc
        full = code == sqlite3.SQLITE_FULL
        raise NodeClientError(_outbox_problem(path, str(exc), full=full)) from exc
    except OSError as exc:
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        raise NodeClientError(_outbox_problem(path, exc.strerror or str(exc), full=full)) from exc


def _outbox_problem(path: Path, reason: str, *, full: bool) -> str:
    if full:
        return (
            f"cannot open {path}: {reason}; the disk is full: free some space on it, "
            "then start the node again (the outbox is kept)"
        )
    return (
        f"cannot open {path}: {reason}; check free disk space and that {path.parent} is "
        "writable by this user, then start the node again"
    )


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    seconds = max(0.0, seconds)  # the wall clock stepped back since
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


def _duration(seconds: float) -> str:
    s = max(0, int(seconds))  # the wall clock stepped back since
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d " if d else "") + f"{h:02d}:{m:02d}:{s:02d}"


def cmd_status(args: argparse.Namespace) -> int:
    from nodeclient.node import control

    home = _home(args)
    if args.watch:
        from nodeclient.node import console
        from nodeclient.node.metrics import GpuSampler

        if args.json:
            raise UsageError("--watch and --json do not combine: --json prints one snapshot")
        if not sys.stdout.isatty():
            raise UsageError(
                "--watch draws on a terminal, and standard output is not one: use "
                "`nodeclient status` or `nodeclient status --json` in scripts and pipes"
            )
        sock = home / control.SOCKET_NAME
        return console.watch(
            lambda: control.request(sock, {"cmd": "status"}, timeout=2.0),
            gpu=GpuSampler().start(),
        )
    st = control.request(home / control.SOCKET_NAME, {"cmd": "status"})
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    if "state" not in st:  # an error answer, e.g. from a daemon of another version
        raise NodeClientError(
            f"the daemon answered: {printable(str(st.get('error', 'no state')))}; "
            "check that it runs the same nodeclient version as this command"
        )
    try:
        # Text from the network must not reach the terminal as commands.
        lines = _status_lines(printable_tree(st))
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError,
            RecursionError) as exc:  # fmt: skip
        raise NodeClientError(
            f"the daemon's answer lacks or mangles a field ({type(exc).__name__}: {exc}); "
            "check that it runs the same nodeclient version as this command"
        ) from None
    print("\n".join(lines))
    return 0


def _status_lines(st: dict[str, Any]) -> list[str]:
    out: list[str] = []
    link = st["link"]
    now = st["time"]
    out.append(f"state        {st['state']} for {_duration(now - st['state_since'])}")
    if st.get("stopping"):
        out.append("stopping     finishing running tasks; new dispatches are handed back")
    rtt = f", rtt {link['rtt_ms']} ms" if link.get("rtt_ms") is not None else ""
    last = link.get("last_heartbeat_ack")
    out.append(
        f"link         {link['status']} to {link['coordinator']}{rtt}, "
        f"last heartbeat ack {_ago(None if last is None else now - last)}"
    )
    out.append(f"node_id      {st['node_id']}")
    out.append(f"sandbox      {st.get('sandbox', 'unknown')}")
    out.append(f"tasks        {len(st['running'])} running of {st['slots']} slots")
    for t in st["running"]:
        p = t.get("progress")
        done = f"  {p['done']:g}/{p['total']:g} {p['note']}" if p else ""
        out.append(f"  {t['task_id']}  {t['workload_class']}  {t['seconds']}s{done}")
    out.append(
        f"totals       {st['completed']} completed, {st['failed']} failed, "
        f"{st['rejected']} rejected, {st['outbox_backlog']} awaiting acknowledgement"
    )
    out.append(f"uptime       {_duration(st['uptime_s'])}")
    if st.get("unstaking_until") is not None:
        out.append(f"unstaking    cooldown ends in {_duration(st['unstake_remaining_s'])}")
    if link.get("last_error") and link["status"] != "up":
        out.append(f"last error   {link['last_error']}")
    return out


def cmd_unstake(args: argparse.Namespace) -> int:
    import httpx

    from nodeclient.protocol import eip712

    home = _home(args)
    config = load_config(home)
    url = _coordinator_url(args, config, daemon_home=home)
    node_key = keys.load_node_key(home, passphrase=_passphrase_source(args))
    message = {"node_id": node_key.address, "requested_at": int(time.time())}
    sig = eip712.sign_typed(node_key, "Unstake", message, chain_id=config.chain_id)
    try:
        with httpx.Client(timeout=30.0, headers=httpbody.IDENTITY) as client:
            resp = httpbody.request(
                client, "POST", f"{url}/v1/nodes/{node_key.address}/unstake",
                json={"message": message, "signature": "0x" + sig.hex()},
                limit=1 << 20,  # as sent: a short JSON object
            )  # fmt: skip
    except httpbody.AnswerRefused as exc:
        raise UsageError(
            f"unstake: {url} {exc}; the request may have been accepted: run `nodeclient "
            "status` to see the cooldown"
        ) from exc
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.UnsupportedProtocol,
            httpx.InvalidURL) as exc:  # fmt: skip
        raise UsageError(f"cannot reach the coordinator at {url}: {exc}") from exc
    except httpx.HTTPError as exc:  # sent, but no whole answer came back
        what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise UsageError(
            f"unstake: no answer from the coordinator at {url} ({what}); the request may "
            "have been accepted: run `nodeclient status` to see the cooldown before sending "
            "it again"
        ) from exc
    ends = _unstake_answer(resp, url)
    print(f"unstaking: no new dispatches; the 7-day cooldown ends at {ends}")
    print(
        "work in flight finishes and is delivered; `nodeclient status` shows the countdown "
        "once the daemon's next heartbeat is answered (within one heartbeat interval)"
    )
    return 0


def _unstake_answer(resp: httpx.Response, url: str) -> str:
    """When the cooldown ends, from the coordinator's answer; anything else is one line.

    A proxy in front of the coordinator may answer with an HTML page, and a wrong URL
    with anything at all: neither is shown (it can be pages long), only what it was.
    """
    status = resp.status_code
    try:
        body = resp.json() if resp.content else {}
    except (ValueError, RecursionError):  # not JSON, not text, or nested without end
        body = None
    if not isinstance(body, dict):
        kind = resp.headers.get("content-type", "no content type").split(";")[0]
        what = "a JSON value that is not an object" if body is not None else f"non-JSON ({kind})"
        raise UsageError(
            f"unstake failed: {url} answered HTTP {status} with {what}, not the "
            "coordinator's JSON; check the --coordinator URL (or config.toml) and any proxy "
            "in front of it, then try again"
        )
    if status != 200:
        error = " ".join(str(body.get("error", "no reason given")).split())[:300]
        raise UsageError(f"unstake refused ({status}): {error}")
    until = body.get("unstaking_until")
    ends = None
    if isinstance(until, int | float) and not isinstance(until, bool):
        with contextlib.suppress(ValueError, OverflowError, OSError):  # nan, out of range
            ends = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(until))
    if ends is None:
        raise UsageError(
            f"the coordinator at {url} answered HTTP {status} without a valid "
            f"unstaking_until ({until!r:.40}); the request may have been accepted: run "
            "`nodeclient status` to see the cooldown, and check the coordinator's version"
        )
    return ends


def cmd_devnet(args: argparse.Namespace) -> int:
    from nodeclient.devnet import run_devnet

    if not 1 <= args.nodes <= 16:
        raise UsageError("--nodes must be between 1 and 16")
    if not 1 <= args.jobs <= 64:  # checked before anything starts
        raise UsageError("--jobs must be between 1 and 64")
    heartbeat = check_heartbeat_interval(args.heartbeat_interval, name="--heartbeat-interval")
    return run_devnet(
        nodes=args.nodes,
        serve=args.serve,
        jobs=args.jobs,
        heartbeat=heartbeat,
        keep=args.keep,
        out=lambda line: print(line, flush=True),
    )


def cmd_history(args: argparse.Namespace) -> int:
    from nodeclient.node import console

    home = _home(args)
    since = console.parse_since(args.since, now=time.time()) if args.since else None
    damaged: list[str] = []
    rows = console.read_history(home, since=since, damaged=damaged)
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print("no tasks recorded" + (f" since {args.since}" if args.since else ""))
    else:
        print("\n".join(console.history_lines(rows)))
    if damaged:  # shown, but the history is incomplete: say so, and exit 1
        print(
            f"nodeclient: warning: {len(damaged)} damaged row(s) in outbox.db left out, "
            f"first {printable(damaged[0])}; copy outbox.db aside before anything else",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from nodeclient.node import doctor

    home = _home(args)
    config = load_config(home)
    checks = doctor.run_all(
        home,
        coordinator=_coordinator_option(args, config, daemon_home=home),
        allow_unsandboxed=config.allow_unsandboxed,
    )
    if args.json:
        print(json.dumps([c.to_json() for c in checks], indent=2))
    else:
        print("\n".join(doctor.report_lines(checks)))
    return doctor.exit_status(checks)


def cmd_service_install(args: argparse.Namespace) -> int:
    from nodeclient.node import service

    exe = Path(args.executable) if args.executable else service.find_executable()
    # Only the --home flag, not $NODECLIENT_HOME: that names this shell's home, while the
    # unit's must be a state directory under /var/lib.
    home = Path(args.home) if args.home else service.DEFAULT_HOME
    code = service.code_paths_for(exe, ours=args.executable is None)
    opts = service.UnitOptions(executable=exe, user=args.user, home=home, code_paths=code)
    blocked = service.unreachable(opts.user, (exe, *code))
    if blocked is not None:
        raise UsageError(
            f"the unit could not start: {blocked} (its interpreter or code), and systemd "
            "would fail with status 203/EXEC; install nodeclient where every user can read "
            "it, e.g. with the system's Python: /usr/bin/python3 -m venv /opt/nodeclient && "
            "/opt/nodeclient/bin/pip install <nodeclient checkout>, then pass --executable "
            "/opt/nodeclient/bin/nodeclient"
        )
    path = service.write_unit(Path(args.output), service.render_unit(opts))
    print("\n".join(service.next_steps(path, opts)))
    return 0


def build_parser() -> argparse.ArgumentParser:  # noqa: PLR0915 (one block per command)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--home",
        default=argparse.SUPPRESS,
        help="node home directory (default: $NODECLIENT_HOME, else ~/.nodeclient)",
    )
    passphrase = argparse.ArgumentParser(add_help=False)
    passphrase.add_argument(
        "--passphrase-file",
        metavar="F",
        help="file holding the node.key passphrase "
        "(default: $NODECLIENT_PASSPHRASE_FILE, else a prompt)",
    )

    parser = argparse.ArgumentParser(
        prog="nodeclient",
        description="Node client: sell this machine's GPU/CPU time to a compute network.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"nodeclient {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "init",
        parents=[common, passphrase],
        help="create the node's keys and config",
        description="Create the node's keys, then config.toml. If an earlier init was cut "
        "short (killed, disk full) after the keys or while they were named, running it "
        "again keeps those keys, finishes naming them from its staging files, and writes "
        "only config.toml, from the flags given now. Nothing is ever overwritten. A "
        "passphrase file, by --passphrase-file or $NODECLIENT_PASSPHRASE_FILE, is refused "
        "without --encrypt (it would be ignored and node.key written in plaintext): add "
        "--encrypt, or for a plaintext node.key drop the flag and run with "
        "NODECLIENT_PASSPHRASE_FILE= (empty).",
    )
    p.add_argument("--wallet", required=True, metavar="0x…", help="wallet address for earnings")
    p.add_argument(
        "--region", default="local", choices=REGIONS, metavar="R", help="region (see docs)"
    )
    p.add_argument(
        "--chain-id", type=int, default=31337, help="EIP-712 chain id (default: devnet 31337)"
    )
    p.add_argument(
        "--encrypt",
        action="store_true",
        help="store node.key as a scrypt keystore (required with a passphrase file)",
    )
    p.set_defaults(handler=cmd_init, holds_keys=True)

    k = sub.add_parser("keys", parents=[common], help="show or rotate keys")
    ksub = k.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    ks = ksub.add_parser("show", parents=[common], help="node_id, liveness address, key files")
    ks.add_argument("--json", action="store_true")
    ks.set_defaults(handler=cmd_keys_show, holds_keys=True)
    kr = ksub.add_parser(
        "rotate-liveness",
        parents=[common],
        help="replace the liveness key",
        description="Replace liveness.key with a new key, or make one where it is missing or "
        "malformed (it holds nothing to keep: the next registration binds the new one). An "
        "unsafe file (mode, owner, symlink, not a regular file) is refused, unchanged.",
    )
    kr.set_defaults(handler=cmd_keys_rotate, holds_keys=True)

    m = sub.add_parser("manifest", parents=[common, passphrase], help="print the signed manifest")
    m.add_argument("--json", action="store_true", help="the full signed manifest as JSON")
    m.set_defaults(handler=cmd_manifest, holds_keys=True)

    r = sub.add_parser("run", parents=[common, passphrase], help="run the node daemon")
    r.add_argument("--coordinator", metavar="URL", help="coordinator base URL (default: config)")
    r.add_argument(
        "--heartbeat-interval", type=float, help="seconds between heartbeats (default 30)"
    )
    r.add_argument("--log-format", choices=["json", "text"], default="json")
    r.add_argument(
        "--metrics-address", metavar="HOST:PORT", help="serve Prometheus metrics (default: off)"
    )
    r.add_argument("--clock-file", help=argparse.SUPPRESS)  # testing aid: see nodeclient.clock
    r.set_defaults(handler=cmd_run, holds_keys=True)

    st = sub.add_parser("status", parents=[common], help="state of the running daemon")
    st.add_argument("--json", action="store_true", help="one machine-readable snapshot")
    st.add_argument("--watch", action="store_true", help="live console; q or Ctrl-C quits")
    st.set_defaults(handler=cmd_status)

    hi = sub.add_parser("history", parents=[common], help="every task this node has run")
    hi.add_argument("--json", action="store_true", help="machine-readable, one object per task")
    hi.add_argument("--since", metavar="WHEN", help="ISO date/time or a duration: 24h, 7d")
    hi.set_defaults(handler=cmd_history)

    dr = sub.add_parser("doctor", parents=[common], help="check this machine; exit 0/1/2")
    dr.add_argument("--coordinator", metavar="URL", help="coordinator base URL (default: config)")
    dr.add_argument("--json", action="store_true")
    dr.set_defaults(handler=cmd_doctor, holds_keys=True)

    sv = sub.add_parser("service", help="run the daemon under systemd")
    svsub = sv.add_subparsers(dest="service_command", required=True, metavar="ACTION")
    si = svsub.add_parser("install", help="write a hardened systemd unit")
    si.add_argument(
        "--home", default=None, metavar="DIR",
        help="the unit's node home, directly under /var/lib (default /var/lib/nodeclient; "
        "$NODECLIENT_HOME is not used)",
    )  # fmt: skip
    si.add_argument("--user", default="nodeclient", help="system user (default nodeclient)")
    si.add_argument("--output", default="/etc/systemd/system/nodeclient.service", metavar="PATH")
    si.add_argument("--executable", metavar="PATH", help="nodeclient binary (default: PATH)")
    si.set_defaults(handler=cmd_service_install)

    u = sub.add_parser("unstake", parents=[common, passphrase], help="start the 7-day cooldown")
    u.add_argument("--coordinator", metavar="URL", help="coordinator base URL (default: config)")
    u.set_defaults(handler=cmd_unstake, holds_keys=True)

    dv = sub.add_parser("devnet", help="run a whole network on this machine (its own homes)")
    dv.add_argument("--nodes", type=int, default=2, help="number of node daemons (default 2)")
    dv.add_argument("--jobs", type=int, default=4, help="demo inference jobs to submit")
    dv.add_argument("--serve", action="store_true", help="keep running until interrupted")
    dv.add_argument("--keep", action="store_true", help="keep the devnet's files afterwards")
    dv.add_argument("--heartbeat-interval", type=float, default=2.0, help="seconds (default 2)")
    dv.set_defaults(handler=cmd_devnet)

    wp = sub.add_parser(
        "wallet-proof",
        parents=[common],
        help="prove that the configured wallet owns this node",
        description="Without options: print the EIP-712 WalletBinding (eth_signTypedData_v4 "
        "JSON) for the configured wallet to sign in any wallet app. With --signature and "
        "--issued-at: check that signature and store it (wallet_proof.json, mode 0600); "
        "every manifest carries it from then on. --wallet-key signs here with the wallet's "
        "own key file (devnets, automation: a real wallet's key does not belong on a node).",
    )
    wp.add_argument("--signature", metavar="0x…", help="the wallet's signature to store")
    wp.add_argument("--issued-at", type=int, metavar="T", help="the issued_at that was signed")
    wp.add_argument("--wallet-key", metavar="FILE", help="sign with this key file (hex, 0600)")
    wp.add_argument("--json", action="store_true", help="print only the typed data")
    wp.set_defaults(handler=cmd_wallet_proof, holds_keys=True)

    # --home is accepted (and unused) as on every other command, for scripts that pass it.
    pr = sub.add_parser("proof", parents=[common], help="compute a proof of execution for a file")
    pr.add_argument("--task-id", required=True, metavar="UUID")
    pr.add_argument("--node-id", required=True, metavar="0x…")
    pr.add_argument("file", metavar="FILE")
    pr.set_defaults(handler=cmd_proof)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "home"):
        args.home = None
    handler: Handler = args.handler
    if getattr(args, "holds_keys", False):  # before any key is read, decrypted or made
        securefile.forbid_core_dumps()
    with watched_stdout():
        try:
            code = handler(args)
            sys.stdout.flush()  # a closed pipe fails here, where it is caught, not at exit
        except NodeClientError as exc:
            print(f"nodeclient: error: {printable(str(exc))}", file=sys.stderr)
            return exc.exit_code
        except KeyboardInterrupt:
            print("nodeclient: interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:  # the reader of our output stopped early (| head)
            return reader_gone()
        except (OSError, AttributeError) as exc:  # a full disk behind >, /dev/full, >&-
            if not stdout_failed(exc):
                raise
            return output_lost("nodeclient", exc)
    return code


if __name__ == "__main__":
    sys.exit(main())
