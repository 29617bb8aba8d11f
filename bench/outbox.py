"""The result outbox: commit latency next to the raw durable write, and pruning a long history.

    python bench/outbox.py [--rows 50000]
    python bench/outbox.py --sizes      # where a result should stop being a row

1. Commit (record, sign with a secp256k1 key as the daemon does, fsync) of a 1 KiB result
   (a row of ``outbox_results``) and of a 512 KiB result (a file beside the database),
   medians, each next to the raw limit measured in the same run, the samples alternating:
   a 1 KiB ``pwrite`` + ``fdatasync`` of an existing file, and a 512 KiB write + ``fsync``
   of a new file, rename and directory ``fsync``.
2. Pruning: an outbox holding ``--rows`` acknowledged 1 KiB results (a node that has run
   for a while) drops them all by retention while another thread keeps asking for an
   entry every millisecond, as the daemon's event loop does at each dispatch. Printed:
   the prune's total time and the longest the other thread waited (the lock is held one
   batch at a time), and how long history and counts take on that outbox.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nodeclient.node import outbox as outbox_module
from nodeclient.node.outbox import Outbox
from nodeclient.protocol import eip712
from nodeclient.protocol.secp import Secp256k1Key

KEY = Secp256k1Key.generate()
MESSAGE = {"task_id": "0x" + "00" * 16, "proof": "0x" + "11" * 32, "result_size": 1024}


def sign(message: dict[str, object]) -> bytes:
    """What the daemon's commit signs with: the Result message, by the node key."""
    return eip712.sign_typed(
        KEY, "Result", eip712.message_from_json("Result", message), chain_id=31337
    )


def commit(box: Outbox, result: bytes, task_id: uuid.UUID | None = None) -> uuid.UUID:
    task_id, job_id = task_id or uuid.uuid4(), uuid.uuid4()
    message = {
        "task_id": "0x" + task_id.hex, "job_id": "0x" + job_id.hex, "node_id": KEY.address,
        "proof": "0x" + "11" * 32, "result_size": len(result), "completed_at": int(time.time()),
    }  # fmt: skip
    box.commit_result(
        task_id=task_id, job_id=job_id, workload_class="ai.inference", slice_index=None,
        kind="result", result=result, proof=b"p" * 32, message=message, received_at=1.0,
        completed_at=time.time(), sign=sign,
    )  # fmt: skip
    return task_id


def medians_ms(fns: list[Callable[[], object]], n: int) -> list[float]:
    """The median of *n* runs of each of *fns*, their runs alternating (a drift of the
    disk's speed, large on this machine, meets each alike)."""
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(n):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            samples[i].append(time.perf_counter() - t0)
    return [statistics.median(s) * 1e3 for s in samples]


