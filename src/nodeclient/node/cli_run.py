"""``nodeclient run``: start the node daemon (2.3.3) with its executor, sandbox (2.3.5),
outbox and, opt-in, the Prometheus metrics endpoint (2.3.8).

Everything that can be checked before the daemon starts is: the coordinator URL, the
heartbeat interval, the sandbox, the GPU device files and the outbox, each failure one
line on stderr. A damaged outbox exits 78, which the systemd unit does not restart on.
With JSON logs, whatever stops the daemon (at its start or later: a refused registration)
is also a ``daemon.fatal`` event, so that what reads the log alone learns why.

The slots get the cards the GPU probe kept (``GpuProbe.per_device``: NVML's order, or the
daemon's ``CUDA_VISIBLE_DEVICES``), the very cards the manifest declares.
"""

from __future__ import annotations

import argparse
import errno
import logging
import shlex
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

from nodeclient import tlstrust
from nodeclient.errors import NeedsOperator, NodeClientError
from nodeclient.node import keys
from nodeclient.node.cli_keys import build_local_manifest, probe_local_hardware
from nodeclient.node.cli_options import (
    checked_heartbeat_interval,
    home_dir,
    passphrase_source,
    resolve_coordinator_url,
)
from nodeclient.node.config import load_config

if TYPE_CHECKING:
    from nodeclient.node.outbox import Outbox


log = logging.getLogger("nodeclient.node")


def cmd_run(args: argparse.Namespace) -> int:
    from nodeclient import logs

    logs.configure(fmt=args.log_format)
    try:
        return _run(args)
    except NodeClientError as exc:
        # The plain line (cli.main) is for a terminal; a JSON log's reader, the journal
        # under the systemd unit, gets the event, with node_id once it is bound.
        if args.log_format == "json":
            log.error("daemon.fatal", extra={"error": str(exc), "exit_status": exc.exit_code})
        raise


def _run(args: argparse.Namespace) -> int:
    import asyncio

    from nodeclient import logs
    from nodeclient.clock import make_clock
    from nodeclient.node import sandbox
    from nodeclient.node.daemon import NodeDaemon
    from nodeclient.node.exec_config import default_runtimes
    from nodeclient.node.executor import Executor, WorkerConfig, gpus_from_probe
    from nodeclient.node.metrics import GpuSampler, NodeMetrics
    from nodeclient.node.outbox import Retention

    home = home_dir(args)
    config = load_config(home)
    metrics_address = args.metrics_address or config.metrics_address
    url = resolve_coordinator_url(args, config)
    tlstrust.client_context()  # a NODECLIENT_CA_FILE that cannot be read: one line, now
    passphrase = passphrase_source(args)
    node_key = keys.load_node_key(home, passphrase=passphrase)
    # On every event from here, the outbox's at its opening (orphans removed) included,
    # and the warning below: before anything is sent, and before the checks that follow.
    logs.bind_global(node_id=node_key.address)
    if (cleartext := tlstrust.cleartext_warning(url)) is not None:
        log.warning("link.cleartext", extra={"coordinator": url, "hint": cleartext})
    heartbeat_interval = checked_heartbeat_interval(args, config)
    # 2.3.5: no working bubblewrap and no allow_unsandboxed -> UsageError, one line, exit 2
    mode = sandbox.choose_mode(allow_unsandboxed=config.allow_unsandboxed)
    # Loaded once: the manifest's liveness address and the key the link signs with are
    # then one key, even if `keys rotate-liveness` runs while this starts.
    liveness_key = keys.load_liveness_key(home)
    hw = probe_local_hardware()  # cards whose device files are missing: none declared
    gpus = gpus_from_probe(hw.gpu.per_device)
    manifest = build_local_manifest(
        home,
        config,
        lambda: b"",
        node_key=node_key,
        liveness_key=liveness_key,
        sandboxed=mode == sandbox.MODE_BWRAP,
        hardware=hw,
    )
    slots = int(manifest["max_parallel_subtasks"])
    cores = int(manifest["cpu"]["cores"])
    metrics = NodeMetrics()
    executor = Executor(
        slots=slots,
        mode=mode,
        config=WorkerConfig(
            cache_dir=home / "models",
            threads=max(1, cores // slots),
            gpus=gpus,
            node_home=home,  # no bind into the sandbox may show the home's key files
            # The classes the manifest offers: a worker builds (and self-checks) no other,
            # such as ai.inference on a GPU node whose onnxruntime is a CPU build.
            runtimes={
                name: spec
                for name, spec in default_runtimes().items()
                if name in manifest["workload_classes"]
            },
        ),
    )
    daemon = NodeDaemon(
        home=home,
        coordinator_url=url,
        chain_id=config.chain_id,
        node_key=node_key,
        liveness_key=liveness_key,
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
            history_max_rows=config.history_max_rows,
            max_unacknowledged=config.max_unacknowledged_results,
            abandon_seconds=config.abandon_results_after_days * 86400.0,
        ),
    )
    server = metrics.serve(metrics_address) if metrics_address else None  # 2.3.8, opt-in
    if server is not None and manifest["gpu"]:
        metrics.gpu = GpuSampler(interval=5.0, gpus_declared=True).start()  # NVML in a child
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
