"""2.3.6 Proof-of-Execution vectors, checked against hashlib and the sha256sum command."""

from __future__ import annotations

import hashlib
import io
import subprocess
import uuid

import pytest

from nodeclient.node.cli import main
from nodeclient.protocol.proof import ProofHasher, proof_of_execution, proof_of_stream

TASK = uuid.UUID("00112233-4455-6677-8899-aabbccddeeff")
NODE = "0x90F8bf6A479f320ead074411a4B0e7944Ea8c9C1"
# Vectors published in docs/protocol.md.
VECTORS = [
    (b"", "0xff29a56129de021fd482e9111f56803e355963f23b395076fd01a23e325cf8f0"),
    (b"hello world", "0x262d019bfd34392cb53c0525bfed25c47f0f9cf0836fb5c1582847eac5a8c273"),
    (
        bytes(range(256)) * 4096,
        "0x1820f76d713e01f3260c1468f5d80cbedac7cf8dc715d864bcda156825b815bb",
    ),
]


def reference(task: uuid.UUID, result: bytes, node: str) -> bytes:
    return hashlib.sha256(task.bytes + result + bytes.fromhex(node[2:])).digest()


@pytest.mark.parametrize("result", [b"", b"hello", bytes(range(256)) * 4097])
def test_proof_equals_hashlib_over_concatenation(result: bytes) -> None:
    """The proof is SHA-256 over task_id(16) || result || node_id(20), incl. empty and > 1 MiB."""
    assert proof_of_execution(task_id=TASK, result=result, node_id=NODE) == reference(
        TASK, result, NODE
    )


@pytest.mark.parametrize(("result", "expected"), VECTORS, ids=["empty", "hello", "1MiB"])
def test_published_vectors(result: bytes, expected: str) -> None:
    """The vectors in docs/protocol.md hold, for the in-memory and the streaming path."""
    assert "0x" + proof_of_execution(task_id=TASK, result=result, node_id=NODE).hex() == expected
    proof, _ = proof_of_stream(task_id=TASK, stream=io.BytesIO(result), node_id=NODE)
    assert "0x" + proof.hex() == expected


def test_stream_equals_in_memory_for_multi_mib() -> None:
    """Streaming a 5 MiB result in one pass gives the same proof and byte count."""
    data = bytes(range(251)) * (5 * 1024 * 1024 // 251)
    proof, size = proof_of_stream(task_id=TASK, stream=io.BytesIO(data), node_id=NODE)
    assert size == len(data)
    assert proof == reference(TASK, data, NODE)


def test_incremental_updates_are_order_sensitive() -> None:
    """Feeding chunks in order equals the whole; a different split of the same bytes too;
    the same chunks in another order do not."""

    def fed(*parts: bytes) -> bytes:
        h = ProofHasher(task_id=TASK, node_id=NODE)
        for part in parts:
            h.update(part)
        assert h.size == sum(map(len, parts))
        return h.finish()

    assert fed(b"ab", b"", b"cde") == reference(TASK, b"abcde", NODE)
    assert fed(b"a", b"bcd", b"e") == fed(b"abcde") == reference(TASK, b"abcde", NODE)
    assert fed(b"cde", b"ab") == reference(TASK, b"cdeab", NODE) != fed(b"ab", b"cde")


def test_binds_task_and_node() -> None:
    """A different task or node gives a different proof for the same result."""
    base = proof_of_execution(task_id=TASK, result=b"r", node_id=NODE)
    assert proof_of_execution(task_id=uuid.UUID(int=1), result=b"r", node_id=NODE) != base
    other = "0x" + "00" * 19 + "01"
    assert proof_of_execution(task_id=TASK, result=b"r", node_id=other) != base


def test_cli_proof_matches_sha256sum(tmp_path, capsys) -> None:
    """`nodeclient proof` prints what sha256sum computes over the same concatenated bytes."""
    result = bytes(range(256)) * 8192  # 2 MiB
    (tmp_path / "result.bin").write_bytes(result)
    (tmp_path / "concat.bin").write_bytes(TASK.bytes + result + bytes.fromhex(NODE[2:]))
    rc = main(["proof", "--task-id", str(TASK), "--node-id", NODE, str(tmp_path / "result.bin")])
    assert rc == 0
    printed = capsys.readouterr().out.strip()
    out = subprocess.run(
        ["sha256sum", str(tmp_path / "concat.bin")], capture_output=True, text=True, check=True
    )
    assert printed == "0x" + out.stdout.split()[0]


def test_cli_proof_rejects_bad_arguments(tmp_path, capsys) -> None:
    """Bad UUID, bad address or a missing file: one-line error, non-zero exit."""
    f = tmp_path / "r"
    f.write_bytes(b"x")
    assert main(["proof", "--task-id", "nope", "--node-id", NODE, str(f)]) != 0
    assert main(["proof", "--task-id", str(TASK), "--node-id", "0x12", str(f)]) != 0
    assert main(["proof", "--task-id", str(TASK), "--node-id", NODE, str(tmp_path / "no")]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("nodeclient: error:") == 3