def raw_small(path: Path) -> Callable[[], None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.pwrite(fd, b"\0" * 65536, 0)
    os.fsync(fd)
    data, offset = os.urandom(1024), [0]

    def once() -> None:
        os.pwrite(fd, data, offset[0])
        offset[0] = (offset[0] + 4096) % 65536
        os.fdatasync(fd)

    return once


def raw_large(directory: Path) -> Callable[[], None]:
    data = os.urandom(512 * 1024)

    def once() -> None:
        name = uuid.uuid4().hex
        fd = os.open(directory / f".{name}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        os.replace(directory / f".{name}", directory / name)
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(dfd)
        os.close(dfd)

    return once


def bench_commit(home: Path, n: int) -> None:
    box = Outbox(home / "outbox.db")
    small, large = os.urandom(1024), os.urandom(512 * 1024)
    for _ in range(300):  # the WAL at its working size
        box.mark_acked(commit(box, small), status="accepted", reason="", at=time.time())
    (home / "raw").mkdir()
    floor_small, floor_large = raw_small(home / "raw" / "small"), raw_large(home / "raw")
    ours_s, raw_s = medians_ms([lambda: commit(box, small), floor_small], n)
    ours_l, raw_l = medians_ms([lambda: commit(box, large), floor_large], n // 2)
    box.close()
    print(
        f"commit 1 KiB result     {ours_s:6.3f} ms   raw pwrite+fdatasync        {raw_s:6.3f} ms"
        f"   ratio {ours_s / raw_s:.2f}x"
    )
    print(
        f"commit 512 KiB result   {ours_l:6.3f} ms   raw file+fsync+rename+dir   {raw_l:6.3f} ms"
        f"   ratio {ours_l / raw_l:.2f}x   (then the row's own fsync)"
    )


def fill(box: Outbox, rows: int) -> None:
    """*rows* acknowledged 1 KiB results, written in bulk (the setup, not the measurement)."""
    db = box._db
    data = os.urandom(1024)
    message = json.dumps(MESSAGE)
    db.execute("BEGIN")
    for i in range(rows):
        t = str(uuid.uuid4())
        db.execute("INSERT INTO outbox_results (task_id, data) VALUES (?, ?)", (t, data))
        db.execute(
            "INSERT INTO outbox (task_id, job_id, workload_class, kind, result_size, proof, "
            "message, signature, received_at, completed_at, acked_at, ack_status, ack_reason, "
            "held) VALUES (?, ?, 'ai.inference', 'result', 1024, ?, ?, ?, ?, ?, ?, "
            "'accepted', '', 1)",
            (t, str(uuid.uuid4()), b"p" * 32, message, b"s" * 65, i, i + 1.0, i + 2.0),
        )
    db.execute("COMMIT")


def bench_prune(home: Path, rows: int) -> None:
    path = home / "long.db"
    box = Outbox(path)
    fill(box, rows)
    box.close()
    box = Outbox(path)  # counts and held bytes from disk, as after a restart
    probe = commit(box, b"the newest, unacknowledged")
    t0 = time.perf_counter()
    history = list(box.history(limit=1000))
    history_ms = (time.perf_counter() - t0) * 1e3
    waits: list[float] = []
    done = threading.Event()

    def ask() -> None:
        while not done.is_set():
            t = time.perf_counter()
            box.get(probe)
            waits.append(time.perf_counter() - t)
            time.sleep(0.001)

    asker = threading.Thread(target=ask)
    asker.start()
    t0 = time.perf_counter()
    dropped = box.prune(acked_before=float(rows + 10), keep_bytes=1 << 40)
    prune_s = time.perf_counter() - t0
    done.set()
    asker.join()
    t0 = time.perf_counter()
    counts = box.counts()
    counts_ms = (time.perf_counter() - t0) * 1e3
    box.close()
    assert dropped == rows
    assert len(history) == 1000
    assert counts["completed"] == rows
    print(
        f"prune {rows} acknowledged results: {prune_s:.2f} s; meanwhile a lookup every ms "
        f"waited at most {max(waits) * 1e3:.1f} ms (median {statistics.median(waits) * 1e3:.3f})"
    )
    print(
        f"on that outbox: history of the newest 1000 in {history_ms:.1f} ms, "
        f"status counts in {counts_ms:.3f} ms"
    )


SIZES_KIB = (64, 96, 128, 192, 256, 512)


def bench_sizes(home: Path, n: int) -> None:
    """The commit of results of each size as a row and as a file (INLINE_MAX set above or
    below the size), alternating, *n* each, a 2 ms pause between: mean (SQLite's WAL
    checkpoints included, which the median hides), median and max, in ms."""
    rows, files = Outbox(home / "rows.db"), Outbox(home / "files.db")
    for box in (rows, files):
        for _ in range(300):  # the WAL at its working size
            box.mark_acked(commit(box, b"w" * 1024), status="accepted", reason="", at=time.time())
    print("size      row: mean  median  max       file: mean  median  max")
    real = outbox_module.INLINE_MAX
    try:
        for kib in SIZES_KIB:
            data = os.urandom(kib << 10)
            taken: dict[str, list[float]] = {"row": [], "file": []}
            for _ in range(n):
                for kind, box, inline in (("row", rows, kib << 10), ("file", files, 0)):
                    outbox_module.INLINE_MAX = inline  # at or above the size: a row
                    t0 = time.perf_counter()
                    commit(box, data)
                    taken[kind].append((time.perf_counter() - t0) * 1e3)
                    time.sleep(0.002)
            cells = [
                f"{statistics.mean(t):7.3f} {statistics.median(t):7.3f} {max(t):5.1f} ms"
                for t in (taken["row"], taken["file"])
            ]
            print(f"{kib:3d} KiB     {cells[0]}      {cells[1]}")
    finally:
        outbox_module.INLINE_MAX = real
        rows.close()
        files.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--n", type=int, default=200, help="commits per median")
    parser.add_argument("--sizes", action="store_true", help="rows against files, by size")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/var/tmp")) as tmp:
        if args.sizes:
            bench_sizes(Path(tmp), args.n)
            return
        (Path(tmp) / "a").mkdir()
        bench_commit(Path(tmp) / "a", args.n)
        (Path(tmp) / "b").mkdir()
        bench_prune(Path(tmp) / "b", args.rows)


if __name__ == "__main__":
    main()
