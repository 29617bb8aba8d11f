"""``nodeclient``: the operator's command line. The only module that reads argv.

Every command takes ``--home``. Errors we raise on purpose print as one line on stderr
with a non-zero exit, never a traceback; anything else is a bug and keeps its traceback.
A command that reads or makes key material is marked ``holds_keys`` in the parser, and
:func:`main` forbids core dumps (``securefile.forbid_core_dumps``) before it starts.

This module builds the parser and runs a command; the larger commands' handlers live
beside it: cli_keys (init, keys, wallet-proof, manifest), cli_run (run), cli_status
(status, history), and the options they share in cli_options.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from nodeclient import __version__, httpbody, tlstrust
from nodeclient.errors import NodeClientError, UsageError
from nodeclient.node import keys, securefile
from nodeclient.node.cli_keys import (
    cmd_init,
    cmd_keys_rotate,
    cmd_keys_show,
    cmd_manifest,
    cmd_wallet_proof,
)
from nodeclient.node.cli_options import (
    coordinator_option,
    home_dir,
    passphrase_source,
    resolve_coordinator_url,
)
from nodeclient.node.cli_run import cmd_run
from nodeclient.node.cli_status import RETIRED, cmd_history, cmd_status
from nodeclient.node.config import check_heartbeat_interval, load_config
from nodeclient.protocol.manifest import REGIONS
from nodeclient.text import (
    output_lost,
    parse_args,
    printable,
    reader_gone,
    stdout_failed,
    watched_stdout,
)

if TYPE_CHECKING:
    import httpx


Handler = Callable[[argparse.Namespace], int]


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


def cmd_unstake(args: argparse.Namespace) -> int:
    import httpx

    from nodeclient.clock import make_clock
    from nodeclient.protocol import eip712

    clock = make_clock(args.clock_file)  # the daemon's and the coordinator's, in tests
    home = home_dir(args)
    config = load_config(home)
    url = resolve_coordinator_url(args, config, daemon_home=home)
    node_key = keys.load_node_key(home, passphrase=passphrase_source(args))
    message = {"node_id": node_key.address, "requested_at": int(clock.now())}
    sig = eip712.sign_typed(node_key, "Unstake", message, chain_id=config.chain_id)
    if (cleartext := tlstrust.cleartext_warning(url)) is not None:
        print(f"nodeclient: warning: {printable(cleartext)}", file=sys.stderr)
    verify = tlstrust.client_context()  # the daemon's trust store
    try:
        with httpx.Client(timeout=30.0, headers=httpbody.IDENTITY, verify=verify) as client:
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
        raise UsageError(
            tlstrust.with_trust_fix(f"cannot reach the coordinator at {url}: {exc}", exc)
        ) from exc
    except httpx.HTTPError as exc:  # sent, but no whole answer came back
        what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise UsageError(
            f"unstake: no answer from the coordinator at {url} ({what}); the request may "
            "have been accepted: run `nodeclient status` to see the cooldown before sending "
            "it again"
        ) from exc
    ends, until = _unstake_answer(resp, url, f"/v1/nodes/{node_key.address}/unstake")
    if until <= clock.now():  # unstaked before: the cooldown it started is over
        print(f"this node's cooldown ended at {ends}: {RETIRED}")
        return 0
    print(f"unstaking: no new dispatches; the 7-day cooldown ends at {ends}")
    print(
        "work in flight finishes and is delivered; `nodeclient status` shows the countdown "
        "once the daemon's next heartbeat is answered (within one heartbeat interval)"
    )
    return 0


def _unstake_answer(resp: httpx.Response, url: str, api_path: str) -> tuple[str, float]:
    """When the cooldown ends (as text, and the time), from the coordinator's answer to
    *api_path*; anything else is one line.

    A proxy in front of the coordinator may answer with an HTML page, and a wrong URL
    with anything at all: neither is shown (it can be pages long), only what it was. A
    redirect (http:// to https://, say) is named with the URL to use.
    """
    moved = tlstrust.redirect_message(resp, api_path)
    if moved is not None:
        raise UsageError(f"unstake failed: {moved}")
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
    ends, at = None, 0.0
    if isinstance(until, int | float) and not isinstance(until, bool):
        at = float(until)
        with contextlib.suppress(ValueError, OverflowError, OSError):  # nan, out of range
            ends = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(until))
    if ends is None:
        raise UsageError(
            f"the coordinator at {url} answered HTTP {status} without a valid "
            f"unstaking_until ({until!r:.40}); the request may have been accepted: run "
            "`nodeclient status` to see the cooldown, and check the coordinator's version"
        )
    return ends, at


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


def cmd_doctor(args: argparse.Namespace) -> int:
    from nodeclient import logs
    from nodeclient.node import doctor

    # The hardware probe logs what it finds (a GPU probe that failed), as `manifest` does:
    # as text on stderr, apart from the report on stdout.
    logs.configure(fmt="text")
    try:
        home = home_dir(args)
        config = load_config(home)
    except NodeClientError as exc:  # no node to check: doctor's FAIL, whatever the error
        print(f"nodeclient: error: {printable(str(exc))}", file=sys.stderr)
        return int(doctor.Level.FAIL)
    checks = doctor.run_all(
        home,
        coordinator=coordinator_option(args, config, daemon_home=home),
        allow_unsandboxed=config.allow_unsandboxed,
        config=config,
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
    if args.home == "":  # `--home "$DIR"` with DIR unset: as every other command refuses it
        raise UsageError("--home is empty: give the unit's home directory, or leave --home out")
    home = Path(args.home) if args.home else service.DEFAULT_HOME
    code = service.code_paths_for(exe, ours=args.executable is None)
    opts = service.UnitOptions(executable=exe, user=args.user, home=home, code_paths=code)
    if not (exe.is_file() and os.access(exe, os.X_OK)):
        raise UsageError(
            f"--executable {exe} is not an executable file: systemd would fail with status "
            "203/EXEC; name the nodeclient that `command -v nodeclient` shows"
        )
    blocked = service.under_private_tmp((exe, *code)) or service.unreachable(
        opts.user, (exe, *code)
    )
    if blocked is not None:
        raise UsageError(
            f"the unit could not start: {blocked} (its interpreter or code), and systemd "
            "would fail with status 203/EXEC; install nodeclient where every user can read "
            "it, e.g. with the system's Python: /usr/bin/python3 -m venv /opt/nodeclient && "
            "/opt/nodeclient/bin/pip install <nodeclient checkout>, then pass --executable "
            "/opt/nodeclient/bin/nodeclient"
        )
    path = service.write_unit(Path(args.output), service.render_unit(opts))
    found = service.read_home_config(opts.home)
    # Written all the same: the unit is harmless until enabled, and the step says what to do.
    warning = service.coordinator_warning(found, path)
    if warning is not None:
        print(f"nodeclient: warning: {printable(warning)}", file=sys.stderr)
    print("\n".join(service.next_steps(path, opts, found)))
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
        "--coordinator",
        metavar="URL",
        help="coordinator base URL, written to config.toml (needed by a daemon started "
        "without --coordinator, as the systemd unit starts it)",
    )
    p.add_argument(
        "--encrypt",
        action="store_true",
        help="store node.key as a scrypt keystore (required with a passphrase file)",
    )
    p.set_defaults(handler=cmd_init, holds_keys=True)

    k = sub.add_parser("keys", parents=[common], help="show or rotate keys")
    ksub = k.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    ks = ksub.add_parser(
        "show",
        parents=[common, passphrase],
        help="node_id, liveness address, key files (the passphrase is asked only for a "
        "keystore without an address field)",
    )
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
    si.add_argument(  # SUPPRESS: a --home before "service" is kept, not reset to None
        "--home", default=argparse.SUPPRESS, metavar="DIR",
        help="the unit's node home, directly under /var/lib (default /var/lib/nodeclient; "
        "$NODECLIENT_HOME is not used)",
    )  # fmt: skip
    si.add_argument("--user", default="nodeclient", help="system user (default nodeclient)")
    si.add_argument("--output", default="/etc/systemd/system/nodeclient.service", metavar="PATH")
    si.add_argument("--executable", metavar="PATH", help="nodeclient binary (default: PATH)")
    si.set_defaults(handler=cmd_service_install)

    u = sub.add_parser("unstake", parents=[common, passphrase], help="start the 7-day cooldown")
    u.add_argument("--coordinator", metavar="URL", help="coordinator base URL (default: config)")
    u.add_argument("--clock-file", help=argparse.SUPPRESS)  # testing aid, as for run
    u.set_defaults(handler=cmd_unstake, holds_keys=True)

    dv = sub.add_parser(
        "devnet",
        help="run a whole network on this machine (its own homes)",
        description="Start a coordinator on loopback and --nodes node daemons, each with "
        "its own home, keys and share of the CPUs, as real processes; submit demo jobs "
        "(--jobs digits-classifier inference jobs; a Blender render in 2 slices, over 2 "
        "nodes when there are 2 or more, where Blender and bubblewrap work; a DiLoCo "
        "training job, where PyTorch is installed); check every result as a stranger "
        "would; print each node's state transitions; stop them all and exit. Its files "
        "(node keys, database, logs) go in a new nodeclient-devnet-* directory in $TMPDIR "
        "(else /tmp), which needs 256 MB free, and are removed at the end unless --keep is "
        "given or something failed (the directory is then named). Exit status: 0 every "
        "result verified, 1 an error, 2 a usage error, 130 Ctrl-C, 143 SIGTERM, 129 "
        "SIGHUP, 141 its output's reader went away; --serve stopped by a signal exits 0.",
    )
    dv.add_argument(
        "--nodes", type=int, default=2, metavar="N", help="node daemons, 1 to 16 (default 2)"
    )
    dv.add_argument(
        "--jobs", type=int, default=4, metavar="N",
        help="inference jobs to submit, 1 to 64 (default 4); the render and training jobs "
        "come on top",
    )  # fmt: skip
    dv.add_argument(
        "--serve", action="store_true",
        help="after the demo jobs, keep the network up until Ctrl-C, SIGTERM or SIGHUP",
    )  # fmt: skip
    dv.add_argument(
        "--keep", action="store_true", help="keep the devnet's directory afterwards, and name it"
    )
    dv.add_argument(
        "--heartbeat-interval", type=float, default=2.0, metavar="S",
        help="seconds between the nodes' heartbeats, 0.05 to 300 (default 2)",
    )  # fmt: skip
    dv.set_defaults(handler=cmd_devnet)

    wp = sub.add_parser(
        "wallet-proof",
        parents=[common, passphrase],
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
    with watched_stdout():
        try:
            args = parse_args(parser, argv)
            if not hasattr(args, "home"):
                args.home = None
            handler: Handler = args.handler
            if getattr(args, "holds_keys", False):  # before any key is read, decrypted or made
                securefile.forbid_core_dumps()
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
