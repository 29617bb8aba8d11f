"""The open-file limit of the long-running processes: the node daemon and the coordinator.

A process started from a login shell or by an older unit gets a soft ``RLIMIT_NOFILE``
of 1024, while the hard limit is usually far higher (systemd's default is 524288). For
the coordinator every linked node is a socket, so 1024 would cap a network at about a
thousand nodes, past which connections fail at ``accept`` and the database cannot open
its files; for the node, each slot's worker takes pipes and its disk watcher a
descriptor per directory level. Both raise their soft limit at start, never past the
hard one (only root can raise that: ``LimitNOFILE=`` in a unit, ``ulimit -Hn``).
"""

from __future__ import annotations

import resource
from typing import NamedTuple


class OpenFiles(NamedTuple):
    soft: int  # the limit in force now (resource.RLIM_INFINITY: none)
    hard: int
    error: str  # why it could not be raised, "" when it was or had no need to be


def raise_soft_limit(want: int) -> OpenFiles:
    """Raise the soft RLIMIT_NOFILE towards *want*, within the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return OpenFiles(soft, hard, "")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:  # e.g. above the kernel's nr_open
        return OpenFiles(soft, hard, str(exc))
    return OpenFiles(target, hard, "")
