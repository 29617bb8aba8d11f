"""The ``nodeclient`` commands that make, show and bind the node's identity: ``init``,
``keys show``, ``keys rotate-liveness``, ``wallet-proof`` and ``manifest``.

:func:`build_local_manifest` probes this machine and signs the capability manifest
(2.3.2); ``nodeclient run`` registers with the same one. Each command here reads or makes
key material, so the parser marks it ``holds_keys``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nodeclient import __version__
from nodeclient.errors import KeyFileError, UsageError
from nodeclient.node import keys, securefile, wallet
from nodeclient.node.cli_options import home_dir, passphrase_source
from nodeclient.node.config import (
    CONFIG_FILE,
    NodeConfig,
    check_coordinator_url,
    load_config,
    write_config,
)
from nodeclient.protocol.secp import Secp256k1Key
from nodeclient.text import printable, printable_tree

if TYPE_CHECKING:
    from nodeclient.node.hardware import GpuProbe, HardwareInfo

log = logging.getLogger("nodeclient.node")


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
    # Checked as run's --coordinator is, before the home or a key is made.
    coordinator = (
        check_coordinator_url(args.coordinator, name="--coordinator").rstrip("/")
        if args.coordinator
        else None
    )
    # The config validates --wallet and --chain-id: built before the home is made, so that
    # a refused init leaves no home (nor the parents it would have needed) behind.
    config = NodeConfig(
        wallet_address=args.wallet,
        region=args.region,
        chain_id=args.chain_id,
        coordinator=coordinator,
    )
    home = home_dir(args, create=True)
    if securefile.initialised(home):
        raise UsageError(
            f"{home / 'config.toml'} already exists: this home is initialised (`nodeclient "
            f"keys show --home {shlex.quote(str(home))}` checks its keys); "
            f"{securefile.START_OVER} first"
        )
    named = keys.finish_init(home)
    resumed = all(os.path.lexists(home / n) for n in keys.KEY_FILES)
    if resumed:
        # loads, and so checks, all three before anything is written
        info = keys.key_info(home, passphrase=passphrase_source(args))
        if args.encrypt and not info.encrypted:
            raise UsageError(
                f"{home} holds the keys of an unfinished init, with node.key in plaintext: run "
                "init again without --encrypt to finish it, or move the keys away to start over"
            )
    else:  # none of the keys: finish_init refused if only some of them exist
        passphrase = passphrase_source(args, confirm=True)() if args.encrypt else None
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
    if coordinator is None:  # `run` without --coordinator (the systemd unit's) stops at once
        print(
            f'  coordinator       none: set coordinator = "https://..." in {home / CONFIG_FILE}, '
            "or give `nodeclient run` --coordinator URL"
        )
    else:
        print(f"  coordinator       {coordinator}")
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
    info = keys.key_info(home_dir(args), passphrase=passphrase_source(args))
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


def _owner_name(uid: object) -> str | None:
    """The user name of *uid* in the user database, or None (no such entry, no uid)."""
    import pwd

    if not isinstance(uid, int):
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def _owner(uid: object) -> str:
    """``name (uid N)``, or just the uid where it has no name in the user database."""
    if not isinstance(uid, int):
        return "unknown"
    name = _owner_name(uid)
    return f"uid {uid}" if name is None else f"{name} (uid {uid})"


def _key_info_dict(info: keys.KeyInfo) -> dict[str, Any]:
    return {
        "node_id": info.node_id,
        "liveness_address": info.liveness_address,
        "rsa_fingerprint": info.rsa_fingerprint,
        "encrypted": info.encrypted,
        "files": [{**f, "owner_name": _owner_name(f.get("owner_uid"))} for f in info.files],
    }


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    old, new = keys.rotate_liveness(home_dir(args))
    if old is None:
        print(f"new liveness key {new} (liveness.key was missing or malformed)")
    else:
        print(f"liveness key rotated: {old} -> {new}")
    print("re-register (restart `nodeclient run`) so the coordinator learns the new key")
    return 0


def probe_local_hardware(gpu: GpuProbe | None = None) -> HardwareInfo:
    """Probe this machine's CPU and GPUs (*gpu*: the GPU probe's answer, where the caller
    has it already); a GPU probe that failed (a timeout, a driver error, a card the node
    refuses) is logged as ``hardware.gpu_probe_failed``, since the node then declares no
    GPU. No driver at all is a CPU-only machine, not a failure.

    Cards whose device files CUDA needs are missing (``/dev/nvidia-uvm``, say: NVML finds
    the cards without it) count as such a failure: the node serves without its GPUs, its
    CPU work going on, rather than offering cards no worker can use."""
    import dataclasses

    from nodeclient.node import hardware, sandbox

    hw = (
        hardware.probe_hardware()
        if gpu is None
        else hardware.HardwareInfo(cpu=hardware.probe_cpu(), gpu=gpu)
    )
    problem = sandbox.gpu_nodes_problem(device.minor for device in hw.gpu.per_device)
    if problem is not None:
        summary, fix = problem
        hw = dataclasses.replace(
            hw,
            gpu=hardware.GpuProbe(
                gpus=(), per_device=(), status="error",
                detail=f"{summary}: CUDA cannot start in a worker", fix=fix,
            ),
        )  # fmt: skip
    if hw.gpu.status not in ("ok", "no-driver"):
        log.warning(
            "hardware.gpu_probe_failed",
            extra={"status": hw.gpu.status, "detail": hw.gpu.detail, "fix": hw.gpu.fix},
        )
    return hw


def build_local_manifest(
    home: Path,
    config: NodeConfig,
    passphrase: Callable[[], bytes],
    *,
    now: int | None = None,
    node_key: Any = None,
    liveness_key: Any = None,
    sandboxed: bool | None = None,
    hardware: HardwareInfo | None = None,
) -> dict[str, Any]:
    """Probe this machine and build the signed manifest (2.3.2). *sandboxed*: whether the
    daemon runs tasks in bubblewrap (None: probe it here). *hardware*: what
    :func:`probe_local_hardware` found, when the caller probed already (None: probe here)."""
    from nodeclient.node import sandbox
    from nodeclient.node.runtimes import usable_workload_classes
    from nodeclient.protocol import manifest as mf

    hw = probe_local_hardware() if hardware is None else hardware
    cpu, gpu = hw.cpu.to_manifest(), hw.gpu.to_manifest()
    slots = declared_parallelism(config, hw)
    if sandboxed is None:
        sandboxed = sandbox.probe()[0]
    usable = usable_workload_classes(sandboxed=sandboxed, gpus=bool(hw.gpu.per_device))
    classes = [c for c, (ok, _why) in usable.items() if ok]
    # `nodeclient doctor` says the same, with the fix. On a node with GPUs, a class left out
    # is more likely a CPU build installed by mistake (an upgrade reinstalls onnxruntime).
    level = logging.WARNING if hw.gpu.per_device else logging.INFO
    for name, (ok, why) in usable.items():
        if not ok:
            log.log(level, "workload.not_offered", extra={"workload_class": name, "reason": why})
    node_key = node_key or keys.load_node_key(home, passphrase=passphrase)
    proof = stored_wallet_proof(home, config, node_id=node_key.address)
    return mf.build_manifest(
        node_key=node_key,
        liveness_address=(liveness_key or keys.load_liveness_key(home)).address,
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


def declared_parallelism(config: NodeConfig, hw: HardwareInfo) -> int:
    """How many tasks at a time the manifest declares: what the hardware *hw* allows,
    lowered by config.toml's ``max_parallel_subtasks``; one outside 1..that is a
    UsageError naming the range. ``nodeclient doctor`` reports the same error, found the
    same way, so that it is not green where ``run`` refuses to start."""
    from nodeclient.protocol import tier

    return tier.effective_parallelism(hw.max_parallel_subtasks, config.max_parallel_subtasks)


def stored_wallet_proof(home: Path, config: NodeConfig, *, node_id: str) -> dict[str, Any] | None:
    """The wallet proof the manifest carries (None: none stored); one that is not for
    config.toml's wallet and chain and this *node_id* is a UsageError saying what to do,
    which ``nodeclient doctor`` reports as it is."""
    return wallet.load_proof(
        home,
        wallet_address=config.wallet_address,
        node_id=node_id,
        chain_id=config.chain_id,
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
    home = home_dir(args)
    config = load_config(home)
    node_id = keys.node_id_of(home, passphrase=passphrase_source(args))
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
    """Print the manifest ``run`` would register, and warn (on stderr, exit 0: the
    manifest itself is sound) where ``run`` would refuse to start for want of a sandbox."""
    from nodeclient import logs
    from nodeclient.node import sandbox

    # What the probes find (a GPU probe that failed, a class left out) is logged: as text
    # on stderr, with its fields, not bare through Python's last-resort handler.
    logs.configure(fmt="text")
    home = home_dir(args)
    config = load_config(home)
    hw = probe_local_hardware()
    sandboxed, why = sandbox.probe()
    manifest = build_local_manifest(
        home, config, passphrase_source(args), hardware=hw, sandboxed=sandboxed
    )
    if not sandboxed and not config.allow_unsandboxed:
        # `run` exits 2 here (sandbox.choose_mode), as `doctor` reports it: a FAIL.
        print(
            f"nodeclient: warning: `nodeclient run` would refuse to start and serve none of "
            f"these workload classes: {printable(sandbox.REFUSAL)} ({printable(why)})",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps(manifest, indent=2))  # JSON escapes control characters itself
        return 0
    # Names and details come from the driver and the hypervisor (a CPUID brand string is
    # whatever the host sets): shown escaped, so that they cannot drive the terminal.
    shown = printable_tree(manifest)
    gpus = ", ".join(f"{g['count']}x {g['model']} ({g['vram_gb']} GB)" for g in shown["gpu"])
    if hw.gpu.status not in ("ok", "no-driver"):
        gpus = f"none: the GPU probe failed ({hw.gpu.status}): {printable(hw.gpu.detail)}"
    elif hw.gpu.detail:  # CUDA_VISIBLE_DEVICES chose the cards
        gpus = f"{gpus or 'none'} ({printable(hw.gpu.detail)})"
    print(f"node_id               {shown['node_id']}")
    print(f"wallet_address        {shown['wallet_address']}")
    proven = "yes, signed by the wallet" if "wallet_proof" in shown else "no (`wallet-proof`)"
    print(f"wallet_proof          {proven}")
    print(f"liveness_address      {shown['liveness_address']}")
    print(f"region                {shown['region']}")
    print(f"hardware_tier         {shown['hardware_tier']}")
    cpu = shown["cpu"]
    print(f"cpu                   {cpu['model']}, {cpu['cores']} cores, {cpu['ram_gb']} GiB RAM")
    print(f"gpu                   {gpus or 'none'}")
    print(f"workload_classes      {', '.join(shown['workload_classes']) or 'none'}")
    print(f"max_parallel_subtasks {shown['max_parallel_subtasks']}")
    print(f"client_version        {shown['client_version']}")
    print(f"issued_at             {shown['issued_at']}")
    print("signed                RSA-PSS by payload.key, EIP-712 Registration by node.key")
    print("(--json prints the full signed manifest)")
    return 0
