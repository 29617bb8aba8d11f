"""A name made durable: once a file is renamed into a directory, or a directory made, the
directory holding the name is fsynced, or a power cut can lose the name although the data
it names reached the disk (the outbox's result files, the blob store's blobs, a node
home)."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_directory(path: Path) -> None:
    """fsync the directory *path* (its entries: the names in it)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
