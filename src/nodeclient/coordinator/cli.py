"""``nodeclient-coordinator``: run the reference coordinator, or act as a requester.

::

    nodeclient-coordinator serve [--host 127.0.0.1] [--port N] [--db URL] ...
    nodeclient-coordinator submit --class ai.inference --payload FILE [--wait]
    nodeclient-coordinator jobs [--json]
    nodeclient-coordinator job JOB_ID [--json]
    nodeclient-coordinator result JOB_ID [-o FILE]
    nodeclient-coordinator verify JOB_ID [--payload FILE]
    nodeclient-coordinator token new --file FILE [--label TEXT]

Errors print one line and exit non-zero (``NodeClientError.exit_code``), never a traceback.
This is the only module that reads the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import resource
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from nodeclient import __version__, logs, openfiles, tlstrust
from nodeclient.clock import Clock, OffsetFileClock, SystemClock
from nodeclient.coordinator import audit, tokens
from nodeclient.coordinator.client import CoordinatorClient, NoAnswer, Unreachable
from nodeclient.coordinator.config import (
    DEFAULT_HEARTBEAT_INTERVAL,
    CoordinatorConfig,
    SybilPolicy,
)
from nodeclient.errors import NodeClientError, RemoteProtocolError, UsageError
from nodeclient.protocol import messages
from nodeclient.protocol.eip712 import DEVNET_CHAIN_ID
from nodeclient.text import (
    output_lost,
    parse_args,
    printable,
    printable_tree,
    reader_gone,
    stdout_failed,
    watched_stdout,
)

DEFAULT_COORDINATOR = "http://127.0.0.1:8000"
TOKEN_ENV = "NODECLIENT_COORDINATOR_TOKEN"  # noqa: S105 (the variable's name)
POLL_S = 0.5
# `submit --wait` rides out this many failed polls in a row (a coordinator restarting, a
# slow answer), waiting a little longer after each, before it gives up.
POLL_RETRIES = 5


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"the port must be 0 to 65535, not {port}")
    return port


def _seconds(text: str) -> float:
    """A wait in seconds: finite, 0 or more (nan would never time out; 0: one look)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(
            f"must be a finite number of seconds, 0 or more, not {text}"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nodeclient-coordinator", description="Reference coordinator for nodeclient nodes."
    )
    parser.add_argument("--version", action="version", version=f"nodeclient {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub.add_parser("serve", help="run the coordinator (HTTP API and node link)"))
    _requester_parsers(sub)
    return parser


def _heartbeat_interval(text: str) -> float:
    """An interval nodes accept in the challenge (messages.Challenge): beyond it, every
    node would refuse the link and nothing on this side would say why."""
    value = _seconds(text)
    low, high = messages.HEARTBEAT_INTERVAL_MIN, messages.HEARTBEAT_INTERVAL_MAX
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must be {low} to {high:.0f} seconds, not {text}")
    return value


def _add_serve(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=_port, default=8000, help="0 lets the OS pick")
    serve.add_argument("--db", default=None, help="SQLAlchemy URL (default: sqlite in data-dir)")
    serve.add_argument("--data-dir", type=Path, default=Path("coordinator-data"))
    serve.add_argument("--chain-id", type=int, default=DEVNET_CHAIN_ID)
    serve.add_argument("--coordinator-id", default=None)
    serve.add_argument(
        "--heartbeat-interval", type=_heartbeat_interval, default=DEFAULT_HEARTBEAT_INTERVAL,
        help="seconds between a node's heartbeats (0.05 to 300: what nodes accept)",
    )  # fmt: skip
    serve.add_argument("--max-nodes-per-wallet", type=int, default=8)
    serve.add_argument(
        "--registrations-per-minute",
        type=int,
        default=60,
        help="registrations (POST /v1/nodes) one client address may make a minute; more "
        "are answered 429 with Retry-After (0: no limit; loopback is never limited)",
    )
    serve.add_argument(
        "--require-wallet-proof",
        action="store_true",
        help="refuse nodes whose manifest does not carry the wallet's own signature",
    )
    serve.add_argument(
        "--blob-retention-hours",
        type=float,
        default=7 * 24,
        help="remove a blob no unfinished job references after this long unused (0: never)",
    )
    serve.add_argument(
        "--job-retention-days",
        type=float,
        default=30.0,
        help="delete a finished job, its tasks and results this long after it ended (0: never)",
    )
    serve.add_argument(
        "--node-retention-days",
        type=float,
        default=30.0,
        help="delete a node not seen for this long and holding no lease (0: never); "
        "it registers again if it comes back",
    )
    serve.add_argument(
        "--queue-timeout-hours",
        type=float,
        default=24.0,
        help="fail a job whose tasks no node has taken for this long (0: wait for ever)",
    )
    serve.add_argument("--lease-seconds", type=float, default=300.0)
    serve.add_argument("--max-attempts", type=int, default=3)
    serve.add_argument(
        "--clock-file",
        type=Path,
        default=None,
        help="TEST HOOK: add the float offset in this file to the clock (re-read each second)",
    )
    serve.add_argument(
        "--requester-token-file", type=Path, default=None,
        help="require a bearer token from this file (mode 0600, one a line) for jobs, "
        "results and blob uploads (default: open; re-read when it changes)",
    )  # fmt: skip
    serve.add_argument(
        "--metrics-token-file", type=Path, default=None,
        help="require a bearer token from this file for /metrics (default: open)",
    )  # fmt: skip
    serve.add_argument("--log-format", choices=("json", "text"), default="json")


def _requester_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    token = sub.add_parser("token", help="make bearer tokens for the requester API or /metrics")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    token_new = token_sub.add_parser(
        "new", help="append a fresh token to a token file (created mode 0600) and print it"
    )
    token_new.add_argument("--file", type=Path, required=True, help="the token file")
    token_new.add_argument("--label", default=None, help="a comment saying whose token it is")

    def requester(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.add_argument(
            "--coordinator",
            default=os.environ.get("NODECLIENT_COORDINATOR", DEFAULT_COORDINATOR),
            help="coordinator URL (default: $NODECLIENT_COORDINATOR or %(default)s)",
        )
        p.add_argument(
            "--token-file", type=Path, default=None,
            help="send the first token in this file (mode 0600) as the bearer token "
            "(default: $NODECLIENT_COORDINATOR_TOKEN, if set)",
        )  # fmt: skip
        return p

    submit = requester("submit", "submit a job")
    submit.add_argument("--class", dest="workload_class", required=True)
    submit.add_argument("--payload", type=Path, required=True, help="workload payload file")
    submit.add_argument("--min-tier", type=int, default=0)
    submit.add_argument("--region", default=None)
    submit.add_argument("--slices", type=int, default=1)
    submit.add_argument(
        "--ram-mb", type=int, default=0, help="RAM each task needs in its slot (MB)"
    )
    submit.add_argument(
        "--vram-mb", type=int, default=0, help="GPU memory each task needs in its slot (MB)"
    )
    submit.add_argument(
        "--wait", action="store_true",
        help="wait for the job to end (its status and round shown on stderr as they change)",
    )  # fmt: skip
    submit.add_argument(
        "--timeout", type=_seconds, default=None,
        help="with --wait: give up waiting after S s (exit 124; the job goes on)",
    )  # fmt: skip

    jobs = requester("jobs", "list jobs, oldest first")
    jobs.add_argument("--json", action="store_true")
    jobs.add_argument(
        "--status", choices=("queued", "running", "succeeded", "failed"), default=None,
        help="only the jobs in this state",
    )  # fmt: skip

    job = requester("job", "show one job")
    job.add_argument("job_id")
    job.add_argument("--json", action="store_true")

    cancel = requester(
        "cancel", "end a job that has not ended: it fails, its tasks withdrawn from the nodes"
    )
    cancel.add_argument("job_id")

    verify = requester(
        "verify", "check a job's every task and its result yourself (hashlib, eth-account)"
    )
    verify.add_argument("job_id")
    verify.add_argument(
        "--payload", type=Path, default=None,
        help="the payload you submitted: a render is then assembled again, training replayed",
    )  # fmt: skip
    verify.add_argument(
        "--chain-id", type=int, default=None,
        help="require the signatures' EIP-712 chain id (default: the one the job's first "
        "signed task names, for all its tasks)",
    )  # fmt: skip
    verify.add_argument(
        "--min-tier", type=int, default=None,
        help="the minimum tier you submitted: the coordinator's account must say the same, "
        "and every task's node must have declared it",
    )  # fmt: skip
    verify.add_argument(
        "--slices", type=int, default=None,
        help="the slices you submitted for a training job: the coordinator's account must "
        "say the same (a render job's come from its payload's split)",
    )  # fmt: skip
    verify.add_argument("--json", action="store_true")

    result = requester("result", "fetch a job's result bytes")
    result.add_argument("job_id")
    result.add_argument("-o", "--output", type=Path, default=None)


def _serve(args: argparse.Namespace) -> int:
    from nodeclient.coordinator.app import create_app
    from nodeclient.coordinator.server import listen, run

    logs.configure(fmt=args.log_format)
    config = CoordinatorConfig(
        data_dir=args.data_dir,
        db_url=args.db,
        chain_id=args.chain_id,
        coordinator_id=args.coordinator_id,
        heartbeat_interval=args.heartbeat_interval,
        sybil=SybilPolicy(
            max_nodes_per_wallet=args.max_nodes_per_wallet,
            require_wallet_proof=args.require_wallet_proof,
        ),
        registrations_per_minute=args.registrations_per_minute,
        lease_seconds=args.lease_seconds,
        max_attempts=args.max_attempts,
        blob_retention=args.blob_retention_hours * 3600,
        job_retention=args.job_retention_days * 86400,
        queue_timeout=args.queue_timeout_hours * 3600,
        node_retention=args.node_retention_days * 86400,
        requester_token_file=args.requester_token_file,
        metrics_token_file=args.metrics_token_file,
    )
    if config.requester_token_file is None and not tlstrust.is_loopback(args.host):
        logging.getLogger("nodeclient.coordinator.http").warning(
            "auth.requester_routes_open",
            extra={"host": args.host, "action": "anyone who reaches this address can submit "
                   "jobs and read results: pass --requester-token-file"},
        )  # fmt: skip
    clock: Clock = OffsetFileClock(args.clock_file) if args.clock_file else SystemClock()
    open_files = openfiles.raise_soft_limit(OPEN_FILES)  # before any socket or file
    sock = listen(args.host, args.port)  # claim the port before touching the database
    try:
        app = create_app(config, clock=clock)
    except (SQLAlchemyError, OSError) as exc:  # at start-up: one line, not a trace
        sock.close()
        raise UsageError(f"cannot open the coordinator database: {exc}") from exc
    except ModuleNotFoundError as exc:  # the URL's database driver is not installed
        sock.close()
        raise UsageError(
            f"cannot open the coordinator database: its driver is not installed ({exc}); "
            "for PostgreSQL, install nodeclient[postgres] and use a postgresql+psycopg:// URL"
        ) from exc
    _log_open_files(open_files)  # once it serves: a refusal above stays one line
    return run(app, sock=sock, host=args.host)


# The open files the coordinator asks for (its soft limit, up to the hard one): a socket per
# linked node and per HTTP request, and the database's and blobs' files.
OPEN_FILES = 1 << 20  # Linux's default nr_open, the most a process may have
FEW_OPEN_FILES = 4096  # under this, the log says how many nodes the coordinator can link


def _log_open_files(limit: openfiles.OpenFiles) -> None:
    """Say the open-file limit serve raised at start (openfiles: started from a shell, the
    coordinator would otherwise refuse connections past about a thousand nodes); a hard
    limit too low for a network is a warning, with how to raise it."""
    fields = {"soft": limit.soft, "hard": limit.hard, "error": limit.error or None}
    http_log = logging.getLogger("nodeclient.coordinator.http")
    if limit.soft != resource.RLIM_INFINITY and limit.soft < FEW_OPEN_FILES:
        http_log.warning(
            "coordinator.open_files_low",
            extra={**fields, "action": f"about {max(0, limit.soft - 64)} nodes can link at "
                   "once: raise the hard limit (LimitNOFILE= in its systemd unit, or ulimit "
                   "-Hn as root before starting it)"},
        )  # fmt: skip
    else:
        http_log.info("coordinator.open_files", extra=fields)


@contextlib.contextmanager
def _shape(what: str) -> Iterator[None]:
    """Show an answer whose parts are not what the API documents (a field missing or of
    another type, nesting without end) as one line, not a traceback."""
    try:
        yield
    except (KeyError, TypeError, AttributeError, ValueError, RecursionError) as exc:
        raise RemoteProtocolError(
            f"coordinator: the answer to {what} is not what this client reads "
            f"({type(exc).__name__}: {str(exc)[:100]}): is --coordinator a nodeclient "
            "coordinator of this release?"
        ) from exc


def _print_job(job: dict[str, Any]) -> None:
    job = printable_tree(job)  # reasons came from nodes: never a terminal's commands
    reason = f" ({job['reason']})" if job.get("reason") else ""
    print(f"{job['job_id']}  {job['workload_class']}  {job['status']}{reason}")
    if job.get("resources"):
        needs = ", ".join(f"{key} {value}" for key, value in sorted(job["resources"].items()))
        print(f"  each task needs {needs}")
    rounds = job["workload_class"] == "ai.training"  # a task per slice and round
    for t in job.get("tasks", []):
        node = t.get("node_id") or "-"
        extra = f"  {t['reason']}" if t.get("reason") else ""
        where = f"round {t.get('round') or 0} slice" if rounds else "slice"
        print(
            f"  task {t['task_id']} {where} {t['slice_index']}: {t['status']} on {node}, "
            f"attempts {t['attempts']}{extra}"
        )
        progress = t.get("progress")
        if progress:
            note = f"  {progress['note']}" if progress.get("note") else ""
            print(f"    progress {progress['done']:g} of {progress['total']:g}{note}")
        if t.get("proof"):
            print(f"    proof {t['proof']}\n    signature {t['signature']}")


def _wait(client: CoordinatorClient, job_id: str, timeout: float | None) -> dict[str, Any]:
    """Poll the job until it ends; the ended job, without its tasks.

    Each poll asks for the job without its task list (``?tasks=none``): a training job
    may have 10,000 tasks, each with its typed data, and a poll reads only the status.
    What the caller reports, the status and the reason, is in the job itself."""
    deadline = None if timeout is None else time.monotonic() + timeout
    failures = 0
    status = "not finished"
    shown: tuple[object, object] | None = None
    while True:
        try:
            job = client.job(job_id, tasks=False)
        except (Unreachable, NoAnswer) as exc:  # a poll only reads: safe to ask again
            failures += 1
            if failures > POLL_RETRIES:
                gave_up = f"job {job_id}: gave up after {failures} failed polls in a row"
                raise type(exc)(f"{exc} ({gave_up})") from exc
        else:
            failures = 0
            status = job["status"]
            if status in ("succeeded", "failed"):
                return job
            now = (status, job.get("round"))
            if now != shown:  # on stderr: stdout holds the job id alone
                shown = now
                where = f", round {now[1]}" if job.get("workload_class") == "ai.training" else ""
                print(printable(f"job {job_id}: {status}{where}"), file=sys.stderr, flush=True)
        if deadline is not None and time.monotonic() > deadline:
            raise WaitTimedOut(
                f"job {job_id} still {status} after {timeout} s; it goes on: follow it with "
                f"`nodeclient-coordinator job {job_id}`"
            )
        time.sleep(POLL_S * (1 + failures))


class WaitTimedOut(NodeClientError):
    """`submit --wait --timeout S` ran out before the job ended: exit 124, as timeout(1)."""

    exit_code = 124


def _token(args: argparse.Namespace) -> str | None:
    """The requester's bearer token: --token-file's first, else $NODECLIENT_COORDINATOR_TOKEN."""
    if args.token_file is None:
        found = tokens.parse_tokens(os.environ.get(TOKEN_ENV, ""), Path(f"${TOKEN_ENV}"))
        return found[0] if found else None
    if not args.token_file.exists() and not args.token_file.is_symlink():
        raise UsageError(
            f"--token-file {args.token_file}: no such file; put the token the coordinator's "
            "operator gave you there (mode 0600), or in $NODECLIENT_COORDINATOR_TOKEN"
        )
    found, _ = tokens.read_token_file(args.token_file)
    if not found:
        raise UsageError(f"{args.token_file} holds no token")
    return found[0]


def _new_token(args: argparse.Namespace) -> int:
    fresh = tokens.new_token()
    tokens.append_token(args.file, fresh, label=args.label)
    print(fresh)
    return 0


def _submit(client: CoordinatorClient, args: argparse.Namespace) -> int:
    if args.timeout is not None and not args.wait:
        raise UsageError("submit: --timeout is how long --wait waits: add --wait")
    payload = _read_payload(args.payload)
    job = client.submit_job(
        args.workload_class, payload,
        min_tier=args.min_tier, region=args.region, slices=args.slices,
        ram_mb=args.ram_mb, vram_mb=args.vram_mb,
    )  # fmt: skip
    # The id is the coordinator's: printed with any control characters written out, so
    # that an escape sequence in it never reaches the terminal.
    shown = printable(job["job_id"])
    print(shown, flush=True)
    if not args.wait:
        return 0
    try:
        done = _wait(client, job["job_id"], args.timeout)
    except KeyboardInterrupt:
        print(f"nodeclient-coordinator: interrupted; job {shown} goes on: "
              f"follow it with `nodeclient-coordinator job {shown}`",
              file=sys.stderr)  # fmt: skip
        raise
    if done["status"] != "succeeded":
        said = printable(f"job {done['job_id']} failed: {done.get('reason')}")
        print(said, file=sys.stderr)
        return 1
    return 0


def _requester(args: argparse.Namespace) -> int:
    token = _token(args)
    # Once per command, before the token is sent: anyone on the path could take it.
    cleartext = tlstrust.cleartext_warning(args.coordinator) if token is not None else None
    if cleartext is not None:
        print(f"nodeclient-coordinator: warning: {printable(cleartext)}", file=sys.stderr)
    # Trust: the system's CAs, certifi's and $NODECLIENT_CA_FILE's (tlstrust), as the node's.
    with CoordinatorClient(args.coordinator, token=token) as client:
        if args.command == "submit":
            return _submit(client, args)
        if args.command == "jobs":
            return _jobs(client, args)
        if args.command == "job":
            one = client.job(args.job_id)
            with _shape(f"GET /v1/jobs/{args.job_id}"):
                if args.json:
                    print(json.dumps(one, indent=2))
                else:
                    _print_job(one)
            return 0
        if args.command == "cancel":
            ended = client.cancel_job(args.job_id)
            with _shape(f"POST /v1/jobs/{args.job_id}/cancel"):
                _print_job(ended)
            return 0
        if args.command == "verify":
            return _verify(client, args)
        _save_result(client, args.job_id, args.output)
        return 0


def _jobs(client: CoordinatorClient, args: argparse.Namespace) -> int:
    """List the jobs. Each page is printed as it comes (a long listing shows at once, and
    what came before a page that fails is shown); --json prints one array, at the end."""
    listing = client.iter_jobs(status=args.status)
    with _shape("GET /v1/jobs"):
        if args.json:
            print(json.dumps(list(listing), indent=2))
            return 0
        for job in listing:
            j = printable_tree(job)
            print(f"{j['job_id']}  {j['workload_class']}  {j['status']}", flush=True)
    return 0


def _read_payload(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read payload {path}: {exc.strerror}") from exc


def _verify(client: CoordinatorClient, args: argparse.Namespace) -> int:
    """nodeclient-coordinator verify: 0 when everything verifies, 1 when anything does not,
    3 when all that could be checked verifies, but not everything could be: the job's
    result only by its hash, or its nodes' manifests, which the coordinator does not
    publish."""
    payload = None if args.payload is None else _read_payload(args.payload)
    job = client.job(args.job_id)
    report = audit.audit_job(
        job,
        client.task_result,
        # Read as it comes, checked chunk by chunk: never held whole (audit.StreamedResult).
        audit.StreamedResult(lambda sink: client.read_job_result(args.job_id, sink)),
        fetch_manifest=client.manifest,
        job_id=args.job_id,
        payload=payload,
        chain_id=args.chain_id,
        submitted={"min_tier": args.min_tier, "slices": args.slices},
    )
    code = 0 if report.ok else (1 if report.verdict == "NOT VERIFIED" else 3)
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
        return code
    # Every field came from the coordinator: shown with its control characters written out.

    def say(line: str) -> None:
        print(printable(line))

    say(f"job {report.job_id} ({report.workload_class}, {report.status}): {report.verdict}")
    for t in report.tasks:
        mark = {True: "ok", False: "FAILED", None: "-"}[t.ok]
        node = t.node_id or "-"
        say(f"  {mark:6} task {t.task_id} round {t.round} slice {t.slice_index} on {node}: "
            f"{t.status}; {t.detail}")  # fmt: skip
    mark = {True: "ok", False: "FAILED", None: "hash"}[report.result_ok]
    say(f"  {mark:6} job result: {report.result}")
    return code


def _save_result(client: CoordinatorClient, job_id: str, output: Path | None) -> None:
    """Stream the job's result into a temporary file, check it against the job's
    result_sha256, and only then put it in place: memory stays bounded, and nothing is
    written where it goes unless it is the whole, checked result.

    A regular file (or none yet; through a symlink, its target) in a directory we may
    write is replaced whole by a rename of the temporary file made beside it, keeping
    its mode (a new one gets the umask's). Anything else (stdout, ``/dev/null``, a FIFO,
    ``>(sha256sum)``, a file in a directory we may not write) gets the checked bytes
    copied into it from a temporary file in $TMPDIR.
    """
    if output is None and sys.stdout.isatty():
        raise UsageError(
            "the result is binary and stdout is a terminal: write it with -o FILE, or pipe "
            "it (| sha256sum, > FILE)"
        )
    try:
        target = output.resolve() if output is not None and output.is_symlink() else output
    except (OSError, RuntimeError) as exc:  # a symlink loop: RuntimeError before 3.13
        raise UsageError(f"cannot write the result to {output}: {exc}") from exc
    try:
        st: os.stat_result | None = os.stat(target) if target is not None else None
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise UsageError(f"cannot write the result to {output}: {exc.strerror}") from exc
    atomic = (
        target is not None
        and (st is None or stat.S_ISREG(st.st_mode))
        and os.access(target.parent, os.W_OK | os.X_OK)
    )
    where = output or "stdout"
    try:
        tmp = tempfile.NamedTemporaryFile(  # noqa: SIM115 (renamed or removed below)
            dir=target.parent if atomic and target else None,
            prefix=f".{target.name}." if atomic and target else "nodeclient-result-",
            suffix=".partial", delete=False,
        )  # fmt: skip
    except OSError as exc:
        raise UsageError(f"cannot write the result to {where}: {exc.strerror}") from exc
    try:
        try:
            with tmp:
                client.save_job_result(job_id, tmp.write)
                tmp.flush()
                os.fsync(tmp.fileno())
        except OSError as exc:
            raise UsageError(
                f"cannot write the result to {where}: {exc.strerror}; "
                + (f"{output} was not changed" if output else "nothing was printed")
            ) from exc
        if atomic and target is not None:
            mode = stat.S_IMODE(st.st_mode) if st is not None else 0o666 & ~_umask()
            try:
                os.chmod(tmp.name, mode)
                os.replace(tmp.name, target)
            except OSError as exc:
                raise UsageError(f"cannot write the result to {output}: {exc.strerror}") from exc
            return
        _copy_checked(tmp.name, output)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp.name)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _copy_checked(checked: str, output: Path | None) -> None:
    """Copy the checked result at *checked* to stdout, or into *output* as it is (a
    device, a FIFO, a pipe's /dev/fd, a file whose directory we may not write)."""
    with open(checked, "rb") as source:
        if output is None:
            shutil.copyfileobj(source, sys.stdout.buffer, 1 << 20)
            sys.stdout.buffer.flush()
            return
        opened = False
        try:
            with open(output, "wb") as sink:
                opened = True
                shutil.copyfileobj(source, sink, 1 << 20)
        except OSError as exc:
            # Written in place (its directory is not ours to write): once opened, a regular
            # file's old contents are gone, and what is there now is at most a part of the
            # result. Not opened, it is as it was.
            if not opened:
                then = f"; {output} was not changed"
            elif os.path.isfile(output):
                then = f"; {output} now holds at most part of the result: remove it"
            else:
                then = ""  # a device or a pipe: nothing is kept there
            raise UsageError(f"cannot write the result to {output}: {exc.strerror}{then}") from exc


def _command(args: argparse.Namespace) -> int:
    if args.command == "serve":
        return _serve(args)
    code = _new_token(args) if args.command == "token" else _requester(args)
    sys.stdout.flush()  # a closed pipe fails here, where it is caught, not at exit
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    with watched_stdout():
        try:
            return _command(parse_args(parser, argv))
        except NodeClientError as exc:
            print(f"nodeclient-coordinator: {printable(str(exc))}", file=sys.stderr)
            return exc.exit_code
        except KeyboardInterrupt:
            return 130
        except BrokenPipeError:  # the reader of our output stopped early (| head)
            return reader_gone()
        except (OSError, AttributeError) as exc:  # a full disk behind >, /dev/full, >&-
            if not stdout_failed(exc):
                raise
            return output_lost("nodeclient-coordinator", exc)


if __name__ == "__main__":
    sys.exit(main())
