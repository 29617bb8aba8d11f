"""``nodeclient status`` and ``nodeclient history``: what the running daemon is doing,
asked over its control socket, and every task the node has run, read from its outbox.

``status --watch`` hands over to the live console (2.3.8, node/console.py); the plain
text forms are built here. Text that came from the network or the outbox passes through
``printable`` before it reaches the terminal.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping
from typing import Any, Final

from nodeclient.errors import NodeClientError, UsageError
from nodeclient.node.cli_options import home_dir
from nodeclient.text import printable, printable_tree


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

    home = home_dir(args)
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
        # An error answer is printed as it came, and is no status: a script sees it fail.
        return 0 if "state" in st else 1
    if "state" not in st:  # an error answer, e.g. from a daemon of another version
        raise NodeClientError(
            f"the daemon answered: {printable(str(st.get('error', 'no state')))}; "
            "check that it runs the same nodeclient version as this command"
        )
    try:
        # Text from the network must not reach the terminal as commands.
        lines = status_lines(printable_tree(st))
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError,
            RecursionError) as exc:  # fmt: skip
        raise NodeClientError(
            f"the daemon's answer lacks or mangles a field ({type(exc).__name__}: {exc}); "
            "check that it runs the same nodeclient version as this command"
        ) from None
    print("\n".join(lines))
    return 0


def status_lines(st: dict[str, Any]) -> list[str]:
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
    if (line := workers_line(st)) is not None:
        out.append(f"workers      {line}")
    for t in st["running"]:
        p = t.get("progress")
        done = f"  {p['done']:g}/{p['total']:g} {p['note']}" if p else ""
        out.append(f"  {t['task_id']}  {t['workload_class']}  {t['seconds']}s{done}")
    out.append(
        f"totals       {st['completed']} completed, {st['failed']} failed, "
        f"{st['rejected']} rejected, {st.get('timed_out', 0)} timed out, "
        f"{st['outbox_backlog']} awaiting acknowledgement"
    )
    out.append(f"uptime       {_duration(st['uptime_s'])}")
    if st.get("unstaking_until") is not None:
        out.append(f"unstaking    {unstake_line(st['unstaking_until'], st['unstake_remaining_s'])}")
    if link.get("last_error") and link["status"] != "up":
        out.append(f"last error   {link['last_error']}")
    return out


def workers_line(st: Mapping[str, Any]) -> str | None:
    """How many slots' workers are up, when not all are (None otherwise, or from a daemon
    that does not say). While the daemon starts them, the link waits: say so."""
    ready, slots = st.get("workers_ready"), st.get("slots")
    if not isinstance(ready, int) or not isinstance(slots, int) or ready >= slots:
        return None
    if st.get("starting"):
        return f"{ready} of {slots} ready: starting them (the link waits for them)"
    return f"{ready} of {slots} ready"


RETIRED: Final = (
    "this node is retired and gets no more work; to serve again, run `nodeclient init` "
    "in a new home (a new node_id)"
)


def unstake_line(until: float, remaining: float | None) -> str:
    """The cooldown's line: the time left, or, once it has ended, that the node is retired."""
    if remaining is not None and remaining > 0:
        return f"cooldown ends in {_duration(remaining)}"
    ended = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(until))
    return f"cooldown ended at {ended}: {RETIRED}"


def cmd_history(args: argparse.Namespace) -> int:
    from nodeclient.node import console

    home = home_dir(args)
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
